"""proreflow: few-step students from diffusion/flow teachers by progressive reflow
with aligned v-prediction (Ke et al., "ProReflow", arXiv 2503.04824).

The algorithm modules (`conventions`, `windows`, `time_sampling`, `losses`, `solvers`, `pairs`,
`sampling`, `methods`) depend only on torch; velocity fields, schedulers, training, the applications (`apps/`) and
the CLI build on them (docs/design.md §3).
"""

from proreflow.errors import ProReflowError
from proreflow.windows import ProgressivePlan, Stage, WindowSchedule

__all__ = ["ProReflowError", "ProReflowFlowScheduler", "ProReflowScheduler", "ProgressivePlan", "Stage", "WindowSchedule"]


def __getattr__(name: str):
    # Lazy, so the core never imports diffusers; diffusers' loaders find the scheduler of a saved
    # pipeline as `proreflow.ProReflowScheduler` (model_index.json names this package).
    if name in ("ProReflowScheduler", "ProReflowFlowScheduler"):
        from proreflow.schedulers import proreflow

        return getattr(proreflow, name)
    raise AttributeError(f"module 'proreflow' has no attribute {name!r}")


__version__ = "0.1.0"

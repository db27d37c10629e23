"""proreflow: few-step students from diffusion/flow teachers by progressive reflow
with aligned v-prediction (Ke et al., "ProReflow", arXiv 2503.04824).

The algorithm modules (`conventions`, `windows`, `losses`, `solvers`, `pairs`,
`sampling`) depend only on torch; training, teachers, metrics and the CLI build on them.
"""

from proreflow.errors import ProReflowError
from proreflow.windows import ProgressivePlan, Stage, WindowSchedule

__all__ = ["ProReflowError", "ProgressivePlan", "Stage", "WindowSchedule"]
__version__ = "0.1.0"

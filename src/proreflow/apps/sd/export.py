"""Export a student as a diffusers pipeline with our `ProReflowScheduler` (`proreflow.schedulers.proreflow`),
and load pipelines with clear errors. Importing this module registers the scheduler for diffusers' loaders:

    pipe = StableDiffusionPipeline.from_pretrained(out_dir)   # unet = the student
    image = pipe(prompt, num_inference_steps=4, guidance_scale=4).images[0]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proreflow.errors import ProReflowError
from proreflow.schedulers.proreflow import ProReflowScheduler, scheduler_for
from proreflow.windows import WindowSchedule

__all__ = ["ProReflowScheduler", "export_pipeline", "load_diffusers_pipeline", "scheduler_for"]


def load_diffusers_pipeline(model: str, what: str = "the model", pipeline_class: str | None = None,
                            **kwargs: Any) -> Any:
    """`DiffusionPipeline.from_pretrained(model)` (or `pipeline_class`'s) without a safety checker, with a clear
    error when it cannot be loaded. Exported students load in a fresh process: diffusers resolves
    `proreflow.ProReflowScheduler` only from modules already imported, and this one is (it defines the class)."""
    import diffusers

    cls = getattr(diffusers, pipeline_class or "DiffusionPipeline", None)
    if cls is None:
        raise ProReflowError(f"diffusers has no pipeline class {pipeline_class!r} (for {what} {model!r})")
    try:
        return cls.from_pretrained(model, safety_checker=None, requires_safety_checker=False, **kwargs)
    except AttributeError as exc:
        if "module diffusers has no attribute" not in str(exc):
            raise
        raise ProReflowError(
            f"cannot load {what} {model!r}: its model_index.json names a pipeline class diffusers lacks ({exc}). "
            f"Name a diffusers class whose components it has, e.g. pipeline: StableDiffusionPipeline in the suite "
            f"row (--pipeline StableDiffusionPipeline)") from None
    except (OSError, ValueError) as exc:
        raise ProReflowError(
            f"cannot load {what} {model!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Pass a local "
            f"diffusers folder, or download it once with network access (it is then read from the HF cache; set "
            f"HF_HUB_OFFLINE=1 to use the cache only)") from None


def export_pipeline(pipe: Any, student_unet: Any, windows: WindowSchedule, out_dir: str | Path) -> Path:
    """Save `pipe` with the student UNet and a ProReflowScheduler; load it back with `from_pretrained`."""
    pipe.unet = student_unet
    pipe.scheduler = scheduler_for(pipe.scheduler.config, windows)
    pipe.register_modules(unet=student_unet, scheduler=pipe.scheduler)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    return out

"""Export a student as a diffusers pipeline with our `ProReflowScheduler` (`proreflow.schedulers.proreflow`),
and load pipelines with clear errors. Importing this module registers the scheduler for diffusers' loaders:

    pipe = StableDiffusionPipeline.from_pretrained(out_dir)   # unet = the student
    image = pipe(prompt, num_inference_steps=4, guidance_scale=4).images[0]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from proreflow.errors import ProReflowError
from proreflow.schedulers.proreflow import (ProReflowFlowScheduler, ProReflowScheduler, flow_scheduler_for,
                                           scheduler_for)
from proreflow.windows import WindowSchedule

__all__ = ["ProReflowFlowScheduler", "ProReflowScheduler", "export_pipeline", "flow_scheduler_for",
           "load_diffusers_pipeline", "scheduler_for"]


def load_diffusers_pipeline(model: str, what: str = "the model", pipeline_class: str | None = None,
                            **kwargs: Any) -> Any:
    """`DiffusionPipeline.from_pretrained(model)` (or `pipeline_class`'s) without a safety checker, with a clear
    error when it cannot be loaded. Exported students load in a fresh process: diffusers resolves
    `proreflow.ProReflowScheduler` only from modules already imported, and this one is (it defines the class)."""
    import diffusers

    cls = getattr(diffusers, pipeline_class or "DiffusionPipeline", None)
    if cls is None:
        raise ProReflowError(f"diffusers has no pipeline class {pipeline_class!r} (for {what} {model!r})")
    entries: dict[str, Any] = {}
    index = Path(model) / "model_index.json"
    if index.is_file():
        try:
            entries = json.loads(index.read_text())
        except (ValueError, UnicodeDecodeError):
            pass  # from_pretrained names the problem
    # components saved as absent (SD3 without T5) must be named, or diffusers looks for them
    absent = {k: None for k, v in entries.items() if isinstance(v, list) and v and v[0] is None
              and k not in ("safety_checker", "feature_extractor", "image_encoder")}
    if "StableDiffusion3" not in str(entries.get("_class_name", "")):  # SD3 pipelines have no safety checker
        absent.update(safety_checker=None, requires_safety_checker=False)
    kwargs = {**absent, **kwargs}
    try:
        return cls.from_pretrained(model, **kwargs)
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


def export_pipeline(pipe: Any, student: Any, windows: WindowSchedule, out_dir: str | Path) -> Path:
    """Save `pipe` with the student network and our scheduler for its windows (ProReflowScheduler for VP
    teachers, ProReflowFlowScheduler for flow-matching transformers); load it back with `from_pretrained`."""
    if getattr(pipe, "transformer", None) is not None:
        pipe.register_modules(transformer=student, scheduler=flow_scheduler_for(pipe.scheduler.config, windows))
    else:
        pipe.register_modules(unet=student, scheduler=scheduler_for(pipe.scheduler.config, windows))
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    return out

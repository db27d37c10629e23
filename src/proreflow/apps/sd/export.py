"""Export a student as a diffusers pipeline that stock diffusers loads, with a model card, and load pipelines
with clear errors.

A VP student whose windows start at the teacher's timesteps (the presets' `window_placement: timesteps`) is
saved with diffusers' own `DDIMScheduler` (trailing spacing, `set_alpha_to_one=True`): one Euler step per
window is one DDIM step (docs/design.md §1), so the folder needs nothing of ours:

    pipe = StableDiffusionPipeline.from_pretrained(out_dir)   # unet = the student, DDIMScheduler
    image = pipe(prompt, num_inference_steps=4, guidance_scale=4).images[0]

A flow-matching student (SD3-style) whose K windows are uniform in sigma is saved with diffusers' own
`FlowMatchEulerDiscreteScheduler` (no shift, `shift_terminal = 1/K`), exact at K steps. Other placements get our
`ProReflowScheduler` (flow-matching students our `ProReflowFlowScheduler`); diffusers resolves those only once
this module is imported, and the export says so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from proreflow.errors import ProReflowError
from proreflow.fields.families import family_for_class, family_of
from proreflow.schedulers import MAX_SAMPLING_STEPS
from proreflow.schedulers.proreflow import (ProReflowFlowScheduler, ProReflowScheduler, flow_scheduler_for,
                                           scheduler_for, stock_scheduler_for)
from proreflow.store import atomic_write_text
from proreflow.windows import WindowSchedule

__all__ = ["ProReflowFlowScheduler", "ProReflowScheduler", "export_pipeline", "flow_scheduler_for",
           "keep_windows", "load_diffusers_pipeline", "load_for_sampling", "model_card", "scheduler_for",
           "student_scheduler", "student_windows"]


#: what to do about a model `from_pretrained` cannot open
_LOAD_ADVICE = ("Pass a local diffusers folder, or download it once with network access (it is then read from the HF "
                "cache; set HF_HUB_OFFLINE=1 to use the cache only)")


def load_diffusers_pipeline(model: str, what: str = "the model", pipeline_class: str | None = None,
                            **kwargs: Any) -> Any:
    """`DiffusionPipeline.from_pretrained(model)` (or `pipeline_class`'s) without a safety checker, with a clear
    error when it cannot be loaded. Exported students load in a fresh process: diffusers resolves
    `proreflow.ProReflowScheduler` only from modules already imported, and this one is (it defines the class)."""
    import diffusers

    if model.startswith("~"):  # from_pretrained would take "~/..." for a hub id
        model = str(Path(model).expanduser())
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
    family = family_for_class(str(entries.get("_class_name", "")))
    if family is None or family.has_safety_checker:  # SD3 pipelines have none, and refuse the argument
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
            f"cannot load {what} {model!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). {_LOAD_ADVICE}"
        ) from None


def check_model_reachable(model: str, what: str = "the model") -> None:
    """Refuse, before any work, a model `from_pretrained` could not open: a local folder without model_index.json,
    or a hub id whose model_index.json is neither in the HF cache (HF_HUB_OFFLINE=1) nor on the hub. Only that small
    file is fetched; the weights are loaded later, when the run needs them."""
    local = Path(model).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ProReflowError(f"cannot load {what} {model!r}: it is not a diffusers pipeline folder "
                                 f"(no model_index.json)")
        return
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(model, "model_index.json")
    except Exception as exc:  # offline cache miss, no such repo, no network, an invalid id: one message for all
        raise ProReflowError(f"cannot load {what} {model!r}: no such local folder, and the hub gave "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}. "
                             f"{_LOAD_ADVICE}") from None


def check_weights_file(path: str, what: str) -> None:
    """Refuse a local `.safetensors` file whose header cannot be read (cut short, not safetensors), before any work."""
    p = Path(path).expanduser()
    if not (p.is_file() and p.suffix == ".safetensors"):
        return
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises its own SafetensorError, an OSError or a ValueError
        raise ProReflowError(f"cannot load {what} {path!r}: not a readable safetensors file "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None


def student_windows(model: str) -> WindowSchedule | None:
    """The final windows a student folder's `proreflow.json` records (None for any other pipeline)."""
    summary = Path(model).expanduser() / "proreflow.json"
    if not summary.is_file():
        return None
    try:
        return WindowSchedule(tuple(json.loads(summary.read_text())["windows"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ProReflowError(f"cannot read the student's windows from {str(summary)!r} ({exc})") from None


def keep_windows(pipe: Any, windows: WindowSchedule | None, steps: int) -> Any:
    """A flow student exported with stock `FlowMatchEulerDiscreteScheduler` is exact at one step per window; at
    more steps its sigmas no longer follow the windows, so our `ProReflowFlowScheduler` (m steps per window) samples
    it instead. Anything else (no student `windows`, another scheduler) is left as it is. Returns `pipe`."""
    stock_flow = type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    if windows is not None and steps > windows.num_windows and stock_flow:
        pipe.scheduler = flow_scheduler_for(pipe.scheduler.config, windows)
    return pipe


def load_for_sampling(model: str, steps: int) -> Any:
    """`load_diffusers_pipeline(model)`, refusing a step count past `MAX_SAMPLING_STEPS` or not a multiple of a
    student's windows: a student exported with stock DDIM would take any count, but only multiples of its windows
    are what it learnt. The windows come from the student's `proreflow.json` (none for other pipelines: any
    count); `keep_windows` then keeps a flow student's steps on its windows."""
    if not 1 <= steps <= MAX_SAMPLING_STEPS:
        raise ProReflowError(f"--steps must be between 1 and {MAX_SAMPLING_STEPS}, got {str(steps)[:40]}")
    windows = student_windows(model)
    if windows is not None:
        windows.steps_per_window(steps)  # refuses with "... multiple of the student's K windows"
    return keep_windows(load_diffusers_pipeline(model), windows, steps)


def student_scheduler(pipe: Any, windows: WindowSchedule, resolution: int | None = None) -> tuple[Any, str]:
    """The scheduler a student of `pipe`'s teacher with final `windows` is exported with, and why (its family's
    `student_scheduler`: stock diffusers where one steps exactly at the windows)."""
    return family_of(pipe).student_scheduler(pipe, windows, resolution)


def export_pipeline(pipe: Any, student: Any, windows: WindowSchedule, out_dir: str | Path,
                    card: dict[str, Any] | None = None, chosen: tuple[Any, str] | None = None) -> Path:
    """Save `pipe` with the student network and the scheduler of `student_scheduler` (or `chosen`, its result),
    plus a model card (README.md) from `card` (`model_card`'s keyword arguments); load it back with
    `from_pretrained`."""
    scheduler, why = chosen or student_scheduler(pipe, windows)
    family_of(pipe).register_student(pipe, student, scheduler)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    atomic_write_text(out / "README.md", model_card(pipe, windows, scheduler, why, **(card or {})))
    return out


def _base_license(base_model: str) -> str:
    """The base model's `license:` from its local model card's metadata header, else 'other'."""
    readme = Path(base_model) / "README.md"
    if readme.is_file():
        head = re.match(r"---\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
        found = re.search(r"^license:\s*(\S+)", head.group(1), re.M) if head else None
        if found:
            return found.group(1)
    return "other"


def model_card(pipe: Any, windows: WindowSchedule, scheduler: Any, why: str = "", base_model: str = "unknown",
               method: str = "",
               stage_windows: list[int] | None = None, lam: float | None = None, teacher_guidance: float = 1.0,
               loss_weighting: str = "velocity", guidance: float = 4.0, prompt: str = "a photo of a cat") -> str:
    """A Hub model card (README.md with its metadata header) that makes a shared student usable as it stands:
    base model and its license, the method and windows, the step counts and guidance, and how to load it."""
    k, cls, sched = windows.num_windows, type(pipe).__name__, type(scheduler).__name__
    stock = sched in ("DDIMScheduler", "FlowMatchEulerDiscreteScheduler")
    imports = "" if stock else "import proreflow.apps.sd.export  # registers our scheduler with diffusers\n"
    stages = " -> ".join(str(n) for n in (stage_windows or [k]))
    lam_text = f", lambda = {lam:g}" if lam is not None else ""
    weighting = "in the student's output space" if loss_weighting == "output" else "on the velocity itself"
    multiples = (f"this scheduler follows the windows at exactly {k} steps" if sched == "FlowMatchEulerDiscreteScheduler"
                 else f"any multiple of {k} also works")
    return f"""---
base_model: {base_model}
license: {_base_license(base_model)}
library_name: diffusers
pipeline_tag: text-to-image
tags:
- proreflow
- reflow
- few-step
- distillation
---
# {k}-step student of {base_model}

Distilled by progressive reflow with aligned v-prediction ([proreflow](https://arxiv.org/abs/2503.04824),
method `{method or "unknown"}`: windows per stage {stages}{lam_text}, velocity MSE measured {weighting}), trained
with teacher guidance {teacher_guidance:g}. The license is the base model's.

- Sample in **{k} steps** (one per window; {multiples}), with classifier-free guidance
  about {guidance:g} as the teacher would take.
- Window starts in flow time (1 = noise, 0 = data): {", ".join(f"{b:.4g}" for b in windows.boundaries[:-1])}.
- Scheduler: `{sched}`{" (stock diffusers: nothing else to install)" if stock else " (from the proreflow package)"}.
  {why}

```python
{imports}from diffusers import {cls}
pipe = {cls}.from_pretrained("<this folder or repo>")
image = pipe("{prompt}", num_inference_steps={k}, guidance_scale={guidance:g}).images[0]
```
"""

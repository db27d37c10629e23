"""Images for a row: load its pipeline (with its scheduler and weights), generate one PNG per caption
resumably (written atomically, skipped when already valid on disk), and time generation in a separate pass."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from proreflow import schedulers
from proreflow.apps.coco_eval.config import PROTOCOLS, EvalConfig, RunSpec
from proreflow.data.captions import centre_crop_resize
from proreflow.errors import ProReflowError
from proreflow.fields import denoiser


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_eval_pipeline(spec: RunSpec, dtype: str = "auto", device: torch.device | None = None) -> Any:
    """The run's diffusers pipeline on `device`, with its LoRA fused and its scheduler swapped in."""
    from proreflow.apps.sd.export import keep_windows, load_diffusers_pipeline, student_windows

    device = device or pick_device()
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype}
    if spec.variant:
        kwargs["variant"] = spec.variant
    pipe = load_diffusers_pipeline(spec.model, f"the model of run {spec.name!r}:", pipeline_class=spec.pipeline,
                                   **kwargs)
    if spec.unet_delta:
        from proreflow.apps.coco_eval.published import load_unet_delta, merge_unet_delta

        merge_unet_delta(denoiser(pipe), load_unet_delta(spec.unet_delta, spec.delta_variant),
                         f"the UNet delta {spec.unet_delta!r} of run {spec.name!r}")
    if spec.unet_weights:
        from proreflow.apps.coco_eval.published import load_unet_weights

        load_unet_weights(denoiser(pipe), spec.unet_weights, f"the UNet weights {spec.unet_weights!r} of run {spec.name!r}")
    if spec.lora:
        where = {}
        if spec.lora_weight:  # one file of a repository holding several (PCM's): its subfolder and name
            sub, _, name = spec.lora_weight.rpartition("/")
            where = {"weight_name": name, **({"subfolder": sub} if sub else {})}
        try:
            pipe.load_lora_weights(spec.lora, **where)
            pipe.fuse_lora()
        except (OSError, ValueError) as exc:
            what = f"{spec.lora!r}" + (f" ({spec.lora_weight})" if spec.lora_weight else "")
            raise ProReflowError(f"cannot load the LoRA {what} of run {spec.name!r}: "
                                 f"{str(exc).splitlines()[0][:200]}") from None
    if spec.scheduler is not None:
        pipe.scheduler = run_scheduler(spec.scheduler, pipe.scheduler, spec.steps, spec.timestep_spacing,
                                       spec.scheduler_overrides)
    else:  # the student's own scheduler: a flow student's stock one follows its windows only at one step each
        keep_windows(pipe, student_windows(spec.model), spec.steps)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def run_scheduler(name: str, current: Any, steps: int, timestep_spacing: str | None = "trailing",
                  overrides: dict[str, Any] | None = None) -> Any:
    """Scheduler `name` for a pipeline whose scheduler is `current` (`schedulers.make_scheduler` on its config);
    an exported student's own ProReflowScheduler is kept for "proreflow" (it knows the student's windows)."""
    from proreflow.schedulers.proreflow import ProReflowScheduler

    if name == "proreflow" and isinstance(current, ProReflowScheduler):
        return current
    return schedulers.make_scheduler(name, current.config, steps, timestep_spacing, overrides=overrides)


GenerateFn = Callable[[list[str], list[torch.Generator]], np.ndarray]


def pipeline_generate_fn(pipe: Any, spec: RunSpec, resolution: int, resample: str = "bicubic") -> GenerateFn:
    """prompts + one generator per image -> float images (N, resolution, resolution, 3) in [0, 1]. A run that
    generates at its own size (`spec.resolution`, e.g. SDXL-Turbo's 512) is resized to `resolution` with the
    protocol's filter, so every row of a table is scored at one size."""
    size = spec.resolution or resolution

    def call(prompts: list[str], generators: list[torch.Generator]) -> np.ndarray:
        with torch.no_grad():
            out = pipe(prompts, num_inference_steps=spec.steps, guidance_scale=float(spec.guidance),
                       height=size, width=size, generator=generators, output_type="np")
        images = np.asarray(out.images)
        return images if size == resolution else _resized(images, resolution, resample)

    return call


def _resized(images: np.ndarray, resolution: int, resample: str) -> np.ndarray:
    from PIL import Image

    out = []
    for im in images:
        pil = Image.fromarray(to_uint8(im))
        out.append(np.asarray(centre_crop_resize(pil, resolution, resample)[0], dtype=np.float32) / 255.0)
    return np.stack(out)


class LazyGenerate:
    """`pipeline_generate_fn` whose pipeline is loaded on first use, so a finished run needs no model."""

    def __init__(self, spec: RunSpec, cfg: EvalConfig, device: torch.device) -> None:
        self.spec, self.cfg, self.device = spec, cfg, device
        self.fn: GenerateFn | None = None

    def load(self) -> GenerateFn:
        if self.fn is None:
            pipe = load_eval_pipeline(self.spec, self.cfg.dtype, self.device)
            self.fn = pipeline_generate_fn(pipe, self.spec, self.cfg.resolution, PROTOCOLS[self.cfg.protocol].resample)
        return self.fn

    def __call__(self, prompts: list[str], generators: list[torch.Generator]) -> np.ndarray:
        return self.load()(prompts, generators)


def image_seed(seed: int, index: int) -> int:
    """The noise of caption `index` depends on (seed, index) only, not on the batch it falls in."""
    return (seed << 32) + index


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def _valid_image(path: Path, resolution: int) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decodes fully: a truncated (half-written) file fails here
            return im.size == (resolution, resolution)
    except Exception:  # noqa: BLE001 - any unreadable file is regenerated
        return False


def _save_png_atomic(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        Image.fromarray(arr).save(f, format="PNG")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def generate_images(generate: GenerateFn, captions: Sequence[str], folder: Path, resolution: int, seed: int,
                    batch_size: int, progress: bool = True, desc: str = "generate") -> int:
    """Write `folder/<index>.png` for every caption not already there (valid); returns how many were made."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):
        stale.unlink()
    todo = [i for i in range(len(captions)) if not _valid_image(folder / image_name(i), resolution)]
    bar = tqdm(total=len(captions), initial=len(captions) - len(todo), desc=desc, disable=not progress, unit="img")
    for k in range(0, len(todo), batch_size):
        idx = todo[k:k + batch_size]
        gens = [torch.Generator().manual_seed(image_seed(seed, i)) for i in idx]
        images = generate([captions[i] for i in idx], gens)
        if images.shape != (len(idx), resolution, resolution, 3):
            raise ProReflowError(f"the pipeline returned images of shape {images.shape}, expected "
                                 f"({len(idx)}, {resolution}, {resolution}, 3)")
        for i, img in zip(idx, to_uint8(images)):
            _save_png_atomic(img, folder / image_name(i))
        bar.update(len(idx))
    bar.close()
    return len(todo)


def time_per_image(generate: GenerateFn, captions: Sequence[str], batch_size: int, warmup: int, batches: int,
                   device: torch.device) -> dict[str, Any] | None:
    """Median seconds per image over `batches` batches after `warmup` batches (CUDA synchronised)."""
    if batches == 0:
        return None
    prompts = [captions[i % len(captions)] for i in range(batch_size)]
    times = []
    for b in range(warmup + batches):
        gens = [torch.Generator().manual_seed(image_seed(10_000 + b, i)) for i in range(batch_size)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        generate(prompts, gens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if b >= warmup:
            times.append((time.perf_counter() - t0) / batch_size)
    return {"seconds_per_image": statistics.median(times), "device": device_name(device), "batch_size": batch_size,
            "warmup_batches": warmup, "timed_batches": batches}

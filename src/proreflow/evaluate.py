"""The evaluation harness behind the paper's tables 1-3: generate, time, FID, CLIP score.

One `RunSpec` is one table row: a diffusers pipeline (our exported student, a teacher, or a
published student) with a named scheduler, a step count and a guidance scale. `evaluate` runs a
list of them on one caption set: images are generated resumably (a file per caption index,
written atomically, skipped when already valid on disk), time per image is measured in a separate
pass (median over batches after warm-up, the device named), and FID / CLIP score are computed from
the images on disk with feature networks handed in by the caller (`metrics_images`), so the tests
run the same code with small local networks. Results go to JSON, a markdown table in the paper's
format, and (when a method has several guidance scales) a plot of FID and CLIP against the scale.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from proreflow import schedulers
from proreflow.store import atomic_write_text, read_json_object
from proreflow.config import from_dict, load_yaml, merge, resolve_preset
from proreflow.data.coco import CAPTION_SETS, CaptionSet, load_caption_set
from proreflow.errors import ProReflowError


PUBLISHED_SCHEDULERS, PERFLOW_WINDOWS, SPACED = schedulers.PUBLISHED, schedulers.PERFLOW_WINDOWS, schedulers.SPACED
#: the scheduler names of `--scheduler`: diffusers' solvers, our windowed Euler, published students' samplers
SCHEDULERS = schedulers.NAMES


@dataclass(frozen=True)
class RunSpec:
    """One table row. `scheduler` None keeps the pipeline's own (e.g. an exported student's ProReflowScheduler).

    `timestep_spacing` applies to a named DDIM/Euler/DPM-Solver/UniPC scheduler: "trailing" (default)
    starts at the noisiest timestep like our students; SD configs say "leading", which at 4 steps starts
    at timestep 751 from pure noise and handicaps the baseline; None keeps the pipeline's setting.

    Published students: `scheduler` "perflow" / "perflow-ddim-eps" (PeRFlow SD1.5 / SDXL checkpoints) or
    "rectified-flow" (InstaFlow, 2-rectified flow); `unet_delta` adds a UNet weight delta (PeRFlow's
    `hansyan/perflow-sd15-delta-weights`, `delta_variant` v0-1) to the model's UNet; `unet_weights` replaces
    the UNet's weights by a state-dict file (Rectified Diffusion's `rd.ckpt`); `scheduler_overrides` are
    settings laid over a named diffusers scheduler (e.g. {beta_schedule: linear}); `pipeline` names the
    diffusers class to load with when the model's model_index.json names one diffusers lacks.
    """

    name: str
    model: str
    steps: int = 4
    guidance: float | list[float] = 4.0
    scheduler: str | None = None
    lora: str | None = None
    variant: str | None = None
    timestep_spacing: str | None = "trailing"
    pipeline: str | None = None
    unet_delta: str | None = None
    delta_variant: str | None = None
    unet_weights: str | None = None
    scheduler_overrides: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ProReflowError(f"run {self.name!r}: steps must be >= 1, got {self.steps}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ProReflowError(f"run {self.name!r}: unknown scheduler {self.scheduler!r}; use one of {list(SCHEDULERS)}")
        if self.timestep_spacing not in (None, "trailing", "leading", "linspace"):
            raise ProReflowError(f"run {self.name!r}: timestep_spacing must be trailing, leading, linspace or null "
                                 f"(--timestep-spacing own: the pipeline's own), got {self.timestep_spacing!r}")
        if self.scheduler in PUBLISHED_SCHEDULERS and self.scheduler != "rectified-flow" and self.steps < PERFLOW_WINDOWS:
            raise ProReflowError(f"run {self.name!r}: PeRFlow's checkpoints have {PERFLOW_WINDOWS} windows, at least one "
                                 f"step each: steps must be >= {PERFLOW_WINDOWS}, got {self.steps}")
        if self.pipeline is not None and not self.pipeline.endswith("Pipeline"):
            raise ProReflowError(f"run {self.name!r}: pipeline must name a diffusers pipeline class such as "
                                 f"StableDiffusionPipeline, got {self.pipeline!r}")
        if self.scheduler_overrides is not None and not isinstance(self.scheduler_overrides, dict):
            raise ProReflowError(f"run {self.name!r}: scheduler_overrides must be a mapping of scheduler settings, "
                                 f"e.g. {{beta_schedule: linear}}, got {self.scheduler_overrides!r}")
        if self.scheduler_overrides is not None and self.scheduler not in schedulers.SOLVERS:
            which = repr(self.scheduler) if self.scheduler else "the pipeline's own"
            raise ProReflowError(f"run {self.name!r}: scheduler_overrides apply to a named diffusers scheduler "
                                 f"({', '.join(schedulers.SOLVERS)}), not to {which}")
        if self.scheduler_overrides:
            try:
                schedulers.check_overrides(self.scheduler, self.scheduler_overrides)
            except ProReflowError as exc:
                raise ProReflowError(f"run {self.name!r}: {exc}") from None
        if self.delta_variant is not None and self.unet_delta is None:
            raise ProReflowError(f"run {self.name!r}: delta_variant needs unet_delta")
        scales = self.guidance if isinstance(self.guidance, list) else [self.guidance]
        if not scales:
            raise ProReflowError(f"run {self.name!r}: give at least one guidance scale")
        if any(g < 0 for g in scales):
            raise ProReflowError(f"run {self.name!r}: guidance scales must be >= 0, got {self.guidance!r}")

    def expand(self) -> list["RunSpec"]:
        """One spec per guidance scale (a CFG sweep when there are several)."""
        scales = self.guidance if isinstance(self.guidance, list) else [self.guidance]
        return [replace(self, guidance=float(g)) for g in scales]

    @property
    def slug(self) -> str:
        raw = f"{self.name}-{self.scheduler or 'own'}-{self.steps}steps-cfg{self.guidance:g}"
        return re.sub(r"[^A-Za-z0-9.+_-]+", "_", raw)


@dataclass(frozen=True)
class EvalConfig:
    """What every run of a table shares: captions, resolution, seeds, reference and metric networks."""

    captions: str = "coco2017-5k"
    annotations: str | None = None
    prompts: str | None = None
    num_images: int | None = None
    resolution: int = 512
    seed: int = 0
    batch_size: int = 8
    dtype: str = "auto"
    reference: str | None = None
    ref_stats: str | None = None
    save_ref_stats: str | None = None
    ref_resize: bool = False
    ref_same_images: bool = False
    inception: str | None = None
    clip_model: str = "openai/clip-vit-large-patch14"
    fid: bool = True
    clip: bool = True
    warmup_batches: int = 2
    timing_batches: int = 5
    timing_batch_size: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.captions in CAPTION_SETS, f"unknown caption set {self.captions!r}; use one of {list(CAPTION_SETS)}"),
            (self.resolution >= 8 and self.resolution % 8 == 0,
             f"resolution must be a multiple of 8, got {self.resolution}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.num_images is None or self.num_images >= 1, f"num_images must be >= 1, got {self.num_images}"),
            (self.warmup_batches >= 0 and self.timing_batches >= 0, "warmup_batches and timing_batches must be >= 0"),
            (self.timing_batch_size is None or self.timing_batch_size >= 1,
             f"timing_batch_size must be >= 1, got {self.timing_batch_size}"),
            (self.dtype in ("auto", "float32", "float16", "bfloat16"),
             f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}"),
            (not (self.fid and self.reference is None and self.ref_stats is None),
             "FID needs a reference: a folder of real images (--reference DIR) or statistics (--ref-stats FILE); "
             "or turn FID off (--no-fid)"),
            (not (self.reference and self.ref_stats), "give either --reference or --ref-stats, not both"),
            (not (self.ref_same_images and self.captions == "prompts"),
             "--ref-same-images needs a COCO caption set (its image ids pick the reference images)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ProReflowError(msg)


@dataclass(frozen=True)
class Suite:
    """A suite file (configs/eval-table*.yaml): shared settings plus the rows of one paper table."""

    runs: list[RunSpec] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    title: str = ""


def load_suite(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[list[RunSpec], EvalConfig, str]:
    """A suite by preset name (eval-table1) or path; `overrides` (CLI flags) go over its eval settings."""
    p = resolve_preset(path)
    suite = from_dict(Suite, load_yaml(p), where=str(p))
    if not suite.runs:
        raise ProReflowError(f"suite {str(p)!r} lists no runs")
    if not isinstance(suite.eval, dict):
        raise ProReflowError(f"{p}: 'eval' must be a mapping of evaluation settings")
    cfg = from_dict(EvalConfig, merge(suite.eval, {k: v for k, v in (overrides or {}).items() if v is not None}),
                    where=f"{p}: eval")
    return list(suite.runs), cfg, suite.title


# ----------------------------------------------------------------------------------------------- models


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_eval_pipeline(spec: RunSpec, dtype: str = "auto", device: torch.device | None = None) -> Any:
    """The run's diffusers pipeline on `device`, with its LoRA fused and its scheduler swapped in."""
    from proreflow.diffusers_export import load_diffusers_pipeline

    device = device or pick_device()
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype}
    if spec.variant:
        kwargs["variant"] = spec.variant
    pipe = load_diffusers_pipeline(spec.model, f"the model of run {spec.name!r}:", pipeline_class=spec.pipeline,
                                   **kwargs)
    if spec.unet_delta:
        from proreflow.published import load_unet_delta, merge_unet_delta

        merge_unet_delta(pipe.unet, load_unet_delta(spec.unet_delta, spec.delta_variant),
                         f"the UNet delta {spec.unet_delta!r} of run {spec.name!r}")
    if spec.unet_weights:
        from proreflow.published import load_unet_weights

        load_unet_weights(pipe.unet, spec.unet_weights, f"the UNet weights {spec.unet_weights!r} of run {spec.name!r}")
    if spec.lora:
        try:
            pipe.load_lora_weights(spec.lora)
            pipe.fuse_lora()
        except (OSError, ValueError) as exc:
            raise ProReflowError(f"cannot load the LoRA {spec.lora!r} of run {spec.name!r}: "
                                 f"{str(exc).splitlines()[0][:200]}") from None
    if spec.scheduler is not None:
        pipe.scheduler = run_scheduler(spec.scheduler, pipe.scheduler, spec.steps, spec.timestep_spacing,
                                       spec.scheduler_overrides)
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


def pipeline_generate_fn(pipe: Any, spec: RunSpec, resolution: int) -> GenerateFn:
    """prompts + one generator per image -> float images (N, H, W, 3) in [0, 1]."""

    def call(prompts: list[str], generators: list[torch.Generator]) -> np.ndarray:
        with torch.no_grad():
            out = pipe(prompts, num_inference_steps=spec.steps, guidance_scale=float(spec.guidance),
                       height=resolution, width=resolution, generator=generators, output_type="np")
        return np.asarray(out.images)

    return call


class _LazyGenerate:
    """`pipeline_generate_fn` whose pipeline is loaded on first use, so a finished run needs no model."""

    def __init__(self, spec: RunSpec, cfg: EvalConfig, device: torch.device) -> None:
        self.spec, self.cfg, self.device = spec, cfg, device
        self.fn: GenerateFn | None = None

    def load(self) -> GenerateFn:
        if self.fn is None:
            pipe = load_eval_pipeline(self.spec, self.cfg.dtype, self.device)
            self.fn = pipeline_generate_fn(pipe, self.spec, self.cfg.resolution)
        return self.fn

    def __call__(self, prompts: list[str], generators: list[torch.Generator]) -> np.ndarray:
        return self.load()(prompts, generators)


# ------------------------------------------------------------------------------------------- generation


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


# ---------------------------------------------------------------------------------------------- metrics


@dataclass
class Metrics:
    """Feature networks, injected: the standard ones come from `metrics_images.load_inception` / `load_clip`."""

    inception: torch.nn.Module | None = None
    clip: tuple[Any, Any] | None = None
    reference: Any = None  # FIDStats


def coco_id_of(path: Path) -> int | None:
    """COCO image id from a file name: COCO_val2014_000000000042.jpg or 000000000042.jpg -> 42."""
    tail = path.stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def prepare_metrics(cfg: EvalConfig, device: torch.device, inception: torch.nn.Module | None = None,
                    clip: tuple[Any, Any] | None = None, image_ids: Sequence[int | None] = ()) -> Metrics:
    """Load (or take the given) networks and the reference statistics once for all runs."""
    from proreflow import metrics_images as mi

    m = Metrics()
    if cfg.fid:
        if cfg.ref_stats:
            m.reference = mi.FIDStats.load(cfg.ref_stats)  # checked before the network loads: cheap errors first
        else:
            files = mi.image_files(cfg.reference)
            if cfg.ref_same_images:
                wanted = {i for i in image_ids if i is not None}
                files = [f for f in files if coco_id_of(f) in wanted]
                found = {coco_id_of(f) for f in files}
                if len(found) < len(wanted):
                    missing = sorted(wanted - found)
                    raise ProReflowError(f"--ref-same-images: {len(missing)} of the {len(wanted)} chosen COCO images are "
                                         f"not in {cfg.reference!r} (e.g. id {missing[0]}); pass the folder of the "
                                         f"matching COCO split")
            if not cfg.ref_resize:
                mi.check_sizes(files, cfg.resolution)
        m.inception = inception if inception is not None else mi.load_inception(cfg.inception)
        m.inception = m.inception.to(device)
        if m.reference is None:
            batches = mi.image_batches(files, cfg.batch_size, cfg.resolution if cfg.ref_resize else None,
                                       cfg.progress, "reference features")
            m.reference = mi.image_stats(m.inception, batches, device)
        if cfg.save_ref_stats:
            m.reference.save(cfg.save_ref_stats)
    if cfg.clip:
        m.clip = clip if clip is not None else mi.load_clip(cfg.clip_model)
    return m


def score_folder(folder: Path, captions: Sequence[str], metrics: Metrics, cfg: EvalConfig,
                 device: torch.device) -> dict[str, float | None]:
    """FID against the reference and CLIP score against the captions, from the PNGs on disk."""
    from proreflow import metrics_images as mi

    files = [folder / image_name(i) for i in range(len(captions))]
    out: dict[str, float | None] = {"fid": None, "clip": None}
    if metrics.inception is not None:
        stats = mi.image_stats(metrics.inception, mi.image_batches(files, cfg.batch_size, None, cfg.progress,
                                                                   f"FID features {folder.name}"), device)
        out["fid"] = mi.frechet_distance(metrics.reference, stats)
    if metrics.clip is not None:
        metric = mi.clip_metric(*metrics.clip).to(device)
        batches = ((b.to(device), list(captions[i:i + cfg.batch_size])) for i, b in
                   zip(range(0, len(files), cfg.batch_size),
                       mi.image_batches(files, cfg.batch_size, None, cfg.progress, f"CLIP {folder.name}")))
        out["clip"] = mi.clip_score(metric, batches)
    return out


# ---------------------------------------------------------------------------------------------- harness


#: RunSpec fields added after run folders were first written: left out of run.json while unset, so that
#: earlier folders still resume
_LATER_FIELDS = ("pipeline", "unet_delta", "delta_variant", "unet_weights", "scheduler_overrides")


def _spec_meta(spec: RunSpec) -> dict[str, Any]:
    return {k: v for k, v in asdict(spec).items() if not (k in _LATER_FIELDS and v is None)}


def _check_run_folder(folder: Path, meta: dict[str, Any]) -> None:
    """Images on disk may be reused only if they were made with the same settings and captions."""
    f = folder / "run.json"
    if f.is_file():
        old = read_json_object(f, "the settings of the images", "choose another --out or delete that folder")
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ProReflowError(f"{str(folder)!r} holds images made with other settings ({', '.join(diff)} differ); "
                                 f"choose another --out or delete that folder")
    else:
        atomic_write_text(f, json.dumps(meta, indent=1))


def evaluate(runs: Sequence[RunSpec], cfg: EvalConfig, out: str | Path, *, inception: torch.nn.Module | None = None,
             clip: tuple[Any, Any] | None = None, captions: CaptionSet | None = None,
             title: str = "") -> list[dict[str, Any]]:
    """Run every spec (each guidance scale of a sweep is its own row) and write results.json / results.md."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ProReflowError(f"--out {str(out)!r} exists and is not a folder")
    rows_in = [r for spec in runs for r in spec.expand()]
    slugs = [r.slug for r in rows_in]
    if len(set(slugs)) != len(slugs):
        raise ProReflowError(f"two runs share name, scheduler, steps and guidance: {sorted({s for s in slugs if slugs.count(s) > 1})}")
    if captions is None:
        captions = load_caption_set(cfg.captions, cfg.annotations, cfg.prompts, cfg.num_images, cfg.seed)
    if not captions.captions:
        raise ProReflowError("the caption set is empty")
    device = pick_device()
    metrics = prepare_metrics(cfg, device, inception, clip, captions.image_ids)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "captions.json", json.dumps({"name": captions.name, "captions": captions.captions,
                                                         "image_ids": captions.image_ids}, indent=0))
    rows: list[dict[str, Any]] = []
    for spec in rows_in:
        folder = out / "runs" / spec.slug
        folder.mkdir(parents=True, exist_ok=True)
        _check_run_folder(folder, {"spec": _spec_meta(spec), "resolution": cfg.resolution, "seed": cfg.seed,
                                   "captions": captions.name, "num_captions": len(captions.captions),
                                   "captions_hash": _hash(captions.captions), "dtype": cfg.dtype})
        generate = _LazyGenerate(spec, cfg, device)  # a finished run is scored without loading its model
        made = generate_images(generate, captions.captions, folder, cfg.resolution, cfg.seed, cfg.batch_size,
                               cfg.progress, desc=spec.slug)
        timing = None
        if cfg.timing_batches:  # loaded before the clock starts, even with no warm-up batches
            timing = time_per_image(generate.load(), captions.captions, cfg.timing_batch_size or cfg.batch_size,
                                    cfg.warmup_batches, cfg.timing_batches, device)
        scores = score_folder(folder, captions.captions, metrics, cfg, device)
        row = {"method": spec.name, "model": spec.model, "unet_delta": spec.unet_delta, "unet_weights": spec.unet_weights,
               "scheduler": spec.scheduler or "own",
               "timestep_spacing": spec.timestep_spacing if spec.scheduler in SPACED else None, "steps": spec.steps,
               "guidance": spec.guidance, "images": len(captions.captions), "generated_now": made,
               "seconds_per_image": timing["seconds_per_image"] if timing else None,
               "device": timing["device"] if timing else device_name(device), "fid": scores["fid"],
               "clip": scores["clip"], "timing": timing, "folder": str(folder)}
        atomic_write_text(folder / "result.json", json.dumps(row, indent=1))
        rows.append(row)
        del generate
    summary = {"title": title, "captions": captions.name, "num_images": len(captions.captions),
               "resolution": cfg.resolution, "seed": cfg.seed, "clip_model": cfg.clip_model if cfg.clip else None,
               "reference": cfg.ref_stats or cfg.reference, "rows": rows}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "results.md", markdown_table(rows, summary))
    if any(len(v) > 1 for v in _sweeps(rows).values()):
        from proreflow.plotting import plot_guidance_sweep

        plot_guidance_sweep(_sweeps(rows), [("fid", "FID (lower is better)"), ("clip", "CLIP score (higher is better)")],
                            out / "cfg_sweep.png")
    return rows


def _hash(captions: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]


def markdown_table(rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> str:
    """method | steps | guidance | time | FID | CLIP, like the paper's tables."""
    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    devices = sorted({r["device"] for r in rows if r["seconds_per_image"] is not None})
    head = (f"{summary['title'] + ': ' if summary['title'] else ''}{summary['captions']}, {summary['num_images']} "
            f"images at {summary['resolution']}px, seed {summary['seed']}; FID against {summary['reference']}; "
            f"CLIP score with {summary['clip_model']}. Time: median seconds per image over timed batches after "
            f"warm-up, on {', '.join(devices) or 'n/a'}.\n\n")
    lines = ["| method | scheduler | steps | guidance | time (s/img) | FID | CLIP |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['scheduler']} | {r['steps']} | {r['guidance']:g} | "
                     f"{num(r['seconds_per_image'], '.3f')} | {num(r['fid'], '.2f')} | {num(r['clip'], '.2f')} |")
    return head + "\n".join(lines) + "\n"


def _sweeps(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by method, scheduler and steps: the rows of one group differ in guidance only."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(f"{r['method']} ({r['scheduler']}, {r['steps']} steps)", []).append(r)
    return groups

"""What an evaluation runs: one `RunSpec` per table row, shared `EvalConfig` settings, and suite files
(configs/eval-table*.yaml) that list a paper table's rows."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from proreflow import schedulers
from proreflow.limits import MAX_EVAL_IMAGES, MAX_RESOLUTION
from proreflow.config import from_dict, load_yaml, merge, resolve_preset
from proreflow.data.coco import CAPTION_SETS
from proreflow.errors import ProReflowError

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
    lora_weight: str | None = None  # the LoRA's file in `lora` when it holds several ("sdxl/pcm_..._4step.safetensors")
    variant: str | None = None
    timestep_spacing: str | None = "trailing"
    pipeline: str | None = None
    unet_delta: str | None = None
    delta_variant: str | None = None
    unet_weights: str | None = None
    scheduler_overrides: dict[str, Any] | None = None
    resolution: int | None = None  # the size the model generates at (SDXL-Turbo: 512); resized to the suite's
    # the paper's numbers for this row per caption set ({coco2017-5k: {fid: ..., clip: ...}}), printed beside
    # ours when the run uses that caption set (Table 3 reports two blocks, COCO-2017 and COCO-2014-10k)
    paper: dict[str, dict[str, float]] | None = None

    def __post_init__(self) -> None:
        if self.paper is not None:
            _check_paper(self.name, self.paper)
        most = schedulers.MAX_SAMPLING_STEPS  # one per training timestep: more is no sampler
        if not 1 <= self.steps <= most:
            raise ProReflowError(f"run {self.name!r}: steps must be between 1 and {most}, got {str(self.steps)[:40]}")
        if self.resolution is not None and (isinstance(self.resolution, bool) or not isinstance(self.resolution, int)
                                            or not 8 <= self.resolution <= MAX_RESOLUTION or self.resolution % 8):
            raise ProReflowError(f"run {self.name!r}: resolution must be a multiple of 8 pixels (the VAE's) up to "
                                 f"{MAX_RESOLUTION}, "
                                 f"got {self.resolution!r}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ProReflowError(f"run {self.name!r}: unknown scheduler {self.scheduler!r}; use one of {list(SCHEDULERS)}")
        if self.timestep_spacing not in (None, "trailing", "leading", "linspace"):
            raise ProReflowError(f"run {self.name!r}: timestep_spacing must be trailing, leading, linspace or null "
                                 f"(--timestep-spacing own: the pipeline's own), got {self.timestep_spacing!r}")
        perflow_windows = schedulers.PERFLOW_WINDOWS
        if self.scheduler in schedulers.PUBLISHED and self.scheduler != "rectified-flow" and self.steps < perflow_windows:
            raise ProReflowError(f"run {self.name!r}: PeRFlow's checkpoints have {perflow_windows} windows, at least one "
                                 f"step each: steps must be >= {perflow_windows}, got {self.steps}")
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
        if self.lora_weight is not None and self.lora is None:
            raise ProReflowError(f"run {self.name!r}: lora_weight names a file in a LoRA repository or folder; "
                                 f"give that as lora")
        if self.delta_variant is not None and self.unet_delta is None:
            raise ProReflowError(f"run {self.name!r}: delta_variant needs unet_delta")
        scales = self.guidance if isinstance(self.guidance, list) else [self.guidance]
        if not scales:
            raise ProReflowError(f"run {self.name!r}: give at least one guidance scale")
        if any(g < 0 for g in scales):
            raise ProReflowError(f"run {self.name!r}: guidance scales must be >= 0, got {self.guidance!r}")

    def paper_for(self, captions: str) -> dict[str, float] | None:
        """The paper's numbers for this row on caption set `captions` (None where it reports none)."""
        return (self.paper or {}).get(captions)

    def expand(self) -> list["RunSpec"]:
        """One spec per guidance scale (a CFG sweep when there are several)."""
        scales = self.guidance if isinstance(self.guidance, list) else [self.guidance]
        return [replace(self, guidance=float(g)) for g in scales]

    @property
    def slug(self) -> str:
        raw = f"{self.name}-{self.scheduler or 'own'}-{self.steps}steps-cfg{self.guidance:g}"
        return re.sub(r"[^A-Za-z0-9.+_-]+", "_", raw)


#: what a row's `paper:` numbers may say: FID, CLIP score, seconds per image (Table 2)
PAPER_METRICS = ("fid", "clip", "time")


def _check_paper(name: str, paper: Any) -> None:
    example = "e.g. {coco2017-5k: {fid: 22.03, clip: 29.95}}"
    if not isinstance(paper, dict) or not paper:
        raise ProReflowError(f"run {name!r}: paper takes the paper's numbers per caption set, {example}; got {paper!r}")
    for captions, numbers in paper.items():
        if captions not in CAPTION_SETS or captions == "prompts":
            raise ProReflowError(f"run {name!r}: paper numbers are keyed by a COCO caption set "
                                 f"({', '.join(c for c in CAPTION_SETS if c != 'prompts')}), {example}; got {captions!r}")
        if (not isinstance(numbers, dict) or not numbers or set(numbers) - set(PAPER_METRICS)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers.values())):
            raise ProReflowError(f"run {name!r}: paper.{captions} takes numbers for {', '.join(PAPER_METRICS)}, "
                                 f"got {numbers!r}")


@dataclass(frozen=True)
class Protocol:
    """How a table's numbers are made, beyond the rows: which caption per COCO image, the filter that resizes
    the reference images, and the CLIP model of the CLIP score."""

    caption: str  # data.coco.CAPTION_CHOICES
    resample: str  # data.captions.RESAMPLE
    clip_model: str


#: "ours": a seeded caption per image, bicubic, CLIP ViT-L/14 (what SD-distillation papers commonly report);
#: "rectified-diffusion": the setup of the paper's [40] (Rectified Diffusion's COCO scripts), which Tables 1 and
#: 3 follow: each image's first caption, LANCZOS, CLIP ViT-g/14 (LAION-2B)
PROTOCOLS = {
    "ours": Protocol("random", "bicubic", "openai/clip-vit-large-patch14"),
    "rectified-diffusion": Protocol("first", "lanczos", "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"),
}


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
    # a classifier folder (`proreflow.metrics_classifier`, e.g. the mini teacher's `classifier/`): adds prompt accuracy,
    # the share of images it puts in the class their caption names (the offline stand-in for CLIP score)
    classifier: str | None = None
    # the evaluation protocol (PROTOCOLS): caption choice, reference resize filter and default CLIP model
    protocol: str = "ours"
    clip_model: str | None = None  # None: the protocol's
    fid: bool = True
    clip: bool = True
    warmup_batches: int = 2
    timing_batches: int = 5
    timing_batch_size: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ProReflowError(f"protocol must be one of {list(PROTOCOLS)}, got {self.protocol!r}")
        if self.clip_model is None:
            object.__setattr__(self, "clip_model", PROTOCOLS[self.protocol].clip_model)
        checks = [
            (self.captions in CAPTION_SETS, f"unknown caption set {self.captions!r}; use one of {list(CAPTION_SETS)}"),
            (8 <= self.resolution <= MAX_RESOLUTION and self.resolution % 8 == 0,
             f"resolution must be a multiple of 8 in [8, {MAX_RESOLUTION}], got {self.resolution}"),
            (1 <= self.batch_size <= 4096, f"batch_size must be in [1, 4096], got {self.batch_size}"),
            (self.num_images is None or 1 <= self.num_images <= MAX_EVAL_IMAGES,
             f"num_images must be in [1, 1e6], got {self.num_images}"),
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


def plan_evaluation(suite: str | None, single: dict[str, Any], overrides: dict[str, Any]
                    ) -> tuple[list[RunSpec], EvalConfig, str]:
    """The rows, settings and title of `proreflow evaluate`: a suite's (`suite`), or one row described by the
    per-run flags in `single` (flag name -> value, None when not given); `overrides` are the shared settings."""
    given = [flag for flag, v in single.items() if v is not None]
    if suite is not None:
        if given:  # they describe one run; a suite's runs are in its YAML
            raise ProReflowError(f"{', '.join(given)} describe a single --model run and cannot be combined with "
                                 f"--suite; edit the suite's runs instead")
        return load_suite(suite, overrides)
    model = single.get("--model")
    if model is None:
        raise ProReflowError("give --model (a diffusers pipeline) or --suite (a suite YAML)")
    guidance = single.get("--guidance")
    try:
        scales = [float(g) for g in (guidance or "4.0").split(",") if g.strip()]
        if not all(math.isfinite(g) and g >= 0 for g in scales):
            raise ValueError
    except ValueError:
        raise ProReflowError(f"--guidance takes comma-separated finite numbers >= 0, got {guidance!r}") from None
    spacing = single.get("--timestep-spacing")
    run = RunSpec(name=single.get("--name") or model.rstrip("/").split("/")[-1], model=model,
                  steps=4 if single.get("--steps") is None else single["--steps"], guidance=scales,
                  scheduler=single.get("--scheduler"), lora=single.get("--lora"), variant=single.get("--variant"),
                  timestep_spacing={"own": None, None: "trailing"}.get(spacing, spacing),
                  pipeline=single.get("--pipeline"), unet_delta=single.get("--unet-delta"),
                  delta_variant=single.get("--delta-variant"), unet_weights=single.get("--unet-weights"),
                  scheduler_overrides=parse_settings(single.get("--scheduler-setting")))
    cfg = from_dict(EvalConfig, {k: v for k, v in overrides.items() if v is not None}, where="evaluate")
    return [run], cfg, ""


def parse_settings(pairs: list[str] | None) -> dict[str, Any] | None:
    """KEY=VALUE strings -> a dict, values read as YAML scalars (numbers, booleans, strings)."""
    import yaml

    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ProReflowError(f"--scheduler-setting takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out

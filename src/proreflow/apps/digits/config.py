"""The digits preset (configs/digits.yaml) as typed settings, checked in full when it is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proreflow.config import PRESET_DIR, load_preset
from proreflow.errors import ProReflowError
from proreflow.limits import (MAX_COUNT, MAX_HELD_SAMPLES, MAX_LAYERS_PER_BLOCK, MAX_SEED, MAX_TOY_STEPS,
                              MAX_UNET_WIDTH)
from proreflow.methods import MethodSpec
from proreflow.models.unet import UNetConfig
from proreflow.training import RecipeSettings

TEACHER_KINDS = ("vp", "flow")


#: paper table 4 row label of each ablation method of the preset
ABLATION_LABELS = {"perflow": "w/o both (PeRFlow)", "proreflow-no-aligned": "w/o aligned",
                   "proreflow-no-progressive": "w/o progressive", "proreflow": "full",
                   "perflow-uniform": "w/o both, uniform t (old rule)", "proreflow-uniform": "full, uniform t (old rule)"}


@dataclass(frozen=True)
class DataConfig:
    size: int = 16
    test_fraction: float = 1 / 6
    split_seed: int = 0

    def __post_init__(self) -> None:
        if not (8 <= self.size <= 64 and self.size % 4 == 0) or not 0 < self.test_fraction < 1:
            raise ProReflowError(f"data needs size a multiple of 4 in [8, 64] and test_fraction in (0, 1), got "
                                 f"size={self.size}, test_fraction={self.test_fraction}")


@dataclass(frozen=True)
class VPConfig:
    """The VP teacher's DDPM noise schedule (a diffusers DDPMScheduler config)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")  # DDPMScheduler's
        if self.beta_schedule not in schedules:
            raise ProReflowError(f"vp.beta_schedule must be one of {list(schedules)}, got {self.beta_schedule!r}")
        if self.num_train_timesteps < 2:
            raise ProReflowError(f"vp.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ProReflowError(f"vp needs 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")


@dataclass(frozen=True)
class TeacherConfig:
    kinds: list[str] = field(default_factory=lambda: list(TEACHER_KINDS))
    steps: int = 1500
    lr: float = 1e-3
    batch_size: int = 128
    ema_decay: float = 0.999
    seed: int = 0
    distill: str = "vp"  # the teacher the students are distilled from

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.batch_size >= 1 and 0 <= self.ema_decay < 1 and self.steps >= 1):
            raise ProReflowError(f"teacher needs steps >= 1, lr > 0, batch_size >= 1 and ema_decay in [0, 1), got "
                                 f"steps={self.steps}, lr={self.lr}, batch_size={self.batch_size}, "
                                 f"ema_decay={self.ema_decay}")


@dataclass(frozen=True)
class DigitsEvalConfig:
    samples: int = 1000
    reference_steps: int = 32  # the teacher's Euler (= DDIM) steps for the reference outputs
    guidance: float = 1.0  # CFG scale of the scored samples (students are trained at scale 1)
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.reference_steps < 1 or self.guidance < 0:
            raise ProReflowError(f"eval needs reference_steps >= 1 and guidance >= 0, got {self.reference_steps}, "
                                 f"{self.guidance}")


@dataclass(frozen=True)
class SweepConfig:
    scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    method: str = "proreflow"
    samples: int = 500

    def __post_init__(self) -> None:
        if not self.scales or any(g < 0 for g in self.scales):
            raise ProReflowError(f"sweep.scales must be guidance scales >= 0, got {self.scales}")


@dataclass(frozen=True)
class AnalysisConfig:
    trajectories: int = 256
    steps: int = 16
    perturb_levels: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    perturb_steps: int = 8
    samples: int = 500

    def __post_init__(self) -> None:
        if min(self.trajectories, self.steps, self.perturb_steps) < 1 or any(v <= 0 for v in self.perturb_levels):
            raise ProReflowError("analysis needs trajectories, steps and perturb_steps >= 1 and perturb_levels > 0, "
                                 f"got {self.trajectories}, {self.steps}, {self.perturb_steps}, {self.perturb_levels}")


@dataclass(frozen=True)
class DigitsConfig(RecipeSettings):
    """The recipe settings (train, budget_steps, time_sampling, teacher_solver) and the benchmark's own."""

    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vp: VPConfig = field(default_factory=VPConfig)
    label_dropout: float = 0.1
    classifier_steps: int = 1000
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    budget_steps: int = 300
    pair_shard_size: int = 2048
    pairs: int | None = None  # teacher pairs cached per stage and seed (None: one per training sample)
    steps: list[int] = field(default_factory=lambda: [2, 4])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # every student trains at every seed
    table_steps: int = 4
    table_methods: list[str] = field(default_factory=lambda: list(ABLATION_LABELS))
    steps_methods: list[str] | None = None  # trained at every step count (None: all methods); others at table_steps
    baselines: list[str] = field(default_factory=lambda: ["euler", "heun", "ddim", "dpmsolver++", "unipc"])
    methods: list[MethodSpec] = field(default_factory=list)
    eval: DigitsEvalConfig = field(default_factory=DigitsEvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def __post_init__(self) -> None:
        names = [m.name for m in self.methods]
        checks = [
            (bool(self.methods), "the config lists no methods"),
            (len(set(names)) == len(names), f"method names must be unique, got {names}"),
            (all(k in TEACHER_KINDS for k in self.teacher.kinds) and self.teacher.kinds,
             f"teacher.kinds must be a non-empty subset of {list(TEACHER_KINDS)}, got {self.teacher.kinds}"),
            (self.teacher.distill in self.teacher.kinds,
             f"teacher.distill {self.teacher.distill!r} must be one of teacher.kinds {self.teacher.kinds}"),
            (0.0 <= self.label_dropout < 1.0, f"label_dropout must be in [0, 1), got {self.label_dropout}"),
            (bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), f"seeds must be unique, got {self.seeds}"),
            (bool(self.steps) and all(isinstance(k, int) and 1 <= k <= MAX_TOY_STEPS for k in self.steps),
             f"steps must be integers in [1, 64], got {self.steps}"),
            (self.table_steps in self.steps, f"table_steps {self.table_steps} must be one of steps {self.steps}"),
            (all(m in names for m in self.table_methods), f"table_methods {self.table_methods} must be methods of "
                                                           f"the preset {names}"),
            (self.steps_methods is None or all(m in names for m in self.steps_methods),
             f"steps_methods {self.steps_methods} must be methods of the preset {names}"),
            (self.sweep.method in names, f"sweep.method {self.sweep.method!r} is not a method of the preset"),
            (all(b in ("euler", "heun", "ddim", "dpmsolver++", "unipc") for b in self.baselines),
             f"baselines must be among euler, heun, ddim, dpmsolver++, unipc; got {self.baselines}"),
            (self.budget_steps >= 1 and self.teacher.steps >= 1, "budget_steps and teacher.steps must be >= 1"),
            (self.pairs is None or self.pairs >= self.train.batch_size,
             f"pairs must be at least one batch ({self.train.batch_size}) or null, got {self.pairs}"),
            (self.eval.samples >= 20 and self.sweep.samples >= 20 and self.analysis.samples >= 20,
             "eval/sweep/analysis samples must be >= 20 (FD needs a covariance)"),
            (max(self.eval.samples, self.sweep.samples, self.analysis.samples) <= MAX_HELD_SAMPLES,
             "eval/sweep/analysis samples must be <= 100000 (they are held in memory)"),
            (1 <= self.classifier_steps <= MAX_COUNT, f"classifier_steps must be in [1, 1e7], got {self.classifier_steps}"),
            (1 <= self.pair_shard_size <= MAX_COUNT, f"pair_shard_size must be in [1, 1e7], got {self.pair_shard_size}"),
            (all(0 <= s <= MAX_SEED for s in self.seeds), f"seeds must be in [0, 2**31 - 1], got {self.seeds}"),
            # checked here, not when the UNet is built: that came after the teacher cache was written (issue 26)
            (self.data.size % 2 ** (len(self.unet.block_out_channels) - 1) == 0,
             f"data.size {self.data.size} is not divisible by 2^{len(self.unet.block_out_channels) - 1} for "
             f"{len(self.unet.block_out_channels)} UNet blocks (unet.block_out_channels)"),
            (max(self.unet.block_out_channels) <= MAX_UNET_WIDTH
             and self.unet.layers_per_block <= MAX_LAYERS_PER_BLOCK,
             f"unet widths must be <= {MAX_UNET_WIDTH} and layers_per_block <= {MAX_LAYERS_PER_BLOCK}, got "
             f"{tuple(self.unet.block_out_channels)} and {self.unet.layers_per_block}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ProReflowError(msg)
        for m in self.methods:  # every plan resolves before anything is trained or written
            if not m.train:
                continue
            runs = [k for k in self.steps if samples_at(m, k)]
            if not runs:
                raise ProReflowError(f"method {m.name!r} has {m.window_counts(self.steps[0])[-1]} final windows, "
                                     f"which divide none of steps {self.steps}")
            for k in runs:
                self.recipe(m).plan(k)
            if m.name in self.table_methods and self.table_steps not in runs:
                raise ProReflowError(f"table method {m.name!r} cannot sample at table_steps {self.table_steps}")


def load_digits_config(path: str | Path | None = None, **overrides: Any) -> DigitsConfig:
    """A preset name (digits, digits-smoke) or YAML path; a user YAML may change only some keys of the
    packaged `digits` preset."""
    return load_preset(DigitsConfig, PRESET_DIR / "digits.yaml", path, overrides, where="digits config")


def samples_at(m: MethodSpec, k: int) -> bool:
    """Whether method m makes a k-step student: its final windows must divide k (a 2-window student
    samples at 2 or 4 steps, not at 1); methods whose windows follow k ("k", "8->k") run at every k."""
    return k % m.window_counts(k)[-1] == 0

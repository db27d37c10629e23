"""The toy preset (configs/toy.yaml) as typed settings: teacher, data sizes, network, shared init, recipe, evaluation."""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from proreflow.config import PRESET_DIR, load_preset
from proreflow.errors import ProReflowError
from proreflow.limits import MAX_COUNT
from proreflow.methods import MethodSpec
from proreflow.solvers import check_solver
from proreflow.training import RecipeSettings

DEFAULT_CONFIG = PRESET_DIR / "toy.yaml"


@dataclass(frozen=True)
class GMMConfig:
    n_modes: int = 8
    radius: float = 3.0
    std: float = 0.3

    def __post_init__(self) -> None:
        if self.n_modes < 1 or not (math.isfinite(self.radius) and self.radius >= 0) or not (self.std > 0 and math.isfinite(self.std)):
            raise ProReflowError(f"gmm needs n_modes >= 1, a finite radius >= 0 and a finite std > 0, got "
                                 f"n_modes={self.n_modes}, radius={self.radius}, std={self.std}")


@dataclass(frozen=True)
class ModelConfig:
    hidden: int = 256
    depth: int = 4

    def __post_init__(self) -> None:
        if not (1 <= self.hidden <= 65536 and 1 <= self.depth <= 64):  # bounded: a huge width fails in allocation
            raise ProReflowError(f"model needs hidden in [1, 65536] and depth in [1, 64], got hidden={self.hidden}, "
                                 f"depth={self.depth}")


@dataclass(frozen=True)
class BaseConfig:
    """Flow matching (1-rectified flow) that gives the shared starting network / learned teacher."""

    steps: int = 2000
    lr: float = 2e-3

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ProReflowError(f"base.steps (--base-steps) must be >= 1, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ProReflowError(f"base.lr must be a positive number, got {self.lr}")


@dataclass(frozen=True)
class ToyEvalConfig:
    samples: int = 2000
    reference_solver: str = "rk4"
    reference_steps: int = 64
    straightness_substeps: int = 16

    def __post_init__(self) -> None:
        try:
            check_solver(self.reference_solver, self.reference_steps)
        except ProReflowError as exc:
            raise ProReflowError(f"eval.reference_solver/reference_steps: {exc}") from None
        if self.straightness_substeps < 1:
            raise ProReflowError(f"eval.straightness_substeps must be >= 1, got {self.straightness_substeps}")


@dataclass(frozen=True)
class ToyConfig(RecipeSettings):
    """The recipe settings (train, budget_steps, time_sampling, teacher_solver) and the toy's own."""

    gmm: GMMConfig = field(default_factory=GMMConfig)
    train_points: int = 20000
    test_points: int = 2000
    model: ModelConfig = field(default_factory=ModelConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    eval: ToyEvalConfig = field(default_factory=ToyEvalConfig)
    methods: list[MethodSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ProReflowError("the config lists no methods")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ProReflowError(f"method names must be unique, got {names}")
        for what, v in (("train_points", self.train_points), ("test_points", self.test_points),
                        ("budget_steps", self.budget_steps), ("eval.samples", self.eval.samples)):
            if not 2 <= v <= MAX_COUNT:  # points and samples are held in memory, steps are run
                raise ProReflowError(f"{what} must be in [2, 1e7], got {v}")


def load_config(path: str | Path | None = None, **overrides: Any) -> ToyConfig:
    """The packaged preset, with a user YAML (only the keys it changes) and CLI overrides on top."""
    return load_preset(ToyConfig, DEFAULT_CONFIG, path, overrides, where="toy config")


def with_run_settings(cfg: ToyConfig, seed: int, progress: bool) -> ToyConfig:
    return replace(cfg, train=replace(cfg.train, seed=seed, progress=progress))


def validate_plans(cfg: ToyConfig, steps: list[int]) -> None:
    """Resolve every method's plan for every step count before any training starts."""
    for k in steps:
        for m in cfg.methods:
            if m.train:
                cfg.recipe(m).plan(k)


def find_method(cfg: ToyConfig, name: str) -> MethodSpec:
    names = [m.name for m in cfg.methods]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ProReflowError(f"unknown method {name!r}{hint} (the config has {names})")
    return next(m for m in cfg.methods if m.name == name)


def config_to_dict(cfg: ToyConfig) -> dict:
    return json.loads(json.dumps(asdict(replace(cfg, train=replace(cfg.train, progress=True))), default=str))

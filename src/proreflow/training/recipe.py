"""A method's whole recipe in one object: what `train_plan` needs to know besides the networks and the data.

`MethodSpec` (windows per stage, λ, its own time sampling and pair source) says what differs between
methods; `RecipeSettings` holds what an application's preset shares between its methods (optimizer, budget,
default time sampling, teacher solver). Application configs inherit `RecipeSettings`, so their YAML keeps
flat keys, and `cfg.recipe(method)` joins the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proreflow.errors import ProReflowError
from proreflow.losses import LossFn, aligned
from proreflow.methods import MethodSpec
from proreflow.pairs import TeacherSolver
from proreflow.time_sampling import TimeSampling
from proreflow.training.config import TrainConfig
from proreflow.windows import BoundaryMap, ProgressivePlan


@dataclass(frozen=True)
class Recipe:
    """Everything that decides what a student learns for a given teacher and data."""

    method: MethodSpec
    budget_steps: int  # optimizer steps over all stages
    time_sampling: TimeSampling = field(default_factory=TimeSampling)  # unless the method names its own
    teacher_solver: TeacherSolver = field(default_factory=TeacherSolver)
    train: TrainConfig = field(default_factory=TrainConfig)
    placement: BoundaryMap | None = None  # where the windows go (None: uniform in flow time)

    def __post_init__(self) -> None:
        if isinstance(self.budget_steps, bool) or not isinstance(self.budget_steps, int) or self.budget_steps < 1:
            raise ProReflowError(f"budget_steps must be a positive integer, got {self.budget_steps!r}")

    def plan(self, k: int) -> ProgressivePlan:
        """The stages that make a k-step student."""
        plan = self.method.plan(k, self.budget_steps)
        return plan.mapped(self.placement) if self.placement is not None else plan

    @property
    def sampling(self) -> TimeSampling:
        """Where this method's training points sit on each chord."""
        return self.method.sampling(self.time_sampling)

    @property
    def loss(self) -> LossFn:
        return aligned(self.method.lam, weighted=self.method.loss_weighting == "output")

    def key(self, k: int) -> tuple:
        """Equal keys, equal training (students are cached by it)."""
        return self.method.plan_key(k, self.time_sampling)

    def describe(self, k: int) -> dict[str, Any]:
        """The recipe's columns of a results row."""
        out = {"windows": self.method.window_counts(k), "lam": self.method.lam,
               "time_sampling": self.sampling.label(), "pair_source": self.method.pair_source}
        return out if self.method.loss_weighting == "velocity" else {**out, "loss_weighting": self.method.loss_weighting}


@dataclass(frozen=True)
class RecipeSettings:
    """The recipe settings an application preset shares between its methods (inherited by app configs)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    budget_steps: int = 1500
    time_sampling: TimeSampling = field(default_factory=TimeSampling)  # methods may name their own
    teacher_solver: TeacherSolver = field(default_factory=TeacherSolver)

    def recipe(self, method: MethodSpec) -> Recipe:
        return Recipe(method, self.budget_steps, self.time_sampling, self.teacher_solver, self.train)

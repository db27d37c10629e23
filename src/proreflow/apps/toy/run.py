"""The toy comparison behind `proreflow demo`: every method at equal budget on a 2-D teacher.

Default teacher: an exact Gaussian mixture (closed-form velocity). With a dataset (built-in
name or a user .npy), the teacher is an MLP trained here by flow matching on that data.
All methods start from one shared network (docs/design.md §2), get the same optimizer steps, batch
size and teacher evaluations per pair, and are sampled and scored by the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from proreflow.apps.toy.config import ToyConfig, validate_plans, with_run_settings
from proreflow.apps.toy.report import write_results
from proreflow.data.toy import MIN_POINTS, PointData, builtin_points, load_points, split_points
from proreflow.errors import ProReflowError
from proreflow.fields.gmm import ExactTeacher, GaussianMixture
from proreflow.fields.network import NetworkTeacher
from proreflow.limits import MAX_TOY_STEPS as MAX_STEPS
from proreflow.methods import MethodSpec
from proreflow.metrics import energy_distance, fidelity_rmse, sliced_wasserstein, straightness
from proreflow.models.mlp import VelocityMLP
from proreflow.run_lock import run_lock
from proreflow.sampling import sample
from proreflow.solvers import VelocityField
from proreflow.training import PlanResult, check_optimizer, fit, flow_matching_batches, train_plan
from proreflow.training.checkpoint import CheckpointConfig
from proreflow.windows import WindowSchedule


def parse_steps(text: str) -> list[int]:
    """'2,4' -> [2, 4]; each a positive integer <= MAX_STEPS, no duplicates."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p.isdigit() for p in parts):
        raise ProReflowError(f"--steps must be a comma-separated list of positive integers, got {text!r}")
    steps = [int(p) for p in parts]
    if any(s < 1 or s > MAX_STEPS for s in steps):
        raise ProReflowError(f"--steps values must be between 1 and {MAX_STEPS}, got {steps}")
    if len(set(steps)) != len(steps):
        raise ProReflowError(f"--steps has duplicates: {steps}")
    return steps


@dataclass
class Setup:
    """Data, teacher and the shared starting network of one demo run."""

    data: PointData
    teacher: VelocityField
    base: torch.nn.Module
    teacher_name: str


def validate_source(dataset: str | None, data_file: str | None, allow_outliers: bool = False) -> None:
    """Fail on a bad data source before anything is trained or written."""
    if dataset and data_file:
        raise ProReflowError("give either --dataset or --data, not both")
    if data_file:  # read and standardise once, so every data error comes before a run folder exists
        split_points(Path(data_file).name, load_points(data_file, allow_outliers), 0)
    elif dataset not in (None, "gmm"):
        builtin_points(dataset, MIN_POINTS, 0)


def prepare(cfg: ToyConfig, dataset: str | None, data_file: str | None, seed: int,
            checkpoints: CheckpointConfig | None = None, allow_outliers: bool = False) -> Setup:
    """Build the data split, the teacher and the shared initial network (1-rectified flow)."""
    validate_source(dataset, data_file, allow_outliers)
    torch.manual_seed(seed)
    base_cfg = replace(cfg.train, lr=cfg.base.lr, seed=seed)
    if dataset in (None, "gmm") and not data_file:
        gmm = GaussianMixture.ring(cfg.gmm.n_modes, cfg.gmm.radius, cfg.gmm.std)
        gen = torch.Generator().manual_seed(seed)
        pts = gmm.sample(cfg.train_points + cfg.test_points, gen).float()
        data = PointData("gmm", pts[cfg.test_points:], pts[: cfg.test_points], torch.zeros(2), 1.0)
        teacher: VelocityField = ExactTeacher(gmm)
        exact, name = teacher, f"exact GMM ({cfg.gmm.n_modes} modes)"
    else:
        pts = load_points(data_file, allow_outliers) if data_file else builtin_points(dataset, cfg.train_points + cfg.test_points, seed)
        data = split_points(Path(data_file).name if data_file else dataset, pts, seed,
                            test_fraction=cfg.test_points / (cfg.train_points + cfg.test_points))
        exact, name = None, f"flow-matching MLP on {data.name}"
    net = VelocityMLP(data.dim, cfg.model.hidden, cfg.model.depth)
    res = fit(net, flow_matching_batches(points_data_fn(data.train), cfg.train.batch_size, exact), cfg.base.steps,
              base_cfg, desc="1-rectified flow (shared init)",
              checkpoints=checkpoints.for_fit("base") if checkpoints else None)
    base = res.model
    if exact is None:
        teacher = NetworkTeacher(base)
    return Setup(data, teacher, base, name)


def points_data_fn(train: Tensor) -> Callable[[int, torch.Generator], tuple[Tensor, None]]:
    """A `DataFn` drawing training points uniformly with replacement (the pairs' real data)."""

    def draw(n: int, gen: torch.Generator) -> tuple[Tensor, None]:
        return train[torch.randint(0, train.shape[0], (n,), generator=gen)], None

    return draw


def _as_field(model: torch.nn.Module) -> VelocityField:
    model.eval()
    return lambda x, t, cond=None: model(x, t, cond)


class Comparison:
    """Trains and scores methods on one setup with shared evaluation noise and teacher reference.

    Students are cached by their training plan, so methods or step counts that resolve to the
    same training (2-rectified flow at 2 and 4 steps) are trained once.
    """

    def __init__(self, cfg: ToyConfig, setup: Setup, seed: int) -> None:
        self.cfg, self.setup, self.seed = cfg, setup, seed
        gen = torch.Generator().manual_seed(seed + 12345)
        self.noise = torch.randn(cfg.eval.samples, setup.data.dim, generator=gen)
        self.reference = sample(setup.teacher, self.noise, WindowSchedule.uniform(1), cfg.eval.reference_steps,
                                method=cfg.eval.reference_solver)
        self._trained: dict[tuple, tuple[torch.nn.Module, Any, float]] = {}

    def field_for(self, m: MethodSpec, k: int) -> tuple[VelocityField, WindowSchedule, dict]:
        """The velocity field a method samples with at k steps, its windows, and its training cost."""
        if not m.train:
            return self.setup.teacher, WindowSchedule.uniform(k), {"teacher_nfe_per_pair": 0.0,
                                                                    "student_nfe_per_pair": 0.0, "optimizer_steps": 0,
                                                                    "train_seconds": 0.0}
        recipe = self.cfg.recipe(m)
        if recipe.key(k) not in self._trained:
            started = time.perf_counter()
            res = train_plan(self.setup.base, self.setup.teacher, points_data_fn(self.setup.data.train), recipe, k)
            self._trained[recipe.key(k)] = (res.student, res, time.perf_counter() - started)
        student, res, seconds = self._trained[recipe.key(k)]
        cost = {"teacher_nfe_per_pair": res.nfe_per_pair, "student_nfe_per_pair": res.student_nfe_per_pair,
                "optimizer_steps": res.optimizer_steps, "train_seconds": round(seconds, 2)}
        return _as_field(student), recipe.plan(k).final, cost

    def add_trained(self, m: MethodSpec, k: int, res: PlanResult, seconds: float) -> None:
        """Score a student trained elsewhere (e.g. a checkpointed `proreflow train` run)."""
        self._trained[self.cfg.recipe(m).key(k)] = (res.student, res, seconds)

    def score(self, m: MethodSpec, k: int) -> tuple[dict, Tensor, tuple]:
        """One results row for method m at k steps, its samples, and (field, schedule, steps per window)."""
        field_, sched, cost = self.field_for(m, k)
        per_window = sched.steps_per_window(k)
        x = sample(field_, self.noise, sched, per_window)
        row = {
            "method": m.name,
            "steps": k,
            "fidelity_rmse": fidelity_rmse(x, self.reference),
            "distance_swd": sliced_wasserstein(x, self.setup.data.test, seed=self.seed),
            "distance_energy": energy_distance(x, self.setup.data.test),
            "straightness": straightness(field_, self.noise, WindowSchedule.uniform(k), self.cfg.eval.straightness_substeps),
            **cost,
            **(self.cfg.recipe(m).describe(k) if m.train else dict.fromkeys(("windows", "lam", "time_sampling",
                                                                              "pair_source"))),
            "seed": self.seed,
        }
        return row, x, (field_, sched, per_window)


def run_demo(cfg: ToyConfig, steps: list[int], out: Path, seed: int = 0, dataset: str | None = None,
             data_file: str | None = None, progress: bool = True, allow_outliers: bool = False,
             overwrite: bool = False) -> list[dict]:
    """Train and score every method for every step count; write results.json/.md and plots to `out`. A folder that
    holds a demo's results is refused unless `overwrite` (a second demo used to replace them without a word)."""
    cfg = with_run_settings(cfg, seed, progress)
    validate_plans(cfg, steps)
    validate_source(dataset, data_file, allow_outliers)  # input errors first, then the folder
    check_optimizer(cfg.train)
    if (Path(out) / "results.json").exists() and not overwrite:
        raise ProReflowError(f"{str(out)!r} already holds a demo's results (results.json); pass --overwrite to "
                             f"replace them or choose another --out")
    setup = prepare(cfg, dataset, data_file, seed, allow_outliers=allow_outliers)
    with run_lock(out):  # one writer per folder (docs/reliability.md)
        cmp = Comparison(cfg, setup, seed)
        rows, outputs, fields = [], {}, {}
        jobs = [(k, m) for k in steps for m in cfg.methods]
        for k, m in tqdm(jobs, desc="methods", disable=not progress, dynamic_ncols=True):
            row, outputs[(m.name, k)], fields[(m.name, k)] = cmp.score(m, k)
            rows.append(row)
        write_results(rows, out, setup.teacher_name, cfg)
        from proreflow.plotting import plot_samples, plot_trajectories

        names = [m.name for m in cfg.methods]
        plot_samples(outputs, setup.data.test, steps, names, out / "samples.png")
        plot_trajectories(setup.teacher, fields, cmp.noise[:48], steps, names, out / "trajectories.png",
                          reference_steps=cfg.eval.reference_steps)
        return rows

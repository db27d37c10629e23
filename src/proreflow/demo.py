"""The toy comparison behind `proreflow demo`: every method at equal budget on a 2-D teacher.

Default teacher: an exact Gaussian mixture (closed-form velocity). With a dataset (built-in
name or a user .npy), the teacher is an MLP trained here by flow matching on that data.
All methods start from one shared network (docs/design.md §2), get the same optimizer steps, batch
size and teacher evaluations per pair, and are sampled and scored by the same code.
"""

from __future__ import annotations

import difflib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from proreflow.checkpoint import CheckpointConfig
from proreflow.store import atomic_save_tensors, atomic_write_text, read_json_object
from proreflow.config import from_dict, load_yaml, merge
from proreflow.data.toy import MIN_POINTS, PointData, builtin_points, load_points, split_points
from proreflow.errors import ProReflowError
from proreflow.methods import MethodSpec
from proreflow.metrics import energy_distance, fidelity_rmse, sliced_wasserstein, straightness
from proreflow.models.mlp import VelocityMLP
from proreflow.pairs import TeacherSolver
from proreflow.sampling import sample
from proreflow.solvers import VelocityField, check_solver
from proreflow.teachers.flow import NetworkTeacher
from proreflow.teachers.gmm import GaussianMixture
from proreflow.time_sampling import TimeSampling
from proreflow.training import PlanResult, TrainConfig, fit, flow_matching_batches, PairCacheConfig, process_state, stop_on_sigterm, train_plan
from proreflow.windows import WindowSchedule

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "toy.yaml"
MAX_STEPS = 64


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
        if self.hidden < 1 or self.depth < 1:
            raise ProReflowError(f"model needs hidden >= 1 and depth >= 1, got hidden={self.hidden}, depth={self.depth}")


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
class ToyConfig:
    gmm: GMMConfig = field(default_factory=GMMConfig)
    train_points: int = 20000
    test_points: int = 2000
    model: ModelConfig = field(default_factory=ModelConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    budget_steps: int = 1500
    time_sampling: TimeSampling = field(default_factory=TimeSampling)  # methods may name their own
    teacher_solver: TeacherSolver = field(default_factory=TeacherSolver)
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
            if v < 2:
                raise ProReflowError(f"{what} must be >= 2, got {v}")


def load_config(path: str | Path | None = None, **overrides: Any) -> ToyConfig:
    """The packaged preset, with a user YAML (only the keys it changes) and CLI overrides on top."""
    data = load_yaml(DEFAULT_CONFIG)
    if path is not None:
        data = merge(data, load_yaml(path))
    data = merge(data, {k: v for k, v in overrides.items() if v is not None})
    return from_dict(ToyConfig, data, where=str(path or "toy config"))


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
        teacher: VelocityField = lambda x, t, cond=None: gmm.velocity(x.double(), t.double()).to(x.dtype)
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
        self.solver = cfg.teacher_solver
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
        plan = m.plan(k, self.cfg.budget_steps)
        key = m.plan_key(k, self.cfg.time_sampling)
        if key not in self._trained:
            started = time.perf_counter()
            res = train_plan(self.setup.base, self.setup.teacher, points_data_fn(self.setup.data.train), plan, self.solver,
                             self.cfg.train, m.lam, desc=f"{m.name} k={k}",
                             sampling=m.sampling(self.cfg.time_sampling), pair_source=m.pair_source)
            self._trained[key] = (res.student, res, time.perf_counter() - started)
        student, res, seconds = self._trained[key]
        cost = {"teacher_nfe_per_pair": res.nfe_per_pair, "student_nfe_per_pair": res.student_nfe_per_pair,
                "optimizer_steps": res.optimizer_steps, "train_seconds": round(seconds, 2)}
        return _as_field(student), plan.final, cost

    def add_trained(self, m: MethodSpec, k: int, res: PlanResult, seconds: float) -> None:
        """Score a student trained elsewhere (e.g. a checkpointed `proreflow train` run)."""
        self._trained[m.plan_key(k, self.cfg.time_sampling)] = (res.student, res, seconds)

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
            "windows": m.window_counts(k) if m.train else None,
            "lam": m.lam if m.train else None,
            "time_sampling": m.sampling(self.cfg.time_sampling).label() if m.train else None,
            "pair_source": m.pair_source if m.train else None,
            "seed": self.seed,
        }
        return row, x, (field_, sched, per_window)


def with_run_settings(cfg: ToyConfig, seed: int, progress: bool) -> ToyConfig:
    return replace(cfg, train=replace(cfg.train, seed=seed, progress=progress))


def validate_plans(cfg: ToyConfig, steps: list[int]) -> None:
    """Resolve every method's plan for every step count before any training starts."""
    for k in steps:
        for m in cfg.methods:
            if m.train:
                m.plan(k, cfg.budget_steps)


def run_demo(cfg: ToyConfig, steps: list[int], out: Path, seed: int = 0, dataset: str | None = None,
             data_file: str | None = None, progress: bool = True, allow_outliers: bool = False) -> list[dict]:
    """Train and score every method for every step count; write results.json/.md and plots to `out`."""
    cfg = with_run_settings(cfg, seed, progress)
    validate_plans(cfg, steps)
    setup = prepare(cfg, dataset, data_file, seed, allow_outliers=allow_outliers)
    cmp = Comparison(cfg, setup, seed)
    rows, outputs, fields = [], {}, {}
    jobs = [(k, m) for k in steps for m in cfg.methods]
    for k, m in tqdm(jobs, desc="methods", disable=not progress, dynamic_ncols=True):
        row, outputs[(m.name, k)], fields[(m.name, k)] = cmp.score(m, k)
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    write_results(rows, out, setup.teacher_name, cfg)
    from proreflow.plotting import plot_samples, plot_trajectories

    names = [m.name for m in cfg.methods]
    plot_samples(outputs, setup.data.test, steps, names, out / "samples.png")
    plot_trajectories(setup.teacher, fields, cmp.noise[:48], steps, names, out / "trajectories.png",
                      reference_steps=cfg.eval.reference_steps)
    return rows


COLUMNS = ["method", "steps", "time_sampling", "fidelity_rmse", "distance_swd", "distance_energy", "straightness",
           "teacher_nfe_per_pair", "student_nfe_per_pair", "optimizer_steps", "seed"]


def results_markdown(rows: list[dict], teacher_name: str, cfg: ToyConfig) -> str:
    """The results as a markdown table, best fidelity per step count in bold."""
    lines = [
        f"Teacher: {teacher_name}. Budget per trained method: {cfg.budget_steps} optimizer steps x batch "
        f"{cfg.train.batch_size}; teacher pairs by {cfg.teacher_solver.method} x {cfg.teacher_solver.steps} "
        f"steps ({cfg.teacher_solver.mode}). Fidelity: RMSE to the teacher's {cfg.eval.reference_solver} x "
        f"{cfg.eval.reference_steps} ODE solution from the same {cfg.eval.samples} noises.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    best = {}
    for r in rows:
        if r["method"] != "teacher-euler":
            best[r["steps"]] = min(best.get(r["steps"], math.inf), r["fidelity_rmse"])
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r[c]
            text = f"{v:.4f}" if isinstance(v, float) else ("–" if v is None else str(v))
            if c == "fidelity_rmse" and v == best.get(r["steps"]):
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], out: Path, teacher_name: str, cfg: ToyConfig) -> None:
    """results.json (list of rows) and results.md (the same as a table), each written atomically."""
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_markdown(rows, teacher_name, cfg))


def find_method(cfg: ToyConfig, name: str) -> MethodSpec:
    names = [m.name for m in cfg.methods]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ProReflowError(f"unknown method {name!r}{hint} (the config has {names})")
    return next(m for m in cfg.methods if m.name == name)


def train_single(cfg: ToyConfig, method: str, k: int, out: Path, seed: int = 0, dataset: str | None = None,
                 data_file: str | None = None, every: int = 200, keep: int = 2, resume: bool = False,
                 progress: bool = True, cached_pairs: int = 0, allow_outliers: bool = False) -> dict:
    """Train one method's k-step student with checkpoints; save it and its scores to `out`.

    A killed run continues with resume=True (`--resume latest`) from its last checkpoint and
    ends with bitwise the same weights as an uninterrupted run.
    """
    spec = find_method(cfg, method)
    if not spec.train:
        raise ProReflowError(f"method {method!r} is the teacher itself; there is nothing to train")
    plan = spec.plan(k, cfg.budget_steps)
    validate_source(dataset, data_file, allow_outliers)
    ckpt = CheckpointConfig(out / "checkpoints", every, keep, resume)
    run_args = {"method": method, "steps": k, "seed": seed, "dataset": dataset, "cached_pairs": cached_pairs,
                "data": str(Path(data_file).resolve()) if data_file else None, "config": config_to_dict(cfg),
                "allow_outliers": allow_outliers}
    if resume:
        if not (out / "run.json").is_file():
            raise ProReflowError(f"--resume latest: {str(out)!r} holds no run to resume (no run.json)")
        previous = read_json_object(out / "run.json", "the run's settings",
                                    "it cannot be resumed; start a new run with another --out")
        if previous != run_args:
            changed = sorted(key for key in run_args if previous.get(key) != run_args[key])
            raise ProReflowError(f"--resume latest: the run in {str(out)!r} was started with different "
                                 f"settings ({', '.join(changed)}); resume with the same ones")
    elif ckpt.dir.exists() or (out / "student.safetensors").exists():
        raise ProReflowError(f"{str(out)!r} already holds a run; pass --resume latest to continue it "
                             f"or choose another --out")
    elif process_state().is_main_process:
        atomic_write_text(out / "run.json", json.dumps(run_args, indent=2) + "\n")
    cfg = with_run_settings(cfg, seed, progress)
    with stop_on_sigterm():
        setup = prepare(cfg, dataset, data_file, seed, ckpt, allow_outliers)
        started = time.perf_counter()
        res = train_plan(setup.base, setup.teacher, points_data_fn(setup.data.train), plan, cfg.teacher_solver, cfg.train,
                         spec.lam, desc=f"{spec.name} k={k}", sampling=spec.sampling(cfg.time_sampling),
                         pair_source=spec.pair_source, checkpoints=ckpt,
                         pair_cache=PairCacheConfig(out / "pairs", cached_pairs) if cached_pairs else None)
    cmp = Comparison(cfg, setup, seed)
    cmp.add_trained(spec, k, res, time.perf_counter() - started)
    row, _, _ = cmp.score(spec, k)
    state = process_state()
    if state.is_main_process:  # every process holds the same student; one writes it
        atomic_save_tensors(res.student.state_dict(), out / "student.safetensors",
                            metadata={"method": spec.name, "steps": str(k), "windows": json.dumps(plan.final.boundaries),
                                      "time_sampling": spec.sampling(cfg.time_sampling).label(),
                                      "pair_source": spec.pair_source})
        atomic_write_text(out / "metrics.json", json.dumps(row, indent=2) + "\n")
    state.wait_for_everyone()
    return row


def config_to_dict(cfg: ToyConfig) -> dict:
    return json.loads(json.dumps(asdict(replace(cfg, train=replace(cfg.train, progress=True))), default=str))

"""The digits benchmark behind `proreflow run configs/digits.yaml` (issue: real images on CPU).

A class-conditional UNet2DModel teacher is trained here on scikit-learn's digits, as an
eps-prediction VP model (like SD) and as a velocity (flow) model; students are distilled from one
of them by every method of the preset at equal budget, over several seeds; everything is scored by
the Fréchet distance (FD) on a digits classifier's features (torchmetrics' FID with a custom
feature module), class accuracy of conditional samples and teacher fidelity. The same run writes
the ODE-solver baselines, the ablation table (paper table 4), a CFG sweep (fig. 3) and the
velocity analyses (figs. 1a, 1b).

Every expensive artefact (classifier, teachers, pair caches, students) is cached under
`<out>/cache` keyed by a hash of the settings it depends on, and trained with checkpoints, so a
killed run resumes and a rerun with a changed setting retrains only what that setting touches.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from proreflow.checkpoint import CheckpointConfig, load_tensors
from proreflow.store import atomic_save_tensors, atomic_write_text, json_key
from proreflow.config import PRESET_DIR, from_dict, load_yaml, merge, resolve_preset
from proreflow.data.digits import NUM_CLASSES, DigitsData, class_cond, label_dropout, load_digits_images
from proreflow.errors import ProReflowError
from proreflow.methods import MethodSpec
from proreflow.metrics import FrechetDistance, fidelity_rmse
from proreflow.models.classifier import DigitsClassifier, FeatureExtractor, accuracy, train_classifier
from proreflow.models.unet import UNetConfig, class_unet
from proreflow.pairs import TeacherSolver
from proreflow.sampling import sample
from proreflow.teachers.flow import FlowVelocity, NetworkTeacher
from proreflow.teachers.vp import VPSchedule, VPVelocity
from proreflow.time_sampling import TimeSampling
from proreflow.training import (PairCacheConfig, PlanResult, TrainConfig, check_stop, fit, flow_matching_batches,
                                train_plan)
from proreflow.windows import WindowSchedule

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
class DigitsConfig:
    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vp: VPConfig = field(default_factory=VPConfig)
    label_dropout: float = 0.1
    classifier_steps: int = 1000
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    budget_steps: int = 300
    time_sampling: TimeSampling = field(default_factory=TimeSampling)  # methods may name their own
    teacher_solver: TeacherSolver = field(default_factory=TeacherSolver)
    pair_shard_size: int = 2048
    steps: list[int] = field(default_factory=lambda: [2, 4])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
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
            (bool(self.steps) and all(isinstance(k, int) and 1 <= k <= 64 for k in self.steps),
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
            (self.eval.samples >= 20 and self.sweep.samples >= 20 and self.analysis.samples >= 20,
             "eval/sweep/analysis samples must be >= 20 (FD needs a covariance)"),
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
                m.plan(k, self.budget_steps)
            if m.name in self.table_methods and self.table_steps not in runs:
                raise ProReflowError(f"table method {m.name!r} cannot sample at table_steps {self.table_steps}")


def load_digits_config(path: str | Path | None = None, **overrides: Any) -> DigitsConfig:
    """A preset name (digits, digits-smoke) or YAML path; a user YAML may change only some keys of the
    packaged `digits` preset."""
    base = load_yaml(PRESET_DIR / "digits.yaml")
    if path is not None:
        base = merge(base, load_yaml(resolve_preset(path)))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(DigitsConfig, base, where=str(path or "digits config"))


class _Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled, self.start = enabled, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[digits {time.perf_counter() - self.start:6.0f}s] {msg}", file=sys.stderr, flush=True)


class DigitsBench:
    """Data, classifier, teachers and shared evaluation inputs of one benchmark run (all cached)."""

    def __init__(self, cfg: DigitsConfig, out: Path, progress: bool = True) -> None:
        self.cfg, self.out, self.progress = cfg, out, progress
        self.cache = out / "cache"
        self.log = _Log(progress)
        d = cfg.data
        self.data: DigitsData = load_digits_images(d.size, d.test_fraction, d.split_seed)
        self.classifier = self._classifier()
        self.classifier_accuracy = accuracy(self.classifier, self.data.test_x, self.data.test_y)
        # the reference is held-out data (docs/design.md §4): FD to the training split would reward memorising it
        self.fd = FrechetDistance(FeatureExtractor(self.classifier), self.data.test_x)
        from diffusers import DDPMScheduler

        ddpm = DDPMScheduler(**asdict(cfg.vp))
        self.ddpm_config = dict(ddpm.config)
        self.vp_schedule = VPSchedule.from_scheduler(ddpm)
        self.teachers: dict[str, torch.nn.Module] = {}
        self.teacher_seconds: dict[str, float] = {}
        for kind in cfg.teacher.kinds:
            self.teachers[kind] = self._teacher(kind)
        n = cfg.eval.samples
        gen = torch.Generator().manual_seed(cfg.eval.seed)
        self.noise = torch.randn(n, 1, d.size, d.size, generator=gen)
        self.labels = torch.arange(n) % NUM_CLASSES
        self._references: dict[tuple[str, float], Tensor] = {}

    # -- cached components ---------------------------------------------------------------------
    def _classifier(self) -> DigitsClassifier:
        path = self.cache / f"classifier-{json_key(asdict(self.cfg.data), self.cfg.classifier_steps)}.safetensors"
        net = DigitsClassifier(NUM_CLASSES)
        if path.is_file():
            net.load_state_dict(load_tensors(path))
            return net.eval()
        self.log("training the digits classifier (FD features)")
        net = train_classifier(self.data.train_x, self.data.train_y, steps=self.cfg.classifier_steps, seed=0,
                               progress=self.progress)
        atomic_save_tensors(net.state_dict(), path)
        return net

    def wrap(self, kind: str, unet: torch.nn.Module) -> torch.nn.Module:
        """The velocity-field view of a digits UNet: VP (eps-prediction) or flow (velocity)."""
        if kind == "vp":
            return VPVelocity(unet, self.vp_schedule, "epsilon")
        return FlowVelocity(unet, time_scale=float(self.cfg.vp.num_train_timesteps))

    def teacher_key(self, kind: str) -> str:
        """Hash of what the teacher's weights depend on (not which teachers a run lists or distills)."""
        c = self.cfg
        training = {k: v for k, v in asdict(c.teacher).items() if k not in ("kinds", "distill")}
        schedule = asdict(c.vp) if kind == "vp" else None  # the flow teacher has no noise schedule
        return json_key(kind, asdict(c.data), asdict(c.unet), schedule, c.label_dropout, training)

    def _teacher(self, kind: str) -> torch.nn.Module:
        c = self.cfg
        tc = c.teacher
        torch.manual_seed(tc.seed)
        init = self.wrap(kind, class_unet(c.unet, c.data.size, NUM_CLASSES))
        train = TrainConfig(lr=tc.lr, batch_size=tc.batch_size, ema_decay=tc.ema_decay, grad_clip=1.0, seed=tc.seed,
                            progress=self.progress)
        ckpt = CheckpointConfig(self.cache / f"teacher-{kind}-{self.teacher_key(kind)}", every=250, resume=True)
        fits = ckpt.for_fit("fit")
        cached = fits.final_path.is_file()
        self.log(f"{kind} teacher: " + ("from the cache" if cached else f"{tc.steps} flow-matching steps"))
        started = time.perf_counter()
        res = fit(init, flow_matching_batches(self.data_fn(), tc.batch_size), tc.steps, train,
                  desc=f"{kind} teacher", checkpoints=fits)
        if not cached:
            self.teacher_seconds[kind] = time.perf_counter() - started
        return res.model.eval().requires_grad_(False)

    def data_fn(self) -> Callable[[int, torch.Generator], tuple[Tensor, Any]]:
        """Training images with labels dropped to the null class at `label_dropout` (for CFG)."""
        x, y, p = self.data.train_x, self.data.train_y, self.cfg.label_dropout

        def draw(n: int, gen: torch.Generator) -> tuple[Tensor, Any]:
            idx = torch.randint(0, x.shape[0], (n,), generator=gen)
            return x[idx], class_cond(label_dropout(y[idx], p, gen))

        return draw

    # -- sampling and scoring ------------------------------------------------------------------
    def cond(self, n: int | None = None) -> dict:
        return class_cond(self.labels[: n or self.labels.shape[0]])

    @torch.no_grad()
    def batched(self, sampler: Callable[[Tensor, dict], Tensor], n: int | None = None, batch: int = 128) -> Tensor:
        """`sampler(noise, cond)` over the shared evaluation noise and cycling labels 0..9, in batches of
        `batch` (CPU UNets are fastest per sample near 128)."""
        noise, labels = self.noise[: n or self.noise.shape[0]], self.labels[: n or self.labels.shape[0]]
        return torch.cat([sampler(noise[i:i + batch], class_cond(labels[i:i + batch]))
                          for i in range(0, noise.shape[0], batch)])

    def generate(self, net: torch.nn.Module, schedule: WindowSchedule, per_window: int = 1, method: str = "euler",
                 guidance: float = 1.0, n: int | None = None) -> Tensor:
        """Class-conditional samples of a velocity network with our windowed sampler."""
        old = net.guidance_scale
        net.guidance_scale = guidance
        try:
            field = NetworkTeacher(net)
            return self.batched(lambda x, cond: sample(field, x, schedule, per_window, method=method, cond=cond), n)
        finally:
            net.guidance_scale = old

    def reference(self, kind: str, guidance: float) -> Tensor:
        key = (kind, guidance)
        if key not in self._references:
            self._references[key] = self.generate(self.teachers[kind], WindowSchedule.uniform(1),
                                                  self.cfg.eval.reference_steps, guidance=guidance)
        return self._references[key]

    def score(self, images: Tensor, reference: Tensor | None = None) -> dict[str, float]:
        labels = self.labels[: images.shape[0]]
        row = {"fd": self.fd(images.clamp(-1, 1)), "class_accuracy": accuracy(self.classifier, images.clamp(-1, 1), labels)}
        if reference is not None:
            row["fidelity_rmse"] = fidelity_rmse(images, reference[: images.shape[0]])
        return row


def _solver_rows(bench: DigitsBench, kind: str) -> list[dict]:
    """The teacher at each student step count with each ODE solver, at equal NFE."""
    from proreflow.baselines import scheduler_sample
    from proreflow.schedulers import make_scheduler

    cfg, teacher = bench.cfg, bench.teachers[kind]
    ref = bench.reference(kind, cfg.eval.guidance)
    rows = [{"teacher": kind, "solver": f"euler ({cfg.eval.reference_steps} steps, reference)",
             "nfe": cfg.eval.reference_steps, **bench.score(ref, ref)}]
    for nfe in cfg.steps:
        for name in cfg.baselines:
            if name == "euler":
                out = bench.generate(teacher, WindowSchedule.uniform(1), nfe, guidance=cfg.eval.guidance)
                label = "euler (DDIM steps on a uniform-t grid)" if kind == "vp" else "euler"
            elif name == "heun":
                if nfe % 2:
                    continue
                out = bench.generate(teacher, WindowSchedule.uniform(1), nfe // 2, method="heun",
                                     guidance=cfg.eval.guidance)
                label = "heun"
            else:
                if name == "ddim" and kind == "flow":
                    continue  # a VP scheduler; on the flow teacher it would be our Euler
                sched = make_scheduler(name, bench.ddpm_config, flow=(kind == "flow"))
                net = teacher.unet if kind == "vp" else teacher.net
                out = bench.batched(lambda x, cond: scheduler_sample(net, sched, x, nfe, cond, cfg.eval.guidance))
                label = name
            rows.append({"teacher": kind, "solver": label, "nfe": nfe, **bench.score(out, ref)})
    return rows


@dataclass
class StudentRun:
    method: MethodSpec
    k: int
    seed: int
    result: PlanResult
    seconds: float


def train_student(bench: DigitsBench, spec: MethodSpec, k: int, seed: int) -> StudentRun:
    """One method's k-step student from the distillation teacher; cached and resumable."""
    cfg = bench.cfg
    kind = cfg.teacher.distill
    teacher = bench.teachers[kind]
    plan = spec.plan(k, cfg.budget_steps)
    train = replace(cfg.train, seed=seed, progress=bench.progress)
    sampling = spec.sampling(cfg.time_sampling)
    common = (bench.teacher_key(kind), asdict(cfg.teacher_solver), asdict(replace(train, progress=True)), seed,
              [(s.schedule.boundaries, s.steps) for s in plan.stages], cfg.label_dropout)
    # pairs are shared by plans that differ only in lam or time sampling (a pair cache's manifest also
    # names the weights that made it, so previous-stage pairs are rebuilt whenever the student differs)
    pairs_dir = bench.cache / "pairs" / json_key(*common, spec.pair_source if spec.pair_source != "teacher" else None)
    ckpt = CheckpointConfig(bench.cache / "students" / f"{spec.name}-k{k}-s{seed}-"
                            f"{json_key(*common, spec.lam, asdict(sampling), spec.pair_source)}", every=100, resume=True)
    started = time.perf_counter()
    res = train_plan(teacher, NetworkTeacher(teacher), bench.data_fn(), plan, cfg.teacher_solver, train, spec.lam,
                     desc=f"{spec.name} k={k} seed={seed}", sampling=sampling, pair_source=spec.pair_source,
                     checkpoints=ckpt, pair_cache=PairCacheConfig(pairs_dir, None, cfg.pair_shard_size))
    return StudentRun(spec, k, seed, res, time.perf_counter() - started)


def samples_at(m: MethodSpec, k: int) -> bool:
    """Whether method m makes a k-step student: its final windows must divide k (a 2-window student
    samples at 2 or 4 steps, not at 1); methods whose windows follow k ("k", "8->k") run at every k."""
    return k % m.window_counts(k)[-1] == 0


def _student_row(bench: DigitsBench, run: StudentRun) -> dict:
    cfg = bench.cfg
    final = run.method.plan(run.k, cfg.budget_steps).final
    out = bench.generate(run.result.student, final, final.steps_per_window(run.k), guidance=cfg.eval.guidance)
    return {"method": run.method.name, "steps": run.k, "seed": run.seed,
            "windows": [s.schedule.num_windows for s in run.method.plan(run.k, cfg.budget_steps).stages],
            "lam": run.method.lam, "time_sampling": run.method.sampling(cfg.time_sampling).label(),
            "pair_source": run.method.pair_source, "teacher_nfe_per_pair": round(run.result.nfe_per_pair, 3),
            "student_nfe_per_pair": round(run.result.student_nfe_per_pair, 3),
            "optimizer_steps": run.result.optimizer_steps, "train_seconds": round(run.seconds, 1),
            **bench.score(out, bench.reference(cfg.teacher.distill, cfg.eval.guidance))}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_digits(cfg: DigitsConfig, out: Path, progress: bool = True, analyses: bool = True) -> dict:
    """Everything of the benchmark: results.json, results.md and the figures under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bench = DigitsBench(cfg, out, progress)
    log = bench.log
    results: dict[str, Any] = {"config": json.loads(json.dumps(asdict(cfg), default=str)),
                               "classifier_heldout_accuracy": bench.classifier_accuracy}
    results["real"] = {"n_heldout": bench.data.test_x.shape[0], "n_train": bench.data.train_x.shape[0],
                       "fd_train_images": bench.fd(bench.data.train_x)}  # the floor real images reach
    log("ODE-solver baselines on the teachers")
    results["solvers"] = [r for kind in cfg.teacher.kinds for r in _solver_rows(bench, kind)]
    results["teacher_seconds"] = bench.teacher_seconds
    students: dict[tuple[str, int, int], StudentRun] = {}
    trained: dict[tuple, StudentRun] = {}
    rows = []
    every_k = set(cfg.steps_methods if cfg.steps_methods is not None else [m.name for m in cfg.methods])
    table = set(cfg.table_methods)
    jobs = [(m, k, s) for s in cfg.seeds for k in cfg.steps for m in cfg.methods
            if m.train and samples_at(m, k) and ((s == cfg.seeds[0] and (m.name in every_k or k == cfg.table_steps))
                            or (k == cfg.table_steps and m.name in table))]
    for i, (m, k, s) in enumerate(jobs):
        check_stop(f"before student {i + 1}/{len(jobs)}")
        key = (m.plan_key(k, cfg.time_sampling), s)
        if key not in trained:
            log(f"student {i + 1}/{len(jobs)}: {m.name}, {k} steps, seed {s}")
            trained[key] = train_student(bench, m, k, s)
        run = trained[key]
        students[(m.name, k, s)] = StudentRun(m, k, s, run.result, run.seconds)
        rows.append(_student_row(bench, students[(m.name, k, s)]))
        log(f"  FD {rows[-1]['fd']:.3f}, class accuracy {rows[-1]['class_accuracy']:.3f}, "
            f"fidelity {rows[-1]['fidelity_rmse']:.4f}")
    results["students"] = rows
    results["table4"] = _table4(cfg, rows)
    check_stop("before the CFG sweep")
    log("CFG sweep")
    results["cfg_sweep"] = _cfg_sweep(bench, students)
    _plot_samples(bench, students, out / "samples.png")
    if analyses:
        check_stop("before the analyses")
        results["analysis"] = run_analyses(bench, out)
    results["summary"] = _summary(cfg, results)
    # what this invocation cost (a rerun on a warm cache skips cached teachers, pairs and students)
    results["run"] = {"wall_seconds": round(time.perf_counter() - started, 1), "torch_threads": torch.get_num_threads(),
                      "device": "cpu"}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_markdown(results))
    log(f"done: {out / 'results.md'}")
    return results


def _table4(cfg: DigitsConfig, rows: list[dict]) -> list[dict]:
    table = []
    for name in cfg.table_methods:
        sel = [r for r in rows if r["method"] == name and r["steps"] == cfg.table_steps]
        fd_m, fd_s = _mean_std([r["fd"] for r in sel])
        acc_m, acc_s = _mean_std([r["class_accuracy"] for r in sel])
        fid_m, fid_s = _mean_std([r["fidelity_rmse"] for r in sel])
        table.append({"method": name, "label": ABLATION_LABELS.get(name, name), "steps": cfg.table_steps,
                      "seeds": [r["seed"] for r in sel], "fd_mean": fd_m, "fd_std": fd_s, "acc_mean": acc_m,
                      "acc_std": acc_s, "fidelity_mean": fid_m, "fidelity_std": fid_s})
    return table


def _cfg_sweep(bench: DigitsBench, students: dict[tuple[str, int, int], StudentRun]) -> list[dict]:
    cfg = bench.cfg
    rows = []
    for k in cfg.steps:
        run = students.get((cfg.sweep.method, k, cfg.seeds[0]))
        if run is None:
            continue
        final = run.method.plan(k, cfg.budget_steps).final
        for g in cfg.sweep.scales:
            out = bench.generate(run.result.student, final, final.steps_per_window(k), guidance=g, n=cfg.sweep.samples)
            rows.append({"method": run.method.name, "steps": k, "guidance": g, **bench.score(out)})
    from proreflow.plotting import plot_guidance_sweep

    if rows:
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(f"{r['method']}, {r['steps']} steps", []).append(r)
        plot_guidance_sweep(groups, [("fd", "FD (classifier features)"), ("class_accuracy", "class accuracy")],
                            bench.out / "fig3_cfg_sweep.png")
    return rows


def run_analyses(bench: DigitsBench, out: Path) -> dict:
    """Figs. 1a and 1b on the distillation teacher."""
    from proreflow.analysis import perturbed_field, velocity_discrepancy
    from proreflow.plotting import plot_discrepancy, plot_perturbation

    cfg, a = bench.cfg, bench.cfg.analysis
    kind = cfg.teacher.distill
    teacher = bench.teachers[kind]
    bench.log("fig 1a: velocity discrepancy along teacher trajectories")
    n = min(a.trajectories, bench.noise.shape[0])
    times, l2, cos = velocity_discrepancy(NetworkTeacher(teacher), bench.noise[:n], a.steps, bench.cond(n))
    plot_discrepancy(times, l2, cos, out / "fig1a_velocity_discrepancy.png")
    bench.log("fig 1b: direction vs magnitude perturbation")
    base = bench.noise[: a.samples]
    field0 = NetworkTeacher(teacher)
    cond = bench.cond(a.samples)
    clean = sample(field0, base, WindowSchedule.uniform(1), a.perturb_steps, cond=cond)
    fd_clean = bench.score(clean)["fd"]
    rows = []
    for kind_p in ("direction", "magnitude"):
        for eps in a.perturb_levels:
            if kind_p == "magnitude" and eps > 1:
                continue
            f = perturbed_field(field0, kind_p, eps, seed=cfg.eval.seed)
            imgs = sample(f, base, WindowSchedule.uniform(1), a.perturb_steps, cond=cond)
            rows.append({"perturbation": kind_p, "eps": eps, **bench.score(imgs, clean)})
    plot_perturbation(rows, fd_clean, out / "fig1b_perturbation.png")
    adjacent = [float(l2[i, i + 1]) for i in range(l2.shape[0] - 1)]
    return {"teacher": kind, "times": times.tolist(), "rms_l2": l2.tolist(), "cosine": cos.tolist(),
            "l2_first_last": float(l2[0, -1]), "cos_first_last": float(cos[0, -1]),
            "l2_adjacent_mean": statistics.fmean(adjacent), "perturb_fd_clean": fd_clean, "perturbation": rows}


def analyze_digits(cfg: DigitsConfig, out: Path, progress: bool = True) -> dict:
    """Only figs. 1a/1b (teacher analyses), reusing the cached teacher of a `run` in the same `out`."""
    out.mkdir(parents=True, exist_ok=True)
    bench = DigitsBench(replace(cfg, teacher=replace(cfg.teacher, kinds=[cfg.teacher.distill])), out, progress)
    res = run_analyses(bench, out)
    atomic_write_text(out / "analysis.json", json.dumps(res, indent=2) + "\n")
    atomic_write_text(out / "analysis.md", analysis_markdown(res))
    return res


def _plot_samples(bench: DigitsBench, students: dict[tuple[str, int, int], StudentRun], path: Path) -> None:
    from proreflow.plotting import plot_image_grid

    cfg = bench.cfg
    n = 20
    panels = {"held-out real": bench.data.test_x[:n]}
    for kind in cfg.teacher.kinds:
        panels[f"{kind} teacher, {cfg.eval.reference_steps} steps"] = bench.reference(kind, cfg.eval.guidance)[:n]
    for (name, k, s), run in students.items():
        if s == cfg.seeds[0]:
            final = run.method.plan(k, cfg.budget_steps).final
            panels[f"{name}, {k} steps"] = bench.generate(run.result.student, final, final.steps_per_window(k), n=n)
    plot_image_grid(panels, path)


def _summary(cfg: DigitsConfig, results: dict) -> dict:
    table = {r["method"]: r for r in results["table4"]}
    best = min(table.values(), key=lambda r: r["fd_mean"])
    out = {"table4_best": best["method"], "full_is_best": best["method"] == "proreflow"}
    if "proreflow" in table and "perflow" in table:
        out["full_vs_perflow_fd_ratio"] = table["proreflow"]["fd_mean"] / table["perflow"]["fd_mean"]
    return out


def _f(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}" if isinstance(x, float) and math.isfinite(x) else str(x)


def results_markdown(res: dict) -> str:
    cfg = res["config"]
    lines = ["# Digits benchmark", "",
             f"FD: Fréchet distance on the features of a digits classifier (held-out accuracy "
             f"{res['classifier_heldout_accuracy']:.3f}) against the {res['real']['n_heldout']} held-out "
             f"{cfg['data']['size']}x{cfg['data']['size']} images; class accuracy: the classifier's agreement with the "
             f"requested label; fidelity: RMSE "
             f"to the teacher's {cfg['eval']['reference_steps']}-step Euler output from the same noise. "
             f"{cfg['eval']['samples']} samples, CFG scale {cfg['eval']['guidance']}.", "",
             f"The {res['real']['n_train']} real training images score FD {_f(res['real']['fd_train_images'])} "
             f"against the held-out ones: the floor for real data. FD depends on the sample count; all rows use "
             f"{cfg['eval']['samples']} samples except the CFG sweep and fig. 1b ({cfg['sweep']['samples']}, "
             f"{cfg['analysis']['samples']}).", "",
             f"## Ablations at {cfg['table_steps']} steps (paper table 4), mean ± std over seeds "
             f"{cfg['seeds']}", "", "| variant | method | FD | class acc. | fidelity RMSE |", "|---|---|---|---|---|"]
    for r in res["table4"]:
        lines.append(f"| {r['label']} | {r['method']} | {_f(r['fd_mean'])} ± {_f(r['fd_std'])} | "
                     f"{_f(r['acc_mean'], 3)} ± {_f(r['acc_std'], 3)} | {_f(r['fidelity_mean'], 4)} ± "
                     f"{_f(r['fidelity_std'], 4)} |")
    lines += ["", f"## Students (seed {cfg['seeds'][0]}), {cfg['teacher']['distill']} teacher, "
                  f"{cfg['budget_steps']} optimizer steps each", "",
              "| method | steps | windows per stage | λ | time sampling | pairs from | teacher NFE/pair | "
              "student NFE/pair | FD | class acc. | fidelity RMSE | train s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["students"]:
        if r["seed"] == cfg["seeds"][0]:
            lines.append(f"| {r['method']} | {r['steps']} | {'→'.join(map(str, r['windows']))} | {r['lam']} | "
                         f"{r.get('time_sampling', '–')} | {r.get('pair_source', 'teacher')} | "
                         f"{_f(r['teacher_nfe_per_pair'], 1)} | {_f(r.get('student_nfe_per_pair', 0.0), 1)} | "
                         f"{_f(r['fd'])} | {_f(r['class_accuracy'], 3)} | {_f(r['fidelity_rmse'], 4)} | "
                         f"{_f(r['train_seconds'], 0)} |")
    lines += ["", "## ODE solvers on the teachers (same NFE as the students)", "",
              "| teacher | solver | NFE | FD | class acc. | fidelity RMSE |", "|---|---|---|---|---|---|"]
    for r in res["solvers"]:
        lines.append(f"| {r['teacher']} | {r['solver']} | {r['nfe']} | {_f(r['fd'])} | {_f(r['class_accuracy'], 3)} | "
                     f"{_f(r['fidelity_rmse'], 4)} |")
    if res.get("cfg_sweep"):
        lines += ["", "## CFG sweep (fig. 3)", "", "| method | steps | CFG | FD | class acc. |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['steps']} | {r['guidance']:g} | {_f(r['fd'])} | {_f(r['class_accuracy'], 3)} |"
                  for r in res["cfg_sweep"]]
    if res.get("analysis"):
        lines += ["", analysis_markdown(res["analysis"])]
    s = res["summary"]
    if res.get("run"):
        lines += ["", f"This run took {res['run']['wall_seconds'] / 60:.1f} min on {res['run']['device']} "
                      f"({res['run']['torch_threads']} torch threads), teachers {', '.join(f'{k} {v / 60:.1f} min' for k, v in res['teacher_seconds'].items()) or 'from the cache'}."]
    lines += ["", f"Best at {cfg['table_steps']} steps by mean FD: **{s['table4_best']}** "
                  f"(paper's ordering, full best: {'reproduced' if s['full_is_best'] else 'not reproduced'})."]
    return "\n".join(lines) + "\n"


def analysis_markdown(a: dict) -> str:
    lines = [f"## Velocity analyses on the {a['teacher']} teacher (figs. 1a, 1b)", "",
             f"RMS L2 between velocities at the first and last timestep: {_f(a['l2_first_last'], 3)} (mean between "
             f"adjacent timesteps {_f(a['l2_adjacent_mean'], 3)}); cosine first vs last: {_f(a['cos_first_last'], 3)}.",
             "", f"Perturbed teacher sampling (FD of the unperturbed sampler: {_f(a['perturb_fd_clean'])}):", "",
             "| perturbation | eps = ‖v'−v‖/‖v‖ | FD | class acc. | RMSE to unperturbed |", "|---|---|---|---|---|"]
    lines += [f"| {r['perturbation']} | {r['eps']:g} | {_f(r['fd'])} | {_f(r['class_accuracy'], 3)} | "
              f"{_f(r['fidelity_rmse'], 4)} |" for r in a["perturbation"]]
    return "\n".join(lines)

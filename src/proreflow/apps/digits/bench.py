"""What one digits benchmark run shares: data, classifier, teachers, evaluation noise and references (all
cached under <out>/cache by the settings they depend on), and one student's training."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from proreflow.apps.digits.config import DigitsConfig
from proreflow.data.digits import NUM_CLASSES, DigitsData, class_cond, label_dropout, load_digits_images
from proreflow.fields.network import FlowVelocity, NetworkTeacher
from proreflow.fields.vp import VPSchedule, VPVelocity
from proreflow.methods import MethodSpec
from proreflow.metrics import FrechetDistance, fidelity_rmse
from proreflow.models.classifier import DigitsClassifier, FeatureExtractor, accuracy, train_classifier
from proreflow.models.unet import ARCH_VERSION as UNET_ARCH_VERSION
from proreflow.models.unet import class_unet
from proreflow.sampling import sample
from proreflow.store import atomic_save_tensors, json_key
from proreflow.training import (Monitor, MonitorConfig, PairCacheConfig, PlanResult, TrainConfig, Validation,
                                ddpm_batches, fit, flow_matching_batches, image_grid, train_plan, watching)
from proreflow.training.checkpoint import CheckpointConfig, load_tensors
from proreflow.windows import WindowSchedule


class Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled, self.start = enabled, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[digits {time.perf_counter() - self.start:6.0f}s] {msg}", file=sys.stderr, flush=True)


class DigitsBench:
    """Data, classifier, teachers and shared evaluation inputs of one benchmark run (all cached)."""

    def __init__(self, cfg: DigitsConfig, out: Path, progress: bool = True,
                 monitor: MonitorConfig | None = None) -> None:
        self.cfg, self.out, self.progress, self.monitor = cfg, out, progress, monitor
        self.cache = out / "cache"
        self.log = Log(progress)
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
        # the VP teacher is trained by DDPM's eps objective (as SD was), no longer by our flow loss through VPVelocity
        objective = "ddpm-eps" if kind == "vp" else None
        return json_key(kind, asdict(c.data), asdict(c.unet), schedule, c.label_dropout, training, UNET_ARCH_VERSION,
                        *([objective] if objective else []))

    def pairs_dir(self, kind: str) -> Path:
        """One pair directory for every student of this teacher and data (the run's and the budget sweep's).

        Each stage's cache inside it is named by its windows, pair seed, count, solver and the weights that solve
        it (`train_plan`), so plans share the stages they have in common (ProReflow-I/-II/-III's 8- and
        4-window stages, PeRFlow and its aligned variant), and previous-stage pairs are keyed by the student
        that made them. The pair seed is the student's seed plus the stage number, so seed s's stage-2 pairs
        are also seed s+1's stage-1 pairs of the same windows: solved once, and a correlation between methods
        at different seeds (never between the seeds of one method)."""
        return self.cache / "pairs" / json_key(self.teacher_key(kind), self.cfg.label_dropout)

    def _teacher(self, kind: str) -> torch.nn.Module:
        c = self.cfg
        tc = c.teacher
        torch.manual_seed(tc.seed)
        unet = class_unet(c.unet, c.data.size, NUM_CLASSES)
        if kind == "vp":  # SD's own objective on the raw UNet (its time is the integer timestep): docs/design.md §1
            init: torch.nn.Module = FlowVelocity(unet, time_scale=1.0)
            batches = ddpm_batches(self.data_fn(), tc.batch_size, self.vp_schedule.log_ac.exp())
        else:
            init, batches = self.wrap(kind, unet), flow_matching_batches(self.data_fn(), tc.batch_size)
        train = TrainConfig(lr=tc.lr, batch_size=tc.batch_size, ema_decay=tc.ema_decay, grad_clip=1.0, seed=tc.seed,
                            progress=self.progress)
        ckpt = CheckpointConfig(self.cache / f"teacher-{kind}-{self.teacher_key(kind)}", every=250, resume=True)
        fits = ckpt.for_fit("fit")
        cached = fits.final_path.is_file()
        objective = "DDPM eps" if kind == "vp" else "flow-matching"
        self.log(f"{kind} teacher: " + ("from the cache" if cached else f"{tc.steps} {objective} steps"))
        started = time.perf_counter()
        with watching(Monitor(self.monitor, self.out, f"teacher-{kind}") if self.monitor else None) as monitor:
            res = fit(init, batches, tc.steps, train, desc=f"{kind} teacher", checkpoints=fits, monitor=monitor)
        if not cached:
            self.teacher_seconds[kind] = time.perf_counter() - started
        model = self.wrap(kind, res.model.net) if kind == "vp" else res.model
        return model.eval().requires_grad_(False)

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
    recipe = replace(cfg.recipe(spec), train=replace(cfg.train, seed=seed, progress=bench.progress))
    plan, train, sampling = recipe.plan(k), recipe.train, recipe.sampling
    common = (bench.teacher_key(kind), asdict(cfg.teacher_solver), asdict(replace(train, progress=True)), seed,
              [(s.schedule.boundaries, s.steps) for s in plan.stages], cfg.label_dropout)
    pairs_dir = bench.pairs_dir(kind)
    ckpt = CheckpointConfig(bench.cache / "students" / f"{spec.name}-k{k}-s{seed}-"
                            f"{json_key(*common, spec.lam, asdict(sampling), spec.pair_source)}", every=100, resume=True)
    started = time.perf_counter()
    with watching(_monitor(bench, f"{spec.name}-k{k}-s{seed}", plan.final, kind)) as monitor:
        res = train_plan(teacher, NetworkTeacher(teacher), bench.data_fn(), recipe, k,
                         desc=f"{spec.name} k={k} seed={seed}", checkpoints=ckpt, monitor=monitor,
                         pair_cache=PairCacheConfig(pairs_dir, cfg.pairs, cfg.pair_shard_size))
    return StudentRun(spec, k, seed, res, time.perf_counter() - started)


def _monitor(bench: DigitsBench, name: str, schedule: WindowSchedule, kind: str, n: int = 40) -> Monitor | None:
    """A student's monitor (curves under out/logs/<name>); its validation renders the first `n` evaluation noises
    (labels cycling 0..9) at guidance 1, one step per window, over the teacher's reference of the same noise."""
    if bench.monitor is None:
        return None
    validation = None
    if bench.monitor.validate_every:
        reference = bench.reference(kind, 1.0)[:n]
        validation = Validation(render=lambda m: bench.generate(m, schedule, n=n), reference=reference,
                                picture=lambda s, r: image_grid((torch.cat([s, r]) + 1) / 2, cols=10),
                                note=f"{schedule.num_windows} steps, guidance 1; teacher rows below")
    return Monitor(bench.monitor, bench.out, name, validation)

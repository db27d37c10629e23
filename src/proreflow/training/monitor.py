"""Watching a run while it trains: scalars, per-window curves and validation images (docs/monitoring.md).

What a long distillation needs to be followed: the loss and its two terms, the learning rate, the gradient norm,
the EMA decay, throughput and teacher cost per optimizer step, the loss and cosine of every window (the quantities
the paper's claims are about, and where a lagging window shows), and now and then the EMA student's images from
fixed noise next to the teacher's. They go to accelerate's trackers (`accelerate.tracking.TensorBoardTracker`,
`WandBTracker`, the classes behind `Accelerator(log_with=...)`), from the main process only.

Every stage of a plan logs on one global step axis (stage k's step s is the sum of earlier stages' steps plus s).
A resumed run starts its TensorBoard writer with `purge_step` at its first new step, so the points the interrupted
run logged after its last checkpoint are dropped and the curve continues without duplicates. Validation renders
from a copy of the EMA weights and draws no random numbers, so it never changes what is trained. A tracker that
fails is reported once and switched off; training goes on.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from proreflow.errors import ProReflowError
from proreflow.limits import MAX_INTERVAL
from proreflow.losses import cosine_per_sample
from proreflow.windows import WindowSchedule

REPORT_TO = ("tensorboard", "wandb", "none")


def check_report_to(report_to: str) -> str:
    """The tracker name, checked before any work (and its package importable)."""
    if report_to not in REPORT_TO:
        raise ProReflowError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {str(report_to)[:200]!r}")
    if report_to == "tensorboard":
        try:
            from torch.utils import tensorboard  # noqa: F401
        except ImportError:
            raise ProReflowError("--report-to tensorboard needs the tensorboard package: pip install tensorboard, "
                                 "or pass --report-to none") from None
    if report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ProReflowError("--report-to wandb needs wandb: pip install wandb (WANDB_MODE=offline works "
                                 "without an account), or pass --report-to none") from None
    return report_to


def image_grid(images: Tensor, cols: int = 8) -> np.ndarray:
    """(B, C, H, W) images in [0, 1] (C = 1 or 3) as one (H', W', 3) uint8 grid with a 1-pixel gap."""
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    b, _, h, w = x.shape
    cols = max(1, min(cols, b))
    rows = math.ceil(b / cols)
    grid = torch.ones(3, rows * (h + 1) - 1, cols * (w + 1) - 1)
    for i in range(b):
        r, c = divmod(i, cols)
        grid[:, r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = x[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def points_image(points: Tensor, reference: Tensor, size: float = 3.0) -> np.ndarray:
    """2-D samples (B, 2) over the teacher's from the same noise, drawn as an (H, W, 3) uint8 picture (matplotlib's
    Agg canvas directly: no pyplot, so no backend is switched and no window opens)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size, size), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ref, pts = reference.detach().float().cpu().numpy(), points.detach().float().cpu().numpy()
    ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.7", label="teacher")
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c="C0", label="student")
    ax.legend(loc="upper right", fontsize=6, markerscale=3)
    ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout(pad=0.2)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


@dataclass
class Validation:
    """What `--validate-every` shows: `render(model)` turns the EMA student into samples from fixed noise and
    conditioning (images in [0, 1], or points), `reference` is the teacher's from the same noise, rendered once.
    Fidelity is the RMSE between the two; `picture(samples, reference)` draws the student's samples (and the
    teacher's beside them) as an (H, W, 3) uint8 image."""

    render: Callable[[nn.Module], Tensor]
    reference: Tensor
    picture: Callable[[Tensor, Tensor], np.ndarray] = field(default=lambda s, r: image_grid(s))
    note: str = ""  # how the samples were made (steps, guidance), for the docs and the PNG's name


@dataclass(frozen=True)
class MonitorConfig:
    """`report_to`: tensorboard (default), wandb or none; scalars every `log_every` optimizer steps (averaged over
    them); validation every `validate_every` steps (0: never)."""

    report_to: str = "tensorboard"
    log_every: int = 10
    validate_every: int = 0

    def __post_init__(self) -> None:
        check_report_to(self.report_to)
        for name in ("log_every", "validate_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "log_every" else 0) or v > MAX_INTERVAL:
                raise ProReflowError(f"{name.replace('_', '-')} must be an integer in "
                                     f"[{1 if name == 'log_every' else 0}, 1e9], got {v!r}")


class Monitor:
    """One run's trackers and validation; `fit` reports to it every optimizer step (see `FitWatch`).

    `folder`: where the run's logs go (`folder/logs/<run_name>` for TensorBoard, `folder/validation/<run_name>/` for
    the validation pictures). Built on every process; only the main one writes."""

    def __init__(self, cfg: MonitorConfig, folder: Path, run_name: str = "run", validation: Validation | None = None,
                 is_main: bool | None = None) -> None:
        self.cfg, self.folder, self.run_name, self.validation = cfg, Path(folder), run_name, validation
        if is_main is None:
            from proreflow.accel import process_state

            is_main = process_state().is_main_process
        self.is_main = is_main
        self.trackers: list[Any] | None = None  # started at the first point, with purge_step there
        self.stage, self.stages, self.windows, self.offset = 0, 1, None, 0
        self.teacher_nfe = 0  # spent by the stages before this one (`train_plan` sets it)
        self._teacher_shown = False
        self._warned: set[str] = set()

    @property
    def log_dir(self) -> Path:
        return self.folder / "logs"

    def at_stage(self, index: int, count: int, windows: WindowSchedule | None, offset: int) -> None:
        """The next fit is stage `index` (0-based) of `count`, on `windows`, after `offset` optimizer steps."""
        self.stage, self.stages, self.windows, self.offset = index, count, windows, offset

    def _start(self, first_step: int) -> None:
        self.trackers = []
        if not self.is_main or self.cfg.report_to == "none":
            return
        try:
            if self.cfg.report_to == "tensorboard":
                from accelerate.tracking import TensorBoardTracker

                tracker = TensorBoardTracker(self.run_name, self.log_dir, purge_step=first_step)
            else:
                from accelerate.tracking import WandBTracker

                self.log_dir.mkdir(parents=True, exist_ok=True)
                tracker = WandBTracker("proreflow", name=self.run_name, dir=str(self.log_dir), resume="allow",
                                       id=_stable_id(self.log_dir / f"wandb-{self.run_name}.id"))
            tracker.start()
            self.trackers.append(tracker)
        except Exception as exc:  # a tracker never stops training
            self._warn("start", exc)

    def _warn(self, what: str, exc: Exception) -> None:
        if what not in self._warned:
            self._warned.add(what)
            who = "validation" if what == "validation" else f"the {self.cfg.report_to} tracker"
            print(f"warning: {who} failed ({what}: {type(exc).__name__}: {str(exc)[:200]}); training goes on "
                  f"without it", file=sys.stderr, flush=True)

    def log(self, values: dict[str, float], step: int) -> None:
        if self.trackers is None:
            self._start(step)
        for tracker in list(self.trackers or []):
            try:
                tracker.log(values, step=step)
            except Exception as exc:
                self._warn("log", exc)
                self.trackers.remove(tracker)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        if self.trackers is None:
            self._start(step)
        for tracker in list(self.trackers or []):
            try:
                if tracker.name == "tensorboard":
                    for k, v in images.items():
                        tracker.writer.add_image(k, v, global_step=step, dataformats="HWC")
                    tracker.writer.flush()
                else:
                    tracker.log_images({k: [v] for k, v in images.items()}, step=step)
            except Exception as exc:
                self._warn("images", exc)
                self.trackers.remove(tracker)

    def validate(self, step: int, model_fn: Callable[[], nn.Module]) -> float | None:
        """Render the EMA student (main process only); log fidelity and the picture; save it as a PNG."""
        if self.validation is None or not self.is_main:
            return None
        v = self.validation
        with torch.no_grad():
            model = model_fn()
            samples = v.render(model).float().cpu()
            del model
        fidelity = float(torch.sqrt(torch.mean((samples - v.reference.float().cpu()) ** 2)))
        pictures = {"validation/student": v.picture(samples, v.reference)}
        if not self._teacher_shown:
            pictures["validation/teacher"] = v.picture(v.reference, v.reference)
            self._teacher_shown = True
        self.log({"validation/fidelity_rmse": fidelity}, step)
        self.log_images(pictures, step)
        where = self.folder / "validation" / self.run_name
        _save_png(where / f"step-{step:07d}.png", pictures["validation/student"])
        if "validation/teacher" in pictures:
            _save_png(where / "teacher.png", pictures["validation/teacher"])
        return fidelity

    def close(self) -> None:
        for tracker in self.trackers or []:
            try:
                tracker.finish()
            except Exception as exc:
                self._warn("finish", exc)
        self.trackers = None

    def watch(self, steps: int, done: int, batch_size: int) -> "FitWatch":
        return FitWatch(self, steps, done, batch_size)


class FitWatch:
    """One fit's running sums between two logged points (so a point is the mean over `log_every` steps)."""

    def __init__(self, monitor: Monitor, steps: int, done: int, batch_size: int) -> None:
        self.m, self.steps, self.batch_size = monitor, steps, batch_size
        if monitor.trackers is None:  # a resumed fit: drop what the interrupted run logged after its checkpoint
            monitor._start(monitor.offset + done + 1)
        self._reset()
        self._clock = time.perf_counter()
        self._since = done

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        k = self.m.windows.num_windows if self.m.windows is not None else 0
        self.win_mse, self.win_cos, self.win_n = torch.zeros(k, dtype=torch.float64), torch.zeros(
            k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)

    @torch.no_grad()
    def step(self, done: int, terms: Any, pred: Tensor, target: Tensor, t: Tensor, grad_norm: float, lr: float,
             ema_decay: float, teacher_nfe: int, model_fn: Callable[[], nn.Module]) -> None:
        """After optimizer step `done` of this fit: accumulate, and log / validate when it is time."""
        m = self.m
        for name, v in (("loss", terms.total), ("mse", terms.mse), ("direction", terms.direction),
                        ("grad_norm", grad_norm)):
            self.sums[name] = self.sums.get(name, 0.0) + float(v)
        self.count += 1
        if m.windows is not None and pred is not None and pred.shape == target.shape:
            p, q = pred.detach().float(), target.detach().float()
            per_mse = ((p - q) ** 2).reshape(p.shape[0], -1).mean(1).double().cpu()
            per_cos = cosine_per_sample(p, q).double().cpu()
            idx = m.windows.window_index(t.detach().float().cpu().reshape(-1))
            self.win_mse.index_add_(0, idx, per_mse)
            self.win_cos.index_add_(0, idx, per_cos)
            self.win_n.index_add_(0, idx, torch.ones_like(per_mse))
        step = m.offset + done
        if done % m.cfg.log_every == 0 or done == self.steps:
            now = time.perf_counter()
            values = {f"train/{k}": v / self.count for k, v in self.sums.items()}
            values.update({"train/lr": lr, "train/ema_decay": ema_decay, "train/stage": m.stage + 1,
                           "train/teacher_nfe": m.teacher_nfe + teacher_nfe,
                           "train/samples_per_s": (done - self._since) * self.batch_size
                           / max(now - self._clock, 1e-9)})
            if m.windows is not None:
                k = m.windows.num_windows
                for i in range(k):
                    if self.win_n[i] > 0:
                        values[f"window_mse/K{k}_w{i + 1}"] = float(self.win_mse[i] / self.win_n[i])
                        values[f"window_cos/K{k}_w{i + 1}"] = float(self.win_cos[i] / self.win_n[i])
            if m.is_main:
                m.log(values, step)
            self._reset()
            self._clock, self._since = time.perf_counter(), done
        if m.cfg.validate_every and m.validation is not None and (done % m.cfg.validate_every == 0
                                                                   or done == self.steps):
            try:
                m.validate(step, model_fn)
            except Exception as exc:  # e.g. out of memory while rendering: warn, stop validating, train on
                m._warn("validation", exc)
                m.validation = None
            self._clock = time.perf_counter()  # validation time is not training throughput


@contextmanager
def watching(monitor: Monitor | None) -> Iterator[Monitor | None]:
    """`monitor` (or None) for a block, its trackers closed when the block ends, however it ends: every command
    wraps its fits in this."""
    try:
        yield monitor
    finally:
        if monitor is not None:
            monitor.close()


def _stable_id(path: Path) -> str:
    """A wandb run id kept in the run folder, so a resumed run appends to the same wandb run."""
    if path.is_file():
        return path.read_text().strip()
    import secrets

    rid = secrets.token_hex(8)
    path.write_text(rid + "\n")
    return rid


def _save_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(img).save(tmp)
    tmp.replace(path)

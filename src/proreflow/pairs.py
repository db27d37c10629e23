"""Window pairs (x_a, x_b) that the teacher's ODE connects, and the training points on their chords.

For a window [t_a, t_b] (t_a noisier): x_a = (1 - t_a) x0 + t_a eps from real data (pure
noise when t_a = 1), x_b = the teacher's ODE solved from t_a to t_b only. The student's target
is the chord velocity (x_a - x_b) / (t_a - t_b), constant inside the window.

Pure noise enters where the teacher says (`conventions.noise_entry`): a VP teacher's first window starts at
its noisiest timestep's flow time t_max with y = eps / (alpha + sigma), i.e. x_999 = eps as SD samplers feed
it, so the pairs record t_a = t_max there and the student is never asked about times SD never saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from proreflow.cond import flatten_cond, take, unflatten_cond
from proreflow.conventions import NoiseEntry, Teacher, as_teacher, chord_velocity, expand_time, interpolate
from proreflow.errors import ProReflowError
from proreflow.solvers import NFE_PER_STEP, VelocityField, check_solver, solve
from proreflow.store import DAMAGED_FILE_ERRORS, ShardStore, json_key, load_strided, save_strided, tensor_digest
from proreflow.windows import WindowSchedule


@dataclass(frozen=True)
class TeacherSolver:
    """How the teacher's ODE is solved over a window.

    mode="per_window": `steps` steps in every window, whatever its length (equal teacher cost per
    pair for every plan, which is how methods are compared at equal budget).
    mode="per_unit_time": ceil(steps * window length) steps, i.e. a fixed step size, so narrow
    windows cost fewer teacher evaluations (the cost advantage of local reflow).
    mode="grid": one step between consecutive points of `grid` inside each window (`steps` is
    unused): how a previous stage's student crosses a wider window, one step per sub-window.
    mode="placed": `steps` steps over the whole trajectory, at the points of `grid` (steps + 1 of them, 1 to 0)
    or, without one, uniform in flow time; each window takes the steps that fall inside it. The SD app places
    them at DDIM's trailing timesteps (`fields.teacher_grid`), so a VP teacher's pairs are the paper's DDIM-32
    exactly: 8 windows at the teacher's timesteps cost 4 calls each, 32 for one pass over every window.
    """

    method: Literal["euler", "heun", "rk4"] = "rk4"
    steps: int = 4
    mode: Literal["per_window", "per_unit_time", "grid", "placed"] = "per_window"
    # teacher calls on at most this many samples at once (0: all at once). On CPU a conv UNet is ~2.6x
    # faster per sample at batch 128 than at 2048 (cache-bound), which matters when building pair caches.
    max_batch: int = 0
    grid: tuple[float, ...] = ()  # mode="grid": the finer (previous) schedule's boundaries; "placed": its points

    def __post_init__(self) -> None:
        check_solver(self.method, self.steps)
        if self.mode not in ("per_window", "per_unit_time", "grid", "placed"):
            raise ProReflowError(f"teacher solver mode must be 'per_window', 'per_unit_time', 'grid' or 'placed', "
                                 f"got {self.mode!r}")
        if self.mode == "placed":
            grid = tuple(float(g) for g in self.grid) or tuple(1.0 - j / self.steps for j in range(self.steps + 1))
            if len(grid) != self.steps + 1 or grid[0] != 1.0 or grid[-1] != 0.0 or \
                    any(not a > b for a, b in zip(grid[:-1], grid[1:])):
                raise ProReflowError(f"a placed teacher grid must run from 1 down to 0 in {self.steps} steps, "
                                     f"got {list(grid)}")
            object.__setattr__(self, "grid", grid)
        elif (self.mode == "grid") != bool(self.grid):
            raise ProReflowError("a teacher solver has a grid exactly when its mode is 'grid' or 'placed'")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 0:
            raise ProReflowError(f"teacher solver max_batch must be an integer >= 0, got {self.max_batch!r}")

    def steps_for(self, length: float) -> int:
        if self.mode == "per_window":
            return self.steps
        return max(1, math.ceil(self.steps * length - 1e-9))  # tolerance: 4 * 0.25 is 1 step, not 2

    def grid_in(self, t_a: float, t_b: float) -> list[float]:
        """The grid points from t_a down to t_b (both included): the steps across window [t_a, t_b]."""
        inner = [g for g in self.grid if t_b + 1e-7 < g < t_a - 1e-7]
        return [t_a, *sorted(inner, reverse=True), t_b]

    def placed_at(self, grid: tuple[float, ...]) -> "TeacherSolver":
        """This placed solver with its steps at `grid` (steps + 1 flow times from 1 to 0)."""
        if self.mode != "placed":
            return self
        return TeacherSolver(self.method, self.steps, "placed", self.max_batch, tuple(grid))

    def spec(self) -> list:
        """What identifies the pairs this solver makes (the grid only where there is one, so caches
        written before grids existed keep their identity)."""
        return [self.method, self.steps, self.mode] + ([list(self.grid)] if self.grid else [])


def grid_solver(previous: WindowSchedule, method: Literal["euler", "heun", "rk4"] = "euler",
                max_batch: int = 0) -> TeacherSolver:
    """One `method` step per window of `previous`: how stage k's pairs come from stage k-1's student."""
    return TeacherSolver(method, 1, "grid", max_batch=max_batch, grid=tuple(previous.boundaries))


@dataclass
class WindowPairs:
    """A batch of teacher-connected pairs and the window each one lives in."""

    x_a: Tensor
    x_b: Tensor
    t_a: Tensor  # (B,)
    t_b: Tensor  # (B,)
    cond: Any = None
    teacher_nfe: int = 0  # teacher evaluations spent on this batch, summed over samples

    @property
    def nfe_per_pair(self) -> float:
        return self.teacher_nfe / max(1, self.x_a.shape[0])

    def target(self) -> Tensor:
        """Chord velocity (x_a - x_b) / (t_a - t_b): what one Euler step over the window must use."""
        return chord_velocity(self.x_a, self.x_b, self.t_a, self.t_b)

    def point(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Point on the chord at fraction u in [0, 1) from x_a, and its time t = t_a - u (t_a - t_b)."""
        t = self.t_a - u * (self.t_a - self.t_b)
        uu = expand_time(u, self.x_a)
        return self.x_a + uu * (self.x_b - self.x_a), t


@torch.inference_mode()
def make_window_pairs(teacher: Teacher | VelocityField, x0: Tensor, schedule: WindowSchedule, solver: TeacherSolver,
                      generator: torch.Generator | None = None, cond: Any = None,
                      windows: Tensor | None = None, noise: Tensor | None = None) -> WindowPairs:
    """Pairs for a batch of real data x0: one window per sample (length-weighted unless given).

    The teacher runs in inference mode (no autograd bookkeeping at all); the returned pair tensors
    only enter training through functional ops (chord points, targets), which is allowed."""
    n = x0.shape[0]
    if windows is None:
        windows = schedule.sample_windows(n, generator).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
    if noise.shape != x0.shape:
        raise ProReflowError(f"noise shape {tuple(noise.shape)} != data shape {tuple(x0.shape)}")
    teacher = as_teacher(teacher)
    entry = teacher.noise_entry
    if solver.max_batch:
        teacher = Chunked(teacher, solver.max_batch)
    b = schedule.entered_at(entry.t)
    t_a = torch.tensor(b[:-1], device=x0.device, dtype=x0.dtype)[windows]
    t_b = schedule.ends(x0.device, x0.dtype)[windows]
    x_a = interpolate(x0, noise, t_a)
    top = windows == 0  # starts at pure noise: exactly what the teacher's samplers feed there
    x_a[top] = noise[top] * entry.scale
    per = NFE_PER_STEP[solver.method]
    # the grid points across each window, for the solvers that step on a grid
    grids = [solver.grid_in(b[w], b[w + 1]) for w in range(len(b) - 1)] if solver.mode in ("grid", "placed") else None
    if solver.mode == "per_window":
        x_b = solve(teacher, x_a, t_a, t_b, solver.steps, solver.method, cond)
        nfe = n * solver.steps * per
    elif grids is not None and len({len(g) for g in grids}) == 1:
        # every window takes the same number of grid steps (DDIM-32's grid over 8, 4 or 2 windows at the teacher's
        # timesteps): one batched solve, each sample on its own window's grid, instead of one small solve per window
        table = torch.tensor(grids, dtype=x0.dtype, device=x0.device)[windows]
        x_b = x_a
        for j in range(table.shape[1] - 1):
            x_b = solve(teacher, x_b, table[:, j], table[:, j + 1], 1, solver.method, cond)
        nfe = n * (len(grids[0]) - 1) * per
    else:  # step counts differ per window: one batched solve per window present
        x_b = torch.empty_like(x_a)
        nfe = 0
        lengths = [hi - lo for hi, lo in zip(b[:-1], b[1:])]
        for w in torch.unique(windows).tolist():
            m = windows == w
            cond_m = take(cond, m)
            if grids is not None:
                points = grids[w]
                x = x_a[m]
                for s_a, s_b in zip(points[:-1], points[1:]):
                    x = solve(teacher, x, s_a, s_b, 1, solver.method, cond_m)
                x_b[m], steps = x, len(points) - 1
            else:
                steps = solver.steps_for(lengths[w])
                x_b[m] = solve(teacher, x_a[m], t_a[m], t_b[m], steps, solver.method, cond_m)
            nfe += int(m.sum()) * steps * per
    return WindowPairs(x_a=x_a, x_b=x_b, t_a=t_a, t_b=t_b, cond=cond, teacher_nfe=nfe)


class Chunked:
    """A teacher evaluated on at most `size` samples at a time (same outputs, bounded batch)."""

    def __init__(self, teacher: Teacher, size: int) -> None:
        self.teacher, self.size = teacher, size
        self.noise_entry = teacher.noise_entry

    def fingerprint(self) -> str | None:
        return self.teacher.fingerprint()

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        n = self.size
        if x.shape[0] <= n:
            return self.teacher(x, t, cond)
        return torch.cat([self.teacher(x[i:i + n], t[i:i + n], take(cond, slice(i, i + n)))
                          for i in range(0, x.shape[0], n)])


def teacher_fingerprint(teacher: Any) -> str | None:
    """A digest of a teacher network's frozen weights (`Teacher.fingerprint`), so that a pair cache made by other
    weights is never reused; None for fields without a network (analytic teachers)."""
    return as_teacher(teacher).fingerprint()


class PairCache(ShardStore):
    """Window pairs cached to disk in safetensors shards with a checksummed manifest.

    Each shard is generated from its own seed (base seed, shard index), so a shard that is
    missing, truncated or corrupted is regenerated bit for bit, and an interrupted build
    resumes at the first shard it lacks (see `ShardStore`).
    """

    @staticmethod
    def spec(schedule: WindowSchedule, solver: TeacherSolver, n_pairs: int, shard_size: int,
             seed: int, teacher: VelocityField | None = None) -> dict:
        """What a cache's pairs are, given its data: checked against the manifest before any pair is reused.
        A teacher whose pure noise enters below t = 1 (VP) names its entry, so pairs made before the entry
        existed (from 1.066 x eps at t = 1) are never reused; straight-flow caches keep their identity."""
        field = as_teacher(teacher) if teacher is not None else None
        entry = field.noise_entry if field is not None else NoiseEntry()
        return {"boundaries": list(schedule.boundaries), "solver": solver.spec(),
                "n_pairs": n_pairs, "shard_size": shard_size, "seed": seed,
                "teacher": field.fingerprint() if field is not None else None,
                **({} if entry.is_default else {"noise_entry": [entry.t, entry.scale]})}

    def ensure(self, teacher: VelocityField, data_fn: Callable[[int, torch.Generator], tuple[Tensor, Any]],
               schedule: WindowSchedule, solver: TeacherSolver, n_pairs: int, shard_size: int = 10_000,
               seed: int = 0, progress: bool = False, after_each: Callable[[], None] | None = None,
               spec: dict | None = None) -> "CachedPairs":
        """Build the missing or damaged shards, then load and return every pair (`after_each`: see `build`).
        `spec`: `PairCache.spec` of these arguments when the caller has it (the teacher's digest is its cost)."""
        if n_pairs < 1 or shard_size < 1:
            raise ProReflowError(f"pair cache needs n_pairs >= 1 and shard_size >= 1, got {n_pairs}, {shard_size}")
        spec = spec or self.spec(schedule, solver, n_pairs, shard_size, seed, teacher)

        def make(i: int) -> tuple[dict[str, Tensor], dict]:
            n = min(shard_size, n_pairs - i * shard_size)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            x0, cond = data_fn(n, gen)
            pairs = make_window_pairs(teacher, x0, schedule, solver, generator=gen, cond=cond)
            tensors = {"x_a": pairs.x_a, "x_b": pairs.x_b, "t_a": pairs.t_a, "t_b": pairs.t_b, **flatten_cond(cond)}
            return tensors, {"pairs": n, "teacher_nfe": pairs.teacher_nfe}

        self.build(spec, -(-n_pairs // shard_size), make, progress, desc="teacher pairs", after_each=after_each)
        return self.load(spec)

    def load(self, spec: dict) -> "CachedPairs":  # type: ignore[override]
        parts, entries = super().load(spec, -(-spec["n_pairs"] // spec["shard_size"]))
        cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        nfe = sum(e["teacher_nfe"] for e in entries)
        return CachedPairs(WindowPairs(cat["x_a"], cat["x_b"], cat["t_a"], cat["t_b"], unflatten_cond(cat), nfe))


@dataclass
class CachedPairs:
    """All cached pairs in memory; `batch` draws a random subset with its conditioning."""

    pairs: WindowPairs

    def __len__(self) -> int:
        return self.pairs.x_a.shape[0]

    def batch(self, idx: Tensor) -> WindowPairs:
        p = self.pairs
        return WindowPairs(p.x_a[idx], p.x_b[idx], p.t_a[idx], p.t_b[idx], take(p.cond, idx), 0)


PAIR_KEYS = ("x_a", "x_b", "t_a", "t_b")


class PairMemo:
    """Teacher pairs remembered on disk by what they are solved from, so runs that draw the same inputs solve them
    once (a lambda or loss-weighting sweep, PeRFlow beside its aligned variant, a shorter budget's prefix).

    Content-addressed: a file per batch named by the digest of its inputs (data, noise, windows, conditioning),
    in a folder named by the teacher's fingerprint, the windows and the solver. A hit returns the very tensors the
    solve gave, so training is bitwise what it would be without the memo; anything that differs misses. The
    teacher cost recorded is the solve's (a method's cost per pair does not depend on who paid it)."""

    def __init__(self, root: str | Path, teacher: Teacher | VelocityField, schedule: WindowSchedule,
                 solver: TeacherSolver) -> None:
        self.teacher, self.schedule, self.solver = teacher, schedule, solver
        spec = PairCache.spec(schedule, solver, 0, 0, 0, teacher)
        self.dir = Path(root) / f"w{schedule.num_windows}-{json_key(spec, length=16)}"
        self.hits = self.misses = 0

    def __call__(self, x0: Tensor, cond: Any, windows: Tensor, noise: Tensor) -> WindowPairs:
        key = tensor_digest({"x0": x0, "windows": windows, "noise": noise, **flatten_cond(cond)})
        path = self.dir / f"{key[:32]}.safetensors"
        if path.is_file():
            try:  # in the solve's memory layout (channels-last latents stay so): the same kernels, the same student
                got = load_strided(path, PAIR_KEYS, x0.device)
                pairs = WindowPairs(*(got[k] for k in PAIR_KEYS), cond, int(got["teacher_nfe"]))
                self.hits += x0.shape[0]
                return pairs
            except DAMAGED_FILE_ERRORS:  # damaged: solve again, replace it
                pass
        pairs = make_window_pairs(self.teacher, x0, self.schedule, self.solver, cond=cond, windows=windows,
                                  noise=noise)
        self.misses += x0.shape[0]
        try:
            save_strided(dict(zip(PAIR_KEYS, (pairs.x_a, pairs.x_b, pairs.t_a, pairs.t_b))), path,
                         {"teacher_nfe": torch.tensor(pairs.teacher_nfe)})
        except OSError:  # another run wrote the same pairs at the same moment: they are the same pairs
            pass
        return pairs

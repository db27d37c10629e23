"""Built-in 2-D point clouds and user-supplied point files (`--data points.npy`, N x D, D >= 2).

Built-in sets are generated from a seed (nothing downloaded). User data is standardised to zero
mean and unit overall scale, so the N(0, I) noise end of the path matches its size; the affine
map is kept so samples can be mapped back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from proreflow.errors import ProReflowError
from proreflow.fields.gmm import GaussianMixture

MIN_POINTS = 20


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.uniform(0, math.pi, n)
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(a), 1 - np.cos(a))
    y = np.where(upper, np.sin(a), 0.5 - np.sin(a))
    pts = np.stack([x, y], 1) + 0.05 * rng.standard_normal((n, 2))
    return (pts - [0.5, 0.25]) * 1.5


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) + np.floor(rng.uniform(-2, 2, n)) + 0.0
    # shift every other column so squares alternate
    x2 = x2 + (np.floor(x1) % 2)
    x2 = np.where(x2 >= 2, x2 - 4, x2)
    return np.stack([x1, x2], 1)


def _spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    r = np.sqrt(rng.uniform(0, 1, n)) * 3 * math.pi
    arm = rng.random(n) < 0.5
    ang = r + np.where(arm, 0.0, math.pi)
    pts = np.stack([r * np.cos(ang), r * np.sin(ang)], 1) / (1.5 * math.pi)
    return pts + 0.05 * rng.standard_normal((n, 2))


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    ang = rng.uniform(0, 2 * math.pi, n)
    rad = np.where(rng.random(n) < 0.5, 1.0, 2.0)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1) + 0.05 * rng.standard_normal((n, 2))


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    gmm = GaussianMixture.ring(8, radius=2.0, std=0.15)
    comp = rng.integers(0, 8, n)
    return gmm.means.numpy()[comp] + 0.15 * rng.standard_normal((n, 2))


BUILTIN = {"moons": _moons, "checkerboard": _checkerboard, "spirals": _spirals, "circles": _circles,
           "8gaussians": _eight_gaussians}


@dataclass
class PointData:
    """Train/held-out split of a point cloud plus the standardisation applied to it."""

    name: str
    train: Tensor
    test: Tensor
    shift: Tensor
    scale: float

    @property
    def dim(self) -> int:
        return self.train.shape[1]


def builtin_points(name: str, n: int, seed: int) -> np.ndarray:
    if name not in BUILTIN:
        raise ProReflowError(f"unknown dataset {name!r}; built-in sets are {sorted(BUILTIN)} (or pass --data FILE.npy)")
    return BUILTIN[name](n, np.random.default_rng(seed))


#: a point this many robust scales from the median is an outlier (a unit or parsing error, not data)
OUTLIER_SCALES = 1e6
NPY_MAGIC = b"\x93NUMPY"


def load_points(path: str | Path, allow_outliers: bool = False) -> np.ndarray:
    """Read and validate an N x D (D >= 2) finite numeric array from a .npy file (no pickles).

    Standardisation divides by the points' overall scale, so one point at 1e30 would squeeze all others
    into one; such outliers are refused unless `allow_outliers` (see `count_outliers`)."""
    p = Path(path)
    if p.is_dir():
        raise ProReflowError(f"data file {str(p)!r} is a folder; pass a .npy file")
    if not p.is_file():
        raise ProReflowError(f"data file {str(p)!r} does not exist")
    with open(p, "rb") as f:
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise ProReflowError(f"{str(p)!r} is not a readable .npy array (no NumPy header); save points with "
                                 f"numpy.save")
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise ProReflowError(f"{str(p)!r} is not a readable .npy array: it holds Python objects, which "
                                 f"proreflow never unpickles; save a numeric array") from None
        raise ProReflowError(f"{str(p)!r} is not a readable .npy array ({str(exc).splitlines()[0][:200]})") from None
    except Exception as exc:  # numpy raises several types for malformed files
        raise ProReflowError(f"{str(p)!r} is not a readable .npy array ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise ProReflowError(f"{str(p)!r} must hold a numeric array, got dtype {getattr(arr, 'dtype', type(arr))}")
    if arr.ndim != 2:
        raise ProReflowError(f"{str(p)!r} must be an N x D array, got shape {arr.shape}")
    if arr.shape[1] < 2:
        raise ProReflowError(f"{str(p)!r} has D={arr.shape[1]}; points need at least 2 dimensions")
    if arr.shape[0] < MIN_POINTS:
        raise ProReflowError(f"{str(p)!r} has {arr.shape[0]} points; need at least {MIN_POINTS}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ProReflowError(f"{str(p)!r} contains NaN or infinite values")
    if np.all(arr == arr[0]):
        raise ProReflowError(f"{str(p)!r} has all points identical; nothing to learn")
    n_out, worst = count_outliers(arr)
    if n_out and not allow_outliers:
        raise ProReflowError(f"{str(p)!r}: {n_out} of {len(arr)} points lie more than {OUTLIER_SCALES:.0e} robust "
                             f"scales from the median (the farthest {worst:.3g} scales), which standardisation "
                             f"would turn into a collapsed data set; remove them, or pass --allow-outliers")
    return arr


def count_outliers(pts: np.ndarray) -> tuple[int, float]:
    """How many points lie more than OUTLIER_SCALES robust scales from the coordinate-wise median, and the
    largest such distance in scales. Distance: the largest coordinate difference (no overflow at 1e200);
    robust scale: the median of those distances (0 when most points coincide: then no point is counted)."""
    dist = np.max(np.abs(pts - np.median(pts, axis=0)), axis=1)
    scale = float(np.median(dist))
    if scale == 0.0 or not math.isfinite(scale):
        return 0, 0.0
    ratio = dist / scale
    return int(np.sum(ratio > OUTLIER_SCALES)), float(ratio.max())


def split_points(name: str, pts: np.ndarray, seed: int, test_fraction: float = 0.2,
                 standardise: bool = True) -> PointData:
    """Shuffle, standardise (zero mean, unit RMS) and split into train / held-out."""
    rng = np.random.default_rng(seed)
    pts = pts[rng.permutation(len(pts))]
    shift = pts.mean(0) if standardise else np.zeros(pts.shape[1])
    with np.errstate(over="ignore"):
        scale = float(np.sqrt(((pts - shift) ** 2).mean())) if standardise else 1.0
    if scale == 0.0:
        raise ProReflowError(f"dataset {name!r} has all points identical; nothing to learn")
    if not math.isfinite(scale):
        raise ProReflowError(f"dataset {name!r}: the points' scale overflows float64 (values near 1e154 or "
                             f"beyond); rescale the data")
    z = torch.from_numpy((pts - shift) / scale).float()
    n_test = max(1, int(round(test_fraction * len(z))))
    return PointData(name, z[n_test:], z[:n_test], torch.from_numpy(shift).float(), scale)

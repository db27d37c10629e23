import math

import torch

from proreflow.metrics import energy_distance, fidelity_rmse, sliced_wasserstein, straightness
from proreflow.windows import WindowSchedule


def test_fidelity_rmse_is_rms_difference():
    a = torch.zeros(4, 2)
    assert math.isclose(fidelity_rmse(a + 3.0, a), 3.0)


def test_distances_separate_shifted_sets(gen):
    a = torch.randn(3000, 2, generator=gen)
    b = torch.randn(3000, 2, generator=gen)
    shift = torch.tensor([1.0, 0.0])
    assert energy_distance(a, b) < 0.01
    assert energy_distance(a, b + shift) > 0.2
    # sliced W2 of a pure shift d is |d| / sqrt(D) on average over directions
    sw = sliced_wasserstein(a, a + shift, projections=2000)
    assert abs(sw - 1 / math.sqrt(2)) < 0.03
    assert sliced_wasserstein(a, b) < 0.08


def test_straightness_zero_for_straight_paths_and_positive_for_curved(gen):
    target = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    noise = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    straight = lambda x, t, cond=None: (x - target) / t[:, None]
    assert straightness(straight, noise, WindowSchedule.uniform(1), substeps=8) < 1e-20
    rot = lambda x, t, cond=None: torch.stack([-x[:, 1], x[:, 0]], 1)  # circles are not straight
    s1 = straightness(rot, noise, WindowSchedule.uniform(1), substeps=32)
    s4 = straightness(rot, noise, WindowSchedule.uniform(4), substeps=32)
    # unit-speed arc of 1 rad: E|v - chord|^2 = r^2 (1 - (sin(1/2) / (1/2))^2) = 0.0805 per element for E r^2 = 2
    assert 0.055 < s1 < 0.09
    assert s4 < s1 / 8  # deviation from the chord shrinks like the window length squared

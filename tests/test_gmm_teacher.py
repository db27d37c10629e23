import math

import pytest
import torch

from proreflow.errors import ProReflowError
from proreflow.fields.gmm import GaussianMixture
from proreflow.sampling import sample
from proreflow.windows import WindowSchedule


def _gmm() -> GaussianMixture:
    means = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.5, 0.0], [0.0, -2.0, -1.0]])
    stds = torch.tensor([[0.3, 0.5, 0.4], [0.6, 0.2, 0.3], [0.4, 0.4, 0.4]])
    return GaussianMixture(means, stds, torch.tensor([0.5, 0.3, 0.2]))


@pytest.mark.parametrize("t", [0.35, 0.6, 0.85])
def test_velocity_matches_monte_carlo(gen, t):
    """E[eps - x0 | x_t] in closed form vs importance-weighted samples of x0 ~ GMM."""
    gmm = _gmm()
    x_t = torch.tensor([[0.7, 0.2, 0.1], [-0.5, 0.4, -0.3]], dtype=torch.float64)
    exact = gmm.velocity(x_t, torch.full((2,), t, dtype=torch.float64))
    x0 = gmm.sample(400_000, gen)
    for i in range(2):
        # p(x_t | x0) = N(x_t; (1 - t) x0, t^2 I); eps is then determined by x0
        logw = -((x_t[i] - (1 - t) * x0) ** 2).sum(1) / (2 * t * t)
        w = torch.softmax(logw, 0)
        eps = (x_t[i] - (1 - t) * x0) / t
        mc = (w[:, None] * (eps - x0)).sum(0)
        ess = 1.0 / (w**2).sum()
        assert ess > 500, "Monte-Carlo estimate too weak to compare"
        assert torch.allclose(exact[i], mc, atol=0.05), (exact[i], mc)


def test_velocity_at_data_end_points_to_component_mean():
    """Closed-form end points for one component: at t = 0, x0 = x and E[eps] = 0 so v = -x;
    at t = 1, x = eps so v = x - mean."""
    gmm = GaussianMixture(torch.tensor([[1.0, -2.0]]), 0.5)
    x = torch.tensor([[0.3, 0.4], [2.0, -1.0]], dtype=torch.float64)
    v = gmm.velocity(x, torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(v, -x)
    # at t = 1, x_1 = eps, so E[eps - x0 | x_1 = x] = x - mean
    v1 = gmm.velocity(x, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(v1, x - torch.tensor([1.0, -2.0], dtype=torch.float64))


def test_ode_pushes_noise_onto_the_mixture(gen):
    """RK4 on the exact velocity from N(0, I) reproduces the mixture's mean, covariance and mode weights."""
    gmm = _gmm()
    noise = torch.randn(20_000, 3, generator=gen, dtype=torch.float64)
    x = sample(gmm.velocity, noise, WindowSchedule.uniform(1), steps_per_window=100, method="rk4")
    assert torch.allclose(x.mean(0), gmm.mean(), atol=0.04)
    assert torch.allclose(torch.cov(x.T), gmm.covariance(), atol=0.08)
    # nearest-component assignment matches the mixture weights
    labels = gmm.posterior(x, torch.zeros(x.shape[0], dtype=torch.float64)).argmax(1)
    frac = torch.bincount(labels, minlength=3).double() / x.shape[0]
    assert torch.allclose(frac, gmm.weights, atol=0.015)


def test_bad_gmm_parameters():
    with pytest.raises(ProReflowError):
        GaussianMixture(torch.zeros(3), 1.0)
    with pytest.raises(ProReflowError):
        GaussianMixture(torch.zeros(2, 2), -1.0)
    with pytest.raises(ProReflowError):
        GaussianMixture(torch.zeros(2, 2), 1.0, torch.tensor([1.0, -1.0]))
    with pytest.raises(ProReflowError, match="shape"):
        GaussianMixture.ring(4).velocity(torch.zeros(5, 3), 0.5)


def test_ring_geometry():
    g = GaussianMixture.ring(4, radius=2.0, std=0.1)
    assert torch.allclose(g.means.norm(dim=1), torch.full((4,), 2.0, dtype=torch.float64))
    assert math.isclose(float(g.weights.sum()), 1.0)

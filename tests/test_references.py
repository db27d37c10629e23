"""The smallest convention errors, each caught by a test of the function that makes it, against a reference that
does not share our code: closed forms for the cosine, diffusers' own `add_noise` / `get_velocity` for the model
output -> velocity conversions (issue 27: a negated cosine and a sign flip in a conversion passed every test that
built its expectation from our own helpers)."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from proreflow.errors import ProReflowError
from proreflow.fields.vp import VPSchedule, VPVelocity, output_to_velocity
from proreflow.losses import aligned_loss, cosine_per_sample


def test_cosine_per_sample_has_its_closed_form_values():
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    at60 = torch.tensor([0.5, math.sqrt(3) / 2, 0.0])
    pred = torch.stack([e1, e1, e1, 3 * e1, at60]).reshape(5, 3, 1)  # (B, ...) shapes are flattened per sample
    target = torch.stack([e1, e2, -e1, e1, e1]).reshape(5, 3, 1)
    got = cosine_per_sample(pred, target)
    assert got.shape == (5,)
    assert got.tolist() == pytest.approx([1.0, 0.0, -1.0, 1.0, 0.5], abs=1e-6)
    # the direction term of the aligned loss is mean(1 - cos): here (0 + 1 + 2 + 0 + 0.5) / 5
    terms = aligned_loss(pred, target, lam=2.0)
    assert float(terms.direction) == pytest.approx(3.5 / 5, abs=1e-6)
    assert float(terms.total) == pytest.approx(float(terms.mse) + 2.0 * 3.5 / 5, abs=1e-6)


@pytest.mark.parametrize("timestep", [0, 250, 749, 999])
def test_output_to_velocity_against_diffusers_noising(timestep):
    """x_tau = DDPMScheduler.add_noise(x0, eps, t); the eps model's ideal output is eps, the v model's is
    DDPMScheduler.get_velocity(x0, eps, t). Both must convert to our velocity eps - x0."""
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    gen = torch.Generator().manual_seed(timestep)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    ts = torch.full((3,), timestep)
    x_tau = sched.add_noise(x0, eps, ts)
    ac = sched.alphas_cumprod[ts]
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    want = eps - x0
    assert torch.allclose(output_to_velocity(eps, x_tau, alpha, sigma, "epsilon"), want, atol=2e-4, rtol=1e-4)
    v = sched.get_velocity(x0, eps, ts)
    assert torch.allclose(output_to_velocity(v, x_tau, alpha, sigma, "v_prediction"), want, atol=2e-4, rtol=1e-4)


def test_vp_velocity_of_an_oracle_network_is_the_straight_path_velocity():
    """A network that knows the one data point x0 predicts eps exactly: (x_tau - alpha x0) / sigma. Wrapped by
    VPVelocity at a flow time t that falls on a timestep, its velocity at y = (1 - t) x0 + t eps is eps - x0
    (the flow's path velocity), with y -> x_tau = (alpha + sigma) y as diffusers' schedule defines alpha, sigma."""
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    vp = VPSchedule.from_scheduler(sched)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 4, 4, generator=gen, dtype=torch.float64), torch.randn(1, 4, 4, 4, generator=gen,
                                                                                       dtype=torch.float64)
    ac = sched.alphas_cumprod.double()

    class Oracle(torch.nn.Module):
        def forward(self, x_tau, timestep, encoder_hidden_states=None, **kw):
            a, s = ac[timestep.long()].sqrt(), (1 - ac[timestep.long()]).sqrt()
            return ((x_tau - a.view(-1, 1, 1, 1) * x0) / s.view(-1, 1, 1, 1),)

    field = VPVelocity(Oracle(), vp)
    for timestep in (10, 500, 999):
        a, s = ac[timestep].sqrt(), (1 - ac[timestep]).sqrt()
        t = s / (a + s)
        y = (1 - t) * x0 + t * eps
        v = field(y, t.reshape(1), None)
        assert torch.allclose(v, eps - x0, atol=1e-4), timestep


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_weight_turns_a_velocity_mse_into_the_networks_own_output_mse(prediction_type):
    """Closed forms of VPVelocity.loss_weight: v = A * output + B * x with A = (alpha + sigma) / alpha for eps and
    alpha + sigma for v, so the weight 1 / A^2 is (1 - t)^2 for eps (alpha / (alpha + sigma) = 1 - t, whatever the
    schedule) and 1 / (alpha + sigma)^2 for v; SD1.5's values at timesteps 999 and 249 are 0.0041 and 0.349 (eps).
    And the weighted velocity MSE of two outputs equals the MSE of the outputs themselves."""
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    vp = VPSchedule.from_scheduler(sched)
    ac = sched.alphas_cumprod.double()[[999, 749, 249]]
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    t = sigma / (alpha + sigma)  # flow time of those three timesteps
    field = VPVelocity(torch.nn.Identity(), vp, prediction_type=prediction_type)
    got = field.loss_weight(t)
    want = (1 - t) ** 2 if prediction_type == "epsilon" else 1 / (alpha + sigma) ** 2
    assert got.double().tolist() == pytest.approx(want.tolist(), rel=1e-4)
    if prediction_type == "epsilon":
        assert [round(float(w), 4) for w in got[[0, 2]]] == [0.0041, 0.3488]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64)
    o1, o2 = torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64), torch.randn(3, 4, 2, 2, generator=gen,
                                                                                      dtype=torch.float64)
    a, s = alpha[:, None, None, None], sigma[:, None, None, None]
    v1 = output_to_velocity(o1, x * (a + s), a, s, prediction_type)
    v2 = output_to_velocity(o2, x * (a + s), a, s, prediction_type)
    per_v = ((v1 - v2) ** 2).mean((1, 2, 3))
    assert (got.double() * per_v).tolist() == pytest.approx(((o1 - o2) ** 2).mean((1, 2, 3)).tolist(), rel=1e-4)


def test_aligned_loss_normalises_the_sample_weights_and_leaves_the_direction_unweighted():
    """MSE = sum(w_i e_i) / sum(w_i) with e_i sample i's mean squared error (so scaling w changes nothing); the
    direction term is the plain mean of 1 - cos, written out here for two samples."""
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    e = [(1 + 1) / 2, (0 + 1) / 2]  # per-sample MSE: 1.0 and 0.5
    w = torch.tensor([1.0, 3.0])
    for scale in (1.0, 10.0):
        terms = aligned_loss(pred, target, lam=0.5, weight=w * scale)
        assert float(terms.mse) == pytest.approx((1 * e[0] + 3 * e[1]) / 4)
        assert float(terms.direction) == pytest.approx(((1 - 0) + (1 - 1)) / 2)  # cos 0 and cos 1
        assert float(terms.total) == pytest.approx((1 * e[0] + 3 * e[1]) / 4 + 0.5 * 0.5)
    assert float(aligned_loss(pred, target, lam=0.0).mse) == pytest.approx((e[0] + e[1]) / 2)


@pytest.mark.parametrize("lam, weighting", [(0.0, "velocity"), (2.5, "velocity"), (2.5, "output")])
def test_the_recipe_loss_passes_lambda_and_the_weighting_through(lam, weighting):
    from proreflow.methods import MethodSpec
    from proreflow.training import Recipe

    loss = Recipe(MethodSpec("m", lam=lam, loss_weighting=weighting), 10).loss
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    w = torch.tensor([1.0, 3.0])
    terms = loss(pred, target, w)
    mse = (1.0 + 3 * 0.5) / 4 if weighting == "output" else (1.0 + 0.5) / 2  # the velocity MSE ignores the weight
    assert float(terms.mse) == pytest.approx(mse)
    assert float(terms.total) == pytest.approx(mse + lam * 0.5)


def test_vp_coordinates_and_output_gain_in_closed_form():
    """alpha = 0.6, sigma = 0.8 (alpha^2 + sigma^2 = 1): y = x / 1.4, t = 0.8 / 1.4, and the velocity's gain on
    an output error is 1.4 / 0.6 for eps, 1.4 for v, 1 for flow, written out by hand."""
    from proreflow.conventions import check_prediction_type, flow_of_vp, output_gain, vp_of_flow

    a, s = torch.tensor([0.6], dtype=torch.float64), torch.tensor([0.8], dtype=torch.float64)
    x = torch.tensor([[1.4, -2.8]], dtype=torch.float64)
    y, t = flow_of_vp(x, a, s)
    assert y.flatten().tolist() == pytest.approx([1.0, -2.0]) and t.flatten().tolist() == pytest.approx([0.8 / 1.4])
    assert torch.allclose(vp_of_flow(y, a, s), x)
    gains = {p: float(output_gain(a, s, p)) for p in ("epsilon", "v_prediction", "flow")}
    assert gains == pytest.approx({"epsilon": 1.4 / 0.6, "v_prediction": 1.4, "flow": 1.0})
    # the gain is what an output error does to the velocity: v(o + d) - v(o) = gain * d
    for p, g in gains.items():
        d = output_to_velocity(torch.ones_like(x), x, a, s, p) - output_to_velocity(torch.zeros_like(x), x, a, s, p)
        assert d.flatten().tolist() == pytest.approx([g, g]), p
    with pytest.raises(ProReflowError, match="unknown prediction_type 'sample'"):
        check_prediction_type("sample")

"""How the velocity MSE counts each sample (`MethodSpec.loss_weighting`), against closed forms.

An eps student's velocity is v = eps - x0 with x0 = (x - sigma eps) / alpha, so dv/d eps = (alpha + sigma) / alpha:
the `output` weighting (alpha / (alpha + sigma))^2 makes the velocity MSE the eps MSE. At SD's noisiest timestep
that weight is 0.0041 against 0.35 at timestep 249, which leaves a 4-step student's first window all but untrained
(benchmarks/results/mini_sd_windows.md); `velocity` drops it.
"""

import pytest
import torch
from diffusers import DDIMScheduler

from proreflow.config import from_dict
from proreflow.errors import ProReflowError
from proreflow.fields.vp import VPSchedule, VPVelocity, output_to_velocity
from proreflow.methods import MethodSpec
from proreflow.training import Recipe


def _sd15():
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_output_weight_is_the_closed_form_at_integer_timesteps(prediction_type):
    ddim = _sd15()
    ac = ddim.alphas_cumprod.double()
    taus = torch.tensor([0, 249, 499, 749, 999])
    a, s = ac[taus].sqrt(), (1 - ac[taus]).sqrt()
    vp = VPSchedule.from_scheduler(ddim)
    field = VPVelocity(torch.nn.Identity(), vp, prediction_type)
    got = field.loss_weight((s / (a + s)).float()).double()
    # eps: dv/d eps = (a + s) / a; v-prediction: x0 = a x - s out, eps = s x + a out, dv/d out = a + s
    want = (a / (a + s)) ** 2 if prediction_type == "epsilon" else 1 / (a + s) ** 2
    assert torch.allclose(got, want, rtol=1e-5)
    if prediction_type == "epsilon":  # SD1.5's numbers, quoted in the docs and the test's docstring
        assert float(got[-1]) == pytest.approx(0.0041, abs=1e-4) and float(got[1]) == pytest.approx(0.349, abs=2e-3)


def test_output_weight_turns_a_velocity_error_into_the_eps_error():
    """Perturb eps by d: the velocity moves by d (a + s) / a, and weight * |dv|^2 == |d|^2."""
    ddim = _sd15()
    vp = VPSchedule.from_scheduler(ddim)
    field = VPVelocity(torch.nn.Identity(), vp, "epsilon")
    gen = torch.Generator().manual_seed(0)
    x, eps, d = (torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64) for _ in range(3))
    tau = torch.tensor([999.0, 600.0, 50.0], dtype=torch.float64)
    a, s = vp.alpha_sigma(tau)
    dv = output_to_velocity(eps + d, x, a, s, "epsilon") - output_to_velocity(eps, x, a, s, "epsilon")
    w = field.loss_weight(vp.t_of_timestep(tau).float()).double()
    per_dv = dv.pow(2).flatten(1).mean(1)
    assert torch.allclose(w * per_dv, d.pow(2).flatten(1).mean(1), rtol=1e-5)


@pytest.mark.parametrize("weighting", ["output", "velocity"])
def test_recipe_loss_uses_the_weight_only_under_output_weighting(weighting):
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 3, 5, generator=gen), torch.randn(4, 3, 5, generator=gen)
    w = torch.tensor([0.004, 0.04, 0.15, 0.35])
    lam = 0.7
    recipe = Recipe(MethodSpec("m", windows=[4], lam=lam, loss_weighting=weighting), 10)
    got = recipe.loss(pred, target, w)
    per = (pred - target).pow(2).flatten(1).mean(1)
    mse = float((w * per).sum() / w.sum()) if weighting == "output" else float(per.mean())
    cos = torch.nn.functional.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1)
    assert float(got.mse) == pytest.approx(mse, rel=1e-6)
    assert float(got.total) == pytest.approx(mse + lam * float((1 - cos).mean()), rel=1e-6)


def test_loss_weighting_is_validated_keyed_and_read_from_yaml():
    with pytest.raises(ProReflowError, match="loss_weighting"):
        MethodSpec("m", loss_weighting="eps")
    plain, eps = MethodSpec("m", windows=[4]), MethodSpec("m", windows=[4], loss_weighting="output")
    assert plain.loss_weighting == "velocity"  # the default
    # the default key is the one earlier releases wrote (flow students, which have no weight, train alike), so
    # their cached students stay valid; the output weighting keys apart
    assert len(plain.plan_key(4)) == 5 and plain.plan_key(4) != eps.plan_key(4)
    assert from_dict(MethodSpec, {"name": "m", "loss_weighting": "output"}).loss_weighting == "output"
    assert Recipe(eps, 10).describe(4)["loss_weighting"] == "output"
    assert "loss_weighting" not in Recipe(plain, 10).describe(4)


def _top_window_error(student, pairs, cond):
    """Mean squared endpoint error of one Euler step over each top-window pair (what the 4-step sampler does)."""
    top = pairs.t_a == pairs.t_a.max()
    with torch.no_grad():
        v = student(pairs.x_a[top], pairs.t_a[top], {k: c[top] for k, c in cond.items()})
    end = pairs.x_a[top] + (pairs.t_b[top] - pairs.t_a[top]).view(-1, 1, 1, 1) * v
    return float((end - pairs.x_b[top]).pow(2).mean())


def test_output_weighting_leaves_an_eps_students_first_window_untrained_and_velocity_weighting_trains_it():
    """The bug the mini SD measured (benchmarks/results/mini_sd_windows.md): with eps-space MSE the first of 4
    windows weighs 0.004 against 0.35 for the last, so training barely moves that window's one-step error; with the
    velocity MSE it falls like the others. Tiny random eps UNet as teacher, its own copy as student, fixed pairs at
    the window starts (the sampler's points), the training loss of `Recipe.loss`, 40 Adam steps at 1e-4, no direction term. Measured (seeds 0-2): the
    top window's error falls to 0.038-0.042 of its start with output weighting, 0.011-0.013 with velocity."""
    import copy

    from proreflow.fields import trailing_grid
    from proreflow.models.sd_shapes import tiny_unet
    from proreflow.pairs import TeacherSolver, make_window_pairs
    from proreflow.schedulers.proreflow import timestep_windows

    torch.manual_seed(0)
    ddim = _sd15()
    teacher = VPVelocity(tiny_unet().eval(), VPSchedule.from_scheduler(ddim)).requires_grad_(False)
    windows = timestep_windows(ddim.config, 4)
    gen = torch.Generator().manual_seed(0)
    n = 32
    x0 = torch.randn(n, 4, 8, 8, generator=gen) * 0.5
    cond = {"encoder_hidden_states": torch.randn(n, 5, 16, generator=gen)}
    solver = TeacherSolver("euler", 8, mode="placed").placed_at(trailing_grid(teacher.schedule, 8))  # DDIM-8
    pairs = make_window_pairs(teacher, x0, windows, solver, generator=gen, cond=cond,
                              windows=torch.arange(n) % 4)
    ratios = {}
    for weighting in ("output", "velocity"):
        student = copy.deepcopy(teacher).requires_grad_(True)
        before = _top_window_error(student, pairs, cond)
        opt = torch.optim.Adam(student.parameters(), lr=1e-4)
        loss = Recipe(MethodSpec("m", windows=[4], loss_weighting=weighting), 40).loss
        for _ in range(40):
            terms = loss(student(pairs.x_a, pairs.t_a, cond), pairs.target(), student.loss_weight(pairs.t_a))
            opt.zero_grad()
            terms.total.backward()
            opt.step()
        ratios[weighting] = _top_window_error(student, pairs, cond) / before
    assert ratios["velocity"] < 0.5 * ratios["output"], ratios

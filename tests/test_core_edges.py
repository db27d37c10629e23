"""Edge cases of the algorithm core at their exact boundaries: float64 inputs that float32 could not carry, values
outside clamped ranges, comparisons fed their boundary value, and each bad input of a validation on its own."""

import json
import math
import re

import pytest
import torch
from diffusers import DDIMScheduler

from proreflow.cond import flatten_cond, unflatten_cond
from proreflow.errors import ProReflowError
from proreflow.fields.gmm import ExactTeacher, GaussianMixture
from proreflow.fields.vp import VPSchedule, VPVelocity
from proreflow.losses import aligned
from proreflow.methods import MethodSpec
from proreflow.pairs import PairCache, TeacherSolver
from proreflow.solvers import solve, step
from proreflow.time_sampling import TimeSampling
from proreflow.training.recipe import Recipe
from proreflow.windows import ProgressivePlan, Stage, WindowSchedule

GMM = GaussianMixture.ring(4, 2.0, 0.3)


def _sd_schedule():
    """SD1.5's DDIM schedule (scaled_linear, 0.00085 to 0.012, 1000 steps)."""
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False)


# --- cond.flatten_cond / unflatten_cond ---------------------------------------------------------------------------

def test_flatten_cond_refuses_keys_with_a_dot():
    with pytest.raises(ProReflowError, match="may not contain '.'"):
        flatten_cond({"text.embeds": torch.zeros(2)})
    assert set(flatten_cond({"text_embeds": torch.zeros(2)})) == {"cond.text_embeds"}


def test_unflatten_cond_rebuilds_nested_dicts_from_dotted_keys():
    a, b, c = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0])
    flat = {"cond.added.text_embeds": a, "cond.added.time_ids": b, "cond.ehs": c, "x_a": torch.zeros(1)}
    out = unflatten_cond(flat)
    assert list(out) == ["added", "ehs"] and list(out["added"]) == ["text_embeds", "time_ids"]
    assert out["added"]["text_embeds"] is a and out["added"]["time_ids"] is b and out["ehs"] is c
    deep = unflatten_cond({"cond.u.v.w": a})
    assert set(deep) == {"u"} and set(deep["u"]) == {"v"} and deep["u"]["v"]["w"] is a


# --- windows.WindowSchedule ---------------------------------------------------------------------------------------

def test_window_lengths_are_float64_differences_of_thirds():
    sched = WindowSchedule((1.0, 2 / 3, 1 / 3, 0.0))
    lengths = sched.lengths()
    assert lengths.dtype == torch.float64
    want = torch.tensor([1.0 - 2 / 3, 2 / 3 - 1 / 3, 1 / 3 - 0.0], dtype=torch.float64)  # Python float64 arithmetic
    assert torch.equal(lengths, want)


def test_window_index_resolves_float64_times_within_1e12_of_a_third():
    sched = WindowSchedule((1.0, 2 / 3, 1 / 3, 0.0))
    # float32 rounds 1/3 and 2/3 up by ~1e-8, which would put these just-above-boundary times one window lower
    t = torch.tensor([1 / 3 + 1e-12, 2 / 3 + 1e-12, 1 / 3 - 1e-12], dtype=torch.float64)
    assert sched.window_index(t).tolist() == [1, 0, 2]


def test_window_index_puts_a_boundary_time_in_the_window_it_ends():
    sched = WindowSchedule((1.0, 2 / 3, 1 / 3, 0.0))  # window i is (t_{i+1}, t_i]
    t = torch.tensor([1.0, 2 / 3, 1 / 3, 0.0], dtype=torch.float64)
    assert sched.window_index(t).tolist() == [0, 1, 2, 2]


def test_window_index_clamps_times_outside_zero_one_to_the_end_windows():
    sched = WindowSchedule.uniform(4)
    assert sched.window_index(torch.tensor([1.5, 1.0 + 1e-6, -0.25])).tolist() == [0, 0, 3]


def test_is_refined_by_accepts_boundaries_exactly_1e7_apart():
    near_zero = WindowSchedule((1.0, 1e-7, 0.0))  # 1e-7 - 0 is exactly the tolerance
    assert near_zero.is_refined_by(WindowSchedule((1.0, 0.5, 0.0)))
    assert not WindowSchedule((1.0, 2e-7, 0.0)).is_refined_by(WindowSchedule((1.0, 0.5, 0.0)))


# --- windows.Stage / ProgressivePlan ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -3, True, 2.0, "4"])
def test_stage_refuses_each_non_positive_integer_step_count(bad):
    with pytest.raises(ProReflowError, match="positive integer number of steps"):
        Stage(WindowSchedule.uniform(1), bad)


def test_stage_accepts_one_step():
    assert Stage(WindowSchedule.uniform(1), 1).steps == 1


def test_progressive_plan_stores_its_stages_as_a_tuple():
    stages = [Stage(WindowSchedule.uniform(4), 2), Stage(WindowSchedule.uniform(2), 3)]
    plan = ProgressivePlan(stages)
    assert isinstance(plan.stages, tuple) and plan.stages == tuple(stages)
    assert plan == ProgressivePlan(tuple(stages)) and hash(plan) == hash(ProgressivePlan(tuple(stages)))
    from_gen = ProgressivePlan(s for s in stages)
    assert from_gen.total_steps == 5 and from_gen.final.num_windows == 2


def test_progressive_plan_checks_every_consecutive_pair_of_stages():
    ok = [Stage(WindowSchedule.uniform(8), 1), Stage(WindowSchedule.uniform(4), 1)]
    with pytest.raises(ProReflowError, match="stage 2 boundaries"):
        ProgressivePlan([*ok, Stage(WindowSchedule.uniform(3), 1)])  # 1/3, 2/3 are not quarters
    with pytest.raises(ProReflowError, match="stage 2 has 4 windows"):
        ProgressivePlan([*ok, Stage(WindowSchedule.uniform(4), 1)])


def test_from_window_counts_refuses_a_zero_fraction():
    with pytest.raises(ProReflowError, match="must be positive and sum to 1"):
        ProgressivePlan.from_window_counts([2, 1], 4, fractions=[0.0, 1.0])


def test_from_window_counts_refuses_fewer_steps_than_stages_with_its_own_message():
    for total in (1, 0, -2):
        with pytest.raises(ProReflowError, match="total steps must be an integer >= the number of stages"):
            ProgressivePlan.from_window_counts([4, 2], total)


@pytest.mark.parametrize("bad", [True, 2.5, "3"])
def test_from_window_counts_refuses_non_integer_totals(bad):
    with pytest.raises(ProReflowError, match="total steps must be an integer"):
        ProgressivePlan.from_window_counts([1], bad)


# --- training.recipe.Recipe ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -1, True, 3.0, "5"])
def test_recipe_refuses_each_non_positive_integer_budget(bad):
    with pytest.raises(ProReflowError, match="budget_steps must be a positive integer"):
        Recipe(MethodSpec("m"), bad)


def test_recipe_accepts_a_budget_of_one_step():
    assert Recipe(MethodSpec("m"), 1).plan(1).total_steps == 1


# --- losses.aligned -----------------------------------------------------------------------------------------------

def test_aligned_uses_the_per_sample_weight_by_default():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    w = torch.tensor([1.0, 0.0, 3.0])
    per = ((pred.double() - target.double()) ** 2).mean(1)
    want = float((w.double() * per).sum() / w.double().sum())
    assert float(aligned(0.0)(pred, target, w).total) == pytest.approx(want, rel=1e-6)
    assert float(aligned(0.0, weighted=False)(pred, target, w).total) == pytest.approx(float(per.mean()), rel=1e-6)


# --- solvers ------------------------------------------------------------------------------------------------------

def test_solve_keeps_float64_times_for_float64_states():
    x = torch.zeros(2, 3, dtype=torch.float64)
    seen = []

    def field(xx, t, cond):
        seen.append(t)
        return torch.ones_like(xx)

    out = solve(field, x, 1 / 3, 0.0, steps=1)
    assert seen[0].dtype == torch.float64 and seen[0].tolist() == [1 / 3, 1 / 3]
    assert out.dtype == torch.float64 and torch.equal(out, torch.full((2, 3), -1 / 3, dtype=torch.float64))


def test_heun_step_passes_the_conditioning_to_both_evaluations():
    x = torch.zeros(2, 2, dtype=torch.float64)
    c = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64)
    calls = []

    def field(xx, t, cond):  # a constant velocity per sample, given by the conditioning
        calls.append(cond)
        return cond

    h = torch.full((2,), -0.25, dtype=torch.float64)
    out = step(field, x, torch.ones(2, dtype=torch.float64), h, "heun", c)
    assert len(calls) == 2 and all(call is c for call in calls)
    assert torch.equal(out, -0.25 * c)  # Heun is exact on a constant field


# --- time_sampling.TimeSampling.draw ------------------------------------------------------------------------------

def test_draw_returns_float64_uniforms_when_asked():
    u = TimeSampling().draw(6, torch.Generator().manual_seed(3), dtype=torch.float64)
    want = torch.rand(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert u.dtype == torch.float64 and torch.equal(u, want)


# --- pairs.TeacherSolver ------------------------------------------------------------------------------------------

def test_placed_solver_without_a_grid_gets_the_uniform_grid():
    s = TeacherSolver("euler", 4, "placed")
    assert s.grid == (1.0, 0.75, 0.5, 0.25, 0.0)
    assert TeacherSolver("euler", 2, "placed", grid=[1, 0.5, 0]).grid == (1.0, 0.5, 0.0)  # floats, as a tuple


@pytest.mark.parametrize("steps, grid", [
    (2, (1.0, 0.6, 0.3, 0.0)),  # 4 points for 2 steps
    (2, (0.9, 0.5, 0.0)),  # does not start at 1
    (2, (1.0, 0.5, 0.1)),  # does not end at 0
    (3, (1.0, 0.3, 0.6, 0.0)),  # not decreasing in the middle
    (3, (1.0, 0.5, 0.5, 0.0)),  # a repeated point
    (3, (1.0, 0.5, 0.0, 0.0)),  # a repeated last point
])
def test_placed_solver_refuses_each_bad_grid_on_its_own(steps, grid):
    with pytest.raises(ProReflowError, match="placed teacher grid must run from 1 down to 0"):
        TeacherSolver("euler", steps, "placed", grid=grid)


@pytest.mark.parametrize("bad", [-1, True, 2.5, "8"])
def test_teacher_solver_refuses_each_bad_max_batch(bad):
    with pytest.raises(ProReflowError, match="max_batch must be an integer >= 0"):
        TeacherSolver("euler", 2, max_batch=bad)


def test_grid_in_drops_points_exactly_1e7_inside_the_window_ends():
    s = TeacherSolver("euler", 1, "grid", grid=(1.0, 1.0 - 1e-7, 0.5, 1e-7, 0.0))
    assert s.grid_in(1.0, 0.0) == [1.0, 0.5, 0.0]
    assert s.grid_in(1.0 + 1e-6, -1e-6) == [1.0 + 1e-6, 1.0, 1.0 - 1e-7, 0.5, 1e-7, 0.0, -1e-6]  # all further inside


# --- pairs.PairCache.ensure ---------------------------------------------------------------------------------------

def _data(n, gen):
    return GMM.sample(n, gen).float(), None


def test_pair_cache_manifest_records_each_shards_pair_count(tmp_path):
    cache = PairCache(tmp_path / "c")
    cache.ensure(ExactTeacher(GMM), _data, WindowSchedule.uniform(2), TeacherSolver("euler", 1), n_pairs=5,
                 shard_size=2)
    shards = json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"]
    assert {i: e["pairs"] for i, e in shards.items()} == {"0": 2, "1": 2, "2": 1}
    assert {i: e["teacher_nfe"] for i, e in shards.items()} == {"0": 2, "1": 2, "2": 1}


def test_pair_cache_progress_bar_is_labelled_teacher_pairs(tmp_path, capsys):
    PairCache(tmp_path / "c").ensure(ExactTeacher(GMM), _data, WindowSchedule.uniform(2), TeacherSolver("euler", 1),
                                     n_pairs=1, shard_size=1, progress=True)
    assert re.search(r"(^|\r)teacher pairs: ", capsys.readouterr().err)


# --- fields.vp.VPSchedule -----------------------------------------------------------------------------------------

def test_vp_schedule_refuses_a_repeated_alpha_bar():
    with pytest.raises(ProReflowError, match="must decrease"):
        VPSchedule(torch.tensor([0.9, 0.9, 0.5]))


def test_vp_schedule_refuses_alpha_bar_that_rises_after_its_first_step():
    with pytest.raises(ProReflowError, match="must decrease"):
        VPSchedule(torch.tensor([0.9, 0.5, 0.7]))  # every value below the first, but 0.5 -> 0.7 rises


def test_alpha_sigma_clamps_timesteps_outside_the_trained_range():
    sched = _sd_schedule()
    ac = sched.alphas_cumprod.double()
    vp = VPSchedule.from_scheduler(sched)
    alpha, sigma = vp.alpha_sigma(torch.tensor([-3.0, -0.5, 999.0, 999.5, 1000.0, 1004.0]))
    want_a = torch.tensor([ac[0].sqrt()] * 2 + [ac[999].sqrt()] * 4, dtype=torch.float64)
    want_s = torch.tensor([(1 - ac[0]).sqrt()] * 2 + [(1 - ac[999]).sqrt()] * 4, dtype=torch.float64)
    assert torch.allclose(alpha, want_a, rtol=1e-12, atol=0) and torch.allclose(sigma, want_s, rtol=1e-12, atol=0)


def test_timestep_of_t_is_constant_above_t_max():
    vp = VPSchedule.from_scheduler(DDIMScheduler(beta_schedule="linear", clip_sample=False, set_alpha_to_one=False))
    out = vp.timestep_of_t(torch.tensor([vp.t_max, vp.t_max + 1e-9, 1.0, 2.0, math.inf], dtype=torch.float64))
    assert float(out[0]) == pytest.approx(999.0, abs=1e-9)
    assert torch.all(out == out[0]), out.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_alpha_sigma_runs_on_the_timesteps_device():
    sched = _sd_schedule()
    vp = VPSchedule.from_scheduler(sched)
    alpha, sigma = vp.alpha_sigma(torch.tensor([0.0, 999.0], device="cuda"))
    ac = sched.alphas_cumprod.double()
    assert alpha.device.type == "cuda"
    assert torch.allclose(alpha.cpu(), ac[[0, 999]].sqrt(), rtol=1e-12, atol=0)


# --- fields.vp.VPVelocity -----------------------------------------------------------------------------------------

def _velocity_net(x, timestep, c):
    """A 'flow' network whose output (our velocity) is its conditioning `c`, whatever x and the timestep."""
    return c


def test_vp_velocity_does_not_guide_by_default():
    vp = VPSchedule.from_scheduler(_sd_schedule())
    c, c_u = torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([[0.5, -4.0], [0.0, 7.0]])
    field = VPVelocity(_velocity_net, vp, "flow")
    v = field(torch.zeros(2, 2), torch.tensor([0.3, 0.7]), {"c": c, "uncond": {"c": c_u}})
    assert torch.allclose(v, c, atol=1e-6)  # guidance scale 1: the conditional output alone
    guided = VPVelocity(_velocity_net, vp, "flow", guidance_scale=2.0)(
        torch.zeros(2, 2), torch.tensor([0.3, 0.7]), {"c": c, "uncond": {"c": c_u}})
    assert torch.allclose(guided, 2 * c - c_u, atol=1e-5)


def test_vp_velocity_returns_the_inputs_dtype_for_a_float64_network_output():
    vp = VPSchedule.from_scheduler(_sd_schedule())
    c = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    v = VPVelocity(_velocity_net, vp, "flow")(torch.zeros(2, 2), torch.tensor([0.3, 0.7]), {"c": c})
    assert v.dtype == torch.float32 and torch.allclose(v, c.float(), atol=1e-6)


# ---------------------------------------------------------------- second mutation run: the gaps it found


@pytest.mark.parametrize("method, power", [("heun", 1), ("rk4", 3)])
def test_heun_and_rk4_evaluate_the_field_at_the_right_times(method, power):
    """dx/dt = t^p integrates exactly under Heun for p = 1 (trapezoid) and RK4 for p = 3 (Simpson): each stage must be
    evaluated at t, t + h/2 and t + h. From t = 0.9 to 0.2 in 3 steps: x(0.2) = x(0.9) + (0.2^(p+1) - 0.9^(p+1))/(p+1)."""
    x = torch.tensor([[0.5], [-1.0]], dtype=torch.float64)
    field = lambda y, t, cond=None: (t ** power)[:, None].expand_as(y)  # noqa: E731
    got = solve(field, x, torch.full((2,), 0.9, dtype=torch.float64), torch.full((2,), 0.2, dtype=torch.float64), 3,
                method)
    want = x + (0.2 ** (power + 1) - 0.9 ** (power + 1)) / (power + 1)
    assert torch.allclose(got, want, atol=1e-14, rtol=0), (got - want).abs().max()


def test_solver_steps_must_be_an_integer():
    from proreflow.solvers import check_solver

    for bad in (2.5, 0, True, "2"):
        with pytest.raises((ProReflowError, TypeError)):
            check_solver("euler", bad)
    with pytest.raises(ProReflowError, match="positive integer"):
        check_solver("euler", 2.5)
    check_solver("rk4", 1)


def test_expand_time_keeps_float64_times_exact():
    from proreflow.conventions import expand_time

    like = torch.zeros(3, 2, 2, dtype=torch.float64)
    t = expand_time(0.1, like)
    assert t.dtype == torch.float64 and float(t) == 0.1  # float32 would give 0.10000000149011612
    per = expand_time([0.1, 0.2, 0.3], like)
    assert per.shape == (3, 1, 1) and per.dtype == torch.float64 and per[2, 0, 0].item() == 0.3


def test_window_schedule_stores_its_boundaries_as_a_tuple_of_floats():
    s = WindowSchedule(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    assert s.boundaries == (1.0, 0.5, 0.0) and type(s.boundaries) is tuple
    assert all(type(b) is float for b in WindowSchedule([1, 0]).boundaries)


def test_window_schedule_checks_its_last_pair_of_boundaries_too():
    with pytest.raises(ProReflowError, match="strictly decreasing"):
        WindowSchedule([1.0, 0.5, 0.0, 0.0])


def test_window_schedule_ends_within_its_tolerance_of_zero():
    from proreflow.windows import _TOL

    assert WindowSchedule([1.0, 0.5, _TOL]).boundaries[-1] == _TOL  # exactly at the tolerance: accepted
    with pytest.raises(ProReflowError, match="end at 0"):
        WindowSchedule([1.0, 0.5, 2 * _TOL])


def test_entered_at_refuses_a_boundary_at_or_just_below_the_noise_entry():
    from proreflow.windows import _TOL

    assert WindowSchedule([1.0, 0.5, 0.0]).entered_at(0.75) == (0.75, 0.5, 0.0)
    for b1 in (0.75, 0.75 - _TOL / 2, 0.75 - _TOL):  # at the entry, inside the tolerance, exactly at its edge
        with pytest.raises(ProReflowError, match="at or above the teacher's noisiest time"):
            WindowSchedule([1.0, b1, 0.0]).entered_at(0.75)
    assert WindowSchedule([1.0, 0.75 - 2 * _TOL, 0.0]).entered_at(0.75)[0] == 0.75


def test_cosine_per_sample_passes_its_eps_to_torch():
    p = torch.tensor([[1e-3, 0.0], [3.0, 4.0]])
    q = torch.tensor([[1e-3, 1e-3], [4.0, 3.0]])
    from proreflow.losses import cosine_per_sample

    for eps in (1e-8, 1e-2):
        want = torch.nn.functional.cosine_similarity(p, q, dim=1, eps=eps)
        assert torch.allclose(cosine_per_sample(p, q, eps=eps), want, atol=1e-7)
    # a large eps shrinks the small pair's cosine (norms 1e-3 and 1.4e-3 under 1e-2); the true one is 1 / sqrt(2)
    assert cosine_per_sample(p, q, eps=1e-2)[0] < 0.1 and abs(float(cosine_per_sample(p, q)[0]) - 0.5 ** 0.5) < 1e-6


def test_a_scheduler_walk_refuses_a_timestep_off_the_next_one():
    """The step walk accepts the next timestep only within 1e-3, as the lookup does: 0.5 off, or exactly 1e-3 off
    (the last of PeRFlow's 1004 steps is 0, and 0.001 is exactly 1e-3 from it), is refused."""
    from proreflow.schedulers.perflow import PiecewiseFlowScheduler

    s = PiecewiseFlowScheduler(prediction_type="velocity")
    s.set_timesteps(8)
    x, v = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    x = s.step(v, s.timesteps[0], x).prev_sample
    with pytest.raises(ProReflowError, match="is not one of this scheduler's timesteps"):
        s.step(v, float(s.timesteps[1]) + 0.5, x)
    s.set_timesteps(1004)
    assert int(s.timesteps[-1]) == 0
    for t in s.timesteps[:-1]:
        x = s.step(v, t, x).prev_sample
    with pytest.raises(ProReflowError, match="is not one of this scheduler's timesteps"):
        s.step(v, 0.001, x)

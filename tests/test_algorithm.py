import pytest
import torch

from proreflow.conventions import chord_velocity, interpolate, path_velocity, split_velocity
from proreflow.errors import ProReflowError
from proreflow.losses import aligned_loss, cosine_per_sample, mse
from proreflow.pairs import TeacherSolver, make_window_pairs
from proreflow.sampling import sample
from proreflow.solvers import solve
from proreflow.windows import ProgressivePlan, Stage, WindowSchedule


def straight_field(target: torch.Tensor):
    """Velocity field of straight paths to fixed endpoints: v(x, t) = (x - target) / t."""
    return lambda x, t, cond=None: (x - target) / t[:, None]


def test_convention_round_trip(gen):
    x0, eps = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    t = torch.rand(5, generator=gen)
    x_t = interpolate(x0, eps, t)
    rx0, reps = split_velocity(x_t, path_velocity(x0, eps), t)
    assert torch.allclose(rx0, x0, atol=1e-6) and torch.allclose(reps, eps, atol=1e-6)
    assert torch.allclose(interpolate(x0, eps, 1.0), eps) and torch.allclose(interpolate(x0, eps, 0.0), x0)


def test_euler_is_exact_in_one_step_on_a_straight_field(gen):
    target = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    noise = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    x = sample(straight_field(target), noise, WindowSchedule.uniform(1), steps_per_window=1)
    assert torch.allclose(x, target, atol=1e-12)


def test_solver_orders_on_a_curved_field():
    """dx/dt = x on [1, 0]: x(0) = x(1) e^{-1}; errors shrink like h, h^2, h^4."""
    field = lambda x, t, cond=None: x
    x1 = torch.ones(1, 1, dtype=torch.float64)
    exact = torch.exp(torch.tensor(-1.0, dtype=torch.float64))
    errs = {}
    for method in ("euler", "heun", "rk4"):
        e = [abs(float(solve(field, x1, 1.0, 0.0, n, method)) - float(exact)) for n in (8, 16)]
        errs[method] = e[0] / e[1]
    assert 1.8 < errs["euler"] < 2.2 and 3.6 < errs["heun"] < 4.4 and 14 < errs["rk4"] < 18


def test_per_sample_intervals_match_separate_solves(gen):
    field = lambda x, t, cond=None: torch.sin(3 * x) * (1 + t[:, None])
    x = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    t0 = torch.tensor([1.0, 0.75, 0.5, 1.0, 0.25, 0.5], dtype=torch.float64)
    t1 = t0 - 0.25
    batched = solve(field, x, t0, t1, 5, "heun")
    for i in range(6):
        one = solve(field, x[i : i + 1], float(t0[i]), float(t1[i]), 5, "heun")
        assert torch.allclose(batched[i], one[0])


@pytest.mark.parametrize(
    "bounds, msg",
    [((1.0,), "at least 2"), ((0.9, 0.0), "start at 1"), ((1.0, 0.1), "end at 0"),
     ((1.0, 0.5, 0.6, 0.0), "strictly decreasing"), ((1.0, 0.5, 0.5, 0.0), "strictly decreasing"),
     ((1.0, float("nan"), 0.0), "finite")],
)
def test_window_validation(bounds, msg):
    with pytest.raises(ProReflowError, match=msg):
        WindowSchedule(bounds)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_uniform_needs_positive_int(k):
    with pytest.raises(ProReflowError):
        WindowSchedule.uniform(k)


def test_window_lookup_is_batched_and_half_open():
    s = WindowSchedule((1.0, 0.75, 0.25, 0.0))
    t = torch.tensor([1.0, 0.8, 0.75, 0.7, 0.25, 0.1, 0.0])
    assert s.window_index(t).tolist() == [0, 0, 1, 1, 2, 2, 2]  # a boundary starts the next window
    t_a, t_b = s.bounds(torch.tensor([0.5]))
    assert float(t_a) == 0.75 and float(t_b) == 0.25


def test_window_sampling_is_length_weighted(gen):
    s = WindowSchedule((1.0, 0.75, 0.25, 0.0))
    idx = s.sample_windows(40_000, gen)
    frac = torch.bincount(idx, minlength=3).double() / idx.numel()
    assert torch.allclose(frac, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64), atol=0.01)


def test_plan_stages_nest():
    plan = ProgressivePlan.from_window_counts([8, 4, 2], total_steps=100)
    assert [s.schedule.num_windows for s in plan.stages] == [8, 4, 2]
    assert plan.total_steps == 100 and [s.steps for s in plan.stages] == [33, 33, 34]
    for prev, nxt in zip(plan.stages[:-1], plan.stages[1:]):
        assert set(nxt.schedule.boundaries) <= set(prev.schedule.boundaries)
    with pytest.raises(ProReflowError, match="subset"):
        ProgressivePlan.from_window_counts([3, 2], total_steps=10)  # 1/2 is no boundary of thirds
    with pytest.raises(ProReflowError, match="fewer"):
        ProgressivePlan((Stage(WindowSchedule.uniform(2), 5), Stage(WindowSchedule.uniform(2), 5)))
    with pytest.raises(ProReflowError, match="at least one"):
        ProgressivePlan(())
    with pytest.raises(ProReflowError, match="sum to 1"):
        ProgressivePlan.from_window_counts([4, 2], 10, fractions=[0.5, 0.6])


def test_pair_targets_equal_the_chord_and_one_step_lands_on_x_b(gen):
    """x_a is data noised to the window start; x_b the teacher's ODE solution; target is the chord."""
    from proreflow.fields.gmm import GaussianMixture

    gmm = GaussianMixture.ring(4, 2.0, 0.3)
    x0 = gmm.sample(256, gen)
    sched = WindowSchedule.uniform(4)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    windows = sched.sample_windows(256, gen)
    pairs = make_window_pairs(gmm.velocity, x0, sched, TeacherSolver("rk4", 8), windows=windows, noise=noise)
    assert torch.allclose(pairs.x_a, interpolate(x0, noise, sched.starts(dtype=torch.float64)[windows]))
    fine = solve(gmm.velocity, pairs.x_a, pairs.t_a, pairs.t_b, 8, "rk4")
    assert torch.allclose(pairs.x_b, fine)
    v = pairs.target()
    assert torch.allclose(v, chord_velocity(pairs.x_a, pairs.x_b, pairs.t_a, pairs.t_b))
    assert torch.allclose(pairs.x_a + (pairs.t_b - pairs.t_a)[:, None] * v, pairs.x_b)
    # training points lie on the chord, inside the window, t = t_a at u = 0
    u = torch.rand(256, generator=gen, dtype=torch.float64)
    x_t, t = pairs.point(u)
    assert torch.all(t <= pairs.t_a) and torch.all(t > pairs.t_b)
    assert torch.allclose(x_t, pairs.x_a + (t - pairs.t_a)[:, None] * v)
    assert pairs.teacher_nfe == 256 * 8 * 4 and pairs.nfe_per_pair == 32
    # a window starting at t = 1 starts from pure noise
    first = windows == 0
    assert torch.allclose(pairs.x_a[first], noise[first])


def test_per_unit_time_solver_costs_scale_with_window_length(gen):
    field = lambda x, t, cond=None: -x
    x0 = torch.randn(1000, 2, generator=gen)
    solver = TeacherSolver("euler", 8, mode="per_unit_time")
    glob = make_window_pairs(field, x0, WindowSchedule.uniform(1), solver, generator=gen)
    local = make_window_pairs(field, x0, WindowSchedule.uniform(4), solver, generator=gen)
    assert glob.nfe_per_pair == 8 and local.nfe_per_pair == 2
    with pytest.raises(ProReflowError):
        TeacherSolver("midpoint", 4)
    with pytest.raises(ProReflowError):
        TeacherSolver("rk4", 0)


def test_aligned_loss_reduces_to_mse_and_its_gradient_shrinks_the_angle(gen):
    pred = torch.randn(16, 5, generator=gen, requires_grad=True)
    target = torch.randn(16, 5, generator=gen)
    terms0 = aligned_loss(pred, target, lam=0.0)
    assert torch.equal(terms0.total, mse(pred, target))
    # a pure direction step (lam large, tiny MSE weight): follow -grad of (1 - cos) and the angle shrinks
    d = torch.mean(1 - cosine_per_sample(pred, target))
    (g,) = torch.autograd.grad(d, pred)
    with torch.no_grad():
        after = torch.mean(1 - cosine_per_sample(pred - 0.5 * g, target))
    assert after < d - 1e-4
    # the aligned gradient differs from the MSE gradient only by lam times the direction gradient
    lam = 0.7
    (ga,) = torch.autograd.grad(aligned_loss(pred, target, lam).total, pred)
    (gm,) = torch.autograd.grad(mse(pred, target), pred)
    assert torch.allclose(ga, gm + lam * g, atol=1e-6)
    # scaling the prediction does not change the direction term
    assert torch.allclose(aligned_loss(3 * pred, target, 1.0).direction, terms0.direction)
    with pytest.raises(ProReflowError):
        aligned_loss(pred, target[:, :2], 1.0)
    with pytest.raises(ProReflowError):
        aligned_loss(pred, target, -1.0)


def test_teacher_max_batch_chunks_calls_without_changing_pairs():
    from proreflow.fields.gmm import GaussianMixture

    gmm = GaussianMixture.ring(8, 3.0, 0.3)
    sizes = []

    def teacher(x, t, cond=None):
        sizes.append(x.shape[0])
        assert cond["id"].shape[0] == x.shape[0]  # conditioning is cut with its rows
        return gmm.velocity(x.double(), t.double()).float()

    x0 = gmm.sample(300, torch.Generator().manual_seed(0)).float()
    cond = {"id": torch.arange(300).float()}
    kw = dict(schedule=WindowSchedule.uniform(4), cond=cond)
    whole = make_window_pairs(teacher, x0, solver=TeacherSolver("rk4", 8, "per_unit_time"),
                              generator=torch.Generator().manual_seed(1), **kw)
    sizes.clear()
    parts = make_window_pairs(teacher, x0, solver=TeacherSolver("rk4", 8, "per_unit_time", max_batch=32),
                              generator=torch.Generator().manual_seed(1), **kw)
    assert max(sizes) == 32 and torch.allclose(whole.x_b, parts.x_b, atol=1e-6)
    assert whole.teacher_nfe == parts.teacher_nfe
    with pytest.raises(ProReflowError, match="max_batch"):
        TeacherSolver(max_batch=-1)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), True, "1"])
def test_every_entry_point_refuses_a_bad_direction_weight(bad):
    from proreflow.losses import aligned
    from proreflow.methods import MethodSpec

    x = torch.ones(2, 3)
    for call in (lambda: aligned_loss(x, x, bad), lambda: aligned(bad), lambda: MethodSpec("m", lam=bad)):
        with pytest.raises(ProReflowError, match="lam.* must be a finite number >= 0"):
            call()
    assert aligned_loss(x, x, 0).total.item() == 0.0 and aligned(2)(x, -x, None).total.item() == pytest.approx(4.0 + 2 * 2)

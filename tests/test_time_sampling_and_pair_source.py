"""Where training points sit on a chord (time sampling), m*K-step sampling, and previous-stage pairs."""

import pytest
import torch

import proreflow.training as training
from proreflow.errors import ProReflowError
from proreflow.fields.gmm import GaussianMixture
from proreflow.methods import MethodSpec
from proreflow.models.mlp import VelocityMLP
from proreflow.pairs import TeacherSolver, grid_solver, make_window_pairs
from proreflow.sampling import sample
from proreflow.solvers import solve
from proreflow.time_sampling import TimeSampling
from proreflow.training import Recipe, TrainConfig, reflow_batches, train_plan
from proreflow.windows import WindowSchedule

GMM = GaussianMixture.ring(4, 2.0, 0.3)


def _data_fn(n, gen):
    return GMM.sample(n, gen).float(), None


def _teacher(x, t, cond=None):
    return GMM.velocity(x.double(), t.double()).to(x.dtype)


def _params_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _cfg(**kw):
    return TrainConfig(**{**dict(lr=2e-3, batch_size=64, ema_decay=0.9, progress=False, seed=3), **kw})


def _u(rule, n=20000, **kw):
    return TimeSampling(rule, **kw).draw(n, torch.Generator().manual_seed(0))


def test_uniform_rule_spans_the_window_up_to_the_margin():
    u = _u("uniform", margin=0.25)
    assert float(u.min()) >= 0 and float(u.max()) < 0.75 and float(u.max()) > 0.74
    assert abs(float(u.mean()) - 0.375) < 0.01


def test_start_rule_puts_every_point_at_the_window_start():
    assert torch.equal(_u("start"), torch.zeros(20000))


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_mixture_puts_a_fraction_p_at_the_start_and_the_rest_uniform(p):
    u = _u("mixture", start_fraction=p, margin=0.1)
    at_start = float((u == 0).float().mean())
    assert abs(at_start - p) < 0.015
    rest = u[u > 0]
    if p < 1:
        assert float(rest.max()) < 0.9 and abs(float(rest.mean()) - 0.45) < 0.01


def test_uniform_rule_draws_what_the_margin_rule_drew_before():
    """`uniform` consumes the generator exactly as the old `margin` code (results stay reproducible)."""
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(TimeSampling("uniform", margin=0.1).draw(64, gen_a), torch.rand(64, generator=gen_b) * 0.9)


@pytest.mark.parametrize("bad", [dict(rule="middle"), dict(start_fraction=1.5), dict(start_fraction=-0.1),
                                 dict(margin=1.0), dict(margin=float("nan"))])
def test_bad_time_sampling_is_a_clear_error(bad):
    with pytest.raises(ProReflowError):
        TimeSampling(**bad)


def test_start_rule_batches_train_exactly_at_window_starts_on_the_chord_target():
    schedule = WindowSchedule.uniform(4)
    batch = reflow_batches(_teacher, _data_fn, schedule, TeacherSolver("euler", 4), 256,
                           TimeSampling("start"))(0, torch.Generator().manual_seed(0), slice(None))
    assert set(batch.t.tolist()) == {1.0, 0.75, 0.5, 0.25}  # every window start, nothing else
    # the batch's data and noise are the generator's first draws (data, then noise), so the reference is written out
    gen = torch.Generator().manual_seed(0)
    x0, _ = _data_fn(256, gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = batch.t[:, None]
    # the point is the data noised to its window start on the straight path (pure noise at t = 1), not a teacher output
    assert torch.equal(batch.x[batch.t == 1.0], noise[batch.t == 1.0])
    assert torch.allclose(batch.x, (1 - t) * x0 + t * noise, atol=1e-6)
    # the target is the chord of the teacher's 4 Euler steps across the window, written out here
    x, h = batch.x.double(), 0.25 / 4
    for i in range(4):
        x = x - h * GMM.velocity(x, (batch.t - i * h).double())
    assert torch.allclose(batch.target.double(), (batch.x.double() - x) / 0.25, atol=1e-5)
    assert batch.teacher_nfe == 256 * 4


def test_method_recipe_resolves_time_sampling_and_keys_students_by_it():
    default = TimeSampling("uniform", margin=0.1)
    plain = MethodSpec("perflow", windows=["k"])
    start = MethodSpec("perflow-start", windows=["k"], time_sampling=TimeSampling("start"))
    assert plain.sampling(default) == default and start.sampling(default).rule == "start"
    assert plain.plan_key(4, default) != start.plan_key(4, default)
    prev = MethodSpec("p", windows="8->k", pair_source="previous_stage")
    assert prev.plan_key(4) != MethodSpec("p", windows="8->k").plan_key(4)
    with pytest.raises(ProReflowError, match="pair_source"):
        MethodSpec("p", pair_source="student")
    with pytest.raises(ProReflowError, match="lam"):
        MethodSpec("p", lam=float("nan"))


def test_one_step_plan_halves_down_to_a_single_window():
    """ProReflow-III: 8 -> 4 -> 2 -> 1 windows for a one-step student."""
    plan = MethodSpec("proreflow", windows="8->k", lam=1.0).plan(1, 40)
    assert [s.schedule.num_windows for s in plan.stages] == [8, 4, 2, 1] and plan.total_steps == 40


@pytest.mark.parametrize("m", [1, 2, 3])
def test_k_window_sampler_at_m_steps_per_window_is_m_k_uniform_euler_steps(m):
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    windowed = sample(_teacher, noise, WindowSchedule.uniform(2), steps_per_window=m)
    flat = solve(_teacher, noise, 1.0, 0.0, 2 * m, "euler")
    assert torch.allclose(windowed, flat, atol=1e-12)


def test_grid_solver_steps_once_per_sub_window_and_counts_its_evaluations():
    solver = grid_solver(WindowSchedule.uniform(4))
    calls = []

    def field(x, t, cond=None):
        calls.append(sorted(set(t.tolist())))
        return torch.zeros_like(x)

    x0 = torch.zeros(6, 2, dtype=torch.float64)
    pairs = make_window_pairs(field, x0, WindowSchedule.uniform(2), solver, windows=torch.tensor([0, 0, 0, 1, 1, 1]),
                              noise=torch.ones(6, 2, dtype=torch.float64))
    assert pairs.teacher_nfe == 6 * 2
    # both windows take 2 grid steps, so each step is one call on the whole batch, every sample at its own
    # window's grid point: first the starts (1 and 0.5), then the sub-window starts (0.75 and 0.25)
    assert calls == [[0.5, 1.0], [0.25, 0.75]]
    with pytest.raises(ProReflowError, match="grid"):
        TeacherSolver("euler", 1, "grid")


def test_previous_stage_pairs_from_exact_sub_window_chords_equal_the_teachers_pairs():
    """A stage-(k-1) field that returns each sub-window's exact chord, stepped once per sub-window,
    lands where the teacher's ODE over the wide window lands (exact GMM teacher, float64)."""
    fine, wide = WindowSchedule.uniform(4), WindowSchedule.uniform(2)
    steps = 64  # rk4 per unit time: the fine and wide solves use the same step grid

    def chord_field(x, t, cond=None):
        t_end = t - 0.25  # every evaluation is at a sub-window start (one step per sub-window)
        x_end = solve(_teacher, x, t, t_end, steps // 4, "rk4")
        return (x - x_end) / (t - t_end)[:, None]

    gen = torch.Generator().manual_seed(0)
    x0, noise = GMM.sample(200, gen), torch.randn(200, 2, generator=gen, dtype=torch.float64)
    windows = torch.randint(0, 2, (200,), generator=gen)
    teacher_pairs = make_window_pairs(_teacher, x0, wide, TeacherSolver("rk4", steps, "per_unit_time"),
                                      windows=windows, noise=noise)
    student_pairs = make_window_pairs(chord_field, x0, wide, grid_solver(fine), windows=windows, noise=noise)
    assert torch.equal(teacher_pairs.x_a, student_pairs.x_a)
    assert torch.allclose(teacher_pairs.x_b, student_pairs.x_b, atol=1e-9)
    assert student_pairs.teacher_nfe == 200 * 2  # two student steps per pair instead of 32 rk4 stages


def test_previous_stage_plan_takes_stage_two_pairs_from_a_frozen_copy_of_stage_one(monkeypatch):
    sources = []
    real = training.reflow_batches

    def spy(source, data_fn, schedule, solver, batch_size, sampling, memo=None):
        sources.append((source, solver))
        return real(source, data_fn, schedule, solver, batch_size, sampling, memo)

    monkeypatch.setattr(training.plan, "reflow_batches", spy)
    torch.manual_seed(0)
    method = MethodSpec("p", windows=[4, 2], lam=0.0, pair_source="previous_stage", time_sampling=TimeSampling("start"))
    recipe = Recipe(method, 6, teacher_solver=TeacherSolver("rk4", 4), train=_cfg())
    plan = recipe.plan(2)
    res = train_plan(VelocityMLP(2, 16, 2), _teacher, _data_fn, recipe, 2)
    assert sources[0][0] is _teacher and sources[0][1].mode == "per_window"
    frozen, solver = sources[1]
    assert frozen is not res.stages[0].model and not any(p.requires_grad for p in frozen.parameters())
    assert _params_equal(frozen, res.stages[0].model)
    assert solver.mode == "grid" and solver.grid == plan.stages[0].schedule.boundaries
    assert res.sources == ["teacher", "previous_stage"]
    # stage 1: 16 teacher evaluations per pair (rk4 x 4); stage 2: 2 student steps per pair
    assert res.nfe_per_pair == pytest.approx(16 / 2) and res.student_nfe_per_pair == pytest.approx(2 / 2)
    with pytest.raises(ProReflowError, match="pair_source"):
        MethodSpec("p", windows=[4, 2], pair_source="x")


def test_start_sampling_trains_a_windowed_student_where_the_sampler_looks():
    """The mechanism behind the default: on the exact GMM, a 4-window student trained only at window
    starts is closer to the teacher at 4 steps than one trained at uniform points, from the same init
    and budget."""
    from proreflow.metrics import fidelity_rmse
    from proreflow.training import fit, flow_matching_batches

    torch.manual_seed(0)
    base = fit(VelocityMLP(2, 64, 3), flow_matching_batches(_data_fn, 256, _teacher), 400, _cfg(lr=3e-3)).model
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(9))
    reference = sample(_teacher, noise, WindowSchedule.uniform(1), 64, method="rk4")
    scores = {}
    for rule in ("uniform", "start"):
        recipe = Recipe(MethodSpec("perflow", windows=[4], lam=0.0), 300, TimeSampling(rule), TeacherSolver("rk4", 4),
                        _cfg(lr=1e-3))
        res = train_plan(base, _teacher, _data_fn, recipe, 4)
        scores[rule] = fidelity_rmse(res.sample(noise), reference)
    assert scores["start"] < 0.8 * scores["uniform"], scores


def test_a_shorter_run_is_the_prefix_of_a_longer_one():
    """What benchmarks/budget_sweep.py relies on to score every budget of a single-stage method from one
    run: with a constant learning rate, the EMA student after B steps does not depend on the total."""
    torch.manual_seed(0)
    init = VelocityMLP(2, 16, 2)
    batches = reflow_batches(_teacher, _data_fn, WindowSchedule.uniform(2), TeacherSolver("euler", 2), 32,
                             TimeSampling("mixture", 0.5))
    short = training.fit(init, batches, 7, _cfg())
    seen = {}
    training.fit(init, batches, 15, _cfg(), on_step=lambda done, ema, res: seen.setdefault(done, ema()))
    assert _params_equal(short.model, seen[7])


def test_a_progressive_plan_from_a_longer_first_stages_snapshot_equals_the_whole_plan():
    """What budget_sweep.py relies on for progressive methods: stage 1 of budget B is the prefix of stage 1 of
    a larger budget, so training the later stages from that run's EMA snapshot gives the same student."""
    torch.manual_seed(0)
    init = VelocityMLP(2, 16, 2)
    method = MethodSpec("p", windows=[4, 2], lam=1.0, time_sampling=TimeSampling("mixture", 0.5))

    def recipe(budget):
        return Recipe(method, budget, teacher_solver=TeacherSolver("euler", 2), train=_cfg())

    whole = train_plan(init, _teacher, _data_fn, recipe(10), 2)
    assert [s.steps for s in recipe(10).plan(2).stages] == [5, 5] and recipe(24).plan(2).stages[0].steps == 12
    seen = {}
    longer = train_plan(init, _teacher, _data_fn, recipe(24), 2, stages=(0, 1),
                        on_step=lambda stage, done, ema, res: seen.setdefault(done, ema()))
    assert len(longer.stages) == 1 and len(longer.stages[0].losses) == 12
    rest = train_plan(seen[5], _teacher, _data_fn, recipe(10), 2, stages=(1, None))
    assert len(rest.stages) == 1
    assert _params_equal(whole.student, rest.student)
    with pytest.raises(ProReflowError, match="select no stage"):
        train_plan(init, _teacher, _data_fn, recipe(10), 2, stages=(2, None))


@pytest.mark.parametrize("text, expected", [("start", {"rule": "start"}), ("uniform", {"rule": "uniform"}),
                                            ("mixture", {"rule": "mixture"}),
                                            ("mixture:0.25", {"rule": "mixture", "start_fraction": 0.25})])
def test_command_line_time_sampling(text, expected):
    assert TimeSampling.parse(text) == expected


@pytest.mark.parametrize("text", ["middle", "start:0.5", "mixture:x", "mixture:2"])
def test_bad_command_line_time_sampling(text):
    with pytest.raises(ProReflowError):
        TimeSampling.parse(text)


def test_command_line_rule_keeps_the_presets_margin_and_reaches_the_distill_config():
    from proreflow.apps.sd import load_distill_config
    from proreflow.apps.toy import load_config

    toy = load_config(None, time_sampling=TimeSampling.parse("mixture:0.3"))
    assert toy.time_sampling == TimeSampling("mixture", 0.3, 0.0)
    assert next(m for m in toy.methods if m.name == "2-rectified-flow").sampling(toy.time_sampling).rule == "uniform"
    sd = load_distill_config("sd15-proreflow-II", time_sampling=TimeSampling.parse("start"))
    assert sd.method.sampling(sd.time_sampling).rule == "start"


def test_plans_under_one_pair_dir_solve_the_pairs_they_share_once(tmp_path):
    """Regression (digits run time): the digits run kept a pair directory per plan, where caches were named by
    stage number, so ProReflow-I (8 -> 4), -II (8 -> 4 -> 2) and -III solved the same stage-1 and stage-2 teacher
    pairs once each. Now a stage's cache is named by what its pairs are, and the run keeps one directory: a second
    plan pays only for the stage it does not share, and trains bitwise the same student."""
    from proreflow.training import PairCacheConfig

    evaluated = []

    def counting(x, t, cond=None):
        evaluated.append(x.shape[0])
        return _teacher(x, t, cond)

    def recipe(windows, lam=0.0, source="teacher"):
        spec = MethodSpec("p", windows=windows, lam=lam, pair_source=source, time_sampling=TimeSampling("start"))
        return Recipe(spec, 5 * len(windows), teacher_solver=TeacherSolver("euler", 4), train=_cfg(batch_size=16))

    def run(r, k, pair_dir):
        torch.manual_seed(0)
        return train_plan(VelocityMLP(2, 16, 2), counting, _data_fn, r, k,
                          pair_cache=PairCacheConfig(pair_dir, pairs=40, shard_size=20))

    run(recipe([4, 2]), 2, tmp_path / "shared")
    before = sum(evaluated)
    three = run(recipe([4, 2, 1]), 1, tmp_path / "shared")
    assert sum(evaluated) - before == 40 * 4  # only stage 3's pairs: 40 pairs x 4 Euler steps over one window
    assert three.stages[0].teacher_nfe == 40 * 4 and three.nfe_per_pair == pytest.approx(3 * 4 / 3)  # costs as built
    assert _params_equal(three.student, run(recipe([4, 2, 1]), 1, tmp_path / "alone").student)
    # previous-stage pairs are keyed by the student that solved them: two such plans with different stage-1
    # students (lam 0 vs 1) share stage 1's teacher pairs but never each other's stage-2 pairs
    run(recipe([4, 2], 0.0, "previous_stage"), 2, tmp_path / "shared")
    aligned = run(recipe([4, 2], 1.0, "previous_stage"), 2, tmp_path / "shared")
    assert _params_equal(aligned.student, run(recipe([4, 2], 1.0, "previous_stage"), 2, tmp_path / "alone2").student)
    assert len(list((tmp_path / "shared").glob("w2-seed5-*"))) == 3  # teacher's and two students' stage-2 pairs


def test_the_direction_term_changes_the_student_the_way_the_loss_predicts():
    """Issue 27: no test showed lambda changes anything. From one init and seed, a student trained with lambda = 10
    must point closer to the teacher's chords than one trained with lambda = 0 (mean 1 - cos measured with
    torch's own cosine_similarity on pairs neither saw), and they must differ."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    init = VelocityMLP(2, 32, 2)
    students = {}
    for lam in (0.0, 10.0):
        recipe = Recipe(MethodSpec("p", windows=[2], lam=lam), 150, TimeSampling("uniform"), TeacherSolver("rk4", 4),
                        _cfg(lr=2e-3))
        students[lam] = train_plan(init, _teacher, _data_fn, recipe, 2).student
    assert not _params_equal(students[0.0], students[10.0])
    held = reflow_batches(_teacher, _data_fn, WindowSchedule.uniform(2), TeacherSolver("rk4", 4), 4096,
                          TimeSampling("uniform"))(0, torch.Generator().manual_seed(123), slice(None))
    with torch.no_grad():
        miss = {lam: float((1 - F.cosine_similarity(s(held.x, held.t), held.target, dim=1)).mean())
                for lam, s in students.items()}
        err = {lam: float((s(held.x, held.t) - held.target).pow(2).mean()) for lam, s in students.items()}
    # measured: 1 - cos 0.660 -> 0.575, MSE 0.43 -> 0.86 (the MSE is traded for direction, as the weights say)
    assert miss[10.0] < 0.95 * miss[0.0] and err[10.0] > err[0.0], (miss, err)


@pytest.mark.parametrize("rule, u, next_draw", [
    ("uniform", [0.427938, 0.159043, 0.527369, 0.525512, 0.186209, 0.340049], 0.207086),
    ("start", [0.0] * 6, 0.207086),
    ("mixture", [0.0, 0.159043, 0.0, 0.525512, 0.186209, 0.340049], 0.286839)])
def test_rules_draw_what_the_if_chain_drew_before_they_were_classes(rule, u, next_draw):
    """Golden values from the rules as written before the registry (seed 7, P = 0.4, margin 0.2), and the
    generator's next draw: every rule takes the uniform draw first, only the mixture draws again."""
    gen = torch.Generator().manual_seed(7)
    got = TimeSampling(rule, 0.4, 0.2).draw(6, gen)
    assert got.tolist() == pytest.approx(u, abs=1e-6)
    assert torch.rand(1, generator=gen).item() == pytest.approx(next_draw, abs=1e-6)


def test_a_new_rule_is_one_registered_class_that_presets_and_the_cli_then_accept():
    from proreflow import time_sampling as ts

    @ts.register
    class End(ts.TimeRule):
        name = "end-test"
        help = "u at the window's far end"

        def choose(self, u, sampling, generator):
            return torch.full_like(u, 1.0 - sampling.margin)

    try:
        assert TimeSampling("end-test", margin=0.25).draw(3, None).tolist() == [0.75] * 3
        assert TimeSampling.parse("end-test") == {"rule": "end-test"}
        assert "end-test" in ts.rules_help()
        with pytest.raises(ProReflowError, match="end-test:P|must be"):
            TimeSampling.parse("end-test:0.5")  # takes no fraction
        with pytest.raises(ProReflowError, match="registered twice"):
            ts.register(End)
    finally:
        del ts.RULES["end-test"]
    assert ts.rules_help() == "uniform, start, mixture or mixture:P"


def test_the_cli_help_names_every_rule():
    from typer.testing import CliRunner

    from proreflow.cli import app

    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output
    assert "uniform, start, mixture or mixture:P" in " ".join(out.split())

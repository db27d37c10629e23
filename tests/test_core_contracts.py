"""Literal contracts of the algorithm core that other code and files on disk rely on: the pair cache's identity
(its keys name caches already written), the shard seeds, the recipe's result columns, the windows' and schedules'
validation bounds, and our scheduler's step against diffusers' DDIM step (found by `make mutation`: mutants of
these survived tests that compared the code with itself)."""

import pytest
import torch
from diffusers import DDIMScheduler

from proreflow.conventions import NoiseEntry
from proreflow.errors import ProReflowError
from proreflow.fields.gmm import ExactTeacher, GaussianMixture
from proreflow.fields.vp import VPSchedule, trailing_grid
from proreflow.methods import MethodSpec
from proreflow.pairs import CachedPairs, PairCache, TeacherSolver, grid_solver, make_window_pairs
from proreflow.schedulers.proreflow import ProReflowScheduler, scheduler_for
from proreflow.time_sampling import TimeSampling
from proreflow.training.recipe import Recipe
from proreflow.windows import WindowSchedule

GMM = GaussianMixture.ring(4, 2.0, 0.3)


def _data(n, gen):
    return GMM.sample(n, gen).float(), {"label": torch.arange(n).float()}


class _CondTeacher(ExactTeacher):
    """Checks that the conditioning travels with the pairs' rows."""

    def __call__(self, x, t, cond=None):
        assert cond is not None and cond["label"].shape[0] == x.shape[0]
        return super().__call__(x, t, cond)


def test_pair_cache_identity_is_a_fixed_dict(tmp_path):
    sched, solver = WindowSchedule.uniform(2), TeacherSolver("euler", 2)
    assert PairCache.spec(sched, solver, 6, 4, 3, ExactTeacher(GMM)) == {
        "boundaries": [1.0, 0.5, 0.0], "solver": ["euler", 2, "per_window"], "n_pairs": 6, "shard_size": 4,
        "seed": 3, "teacher": None}
    vp = VPSchedule(torch.linspace(0.99, 0.01, 50))

    class Entered(ExactTeacher):
        noise_entry = vp.noise_entry

    spec = PairCache.spec(sched, solver, 6, 4, 3, Entered(GMM))
    assert spec["noise_entry"] == [vp.noise_entry.t, vp.noise_entry.scale]
    assert PairCache.spec(sched, solver, 6, 4, 3)["teacher"] is None and "noise_entry" not in \
        PairCache.spec(sched, solver, 6, 4, 3)
    assert grid_solver(sched).spec() == ["euler", 1, "grid", [1.0, 0.5, 0.0]]
    assert grid_solver(sched, "heun", max_batch=8) == TeacherSolver("heun", 1, "grid", max_batch=8,
                                                                    grid=(1.0, 0.5, 0.0))


def test_each_shard_is_made_from_its_own_seed_and_the_conditioning_travels(tmp_path, capsys):
    sched, solver = WindowSchedule.uniform(2), TeacherSolver("euler", 2)
    cache = PairCache(tmp_path / "c").ensure(_CondTeacher(GMM), _data, sched, solver, n_pairs=5, shard_size=2,
                                             seed=7)
    assert len(cache) == 5 and cache.pairs.cond["label"].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    gen = torch.Generator().manual_seed(7 * 1_000_003 + 1)  # shard 1, written out
    x0, cond = _data(2, gen)
    want = make_window_pairs(ExactTeacher(GMM), x0, sched, solver, generator=gen, cond=cond)
    assert torch.equal(cache.pairs.x_a[2:4], want.x_a) and torch.equal(cache.pairs.x_b[2:4], want.x_b)
    assert cache.pairs.teacher_nfe == 5 * 2  # the manifests' per-shard counts, summed
    assert capsys.readouterr().err == ""  # no progress bar unless asked
    PairCache(tmp_path / "d").ensure(_CondTeacher(GMM), _data, sched, solver, n_pairs=1, shard_size=1, progress=True)
    assert "teacher pairs" in capsys.readouterr().err
    batch = cache.batch(torch.tensor([4, 0]))
    assert batch.teacher_nfe == 0 and batch.cond["label"].tolist() == [0.0, 0.0]
    for bad in ({"n_pairs": 0, "shard_size": 2}, {"n_pairs": 2, "shard_size": 0}):
        with pytest.raises(ProReflowError, match="n_pairs >= 1 and shard_size >= 1"):
            PairCache(tmp_path / "e").ensure(_CondTeacher(GMM), _data, sched, solver, **bad)


def test_pair_cache_defaults_are_one_shard_of_ten_thousand_from_seed_zero(tmp_path):
    sched, solver = WindowSchedule.uniform(2), TeacherSolver("euler", 1)
    a = PairCache(tmp_path / "a").ensure(ExactTeacher(GMM), _data, sched, solver, n_pairs=3)
    b = PairCache(tmp_path / "b").ensure(ExactTeacher(GMM), _data, sched, solver, n_pairs=3, shard_size=10_000, seed=0)
    assert torch.equal(a.pairs.x_b, b.pairs.x_b)
    assert PairCache(tmp_path / "a").load(PairCache.spec(sched, solver, 3, 10_000, 0, ExactTeacher(GMM)))


def test_teacher_solver_step_counts():
    assert TeacherSolver("euler", 4, "per_window").steps_for(0.1) == 4
    assert TeacherSolver("euler", 4, "per_unit_time").steps_for(0.25) == 1
    assert TeacherSolver("euler", 4, "per_unit_time").steps_for(0.01) == 1
    assert TeacherSolver("euler", 4, "per_unit_time").steps_for(0.6) == 3


def test_recipe_describes_its_columns():
    m = MethodSpec("p", windows="4->k", lam=0.5, pair_source="previous_stage")
    r = Recipe(m, 10, TimeSampling("mixture", 0.25, 0.1), TeacherSolver("euler", 2))
    assert r.describe(2) == {"windows": [4, 2], "lam": 0.5, "time_sampling": "mixture-0.25-m0.1",
                             "pair_source": "previous_stage"}
    out = Recipe(MethodSpec("q", loss_weighting="output"), 10, TimeSampling(), TeacherSolver()).describe(4)
    assert out["loss_weighting"] == "output" and out["windows"] == [4] and out["time_sampling"] == "uniform"


@pytest.mark.parametrize("sampling, label", [
    (TimeSampling("uniform"), "uniform"), (TimeSampling("uniform", margin=0.1), "uniform-m0.1"),
    (TimeSampling("start", margin=0.1), "start"), (TimeSampling("mixture", 0.3), "mixture-0.3"),
    (TimeSampling("mixture", 0.3, 0.2), "mixture-0.3-m0.2")])
def test_time_sampling_labels(sampling, label):
    assert sampling.label() == label


def test_validation_bounds_of_schedules_windows_and_noise_entries():
    for bad in (torch.full((2, 3), 0.5), torch.tensor([0.5]), torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.0]),
                torch.tensor([0.5, 0.6])):
        with pytest.raises(ProReflowError, match="alphas_cumprod"):
            VPSchedule(bad)
    assert VPSchedule(torch.tensor([0.9, 0.1])).num_train_timesteps == 2
    with pytest.raises(ProReflowError, match="no alphas_cumprod"):
        VPSchedule.from_scheduler(object())
    for t, scale in ((0.0, 1.0), (1.5, 1.0), (0.5, 0.0)):
        with pytest.raises(ProReflowError, match="noise entry"):
            NoiseEntry(t, scale)
    assert NoiseEntry(1.0, 0.1).t == 1.0
    w = WindowSchedule.uniform(2)
    assert w.steps_per_window(2) == 1 and WindowSchedule.uniform(1).steps_per_window(1) == 1
    for bad in (0, 3, True, 2.0):
        with pytest.raises(ProReflowError, match="cannot cross"):
            w.steps_per_window(bad)
    vp = VPSchedule(DDIMScheduler(num_train_timesteps=10).alphas_cumprod)
    assert len(trailing_grid(vp, 10)) == 11
    for bad in (0, 11, True, 2.0):
        with pytest.raises(ProReflowError, match="teacher grid needs 1 to 10"):
            trailing_grid(vp, bad)


def test_timestep_of_t_clamps_to_the_trained_range_and_inverts_inside_it():
    vp = VPSchedule(DDIMScheduler().alphas_cumprod)
    ts = vp.timestep_of_t(torch.tensor([0.0, vp.t_min, 0.5, vp.t_max, 1.0], dtype=torch.float64))
    assert ts[0] == pytest.approx(0.0, abs=1e-9) and ts[1] == pytest.approx(0.0, abs=1e-9)
    assert ts[3] == pytest.approx(999.0, abs=1e-9) and ts[4] == pytest.approx(999.0, abs=1e-9)
    assert float(vp.t_of_timestep(ts[2:3])) == pytest.approx(0.5, abs=1e-12)


def test_our_scheduler_step_is_ddims_step_with_the_same_predicted_data():
    """One ProReflowScheduler step from x_999 at K = 4 timestep-placed windows = DDIMScheduler(trailing).step,
    prev_sample and pred_original_sample both; a float64 model output keeps the sample's dtype; one step too
    many is refused."""
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=True, timestep_spacing="trailing")
    from proreflow.schedulers.proreflow import timestep_windows

    ours = scheduler_for(ddim.config, timestep_windows(ddim.config, 4))
    ddim.set_timesteps(4)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    want = ddim.step(eps, ddim.timesteps[0], x)
    got = ours.step(eps.double(), ours.timesteps[0], x)
    assert got.prev_sample.dtype == torch.float32
    assert torch.allclose(got.prev_sample, want.prev_sample, atol=1e-4)
    assert torch.allclose(got.pred_original_sample, want.pred_original_sample, atol=1e-3)
    for t in ours.timesteps[1:]:
        ours.step(eps, t, x)
    with pytest.raises(ProReflowError, match="more times than num_inference_steps"):
        ours.step(eps, ours.timesteps[-1], x)
    assert isinstance(ProReflowScheduler(num_windows=2).step(eps, 999, x, return_dict=False), tuple)


def test_cached_pairs_batch_counts_no_teacher_calls():
    p = make_window_pairs(ExactTeacher(GMM), GMM.sample(4, torch.Generator().manual_seed(0)).float(),
                          WindowSchedule.uniform(2), TeacherSolver("euler", 1), torch.Generator().manual_seed(1))
    assert p.teacher_nfe == 4 and CachedPairs(p).batch(torch.tensor([0])).teacher_nfe == 0


def test_chunked_teacher_passes_small_batches_through_whole():
    from proreflow.pairs import Chunked

    seen = []

    class Spy(ExactTeacher):
        noise_entry = NoiseEntry(0.9, 0.5)

        def __call__(self, x, t, cond=None):
            seen.append((x.shape[0], cond["label"].tolist()))
            return super().__call__(x, t, cond)

    x = GMM.sample(3, torch.Generator().manual_seed(0)).float()
    t, cond = torch.full((3,), 0.4), {"label": torch.tensor([1.0, 2.0, 3.0])}
    chunked = Chunked(Spy(GMM), 3)
    assert torch.equal(chunked(x, t, cond), GMM.velocity(x.double(), t.double()).float())
    assert seen == [(3, [1.0, 2.0, 3.0])] and chunked.noise_entry == NoiseEntry(0.9, 0.5)


def test_placement_and_loss_weight_are_computed_in_float64_and_returned_as_promised():
    from proreflow.fields.vp import VPVelocity, timestep_placement

    vp = VPSchedule(DDIMScheduler().alphas_cumprod)
    f = timestep_placement(vp)
    want = float(vp.t_of_timestep(torch.tensor(1000 / 3 - 1.0, dtype=torch.float64)))
    assert f(1 / 3) == want  # 332.33...: float32 would move it
    w = VPVelocity(torch.nn.Identity(), vp).loss_weight(torch.tensor([0.5, 0.9], dtype=torch.float64))
    assert w.dtype == torch.float32
    t64 = torch.tensor([0.3, 0.8], dtype=torch.float64)
    starts, ends = WindowSchedule.uniform(4).bounds(t64)
    assert starts.dtype == ends.dtype == torch.float64 and starts.tolist() == [0.5, 1.0]


def test_scheduler_factories_keep_trained_betas_windows_and_their_defaults():
    from proreflow.schedulers.proreflow import flow_scheduler_for

    betas = torch.linspace(1e-4, 0.02, 1000).tolist()
    config = {"num_train_timesteps": 1000, "beta_start": 0.001, "beta_end": 0.01, "beta_schedule": "linear",
              "trained_betas": betas}
    got = scheduler_for(config, WindowSchedule.uniform(2))
    assert list(got.config.trained_betas) == betas and got.config.num_windows == 2
    assert got.vp.t_max == VPSchedule(DDIMScheduler(trained_betas=betas).alphas_cumprod).t_max  # the betas are used
    flow = flow_scheduler_for({"num_train_timesteps": 500}, WindowSchedule((1.0, 0.3, 0.0)))
    assert flow.config.num_train_timesteps == 500 and flow.config.num_windows == 2
    no_pred = {k: v for k, v in DDIMScheduler().config.items() if k != "prediction_type"}
    from proreflow.schedulers.proreflow import stock_scheduler_for, timestep_windows

    assert stock_scheduler_for(no_pred, timestep_windows(no_pred, 4)).config.prediction_type == "epsilon"


def test_flow_scheduler_reads_a_pipelines_uniform_sigmas_as_a_step_count():
    """FluxPipeline passes sigmas linspace(1, 1/N, N) and no count: read as N steps, m per window."""
    from proreflow.schedulers.proreflow import ProReflowFlowScheduler

    s = ProReflowFlowScheduler(window_boundaries=[1.0, 0.6, 0.0], num_windows=2)
    s.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.7)
    assert s.num_inference_steps == 4 and s.sigmas.tolist() == pytest.approx([1.0, 0.8, 0.6, 0.3, 0.0])
    one = ProReflowFlowScheduler(window_boundaries=[1.0, 0.0], num_windows=1)
    one.set_timesteps(sigmas=[1.0])
    assert one.num_inference_steps == 1 and one.sigmas.tolist() == pytest.approx([1.0, 0.0])
    for bad in ([1.0, 0.6], [1.0, 0.5 + 2e-6], [], [0.9, 0.4]):
        with pytest.raises(ProReflowError, match="uniform sigmas"):
            s.set_timesteps(sigmas=bad)
    with pytest.raises(ProReflowError, match="only a step count"):
        s.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ProReflowError, match="only a step count"):
        s.set_timesteps(sigmas=[1.0, 0.5], timesteps=[999, 500])


def test_our_vp_schedulers_keep_float64_times_and_hand_pipelines_float32_timesteps():
    from proreflow.schedulers.rectified_flow import RectifiedFlowScheduler

    s = ProReflowScheduler(num_windows=2)
    s.set_timesteps(2)
    assert s.flow_times.dtype == torch.float64 and s.timesteps.dtype == torch.float32
    r = RectifiedFlowScheduler()
    r.set_timesteps(3)
    assert r.num_inference_steps == 3 and r.timesteps.dtype == torch.float32 and r.taus.dtype == torch.float64
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))  # float32 output, float64 sample
    out = r.step(v, r.timesteps[0], x).prev_sample
    assert out.dtype == torch.float64
    assert torch.allclose(out, x + (1.0 - 2.0 / 3.0) * v.double(), rtol=0, atol=1e-15)


def test_rules_help_for_one_two_and_three_rules(monkeypatch):
    from proreflow import time_sampling as ts

    rules = dict(ts.RULES)
    monkeypatch.setattr(ts, "RULES", {"uniform": rules["uniform"]})
    assert ts.rules_help() == "uniform"
    monkeypatch.setattr(ts, "RULES", {"uniform": rules["uniform"], "start": rules["start"]})
    assert ts.rules_help() == "uniform or start"
    monkeypatch.setattr(ts, "RULES", {"mixture": rules["mixture"]})
    assert ts.rules_help() == "mixture or mixture:P"


def test_stage_caches_are_named_by_their_seed_and_show_progress_when_asked(tmp_path, capsys):
    from proreflow.training.plan import PairCacheConfig, _stage_cache

    cfg = PairCacheConfig(dir=str(tmp_path), pairs=None, shard_size=4)
    sched, solver = WindowSchedule.uniform(2), TeacherSolver("euler", 1)
    a = _stage_cache(cfg, 0, 4, ExactTeacher(GMM), _data, sched, solver, 1, progress=True)
    assert "teacher pairs" in capsys.readouterr().err
    b = _stage_cache(cfg, 0, 4, ExactTeacher(GMM), _data, sched, solver, 2, progress=False)
    assert capsys.readouterr().err == ""
    assert not torch.equal(a.pairs.x_a, b.pairs.x_a)
    assert sorted(p.name.split("-")[1] for p in tmp_path.iterdir()) == ["seed1", "seed2"]


def test_a_plan_result_samples_its_final_windows_with_m_steps_each():
    from proreflow.models.mlp import VelocityMLP
    from proreflow.sampling import sample
    from proreflow.training.plan import PlanResult
    from proreflow.windows import ProgressivePlan

    torch.manual_seed(0)
    net = VelocityMLP(2, 8, 2)
    plan = ProgressivePlan.from_window_counts([4, 2], 10)
    res = PlanResult(student=net, stages=[], sources=[], plan=plan)
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(res.sample(noise), sample(net, noise, plan.final, 1))
        assert torch.equal(res.sample(noise, 4), sample(net, noise, plan.final, 2))
        cond = {"c": torch.zeros(5)}
        assert torch.equal(res.sample(noise, cond=cond), sample(net, noise, plan.final, 1, cond=cond))

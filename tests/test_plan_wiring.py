"""What `train_plan` hands each stage: the fit's arguments, the pairs' source, solver, cache and time sampling,
and what the monitor hears. `fit` is replaced by a recorder, so each stage's wiring is checked directly (the
training itself is tested in test_training.py and test_time_sampling_and_pair_source.py)."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import proreflow.training.plan as plan_module
from proreflow.errors import ProReflowError
from proreflow.fields.gmm import GaussianMixture
from proreflow.methods import MethodSpec
from proreflow.models.mlp import VelocityMLP
from proreflow.pairs import TeacherSolver
from proreflow.time_sampling import TimeSampling
from proreflow.training.checkpoint import CheckpointConfig
from proreflow.training import FitResult, PairCacheConfig, Recipe, TrainConfig, train_plan
from proreflow.windows import WindowSchedule

GMM = GaussianMixture.ring(4, 2.0, 0.3)


def _data_fn(n, gen):
    return GMM.sample(n, gen).float(), None


class _StatefulData:
    """A data source with a position (a stream): `train_plan` must hand it to `fit` as `data_state`."""

    def __call__(self, n, gen):
        return _data_fn(n, gen)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _teacher(x, t, cond=None):
    return GMM.velocity(x.double(), t.double()).to(x.dtype)


class _Monitor:
    def __init__(self):
        self.stages, self.teacher_nfe = [], 0

    def at_stage(self, index, count, windows, offset):
        self.stages.append((index, count, windows, offset))


@pytest.fixture
def fits(monkeypatch):
    """Replace `fit` by a recorder: each call's arguments; the result's teacher cost is 100 x (stage + 1)."""
    calls = []

    def fake_fit(model, batches, steps, cfg, **kw):
        calls.append(SimpleNamespace(model=model, batches=batches, steps=steps, cfg=cfg, **kw))
        return FitResult(copy.deepcopy(model), losses=[0.0] * steps, teacher_nfe=100 * len(calls), pairs=10)

    monkeypatch.setattr(plan_module, "fit", fake_fit)
    return calls


def _recipe(windows=(4, 2), budget=10, pair_source="teacher", sampling=TimeSampling("start"), **train):
    method = MethodSpec("p", windows=list(windows), lam=0.0, pair_source=pair_source, time_sampling=sampling)
    cfg = TrainConfig(**{**dict(lr=1e-3, batch_size=8, ema_decay=0.9, progress=False, seed=3), **train})
    return Recipe(method, budget, teacher_solver=TeacherSolver("euler", 2, max_batch=7), train=cfg)


def test_each_stage_gets_its_own_name_seed_checkpoints_callback_data_state_and_monitor(fits, tmp_path):
    accelerator = SimpleNamespace(num_processes=2)  # only its process count is read before `fit`
    monitor, seen = _Monitor(), []
    ckpt = CheckpointConfig(tmp_path / "ckpt", every=5)
    data = _StatefulData()
    recipe = _recipe(per_device_batch=2, warmup_scope="stage")
    res = train_plan(VelocityMLP(2, 8, 1), _teacher, data, recipe, 2, accelerator=accelerator, checkpoints=ckpt,
                     copy_model=False, on_step=lambda *a: seen.append(a), monitor=monitor)
    schedules = [s.schedule for s in recipe.plan(2).stages]
    assert [c.desc for c in fits] == ["p k=2 stage 1/2 (K=4)", "p k=2 stage 2/2 (K=2)"]
    assert [c.seed_offset for c in fits] == [1, 2]
    assert [c.steps for c in fits] == [5, 5]
    assert [c.checkpoints.root for c in fits] == [tmp_path / "ckpt" / "stage-1", tmp_path / "ckpt" / "stage-2"]
    assert all(c.accelerator is accelerator and c.monitor is monitor and c.data_state is data for c in fits)
    assert all(c.copy_model is False and c.warmup_done == 0 for c in fits)
    # the global batch 8 on 2 processes at 2 per device: 4 per micro-step, accumulated twice
    assert all((c.cfg.batch_size, c.cfg.grad_accum) == (4, 2) for c in fits)
    for k, c in enumerate(fits):
        c.on_step(3, "ema_fn", "result")
    assert seen == [(0, 3, "ema_fn", "result"), (1, 3, "ema_fn", "result")]
    # the monitor hears each stage's index, the stage count, its windows and the steps taken before it
    assert monitor.stages == [(0, 2, schedules[0], 0), (1, 2, schedules[1], 5)]
    assert monitor.teacher_nfe == 100 + 200 and res.teacher_nfe == 300
    assert fits[1].model is res.stages[0].model  # stage 2 starts from stage 1's student


def test_without_a_name_checkpoints_or_stream_fit_gets_the_defaults(fits):
    train_plan(VelocityMLP(2, 8, 1), _teacher, _data_fn, _recipe(windows=(4,), budget=4, warmup_scope="run"), 4)
    (call,) = fits
    assert call.desc == "p k=4 stage 1/1 (K=4)"
    assert call.checkpoints is None and call.data_state is None and call.on_step is None and call.monitor is None
    assert call.accelerator is None and call.copy_model is True and call.cfg.batch_size == 8


def test_run_scoped_warmup_counts_the_steps_of_earlier_stages(fits):
    train_plan(VelocityMLP(2, 8, 1), _teacher, _data_fn, _recipe(budget=10, warmup_scope="run"), 2)
    assert [c.warmup_done for c in fits] == [0, 5]


def test_previous_stage_pairs_come_from_a_frozen_copy_and_leave_the_stage_one_student_trainable(fits, monkeypatch,
                                                                                                 tmp_path):
    made = []
    real = plan_module.reflow_batches

    def spy(source, data_fn, schedule, solver, batch_size, sampling, memo=None):
        made.append((source, schedule, solver))
        memos.append(memo)
        return real(source, data_fn, schedule, solver, batch_size, sampling, memo)

    monkeypatch.setattr(plan_module, "reflow_batches", spy)
    monitor, memos = _Monitor(), []
    res = train_plan(VelocityMLP(2, 8, 1), _teacher, _data_fn, _recipe(pair_source="previous_stage"), 2,
                     monitor=monitor, pair_memo=tmp_path)
    stage_one = res.stages[0].model
    assert made[0][0] is _teacher and made[0][2].max_batch == 7
    frozen, schedule, solver = made[1]
    assert frozen is not stage_one and not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    # a frozen *copy*: the stage-1 student itself (trained on, returned, exported) keeps its trainable weights
    assert all(p.requires_grad for p in stage_one.parameters()) and stage_one.training
    assert solver.mode == "grid" and solver.grid == WindowSchedule.uniform(4).boundaries and solver.max_batch == 7
    assert schedule.num_windows == 2
    assert res.sources == ["teacher", "previous_stage"]
    assert monitor.teacher_nfe == 100  # the student's evaluations (stage 2) are not teacher cost
    # `pair_memo`: each stage remembers its pairs by its own source, windows and solver
    assert [(m.teacher, m.schedule, m.solver) for m in memos] == [s[:3] for s in made]
    assert all(m.dir.parent == tmp_path for m in memos) and memos[0].dir != memos[1].dir


def test_a_stage_range_that_selects_nothing_is_refused(fits):
    for stages in [(1, 1), (2, None), (0, 0), (-1, None)]:
        with pytest.raises(ProReflowError, match="select no stage"):
            train_plan(VelocityMLP(2, 8, 1), _teacher, _data_fn, _recipe(), 2, stages=stages)
    assert fits == []


def _cached_run(tmp_path, fits, sampling):
    recipe = _recipe(budget=6, sampling=sampling, per_device_batch=4, batch_size=8)  # 3 steps a stage, 2 micro-steps
    res = train_plan(VelocityMLP(2, 8, 1), _teacher, _data_fn, recipe, 2,
                     pair_cache=PairCacheConfig(tmp_path / "pairs", None, shard_size=16))
    return recipe, res


def test_cached_pairs_one_per_training_sample_from_each_stages_own_seed(fits, tmp_path):
    recipe, res = _cached_run(tmp_path, fits, TimeSampling("start"))
    # one pair per sample a stage sees: 3 optimizer steps x (4 per micro-step x 2 micro-steps) = 24
    assert [s.pairs for s in res.stages] == [24, 24]
    dirs = sorted(p for p in (tmp_path / "pairs").iterdir() if p.is_dir())
    specs = [json.loads((d / "manifest.json").read_text())["spec"] for d in dirs]
    # stage k's pairs are drawn from seed cfg.seed + k (3 + 1 and 3 + 2), named in the folder and the manifest
    assert sorted((s["seed"], len(s["boundaries"]) - 1, s["n_pairs"]) for s in specs) == [(4, 4, 24), (5, 2, 24)]
    assert sorted(d.name.split("-")[0] + "-" + d.name.split("-")[1] for d in dirs) == ["w2-seed5", "w4-seed4"]
    # euler x 2 steps per window: 2 teacher calls per pair, reported from the cache (the batches are free)
    assert [s.teacher_nfe for s in res.stages] == [48, 48]


@pytest.mark.parametrize("rule", ["start", "uniform"])
def test_cached_batches_place_points_by_the_recipes_time_sampling(fits, tmp_path, rule):
    recipe, res = _cached_run(tmp_path, fits, TimeSampling(rule))
    starts = set(WindowSchedule.uniform(4).boundaries[:-1])
    batch = fits[0].batches(0, torch.Generator().manual_seed(0))
    at_start = [min(abs(float(t) - s) for s in starts) < 1e-6 for t in batch.t]
    assert all(at_start) if rule == "start" else not any(at_start)


def test_plan_result_samples_with_its_conditioning():
    """A student whose velocity is its conditioning c: Euler from t = 1 to 0 ends at noise - c, whatever the steps."""

    class CondVelocity(torch.nn.Module):
        def forward(self, x, t, cond=None):
            return torch.zeros_like(x) if cond is None else cond.expand_as(x)

    recipe = _recipe(windows=(2,), budget=2)
    res = plan_module.PlanResult(CondVelocity(), [], [], recipe.plan(2))
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    c = torch.tensor([[0.5, -2.0]])
    for steps in (None, 4):
        assert torch.allclose(res.sample(noise, steps, cond=c), noise - c, atol=1e-6)
    assert torch.equal(res.sample(noise), noise)


def test_a_stop_while_caching_names_the_stage_and_keeps_the_finished_shards(monkeypatch, tmp_path):
    """SIGTERM during stage 2's pair cache: the run stops after the shard in progress, says which stage it was
    caching, and stage 1's cache and stage 2's first shard stay on disk for the rerun."""
    from proreflow.training import signals

    def fake_fit(model, batches, steps, cfg, **kw):
        monkeypatch.setattr(signals._StopFlag, "requested", True)  # SIGTERM arrives during stage 1's training
        return FitResult(copy.deepcopy(model), losses=[0.0] * steps, teacher_nfe=1, pairs=1)

    monkeypatch.setattr(plan_module, "fit", fake_fit)
    recipe = _recipe(budget=6)  # 3 steps a stage at batch 8: 24 pairs, 3 shards of 8
    with pytest.raises(signals.TrainingInterrupted, match="while caching the pairs of stage 2;"):
        train_plan(VelocityMLP(2, 8, 1), _teacher, _data_fn, recipe, 2,
                   pair_cache=PairCacheConfig(tmp_path, None, shard_size=8))
    shards = {d.name.split("-")[0]: len(list(d.glob("shard-*.safetensors"))) for d in tmp_path.iterdir()}
    assert shards == {"w4": 3, "w2": 1}

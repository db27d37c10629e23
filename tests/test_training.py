"""The stage loop: determinism, accumulation, mixed precision, EMA, stage chaining, data sources."""

import shutil

import numpy as np
import pytest
import torch

import proreflow.training as training
from proreflow.data.toy import BUILTIN, builtin_points, load_points, split_points
from proreflow.errors import ProReflowError
from proreflow.fields.gmm import GaussianMixture
from proreflow.methods import MethodSpec
from proreflow.models.mlp import VelocityMLP
from proreflow.pairs import TeacherSolver
from proreflow.time_sampling import TimeSampling
from proreflow.training import Recipe, TrainConfig, fit, flow_matching_batches, reflow_batches, train_plan
from proreflow.windows import ProgressivePlan

GMM = GaussianMixture.ring(4, 2.0, 0.3)


def _data_fn(n, gen):
    return GMM.sample(n, gen).float(), None


def _teacher(x, t, cond=None):
    return GMM.velocity(x.double(), t.double()).float()


def _cfg(**kw):
    base = dict(lr=2e-3, batch_size=64, ema_decay=0.9, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _params(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_fit_is_deterministic_and_leaves_the_init_untouched():
    torch.manual_seed(0)
    net = VelocityMLP(2, 32, 2)
    before = _params(net).clone()
    batches = flow_matching_batches(_data_fn, 64, _teacher)
    a = fit(net, batches, 30, _cfg())
    b = fit(net, batches, 30, _cfg())
    assert torch.equal(_params(net), before)
    assert torch.equal(_params(a.model), _params(b.model))
    assert len(a.losses) == 30 and a.losses == b.losses
    c = fit(net, batches, 30, _cfg(seed=4))
    assert not torch.equal(_params(a.model), _params(c.model))


def test_flow_matching_on_exact_velocity_lowers_the_loss():
    torch.manual_seed(0)
    res = fit(VelocityMLP(2, 64, 3), flow_matching_batches(_data_fn, 256, _teacher), 300, _cfg(lr=3e-3))
    assert np.mean(res.losses[-30:]) < 0.5 * np.mean(res.losses[:30])


def test_gradient_accumulation_counts_optimizer_steps_and_pairs():
    torch.manual_seed(0)
    calls = []
    inner = reflow_batches(_teacher, _data_fn, ProgressivePlan.from_window_counts([2], 10).final,
                           TeacherSolver("euler", 3), 16)

    def counting(i, gen, rows):
        calls.append(i)
        return inner(i, gen, rows)

    res = fit(VelocityMLP(2, 16, 2), counting, 5, _cfg(grad_accum=2, batch_size=16))
    assert len(res.losses) == 5 and len(calls) == 10  # 2 micro-batches per optimizer step
    assert res.pairs == 160 and res.nfe_per_pair == 3


def test_bf16_autocast_runs_on_cpu():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # accelerate keeps one precision per process
    try:
        runs = {}
        for precision in ("no", "bf16"):  # the float32 run is the reference
            AcceleratorState._reset_state(True)
            torch.manual_seed(0)
            runs[precision] = fit(VelocityMLP(2, 16, 2), flow_matching_batches(_data_fn, 32), 60,
                                  _cfg(mixed_precision=precision))
        bf16, fp32 = np.array(runs["bf16"].losses), np.array(runs["no"].losses)
        assert np.isfinite(bf16).all()
        # the same batches: bf16's losses track float32's within bf16's precision (3 significant digits), and not
        # bitwise (autocast did run), and training works under it (the last 10 steps below the first 10)
        assert np.allclose(bf16, fp32, rtol=0.05) and not np.array_equal(bf16, fp32)
        assert bf16[-10:].mean() < bf16[:10].mean()
    finally:
        AcceleratorState._reset_state(True)


def _poisoned(bad_steps):
    """Flow-matching batches whose inputs are NaN at the given micro-steps."""
    inner = flow_matching_batches(_data_fn, 16, _teacher)

    def batch(i, gen, rows):
        b = inner(i, gen, rows)
        if i in bad_steps:
            b.x = torch.full_like(b.x, float("nan"))
        return b

    return batch


def test_non_finite_loss_stops_with_a_clear_message():
    with pytest.raises(ProReflowError, match=r"non-finite loss or gradient at step 2 .*last good checkpoint: none"):
        fit(VelocityMLP(2, 8, 1), _poisoned({2}), 5, _cfg())


def test_non_finite_steps_can_be_skipped_and_counted():
    torch.manual_seed(0)
    res = fit(VelocityMLP(2, 8, 1), _poisoned({1, 3}), 5, _cfg(on_nonfinite="skip", max_skips=2))
    assert res.skipped == 2 and len(res.losses) == 5
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    with pytest.raises(ProReflowError, match="1 non-finite steps already skipped"):
        fit(VelocityMLP(2, 8, 1), _poisoned({1, 3}), 5, _cfg(on_nonfinite="skip", max_skips=1))


def test_each_stage_starts_from_the_previous_student(monkeypatch):
    seen = []
    real_fit = training.fit

    def spy(model, *a, **kw):
        seen.append(model)
        return real_fit(model, *a, **kw)

    monkeypatch.setattr(training.plan, "fit", spy)
    torch.manual_seed(0)
    init = VelocityMLP(2, 16, 2)
    recipe = Recipe(MethodSpec("p", windows=[4, 2, 1], lam=1.0), 6, teacher_solver=TeacherSolver("euler", 2), train=_cfg())
    res = train_plan(init, _teacher, _data_fn, recipe, 1)
    assert res.plan == ProgressivePlan.from_window_counts([4, 2, 1], 6)
    assert seen[0] is init
    assert seen[1] is res.stages[0].model and seen[2] is res.stages[1].model
    assert res.student is res.stages[2].model and res.optimizer_steps == 6
    assert res.nfe_per_pair == 2


def test_window_margin_keeps_training_times_away_from_window_ends():
    batches = reflow_batches(_teacher, _data_fn, ProgressivePlan.from_window_counts([4], 1).final,
                             TeacherSolver("euler", 1), 4000, TimeSampling(margin=0.2))
    b = batches(0, torch.Generator().manual_seed(0), slice(None))
    frac = (b.t * 4) % 1.0  # position inside a quarter window, measured from its end
    frac = torch.where(frac == 0, torch.ones_like(frac), frac)
    assert float(frac.min()) > 0.2 - 1e-6 and float(frac.max()) <= 1.0
    with pytest.raises(ProReflowError):
        TimeSampling(margin=1.0)


@pytest.mark.parametrize("bad", [dict(lr=0.0), dict(batch_size=0), dict(ema_decay=1.0), dict(grad_accum=0),
                                 dict(mixed_precision="fp8"), dict(grad_clip=-1.0)])
def test_bad_train_config(bad):
    with pytest.raises(ProReflowError):
        TrainConfig(**bad)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_point_clouds_are_seeded_and_standardised(name):
    a, b = builtin_points(name, 500, 1), builtin_points(name, 500, 1)
    assert np.array_equal(a, b) and a.shape == (500, 2) and np.all(np.isfinite(a))
    d = split_points(name, a, seed=0)
    assert d.train.shape[0] + d.test.shape[0] == 500
    z = torch.cat([d.train, d.test])
    assert torch.allclose(z.mean(0), torch.zeros(2), atol=1e-5)
    assert abs(float((z**2).mean().sqrt()) - 1.0) < 1e-5


def test_user_points_any_dimension(tmp_path):
    p = tmp_path / "pts.npy"
    np.save(p, np.random.default_rng(0).normal(size=(100, 5)).astype(np.float32))
    arr = load_points(p)
    assert arr.shape == (100, 5) and arr.dtype == np.float64


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compile_fast_path_trains_the_same_model():
    """torch.compile (inductor, through accelerate) is a switch of the same loop: the weights of the plain
    run; the EMA and the returned model are the uncompiled module."""
    torch.manual_seed(0)
    init = VelocityMLP(2, 32, 2)
    base = fit(init, flow_matching_batches(_data_fn, 64), 20, _cfg(batch_size=64))
    seen = []
    fast = fit(init, flow_matching_batches(_data_fn, 64), 20, _cfg(batch_size=64, compile=True),
               on_step=lambda done, ema_model, res: seen.append(type(ema_model()).__name__))
    assert type(fast.model).__name__ == "VelocityMLP" and set(seen) == {"VelocityMLP"}
    assert torch.allclose(_params(base.model), _params(fast.model), atol=1e-5)


def test_channels_last_trains_a_conv_unet_to_the_same_weights():
    """NHWC weights (what GPU convolutions in bf16 prefer) change the memory layout, not the result."""
    from proreflow.fields.network import FlowVelocity
    from proreflow.models.unet import UNetConfig, class_unet

    torch.manual_seed(0)
    init = FlowVelocity(class_unet(UNetConfig(block_out_channels=(8, 16), norm_num_groups=4), 8, 3))

    def data_fn(n, gen):
        return torch.randn(n, 1, 8, 8, generator=gen), {"class_labels": torch.randint(0, 3, (n,), generator=gen)}

    layouts = []
    runs = [fit(init, flow_matching_batches(data_fn, 8), 4, _cfg(batch_size=8, channels_last=cl),
                on_step=lambda d, m, r: layouts.append(m().net.down_blocks[0].resnets[0].conv1.weight.is_contiguous(
                    memory_format=torch.channels_last))) for cl in (False, True)]
    assert layouts == [False] * 4 + [True] * 4  # the switch really changes the layout
    diff = (_params(runs[0].model) - _params(runs[1].model)).abs().max()
    assert diff < 1e-3, float(diff)  # seen: 8e-5 (kernels differ by layout); one Adam step moves up to 2e-3


def test_on_step_sees_the_ema_model_without_disturbing_training():
    calls = []
    torch.manual_seed(0)
    init = VelocityMLP(2, 32, 2)
    ref = fit(init, flow_matching_batches(_data_fn, 64), 12, _cfg(batch_size=64))

    def on_step(done, ema_model, res):
        m = ema_model()
        for p in m.parameters():  # a copy: scribbling on it must not reach training
            p.data.add_(1.0)
        calls.append((done, len(res.losses)))

    got = fit(init, flow_matching_batches(_data_fn, 64), 12, _cfg(batch_size=64), on_step=on_step)
    assert calls == [(i, i) for i in range(1, 13)]
    assert torch.equal(_params(ref.model), _params(got.model))


def test_a_stop_requested_during_the_last_step_ends_the_fit_on_every_process(tmp_path, monkeypatch):
    """Regression: after a stage's last step, fit looked only at its own process's SIGTERM flag, so a process
    signalled a moment after the others could stop while they went on into the next stage, whose first
    collective (DDP's broadcast, `wait_for_everyone`) then waited for it. The check is now agreed on by all
    processes; here `_all_ranks` plays a peer whose SIGTERM arrived after the last step's vote."""
    from proreflow.training import TrainingInterrupted
    from proreflow.training.checkpoint import CheckpointConfig

    votes = []

    def all_ranks(acc, ok):
        votes.append(ok)
        return ok if len(votes) <= 4 else False  # 2 steps x (finite, stop); then the peer has a stop request

    monkeypatch.setattr(training.loop, "_all_ranks", all_ranks)
    ck = CheckpointConfig(tmp_path / "ck", every=100).for_fit("stage-1")
    with pytest.raises(TrainingInterrupted, match="after its last step"):
        fit(VelocityMLP(2, 8, 1), flow_matching_batches(_data_fn, 64), 2, _cfg(), checkpoints=ck)
    assert votes[-1] is True and ck.load_final() is not None  # this process had no request; the stage is saved whole


def test_one_process_trains_fp32_then_bf16_then_fp32():
    """accelerate refuses a second precision in a process; an fp32 teacher then a bf16 student (the digits
    benchmark) must both train, each under its own precision, and fp32 again gives the fp32 result bit for bit."""
    seen: list[torch.dtype] = []

    class Spy(VelocityMLP):
        def forward(self, *args, **kw):
            out = super().forward(*args, **kw)
            seen.append(out.dtype)
            return out

    torch.manual_seed(0)
    init = Spy(2, 32, 2)
    batches = flow_matching_batches(_data_fn, 16)
    runs = []
    for precision in ("no", "bf16", "no"):
        seen.clear()
        runs.append(fit(init, batches, 3, _cfg(batch_size=16, mixed_precision=precision)))
        assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert torch.equal(_params(runs[0].model), _params(runs[2].model))
    assert not torch.equal(_params(runs[0].model), _params(runs[1].model))


def test_a_progressive_run_warms_up_once_unless_told_per_stage(monkeypatch):
    """SD presets warm up for 1000 steps; per stage that was half of each 2000-step ProReflow-I stage. With
    warmup_scope 'run' (the default) a later stage continues the run's warm-up where the earlier stages left it."""
    from proreflow.training import loop, plan as plan_mod
    from proreflow.methods import MethodSpec
    from proreflow.training import Recipe, TrainConfig, train_plan

    assert [loop._warmup(4)(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [loop._warmup(4, 3)(s) for s in range(2)] == [1.0, 1.0] and loop._warmup(4, 2)(0) == 0.75
    seen = []

    def spy(*args, warmup_done=0, **kwargs):
        seen.append(warmup_done)
        return loop.FitResult(model=args[0], losses=[0.0])

    monkeypatch.setattr(plan_mod, "fit", spy)
    field = lambda x, t, c=None: x  # noqa: E731
    data = lambda n, g: (torch.zeros(n, 2), None)  # noqa: E731
    for scope, expected in (("run", [0, 3, 6]), ("stage", [0, 0, 0])):
        seen.clear()
        recipe = Recipe(MethodSpec("p", windows="8->k"), 9, train=TrainConfig(warmup_steps=4, warmup_scope=scope,
                                                                              progress=False))
        train_plan(torch.nn.Linear(2, 2), field, data, recipe, 2)
        assert seen == expected, (scope, seen)

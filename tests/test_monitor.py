"""Watching a run (training.monitor): TensorBoard scalars and images, per-window curves that match the loss,
validation that changes nothing, resume without duplicate points, trackers that fail without stopping training."""

import math

import numpy as np
import pytest
import torch

from proreflow.errors import ProReflowError
from proreflow.fields.gmm import GaussianMixture
from proreflow.methods import MethodSpec
from proreflow.models.mlp import VelocityMLP
from proreflow.pairs import TeacherSolver
from proreflow.sampling import sample
from proreflow.training import Monitor, MonitorConfig, Recipe, TrainConfig, Validation, image_grid, train_plan
from proreflow.training.checkpoint import CheckpointConfig

GMM = GaussianMixture.ring(4, 2.0, 0.3)
STEPS = 12  # per stage: two stages (4 -> 2 windows)


def _data_fn(n, gen):
    return GMM.sample(n, gen).float(), None


def _teacher(x, t, cond=None):
    return GMM.velocity(x.double(), t.double()).float()


def _recipe(lam=0.5):
    return Recipe(method=MethodSpec("proreflow", windows=[4, "k"], lam=lam),
                  train=TrainConfig(lr=2e-3, batch_size=32, ema_decay=0.9, progress=False, seed=1),
                  budget_steps=2 * STEPS, teacher_solver=TeacherSolver("euler", 2))


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p for p in (folder / "logs").iterdir() if p.is_dir()]
    assert len(runs) == 1
    acc = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _validation():
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(5))
    plan = _recipe().plan(2)
    render = lambda m: sample(m, noise, plan.final, 1)  # noqa: E731
    return Validation(render=render, reference=sample(_teacher, noise, plan.final, 16),
                      picture=lambda s, r: np.zeros((8, 8, 3), np.uint8))


def _params(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def _train(monitor=None, ckpt=None):
    torch.manual_seed(0)
    return train_plan(VelocityMLP(2, 16, 2), _teacher, _data_fn, _recipe(), 2, monitor=monitor, checkpoints=ckpt)


def test_scalars_per_step_and_per_window_land_in_tensorboard(tmp_path):
    mon = Monitor(MonitorConfig(log_every=3, validate_every=6), tmp_path, "tiny", _validation())
    res = _train(mon)
    mon.close()
    ev = _events(tmp_path)
    tags = set(ev.Tags()["scalars"])
    for name in ("loss", "mse", "direction", "grad_norm", "lr", "ema_decay", "stage", "teacher_nfe", "samples_per_s"):
        assert f"train/{name}" in tags
    assert {f"window_mse/K4_w{i}" for i in range(1, 5)} <= tags and {"window_cos/K2_w1", "window_cos/K2_w2"} <= tags
    # one global step axis: stage 2 continues where stage 1 ended, a point every 3 steps
    steps = [e.step for e in ev.Scalars("train/loss")]
    assert steps == list(range(3, 2 * STEPS + 1, 3))
    assert [e.value for e in ev.Scalars("train/stage")] == [1] * 4 + [2] * 4
    # each point is the mean of its 3 steps' losses, as the fit recorded them
    losses = res.stages[0].losses + res.stages[1].losses
    want = [np.mean(losses[s - 3:s]) for s in steps]
    assert [e.value for e in ev.Scalars("train/loss")] == pytest.approx(want, rel=1e-6)
    # the loss is MSE + lam * direction, and the window MSEs average to the batch MSE (weighted by their counts)
    mse, direc = ev.Scalars("train/mse"), ev.Scalars("train/direction")
    assert [e.value for e in ev.Scalars("train/loss")] == pytest.approx(
        [m.value + 0.5 * d.value for m, d in zip(mse, direc)], rel=1e-5)
    cos = [e.value for e in ev.Scalars("window_cos/K4_w1")]
    assert all(-1 <= c <= 1 for c in cos)
    # the EMA decay ramps like diffusers' EMAModel, min(0.9, (1 + n) / (10 + n)) with n updates before this one
    assert ev.Scalars("train/ema_decay")[0].value == pytest.approx(min(0.9, 3 / 12))
    # the teacher's evaluations add up over stages: 2 Euler steps per pair per window, 32 pairs a step
    nfe = {e.step: e.value for e in ev.Scalars("train/teacher_nfe")}
    assert nfe[STEPS] == pytest.approx(res.stages[0].teacher_nfe)
    assert nfe[2 * STEPS] == pytest.approx(res.stages[0].teacher_nfe + res.stages[1].teacher_nfe)
    # validation: fidelity at steps 6, 12, 18, 24, the student's picture each time, the teacher's once
    fid = ev.Scalars("validation/fidelity_rmse")
    assert [e.step for e in fid] == [6, 12, 18, 24]
    assert sorted(ev.Tags()["images"]) == ["validation/student", "validation/teacher"]
    assert len(ev.Images("validation/teacher")) == 1 and len(ev.Images("validation/student")) == 4
    assert (tmp_path / "validation" / "tiny" / "step-0000024.png").is_file()
    assert (tmp_path / "validation" / "tiny" / "teacher.png").is_file()
    # the last fidelity is the student's RMSE to the teacher from the same noise, recomputed here
    v = _validation()
    assert fid[-1].value == pytest.approx(float(torch.sqrt(torch.mean((v.render(res.student) - v.reference) ** 2))),
                                          rel=1e-5)


def test_validation_and_logging_do_not_change_what_is_trained(tmp_path):
    plain = _train()
    watched = _train(Monitor(MonitorConfig(log_every=1, validate_every=2), tmp_path, "w", _validation()))
    assert torch.equal(_params(plain.student), _params(watched.student))
    assert plain.stages[1].losses == watched.stages[1].losses


def test_a_resumed_run_continues_its_curve_without_duplicate_points(tmp_path):
    full = Monitor(MonitorConfig(log_every=2), tmp_path / "full", "r")
    _train(full, CheckpointConfig(tmp_path / "full" / "ck", every=4))
    full.close()

    class Killed(Exception):
        pass

    def kill_at_19(stage, done, _model, _result):  # a kill after global step 18 was logged; last checkpoint: 16
        if stage * STEPS + done == 19:
            raise Killed

    mon = Monitor(MonitorConfig(log_every=2), tmp_path / "cut", "r")
    torch.manual_seed(0)
    with pytest.raises(Killed):
        train_plan(VelocityMLP(2, 16, 2), _teacher, _data_fn, _recipe(), 2, monitor=mon, on_step=kill_at_19,
                   checkpoints=CheckpointConfig(tmp_path / "cut" / "ck", every=4))
    mon.close()
    mon = Monitor(MonitorConfig(log_every=2), tmp_path / "cut", "r")
    _train(mon, CheckpointConfig(tmp_path / "cut" / "ck", every=4, resume=True))
    mon.close()
    got, want = _events(tmp_path / "cut").Scalars("train/loss"), _events(tmp_path / "full").Scalars("train/loss")
    # steps 17-18 were logged twice (before the kill and after the resume from step 16); one point each remains
    assert [e.step for e in got] == [e.step for e in want] == list(range(2, 2 * STEPS + 1, 2))
    assert [e.value for e in got] == pytest.approx([e.value for e in want], rel=1e-6)


def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path, capsys):
    class Broken:
        name = "tensorboard"

        def log(self, values, step):
            raise OSError("disk full")

    mon = Monitor(MonitorConfig(log_every=1), tmp_path, "b")
    mon.trackers = [Broken()]
    res = _train(mon)
    assert len(res.stages[1].losses) == STEPS
    err = capsys.readouterr().err
    assert err.count("warning: the tensorboard tracker failed") == 1 and "disk full" in err
    # a validation render that fails (out of memory, say) is reported once and switched off; training goes on
    v = _validation()
    v.render = lambda m: (_ for _ in ()).throw(MemoryError("no room"))
    res = _train(Monitor(MonitorConfig(report_to="none", validate_every=2), tmp_path / "v", "v", v))
    assert len(res.stages[1].losses) == STEPS
    err = capsys.readouterr().err
    assert err.count("warning: validation failed") == 1 and "no room" in err


def test_none_writes_nothing_and_bad_settings_are_refused(tmp_path):
    mon = Monitor(MonitorConfig(report_to="none", log_every=1), tmp_path, "n")
    _train(mon)
    assert not (tmp_path / "logs").exists()
    with pytest.raises(ProReflowError, match="--report-to must be one of"):
        MonitorConfig(report_to="mlflow")
    with pytest.raises(ProReflowError, match="validate-every"):
        MonitorConfig(validate_every=-1)
    with pytest.raises(ProReflowError, match="log-every"):
        MonitorConfig(log_every=0)


def test_image_grid_lays_images_out_row_by_row():
    imgs = torch.zeros(5, 1, 2, 3)
    imgs[4] = 1.0  # the fifth image: second row, second column with 4 columns
    g = image_grid(imgs, cols=4)
    assert g.shape == (2 * 3 - 1, 4 * 4 - 1, 3) and g.dtype == np.uint8
    assert (g[3:5, 4:7] == 255).all() and (g[0:2, 0:3] == 0).all()
    assert (g[2, :] == 255).all()  # the gap between rows
    assert math.isclose(float(g[3:5, 8:11].mean()), 255.0)  # empty cells stay white


def test_cli_train_writes_curves_and_validation_pictures(tmp_path):
    from typer.testing import CliRunner

    from proreflow.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--method", "proreflow", "--steps", "2", "--budget", "4", "--base-steps", "2",
                                 "--out", str(out), "--quiet", "--validate-every", "2"])
    assert r.exit_code == 0, r.output
    ev = _events(out)
    assert {"train/loss", "validation/fidelity_rmse"} <= set(ev.Tags()["scalars"])
    assert [e.step for e in ev.Scalars("train/loss")][-1] == 4
    pictures = sorted(p.name for p in (out / "validation" / "proreflow-k2").iterdir())
    # every 2 steps and at the end of each stage (the toy preset's proreflow splits 4 steps over its stages)
    assert {"step-0000002.png", "step-0000004.png", "teacher.png"} <= set(pictures)
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "x"), "--report-to", "mlflow"])
    assert r.exit_code == 2 and "--report-to must be one of" in r.stderr and not (tmp_path / "x").exists()


def test_only_the_main_process_writes(tmp_path):
    """Under `accelerate launch` every process builds the monitor; the others log and render nothing."""
    mon = Monitor(MonitorConfig(log_every=1, validate_every=4), tmp_path, "rank1", _validation(), is_main=False)
    rendered = []
    mon.validation.render = lambda m: rendered.append(1) or torch.zeros(16, 2)
    _train(mon)
    mon.close()
    assert list(tmp_path.iterdir()) == [] and rendered == []


def test_wandb_goes_through_accelerates_tracker_with_a_stable_run_id(tmp_path, monkeypatch):
    """wandb is not installed here: a stand-in module records what accelerate's WandBTracker calls, so the wiring
    (project, run name, offline-friendly dir, resumable id, scalars and images by step) is checked."""
    import sys
    import types

    calls = {"init": [], "log": []}

    class Run:
        def log(self, values, step=None):
            calls["log"].append((step, sorted(values)))

        def finish(self):
            calls["finish"] = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or Run()
    fake.Image = lambda array: ("image", array.shape)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for attempt in range(2):  # a second run in the folder (a resume) gets the same wandb run id
        mon = Monitor(MonitorConfig(report_to="wandb", log_every=6, validate_every=12), tmp_path, "w", _validation())
        _train(mon)
        mon.close()
    first, second = calls["init"]
    assert first["project"] == "proreflow" and first["name"] == "w" and first["resume"] == "allow"
    assert first["dir"] == str(tmp_path / "logs") and first["id"] == second["id"]
    steps = [s for s, keys in calls["log"][: len(calls["log"]) // 2]]
    # scalars; at validation steps also the fidelity and each picture (WandBTracker logs images one key a call)
    assert steps == [6, 12, 12, 12, 12, 18, 24, 24, 24]
    keys = [k for _, k in calls["log"][:9]]
    assert keys[3:5] == [["validation/student"], ["validation/teacher"]] and keys[7] == ["validation/fidelity_rmse"]


def test_points_image_draws_both_point_sets():
    from proreflow.training import points_image

    img = points_image(torch.zeros(10, 2), torch.ones(10, 2))
    assert img.dtype == np.uint8 and img.shape == (240, 240, 3)
    assert (img < 250).any()  # something was drawn on the white background

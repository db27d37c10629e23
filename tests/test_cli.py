"""CLI behaviour: bad input gives one clear line and exit code 2; a tiny demo runs end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from proreflow.cli import app

runner = CliRunner()


def _bad_npy(tmp_path, name, arr=None, raw=None):
    p = tmp_path / name
    if raw is not None:
        p.write_bytes(raw)
    else:
        np.save(p, arr, allow_pickle=True)
    return p


TRAIN = ["train", "--budget", "4", "--base-steps", "4"]

BAD_INPUTS = [
    (["demo", "--dataset", "nosuch"], "unknown dataset"),
    (["demo", "--data", "{tmp}/missing.npy"], "does not exist"),
    (["demo", "--data", "{garbage}"], "not a readable .npy"),
    (["demo", "--data", "{nan}"], "NaN or infinite"),
    (["demo", "--data", "{oned}"], "N x D"),
    (["demo", "--data", "{narrow}"], "at least 2 dimensions"),
    (["demo", "--data", "{strings}"], "numeric"),
    (["demo", "--data", "{pickled}"], "not a readable .npy"),
    (["demo", "--data", "{few}"], "at least"),
    (["demo", "--data", "{nan}", "--dataset", "moons"], "not both"),
    (["demo", "--steps", "0"], "between 1 and"),
    (["demo", "--steps", "two"], "comma-separated"),
    (["demo", "--steps", "2,2"], "duplicates"),
    (["demo", "--steps", "3"], "does not reach 3 windows"),
    (["demo", "--budget", "0"], "budget_steps must be"),
    (["demo", "--config", "{tmp}/nope.yaml"], "does not exist"),
    (["demo", "--config", "{badkey}"], "did you mean 'budget_steps'"),
    (["demo", "--config", "{badtype}"], "train.lr must be a number"),
    (["demo", "--config", "{badyaml}"], "not valid YAML"),
    (["demo", "--config", "{badmargin}"], "margin (window_margin) must be in [0, 1)"),
    (["demo", "--config", "{badsolver}"], "solver steps must be a positive integer"),
    ([*TRAIN, "--method", "proreflw"], "did you mean 'proreflow'"),
    ([*TRAIN, "--method", "teacher-euler"], "nothing to train"),
    ([*TRAIN, "--steps", "3"], "does not reach 3 windows"),
    ([*TRAIN, "--resume", "first"], "--resume takes 'latest'"),
    ([*TRAIN, "--resume", "latest"], "no run to resume"),
    ([*TRAIN, "--cached-pairs", "-1"], "--cached-pairs must be >= 0"),
    ([*TRAIN, "--checkpoint-every", "0"], "checkpoint interval"),
    ([*TRAIN, "--keep", "0"], "at least 1 checkpoint"),
    ([*TRAIN, "--data", "{nan}"], "NaN or infinite"),
    (["demo", "--seed", "99999999999999999999"], "--seed must be between 0 and"),
    ([*TRAIN, "--seed", "-1"], "--seed must be between 0 and"),
    (["demo", "--config", "{binary}"], "is not UTF-8 text"),
    (["demo", "--config", "{nomodes}"], "gmm needs n_modes >= 1"),
    (["demo", "--config", "{nanlam}"], "lam must be a number >= 0"),
    (["demo", "--time-sampling", "middle"], "--time-sampling must be uniform, start, mixture or mixture:P"),
    ([*TRAIN, "--time-sampling", "mixture:1.5"], "start_fraction must be in [0, 1]"),
]


@pytest.mark.parametrize("args, needle", BAD_INPUTS)
def test_bad_input_exits_2_with_one_clear_line_and_touches_nothing(tmp_path, args, needle):
    rng = np.random.default_rng(0)
    files = {
        "tmp": str(tmp_path),
        "garbage": _bad_npy(tmp_path, "garbage.npy", raw=b"not an npy file"),
        "nan": _bad_npy(tmp_path, "nan.npy", np.array([[np.nan, 1.0]] * 50)),
        "oned": _bad_npy(tmp_path, "oned.npy", rng.normal(size=100)),
        "narrow": _bad_npy(tmp_path, "narrow.npy", rng.normal(size=(100, 1))),
        "strings": _bad_npy(tmp_path, "strings.npy", np.array([["a", "b"]] * 50)),
        "pickled": _bad_npy(tmp_path, "pickled.npy", np.array([{"a": 1}] * 30, dtype=object)),
        "few": _bad_npy(tmp_path, "few.npy", rng.normal(size=(5, 2))),
    }
    for key, text in {"badkey": "budget_step: 10\n", "badtype": "train: {lr: fast}\n", "badyaml": "train: [\n",
                      "badmargin": "time_sampling: {margin: 1.5}\n", "badsolver": "teacher_solver: {steps: 0}\n",
                      "nomodes": "gmm: {n_modes: 0}\n", "nanlam": "methods: [{name: p, lam: .nan}]\n"}.items():
        (tmp_path / f"{key}.yaml").write_text(text)
        files[key] = str(tmp_path / f"{key}.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage\x80")
    files["binary"] = str(tmp_path / "binary.yaml")
    args = [a.format(**files) for a in args]
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("earlier results")
    result = runner.invoke(app, [*args, "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert needle in result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # nothing written, nothing removed
    assert (out / "results.json").read_text() == "earlier results"


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "proreflow.cli", "demo", "--dataset", "nosuch", "--quiet",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown dataset") and "Traceback" not in proc.stderr


def test_tiny_demo_end_to_end(tmp_path):
    """A small budget on the exact GMM: every method trained at the same budget, and the 2-step
    ProReflow student far closer to the teacher's ODE than the teacher's own 2 Euler steps.

    Straightness is checked on 2-rectified flow, trained at uniform times: the windowed students train at
    window starts only (the preset's time sampling), so their velocity inside a window is not trained."""
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--steps", "2", "--out", str(out), "--quiet", "--budget", "300",
                                 "--base-steps", "600", "--seed", "0"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in rows} == {"teacher-euler", "2-rectified-flow", "perflow", "proreflow-no-aligned",
                                           "proreflow-no-progressive", "proreflow"}
    for r in rows:
        assert set(r) >= {"method", "steps", "fidelity_rmse", "distance_swd", "distance_energy", "straightness",
                          "teacher_nfe_per_pair", "seed"}
        assert r["steps"] == 2 and r["seed"] == 0
    by = {r["method"]: r for r in rows}
    assert by["teacher-euler"]["teacher_nfe_per_pair"] == 0
    assert by["proreflow"]["teacher_nfe_per_pair"] == by["perflow"]["teacher_nfe_per_pair"] == 16
    assert by["proreflow"]["optimizer_steps"] == by["2-rectified-flow"]["optimizer_steps"] == 300
    assert by["proreflow"]["fidelity_rmse"] < 0.6 * by["teacher-euler"]["fidelity_rmse"]
    assert by["2-rectified-flow"]["straightness"] < 0.2 * by["teacher-euler"]["straightness"]
    assert by["proreflow"]["time_sampling"] == "start" and by["2-rectified-flow"]["time_sampling"] == "uniform"
    assert (out / "results.md").read_text().count("\n|") >= 7
    for png in ("samples.png", "trajectories.png"):
        assert (out / png).stat().st_size > 10_000


@pytest.mark.parametrize("source", ["moons", "file"])
def test_learned_teacher_runs_on_builtin_and_user_data(tmp_path, source):
    """Built-in sets and a user's 3-D point file go through the learned (flow-matching) teacher."""
    if source == "file":
        f = tmp_path / "pts.npy"
        np.save(f, np.random.default_rng(0).normal(size=(300, 3)) * [1.0, 2.0, 0.5])
        args = ["--data", str(f)]
    else:
        args = ["--dataset", "moons"]
    out = tmp_path / "o"
    result = runner.invoke(app, ["demo", *args, "--steps", "2", "--out", str(out), "--quiet", "--budget", "6",
                                 "--base-steps", "10"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 6 and all(np.isfinite(r["fidelity_rmse"]) for r in rows)
    assert "flow-matching MLP on " + ("pts.npy" if source == "file" else "moons") in (out / "results.md").read_text()

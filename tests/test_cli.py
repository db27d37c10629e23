"""CLI behaviour: the console script exits 2 without a traceback; a tiny demo runs end to end (bad input: test_bad_input.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from proreflow.cli import app

runner = CliRunner()


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
    # a second demo into the folder is refused (it used to replace these results silently); --overwrite replaces them
    before = (out / "results.json").read_bytes()
    again = ["demo", "--steps", "1", "--out", str(out), "--quiet", "--budget", "4", "--base-steps", "2"]
    result = runner.invoke(app, again)
    assert result.exit_code == 2 and "already holds a demo's results" in result.stderr, result.output
    assert (out / "results.json").read_bytes() == before
    result = runner.invoke(app, [*again, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert {r["steps"] for r in json.loads((out / "results.json").read_text())} == {1}
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
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(rows) == ["teacher-euler", "2-rectified-flow", "perflow", "proreflow-no-aligned",
                          "proreflow-no-progressive", "proreflow"]
    students = [r for m, r in rows.items() if m != "teacher-euler"]
    # every student: the 6-step budget, and pairs from 4 rk4 steps (4 evaluations each) over its window
    assert all(r["optimizer_steps"] == 6 and r["teacher_nfe_per_pair"] == 16 and r["steps"] == 2 for r in students)
    assert rows["teacher-euler"]["optimizer_steps"] == 0 and rows["teacher-euler"]["teacher_nfe_per_pair"] == 0
    assert [r["lam"] for r in students] == [0.0, 0.0, 0.0, 1.0, 1.0]
    # 2 Euler steps of the learned teacher are off its own many-step solution, but on the data's scale, not wild
    scale = 1.0 if source == "file" else 0.5
    assert all(0.01 < r["fidelity_rmse"] < scale for r in rows.values()), {m: r["fidelity_rmse"] for m, r in rows.items()}
    assert "flow-matching MLP on " + ("pts.npy" if source == "file" else "moons") in (out / "results.md").read_text()


def test_an_exit_from_inside_a_command_passes_through_our_error_handling():
    """`proreflow --help | head -1` ended in a traceback: rich exits on the broken pipe, and our handler's `except`
    named `click.exceptions.Abort`, which the installed typer's click copy lacks, so any exception reaching it
    (SystemExit here) became an AttributeError."""
    import typer

    from proreflow.cli import _Commands

    demo = typer.Typer(cls=_Commands)

    @demo.command()
    def boom() -> None:
        sys.exit(3)

    @demo.command()
    def other() -> None:
        pass

    with pytest.raises(SystemExit) as exc:
        typer.main.get_command(demo).main(["boom"], prog_name="demo")
    assert exc.value.code == 3
    r = subprocess.run(f"{sys.executable} -m proreflow.cli --help | head -c 10", shell=True, capture_output=True,
                       text=True)
    assert "Traceback" not in r.stderr, r.stderr


def test_quiet_sends_warnings_to_a_log_and_the_error_line_comes_last(tmp_path, monkeypatch):
    """Errors used to come after lines of third-party warnings even with --quiet (issue 26 item 7)."""
    import logging
    import warnings

    from proreflow.errors import ProReflowError

    def noisy_load(model):
        warnings.warn("`some_option` is deprecated and will be removed", FutureWarning)
        logging.getLogger("diffusers.pipelines").warning("an unexpected key was ignored")
        raise ProReflowError("cannot load the teacher")

    monkeypatch.setattr("proreflow.apps.sd.run.load_pipeline", noisy_load)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    args = ["distill", "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    r = runner.invoke(app, [*args, "--quiet"])
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: cannot load the teacher")
    log = r.stderr.split("warnings and library messages: ")[1].rstrip(")\n")
    text = open(log, encoding="utf-8").read()
    assert "deprecated" in text and "an unexpected key was ignored" in text
    r = runner.invoke(app, args)  # without --quiet nothing is rerouted and no log is named
    assert r.exit_code == 2 and "library messages" not in r.stderr

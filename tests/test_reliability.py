"""Crash safety: SIGKILL/SIGTERM then --resume gives bitwise the same student; 2-process runs match 1-process."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from proreflow.errors import ProReflowError
from proreflow.store import atomic_save_tensors
from proreflow.training.checkpoint import CheckpointConfig, load_tensors

BUDGET, BASE, EVERY = 60, 30, 3
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "proreflow.cli", "train", "--method", "proreflow", "--steps", "2", "--out", str(out),
            "--budget", str(BUDGET), "--base-steps", str(BASE), "--checkpoint-every", str(EVERY), "--quiet", *extra]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out, *extra), capture_output=True, text=True, env=ENV, timeout=300)


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr
    return out / "student.safetensors"


def _wait_for(path_glob: str, root: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    end = time.time() + timeout
    while time.time() < end:
        found = sorted(root.glob(path_glob))
        if found:
            return found[-1]
        if proc.poll() is not None:
            pytest.fail(f"run ended before {path_glob} appeared: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.01)
    pytest.fail(f"{path_glob} did not appear")


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(tmp_path, reference):
    rng = random.Random(20261126)
    fit = rng.choice(["base", "stage-1", "stage-2", "stage-3"])
    fit_steps = {"base": BASE, "stage-1": 20, "stage-2": 20, "stage-3": 20}[fit]
    step = rng.choice(range(EVERY, fit_steps, EVERY))
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(f"checkpoints/{fit}/step-{step:08d}", out, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "student.safetensors").exists()
    resumed = _run(out, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert _same_weights(out / "student.safetensors", reference), f"killed in {fit} after step {step}"


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, reference):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for("checkpoints/stage-1/step-*", out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted" in err and "continue with --resume latest" in err
    saved = Path(err.split("checkpoint: ")[1].split(";")[0])
    # a step checkpoint, or the stage's final weights when SIGTERM landed on its last step
    assert (saved / "state.safetensors").is_file() or (saved.name == "final.safetensors" and saved.is_file())
    resumed = _run(out, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert _same_weights(out / "student.safetensors", reference)


def test_sigint_prints_one_aborted_line_and_exits_130_and_the_run_resumes(tmp_path, reference):
    """Issue 26: Ctrl-C exited 130 with no word (typer turns KeyboardInterrupt into a silent exit 130)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's job
    _wait_for("checkpoints/stage-1/step-*", out, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: aborted; a run with checkpoints continues with --resume latest"
    assert "Traceback" not in err
    resumed = _run(out, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert _same_weights(out / "student.safetensors", reference)


def test_existing_run_is_never_overwritten_and_resume_checks_settings(tmp_path, reference):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(reference.parent, out, dirs_exist_ok=True)
    before = (out / "student.safetensors").read_bytes()
    again = _run(out)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    changed = _run(out, "--resume", "latest", "--seed", "1")
    assert changed.returncode == 2 and "different settings (seed: 0 -> 1)" in changed.stderr
    assert (out / "student.safetensors").read_bytes() == before
    empty = _run(tmp_path / "nothing", "--resume", "latest")
    assert empty.returncode == 2 and "no run to resume" in empty.stderr


def test_corrupt_checkpoint_is_detected_not_used(tmp_path):
    p = tmp_path / "state.safetensors"
    atomic_save_tensors({"w": torch.ones(3)}, p)
    assert torch.equal(load_tensors(p)["w"], torch.ones(3))
    p.write_bytes(p.read_bytes()[:20])  # truncated
    with pytest.raises(ProReflowError, match="corrupt"):
        load_tensors(p)
    with pytest.raises(ProReflowError, match="missing"):
        load_tensors(tmp_path / "nope.safetensors")
    with pytest.raises(ProReflowError):
        CheckpointConfig(tmp_path, every=0)


SHORT = ["--budget", "6", "--base-steps", "4", "--checkpoint-every", "1"]  # later flags override _cmd's


def _accelerate(out: Path, *extra: str) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "proreflow.cli"]
    return subprocess.run(launch + _cmd(out, *SHORT, *extra)[3:], capture_output=True, text=True, env=ENV, timeout=300)


def _flat(d: dict) -> torch.Tensor:
    return torch.cat([d[k].flatten().double() for k in sorted(d)])


def test_two_process_training_matches_one_process_and_resumes(tmp_path):
    """Same global batch: 2 gloo processes give the 1-process weights within float tolerance
    (short run: over hundreds of steps Adam amplifies reduction-order rounding); a 2-process run
    resumed from a mid-run checkpoint ends bitwise where the uninterrupted one did."""
    single = _run(tmp_path / "one", *SHORT)
    assert single.returncode == 0, single.stderr
    out = tmp_path / "ddp"
    proc = _accelerate(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for fit in ("base", "stage-1", "stage-2", "stage-3"):
        a = load_file(str(tmp_path / "one" / "checkpoints" / fit / "final.safetensors"))
        b = load_file(str(out / "checkpoints" / fit / "final.safetensors"))
        assert float((_flat(a) - _flat(b)).norm() / _flat(a).norm()) < 1e-5, fit
    for rank in (0, 1):
        assert (out / "checkpoints" / "stage-2" / "step-00000001" / f"rng-rank{rank}.json").is_file()
    # simulate a crash right after stage-2's first checkpoint: drop what came later, resume on 2 processes
    final = out / "student.safetensors"
    keep = tmp_path / "uninterrupted.safetensors"
    shutil.copy(final, keep)
    for p in [final, out / "metrics.json", out / "checkpoints" / "stage-3", out / "checkpoints" / "stage-2" / "final.safetensors"]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    resumed = _accelerate(out, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _same_weights(final, keep)
    assert json.loads((out / "metrics.json").read_text())["optimizer_steps"] == 6

"""Checksummed checkpoints: a damaged checkpoint is never resumed from. Resume falls back to the newest intact
one (saying which and why) and still ends bitwise where an uninterrupted run ends; with none intact it stops
with exit 2, and the advice it gives (delete that stage's folder) works."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from proreflow.cli import app
from proreflow.errors import ProReflowError
from proreflow.training.checkpoint import CHECKSUMS, CheckpointConfig, set_rng_state

runner = CliRunner()
# perflow at 2 steps: a 4-step base fit (checkpoint at step 2) and one 6-step stage (checkpoints at 2 and 4)
ARGS = ["train", "--method", "perflow", "--steps", "2", "--budget", "6", "--base-steps", "4",
        "--checkpoint-every", "2", "--keep", "2", "--quiet"]


@pytest.fixture(scope="module")
def reference(finished_train) -> Path:
    return finished_train("ref", ARGS)


def _killed_copy(reference: Path, dest: Path) -> Path:
    """The run as a kill during stage 1 after its step-4 checkpoint leaves it."""
    shutil.copytree(reference, dest)
    for name in ("student.safetensors", "metrics.json"):
        (dest / name).unlink()
    for p in (dest / "checkpoints" / "stage-1").glob("final*"):
        p.unlink()
    return dest


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _damage(run: Path, how: str) -> str:
    """Break one file the way `how` says; returns the damaged checkpoint's folder name."""
    step4 = run / "checkpoints" / "stage-1" / "step-00000004"
    state = step4 / "state.safetensors"
    if how == "tensor-bit":
        _flip(state, state.stat().st_size - 5)
    elif how == "header-bit":
        _flip(state, 12)  # inside the JSON header that names dtypes, shapes and offsets
    elif how == "meta-step-count":
        meta = json.loads((step4 / "meta.json").read_text())
        meta["done"] = 5
        (step4 / "meta.json").write_text(json.dumps(meta))
    elif how == "truncated":
        state.write_bytes(state.read_bytes()[:1000])
    elif how == "rng-state-empty":
        (step4 / "rng-rank0.json").write_text("{}")
    elif how == "checksums-missing":
        (step4 / CHECKSUMS).unlink()
    elif how == "final-bit":  # the finished base fit: redo its end from its step-2 checkpoint
        final = run / "checkpoints" / "base" / "final.safetensors"
        _flip(final, final.stat().st_size - 5)
        return "final.safetensors"
    return step4.name


@pytest.mark.parametrize("how", ["tensor-bit", "header-bit", "meta-step-count", "truncated", "rng-state-empty",
                                 "checksums-missing", "final-bit"])
def test_damaged_checkpoint_is_skipped_and_resume_still_ends_bitwise_equal(tmp_path, reference, how):
    run = _killed_copy(reference, tmp_path / "run")
    damaged = _damage(run, how)
    result = runner.invoke(app, [*ARGS, "--out", str(run), "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert f"{damaged}' is damaged" in result.stderr
    assert _same(run / "student.safetensors", reference / "student.safetensors")


def test_no_intact_checkpoint_stops_with_exit_2_and_the_advice_works(tmp_path, reference):
    run = _killed_copy(reference, tmp_path / "run")
    for step in (run / "checkpoints" / "stage-1").glob("step-*"):
        _flip(step / "state.safetensors", 100)
    result = runner.invoke(app, [*ARGS, "--out", str(run), "--resume", "latest"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no intact checkpoint") and result.stderr.count("\n") == 1
    assert "2 damaged" in result.stderr and "delete the folder" in result.stderr
    assert not (run / "student.safetensors").exists()
    shutil.rmtree(run / "checkpoints" / "stage-1")  # what the message says to do
    result = runner.invoke(app, [*ARGS, "--out", str(run), "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert _same(run / "student.safetensors", reference / "student.safetensors")


def test_every_checkpoint_file_is_listed_in_its_checksums(reference):
    for step in (reference / "checkpoints").glob("*/step-*"):
        listed = set(json.loads((step / CHECKSUMS).read_text())["sha256"])
        assert listed == {p.name for p in step.iterdir()} - {CHECKSUMS}
        assert {"state.safetensors", "meta.json", "rng-rank0.json"} <= listed
    for fit in (reference / "checkpoints").iterdir():
        assert set(json.loads((fit / "final.checksums.json").read_text())["sha256"]) == {"final.json", "final.safetensors"}


def test_damaged_rng_state_is_one_clear_error():
    with pytest.raises(ProReflowError, match="RNG state in here is damaged"):
        set_rng_state({}, where="here")
    with pytest.raises(ProReflowError, match="damaged"):
        set_rng_state({"python": [3, "x", None], "numpy": []}, where="here")


def test_latest_reports_each_skipped_checkpoint_once(tmp_path, reference):
    run = _killed_copy(reference, tmp_path / "run")
    _damage(run, "tensor-bit")
    fits = CheckpointConfig(run / "checkpoints", resume=True).for_fit("stage-1")
    said: list[str] = []
    assert fits.latest(said.append).name == "step-00000002"
    assert fits.latest(said.append).name == "step-00000002"
    assert len(said) == 1 and "step-00000004" in said[0]


def test_identical_saves_in_two_processes_are_byte_identical(tmp_path):
    """Issue 26: safetensors writes metadata from a Rust HashMap whose order changes per process, so identical runs
    wrote student files whose bytes differed; `atomic_save_tensors` sorts it (8 keys: 1 in 40320 to agree by luck)."""
    import subprocess
    import sys

    code = ("import sys, torch; from pathlib import Path; from proreflow.store import atomic_save_tensors; "
            "atomic_save_tensors({'w': torch.arange(6.0), 'b': torch.ones(2)}, Path(sys.argv[1]), "
            "metadata={k: str(i) for i, k in enumerate('method steps windows seed lam rule source extra'.split())})")
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{name}.safetensors")], check=True)
    a, b = ((tmp_path / f"{n}.safetensors").read_bytes() for n in "ab")
    assert a == b
    from safetensors import safe_open

    assert load_file(str(tmp_path / "a.safetensors"))["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata()["lam"] == "4"

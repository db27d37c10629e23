"""benchmarks/sd_sized.py without its models (fast): how step times are read from the stamps, and what the
script writes when a row fails or the run stops midway (it is run once, on a GPU machine, under a time limit)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "sd_sized.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sd_sized", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_seconds_are_per_stage_and_leave_out_the_stage_switch(bench):
    """Regression: one median over all gaps mixed the 8-window stage (4 teacher steps per pair) with the 4-window
    stage (8), and counted the gap into a stage's first step (a new optimizer, EMA and accelerator)."""
    stamps = [(0, t) for t in (0.0, 10.0, 11.0, 12.0, 13.0, 14.0)] + [(1, t) for t in (40.0, 42.0, 44.0, 46.0, 48.0, 50.0)]
    medians, mean = bench.stage_step_seconds(stamps, skip=1)  # the first gap (10 s) is warm-up
    assert medians == [1.0, 2.0] and mean == pytest.approx(1.5)  # 6 steps of each
    medians, mean = bench.stage_step_seconds([(0, 0.0), (0, 1.0), (1, 5.0)], skip=0)
    assert medians == [1.0, None] and mean is None  # a stage without two timed steps has no time


def _row(arch, rank, **extra):
    return {"arch": arch, "lora_rank": rank, "resolution": 64, "batch": 2, "mixed_precision": "no",
            "gradient_checkpointing": True, "method": "proreflow", "windows": "8->k", "teacher_solver": "euler",
            **extra}


def test_a_failing_row_is_recorded_and_every_row_is_on_disk_at_once(bench, tmp_path, monkeypatch):
    written = []

    def train_row(arch, rank, args, device, tmp):
        if rank == 0:
            raise RuntimeError("CUBLAS_STATUS_ALLOC_FAILED | not an OutOfMemoryError")
        # the rows before this one are already in both files
        res = json.loads(next(tmp_path.glob("sd_sized_*.json")).read_text())
        written.append(len(res["training"]))
        assert (tmp_path / next(tmp_path.glob("sd_sized_*.json")).name.replace(".json", ".md")).is_file()
        return _row(arch, rank, status="ok", optimizer_steps=4, timed_steps=2, seconds_per_step=1.0,
                    stage_seconds_per_step=[0.5, 1.5], pairs_per_s=2.0, teacher_nfe_per_pair=6.0, peak_gib=None)

    def sampling_rows(arch, args, device, tmp):
        raise RuntimeError("sampling broke")

    monkeypatch.setattr(bench, "train_row", train_row)
    monkeypatch.setattr(bench, "sampling_rows", sampling_rows)
    res = bench.main(["--arch", "sd15", "--lora-ranks", "0", "4", "--out", str(tmp_path)])
    assert written == [1]
    failed, ok = res["training"]
    assert failed["status"] == "failed (RuntimeError)" and "CUBLAS_STATUS_ALLOC_FAILED" in failed["error"]
    assert ok["status"] == "ok" and res["sampling"][0]["status"] == "failed (RuntimeError)"
    (js,) = tmp_path.glob("sd_sized_*.json")
    assert js.name.endswith("_sd15.json")  # one file per architecture set: a later --arch sdxl run keeps it
    md = js.with_suffix(".md").read_text()
    assert "| sd15 | full |" in md and "failed (RuntimeError)" in md and "0.500 / 1.500" in md and "| –x |" not in md
    assert all(line.count("|") == md.splitlines()[4].count("|") for line in md.splitlines()[4:8])  # no stray pipes
    assert json.loads(js.read_text()) == res

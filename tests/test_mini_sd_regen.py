"""benchmarks/mini_sd_regen.py's comparison of two students' UNets (no distillation): bitwise equal only when every
tensor is, the largest difference otherwise."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def regen():
    return load_benchmark("mini_sd_regen")


def _student(root: Path, tensors: dict) -> Path:
    (root / "unet").mkdir(parents=True)
    save_file(tensors, str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    return root


def test_compare_tells_bitwise_equal_from_one_ulp_apart(regen, tmp_path):
    w = {"a": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(2)}
    kept = _student(tmp_path / "kept", w)
    assert regen.compare(kept, _student(tmp_path / "same", {k: v.clone() for k, v in w.items()})) == \
        {"tensors": 2, "max_abs_diff": 0.0, "bitwise": True}
    moved = {**w, "b": torch.tensor([0.0, 1e-3])}
    got = regen.compare(kept, _student(tmp_path / "moved", moved))
    assert got["bitwise"] is False and got["max_abs_diff"] == pytest.approx(1e-3)
    ulp = {**w, "a": torch.nextafter(w["a"], torch.full_like(w["a"], float("inf")))}
    assert regen.compare(kept, _student(tmp_path / "ulp", ulp))["bitwise"] is False
    assert regen.compare(kept, _student(tmp_path / "fewer", {"a": w["a"]})) == \
        {"tensors": [2, 1], "max_abs_diff": None, "bitwise": False}


def test_report_names_rows_loads_and_times(regen):
    md = regen.markdown({"command": "python benchmarks/mini_sd_regen.py", "rows": [
        {"row": "w/o aligned", "seed": 0, "tensors": 324, "max_abs_diff": 0.0, "bitwise": True,
         "pair_cache": {"loaded": 25600, "solved": 0}, "seconds": 150.0, "tables_seconds": 504.0}]})
    assert "| w/o aligned | 0 | 2 | 324 | 0.0 | True | 25,600 / 0 | 2.5 | 8.4 |" in md  # no threads kept: 2
    md = regen.markdown({"command": "c", "rows": [
        {"row": "r", "seed": 1, "threads": 1, "tensors": 3, "max_abs_diff": 0.5, "bitwise": False,
         "pair_cache": {"loaded": 0, "solved": 64}, "seconds": 60.0, "tables_seconds": 120.0}]})
    assert "| r | 1 | 1 | 3 | 0.5 | False | 0 / 64 | 1.0 | 2.0 |" in md


def test_the_kept_students_record_gives_its_thread_count(tmp_path):
    record = load_benchmark("mini_sd_distill").student_record
    for scope in ("a", "b", "unfinished"):
        (tmp_path / scope).mkdir()
    (tmp_path / "a" / "model_index.json").write_text("{}")
    (tmp_path / "b" / "model_index.json").write_text("{}")
    (tmp_path / "a.time.json").write_text('{"seconds": 1.0, "threads": 1}')
    (tmp_path / "b.time.json").write_text('{"seconds": 3.0}')  # written before the count was kept
    (tmp_path / "unfinished.time.json").write_text('{"seconds": 1.0, "threads": 1}')  # no exported pipeline
    assert record(tmp_path, "a") == {"seconds": 1.0, "threads": 1}
    assert record(tmp_path, "b") == {"seconds": 3.0, "threads": 2}
    assert record(tmp_path, "unfinished") is None and record(tmp_path, "missing") is None

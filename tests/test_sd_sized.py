"""SD1.5-sized smoke run (slow, excluded from the default suite; `pytest -m slow tests/test_sd_sized.py`).

The default suite uses tiny pipelines; this builds one with SD1.5's real shapes (`models.sd_shapes`: UNet
860M parameters, the VAE and the CLIP ViT-L text encoder at their published configs, random weights) and runs
what users run on it: a LoRA distillation with the preset's method, export, a fresh load, sampling, and
`evaluate` with the student and two published-student samplers. It catches what only real shapes show
(attention head splits, 4 down blocks, 768-wide cross-attention, memory) at 64 px on CPU.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from tiny_sd import caption_folder

from proreflow.apps.coco_eval import EvalConfig, RunSpec, evaluate
from proreflow.apps.sd import DistillConfig, distill, encode_folder, load_pipeline
from proreflow.methods import MethodSpec
from proreflow.models.sd_shapes import build_pipeline
from proreflow.pairs import TeacherSolver
from proreflow.time_sampling import TimeSampling
from proreflow.training import TrainConfig

pytestmark = pytest.mark.slow
RES = 64


def test_sd15_sized_distill_export_sample_and_evaluate(tmp_path):
    build_pipeline("sd15", tmp_path / "parts").save_pretrained(tmp_path / "teacher")
    assert sum(p.numel() for p in UNet2DConditionModel.from_pretrained(tmp_path / "teacher", subfolder="unet")
               .parameters()) > 8.5e8
    images = caption_folder(tmp_path / "images", size=(RES, RES))
    cfg = DistillConfig(gradient_checkpointing=False, time_sampling=TimeSampling(), window_placement="flow",
                        model=str(tmp_path / "teacher"), resolution=RES, steps=4, lora_rank=4,
                        method=MethodSpec("proreflow", windows="4->k", lam=1.0), budget_steps=2,
                        teacher_solver=TeacherSolver("euler", 1),
                        train=TrainConfig(lr=1e-4, batch_size=2, progress=False, seed=0))
    pipe = load_pipeline(cfg.model)
    data = encode_folder(pipe, images, cfg.resolution)
    assert data.latents.shape == (6, 4, RES // 8, RES // 8)
    summary = distill(cfg, pipe, data, tmp_path / "student")
    assert summary["optimizer_steps"] == 2
    student = StableDiffusionPipeline.from_pretrained(tmp_path / "student")
    assert type(student.scheduler).__name__ == "ProReflowScheduler"
    out = student(["a red cat"], num_inference_steps=4, guidance_scale=4.0, height=RES, width=RES, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, RES, RES, 3) and np.isfinite(out).all()

    (tmp_path / "p.txt").write_text("a red cat\nthe dog\n")
    ecfg = EvalConfig(captions="prompts", prompts=str(tmp_path / "p.txt"), resolution=RES, batch_size=2, fid=False,
                      clip=False, warmup_batches=0, timing_batches=1, progress=False, dtype="float32")
    rows = evaluate([RunSpec("student", str(tmp_path / "student"), steps=4, guidance=4.0),
                     RunSpec("perflow rule", str(tmp_path / "teacher"), steps=4, guidance=4.5, scheduler="perflow"),
                     RunSpec("rectified-flow rule", str(tmp_path / "teacher"), steps=1, guidance=0.0,
                             scheduler="rectified-flow")], ecfg, tmp_path / "eval")
    assert [r["images"] for r in rows] == [2, 2, 2] and all(r["seconds_per_image"] > 0 for r in rows)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(results["rows"]) == 3


def test_sd_sized_benchmark_smoke_run(tmp_path):
    """benchmarks/sd_sized.py --smoke: the script GPU sessions run, end to end on CPU (rows, files, ratios)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "sd_sized.py"
    r = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "sd_sized_smoke.json").read_text())
    (train,) = res["training"]
    assert train["status"] == "ok" and train["optimizer_steps"] == 4 and train["seconds_per_step"] > 0
    assert len(train["stage_seconds_per_step"]) == 2 and all(s > 0 for s in train["stage_seconds_per_step"])
    fast, slow = res["sampling"]
    assert (fast["unet_evals"], slow["unet_evals"]) == (8, 50) and fast["speedup_vs_teacher"] > 1.5
    assert "smoke run: not a measurement" in (tmp_path / "sd_sized_smoke.md").read_text()

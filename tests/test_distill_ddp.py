"""`proreflow distill` under `accelerate launch` with 2 CPU (gloo) processes on a tiny SD pipeline."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from tiny_sd import tiny_pipeline

import proreflow.apps.sd.export  # noqa: F401  (diffusers loads ProReflowScheduler only once it is imported)
from proreflow.apps.sd import param_digest
from proreflow.fields.vp import VPSchedule, VPVelocity

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_two_process_distill_ends_with_identical_weights_on_both_ranks(tmp_path):
    tiny_pipeline(tmp_path / "parts").save_pretrained(tmp_path / "teacher")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red cat", "a blue dog", "the dog", "a cat"]):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"model: {tmp_path / 'teacher'}\nresolution: 16\nsteps: 2\n"
                      "method: {name: proreflow, windows: '4->k'}\nbudget_steps: 4\n"
                      "teacher_solver: {method: euler, steps: 2}\nteacher_guidance: 2.0\n"
                      "train: {batch_size: 4, per_device_batch: null, lr: 1.0e-3, ema_decay: 0.5, mixed_precision: \"no\", warmup_steps: 0}\n")
    out = tmp_path / "student"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "proreflow.cli",
              "distill", "--data", str(images), "--out", str(out), "--preset", str(preset), "--quiet"]
    proc = subprocess.run(launch, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "proreflow.json").read_text())
    digests = summary["rank_param_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold the same trained weights
    loaded = StableDiffusionPipeline.from_pretrained(out)
    vp = VPSchedule.from_scheduler(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    assert param_digest(VPVelocity(loaded.unet, vp)) == digests[0]  # and that is what was exported
    teacher = StableDiffusionPipeline.from_pretrained(tmp_path / "teacher").unet.state_dict()
    assert any(not torch.equal(v, teacher[k]) for k, v in loaded.unet.state_dict().items())

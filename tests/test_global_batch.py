"""The global batch of an optimizer step is per-device batch x processes x gradient accumulation, the same on any
number of processes (`TrainConfig.per_device_batch`), and a run may resume on another number of processes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from proreflow.errors import ProReflowError
from proreflow.models.mlp import VelocityMLP
from proreflow.training import TrainConfig, describe_batch, fit, flow_matching_batches, resolve_batch

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _data(n, gen):
    return torch.randn(n, 2, generator=gen) * 0.5 + 1.0, None


def test_accumulation_makes_up_the_global_batch_on_any_number_of_processes():
    cfg = TrainConfig(batch_size=1024, per_device_batch=16)
    assert (resolve_batch(cfg, 8).batch_size, resolve_batch(cfg, 8).grad_accum) == (128, 8)
    assert (resolve_batch(cfg, 1).batch_size, resolve_batch(cfg, 1).grad_accum) == (16, 64)
    assert resolve_batch(TrainConfig(batch_size=64, grad_accum=2), 4) == TrainConfig(batch_size=64, grad_accum=2)
    with pytest.raises(ProReflowError, match="not a multiple of per_device_batch 16 x 3"):
        resolve_batch(cfg, 3)
    with pytest.raises(ProReflowError, match="per_device_batch must be >= 1 and leaves grad_accum at 1"):
        TrainConfig(batch_size=64, per_device_batch=16, grad_accum=2)
    line = describe_batch(cfg, 8, [2000, 2000])
    assert line.startswith("global batch 1024 = 16 per device x 8 process(es) x 8 accumulation step(s)")
    assert "stage 2: 2000 steps x 1024 = 2,048,000 samples" in line


def test_per_device_batch_trains_exactly_like_the_explicit_accumulation():
    torch.manual_seed(0)
    net = VelocityMLP(2, 16, 2)
    a = fit(net, flow_matching_batches(_data, 8), 5, TrainConfig(lr=1e-2, batch_size=32, per_device_batch=8,
                                                                   progress=False)).model
    b = fit(net, flow_matching_batches(_data, 8), 5, TrainConfig(lr=1e-2, batch_size=8, grad_accum=4,
                                                                   progress=False)).model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_run_resumes_on_another_number_of_processes_with_the_same_global_batch(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text("train: {batch_size: 64, per_device_batch: 16}\n")
    args = ["train", "--method", "perflow", "--steps", "2", "--budget", "4", "--base-steps", "4",
            "--checkpoint-every", "1", "--config", str(config), "--quiet"]
    out = tmp_path / "run"
    one = subprocess.run([sys.executable, "-m", "proreflow.cli", *args, "--out", str(out)], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert one.returncode == 0, one.stderr
    assert json.loads((out / "metrics.json").read_text())["optimizer_steps"] == 4
    for p in [out / "student.safetensors", out / "metrics.json", out / "checkpoints" / "stage-1" / "final.safetensors"]:
        p.unlink()
    shutil.rmtree(out / "checkpoints" / "stage-1" / "step-00000003")  # as if killed after step 2 of 4
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "proreflow.cli"]
    two = subprocess.run(launch + [*args, "--out", str(out), "--resume", "latest"], capture_output=True, text=True,
                         env=ENV, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "resuming on 2 process(es)" in two.stderr and "written by 1" in two.stderr
    assert json.loads((out / "metrics.json").read_text())["optimizer_steps"] == 4
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "student.safetensors")).values())

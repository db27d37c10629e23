"""EMA of trainable parameters only: LoRA runs hold adapter-sized averages, and the exported LoRA is the EMA."""

import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from proreflow.apps.sd import DistillConfig, build_teacher_student, distill, encode_folder, load_pipeline
from proreflow.methods import MethodSpec
from proreflow.pairs import TeacherSolver
from proreflow.time_sampling import TimeSampling
from proreflow.training import TrainableEMA, TrainConfig


def _cfg(model, **kw):
    base = dict(gradient_checkpointing=False, time_sampling=TimeSampling(), window_placement="flow",
                model=str(model), resolution=16, steps=2, method=MethodSpec("proreflow", windows=[2], lam=1.0),
                budget_steps=6, teacher_solver=TeacherSolver("euler", 2), lora_rank=4,
                train=TrainConfig(lr=1e-2, batch_size=4, ema_decay=0.9, progress=False, seed=0))
    base.update(kw)
    return DistillConfig(**base)


def test_lora_ema_holds_only_the_adapters(teacher_dir):  # noqa: F811
    _, student = build_teacher_student(load_pipeline(str(teacher_dir)), _cfg(teacher_dir))
    lora = {n: p for n, p in student.named_parameters() if p.requires_grad}
    ema = TrainableEMA(student, 0.9)
    assert ema.names == list(lora) and all("lora_" in n for n in ema.names)
    assert ema.numel() == sum(p.numel() for p in lora.values())
    assert ema.numel() < 0.2 * sum(p.numel() for p in student.unet.parameters())
    _, full_student = build_teacher_student(load_pipeline(str(teacher_dir)), _cfg(teacher_dir, lora_rank=0))
    full = TrainableEMA(full_student, 0.9)  # full fine-tuning averages the whole UNet
    assert full.numel() == sum(p.numel() for p in full_student.unet.parameters()) > 5 * ema.numel()


def test_exported_lora_weights_are_the_ema_of_the_trained_ones(tmp_path, teacher_dir, image_folder):  # noqa: F811
    cfg = _cfg(teacher_dir)
    pipe = load_pipeline(cfg.model)
    data = encode_folder(pipe, image_folder, cfg.resolution)
    snapshots: list[list[torch.Tensor]] = []
    handle = register_optimizer_step_post_hook(
        lambda opt, *_: snapshots.append([p.detach().clone() for g in opt.param_groups for p in g["params"]]))
    try:
        distill(cfg, pipe, data, tmp_path / "student")
    finally:
        handle.remove()
    assert len(snapshots) == cfg.budget_steps
    ema = [t.clone() for t in snapshots[0]]
    for i, snap in enumerate(snapshots[1:], start=1):  # the warm-up decay min(0.9, (1 + n) / (10 + n))
        d = min(0.9, (1 + i) / (10 + i))
        ema = [e.lerp(s, 1 - d) for e, s in zip(ema, snap)]
    _, student = build_teacher_student(load_pipeline(cfg.model), cfg)
    names = [n.replace("unet.", "", 1).replace(".default", "") for n, p in student.named_parameters() if p.requires_grad]
    saved = load_file(str(tmp_path / "student" / "lora" / "pytorch_lora_weights.safetensors"))
    saved = {k.replace("unet.", "", 1): v for k, v in saved.items()}
    assert set(saved) == set(names)
    for name, expect, last in zip(names, ema, snapshots[-1]):
        assert torch.allclose(saved[name], expect, atol=1e-6), name
    assert any(not torch.allclose(saved[n], last) for n, last in zip(names, snapshots[-1]))  # not the raw weights

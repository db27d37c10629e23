"""Text-to-image distillation of a diffusers Stable Diffusion teacher by progressive reflow.

The same stage loop as the toy (`training.train_plan`): the teacher and the student are
`VPVelocity` views of UNets, the data are VAE latents with their caption embeddings, and the
student is exported as a diffusers pipeline with a `ProReflowScheduler`. With `lora_rank > 0`
the student is LoRA adapters (peft) on the teacher's own UNet and the teacher is that UNet with
the adapters disabled, so one UNet's weights are held; otherwise the UNet is fully fine-tuned.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from proreflow.checkpoint import CheckpointConfig, atomic_write_text
from proreflow.config import from_dict, load_yaml, merge
from proreflow.data.captions import find_pairs, load_image
from proreflow.errors import ProReflowError
from proreflow.methods import MethodSpec
from proreflow.pairs import TeacherSolver
from proreflow.teachers.vp import VPSchedule, VPVelocity
from proreflow.training import TrainConfig, process_state, stop_on_sigterm, train_plan

CONFIG_DIR = Path(__file__).parent / "configs"
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


@dataclass(frozen=True)
class DistillConfig:
    """A distillation preset (configs/sd15-proreflow-*.yaml)."""

    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    resolution: int = 512
    steps: int = 4
    method: MethodSpec = field(default_factory=lambda: MethodSpec("proreflow", windows="8->k", lam=1.0))
    budget_steps: int = 8000
    window_margin: float = 0.0
    teacher_solver: TeacherSolver = field(default_factory=lambda: TeacherSolver("euler", 8, "per_window"))
    teacher_guidance: float = 1.0
    caption_dropout: float = 0.1
    lora_rank: int = 0
    lora_alpha: float | None = None
    gradient_checkpointing: bool = False
    weights_dtype: str = "float32"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        checks = [
            (self.resolution >= 8 and self.resolution % 8 == 0, f"resolution must be a multiple of 8, got {self.resolution}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (0.0 <= self.caption_dropout < 1.0, f"caption_dropout must be in [0, 1), got {self.caption_dropout}"),
            (self.lora_rank >= 0, f"lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}"),
            (self.teacher_guidance >= 1.0, f"teacher_guidance must be >= 1, got {self.teacher_guidance}"),
            (0.0 <= self.window_margin < 1.0, f"window_margin must be in [0, 1), got {self.window_margin}"),
            (self.weights_dtype in ("float32", "float16", "bfloat16"),
             f"weights_dtype must be float32, float16 or bfloat16, got {self.weights_dtype!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ProReflowError(msg)
        self.method.plan(self.steps, self.budget_steps)  # windows must fit the step count


def load_distill_config(path: str | Path | None = None, **overrides: Any) -> DistillConfig:
    """A preset (name in configs/ or a YAML path) with CLI overrides on top."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.suffix and (CONFIG_DIR / f"{p}.yaml").is_file():
            p = CONFIG_DIR / f"{p}.yaml"
        data = load_yaml(p)
    data = merge(data, {k: v for k, v in overrides.items() if v is not None})
    return from_dict(DistillConfig, data, where=str(path or "distill config"))


def load_pipeline(model: str, weights_dtype: str = "float32") -> Any:
    """`StableDiffusionPipeline.from_pretrained` with a clear error when the weights are not available."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    dtype = getattr(torch, weights_dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None,
                                                 requires_safety_checker=False)
    except (OSError, ValueError) as exc:
        raise ProReflowError(
            f"cannot load the teacher {model!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Pass a "
            f"local diffusers folder, or download it once with network access (it is then read from the HF cache; "
            f"set HF_HUB_OFFLINE=1 to use the cache only)") from None
    if not isinstance(pipe, StableDiffusionPipeline):
        raise ProReflowError(f"{model!r} is a {type(pipe).__name__}; this release distills StableDiffusionPipeline "
                             f"teachers (SD1.x/2.x); SDXL is not supported yet")
    return pipe


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: list[str], device: torch.device | str = "cpu") -> Tensor:
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(device))[0].float().cpu()


@torch.no_grad()
def encode_images(pipe: Any, images: Tensor, generator: torch.Generator, batch: int = 8) -> Tensor:
    """VAE latents scaled by the VAE's scaling factor (what the UNet was trained on)."""
    vae = pipe.vae
    out = []
    for i in range(0, images.shape[0], batch):
        x = images[i:i + batch].to(vae.device, vae.dtype)
        out.append(vae.encode(x).latent_dist.sample(generator).float().cpu())
    return torch.cat(out) * vae.config.scaling_factor


@dataclass
class CaptionedLatents:
    latents: Tensor  # (N, C, h, w)
    text: Tensor  # (N, L, D)
    uncond: Tensor  # (1, L, D): the empty prompt, for caption dropout and CFG

    def data_fn(self, caption_dropout: float, with_uncond: bool):
        """(n, generator) -> (x0, cond) with caption dropout; `uncond` rides along for teacher CFG."""

        def draw(n: int, gen: torch.Generator) -> tuple[Tensor, dict]:
            idx = torch.randint(0, self.latents.shape[0], (n,), generator=gen)
            text = self.text[idx].clone()
            drop = torch.rand(n, generator=gen) < caption_dropout
            text[drop] = self.uncond[0]
            cond: dict = {"encoder_hidden_states": text}
            if with_uncond:
                cond["uncond"] = {"encoder_hidden_states": self.uncond.expand(n, -1, -1).clone()}
            return self.latents[idx], cond

        return draw


def encode_folder(pipe: Any, folder: str | Path, resolution: int, seed: int = 0) -> CaptionedLatents:
    pairs = find_pairs(folder)
    images = torch.stack([load_image(p, resolution) for p, _ in pairs])
    gen = torch.Generator().manual_seed(seed)
    return CaptionedLatents(encode_images(pipe, images, gen), encode_prompts(pipe, [c for _, c in pairs]),
                            encode_prompts(pipe, [""]))


class AdaptersOffVelocity(VPVelocity):
    """The teacher when the student is LoRA on the same UNet: the UNet with its adapters disabled."""

    def _call(self, x_tau: Tensor, timestep: Tensor, cond: Any) -> Tensor:
        self.unet.disable_adapters()
        try:
            return super()._call(x_tau, timestep, cond)
        finally:
            self.unet.enable_adapters()


def build_teacher_student(pipe: Any, cfg: DistillConfig) -> tuple[VPVelocity, VPVelocity]:
    vp = VPSchedule.from_scheduler(pipe.scheduler)
    pt = pipe.scheduler.config.get("prediction_type", "epsilon")
    unet = pipe.unet
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.lora_rank:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                    init_lora_weights=True, target_modules=LORA_TARGETS))
        teacher: VPVelocity = AdaptersOffVelocity(unet, vp, pt, cfg.teacher_guidance)
    else:
        teacher = VPVelocity(copy.deepcopy(unet).requires_grad_(False).eval(), vp, pt, cfg.teacher_guidance)
    return teacher, VPVelocity(unet, vp, pt)


def distill(cfg: DistillConfig, pipe: Any, data: CaptionedLatents, out: Path,
            checkpoints: CheckpointConfig | None = None) -> dict:
    """Train the student by the preset's plan and export it as a diffusers pipeline in `out`."""
    from proreflow.diffusers_export import export_pipeline

    plan = cfg.method.plan(cfg.steps, cfg.budget_steps)
    teacher, student = build_teacher_student(pipe, cfg)
    data_fn = data.data_fn(cfg.caption_dropout, with_uncond=cfg.teacher_guidance != 1.0)
    with stop_on_sigterm():
        res = train_plan(student, teacher, data_fn, plan, cfg.teacher_solver, cfg.train, cfg.method.lam,
                         desc=f"{cfg.method.name} k={cfg.steps}", margin=cfg.window_margin,
                         checkpoints=checkpoints, copy_model=False)
    unet = res.student.unet
    summary = {"method": cfg.method.name, "steps": cfg.steps, "windows": list(plan.final.boundaries),
               "stage_windows": [s.schedule.num_windows for s in plan.stages], "lam": cfg.method.lam,
               "optimizer_steps": res.optimizer_steps, "teacher_nfe_per_pair": res.nfe_per_pair,
               "final_loss": res.stages[-1].losses[-1], "lora_rank": cfg.lora_rank}
    state = process_state()
    if state.is_main_process:
        if cfg.lora_rank:
            from peft.utils import get_peft_model_state_dict

            pipe.save_lora_weights(out / "lora", unet_lora_layers=get_peft_model_state_dict(unet),
                                   safe_serialization=True)
            unet.fuse_lora()
            unet.unload_lora()  # a plain UNet: the exported pipeline needs no peft to load
        export_pipeline(pipe, unet, plan.final, out)
        atomic_write_text(out / "proreflow.json", json.dumps(summary, indent=2) + "\n")
    state.wait_for_everyone()
    return summary

"""Text-to-image distillation of a diffusers Stable Diffusion teacher by progressive reflow.

The same stage loop as the toy (`training.train_plan`): the teacher and the student are velocity-field
views of UNets (`fields.from_pipeline`), the data are VAE latents with their caption embeddings, and the
student is exported as a diffusers pipeline with a `ProReflowScheduler`. With `lora_rank > 0` the student
is LoRA adapters (peft) on the teacher's own UNet and the teacher is that UNet with the adapters disabled
(`fields.AdaptersOff`), so one UNet's weights are held; otherwise the UNet is fully fine-tuned.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import torch

from proreflow.apps.sd.config import DistillConfig
from proreflow.apps.sd.encode import CaptionedLatents
from proreflow.errors import ProReflowError
from proreflow.fields import AdaptersOff, denoiser, family_of, from_pipeline, teacher_grid, window_placement
from proreflow.store import atomic_write_text, module_digest
from proreflow.training import (Monitor, MonitorConfig, describe_batch, process_state, stop_on_sigterm, train_plan,
                                watching)
from proreflow.training.checkpoint import CheckpointConfig
from proreflow.windows import ProgressivePlan

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def check_prompt_only(plan: ProgressivePlan) -> None:
    """Prompt-only data can only train windows that start at pure noise (t_a = 1)."""
    for k, stage in enumerate(plan.stages):
        late = stage.schedule.boundaries[1:-1]
        if late:
            raise ProReflowError(
                f"stage {k + 1} has {stage.schedule.num_windows} windows; those starting at t = "
                f"{', '.join(f'{t:.3g}' for t in late)} < 1 start from noised real images, which prompt-only data "
                f"lack: pass image data (--data), or use a one-window plan (e.g. method windows: '1') for prompts only")


def param_digest(module: torch.nn.Module) -> str:
    """sha256 of the trainable parameters (names and bytes), to check that all processes agree."""
    return module_digest(module, "trainable")


def build_teacher_student(pipe: Any, cfg: DistillConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    unet = denoiser(pipe)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    frozen = getattr(torch, cfg.weights_dtype)  # the dtype of the weights that are not trained
    if cfg.lora_rank:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(frozen)  # the frozen base, which is also the teacher (adapters off)
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                    init_lora_weights=True, target_modules=LORA_TARGETS))
        teacher: torch.nn.Module = AdaptersOff(from_pipeline(pipe, cfg.teacher_guidance), unet)
    else:
        teacher = from_pipeline(pipe, cfg.teacher_guidance,
                                network=copy.deepcopy(unet).to(frozen).requires_grad_(False).eval())
    # the trained weights in float32 whatever `weights_dtype` holds the frozen ones in: AdamW's updates
    # (lr ~1e-4 of a weight) are below bfloat16's resolution (~4e-3) and would round away. A full fine-tune
    # starts from the weights as loaded: load the pipeline in float32 (`load_pipeline`'s default, what the
    # CLI does) so that only the teacher's copy is rounded to `weights_dtype`
    from diffusers.training_utils import cast_training_params

    cast_training_params(unet, dtype=torch.float32)
    return teacher, from_pipeline(pipe)


def distill(cfg: DistillConfig, pipe: Any, data: CaptionedLatents, out: Path,
            checkpoints: CheckpointConfig | None = None, on_step: Callable[..., None] | None = None,
            monitor: MonitorConfig | None = None, validation_prompts: list[str] | None = None,
            pair_cache: Path | None = None) -> dict:
    """Train the student by the preset's plan and export it as a diffusers pipeline in `out`. `pair_cache`: a folder
    where the teacher's pairs are remembered by their inputs (`pairs.PairMemo`); runs that draw the same pairs
    (another lambda, loss weighting or budget of one preset and seed) load them: the same student, fewer solves.
    `on_step(stage, done, ema_model_fn, result)` runs after every optimizer step (`train_plan`); `monitor` logs
    the curves (and renders `validation_prompts` every `validate_every` steps) under `out`."""
    from proreflow.apps.sd.export import export_pipeline, student_scheduler

    solver = cfg.teacher_solver
    if solver.mode == "placed":  # DDIM's trailing timesteps for a VP teacher placed at its timesteps
        solver = solver.placed_at(teacher_grid(pipe, cfg.window_placement, solver.steps, cfg.resolution))
    recipe = replace(cfg.recipe(cfg.method), placement=window_placement(pipe, cfg.window_placement, cfg.resolution),
                     teacher_solver=solver)
    plan, sampling = recipe.plan(cfg.steps), recipe.sampling
    if data.prompt_only:
        check_prompt_only(plan)
    state = process_state()
    if state.is_main_process:
        print(describe_batch(cfg.train, state.num_processes, [s.steps for s in plan.stages]), flush=True)
    teacher, student = build_teacher_student(pipe, cfg)
    teacher.to(process_state().device)  # the student is placed by accelerate; a frozen copy must follow it
    data_fn = data.data_fn(cfg.caption_dropout, with_uncond=cfg.teacher_guidance != 1.0)
    watch = None
    if monitor is not None:
        shown = None
        if monitor.validate_every and state.is_main_process:  # the teacher's renders: once, before training
            from proreflow.apps.sd.validate import pick_prompts, sd_validation

            shown = sd_validation(pipe, teacher, plan.final, pick_prompts(validation_prompts, None), cfg.resolution,
                                  cfg.train.seed)
        watch = Monitor(monitor, out, "distill", shown)
    with watching(watch), stop_on_sigterm():
        res = train_plan(student, teacher, data_fn, recipe, cfg.steps, checkpoints=checkpoints, copy_model=False,
                         on_step=on_step, monitor=watch, pair_memo=pair_cache)
    unet = denoiser(pipe)  # trained in place (copy_model=False): the student's network
    summary = {"method": cfg.method.name, "steps": cfg.steps, "windows": list(plan.final.boundaries),
               "stage_windows": [s.schedule.num_windows for s in plan.stages], "lam": cfg.method.lam,
               "loss_weighting": cfg.method.loss_weighting, "time_sampling": asdict(sampling), "pair_source": cfg.method.pair_source,
               "window_placement": cfg.window_placement,
               "optimizer_steps": res.optimizer_steps, "teacher_nfe_per_pair": res.nfe_per_pair,
               "student_nfe_per_pair": res.student_nfe_per_pair,
               **({"pair_cache": {"loaded": res.memo_pairs[0], "solved": res.memo_pairs[1]}} if pair_cache else {}),
               "final_loss": res.stages[-1].losses[-1], "lora_rank": cfg.lora_rank, "seed": cfg.train.seed}
    chosen = student_scheduler(pipe, plan.final, cfg.resolution)
    summary.update(scheduler=type(chosen[0]).__name__, scheduler_reason=chosen[1])
    stream = getattr(data, "stream", None)
    if stream is not None:  # what the stream handed out and passed over (this process's shards)
        summary["stream"] = {"samples": stream.seen, "skipped": stream.skipped, "epoch": stream.state.epoch}
        if stream.skipped:
            print(f"note: {stream.skipped} unreadable sample(s) skipped in the streamed data", file=sys.stderr)
    from accelerate.utils import gather_object

    digests = gather_object([param_digest(res.student)]) if state.num_processes > 1 else [param_digest(res.student)]
    summary["rank_param_sha256"] = digests
    if len(set(digests)) != 1:  # DDP keeps replicas equal; a mismatch means a broken launch or nondeterminism
        raise ProReflowError(f"the {len(digests)} processes ended with different trained weights ({digests}); "
                             f"nothing was exported. Check the accelerate launch settings")
    if state.is_main_process:
        if cfg.lora_rank:
            from peft.utils import get_peft_model_state_dict

            pipe.save_lora_weights(out / "lora", **{family_of(pipe).lora_key: get_peft_model_state_dict(unet)},
                                   safe_serialization=True)
            unet.fuse_lora()
            unet.unload_lora()  # a plain UNet: the exported pipeline needs no peft to load
        card = {"base_model": cfg.model, "method": cfg.method.name, "lam": cfg.method.lam,
                "loss_weighting": cfg.method.loss_weighting, "stage_windows": summary["stage_windows"], "teacher_guidance": cfg.teacher_guidance}
        export_pipeline(pipe, unet, plan.final, out, card=card, chosen=chosen)
        print(f"exported {out} with {chosen[1]}", flush=True)
        atomic_write_text(out / "proreflow.json", json.dumps(summary, indent=2) + "\n")
    state.wait_for_everyone()
    return summary

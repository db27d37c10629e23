"""Memory *estimates* (not measurements) for distilling SD1.5 and SDXL, from parameter counts.

The UNets, VAE and text encoders are built on PyTorch's `meta` device from the published diffusers /
transformers configs of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 (written out below), so
parameters are counted exactly without allocating or downloading anything. From those counts:

- per-GPU bytes of weights + gradients + optimizer states + EMA for each training mode proreflow runs
  (full fine-tuning keeps a frozen teacher copy; LoRA keeps one UNet, teacher = adapters off; the EMA
  covers trainable parameters only), with AdamW (8 bytes/param of state) or 8-bit AdamW (2 bytes);
- host RAM per process for the data set distill holds in memory (`--data`, with or without `--encode-cache`;
  not `--stream`): per image its VAE latents (float32) and per caption its text states in the dtype they are
  held in (`apps.sd.encode.TEXT_DTYPE`, float16; float32 for comparison): SD1.5 77 x 768, SDXL 77 x 2048 plus
  the pooled 1280 and 6 float32 time ids. Every process holds the whole set (its batches draw rows from all of
  it), so a node holds this once per process on it;
- the teacher cost per training sample of the preset's stages, in UNet forward-equivalents (a student
  forward + backward counted as 3 forwards): a relative throughput expectation, not a timing.

Activations (resolution, batch, gradient checkpointing) and CUDA/NCCL overheads are NOT included.

    python benchmarks/memory_estimates.py    # seconds on CPU; writes benchmarks/results/memory_estimates.{json,md}
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from proreflow.apps.sd import LORA_TARGETS, load_distill_config
from proreflow.apps.sd.encode import TEXT_DTYPE
from proreflow.store import atomic_write_text
from results_io import write_results

HERE = Path(__file__).parent
GB = 1e9

# diffusers' published unet/config.json values (stable-diffusion-v1-5, stable-diffusion-xl-base-1.0)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                 num_hidden_layers=32, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
MODELS = {
    "SD1.5": dict(unet=SD15_UNET, encoders=[(CLIPTextModel, CLIP_L)], preset="sd15-proreflow-I", lora_rank=64,
                  resolution=512, text_states=(77, 768), pooled=0, time_ids=0),
    "SDXL": dict(unet=SDXL_UNET, encoders=[(CLIPTextModel, CLIP_L), (CLIPTextModelWithProjection, CLIP_BIGG)],
                 preset="sdxl-proreflow", lora_rank=64, resolution=1024, text_states=(77, 2048), pooled=1280, time_ids=6),
}
DATASET = 100_000  # images, for the host-RAM column
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_params(unet: torch.nn.Module, rank: int) -> int:
    """r * (in + out) for every attention projection that proreflow adapts (distill.LORA_TARGETS)."""
    return sum(rank * (m.in_features + m.out_features) for name, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in LORA_TARGETS))


def modes(p: int, lora: int) -> dict[str, dict[str, float]]:
    """Bytes per GPU by component (weights stay fp32 under bf16 autocast unless weights_dtype says otherwise)."""
    return {
        "full, fp32 weights, AdamW": dict(teacher=4 * p, student=4 * p, grads=4 * p, optimizer=8 * p, ema=4 * p),
        "full, fp32 weights, 8-bit AdamW": dict(teacher=4 * p, student=4 * p, grads=4 * p, optimizer=2 * p, ema=4 * p),
        "LoRA, fp32 UNet, AdamW": dict(teacher=0, student=4 * p + 4 * lora, grads=4 * lora, optimizer=8 * lora,
                                       ema=4 * lora),
        "LoRA, bf16 UNet (weights_dtype: bfloat16), AdamW": dict(teacher=0, student=2 * p + 4 * lora, grads=4 * lora,
                                                                 optimizer=8 * lora, ema=4 * lora),
    }


def data_bytes(spec: dict, text_dtype: str) -> dict[str, int]:
    """Host bytes per training sample held in memory: latents (4 x res/8 x res/8 float32), text states and pooled
    text in `text_dtype`, SDXL's time ids in float32 (`apps.sd.encode`)."""
    side = spec["resolution"] // 8
    rows, width = spec["text_states"]
    parts = {"latents": 4 * side * side * 4, "text_states": rows * width * BYTES[text_dtype],
             "pooled_text": spec["pooled"] * BYTES[text_dtype], "time_ids": spec["time_ids"] * 4}
    return {**parts, "total": sum(parts.values())}


def stage_costs(preset: str) -> list[dict]:
    """Teacher UNet calls per sample in each stage (the solver's steps in a window), plus 3 for the student."""
    cfg = load_distill_config(preset)
    plan = cfg.method.plan(cfg.steps, cfg.budget_steps)
    cfg_mult = 2 if cfg.teacher_guidance != 1.0 else 1
    rows = []
    for k, stage in enumerate(plan.stages, start=1):
        lengths = stage.schedule.lengths().tolist()
        teacher = sum(cfg.teacher_solver.steps_for(w) * w for w in lengths) / sum(lengths) * cfg_mult  # length-weighted
        rows.append({"stage": k, "windows": stage.schedule.num_windows, "steps": stage.steps,
                     "teacher_unet_calls_per_sample": teacher, "unet_forward_equivalents_per_sample": teacher + 3})
    return rows


def main() -> None:
    out: dict = {"note": "estimates from parameter counts, not measurements; activations excluded"}
    for name, spec in MODELS.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**spec["unet"])
            vae = AutoencoderKL(**VAE)
            encoders = [cls(CLIPTextConfig(**c)) for cls, c in spec["encoders"]]
        p, lora = count(unet), lora_params(unet, spec["lora_rank"])
        out[name] = {
            "unet_params": p, "lora_rank": spec["lora_rank"], "lora_params": lora, "vae_params": count(vae),
            "text_encoder_params": [count(e) for e in encoders],
            "host_ram_encoders_fp32_gb": 4 * (count(vae) + sum(count(e) for e in encoders)) / GB,
            "gpu_gb_by_mode": {m: {**{k: v / GB for k, v in parts.items()}, "total": sum(parts.values()) / GB}
                               for m, parts in modes(p, lora).items()},
            "preset": spec["preset"], "stages": stage_costs(spec["preset"]),
            "resolution": spec["resolution"],
            "host_bytes_per_sample": {d: data_bytes(spec, d) for d in dict.fromkeys((TEXT_DTYPE, "float32"))},
        }
    res = HERE / "results"
    write_results(res / "memory_estimates", out)  # the numbers first, then the md below
    lines = ["Estimates from parameter counts (UNets built on the meta device from the published configs); "
             "**not measured**. GPU memory per process for weights, gradients, optimizer states and EMA only: "
             "activations (resolution, batch, gradient checkpointing) come on top. "
             "Generated by `python benchmarks/memory_estimates.py`.", "",
             "| model | UNet params | LoRA params (rank) | VAE + text encoders (host RAM, fp32) |", "|---|---|---|---|"]
    for name in MODELS:
        r = out[name]
        lines.append(f"| {name} | {r['unet_params'] / 1e6:.1f} M | {r['lora_params'] / 1e6:.1f} M ({r['lora_rank']}) | "
                     f"{(r['vae_params'] + sum(r['text_encoder_params'])) / 1e6:.1f} M, {r['host_ram_encoders_fp32_gb']:.1f} GB |")
    lines += ["", "| model | mode | teacher | student | grads | optimizer | EMA | total GB |", "|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        for mode, gb in out[name]["gpu_gb_by_mode"].items():
            lines.append(f"| {name} | {mode} | " + " | ".join(f"{gb[k]:.2f}" for k in
                                                         ("teacher", "student", "grads", "optimizer", "ema", "total")) + " |")
    lines += ["", f"Host RAM per process for the data set held in memory (`--data` without `--stream`, with or without "
              f"`--encode-cache`): every process holds all of it, so a node with 8 processes holds 8 copies. Latents "
              f"float32; text states held in {TEXT_DTYPE} (`apps.sd.encode.TEXT_DTYPE`; float32 for comparison):", "",
              "| model | resolution | text states held in | latents / image | text states / caption | pooled + time ids | "
              f"total / sample | {DATASET // 1000}k samples, per process |", "|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        for dtype, b in out[name]["host_bytes_per_sample"].items():
            lines.append(f"| {name} | {out[name]['resolution']} px | {dtype} | {b['latents'] / 1e3:.1f} KB | "
                         f"{b['text_states'] / 1e3:.1f} KB | {(b['pooled_text'] + b['time_ids']) / 1e3:.2f} KB | "
                         f"{b['total'] / 1e3:.1f} KB | {b['total'] * DATASET / GB:.1f} GB |")
    lines += ["", "Relative cost per training sample (teacher UNet calls in the stage's windows, length-weighted, "
              "+ 3 for the student's forward and backward):", "",
              "| preset | stage | windows | optimizer steps | teacher calls / sample | UNet forward-equivalents / sample |",
              "|---|---|---|---|---|---|"]
    for name in MODELS:
        for s in out[name]["stages"]:
            lines.append(f"| {out[name]['preset']} | {s['stage']} | {s['windows']} | {s['steps']} | "
                         f"{s['teacher_unet_calls_per_sample']:.1f} | {s['unet_forward_equivalents_per_sample']:.1f} |")
    atomic_write_text(res / "memory_estimates.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

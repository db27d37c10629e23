"""How exact are text-encoder hidden states stored in bfloat16 or float16 instead of float32?

`--encode-cache` (and the in-memory data) hold one row of text states per caption: 77 x 768 for SD1.5,
77 x 2048 (+ a pooled 1280) for SDXL. This measures, on RANDOM-WEIGHT CLIP text encoders built from configs
(no trained weights are available offline: real CLIP states have larger outlier activations, which matter for
float16's range but not for its relative rounding), the relative error of

- the states themselves, rounded to the storage dtype and read back as float32: ||s' - s|| / ||s||, and the
  largest |value| (float16 overflows at 65504);
- a UNet's output computed in float32 from those states: ||u(s') - u(s)|| / ||u(s)||, next to the error that
  bf16 autocast (the presets' `mixed_precision`) makes in the same UNet from the exact states, for scale.

Encoders: SD1.5's CLIP-L shape (768 wide, 12 layers, last hidden state after the final layer norm) and SDXL's
(CLIP-L penultimate state concatenated with a CLIP-bigG-shaped one, 1280 wide, penultimate state; 8 of bigG's
32 layers to keep this a CPU minute) plus the pooled projection. The UNet is a small random one with the
model's cross-attention width (the SD-sized UNets take minutes per forward on a CPU).

    python benchmarks/text_state_dtype.py    # about a minute on 2 CPU cores; writes results/text_state_dtype.{json,md}
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from proreflow.store import atomic_write_text
from results_io import write_results

HERE = Path(__file__).parent
DTYPES = ("bfloat16", "float16")


def clip(hidden: int, layers: int, heads: int, inner: int, act: str, projection: bool) -> torch.nn.Module:
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=inner, num_attention_heads=heads,
                         num_hidden_layers=layers, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def small_unet(cross: int, sdxl: bool) -> torch.nn.Module:
    kw = dict(addition_embed_type="text_time", addition_time_embed_dim=32,
              projection_class_embeddings_input_dim=6 * 32 + 1280) if sdxl else {}
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=cross,
                                attention_head_dim=8, norm_num_groups=32, **kw).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def rounded(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return x.to(getattr(torch, dtype)).float()


@torch.no_grad()
def measure(name: str, batch: int = 8, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    ids = torch.randint(2, 49408, (batch, 77))
    sdxl = name == "SDXL"
    if sdxl:
        enc1, enc2 = clip(768, 12, 12, 3072, "quick_gelu", False), clip(1280, 8, 20, 5120, "gelu", True)
        out2 = enc2(ids, output_hidden_states=True)
        states = torch.cat([enc1(ids, output_hidden_states=True).hidden_states[-2], out2.hidden_states[-2]], -1)
        pooled = out2[0]
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[1024., 1024., 0., 0., 1024., 1024.]] * batch)}
    else:
        states, pooled, added = clip(768, 12, 12, 3072, "quick_gelu", False)(ids)[0], None, None
    unet = small_unet(states.shape[-1], sdxl)
    x, t = torch.randn(batch, 4, 16, 16), torch.full((batch,), 500)

    def run(s: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
        cond = None if added is None else {**added, "text_embeds": p}
        return unet(x, t, encoder_hidden_states=s, added_cond_kwargs=cond).sample

    ref = run(states, pooled)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = run(states, pooled).float()
    row = {"state_shape": list(states.shape[1:]), "max_abs_state": float(states.abs().max()),
           "unet_rel_error_bf16_autocast_exact_states": rel(autocast, ref), "stored": {}}
    for dtype in DTYPES:
        p = rounded(pooled, dtype) if pooled is not None else None
        row["stored"][dtype] = {"state_rel_error": rel(rounded(states, dtype), states),
                                "pooled_rel_error": rel(p, pooled) if p is not None else None,
                                "unet_rel_error": rel(run(rounded(states, dtype), p), ref)}
    return row


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = {"note": "random-weight CLIP text encoders and small random UNets built from configs, not trained models",
           "torch": torch.__version__, "machine": platform.machine(), "models": {m: measure(m) for m in ("SD1.5", "SDXL")}}
    res = HERE / "results"
    write_results(res / "text_state_dtype", out)  # the numbers first, then the md below
    lines = ["Relative error of text-encoder states stored in a 2-byte dtype and read back as float32, and of a UNet "
             "output computed (float32) from them; **random-weight** encoders and UNets built from configs (see the "
             "script's docstring). Generated by `python benchmarks/text_state_dtype.py`.", "",
             "| model | state (max abs) | stored as | state rel. error | pooled rel. error | UNet output rel. error | "
             "UNet rel. error of bf16 autocast, exact states |", "|---|---|---|---|---|---|---|"]
    for name, r in out["models"].items():
        for dtype, e in r["stored"].items():
            pooled = f"{e['pooled_rel_error']:.1e}" if e["pooled_rel_error"] is not None else "-"
            lines.append(f"| {name} | {'x'.join(map(str, r['state_shape']))} ({r['max_abs_state']:.1f}) | {dtype} | "
                         f"{e['state_rel_error']:.1e} | {pooled} | {e['unet_rel_error']:.1e} | "
                         f"{r['unet_rel_error_bf16_autocast_exact_states']:.1e} |")
    atomic_write_text(res / "text_state_dtype.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

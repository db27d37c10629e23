"""Random-weight Stable Diffusion pipelines with the real architectures' shapes (SD1.5, SDXL), built from
their published component configs without the hub.

Why: the memory and speed of the real UNets can be measured (`benchmarks/sd_sized.py`) and the real shapes
tested offline (4 down blocks, 768/2048-wide cross-attention, SDXL's added embeddings) before any weights
are downloaded. Only the tokenizer is not the real one: CLIP's 49k-token vocabulary is not shipped with
any package, so `word_tokenizer` writes a small byte-pair vocabulary (letters plus whole words); the text
encoders keep their real sizes, so the costs are real (their `eos_token_id` is that vocabulary's end token,
which is what their pooled outputs look up). SD1.5's scheduler is DDIM with the published betas (the hub
ships PNDM with the same betas; training and the benchmark only use the betas).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch

from proreflow.errors import ProReflowError

#: architectures `build_pipeline` knows
ARCHS = ("sd15", "sdxl")
#: the words `word_tokenizer` encodes as one token each by default
WORDS = ("a", "cat", "dog", "photo", "of", "the", "red", "blue")


def word_tokenizer(folder: str | Path, words: Sequence[str] = WORDS, model_max_length: int = 77) -> Any:
    """A CLIPTokenizer over the 26 letters plus `words` (each one token), written to `folder`."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["<|startoftext|>", "<|endoftext|>", "!", *letters, *(c + "</w>" for c in letters),
             *(w + "</w>" for w in words)]
    merges = ["#version: 0.2"]
    for w in words:  # merge each word's letters left to right so that the whole word is one token
        acc = w[0]
        for i, c in enumerate(w[1:], start=1):
            last = i == len(w) - 1
            merges.append(f"{acc} {c}{'</w>' if last else ''}")
            acc += c
            vocab.append(acc + ("</w>" if last else ""))
    vocab = list(dict.fromkeys(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)


def _vae(sample_size: int, scaling_factor: float) -> Any:
    """force_upcast: SDXL's config sets it, SD1.5's lacks the key and gets diffusers' default, also True."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, sample_size=sample_size, scaling_factor=scaling_factor, force_upcast=True)


def _clip_text(hidden: int, layers: int, heads: int, inner: int, act: str, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=inner, num_attention_heads=heads,
                         num_hidden_layers=layers, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build_pipeline(arch: str, folder: str | Path, seed: int = 0, device: str | torch.device | None = None) -> Any:
    """A StableDiffusionPipeline (sd15) or StableDiffusionXLPipeline (sdxl) with random weights and the
    published configs' shapes, in float32; `folder` receives the tokenizer files.

    The networks are made on `device` (default: the CPU): a GPU initialises SDXL's 3.5B random parameters
    in milliseconds where a CPU core needs half a minute, and "meta" gives shapes without memory. The
    scheduler is always made on the CPU, where pipelines and `VPSchedule` expect its tables."""
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    if arch not in ARCHS:
        raise ProReflowError(f"unknown architecture {arch!r}; use one of {list(ARCHS)}")
    folder = Path(folder)
    torch.manual_seed(seed)
    on_device = torch.device(device) if device is not None else nullcontext()
    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    if arch == "sd15":
        with on_device:
            unet = UNet2DConditionModel(
                sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8)
            vae, text = _vae(512, 0.18215), _clip_text(768, 12, 12, 3072, "quick_gelu", False)
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text, tokenizer=word_tokenizer(folder / "tokenizer"), unet=unet,
            scheduler=DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with on_device:
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        vae, text = _vae(1024, 0.13025), _clip_text(768, 12, 12, 3072, "quick_gelu", False)
        text_2 = _clip_text(1280, 32, 20, 5120, "gelu", True)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=word_tokenizer(folder / "tokenizer"),
        tokenizer_2=word_tokenizer(folder / "tokenizer_2"), unet=unet,
        scheduler=EulerDiscreteScheduler(**betas, timestep_spacing="leading"))


def tiny_tokenizer(tmp: Path) -> Any:
    """The `WORDS` tokenizer with 16-token prompts (the tiny text encoders' positions)."""
    return word_tokenizer(tmp, WORDS, model_max_length=16)


def tiny_unet(seed: int = 0, prediction_channels: int = 4) -> Any:
    """A two-block SD-like UNet with 16-wide cross-attention (tests, the input-pipeline benchmark)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=prediction_channels, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=8)


def tiny_pipeline(tmp: Path, prediction_type: str = "epsilon", seed: int = 0) -> Any:
    """A StableDiffusionPipeline of tiny random parts (a one-level VAE, which does not downsample: latents at the image size)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_tokenizer(tmp / "tokenizer")
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False,
                          steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=tiny_unet(seed), scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_sd3_pipeline(tmp: Path, seed: int = 0) -> Any:
    """A StableDiffusion3Pipeline of tiny random parts: an SD3 transformer (flow matching, velocity output), two
    CLIP text encoders with projections and no T5 (SD3 runs without it: its part of the prompt is zeros), a VAE
    with SD3's shift factor, and FlowMatchEulerDiscreteScheduler with SD3's time shift 3."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok, tok2 = tiny_tokenizer(tmp / "tokenizer"), tiny_tokenizer(tmp / "tokenizer_2")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
    kw = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
              max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**kw)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**kw)), tokenizer_2=tok2,
        text_encoder_3=None, tokenizer_3=None)


def tiny_flux_pipeline(tmp: Path, seed: int = 0, guidance_embeds: bool = True, dynamic_shift: bool = True) -> Any:
    """A FluxPipeline of tiny random parts: a FLUX transformer on 2x2-packed latents (16 = 4 x 4 channels), with a
    guidance embedding (dev) or without (schnell), CLIP and a tiny T5 (both tokenizers are the tiny CLIP one:
    FluxPipeline only needs a tokenizer), a two-level VAE with FLUX's shift factor, and FlowMatchEuler with FLUX-dev's
    resolution-dependent shift (or schnell's fixed shift 1)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok, tok2 = tiny_tokenizer(tmp / "tokenizer"), tiny_tokenizer(tmp / "tokenizer_2")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 4, 8))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16))
    # eval(), as from_pretrained leaves a model: T5's dropout would otherwise make every encoding differ
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16, scaling_factor=0.3611, shift_factor=0.1159)
    sched = (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                             base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
             if dynamic_shift else FlowMatchEulerDiscreteScheduler(shift=1.0))
    return FluxPipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=clip, tokenizer=tok,
                        text_encoder_2=t5, tokenizer_2=tok2)


def parameter_counts(pipe: Any) -> dict[str, int]:
    """Parameters per network component of a pipeline (unet, vae, text encoders)."""
    return {name: sum(p.numel() for p in module.parameters()) for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module)}

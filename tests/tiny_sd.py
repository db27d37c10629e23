"""Tiny random-weight Stable Diffusion parts built from configs, offline (no hub)."""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from proreflow.models.sd_shapes import tiny_pipeline, tiny_tokenizer, tiny_unet, word_tokenizer  # noqa: F401

WORDS = ["a", "cat", "dog", "photo", "of", "the", "red", "blue"]
CAPTIONS = ["a red cat", "a blue dog", "a photo of a cat", "the dog", "a cat", "a red dog"]


def caption_folder(root: Path, size: tuple[int, int] = (20, 24), captions=CAPTIONS) -> Path:
    """`root/img<i>.png` (random pixels, height x width = `size`) + `root/img<i>.txt` for each caption."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(caption)
    return root


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL-like: cross-attention on both encoders' concatenated states (16 + 16), and the
    "text_time" added embedding of the pooled text (16) plus 6 size/crop ids x 8 channels."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16)


def tiny_sdxl_pipeline(tmp: Path, seed: int = 0, force_zeros_for_empty_prompt: bool = True):
    """A StableDiffusionXLPipeline of tiny random parts: CLIPTextModel + CLIPTextModelWithProjection,
    two tokenizers, and SDXL's Euler scheduler settings (scaled_linear 0.00085..0.012)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    tok = tiny_tokenizer(tmp / "tokenizer")
    tok2 = tiny_tokenizer(tmp / "tokenizer_2")
    torch.manual_seed(seed)
    kw = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
              max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)
    text = CLIPTextModel(CLIPTextConfig(**kw))
    text2 = CLIPTextModelWithProjection(CLIPTextConfig(**kw))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, sample_size=16, scaling_factor=0.13025)
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=tiny_sdxl_unet(seed), scheduler=sched,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)

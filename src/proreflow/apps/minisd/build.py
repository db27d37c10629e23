"""The mini teacher's components, SD1.5-shaped: AutoencoderKL (4 latent channels), CLIPTokenizer + CLIPTextModel,
UNet2DConditionModel (eps), SD1.5's PNDM scheduler config; and the StableDiffusionPipeline folder they make."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from proreflow.apps.minisd.config import SD15_SCHEDULER, MiniSDConfig, TextSettings, UNetSettings, VAESettings
from proreflow.data.fashion import CLASS_PHRASES, TEMPLATES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: CLIP's pre-tokenizer (lower-cased text): words, single digits, runs of punctuation
_WORDS = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the base alphabet of a CLIP vocab)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def corpus_words(extra: list[str] | None = None) -> list[str]:
    """Words that get one token each: every word of the Fashion-MNIST captions, plus `extra` captions' words."""
    texts = [t.format(a=a, p=p) for t in TEMPLATES for a, p in CLASS_PHRASES] + list(extra or [])
    seen: dict[str, None] = {}
    for text in texts:
        for w in _WORDS.findall(text.lower()):
            seen.setdefault(w, None)
    return list(seen)


def write_tokenizer_files(folder: Path, words: list[str]) -> None:
    """vocab.json and merges.txt of a CLIP BPE tokenizer: the byte alphabet (so any text encodes), and merges that
    build each corpus word left to right into one token."""
    base = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in base + [c + "</w>" for c in base]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    for w in words:
        chars = "".join(_bytes_to_unicode()[b] for b in w.encode("utf-8"))
        symbols = list(chars[:-1]) + [chars[-1] + "</w>"]
        cur = symbols[0]
        for s in symbols[1:]:
            if (cur, s) not in seen:
                seen.add((cur, s))
                merges.append((cur, s))
            cur = cur + s
            vocab.setdefault(cur, len(vocab))
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def make_tokenizer(folder: Path, words: list[str], max_length: int):
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder, words)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                         bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)


def make_text_encoder(s: TextSettings, tokenizer) -> nn.Module:
    """CLIPTextModel at its random initialisation (seeded), frozen."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(s.seed)
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads,
                         max_position_embeddings=s.max_length, projection_dim=s.hidden_size,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def make_vae(s: VAESettings, resolution: int) -> nn.Module:
    from diffusers import AutoencoderKL

    n = len(s.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(s.block_out_channels),
                         layers_per_block=s.layers_per_block, latent_channels=4, norm_num_groups=s.norm_num_groups,
                         sample_size=resolution, scaling_factor=1.0)


def make_unet(s: UNetSettings, latent_size: int, cross_attention_dim: int) -> nn.Module:
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in s.attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(s.attention))
    return UNet2DConditionModel(sample_size=latent_size, in_channels=4, out_channels=4, down_block_types=down,
                                up_block_types=up, block_out_channels=tuple(s.block_out_channels),
                                layers_per_block=s.layers_per_block, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=s.attention_head_dim, norm_num_groups=s.norm_num_groups,
                                mid_block_type="UNetMidBlock2DCrossAttn" if s.attention[-1] else None)


def make_scheduler():
    """SD1.5's shipped scheduler (PNDM, steps_offset 1, set_alpha_to_one false, skip_prk_steps true)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config({k: v for k, v in SD15_SCHEDULER.items() if not k.startswith("_")})


def noise_scheduler():
    """DDPMScheduler on SD1.5's betas: what diffusers' train_text_to_image.py trains with (`add_noise`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config({k: v for k, v in SD15_SCHEDULER.items() if not k.startswith("_")})


class EpsUNet(nn.Module):
    """The UNet as the training loop calls networks: (noisy latents, integer timesteps, text states) -> eps."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.unet(x, t, encoder_hidden_states=cond).sample


class VAEObjective(nn.Module):
    """The VAE as the training loop calls networks: images -> (reconstruction, KL per sample)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, t: Tensor, cond: object = None) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        return recon, posterior.kl()


@torch.no_grad()
def encode_text(tokenizer, text_encoder: nn.Module, captions: list[str], batch: int = 256) -> Tensor:
    """last_hidden_state of each caption, padded to max_length as StableDiffusionPipeline.encode_prompt does."""
    out = []
    for i in range(0, len(captions), batch):
        ids = tokenizer(captions[i:i + batch], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out.append(text_encoder(ids)[0].float())
    return torch.cat(out)


def save_pipeline(folder: Path, vae, text_encoder, tokenizer, unet, tokenizer_files: Path | None = None) -> None:
    """A StableDiffusionPipeline folder (safetensors; no safety checker) that from_pretrained opens. The
    tokenizer's vocab.json and merges.txt (in `tokenizer_files`) are copied beside the tokenizer.json that
    transformers 5 writes, so older transformers' slow CLIPTokenizer reads the folder too."""
    import shutil

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for name in ("vocab.json", "merges.txt") if tokenizer_files is not None else ():
        if not (folder / "tokenizer" / name).is_file():
            shutil.copyfile(tokenizer_files / name, folder / "tokenizer" / name)


def describe(cfg: MiniSDConfig, vae, text_encoder, unet) -> dict:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"vae_parameters": count(vae), "text_encoder_parameters": count(text_encoder),
            "unet_parameters": count(unet), "latent_shape": [4, cfg.latent_size, cfg.latent_size]}

"""Pipelines and their inputs: load a teacher pipeline, encode images (VAE latents) and captions (text
embeddings, SDXL's pooled embeddings and size conditioning) once, optionally into a checksummed cache."""

from __future__ import annotations

import hashlib
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from proreflow.accel import process_state
from proreflow.cond import flatten_cond, unflatten_cond
from proreflow.data.captions import find_pairs, prepare_image
from proreflow.errors import ProReflowError
from proreflow.fields.families import family_of, supported
from proreflow.store import ShardStore


def load_pipeline(model: str, weights_dtype: str = "float32") -> Any:
    """`DiffusionPipeline.from_pretrained` of a teacher of a known family (`fields.families`), with a clear error
    when the weights are not available or the pipeline is not one proreflow distils."""
    from proreflow.apps.sd.export import load_diffusers_pipeline

    pipe = load_diffusers_pipeline(model, "the teacher", torch_dtype=getattr(torch, weights_dtype))
    try:
        family_of(pipe)
    except ProReflowError:
        raise ProReflowError(f"{model!r} is a {type(pipe).__name__}; proreflow distills {', '.join(supported())} "
                             "teachers") from None
    return pipe


def encode_text(pipe: Any, prompts: list[str], batch: int = 64) -> dict[str, Tensor]:
    """Prompt conditioning as the pipeline computes it (its family's `encode_text`)."""
    return family_of(pipe).encode_text(pipe, prompts, batch)


def uncond_text(pipe: Any) -> dict[str, Tensor]:
    """One row of the conditioning the pipeline uses as its negative at sampling, for caption dropout and teacher
    CFG (the empty prompt's, or SDXL's zeros under `force_zeros_for_empty_prompt`), so training matches sampling."""
    return family_of(pipe).uncond_text(pipe)


@torch.no_grad()
def encode_images(pipe: Any, images: Tensor, generator: torch.Generator, batch: int = 8) -> Tensor:
    """VAE latents in the denoiser's space, the inverse of what the pipeline decodes (its family's
    `to_latent_space`). A float16 VAE with `force_upcast` (SDXL's overflows in fp16) encodes in float32, as the
    SDXL pipelines do."""
    vae = pipe.vae
    cfg = vae.config
    dtype = vae.dtype
    upcast = dtype == torch.float16 and bool(cfg.get("force_upcast", False))
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        out = []
        for i in range(0, images.shape[0], batch):
            x = images[i:i + batch].to(vae.device, vae.dtype)
            out.append(vae.encode(x).latent_dist.sample(generator).float().cpu())
    finally:
        if upcast:
            vae.to(dtype=dtype)
    return family_of(pipe).to_latent_space(pipe, torch.cat(out))


@torch.no_grad()
def decode_latents(pipe: Any, z: Tensor, batch: int = 8) -> Tensor:
    """Images in [0, 1] from latents in the UNet's space: the inverse of `encode_images`, as the pipelines decode
    (validation renders, `distill --validate-every`)."""
    vae = pipe.vae
    cfg = vae.config
    z = family_of(pipe).from_latent_space(pipe, z)
    dtype = vae.dtype
    upcast = dtype == torch.float16 and bool(cfg.get("force_upcast", False))
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        out = [vae.decode(z[i:i + batch].to(vae.device, vae.dtype)).sample.float().cpu()
               for i in range(0, z.shape[0], batch)]
    finally:
        if upcast:
            vae.to(dtype=dtype)
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)


@dataclass
class CaptionedLatents:
    """Encoded training data: per-sample conditioning rows and, unless prompt-only, VAE latents."""

    cond: dict[str, Tensor]  # (N, ...) each: text states, and for SDXL pooled text + time ids
    # (1, ...) each: the negative conditioning, prompt keys only (encoder_hidden_states, SDXL's text_embeds);
    # SDXL's `time_ids` describe the image and stay when the caption is dropped, as in the SDXL pipeline
    uncond: dict[str, Tensor]
    latents: Tensor | None = None  # (N, C, h, w); None in prompt-only mode
    latent_shape: tuple[int, int, int] = (4, 64, 64)  # (C, h, w) of the noise in prompt-only mode

    def __post_init__(self) -> None:
        n = {v.shape[0] for v in self.cond.values()}
        if self.latents is not None:
            n.add(self.latents.shape[0])
            self.latent_shape = tuple(self.latents.shape[1:])
        if len(n) != 1:
            raise ProReflowError(f"encoded data have mismatched row counts {sorted(n)}")

    @property
    def prompt_only(self) -> bool:
        return self.latents is None

    def __len__(self) -> int:
        return next(iter(self.cond.values())).shape[0]

    def data_fn(self, caption_dropout: float, with_uncond: bool):
        """(n, generator) -> (x0, cond) with caption dropout; `uncond` rides along for teacher CFG.

        In prompt-only mode x0 is zeros: only windows starting at t = 1 are trained, where
        x_a = (1 - 1) x0 + eps is pure noise and x0 is never seen (see `check_prompt_only`)."""

        def draw(n: int, gen: torch.Generator) -> tuple[Tensor, dict]:
            idx = torch.randint(0, len(self), (n,), generator=gen)
            # text states may be held in 2 bytes (`TEXT_DTYPE`): training gets float32, as the encoders made them
            cond = {k: v[idx].float() if v.is_floating_point() else v[idx] for k, v in self.cond.items()}
            drop = torch.rand(n, generator=gen) < caption_dropout
            for k, u in self.uncond.items():
                cond[k][drop] = u[0]
            if with_uncond:
                cond["uncond"] = {k: self.uncond[k].expand(n, *self.uncond[k].shape[1:]).clone()
                                  if k in self.uncond else cond[k].clone() for k in self.cond}
            x0 = self.latents[idx] if self.latents is not None else torch.zeros(n, *self.latent_shape)
            return x0, cond

        return draw


def encoder_modules(pipe: Any) -> list[Any]:
    """The VAE and every text encoder the pipeline has (SDXL's second, SD3's second and third)."""
    return [pipe.vae, *family_of(pipe).text_encoders(pipe)]


@contextmanager
def encoders_on_device(pipe: Any) -> Iterator[None]:
    """VAE and text encoders on this process's device while encoding, back on the CPU afterwards,
    so that during training the accelerator holds only the UNet(s)."""
    device = process_state().device
    mods = encoder_modules(pipe)
    for m in mods:
        m.to(device)
    try:
        yield
    finally:
        for m in mods:
            m.to("cpu")


def _record_fingerprint(records: list[tuple[Any, str]]) -> str:
    """sha256 over captions and image identities (path + size + mtime, or the bytes themselves)."""
    h = hashlib.sha256()
    for src, caption in records:
        h.update(caption.encode() + b"\0")
        if isinstance(src, (str, Path)):
            st = Path(src).stat()
            h.update(f"{src}|{st.st_size}|{st.st_mtime_ns}".encode())
        elif isinstance(src, (bytes, bytearray)):
            h.update(hashlib.sha256(src).digest())
        elif hasattr(src, "fingerprint"):  # a lazy dataset row
            h.update(src.fingerprint().encode())
        elif isinstance(src, dict):
            h.update(hashlib.sha256(src.get("bytes") or str(src.get("path")).encode()).digest())
        else:  # a PIL image
            h.update(hashlib.sha256(src.tobytes()).digest() + str(src.size).encode())
    return h.hexdigest()


#: the dtype text states (and pooled embeddings) are held in, on disk and in memory; `data_fn` hands them to
#: training as float32. float16 over bfloat16 at the same 2 bytes: its rounding error is 8x smaller
#: (benchmarks/results/text_state_dtype.md: states 2.1e-4 vs 1.7e-3 relative, a UNet output 1e-5..3e-5 vs
#: 8e-5..2e-4, both far below the 1.2e-2 that bf16 autocast itself makes), and SD1.x/SDXL text states fit its
#: range (their pipelines compute them in float16); a tensor that would overflow is kept in float32
TEXT_DTYPE = "float16"
TEXT_DTYPES = ("float32", "float16", "bfloat16")


def stored_text(cond: dict[str, Tensor], text_dtype: str) -> dict[str, Tensor]:
    """Prompt conditioning in `text_dtype`; a tensor that is not finite there (float16 overflow) stays float32."""
    if text_dtype not in TEXT_DTYPES:
        raise ProReflowError(f"text_dtype must be one of {list(TEXT_DTYPES)}, got {text_dtype!r}")
    out = {}
    for k, v in cond.items():
        low = v.to(getattr(torch, text_dtype))
        out[k] = low if bool(torch.isfinite(low).all()) or not bool(torch.isfinite(v).all()) else v
    return out


def encode_records(pipe: Any, records: list[tuple[Any, str]], resolution: int, seed: int = 0,
                   cache_dir: str | Path | None = None, shard_size: int = 256, progress: bool = False,
                   text_dtype: str = TEXT_DTYPE) -> CaptionedLatents:
    """VAE latents and prompt conditioning of (image, caption) records from any source.

    Records are encoded in shards of `shard_size`, each with its own VAE sampling seed (`seed` and the
    shard's index), so a shard is the same bytes whoever makes it. Text states are kept in `text_dtype`
    (`TEXT_DTYPE`; "float32" keeps them exact), latents in float32. With `cache_dir` the shards are kept as
    checksummed safetensors (`store.ShardStore`), so a later run with the same teacher, records, resolution,
    seed and text dtype skips the VAE and text encoders, and a damaged or missing shard is re-encoded
    identically.

    Under several processes (`accelerate launch`) the cache is built by all of them at once: process r of
    R encodes shards r, r + R, ... (those not already valid), each written on its own and added to the
    manifest under a lock held for milliseconds; no process encodes while the others idle. Each process then
    loads the cache by polling the manifest for the shards the others are still making, not by a barrier:
    its wait is bounded by the slowest process's equal share, but a collective (NCCL's default timeout is
    10 minutes) would turn a slow share into a dead job, and polling has no such limit (it gives up only if
    no shard appears for an hour, i.e. a builder died). A shard's bytes depend only on the data, its index
    and `seed` (at a fixed number of threads per process), never on the number of processes, so a run on
    another number of processes reuses the cache.

    Every process holds the whole data set in host memory (latents and text states; see the memory notes in
    docs/sd-distillation.md): the training data function draws each global batch's rows from the whole set
    with a generator all processes share and each keeps its slice, so any process may need any row.
    """
    if not records:
        raise ProReflowError("no training records to encode")
    n_shards = -(-len(records) // shard_size)
    state = process_state()
    family = family_of(pipe)

    def make(i: int) -> tuple[dict[str, Tensor], dict]:
        chunk = records[i * shard_size:(i + 1) * shard_size]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        prepared = [prepare_image(src, resolution) for src, _ in chunk]
        tensors = {"latents": encode_images(pipe, torch.stack([p.pixels for p in prepared]), gen)}
        tensors.update(flatten_cond(stored_text(encode_text(pipe, [c for _, c in chunk]), text_dtype)))
        tensors.update(flatten_cond(family.image_cond([(p.original_size, p.crop_top_left) for p in prepared],
                                                      resolution)))
        # the manifest (not the shard) says who made it
        return tensors, {"records": len(chunk), "made_by_process": state.process_index,
                         "of_processes": state.num_processes}

    def make_on_device(i: int) -> tuple[dict[str, Tensor], dict]:
        with encoders_on_device(pipe):
            return make(i)

    if cache_dir is None:
        with encoders_on_device(pipe):
            parts = [make(i)[0] for i in range(n_shards)]
    else:
        spec = {"kind": "latents+text", "teacher": str(pipe.config.get("_name_or_path", "")), **family.cache_identity(pipe),
                "resolution": resolution, "seed": seed, "shard_size": shard_size, "n": len(records),
                "records_sha256": _record_fingerprint(records), "text_dtype": text_dtype,
                "vae_latent_space": [pipe.vae.config.get(k) for k in ("scaling_factor", "latents_mean", "latents_std")]}
        store = ShardStore(cache_dir)
        with encoders_on_device(pipe):
            store.build_share(spec, n_shards, make, state.process_index, state.num_processes,
                              progress and state.is_main_process, desc="encode images + captions")
        report = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
        parts = store.load_when_complete(spec, n_shards, make_on_device, report=report)
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    with encoders_on_device(pipe):
        uncond = uncond_text(pipe)
    return CaptionedLatents(unflatten_cond(cat), uncond, cat["latents"])


def encode_folder(pipe: Any, folder: str | Path, resolution: int, seed: int = 0) -> CaptionedLatents:
    return encode_records(pipe, list(find_pairs(folder)), resolution, seed)


def encode_prompts_only(pipe: Any, prompts: list[str], resolution: int, text_dtype: str = TEXT_DTYPE) -> CaptionedLatents:
    """Prompt-only data: conditioning without images (SDXL size ids: the pipeline's defaults,
    original = target = resolution, no crop); text states in `text_dtype` as in `encode_records`."""
    with encoders_on_device(pipe):
        cond, uncond = stored_text(encode_text(pipe, prompts), text_dtype), uncond_text(pipe)
    family = family_of(pipe)
    cond.update(family.image_cond([((resolution, resolution), (0, 0))] * len(prompts), resolution))
    return CaptionedLatents(cond, uncond, None, family.latent_shape(pipe, resolution))

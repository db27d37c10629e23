"""Distillation data as a stream (`proreflow distill --stream`): images and captions are read, decoded and
resized by DataLoader workers (`data.stream`), and each micro-step encodes only this process's rows of the
global batch (VAE latents, text embeddings) on the training device. Nothing grows with the data set; the
stream's position is saved with every checkpoint, so a resumed run continues it exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from proreflow.accel import process_state
from proreflow.apps.sd.encode import encode_images, encode_text, encoder_modules, uncond_text
from proreflow.data.stream import StreamIterator
from proreflow.fields.families import family_of


class StreamingLatents:
    """The streaming counterpart of `CaptionedLatents`: same `data_fn` interface, data encoded on the fly from
    `stream` (this process's `StreamIterator`)."""

    prompt_only = False

    def __init__(self, pipe: Any, stream: StreamIterator) -> None:
        self.pipe, self.stream = pipe, stream
        self.resolution, self.seed, self.rank, self.world = stream.resolution, stream.seed, stream.rank, stream.world
        for m in encoder_modules(pipe):  # encoders stay on the device: every micro-step encodes its rows
            m.to(process_state().device)
        self.uncond = uncond_text(pipe)
        self.latent_shape = family_of(pipe).latent_shape(pipe, self.resolution)

    def _encode(self, n: int) -> tuple[Tensor, dict[str, Tensor]]:
        items = self.stream.take(n)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + self.stream.seen)
        with torch.no_grad():
            latents = encode_images(self.pipe, torch.stack([i["pixels"] for i in items]), gen)
            cond = {k: v.cpu() for k, v in encode_text(self.pipe, [i["caption"] for i in items]).items()}
        cond.update(family_of(self.pipe).image_cond([(i["original_size"], i["crop_top_left"]) for i in items],
                                                    self.resolution))
        return latents, cond

    def data_fn(self, caption_dropout: float, with_uncond: bool) -> "StreamingDataFn":
        return StreamingDataFn(self, caption_dropout, with_uncond)


class StreamingDataFn:
    """(n, generator) -> (x0, cond) for a global batch of n: this process's rows come from its stream, the
    others stay zero (the batch builders keep only this process's rows). Caption dropout is drawn for the
    global batch from the shared generator, as for in-memory data."""

    def __init__(self, data: StreamingLatents, caption_dropout: float, with_uncond: bool) -> None:
        self.data, self.caption_dropout, self.with_uncond = data, caption_dropout, with_uncond

    def state_dict(self) -> dict[str, Any]:
        return self.data.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.stream.load_state_dict(state)

    def __call__(self, n: int, gen: torch.Generator) -> tuple[Tensor, dict]:
        d = self.data
        per = n // d.world
        rows = slice(d.rank * per, (d.rank + 1) * per)
        latents, mine = d._encode(per)
        drop = torch.rand(n, generator=gen) < self.caption_dropout
        x0 = torch.zeros(n, *latents.shape[1:])
        x0[rows] = latents
        cond = {}
        for k, v in mine.items():
            cond[k] = torch.zeros(n, *v.shape[1:], dtype=v.dtype)
            cond[k][rows] = v
        for k, u in d.uncond.items():
            cond[k][drop] = u[0].to(cond[k].dtype).cpu()
        if self.with_uncond:
            cond["uncond"] = {k: d.uncond[k].cpu().expand(n, *d.uncond[k].shape[1:]).clone()
                              if k in d.uncond else cond[k].clone() for k in mine}
        return x0, cond

"""The process's accelerate state: one owner for how this library creates it, so that data preparation (the SD
app's encode cache and streaming) and training agree on devices and process count without the app importing the
training package."""

from __future__ import annotations

import torch
from accelerate import Accelerator, PartialState


def process_state() -> PartialState:
    """accelerate's process state, initialised the way `new_accelerator` needs it.

    The first PartialState of a process fixes its distributed type for good; on a machine
    without CUDA it must be created with cpu=True, or `accelerate launch` with 2 processes
    gives two independent single-process runs instead of MULTI_CPU (gloo).
    """
    return PartialState(cpu=not torch.cuda.is_available())


def allow_precision(mixed_precision: str) -> None:
    """Let this process's next Accelerator take `mixed_precision`. accelerate keeps one AcceleratorState per
    process and refuses another precision once it exists, so a script that trains an fp32 teacher and then a
    bf16 student (the digits benchmark) would stop there. Its per-Accelerator part is dropped for the new one;
    the process state (devices, process group) stays."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def new_accelerator(grad_accum: int = 1, mixed_precision: str = "no", compile: bool = False,
                    cpu: bool | None = None) -> Accelerator:
    """An Accelerator; on a machine without CUDA it runs on CPU (`cpu=None`)."""
    if cpu is None:
        cpu = not torch.cuda.is_available()
    allow_precision(mixed_precision)
    return Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision, cpu=cpu,
                       dynamo_backend="inductor" if compile else "no")

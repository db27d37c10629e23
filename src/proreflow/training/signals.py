"""SIGTERM as a request to stop at the next safe point (after an optimizer step and its checkpoint)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class TrainingInterrupted(Exception):
    """SIGTERM arrived; the run saved a checkpoint (when checkpointing) and stopped cleanly."""


class _StopFlag:
    requested = False


def stop_requested() -> bool:
    """Whether a SIGTERM arrived inside `stop_on_sigterm` (the loop polls this after every optimizer step)."""
    return _StopFlag.requested


def check_stop(where: str) -> None:
    """Stop at a safe point outside `fit`'s steps (between pair-cache shards, between a benchmark's
    runs) when a SIGTERM arrived inside `stop_on_sigterm`; what finished is already on disk."""
    if _StopFlag.requested:
        raise TrainingInterrupted(f"stopped by SIGTERM {where}; finished work is on disk and is reused on rerun")


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into a request to checkpoint and stop after the current optimizer step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _StopFlag.requested = False
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: setattr(_StopFlag, "requested", True))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _StopFlag.requested = False

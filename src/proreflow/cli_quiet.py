"""`--quiet`: what third-party libraries print goes to a log file, so a failing command's `error:` line stands alone
as the last thing on the terminal (docs/reliability.md). Used by `proreflow.cli`; imports nothing of ours."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: the log of this process's quiet command (None: not quiet, or nothing written)
LOG: Path | None = None

#: loggers whose records (and Python warnings, through logging.captureWarnings) go to the file
LOGGERS = ("py.warnings", "diffusers", "transformers", "accelerate", "torch", "huggingface_hub", "PIL", "urllib3")


def written_log() -> Path | None:
    """The quiet log, if anything was written to it."""
    return LOG if LOG is not None and LOG.is_file() and LOG.stat().st_size > 0 else None


@contextmanager
def quiet(enabled: bool, libraries: bool = False) -> Iterator[None]:
    """While `enabled`: Python warnings and the records of `LOGGERS` go to `$TMPDIR/proreflow-<pid>.log` (made only
    when something is written) instead of the terminal. With `libraries` (commands that load diffusers models),
    diffusers' and transformers' progress bars are switched off and their own stderr handlers replaced too."""
    global LOG
    LOG = None
    if not enabled:
        yield
        return
    LOG = Path(tempfile.gettempdir()) / f"proreflow-{os.getpid()}.log"
    LOG.unlink(missing_ok=True)  # one command's messages (a test process runs many)
    handler = logging.FileHandler(LOG, delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    if libraries:  # configure their root loggers now (each adds its own stderr handler on first use)
        for lib in ("diffusers", "transformers"):
            if importlib.util.find_spec(lib) is not None:
                importlib.import_module(f"{lib}.utils.logging").disable_progress_bar()
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [handler], False
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        handler.close()
        if libraries:
            for lib in ("diffusers", "transformers"):
                if importlib.util.find_spec(lib) is not None:
                    importlib.import_module(f"{lib}.utils.logging").enable_progress_bar()

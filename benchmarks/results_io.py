"""Where a benchmark's numbers go: `<stem>.json`, then `<stem>.md` beside it, each replaced whole, so a crash or a
failing report never leaves half a file, and the numbers are on disk before the report is built from them."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

from proreflow.store import atomic_write_text


def write_results(stem: Path, result: Any, markdown: str | Callable[[Any], str] | None = None,
                  indent: int = 1) -> str | None:
    """Write `result` as `stem`.json, then `markdown` (text, or a function of `result`) as `stem`.md; returns the md."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(result, indent=indent) + "\n")
    if markdown is None:
        return None
    md = markdown(result) if callable(markdown) else markdown
    atomic_write_text(stem.with_suffix(".md"), md)
    return md


def command_line(script: str, argv: Sequence[str], drop: Collection[str] = ()) -> str:
    """The command that writes a benchmark's results, for its md: `benchmarks/<script>` with `argv` shell-quoted as
    given, less the flags in `drop` (those that only change how it reports)."""
    return " ".join([f".venv/bin/python benchmarks/{script}", *(shlex.quote(a) for a in argv if a not in drop)])

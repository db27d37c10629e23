"""Evaluation results as a markdown table in the paper's format, and the CFG sweeps to plot."""

from __future__ import annotations

from typing import Any, Sequence


def markdown_table(rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> str:
    """method | steps | guidance | time | FID | CLIP, like the paper's tables (and prompt accuracy, where a
    classifier scored the images)."""
    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    devices = sorted({r["device"] for r in rows if r["seconds_per_image"] is not None})
    head = (f"{summary['title'] + ': ' if summary['title'] else ''}{summary['captions']}, {summary['num_images']} "
            f"images at {summary['resolution']}px, seed {summary['seed']}, protocol {summary.get('protocol', 'ours')}; "
            f"FID against {summary['reference']}; "
            f"CLIP score with {summary['clip_model']}. Time: median seconds per image over timed batches after "
            f"warm-up, on {', '.join(devices) or 'n/a'}.\n\n")
    paper = [m for m in ("time", "fid", "clip") if any((r.get("paper") or {}).get(m) is not None for r in rows)]
    # paper columns only for what the suite states the paper's numbers of (its time: the paper's own GPU)
    acc = any(r.get("prompt_accuracy") is not None for r in rows)
    cols = "| method | scheduler | steps | guidance | time (s/img) | FID | CLIP |" + (" prompt accuracy |" if acc else "") \
        + "".join(f" {'time' if m == 'time' else m.upper()} (paper) |" for m in paper)
    lines = [cols, "|" + "---|" * (7 + acc + len(paper))]
    for r in rows:
        line = (f"| {r['method']} | {r['scheduler']} | {r['steps']} | {r['guidance']:g} | "
                f"{num(r['seconds_per_image'], '.3f')} | {num(r['fid'], '.2f')} | {num(r['clip'], '.2f')} |")
        line += f" {num(r.get('prompt_accuracy'), '.3f')} |" if acc else ""
        theirs = r.get("paper") or {}
        line += "".join(f" {num(theirs.get(m), '.2f')} |" for m in paper)
        lines.append(line)
    return head + "\n".join(lines) + "\n"


def guidance_sweeps(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by method, scheduler and steps: the rows of one group differ in guidance only."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(f"{r['method']} ({r['scheduler']}, {r['steps']} steps)", []).append(r)
    return groups

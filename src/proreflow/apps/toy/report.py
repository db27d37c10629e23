"""The toy results as JSON rows and a markdown table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from proreflow.apps.toy.config import ToyConfig
from proreflow.store import atomic_write_text

COLUMNS = ["method", "steps", "time_sampling", "fidelity_rmse", "distance_swd", "distance_energy", "straightness",
           "teacher_nfe_per_pair", "student_nfe_per_pair", "optimizer_steps", "seed"]


def results_markdown(rows: list[dict], teacher_name: str, cfg: ToyConfig) -> str:
    """The results as a markdown table, best fidelity per step count in bold."""
    lines = [
        f"Teacher: {teacher_name}. Budget per trained method: {cfg.budget_steps} optimizer steps x batch "
        f"{cfg.train.batch_size}; teacher pairs by {cfg.teacher_solver.method} x {cfg.teacher_solver.steps} "
        f"steps ({cfg.teacher_solver.mode}). Fidelity: RMSE to the teacher's {cfg.eval.reference_solver} x "
        f"{cfg.eval.reference_steps} ODE solution from the same {cfg.eval.samples} noises.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    best = {}
    for r in rows:
        if r["method"] != "teacher-euler":
            best[r["steps"]] = min(best.get(r["steps"], math.inf), r["fidelity_rmse"])
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r[c]
            text = f"{v:.4f}" if isinstance(v, float) else ("–" if v is None else str(v))
            if c == "fidelity_rmse" and v == best.get(r["steps"]):
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], out: Path, teacher_name: str, cfg: ToyConfig) -> None:
    """results.json (list of rows) and results.md (the same as a table), each written atomically."""
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_markdown(rows, teacher_name, cfg))

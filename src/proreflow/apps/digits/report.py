"""The digits results as markdown: solver baselines, students, the ablation table, the CFG sweep, analyses."""

from __future__ import annotations

import math
import statistics


def _f(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}" if isinstance(x, float) and math.isfinite(x) else str(x)


def _by_student(rows: list[dict]) -> list[tuple[dict, list[dict]]]:
    """(first row, rows of every seed) per (method, steps), in the order of the rows."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["steps"]), []).append(r)
    return [(g[0], g) for g in groups.values()]


def _spread(group: list[dict], key: str, nd: int) -> str:
    vals = [g[key] for g in group]
    if len(vals) == 1:
        return _f(float(vals[0]), nd)
    return f"{_f(statistics.fmean(vals), nd)} ± {_f(statistics.stdev(vals), nd)}"


def results_markdown(res: dict) -> str:
    cfg = res["config"]
    lines = ["# Digits benchmark", "",
             f"FD: Fréchet distance on the features of a digits classifier (held-out accuracy "
             f"{res['classifier_heldout_accuracy']:.3f}) against the {res['real']['n_heldout']} held-out "
             f"{cfg['data']['size']}x{cfg['data']['size']} images; class accuracy: the classifier's agreement with the "
             f"requested label; fidelity: RMSE "
             f"to the teacher's {cfg['eval']['reference_steps']}-step Euler output from the same noise. "
             f"{cfg['eval']['samples']} samples, CFG scale {cfg['eval']['guidance']}.", "",
             f"The {res['real']['n_train']} real training images score FD {_f(res['real']['fd_train_images'])} "
             f"against the held-out ones: the floor for real data. FD depends on the sample count; all rows use "
             f"{cfg['eval']['samples']} samples except the CFG sweep and fig. 1b ({cfg['sweep']['samples']}, "
             f"{cfg['analysis']['samples']}).", "",
             f"## Ablations at {cfg['table_steps']} steps (paper table 4), mean ± std over seeds "
             f"{cfg['seeds']}", "", "| variant | method | FD | class acc. | fidelity RMSE |", "|---|---|---|---|---|"]
    for r in res["table4"]:
        lines.append(f"| {r['label']} | {r['method']} | {_f(r['fd_mean'])} ± {_f(r['fd_std'])} | "
                     f"{_f(r['acc_mean'], 3)} ± {_f(r['acc_std'], 3)} | {_f(r['fidelity_mean'], 4)} ± "
                     f"{_f(r['fidelity_std'], 4)} |")
    lines += ["", f"## Students, mean ± std over seeds {cfg['seeds']}, {cfg['teacher']['distill']} teacher, "
                  f"{cfg['budget_steps']} optimizer steps each", "",
              "train s: median over seeds of a student's seconds, including the teacher pairs that no student "
              "before it in the run had solved (each distinct set of pairs is solved once per run).", "",
              "| method | steps | windows per stage | λ | time sampling | pairs from | teacher NFE/pair | "
              "student NFE/pair | FD | class acc. | fidelity RMSE | train s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, group in _by_student(res["students"]):
        lines.append(f"| {r['method']} | {r['steps']} | {'→'.join(map(str, r['windows']))} | {r['lam']} | "
                     f"{r.get('time_sampling', '–')} | {r.get('pair_source', 'teacher')} | "
                     f"{_f(r['teacher_nfe_per_pair'], 1)} | {_f(r.get('student_nfe_per_pair', 0.0), 1)} | "
                     f"{_spread(group, 'fd', 2)} | {_spread(group, 'class_accuracy', 3)} | "
                     f"{_spread(group, 'fidelity_rmse', 4)} | {_f(statistics.median(g['train_seconds'] for g in group), 0)} |")
    lines += ["", "## ODE solvers on the teachers (same NFE as the students)", "",
              "| teacher | solver | NFE | FD | class acc. | fidelity RMSE |", "|---|---|---|---|---|---|"]
    for r in res["solvers"]:
        lines.append(f"| {r['teacher']} | {r['solver']} | {r['nfe']} | {_f(r['fd'])} | {_f(r['class_accuracy'], 3)} | "
                     f"{_f(r['fidelity_rmse'], 4)} |")
    if res.get("cfg_sweep"):
        lines += ["", "## CFG sweep (fig. 3)", "", "| method | steps | CFG | FD | class acc. |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['steps']} | {r['guidance']:g} | {_f(r['fd'])} | {_f(r['class_accuracy'], 3)} |"
                  for r in res["cfg_sweep"]]
    if res.get("analysis"):
        lines += ["", analysis_markdown(res["analysis"])]
    s = res["summary"]
    if res.get("run"):
        lines += ["", f"This run took {res['run']['wall_seconds'] / 60:.1f} min on {res['run']['device']} "
                      f"({res['run']['torch_threads']} torch threads), teachers {', '.join(f'{k} {v / 60:.1f} min' for k, v in res['teacher_seconds'].items()) or 'from the cache'}."]
    lines += ["", f"Best at {cfg['table_steps']} steps by mean FD: **{s['table4_best']}** "
                  f"(paper's ordering, full best: {'reproduced' if s['full_is_best'] else 'not reproduced'})."]
    return "\n".join(lines) + "\n"


def analysis_markdown(a: dict) -> str:
    lines = [f"## Velocity analyses on the {a['teacher']} teacher (figs. 1a, 1b)", "",
             f"RMS L2 between velocities at the first and last timestep: {_f(a['l2_first_last'], 3)} (mean between "
             f"adjacent timesteps {_f(a['l2_adjacent_mean'], 3)}); cosine first vs last: {_f(a['cos_first_last'], 3)}.",
             "", f"Perturbed teacher sampling (FD of the unperturbed sampler: {_f(a['perturb_fd_clean'])}):", "",
             "| perturbation | eps = ‖v'−v‖/‖v‖ | FD | class acc. | RMSE to unperturbed |", "|---|---|---|---|---|"]
    lines += [f"| {r['perturbation']} | {r['eps']:g} | {_f(r['fd'])} | {_f(r['class_accuracy'], 3)} | "
              f"{_f(r['fidelity_rmse'], 4)} |" for r in a["perturbation"]]
    return "\n".join(lines)

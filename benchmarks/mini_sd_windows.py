"""Where a 4-step student gains or loses against DDIM-4, window by window, on the mini Stable Diffusion.

The fidelity of a 4-step sampler (RMSE of its images to the teacher's DDIM-32 images from the same noise) is made
of four one-step errors, one per window, each carried to the image by the steps after it. This measures each one
directly against the teacher's own DDIM-32 trajectory (diffusers' DDIMScheduler, trailing, final alpha 1):

- local: start from the teacher's latent at a window start, take the model's one DDIM step to the window end, and
  compare with the teacher's latent there (RMS over latents);
- carried: continue that one-step result with the teacher's DDIM-32 steps to t = 0, decode, and compare with the
  teacher's image (pixel RMSE in [0, 1]): the image error this window alone causes;
- rollout: the model's whole 4-step sample against the teacher's image (the benchmark's fidelity column);
- path: the model's own 4-step run, its latent at each window end against the teacher's there (the error
  accumulated so far). Also for diffusers' DPM-Solver++ and UniPC at 4 steps on the teacher (Table 2's solvers):
  their steps use earlier model outputs, so they have no one-step error of their own, but their path says in which
  window they gain on a student; UniPC's corrected state at each window start is reported beside it.

The same quantities for the teacher itself are DDIM-4's errors, the student's start. A student that beats its
start must lower the carried error of the windows that dominate it.

    .venv/bin/python benchmarks/mini_sd_windows.py --student runs/mini-sd-students/run [--student ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mini_sd_teacher import prompts_for  # noqa: E402
from results_io import command_line, write_results  # noqa: E402


RESULTS = Path(__file__).parent / "results"


class Stepper:
    """DDIM (eta 0) steps of one eps-prediction UNet with classifier-free guidance, written out by hand so that the
    step is the textbook one: x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps_hat, ab_prev = 1 below 0."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor, emb: torch.Tensor, uncond: torch.Tensor, guidance: float):
        self.unet, self.ac, self.emb, self.uncond, self.g = unet, alphas_cumprod.double(), emb, uncond, guidance

    def eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        ts = torch.full((x.shape[0],), t, dtype=torch.long)
        if self.g == 1.0:
            return self.unet(x, ts, encoder_hidden_states=self.emb).sample
        both = self.unet(torch.cat([x, x]), torch.cat([ts, ts]),
                         encoder_hidden_states=torch.cat([self.uncond, self.emb])).sample
        u, c = both.chunk(2)
        return u + self.g * (c - u)

    def step(self, x: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        ab, ab_prev = self.ac[t], (self.ac[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64))
        e = self.eps(x, t).double()
        x0 = (x.double() - (1 - ab).sqrt() * e) / ab.sqrt()
        return (ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * e).float()

    def run(self, x: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
        """From x at timesteps[0] through each following timestep, then to t = 0 (x0)."""
        return self.trajectory(x, timesteps)[-1]

    def trajectory(self, x: torch.Tensor, timesteps: list[int]) -> list[torch.Tensor]:
        """The states after each step of `run` (at timesteps[1:], then x0)."""
        out = []
        for t, t_prev in zip(timesteps, [*timesteps[1:], -1]):
            x = self.step(x, t, t_prev)
            out.append(x)
        return out


def solver_trajectory(scheduler, teacher: Stepper, x: torch.Tensor, timesteps: list[int]
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A diffusers multistep solver's 4-step run on the teacher: (the states it hands the pipeline after each step,
    the corrected states UniPC steps from at timesteps[1:], empty for a solver without a corrector)."""
    scheduler.set_timesteps(len(timesteps))
    if [int(t) for t in scheduler.timesteps] != timesteps:
        raise SystemExit(f"error: {type(scheduler).__name__} steps at {scheduler.timesteps.tolist()}, not {timesteps}")
    states, corrected = [], []
    for k, t in enumerate(timesteps):
        x = scheduler.step(teacher.eps(x, t), t, x).prev_sample
        states.append(x)
        if k and getattr(scheduler, "last_sample", None) is not None:
            corrected.append(scheduler.last_sample)  # UniC's correction of the state this step started from
    return states, corrected


def trailing(steps: int, T: int = 1000) -> list[int]:
    return [round(T - j * T / steps) - 1 for j in range(steps)]


@torch.no_grad()
def measure(teacher_pipe, unets: dict, n: int, guidances: tuple[float, ...], batch: int, windows: int,
            solvers: dict | None = None) -> list[dict]:
    """Per model (a UNet stepped by DDIM) its local, carried, path and rollout errors; per solver (a diffusers
    scheduler on the teacher) its path and rollout errors. path: the 4-step run's own latent at each window end
    against the teacher's DDIM-32 latent there (the error accumulated so far)."""
    ac = teacher_pipe.scheduler.alphas_cumprod
    fine, coarse = trailing(32), trailing(windows)
    at = [fine.index(t) for t in coarse]  # the window starts on the 32-step path
    decode = lambda z: (teacher_pipe.vae.decode(z / teacher_pipe.vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2
    prompts = prompts_for(n)
    size, ch = teacher_pipe.unet.config.sample_size, teacher_pipe.unet.config.in_channels
    rows = []
    for g in guidances:
        sums: dict = {}
        for i in range(0, n, batch):
            p = prompts[i:i + batch]
            emb = teacher_pipe.encode_prompt(p, "cpu", 1, False)[0]
            uncond = teacher_pipe.encode_prompt([""] * len(p), "cpu", 1, False)[0]
            noise = torch.randn(len(p), ch, size, size, generator=torch.Generator().manual_seed(1000 + i))
            teach = Stepper(teacher_pipe.unet, ac, emb, uncond, g)
            path = [noise]  # the teacher's DDIM-32 latents at every fine timestep, then x0
            for t, t_prev in zip(fine, [*fine[1:], -1]):
                path.append(teach.step(path[-1], t, t_prev))
            ref = decode(path[-1])
            ends = [path[j] for j in at[1:]] + [path[-1]]  # the teacher's latent at each window end, then its x0
            for name, unet in unets.items():
                model = Stepper(unet, ac, emb, uncond, g)
                acc = sums.setdefault(name, {"local": [0.0] * windows, "carried": [0.0] * windows, "rollout": 0.0})
                for k, (j, t) in enumerate(zip(at, coarse)):
                    t_end = coarse[k + 1] if k + 1 < windows else -1
                    one = model.step(path[j], t, t_end)
                    j_end = at[k + 1] if k + 1 < windows else len(fine)
                    acc["local"][k] += float((one - path[j_end]).pow(2).sum())
                    rest = fine[j_end:]
                    img = decode(teach.run(one, rest) if rest else one)
                    acc["carried"][k] += float((img - ref).pow(2).sum())
                states = model.trajectory(noise, coarse)
                _add_errors(acc, "path", states, ends)
                acc["rollout"] += float((decode(states[-1]) - ref).pow(2).sum())
            for name, scheduler in (solvers or {}).items():
                acc = sums.setdefault(name, {"rollout": 0.0})
                states, corrected = solver_trajectory(scheduler, teach, noise, coarse)
                _add_errors(acc, "path", states, ends)
                if corrected:  # UniPC's corrected states at the window starts after the first
                    _add_errors(acc, "corrected", corrected, ends[:-1])
                acc["rollout"] += float((decode(states[-1]) - ref).pow(2).sum())
        lat_numel, img_numel = n * ch * size * size, n * ref[0].numel()
        for name, acc in sums.items():
            row = {"model": name, "guidance": g}
            for key, out in (("local", "local_rms"), ("path", "path_rms"), ("corrected", "corrected_rms")):
                if key in acc:
                    row[out] = [(v / lat_numel) ** 0.5 for v in acc[key]]
            if "carried" in acc:
                row["carried_rmse"] = [(v / img_numel) ** 0.5 for v in acc["carried"]]
            rows.append({**row, "rollout_rmse": (acc["rollout"] / img_numel) ** 0.5})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _add_errors(acc: dict, key: str, states: list[torch.Tensor], refs: list[torch.Tensor]) -> None:
    """Add each state's squared latent error against its reference on the teacher's DDIM-32 path to `acc[key]`."""
    acc[key] = [a + float((x - r).pow(2).sum()) for a, x, r in zip(acc.get(key, [0.0] * len(states)), states, refs)]


def weights(alphas_cumprod: torch.Tensor, starts: list[int], rows: list[dict]) -> dict:
    """Per window: the eps-space weight (alpha / (alpha + sigma))^2 at its start (`loss_weighting: output`) and the
    weight that would make a velocity MSE count each window by the image error it causes, (pixel error per unit
    of velocity error)^2, from the teacher's DDIM-4 rows: a velocity error dv over the window moves the window-end
    latent by (alpha + sigma)_end * dt * dv, and `carried / local` turns latent error into pixel error."""
    ac = alphas_cumprod.double()
    a_s = lambda t: (1.0, 0.0) if t < 0 else (float(ac[t].sqrt()), float((1 - ac[t]).sqrt()))
    flow_t = lambda t: (lambda a, s: s / (a + s))(*a_s(t))
    ends = [*starts[1:], -1]
    out = {"eps_weight": [(lambda a, s: (a / (a + s)) ** 2)(*a_s(t)) for t in starts]}
    for x in rows:
        if x["model"].startswith("teacher") and "carried_rmse" in x:
            out[f"image_weight_g{x['guidance']:g}"] = [
                (c / loc * sum(a_s(e)) * (flow_t(t) - flow_t(e))) ** 2
                for c, loc, t, e in zip(x["carried_rmse"], x["local_rms"], starts, ends)]
    return out


def markdown(r: dict) -> str:
    k = r["windows"]
    head = " | ".join(f"w{i + 1} ({t}→{e})" for i, (t, e) in enumerate(zip(r["starts"], [*r["starts"][1:], 0])))
    lines = ["# Where a 4-step student gains or loses, window by window (mini Stable Diffusion)", "",
             f"{r['n']} prompts, the same noise for every model. Reference: the teacher's DDIM-32 trajectory "
             "(trailing, final alpha 1). local: RMS latent error of one step from the teacher's latent at the window "
             "start; carried: pixel RMSE (in [0, 1]) of the image when only that window is the model's one step and "
             "the rest is the teacher's DDIM-32; rollout: the model's own 4-step image.", ""]
    sections = (("local_rms", "local latent RMS", ""), ("carried_rmse", "carried pixel RMSE", ""),
                ("path_rms", "path latent RMS at each window end",
                 "Each sampler's own 4-step run from the noise; its latent at the window's end against the teacher's "
                 "DDIM-32 latent there: the error accumulated so far (the last column is x0). UniPC corrected: the "
                 "state UniPC's corrector (UniC) makes of that latent once it has the model's output there, which "
                 "its next step starts from."))
    for key, label, text in sections:
        lines += [f"## {label}", "", *([text, ""] if text else []), f"| model | guidance | {head} |",
                  "|---|---|" + "---|" * k]
        for x in r["rows"]:
            if key in x:
                lines.append(f"| {x['model']} | {x['guidance']:g} | " + " | ".join(f"{v:.4f}" for v in x[key]) + " |")
            if key == "path_rms" and "corrected_rms" in x:
                lines.append(f"| {x['model']} corrected | {x['guidance']:g} | "
                             + " | ".join(f"{v:.4f}" for v in x["corrected_rms"]) + " | - |")
        lines.append("")
    lines += ["## rollout pixel RMSE", "", "| model | guidance | 4-step rollout |", "|---|---|---|"]
    lines += [f"| {x['model']} | {x['guidance']:g} | {x['rollout_rmse']:.4f} |" for x in r["rows"]]
    lines += ["", "## what each window weighs", "",
              "eps-space weight: (α/(α+σ))² at the window start, what `loss_weighting: output` multiplies the velocity MSE "
              "by; image weight: (pixel error per unit of velocity error)², from the teacher's rows (what a velocity "
              "MSE would weigh each window by to count the image error it causes; the default `velocity` weighs all "
              "alike). Each row is divided by its last window's value.", "", f"| weight | {head} |", "|---|" + "---|" * k]
    for name, ws in r["weights"].items():
        lines.append(f"| {name} | " + " | ".join(f"{w / ws[-1]:.3g}" for w in ws) + " |")
    lines += ["", f"Regenerate: `{r['command']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("runs/mini-sd-teacher"))
    ap.add_argument("--student", type=Path, action="append", default=[], help="an exported student folder (repeatable)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--guidance", type=float, action="append", default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "mini_sd_windows")
    ap.add_argument("--no-solvers", dest="solvers", action="store_false",
                    help="skip DPM-Solver++-4 and UniPC-4 on the teacher (their path and rollout errors)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(str(args.teacher), safety_checker=None, requires_safety_checker=False)
    unets = {"teacher (DDIM-4)": pipe.unet}
    for s in args.student:
        unets[s.name] = UNet2DConditionModel.from_pretrained(str(s / "unet")).eval()
    import diffusers

    # the 4-step solvers of Table 2 (benchmarks/mini_sd_tables.py), trailing spacing, each from the teacher's config
    solvers = {f"{label} (teacher)": getattr(diffusers, cls).from_config(pipe.scheduler.config,
                                                                          timestep_spacing="trailing")
               for label, cls in (("DPM-Solver++-4", "DPMSolverMultistepScheduler"),
                                  ("UniPC-4", "UniPCMultistepScheduler"))} if args.solvers else {}
    rows = measure(pipe, unets, args.n, tuple(args.guidance or (1.0, 4.0)), args.batch, 4, solvers)
    result = {"n": args.n, "windows": 4, "starts": trailing(4), "rows": rows,
              "command": command_line("mini_sd_windows.py", sys.argv[1:]),
              "weights": weights(pipe.scheduler.alphas_cumprod, trailing(4), rows)}
    print(write_results(args.out, result, markdown))


if __name__ == "__main__":
    main()

"""benchmarks/mini_sd_windows.py's solver rows on a tiny random SD: the multistep runs it scores are diffusers' own
(the stock pipeline's latents), their first window is DDIM's step, and each error lands in its window."""

import pytest
import torch

from benchmark_module import load_benchmark
from proreflow.models.sd_shapes import tiny_pipeline


@pytest.fixture(scope="module")
def windows_mod():
    return load_benchmark("mini_sd_windows")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    p = tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))
    p.set_progress_bar_config(disable=True)
    return p


def _stepper(mod, pipe, prompts, guidance):
    emb = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    uncond = pipe.encode_prompt([""] * len(prompts), "cpu", 1, False)[0]
    return mod.Stepper(pipe.unet, pipe.scheduler.alphas_cumprod, emb, uncond, guidance)


def _noise(pipe, n):
    size, ch = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    return torch.randn(n, ch, size, size, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def test_unipc_run_is_the_stock_pipelines(windows_mod, pipe):
    """The last state of `solver_trajectory` is what StableDiffusionPipeline with UniPC (trailing) returns from the
    same noise, prompts and guidance 3: the benchmark scores diffusers' solver, not a copy of it."""
    from diffusers import UniPCMultistepScheduler

    prompts = ["a red cat", "the dog"]
    noise = _noise(pipe, 2)
    sched = UniPCMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    states, corrected = windows_mod.solver_trajectory(sched, _stepper(windows_mod, pipe, prompts, 3.0), noise,
                                                      windows_mod.trailing(4))
    pipe.scheduler, old = UniPCMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing"), \
        pipe.scheduler
    try:
        ref = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, latents=noise.clone(),
                   output_type="latent").images
    finally:
        pipe.scheduler = old
    assert len(states) == 4 and len(corrected) == 3
    torch.testing.assert_close(states[-1], ref, rtol=1e-4, atol=1e-5)
    assert (corrected[0] - states[0]).abs().max() > 1e-4  # UniC moved the first window's end


@torch.no_grad()
def test_corrected_states_line_up_with_the_windows(windows_mod, pipe):
    """With UniPC's corrector off at every step, each 'corrected' state is the predictor's state at that window end
    (so the k-th one belongs to window k, not k + 1); DDIM has no corrector and hands back the hand-written DDIM."""
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    prompts = ["a cat"]
    noise, steps = _noise(pipe, 1), windows_mod.trailing(4)
    teach = _stepper(windows_mod, pipe, prompts, 1.0)
    off = UniPCMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                              disable_corrector=[0, 1, 2, 3])
    states, corrected = windows_mod.solver_trajectory(off, teach, noise, steps)
    for c, s in zip(corrected, states[:3]):
        torch.testing.assert_close(c, s)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    states, corrected = windows_mod.solver_trajectory(ddim, teach, noise, steps)
    assert corrected == []
    for a, b in zip(states, teach.trajectory(noise, steps)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_solver_on_other_timesteps_is_refused(windows_mod, pipe):
    from diffusers import UniPCMultistepScheduler

    leading = UniPCMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    with pytest.raises(SystemExit, match="not"):
        windows_mod.solver_trajectory(leading, _stepper(windows_mod, pipe, ["a cat"], 1.0), _noise(pipe, 1),
                                      windows_mod.trailing(4))


@torch.no_grad()
def test_measure_puts_each_error_in_its_window(windows_mod, pipe):
    """The first window of every path is one step from the same noise: DDIM's local error for the teacher, and
    UniPC's and DPM-Solver++'s first steps are DDIM steps, so all three first-window path errors agree; later
    windows differ. With UniPC's corrector off, its corrected states are its window ends."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    cfg = pipe.scheduler.config
    solvers = {"dpm": DPMSolverMultistepScheduler.from_config(cfg, timestep_spacing="trailing"),
               "unipc": UniPCMultistepScheduler.from_config(cfg, timestep_spacing="trailing"),
               "unipc-off": UniPCMultistepScheduler.from_config(cfg, timestep_spacing="trailing",
                                                                disable_corrector=[0, 1, 2, 3])}
    rows = {r["model"]: r for r in windows_mod.measure(pipe, {"teacher": pipe.unet}, 4, (1.0,), 2, 4, solvers)}
    t, u, d = rows["teacher"], rows["unipc"], rows["dpm"]
    assert t["path_rms"][0] == pytest.approx(t["local_rms"][0], rel=1e-6)
    assert u["path_rms"][0] == pytest.approx(t["local_rms"][0], rel=1e-3)
    assert d["path_rms"][0] == pytest.approx(t["local_rms"][0], rel=1e-3)
    assert abs(u["path_rms"][1] - t["path_rms"][1]) > 1e-3 * t["path_rms"][1]
    assert "local_rms" not in u and len(u["corrected_rms"]) == 3 and "corrected_rms" not in d
    assert rows["unipc-off"]["corrected_rms"] == pytest.approx(rows["unipc-off"]["path_rms"][:3], rel=1e-6)
    assert all(len(r["path_rms"]) == 4 and r["rollout_rmse"] > 0 for r in rows.values())
    md = windows_mod.markdown({"n": 4, "windows": 4, "starts": windows_mod.trailing(4), "rows": list(rows.values()),
                               "command": "x", "weights": windows_mod.weights(pipe.scheduler.alphas_cumprod,
                                                                              windows_mod.trailing(4),
                                                                              list(rows.values()))})
    assert "| unipc corrected | 1 |" in md and "| dpm | 1 | " in md

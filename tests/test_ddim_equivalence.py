"""Our VP sampler, pairs and exported scheduler against diffusers' own DDIMScheduler (trailing spacing) from the
same noise: the reference is diffusers, never our own code. Pure noise enters as SD feeds it, x_999 = eps."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tiny_sd import tiny_pipeline, tiny_unet

from proreflow.apps.sd.export import export_pipeline
from proreflow.conventions import noise_entry
from proreflow.fields import VPSchedule, VPVelocity, trailing_grid
from proreflow.pairs import TeacherSolver, make_window_pairs
from proreflow.sampling import sample
from proreflow.schedulers import make_scheduler
from proreflow.schedulers.proreflow import timestep_windows
from proreflow.windows import WindowSchedule

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def _ddim(**kw) -> DDIMScheduler:
    """diffusers' DDIM as SD1.5 users run it few-step, ending on the data (alpha = 1) as our last step does."""
    return DDIMScheduler(**{**SD15, "timestep_spacing": "trailing", "set_alpha_to_one": True, **kw})


@torch.no_grad()
def _ddim_loop(unet, noise, steps, ehs, first_steps=None):
    ddim = _ddim()
    ddim.set_timesteps(steps)
    x = noise * ddim.init_noise_sigma
    for t in ddim.timesteps[:first_steps]:
        x = ddim.step(unet(x, t, encoder_hidden_states=ehs).sample, t, x, eta=0.0).prev_sample
    return x


def test_pure_noise_enters_at_the_noisiest_timestep_as_eps():
    vp = VPSchedule.from_scheduler(_ddim())
    entry = VPVelocity(tiny_unet(), vp).noise_entry
    ac = float(_ddim().alphas_cumprod[999])
    assert entry.t == pytest.approx(vp.t_max) and entry.t == pytest.approx(0.93596, abs=1e-5)
    assert entry.scale == pytest.approx(1 / (ac**0.5 + (1 - ac) ** 0.5), rel=1e-12)  # y = x_999 / (alpha + sigma)
    assert noise_entry(lambda x, t, c=None: x).t == 1.0  # a plain flow: eps at t = 1


@pytest.mark.parametrize("steps,tol", [(4, 2e-5), (8, 2e-5), (50, 2e-5), (32, 0.03)])
def test_windowed_sampler_is_ddim_trailing_from_the_same_noise(steps, tol):
    """One Euler step per window at the teacher's timesteps is one DDIM step. Where T/n is an integer (4, 8, 50) the
    two agree to float rounding (measured 5e-7 of the largest value). At 32, diffusers steps its alphas to t - 31
    but evaluates the UNet at the rounded trailing timesteps (906 vs 905, ...), where our windows start; on this
    random UNet, whose x0 predictions reach 50, that one-timestep slip moves the result by 2.1 % (measured)."""
    torch.manual_seed(0)
    unet = tiny_unet().eval()
    noise, ehs = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    ref = _ddim_loop(unet, noise, steps, ehs)
    windows = timestep_windows(_ddim().config, steps)
    ours = sample(VPVelocity(unet, VPSchedule.from_scheduler(_ddim())), noise, windows,
                  cond={"encoder_hidden_states": ehs})
    err = float((ours - ref).abs().max() / ref.abs().max())
    assert err < tol, err


@pytest.mark.parametrize("steps", [4, 8])
def test_make_scheduler_proreflow_is_ddim_in_a_stock_pipeline(tmp_path, steps):
    """`make_scheduler("proreflow")` in a StableDiffusionPipeline: the same latents as diffusers' DDIM, with CFG."""
    pipe = tiny_pipeline(tmp_path)
    kw = dict(prompt=["a red cat", "a blue dog"], num_inference_steps=steps, guidance_scale=4.0, height=16, width=16,
              output_type="latent")
    pipe.scheduler = _ddim()
    ref = pipe(**kw, generator=torch.Generator().manual_seed(3)).images
    pipe.scheduler = make_scheduler("proreflow", _ddim().config, steps)
    assert pipe.scheduler.init_noise_sigma == 1.0 and float(pipe.scheduler.timesteps[0]) == 999.0
    ddim = _ddim()
    ddim.set_timesteps(steps)
    assert torch.allclose(pipe.scheduler.timesteps.double(), ddim.timesteps.double(), atol=1e-6)
    ours = pipe(**kw, generator=torch.Generator().manual_seed(3)).images
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5), float((ours - ref).abs().max())


def test_first_window_pairs_start_from_x999_eps_and_solve_ddim():
    """Stage 1 of ProReflow-I (8 windows at the teacher's timesteps) with a placed teacher: a pair of the first
    window starts at what SD samplers feed (x_999 = eps) and ends where diffusers' DDIM is at timestep 874. (At 40
    steps T/n is an integer, so DDIM has no rounding slip; the 32-step grid is checked against its timesteps.)"""
    torch.manual_seed(1)
    unet = tiny_unet().eval()
    vp = VPSchedule.from_scheduler(_ddim())
    teacher = VPVelocity(unet, vp)
    windows = timestep_windows(_ddim().config, 8)
    solver = TeacherSolver("euler", 40, "placed").placed_at(trailing_grid(vp, 40))
    x0, noise, ehs = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 5, 16)
    pairs = make_window_pairs(teacher, x0, windows, solver, cond={"encoder_hidden_states": ehs},
                              windows=torch.zeros(3, dtype=torch.long), noise=noise)
    c999 = float(vp.scale(torch.tensor([999.0])))
    assert torch.allclose(pairs.t_a, torch.full((3,), vp.t_max))
    assert torch.allclose(pairs.x_a * c999, noise, atol=1e-6)  # the UNet sees eps at timestep 999
    ref = _ddim_loop(unet, noise, 40, ehs, first_steps=5)  # x at timestep 874 after 5 DDIM-40 steps
    ours = pairs.x_b * float(vp.scale(torch.tensor([874.0])))
    assert torch.allclose(ours, ref, atol=1e-5 * float(ref.abs().max())), float((ours - ref).abs().max())
    assert pairs.nfe_per_pair == 5
    ddim = _ddim()
    ddim.set_timesteps(32)
    ts = vp.timestep_of_t(torch.tensor(trailing_grid(vp, 32)[1:-1], dtype=torch.float64))
    assert torch.allclose(ts, ddim.timesteps[1:].double(), atol=1e-9)  # 968, 937, 905, ...: DDIM-32's own


def test_pairs_of_every_window_at_once_are_ddim_from_each_window_start():
    """A batch mixing all 4 windows (one batched solve over per-sample grids): each pair's x_b is diffusers' DDIM-40
    run from its own x_a over the 10 steps of its window (40 steps: T/n an integer, no rounding slip)."""
    torch.manual_seed(2)
    unet = tiny_unet().eval()
    vp = VPSchedule.from_scheduler(_ddim())
    windows = timestep_windows(_ddim().config, 4)
    solver = TeacherSolver("euler", 40, "placed").placed_at(trailing_grid(vp, 40))
    which = torch.tensor([3, 0, 2, 1, 0, 3])
    x0, noise, ehs = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8), torch.randn(6, 5, 16)
    pairs = make_window_pairs(VPVelocity(unet, vp), x0, windows, solver, cond={"encoder_hidden_states": ehs},
                              windows=which, noise=noise)
    assert pairs.teacher_nfe == 6 * 10
    ddim = _ddim()
    ddim.set_timesteps(40)
    ts = ddim.timesteps.tolist()
    for i, w in enumerate(which.tolist()):
        start = [999, 749, 499, 249][w]
        x = pairs.x_a[i:i + 1] * float(vp.scale(torch.tensor([float(start)])))
        with torch.no_grad():
            for t in ts[ts.index(start):ts.index(start) + 10]:
                x = ddim.step(unet(x, t, encoder_hidden_states=ehs[i:i + 1]).sample, t, x, eta=0.0).prev_sample
        end = [749, 499, 249, -1][w]
        ours = pairs.x_b[i:i + 1] * (float(vp.scale(torch.tensor([float(end)]))) if end >= 0 else 1.0)
        assert torch.allclose(ours, x, atol=2e-5 * float(x.abs().max())), (w, float((ours - x).abs().max()))


def test_placed_teacher_costs_32_calls_per_pass_over_every_window():
    vp = VPSchedule.from_scheduler(_ddim())
    solver = TeacherSolver("euler", 32, "placed").placed_at(trailing_grid(vp, 32))
    teacher = VPVelocity(tiny_unet().eval(), vp)
    for k, per_window in ((8, 4), (4, 8), (2, 16), (1, 32)):
        windows = timestep_windows(_ddim().config, k)
        pairs = make_window_pairs(teacher, torch.zeros(k, 4, 8, 8), windows, solver,
                                  cond={"encoder_hidden_states": torch.zeros(k, 5, 16)}, windows=torch.arange(k))
        assert pairs.teacher_nfe == 32 and pairs.nfe_per_pair == per_window


def test_flow_placed_windows_above_t_max_are_refused():
    vp = VPSchedule.from_scheduler(_ddim())
    teacher = VPVelocity(tiny_unet().eval(), vp)
    with pytest.raises(ValueError, match="noisiest time"):  # 1 - 1/16 = 0.9375 > t_max = 0.936
        sample(teacher, torch.zeros(1, 4, 8, 8), WindowSchedule.uniform(16), cond={"encoder_hidden_states":
                                                                                     torch.zeros(1, 5, 16)})


_FRESH = """
import json, sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)
lat = pipe(["a red cat"], num_inference_steps=4, guidance_scale=1.0, height=16, width=16, output_type="latent",
           latents=torch.load(sys.argv[2]), generator=torch.Generator().manual_seed(0)).images
torch.save(lat, sys.argv[3])
print(json.dumps({"scheduler": type(pipe.scheduler).__name__,
                  "proreflow_imported": any(m.startswith("proreflow") for m in sys.modules)}))
"""


def test_exported_student_loads_in_a_process_without_proreflow_and_matches_our_sampler(tmp_path):
    pipe = tiny_pipeline(tmp_path / "parts")
    student = tiny_unet(seed=5).eval()
    windows = timestep_windows(pipe.scheduler.config, 4)
    out = export_pipeline(pipe, student, windows, tmp_path / "student", card={"base_model": "tiny", "method": "p"})
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny\nlicense: other\nlibrary_name: diffusers\n")
    assert "num_inference_steps=4" in card and "import proreflow" not in card
    noise = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(7))
    torch.save(noise, tmp_path / "noise.pt")
    res = subprocess.run([sys.executable, "-c", _FRESH, str(out), str(tmp_path / "noise.pt"), str(tmp_path / "lat.pt")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {"scheduler": "DDIMScheduler", "proreflow_imported": False}
    ehs = pipe.encode_prompt(["a red cat"], "cpu", 1, False)[0]
    ours = sample(VPVelocity(student, VPSchedule.from_scheduler(pipe.scheduler)), noise, windows,
                  cond={"encoder_hidden_states": ehs})
    theirs = torch.load(tmp_path / "lat.pt")
    assert torch.allclose(theirs, ours, atol=1e-5 * float(ours.abs().max())), float((theirs - ours).abs().max())


def test_flow_placed_student_keeps_our_scheduler_and_says_why(tmp_path):
    pipe = tiny_pipeline(tmp_path / "parts")
    out = export_pipeline(pipe, tiny_unet(seed=5), WindowSchedule.uniform(4), tmp_path / "student")
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "ProReflowScheduler" and config["window_boundaries"] == [1.0, 0.75, 0.5, 0.25, 0.0]
    card = (out / "README.md").read_text()
    assert "import proreflow.apps.sd.export" in card and "not where any stock scheduler steps" in card

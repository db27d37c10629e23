"""VP teachers in our convention, the exported scheduler, and the diffusers round trip (tiny models)."""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tiny_sd import tiny_pipeline, tiny_unet

from proreflow.apps.sd.export import export_pipeline
from proreflow.errors import ProReflowError
from proreflow.fields.vp import VPSchedule, VPVelocity, output_to_velocity, velocity_to_output
from proreflow.sampling import sample
from proreflow.schedulers.proreflow import ProReflowScheduler, scheduler_for
from proreflow.windows import WindowSchedule


def _ddim(prediction_type="epsilon"):
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False)


def test_time_map_round_trip_and_range():
    vp = VPSchedule.from_scheduler(_ddim())
    tau = torch.tensor([0.0, 1.0, 250.5, 999.0], dtype=torch.float64)
    assert torch.allclose(vp.timestep_of_t(vp.t_of_timestep(tau)), tau, atol=1e-9)
    assert 0.02 < vp.t_min < 0.04 and 0.93 < vp.t_max < 0.94  # SD1.5's schedule
    assert float(vp.timestep_of_t(torch.tensor([1.0]))) == pytest.approx(999.0)  # clamped to the noisiest
    with pytest.raises(ProReflowError):
        VPSchedule(torch.tensor([0.5, 0.9]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_teacher_euler_step_equals_ddim_step(prediction_type):
    torch.manual_seed(0)
    unet = tiny_unet().eval()
    ddim = _ddim(prediction_type)
    ddim.set_timesteps(5)  # 800, 600, 400, 200, 0
    assert ddim.timesteps[:2].tolist() == [800, 600]
    vp = VPSchedule.from_scheduler(ddim)
    ehs = torch.randn(2, 5, 16)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = unet(x, 800, encoder_hidden_states=ehs).sample
        ref = ddim.step(out, 800, x, eta=0.0).prev_sample
        field = VPVelocity(unet, vp, prediction_type)
        t1, t2 = vp.t_of_timestep(torch.tensor([800.0, 600.0]))
        y = x / vp.scale(torch.tensor([800.0])).float()
        v = field(y, torch.full((2,), float(t1)), {"encoder_hidden_states": ehs})
        ours = (y + float(t2 - t1) * v) * vp.scale(torch.tensor([600.0])).float()
    assert torch.allclose(ours, ref, atol=1e-4), float((ours - ref).abs().max())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_output_velocity_conversions_invert(prediction_type):
    torch.manual_seed(1)
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    a = torch.tensor([0.9, 0.5, 0.2])
    s = (1 - a**2).sqrt()  # VP: alpha^2 + sigma^2 = 1 (what v-prediction assumes)
    out = velocity_to_output(v, x, a, s, prediction_type)
    assert torch.allclose(output_to_velocity(out, x, a, s, prediction_type), v, atol=1e-5)


def test_guidance_mixes_raw_outputs():
    torch.manual_seed(0)
    vp = VPSchedule.from_scheduler(_ddim())
    unet = tiny_unet().eval()
    cond, uncond = torch.randn(1, 5, 16), torch.zeros(1, 5, 16)
    y, t = torch.randn(1, 4, 8, 8), torch.tensor([0.5])
    with torch.no_grad():
        vc = VPVelocity(unet, vp)(y, t, {"encoder_hidden_states": cond})
        vu = VPVelocity(unet, vp)(y, t, {"encoder_hidden_states": uncond})
        vg = VPVelocity(unet, vp, guidance_scale=3.0)(y, t, {"encoder_hidden_states": cond,
                                                              "uncond": {"encoder_hidden_states": uncond}})
    # velocity is affine in the eps output at a fixed point, so guidance carries over exactly
    assert torch.allclose(vg, vu + 3.0 * (vc - vu), atol=1e-5)


def test_scheduler_steps_equal_the_windowed_sampler_and_round_trip_config(tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet().eval()
    windows = WindowSchedule((1.0, 0.6, 0.0))
    sched = scheduler_for(_ddim().config, windows)
    sched.save_pretrained(tmp_path)
    sched = ProReflowScheduler.from_pretrained(tmp_path)
    assert sched.windows == windows and sched.config.prediction_type == "epsilon"
    sched.set_timesteps(4)
    assert len(sched.timesteps) == 4 and torch.all(sched.timesteps[:-1] > sched.timesteps[1:])
    ehs = torch.randn(2, 5, 16)
    y0 = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        x = y0 * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(unet(x, t, encoder_hidden_states=ehs).sample, t, x).prev_sample
        ours = sample(VPVelocity(unet, sched.vp), y0, windows, steps_per_window=2,
                      cond={"encoder_hidden_states": ehs})
    assert torch.allclose(x, ours, atol=1e-4)
    with pytest.raises(ProReflowError, match="multiple"):
        sched.set_timesteps(3)


def test_exported_student_loads_with_from_pretrained_and_samples(tmp_path):
    pipe = tiny_pipeline(tmp_path / "parts")
    student = tiny_unet(seed=5)
    out = export_pipeline(pipe, student, WindowSchedule.uniform(2), tmp_path / "student")
    loaded = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert type(loaded.scheduler).__name__ == "ProReflowScheduler"
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), student.state_dict().values()))
    images = loaded(["a photo of a cat", "a red dog"], num_inference_steps=2, guidance_scale=4.0, height=16, width=16,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and (images >= 0).all() and (images <= 1).all()
    again = loaded(["a photo of a cat", "a red dog"], num_inference_steps=2, guidance_scale=4.0, height=16, width=16,
                   output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert (images == again).all()


def test_sd_unets_attend_with_torch_sdpa():
    """The GPU attention fast path is diffusers' default with torch 2: every attention layer of an SD UNet
    uses AttnProcessor2_0 (F.scaled_dot_product_attention: flash / memory-efficient kernels on CUDA)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs = tiny_unet().attn_processors
    assert procs and all(isinstance(p, AttnProcessor2_0) for p in procs.values())


def test_exported_timestep_placed_student_samples_what_a_hand_written_ddim_loop_gives(tmp_path):
    """Issue 27: the exported pipeline checked against a loop written out here from SD1.5's betas, with no code of
    ours in it: latents from the generator at scale 1, CFG on the eps output, and one DDIM step per window from
    timestep 999 to 499 to the clean image (final alpha 1). A wrong noise scale, window start or guidance fails it."""
    from proreflow.fields import timestep_placement
    from proreflow.methods import MethodSpec
    from proreflow.training import Recipe

    pipe = tiny_pipeline(tmp_path / "parts")
    final = Recipe(MethodSpec("p", windows=[2]), 10, placement=timestep_placement(VPSchedule.from_scheduler(
        pipe.scheduler))).plan(2).final
    student = tiny_unet(seed=5).eval()
    loaded = StableDiffusionPipeline.from_pretrained(export_pipeline(pipe, student, final, tmp_path / "s"),
                                                     safety_checker=None, requires_safety_checker=False)
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    prompts, g = ["a photo of a cat", "a red dog"], 4.0
    got = loaded(prompts, num_inference_steps=2, guidance_scale=g, height=16, width=16, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    with torch.no_grad():
        cond, uncond = loaded.encode_prompt(prompts, "cpu", 1, True)
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # a one-level VAE: 16 px
        for t, prev in ((999, 499), (499, None)):
            eps_u, eps_c = student(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            eps = (eps_u + g * (eps_c - eps_u)).double()
            a, a_prev = alpha_bar[t], (alpha_bar[prev] if prev is not None else torch.tensor(1.0, dtype=torch.float64))
            x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
            x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()
    assert got.shape == x.shape
    assert torch.allclose(got, x, atol=1e-4 * float(x.abs().max())), float((got - x).abs().max())


def test_our_schedulers_declare_the_diffusers_samplers_their_configs_load_into():
    """`scheduler.compatibles` (what a pipeline's user swaps in) lists diffusers' samplers for the VP schedulers,
    which keep the teacher's betas, and FlowMatchEuler for the flow one; `step` returns the shared output type."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    from proreflow.schedulers.common import FlowSchedulerOutput
    from proreflow.schedulers.perflow import PiecewiseFlowScheduler
    from proreflow.schedulers.proreflow import ProReflowFlowScheduler

    from proreflow.schedulers.proreflow import scheduler_for
    from proreflow.windows import WindowSchedule

    sd = DDIMScheduler(beta_start=0.001, beta_end=0.012, beta_schedule="scaled_linear")  # an SD teacher's
    student = scheduler_for(sd.config, WindowSchedule.uniform(2))  # as export writes it: the betas given explicitly
    assert {DDIMScheduler, EulerDiscreteScheduler} <= set(student.compatibles)
    ddim = DDIMScheduler.from_config(student.config)
    assert ddim.config.beta_start == 0.001 and ddim.config.beta_schedule == "scaled_linear"
    back = ProReflowScheduler.from_config(ddim.config)
    # diffusers carries the keys DDIM does not know through its config, so the windows survive the round trip
    assert back.config.beta_start == 0.001 and back.windows.boundaries == (1.0, 0.5, 0.0)
    assert DDIMScheduler in PiecewiseFlowScheduler.from_config(sd.config).compatibles
    assert FlowMatchEulerDiscreteScheduler in ProReflowFlowScheduler(num_windows=2).compatibles
    x = torch.randn(1, 4, 8, 8)
    out = student.step(torch.zeros_like(x), student.timesteps[0], x)
    assert isinstance(out, FlowSchedulerOutput) and out.prev_sample.shape == x.shape

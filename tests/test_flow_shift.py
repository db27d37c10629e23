"""Teacher families (`fields.families`) and a flow-matching teacher's time shift, against diffusers' own
FlowMatchEulerDiscreteScheduler and pipelines' rules: windows under `window_placement: timesteps` start where the
scheduler's training sigmas are, the teacher grid is where a pipeline passing uniform sigmas steps, and the
exported scheduler steps exactly at the windows (stock where one does)."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from proreflow.errors import ProReflowError
from proreflow.fields import family_of, teacher_grid, window_placement
from proreflow.fields.families import family_for_class
from proreflow.fields.families.flow import calculate_shift
from proreflow.models.sd_shapes import tiny_pipeline, tiny_sd3_pipeline
from proreflow.schedulers.proreflow import ProReflowFlowScheduler
from proreflow.windows import WindowSchedule


def _placed(k, f):
    return WindowSchedule.uniform(k).mapped(f) if f is not None else WindowSchedule.uniform(k)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("sd"))


def test_each_pipeline_has_its_family_and_others_are_refused_with_the_list(sd, sd3, tmp_path):
    from tiny_sd import tiny_sdxl_pipeline

    assert family_of(sd).name == "sd" and family_of(tiny_pipeline(tmp_path / "v", "v_prediction")).name == "sd"
    assert family_of(tiny_sdxl_pipeline(tmp_path / "xl")).name == "sdxl" and family_of(sd3).name == "sd3"
    assert family_of(sd3).denoiser(sd3) is sd3.transformer and family_of(sd).denoiser(sd) is sd.unet
    with pytest.raises(ProReflowError, match="StableDiffusionPipeline, StableDiffusionXLPipeline, "
                                             "StableDiffusion3Pipeline, FluxPipeline"):
        family_of(object())
    assert family_for_class("StableDiffusion3Pipeline").name == "sd3"
    assert family_for_class("FluxPipeline").name == "flux" and family_for_class("NoSuchPipeline") is None
    assert not family_for_class("StableDiffusion3Pipeline").has_safety_checker
    assert family_for_class("StableDiffusionPipeline").has_safety_checker


@pytest.mark.parametrize("k", [2, 4, 8])
def test_windows_start_at_the_schedulers_own_training_sigmas(sd, sd3, k):
    """K windows at entries j T/K of diffusers' training table (shift 3): f(1 - j/K)."""
    table = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas
    f = window_placement(sd3, "timesteps")
    got = _placed(k, f).boundaries
    want = [float(table[j * 1000 // k]) for j in range(k)] + [0.0]
    assert list(got) == pytest.approx(want, abs=1e-6)
    assert got[1] > 1 - 1 / k  # the shift crowds windows towards noise, as the teacher's steps
    assert window_placement(sd3, "flow") is None
    assert _placed(k, window_placement(sd, "timesteps")).boundaries[0] == 1.0


@pytest.mark.parametrize("n", [4, 32])
def test_the_teacher_grid_is_where_a_pipeline_passing_uniform_sigmas_steps(sd3, n):
    """FluxPipeline-style: `set_timesteps(sigmas=linspace(1, 1/N, N))` shifts them, and 0 is appended."""
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(sigmas=[1 - j / n for j in range(n)])
    assert list(teacher_grid(sd3, "timesteps", n)) == pytest.approx(ref.sigmas.tolist(), abs=1e-6)
    assert teacher_grid(sd3, "flow", n) == tuple(1 - j / n for j in range(n + 1))
    # every window boundary of K | N windows is a grid point: each window takes N / K teacher steps
    grid = teacher_grid(sd3, "timesteps", n)
    for b in _placed(4, window_placement(sd3, "timesteps")).boundaries:
        assert min(abs(b - g) for g in grid) < 1e-12


def test_our_calculate_shift_and_dynamic_placement_match_diffusers(sd3):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as theirs

    for seq in (64, 256, 1024, 4096):
        assert calculate_shift(seq) == pytest.approx(theirs(seq))
        assert calculate_shift(seq, 256, 4096, 0.5, 1.16) == pytest.approx(theirs(seq, 256, 4096, 0.5, 1.16))
    family = family_of(sd3)
    dyn = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    old = sd3.scheduler
    sd3.register_modules(scheduler=dyn)
    try:
        res = 64  # latents 64 / 1 (one-level VAE) over patch 2: 32 x 32 = 1024 tokens, as the SD3 pipeline counts
        assert family.image_seq_len(sd3, res) == 1024
        mu = theirs(1024, 256, 4096, 0.5, 1.15)
        ref = FlowMatchEulerDiscreteScheduler.from_config(dyn.config)
        ref.set_timesteps(sigmas=[1 - j / 4 for j in range(4)], mu=mu)
        assert list(teacher_grid(sd3, "timesteps", 4, res)) == pytest.approx(ref.sigmas.tolist(), abs=1e-6)
        assert family.shift(sd3, res) == pytest.approx(math.exp(mu))
        with pytest.raises(ProReflowError, match="resolution"):
            window_placement(sd3, "timesteps")
    finally:
        sd3.register_modules(scheduler=old)


def test_export_takes_stock_diffusers_where_it_steps_exactly_else_ours(sd3):
    family = family_of(sd3)
    f = window_placement(sd3, "timesteps")
    two, four = _placed(2, f), _placed(4, f)
    stock, why = family.student_scheduler(sd3, two)
    assert type(stock) is FlowMatchEulerDiscreteScheduler and stock.config.shift == 3.0 and "stock" in why
    stock.set_timesteps(2)
    assert stock.sigmas.tolist() == pytest.approx([1.0, 0.75, 0.0])
    ours, why = family.student_scheduler(sd3, four)
    assert isinstance(ours, ProReflowFlowScheduler) and "ProReflowFlowScheduler" in why
    assert ours.sigmas.tolist() == pytest.approx([*four.boundaries], abs=1e-6)
    assert ours.sigmas.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-6)
    ours.set_timesteps(8)
    assert ours.sigmas.tolist() == pytest.approx([1.0, 0.95, 0.9, 0.825, 0.75, 0.625, 0.5, 0.25, 0.0], abs=1e-6)
    # windows uniform in sigma (`window_placement: flow`) keep the unshifted stock export
    flat, _ = family.student_scheduler(sd3, WindowSchedule.uniform(4))
    assert type(flat) is FlowMatchEulerDiscreteScheduler and flat.config.shift == 1.0
    flat.set_timesteps(4)
    assert flat.sigmas.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_latent_maps_invert_and_follow_the_decode_formulas(sd, sd3, tmp_path):
    from tiny_sd import tiny_sdxl_pipeline

    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    fam = family_of(sd3)
    assert torch.allclose(fam.to_latent_space(sd3, z), (z - 0.0609) * 1.5305)
    assert torch.allclose(fam.from_latent_space(sd3, fam.to_latent_space(sd3, z)), z, atol=1e-6)
    assert torch.allclose(family_of(sd).to_latent_space(sd, z), z * sd.vae.config.scaling_factor)
    xl = tiny_sdxl_pipeline(tmp_path / "xl")
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 1.0, 2.0]
    xl.vae.register_to_config(latents_mean=mean, latents_std=std)
    fx, sf = family_of(xl), xl.vae.config.scaling_factor
    want = (z - torch.tensor(mean).view(1, 4, 1, 1)) * sf / torch.tensor(std).view(1, 4, 1, 1)
    assert torch.allclose(fx.to_latent_space(xl, z), want)
    assert torch.allclose(fx.from_latent_space(xl, want), z, atol=1e-6)
    assert family_of(sd).cache_identity(sd) == {"sdxl": False} and fx.cache_identity(xl) == {"sdxl": True}

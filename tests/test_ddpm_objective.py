"""DDPM's own objective (how SD was trained), checked against diffusers' DDPMScheduler, and a teacher trained by it:
on a *trained* VP teacher, our windowed sampler gives the images of diffusers' DDIM from the same noise."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from proreflow.data.digits import class_cond, load_digits_images
from proreflow.fields import FlowVelocity, VPSchedule, VPVelocity
from proreflow.models.unet import UNetConfig, class_unet
from proreflow.sampling import sample
from proreflow.schedulers.proreflow import timestep_windows
from proreflow.training import TrainConfig, ddpm_batches, fit

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_ddpm_batches_are_diffusers_add_noise_with_eps_targets():
    ddpm = DDPMScheduler(**SD15)
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(64)

    def data_fn(n, gen):
        idx = torch.randint(0, 64, (n,), generator=gen)
        return x[idx], {"class_labels": labels[idx]}

    batch = ddpm_batches(data_fn, 16, ddpm.alphas_cumprod)(0, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # replay the draws: data, noise, timesteps
    x0, cond = data_fn(16, gen)
    eps = torch.randn(x0.shape, generator=gen)
    ts = torch.randint(0, 1000, (16,), generator=gen)
    assert torch.equal(batch.target, eps) and torch.equal(batch.t, ts.float())
    assert torch.allclose(batch.x, ddpm.add_noise(x0, eps, ts), atol=1e-6)
    assert torch.equal(batch.cond["class_labels"], cond["class_labels"])
    assert int(ts.min()) >= 0 and int(ts.max()) <= 999


@pytest.fixture(scope="module")
def trained_vp_teacher():
    """A class-conditional digits UNet trained for a few hundred steps by DDPM's eps objective (about 20 s)."""
    data = load_digits_images(8, 1 / 6, 0)
    torch.manual_seed(0)
    unet = class_unet(UNetConfig(block_out_channels=(16, 32)), 8, 11)

    def data_fn(n, gen):
        idx = torch.randint(0, data.train_x.shape[0], (n,), generator=gen)
        return data.train_x[idx], class_cond(data.train_y[idx])

    ddpm = DDPMScheduler(**SD15)
    cfg = TrainConfig(lr=2e-3, batch_size=64, progress=False, mixed_precision="no", ema_decay=0.0)
    res = fit(FlowVelocity(unet, time_scale=1.0), ddpm_batches(data_fn, 64, ddpm.alphas_cumprod), 300, cfg)
    first, last = sum(res.losses[:20]) / 20, sum(res.losses[-20:]) / 20
    return res.model.net.eval(), first, last


def test_a_ddpm_trained_teacher_learns(trained_vp_teacher):
    _, first, last = trained_vp_teacher
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("steps", [4, 8])
def test_on_a_trained_teacher_our_sampler_gives_ddim_trailing_images(trained_vp_teacher, steps):
    """The test that a shared convention error cannot pass: the reference is diffusers' DDIM on a teacher that
    diffusers' objective trained. Feeding 1.066 eps at timestep 999 (the old entry at t = 1) fails it."""
    unet = trained_vp_teacher[0]
    ddim = DDIMScheduler(**SD15, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    noise = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(20) % 10
    with torch.no_grad():
        ddim.set_timesteps(steps)
        x = noise.clone()
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
        vp = VPSchedule.from_scheduler(ddim)
        ours = sample(VPVelocity(unet, vp), noise, timestep_windows(ddim.config, steps), cond={"class_labels": labels})
        old = sample(VPVelocity(unet, vp), noise / vp.noise_entry.scale, timestep_windows(ddim.config, steps),
                     cond={"class_labels": labels})  # what 1.066 eps at timestep 999 would give
    err = float((ours - x).abs().max())
    assert err < 1e-5 * float(x.abs().max()), err
    assert float((old - x).pow(2).mean().sqrt()) > 100 * float((ours - x).pow(2).mean().sqrt()) + 1e-3

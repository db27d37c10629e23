"""SD3-style flow transformers: the identity time map, one Euler step = FlowMatchEulerDiscreteScheduler's step."""

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from proreflow.errors import ProReflowError
from proreflow.fields.network import FlowVelocity
from proreflow.sampling import sample
from proreflow.windows import WindowSchedule


def _tiny():
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8).eval()


def _cond(seed):
    g = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(2, 5, 16, generator=g), "pooled_projections": torch.randn(2, 16, generator=g)}


def test_euler_steps_equal_the_flow_match_scheduler():
    net = _tiny()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    field = FlowVelocity.from_scheduler(net, sched)
    cond = _cond(0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref, ours = x.clone(), x.clone()
    with torch.no_grad():
        for i, ts in enumerate(sched.timesteps):
            out = net(hidden_states=ref, timestep=ts.expand(2), **cond).sample
            ref = sched.step(out, ts, ref).prev_sample
            t, t_next = sched.sigmas[i], sched.sigmas[i + 1]
            ours = ours + float(t_next - t) * field(ours, t.expand(2), cond)
        # the same trajectory through our windowed sampler, with the scheduler's sigmas as windows
        windowed = sample(field, x, WindowSchedule(tuple(float(s) for s in sched.sigmas)), cond=cond)
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())
    assert torch.allclose(windowed, ref, atol=1e-5)


def test_guidance_and_scheduler_check():
    net = _tiny()
    cond, uncond = _cond(0), _cond(1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.8, 0.4])
    with torch.no_grad():
        vc, vu = FlowVelocity(net)(x, t, cond), FlowVelocity(net)(x, t, uncond)
        vg = FlowVelocity(net, guidance_scale=5.0)(x, t, {**cond, "uncond": uncond})
    assert torch.allclose(vg, vu + 5.0 * (vc - vu), atol=1e-5) and not torch.allclose(vc, vu)
    with pytest.raises(ProReflowError, match="not a flow-matching scheduler"):
        FlowVelocity.from_scheduler(net, DDIMScheduler())

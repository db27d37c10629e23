"""Edge cases of the diffusers-compatible schedulers: `make_scheduler`'s defaults, the dtypes of timesteps and steps,
the timestep lookup's tolerance and the stock DDIM export of a config read from a file, each against diffusers' own
schedulers, hand-computed grids or exact float boundaries (where a slip would sample silently wrong)."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, LCMScheduler

from proreflow.errors import ProReflowError
from proreflow.schedulers import make_scheduler
from proreflow.schedulers.perflow import PiecewiseFlowScheduler
from proreflow.schedulers.proreflow import ProReflowFlowScheduler, stock_scheduler_for, timestep_windows

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
OTHER = dict(num_train_timesteps=500, beta_start=0.001, beta_end=0.02, beta_schedule="linear")


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------ make_scheduler defaults


def test_make_scheduler_proreflow_defaults_to_one_step_at_ddims_one_trailing_timestep():
    s = make_scheduler("proreflow", SD)
    ddim = DDIMScheduler(**SD, timestep_spacing="trailing")
    ddim.set_timesteps(1)
    assert s.config.num_windows == 1 and s.num_inference_steps == 1
    assert s.timesteps.tolist() == ddim.timesteps.tolist() == [999]


@pytest.mark.parametrize("name, cls", [("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler)])
def test_make_scheduler_solvers_default_to_trailing_spacing(name, cls):
    config = cls(**SD, timestep_spacing="leading").config  # the model's own spacing is replaced by default
    s = make_scheduler(name, config)
    ref = cls(**SD, timestep_spacing="trailing")
    s.set_timesteps(4)
    ref.set_timesteps(4)
    assert s.config.timestep_spacing == "trailing"
    assert s.timesteps.tolist() == ref.timesteps.tolist() == [999, 749, 499, 249]


def test_make_scheduler_flow_true_builds_a_flow_matching_solver():
    config = DDIMScheduler(**SD).config
    s = make_scheduler("unipc", config, flow=True)
    assert (s.config.prediction_type, s.config.use_flow_sigmas) == ("flow_prediction", True)
    plain = make_scheduler("unipc", config)
    assert (plain.config.prediction_type, plain.config.use_flow_sigmas) == ("epsilon", False)


def test_make_scheduler_rectified_flow_reads_num_train_timesteps_and_falls_back_to_1000():
    s = make_scheduler("rectified-flow", {})
    assert s.config.num_train_timesteps == 1000 and s.timesteps.tolist() == [1000.0]
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]
    for config in ({"num_train_timesteps": 500}, DDPMScheduler(**OTHER).config):
        s = make_scheduler("rectified-flow", config)
        s.set_timesteps(4)
        assert s.config.num_train_timesteps == 500 and s.timesteps.tolist() == [500.0, 375.0, 250.0, 125.0]


def test_make_scheduler_perflow_carries_the_models_betas():
    s = make_scheduler("perflow", DDPMScheduler(**OTHER).config)
    assert {k: s.config[k] for k in OTHER} == OTHER and s.config.num_windows == 4
    assert torch.equal(s.alphas_cumprod, DDPMScheduler(**OTHER).alphas_cumprod.double())
    assert s.timesteps.tolist() == [500, 375, 250, 125]


# ------------------------------------------------------------------------------------------- PeRFlow steps


def test_perflow_records_its_step_count_and_int64_timesteps():
    s = PiecewiseFlowScheduler(**SD)
    assert s.num_inference_steps == 4  # set by the constructor: one step per window
    s.set_timesteps(8)
    assert s.num_inference_steps == 8 and s.timesteps.dtype == torch.int64
    assert s.timesteps.tolist() == [1000, 875, 750, 625, 500, 375, 250, 125]


def test_perflow_step_returns_the_samples_dtype_for_a_float64_model_output():
    """A float64 network output on a float32 sample steps in float32, as diffusers' DDIM does (ddim_eps at one step
    per window is DDIM at the trailing timesteps)."""
    ours = make_scheduler("perflow-ddim-eps", SD)
    ours.set_timesteps(4)
    ddim = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    ddim.set_timesteps(4)
    x = _randn(2, 4, 4, 4)
    for k, (t_ours, t_ddim) in enumerate(zip(ours.timesteps, ddim.timesteps)):
        eps = _randn(2, 4, 4, 4, seed=k + 1, dtype=torch.float64)
        got = ours.step(eps, t_ours, x).prev_sample
        want = ddim.step(eps.float(), t_ddim, x).prev_sample
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (k, (got - want).abs().max())
        x = want


# ---------------------------------------------------------------------------------------- timestep lookup


def test_timestep_lookup_takes_ints_floats_and_tensors_but_not_a_timestep_half_a_unit_off():
    s = make_scheduler("rectified-flow", {})
    s.set_timesteps(4)
    x, v = _randn(1, 4, 2, 2), _randn(1, 4, 2, 2, seed=1)
    want = x + 0.25 * v  # tau 0.75 -> 0.5
    for t in (750, 750.0, torch.tensor(750.0), torch.tensor([750]), s.timesteps[1]):
        assert torch.equal(s.step(v, t, x).prev_sample, want)
    for t in (750.5, 749.5, torch.tensor(999.5), 1000.9):
        with pytest.raises(ProReflowError, match="not one of this scheduler's timesteps"):
            s.step(v, t, x)


def test_perflow_timestep_lookup_refuses_a_neighbouring_integer():
    s = make_scheduler("perflow-velocity", SD)
    x, v = _randn(1, 4, 2, 2), _randn(1, 4, 2, 2, seed=1)
    assert torch.equal(s.step(v, 750, x).prev_sample, x - 0.25 * v)
    for t in (749, 751, 999, torch.tensor(251)):
        with pytest.raises(ProReflowError, match="not one of this scheduler's timesteps"):
            s.step(v, t, x)


def test_timestep_lookup_tolerance_excludes_a_timestep_exactly_1e3_off():
    """At 1004 steps the last PeRFlow window's last timestep truncates to 0; 0.001 is exactly the tolerance away
    from it (0.001 - 0 is exact) and is refused, while 0.0009 is that step."""
    s = make_scheduler("perflow-velocity", SD)
    s.set_timesteps(1004)
    assert s.timesteps[-1].item() == 0 and s.timesteps[-2].item() == 1
    x, v = _randn(1, 4, 2, 2), _randn(1, 4, 2, 2, seed=1)
    assert torch.equal(s.step(v, 0.0009, x).prev_sample, s.step(v, 0, x).prev_sample)
    assert torch.equal(s.step(v, 0, x).prev_sample, x - 0.0 * v)  # tau = 0 -> 0: timestep 0 takes no step
    with pytest.raises(ProReflowError, match="not one of this scheduler's timesteps"):
        s.step(v, 0.001, x)


# --------------------------------------------------------------------------------- ProReflow (VP and flow)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_proreflow_last_step_keeps_a_half_precision_samples_dtype(dtype):
    """The last step lands on the data (t = 0); in half precision it must stay half, with DDIM's x0 as its value
    (DDIM, trailing, set_alpha_to_one: one step from x_999 to x0)."""
    s = make_scheduler("proreflow", SD, steps=1)
    ddim = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    ddim.set_timesteps(1)
    x, eps = _randn(2, 4, 4, 4), _randn(2, 4, 4, 4, seed=1)
    want = ddim.step(eps, ddim.timesteps[0], x).prev_sample
    got = s.step(eps.to(dtype), s.timesteps[0], x.to(dtype)).prev_sample
    assert got.dtype == dtype
    err = (got.float() - want).abs().max() / want.abs().max()  # x0 = x_999 / sqrt(ab_999) - ...: half's rounding x15
    assert err < 2e-2, err


def test_stock_ddim_export_of_a_config_read_from_a_file_keeps_its_betas(tmp_path):
    """A scheduler_config.json that omits its betas loads with the class defaults (SD's for LCM) and lists them in
    `_use_default_values`; the exported DDIM must keep those betas, not fall back to DDIM's own (linear, 0.02),
    and must not carry the file's private keys."""
    (tmp_path / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "LCMScheduler", "_diffusers_version": "0.22.0", "num_train_timesteps": 1000}))
    config = LCMScheduler.from_pretrained(tmp_path).config
    assert "beta_end" in config["_use_default_values"]
    ddim = stock_scheduler_for(config, timestep_windows(config, 4))
    assert isinstance(ddim, DDIMScheduler)
    assert {k: ddim.config[k] for k in SD} == SD
    assert torch.equal(ddim.alphas_cumprod, DDIMScheduler(**SD).alphas_cumprod)
    assert not [k for k in ddim.config if k.startswith("_")]


def test_flow_scheduler_reads_uniform_sigmas_up_to_exactly_1e6_off():
    """FluxPipeline's uniform sigmas linspace(1, 1/N, N) are read as N steps with a tolerance of 1e-6, inclusive: at
    N = 2^20 the last sigma 2^-20 moved by exactly 1e-6 (float-exact there) is accepted, 2e-6 is refused."""
    n = 2 ** 20
    sigmas = [1.0 - j / n for j in range(n)]
    assert sigmas[-1] == 2.0 ** -20
    s = ProReflowFlowScheduler(num_windows=4)
    sigmas[-1] = 2.0 ** -20 - 1e-6
    assert abs(sigmas[-1] - 2.0 ** -20) == 1e-6
    s.set_timesteps(sigmas=sigmas)
    assert s.num_inference_steps == n
    sigmas[-1] = 2.0 ** -20 - 2e-6
    with pytest.raises(ProReflowError, match="uniform sigmas"):
        s.set_timesteps(sigmas=sigmas)


@pytest.mark.parametrize("steps", [996, 997, 1000])
def test_perflow_walks_a_grid_that_repeats_a_timestep_step_by_step(steps):
    """At 997-1000 steps PeRFlow's truncated grid repeats integers (1000 steps: 933, 933, ...). Looked up by value,
    each repeat took the first match twice: a zero-length step, the next one lost, and a constant velocity ended at
    -0.944 instead of -1. The walk goes step by step; a constant velocity crosses tau 1 -> 0 exactly."""
    s = PiecewiseFlowScheduler(**SD, prediction_type="velocity")
    s.set_timesteps(steps)
    repeats = len(s.timesteps) - len(set(s.timesteps.tolist()))
    assert (repeats > 0) == (steps >= 997)
    x = torch.zeros(1, dtype=torch.float64)
    for t in s.timesteps:
        x = s.step(torch.ones(1, dtype=torch.float64), t, x).prev_sample
    assert float(x) == pytest.approx(-1.0, abs=1e-9)
    s.set_timesteps(steps)  # a new run starts the walk over
    x = s.step(torch.ones(1, dtype=torch.float64), s.timesteps[0], torch.zeros(1, dtype=torch.float64)).prev_sample
    assert float(x) == pytest.approx(-(1 - float(s.timesteps[1]) / 1000), abs=1e-12)

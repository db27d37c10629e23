"""The scheduler factories against the configs they must write: every beta setting carried over from the model's
scheduler config (a dict or an object with attributes), the defaults when one is missing, our settings and the
user's overrides, and the refusals (killing the mutants `make mutation` found surviving here)."""

from types import SimpleNamespace

import pytest
from diffusers import DDIMScheduler

from proreflow.errors import ProReflowError
from proreflow.schedulers.perflow import perflow_scheduler
from proreflow.schedulers.proreflow import scheduler_for, stock_scheduler_for, timestep_windows
from proreflow.schedulers.solvers import check_overrides, make_solver
from proreflow.windows import WindowSchedule

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
OTHER = dict(num_train_timesteps=500, beta_start=0.001, beta_end=0.02, beta_schedule="linear", trained_betas=None)


@pytest.mark.parametrize("as_object", [False, True])
def test_perflow_scheduler_carries_every_beta_setting_from_a_dict_or_an_object(as_object):
    config = SimpleNamespace(**OTHER) if as_object else dict(OTHER)
    got = perflow_scheduler(config, prediction_type="ddim_eps", num_windows=2).config
    assert {k: got[k] for k in OTHER} == OTHER and got.prediction_type == "ddim_eps" and got.num_windows == 2
    betas = [0.001 * (i + 1) for i in range(10)]
    trained = perflow_scheduler({**OTHER, "num_train_timesteps": 10, "trained_betas": betas}, num_windows=2).config
    assert list(trained.trained_betas) == betas


@pytest.mark.parametrize("empty", [{}, SimpleNamespace()])
def test_perflow_scheduler_defaults_are_sd15s(empty):
    got = perflow_scheduler(empty).config
    assert {k: got[k] for k in SD} == SD and got.trained_betas is None
    assert got.prediction_type == "diff_eps" and got.num_windows == 4


def test_make_solver_spacing_flow_settings_and_overrides():
    ddim = make_solver("ddim", DDIMScheduler(**OTHER).config)
    assert ddim.config.timestep_spacing == "trailing" and ddim.config.clip_sample is False
    assert ddim.config.beta_schedule == "linear" and ddim.config.num_train_timesteps == 500
    kept = make_solver("euler", DDIMScheduler(**OTHER, timestep_spacing="leading").config, timestep_spacing=None)
    assert kept.config.timestep_spacing == "leading"
    lcm = make_solver("lcm", DDIMScheduler(**OTHER, timestep_spacing="leading").config)
    assert lcm.config.timestep_spacing == "leading"  # LCM's grid is its own: spacing untouched
    assert make_solver("ddim", DDIMScheduler(**OTHER).config).config.prediction_type == "epsilon"
    flow = make_solver("unipc", DDIMScheduler(**OTHER).config, flow=True)
    assert (flow.config.prediction_type, flow.config.use_flow_sigmas, flow.config.flow_shift) == \
        ("flow_prediction", True, 1.0)
    assert make_solver("dpmsolver++", DDIMScheduler(**OTHER).config, overrides={"solver_order": 3}).config.solver_order == 3
    with pytest.raises(ProReflowError, match=r"unknown scheduler 'heun'; use one of \['ddim', 'euler'"):
        make_solver("heun", {})


def test_make_solver_names_the_config_it_could_not_build_from():
    bad = {**OTHER, "_class_name": "DDIMScheduler", "beta_schedule": "no-such-schedule"}
    with pytest.raises(ProReflowError, match=r"from the DDIMScheduler scheduler config: .*no-such-schedule") as err:
        make_solver("ddim", bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ProReflowError, match="from the given scheduler config"):
        make_solver("ddim", {**OTHER, "beta_schedule": "no-such-schedule"})


def test_check_overrides_refuses_unknown_non_finite_and_out_of_range_settings():
    check_overrides("ddim", {"beta_start": 0.001, "beta_end": 0.02, "clip_sample": True, "num_train_timesteps": 1000})
    check_overrides("unipc", {"solver_order": 3, "trained_betas": [0.1, 0.2]})
    for key in ("self", "kwargs"):
        with pytest.raises(ProReflowError, match=f"unknown setting '{key}'"):
            check_overrides("ddim", {key: 1})
    with pytest.raises(ProReflowError, match="did you mean 'beta_start'"):
        check_overrides("ddim", {"beta_strat": 0.001})
    with pytest.raises(ProReflowError, match="must be finite"):
        check_overrides("ddim", {"trained_betas": [0.1, float("nan")]})
    with pytest.raises(ProReflowError, match="must be finite"):
        check_overrides("ddim", {"steps_offset": float("inf")})
    for key, value in (("beta_start", 0.0), ("beta_end", 1.0), ("beta_end", 1.5), ("beta_start", [0.5, 0.0])):
        with pytest.raises(ProReflowError, match=f"setting '{key}' .* must be in \\(0, 1\\)"):
            check_overrides("ddim", {key: value})


def test_scheduler_for_copies_every_beta_setting_and_the_windows():
    windows = WindowSchedule((1.0, 0.6, 0.0))
    got = scheduler_for({**OTHER, "trained_betas": None, "prediction_type": "v_prediction"}, windows).config
    assert {k: got[k] for k in OTHER} == OTHER and got.prediction_type == "v_prediction"
    assert list(got.window_boundaries) == [1.0, 0.6, 0.0] and got.num_windows == 2
    assert scheduler_for(dict(OTHER), windows, "epsilon").config.prediction_type == "epsilon"
    assert scheduler_for(dict(OTHER), windows).config.prediction_type == "epsilon"  # the config names none


def test_stock_ddim_export_settings():
    config = DDIMScheduler(**OTHER, prediction_type="v_prediction", clip_sample=True, thresholding=True).config
    k4 = timestep_windows(config, 4)
    stock = stock_scheduler_for(config, k4)
    c = stock.config
    assert (c.timestep_spacing, c.set_alpha_to_one, c.clip_sample, c.thresholding, c.prediction_type) == \
        ("trailing", True, False, False, "v_prediction")
    assert stock_scheduler_for(config, k4, "epsilon").config.prediction_type == "epsilon"
    moved = WindowSchedule((1.0, *[b + 2e-7 for b in k4.boundaries[1:-1]], 0.0))
    assert stock_scheduler_for(config, moved) is None  # 2e-7 off the timesteps: not where DDIM steps
    assert stock_scheduler_for(config, WindowSchedule((1.0, *[b + 5e-8 for b in k4.boundaries[1:-1]], 0.0))) \
        is not None  # within rounding
    assert stock_scheduler_for({**config, "num_train_timesteps": 999}, timestep_windows(config, 4)) is None

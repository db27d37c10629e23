"""Samplers of published students (PeRFlow, InstaFlow / 2-rectified flow) and how evaluate loads them:
closed-form checks of the window maps, equality with diffusers' DDIM where PeRFlow's rule reduces to it,
stock pipelines against the authors' sampling loops written out by hand, UNet deltas, pipeline classes."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tiny_sd import tiny_pipeline, tiny_sdxl_pipeline, tiny_unet

from proreflow.apps.coco_eval import EvalConfig, RunSpec, evaluate, load_eval_pipeline, run_scheduler
from proreflow.apps.coco_eval.published import merge_unet_delta
from proreflow.errors import ProReflowError
from proreflow.schedulers.perflow import PiecewiseFlowScheduler, perflow_scheduler
from proreflow.schedulers.rectified_flow import RectifiedFlowScheduler

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _alpha_bar(sched, timestep_index):
    return float(sched.alphas_cumprod[timestep_index])


def _loop(sched, x, model, steps):
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    return x


# ------------------------------------------------------------------------------------------- PeRFlow


def test_perflow_timesteps_put_extra_steps_in_the_noisiest_windows():
    s = PiecewiseFlowScheduler(**SD_BETAS)
    for steps, expected in [(4, [1000, 750, 500, 250]), (6, [1000, 875, 750, 625, 500, 250]),
                            (8, [1000, 875, 750, 625, 500, 375, 250, 125]), (12, [1000, 916, 833, 750, 666, 583, 500,
                                                                                 416, 333, 250, 166, 83])]:
        s.set_timesteps(steps)
        assert s.timesteps.tolist() == expected
    with pytest.raises(ProReflowError, match="at least the checkpoint's 4 windows"):
        s.set_timesteps(3)
    assert PiecewiseFlowScheduler(prediction_type="epsilon").config.prediction_type == "diff_eps"  # PeRFlow's old name
    with pytest.raises(ProReflowError, match="unknown PeRFlow prediction_type 'v_prediction'"):
        PiecewiseFlowScheduler(prediction_type="v_prediction")
    with pytest.raises(ProReflowError, match="num_windows must divide"):
        PiecewiseFlowScheduler(num_windows=3)


def test_perflow_timesteps_truncate_like_the_released_sampler_at_any_step_count():
    """PeRFlow's grid is each window's numpy linspace (endpoint excluded) times T, cast to int64, i.e. truncated:
    at 20 steps tau = 0.1 and 0.05 come out a hair under 100 and 50, so the released sampler tells the UNet 99
    and 49 (and steps by those), not 100 and 50; at 40 steps also 324, 74, 24."""
    s = PiecewiseFlowScheduler(**SD_BETAS)
    s.set_timesteps(20)
    assert s.timesteps.tolist() == [1000, 950, 900, 850, 800, 750, 700, 650, 600, 550, 500, 450, 400, 350, 300,
                                    250, 200, 150, 99, 49]
    s.set_timesteps(40)
    assert [t for t in s.timesteps.tolist() if t % 25] == [324, 99, 74, 49, 24]
    assert s._windows[s.timesteps.tolist().index(24)] == 3


def test_perflow_ddim_eps_at_one_step_per_window_is_ddim_at_trailing_timesteps():
    """The 4-step rule equals diffusers' DDIM (trailing 999/749/499/249, final alpha = alphas_cumprod[0]) for a
    network that ignores the timestep; PeRFlow only tells the network 1000/750/500/250 instead."""
    ddim = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    ours = PiecewiseFlowScheduler(**SD_BETAS, prediction_type="ddim_eps")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
    model = lambda x, t: 0.4 * x + 0.1 * w * torch.tanh(x)  # noqa: E731
    a, b = _loop(ours, x0.clone(), model, 4), _loop(ddim, x0.clone(), model, 4)
    assert ddim.timesteps.tolist() == [999, 749, 499, 249] and ours.timesteps.tolist() == [1000, 750, 500, 250]
    assert torch.allclose(a, b, atol=1e-10), (a - b).abs().max()
    # and the window map is the DDIM step written out: x_e = sqrt(ab_e/ab_s) x_s + (sqrt(1-ab_e) - ...) eps
    ab_s, ab_e = _alpha_bar(ours, 999), _alpha_bar(ours, 749)
    assert ours.window_end_map(0) == pytest.approx(
        ((ab_e / ab_s) ** 0.5, (1 - ab_e) ** 0.5 - (ab_e * (1 - ab_s) / ab_s) ** 0.5), rel=1e-12)


@pytest.mark.parametrize("prediction_type", ["diff_eps", "ddim_eps"])
@pytest.mark.parametrize("per_window", [1, 2, 3])
def test_perflow_lands_on_the_window_end_whatever_the_step_count(prediction_type, per_window):
    """A network that returns the noise linking the window's ends walks the straight segment to the end exactly,
    in one step or several (the 'piecewise linear' promise of PeRFlow's sampler)."""
    s = PiecewiseFlowScheduler(**SD_BETAS, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    x_end = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    s.set_timesteps(4 * per_window)
    for k in range(4):
        ab_s = _alpha_bar(s, max(1000 - 250 * k - 1, 0))
        ab_e = _alpha_bar(s, max(1000 - 250 * (k + 1) - 1, 0))
        if prediction_type == "diff_eps":  # eps carries the window end to its start (forward noising)
            x_start = (ab_s / ab_e) ** 0.5 * x_end + (1 - ab_s / ab_e) ** 0.5 * eps
        else:  # eps is the DDIM noise: x_start = sqrt(ab_s) x0 + sqrt(1 - ab_s) eps with x_end = sqrt(ab_e) x0 + ...
            x0 = (x_end - (1 - ab_e) ** 0.5 * eps) / ab_e ** 0.5
            x_start = ab_s ** 0.5 * x0 + (1 - ab_s) ** 0.5 * eps
        x = x_start
        for t in s.timesteps[k * per_window:(k + 1) * per_window]:
            x = s.step(eps, t, x).prev_sample
        assert torch.allclose(x, x_end, atol=1e-9), (k, (x - x_end).abs().max())


def test_perflow_velocity_is_plain_euler_in_tau():
    s = PiecewiseFlowScheduler(**SD_BETAS, prediction_type="velocity")
    x = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    v = torch.ones_like(x)
    assert torch.allclose(_loop(s, x, lambda x, t: v, 8), -v)  # tau goes 1 -> 0: x moves by -1 * v


def test_perflow_scheduler_reads_a_pipelines_betas_and_round_trips(tmp_path):
    pipe = tiny_pipeline(tmp_path / "p")
    s = run_scheduler("perflow-ddim-eps", pipe.scheduler, 4)
    assert isinstance(s, PiecewiseFlowScheduler) and s.config.prediction_type == "ddim_eps"
    assert torch.allclose(s.alphas_cumprod.float(), pipe.scheduler.alphas_cumprod)
    s.save_pretrained(tmp_path / "sched")
    back = PiecewiseFlowScheduler.from_pretrained(tmp_path / "sched")
    assert back.config.prediction_type == "ddim_eps" and back.config.num_windows == 4
    assert run_scheduler("perflow", pipe.scheduler, 4).config.prediction_type == "diff_eps"
    assert isinstance(run_scheduler("rectified-flow", pipe.scheduler, 1), RectifiedFlowScheduler)


# ----------------------------------------------------------------------------- InstaFlow / 2-RF


def test_rectified_flow_scheduler_grid_and_straight_line():
    s = RectifiedFlowScheduler()
    s.set_timesteps(3)
    assert s.timesteps.tolist() == pytest.approx([1000.0, 2000 / 3, 1000 / 3], abs=1e-3)
    g = torch.Generator().manual_seed(0)
    noise, data = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    v = data - noise  # a straight path from noise (tau = 1) to data (tau = 0)
    for n in (1, 2, 5):
        assert torch.allclose(_loop(s, noise, lambda x, t: v, n), data, atol=1e-5)
    s.set_timesteps(2)
    out = s.step(v, s.timesteps[0], noise)
    assert torch.allclose(out.pred_original_sample, data, atol=1e-6)
    with pytest.raises(ProReflowError, match="not one of this scheduler's timesteps"):
        s.step(v, 123.0, noise)
    with pytest.raises(ProReflowError, match=">= 1"):
        s.set_timesteps(0)


# ---------------------------------------------------------------- stock pipelines vs the authors' loops


def _hand_loop(pipe, prompts, steps, guidance, seed, update, timesteps):
    """The authors' loops written out: noise from the pipeline's generator, CFG on (neg, text), update rule."""
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, guidance > 1)
    latents = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    for i, t in enumerate(timesteps):
        both = torch.cat([latents] * 2) if guidance > 1 else latents
        emb = torch.cat([uncond, cond]) if guidance > 1 else cond
        out = pipe.unet(both, torch.full((both.shape[0],), float(t)), encoder_hidden_states=emb).sample
        if guidance > 1:
            u, c = out.chunk(2)
            out = u + guidance * (c - u)
        latents = update(latents, out, i)
    return latents


@torch.no_grad()
def test_stock_pipeline_with_rectified_flow_scheduler_is_instaflows_loop(tmp_path):
    pipe = tiny_pipeline(tmp_path / "p", seed=3)
    pipe.scheduler = RectifiedFlowScheduler()
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "the dog"]
    for steps, guidance in [(1, 0.0), (3, 1.5)]:
        got = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=8, width=8,
                   generator=torch.Generator().manual_seed(7), output_type="latent").images
        want = _hand_loop(pipe, prompts, steps, guidance, 7, lambda x, v, i: x + v / steps,
                          [(1 - i / steps) * 1000 for i in range(steps)])
        assert torch.allclose(got, want, atol=1e-5), (steps, (got - want).abs().max())


@torch.no_grad()
def test_stock_pipeline_with_perflow_scheduler_is_the_window_ddim_loop(tmp_path):
    pipe = tiny_pipeline(tmp_path / "p", seed=4)
    pipe.scheduler = perflow_scheduler(pipe.scheduler.config, prediction_type="ddim_eps")
    pipe.set_progress_bar_config(disable=True)
    ab = pipe.scheduler.alphas_cumprod
    idx = [999, 749, 499, 249, 0]

    def ddim(x, eps, i):  # one DDIM step between window boundaries, written from its definition
        s, e = float(ab[idx[i]]), float(ab[idx[i + 1]])
        x0 = (x - (1 - s) ** 0.5 * eps) / s ** 0.5
        return e ** 0.5 * x0 + (1 - e) ** 0.5 * eps

    got = pipe(["a cat"], num_inference_steps=4, guidance_scale=2.0, height=8, width=8,
               generator=torch.Generator().manual_seed(5), output_type="latent").images
    want = _hand_loop(pipe, ["a cat"], 4, 2.0, 5, ddim, [1000, 750, 500, 250])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@torch.no_grad()
@torch.no_grad()
def test_sdxl_pipeline_with_the_perflow_scheduler_is_diffusers_ddim_at_its_window_starts(tmp_path):
    """Stock StableDiffusionXLPipeline with PeRFlow's ddim_eps scheduler at 4 steps against the same pipeline with
    diffusers' DDIMScheduler (trailing 999/749/499/249, final alpha = alphas_cumprod[0]), whose UNet is told
    t + 1 as PeRFlow tells it 1000/750/500/250: the same latents, with guidance and SDXL's added conditioning."""
    pipe = tiny_sdxl_pipeline(tmp_path / "x")
    pipe.set_progress_bar_config(disable=True)
    stock = pipe.scheduler

    def latents():
        return pipe(["a red cat", "a dog"], num_inference_steps=4, guidance_scale=2.0, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    pipe.scheduler = run_scheduler("perflow-ddim-eps", stock, 4)
    ours = latents()
    pipe.scheduler = DDIMScheduler.from_config(stock.config, timestep_spacing="trailing", set_alpha_to_one=False,
                                               clip_sample=False)
    told, forward = [], pipe.unet.forward

    def shifted(sample, timestep, *args, **kwargs):
        told.append(int(timestep))
        return forward(sample, timestep + 1, *args, **kwargs)

    pipe.unet.forward = shifted
    reference = latents()
    assert told == [999, 749, 499, 249]
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    assert ours.abs().max() > 0.5  # latents, not a degenerate zero


# ---------------------------------------------------------------------- loading: deltas, pipeline class


def test_unet_delta_is_added_to_the_models_unet(tmp_path):
    base = tiny_pipeline(tmp_path / "parts", seed=0)
    base.save_pretrained(tmp_path / "base")
    target = tiny_unet(seed=1)
    delta = tiny_unet(seed=1)
    with torch.no_grad():
        for (k, d), b in zip(delta.state_dict().items(), base.unet.state_dict().values()):
            d.sub_(b)
    delta.save_pretrained(tmp_path / "delta", variant="v0-1")
    pipe = load_eval_pipeline(RunSpec("perflow", str(tmp_path / "base"), scheduler="perflow",
                                      unet_delta=str(tmp_path / "delta"), delta_variant="v0-1"))
    for k, w in target.state_dict().items():
        assert torch.allclose(pipe.unet.state_dict()[k], w, atol=1e-6), k
    assert isinstance(pipe.scheduler, PiecewiseFlowScheduler)
    with pytest.raises(ProReflowError, match=r"cannot load the UNet delta .*\(variant v0-2\)"):
        load_eval_pipeline(RunSpec("p", str(tmp_path / "base"), unet_delta=str(tmp_path / "delta"), delta_variant="v0-2"))
    other = {k: v for k, v in delta.state_dict().items() if "conv_out" not in k}
    with pytest.raises(ProReflowError, match="does not fit this UNet: 2 of its weights have no delta"):
        merge_unet_delta(base.unet, other)
    bad = dict(delta.state_dict(), **{"conv_out.bias": torch.zeros(3)})
    with pytest.raises(ProReflowError, match=r"conv_out.bias is \(4,\), its delta \(3,\)"):
        merge_unet_delta(base.unet, bad)
    with pytest.raises(ProReflowError, match="delta_variant needs unet_delta"):
        RunSpec("p", "m", delta_variant="v0-1")


def test_model_index_naming_a_class_diffusers_lacks(tmp_path):
    """InstaFlow's own code loads with RectifiedFlowPipeline; a folder saved by it names that class."""
    tiny_pipeline(tmp_path / "parts").save_pretrained(tmp_path / "rf")
    index = json.loads((tmp_path / "rf" / "model_index.json").read_text())
    (tmp_path / "rf" / "model_index.json").write_text(json.dumps(dict(index, _class_name="RectifiedFlowPipeline")))
    with pytest.raises(ProReflowError, match="names a pipeline class diffusers lacks .* pipeline: StableDiffusionPipeline"):
        load_eval_pipeline(RunSpec("rf", str(tmp_path / "rf"), scheduler="rectified-flow"))
    pipe = load_eval_pipeline(RunSpec("rf", str(tmp_path / "rf"), scheduler="rectified-flow",
                                      pipeline="StableDiffusionPipeline"))
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, RectifiedFlowScheduler)
    with pytest.raises(ProReflowError, match="diffusers has no pipeline class 'NoSuchPipeline'"):
        load_eval_pipeline(RunSpec("rf", str(tmp_path / "rf"), pipeline="NoSuchPipeline"))
    with pytest.raises(ProReflowError, match="must name a diffusers pipeline class"):
        RunSpec("rf", "m", pipeline="unet")


def test_evaluate_rows_of_published_students_and_older_run_folders_resume(tmp_path):
    tiny_pipeline(tmp_path / "parts").save_pretrained(tmp_path / "m")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nthe dog\na blue dog\n")
    cfg = EvalConfig(captions="prompts", prompts=str(prompts), resolution=16, batch_size=3, fid=False, clip=False,
                     timing_batches=0, progress=False)
    runs = [RunSpec("InstaFlow (tiny)", str(tmp_path / "m"), steps=1, guidance=0.0, scheduler="rectified-flow"),
            RunSpec("PeRFlow (tiny)", str(tmp_path / "m"), steps=4, guidance=2.0, scheduler="perflow")]
    rows = evaluate(runs, cfg, tmp_path / "out")
    assert [(r["scheduler"], r["steps"], r["generated_now"]) for r in rows] == [("rectified-flow", 1, 3),
                                                                               ("perflow", 4, 3)]
    meta = json.loads((tmp_path / "out" / "runs" / runs[1].slug / "run.json").read_text())
    assert "unet_delta" not in meta["spec"]  # unset later fields stay out, so folders written before them resume
    again = evaluate(runs, cfg, tmp_path / "out")
    assert [r["generated_now"] for r in again] == [0, 0]


def test_cli_evaluate_a_published_student_with_delta_and_pipeline_class(tmp_path):
    from typer.testing import CliRunner

    from proreflow.cli import app

    base = tiny_pipeline(tmp_path / "parts", seed=0)
    base.save_pretrained(tmp_path / "rf")
    index = json.loads((tmp_path / "rf" / "model_index.json").read_text())
    (tmp_path / "rf" / "model_index.json").write_text(json.dumps(dict(index, _class_name="RectifiedFlowPipeline")))
    delta = tiny_unet(seed=2)
    delta.save_pretrained(tmp_path / "delta", variant="v0-1")
    (tmp_path / "p.txt").write_text("a red cat\nthe dog\n")
    common = ["evaluate", "--model", str(tmp_path / "rf"), "--captions", "prompts", "--prompts", str(tmp_path / "p.txt"),
              "--resolution", "16", "--no-fid", "--no-clip", "--timing-batches", "0", "--quiet"]
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "o"), "--scheduler", "rectified-flow", "--steps", "1",
                                 "--guidance", "0", "--pipeline", "StableDiffusionPipeline",
                                 "--unet-delta", str(tmp_path / "delta"), "--delta-variant", "v0-1"])
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "o" / "results.json").read_text())["rows"][0]
    assert (row["scheduler"], row["steps"], row["images"], row["unet_delta"]) == ("rectified-flow", 1, 2,
                                                                                  str(tmp_path / "delta"))
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "o2"), "--scheduler", "perflow", "--steps", "4"])
    assert r.exit_code == 2 and "names a pipeline class diffusers lacks" in r.stderr, r.output
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "o3"), "--scheduler", "perflow", "--steps", "2",
                                 "--pipeline", "StableDiffusionPipeline"])
    assert r.exit_code == 2 and "PeRFlow's checkpoints have 4 windows, at least one step each" in r.stderr, r.output


def test_unet_weights_file_replaces_the_unet_and_scheduler_overrides(tmp_path):
    """Rectified Diffusion's release: a UNet state dict (rd.ckpt) on SD1.5, DDIM trailing with its own betas."""
    from safetensors.torch import save_file

    tiny_pipeline(tmp_path / "parts", seed=0).save_pretrained(tmp_path / "base")
    target = tiny_unet(seed=5).state_dict()
    save_file({k: v.contiguous() for k, v in target.items()}, str(tmp_path / "w.safetensors"))
    torch.save(target, tmp_path / "w.ckpt")
    torch.save({"state_dict": target}, tmp_path / "wrapped.ckpt")
    for f in ("w.safetensors", "w.ckpt", "wrapped.ckpt"):
        pipe = load_eval_pipeline(RunSpec("rd", str(tmp_path / "base"), scheduler="ddim", unet_weights=str(tmp_path / f),
                                          scheduler_overrides={"beta_schedule": "linear"}))
        assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in target.items()), f
    assert pipe.scheduler.config.beta_schedule == "linear" and pipe.scheduler.config.timestep_spacing == "trailing"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    torch.save({k: v for k, v in target.items() if "conv_in" not in k}, tmp_path / "part.ckpt")
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    torch.save([1, 2], tmp_path / "list.ckpt")
    for f, needle in [("part.ckpt", "do not fit this UNet: 2 of its weights are missing"),
                      ("junk.ckpt", "cannot read"), ("list.ckpt", "is not a state dict of tensors"),
                      ("none.ckpt", "no such file")]:
        with pytest.raises(ProReflowError, match=needle):
            load_eval_pipeline(RunSpec("rd", str(tmp_path / "base"), unet_weights=str(tmp_path / f)))
    with pytest.raises(ProReflowError, match="scheduler_overrides apply to a named diffusers scheduler"):
        RunSpec("rd", "m", scheduler="perflow", scheduler_overrides={"beta_schedule": "linear"})
    with pytest.raises(ProReflowError, match="scheduler_overrides must be a mapping"):
        RunSpec("rd", "m", scheduler="ddim", scheduler_overrides="linear")


def test_cli_scheduler_settings_and_unet_weights(tmp_path):
    from typer.testing import CliRunner

    from proreflow.cli import app

    tiny_pipeline(tmp_path / "parts", seed=0).save_pretrained(tmp_path / "base")
    torch.save(tiny_unet(seed=5).state_dict(), tmp_path / "rd.ckpt")
    (tmp_path / "p.txt").write_text("a red cat\nthe dog\n")
    common = ["evaluate", "--model", str(tmp_path / "base"), "--captions", "prompts", "--prompts", str(tmp_path / "p.txt"),
              "--resolution", "16", "--no-fid", "--no-clip", "--timing-batches", "0", "--quiet", "--scheduler", "ddim"]
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "o"), "--unet-weights", str(tmp_path / "rd.ckpt"),
                                 "--scheduler-setting", "beta_schedule=linear", "--scheduler-setting", "beta_end=0.012"])
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "o" / "results.json").read_text())["rows"][0]
    assert row["unet_weights"] == str(tmp_path / "rd.ckpt") and row["images"] == 2
    run = json.loads((tmp_path / "o" / "runs" / "base-ddim-4steps-cfg4" / "run.json").read_text())
    assert run["spec"]["scheduler_overrides"] == {"beta_schedule": "linear", "beta_end": 0.012}
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "o2"), "--scheduler-setting", "linear"])
    assert r.exit_code == 2 and "--scheduler-setting takes KEY=VALUE, got 'linear'" in r.stderr, r.output


def test_scheduler_overrides_must_name_settings_of_the_scheduler(tmp_path):
    """diffusers' from_config drops keys its class lacks without a word, so a misspelt override would sample with
    plain DDIM under the student's name: unknown keys stop the run when the suite row is read."""
    from typer.testing import CliRunner

    from proreflow import schedulers
    from proreflow.cli import app

    with pytest.raises(ProReflowError, match=r"unknown setting 'beta_shedule' of the 'ddim' scheduler \(DDIMScheduler\)"
                                             r"; did you mean 'beta_schedule'\?"):
        RunSpec("rd", "m", scheduler="ddim", scheduler_overrides={"beta_shedule": "linear"})
    with pytest.raises(ProReflowError, match="unknown setting 1 of the 'euler' scheduler"):
        RunSpec("rd", "m", scheduler="euler", scheduler_overrides={1: "linear"})
    assert RunSpec("rd", "m", scheduler="ddim", scheduler_overrides={"beta_schedule": "linear"}).scheduler_overrides
    config = tiny_pipeline(tmp_path / "p").scheduler.config
    with pytest.raises(ProReflowError, match="unknown setting 'set_alpha_to_1' of the 'ddim' scheduler"):
        schedulers.make_scheduler("ddim", config, overrides={"set_alpha_to_1": False})
    (tmp_path / "p.txt").write_text("a red cat\n")
    r = CliRunner().invoke(app, ["evaluate", "--model", "m", "--captions", "prompts", "--prompts", str(tmp_path / "p.txt"),
                                 "--no-fid", "--no-clip", "--quiet", "--out", str(tmp_path / "o"), "--scheduler", "ddim",
                                 "--scheduler-setting", "beta_shedule=linear"])
    assert r.exit_code == 2 and "unknown setting 'beta_shedule'" in r.stderr, r.output


def test_every_named_scheduler_samples_in_half_precision_like_float32(tmp_path):
    """What `evaluate` does on a GPU (dtype auto = float16): every scheduler's arithmetic in the pipeline's
    dtype; here on CPU, float16 and bfloat16 images agree with float32 ones to rounding."""
    from proreflow.apps.coco_eval import SCHEDULERS, pipeline_generate_fn

    tiny_pipeline(tmp_path / "parts").save_pretrained(tmp_path / "m")
    for name in SCHEDULERS:
        spec = RunSpec("x", str(tmp_path / "m"), steps=4, guidance=2.0, scheduler=name)
        images = {}
        for dtype in ("float32", "float16", "bfloat16"):
            pipe = load_eval_pipeline(spec, dtype=dtype, device=torch.device("cpu"))
            assert pipe.unet.dtype == getattr(torch, dtype)
            images[dtype] = pipeline_generate_fn(pipe, spec, 16)(["a cat", "a dog"],
                                                                 [torch.Generator().manual_seed(i) for i in range(2)])
        assert np.abs(images["float16"] - images["float32"]).mean() < 1e-3, name
        assert np.abs(images["bfloat16"] - images["float32"]).mean() < 5e-3, name

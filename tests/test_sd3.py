"""Flow-matching transformer teachers (SD3-style) end to end, offline on a tiny random-weight StableDiffusion3Pipeline:
distil (full and LoRA), export with stock FlowMatchEulerDiscreteScheduler (uniform windows), reload with
`from_pretrained`, sample in 2 steps (= our windowed sampler) and 4 (ours, through `load_for_sampling`), and
evaluate."""

import json

import pytest
import torch
from typer.testing import CliRunner

from diffusers import FlowMatchEulerDiscreteScheduler

from proreflow.apps.sd import DistillConfig, distill, encode_folder, load_pipeline
from proreflow.apps.sd.export import load_for_sampling
from proreflow.cli import app
from proreflow.fields import FlowVelocity, from_pipeline
from proreflow.methods import MethodSpec
from proreflow.models.sd_shapes import tiny_sd3_pipeline
from proreflow.pairs import TeacherSolver, make_window_pairs
from proreflow.sampling import sample
from proreflow.schedulers.proreflow import ProReflowFlowScheduler
from proreflow.time_sampling import TimeSampling
from proreflow.training import TrainConfig
from proreflow.windows import WindowSchedule

#: what StableDiffusion3Pipeline.from_pretrained needs to be told about a pipeline saved without T5
NO_T5 = dict(text_encoder_3=None, tokenizer_3=None, feature_extractor=None, image_encoder=None)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    tiny_sd3_pipeline(root / "parts").save_pretrained(root / "teacher")
    return root / "teacher"


def _cfg(model, **kw):
    base = dict(model=str(model), resolution=16, steps=2, method=MethodSpec("proreflow", windows="4->k", lam=1.0),
                budget_steps=40, teacher_solver=TeacherSolver("euler", 2), gradient_checkpointing=False,
                time_sampling=TimeSampling(), caption_dropout=0.2,
                train=TrainConfig(lr=1e-3, batch_size=6, ema_decay=0.9, progress=False, seed=0, mixed_precision="no"))
    return DistillConfig(**{**base, **kw})


#: the student's 2 final windows: where the teacher's scheduler (shift 3) steps, entry T/2 of diffusers' own
#: training sigmas, f(1/2) = 3 * 0.5 / (1 + 2 * 0.5) = 0.75 (`window_placement: timesteps`, the default)
SHIFTED_2 = WindowSchedule((1.0, float(FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas[500]), 0.0))


def _pair_loss(student, teacher, data) -> float:
    """The training objective (velocity MSE to the chord, uniform points: the config's time sampling) on fixed
    teacher pairs of the final (2-window) schedule."""
    gen = torch.Generator().manual_seed(0)
    schedule = SHIFTED_2
    cond = {k: v for k, v in data.cond.items()}
    with torch.no_grad():
        pairs = make_window_pairs(teacher, data.latents.repeat(4, 1, 1, 1), schedule, TeacherSolver("euler", 2), gen,
                                  cond={k: v.repeat(4, *[1] * (v.ndim - 1)) for k, v in cond.items()})
        cond = {k: v.repeat(4, *[1] * (v.ndim - 1)) for k, v in cond.items()}
        x, t = pairs.point(torch.rand(4 * data.latents.shape[0], generator=gen))
        return float(((student(x, t, cond) - pairs.target()) ** 2).mean())


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_sd3_style_teacher_distils_exports_reloads_and_samples(tmp_path, sd3_dir, image_folder, lora_rank):
    from diffusers import StableDiffusion3Pipeline

    cfg = _cfg(sd3_dir, lora_rank=lora_rank)
    pipe = load_pipeline(cfg.model)
    data = encode_folder(pipe, image_folder, cfg.resolution)
    assert set(data.cond) == {"encoder_hidden_states", "pooled_projections"}
    teacher = from_pipeline(load_pipeline(cfg.model))
    assert isinstance(teacher, FlowVelocity)
    before = _pair_loss(from_pipeline(load_pipeline(cfg.model)), teacher, data)
    base = {k: v.clone() for k, v in load_pipeline(cfg.model).transformer.state_dict().items()}
    summary = distill(cfg, pipe, data, tmp_path / "student")
    assert summary["windows"] == pytest.approx([1.0, 0.75, 0.0]) and summary["optimizer_steps"] == 40
    assert list(SHIFTED_2.boundaries) == pytest.approx([1.0, 0.75, 0.0])
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path / "student", **NO_T5)
    # stock diffusers: the teacher's shift 3, and shift_terminal 0.75 stretches its 2 sigmas onto the 2 windows
    assert type(loaded.scheduler) is FlowMatchEulerDiscreteScheduler and loaded.scheduler.config.shift == 3.0
    assert loaded.scheduler.config.shift_terminal == pytest.approx(0.75)
    assert not loaded.scheduler.config.use_dynamic_shifting
    trained = loaded.transformer.state_dict()
    assert set(trained) == set(base) and any(not torch.equal(trained[k], base[k]) for k in base)
    if lora_rank:  # only the adapted attention projections moved; the adapters are fused away
        frozen = [k for k in base if not any(m in k for m in ("to_k", "to_q", "to_v", "to_out"))]
        assert all(torch.equal(trained[k], base[k]) for k in frozen)
    after = _pair_loss(FlowVelocity.from_scheduler(loaded.transformer, pipe.scheduler), teacher, data)
    # the pair loss written out in _pair_loss (not the training loss): measured 0.40 x before (full), 0.86 x (LoRA)
    assert after < (0.93 if lora_rank else 0.5) * before, (before, after)
    # 2 steps in stock diffusers = our sampler over the student's windows, from the same noise (latents, no CFG)
    noise = torch.randn(1, loaded.transformer.config.in_channels, 2, 2, generator=torch.Generator().manual_seed(0))
    theirs = loaded("a red cat", num_inference_steps=2, height=16, width=16, guidance_scale=1.0, latents=noise.clone(),
                    output_type="latent").images
    assert loaded.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.75, 0.0])
    emb, _, pooled, _ = loaded.encode_prompt("a red cat", None, None, do_classifier_free_guidance=False)
    with torch.no_grad():
        ours = sample(FlowVelocity.from_scheduler(loaded.transformer, pipe.scheduler), noise, SHIFTED_2,
                      cond={"encoder_hidden_states": emb, "pooled_projections": pooled})
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max(), float((ours - theirs).abs().max())
    # more steps per window: `proreflow sample` / `evaluate` swap in ProReflowFlowScheduler, which keeps the windows
    # (stock diffusers would space 4 sigmas from 1 to 0.75 and take the last window in one step)
    again = load_for_sampling(str(tmp_path / "student"), 4)
    assert isinstance(again.scheduler, ProReflowFlowScheduler)
    images = again("a red cat", num_inference_steps=4, height=16, width=16, guidance_scale=2.0,
                   output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.as_tensor(images)).all()
    assert again.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.875, 0.75, 0.375, 0.0])
    from proreflow.apps.coco_eval import RunSpec
    from proreflow.apps.coco_eval.generate import load_eval_pipeline

    for steps, kind in ((2, FlowMatchEulerDiscreteScheduler), (4, ProReflowFlowScheduler)):  # `evaluate` alike
        run = RunSpec("student", str(tmp_path / "student"), steps=steps, pipeline="StableDiffusion3Pipeline")
        assert type(load_eval_pipeline(run, "float32", torch.device("cpu")).scheduler) is kind


def test_sd3_student_through_the_cli_and_evaluate(tmp_path, sd3_dir, image_folder):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"model: {sd3_dir}\nresolution: 16\nsteps: 2\nmethod: {{name: proreflow, windows: '4->k'}}\n"
                      "budget_steps: 4\nteacher_solver: {method: euler, steps: 2}\ngradient_checkpointing: false\n"
                      "train: {batch_size: 2, per_device_batch: null, lr: 1.0e-3, mixed_precision: 'no', warmup_steps: 0}\n")
    runner = CliRunner()
    r = runner.invoke(app, ["distill", "--data", str(image_folder), "--preset", str(preset), "--out",
                            str(tmp_path / "student"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "student" / "proreflow.json").read_text())["window_placement"] == "timesteps"
    (tmp_path / "prompts.txt").write_text("a red cat\nthe dog\n")
    r = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "student"), "--steps", "2", "--no-fid", "--no-clip",
                            "--timing-batches", "0", "--captions", "prompts", "--prompts", str(tmp_path / "prompts.txt"),
                            "--resolution", "16", "--batch-size", "2", "--out", str(tmp_path / "eval"), "--quiet"])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert rows[0]["steps"] == 2 and rows[0]["images"] == 2
    r = runner.invoke(app, ["sample", "--model", str(tmp_path / "student"), "--prompt", "a cat", "--steps", "4",
                            "--height", "16", "--width", "16", "--out", str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "png" / "000.png").is_file()

"""Watching an SD distillation: `distill --report-to tensorboard --validate-every N` on a tiny pipeline writes the
named curves and validation images, validation trains bitwise the same student, and the decode it renders with is
the inverse of the encode the data went through."""

import json

import pytest
import torch
from typer.testing import CliRunner

from proreflow.apps.sd import DistillConfig, distill, encode_folder, load_pipeline
from proreflow.apps.sd.encode import decode_latents
from proreflow.apps.sd.validate import DEFAULT_PROMPTS, pick_prompts
from proreflow.cli import app
from proreflow.errors import ProReflowError
from proreflow.methods import MethodSpec
from proreflow.pairs import TeacherSolver
from proreflow.time_sampling import TimeSampling
from proreflow.training import MonitorConfig, TrainConfig

runner = CliRunner()


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_cli_distill_reports_to_tensorboard_with_validation_images(tmp_path, teacher_dir, image_folder):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"model: {teacher_dir}\nresolution: 16\nsteps: 2\nmethod: {{name: proreflow, windows: '4->k'}}\n"
                      "budget_steps: 8\nteacher_solver: {method: euler, steps: 2}\n"
                      "train: {batch_size: 2, per_device_batch: null, lr: 1.0e-3, mixed_precision: \"no\", warmup_steps: 0}\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n\n")
    out = tmp_path / "student"
    r = runner.invoke(app, ["distill", "--data", str(image_folder), "--out", str(out), "--preset", str(preset),
                            "--quiet", "--validate-every", "2", "--validation-prompts", str(prompts)])
    assert r.exit_code == 0, r.output
    ev = _events(out / "logs" / "distill")
    tags = set(ev.Tags()["scalars"])
    want = {f"train/{n}" for n in ("loss", "mse", "direction", "lr", "grad_norm", "ema_decay", "samples_per_s",
                                   "teacher_nfe", "stage")} | {"validation/fidelity_rmse"}
    assert want <= tags, want - tags
    assert any(t.startswith("window_mse/K4_w") for t in tags) and any(t.startswith("window_cos/K2_w") for t in tags)
    # 8 steps over two stages of 4: the last point of each stage and validation every 2 steps, on one axis
    assert [e.step for e in ev.Scalars("validation/fidelity_rmse")] == [2, 4, 6, 8]
    assert [e.value for e in ev.Scalars("train/stage")][-1] == 2
    teacher = ev.Images("validation/teacher")
    assert len(teacher) == 1 and len(ev.Images("validation/student")) == 4
    # the picture: 2 prompts -> the student's row over the teacher's, 16 px images with 1 px gaps
    assert (teacher[0].height, teacher[0].width) == (2 * 17 - 1, 2 * 17 - 1)
    assert sorted(p.name for p in (out / "validation" / "distill").iterdir()) == [
        "step-0000002.png", "step-0000004.png", "step-0000006.png", "step-0000008.png", "teacher.png"]
    # the student is exported as before; the monitor's settings are not training settings
    assert "report_to" not in json.dumps(json.loads((out / "run.json").read_text()))


def test_validation_flags_are_checked_before_any_work(tmp_path, teacher_dir, image_folder):
    base = ["distill", "--data", str(image_folder), "--preset", "sd15-proreflow-I", "--model", str(teacher_dir)]
    for extra, needle in ((["--report-to", "mlflow"], "--report-to must be one of tensorboard, wandb, none"),
                          (["--validate-every", "-1"], "validate-every must be an integer in [0, 1e9]"),
                          (["--validation-prompts", str(tmp_path / "p.txt")], "only with --validate-every")):
        (tmp_path / "p.txt").write_text("a cat\n")
        out = tmp_path / f"o{len(extra)}{extra[0]}"
        r = runner.invoke(app, [*base, "--out", str(out), *extra])
        assert r.exit_code == 2 and needle in r.stderr, (extra, r.output)
        assert not out.exists()


def _cfg(teacher_dir):
    return DistillConfig(gradient_checkpointing=False, time_sampling=TimeSampling(), window_placement="flow",
                         model=str(teacher_dir), resolution=16, steps=2,
                         method=MethodSpec("proreflow", windows="4->k", lam=1.0), budget_steps=8,
                         teacher_solver=TeacherSolver("euler", 2), caption_dropout=0.2,
                         train=TrainConfig(lr=1e-3, batch_size=4, ema_decay=0.9, progress=False, seed=0))


def test_validation_every_2_steps_trains_bitwise_the_same_student(tmp_path, teacher_dir, image_folder):
    students = []
    for i, monitor in enumerate((None, MonitorConfig(report_to="none", validate_every=2, log_every=1))):
        pipe = load_pipeline(str(teacher_dir))
        data = encode_folder(pipe, image_folder, 16)
        distill(_cfg(teacher_dir), pipe, data, tmp_path / f"s{i}", monitor=monitor, validation_prompts=["a cat"])
        students.append(load_pipeline(str(tmp_path / f"s{i}")).unet.state_dict())
    assert (tmp_path / "s1" / "validation" / "distill" / "step-0000008.png").is_file()
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])


def test_decode_inverts_the_latent_scaling_the_data_was_encoded_with(teacher_dir):
    pipe = load_pipeline(str(teacher_dir))
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sf = pipe.vae.config.scaling_factor
    with torch.no_grad():  # what StableDiffusionPipeline does with its final latents
        want = (pipe.vae.decode(z / sf).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(decode_latents(pipe, z), want, atol=1e-6)


def test_validation_prompts_default_to_the_first_distinct_captions():
    assert pick_prompts(None, ["a", "a", "b", "c", "d", "e"]) == ["a", "b", "c", "d"]
    assert pick_prompts(["x"], ["a"]) == ["x"]
    assert pick_prompts(None, None) == list(DEFAULT_PROMPTS)
    with pytest.raises(ProReflowError, match="at most 16"):
        pick_prompts([f"p{i}" for i in range(17)], None)

"""SD distillation end to end on a tiny random-weight pipeline: full and LoRA, export, sample, CLI."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from tiny_sd import tiny_pipeline
from typer.testing import CliRunner

from proreflow.apps.sd import DistillConfig, build_teacher_student, distill, encode_folder, load_pipeline
from proreflow.cli import app
from proreflow.methods import MethodSpec
from proreflow.pairs import TeacherSolver, make_window_pairs
from proreflow.time_sampling import TimeSampling
from proreflow.training import TrainConfig

runner = CliRunner()


def _cfg(teacher_dir, **kw):
    base = dict(gradient_checkpointing=False, time_sampling=TimeSampling(), window_placement="flow",
                model=str(teacher_dir), resolution=16, steps=2, method=MethodSpec("proreflow", windows="4->k", lam=1.0),
                budget_steps=40, teacher_solver=TeacherSolver("euler", 2), caption_dropout=0.2,
                train=TrainConfig(lr=1e-3, batch_size=6, ema_decay=0.9, progress=False, seed=0))
    base.update(kw)
    return DistillConfig(**base)


def _pair_loss(student, teacher, data, cfg, weighting=None):
    """The training loss on fixed teacher pairs of the final windows, written out: the velocity MSE (the default
    `loss_weighting`; eps-space under `output`) + lambda (1 - cos)."""
    gen = torch.Generator().manual_seed(123)
    x0, cond = data.data_fn(0.0, False)(12, gen)
    plan = cfg.method.plan(cfg.steps, cfg.budget_steps)
    pairs = make_window_pairs(teacher, x0, plan.final, cfg.teacher_solver, generator=gen, cond=cond)
    x, t = pairs.point(torch.rand(12, generator=gen) * 0.9)
    with torch.no_grad():
        pred, target = student(x, t, cond).flatten(1), pairs.target().flatten(1)
    per = (pred - target).pow(2).mean(1)
    w = student.loss_weight(t) if (weighting or cfg.method.loss_weighting) == "output" else torch.ones_like(per)
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=1)
    return float((w * per).sum() / w.sum() + cfg.method.lam * (1 - cos).mean())


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_distill_lowers_the_loss_and_exports_a_loadable_student(tmp_path, teacher_dir, image_folder, lora_rank):
    cfg = _cfg(teacher_dir, lora_rank=lora_rank)
    pipe = load_pipeline(cfg.model)
    data = encode_folder(pipe, image_folder, cfg.resolution)
    assert data.latents.shape == (6, 4, 16, 16) and data.cond["encoder_hidden_states"].shape[0] == 6
    probe_teacher, probe_student = build_teacher_student(load_pipeline(cfg.model), replace_lora(cfg, 0))
    before = {w: _pair_loss(probe_student, probe_teacher, data, cfg, w) for w in ("velocity", "output")}
    teacher_unet = {k: v.clone() for k, v in load_pipeline(cfg.model).unet.state_dict().items()}
    seen = []
    summary = distill(cfg, pipe, data, tmp_path / "student", on_step=lambda stage, done, *_: seen.append((stage, done)))
    assert summary["optimizer_steps"] == 40 and summary["stage_windows"] == [4, 2]
    assert seen == [(k, d) for k in (0, 1) for d in range(1, 21)]  # (0-based stage, steps done in it): sd_sized's clock
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "student")
    assert type(loaded.scheduler).__name__ == "ProReflowScheduler"
    student_unet = loaded.unet.state_dict()
    assert set(student_unet) == set(teacher_unet)  # a plain UNet, LoRA fused in
    assert any(not torch.equal(student_unet[k], teacher_unet[k]) for k in teacher_unet)
    if lora_rank:
        assert (tmp_path / "student" / "lora" / "pytorch_lora_weights.safetensors").is_file()
        frozen = [k for k in teacher_unet if not any(t in k for t in ("to_k", "to_q", "to_v", "to_out"))]
        assert all(torch.equal(student_unet[k], teacher_unet[k]) for k in frozen)  # only adapted layers moved
    _, fresh_teacher = build_teacher_student(load_pipeline(cfg.model), replace_lora(cfg, 0))
    from proreflow.fields.vp import VPVelocity

    trained = VPVelocity(loaded.unet, fresh_teacher.schedule)
    after = {w: _pair_loss(trained, probe_teacher, data, cfg, w) for w in ("velocity", "output")}
    if not lora_rank:  # full fine-tuning; tiny LoRA moves too little in 40 steps to test a loss drop
        # trained on the velocity MSE (the default), measured 0.85 x before on it and 0.62 x on the eps-space MSE.
        # On this random UNet the eps-space run lowers both further (0.80 x, 0.56 x): random weights are no guide
        # to the weighting; the trained mini SD is (benchmarks/results/mini_sd_windows.md)
        assert after["velocity"] < 0.9 * before["velocity"], (before, after)
        assert after["output"] < 0.7 * before["output"], (before, after)
    images = loaded(["a red cat"], num_inference_steps=2, guidance_scale=3.0, height=16, width=16,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_distill_with_previous_stage_pairs_and_mixture_sampling_records_its_recipe(tmp_path, teacher_dir, image_folder,
                                                                                  lora_rank):
    from proreflow.time_sampling import TimeSampling

    method = MethodSpec("proreflow", windows="4->k", lam=1.0, pair_source="previous_stage")
    cfg = _cfg(teacher_dir, lora_rank=lora_rank, method=method, budget_steps=8,
               time_sampling=TimeSampling("mixture", 0.5), window_placement="timesteps")  # windows at 999, 499, 0
    pipe = load_pipeline(cfg.model)
    summary = distill(cfg, pipe, encode_folder(pipe, image_folder, cfg.resolution), tmp_path / "student")
    assert summary["pair_source"] == "previous_stage"
    assert summary["time_sampling"] == {"rule": "mixture", "start_fraction": 0.5, "margin": 0.0}
    # stage 1 (4 windows): 2 teacher Euler steps per pair; stage 2 (2 windows): 2 student steps per pair
    assert summary["teacher_nfe_per_pair"] == pytest.approx(1.0) and summary["student_nfe_per_pair"] == pytest.approx(1.0)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "student")
    loaded.set_progress_bar_config(disable=True)

    def latents(steps):
        return loaded(["a red cat", "a dog"], num_inference_steps=steps, guidance_scale=1.0, height=16, width=16,
                      output_type="latent", generator=torch.Generator().manual_seed(0)).images

    two, four = latents(2), latents(4)  # one and two steps per window
    # one step per window (999 -> 499 -> 0) is diffusers' own DDIM at trailing timesteps down to alpha = 1
    loaded.scheduler = DDIMScheduler.from_config(loaded.scheduler.config, timestep_spacing="trailing",
                                                 set_alpha_to_one=True, clip_sample=False)
    reference = latents(2)
    assert torch.allclose(two, reference, atol=1e-5), (two - reference).abs().max()
    assert torch.isfinite(four).all() and not torch.allclose(two, four, atol=1e-3)


def replace_lora(cfg, rank):
    from dataclasses import replace

    return replace(cfg, lora_rank=rank)


def test_lora_teacher_is_the_unet_with_adapters_off(teacher_dir):
    cfg = _cfg(teacher_dir, lora_rank=4)
    teacher, student = build_teacher_student(load_pipeline(cfg.model), cfg)
    assert teacher.field.unet is student.unet  # one UNet in memory
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    y, t = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 0.3])
    cond = {"encoder_hidden_states": torch.randn(2, 16, 16)}
    with torch.no_grad():
        before = teacher(y, t, cond)
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
        assert torch.equal(teacher(y, t, cond), before)
        assert not torch.allclose(student(y, t, cond), before)


def test_cli_distill_and_sample(tmp_path, teacher_dir, image_folder, monkeypatch):
    from accelerate import PartialState

    ended: list[int] = []  # issue 4: the command ends training (accelerate's end_training: the process group)
    monkeypatch.setattr(PartialState, "destroy_process_group", lambda self, group=None: ended.append(1))
    out = tmp_path / "student"
    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"model: {teacher_dir}\nresolution: 16\nsteps: 2\nmethod: {{name: proreflow, windows: '4->k'}}\n"
                      "budget_steps: 4\nteacher_solver: {method: euler, steps: 2}\n"
                      "train: {batch_size: 2, per_device_batch: null, lr: 1.0e-3, mixed_precision: \"no\", warmup_steps: 0}\n")
    r = runner.invoke(app, ["distill", "--data", str(image_folder), "--out", str(out), "--preset", str(preset), "--quiet"])
    assert r.exit_code == 0, r.output
    assert ended == [1]
    import json

    assert json.loads((out / "proreflow.json").read_text())["seed"] == 0
    # the preset's train.seed is the run's seed unless --seed is given (a preset seed of 3 used to train seed 0)
    seeded = preset.read_text().replace("warmup_steps: 0}", "warmup_steps: 0, seed: 3}")
    (tmp_path / "seeded.yaml").write_text(seeded)
    cache = ["--pair-cache", str(tmp_path / "pairs")]
    for extra, want, name in (([], 3, "s3"), (["--seed", "5"], 5, "s5"), ([], 3, "s3-again")):
        r = runner.invoke(app, ["distill", "--data", str(image_folder), "--out", str(tmp_path / name), "--preset",
                                str(tmp_path / "seeded.yaml"), "--quiet", *cache, *extra])
        assert r.exit_code == 0, r.output
        summary = json.loads((tmp_path / name / "proreflow.json").read_text())
        assert summary["seed"] == want, summary
        assert summary["final_loss"] != json.loads((out / "proreflow.json").read_text())["final_loss"]
        # 4 steps at batch 2: 8 pairs, solved by each new seed, loaded by the seed-3 run's repeat
        assert summary["pair_cache"] == ({"loaded": 8, "solved": 0} if name == "s3-again" else {"loaded": 0, "solved": 8})
    losses = [json.loads((tmp_path / n / "proreflow.json").read_text())["final_loss"] for n in ("s3", "s3-again")]
    assert losses[0] == losses[1]  # loaded pairs: the same run
    (tmp_path / "afile").write_text("x")
    r = runner.invoke(app, ["distill", "--data", str(image_folder), "--out", str(tmp_path / "s9"), "--preset",
                            str(preset), "--quiet", "--pair-cache", str(tmp_path / "afile")])
    assert r.exit_code != 0 and "--pair-cache" in r.output and "is not a folder" in r.output
    r = runner.invoke(app, ["sample", "--model", str(out), "--prompt", "a cat", "--prompt", "a dog", "--steps", "2",
                            "--height", "16", "--width", "16", "--out", str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["000.png", "001.png", "prompts.txt", "sample.json"]
    # issue 26: a finished folder is never replaced by a run with other settings unless --overwrite
    r = runner.invoke(app, ["distill", "--data", str(image_folder), "--out", str(out), "--preset", str(preset), "--quiet"])
    assert r.exit_code == 2 and "already holds a pipeline" in r.stderr, r.output
    first = (tmp_path / "png" / "000.png").read_bytes()
    again = ["sample", "--model", str(out), "--prompt", "a cat", "--steps", "2", "--height", "16", "--width", "16",
             "--out", str(tmp_path / "png")]
    r = runner.invoke(app, again)  # another prompt list: refused, nothing touched
    assert r.exit_code == 2 and "holds images made with other settings (prompts: " in r.stderr, r.output
    assert (tmp_path / "png" / "001.png").exists() and (tmp_path / "png" / "000.png").read_bytes() == first
    r = runner.invoke(app, [*again, "--overwrite"])  # replaced, the earlier second image removed
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["000.png", "prompts.txt", "sample.json"]
    assert json.loads((tmp_path / "png" / "sample.json").read_text())["prompts"] == ["a cat"]
    (tmp_path / "mine").mkdir()  # PNGs that no sample.json describes (a user's, an older proreflow's) are kept
    (tmp_path / "mine" / "000.png").write_bytes(first)
    r = runner.invoke(app, [*again[:-1], str(tmp_path / "mine")])
    assert r.exit_code == 2 and "holds images that no sample.json describes" in r.stderr, r.output
    assert (tmp_path / "mine" / "000.png").read_bytes() == first
    r = runner.invoke(app, ["sample", "--model", str(out), "--prompt", "a cat", "--steps", "3", "--height", "16",
                            "--width", "16", "--out", str(tmp_path / "png3")])
    assert r.exit_code == 2 and "multiple of the student's 2 windows" in r.stderr
    r = runner.invoke(app, ["sample", "--model", str(out), "--prompt", "a cat", "--height", "12"])  # was a traceback
    assert r.exit_code == 2 and "--height must be a positive multiple of 8 up to 4096, got 12" in r.stderr, r.output
    r = runner.invoke(app, ["sample", "--model", str(out), "--prompt", "a cat", "--guidance", "nan"])  # was accepted
    assert r.exit_code == 2 and "--guidance must be a finite number >= 0, got nan" in r.stderr, r.output


def test_distill_resumes_only_the_run_it_started(tmp_path, teacher_dir, image_folder):
    """Issue 26: `--resume latest` with another budget, seed, preset or data set used to resume with exit 0 and
    export a mixed student; a new run over an interrupted one's checkpoints started over silently."""
    import json
    import shutil

    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"model: {teacher_dir}\nresolution: 16\nsteps: 2\nmethod: {{name: proreflow, windows: '4->k'}}\n"
                      "budget_steps: 4\nteacher_solver: {method: euler, steps: 2}\n"
                      "train: {batch_size: 2, per_device_batch: null, lr: 1.0e-3, mixed_precision: \"no\", warmup_steps: 0}\n")
    other = tmp_path / "other.yaml"
    other.write_text(preset.read_text().replace("lr: 1.0e-3", "lr: 2.0e-3"))
    more = tmp_path / "more"
    shutil.copytree(image_folder, more)
    shutil.copy(next(more.glob("*.png")), more / "extra.png")
    (more / "extra.txt").write_text("an extra image")
    out = tmp_path / "run"
    base = ["distill", "--data", str(image_folder), "--preset", str(preset), "--out", str(out), "--quiet"]
    r = runner.invoke(app, base)
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "run.json").read_text())
    assert settings["config"]["budget_steps"] == 4 and settings["data_fingerprint"].startswith("12 files")
    for p in [out / "model_index.json", *(out / "checkpoints" / "stage-2").glob("final*")]:
        p.unlink()  # killed before its end: checkpoints, no pipeline
    r = runner.invoke(app, base)
    assert r.exit_code == 2 and "holds an interrupted run" in r.stderr, r.output
    for extra, needle in ((["--budget", "6"], "config.budget_steps: 4 -> 6"), (["--seed", "1"], "config.train.seed: 0 -> 1"),
                          (["--preset", str(other)], "config.train.lr: 0.001 -> 0.002"),
                          (["--data", str(more)], "data")):
        args = [*base, "--resume", "latest", *extra]
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "was started with different settings" in r.stderr and needle in r.stderr, (extra, r.output)
        assert not (out / "model_index.json").exists()
    r = runner.invoke(app, [*base, "--resume", "latest"])  # the same settings resume
    assert r.exit_code == 0, r.output
    assert (out / "model_index.json").is_file()


@pytest.mark.parametrize("args, needle", [
    (["--data", "{tmp}/none"], "does not exist"),
    (["--data", "{nocap}"], "have no .txt caption"),
    (["--data", "{empty}"], "no images"),
    (["--preset", "{tmp}/missing.yaml"], "does not exist"),
    (["--model", "{tmp}/no-such-model"], "cannot load the teacher"),
    (["--lora-rank", "-1"], "lora_rank must be >= 0"),
    (["--resolution", "12"], "multiple of 8"),
    (["--resume", "latest"], "holds no run to resume"),  # it used to start a fresh run silently
    (["--seed", "99999999999999999999"], "--seed must be between 0 and"),
    (["--time-sampling", "start:0.5"], "--time-sampling must be"),
])
def test_cli_distill_bad_input(tmp_path, image_folder, teacher_dir, args, needle):
    (tmp_path / "nocap").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "nocap" / "a.png")
    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path, nocap=tmp_path / "nocap", empty=tmp_path / "empty") for a in args]
    base = ["distill", "--data", str(image_folder), "--out", str(tmp_path / "out"), "--model", str(teacher_dir), "--quiet"]
    r = runner.invoke(app, base + args)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and "Traceback" not in r.output


def test_exported_scheduler_config_states_the_students_window_count(tmp_path):
    """Regression: a 2-window student's scheduler_config.json said num_windows: 4 (the unused default)."""
    import json

    from proreflow.apps.sd.export import export_pipeline
    from proreflow.schedulers.proreflow import ProReflowScheduler
    from proreflow.windows import WindowSchedule

    pipe = tiny_pipeline(tmp_path / "parts")
    export_pipeline(pipe, pipe.unet, WindowSchedule.uniform(2), tmp_path / "student")
    f = tmp_path / "student" / "scheduler" / "scheduler_config.json"
    cfg = json.loads(f.read_text())
    assert cfg["num_windows"] == 2 and cfg["window_boundaries"] == [1.0, 0.5, 0.0]
    f.write_text(json.dumps({**cfg, "num_windows": 4}))  # as students exported before the fix
    old = ProReflowScheduler.from_pretrained(tmp_path / "student", subfolder="scheduler")
    assert old.windows.num_windows == 2 and old.config.num_windows == 2


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_bfloat16_weights_dtype_rounds_only_the_frozen_weights(tmp_path, teacher_dir, image_folder, lora_rank):
    """Regression: `weights_dtype: bfloat16` (meant for the frozen teacher / LoRA base) loaded the whole pipeline
    in bf16, so the *trained* parameters were bf16 too, where AdamW's small updates round away, and a full
    fine-tune started from rounded weights. Now the pipeline loads in float32 and only the frozen weights are
    cast: the trained ones are float32 and a full fine-tune starts from the exact teacher weights."""
    cfg = _cfg(teacher_dir, lora_rank=lora_rank, weights_dtype="bfloat16", budget_steps=4)
    exact = {k: v.clone() for k, v in load_pipeline(cfg.model).unet.state_dict().items()}
    teacher, student = build_teacher_student(load_pipeline(cfg.model), cfg)
    trained = {n.removeprefix("unet."): p for n, p in student.named_parameters() if p.requires_grad}
    assert trained and {p.dtype for p in trained.values()} == {torch.float32}
    assert {p.dtype for p in teacher.parameters() if not p.requires_grad} == {torch.bfloat16}
    if not lora_rank:  # the student starts from the float32 weights, not their bf16 rounding
        assert all(torch.equal(trained[k], exact[k]) for k in exact)
    pipe = load_pipeline(cfg.model)
    data = encode_folder(pipe, image_folder, cfg.resolution)
    snapshots = []

    def spy(stage, done, ema_fn, result):  # the live student's trainable weights after each step
        snapshots.append({n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad})

    summary = distill(cfg, pipe, data, tmp_path / "student", on_step=spy)
    assert summary["optimizer_steps"] == 4 and np.isfinite(summary["final_loss"]) and len(snapshots) == 4
    first, last = snapshots[0], snapshots[-1]
    assert {w.dtype for w in last.values()} == {torch.float32}
    assert any(not torch.equal(first[n], last[n]) for n in first)  # the updates did not round away


def test_a_pair_cache_gives_the_same_student_and_a_lambda_sweep_solves_its_pairs_once(tmp_path, teacher_dir,
                                                                                     image_folder):
    """`distill(pair_cache=...)`: the first run solves and remembers its pairs; the same run again, or the same
    preset at another lambda (the same pair draws), loads every one; each student is bitwise the one trained
    without the cache."""
    cfg = _cfg(teacher_dir, budget_steps=6)
    students = {}
    for name, lam, cache in [("plain", 1.0, None), ("first", 1.0, tmp_path / "pairs"), ("lam0", 0.0, tmp_path / "pairs"),
                             ("lam0-plain", 0.0, None)]:
        run = replace_method_lam(cfg, lam)
        pipe = load_pipeline(run.model)
        summary = distill(run, pipe, encode_folder(pipe, image_folder, run.resolution), tmp_path / name,
                          pair_cache=cache)
        students[name] = (pipe.unet.state_dict(), summary)
    # 6 steps at batch 6 over two stages (3 + 3): 36 pairs, all solved by the first run, all loaded by the second
    assert students["first"][1]["pair_cache"] == {"loaded": 0, "solved": 36}
    assert students["lam0"][1]["pair_cache"] == {"loaded": 36, "solved": 0}
    assert "pair_cache" not in students["plain"][1]
    for a, b in [("plain", "first"), ("lam0-plain", "lam0")]:
        assert all(torch.equal(students[a][0][k], students[b][0][k]) for k in students[a][0]), (a, b)
    assert students["first"][1]["teacher_nfe_per_pair"] == students["lam0"][1]["teacher_nfe_per_pair"] == \
        students["plain"][1]["teacher_nfe_per_pair"]
    assert not all(torch.equal(students["first"][0][k], students["lam0"][0][k]) for k in students["first"][0])


def replace_method_lam(cfg, lam):
    from dataclasses import replace

    return replace(cfg, method=replace(cfg.method, lam=lam))

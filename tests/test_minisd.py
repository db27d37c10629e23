"""The mini SD teacher (`proreflow mini-teacher`, docs/mini-sd.md): a folder diffusers loads alone, SD's own DDPM eps
objective, caption dropout, the Fashion-MNIST reader, resume after an interruption, and the content-hash cache.
Tiny sizes: the whole file runs in well under a minute."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from proreflow.apps.minisd import load_minisd_config, train_mini_teacher
from proreflow.apps.minisd import build
from proreflow.apps.minisd.config import UNetSettings
from proreflow.apps.minisd.train import unet_batches
from proreflow.cli import app
from proreflow.data import fashion
from proreflow.errors import ProReflowError

TINY = {
    "data": {"resolution": 16},
    "vae": {"block_out_channels": [8, 8, 8], "norm_num_groups": 4, "steps": 4, "batch_size": 8},
    "text": {"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 32},
    "unet": {"block_out_channels": [16, 16], "attention": [False, True], "norm_num_groups": 8, "attention_head_dim": 2,
             "steps": 6, "batch_size": 8, "warmup_steps": 0},
    "classifier": {"steps": 4, "batch_size": 16},
    "checkpoint_every": 2, "threads": 1,
}
HAVE_FASHION = all(f.is_file() for f in (fashion.fashion_dir() / "train-images-idx3-ubyte.gz",
                                         fashion.fashion_dir() / "t10k-labels-idx1-ubyte.gz"))
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST is not installed "
                                                            "(apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def fashion_like(tmp_path_factory) -> Path:
    """40 generated 16x16 images, each captioned with a Fashion-MNIST class phrase (so the labels are inferred and
    the classifier is trained): a --data folder that needs no download."""
    from PIL import Image

    root = tmp_path_factory.mktemp("fashion-like")
    gen = torch.Generator().manual_seed(0)
    for i in range(40):
        c = i % 4
        img = (torch.rand(16, 16, generator=gen) * 60).to(torch.uint8)
        img[2 + c * 3: 6 + c * 3, 3:13] = 230
        Image.fromarray(img.numpy(), mode="L").convert("RGB").save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(fashion.captions_for(c)[i % 3])
    return root


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    import yaml

    p = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_yaml, fashion_like) -> Path:
    out = tmp_path_factory.mktemp("mini") / "teacher"
    res = CliRunner().invoke(app, ["mini-teacher", "--out", str(out), "--config", str(tiny_yaml), "--data",
                                   str(fashion_like), "--quiet"])
    assert res.exit_code == 0, res.output
    return out


def test_the_command_writes_a_pipeline_diffusers_loads_alone(trained):
    code = textwrap.dedent(f"""
        import json, torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained({str(trained)!r})
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        img = pipe(["a photo of a dress", "a bag"], num_inference_steps=2, guidance_scale=4.0, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
        print(json.dumps({{"shape": list(img.shape), "finite": bool(torch.isfinite(img).all()),
                          "sf": pipe.vae.config.scaling_factor, "sched": dict(pipe.scheduler.config)}}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["shape"] == [2, 3, 16, 16] and got["finite"]
    sched = got["sched"]
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"], sched["num_train_timesteps"]) == \
        (0.00085, 0.012, "scaled_linear", 1000)
    assert sched["steps_offset"] == 1 and sched["set_alpha_to_one"] is False and sched["clip_sample"] is False
    summary = json.loads((trained / "mini_teacher.json").read_text())
    assert got["sf"] == pytest.approx(summary["scaling_factor"]) and summary["latent_shape"] == [4, 4, 4]
    assert json.loads((trained / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"
    assert (trained / "tokenizer" / "vocab.json").is_file() and (trained / "tokenizer" / "merges.txt").is_file()
    # `--report-to tensorboard` (the default): the VAE's and the UNet's curves, one run each (issue 28)
    assert all(any((trained / "logs" / stage).glob("events.out.tfevents.*")) for stage in ("vae", "unet"))


def test_the_classifier_is_saved_beside_the_pipeline_and_scores_by_path(trained):
    from proreflow.metrics_classifier import ClassifierMetrics

    real = torch.rand(12, 3, 16, 16) * 2 - 1
    m = ClassifierMetrics.load(trained / "classifier", real=real)
    assert m.class_names == fashion.CLASS_NAMES and m.size == 16
    assert m.fd(real) == pytest.approx(0.0, abs=1e-3)
    prompts = ["a photo of a dress", "an image of sneakers", "hello"]
    assert m.prompt_classes(prompts).tolist() == [3, 7, -1]
    assert 0.0 <= m.prompt_accuracy(real[:3], prompts) <= 1.0
    with pytest.raises(ProReflowError, match="does not exist"):
        ClassifierMetrics.load(trained / "nope")
    from proreflow.metrics_images import load_inception  # what `proreflow evaluate --inception PATH` loads

    feats = load_inception(trained / "classifier" / "features.pt")
    u8 = ((real + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(feats(u8), m.net.features(u8.float() / 127.5 - 1))


def _tiny_batches(n=16, dropout=0.1, batch=8):
    gen = torch.Generator().manual_seed(1)
    mean, std = torch.randn(n, 4, 4, 4, generator=gen), torch.rand(n, 4, 4, 4, generator=gen) * 0.1
    emb = torch.arange(3.0)[:, None, None].expand(3, 2, 5).clone()  # caption k's embedding is all k; 2 is ""
    ids = torch.randint(0, 2, (n, 1), generator=gen)
    return mean, std, emb, unet_batches(mean, std, 0.5, ids, torch.ones(n, dtype=torch.long), emb, 2, dropout, batch)


def test_training_uses_sds_ddpm_eps_objective():
    """The batch is x = DDPMScheduler.add_noise(z0, eps, t) on SD1.5's betas with t integer in 0..999 and target eps,
    and the loss the loop minimises equals MSE(unet(x, t, text), eps) computed by hand."""
    from diffusers import DDPMScheduler

    from proreflow.losses import aligned

    mean, std, emb, draw = _tiny_batches()
    b = draw(0, torch.Generator().manual_seed(5), slice(None))
    # replay the generator to get z0 and eps independently
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 16, (8,), generator=g)
    z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * 0.5
    torch.rand(8, generator=g), torch.rand(8, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    ab = ref.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(b.t, t) and b.t.dtype == torch.long and torch.equal(b.target, eps)
    torch.testing.assert_close(b.x, ab.sqrt() * z0 + (1 - ab).sqrt() * eps)
    torch.testing.assert_close(b.x, ref.add_noise(z0, eps, t))
    torch.manual_seed(0)
    unet = build.make_unet(UNetSettings(block_out_channels=[16, 16], attention=[False, True], norm_num_groups=8,
                                        attention_head_dim=2), 4, 5)
    by_hand = torch.mean((unet(ref.add_noise(z0, eps, t), t, encoder_hidden_states=b.cond).sample - eps) ** 2)
    loop = aligned(0.0)(build.EpsUNet(unet)(b.x, b.t, b.cond), b.target, None).total
    torch.testing.assert_close(loop, by_hand)
    many = torch.cat([draw(i, torch.Generator().manual_seed(i), slice(None)).t for i in range(300)])
    assert int(many.min()) >= 0 and int(many.max()) <= 999 and many.float().mean() == pytest.approx(499.5, abs=40)


def test_caption_dropout_rate():
    *_, draw = _tiny_batches(dropout=0.1, batch=4000)
    cond = draw(0, torch.Generator().manual_seed(0), slice(None)).cond
    empty = (cond[:, 0, 0] == 2).float().mean()
    assert float(empty) == pytest.approx(0.1, abs=0.015)
    *_, never = _tiny_batches(dropout=0.0, batch=500)
    assert not bool((never(0, torch.Generator().manual_seed(0), slice(None)).cond[:, 0, 0] == 2).any())


def test_resume_after_an_interruption_gives_the_same_weights_and_the_cache_reuses(tmp_path, tiny_yaml, fashion_like,
                                                                                monkeypatch):
    from safetensors.torch import load_file

    import proreflow.training.loop as loop
    from proreflow.training import TrainingInterrupted

    cfg = load_minisd_config(tiny_yaml)
    full = train_mini_teacher(cfg, tmp_path / "a", data=str(fashion_like), progress=False)
    calls = {"n": 0}

    def stop_at_unet_step_3() -> bool:
        calls["n"] += 1
        return calls["n"] == cfg.vae.steps + 3  # the VAE's steps finish, then 3 UNet steps

    monkeypatch.setattr(loop, "stop_requested", stop_at_unet_step_3)
    with pytest.raises(TrainingInterrupted):
        train_mini_teacher(cfg, tmp_path / "b", data=str(fashion_like), progress=False)
    monkeypatch.undo()
    resumed = train_mini_teacher(cfg, tmp_path / "b", data=str(fashion_like), resume=True, progress=False)
    assert resumed["trained_now"] == ["unet", "classifier"]  # the finished VAE came from the cache
    weights = lambda d: load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors"))  # noqa: E731
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = train_mini_teacher(cfg, tmp_path / "a", data=str(fashion_like), progress=False)
    assert again["trained_now"] == [] and again["cache_keys"] == full["cache_keys"]
    assert again["train_seconds"] == full["train_seconds"]  # what training cost, kept with the cached stages
    changed = train_mini_teacher(load_minisd_config(tiny_yaml, unet={**TINY["unet"], "lr": 1e-3}), tmp_path / "a",
                                 data=str(fashion_like), progress=False)
    assert changed["trained_now"] == ["unet"] and changed["cache_keys"]["vae"] == full["cache_keys"]["vae"]


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PROREFLOW_FASHION_MNIST", str(tmp_path))
    with pytest.raises(ProReflowError, match="apt-get install dataset-fashion-mnist"):
        fashion.load_fashion("train")
    res = CliRunner().invoke(app, ["mini-teacher", "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2 and res.output.startswith("error:") and "dataset-fashion-mnist" in res.output


def test_captions_name_their_class():
    for c in range(fashion.NUM_CLASSES):
        for text in fashion.captions_for(c):
            assert fashion.class_of_caption(text) == c, text
    assert fashion.class_of_caption("a shirt and a bag") is None and fashion.class_of_caption("a cat") is None


@needs_fashion
def test_fashion_reader_and_the_image_folder_distill_reads(tmp_path):
    from proreflow.data.captions import find_pairs

    test = fashion.load_fashion("test", limit=50)
    assert test.images.shape == (50, 3, 32, 32) and test.images.dtype == torch.uint8
    assert int(test.images[:, :, :2].max()) == 0 and set(test.labels.tolist()) <= set(range(10))
    res = CliRunner().invoke(app, ["mini-teacher", "--write-data", str(tmp_path / "f"), "--limit", "20"])
    assert res.exit_code == 0, res.output
    pairs = find_pairs(tmp_path / "f")
    labels = fashion.load_fashion("train", limit=20).labels.tolist()
    assert len(pairs) == 20 and [fashion.class_of_caption(c) for _, c in pairs] == labels

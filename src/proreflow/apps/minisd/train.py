"""`proreflow mini-teacher`: train an SD1.5-shaped latent text-to-image teacher on CPU and write it as a diffusers
StableDiffusionPipeline folder, with the classifier that scores it (FD, prompt accuracy) under classifier/.

Stages, each cached under <out>/cache by a hash of everything it depends on (settings, data fingerprint, the
stages before it), trained by the project's loop (`training.fit`: accelerate, EMA, checksummed checkpoints,
SIGTERM saves one, --resume latest continues):
1. AutoencoderKL: pixel MSE + kl_weight * KL; `scaling_factor` = 1 / std of the training latents (measured);
2. the frozen random CLIPTextModel encodes every caption once;
3. UNet2DConditionModel: SD's own objective, as diffusers' examples/text_to_image/train_text_to_image.py:
   t uniform in 0..999, x_t = DDPMScheduler.add_noise(z0, eps, t) on SD1.5's betas, MSE(unet(x_t, t, text), eps),
   captions replaced by "" at `caption_dropout` (classifier-free guidance);
4. the classifier (when the data has class labels).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from proreflow.apps.minisd import build
from proreflow.apps.minisd.config import SD15_SCHEDULER, MiniSDConfig
from proreflow.apps.minisd.data import TeacherData, load_teacher_data
from proreflow.losses import LossTerms, mse
from proreflow.store import atomic_write_text, check_output_dir, json_key
from proreflow.training import Monitor, MonitorConfig, TrainBatch, TrainConfig, check_stop, fit, watching
from proreflow.training.checkpoint import CheckpointConfig, FitCheckpoints, load_tensors

#: bump when a stage's code changes what it trains (part of every cache key)
VERSION = 1


def _log(progress: bool) -> Callable[[str], None]:
    start = time.perf_counter()
    return lambda m: print(f"[mini-sd {time.perf_counter() - start:6.0f}s] {m}", file=sys.stderr, flush=True) \
        if progress else None


def vae_loss(kl_weight: float):
    """LossFn of the VAE stage: pixel MSE + kl_weight * mean over samples of KL summed over latents."""

    def loss(pred: tuple[Tensor, Tensor], target: Tensor, weight: Tensor | None = None) -> LossTerms:
        recon, kl = pred
        m = mse(recon, target)
        return LossTerms(total=m + kl_weight * kl.float().mean(), mse=m, direction=torch.zeros(()))

    return loss


def vae_batches(data: TeacherData, batch_size: int):
    n = data.images.shape[0]

    def draw(micro: int, gen: torch.Generator, rows: slice) -> TrainBatch:
        x = data.pixels(torch.randint(0, n, (batch_size,), generator=gen))[rows]
        return TrainBatch(x=x, t=torch.zeros(x.shape[0]), target=x)

    return draw


@torch.no_grad()
def encode_latents(vae, data: TeacherData, batch: int = 500) -> tuple[Tensor, Tensor]:
    """Posterior mean and std of every training image (unscaled)."""
    means, stds = [], []
    for i in range(0, data.images.shape[0], batch):
        dist = vae.encode(data.pixels(torch.arange(i, min(i + batch, data.images.shape[0])))).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def measure_scaling_factor(mean: Tensor, std: Tensor, seed: int) -> float:
    """1 / std of sampled training latents (SD1.5's 0.18215 was measured the same way on its VAE)."""
    gen = torch.Generator().manual_seed(seed)
    z = mean + std * torch.randn(mean.shape, generator=gen)
    return float(1.0 / z.double().std())


def unet_batches(latent_mean: Tensor, latent_std: Tensor, scaling_factor: float, caption_ids: Tensor,
                 caption_counts: Tensor, embeddings: Tensor, empty: int, dropout: float, batch_size: int):
    """Training batches of SD's objective: z0 = scaling_factor * (a posterior sample), eps ~ N(0, I), t uniform in
    0..999, x = DDPMScheduler.add_noise(z0, eps, t), target eps; each image's caption is drawn among its own and
    replaced by the empty caption (index `empty`) with probability `dropout`. Every draw comes from `gen`."""
    sched = build.noise_scheduler()
    n, steps = latent_mean.shape[0], sched.config.num_train_timesteps

    def draw(micro: int, gen: torch.Generator, rows: slice) -> TrainBatch:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        z0 = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * scaling_factor
        col = (torch.rand(batch_size, generator=gen) * caption_counts[idx]).long()
        cap = caption_ids[idx, col]
        cap = torch.where(torch.rand(batch_size, generator=gen) < dropout, torch.full_like(cap, empty), cap)
        t = torch.randint(0, steps, (batch_size,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        x = sched.add_noise(z0, eps, t)
        return TrainBatch(x=x[rows], t=t[rows], target=eps[rows], cond=embeddings[cap[rows]])

    return draw


def _fits(cache: Path, name: str, key: str, every: int, resume: bool) -> FitCheckpoints:
    """A stage's checkpoints; a finished stage (final weights on disk) is always reused, an unfinished one is
    continued only with --resume latest (else it starts over)."""
    root = cache / f"{name}-{key}"
    fits = CheckpointConfig(root, every=every, keep=1).for_fit("fit")
    return CheckpointConfig(root, every=every, keep=1, resume=resume or fits.final_path.is_file()).for_fit("fit")


def _train_config(cfg: MiniSDConfig, lr: float, batch: int, ema: float, warmup: int, progress: bool) -> TrainConfig:
    return TrainConfig(lr=lr, batch_size=batch, ema_decay=ema, warmup_steps=warmup, grad_clip=1.0,
                       mixed_precision=cfg.mixed_precision, seed=cfg.seed, progress=progress)


def _stage(log, seconds: dict, name: str, fits: FitCheckpoints, run: Callable):
    """Run (or load) one stage; `seconds[name]` is its training time, measured now or when it was cached."""
    cached = fits.final_path.is_file()
    log(f"{name}: " + ("from the cache" if cached else f"training ({fits.root})"))
    started = time.perf_counter()
    out = run()
    _record_seconds(seconds, name, fits.root / "seconds.json", None if cached else time.perf_counter() - started)
    return out


def _record_seconds(seconds: dict, name: str, path: Path, measured: float | None) -> None:
    """A stage's training time, kept beside its cached weights so a cache hit still reports what training cost
    (a resumed stage counts only the time of the run that finished it)."""
    if measured is not None:
        seconds[name] = round(measured, 1)
        seconds.setdefault("trained_now", []).append(name)
        atomic_write_text(path, json.dumps({"seconds": seconds[name], "threads": torch.get_num_threads()}))
    elif path.is_file():
        seconds[name] = json.loads(path.read_text())["seconds"]


def train_mini_teacher(cfg: MiniSDConfig, out: Path, data: str | None = None, resume: bool = False,
                       progress: bool = True, cache: Path | None = None, monitor: MonitorConfig | None = None) -> dict:
    """Train (or load from <out>/cache) every stage and write the pipeline + classifier/ + mini_teacher.json.
    `monitor`: the VAE's and the UNet's curves under `out/logs/vae` and `out/logs/unet` (stages trained now)."""
    out = Path(out)
    check_output_dir(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cache = Path(cache) if cache is not None else out / "cache"
    log = _log(progress)
    started = time.perf_counter()
    d = load_teacher_data(data, cfg.data.resolution, cfg.data.limit, progress)
    log(f"data: {d.images.shape[0]} training images from {d.source}, {len(d.captions)} distinct captions")
    seconds: dict = {}
    res = cfg.data.resolution

    # 1. VAE
    vae_key = json_key(VERSION, "vae", asdict(cfg.vae), res, d.fingerprint, cfg.seed, cfg.mixed_precision)
    fits = _fits(cache, "vae", vae_key, cfg.checkpoint_every, resume)
    torch.manual_seed(cfg.seed)
    vae_init = build.VAEObjective(build.make_vae(cfg.vae, res))
    v = cfg.vae
    with watching(Monitor(monitor, out, "vae") if monitor else None) as watch:
        vae = _stage(log, seconds, "vae", fits, lambda: fit(
            vae_init, vae_batches(d, v.batch_size), v.steps, _train_config(cfg, v.lr, v.batch_size, 0.995, 0, progress),
            loss=vae_loss(v.kl_weight), desc="vae", checkpoints=fits, monitor=watch
        )).model.vae.float().eval().requires_grad_(False)
    check_stop("after the VAE")
    mean, std = encode_latents(vae, d)
    scaling = measure_scaling_factor(mean, std, cfg.seed)
    vae.register_to_config(scaling_factor=scaling)
    recon_mse = _recon_mse(vae, d)
    log(f"vae: scaling_factor {scaling:.4f} (latent std {1 / scaling:.3f}), reconstruction MSE {recon_mse:.5f}")

    # 2. text encoder and caption embeddings
    words = build.corpus_words(_frequent_words(d.captions))
    tok_dir = cache / f"tokenizer-{json_key(words)}"
    tokenizer = build.make_tokenizer(tok_dir, words, cfg.text.max_length)
    text_encoder = build.make_text_encoder(cfg.text, tokenizer)
    captions = d.captions + [""]
    embeddings = build.encode_text(tokenizer, text_encoder, captions)

    # 3. UNet
    u = cfg.unet
    # the VAE's key stands for its weights and so for `scaling` (measured from them: it moves by an ulp with the
    # thread count, which must not retrain the UNet)
    unet_key = json_key(VERSION, "unet", asdict(u), asdict(cfg.text), words, vae_key, d.fingerprint,
                        cfg.seed, cfg.mixed_precision, SD15_SCHEDULER)
    fits = _fits(cache, "unet", unet_key, cfg.checkpoint_every, resume)
    torch.manual_seed(cfg.seed + 1)
    unet_init = build.EpsUNet(build.make_unet(u, cfg.latent_size, cfg.text.hidden_size))
    batches = unet_batches(mean, std, scaling, d.caption_ids, d.caption_counts, embeddings, len(captions) - 1,
                           u.caption_dropout, u.batch_size)
    with watching(Monitor(monitor, out, "unet") if monitor else None) as watch:
        unet = _stage(log, seconds, "unet", fits, lambda: fit(
            unet_init, batches, u.steps, _train_config(cfg, u.lr, u.batch_size, u.ema_decay, u.warmup_steps, progress),
            desc="unet", seed_offset=1, checkpoints=fits, monitor=watch)).model.unet.float().eval()
    check_stop("after the UNet")

    # 4. classifier (the metrics' feature network), when the data has labels
    classifier = _classifier(cfg, d, cache, log, seconds, progress)
    build.save_pipeline(out, vae, text_encoder, tokenizer, unet, tok_dir)
    summary = {"source": d.source, "n_train": int(d.images.shape[0]), "resolution": res,
               "scaling_factor": scaling, "vae_reconstruction_mse": recon_mse,
               **build.describe(cfg, vae, text_encoder, unet), "trained_now": seconds.pop("trained_now", []),
               "train_seconds": seconds, "train_seconds_total": round(sum(seconds.values()), 1),
               "wall_seconds": round(time.perf_counter() - started, 1), "torch_threads": torch.get_num_threads(),
               "config": json.loads(json.dumps(asdict(cfg))), "cache_keys": {"vae": vae_key, "unet": unet_key}}
    if classifier is not None:
        from proreflow.metrics_classifier import save_classifier

        net, acc = classifier
        save_classifier(net, out / "classifier", d.class_names, res, heldout_accuracy=acc)
        summary["classifier_heldout_accuracy"] = acc
    atomic_write_text(out / "mini_teacher.json", json.dumps(summary, indent=1) + "\n")
    log(f"wrote {out} (StableDiffusionPipeline.from_pretrained loads it)")
    return summary


@torch.no_grad()
def _recon_mse(vae, d: TeacherData, n: int = 500) -> float:
    x = d.test_images[:n].float() / 127.5 - 1 if d.test_images is not None else d.pixels(torch.arange(min(n, len(d.images))))
    return float(((vae.decode(vae.encode(x).latent_dist.mean).sample - x) ** 2).mean())


def _frequent_words(captions: list[str], top: int = 2000) -> list[str]:
    """The most frequent words of the captions (each becomes one token)."""
    from collections import Counter

    counts = Counter(w for c in captions for w in build._WORDS.findall(c.lower()))
    return [" ".join(w for w, _ in counts.most_common(top))]


def _classifier(cfg: MiniSDConfig, d: TeacherData, cache: Path, log, seconds: dict, progress: bool):
    from proreflow.models.classifier import DigitsClassifier, accuracy, train_classifier
    from proreflow.store import atomic_save_tensors

    if d.labels is None or d.test_images is None:
        log("classifier: skipped (the captions do not each name one class, so there are no labels)")
        return None
    c = cfg.classifier
    path = cache / f"classifier-{json_key(VERSION, asdict(c), d.fingerprint, cfg.seed)}.safetensors"
    test_x = d.test_images.float() / 127.5 - 1
    if path.is_file():
        log("classifier: from the cache")
        _record_seconds(seconds, "classifier", path.with_suffix(".json"), None)
        net = DigitsClassifier(num_classes=len(d.class_names), channels=3)
        net.load_state_dict(load_tensors(path))
    else:
        log(f"classifier: training ({c.steps} steps)")
        started = time.perf_counter()
        x = d.images.float() / 127.5 - 1
        net = train_classifier(x, d.labels, steps=c.steps, batch_size=c.batch_size, lr=c.lr, seed=cfg.seed,
                               num_classes=len(d.class_names), progress=progress)
        del x
        _record_seconds(seconds, "classifier", path.with_suffix(".json"), time.perf_counter() - started)
        atomic_save_tensors(net.state_dict(), path)
    acc = accuracy(net.eval(), test_x, d.test_labels)
    log(f"classifier: held-out accuracy {acc:.3f}")
    return net.eval(), acc


"""The evaluation harness offline: tiny random-weight SD pipeline, a tiny TorchScript 'Inception' found by
file name in a cache dir, and a tiny CLIP saved to disk and loaded by path through `load_clip` (the code
path that loads openai/clip-vit-large-patch14). The numbers are computed by the real code."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd import tiny_pipeline, tiny_tokenizer
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
from typer.testing import CliRunner

from proreflow import metrics_images as mi
from proreflow.apps.coco_eval import (
    SCHEDULERS,
    EvalConfig,
    RunSpec,
    evaluate,
    generate_images,
    image_name,
    load_eval_pipeline,
    load_suite,
    pipeline_generate_fn,
    run_scheduler,
)
from proreflow.apps.sd.export import export_pipeline
from proreflow.cli import app
from proreflow.data.coco import load_caption_set, load_coco_captions
from proreflow.errors import ProReflowError
from proreflow.windows import WindowSchedule

runner = CliRunner()
RES = 16
PROMPTS = ["a red cat", "a blue dog", "a photo of a cat", "the dog", "a cat", "a red dog"]


class TinyFeatures(torch.nn.Module):
    """Stands in for Inception: same call signature as the TorchScript file (images, return_features)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = torch.nn.Conv2d(8, 12, 3)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        h = torch.relu(self.conv1(x.float() / 127.5 - 1.0))
        h = torch.relu(self.conv2(h))
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    inc_dir = root / "cache"
    inc_dir.mkdir()
    torch.jit.save(torch.jit.script(TinyFeatures().eval()), str(inc_dir / mi.INCEPTION_FILE))
    tok = tiny_tokenizer(root / "cliptok")
    torch.manual_seed(0)  # with this seed the test images' mean cosine is positive (not floored at 0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                      num_hidden_layers=1, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                        image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(cfg).save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(root / "clip")
    tiny_pipeline(root / "parts").save_pretrained(root / "teacher")
    pipe = tiny_pipeline(root / "parts2")
    export_pipeline(pipe, pipe.unet, WindowSchedule.uniform(2), root / "student")
    ref = root / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(ref / f"r{i}.png")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _inception(assets):
    return mi.load_inception(search_dirs=[assets / "cache"], allow_torch_fidelity=False)


def _rand_images(seed, n=10, lo=0, hi=255):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n, 3, RES, RES), generator=g, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------ captions


def _annotations(path: Path, n_images=10, shuffle_seed=None):
    anns = [{"image_id": 100 + i, "id": 1000 + 10 * i + j, "caption": f"image {i} caption {j}"}
            for i in range(n_images) for j in range(3 + i % 3)]
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(anns)
    path.write_text(json.dumps({"images": [{"id": 100 + i} for i in range(n_images)], "annotations": anns}))
    return path


def test_coco_subset_is_seeded_one_caption_per_image_and_order_free(tmp_path):
    a = load_coco_captions(_annotations(tmp_path / "a.json"), 4, seed=0)
    b = load_coco_captions(_annotations(tmp_path / "b.json", shuffle_seed=3), 4, seed=0)
    c = load_coco_captions(_annotations(tmp_path / "c.json"), 4, seed=1)
    assert a == b  # annotation order in the file does not matter
    assert a.image_ids != c.image_ids or a.captions != c.captions
    assert len(set(a.image_ids)) == 4 and a.image_ids == sorted(a.image_ids)
    for image_id, cap in zip(a.image_ids, a.captions):
        assert cap.startswith(f"image {image_id - 100} caption ")
    full = load_caption_set("coco2017-5k", tmp_path / "a.json", num_images=10)
    assert full.image_ids == list(range(100, 110))
    with pytest.raises(ProReflowError, match="number of images must be >= 1, got 0"):  # 0 was read as "all"
        load_caption_set("coco2017-5k", tmp_path / "a.json", num_images=0)
    (tmp_path / "p.txt").write_text("x\n\ny\n")
    p = load_caption_set("prompts", prompts=tmp_path / "p.txt")
    assert p.captions == ["x", "y"] and p.image_ids == [None, None]


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    ("{not json", "is not valid JSON"),
    (json.dumps({"images": []}), "has no 'annotations' list"),
    (json.dumps({"annotations": [{"image_id": 1}]}), "lacks an integer 'image_id' or a string 'caption'"),
    (json.dumps({"annotations": [{"image_id": 1, "caption": "x"}]}), "fewer than the 2 asked for"),
])
def test_coco_bad_annotations(tmp_path, content, needle):
    p = tmp_path / "captions_val2017.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ProReflowError, match=needle):
        load_caption_set("coco2017-5k", p, num_images=2)


# ------------------------------------------------------------------------------------------- metrics


def test_fid_self_zero_other_positive_and_stats_roundtrip(assets, tmp_path):
    net = _inception(assets)
    assert isinstance(net, mi.TorchScriptInception) and net.num_features == 24
    a, b = _rand_images(0, 40), _rand_images(1, 40, lo=60, hi=200)
    sa = mi.image_stats(net, [a[:15], a[15:]])
    sa2 = mi.image_stats(net, [a])
    sb = mi.image_stats(net, [b])
    assert np.allclose(sa.mu, sa2.mu) and np.allclose(sa.sigma, sa2.sigma)  # batching does not matter
    assert abs(mi.frechet_distance(sa, sa2)) < 1e-6
    d_ab = mi.frechet_distance(sa, sb)
    assert d_ab > 1e-3
    # torchmetrics fed with the same images directly gives the same number
    from torchmetrics.image.fid import FrechetInceptionDistance

    direct = FrechetInceptionDistance(feature=net)
    direct.update(a, real=True)
    direct.update(b, real=False)
    assert abs(float(direct.compute()) - d_ab) < 1e-4 * max(1.0, d_ab)
    for suffix in (".npz", ".safetensors"):
        p = sa.save(tmp_path / f"ref{suffix}")
        back = mi.FIDStats.load(p)
        assert back.n == 40 and abs(mi.frechet_distance(back, sb) - d_ab) < 1e-9 * max(1.0, d_ab)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(ProReflowError, match="need arrays 'mu' and 'sigma'"):
        mi.FIDStats.load(tmp_path / "bad.npz")


def test_missing_or_wrong_inception_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(mi.INCEPTION_ENV, raising=False)
    with pytest.raises(ProReflowError, match="Inception weights for FID are missing.*--inception PATH"):
        mi.load_inception(search_dirs=[tmp_path], allow_torch_fidelity=False)
    with pytest.raises(ProReflowError, match="do not exist; download"):
        mi.load_inception(tmp_path / "nope.pt")
    monkeypatch.setenv(mi.INCEPTION_ENV, str(tmp_path / "env.pt"))
    with pytest.raises(ProReflowError, match="env.pt' do not exist"):
        mi.load_inception(search_dirs=[tmp_path], allow_torch_fidelity=False)
    (tmp_path / "junk.pt").write_bytes(b"not a torchscript file")
    with pytest.raises(ProReflowError, match="cannot load the TorchScript Inception"):
        mi.load_inception(tmp_path / "junk.pt")


def test_clip_score_matches_direct_computation(assets):
    model, processor = mi.load_clip(str(assets / "clip"))
    images, caps = _rand_images(5, 4), ["a red cat", "a blue dog", "the dog", "a photo of a cat"]
    score = mi.clip_score(mi.clip_metric(model, processor), [(images[:3], caps[:3]), (images[3:], caps[3:])])
    with torch.no_grad():
        x = processor(text=caps, images=list(images), return_tensors="pt", padding=True)
        out = model(**x)  # CLIPModel.forward returns L2-normalised embeddings
    cos = (out.image_embeds * out.text_embeds).sum(-1)
    expected = max(100 * float(cos.mean()), 0.0)
    assert abs(score - expected) < 1e-4, (score, expected)
    assert score > 1.0  # not floored at 0: the comparison checks the value itself
    with pytest.raises(ProReflowError, match="CLIP model .* is not available.*--clip-model PATH"):
        mi.load_clip(str(assets / "no-clip"))


def test_reference_folder_sizes_are_checked(tmp_path):
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (RES, RES)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (24, RES)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(ProReflowError, match="mixed sizes: 24x16"):
        mi.check_sizes(mi.image_files(tmp_path / "mixed"), RES)
    with pytest.raises(ProReflowError, match="the wrong size: 16x16.*--ref-resize"):
        mi.check_sizes(mi.image_files(tmp_path / "mixed")[:1], 32)
    x = mi.read_image_uint8(tmp_path / "mixed" / "b.png", resize_to=8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8
    rng = np.random.default_rng(3)  # the reference is cropped and resized as training images are
    Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    from proreflow.data.captions import prepare_image

    same = ((prepare_image(tmp_path / "c.png", 8).pixels + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(mi.read_image_uint8(tmp_path / "c.png", resize_to=8), same)


# ---------------------------------------------------------------------------------------- generation


def test_schedulers_by_name(assets):
    pipe = load_eval_pipeline(RunSpec("t", str(assets / "teacher"), steps=2, scheduler="dpmsolver++"))
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # built from the pipeline's own config
    for name, cls in [("ddim", "DDIMScheduler"), ("unipc", "UniPCMultistepScheduler"),
                      ("euler", "EulerDiscreteScheduler"), ("proreflow", "ProReflowScheduler")]:
        assert type(run_scheduler(name, pipe.scheduler, 2)).__name__ == cls
    with pytest.raises(ProReflowError, match="unknown scheduler 'heun'"):
        RunSpec("t", "m", scheduler="heun")


def _sd_scheduler_configs():
    """The schedulers SD1.5 and SDXL ship (as their hub scheduler_config.json files set them up)."""
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    sd15 = PNDMScheduler.from_config({**betas, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                                      "clip_sample": False, "trained_betas": None})
    sdxl = EulerDiscreteScheduler.from_config({**betas, "steps_offset": 1, "timestep_spacing": "leading",
                                               "interpolation_type": "linear"})  # no clip_sample key
    return {"sd15": sd15, "sdxl": sdxl}


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", ["ddim", "euler", "dpmsolver", "dpmsolver++", "unipc", "lcm", "proreflow"])
def test_every_named_scheduler_builds_from_sd_configs_and_starts_at_pure_noise(base, name):
    """Regressions: 'dpmsolver' raised a ValueError (diffusers refuses final_sigmas_type 'zero' for it), DDIM
    from SDXL's Euler config clipped latents (clip_sample defaulted to True), and the SD configs' 'leading'
    spacing started 4-step baselines at timestep 751 (SD1.5 DDIM; all solvers on SDXL) instead of 999."""
    current = _sd_scheduler_configs()[base]
    sched = run_scheduler(name, current, 4)
    sched.set_timesteps(4)
    assert len(sched.timesteps) == 4 and float(sched.timesteps[0]) == pytest.approx(999, abs=0.5)
    # the scale of the first latent (the pipeline multiplies its noise by it), from SD1.5's betas written out: 1 for
    # the schedulers that step x_t itself; for Euler's x_t / alpha_t, sigma_max = sqrt(1 / alpha_bar_999 - 1) =
    # 14.6146 (diffusers' choice under trailing spacing, not sqrt(sigma_max^2 + 1)). A 1.066x noise scale at the
    # first step passed every test before issue 27.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar_999 = float(torch.cumprod(1 - betas, 0)[-1])
    want = (1 / alpha_bar_999 - 1) ** 0.5 if name == "euler" else 1.0
    assert float(sched.init_noise_sigma) == pytest.approx(want, rel=1e-4)
    if name == "ddim":
        assert sched.config.clip_sample is False
    if name == "ddim":  # the pipeline's own spacing on request
        own = run_scheduler(name, current, 4, timestep_spacing=None)
        own.set_timesteps(4)
        assert own.timesteps.tolist() == [751, 501, 251, 1]
    with pytest.raises(ProReflowError, match="timestep_spacing must be"):
        RunSpec("t", "m", scheduler=name, timestep_spacing="Trailing")


def test_scheduler_that_cannot_be_built_is_a_named_error():
    from types import SimpleNamespace

    odd = SimpleNamespace(config={"beta_schedule": "cosine-ish", "num_train_timesteps": 1000})
    with pytest.raises(ProReflowError, match="cannot build the 'dpmsolver' scheduler .* cosine-ish"):
        run_scheduler("dpmsolver", odd, 4)


def test_a_run_at_its_own_resolution_is_resized_to_the_suites(assets):
    """SDXL-Turbo-style rows generate at their size and are scored at the suite's, resized with the protocol's
    filter; a size the VAE cannot make is refused."""
    from proreflow.data.captions import centre_crop_resize

    small = RunSpec("teacher", str(assets / "teacher"), steps=2, guidance=3.0, scheduler="ddim", resolution=8)
    pipe = load_eval_pipeline(small)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    native = pipeline_generate_fn(pipe, small, 8)(PROMPTS[:2], gens())
    scored = pipeline_generate_fn(pipe, small, RES, "lanczos")(PROMPTS[:2], gens())
    assert native.shape == (2, 8, 8, 3) and scored.shape == (2, RES, RES, 3)
    by_hand = centre_crop_resize(Image.fromarray(np.round(native[0] * 255).astype(np.uint8)), RES, "lanczos")[0]
    assert np.allclose(scored[0], np.asarray(by_hand) / 255.0, atol=1e-6)
    with pytest.raises(ProReflowError, match="multiple of 8"):
        RunSpec("x", "m", resolution=500)


def test_a_lora_file_in_a_subfolder_of_a_lora_repository_is_loaded_and_fused(assets, tmp_path):
    """PCM's LoRAs are files in subfolders of one repository (`lora` + `lora_weight`); a missing one is a named
    error."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = RunSpec("teacher", str(assets / "teacher"), steps=2, guidance=3.0, scheduler="ddim")
    pipe = load_eval_pipeline(base)
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "repo" / "sd15", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              weight_name="mine_4step.safetensors")
    with_lora = replace(base, lora=str(tmp_path / "repo"), lora_weight="sd15/mine_4step.safetensors")
    gens = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731
    plain = pipeline_generate_fn(load_eval_pipeline(base), base, RES)(PROMPTS[:1], gens())
    fused = pipeline_generate_fn(load_eval_pipeline(with_lora), with_lora, RES)(PROMPTS[:1], gens())
    assert np.abs(plain - fused).max() > 1e-3
    with pytest.raises(ProReflowError, match="cannot load the LoRA .*other.safetensors"):
        load_eval_pipeline(replace(with_lora, lora_weight="sd15/other.safetensors"))
    with pytest.raises(ProReflowError, match="lora_weight names a file"):
        RunSpec("x", "m", lora_weight="a.safetensors")


def test_tcd_for_pcm_built_from_sdxls_config_is_the_scheduler_pcms_demo_builds():
    from diffusers import EulerDiscreteScheduler, TCDScheduler

    sdxl = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    ours = run_scheduler("tcd", sdxl, 4, overrides={"set_alpha_to_one": True, "steps_offset": 0})
    demo = TCDScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        timestep_spacing="trailing")
    for s in (ours, demo):
        s.set_timesteps(4)
    assert ours.timesteps.tolist() == demo.timesteps.tolist()
    x, eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 4, 8, 8)
    for t in demo.timesteps:
        a = ours.step(eps, t, x, eta=0.0, generator=torch.Generator().manual_seed(1)).prev_sample
        b = demo.step(eps, t, x, eta=0.0, generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.equal(a, b)
        x = a


SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True)  # SD1.5's PNDM scheduler config


def test_table_2s_pcm_and_flash_rows_step_like_their_authors_samplers():
    """Table 2's PCM row (TCD over SD1.5's config with the row's overrides) takes the steps of the scheduler PCM's
    demo builds for SD1.5; its Flash Diffusion row (LCM) the steps of the one flash-sd's model card builds."""
    from diffusers import LCMScheduler, PNDMScheduler, TCDScheduler

    from proreflow.apps.coco_eval.config import load_suite

    rows = {r.name: r for r in load_suite("eval-table2", {"fid": False})[0]}
    sd15 = PNDMScheduler(**SD15_SCHEDULER)
    pcm, flash = rows["PCM"], rows["Flash Diffusion"]
    assert (pcm.lora_weight, pcm.guidance, flash.lora, flash.guidance) == (
        "sd15/pcm_sd15_smallcfg_4step_converted.safetensors", 0.0, "jasperai/flash-sd", 0.0)
    pairs = [(run_scheduler("tcd", sd15, 4, overrides=pcm.scheduler_overrides),
              TCDScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           timestep_spacing="trailing")),
             (run_scheduler("lcm", sd15, 4, overrides=flash.scheduler_overrides),
              LCMScheduler.from_config(sd15.config, timestep_spacing="trailing"))]
    for ours, theirs in pairs:
        for s in (ours, theirs):
            s.set_timesteps(4)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist()
        assert float(ours.final_alpha_cumprod) == float(theirs.final_alpha_cumprod)


def test_generation_resumes_and_regenerates_half_written_images(assets, tmp_path):
    spec = RunSpec("teacher", str(assets / "teacher"), steps=2, guidance=3.0, scheduler="ddim")
    call = pipeline_generate_fn(load_eval_pipeline(spec), spec, RES)
    seen: list[int] = []

    def counting(prompts, gens):
        seen.append(len(prompts))
        return call(prompts, gens)

    folder = tmp_path / "imgs"
    assert generate_images(counting, PROMPTS, folder, RES, seed=0, batch_size=4, progress=False) == 6
    assert seen == [4, 2]
    first = {i: np.asarray(Image.open(folder / image_name(i))) for i in range(6)}
    mtimes = {i: (folder / image_name(i)).stat().st_mtime_ns for i in range(6)}
    seen.clear()
    assert generate_images(counting, PROMPTS, folder, RES, seed=0, batch_size=4, progress=False) == 0
    assert seen == []
    data = (folder / image_name(4)).read_bytes()
    (folder / image_name(4)).write_bytes(data[: len(data) // 2])  # half-written
    (folder / image_name(1)).unlink()
    (folder / ".000002.png.tmp").write_bytes(b"junk")  # a crash left a temp file
    assert generate_images(counting, PROMPTS, folder, RES, seed=0, batch_size=4, progress=False) == 2
    assert seen == [2]
    for i in range(6):  # each image depends on (seed, index) only: regenerated ones are identical
        assert np.array_equal(np.asarray(Image.open(folder / image_name(i))), first[i])
    assert all((folder / image_name(i)).stat().st_mtime_ns == mtimes[i] for i in (0, 2, 3, 5))
    assert not list(folder.glob(".*.tmp"))


def test_timing_is_the_median_per_image_after_warm_up(monkeypatch):
    """The clock is the test's: each call 'takes' a programmed time, so the expected number is exact."""
    import proreflow.apps.coco_eval.generate as ev

    clock = [0.0]
    durations = iter([9.0, 7.0, 0.4, 3.0, 0.2])  # two warm-up calls (slow), then three timed ones
    calls: list[int] = []

    def generate(prompts, gens):
        calls.append(len(prompts))
        assert len(gens) == len(prompts)
        clock[0] += next(durations)
        return np.zeros((len(prompts), RES, RES, 3))

    monkeypatch.setattr(ev.time, "perf_counter", lambda: clock[0])
    t = ev.time_per_image(generate, PROMPTS[:1], batch_size=2, warmup=2, batches=3, device=torch.device("cpu"))
    assert calls == [2, 2, 2, 2, 2]  # batch_size prompts per call, captions reused when there are fewer
    assert t["seconds_per_image"] == pytest.approx(0.4 / 2)  # median of 0.4, 3.0, 0.2 over 2 images
    assert (t["warmup_batches"], t["timed_batches"], t["batch_size"]) == (2, 3, 2) and t["device"].startswith("CPU")
    assert ev.time_per_image(generate, PROMPTS, 2, 2, 0, torch.device("cpu")) is None


def test_pipeline_images_of_the_wrong_size_are_refused(tmp_path):
    def generate(prompts, gens):
        return np.zeros((len(prompts), RES, RES + 8, 3))

    with pytest.raises(ProReflowError, match=r"images of shape \(2, 16, 24, 3\), expected \(2, 16, 16, 3\)"):
        generate_images(generate, PROMPTS[:2], tmp_path / "imgs", RES, seed=0, batch_size=2, progress=False)
    assert not list((tmp_path / "imgs").glob("*.png"))


def test_saved_images_keep_the_pipeline_value_range(tmp_path):
    """[0, 1] floats -> uint8 PNGs: 0 -> 0, 1 -> 255, 0.5 -> 128 (rounded), out-of-range values clipped."""
    values = np.array([0.0, 1.0, 0.5, -0.2, 1.3, 0.25])

    def generate(prompts, gens):
        return np.broadcast_to(values[: len(prompts), None, None, None], (len(prompts), RES, RES, 3)).copy()

    generate_images(generate, PROMPTS, tmp_path, RES, seed=0, batch_size=6, progress=False)
    got = [int(np.asarray(Image.open(tmp_path / image_name(i)))[0, 0, 0]) for i in range(6)]
    assert got == [0, 255, 128, 0, 255, 64]


# ------------------------------------------------------------------------------------------ harness


def _cfg(assets, **kw):
    base = dict(captions="prompts", prompts=str(assets / "prompts.txt"), resolution=RES, batch_size=3,
                reference=str(assets / "ref"), clip_model=str(assets / "clip"),
                inception=str(assets / "cache" / mi.INCEPTION_FILE), warmup_batches=1, timing_batches=2,
                progress=False)
    base.update(kw)
    return EvalConfig(**base)


def test_evaluate_end_to_end_student_baselines_and_sweep(assets, tmp_path, monkeypatch):
    runs = [RunSpec("ProReflow (tiny)", str(assets / "student"), steps=2, guidance=3.0),
            RunSpec("teacher", str(assets / "teacher"), steps=2, guidance=[1.5, 3.0], scheduler="dpmsolver++")]
    out = tmp_path / "out"
    rows = evaluate(runs, _cfg(assets, save_ref_stats=str(tmp_path / "ref.npz"), timing_batch_size=2), out, title="tiny")
    assert [(r["method"], r["scheduler"], r["guidance"]) for r in rows] == [
        ("ProReflow (tiny)", "own", 3.0), ("teacher", "dpmsolver++", 1.5), ("teacher", "dpmsolver++", 3.0)]
    for r in rows:
        assert r["generated_now"] == 6 and r["images"] == 6
        assert np.isfinite(r["fid"]) and r["fid"] > 0 and np.isfinite(r["clip"]) and r["clip"] >= 0
        assert r["seconds_per_image"] > 0 and r["device"].startswith("CPU")
        assert r["timing"]["timed_batches"] == 2 and r["timing"]["batch_size"] == 2
        assert len(list(Path(r["folder"]).glob("*.png"))) == 6
    # FID recomputed by hand from the images on disk and the saved reference statistics
    net = _inception(assets)
    files = [Path(rows[0]["folder"]) / image_name(i) for i in range(6)]
    fake = mi.image_stats(net, [torch.stack([mi.read_image_uint8(f) for f in files])])
    assert abs(mi.frechet_distance(mi.FIDStats.load(tmp_path / "ref.npz"), fake) - rows[0]["fid"]) < 1e-6
    assert rows[1]["fid"] != rows[2]["fid"]  # the guidance scale changes the images
    summary = json.loads((out / "results.json").read_text())
    assert summary["rows"][0]["fid"] == rows[0]["fid"]
    md = (out / "results.md").read_text()
    assert "| method | scheduler | steps | guidance | time (s/img) | FID | CLIP |" in md
    assert f"| ProReflow (tiny) | own | 2 | 3 | {rows[0]['seconds_per_image']:.3f} | {rows[0]['fid']:.2f} |" in md
    assert (out / "cfg_sweep.png").stat().st_size > 1000
    # a rerun generates nothing and, with the saved statistics, gives the same numbers (without loading the model)
    import proreflow.apps.coco_eval.generate as ev

    def no_model(*a, **k):
        raise AssertionError("a finished run without timing must not load its model")

    monkeypatch.setattr(ev, "load_eval_pipeline", no_model)
    # (one row of three, rescored against other reference settings: it replaces the results, so --overwrite)
    again = evaluate(runs[:1], _cfg(assets, reference=None, ref_stats=str(tmp_path / "ref.npz"), timing_batches=0),
                     out, overwrite=True)
    assert again[0]["generated_now"] == 0 and again[0]["seconds_per_image"] is None
    assert abs(again[0]["fid"] - rows[0]["fid"]) < 1e-6 and abs(again[0]["clip"] - rows[0]["clip"]) < 1e-6
    monkeypatch.undo()
    # networks and captions handed in as objects (a plain module, not the TorchScript file) give the same numbers
    from proreflow.data.coco import CaptionSet

    injected = evaluate(runs[:1], _cfg(assets, inception=None, clip_model="unused", timing_batches=0), out,
                        inception=TinyFeatures().eval(), clip=mi.load_clip(str(assets / "clip")),
                        captions=CaptionSet("prompts", PROMPTS, [None] * len(PROMPTS)), overwrite=True)
    assert injected[0]["generated_now"] == 0
    assert abs(injected[0]["fid"] - rows[0]["fid"]) < 1e-6 and abs(injected[0]["clip"] - rows[0]["clip"]) < 1e-6
    with pytest.raises(ProReflowError, match="holds an evaluation's results made with other settings"):
        evaluate(runs[:1], _cfg(assets, seed=1, timing_batches=0), out)
    with pytest.raises(ProReflowError, match="holds images made with other settings"):  # --overwrite replaces
        evaluate(runs[:1], _cfg(assets, seed=1, timing_batches=0), out, overwrite=True)  # results, never images


def test_model_loading_is_never_timed(assets, tmp_path, monkeypatch):
    """Pipelines load lazily (finished runs need none), but before the clock starts, even without warm-up."""
    from types import SimpleNamespace

    import proreflow.apps.coco_eval.generate as ev

    clock = [0.0]
    monkeypatch.setattr(ev.time, "perf_counter", lambda: clock[0])

    def pipe(prompts, **kw):
        clock[0] += 1.0 * len(prompts)  # one 'second' per image
        return SimpleNamespace(images=np.zeros((len(prompts), RES, RES, 3)))

    def load(spec, dtype, device):
        clock[0] += 1000.0  # a slow model load
        return pipe

    monkeypatch.setattr(ev, "load_eval_pipeline", load)
    cfg = _cfg(assets, fid=False, clip=False, reference=None, warmup_batches=0, timing_batches=2)
    for out in (tmp_path / "fresh", tmp_path / "fresh"):  # the second time all images exist already
        rows = evaluate([RunSpec("fake", str(assets / "teacher"), steps=2)], cfg, out)
        assert rows[0]["seconds_per_image"] == 1.0


def test_cli_evaluate_suite(assets, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"title: tiny table\neval: {{captions: prompts, prompts: {assets / 'prompts.txt'}, resolution: {RES}, "
                     f"batch_size: 6, reference: {assets / 'ref'}, clip_model: {assets / 'clip'}, "
                     f"inception: {assets / 'cache'}, timing_batches: 1, warmup_batches: 0}}\n"
                     f"runs:\n  - {{name: student, model: {assets / 'student'}, steps: 2, guidance: 2.0}}\n"
                     f"  - {{name: teacher-unipc, model: {assets / 'teacher'}, scheduler: unipc, steps: 2}}\n")
    r = runner.invoke(app, ["evaluate", "--suite", str(suite), "--out", str(tmp_path / "o"), "--num-images", "4",
                            "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["title"] == "tiny table" and res["num_images"] == 4 and len(res["rows"]) == 2
    assert all(row["fid"] > 0 and row["clip"] >= 0 for row in res["rows"])
    assert "| student | own | 2 | 2 |" in r.stdout
    # flags of a single --model run are refused with a suite instead of being silently ignored
    r = runner.invoke(app, ["evaluate", "--suite", str(suite), "--out", str(tmp_path / "o2"), "--steps", "8",
                            "--scheduler", "ddim"])
    assert r.exit_code == 2 and "--scheduler, --steps describe a single --model run" in r.stderr, r.output
    assert not (tmp_path / "o2").exists()


def test_cli_evaluate_loads_an_exported_student_in_a_fresh_process(assets, tmp_path):
    """Regression: outside the test process (where diffusers_export was already imported) diffusers could not
    resolve the student's ProReflowScheduler, so `proreflow evaluate --model <student>` failed to load it."""
    import os
    import subprocess
    import sys

    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "proreflow.cli", "evaluate", "--model", str(assets / "student"), "--steps", "2",
           "--captions", "prompts", "--prompts", str(assets / "prompts.txt"), "--num-images", "2", "--resolution",
           str(RES), "--no-fid", "--no-clip", "--timing-batches", "0", "--quiet", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["rows"][0]["images"] == 2


@pytest.mark.parametrize("extra, needle", [
    (["--scheduler", "heun"], "unknown scheduler 'heun'"),
    (["--captions", "coco2017-5k", "--annotations", "{tmp}/none.json"], "does not exist"),
    (["--captions", "coco2017-5k", "--annotations", "{bad}"], "is not valid JSON"),
    (["--captions", "coco2017-5k"], "needs the COCO annotations file captions_val2017.json"),
    (["--prompts", "{empty}"], "holds no prompts"),
    (["--reference", "{mixed}"], "mixed sizes"),
    (["--reference", "{big}"], "the wrong size"),
    (["--inception", "{tmp}/none.pt"], "Inception weights"),
    (["--ref-stats", "{tmp}/none.npz", "--reference", None], "reference statistics"),
    (["--no-fid", "--clip-model", "{tmp}/noclip"], "is not available"),
    (["--guidance", "a,b"], "comma-separated finite numbers >= 0"),
    (["--guidance", "4,nan"], "comma-separated finite numbers >= 0"),
    (["--seed", "-3"], "--seed must be between 0 and"),
    (["--guidance", ","], "give at least one guidance scale"),
    (["--num-images", "0"], "num_images must be in [1, 1e6], got 0"),
    (["--scheduler", "ddim", "--timestep-spacing", "sideways"], "timestep_spacing must be"),
    (["--model", "{tmp}/no-model"], "cannot load the model"),
])
def test_cli_evaluate_bad_input(assets, tmp_path, extra, needle):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bad.json").write_text("{")
    for name, sizes in (("mixed", [(RES, RES), (RES, 24)]), ("big", [(32, 32), (32, 32)])):
        (tmp_path / name).mkdir()
        for i, s in enumerate(sizes):
            Image.new("RGB", s).save(tmp_path / name / f"{i}.png")
    fmt = dict(tmp=tmp_path, empty=tmp_path / "empty.txt", bad=tmp_path / "bad.json", mixed=tmp_path / "mixed",
               big=tmp_path / "big")
    args = {"--model": str(assets / "student"), "--steps": "2", "--captions": "prompts",
            "--prompts": str(assets / "prompts.txt"), "--resolution": str(RES), "--reference": str(assets / "ref"),
            "--clip-model": str(assets / "clip"), "--inception": str(assets / "cache")}
    flags = []
    it = iter(extra)
    for a in it:
        if a.startswith("--no-"):
            flags.append(a)
            continue
        v = next(it)
        if v is None:
            args.pop(a)
        else:
            args[a] = v.format(**fmt)
    cmd = ["evaluate", "--out", str(tmp_path / "out"), "--quiet", *flags] + [x for kv in args.items() for x in kv]
    r = runner.invoke(app, cmd)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and "Traceback" not in r.output
    assert not list((tmp_path / "out").rglob("*.png")) if (tmp_path / "out").exists() else True


def test_packaged_suites_parse():
    for name in ("eval-table1", "eval-table2", "eval-table3"):
        runs, cfg, title = load_suite(name, {"reference": "x"})
        assert runs and title and cfg.captions.startswith("coco")
        assert {r.scheduler for r in runs} <= {None, *SCHEDULERS}
    table1 = {r.name: r for r in load_suite("eval-table1", {"reference": "x"})[0]}
    assert table1["PeRFlow"].scheduler == "perflow" and table1["PeRFlow"].unet_delta == "hansyan/perflow-sd15-delta-weights"
    instaflow = [r for r in load_suite("eval-table1", {"reference": "x"})[0] if r.name == "InstaFlow-0.9B"]
    assert sorted((r.scheduler, r.steps) for r in instaflow) == [("rectified-flow", 1), ("rectified-flow", 2), ("rectified-flow", 4)]
    assert table1["Rectified Diffusion"].scheduler_overrides == {"beta_schedule": "linear"}
    sdxl = {r.name: r for r in load_suite("eval-table3", {"reference": "x"})[0]}
    assert sdxl["PeRFlow-SDXL"].scheduler == "perflow-ddim-eps"


def test_suite_and_stats_mistakes_are_named(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("runs:\n  - {name: a, model: m, stepz: 4}\n")
    with pytest.raises(ProReflowError, match="unknown key 'stepz'.*did you mean 'steps'"):
        load_suite(bad, {"reference": "x"})
    bad.write_text("runs: []\n")
    with pytest.raises(ProReflowError, match="lists no runs"):
        load_suite(bad)
    bad.write_text("runs:\n  - {name: a, model: m}\neval: {captions: coco2017-5k}\n")
    with pytest.raises(ProReflowError, match="FID needs a reference"):
        load_suite(bad)
    a = mi.FIDStats(np.zeros(3), np.eye(3), 10)
    with pytest.raises(ProReflowError, match="made with a different network"):
        mi.frechet_distance(a, mi.FIDStats(np.zeros(4), np.eye(4), 10))
    with pytest.raises(ProReflowError, match="must end in .npz or .safetensors"):
        a.save(tmp_path / "stats.pkl")


def test_coco_reference_restricted_to_the_chosen_images_and_resized(assets, tmp_path):
    ann = _annotations(tmp_path / "captions_val2017.json")
    ref = tmp_path / "val2017"
    ref.mkdir()
    rng = np.random.default_rng(1)
    for i in range(10):  # COCO-like names and sizes (not square, not the evaluation resolution)
        Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(ref / f"{100 + i:012d}.jpg")
    cfg = _cfg(assets, captions="coco2017-5k", annotations=str(ann), prompts=None, num_images=4, reference=str(ref),
               ref_resize=True, ref_same_images=True, clip=False, timing_batches=0,
               save_ref_stats=str(tmp_path / "ref.safetensors"))
    rows = evaluate([RunSpec("teacher", str(assets / "teacher"), steps=2, scheduler="ddim")], cfg, tmp_path / "out")
    ids = json.loads((tmp_path / "out" / "captions.json").read_text())["image_ids"]
    assert len(ids) == 4 and rows[0]["images"] == 4 and rows[0]["clip"] is None
    net = _inception(assets)
    direct = mi.image_stats(net, [torch.stack([mi.read_image_uint8(ref / f"{i:012d}.jpg", RES) for i in ids])])
    saved = mi.FIDStats.load(tmp_path / "ref.safetensors")
    assert saved.n == 4 and np.allclose(saved.mu, direct.mu) and np.allclose(saved.sigma, direct.sigma)
    (ref / f"{ids[0]:012d}.jpg").unlink()
    with pytest.raises(ProReflowError, match="1 of the 4 chosen COCO images are not in"):
        evaluate([RunSpec("teacher", str(assets / "teacher"), steps=2, scheduler="ddim")], cfg, tmp_path / "out2")


def test_cli_evaluate_prompt_accuracy_with_a_classifier_folder(assets, tmp_path):
    """`--classifier`: the share of images the classifier puts in the class their caption names, recomputed here from
    the PNGs with the network itself (captions: cat, dog, cat, dog, cat, dog)."""

    from proreflow.metrics_classifier import save_classifier
    from proreflow.models.classifier import DigitsClassifier

    torch.manual_seed(0)
    net = DigitsClassifier(num_classes=2, channels=3).eval()
    save_classifier(net, tmp_path / "clf", ["cat", "dog"], RES)
    out = tmp_path / "o"
    r = runner.invoke(app, ["evaluate", "--model", str(assets / "student"), "--steps", "2", "--captions", "prompts",
                            "--prompts", str(assets / "prompts.txt"), "--resolution", str(RES), "--no-fid", "--no-clip",
                            "--timing-batches", "0", "--classifier", str(tmp_path / "clf"), "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    row = json.loads((out / "results.json").read_text())["rows"][0]
    files = [Path(row["folder"]) / image_name(i) for i in range(6)]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                     for f in files]) / 127.5 - 1
    with torch.no_grad():
        hits = (net(x).argmax(1) == torch.tensor([0, 1, 0, 1, 0, 1])).float().mean()
    assert row["prompt_accuracy"] == pytest.approx(float(hits), abs=1e-9)
    assert f"| {row['prompt_accuracy']:.3f} |" in (out / "results.md").read_text()
    assert "prompt accuracy" in (out / "results.md").read_text()
    # a classifier whose classes no caption names is refused before any image is made
    save_classifier(net, tmp_path / "clf2", ["shoe", "bag"], RES)
    r = runner.invoke(app, ["evaluate", "--model", str(assets / "student"), "--steps", "2", "--captions", "prompts",
                            "--prompts", str(assets / "prompts.txt"), "--resolution", str(RES), "--no-fid", "--no-clip",
                            "--classifier", str(tmp_path / "clf2"), "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "no caption names one of its classes" in r.stderr, r.output
    assert not (tmp_path / "o2").exists()

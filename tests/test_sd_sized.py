"""SD1.5-sized smoke run (slow, excluded from the default suite; `pytest -m slow tests/test_sd_sized.py`).

The default suite uses tiny pipelines; this builds one with SD1.5's real shapes (UNet 860M parameters,
the VAE and the CLIP ViT-L text encoder at their published configs, random weights: no hub) and runs
what users run on it: a LoRA distillation with the preset's method, export, a fresh load, sampling, and
`evaluate` with the student and two published-student samplers. It catches what only real shapes show
(attention head splits, 4 down blocks, 768-wide cross-attention, memory) at 64 px on CPU.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from proreflow.distill import DistillConfig, distill, encode_folder, load_pipeline
from proreflow.evaluate import EvalConfig, RunSpec, evaluate
from proreflow.methods import MethodSpec
from proreflow.pairs import TeacherSolver
from proreflow.training import TrainConfig
from tiny_sd import caption_folder, tiny_tokenizer

pytestmark = pytest.mark.slow
RES = 64


def sd15_shaped_pipeline(tmp) -> StableDiffusionPipeline:
    """SD1.5's UNet / VAE / text-encoder configs (as in its hub config files) with random weights."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512, scaling_factor=0.18215)
    tok = tiny_tokenizer(tmp / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_sd15_sized_distill_export_sample_and_evaluate(tmp_path):
    sd15_shaped_pipeline(tmp_path / "parts").save_pretrained(tmp_path / "teacher")
    assert sum(p.numel() for p in UNet2DConditionModel.from_pretrained(tmp_path / "teacher", subfolder="unet")
               .parameters()) > 8.5e8
    images = caption_folder(tmp_path / "images", size=(RES, RES))
    cfg = DistillConfig(model=str(tmp_path / "teacher"), resolution=RES, steps=4, lora_rank=4,
                        method=MethodSpec("proreflow", windows="4->k", lam=1.0), budget_steps=2,
                        teacher_solver=TeacherSolver("euler", 1),
                        train=TrainConfig(lr=1e-4, batch_size=2, progress=False, seed=0))
    pipe = load_pipeline(cfg.model)
    data = encode_folder(pipe, images, cfg.resolution)
    assert data.latents.shape == (6, 4, RES // 8, RES // 8)
    summary = distill(cfg, pipe, data, tmp_path / "student")
    assert summary["optimizer_steps"] == 2
    student = StableDiffusionPipeline.from_pretrained(tmp_path / "student")
    assert type(student.scheduler).__name__ == "ProReflowScheduler"
    out = student(["a red cat"], num_inference_steps=4, guidance_scale=4.0, height=RES, width=RES, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, RES, RES, 3) and np.isfinite(out).all()

    (tmp_path / "p.txt").write_text("a red cat\nthe dog\n")
    ecfg = EvalConfig(captions="prompts", prompts=str(tmp_path / "p.txt"), resolution=RES, batch_size=2, fid=False,
                      clip=False, warmup_batches=0, timing_batches=1, progress=False, dtype="float32")
    rows = evaluate([RunSpec("student", str(tmp_path / "student"), steps=4, guidance=4.0),
                     RunSpec("perflow rule", str(tmp_path / "teacher"), steps=4, guidance=4.5, scheduler="perflow"),
                     RunSpec("rectified-flow rule", str(tmp_path / "teacher"), steps=1, guidance=0.0,
                             scheduler="rectified-flow")], ecfg, tmp_path / "eval")
    assert [r["images"] for r in rows] == [2, 2, 2] and all(r["seconds_per_image"] > 0 for r in rows)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(results["rows"]) == 3

"""`models.sd_shapes` against the published component configs (fast: built on the meta device, no weights).

The values below are those of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0's unet/vae/text_encoder
config.json files as `from_pretrained` reads them (keys a file lacks take diffusers' defaults, e.g. SD1.5's
VAE `force_upcast`); the parameter counts are the published models'.
"""

import pytest

from proreflow.models.sd_shapes import build_pipeline, parameter_counts

SD15_UNET = {"sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "cross_attention_dim": 768,
             "attention_head_dim": 8, "use_linear_projection": False, "addition_embed_type": None}
SDXL_UNET = {"sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
             "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}
SD15_VAE = {"block_out_channels": (128, 256, 512, 512), "latent_channels": 4, "sample_size": 512,
            "scaling_factor": 0.18215, "force_upcast": True}
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77}
CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
             "hidden_act": "gelu", "projection_dim": 1280, "vocab_size": 49408, "max_position_embeddings": 77}
SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
             "num_train_timesteps": 1000, "prediction_type": "epsilon"}


def _check(config, expected):
    got = {k: tuple(v) if isinstance(v, list) else v for k, v in ((k, config.get(k)) for k in expected)}
    assert got == expected


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_components_have_the_published_configs_and_parameter_counts(arch, tmp_path):
    pipe = build_pipeline(arch, tmp_path, device="meta")  # shapes only: no memory, no init time
    assert pipe.unet.device.type == "meta" and pipe.scheduler.alphas_cumprod.device.type == "cpu"
    _check(pipe.unet.config, SD15_UNET if arch == "sd15" else SDXL_UNET)
    _check(pipe.vae.config, SD15_VAE if arch == "sd15" else SDXL_VAE)
    _check(pipe.text_encoder.config.to_dict(), CLIP_L)
    _check(pipe.scheduler.config, SCHEDULER)
    counts = parameter_counts(pipe)
    if arch == "sd15":
        assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    else:
        _check(pipe.text_encoder_2.config.to_dict(), CLIP_BIGG)
        assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                          "text_encoder_2": 694_659_840}


def test_build_pipeline_places_the_networks_on_the_requested_device(tmp_path):
    """Networks are made on `device` (random init on a GPU takes milliseconds, SDXL's 3.5B parameters on a CPU
    core half a minute); schedulers stay on the CPU, where the pipelines and `VPSchedule` expect them."""
    pipe = build_pipeline("sd15", tmp_path, device="meta")
    assert {p.device.type for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {"meta"}
    assert pipe.scheduler.alphas_cumprod.device.type == "cpu"

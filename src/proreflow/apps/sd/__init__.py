"""Stable Diffusion (SD1.x/2.x, SDXL, SD3; `fields.families` says what each is) distillation and export: `proreflow distill` and `proreflow sample`."""

from proreflow.apps.sd.config import DistillConfig, load_distill_config
from proreflow.apps.sd.distill import LORA_TARGETS, build_teacher_student, check_prompt_only, distill, param_digest
from proreflow.apps.sd.encode import (
                                      CaptionedLatents,
                                      encode_folder,
                                      encode_images,
                                      encode_prompts_only,
                                      encode_records,
                                      encode_text,
                                      encoders_on_device,
                                      load_pipeline,
                                      uncond_text,
)
from proreflow.apps.sd.export import ProReflowScheduler, export_pipeline, load_diffusers_pipeline, scheduler_for
from proreflow.apps.sd.run import run_distill
from proreflow.apps.sd.stream import StreamingDataFn, StreamingLatents

__all__ = ["CaptionedLatents", "DistillConfig", "LORA_TARGETS", "ProReflowScheduler", "build_teacher_student",
           "check_prompt_only", "distill", "encode_folder", "encode_images", "encode_prompts_only", "encode_records",
           "encode_text", "encoders_on_device", "export_pipeline", "load_diffusers_pipeline",
           "load_distill_config", "load_pipeline", "param_digest", "run_distill", "scheduler_for", "StreamingDataFn", "StreamingLatents",
           "uncond_text"]

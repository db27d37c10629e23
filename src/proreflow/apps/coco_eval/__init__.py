"""Text-to-image evaluation (`proreflow evaluate`): the paper's tables as suites of rows, other projects'
published students beside ours, FID / CLIP score / time per image."""

from proreflow.apps.coco_eval.config import (
                                             SCHEDULERS,
                                             EvalConfig,
                                             RunSpec,
                                             Suite,
                                             load_suite,
                                             parse_settings,
                                             plan_evaluation,
)
from proreflow.apps.coco_eval.generate import (
                                             device_name,
                                             generate_images,
                                             image_name,
                                             image_seed,
                                             load_eval_pipeline,
                                             pick_device,
                                             pipeline_generate_fn,
                                             run_scheduler,
                                             time_per_image,
                                             to_uint8,
)
from proreflow.apps.coco_eval.report import markdown_table
from proreflow.apps.coco_eval.run import Metrics, coco_id_of, evaluate, prepare_metrics, score_folder

__all__ = ["EvalConfig", "Metrics", "RunSpec", "SCHEDULERS", "Suite", "coco_id_of", "device_name", "evaluate",
           "generate_images", "image_name", "image_seed", "load_eval_pipeline", "load_suite", "markdown_table",
           "parse_settings", "pick_device", "plan_evaluation", "pipeline_generate_fn", "prepare_metrics", "run_scheduler", "score_folder",
           "time_per_image", "to_uint8"]

"""Training: the stage loop on accelerate, the batch builders that encode the method, progressive plans,
EMA, crash-safe checkpoints and SIGTERM handling (docs/design.md §3). The public names are re-exported here."""

from proreflow.accel import process_state
from proreflow.training.batches import DataFn, cached_reflow_batches, ddpm_batches, flow_matching_batches, reflow_batches
from proreflow.training.config import TrainConfig, describe_batch, resolve_batch
from proreflow.training.ema import TrainableEMA, ema_with_warmup
from proreflow.training.loop import (
                                     BatchFn,
                                     FitResult,
                                     StepCallback,
                                     TrainBatch,
                                     check_optimizer,
                                     fit,
                                     make_accelerator,
                                     make_optimizer,
)
from proreflow.training.monitor import (Monitor, MonitorConfig, Validation, check_report_to, image_grid, points_image,
                                        watching)
from proreflow.training.plan import PairCacheConfig, PlanResult, train_plan
from proreflow.training.recipe import Recipe, RecipeSettings
from proreflow.training.signals import TrainingInterrupted, check_stop, stop_on_sigterm

__all__ = ["BatchFn", "DataFn", "FitResult", "Monitor", "MonitorConfig", "PairCacheConfig", "PlanResult", "Recipe", "RecipeSettings", "StepCallback", "TrainBatch",
           "TrainConfig", "TrainableEMA", "TrainingInterrupted", "Validation", "cached_reflow_batches", "check_optimizer", "check_report_to", "check_stop", "describe_batch",
           "ddpm_batches", "ema_with_warmup", "fit", "flow_matching_batches", "image_grid", "make_accelerator", "make_optimizer",
           "points_image", "process_state", "reflow_batches", "resolve_batch", "stop_on_sigterm", "train_plan", "watching"]

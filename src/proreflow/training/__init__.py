"""Training: the stage loop on accelerate, the batch builders that encode the method, progressive plans,
EMA, crash-safe checkpoints and SIGTERM handling (docs/design.md §3). The public names are re-exported here."""

from proreflow.training.batches import DataFn, cached_reflow_batches, ddpm_batches, flow_matching_batches, reflow_batches
from proreflow.training.config import TrainConfig, describe_batch, resolve_batch
from proreflow.training.ema import TrainableEMA, ema_with_warmup
from proreflow.training.loop import (
                                     BatchFn,
                                     FitResult,
                                     StepCallback,
                                     TrainBatch,
                                     fit,
                                     make_accelerator,
                                     make_optimizer,
                                     process_state,
)
from proreflow.training.plan import PairCacheConfig, PlanResult, train_plan
from proreflow.training.recipe import Recipe, RecipeSettings
from proreflow.training.signals import TrainingInterrupted, check_stop, stop_on_sigterm

__all__ = ["BatchFn", "DataFn", "FitResult", "PairCacheConfig", "PlanResult", "Recipe", "RecipeSettings", "StepCallback", "TrainBatch",
           "TrainConfig", "TrainableEMA", "TrainingInterrupted", "cached_reflow_batches", "check_stop", "describe_batch",
           "ddpm_batches", "ema_with_warmup", "fit", "flow_matching_batches", "make_accelerator", "make_optimizer",
           "process_state", "reflow_batches", "resolve_batch", "stop_on_sigterm", "train_plan"]

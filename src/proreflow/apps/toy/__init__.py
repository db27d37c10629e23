"""The 2-D toy: `proreflow demo` (every method at equal budget) and `proreflow train` (one student, resumable)."""

from proreflow.apps.toy.config import (
                                       BaseConfig,
                                       GMMConfig,
                                       ModelConfig,
                                       ToyConfig,
                                       ToyEvalConfig,
                                       config_to_dict,
                                       find_method,
                                       load_config,
                                       validate_plans,
                                       with_run_settings,
)
from proreflow.apps.toy.report import COLUMNS, results_markdown, write_results
from proreflow.apps.toy.run import (
                                       MAX_STEPS,
                                       Comparison,
                                       Setup,
                                       parse_steps,
                                       points_data_fn,
                                       prepare,
                                       run_demo,
                                       validate_source,
)
from proreflow.apps.toy.train import train_single

__all__ = ["BaseConfig", "COLUMNS", "Comparison", "GMMConfig", "MAX_STEPS", "ModelConfig", "Setup", "ToyConfig",
           "ToyEvalConfig", "config_to_dict", "find_method", "load_config", "parse_steps", "points_data_fn", "prepare",
           "results_markdown", "run_demo", "train_single", "validate_plans", "validate_source", "with_run_settings",
           "write_results"]

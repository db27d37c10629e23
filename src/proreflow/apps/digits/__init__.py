"""The digits benchmark: `proreflow run` and `proreflow analyze` on scikit-learn's digits (real images on CPU)."""

from proreflow.apps.digits.bench import DigitsBench, StudentRun, train_student
from proreflow.apps.digits.config import (
                                          ABLATION_LABELS,
                                          TEACHER_KINDS,
                                          AnalysisConfig,
                                          DataConfig,
                                          DigitsConfig,
                                          DigitsEvalConfig,
                                          SweepConfig,
                                          TeacherConfig,
                                          VPConfig,
                                          load_digits_config,
                                          samples_at,
)
from proreflow.apps.digits.report import analysis_markdown, results_markdown
from proreflow.apps.digits.run import analyze_digits, run_analyses, run_digits

__all__ = ["ABLATION_LABELS", "AnalysisConfig", "DataConfig", "DigitsBench", "DigitsConfig", "DigitsEvalConfig",
           "StudentRun", "SweepConfig", "TEACHER_KINDS", "TeacherConfig", "VPConfig", "analysis_markdown",
           "analyze_digits", "load_digits_config", "results_markdown", "run_analyses", "run_digits", "samples_at",
           "train_student"]

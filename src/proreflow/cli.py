"""The `proreflow` command. Errors of ours print one line and exit with status 2 (docs/design.md §5)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Annotated, Iterator, Optional
import typer
from typer.core import TyperGroup

try:  # typer's own copy of click (newer typer), else click itself
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

#: the "abort" exceptions of this typer/click: typer's own (newer typer) and click's where it has one. Looked up
#: once: an `except` naming a missing attribute raises AttributeError for any exception that reaches it
_ABORTS = tuple(c for c in (getattr(typer, "Abort", None), getattr(click_errors, "Abort", None)) if c is not None)

from proreflow.cli_evaluate import evaluate
from proreflow.cli_minisd import mini_teacher
from proreflow.errors import ProReflowError
from proreflow.limits import MAX_SEED
from proreflow.time_sampling import rules_help


class _Commands(TyperGroup):
    """Usage errors (exit 2) and Ctrl-C (exit 130) get our one-line `error:` form, not click's framed box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help() if exc.ctx else exc.format_message(), err=True)
            sys.exit(2)
        except click_errors.UsageError as exc:
            where = f"; see `{exc.ctx.command_path} --help`" if exc.ctx else ""
            message = " ".join(exc.format_message().split()).rstrip(".")
            typer.echo(f"error: {message}{where}", err=True)
            sys.exit(2)
        except _ABORTS:  # EOF at a prompt
            code = 130
        if code == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into a silent exit 130
            typer.echo("error: aborted; a run with checkpoints continues with --resume latest", err=True)
        sys.exit(code if isinstance(code, int) else 0)


DataOpt = Annotated[Optional[Path], typer.Option(help="Your own points: a .npy array of shape N x D, D >= 2.")]
ConfigOpt = Annotated[Optional[Path], typer.Option(help="A toy preset YAML (default: the packaged configs/toy.yaml).")]
TimeSamplingOpt = Annotated[Optional[str], typer.Option(
    help=f"Where students train on each chord: {rules_help()} (P of the batch at window starts); the preset's "
         "default for methods that name none.")]
BaseStepsOpt = Annotated[Optional[int], typer.Option(help="Override flow-matching steps of the shared init.")]
OutliersOpt = Annotated[bool, typer.Option(help="Train on --data even with points more than 1e6 robust scales from "
                                                "the median (refused by default: they wreck standardisation).")]
QuietOpt = Annotated[bool, typer.Option(help="No progress bars; warnings go to a log file (named if an error "
                                             "follows).")]
ReportToOpt = Annotated[str, typer.Option(help="Where the curves go (docs/monitoring.md): tensorboard (OUT/logs; "
                                               "`tensorboard --logdir OUT/logs`), wandb (WANDB_MODE=offline works "
                                               "without an account) or none.")]
ValidateOpt = Annotated[int, typer.Option(help="Every N optimizer steps, render the EMA student next to the teacher "
                                               "from fixed noise: a fidelity curve, an image, OUT/validation/ "
                                               "(0: never).")]
app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Few-step students by progressive reflow with aligned v-prediction.")
app.command("mini-teacher")(mini_teacher)  # its code is in cli_minisd.py (this file stays under 400 lines)
app.command("evaluate")(evaluate)  # and in cli_evaluate.py


def _fail(exc: Exception) -> None:
    from proreflow.cli_quiet import written_log

    log = written_log()  # with --quiet, what the libraries said is there, not above this line
    typer.echo(f"error: {exc}" + (f" (warnings and library messages: {log})" if log else ""), err=True)
    raise typer.Exit(2)


def _resume_latest(resume: Optional[str]) -> bool:
    """--resume takes only 'latest' (or nothing)."""
    if resume not in (None, "latest"):
        raise ProReflowError(f"--resume takes 'latest', got {resume!r}")
    return resume == "latest"


def _check_seed(seed: Optional[int]) -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ProReflowError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")


def _monitor(report_to: str, validate_every: int):
    """--report-to and --validate-every, checked (and the tracker's package found) before any work."""
    from proreflow.training import MonitorConfig

    return MonitorConfig(report_to=report_to, validate_every=validate_every)


def _check_out(out: Path) -> None:
    from proreflow.store import check_output_dir  # lazily: `proreflow --help` starts without torch
    check_output_dir(out)


@contextmanager
def _errors(resume_hint: str = "continue with --resume latest", quiet: bool = False,
            libraries: bool = False) -> Iterator[None]:
    """Our errors as one `error:` line and exit 2; a SIGTERM-stopped run as exit 143 with how to continue. With
    `quiet` (--quiet), warnings and library messages go to a log file (`cli_quiet`), so the error line is last."""
    from proreflow.cli_quiet import quiet as to_log
    from proreflow.training import TrainingInterrupted

    try:
        with to_log(quiet, libraries):
            yield
    except ProReflowError as exc:
        _fail(exc)
    except TrainingInterrupted as exc:
        _interrupted(exc, resume_hint)


def _interrupted(exc: Exception, hint: str) -> None:
    """SIGTERM stopped training after a checkpoint: say how to continue, exit 143 like a terminated job."""
    typer.echo(f"interrupted: {exc}; {hint}", err=True)
    raise typer.Exit(143)


def _finish(message: str) -> None:
    """The end of a training command: the main process reports, then every process shuts the process group
    down, which is what Accelerator.end_training() does without trackers (callers have already waited for
    every process), so multi-process runs end cleanly."""
    from proreflow.training import process_state

    state = process_state()
    if state.is_main_process:
        typer.echo(message)
    state.destroy_process_group()


@app.callback()
def _root() -> None:
    """proreflow: progressive reflow + aligned v-prediction."""


@app.command()
def demo(
    dataset: Optional[str] = typer.Option(None, help="Built-in 2-D set: gmm (exact teacher, default), moons, "
                                                     "checkerboard, 8gaussians, spirals, circles."),
    data: DataOpt = None,
    steps: str = typer.Option("1,2,4", help="Comma-separated sampling step counts of the students."),
    out: Path = typer.Option(Path("demo-out"), help="Output folder for results.json, results.md and plots."),
    seed: int = typer.Option(0, help="Seed for data, initialisation, training and evaluation."),
    config: ConfigOpt = None,
    budget: Optional[int] = typer.Option(None, help="Override optimizer steps per method (all stages)."),
    time_sampling: TimeSamplingOpt = None,
    base_steps: BaseStepsOpt = None,
    allow_outliers: OutliersOpt = False,
    overwrite: bool = typer.Option(False, help="Replace the results of an earlier demo in --out (refused without)."),
    quiet: QuietOpt = False,
) -> None:
    """Compare teacher Euler, 2-rectified flow, PeRFlow, the two ablations and ProReflow at equal budget."""
    from proreflow.apps.toy import parse_steps, run_demo

    with _errors(quiet=quiet):
        ks = parse_steps(steps)
        cfg = _toy_config(seed, out, config, budget, base_steps, time_sampling)
        run_demo(cfg, ks, out, seed=seed, dataset=dataset, data_file=str(data) if data else None,
                 progress=not quiet, allow_outliers=allow_outliers, overwrite=overwrite)
    typer.echo((out / "results.md").read_text())
    typer.echo(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'samples.png'}, {out / 'trajectories.png'}")


@app.command()
def train(
    method: str = typer.Option("proreflow", help="A method name from the preset (e.g. proreflow, perflow)."),
    steps: int = typer.Option(4, help="Sampling steps of the student (resolves 'k' in the preset's windows)."),
    out: Path = typer.Option(..., help="Run folder: checkpoints/, student.safetensors, metrics.json, run.json."),
    dataset: Optional[str] = typer.Option(None, help="Built-in 2-D set (default: the exact GMM teacher)."),
    data: DataOpt = None,
    seed: int = typer.Option(0, help="Seed for data, initialisation and training."),
    config: ConfigOpt = None,
    budget: Optional[int] = typer.Option(None, help="Override optimizer steps (all stages)."),
    time_sampling: TimeSamplingOpt = None,
    base_steps: BaseStepsOpt = None,
    checkpoint_every: int = typer.Option(200, help="Checkpoint every N optimizer steps."),
    keep: int = typer.Option(2, help="Keep the last N checkpoints of each stage."),
    resume: Optional[str] = typer.Option(None, help="'latest': continue the run in --out from its last checkpoint."),
    cached_pairs: int = typer.Option(0, help="Cache N teacher pairs per stage in --out/pairs (0: on the fly)."),
    allow_outliers: OutliersOpt = False,
    report_to: ReportToOpt = "tensorboard",
    validate_every: ValidateOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Train one method's student with crash-safe checkpoints (SIGTERM saves one; --resume latest continues)."""
    from proreflow.apps.toy import train_single

    with _errors(quiet=quiet):
        resume_latest = _resume_latest(resume)
        if cached_pairs < 0:
            raise ProReflowError(f"--cached-pairs must be >= 0, got {cached_pairs}")
        cfg = _toy_config(seed, out, config, budget, base_steps, time_sampling)
        monitor = _monitor(report_to, validate_every)
        row = train_single(cfg, method, steps, out, seed=seed, dataset=dataset, data_file=str(data) if data else None,
                           every=checkpoint_every, keep=keep, resume=resume_latest, progress=not quiet,
                           cached_pairs=cached_pairs, allow_outliers=allow_outliers, monitor=monitor)
    _finish(f"{row['method']} at {row['steps']} steps: fidelity RMSE {row['fidelity_rmse']:.4f}, "
            f"SW2 {row['distance_swd']:.4f}; wrote {out / 'student.safetensors'} and {out / 'metrics.json'}")


@app.command()
def distill(
    data: Optional[str] = typer.Option(None, help="Images + captions: a folder (image + same-named .txt), "
                                                  "webdataset tar shards (.tar file, folder or glob), or hf:NAME[:SPLIT]."),
    prompts: Optional[Path] = typer.Option(None, help="Prompt-only mode: a text file, one prompt a line (no images; "
                                                      "trains only windows that start at pure noise)."),
    out: Path = typer.Option(..., help="Output folder: a diffusers pipeline with the student and a ProReflowScheduler."),
    preset: Optional[str] = typer.Option("sd15-proreflow-I", help="Preset name in configs/ or a YAML path."),
    model: Optional[str] = typer.Option(None, help="Teacher: a diffusers folder or hub id (overrides the preset)."),
    lora_rank: Optional[int] = typer.Option(None, help="LoRA rank (0: full fine-tuning)."),
    budget: Optional[int] = typer.Option(None, help="Optimizer steps over all stages."),
    time_sampling: Optional[str] = typer.Option(None, help="Where students train on each chord: "
                                                f"{rules_help()} (P of the batch at window starts); the preset's."),
    resolution: Optional[int] = typer.Option(None, help="Training resolution in pixels."),
    window_placement: Optional[str] = typer.Option(None, help="Windows uniform in the teacher's timesteps "
                                                   "('timesteps', PeRFlow's, the presets') or in flow time ('flow')."),
    seed: Optional[int] = typer.Option(None, help="Seed of data order, dropout, training (default: train.seed)."),
    checkpoint_every: int = typer.Option(500, help="Checkpoint every N optimizer steps (in OUT/checkpoints)."),
    resume: Optional[str] = typer.Option(None, help="'latest': continue from the last checkpoint in OUT."),
    encode_cache: Optional[Path] = typer.Option(None, help="Keep VAE latents + text embeddings of --data in this "
                                                           "folder (checksummed shards) and reuse them next time."),
    pair_cache: Optional[Path] = typer.Option(None, help="Remember the teacher's pairs in this folder by what they "
                                                         "are solved from; a run drawing the same pairs (another "
                                                         "lambda or budget, same seed) loads them: the same student."),
    stream: bool = typer.Option(False, help="Stream --data (tar shards, image folder or hf:) through DataLoader "
                                            "workers, encoding each batch on the device: memory does not grow with "
                                            "the data set; --resume continues the stream, on any process count."),
    data_workers: int = typer.Option(2, help="DataLoader workers per process with --stream."),
    report_to: ReportToOpt = "tensorboard",
    validate_every: ValidateOpt = 0,
    validation_prompts: Optional[Path] = typer.Option(None, help="Prompts rendered by --validate-every, one a line "
                                                                 "(default: the first 4 distinct captions)."),
    quiet: bool = typer.Option(False, help="No progress bars; warnings and library messages go to a log file."),
) -> None:
    """Distill a Stable Diffusion teacher into a few-step student (run under `accelerate launch` for GPUs).
    SD presets: PeRFlow's 4000 steps at global batch 1024 (train.batch_size) from train.per_device_batch and
    gradient accumulation on any GPU count; 8 GPUs: accelerate launch --multi_gpu --num_processes 8 -m
    proreflow.cli distill --preset sd15-proreflow-I --data DATA --out OUT (16 x 8 GPUs x 8 accumulation)."""
    from proreflow.apps.sd import load_distill_config, run_distill
    from proreflow.time_sampling import TimeSampling

    with _errors(quiet=quiet, libraries=True):
        resume_latest = _resume_latest(resume)
        _check_seed(seed)
        cfg = load_distill_config(preset, model=model, lora_rank=lora_rank, budget_steps=budget, resolution=resolution,
                                  time_sampling=TimeSampling.parse(time_sampling), window_placement=window_placement)
        summary = run_distill(cfg, out, data=data, prompts=prompts, seed=seed, encode_cache=encode_cache,
                              checkpoint_every=checkpoint_every, resume=resume_latest, progress=not quiet,
                              stream=stream, data_workers=data_workers, monitor=_monitor(report_to, validate_every),
                              validation_prompts=validation_prompts, pair_cache=pair_cache)
    _finish(f"{summary['method']}: {summary['steps']}-step student written to {out} "
            f"(load with DiffusionPipeline.from_pretrained)")


@app.command()
def sample(
    model: str = typer.Option(..., help="A diffusers pipeline folder or hub id (e.g. a `proreflow distill` output)."),
    prompt: list[str] = typer.Option(..., help="Prompt (repeat for several)."),
    out: Path = typer.Option(Path("samples"), help="Folder for the PNGs."),
    steps: int = typer.Option(4, help="Sampling steps (a multiple of the student's windows)."),
    guidance: float = typer.Option(4.0, help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, help="Seed of the initial noise."),
    height: Optional[int] = typer.Option(None, help="Image height (default: the pipeline's)."),
    width: Optional[int] = typer.Option(None, help="Image width (default: the pipeline's)."),
    overwrite: bool = typer.Option(False, help="Replace images made with other settings in --out (refused without)."),
) -> None:
    """Generate images with a (student) pipeline and write them as PNGs (their settings in sample.json)."""
    import torch

    from proreflow.run_settings import check_not_replacing
    from proreflow.store import atomic_write_text

    with _errors():
        _check_seed(seed)
        if not math.isfinite(guidance) or guidance < 0:
            raise ProReflowError(f"--guidance must be a finite number >= 0, got {guidance}")
        from proreflow.limits import MAX_RESOLUTION

        for flag, v in (("--height", height), ("--width", width)):
            if v is not None and (v < 8 or v > MAX_RESOLUTION or v % 8):
                raise ProReflowError(f"{flag} must be a positive multiple of 8 up to {MAX_RESOLUTION}, got {v}")
        _check_out(out)
        settings = {"model": model, "prompts": list(prompt), "steps": steps, "guidance": guidance, "seed": seed,
                    "height": height, "width": width}
        check_not_replacing(out / "sample.json", settings, overwrite, "images")
        if not overwrite and not (out / "sample.json").is_file() and any(out.glob("[0-9][0-9][0-9].png")):
            raise ProReflowError(f"{str(out)!r} holds images that no sample.json describes; pass --overwrite to "
                                 f"replace them or choose another --out")
        from proreflow.apps.sd.export import load_for_sampling

        pipe = load_for_sampling(model, steps)  # steps bounded, and a multiple of a student's windows
        pipe.to("cuda" if torch.cuda.is_available() else "cpu")
        try:
            images = pipe(list(prompt), num_inference_steps=steps, guidance_scale=guidance, height=height,
                          width=width, generator=torch.Generator().manual_seed(seed)).images
        except ValueError as exc:  # diffusers' check_inputs: a bad argument for this pipeline
            raise ProReflowError(f"{type(pipe).__name__} refused the arguments: {str(exc).splitlines()[0][:300]}") from None
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("[0-9][0-9][0-9].png"):  # an earlier set: --overwrite, or the same settings again
        old.unlink()
    for i, (img, text) in enumerate(zip(images, prompt)):
        img.save(out / f"{i:03d}.png")
    (out / "prompts.txt").write_text("\n".join(prompt) + "\n")
    atomic_write_text(out / "sample.json", json.dumps(settings, indent=1) + "\n")
    typer.echo(f"wrote {len(images)} image(s) to {out}")


@app.command()
def run(
    config: str = typer.Argument(..., help="A benchmark preset: configs/digits.yaml, a preset name (digits, "
                                           "digits-smoke) or your YAML overriding some of its keys."),
    out: Path = typer.Option(Path("results/digits"), help="Output folder (results.json/.md, figures, cache/)."),
    analyses: bool = typer.Option(True, help="Also run the teacher analyses (figs. 1a, 1b)."),
    report_to: ReportToOpt = "tensorboard",
    validate_every: ValidateOpt = 0,
    overwrite: bool = typer.Option(False, help="Replace results of another preset in --out (refused without; the "
                                               "same preset reruns from the cache)."),
    quiet: bool = typer.Option(False, help="No progress bars or log lines."),
) -> None:
    """Run the digits benchmark: teachers, solver baselines, every method over seeds, table 4, figs. 1a/1b/3."""
    from proreflow.apps.digits import load_digits_config, run_digits
    from proreflow.training import stop_on_sigterm

    with _errors("rerun the same command to continue from the cache", quiet=quiet):
        cfg = load_digits_config(config)
        monitor = _monitor(report_to, validate_every)
        _check_out(out)
        with stop_on_sigterm():
            run_digits(cfg, out, progress=not quiet, analyses=analyses, monitor=monitor, overwrite=overwrite)
    typer.echo((out / "results.md").read_text())


@app.command()
def analyze(
    config: str = typer.Argument(..., help="The benchmark preset (as for `proreflow run`)."),
    out: Path = typer.Option(Path("results/digits"), help="Output folder; reuses the teacher cached by `run` there."),
    quiet: bool = typer.Option(False, help="No progress bars or log lines."),
) -> None:
    """The teacher analyses only: velocity discrepancy across timesteps (fig. 1a), direction vs magnitude (fig. 1b)."""
    from proreflow.apps.digits import analysis_markdown, analyze_digits, load_digits_config

    with _errors():
        cfg = load_digits_config(config)
        _check_out(out)
        res = analyze_digits(cfg, out, progress=not quiet)
    typer.echo(analysis_markdown(res))


def _toy_config(seed: int, out: Path, config: Optional[Path], budget: Optional[int], base_steps: Optional[int],
                time_sampling: Optional[str]):
    """`demo` and `train`: the seed, the toy preset with the flags' overrides, and the output folder, checked."""
    from dataclasses import replace

    from proreflow.apps.toy import load_config
    from proreflow.time_sampling import TimeSampling

    _check_seed(seed)
    cfg = load_config(config, budget_steps=budget, time_sampling=TimeSampling.parse(time_sampling))
    _check_out(out)
    return replace(cfg, base=replace(cfg.base, steps=base_steps)) if base_steps is not None else cfg


def main() -> None:
    app(prog_name="proreflow")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

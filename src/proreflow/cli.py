"""The `proreflow` command. Errors of ours print one line and exit with status 2 (DESIGN §5)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from proreflow.errors import ProReflowError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Few-step students by progressive reflow with aligned v-prediction.")


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


@app.callback()
def _root() -> None:
    """proreflow: progressive reflow + aligned v-prediction."""


@app.command()
def demo(
    dataset: Optional[str] = typer.Option(None, help="Built-in 2-D set: gmm (exact teacher, default), moons, "
                                                     "checkerboard, 8gaussians, spirals, circles."),
    data: Optional[Path] = typer.Option(None, help="Your own points: a .npy array of shape N x D, D >= 2."),
    steps: str = typer.Option("2,4", help="Comma-separated sampling step counts of the students."),
    out: Path = typer.Option(Path("demo-out"), help="Output folder for results.json, results.md and plots."),
    seed: int = typer.Option(0, help="Seed for data, initialisation, training and evaluation."),
    config: Optional[Path] = typer.Option(None, help="A toy preset YAML (default: the packaged configs/toy.yaml)."),
    budget: Optional[int] = typer.Option(None, help="Override optimizer steps per method (all stages)."),
    base_steps: Optional[int] = typer.Option(None, help="Override flow-matching steps of the shared init."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Compare teacher Euler, 2-rectified flow, PeRFlow, the two ablations and ProReflow at equal budget."""
    from proreflow.demo import load_config, parse_steps, run_demo

    try:
        ks = parse_steps(steps)
        cfg = load_config(config, budget_steps=budget)
        if base_steps is not None:
            from dataclasses import replace

            from proreflow.demo import BaseConfig

            cfg = replace(cfg, base=BaseConfig(steps=base_steps, lr=cfg.base.lr))
        if out.exists() and not out.is_dir():
            raise ProReflowError(f"--out {str(out)!r} exists and is not a folder")
        rows = run_demo(cfg, ks, out, seed=seed, dataset=dataset, data_file=str(data) if data else None,
                        progress=not quiet)
    except ProReflowError as exc:
        _fail(exc)
    typer.echo((out / "results.md").read_text())
    typer.echo(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'samples.png'}, {out / 'trajectories.png'}")
    del rows


def main() -> None:
    app(prog_name="proreflow")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

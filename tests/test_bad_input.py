"""The bad-input table (docs/reliability.md): every row is a command a user might type that must end with one
`error:` line on stderr, exit status 2, no traceback, and every file under the test folder as it was (nothing
written, nothing removed, no run folder created). Rows name the file and flag they break.

Placeholders: {out} an existing output folder holding an earlier result; {tmp} the test folder; other names are
files made by `_files` (bad configs, bad point sets, bad captions) or a damaged copy of a finished run ({run})."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from proreflow.cli import app

runner = CliRunner()

TRAIN = ["train", "--budget", "4", "--base-steps", "4", "--quiet"]
#: `train` arguments of the finished run that the resume rows damage (same arguments: a resume is allowed)
RUN_ARGS = ["train", "--method", "perflow", "--steps", "2", "--budget", "4", "--base-steps", "4",
            "--checkpoint-every", "100", "--quiet"]
RESUME = [*RUN_ARGS, "--out", "{run}", "--resume", "latest"]
SEED = "99999999999999999999"

ROWS = [
    # -- user point sets (demo/train --data) -----------------------------------------------------------
    ("npy-missing", ["demo", "--data", "{tmp}/missing.npy", "--out", "{out}", "--quiet"], "does not exist"),
    ("npy-folder", ["demo", "--data", "{tmp}", "--out", "{out}", "--quiet"], "is a folder"),
    ("npy-garbage", ["demo", "--data", "{garbage}", "--out", "{out}", "--quiet"], "no NumPy header"),
    ("npy-text", ["demo", "--data", "{text}", "--out", "{out}", "--quiet"], "no NumPy header"),
    ("npy-pickled", ["demo", "--data", "{pickled}", "--out", "{out}", "--quiet"], "never unpickles"),
    ("npy-nan", ["demo", "--data", "{nan}", "--out", "{out}", "--quiet"], "NaN or infinite"),
    ("npy-1d", ["demo", "--data", "{oned}", "--out", "{out}", "--quiet"], "N x D"),
    ("npy-1-column", ["demo", "--data", "{narrow}", "--out", "{out}", "--quiet"], "at least 2 dimensions"),
    ("npy-strings", ["demo", "--data", "{strings}", "--out", "{out}", "--quiet"], "numeric"),
    ("npy-too-few", ["demo", "--data", "{few}", "--out", "{out}", "--quiet"], "at least"),
    ("npy-identical", [*TRAIN, "--data", "{same}", "--out", "{out}"], "all points identical"),
    ("npy-outlier-1e30", ["demo", "--data", "{far30}", "--out", "{out}", "--quiet"], "1 of 200 points lie more than"),
    ("npy-outlier-1e200", [*TRAIN, "--data", "{far200}", "--out", "{out}"], "1 of 200 points lie more than"),
    ("npy-overflow-allowed", [*TRAIN, "--data", "{far200}", "--allow-outliers", "--out", "{out}"], "overflows"),
    ("data-and-dataset", ["demo", "--data", "{nan}", "--dataset", "moons", "--out", "{out}", "--quiet"], "not both"),
    ("dataset-unknown", ["demo", "--dataset", "nosuch", "--out", "{out}", "--quiet"], "unknown dataset"),
    # -- flags -------------------------------------------------------------------------------------------
    ("steps-0", ["demo", "--steps", "0", "--out", "{out}", "--quiet"], "between 1 and"),
    ("steps-words", ["demo", "--steps", "two", "--out", "{out}", "--quiet"], "comma-separated"),
    ("steps-duplicate", ["demo", "--steps", "2,2", "--out", "{out}", "--quiet"], "duplicates"),
    ("steps-vs-windows", ["demo", "--steps", "3", "--out", "{out}", "--quiet"], "does not reach 3 windows"),
    ("train-steps-vs-windows", [*TRAIN, "--steps", "3", "--out", "{out}"], "does not reach 3 windows"),
    ("budget-0", ["demo", "--budget", "0", "--out", "{out}", "--quiet"], "budget_steps must be"),
    ("base-steps-0", [*TRAIN, "--base-steps", "0", "--out", "{out}"], "base.steps (--base-steps) must be >= 1"),
    ("base-steps-negative", ["demo", "--base-steps", "-5", "--out", "{out}", "--quiet"], "must be >= 1, got -5"),
    ("method-typo", [*TRAIN, "--method", "proreflw", "--out", "{out}"], "did you mean 'proreflow'"),
    ("method-teacher", [*TRAIN, "--method", "teacher-euler", "--out", "{out}"], "nothing to train"),
    ("resume-word", [*TRAIN, "--resume", "first", "--out", "{out}"], "--resume takes 'latest'"),
    ("resume-nothing", [*TRAIN, "--resume", "latest", "--out", "{out}"], "no run to resume"),
    ("cached-pairs-negative", [*TRAIN, "--cached-pairs", "-1", "--out", "{out}"], "--cached-pairs must be >= 0"),
    ("checkpoint-every-0", [*TRAIN, "--checkpoint-every", "0", "--out", "{out}"], "checkpoint interval"),
    ("keep-0", [*TRAIN, "--keep", "0", "--out", "{out}"], "at least 1 checkpoint"),
    ("time-sampling-word", ["demo", "--time-sampling", "middle", "--out", "{out}", "--quiet"],
     "--time-sampling must be uniform, start, mixture or mixture:P"),
    ("time-sampling-fraction", [*TRAIN, "--time-sampling", "mixture:1.5", "--out", "{out}"],
     "start_fraction must be in [0, 1]"),
    ("seed-huge-demo", ["demo", "--seed", SEED, "--out", "{out}", "--quiet"], "--seed must be between 0 and"),
    ("seed-huge-train", [*TRAIN, "--seed", SEED, "--out", "{out}"], "--seed must be between 0 and"),
    ("seed-negative-train", [*TRAIN, "--seed", "-1", "--out", "{out}"], "--seed must be between 0 and"),
    ("seed-huge-distill", ["distill", "--data", "{images}", "--seed", SEED, "--out", "{out}", "--quiet"],
     "--seed must be between 0 and"),
    ("seed-huge-evaluate", ["evaluate", "--model", "{tmp}/m", "--seed", SEED, "--out", "{out}", "--quiet"],
     "--seed must be between 0 and"),
    ("guidance-nan-sample", ["sample", "--model", "{tmp}/m", "--prompt", "a cat", "--guidance", "nan", "--out", "{out}"],
     "--guidance must be a finite number"),
    # step counts past one per training timestep: 1e12 grew memory by 1 GB every 5 s (sample) or hung (evaluate)
    ("steps-huge-sample", ["sample", "--model", "{tmp}/m", "--prompt", "a cat", "--steps", "1000000000000", "--out",
                           "{out}"], "--steps must be between 1 and 1000"),
    ("steps-huge-evaluate", ["evaluate", "--model", "{tmp}/m", "--steps", "1000000000000", "--no-fid", "--no-clip",
                             "--out", "{out}", "--quiet"], "steps must be between 1 and 1000"),
    # NaN / inf scheduler settings sampled black images that were then scored (issue 26)
    ("scheduler-setting-nan", ["evaluate", "--model", "{tmp}/m", "--scheduler", "ddim", "--scheduler-setting",
                               "beta_start=.nan", "--no-fid", "--no-clip", "--out", "{out}", "--quiet"], "must be finite"),
    ("scheduler-setting-beta-negative", ["evaluate", "--model", "{tmp}/m", "--scheduler", "ddim", "--scheduler-setting",
                                         "beta_end=-0.01", "--no-fid", "--no-clip", "--out", "{out}", "--quiet"],
     "must be in (0, 1)"),
    ("suite-override-inf", ["evaluate", "--suite", "{infsuite}", "--out", "{out}", "--quiet"], "must be finite"),
    ("guidance-nan-evaluate", ["evaluate", "--model", "{tmp}/m", "--guidance", "nan", "--out", "{out}", "--quiet"],
     "--guidance takes comma-separated finite numbers"),
    # -- usage errors: click's own, in our one-line form ---------------------------------------------------
    ("usage-not-an-integer", ["train", "--steps", "abc", "--out", "{out}"], "Invalid value for '--steps'"),
    ("usage-unknown-flag", ["train", "--nosuch", "--out", "{out}"], "No such option: --nosuch"),
    ("usage-missing-out", ["train", "--method", "perflow"], "Missing option '--out'"),
    # -- configs (every nested value checked when the file is read) -----------------------------------------
    ("config-missing", ["demo", "--config", "{tmp}/nope.yaml", "--out", "{out}", "--quiet"], "does not exist"),
    ("config-folder", [*TRAIN, "--config", "{tmp}", "--out", "{out}"], "is a folder"),
    ("config-binary-demo", ["demo", "--config", "{binary}", "--out", "{out}", "--quiet"], "is not UTF-8 text"),
    ("config-binary-train", [*TRAIN, "--config", "{binary}", "--out", "{out}"], "is not UTF-8 text"),
    ("config-binary-run", ["run", "{binary}", "--out", "{out}", "--quiet"], "is not UTF-8 text"),
    ("config-binary-suite", ["evaluate", "--suite", "{binary}", "--out", "{out}", "--quiet"], "is not UTF-8 text"),
    ("config-unknown-key", ["demo", "--config", "{badkey}", "--out", "{out}", "--quiet"], "did you mean 'budget_steps'"),
    ("config-wrong-type", ["demo", "--config", "{badtype}", "--out", "{out}", "--quiet"], "train.lr must be a number"),
    ("config-not-yaml", ["demo", "--config", "{badyaml}", "--out", "{out}", "--quiet"], "not valid YAML"),
    ("config-margin", ["demo", "--config", "{badmargin}", "--out", "{out}", "--quiet"],
     "margin (window_margin) must be in [0, 1)"),
    ("config-solver-steps", ["demo", "--config", "{badsolver}", "--out", "{out}", "--quiet"],
     "solver steps must be a positive integer"),
    ("config-gmm-no-modes", ["demo", "--config", "{nomodes}", "--out", "{out}", "--quiet"], "gmm needs n_modes >= 1"),
    ("config-gmm-std-0", [*TRAIN, "--config", "{std0}", "--out", "{out}"], "a finite std > 0"),
    ("config-lam-nan", ["demo", "--config", "{nanlam}", "--out", "{out}", "--quiet"], "lam must be a finite number"),
    ("config-lr-inf", [*TRAIN, "--config", "{inflr}", "--out", "{out}"], "train.lr must be a finite number"),
    ("config-hidden-0", [*TRAIN, "--config", "{hidden0}", "--out", "{out}"], "model needs hidden in [1, 65536]"),
    ("config-hidden-huge", [*TRAIN, "--config", "{hidden9}", "--out", "{out}"], "model needs hidden in [1, 65536]"),
    ("config-train-points-huge", ["demo", "--config", "{points9}", "--out", "{out}", "--quiet"],
     "train_points must be in [2, 1e7]"),
    ("config-base-lr-negative", [*TRAIN, "--config", "{baselr}", "--out", "{out}"], "base.lr must be a positive number"),
    ("config-eval-solver", [*TRAIN, "--config", "{evalsolver}", "--out", "{out}"], "unknown ODE solver 'midpoint'"),
    # nested YAML aliases: nine levels hung with no output, five printed a 481 KB error line (issue 26)
    ("config-alias-bomb-9", ["demo", "--config", "{bomb9}", "--out", "{out}", "--quiet"], "expands to more than"),
    ("config-alias-bomb-5-run", ["run", "{bomb5}", "--out", "{out}", "--quiet"], "expands to more than"),
    ("config-alias-bomb-5-distill", ["distill", "--preset", "{bomb5}", "--data", "{images}", "--out", "{out}",
                                     "--quiet"], "expands to more than"),
    ("config-eval-reference-0", [*TRAIN, "--config", "{evalref0}", "--out", "{out}"],
     "solver steps must be a positive integer, got 0"),
    ("run-steps-vs-windows", ["run", "{digits3}", "--out", "{out}", "--quiet"], "does not reach 3 windows"),
    ("run-beta-schedule", ["run", "{betafoo}", "--out", "{out}", "--quiet"], "vp.beta_schedule must be one of"),
    ("run-unet-groups-0", ["run", "{groups0}", "--out", "{out}", "--quiet"], "norm_num_groups must be >= 1"),
    ("distill-resolution-huge", ["distill", "--data", "{images}", "--resolution", "1000000", "--out", "{tmp}/new",
                                 "--quiet"], "resolution must be a multiple of 8 in [8, 4096]"),
    ("sample-height-huge", ["sample", "--model", "{tmp}/m", "--prompt", "a cat", "--height", "65536",
                            "--out", "{tmp}/png"], "--height must be a positive multiple of 8 up to 4096"),
    ("suite-later-row-steps", ["evaluate", "--suite", "{suitesteps}", "--out", "{tmp}/ev", "--quiet"],
     "run 'b': 3 sampling steps cannot cross 2 windows"),
    ("suite-later-row-missing", ["evaluate", "--suite", "{suitemissing}", "--out", "{tmp}/ev", "--quiet"],
     "does not exist"),
    # a later row that exists but cannot load: refused before the first row's folder is written
    ("suite-later-row-not-pipeline", ["evaluate", "--suite", "{suitenotpipe}", "--out", "{tmp}/ev", "--quiet"],
     "is not a diffusers pipeline folder"),
    ("suite-later-row-hub-uncached", ["evaluate", "--suite", "{suitehub}", "--out", "{tmp}/ev", "--quiet"],
     "no such local folder, and the hub gave"),
    ("suite-later-row-bad-weights", ["evaluate", "--suite", "{suiteweights}", "--out", "{tmp}/ev", "--quiet"],
     "not a readable safetensors file"),
    ("evaluate-resolution-huge", ["evaluate", "--model", "{tmp}/m", "--no-fid", "--no-clip", "--resolution",
                                  "100000", "--out", "{tmp}/ev", "--quiet"], "resolution must be a multiple of 8 in"),
    ("evaluate-num-images-huge", ["evaluate", "--model", "{tmp}/m", "--no-fid", "--no-clip", "--num-images",
                                  "1000000000", "--out", "{tmp}/ev", "--quiet"], "num_images must be in [1, 1e6]"),
    ("run-classifier-steps", ["run", "{cls3}", "--out", "{out}", "--quiet"], "classifier_steps must be in [1, 1e7]"),
    # a UNet too deep for the image size failed when built, after the teacher cache was written
    ("run-unet-too-deep", ["run", "{deep}", "--out", "{out}", "--quiet"], "is not divisible by 2^5 for 6 UNet blocks"),
    ("run-unet-too-wide", ["run", "{wide}", "--out", "{out}", "--quiet"], "unet widths must be <= 1024"),
    # a second benchmark with another preset used to replace the first one's results.json without a word
    ("run-over-other-results", ["run", "digits-smoke", "--out", "{digitsout}", "--quiet"],
     "holds the digits benchmark's results made with other settings (seeds: [9] -> [0, 1])"),
    ("run-seed-negative", ["run", "{seedneg}", "--out", "{out}", "--quiet"], "seeds must be in [0, 2**31 - 1]"),
    ("run-samples-huge", ["run", "{samples9}", "--out", "{out}", "--quiet"], "samples must be <= 100000"),
    # -- output locations that cannot be written ---------------------------------------------------------------
    ("out-is-file-demo", ["demo", "--out", "{file}", "--quiet"], "exists and is not a folder"),
    ("out-is-file-train", [*TRAIN, "--out", "{file}"], "exists and is not a folder"),
    ("out-under-file-train", [*TRAIN, "--out", "{file}/run"], "is a file, not a folder"),
    ("out-under-proc-demo", ["demo", "--out", "/proc/proreflow-test/out", "--quiet"], "cannot be written"),
    ("out-is-file-run", ["run", "digits-smoke", "--out", "{file}", "--quiet"], "exists and is not a folder"),
    ("out-is-file-distill", ["distill", "--data", "{images}", "--out", "{file}", "--quiet"], "exists and is not a folder"),
    ("out-under-file-sample", ["sample", "--model", "{tmp}/m", "--prompt", "a cat", "--out", "{file}/png"],
     "is a file, not a folder"),
    ("out-is-file-evaluate", ["evaluate", "--model", "{tmp}/m", "--no-fid", "--no-clip", "--out", "{file}", "--quiet"], "exists and is not a folder"),
    # -- distillation data --------------------------------------------------------------------------------------
    ("distill-resume-nothing", ["distill", "--data", "{images}", "--resume", "latest", "--out", "{out}", "--quiet"],
     "holds no run to resume"),
    ("distill-caption-not-utf8", ["distill", "--data", "{badcaption}", "--out", "{tmp}/new", "--quiet"],
     "is not UTF-8 text"),
    ("distill-bad-tar", ["distill", "--data", "{badtar}", "--out", "{tmp}/new", "--quiet"], "not a tar archive"),
    ("distill-prompts-folder", ["distill", "--prompts", "{tmp}", "--out", "{tmp}/new", "--quiet"], "is a folder"),
    # -- refused before any file is written (issue 26 item 6), and a second demo (item 3) -------------------------------
    ("distill-adamw8bit-no-bnb", ["distill", "--preset", "{adam8}", "--data", "{images}", "--out", "{tmp}/new",
                                  "--quiet"], "needs bitsandbytes"),
    ("train-adamw8bit-no-bnb", [*TRAIN, "--config", "{adam8}", "--out", "{tmp}/new"], "needs bitsandbytes"),
    ("run-adamw8bit-no-bnb", ["run", "{adam8}", "--out", "{tmp}/new", "--quiet"], "needs bitsandbytes"),
    ("demo-over-results", ["demo", "--out", "{out}", "--quiet"], "already holds a demo's results"),
    ("distill-report-to", ["distill", "--data", "{images}", "--report-to", "mlflow", "--out", "{tmp}/new", "--quiet"],
     "--report-to must be one of"),
    ("train-validate-every", [*TRAIN, "--validate-every", "-2", "--out", "{tmp}/new"], "validate-every must be"),
    # -- resuming a damaged run -------------------------------------------------------------------------------------
    ("resume-run-json-truncated", RESUME, "the run's settings"),
    ("resume-run-json-not-object", RESUME, "not a JSON object"),
    ("resume-final-bit-flip", RESUME, "does not match its checksum"),
    ("resume-final-json-keys", RESUME, "final.json does not match its checksum"),
    ("resume-final-truncated", RESUME, "does not match its checksum"),
    ("resume-checksums-missing", RESUME, "has no final.checksums.json"),
]


def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under root with a digest of its bytes."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def _npy(path: Path, arr) -> str:
    np.save(path, arr, allow_pickle=True)
    return str(path)


def _files(tmp: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    f = {"tmp": str(tmp)}
    pts = rng.normal(size=(200, 2))
    far30, far200 = pts.copy(), pts.copy()
    far30[7] = 1e30
    far200[7] = 1e200
    f.update(garbage=str(tmp / "garbage.npy"), text=str(tmp / "text.npy"),
             nan=_npy(tmp / "nan.npy", np.array([[np.nan, 1.0]] * 50)), oned=_npy(tmp / "oned.npy", rng.normal(size=100)),
             narrow=_npy(tmp / "narrow.npy", rng.normal(size=(100, 1))),
             strings=_npy(tmp / "strings.npy", np.array([["a", "b"]] * 50)),
             pickled=_npy(tmp / "pickled.npy", np.array([{"a": 1}] * 30, dtype=object)),
             few=_npy(tmp / "few.npy", rng.normal(size=(5, 2))), same=_npy(tmp / "same.npy", np.ones((50, 2))),
             far30=_npy(tmp / "far30.npy", far30), far200=_npy(tmp / "far200.npy", far200))
    (tmp / "garbage.npy").write_bytes(b"not an npy file")
    (tmp / "text.npy").write_text("1.0, 2.0\n3.0, 4.0\n")
    yamls = {"badkey": "budget_step: 10\n", "badtype": "train: {lr: fast}\n", "badyaml": "train: [\n",
             "badmargin": "time_sampling: {margin: 1.5}\n", "badsolver": "teacher_solver: {steps: 0}\n",
             "nomodes": "gmm: {n_modes: 0}\n", "std0": "gmm: {std: 0}\n", "nanlam": "methods: [{name: p, lam: .nan}]\n",
             "inflr": "train: {lr: .inf}\n", "hidden0": "model: {hidden: 0}\n",
             "hidden9": "model: {hidden: 1000000000}\n", "points9": "train_points: 1000000000000\n", "baselr": "base: {lr: -1}\n",
             "evalsolver": "eval: {reference_solver: midpoint}\n", "evalref0": "eval: {reference_steps: 0}\n",
             "digits3": "steps: [3]\ntable_steps: 3\n", "betafoo": "vp: {beta_schedule: foo}\n",
             "groups0": "unet: {norm_num_groups: 0}\n", "adam8": "train: {optimizer: adamw8bit}\n",
             "cls3": "classifier_steps: -3\n", "deep": "unet: {block_out_channels: [8, 8, 8, 8, 8, 8]}\n",
             "wide": "unet: {block_out_channels: [8, 1000000]}\n", "seedneg": "seeds: [-1]\n", "samples9": "eval: {samples: 1000000000}\n",
             "infsuite": "eval: {captions: prompts, prompts: p.txt, fid: false, clip: false}\nruns:\n"
                         "  - {name: t, model: m, scheduler: ddim, scheduler_overrides: {beta_start: .inf}}\n"}
    for levels in (5, 9):  # each level a list of ten aliases of the one above: 10^levels values
        rows = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
        rows += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
        yamls[f"bomb{levels}"] = "\n".join(rows) + "\n"
    for key, text in yamls.items():
        (tmp / f"{key}.yaml").write_text(text)
        f[key] = str(tmp / f"{key}.yaml")
    (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage\x80")
    f["binary"] = str(tmp / "binary.yaml")
    (tmp / "digitsout").mkdir()  # a finished digits run of another preset (only its recorded config matters)
    from dataclasses import asdict

    from proreflow.apps.digits import load_digits_config

    other = {**json.loads(json.dumps(asdict(load_digits_config("digits-smoke")), default=str)), "seeds": [9]}
    (tmp / "digitsout" / "results.json").write_text(json.dumps({"config": other}))
    f["digitsout"] = str(tmp / "digitsout")
    (tmp / "a-file").write_text("not a folder")
    f["file"] = str(tmp / "a-file")
    from PIL import Image

    for name, caption in (("images", "a red square".encode()), ("badcaption", b"\xff\xfe caption \x80")):
        (tmp / name).mkdir()
        Image.new("RGB", (16, 16), (200, 0, 0)).save(tmp / name / "0.png")
        (tmp / name / "0.txt").write_bytes(caption)
        f[name] = str(tmp / name)
    (tmp / "bad.tar").write_bytes(b"this is not a tar archive" * 40)
    f["badtar"] = str(tmp / "bad.tar")
    (tmp / "student").mkdir()  # what evaluate's pre-flight reads of a student: a pipeline index and its windows
    (tmp / "student" / "model_index.json").write_text("{}")
    (tmp / "student" / "proreflow.json").write_text('{"windows": [1.0, 0.5, 0.0]}')
    (tmp / "not-a-pipeline").mkdir()
    (tmp / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": {\"dtype")
    suite = "eval: {captions: prompts, prompts: p.txt, fid: false, clip: false}\nruns:\n"
    for key, later in (("suitesteps", f"{{name: b, model: {tmp}/student, steps: 3}}"),
                       ("suitemissing", f"{{name: b, model: {tmp}/no-such-model, steps: 2}}"),
                       ("suitenotpipe", f"{{name: b, model: {tmp}/not-a-pipeline, steps: 2}}"),
                       ("suitehub", "{name: b, model: nobody-here/no-such-model, steps: 2}"),
                       ("suiteweights", f"{{name: b, model: {tmp}/student, steps: 2, "
                                        f"unet_weights: {tmp}/cut.safetensors}}")):
        (tmp / f"{key}.yaml").write_text(suite + f"  - {{name: a, model: {tmp}/student, steps: 2}}\n  - {later}\n")
        f[key] = str(tmp / f"{key}.yaml")
    return f


@pytest.fixture(scope="module")
def finished_run(finished_train) -> Path:
    """A finished `train` run (final weights per stage, no step checkpoints), for the resume rows to damage."""
    return finished_train("finished", RUN_ARGS)


def _damage(run: Path, row: str) -> None:
    """Leave `run` as if killed after its base fit, then break what `row` names."""
    (run / "student.safetensors").unlink()
    (run / "metrics.json").unlink()
    shutil.rmtree(run / "checkpoints" / "stage-1")
    base = run / "checkpoints" / "base"
    if row == "resume-run-json-truncated":
        (run / "run.json").write_text((run / "run.json").read_text()[:40])
    elif row == "resume-run-json-not-object":
        (run / "run.json").write_text("[1, 2]")
    elif row == "resume-final-bit-flip":
        data = bytearray((base / "final.safetensors").read_bytes())
        data[-3] ^= 0x10  # one bit of the last tensor's data
        (base / "final.safetensors").write_bytes(bytes(data))
    elif row == "resume-final-json-keys":
        (base / "final.json").write_text(json.dumps({"nonsense": 1}))
    elif row == "resume-final-truncated":
        data = (base / "final.safetensors").read_bytes()
        (base / "final.safetensors").write_bytes(data[: len(data) // 2])
    elif row == "resume-checksums-missing":
        (base / "final.checksums.json").unlink()


@pytest.mark.parametrize("row, args, needle", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_with_one_error_line_and_changes_no_file(tmp_path, row, args, needle, request):
    files = _files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("earlier results")
    files["out"] = str(out)
    if "{run}" in args:
        run = tmp_path / "run"
        shutil.copytree(request.getfixturevalue("finished_run"), run)
        _damage(run, row)
        files["run"] = str(run)
    before = _tree(tmp_path)
    result = runner.invoke(app, [a.format(**files) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert _tree(tmp_path) == before  # nothing written, nothing removed


def test_the_table_covers_every_item_of_the_reliability_promise():
    """At least 40 rows, unique ids (docs/reliability.md quotes the count)."""
    ids = [r[0] for r in ROWS]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)

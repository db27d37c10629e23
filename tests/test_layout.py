"""The layout is the architecture (docs/design.md §3): a module imports only modules of its own layer or
below, applications do not lean on each other, and no source file grows past about 400 lines."""

import ast
from pathlib import Path

import proreflow

ROOT = Path(proreflow.__file__).parent
#: layer of each top-level module or package; a module may import its own layer and those below
LAYERS = {
    "accel": 0, "errors": 0, "cond": 0, "config": 0, "store": 0, "conventions": 0, "run_lock": 0, "limits": 0, "run_settings": 0,
    "windows": 1, "time_sampling": 1, "losses": 1, "solvers": 1, "sampling": 1, "pairs": 1, "methods": 1,
    "fields": 2, "models": 2, "data": 2, "schedulers": 2, "metrics": 2, "metrics_images": 2, "metrics_classifier": 2, "analysis": 2,
    "plotting": 2,
    "training": 3,
    "apps": 4,
    "cli": 5, "cli_minisd": 5, "cli_evaluate": 5, "cli_quiet": 5,
}
#: the only application that uses another one: evaluation loads the pipelines `sd` exports
APP_USES = {"coco_eval": {"sd"}}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in ROOT.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proreflow."):
            found.add(node.module[len("proreflow."):])
        elif isinstance(node, ast.ImportFrom) and node.module == "proreflow":
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name[len("proreflow."):] for a in node.names if a.name.startswith("proreflow."))
    return found


def test_every_module_has_a_layer_and_imports_none_above_it():
    wrong = []
    for name, path in _modules().items():
        if name == "__init__":  # the package facade re-exports the public API
            continue
        top = name.split(".")[0]
        assert top in LAYERS, f"{name}: give it a layer in LAYERS (and docs/design.md §3)"
        for dep in _imports(path):
            if LAYERS[dep.split(".")[0]] > LAYERS[top]:
                wrong.append(f"{name} imports {dep}")
    assert not wrong, wrong


def test_applications_are_independent():
    wrong = []
    for name, path in _modules().items():
        parts = name.split(".")
        if parts[0] != "apps" or len(parts) < 2 or parts[1] == "__init__":
            continue
        for dep in _imports(path):
            dparts = dep.split(".")
            if dparts[0] == "apps" and len(dparts) > 1 and dparts[1] != parts[1] \
                    and dparts[1] not in APP_USES.get(parts[1], set()):
                wrong.append(f"{name} imports {dep}")
    assert not wrong, wrong


def test_no_source_file_is_over_400_lines():
    long = {name: n for name, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_algorithm_core_imports_no_training_cli_or_diffusers_code():
    for name in ("conventions", "windows", "time_sampling", "losses", "solvers", "sampling", "pairs", "methods"):
        text = (ROOT / f"{name}.py").read_text()
        assert "import diffusers" not in text and "from diffusers" not in text, name
        assert not {d.split(".")[0] for d in _imports(ROOT / f"{name}.py")} & {"training", "apps", "cli"}, name


def test_conditioning_helpers_are_imported_from_cond_not_from_pairs():
    helpers = {"map_cond", "take", "to_device", "flatten_cond", "unflatten_cond"}
    wrong = []
    for path in [*ROOT.rglob("*.py"), *(ROOT.parent.parent / "tests").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "proreflow.pairs":
                wrong += [f"{path.name}: {a.name}" for a in node.names if a.name in helpers]
    assert not wrong, wrong


def test_sd_data_preparation_does_not_import_training():
    """Encoding and streaming latents need the process state (devices, process count), not the training package."""
    for name in ("encode", "stream"):
        deps = _imports(ROOT / "apps" / "sd" / f"{name}.py")
        assert not [d for d in deps if d.split(".")[0] == "training"], (name, deps)


def test_the_vp_flow_algebra_is_written_only_in_conventions():
    """`alpha + sigma` (the change of coordinates between a diffusion and our flow) as code, not prose, appears
    only in conventions.py: fields and schedulers call `flow_of_vp`, `vp_of_flow`, `flow_time`, `flow_scale`."""
    pairs = {frozenset(p) for p in (("alpha", "sigma"), ("a", "s"))}
    wrong = []
    for path in [*(ROOT / "fields").rglob("*.py"), *(ROOT / "schedulers").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) \
                    and isinstance(node.left, ast.Name) and isinstance(node.right, ast.Name) \
                    and frozenset((node.left.id, node.right.id)) in pairs:
                wrong.append(f"{path.name}:{node.lineno}")
    assert not wrong, wrong

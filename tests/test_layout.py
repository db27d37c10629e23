"""The layout is the architecture (docs/design.md §3): a module imports only modules of its own layer or
below, applications do not lean on each other, and no source file grows past about 400 lines."""

import ast
import re
from pathlib import Path

import pytest

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


#: what asks "which kind of pipeline is this?": only `fields/families/` may (the tiny builders and the mini SD
#: teacher build pipelines of a known kind)
_FAMILY_ATTRS = {"transformer", "unet", "text_encoder_2", "text_encoder_3", "tokenizer_2", "tokenizer_3"}
_FAMILY_CLASS = re.compile(r"(Pipeline|Transformer2DModel|UNet2DConditionModel)$")
_FAMILY_TEXT = re.compile(r"StableDiffusion|Flux|SD3|XL")
_FAMILY_EXEMPT = ("fields/families/", "models/sd_shapes.py", "apps/minisd/")


def family_checks(source: str) -> list[str]:
    """Each place in `source` that asks what kind of pipeline it has: isinstance/issubclass on a pipeline or
    denoiser class, getattr/hasattr or `pipe.<attr>` on a family's parts, a comparison with a family's name, or a
    call of the old `is_sd3` / `is_sdxl` / `is_flow_matching`."""
    found = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
            if n.func.id in ("isinstance", "issubclass") and len(n.args) == 2:
                kinds = n.args[1].elts if isinstance(n.args[1], ast.Tuple) else [n.args[1]]
                names = [k.id if isinstance(k, ast.Name) else getattr(k, "attr", "") for k in kinds]
                if any(_FAMILY_CLASS.search(x) for x in names):
                    found.append(f"{n.lineno}: {n.func.id} {names}")
            if n.func.id in ("getattr", "hasattr") and len(n.args) >= 2 and isinstance(n.args[1], ast.Constant) \
                    and n.args[1].value in _FAMILY_ATTRS:
                found.append(f"{n.lineno}: {n.func.id} {n.args[1].value!r}")
            if n.func.id in ("is_sd3", "is_sdxl", "is_flow_matching"):
                found.append(f"{n.lineno}: {n.func.id}()")
        if isinstance(n, ast.Attribute) and n.attr in _FAMILY_ATTRS and isinstance(n.value, ast.Name) \
                and n.value.id in ("pipe", "pipeline", "loaded"):
            found.append(f"{n.lineno}: {n.value.id}.{n.attr}")
        if isinstance(n, ast.Compare) and any(isinstance(c, ast.Constant) and isinstance(c.value, str)
                                              and _FAMILY_TEXT.search(c.value) for c in [n.left, *n.comparators]):
            found.append(f"{n.lineno}: compares with a family name")
    return found


def test_no_pipeline_family_checks_outside_fields_families():
    wrong = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith(_FAMILY_EXEMPT) and (hits := family_checks(path.read_text())):
            wrong[rel] = hits
    assert not wrong, f"ask fields.families.family_of(pipe) instead: {wrong}"


@pytest.mark.parametrize("snippet", [
    "isinstance(pipe, StableDiffusionXLPipeline)", "isinstance(m, (nn.Linear, diffusers.FluxTransformer2DModel))",
    "getattr(pipe, 'transformer', None)", "hasattr(p, 'text_encoder_2')", "x = pipe.unet",
    "if name == 'StableDiffusion3Pipeline': pass", "'XL' in cls_name", "is_sdxl(pipe)"])
def test_the_family_rule_sees_each_kind_of_check(snippet):
    assert family_checks(snippet), snippet
    assert not family_checks("isinstance(x, torch.Tensor); getattr(cfg, 'lr'); self.unet; c.unet")


def test_pairs_sees_teachers_through_the_protocol_only():
    """No lambda and no getattr in pairs.py: every teacher is a `conventions.Teacher` (`as_teacher` adapts plain
    functions once, at the entry)."""
    tree = ast.parse((ROOT / "pairs.py").read_text())
    assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Lambda)]
    assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                and n.func.id in ("getattr", "hasattr")]

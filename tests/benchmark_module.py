"""Import a script of benchmarks/ in tests, or skip where the tests run without it (mutmut's copy of the tests)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as module `name`, with benchmarks/ importable (the scripts import each other) and the
    module registered before it runs (its dataclasses look their module up)."""
    path = BENCH / f"{name}.py"
    if not path.is_file():
        pytest.skip(f"benchmarks/{name}.py is not beside these tests")
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

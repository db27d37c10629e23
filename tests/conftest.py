import os

import pytest
import torch
from tiny_sd import caption_folder, tiny_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny random-weight SD pipeline saved as a diffusers folder (the teacher of the distill tests)."""
    root = tmp_path_factory.mktemp("sd")
    tiny_pipeline(root / "parts").save_pretrained(root / "teacher")
    return root / "teacher"


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Six captioned images of an odd size (centre crop and resize are exercised)."""
    return caption_folder(tmp_path_factory.mktemp("images"), size=(20, 24))


@pytest.fixture(scope="session")
def finished_train(tmp_path_factory):
    """`finished_train(name, args)`: the folder of a finished `proreflow train <args>` run, which tests copy and
    damage or cut short."""
    from typer.testing import CliRunner

    from proreflow.cli import app

    def run(name: str, args: list[str]):
        out = tmp_path_factory.mktemp(name) / "run"
        result = CliRunner().invoke(app, [*args, "--out", str(out)])
        assert result.exit_code == 0, result.output
        return out

    return run

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

"""Optional 8-bit AdamW: the config reaches the optimizer, and a missing bitsandbytes is a clear error."""

import sys
import types

import pytest
import torch

from proreflow.apps.sd import load_distill_config
from proreflow.errors import ProReflowError
from proreflow.training import TrainBatch, TrainConfig, fit, make_optimizer


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x, t, cond=None):
        return self.lin(x)


def _batches(_, gen, rows=slice(None)):
    x = torch.randn(8, 2, generator=gen)
    return TrainBatch(x[rows], torch.rand(8, generator=gen)[rows], -x[rows])


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ProReflowError, match="pip install bitsandbytes"):
        fit(Net(), _batches, 2, TrainConfig(optimizer="adamw8bit", batch_size=8, progress=False))
    with pytest.raises(ProReflowError, match="optimizer must be 'adamw' or 'adamw8bit'"):
        TrainConfig(optimizer="sgd")


def test_adamw8bit_reaches_bitsandbytes_from_a_preset(tmp_path, monkeypatch):
    made = []

    class FakeAdamW8bit(torch.optim.AdamW):  # stands in for bnb.optim.AdamW8bit (CUDA-only) on CPU
        def __init__(self, params, lr, weight_decay):
            made.append((lr, weight_decay))
            super().__init__(params, lr=lr, weight_decay=weight_decay)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=FakeAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    preset = tmp_path / "p.yaml"
    preset.write_text("train: {optimizer: adamw8bit, lr: 2.0e-4, weight_decay: 0.01}\n")
    cfg = load_distill_config(preset)
    assert cfg.train.optimizer == "adamw8bit"
    assert isinstance(make_optimizer(list(torch.nn.Linear(2, 2).parameters()), cfg.train), FakeAdamW8bit)
    res = fit(Net(), _batches, 3, TrainConfig(optimizer="adamw8bit", lr=1e-2, batch_size=8,
                                                              progress=False))
    assert made[-1] == (1e-2, 0.0) and len(res.losses) == 3

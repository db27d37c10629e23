"""Direct tests of the modules that were only reached through larger runs (issue 27): the digits classifier and its
FD feature module, the LoRA student's teacher (adapters switched off), and the guidance-sweep plot. Each against a
reference outside the function: hand-counted accuracy, a copy of the network without adapters, the PNG's pixels."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from proreflow.models.classifier import DigitsClassifier, FeatureExtractor, accuracy, train_classifier


def test_accuracy_counts_argmax_hits_across_batches():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.1, 0.2], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0, 0])  # hits: rows 0, 1 and 4
    assert accuracy(nn.Identity(), logits, y, batch_size=2) == pytest.approx(3 / 5)
    assert accuracy(nn.Identity(), logits[:0], y[:0]) == 0.0


def test_classifier_learns_a_separable_task_deterministically_and_its_features_feed_fd():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, 8, 8, generator=gen) * 0.2
    y = torch.arange(256) % 2
    x[y == 1, :, :4] += 0.8  # class 1: a bright upper half
    a = train_classifier(x, y, steps=120, batch_size=64, lr=5e-3, seed=3, num_classes=2)
    b = train_classifier(x, y, steps=120, batch_size=64, lr=5e-3, seed=3, num_classes=2)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert accuracy(a, x, y) > 0.95
    feats = FeatureExtractor(a)
    assert feats.num_features == a.feature_dim == 64
    assert not any(p.requires_grad for p in feats.parameters()) and not feats.classifier.training
    assert torch.equal(feats(x[:5].double()), a.features(x[:5]))  # float images in, the penultimate layer out
    assert torch.equal(a(x[:5]), a.head(a.features(x[:5])))


def test_adapters_off_is_the_base_network_and_switches_the_adapters_back_on():
    from peft import LoraConfig
    from tiny_sd import tiny_unet

    from proreflow.fields.lora import AdaptersOff
    from proreflow.fields.vp import VPSchedule, VPVelocity
    from diffusers import DDPMScheduler

    schedule = VPSchedule.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                       beta_end=0.012))
    unet = tiny_unet(seed=1).eval()
    base = copy.deepcopy(unet)  # the reference: the same weights, never adapted
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    student = VPVelocity(unet, schedule)
    teacher = AdaptersOff(student, unet)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.3])
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        want = VPVelocity(base, schedule)(x, t, cond)
        adapted = student(x, t, cond)
        assert not torch.allclose(adapted, want, atol=1e-4)  # the adapters do change the output
        assert torch.allclose(teacher(x, t, cond), want, atol=1e-5)
        assert torch.equal(student(x, t, cond), adapted)  # switched back on after the call
    assert teacher.noise_entry == student.noise_entry
    assert [n for n, _ in teacher.named_modules()].count("field.unet") == 1  # no second copy of the network

    class Failing(nn.Module):
        def forward(self, *a):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        AdaptersOff(Failing(), unet)(x, t, cond)
    with torch.no_grad():
        assert torch.equal(student(x, t, cond), adapted)  # back on even after an error


def test_guidance_sweep_plot_draws_one_line_per_group(tmp_path):
    from PIL import Image

    from proreflow.plotting import plot_guidance_sweep

    groups = {"a": [{"guidance": g, "fid": 10 - g, "clip": None} for g in (3.0, 1.0, 2.0)],
              "b": [{"guidance": g, "fid": 5 + g, "clip": 0.3} for g in (1.0, 2.0)]}
    plot_guidance_sweep(groups, [("fid", "FID"), ("clip", "CLIP")], tmp_path / "sweep.png")
    img = np.asarray(Image.open(tmp_path / "sweep.png").convert("RGB"))
    assert img.shape[1] > img.shape[0] > 100  # two panels side by side
    colours = {tuple(c) for c in img.reshape(-1, 3)[::7]}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # matplotlib's first two line colours


def test_cond_helpers_select_rows_and_move_nested_conditioning():
    from proreflow.cond import take, to_device

    cond = {"text": torch.arange(12.0).view(4, 3), "added": {"time_ids": torch.arange(4.0)}, "none": None}
    rows = take(cond, torch.tensor([3, 0]))
    assert rows["text"].tolist() == [[9.0, 10.0, 11.0], [0.0, 1.0, 2.0]]
    assert rows["added"]["time_ids"].tolist() == [3.0, 0.0] and rows["none"] is None
    assert take(cond, slice(1, 3))["added"]["time_ids"].tolist() == [1.0, 2.0]
    assert take(None, slice(0, 1)) is None
    moved = to_device({"a": torch.ones(2, dtype=torch.float64)}, "meta")
    assert moved["a"].device.type == "meta" and moved["a"].dtype == torch.float64


def test_accelerator_follows_the_precision_asked_for_each_time():
    from proreflow.accel import new_accelerator, process_state
    from proreflow.training import make_accelerator, process_state as reexported
    from proreflow.training.config import TrainConfig

    assert reexported is process_state and process_state().device.type == "cpu"
    assert new_accelerator(mixed_precision="bf16").mixed_precision == "bf16"
    # a second precision in the same process is taken, not refused (accelerate keeps one state per process)
    acc = make_accelerator(TrainConfig(mixed_precision="no", grad_accum=3))
    assert acc.mixed_precision == "no" and acc.gradient_accumulation_steps == 3


def test_every_field_is_a_teacher_and_cache_keys_keep_their_values(tmp_path):
    """Each field implements `conventions.Teacher`; plain functions and networks are adapted. The fingerprints a
    pair cache is keyed by are the digests of the same weights as before the protocol: the field module itself,
    or a `NetworkTeacher`'s network (`store.module_digest`, written out here), None for analytic teachers."""
    from proreflow.conventions import PURE_NOISE, Teacher, as_teacher
    from proreflow.fields import AdaptersOff, FlowVelocity, NetworkTeacher, VPSchedule, VPVelocity
    from proreflow.fields.gmm import ExactTeacher, GaussianMixture
    from proreflow.models.mlp import VelocityMLP
    from proreflow.models.sd_shapes import tiny_unet
    from proreflow.pairs import Chunked, PairCache, TeacherSolver
    from proreflow.store import module_digest
    from proreflow.windows import WindowSchedule

    gmm = GaussianMixture.ring(4, 2.0, 0.3)
    unet = tiny_unet()
    vp = VPVelocity(unet, VPSchedule(torch.linspace(0.99, 0.01, 50)))
    mlp = VelocityMLP(2, 8, 2)
    fields = [ExactTeacher(gmm), NetworkTeacher(mlp), vp, FlowVelocity(unet), AdaptersOff(vp, unet)]
    assert all(isinstance(f, Teacher) for f in fields)
    assert [f.fingerprint() for f in fields] == [None, module_digest(mlp, "frozen")[:16],
                                                 *[module_digest(m, "frozen")[:16] for m in fields[2:]]]
    assert vp.noise_entry.t < 1 and AdaptersOff(vp, unet).noise_entry == vp.noise_entry
    assert FlowVelocity(unet).noise_entry == PURE_NOISE
    assert as_teacher(mlp).fingerprint() == module_digest(mlp, "frozen")[:16]
    assert as_teacher(lambda x, t, c=None: x).fingerprint() is None and as_teacher(gmm).fingerprint() is None
    with pytest.raises(Exception, match="callable"):
        as_teacher(3)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    t = torch.full((5,), 0.5)
    assert torch.equal(Chunked(ExactTeacher(gmm), 2)(x, t), gmm.velocity(x.double(), t.double()).float())
    spec = PairCache.spec(WindowSchedule.uniform(2), TeacherSolver("euler", 2), 8, 4, 0, NetworkTeacher(mlp))
    assert spec["teacher"] == module_digest(mlp, "frozen")[:16] and "noise_entry" not in spec


def test_conditioning_meets_the_network_by_its_signature():
    """Keys the forward names go as keywords, the rest into `added_cond_kwargs` where the forward takes it (SDXL's
    text_embeds / time_ids), else a clear error; `uncond` never reaches the network."""
    from proreflow.errors import ProReflowError
    from proreflow.fields.network import network_kwargs

    class UNetLike(nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None):
            return sample

    class Plain(nn.Module):
        def forward(self, x, t, class_labels=None):
            return x

    class Anything(nn.Module):
        def forward(self, x, t, **kwargs):
            return x

    e, te, ti = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    got = network_kwargs(UNetLike(), {"encoder_hidden_states": e, "text_embeds": te, "time_ids": ti, "uncond": {}})
    assert set(got) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert got["added_cond_kwargs"] == {"text_embeds": te, "time_ids": ti}
    assert network_kwargs(Plain(), {"class_labels": e}) == {"class_labels": e}
    with pytest.raises(ProReflowError, match="takes no conditioning 'text_embeds'"):
        network_kwargs(Plain(), {"text_embeds": te})
    assert network_kwargs(Anything(), {"whatever": e}) == {"whatever": e}


@pytest.mark.parametrize("before, after, only_device", [
    ("a = (v.to(s.device, s.dtype) for v in x)", "a = (v.to(None, s.dtype) for v in x)", True),
    ("a = (v.to(s.device, s.dtype) for v in x)", "a = (v.to(s.dtype) for v in x)", True),
    ("o = torch.ones(1, dtype=x.dtype, device=x.device)", "o = torch.ones(1, dtype=x.dtype, )", True),
    ("o = torch.ones(1, dtype=x.dtype, device=x.device)", "o = torch.ones(1, device=x.device)", False),
    ("r = self.starts(t.device, t.dtype)[i]", "r = self.starts(t.device, None)[i]", False),
    ("lac = self.log_ac.to(tau.device)", "lac = self.log_ac.to(None)", True),
    ("y = out.to(y.dtype)", "y = out.to(None)", False),
    ("x0 = y - t * v", "x0 = y + t * v", False)])
def test_mutation_report_sets_apart_only_mutants_that_change_a_device_argument(before, after, only_device):
    """benchmarks/mutation.py's rule: such mutants are invisible on one device and are listed, not scored."""
    from benchmark_module import load_benchmark

    module = load_benchmark("mutation")  # skipped in mutmut's copy of the tests, which runs without benchmarks/
    assert module.device_only(f"-    {before}\n+    {after}") is only_device

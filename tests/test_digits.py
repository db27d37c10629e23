"""The digits benchmark: data, FD metric, solver baselines, analyses, and a smoke run of the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from proreflow.analysis import perturb, perturbed_field, velocity_discrepancy
from proreflow.cli import app
from proreflow.data.digits import NULL_CLASS, class_cond, label_dropout, load_digits_images
from proreflow.errors import ProReflowError
from proreflow.methods import MethodSpec
from proreflow.fields.gmm import GaussianMixture
from proreflow.fields.network import FlowVelocity, guided_call
from proreflow.metrics import FrechetDistance
from proreflow.cond import flatten_cond, unflatten_cond
from proreflow.pairs import PairCache, TeacherSolver
from proreflow.schedulers import make_scheduler
from proreflow.schedulers.sample import scheduler_sample
from proreflow.windows import WindowSchedule

runner = CliRunner()


def test_digits_split_is_stratified_deterministic_and_scaled():
    a, b = load_digits_images(seed=0), load_digits_images(seed=0)
    assert a.train_x.shape == (1498, 1, 16, 16) and a.test_x.shape == (299, 1, 16, 16)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert float(a.train_x.min()) == -1.0 and float(a.train_x.max()) == 1.0
    counts = torch.bincount(a.test_y, minlength=10)
    assert int(counts.min()) >= 29 and int(counts.max()) <= 31  # ~1/6 of each class (~180 per class)
    c = load_digits_images(seed=1)
    assert not torch.equal(a.test_y, c.test_y) or not torch.equal(a.test_x, c.test_x)
    with pytest.raises(ProReflowError, match="size"):
        load_digits_images(size=4)


def test_label_dropout_rate_and_cond_layout():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(2000)
    dropped = label_dropout(labels, 0.1, gen)
    rate = float((dropped == NULL_CLASS).float().mean())
    assert abs(rate - 0.1) < 0.01
    assert torch.equal(dropped[dropped != NULL_CLASS], labels[dropped != NULL_CLASS])
    cond = class_cond(labels[:3])
    assert torch.equal(cond["uncond"]["class_labels"], torch.full((3,), NULL_CLASS))


class _Flatten(torch.nn.Module):
    num_features = 6

    def forward(self, x):
        return x.reshape(x.shape[0], -1)[:, :6]


def _frechet_numpy(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_closed_form_and_is_zero_on_itself():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(400, 1, 4, 4, generator=gen, dtype=torch.float64).float()
    fake = (torch.randn(300, 1, 4, 4, generator=gen) * 1.5 + 0.3)
    fd = FrechetDistance(_Flatten(), real, batch_size=128)
    assert fd(real) == pytest.approx(0.0, abs=1e-3)
    expected = _frechet_numpy(real.reshape(400, -1)[:, :6].double().numpy(), fake.reshape(300, -1)[:, :6].double().numpy())
    assert fd(fake) == pytest.approx(expected, rel=1e-3)
    assert fd(fake) == pytest.approx(expected, rel=1e-3)  # repeated calls reset the generated set
    with pytest.raises(ProReflowError, match="shape"):
        fd(torch.randn(10, 1, 5, 5))


def _point_mass_nets(c: torch.Tensor, alphas_cumprod: torch.Tensor):
    def eps_net(x, t, **_):
        ac = alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        return (x - ac.sqrt() * c) / (1 - ac).sqrt()

    def flow_net(x, t, **_):
        return (x - c) / (t / 1000).view(-1, 1, 1, 1)

    return eps_net, flow_net


@pytest.mark.parametrize("name", ["dpmsolver++", "unipc"])
@pytest.mark.parametrize("steps", [2, 4])
def test_diffusers_solvers_are_exact_on_a_point_mass(name, steps):
    """Data = one point c: the exact eps and velocity are known, so every solver must land on c."""
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    c = torch.full((3, 1, 4, 4), 0.7)
    eps_net, flow_net = _point_mass_nets(c, ddpm.alphas_cumprod)
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    vp = scheduler_sample(eps_net, make_scheduler(name, dict(ddpm.config)), noise, steps)
    flow = scheduler_sample(flow_net, make_scheduler(name, dict(ddpm.config), flow=True), noise, steps)
    assert float((vp - c).abs().max()) < 1e-5
    # integer timesteps vs exact sigmas leave a small error near t = 0 where v = (x - c) / t
    assert float((flow - c).abs().max()) < 5e-3


def test_make_scheduler_keeps_our_overrides():
    """Regression: diffusers' `_use_default_values` in a copied config reset prediction_type/spacing."""
    from diffusers import DDPMScheduler

    cfg = dict(DDPMScheduler().config)
    s = make_scheduler("dpmsolver++", cfg, flow=True)
    assert s.config.prediction_type == "flow_prediction" and s.config.use_flow_sigmas
    assert s.config.timestep_spacing == "trailing"
    with pytest.raises(ProReflowError, match="unknown scheduler"):
        make_scheduler("plms", cfg)


def test_perturbations_have_the_requested_norm():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(64, 3, 5, 5, generator=gen)
    n = v.reshape(64, -1).norm(dim=1)
    for eps in (0.1, 0.5, 1.0):
        d = perturb(v, "direction", eps, gen)
        assert torch.allclose(d.reshape(64, -1).norm(dim=1), n, rtol=1e-5)  # direction only: |v'| = |v|
        assert torch.allclose((d - v).reshape(64, -1).norm(dim=1), eps * n, rtol=1e-4)
        m = perturb(v, "magnitude", eps, gen)
        sign = ((m - v) / (eps * v)).reshape(64, -1)  # magnitude only: m = (1 +- eps) v
        assert torch.allclose(sign, sign[:, :1].expand_as(sign), atol=1e-3) and set(sign[:, 0].round().tolist()) == {-1, 1}
        assert torch.allclose((m - v).reshape(64, -1).norm(dim=1), eps * n, rtol=1e-4)
    with pytest.raises(ProReflowError):
        perturb(v, "magnitude", 1.5, gen)
    f = perturbed_field(lambda x, t, c=None: x, "direction", 0.3, seed=1)
    g = perturbed_field(lambda x, t, c=None: x, "direction", 0.3, seed=1)
    assert torch.equal(f(v, torch.ones(64)), g(v, torch.ones(64)))


def test_velocity_discrepancy_closed_forms():
    noise = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = torch.tensor([1.0, -2.0], dtype=torch.float64)
    straight = lambda x, t, cond=None: (x - c) / t[:, None]  # point mass: v = eps - c is constant in t
    times, l2, cos = velocity_discrepancy(straight, noise, 8)
    assert times.shape == (8,) and float(times[0]) == 1.0
    assert float(l2.abs().max()) < 1e-5 and float((cos - 1).abs().max()) < 1e-5
    gmm = GaussianMixture.ring(8, 3.0, 0.3)
    _, l2g, cosg = velocity_discrepancy(lambda x, t, cond=None: gmm.velocity(x, t), noise, 8)
    assert torch.allclose(torch.diagonal(l2g), torch.zeros(8), atol=1e-6)
    assert torch.allclose(l2g, l2g.T) and float(l2g[0, -1]) > 0.5 and float(cosg[0, -1]) < 0.9
    assert torch.allclose(torch.diagonal(cosg), torch.ones(8), atol=1e-6)
    assert float(l2g[0, 1]) < float(l2g[0, -1])  # neighbours in time agree more than the two ends


def test_guided_call_and_flow_velocity():
    class Net(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            return x * 0 + class_labels.float().view(-1, 1) + t.view(-1, 1) / 1000

    cond = class_cond(torch.tensor([3, 5]))
    f = FlowVelocity(Net(), time_scale=1000.0, guidance_scale=1.0)
    x, t = torch.zeros(2, 4), torch.tensor([0.5, 0.25])
    assert torch.allclose(f(x, t, cond), torch.tensor([[3.5], [5.25]]).expand(2, 4))
    f.guidance_scale = 3.0  # u + 3 (c - u) with u = 10 + t
    expect = (10 + t) + 3 * (torch.tensor([3.0, 5.0]) - 10)
    assert torch.allclose(f(x, t, cond), expect.view(-1, 1).expand(2, 4))
    assert torch.equal(guided_call(lambda c: c["class_labels"].float(), {"class_labels": torch.ones(2)}, 5.0),
                       torch.ones(2))  # no uncond: no guidance


def test_pair_cache_round_trips_nested_conditioning(tmp_path):
    cond = class_cond(torch.tensor([1, 2, 3]))
    flat = flatten_cond(cond)
    assert set(flat) == {"cond.class_labels", "cond.uncond.class_labels"}
    back = unflatten_cond(flat)
    assert torch.equal(back["uncond"]["class_labels"], cond["uncond"]["class_labels"])
    with pytest.raises(ProReflowError, match="'.'"):
        flatten_cond({"a.b": torch.ones(1)})

    def data_fn(n, gen):
        return torch.randn(n, 2, generator=gen), class_cond(torch.randint(0, 10, (n,), generator=gen))

    teacher = lambda x, t, cond=None: x * 0 + cond["class_labels"].float()[:, None]
    cached = PairCache(tmp_path).ensure(teacher, data_fn, WindowSchedule.uniform(2), TeacherSolver("euler", 2),
                                        n_pairs=10, shard_size=4, seed=3)
    batch = cached.batch(torch.tensor([0, 9]))
    assert torch.equal(batch.cond["uncond"]["class_labels"], torch.full((2,), NULL_CLASS))
    assert torch.allclose(batch.target(), batch.cond["class_labels"].float()[:, None].expand(2, 2))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    result = runner.invoke(app, ["run", "digits-smoke", "--out", str(out), "--quiet", "--validate-every", "4"])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "results.json").read_text())


def test_smoke_run_writes_every_result(smoke_run):
    out, res = smoke_run
    for name in ("results.md", "samples.png", "fig1a_velocity_discrepancy.png", "fig1b_perturbation.png",
                 "fig3_cfg_sweep.png"):
        assert (out / name).stat().st_size > 1000, name
    assert [r["label"] for r in res["table4"]] == ["w/o both (PeRFlow)", "w/o aligned", "w/o progressive", "full"]
    assert all(r["seeds"] == [0, 1] and math.isfinite(r["fd_mean"]) and r["fd_std"] >= 0 for r in res["table4"])
    solvers = {(r["teacher"], r["solver"], r["nfe"]) for r in res["solvers"]}
    assert ("vp", "dpmsolver++", 4) in solvers and ("flow", "heun", 4) in solvers and ("vp", "unipc", 1) in solvers
    assert {(r["steps"], r["guidance"]) for r in res["cfg_sweep"]} == {(1, 1.0), (1, 3.0), (4, 1.0), (4, 3.0)}
    students = {(r["method"], r["steps"], r["seed"]): r for r in res["students"]}
    # equal budget; global pairs cost the whole trajectory's teacher steps, progressive ones less than PeRFlow's
    assert {r["optimizer_steps"] for r in res["students"]} == {8}
    assert students[("2-rectified-flow", 4, 0)]["teacher_nfe_per_pair"] == 8.0
    assert students[("perflow", 4, 0)]["teacher_nfe_per_pair"] == 2.0
    assert students[("proreflow", 4, 0)]["teacher_nfe_per_pair"] < 2.0
    assert ("proreflow", 1, 1) in students and ("proreflow-prev-stage", 4, 1) in students  # every row at every seed
    assert ("proreflow-prev-stage", 1, 0) not in students  # methods outside steps_methods: table steps only
    # every student trained logs its curves and validation renders (issue 28), one run folder each
    runs = {p.name for p in (out / "logs").iterdir()}
    assert {"perflow-k4-s0", "proreflow-k4-s1", "proreflow-k1-s0", "teacher-vp", "teacher-flow"} <= runs
    assert (out / "validation" / "perflow-k4-s0" / "step-0000008.png").is_file()
    assert (out / "validation" / "perflow-k4-s0" / "teacher.png").is_file()
    assert "| proreflow | 1 | 8→4→2→1 |" in (out / "results.md").read_text() and " ± " in (out / "results.md").read_text()
    # ProReflow-III: a one-step student from 8 -> 4 -> 2 -> 1 windows; windows that do not divide k are skipped
    assert students[("proreflow", 1, 0)]["windows"] == [8, 4, 2, 1]
    assert ("proreflow-II-mixture", 1, 0) not in students
    two = students[("proreflow-II-mixture", 4, 0)]  # 2 windows sampled at 4 steps (two per window)
    assert two["windows"] == [8, 4, 2] and two["time_sampling"] == "mixture-0.5"
    assert students[("proreflow", 4, 0)]["time_sampling"] == "start"
    assert students[("2-rectified-flow", 4, 0)]["time_sampling"] == "uniform"
    # pairs of stage 2 from stage 1's student: half the pairs cost the teacher 1 step, none cost it 2
    prev = students[("proreflow-prev-stage", 4, 0)]
    assert prev["pair_source"] == "previous_stage" and prev["teacher_nfe_per_pair"] == 0.5
    assert prev["student_nfe_per_pair"] == 1.0 and students[("proreflow", 4, 0)]["teacher_nfe_per_pair"] == 1.5
    # real training images are far closer to the held-out ones than any 8-step-trained model
    assert res["real"]["fd_train_images"] < min(r["fd"] for r in res["students"])
    assert ("vp", "ddim", 4) in solvers and not any(r[0] == "flow" and r[1] == "ddim" for r in solvers)
    # every distinct set of pairs is solved once for the whole run (regression: caches were per plan). Teacher
    # pairs by (windows, pair seed = seed + stage) over seeds 0, 1: 1 window {1, 4, 2, 5}, 2 {3, 4}, 4 {1, 2, 3},
    # 8 {1, 2}; and each seed's previous-stage student solves its own 4-window pairs
    made = sorted(p.name.rsplit("-", 1)[0] for p in (out / "cache" / "pairs").glob("*/w*"))
    assert made == sorted(["w1-seed1", "w1-seed2", "w1-seed4", "w1-seed5", "w2-seed3", "w2-seed4", "w4-seed1",
                           "w4-seed2", "w4-seed3", "w8-seed1", "w8-seed2", "w4-seed2", "w4-seed3"]), made


def test_analyze_reuses_the_cached_teacher_and_reproduces_the_run(smoke_run):
    out, res = smoke_run
    finals = sorted((out / "cache").glob("teacher-*/fit/final.safetensors"))
    before = [(p, p.stat().st_mtime_ns) for p in finals]
    result = runner.invoke(app, ["analyze", "digits-smoke", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(before) == 2  # both teachers of the run
    assert sorted((out / "cache").glob("teacher-*/fit/final.safetensors")) == finals  # no new teacher
    assert [(p, p.stat().st_mtime_ns) for p in finals] == before  # and none rewritten
    again = json.loads((out / "analysis.json").read_text())
    assert again["rms_l2"] == res["analysis"]["rms_l2"]
    assert again["perturbation"] == res["analysis"]["perturbation"]


def test_run_rejects_bad_configs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {kinds: [vp], distill: flow}\n")
    result = runner.invoke(app, ["run", str(bad), "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2 and "teacher.distill" in result.output
    bad.write_text("table_methods: [perflow, nope]\n")
    result = runner.invoke(app, ["run", str(bad), "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2 and "table_methods" in result.output
    bad.write_text("pairs: 10\n")  # fewer cached pairs than one batch of 64
    result = runner.invoke(app, ["run", str(bad), "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2 and "pairs must be at least one batch (64)" in result.output
    result = runner.invoke(app, ["run", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2


def test_sigterm_between_students_exits_143_and_the_rerun_continues(smoke_run, monkeypatch):
    """Regression: `proreflow run` honoured SIGTERM only inside fit steps; it now also stops between
    students (and phases), with everything finished cached."""
    import os
    import signal

    import proreflow.apps.digits.run as digits

    out, res = smoke_run
    real, calls = digits.train_student, []

    def train_then_term(*a, **k):
        calls.append(1)
        result = real(*a, **k)  # cached: returns at once
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(digits, "train_student", train_then_term)
    result = runner.invoke(app, ["run", "digits-smoke", "--out", str(out), "--quiet"])
    assert result.exit_code == 143, result.output
    assert "stopped by SIGTERM before student 2/" in result.output and len(calls) == 1
    monkeypatch.undo()
    result = runner.invoke(app, ["run", "digits-smoke", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["table4"] == res["table4"]


def test_budget_sweep_script_scores_every_budget_and_reuses_finished_runs(smoke_run, tmp_path, monkeypatch):
    """benchmarks/budget_sweep.py on the smoke preset, with the teacher cached by the smoke run."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("budget_sweep", Path(__file__).parents[1] / "benchmarks" / "budget_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out, _ = smoke_run
    args = ["--budgets", "4,2", "--seeds", "0", "--samples", "30", "--pairs", "64", "--config", "digits-smoke",
            "--digits-out", str(out), "--out", str(tmp_path)]
    teachers = sorted((out / "cache").glob("teacher-*"))
    pairs = sorted((out / "cache" / "pairs").glob("*/*"))
    first = sweep.main(args)
    rows = first["rows"]
    assert {(r["method"], r["budget"]) for r in rows} == {(m, b) for m in sweep.METHODS for b in (2, 4)}
    assert all(math.isfinite(r["fidelity_rmse"]) and math.isfinite(r["fd"]) for r in rows)
    assert sorted((out / "cache").glob("teacher-*")) == teachers  # the smoke run's teacher, no new one
    assert sorted((out / "cache" / "pairs").glob("*/*")) == pairs  # and its pairs: the sweep solved none
    assert (tmp_path / "budget_sweep.png").stat().st_size > 10_000 and "| proreflow |" in (tmp_path / "budget_sweep.md").read_text()

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep, "run_method", no_training)
    assert sweep.main(args)["rows"] == rows
    monkeypatch.undo()
    # two worker processes, one seed each: the finished seed 0 carries over, seed 1 is trained by its worker
    both = sweep.main([*args, "--seeds", "0,1", "--workers", "2"])
    assert {(r["method"], r["budget"], r["seed"]) for r in both["rows"]} == \
        {(m, b, s) for m in sweep.METHODS for b in (2, 4) for s in (0, 1)}
    assert [r for r in both["rows"] if r["seed"] == 0] == rows and both["meta"]["workers"] == 2
    # workers get (method, seed) runs of nearly equal optimizer steps, longest first
    costs = {m: sweep.job_cost(spec, 4, [100, 200, 500, 1000, 2000])
             for m, spec in [("perflow", MethodSpec("perflow", windows=[4])),
                             ("proreflow", MethodSpec("proreflow", windows="8->k", lam=1.0))]}
    assert costs == {"perflow": 2000, "proreflow": 1000 + 1900}
    shares = sweep.split_jobs([(m, s) for s in (0, 1, 2) for m in costs], costs, 2)
    assert sorted(j for share in shares for j in share) == sorted((m, s) for s in (0, 1, 2) for m in costs)
    assert sorted(sum(costs[m] for m, _ in share) for share in shares) == [2900 + 2 * 2000, 2 * 2900 + 2000]


@pytest.mark.parametrize("attention", [False, True])
def test_unet_attention_switch_covers_every_block(attention):
    """`attention: false` means no self-attention anywhere: diffusers' UNet2DModel adds a mid-block attention
    unless told not to (it was on while the preset said off; under bf16 autocast its CPU backward was the
    slowest op of a step)."""
    from diffusers.models.attention_processor import Attention

    from proreflow.models.unet import UNetConfig, class_unet

    net = class_unet(UNetConfig(block_out_channels=(8, 16), norm_num_groups=4, attention=attention), 8, 3)
    where = sorted({name.split(".")[0] for name, m in net.named_modules() if isinstance(m, Attention)})
    assert where == (["down_blocks", "mid_block", "up_blocks"] if attention else [])

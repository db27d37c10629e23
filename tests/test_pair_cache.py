import pytest
import torch

from proreflow.errors import ProReflowError
from proreflow.fields.gmm import GaussianMixture
from proreflow.pairs import PairCache, TeacherSolver
from proreflow.time_sampling import TimeSampling
from proreflow.training import cached_reflow_batches
from proreflow.windows import WindowSchedule

GMM = GaussianMixture.ring(4, 2.0, 0.3)
SCHED = WindowSchedule.uniform(4)
SOLVER = TeacherSolver("rk4", 2)


def teacher(x, t, cond=None):
    return GMM.velocity(x, t)


class Data:
    """Data source that counts its calls and can crash on a given call (a killed build)."""

    def __init__(self, crash_on: int | None = None):
        self.calls, self.crash_on = 0, crash_on

    def __call__(self, n, gen):
        self.calls += 1
        if self.calls == self.crash_on:
            raise KeyboardInterrupt("simulated kill")
        labels = torch.randint(0, 4, (n,), generator=gen)
        return GMM.sample(n, gen), labels


def _build(root, data):
    return PairCache(root).ensure(teacher, data, SCHED, SOLVER, n_pairs=250, shard_size=100, seed=7)


def _equal(a, b):
    return all(torch.equal(getattr(a.pairs, k), getattr(b.pairs, k)) for k in ("x_a", "x_b", "t_a", "t_b", "cond"))


def test_cache_round_trip_and_costs(tmp_path):
    cached = _build(tmp_path / "c", Data())
    assert len(cached) == 250 and cached.pairs.teacher_nfe == 250 * 2 * 4
    assert torch.allclose(cached.pairs.target(), (cached.pairs.x_a - cached.pairs.x_b)
                          / (cached.pairs.t_a - cached.pairs.t_b)[:, None])
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        ".build.lock", "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    again = Data()
    assert _equal(_build(tmp_path / "c", again), cached) and again.calls == 0  # nothing regenerated


def test_corrupted_or_truncated_shard_is_detected_and_regenerated(tmp_path):
    cached = _build(tmp_path / "c", Data())
    shard = tmp_path / "c" / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside a tensor: still a loadable file, wrong numbers
    shard.write_bytes(bytes(raw))
    (tmp_path / "c" / "shard-00002.safetensors").write_bytes(b"trunc")
    assert PairCache(tmp_path / "c").valid_shards(PairCache.spec(SCHED, SOLVER, 250, 100, 7)) == {0}
    repair = Data()
    repaired = _build(tmp_path / "c", repair)
    assert repair.calls == 2 and _equal(repaired, cached)


def test_killed_build_resumes_where_it_stopped(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "c", Data(crash_on=3))  # dies while making the third shard
    resume = Data()
    resumed = _build(tmp_path / "c", resume)
    assert resume.calls == 1  # only the missing shard
    assert _equal(resumed, _build(tmp_path / "fresh", Data()))


def test_changed_settings_rebuild_the_cache(tmp_path):
    _build(tmp_path / "c", Data())
    other = Data()
    PairCache(tmp_path / "c").ensure(teacher, other, SCHED, TeacherSolver("euler", 2), 250, 100, seed=7)
    assert other.calls == 3
    with pytest.raises(ProReflowError):
        PairCache(tmp_path / "d").ensure(teacher, Data(), SCHED, SOLVER, n_pairs=0)


def test_batches_from_the_cache_follow_the_chords(tmp_path):
    cached = _build(tmp_path / "c", Data())
    batches = cached_reflow_batches(cached, 64, TimeSampling(margin=0.1))
    b = batches(0, torch.Generator().manual_seed(0), slice(None))
    assert b.x.shape == (64, 2) and b.cond.shape == (64,) and b.teacher_nfe == 0
    half = batches(0, torch.Generator().manual_seed(0), slice(32, 64))
    assert torch.equal(half.x, b.x[32:]) and torch.equal(half.target, b.target[32:])


def test_a_cache_made_by_other_teacher_weights_is_rebuilt(tmp_path):
    """Regression: the spec named no teacher, so a cache folder reused with another teacher was trusted."""
    from proreflow.fields.network import NetworkTeacher
    from proreflow.models.mlp import VelocityMLP
    from proreflow.pairs import teacher_fingerprint

    torch.manual_seed(0)
    a, b = NetworkTeacher(VelocityMLP(2, 16, 2)), NetworkTeacher(VelocityMLP(2, 16, 2))
    assert teacher_fingerprint(a) != teacher_fingerprint(b) and teacher_fingerprint(teacher) is None
    data = Data()
    first = PairCache(tmp_path).ensure(a, data, SCHED, SOLVER, n_pairs=50, shard_size=25, seed=1)
    calls = data.calls
    same = PairCache(tmp_path).ensure(a, data, SCHED, SOLVER, n_pairs=50, shard_size=25, seed=1)
    assert data.calls == calls and torch.equal(first.pairs.x_b, same.pairs.x_b)  # reused
    other = PairCache(tmp_path).ensure(b, data, SCHED, SOLVER, n_pairs=50, shard_size=25, seed=1)
    assert data.calls == calls + 2  # both shards rebuilt with the other teacher
    assert torch.equal(first.pairs.x_a, other.pairs.x_a) and not torch.allclose(first.pairs.x_b, other.pairs.x_b)


def test_sigterm_between_shards_stops_after_a_written_shard_and_resumes(tmp_path):
    """`check_stop` as the build's after_each hook (what train_plan passes): a SIGTERM stops the build right
    after the shard being written, which is kept; the rerun makes only the rest."""
    import os
    import signal

    from proreflow.training import TrainingInterrupted, check_stop, stop_on_sigterm

    data = Data()

    def after_each():
        if data.calls == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the first shard is being finished
        check_stop("while caching pairs")

    with stop_on_sigterm(), pytest.raises(TrainingInterrupted, match="stopped by SIGTERM while caching pairs"):
        PairCache(tmp_path / "c").ensure(teacher, data, SCHED, SOLVER, n_pairs=250, shard_size=100, seed=7,
                                         after_each=after_each)
    assert data.calls == 1 and (tmp_path / "c" / "shard-00000.safetensors").is_file()
    resume = Data()
    assert _equal(_build(tmp_path / "c", resume), _build(tmp_path / "fresh", Data())) and resume.calls == 2
    check_stop("outside stop_on_sigterm")  # no request pending: nothing happens


def test_train_plans_stage_cache_passes_the_sigterm_check_to_the_build(tmp_path):
    """The wiring the README states: `train_plan`'s stage cache (one process) stops after the shard being written."""
    import os
    import signal

    from proreflow.training import PairCacheConfig, TrainingInterrupted, stop_on_sigterm
    from proreflow.training.plan import _stage_cache

    class TermOnFirst(Data):
        def __call__(self, n, gen):
            if self.calls == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__call__(n, gen)

    data = TermOnFirst()
    with stop_on_sigterm(), pytest.raises(TrainingInterrupted, match="while caching the pairs of stage 2"):
        _stage_cache(PairCacheConfig(tmp_path, None, 100), 2, 250, teacher, data, SCHED, SOLVER, 7, False)
    assert data.calls == 1 and [p.name for p in tmp_path.glob("w4-seed7-*/shard-*")] == ["shard-00000.safetensors"]


def test_shards_and_manifest_are_fsynced_before_they_are_renamed(tmp_path, monkeypatch):
    """Regression: pair-cache shards and manifests were renamed into place without an fsync (checkpoints had one),
    so a power cut could leave a renamed but empty shard. Now every file goes through store's atomic writes."""
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    _build(tmp_path / "c", Data())
    names = [os.path.basename(p) for p in synced]
    assert names.count(".manifest.json.tmp") == 3  # once per shard (250 pairs in shards of 100)
    assert sorted(n for n in names if n.startswith(".shard")) == [f".shard-0000{i}.safetensors.tmp" for i in range(3)]


def test_module_digest_separates_frozen_and_trainable_weights():
    from proreflow.store import module_digest

    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    net[0].requires_grad_(False)
    frozen, trainable = module_digest(net, "frozen"), module_digest(net, "trainable")
    with torch.no_grad():
        net[1].weight.add_(1.0)  # a trainable weight: the frozen digest (a teacher's identity) stays
    assert module_digest(net, "frozen") == frozen and module_digest(net, "trainable") != trainable
    net[1].running_mean.add_(1.0)  # buffers count as frozen
    assert module_digest(net, "frozen") != frozen


def test_two_builders_of_one_cache_take_turns(tmp_path):
    """Regression: pair caches are shared between plans (and budget-sweep workers), and two builders of one
    cache wrote the same temp files and manifest at once; a finished one could then read the other's partial
    manifest and fail. The build holds a lock: the second builder waits, then finds every shard made."""
    import threading
    import time

    started, results = threading.Event(), {}

    class Slow(Data):
        def __call__(self, n, gen):
            started.set()
            time.sleep(0.05)
            return super().__call__(n, gen)

    def build(name, data):
        results[name] = (_build(tmp_path / "c", data), data)

    first = threading.Thread(target=build, args=("first", Slow()))
    first.start()
    started.wait()
    second = threading.Thread(target=build, args=("second", Data()))
    second.start()
    first.join()
    second.join()
    (a, made), (b, waited) = results["first"], results["second"]
    assert made.calls == 3 and waited.calls == 0 and _equal(a, b) and _equal(a, _build(tmp_path / "fresh", Data()))


# ------------------------------------------------------------------ PairMemo: pairs remembered by their inputs


class _CountingMLP(torch.nn.Module):
    """A network teacher (so it has a fingerprint) that counts its calls."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Linear(3, 2).requires_grad_(False)
        self.calls = 0

    def forward(self, x, t, cond=None):
        self.calls += 1
        return self.net(torch.cat([x, t[:, None]], 1))


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x0, labels = GMM.sample(16, g).float(), torch.randint(0, 4, (16,), generator=g)
    return x0, {"labels": labels}, SCHED.sample_windows(16, g), torch.randn(16, 2, generator=g)


def test_pair_memo_loads_the_very_pairs_it_solved_and_solves_what_differs(tmp_path):
    from proreflow.pairs import PairMemo, make_window_pairs

    net = _CountingMLP()
    memo = PairMemo(tmp_path, net, SCHED, SOLVER)
    x0, cond, windows, noise = _inputs(0)
    first = memo(x0, cond, windows, noise)
    solved_calls = net.calls
    assert solved_calls == 4 * 2  # rk4, 2 steps: one batched solve of the 16 pairs
    again = PairMemo(tmp_path, net, SCHED, SOLVER)(x0, cond, windows, noise)  # another run, same inputs
    assert net.calls == solved_calls  # loaded, not solved
    direct = make_window_pairs(net, x0, SCHED, SOLVER, cond=cond, windows=windows, noise=noise)
    for k in ("x_a", "x_b", "t_a", "t_b"):
        assert torch.equal(getattr(again, k), getattr(direct, k)) and torch.equal(getattr(first, k), getattr(direct, k))
    assert again.cond is cond and again.teacher_nfe == direct.teacher_nfe == 16 * 8
    # any input that differs is another batch: other noise, other conditioning, other windows
    for changed in [(x0, cond, windows, noise + 1e-6), (x0, {"labels": cond["labels"].flip(0)}, windows, noise),
                    (x0, cond, windows.flip(0), noise)]:
        before = net.calls
        memo(*changed)
        assert net.calls == before + 8
    assert (memo.hits, memo.misses) == (0, 64)


def test_pair_memo_tells_teachers_windows_and_solvers_apart(tmp_path):
    from proreflow.fields.vp import VPSchedule, VPVelocity
    from proreflow.pairs import PairMemo

    a, b = _CountingMLP(0), _CountingMLP(1)
    folders = {PairMemo(tmp_path, a, SCHED, SOLVER).dir, PairMemo(tmp_path, b, SCHED, SOLVER).dir,
               PairMemo(tmp_path, a, WindowSchedule.uniform(2), SOLVER).dir,
               PairMemo(tmp_path, a, SCHED, TeacherSolver("euler", 2)).dir}
    assert len(folders) == 4
    # the same weights at another guidance scale are another teacher (and at scale 1, the weights' digest alone)
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)
    from diffusers import DDPMScheduler

    schedule = VPSchedule.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    plain, guided = VPVelocity(unet, schedule).requires_grad_(False), VPVelocity(unet, schedule, guidance_scale=4.0)
    assert guided.fingerprint() == plain.fingerprint() + "-guidance4"
    assert PairMemo(tmp_path, plain, SCHED, SOLVER).dir != PairMemo(tmp_path, guided, SCHED, SOLVER).dir


def test_pair_memo_solves_again_over_a_damaged_file(tmp_path):
    from proreflow.pairs import PairMemo

    net = _CountingMLP()
    memo = PairMemo(tmp_path, net, SCHED, SOLVER)
    inputs = _inputs(3)
    first = memo(*inputs)
    (path,) = memo.dir.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:40])  # truncated
    second = memo(*inputs)
    assert net.calls == 16 and torch.equal(first.x_b, second.x_b)
    assert torch.equal(PairMemo(tmp_path, net, SCHED, SOLVER)(*inputs).x_b, first.x_b) and net.calls == 16


def test_pair_memo_loads_pairs_in_the_memory_layout_the_solve_gave(tmp_path):
    """Channels-last latents give channels-last pairs; loaded contiguous, the student's convolutions would sum in
    another order and the student would differ in its last bits from the one trained without the memo."""
    from proreflow.pairs import PairMemo, make_window_pairs

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1).requires_grad_(False)

        def forward(self, x, t, cond=None):
            return self.conv(x)

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, generator=g).to(memory_format=torch.channels_last)
    noise, windows = torch.randn(4, 2, 3, 3, generator=g), SCHED.sample_windows(4, g)
    teacher = Conv()
    direct = make_window_pairs(teacher, x0, SCHED, SOLVER, windows=windows, noise=noise)
    PairMemo(tmp_path, teacher, SCHED, SOLVER)(x0, None, windows, noise)
    loaded = PairMemo(tmp_path, teacher, SCHED, SOLVER)(x0, None, windows, noise)
    assert direct.x_b.stride() != direct.x_b.contiguous().stride()  # the case this is about
    for k in ("x_a", "x_b", "t_a", "t_b"):
        assert getattr(loaded, k).stride() == getattr(direct, k).stride() and torch.equal(getattr(loaded, k),
                                                                                          getattr(direct, k))


def test_reflow_batches_refuse_a_memo_of_another_teacher_schedule_or_solver(tmp_path):
    """The memo solves what it does not hold with its own teacher: handed another one's memo, `reflow_batches` would
    train on the wrong teacher's pairs without a word."""
    from proreflow.errors import ProReflowError
    from proreflow.pairs import PairMemo
    from proreflow.training.batches import reflow_batches

    a, b = _CountingMLP(0), _CountingMLP(1)
    data = lambda n, g: _inputs(0)[:2]  # noqa: E731
    reflow_batches(a, data, SCHED, SOLVER, 16, memo=PairMemo(tmp_path, a, SCHED, SOLVER))  # its own: accepted
    for memo in (PairMemo(tmp_path, b, SCHED, SOLVER), PairMemo(tmp_path, a, WindowSchedule.uniform(2), SOLVER),
                 PairMemo(tmp_path, a, SCHED, TeacherSolver("euler", 2))):
        with pytest.raises(ProReflowError, match="another teacher"):
            reflow_batches(a, data, SCHED, SOLVER, 16, memo=memo)


def test_strided_tensors_come_back_in_their_layout(tmp_path):
    from proreflow.store import load_strided, save_strided

    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    save_strided({"x": x, "y": torch.arange(6.0)}, tmp_path / "t.safetensors", {"n": torch.tensor(7)})
    got = load_strided(tmp_path / "t.safetensors", ("x", "y"))
    assert got["x"].stride() == x.stride() != x.contiguous().stride() and torch.equal(got["x"], x)
    assert torch.equal(got["y"], torch.arange(6.0)) and int(got["n"]) == 7 and set(got) == {"x", "y", "n"}

"""Streaming distillation data (`proreflow distill --stream`): the epoch order, exact resume after SIGKILL
between shards, shards split across ranks without overlap, unreadable samples skipped and counted, host memory
flat in the number of shards, and a streamed distillation that resumes bitwise."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from proreflow.data.stream import StreamIterator, find_shards, write_shards

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _png(i: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _shards(root: Path, n_shards: int, per_shard: int, size: int = 8) -> Path:
    write_shards([(_png(i, size), f"a red cat {i}") for i in range(n_shards * per_shard)], root, per_shard)
    return root


def test_one_epoch_hands_out_every_sample_once_and_a_saved_position_continues_it(tmp_path):
    root = _shards(tmp_path / "shards", 5, 7)
    it = StreamIterator(root, 8, seed=3, workers=2)
    first = [s["caption"] for s in it.take(12)]
    saved = it.state_dict()
    rest = [s["caption"] for s in it.take(23)]
    assert len(set(first + rest)) == 35  # the whole epoch, nothing twice
    again = StreamIterator(root, 8, seed=3, workers=2)
    again.load_state_dict(json.loads(json.dumps(saved)))  # through JSON, as in a checkpoint
    assert sorted(s["caption"] for s in again.take(23)) == sorted(rest)
    assert it.take(1)[0]["caption"] in first + rest and it.state_dict()["epoch"] == 1  # epoch 2 starts over


def _epoch_of(it: StreamIterator, n: int | None = None) -> dict[int, list[str]]:
    """Captions `it` hands out, by the epoch they belong to: `n` of them, or all until its epoch passes the next
    plan-less one (what is left of the epochs it continues)."""
    out: dict[int, list[str]] = {}
    while n is None or sum(map(len, out.values())) < n:
        before = it.state.epoch
        item = it.next()
        if n is None and it.state.epoch > max(before, max(it.state.plans, default=-1)):
            break  # crossed into an epoch nobody had started
        out.setdefault(it.state.epoch, []).append(item["caption"])
    return out


@pytest.mark.parametrize("new_world, new_workers", [(3, 1), (1, 2), (2, 0)])
def test_a_resume_on_another_split_continues_the_epoch_exactly(tmp_path, new_world, new_workers):
    """Two ranks of 2 workers saved mid-epoch, rank 0 already 3 samples into the next epoch; whatever the new
    split, the new ranks read exactly the rest of each epoch: nothing twice, nothing left out."""
    root = _shards(tmp_path / "shards", 6, 5)
    everything = {f"a red cat {i}" for i in range(30)}
    old = [StreamIterator(root, 8, seed=4, rank=r, world=2, workers=2) for r in range(2)]
    taken = [_epoch_of(old[0], 18), _epoch_of(old[1], 4)]
    assert len(taken[0][0]) == 15 and len(taken[0][1]) == 3 and len(taken[1][0]) == 4
    ranks = json.loads(json.dumps([it.state_dict() for it in old]))  # as the training loop gathers them
    rest: dict[int, list[str]] = {0: [], 1: []}
    for r in range(new_world):
        it = StreamIterator(root, 8, seed=4, rank=r, world=new_world, workers=new_workers)
        it.load_state_dict({**ranks[min(r, 1)], "ranks": ranks})
        for epoch, caps in _epoch_of(it).items():
            rest[epoch] += caps
    before0, before1 = taken[0][0] + taken[1][0], taken[0][1]
    assert sorted(rest[0] + before0) == sorted(everything) and len(set(rest[0])) == len(rest[0]) == 11
    assert sorted(rest[1] + before1) == sorted(everything) and len(set(rest[1])) == len(rest[1]) == 27


def test_a_fit_saves_every_ranks_position_so_another_split_continues_it(tmp_path):
    """The training loop puts every process's stream position into each checkpoint ("ranks")."""
    import torch

    from proreflow.models.mlp import VelocityMLP
    from proreflow.training import TrainConfig, fit
    from proreflow.training.checkpoint import CheckpointConfig
    from proreflow.training.loop import TrainBatch

    root = _shards(tmp_path / "shards", 4, 5)
    stream = StreamIterator(root, 8, seed=1, workers=2)
    used: list[str] = []

    def batch_fn(micro, gen, rows):
        items = stream.take(3)
        used.extend(s["caption"] for s in items)
        x = torch.stack([s["pixels"].float().mean((0, 1, 2)).expand(2) for s in items])
        return TrainBatch(x, torch.full((3,), 0.5), torch.zeros_like(x), None)

    ck = CheckpointConfig(tmp_path / "ck", every=1)
    fit(VelocityMLP(2, 8, 1), batch_fn, 3, TrainConfig(batch_size=3, progress=False),
        checkpoints=ck.for_fit("stage-1"), data_state=stream)
    saved = json.loads((tmp_path / "ck" / "stage-1" / "step-00000002" / "rng-rank0.json").read_text())["data"]
    assert len(saved["ranks"]) == 1 and saved["ranks"][0]["seen"] == 6
    final = json.loads((tmp_path / "ck" / "stage-1" / "final-data-rank0.json").read_text())
    assert final["ranks"][0]["seen"] == 9
    again = StreamIterator(root, 8, seed=1, workers=1)  # another worker count
    again.load_state_dict(saved)
    rest = _epoch_of(again)[0]
    assert sorted(used[:6] + rest) == sorted(f"a red cat {i}" for i in range(20))


def _hf_sets(tmp_path: Path, n: int) -> tuple[str, str]:
    """The same n captioned images as an HF `save_to_disk` folder and as a folder of 3 parquet files (what
    `load_dataset(..., streaming=True)` reads by file, as it reads a hub data set)."""
    datasets = pytest.importorskip("datasets")
    images = [Image.open(io.BytesIO(_png(i))) for i in range(n)]
    ds = datasets.Dataset.from_dict({"image": images, "text": [f"a red cat {i}" for i in range(n)]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    for k in range(3):
        ds.shard(3, k, contiguous=True).to_parquet(str(tmp_path / "pq" / f"train-{k:05d}.parquet"))
    return f"hf:{tmp_path / 'saved'}", f"hf:{tmp_path / 'pq'}:train"


def test_hf_datasets_stream_by_shard_and_resume_on_another_split(tmp_path):
    saved, files = _hf_sets(tmp_path, 30)
    everything = {f"a red cat {i}" for i in range(30)}
    assert len(find_shards(saved, folder_shard_size=8)) == 4 and len(find_shards(files)) == 3  # 30 rows / 8; 3 files
    for spec in (saved, files):
        it = StreamIterator(spec, 8, seed=5, workers=2, folder_shard_size=8)
        first = it.take(10)
        assert first[0]["pixels"].shape == (3, 8, 8) and first[0]["original_size"] == (8, 8)
        ranks = json.loads(json.dumps([it.state_dict()]))
        rest = []
        for r in range(2):  # two processes continue the epoch one process started
            other = StreamIterator(spec, 8, seed=5, rank=r, world=2, workers=1, folder_shard_size=8)
            other.load_state_dict({**ranks[0], "ranks": ranks})
            rest += _epoch_of(other).get(0, [])
        assert sorted([s["caption"] for s in first] + rest) == sorted(everything), spec


def test_a_streamed_hf_dataset_distils(tmp_path, teacher_dir):
    from typer.testing import CliRunner

    from proreflow.cli import app

    saved, _ = _hf_sets(tmp_path, 6)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"model: {teacher_dir}\nresolution: 16\nsteps: 1\nmethod: {{name: perflow, windows: [1]}}\n"
                      "budget_steps: 2\nteacher_solver: {method: euler, steps: 2}\ngradient_checkpointing: false\n"
                      "train: {batch_size: 2, per_device_batch: null, lr: 1.0e-3, mixed_precision: 'no', warmup_steps: 0}\n")
    r = CliRunner().invoke(app, ["distill", "--data", saved, "--stream", "--data-workers", "0", "--preset", str(preset),
                                 "--out", str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "out" / "proreflow.json").read_text())
    assert summary["stream"] == {"samples": 4, "skipped": 0, "epoch": 0}


def test_unreadable_samples_are_skipped_and_counted(tmp_path):
    root = _shards(tmp_path / "shards", 2, 4)
    from webdataset import TarWriter

    with TarWriter(str(root / "shard-00002.tar")) as sink:
        sink.write({"__key__": "bad-image", "png": b"not a png", "txt": "x"})
        sink.write({"__key__": "bad-caption", "png": _png(99), "txt": b"\xff\xfe\x80"})
        sink.write({"__key__": "good", "png": _png(100), "txt": "the dog"})
    (root / "shard-00003.tar").write_bytes(b"this is not a tar archive" * 20)
    it = StreamIterator(root, 8, seed=0, workers=0)
    captions = [s["caption"] for s in it.take(9)]
    assert len(set(captions)) == 9 and "the dog" in captions  # the 9 readable samples of the epoch
    it.take(1)  # the first of the next epoch: all of the first one has been read
    assert it.state_dict()["epoch"] == 1
    assert it.state_dict()["skipped"] >= 3  # the bad image, the bad caption, the file that is no archive


def test_ranks_read_disjoint_shards(tmp_path):
    root = _shards(tmp_path / "shards", 6, 5)
    seen = [{s["key"] for s in StreamIterator(root, 8, seed=1, rank=r, world=3, workers=1).take(10)} for r in range(3)]
    assert all(len(s) == 10 for s in seen) and len(seen[0] | seen[1] | seen[2]) == 30


CONSUMER = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    from proreflow.data.stream import StreamIterator
    from proreflow.store import atomic_write_text
    root, state_file, total = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    it = StreamIterator(root, 8, seed=5, workers=2)
    taken = []
    if state_file.exists():  # resume: position and what was consumed, saved together like a checkpoint
        saved = json.loads(state_file.read_text())
        it.load_state_dict(saved["stream"])
        taken = saved["taken"]
    while len(taken) < total:
        taken += [s["key"] for s in it.take(3)]
        atomic_write_text(state_file, json.dumps({"stream": it.state_dict(), "taken": taken}))
        time.sleep(0.05)
''')


def test_sigkill_between_shards_then_resume_continues_the_stream_exactly(tmp_path):
    root = _shards(tmp_path / "shards", 6, 6)
    script, state = tmp_path / "consume.py", tmp_path / "state.json"
    script.write_text(CONSUMER)
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(state), "36"], env=ENV)
    end = time.time() + 120
    while time.time() < end:  # wait until some shard is finished and the next one started
        if state.exists():
            positions = json.loads(state.read_text())["stream"]["positions"]
            if any(v[0] >= 1 for v in positions.values()) and len(json.loads(state.read_text())["taken"]) < 30:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = len(json.loads(state.read_text())["taken"])
    assert 0 < killed_at < 36
    done = subprocess.run([sys.executable, str(script), str(root), str(state), "36"], env=ENV, timeout=120)
    assert done.returncode == 0
    taken = json.loads(state.read_text())["taken"]
    assert len(taken) == 36 and len(set(taken)) == 36  # every sample of the epoch exactly once


def test_two_processes_stream_disjoint_shards_and_one_process_continues_their_epoch(tmp_path):
    """Two ranks (accelerate, gloo) read disjoint shards; the positions the training loop gathers from both let a
    single process read exactly the rest of their epoch."""
    root = _shards(tmp_path / "shards", 4, 5)
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent('''
        import json, sys
        from accelerate import PartialState
        from proreflow.data.stream import StreamIterator
        from proreflow.training.loop import _positions
        state = PartialState(cpu=True)
        it = StreamIterator(sys.argv[1], 8, seed=2, rank=state.process_index, world=state.num_processes, workers=1)
        keys = [s["caption"] for s in it.take(7)]
        saved = _positions(state, it)  # what every checkpoint of a streamed fit holds
        with open(f"{sys.argv[2]}-{state.process_index}.json", "w") as f:
            json.dump({"keys": keys, "saved": saved}, f)
        state.wait_for_everyone()
        state.destroy_process_group()
    '''))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(root),
              str(tmp_path / "keys")]
    proc = subprocess.run(launch, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (json.loads((tmp_path / f"keys-{r}.json").read_text()) for r in (0, 1))
    assert len(set(a["keys"])) == len(set(b["keys"])) == 7 and not set(a["keys"]) & set(b["keys"])
    assert [r["rank"] for r in a["saved"]["ranks"]] == [0, 1] and a["saved"]["ranks"] == b["saved"]["ranks"]
    one = StreamIterator(root, 8, seed=2, workers=1)
    one.load_state_dict(a["saved"])
    rest = _epoch_of(one)[0]
    assert sorted(a["keys"] + b["keys"] + rest) == sorted(f"a red cat {i}" for i in range(20))


RSS = textwrap.dedent('''
    import gc, resource, sys
    from proreflow.data.stream import StreamIterator
    it = StreamIterator(sys.argv[1], 192, seed=0, workers=2)
    for _ in range(int(sys.argv[2])):
        it.next()
    it._it = None  # the workers end, and their peak counts as the children's
    del it
    gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(peak)
''')


def test_peak_memory_does_not_grow_with_the_number_of_shards(tmp_path):
    """A smaller version of benchmarks/input_pipeline.py: 4 and 12 shards of 20 images of 192 x 192 (110 KB of
    PNG, 440 KB as float pixels each), every sample read; holding the samples would add ~70 MB at 12 shards.
    The peak is the main process's plus the largest worker's."""
    script = tmp_path / "rss.py"
    script.write_text(RSS)
    peaks = {}
    for n in (4, 12):
        root = _shards(tmp_path / f"s{n}", n, 20, size=192)
        out = subprocess.run([sys.executable, str(script), str(root), str(20 * n)], capture_output=True, text=True,
                             env=ENV, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[n] = int(out.stdout.split()[-1])
    assert peaks[12] < 1.1 * peaks[4], peaks


def test_streamed_distillation_resumes_bitwise(tmp_path, teacher_dir):
    from typer.testing import CliRunner

    from proreflow.cli import app

    root = _shards(tmp_path / "shards", 3, 4, size=16)
    assert len(find_shards(root)) == 3
    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"model: {teacher_dir}\nresolution: 16\nsteps: 2\nmethod: {{name: proreflow, windows: '4->k'}}\n"
                      "budget_steps: 6\nteacher_solver: {method: euler, steps: 2}\ntime_sampling: {rule: start}\n"
                      "gradient_checkpointing: false\n"
                      "train: {batch_size: 2, per_device_batch: null, lr: 1.0e-3, mixed_precision: 'no', warmup_steps: 0}\n")
    args = ["distill", "--data", str(root), "--stream", "--data-workers", "0", "--preset", str(preset),
            "--checkpoint-every", "1", "--quiet"]
    runner = CliRunner()
    full = runner.invoke(app, [*args, "--out", str(tmp_path / "full")])
    assert full.exit_code == 0, full.output
    assert "global batch 2 = 2 per device x 1 process(es) x 1 accumulation step(s)" in full.output
    ck = tmp_path / "full" / "checkpoints" / "stage-1" / "step-00000002" / "rng-rank0.json"
    assert json.loads(ck.read_text())["data"]["seen"] == 4  # 2 steps x 2 samples of the stream
    # a run killed in stage 2 after its first checkpoint: what came later is not on disk
    out = tmp_path / "resumed"
    part = runner.invoke(app, [*args, "--out", str(out)])
    assert part.exit_code == 0
    for p in [*(out / "checkpoints" / "stage-2").glob("step-0000000[2-9]"), *(out / "checkpoints" / "stage-2").glob("final*")]:
        __import__("shutil").rmtree(p) if p.is_dir() else p.unlink()
    for p in list(out.iterdir()):
        if p.name not in ("checkpoints", "run.json"):  # run.json: the settings, written when the run started
            __import__("shutil").rmtree(p) if p.is_dir() else p.unlink()
    resumed = runner.invoke(app, [*args, "--out", str(out), "--resume", "latest"])
    assert resumed.exit_code == 0, resumed.output
    a = load_file(str(tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    summary = json.loads((out / "proreflow.json").read_text())
    assert summary["optimizer_steps"] == 6 and summary["stream"] == {"samples": 12, "skipped": 0, "epoch": 0}


@pytest.mark.parametrize("extra, needle", [(["--prompts", "p.txt"], "exactly one of"),
                                           (["--encode-cache", "c"], "does not take")])
def test_stream_refuses_what_it_cannot_stream(tmp_path, extra, needle):
    from typer.testing import CliRunner

    from proreflow.cli import app

    root = _shards(tmp_path / "shards", 1, 2)
    (tmp_path / "p.txt").write_text("a cat\n")
    args = [a if a not in ("p.txt", "c") else str(tmp_path / a) for a in extra]
    r = CliRunner().invoke(app, ["distill", "--data", str(root), "--stream", *args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and needle in r.stderr, r.output

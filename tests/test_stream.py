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


def test_two_processes_stream_disjoint_shards(tmp_path):
    root = _shards(tmp_path / "shards", 4, 5)
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent('''
        import json, sys
        from accelerate import PartialState
        from proreflow.data.stream import StreamIterator
        state = PartialState(cpu=True)
        it = StreamIterator(sys.argv[1], 8, seed=2, rank=state.process_index, world=state.num_processes, workers=1)
        keys = [s["key"] for s in it.take(10)]
        with open(f"{sys.argv[2]}-{state.process_index}.json", "w") as f:
            json.dump(keys, f)
        state.wait_for_everyone()
        state.destroy_process_group()
    '''))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(root),
              str(tmp_path / "keys")]
    proc = subprocess.run(launch, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (set(json.loads((tmp_path / f"keys-{r}.json").read_text())) for r in (0, 1))
    assert len(a) == len(b) == 10 and not a & b


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
        if p.name != "checkpoints":
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

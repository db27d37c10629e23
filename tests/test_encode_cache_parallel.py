"""`--encode-cache` built by every process at once (issue 23 B): shards split over the ranks, the same bytes as a
one-process build, resumable on another number of processes; waiting for the others' shards polls the manifest
(no collective); text states held in float16 (`encode.TEXT_DTYPE`) and handed to training as float32."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_sd import tiny_sdxl_pipeline

from proreflow.apps.sd.encode import encode_records, encode_text, stored_text
from proreflow.data.captions import find_pairs
from proreflow.errors import ProReflowError
from proreflow.store import ShardStore

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TESTS = Path(__file__).parent

SCRIPT = textwrap.dedent('''
    import hashlib, json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from tiny_sd import tiny_sdxl_pipeline
    from proreflow.apps.sd.encode import encode_records
    from proreflow.data.captions import find_pairs
    from proreflow.training import process_state

    state = process_state()
    out, images, caches = sys.argv[2], sys.argv[3], sys.argv[4:]
    pipe = tiny_sdxl_pipeline(__import__("pathlib").Path(out) / f"parts-{state.process_index}")
    digests = {}
    for cache in caches:
        data = encode_records(pipe, find_pairs(images), 16, seed=1, cache_dir=cache, shard_size=2)
        h = hashlib.sha256(data.latents.numpy().tobytes())
        for k in sorted(data.cond):
            h.update(k.encode() + str(data.cond[k].dtype).encode() + data.cond[k].view(torch.uint8).numpy().tobytes())
        digests[cache] = h.hexdigest()
    with open(f"{out}/rank-{state.process_index}.json", "w") as f:
        json.dump(digests, f)
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()
''')


def _shard_sums(cache: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cache.glob("shard-*.safetensors"))}


def test_two_processes_build_the_cache_together_bit_for_bit_and_resume_a_partial_one(tmp_path, image_folder):
    script = tmp_path / "encode.py"
    script.write_text(SCRIPT)
    one, two, partial = tmp_path / "one", tmp_path / "two", tmp_path / "partial"
    for d in (one, two):
        d.mkdir()
    # one process: the reference cache (6 images in shards of 2: 3 shards)
    proc = subprocess.run([sys.executable, str(script), str(TESTS), str(one), str(image_folder), str(one / "cache")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _shard_sums(one / "cache")
    assert len(ref) == 3
    # a cache left by a killed one-process run: shard 1 never written (a temp file of it left behind), shard 2
    # damaged; a two-process run must keep shard 0 and remake the other two, the same bytes
    shutil.copytree(one / "cache", partial)
    (partial / "shard-00001.safetensors").unlink()
    (partial / ".shard-00001.safetensors.999.tmp").write_bytes(b"torn")
    raw = bytearray((partial / "shard-00002.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (partial / "shard-00002.safetensors").write_bytes(bytes(raw))
    kept = (partial / "shard-00000.safetensors").stat().st_mtime_ns
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(TESTS),
              str(two), str(image_folder), str(two / "cache"), str(partial)]
    proc = subprocess.run(launch, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _shard_sums(two / "cache") == ref  # bit for bit the one-process cache
    manifest = json.loads((two / "cache" / "manifest.json").read_text())
    made = {int(i): (e["made_by_process"], e["of_processes"]) for i, e in manifest["shards"].items()}
    assert made == {0: (0, 2), 1: (1, 2), 2: (0, 2)}  # shard i by rank i % 2: both ranks wrote shards
    assert _shard_sums(partial) == ref
    assert (partial / "shard-00000.safetensors").stat().st_mtime_ns == kept  # a valid shard is reused
    resumed = json.loads((partial / "manifest.json").read_text())["shards"]
    # shard 0 is the killed run's; 1 and 2 were remade by the two-process run (which rank remade the damaged shard 2
    # is a race: its owner, or a rank that found it damaged while loading; the bytes are the same either way)
    assert [resumed[i]["of_processes"] for i in ("0", "1", "2")] == [1, 2, 2]
    # every rank loaded the whole data set, the same as the one process did
    digests = [json.loads((d / f"rank-{r}.json").read_text()) for d, r in ((one, 0), (two, 0), (two, 1))]
    assert {v for d in digests for v in d.values()} == {digests[0][str(one / "cache")]}


def test_a_process_waits_for_shards_others_are_still_making_and_gives_up_when_none_come(tmp_path):
    store, spec = ShardStore(tmp_path / "cache"), {"kind": "test"}

    def make(i):
        return {"x": torch.full((2,), float(i))}, {"records": 2}

    store.build_share(spec, 3, make, rank=0, world=2)  # shards 0 and 2
    assert sorted(p.name for p in store.root.glob("shard-*")) == ["shard-00000.safetensors", "shard-00002.safetensors"]
    late = threading.Timer(0.3, lambda: store.add_shard(spec, 1, *make(1)))  # the other process, a little later
    late.start()
    messages = []
    t0 = time.monotonic()
    parts = store.load_when_complete(spec, 3, make, poll_s=0.05, report=messages.append)
    late.join()
    assert time.monotonic() - t0 >= 0.25 and [float(p["x"][0]) for p in parts] == [0.0, 1.0, 2.0]
    empty = ShardStore(tmp_path / "other")
    with pytest.raises(ProReflowError, match="may have died"):
        empty.load_when_complete(spec, 1, make, poll_s=0.01, stall_s=0.1)


def test_text_states_are_held_in_float16_and_reach_training_as_float32(tmp_path, image_folder):
    pipe = tiny_sdxl_pipeline(tmp_path / "parts")
    records = find_pairs(image_folder)
    half = encode_records(pipe, records, 16, seed=1, cache_dir=tmp_path / "cache", shard_size=4)
    exact = encode_records(pipe, records, 16, seed=1, shard_size=4, text_dtype="float32")
    assert half.cond["encoder_hidden_states"].dtype == half.cond["text_embeds"].dtype == torch.float16
    assert half.cond["time_ids"].dtype == half.latents.dtype == exact.cond["encoder_hidden_states"].dtype == torch.float32
    assert torch.equal(exact.cond["encoder_hidden_states"], encode_text(pipe, [c for _, c in records])["encoder_hidden_states"])
    assert torch.equal(half.latents, exact.latents)
    assert torch.equal(half.cond["encoder_hidden_states"], exact.cond["encoder_hidden_states"].half())
    x0, cond = half.data_fn(0.0, with_uncond=False)(4, torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float32 for v in cond.values())
    # a state float16 cannot hold stays float32 rather than becoming inf
    big = stored_text({"a": torch.tensor([1.0, 7e4]), "b": torch.tensor([1.0, 2.0])}, "float16")
    assert big["a"].dtype == torch.float32 and big["b"].dtype == torch.float16
    with pytest.raises(ProReflowError, match="text_dtype"):
        stored_text({}, "int8")

"""Data sources for distillation: webdataset tar shards, HF datasets (in-memory stand-in), prompt-only
mode, and the latent + text-embedding cache."""

import io
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd import CAPTIONS, tiny_sdxl_pipeline
from typer.testing import CliRunner

from proreflow.apps.sd import DistillConfig, distill, encode_prompts_only, encode_records, load_pipeline
from proreflow.cli import app
from proreflow.data.captions import load_hf_dataset, prepare_image, read_hf_dataset, read_source, read_tar_shards
from proreflow.errors import ProReflowError
from proreflow.methods import MethodSpec
from proreflow.pairs import TeacherSolver
from proreflow.time_sampling import TimeSampling
from proreflow.training import TrainConfig

runner = CliRunner()


def _png(i: int) -> bytes:
    arr = np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    for s in range(2):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(3 * s, 3 * s + 3):
                _add(tar, f"sample{i:03d}.txt", CAPTIONS[i].encode())
                _add(tar, f"sample{i:03d}.png", _png(i))
                _add(tar, f"sample{i:03d}.json", b"{}")  # other members are ignored
    return root


class FakeDataset:
    """The slice of the HF `datasets.Dataset` interface the adapter uses: `column_names`, a column by
    name, a row by index (`datasets` is not installed in the test environment)."""

    def __init__(self, rows: dict[str, list]):
        self.rows = rows
        self.column_names = list(rows)
        self.decoded: list = []

    def __getitem__(self, key):
        if isinstance(key, str):
            if key == "image":
                self.decoded.append("whole column")
            return self.rows[key]
        self.decoded.append(key)
        return {k: v[key] for k, v in self.rows.items()}


def test_tar_shards_read_like_the_folder_and_encode_identically(shards, teacher_dir):  # noqa: F811
    records = read_tar_shards(shards)
    assert [c for _, c in records] == CAPTIONS and records[4][0] == _png(4)
    assert read_source(shards) == records and read_source(str(shards / "*.tar")) == records
    assert read_source(shards / "00001.tar") == records[3:]
    pipe = load_pipeline(str(teacher_dir))
    from_tar = encode_records(pipe, records, 16, seed=3)
    as_pil = [(Image.open(io.BytesIO(b)), c) for b, c in records]  # same images, another source type
    from_pil = encode_records(pipe, as_pil, 16, seed=3)
    assert torch.equal(from_tar.latents, from_pil.latents)
    hf = read_hf_dataset(FakeDataset({"image": [Image.open(io.BytesIO(b)) for b, _ in records],
                                      "text": [c for _, c in records]}))
    assert torch.equal(encode_records(pipe, hf, 16, seed=3).latents, from_tar.latents)
    assert torch.equal(from_tar.cond["encoder_hidden_states"], from_pil.cond["encoder_hidden_states"])


def test_tar_shard_errors(tmp_path, shards):
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        _add(tar, "a.png", _png(0))
    with pytest.raises(ProReflowError, match="have no .txt member"):
        read_tar_shards(tmp_path / "bad.tar")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 10)
    with pytest.raises(ProReflowError, match="cannot read tar shard"):
        read_tar_shards(tmp_path / "junk.tar")
    with pytest.raises(ProReflowError, match="no .tar shards"):
        read_tar_shards(tmp_path / "nothing-*.tar")
    # a shard cut at a member boundary is a valid, shorter archive to tarfile: refused by its missing end marker
    whole = (shards / "00000.tar").read_bytes()
    with tarfile.open(shards / "00000.tar") as tar:
        members = tar.getmembers()
    cut = members[3].offset  # the header of sample001.txt: the first sample is complete before it
    (tmp_path / "cut.tar").write_bytes(whole[:cut])
    with tarfile.open(tmp_path / "cut.tar") as tar:  # what a reader without the check sees: no error, 3 members
        assert len(tar.getmembers()) == 3
    with pytest.raises(ProReflowError, match="ends without the end-of-archive marker: it was cut short"):
        read_tar_shards(tmp_path / "cut.tar")
    # an undecodable image is named by its member and shard (it was named only as 'bytes')
    with tarfile.open(tmp_path / "badimg.tar", "w") as tar:
        _add(tar, "x.txt", b"a cat")
        _add(tar, "x.png", b"not a png")
    (data, caption), = read_tar_shards(tmp_path / "badimg.tar")
    with pytest.raises(ProReflowError, match=r"cannot read image 'x.png in .*badimg.tar'"):
        prepare_image(data, 16)
    import pickle

    assert pickle.loads(pickle.dumps(data)).where == data.where  # the name travels to DataLoader workers


def test_hf_dataset_adapter_and_missing_dependency(monkeypatch):
    ds = FakeDataset({"image": [Image.open(io.BytesIO(_png(i))) for i in range(3)], "text": CAPTIONS[:3], "id": [0, 1, 2]})
    records = read_hf_dataset(ds)
    assert [c for _, c in records] == CAPTIONS[:3] and ds.decoded == []  # images are read lazily
    assert prepare_image(records[1][0], 8).original_size == (20, 24) and ds.decoded == [1]
    raw = FakeDataset({"img": [{"bytes": _png(0), "path": None}], "caption": ["a cat"]})  # undecoded Image feature
    assert torch.equal(prepare_image(read_hf_dataset(raw, "img", "caption")[0][0], 8).pixels,
                       prepare_image(_png(0), 8).pixels)
    with pytest.raises(ProReflowError, match="no caption column 'text'"):
        read_hf_dataset(FakeDataset({"image": [], "caption": []}))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(ProReflowError, match="pip install datasets"):
        load_hf_dataset("user/some-dataset")
    with pytest.raises(ProReflowError, match="pip install datasets"):
        read_source("hf:user/some-dataset:train")


def _cfg(teacher_dir, windows, **kw):  # noqa: F811
    return DistillConfig(gradient_checkpointing=False, time_sampling=TimeSampling(), window_placement="flow",
                         model=str(teacher_dir), resolution=16, steps=2, method=MethodSpec("proreflow", windows=windows),
                         budget_steps=4, teacher_solver=TeacherSolver("euler", 2),
                         train=TrainConfig(lr=1e-3, batch_size=2, progress=False), **kw)


def test_prompt_only_trains_one_window_plans_and_refuses_later_windows(tmp_path, teacher_dir):  # noqa: F811
    pipe = load_pipeline(str(teacher_dir))
    data = encode_prompts_only(pipe, ["a red cat", "the dog"], 16)
    assert data.prompt_only and data.latent_shape == (4, 16, 16) and len(data) == 2
    with pytest.raises(ProReflowError, match=r"stage 1 has 4 windows; those starting at t = 0.75, 0.5, 0.25 < 1 .* "
                                             r"pass image data"):
        distill(_cfg(teacher_dir, "4->k"), pipe, data, tmp_path / "no")
    assert not (tmp_path / "no").exists()
    summary = distill(_cfg(teacher_dir, [1]), pipe, data, tmp_path / "student")
    assert summary["stage_windows"] == [1] and (tmp_path / "student" / "model_index.json").is_file()


def test_prompt_only_sdxl_time_ids_are_the_pipeline_defaults(tmp_path):
    data = encode_prompts_only(tiny_sdxl_pipeline(tmp_path), ["a cat"], 16)
    assert data.cond["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]


def test_cli_prompts_and_data_are_exclusive_and_prompt_errors_are_clear(tmp_path, teacher_dir, image_folder):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\nthe dog\n")
    base = ["distill", "--out", str(tmp_path / "out"), "--model", str(teacher_dir), "--resolution", "16", "--quiet"]
    r = runner.invoke(app, base + ["--prompts", str(prompts)])  # the default preset trains 8 -> 4 windows
    assert r.exit_code == 2 and "start from noised real images" in r.stderr, r.output
    r = runner.invoke(app, base + ["--prompts", str(prompts), "--data", str(image_folder)])
    assert r.exit_code == 2 and "exactly one of --data" in r.stderr
    r = runner.invoke(app, base)
    assert r.exit_code == 2 and "exactly one of --data" in r.stderr


def test_encoded_cache_is_reused_and_repairs_damaged_shards(tmp_path, image_folder):  # noqa: F811
    from proreflow.data.captions import find_pairs

    pipe = tiny_sdxl_pipeline(tmp_path / "parts")
    records = find_pairs(image_folder)
    first = encode_records(pipe, records, 16, seed=1, cache_dir=tmp_path / "cache", shard_size=4)
    shard_files = sorted(p.name for p in (tmp_path / "cache").glob("shard-*.safetensors"))
    assert shard_files == ["shard-00000.safetensors", "shard-00001.safetensors"]
    calls = []
    encode = pipe.vae.encode
    pipe.vae.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    again = encode_records(pipe, records, 16, seed=1, cache_dir=tmp_path / "cache", shard_size=4)
    assert calls == []  # nothing re-encoded
    for a, b in ((first.latents, again.latents), *((first.cond[k], again.cond[k]) for k in first.cond)):
        assert torch.equal(a, b)
    assert set(again.cond) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    shard = tmp_path / "cache" / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    repaired = encode_records(pipe, records, 16, seed=1, cache_dir=tmp_path / "cache", shard_size=4)
    assert len(calls) == 1 and torch.equal(repaired.latents, first.latents)  # only the damaged shard, bit for bit
    other = encode_records(pipe, records, 16, seed=2, cache_dir=tmp_path / "cache", shard_size=4)
    assert len(calls) == 3 and not torch.equal(other.latents, first.latents)  # another seed: a new cache

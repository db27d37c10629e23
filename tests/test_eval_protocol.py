"""Evaluation protocols: ours (a seeded caption per COCO image, bicubic, CLIP ViT-L/14) and the paper's [40]
(Rectified Diffusion's: the first caption, LANCZOS, CLIP ViT-g/14), recorded in every results row."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from proreflow.apps.coco_eval import EvalConfig, RunSpec, evaluate, load_suite
from proreflow.apps.coco_eval.config import PROTOCOLS
from proreflow.data.captions import centre_crop_resize
from proreflow.data.coco import load_coco_captions
from proreflow.errors import ProReflowError
from proreflow.metrics_images import read_image_uint8


def _annotations(path: Path, n_images: int = 6) -> Path:
    """Captions listed out of annotation-id order, so 'first in the file' and 'lowest id' differ."""
    anns = [{"image_id": 100 + i, "id": 1000 + 10 * i + j, "caption": f"image {i} caption {j}"}
            for i in range(n_images) for j in (2, 0, 1)]
    path.write_text(json.dumps({"images": [{"id": 100 + i} for i in range(n_images)], "annotations": anns}))
    return path


def test_first_caption_is_the_files_first_and_the_image_subset_is_the_same(tmp_path):
    ann = _annotations(tmp_path / "a.json")
    first = load_coco_captions(ann, 4, seed=0, choice="first")
    drawn = load_coco_captions(ann, 4, seed=0, choice="random")
    assert first.image_ids == drawn.image_ids
    assert first.captions == [f"image {i - 100} caption 2" for i in first.image_ids]
    assert drawn.captions != first.captions  # seeded draws (fixed by seed 0) are not all the first caption
    with pytest.raises(ProReflowError, match="caption choice must be one of"):
        load_coco_captions(ann, 4, choice="last")


def test_lanczos_and_bicubic_resizing_differ_and_are_named(tmp_path):
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    a, _ = centre_crop_resize(im, 16, "bicubic")
    b, _ = centre_crop_resize(im, 16, "lanczos")
    assert a.size == b.size == (16, 16) and not np.array_equal(np.asarray(a), np.asarray(b))
    im.save(tmp_path / "x.png")
    assert np.array_equal(read_image_uint8(tmp_path / "x.png", 16, "lanczos").permute(1, 2, 0).numpy(), np.asarray(b))
    with pytest.raises(ProReflowError, match="resize filter must be one of"):
        centre_crop_resize(im, 16, "nearest")


def test_the_protocol_picks_the_default_clip_model_and_tables_1_and_3_use_the_papers():
    assert EvalConfig(fid=False).clip_model == "openai/clip-vit-large-patch14"
    assert EvalConfig(fid=False, protocol="rectified-diffusion").clip_model == "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
    assert EvalConfig(fid=False, protocol="rectified-diffusion", clip_model="mine").clip_model == "mine"
    with pytest.raises(ProReflowError, match="protocol must be one of"):
        EvalConfig(fid=False, protocol="theirs")
    assert [load_suite(t, {"fid": False})[1].protocol for t in ("eval-table1", "eval-table2", "eval-table3")] == \
        ["rectified-diffusion", "ours", "rectified-diffusion"]
    assert set(PROTOCOLS) == {"ours", "rectified-diffusion"}


@pytest.mark.parametrize("protocol", ["ours", "rectified-diffusion"])
def test_rows_record_the_protocol_and_its_captions(tmp_path, monkeypatch, protocol):
    import proreflow.apps.coco_eval.generate as gen

    prompts_seen: list[str] = []

    def pipe(prompts, **kw):
        prompts_seen.extend(prompts)
        return SimpleNamespace(images=np.zeros((len(prompts), 16, 16, 3)))

    monkeypatch.setattr(gen, "load_eval_pipeline", lambda spec, dtype, device: pipe)
    cfg = EvalConfig(captions="coco2017-5k", annotations=str(_annotations(tmp_path / "a.json")), num_images=4,
                     resolution=16, batch_size=2, fid=False, clip=False, timing_batches=0, progress=False,
                     protocol=protocol)
    paper = {"coco2017-5k": {"fid": 22.97}, "coco2014-10k": {"fid": 19.1}}
    model = tmp_path / "model"  # a pipeline folder as far as the pre-check reads (the loader is replaced above)
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    rows = evaluate([RunSpec("fake", str(model), steps=2, paper=paper)], cfg, tmp_path / "out")
    assert rows[0]["protocol"] == protocol
    assert rows[0]["paper"] == {"fid": 22.97}  # the paper's numbers of the block these captions are
    assert "| FID (paper) |" in (tmp_path / "out" / "results.md").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["protocol"] == protocol
    assert f"protocol {protocol}" in (tmp_path / "out" / "results.md").read_text()
    expected = load_coco_captions(tmp_path / "a.json", 4, 0, choice=PROTOCOLS[protocol].caption).captions
    assert prompts_seen == expected


def test_results_print_the_papers_numbers_beside_ours():
    from proreflow.apps.coco_eval import markdown_table

    row = dict(method="ProReflow-II", scheduler="own", steps=4, guidance=4.0, seconds_per_image=None, fid=23.5,
               clip=None, device="cpu", paper={"fid": 22.03, "clip": 29.95})
    other = {**row, "method": "PeRFlow", "paper": None}
    summary = dict(title="t", captions="coco2017-5k", num_images=5, resolution=512, seed=0, protocol="ours",
                   reference="ref", clip_model=None)
    md = markdown_table([row, other], summary)
    assert "| FID | CLIP | FID (paper) | CLIP (paper) |" in md
    assert "| 23.50 | n/a | 22.03 | 29.95 |" in md and "| PeRFlow | own | 4 | 4 | n/a | 23.50 | n/a | n/a | n/a |" in md
    assert "(paper)" not in markdown_table([other], summary)  # no paper columns when a suite states none
    timed = markdown_table([{**row, "paper": {"time": 0.21, "fid": 10.7}}], summary)  # Table 2 also has times
    assert "| CLIP | time (paper) | FID (paper) |" in timed and "| 0.21 | 10.70 |" in timed


def test_paper_numbers_are_per_caption_set_and_checked():
    spec = RunSpec("x", "m", paper={"coco2017-5k": {"fid": 27.06}, "coco2014-10k": {"fid": 20.99}})
    assert spec.paper_for("coco2014-10k") == {"fid": 20.99} and spec.paper_for("coco2014-30k") is None
    for bad, match in [({"fid": 22.0}, "keyed by a COCO caption set"), ({"prompts": {"fid": 1.0}}, "keyed by"),
                       ({"coco2017-5k": {"is": 1.0}}, "takes numbers for fid, clip, time"),
                       ({"coco2017-5k": {"fid": "22"}}, "takes numbers"), ({}, "per caption set")]:
        with pytest.raises(ProReflowError, match=match):
            RunSpec("x", "m", paper=bad)


#: the paper's tables (arXiv 2503.04824v1), row for row: (caption set, number of rows, first and last row)
PAPER_TABLES = {
    "eval-table1": [("coco2017-5k", 8, ("2-Rectified Flow", 2, {"fid": 49.32, "clip": 27.36}),
                     ("ProReflow-II", 4, {"fid": 22.03, "clip": 29.95}))],
    "eval-table2": [("coco2014-30k", 17, ("DPM-Solver", 25, {"time": 0.88, "fid": 9.78}),
                     ("ProReflow-II", 4, {"time": 0.21, "fid": 10.70}))],
    "eval-table3": [("coco2017-5k", 3, ("PeRFlow-SDXL", 4, {"fid": 27.06}), ("ProReflow-SDXL", 4, {"fid": 25.36})),
                    ("coco2014-10k", 8, ("PeRFlow-SDXL", 4, {"fid": 20.99}), ("DMD2", 4, {"fid": 19.32}))],
}


@pytest.mark.parametrize("suite", sorted(PAPER_TABLES))
def test_suites_list_the_papers_rows_first_and_in_its_order(suite):
    runs = load_suite(suite, {"fid": False})[0]
    for captions, count, first, last in PAPER_TABLES[suite]:
        rows = [(r.name, r.steps, r.paper_for(captions)) for r in runs if r.paper_for(captions)]
        assert len(rows) == count and rows[0] == first and rows[-1] == last
    stated = [r.paper is not None for r in runs]  # the paper's rows come first, ours after them
    assert stated == sorted(stated, reverse=True)
    assert all(r.guidance == 4.0 for r in runs if r.name.startswith("ProReflow"))  # Table 4's caption


def test_table_1_and_2_rivals_at_every_step_count_the_paper_lists():
    t1 = load_suite("eval-table1", {"fid": False})[0]
    t2 = load_suite("eval-table2", {"fid": False})[0]
    steps = lambda runs, name: sorted(r.steps for r in runs if r.name == name and r.paper)  # noqa: E731
    assert steps(t1, "InstaFlow-0.9B") == [2, 4] and steps(t1, "2-Rectified Flow") == [2, 4]
    assert steps(t1, "ProReflow-II") == [2, 4] and steps(t1, "ProReflow-I") == [4]
    assert steps(t2, "DPM-Solver") == [8, 25] and steps(t2, "LCM-LoRA") == [2, 4]
    assert {r.name for r in t2 if r.paper} >= {"Flash Diffusion", "PCM", "UniPC", "PeRFlow"}


def test_table_3_has_both_blocks_and_the_sdxl_rivals_as_their_cards_run_them():
    from diffusers import LCMScheduler

    from proreflow.schedulers import make_scheduler

    runs, cfg, _ = load_suite("eval-table3", {"fid": False})
    rows = {r.name: r for r in runs}
    assert cfg.captions == "coco2017-5k" and cfg.protocol == "rectified-diffusion"
    assert load_suite("eval-table3", {"fid": False, "captions": "coco2014-10k"})[1].captions == "coco2014-10k"
    lightning, dmd2 = rows["SDXL-Lightning"], rows["DMD2"]
    assert (lightning.scheduler, lightning.timestep_spacing, lightning.guidance) == ("euler", "trailing", 0.0)
    assert (dmd2.scheduler, dmd2.scheduler_overrides, dmd2.guidance) == ("lcm", {"original_inference_steps": 4}, 0.0)
    turbo = rows["SDXL-Turbo"]  # its own Euler-ancestral scheduler and spacing, no guidance, at 512 px
    assert (turbo.scheduler, turbo.timestep_spacing, turbo.guidance, turbo.resolution) == (None, None, 0.0, 512)
    pcm = rows["PCM"]  # the 4-step small-CFG LoRA file, TCD, no guidance (its authors' demo)
    assert (pcm.lora, pcm.lora_weight, pcm.scheduler, pcm.guidance) == (
        "wangfuyun/PCM_Weights", "sdxl/pcm_sdxl_smallcfg_4step_converted.safetensors", "tcd", 0.0)
    sdxl = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                timestep_spacing="leading", steps_offset=1)
    lcm = make_scheduler("lcm", LCMScheduler(**sdxl).config, 4, overrides=dmd2.scheduler_overrides)
    lcm.set_timesteps(4)
    assert lcm.timesteps.tolist() == [999, 749, 499, 249]  # DMD2's training timesteps


def test_an_evaluation_never_replaces_other_results_without_overwrite(tmp_path, monkeypatch):
    """Issue 26: a second suite into the same --out replaced the first one's results.json without a word. The same
    evaluation may run again (its images are reused); other rows or settings need `overwrite`."""
    import proreflow.apps.coco_eval.generate as gen

    monkeypatch.setattr(gen, "load_eval_pipeline", lambda spec, dtype, device: lambda prompts, **kw: SimpleNamespace(
        images=np.zeros((len(prompts), 16, 16, 3))))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    cfg = EvalConfig(captions="coco2017-5k", annotations=str(_annotations(tmp_path / "a.json")), num_images=4,
                     resolution=16, batch_size=2, fid=False, clip=False, timing_batches=0, progress=False)
    out = tmp_path / "out"
    first = [RunSpec("a", str(model), steps=2)]
    evaluate(first, cfg, out)
    evaluate(first, cfg, out)  # the same evaluation again: allowed
    before = (out / "results.json").read_text()
    assert json.loads(before)["rows"][0]["generated_now"] == 0
    other = [RunSpec("b", str(model), steps=2)]
    with pytest.raises(ProReflowError, match=r"holds an evaluation's results made with other settings \(runs: "):
        evaluate(other, cfg, out)
    assert (out / "results.json").read_text() == before
    with pytest.raises(ProReflowError, match=r"\(num_images: 4 -> 3\)"):
        evaluate(first, EvalConfig(**{**cfg.__dict__, "num_images": 3}), out)
    rows = evaluate(other, cfg, out, overwrite=True)
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["rows"]] == ["b"] == \
        [r["method"] for r in rows]


def test_a_finished_row_is_rescored_without_looking_up_its_model(tmp_path, monkeypatch):
    """The pre-flight looks a hub model up only where it will be loaded: a row whose images are all on disk and that
    needs no timing is scored without its model, offline and uncached (docs/evaluation.md)."""
    import proreflow.apps.coco_eval.generate as gen
    import proreflow.apps.sd.export as export

    monkeypatch.setattr(gen, "load_eval_pipeline", lambda spec, dtype, device: lambda prompts, **kw: SimpleNamespace(
        images=np.zeros((len(prompts), 16, 16, 3))))
    cfg = EvalConfig(captions="coco2017-5k", annotations=str(_annotations(tmp_path / "a.json")), num_images=4,
                     resolution=16, batch_size=2, fid=False, clip=False, timing_batches=0, progress=False)
    spec, out = [RunSpec("hub", "nobody-here/not-cached", steps=2)], tmp_path / "out"
    with pytest.raises(ProReflowError, match="no such local folder, and the hub gave"):
        evaluate(spec, cfg, out)  # HF_HUB_OFFLINE=1 (conftest) and not cached: refused before any folder
    assert not out.exists()
    real = export.check_model_reachable
    monkeypatch.setattr(export, "check_model_reachable", lambda model, what="": None)  # as if it were on the hub
    evaluate(spec, cfg, out)
    monkeypatch.setattr(export, "check_model_reachable", real)
    assert evaluate(spec, cfg, out)[0]["generated_now"] == 0  # all on disk: not looked up, not loaded
    with pytest.raises(ProReflowError, match="no such local folder"):  # timing needs the model: looked up
        evaluate(spec, EvalConfig(**{**cfg.__dict__, "timing_batches": 1, "warmup_batches": 0}), out)

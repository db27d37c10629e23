"""The evaluation harness behind the paper's tables 1-3: generate, time, FID, CLIP score.

`evaluate` runs a list of rows on one caption set: images are generated resumably, time per image is
measured in a separate pass (median over batches after warm-up, the device named), and FID / CLIP score are
computed from the images on disk with feature networks handed in by the caller (`metrics_images`), so the
tests run the same code with small local networks. Results go to JSON, a markdown table in the paper's
format, and (when a method has several guidance scales) a plot of FID and CLIP against the scale.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from proreflow import schedulers
from proreflow.apps.coco_eval.config import PROTOCOLS, EvalConfig, RunSpec
from proreflow.apps.coco_eval.generate import (
    LazyGenerate,
    device_name,
    generate_images,
    image_name,
    pick_device,
    time_per_image,
)
from proreflow.apps.coco_eval.report import guidance_sweeps, markdown_table
from proreflow.data.coco import CaptionSet, load_caption_set
from proreflow.errors import ProReflowError
from proreflow.run_lock import run_lock
from proreflow.run_settings import check_not_replacing
from proreflow.store import atomic_write_text, read_json_object


@dataclass
class Metrics:
    """Feature networks, injected: the standard ones come from `metrics_images.load_inception` / `load_clip`."""

    inception: torch.nn.Module | None = None
    clip: tuple[Any, Any] | None = None
    reference: Any = None  # FIDStats
    classifier: Any = None  # metrics_classifier.ClassifierMetrics: prompt accuracy


def coco_id_of(path: Path) -> int | None:
    """COCO image id from a file name: COCO_val2014_000000000042.jpg or 000000000042.jpg -> 42."""
    tail = path.stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def prepare_metrics(cfg: EvalConfig, device: torch.device, inception: torch.nn.Module | None = None,
                    clip: tuple[Any, Any] | None = None, image_ids: Sequence[int | None] = ()) -> Metrics:
    """Load (or take the given) networks and the reference statistics once for all runs."""
    from proreflow import metrics_images as mi

    m = Metrics()
    if cfg.fid:
        if cfg.ref_stats:
            m.reference = mi.FIDStats.load(cfg.ref_stats)  # checked before the network loads: cheap errors first
        else:
            files = mi.image_files(cfg.reference)
            if cfg.ref_same_images:
                wanted = {i for i in image_ids if i is not None}
                files = [f for f in files if coco_id_of(f) in wanted]
                found = {coco_id_of(f) for f in files}
                if len(found) < len(wanted):
                    missing = sorted(wanted - found)
                    raise ProReflowError(f"--ref-same-images: {len(missing)} of the {len(wanted)} chosen COCO images are "
                                         f"not in {cfg.reference!r} (e.g. id {missing[0]}); pass the folder of the "
                                         f"matching COCO split")
            if not cfg.ref_resize:
                mi.check_sizes(files, cfg.resolution)
        m.inception = inception if inception is not None else mi.load_inception(cfg.inception)
        m.inception = m.inception.to(device)
        if m.reference is None:
            batches = mi.image_batches(files, cfg.batch_size, cfg.resolution if cfg.ref_resize else None,
                                       cfg.progress, "reference features", PROTOCOLS[cfg.protocol].resample)
            m.reference = mi.image_stats(m.inception, batches, device)
        if cfg.save_ref_stats:
            m.reference.save(cfg.save_ref_stats)
    if cfg.clip:
        m.clip = clip if clip is not None else mi.load_clip(cfg.clip_model)
    if cfg.classifier:
        from proreflow.metrics_classifier import ClassifierMetrics

        m.classifier = ClassifierMetrics.load(cfg.classifier)
    return m


def score_folder(folder: Path, captions: Sequence[str], metrics: Metrics, cfg: EvalConfig,
                 device: torch.device) -> dict[str, float | None]:
    """FID against the reference, CLIP score and prompt accuracy against the captions, from the PNGs on disk."""
    from proreflow import metrics_images as mi

    files = [folder / image_name(i) for i in range(len(captions))]
    out: dict[str, float | None] = {"fid": None, "clip": None, "prompt_accuracy": None}
    if metrics.inception is not None:
        stats = mi.image_stats(metrics.inception, mi.image_batches(files, cfg.batch_size, None, cfg.progress,
                                                                   f"FID features {folder.name}"), device)
        out["fid"] = mi.frechet_distance(metrics.reference, stats)
    if metrics.clip is not None:
        metric = mi.clip_metric(*metrics.clip).to(device)
        batches = ((b.to(device), list(captions[i:i + cfg.batch_size])) for i, b in
                   zip(range(0, len(files), cfg.batch_size),
                       mi.image_batches(files, cfg.batch_size, None, cfg.progress, f"CLIP {folder.name}")))
        out["clip"] = mi.clip_score(metric, batches)
    if metrics.classifier is not None:
        from proreflow.metrics_classifier import to_classifier_input

        size = metrics.classifier.size
        images = torch.cat([to_classifier_input(b, size) for b in
                            mi.image_batches(files, cfg.batch_size, None, cfg.progress, f"classifier {folder.name}")])
        out["prompt_accuracy"] = metrics.classifier.prompt_accuracy(images, captions)
    return out


#: RunSpec fields added after run folders were first written: left out of run.json while unset, so that
#: earlier folders still resume
_LATER_FIELDS = ("pipeline", "unet_delta", "delta_variant", "unet_weights", "scheduler_overrides", "resolution",
                 "lora_weight")


def _spec_meta(spec: RunSpec) -> dict[str, Any]:
    """What made a row's images (the paper's numbers did not)."""
    return {k: v for k, v in asdict(spec).items() if k != "paper" and not (k in _LATER_FIELDS and v is None)}


def _check_run_folder(folder: Path, meta: dict[str, Any]) -> None:
    """Images on disk may be reused only if they were made with the same settings and captions."""
    f = folder / "run.json"
    if f.is_file():
        old = read_json_object(f, "the settings of the images", "choose another --out or delete that folder")
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ProReflowError(f"{str(folder)!r} holds images made with other settings ({', '.join(diff)} differ); "
                                 f"choose another --out or delete that folder")
    else:
        atomic_write_text(f, json.dumps(meta, indent=1))


def evaluate(runs: Sequence[RunSpec], cfg: EvalConfig, out: str | Path, *, inception: torch.nn.Module | None = None,
             clip: tuple[Any, Any] | None = None, captions: CaptionSet | None = None,
             title: str = "", overwrite: bool = False) -> list[dict[str, Any]]:
    """Run every spec (each guidance scale of a sweep is its own row) and write results.json / results.md. Results of
    other rows or settings in `out` are refused unless `overwrite` (the same evaluation reruns, reusing its images)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ProReflowError(f"--out {str(out)!r} exists and is not a folder")
    rows_in = [r for spec in runs for r in spec.expand()]
    slugs = [r.slug for r in rows_in]
    if len(set(slugs)) != len(slugs):
        raise ProReflowError(f"two runs share name, scheduler, steps and guidance: {sorted({s for s in slugs if slugs.count(s) > 1})}")
    # a row made before that needs no timing is scored without loading its model, so its model is not looked up
    _preflight(rows_in, made_before={r.slug for r in rows_in if (out / "runs" / r.slug / "run.json").is_file()}
               if not cfg.timing_batches else set())
    if captions is None:
        captions = load_caption_set(cfg.captions, cfg.annotations, cfg.prompts, cfg.num_images, cfg.seed,
                                    PROTOCOLS[cfg.protocol].caption)
    if not captions.captions:
        raise ProReflowError("the caption set is empty")
    kept = ("title", "captions", "num_images", "resolution", "seed", "protocol", "reference")
    check_not_replacing(out / "results.json", {"title": title, "captions": captions.name,
                                               "num_images": len(captions.captions), "resolution": cfg.resolution,
                                               "seed": cfg.seed, "protocol": cfg.protocol,
                                               "reference": cfg.ref_stats or cfg.reference, "runs": slugs},
                        overwrite, "an evaluation's results",
                        lambda old: {**{k: old.get(k) for k in kept},
                                     "runs": [Path(str(r.get("folder", ""))).name for r in old.get("rows", [])
                                              if isinstance(r, dict)]})
    device = pick_device()
    metrics = prepare_metrics(cfg, device, inception, clip, captions.image_ids)
    if metrics.classifier is not None and not bool((metrics.classifier.prompt_classes(captions.captions) >= 0).any()):
        raise ProReflowError(f"--classifier: no caption names one of its classes {list(metrics.classifier.class_names)}, "
                             f"so prompt accuracy has nothing to score")
    with run_lock(out):  # one writer per folder (docs/reliability.md); makes `out`
        atomic_write_text(out / "captions.json", json.dumps({"name": captions.name, "captions": captions.captions,
                                                             "image_ids": captions.image_ids}, indent=0))
        rows: list[dict[str, Any]] = []
        for spec in rows_in:
            folder = out / "runs" / spec.slug
            folder.mkdir(parents=True, exist_ok=True)
            _check_run_folder(folder, {"spec": _spec_meta(spec), "resolution": cfg.resolution, "seed": cfg.seed,
                                       "captions": captions.name, "num_captions": len(captions.captions),
                                       "captions_hash": _hash(captions.captions), "dtype": cfg.dtype})
            generate = LazyGenerate(spec, cfg, device)  # a finished run is scored without loading its model
            made = generate_images(generate, captions.captions, folder, cfg.resolution, cfg.seed, cfg.batch_size,
                                   cfg.progress, desc=spec.slug)
            timing = None
            if cfg.timing_batches:  # loaded before the clock starts, even with no warm-up batches
                timing = time_per_image(generate.load(), captions.captions, cfg.timing_batch_size or cfg.batch_size,
                                        cfg.warmup_batches, cfg.timing_batches, device)
            scores = score_folder(folder, captions.captions, metrics, cfg, device)
            row = {"method": spec.name, "model": spec.model, "unet_delta": spec.unet_delta, "unet_weights": spec.unet_weights,
                   "scheduler": spec.scheduler or "own",
                   "timestep_spacing": spec.timestep_spacing if spec.scheduler in schedulers.SPACED else None, "steps": spec.steps,
                   "guidance": spec.guidance, "generated_at": spec.resolution or cfg.resolution,
                   "images": len(captions.captions), "generated_now": made,
                   "seconds_per_image": timing["seconds_per_image"] if timing else None,
                   "device": timing["device"] if timing else device_name(device), "fid": scores["fid"],
                   "clip": scores["clip"], "prompt_accuracy": scores["prompt_accuracy"], "paper": spec.paper_for(captions.name), "protocol": cfg.protocol, "clip_model": cfg.clip_model if cfg.clip else None,
                   "timing": timing, "folder": str(folder)}
            atomic_write_text(folder / "result.json", json.dumps(row, indent=1))
            rows.append(row)
            del generate
        summary = {"title": title, "captions": captions.name, "num_images": len(captions.captions),
                   "resolution": cfg.resolution, "seed": cfg.seed, "protocol": cfg.protocol,
                   "clip_model": cfg.clip_model if cfg.clip else None,
                   "reference": cfg.ref_stats or cfg.reference, "rows": rows}
        atomic_write_text(out / "results.json", json.dumps(summary, indent=1))
        atomic_write_text(out / "results.md", markdown_table(rows, summary))
        if any(len(v) > 1 for v in guidance_sweeps(rows).values()):
            from proreflow.plotting import plot_guidance_sweep

            plot_guidance_sweep(guidance_sweeps(rows), [("fid", "FID (lower is better)"), ("clip", "CLIP score (higher is better)")],
                                out / "cfg_sweep.png")
        return rows


def _is_local(name: str) -> bool:
    """A model or weights name written as a filesystem path (absolute, ./, ../ or ~), not a hub id."""
    return name.startswith(("/", "./", "../", "~"))


def _preflight(rows: Sequence[RunSpec], made_before: set[str] | frozenset[str] = frozenset()) -> None:
    """What can be checked of every row without loading a model, before any folder is written: a later row used to
    fail only after the earlier rows were generated, leaving its run folder behind (issue 26). A local model or
    UNet weights file must exist (a safetensors one with a readable header), the model must be a diffusers folder
    or a hub id whose model_index.json the cache or the hub has, and a proreflow student's step count must be a
    multiple of its windows. `made_before`: slugs of rows whose model will not be loaded (not looked up)."""
    from proreflow.apps.sd.export import check_model_reachable, check_weights_file, student_windows

    reached: set[str] = set()
    for spec in rows:
        for what, name in (("model", spec.model), ("unet_weights", spec.unet_weights), ("unet_delta", spec.unet_delta),
                           ("lora", spec.lora)):
            if name and _is_local(name) and not Path(name).expanduser().exists():
                raise ProReflowError(f"run {spec.name!r}: cannot load the {what} {name!r}: it does not exist")
            if name and what != "model":
                check_weights_file(name, f"the {what} of run {spec.name!r}")
        if spec.model not in reached and spec.slug not in made_before:
            check_model_reachable(spec.model, f"the model of run {spec.name!r}")
            reached.add(spec.model)
        windows = student_windows(spec.model)  # None for any folder or hub id without a proreflow.json
        if windows is not None:
            try:
                windows.steps_per_window(spec.steps)
            except ProReflowError as exc:
                raise ProReflowError(f"run {spec.name!r}: {exc}") from None


def _hash(captions: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]

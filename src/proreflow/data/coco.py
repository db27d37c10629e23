"""Caption sets for evaluation: COCO captions from a local annotations file, or a prompt file.

The paper's tables use COCO-2017 val (5k images) and COCO-2014 val (30k or 10k images drawn at
random from its 40,504), one caption per image. The annotations file (`captions_val2017.json`,
`captions_val2014.json`) is read locally; the subset and each image's caption are drawn from a
seeded generator so that every method of a table is evaluated on the same captions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from proreflow.data.captions import read_prompts
from proreflow.errors import ProReflowError

# name -> (annotations file the set is drawn from, number of images)
COCO_SETS: dict[str, tuple[str, int]] = {
    "coco2017-5k": ("captions_val2017.json", 5000),
    "coco2014-30k": ("captions_val2014.json", 30000),
    "coco2014-10k": ("captions_val2014.json", 10000),
}
CAPTION_SETS = tuple(COCO_SETS) + ("prompts",)


@dataclass(frozen=True)
class CaptionSet:
    """Captions in evaluation order; `image_ids` are COCO image ids (None for a prompt file)."""

    name: str
    captions: list[str]
    image_ids: list[int | None]


#: which of an image's captions a row uses: one drawn from the seed (ours), or the image's first in the
#: annotations file (Rectified Diffusion's COCO scripts)
CAPTION_CHOICES = ("random", "first")


def load_coco_captions(annotations: str | Path, num_images: int, seed: int = 0, name: str = "coco",
                       choice: str = "random") -> CaptionSet:
    """`num_images` images drawn without replacement by `seed`, one caption each (`choice`), by image id."""
    if choice not in CAPTION_CHOICES:
        raise ProReflowError(f"caption choice must be one of {list(CAPTION_CHOICES)}, got {choice!r}")
    p = Path(annotations)
    if not p.is_file():
        raise ProReflowError(f"COCO annotations file {str(p)!r} does not exist; download the 'annotations' archive "
                             f"of COCO (e.g. annotations_trainval2017.zip) and pass the path of its captions_val*.json")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProReflowError(f"COCO annotations file {str(p)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ProReflowError(f"COCO annotations file {str(p)!r} has no 'annotations' list; expected a COCO captions "
                             f"file such as captions_val2017.json")
    by_image: dict[int, list[tuple[int, str]]] = {}
    for i, a in enumerate(data["annotations"]):
        if not (isinstance(a, dict) and isinstance(a.get("image_id"), int) and isinstance(a.get("caption"), str)):
            raise ProReflowError(f"COCO annotations file {str(p)!r}: entry {i} of 'annotations' lacks an integer "
                                 f"'image_id' or a string 'caption'")
        by_image.setdefault(a["image_id"], []).append((int(a.get("id", i)), a["caption"].strip()))
    if num_images < 1:
        raise ProReflowError(f"number of images must be >= 1, got {num_images}")
    if len(by_image) < num_images:
        raise ProReflowError(f"COCO annotations file {str(p)!r} has captions for {len(by_image)} images, fewer than "
                             f"the {num_images} asked for")
    rng = np.random.default_rng(seed)
    ids = sorted(by_image)
    chosen = sorted(ids[j] for j in rng.permutation(len(ids))[:num_images])
    captions = []
    for image_id in chosen:
        if choice == "first":
            captions.append(by_image[image_id][0][1])  # the file's order
            continue
        options = sorted(by_image[image_id])  # by annotation id: independent of the file's order
        captions.append(options[int(rng.integers(len(options)))][1])
    return CaptionSet(name, captions, list(chosen))


def load_caption_set(name: str, annotations: str | Path | None = None, prompts: str | Path | None = None,
                     num_images: int | None = None, seed: int = 0, choice: str = "random") -> CaptionSet:
    """A named COCO set (needs `annotations`) or 'prompts' (a text file, one prompt per line)."""
    if name == "prompts":
        if prompts is None:
            raise ProReflowError("caption set 'prompts' needs a prompt file (--prompts FILE, one prompt per line)")
        lines = read_prompts(prompts)
        if num_images is not None:
            if num_images < 1:
                raise ProReflowError(f"number of images must be >= 1, got {num_images}")
            lines = lines[:num_images]
        return CaptionSet("prompts", lines, [None] * len(lines))
    if name not in COCO_SETS:
        raise ProReflowError(f"unknown caption set {name!r}; use one of {list(CAPTION_SETS)}")
    file_name, n = COCO_SETS[name]
    if annotations is None:
        raise ProReflowError(f"caption set {name!r} needs the COCO annotations file {file_name} (--annotations PATH)")
    return load_coco_captions(annotations, n if num_images is None else num_images, seed, name, choice)

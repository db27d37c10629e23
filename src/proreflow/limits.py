"""Every size bound of the package, in one place (docs/reliability.md): a setting past one is refused before any
work, with one error line. Each bound is far above any sensible run and far below what hangs, fills memory or
ends in a traceback after hours of training (issue 26: `sample --steps 1e12` grew memory 1 GB every 5 s)."""

from __future__ import annotations

#: seeds: what numpy accepts, and small enough that the seeds combined from them (seed * 1_000_003 + ...) stay below
#: 2**63
MAX_SEED = 2**31 - 1
#: a preset file, and its values with YAML aliases expanded (a nested alias "bomb" is a few hundred bytes)
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000
#: sampling steps: one per training timestep of a 1000-step teacher
MAX_SAMPLING_STEPS = 1000
#: image sides in pixels (SDXL samples at 1024; 4096 leaves room for upscaled fine-tunes)
MAX_RESOLUTION = 4096
#: counts of work the toy and digits benchmarks run or hold in memory (points, optimizer steps, shard sizes)
MAX_COUNT = 10**7
#: evaluation samples the digits benchmark holds in memory at once
MAX_HELD_SAMPLES = 100_000
#: images one evaluation generates (COCO-2014's 30k-caption protocol is the largest in use)
MAX_EVAL_IMAGES = 10**6
#: step intervals of logging and validation
MAX_INTERVAL = 10**9
#: validation prompts shown per image grid (a row of student images over one of teacher images)
MAX_PROMPTS = 16
#: sampling steps of the toy's and the digits benchmark's students and baselines
MAX_TOY_STEPS = 64
#: the digits benchmark's UNet: channels per block and layers per block
MAX_UNET_WIDTH = 1024
MAX_LAYERS_PER_BLOCK = 8

"""Applications on top of the algorithm and the training loop, one package each: `toy` (proreflow demo and
train), `digits` (the digits benchmark), `sd` (Stable Diffusion distillation and export), `coco_eval`
(text-to-image evaluation and other projects' students). Each holds its config, its run and its report;
the CLI only maps flags onto them (docs/design.md §3)."""

"""Teacher families: one module per kind of diffusers pipeline, each the single owner of what that kind is
(docs/design.md §3, "adding a teacher family").

A family answers, for a pipeline of its kind: is this one of mine (`detects`), which network denoises, how that
network becomes our velocity field, how prompts and images are encoded (and decoded), where windows and the
teacher's solver grid sit on its time axis, and which scheduler a student is exported with. Nothing outside
`fields/families/` asks what kind a pipeline is (`tests/test_layout.py`); it calls `family_of(pipe)`.

To add a family: subclass `TeacherFamily` (or `VPFamily` / `FlowFamily`) in a module here, decorate it with
`@register`, and import the module at the end of this file. `sd.py` and `sdxl.py` are the VP examples, `sd3.py`
and `flux.py` the flow-matching ones (`flux.py` was added this way).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

from torch import Tensor, nn

from proreflow.errors import ProReflowError
from proreflow.windows import BoundaryMap, WindowSchedule

#: `window_placement` values: windows uniform in our flow time, or where the teacher's scheduler steps (PeRFlow's)
PLACEMENTS = ("flow", "timesteps")


def check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ProReflowError(f"window_placement must be one of {list(PLACEMENTS)}, got {placement!r}")


class TeacherFamily:
    """What a kind of diffusers pipeline is, for distillation. Subclasses set the class variables and override
    what differs; every method takes the pipeline, so one instance serves every pipeline of its kind."""

    name: ClassVar[str]
    #: pipeline class names this family distils (matched against the pipeline's class and its bases)
    pipeline_classes: ClassVar[tuple[str, ...]]
    denoiser_name: ClassVar[str] = "unet"
    #: the keyword `save_lora_weights` takes the denoiser's LoRA layers under
    lora_key: ClassVar[str] = "unet_lora_layers"
    has_safety_checker: ClassVar[bool] = True

    @classmethod
    def detects(cls, pipe: Any) -> bool:
        return cls.detects_class({c.__name__ for c in type(pipe).__mro__})

    @classmethod
    def detects_class(cls, class_names: set[str]) -> bool:
        return bool(class_names & set(cls.pipeline_classes))

    # --- the network and its velocity field
    def denoiser(self, pipe: Any) -> nn.Module:
        return getattr(pipe, self.denoiser_name)

    def field(self, pipe: Any, network: nn.Module | None = None, guidance_scale: float = 1.0) -> nn.Module:
        """The velocity-field view of `network` (default the pipeline's denoiser)."""
        raise NotImplementedError

    def register_student(self, pipe: Any, network: nn.Module, scheduler: Any) -> None:
        pipe.register_modules(**{self.denoiser_name: network, "scheduler": scheduler})

    # --- time axis
    def placement(self, pipe: Any, placement: str, resolution: int | None = None) -> BoundaryMap | None:
        """The boundary map of `placement` (None: uniform in flow time)."""
        raise NotImplementedError

    def teacher_grid(self, pipe: Any, placement: str, steps: int, resolution: int | None = None) -> tuple[float, ...]:
        """Where a placed teacher solver (`TeacherSolver(mode="placed")`) steps: `steps` + 1 flow times, 1 to 0."""
        raise NotImplementedError

    def student_scheduler(self, pipe: Any, windows: WindowSchedule, resolution: int | None = None) -> tuple[Any, str]:
        """The scheduler a student with final `windows` is exported with, and why."""
        raise NotImplementedError

    # --- inputs
    def text_encoders(self, pipe: Any) -> list[nn.Module]:
        """Every text encoder the pipeline has (moved to the device while encoding)."""
        return [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None),
                            getattr(pipe, "text_encoder_3", None)) if m is not None]

    def encode_text(self, pipe: Any, prompts: list[str], batch: int = 64) -> dict[str, Tensor]:
        raise NotImplementedError

    def uncond_text(self, pipe: Any) -> dict[str, Tensor]:
        """One row of what the pipeline uses as its negative at sampling: the empty prompt's conditioning."""
        return self.encode_text(pipe, [""])

    def image_cond(self, sizes: Sequence[tuple[tuple[int, int], tuple[int, int]]], resolution: int) -> dict[str, Tensor]:
        """Per-image conditioning from (original size, crop top-left) pairs (SDXL's size ids); none by default."""
        return {}

    def to_latent_space(self, pipe: Any, z: Tensor) -> Tensor:
        """A VAE sample in the denoiser's space: the inverse of what the pipeline decodes."""
        return z * pipe.vae.config.scaling_factor

    def from_latent_space(self, pipe: Any, z: Tensor) -> Tensor:
        """Inverse of `to_latent_space`, before `vae.decode`."""
        return z / pipe.vae.config.scaling_factor

    def latent_shape(self, pipe: Any, resolution: int) -> tuple[int, int, int]:
        f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return (pipe.vae.config.latent_channels, resolution // f, resolution // f)

    def cache_identity(self, pipe: Any) -> dict[str, Any]:
        """What an encode cache records about the kind of pipeline that made it."""
        return {"sdxl": False}


FAMILIES: list[TeacherFamily] = []


def register(cls: type[TeacherFamily]) -> type[TeacherFamily]:
    """Class decorator: `family_of` considers the family (the most specific first: register subclasses later)."""
    if any(f.name == cls.name for f in FAMILIES):
        raise ProReflowError(f"teacher family {cls.name!r} is registered twice")
    FAMILIES.insert(0, cls())
    return cls


def supported() -> list[str]:
    return [c for f in reversed(FAMILIES) for c in f.pipeline_classes]


def family_of(pipe: Any) -> TeacherFamily:
    """The family of a diffusers pipeline, or a clear error naming the pipelines proreflow distils."""
    for family in FAMILIES:
        if family.detects(pipe):
            return family
    raise ProReflowError(f"a {type(pipe).__name__} is not a teacher proreflow distils; it distils "
                         f"{', '.join(supported())}")


def family_for_class(class_name: str) -> TeacherFamily | None:
    """The family of a pipeline saved with `model_index.json`'s `_class_name` (None when none matches)."""
    import diffusers

    cls = getattr(diffusers, str(class_name), None)
    names = {c.__name__ for c in cls.__mro__} if isinstance(cls, type) else {str(class_name)}
    return next((f for f in FAMILIES if f.detects_class(names)), None)


def uniform_grid(steps: int) -> tuple[float, ...]:
    return tuple(1.0 - j / steps for j in range(steps + 1))


# registers them; the error for an unknown pipeline lists them in this order
from proreflow.fields.families import sd, sdxl, sd3, flux  # noqa: E402,F401,I001

__all__ = ["FAMILIES", "PLACEMENTS", "BoundaryMap", "TeacherFamily", "check_placement", "family_for_class",
           "family_of", "register", "supported", "uniform_grid"]

"""Window placement: uniform in flow time, or uniform in a VP teacher's timesteps (PeRFlow's), through training,
export and the exported scheduler."""

import json

import pytest
import torch
from diffusers import DDPMScheduler

from proreflow.apps.sd import DistillConfig, distill, encode_folder, load_pipeline, scheduler_for
from proreflow.errors import ProReflowError
from proreflow.fields import VPSchedule, timestep_placement, window_placement
from proreflow.methods import MethodSpec
from proreflow.pairs import TeacherSolver
from proreflow.time_sampling import TimeSampling
from proreflow.training import Recipe, TrainConfig

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _starts(vp: VPSchedule, boundaries) -> list[int]:
    return [round(float(vp.timestep_of_t(torch.tensor(t, dtype=torch.float64)))) for t in boundaries[:-1]]


def test_four_timestep_windows_for_sd15_start_at_perflows_999_749_499_249():
    vp = VPSchedule.from_scheduler(DDPMScheduler(**SD15))
    method = MethodSpec("proreflow", windows="8->k", lam=1.0)
    timesteps = Recipe(method, 100, placement=timestep_placement(vp)).plan(4)
    assert _starts(vp, timesteps.final.boundaries) == [999, 749, 499, 249]
    assert _starts(vp, timesteps.stages[0].schedule.boundaries) == [999, 874, 749, 624, 499, 374, 249, 124]
    flow = Recipe(method, 100).plan(4)  # uniform in flow time: what the toy and digits runs use
    exact = [float(vp.timestep_of_t(torch.tensor(t, dtype=torch.float64))) for t in flow.final.boundaries[1:-1]]
    assert exact == pytest.approx([673.16, 353.89, 95.31], abs=0.01)  # uniform flow time: off the integer timesteps


def test_the_exported_scheduler_samples_the_placement_the_student_trained_on():
    vp = VPSchedule.from_scheduler(DDPMScheduler(**SD15))
    final = Recipe(MethodSpec("p", windows=[4]), 10, placement=timestep_placement(vp)).plan(4).final
    sched = scheduler_for(SD15, final)
    sched.set_timesteps(4)
    assert [round(float(t)) for t in sched.timesteps] == [999, 749, 499, 249]
    sched.set_timesteps(8)  # two Euler steps per window: every other step is a window start
    assert [round(float(t)) for t in sched.timesteps[::2]] == [999, 749, 499, 249]


def test_placement_is_a_checked_setting():
    with pytest.raises(ProReflowError, match="window_placement must be one of"):
        DistillConfig(window_placement="middle")


def test_distill_trains_and_exports_on_the_teacher_timestep_placement(tmp_path, teacher_dir, image_folder):
    pipe = load_pipeline(str(teacher_dir))
    cfg = DistillConfig(model=str(teacher_dir), resolution=16, steps=2, method=MethodSpec("p", windows="4->k"),
                        budget_steps=2, teacher_solver=TeacherSolver("euler", 1), gradient_checkpointing=False,
                        time_sampling=TimeSampling(), window_placement="timesteps",
                        train=TrainConfig(lr=1e-3, batch_size=2, progress=False, mixed_precision="no"))
    data = encode_folder(pipe, image_folder, cfg.resolution)
    vp = VPSchedule.from_scheduler(pipe.scheduler)
    summary = distill(cfg, pipe, data, tmp_path / "student")
    T = vp.num_train_timesteps
    assert summary["window_placement"] == "timesteps"
    assert _starts(vp, summary["windows"]) == [T - 1, T // 2 - 1]
    exported = json.loads((tmp_path / "student" / "scheduler" / "scheduler_config.json").read_text())
    # windows at the teacher's timesteps: stock DDIM (trailing, ending on the data) samples the student
    assert exported["_class_name"] == "DDIMScheduler" and summary["scheduler"] == "DDIMScheduler"
    assert exported["timestep_spacing"] == "trailing" and exported["set_alpha_to_one"] is True
    assert window_placement(pipe, "flow") is None

"""The whole main path at tiny sizes, as a user runs it: `proreflow mini-teacher` -> `proreflow distill --model <it>`
-> export (stock DDIMScheduler + model card) -> a fresh process that never imports proreflow loads the student with
`StableDiffusionPipeline.from_pretrained` and samples it -> `proreflow sample`. (The full-size run is
benchmarks/mini_sd_distill.py.)"""

import json
import subprocess
import sys

import torch
import yaml
from typer.testing import CliRunner

from test_minisd import TINY, fashion_like, tiny_yaml, trained  # noqa: F401  (fixtures)

from proreflow.cli import app
from proreflow.config import PRESET_DIR

_FRESH = """
import json, sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)
lat = pipe(["a photo of a dress"], num_inference_steps=4, guidance_scale=1.0, output_type="latent",
           latents=torch.load(sys.argv[2]), generator=torch.Generator().manual_seed(0)).images
torch.save(lat, sys.argv[3])
print(json.dumps({"scheduler": type(pipe.scheduler).__name__, "spacing": pipe.scheduler.config.timestep_spacing,
                  "proreflow_imported": any(m.startswith("proreflow") for m in sys.modules)}))
"""


def test_mini_teacher_distil_export_load_alone_and_sample(tmp_path, trained, fashion_like):  # noqa: F811
    preset = yaml.safe_load((PRESET_DIR / "mini-sd-proreflow-I.yaml").read_text())
    preset.update(resolution=16, budget_steps=2, teacher_solver={"method": "euler", "steps": 8, "mode": "placed"})
    preset["train"].update(batch_size=4, warmup_steps=1, mixed_precision="no")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(preset))
    out = tmp_path / "student"
    r = CliRunner().invoke(app, ["distill", "--preset", str(tmp_path / "p.yaml"), "--model", str(trained), "--data",
                                 str(fashion_like), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "proreflow.json").read_text())
    assert summary["scheduler"] == "DDIMScheduler" and summary["stage_windows"] == [8, 4]
    assert summary["teacher_nfe_per_pair"] > 0
    assert (out / "README.md").read_text().startswith("---\nbase_model: ")

    latent = json.loads((trained / "unet" / "config.json").read_text())
    noise = torch.randn(1, latent["in_channels"], latent["sample_size"], latent["sample_size"],
                        generator=torch.Generator().manual_seed(3))
    torch.save(noise, tmp_path / "noise.pt")
    res = subprocess.run([sys.executable, "-c", _FRESH, str(out), str(tmp_path / "noise.pt"), str(tmp_path / "lat.pt")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"scheduler": "DDIMScheduler", "spacing": "trailing",
                                                               "proreflow_imported": False}
    # our sampler on the exported student from the same noise gives the same latents
    from diffusers import StableDiffusionPipeline

    from proreflow.fields import VPSchedule, VPVelocity
    from proreflow.sampling import sample
    from proreflow.windows import WindowSchedule

    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    emb = pipe.encode_prompt(["a photo of a dress"], "cpu", 1, False)[0]
    with torch.no_grad():
        ours = sample(VPVelocity(pipe.unet, VPSchedule.from_scheduler(pipe.scheduler)), noise,
                      WindowSchedule(tuple(summary["windows"])), cond={"encoder_hidden_states": emb})
    theirs = torch.load(tmp_path / "lat.pt")
    assert torch.allclose(theirs, ours, atol=1e-5 * float(ours.abs().max())), float((theirs - ours).abs().max())

    r = CliRunner().invoke(app, ["sample", "--model", str(out), "--prompt", "a bag", "--steps", "4", "--guidance", "4",
                                 "--out", str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "png" / "000.png").is_file()

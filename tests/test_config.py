from dataclasses import dataclass, field

import pytest

from proreflow.apps.toy import ToyConfig, load_config
from proreflow.config import from_dict
from proreflow.errors import ProReflowError
from proreflow.methods import MethodSpec


def test_packaged_preset_loads_and_resolves_the_paper_layouts():
    cfg = load_config()
    by = {m.name: m for m in cfg.methods}
    assert by["proreflow"].window_counts(4) == [8, 4]  # ProReflow-I
    assert by["proreflow"].window_counts(2) == [8, 4, 2]  # ProReflow-II
    assert by["perflow"].window_counts(4) == [4] and by["2-rectified-flow"].window_counts(2) == [1]
    assert by["proreflow"].lam > 0 and by["perflow"].lam == 0
    assert by["2-rectified-flow"].plan_key(2) == by["2-rectified-flow"].plan_key(4)


@pytest.mark.parametrize("windows, k, expected", [(["k"], 3, [3]), (["4k", "2k", "k"], 2, [8, 4, 2]), ([6, 3], 3, [6, 3]),
                                                  ("16->k", 4, [16, 8, 4]), ("k", 4, [4]), ("2->2", 2, [2])])
def test_window_specs(windows, k, expected):
    assert MethodSpec("m", windows=windows).window_counts(k) == expected


@pytest.mark.parametrize("windows, k, msg", [(["x"], 2, "not an integer"), ([0], 2, ">= 1"), ("8->3", 3, "does not reach"),
                                             ("6->k", 4, "cannot halve|does not reach"), ([], 2, "empty")])
def test_bad_window_specs(windows, k, msg):
    with pytest.raises(ProReflowError, match=msg):
        MethodSpec("m", windows=windows).window_counts(k)


def test_step_count_must_be_a_multiple_of_final_windows():
    with pytest.raises(ProReflowError, match="multiple"):
        MethodSpec("m", windows=[4]).plan(2, 100)
    assert MethodSpec("m", windows=[1]).plan(4, 100).final.num_windows == 1


@dataclass
class Inner:
    a: int = 1
    b: float = 0.5


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    name: str = "x"
    items: list[int | str] = field(default_factory=list)


def test_from_dict_types_and_did_you_mean():
    o = from_dict(Outer, {"inner": {"a": 2, "b": 3}, "items": [1, "k"]})
    assert o.inner == Inner(2, 3.0) and o.items == [1, "k"]
    with pytest.raises(ProReflowError, match="did you mean 'name'"):
        from_dict(Outer, {"nme": "y"})
    with pytest.raises(ProReflowError, match=r"config.inner.a must be an integer"):
        from_dict(Outer, {"inner": {"a": "two"}})
    with pytest.raises(ProReflowError, match="must be a number"):
        from_dict(Outer, {"inner": {"b": True}})
    with pytest.raises(ProReflowError, match="must be a mapping"):
        from_dict(Outer, {"inner": [1]})


def test_toy_config_rejects_duplicates_and_empty_methods():
    with pytest.raises(ProReflowError, match="unique"):
        from_dict(ToyConfig, {"methods": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ProReflowError, match="no methods"):
        from_dict(ToyConfig, {"methods": []})
    with pytest.raises(ProReflowError, match="teacher_solver.method must be one of"):
        from_dict(ToyConfig, {"methods": [{"name": "a"}], "teacher_solver": {"method": "midpoint"}})


def test_user_config_overrides_only_what_it_names(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("train: {lr: 0.01}\nbudget_steps: 77\n")
    cfg = load_config(p)
    default = load_config()
    assert cfg.train.lr == 0.01 and cfg.budget_steps == 77
    assert cfg.train.batch_size == default.train.batch_size and cfg.methods == default.methods
    assert load_config(p, budget_steps=5).budget_steps == 5


def test_distill_config_defaults_are_the_default_preset_and_a_partial_yaml_changes_only_its_keys(tmp_path):
    """Regression: DistillConfig's defaults matched no preset, so a partial user YAML got another teacher solver."""
    from proreflow.apps.sd import DistillConfig, load_distill_config

    assert DistillConfig() == load_distill_config()
    partial = tmp_path / "mine.yaml"
    partial.write_text("lora_rank: 8\n")
    mine = load_distill_config(partial)
    assert mine.lora_rank == 8 and mine.teacher_solver == DistillConfig().teacher_solver
    assert mine.budget_steps == load_distill_config("sd15-proreflow-I").budget_steps


def test_one_recipe_joins_a_method_and_the_preset_settings():
    from proreflow.time_sampling import TimeSampling
    from proreflow.training import Recipe

    cfg = load_config()
    m = next(m for m in cfg.methods if m.name == "proreflow")
    r = cfg.recipe(m)
    assert isinstance(r, Recipe) and r.train == cfg.train and r.teacher_solver == cfg.teacher_solver
    assert r.plan(2).total_steps == cfg.budget_steps and r.sampling == m.sampling(cfg.time_sampling)
    assert r.describe(2) == {"windows": m.window_counts(2), "lam": m.lam, "time_sampling": r.sampling.label(),
                             "pair_source": m.pair_source}
    uniform = Recipe(m, 10, TimeSampling("uniform"))
    assert uniform.key(2) != Recipe(m, 10, TimeSampling("start")).key(2) or m.time_sampling is not None

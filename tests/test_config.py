"""Recipes load, defaults equal tiny-cpu, and every bad value is rejected naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hyperloop_dist.config import Config, ConfigError, load_config, parse_overrides

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_embedded_default_is_tiny_cpu_recipe() -> None:
    tiny = next(r for r in RECIPES if r.name == "tiny-cpu.yaml")
    assert load_config(tiny) == load_config(None) == Config()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert cfg.model.kind == "hyperloop"


def test_overrides_apply_and_parse_yaml_scalars() -> None:
    cfg = load_config(None, ["train.steps=50", "model.loops=4", "model.kind=mhc", "optim.lr=1e-3",
                             "model.num_query_groups=2", "model.hc.streams=2", "logging.wandb_project=null"])
    assert (cfg.train.steps, cfg.model.loops, cfg.model.kind) == (50, 4, "mhc")
    assert cfg.optim.lr == 1e-3 and cfg.model.num_query_groups == 2 and cfg.model.hc.streams == 2
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


BAD = [
    (["model.num_heads=5"], "model.hidden_size=128: must be divisible by model.num_heads=5"),
    (["model.loops=0"], "model.loops=0: must be > 0"),
    (["model.kind=resnet"], "model.kind='resnet': must be one of"),
    (["model.hc.streams=0"], "model.hc.streams=0: must be > 0"),
    (["model.num_query_groups=3"], "model.num_query_groups=3: must divide model.num_heads=4"),
    (["model.hidden_size=96", "model.num_heads=32"], "RoPE needs an even head size"),
    (["model.begin_layers=-1"], "model.begin_layers=-1: must be >= 0"),
    (["model.hiden_size=64"], "unknown field 'model.hiden_size'; did you mean 'model.hidden_size'?"),
    (["modle.loops=2"], "unknown field 'modle'"),
    (["model.loops=two"], "model.loops='two': expected int, got str"),
    (["model.tie_embeddings=1"], "model.tie_embeddings=1: expected bool, got int"),
    (["train.steps"], "expected section.field=value"),
    (["steps=3"], "expected section.field=value"),
    (["model.loops.x=1"], "model.loops={'x': 1}: expected int, got dict"),
    (["model.loops=2", "model.loops.x=1"], "'loops' is a value, not a section"),
    (["optim.lr=fast"], "optim.lr='fast': expected float, got str"),
    (["optim.min_lr=1.0"], "optim.min_lr=1.0: must be <= optim.lr"),
    (["optim.beta2=1.0"], "optim.beta2=1.0: must be in [0, 1)"),
    (["train.precision=fp8"], "train.precision='fp8': must be one of"),
    (["parallel.tp=3"], "parallel.tp=3: must divide model.num_heads=4"),
    (["parallel.tp=2", "model.vocab_size=2047"], "parallel.tp=2: must divide model.vocab_size=2047"),
    (["parallel.engine=horovod"], "parallel.engine='horovod': must be one of"),
    (["parallel.pp=3", "parallel.nproc_per_node=3", "model.tie_embeddings=false"],
     "parallel.pp=3: the middle block's 2 layers are split evenly over the pipeline (model.middle_layers); "
     "valid parallel.pp: 1, 2"),
    (["parallel.pp=4", "parallel.nproc_per_node=4", "model.kind=transformer", "model.tie_embeddings=false"],
     "the middle block's 6 layers are split evenly over the pipeline (model.middle_layers x model.loops); "
     "valid parallel.pp: 1, 2, 3, 6"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved"], "parallel.pp_schedule='interleaved': must be one of "
                                                             "'1f1b', 'gpipe'"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel=true with tp=1: sequence parallelism splits "
                                          "the sequence over the tensor-parallel ranks"),
    (["parallel.engine=fsdp", "parallel.sequence_parallel=true"],
     "parallel.sequence_parallel=true is a setting of the megatron engine (parallel.engine is 'fsdp')"),
    (["parallel.pp=2", "model.tie_embeddings=false", "parallel.overlap_grad_reduce=true"],
     "parallel.overlap_grad_reduce=true with parallel.pp=2: not offered"),
    (["train.recompute=full"], "train.recompute='full': must be one of 'none', 'loop'"),
    (["data.heldout_fraction=0.9"], "data.heldout_fraction=0.9: must be in (0, 0.5)"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_name_the_field(overrides: list[str], message: str) -> None:
    from hyperloop_dist.train import engines

    with pytest.raises(ConfigError) as info:  # as `hyperloop train` loads: the engine's rules too
        engines.validate(load_config(None, overrides))
    assert message in str(info.value)


def test_bad_recipe_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: {kind: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "section.yaml").write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model.: expected a mapping"):
        load_config(tmp_path / "section.yaml")


def test_cli_reports_config_errors_with_exit_code_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "hyperloop_dist.cli", "params", "model.loops=0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "config error: model.loops=0: must be > 0" in proc.stderr

"""`hyperloop params`: the paper's recipes give Table 1's parameter counts in the paper's convention, every
paper-scale recipe keeps the paper's ~0.5 parameter ratio and a tiny HC overhead."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from hyperloop_dist.config import load_config
from hyperloop_dist.model.params import PAPER_LABEL, compare_kinds

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PAPER_SCALES = sorted(RECIPES.glob("hyperloop-*.yaml"))

# Table 1 of the paper, as printed (millions; untied LM head counted, input embedding not). Each figure is
# checked at the precision it is printed with: "238" means round(count / 1e6) == 238, "135.5" means
# round(count / 1e6, 1) == 135.5.
TABLE_1 = {
    "hyperloop-136m": {"transformer": "238", "mhc": "241", "looped": "135.5", "hyperloop": "135.7"},
    "hyperloop-579m": {"transformer": "990.5", "mhc": "997.5", "looped": "579.4", "hyperloop": "579.7"},
    "hyperloop-991m": {"transformer": "2018", "mhc": "2033", "looped": "990.5", "hyperloop": "990.8"},
}


@pytest.mark.parametrize("recipe", list(TABLE_1))
def test_paper_recipes_match_table_1(recipe: str) -> None:
    reports = {r.kind: r for r in compare_kinds(load_config(RECIPES / f"{recipe}.yaml").model)}
    for kind, printed in TABLE_1[recipe].items():
        decimals = len(printed.partition(".")[2])
        measured = round(reports[kind].paper / 1e6, decimals)
        assert measured == float(printed), f"{recipe} {kind}: {reports[kind].paper:,} parameters, Table 1 {printed}M"


@pytest.mark.parametrize("recipe", PAPER_SCALES, ids=lambda p: p.name)
def test_paper_scale_parameter_ratio_and_hc_overhead(recipe: Path) -> None:
    reports = {r.kind: r for r in compare_kinds(load_config(recipe).model)}
    ratio = reports["hyperloop"].paper / reports["transformer"].paper
    assert 0.45 <= ratio <= 0.60, ratio
    assert reports["hyperloop"].hc / reports["hyperloop"].total < 0.01
    # same effective depth: looping saves parameters, not compute
    flops = reports["hyperloop"].train_flops_per_token / reports["transformer"].train_flops_per_token
    assert 1.0 <= flops < 1.01
    assert reports["looped"].total < reports["hyperloop"].total < reports["transformer"].total


def test_paper_count_includes_the_head_and_leaves_out_the_input_embedding() -> None:
    cfg = load_config(RECIPES / "hyperloop-136m.yaml").model
    untied = {r.kind: r for r in compare_kinds(cfg)}["transformer"]
    assert untied.paper == untied.total - cfg.vocab_size * cfg.hidden_size
    tied = {r.kind: r for r in compare_kinds(dataclasses.replace(cfg, tie_embeddings=True))}["transformer"]
    assert tied.paper == tied.total == untied.paper  # the one shared matrix is the head


def test_params_cli_prints_the_paper_count_first() -> None:
    out = subprocess.run([sys.executable, "-m", "hyperloop_dist.cli", "params", str(RECIPES / "hyperloop-136m.yaml")],
                         capture_output=True, text=True, check=True).stdout
    for kind in ("hyperloop", "transformer", "mhc", "looped", "params vs transformer"):
        assert kind in out
    header = next(line for line in out.splitlines() if line.startswith("kind"))
    assert [c.strip() for c in header.split("|")][1:3] == [PAPER_LABEL, "total"]
    row = next(line for line in out.splitlines() if line.startswith("hyperloop "))
    assert [c.strip() for c in row.split("|")][1:3] == ["135.7M", "168.5M"]

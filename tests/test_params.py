"""`hyperloop params`: the paper-scale recipes keep the paper's parameter ratio and a tiny HC overhead."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hyperloop_dist.config import load_config
from hyperloop_dist.model.params import compare_kinds

PAPER_SCALES = sorted(p for p in (Path(__file__).resolve().parents[1] / "recipes").glob("hyperloop-*.yaml"))


@pytest.mark.parametrize("recipe", PAPER_SCALES, ids=lambda p: p.name)
def test_paper_scale_parameter_ratio_and_hc_overhead(recipe: Path) -> None:
    reports = {r.kind: r for r in compare_kinds(load_config(recipe).model)}
    ratio = reports["hyperloop"].total / reports["transformer"].total
    assert 0.45 <= ratio <= 0.60, ratio
    assert reports["hyperloop"].hc / reports["hyperloop"].total < 0.01
    # same effective depth: looping saves parameters, not compute
    flops = reports["hyperloop"].train_flops_per_token / reports["transformer"].train_flops_per_token
    assert 1.0 <= flops < 1.01
    assert reports["looped"].total < reports["hyperloop"].total < reports["transformer"].total


def test_params_cli_prints_every_kind() -> None:
    out = subprocess.run([sys.executable, "-m", "hyperloop_dist.cli", "params", str(PAPER_SCALES[0])],
                         capture_output=True, text=True, check=True).stdout
    for kind in ("hyperloop", "transformer", "mhc", "looped", "params vs transformer"):
        assert kind in out

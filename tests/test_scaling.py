"""`hyperloop scaling fit`: the fitted law recovers known exponents from run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyperloop_dist.cli import main
from hyperloop_dist.cluster.scaling import fit_runs
from hyperloop_dist.cluster.sweep import grid_points, point_dir
from hyperloop_dist.config import ConfigError, dump_config, load_config
from hyperloop_dist.model.params import report

LAWS = {"hyperloop": (1.8, 300.0, 0.35, 900.0, 0.30), "transformer": (1.9, 200.0, 0.30, 900.0, 0.30)}


def _fake_runs(root: Path) -> list[Path]:
    """Finished-looking run directories whose losses follow LAWS exactly (no training needed)."""
    runs = []
    for point in grid_points(["model.hidden_size=32,64,128", "train.steps=100,400,1600"], list(LAWS)):
        run = point_dir(root, point)
        run.mkdir(parents=True)
        cfg = load_config(None, [*point, "model.num_heads=4"])
        dump_config(cfg, run / "config.yaml")
        e, a, alpha, b, beta = LAWS[cfg.model.kind]
        n = report(cfg.model).non_embedding
        tokens = cfg.train.steps * cfg.train.micro_batch_size * cfg.data_parallel_size * cfg.model.seq_length
        loss = e + a * n**-alpha + b * tokens**-beta
        (run / "metrics.jsonl").write_text(json.dumps({"step": cfg.train.steps, "loss": loss + 0.5,
                                                       "tokens": tokens, "heldout_loss": loss}) + "\n")
        runs.append(run)
    return runs


def test_fit_recovers_exponents_and_plots(tmp_path: Path, capsys) -> None:
    runs = _fake_runs(tmp_path / "sweep")
    points, fits = fit_runs(runs)
    assert [f.kind for f in fits] == ["hyperloop", "transformer"]
    for f in fits:
        e, _, alpha, _, beta = LAWS[f.kind]
        assert f.alpha == pytest.approx(alpha, abs=0.02) and f.beta == pytest.approx(beta, abs=0.02)
        assert f.E == pytest.approx(e, abs=0.05) and f.rmse < 1e-3
    png = tmp_path / "fit.png"
    assert main(["scaling", "fit", *map(str, runs), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "hyperloop" in out and "transformer" in out and "note:" not in out  # held-out losses used
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_refuses_too_few_runs_and_bad_grids(tmp_path: Path) -> None:
    runs = _fake_runs(tmp_path / "sweep")
    with pytest.raises(ConfigError, match="at least 5"):
        fit_runs([r for r in runs if "hyperloop" in str(r)][:3])
    with pytest.raises(ConfigError, match="not a finished run"):
        fit_runs([tmp_path])
    with pytest.raises(ConfigError, match="--grid"):
        grid_points(["hidden_size=32"], ["hyperloop"])
    with pytest.raises(ConfigError, match="--kinds"):
        grid_points([], ["llama"])

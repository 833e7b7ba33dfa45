"""Scaling-law studies: the fit recovers a known law (ratio, predictions, intervals), FLOPs per token
match torch's FlopCounterMode, and a real `sweep --local` is read by the fit command it prints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperloop_dist.cli import main
from hyperloop_dist.cluster.scaling import collect_runs, fit_study, parse_count
from hyperloop_dist.cluster.sweep import grid_points
from hyperloop_dist.config import ConfigError, dump_config, load_config
from hyperloop_dist.model.params import report

# The law: L = 1.9 + A_k N^-0.30 + 120 D^-0.28, A_transformer = A_hyperloop 2^0.30 (equal-loss ratio 2).
E, ALPHA, B, BETA, A_HYPERLOOP = 1.9, 0.30, 120.0, 0.28, 100.0
A = {"hyperloop": A_HYPERLOOP, "transformer": A_HYPERLOOP * 2**ALPHA}
HIDDEN = (128, 224, 320, 416, 512)
TOKENS = (2e6, 4e6, 8e6, 16e6)
FAST = ["--bootstrap", "100", "--starts", "3"]  # (the CLI defaults are 200 and 4)


def true_loss(kind: str, n: float, d: float) -> float:
    return E + A[kind] * n**-ALPHA + B * d**-BETA


def non_embedding(kind: str, hidden: int) -> int:
    return report(load_config(None, [f"model.kind={kind}", f"model.hidden_size={hidden}", "model.num_heads=4"]).model
                  ).non_embedding


def write_run(run: Path, kind: str, hidden: int, tokens: float, loss: float) -> None:
    """A finished-looking run directory: config.yaml and a metrics.jsonl whose last row holds the loss."""
    run.mkdir(parents=True)
    dump_config(load_config(None, [f"model.kind={kind}", f"model.hidden_size={hidden}", "model.num_heads=4"]),
                run / "config.yaml")
    rows = [{"step": 1, "loss": 9.0, "tokens": 1.0},
            {"step": 1000, "loss": loss + 0.05, "tokens": tokens, "eval/loss": loss}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 runs per kind (5 sizes x 4 token budgets) with 0.3% noise around the law."""
    root, rng = tmp_path_factory.mktemp("law"), np.random.default_rng(21)
    for kind in A:
        for hidden in HIDDEN:
            n = non_embedding(kind, hidden)
            for tokens in TOKENS:
                loss = true_loss(kind, n, tokens) * (1 + 0.003 * rng.standard_normal())
                write_run(root / kind / f"h{hidden}_d{tokens:.0e}", kind, hidden, tokens, loss)
    return root


def _last_line(capsys: pytest.CaptureFixture) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_fit_recovers_the_law_ratio_predictions_and_intervals(synthetic: Path, tmp_path: Path, capsys) -> None:
    runs = sorted(map(str, synthetic.glob("*/*")))
    out, png = tmp_path / "fit.json", tmp_path / "fit.png"
    assert main(["scaling", "fit", *runs, *FAST, "--json", str(out), "--png", str(png)]) == 0
    fit = json.loads(out.read_text())
    ratio = fit["ratios"]["transformer/hyperloop"]
    assert abs(ratio["params_at_equal_loss"] / 2.0 - 1) < 0.15
    assert ratio["ci90"][0] <= 2.0 <= ratio["ci90"][1], ratio
    for kind, f in fit["fits"].items():
        for name in ("E", "A", "alpha", "B", "beta"):
            lo, hi = f["ci90"][name]
            assert lo <= f[name] <= hi, (kind, name, f)
    assert not fit["warnings"], fit["warnings"]
    # Same hidden size: the Hyperloop costs its depth-matched Transformer's FLOPs with far fewer parameters.
    by = {(r["kind"], r["hidden_size"]): r for r in fit["runs"]}
    for hidden in HIDDEN:
        h, t = by["hyperloop", hidden], by["transformer", hidden]
        assert abs(h["flops_per_token"] / t["flops_per_token"] - 1) < 0.10 and t["params"] > 1.5 * h["params"]
    assert abs(ratio["flops_at_equal_loss"] - 1) < 0.15  # so 2x the parameters costs about the same compute
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A 768-wide model at 32M tokens, beyond every run: within 1% of the law, the law inside the interval.
    for kind in A:
        n = non_embedding(kind, 768)
        assert main(["scaling", "predict", *runs, *FAST, "--kind", kind, "--params", str(n), "--tokens", "32M"]) == 0
        line = _last_line(capsys)
        got = re.fullmatch(rf"{kind}: predicted loss ([\d.]+) \(90% CI ([\d.]+)–([\d.]+)\)", line)
        assert got, line
        loss, lo, hi = map(float, got.groups())
        truth = true_loss(kind, n, 32e6)
        assert abs(loss / truth - 1) < 0.01 and lo <= truth <= hi, (line, truth)

    assert main(["scaling", "predict", *runs, *FAST, "--holdout", "largest"]) == 0
    summary = _last_line(capsys)
    assert re.search(r"held out 8 runs .* mean \|error\| 0\.\d\d%", summary), summary


def test_joint_and_separate_laws_and_what_they_report(synthetic: Path) -> None:
    points, _ = collect_runs(sorted(synthetic.glob("*/*")))
    hyperloop = [p for p in points if p.kind == "hyperloop"]
    separate = fit_study(hyperloop, "separate", draws=40, starts=2)
    best, _ = separate.parameters("hyperloop")
    assert best[2] == pytest.approx(ALPHA, abs=0.08) and best[4] == pytest.approx(BETA, abs=0.08)
    # Two sizes and two budgets leave E, A, alpha, B, beta underdetermined: a bound or a start disagreement shows.
    few = [p for p in hyperloop if p.hidden_size in (128, 224) and p.tokens in (2e6, 4e6)] * 2
    weak = fit_study(few, "separate", draws=20, starts=2)
    assert any("bound" in w or "starts disagree" in w for w in weak.warnings), weak.warnings
    with pytest.raises(ConfigError, match="at least 6"):
        fit_study(hyperloop[:4], "separate", draws=0)
    with pytest.raises(ConfigError, match="2 model sizes"):
        fit_study([p for p in hyperloop if p.hidden_size == 128] * 2, "separate", draws=0)
    assert parse_count("12.5M") == 12.5e6 and parse_count("2e9") == 2e9
    with pytest.raises(ConfigError, match="number"):
        parse_count("lots")
    with pytest.raises(ConfigError, match="--grid"):
        grid_points(["hidden_size=32"], ["hyperloop"])
    with pytest.raises(ConfigError, match="--kinds"):
        grid_points([], ["llama"])


@pytest.fixture
def one_thread():
    """Tiny matmuls: extra threads only wait for each other (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cpu_sdpa_counts() -> dict:
    """FlopCounterMode's own attention formula for the CPU SDPA kernel it has none for (backward: the four
    gradient matmuls, 2x forward; no flash-style recomputation of the scores)."""
    from torch.utils.flop_counter import sdpa_flop_count

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v),
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *_, out_shape=None, **__: 2 * sdpa_flop_count(q, k, v)}


@pytest.mark.parametrize("extra", [[], ["model.tie_embeddings=false", "model.num_query_groups=2",
                                        "model.hc.res=sinkhorn", "model.hc.per_loop_params=false"]],
                         ids=["tied", "untied-gqa-sinkhorn"])
def test_flops_per_token_matches_flop_counter_mode(extra: list[str], one_thread: None) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from hyperloop_dist.model.reference import ReferenceModel

    for kind in ("hyperloop", "looped", "transformer", "mhc"):
        cfg = load_config(None, [f"model.kind={kind}", "model.hidden_size=32", "model.num_heads=4",
                                 "model.vocab_size=256", "model.seq_length=16", "model.hc.sinkhorn_iters=2",
                                 *extra]).model
        tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
        model = ReferenceModel(cfg)
        with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_counts()) as counter:
            model(tokens).float().pow(2).mean().backward()
        counted = counter.get_total_flops() / tokens.numel()
        assert report(cfg).train_flops_per_token == pytest.approx(counted, rel=1e-9), (kind, extra)


def test_sweep_local_then_the_printed_fit_command(tiny_data: list[str], tmp_path: Path) -> None:
    """Two real points trained by `sweep --local`; the fit command it prints, run by a shell as printed, reads
    them (with synthetic runs beside them: two real points cannot determine five parameters)."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "hyperloop_dist.cli", "sweep", *tiny_data, "parallel.nproc_per_node=1",
           "train.micro_batch_size=2", "train.log_interval=1", "data.workers=0", "eval.windows=2",
           "eval.per_loop=false", "--local", "--parallel", "2", "--kinds", "hyperloop", "--out", str(out), "--grid", "train.steps=2,3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 of 2 points trained" in proc.stdout and (out / ".sweep" / "points.json").is_file()
    assert sorted(p.name for p in (out / ".sweep" / "logs" / "hyperloop").iterdir()) == ["steps=2.log", "steps=3.log"]
    fit_cmd = proc.stdout.strip().splitlines()[-1].split("fit with: ")[1]
    for kind in A:
        for hidden in (32, 48, 64):
            for tokens in (2e4, 8e4):
                write_run(out / kind / f"synthetic-h{hidden}-d{tokens:.0e}", kind, hidden, tokens,
                          true_loss(kind, non_embedding(kind, hidden), tokens))
    (out / "notes" / "drafts").mkdir(parents=True)  # not a run: skipped, and said so
    bindir = str(Path(sys.executable).parent)
    shell = subprocess.run(["bash", "-c", fit_cmd.replace("--json", "--bootstrap 20 --starts 2 --json")],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"]})
    assert shell.returncode == 0, shell.stdout + shell.stderr
    assert "skipped 1 paths" in shell.stdout and "notes/drafts: not a run directory" in shell.stdout
    fit = json.loads((out / "fit.json").read_text())
    real = [r for r in fit["runs"] if "steps=" in r["run_dir"]]
    assert len(real) == 2 and all(r["heldout"] and r["flops_per_token"] > 0 for r in real), real
    assert sorted(r["tokens"] for r in real) == [2 * 2 * 32, 3 * 2 * 32]  # steps x micro batch x seq
    assert (out / "fit.png").is_file()

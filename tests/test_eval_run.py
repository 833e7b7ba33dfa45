"""Evaluation end to end: the training hook, `hyperloop eval`, lm-eval in-process and lm-eval's own CLI.

A tiny Hyperloop is trained on 2 ranks with an eval interval; its release is evaluated offline (the HF
offline variables are set by conftest) in-process with lm-eval's ``simple_evaluate`` and by
``hyperloop-lm-eval`` (lm-eval's ``cli_evaluate`` with our model registered), which must agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("megatron_world")]

STEPS, EVERY = 5, 2
TASKS = ["hyperloop_next_line", "hyperloop_last_word", "hyperloop_heldout_ppl"]
LIMIT = 4


@pytest.fixture(scope="module")
def run(tiny_data: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    from hyperloop_dist.checkpoint.release import export_release

    root = tmp_path_factory.mktemp("eval_run")
    log = train([*tiny_data, f"train.steps={STEPS}", f"eval.interval={EVERY}", "eval.windows=16",
                 "eval.tasks=[hyperloop_next_line]", "eval.task_limit=4"], root / "run")
    release = export_release(root / "run", root / "release")
    return {"root": root, "run": root / "run", "log": log.stdout, "release": release, "data": tiny_data}


def test_training_logs_eval_at_its_interval_and_at_the_end(run: dict) -> None:
    rows = [json.loads(line) for line in (run["run"] / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]
    for r in evals:
        curve = [r[f"eval/loop_{k}/loss"] for k in (1, 2)]  # tiny_data: 2 loops
        assert curve[-1] == pytest.approx(r["eval/loss"], rel=1e-9)
        assert r["eval/tokens"] == 16 * 32
        assert r["eval/hyperloop_next_line/acc"] in (0, 0.25, 0.5, 0.75, 1)  # lm-eval over the 2 DP ranks
    assert run["log"].count("eval  step") == 3  # progress lines, rank 0 only
    assert f"held-out loss, step {STEPS}" in run["log"] and "held-out loss after loop 1..L" in run["log"]


def test_hyperloop_eval_and_lm_eval_cli_agree_on_a_release(run: dict, tmp_path: Path) -> None:
    from hyperloop_dist.evaluation.offline import evaluate_checkpoint

    task_dir = tmp_path / "tasks"
    result = evaluate_checkpoint(run["release"], run["data"], windows=16, loops=[1, 2, 3], tasks=TASKS,
                                 limit=LIMIT, task_dir=task_dir)
    final = [json.loads(line) for line in (run["run"] / "metrics.jsonl").read_text().splitlines()][-1]
    assert result.heldout_loss == pytest.approx(final["eval/loss"], rel=1e-6)  # the run's own last eval
    assert list(result.loss_by_loops) == [1, 2, 3]
    assert result.loss_by_loops[2] == pytest.approx(result.heldout_loss, rel=1e-9)
    assert set(result.tasks) == set(TASKS)
    assert 0 <= result.tasks["hyperloop_next_line"]["acc"] <= 1
    assert result.tasks["hyperloop_heldout_ppl"]["bits_per_byte"] > 0

    out = tmp_path / "lm_eval_out"
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("hyperloop-lm-eval")), "--model", "hyperloop", "--model_args",
         f"path={run['release']}", "--tasks", *TASKS, "--include_path", str(task_dir), "--limit", str(LIMIT),
         "--batch_size", "16", "--output_path", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from hyperloop_dist.evaluation.harness import scores

    cli = scores(json.loads(next(out.rglob("results_*.json")).read_text()))
    for task, metrics in result.tasks.items():
        assert cli[task] == pytest.approx(metrics, rel=1e-6), task


def test_hyperloop_eval_cli_prints_the_loss_table(run: dict, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "hyperloop_dist.cli", "eval", str(run["release"]), *run["data"],
                           "--loops", "1", "3", "--windows", "16", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out loss" in proc.stdout and "loops=2 (as trained)" in proc.stdout and "loops=3" in proc.stdout
    saved = json.loads(out.read_text())
    assert sorted(saved["loss_by_loops"]) == ["1", "2", "3"]


def test_hub_task_fails_with_a_clear_offline_message(run: dict) -> None:
    from hyperloop_dist.evaluation.harness import load_tasks, task_manager
    from hyperloop_dist.evaluation.loading import EvalError

    with pytest.raises(EvalError, match="lm-eval task hellaswag: dataset not available offline"):
        load_tasks(["hellaswag"], task_manager(["hellaswag"], None))

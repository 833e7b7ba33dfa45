"""Evaluation end to end: the training hook, `hyperloop eval`, lm-eval in-process and lm-eval's own CLI.

A tiny Hyperloop is trained on 2 ranks with an eval interval; its release is evaluated offline (the HF
offline variables are set by conftest) in-process with lm-eval's ``simple_evaluate`` and by
``hyperloop-lm-eval`` (lm-eval's ``cli_evaluate`` with our model registered), which must agree. Items
longer than the model's window are scored as lm-eval's HF model scores them: unit tests on a toy causal
model, and one long item through ``hyperloop-lm-eval``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from .helpers import train


def end_to_end(test: Callable) -> Callable:
    """Slow, in a Megatron world (the toy-model unit tests here need neither: no module-wide marks)."""
    return pytest.mark.slow(pytest.mark.usefixtures("megatron_world")(test))


STEPS, EVERY = 5, 2
TASKS = ["hyperloop_next_line", "hyperloop_last_word", "hyperloop_heldout_ppl"]
LIMIT = 4
# The README's default engine as users run it: eval on, a checkpoint every 2 steps, a resume, a release.
RUN = [f"train.steps={STEPS}", f"eval.interval={EVERY}", "eval.windows=16", "eval.tasks=[hyperloop_next_line]",
       "eval.task_limit=4", "train.save_interval=2", "train.keep_last=3"]


@pytest.fixture(scope="module")
def run(tiny_data: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    from hyperloop_dist.export.release import export_release

    root = tmp_path_factory.mktemp("eval_run")
    log = train([*tiny_data, *RUN], root / "run")
    release = export_release(root / "run", root / "release")
    return {"root": root, "run": root / "run", "log": log.stdout, "release": release, "data": tiny_data}


@end_to_end
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


@end_to_end
def test_resumed_run_continues_with_the_same_losses_and_evaluations(run: dict, tmp_path: Path) -> None:
    import shutil

    from .helpers import checkpoint, losses

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint(run["run"], 2), checkpoint(resumed, 2))
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    log = train([*run["data"], *RUN], resumed)
    assert "resumed from" in log.stdout
    straight, after = losses(run["run"]), losses(resumed)
    for step in range(3, STEPS + 1):
        assert after[step] == pytest.approx(straight[step], rel=1e-5), step

    def evals(run_dir: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}

    assert evals(resumed) == pytest.approx({s: v for s, v in evals(run["run"]).items() if s > 2}, rel=1e-5)


@end_to_end
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


@end_to_end
def test_hyperloop_eval_cli_prints_the_loss_table(run: dict, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "hyperloop_dist.cli", "eval", str(run["release"]), *run["data"],
                           "--loops", "1", "3", "--windows", "16", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out loss" in proc.stdout and "loops=2 (as trained)" in proc.stdout and "loops=3" in proc.stdout
    saved = json.loads(out.read_text())
    assert sorted(saved["loss_by_loops"]) == ["1", "2", "3"]


@end_to_end
def test_hub_task_fails_with_a_clear_offline_message(run: dict) -> None:
    from hyperloop_dist.evaluation.harness import load_tasks, task_manager
    from hyperloop_dist.evaluation.loading import EvalError

    with pytest.raises(EvalError, match="lm-eval task hellaswag: dataset not available offline"):
        load_tasks(["hellaswag"], task_manager(["hellaswag"], None))


# ---------------------------------------------------------------- items longer than the window

WINDOW = 16  # the toy model's max_length
TOY_VOCAB = 64


class _CharTokenizer:
    """One token per character (mod the toy vocabulary): token counts are the string lengths."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % TOY_VOCAB for c in text]

    def decode(self, tokens: list[int]) -> str:
        return "".join(chr(t) for t in tokens)


def _toy_logits() -> Callable[[torch.Tensor], torch.Tensor]:
    """A causal model whose logits at t depend on every token up to t, so a wrong window changes the score."""
    gen = torch.Generator().manual_seed(0)
    emb, head = torch.randn(TOY_VOCAB, 8, generator=gen), torch.randn(8, TOY_VOCAB, generator=gen)

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(1, tokens.shape[1] + 1, dtype=torch.float32)[None, :, None]
        return (emb[tokens].cumsum(1) / positions) @ head

    return logits


def _toy_lm():
    from hyperloop_dist.evaluation.lm_eval_model import HyperloopLM

    return HyperloopLM.from_logits(_toy_logits(), _CharTokenizer(), WINDOW, batch_size=3)


def _direct(window: list[int], scored: list[int]) -> tuple[float, bool]:
    """Log-likelihood of the last ``len(scored)`` targets of one window of ``WINDOW + 1`` tokens or fewer."""
    logp = torch.log_softmax(_toy_logits()(torch.tensor([window[:-1]])), -1)[0, -len(scored):]
    target = torch.tensor(scored)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_a_context_longer_than_the_window_is_cut_from_the_left() -> None:
    from hyperloop_dist.evaluation.lm_eval_model import scoring_window

    context, continuation = [(7 * i) % TOY_VOCAB for i in range(3 * WINDOW)], [5, 9, 11, 2]
    row, start, scored = scoring_window(context, continuation, WINDOW)
    whole = (context + continuation)[-(WINDOW + 1):]
    assert row == whole[:-1] and len(row) == WINDOW
    assert scored == continuation and start == WINDOW - len(continuation)
    total, greedy = _toy_lm()._score([(context, continuation)])[0]
    assert (total, greedy) == pytest.approx(_direct(whole, continuation), rel=1e-6)


def test_a_continuation_longer_than_the_window_scores_its_last_window_tokens() -> None:
    from hyperloop_dist.evaluation.lm_eval_model import scoring_window

    context, continuation = [1, 2, 3], [(3 * i + 1) % TOY_VOCAB for i in range(3 * WINDOW)]
    row, start, scored = scoring_window(context, continuation, WINDOW)
    assert (row, start, scored) == (continuation[-(WINDOW + 1):-1], 0, continuation[-WINDOW:])
    total, _ = _toy_lm()._score([(context, continuation)])[0]
    assert total == pytest.approx(_direct(continuation[-(WINDOW + 1):], continuation[-WINDOW:])[0], rel=1e-6)


def test_long_items_are_counted_once_per_item_and_rolling_windows_never_cut() -> None:
    from lm_eval.api.instance import Instance

    def request(doc_id: int, context: str, continuation: str) -> Instance:
        return Instance("loglikelihood", {}, (context, continuation), 0, ("toy", doc_id, 1))

    lm = _toy_lm()
    long_text = "abcdefghij" * 5  # 50 tokens > WINDOW
    # item 0: both choices longer than the window; item 1: short choices under a long context
    results = lm.loglikelihood([request(0, "q:", " " + long_text), request(0, "q:", " " + long_text[::-1]),
                                request(1, long_text, " yes"), request(1, long_text, " no")])
    assert all(math.isfinite(total) for total, _ in results)
    assert lm.long_item_counts() == {"toy": 1}
    assert lm.get_model_info() == {"long_items": {"toy": 1}}
    text = Instance("loglikelihood_rolling", {}, (long_text * 3,), 0, ("ppl", 0, 1))
    rolling = lm.loglikelihood_rolling([text])
    assert math.isfinite(rolling[0]) and lm.long_item_counts() == {"toy": 1}


def _long_items_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from lm_eval.api.instance import Instance

    from hyperloop_dist.evaluation.lm_eval_model import HyperloopLM

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    lm = HyperloopLM.from_logits(_toy_logits(), _CharTokenizer(), WINDOW, rank=rank, world_size=2)
    long_text = "abcdefghij" * 5
    # item 0's two choices land on different ranks (lm-eval deals requests, not items); item 1 on rank 1
    mine = [(0, long_text)] if rank == 0 else [(0, long_text[::-1]), (1, long_text), (1, " no")]
    lm.loglikelihood([Instance("loglikelihood", {}, ("q:", " " + c), 0, ("toy", d, 1)) for d, c in mine])
    Path(out, f"rank{rank}.json").write_text(json.dumps(lm.long_item_counts()))
    dist.destroy_process_group()


def test_long_items_are_merged_over_data_parallel_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from .conftest import free_port

    mp.start_processes(_long_items_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == [{"toy": 2}] * 2


def _tokens_in_continuation(tok: object, context: str, continuation: str) -> int:
    """Continuation tokens as lm-eval's TemplateLM._encode_pair counts them."""
    return len(tok.encode(context + continuation)) - len(tok.encode(context))


def _text_of_tokens(tok: object, context: str, delimiter: str, words: list[str], count: int) -> str:
    text = " ".join(words)
    for end in range(1, len(text) + 1):
        if _tokens_in_continuation(tok, context, delimiter + text[:end]) == count:
            return text[:end]
    raise AssertionError(f"the fixture text has fewer than {count} tokens")


@end_to_end
def test_lm_eval_cli_scores_an_item_three_windows_long(run: dict, tmp_path: Path) -> None:
    import yaml

    from hyperloop_dist.data.tokenizer import load_tokenizer
    from hyperloop_dist.evaluation.harness import scores
    from hyperloop_dist.evaluation.local_tasks import CONFIG_DIR

    seq_length = 32  # tests/conftest.py TINY_MODEL
    tok = load_tokenizer(run["release"] / "tokenizer.model")
    corpus = Path(__file__).parent / "fixtures" / "corpus"
    words = " ".join(p.read_text() for p in sorted(corpus.rglob("*.txt"))).split()
    context = " ".join(words[:8])
    true, other = (_text_of_tokens(tok, context, "\n", words[start:start + 400], 3 * seq_length)
                   for start in (100, 600))
    assert _tokens_in_continuation(tok, context, "\n" + true) == 3 * seq_length

    config = yaml.safe_load((CONFIG_DIR / "hyperloop_next_line.yaml").read_text())
    config["task"] = "hyperloop_long_item"
    config["dataset_kwargs"]["data_files"] = {"test": str(tmp_path / "long.jsonl")}
    item = {"context": context, "choices": [true, other], "label": 0}
    (tmp_path / "long.jsonl").write_text(json.dumps(item))
    (tmp_path / "hyperloop_long_item.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("hyperloop-lm-eval")), "--model", "hyperloop", "--model_args",
         f"path={run['release']}", "--tasks", "hyperloop_long_item", "--include_path", str(tmp_path),
         "--output_path", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 item(s) with a continuation longer than seq_length 32 (hyperloop_long_item 1)" in proc.stderr
    table = scores(json.loads(next(out.rglob("results_*.json")).read_text()))["hyperloop_long_item"]
    assert table["acc"] in (0.0, 1.0) and math.isfinite(table["acc_norm"])
    assert table["long_items"] == 1

"""Eval pieces without processes: config checks, the local task builder, loading errors, loop extension."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hyperloop_dist.config import ConfigError, load_config

from .conftest import FIXTURE_CORPUS


@pytest.mark.parametrize(("override", "message"), [
    ("eval.windows=0", "eval.windows=0: must be > 0"),
    ("eval.interval=-1", "eval.interval=-1: must be >= 0"),
    ("eval.tasks=[1]", "eval.tasks[0]=1: expected str"),
    ("eval.task_limit=0", "eval.task_limit=0: must be > 0"),
    ("eval.heldout_sources=[{path: ''}]", "eval.heldout_sources[0].path: must name"),
])
def test_bad_eval_settings_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_local_tasks_are_deterministic_and_well_formed(tmp_path: Path) -> None:
    from hyperloop_dist.evaluation.local_tasks import LOCAL_TASKS, build_task_dir

    docs = [(FIXTURE_CORPUS / name).read_text() for name in ("macbeth_gut.txt", "tempest_gut.txt")]
    a, b = build_task_dir(docs, tmp_path / "a"), build_task_dir(docs, tmp_path / "b")
    for task in LOCAL_TASKS:
        assert (a / f"{task}.jsonl").read_text() == (b / f"{task}.jsonl").read_text()
        config = (a / f"{task}.yaml").read_text()
        assert str((a / f"{task}.jsonl").resolve()) in config
    items = [json.loads(line) for line in (a / "hyperloop_next_line.jsonl").read_text().splitlines()]
    assert len(items) == 256
    for item in items:
        assert len(item["choices"]) == len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
    body = "\n".join(docs)
    assert all(item["choices"][item["label"]] in body for item in items)


def test_loading_errors_name_the_problem(tmp_path: Path) -> None:
    from hyperloop_dist.evaluation.loading import EvalError, load_for_eval

    with pytest.raises(EvalError, match="does not exist"):
        load_for_eval(tmp_path / "missing")
    with pytest.raises(EvalError, match="not a model directory"):
        load_for_eval(tmp_path)


def test_more_loops_than_trained_reuse_the_last_loop_parameters() -> None:
    from hyperloop_dist.evaluation.loops import _extended, reference_parts
    from hyperloop_dist.model.reference import ReferenceModel

    cfg = load_config(None, ["model.hidden_size=32", "model.vocab_size=64", "model.loops=3"]).model
    model = ReferenceModel(cfg)
    with torch.no_grad():
        model.loop_embedding.normal_()
    hcs, emb = _extended(reference_parts(model), 5)
    assert hcs[:3] == list(model.hc) and hcs[3] is hcs[4] is model.hc[2]
    assert torch.equal(emb[:3], model.loop_embedding) and torch.equal(emb[4], model.loop_embedding[2])

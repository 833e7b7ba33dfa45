"""Offline lm-eval tasks built from the run's held-out documents.

The task configs live in ``task_configs/*.yaml`` (``dataset_path: json``, ``data_files`` next to the file).
:func:`build_task_dir` writes each task's documents as JSONL into a directory with a copy of its config
whose ``data_files`` is made absolute, so lm-eval reads them from any working directory
(``TaskManager(include_path=DIR)`` or ``--include_path DIR``). Items are drawn with a fixed seed, so the
same held-out text always gives the same tasks.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).parent / "task_configs"
LOCAL_TASKS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
CONTEXT_LINES = 4
_WORD = re.compile(r"^[A-Za-z]{4,}$")


def _line_runs(documents: Iterable[str]) -> list[list[str]]:
    """Consecutive non-empty lines (stripped), per paragraph."""
    runs: list[list[str]] = []
    for doc in documents:
        run: list[str] = []
        for line in doc.splitlines():
            line = line.strip()
            if line:
                run.append(line)
            elif run:
                runs.append(run)
                run = []
        if run:
            runs.append(run)
    return runs


def _passages(documents: list[str], size: int, count: int) -> list[dict]:
    out: list[dict] = []
    for doc in documents:
        piece = ""
        for line in doc.splitlines(keepends=True):
            piece += line
            if len(piece) >= size:
                if piece.strip():
                    out.append({"text": piece})
                piece = ""
                if len(out) == count:
                    return out
    return out


def _next_line_items(runs: list[list[str]], rng: random.Random, count: int) -> tuple[list[dict], list[dict]]:
    """(multiple-choice items, generation items) from lines that follow CONTEXT_LINES lines of one run."""
    pool = [line for run in runs for line in run if len(line.split()) >= 4]
    spots = [(r, i) for r, run in enumerate(runs) for i in range(CONTEXT_LINES, len(run))
             if len(runs[r][i].split()) >= 4]
    rng.shuffle(spots)
    choice, generate = [], []
    for r, i in spots[:count]:
        context, answer = "\n".join(runs[r][i - CONTEXT_LINES:i]), runs[r][i]
        distractors: list[str] = []
        while len(distractors) < 3:
            line = rng.choice(pool)
            if line != answer and line not in distractors:
                distractors.append(line)
        options = [answer, *distractors]
        rng.shuffle(options)
        choice.append({"context": context, "choices": options, "label": options.index(answer)})
        generate.append({"context": context + "\n", "answer": answer})
    return choice, generate


def _last_word_items(runs: list[list[str]], rng: random.Random, count: int) -> list[dict]:
    words = sorted({w for run in runs for line in run for w in line.split() if _WORD.match(w)})
    by_len: dict[int, list[str]] = {}
    for w in words:
        by_len.setdefault(len(w), []).append(w)
    spots = []
    for run in runs:
        for i in range(1, len(run)):
            parts = run[i].rstrip(".,;:!?'\"").rsplit(" ", 1)
            if len(parts) == 2 and len(parts[0].split()) >= 4 and _WORD.match(parts[1]):
                spots.append((run[i - 1] + "\n" + parts[0], parts[1]))
    rng.shuffle(spots)
    items = []
    for context, answer in spots[:count]:
        similar = [w for n in (len(answer) - 1, len(answer), len(answer) + 1) for w in by_len.get(n, [])
                   if w.lower() != answer.lower()]
        if len(similar) < 3:
            continue
        options = [answer, *rng.sample(similar, 3)]
        rng.shuffle(options)
        items.append({"context": context, "choices": options, "label": options.index(answer)})
    return items


def build_task_items(documents: list[str], seed: int = 1234, count: int = 256) -> dict[str, list[dict]]:
    """Every local task's documents, from held-out texts."""
    rng = random.Random(seed)
    runs = _line_runs(documents)
    next_line, continuation = _next_line_items(runs, rng, count)
    return {
        "hyperloop_heldout_ppl": _passages(documents, 2000, count // 4),
        "hyperloop_next_line": next_line,
        "hyperloop_last_word": _last_word_items(runs, rng, count),
        "hyperloop_continue": continuation[: count // 4],
    }


def build_task_dir(documents: list[str], out: str | Path, seed: int = 1234, count: int = 256) -> Path:
    """Write the local tasks (JSONL + configs with absolute ``data_files``) into ``out``; returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, items in build_task_items(documents, seed, count).items():
        if not items:
            raise ValueError(f"the held-out text is too short to build lm-eval task {name}")
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(item) + "\n" for item in items))
        config = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
        config["dataset_kwargs"]["data_files"] = {"test": str(data.resolve())}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out

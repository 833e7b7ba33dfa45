"""Our model as an lm-eval ``LM`` (registered as ``hyperloop``): in a training run or from a checkpoint.

:class:`HyperloopLM` needs only a logits callable ``tokens [b, s] -> logits [b, s, vocab]`` and the run's
sentencepiece tokenizer, so it serves the Megatron model (any TP), the FSDP model, or a release's
:class:`~hyperloop_dist.model.reference.ReferenceModel`. With ``world_size > 1`` it uses lm-eval's own
data-parallel protocol: the evaluator deals requests by ``rank`` and gathers results through
:meth:`all_gather` / :meth:`gather_object` over the data-parallel group given here. Every rank makes the
same number of forward calls (short ranks run padding batches), because an FSDP or ZeRO-3 forward is a
collective; generation then runs ``max_gen_toks`` steps on every rank and cuts at the stop strings after.

From lm-eval's side (``lm_eval --model hyperloop --model_args path=...``) the model is loaded with
:func:`hyperloop_dist.evaluation.loading.load_for_eval`: a release, a run or checkpoint directory, or any
format registered there (INT4).

Long items are handled as lm-eval's HF model handles them: a (context, continuation) pair longer than the
``max_length`` window loses context from the left. A continuation longer than the window on its own is
scored on its last ``max_length`` tokens, without its context; such items are counted per task
(:meth:`HyperloopLM.long_item_counts`, ``long_items`` in lm-eval's results config) and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from hyperloop_dist.data.tokenizer import EOS_ID, PAD_ID
from hyperloop_dist.evaluation.harness import LONG_ITEMS

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

_log = logging.getLogger(__name__)


def scoring_window(context: list[int], continuation: list[int], max_length: int
                   ) -> tuple[list[int], int, list[int]]:
    """(model input, position of the first scored token's log-probs, scored tokens) for one pair.

    The input is the last ``max_length + 1`` tokens of context + continuation less the last one, as in
    lm-eval's HF model, so context is dropped from the left. When the continuation alone is longer than
    ``max_length``, only its last ``max_length`` tokens have a prediction inside the window: those are scored.
    """
    whole = (context + continuation)[-(max_length + 1):]
    kept = min(len(continuation), len(whole) - 1)
    return whole[:-1], len(whole) - 1 - kept, continuation[len(continuation) - kept:]


@register_model("hyperloop")
class HyperloopLM(TemplateLM):
    """lm-eval adapter. ``HyperloopLM(path=DIR)`` loads a checkpoint; :meth:`from_logits` wraps a live model."""

    def __init__(self, path: str | None = None, batch_size: int | str | None = 16, loops: int | None = None,
                 max_gen_toks: int = 32, **_: object) -> None:
        super().__init__()
        if path is None:
            raise ValueError("model_args: set path=<release, run or checkpoint directory>")
        from hyperloop_dist.evaluation.loading import load_for_eval

        loaded = load_for_eval(path)
        self._setup(loaded.logits_fn(loops), loaded.tokenizer, loaded.cfg.seq_length, batch_size, max_gen_toks)

    @classmethod
    def from_logits(cls, logits_fn: LogitsFn, tokenizer: object, max_length: int, *, batch_size: int = 16,
                    rank: int = 0, world_size: int = 1, group: dist.ProcessGroup | None = None,
                    device: torch.device | None = None, max_gen_toks: int = 32) -> HyperloopLM:
        """Wrap a live model; ``rank``/``world_size``/``group`` are its data-parallel coordinates and
        ``device`` where collectives put their tensors (the GPU under NCCL)."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._setup(logits_fn, tokenizer, max_length, batch_size, max_gen_toks)
        lm._rank, lm._world_size, lm._group = rank, world_size, group
        lm._device = device or torch.device("cpu")
        return lm

    def _setup(self, logits_fn: LogitsFn, tokenizer: object, max_length: int, batch_size: int | str | None,
               max_gen_toks: int) -> None:
        self._logits_fn, self.tokenizer, self.max_length = logits_fn, tokenizer, max_length
        # lm-eval passes "auto" or a string from the CLI; we use a fixed batch
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = max_gen_toks
        self._group = None
        self._device = torch.device("cpu")
        # (task, doc_id) of items whose continuation was cut to the window; a set because a multiple-choice
        # item has one request per choice
        self._long: set[tuple[str, int]] = set()
        self._cut: list[bool] = []

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return EOS_ID

    @property
    def tokenizer_name(self) -> str:
        return "hyperloop-sentencepiece"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: object) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # ------------------------------------------------------------------ data parallel (lm-eval's protocol)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self._group)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: object, dst: int = 0) -> list | None:
        if self.world_size == 1:
            return [obj]
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, obj, group=self._group)
        return parts if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self._group)

    def _same_count(self, n: int) -> int:
        """The largest ``n`` over the data-parallel ranks (forward calls must match for collective engines)."""
        if self.world_size == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return int(t.item())

    # ------------------------------------------------------------------ scoring

    def _log_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """Log-softmax ``[b, s, vocab]`` for right-padded rows (causal: padding never affects real positions)."""
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        with torch.no_grad():
            return F.log_softmax(self._logits_fn(tokens).float().cpu(), dim=-1)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy?) per (context, continuation) token pair, both over
        the part of the continuation that fits the window (:func:`scoring_window`)."""
        windows = [scoring_window(context, continuation, self.max_length) for context, continuation in pairs]
        # similar lengths batch together
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(windows)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for b in range(self._same_count(len(batches))):
            batch = batches[b] if b < len(batches) else []
            logp = self._log_probs([windows[i][0] for i in batch] or [[EOS_ID]])
            for j, i in enumerate(batch):
                _, start, scored = windows[i]
                lp = logp[j, start:start + len(scored)]
                target = torch.tensor(scored, dtype=torch.long)
                total = float(lp.gather(-1, target[:, None]).sum())
                results[i] = (total, bool((lp.argmax(-1) == target).all()))
        return results

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # TemplateLM tokenizes and calls _loglikelihood_tokens, which notes the cut pairs in request order
        self._cut = []
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        new = {(str(r.task_name), int(r.doc_id if r.doc_id is not None else -1))
               for r, cut in zip(requests, self._cut, strict=True) if cut} - self._long
        if new:
            self._long |= new
            tasks = ", ".join(f"{task} {n}" for task, n in _per_task(new).items())
            where = f" on rank {self.rank}" if self.world_size > 1 else ""
            _log.warning("%d item(s) with a continuation longer than seq_length %d%s (%s): scored its last "
                         "%d tokens, without the context", len(new), self.max_length, where, tasks,
                         self.max_length)
        return results

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: object
                              ) -> list[tuple[float, bool]]:
        self._cut = [len(cont) > self.max_length for _, _, cont in requests]
        return self._score([(list(ctx), list(cont)) for _, ctx, cont in requests])

    def long_item_counts(self) -> dict[str, int]:
        """Items per task whose continuation was cut to its last ``max_length`` tokens, over all data-parallel
        ranks (a collective when ``world_size > 1``: every rank calls it)."""
        long = self._long
        if self.world_size > 1:
            parts: list = [None] * self.world_size
            dist.all_gather_object(parts, sorted(long), group=self._group)
            # one item's choices can be dealt to different ranks, so items are merged, not counts summed
            long = {tuple(item) for part in parts for item in part}
        return _per_task(long)

    def get_model_info(self) -> dict[str, object]:
        # lm-eval puts this into results["config"] (its --output_path JSON) on rank 0, after the run
        return {LONG_ITEMS: _per_task(self._long)}

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(self.tok_encode(text), self.eot_token_id, self.max_length, 1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._score(pairs), strict=True):
            totals[n] += logp
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        lockstep = self.world_size > 1  # every rank runs the same steps: forwards may be collectives
        for r in range(self._same_count(len(requests))):
            context, kwargs = requests[r].args if r < len(requests) else ("", {})
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            steps = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            steps = self._same_count(steps) if lockstep else steps
            tokens = self.tok_encode(context) or [self.eot_token_id]
            generated: list[int] = []
            for _ in range(steps):
                logp = self._log_probs([(tokens + generated)[-self.max_length:]])
                nxt = int(logp[0, -1].argmax())
                generated.append(nxt)
                if not lockstep and (nxt == self.eot_token_id or _stop_at(self.tok_decode(generated), until)):
                    break
            if r < len(requests):
                text = self.tok_decode([t for t in generated if t != self.eot_token_id])
                cut = _stop_at(text, until)
                out.append(text if cut is None else text[:cut])
        return out


def _per_task(items: set[tuple[str, int]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task, _ in sorted(items):
        counts[task] = counts.get(task, 0) + 1
    return counts


def _stop_at(text: str, until: list[str]) -> int | None:
    """Index of the first stop string in ``text``, or None."""
    hits = [text.find(s) for s in until if s and s in text]
    return min(hits) if hits else None


"""Generation from a release's transformers class on CPU: the loop-aware KV cache, loops at inference.

Table 1 (always): greedy tokens/s with the cache (``LoopKVCache``) and without it (every step re-runs the
whole sequence), side by side, batch 1, for random-weight models of the tiny-cpu shape (all four kinds;
best of ``--repeats`` alternating runs) and of the hyperloop-136m shape (one run each). Both columns
generate the same tokens (checked).

Table 2 (with ``--release DIR``, a trained release): held-out loss and cached tokens/s when running
K = 1 .. L loops (``num_loops_inference``), and with the experimental confidence exit (``exit_threshold``),
whose loss is teacher-forced one token at a time through the cache, as it decodes.

    python benchmarks/generation.py
    python benchmarks/generation.py --release releases/tiny-cpu --windows 32 --thresholds 0.9 0.6 0.3
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def hf_model(recipe: str | None, kind: str, seed: int = 0):
    from hyperloop_dist.config import load_config
    from hyperloop_dist.export.hf_model import HyperloopForCausalLM, hf_config

    torch.manual_seed(seed)
    cfg = load_config(recipe, [f"model.kind={kind}"]).model
    return HyperloopForCausalLM(hf_config(cfg)).eval().requires_grad_(False)


def tokens_per_s(model, prompt: torch.Tensor, new: int, use_cache: bool, repeats: int = 1) -> tuple[float, torch.Tensor]:
    """Greedy generation speed, the best of ``repeats`` runs (the machine may be shared), and the tokens."""
    model.generate(prompt, max_new_tokens=2, do_sample=False, use_cache=use_cache, pad_token_id=0)  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=use_cache, pad_token_id=0)
        best = max(best, new * prompt.shape[0] / (time.perf_counter() - start))
    return best, out


def best_of(model, prompt: torch.Tensor, new: int, repeats: int) -> tuple[float, float, bool]:
    """Best uncached and cached tokens/s over ``repeats`` alternating runs (the machine may be shared)."""
    slow = fast = 0.0
    same = True
    for _ in range(repeats):
        s, a = tokens_per_s(model, prompt, new, use_cache=False)
        f, b = tokens_per_s(model, prompt, new, use_cache=True)
        slow, fast, same = max(slow, s), max(fast, f), same and torch.equal(a, b)
    return slow, fast, same


def cache_table(prompt_len: int, new: int, big_new: int, repeats: int) -> None:
    rows = [("tiny-cpu", None, kind, new) for kind in ("hyperloop", "looped", "transformer", "mhc")]
    rows.append(("hyperloop-136m", "recipes/hyperloop-136m.yaml", "hyperloop", big_new))
    print(f"{'shape':<15} {'kind':<12} {'params':>8} {'prompt+new':>10} {'uncached tok/s':>15} "
          f"{'cached tok/s':>13} {'speed-up':>9} {'same tokens':>12}")
    for shape, recipe, kind, n in rows:
        model = hf_model(recipe, kind)
        params = sum(p.numel() for p in model.parameters())
        prompt = torch.randint(4, model.config.vocab_size, (1, prompt_len))
        slow, fast, same = best_of(model, prompt, n, repeats if recipe is None else 1)
        print(f"{shape:<15} {kind:<12} {params / 1e6:>7.1f}M {f'{prompt_len}+{n}':>10} {slow:>15.1f} {fast:>13.1f} "
              f"{fast / slow:>8.1f}x {str(same):>12}", flush=True)


def teacher_forced_exit(model, windows: torch.Tensor) -> tuple[float, float]:
    """Held-out loss when every token is decoded one at a time through the cache (so the exit acts), and
    the mean loops the decoding steps ran."""
    nll, count, loops = 0.0, 0, []
    for row in windows:
        cache = model.new_cache()
        inputs, labels = row[None, :-1], row[None, 1:]
        logits = [model(inputs[:, :1], past_key_values=cache, use_cache=True).logits]
        logits += [model(inputs[:, i:i + 1], past_key_values=cache, use_cache=True).logits
                   for i in range(1, inputs.shape[1])]
        nll += F.cross_entropy(torch.cat(logits, 1)[0].float(), labels[0], reduction="sum").item()
        count += labels.numel()
        loops += cache.loops_run
    return nll / count, sum(loops) / max(len(loops), 1)


def loops_table(release: str, overrides: list[str], windows_n: int, thresholds: list[float], prompt_len: int,
                new: int, repeats: int) -> None:
    from transformers import AutoModelForCausalLM

    from hyperloop_dist.evaluation.heldout import heldout_windows
    from hyperloop_dist.export.quantize_release import load_source

    _, cfg, tokenizer = load_source(release, overrides)
    windows = heldout_windows(cfg, windows_n, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(release, trust_remote_code=True, dtype=torch.float32).eval()
    loops = model.model.cfg.loops
    prompt = windows[:1, :prompt_len]
    print(f"held-out: {windows[:, 1:].numel():,} tokens ({len(windows)} windows); tokens/s: cached greedy, "
          f"{prompt_len}+{new}, batch 1, best of {repeats}")
    print(f"{'setting':<24} {'loops run':>9} {'held-out loss':>14} {'tokens/s':>9}")
    for k in range(1, loops + 1):
        model.config.num_loops_inference = k
        with torch.no_grad():
            logits = model(input_ids=windows[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten()).item()
        speed, _ = tokens_per_s(model, prompt, new, use_cache=True, repeats=repeats)
        print(f"{f'num_loops_inference={k}':<24} {k:>9.2f} {loss:>14.4f} {speed:>9.1f}", flush=True)
    model.config.num_loops_inference = None
    for threshold in thresholds:
        model.config.exit_threshold = threshold
        with torch.no_grad():
            loss, mean_loops = teacher_forced_exit(model, windows)
        speed, _ = tokens_per_s(model, prompt, new, use_cache=True, repeats=repeats)
        print(f"{f'exit_threshold={threshold}':<24} {mean_loops:>9.2f} {loss:>14.4f} {speed:>9.1f}", flush=True)
    model.config.exit_threshold = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="generated tokens (tiny shapes)")
    ap.add_argument("--big-new", type=int, default=32, help="generated tokens (136m shape)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="runs per tiny-model measurement (best kept)")
    ap.add_argument("--release", default=None, help="a trained release for the loops / early-exit table")
    ap.add_argument("--windows", type=int, default=32, help="held-out windows for the loss")
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.9, 0.7, 0.5])
    ap.add_argument("--skip-cache-table", action="store_true")
    ap.add_argument("overrides", nargs="*", default=[], help="data.* overrides naming the release's held-out data")
    args = ap.parse_intermixed_args()
    torch.set_num_threads(args.threads)
    if not args.skip_cache_table:
        with torch.no_grad():
            cache_table(args.prompt, args.new, args.big_new, args.repeats)
    if args.release:
        print()
        loops_table(args.release, args.overrides, args.windows, args.thresholds, args.prompt, args.new,
                    args.repeats)


if __name__ == "__main__":
    main()

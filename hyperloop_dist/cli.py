"""The ``hyperloop`` command: ``train``, ``data``, ``export``, ``eval``, ``analyze``, ``params``, ``submit``,
``plan``, ``sweep``, ``scaling fit``, ``scaling predict``.

Every subcommand takes an optional recipe (default: the embedded tiny-cpu recipe) followed by
``section.field=value`` overrides, validated like the recipe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hyperloop_dist.checkpoint.store import CheckpointError
from hyperloop_dist.config import QUANT_SCHEMES, ConfigError
from hyperloop_dist.data.stream import DataError
from hyperloop_dist.train.entry import load_items as _load
from hyperloop_dist.train.entry import split_recipe as _split_recipe
from hyperloop_dist.train.entry import train


def cmd_train(args: argparse.Namespace) -> int:
    return train(args.config)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from hyperloop_dist.data.token_windows import prepare_corpus

    cfg = _load(args.config)
    tokens_dir = prepare_corpus(cfg)
    print(f"data ready: corpus {cfg.data.dir}, tokenizer {cfg.data.tokenizer}, tokens {tokens_dir}")
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from hyperloop_dist.data.corpus import obtain_english, obtain_shakespeare
    from hyperloop_dist.data.sources import tokenizer_sample
    from hyperloop_dist.data.tokenizer import load_tokenizer, train_tokenizer

    cfg = _load(args.config)
    if cfg.data.corpus in ("shakespeare", "english"):
        (obtain_shakespeare if cfg.data.corpus == "shakespeare" else obtain_english)(cfg.data.dir)
    out = train_tokenizer(tokenizer_sample(cfg, int(args.sample_mb * 1e6)), cfg.model.vocab_size, cfg.data.tokenizer)
    sp = load_tokenizer(out, cfg.model.vocab_size)
    print(f"tokenizer written to {out}: {sp.vocab_size()} pieces (BPE, byte fallback, pad/unk/bos/eos = 0/1/2/3)")
    return 0


def cmd_pretokenize(args: argparse.Namespace) -> int:
    from hyperloop_dist.data.pretokenize import pretokenize
    from hyperloop_dist.data.token_windows import prepare_corpus

    cfg = _load(args.config)
    prepare_corpus(cfg)  # sources checked, tokenizer trained if missing
    pretokenize(cfg, args.out)
    print(f"train with: data.loader=windows data.pretokenized={args.out}")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from hyperloop_dist.model.params import compare_kinds, format_table

    cfg = _load(args.config)
    m = cfg.model
    recipe, overrides = _split_recipe(args.config)
    name = (recipe or "tiny-cpu (default)") + (f" with {' '.join(overrides)}" if overrides else "")
    print(f"{name}: hidden {m.hidden_size}, heads {m.num_heads}, "
          f"vocab {m.vocab_size}, seq {m.seq_length}, begin/middle/end {m.begin_layers}/{m.middle_layers}/"
          f"{m.end_layers} x {m.loops} loops, {m.hc.streams} streams")
    print(format_table(compare_kinds(m)))
    return 0


def _export_items(items: list[str]) -> tuple[list[str], str, str]:
    """``[key=value ...] SOURCE OUT``: settings (a bare key means ``export.key``), then the two paths."""
    paths = [i for i in items if "=" not in i]
    if len(paths) != 2:
        raise ConfigError(f"hyperloop export: expected SOURCE and OUT paths after the settings, got {paths}")
    settings = [i if "." in i.partition("=")[0] else f"export.{i}" for i in items if "=" in i]
    return settings, paths[0], paths[1]


def cmd_export(args: argparse.Namespace) -> int:
    from hyperloop_dist.export.release import export_release, load_release

    if args.release + args.int4 + (args.quantize is not None) != 1:
        print("hyperloop export: choose one format: --release (bf16/fp32 release), --int4 (our INT4) or "
              "--quantize SCHEME (llm-compressor)", file=sys.stderr)
        return 2
    if args.format is not None and not args.int4:
        print("hyperloop export: --format gguf goes with --int4 only", file=sys.stderr)
        return 2
    settings, source, out = _export_items(args.items)
    if args.int4:
        return _export_int4(settings, source, out, args.format)
    if args.quantize is not None:
        return _export_quantized(settings, source, out, args.quantize)
    if settings:
        raise ConfigError(f"hyperloop export --release takes no settings (got {' '.join(settings)})")
    out = export_release(source, out)
    model = load_release(out)
    n_params = sum(p.numel() for p in model.parameters())
    size = (out / "model.safetensors").stat().st_size
    print(f"release written to {out}: {model.cfg.kind}, {n_params:,} parameters, model.safetensors {size / 1e6:.1f} MB "
          "(self-contained: AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True); README.md)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hyperloop_dist.evaluation.offline import evaluate_checkpoint, summary, write_results

    tasks = [t for t in (args.tasks or "").split(",") if t]
    result = evaluate_checkpoint(args.checkpoint, args.config, windows=args.windows, loops=args.loops, tasks=tasks,
                                 limit=args.limit, task_dir=args.task_dir, batch_size=args.batch_size)
    print(summary(result))
    if args.out:
        write_results(result, args.out)
        print(f"results written to {args.out}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from hyperloop_dist.evaluation.analysis import analyze, tables

    # Items with "=" are data overrides for every model, the rest the models to compare (argparse hands
    # overrides written after --compare OTHER to --compare).
    items = [*args.config, *(args.compare or [])]
    paths, overrides = [c for c in items if "=" not in c], [c for c in items if "=" in c]
    results, out = analyze(paths, overrides, windows=args.windows, batch_size=args.batch_size,
                           device=args.device, out=args.out)
    print(tables(results))
    print(f"figures and results written to {out}/ (cosine_heatmap.png, logit_lens.png, analysis.json)")
    return 0


def _export_int4(settings: list[str], source: str, out: str, fmt: str | None) -> int:
    from hyperloop_dist.export.quantize_release import export_int4

    if fmt is not None:
        settings = [*settings, f"export.format={fmt}"]
    report = export_int4(source, out, settings)
    print(f"INT4 release written to {report.out} (compressed-tensors pack-quantized, loads with "
          f"AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True); README.md)")
    print(report.table())
    return 0


def _export_quantized(settings: list[str], source: str, out: str, scheme: str) -> int:
    from hyperloop_dist.export.quantize_release import export_quantized

    report = export_quantized(source, out, scheme, settings)
    print(f"{scheme} release written to {report.out} (llm-compressor, compressed-tensors; loads with "
          f"AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) and in vLLM; README.md)")
    print(report.table())
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from hyperloop_dist.cluster.profile import load_profile
    from hyperloop_dist.cluster.submit import prepare, sbatch, write_run_dir

    recipe, _ = _split_recipe(args.config)
    job = prepare(_load(args.config, layout=True), load_profile(args.cluster), Path(recipe).stem if recipe else "tiny-cpu",
                  run_dir=args.run_dir)
    if args.dry_run:
        print(job.script, end="")
        return 0
    script = write_run_dir(job)
    job_id = sbatch(script)
    print(f"submitted job {job_id}: {script}; log {job.run_dir / 'logs' / f'slurm-{job_id}.out'}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from hyperloop_dist.cluster.plan import Hardware, format_plan, parse_mem, plan

    cfg = _load(args.config, layout=True)
    if args.gpus < 1 or args.gpus_per_node < 1 or (args.gpus > args.gpus_per_node and args.gpus % args.gpus_per_node):
        raise ConfigError(f"--gpus={args.gpus} --gpus-per-node={args.gpus_per_node}: use whole nodes")
    hw = Hardware(gpus=args.gpus, gpu_mem_bytes=parse_mem(args.gpu_mem),
                  gpus_per_node=min(args.gpus_per_node, args.gpus), mfu=args.mfu,
                  peak_flops=args.peak_tflops * 1e12)
    estimates = plan(cfg, hw)
    print(format_plan(cfg, hw, estimates, top=args.top))
    if args.validate:
        from hyperloop_dist.cluster.validate import validate_layout

        fitting = [e for e in estimates if e.fits]
        if not fitting:
            raise ConfigError("--validate: no layout fits; nothing to build")
        lay = fitting[0].layout
        print(f"validating tp={lay.tp} pp={lay.pp} dp={lay.dp} on {hw.gpus} ranks (fake process group, meta device):")
        checks = validate_layout(cfg, hw.gpus, lay.tp, lay.pp)
        print(f"layout constructs: {len(checks)} distinct shards built, each DP replica identical")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from hyperloop_dist.cluster.sweep import plan_sweep

    if bool(args.local) == bool(args.cluster):
        raise ConfigError("hyperloop sweep: give --cluster PROFILE (a SLURM job array) or --local (this machine)")
    if args.parallel < 1:
        raise ConfigError(f"--parallel={args.parallel}: run at least 1 point at a time")
    recipe, overrides = _split_recipe(args.config)
    out = Path(args.out)
    points = plan_sweep(recipe, overrides, args.grid, args.kinds.split(","), out)  # every point checked first
    fit = f"hyperloop scaling fit {args.out}/*/* --json {args.out}/fit.json --png {args.out}/fit.png"
    if args.dry_run:
        for p in points:
            print(f"dry-run  {p.run_dir}")
        print(f"{len(points)} points checked (dry run); fit with: {fit}")
        return 0
    if args.local:
        return _sweep_local(points, out, args.parallel, fit)
    from hyperloop_dist.cluster.profile import load_profile
    from hyperloop_dist.cluster.sweep import submit_sweep

    for run_dir, job_id in submit_sweep(points, load_profile(args.cluster), out):
        print(f"{job_id}  {run_dir}")
    print(f"{len(points)} points submitted as one job array; fit with: {fit}")
    return 0


def _sweep_local(points: list, out: Path, parallel: int, fit: str) -> int:
    from hyperloop_dist.cluster.sweep import run_local

    print(f"running {len(points)} points on this machine, {parallel} at a time")
    results = run_local(points, out, parallel)
    rows = [("point", "status", "seconds")] + [
        (" ".join(r.point.overrides), "ok" if r.status == 0 else f"exit {r.status} ({r.log})", f"{r.seconds:.0f}")
        for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    failed = sum(r.status != 0 for r in results)
    total = sum(r.seconds for r in results)
    print(f"{len(results) - failed} of {len(results)} points trained ({total:.0f} s of training); fit with: {fit}")
    return 1 if failed else 0


def cmd_scaling_fit(args: argparse.Namespace) -> int:
    import json

    from hyperloop_dist.cluster.scaling import collect_runs, fit_study, format_study

    points, skipped = collect_runs(args.runs)
    study = fit_study(points, args.law, args.bootstrap, args.starts, args.seed, skipped)
    print(format_study(study))
    if args.json:
        Path(args.json).write_text(json.dumps(study.as_json(args.bootstrap, args.starts, args.seed), indent=1) + "\n")
        print(f"fit written to {args.json}")
    if args.png:
        from hyperloop_dist.cluster.scaling_plot import plot_study

        print(f"plot written to {plot_study(study, args.png)}")
    return 0


def cmd_scaling_predict(args: argparse.Namespace) -> int:
    from hyperloop_dist.cluster import scaling

    points, skipped = scaling.collect_runs(args.runs)
    if skipped:
        print(f"skipped {len(skipped)} paths: " + "; ".join(skipped))
    if args.holdout:
        _, rows = scaling.holdout_largest(points, args.law, args.bootstrap, args.starts, args.seed)
        print(scaling.format_holdout(rows))
        return 0
    kind, params, tokens = args.kind, args.params and scaling.parse_count(args.params), \
        args.tokens and scaling.parse_count(args.tokens)
    if args.config:
        from hyperloop_dist.model.params import report

        cfg = _load(args.config)
        kind = kind or cfg.model.kind
        if kind != cfg.model.kind:
            cfg = _load([*args.config, f"model.kind={kind}"])
        params = params or report(cfg.model).non_embedding
        tokens = tokens or float(cfg.train.steps * cfg.train.micro_batch_size * cfg.train.grad_accum
                                 * cfg.data_parallel_size * cfg.model.seq_length)
    missing = [flag for flag, v in (("--kind", kind), ("--params", params), ("--tokens", tokens)) if not v]
    if missing:
        raise ConfigError(f"hyperloop scaling predict: give {', '.join(missing)} (or --config RECIPE for all "
                          "three), or --holdout largest")
    if kind not in scaling.kinds_of(points):
        raise ConfigError(f"--kind {kind}: no runs of that kind (kinds: {', '.join(scaling.kinds_of(points))})")
    study = scaling.fit_study(points, args.law, args.bootstrap, args.starts, args.seed)
    loss, (lo, hi) = study.predict(kind, params, tokens)
    print(f"{study.law} fit of {len(points)} runs; N {params:,.0f} non-embedding parameters, D {tokens:,.0f} tokens")
    print(f"{kind}: predicted loss {loss:.4f} (90% CI {lo:.4f}–{hi:.4f})")
    return 0


def _scaling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories (folders that are not runs are skipped and listed)")
    p.add_argument("--law", default="joint", choices=("joint", "joint-own-alpha", "separate"),
                   help="joint: kinds share E, B, beta and alpha, differ in A (default); joint-own-alpha: also "
                        "their own alpha; separate: one fit per kind")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the 90%% intervals (default 200)")
    p.add_argument("--starts", type=int, default=4, help="starts per bootstrap refit (default 4)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperloop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = "[RECIPE.yaml] [section.field=value ...] (default recipe: tiny-cpu)"

    p = sub.add_parser("train", help="train a model (starts the local processes itself outside torchrun)")
    p.add_argument("config", nargs="*", metavar="ARG", help=config_help)
    p.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="data commands").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="obtain the corpus, train the tokenizer, tokenize")
    p.add_argument("config", nargs="*", metavar="ARG", help=config_help)
    p.set_defaults(func=cmd_data_prepare)

    p = data.add_parser("train-tokenizer", help="train the sentencepiece BPE tokenizer on a sample of the sources")
    p.add_argument("config", nargs="*", metavar="ARG", help=config_help)
    p.add_argument("--sample-mb", type=float, default=32.0, help="megabytes of text to train on (default 32)")
    p.set_defaults(func=cmd_train_tokenizer)

    p = data.add_parser("pretokenize", help="write the training sources as a Megatron indexed dataset (.bin/.idx)")
    p.add_argument("config", nargs="*", metavar="ARG", help=config_help)
    p.add_argument("--out", required=True, help="path prefix of the .bin/.idx pair")
    p.set_defaults(func=cmd_pretokenize)

    p = sub.add_parser("export", help="consolidate a checkpoint into a release, or quantize it",
                       usage="hyperloop export (--release | --int4 | --quantize SCHEME) [key=value ...] SOURCE OUT")
    p.add_argument("--release", action="store_true", help="one safetensors file + config.json + tokenizer")
    p.add_argument("--int4", action="store_true",
                   help="INT4 weight-only release (compressed-tensors pack-quantized); settings: method=rtn|gptq "
                        "group_size=128 calibration_batches=16 ... (export.* in docs/export.md), data.* overrides")
    p.add_argument("--quantize", choices=QUANT_SCHEMES, metavar="SCHEME",
                   help=f"llm-compressor oneshot to a compressed-tensors release that vLLM serves: "
                        f"{', '.join(QUANT_SCHEMES)}; settings: group_size=128 calibration_batches=16 "
                        "heldout_windows=64 quantize_head=false gptq_dampening=0.01, data.* overrides")
    p.add_argument("--format", choices=("compressed-tensors", "gguf"), default=None,
                   help="--int4 only: also write model.gguf (Q4_0 container, not runnable by llama.cpp)")
    p.add_argument("items", nargs="+", metavar="ARG",
                   help="[key=value ...] SOURCE OUT: SOURCE a checkpoint, a run directory (its latest good "
                        "checkpoint) or a release; OUT the directory to create (must not exist or be empty)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="held-out loss, per-loop curve, loss vs loops and lm-eval tasks of a checkpoint")
    p.add_argument("checkpoint", help="a release (hyperloop export --release), a run directory or a checkpoint")
    p.add_argument("config", nargs="*", metavar="ARG",
                   help="[RECIPE.yaml] [section.field=value ...] for the held-out data (default: the run's recipe)")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks: local (hyperloop_heldout_ppl, hyperloop_next_line, "
                                   "hyperloop_last_word, hyperloop_continue) or lm-eval's own (e.g. hellaswag)")
    p.add_argument("--loops", type=int, nargs="+", metavar="K", help="looped kinds: held-out loss after K loops")
    p.add_argument("--windows", type=int, help="held-out windows (default eval.windows)")
    p.add_argument("--limit", type=int, help="documents per lm-eval task")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--task-dir", help="where to write the local tasks (lm_eval --include_path reads it)")
    p.add_argument("--out", help="write the results as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("analyze", help="the paper's section 4.4 analyses: cross-loop similarity, residual "
                                       "cosine heatmap, logit lens (any kind, held-out windows)")
    p.add_argument("config", nargs="+", metavar="RUN_OR_RELEASE",
                   help="releases or run / checkpoint directories (several are compared side by side), then "
                        "[section.field=value ...] for the held-out data (default: each run's recipe)")
    p.add_argument("--compare", nargs="+", metavar="OTHER", help="more models to put side by side")
    p.add_argument("--windows", type=int, help="held-out windows (default eval.windows)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    p.add_argument("--out", help="output directory (default RUN_OR_RELEASE/analysis)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("params", help="parameter / FLOP table of a recipe and its baselines; first column: the "
                       "paper's count (untied LM head in, input embedding out)")
    p.add_argument("config", nargs="*", metavar="ARG", help=config_help)
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("submit", help="render the sbatch script for a recipe on a cluster profile and submit it")
    p.add_argument("config", nargs="*", metavar="ARG", help=config_help)
    p.add_argument("--cluster", required=True, metavar="PROFILE",
                   help="cluster profile: a YAML file (cluster/profiles/NAME.yaml) or a shipped profile's name")
    p.add_argument("--run-dir", help="run directory (default: the recipe's train.run_dir)")
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("plan", help="per-GPU memory and step time of every TP x PP x DP x engine layout")
    p.add_argument("config", nargs="*", metavar="ARG", help=config_help)
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu-mem", default="80GB", help="memory per GPU (default 80GB)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8); TP stays inside a node")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per GPU (H100: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization assumed (default 0.4)")
    p.add_argument("--top", type=int, default=12, help="rows to print (default 12)")
    p.add_argument("--validate", action="store_true",
                   help="build every rank's model shard of the best layout on this CPU (meta device, fake process "
                        "group) and check shapes and parameter counts")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sweep", help="run a scaling grid (sizes x tokens x kinds): one SLURM job array "
                                     "(--cluster) or local processes (--local)")
    p.add_argument("config", nargs="*", metavar="ARG", help=config_help)
    p.add_argument("--cluster", metavar="PROFILE", help="cluster profile (as for submit): submit a SLURM job array")
    p.add_argument("--local", action="store_true", help="train the points on this machine, no scheduler")
    p.add_argument("--parallel", type=int, default=1,
                   help="--local: points trained at once (default 1; each point starts its own "
                        "parallel.nproc_per_node ranks)")
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="axes, e.g. model.hidden_size=256,512 train.steps=1000,2000")
    p.add_argument("--kinds", default="hyperloop,transformer", help="model kinds (default hyperloop,transformer)")
    p.add_argument("--out", default="runs/sweep", help="parent of the points' run directories")
    p.add_argument("--dry-run", action="store_true", help="check every point's config; run nothing")
    p.set_defaults(func=cmd_sweep)

    scaling = sub.add_parser("scaling", help="scaling-law tools").add_subparsers(dest="scaling_command",
                                                                                required=True)
    p = scaling.add_parser("fit", help="fit L(N, D) = E + A N^-alpha + B D^-beta (Chinchilla Approach 3) with "
                                       "bootstrap intervals and the equal-loss ratios to hyperloop")
    _scaling_options(p)
    p.add_argument("--json", help="write fits, ratios and runs to this JSON file")
    p.add_argument("--png", help="also plot loss against N and against compute to this PNG")
    p.set_defaults(func=cmd_scaling_fit)
    p = scaling.add_parser("predict", help="predicted loss (90%% CI) of a kind at N parameters and D tokens, or "
                                           "--holdout largest: predict each kind's largest runs from the others")
    _scaling_options(p)
    p.add_argument("--kind", help="model kind to predict")
    p.add_argument("--params", help="non-embedding parameters N (e.g. 25M), as `hyperloop params` counts them")
    p.add_argument("--tokens", help="training tokens D (e.g. 32M)")
    p.add_argument("--config", nargs="+", metavar="ARG",
                   help="RECIPE.yaml [section.field=value ...]: N, D and the kind from a recipe (flags win)")
    p.add_argument("--holdout", choices=("largest",), help="fit without each kind's largest size, predict it")
    p.set_defaults(func=cmd_scaling_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow the options (`hyperloop submit R --cluster P train.steps=5`).
    if extra and hasattr(args, "config") and all("=" in e and not e.startswith("-") for e in extra):
        args.config += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"hyperloop: config error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, FileExistsError, DataError, ValueError, FileNotFoundError) as exc:
        print(f"hyperloop: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

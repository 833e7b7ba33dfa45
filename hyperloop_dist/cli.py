"""The ``hyperloop`` command: ``train``, ``data``, ``params``.

Every subcommand takes an optional recipe (default: the embedded tiny-cpu recipe) followed by
``section.field=value`` overrides, validated like the recipe.
"""

from __future__ import annotations

import argparse
import sys

from hyperloop_dist.config import Config, ConfigError, load_config


def _split_recipe(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _load(items: list[str]) -> Config:
    recipe, overrides = _split_recipe(items)
    return load_config(recipe, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from hyperloop_dist.data.token_windows import prepare_corpus
    from hyperloop_dist.parallel.launch import inside_launcher, launch
    from hyperloop_dist.train.trainer import run_training

    cfg = _load(args.config)
    if not inside_launcher():
        prepare_corpus(cfg)
    launch(cfg, run_training, cfg)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from hyperloop_dist.data.token_windows import prepare_corpus

    cfg = _load(args.config)
    tokens_dir = prepare_corpus(cfg)
    print(f"data ready: corpus {cfg.data.dir}, tokenizer {cfg.data.tokenizer}, tokens {tokens_dir}")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from hyperloop_dist.model.params import compare_kinds, format_table

    cfg = _load(args.config)
    m = cfg.model
    print(f"{args.config[0] if args.config else 'tiny-cpu (default)'}: hidden {m.hidden_size}, heads {m.num_heads}, "
          f"vocab {m.vocab_size}, seq {m.seq_length}, begin/middle/end {m.begin_layers}/{m.middle_layers}/"
          f"{m.end_layers} x {m.loops} loops, {m.hc.streams} streams")
    print(format_table(compare_kinds(m)))
    return 0


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

    p = sub.add_parser("params", help="parameter / FLOP table of a recipe and its baselines")
    p.add_argument("config", nargs="*", metavar="ARG", help=config_help)
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"hyperloop: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``hyperloop-lm-eval``: lm-eval's own command line with our model registered as ``hyperloop``.

lm-eval 0.4.13 finds models only in its registry, filled by its own ``lm_eval.models`` package; it reads
no entry points, so an installed package cannot add a model to the plain ``lm_eval`` command. This runs
lm-eval's ``cli_evaluate`` unchanged after importing our adapter (which registers it)::

    hyperloop-lm-eval --model hyperloop --model_args path=releases/tiny-cpu --tasks hyperloop_next_line \\
        --include_path runs/tiny-cpu/eval_tasks
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import hyperloop_dist.evaluation.lm_eval_model  # noqa: F401 - registers "hyperloop"

    cli_evaluate()


if __name__ == "__main__":
    main()

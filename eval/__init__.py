"""Evaluation (imported as ``hyperloop_dist.evaluation``): held-out loss reduced over data-parallel ranks
(``heldout``), the per-loop curve (``loops``), the training hook (``periodic``), ``hyperloop eval``
(``offline``, ``loading``) and lm-eval: the ``hyperloop`` model (``lm_eval_model``), offline tasks
(``local_tasks``, ``task_configs/``) and the runner (``harness``)."""

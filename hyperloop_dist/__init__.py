"""hyperloop_dist: train Hyperloop Transformers (looped middle block + loop-level mHC) at scale."""

import os
import warnings

__version__ = "0.1.0"


def _quiet_expected_cpu_warnings() -> None:
    # Without CUDA, Megatron warns on import that Apex/Transformer Engine kernels are absent: expected here,
    # and repeated once per rank. On a GPU they mean a slow fallback, so they stay visible there.
    import torch

    if torch.cuda.is_available() or os.environ.get("HYPERLOOP_SHOW_BACKEND_WARNINGS"):
        return
    for pattern in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                    r"full scope is deprecated"):
        warnings.filterwarnings("ignore", message=pattern)


_quiet_expected_cpu_warnings()

"""hyperloop_dist: train Hyperloop Transformers (looped middle block + loop-level mHC) at scale."""

import contextlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

__version__ = "0.1.0"


def _quiet_expected_cpu_warnings() -> None:
    # Without CUDA, Megatron warns on import that Apex/Transformer Engine kernels are absent: expected here,
    # and repeated once per rank. On a GPU they mean a slow fallback, so they stay visible there.
    for pattern in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                    r"full scope is deprecated"):
        warnings.filterwarnings("ignore", message=pattern)


@contextlib.contextmanager
def _compile_as_plain_decorator():
    import torch

    real = torch.compile
    torch.compile = lambda model=None, **_: model if model is not None else (lambda fn: fn)
    try:
        yield
    finally:
        torch.compile = real


class _MegatronWithoutInductor(importlib.abc.MetaPathFinder):
    """Imports ``megatron.core`` with ``torch.compile`` as a plain decorator, on machines without CUDA.

    Megatron wraps its fused GPU kernels in ``torch.compile`` when its modules load, which imports
    TorchInductor: about 5 s of every process's start on CPU (8.4 s -> 3.3 s to import the trainer), paid by
    every rank of every run. None of those kernels runs on CPU, and with CUDA nothing here is changed.
    """

    def find_spec(self, name: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != "megatron.core":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_without_inductor(module: object) -> None:
                with _compile_as_plain_decorator():
                    exec_module(module)

            spec.loader.exec_module = exec_without_inductor
        return spec


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if not _cuda_available():
    if not os.environ.get("HYPERLOOP_SHOW_BACKEND_WARNINGS"):
        _quiet_expected_cpu_warnings()
    if "megatron.core" not in sys.modules:
        sys.meta_path.insert(0, _MegatronWithoutInductor())

"""Let Megatron-core 0.16.1 run on CPU over gloo; inert when CUDA is present.

Megatron-core assumes CUDA in a few places (``docs/megatron_cpu.md`` has the measured list):
``torch.cuda.current_device()`` as an allocation device (P1), the CUDA RNG tracker (P2, P2b),
``device="cuda"`` literals in the schedules, optimizer and grad clipping (P3), ``torch.cuda.synchronize``
in p2p communication (P4) and ``Tensor.type() == 'torch.cuda.FloatTensor'`` checks (P5).

Every device decision of the project goes through this module: production code calls
:func:`seed_model_parallel` and :func:`device_mode`, never ``torch.cuda.*`` or Megatron's CUDA seed
function directly. The patches touch private Megatron names, so megatron-core is pinned exactly and
``tests/test_cpu_shim.py`` is the canary to run on every upgrade.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def is_active() -> bool:
    """True once :func:`enable` has patched Megatron for CPU."""
    return _ENABLED


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpuMode(TorchFunctionMode):
    """P3 + P5: rewrite CUDA placements to CPU and spoof CUDA tensor type strings.

    Scoped (entered around Megatron's schedules, optimizer and DDP set-up) rather than global, because a
    TorchFunctionMode adds Python overhead to every torch call it sees.
    """

    _TYPE_NAMES = {
        torch.float32: "torch.cuda.FloatTensor",
        torch.float16: "torch.cuda.HalfTensor",
        torch.bfloat16: "torch.cuda.BFloat16Tensor",
        torch.float64: "torch.cuda.DoubleTensor",
        torch.int64: "torch.cuda.LongTensor",
        torch.int32: "torch.cuda.IntTensor",
        torch.uint8: "torch.cuda.ByteTensor",
        torch.bool: "torch.cuda.BoolTensor",
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return self._TYPE_NAMES.get(args[0].dtype, func(*args))
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """P2: Megatron's named RNG-state tracker, keeping CPU generator states.

    Same interface as ``megatron.core.tensor_parallel.random.CudaRNGStatesTracker`` (add, fork,
    get_states, set_states, reset), so dropout in tensor-parallel regions draws from a per-TP-rank stream
    and activation recompute replays it.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already tracked")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} is already tracked")
        self._is_initialized = True
        self.seeds_.add(seed)
        generator = torch.Generator().manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} is not tracked")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def enable() -> None:
    """Apply P1, P2, P2b and P4 once per process. Does nothing when CUDA is available."""
    global _ENABLED
    if _ENABLED or cuda_available():
        return
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: torch.device("cpu")  # P1
    torch.cuda.synchronize = lambda *args, **kwargs: None  # P4
    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()  # P2
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()  # P2b
    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _ENABLED = True


def device_mode() -> contextlib.AbstractContextManager:
    """Context in which Megatron's hard-coded ``"cuda"`` literals land on CPU (P3, P5); a no-op on GPU."""
    return CudaToCpuMode() if _ENABLED else contextlib.nullcontext()


def seed_model_parallel(seed: int) -> None:
    """Seed torch and Megatron's tracked RNG streams the way ``model_parallel_cuda_manual_seed`` does."""
    from megatron.core import parallel_state, tensor_parallel

    torch.manual_seed(seed)
    if cuda_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    # Same offsets as megatron.core.tensor_parallel.random.model_parallel_cuda_manual_seed.
    tracker.add("data-parallel-rng", seed)
    tracker.add("model-parallel-rng", seed + 2718 + tp_rank)
    tracker.add("expert-parallel-rng", seed + 1024 + 100 * ep_rank + etp_rank)


def device() -> torch.device:
    """The device this process computes on."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def causal_mask(seq_len: int) -> torch.Tensor | None:
    """Attention mask for Megatron's local attention (True = masked).

    On GPU, None lets Megatron build its own; on CPU its default builder allocates with ``device="cuda"``
    (``transformer/utils.py:get_default_causal_mask``), so we hand it one.
    """
    if not _ENABLED:
        return None
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)[None, None]

"""The training engines and their registry (``parallel.engine``).

Adding an engine: one module here with an :class:`~hyperloop_dist.train.engines.base.Engine` subclass, and
its class in :data:`ENGINES` (``docs/parallel.md``, "Adding an engine").
"""

from __future__ import annotations

from pathlib import Path

from hyperloop_dist.checkpoint.store import CheckpointError
from hyperloop_dist.config import Config, ConfigError
from hyperloop_dist.config import validate as validate_recipe
from hyperloop_dist.parallel.distributed import RankInfo
from hyperloop_dist.train.engines.base import Engine, PlanVariant, StepResult, require
from hyperloop_dist.train.engines.deepspeed import DeepSpeedEngine
from hyperloop_dist.train.engines.fsdp import FsdpEngine
from hyperloop_dist.train.engines.megatron import MegatronEngine

ENGINES: dict[str, type[Engine]] = {e.name: e for e in (MegatronEngine, FsdpEngine, DeepSpeedEngine)}

__all__ = ["ENGINES", "Engine", "PlanVariant", "StepResult", "build", "engine_class", "for_checkpoint", "validate"]


def engine_class(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise ConfigError(f"parallel.engine={name!r}: must be one of {', '.join(map(repr, ENGINES))}")
    return ENGINES[name]


def validate(cfg: Config) -> None:
    """The whole recipe check: the engine-neutral rules (:func:`hyperloop_dist.config.validate`), then the
    engine's. What runs or plans a layout calls this (``hyperloop train``, ``submit``, ``plan``, ``sweep``)."""
    validate_recipe(cfg)
    p = cfg.parallel
    engine = engine_class(p.engine)
    for other in ENGINES.values():
        if other is engine:
            continue
        for field, unused in other.settings.items():
            value = getattr(p, field)
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            require(value == unused, f"parallel.{field}={shown} is a setting of the {other.name} engine "
                                     f"(parallel.engine is {p.engine!r}); remove it, or set "
                                     f"parallel.engine={other.name}")
    require(engine.supports_tp or p.tp == 1, _unsupported(engine, "tp", p.tp))
    require(engine.supports_pp or p.pp == 1, _unsupported(engine, "pp", p.pp))
    fusing = [e.name for e in ENGINES.values() if e.supports_fusions]
    require(engine.supports_fusions or not cfg.train.fusions,
            f"train.fusions={cfg.train.fusions}: these patch Megatron's optimizer and layers, only with "
            f"parallel.engine={' or '.join(fusing)} (not {p.engine!r}); remove train.fusions")
    engine.check_config(cfg)


def _unsupported(engine: type[Engine], axis: str, size: int) -> str:
    able = [e.name for e in ENGINES.values() if getattr(e, f"supports_{axis}")]
    return (f"parallel.{axis}={size} with parallel.engine={engine.name!r}: the {engine.name} engine has no "
            f"{'tensor' if axis == 'tp' else 'pipeline'} parallelism; use parallel.engine="
            f"{' or '.join(able)} for it, or parallel.{axis}=1")


def build(cfg: Config, info: RankInfo) -> Engine:
    """The engine ``parallel.engine`` names, built for this rank."""
    return engine_class(cfg.parallel.engine)(cfg, info)


def for_checkpoint(step_dir: Path) -> type[Engine]:
    """The engine that wrote a checkpoint, from the sub-directory its model shards are in."""
    found = [e for e in ENGINES.values() if (step_dir / e.checkpoint_dir).is_dir()]
    if len(found) != 1:
        dirs = ", ".join(f"{e.checkpoint_dir}/" for e in ENGINES.values())
        raise CheckpointError(f"{step_dir}: expected exactly one of {dirs}; found "
                              f"{', '.join(e.checkpoint_dir for e in found) or 'none'}")
    return found[0]

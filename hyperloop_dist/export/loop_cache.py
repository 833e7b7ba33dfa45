"""The key/value cache of a looped model: one entry per attention call, loop passes included.

A looped model runs each middle layer L times per token, on different inputs each time, so its cache is
not one entry per distinct layer: middle layer m keeps L entries, one per pass. :class:`LoopKVCache`
holds ``begin + passes * middle + end`` :class:`~transformers.cache_utils.DynamicLayer` entries in the
order a forward makes its attention calls (``ReferenceModel.cache_layout``), so the model addresses them
by that index and ``generate`` handles the cache like any other (beam reordering, cropping).
"""

from __future__ import annotations

from transformers.cache_utils import Cache, DynamicLayer


class LoopKVCache(Cache):
    """Entries ``begin.i``, then ``middle.m@pass p`` for every pass p and middle layer m, then ``end.i``."""

    def __init__(self, begin: int, middle: int, passes: int, end: int) -> None:
        self.begin_layers, self.middle_layers, self.passes, self.end_layers = begin, middle, passes, end
        super().__init__(layers=[DynamicLayer() for _ in range(begin + passes * middle + end)])
        self.loops_run: list[int] = []  # with the experimental confidence exit: loops each decoding step ran

    def middle_slot(self, loop: int, layer: int = 0) -> int:
        """The entry of middle layer ``layer`` in pass ``loop`` (0-based)."""
        return self.begin_layers + loop * self.middle_layers + layer

    @property
    def end_slots(self) -> range:
        first = self.begin_layers + self.passes * self.middle_layers
        return range(first, first + self.end_layers)

    def names(self) -> list[str]:
        """One name per entry, in index order (what each one caches)."""
        return ([f"begin.{i}" for i in range(self.begin_layers)]
                + [f"middle.{m}@pass{p}" for p in range(self.passes) for m in range(self.middle_layers)]
                + [f"end.{i}" for i in range(self.end_layers)])

    def drop_last(self, slots: range, tokens: int = 1) -> None:
        """Forget the last ``tokens`` positions of the entries ``slots`` (a readout that was not kept)."""
        for slot in slots:
            self.layers[slot].crop(-tokens)

    def repeat_last(self, source: int, target: int, tokens: int = 1) -> None:
        """Append ``source``'s last ``tokens`` positions to ``target`` (passes a token skipped)."""
        layer = self.layers[source]
        self.layers[target].update(layer.keys[..., -tokens:, :], layer.values[..., -tokens:, :])

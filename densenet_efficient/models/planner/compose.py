"""Pricing a plan from the segments of two simulated steps, without simulating it.

:func:`~.search.fit_memory` weighs many plans: each dense block keeping its bottleneck in its last
``n`` layers, the stem keeping or recomputing its pooling indices. Simulating each would cost a
whole step apiece, so the search composes them from the ``"efficient"`` and ``"max_saving"``
simulations instead: the bytes alive while a segment runs are those every earlier segment left
alive (``Segment.kept``) plus what the segment needs above its start. A block keeping ``n`` of its
``L`` bottlenecks keeps ``n / L`` of the difference between the two simulations (every bottleneck
of a block has the same size) and needs, while it runs, at most the ``"max_saving"`` block's bytes
plus those ``n`` bottlenecks. The plan the search returns is then simulated whole
(tests/models/test_planner.py checks the composition against whole simulations).
"""

from __future__ import annotations

from dataclasses import dataclass

from .simulate import Line, Simulation, hull_max

__all__ = ["Composer"]


@dataclass(frozen=True)
class Composer:
    """The bytes at the peak of a step whose blocks keep their last ``keeps[b]`` bottlenecks.

    ``efficient`` and ``max_saving``: the two uniform simulations (their stems as named);
    ``layers``: each dense block's layer count."""

    efficient: Simulation
    max_saving: Simulation
    layers: tuple[int, ...]

    def _block(self, i: int, keep: int, layers: int) -> tuple[Line, tuple[Line, ...], tuple[Line, ...]]:
        e, m = self.efficient.segments[i], self.max_saving.segments[i]
        if keep == layers:
            return e.kept, e.forward, e.backward
        if keep == 0:
            return m.kept, m.forward, m.backward
        per = e.kept - m.kept
        kept = Line(
            m.kept.fixed + per.fixed * keep // layers, m.kept.per_image + per.per_image * keep // layers
        )
        bottlenecks = kept - m.kept
        return kept, tuple(ln + bottlenecks for ln in m.forward), tuple(ln + bottlenecks for ln in m.backward)

    def peak(self, keeps: tuple[int, ...], stem_max_saving: bool, batch: int) -> int:
        """The composed peak bytes at ``batch`` (the persistent bytes included)."""
        stem = self.max_saving if stem_max_saving else self.efficient
        base = self.efficient.persistent
        best = max(hull_max(self.efficient.optimizer, batch), base.at(batch) + hull_max(stem.stem, batch))
        offset = base + stem.stem_kept
        blocks = iter(zip(keeps, self.layers, strict=True))
        for i, seg in enumerate(self.efficient.segments):
            if seg.name.startswith("denseblock"):
                keep, layers = next(blocks)
                kept, forward, backward = self._block(i, keep, layers)
            else:
                kept, forward, backward = seg.kept, seg.forward, seg.backward
            here = offset.at(batch)
            best = max(best, here + hull_max(forward, batch), here + hull_max(backward, batch))
            offset = offset + kept
        return max(best, offset.at(batch) + hull_max(self.efficient.head, batch))

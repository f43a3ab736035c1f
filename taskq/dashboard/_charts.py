"""Chart geometry: numbers in, rectangles out. The SVG is drawn by a template
(``_macros.html``), so every label passes through autoescaping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from ._render import num


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    w: float
    h: float
    series: str
    title: str


@dataclass(frozen=True)
class Mark:
    x: float
    y: float
    label: str


@dataclass(frozen=True)
class Chart:
    label: str
    width: int
    height: int
    left: int
    bars: list[Bar]
    grid: list[Mark]
    ticks: list[Mark]
    total: dict[str, int]


def _nice_top(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at least ``value``."""
    top = 1
    while True:
        for step in (1, 2, 5):
            if top * step >= value:
                return top * step
        top *= 10


def stacked_bars(
    label: str,
    times: Sequence[datetime],
    series: Sequence[tuple[str, Sequence[int]]],
    *,
    width: int = 720,
    height: int = 160,
    tick_every: int = 10,
) -> Chart:
    """One stacked bar per time slot (``series``: name and one value per slot)."""
    left, bottom, top_pad = 44, 16, 6
    slots = len(times)
    totals = [sum(values[i] for _, values in series) for i in range(slots)]
    top = _nice_top(max(totals, default=0) or 1)
    plot_h = height - bottom - top_pad
    slot_w = (width - left) / max(slots, 1)
    bars: list[Bar] = []
    for i, at in enumerate(times):
        base: float = height - bottom
        for name, values in series:
            value = values[i]
            if value <= 0:
                continue
            h = plot_h * value / top
            base -= h
            bars.append(
                Bar(
                    x=round(left + i * slot_w + 0.5, 2),
                    y=round(base, 2),
                    w=round(max(slot_w - 1, 1), 2),
                    h=round(h, 2),
                    series=name,
                    title=f"{at:%H:%M} UTC: {num(value)} {name}",
                )
            )
    grid = [Mark(0, round(height - bottom - plot_h * f, 2), num(top * f)) for f in (0, 0.5, 1)]
    ticks = [
        Mark(round(left + (i + 0.5) * slot_w, 2), 0, f"{times[i]:%H:%M}")
        for i in range(0, slots, tick_every)
    ]
    total = {name: sum(values) for name, values in series}
    return Chart(label, width, height, left, bars, grid, ticks, total)

"""A small SVG line chart for the docs: no plotting library, a file that diffs well.

Lines share the x axis; each is drawn against the left or the right y axis,
solid or as steps (a count that changes at an instant, like live workers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 720, 380
LEFT, RIGHT, TOP, BOTTOM = 70, 60, 40, 70  # margins around the plot area
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


@dataclass(frozen=True)
class Line:
    label: str
    points: Sequence[tuple[float, float]]
    right: bool = False  # against the right axis
    steps: bool = False  # hold each value until the next point
    dashed: bool = False


def nice_top(value: float) -> float:
    """The smallest of 1, 2, 3, 4, 5, 6 or 8 times a power of ten at or above ``value``."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 3, 4, 5, 6, 8, 10) if m * power >= value)


def _ticks(top: float, count: int = 5) -> list[float]:
    return [top * i / count for i in range(count + 1)]


def _number(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) or value >= 10 else f"{value:g}"


def _grid(x1: float, y1: float, x2: float, y2: float) -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#eee"/>'


def line_chart(
    title: str,
    x_label: str,
    left_label: str,
    lines: Sequence[Line],
    right_label: str = "",
    right_top: float | None = None,
) -> str:
    """The chart as an SVG document."""
    x_top = nice_top(max(x for line in lines for x, _ in line.points))
    left_top = nice_top(max(y for line in lines if not line.right for _, y in line.points))
    if right_top is None and any(line.right for line in lines):
        right_top = nice_top(max(y for line in lines if line.right for _, y in line.points))
    width, height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x_at(x: float) -> float:
        return LEFT + width * x / x_top

    def y_at(y: float, right: bool) -> float:
        top = right_top if right and right_top else left_top
        return TOP + height * (1 - y / top)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
    ]
    for tick in _ticks(x_top):
        x = x_at(tick)
        out.append(_grid(x, TOP, x, TOP + height))
        out.append(
            f'<text x="{x:.1f}" y="{TOP + height + 16}" text-anchor="middle">{_number(tick)}</text>'
        )
    for tick in _ticks(left_top):
        y = y_at(tick, False)
        out.append(_grid(LEFT, y, LEFT + width, y))
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_number(tick)}</text>')
    if right_top:
        for tick in range(int(right_top) + 1):
            y = y_at(tick, True)
            out.append(f'<text x="{LEFT + width + 6}" y="{y + 4:.1f}">{tick}</text>')
    out.append(
        f'<rect x="{LEFT}" y="{TOP}" width="{width}" height="{height}" fill="none" stroke="#888"/>'
    )
    out.append(
        f'<text x="{LEFT + width / 2}" y="{TOP + height + 34}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
    )
    out.append(
        f'<text transform="translate(16 {TOP + height / 2}) rotate(-90)" text-anchor="middle">'
        f"{escape(left_label)}</text>"
    )
    if right_label:
        out.append(
            f'<text transform="translate({WIDTH - 14} {TOP + height / 2}) rotate(90)" '
            f'text-anchor="middle">{escape(right_label)}</text>'
        )
    for n, line in enumerate(lines):
        colour = COLOURS[n % len(COLOURS)]
        path: list[tuple[float, float]] = []
        for x, y in line.points:
            if line.steps and path:
                path.append((x, path[-1][1]))
            path.append((x, y))
        coords = " ".join(f"{x_at(x):.1f},{y_at(y, line.right):.1f}" for x, y in path)
        dash = ' stroke-dasharray="6 4"' if line.dashed else ""
        out.append(
            f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>'
        )
        lx = LEFT + (n % 3) * 220
        ly = HEIGHT - 16 if n < 3 else HEIGHT - 2
        out.append(
            f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 24}" y2="{ly - 4}" stroke="{colour}" '
            f'stroke-width="2"{dash}/>'
        )
        out.append(f'<text x="{lx + 30}" y="{ly}">{escape(line.label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"

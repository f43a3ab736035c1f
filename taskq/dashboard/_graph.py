"""A layered drawing of a directed acyclic graph, computed in Python.

The workflow page draws its steps as boxes, left to right, without any
script: this module gives every box its place and every edge its SVG path,
and a template writes the ``<svg>``. The method is the classic one (Sugiyama):

1. **Layers**: a node's layer is the length of the longest path to it from
   a root, so every edge goes from a lower layer to a higher one.
2. **Dummies**: an edge that spans several layers passes through a small
   invisible box in each layer between, so it is routed around the boxes
   there and takes part in step 3.
3. **Order**: within each layer, nodes are sorted by the mean position of
   their neighbours in the layer before (then after), a few sweeps; the
   order with the fewest crossings is kept.
4. **Coordinates**: each layer is a column; a node is pulled towards the
   mean height of its neighbours, then pushed apart so boxes never overlap.

Layouts depend only on the graph's shape, not on the steps' states, so they
are cached: a live page re-rendered every second lays its graph out once.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

#: A box's size and the gaps between them, in SVG user units (pixels).
NODE_WIDTH = 210.0
NODE_HEIGHT = 46.0
#: The height an edge passing through a layer takes there.
DUMMY_HEIGHT = 10.0
LAYER_GAP = 70.0
NODE_GAP = 14.0
MARGIN = 12.0
#: Down-and-up passes of the barycenter ordering (more rarely helps).
SWEEPS = 4


@dataclass(frozen=True)
class Box:
    """Where a node is drawn: its top-left corner and size, layer and rank in it."""

    key: str
    layer: int
    order: int
    x: float
    y: float
    width: float
    height: float

    @property
    def center_y(self) -> float:
        return self.y + self.height / 2


@dataclass(frozen=True)
class EdgePath:
    """One edge of the input, as an SVG path from its source box to its target box."""

    source: str
    target: str
    d: str


@dataclass(frozen=True)
class Layout:
    """A graph laid out: its boxes by key, its edges' paths, and its size."""

    boxes: dict[str, Box]
    edges: tuple[EdgePath, ...]
    layers: tuple[tuple[str, ...], ...]
    width: float
    height: float
    #: Edge crossings left between adjacent layers (0 for a tree drawn well).
    crossings: int


def layout(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> Layout:
    """Lay out the graph: ``nodes`` are keys, ``edges`` (source, target) pairs.

    Edges naming an unknown node, repeated edges and self-loops are ignored.
    Raises ValueError if the graph has a cycle.
    """
    return _layout(tuple(nodes), tuple(edges))


@lru_cache(maxsize=64)
def _layout(nodes: tuple[str, ...], edges: tuple[tuple[str, str], ...]) -> Layout:
    index = {key: i for i, key in enumerate(dict.fromkeys(nodes))}
    keys = list(index)
    pairs = list(dict.fromkeys((s, t) for s, t in edges if s in index and t in index and s != t))
    layer_of = _layers(keys, pairs)

    # Proper graph: every edge joins adjacent layers (dummies on long edges).
    # Real nodes keep their index; dummies are numbered after them.
    layer_count = max(layer_of.values(), default=-1) + 1
    node_layer = [layer_of[k] for k in keys]
    succ: list[list[int]] = [[] for _ in keys]
    pred: list[list[int]] = [[] for _ in keys]
    chains: list[tuple[str, str, list[int]]] = []
    for s, t in pairs:
        chain = [index[s]]
        for layer in range(layer_of[s] + 1, layer_of[t]):
            node_layer.append(layer)
            succ.append([])
            pred.append([])
            chain.append(len(node_layer) - 1)
        chain.append(index[t])
        for a, b in itertools.pairwise(chain):
            succ[a].append(b)
            pred[b].append(a)
        chains.append((s, t, chain))
    real = len(keys)

    order = _order(layer_count, node_layer, succ, pred)
    crossings = _count_all(order, succ)
    centers = _heights(order, node_layer, succ, pred, real)

    def height(n: int) -> float:
        return NODE_HEIGHT if n < real else DUMMY_HEIGHT

    top = min((centers[n] - height(n) / 2 for n in range(len(node_layer))), default=0.0)
    shift = MARGIN - top
    x_of = [MARGIN + layer * (NODE_WIDTH + LAYER_GAP) for layer in range(layer_count)]
    rank = {n: i for layer in order for i, n in enumerate(layer)}
    boxes = {
        key: Box(
            key,
            node_layer[i],
            rank[i],
            x_of[node_layer[i]],
            centers[i] + shift - NODE_HEIGHT / 2,
            NODE_WIDTH,
            NODE_HEIGHT,
        )
        for i, key in enumerate(keys)
    }
    paths = []
    for s, t, chain in chains:
        points = [(x_of[node_layer[n]], centers[n] + shift) for n in chain]
        paths.append(EdgePath(s, t, _path(points)))
    bottom = max((centers[n] + height(n) / 2 for n in range(len(node_layer))), default=0.0)
    return Layout(
        boxes=boxes,
        edges=tuple(paths),
        layers=tuple(tuple(keys[n] for n in layer if n < real) for layer in order),
        width=2 * MARGIN + layer_count * NODE_WIDTH + max(layer_count - 1, 0) * LAYER_GAP,
        height=bottom + shift + MARGIN if node_layer else 2 * MARGIN,
        crossings=crossings,
    )


def _layers(keys: list[str], pairs: list[tuple[str, str]]) -> dict[str, int]:
    """Longest-path layers from the roots, in topological order (Kahn)."""
    children: dict[str, list[str]] = {k: [] for k in keys}
    indegree = dict.fromkeys(keys, 0)
    for s, t in pairs:
        children[s].append(t)
        indegree[t] += 1
    layer = dict.fromkeys(keys, 0)
    ready = [k for k in keys if indegree[k] == 0]
    seen = 0
    while ready:
        key = ready.pop()
        seen += 1
        for child in children[key]:
            layer[child] = max(layer[child], layer[key] + 1)
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    if seen != len(keys):
        raise ValueError("the graph has a cycle")
    return layer


def _order(
    layer_count: int, node_layer: list[int], succ: list[list[int]], pred: list[list[int]]
) -> list[list[int]]:
    """Each layer's nodes, top to bottom: barycenter sweeps, the best order kept."""
    order: list[list[int]] = [[] for _ in range(layer_count)]
    for n, layer in enumerate(node_layer):
        order[layer].append(n)
    # First placement: layer by layer under the parents (input order breaks ties).
    _sweep(order, pred, range(1, layer_count), -1)
    best = [list(layer) for layer in order]
    best_count = _count_all(order, succ)
    for _ in range(SWEEPS):
        if best_count == 0:
            break
        _sweep(order, pred, range(1, layer_count), -1)
        _sweep(order, succ, range(layer_count - 2, -1, -1), +1)
        count = _count_all(order, succ)
        if count < best_count:
            best, best_count = [list(layer) for layer in order], count
    return best


def _sweep(order: list[list[int]], toward: list[list[int]], layers: range, step: int) -> None:
    """Sort each layer by the mean rank of its neighbours in layer ``i + step``."""
    for i in layers:
        rank = {n: r for r, n in enumerate(order[i + step])}
        here = {n: r for r, n in enumerate(order[i])}

        def key(
            n: int, rank: dict[int, int] = rank, here: dict[int, int] = here
        ) -> tuple[float, int]:
            linked = [rank[m] for m in toward[n] if m in rank]
            # A node with no neighbour there keeps its place.
            return (sum(linked) / len(linked) if linked else float(here[n]), here[n])

        order[i].sort(key=key)


def _count_all(order: list[list[int]], succ: list[list[int]]) -> int:
    return sum(_crossings(order[i], order[i + 1], succ) for i in range(len(order) - 1))


def _crossings(upper: list[int], lower: list[int], succ: list[list[int]]) -> int:
    """Crossings between two adjacent layers: inversions of the edges' lower ranks."""
    rank = {n: r for r, n in enumerate(lower)}
    ends = [
        rank[m] for n in upper for m in sorted(succ[n], key=lambda m: rank.get(m, -1)) if m in rank
    ]
    # Count inversions with a Fenwick tree: O(E log E), fine for thousands of edges.
    tree = [0] * (len(lower) + 1)
    inversions = 0
    for seen, r in enumerate(ends):
        i, not_above = r + 1, 0
        while i > 0:
            not_above += tree[i]
            i -= i & -i
        inversions += seen - not_above
        i = r + 1
        while i <= len(lower):
            tree[i] += 1
            i += i & -i
    return inversions


def _heights(
    order: list[list[int]],
    node_layer: list[int],
    succ: list[list[int]],
    pred: list[list[int]],
    real: int,
) -> list[float]:
    """Each node's vertical center: near its neighbours, never overlapping."""
    centers = [0.0] * len(node_layer)

    def height(n: int) -> float:
        return NODE_HEIGHT if n < real else DUMMY_HEIGHT

    def place(layer: list[int], desired: list[float]) -> None:
        # Top to bottom, each node at its wish or just below the one above;
        # then the whole column moved so that, on average, nodes sit at their wish.
        ys: list[float] = []
        for i, n in enumerate(layer):
            y = desired[i]
            if ys:
                y = max(y, ys[-1] + (height(layer[i - 1]) + height(n)) / 2 + NODE_GAP)
            ys.append(y)
        offset = sum(d - y for d, y in zip(desired, ys, strict=True)) / len(ys) if ys else 0.0
        for n, y in zip(layer, ys, strict=True):
            centers[n] = y + offset

    def wish(n: int, toward: list[list[int]]) -> float:
        linked = toward[n]
        return sum(centers[m] for m in linked) / len(linked) if linked else centers[n]

    if order:
        place(order[0], [0.0] * len(order[0]))
    for layer in order[1:]:
        place(layer, [wish(n, pred) for n in layer])
    # Back from the right: parents move towards the middle of their children.
    for layer in reversed(order[:-1]):
        place(layer, [wish(n, succ) for n in layer])
    return centers


def _path(points: list[tuple[float, float]]) -> str:
    """From the source's right side through each dummy's column to the target's left.

    ``points`` are (left x of the column, center y): the first is the source,
    the last the target. Between columns a smooth curve; across a dummy's
    column a straight line.
    """
    out = [(points[0][0] + NODE_WIDTH, points[0][1])]
    parts = [f"M{_n(out[0][0])},{_n(out[0][1])}"]
    x0, y0 = out[0]
    for i, (x, y) in enumerate(points[1:], start=1):
        mid = (x0 + x) / 2
        parts.append(f"C{_n(mid)},{_n(y0)} {_n(mid)},{_n(y)} {_n(x)},{_n(y)}")
        if i < len(points) - 1:  # a dummy: straight across its column
            parts.append(f"L{_n(x + NODE_WIDTH)},{_n(y)}")
            x0, y0 = x + NODE_WIDTH, y
    return " ".join(parts)


def _n(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")

"""Exact polygons of a pixel mask, for COCO's ``segmentation`` polygons.

The boundary is traced along pixel edges, so each polygon is the exact outline of its pixels (no
approximation). COCO polygons cannot express holes; a mask with a hole gets ``None`` and its
writer stores RLE instead, as COCO itself does.
"""

from __future__ import annotations

import numpy as np

# Directed boundary edges with the object on the right-hand side (y pointing down), as
# (row offset of the neighbour, col offset, start corner, end corner) with corners (dx, dy).
_SIDES = (
    (-1, 0, (0, 0), (1, 0)),   # top: left -> right
    (0, 1, (1, 0), (1, 1)),    # right: top -> bottom
    (1, 0, (1, 1), (0, 1)),    # bottom: right -> left
    (0, -1, (0, 1), (0, 0)),   # left: bottom -> top
)


def _edges(mask: np.ndarray) -> dict[tuple[int, int], list[tuple[int, int]]]:
    padded = np.pad(mask.astype(bool), 1)
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    inner = padded[1:-1, 1:-1]
    for dr, dc, (sx, sy), (ex, ey) in _SIDES:
        neighbour = padded[1 + dr: padded.shape[0] - 1 + dr, 1 + dc: padded.shape[1] - 1 + dc]
        rows, cols = np.nonzero(inner & ~neighbour)
        for r, c in zip(rows.tolist(), cols.tolist()):
            out.setdefault((c + sx, r + sy), []).append((c + ex, r + ey))
    return out


def _turn(prev: tuple[int, int], here: tuple[int, int], options: list[tuple[int, int]]) -> int:
    """At a corner where two outlines touch, take the right turn: it keeps diagonal neighbours
    (not 4-connected) in separate loops."""
    dx, dy = here[0] - prev[0], here[1] - prev[1]
    right = (here[0] - dy, here[1] + dx)
    return options.index(right) if right in options else 0


def _loops(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    edges = _edges(mask)
    loops = []
    while edges:
        # start where outlines do not touch, so the turn rule decides at every touching corner
        start = next((v for v, out in edges.items() if len(out) == 1), next(iter(edges)))
        loop, prev, here = [start], None, start
        while True:
            options = edges[here]
            nxt = options.pop(_turn(prev, here, options) if prev is not None and len(options) > 1 else 0)
            if not options:
                del edges[here]
            prev, here = here, nxt
            if here == start:
                break
            loop.append(here)
        loops.append(loop)
    return loops


def _simplify(loop: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop corners where the outline goes straight on."""
    n = len(loop)
    keep = []
    for i in range(n):
        a, b, c = loop[i - 1], loop[i], loop[(i + 1) % n]
        if (b[0] - a[0]) * (c[1] - b[1]) != (b[1] - a[1]) * (c[0] - b[0]):
            keep.append(b)
    return keep


def _signed_area(loop: list[tuple[int, int]]) -> float:
    x = np.array([p[0] for p in loop], float)
    y = np.array([p[1] for p in loop], float)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def mask_to_polygons(mask: np.ndarray) -> list[list[float]] | None:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` (pixel-corner coordinates) outlining
    ``mask`` exactly, one per connected part; ``None`` when the mask has a hole."""
    polygons = []
    for loop in _loops(mask):
        loop = _simplify(loop)
        if _signed_area(loop) < 0:  # traced the other way round: the outline of a hole
            return None
        polygons.append([float(v) for p in loop for v in p])
    return polygons

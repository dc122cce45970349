"""Real Draco meshes for the tests, made with DracoPy the way a client would."""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable

import DracoPy
import numpy as np
import numpy.typing as npt

Heights = Callable[[npt.NDArray[np.float32], npt.NDArray[np.float32]], npt.NDArray[np.float32]]


def _grid(cols: int, rows: int, heights: Heights) -> str:
    """``2 * cols * rows`` triangles over a grid with the given heights, lossless, base64."""
    xs, ys = np.meshgrid(
        np.arange(cols + 1, dtype=np.float32), np.arange(rows + 1, dtype=np.float32)
    )
    points = np.stack([xs.ravel() * 0.1, ys.ravel() * 0.1, heights(xs, ys).ravel()], axis=1)
    faces = []
    for r in range(rows):
        for c in range(cols):
            a = r * (cols + 1) + c
            b, d = a + 1, a + cols + 1
            faces += [(a, b, d), (b, d + 1, d)]
    data = DracoPy.encode(
        points.astype(np.float32),
        np.asarray(faces, dtype=np.uint32),
        quantization_bits=0,
        preserve_order=True,
    )
    return base64.b64encode(data).decode()


@functools.cache
def draco_grid(cols: int = 8, rows: int = 8, seed: int = 0) -> str:
    """A grid of ``2 * cols * rows`` triangles with random heights."""
    rng = np.random.default_rng(seed)
    return _grid(cols, rows, lambda xs, ys: rng.random(xs.shape, dtype=np.float32))


def scan_step(cols: int, rows: int = 10) -> str:
    """An anchor's mesh as a scan grows it: ``cols`` columns of a fixed surface.

    Heights depend only on (x, y), so a larger step repeats every triangle of a
    smaller one: what the relay should send as a delta.
    """
    return _grid(cols, rows, lambda xs, ys: np.sin(xs * 1.3 + ys * 0.7).astype(np.float32))

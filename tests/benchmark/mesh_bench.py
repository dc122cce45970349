"""Benchmark (not a test): mesh bytes sent to STAG / mesh bytes received, for an incremental scan.

Run: python tests/benchmark/mesh_bench.py [--updates 60] [--workers 2]

An anchor's mesh starts at 20,000 triangles and grows by about 3 % per update
(a strip of new quads along one edge), and each update also refines the old
boundary the way scanning does: the last strip's vertices move a little and
its quads are re-triangulated. Coordinates are jittered float32, not on any
grid. The client resends the whole mesh as Draco every time; the relay's
pipeline (real worker processes) turns each into a full mesh or a delta, and
every update is reported delivered before the next one, as with a STAG that
acknowledges within the update interval (ARKit updates an anchor about once a
second). Keyframes (a full mesh every mesh.keyframe_interval updates) are
included in the figure.

Also printed: the Trio loop's lag at 60 Hz (how late a 1/60 s sleep wakes up)
with and without meshes being processed back to back, since pose traffic must
not wait behind the meshes.

The figure depends on how the client encodes: exact deltas need the geometry
STAG already has to decode to the same float32 values again, so a client that
quantizes against the mesh's growing bounding box (DracoPy's default) moves
every vertex on every update and gets full meshes only.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import time
from typing import Any

import DracoPy
import numpy as np
import numpy.typing as npt
import trio
from prometheus_client import CollectorRegistry

from stag_relay.pipeline.meshpool import MeshMetrics, open_mesh_pipeline
from stag_relay.protocol.mesh import MeshSettings
from stag_relay.protocol.packets import MeshData

ROWS = 100  # quads along the growing edge: 200 triangles per strip
START_STRIPS = 100  # 20,000 triangles
GROWTH_STRIPS = 3  # 600 triangles: 3 % of the starting mesh


class Scan:
    """A height field scanned strip by strip, with a refined boundary."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = np.random.default_rng(seed)
        self.columns: list[npt.NDArray[np.float32]] = []
        for _ in range(START_STRIPS + 1):
            self._add_column()
        self.flipped: set[int] = set()

    def _add_column(self) -> None:
        c = len(self.columns)
        y = (np.arange(ROWS + 1) + self.rng.uniform(-0.3, 0.3, ROWS + 1)) * 0.02
        x = (c + self.rng.uniform(-0.3, 0.3, ROWS + 1)) * 0.02
        z = 0.1 * np.sin(3.1 * x) + 0.05 * np.cos(4.7 * y + x) + self.rng.normal(0, 0.002, ROWS + 1)
        self.columns.append(np.stack([x, y, z], 1).astype(np.float32))

    def grow(self) -> None:
        last = len(self.columns) - 1
        # Refine the old boundary: its vertices settle, its quads re-triangulate.
        self.columns[last][:, 2] += self.rng.normal(0, 0.001, ROWS + 1).astype(np.float32)
        self.flipped.add(last - 1)
        for _ in range(GROWTH_STRIPS):
            self._add_column()

    def mesh(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint32]]:
        points = np.concatenate(self.columns)
        strips = len(self.columns) - 1
        index = np.arange(len(points)).reshape(strips + 1, ROWS + 1)
        a, b = index[:-1, :-1], index[1:, :-1]
        c, d = index[1:, 1:], index[:-1, 1:]
        flip = np.zeros((strips, ROWS), bool)
        flip[sorted(self.flipped)] = True
        first = np.where(flip[..., None], np.stack([a, b, d], -1), np.stack([a, b, c], -1))
        second = np.where(flip[..., None], np.stack([b, c, d], -1), np.stack([a, c, d], -1))
        faces = np.concatenate([first.reshape(-1, 3), second.reshape(-1, 3)]).astype(np.uint32)
        return points, faces


def client_encodings(
    points: npt.NDArray[np.float32], faces: npt.NDArray[np.uint32]
) -> dict[str, bytes]:
    return {
        "lossless (edgebreaker)": DracoPy.encode(points, faces, quantization_bits=0),
        "lossless, order kept": DracoPy.encode(
            points, faces, quantization_bits=0, preserve_order=True
        ),
        # A fixed grid (origin and range the client keeps for the anchor): stable values.
        "14-bit, fixed grid": DracoPy.encode(
            points,
            faces,
            quantization_bits=14,
            quantization_range=8.0,
            quantization_origin=np.array([-1.0, -1.0, -1.0], np.float32),
            compression_level=7,
        ),
        "14-bit, bounding-box grid": DracoPy.encode(points, faces, compression_level=7),
    }


async def run_encoding(name: str, packets: list[str], workers: int) -> dict[str, Any]:
    registry = CollectorRegistry()
    seconds = []
    async with open_mesh_pipeline(
        MeshSettings(), workers=workers, metrics=MeshMetrics(registry)
    ) as pipeline:
        for i, vertices in enumerate(packets):
            started = time.perf_counter()
            await pipeline.process("bench", f"e{i}", MeshData("anchor", vertices, ""))
            seconds.append(time.perf_counter() - started)
            pipeline.delivered("bench", "anchor", f"e{i}")
    bytes_in = registry.get_sample_value("relay_mesh_bytes_in_total") or 0.0
    bytes_out = registry.get_sample_value("relay_mesh_bytes_out_total") or 0.0
    return {
        "name": name,
        "ratio": bytes_out / bytes_in,
        "deltas": registry.get_sample_value("relay_mesh_updates_total", {"kind": "delta"}),
        "fulls": registry.get_sample_value("relay_mesh_updates_total", {"kind": "full"}),
        "in_mib": bytes_in / 2**20,
        "out_mib": bytes_out / 2**20,
        "median_ms": statistics.median(seconds) * 1e3,
        "max_ms": max(seconds) * 1e3,
    }


async def loop_lag(packets: list[str], workers: int, duration: float) -> tuple[float, float]:
    """p99 lateness (ms) of 60 Hz sleeps: alone, then beside back-to-back meshes."""

    async def ticker(lateness: list[float]) -> None:
        end = trio.current_time() + duration
        while trio.current_time() < end:
            due = trio.current_time() + 1 / 60
            await trio.sleep_until(due)
            lateness.append(trio.current_time() - due)

    idle: list[float] = []
    await ticker(idle)
    busy: list[float] = []
    async with (
        open_mesh_pipeline(
            MeshSettings(), workers=workers, metrics=MeshMetrics(CollectorRegistry())
        ) as pipeline,
        trio.open_nursery() as nursery,
    ):

        async def meshes() -> None:
            i = 0
            while True:
                data = MeshData("anchor", packets[i % len(packets)], "")
                await pipeline.process("bench", f"e{i}", data)
                pipeline.delivered("bench", "anchor", f"e{i}")
                i += 1

        nursery.start_soon(meshes)
        await ticker(busy)
        nursery.cancel_scope.cancel()

    def p99(values: list[float]) -> float:
        return float(np.percentile(values, 99) * 1e3)

    return p99(idle), p99(busy)


async def main(updates: int, workers: int) -> None:
    scan = Scan()
    meshes = []
    for _ in range(updates):
        meshes.append(scan.mesh())
        scan.grow()
    print(
        f"incremental scan: {len(meshes[0][1]):,} to {len(meshes[-1][1]):,} triangles "
        f"over {updates} updates, +{2 * ROWS * GROWTH_STRIPS} triangles and a refined "
        f"boundary per update; keyframe every {MeshSettings().keyframe_interval} updates"
    )
    per_encoding: dict[str, list[str]] = {}
    for points, faces in meshes:
        for name, data in client_encodings(points, faces).items():
            per_encoding.setdefault(name, []).append(base64.b64encode(data).decode())
    print(
        f"{'client encoding':28} {'out/in':>7} {'deltas':>6} {'fulls':>5} "
        f"{'in MiB':>7} {'out MiB':>7} {'median ms':>9} {'max ms':>7}"
    )
    for name, packets in per_encoding.items():
        r = await run_encoding(name, packets, workers)
        print(
            f"{r['name']:28} {r['ratio']:7.3f} {r['deltas']:6.0f} {r['fulls']:5.0f} "
            f"{r['in_mib']:7.2f} {r['out_mib']:7.2f} {r['median_ms']:9.1f} {r['max_ms']:7.1f}"
        )
    largest = per_encoding["lossless (edgebreaker)"][-10:]
    idle, busy = await loop_lag(largest, workers, duration=5.0)
    print(
        f"Trio loop lag at 60 Hz, p99: {idle:.2f} ms alone, {busy:.2f} ms beside "
        f"back-to-back {len(meshes[-1][1]):,}-triangle meshes"
    )


if __name__ == "__main__":  # workers are spawned: they re-import this module
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    trio.run(main, args.updates, args.workers)

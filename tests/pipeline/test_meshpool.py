"""The mesh pipeline with real worker processes: deltas, delivery, crashes, hangs, order.

No MockClock here: the work happens in other processes, and an autojumping
clock would fire every job timeout while the Trio thread waits on a worker.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import DracoPy
import numpy as np
import numpy.typing as npt
import pytest
import trio
from prometheus_client import CollectorRegistry

from stag_relay.pipeline.meshpool import MeshMetrics, MeshPipeline, open_mesh_pipeline
from stag_relay.pipeline.meshworker import WORKER_NICENESS, run_job
from stag_relay.protocol.events import Event, MeshUpdate
from stag_relay.protocol.geometry import apply_mesh_diff, decode_mesh, triangles_equal
from stag_relay.protocol.mesh import MeshError, MeshJob, MeshOutcome, MeshSettings
from stag_relay.protocol.packets import MeshData
from tests.support.procfs import HAVE_PROC, children, cmdline
from tests.support.sdk import mesh_buffer, sdk_compress


def crash_or_hang(job: MeshJob) -> MeshOutcome:
    """The job function for the failure tests; runs in the worker process.

    It is passed to open_mesh_pipeline by those tests only: the relay's own job
    function (run_job) has no such switch.
    """
    if job.anchor_id == "crash":
        os.abort()  # as a decoder segfault would end the worker
    if job.anchor_id == "hang":
        time.sleep(3600)  # as a decoder stuck in a loop would
    return run_job(job)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scan(cols: int, rows: int = 20, seed: int = 0) -> str:
    """A growing scan's mesh, ``cols`` strips wide, as lossless Draco base64."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(cols + 1), np.arange(rows + 1), indexing="ij")
    jitter = rng.uniform(-0.3, 0.3, size=(400, rows + 1, 2))[: cols + 1]
    x, y = (xs + jitter[..., 0]) * 0.05, (ys + jitter[..., 1]) * 0.05
    z = 0.1 * np.sin(3.1 * x) + 0.05 * np.cos(4.7 * y + x)
    points = np.stack([x, y, z], -1).reshape(-1, 3).astype(np.float32)
    index = np.arange((cols + 1) * (rows + 1)).reshape(cols + 1, rows + 1)
    a, b = index[:-1, :-1].ravel(), index[1:, :-1].ravel()
    c, d = index[1:, 1:].ravel(), index[:-1, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)]).astype(np.uint32)
    return b64(DracoPy.encode(points, faces, quantization_bits=0))


def event(event_id: str, update: MeshUpdate, session_id: str = "s") -> Event:
    return Event(event_id, session_id, 1, 1, 1, "mesh", (), (update,))


def deliver(mesh_pipeline: MeshPipeline, delivered: Event) -> None:
    """What the sender does when STAG accepts a batch holding ``delivered``."""
    for mesh in delivered.meshes:
        mesh_pipeline.delivered(delivered.session_id, mesh.anchor_id, delivered.event_id)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@asynccontextmanager
async def pipeline(
    workers: int = 1, settings: MeshSettings | None = None, **options: Any
) -> AsyncIterator[tuple[MeshPipeline, CollectorRegistry]]:
    registry = CollectorRegistry()
    async with open_mesh_pipeline(
        settings or MeshSettings(), workers=workers, metrics=MeshMetrics(registry), **options
    ) as opened:
        yield opened, registry


class Stag:
    """What STAG does with the updates: apply_mesh_diff per anchor, in order."""

    def __init__(self) -> None:
        self.meshes: dict[str, npt.NDArray[np.float32]] = {}
        self.event_of: dict[str, str] = {}

    def receive(self, event_id: str, update: MeshUpdate) -> None:
        if update.is_delta:
            assert update.base_event_id == self.event_of[update.anchor_id]
        base = self.meshes.get(update.anchor_id)
        self.meshes[update.anchor_id] = apply_mesh_diff(base, update.to_json())
        self.event_of[update.anchor_id] = event_id


async def test_deltas_flow_once_stag_has_the_base() -> None:
    stag = Stag()
    sent_in = sent_out = 0
    async with pipeline(workers=2) as (mesh_pipeline, registry):
        for i in range(6):
            vertices = scan(10 + i)
            update = await mesh_pipeline.process("s", f"e{i}", MeshData("a", vertices, ""))
            assert update.is_delta == (i > 0)
            stag.receive(f"e{i}", update)
            deliver(mesh_pipeline, event(f"e{i}", update))
            assert triangles_equal(stag.meshes["a"], decode_mesh(vertices).triangles)
            assert update.face_count == decode_mesh(vertices).face_count
            sent_in += len(vertices)
            sent_out += update.payload_chars
        assert sample(registry, "relay_mesh_updates_total", kind="full") == 1
        assert sample(registry, "relay_mesh_updates_total", kind="delta") == 5
        assert sample(registry, "relay_mesh_bytes_in_total") == sent_in
        assert sample(registry, "relay_mesh_bytes_out_total") == sent_out
        assert sample(registry, "relay_mesh_decode_seconds_count") == 6
        assert sample(registry, "relay_mesh_state_bytes") > 0
        assert sent_out < 0.3 * sent_in


async def test_only_a_delivered_base_gets_deltas() -> None:
    async with pipeline() as (mesh_pipeline, _):

        async def send(i: int) -> MeshUpdate:
            return await mesh_pipeline.process("s", f"e{i}", MeshData("a", scan(10 + i), ""))

        first = await send(1)
        assert not (await send(2)).is_delta  # e1 never confirmed
        deliver(mesh_pipeline, event("e1", first))  # too late: e2 is the base now
        third = await send(3)
        assert not third.is_delta
        deliver(mesh_pipeline, event("e3", third))
        fourth = await send(4)
        assert fourth.is_delta
        assert fourth.base_event_id == "e3"
        # e4 is refused, or dropped: the sender never reports it delivered.
        assert not (await send(5)).is_delta


async def test_invalid_meshes_are_errors_and_keep_the_base() -> None:
    async with pipeline() as (mesh_pipeline, registry):
        first = await mesh_pipeline.process("s", "e1", MeshData("a", scan(10), ""))
        deliver(mesh_pipeline, event("e1", first))
        with pytest.raises(MeshError, match=r"^\$\.data\.mesh\.vertices: not Draco data$"):
            await mesh_pipeline.process("s", "e2", MeshData("a", b64(b"nope"), ""))
        update = await mesh_pipeline.process("s", "e3", MeshData("a", scan(11), ""))
        assert update.base_event_id == "e1"
        assert sample(registry, "relay_mesh_updates_total", kind="full") == 1


async def test_without_deltas_every_mesh_goes_full_with_the_clients_buffers() -> None:
    """stag.format spatial-event: decoded and checked, never diffed, nothing held."""
    async with pipeline(deltas=False) as (mesh_pipeline, registry):
        for i in range(4):
            vertices = scan(10 + i)
            update = await mesh_pipeline.process("s", f"e{i}", MeshData("a", vertices, ""))
            deliver(mesh_pipeline, event(f"e{i}", update))
            assert update == MeshUpdate(
                "a",
                False,
                vertices,
                "",
                vertex_count=decode_mesh(vertices).vertex_count,
                face_count=decode_mesh(vertices).face_count,
            )
        # The SDK's buffer is decoded in its own encoding, and goes as the SDK sent it.
        buffer = b64(sdk_compress(mesh_buffer([(0, 0, 0), (1, 0, 0), (0, 1, 0)], [0, 1, 2])))
        sdk = await mesh_pipeline.process("s", "e5", MeshData("m", buffer, "", "sdk"))
        assert sdk == MeshUpdate("m", False, buffer, "", vertex_count=3, face_count=1)
        with pytest.raises(MeshError, match=r"^\$\.data\.mesh\.vertices: not Draco data$"):
            await mesh_pipeline.process("s", "e9", MeshData("a", b64(b"nope"), ""))
        with pytest.raises(MeshError, match="too large"):
            await mesh_pipeline.process("s", "e10", MeshData("b", b64(decompression_bomb()), ""))
        assert sample(registry, "relay_mesh_updates_total", kind="full") == 5
        assert sample(registry, "relay_mesh_updates_total", kind="delta") == 0
        assert sample(registry, "relay_mesh_decode_seconds_count") == 7
        assert sample(registry, "relay_mesh_state_bytes") == 0


def mutations(data: bytes, rng: np.random.Generator, count: int) -> list[bytes]:
    """Bit flips anywhere, header bytes overwritten, truncations."""
    out = []
    for _ in range(count):
        buffer = bytearray(data)
        kind = rng.integers(3)
        if kind == 0:
            for _ in range(rng.integers(1, 4)):
                buffer[rng.integers(len(buffer))] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            buffer[rng.integers(min(len(buffer), 40))] = int(rng.integers(256))
        else:
            del buffer[rng.integers(len(buffer)) :]
        out.append(bytes(buffer))
    return out


def decompression_bomb() -> bytes:
    """Ten points whose header, one byte changed, claims about two billion."""
    points = np.arange(30, dtype=np.float32).reshape(10, 3) * np.float32(0.37)
    data = bytearray(DracoPy.encode(points, quantization_bits=0, preserve_order=True))
    data[14] = 0x7F
    return bytes(data)


async def test_fuzzed_buffers_get_errors_and_the_pipeline_keeps_serving() -> None:
    rng = np.random.default_rng(2024)
    points = (rng.normal(size=(200, 3)) * 2).astype(np.float32)
    faces = rng.integers(0, 200, size=(300, 3)).astype(np.uint32)
    sources = [
        DracoPy.encode(points, faces, quantization_bits=0, preserve_order=True),
        DracoPy.encode(points, faces, quantization_bits=0),
        DracoPy.encode(points, faces),
        DracoPy.encode(points, quantization_bits=0, preserve_order=True),
    ]
    decoded = invalid = 0
    async with pipeline() as (mesh_pipeline, _):
        for n, source in enumerate(sources):
            for i, data in enumerate(mutations(source, rng, 100)):
                try:
                    update = await mesh_pipeline.process(
                        "s", f"e{n}.{i}", MeshData("a", b64(data), "")
                    )
                except MeshError as exc:
                    assert exc.message.startswith("$.data.mesh")
                    invalid += 1
                else:
                    # It decoded into some geometry, and passed the checks.
                    assert update.face_count == decode_mesh(b64(data)).face_count
                    decoded += 1
        if sys.platform.startswith("linux"):  # the worker's address-space limit
            with pytest.raises(MeshError, match="too large"):
                await mesh_pipeline.process(
                    "s", "bomb", MeshData("a", b64(decompression_bomb()), "")
                )
        update = await mesh_pipeline.process("s", "after", MeshData("a", scan(10), ""))
        assert update.face_count == 400
    assert decoded > 0
    assert invalid > 0


async def test_a_worker_crash_is_an_invalid_packet_and_costs_only_the_bases() -> None:
    async with pipeline(work=crash_or_hang) as (mesh_pipeline, registry):
        first = await mesh_pipeline.process("s", "e1", MeshData("a", scan(10), ""))
        deliver(mesh_pipeline, event("e1", first))
        with pytest.raises(MeshError, match="crashed"):
            await mesh_pipeline.process("s", "x1", MeshData("crash", scan(3), ""))
        assert sample(registry, "relay_mesh_worker_failures_total", reason="crash") == 1
        assert sample(registry, "relay_mesh_state_bytes") == 0
        # A new worker serves; the base of "a" died with the old one, so full.
        second = await mesh_pipeline.process("s", "e2", MeshData("a", scan(11), ""))
        assert not second.is_delta
        deliver(mesh_pipeline, event("e2", second))
        assert (await mesh_pipeline.process("s", "e3", MeshData("a", scan(12), ""))).is_delta


async def test_a_hung_worker_is_killed_after_the_job_timeout() -> None:
    async with pipeline(work=crash_or_hang, job_timeout=5.0) as (mesh_pipeline, registry):
        with pytest.raises(MeshError, match=r"longer than 5s"):
            await mesh_pipeline.process("s", "x1", MeshData("hang", scan(3), ""))
        assert sample(registry, "relay_mesh_worker_failures_total", reason="timeout") == 1
        update = await mesh_pipeline.process("s", "e1", MeshData("a", scan(10), ""))
        assert update.face_count == 400


async def test_packets_of_one_anchor_are_processed_in_call_order() -> None:
    results: dict[tuple[str, int], MeshUpdate] = {}
    meshes = [scan(5 + i) for i in range(9)]
    async with pipeline(workers=2) as (mesh_pipeline, _):

        async def submit(anchor: str, i: int, *, task_status: Any) -> None:
            # started() does not yield: process() queues before the next task starts.
            task_status.started()
            data = MeshData(anchor, meshes[i], "")
            results[anchor, i] = await mesh_pipeline.process("s", f"{anchor}{i}", data)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                for anchor in ("a", "b"):
                    await nursery.start(submit, anchor, i)
        for anchor in ("a", "b"):
            for i in range(8):
                assert results[anchor, i].face_count == 2 * 20 * (5 + i)
            # Had any job overtaken another, the held base would not be the mesh
            # of the last packet, and this delta would not rebuild the new mesh.
            deliver(mesh_pipeline, event(f"{anchor}7", results[anchor, 7]))
            update = await mesh_pipeline.process("s", f"{anchor}8", MeshData(anchor, meshes[8], ""))
            assert update.is_delta
            rebuilt = apply_mesh_diff(decode_mesh(meshes[7]).triangles, update.to_json())
            assert triangles_equal(rebuilt, decode_mesh(meshes[8]).triangles)


async def test_evicted_bases_go_full() -> None:
    vertices = scan(10)
    one_anchor = 400 * 36 + 1024  # keys plus the per-anchor overhead
    settings = MeshSettings(max_state_bytes=2 * one_anchor)
    async with pipeline(settings=settings) as (mesh_pipeline, registry):
        updates = {}
        for anchor in ("a", "b", "c"):  # c evicts a, the least recently updated
            updates[anchor] = await mesh_pipeline.process(
                "s", f"{anchor}1", MeshData(anchor, vertices, "")
            )
            deliver(mesh_pipeline, event(f"{anchor}1", updates[anchor]))
        assert sample(registry, "relay_mesh_state_bytes") == 2 * one_anchor
        assert not (await mesh_pipeline.process("s", "a2", MeshData("a", vertices, ""))).is_delta
        assert (await mesh_pipeline.process("s", "c2", MeshData("c", vertices, ""))).is_delta


def decoder_processes() -> set[int]:
    """This process's trio-parallel workers (multiprocessing's spawned children)."""
    return {child for child in children(os.getpid()) if "spawn_main" in cmdline(child)}


@pytest.mark.skipif(not HAVE_PROC, reason="counts child processes in /proc (Linux)")
async def test_the_first_mesh_starts_every_workers_process() -> None:
    before = decoder_processes()
    async with pipeline(workers=2) as (mesh_pipeline, _):
        assert not mesh_pipeline.started
        assert decoder_processes() == before
        update = await mesh_pipeline.process("s", "e1", MeshData("a", scan(8), ""))
        assert update.face_count == decode_mesh(scan(8)).face_count
        assert mesh_pipeline.started
        # Both, though one anchor's mesh needs only its own shard's worker.
        started = decoder_processes() - before
        assert len(started) == 2
        await mesh_pipeline.process("s", "e2", MeshData("b", scan(9), ""))
        assert decoder_processes() - before == started
    # Stopped with the pipeline.
    assert not decoder_processes() & started


@pytest.mark.skipif(not HAVE_PROC, reason="counts child processes in /proc (Linux)")
async def test_workers_run_at_a_lower_cpu_priority_than_the_relay() -> None:
    # The event loop's poses go first when a worker and the loop want the same CPU.
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    if ours >= 19:
        pytest.skip("this process already runs at the lowest priority (nice 19)")
    before = decoder_processes()
    async with pipeline(workers=2) as (mesh_pipeline, _):
        await mesh_pipeline.process("s", "e1", MeshData("a", scan(8), ""))
        started = decoder_processes() - before
        expected = min(ours + WORKER_NICENESS, 19)
        assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in started} == {expected}


@pytest.mark.skipif(not HAVE_PROC, reason="counts child processes in /proc (Linux)")
async def test_first_meshes_arriving_together_start_the_workers_once() -> None:
    before = decoder_processes()
    async with pipeline(workers=2) as (mesh_pipeline, _):
        async with trio.open_nursery() as nursery:
            for i in range(6):
                mesh = MeshData(f"a{i}", scan(8 + i), "")
                nursery.start_soon(mesh_pipeline.process, "s", f"e{i}", mesh)
        assert len(decoder_processes() - before) == 2


@pytest.mark.skipif(not HAVE_PROC, reason="counts child processes in /proc (Linux)")
async def test_a_pipeline_that_never_sees_a_mesh_starts_and_stops_no_worker() -> None:
    before = decoder_processes()
    async with pipeline(workers=3) as (mesh_pipeline, _):
        assert decoder_processes() == before
    assert not mesh_pipeline.started
    assert decoder_processes() == before


async def test_workers_that_cannot_start_cost_the_mesh_and_the_next_mesh_tries_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The workers inherit the environment: with numpy unimportable there, none can start.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['numpy'] = None\n")
    path = os.pathsep.join(p for p in (str(site), os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    async with pipeline(workers=2) as (mesh_pipeline, registry):
        with pytest.raises(MeshError, match=r"^\$\.data\.mesh: the mesh decoder could not start$"):
            await mesh_pipeline.process("s", "e1", MeshData("a", scan(8), ""))
        assert not mesh_pipeline.started
        assert sample(registry, "relay_mesh_worker_failures_total", reason="crash") == 2
        monkeypatch.undo()
        update = await mesh_pipeline.process("s", "e2", MeshData("a", scan(8), ""))
        assert mesh_pipeline.started
        assert update.face_count == decode_mesh(scan(8)).face_count

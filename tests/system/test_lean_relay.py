"""The daemon carries only the daemon: what a running relay has loaded and started.

The relay runs as operators run it (``python -m stag_relay``, a subprocess) with
``PYTHONPROFILEIMPORTTIME=1``: the interpreter then reports every module the
moment it is first imported, whenever that happens, on the relay's own stderr.
Read at rest (after it has served poses) that is the complete list of what the
daemon imported, lazily or not. Linux's /proc tells the rest: the shared objects
the process has mapped (numpy's and DracoPy's C code) and its child processes.

The relay runs as installed without the ``tools`` extra: a ``sitecustomize`` on
its PYTHONPATH makes websockets, rich and httpx unimportable, as in a production
install (the test environment has them). The relay's imports of them would fail
it; the one attempt allowed is structlog's own: it tries rich for its console
tracebacks, and ``stag_relay`` hides rich while structlog is imported, so it goes
without it even where the extra is installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.clients import connect_relay, mesh_packet, stream_poses
from tests.support.meshes import draco_grid
from tests.support.procfs import (
    HAVE_PROC,
    children,
    cmdline,
    imported_modules,
    mapped_files,
    mentions,
)
from tests.support.relays import RelayProcess
from tests.support.stag_server import StagServer
from tests.support.waiting import poll_until

pytestmark = pytest.mark.skipif(not HAVE_PROC, reason="reads the relay's /proc entries (Linux)")

# What only the developer tools need, and what only the mesh workers need.
TOOLS_EXTRA = ("websockets", "rich", "httpx")
TOOL_MODULES = (
    "stag_relay.tools.loadgen",
    "stag_relay.tools.sink",
    "stag_relay.tools.demo",
    *TOOLS_EXTRA,
)
MESH_MODULES = ("stag_relay.protocol.geometry", "numpy", "DracoPy")
MESH_WORKERS = 2


def without_tools_extra(directory: Path) -> dict[str, str]:
    """Environment for a Python that cannot import the ``tools`` extra's distributions."""
    directory.mkdir(exist_ok=True)
    blocked = ", ".join(repr(name) for name in TOOLS_EXTRA)
    (directory / "sitecustomize.py").write_text(
        f"import sys\nsys.modules.update(dict.fromkeys([{blocked}]))\n"
    )
    # The relay's package is found from the working directory (-m), or installed.
    path = [str(directory), os.getcwd(), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in path if p)}


def workers_of(pid: int) -> tuple[list[int], list[int]]:
    """The relay's mesh decoder processes, and its multiprocessing resource trackers."""
    procs = [(child, cmdline(child)) for child in children(pid)]
    decoders = [child for child, command in procs if "spawn_main" in command]
    trackers = [child for child, command in procs if "resource_tracker" in command]
    return decoders, trackers


def test_a_pose_only_relay_loads_no_tool_and_no_geometry_and_starts_no_worker(
    tmp_path: Path,
) -> None:
    with StagServer() as stag:
        relay = RelayProcess(
            {
                **without_tools_extra(tmp_path / "site"),
                "RELAY_SERVER_HOST": "127.0.0.1",
                "RELAY_SERVER_PORT": "0",
                "RELAY_STAG_URL": stag.url,
                "RELAY_MESH_WORKERS": str(MESH_WORKERS),
                "PYTHONPROFILEIMPORTTIME": "1",
            }
        )
        try:
            port = relay.port()
            assert stream_poses(port, "poser", 50) == 50
            stag.wait_for_events(50)
            # At rest: every pose delivered, nothing more to do.
            pid = relay.proc.pid
            imported = imported_modules(list(relay.raw))
            # The list is live: the relay's own modules and its libraries are in it.
            assert {
                "stag_relay.service.relay",
                "stag_relay.protocol.websocket",
                "trio",
                "stag_relay.protocol.mesh",
                "stag_relay.pipeline.meshworker",
            } <= imported.keys()
            tried = {m: imported[m] for m in TOOL_MODULES + MESH_MODULES if m in imported}
            assert set(tried) <= {"rich"}, tried
            assert all(str(by).startswith("structlog.") for by in tried.values()), tried
            mapped = mapped_files(pid)
            assert not mentions(mapped, "numpy")
            assert not mentions(mapped, "DracoPy")
            assert children(pid) == []

            # The first mesh starts the decoders (all of them) and the resource tracker.
            with connect_relay(port) as ws:
                ws.send(mesh_packet("scanner", 1, anchor_id="room", vertices=draco_grid()))
                stag.wait_for_events(51)
            mesh_events = [e for e in stag.events() if e["type"] == "mesh"]
            assert len(mesh_events) == 1
            assert mesh_events[0]["meshes"][0]["vertices_delta"] == draco_grid()
            decoders, trackers = workers_of(pid)
            assert len(decoders) == MESH_WORKERS
            assert len(trackers) == 1
            # numpy and DracoPy live in the decoders; the relay itself still has neither.
            for decoder in decoders:
                assert mentions(mapped_files(decoder), "DracoPy")
            mapped = mapped_files(pid)
            assert not mentions(mapped, "numpy")
            assert not mentions(mapped, "DracoPy")

            # The workers stop with the relay, after its drain.
            relay.proc.send_signal(signal.SIGTERM)
            assert relay.wait() == 0
            poll_until(lambda: not any(cmdline(child) for child in decoders + trackers))
        finally:
            relay.kill()


def test_structlog_leaves_rich_unloaded_even_with_the_tools_extra_installed() -> None:
    # This environment has rich (the test extra brings the tools'); the daemon's
    # logging must not load it, and the tools must still be able to.
    pytest.importorskip("rich")
    probe = (
        "import sys, stag_relay.service.logs, structlog\n"
        "print('rich' in sys.modules, structlog.dev.rich is None)\n"
        "import rich.console\n"
        "print('rich' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["False", "True", "True"]

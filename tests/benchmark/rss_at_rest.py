"""Resident memory of a relay at rest: the whole process tree of `python -m stag_relay`.

    python tests/benchmark/rss_at_rest.py [RELAY_PYTHON] [--poses N] [--meshes N]

RELAY_PYTHON is the interpreter of the installation to measure (default: this one);
run this script with one that has the `tools` extra (websockets) when sending
packets. The relay listens on a free port and delivers to a closed one (its events
wait in memory, as with STAG down); after the packets, 5 s of rest, then each
process's VmRSS from /proc (Linux), whether numpy and DracoPy are mapped, and the sum.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def tree(pid: int) -> list[int]:
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            for child in listing.read().split():
                pids += tree(int(child))
    return pids


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("python", nargs="?", default=sys.executable)
    parser.add_argument("--poses", type=int, default=0)
    parser.add_argument("--meshes", type=int, default=0)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_CONFIG="/dev/null",
        RELAY_STAG_URL="http://127.0.0.1:9/ingest",
        RELAY_SERVER_HOST="127.0.0.1",
        RELAY_SERVER_PORT="0",
        RELAY_LOG_FORMAT="json",
    )
    # Not from this checkout: the installation under test.
    relay = subprocess.Popen(
        [args.python, "-m", "stag_relay"], env=env, stderr=subprocess.PIPE, text=True, cwd="/"
    )
    assert relay.stderr is not None
    port = next(json.loads(line)["ports"][0] for line in relay.stderr if "relay listening" in line)
    if args.poses or args.meshes:
        from websockets.sync.client import connect

        from stag_relay.tools.loadgen import mesh_scan

        scan = mesh_scan(2000)

        with connect(f"ws://127.0.0.1:{port}/ws/streamkit") as ws:
            for frame in range(1, args.poses + args.meshes + 1):
                packet: dict[str, object] = {
                    "session_id": "rss",
                    "frame_number": frame,
                    "timestamp": time.time_ns() // 1_000_000,
                }
                if frame <= args.poses:
                    pose = {"x": 1.0, "y": 2.0, "z": 3.0, "rotation": [0.0, 0.0, 0.0, 1.0]}
                    packet.update(type="pose", data={"pose": pose})
                else:
                    mesh = {
                        "anchor_id": "a",
                        "vertices": scan[(frame - args.poses - 1) % len(scan)],
                        "faces": "",
                    }
                    packet.update(type="mesh", data={"mesh": mesh})
                ws.send(json.dumps(packet))
    time.sleep(5)
    total = 0.0
    pids = tree(relay.pid)
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as raw:
            command = raw.read().replace(b"\0", b" ").decode()[:80]
        rss = rss_mib(pid)
        total += rss
        print(f"{pid:>8} {rss:7.1f} MiB  {command}")
    with open(f"/proc/{relay.pid}/maps") as maps:
        mapped = maps.read()
    print(f"processes: {len(pids)}, total RSS {total:.1f} MiB")
    print(f"relay process maps numpy: {'numpy' in mapped}, DracoPy: {'DracoPy' in mapped}")
    relay.terminate()
    relay.wait(60)


if __name__ == "__main__":
    main()

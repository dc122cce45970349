"""Build relay configurations and run relays (in-process or as a subprocess) for tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Mapping
from typing import IO, Any

import attrs

from stag_relay.service.config import Config

# websocket.max_packets_per_second for test relays: beyond any rate a test reaches.
UNLIMITED_RATE = 10**9


def make_config(stag_url: str, **sections: Mapping[str, Any]) -> Config:
    """Defaults for a test relay on 127.0.0.1, port 0, talking to ``stag_url``.

    ``sections`` override keys per section: ``make_config(url, batch={"max_size": 100})``.
    """
    config = Config()
    config = attrs.evolve(
        config,
        server=attrs.evolve(config.server, host="127.0.0.1", port=0),
        stag=attrs.evolve(config.stag, url=stag_url, retry_initial=0.01, retry_max=0.2),
        # Tests stream as fast as the machine allows; the per-connection packet rate
        # limit has its own tests (test_security.py), which set it explicitly.
        websocket=attrs.evolve(config.websocket, max_packets_per_second=UNLIMITED_RATE),
    )
    for name, values in sections.items():
        config = attrs.evolve(config, **{name: attrs.evolve(getattr(config, name), **values)})
    return config


def http_get(port: int, path: str, *, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """A plain GET with the standard library; returns status, headers, body (any status)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class RelayProcess:
    """``python -m stag_relay`` as a child process, configured through the environment.

    The relay logs JSON lines to stderr; a thread collects them so the test can wait
    for one (the "relay listening" line tells the port chosen for port 0).
    """

    def __init__(
        self, env: Mapping[str, str], args: tuple[str, ...] = (), *, lift_rate: bool = True
    ) -> None:
        """``lift_rate``: no packet rate limit (tests that stream as fast as they can);
        False keeps the relay's default, as a user gets it."""
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        full_env.update(env)
        full_env.setdefault("RELAY_LOG_FORMAT", "json")
        if lift_rate:
            full_env.setdefault("RELAY_WEBSOCKET_MAX_PACKETS_PER_SECOND", str(UNLIMITED_RATE))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stag_relay", *args],
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        assert self.proc.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.raw.append(line)
                with contextlib.suppress(ValueError):
                    self.lines.append(json.loads(line))
                self._cond.notify_all()
        # stderr closes a moment before the process can be reaped: wait for it, or a
        # waiter woken now would see it still running and sleep out its timeout.
        self.proc.wait()
        with self._cond:
            self._cond.notify_all()

    def wait_for_log(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((line for line in self.lines if line.get("event") == event), None)

        with self._cond:
            ok = self._cond.wait_for(
                lambda: found() is not None or self.proc.poll() is not None, timeout
            )
            line = found()
        if not ok or line is None:
            raise AssertionError(f"relay never logged {event!r}; stderr:\n{''.join(self.raw)}")
        return line

    def port(self) -> int:
        ports: list[int] = self.wait_for_log("relay listening")["ports"]
        return ports[0]

    def wait(self, timeout: float = 60.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

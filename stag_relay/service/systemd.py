"""Telling systemd how the relay is doing: the sd_notify datagram protocol, without libsystemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, an AF_UNIX datagram socket (a
filesystem path, or an abstract name written with a leading ``@``). Each datagram is
``KEY=VALUE`` lines: ``READY=1`` once the relay listens, ``STATUS=...`` for
``systemctl status``, ``WATCHDOG=1`` keep-alives, ``RELOADING=1`` with ``MONOTONIC_USEC``
around a reload, ``STOPPING=1`` when shutdown begins. Without ``$NOTIFY_SOCKET``
(a terminal, Docker, Kubernetes) every call here does nothing.

Notifying is advisory: a send never blocks (non-blocking socket) and never raises. A
failure is logged when it starts and again only once sending works again.
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Final

import attrs
import structlog
import trio

log = structlog.get_logger("stag_relay.systemd")

# `systemctl status` shows the latest STATUS line; every 10s keeps it current without
# being a noticeable load (one small datagram).
STATUS_INTERVAL: Final = 10.0
# sd_notify's field names are upper-case words; anything else is a programming error.
_FIELD_NAME: Final = re.compile(r"[A-Z][A-Z0-9_]*")


def _address(value: str) -> bytes | None:
    """The sockaddr for ``$NOTIFY_SOCKET``, or None when we cannot speak to it."""
    if "\0" in value:
        return None
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        # Linux abstract namespace: the name is the bytes after a leading NUL.
        return b"\0" + os.fsencode(value[1:])
    # e.g. "vsock:..." (systemd >= 254, for VMs): not something a relay host hands us.
    return None


def _watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds from ``$WATCHDOG_USEC``, if the watchdog is meant for process ``pid``.

    As sd_watchdog_enabled(3): ``$WATCHDOG_PID``, when set, must name this process;
    a value that is not a positive integer disables the watchdog.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid is not None and (not watchdog_pid.isdigit() or int(watchdog_pid) != pid):
        return None
    return int(usec) / 1_000_000


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@attrs.define
class Notifier:
    """Sends sd_notify messages to one socket; does nothing when ``address`` is None.

    Build it with ``Notifier.from_environ()``; ``Notifier()`` is the disabled one.
    """

    # The sockaddr (path, or NUL + abstract name); None when not run by systemd.
    address: bytes | None = None
    # The full watchdog timeout in seconds (WatchdogSec=); pings go at half of it.
    watchdog_interval: float | None = None
    _socket: socket.socket | None = attrs.field(default=None, init=False, repr=False)
    # True from a failed send until one succeeds: a failure is logged once, not per send.
    _failing: bool = attrs.field(default=False, init=False, repr=False)

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> Notifier:
        """The notifier ``$NOTIFY_SOCKET`` asks for (disabled when it is unset).

        ``pid`` is the process ``$WATCHDOG_PID`` must name (default: this one).
        """
        if environ is None:
            environ = os.environ
        value = environ.get("NOTIFY_SOCKET", "")
        if not value:
            return cls()
        address = _address(value)
        if address is None:
            log.warning("NOTIFY_SOCKET not supported, not notifying systemd", socket=value)
            return cls()
        watchdog = _watchdog_interval(environ, os.getpid() if pid is None else pid)
        return cls(address=address, watchdog_interval=watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: object) -> bool:
        """Send one datagram of ``KEY=value`` lines; True if it was sent.

        ``notify(READY=1, STATUS="listening")``. A newline in a value would start a
        new field, so it becomes a space.
        """
        if self.address is None or not fields:
            return False
        lines = []
        for name, value in fields.items():
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"not an sd_notify field name: {name!r}")
            text = str(value).replace("\r", " ").replace("\n", " ")
            lines.append(f"{name}={text}\n")
        return self._send(self.address, "".join(lines).encode("utf-8"))

    def ready(self, status: str | None = None) -> bool:
        """The relay listens: ends systemd's start-up wait (and a reload)."""
        return self._with_status({"READY": 1}, status)

    def reloading(self, status: str | None = None) -> bool:
        """A reload begins; send ``ready()`` when it is done.

        MONOTONIC_USEC lets systemd (Type=notify-reload, >= 253) tell this reload from an
        older one; earlier versions ignore it.
        """
        return self._with_status({"RELOADING": 1, "MONOTONIC_USEC": monotonic_usec()}, status)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun: systemd shows the unit as deactivating."""
        return self._with_status({"STOPPING": 1}, status)

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """One keep-alive; needed at least every ``watchdog_interval``."""
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _with_status(self, fields: dict[str, object], status: str | None) -> bool:
        if status is not None:
            fields["STATUS"] = status
        return self.notify(**fields)

    def _send(self, address: bytes, datagram: bytes) -> bool:
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A full receive queue on systemd's side must not stall the event loop:
                # a dropped keep-alive costs less than a blocked relay.
                sock.setblocking(False)
                self._socket = sock
            self._socket.sendto(datagram, address)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "cannot notify systemd",
                    socket=_for_logs(address),
                    error=f"{type(exc).__name__}: {exc}",
                )
            return False
        if self._failing:
            self._failing = False
            log.info("notifying systemd again", socket=_for_logs(address))
        return True


def _for_logs(address: bytes) -> str:
    # Written back the way $NOTIFY_SOCKET spells it.
    if address.startswith(b"\0"):
        return "@" + os.fsdecode(address[1:])
    return os.fsdecode(address)


@attrs.frozen
class StatusSnapshot:
    """Counts the relay gives ``run_watchdog`` for its STATUS lines."""

    connections: int
    # Cumulative counts since start; rates come from the difference of two snapshots.
    events_received: int
    events_sent: int
    draining: bool = False


def format_status(current: StatusSnapshot, previous: StatusSnapshot, elapsed: float) -> str:
    """``12 connections, 340.0 events/s in, 338.5 events/s to STAG`` over ``elapsed`` seconds."""

    def rate(now: int, before: int) -> float:
        return (now - before) / elapsed if elapsed > 0 else 0.0

    plural = "" if current.connections == 1 else "s"
    text = (
        f"{current.connections} connection{plural}, "
        f"{rate(current.events_received, previous.events_received):.1f} events/s in, "
        f"{rate(current.events_sent, previous.events_sent):.1f} events/s to STAG"
    )
    return f"draining: {text}" if current.draining else text


async def run_watchdog(
    notifier: Notifier,
    snapshot: Callable[[], StatusSnapshot] | None = None,
    *,
    status_interval: float = STATUS_INTERVAL,
) -> None:
    """Send WATCHDOG=1 at half the watchdog interval and a STATUS line every ``status_interval``.

    Runs until cancelled; returns at once when there is nothing to send (not under
    systemd, or neither a watchdog nor a ``snapshot``). The keep-alive only proves
    that the event loop runs, which is the failure a watchdog exists for: a task
    that blocks the loop stops every other task too.
    """
    if not notifier.enabled:
        return
    interval = notifier.watchdog_interval
    ping_every = interval / 2 if interval is not None else None
    if ping_every is None and snapshot is None:
        return
    now = trio.current_time()
    # The first keep-alive goes at once: the watchdog may already be running.
    next_ping = now if ping_every is not None else math.inf
    next_status = now + status_interval if snapshot is not None else math.inf
    previous = snapshot() if snapshot is not None else None
    previous_at = now
    while True:
        await trio.sleep_until(min(next_ping, next_status))
        now = trio.current_time()
        fields: dict[str, object] = {}
        if ping_every is not None and now >= next_ping:
            fields["WATCHDOG"] = 1
            # From now, not from the missed deadline: a late loop gets no burst of pings.
            next_ping = now + ping_every
        if snapshot is not None and previous is not None and now >= next_status:
            current = snapshot()
            fields["STATUS"] = format_status(current, previous, now - previous_at)
            previous, previous_at = current, now
            next_status = now + status_interval
        notifier.notify(**fields)

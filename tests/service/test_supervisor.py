"""supervisor.py's pure parts: the restart backoff and a worker's environment."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import attrs
from hypothesis import given
from hypothesis import strategies as st

from stag_relay.service.config import Config, load_config
from stag_relay.service.supervisor import (
    RestartBackoff,
    describe_exit,
    worker_environment,
    write_config,
)


def test_backoff_doubles_while_a_worker_keeps_dying_and_is_capped() -> None:
    backoff = RestartBackoff(initial=0.5, maximum=4.0, healthy_after=60.0)
    assert [backoff.delay(ran_for=1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_starts_over_after_a_worker_ran_long_enough() -> None:
    backoff = RestartBackoff(initial=0.5, maximum=30.0, healthy_after=60.0)
    backoff.delay(1.0)
    backoff.delay(1.0)
    assert backoff.delay(ran_for=60.0) == 0.5
    assert backoff.delay(ran_for=1.0) == 1.0


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=50))
def test_backoff_stays_within_its_bounds(runs: list[float]) -> None:
    backoff = RestartBackoff()
    for ran_for in runs:
        assert backoff.initial <= backoff.delay(ran_for) <= backoff.maximum


def test_workers_talk_to_the_supervisor_and_read_its_configuration(tmp_path: Path) -> None:
    environ = {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "1",
        # The workers run the configuration file the supervisor checked and wrote.
        "RELAY_STAG_URL": "http://stag:1",
        "RELAY_CONFIG": "/etc/stag-relay/relay.yaml",
        "LANG": "C.UTF-8",
    }
    env = worker_environment(
        environ, index=1, count=2, directory=tmp_path, notify="@sr-1", watchdog=2.5
    )
    assert env == {
        "LANG": "C.UTF-8",
        "STAG_RELAY_WORKER": "1/2",
        "STAG_RELAY_WORKER_DIR": str(tmp_path),
        "STAG_RELAY_SUPERVISOR_PID": str(os.getpid()),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "NOTIFY_SOCKET": "@sr-1",
        "WATCHDOG_USEC": "2500000",
    }


def test_the_workers_configuration_file_reads_back_as_the_same_config(tmp_path: Path) -> None:
    config = attrs.evolve(
        Config(),
        stag=attrs.evolve(Config().stag, api_key="secret", url="http://u:p@stag:1"),
        auth=attrs.evolve(Config().auth, api_keys=("k-one-0123456789",)),
    )
    path = tmp_path / "config.json"
    write_config(path, config)
    assert load_config(config_path=str(path), environ={}).config == config
    assert path.stat().st_mode & 0o777 == 0o600


def test_exits_are_described_for_people() -> None:
    assert describe_exit(0) == "exit status 0"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-200) == "killed by signal 200"

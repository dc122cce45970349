"""The command line as operators use it: flags, --check-config, exit codes, no tracebacks."""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stag_relay import __version__
from stag_relay.service.cli import TOOLS
from tests.support.relays import RelayProcess, http_get


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "stag_relay", *args],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version_and_help() -> None:
    version = run_cli("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"stag-relay {__version__}"
    usage = run_cli("--help")
    assert usage.returncode == 0
    for flag in ("--config", "--host", "--port", "--log-level", "--check-config", "--version"):
        assert flag in usage.stdout


def test_check_config_prints_the_effective_configuration_with_secrets_masked(
    tmp_path: Path,
) -> None:
    result = run_cli(
        "--check-config",
        "--port",
        "9100",
        env={"RELAY_STAG_API_KEY": "hunter2", "RELAY_BATCH_TIMEOUT": "500ms"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert "port: 9100" in result.stdout
    assert "timeout: 500ms" in result.stdout
    assert "defaults only" in result.stdout


def test_bad_yaml_value_names_file_line_key_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text("server:\n  port: 8081\nbatch:\n  max_size: ten\n")
    result = run_cli("--check-config", "--config", str(config))
    assert result.returncode == 2
    assert "line 4" in result.stderr
    assert "batch.max_size" in result.stderr
    assert "'ten'" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_environment_value_and_unknown_key_suggestion(tmp_path: Path) -> None:
    result = run_cli("--check-config", env={"RELAY_BATCH_TIMEOUT": "soon"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "RELAY_BATCH_TIMEOUT" in result.stderr
    assert "soon" in result.stderr
    config = tmp_path / "relay.yaml"
    config.write_text("batch:\n  max_sise: 10\n")
    result = run_cli("--check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert "did you mean batch.max_size" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "--host", "127.0.0.1", "--port", str(port), env={"RELAY_LOG_FORMAT": "json"}
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert line["event"] == "cannot listen"
    assert line["port"] == port


def test_starts_and_stays_healthy_without_stag() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = closed.getsockname()[1]
    relay = RelayProcess(
        {
            "RELAY_SERVER_HOST": "127.0.0.1",
            "RELAY_SERVER_PORT": "0",
            "RELAY_STAG_URL": f"http://127.0.0.1:{nobody}",
        }
    )
    try:
        status, _, body = http_get(relay.port(), "/health")
        assert status == 200
        assert json.loads(body)["status"] == "ok"
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.kill()


# A Python that cannot import the `tools` extra's distributions, as after a plain
# `pip install stag-relay`; the command line then comes after `-c`.
WITHOUT_TOOLS_EXTRA = (
    "import sys; sys.modules.update(dict.fromkeys(['websockets', 'rich', 'httpx'])); "
    "from stag_relay.service.cli import main; sys.exit(main())"
)


def run_without_tools_extra(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TOOLS_EXTRA, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        ("loadgen", ("--connections", "2", "ws://127.0.0.1:9/ws/streamkit")),
        ("loadgen", ("--help",)),
        ("sink", ()),
        ("demo", ("--duration", "1s")),
    ],
)
def test_a_tool_without_the_tools_extra_says_how_to_install_it(
    tool: str, args: tuple[str, ...]
) -> None:
    result = run_without_tools_extra(tool, *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"stag-relay {tool} needs " in result.stderr
    assert "pip install 'stag-relay[tools]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_relay_and_the_spool_tool_need_no_tools_extra(tmp_path: Path) -> None:
    check = run_without_tools_extra("--check-config")
    assert check.returncode == 0, check.stderr
    assert "stag:" in check.stdout
    spool = run_without_tools_extra("spool", "--spool", str(tmp_path / "none.db"), "stats")
    assert "tools" not in spool.stderr
    assert "Traceback" not in spool.stderr
    usage = run_without_tools_extra("--help")
    assert usage.returncode == 0
    for tool in TOOLS:
        assert tool in usage.stdout


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_each_tool_is_listed_with_its_modules_summary_and_has_its_own_help(tool: str) -> None:
    module = importlib.import_module(TOOLS[tool].module)
    assert (module.__doc__ or "").strip().splitlines()[0] == TOOLS[tool].help
    usage = run_cli(tool, "--help")
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.startswith(f"usage: stag-relay {tool} ")

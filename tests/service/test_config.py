"""Configuration: layering of defaults, YAML, environment and flags; errors people read."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from stag_relay.service.config import (
    BatchConfig,
    Config,
    ConfigError,
    LoadedConfig,
    ServerConfig,
    StagConfig,
    dump_config,
    format_duration,
    load_config,
    parse_duration,
    redact_url,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "relay.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def load(**kwargs: object) -> Config:
    kwargs.setdefault("environ", {})
    kwargs.setdefault("search_default_paths", False)
    return load_config(**kwargs).config  # type: ignore[arg-type]


def problems(**kwargs: object) -> list[str]:
    kwargs.setdefault("environ", {})
    kwargs.setdefault("search_default_paths", False)
    with pytest.raises(ConfigError) as caught:
        load_config(**kwargs)  # type: ignore[arg-type]
    assert str(caught.value) == "\n".join(caught.value.problems)
    return list(caught.value.problems)


# --- sources and precedence ---------------------------------------------------------


def test_defaults_only() -> None:
    loaded = load_config(environ={}, search_default_paths=False)
    assert loaded == LoadedConfig(config=Config(), source=None)
    assert loaded.config.server.port == 8081
    assert loaded.config.batch.timeout == 0.1


def test_yaml_overrides_defaults_and_keeps_the_rest(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        server:
          port: 9000
        batch:
          max_size: 100
          timeout: 250ms
        stag:
          url: https://stag.example:8443
        """,
    )
    loaded = load_config(config_path=path, environ={}, search_default_paths=False)
    assert loaded.source == path
    assert loaded.config == Config(
        server=ServerConfig(port=9000),
        stag=StagConfig(url="https://stag.example:8443"),
        batch=BatchConfig(max_size=100, timeout=0.25),
    )


def test_environment_beats_yaml_and_flags_beat_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 9000\n  host: 10.0.0.1\nlog:\n  level: warning\n")
    environ = {"RELAY_SERVER_PORT": "9001", "RELAY_LOG_LEVEL": "error"}
    config = load(config_path=path, environ=environ, overrides={"server.port": 9002})
    assert config.server.port == 9002  # flag
    assert config.log.level == "error"  # environment
    assert config.server.host == "10.0.0.1"  # file


def test_every_key_has_an_environment_variable() -> None:
    environ = {
        "RELAY_SERVER_HOST": "127.0.0.1",
        "RELAY_SERVER_PORT": "1",
        "RELAY_SERVER_HANDSHAKE_TIMEOUT": "2s",
        "RELAY_SERVER_SHUTDOWN_TIMEOUT": "3s",
        "RELAY_SERVER_MAX_CONNECTIONS": "16",
        # Empty: not configured (a path here must name a readable file).
        "RELAY_SERVER_TLS_CERT": "",
        "RELAY_SERVER_TLS_KEY": "",
        "RELAY_SERVER_WORKERS": "3",
        "RELAY_SERVER_WORKER_TIMEOUT": "9s",
        "RELAY_AUTH_API_KEYS": "key-1, key-2",
        "RELAY_AUTH_API_KEYS_FILE": "",
        "RELAY_AUTH_PROTECT_ENDPOINTS": "true",
        "RELAY_STAG_URL": "http://stag:1",
        "RELAY_STAG_FORMAT": "spatial-event",
        "RELAY_STAG_INGEST_PATH": "/in",
        "RELAY_STAG_TIMEOUT": "4s",
        "RELAY_STAG_API_KEY": "key",
        "RELAY_STAG_MAX_IN_FLIGHT": "5",
        "RELAY_STAG_RETRY_INITIAL": "6ms",
        "RELAY_STAG_RETRY_MAX": "7s",
        "RELAY_STAG_RELAY_ID": "relay-1",
        "RELAY_WEBSOCKET_BUFFER_SIZE": "8",
        "RELAY_WEBSOCKET_HEARTBEAT_INTERVAL": "9s",
        "RELAY_WEBSOCKET_MAX_MESSAGE_SIZE": "10",
        "RELAY_WEBSOCKET_MAX_PACKETS_PER_SECOND": "17",
        "RELAY_WEBSOCKET_MAX_INVALID_PACKETS": "18",
        "RELAY_WEBSOCKET_ALLOWED_ORIGINS": "https://a.example,http://b.example:8080",
        "RELAY_BATCH_MAX_SIZE": "11",
        "RELAY_BATCH_TIMEOUT": "500ms",
        "RELAY_SESSION_TTL": "1h",
        "RELAY_SESSION_MAX_SESSIONS": "13",
        "RELAY_LOG_LEVEL": "debug",
        "RELAY_LOG_FORMAT": "json",
        "RELAY_DELIVERY_SPOOL_PATH": "/var/lib/stag-relay/spool.sqlite3",
        "RELAY_DELIVERY_SPOOL_MAX_BYTES": "14",
        "RELAY_DELIVERY_WHEN_FULL": "drop_oldest",
        "RELAY_DELIVERY_DEAD_LETTER_MAX_BYTES": "15",
        "RELAY_MESH_MAX_VERTICES": "16",
        "RELAY_MESH_MAX_FACES": "17",
        "RELAY_MESH_KEYFRAME_INTERVAL": "18",
        "RELAY_MESH_WORKERS": "3",
        "RELAY_MESH_MAX_STATE_BYTES": "19",
    }
    config = load(environ=environ)
    assert attrs.asdict(config) == {
        "server": {
            "host": "127.0.0.1",
            "port": 1,
            "handshake_timeout": 2.0,
            "shutdown_timeout": 3.0,
            "max_connections": 16,
            "tls_cert": "",
            "tls_key": "",
            "workers": 3,
            "worker_timeout": 9.0,
        },
        "auth": {
            "api_keys": ("key-1", "key-2"),
            "api_keys_file": "",
            "protect_endpoints": True,
        },
        "stag": {
            "url": "http://stag:1",
            "format": "spatial-event",
            "ingest_path": "/in",
            "timeout": 4.0,
            "api_key": "key",
            "max_in_flight": 5,
            "retry_initial": 0.006,
            "retry_max": 7.0,
            "relay_id": "relay-1",
        },
        "websocket": {
            "buffer_size": 8,
            "heartbeat_interval": 9.0,
            "max_message_size": 10,
            "max_packets_per_second": 17,
            "max_invalid_packets": 18,
            "allowed_origins": ("https://a.example", "http://b.example:8080"),
        },
        "batch": {"max_size": 11, "timeout": 0.5},
        "session": {"ttl": 3600.0, "max_sessions": 13},
        "log": {"level": "debug", "format": "json"},
        "delivery": {
            "spool_path": "/var/lib/stag-relay/spool.sqlite3",
            "spool_max_bytes": 14,
            "when_full": "drop_oldest",
            "dead_letter_max_bytes": 15,
        },
        "mesh": {
            "max_vertices": 16,
            "max_faces": 17,
            "keyframe_interval": 18,
            "workers": 3,
            "max_state_bytes": 19,
        },
    }


def test_relay_config_names_the_file_and_the_flag_beats_it(tmp_path: Path) -> None:
    from_env = write(tmp_path, "server:\n  port: 1111\n", "env.yaml")
    from_flag = write(tmp_path, "server:\n  port: 2222\n", "flag.yaml")
    loaded = load_config(environ={"RELAY_CONFIG": from_env}, search_default_paths=False)
    assert (loaded.source, loaded.config.server.port) == (from_env, 1111)
    loaded = load_config(
        config_path=from_flag, environ={"RELAY_CONFIG": from_env}, search_default_paths=False
    )
    assert (loaded.source, loaded.config.server.port) == (from_flag, 2222)


def test_default_path_is_searched_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "batch:\n  max_size: 42\n")
    monkeypatch.chdir(tmp_path)
    loaded = load_config(environ={})
    assert (loaded.source, loaded.config.batch.max_size) == ("relay.yaml", 42)
    assert load_config(environ={}, search_default_paths=False).source is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"config_path": "missing.yaml"}, "--config: config file missing.yaml does not exist"),
        (
            {"environ": {"RELAY_CONFIG": "gone.yaml"}},
            "RELAY_CONFIG: config file gone.yaml does not exist",
        ),
    ],
)
def test_an_explicit_file_that_does_not_exist_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, object], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert problems(**kwargs) == [message]


def test_empty_file_and_empty_sections_mean_defaults(tmp_path: Path) -> None:
    assert load(config_path=write(tmp_path, "# nothing yet\n")) == Config()
    assert load(config_path=write(tmp_path, "server:\nbatch:\n  # max_size: 5\n")) == Config()


def test_flag_not_given_is_none_and_ignored() -> None:
    assert load(overrides={"server.port": None, "log.level": None}) == Config()


# --- value rules ------------------------------------------------------------------


def test_port_accepts_a_numeric_string_like_the_go_relay(tmp_path: Path) -> None:
    assert load(config_path=write(tmp_path, 'server:\n  port: "8082"\n')).server.port == 8082
    assert load(overrides={"server.port": "0"}).server.port == 0


def test_ints_in_yaml_must_be_ints_but_environment_text_is_converted(tmp_path: Path) -> None:
    path = write(tmp_path, 'batch:\n  max_size: "5"\n')
    assert problems(config_path=path) == [
        f"{path} line 2: batch.max_size: expected a positive integer, got '5'"
    ]
    assert load(environ={"RELAY_BATCH_MAX_SIZE": " 7 "}).batch.max_size == 7


@pytest.mark.parametrize("value", ["true", "0", "-3", "1.5", "[1]", "ten", ""])
def test_positive_int_rejects(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"websocket:\n  buffer_size: {value}\n")
    [message] = problems(config_path=path)
    assert message.startswith(f"{path} line 2: websocket.buffer_size: expected a positive integer")


def test_log_choices_are_case_insensitive_and_suggest() -> None:
    assert load(environ={"RELAY_LOG_LEVEL": "DEBUG"}).log.level == "debug"
    assert problems(overrides={"log.level": "warn"}) == [
        "--log-level: expected one of debug, info, warning, error, got 'warn'; "
        "did you mean warning?"
    ]
    assert problems(environ={"RELAY_LOG_FORMAT": "xml"}) == [
        "RELAY_LOG_FORMAT: expected one of auto, json, console, got 'xml'"
    ]


@pytest.mark.parametrize(
    "url", ["localhost:8080", "ftp://stag", "http://", "http://:80/x", "http://stag:eighty"]
)
def test_stag_url_must_be_http_with_a_host(url: str) -> None:
    assert problems(environ={"RELAY_STAG_URL": url}) == [
        f"RELAY_STAG_URL: expected an http:// or https:// URL with a host, got {url!r}"
    ]


def test_bad_stag_url_error_does_not_show_credentials() -> None:
    [message] = problems(environ={"RELAY_STAG_URL": "ftp://user:hunter2@stag"})
    assert "hunter2" not in message
    assert "'ftp://stag'" in message


def test_ingest_path_must_start_with_a_slash() -> None:
    assert problems(environ={"RELAY_STAG_INGEST_PATH": "ingest"}) == [
        "RELAY_STAG_INGEST_PATH: expected a path starting with '/', got 'ingest'"
    ]


def test_stag_format_defaults_to_batch_and_its_ingest_path() -> None:
    stag = load().stag
    assert (stag.format, stag.ingest_path) == ("batch", "/ingest")


def test_spatial_event_format_posts_to_api_v1_ingest_unless_told(tmp_path: Path) -> None:
    stag = load(environ={"RELAY_STAG_FORMAT": "spatial-event"}).stag
    assert (stag.format, stag.ingest_path) == ("spatial-event", "/api/v1/ingest")
    # Case and spaces are forgiven, like the other choices.
    assert load(environ={"RELAY_STAG_FORMAT": " Spatial-Event "}).stag.format == "spatial-event"
    path = write(tmp_path, "stag:\n  format: spatial-event\n  ingest_path: /v2/events\n")
    assert load(config_path=path).stag.ingest_path == "/v2/events"
    # An explicit /ingest is kept: the user said so.
    explicit = load(
        environ={"RELAY_STAG_FORMAT": "spatial-event", "RELAY_STAG_INGEST_PATH": "/ingest"}
    )
    assert explicit.stag.ingest_path == "/ingest"
    assert load(environ={"RELAY_STAG_FORMAT": "batch"}).stag.ingest_path == "/ingest"


def test_stag_format_errors_name_the_key_the_value_and_the_choices(tmp_path: Path) -> None:
    assert problems(environ={"RELAY_STAG_FORMAT": "spatial"}) == [
        "RELAY_STAG_FORMAT: expected one of batch, spatial-event, got 'spatial'; "
        "did you mean spatial-event?"
    ]
    path = write(tmp_path, "stag:\n  format: 2\n")
    assert problems(config_path=path) == [
        f"{path} line 2: stag.format: expected one of batch, spatial-event, got 2"
    ]


def test_check_config_shows_the_format_and_the_path_it_chose(tmp_path: Path) -> None:
    config = load(environ={"RELAY_STAG_FORMAT": "spatial-event"})
    text = dump_config(config)
    assert "format: spatial-event" in text and "ingest_path: /api/v1/ingest" in text
    assert load(config_path=write(tmp_path, text)) == config


def test_retry_initial_must_not_exceed_retry_max(tmp_path: Path) -> None:
    path = write(tmp_path, "stag:\n  retry_initial: 20s\n")
    assert problems(config_path=path) == [
        f"{path} line 2: stag.retry_initial: 20s is longer than stag.retry_max, 10s (default);"
        " make retry_initial <= retry_max"
    ]


def test_non_text_api_key_is_rejected_without_echoing_it(tmp_path: Path) -> None:
    path = write(tmp_path, "stag:\n  api_key: 123456789\n")
    [message] = problems(config_path=path)
    assert message == f"{path} line 2: stag.api_key: expected text, got a number (put it in quotes)"


@pytest.mark.parametrize("key", ["s3cret\n", " s3cret", "s3c\x00ret", "s3c\r\nret"])
def test_an_api_key_that_cannot_go_in_a_header_is_rejected_without_echoing_it(key: str) -> None:
    [message] = problems(environ={"RELAY_STAG_API_KEY": key})
    assert message.startswith("RELAY_STAG_API_KEY: the key holds a NUL or a line break")
    assert "s3c" not in message


def test_a_key_with_no_value_says_so(tmp_path: Path) -> None:
    path = write(tmp_path, "stag:\n  relay_id:\n")
    [message] = problems(config_path=path)
    assert message.startswith(f"{path} line 2: stag.relay_id: expected text, got nothing")


# --- error messages -----------------------------------------------------------------


def test_yaml_error_names_file_line_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 8081\n\nbatch:\n  max_size: ten\n")
    assert problems(config_path=path) == [
        f"{path} line 5: batch.max_size: expected a positive integer, got 'ten'"
    ]


def test_environment_error_names_the_variable() -> None:
    assert problems(environ={"RELAY_BATCH_TIMEOUT": "soon"}) == [
        "RELAY_BATCH_TIMEOUT: invalid duration 'soon' (use e.g. 100ms, 10s, 5m)"
    ]


def test_flag_error_names_the_flag() -> None:
    assert problems(overrides={"server.port": 70000}) == [
        "--port: expected a port number 0..65535, got 70000"
    ]
    assert problems(overrides={"server.port": "http"}) == [
        "--port: expected a port number 0..65535, got 'http'"
    ]


def test_unknown_keys_get_a_suggestion(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        batch:
          max_sise: 4
          buffer_size: 10
        bach:
          max_size: 4
        websocket.buffer_size: 3
        """,
    )
    assert problems(config_path=path) == [
        f"{path} line 2: batch.max_sise: unknown key; did you mean batch.max_size?",
        f"{path} line 3: batch.buffer_size: unknown key; did you mean websocket.buffer_size?",
        f"{path} line 4: bach: unknown section; did you mean batch?",
        f"{path} line 6: websocket.buffer_size: unknown section;"
        " write it nested: 'websocket:' and under it '  buffer_size: ...'",
    ]


def test_unknown_environment_variables_that_look_like_ours() -> None:
    environ = {
        "RELAY_BATCH_MAX_SIZ": "4",
        "RELAY_SERVR_PORT": "1",
        "RELAY_CONFIG": "",  # names the file, not a key; empty means unset
        "RELAY_HOME": "/srv",  # someone else's
    }
    assert problems(environ=environ) == [
        "RELAY_BATCH_MAX_SIZ: unknown setting; did you mean RELAY_BATCH_MAX_SIZE?",
        "RELAY_SERVR_PORT: unknown setting; did you mean RELAY_SERVER_PORT?",
    ]


def test_unknown_override_key() -> None:
    assert problems(overrides={"batch.maxsize": 3}) == [
        "override batch.maxsize: unknown key; did you mean batch.max_size?"
    ]


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, "batch:\n  max_size: 0\nserver:\n  port: -1\n")
    found = problems(
        config_path=path,
        environ={"RELAY_BATCH_TIMEOUT": "soon"},
        overrides={"log.level": "loud"},
    )
    assert sorted(found) == sorted(
        [
            f"{path} line 4: server.port: expected a port number 0..65535, got -1",
            f"{path} line 2: batch.max_size: expected a positive integer, got 0",
            "RELAY_BATCH_TIMEOUT: invalid duration 'soon' (use e.g. 100ms, 10s, 5m)",
            "--log-level: expected one of debug, info, warning, error, got 'loud'",
        ]
    )


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("server:\n  port: 1\n  bad: x: y\n", 3, "mapping values are not allowed here"),
        ("server:\n  port: 1\n bad: 2\n", 3, "expected <block end>"),
        ("batch:\n  max_size: 1\n  max_size: 2\n", 3, 'found duplicate key "max_size"'),
        ("server: [1, 2\n", 2, "expected ',' or ']'"),
    ],
)
def test_yaml_syntax_error_names_file_and_line(
    tmp_path: Path, text: str, line: int, what: str
) -> None:
    path = write(tmp_path, text)
    [message] = problems(config_path=path)
    assert message.startswith(f"{path} line {line}: invalid YAML: ")
    assert what in message
    assert "Traceback" not in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- server\n", "line 1: expected a mapping of sections"),
        ("server: 8081\n", "line 1: server: expected a mapping of keys under it, got 8081"),
        ("batch:\n  timeout: !secs 5\n", "line 2: batch.timeout: YAML tags are not supported"),
    ],
)
def test_yaml_of_the_wrong_shape(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    [found] = problems(config_path=path)
    assert found.startswith(f"{path} {message}")


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    [message] = problems(config_path=str(tmp_path))
    assert message.startswith(f"{tmp_path}: cannot read the config file")


# --- the shipped relay.yaml -----------------------------------------------------------


def test_shipped_relay_yaml_equals_the_defaults() -> None:
    path = str(REPO_ROOT / "relay.yaml")
    assert load_config(config_path=path, environ={}) == LoadedConfig(config=Config(), source=path)


def test_shipped_relay_yaml_documents_every_key() -> None:
    document = YAML(typ="safe").load((REPO_ROOT / "relay.yaml").read_text(encoding="utf-8"))
    documented = {f"{section}.{key}" for section, body in document.items() for key in body}
    schema = {
        f"{section}.{key}"
        for section, values in attrs.asdict(Config(), recurse=False).items()
        for key in attrs.asdict(values)
    }
    assert documented == schema


# --- dump ---------------------------------------------------------------------------


def test_dump_masks_secrets_and_formats_durations() -> None:
    config = load(
        environ={
            "RELAY_STAG_API_KEY": "s3cret-key",
            "RELAY_STAG_URL": "https://relay:p4ss@stag.example/v1",
        }
    )
    text = dump_config(config)
    assert "s3cret" not in text
    assert "p4ss" not in text
    assert "api_key: '***'" in text
    assert "url: https://***@stag.example/v1" in text
    assert "timeout: 100ms" in text
    assert "ttl: 5m" in text
    # repr is what ends up in logs and tracebacks.
    assert "s3cret" not in repr(config)
    assert "p4ss" not in repr(config)


def test_dump_of_defaults_shows_empty_secret_as_empty() -> None:
    assert "api_key: ''" in dump_config(Config())


def test_dump_loads_back_to_the_same_config(tmp_path: Path) -> None:
    config = load(
        environ={
            "RELAY_BATCH_TIMEOUT": "1.5s",
            "RELAY_SERVER_HOST": "::1",
            "RELAY_STAG_RELAY_ID": "7",
        }
    )
    path = write(tmp_path, dump_config(config))
    assert load(config_path=path) == config


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("https://user:pw@stag.example:8443/x?y=1", "https://stag.example:8443/x?y=1"),
        ("http://token@[::1]:80/", "http://[::1]:80/"),
        ("http://a@b:c@host/", "http://host/"),
        ("http://stag.example/path@v1", "http://stag.example/path@v1"),
        ("http://localhost:8080", "http://localhost:8080"),
        ("user:pw@host/x", "host/x"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


# --- durations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("100ms", 0.1),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        (" 2s ", 2.0),
        ("0.25", 0.25),
        ("7", 7.0),
        (3, 3.0),
        (0.5, 0.5),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "soon", "-1s", "10 parsecs", "1e3s", "s", "1.s", "nan", "inf", "٣s", True, -1]
)
def test_parse_duration_rejects(text: str | float) -> None:
    with pytest.raises(ValueError, match=r"invalid duration .* \(use e\.g\. 100ms, 10s, 5m\)"):
        parse_duration(text)


def test_zero_duration_is_rejected_in_config() -> None:
    assert problems(environ={"RELAY_WEBSOCKET_HEARTBEAT_INTERVAL": "0s"}) == [
        "RELAY_WEBSOCKET_HEARTBEAT_INTERVAL: expected a duration greater than zero, got '0s'"
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.1, "100ms"), (10.0, "10s"), (300.0, "5m"), (3600.0, "1h"), (1.5, "1500ms"), (0.0, "0s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@settings(max_examples=300)
@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_format_then_parse_round_trips(seconds: float) -> None:
    text = format_duration(seconds)
    assert "e" not in text.lower()
    assert parse_duration(text) == seconds


@settings(max_examples=200)
@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(["ms", "s", "m", "h"]))
def test_whole_units_parse_exactly(count: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    assert parse_duration(f"{count}{unit}") == pytest.approx(count * factor, rel=1e-15)
    assert parse_duration(format_duration(parse_duration(f"{count}{unit}"))) == parse_duration(
        f"{count}{unit}"
    )


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=20), st.floats(), st.integers()))
def test_parse_duration_on_junk_gives_seconds_or_value_error(junk: str | float) -> None:
    try:
        seconds = parse_duration(junk)
    except ValueError:
        return
    assert math.isfinite(seconds)
    assert seconds >= 0


def test_workers_is_a_count_or_auto(tmp_path: Path) -> None:
    from stag_relay.service.config import available_cpus

    assert load().server.workers == 1
    assert load(environ={"RELAY_SERVER_WORKERS": "4"}).server.workers == 4
    assert load(environ={"RELAY_SERVER_WORKERS": "AUTO"}).server.workers == available_cpus()
    assert load(config_path=write(tmp_path, "server:\n  workers: auto\n")).server.workers >= 1


@pytest.mark.parametrize(
    ("value", "shown"),
    [("0", "0"), ("-1", "-1"), ("257", "257"), ("many", "'many'"), ("1.5", "1.5")],
)
def test_workers_rejects_with_the_range_and_auto(tmp_path: Path, value: str, shown: str) -> None:
    path = write(tmp_path, f"server:\n  workers: {value}\n")
    [message] = problems(config_path=path)
    assert message == (
        f"{path} line 2: server.workers: expected a number of worker processes 1..256 or "
        f"auto (one per CPU), got {shown}"
    )


def test_cpus_follow_a_cgroup_quota(tmp_path: Path) -> None:
    from stag_relay.service.config import _cgroup_cpu_quota

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpu_quota(tmp_path) == 0.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_cpu_quota(tmp_path) is None
    assert _cgroup_cpu_quota(tmp_path / "nothing") is None


def test_the_shipped_relay_yaml_with_spatial_event_posts_where_those_stags_listen() -> None:
    loaded = load(
        config_path=str(REPO_ROOT / "relay.yaml"), environ={"RELAY_STAG_FORMAT": "spatial-event"}
    )
    assert loaded.stag.ingest_path == "/api/v1/ingest"
    assert load(environ={"RELAY_STAG_INGEST_PATH": ""}).stag.ingest_path == "/ingest"

"""The relay's configuration: schema, defaults, and layering of its sources.

Sources, later wins: defaults < YAML file < environment (RELAY_<SECTION>_<KEY>)
< command-line flags. Every error names the key, the value, where it came from
and what would fix it; the CLI turns ConfigError into exit status 2.

Each field of the schema carries, in its attrs metadata, the rule that turns a
raw value (from YAML, an environment string or a flag) into the typed value and
rejects what a person must fix. A dedicated cattrs converter applies those rules
field by field, so one run reports every bad value at once.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import cattrs
from cattrs.errors import ClassValidationError
from cattrs.gen import make_dict_structure_fn, override
from ruamel.yaml import YAML
from ruamel.yaml.comments import TaggedScalar
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from stag_relay.protocol.auth import KeyFormatError, check_key, normalize_origin, parse_keys_file
from stag_relay.protocol.exchange import check_field
from stag_relay.service.tls import TlsError, server_context

# --- durations ---------------------------------------------------------------

# unit -> (multiplier, divisor): milliseconds divide by 1000 rather than
# multiply by 0.001 so that "100ms" is exactly the float 0.1.
_UNITS: Final[dict[str, tuple[int, int]]] = {
    "h": (3600, 1),
    "m": (60, 1),
    "s": (1, 1),
    "ms": (1, 1000),
}
_NUMBER: Final = r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
# "ms" before "m" so that "5ms" is not read as five minutes and an "s".
_UNIT: Final = r"(?:ms|h|m|s)"
_PLAIN_RE: Final = re.compile(_NUMBER)
# Compound forms ("1m30s") because the Go relay's config used Go durations.
_DURATION_RE: Final = re.compile(rf"(?:{_NUMBER}{_UNIT})+")
_PART_RE: Final = re.compile(rf"({_NUMBER})({_UNIT})")
_DURATION_HINT: Final = "use e.g. 100ms, 10s, 5m"


def parse_duration(text: str | int | float) -> float:
    """Seconds in `text`: "100ms", "10s", "5m", "1h", "1m30s", or a plain number of seconds.

    Raises ValueError, with a message fit for a person, for anything negative,
    not finite, or not a duration.
    """
    invalid = ValueError(f"invalid duration {text!r} ({_DURATION_HINT})")
    seconds: float
    # bool is an int subclass, and `timeout: true` is a mistake, not one second.
    if isinstance(text, bool):
        raise invalid
    if isinstance(text, int | float):
        try:
            seconds = float(text)
        except OverflowError:
            raise invalid from None
    elif isinstance(text, str):
        stripped = text.strip()
        if _PLAIN_RE.fullmatch(stripped):
            seconds = float(stripped)
        elif _DURATION_RE.fullmatch(stripped):
            seconds = 0.0
            for number, unit in _PART_RE.findall(stripped):
                multiplier, divisor = _UNITS[unit]
                seconds += float(number) * multiplier / divisor
        else:
            raise invalid
    else:
        raise invalid
    if not math.isfinite(seconds) or seconds < 0:
        raise invalid
    return seconds


def duration_argument(text: str) -> float:
    """``parse_duration`` for argparse (``type=``): a bad value is a usage error."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_duration(seconds: float) -> str:
    """The shortest of "1h", "5m", "10s", "100ms" that parses back to exactly `seconds`.

    Falls back to decimal seconds ("1.5s", "0.00001s"), never an exponent, so
    parse_duration(format_duration(x)) == x for every finite x >= 0.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration")
    if seconds == 0:
        return "0s"
    for unit, (multiplier, divisor) in _UNITS.items():
        count = seconds * divisor / multiplier
        if count >= 1 and count == int(count):
            text = f"{int(count)}{unit}"
            if parse_duration(text) == seconds:
                return text
    # repr gives the shortest digits that round-trip; Decimal prints them positionally.
    return f"{Decimal(repr(float(seconds))):f}s"


# --- URLs ----------------------------------------------------------------------

# Userinfo is everything up to the last "@" before the path; the scheme is
# optional so that a scheme-less "user:secret@host" is redacted as well.
_USERINFO_RE: Final = re.compile(r"^(?P<head>(?:[A-Za-z][A-Za-z0-9+.\-]*:)?//)?[^/?#]*@")


def redact_url(url: str) -> str:
    """`url` without its userinfo (user name and password), for logs and /status."""
    return _USERINFO_RE.sub(lambda match: match.group("head") or "", url, count=1)


def _mask_url(url: str) -> str:
    # Unlike redact_url, shows that credentials are configured.
    return _USERINFO_RE.sub(lambda match: (match.group("head") or "") + "***@", url, count=1)


# --- field rules ---------------------------------------------------------------


class _Text(str):
    """A value that arrived as text (environment, flag) and is parsed per the field's type.

    YAML already types its scalars, so there `max_size: "5"` stays a mistake;
    RELAY_BATCH_MAX_SIZE=5 can only ever be a string.
    """

    __slots__ = ()


Rule = Callable[[object], object]
_RULE: Final = "stag_relay.config.rule"
_INT_RE: Final = re.compile(r"[+-]?[0-9]+")


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _show(value: object) -> str:
    if value is None:
        return "nothing (give a value, or remove the key to use the default)"
    return repr(value)


def _integer(value: object, *, text_ok: bool) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (text_ok or isinstance(value, _Text)):
        stripped = value.strip()
        if _INT_RE.fullmatch(stripped):
            return int(stripped)
    return None


def _positive_int(value: object) -> int:
    number = _integer(value, text_ok=False)
    if number is None or number <= 0:
        raise ValueError(f"expected a positive integer, got {_show(value)}")
    return number


def _port(value: object) -> int:
    # A numeric string is fine from any source: the Go relay's config had port: "8081".
    number = _integer(value, text_ok=True)
    # 0 asks the OS for a free port, which the tests rely on.
    if number is None or not 0 <= number <= 65535:
        raise ValueError(f"expected a port number 0..65535, got {_show(value)}")
    return number


def available_cpus() -> int:
    """CPUs this process may use: its affinity (taskset, cpusets), lowered to a cgroup
    CPU quota (a container's limit) when there is one, rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota is not None else cpus


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup may use, or None without a limit."""
    try:
        # cgroup v2: "max 100000" (no limit) or "<quota> <period>".
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        # cgroup v1: -1 when there is no limit.
        v1 = root / "cpu"
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        period_us = int((v1 / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


# More worker processes than this is a typo (2000 for 200), not a machine.
_MAX_WORKERS: Final = 256


def _workers(value: object) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return available_cpus()
    number = _integer(value, text_ok=True)
    if number is None or not 1 <= number <= _MAX_WORKERS:
        raise ValueError(
            f"expected a number of worker processes 1..{_MAX_WORKERS} or auto "
            f"(one per CPU), got {_show(value)}"
        )
    return number


def _duration(value: object) -> float:
    if not isinstance(value, str | int | float):
        raise ValueError(f"invalid duration {_show(value)} ({_DURATION_HINT})")
    seconds = parse_duration(value)
    # Zero would make a timer fire in a busy loop (heartbeat, retry, batch timeout).
    if seconds == 0:
        raise ValueError(f"expected a duration greater than zero, got {_show(value)}")
    return seconds


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {_show(value)} (put it in quotes)")
    return str(value)


def _secret(value: object) -> str:
    # Never echo the value: a mistyped key is still a key.
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {_kind(value)} (put it in quotes)")
    try:
        # It goes in a header: a trailing newline from a secrets file would make every
        # request fail.
        check_field(b"x-api-key", value.encode())
    except ValueError:
        raise ValueError(
            "the key holds a NUL or a line break, or starts or ends with whitespace "
            "(it is not shown); remove them"
        ) from None
    return str(value)


def _one_of(*choices: str) -> Rule:
    def rule(value: object) -> str:
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value.strip().lower(), choices, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
        raise ValueError(f"expected one of {', '.join(choices)}, got {_show(value)}{hint}")

    return rule


def _http_url(value: object) -> str:
    text = _text(value).strip()
    try:
        parts = urlsplit(text)
        # .port parses lazily; reading it raises ValueError for "host:eighty".
        _ = parts.port
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(
            f"expected an http:// or https:// URL with a host, got {redact_url(text)!r}"
        )
    return text


def _ingest_path(value: object) -> str:
    """A path starting with "/", or empty for the output format's own."""
    return "" if _text(value) == "" else _url_path(value)


def _url_path(value: object) -> str:
    text = _text(value)
    if not text.startswith("/"):
        raise ValueError(f"expected a path starting with '/', got {_show(value)}")
    return text


_TRUE: Final = ("true", "yes", "on", "1")
_FALSE: Final = ("false", "no", "off", "0")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    # Only the environment and flags give text; in YAML `"true"` in quotes is a mistake.
    if isinstance(value, _Text) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {_show(value)}")


def _readable_file(value: object) -> str:
    # Empty means "not configured"; anything else must be a file we can read now,
    # so that a typo is a configuration error at start, not a failure at first use.
    path = _text(value).strip()
    if path:
        try:
            with open(path, "rb") as file:
                file.read(1)
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return path


def _items(value: object) -> list[object]:
    # A YAML list, or (environment, flags) text separated by commas.
    if isinstance(value, _Text):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list):
        return list(value)
    raise ValueError(f"expected a list, got {_kind(value)} (in YAML: one '- item' per line)")


def _api_keys(value: object) -> tuple[str, ...]:
    # Never echo a key, not even a malformed one: name its position instead.
    keys = []
    for number, item in enumerate(_items(value), start=1):
        if not isinstance(item, str):
            raise ValueError(f"key {number}: expected text, got {_kind(item)} (put it in quotes)")
        try:
            keys.append(check_key(item.strip(), f"key {number}"))
        except KeyFormatError as exc:
            raise ValueError(str(exc)) from None
    return tuple(keys)


def _keys_file(value: object) -> str:
    path = _readable_file(value)
    if path:
        try:
            parse_keys_file(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text") from None
        except KeyFormatError as exc:
            raise ValueError(f"{path} {exc}") from None
    return path


def _origins(value: object) -> tuple[str, ...]:
    origins = []
    for item in _items(value):
        origin = normalize_origin(item) if isinstance(item, str) else None
        if origin is None:
            raise ValueError(f"expected origins like https://app.example.com, got {_show(item)}")
        origins.append(origin)
    return tuple(origins)


def _rule(rule: Rule) -> dict[str, Rule]:
    return {_RULE: rule}


_DURATION: Final = _rule(_duration)


# --- schema --------------------------------------------------------------------


@attrs.frozen
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = attrs.field(default=8081, metadata=_rule(_port))
    # Slow-loris guard: a client must finish its request head within this.
    handshake_timeout: float = attrs.field(default=10.0, metadata=_DURATION)
    # From SIGTERM to exit: time to flush what the relay holds to STAG.
    shutdown_timeout: float = attrs.field(default=10.0, metadata=_DURATION)
    # Open WebSocket connections at most; beyond it an upgrade gets 503. Each one holds
    # a few tasks and buffers: size it to what the host can serve, not to hope.
    max_connections: int = 10_000
    # PEM certificate chain and private key: both set serves wss:// and https://.
    tls_cert: str = attrs.field(default="", metadata=_rule(_readable_file))
    tls_key: str = attrs.field(default="", metadata=_rule(_readable_file))
    # Processes that each run the whole pipeline on the same port (SO_REUSEPORT);
    # "auto" is one per CPU. 1 runs a single process with no supervisor.
    workers: int = attrs.field(default=1, metadata=_rule(_workers))
    # With workers > 1: a worker whose event loop has not answered the supervisor for
    # this long is hung (a blocking call, a deadlock) and is killed and started again.
    # Far beyond any pause of a loaded loop; short enough that its clients notice little.
    worker_timeout: float = attrs.field(default=30.0, metadata=_DURATION)


@attrs.frozen
class AuthConfig:
    # Keys that open the WebSocket; repr masks them so a logged Config does not leak them.
    api_keys: tuple[str, ...] = attrs.field(
        default=(), metadata=_rule(_api_keys), repr=lambda keys: f"<{len(keys)} keys>"
    )
    # A file of keys, one per line, re-read on SIGHUP.
    api_keys_file: str = attrs.field(default="", metadata=_rule(_keys_file))
    # /status and /metrics need a key too (/health never does).
    protect_endpoints: bool = attrs.field(default=False, metadata=_rule(_boolean))


# Where both public STAGs take SpatialEvents: the ingest path of stag.format spatial-event.
BATCH_INGEST_PATH: Final = "/ingest"
SPATIAL_EVENT_INGEST_PATH: Final = "/api/v1/ingest"


def format_ingest_path(stag_format: str) -> str:
    """Where each ``stag.format`` is POSTed unless ``stag.ingest_path`` says otherwise."""
    return SPATIAL_EVENT_INGEST_PATH if stag_format == "spatial-event" else BATCH_INGEST_PATH


@attrs.frozen
class StagConfig:
    # repr masks credentials so a logged Config does not leak them.
    url: str = attrs.field(
        default="http://localhost:8080",
        metadata=_rule(_http_url),
        repr=lambda url: repr(_mask_url(url)),
    )
    # batch: the relay's own batches; spatial-event: one SpatialEvent per session of a
    # batch, what tabularxr/stag and tabularxr/Stag ingest.
    format: str = attrs.field(default="batch", metadata=_rule(_one_of("batch", "spatial-event")))
    # Unset or empty, the format's own: /ingest for batch, /api/v1/ingest for
    # spatial-event (an empty value is resolved in _structure).
    ingest_path: str = attrs.field(metadata=_rule(_ingest_path))

    @ingest_path.default
    def _format_ingest_path(self) -> str:
        return format_ingest_path(self.format)

    timeout: float = attrs.field(default=10.0, metadata=_DURATION)
    api_key: str = attrs.field(
        default="", metadata=_rule(_secret), repr=lambda key: "'***'" if key else "''"
    )
    max_in_flight: int = 4
    retry_initial: float = attrs.field(default=0.1, metadata=_DURATION)
    retry_max: float = attrs.field(default=10.0, metadata=_DURATION)
    # Empty: host name + a boot id, chosen at start.
    relay_id: str = ""


@attrs.frozen
class WebSocketConfig:
    # Capacity, in events, of the channel between connections and the batcher.
    buffer_size: int = 1024
    heartbeat_interval: float = attrs.field(default=30.0, metadata=_DURATION)
    max_message_size: int = 8 * 1024 * 1024
    # Per connection: 4x a 60 Hz pose stream, headroom for pose and mesh together. A
    # faster client is read more slowly, never refused.
    max_packets_per_second: int = 240
    # Invalid packets in a row that close a connection with 1008.
    max_invalid_packets: int = 100
    # Browser origins that may connect; empty lets any in.
    allowed_origins: tuple[str, ...] = attrs.field(default=(), metadata=_rule(_origins))


@attrs.frozen
class BatchConfig:
    max_size: int = 5
    timeout: float = attrs.field(default=0.1, metadata=_DURATION)


@attrs.frozen
class SessionConfig:
    ttl: float = attrs.field(default=300.0, metadata=_DURATION)
    max_sessions: int = 100_000


@attrs.frozen
class LogConfig:
    level: str = attrs.field(
        default="info", metadata=_rule(_one_of("debug", "info", "warning", "error"))
    )
    format: str = attrs.field(default="auto", metadata=_rule(_one_of("auto", "json", "console")))


@attrs.frozen
class DeliveryConfig:
    # SQLite spool file; empty keeps undelivered batches in memory only.
    spool_path: str = ""
    # 1 GiB: hours of a busy relay's traffic, a fraction of any server's disk.
    spool_max_bytes: int = 1024**3
    # block: backpressure reaches the clients; drop_oldest: oldest batches are dropped.
    when_full: str = attrs.field(default="block", metadata=_rule(_one_of("block", "drop_oldest")))
    # 64 MiB of batches STAG refused, kept for inspection and requeueing.
    dead_letter_max_bytes: int = 64 * 1024**2


@attrs.frozen
class MeshConfig:
    # Per mesh packet; more is an invalid packet (memory and CPU bound per client).
    max_vertices: int = 1_000_000
    max_faces: int = 2_000_000
    # A full mesh at least every N updates of an anchor, so a lost base heals.
    keyframe_interval: int = 30
    # Worker processes that decode and diff (a crash in Draco costs one packet).
    workers: int = 2
    # Meshes held as diff bases, all anchors and workers (least recently used go).
    max_state_bytes: int = 256 * 1024**2


@attrs.frozen
class Config:
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    stag: StagConfig = StagConfig()
    websocket: WebSocketConfig = WebSocketConfig()
    batch: BatchConfig = BatchConfig()
    session: SessionConfig = SessionConfig()
    log: LogConfig = LogConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    mesh: MeshConfig = MeshConfig()


class ConfigError(Exception):
    """Configuration a person must fix; its message says what and where.

    Several problems may be reported at once, one per line of the message.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems: tuple[str, ...] = problems


@attrs.frozen
class LoadedConfig:
    config: Config
    # The YAML file that was read, or None when only defaults and overrides apply.
    source: str | None


# --- schema tables ---------------------------------------------------------------


def _section_classes() -> dict[str, type[Any]]:
    sections: dict[str, type[Any]] = {}
    for field in attrs.fields(attrs.resolve_types(Config)):
        assert field.type is not None  # resolve_types filled it in
        sections[field.name] = field.type
    return sections


# Section name -> its attrs class, in schema order.
_SECTIONS: Final = _section_classes()


def _field_rule(field: attrs.Attribute[Any]) -> Rule:
    rule = field.metadata.get(_RULE)
    if rule is not None:
        return rule  # type: ignore[no-any-return]
    if field.type is int:
        return _positive_int
    if field.type is str:
        return _text
    # A float without a rule would silently accept anything float() does.
    raise TypeError(f"config field {field.name} ({field.type}) needs a rule in its metadata")


# Dotted key ("batch.max_size") -> its rule, in schema order.
_RULES: Final[dict[str, Rule]] = {
    f"{section}.{field.name}": _field_rule(field)
    for section, cls in _SECTIONS.items()
    for field in attrs.fields(attrs.resolve_types(cls))
}
_ENV_PREFIX: Final = "RELAY_"
# Names the config file, not a key; see load_config.
_ENV_CONFIG: Final = "RELAY_CONFIG"
_ENV_NAMES: Final[dict[str, str]] = {
    _ENV_PREFIX + key.replace(".", "_").upper(): key for key in _RULES
}
# The command-line flags the CLI maps onto keys, so errors name the flag typed.
FLAG_NAMES: Final[dict[str, str]] = {
    "server.host": "--host",
    "server.port": "--port",
    "log.level": "--log-level",
}
# Searched in this order when neither --config nor RELAY_CONFIG names a file.
DEFAULT_CONFIG_PATHS: Final = (Path("relay.yaml"), Path("/etc/stag-relay/relay.yaml"))


def _build_converter() -> cattrs.Converter:
    # detailed_validation collects every failing field instead of stopping at the first.
    converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=True)
    for section, cls in _SECTIONS.items():

        def hook(rule: Rule) -> Callable[[object, object], object]:
            return lambda value, _type: rule(value)

        overrides: dict[str, Any] = {
            field.name: override(struct_hook=hook(_RULES[f"{section}.{field.name}"]))
            for field in attrs.fields(cls)
        }
        converter.register_structure_hook(cls, make_dict_structure_fn(cls, converter, **overrides))
    return converter


_CONVERTER: Final = _build_converter()


# --- layering ------------------------------------------------------------------


@attrs.frozen
class _Setting:
    value: object
    # "relay.yaml line 12", "RELAY_BATCH_TIMEOUT", "--port"
    where: str
    # An environment variable or a flag already names the key.
    names_key: bool

    def describe(self, key: str) -> str:
        return self.where if self.names_key else f"{self.where}: {key}"


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _suggest_key(section: str, key: str) -> str:
    prefix = section + "."
    same_section = [dotted.removeprefix(prefix) for dotted in _RULES if dotted.startswith(prefix)]
    close = difflib.get_close_matches(key, same_section, n=1)
    if close:
        return f"; did you mean {section}.{close[0]}?"
    # The right key in the wrong section: "batch.buffer_size" -> websocket.buffer_size.
    elsewhere = [dotted for dotted in _RULES if dotted.partition(".")[2] == key]
    if elsewhere:
        return f"; did you mean {elsewhere[0]}?"
    return _suggest(f"{section}.{key}", list(_RULES))


def _plain(value: object) -> object:
    # The round-trip loader's scalar subclasses carry formatting we do not want;
    # ScalarBoolean in particular is an int, not a bool.
    if isinstance(value, bool):
        return value
    if isinstance(value, ScalarBoolean):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _line(mapping: object, key: object) -> int:
    return int(mapping.lc.key(key)[0]) + 1  # type: ignore[attr-defined]


def _read_yaml(path: str) -> tuple[dict[str, _Setting], list[str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read the config file: it is not UTF-8 text") from None
    # The round-trip loader is as safe as typ="safe" (it never builds arbitrary
    # objects from tags) and, unlike it, records the line of every key.
    try:
        document = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path} line {mark.line + 1}" if mark is not None else path
        what = exc.problem or exc.context
        if exc.problem and exc.context:
            what = f"{exc.problem} ({exc.context})"
        raise ConfigError(f"{where}: invalid YAML: {what}") from None
    except YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None

    settings: dict[str, _Setting] = {}
    problems: list[str] = []
    if document is None:  # an empty file, or one with only comments
        return settings, problems
    if not isinstance(document, dict):
        problems.append(
            f"{path} line 1: expected a mapping of sections ({', '.join(_SECTIONS)}), "
            f"got {_show(_plain(document))}"
        )
        return settings, problems
    for section, body in document.items():
        where = f"{path} line {_line(document, section)}"
        if section not in _SECTIONS:
            name = str(section)
            if name in _RULES:
                head, _, tail = name.partition(".")
                hint = f"; write it nested: '{head}:' and under it '  {tail}: ...'"
            else:
                hint = _suggest(name, list(_SECTIONS))
            problems.append(f"{where}: {name}: unknown section{hint}")
            continue
        # A section whose keys are all commented out is empty, not wrong.
        if body is None:
            continue
        if not isinstance(body, dict):
            got = _show(_plain(body))
            problems.append(f"{where}: {section}: expected a mapping of keys under it, got {got}")
            continue
        for key, value in body.items():
            where = f"{path} line {_line(body, key)}"
            dotted = f"{section}.{key}"
            if dotted not in _RULES:
                problems.append(f"{where}: {dotted}: unknown key{_suggest_key(section, str(key))}")
            elif isinstance(value, TaggedScalar):
                problems.append(f"{where}: {dotted}: YAML tags are not supported here")
            else:
                settings[dotted] = _Setting(_plain(value), where, names_key=False)
    return settings, problems


def _looks_like_ours(name: str) -> bool:
    # Other software may own RELAY_HOME and the like; only a name in one of our
    # sections or one close to a real key is taken for a typo.
    if any(name.startswith(f"{_ENV_PREFIX}{section.upper()}_") for section in _SECTIONS):
        return True
    return bool(difflib.get_close_matches(name, list(_ENV_NAMES), n=1, cutoff=0.8))


def _read_environ(environ: Mapping[str, str]) -> tuple[dict[str, _Setting], list[str]]:
    settings: dict[str, _Setting] = {}
    problems: list[str] = []
    for name in sorted(environ):
        if not name.startswith(_ENV_PREFIX) or name == _ENV_CONFIG:
            continue
        key = _ENV_NAMES.get(name)
        if key is not None:
            settings[key] = _Setting(_Text(environ[name]), name, names_key=True)
        elif _looks_like_ours(name):
            problems.append(f"{name}: unknown setting{_suggest(name, list(_ENV_NAMES))}")
    return settings, problems


def _read_overrides(overrides: Mapping[str, object]) -> tuple[dict[str, _Setting], list[str]]:
    settings: dict[str, _Setting] = {}
    problems: list[str] = []
    for key, value in overrides.items():
        # argparse leaves a flag that was not given as None.
        if value is None:
            continue
        where = FLAG_NAMES.get(key, f"override {key}")
        if key not in _RULES:
            section, _, name = key.partition(".")
            hint = _suggest_key(section, name) if name else _suggest(key, list(_RULES))
            problems.append(f"{where}: unknown key{hint}")
            continue
        # Flags are text, like environment variables, whatever type argparse gave them.
        raw = _Text(value) if isinstance(value, str) else value
        settings[key] = _Setting(raw, where, names_key=True)
    return settings, problems


def _failures(
    exc: BaseException, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], BaseException]]:
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for inner, note in with_notes:
            yield from _failures(inner, (*path, note.name))
        for inner in without:
            yield from _failures(inner, path)
    else:
        yield path, exc


def _structure(settings: Mapping[str, _Setting], problems: list[str]) -> Config | None:
    """The Config for `settings`, or None with what is wrong appended to `problems`."""
    raw: dict[str, dict[str, object]] = {}
    for key, setting in settings.items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = setting.value

    def describe(key: str) -> str:
        setting = settings.get(key)
        return setting.describe(key) if setting is not None else key

    try:
        config = _CONVERTER.structure(raw, Config)
    except ClassValidationError as exc:
        problems.extend(f"{describe('.'.join(path))}: {error}" for path, error in _failures(exc))
        return None
    stag = config.stag
    # Backoff grows from retry_initial up to retry_max; the other way round is a typo.
    if stag.retry_initial > stag.retry_max:
        maximum = settings.get("stag.retry_max")
        problems.append(
            f"{describe('stag.retry_initial')}: {format_duration(stag.retry_initial)} is longer"
            f" than stag.retry_max, {format_duration(stag.retry_max)}"
            f" ({maximum.where if maximum else 'default'}); make retry_initial <= retry_max"
        )
        return None
    if not stag.ingest_path:
        path = format_ingest_path(stag.format)
        config = attrs.evolve(config, stag=attrs.evolve(stag, ingest_path=path))
    tls_problem = _check_tls(config.server, describe)
    if tls_problem is not None:
        problems.append(tls_problem)
        return None
    return config


def _check_tls(server: ServerConfig, describe: Callable[[str], str]) -> str | None:
    # Each path was found readable on its own; here they must form a pair that loads.
    if bool(server.tls_cert) != bool(server.tls_key):
        given, missing = ("tls_cert", "tls_key") if server.tls_cert else ("tls_key", "tls_cert")
        return f"{describe('server.' + given)}: set server.{missing} as well, or neither"
    if server.tls_cert:
        try:
            server_context(server.tls_cert, server.tls_key)
        except TlsError as exc:
            return f"{describe('server.tls_cert')} and server.tls_key: {exc}"
    return None


def _choose_file(
    config_path: str | None, environ: Mapping[str, str], search_default_paths: bool
) -> str | None:
    explicit: tuple[str, str] | None = None
    if config_path is not None:
        explicit = (config_path, "--config")
    elif environ.get(_ENV_CONFIG):
        explicit = (environ[_ENV_CONFIG], _ENV_CONFIG)
    if explicit is not None:
        path, how = explicit
        if not Path(path).exists():
            raise ConfigError(f"{how}: config file {path} does not exist")
        return path
    if search_default_paths:
        for candidate in DEFAULT_CONFIG_PATHS:
            if candidate.is_file():
                return str(candidate)
    return None


def load_config(
    *,
    config_path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    search_default_paths: bool = True,
) -> LoadedConfig:
    """The effective configuration: defaults < YAML file < environment < overrides.

    The file is `config_path`, else $RELAY_CONFIG, else the first of
    DEFAULT_CONFIG_PATHS that exists (when `search_default_paths`), else none.
    `environ` defaults to os.environ. `overrides` maps dotted keys to flag
    values ({"server.port": 9000}); a None value means the flag was not given.
    Raises ConfigError listing every problem found, one per line.
    """
    if environ is None:
        environ = os.environ
    source = _choose_file(config_path, environ, search_default_paths)
    settings: dict[str, _Setting] = {}
    problems: list[str] = []
    layers = [_read_environ(environ), _read_overrides(overrides or {})]
    if source is not None:
        layers.insert(0, _read_yaml(source))
    for layer_settings, layer_problems in layers:
        settings.update(layer_settings)
        problems.extend(layer_problems)

    config = _structure(settings, problems)
    if problems or config is None:
        raise ConfigError(*problems)
    return LoadedConfig(config=config, source=source)


def dump_config(config: Config) -> str:
    """YAML of `config`, loadable again, with secrets masked and durations as "100ms"."""
    document: dict[str, dict[str, object]] = {}
    for section in _SECTIONS:
        values = getattr(config, section)
        body: dict[str, object] = {}
        for field in attrs.fields(type(values)):
            value = getattr(values, field.name)
            rule = _RULES[f"{section}.{field.name}"]
            if rule is _duration:
                value = format_duration(value)
            elif rule is _secret:
                value = "***" if value else ""
            elif rule is _http_url:
                value = _mask_url(value)
            elif rule is _api_keys:
                value = ["***"] * len(value)
            if isinstance(value, tuple):
                value = list(value)
            body[field.name] = value
        document[section] = body
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    # Schema order reads like relay.yaml; sorting would scatter related keys.
    yaml.representer.sort_base_mapping_type_on_output = False
    stream = StringIO()
    yaml.dump(document, stream)
    return stream.getvalue()

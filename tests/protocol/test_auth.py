"""Keys and origins as pure policy (auth.py), and their configuration keys."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stag_relay.pipeline.access import AccessControl
from stag_relay.protocol.auth import (
    FORBIDDEN_ORIGIN,
    UNAUTHORIZED,
    ApiKeys,
    KeyFormatError,
    OriginPolicy,
    check_endpoint,
    check_key,
    check_upgrade,
    normalize_origin,
    parse_keys_file,
    presented_keys,
)
from stag_relay.service.config import Config, ConfigError, dump_config, load_config
from stag_relay.service.metrics import RelayMetrics

KEYS = ApiKeys.of(["k-one", "k-two"])
ANY_ORIGIN = OriginPolicy()


def load(environ: dict[str, str], yaml: Path | None = None) -> Config:
    return load_config(
        config_path=str(yaml) if yaml else None, environ=environ, search_default_paths=False
    ).config


# --- keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "accepted"),
    [
        ([], False),
        ([("x-api-key", "k-one")], True),
        ([("x-api-key", "k-two")], True),
        ([("x-api-key", " k-one ")], True),
        ([("x-api-key", "k-one2")], False),
        ([("x-api-key", "k-on")], False),
        ([("x-api-key", "")], False),
        ([("authorization", "Bearer k-one")], True),
        ([("authorization", "bearer k-two")], True),
        ([("authorization", "BEARER   k-one")], True),
        ([("authorization", "Bearer wrong")], False),
        ([("authorization", "Basic k-one")], False),
        ([("authorization", "k-one")], False),
        ([("authorization", "Bearer k-one extra")], False),
        # Any one valid credential is enough.
        ([("x-api-key", "wrong"), ("authorization", "Bearer k-two")], True),
        # Other headers carrying the key do not count.
        ([("api-key", "k-one"), ("cookie", "k-one")], False),
    ],
)
def test_key_header_forms(headers: list[tuple[str, str]], accepted: bool) -> None:
    assert KEYS.accepts(presented_keys(headers)) is accepted
    assert (check_endpoint(headers, KEYS) is None) is accepted


def test_no_keys_configured_is_open_and_configured_but_empty_is_closed() -> None:
    assert ApiKeys.of([]).accepts([])
    assert not ApiKeys.of([], required=True).accepts(["anything"])
    assert not ApiKeys.of([], required=True).accepts([])


@settings(max_examples=200)
@given(st.lists(st.from_regex(r"[\x21-\x2b\x2d-\x7e]{1,64}", fullmatch=True), min_size=1))
def test_every_configured_key_is_accepted_and_nothing_else(keys: list[str]) -> None:
    ring = ApiKeys.of(keys)
    for key in keys:
        assert ring.accepts([key])
        assert ring.accepts(presented_keys([("authorization", f"Bearer {key}")]))
        if key + "x" not in keys:
            assert not ring.accepts([key + "x"])


def test_an_oversized_header_is_refused_without_hashing() -> None:
    huge = "k" * 5000
    assert not ApiKeys.of(["k-one"]).accepts([huge])


def test_keys_file_format() -> None:
    text = "# production keys\n\n  key-a  \n#key-b disabled\nkey-#c\n"
    assert parse_keys_file(text) == ("key-a", "key-#c")


@pytest.mark.parametrize("bad", ["two words", "naïve", "a,b", "x" * 2000])
def test_unusable_key_is_reported_by_line_without_echoing_it(bad: str) -> None:
    with pytest.raises(KeyFormatError) as caught:
        parse_keys_file(f"good\n{bad}\n")
    assert "line 2" in str(caught.value)
    assert bad not in str(caught.value)
    with pytest.raises(KeyFormatError):
        check_key(bad, "key 1")


# --- origins ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "normal"),
    [
        ("https://app.example.com", "https://app.example.com"),
        ("HTTPS://App.Example.COM:443/", "https://app.example.com"),
        ("http://localhost:80", "http://localhost"),
        ("http://localhost:8080", "http://localhost:8080"),
        ("https://[::1]:8443", "https://[::1]:8443"),
        ("null", "null"),
        ("app.example.com", None),
        ("https://app.example.com/path", None),
        ("https://user@app.example.com", None),
        ("https://app.example.com:port", None),
        ("", None),
    ],
)
def test_origin_normalisation(origin: str, normal: str | None) -> None:
    assert normalize_origin(origin) == normal


def test_origin_policy() -> None:
    policy = OriginPolicy.of(["https://app.example.com", "http://localhost:3000"])
    assert policy.allows(None), "native clients send no Origin"
    assert policy.allows("https://app.example.com")
    assert policy.allows("https://APP.example.com:443")
    assert policy.allows("http://localhost:3000")
    assert not policy.allows("http://app.example.com")
    assert not policy.allows("https://evil.example.com")
    assert not policy.allows("null")
    assert not policy.allows("garbage")
    assert ANY_ORIGIN.allows("https://evil.example.com")


def test_upgrade_checks_the_key_before_the_origin() -> None:
    origins = OriginPolicy.of(["https://app.example.com"])
    good_key = [("x-api-key", "k-one")]
    assert check_upgrade(good_key, KEYS, origins) is None
    assert check_upgrade([*good_key, ("origin", "https://app.example.com")], KEYS, origins) is None
    assert check_upgrade([*good_key, ("origin", "https://evil.com")], KEYS, origins) is (
        FORBIDDEN_ORIGIN
    )
    assert check_upgrade([("origin", "https://evil.com")], KEYS, origins) is UNAUTHORIZED
    two = [*good_key, ("origin", "https://app.example.com"), ("origin", "https://evil.com")]
    assert check_upgrade(two, KEYS, origins) is FORBIDDEN_ORIGIN
    assert UNAUTHORIZED.status == 401
    assert dict(UNAUTHORIZED.headers)["www-authenticate"].startswith("Bearer")
    assert FORBIDDEN_ORIGIN.status == 403


# --- configuration ------------------------------------------------------------------


def test_api_keys_from_environment_are_comma_separated_and_from_yaml_a_list(
    tmp_path: Path,
) -> None:
    config = load({"RELAY_AUTH_API_KEYS": " k-one, k-two ,,"})
    assert config.auth.api_keys == ("k-one", "k-two")
    yaml = tmp_path / "relay.yaml"
    yaml.write_text("auth:\n  api_keys:\n    - k-one\n    - k-two\n", encoding="utf-8")
    assert load({}, yaml).auth.api_keys == ("k-one", "k-two")
    yaml.write_text('auth:\n  api_keys: "k-one,k-two"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 2: auth\.api_keys: expected a list"):
        load({}, yaml)


def test_bad_api_key_is_named_by_position_never_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"RELAY_AUTH_API_KEYS": "fine,sec ret"})
    assert "RELAY_AUTH_API_KEYS: key 2" in str(caught.value)
    assert "sec ret" not in str(caught.value)
    yaml = tmp_path / "relay.yaml"
    yaml.write_text("auth:\n  api_keys:\n    - 12345\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="key 1: expected text, got a number"):
        load({}, yaml)


def test_keys_file_must_be_readable_and_well_formed(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="RELAY_AUTH_API_KEYS_FILE: cannot read"):
        load({"RELAY_AUTH_API_KEYS_FILE": str(missing)})
    bad = tmp_path / "keys"
    bad.write_text("ok-key\nnot ok\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2") as caught:
        load({"RELAY_AUTH_API_KEYS_FILE": str(bad)})
    assert "not ok" not in str(caught.value)


def test_origins_and_booleans(tmp_path: Path) -> None:
    config = load(
        {
            "RELAY_WEBSOCKET_ALLOWED_ORIGINS": "https://A.example:443,http://b.example:8080",
            "RELAY_AUTH_PROTECT_ENDPOINTS": "yes",
        }
    )
    assert config.websocket.allowed_origins == (
        "https://a.example",
        "http://b.example:8080",
    )
    assert config.auth.protect_endpoints is True
    with pytest.raises(ConfigError, match="RELAY_WEBSOCKET_ALLOWED_ORIGINS: expected origins"):
        load({"RELAY_WEBSOCKET_ALLOWED_ORIGINS": "a.example"})
    with pytest.raises(ConfigError, match="RELAY_AUTH_PROTECT_ENDPOINTS: expected true or false"):
        load({"RELAY_AUTH_PROTECT_ENDPOINTS": "maybe"})
    yaml = tmp_path / "relay.yaml"
    yaml.write_text('auth:\n  protect_endpoints: "true"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="expected true or false"):
        load({}, yaml)


def test_dump_masks_every_api_key() -> None:
    config = load({"RELAY_AUTH_API_KEYS": "first-secret,second-secret"})
    text = dump_config(config)
    assert "secret" not in text
    assert "api_keys:\n  - '***'\n  - '***'\n" in text
    assert "first-secret" not in repr(config)


# --- the keys in force (access.py) ---------------------------------------------------


def access_for(tmp_path: Path, text: str | None, **auth: object) -> tuple[AccessControl, Path]:
    path = tmp_path / "keys"
    if text is not None:
        path.write_text(text, encoding="utf-8")
        auth["api_keys_file"] = str(path)
    config = attrs.evolve(Config().auth, **auth)
    return AccessControl(config, (), RelayMetrics()), path


def test_an_empty_keys_file_locks_everyone_out(tmp_path: Path) -> None:
    access, _ = access_for(tmp_path, "# nothing yet\n")
    assert access.keys.required
    assert not access.keys.accepts(["anything"])


def test_reload_swaps_the_keys_and_a_broken_file_keeps_them(tmp_path: Path) -> None:
    access, path = access_for(tmp_path, "old-key\n", api_keys=("config-key",))
    assert access.keys.accepts(["old-key"]) and access.keys.accepts(["config-key"])
    path.write_text("new-key\n", encoding="utf-8")
    assert access.reload() == "API keys reloaded: 2"
    assert access.keys.accepts(["new-key"]) and not access.keys.accepts(["old-key"])
    assert access.keys.accepts(["config-key"])
    path.write_text("new-key\nnot a key\n", encoding="utf-8")
    assert access.reload() is not None
    assert access.keys.accepts(["new-key"])
    path.unlink()
    assert access.reload() is not None
    assert access.keys.accepts(["new-key"])


def test_reload_without_a_keys_file_does_nothing(tmp_path: Path) -> None:
    access, _ = access_for(tmp_path, None, api_keys=("config-key",))
    assert access.reload() is None
    assert access.keys.accepts(["config-key"])

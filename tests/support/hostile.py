"""Hostile clients for the security and fuzz tests.

- :class:`RawWebSocket`: a WebSocket client on a plain blocking socket, driven by
  wsproto, that sends exactly the bytes a test asks for and reads only when told
  (a client that never reads; frames no library would send).
- Hypothesis strategies: StreamKit packets wrong in every way (each field missing,
  null, of another type, out of range; deep nesting, huge numbers, NaN and
  Infinity literals, duplicate keys, invalid UTF-8), WebSocket frames of any shape,
  and raw bytes for the port before any handshake.
"""

from __future__ import annotations

import copy
import json
import socket
import struct
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    RejectConnection,
    Request,
    TextMessage,
)

# Longest a test waits on a socket before calling the relay stuck: far beyond any
# answer a passing test waits for, short enough that a failing one reports.
SOCKET_TIMEOUT = 30.0


class Rejected(Exception):
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(f"upgrade refused with {status}")
        self.status = status
        self.headers = {name.decode().lower(): value.decode() for name, value in headers}


class RawWebSocket:
    """A WebSocket client on a plain socket: the test decides every byte and every read."""

    def __init__(
        self,
        port: int,
        *,
        target: str = "/ws/streamkit",
        headers: Sequence[tuple[str, str]] = (),
        receive_buffer: int | None = None,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            # Before connect, so the window the relay sees is small from the start.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(SOCKET_TIMEOUT)
        self.sock.connect(("127.0.0.1", port))
        self.ws = WSConnection(ConnectionType.CLIENT)
        extra = [(name.encode(), value.encode()) for name, value in headers]
        self.sock.sendall(
            self.ws.send(Request(host="127.0.0.1", target=target, extra_headers=extra))
        )
        while True:
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    self.sock.close()
                    raise Rejected(event.status_code, list(event.headers))
            if not data:
                raise ConnectionError("the relay closed the connection during the handshake")

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=text)))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(self.ws.send(BytesMessage(data=data)))

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are: frames no library would produce."""
        self.sock.sendall(data)

    def read_until_closed(self) -> tuple[int | None, list[str | bytes], bytes]:
        """Read until the relay ends the connection: its close code (None without a
        close frame), the messages before it, and any bytes wsproto could not parse."""
        messages: list[str | bytes] = []
        code: int | None = None
        unparsed = b""
        parts: list[Any] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                break
            if unparsed:
                unparsed += data
                continue
            try:
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, TextMessage | BytesMessage):
                        parts.append(event.data)
                        if event.message_finished:
                            messages.append(
                                "".join(parts)
                                if isinstance(event, TextMessage)
                                else b"".join(parts)
                            )
                            parts = []
                    elif isinstance(event, CloseConnection):
                        code = event.code
            except Exception:  # anything wsproto cannot parse is reported, not raised
                unparsed = data
        self.sock.close()
        return code, messages, unparsed

    def close(self) -> None:
        self.sock.close()


# --- StreamKit packets, wrong in every way --------------------------------------------
#
# Two flavours of the same catalogue. ``hostile_messages()`` draws fresh values
# (any integer, float, text, nested JSON) and shrinks well; it costs milliseconds a
# message. ``compact_messages()`` picks every value from fixed pools of edge cases,
# a handful of choices a message, so that 10^4 of them take seconds.

# Values of every JSON type that sit on some edge; "NaN" and "Infinity" come out of
# json.dumps as bare literals, which is what a hostile client would send.
EDGE_SCALARS: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    2**63 - 1,
    2**63,
    -(2**63) - 1,
    2**64,
    10**400,
    -(10**400),
    float("nan"),
    float("inf"),
    float("-inf"),
    1e308,
    -0.0,
    5e-324,
    "",
    "\x00",
    "\u0085",
    "\ud800",
    "\udfff",
    "\ufeff",
    "x" * 200,
    "1",
    "1.5",
    "true",
    "null",
    [],
    {},
]
# Containers of edge values, some nested.
NESTED_VALUES: list[Any] = [
    [None],
    [0, 0, 0, 1],
    [0.0, 0.0, 0.0, float("nan")],
    [[0, 0, 0, 1]],
    {"pose": None},
    {"mesh": []},
    {"pose": {"x": 1, "y": 2, "z": 3, "rotation": [0, 0, 0, 1]}, "mesh": {}},
    {"": {"": {"": [{}]}}},
    {"x": {"y": {"z": [1, [2, [3, [4, [5]]]]]}}},
    [[[[[[[[[[[]]]]]]]]]]],
    list(range(100)),
    {str(n): n for n in range(50)},
]
NUMBER_EDGES: list[Any] = [
    0,
    -1,
    1,
    1.5,
    1000.0,
    1000.0000001,
    -1000.0000001,
    2**63,
    2**63 - 1,
    -(2**63),
    10**30,
]

# Per field (as a path), values that break its rule beyond "another type".
FIELD_WRONGS: dict[tuple[str, ...], list[Any]] = {
    ("session_id",): ["", "a" * 129, "a\x00b", "tab\there", "\x7f", "\u009f", "ok" * 64 + "!"],
    ("frame_number",): [-1, 2**63, 1.0, 1.9, "1", True, None],
    ("timestamp",): [0, -1, 1.5, "1634567890123", False, 2**70],
    ("type",): ["", "POSE", "mesh ", "sound", "pose\x00", None],
    ("data",): [{}, {"pose": {}}, {"mesh": {}}, [], "pose"],
    ("data", "pose"): [{}, [], {"x": 1}],
    ("data", "pose", "x"): [1000.5, -1e9, True, "1.0"],
    ("data", "pose", "y"): [1e309, -1e309, None],
    ("data", "pose", "z"): [float("nan"), float("inf"), [1.0]],
    ("data", "pose", "rotation"): [
        [],
        [0, 0, 1],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 2],
        [0, 0, 0, 0.94],
        [0, 0, 0, 1.05],
        [0, 0, 0, "1"],
        [0, 0, 0, True],
        [0, 0, 0, None],
    ],
    ("data", "mesh"): [{}, [], {"vertices": "AAAA"}],
    ("data", "mesh", "vertices"): ["", "not base64!", "AAE", "AA==AA==", "A" * 5, "\u00e9\u00e9=="],
    ("data", "mesh", "faces"): ["***", "AAE", 12, None],
    ("data", "mesh", "anchor_id"): ["", "a" * 129, "\x01"],
}
_PATHS = sorted(FIELD_WRONGS)
_DELETE = object()
# Everything a field can be set to in compact mode: its own wrongs, then any edge.
_WRONG_POOLS = {
    path: [_DELETE, *values, *EDGE_SCALARS, *NUMBER_EDGES, *NESTED_VALUES]
    for path, values in FIELD_WRONGS.items()
}


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the relay sends on ``sock`` until it closes (or resets) it."""
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


def _base_packets() -> list[dict[str, Any]]:
    """Valid packets of both types across the edges of every rule."""
    bases: list[dict[str, Any]] = []
    sessions = ["s", "session-123", "\u00e9-\U0001f600", "a" * 128]
    frames = [0, 1, 2**63 - 1]
    poses = [
        {"x": 0.0, "y": 0.0, "z": 0.0, "rotation": [0.0, 0.0, 0.0, 1.0]},
        {"x": 1000, "y": -1000.0, "z": 5e-324, "rotation": [0.5, 0.5, 0.5, 0.5]},
        {"x": -0.0, "y": 1.5, "z": 999.999, "rotation": [0, 0, 0.95, 0]},
    ]
    meshes = [
        {"vertices": "AAECAw==", "faces": "", "anchor_id": "anchor-1"},
        {"vertices": "AAAA", "faces": "AAAA", "anchor_id": "a" * 128},
    ]
    for n, session in enumerate(sessions):
        for frame in frames:
            bases.append(
                {
                    "session_id": session,
                    "frame_number": frame,
                    "timestamp": 1 + n,
                    "type": "pose",
                    "data": {"pose": dict(poses[(frame + n) % len(poses)])},
                }
            )
            bases.append(
                {
                    "session_id": session,
                    "frame_number": frame,
                    "timestamp": 2**53,
                    "type": "mesh",
                    "data": {"mesh": dict(meshes[(frame + n) % len(meshes)])},
                }
            )
    return bases


BASE_PACKETS = _base_packets()

# Fresh values of every JSON type, for the full flavour.
_scalars = st.one_of(
    st.sampled_from(EDGE_SCALARS),
    st.integers(),
    st.floats(),
    st.text(alphabet='ab\x00\u00e9\u2028\U0001f600\ud800"\\', max_size=8),
)
json_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(["", "a", "pose", "data", "x"]), children, max_size=4),
    ),
    max_leaves=6,
)


def valid_packets(session_id: str | None = None) -> st.SearchStrategy[dict[str, Any]]:
    sessions = (
        st.just(session_id)
        if session_id
        else st.text(alphabet="ab-_.:\u00e9\U0001f600", min_size=1, max_size=12)
    )
    coords = st.one_of(st.floats(-1000, 1000), st.sampled_from([-1000.0, 0.0, 1000, 5e-324]))
    pose = st.fixed_dictionaries(
        {
            "x": coords,
            "y": coords,
            "z": coords,
            "rotation": st.sampled_from([[0.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0, 0, 1, 0]]),
        }
    )
    mesh = st.fixed_dictionaries(
        {
            "vertices": st.sampled_from(["AAECAw==", "AAAA", "3q2+7w=="]),
            "faces": st.sampled_from(["", "AAAA"]),
            "anchor_id": st.text(alphabet="anchor-1\u00e9", min_size=1, max_size=8),
        }
    )
    head = {
        "session_id": sessions,
        "frame_number": st.integers(0, 2**63 - 1),
        "timestamp": st.integers(1, 2**53),
    }
    return st.one_of(
        st.fixed_dictionaries(
            {**head, "type": st.just("pose"), "data": st.builds(lambda p: {"pose": p}, pose)}
        ),
        st.fixed_dictionaries(
            {**head, "type": st.just("mesh"), "data": st.builds(lambda m: {"mesh": m}, mesh)}
        ),
    )


def _set(packet: Any, path: tuple[str, ...], value: Any) -> Any:
    if not isinstance(packet, dict):
        return packet
    head, *rest = path
    if not rest:
        if value is _DELETE:
            packet.pop(head, None)
        else:
            packet[head] = value
    elif head in packet:
        packet[head] = _set(packet[head], tuple(rest), value)
    return packet


def _nested(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


_SHAPES = [
    "broken",
    "broken",
    "broken",
    "valid",
    "json",
    "duplicate",
    "deep",
    "number",
    "literal",
    "utf8",
    "junk",
]
_DEPTHS = [2, 100, 1023, 1024, 1025, 5000, 20000]
_LITERALS = ["NaN", "Infinity", "-Infinity", "nan", "inf", "undefined", "+1", "01", ".5", "1."]
_BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80"]
_JUNK = [b"", b"\x00", b"{", b"}", b'{"', b"[1,", b"\xef\xbb\xbf{}", b" " * 1000, b"null" * 50]


def _messages(compact: bool) -> st.SearchStrategy[str | bytes]:
    if compact:
        packets: st.SearchStrategy[dict[str, Any]] = st.sampled_from(BASE_PACKETS).map(
            copy.deepcopy
        )
        # Copies: a later mutation must never write into the shared pools.
        values: st.SearchStrategy[Any] = st.sampled_from(EDGE_SCALARS + NESTED_VALUES).map(
            copy.deepcopy
        )

        def wrong(path: tuple[str, ...]) -> st.SearchStrategy[Any]:
            return st.sampled_from(_WRONG_POOLS[path]).map(
                lambda value: value if value is _DELETE else copy.deepcopy(value)
            )

        junk: st.SearchStrategy[bytes] = st.sampled_from(_JUNK)
    else:
        packets = valid_packets()
        values = json_values

        def wrong(path: tuple[str, ...]) -> st.SearchStrategy[Any]:
            return st.one_of(
                st.just(_DELETE),
                st.sampled_from(FIELD_WRONGS[path]).map(copy.deepcopy),
                json_values,
                st.sampled_from(NUMBER_EDGES),
            )

        junk = st.binary(max_size=300)

    @st.composite
    def message(draw: st.DrawFn) -> str | bytes:
        shape = draw(st.sampled_from(_SHAPES))
        text: str
        if shape == "broken":
            # One to three fields made wrong: missing, null, another type, out of range.
            packet = draw(packets)
            for _ in range(draw(st.integers(1, 3))):
                path = draw(st.sampled_from(_PATHS))
                packet = _set(packet, path, draw(wrong(path)))
            if draw(st.booleans()):
                packet["extra"] = draw(values)  # unknown fields are allowed
            text = json.dumps(packet)
        elif shape == "valid":
            text = json.dumps(draw(packets))
        elif shape == "json":
            text = json.dumps(draw(values))
        elif shape == "duplicate":
            packet = draw(packets)
            key = draw(st.sampled_from(sorted(packet)))
            body = json.dumps(packet)
            text = body[:-1] + f", {json.dumps(key)}: {json.dumps(draw(values))}}}"
        elif shape == "deep":
            inner = _nested(draw(st.sampled_from(_DEPTHS)), draw(st.sampled_from(["list", "dict"])))
            body = json.dumps(draw(packets))
            text = inner if draw(st.booleans()) else body[:-1] + f', "deep": {inner}}}'
        elif shape == "number":
            digits = draw(st.sampled_from([20, 309, 400, 5000]))
            literal = draw(
                st.sampled_from(
                    ["1" * digits, "-" + "9" * digits, f"1e{digits}", "0." + "0" * digits + "1"]
                )
            )
            packet = draw(packets)
            packet[draw(st.sampled_from(["frame_number", "timestamp", "data"]))] = "@@"
            text = json.dumps(packet).replace('"@@"', literal)
        elif shape == "literal":
            packet = draw(packets)
            packet["data"] = {"pose": {"x": "@@", "y": 0, "z": 0, "rotation": [0, 0, 0, 1]}}
            text = json.dumps(packet).replace('"@@"', draw(st.sampled_from(_LITERALS)))
        elif shape == "utf8":
            # Invalid UTF-8 can only travel in a binary message (a text frame must be UTF-8).
            raw = json.dumps(draw(packets)).encode()
            cut = draw(st.integers(0, len(raw)))
            return raw[:cut] + draw(st.sampled_from(_BAD_UTF8)) + raw[cut:]
        else:
            return draw(junk)
        # json.dumps escapes non-ASCII, so only an escaped lone surrogate can be in
        # there, and it is valid UTF-8 text: any message goes as text or as binary.
        return text.encode() if draw(st.booleans()) else text

    return message()


def hostile_messages() -> st.SearchStrategy[str | bytes]:
    """One WebSocket message from a hostile or broken client, with fresh values."""
    return _messages(compact=False)


def compact_messages() -> st.SearchStrategy[str | bytes]:
    """The same shapes with every value from the edge pools: cheap to generate."""
    return _messages(compact=True)


# --- raw bytes: before the handshake and as WebSocket frames -------------------------

_methods = st.sampled_from(["GET", "POST", "HEAD", "PUT", "CONNECT", "get", "G\x00T", ""])
_targets = st.sampled_from(
    ["/", "/ws/streamkit", "/health", "/status", "/metrics", "*", "http://x/", "/%00", "//"]
)
_header_names = st.sampled_from(
    [
        "Host",
        "Upgrade",
        "Connection",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Content-Length",
        "Transfer-Encoding",
        "X-API-Key",
        "Origin",
        "Expect",
        "X",
    ]
)
_header_values = st.one_of(
    st.sampled_from(
        [
            "websocket",
            "Upgrade",
            "13",
            "dGhlIHNhbXBsZSBub25jZQ==",
            "chunked",
            "-1",
            "99999999999999999999",
            "100-continue",
            "",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
)


@st.composite
def http_heads(draw: st.DrawFn) -> bytes:
    """Something shaped like an HTTP request, wrong in some way or not at all."""
    method = draw(_methods)
    target = draw(_targets)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "HTTP/9"]))
    lines = [f"{method} {target} {version}"]
    headers = draw(st.lists(st.tuples(_header_names, _header_values), max_size=8))
    lines.extend(f"{name}: {value}" for name, value in headers)
    separator = draw(st.sampled_from(["\r\n", "\n", "\r"]))
    head = separator.join(lines).encode("latin-1", "replace")
    ending = draw(st.sampled_from([b"\r\n\r\n", b"\r\n", b"", b"\n\n"]))
    body = draw(st.binary(max_size=200))
    return head + ending + body


raw_prefixes = st.one_of(
    st.binary(max_size=2048),
    http_heads(),
    # TLS ClientHello to a plain port, HTTP/2 preface, a huge head.
    st.sampled_from(
        [
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
            b"\r\n" * 1000,
        ]
    ),
)


@st.composite
def ws_frames(draw: st.DrawFn) -> bytes:
    """One WebSocket frame of any shape: any opcode, reserved bits, masked or not,
    any length encoding (some claiming far more than follows)."""
    fin = draw(st.booleans())
    rsv = draw(st.integers(0, 7))
    opcode = draw(st.integers(0, 15))
    payload = draw(st.binary(max_size=200))
    masked = draw(st.booleans())
    claimed = draw(st.one_of(st.just(len(payload)), st.integers(0, 2**63 - 1)))
    encoding = draw(st.sampled_from(["shortest", "16", "64"]))
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if encoding == "shortest" and claimed < 126:
        header = struct.pack("!BB", first, mask_bit | claimed)
    elif encoding != "64" and claimed < 2**16:
        header = struct.pack("!BBH", first, mask_bit | 126, claimed)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, claimed)
    if masked:
        key = draw(st.binary(min_size=4, max_size=4))
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        header += key
    return header + payload


raw_after_handshake = st.one_of(
    st.binary(max_size=1024),
    st.lists(ws_frames(), min_size=1, max_size=6).map(b"".join),
)

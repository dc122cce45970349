"""b64: strict standard base64, the same verdicts whichever decoder the length picks."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stag_relay.protocol import b64

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def reference(text: str) -> bytes | None:
    """What RFC 4648 section 4 allows, with exactly the padding the data needs."""
    if len(text) % 4 or not all(c in ALPHABET for c in text.rstrip("=")):
        return None
    if len(text) - len(text.rstrip("=")) > 2:
        return None
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


# Around the length at which b64 changes decoder, and a mesh's tens of KB.
LENGTHS = st.sampled_from([0, 4, 8, 1016, 1020, 1024, 1028, 4096, 40_000])


@given(st.binary(max_size=40_000))
def test_whatever_is_encoded_decodes_to_itself(data: bytes) -> None:
    text = b64.encode(data)
    assert text == base64.b64encode(data).decode()
    assert b64.decode(text) == data


@given(LENGTHS, st.data())
def test_one_wrong_character_anywhere_is_refused(length: int, data: st.DataObject) -> None:
    text = base64.b64encode(bytes(length // 4 * 3)).decode()
    if not text:
        return
    at = data.draw(st.integers(0, len(text) - 1))
    wrong = data.draw(st.sampled_from(["-", "_", " ", "\n", "=", ".", "é", "\x00"]))
    changed = text[:at] + wrong + text[at + 1 :]
    assert b64.decode(changed) == reference(changed)


@given(LENGTHS, st.text(alphabet=ALPHABET + "=\n", max_size=6))
def test_any_tail_gets_the_reference_verdict(length: int, tail: str) -> None:
    text = base64.b64encode(bytes(length // 4 * 3)).decode() + tail
    assert b64.decode(text) == reference(text)


@pytest.mark.parametrize("size", [10, 5000])
@pytest.mark.parametrize("surplus", ["=", "==", "===="])
def test_surplus_padding_is_refused_at_any_length(size: int, surplus: str) -> None:
    # binascii's strict mode accepts "AAAA=": the length check must catch it.
    assert b64.decode(base64.b64encode(bytes(size)).decode() + surplus) is None

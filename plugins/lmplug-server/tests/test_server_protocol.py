"""The lm:// protocol's encoders and strict parsers, including a fuzz test of the request parser."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmplug_server import protocol
from lmplug_server.protocol import ITEM, ErrorCode, ItemStatus, Limits, Op, ProtocolError

LIMITS = Limits(max_key=64, max_keys=16, max_value=1 << 16, max_frame=1 << 20)


def put_frame(entries: list[tuple[bytes, bytes]], ttl_ms: int = 0, request_id: int = 7) -> bytes:
    keys = [key for key, _ in entries]
    head = protocol.encode_keyed_request(
        Op.PUT, request_id, keys, [ttl_ms] * len(keys), [len(value) for _, value in entries]
    )
    return head + b"".join(value for _, value in entries)


def test_put_frame_round_trips() -> None:
    frame = put_frame([(b"a", b"123"), (b"bb", b""), (b"ccc", b"xyzzy")], ttl_ms=1500)
    request = protocol.decode_request(frame, LIMITS)
    assert request.header.opcode == Op.PUT
    assert request.header.request_id == 7
    assert request.keys == (b"a", b"bb", b"ccc")
    assert [bytes(value) for value in request.values] == [b"123", b"", b"xyzzy"]
    assert {item.arg32 for item in request.items} == {1500}


@pytest.mark.parametrize("op", [Op.GET, Op.EXISTS, Op.DELETE])
def test_keyed_frames_round_trip(op: Op) -> None:
    arg64 = [100, 200] if op is Op.GET else []
    request = protocol.decode_request(protocol.encode_keyed_request(op, 1, [b"k1", b"key-2"], (), arg64), LIMITS)
    assert request.keys == (b"k1", b"key-2")
    assert [item.arg64 for item in request.items] == (arg64 or [0, 0])


def test_auth_and_simple_frames_round_trip() -> None:
    assert protocol.decode_request(protocol.encode_auth(3, b"secret"), LIMITS).token == b"secret"
    assert protocol.decode_request(protocol.encode_simple(Op.HEALTH, 4), LIMITS).header.opcode == Op.HEALTH


def test_header_is_24_little_endian_bytes() -> None:
    frame = protocol.encode_simple(Op.STATS, 0x01020304)
    assert frame == b"LMKV" + bytes([1, 0x03, 0, 0]) + bytes([4, 3, 2, 1]) + bytes(4) + bytes(8)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"XMKV" + protocol.encode_simple(Op.HEALTH, 1)[4:], ErrorCode.BAD_MAGIC),
        (protocol.HEADER.pack(b"LMKV", 2, Op.HEALTH, 0, 1, 0, 0), ErrorCode.UNSUPPORTED_VERSION),
        (protocol.HEADER.pack(b"LMKV", 1, 0x55, 0, 1, 0, 0), ErrorCode.UNKNOWN_OPCODE),
        (protocol.HEADER.pack(b"LMKV", 1, Op.HEALTH, 1, 1, 0, 0), ErrorCode.MALFORMED),
        (protocol.HEADER.pack(b"LMKV", 1, Op.HEALTH, 0, 1, 0, 5) + b"12345", ErrorCode.MALFORMED),
        (protocol.HEADER.pack(b"LMKV", 1, Op.GET, 0, 1, 17, 17 * 17), ErrorCode.TOO_MANY_KEYS),
        (protocol.HEADER.pack(b"LMKV", 1, Op.PUT, 0, 1, 1, (1 << 20) + 1), ErrorCode.FRAME_TOO_LARGE),
        (protocol.HEADER.pack(b"LMKV", 1, Op.GET, 0, 1, 0, 0), ErrorCode.MALFORMED),
        (protocol.HEADER.pack(b"LMKV", 1, Op.AUTH, 0, 1, 0, 1025) + b"x" * 1025, ErrorCode.FRAME_TOO_LARGE),
        (protocol.encode_keyed_request(Op.GET, 1, [b"k" * 65]), ErrorCode.KEY_TOO_LONG),
        (protocol.encode_keyed_request(Op.EXISTS, 1, [b"k"], [5]), ErrorCode.MALFORMED),
        (protocol.encode_keyed_request(Op.DELETE, 1, [b"k"], (), [5]), ErrorCode.MALFORMED),
        (put_frame([(b"k", b"value")])[:-1], ErrorCode.TRUNCATED),
        (put_frame([(b"k", b"value")]) + b"!", ErrorCode.MALFORMED),
        (protocol.encode_keyed_request(Op.GET, 1, [b"k"])[:30], ErrorCode.TRUNCATED),
    ],
)
def test_bad_frames_raise_protocol_errors_with_their_code(frame: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as caught:
        protocol.decode_request(frame, LIMITS)
    assert caught.value.code is code


def test_items_must_agree_with_the_body_length() -> None:
    frame = bytearray(protocol.encode_keyed_request(Op.GET, 1, [b"abc"]))
    struct.pack_into("<Q", frame, 16, len(frame) - 24 + 1)  # header claims one byte more than the items describe
    with pytest.raises(ProtocolError, match="MALFORMED"):
        protocol.decode_request(bytes(frame) + b"x", LIMITS)


def test_reply_parsing_checks_opcode_id_and_count() -> None:
    reply = protocol.encode_reply(Op.GET, 9, [(ItemStatus.OK, 3), (ItemStatus.NOT_FOUND, 0)], 3)
    header = protocol.parse_reply_header(reply[:24], Op.GET, 9, 2, 1 << 20)
    assert header.body_length == 2 * ITEM.size + 3
    replies = protocol.parse_reply_items(reply[24:], 2)
    assert [(r.status, r.length) for r in replies] == [(ItemStatus.OK, 3), (ItemStatus.NOT_FOUND, 0)]
    for opcode, request_id, count in [(Op.PUT, 9, 2), (Op.GET, 8, 2), (Op.GET, 9, 1)]:
        with pytest.raises(ProtocolError, match="MALFORMED"):
            protocol.parse_reply_header(reply[:24], opcode, request_id, count, 1 << 20)
    with pytest.raises(ProtocolError, match="FRAME_TOO_LARGE"):
        protocol.parse_reply_header(reply[:24], Op.GET, 9, 2, 10)
    with pytest.raises(ProtocolError, match="unknown item status"):
        protocol.parse_reply_items(ITEM.pack(9, 0, 0, 0), 1)


def test_error_replies_carry_code_and_message() -> None:
    frame = protocol.encode_error(ErrorCode.AUTH_FAILED, "wrong auth token", 5)
    header = protocol.parse_reply_header(frame[:24], Op.GET, 1, 1, 0)
    assert header.opcode == protocol.ERROR_OPCODE
    error = protocol.parse_error_body(frame[24:])
    assert error.code is ErrorCode.AUTH_FAILED
    assert "wrong auth token" in str(error)


def test_limits_round_trip_through_the_auth_reply() -> None:
    assert protocol.parse_limits(protocol.encode_limits(LIMITS)) == LIMITS
    with pytest.raises(ProtocolError):
        protocol.parse_limits(protocol.LIMITS.pack(0, 0, 1, 1, 100))


# ---------------------------------------------------------------------------- fuzzing

VALID_FRAMES = [
    put_frame([(b"a", b"123"), (b"bb", b"4567")], ttl_ms=10),
    protocol.encode_keyed_request(Op.GET, 2, [b"key", b"other"], (), [10, 20]),
    protocol.encode_keyed_request(Op.EXISTS, 3, [b"x" * 64]),
    protocol.encode_keyed_request(Op.DELETE, 4, [b"y"]),
    protocol.encode_auth(5, b"token"),
    protocol.encode_simple(Op.STATS, 6),
]


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "field"]))
        if kind == "flip" and frame:
            frame[draw(st.integers(0, len(frame) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and frame:
            frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
        elif kind == "cut":
            frame = frame[: draw(st.integers(0, len(frame)))]
        elif kind == "insert":
            at = draw(st.integers(0, len(frame)))
            frame[at:at] = draw(st.binary(max_size=8))
        elif kind == "field" and len(frame) >= 24:
            # count or body_length set to anything, including huge values
            offset, fmt = draw(st.sampled_from([(12, "<I"), (16, "<Q")]))
            bits = 32 if fmt == "<I" else 64
            struct.pack_into(fmt, frame, offset, draw(st.integers(0, (1 << bits) - 1)))
    return bytes(frame)


def _check_decode(frame: bytes) -> None:
    tracemalloc.start()
    try:
        try:
            request = protocol.decode_request(frame, LIMITS)
        except ProtocolError:
            request = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The parser keeps views of the frame; what it allocates is bounded by the keys it copies.
    assert peak <= 64 * 1024 + 8 * len(frame)
    if request is not None:
        header = request.header
        assert header.body_length == len(frame) - 24 <= LIMITS.max_frame
        assert header.count <= LIMITS.max_keys
        assert all(0 < len(key) <= LIMITS.max_key for key in request.keys)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_protocol_errors(frame: bytes) -> None:
    _check_decode(frame)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_frames())
def test_mutated_frames_only_raise_protocol_errors(frame: bytes) -> None:
    _check_decode(frame)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=24, max_size=24), st.binary(max_size=96))
def test_what_a_server_would_allocate_is_bounded_by_its_limits(head: bytes, rest: bytes) -> None:
    """The server allocates count*16 item bytes after the header, then keys_length, then values one by one."""
    try:
        header = protocol.parse_request_header(head, LIMITS)
    except ProtocolError:
        return
    assert header.body_length <= LIMITS.max_frame
    if header.opcode not in protocol.KEYED_OPS:
        assert header.body_length <= max(protocol.MAX_TOKEN, 0)
        return
    assert header.count * ITEM.size <= LIMITS.max_keys * ITEM.size
    items = (rest * (header.count * ITEM.size // max(len(rest), 1) + 1))[: header.count * ITEM.size]
    try:
        table = protocol.parse_items(header, items, LIMITS)
    except ProtocolError:
        return
    assert table.keys_length <= min(protocol.MAX_KEY_BYTES, header.count * LIMITS.max_key)
    assert table.values_length <= LIMITS.max_frame

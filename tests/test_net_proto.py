"""The committed generated protobuf code matches hefl.proto; framing round-trips and refuses
truncated, padded, corrupt and oversized bodies."""

from __future__ import annotations

import numpy as np
import pytest

from hefl.errors import TransportError
from hefl.net import wire
from hefl.net.proto import build
from hefl.net.proto import hefl_pb2 as pb


def test_generated_code_is_current():
    assert build.stale() == [], "run: python -m hefl.net.proto.build"


def test_body_round_trips_in_chunks_larger_than_one_message():
    body = np.random.default_rng(0).bytes(3 * wire.CHUNK_BYTES + 17)
    frames = list(wire.client_frames(pb.UpdateHeader(run_id="r"), body))
    assert len(frames) == 5 and all(f.ByteSize() <= wire.MAX_FRAME_BYTES for f in frames)
    h = frames[0].header
    got = wire.read_body((f.chunk for f in frames[1:]), h.body_size, h.body_sha256, 1 << 30)
    assert got == body


@pytest.mark.parametrize(
    "pieces, size, limit, code, words",
    [
        ([b"abc"], 4, 100, "INVALID_ARGUMENT", "truncated"),
        ([b"abcde"], 4, 100, "INVALID_ARGUMENT", "longer"),
        ([b"abcd"], 4, 3, "RESOURCE_EXHAUSTED", "exceeds the limit"),
        ([b"abcX"], 4, 100, "INVALID_ARGUMENT", "SHA-256"),
    ],
)
def test_bad_bodies_are_refused_with_a_reason(pieces, size, limit, code, words):
    with pytest.raises(wire.BodyError, match=words) as e:
        wire.read_body(pieces, size, wire.digest(b"abcd"), limit)
    assert e.value.code == code


def test_optimizer_state_round_trips_without_pickle():
    for state in [(), np.arange(3.0), (np.ones(2), np.zeros(2))]:
        back = wire.unpack_state(wire.pack_state(state))
        assert type(back) is type(state)
        for a, b in zip(state if isinstance(state, tuple) else [state],
                        back if isinstance(back, tuple) else [back], strict=True):
            np.testing.assert_array_equal(a, b)


def test_tokens_parse_and_never_print_the_secret():
    t = wire.Token.parse("alice:" + "s" * 20)
    assert t.name == "alice" and "s" * 20 not in repr(t)
    assert wire.token_from_metadata(t.metadata()) == t
    for bad in ["alice", "al ice:" + "s" * 20, "alice:short", ""]:
        with pytest.raises(TransportError, match="malformed token"):
            wire.Token.parse(bad)
    with pytest.raises(TransportError, match="no credentials"):
        wire.token_from_metadata([])

"""The plain-frame fast path agrees with the websockets parser, or declines."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol
from websockets.streams import StreamReader
from websockets.utils import apply_mask

from imserver.gateway._frame import ends_on_frame_boundary, split_plain_frames

LIMIT = 1000


def _library_frames(data: bytes) -> list[Frame] | None:
    """What websockets parses from ``data`` as client frames: every frame, or
    None if it refuses something or ``data`` does not end on a frame end."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    while reader.buffer != b"":
        parser = Frame.parse(reader.read_exact, mask=True, max_size=LIMIT)
        try:
            next(parser)
        except StopIteration as done:
            frames.append(done.value)
            continue
        except Exception:
            return None
        return None  # the parser wants more bytes: data ends mid-frame
    return frames


@st.composite
def client_frame(draw: st.DrawFn) -> bytes:
    """Raw frame bytes, valid or not: any opcode and flags, masked or not,
    lengths in minimal or non-minimal encodings."""
    size = draw(st.one_of(st.integers(0, 130), st.integers(0, 1100), st.just(70_000)))
    payload = draw(st.binary(min_size=size, max_size=size)) if size < 2000 else b"x" * size
    fin = draw(st.sampled_from([1, 1, 1, 0]))
    rsv = draw(st.sampled_from([0] * 9 + [1, 2, 4]))
    opcode = draw(st.sampled_from([2] * 6 + [0, 1, 3, 8, 9, 10, 15]))
    masked = draw(st.sampled_from([True] * 9 + [False]))
    encoding = draw(st.sampled_from(["minimal"] * 4 + ["16", "64"]))
    if encoding == "minimal" or (encoding == "16" and size >= 65536):
        encoding = "7" if size < 126 else "16" if size < 65536 else "64"
    head = bytes([fin << 7 | rsv << 4 | opcode])
    mask_bit = 0x80 if masked else 0
    if encoding == "7":
        head += bytes([mask_bit | size])
    elif encoding == "16":
        head += bytes([mask_bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", size)
    if masked:
        key = draw(st.binary(min_size=4, max_size=4))
        return head + key + apply_mask(payload, key)
    return head + payload


@settings(max_examples=400)
@given(st.lists(client_frame(), max_size=5), st.integers(0, 8), st.data())
def test_fast_path_matches_the_library_or_declines(
    frames: list[bytes], cut: int, data: st.DataObject
) -> None:
    chunk = b"".join(frames)
    if cut and chunk:
        chunk = chunk[: len(chunk) - data.draw(st.integers(1, min(cut, len(chunk))))]
    payloads = split_plain_frames(chunk, LIMIT)
    library = _library_frames(chunk)
    if payloads is not None:
        assert library is not None
        assert all(f.opcode is Opcode.BINARY and f.fin for f in library)
        assert [bytes(f.data) for f in library] == payloads
    # The boundary check is exact for whatever the frames are: the chunk ends on
    # one iff its length is that of a whole number of the frames.
    ends = {sum(len(f) for f in frames[:i]) for i in range(len(frames) + 1)}
    assert ends_on_frame_boundary(chunk) == (len(chunk) in ends)


def test_plain_frames_are_taken_and_everything_else_declined() -> None:
    a = Frame(Opcode.BINARY, b"hello").serialize(mask=True)
    b = Frame(Opcode.BINARY, b"x" * 300).serialize(mask=True)
    assert split_plain_frames(a + b, LIMIT) == [b"hello", b"x" * 300]
    assert split_plain_frames(b"", LIMIT) == []
    assert split_plain_frames(a + b[:-1], LIMIT) is None  # ends mid-frame
    unmasked = Frame(Opcode.BINARY, b"x").serialize(mask=False)
    assert split_plain_frames(unmasked, LIMIT) is None
    assert split_plain_frames(unmasked + b"\0\0\0\0", LIMIT) is None  # the size would fit
    assert split_plain_frames(Frame(Opcode.TEXT, b"x").serialize(mask=True), LIMIT) is None
    assert split_plain_frames(Frame(Opcode.PING, b"").serialize(mask=True), LIMIT) is None
    assert (
        split_plain_frames(Frame(Opcode.BINARY, b"x", fin=False).serialize(mask=True), LIMIT)
        is None
    )
    assert split_plain_frames(Frame(Opcode.BINARY, b"x" * 1001).serialize(mask=True), LIMIT) is None
    # The server protocol object is what sessions hold: its attribute is read.
    assert ServerProtocol().current_size is None

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixbits import packing
from mixbits.errors import FormatError
from mixbits.packing import pack, packed_size, unpack

WIDTHS = range(1, 17)
LENGTHS = [0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127, 1000, 1001, 4099]


def reference_pack(codes: list[int], width: int) -> bytes:
    """The documented layout, independently: little-endian bytes of sum(code[i] << (i * width))."""
    stream = sum(code << (i * width) for i, code in enumerate(codes))
    return stream.to_bytes(math.ceil(len(codes) * width / 8), "little")


def random_codes(count: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**width, (count,), generator=generator, dtype=torch.int64)


@pytest.mark.parametrize("width", WIDTHS)
def test_round_trip_is_exact_for_every_width_and_length(width):
    for count in LENGTHS:
        codes = random_codes(count, width, seed=count * 10 + width)
        data = pack(codes, width)
        assert data.dtype == torch.uint8 and data.shape == (packed_size(count, width),)
        back = unpack(data, width, count)
        assert back.dtype == (torch.uint8 if width <= 8 else torch.int32) and back.shape == (count,)
        assert torch.equal(back.long(), codes), (width, count)


@pytest.mark.parametrize("width", range(1, 8))
def test_chunk_boundaries_do_not_change_the_bytes(width, monkeypatch):
    codes = random_codes(1001, width, seed=width)
    whole = pack(codes, width)
    monkeypatch.setattr(packing, "CHUNK_GROUPS", 3)  # 24 codes per step, last step partial
    assert torch.equal(pack(codes, width), whole)
    assert torch.equal(unpack(whole, width, 1001).long(), codes)
    assert torch.equal(unpack(whole, width, 997).long(), codes[:997])


@pytest.mark.parametrize("width", WIDTHS)
def test_layout_matches_the_documented_bit_stream(width):
    for count in (1, 7, 8, 9, 33):
        codes = random_codes(count, width, seed=width * 100 + count).tolist()
        assert bytes(pack(torch.tensor(codes), width).tolist()) == reference_pack(codes, width)


def test_known_bytes_width_1():
    # Code i is bit i: byte 0 = bits 7..0 = 1,0,0,0,1,1,0,1 (codes 7..0) = 0x8D.
    # Code 8 is bit 0 of byte 1; the other 7 bits of byte 1 are zero padding.
    codes = [1, 0, 1, 1, 0, 0, 0, 1, 1]
    assert pack(torch.tensor(codes), 1).tolist() == [0x8D, 0x01]


def test_known_bytes_width_3():
    # Codes 5=101, 3=011, 7=111, 1=001 at stream bits 0-2, 3-5, 6-8, 9-11.
    # Stream bits 11..0: 001 111 011 101 -> 0011 1101 1101 = 0x3DD (12 bits).
    # Byte 0 = bits 7..0 = 11011101 = 0xDD (code 2 straddles: its low 2 bits end byte 0).
    # Byte 1 = bits 15..8 = 0000 0011 = 0x03 (code 2's top bit, then code 3).
    assert pack(torch.tensor([5, 3, 7, 1]), 3).tolist() == [0xDD, 0x03]


def test_known_bytes_width_4():
    # Low nibble first: byte 0 = code1 code0 = 0x21, byte 1 = 0xFA, byte 2 = 0x07 (high nibble padding).
    assert pack(torch.tensor([0x1, 0x2, 0xA, 0xF, 0x7]), 4).tolist() == [0x21, 0xFA, 0x07]


def test_known_bytes_width_5():
    # Codes 31=11111, 0=00000, 1=00001, 17=10001 at stream bits 0-4, 5-9, 10-14, 15-19.
    # Set bits: 0,1,2,3,4 (code 0), 10 (code 2), 15 and 19 (code 3); 20 bits -> 3 bytes.
    # Byte 0 = bits 0-4 = 0x1F; byte 1 = bit 10 (0x04) + bit 15 (0x80) = 0x84; byte 2 = bit 19 = 0x08.
    assert pack(torch.tensor([31, 0, 1, 17]), 5).tolist() == [0x1F, 0x84, 0x08]


def test_width_8_is_the_codes_themselves():
    codes = torch.tensor([0, 1, 127, 128, 255])
    assert pack(codes, 8).tolist() == [0, 1, 127, 128, 255]


@pytest.mark.parametrize("width", WIDTHS)
def test_packed_size_is_ceil_of_bits_over_8(width):
    for count in LENGTHS:
        assert packed_size(count, width) == math.ceil(count * width / 8)
        assert pack(torch.zeros(count, dtype=torch.uint8), width).numel() == packed_size(count, width)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                   torch.uint16, torch.uint32, torch.uint64])
def test_any_integer_dtype_and_shape_is_accepted(dtype):
    codes = random_codes(60, 6, seed=1).view(3, 4, 5)
    data = pack(codes.to(dtype), 6)
    assert torch.equal(data, pack(codes.reshape(-1), 6))
    assert torch.equal(unpack(data, 6, 60).long(), codes.reshape(-1))


def test_unpack_reads_a_prefix_and_ignores_trailing_bytes():
    codes = random_codes(20, 3, seed=2)
    data = torch.cat([pack(codes, 3), torch.full((5,), 0xFF, dtype=torch.uint8)])
    assert torch.equal(unpack(data, 3, 20).long(), codes)
    assert torch.equal(unpack(data, 3, 16).long(), codes[:16])


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_round_trip_property(draw):
    width = draw.draw(st.integers(1, 8), label="width")
    codes = draw.draw(st.lists(st.integers(0, 2**width - 1), max_size=300), label="codes")
    data = pack(torch.tensor(codes, dtype=torch.int64), width)
    assert bytes(data.tolist()) == reference_pack(codes, width)
    assert unpack(data, width, len(codes)).tolist() == codes


@pytest.mark.parametrize("width", [0, 17, -1, 3.0, True, "4"])
def test_bad_width_is_rejected(width):
    with pytest.raises(FormatError, match="width must be an integer from 1 to 16"):
        pack(torch.zeros(4, dtype=torch.uint8), width)
    with pytest.raises(FormatError, match="width must be an integer from 1 to 16"):
        unpack(torch.zeros(4, dtype=torch.uint8), width, 1)
    with pytest.raises(FormatError, match="width must be an integer from 1 to 16"):
        packed_size(4, width)


@pytest.mark.parametrize("codes, width, message", [
    ([0, 8, 1], 3, "code 8 at index 1 does not fit in 3 unsigned bits"),
    ([255, 256], 8, "code 256 at index 1 does not fit in 8 unsigned bits"),
    ([1, 0, -1], 4, "code -1 at index 2 does not fit in 4 unsigned bits"),
    ([2], 1, "code 2 at index 0"),
])
def test_codes_out_of_range_are_rejected(codes, width, message):
    with pytest.raises(FormatError, match=message):
        pack(torch.tensor(codes), width)


@pytest.mark.parametrize("codes", [torch.tensor([1.0, 2.0]), torch.tensor([True, False])])
def test_non_integer_codes_are_rejected(codes):
    with pytest.raises(FormatError, match="integer dtype"):
        pack(codes, 4)


def test_short_or_wrong_data_is_rejected():
    data = pack(torch.arange(10), 5)  # 50 bits -> 7 bytes
    assert unpack(data, 5, 11).tolist() == [*range(10), 0]  # 55 bits still fit in 7 bytes: padding reads as 0
    with pytest.raises(FormatError, match="12 codes of 5 bits need 8 bytes, got only 7"):
        unpack(data, 5, 12)
    with pytest.raises(FormatError, match="10 codes of 5 bits need 7 bytes, got only 6"):
        unpack(data[:6], 5, 10)
    with pytest.raises(FormatError, match="must be a uint8 tensor"):
        unpack(data.to(torch.int16), 5, 10)
    with pytest.raises(FormatError, match="count must be non-negative"):
        unpack(data, 5, -1)

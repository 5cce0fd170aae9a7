"""The UCX transport's data messages are parsed as untrusted input (csrc/transports/ucx/data_am.h): a write is
copied only when its header is whole, its pieces add up to its data exactly, and each piece lies inside memory
this agent exported under the key it names. Checked through kvxfer._C.check_ucx_data_am (no UCX needed)."""
import struct

import pytest

from kvxfer import _C

MAGIC = 0x4B584457
REGIONS = {7: (0x10000, 4096), 9: (0x40000, 1 << 20)}


def header(pieces, imm=5, has_imm=1, magic=MAGIC, count=None):
    h = struct.pack("<IIII", magic, len(pieces) if count is None else count, imm, has_imm)
    return h + b"".join(struct.pack("<QQQ", *p) for p in pieces)


def test_a_write_inside_its_regions_is_accepted():
    assert _C.check_ucx_data_am(header([(7, 0x10000, 4096), (9, 0x40000 + 100, 28)]), 4124, REGIONS) == ""
    assert _C.check_ucx_data_am(header([]), 0, REGIONS) == ""  # an immediate alone (a zero-byte signal)


@pytest.mark.parametrize("pieces,data_len,why", [
    ([(7, 0x10000, 4097)], 4097, "runs outside the region exported under key 7"),       # one byte past the end
    ([(7, 0x10000 + 4096, 1)], 1, "runs outside"),                                      # starts at the end
    ([(7, 0x0FFFF, 2)], 2, "runs outside"),                                             # starts before the base
    ([(7, 0x10010, 2**64 - 8)], 16, "does not fit the data"),                           # length wraps
    ([(9, 2**64 - 4, 8)], 8, "runs outside"),                                           # address near the top
    ([(8, 0x10000, 16)], 16, "names key 8, which this agent never exported"),
    ([(7, 0x10000, 16)], 17, "pieces of 16 bytes for 17 bytes of data"),                # data longer than pieces
    ([(7, 0x10000, 16), (7, 0x10010, 16)], 24, "does not fit the data"),                # data shorter
    ([(7, 0x10000, 0)], 0, "piece 0 of 0 bytes"),
])
def test_a_write_outside_what_was_exported_is_refused(pieces, data_len, why):
    assert why in _C.check_ucx_data_am(header(pieces), data_len, REGIONS)


@pytest.mark.parametrize("raw,why", [
    (b"\x00" * 8, "header of 8 bytes"),
    (header([], magic=0x1234), "bad magic"),
    (header([], has_imm=2), "bad immediate flag"),
    (header([(7, 0x10000, 16)], count=17), "17 pieces (at most 16)"),
    (header([(7, 0x10000, 16)], count=2), "header of 40 bytes for 2 pieces"),
    (header([(7, 0x10000, 16)]) + b"\x00", "header of 41 bytes for 1 pieces"),
])
def test_a_malformed_header_is_refused(raw, why):
    assert why in _C.check_ucx_data_am(raw, 16, REGIONS)

"""The packed byte layout of the compressed KV cache. Every kernel, the reference and the tests
take offsets and bit orders from here; nothing else knows them.

Codes (b bits per coordinate) are split into bit planes of widths 4, 2 and 1 (b=3 is a 2-bit plane
then a 1-bit plane; b=4 one 4-bit plane).  In a plane of width w, coordinate j sits in byte
(j*w)//8 at bit offset (j*w)%8, LSB first; plane p holds the code bits above the planes before
it.  Because 8 % w == 0, no code straddles a byte, so a kernel unpacks with one byte load, one
shift and one mask per plane.  QJL signs are a 1-bit plane: bit 1 means +1 (projection >= 0).

Norm and gamma are fp16, little-endian.

One (token, KV head) *slot* is a key record followed by a value record:

    key record   = k_codes (D*kb/8) | k_signs (D/8, QJL only) | k_norm (2) | k_gamma (2, QJL only)
    value record = v_codes (D*vb/8) | v_norm (2)

For D=128, 2+1-bit keys and 3-bit values: 32+16+2+2 + 48+2 = 102 bytes, against 512 in fp16.

Records (`encode_keys`, `encode_values`) are stored token-major: (..., record_bytes).  The paged
cache is (num_blocks, num_kv_heads, block_size * slot_bytes) uint8 and, inside one (block, head)
page, component-major ("structure of arrays"): component c of the token at in-block offset t starts
at byte  block_size * slot_offset(c) + t * size(c).  Each component of a block is then one dense
(block_size, size) tile, which is what the decode kernel loads.  A record is the block_size == 1
case of the same formula.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCALAR_BYTES = 2  # fp16 norm / gamma


def plane_widths(bits: int) -> tuple[int, ...]:
    """Bit-plane widths for b-bit codes, low bits first."""
    widths, left = [], bits
    for w in (8, 4, 2, 1):
        if left >= w:
            widths.append(w)
            left -= w
    return tuple(widths)


def code_bytes(head_dim: int, bits: int) -> int:
    return head_dim * bits // 8


@dataclass(frozen=True)
class SlotLayout:
    """Byte offsets of one (token, KV head) slot. See the module docstring."""

    head_dim: int
    key_bits: int
    qjl: bool
    value_bits: int

    def __post_init__(self) -> None:
        if self.head_dim % 16:
            raise ValueError(f"head_dim={self.head_dim} must be a multiple of 16")

    # -- component sizes, in slot order ------------------------------------------------------
    @property
    def components(self) -> tuple[tuple[str, int], ...]:
        d = self.head_dim
        comps = [("k_codes", code_bytes(d, self.key_bits))]
        if self.qjl:
            comps.append(("k_signs", d // 8))
        comps.append(("k_norm", SCALAR_BYTES))
        if self.qjl:
            comps.append(("k_gamma", SCALAR_BYTES))
        comps += [("v_codes", code_bytes(d, self.value_bits)), ("v_norm", SCALAR_BYTES)]
        return tuple(comps)

    def size(self, name: str) -> int:
        return dict(self.components)[name]

    def slot_offset(self, name: str) -> int:
        """Offset of a component in a slot (and, times block_size, in a page)."""
        off = 0
        for n, s in self.components:
            if n == name:
                return off
            off += s
        raise KeyError(name)

    @property
    def key_bytes(self) -> int:
        return sum(s for n, s in self.components if n.startswith("k_"))

    @property
    def value_bytes(self) -> int:
        return sum(s for n, s in self.components if n.startswith("v_"))

    @property
    def slot_bytes(self) -> int:
        return self.key_bytes + self.value_bytes

    def record_offset(self, name: str) -> int:
        """Offset of a component inside its own record (key record or value record)."""
        base = 0 if name.startswith("k_") else self.key_bytes
        return self.slot_offset(name) - base

    def page_bytes(self, block_size: int) -> int:
        return block_size * self.slot_bytes


# -- reference (torch) packing; kernels implement the same bit order ----------------------------

def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) integer codes in [0, 2**bits) -> (..., D*bits/8) uint8 bit planes."""
    d = codes.shape[-1]
    codes = codes.to(torch.int32)
    planes, shift = [], 0
    for w in plane_widths(bits):
        per_byte = 8 // w
        part = (codes >> shift) & ((1 << w) - 1)
        part = part.reshape(*codes.shape[:-1], d // per_byte, per_byte)
        weights = torch.tensor([1 << (w * i) for i in range(per_byte)], dtype=torch.int32,
                               device=codes.device)
        planes.append((part * weights).sum(-1).to(torch.uint8))
        shift += w
    return torch.cat(planes, dim=-1)


def unpack_codes(packed: torch.Tensor, head_dim: int, bits: int) -> torch.Tensor:
    """(..., D*bits/8) uint8 -> (..., D) int64 codes. Inverse of `pack_codes`."""
    out = torch.zeros(*packed.shape[:-1], head_dim, dtype=torch.int64, device=packed.device)
    start, shift = 0, 0
    for w in plane_widths(bits):
        per_byte = 8 // w
        nbytes = head_dim // per_byte
        plane = packed[..., start:start + nbytes].to(torch.int64)
        shifts = torch.arange(per_byte, device=packed.device) * w
        part = (plane.unsqueeze(-1) >> shifts) & ((1 << w) - 1)
        out |= part.reshape(*packed.shape[:-1], head_dim) << shift
        start += nbytes
        shift += w
    return out


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """(..., D) bool (True = +1) -> (..., D/8) uint8."""
    return pack_codes(positive.to(torch.int32), 1)


def unpack_signs(packed: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(..., D/8) uint8 -> (..., D) fp32 in {-1, +1}."""
    return unpack_codes(packed, head_dim, 1).to(torch.float32) * 2 - 1


def scalar_to_bytes(x: torch.Tensor) -> torch.Tensor:
    """(...,) float -> (..., 2) uint8 holding the fp16 value (little-endian)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def bytes_to_scalar(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 -> (...,) fp32."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)

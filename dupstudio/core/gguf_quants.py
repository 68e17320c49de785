"""Decode GGUF tensor data (float and ggml block-quantized types) to float32 with numpy.

The block layouts are those of llama.cpp's ``ggml-common.h`` / ``ggml-quants.c`` (and of the
reference decoder in the ``gguf`` Python package). Every decoder works on a 2-D ``uint8`` array of
whole blocks, one block per row, and is vectorised over the blocks; :func:`read_tensor` reads a
tensor from an open file a bounded number of blocks at a time, so decoding never holds more than
the float32 result plus one chunk's temporaries.

The arithmetic follows the reference's float32 order (scale times quant, then the minimum
subtracted or added), so the results are the reference values to the last bit. For every type
but Q6_K the products are exact in float32 anyway (an fp16 scale has 11 significant bits, the
sub-block scale at most 6, the quant at most 5) and only the final add/subtract rounds; Q6_K's
``(d * scale) * q`` can round twice and is computed in exactly that order.

Types not listed in :data:`SUPPORTED_TYPES` (the i-quants, ternary and fp4 types, Q8_1/Q8_K
which are never stored in model files) raise :class:`DupstudioError` naming the tensor.
"""
from __future__ import annotations

from typing import BinaryIO, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from .jobs import DupstudioError

__all__ = ["SUPPORTED_TYPES", "block_layout", "dequantize", "read_tensor", "unsupported_message"]

QK_K = 256  # elements in a k-quant super-block

Decoder = Callable[[np.ndarray], np.ndarray]


def _f16(col: np.ndarray) -> np.ndarray:
    """(n, 2) little-endian fp16 bytes -> (n, 1) float32 (exact)."""
    return np.ascontiguousarray(col).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2, k): low nibbles first, then high nibbles (the order ggml stores a
    32-element group of 4-bit quants in: element j in the low nibble of byte j, element j+16 in
    its high nibble)."""
    return np.stack([qs & 0x0F, qs >> 4], axis=1)


def _bits(b: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 8k) bits, bit i of the little-endian word first."""
    return np.unpackbits(b, axis=1, bitorder="little")


# ---------------------------------------------------------------------------- float types


def _f32(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f4").astype(np.float32)


def _f16_elems(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _bf16(b: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32
    hi = np.ascontiguousarray(b).view("<u2").astype(np.uint32) << 16
    return hi.view(np.float32)


# ---------------------------------------------------------------------------- 32-element blocks


def _q8_0(b: np.ndarray) -> np.ndarray:
    # fp16 d, 32 x int8
    d = _f16(b[:, :2])
    return b[:, 2:].view(np.int8).astype(np.float32) * d


def _q4_0(b: np.ndarray) -> np.ndarray:
    # fp16 d, 16 bytes of 4-bit quants; x = d * (q - 8)
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:18]).reshape(len(b), 32).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def _q4_1(b: np.ndarray) -> np.ndarray:
    # fp16 d, fp16 m, 16 bytes of 4-bit quants; x = d * q + m
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:20]).reshape(len(b), 32).astype(np.float32)
    return d * q + m


def _q5_0(b: np.ndarray) -> np.ndarray:
    # fp16 d, 32 high bits (one per element), 16 bytes of low nibbles; x = d * (q - 16)
    d = _f16(b[:, :2])
    high = _bits(b[:, 2:6])
    q = (_nibbles(b[:, 6:22]).reshape(len(b), 32) | (high << 4)).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def _q5_1(b: np.ndarray) -> np.ndarray:
    # fp16 d, fp16 m, 32 high bits, 16 bytes of low nibbles; x = d * q + m
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    high = _bits(b[:, 4:8])
    q = (_nibbles(b[:, 8:24]).reshape(len(b), 32) | (high << 4)).astype(np.float32)
    return d * q + m


# ---------------------------------------------------------------------------- k-quants (256)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """(n, 64) bytes of 2-bit quants -> (n, 256) in element order: each 128-element half uses
    32 bytes, the four 32-element groups of a half are the bit pairs 0-1, 2-3, 4-5, 6-7."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(len(qs), 2, 1, 32) >> shifts) & 3).reshape(len(qs), QK_K)


def _q2_k(b: np.ndarray) -> np.ndarray:
    # 16 scale bytes (low nibble: scale, high nibble: min of a 16-element sub-block),
    # 64 bytes of 2-bit quants, fp16 d, fp16 dmin; x = (d * sc) * q - dmin * m
    n = len(b)
    sc = b[:, 0:16]
    q = _crumbs(b[:, 16:80]).reshape(n, 16, 16).astype(np.float32)
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sc & 0x0F).astype(np.float32)).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).astype(np.float32)).reshape(n, 16, 1)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: np.ndarray) -> np.ndarray:
    # 32 bytes of high-bit mask, 64 bytes of 2-bit low quants, 12 bytes of sixteen 6-bit scales,
    # fp16 d; q = low - 4 where the mask bit is clear; x = d * (scale - 32) * q
    n = len(b)
    hmask, qs, s = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    # mask byte l, bit k belongs to element 32 * k + l
    high = ((hmask.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(n, QK_K)
    q = _crumbs(qs).astype(np.int8) - ((high ^ 1) << 2).astype(np.int8)
    # scale i: low 4 bits from byte i (i < 8) or the high nibble of byte i - 8; its top 2 bits
    # are the bit pair i // 4 of byte 8 + i % 4
    low4 = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)
    top2 = ((s[:, 8:12].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 3)
    scale = (low4 | (top2.reshape(n, 16) << 4)).astype(np.int8) - np.int8(32)
    dl = (d * scale.astype(np.float32)).reshape(n, 16, 1)
    return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


def _scale_min_k4(s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins (ggml's
    ``get_scale_min_k4``): sub-blocks 0-3 use the low 6 bits of bytes 0-3 (scales) and 4-7
    (mins); sub-blocks 4-7 take their low 4 bits from bytes 8-11 and their top 2 bits from the
    top bits of bytes 0-3 (scales) and 4-7 (mins)."""
    a, m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 63, (hi & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([m & 63, (hi >> 4) | ((m >> 6) << 4)], axis=1)
    return sc, mn


def _q4_k(b: np.ndarray) -> np.ndarray:
    # fp16 d, fp16 dmin, 12 scale/min bytes, 128 bytes of 4-bit quants (four 32-byte chunks, the
    # low nibbles one 32-element sub-block, the high nibbles the next); x = (d*sc) * q - dmin*m
    n = len(b)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = _nibbles(b[:, 16:144].reshape(n * 4, 32)).reshape(n, 8, 32).astype(np.float32)
    dl = (d * sc.astype(np.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.astype(np.float32)).reshape(n, 8, 1)
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(b: np.ndarray) -> np.ndarray:
    # as Q4_K plus 32 bytes of fifth bits: byte l, bit k belongs to element 32 * k + l
    n = len(b)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh = b[:, 16:48]
    high = (qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    low = _nibbles(b[:, 48:176].reshape(n * 4, 32)).reshape(n, 8, 32)
    q = (low | (high << 4)).astype(np.float32)
    dl = (d * sc.astype(np.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.astype(np.float32)).reshape(n, 8, 1)
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(b: np.ndarray) -> np.ndarray:
    # 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 int8 scales, fp16 d.
    # Each 128-element half uses 64 low bytes and 32 high bytes: its four 32-element groups are
    # (low nibble of bytes 0-31, pair 0), (low of 32-63, pair 1), (high of 0-31, pair 2),
    # (high of 32-63, pair 3). x = (d * scale) * (q - 32), a scale per 16 elements.
    n = len(b)
    ql = b[:, 0:128].reshape(n, 2, 2, 32)
    low = np.stack([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    scale = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    dl = (d * scale).reshape(n, 16, 1)
    return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


# name -> (elements per block, bytes per block, decoder)
_DECODERS: Dict[str, Tuple[int, int, Decoder]] = {
    "F32": (1, 4, _f32),
    "F16": (1, 2, _f16_elems),
    "BF16": (1, 2, _bf16),
    "Q8_0": (32, 34, _q8_0),
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q2_K": (QK_K, 84, _q2_k),
    "Q3_K": (QK_K, 110, _q3_k),
    "Q4_K": (QK_K, 144, _q4_k),
    "Q5_K": (QK_K, 176, _q5_k),
    "Q6_K": (QK_K, 210, _q6_k),
}

#: GGUF tensor types dupstudio decodes (the float types and the common ggml quantizations).
SUPPORTED_TYPES: Tuple[str, ...] = tuple(_DECODERS)

#: elements decoded per step of :func:`read_tensor`; the temporaries of a step are a few times
#: its float32 output (16 MiB), whatever the tensor's size
CHUNK_ELEMENTS = 1 << 22


def block_layout(type_name: str) -> Tuple[int, int]:
    """(elements per block, bytes per block) of a supported type."""
    block, nbytes, _ = _DECODERS[type_name]
    return block, nbytes


def unsupported_message(tensor: str, type_name: str) -> str:
    return (f"tensor {tensor!r} has type {type_name}, which dupstudio cannot decode "
            f"(supported: {', '.join(SUPPORTED_TYPES)})")


def _decoder(type_name: str, tensor: str) -> Tuple[int, int, Decoder]:
    try:
        return _DECODERS[type_name]
    except KeyError:
        raise DupstudioError(unsupported_message(tensor, type_name)) from None


def dequantize(data, type_name: str, shape: Optional[Sequence[int]] = None, *,
               tensor: str = "<tensor>") -> np.ndarray:
    """Decode the raw bytes of a tensor (bytes or a uint8 array) to float32.

    ``shape`` is the row-major shape (default: flat). Raises DupstudioError for an unsupported
    type or a byte count that is not a whole number of blocks."""
    block, nbytes, fn = _decoder(type_name, tensor)
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) \
        else np.asarray(data, dtype=np.uint8).reshape(-1)
    if raw.size % nbytes:
        raise DupstudioError(f"tensor {tensor!r} ({type_name}): {raw.size} bytes are not a whole "
                             f"number of {nbytes}-byte blocks")
    with np.errstate(all="ignore"):  # NaN/inf in a file are its data, not a decoding error
        out = fn(raw.reshape(-1, nbytes)).reshape(-1) if raw.size else np.zeros(0, np.float32)
    return out.reshape(tuple(shape)) if shape is not None else out


def read_tensor(fh: BinaryIO, offset: int, type_name: str, shape: Sequence[int], *,
                tensor: str = "<tensor>", source: str = "") -> np.ndarray:
    """Read and decode one tensor stored at byte ``offset`` of the open file ``fh``.

    Decodes :data:`CHUNK_ELEMENTS` elements at a time into the float32 result, so memory stays
    the result plus one chunk. ``shape`` is row-major; its element count must be a whole number
    of blocks (the GGUF header parser checks the row length)."""
    block, nbytes, fn = _decoder(type_name, tensor)
    n_el = 1
    for dim in shape:
        n_el *= int(dim)
    where = f"{source}: " if source else ""
    if n_el % block:
        raise DupstudioError(f"{where}tensor {tensor!r} ({type_name}) has {n_el} elements, not a "
                             f"whole number of {block}-element blocks")
    out = np.empty(n_el, dtype=np.float32)
    n_blocks = n_el // block
    step = max(CHUNK_ELEMENTS // block, 1)
    fh.seek(offset)
    for first in range(0, n_blocks, step):
        count = min(step, n_blocks - first)
        raw = fh.read(count * nbytes)
        if len(raw) != count * nbytes:
            raise DupstudioError(f"{where}tensor {tensor!r} ends past the end of the file "
                                 f"(the file is truncated)")
        blocks = np.frombuffer(raw, dtype=np.uint8).reshape(count, nbytes)
        with np.errstate(all="ignore"):  # NaN/inf in a file are its data, not an error
            out[first * block:(first + count) * block] = fn(blocks).reshape(-1)
    return out.reshape(tuple(int(d) for d in shape))

"""The integer formats of docs/formats.md: quantization parameters, codes, packing, dequantization.

Internally every code is kept in the *unsigned* domain `u` in [0, 2^bits - 1] with an integer zero
point `z`, so that W = (u - z) * scale for every format. The stored form follows docs/formats.md:
- int8: qweight int8 = u - 128 (symmetric: codes in [-127, 127], zero 0, no zeros tensor;
  asymmetric: zeros int8 = z - 128);
- int4: qweight uint8 [N, K/2], input k in byte k//2, low nibble for even k, high nibble for odd k;
  symmetric zero 8 (no zeros tensor), asymmetric zeros uint8 in 0..15.
Scales are float16; codes are always computed against the float16-rounded scale, so dequantizing the
stored tensors gives exactly the values every method optimised for.
"""

from __future__ import annotations

import torch

from ..errors import EdgemmError

BITS = (4, 8)
QMAX = {4: 15, 8: 255}


def check_bits(bits) -> int:
    if bits not in BITS:
        raise EdgemmError(f"bits {bits!r} is not supported: choose 4 or 8")
    return int(bits)


def resolve_group(k: int, group_size, name: str = "layer", bits: int = 8) -> int:
    """The group size G for a layer with k inputs (None/0/-1 = per channel, G = k), with clear errors."""
    if group_size in (None, 0, -1):
        g = k
    else:
        g = int(group_size)
        if g <= 0:
            raise EdgemmError(f"group size must be positive (or 0 for per-channel), got {group_size}")
        if k % g:
            raise EdgemmError(f"group size {g} does not divide in_features {k} of {name}: use a divisor of {k}, "
                              f"per-channel (0), or exclude the layer")
    if bits == 4 and k % 2:
        raise EdgemmError(f"int4 packs two inputs per byte: in_features {k} of {name} is odd")
    return g


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to float16 (as stored); zero or underflowing scales become 1 (their codes are 0)."""
    s = scale.to(torch.float16).to(torch.float32)
    return torch.where(s > 0, s, torch.ones_like(s))


def qparams(w: torch.Tensor, bits: int, group: int, symmetric: bool, clip: torch.Tensor | None = None):
    """Per-group scale [N, K/G] (float32 holding float16 values) and zero point [N, K/G] (int16, unsigned domain).

    `clip` [N, K/G] (or broadcastable) shrinks the range (AWQ clip search); 1 = the full range."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    qmax = QMAX[bits]
    if symmetric:
        amax = wg.abs().amax(-1)
        if clip is not None:
            amax = amax * clip
        # int8: codes in [-127, 127] (llama.cpp Q8_0); int4: codes in [-8, 7] with the extreme at +-7.5 steps.
        scale = fp16_scale(amax / (127.0 if bits == 8 else 7.5))
        zero = torch.full_like(scale, (qmax + 1) // 2, dtype=torch.int16)
    else:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        if clip is not None:
            lo, hi = lo * clip, hi * clip
        scale = fp16_scale((hi - lo) / qmax)
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int16)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Codes u [N, K] (int16, unsigned domain) of w for the given per-group scale and zero."""
    n, k = w.shape
    g = k // scale.shape[1]
    s = scale.repeat_interleave(g, 1)
    z = zero.repeat_interleave(g, 1).float()
    lo, hi = (1.0, 255.0) if (symmetric and bits == 8) else (0.0, float(QMAX[bits]))
    return torch.clamp(torch.round(w.float() / s) + z, lo, hi).to(torch.int16)


def dequantize(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """W = (u - z) * scale, float32 [N, K]."""
    g = u.shape[1] // scale.shape[1]
    return (u.float() - zero.repeat_interleave(g, 1).float()) * scale.repeat_interleave(g, 1)


def rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool, clip=None):
    """Round-to-nearest: -> (codes, scale, zero)."""
    scale, zero = qparams(w, bits, group, symmetric, clip)
    return quantize(w, scale, zero, bits, symmetric), scale, zero


# -------------------------------------------------------------------------------------------- packing


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 -> uint8 [N, K/2]: even k in the low nibble, odd k in the high nibble."""
    if u.shape[-1] % 2:
        raise EdgemmError("int4 packing needs an even number of inputs")
    u = u.to(torch.int16)
    if bool((u < 0).any() or (u > 15).any()):
        raise EdgemmError("int4 codes must lie in 0..15")
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int16 codes [N, K]."""
    p = p.to(torch.int16)
    out = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1)
    return out.reshape(*p.shape[:-1], p.shape[-1] * 2)


def to_storage(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> dict[str, torch.Tensor]:
    """The tensors of docs/formats.md: qweight, scales (float16) and, when asymmetric, zeros."""
    out = {"scales": scale.to(torch.float16).contiguous()}
    if bits == 8:
        out["qweight"] = (u - 128).to(torch.int8).contiguous()
        if not symmetric:
            out["zeros"] = (zero - 128).to(torch.int8).contiguous()
    else:
        out["qweight"] = pack_int4(u).contiguous()
        if not symmetric:
            out["zeros"] = zero.to(torch.uint8).contiguous()
    return out


def from_storage(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int):
    """Stored tensors -> (u, scale float32, zero int16) in the unsigned domain."""
    scale = scales.float()
    if bits == 8:
        u = qweight.to(torch.int16) + 128
        zero = (zeros.to(torch.int16) + 128) if zeros is not None else torch.full(scale.shape, 128, dtype=torch.int16)
    else:
        u = unpack_int4(qweight)
        zero = zeros.to(torch.int16) if zeros is not None else torch.full(scale.shape, 8, dtype=torch.int16)
    return u, scale, zero


def dequantize_storage(qweight, scales, zeros, bits: int) -> torch.Tensor:
    return dequantize(*from_storage(qweight, scales, zeros, bits))

"""Asymmetric integer quantization of cached states, packed along the token axis.

Tensors are ``[batch, heads, tokens, r]``.  Keys are quantized per channel over blocks of
``group`` tokens (one scale and zero per block and dimension: keys have outlier channels, so
a channel shares one range); values per token (one scale and zero per token over its r dims).
Packing runs along tokens, so any r works (per-head ranks need not be powers of two); ``group``
is a multiple of 8, so every block packs whole bytes at 2, 4 and 8 bits.

Scale and zero are float16.  The zero is the group minimum rounded to float16 and the scale is
rounded up so that the top of the grid still reaches the maximum: every element is within
half a step of its value, plus the zero's float16 rounding at the bottom of the range.
"""

from __future__ import annotations

import torch

BITS = (2, 4, 8)
FULL_PRECISION = 16


def check_bits(bits: int, what: str = "bits") -> int:
    """A supported bit width (2, 4, 8, or 16 for unquantized), else one clear error."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (*BITS, FULL_PRECISION):
        raise ValueError(f"{what} must be one of 2, 4, 8 or 16 (unquantized); got {bits!r}")
    return bits


def parse_bit_pair(text: str, what: str = "bits") -> tuple[int, int]:
    """'4' -> (4, 4); '4/2' -> (4, 2) (keys / values), each checked; errors name `what`."""
    try:
        values = [int(part) for part in str(text).split("/")]
    except ValueError:
        raise ValueError(f"{what} {text!r} must be K or K/V with K, V in 2, 4, 8, 16 (e.g. 4 or 4/2)") from None
    if len(values) not in (1, 2):
        raise ValueError(f"{what} {text!r} must be K or K/V (e.g. 4 or 4/2)")
    return check_bits(values[0], f"{what} (keys)"), check_bits(values[-1], f"{what} (values)")


def _scale_zero(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    levels = (1 << bits) - 1
    zero = low.to(torch.float16)
    scale32 = ((high - zero.float()) / levels).clamp_min(2.0**-14)  # float16's smallest normal number
    scale = scale32.to(torch.float16)
    short = scale.float() < scale32
    scale = torch.where(short, (scale.float() * (1 + 2.0**-10)).to(torch.float16), scale)  # round up
    return scale, zero


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., T, r]`` (T a multiple of 8 // bits) -> bytes ``[..., T * bits // 8, r]``."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    shaped = codes.unflatten(-2, (codes.shape[-2] // per_byte, per_byte))
    out = torch.zeros_like(shaped[..., 0, :])
    for index in range(per_byte):
        out |= shaped[..., index, :] << (bits * index)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., T * bits // 8, r]`` -> codes ``[..., T, r]``."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * index)) & mask for index in range(per_byte)]
    return torch.stack(parts, dim=-2).flatten(-3, -2)


def quantize_keys(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel over blocks of ``group`` tokens: (packed, scale, zero), scale/zero ``[B, H, T // group, r]``."""
    blocks = x.float().unflatten(-2, (x.shape[-2] // group, group))  # [B, H, n, group, r]
    scale, zero = _scale_zero(blocks.amin(dim=-2), blocks.amax(dim=-2), bits)
    codes = ((blocks - zero.float().unsqueeze(-2)) / scale.float().unsqueeze(-2)).round_()
    codes = codes.clamp_(0, (1 << bits) - 1).to(torch.uint8).flatten(-3, -2)
    return pack(codes, bits), scale, zero


def dequantize_keys(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    dtype: torch.dtype) -> torch.Tensor:
    codes = unpack(packed, bits).unflatten(-2, (scale.shape[-2], -1)).to(dtype)
    return (codes * scale.to(dtype).unsqueeze(-2) + zero.to(dtype).unsqueeze(-2)).flatten(-3, -2)


def quantize_values(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token over its r dims: (packed, scale, zero), scale/zero ``[B, H, T, 1]``."""
    values = x.float()
    scale, zero = _scale_zero(values.amin(dim=-1, keepdim=True), values.amax(dim=-1, keepdim=True), bits)
    codes = ((values - zero.float()) / scale.float()).round_().clamp_(0, (1 << bits) - 1).to(torch.uint8)
    return pack(codes, bits), scale, zero


def dequantize_values(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                      dtype: torch.dtype) -> torch.Tensor:
    return unpack(packed, bits).to(dtype) * scale.to(dtype) + zero.to(dtype)

"""RoPE geometry the baselines rely on: rotation planes of a head and a table of cos/sin by position.

transformers' Llama rotates dimension i together with i + d/2 (``rotate_half``), by an angle that
depends on the position and on the pair's frequency. A projector P commutes with every such rotation
exactly when its range is a union of whole planes (i, i + d/2): all frequencies differ, so P must be
block-diagonal over planes, and a 2-D projector commuting with every rotation of the plane is 0 or I.
"""

from __future__ import annotations

import torch
from torch import nn

# Their frequencies change with the sequence length seen, so a table sliced by position would be wrong.
UNSUPPORTED_ROPE = ("dynamic", "longrope")


def plane_energies(rows: torch.Tensor) -> torch.Tensor:
    """``[..., d, n]`` rows of a head's projection -> ``[..., d/2]`` squared norm of each plane (float64)."""
    squared = rows.double().pow(2).sum(-1)
    half = squared.shape[-1] // 2
    return squared[..., :half] + squared[..., half:]


def plane_basis(energies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation basis keeping whole planes, strongest first.

    ``energies [..., d/2]`` -> (basis ``[..., d, d]`` whose columns 2j, 2j+1 are the unit vectors of the
    j-th strongest plane, the sorted energies ``[..., d/2]``). Any leading 2j columns span a union of
    planes, so truncating the basis commutes with RoPE.
    """
    half = energies.shape[-1]
    sorted_energies, order = torch.sort(energies, dim=-1, descending=True, stable=True)
    columns = torch.stack([order, order + half], dim=-1).flatten(-2)
    basis = nn.functional.one_hot(columns, 2 * half).transpose(-1, -2).to(torch.float32)
    return basis, sorted_energies


class RopeTable:
    """cos/sin of a model's rotary embedding for positions 0..n-1, grown on demand and shared by layers.

    Not an nn.Module on purpose: it only refers to the model's rotary module, so the weights and
    buffers are not registered twice.
    """

    def __init__(self, rotary: nn.Module) -> None:
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type in UNSUPPORTED_ROPE:
            raise ValueError(
                f"rope_type {rope_type!r} changes its frequencies with the sequence length; the latent cache "
                "re-applies RoPE by position and supports static RoPE only (default, linear, llama3, yarn)"
            )
        self.rotary = rotary
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def get(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) ``[length, d]`` for positions 0..length-1."""
        if self._cos is None or self._cos.shape[0] < length or self._cos.device != device:
            size = max(length, 2 * (self._cos.shape[0] if self._cos is not None else 0), 64)
            positions = torch.arange(size, device=device)[None]
            probe = torch.zeros(1, dtype=torch.float32, device=device)
            cos, sin = self.rotary(probe, positions)
            self._cos, self._sin = cos[0], sin[0]
        return self._cos[:length].to(dtype), self._sin[:length].to(dtype)

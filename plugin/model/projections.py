"""Orthogonal per-KV-head projections U_K, U_V and the value mean mu_V of one decoder layer.

U = B @ cayley(A): B is a fixed orthogonal basis (the PCA initialisation), A a trainable
skew-symmetric matrix (zero at initialisation, so U = B exactly). The Cayley map keeps U
orthogonal for any A and is computed in float32 whatever dtype the model runs in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def cayley(raw: torch.Tensor) -> torch.Tensor:
    """Orthogonal (I - A/2)^-1 (I + A/2) for the skew matrix A built from `raw`'s upper triangle."""
    upper = torch.triu(raw.float(), diagonal=1)
    skew = upper - upper.transpose(-1, -2)
    eye = torch.eye(raw.shape[-1], dtype=torch.float32, device=raw.device).expand_as(skew)
    return torch.linalg.solve(eye - 0.5 * skew, eye + 0.5 * skew)


class KVProjection(nn.Module):
    """U_K, U_V (``[n_kv_heads, d, d]``, columns ordered by importance) and mu_V (``[n_kv_heads, d]``)."""

    def __init__(self, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        # .float(): DeepSpeed's zero.Init creates tensors in the training dtype (bf16) whatever was asked;
        # an identity survives the round trip exactly.
        eye = torch.eye(head_dim, dtype=torch.float32).expand(num_kv_heads, head_dim, head_dim).clone().float()
        self.register_buffer("key_base", eye)
        self.register_buffer("value_base", eye.clone())
        self.key_skew = nn.Parameter(torch.zeros(num_kv_heads, head_dim, head_dim, dtype=torch.float32))
        self.value_skew = nn.Parameter(torch.zeros(num_kv_heads, head_dim, head_dim, dtype=torch.float32))
        self.value_mean = nn.Parameter(torch.zeros(num_kv_heads, head_dim, dtype=torch.float32))

    def _apply(self, fn: Callable, recurse: bool = True) -> KVProjection:
        # Model-wide casts (.half(), .to(bfloat16), DeepSpeed's bf16 wrap) would round the fixed bases
        # and break orthogonality; keep them float32, following only device moves.
        bases = {name: self._buffers[name] for name in ("key_base", "value_base")}
        super()._apply(fn, recurse)
        for name, old in bases.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32 and old is not None and old.device.type != "meta":
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # A buffer born in bf16 (zero.Init) would round the loaded bases to 2^-8 (|U^T U - I| ~ 3e-3):
        # load them into float32 buffers instead.
        for name in ("key_base", "value_base"):
            buffer = self._buffers[name]
            if prefix + name in state_dict and buffer is not None and buffer.dtype != torch.float32 \
                    and buffer.device.type != "meta":
                self._buffers[name] = torch.empty(buffer.shape, dtype=torch.float32, device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_K, U_V, mu_V) in float32; called as a module so that ZeRO-3 gathers the parameters first."""
        return self.bases()

    @torch.no_grad()
    def set_bases(
        self,
        key_basis: torch.Tensor | None = None,
        value_basis: torch.Tensor | None = None,
        value_mean: torch.Tensor | None = None,
    ) -> None:
        """Install new bases (orthogonal, columns by importance) and reset the trainable rotations."""
        for name, tensor in (("key_base", key_basis), ("value_base", value_basis)):
            if tensor is not None:
                target = self._buffers[name]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(f"{name} must have shape {tuple(target.shape)}, got {tuple(tensor.shape)}")
                self._buffers[name] = tensor.detach().to(device=target.device, dtype=torch.float32).clone()
        if value_mean is not None:
            if tuple(value_mean.shape) != tuple(self.value_mean.shape):
                raise ValueError(f"value_mean must have shape {tuple(self.value_mean.shape)}, got {tuple(value_mean.shape)}")
            self.value_mean.copy_(value_mean.to(self.value_mean.dtype))
        self.key_skew.zero_()
        self.value_skew.zero_()

    def _basis(self, base: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        base = base.float()
        if not raw.requires_grad and not bool(raw.any()):
            return base  # cayley(0) = I exactly; skip the solve
        # An enclosing bf16/fp16 autocast (DDP with bf16, the trainer's forward) would run this matmul in
        # half precision and leave U orthogonal only to ~2^-8.
        with torch.autocast(device_type=base.device.type, enabled=False):
            return base @ cayley(raw)

    def key_basis(self) -> torch.Tensor:
        return self._basis(self.key_base, self.key_skew)

    def value_basis(self) -> torch.Tensor:
        return self._basis(self.value_base, self.value_skew)

    def bases(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_K, U_V, mu_V) in float32."""
        return self.key_basis(), self.value_basis(), self.value_mean.float()

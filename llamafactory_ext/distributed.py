"""One set of projections across processes: bases broadcast from rank 0 and checked by checksum.

The fixed bases U_K^0 / U_V^0 are buffers.  transformers' ZeRO-3 loader loads module state on
rank 0 only (inside a parameter gather that broadcasts parameters, not buffers), so ranks 1..N
would keep the identity bases while rank 0 has the PCA ones: each rank would train a different
model.  :class:`BasesAcrossRanks` broadcasts the buffers from rank 0 before the first step, then
checks that every rank holds bit-identical effective bases U = U^0 cayley(A) and value means, before
and after training, and writes what it saw to ``matryoshka_processes_check.json`` in the output directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from transformers import TrainerCallback

from plugin.model.zero3 import gathered

CHECK_FILE = "matryoshka_processes_check.json"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def projection_digest(pca: Any, mean_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """SHA-256 of the float32 bytes of every layer's (U_K, U_V) and of its mu_V, the fixed bases' dtype, |U^T U - I|.

    `mean_dtype`: round the means through this dtype first (to compare with a run that holds them in bf16).
    """
    bases, means, error, dtypes = hashlib.sha256(), hashlib.sha256(), 0.0, set()
    layers = pca.attention_layers()
    with torch.no_grad(), gathered([p for attn in layers for p in attn.kv_proj.parameters()]):
        for attn in layers:
            dtypes.add(str(attn.kv_proj.key_base.dtype).replace("torch.", ""))
            key, value, mean = (t.detach().float().cpu().contiguous() for t in attn.kv_proj.bases())
            if mean_dtype is not None:
                mean = mean.to(mean_dtype).float()
            for tensor in (key, value):
                bases.update(tensor.numpy().tobytes())
            means.update(mean.numpy().tobytes())
            eye = torch.eye(key.shape[-1])
            for basis in (key, value):
                error = max(error, float((basis.transpose(-1, -2) @ basis - eye).abs().max()))
    return {"bases_sha256": bases.hexdigest(), "means_sha256": means.hexdigest(), "orthogonality_error": error,
            "base_dtype": sorted(dtypes)}


class BasesAcrossRanks(TrainerCallback):
    """Rank 0's fixed bases on every process before training; identical projections on all ranks, checked."""

    def __init__(self, pca: Any) -> None:
        self.pca = pca
        self.seen: dict[str, list[dict[str, Any]]] = {}

    def _gather(self, stage: str) -> list[dict[str, Any]]:
        local = projection_digest(self.pca)
        if not _distributed():
            self.seen[stage] = [local]
            return self.seen[stage]
        everyone: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, local)
        self.seen[stage] = everyone
        return everyone

    @torch.no_grad()
    def _broadcast_bases(self) -> None:
        for attn in self.pca.attention_layers():
            for name in ("key_base", "value_base"):
                buffer = attn.kv_proj._buffers[name]
                if buffer.dtype != torch.float32:
                    buffer = attn.kv_proj._buffers[name] = buffer.float()
                torch.distributed.broadcast(buffer, src=0)
            attn.invalidate()

    def _check(self, stage: str, args: Any) -> None:
        digests = {(entry["bases_sha256"], entry["means_sha256"]) for entry in self.seen[stage]}
        if len(digests) > 1:
            self._write(args)
            raise RuntimeError(
                f"Matryoshka: the KV projections differ across the {len(self.seen[stage])} processes {stage} "
                f"(see {os.path.join(args.output_dir, CHECK_FILE)}); every process must train the same model"
            )

    def _write(self, args: Any) -> None:
        if args.process_index == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, CHECK_FILE), "w") as handle:
                json.dump(self.seen, handle, indent=1)

    def on_train_begin(self, args, state, control, **kwargs):
        self._gather("as loaded")
        if _distributed():
            self._broadcast_bases()
        self._gather("before training")
        self._check("before training", args)

    def on_train_end(self, args, state, control, **kwargs):
        self._gather("after training")
        self._check("after training", args)
        self._write(args)

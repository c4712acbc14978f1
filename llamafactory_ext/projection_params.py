"""Helpers shared by the patches and the trainers: find the PcaLlama model inside wrappers,
pick its projection parameters, freeze the base model, save / load projections beside a LoRA
adapter.  Imports torch (only used after LLaMA-Factory itself is imported)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

PROJECTIONS_FILE = "matryoshka_projections.safetensors"
PCALLAMA = "pcallama"
# Names of trainable adapter weights that must stay trainable when the base model is frozen.
ADAPTER_MARKERS = ("lora_", "oft_", "modules_to_save", "vera_", "ia3_")


def find_pca_model(model: Any) -> torch.nn.Module | None:
    """The ``PcaLlamaForCausalLM`` inside ``model`` (itself, under PEFT, DDP or a DeepSpeed engine).

    Looks for a module whose *class* defines ``set_sampled_ranks`` (PEFT wrappers forward
    attribute access to the base model, so a plain ``hasattr`` would also match them).
    """
    if model is None or not isinstance(model, torch.nn.Module):
        return None
    for module in model.modules():
        if callable(getattr(type(module), "set_sampled_ranks", None)) and callable(
            getattr(type(module), "clear_sampled_ranks", None)
        ):
            return module
    return None


def model_type_of(model: Any) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def is_pcallama(model: Any) -> bool:
    return find_pca_model(model) is not None


def projection_parameters(pca: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable projection parameters (Cayley generators and mu_V) of a PcaLlama model."""
    params: list[torch.nn.Parameter] = []
    getter = getattr(pca, "projection_parameters", None)
    if callable(getter):
        for item in getter():
            param = item[1] if isinstance(item, tuple) else item
            if isinstance(param, torch.nn.Parameter):
                params.append(param)
    if not params:  # fall back on the naming contract: projection parameters live in `kv_proj`
        params = [p for name, p in pca.named_parameters() if "kv_proj" in name]
    if not params:
        raise ValueError("the PcaLlama model exposes no projection parameters (nothing named `kv_proj`).")
    return params


def projection_names(pca: torch.nn.Module) -> list[str]:
    """Names (relative to the PcaLlama model) of its projection parameters."""
    ids = {id(p) for p in projection_parameters(pca)}
    return [name for name, p in pca.named_parameters() if id(p) in ids]


def is_adapter_name(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


def configure_trainable(
    model: torch.nn.Module,
    pca: torch.nn.Module,
    train_base: bool,
    cast_projections_to_fp32: bool = False,
) -> dict[str, int]:
    """Projections trainable; base weights frozen unless ``train_base`` (adapter weights untouched).

    Returns counts of trainable parameters: ``{"projection": n, "other": m, "frozen": k}``.
    """
    ids = {id(p) for p in projection_parameters(pca)}
    counts = {"projection": 0, "other": 0, "frozen": 0}
    for name, param in model.named_parameters():
        numel = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        if id(param) in ids:
            param.requires_grad_(True)
            if cast_projections_to_fp32 and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)
            counts["projection"] += numel
        elif train_base or is_adapter_name(name):
            if param.requires_grad:
                counts["other"] += numel
            else:
                counts["frozen"] += numel
        else:
            param.requires_grad_(False)
            counts["frozen"] += numel
    return counts


def align_trainable_dtypes(model: torch.nn.Module, pca: torch.nn.Module) -> int:
    """Give every trainable tensor the projections' dtype; returns how many were cast.

    DeepSpeed ZeRO-3 flattens all trainable parameters into one buffer of one dtype.  zero.Init builds
    the projections in the training dtype (bf16) while PEFT then creates adapters in float32; the
    engine keeps float32 master copies of all of them, so holding the adapters in bf16 loses nothing
    the projections did not already lose.
    """
    dtypes = {p.dtype for p in projection_parameters(pca)}
    if len(dtypes) != 1:
        return 0
    (dtype,) = dtypes
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype and not hasattr(param, "ds_id"):
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def _is_zero3() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled

        return bool(is_deepspeed_zero3_enabled())
    except Exception:  # noqa: BLE001
        return False


def projection_state_dict(pca: torch.nn.Module, full_state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Projection tensors keyed by their names inside the PcaLlama model (CPU, contiguous).

    ``full_state_dict`` (e.g. the gathered ZeRO-3 state dict the Trainer hands to ``_save``, keys
    possibly prefixed by PEFT) is searched first; otherwise the live parameters are read
    (gathered under ZeRO-3).
    """
    names = projection_names(pca)
    out: dict[str, torch.Tensor] = {}
    if full_state_dict:
        for name in names:
            for key, tensor in full_state_dict.items():
                if key == name or key.endswith("." + name):
                    out[name] = tensor.detach().cpu().contiguous()
                    break
        if len(out) == len(names):
            return out
        out = {}
    params = dict(pca.named_parameters())
    selected = [params[name] for name in names]
    if _is_zero3():
        import deepspeed

        with deepspeed.zero.GatheredParameters(selected, modifier_rank=None):
            return {name: params[name].detach().cpu().clone().contiguous() for name in names}
    return {name: params[name].detach().cpu().clone().contiguous() for name in names}


def save_projections(pca: torch.nn.Module, output_dir: str, full_state_dict: dict | None = None) -> str:
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, PROJECTIONS_FILE)
    state = projection_state_dict(pca, full_state_dict)
    save_file(state, path, metadata={"format": "pt", "model_type": PCALLAMA, "names": json.dumps(sorted(state))})
    return path


@torch.no_grad()
def load_projections(pca: torch.nn.Module, directory: str) -> bool:
    """Load ``matryoshka_projections.safetensors`` from ``directory`` into ``pca`` (False if absent)."""
    path = os.path.join(directory, PROJECTIONS_FILE)
    if not os.path.isfile(path):
        return False
    from safetensors.torch import load_file

    state = load_file(path)
    names = set(projection_names(pca))
    missing, unexpected = names - set(state), set(state) - names
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}."
        )
    params = dict(pca.named_parameters())
    selected = [params[name] for name in names]
    if _is_zero3():
        import deepspeed

        with deepspeed.zero.GatheredParameters(selected, modifier_rank=0):
            for name in names:
                params[name].data.copy_(state[name].to(params[name].dtype))
    else:
        for name in names:
            params[name].data.copy_(state[name].to(device=params[name].device, dtype=params[name].dtype))
    for module in pca.modules():  # drop inference weights derived from the old projections
        invalidate = getattr(module, "invalidate", None)
        if callable(invalidate) and module is not pca:
            invalidate()
    return True


def invalidate_inference_caches(pca: torch.nn.Module) -> None:
    for module in pca.modules():
        invalidate = getattr(type(module), "invalidate", None)
        if callable(invalidate):
            invalidate(module)

"""`PcaLlamaForCausalLM`: a Llama whose keys and values pass through truncatable orthogonal projections."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM, LlamaModel, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ..attention import PcaLlamaAttention
from ..budgets.ranks import (
    RankTable,
    check_budget,
    write_rank_file,
)
from ..cache import (
    CompressedCache,
    PcaCache,
    QuantizedPcaCache,
    QuantSpec,
    own_cache,
    prepare_generation_cache,
)
from ..families import PCA_TYPES
from ..storage.artifact_format import read_projections
from .config import PcaLlamaConfig
from .kv_settings import KVSettings
from .rope import RopeTable

RANK_FILE = "kv_ranks.json"


class PcaLlamaModel(LlamaModel):
    config_class = PcaLlamaConfig
    attention_class: type[PcaLlamaAttention] = PcaLlamaAttention  # a model family may change it

    def __init__(self, config: PcaLlamaConfig) -> None:
        super().__init__(config)
        for index, layer in enumerate(self.layers):
            layer.self_attn = self.attention_class(config, index)
        self.sampling = False
        quant = getattr(config, "kv_quant", None)  # integer codes for the cache (set_kv_bits)
        self.kv_quant: QuantSpec | None = QuantSpec.from_dict(quant) if quant else None

    def new_cache(self, reserve: int | None = None) -> CompressedCache:
        """An empty cache for the current setting: quantized when bits are set, else projected.

        `reserve`: the expected final length in tokens, allocated at the first update.
        """
        if self.kv_quant is not None and not self.kv_quant.is_identity():
            return QuantizedPcaCache(self.kv_quant)
        return PcaCache(reserve=reserve)

    def forward(self, *args: Any, past_key_values: Any = None, use_cache: bool | None = None, **kwargs: Any) -> Any:
        if len(args) > len(FORWARD_ARGS):
            raise TypeError(f"pass arguments after {', '.join(FORWARD_ARGS)} by name")
        kwargs.update(zip(FORWARD_ARGS, args))  # by name from here on (a family may replace some)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.sampling:
            use_cache = False  # sampled ranks are a training device; their masked states are never cached
        past_key_values = own_cache(past_key_values, use_cache, CompressedCache, self.new_cache)
        kwargs["position_ids"] = positions_from_mask(kwargs)
        kwargs = self.family_inputs(past_key_values, kwargs)
        if getattr(self.config, "kv_key_space", "post-rope") == "pre-rope" and past_key_values is not None:
            kwargs["rope_table"] = self.rope_table()  # keys rebuilt from the cache are rotated when attended
        return super().forward(past_key_values=past_key_values, use_cache=use_cache, **kwargs)

    def rope_table(self) -> RopeTable:
        """cos / sin at any position from this model's rotary embedding (one table, kept while it is the same)."""
        table = getattr(self, "_rope_table", None)
        if table is None or table.rotary is not self.rotary_emb:
            table = self._rope_table = RopeTable(self.rotary_emb)
        return table

    def family_inputs(self, past_key_values: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """What a model family changes in the inputs of Llama's forward (Mistral: its sliding-window mask)."""
        return kwargs


FORWARD_ARGS = ("input_ids", "attention_mask", "position_ids")  # LlamaModel.forward's leading positional names


def positions_from_mask(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Positions counted from each row's first real token, when a padded 2-D mask comes without them.

    Below full rank the projected keys are not shift-invariant under RoPE (the plain model's
    scores depend only on distances), so a left-padded row numbered from its first pad, as a
    bare forward does, would be scored differently than alone. generate() already passes
    these positions; this gives every other caller (evaluation harnesses) the same.
    """
    position_ids, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    if position_ids is not None or not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask.all()):
        return position_ids
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None or mask.shape[-1] < tokens.shape[1]:
        return position_ids
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tokens.shape[1]:]


class PcaLlamaForCausalLM(KVSettings, LlamaForCausalLM):
    """Llama causal LM with MatryoshkaKV projections; full rank reproduces the base model."""

    config_class = PcaLlamaConfig
    _keep_in_fp32_modules = ["kv_proj"]  # noqa: RUF012 - transformers reads this class attribute
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    model_class: type[PcaLlamaModel] = PcaLlamaModel  # a model family may change it

    def __init__(self, config: PcaLlamaConfig) -> None:
        super(LlamaForCausalLM, self).__init__(config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self._apply_ranks(config.resolved_kv_ranks())

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_llama(
        cls,
        model: PreTrainedModel,
        key_bases: torch.Tensor | None = None,
        value_bases: torch.Tensor | None = None,
        value_means: torch.Tensor | None = None,
        ranks: RankTable | None = None,
        projections: str | os.PathLike | None = None,
        key_space: str = "post-rope",
    ) -> PcaLlamaForCausalLM:
        """Wrap a LlamaForCausalLM (MHA or GQA) with identity or given bases.

        Bases are ``[n_layers, n_kv_heads, d, d]`` with columns ordered by importance; value means
        ``[n_layers, n_kv_heads, d]``. The new model shares the base weights' storage with `model`.
        `projections`, a directory written by save_projections / `mkv export-projections`, supplies
        bases, means and ranks instead (`ranks` still overrides); see plugin.storage.artifact_format.
        `key_space`: "post-rope" (the paper's) or "pre-rope" (the key basis before RoPE; see plugin.attention).
        """
        from ..families import check_convertible, family_of

        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type in PCA_TYPES:
            raise ValueError("this model is already a PcaLlama; load it with AutoModelForCausalLM.from_pretrained")
        if not hasattr(model, "lm_head"):
            raise ValueError(f"MatryoshkaKV converts causal LMs (with an lm_head); got {type(model).__name__}")
        family = family_of(model_type)  # one clear error naming the supported families
        check_convertible(config)
        target = family.causal_lm_class()
        if cls is not PcaLlamaForCausalLM and cls is not target:
            raise ValueError(f"{cls.__name__} cannot hold a {model_type} model; use {target.__name__}.from_llama")
        if projections is not None:
            if key_bases is not None or value_bases is not None or value_means is not None:
                raise ValueError("give projections or key_bases/value_bases/value_means, not both")
            artifact, table, tensors = read_projections(projections, model, ranks)
            pca = cls.from_llama(model, tensors["key_bases"], tensors["value_bases"], tensors["value_means"],
                                 ranks=table, key_space=artifact["kv_key_space"])
            pca.config.kv_rank_step = artifact["kv_rank_step"]
            pca.set_kv_ranks(table)
            return pca
        fields = config.to_dict()
        for name in ("model_type", "architectures", "auto_map", "sliding_window", "transformers_version",
                     "use_sliding_window", "max_window_layers", "layer_types"):
            if name not in target.config_class.family_fields:
                fields.pop(name, None)
        pca_config = target.config_class(**fields, kv_ranks=ranks, kv_key_space=key_space)
        pca_config._attn_implementation = config._attn_implementation
        pca_config.architectures = [target.__name__]
        device = next(model.parameters()).device
        with torch.device("meta"):
            pca = target(pca_config)
        pca.load_state_dict(model.state_dict(), strict=False, assign=True)
        # What the state dict does not carry (projections, RoPE frequencies) is built for real; the
        # frequencies are then taken from the source as it is now (a model cast with .to(bf16) holds
        # bf16 ones), so that full rank stays bit-exact to it.
        rotary = LlamaRotaryEmbedding(config=pca_config, device=device)
        source = getattr(getattr(model, "model", None), "rotary_emb", None)
        if isinstance(getattr(source, "inv_freq", None), torch.Tensor) and source.inv_freq.shape == rotary.inv_freq.shape:
            rotary.inv_freq = source.inv_freq.detach().clone()
            rotary.original_inv_freq = rotary.inv_freq
            rotary.attention_scaling = source.attention_scaling
        pca.model.rotary_emb = rotary
        for layer in pca.model.layers:
            attn = layer.self_attn
            attn.kv_proj = type(attn.kv_proj)(attn.num_kv_heads, attn.head_dim).to(device)
        leftover = [name for name, t in [*pca.named_parameters(), *pca.named_buffers()] if t.device.type == "meta"]
        if leftover:
            raise RuntimeError(f"weights missing after conversion: {leftover[:5]}")
        pca.tie_weights()
        pca.set_bases(key_bases, value_bases, value_means)
        pca.train(model.training)
        return pca

    @torch.no_grad()
    def set_bases(
        self,
        key_bases: torch.Tensor | None = None,
        value_bases: torch.Tensor | None = None,
        value_means: torch.Tensor | None = None,
    ) -> None:
        """Install per-layer bases ``[L, n_kv, d, d]`` / means ``[L, n_kv, d]`` (None keeps the current ones)."""
        for index, attn in enumerate(self.attention_layers()):
            attn.kv_proj.set_bases(
                None if key_bases is None else key_bases[index],
                None if value_bases is None else value_bases[index],
                None if value_means is None else value_means[index],
            )
            attn.invalidate()

    # -- ranks -------------------------------------------------------------------------------
    def attention_layers(self) -> list[PcaLlamaAttention]:
        return [layer.self_attn for layer in self.model.layers]

    @contextlib.contextmanager
    def exact_full_rank(self) -> Iterator[PcaLlamaForCausalLM]:
        """Inside, cache-free forwards compute the base model exactly: attention skips the projections.

        Ranks, sampled ranks and bases are ignored while inside (forwards with a cache still project, so a
        cache never mixes projected and raw states); the flag is always restored.
        """
        layers = self.attention_layers()
        saved = [attn.skip_projections for attn in layers]
        try:
            for attn in layers:
                attn.skip_projections = True
            yield self
        finally:
            for attn, flag in zip(layers, saved):
                attn.skip_projections = flag

    # -- training ----------------------------------------------------------------------------
    def set_sampled_ranks(self, key: torch.Tensor | None, value: torch.Tensor | None) -> None:
        """Mask trailing dims to these ranks (LongTensor [L, n_kv] each) in the next forwards; None clears."""
        if key is not None:
            cfg = self.config
            shape = (cfg.num_hidden_layers, cfg.num_key_value_heads)
            for name, t in (("key", key), ("value", value)):
                if t is None or tuple(t.shape) != shape:
                    raise ValueError(f"sampled {name} ranks must be a tensor of shape {shape}")
                if int(t.min()) < 1 or int(t.max()) > cfg.head_dim:
                    raise ValueError(f"sampled {name} ranks must lie in [1, head_dim={cfg.head_dim}]")
        for index, attn in enumerate(self.attention_layers()):
            attn.set_sampled_ranks(None if key is None else key[index], None if value is None else value[index])
        self.model.sampling = key is not None

    def clear_sampled_ranks(self) -> None:
        self.set_sampled_ranks(None, None)

    def projection_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable projection parameters (Cayley skews and value means)."""
        return [p for name, p in self.named_parameters() if ".kv_proj." in name]

    def train(self, mode: bool = True) -> PcaLlamaForCausalLM:
        super().train(mode)
        for attn in self.attention_layers():
            attn.invalidate()  # weights may have changed: rebuild folded weights on next use
        return self

    # -- save / load -------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_rank_file(Path(save_directory) / RANK_FILE, self.get_kv_ranks(), self.config.head_dim)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> PcaLlamaForCausalLM:
        """transformers' loader, plus the checkpoint's kv_ranks.json and two optional keywords.

        kv_budget (uniform ranks) or kv_rank_file (per-head ranks) override the saved ranks, and
        kv_bits (4, or "4/2" for 4-bit keys and 2-bit values) quantizes the cache; being keywords,
        they also pass through tools that forward model kwargs (OpenCompass --model-kwargs).
        """
        budget, rank_file = kwargs.pop("kv_budget", None), kwargs.pop("kv_rank_file", None)
        bits = kwargs.pop("kv_bits", None)
        if bits is not None:
            from ..cache.quant_codec import check_bits, parse_bit_pair

            bits = parse_bit_pair(bits, "kv_bits") if isinstance(bits, str) else (check_bits(bits, "kv_bits"),) * 2
        if budget is not None and rank_file is not None:
            raise ValueError("give kv_budget or kv_rank_file, not both")
        if budget is not None:
            check_budget(budget)  # before the weights load
        if rank_file is not None and not Path(rank_file).is_file():
            raise FileNotFoundError(f"kv_rank_file {str(rank_file)!r} does not exist; create one with `mkv search-budget`")
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        saved = Path(str(pretrained_model_name_or_path)) / RANK_FILE
        if isinstance(model, PcaLlamaForCausalLM):
            if saved.is_file():
                model.load_rank_file(saved)  # the human-editable rank file wins over config.json
            if budget is not None:
                model.set_kv_budget(float(budget))
            elif rank_file is not None:
                model.load_rank_file(rank_file)
            if bits is not None:
                model.set_kv_bits(*bits)
        return model

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any) -> None:
        # generate knows the final length (prompt + new tokens): allocate it once, no doubling.
        length = kwargs.get("max_cache_length", args[2] if len(args) > 2 else None)
        factory = partial(self.model.new_cache, reserve=length if isinstance(length, int) else None)
        prepare_generation_cache(generation_config, model_kwargs, CompressedCache, factory)  # refuses static caches
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        prepare_generation_cache(generation_config, model_kwargs, CompressedCache, factory)


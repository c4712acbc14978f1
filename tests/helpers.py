"""Small shared helpers for tests (random orthogonal bases, PcaLlama conversion)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from plugin import PcaLlamaForCausalLM


def random_bases(model: torch.nn.Module, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, head_dim)
    gen = torch.Generator().manual_seed(seed)
    keys = torch.linalg.qr(torch.randn(shape, generator=gen))[0]
    values = torch.linalg.qr(torch.randn(shape, generator=gen))[0]
    means = 0.5 * torch.randn(shape[:-1], generator=gen)
    return keys, values, means


def prefill_then_decode(model: torch.nn.Module, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of `tokens` read as a prefill of `prefill` tokens, then one token at a time through the cache."""
    out = model(tokens[:, :prefill], use_cache=True)
    steps = [out.logits]
    for t in range(prefill, tokens.shape[1]):
        out = model(tokens[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


def to_pca(model: torch.nn.Module, seed: int = 1, key_space: str = "post-rope") -> PcaLlamaForCausalLM:
    """A PcaLlama with random orthogonal bases and value means (any basis must be exact at full rank)."""
    return PcaLlamaForCausalLM.from_llama(model, *random_bases(model, seed), key_space=key_space).eval()


def save_tiny_base(model: torch.nn.Module, out_dir: str | os.PathLike, text_file: str | os.PathLike | None = None,
                   words: int = 600) -> None:
    """Save a tiny Llama with a word-level tokenizer over its 128-token vocabulary ("w0".."w126", "<eos>"),
    and optionally a text file of random such words, so the `mkv` commands run on it end to end."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(127)} | {"<eos>": 127}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if text_file is not None:
        gen = torch.Generator().manual_seed(0)
        Path(text_file).write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 127, (words,), generator=gen)))


def save_tiny_pca(base: torch.nn.Module, base_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  key_space: str = "post-rope") -> PcaLlamaForCausalLM:
    """`to_pca(base)` saved beside the base's tokenizer (the base saved too), so a benchmark loads it by path."""
    save_tiny_base(base, base_dir)
    pca = to_pca(base, key_space=key_space)
    pca.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(base_dir) / name).exists():
            (Path(out_dir) / name).write_bytes((Path(base_dir) / name).read_bytes())
    return pca


def forward_with_layer_masks(model: PcaLlamaForCausalLM, ids: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Logits of a full forward (no cache) in which attention layer i attends under `masks[i]` (bool, 4-D: one per
    KV head or broadcast), handed to the layer in place of the mask transformers built; the hooks always go."""

    def hook_for(mask: torch.Tensor):
        def hook(module, args, kwargs):
            kwargs["attention_mask"] = mask
            return args, kwargs
        return hook

    handles = [attn.register_forward_pre_hook(hook_for(mask), with_kwargs=True)
               for attn, mask in zip(model.attention_layers(), masks)]
    try:
        return model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()

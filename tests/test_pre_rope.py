"""Keys projected before RoPE (``kv_key_space="pre-rope"``): exact at full rank, consistent below it.

The cache holds r coefficients of each key before RoPE; attention rebuilds the keys and rotates them at
their positions (slots of the cache, or the positions an eviction kept: see test_eviction.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from helpers import prefill_then_decode, random_bases, to_pca
from test_families import FAMILIES, _build, _ids

from plugin import PcaCache, PcaLlamaForCausalLM
from plugin.cache import TieredPcaCache
from plugin.model.pca import collect_statistics, pca_from_statistics
from plugin.storage.artifacts import load_projections, save_projections


def _pre(base: torch.nn.Module) -> PcaLlamaForCausalLM:
    return PcaLlamaForCausalLM.from_llama(base, *random_bases(base), key_space="pre-rope").eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_equals_the_base_model_prefill_decode_and_padding(family: str, impl: str) -> None:
    base = _build(family, impl)
    pca = _pre(base)
    tokens = _ids()
    with torch.no_grad():
        expected = base(tokens).logits
        torch.testing.assert_close(pca(tokens, use_cache=False).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(prefill_then_decode(pca, tokens, 6), expected, atol=1e-4, rtol=0)
        # rebuilt through U (a nested-basis cache never keeps the model's own basis): still exact
        nested = PcaCache(nested_bases=True)
        first = pca(tokens[:, :9], past_key_values=nested, use_cache=True).logits
        rest = pca(tokens[:, 9:], past_key_values=nested, use_cache=True).logits
        torch.testing.assert_close(torch.cat([first, rest], dim=1), expected, atol=1e-4, rtol=0)
    padded = _ids(3, 9, seed=1)
    mask = torch.ones_like(padded)
    mask[0, :3] = 0
    mask[2, :1] = 0
    padded = padded.masked_fill(mask == 0, 0)
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(base.generate(padded, **kwargs), pca.generate(padded, **kwargs))


def test_training_masks_at_full_rank_are_exact_and_below_it_equal_truncation() -> None:
    base = make_tiny_llama("gqa")
    pca = _pre(base)
    tokens = _ids(2, 20)
    cfg = pca.config
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads)
    pca.set_sampled_ranks(torch.full(shape, cfg.head_dim), torch.full(shape, cfg.head_dim))
    with torch.no_grad():
        torch.testing.assert_close(pca(tokens).logits, base(tokens).logits, atol=1e-4, rtol=0)
    ranks = torch.tensor([[4, 12], [8, 16]])
    pca.set_sampled_ranks(ranks, ranks.flip(0))
    with torch.no_grad():
        sampled = pca(tokens).logits
    pca.clear_sampled_ranks()
    pca.set_kv_ranks(ranks.tolist(), ranks.flip(0).tolist())
    with torch.no_grad():
        torch.testing.assert_close(pca(tokens, use_cache=False).logits, sampled, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_below_full_rank_the_cache_equals_one_forward_and_padded_rows_score_as_alone(kind: str) -> None:
    pca = to_pca(make_tiny_llama(kind, attn_implementation="sdpa"), key_space="pre-rope")
    pca.set_kv_budget(0.5)
    tokens = _ids(2, 24, seed=3)
    with torch.no_grad():
        whole = pca(tokens, use_cache=False).logits
        cache = PcaCache(chunk=8)
        parts = [pca(tokens[:, :10], past_key_values=cache, use_cache=True).logits]
        parts += [pca(tokens[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(10, 24)]
        torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=0)
        assert cache.live_nbytes() == 2 * 24 * pca.kv_cache_bytes_per_token(torch.float32)  # no positions stored
        # a left-padded row through the cache reads as the same row alone (slots are shifted by the pads)
        padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), tokens[:1]], dim=1)
        mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 24, dtype=torch.long)], dim=1)
        cache = PcaCache()
        first = pca(padded[:, :14], attention_mask=mask[:, :14], past_key_values=cache, use_cache=True).logits
        rest = pca(padded[:, 14:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(torch.cat([first, rest], dim=1)[:, 4:], whole[:1], atol=1e-5, rtol=0)


def test_shrink_tiers_and_bits_work_on_pre_rope_coefficients() -> None:
    model = to_pca(make_tiny_llama("mha", attn_implementation="sdpa", num_hidden_layers=1), key_space="pre-rope")
    ids = _ids(2, 36, seed=5)
    cache = PcaCache(chunk=8)
    model(input_ids=ids[:, :30], past_key_values=cache, use_cache=True)
    model.shrink_cache(cache, budget=0.5)
    after = torch.cat([model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                       for t in range(30, 36)], dim=1)
    fresh = PcaCache(chunk=8)
    model(input_ids=ids[:, :30], past_key_values=fresh, use_cache=True)
    direct = torch.cat([model(input_ids=ids[:, t:t + 1], past_key_values=fresh, use_cache=True).logits
                        for t in range(30, 36)], dim=1)
    torch.testing.assert_close(after, direct, atol=1e-5, rtol=0)
    # a tier window covering every token is the plain cache; a short one changes only what is beyond it
    plain = model(input_ids=ids, use_cache=False).logits
    wide = model(input_ids=ids, past_key_values=TieredPcaCache(64, 2), use_cache=True).logits
    torch.testing.assert_close(wide, plain, atol=1e-5, rtol=0)
    tiered = TieredPcaCache(8, 2)
    model(input_ids=ids[:, :30], past_key_values=tiered, use_cache=True)
    step = model(input_ids=ids[:, 30:31], past_key_values=tiered, use_cache=True).logits
    assert not torch.allclose(step, plain[:, 30:31], atol=1e-3)
    # 8-bit coefficients: close to the unquantized cache, the same bytes as post-RoPE keys at those ranks
    model.set_kv_bits(8)
    quantized = model(input_ids=ids, use_cache=True)
    torch.testing.assert_close(quantized.logits, plain, atol=0.05, rtol=0)
    post = to_pca(make_tiny_llama("mha", attn_implementation="sdpa", num_hidden_layers=1))
    post.set_kv_budget(0.5)
    post.set_kv_bits(8)
    assert quantized.past_key_values.nbytes() == post(input_ids=ids, use_cache=True).past_key_values.nbytes()


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_pre_rope_statistics_over_windows_of_several_lengths_equal_a_float64_computation(kind: str) -> None:
    base = make_tiny_llama(kind)
    generator = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 128, (3, 16), generator=generator), torch.randint(0, 128, (2, 40), generator=generator)]
    stats = collect_statistics(base, windows, batch_size=2, progress=False, key_space="pre-rope")
    moments = stats.moments()
    keys: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(
        lambda _m, _i, out, index=index: keys.setdefault(index, []).append(out.detach().double()))
        for index, layer in enumerate(base.model.layers)]
    try:
        with torch.no_grad():
            for rows in windows:
                base(rows)
    finally:
        for hook in hooks:
            hook.remove()
    n_kv, d = base.config.num_key_value_heads, base.config.head_dim
    for layer, chunks in keys.items():
        k = torch.cat([c.reshape(-1, n_kv, d) for c in chunks]).transpose(0, 1)  # [H, N, d], before RoPE
        assert k.shape[1] == 3 * 16 + 2 * 40 == int(stats.count[layer])
        torch.testing.assert_close(moments["key_second"][layer], k.transpose(1, 2) @ k / k.shape[1], atol=1e-8, rtol=0)
    result = pca_from_statistics(stats, key_statistic="second-moment")
    model, _ = PcaLlamaForCausalLM.from_llama(base, key_space="pre-rope"), None
    model.set_bases(result.key_bases, result.value_bases, result.value_means)
    model.set_kv_budget(0.5)
    post = to_pca(base)  # a random post-RoPE basis at the same ranks reads worse than the pre-RoPE PCA
    post.set_kv_budget(0.5)
    tokens = torch.randint(0, 128, (2, 48), generator=generator)
    with torch.no_grad():
        reference = torch.log_softmax(base(tokens).logits, -1)
        errors = [torch.nn.functional.kl_div(torch.log_softmax(m(tokens).logits, -1), reference, log_target=True,
                                             reduction="batchmean") for m in (model, post)]
    assert errors[0] < errors[1]


def test_the_key_space_round_trips_through_checkpoints_and_artifacts(tmp_path) -> None:
    base = make_tiny_llama("gqa")
    model = _pre(base)
    model.set_kv_budget(0.5)
    tokens = _ids(1, 20)
    with torch.no_grad():
        expected = model(tokens).logits
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["kv_key_space"] == "pre-rope"
    loaded = PcaLlamaForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()  # as `model`
    save_projections(model, tmp_path / "proj")
    assert json.loads((tmp_path / "proj" / "projections_config.json").read_text())["kv_key_space"] == "pre-rope"
    from_artifact = load_projections(make_tiny_llama("gqa"), tmp_path / "proj")
    with torch.no_grad():
        for other in (loaded, from_artifact):
            assert other.config.kv_key_space == "pre-rope"
            torch.testing.assert_close(other(tokens).logits, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="kv_key_space"):
        PcaLlamaForCausalLM.from_llama(base, key_space="before")

"""The quantized projected cache: packing, error bounds, exact bytes, generate, batch operations."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from helpers import to_pca

from plugin import PcaLlamaForCausalLM
from plugin.cache import PcaCache, QuantizedPcaCache, QuantSpec
from plugin.cache.quant_codec import dequantize_keys, dequantize_values, pack, quantize_keys, quantize_values, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (2, 3, 64, 5), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (2, 3, 64 * bits // 8, 5)
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantization_error_within_the_grid_bound(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 128, 24, generator=gen) * torch.linspace(0.1, 20.0, 24)  # outlier channels
    packed, scale, zero = quantize_keys(x, bits, group=64)
    assert scale.shape == zero.shape == (2, 3, 2, 24) and scale.dtype == torch.float16
    back = dequantize_keys(packed, scale, zero, bits, torch.float32)
    blocks = x.unflatten(-2, (2, 64))
    bound = scale.float().unsqueeze(-2) / 2 + blocks.amin(-2, keepdim=True).abs() * 2.0**-10 + 1e-6
    assert ((back.unflatten(-2, (2, 64)) - blocks).abs() <= bound).all()

    packed, scale, zero = quantize_values(x, bits)
    assert scale.shape == (2, 3, 128, 1)
    back = dequantize_values(packed, scale, zero, bits, torch.float32)
    bound = scale.float() / 2 + x.amin(-1, keepdim=True).abs() * 2.0**-10 + 1e-6
    assert ((back - x).abs() <= bound).all()
    # and the bound is tight enough to matter: more bits, smaller error
    if bits == 8:
        assert (back - x).abs().max() < 0.01 * x.abs().max()


def _model(kind: str = "gqa", budget: float = 0.75):
    model = to_pca(make_tiny_llama(kind, attn_implementation="sdpa"))
    model.set_kv_budget(budget)
    return model


def test_sixteen_bits_equals_the_unquantized_path_exactly() -> None:
    model = _model()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    cfg = model.config
    spec = QuantSpec.uniform(cfg.num_hidden_layers, cfg.num_key_value_heads, 16)
    plain, quant = PcaCache(), QuantizedPcaCache(spec)
    a = model(input_ids=ids[:, :30], past_key_values=plain, use_cache=True).logits
    b = model(input_ids=ids[:, :30], past_key_values=quant, use_cache=True).logits
    assert torch.equal(a, b)
    for step in range(30, 40):
        a = model(input_ids=ids[:, step:step + 1], past_key_values=plain, use_cache=True).logits
        b = model(input_ids=ids[:, step:step + 1], past_key_values=quant, use_cache=True).logits
        assert torch.equal(a, b)
    assert quant.nbytes() == plain.live_nbytes()  # the quantized cache holds exactly what it uses
    model.set_kv_bits(16)
    assert type(model.model.new_cache()) is PcaCache


@pytest.mark.parametrize("bits,residual", [(4, 0), (2, 8), (8, 0)])
def test_bytes_held_equal_the_formula(bits: int, residual: int) -> None:
    model = _model(budget=0.5)
    group = 16
    model.set_kv_bits(bits, group=group, residual=residual)
    cache = model.model.new_cache()
    assert isinstance(cache, QuantizedPcaCache)
    batch = 3
    ids = torch.randint(0, 128, (batch, 45), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids[:, :37], past_key_values=cache, use_cache=True)
    for step in range(37, 45):
        model(input_ids=ids[:, step:step + 1], past_key_values=cache, use_cache=True)
        tokens = step + 1
        quantized = max(0, tokens - residual) // group * group
        ranks = model.get_kv_ranks()
        per_head = 0
        for rk_row, rv_row in zip(ranks["key"], ranks["value"]):
            for rk, rv in zip(rk_row, rv_row):
                codes = quantized * (rk + rv) * bits // 8
                scales = (quantized // group) * rk * 4 + quantized * 4  # float16 scale + zero
                tail = (tokens - quantized) * (rk + rv) * 4  # float32 model
                per_head += codes + scales + tail
        assert cache.nbytes() == batch * per_head, (tokens, cache.nbytes(), batch * per_head)
    rate = model.kv_cache_bytes_per_token()
    assert rate == pytest.approx(sum((rk * bits / 8 + 4 * rk / group) + (rv * bits / 8 + 4)
                                     for rk_row, rv_row in zip(ranks["key"], ranks["value"])
                                     for rk, rv in zip(rk_row, rv_row)))


def test_eight_bits_is_close_and_generate_runs_with_batch_and_left_padding() -> None:
    model = _model()
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(2))
    reference = model(input_ids=ids).logits
    model.set_kv_bits(8, group=16)
    cache = model.model.new_cache()
    model(input_ids=ids[:, :32], past_key_values=cache, use_cache=True)
    steps = [model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(32, 48)]
    decoded = torch.cat(steps, dim=1)
    assert (decoded - reference[:, 32:]).abs().max() < 0.05 * reference.abs().max()

    model.set_kv_bits(4, value_bits=2, group=16)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    out = model.generate(input_ids=ids[:, :20], attention_mask=mask, max_new_tokens=24, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (2, 44)
    # Scales are per sequence: the unpadded row decodes as it does alone.  (A padded row's first key
    # block also spans its pads, so its codes differ from decoding it alone, as in any per-block scheme.)
    alone = model.generate(input_ids=ids[:1, :20], max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0], alone[0])


def test_per_head_bits_and_ranks_mix_in_one_layer() -> None:
    model = _model("mha")
    model.set_kv_ranks({"key": [[8, 8, 16, 8], [4, 12, 12, 12]], "value": [[8, 8, 16, 8], [16, 12, 12, 12]]})
    bits = [[4, 16, 8, 2], [2, 4, 4, 16]]
    model.set_kv_bits(bits, value_bits=[[16, 4, 2, 8], [8, 8, 2, 4]], group=8)
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(3))
    cache = model.model.new_cache()
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    assert torch.isfinite(logits).all()
    # Heads at 16 bits hold exactly the unquantized projected states.
    plain = PcaCache()
    model(input_ids=ids, past_key_values=plain, use_cache=True)
    layer0 = cache.layers[0]
    groups_plain = plain.layers[0].key_groups
    heads_of_group = [entry[2:] for entry in layer0.signature]
    for group_index, heads in enumerate(heads_of_group):
        for part in layer0.parts[group_index]:
            if part.keys.bits == 16:
                positions = list(part.positions)
                assert torch.equal(part.keys.states(), groups_plain[group_index][:, positions])
    assert cache.get_seq_length() == 30


def test_crop_reorder_and_repeat_keep_lengths_and_bytes_consistent() -> None:
    model = _model()
    model.set_kv_bits(4, group=8)
    ids = torch.randint(0, 128, (2, 29), generator=torch.Generator().manual_seed(4))
    cache = model.model.new_cache()
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    before = [s.states().clone() for s in cache.layers[0].streams()]
    cache.crop(21)  # inside the quantized part: 16 tokens stay codes, 5 return to the tail
    assert cache.get_seq_length() == 21
    for stream, old in zip(cache.layers[0].streams(), before):
        assert stream.quantized == 16
        assert torch.allclose(stream.states(), old[..., :21, :])
    cache.reorder_cache(torch.tensor([1, 0]))
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].keys.shape[0] == 4
    out = model(input_ids=ids[[1, 1, 0, 0], 21:22], past_key_values=cache, use_cache=True).logits
    assert out.shape[0] == 4 and cache.get_seq_length() == 22


def test_bad_bits_are_refused_clearly() -> None:
    model = _model()
    with pytest.raises(ValueError, match="one of 2, 4, 8 or 16"):
        model.set_kv_bits(3)
    with pytest.raises(ValueError, match=r"\[2\]\[2\] table"):
        model.set_kv_bits([[4, 4]])
    with pytest.raises(ValueError, match="multiple of 8"):
        model.set_kv_bits(4, group=12)
    assert model.get_kv_bits() is None


def test_from_pretrained_kv_bits_keyword(tmp_path) -> None:
    from plugin import PcaLlamaForCausalLM

    _model().save_pretrained(tmp_path / "m")
    model = PcaLlamaForCausalLM.from_pretrained(tmp_path / "m", kv_budget=0.5, kv_bits="4/2")
    spec = model.get_kv_bits()
    assert {b for row in spec.key_bits for b in row} == {4} and {b for row in spec.value_bits for b in row} == {2}
    assert isinstance(model.model.new_cache(), QuantizedPcaCache)
    with pytest.raises(ValueError, match="one of 2, 4, 8 or 16"):
        PcaLlamaForCausalLM.from_pretrained(tmp_path / "m", kv_bits=5)


def test_full_rank_heads_quantize_in_the_models_own_basis() -> None:
    """At full rank any orthogonal basis is exact, so the cache keeps the model's own keys and values: a
    trained PcaLlama at full rank x 4 bits is exactly KIVI-style quantization of the base model."""
    rotated = to_pca(make_tiny_llama("gqa", attn_implementation="sdpa"))
    identity = PcaLlamaForCausalLM.from_llama(make_tiny_llama("gqa", attn_implementation="sdpa")).eval()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(5))
    logits = []
    for model in (rotated, identity):
        model.set_kv_bits(4, group=8)
        logits.append(model(input_ids=ids, past_key_values=model.model.new_cache(), use_cache=True).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    # heads below full rank still cache their projection, and a mixed layer stays exact unquantized
    for model in (rotated, identity):
        model.set_kv_bits(16)
    rotated.set_kv_ranks({"key": [[16, 4], [16, 16]], "value": [[8, 16], [16, 2]]})
    cache = PcaCache()
    rotated(input_ids=ids, past_key_values=cache, use_cache=True)
    widths = sorted(int(group.shape[-1]) for group in cache.layers[0].key_groups)
    assert widths == [4, 16]

"""Training-free baselines (weight-pca, weight-pca-shared, svd-latent): exactness, RoPE, real cache bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from plugin import baselines
from plugin.baselines.rope import plane_basis, plane_energies
from plugin.baselines.svd_latent import fit_svd_latent, latent_ranks
from plugin.baselines.weight_pca import fit_weight_pca
from plugin.model.modeling import PcaLlamaForCausalLM

METHODS = baselines.METHODS
TOL = 1e-4


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, length), generator=generator)


def full_rank_settings(method: str, model: torch.nn.Module) -> list[dict]:
    cfg = model.config
    full = cfg.head_dim if method != "svd-latent" else 2 * cfg.num_key_value_heads * cfg.head_dim
    return [{}, {"budget": 1.0}, {"variance": 1.0}, {"rank": full}]


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False, **kwargs).logits


# -- full rank is the base model --------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("method", METHODS)
def test_full_rank_equals_base(method, kind, attn):
    base = make_tiny_llama(kind, attn)
    ids = tokens()
    reference = logits(base, ids)
    for setting in full_rank_settings(method, base):
        model = baselines.build(method, base, **setting).eval()
        assert torch.allclose(logits(model, ids), reference, atol=TOL), (method, setting)


# -- reported bytes are what the cache holds ----------------------------------------------------
@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("setting", [{"budget": 0.5}, {"budget": 0.25}, {"variance": 0.9}, {"variance": 0.6}])
def test_measured_cache_bytes_match_reported(method, kind, setting):
    base = make_tiny_llama(kind)
    model = baselines.build(method, base, **setting).eval()
    ids = tokens(batch=3, length=10)
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    held = sum(t.numel() * t.element_size() for t in cache_tensors(cache))
    assert held == cache.nbytes() == model.kv_cache_bytes_per_token() * ids.numel()
    assert baselines.measure_cache_bytes_per_token(model, ids) == model.kv_cache_bytes_per_token()
    assert model.kv_cache_bytes_per_token() <= model.full_cache_bytes_per_token()
    if "budget" in setting:
        assert model.kv_cache_bytes_per_token() == setting["budget"] * model.full_cache_bytes_per_token()


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor the cache object holds, read from its layers directly."""
    found = []
    for layer in cache.layers:
        if hasattr(layer, "latent"):
            found.append(layer.latent)
        else:
            found.extend([*layer.key_groups, *layer.value_groups])
    return found


@pytest.mark.parametrize("method", METHODS)
def test_cache_bytes_follow_the_model_dtype(method):
    model = baselines.build(method, make_tiny_llama("gqa"), budget=0.5).to(torch.bfloat16).eval()
    measured = baselines.measure_cache_bytes_per_token(model, tokens())
    assert measured == model.kv_cache_bytes_per_token() == model.kv_cache_bytes_per_token(torch.float32) // 2


def test_full_model_cache_is_measured_from_dynamic_cache(tiny_llama):
    assert baselines.measure_cache_bytes_per_token(tiny_llama, tokens()) == baselines.full_cache_bytes_per_token(
        tiny_llama
    )


def test_budget_ranks_give_equal_bytes_across_methods():
    base = make_tiny_llama("gqa")
    for budget in (0.875, 0.5, 0.25):
        sizes = {m: baselines.build(m, base, budget=budget).kv_cache_bytes_per_token() for m in METHODS}
        assert len(set(sizes.values())) == 1, sizes


def test_variance_threshold_gives_per_head_ranks():
    base = make_tiny_llama("mha")
    model = baselines.build("weight-pca", base, variance=0.7)
    ranks = model.get_kv_ranks()
    assert all(r % 2 == 0 for row in ranks["key"] for r in row)  # whole RoPE planes
    fit = fit_weight_pca(base)
    for kind, energy, unit in (("key", fit.key_energy, 2), ("value", fit.value_energy, 1)):
        for layer, row in enumerate(ranks[kind]):
            for head, rank in enumerate(row):
                explained = energy[layer, head].cumsum(0) / energy[layer, head].sum()
                assert explained[rank // unit - 1] >= 0.7
                assert rank // unit == 1 or explained[rank // unit - 2] < 0.7
    shared = baselines.build("weight-pca-shared", base, variance=0.7).get_kv_ranks()
    assert shared["key"] == shared["value"]


# -- RoPE ---------------------------------------------------------------------------------------
def test_truncated_plane_basis_commutes_with_rope():
    torch.manual_seed(0)
    d = 16
    basis, _ = plane_basis(torch.rand(d // 2))
    for r in (2, 6, 10):
        projector = basis[:, :r] @ basis[:, :r].T
        for position in (0, 3, 117):
            angle = position / 10000 ** (torch.arange(0, d, 2).float() / d)
            cos = torch.cat([angle.cos(), angle.cos()])[None, None, None]
            sin = torch.cat([angle.sin(), angle.sin()])[None, None, None]
            x = torch.randn(1, 1, 1, d)
            rotated_projected, _ = apply_rotary_pos_emb(x @ projector, x, cos, sin)
            projected_rotated = apply_rotary_pos_emb(x, x, cos, sin)[0] @ projector
            assert torch.allclose(rotated_projected, projected_rotated, atol=1e-6)


def test_plane_energies_pair_i_with_i_plus_half():
    rows = torch.zeros(8, 3)
    rows[1, 0], rows[5, 1] = 2.0, 1.0
    energies = plane_energies(rows)
    assert energies.tolist() == [0.0, 5.0, 0.0, 0.0]
    basis, _ = plane_basis(energies)
    assert basis[:, 0].argmax() == 1 and basis[:, 1].argmax() == 5


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_weight_pca_bases_are_the_documented_ones(kind):
    """Per KV head (rows h*d..(h+1)*d): value columns = eigenvectors of W_v W_v^T by descending eigenvalue;
    key columns 2j, 2j+1 = the unit vectors of plane (i, i + d/2) with the j-th largest W_k plane energy."""
    base = make_tiny_llama(kind)
    fit = fit_weight_pca(base)
    cfg = base.config
    d, n_kv = cfg.head_dim, cfg.num_key_value_heads
    for index, layer in enumerate(base.model.layers):
        w_k = layer.self_attn.k_proj.weight.detach().double()
        w_v = layer.self_attn.v_proj.weight.detach().double()
        for head in range(n_kv):
            rows = slice(head * d, (head + 1) * d)
            basis = fit.value_bases[index, head].double()
            assert torch.allclose(basis.T @ basis, torch.eye(d, dtype=torch.float64), atol=1e-5)
            gram = basis.T @ w_v[rows] @ w_v[rows].T @ basis
            assert torch.allclose(gram, torch.diag(gram.diagonal()), atol=1e-5)
            assert torch.allclose(gram.diagonal(), fit.value_energy[index, head], atol=1e-5)
            assert bool((fit.value_energy[index, head].diff() <= 1e-9).all())
            planes = w_k[rows].pow(2).sum(-1)
            planes = planes[: d // 2] + planes[d // 2 :]
            keys = fit.key_bases[index, head]
            for j in range(d // 2):
                first = int(keys[:, 2 * j].argmax())
                assert first < d // 2 and int(keys[:, 2 * j + 1].argmax()) == first + d // 2
                assert float(planes[first]) == pytest.approx(float(fit.key_energy[index, head, j]))
            assert bool((fit.key_energy[index, head].diff() <= 1e-9).all())


def surgery_weight_pca(base, fit, ranks) -> torch.nn.Module:
    """The base model with W_k and W_v replaced by their truncations, applied BEFORE RoPE."""
    model = copy.deepcopy(base)
    cfg = base.config
    d, n_kv = cfg.head_dim, cfg.num_key_value_heads
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            for proj, bases, kind in ((attn.k_proj, fit.key_bases, "key"), (attn.v_proj, fit.value_bases, "value")):
                blocks = proj.weight.view(n_kv, d, -1)
                for head in range(n_kv):
                    kept = bases[index, head][:, : ranks[kind][index][head]]
                    blocks[head] = kept @ kept.T @ blocks[head]
    return model


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("setting", [{"budget": 0.5}, {"variance": 0.7}])
def test_weight_pca_after_rope_equals_truncated_weights_before_rope(kind, shared, setting):
    """PcaLlama projects keys after RoPE; with plane bases that equals truncating W_k before RoPE."""
    base = make_tiny_llama(kind)
    fit = fit_weight_pca(base, shared=shared)
    model = baselines.build("weight-pca-shared" if shared else "weight-pca", base, **setting).eval()
    reference = surgery_weight_pca(base, fit, model.get_kv_ranks())
    ids = tokens()
    assert not torch.allclose(logits(model, ids), logits(base, ids), atol=1e-3)  # really truncated
    assert torch.allclose(logits(model, ids), logits(reference, ids), atol=TOL)


def test_a_non_plane_key_basis_would_not_commute_with_rope():
    """Control for the test above: the SVD basis of W_k, truncated after RoPE, is not a weight truncation."""
    base = make_tiny_llama("gqa")
    fit = fit_weight_pca(base)
    cfg = base.config
    svd_keys = torch.stack(
        [torch.linalg.svd(layer.self_attn.k_proj.weight.detach().view(cfg.num_key_value_heads, cfg.head_dim, -1))[0]
         for layer in base.model.layers]
    )
    fit.key_bases = svd_keys
    ranks = fit.ranks(budget=0.5)
    model = PcaLlamaForCausalLM.from_llama(base, svd_keys, fit.value_bases, fit.value_means, ranks).eval()
    ids = tokens()
    assert not torch.allclose(logits(model, ids), logits(surgery_weight_pca(base, fit, ranks), ids), atol=1e-3)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_svd_latent_equals_low_rank_weights_with_rope_on_rebuilt_keys(kind):
    base = make_tiny_llama(kind)
    fits = fit_svd_latent(base)
    ranks = latent_ranks(fits, budget=0.25)
    model = baselines.build("svd-latent", base, budget=0.25).eval()
    assert model.latent_ranks() == ranks
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for layer, fit, rank in zip(reference.model.layers, fits, ranks):
            down, up_key, up_value = fit.factors(rank)
            layer.self_attn.k_proj.weight.copy_(up_key @ down)
            layer.self_attn.v_proj.weight.copy_(up_value @ down)
    ids = tokens()
    assert not torch.allclose(logits(model, ids), logits(base, ids), atol=1e-3)
    assert torch.allclose(logits(model, ids), logits(reference, ids), atol=TOL)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("method", METHODS)
def test_decoding_token_by_token_equals_full_forward(method, kind, attn):
    model = baselines.build(method, make_tiny_llama(kind, attn), budget=0.5).eval()
    ids = tokens(batch=2, length=11)
    full = logits(model, ids)
    prefix = 4
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefix], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for position in range(prefix, ids.shape[1]):
            out = model(input_ids=ids[:, position : position + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=TOL)
    assert cache.get_seq_length() == ids.shape[1]
    assert cache.live_nbytes() == model.kv_cache_bytes_per_token() * ids.numel()
    held = ids.shape[1]  # preallocated buffers: at most 1/8 of the tokens plus one chunk (16) more
    assert cache.live_nbytes() <= baselines.cache_nbytes(cache) <= cache.live_nbytes() * (held + held // 8 + 16) / held


@pytest.mark.parametrize("method", METHODS)
def test_shifted_positions_and_left_padding_match_base(method):
    """RoPE scores depend on position differences: the latent cache re-rotates keys by cache index."""
    base = make_tiny_llama("gqa", "sdpa")
    model = baselines.build(method, base).eval()
    ids = tokens(batch=2, length=9)
    positions = torch.arange(9)[None].expand(2, 9) + torch.tensor([[7], [3]])
    assert torch.allclose(logits(model, ids, position_ids=positions), logits(base, ids, position_ids=positions),
                          atol=TOL)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, positions counted from the first real token as generate does
    padded_positions = (mask.cumsum(-1) - 1).clamp_min(0)
    kwargs = {"attention_mask": mask, "position_ids": padded_positions}
    got, want = logits(model, ids, **kwargs), logits(base, ids, **kwargs)
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=TOL)


@pytest.mark.parametrize("method", METHODS)
def test_generate_at_full_rank_matches_base(method):
    base = make_tiny_llama("gqa", "sdpa")
    model = baselines.build(method, base).eval()
    ids = tokens(batch=1, length=6)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(ids, **settings), base.generate(ids, **settings))


# -- save / load, input checks -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["weight-pca", "weight-pca-shared"])
def test_weight_pca_models_are_pcallama_checkpoints(method, tmp_path):
    base = make_tiny_llama("gqa")
    model = baselines.build(method, base, variance=0.8).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, PcaLlamaForCausalLM)
    assert loaded.get_kv_ranks() == model.get_kv_ranks()
    ids = tokens()
    assert torch.allclose(logits(loaded, ids), logits(model, ids), atol=1e-6)


def test_svd_latent_rank_options():
    base = make_tiny_llama("gqa")
    assert baselines.build("svd-latent", base, rank=[10, 20]).latent_ranks() == [10, 20]
    assert baselines.build("svd-latent", base, rank=12).latent_ranks() == [12, 12]
    ranks = baselines.build("svd-latent", base, variance=0.8).latent_ranks()
    for fit, rank in zip(fit_svd_latent(base), ranks):
        explained = fit.singular.pow(2).cumsum(0) / fit.singular.pow(2).sum()
        assert explained[rank - 1] >= 0.8 and (rank == 1 or explained[rank - 2] < 0.8)


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("nope", {}, "unknown baseline method"),
        ("weight-pca", {"budget": 0.5, "rank": 4}, "at most one"),
        ("weight-pca", {"variance": 0.0}, "outside"),
        ("weight-pca", {"budget": 1.5}, "outside"),
        ("weight-pca", {"rank": 17}, "above head_dim"),
        ("weight-pca", {"rank": [4, 4]}, "one rank for every KV head"),
        ("svd-latent", {"rank": 65}, "outside"),
        ("svd-latent", {"rank": [4]}, "one latent rank per layer"),
    ],
)
def test_bad_input_is_a_clear_value_error(method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        baselines.build(method, make_tiny_llama("gqa"), **kwargs)


def test_non_llama_input_is_rejected():
    pca = PcaLlamaForCausalLM.from_llama(make_tiny_llama("gqa"))
    with pytest.raises(ValueError, match="Llama-family"):
        baselines.build("svd-latent", pca)


def test_latent_model_refuses_a_foreign_cache():
    from transformers.cache_utils import DynamicCache

    model = baselines.build("svd-latent", make_tiny_llama("gqa"), budget=0.5).eval()
    ids = tokens()
    cache = DynamicCache()
    make_tiny_llama("gqa")(input_ids=ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="LatentCache"):
        model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)


# -- the embedded real model ----------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_cache_bytes_at_half_budget():
    from plugin.storage.assets import load_embedded_model

    base, tokenizer = load_embedded_model()
    ids = tokenizer("The state of the union is strong.", return_tensors="pt")["input_ids"]
    full = baselines.measure_cache_bytes_per_token(base, ids)
    assert full == baselines.full_cache_bytes_per_token(base) == 2 * 30 * 3 * 64 * 4
    for method in METHODS:
        model = baselines.build(method, base, budget=0.5).eval()
        assert baselines.measure_cache_bytes_per_token(model, ids) == model.kv_cache_bytes_per_token() == full / 2

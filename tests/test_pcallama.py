"""PcaLlama: exactness at full rank, compressed attention formulas, cache size, save/load, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_llama
from helpers import random_bases, to_pca

from plugin import PcaCache, PcaLlamaForCausalLM
from plugin.budgets.ranks import uniform_ranks

IMPLS = ["eager", "sdpa"]
KINDS = ["mha", "gqa"]


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_full_rank_equals_base_prefill_and_decode(kind: str, impl: str) -> None:
    base = make_tiny_llama(kind, attn_implementation=impl)
    pca = to_pca(base)
    tokens = ids()
    with torch.no_grad():
        expected = base(tokens).logits
        torch.testing.assert_close(pca(tokens, use_cache=False).logits, expected, atol=1e-4, rtol=0)
        out = pca(tokens[:, :5], use_cache=True)
        assert isinstance(out.past_key_values, PcaCache)
        steps = [out.logits]
        for t in range(5, tokens.shape[1]):
            out = pca(tokens[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_identical_tokens_with_left_padding(kind: str) -> None:
    base = make_tiny_llama(kind, attn_implementation="sdpa")
    pca = to_pca(base)
    tokens = ids(3, 9)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    tokens = tokens.masked_fill(mask == 0, 0)
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(base.generate(tokens, **kwargs), pca.generate(tokens, **kwargs))
    torch.manual_seed(3)
    sampled_base = base.generate(tokens, attention_mask=mask, max_new_tokens=6, do_sample=True, pad_token_id=0)
    torch.manual_seed(3)
    sampled_pca = pca.generate(tokens, attention_mask=mask, max_new_tokens=6, do_sample=True, pad_token_id=0)
    assert torch.equal(sampled_base, sampled_pca)


@pytest.mark.parametrize("impl", IMPLS)
def test_left_padded_rows_score_as_if_alone_below_full_rank(impl: str) -> None:
    """A bare forward with a padded mask numbers positions from each row's first real token."""
    pca = to_pca(make_tiny_llama("gqa", attn_implementation=impl))
    pca.set_kv_budget(0.375)
    tokens = ids(2, 10)
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0
    with torch.no_grad():
        padded = pca(tokens, attention_mask=mask, use_cache=False).logits
        alone = pca(tokens[:1, 4:], use_cache=False).logits
        shifted = pca(tokens[:1], attention_mask=mask[:1], position_ids=torch.arange(10)[None], use_cache=False).logits
        # prefill a padded batch, then decode one token: the cache keeps the shifted positions
        out = pca(tokens[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        step = pca(tokens[:, -1:], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(padded[:1, 4:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(step[:1, 0], alone[:, -1], atol=1e-5, rtol=0)
    # the positions matter below full rank: numbered from the first pad the row scores differently
    assert (shifted[:, 4:] - alone).abs().max() > 1e-4  # float round-off here is ~1e-7


def reference_attention(attn, hidden, cos, sin, key_ranks, value_ranks):
    """Direct computation of the MatryoshkaKV formulas for one layer, head by head."""
    from transformers.models.llama.modeling_llama import rotate_half

    batch, length, _ = hidden.shape
    d = attn.head_dim
    n_kv, n_rep = attn.num_kv_heads, attn.num_key_value_groups
    q = attn.q_proj(hidden).view(batch, length, -1, d).transpose(1, 2)
    k = attn.k_proj(hidden).view(batch, length, n_kv, d).transpose(1, 2)
    v = attn.v_proj(hidden).view(batch, length, n_kv, d).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    u_k, u_v, mu = attn.kv_proj.bases()
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    heads = []
    for head in range(q.shape[1]):
        g = head // n_rep
        uk, uv = u_k[g][:, : key_ranks[g]], u_v[g][:, : value_ranks[g]]
        qp, kp = q[:, head] @ uk, k[:, g] @ uk
        vp = (v[:, g] - mu[g]) @ uv
        scores = (qp @ kp.transpose(-1, -2)) / d**0.5
        scores = scores.masked_fill(~causal, float("-inf"))
        heads.append(torch.softmax(scores, -1) @ vp @ uv.T + mu[g])
    return attn.o_proj(torch.stack(heads, dim=2).reshape(batch, length, -1))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_compressed_attention_matches_formulas(kind: str, fold: bool, impl: str) -> None:
    base = make_tiny_llama(kind, attn_implementation=impl)
    pca = to_pca(base)
    pca.config.kv_fold = fold
    n_kv = base.config.num_key_value_heads
    key_ranks = [4, 10, 16, 7][:n_kv]
    value_ranks = [12, 2, 5, 16][:n_kv]
    pca.set_kv_ranks([key_ranks, [16] * n_kv], [value_ranks, [16] * n_kv])
    attn = pca.attention_layers()[0]
    hidden = torch.randn(2, 7, base.config.hidden_size)
    positions = torch.arange(7).unsqueeze(0)
    cos, sin = pca.model.rotary_emb(hidden, positions)
    with torch.no_grad():
        got, _ = attn(hidden, (cos, sin), attention_mask=None)
        expected = reference_attention(attn, hidden, cos, sin, key_ranks, value_ranks)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_mask_path_equals_truncation(kind: str) -> None:
    base = make_tiny_llama(kind)
    pca = to_pca(base)
    n_kv = base.config.num_key_value_heads
    key = torch.tensor([[4, 8, 12, 16][:n_kv], [16, 2, 6, 10][:n_kv]])
    value = torch.tensor([[16, 6, 2, 8][:n_kv], [8, 8, 14, 4][:n_kv]])
    tokens = ids()
    with torch.no_grad():
        pca.set_kv_ranks(key.tolist(), value.tolist())
        truncated = pca(tokens).logits
        pca.set_kv_budget(1.0)
        pca.train()
        pca.set_sampled_ranks(key, value)
        sampled = pca(tokens).logits
        pca.clear_sampled_ranks()
    torch.testing.assert_close(sampled, truncated, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cache_bytes_equal_budget_exactly(kind: str) -> None:
    base = make_tiny_llama(kind)
    pca = to_pca(base)
    tokens = ids(2, 10)
    with torch.no_grad():
        full = pca(tokens, use_cache=True).past_key_values.nbytes()
        baseline = base(tokens, use_cache=True).past_key_values
        gqa_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in
                        ((layer.keys, layer.values) for layer in baseline.layers))
        assert full == gqa_bytes
        for budget in (0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125):
            pca.set_kv_budget(budget)
            cache = pca(tokens, use_cache=True).past_key_values
            assert cache.nbytes() * 1.0 == budget * gqa_bytes
            assert cache.nbytes() < gqa_bytes
            assert cache.bytes_per_token() == pca.kv_cache_bytes_per_token()
        n_kv, d = base.config.num_key_value_heads, 16
        mixed = {"key": [[2 + 2 * h for h in range(n_kv)], [d] * n_kv], "value": [[1] * n_kv, [3 + h for h in range(n_kv)]]}
        pca.set_kv_ranks(mixed)
        cache = pca(tokens, use_cache=True).past_key_values
        kept = sum(sum(row) for kind_rows in mixed.values() for row in kind_rows)
        assert cache.nbytes() == kept * tokens.numel() * 4
        assert cache.nbytes() == pca.kv_budget() * gqa_bytes


def test_uniform_budget_rounding_rule() -> None:
    assert uniform_ranks(1, 1, 128, 0.375)["key"] == [[48]]
    assert uniform_ranks(1, 1, 64, 0.3)["key"] == [[16]]  # floor to the grid
    assert uniform_ranks(1, 1, 64, 0.01)["value"] == [[8]]  # at least one step


def test_projections_stay_orthogonal_after_optimizer_steps(tiny_llama_gqa) -> None:
    pca = to_pca(tiny_llama_gqa)
    pca.train()
    for p in pca.parameters():
        p.requires_grad_(False)
    params = pca.projection_parameters()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=0.05)
    tokens = ids()
    for _ in range(5):
        pca.set_sampled_ranks(torch.full((2, 2), 8), torch.full((2, 2), 4))
        loss = pca(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(float(p.detach().abs().max()) > 0 for p in params)
    for attn in pca.attention_layers():
        for basis in (attn.kv_proj.key_basis(), attn.kv_proj.value_basis()):
            eye = torch.eye(basis.shape[-1]).expand_as(basis)
            assert float((basis.transpose(-1, -2) @ basis - eye).abs().max()) < 1e-5


def test_bases_stay_float32_under_half_precision_cast(tiny_llama_mha) -> None:
    pca = to_pca(tiny_llama_mha).to(torch.bfloat16)
    attn = pca.attention_layers()[0]
    assert attn.kv_proj.key_base.dtype == torch.float32
    assert attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert pca(ids()).logits.dtype == torch.bfloat16


def test_bases_stay_float32_and_orthogonal_under_bf16_autocast(tiny_llama_gqa) -> None:
    """DDP / the Trainer run the forward inside autocast; trained bases must not be formed in bf16."""
    pca = to_pca(tiny_llama_gqa)
    attn = pca.attention_layers()[0]
    with torch.no_grad():
        attn.kv_proj.key_skew.normal_(std=0.1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        key_basis, value_basis, _ = attn.kv_proj.bases()
        assert torch.matmul(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16  # autocast is active
    assert key_basis.dtype == value_basis.dtype == torch.float32
    eye = torch.eye(key_basis.shape[-1])
    assert float((key_basis.transpose(-1, -2) @ key_basis - eye).abs().max()) < 1e-5


DUMP = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
state = {k: v for k, v in model.state_dict().items() if "kv_proj" in k}
torch.save({"state": state, "ranks": model.get_kv_ranks(), "cls": type(model).__name__}, sys.argv[2])
"""


def test_save_load_round_trip_bit_exact(tmp_path, tiny_llama_gqa) -> None:
    pca = to_pca(tiny_llama_gqa)
    ranks = {"key": [[4, 16], [8, 12]], "value": [[16, 2], [6, 10]]}
    pca.set_kv_ranks(ranks)
    with torch.no_grad():  # a trained-looking rotation, not just the base
        for attn in pca.attention_layers():
            attn.kv_proj.key_skew.normal_(std=0.1)
    pca.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "kv_ranks.json").read_text())["key"] == ranks["key"]
    # the same attention kernel as the original (a fresh load picks SDPA, whose float rounding differs from eager)
    loaded = PcaLlamaForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation=pca.config._attn_implementation)
    assert loaded.get_kv_ranks() == ranks
    original = {k: v for k, v in pca.state_dict().items() if "kv_proj" in k}
    for name, tensor in loaded.state_dict().items():
        if "kv_proj" in name:
            assert torch.equal(tensor, original[name]), name
    tokens = ids()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(tokens).logits, pca.eval()(tokens).logits)

    # A fresh interpreter that never imports `plugin`: the installed import hook registers pcallama.
    subprocess.run([sys.executable, "-c", DUMP, str(tmp_path / "ckpt"), str(tmp_path / "dump.pt")],
                   check=True, cwd=tmp_path)
    dumped = torch.load(tmp_path / "dump.pt")
    assert dumped["cls"] == "PcaLlamaForCausalLM"
    assert dumped["ranks"] == ranks
    for name, tensor in dumped["state"].items():
        assert torch.equal(tensor, original[name]), name


def test_edited_rank_file_wins_over_config(tmp_path, tiny_llama_mha) -> None:
    pca = to_pca(tiny_llama_mha)
    pca.save_pretrained(tmp_path)
    payload = json.loads((tmp_path / "kv_ranks.json").read_text())
    payload["key"][0][0] = 4
    (tmp_path / "kv_ranks.json").write_text(json.dumps(payload))
    assert PcaLlamaForCausalLM.from_pretrained(tmp_path).get_kv_ranks()["key"][0][0] == 4


def test_from_pretrained_budget_keywords(tmp_path, tiny_llama_gqa) -> None:
    to_pca(tiny_llama_gqa).save_pretrained(tmp_path)
    assert PcaLlamaForCausalLM.from_pretrained(tmp_path, kv_budget="0.375").kv_budget() == 0.375
    ranks = {"key": [[4, 16], [8, 12]], "value": [[16, 2], [6, 10]]}
    from plugin.budgets.ranks import write_rank_file

    write_rank_file(tmp_path / "r.json", ranks, 16)
    assert PcaLlamaForCausalLM.from_pretrained(tmp_path, kv_rank_file=str(tmp_path / "r.json")).get_kv_ranks() == ranks
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        PcaLlamaForCausalLM.from_pretrained(tmp_path, kv_budget=37.5)
    with pytest.raises(FileNotFoundError, match="search-budget"):
        PcaLlamaForCausalLM.from_pretrained(tmp_path, kv_rank_file=str(tmp_path / "missing.json"))


def test_bad_input_errors(tmp_path, tiny_llama_gqa) -> None:
    pca = to_pca(tiny_llama_gqa)
    for budget in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            pca.set_kv_budget(budget)
    with pytest.raises(ValueError, match="outside"):
        pca.set_kv_ranks([[0, 4], [4, 4]], [[4, 4], [4, 4]])
    with pytest.raises(ValueError, match="head_dim=16"):
        pca.set_kv_ranks([[17, 4], [4, 4]], [[4, 4], [4, 4]])
    with pytest.raises(ValueError, match="layers"):
        pca.set_kv_ranks([[4, 4]], [[4, 4]])
    with pytest.raises(ValueError, match="KV heads"):
        pca.set_kv_ranks([[4, 4, 4], [4, 4, 4]], [[4, 4], [4, 4]])
    (tmp_path / "bad.json").write_text('{"key": [[4, 4]], "value": [[4, 4]]}')
    with pytest.raises(ValueError, match="bad.json"):
        pca.load_rank_file(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        pca.load_rank_file(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="search-budget"):
        pca.load_rank_file(tmp_path / "missing.json")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="Llama"):
        PcaLlamaForCausalLM.from_llama(gpt2)


def test_changing_ranks_mid_cache_is_refused(tiny_llama_mha) -> None:
    pca = to_pca(tiny_llama_mha)
    with torch.no_grad():
        cache = pca(ids(), use_cache=True).past_key_values
        pca.set_kv_budget(0.5)
        with pytest.raises(ValueError, match="ranks changed"):
            pca(ids(2, 1), past_key_values=cache, use_cache=True)


@pytest.mark.slow
def test_real_model_full_rank_perplexity_identical() -> None:
    from plugin.evaluation.perplexity import perplexity
    from plugin.storage.assets import load_embedded_model
    from plugin.storage.texts import load_texts, token_windows

    model, tokenizer = load_embedded_model()
    windows = token_windows(tokenizer, load_texts(None, "evaluation"), 256, 512)
    base_ppl = perplexity(model, windows, progress=False)
    pca = PcaLlamaForCausalLM.from_llama(model, *random_bases(model))
    pca_ppl = perplexity(pca, windows, progress=False)
    assert 10 < base_ppl < 60
    assert abs(pca_ppl - base_ppl) / base_ppl < 1e-4


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_full_rank_is_the_base_model_bit_for_bit(kind: str, impl: str, dtype: torch.dtype) -> None:
    """The distillation teacher's path: whatever the ranks, sampled masks and trained bases, equal to the base."""
    base = make_tiny_llama(kind, attn_implementation=impl).to(dtype)
    pca = PcaLlamaForCausalLM.from_llama(make_tiny_llama(kind, attn_implementation=impl), *random_bases(base))
    pca = pca.to(dtype).eval()
    with torch.no_grad():
        for attn in pca.attention_layers():
            attn.kv_proj.key_skew.add_(0.05)
            attn.invalidate()
        n_layers, n_kv = pca.config.num_hidden_layers, pca.config.num_key_value_heads
        pca.set_kv_budget(0.25)
        pca.set_sampled_ranks(torch.full((n_layers, n_kv), 4), torch.full((n_layers, n_kv), 8))
        expected = base(ids()).logits
        with pca.exact_full_rank():
            exact = pca(ids(), use_cache=False).logits
        projected = pca(ids(), use_cache=False).logits
    assert torch.equal(exact, expected)
    assert not torch.allclose(projected, expected, atol=1e-2)  # outside, the sampled ranks apply again
    assert not any(attn.skip_projections for attn in pca.attention_layers())


def test_exact_full_rank_leaves_cached_forwards_projected_and_restores_on_error() -> None:
    pca = to_pca(make_tiny_llama("gqa"))
    pca.set_kv_budget(0.5)
    with torch.no_grad():
        cached = pca(ids(), use_cache=True)
        with pca.exact_full_rank():
            inside = pca(ids(), use_cache=True)
    assert torch.equal(inside.logits, cached.logits)  # a cache never mixes raw and projected states
    assert inside.past_key_values.get_seq_length() == cached.past_key_values.get_seq_length()
    with pytest.raises(RuntimeError, match="boom"), pca.exact_full_rank():
        raise RuntimeError("boom")
    assert not any(attn.skip_projections for attn in pca.attention_layers())


def test_conversion_of_a_model_already_cast_to_bf16_is_bit_exact_at_full_rank() -> None:
    """`.to(bfloat16)` also rounds the base's RoPE frequencies; the converted model must use the same ones."""
    base = make_tiny_llama("gqa", attn_implementation="sdpa").to(torch.bfloat16)
    pca = PcaLlamaForCausalLM.from_llama(base, *random_bases(base)).eval()
    assert pca.model.rotary_emb.inv_freq.dtype == base.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    with torch.no_grad():
        expected = base(ids()).logits
        with pca.exact_full_rank():
            assert torch.equal(pca(ids(), use_cache=False).logits, expected)

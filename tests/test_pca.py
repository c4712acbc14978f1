"""PCA calibration: streaming statistics, bases, and the calibrate / eval commands."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from helpers import to_pca
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from plugin import PcaLlamaForCausalLM
from plugin.model.pca import KVStatistics, calibrate, collect_statistics, pca_from_statistics


def direct_kv(model, windows):
    """Post-RoPE keys and values of every layer computed directly with hooks on the base model."""
    captured = {}

    def hook(layer):
        def inner(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            b, t, _ = hidden.shape
            d = module.head_dim
            k = module.k_proj(hidden).view(b, t, -1, d).transpose(1, 2)
            v = module.v_proj(hidden).view(b, t, -1, d).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            captured.setdefault(layer, []).append((k.double(), v.double()))
        return inner

    handles = [layer.self_attn.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for row in windows:
                model(row[None])
    finally:
        for h in handles:
            h.remove()
    return captured


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_streaming_statistics_match_direct_computation(kind: str) -> None:
    base = make_tiny_llama(kind)
    windows = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(base, windows, batch_size=2, progress=False)
    moments = stats.moments()
    direct = {"covariance": [], "second-moment": []}
    for layer, chunks in sorted(direct_kv(base, windows).items()):
        keys = torch.cat([k for k, _ in chunks], dim=0).permute(1, 0, 2, 3).flatten(1, 2)  # [H, N, d]
        values = torch.cat([v for _, v in chunks], dim=0).permute(1, 0, 2, 3).flatten(1, 2)
        n = keys.shape[1]
        key_mean = keys.mean(dim=1)
        centred_keys = keys - key_mean[:, None]
        direct["second-moment"].append(keys.transpose(1, 2) @ keys / n)
        direct["covariance"].append(centred_keys.transpose(1, 2) @ centred_keys / n)
        torch.testing.assert_close(moments["key_second"][layer], direct["second-moment"][-1], atol=1e-8, rtol=0)
        torch.testing.assert_close(moments["key_mean"][layer], key_mean, atol=1e-8, rtol=0)
        torch.testing.assert_close(moments["key_cov"][layer], direct["covariance"][-1], atol=1e-8, rtol=0)
        mean = values.mean(dim=1)
        centred = values - mean[:, None]
        torch.testing.assert_close(moments["value_mean"][layer], mean, atol=1e-8, rtol=0)
        torch.testing.assert_close(moments["value_cov"][layer], centred.transpose(1, 2) @ centred / n, atol=1e-8, rtol=0)
    assert pca_from_statistics(stats).key_statistic == "covariance"  # the default
    for statistic, matrices in direct.items():
        matrix = torch.stack(matrices)  # [L, H, d, d], float64
        result = pca_from_statistics(stats, key_statistic=statistic)
        assert result.key_statistic == statistic
        torch.testing.assert_close(result.key_means, moments["key_mean"].float())
        scale = float(matrix.abs().max())
        expected = torch.linalg.eigvalsh(matrix).flip(-1)
        torch.testing.assert_close(result.key_eigenvalues.double(), expected, atol=1e-5 * scale, rtol=0)
        basis = result.key_bases.double()  # columns are eigenvectors of this statistic, in decreasing order
        torch.testing.assert_close(matrix @ basis, basis * expected.unsqueeze(-2), atol=1e-4 * scale, rtol=0)
    # the choice matters: keys of a random model have a nonzero mean, so the two spectra differ
    cov, second = (pca_from_statistics(stats, key_statistic=s).key_eigenvalues for s in ("covariance", "second-moment"))
    assert float((second - cov).abs().max()) > 1e-3 * float(second.abs().max())


def test_key_statistic_is_validated(tiny_llama_mha) -> None:
    stats = KVStatistics(1, 1, 4)
    with pytest.raises(ValueError, match="'covariance', 'second-moment'"):
        pca_from_statistics(stats, key_statistic="centred")
    with pytest.raises(ValueError, match="key_statistic 'second_moment' is not one of"):
        calibrate(tiny_llama_mha, torch.zeros(1, 4, dtype=torch.long), progress=False, key_statistic="second_moment")


def test_covariance_basis_errs_by_a_per_query_constant_plus_a_smaller_residual() -> None:
    """Keys with a large common mean: q.P.k = q.k - (a per-query constant) - (a residual softmax sees).

    The constant q (I - P) mu_K cancels in softmax; the residual q (I - P)(k - mu_K) is what the
    covariance basis minimises, so it is smaller than with the second-moment basis, which spends a
    dimension on the mean. The attention weights follow.
    """
    gen = torch.Generator().manual_seed(0)
    d, n, rank = 16, 4096, 4
    rotation = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    spread = torch.logspace(0.5, -1.0, d, dtype=torch.float64)  # standard deviations, decreasing
    mean = 20.0 * rotation[:, -1]  # a large mean along the direction of least variance
    keys = mean + (torch.randn(n, d, generator=gen, dtype=torch.float64) * spread) @ rotation.T
    stats = KVStatistics(1, 1, d)
    stats.observe(0, keys.view(1, 1, n, d), keys.view(1, 1, n, d))
    queries = torch.randn(256, d, generator=gen, dtype=torch.float64)
    full = queries @ keys.T
    key_mean = keys.mean(dim=0)
    residual_ms, attention_tv = {}, {}
    for statistic in ("covariance", "second-moment"):
        result = pca_from_statistics(stats, key_statistic=statistic)
        basis = result.key_bases[0, 0, :, :rank].double()
        dropped = torch.eye(d, dtype=torch.float64) - basis @ basis.T
        error = full - queries @ basis @ basis.T @ keys.T
        constant = queries @ dropped @ key_mean  # one number per query
        residual = error - constant[:, None]
        # the decomposition is exact, and the constant is the per-query mean of the error over keys
        torch.testing.assert_close(residual, queries @ dropped @ (keys - key_mean).T, atol=1e-8, rtol=0)
        torch.testing.assert_close(error.mean(dim=1), constant, atol=1e-8, rtol=0)
        residual_ms[statistic] = float(residual.square().mean())
        truncated = queries @ basis @ basis.T @ keys.T
        probs, reference = (torch.softmax(s / d**0.5, dim=-1) for s in (truncated, full))
        attention_tv[statistic] = float(0.5 * (probs - reference).abs().sum(-1).mean())
        if statistic == "covariance":  # Eckart-Young: the residual energy is the sum of the dropped eigenvalues
            energy = float(((keys - key_mean) @ dropped).square().sum(-1).mean())
            assert energy == pytest.approx(float(result.key_eigenvalues[0, 0, rank:].sum()), rel=1e-4)
    assert residual_ms["covariance"] < 0.75 * residual_ms["second-moment"]  # 0.63 in expectation
    assert attention_tv["covariance"] < attention_tv["second-moment"]


def test_covariance_keys_give_closer_attention_on_a_model_with_a_key_mean() -> None:
    """A tiny Llama whose k_proj has a large bias: post-RoPE keys share a large mean.

    Per (layer, KV head) the covariance basis keeps at least as much centred key energy at every
    rank (Eckart-Young, up to round-off), and truncating keys with it moves the model's output less
    than truncating with the second-moment basis.
    """
    base = make_tiny_llama("gqa", attention_bias=True)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for layer in base.model.layers:
            layer.self_attn.k_proj.bias.copy_(3.0 * torch.randn(layer.self_attn.k_proj.bias.shape, generator=gen))
    windows = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(10))
    stats = collect_statistics(base, windows, progress=False)
    key_cov = stats.moments()["key_cov"]
    results = {s: pca_from_statistics(stats, key_statistic=s) for s in ("covariance", "second-moment")}
    kept = {}
    for statistic, result in results.items():
        basis = result.key_bases.double()
        per_dim = torch.einsum("lhdr,lhde,lher->lhr", basis, key_cov, basis)  # centred variance along each column
        kept[statistic] = per_dim.cumsum(-1)
    assert bool((kept["covariance"] >= kept["second-moment"] - 1e-6 * key_cov.abs().amax()).all())
    assert float((kept["covariance"] - kept["second-moment"])[..., 3].sum()) > 0.1 * float(kept["covariance"][..., 3].sum())

    with torch.no_grad():
        reference = torch.log_softmax(base(windows).logits, -1)
    kl = {}
    for statistic, result in results.items():
        model = PcaLlamaForCausalLM.from_llama(base, result.key_bases, result.value_bases, result.value_means).eval()
        n_kv = model.config.num_key_value_heads
        model.set_kv_ranks([[4] * n_kv] * 2, [[16] * n_kv] * 2)  # keys truncated to a quarter, values exact
        with torch.no_grad():
            logp = torch.log_softmax(model(windows).logits, -1)
        kl[statistic] = float((reference.exp() * (reference - logp)).sum(-1).mean())
    assert kl["covariance"] < 0.8 * kl["second-moment"]


def test_pca_bases_are_sorted_orthogonal_and_exact_at_full_rank(tiny_llama_gqa) -> None:
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    pca_model, result = calibrate(tiny_llama_gqa, windows, batch_size=2, progress=False)
    assert torch.all(result.key_eigenvalues[..., :-1] >= result.key_eigenvalues[..., 1:] - 1e-6)
    eye = torch.eye(16).expand_as(result.value_bases)
    assert float((result.value_bases.transpose(-1, -2) @ result.value_bases - eye).abs().max()) < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(pca_model(windows).logits, tiny_llama_gqa(windows).logits, atol=1e-4, rtol=0)
    explained = result.explained_variance()["key"]
    assert torch.allclose(explained[..., -1], torch.ones_like(explained[..., -1]))


def test_pca_beats_a_random_basis_at_low_rank(tiny_llama_mha) -> None:
    """The point of PCA: at equal rank it reconstructs the calibration distribution better."""
    windows = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(2))
    pca_model, _ = calibrate(tiny_llama_mha, windows, progress=False, budget=0.25)
    random_model = to_pca(tiny_llama_mha)
    random_model.set_kv_budget(0.25)
    with torch.no_grad():
        reference = torch.log_softmax(tiny_llama_mha(windows).logits, -1)

        def kl(model: PcaLlamaForCausalLM) -> float:
            logp = torch.log_softmax(model(windows).logits, -1)
            return float((reference.exp() * (reference - logp)).sum(-1).mean())

        assert kl(pca_model) < kl(random_model)


def test_statistics_reject_empty_data(tiny_llama_mha) -> None:
    with pytest.raises(ValueError, match="no tokens"):
        pca_from_statistics(collect_statistics(tiny_llama_mha, torch.zeros(0, 8, dtype=torch.long), progress=False))


def test_cli_errors_are_one_line_and_leave_nothing(tmp_path, capsys) -> None:
    from plugin.cli import main

    out = tmp_path / "ckpt"
    assert main(["calibrate", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "not a local Hugging Face model directory" in capsys.readouterr().err
    assert not out.exists() and not any(p.name.startswith(".ckpt") for p in tmp_path.iterdir())
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert main(["calibrate", "--data", str(empty), "--out", str(out)]) == 2
    assert "no text" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--budgets", "0.5,2"]) == 2
    assert "outside (0, 1]" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--rank-file", str(tmp_path / "r.json")]) == 2
    assert "rank file" in capsys.readouterr().err
    assert not out.exists()


def test_calibrate_and_eval_commands_on_a_tiny_checkpoint(tmp_path, tiny_llama_gqa) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from plugin.cli import main

    vocab = {f"w{i}": i for i in range(127)} | {"<eos>": 127}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    base_dir = tmp_path / "base"
    tiny_llama_gqa.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    text = tmp_path / "text.txt"
    gen = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 127, (600,), generator=gen)))
    out = tmp_path / "pca"
    assert main(["calibrate", "--model", str(base_dir), "--data", str(text), "--tokens", "512",
                 "--seq-len", "32", "--out", str(out)]) == 0
    assert (out / "kv_ranks.json").is_file() and (out / "pca_eigenvalues.safetensors").is_file()
    summary = json.loads((out / "pca_summary.json").read_text())
    assert summary["tokens"] == 512
    prefix = tmp_path / "eval"
    assert main(["eval", "--model", str(out), "--model", str(base_dir), "--label", "pca", "--label", "base",
                 "--data", str(text), "--tokens", "256", "--seq-len", "32", "--budgets", "1,0.5,0.25",
                 "--out", str(prefix)]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    by = {(r["model"], r["setting"]): r for r in rows}
    assert by[("pca", "1")]["perplexity"] == pytest.approx(by[("base", "full")]["perplexity"], rel=1e-5)
    assert by[("pca", "0.5")]["cache_bytes_per_token"] * 2 == by[("base", "full")]["cache_bytes_per_token"]
    assert main(["eval", "--model", str(out), "--label", "pca", "--baselines", "svd-latent,weight-pca-shared",
                 "--base-model", str(base_dir), "--data", str(text), "--tokens", "256", "--seq-len", "32",
                 "--budgets", "1,0.5", "--out", str(tmp_path / "eval2")]) == 0
    rows = json.loads((tmp_path / "eval2.json").read_text())["rows"]
    by = {(r["model"], r["setting"]): r for r in rows}
    for method in ("svd-latent", "weight-pca-shared"):
        assert by[(method, "1")]["perplexity"] == pytest.approx(by[("pca", "1")]["perplexity"], rel=1e-4)
        assert by[(method, "0.5")]["cache_ratio"] == 0.5  # measured from the method's own cache
    weight_dir = tmp_path / "wpca"
    assert main(["calibrate", "--method", "weight-pca", "--model", str(base_dir), "--budget", "0.5",
                 "--out", str(weight_dir)]) == 0
    assert PcaLlamaForCausalLM.from_pretrained(weight_dir).kv_budget() == 0.5
    assert main(["calibrate", "--method", "svd-latent", "--out", str(tmp_path / "svd")]) == 2
    assert not (tmp_path / "svd").exists()
    png = (tmp_path / "eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

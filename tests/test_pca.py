"""PCA calibration: streaming statistics, bases, and the calibrate / eval commands."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from helpers import to_pca
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from plugin import PcaLlamaForCausalLM
from plugin.pca import calibrate, collect_statistics, pca_from_statistics


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
    for layer, chunks in direct_kv(base, windows).items():
        keys = torch.cat([k for k, _ in chunks], dim=0).permute(1, 0, 2, 3).flatten(1, 2)  # [H, N, d]
        values = torch.cat([v for _, v in chunks], dim=0).permute(1, 0, 2, 3).flatten(1, 2)
        n = keys.shape[1]
        torch.testing.assert_close(moments["key_second"][layer], keys.transpose(1, 2) @ keys / n, atol=1e-8, rtol=0)
        mean = values.mean(dim=1)
        centred = values - mean[:, None]
        torch.testing.assert_close(moments["value_mean"][layer], mean, atol=1e-8, rtol=0)
        torch.testing.assert_close(moments["value_cov"][layer], centred.transpose(1, 2) @ centred / n, atol=1e-8, rtol=0)


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
    assert (out / "kv_ranks.json").is_file() and (out / "pca_eigenvalues.pt").is_file()
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

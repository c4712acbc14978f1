"""Projection artifacts: bit-exact round trips, shape checks before any change, atomic writes, size."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import make_tiny_llama
from helpers import to_pca

from plugin import PcaLlamaForCausalLM
from plugin.storage import artifacts as pf
from plugin.storage.artifacts import CONFIG_FILE, WEIGHTS_FILE, load_projections, save_projections

KINDS = ["mha", "gqa"]


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def trained_pca(kind: str) -> PcaLlamaForCausalLM:
    """A PcaLlama with random bases and means, nonzero Cayley generators and heterogeneous ranks."""
    pca = to_pca(make_tiny_llama(kind))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for attn in pca.attention_layers():
            for skew in (attn.kv_proj.key_skew, attn.kv_proj.value_skew):
                skew.copy_(0.1 * torch.randn(skew.shape, generator=gen))
            attn.invalidate()
    n_kv = pca.config.num_key_value_heads
    pca.set_kv_ranks([[4, 10, 16, 6][:n_kv], [8] * n_kv], [[12, 2, 8, 16][:n_kv], [16] * n_kv])
    return pca


def logits(model: PcaLlamaForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(ids(), use_cache=False).logits


def leftovers(parent, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bit_exact_after_training(tmp_path, kind: str) -> None:
    pca = trained_pca(kind)
    for attn in pca.attention_layers():  # the trained generators make U differ from the stored base buffer
        assert not torch.equal(attn.kv_proj.key_basis(), attn.kv_proj.key_base)
    out = save_projections(pca, tmp_path / "proj", base_model="tiny-llama")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    config = json.loads((out / CONFIG_FILE).read_text())
    assert list(config) == sorted(config)
    assert config["format"] == "matryoshka-kv-projections" and config["format_version"] == 1
    assert config["base_model"] == "tiny-llama" and config["model_family"] == "llama"
    assert config["kv_ranks"] == pca.get_kv_ranks() and config["kv_rank_step"] == pca.config.kv_rank_step

    base = make_tiny_llama(kind)  # same seed: the same base weights, without any projections
    loaded = load_projections(base, out)
    assert isinstance(loaded, PcaLlamaForCausalLM) and not loaded.training
    assert loaded.model.embed_tokens.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()  # shared
    assert loaded.get_kv_ranks() == pca.get_kv_ranks()
    for ours, theirs in zip(loaded.attention_layers(), pca.attention_layers()):
        for got, want in zip(ours.kv_proj.bases(), theirs.kv_proj.bases()):
            assert torch.equal(got, want)
    assert torch.equal(logits(loaded), logits(pca))
    for budget in (0.25, 1.0):
        pca.set_kv_budget(budget)
        loaded.set_kv_budget(budget)
        assert torch.equal(logits(loaded), logits(pca))
    with torch.no_grad():
        full = base(ids()).logits
    torch.testing.assert_close(logits(loaded), full, atol=1e-4, rtol=0)  # the last budget, 1.0, is the base model


def test_from_llama_projections_entry_point_and_pcallama_target(tmp_path) -> None:
    pca = trained_pca("gqa")
    out = save_projections(pca, tmp_path / "proj")
    via_from_llama = PcaLlamaForCausalLM.from_llama(make_tiny_llama("gqa"), projections=out)
    assert torch.equal(logits(via_from_llama), logits(pca))
    overridden = PcaLlamaForCausalLM.from_llama(make_tiny_llama("gqa"), projections=out, ranks=pca.get_kv_ranks())
    assert overridden.get_kv_ranks() == pca.get_kv_ranks()
    with pytest.raises(ValueError, match="not both"):
        PcaLlamaForCausalLM.from_llama(make_tiny_llama("gqa"), pca.attention_layers()[0].kv_proj.key_base,
                                       projections=out)
    # a PcaLlama of the same base (identity bases) receives the projections in place
    target = PcaLlamaForCausalLM.from_llama(make_tiny_llama("gqa"))
    assert load_projections(target, out) is target
    assert torch.equal(logits(target), logits(pca))


@pytest.mark.parametrize(
    ("kind", "overrides", "field"),
    [
        ("mha", {"num_hidden_layers": 3}, "num_hidden_layers"),
        ("gqa", {}, "num_key_value_heads"),  # an MHA artifact onto a GQA base
        ("mha", {"head_dim": 8}, "head_dim"),
        ("mha", {"hidden_size": 32, "head_dim": 16}, "hidden_size"),
    ],
)
def test_wrong_base_is_refused_before_anything_changes(tmp_path, kind: str, overrides: dict, field: str) -> None:
    out = save_projections(trained_pca("mha"), tmp_path / "proj")
    wrong = make_tiny_llama(kind, **overrides)
    before = {name: t.clone() for name, t in wrong.state_dict().items()}
    with pytest.raises(ValueError, match=field) as err:
        load_projections(wrong, out)
    assert "\n" not in str(err.value) and "base" in str(err.value)
    assert all(torch.equal(before[name], t) for name, t in wrong.state_dict().items())
    # the same check guards a PcaLlama target, whose bases stay as they were
    wrong_pca = to_pca(wrong)
    bases = [t.clone() for attn in wrong_pca.attention_layers() for t in attn.kv_proj.bases()]
    with pytest.raises(ValueError, match=field):
        load_projections(wrong_pca, out)
    assert all(torch.equal(a, b) for a, b in zip(bases, (t for attn in wrong_pca.attention_layers()
                                                        for t in attn.kv_proj.bases())))


def test_malformed_artifacts_give_one_clear_error(tmp_path) -> None:
    good = save_projections(trained_pca("mha"), tmp_path / "proj")
    base = make_tiny_llama("mha")

    def broken(name: str, edit) -> object:
        target = tmp_path / name
        target.mkdir()
        for file in good.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
        edit(target)
        return target

    def set_config(**changes):
        def edit(target):
            config = json.loads((target / CONFIG_FILE).read_text())
            config.update(changes)
            (target / CONFIG_FILE).write_text(json.dumps(config))
        return edit

    cases = [
        (tmp_path / "missing", "does not exist"),
        (broken("no-config", lambda t: (t / CONFIG_FILE).unlink()), f"has no {CONFIG_FILE}"),
        (broken("bad-json", lambda t: (t / CONFIG_FILE).write_text("{")), "not valid JSON"),
        (broken("format", set_config(format="peft")), "not a MatryoshkaKV projections artifact"),
        (broken("version", set_config(format_version=2)), "upgrade matryoshka-kv"),
        (broken("ranks", set_config(kv_ranks={"key": [[16] * 4], "value": [[16] * 4]})), "layers"),
        (broken("no-weights", lambda t: (t / WEIGHTS_FILE).unlink()), f"no {WEIGHTS_FILE}"),
        (broken("truncated", lambda t: (t / WEIGHTS_FILE).write_bytes((t / WEIGHTS_FILE).read_bytes()[:100])),
         "not a readable safetensors"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            load_projections(base, path)
        assert "\n" not in str(err.value), path


def test_unrelated_non_empty_directory_is_refused(tmp_path) -> None:
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="is a non-empty directory that is not a projections artifact"):
        save_projections(trained_pca("mha"), target)
    assert [p.name for p in target.iterdir()] == ["config.json"] and not leftovers(tmp_path, "checkpoint")
    with pytest.raises(ValueError, match="PcaLlamaForCausalLM"):
        save_projections(make_tiny_llama("mha"), tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="existing file"):
        save_projections(trained_pca("mha"), tmp_path / "file")
    # an existing artifact is replaced only with overwrite; an empty directory is simply filled
    pca = trained_pca("mha")
    (tmp_path / "proj").mkdir()
    out = save_projections(pca, tmp_path / "proj")
    saved = (out / CONFIG_FILE).read_text()
    pca.set_kv_budget(0.5)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        save_projections(pca, out)
    assert (out / CONFIG_FILE).read_text() == saved
    save_projections(pca, out, overwrite=True)
    assert json.loads((out / CONFIG_FILE).read_text())["kv_budget"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "file", "proj"]


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch) -> None:
    pca = trained_pca("gqa")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pf, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_projections(pca, tmp_path / "proj")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    out = save_projections(pca, tmp_path / "proj")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(pf, "save_file", fail)
    pca.set_kv_budget(0.5)
    with pytest.raises(OSError):
        save_projections(pca, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old artifact survives intact
    assert not leftovers(tmp_path, "proj")


@pytest.mark.parametrize("kind", KINDS)
def test_artifact_size_matches_the_formula(tmp_path, kind: str) -> None:
    pca = trained_pca(kind)
    cfg = pca.config
    out = save_projections(pca, tmp_path / "proj")
    weights = (out / WEIGHTS_FILE).read_bytes()
    header = struct.unpack("<Q", weights[:8])[0]
    layers, n_kv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    data = 4 * layers * n_kv * (2 * d * d + d)
    assert pf.projections_size(layers, n_kv, d) == data
    assert len(weights) == 8 + header + data
    assert header < 120 * 3 * layers  # a small JSON header: names, dtypes, shapes, offsets
    config_bytes = (out / CONFIG_FILE).stat().st_size
    assert sum(p.stat().st_size for p in out.iterdir()) == len(weights) + config_bytes
    # the embedded SmolLM2-135M (30 layers, 3 KV heads, head_dim 64): about 3 MB
    assert pf.projections_size(30, 3, 64) == 2_972_160


def test_export_projections_command(tmp_path, capsys) -> None:
    from plugin.cli import main

    pca = trained_pca("gqa")
    checkpoint = tmp_path / "ckpt"
    pca.save_pretrained(checkpoint)
    (checkpoint / "pca_summary.json").write_text(json.dumps({"source_model": "tiny-base"}))
    out = tmp_path / "proj"
    assert main(["export-projections", "--model", str(checkpoint), "--out", str(out)]) == 0
    assert "MB" in capsys.readouterr().out
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["base_model"] == "tiny-base" and config["kv_ranks"] == pca.get_kv_ranks()
    assert torch.equal(logits(load_projections(make_tiny_llama("gqa"), out)), logits(pca))

    assert main(["export-projections", "--model", str(checkpoint), "--out", str(out), "--budget", "0.5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export-projections", "--model", str(checkpoint), "--out", str(out), "--budget", "0.5",
                 "--overwrite"]) == 0
    assert json.loads((out / CONFIG_FILE).read_text())["kv_budget"] == 0.5
    plain = tmp_path / "plain"
    make_tiny_llama("gqa").save_pretrained(plain)
    assert main(["export-projections", "--model", str(plain), "--out", str(tmp_path / "x")]) == 2
    assert "not a PcaLlama (pcallama, pcamistral, pcaqwen2, pcaqwen3)" in capsys.readouterr().err
    assert main(["export-projections", "--model", str(checkpoint), "--out", str(plain)]) == 2
    assert "not a projections artifact" in capsys.readouterr().err
    assert main(["export-projections", "--model", str(out), "--out", str(tmp_path / "x")]) == 2
    assert "already a projections artifact" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    assert main(["export-projections", "--model", str(broken), "--out", str(tmp_path / "x")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["export-projections", "--help"])
    assert "mkv export-projections --model" in capsys.readouterr().out


def test_mkv_eval_takes_a_projections_dir_like_its_checkpoint(tmp_path) -> None:
    """calibrate -> export-projections -> `mkv eval --model <artifact>` reads exactly the checkpoint's numbers."""
    from helpers import save_tiny_base

    from plugin.cli import main
    from plugin.storage.loading import load_model

    save_tiny_base(make_tiny_llama("gqa"), tmp_path / "base", tmp_path / "text.txt")
    common = ["--data", str(tmp_path / "text.txt"), "--seq-len", "32"]
    assert main(["calibrate", "--model", str(tmp_path / "base"), "--tokens", "256", "--out", str(tmp_path / "pca"),
                 *common]) == 0
    assert main(["export-projections", "--model", str(tmp_path / "pca"), "--out", str(tmp_path / "proj")]) == 0
    assert json.loads((tmp_path / "proj" / CONFIG_FILE).read_text())["base_model"] == str(tmp_path / "base")
    rows = {}
    for name in ("pca", "proj"):
        assert main(["eval", "--model", str(tmp_path / name), "--budgets", "1,0.5", "--tokens", "128",
                     "--out", str(tmp_path / f"eval-{name}"), *common]) == 0
        rows[name] = [(r["budget"], r["perplexity"], r["cache_bytes_per_token"])
                      for r in json.loads((tmp_path / f"eval-{name}.json").read_text())["rows"]]
    assert rows["proj"] == rows["pca"]
    model, tokenizer = load_model(str(tmp_path / "proj"))
    assert isinstance(model, PcaLlamaForCausalLM) and tokenizer.pad_token_id is not None
    (tmp_path / "proj" / CONFIG_FILE).write_text(
        json.dumps({**json.loads((tmp_path / "proj" / CONFIG_FILE).read_text()), "base_model": None}))
    with pytest.raises(ValueError, match="--base-model"):
        load_model(str(tmp_path / "proj"))
    assert isinstance(load_model(str(tmp_path / "proj"), base_model=str(tmp_path / "base"))[0], PcaLlamaForCausalLM)

"""Model families through the same projections: Llama-3.x, Mistral, Qwen2, Qwen3 (tiny random configs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import prefill_then_decode, random_bases
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from plugin import PcaCache, PcaLlamaForCausalLM
from plugin.families.mistral import PcaMistralForCausalLM
from plugin.families.qwen2 import PcaQwen2ForCausalLM
from plugin.families.qwen3 import PcaQwen3ForCausalLM

REPO = Path(__file__).resolve().parents[1]
WINDOW = 6
COMMON = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def _build(family: str, impl: str = "sdpa"):
    if family == "llama3":
        config = LlamaConfig(**COMMON, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
        cls = LlamaForCausalLM
    elif family == "mistral":
        config, cls = MistralConfig(**COMMON, sliding_window=None), MistralForCausalLM
    elif family == "mistral-window":  # shorter than the test sequences, so the window matters
        config, cls = MistralConfig(**COMMON, sliding_window=WINDOW), MistralForCausalLM
    elif family == "qwen2":
        config, cls = Qwen2Config(**COMMON, use_sliding_window=False, tie_word_embeddings=True), Qwen2ForCausalLM
    elif family == "qwen3":
        config, cls = Qwen3Config(**COMMON, head_dim=24, use_sliding_window=False), Qwen3ForCausalLM
    else:
        raise ValueError(family)
    config._attn_implementation = impl
    torch.manual_seed(0)
    model = cls(config).float().eval()
    with torch.no_grad():  # random non-zero biases and norm weights: make the family's difference count
        for name, param in model.named_parameters():
            if name.endswith("bias") or "q_norm" in name or "k_norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


FAMILIES = ["llama3", "mistral", "mistral-window", "qwen2", "qwen3"]
EXPECTED = {"llama3": PcaLlamaForCausalLM, "mistral": PcaMistralForCausalLM, "mistral-window": PcaMistralForCausalLM,
            "qwen2": PcaQwen2ForCausalLM, "qwen3": PcaQwen3ForCausalLM}


def _ids(batch: int = 2, length: int = 14, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_equals_the_base_model_prefill_and_decode(family: str, impl: str) -> None:
    base = _build(family, impl)
    pca = PcaLlamaForCausalLM.from_llama(base, *random_bases(base)).eval()
    assert type(pca) is EXPECTED[family]
    tokens = _ids()
    with torch.no_grad():
        expected = base(tokens).logits
        torch.testing.assert_close(pca(tokens, use_cache=False).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(prefill_then_decode(pca, tokens, 6), expected, atol=1e-4, rtol=0)
        with pca.exact_full_rank():  # the distillation teacher: the family's own attention
            torch.testing.assert_close(pca(tokens, use_cache=False).logits, expected, atol=1e-6, rtol=0)
        pca.set_kv_budget(0.5)
        assert not torch.allclose(pca(tokens, use_cache=False).logits, expected, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_bytes_are_the_budget_of_the_family_cache(family: str) -> None:
    """Measured against the base model's own cache on the same tokens (Mistral's keeps its window)."""
    base = _build(family)
    pca = PcaLlamaForCausalLM.from_llama(base, *random_bases(base)).eval()
    head_dim = pca.config.head_dim
    assert pca.full_cache_bytes_per_token() == 2 * 2 * 2 * head_dim * 4  # K and V, layers, KV heads, float32
    tokens = _ids(3, 10)
    with torch.no_grad():
        own = base(tokens, use_cache=True).past_key_values
    full = sum(t.numel() * t.element_size() for layer in own.layers for t in (layer.keys, layer.values))
    kept = WINDOW - 1 if family == "mistral-window" else 10
    assert full == 3 * kept * pca.full_cache_bytes_per_token()
    for budget in (1.0, 0.5, 0.25):
        pca.set_kv_budget(budget)
        cache = pca.model.new_cache()
        with torch.no_grad():
            pca(tokens, past_key_values=cache, use_cache=True)
        assert cache.nbytes() == full * budget


def test_sliding_window_cache_decodes_far_past_the_window_in_bounded_memory() -> None:
    """40 decode steps through a window of 6 with 4-token chunks: compaction keeps logits exact and memory flat."""
    base = _build("mistral-window", "eager")
    pca = PcaLlamaForCausalLM.from_llama(base, *random_bases(base)).eval()
    pca.set_kv_budget(0.5)
    tokens = _ids(2, 48, seed=3)
    with torch.no_grad():
        expected = pca(tokens, use_cache=False).logits
        cache = PcaCache(chunk=4, sliding_window=WINDOW)
        out = pca(tokens[:, :8], past_key_values=cache, use_cache=True)
        steps, allocated = [out.logits], []
        for t in range(8, tokens.shape[1]):
            out = pca(tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            allocated.append(cache.nbytes())
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == 48
    assert cache.live_nbytes() == 2 * (WINDOW - 1) * pca.kv_cache_bytes_per_token()
    assert all(layer.capacity() <= WINDOW + WINDOW // 8 + layer.chunk for layer in cache.layers)
    assert max(allocated[-20:]) <= allocated[5]  # no growth once the window is full
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(10)
    with pytest.raises(ValueError, match="sliding window"):
        pca.set_kv_bits(4)
    with pytest.raises(ValueError, match="fixed size"):
        PcaCache(max_length=64, sliding_window=WINDOW)


def test_sliding_window_cache_shrinks_to_lower_ranks() -> None:
    """One layer, so the cached states depend on the input alone: shrinking equals the lower ranks from the start."""
    base = _build("mistral-window")
    base.config.num_hidden_layers = 1
    base.model.layers = base.model.layers[:1]
    pca = PcaLlamaForCausalLM.from_llama(base, *(t[:1] for t in random_bases(base))).eval()
    tokens = _ids(1, 20, seed=4)
    with torch.no_grad():
        cache = pca.model.new_cache()
        pca(tokens[:, :12], past_key_values=cache, use_cache=True)
        pca.shrink_cache(cache, budget=0.5)
        steps = [pca(tokens[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(12, 20)]
        fresh = pca(tokens, use_cache=False).logits[:, 12:]
    torch.testing.assert_close(torch.cat(steps, dim=1), fresh, atol=1e-4, rtol=0)
    assert cache.live_nbytes() == (WINDOW - 1) * pca.kv_cache_bytes_per_token()


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_batch_and_left_padding_equals_the_base(family: str) -> None:
    base = _build(family)
    pca = PcaLlamaForCausalLM.from_llama(base, *random_bases(base)).eval()
    tokens = _ids(3, 9, seed=1)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    mask[2, :1] = 0
    tokens = tokens.masked_fill(mask == 0, 0)
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(base.generate(tokens, **kwargs), pca.generate(tokens, **kwargs))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_in_a_fresh_process(family: str, tmp_path) -> None:
    base = _build(family)
    pca = PcaLlamaForCausalLM.from_llama(base, *random_bases(base)).eval()
    pca.set_kv_budget(0.5)
    pca.save_pretrained(tmp_path / "m")
    tokens = _ids(1, 8)
    with torch.no_grad():
        expected = pca(tokens).logits
    torch.save(tokens, tmp_path / "ids.pt")
    script = (
        "import sys, torch, json\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"torch.save(m(ids).logits, {str(tmp_path / 'out.pt')!r})\n"
        "print(json.dumps({'type': type(m).__name__, 'model_type': m.config.model_type, 'budget': m.kv_budget()}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"type": EXPECTED[family].__name__, "model_type": pca.config.model_type, "budget": 0.5}
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(reloaded) is EXPECTED[family]


def test_pca_calibration_runs_on_every_family() -> None:
    from plugin.model.pca import calibrate

    windows = _ids(4, 32, seed=2)
    for family in FAMILIES:
        model, _ = calibrate(_build(family), windows, progress=False)
        assert type(model) is EXPECTED[family]
        basis = model.attention_layers()[0].kv_proj.bases()[0]
        eye = torch.eye(basis.shape[-1])
        assert float((basis.detach().transpose(-1, -2) @ basis.detach() - eye).abs().max()) < 1e-4


def test_unsupported_models_are_refused_clearly() -> None:
    qwen = Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=16, max_window_layers=1))
    with pytest.raises(ValueError, match="mixes sliding-window and full-attention layers"):
        PcaLlamaForCausalLM.from_llama(qwen)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="Qwen2/2.5, Qwen3"):
        PcaLlamaForCausalLM.from_llama(gpt2)
    with pytest.raises(ValueError, match="use PcaLlamaForCausalLM.from_llama"):
        PcaQwen2ForCausalLM.from_llama(_build("llama3"))


def _save_family_checkpoints(family: str, root: Path) -> tuple[Path, Path]:
    """A tiny base of `family` and its converted PcaLlama, each with a real tokenizer (for the CLIs)."""
    from opencompass_ext.testing import build_tokenizer

    tokenizer = build_tokenizer()
    base = _build(family)
    base.resize_token_embeddings(len(tokenizer))
    base.config.update({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                        "pad_token_id": tokenizer.pad_token_id})
    pca = PcaLlamaForCausalLM.from_llama(base, *random_bases(base)).eval()
    for model, name in ((base, "base"), (pca, "pca")):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root / "base", root / "pca"


@pytest.mark.parametrize("family", ["mistral-window", "qwen3"])
def test_mkv_calibrate_converts_a_saved_checkpoint_of_the_family(family: str, tmp_path) -> None:
    from plugin.cli import main

    base, _ = _save_family_checkpoints(family, tmp_path)
    text = tmp_path / "calib.txt"
    from llamafactory_ext.testing import SENTENCES

    text.write_text(" . ".join(SENTENCES * 20))
    assert main(["calibrate", "--model", str(base), "--out", str(tmp_path / "calibrated"), "--data", str(text),
                 "--tokens", "256", "--seq-len", "32"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "calibrated")
    assert type(model) is EXPECTED[family]
    if family == "mistral-window":
        assert model.config.sliding_window == WINDOW and model.config.model_type == "pcamistral"


def _train(config: dict, path: Path, env: dict) -> str:
    """`llamafactory-cli train` on `config` (written to `path`); its log, after asserting it succeeded."""
    import yaml

    path.write_text(yaml.safe_dump(config))
    cli = Path(sys.executable).parent / "llamafactory-cli"
    proc = subprocess.run([str(cli), "train", str(path)], env=env, cwd=path.parent, capture_output=True, text=True,
                          timeout=400, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


# Llama-3 converts to PcaLlamaForCausalLM, the class tests/test_llamafactory_cli.py and test_opencompass_cli.py
# already run through both frameworks; the end-to-end run here is for the classes only a family brings.
TEMPLATES = {"mistral-window": "mistral", "qwen2": "qwen", "qwen3": "qwen3"}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(TEMPLATES))
def test_llamafactory_trains_two_steps_and_opencompass_scores_an_item(family: str, tmp_path) -> None:
    """The two frameworks take the family unchanged: 2 Matryoshka steps through llamafactory-cli (pt with
    distillation, and sft with LoRA under the family's own chat template), and one OpenCompass quick set
    where the converted model at 100% answers exactly as its base."""
    import csv
    import glob

    from llamafactory_ext.testing import pt_config, write_tiny_datasets

    base, pca = _save_family_checkpoints(family, tmp_path)
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", DISABLE_VERSION_CHECK="1",
               LLAMAFACTORY_VERBOSITY="INFO")
    for key in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "MKV_BUDGETS", "MKV_RANK_FILE", "MKV_DATASETS"):
        env.pop(key, None)
    out = tmp_path / "trained"
    config = pt_config(pca, write_tiny_datasets(tmp_path / "data"), out, cutoff_len=32, max_steps=2,
                       per_device_train_batch_size=2, logging_steps=1, overwrite_output_dir=True,
                       matryoshka_trainer="distill", matryoshka_projection_lr=1.0e-2)
    assert "PcaLlamaDistillationTrainer" in _train(config, tmp_path / "pt.yaml", env)
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert type(trained) is EXPECTED[family]
    before = AutoModelForCausalLM.from_pretrained(pca)
    moved = [name for name, p in trained.named_parameters() if not torch.equal(p, dict(before.named_parameters())[name])]
    assert moved and all(".kv_proj." in name for name in moved)  # only the projections trained

    sft_out = tmp_path / "sft"
    config = pt_config(pca, tmp_path / "data", sft_out, stage="sft", dataset="tiny_sft", template=TEMPLATES[family],
                       finetuning_type="lora", lora_target="q_proj,v_proj", lora_rank=4, cutoff_len=48, max_steps=2,
                       per_device_train_batch_size=2, logging_steps=1, overwrite_output_dir=True,
                       matryoshka_trainer="plain", matryoshka_projection_lr=1.0e-2)
    assert "PcaLlamaSeq2SeqTrainer" in _train(config, tmp_path / "sft.yaml", env)
    assert (sft_out / "adapter_model.safetensors").is_file() and (sft_out / "matryoshka_projections.safetensors").is_file()

    work = tmp_path / "oc"
    oc_env = dict(env, MKV_MODEL=str(pca), MKV_BASE_MODEL=str(base), MKV_SUITE="quick", MKV_BUDGETS="100,50",
                  MKV_DATASETS="piqa", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([str(bin_dir / "opencompass"), str(REPO / "configs" / "pcallama.py"), "--debug",
                           "-w", str(work)], env=oc_env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = max(glob.glob(str(work / "*" / "summary" / "summary_*.csv")))
    with open(summary, newline="") as handle:
        row = {r["dataset"]: r for r in csv.DictReader(handle)}["piqa-quick"]
    assert row["base-uncompressed"] == row["pcallama-100%"], row
    float(row["pcallama-50%"])

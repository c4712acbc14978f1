"""Tiny offline fixtures for the LLaMA-Factory integration: a random PcaLlama checkpoint with a
locally trained word-level tokenizer, and small pre-training / instruction datasets.

Used by ``tests/test_llamafactory_*.py``; also handy to try the YAMLs without the embedded model::

    python -m llamafactory_ext.testing /tmp/mkv-tiny      # writes model/ and data/ there
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

SENTENCES = [
    "the president spoke to the congress about the state of the union",
    "the nation is strong and the people are free",
    "we must build roads and schools for our children",
    "the economy grew and many new jobs were created",
    "our soldiers serve with honor in distant lands",
    "the congress passed a law to protect the farmers",
    "trade with other nations brings peace and wealth",
    "the budget must be balanced for the next generation",
    "science and learning are the keys to our future",
    "the union of states is stronger than ever before",
    "we honor the workers who built this great country",
    "the treaty was signed and the war came to an end",
]

INSTRUCTIONS = [
    ("name a duty of the congress", "the congress passed a law to protect the farmers"),
    ("what makes the nation strong", "the nation is strong and the people are free"),
    ("what must we build", "we must build roads and schools for our children"),
    ("what did the economy do", "the economy grew and many new jobs were created"),
    ("how do our soldiers serve", "our soldiers serve with honor in distant lands"),
    ("what brings peace and wealth", "trade with other nations brings peace and wealth"),
    ("what must be balanced", "the budget must be balanced for the next generation"),
    ("what are the keys to our future", "science and learning are the keys to our future"),
]

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>"]


def build_tokenizer(path: str | os.PathLike) -> Any:
    """A word-level fast tokenizer over :data:`SENTENCES` (+ template words), saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = ["human", "assistant", "user", "system", ":", "?", ".", ",", "\n"]
    corpus = SENTENCES + [q for q, _ in INSTRUCTIONS] + [" ".join(extra)]
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.save_pretrained(str(path))
    return fast


def build_tiny_pcallama(path: str | os.PathLike, num_kv_heads: int = 2, seed: int = 0, layers: int = 2,
                        key_space: str = "post-rope") -> Path:
    """Save a random tiny PcaLlama (GQA by default, head_dim 16, random orthogonal bases) + tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from plugin.model.modeling import PcaLlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    llama = LlamaForCausalLM(config).eval()
    head_dim = config.hidden_size // config.num_attention_heads
    shape = (layers, num_kv_heads, head_dim, head_dim)
    key_bases = torch.linalg.qr(torch.randn(shape, dtype=torch.float64))[0].float()
    value_bases = torch.linalg.qr(torch.randn(shape, dtype=torch.float64))[0].float()
    value_means = 0.1 * torch.randn(layers, num_kv_heads, head_dim)
    model = PcaLlamaForCausalLM.from_llama(llama, key_bases=key_bases, value_bases=value_bases, value_means=value_means,
                                           key_space=key_space)
    model.save_pretrained(str(path))
    return path


def build_tiny_chat_pair(root: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """(base Llama dir, PcaLlama dir): a tiny random Llama that never ends its answers early, and that Llama with
    random orthogonal projections (saved at full rank), each with the tokenizer.

    The end-of-sequence row of the output layer is zero, so greedy answers run to max_tokens instead of stopping
    at a random first token: an answer compared token for token is then as long as asked for.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from plugin.model.modeling import PcaLlamaForCausalLM

    root = Path(root)
    base, pca = root / "base", root / "pcallama"
    tokenizer = build_tokenizer(base)
    tokenizer.save_pretrained(str(pca))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    llama = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        llama.lm_head.weight[tokenizer.eos_token_id] = 0.0
    llama.save_pretrained(str(base))
    shape = (config.num_hidden_layers, config.num_key_value_heads, 16, 16)
    key_bases = torch.linalg.qr(torch.randn(shape, dtype=torch.float64))[0].float()
    value_bases = torch.linalg.qr(torch.randn(shape, dtype=torch.float64))[0].float()
    value_means = 0.1 * torch.randn(shape[:3])
    model = PcaLlamaForCausalLM.from_llama(llama, key_bases=key_bases, value_bases=value_bases, value_means=value_means)
    model.save_pretrained(str(pca))
    return base, pca


def build_tiny_llama(path: str | os.PathLike, seed: int = 0) -> Path:
    """A plain tiny LlamaForCausalLM (not PcaLlama) + tokenizer, for the "wrong model" checks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def pt_config(model: str | os.PathLike, data_dir: str | os.PathLike, output_dir: str | os.PathLike,
              **extra: Any) -> dict[str, Any]:
    """The smallest LLaMA-Factory pre-training config over write_tiny_datasets' ``tiny_pt``; `extra` overrides."""
    config: dict[str, Any] = {
        "model_name_or_path": str(model),
        "stage": "pt",
        "do_train": True,
        "finetuning_type": "full",
        "dataset": "tiny_pt",
        "dataset_dir": str(data_dir),
        "output_dir": str(output_dir),
        "report_to": "none",
    }
    config.update(extra)
    return config


def write_tiny_datasets(directory: str | os.PathLike, repeat: int = 6) -> Path:
    """``tiny_pt`` (text) and ``tiny_sft`` (alpaca) datasets plus their ``dataset_info.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "tiny_pt.jsonl", "w", encoding="utf-8") as fh:
        for index in range(repeat):
            for offset in range(len(SENTENCES)):
                a = SENTENCES[(index + offset) % len(SENTENCES)]
                b = SENTENCES[(index * 5 + offset + 3) % len(SENTENCES)]
                fh.write(json.dumps({"text": f"{a} . {b} ."}) + "\n")
    with open(directory / "tiny_sft.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(repeat):
            fh.writelines(json.dumps({"instruction": question, "input": "", "output": answer}) + "\n" for question, answer in INSTRUCTIONS)
    info = {
        "tiny_pt": {"file_name": "tiny_pt.jsonl", "columns": {"prompt": "text"}},
        "tiny_sft": {
            "file_name": "tiny_sft.jsonl",
            "columns": {"prompt": "instruction", "query": "input", "response": "output"},
        },
    }
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return directory


if __name__ == "__main__":  # pragma: no cover - convenience
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/tiny")
    build_tiny_pcallama(root / "model")
    write_tiny_datasets(root / "data")
    print(f"tiny PcaLlama: {root / 'model'}; datasets: {root / 'data'}")

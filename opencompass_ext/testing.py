"""Tiny checkpoints for tests and the README demo (random weights, built offline in seconds).

``build_tiny_checkpoints(out_dir)`` writes

    out_dir/llama      a random LlamaForCausalLM (GQA: 4 query heads, 2 KV heads, head_dim 16)
    out_dir/pcallama   the same weights as PcaLlama with random orthogonal K/V bases and
                       random value means (full rank: equal to the Llama model up to rounding)

each with a byte-level BPE tokenizer trained on a few sentences
(``model_input_names=["input_ids", "attention_mask"]``, distinct <pad>, BOS prepended).
"""
from __future__ import annotations

import os

_SENTENCES = [
    "The following makes sense: to open a jar, twist the lid.",
    "Question: Where would you find magazines along side many other printed works?",
    "Answer: bookstore. Answer: library. Answer: market.",
    "Tracy didn't go home that evening and resisted Riley's attacks.",
    "How would you describe Sydney? sympathetic, worried, happy.",
    "All biomass goes through at least some of these steps: it needs to be grown.",
    "Is the first series 20 euro note still legal tender? Yes. No.",
    "A person wants to start saving money so that they can afford a nice vacation.",
    "Predators eat bunnies. Oak tree roots may break the concrete sidewalk.",
    "State of the Union: the economy, the people, the nation and the world.",
]


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_SENTENCES * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"], model_max_length=2048)


def build_tiny_checkpoints(out_dir: str, seed: int = 0, random_bases: bool = True,
                           num_layers: int = 2) -> tuple[str, str]:
    """Write out_dir/llama and out_dir/pcallama; return their paths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from plugin.model.modeling import PcaLlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False, torch_dtype="float32")
    llama = LlamaForCausalLM(cfg).eval()
    llama_dir = os.path.join(out_dir, "llama")
    llama.save_pretrained(llama_dir)
    tokenizer.save_pretrained(llama_dir)

    key_bases = value_bases = value_means = None
    if random_bases:
        d, L, h = cfg.hidden_size // cfg.num_attention_heads, num_layers, cfg.num_key_value_heads
        g = torch.Generator().manual_seed(seed + 1)
        key_bases = torch.linalg.qr(torch.randn(L, h, d, d, generator=g))[0]
        value_bases = torch.linalg.qr(torch.randn(L, h, d, d, generator=g))[0]
        value_means = 0.1 * torch.randn(L, h, d, generator=g)
    pca = PcaLlamaForCausalLM.from_llama(llama, key_bases=key_bases, value_bases=value_bases,
                                         value_means=value_means).eval()
    pca_dir = os.path.join(out_dir, "pcallama")
    pca.save_pretrained(pca_dir)
    tokenizer.save_pretrained(pca_dir)
    return llama_dir, pca_dir


if __name__ == "__main__":  # python -m opencompass_ext.testing OUT_DIR
    import sys
    print(*build_tiny_checkpoints(sys.argv[1] if len(sys.argv) > 1 else "tiny-ckpt"), sep="\n")

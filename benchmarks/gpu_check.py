"""What only a CUDA GPU shows, in one run: bf16/SDPA exactness, bf16 training steps, long-context decode.

1. correctness (bf16, SDPA, on the GPU): the distillation teacher's path (`exact_full_rank`) equals
   the base model bit for bit; the projected full-rank model's largest logit difference to the
   base; a 50% decode through the projected cache against the same model without a cache; cache
   bytes against the budget.
2. training: --steps Matryoshka distillation steps (sampled per-head ranks, KL to the full-rank
   teacher) with the base in bf16 and the projections in float32 under bf16 autocast: seconds
   per step, peak memory, first and last loss, bases' orthogonality afterwards.
3. decode: prefill --contexts tokens (in 4k chunks), then greedy-decode --new-tokens tokens, for
   the full cache (the base model, DynamicCache) and PcaLlama at 50% / 25%: tokens/s over the
   decode steps after a warm-up, peak CUDA memory, cache bytes.

The model is the embedded SmolLM2-135M when it loads, else a random model of its shape (decode
speed, memory and the exactness checks do not depend on the weights' values); the JSON says which.

  python -m benchmarks.gpu_check --out outputs/gpu_check/gpu_check.json --write-docs
  python -m benchmarks.gpu_check --device cpu --quick --out /tmp/g.json    # smoke test, no GPU needed
  bash benchmarks/gpu_check.sh                                              # the same, with its setup
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DOCS_START, DOCS_END = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"
SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "vocab_size": 49152, "rope_theta": 100000.0,
                 "max_position_embeddings": 8192, "tie_word_embeddings": True}
QUICK_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096}


def load_base(args: argparse.Namespace) -> tuple[Any, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    if not args.quick and args.model == "embedded":
        try:
            from plugin.storage.loading import load_model

            model, _ = load_model("embedded")
            return model, "embedded SmolLM2-135M-Instruct"
        except Exception as error:  # noqa: BLE001 - any reason it cannot load: fall back, and say why
            reason = f"{type(error).__name__}: {str(error)[:120]}"
    else:
        reason = "--quick" if args.quick else f"--model {args.model}"
    shape = QUICK_SHAPE if args.quick else SMOLLM2_SHAPE
    torch.manual_seed(0)
    config = LlamaConfig(**shape)
    return LlamaForCausalLM(config), f"random weights, {'tiny' if args.quick else 'SmolLM2-135M'} shape ({reason})"


def random_pca(base: Any) -> Any:
    """A PcaLlama with random orthogonal bases: exactness at full rank must hold for any basis."""
    from plugin import PcaLlamaForCausalLM

    cfg = base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, head_dim)
    gen = torch.Generator().manual_seed(1)
    keys = torch.linalg.qr(torch.randn(shape, generator=gen, dtype=torch.float64))[0].float()
    values = torch.linalg.qr(torch.randn(shape, generator=gen, dtype=torch.float64))[0].float()
    means = 0.1 * torch.randn(shape[:-1], generator=gen)
    return PcaLlamaForCausalLM.from_llama(base, keys, values, means)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


@torch.no_grad()
def check_correctness(base: Any, device: torch.device, length: int) -> dict:
    base = base.to(device=device, dtype=torch.bfloat16).eval()
    base.config._attn_implementation = "sdpa"
    pca = random_pca(base).eval()
    ids = torch.randint(0, base.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(2)).to(device)
    expected = base(ids).logits
    with pca.exact_full_rank():
        exact = pca(ids, use_cache=False).logits
    projected = pca(ids, use_cache=False).logits
    pca.set_kv_budget(0.5)
    whole = pca(ids, use_cache=False).logits
    cache = pca.model.new_cache()
    half = length // 2
    steps = [pca(ids[:, :half], past_key_values=cache, use_cache=True).logits]
    for t in range(half, length):
        steps.append(pca(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    decoded = torch.cat(steps, dim=1)
    full_bytes = pca.full_cache_bytes_per_token(torch.bfloat16) * 2 * length
    return {
        "teacher_bit_exact": bool(torch.equal(exact, expected)),
        "full_rank_projected_max_abs_diff": float((projected.float() - expected.float()).abs().max()),
        "logit_scale": float(expected.float().abs().max()),
        "decode_vs_forward_max_abs_diff_50pct": float((decoded.float() - whole.float()).abs().max()),
        "cache_bytes_50pct": int(cache.live_nbytes()),
        "cache_bytes_expected_50pct": int(full_bytes * 0.5),
        "tokens": length,
    }


def run_training(base: Any, device: torch.device, steps: int, batch: int, length: int) -> dict:
    from plugin.budgets.ranks import rank_grid, sample_ranks

    base = base.to(device=device, dtype=torch.bfloat16)
    base.config._attn_implementation = "sdpa"
    pca = random_pca(base)
    for param in pca.parameters():
        param.requires_grad_(False)
    params = pca.projection_parameters()
    for param in params:
        param.data = param.data.float()
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    cfg = pca.config
    grid = rank_grid(cfg.head_dim, cfg.kv_rank_step)
    gen = torch.Generator().manual_seed(3)
    data = torch.randint(0, cfg.vocab_size, (steps, batch, length), generator=torch.Generator().manual_seed(4))
    pca.train()
    losses, times = [], []
    _peak_reset(device)
    for step in range(steps):
        ids = data[step].to(device)
        key, value = sample_ranks(cfg.num_hidden_layers, cfg.num_key_value_heads, grid, generator=gen)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            with torch.no_grad(), pca.exact_full_rank():
                teacher = pca(ids, use_cache=False).logits.float()
            pca.set_sampled_ranks(key, value)
            try:
                student = pca(ids, use_cache=False).logits.float()
            finally:
                pca.clear_sampled_ranks()
            loss = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                            reduction="none").sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    error = 0.0
    with torch.no_grad():
        for attn in pca.attention_layers():
            for basis in attn.kv_proj.bases()[:2]:
                eye = torch.eye(basis.shape[-1], device=basis.device)
                error = max(error, float((basis.transpose(-1, -2) @ basis - eye).abs().max()))
    steady = sorted(times[1:] or times)
    return {"steps": steps, "batch": batch, "tokens": length, "seconds_per_step_median": steady[len(steady) // 2],
            "first_loss": losses[0], "last_loss": losses[-1], "peak_memory_gb": _peak_gb(device),
            "bases_dtype": str(pca.attention_layers()[0].kv_proj.key_base.dtype).replace("torch.", ""),
            "orthogonality_error": error}


@torch.no_grad()
def run_decode(base: Any, device: torch.device, context: int, batch: int, new_tokens: int, setting: str) -> dict:
    from transformers import DynamicCache

    base = base.to(device=device, dtype=torch.bfloat16).eval()
    base.config._attn_implementation = "sdpa"
    if setting == "full":
        model, cache = base, DynamicCache()
    else:
        model = random_pca(base).eval()
        model.set_kv_budget(float(setting))
        cache = model.model.new_cache()
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, base.config.vocab_size, (batch, context), generator=gen).to(device)
    _peak_reset(device)
    chunk = 4096
    for start in range(0, context, chunk):
        out = model(input_ids=prompt[:, start:start + chunk], past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    warmup = min(8, max(1, new_tokens // 4))
    times = []
    for step in range(new_tokens):
        _sync(device)
        begin = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - begin)
        token = out.logits[:, -1:].argmax(-1)
    if hasattr(cache, "nbytes"):
        cache_bytes = cache.nbytes()
    else:
        cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"setting": setting, "context": context, "batch": batch, "tokens_per_s": batch * len(times) / sum(times),
            "peak_memory_gb": _peak_gb(device), "cache_gb": round(cache_bytes / 2**30, 4)}


def render(payload: dict) -> str:
    c, t = payload["correctness"], payload["training"]
    header = (f"`bash benchmarks/gpu_check.sh` on {payload['device']}, {payload['date']}; torch {payload['torch']}; "
              f"model: {payload['model']}.")
    exactness = (f"- Teacher path (`exact_full_rank`) bit-exact to the bf16 base (SDPA): {c['teacher_bit_exact']}; "
                 f"projected full rank: max |logit diff| {c['full_rank_projected_max_abs_diff']:.3g} "
                 f"(logits up to {c['logit_scale']:.3g}); 50% decode vs forward: "
                 f"{c['decode_vs_forward_max_abs_diff_50pct']:.3g}; cache bytes {c['cache_bytes_50pct']} "
                 f"(budget x full: {c['cache_bytes_expected_50pct']}).")
    training = (f"- Training, {t['steps']} bf16 distillation steps of {t['batch']} x {t['tokens']} tokens: "
                f"{t['seconds_per_step_median']:.3f} s/step, peak {t['peak_memory_gb']} GB, loss {t['first_loss']:.4g} "
                f"-> {t['last_loss']:.4g}, bases {t['bases_dtype']}, orthogonality error {t['orthogonality_error']:.1e}.")
    lines = [DOCS_START, "## GPU check", "", header, "", exactness, training, "",
             "| context | batch | cache | tokens/s | x full | peak memory (GB) | cache (GB) |", "|---|---|---|---|---|---|---|"]
    full = {(r["context"], r["batch"]): r for r in payload["decode"] if r["setting"] == "full"}
    for row in payload["decode"]:
        ref = full.get((row["context"], row["batch"]))
        ratio = f"{row['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else ""
        name = "full (DynamicCache)" if row["setting"] == "full" else f"{float(row['setting']):.0%} projected"
        lines.append(f"| {row['context']} | {row['batch']} | {name} | {row['tokens_per_s']:.0f} | {ratio} | "
                     f"{row['peak_memory_gb']} | {row['cache_gb']} |")
    lines += ["", DOCS_END]
    return "\n".join(lines)


def write_docs(payload: dict) -> Path:
    path = REPO / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = render(payload)
    if DOCS_START in text and DOCS_END in text:
        head, rest = text.split(DOCS_START, 1)
        text = head + section + rest.split(DOCS_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--model", default="embedded", help="'embedded' (falls back to its shape) or 'random'")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contexts", default="8192,32768")
    parser.add_argument("--batches", default="1,8", help="decode batch sizes (the largest only at the shortest context)")
    parser.add_argument("--budgets", default="0.5,0.25")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (a smoke test, any device)")
    parser.add_argument("--write-docs", action="store_true", help="replace the GPU section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; run on a GPU machine, or use --device cpu --quick for a smoke test")
    if args.quick:
        args.contexts, args.batches, args.new_tokens, args.steps = "64,128", "1,2", 6, 2
    base, source = load_base(args)
    from tqdm import tqdm

    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    runs = [(c, 1) for c in contexts] + [(contexts[0], b) for b in batches if b != 1]
    settings = ["full", *args.budgets.split(",")]
    payload: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU",
        "date": dt.date.today().isoformat(), "torch": torch.__version__, "model": source,
    }
    with tqdm(total=2 + len(runs) * len(settings), desc="gpu check") as bar:
        payload["correctness"] = check_correctness(base, device, 64 if args.quick else 512)
        bar.update()
        payload["training"] = run_training(base, device, args.steps, 2 if args.quick else 4, 32 if args.quick else 512)
        bar.update()
        payload["decode"] = []
        for context, batch in runs:
            for setting in settings:
                payload["decode"].append(run_decode(base, device, context, batch, args.new_tokens, setting))
                bar.update()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")
    if args.write_docs:
        print(f"wrote {write_docs(payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

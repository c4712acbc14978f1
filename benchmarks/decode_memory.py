"""Decode speed and memory with a real prefill: PcaLlama's cache against transformers' own caches.

Settings, each decoding the same tokens after the same context:

* `dynamic`: the unmodified LlamaForCausalLM with transformers' DynamicCache (grows by torch.cat);
* `static`: the unmodified model with transformers' StaticCache (preallocated, attends over its
  whole capacity with a mask);
* `1.0`, `0.5`, `0.25`: PcaLlama with the shipped projections (`embedded-matryoshka`) at that
  budget, PcaCache preallocated for context + new tokens (no reallocation while decoding);
* with --quant-bits B: also `1.0xBb` and `0.5xBb`, the same PcaLlama with its cache quantized (keys per
  channel over blocks of 64 tokens, values per token, a full-precision tail of recent tokens), which
  dequantizes what it holds at every step; results go to docs/data/decode_quant.json and their own section.

The context is real held-out text, prefilled once per length by the base model in float32 (in
chunks, progress shown) and saved; every setting's cache is built from those states: the
baselines hold them (repeated over the batch, cast to the dtype), PcaLlama holds them projected
onto its bases at the kept ranks (exactly what shrinking its full-rank cache gives; deeper layers
of a prefill run at a lower budget would hold slightly different states, which does not change
the cost of a step).  Then, per (context, batch, dtype), one process decodes every setting in
interleaved rounds (the order rotates each round) and reports the median step as tokens/s and
the minor page faults per token; a speed ratio is to the *best* baseline in the same process.
Peak RSS: a separate process per setting builds only that cache, resets the kernel's peak
counter (/proc/self/clear_refs) and decodes a few tokens; `over model` is that peak minus the
process's RSS before the cache existed (weights, runtime), i.e. the cache plus a step's transients.

  python -m benchmarks.decode_memory                # full run (about 40 min on 2 cores), docs section
  python -m benchmarks.decode_memory --quick        # CI smoke test (tiny sizes, temp dir, no docs)
  python -m benchmarks.decode_memory --render-only  # rewrite the docs section and PNG from docs/data/decode_memory.json
  python -m benchmarks.decode_memory --quant-bits 4 --contexts 8192 --batches 1,8 --dtypes float32 \
      --work-dir outputs/decode                     # quantized cache's decode speed (docs/data/decode_quant.json)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.plots import decode_memory_png
from benchmarks.report import DATA, ROOT, header, markdown_table, write_section

BASELINES = ["dynamic", "static"]
BUDGETS = ["1.0", "0.5", "0.25"]
SETTINGS = BASELINES + BUDGETS
RSS_STEPS = 3


def settings_for(quant_bits: str) -> list[str]:
    """The settings of a run: the baselines, the budgets, and `1.0xBb` / `0.5xBb` per --quant-bits B."""
    bits = [int(b) for b in quant_bits.split(",") if b.strip()]
    return SETTINGS + [f"{budget}x{b}b" for b in bits for budget in ("1.0", "0.5")]


def _status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (VmHWM: peak RSS; VmRSS: now)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# -- prefill -------------------------------------------------------------------------------------------
def prefill_worker(args: argparse.Namespace) -> None:
    """Prefill `--context` tokens of held-out text with the base model (float32) and save the states."""
    import torch
    from tqdm import tqdm
    from transformers import DynamicCache

    from plugin.storage.loading import load_model
    from plugin.storage.texts import load_texts

    base, tokenizer = load_model(args.base)
    ids = []
    for text in load_texts(None, "evaluation"):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) > args.context:
            break
    if len(ids) <= args.context:
        raise SystemExit(f"the held-out text has {len(ids)} tokens, fewer than the context {args.context}")
    ids = torch.tensor(ids[: args.context + 1])[None]
    cache = DynamicCache()
    with torch.no_grad():
        for start in tqdm(range(0, args.context, args.prefill_chunk), desc=f"prefill {args.context}", file=sys.stderr):
            end = min(args.context, start + args.prefill_chunk)
            base(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True)
    torch.save({"keys": [layer.keys for layer in cache.layers], "values": [layer.values for layer in cache.layers],
                "next": int(ids[0, -1])}, args.states)


# -- caches ---------------------------------------------------------------------------------------------
def load_models(args: argparse.Namespace, settings: list[str]):
    """The base model in the dtype, and one PcaLlama per budget sharing its weights."""
    import torch

    from plugin import PcaLlamaForCausalLM
    from plugin.storage.loading import SHIPPED, load_model

    base, _ = load_model(args.base)
    base = base.to(getattr(torch, args.dtype)).eval()
    models = {}
    for setting in settings:
        if setting in BASELINES:
            models[setting] = base
        else:
            budget, _, bits = setting.partition("x")
            model = PcaLlamaForCausalLM.from_llama(base, projections=SHIPPED[args.projections]).eval()
            model.set_kv_budget(float(budget))
            if bits:
                model.set_kv_bits(int(bits.removesuffix("b")))
            models[setting] = model
    return models


def build_cache(setting: str, model, states: dict, batch: int, capacity: int):
    """`setting`'s cache holding the saved states (repeated over the batch), sized for `capacity` tokens."""
    import torch
    from transformers import DynamicCache, StaticCache

    dtype = model.dtype
    length = states["keys"][0].shape[-2]
    if setting == "dynamic":
        cache = DynamicCache()
    elif setting == "static":
        cache = StaticCache(config=model.config, max_cache_len=capacity)
    else:
        cache = model.model.new_cache(reserve=capacity)  # PcaCache, or the quantized cache when bits are set
        attns = model.attention_layers()
    with torch.no_grad():
        for index, (k, v) in enumerate(zip(states["keys"], states["values"])):
            k, v = k.to(dtype).repeat(batch, 1, 1, 1), v.to(dtype).repeat(batch, 1, 1, 1)
            if setting == "dynamic":
                cache.update(k, v, index)
            elif setting == "static":
                cache.update(k, v, index, {"cache_position": torch.arange(length)})
            else:
                attn = attns[index]
                weights = attn._inference_weights(dtype)
                keys = [attn.project_keys(g, e, k) for g, e in zip(attn.groups, weights["groups"])]
                values = [attn.project_values(g, e, v) for g, e in zip(attn.groups, weights["groups"])]
                cache.update(keys, values, index, {"signature": attn.signature()})
    return cache


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes of the cached tokens, bytes allocated), read from the cache object."""
    if hasattr(cache, "live_nbytes"):  # PcaCache (nbytes: its buffers) or the quantized cache (holds what it uses)
        return cache.live_nbytes(), cache.nbytes()
    held = allocated = 0
    for layer in cache.layers:
        allocated += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        length = layer.get_seq_length()
        held += sum(t[..., :length, :].numel() * t.element_size() for t in (layer.keys, layer.values))
    return held, allocated


def decode_step(model, cache, token, position: int):
    import torch

    batch = token.shape[0]
    with torch.no_grad():
        out = model(input_ids=token, past_key_values=cache, position_ids=torch.full((batch, 1), position),
                    cache_position=torch.tensor([position]), use_cache=True)
    return out.logits[:, -1:].argmax(-1)


# -- workers --------------------------------------------------------------------------------------------
def speed_worker(args: argparse.Namespace) -> None:
    """Every setting decoded in interleaved rounds in one process (robust to a noisy machine)."""
    import torch

    states = torch.load(args.states)
    length = states["keys"][0].shape[-2]
    capacity = length + args.new_tokens + 1
    settings = settings_for(args.quant_bits)
    models = load_models(args, settings)
    caches = {s: build_cache(s, models[s], states, args.batch, capacity) for s in settings}
    del states
    tokens = {s: torch.full((args.batch, 1), 0) for s in settings}
    times: dict[str, list[float]] = {s: [] for s in settings}
    faults: dict[str, int] = {s: 0 for s in settings}
    for step in range(args.new_tokens + 1):
        order = settings[step % len(settings):] + settings[: step % len(settings)]
        for setting in order:
            before, start = _minor_faults(), time.perf_counter()
            tokens[setting] = decode_step(models[setting], caches[setting], tokens[setting], length + step)
            elapsed, faulted = time.perf_counter() - start, _minor_faults() - before
            if step:  # the first round warms up
                times[setting].append(elapsed)
                faults[setting] += faulted
    result = {}
    for setting in settings:
        median = sorted(times[setting])[len(times[setting]) // 2]
        held, allocated = cache_bytes(caches[setting])
        result[setting] = {"tokens_per_s": args.batch / median, "faults_per_token":
                           faults[setting] / (args.new_tokens * args.batch), "cache_bytes": held,
                           "allocated_bytes": allocated}
    print(json.dumps(result))


def rss_worker(args: argparse.Namespace) -> None:
    """One setting alone: peak RSS while decoding (weights + its cache + a step's transients)."""
    import gc

    import torch

    model = load_models(args, [args.setting])[args.setting]
    with torch.no_grad():  # warm-up on 16 tokens: the runtime's own allocations happen before the baseline
        model(input_ids=torch.zeros(1, 16, dtype=torch.long), use_cache=True)
    gc.collect()
    model_rss = _status("VmRSS")  # weights and runtime, before any prefill state is loaded
    states = torch.load(args.states)
    length = states["keys"][0].shape[-2]
    cache = build_cache(args.setting, model, states, args.batch, length + RSS_STEPS + 1)
    del states
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak counting restarts here: not the loading, not the build
    token = torch.full((args.batch, 1), 0)
    for step in range(RSS_STEPS):
        token = decode_step(model, cache, token, length + step)
    print(json.dumps({"peak_rss": _status("VmHWM"), "model_rss": model_rss}))


def rss_only(args: argparse.Namespace, work: Path) -> None:
    """Measure peak RSS again for the rows of docs/data/decode_memory.json at --rss-contexts / --rss-dtypes."""
    result = json.loads((DATA / "decode_memory.json").read_text())
    contexts = {int(c) for c in args.rss_contexts.split(",") if c}
    dtypes = set(args.rss_dtypes.split(","))
    for row in result["rows"]:
        if row["context"] in contexts and row["dtype"] in dtypes:
            states = work / f"prefill_{row['context']}.pt"
            rss = _run(args, "--rss-worker", "--setting", row["setting"], "--states", str(states),
                       "--batch", str(row["batch"]), "--dtype", row["dtype"])
            row["peak_rss_mib"] = rss["peak_rss"] / 2**20
            row["rss_over_model_mib"] = (rss["peak_rss"] - rss["model_rss"]) / 2**20
            print(row["context"], row["batch"], row["dtype"], row["setting"], f"{row['peak_rss_mib']:.0f} MiB", flush=True)
    result["meta"]["rss_remeasured"] = header(f"python -m benchmarks.decode_memory --rss-only --rss-contexts "
                                              f"{args.rss_contexts} --rss-dtypes {args.rss_dtypes}")
    (DATA / "decode_memory.json").write_text(json.dumps(result, indent=1))
    write_section("decode_memory", "Memory and decode speed", render(result))
    decode_memory_png(result, DATA / "decode_memory.png")


def _run(args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.decode_memory", "--threads", str(args.threads), "--base", args.base,
           "--projections", args.projections, "--new-tokens", str(args.new_tokens), "--quant-bits", args.quant_bits,
           *extra]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


# -- driver ---------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="embedded", help="the base model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--projections", default="embedded-matryoshka", help="shipped projections for PcaLlama")
    parser.add_argument("--contexts", default="1024,4096,8192")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rss-contexts", default="8192", help="contexts at which peak RSS is measured per setting")
    parser.add_argument("--rss-dtypes", default="float32", help="dtypes at which peak RSS is measured per setting")
    parser.add_argument("--quant-bits", default="", help="also the quantized cache at these bit widths (e.g. 4); "
                        "results to docs/data/decode_quant.json")
    parser.add_argument("--new-tokens", type=int, default=8, help="timed decode steps per setting (after one warm-up)")
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process (run nothing else meanwhile)")
    parser.add_argument("--quick", action="store_true", help="CI smoke test: tiny sizes, nothing written to docs")
    parser.add_argument("--work-dir", default=None, help="where the prefill states (and with --quick the results) go")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the docs section and PNG from docs/data/decode_memory.json, measuring nothing")
    parser.add_argument("--rss-only", action="store_true",
                        help="measure peak RSS again for docs/data/decode_memory.json's rows (needs --work-dir's prefills)")
    for hidden in ("--prefill-worker", "--speed-worker", "--rss-worker"):
        parser.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--states", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for bits in filter(None, (b.strip() for b in args.quant_bits.split(","))):
        if bits not in ("2", "4", "8"):
            parser.error(f"--quant-bits {bits!r}: the quantized cache stores 2, 4 or 8 bits")
    if args.render_only:
        result = json.loads((DATA / "decode_memory.json").read_text())
        write_section("decode_memory", "Memory and decode speed", render(result))
        decode_memory_png(result, DATA / "decode_memory.png")
        print(f"rewrote the decode_memory section and {DATA / 'decode_memory.png'} from {DATA / 'decode_memory.json'}")
        return
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    for flag, worker in (("prefill_worker", prefill_worker), ("speed_worker", speed_worker), ("rss_worker", rss_worker)):
        if getattr(args, flag):
            worker(args)
            return
    if args.rss_only:
        rss_only(args, Path(args.work_dir or "."))
        return
    rss_settings = SETTINGS
    if args.quick:
        args.contexts, args.batches, args.dtypes, args.rss_contexts, args.new_tokens = "64", "2", "float32", "64", 2
        rss_settings = ("dynamic", "0.5")  # one process per RSS reading: two show the path, five cost a minute
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    rss_contexts = {int(c) for c in args.rss_contexts.split(",") if c}
    rss_dtypes = set(args.rss_dtypes.split(","))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mkv-decode-"))
    work.mkdir(parents=True, exist_ok=True)

    rows = []
    started = time.time()
    for context in contexts:
        states = work / f"prefill_{context}.pt"
        if not states.exists():  # resumable: a saved prefill is reused
            _run(args, "--prefill-worker", "--context", str(context), "--prefill-chunk", str(args.prefill_chunk),
                 "--states", str(states))
        for dtype in dtypes:
            for batch in batches:
                common = ["--states", str(states), "--batch", str(batch), "--dtype", dtype]
                speed = _run(args, "--speed-worker", *common)
                best = max(speed[b]["tokens_per_s"] for b in BASELINES)
                rss = {s: _run(args, "--rss-worker", "--setting", s, *common) for s in rss_settings} \
                    if context in rss_contexts and dtype in rss_dtypes else {}
                for setting in settings_for(args.quant_bits):
                    r = speed[setting]
                    rows.append({"context": context, "batch": batch, "dtype": dtype, "setting": setting,
                                 "tokens_per_s": r["tokens_per_s"], "speed_vs_best_baseline": r["tokens_per_s"] / best,
                                 "speed_vs_dynamic": r["tokens_per_s"] / speed["dynamic"]["tokens_per_s"],
                                 "faults_per_token": r["faults_per_token"], "cache_bytes": r["cache_bytes"],
                                 "allocated_bytes": r["allocated_bytes"],
                                 "cache_share": r["cache_bytes"] / speed["dynamic"]["cache_bytes"],
                                 "peak_rss_mib": rss[setting]["peak_rss"] / 2**20 if setting in rss else None,
                                 "rss_over_model_mib": (rss[setting]["peak_rss"] - rss[setting]["model_rss"]) / 2**20
                                 if setting in rss else None})
                print(f"{context} tokens, batch {batch}, {dtype} ({(time.time() - started) / 60:.0f} min): " + ", ".join(
                    f"{s} {speed[s]['tokens_per_s']:.1f} tok/s" for s in speed), flush=True)
    command = "python -m benchmarks.decode_memory" + (" --quick" if args.quick else "")
    if args.quant_bits:
        command += (f" --quant-bits {args.quant_bits} --contexts {args.contexts} --batches {args.batches}"
                    f" --dtypes {args.dtypes} --rss-contexts '{args.rss_contexts}'")
    result = {"meta": {"header": header(command), "base": args.base, "projections": args.projections,
                       "new_tokens": args.new_tokens, "threads": args.threads}, "rows": rows}
    if args.quick:
        (work / "decode_memory.json").write_text(json.dumps(result, indent=1))
        decode_memory_png(result, work / "decode_memory.png")
        print(f"decode_memory quick run ok: {work / 'decode_memory.json'} {work / 'decode_memory.png'}")
        return
    if args.quant_bits:  # its own file and section: the main table keeps its own complete run
        (DATA / "decode_quant.json").write_text(json.dumps(result, indent=1))
        write_section("decode_quant", "Decode speed of the quantized projected cache", render(result, png=None))
        return
    (DATA / "decode_memory.json").write_text(json.dumps(result, indent=1))
    write_section("decode_memory", "Memory and decode speed", render(result))
    decode_memory_png(result, DATA / "decode_memory.png")


def render(result: dict, png: str | None = "data/decode_memory.png") -> str:
    """The docs section from a decode_memory JSON (new runs and --render-only alike)."""
    meta, rows = result["meta"], result["rows"]
    body = meta["header"] + "\n"
    if meta.get("note"):
        body += meta["note"] + "\n\n"
    body += ("Real prefill of held-out text (once per length, by the base model in float32; every cache holds those "
             "states, repeated over the batch, cast to the dtype, and for PcaLlama projected onto its kept ranks), then "
             f"decoding {meta['new_tokens']} timed tokens per setting, all "
             "settings interleaved in one process per (context, batch, dtype). `dynamic` and `static` are the "
             "unmodified model with transformers' DynamicCache and StaticCache; `1.0` / `0.5` / `0.25` are PcaLlama "
             f"(`{meta['projections']}` projections) at that budget with its preallocated PcaCache. `vs best` is "
             "tokens/s over the faster baseline in the same process. Cache bytes are read from the cache object "
             "(held: the cached tokens; the StaticCache allocates context + new tokens up front, as does PcaCache "
             "here).")
    if any("x" in r["setting"] for r in rows):
        body += (" `1.0xBb` / `0.5xBb`: the same PcaLlama with its cache quantized to B bits (keys per channel over "
                 "blocks of 64 tokens, values per token, float16 scales and zeros, the newest tokens in a "
                 "full-precision tail); it dequantizes everything it holds at every step.")
    body += "\n\n"
    body += markdown_table(
        ["context", "batch", "dtype", "setting", "tokens/s", "vs best baseline", "vs dynamic", "cache MiB",
         "cache / full", "page faults / token", "peak RSS MiB", "over model MiB"],
        [[r["context"], r["batch"], r["dtype"], r["setting"], f"{r['tokens_per_s']:.2f}",
          f"{r['speed_vs_best_baseline']:.2f}", f"{r['speed_vs_dynamic']:.2f}", f"{r['cache_bytes'] / 2**20:.1f}",
          f"{r['cache_share']:.3f}", f"{r['faults_per_token']:.0f}",
          *(f"{r[k]:.0f}" if r.get(k) is not None else "-" for k in ("peak_rss_mib", "rss_over_model_mib"))]
         for r in rows])
    body += "\n"
    if png:
        body += f"\n![decode speed against the best baseline, and cache size]({png})\n"
    return body


if __name__ == "__main__":
    main()

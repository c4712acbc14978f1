"""Quantize / dequantize kernels on the projected cache's shapes: this project's torch code vs optimum-quanto and HQQ.

The quantized projected cache (plugin/cache/quant_codec.py) stores keys per channel over blocks of 64 tokens and
values per token over their r kept dims, where r is any multiple of the rank grid (not a power of two).
transformers' QuantizedCache delegates the same two operations to optimum-quanto (MaxOptimizer +
quantize_weight) or HQQ (Quantizer, with its proximal optimisation on by default). Each backend here gets the
same groups: keys laid out channel-major ``[heads * r, tokens]`` in groups of 64 tokens, values
``[heads * tokens, r]`` with one group per token (group size r). Timed: quantize, dequantize (median of
--repeats runs, one thread), and the relative error ||x - deq(q(x))||^2 / ||x||^2 on states with outlier
key channels (a lognormal scale per channel, as keys have); bytes are the packed codes plus the scales
and zeros each backend keeps.

    python -m benchmarks.quant_kernels              # docs/data/quant_kernels.json + docs/benchmarks.md section
    python -m benchmarks.quant_kernels --quick      # small shapes, temp output, no docs (CI)

Needs `DISABLE_CUDA=1 pip install -r benchmarks/requirements-competitors.txt`; a backend that is missing
is reported as such, not skipped silently.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.report import DATA, header, markdown_table, write_section

GROUP = 64


def _states(heads: int, tokens: int, r: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    channel = torch.exp(torch.randn(r, generator=gen))  # outlier channels, as in keys
    keys = torch.randn(1, heads, tokens, r, generator=gen) * channel + torch.randn(r, generator=gen)
    values = torch.randn(1, heads, tokens, r, generator=gen)
    return keys, values


def _ours(bits: int):
    from plugin.cache.quant_codec import dequantize_keys, dequantize_values, quantize_keys, quantize_values

    def keys(x):
        packed, scale, zero = quantize_keys(x, bits, GROUP)
        return (packed, scale, zero), lambda: dequantize_keys(packed, scale, zero, bits, x.dtype)

    def values(x):
        packed, scale, zero = quantize_values(x, bits)
        return (packed, scale, zero), lambda: dequantize_values(packed, scale, zero, bits, x.dtype)

    return keys, values, lambda parts: sum(t.numel() * t.element_size() for t in parts)


def _quanto(bits: int):
    from optimum.quanto import MaxOptimizer, qint2, qint4, quantize_weight

    qtype = {4: qint4, 2: qint2}[bits]
    optimizer = MaxOptimizer()

    def quantize(matrix, group):
        scale, shift = optimizer(matrix, qtype, 0, group)
        q = quantize_weight(matrix, qtype, 0, scale, shift, group)
        return q, q.dequantize

    def keys(x):
        matrix = x.transpose(-1, -2).reshape(-1, x.shape[-2])  # channel-major: groups of 64 tokens
        return quantize(matrix, GROUP)

    def values(x):
        return quantize(x.reshape(-1, x.shape[-1]), x.shape[-1])  # one group per token

    def nbytes(q):
        return sum(t.numel() * t.element_size() for t in (q._data._data, q._scale, q._shift))

    return keys, values, nbytes


def _hqq(bits: int):
    import torch
    from hqq.core.quantize import Quantizer

    def quantize(matrix, group):
        packed, meta = Quantizer.quantize(matrix, nbits=bits, group_size=group, axis=1, device="cpu",
                                          compute_dtype=torch.float32)
        return (packed, meta), lambda: Quantizer.dequantize(packed, meta)

    def keys(x):
        return quantize(x.transpose(-1, -2).reshape(-1, x.shape[-2]), GROUP)

    def values(x):
        return quantize(x.reshape(-1, x.shape[-1]), x.shape[-1])

    def nbytes(q):
        packed, meta = q
        return sum(t.numel() * t.element_size() for t in (packed, meta["scale"], meta["zero"]))

    return keys, values, nbytes


BACKENDS: dict[str, Callable] = {"torch (this project)": _ours, "optimum-quanto": _quanto, "hqq": _hqq}


def _median_seconds(fn: Callable, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(ranks: list[int], bits_list: list[int], heads: int, tokens: int, repeats: int) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    rows = []
    for r in ranks:
        keys, values = _states(heads, tokens, r)
        for bits in bits_list:
            for name, make in BACKENDS.items():
                row = {"backend": name, "r": r, "bits": bits, "heads": heads, "tokens": tokens}
                try:
                    qk, qv, nbytes = make(bits)
                except ImportError as err:
                    rows.append({**row, "error": f"not installed ({err.name})"})
                    continue
                try:
                    for kind, x, quantize in (("keys", keys, qk), ("values", values, qv)):
                        stored, dequantize = quantize(x)
                        restored = dequantize().reshape(-1)
                        flat = (x.transpose(-1, -2) if kind == "keys" and name != "torch (this project)" else x)
                        flat = flat.reshape(-1)
                        row[f"{kind}_rel_error"] = float(((restored - flat) ** 2).sum() / (flat**2).sum())
                        row[f"{kind}_bytes"] = nbytes(stored)
                        row[f"{kind}_quantize_ms"] = 1e3 * _median_seconds(lambda x=x, q=quantize: q(x), repeats)
                        row[f"{kind}_dequantize_ms"] = 1e3 * _median_seconds(dequantize, repeats)
                except (ValueError, RuntimeError, AssertionError) as err:
                    row["error"] = f"{type(err).__name__}: {str(err)[:160]}"
                rows.append(row)
                print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def render(result: dict) -> str:
    body = header(result["command"]) + "\n"
    body += (f"{result['heads']} KV heads x {result['tokens']} tokens of one layer per row, float32 states, one thread; "
             "keys per channel over blocks of 64 tokens, values per token (group size r), the same groups for every "
             "backend. Times are medians of "
             f"{result['repeats']} runs; `x ours` = the backend's time over this project's in the same row "
             "(quantize + dequantize, keys and values). Error = ||x - deq(q(x))||^2 / ||x||^2; bytes = codes + "
             "scales + zeros, as a fraction of the bfloat16 states.\n\n")
    table = []
    ours = {(row["r"], row["bits"]): row for row in result["rows"] if row["backend"].startswith("torch")}
    for row in result["rows"]:
        if "error" in row:
            table.append([row["backend"], row["r"], row["bits"], row["error"], "", "", "", "", ""])
            continue
        total = sum(row[f"{k}_{op}_ms"] for k in ("keys", "values") for op in ("quantize", "dequantize"))
        base = ours.get((row["r"], row["bits"]))
        mine = sum(base[f"{k}_{op}_ms"] for k in ("keys", "values") for op in ("quantize", "dequantize")) \
            if base and "error" not in base else None
        bf16 = 2 * 2 * row["heads"] * row["tokens"] * row["r"]
        table.append([row["backend"], row["r"], row["bits"],
                      f"{row['keys_quantize_ms']:.1f} / {row['keys_dequantize_ms']:.1f}",
                      f"{row['values_quantize_ms']:.1f} / {row['values_dequantize_ms']:.1f}",
                      f"{total / mine:.2f}" if mine else "-",
                      f"{row['keys_rel_error']:.4f}", f"{row['values_rel_error']:.4f}",
                      f"{(row['keys_bytes'] + row['values_bytes']) / bf16:.3f}"])
    body += markdown_table(["backend", "r", "bits", "keys q / dq ms", "values q / dq ms", "x ours",
                            "keys error", "values error", "bytes vs bf16"], table) + "\n"
    if result.get("note"):
        body += "\n" + result["note"] + "\n"
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ranks", default="64,40,24", help="kept dims per head (default 64,40,24)")
    parser.add_argument("--bits", default="4,2")
    parser.add_argument("--heads", type=int, default=3, help="KV heads (default 3, the embedded model's)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="CI: 128 tokens, r 40, 4 bits, 1 repeat, temp output")
    parser.add_argument("--out", default=str(DATA / "quant_kernels.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.ranks, args.bits, args.tokens, args.repeats = "40", "4", 128, 1
    rows = measure([int(r) for r in args.ranks.split(",")], [int(b) for b in args.bits.split(",")], args.heads,
                   args.tokens, args.repeats)
    command = "python -m benchmarks.quant_kernels " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "heads": args.heads, "tokens": args.tokens, "repeats": args.repeats,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    if Path(args.out).resolve() == (DATA / "quant_kernels.json").resolve():
        write_section("quant_kernels", "Quantization kernels: this project's torch code vs optimum-quanto and HQQ",
                      render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

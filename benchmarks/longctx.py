"""Long context across budgets, at measured bytes: pass-key retrieval by depth and last-512-token perplexity.

Settings (every one on the same prompts and windows, in one process):

* each --model (a PcaLlama checkpoint, or a shipped projection artifact such as `embedded-matryoshka`)
  at each --budgets, with its projected cache;
* `quant-only` at each --quant-bits: the base model with identity bases, its keys and values quantized
  in the project's cache (KIVI-style: keys per channel over blocks of 64 tokens, values per token), i.e.
  KV quantization alone;
* `tiered` (with --tiered W@R): the first --model with its newest W tokens at rank R and older ones at the
  highest rank that keeps the cache's bytes at or below the --tiered-budget uniform cache's (per context
  length; see plugin/cache/tiered.py).
* eviction x ranks x bits (with --evict R@BITS:B): the first --model at rank budget R and BITS (K or K/V;
  16 = not quantized) with the project's own prefill eviction (plugin.cache.eviction.SnapEviction) on its cache, evicting
  the share of the prefill that leaves B of the full cache's bytes once the scored (or answer) tokens are held;
* token eviction (with --kvpress PRESS:B, run from the benchmark-only env of benchmarks/kvpress_env.sh):
  an NVIDIA kvpress press on --base, acting on the prefill of the tokens read first (the context before the
  scored 512, or the pass-key prompt), at the compression ratio that leaves B of the full cache's bytes once
  the scored (or answer) tokens are held too; presses: knorm, snapkv, expected-attention, pyramidkv, adakv
  (kvpress masks AdaKV's evicted keys and frees nothing: its bytes count the unmasked entries).

Bytes are a fraction of a bfloat16 full cache: for projected and tiered caches the measured `nbytes()` over
the full-rank cache's on the same tokens (the ratio does not depend on the dtype); for quantized caches the
formula of codes + float16 scales and zeros, checked against the measured cache in benchmarks/frontier.py.

* retrieval (plugin.evaluation.retrieval): prompts of --contexts tokens of held-out text with a pass key at each
  --depths, answered by greedy generation (8 tokens); accuracy per (setting, context, depth).
  Run the full model alone first (`--full --budgets 1 --contexts 128,256,512,1024`) to see where it succeeds:
  the embedded SmolLM2-135M answers about half the prompts of 128 tokens and almost none from 512 on.
* perplexity of the last 512 tokens of windows of --ppl-contexts tokens (their first tokens read into
  the setting's cache, the last 512 scored through it).

    python -m benchmarks.longctx --full --model embedded-matryoshka --label matryoshka --model outputs/demo/pca \\
        --label pca --budgets 0.5,0.25 --tiered 256@32 --quant-bits 4,2 --hf-quant quanto:4,quanto:2 \\
        --contexts 128,256 --per-depth 6 --ppl-contexts 2048,4096 --docs    # docs/data/longctx.json
    bash benchmarks/kvpress_env.sh && .venv-kvpress/bin/python -m benchmarks.longctx --append \
        --kvpress knorm:0.5,snapkv:0.5,knorm:0.25,snapkv:0.25 --contexts 128,256 --per-depth 6 \
        --ppl-contexts 2048,4096,8192 --ppl-windows 1 --docs
    python -m benchmarks.longctx --model <tiny> --contexts 128 --ppl-contexts 256 --per-depth 1 --out /tmp/l
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.longctx_settings import PRESSES, Setting
from benchmarks.plots import longctx_png
from benchmarks.report import DATA, machine, versions, write_json, write_section
from plugin.evaluation.intervals import block_sums, blocks_ratio
from plugin.evaluation.perplexity import SCORED, last_tokens_nll

BLOCK = 64  # tokens per bootstrap block: the rows keep per-block NLL sums, so intervals pair across processes


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", action="append", default=[], help="PcaLlama dir or artifact (repeatable)")
    parser.add_argument("--label", action="append", default=None)
    parser.add_argument("--budgets", default="1,0.5,0.25")
    parser.add_argument("--base", default="embedded", help="base model of the quant-only rows (default embedded)")
    parser.add_argument("--full", action="store_true", help="a `full` row: --base, unmodified, with DynamicCache")
    parser.add_argument("--quant-bits", default="", help="quant-only bit widths, K or K/V (e.g. 4,2); none by default")
    parser.add_argument("--hf-quant", default="",
                        help="transformers QuantizedCache rows on --base, backend:bits (e.g. quanto:4,hqq:2); needs "
                             "pip install -r benchmarks/requirements-competitors.txt")
    parser.add_argument("--kvpress", default="",
                        help="token-eviction rows on --base, PRESS:BUDGET (e.g. knorm:0.5,snapkv:0.25; presses: "
                             + ", ".join(PRESSES) + "); needs the env of benchmarks/kvpress_env.sh")
    parser.add_argument("--evict", default="",
                        help="R@BITS:B[,...]: the first --model at rank budget R and BITS (K or K/V of 2, 4, 8, 16; "
                             "16 = unquantized) with the project's prefill eviction down to B of the bytes (e.g. "
                             "1@4:0.125,1@8/4:0.25)")
    parser.add_argument("--rank-file", action="append", default=[],
                        help="LABEL=PATH: a row for the first --model with a rank file of `mkv search-budget --bytes F "
                             "--context L` (ranks, bits, per-layer eviction), measured at its L only (repeatable)")
    parser.add_argument("--rank-file-prompts", action="store_true",
                        help="also answer the --contexts pass-key prompts with each --rank-file's composition (its "
                             "per-layer kept shares applied to each prompt's prefill), not only its own context")
    parser.add_argument("--tiered", default="", help="W@R[,W@R]: age-tiered rows for the first --model (e.g. 512@32)")
    parser.add_argument("--tiered-budget", type=float, default=0.25, help="the uniform budget whose bytes tiers match")
    parser.add_argument("--contexts", default="512,1024,2048", help="retrieval prompt lengths (tokens); '' for none")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--per-depth", type=int, default=4)
    parser.add_argument("--ppl-contexts", default="2048,4096", help="window lengths for last-512-token perplexity")
    parser.add_argument("--ppl-windows", default="8,8,4",
                        help="windows per length: one number or one per --ppl-contexts length (default 8,8,4)")
    parser.add_argument("--compare-to", default="",
                        help="a setting every row is also compared with (paired interval), e.g. the best competitor")
    parser.add_argument("--out", default=str(DATA / "longctx.json"))
    parser.add_argument("--docs", action="store_true", help="also write the section of docs/benchmarks.md")
    parser.add_argument("--section", default=f"{SECTION[0]}={SECTION[1]}",
                        help="KEY=TITLE of the docs/benchmarks.md section --docs / --render-only write")
    parser.add_argument("--append", action="store_true",
                        help="add to --out's rows: (setting, length) pairs already there are skipped, not re-measured")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the docs/benchmarks.md section from --out, measuring nothing")
    args = parser.parse_args(argv)
    if "=" not in args.section:
        parser.error(f"--section is KEY=TITLE, e.g. longctx-eighth=Long context at 1/8 of the bytes; got {args.section!r}")
    if args.render_only:
        import json

        result = json.loads(Path(args.out).read_text())
        write_section(*args.section.split("=", 1), render(result, Path(args.out).with_suffix(".png").name))
        if result["perplexity"]:
            longctx_png(result, Path(args.out).with_suffix(".png"))
        return 0
    if not (args.model or args.kvpress):
        parser.error("give at least one --model (or --kvpress)")
    evictions = []
    from plugin.cache.quant_codec import parse_bit_pair

    for text in filter(None, (t.strip() for t in args.evict.split(","))):
        try:
            config, budget = text.split(":")
            rank, bits = config.split("@")
            evictions.append((float(rank), parse_bit_pair(bits, "--evict bits"), float(budget)))
        except ValueError as err:
            parser.error(f"--evict {text!r}: give RANK_BUDGET@BITS:BYTES_BUDGET with BITS K or K/V in 2, 4, 8, 16, "
                         f"e.g. 1@4:0.125 or 1@8/4:0.25 ({err})")
        if not (0 < evictions[-1][0] <= 1 and 0 < evictions[-1][2] <= 1):
            parser.error(f"--evict {text!r}: the rank and bytes budgets are in (0, 1]")
    if evictions and not args.model:
        parser.error("--evict acts on the first --model: give one")
    presses = []
    for text in filter(None, (t.strip() for t in args.kvpress.split(","))):
        name, _, budget = text.partition(":")
        if name not in PRESSES or not budget:
            parser.error(f"--kvpress {text!r}: give PRESS:BUDGET with PRESS one of {', '.join(PRESSES)}")
        presses.append((name, float(budget)))
    if presses:
        try:
            import kvpress  # noqa: F401
        except ImportError:
            parser.error("--kvpress needs NVIDIA kvpress, which the project's env cannot hold (numpy >= 2): run "
                         "`bash benchmarks/kvpress_env.sh` and this script with .venv-kvpress/bin/python")
    labels = args.label or [Path(m).name for m in args.model]
    if len(labels) != len(args.model):
        parser.error("give one --label per --model, or none")

    import torch

    from plugin.evaluation import retrieval as passkey
    from plugin.evaluation.retrieval import ANSWER_TOKENS, passkey_items
    from plugin.storage.loading import load_model
    from plugin.storage.texts import load_texts, token_windows

    settings: list[Setting] = []
    tokenizer = None
    for spec, label in zip(args.model, labels):
        model, tokenizer = load_model(spec)
        model.eval()
        settings += [Setting(f"{label} {b:g}", label, model, b) for b in _floats(args.budgets)]
        for tier in filter(None, (t.strip() for t in args.tiered.split(","))) if spec == args.model[0] else ():
            window, recent = (int(x) for x in tier.split("@"))
            settings.append(Setting(f"tiered {window}@{recent} <= {args.tiered_budget:g}", "tiered", model,
                                    recent / model.config.head_dim, tiered=(window, recent)))
        for text in args.rank_file if spec == args.model[0] else ():
            import json

            name, _, path = text.partition("=")
            if not path or not Path(path).is_file():
                parser.error(f"--rank-file {text!r}: give LABEL=PATH of an existing rank file")
            data = json.loads(Path(path).read_text())
            described = f" ({data['composition']})" if data.get("composition") else ""
            settings.append(Setting(f"{label} {name}{described}", "composition", model, float(data.get("budget", 1.0)),
                                    rank_file=path, only_context=data.get("context")))
        for rank, bits, budget in evictions if spec == args.model[0] else ():
            written = str(bits[0]) if bits[0] == bits[1] else f"{bits[0]}/{bits[1]}"
            settings.append(Setting(f"{label} {rank:g} x {written}b + evict <= {budget:g}", "evict-ranks-bits", model,
                                    rank, bits=None if bits == (16, 16) else bits, evict_to=budget))
    if args.quant_bits or args.hf_quant or args.full or presses:
        base, base_tokenizer = load_model(args.base)
        tokenizer = tokenizer or base_tokenizer
        base.eval()
    if args.full:
        settings.insert(0, Setting("full", "full", base))
    if args.quant_bits:
        from plugin.model.modeling import PcaLlamaForCausalLM

        quant = PcaLlamaForCausalLM.from_llama(base).eval()  # identity bases: k' = k, v' = v
        for text in args.quant_bits.split(","):
            bits = parse_bit_pair(text.strip(), "--quant-bits")
            settings.append(Setting(f"quant-only {text.strip()}b", "quant-only", quant, 1.0, bits=bits))
    for text in filter(None, (t.strip() for t in args.hf_quant.split(","))):
        backend, _, nbits = text.partition(":")
        settings.append(Setting(f"{backend} {nbits}b", f"hf-{backend}", base, hf_quant=(backend, int(nbits))))

    for name, budget in presses:
        settings.append(Setting(f"{name} {budget:g}", f"kvpress-{name}", base, budget, press=name))

    texts = load_texts(None, split="evaluation")
    prompts = {c: passkey_items(tokenizer, texts, c, _floats(args.depths), args.per_depth) for c in _ints(args.contexts)}
    lengths, counts = _ints(args.ppl_contexts), _ints(args.ppl_windows)
    counts = counts * len(lengths) if len(counts) == 1 else counts
    if lengths and len(counts) != len(lengths):
        parser.error("--ppl-windows: one count, or one per --ppl-contexts length")
    windows = {c: token_windows(tokenizer, texts, c, c * n) for c, n in zip(lengths, counts)}
    retrieval, perplexity, commands, previous = [], [], [], {}
    if args.append and Path(args.out).exists():
        import json

        previous = json.loads(Path(args.out).read_text())
        retrieval, perplexity = previous["retrieval"], previous["perplexity"]
        commands = previous.get("commands", [previous["command"]])
    done_ppl = {(r["setting"], r["context"]) for r in perplexity}
    done_retrieval = {(r["setting"], r["context"]) for r in retrieval}
    interpreter = "python"
    if Path(sys.prefix).name != ".venv":  # e.g. the kvpress env: say which interpreter made these rows
        interpreter = f"{Path(sys.prefix).name}/bin/python"
    commands.append(f"{interpreter} -m benchmarks.longctx " + " ".join(shlex.quote(a) for a in argv or sys.argv[1:]))
    now = versions()
    if previous.get("versions") and now not in previous["versions"]:
        now = f"{previous['versions']}; {interpreter}: {now}"
    elif previous.get("versions"):
        now = previous["versions"]
    note = previous.get("note")

    def save() -> dict:
        """Write every row so far: a pass stopped midway keeps its finished settings (--append resumes it)."""
        add_intervals(perplexity, args.compare_to)
        result = {"command": " && ".join(commands), "commands": commands, "machine": machine(),
                  "versions": now, "date": time.strftime("%Y-%m-%d"), "retrieval": retrieval,
                  "perplexity": perplexity}
        if note:
            result["note"] = note  # the reading written for the earlier rows stays until rewritten
        if previous.get("projections"):
            result["projections"] = previous["projections"]  # which projections the rows were measured with
        write_json(args.out, result)
        return result

    for setting in settings:
        setting.apply()
        for context, rows in windows.items():
            if (setting.name, context) in done_ppl or setting.only_context not in (None, context):
                continue
            start = time.perf_counter()
            try:
                setting.eviction_share(context - SCORED, SCORED)
            except ValueError as err:  # the scored tokens alone exceed the budget
                print(f"{setting.name}, {context} tokens: skipped ({err})", flush=True)
                continue
            parts = []
            for row in rows:
                cache = setting.cache(row.numel(), args.tiered_budget)
                parts.append(last_tokens_nll(setting.model, row[None], cache, setting.reading(context - SCORED, SCORED)))
            nll = torch.cat(parts)
            perplexity.append({"setting": setting.name, "method": setting.method, "budget": setting.budget,
                               "context": context, "last512_perplexity": math.exp(float(nll.mean())),
                               "windows": int(rows.shape[0]), "bytes_fraction": setting.bf16_fraction(cache, row.numel()),
                               "block_nll": [round(float(x), 5) for x in block_sums(nll, BLOCK)]})
            print(f"{setting.name}: last-512 perplexity at {context} = {math.exp(float(nll.mean())):.2f}, "
                  f"bytes {perplexity[-1]['bytes_fraction']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        for context, items in prompts.items():
            if (setting.name, context) in done_retrieval or (setting.only_context is not None
                                                             and not args.rank_file_prompts):
                continue  # a rank file's eviction was allocated for its own context (unless asked for)
            start = time.perf_counter()
            try:
                if setting.tiered is not None:  # too short to demote anything within the budget
                    setting.cache(context + ANSWER_TOKENS, args.tiered_budget)
                for item in items:  # too short to evict down to the bytes (a quantized layer's uncoded tokens)
                    length = len(tokenizer(item.prompt, add_special_tokens=False)["input_ids"])
                    setting.eviction_share(length, ANSWER_TOKENS)
            except ValueError as err:
                print(f"{setting.name}, {context} tokens: skipped ({err})", flush=True)
                continue
            answers = passkey.generate_answers(setting.model, tokenizer, items, desc=f"{setting.name} @ {context}",
                                       cache_for=partial(setting.cache, budget=args.tiered_budget),
                                       context_for=setting.reading)
            rights = [int(passkey.is_correct(a, item.key)) for item, a in zip(items, answers, strict=True)]
            for depth in dict.fromkeys(item.depth for item in items):  # in the items' depth order
                right = [r for item, r in zip(items, rights) if item.depth == depth]  # per prompt: paired intervals
                retrieval.append({"setting": setting.name, "method": setting.method, "budget": setting.budget,
                                  "context": context, "depth": depth, "correct": sum(right), "items": len(right),
                                  "accuracy": sum(right) / len(right), "right": right})
            print(f"{setting.name}, {context} tokens: " + ", ".join(
                f"depth {r['depth']:g}: {r['correct']}/{r['items']}" for r in retrieval if r["setting"] == setting.name
                and r["context"] == context) + f" ({time.perf_counter() - start:.0f} s)", flush=True)
        save()
    del settings
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    result = save()
    if args.docs:
        write_section(*args.section.split("=", 1), render(result, Path(args.out).with_suffix(".png").name))
        if perplexity:
            longctx_png(result, Path(args.out).with_suffix(".png"))
    return 0


def add_intervals(rows: list[dict], compare_to: str = "") -> None:
    """Each row's paired 95% interval against the full cache (and `compare_to`) at its length, from block sums.

    Rows measured before block sums were kept (fewer windows, no intervals) are left as they are."""
    by = {(r["setting"], r["context"]): r for r in rows if r.get("block_nll")}
    for row in rows:
        if not row.get("block_nll"):
            continue
        for key, name in (("vs_full", "full"), ("vs_compared", compare_to)):
            other = by.get((name, row["context"]))
            if name and other is not None and len(other["block_nll"]) == len(row["block_nll"]):
                row[key] = paired_ratio(row, other)
                row[key]["against"] = name


def paired_ratio(row: dict, other: dict) -> dict:
    """`row`'s perplexity over `other`'s on the same windows, with its paired 95% interval over their 64-token blocks."""
    return blocks_ratio(row["block_nll"], other["block_nll"], [BLOCK] * len(row["block_nll"])).as_dict()


SECTION = ("longctx", "Long context: retrieval and last-512-token perplexity at equal bytes")


def render(result: dict, figure: str = "longctx.png") -> str:
    """The docs section: perplexity by context and retrieval by depth, one row per setting with its bytes."""
    from benchmarks.report import markdown_table

    body = ("Commands (one after the other, each adding rows): " + ", ".join(f"`{c}`" for c in result["commands"])
            if len(result.get("commands", [])) > 1 else f"Command: `{result['command']}`")
    body += (f"  \nMachine: {result['machine']}  \nDate: {result['date']}  \n"
            f"Versions: {result['versions']}\n\n")
    if result.get("note"):
        body += result["note"] + "\n\n"
    bytes_of = {}
    for row in result["perplexity"]:
        bytes_of[row["setting"]] = max(bytes_of.get(row["setting"], 0.0), row["bytes_fraction"])  # the most held
    contexts = sorted({r["context"] for r in result["perplexity"]})
    if contexts:
        table = {}
        for row in result["perplexity"]:
            cell = f"{row['last512_perplexity']:.2f}"
            for key in ("vs_full", "vs_compared"):
                if key in row and row[key]["against"] != row["setting"]:
                    mark = {"lower": " ▼", "higher": " ▲", "tie": ""}[row[key]["verdict"]]
                    cell += f"<br>{row[key]['ratio']:.2f}x {row[key]['against']} ({row[key]['low']:.2f}-{row[key]['high']:.2f}){mark}"
            table.setdefault(row["setting"], {})[row["context"]] = cell
        body += ("Perplexity of the last 512 tokens of held-out windows, the tokens before them read into the "
                 "setting's cache first, with its ratio to the full cache (and to the compared row) and the paired "
                 "block-bootstrap 95% interval over 64-token blocks: ▼ lower and ▲ higher perplexity with the interval "
                 "excluding 1, no mark a tie (`bytes` = cache bytes as a fraction of a bfloat16 full cache; windows per "
                 "length: " + ", ".join(f"{c}: {w}" for c, w in sorted({(r["context"], r["windows"])
                                                                       for r in result["perplexity"]})) + "):\n\n")
        body += markdown_table(["setting", "bytes"] + [f"{c} tokens" for c in contexts],
                               [[name, f"{bytes_of[name]:.3f}"] + [ctx.get(c, "-") for c in contexts]
                                for name, ctx in table.items()]) + "\n\n"
        body += f"![perplexity against cache bytes at each context](data/{figure})\n\n"
    if result["retrieval"]:
        depths = sorted({r["depth"] for r in result["retrieval"]})
        lines: dict[tuple[str, int], dict[float, str]] = {}
        for row in result["retrieval"]:
            lines.setdefault((row["setting"], row["context"]), {})[row["depth"]] = f"{row['correct']}/{row['items']}"
        body += ("Pass-key retrieval (greedy answer right when its first five-digit number is the key), correct out "
                 "of items, by needle depth (0 = start of the haystack, 1 = just before the question):\n\n")
        body += markdown_table(["setting", "bytes", "context"] + [f"depth {d:g}" for d in depths] + ["all"],
                               [[name, f"{bytes_of[name]:.3f}" if name in bytes_of else "-", context]
                                + [cells.get(d, "-") for d in depths]
                                + [(f"{sum(int(c.split('/')[0]) for c in cells.values())}/"
                                   f"{sum(int(c.split('/')[1]) for c in cells.values())}")]
                                for (name, context), cells in lines.items()]) + "\n"
    return body


if __name__ == "__main__":
    raise SystemExit(main())

"""The long-context frontier: last-512-token perplexity against cache bytes from 1/2 to 1/16 of a bfloat16 cache.

One line per way to shrink the cache, every point scored on the same held-out windows (the long-context protocol:
the last 512 tokens of each window, the tokens before them read into the setting's cache first, a paired
block-bootstrap 95% interval against the full cache), with the shipped long-context projections:

* the allocator: `mkv search-budget --bytes F --context L` at each budget F (its files go to
  docs/data/composition/longctx-F-Lk.json; a file already there is reused, not searched again); with
  --per-head, the per-head rank tables of one greedy descent join its candidates (docs/data/composition/heads-R.json,
  made by the first such search that finds them missing; its files go to docs/data/composition/per-head/); with
  --value-cuts, keys at full rank with values cut (`--value-ranks`, VALUE_CUTS) join them (files in value-cuts/);
  with --attention, kept tokens spread over the layers by their attention (`--attention-spread`, files in attention/);
* ranks alone (the projections at uniform ranks on their grid);
* bits alone: ours (quant-only, KIVI-style, identity bases) and transformers' QuantizedCache (optimum-quanto);
* ours bits x eviction at full rank (4 bits, the project's SnapEviction down to each budget);
* kvpress presses on the base model (SnapKV, expected attention, PyramidKV's per-layer budgets, AdaKV's per-head
  budgets over SnapKV's scores: kvpress masks the keys it evicts and frees nothing, so its bytes are those a
  per-head cache would hold), from the benchmark-only env of benchmarks/kvpress_env.sh.

Steps, each resumable (rows already in the JSON are kept, not measured again):

    python -m benchmarks.longctx_frontier --context 4096 --search      # the allocator, one search per budget
    python -m benchmarks.longctx_frontier --context 4096               # every line but kvpress's
    bash benchmarks/kvpress_env.sh && \\
        .venv-kvpress/bin/python -m benchmarks.longctx_frontier --context 4096 --kvpress
    python -m benchmarks.longctx_frontier --render                     # docs/benchmarks.md section + figure

At 8k, where one search takes minutes per budget: `--budgets 1/4,1/8,1/16 --no-floors` on every step.
`--narrow` measures only the full cache, the allocator and 4 bits x eviction at full rank (the line the
allocator's full-rank picks are), e.g. into a file of its own to test a change to the allocator.

The summary reads each line at each budget as its best point at or below that many bytes, and sets the
allocator's pick against the best other line there with the paired interval of the two rows' ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.longctx_summary import (
    BUDGETS,
    EVICT_BITS,
    FLOORS,
    NAMES,
    PASSKEY_LENGTHS,
    PASSKEY_PER_DEPTH,
    WINDOWS,
    render,
    summarize,
)
from benchmarks.report import DATA, ROOT, write_json, write_section

MODEL = "embedded-matryoshka-longctx"
RANKS = (0.5, 0.375, 0.25, 0.125)  # the projections' rank grid (steps of head_dim / 8) within 1/2 of the bytes
QUANT_BITS = ("8", "4", "2")
HF_QUANT = ("quanto:4", "quanto:2")
PRESSES = ("snapkv", "expected-attention", "pyramidkv", "adakv")
# The allocator protecting retrieval: (budget, the share of the prompt every layer keeps); 1 = no eviction at all.
OUT = DATA / "longctx_frontier.json"
SECTION = ("longctx-frontier", "Long-context frontier: 1/2 to 1/16 of the bytes, every way to shrink the cache")
# Per-head rank tables joining every search: one greedy descent (KL on short calibration windows, fast mode) read
# off at these budgets; a uniform cut of every head costs more than the tokens it frees at 1/8 and 1/16.
HEAD_BUDGETS = (0.875, 0.75)
DESCENT = ("--seq-len", "256", "--samples", "2", "--mode", "fast")


VARIANTS = ("", "per-head", "value-cuts", "attention")  # the searches' extra candidates, each in a folder of its own
VALUE_CUTS = "0.875,0.75,0.625"


def composition_file(budget: float, context: int, min_kept: float = 0.0, variant: str = "") -> Path:
    floor = f"-kept-{min_kept:g}" if min_kept else ""
    return DATA / "composition" / variant / f"longctx-{budget:.4g}-{context // 1024}k{floor}.json"


def head_file(budget: float) -> Path:
    return DATA / "composition" / f"heads-{budget:g}.json"


def descend() -> list[Path]:
    """The per-head rank tables at HEAD_BUDGETS, from one greedy descent when any is missing."""
    from plugin.cli import main as mkv

    files = [head_file(budget) for budget in HEAD_BUDGETS]
    if not all(path.is_file() for path in files):
        files[0].parent.mkdir(parents=True, exist_ok=True)
        template = _shown(files[0].parent / "heads-{budget}.json")
        code = mkv(["search-budget", "--model", MODEL, "--budget", ",".join(f"{b:g}" for b in HEAD_BUDGETS),
                    *DESCENT, "--out", template])
        if code != 0:
            raise SystemExit(f"the per-head descent failed ({code})")
    return files


def _shown(path: Path) -> str:
    """A path as the recorded command gives it: relative when run from the repository root (any checkout)."""
    full = Path(path).resolve()
    return str(full.relative_to(ROOT)) if Path.cwd().resolve() == ROOT and full.is_relative_to(ROOT) else str(path)


def projections_fingerprint() -> str:
    """The installed projections' digest (config and weights): which ones a frontier file was measured with."""
    from plugin.storage.loading import projections_digest, resolve_spec

    return projections_digest(resolve_spec(MODEL))


def mixed_projections(out: Path) -> str | None:
    """Why measuring into `out` would mix two sets of projections in one file, or None when it would not."""
    if not out.is_file():
        return None
    recorded = (json.loads(out.read_text()).get("projections") or {}).get("sha256")
    current = projections_fingerprint()
    if recorded is None or recorded == current:
        return None
    return (f"{out} was measured with the {MODEL} projections {recorded}, and the installed ones are {current}: "
            "measure into a new --out (and search into a fresh docs/data/composition/, whose files were searched "
            "with the old projections), so that one file holds one set of projections")


def chosen_floors(budgets: tuple[float, ...], floors: bool) -> list[tuple[float, float]]:
    """The (budget, floor) pairs of FLOORS among `budgets` (none without `floors`)."""
    return [pair for pair in FLOORS if floors and pair[0] in budgets]


def search(context: int, windows: int, budgets: tuple[float, ...] = BUDGETS, floors: bool = True,
           variant: str = "") -> None:
    """One allocator search per budget, and per (budget, kept-token floor) of FLOORS among `budgets` (skipping
    files that exist); `variant` (VARIANTS) adds per-head rank tables or value cuts to the candidates."""
    from plugin.cli import main as mkv

    extra = {"per-head": lambda: ["--head-ranks", ",".join(_shown(path) for path in descend())],
             "value-cuts": lambda: ["--value-ranks", VALUE_CUTS],
             "attention": lambda: ["--attention-spread"]}.get(variant, list)()
    for budget, floor in [(b, 0.0) for b in budgets] + chosen_floors(budgets, floors):
        path = composition_file(budget, context, floor, variant)
        if path.is_file():
            print(f"{NAMES[budget]} at {context}: {path} is there, not searched again", flush=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        code = mkv(["search-budget", "--model", MODEL, "--bytes", repr(budget), "--context", str(context),
                    "--windows", str(windows), "--min-kept", str(floor), *extra, "--out", _shown(path)])
        if code != 0:
            raise SystemExit(f"the search at {NAMES[budget]} of the bytes and {context} tokens failed ({code})")


def _has_quanto() -> bool:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return False
    return True


def allocator_files(context: int, budgets: tuple[float, ...], floors: bool, variant: str) -> list[Path]:
    """The allocator's files that `measure` reads at `context` (those that exist)."""
    paths = [composition_file(b, context, variant=variant) for b in budgets]
    paths += [composition_file(b, context, floor, variant) for b, floor in chosen_floors(budgets, floors)]
    return [path for path in paths if path.is_file()]


def full_rank(path: Path) -> bool:
    """A rank file that keeps every dim of every head: its rows read the same through any projections (full rank is
    the model's own basis, exactly)."""
    data = json.loads(path.read_text())
    return all(rank == data["head_dim"] for kind in ("key", "value") for row in data[kind] for rank in row)


def independent_rows_note(context: int, paths: list[Path]) -> str:
    """What the projections' note says of narrow rows measured with other projections than the file's."""
    if not paths:
        return ""
    return (f"the allocator's files at {context} tokens measured after it ({', '.join(_shown(p) for p in paths)}) "
            f"were searched with the projections {projections_fingerprint()}; they keep full rank, so their rows, "
            "like the full cache's, 4 bits x eviction's and kvpress's, read the same under either set")


def measure(context: int, kvpress: bool, out: Path, passkey: bool = False, budgets: tuple[float, ...] = BUDGETS,
            floors: bool = True, narrow: bool = False, variant: str = "") -> None:
    """The rows of one context through benchmarks.longctx (--append: rows already measured are kept); with
    `passkey`, pass-key retrieval at PASSKEY_LENGTHS instead of perplexity, for the same settings (the allocator's
    compositions with their kept shares applied to each prompt)."""
    from benchmarks import longctx

    common = ["--contexts", "", "--ppl-contexts", str(context), "--ppl-windows", str(WINDOWS[context]),
              "--append", "--out", _shown(out)]
    if passkey:
        common = ["--contexts", ",".join(map(str, PASSKEY_LENGTHS)), "--per-depth", str(PASSKEY_PER_DEPTH),
                  "--ppl-contexts", "", "--rank-file-prompts", "--append", "--out", _shown(out)]
    if kvpress:
        presses = ",".join(f"{press}:{budget!r}" for press in PRESSES for budget in budgets)
        longctx.main(["--kvpress", presses, *common])
        return
    missing = [NAMES[b] for b in budgets if not composition_file(b, context, variant=variant).is_file()]
    if missing:
        raise SystemExit(f"no allocator file at {', '.join(missing)} of the bytes for {context} tokens: run "
                         f"`python -m benchmarks.longctx_frontier --context {context} --search` first")
    args = ["--model", MODEL, "--label", "longctx", "--full", "--budgets", ""]
    if not narrow:  # ranks alone, bits alone and QuantizedCache too
        args[-1] = ",".join(f"{r:g}" for r in RANKS)
        args += ["--quant-bits", ",".join(QUANT_BITS)]
        if _has_quanto():
            args += ["--hf-quant", ",".join(HF_QUANT)]
        else:
            print("optimum-quanto is not installed: no QuantizedCache rows (pip install -r "
                  "benchmarks/requirements-competitors.txt)", flush=True)
    evict = [f"1@{EVICT_BITS}:{budget!r}" for budget in budgets if budget < 0.3]  # 4 bits alone holds ~0.28
    args += ["--evict", ",".join(evict)]
    for budget in budgets:
        args += ["--rank-file", f"alloc-{NAMES[budget]}={_shown(composition_file(budget, context, variant=variant))}"]
    for budget, floor in chosen_floors(budgets, floors):
        path = composition_file(budget, context, floor, variant)
        if path.is_file():
            args += ["--rank-file", f"alloc-{NAMES[budget]}-kept-{floor:g}={_shown(path)}"]
    longctx.main(args + common)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--context", type=int, choices=sorted(WINDOWS), default=4096)
    parser.add_argument("--search", action="store_true", help="run the allocator's searches (one per budget)")
    parser.add_argument("--search-windows", type=int, default=2, help="calibration windows per search (default 2)")
    parser.add_argument("--kvpress", action="store_true", help="the kvpress rows (run with .venv-kvpress/bin/python)")
    parser.add_argument("--passkey", action="store_true",
                        help=f"pass-key retrieval at {', '.join(map(str, PASSKEY_LENGTHS))} tokens for the same settings "
                             f"({PASSKEY_PER_DEPTH * 5} prompts per length), into --out's retrieval rows")
    parser.add_argument("--budgets", default=",".join(NAMES.values()),
                        help="the budgets to search and measure, of " + ", ".join(NAMES.values()) + " (default all)")
    parser.add_argument("--no-floors", action="store_true", help="no kept-token-floor searches or rows")
    parser.add_argument("--per-head", action="store_true",
                        help="searches with the per-head rank tables of one greedy descent among their candidates, "
                             "into docs/data/composition/per-head/ (and rows of those files)")
    parser.add_argument("--value-cuts", action="store_true",
                        help=f"searches that also try keys at full rank with values cut (--value-ranks {VALUE_CUTS}), "
                             "into docs/data/composition/value-cuts/ (and rows of those files)")
    parser.add_argument("--attention", action="store_true",
                        help="searches that also try kept tokens spread over the layers by their attention "
                             "(--attention-spread), into docs/data/composition/attention/ (and rows of those files)")
    parser.add_argument("--narrow", action="store_true",
                        help="measure only the full cache, the allocator and 4 bits x eviction at full rank")
    parser.add_argument("--render", action="store_true", help="only write the docs section and figure from --out")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    out = Path(args.out)
    by_name = {name: budget for budget, name in NAMES.items()}
    wrong = [b for b in args.budgets.split(",") if b.strip() not in by_name]
    if wrong:
        parser.error(f"--budgets: {', '.join(wrong)} is not one of {', '.join(NAMES.values())} (e.g. 1/4,1/8,1/16)")
    budgets = tuple(sorted({by_name[b.strip()] for b in args.budgets.split(",")}, reverse=True))
    chosen = [name for name, given in (("per-head", args.per_head), ("value-cuts", args.value_cuts),
                                       ("attention", args.attention)) if given]
    if len(chosen) > 1:
        parser.error(f"--{' and --'.join(chosen)} search into folders of their own: give one of them")
    variant = chosen[0] if chosen else ""
    independent = ""
    if not args.render and not args.kvpress and (why := mixed_projections(out)):
        files = allocator_files(args.context, budgets, not args.no_floors, variant)
        if args.search or not args.narrow or not all(full_rank(path) for path in files):
            parser.error(why + "; or measure with --narrow the rows that do not depend on the projections (the full "
                         "cache, 4 bits x eviction, allocator files that keep full rank)")
        independent = independent_rows_note(args.context, files)
    if args.search:
        search(args.context, args.search_windows, budgets, not args.no_floors, variant)
        return 0
    if not args.render:
        measure(args.context, args.kvpress, out, args.passkey, budgets, not args.no_floors, args.narrow, variant)
    if not out.is_file():
        parser.error(f"{out} does not exist: measure first (python -m benchmarks.longctx_frontier --context 4096)")
    result = json.loads(out.read_text())
    if not args.render and not args.kvpress:
        result.setdefault("projections", {"name": MODEL, "sha256": projections_fingerprint()})
    if independent and independent not in result["projections"].get("note", ""):
        note = result["projections"].get("note")
        result["projections"]["note"] = f"{note}; {independent}" if note else independent
    summary = summarize(result)
    result["summary"] = summary
    write_json(out, result)
    if args.render:
        from benchmarks.plots import longctx_png

        longctx_png(result, out.with_suffix(".png"))
        write_section(*SECTION, render(result, summary, out.with_suffix(".png").name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

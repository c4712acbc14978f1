"""Key PCA from the covariance vs the uncentred second moment, before and after the same training.

For a fixed query the dropped part of the key mean, q (I - P) mu_K, is one constant for all keys and
cancels in softmax; what truncation really changes is q (I - P)(k - mu_K), which the covariance basis
minimises. This measures what that choice does on the embedded model, with the user-facing commands:

  1. `mkv calibrate --key-statistic {covariance,second-moment} --tokens 16384 --out WORK/<statistic>`
  2. `llamafactory-cli train scripts/matryoshka_pt.yaml model_name_or_path=WORK/<statistic>
     output_dir=WORK/<statistic>-trained` (the `make demo` training, identical for both)
  3. one `mkv eval` over the four checkpoints on the same held-out windows

Each step whose output exists is skipped, so an interrupted run resumes where it stopped.

  python -m benchmarks.key_centring             # full run: docs/data/key_centring.json + docs/benchmarks.md section
  python -m benchmarks.key_centring --quick     # CI smoke test: tiny random Llama, no training, temp dir
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import DATA, ROOT, header, markdown_table, write_section

BIN = Path(sys.executable).parent
STATISTICS = ("covariance", "second-moment")
BUDGETS = "1,0.875,0.75,0.5,0.375,0.25"


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def train(pca: Path, out: Path) -> None:
    """The `make demo` training run, into a temp dir renamed on success (resumable at step granularity)."""
    tmp = out.with_name(out.name + ".tmp")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    run([str(BIN / "llamafactory-cli"), "train", "scripts/matryoshka_pt.yaml", f"model_name_or_path={pca}",
         f"output_dir={tmp}"], env)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="embedded")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens for mkv eval")
    parser.add_argument("--budgets", default=BUDGETS)
    parser.add_argument("--work-dir", default="outputs/bench/key_centring")
    parser.add_argument("--no-train", action="store_true", help="PCA rows only")
    parser.add_argument("--quick", action="store_true", help="CI smoke test: tiny random Llama, no training, no docs")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the docs section from docs/data/key_centring.json without running anything")
    args = parser.parse_args()
    if args.render_only:
        result = json.loads((DATA / "key_centring.json").read_text())
        args.tokens, args.calibration_tokens = result["meta"]["tokens"], result["meta"]["calibration_tokens"]
        write_section("key-centring", "Key PCA: covariance vs second moment", render(args, result))
        return

    extra: list[str] = []
    if args.quick:
        from opencompass_ext.testing import build_tiny_checkpoints

        args.work_dir = tempfile.mkdtemp(prefix="mkv-key-centring-quick-")
        args.base_model = build_tiny_checkpoints(args.work_dir)[0]
        args.calibration_tokens, args.tokens, args.budgets, args.no_train = 512, 256, "1,0.5", True
        extra = ["--seq-len", "32"]
    work = Path(args.work_dir) if Path(args.work_dir).is_absolute() else ROOT / args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    models: list[tuple[str, Path]] = []
    for statistic in STATISTICS:
        pca = work / statistic
        if not (pca / "config.json").is_file():
            run([str(BIN / "mkv"), "calibrate", "--model", args.base_model, "--key-statistic", statistic,
                 "--tokens", str(args.calibration_tokens), "--out", str(pca), "--overwrite", *extra])
        models.append((f"pca-{statistic}", pca))
    if not args.no_train:
        for statistic in STATISTICS:
            trained = work / f"{statistic}-trained"
            if not (trained / "config.json").is_file():
                train(work / statistic, trained)
            models.append((f"trained-{statistic}", trained))
    evaluation = work / "eval"
    cmd = [str(BIN / "mkv"), "eval", "--budgets", args.budgets, "--tokens", str(args.tokens), "--out", str(evaluation),
           *extra]
    for label, path in models:
        cmd += ["--model", str(path), "--label", label]
    run(cmd)
    result = json.loads(evaluation.with_suffix(".json").read_text())
    result["meta"]["calibration_tokens"] = args.calibration_tokens
    if args.quick:
        print(f"key centring quick run ok: {evaluation.with_suffix('.json')}")
        return
    (DATA / "key_centring.json").write_text(json.dumps(result, indent=1))
    write_section("key-centring", "Key PCA: covariance vs second moment", render(args, result))
    print(f"wrote {DATA / 'key_centring.json'} and the 'key-centring' section of docs/benchmarks.md")


def render(args: argparse.Namespace, result: dict) -> str:
    rows = result["rows"]
    budgets = sorted({round(float(r["budget"]), 4) for r in rows}, reverse=True)
    table = {(r["model"], round(float(r["budget"]), 4)): r["perplexity"] for r in rows}
    labels = list(dict.fromkeys(r["model"] for r in rows))
    body = header("python -m benchmarks.key_centring") + "\n"
    body += (f"Held-out perplexity on the first {args.tokens} tokens of the evaluation split (windows of 512), "
             "the embedded SmolLM2-135M, uniform ranks. `pca-*`: `mkv calibrate --key-statistic ...` on "
             f"{args.calibration_tokens} calibration tokens (values use their covariance in both); `trained-*`: "
             "each after the same `make demo` training (scripts/matryoshka_pt.yaml, 30 steps). Both share every "
             "other setting and the evaluation windows.\n\n")
    body += markdown_table(["checkpoint"] + [f"{b:g}" for b in budgets],
                           [[label] + [f"{table[(label, b)]:.2f}" if (label, b) in table else "" for b in budgets]
                            for label in labels])
    body += "\n"
    if all((label, 0.5) in table for label in ("pca-covariance", "pca-second-moment")):
        body += (f"\nAt 50%, the covariance basis alone reads {table[('pca-covariance', 0.5)]:.1f} against "
                 f"{table[('pca-second-moment', 0.5)]:.1f} for the second moment "
                 f"({table[('pca-second-moment', 0.5)] / table[('pca-covariance', 0.5)]:.2f}x lower perplexity): "
                 "the untrained PCA baseline is much better centred.")
    if all((label, 0.5) in table for label in ("trained-covariance", "trained-second-moment")):
        body += (f" After the same training the two starts end close together "
                 f"({table[('trained-covariance', 0.5)]:.1f} vs {table[('trained-second-moment', 0.5)]:.1f} at 50%, "
                 f"{table[('trained-covariance', 0.375)]:.1f} vs {table[('trained-second-moment', 0.375)]:.1f} at "
                 "37.5%): training rotates the bases away from either start, so the choice matters for the "
                 "training-free baseline, not (at this training length) for the trained model.")
    body += "\n"
    return body


if __name__ == "__main__":
    main()

"""How low-rank are the model's keys and values?  Variance kept by the top-r PCA directions.

Reads pca_eigenvalues.safetensors of a `mkv calibrate` checkpoint (eigenvalues of the key covariance
and of the value covariance per layer and KV head, from the calibration split) and reports the
fraction of variance the first r directions keep at each budget: mean over (layer, head) and the
worst (layer, head).  A trained basis cannot make a rank-r truncation lossless where the states
themselves spread their variance over more than r directions; this is the ceiling PCA starts from.

    python -m benchmarks.kv_spectrum                       # outputs/demo/pca -> docs/data/kv_spectrum.json
    python -m benchmarks.kv_spectrum --pca outputs/pca --out /tmp/spectrum.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.report import DATA

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--pca", default="outputs/demo/pca", help="checkpoint written by mkv calibrate")
    parser.add_argument("--budgets", default="0.875,0.75,0.625,0.5,0.375,0.25,0.125")
    parser.add_argument("--out", default=str(DATA / "kv_spectrum.json"))
    args = parser.parse_args(argv)
    path = Path(args.pca) / "pca_eigenvalues.safetensors"
    if not path.is_file():
        parser.error(f"{path} does not exist; run `mkv calibrate --out {args.pca}` first")
    from safetensors.torch import load_file

    eigen = load_file(str(path))
    rows = []
    for kind in ("key", "value"):
        values = eigen[kind].double().clamp_min(0)
        kept = values.cumsum(-1) / values.sum(-1, keepdim=True)
        head_dim = values.shape[-1]
        for budget in (float(b) for b in args.budgets.split(",")):
            rank = max(1, round(budget * head_dim))
            share = kept[..., rank - 1]
            worst = share.flatten().argmin().item()
            rows.append({"kind": kind, "budget": budget, "rank": rank, "mean_variance_kept": round(share.mean().item(), 4),
                         "min_variance_kept": round(share.min().item(), 4),
                         "min_at_layer_head": [worst // share.shape[1], worst % share.shape[1]]})
            print(f"{kind:<5} {budget:>6.3f} (r={rank:>3}): mean {share.mean():.3f}, worst {share.min():.3f}")
    Path(args.out).write_text(json.dumps({"source": str(path), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

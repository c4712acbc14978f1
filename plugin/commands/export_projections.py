"""Export the K/V projections of a PcaLlama checkpoint as a small artifact, like a PEFT adapter.

Writes OUT/projections_config.json (format, base model, layer/head counts, head_dim, rank table)
and OUT/projections.safetensors (per layer the effective orthogonal bases U_K, U_V and the value
mean mu_V, float32: 4 x layers x KV heads x (2 head_dim^2 + head_dim) bytes, about 3 MB for
SmolLM2-135M). Load it onto the base with plugin.storage.artifacts.load_projections(base, OUT) or
PcaLlamaForCausalLM.from_llama(base, projections=OUT). The directory is written atomically; an
existing non-empty --out is replaced only if it holds a projections artifact and --overwrite is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """\
examples:
  mkv export-projections --model outputs/pca --out outputs/pca-projections
  mkv export-projections --model outputs/trained --out proj --base-model HuggingFaceTB/SmolLM2-135M
  mkv export-projections --model outputs/trained --out proj-37 --budget 0.375
      store uniform ranks for a 37.5% budget instead of the checkpoint's
  mkv export-projections --model outputs/trained --out proj-search --rank-file ranks-0.375.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a PcaLlama checkpoint directory (from `mkv calibrate` or training)")
    parser.add_argument("--out", required=True, help="output artifact directory")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds a projections artifact")
    parser.add_argument("--base-model", default=None,
                        help="name or path of the base model, recorded in the config (default: source_model of "
                             "the checkpoint's pca_summary.json, if any)")
    parser.add_argument("--budget", type=float, default=None, help="store uniform ranks for this budget")
    parser.add_argument("--rank-file", default=None, help="store these per-head ranks (from `mkv search-budget`)")


def default_base_model(model_dir: Path) -> str | None:
    """The base recorded by `mkv calibrate` (pca_summary.json's source_model), if present."""
    summary = model_dir / "pca_summary.json"
    try:
        source = json.loads(summary.read_text()).get("source_model")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, str) else None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..model.modeling import PcaLlamaForCausalLM
    from ..storage.artifacts import WEIGHTS_FILE, check_target, is_projections_dir, save_projections
    from ..storage.loading import model_config

    if is_projections_dir(args.model):
        raise ValueError(f"{args.model!r} is already a projections artifact; export from the PcaLlama checkpoint "
                         "it came from")
    model_type = model_config(args.model)["model_type"]  # a clear error for a missing or foreign model
    from ..families import PCA_TYPES

    if model_type not in PCA_TYPES:
        raise ValueError(
            f"model {args.model!r} has model_type {model_type!r}, not a PcaLlama ({', '.join(PCA_TYPES)}): "
            "it has no projections to "
            f"export; run `mkv calibrate --model {args.model} --out <dir>` first"
        )
    model_dir = Path(args.model)
    check_target(args.out, args.overwrite)  # before loading the model
    kwargs = {"kv_budget": args.budget} if args.budget is not None else {}
    if args.rank_file is not None:
        kwargs["kv_rank_file"] = args.rank_file
    model = PcaLlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    base_model = args.base_model if args.base_model is not None else default_base_model(model_dir)
    out = save_projections(model, args.out, base_model=base_model, overwrite=args.overwrite)
    size = sum(path.stat().st_size for path in out.iterdir())
    print(f"exported projections of {args.model} (budget {model.kv_budget():.4f}, base {base_model!r}) "
          f"-> {out} ({size / 1e6:.2f} MB, {WEIGHTS_FILE} + config)")
    return 0

"""Why weight-PCA breaks down on the embedded model: reconstruction errors and keys-only / values-only perplexity.

    .venv/bin/python -m benchmarks.weight_pca_diagnostic --quick     # about 3 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.weight_pca_diagnostic             # 4096 held-out tokens, about 11 minutes
    .venv/bin/python -m benchmarks.weight_pca_diagnostic --budgets 0.875 0.5 --json /tmp/diag.json

What it measures, on SmolLM2-135M-Instruct (float32) and the held-out evaluation split:

- Relative reconstruction error per layer (mean over KV heads) of the real post-RoPE keys and of the
  values, err = sum ||x - x_hat||^2 / sum ||x||^2 over held-out tokens, where x_hat = mu + P (x - mu), P the
  projector on the kept columns and mu the basis's value mean (0 for keys). Computed exactly from the
  float64 second moments collected with the attention observer (`plugin.model.pca.KVStatistics`).
- The same for the bases it is compared with: activation PCA fitted on the calibration split (the paper's
  baseline), activation planes (whole RoPE planes ranked by measured key energy), random planes / a random
  orthogonal value basis (controls), and data-free value variants (RMSNorm weight folded into W_v, o_proj-
  weighted W_v) plus one that is not data-free (the weight basis with the measured value mean).
- How much of the value *mean* E[v] each value basis drops, and how far the normed input to k_proj / v_proj
  is from the white, zero-mean input weight PCA assumes (||E x||^2 / E||x||^2).
- RoPE pairing: the energy per plane of the keys before RoPE (k_proj output) and after RoPE must be equal
  for the pairs the model rotates; the script reports the largest relative difference for (i, i + d/2)
  and, as a control, for (2i, 2i + 1).
- Perplexity when only keys, only values, or both are truncated, for each basis, on the same held-out windows.

Writes the numbers to docs/data/weight_pca_diagnostic.json (``--json``) and a summary to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import DATA, machine
from plugin.baselines.rope import plane_basis
from plugin.baselines.weight_pca import fit_weight_pca, output_pca
from plugin.budgets.ranks import budget_to_rank, default_step
from plugin.evaluation.perplexity import perplexity
from plugin.model.modeling import PcaLlamaForCausalLM
from plugin.model.pca import KVStatistics, observe_kv, pca_from_statistics
from plugin.storage.loading import load_model
from plugin.storage.texts import load_texts, token_windows

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (0.875, 0.75, 0.5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS), help="per-head budgets")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens (default 4096)")
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=4096,
        help="calibration-split tokens for the activation-PCA reference (default 4096)",
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1024 held-out and 2048 calibration tokens in windows of 256 (a few minutes)",
    )
    parser.add_argument("--skip-perplexity", action="store_true", help="reconstruction errors only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random control bases")
    parser.add_argument("--json", type=Path, default=None,
                        help="output (default docs/data/weight_pca_diagnostic.json; --quick: a temp file, docs untouched)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.calibration_tokens, args.seq_len = 1024, 2048, 256
    if args.json is None:
        args.json = (Path(tempfile.mkdtemp(prefix="mkv-wpca-quick-")) / "weight_pca_diagnostic.json" if args.quick
                     else DATA / "weight_pca_diagnostic.json")
    return args


# -- statistics -----------------------------------------------------------------------------------
class InputStatistics:
    """Pre-RoPE key second moments per (layer, KV head) and the mean / energy of the normed layer input."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, hidden: int) -> None:
        self.n_kv, self.head_dim = n_kv, head_dim
        self.key_outer = torch.zeros(n_layers, n_kv, head_dim, head_dim, dtype=torch.float64)
        self.input_sum = torch.zeros(n_layers, hidden, dtype=torch.float64)
        self.input_energy = torch.zeros(n_layers, dtype=torch.float64)
        self.count = torch.zeros(n_layers, dtype=torch.float64)

    def key_hook(self, layer: int) -> Any:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().double().flatten(0, 1)
            k = output.detach().double().flatten(0, 1).view(-1, self.n_kv, self.head_dim)
            self.key_outer[layer] += torch.einsum("thi,thj->hij", k, k)
            self.input_sum[layer] += x.sum(0)
            self.input_energy[layer] += x.pow(2).sum()
            self.count[layer] += x.shape[0]

        return hook


@contextlib.contextmanager
def hooked(model: PcaLlamaForCausalLM, stats: InputStatistics) -> Iterator[None]:
    handles = [
        layer.self_attn.k_proj.register_forward_hook(stats.key_hook(i)) for i, layer in enumerate(model.model.layers)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect(
    pca: PcaLlamaForCausalLM, windows: torch.Tensor, batch_size: int, inputs: InputStatistics | None = None
) -> KVStatistics:
    """Post-RoPE key / value statistics (and, optionally, pre-RoPE keys and inputs) at full rank."""
    cfg = pca.config
    pca.set_kv_budget(1.0)
    stats = KVStatistics(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    with observe_kv(pca, stats), hooked(pca, inputs) if inputs is not None else contextlib.nullcontext():
        for start in range(0, windows.shape[0], batch_size):
            pca(input_ids=windows[start : start + batch_size], use_cache=False)
    return stats


# -- bases ----------------------------------------------------------------------------------------
def value_variants(base: Any, n_kv: int, d: int) -> dict[str, torch.Tensor]:
    """Data-free value bases: RMSNorm weight folded into W_v, and W_v weighted by its heads' o_proj."""
    folded, ov = [], []
    for layer in base.model.layers:
        attn = layer.self_attn
        w_v = attn.v_proj.weight.detach().double().view(n_kv, d, -1)
        folded.append(output_pca(w_v * layer.input_layernorm.weight.detach().double())[0])
        # o_proj columns of the query heads that read this KV head: G = sum_n W_o,n^T W_o,n, basis of G^1/2 W_v.
        w_o = attn.o_proj.weight.detach().double().view(-1, n_kv, attn.num_key_value_groups, d)
        gram = torch.einsum("ohnd,ohne->hde", w_o, w_o)
        values, vectors = torch.linalg.eigh(gram)
        root = vectors @ torch.diag_embed(values.clamp_min(0.0).sqrt()) @ vectors.transpose(-1, -2)
        ov.append(output_pca(root @ w_v)[0])
    return {"weight-pca, RMSNorm weight folded": torch.stack(folded), "weight-pca, o_proj-weighted": torch.stack(ov)}


def random_planes(n_layers: int, n_kv: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return plane_basis(torch.rand(n_layers, n_kv, d // 2, generator=generator, dtype=torch.float64))[0]


def random_orthogonal(n_layers: int, n_kv: int, d: int, generator: torch.Generator) -> torch.Tensor:
    gaussian = torch.randn(n_layers, n_kv, d, d, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(gaussian)[0].float()


# -- measurements ---------------------------------------------------------------------------------
def relative_error(
    basis: torch.Tensor, outer: torch.Tensor, mean: torch.Tensor, mu: torch.Tensor, rank: int
) -> torch.Tensor:
    """[L, H] sum ||x - mu - P (x - mu)||^2 / sum ||x||^2 from E[x x^T] (outer) and E[x] (mean)."""
    mu = mu.double()
    centred = (
        outer
        - mean.unsqueeze(-1) * mu.unsqueeze(-2)
        - mu.unsqueeze(-1) * mean.unsqueeze(-2)
        + mu.unsqueeze(-1) * mu.unsqueeze(-2)
    )
    kept = basis[..., :rank].double()
    lost = centred.diagonal(dim1=-2, dim2=-1).sum(-1) - torch.einsum("lhdr,lhde,lher->lh", kept, centred, kept)
    return lost / outer.diagonal(dim1=-2, dim2=-1).sum(-1)


def mean_energy_lost(basis: torch.Tensor, mean: torch.Tensor, rank: int) -> torch.Tensor:
    """[L, H] fraction of ||E v||^2 outside the kept columns (what a zero value mean drops for every token)."""
    coefficients = torch.einsum("lhdj,lhd->lhj", basis.double(), mean).pow(2)
    return coefficients[..., rank:].sum(-1) / coefficients.sum(-1).clamp_min(1e-30)


def plane_mismatch(pre: torch.Tensor, post: torch.Tensor, pairs: torch.Tensor) -> float:
    """Largest relative difference of per-plane energy before and after RoPE, planes given by ``pairs [d/2, 2]``."""

    def energies(outer: torch.Tensor) -> torch.Tensor:
        diagonal = outer.diagonal(dim1=-2, dim2=-1)
        return diagonal[..., pairs[:, 0]] + diagonal[..., pairs[:, 1]]

    before, after = energies(pre), energies(post)
    return float(((before - after).abs() / before.clamp_min(1e-30)).max())


def ranks_for(budget: float, d: int, kind: str, n_layers: int, n_kv: int) -> dict[str, list[list[int]]]:
    rank = budget_to_rank(budget, d, default_step(d))
    rank -= rank % 2  # keys keep whole RoPE planes
    key, value = (rank if kind in ("keys", "both") else d), (rank if kind in ("values", "both") else d)
    return {"key": [[key] * n_kv for _ in range(n_layers)], "value": [[value] * n_kv for _ in range(n_layers)]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base, tokenizer = load_model("embedded")
    cfg = base.config
    n_layers, n_kv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    windows = token_windows(tokenizer, load_texts(None, "evaluation"), args.seq_len, args.tokens)
    calibration = token_windows(tokenizer, load_texts(None, "calibration"), args.seq_len, args.calibration_tokens)
    pca = PcaLlamaForCausalLM.from_llama(base).eval()

    inputs = InputStatistics(n_layers, n_kv, d, cfg.hidden_size)
    held_out = collect(pca, windows, args.batch_size, inputs)
    activation = pca_from_statistics(collect(pca, calibration, args.batch_size))
    moments = held_out.moments()
    n = held_out.count.double().view(-1, 1, 1, 1)
    key_outer, value_outer = held_out.key_outer / n, held_out.value_outer / n
    key_mean, value_mean = torch.zeros_like(moments["key_mean"]), moments["value_mean"]

    fit = fit_weight_pca(base)
    generator = torch.Generator().manual_seed(args.seed)
    zero = torch.zeros(n_layers, n_kv, d)
    calibration_key_planes = plane_basis(_plane_energy(collect_key_second(activation), d))[0]
    key_bases = {
        "weight-pca (W_k planes)": fit.key_bases,
        "activation planes (calibration)": calibration_key_planes,
        "activation PCA (calibration)": activation.key_bases,
        "random planes (control)": random_planes(n_layers, n_kv, d, generator),
    }
    value_bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
        "weight-pca (W_v axes)": (fit.value_bases, fit.value_means),
        **{name: (basis.float(), zero) for name, basis in value_variants(base, n_kv, d).items()},
        "weight-pca + measured mean (not data-free)": (fit.value_bases, activation.value_means),
        "activation PCA (calibration)": (activation.value_bases, activation.value_means),
        "random orthogonal (control)": (random_orthogonal(n_layers, n_kv, d, generator), zero),
    }

    reconstruction: dict[str, Any] = {"keys": {}, "values": {}, "value_mean_lost": {}}
    for budget in args.budgets:
        rank = ranks_for(budget, d, "both", 1, 1)["key"][0][0]
        for name, basis in key_bases.items():
            err = relative_error(basis, key_outer, key_mean, torch.zeros_like(key_mean), rank)
            reconstruction["keys"].setdefault(name, {})[str(budget)] = err.mean(-1).tolist()
        for name, (basis, mu) in value_bases.items():
            err = relative_error(basis, value_outer, value_mean, mu, rank)
            reconstruction["values"].setdefault(name, {})[str(budget)] = err.mean(-1).tolist()
            lost = mean_energy_lost(basis, value_mean, rank)
            reconstruction["value_mean_lost"].setdefault(name, {})[str(budget)] = lost.mean(-1).tolist()

    # The weight-PCA value basis, column by column: its own (white-input) energy vs the held-out energy.
    columns = fit.value_bases.double()
    held_energy = torch.einsum("lhdj,lhde,lhej->lhj", columns, value_outer, columns)
    white = fit.value_energy / fit.value_energy.sum(-1, keepdim=True)
    held = held_energy / held_energy.sum(-1, keepdim=True)
    input_mean = inputs.input_sum / inputs.count.unsqueeze(-1)
    pre_rope_keys = inputs.key_outer / inputs.count.view(-1, 1, 1, 1)
    halves = torch.arange(d // 2)
    structure = {
        "rope_plane_mismatch_i_i_plus_half": plane_mismatch(
            pre_rope_keys, key_outer, torch.stack([halves, halves + d // 2], -1)
        ),
        "rope_plane_mismatch_2i_2i_plus_1": plane_mismatch(
            pre_rope_keys, key_outer, torch.stack([2 * halves, 2 * halves + 1], -1)
        ),
        "query_and_key_mean_lost": mean_plane_loss(base, input_mean, key_bases, args.budgets, d),
        "input_mean_energy_fraction": (input_mean.pow(2).sum(-1) / (inputs.input_energy / inputs.count)).tolist(),
        "value_mean_energy_fraction": (value_mean.pow(2).sum(-1) / value_outer.diagonal(dim1=-2, dim2=-1).sum(-1))
        .mean(-1)
        .tolist(),
        "value_energy_by_weight_column": {
            "white_input": white.mean((0, 1)).tolist(),
            "held_out": held.mean((0, 1)).tolist(),
        },
        "key_energy_by_plane_frequency_quarter": frequency_quarters(_plane_energy(key_outer, d)),
    }

    rows: list[dict[str, Any]] = []
    base_ppl = None
    if not args.skip_perplexity:
        base_ppl = perplexity(base, windows, args.batch_size, progress=False)
        print(f"full model: {base_ppl:.2f}", file=sys.stderr, flush=True)
        plans = [("keys", k, None) for k in key_bases] + [("values", None, v) for v in value_bases]
        plans += [
            ("both", "weight-pca (W_k planes)", "weight-pca (W_v axes)"),
            ("both", "activation PCA (calibration)", "activation PCA (calibration)"),
        ]
        for kind, key_name, value_name in plans:
            value_basis, mu = value_bases[value_name] if value_name else (None, None)
            model = PcaLlamaForCausalLM.from_llama(
                base, key_bases[key_name] if key_name else None, value_basis, mu
            ).eval()
            for budget in args.budgets:
                model.set_kv_ranks(ranks_for(budget, d, kind, n_layers, n_kv))
                ppl = perplexity(model, windows, args.batch_size, progress=False)
                rows.append(
                    {
                        "truncated": kind,
                        "key_basis": key_name,
                        "value_basis": value_name,
                        "budget": budget,
                        "perplexity": ppl,
                    }
                )
                print(
                    f"{kind:6s} {budget:5.3f} key={key_name} value={value_name}: {ppl:.2f}", file=sys.stderr, flush=True
                )

    result = {
        "command": "python -m benchmarks.weight_pca_diagnostic " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "model": "SmolLM2-135M-Instruct (embedded), float32",
        "held_out_tokens": int(windows.numel()),
        "calibration_tokens": int(calibration.numel()),
        "seq_len": args.seq_len,
        "budgets": args.budgets,
        "full_model_perplexity": base_ppl,
        "reconstruction_error_per_layer": reconstruction,
        "structure": structure,
        "perplexity": rows,
        "seconds": time.perf_counter() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))
    return 0


def collect_key_second(activation: Any) -> torch.Tensor:
    """E[k k^T] of the calibration keys, rebuilt from their eigendecomposition."""
    vectors = activation.key_bases.double()
    return (vectors * activation.key_eigenvalues.double().clamp_min(0.0).unsqueeze(-2)) @ vectors.transpose(-1, -2)


def mean_plane_loss(
    base: Any, input_mean: torch.Tensor, key_bases: dict[str, torch.Tensor], budgets: list[float], d: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Share of ||E q||^2 (the group's query heads) and ||E k||^2 in the dropped key columns, mean over layers and heads.

    E q = W_q E[x] and E k = W_k E[x] before RoPE; a plane's energy does not change under RoPE, so this is
    also the share after RoPE for plane bases. E q . k is a per-key bias of the attention scores.
    """
    cfg = base.config
    n_kv, n_rep = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    q_mean = torch.stack(
        [layer.self_attn.q_proj.weight.detach().double() @ input_mean[i] for i, layer in enumerate(base.model.layers)]
    ).view(-1, n_kv, n_rep, d)
    k_mean = torch.stack(
        [layer.self_attn.k_proj.weight.detach().double() @ input_mean[i] for i, layer in enumerate(base.model.layers)]
    ).view(-1, n_kv, d)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, basis in key_bases.items():
        basis = basis.double()
        q_coeff = torch.einsum("lhdj,lhnd->lhnj", basis, q_mean).pow(2).sum(2)
        k_coeff = torch.einsum("lhdj,lhd->lhj", basis, k_mean).pow(2)
        for budget in budgets:
            rank = ranks_for(budget, d, "both", 1, 1)["key"][0][0]
            out.setdefault(name, {})[str(budget)] = {
                "query_mean_lost": float((q_coeff[..., rank:].sum(-1) / q_coeff.sum(-1)).mean()),
                "key_mean_lost": float((k_coeff[..., rank:].sum(-1) / k_coeff.sum(-1)).mean()),
            }
    return out


def frequency_quarters(plane_energy: torch.Tensor) -> list[float]:
    """Share of the key energy in each quarter of the planes, highest RoPE frequency first (mean over heads)."""
    quarters = plane_energy.reshape(*plane_energy.shape[:-1], 4, -1).sum(-1)
    return (quarters / quarters.sum(-1, keepdim=True)).mean((0, 1)).tolist()


def _plane_energy(outer: torch.Tensor, d: int) -> torch.Tensor:
    diagonal = outer.diagonal(dim1=-2, dim2=-1)
    return diagonal[..., : d // 2] + diagonal[..., d // 2 :]


def summary(result: dict[str, Any]) -> str:
    """Markdown tables: mean over layers of the reconstruction errors, and the perplexities."""
    budgets = [str(b) for b in result["budgets"]]
    recon = result["reconstruction_error_per_layer"]
    lines = [
        f"held-out tokens {result['held_out_tokens']}, full model perplexity {result['full_model_perplexity']}",
        "",
    ]
    for kind in ("keys", "values", "value_mean_lost"):
        lines += [f"| {kind} (mean over layers) | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
        for name, per_budget in recon[kind].items():
            cells = [f"{sum(per_budget[b]) / len(per_budget[b]):.3f}" for b in budgets]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if result["perplexity"]:
        lines += [
            "| truncated | key basis | value basis | " + " | ".join(budgets) + " |",
            "|---|---|---|" + "---|" * len(budgets),
        ]
        seen: dict[tuple[str, str, str], dict[str, float]] = {}
        for row in result["perplexity"]:
            seen.setdefault((row["truncated"], row["key_basis"] or "-", row["value_basis"] or "-"), {})[
                str(row["budget"])
            ] = row["perplexity"]
        for (kind, key, value), by_budget in seen.items():
            lines.append(f"| {kind} | {key} | {value} | " + " | ".join(f"{by_budget[b]:.1f}" for b in budgets) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

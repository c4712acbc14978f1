"""The 7B path on CPU: Llama-2-7B- and Llama-3-8B-shaped models cut to 2 layers, through every stage.

For each shape (real widths, head_dim 128, real vocabulary; 2 decoder layers; random weights) one
fresh subprocess per stage, so each stage's peak RSS is its own:

  build      random LlamaForCausalLM in float32, saved (safetensors) with a word-level tokenizer
  calibrate  PCA on random token windows (`plugin.model.pca.calibrate`), saved as a PcaLlama checkpoint
  train      `llamafactory-cli train` with scripts/ds_z3.json on 2 processes (gloo): distillation,
             2 steps x 1 sequence x --tokens tokens per process, evaluation at 50%, save; the peak
             RSS of each process is polled (psutil) every 0.2 s
  evaluate   held-out NLL at 50% over --eval-tokens random tokens
  search     fast greedy budget search to 93.75% on 64 tokens (times one candidate evaluation;
             the exact search's evaluation count to 50% is computed, at 2 and at 32 layers)

and then what the measured per-layer figures imply for the 32-layer model (docs/scale.md).
Random weights: the quality numbers are meaningless, only time and memory are reported.

  python -m benchmarks.scale_sim                       # both shapes, writes docs/data/scale.json and docs/scale.md
  python -m benchmarks.scale_sim --shapes llama2-7b    # one shape
  python -m benchmarks.scale_sim --quick --work-dir D  # CI smoke test: the same stages on a small shape

With --work-dir, a stage whose result file (<shape>/<stage>.json) exists is not run again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.report import DATA

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "vocab_size": 32000, "full_layers": 32},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256, "full_layers": 32},
    "quick": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 1000, "full_layers": 4},
}
LAYERS = 2
TARGET = 0.9375  # of the timed search (see stage_search)


def param_counts(shape: dict, layers: int) -> dict[str, int]:
    """Parameters of a Llama of this shape: embeddings + lm_head, and per decoder layer."""
    h, i, heads, kv, vocab = (shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                  "num_key_value_heads", "vocab_size"))
    d = h // heads
    per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * i + 2 * h
    projection = kv * (2 * d * d + d)  # trainable per layer: two skews + the value mean
    return {"embeddings": 2 * vocab * h + h, "per_layer": per_layer, "projection_per_layer": projection,
            "bases_per_layer": 2 * kv * d * d, "total": 2 * vocab * h + h + layers * per_layer}


# ----------------------------------------------------------------------------------------- stages (subprocesses)
def stage_build(args: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamafactory_ext.testing import build_tokenizer

    shape = SHAPES[args.shape]
    out = Path(args.dir) / "base"
    tokenizer = build_tokenizer(out)
    config = LlamaConfig(**{k: v for k, v in shape.items() if k != "full_layers"}, num_hidden_layers=LAYERS,
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    return {"seconds": time.perf_counter() - start}


def _windows(vocab: int, rows: int, length: int, seed: int):
    import torch

    return torch.randint(4, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def stage_calibrate(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plugin.model.pca import calibrate

    base = Path(args.dir) / "base"
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    windows = _windows(model.config.vocab_size, 4, args.tokens, 1)
    start = time.perf_counter()
    pca, _ = calibrate(model, windows, batch_size=1, progress=False)
    seconds = time.perf_counter() - start
    pca.save_pretrained(Path(args.dir) / "pca")
    AutoTokenizer.from_pretrained(base).save_pretrained(Path(args.dir) / "pca")
    return {"seconds": seconds, "tokens": int(windows.numel()), "seconds_per_token": seconds / windows.numel()}


def stage_evaluate(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from plugin.evaluation.perplexity import token_nll

    model = AutoModelForCausalLM.from_pretrained(Path(args.dir) / "trained", torch_dtype=torch.float32)
    model.set_kv_budget(0.5)
    windows = _windows(model.config.vocab_size, max(1, args.eval_tokens // args.tokens), args.tokens, 2)
    start = time.perf_counter()
    token_nll(model, windows, batch_size=1, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": int(windows.numel()), "seconds_per_token": seconds / windows.numel(),
            "budget": model.kv_budget(), "cache_bytes_per_token": model.kv_cache_bytes_per_token(torch.bfloat16),
            "full_cache_bytes_per_token": model.full_cache_bytes_per_token(torch.bfloat16)}


def stage_search(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from plugin.budgets.greedy_search import exact_cost, run_search

    model = AutoModelForCausalLM.from_pretrained(Path(args.dir) / "trained", torch_dtype=torch.float32)
    cfg = model.config
    windows = _windows(cfg.vocab_size, 1, 64, 3)
    start = time.perf_counter()
    # To 93.75%, not 50%: the first rounds of the same descent (each round costs about the same), enough
    # to time a candidate evaluation without spending an hour of CPU on random weights.
    result = run_search(model, TARGET, windows, mode="fast", progress=False)
    seconds = time.perf_counter() - start
    rounds, evaluations = exact_cost(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                     cfg.kv_rank_step, 0.5)
    full_rounds, full_evaluations = exact_cost(SHAPES[args.shape]["full_layers"], cfg.num_key_value_heads,
                                               cfg.head_dim, cfg.kv_rank_step, 0.5)
    return {"seconds": seconds, "target": TARGET, "rounds": result.rounds, "evaluations": result.evaluations,
            "seconds_per_evaluation": seconds / max(1, result.evaluations), "exact_rounds": rounds,
            "exact_evaluations": evaluations, "full_exact_rounds": full_rounds,
            "full_exact_evaluations": full_evaluations}


STAGES = {"build": stage_build, "calibrate": stage_calibrate, "evaluate": stage_evaluate, "search": stage_search}


def run_stage(args: argparse.Namespace, stage: str) -> dict:
    """One stage in a fresh interpreter; its JSON result, with that process's own peak RSS."""
    command = [sys.executable, "-m", "benchmarks.scale_sim", "--stage", stage, "--shape", args.shape, "--dir", str(args.dir),
               "--tokens", str(args.tokens), "--eval-tokens", str(args.eval_tokens)]
    proc = subprocess.run(command, capture_output=True, text=True, env=_env(), check=False, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DISABLE_VERSION_CHECK="1",
               LLAMAFACTORY_VERBOSITY="INFO", WANDB_DISABLED="true")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_train(args: argparse.Namespace) -> dict:
    """2-process ZeRO-3 distillation through llamafactory-cli; peak RSS per process by polling."""
    import psutil
    import yaml

    from llamafactory_ext.testing import pt_config, write_tiny_datasets

    work = Path(args.dir)
    data = write_tiny_datasets(work / "data", repeat=40)
    config = pt_config(work / "pca", data, work / "trained", cutoff_len=args.tokens, max_steps=2,
                       per_device_train_batch_size=1, gradient_accumulation_steps=1, logging_steps=1,
                       overwrite_output_dir=True, overwrite_cache=True, preprocessing_num_workers=1,
                       dataloader_num_workers=0, learning_rate=1.0e-3, val_size=0.1, eval_strategy="steps",
                       eval_steps=2, per_device_eval_batch_size=1, matryoshka_trainer="distill",
                       matryoshka_projection_lr=1.0e-2, deepspeed=str(REPO / "scripts" / "ds_z3.json"),
                       save_strategy="no", plot_loss=False)
    (work / "train.yaml").write_text(yaml.safe_dump(config))
    env = dict(_env(), FORCE_TORCHRUN="1", NPROC_PER_NODE="2", OMP_NUM_THREADS="1",  # one thread per process
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    peaks: dict[int, int] = {}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "llamafactory-cli"), "train", str(work / "train.yaml")],
                            env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = threading.Event()

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                for child in root.children(recursive=True):
                    command = " ".join(child.cmdline())
                    # the training processes: torchrun's own children (a process forked from one, e.g. a data
                    # worker, shares its command line and was counted as a third process)
                    if ("launcher.py" in command and "torchrun" not in command
                            and "torchrun" in " ".join(child.parent().cmdline())):
                        peaks[child.pid] = max(peaks.get(child.pid, 0), child.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.2)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    start = time.perf_counter()
    log, _ = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    (work / "train.log").write_text(log)
    trained = work / "trained"
    if not (trained / "model.safetensors").is_file() and not list(trained.glob("model*.safetensors")):
        raise RuntimeError(f"training saved nothing (rc={proc.returncode}):\n{log[-3000:]}")
    rows = [json.loads(line) for line in (trained / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    steps = [row for row in rows if "loss" in row]
    check = json.loads((trained / "matryoshka_processes_check.json").read_text())
    def seconds_of(row: dict) -> int:  # "h:mm:ss", LLaMA-Factory's one-second resolution
        hours, minutes, secs = (int(x) for x in row["elapsed_time"].split(":"))
        return 3600 * hours + 60 * minutes + secs

    step_seconds = seconds_of(steps[-1]) - seconds_of(steps[0]) if len(steps) > 1 else None
    results = json.loads((trained / "all_results.json").read_text())
    return {"seconds_total": seconds, "train_runtime": results.get("train_runtime"),
            "second_step_seconds": step_seconds, "tokens_per_step": 2 * args.tokens,
            "peak_rss_gb_per_process": sorted(round(v / 2**30, 2) for v in peaks.values()),
            "bases_identical_across_processes": all(
                len({(e["bases_sha256"], e["means_sha256"]) for e in entries}) == 1 for entries in check.values()
                if entries is not check.get("as loaded")),
            "orthogonality_error": max(e["orthogonality_error"] for e in check["after training"]),
            "rc": proc.returncode}


# ----------------------------------------------------------------------------------------- report
def fast_evaluations(entries: int, steps_each: int, fraction: float) -> int:
    """Candidate evaluations of a fast search that lowers every entry by `steps_each` grid steps (to 50%
    from full rank at step head_dim / 8), ceil(fraction x candidates) per round; an upper bound, since
    entries that reach the floor early stop being candidates."""
    remaining, total = entries * steps_each, 0
    while remaining > 0:
        total += entries
        remaining -= min(remaining, math.ceil(fraction * entries))
    return total


def implied(shape_name: str, measured: dict) -> dict:
    """The 32-layer model from the 2-layer measurements: parameters, memory shares, time per token."""
    shape = SHAPES[shape_name]
    full, small = param_counts(shape, shape["full_layers"]), param_counts(shape, LAYERS)
    layers = shape["full_layers"]
    d = shape["hidden_size"] // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"]
    eval_layer_share = small["per_layer"] * LAYERS / small["total"]  # FLOPs share of the decoder layers, roughly
    per_token = measured["evaluate"]["seconds_per_token"]
    return {
        "params_billion": round(full["total"] / 1e9, 2),
        "bf16_weights_gb": round(full["total"] * 2 / 2**30, 1),
        "zero3_bf16_weights_gb_per_gpu_of_8": round(full["total"] * 2 / 8 / 2**30, 2),
        "trainable_projection_params_million": round(full["projection_per_layer"] * layers / 1e6, 1),
        "trainable_share_percent": round(100 * full["projection_per_layer"] * layers / full["total"], 2),
        "projection_optimizer_state_gb": round(full["projection_per_layer"] * layers * 16 / 2**30, 2),
        "fp32_bases_gb": round(full["bases_per_layer"] * layers * 4 / 2**30, 2),
        "full_cache_kb_per_token_bf16": 2 * layers * kv * d * 2 / 1024,
        "fast_search_evaluations_to_half": fast_evaluations(layers * kv * 2, 4, 0.25),  # d/2 in steps of d/8
        "cpu_eval_seconds_per_token_scaled": round(per_token * ((1 - eval_layer_share) + eval_layer_share * layers / LAYERS), 3),
    }


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def render(payload: dict) -> str:
    lines = [
        "# Scale: the 7B path, simulated on CPU",
        "",
        "Generated by `python -m benchmarks.scale_sim` (do not edit by hand).",
        f"Machine: {payload['machine']}; date {payload['date']}; {payload['tokens']} tokens per sequence.",
        "",
        "Each shape has the real widths, head_dim 128 and vocabulary of its model but **2 decoder layers** and",
        "random weights, so quality figures mean nothing; time and memory are what is measured. Every stage is",
        "a fresh process (peak RSS its own). Training is the real `llamafactory-cli train` with",
        "`scripts/ds_z3.json` on 2 processes (gloo): distillation, 2 steps, evaluation at 50%, bases checked",
        "identical across the processes (`matryoshka_processes_check.json`).",
        "",
        "| shape | stage | seconds | per token | peak RSS (GB) | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in payload["shapes"].items():
        m = run["measured"]
        if "failed" in m:
            last = m["failed"]["error"].strip().splitlines()[-1][:160] if m["failed"]["error"].strip() else "?"
            lines.append(_row(name, m["failed"]["stage"], "failed", "", "", f"`{last}`"))
            continue
        train, calib, ev, search = m["train"], m["calibrate"], m["evaluate"], m["search"]
        step = (train["second_step_seconds"] or 0) / train["tokens_per_step"] * 1e3
        lines += [
            _row(name, "build (fp32)", f"{m['build']['seconds']:.0f}", "", m["build"]["peak_rss_gb"],
                 f"{run['params_2_layers_billion']} B parameters"),
            _row(name, "calibrate", f"{calib['seconds']:.0f}", f"{calib['seconds_per_token'] * 1e3:.1f} ms",
                 calib["peak_rss_gb"], f"{calib['tokens']} tokens"),
            _row(name, "train, ZeRO-3 x2", f"{train['train_runtime']:.0f} (2 steps)", f"{step:.0f} ms (step 2)",
                 ", ".join(str(x) for x in train["peak_rss_gb_per_process"]),
                 f"bases identical: {train['bases_identical_across_processes']}, "
                 f"max orth. error {train['orthogonality_error']:.1e}"),
            _row(name, "evaluate 50%", f"{ev['seconds']:.0f}", f"{ev['seconds_per_token'] * 1e3:.1f} ms",
                 ev["peak_rss_gb"], f"cache {ev['cache_bytes_per_token'] / 1024:.0f} of "
                 f"{ev['full_cache_bytes_per_token'] / 1024:.0f} KB/token (bf16)"),
            _row(name, f"fast search to {search['target']:.2%}", f"{search['seconds']:.0f}", f"{search['seconds_per_evaluation']:.2f} s "
                 "/ evaluation", search["peak_rss_gb"],
                 f"{search['evaluations']} evaluations; an exact search to 50% is {search['exact_evaluations']} here, "
                 f"{search['full_exact_evaluations']} at 32 layers"),
        ]
    lines += ["", "## What it implies for the 32-layer models", "",
              _row("shape", "parameters", "bf16 weights", "ZeRO-3 share of 8 GPUs", "trainable projections",
                   "their Adam state", "fp32 bases", "full KV cache (bf16)", "fast search to 50%",
                   "CPU eval s/token, scaled"),
              "|---" * 10 + "|"]
    for name, run in payload["shapes"].items():
        if "implied" not in run:
            continue
        i = run["implied"]
        lines.append(_row(name, f"{i['params_billion']} B", f"{i['bf16_weights_gb']} GB",
                          f"{i['zero3_bf16_weights_gb_per_gpu_of_8']} GB",
                          f"{i['trainable_projection_params_million']} M", f"{i['projection_optimizer_state_gb']} GB",
                          f"{i['fp32_bases_gb']} GB", f"{i['full_cache_kb_per_token_bf16']:.0f} KB/token",
                          f"<= {i['fast_search_evaluations_to_half']} evaluations",
                          i["cpu_eval_seconds_per_token_scaled"]))
    shares = ", ".join(f"{run['implied']['trainable_share_percent']}% ({name})" for name, run in payload["shapes"].items()
                       if "implied" in run)
    lines += ["", f"The projections add little to a 7B run: the trainable skews and means are {shares} of the",
              "weights, their Adam state (fp32 master + two moments + gradient, 16 bytes each) under a GB in total",
              "and split 8 ways by ZeRO-3. Rank 0 peaks higher than rank 1 in training: transformers' ZeRO-3 loader",
              "reads the whole checkpoint on rank 0. The exact greedy search is out of reach at 32 layers",
              "(millions of candidate evaluations); `mkv search-budget --mode auto` prints the estimate and switches",
              "to fast mode, whose upper bound is in the table. What grows with the vocabulary is the distillation's logits: the teacher's and",
              "the student's `[tokens, vocab]` rows, for which the loss runs in 512-token checkpointed chunks.",
              "CPU time per token scales with depth; on a GPU these runs are compute-bound matmuls, where the",
              "distillation step costs one extra no-grad forward (the teacher) over plain Matryoshka training.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--shapes", default="llama2-7b,llama3-8b", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sequence (training and evaluation)")
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="the 'quick' shape, short sequences, no docs written")
    parser.add_argument("--work-dir", default=None, help="where checkpoints go (default: a temp dir, removed)")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        import resource

        result = STAGES[args.stage](args)
        result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2)
        print(json.dumps(result))
        return 0
    shapes = ["quick"] if args.quick else [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    if args.quick:
        args.tokens, args.eval_tokens = 32, 64
    root = (Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="mkv-scale-"))).resolve()
    payload = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "date": dt.date.today().isoformat(),
               "tokens": args.tokens, "shapes": {}}
    from tqdm import tqdm

    for shape in shapes:
        args.shape, args.dir = shape, root / shape
        args.dir.mkdir(parents=True, exist_ok=True)
        measured = {}
        for stage in tqdm(["build", "calibrate", "train", "evaluate", "search"], desc=shape):
            done = args.dir / f"{stage}.json"  # resumable: a stage that finished is not run again
            if not done.is_file():
                try:
                    result = run_train(args) if stage == "train" else run_stage(args, stage)
                except RuntimeError as error:  # e.g. out of memory: reported, and the later stages need it
                    measured["failed"] = {"stage": stage, "error": str(error)[-1500:]}
                    break
                done.write_text(json.dumps(result))
            measured[stage] = json.loads(done.read_text())
        entry = {"measured": measured, "params_2_layers_billion": round(param_counts(SHAPES[shape], LAYERS)["total"] / 1e9, 2)}
        if "failed" not in measured:
            entry["implied"] = implied(shape, measured)
        payload["shapes"][shape] = entry
    out = root / "scale.json" if args.quick else DATA / "scale.json"
    out.write_text(json.dumps(payload, indent=1) + "\n")
    if not args.quick:
        (REPO / "docs" / "scale.md").write_text(render(payload))
    else:
        (root / "scale.md").write_text(render(payload))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

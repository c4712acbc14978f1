"""Time OpenCompass's PPL inference of the offline suite: label by label vs prefix sharing.

    python -m opencompass_ext.bench --model DIR [--budget 0.5] [--datasets piqa,csqa]
                                    [--items 48] [--batch-sizes 16] [--threads 2]

Runs the same pieces as ``opencompass configs/pcallama.py`` (dataset entry from
opencompass_ext.suite, OpenCompass retriever, PcaLlamaBaseModel) on the first ``--items``
rows of the cpu subset, once with OpenCompass's own ``PPLInferencer`` at each batch size
(every choice of every item run in full) and once with ``PrefixSharingPPLInferencer`` (the
configs' default). Prints items/s (an item = all of its choices scored), the speed-up, and
how many predictions and scores agree between the two.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

LABEL_BY_LABEL = "opencompass.openicl.icl_inferencer.PPLInferencer"


def _infer(model, ds_cfg, dataset, inferencer_type, batch_size):
    """(seconds, {item index: {label: score}}, predictions) of one inference pass."""
    from opencompass.registry import ICL_INFERENCERS, ICL_PROMPT_TEMPLATES, ICL_RETRIEVERS

    infer = ds_cfg["infer_cfg"]
    ice_t = ICL_PROMPT_TEMPLATES.build(infer["ice_template"]) if "ice_template" in infer else None
    pr_t = ICL_PROMPT_TEMPLATES.build(infer["prompt_template"]) if "prompt_template" in infer else None
    retriever = ICL_RETRIEVERS.build(dict(infer["retriever"], dataset=dataset))
    inferencer = ICL_INFERENCERS.build({"type": inferencer_type, "model": model, "batch_size": batch_size,
                                            "max_seq_len": 2048})
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        preds = inferencer.inference(retriever, ice_template=ice_t, prompt_template=pr_t,
                                     output_json_filepath=tmp, output_json_filename="p.json")
        seconds = time.perf_counter() - start
        with open(f"{tmp}/p.json") as handle:
            saved = json.load(handle)
    scores = {k: {lab: v["PPL"] for lab, v in item.items() if lab.startswith("label: ")} for k, item in saved.items()}
    return seconds, scores, preds


def run(model_path: str, budget: float | None, names: list[str], items: int, batch_sizes: list[int],
        suite: str = "cpu", threads: int | None = None) -> list[dict]:
    import torch
    from opencompass.utils import build_dataset_from_cfg

    from .models import PcaLlamaBaseModel
    from .suite import PPL_INFERENCER, offline_datasets

    if threads:
        torch.set_num_threads(threads)
    model = PcaLlamaBaseModel(path=model_path, kv_budget=budget, max_seq_len=2048)
    results = []
    for ds_cfg in offline_datasets(suite, names=names):
        ds_cfg = copy.deepcopy(ds_cfg)
        ds_cfg["reader_cfg"]["test_range"] = f"[0:{items}]"
        dataset = build_dataset_from_cfg(ds_cfg)
        n = len(dataset.test)
        shared_s, shared_scores, shared_preds = _infer(model, ds_cfg, dataset, PPL_INFERENCER, 1)
        for bs in batch_sizes:
            s, scores, preds = _infer(model, ds_cfg, dataset, LABEL_BY_LABEL, bs)
            diff = max(abs(scores[k][lab] - shared_scores[k][lab]) for k in scores for lab in scores[k])
            row = {"dataset": ds_cfg["abbr"], "items": n, "batch_size": bs, "label_by_label_s": s,
                   "prefix_sharing_s": shared_s, "speedup": s / shared_s,
                   "same_predictions": sum(a == b for a, b in zip(preds, shared_preds)), "max_score_diff": diff}
            results.append(row)
            print(f"{row['dataset']:18s} {n} items: PPLInferencer batch {bs}: {n / s:6.2f} items/s; "
                  f"prefix sharing: {n / shared_s:6.2f} items/s ({row['speedup']:.1f}x); "
                  f"same prediction on {row['same_predictions']}/{n}, largest score difference {diff:.1e}",
                  flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m opencompass_ext.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="PcaLlama checkpoint directory")
    p.add_argument("--budget", type=float, default=None, help="KV budget in (0, 1] (default: as saved)")
    p.add_argument("--datasets", default="piqa,csqa")
    p.add_argument("--items", type=int, default=48)
    p.add_argument("--batch-sizes", default="16", help="batch sizes of the label-by-label PPLInferencer")
    p.add_argument("--suite", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    rows = run(a.model, a.budget, a.datasets.split(","), a.items,
               [int(x) for x in a.batch_sizes.split(",")], a.suite, a.threads)
    if a.json:
        with open(a.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()

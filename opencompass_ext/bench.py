"""Time OpenCompass's PPL inference of the offline suite at several batch sizes.

    python -m opencompass_ext.bench --model DIR [--budget 0.5] [--datasets piqa,csqa]
                                    [--items 48] [--batch-sizes 1,8,16,32]

Runs the same pieces as ``opencompass configs/pcallama.py`` (dataset entry from
opencompass_ext.suite, OpenCompass retriever + PPLInferencer, PcaLlamaBaseModel)
on the first ``--items`` rows of the cpu subset, and prints items/s (an item = all
of its choices scored).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time


def run(model_path, budget, names, items, batch_sizes, suite="cpu", threads=None):
    import torch
    from opencompass.registry import ICL_INFERENCERS, ICL_PROMPT_TEMPLATES, ICL_RETRIEVERS
    from opencompass.utils import build_dataset_from_cfg

    from .models import PcaLlamaBaseModel
    from .suite import offline_datasets

    if threads:
        torch.set_num_threads(threads)
    model = PcaLlamaBaseModel(path=model_path, kv_budget=budget, max_seq_len=2048)
    results = []
    for ds_cfg in offline_datasets(suite, names=names):
        ds_cfg = copy.deepcopy(ds_cfg)
        ds_cfg["reader_cfg"]["test_range"] = f"[0:{items}]"
        dataset = build_dataset_from_cfg(ds_cfg)
        infer = ds_cfg["infer_cfg"]
        ice_t = ICL_PROMPT_TEMPLATES.build(infer["ice_template"]) if "ice_template" in infer else None
        pr_t = ICL_PROMPT_TEMPLATES.build(infer["prompt_template"]) if "prompt_template" in infer else None
        n_labels = len((infer.get("ice_template") or infer.get("prompt_template"))["template"])
        for bs in batch_sizes:
            retr = dict(infer["retriever"], dataset=dataset)
            retriever = ICL_RETRIEVERS.build(retr)
            inferencer = ICL_INFERENCERS.build(dict(infer["inferencer"], model=model,
                                                    batch_size=bs, max_seq_len=2048))
            with tempfile.TemporaryDirectory() as tmp:
                t0, c0 = time.perf_counter(), time.process_time()
                inferencer.inference(retriever, ice_template=ice_t, prompt_template=pr_t,
                                     output_json_filepath=tmp, output_json_filename="p.json")
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            n = len(dataset.test)
            results.append((ds_cfg["abbr"], bs, n, n_labels, dt, n / dt, cpu))
            print(f"{ds_cfg['abbr']:18s} batch {bs:3d}: {n} items x {n_labels} choices "
                  f"in {dt:6.1f} s = {n / dt:6.2f} items/s (process CPU time {cpu:6.1f} s = "
                  f"{n / cpu:6.2f} items per CPU-second)", flush=True)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m opencompass_ext.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--budget", type=float, default=None)
    p.add_argument("--datasets", default="piqa,csqa")
    p.add_argument("--items", type=int, default=48)
    p.add_argument("--batch-sizes", default="1,8,16,32")
    p.add_argument("--suite", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    run(a.model, a.budget, a.datasets.split(","), a.items,
        [int(x) for x in a.batch_sizes.split(",")], a.suite, a.threads)


if __name__ == "__main__":
    main()

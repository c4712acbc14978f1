"""OpenCompass dataset and model entries for the MatryoshkaKV evaluation configs.

Used by ``configs/pcallama.py`` (offline suite) and ``configs/pcallama_paper.py``.
Everything here returns plain dicts whose ``type`` fields are dotted-path strings,
so the configs survive OpenCompass's config dump and its subprocess runners.

Templates follow OpenCompass's own ppl configs (0.5.4), so that scores are scored
the way the paper's numbers were:

* csqa  - ``commonsenseqa_ppl_5545e2`` (cloze, 'Question: ..\\nAnswer: ' + option text),
  8-shot; the paper's config picks shots with MDLRetriever, here the 8 shots are
  fixed (FixKRetriever over ``csqa_ice.jsonl``) so every model sees the same prompt.
* piqa  - ``piqa_ppl_1cf9f0`` ('The following makes sense: \\nQ: ..\\nA: ..').
* siqa  - ``siqa_ppl_ced5f6``.
* boolq - ``SuperGLUE_BoolQ_ppl_314b96`` (passage, question, 'No'/'Yes').
* obqa  - cloze like csqa (OpenCompass's obqa ppl configs score the letter
  'A'..'D', which is near chance for small base models).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from . import datasets as _ds

PROMPT_TEMPLATE = "opencompass.openicl.icl_prompt_template.PromptTemplate"
ZERO_RETRIEVER = "opencompass.openicl.icl_retriever.ZeroRetriever"
FIXK_RETRIEVER = "opencompass.openicl.icl_retriever.FixKRetriever"
PPL_INFERENCER = "opencompass_ext.inferencer.PrefixSharingPPLInferencer"
ACC_EVALUATOR = "opencompass.openicl.icl_evaluator.AccEvaluator"
MKV_DATASET = "opencompass_ext.datasets.MKVJsonlDataset"
PCALLAMA_MODEL = "opencompass_ext.models.PcaLlamaBaseModel"

DEFAULT_BUDGETS = (1.0, 0.75, 0.625, 0.5, 0.375, 0.25)
# abbreviations in result tables
ABBR = {"csqa": "csqa-8shot", "piqa": "piqa", "obqa": "obqa", "siqa": "siqa", "boolq": "boolq"}


def _round(human: str, bot: str, begin: str | None = None) -> dict:
    d = {"round": [{"role": "HUMAN", "prompt": human}, {"role": "BOT", "prompt": bot}]}
    if begin is not None:
        d = dict(begin=begin, **d)
    return d


def _dataset(name: str, suite: str, root: str | None, labels: Sequence[str],
             input_columns: list[str], template: dict, retriever: dict,
             ice_template: dict | None = None, ice_path: str | None = None) -> dict:
    infer_cfg = {"retriever": retriever, "inferencer": {"type": PPL_INFERENCER}}
    if ice_template is not None:
        infer_cfg["ice_template"] = ice_template
    else:
        infer_cfg["prompt_template"] = {"type": PROMPT_TEMPLATE, "template": template}
    d = {
        "abbr": ABBR[name] + ("" if suite == "full" else f"-{suite}"),
        "type": MKV_DATASET,
        "path": _ds.dataset_path(name, suite, root),
        "reader_cfg": {"input_columns": input_columns, "output_column": "answer",
                        "train_split": "train", "test_split": "test"},
        "infer_cfg": infer_cfg,
        "eval_cfg": {"evaluator": {"type": ACC_EVALUATOR}},
    }
    if ice_path:
        d["ice_path"] = ice_path
    return d


def offline_datasets(suite: str = "cpu", names: Iterable[str] | None = None,
                     root: str | None = None, prepare: bool = True) -> list[dict]:
    """Dataset entries of the offline suite ('quick', 'cpu' or 'full')."""
    if suite not in _ds.SUITES:
        raise ValueError(f"MKV_SUITE={suite!r}: choose one of {list(_ds.SUITES)}")
    names = list(names or _ds.DATASET_NAMES)
    unknown = [n for n in names if n not in _ds.SOURCES]
    if unknown:
        raise ValueError(f"unknown offline dataset(s) {unknown}; choose from {list(_ds.SOURCES)}")
    if prepare:
        _ds.prepare(root)
    out = []
    for name in names:
        if name == "csqa":
            letters = list("ABCDE")
            ice_t = {"type": PROMPT_TEMPLATE, "ice_token": "</E>", "template": {
                ans: _round("Question: {question}\nAnswer: ", f"{{{ans}}}", begin="</E>")
                for ans in letters}}
            out.append(_dataset(
                name, suite, root, letters, ["question"] + letters, {},
                retriever={"type": FIXK_RETRIEVER, "fix_id_list": list(range(_ds.CSQA_NUM_ICE))},
                ice_template=ice_t, ice_path=_ds.ice_path(root)))
        elif name == "piqa":
            tpl = {ans: f"The following makes sense: \nQ: {{question}}\nA: {{{ans}}}\n"
                   for ans in "AB"}
            out.append(_dataset(name, suite, root, "AB", ["question", "A", "B"], tpl,
                                retriever={"type": ZERO_RETRIEVER}))
        elif name == "obqa":
            tpl = {ans: _round("Question: {question}\nAnswer: ", f"{{{ans}}}") for ans in "ABCD"}
            out.append(_dataset(name, suite, root, "ABCD", ["question", "A", "B", "C", "D"], tpl,
                                retriever={"type": ZERO_RETRIEVER}))
        elif name == "siqa":
            tpl = {ans: _round("{context}\nQuestion: {question}\nAnswer:", f"{{{ans}}}")
                   for ans in "ABC"}
            out.append(_dataset(name, suite, root, "ABC", ["context", "question", "A", "B", "C"],
                                tpl, retriever={"type": ZERO_RETRIEVER}))
        elif name == "boolq":
            tpl = {"A": _round("{passage}\nQuestion: {question}?", "No"),
                   "B": _round("{passage}\nQuestion: {question}?", "Yes")}
            out.append(_dataset(name, suite, root, "AB", ["passage", "question"], tpl,
                                retriever={"type": ZERO_RETRIEVER}))
    return out


def apply_env(datasets: list[dict]) -> list[dict]:
    """What the configs do to their dataset entries, in place: MKV_TEST_RANGE (e.g. "[0:500]")
    becomes every set's test_range, and OpenCompass's PPLInferencer becomes
    PrefixSharingPPLInferencer (same prompts and scores, shared prefixes run once)."""
    test_range = os.environ.get("MKV_TEST_RANGE", "").strip()
    for d in datasets:
        if test_range:
            d["reader_cfg"]["test_range"] = test_range
        inferencer = d["infer_cfg"]["inferencer"]
        kind = inferencer["type"]
        # a dotted string, a class, or (a config read in mmengine's lazy-import mode) a LazyAttr whose str() is its name
        name = kind.__name__ if isinstance(kind, type) else str(kind)
        if name.rsplit(".", 1)[-1] == "PPLInferencer":
            inferencer["type"] = PPL_INFERENCER
    return datasets


# --------------------------------------------------------------------------- models
def parse_budget(budget: float | str) -> float:
    """A kv_budget: 0.375, '0.375' or '37.5%' -> 0.375 (plugin.budgets.ranks.check_budget; errors name kv_budget)."""
    from plugin.budgets.ranks import check_budget  # lazy: configs import this module without torch

    return check_budget(budget, "kv_budget")


def parse_budgets(text: str | None) -> list[float]:
    """MKV_BUDGETS: '100,75,62.5' or '1,0.75' or '37.5%' -> fractions (values > 1 are percentages);
    empty -> DEFAULT_BUDGETS."""
    from plugin.budgets.ranks import parse_budgets as parse  # lazy: configs import this module without torch

    if not text:
        return list(DEFAULT_BUDGETS)
    return parse(text, "MKV_BUDGETS", "kv_budget", percents=True)


def format_budget(budget: float) -> str:
    """0.375 -> '37.5%', 0.5 -> '50%'."""
    return f"{round(budget * 100, 4):g}%"


def budget_abbr(budget: float | None = None, rank_file: str | None = None,
                prefix: str = "pcallama") -> str:
    """Model abbreviation for result tables: 'pcallama-37.5%', 'pcallama-ranks-<file stem>'."""
    if budget is not None:
        return f"{prefix}-{format_budget(parse_budget(budget))}"
    if rank_file is not None:
        stem = os.path.splitext(os.path.basename(str(rank_file)))[0]
        return f"{prefix}-ranks-{stem}"
    return prefix


def _default_batch_size() -> int:
    env = os.environ.get("MKV_BATCH_SIZE")
    if env:
        return int(env)
    return 16


def model_entries(model_path: str, budgets: Sequence[float] = DEFAULT_BUDGETS,
                  rank_files: Sequence[str] = (), base_model_path: str | None = None,
                  batch_size: int | None = None, max_seq_len: int = 2048,
                  num_gpus: int | None = None, prefix: str = "pcallama",
                  model_kwargs: dict | None = None) -> list[dict]:
    """One PcaLlamaBaseModel entry per budget and per rank file, plus the base model."""
    if num_gpus is None:
        num_gpus = int(os.environ.get("MKV_NUM_GPUS", "1" if has_cuda() else "0"))
    common = {"type": PCALLAMA_MODEL, "max_seq_len": max_seq_len,
                  "batch_size": batch_size or _default_batch_size(),
                  "run_cfg": {"num_gpus": num_gpus, "num_procs": 1}}
    if model_kwargs:
        common["model_kwargs"] = dict(model_kwargs)
    models = []
    if base_model_path:
        models.append(dict(abbr="base-uncompressed", path=base_model_path, **common))
    for b in budgets:
        models.append(dict(abbr=budget_abbr(b, prefix=prefix), path=model_path, kv_budget=b,
                           **common))
    for rf in rank_files:
        models.append(dict(abbr=budget_abbr(rank_file=rf, prefix=prefix), path=model_path,
                           rank_file=rf, **common))
    return models


def has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def summarizer(dataset_abbrs: Sequence[str]) -> dict:
    """Average row over the given datasets, listed after them."""
    return {
        "dataset_abbrs": list(dataset_abbrs) + ["mkv-average"],
        "summary_groups": [{"name": "mkv-average", "subsets": list(dataset_abbrs)}],
    }


# --------------------------------------------------------------------------- environment
def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    return [t.strip() for t in raw.replace(";", ",").split(",") if t.strip()]


def default_suite() -> str:
    return "full" if has_cuda() else "cpu"


def rank_files_from_env() -> list[str]:
    """MKV_RANK_FILE as absolute paths, each checked to exist."""
    rank_files = [os.path.abspath(os.path.expanduser(p)) for p in (_env_list("MKV_RANK_FILE") or [])]
    for rf in rank_files:
        if not os.path.isfile(rf):
            raise FileNotFoundError(f"MKV_RANK_FILE: {rf!r} does not exist")
    return rank_files


def config_from_env(need_suite: bool = True) -> dict:
    """Read the MKV_* variables of configs/pcallama*.py (see that file's header)."""
    suite = os.environ.get("MKV_SUITE", "").strip().lower() or default_suite()
    if need_suite and suite not in _ds.SUITES:
        raise ValueError(f"MKV_SUITE={suite!r}: choose one of {', '.join(_ds.SUITES)}")
    budgets_raw = os.environ.get("MKV_BUDGETS", "").strip()
    budgets = [] if budgets_raw.lower() == "none" else parse_budgets(budgets_raw)
    rank_files = rank_files_from_env()
    model = os.environ.get("MKV_MODEL", "").strip()
    base = os.environ.get("MKV_BASE_MODEL", "").strip()
    if not model:
        model, embedded_base = default_models()
        base = base or embedded_base
    if base.lower() == "none":
        base = ""
    for label, p in (("MKV_MODEL", model), ("MKV_BASE_MODEL", base)):
        if p and not os.path.isdir(p):
            raise FileNotFoundError(f"{label}={p!r} is not a checkpoint directory")
    names = _env_list("MKV_DATASETS")
    bs = os.environ.get("MKV_BATCH_SIZE", "").strip()
    return {"suite": suite, "budgets": budgets, "rank_files": rank_files,
                "model": os.path.abspath(model), "base_model": os.path.abspath(base) if base else None,
                "datasets": names, "batch_size": int(bs) if bs else None,
                "max_seq_len": int(os.environ.get("MKV_MAX_SEQ_LEN", "2048"))}


def default_models() -> tuple:
    """(pcallama dir, base dir) when MKV_MODEL is unset: the checkpoint of `make demo`
    (outputs/demo/matryoshka, else outputs/demo/pca) if present, else the embedded SmolLM2-135M's
    PcaLlama wrapper with identity bases (built once into the cache).

    Identity bases make 100% identical to the base model; lower budgets then drop trailing
    head dimensions without any PCA or training. It is a default that runs offline, not an
    evaluation of MatryoshkaKV: point MKV_MODEL at a PCA-initialised or trained checkpoint.
    """
    import logging

    from plugin.storage import assets
    base = str(assets.embedded_model_dir())
    # `make demo` writes these; prefer the trained checkpoint, then the PCA one.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("matryoshka", "pca"):
        demo = os.path.join(repo, "outputs", "demo", name)
        if os.path.isfile(os.path.join(demo, "config.json")):
            logging.getLogger("matryoshka_kv").warning("MKV_MODEL is not set: evaluating %s (from `make demo`)", demo)
            return demo, base
    out = _embedded_checkpoint("smollm2-135m-pcallama-identity")
    logging.getLogger("matryoshka_kv").warning(
        "MKV_MODEL is not set: evaluating the embedded SmolLM2-135M wrapped as PcaLlama with "
        "IDENTITY bases (no PCA, no training). Set MKV_MODEL to a PCA-initialised or trained "
        "checkpoint for real numbers.")
    return out, base


def shipped_checkpoint(name: str = "embedded-matryoshka") -> str:
    """A PcaLlama checkpoint directory of the embedded SmolLM2-135M with projections shipped in
    the package (``plugin/trained/<name>``), written once into the cache."""
    from plugin.storage.loading import SHIPPED
    if name not in SHIPPED:
        raise ValueError(f"no shipped projections named {name!r}; choose from {sorted(SHIPPED)}")
    return _embedded_checkpoint(f"smollm2-135m-{name}", SHIPPED[name])


def _embedded_checkpoint(dirname: str, projections=None) -> str:
    """``<cache>/<dirname>``: the embedded SmolLM2-135M as a PcaLlama (identity bases, or the given
    projections), with its tokenizer; written once (temp dir, then rename)."""
    import shutil
    import tempfile

    out = os.path.join(_ds.cache_dir(), dirname)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plugin.model.modeling import PcaLlamaForCausalLM
    from plugin.storage import assets
    base = str(assets.embedded_model_dir())
    llama = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    pca = PcaLlamaForCausalLM.from_llama(llama, projections=projections)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=".tmp-pcallama-")
    pca.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out

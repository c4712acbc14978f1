"""Long-context retrieval for OpenCompass: the offline pass-key task of ``plugin.evaluation.retrieval``.

One OpenCompass dataset per (context length, needle depth), so the result table reads as
accuracy by length and depth. Each item is a haystack of held-out text (the embedded corpus'
evaluation split) with a five-digit pass key at the given depth; the model answers by greedy
generation and ``PassKeyEvaluator`` scores the first five-digit number of the answer. The items
are those ``mkv eval --passkey`` and ``benchmarks/longctx.py`` score (same seed, same text).
"""
from __future__ import annotations

from collections.abc import Sequence

from plugin.evaluation.retrieval import ANSWER_TOKENS  # the answer length every front end generates

try:
    from opencompass.datasets.base import BaseDataset as _OCBase
    from opencompass.openicl.icl_evaluator import BaseEvaluator as _OCEvaluator
except ImportError:  # pragma: no cover - OpenCompass not installed
    _OCBase = _OCEvaluator = object

PASSKEY_DATASET = "opencompass_ext.longctx.PassKeyDataset"
PASSKEY_EVALUATOR = "opencompass_ext.longctx.PassKeyEvaluator"
GEN_INFERENCER = "opencompass.openicl.icl_inferencer.GenInferencer"
PROMPT_TEMPLATE = "opencompass.openicl.icl_prompt_template.PromptTemplate"
ZERO_RETRIEVER = "opencompass.openicl.icl_retriever.ZeroRetriever"


class PassKeyDataset(_OCBase):
    """``load(tokenizer_path, context, depth, per_depth, depths)``: the items of one depth.

    Items are drawn for all `depths` at once (as ``plugin.evaluation.retrieval.passkey_items`` does) and the
    ones at `depth` kept, so every entry holds exactly the prompts the other front ends score.
    """

    @staticmethod
    def load(tokenizer_path: str, context: int, depth: float, per_depth: int = 8,
             depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), **kwargs):
        from datasets import Dataset, DatasetDict
        from transformers import AutoTokenizer

        from plugin.evaluation.retrieval import passkey_items
        from plugin.storage.texts import load_texts

        if float(depth) not in [float(d) for d in depths]:
            raise ValueError(f"depth {depth} is not one of depths {list(depths)}")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        items = passkey_items(tokenizer, load_texts(None, split="evaluation"), int(context), list(depths), per_depth)
        rows = [{"prompt": item.prompt, "answer": item.key} for item in items if item.depth == float(depth)]
        test = Dataset.from_list(rows)
        return DatasetDict({"train": test, "test": test})


class PassKeyEvaluator(_OCEvaluator):
    """Accuracy (percent): an answer is right when its first five-digit number is the key."""

    def score(self, predictions: list[str], references: list[str]) -> dict:
        from plugin.evaluation.retrieval import answer_key

        if len(predictions) != len(references):
            return {"error": f"{len(predictions)} predictions for {len(references)} references"}
        details = [{"pred": answer_key(p), "answer": r, "correct": answer_key(p) == r}
                   for p, r in zip(predictions, references)]
        correct = sum(d["correct"] for d in details)
        return {"accuracy": 100.0 * correct / max(1, len(details)), "details": details}


def passkey_datasets(tokenizer_path: str, contexts: Sequence[int], depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                     per_depth: int = 8) -> list[dict]:
    """OpenCompass dataset entries, gen mode: one per (context, depth), abbr ``passkey-<context>-d<depth>``."""
    out = []
    for context in contexts:
        for depth in depths:
            out.append({
                "abbr": f"passkey-{int(context)}-d{float(depth):.2f}",
                "type": PASSKEY_DATASET,
                "tokenizer_path": tokenizer_path, "context": int(context), "depth": float(depth),
                "per_depth": int(per_depth), "depths": [float(d) for d in depths],
                "reader_cfg": {"input_columns": ["prompt"], "output_column": "answer",
                               "train_split": "train", "test_split": "test"},
                "infer_cfg": {
                    "prompt_template": {"type": PROMPT_TEMPLATE, "template": "{prompt}"},
                    "retriever": {"type": ZERO_RETRIEVER},
                    "inferencer": {"type": GEN_INFERENCER, "max_out_len": ANSWER_TOKENS},
                },
                "eval_cfg": {"evaluator": {"type": PASSKEY_EVALUATOR}},
            })
    return out

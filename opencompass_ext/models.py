"""OpenCompass model wrapper for PcaLlama (MatryoshkaKV) checkpoints.

``PcaLlamaBaseModel`` is OpenCompass's ``HuggingFaceBaseModel`` (log-likelihood /
ppl scoring and generation) plus a KV-cache budget:

    dict(type=PcaLlamaBaseModel, abbr=budget_abbr(0.375), path=CKPT,
         kv_budget=0.375,            # uniform ranks, fraction in (0, 1]
         # rank_file='ranks.json',   # or per-head ranks (mkv search-budget)
         max_seq_len=2048, batch_size=16, run_cfg=dict(num_gpus=0))

Arguments are checked in ``__init__`` *before* the tokenizer or any weight is
loaded: a budget outside (0, 1], both ``kv_budget`` and ``rank_file``, a missing
or malformed rank file, or a budget on a checkpoint that is not ``pcallama``
raise at once, so a sweep never spends time on inference with a wrong setting.

With neither ``kv_budget`` nor ``rank_file`` the checkpoint is evaluated as
saved (its ``kv_ranks``); a plain Llama checkpoint is then evaluated exactly as
``HuggingFaceBaseModel`` would, with the same CPU defaults as the PcaLlama
entries (use this for the uncompressed baseline row).

OpenCompass subprocess runners rebuild the model from the dumped config by the
dotted path ``opencompass_ext.models.PcaLlamaBaseModel``; the class is also
registered in OpenCompass's MODELS registry under ``PcaLlamaBaseModel``.
"""
from __future__ import annotations

import os

from opencompass.models import HuggingFaceBaseModel
from opencompass.registry import MODELS

from plugin.families import PCA_TYPES

from .suite import budget_abbr, format_budget, has_cuda, parse_budget

__all__ = ["PcaLlamaBaseModel", "budget_abbr", "format_budget", "parse_budget"]


def _read_rank_file(path: str, config) -> dict:
    """plugin.budgets.ranks.read_rank_file for the shape of a checkpoint's AutoConfig."""
    from plugin.budgets.ranks import read_rank_file
    return read_rank_file(path, config.num_hidden_layers,
                          getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                          getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


@MODELS.register_module(name="PcaLlamaBaseModel", force=True)
class PcaLlamaBaseModel(HuggingFaceBaseModel):
    """HuggingFaceBaseModel evaluating a PcaLlama checkpoint at a chosen KV budget.

    Args:
        path: checkpoint directory (``pcallama`` for a budget; any causal LM otherwise).
        kv_budget: uniform budget, a fraction in (0, 1] (or a string like '37.5%').
        rank_file: JSON rank table with per-(layer, KV head) ranks, instead of kv_budget.
        model_kwargs: passed to ``from_pretrained``. On a machine without CUDA the
            default is ``torch_dtype='float32', device_map='cpu'`` (OpenCompass's own
            default would load a float16 copy on CPU).
        Every other argument is HuggingFaceBaseModel's.
    """

    def __init__(self, path: str, kv_budget: float | str | None = None,
                 rank_file: str | None = None, model_kwargs: dict | None = None,
                 tokenizer_only: bool = False, **kwargs):
        # 1. arguments, before anything is loaded --------------------------------
        if kv_budget is not None and rank_file is not None:
            raise ValueError("give either kv_budget (uniform) or rank_file (per-head ranks), not both")
        self.kv_budget_requested = None if kv_budget is None else parse_budget(kv_budget)
        self.rank_file = None
        if rank_file is not None:
            rank_file = os.path.abspath(os.path.expanduser(str(rank_file)))
            if not os.path.isfile(rank_file):
                raise FileNotFoundError(
                    f"rank_file {rank_file!r} does not exist; create one with `mkv search-budget` "
                    "or use kv_budget=<fraction> for uniform ranks")
            self.rank_file = rank_file
        self._kv_ranks = None
        if self.kv_budget_requested is not None or self.rank_file is not None:
            from transformers import AutoConfig
            config = AutoConfig.from_pretrained(path, trust_remote_code=True)
            if getattr(config, "model_type", None) not in PCA_TYPES:
                raise ValueError(
                    f"{path!r} is a {getattr(config, 'model_type', '?')!r} checkpoint, not "
                    f"a PcaLlama ({', '.join(PCA_TYPES)}): a KV budget needs a PcaLlama checkpoint (convert it "
                    "with PcaLlamaForCausalLM.from_llama / `mkv`); drop kv_budget/rank_file to "
                    "evaluate it uncompressed")
            if self.rank_file is not None:
                self._kv_ranks = _read_rank_file(self.rank_file, config)  # ValueError if malformed

        # 2. CPU-friendly defaults ------------------------------------------------
        model_kwargs = dict(model_kwargs or {})
        if not has_cuda():
            model_kwargs.setdefault("torch_dtype", "float32")
            model_kwargs.setdefault("device_map", "cpu")

        # 3. load tokenizer + weights (HuggingFaceBaseModel) ---------------------
        super().__init__(path=path, model_kwargs=model_kwargs, tokenizer_only=tokenizer_only, **kwargs)

        # 4. apply the budget -----------------------------------------------------
        self.kv_budget_effective = None
        if tokenizer_only:
            return
        if self.kv_budget_requested is not None:
            self.model.set_kv_budget(self.kv_budget_requested)
        elif self._kv_ranks is not None:
            self.model.load_rank_file(self.rank_file)  # bits and eviction too, when the file carries them
        if hasattr(self.model, "kv_budget"):
            self.kv_budget_effective = float(self.model.kv_budget())
            msg = f"PcaLlama KV budget in force: {format_budget(self.kv_budget_effective)}"
            if self.rank_file:
                msg += f" (per-head ranks from {self.rank_file})"
            if hasattr(self.model, "kv_cache_bytes_per_token"):
                try:
                    msg += f", KV cache {self.model.kv_cache_bytes_per_token()} bytes/token"
                except Exception as err:  # noqa: BLE001 - informative only
                    self.logger.debug(f"kv_cache_bytes_per_token failed: {err}")
            self.logger.info(msg)
            if (self.kv_budget_requested is not None
                    and abs(self.kv_budget_effective - self.kv_budget_requested) > 1e-6):
                self.logger.warning(
                    f"requested kv_budget {format_budget(self.kv_budget_requested)} snapped to "
                    f"{format_budget(self.kv_budget_effective)} on the rank grid")


    # ------------------------------------------------------------------ scoring
    def get_ppl(self, inputs, mask_length=None):
        """Per-prompt mean token loss, like HuggingFaceBaseModel.get_ppl, but batch-invariant.

        OpenCompass pads on the left (a PcaLlama model numbers each row's positions from its
        first real token itself, see plugin.model.modeling.positions_from_mask) and scores every
        label that is not the pad token, so for each padded prompt it also scores the first real token (BOS) as predicted from
        the last *pad* position, whose output is meaningless and differs between models
        and batch compositions (a ~1e-3 shift of the mean loss on a tiny model; enough to
        flip near-tied choices). Here a label is scored only when the position predicting
        it is a real token. The denominator is kept as OpenCompass's (the number of real
        tokens, minus mask_length), so an unpadded prompt - e.g. any prompt at
        batch_size=1 - gets exactly OpenCompass's number.
        """
        import numpy as np
        import torch
        import torch.nn.functional as F
        from opencompass.models.huggingface_above_v4_33 import _convert_base_messages

        if self.drop_middle:
            return super().get_ppl(inputs, mask_length)
        assert self.tokenizer.pad_token
        messages = _convert_base_messages(inputs)
        tokens = self.tokenizer.batch_encode_plus(
            messages, return_tensors="pt", padding=True, truncation=True,
            add_special_tokens=True, max_length=self.max_seq_len)
        tokens = {k: v.to(self.model.device) for k, v in tokens.items()}
        attn = tokens["attention_mask"].bool()
        with torch.no_grad():
            logits = self.model(**tokens)[0]
        bsz, seq_len, _vocab = logits.shape
        labels = tokens["input_ids"][:, 1:]
        valid = attn[:, 1:] & attn[:, :-1]
        n_real = attn.sum(-1)
        if mask_length is not None:
            # position of each label inside its own (unpadded) sequence
            start = (seq_len - n_real).unsqueeze(1)
            pos = torch.arange(1, seq_len, device=attn.device).unsqueeze(0) - start
            keep = pos >= torch.as_tensor(mask_length, device=attn.device).unsqueeze(1)
            valid = valid & keep
        loss = torch.zeros(bsz, seq_len - 1, dtype=torch.float32, device=logits.device)
        for i in range(bsz):  # one row at a time: bounded float32 copy of the logits
            loss[i] = F.cross_entropy(logits[i, :-1].float(), labels[i], reduction="none")
        loss = (loss * valid).sum(-1).cpu().numpy()
        lens = n_real.cpu().numpy().astype(np.float64)
        if mask_length is not None:
            lens = lens - np.asarray(mask_length)
        return loss / lens


    def get_ppl_grouped(self, groups: list[list[str]]) -> list[list[float]]:
        """get_ppl's number for every prompt of every group, running shared token prefixes once.

        A group is the prompts of one item (one per choice). Each prompt is tokenized exactly
        as get_ppl tokenizes it; its summed loss comes from ``PrefixScorer`` (the shared prefix
        and the cache of the previous group reused), and is divided, as in get_ppl, by its
        number of tokens. Used by ``PrefixSharingPPLInferencer``.
        """
        from opencompass.models.huggingface_above_v4_33 import _convert_base_messages
        from tqdm import tqdm

        from .scoring import PrefixScorer

        if self.drop_middle:  # truncation from the middle changes the prefixes: score prompt by prompt
            return [list(self.get_ppl(group)) for group in groups]
        scorer = PrefixScorer(self.model)
        out = []
        for group in tqdm(groups, desc="items", unit="item", mininterval=5, disable=len(groups) < 2):
            ids = [self.tokenizer(m, truncation=True, add_special_tokens=True,
                                  max_length=self.max_seq_len)["input_ids"]
                   for m in _convert_base_messages(group)]
            out.append([total / len(seq) for total, seq in zip(scorer.score(ids), ids)])
        return out

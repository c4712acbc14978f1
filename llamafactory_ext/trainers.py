"""Matryoshka trainers for LLaMA-Factory 0.9.5.

* :class:`PcaLlamaTrainer` (``stage: pt``, ``matryoshka_trainer: plain``): LLaMA-Factory's
  pre-training ``CustomTrainer``; before every micro-batch it draws one rank per (layer, KV
  head), separately for K and V, and trains on the LM loss under those ranks.
* :class:`PcaLlamaDistillationTrainer` (``stage: pt``, ``matryoshka_trainer: distill``): same
  sampling, loss = alpha * KL(teacher || student) + (1 - alpha) * CE.  The teacher is the same
  model at full rank (exact, since U is orthogonal and the base is frozen), run under
  ``torch.no_grad``: no second copy of the weights.  KL is masked on ignored labels (after the
  causal shift) and averaged per token, with the same normalisation as the CE.
* :class:`PcaLlamaSeq2SeqTrainer` / :class:`PcaLlamaSeq2SeqDistillationTrainer`: the same on
  top of ``CustomSeq2SeqTrainer`` for ``stage: sft`` (LoRA may train together with the projections).

Common behaviour (:class:`MatryoshkaTrainerMixin`):

* ranks are set for the whole ``training_step`` (forward *and* backward, so gradient
  checkpointing recomputes under the same ranks) and always cleared afterwards;
* with ``matryoshka_rank_samples: n`` each micro-batch is trained under n independent draws, each
  weighted 1/n; the distillation teacher runs once per micro-batch and serves all n, which is
  what makes distillation cheap relative to plain training (not with DeepSpeed);
* evaluation / prediction run at a fixed uniform budget (``matryoshka_eval_budget``), logged as
  ``eval_kv_budget``; the model's own ranks are restored afterwards;
* with ``matryoshka_heldout_budgets``, held-out perplexity at those budgets is logged before the
  first step and every ``eval_steps`` (``heldout_ppl_<budget>``): the run's learning curve;
* only the projections (and adapter weights) train by default, in their own optimizer group
  with ``matryoshka_projection_lr``;
* the PcaLlama model is found inside PEFT / DDP / DeepSpeed wrappers; under ZeRO-3 only rank
  buffers are touched;
* with several processes the fixed bases are broadcast from rank 0 before the first step and every
  rank's projections are checked identical before and after training (:mod:`.distributed`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from llamafactory.extras import logging as lf_logging
from llamafactory.train.pt.trainer import CustomTrainer
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

from .arguments import MatryoshkaArguments, get_active, get_head_dim
from .distillation_loss import distillation_terms
from .distributed import BasesAcrossRanks
from .heldout import HeldoutPerplexity
from .projection_params import (
    PROJECTIONS_FILE,
    configure_trainable,
    find_pca_model,
    invalidate_inference_caches,
    load_projections,
    model_type_of,
    projection_parameters,
    save_projections,
)

logger = lf_logging.get_logger("llamafactory.matryoshka")  # under llamafactory: its handlers print it


class MatryoshkaTrainerMixin:
    """Rank sampling, fixed-budget evaluation, projection optimizer groups, projection saving."""

    matryoshka_kind = "plain"

    def __init__(self, *args: Any, matryoshka_args: MatryoshkaArguments | None = None, **kwargs: Any) -> None:
        model = kwargs.get("model")
        pca = find_pca_model(model)
        name = type(self).__name__
        if pca is None:
            raise ValueError(
                f"{name} (Matryoshka KV training) needs a PcaLlama model (config.model_type == 'pcallama'), got "
                f"model_type {model_type_of(model)!r}. Build one with `mkv calibrate` and point "
                "`model_name_or_path` at it, or set `matryoshka_trainer: none`."
            )
        margs = matryoshka_args if matryoshka_args is not None else get_active()
        margs.validate_for_config(pca.config, source=f"{getattr(pca.config, '_name_or_path', '') or 'the model'}")
        super().__init__(*args, **kwargs)
        self.matryoshka_args = margs
        self._pca = pca
        config = pca.config
        self._head_dim = get_head_dim(config)
        self._n_layers = int(config.num_hidden_layers)
        self._n_kv = int(config.num_key_value_heads)
        if margs.matryoshka_rank_choices is not None:
            self._rank_choices = sorted(int(r) for r in margs.matryoshka_rank_choices)
            self._rank_probs = margs.matryoshka_rank_probs
        else:
            from plugin.budgets.ranks import rank_grid

            self._rank_choices = rank_grid(self._head_dim, getattr(config, "kv_rank_step", None))
            self._rank_probs = None
        if margs.matryoshka_rank_probs is not None and margs.matryoshka_rank_choices is not None:
            order = sorted(range(len(margs.matryoshka_rank_choices)), key=lambda i: margs.matryoshka_rank_choices[i])
            self._rank_probs = [margs.matryoshka_rank_probs[i] for i in order]
        seed = margs.matryoshka_seed if margs.matryoshka_seed is not None else self.args.seed
        self._rank_generator = torch.Generator(device="cpu")
        self._rank_generator.manual_seed(int(seed) + int(self.args.process_index))
        self._current_ranks: tuple[torch.Tensor, torch.Tensor] | None = None
        self._batch_teacher: torch.Tensor | None = None  # the teacher's logits, shared by a micro-batch's rank draws
        self._share_teacher = False  # only inside training_step: a direct compute_loss never sees another batch's
        if margs.matryoshka_rank_samples > 1 and getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                f"`matryoshka_rank_samples: {margs.matryoshka_rank_samples}` does not work with DeepSpeed: its engine "
                "counts every backward pass as a micro-batch. Remove `deepspeed` or set `matryoshka_rank_samples: 1` "
                "(and raise `gradient_accumulation_steps` for more draws per step)."
            )
        self._in_eval_budget = False
        self._loss_parts: dict[str, list[torch.Tensor]] = {"kl": [], "ce": []}
        self.add_callback(BasesAcrossRanks(pca))  # first: later callbacks evaluate with the bases it syncs
        if margs.matryoshka_heldout_budgets:
            self.add_callback(HeldoutPerplexity(self))
        counts = configure_trainable(self.model, pca, margs.matryoshka_train_base)
        self._projection_params = projection_parameters(pca)
        grid = self._rank_choices
        logger.info_rank0(
            f"Matryoshka training: trainer={name} ({self.matryoshka_kind}), rank grid={grid} per (layer, KV head) "
            f"for K and V ({'weights ' + str([round(p, 4) for p in self._rank_probs]) if self._rank_probs else 'uniform'}), "
            + (
                f"alpha={margs.matryoshka_alpha}, temperature={margs.matryoshka_temperature}, "
                if self.matryoshka_kind == "distill"
                else ""
            )
            + f"eval budget={margs.matryoshka_eval_budget}, projection lr="
            f"{margs.matryoshka_projection_lr if margs.matryoshka_projection_lr is not None else self.args.learning_rate}, "
            f"train_base={margs.matryoshka_train_base}, trainable params: {counts['projection']} projection + "
            f"{counts['other']} other, {counts['frozen']} frozen."
        )

    # ------------------------------------------------------------------ rank sampling
    def draw_ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One rank per (layer, KV head), independently for K and V: two LongTensors [L, n_kv]."""
        from plugin.budgets.ranks import sample_ranks

        return sample_ranks(
            self._n_layers, self._n_kv, self._rank_choices, generator=self._rank_generator, weights=self._rank_probs
        )

    @contextlib.contextmanager
    def sampled_ranks(self, key: torch.Tensor, value: torch.Tensor):
        self._pca.set_sampled_ranks(key, value)
        self._current_ranks = (key, value)
        try:
            yield
        finally:
            self._current_ranks = None
            self._pca.clear_sampled_ranks()

    def training_step(self, model, inputs, *args: Any, **kwargs: Any):
        samples = self.matryoshka_args.matryoshka_rank_samples
        total = None
        self._share_teacher = samples > 1
        no_sync = getattr(model, "no_sync", None)
        try:
            for index in range(samples):
                key, value = self.draw_ranks()
                # Only the last draw's backward synchronises DDP gradients (the earlier ones accumulate locally).
                last = index == samples - 1
                quiet = no_sync() if not last and callable(no_sync) else contextlib.nullcontext()
                # Ranks stay set through backward: gradient checkpointing recomputes under the same ranks.
                with self.sampled_ranks(key, value), quiet:
                    loss = super().training_step(model, inputs, *args, **kwargs)
                total = loss if total is None else total + loss
        finally:
            self._batch_teacher, self._share_teacher = None, False
        return total

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        result = self.matryoshka_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        samples = self.matryoshka_args.matryoshka_rank_samples
        if self._current_ranks is None or samples == 1:
            return result
        # Each draw contributes 1/samples of the micro-batch's gradient; the logged loss is their sum (the mean).
        if return_outputs:
            loss, outputs = result
            return loss / samples, outputs
        return result / samples

    def matryoshka_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The loss of one micro-batch under the ranks now set (the base trainer's LM loss)."""
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    # ------------------------------------------------------------------ evaluation at a fixed budget
    @contextlib.contextmanager
    def eval_budget(self, budget: float | None = None):
        budget = self.matryoshka_args.matryoshka_eval_budget if budget is None else budget
        if self._in_eval_budget:
            yield
            return
        saved = self._pca.get_kv_ranks()
        self._pca.clear_sampled_ranks()
        self._pca.set_kv_budget(budget)
        invalidate_inference_caches(self._pca)  # projections changed since the last evaluation
        self._in_eval_budget = True
        try:
            yield
        finally:
            self._in_eval_budget = False
            self._pca.set_kv_ranks(saved["key"], saved["value"])
            invalidate_inference_caches(self._pca)

    def evaluate(self, *args: Any, **kwargs: Any):
        with self.eval_budget():
            budget = float(self._pca.kv_budget())
            metrics = super().evaluate(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        if isinstance(metrics, dict):
            metrics.setdefault(f"{prefix}_kv_budget", budget)
        return metrics

    def predict(self, *args: Any, **kwargs: Any):
        with self.eval_budget():
            return super().predict(*args, **kwargs)

    def prediction_step(self, *args: Any, **kwargs: Any):
        with self.eval_budget():
            return super().prediction_step(*args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._in_eval_budget and any(key.endswith("_loss") and key != "loss" for key in logs):
            prefix = next(key for key in logs if key.endswith("_loss") and key != "loss").rsplit("_loss", 1)[0]
            logs[f"{prefix}_kv_budget"] = float(self._pca.kv_budget())
        if "loss" in logs and self._loss_parts["kl"]:
            for part, values in self._loss_parts.items():
                logs[f"{part}_loss"] = round(float(torch.stack(values).mean().item()), 4)
                values.clear()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, *args: Any, **kwargs: Any):
        fa = self.finetuning_args
        special = (
            fa.use_galore or fa.use_apollo or fa.loraplus_lr_ratio is not None or fa.use_badam or fa.use_adam_mini
            or getattr(fa, "use_muon", False)
        )
        if self.optimizer is None and not special:
            margs = self.matryoshka_args
            model = self.model
            proj_ids = {id(p) for p in self._projection_params}
            decay_names = set(self.get_decay_parameter_names(model))
            projection, decay, no_decay = [], [], []
            for pname, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                if id(param) in proj_ids:
                    projection.append(param)
                elif pname in decay_names:
                    decay.append(param)
                else:
                    no_decay.append(param)
            proj_lr = margs.matryoshka_projection_lr or self.args.learning_rate
            groups = [
                {"params": projection, "lr": proj_lr, "weight_decay": margs.matryoshka_projection_weight_decay},
                {"params": decay, "lr": self.args.learning_rate, "weight_decay": self.args.weight_decay},
                {"params": no_decay, "lr": self.args.learning_rate, "weight_decay": 0.0},
            ]
            groups = [group for group in groups if group["params"]]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        elif self.optimizer is None:
            logger.warning_rank0("Matryoshka: a custom LLaMA-Factory optimizer is enabled; "
                                 "`matryoshka_projection_lr` is not applied.")
        return super().create_optimizer(*args, **kwargs)

    # ------------------------------------------------------------------ saving (LoRA: projections beside the adapter)
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        if unwrapped is not self._pca:
            # PEFT saves only the adapter: keep the trained projections next to it
            # (loaded back by the patched init_adapter when the adapter is used).
            path = save_projections(self._pca, output_dir, state_dict)
            logger.info_rank0(f"Matryoshka: saved the KV projections beside the adapter: {path}")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        import os

        if os.path.isfile(os.path.join(resume_from_checkpoint, PROJECTIONS_FILE)):
            load_projections(self._pca, resume_from_checkpoint)
            logger.info_rank0(f"Matryoshka: resumed the KV projections from {resume_from_checkpoint}.")


class DistillationMixin(MatryoshkaTrainerMixin):
    """alpha * KL(teacher || student) + (1 - alpha) * CE; teacher = the same model at full rank, computed as the
    base model does (no projection, which is exact since U is orthogonal, and no LoRA adapter)."""

    matryoshka_kind = "distill"

    def teacher_logits(self, model, model_inputs: dict[str, Any]) -> torch.Tensor:
        """The full-rank teacher's logits for the current micro-batch, computed once for all its rank draws."""
        if self._batch_teacher is not None:
            return self._batch_teacher
        teacher_model = self.accelerator.unwrap_model(model)
        # The teacher is the base model: no projection (exact in bf16 too) and no LoRA adapter.
        disable_adapter = getattr(teacher_model, "disable_adapter", None)
        with torch.no_grad(), self._pca.exact_full_rank(), (
            disable_adapter() if callable(disable_adapter) else contextlib.nullcontext()
        ):
            logits = teacher_model(**model_inputs).logits.detach()
        if self._share_teacher:
            self._batch_teacher = logits  # cleared by training_step when the micro-batch is done
        return logits

    def matryoshka_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if self._current_ranks is None or "labels" not in inputs:  # evaluation / prediction: plain LM loss
            return super().matryoshka_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
        margs = self.matryoshka_args
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        teacher_logits = self.teacher_logits(model, model_inputs)
        outputs = model(**model_inputs)
        kl_sum, ce_sum, count = distillation_terms(
            outputs.logits, teacher_logits, labels, temperature=margs.matryoshka_temperature
        )
        use_global = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if use_global:
            denom = num_items_in_batch.to(kl_sum.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        else:
            denom = count.clamp(min=1)
        kl, ce = kl_sum / denom, ce_sum / denom
        alpha = float(margs.matryoshka_alpha)
        loss = alpha * kl + (1.0 - alpha) * ce
        if use_global and self.args.average_tokens_across_devices:
            loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        with torch.no_grad():
            local = count.clamp(min=1)
            self._loss_parts["kl"].append((kl_sum / local).detach().float())
            self._loss_parts["ce"].append((ce_sum / local).detach().float())
        if return_outputs:
            return loss, outputs
        return loss


class PcaLlamaTrainer(MatryoshkaTrainerMixin, CustomTrainer):
    """``stage: pt``: LM loss under ranks sampled per micro-batch."""


class PcaLlamaDistillationTrainer(DistillationMixin, CustomTrainer):
    """``stage: pt``: 0.25 * KL(full-rank teacher || sampled-rank student) + 0.75 * CE (defaults)."""


class PcaLlamaSeq2SeqTrainer(MatryoshkaTrainerMixin, CustomSeq2SeqTrainer):
    """``stage: sft``: LM loss under sampled ranks (LoRA, if any, trains with the projections)."""


class PcaLlamaSeq2SeqDistillationTrainer(DistillationMixin, CustomSeq2SeqTrainer):
    """``stage: sft``: distillation loss under sampled ranks (LoRA, if any, trains with the projections)."""


TRAINERS = {
    ("pt", "plain"): PcaLlamaTrainer,
    ("pt", "distill"): PcaLlamaDistillationTrainer,
    ("sft", "plain"): PcaLlamaSeq2SeqTrainer,
    ("sft", "distill"): PcaLlamaSeq2SeqDistillationTrainer,
}

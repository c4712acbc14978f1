"""Reading weights outside their module's forward under DeepSpeed ZeRO-3.

ZeRO-3 partitions every parameter across processes and gathers a module's own parameters only
when that module is called.  Code that reads weights without calling their module (folding U_V
into v_proj / o_proj, exporting or checksumming the projections) gathers them here first; with
no partitioned parameter (no DeepSpeed, ZeRO-0/1/2) this is a no-op and DeepSpeed is not imported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def is_partitioned(param: torch.Tensor | None) -> bool:
    return param is not None and hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor | None], modifier_rank: int | None = None) -> Iterator[None]:
    """Within, every ZeRO-3 partitioned parameter of `params` holds its full value on every process.

    `modifier_rank`: the process whose in-place changes are kept (None: read only).
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield

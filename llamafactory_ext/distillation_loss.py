"""The distillation loss of PcaLlamaDistillationTrainer: KL(teacher || student) and CE over shifted labels, in float32
chunks so that memory does not grow with sequence x vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


CHUNK_TOKENS = 512
# A chunk of at least this many logits (float32: 128 MiB a copy) is recomputed in the backward pass
# rather than kept; below it keeping the few float32 copies is cheaper than computing them twice.
RECOMPUTE_ELEMENTS = 2**25


def _chunk_terms(student: torch.Tensor, p_teacher: torch.Tensor, targets: torch.Tensor, temperature: float,
                 ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-sum p_teacher log p_student * T^2 (the KL's part that depends on the student) and CE of one row's token
    chunk ``[C, V]``, ignored targets left out, in float32."""
    counted = targets != ignore_index
    student = student.float()
    log_p = F.log_softmax(student, dim=-1)
    log_p_t = log_p if temperature == 1.0 else F.log_softmax(student / temperature, dim=-1)
    ce = -(log_p.gather(-1, targets.clamp(min=0)[:, None])[:, 0] * counted).sum()
    cross = -((p_teacher * log_p_t).sum(-1) * counted).sum()
    return cross * (temperature**2), ce


def distillation_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int = CHUNK_TOKENS,
    recompute_above: int = RECOMPUTE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed KL(teacher || student) * T^2, summed CE and the number of counted tokens.

    Logits ``[B, S, V]`` predict the next token; labels ``[B, S]`` are shifted here (position t
    predicts label t+1) and positions whose shifted label is ``ignore_index`` are left out of both
    terms.  Computed in float32, `chunk_tokens` positions of one row at a time.  The teacher's side
    (its probabilities and their entropy, the KL's constant part) is computed once without gradient;
    CE reads the student's log-probabilities the KL uses (at T = 1, one log-softmax for both).  A chunk
    of `recompute_above` logits or more is recomputed in the backward pass (activation checkpointing):
    the float32 copies then never exist for more than one chunk, so memory does not grow with
    sequence x vocabulary (2,048 tokens x a 128k vocabulary is 1 GiB per float32 copy).
    """
    from torch.utils.checkpoint import checkpoint

    shift_labels = labels[:, 1:]
    count = (shift_labels != ignore_index).sum()
    kl_sum = ce_sum = student_logits.sum() * 0.0
    for row in range(student_logits.shape[0]):
        for start in range(0, shift_labels.shape[1], chunk_tokens):
            stop = min(start + chunk_tokens, shift_labels.shape[1])
            targets = shift_labels[row, start:stop]
            counted = targets != ignore_index
            if not bool(counted.any()):
                continue
            with torch.no_grad():
                log_q = F.log_softmax(teacher_logits[row, start:stop].float() / temperature, dim=-1)
                p_teacher = log_q.exp()
                negentropy = ((p_teacher * log_q).sum(-1) * counted).sum() * (temperature**2)
                del log_q
            args = (student_logits[row, start:stop], p_teacher, targets, temperature, ignore_index)
            if torch.is_grad_enabled() and student_logits.requires_grad and p_teacher.numel() >= recompute_above:
                cross, ce = checkpoint(_chunk_terms, *args, use_reentrant=False)
            else:
                cross, ce = _chunk_terms(*args)
            kl_sum, ce_sum = kl_sum + (cross + negentropy), ce_sum + ce
    return kl_sum, ce_sum, count

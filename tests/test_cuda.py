"""Checks only a CUDA GPU can make: bf16 and SDPA kernels on the device (skipped elsewhere).

Run on a GPU machine by benchmarks/gpu_check.sh. On a CPU machine each test skips with a reason
starting with GPU_ONLY, the one skip CI=true tolerates.
"""

from __future__ import annotations

import pytest
import torch
from conftest import GPU_ONLY, make_tiny_llama
from helpers import random_bases

from plugin import PcaLlamaForCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=f"{GPU_ONLY}: none here")
IDS = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))


def _pair(kind: str = "gqa") -> tuple[torch.nn.Module, PcaLlamaForCausalLM]:
    base = make_tiny_llama(kind, attn_implementation="sdpa").to("cuda", torch.bfloat16)
    pca = PcaLlamaForCausalLM.from_llama(base, *random_bases(base)).eval()
    return base, pca


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_teacher_path_is_bit_exact_in_bf16_sdpa_on_the_gpu(kind: str) -> None:
    base, pca = _pair(kind)
    ids = IDS.cuda()
    with torch.no_grad():
        expected = base(ids).logits
        with pca.exact_full_rank():
            assert torch.equal(pca(ids, use_cache=False).logits, expected)
        projected = pca(ids, use_cache=False).logits  # through U, rounded to bf16: close, not equal
    assert float((projected.float() - expected.float()).abs().max()) < 0.05 * float(expected.float().abs().max())


def test_decode_through_the_projected_cache_matches_a_forward_on_the_gpu() -> None:
    _, pca = _pair()
    pca.set_kv_budget(0.5)
    ids = IDS.cuda()
    with torch.no_grad():
        whole = pca(ids, use_cache=False).logits.float()
        cache = pca.model.new_cache()
        steps = [pca(ids[:, :24], past_key_values=cache, use_cache=True).logits]
        steps += [pca(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(24, 48)]
    decoded = torch.cat(steps, dim=1).float()
    assert float((decoded - whole).abs().max()) < 0.05 * float(whole.abs().max())
    assert cache.live_nbytes() == 0.5 * pca.full_cache_bytes_per_token(torch.bfloat16) * 2 * 48
    assert all(t.is_cuda for layer in cache.layers for t in layer.key_groups)


def test_a_bf16_training_step_keeps_float32_orthogonal_bases_on_the_gpu() -> None:
    _, pca = _pair()
    pca.train()
    params = pca.projection_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    layers, heads = pca.config.num_hidden_layers, pca.config.num_key_value_heads
    pca.set_sampled_ranks(torch.full((layers, heads), 4), torch.full((layers, heads), 8))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = pca(IDS.cuda(), labels=IDS.cuda(), use_cache=False).loss
    loss.backward()
    optimizer.step()
    pca.clear_sampled_ranks()
    assert any(float(p.abs().max()) > 0 for p in params if p.dim() == 3)  # the skews moved
    for attn in pca.attention_layers():
        assert attn.kv_proj.key_base.dtype == torch.float32
        with torch.autocast("cuda", dtype=torch.bfloat16):
            basis = attn.kv_proj.key_basis()
        assert basis.dtype == torch.float32
        eye = torch.eye(basis.shape[-1], device="cuda")
        assert float((basis.transpose(-1, -2) @ basis - eye).abs().max()) < 1e-5

"""What DeepSpeed ZeRO-3 needs of the model, checked without DeepSpeed: weights are only read through
module calls or explicit gathers, and the fixed bases load in float32 whatever dtype they were born in."""

from __future__ import annotations

import torch
from conftest import make_tiny_llama
from helpers import to_pca

from plugin.model.modeling import PcaLlamaForCausalLM
from plugin.model.zero3 import gathered, is_partitioned

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def test_every_forward_path_calls_the_projection_module() -> None:
    """ZeRO-3 gathers a module's parameters when the module is called: training (sampled and truncated)
    and inference (folded and unfolded) paths must all go through KVProjection.__call__."""
    model = to_pca(make_tiny_llama("gqa"))
    calls: list[int] = []
    for index, attn in enumerate(model.attention_layers()):
        attn.kv_proj.register_forward_hook(lambda module, args, out, index=index: calls.append(index))
    layers = model.config.num_hidden_layers
    n_kv = model.config.num_key_value_heads

    def run(train: bool, sampled: bool, fold: bool) -> None:
        model.train(train)
        model.config.kv_fold = fold
        model.set_kv_budget(0.5)
        if sampled:
            model.set_sampled_ranks(torch.full((layers, n_kv), 4), torch.full((layers, n_kv), 8))
        calls.clear()
        with torch.set_grad_enabled(train):
            model(IDS, use_cache=False)
        model.clear_sampled_ranks()
        assert sorted(set(calls)) == list(range(layers)), (train, sampled, fold, calls)

    for train, sampled, fold in ((True, True, True), (True, False, True), (False, False, True), (False, False, False)):
        run(train, sampled, fold)
    model.config.kv_fold = True


def test_bases_born_in_bf16_load_back_in_float32_exactly() -> None:
    """zero.Init creates the identity buffers in bf16; loading PCA bases into them must not round."""
    source = to_pca(make_tiny_llama("gqa"))
    state = {k: v for k, v in source.state_dict().items() if ".kv_proj." in k}
    target = PcaLlamaForCausalLM.from_llama(make_tiny_llama("gqa"))
    for attn in target.attention_layers():  # what zero.Init would have made
        for name in ("key_base", "value_base"):
            attn.kv_proj._buffers[name] = attn.kv_proj._buffers[name].to(torch.bfloat16)
    target.load_state_dict(state, strict=False)
    for name, tensor in state.items():
        loaded = target.state_dict()[name]
        assert loaded.dtype == torch.float32 and torch.equal(loaded, tensor), name


def test_gathered_is_a_no_op_without_partitioned_parameters() -> None:
    model = to_pca(make_tiny_llama("gqa"))
    weight = model.attention_layers()[0].v_proj.weight
    assert not is_partitioned(weight) and not is_partitioned(None)
    with gathered([weight, None]):
        assert weight.numel() > 0


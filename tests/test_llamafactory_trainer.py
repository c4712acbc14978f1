"""In-process tests of the LLaMA-Factory integration: hook, YAML options, trainers, loss.

The subprocess runs of the real ``llamafactory-cli`` are in test_llamafactory_cli.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch = pytest.importorskip("torch")
pytest.importorskip("llamafactory")

from llamafactory_ext import _import_hook
from llamafactory_ext.arguments import MatryoshkaArguments, get_active
from llamafactory_ext.testing import build_tiny_llama, build_tiny_pcallama, pt_config, write_tiny_datasets

_import_hook.install()  # patches the LLaMA-Factory modules even if the .pth is not installed

from llamafactory.hparams import FinetuningArguments, TrainingArguments, get_train_args
from llamafactory.train.pt import workflow as pt_workflow
from llamafactory.train.sft import workflow as sft_workflow
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

from llamafactory_ext import patches
from llamafactory_ext.trainers import (
    PcaLlamaDistillationTrainer,
    PcaLlamaSeq2SeqDistillationTrainer,
    PcaLlamaTrainer,
    distillation_terms,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lf_tiny")
    model_dir = build_tiny_pcallama(root / "model")
    llama_dir = build_tiny_llama(root / "llama")
    data_dir = write_tiny_datasets(root / "data")
    return {"root": root, "model": model_dir, "llama": llama_dir, "data": data_dir}


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def _trainer(cls, model, tokenizer, tmp_path, margs, eval_dataset=None, **train_kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=train_kwargs.pop("learning_rate", 1e-4),
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,
        seed=0,
        **train_kwargs,
    )
    finetuning_args = FinetuningArguments(stage="pt", finetuning_type="full")
    return cls(
        model=model,
        args=args,
        finetuning_args=finetuning_args,
        processor=None,
        tokenizer=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False),
        eval_dataset=eval_dataset,
        matryoshka_args=margs,
    )


def _batch(tokenizer):
    texts = [
        "the president spoke to the congress about the state of the union . the nation is strong",
        "we must build roads and schools for our children",
    ]
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    return collator([tokenizer(t) for t in texts])


def _attn_layers(model):
    return [layer.self_attn for layer in model.model.layers]


# ----------------------------------------------------------------------------------- hook
def test_hook_is_cheap_and_idempotent():
    """install() imports neither torch nor llamafactory and can be called twice (run without site)."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "import llamafactory_ext._import_hook as h\n"
        "h.install(); h.install()\n"
        "n = sum(getattr(f, 'targets', None) == frozenset(h.TARGETS) for f in sys.meta_path)\n"
        "print(n, 'torch' in sys.modules, 'llamafactory' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "False", "False"]


def test_modules_are_patched():
    from llamafactory.hparams import parser
    from llamafactory.model import loader

    assert getattr(parser._parse_train_args, "_mkv_wrapped", False)
    assert getattr(loader.init_adapter, "_mkv_wrapped", False)
    assert getattr(pt_workflow.CustomTrainer, "_mkv_stock", None) is not None
    assert getattr(sft_workflow.CustomSeq2SeqTrainer, "_mkv_stock", None) is not None
    _import_hook.install()  # idempotent: no double wrapping
    assert not hasattr(pt_workflow.CustomTrainer._mkv_stock, "_mkv_stock")


# ----------------------------------------------------------------------------------- YAML options
def _train_dict(tiny, tmp_path, **extra):
    return pt_config(tiny["model"], tiny["data"], tmp_path / "out", **extra)


def test_yaml_options_are_parsed(tiny, tmp_path):
    parsed = get_train_args(
        _train_dict(tiny, tmp_path, matryoshka_trainer="plain", matryoshka_rank_choices="4,8,16",
                    matryoshka_alpha=0.5, matryoshka_eval_budget=0.25, matryoshka_projection_lr=3e-3)
    )
    assert len(parsed) == 5  # LLaMA-Factory's own tuple, unchanged
    margs = get_active()
    assert margs.matryoshka_trainer == "plain"
    assert margs.matryoshka_rank_choices == [4, 8, 16]
    assert margs.matryoshka_alpha == 0.5 and margs.matryoshka_eval_budget == 0.25
    assert margs.matryoshka_projection_lr == 3e-3


def test_misspelled_key_fails_clearly(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLOW_EXTRA_ARGS", "1")  # even when LLaMA-Factory would let it through
    with pytest.raises(ValueError, match="did you mean `matryoshka_alpha`"):
        get_train_args(_train_dict(tiny, tmp_path, matryoshka_alfa=0.3))


def test_rank_grid_above_head_dim_fails(tiny, tmp_path):
    with pytest.raises(ValueError, match="above head_dim = 16"):
        get_train_args(_train_dict(tiny, tmp_path, matryoshka_rank_choices=[4, 8, 32]))


def test_non_pcallama_with_matryoshka_trainer_fails_at_start(tiny, tmp_path):
    with pytest.raises(ValueError, match="needs a PcaLlama checkpoint"):
        get_train_args(_train_dict(tiny, tmp_path, model_name_or_path=str(tiny["llama"]), matryoshka_trainer="distill"))
    # auto (the default) leaves a plain Llama to LLaMA-Factory's own trainer
    get_train_args(_train_dict(tiny, tmp_path, model_name_or_path=str(tiny["llama"])))
    assert get_active().matryoshka_trainer == "auto"


def test_bad_values_fail():
    with pytest.raises(ValueError, match="matryoshka_alpha"):
        MatryoshkaArguments(matryoshka_alpha=1.5)
    with pytest.raises(ValueError, match="matryoshka_rank_probs"):
        MatryoshkaArguments(matryoshka_rank_choices=[4, 8], matryoshka_rank_probs=[1.0])
    with pytest.raises(ValueError, match="matryoshka_trainer"):
        MatryoshkaArguments(matryoshka_trainer="distil")


# ----------------------------------------------------------------------------------- trainer selection
def test_trainer_selection(tiny):
    pca, _ = _load(tiny["model"])
    llama, _ = _load(tiny["llama"])
    stock = pt_workflow.CustomTrainer._mkv_stock
    select = patches.select_trainer_class
    assert select("pt", stock, pca, MatryoshkaArguments()) is PcaLlamaDistillationTrainer
    assert select("pt", stock, pca, MatryoshkaArguments(matryoshka_trainer="plain")) is PcaLlamaTrainer
    assert select("pt", stock, pca, MatryoshkaArguments(matryoshka_trainer="none")) is stock
    assert select("sft", object, pca, MatryoshkaArguments()) is PcaLlamaSeq2SeqDistillationTrainer
    assert select("pt", stock, llama, MatryoshkaArguments()) is stock
    with pytest.raises(ValueError, match="needs a PcaLlama model"):
        select("pt", stock, llama, MatryoshkaArguments(matryoshka_trainer="distill"))


def test_direct_construction_on_llama_fails(tiny, tmp_path):
    llama, tokenizer = _load(tiny["llama"])
    with pytest.raises(ValueError, match="needs a PcaLlama model"):
        _trainer(PcaLlamaTrainer, llama, tokenizer, tmp_path, MatryoshkaArguments(matryoshka_trainer="plain"))


# ----------------------------------------------------------------------------------- loss
def test_kl_is_zero_at_full_rank(tiny, tmp_path):
    model, tokenizer = _load(tiny["model"])
    margs = MatryoshkaArguments(matryoshka_trainer="distill", matryoshka_rank_choices=[16])
    trainer = _trainer(PcaLlamaDistillationTrainer, model, tokenizer, tmp_path, margs)
    batch = _batch(tokenizer)
    model.train()
    key, value = trainer.draw_ranks()
    assert int(key.min()) == 16 and int(value.max()) == 16
    with trainer.sampled_ranks(key, value):
        loss = trainer.compute_loss(model, dict(batch))
    kl, ce = trainer._loss_parts["kl"][-1], trainer._loss_parts["ce"][-1]
    assert float(kl) == pytest.approx(0.0, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(0.75 * float(ce), rel=1e-5)
    with torch.no_grad():
        reference = model(**batch).loss  # full rank, HF's own CE
    assert float(ce) == pytest.approx(float(reference), rel=1e-5)


def test_distillation_terms_masking():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [-100, 4, 5, 6, 1]])
    kl_sum, _, count = distillation_terms(student, teacher, labels)
    assert int(count) == 6  # shifted labels != -100
    mask = labels[:, 1:] != -100
    p_t = teacher[:, :-1].softmax(-1)[mask]
    expected = (p_t * (p_t.log() - student[:, :-1].log_softmax(-1)[mask])).sum()
    assert float(kl_sum) == pytest.approx(float(expected), rel=1e-5)
    kl_same, _, _ = distillation_terms(teacher, teacher, labels)
    assert float(kl_same) == pytest.approx(0.0, abs=1e-6)


def test_training_steps_decrease_loss_and_keep_base(tiny, tmp_path):
    model, tokenizer = _load(tiny["model"])
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".kv_proj." not in n}
    proj_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".kv_proj." in n}
    margs = MatryoshkaArguments(matryoshka_trainer="distill", matryoshka_rank_choices=[4], matryoshka_projection_lr=3e-2)
    trainer = _trainer(PcaLlamaDistillationTrainer, model, tokenizer, tmp_path, margs)
    optimizer = trainer.create_optimizer()
    groups = [g for g in optimizer.param_groups if g["params"]]
    assert len(groups) == 1 and groups[0]["lr"] == 3e-2  # only the projections, at their own lr
    batch = _batch(tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # normally set by Trainer.train()
    losses = []
    for _ in range(8):
        loss = trainer.training_step(model, dict(batch))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
        assert all(attn.sampled_masks is None for attn in _attn_layers(model))  # cleared after each step
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if ".kv_proj." in name:
            continue
        assert torch.equal(param, base_before[name]), name  # bit-identical
        assert not param.requires_grad
    assert any(not torch.equal(p, proj_before[n]) for n, p in model.named_parameters() if ".kv_proj." in n)
    for attn in _attn_layers(model):
        for basis in (attn.kv_proj.key_basis(), attn.kv_proj.value_basis()):
            eye = torch.eye(basis.shape[-1]).expand_as(basis)
            assert torch.allclose(basis.transpose(-1, -2) @ basis, eye, atol=1e-5)


@pytest.mark.parametrize("cls,kind", [(PcaLlamaDistillationTrainer, "distill"), (PcaLlamaTrainer, "plain")])
def test_rank_samples_average_the_draws_and_share_one_teacher(tiny, tmp_path, cls, kind):
    """``matryoshka_rank_samples: 2``: the gradient is the mean of two single-draw steps' (same draws, same seed);
    the distillation teacher runs once per micro-batch."""
    batch = _batch(tokenizer := _load(tiny["model"])[1])
    grads, teacher_runs, losses = {}, {}, {}
    for samples in (1, 2):
        model, _ = _load(tiny["model"])
        margs = MatryoshkaArguments(matryoshka_trainer=kind, matryoshka_rank_samples=samples, matryoshka_seed=7)
        trainer = _trainer(cls, model, tokenizer, tmp_path / str(samples), margs)
        trainer.current_gradient_accumulation_steps = 1
        runs = []
        original = trainer._pca.exact_full_rank

        def counted(*args, _original=original, _runs=runs, **kwargs):
            _runs.append(1)
            return _original(*args, **kwargs)

        trainer._pca.exact_full_rank = counted
        model.train()
        steps = 2 if samples == 1 else 1  # the same two draws either way
        losses[samples] = sum(float(trainer.training_step(model, dict(batch))) for _ in range(steps))
        grads[samples] = [p.grad.clone() for p in trainer._projection_params if p.grad is not None]
        teacher_runs[samples] = len(runs)
        assert trainer._batch_teacher is None  # not kept past the micro-batch
        if kind == "distill" and samples == 2:  # outside training_step every call runs its own teacher
            with trainer.sampled_ranks(*trainer.draw_ranks()):
                trainer.compute_loss(model, dict(batch))
                trainer.compute_loss(model, dict(batch))
            assert len(runs) == teacher_runs[2] + 2
    assert grads[1] and len(grads[1]) == len(grads[2])
    for single, shared in zip(grads[1], grads[2]):
        torch.testing.assert_close(shared * 2, single, rtol=1e-4, atol=1e-6)
    assert losses[2] == pytest.approx(losses[1] / 2, rel=1e-4)  # the logged loss is the draws' mean
    if kind == "distill":
        assert teacher_runs == {1: 2, 2: 1}


def test_rank_samples_must_be_a_positive_whole_number():
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="matryoshka_rank_samples"):
            MatryoshkaArguments(matryoshka_rank_samples=bad)


def test_ranks_cleared_on_exception(tiny, tmp_path):
    model, tokenizer = _load(tiny["model"])
    trainer = _trainer(PcaLlamaTrainer, model, tokenizer, tmp_path, MatryoshkaArguments(matryoshka_trainer="plain"))
    trainer.current_gradient_accumulation_steps = 1
    bad = dict(_batch(tokenizer))
    bad["labels"] = bad["labels"][:, :3]  # shape mismatch -> the forward raises
    with pytest.raises((ValueError, RuntimeError)):
        trainer.training_step(model, bad)
    assert all(attn.sampled_masks is None for attn in _attn_layers(model))


def test_evaluation_at_fixed_budget(tiny, tmp_path):
    model, tokenizer = _load(tiny["model"])
    rows = [tokenizer(t) for t in ["the nation is strong and the people are free"] * 4]
    trainer = _trainer(PcaLlamaDistillationTrainer, model, tokenizer, tmp_path,
                       MatryoshkaArguments(matryoshka_eval_budget=0.25), eval_dataset=rows)
    assert model.kv_budget() == 1.0
    metrics = trainer.evaluate()
    assert metrics["eval_kv_budget"] == 0.25
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert model.kv_budget() == 1.0  # restored
    # the same evaluation by LLaMA-Factory's own trainer with the ranks set by hand
    model.set_kv_budget(0.25)
    stock = pt_workflow.CustomTrainer._mkv_stock
    args = TrainingArguments(output_dir=str(tmp_path / "stock"), per_device_eval_batch_size=2, report_to="none",
                             remove_unused_columns=False)
    reference = stock(model=model, args=args, finetuning_args=FinetuningArguments(stage="pt"), processor=None,
                      tokenizer=tokenizer, eval_dataset=rows,
                      data_collator=DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)).evaluate()
    assert metrics["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    model.set_kv_budget(1.0)
    full = stock(model=model, args=args, finetuning_args=FinetuningArguments(stage="pt"), processor=None,
                 tokenizer=tokenizer, eval_dataset=rows,
                 data_collator=DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)).evaluate()
    assert full["eval_loss"] != pytest.approx(metrics["eval_loss"], rel=1e-6)  # the budget made a difference


def test_rank_sampling_covers_grid(tiny, tmp_path):
    model, tokenizer = _load(tiny["model"])
    trainer = _trainer(PcaLlamaTrainer, model, tokenizer, tmp_path, MatryoshkaArguments(matryoshka_trainer="plain"))
    seen = set()
    for _ in range(20):
        key, value = trainer.draw_ranks()
        assert key.shape == (2, 2) and value.shape == (2, 2)
        seen.update(key.flatten().tolist() + value.flatten().tolist())
    assert seen == {2, 4, 6, 8, 10, 12, 14, 16}  # head_dim 16, step 2




def test_rank_choices_and_weights(tiny, tmp_path):
    model, tokenizer = _load(tiny["model"])
    margs = MatryoshkaArguments(matryoshka_trainer="plain", matryoshka_rank_choices="12,4,8",
                                matryoshka_rank_probs=[0.0, 0.0, 1.0])  # all weight on rank 8
    trainer = _trainer(PcaLlamaTrainer, model, tokenizer, tmp_path, margs)
    for _ in range(5):
        key, value = trainer.draw_ranks()
        assert set(key.flatten().tolist()) | set(value.flatten().tolist()) == {8}


def test_teacher_is_the_base_model_without_adapters(tiny, tmp_path):
    """Distillation teacher logits: the untouched base Llama's, also under LoRA and after the bases trained."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from llamafactory_ext import trainers as trainers_module

    model, tokenizer = _load(tiny["model"])
    base = LlamaForCausalLM(model.config).eval()  # the same weights, plain Llama attention
    missing, _ = base.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    with torch.no_grad():
        for attn in _attn_layers(model):
            attn.kv_proj.value_skew.add_(0.1)  # trained bases: the projected full rank is no longer bit-exact
            attn.invalidate()
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    margs = MatryoshkaArguments(matryoshka_trainer="distill")
    trainer = _trainer(PcaLlamaDistillationTrainer, lora, tokenizer, tmp_path, margs)
    batch = _batch(tokenizer)
    seen = {}
    original = trainers_module.distillation_terms

    def spy(student, teacher, labels, **kwargs):
        seen["teacher"] = teacher
        return original(student, teacher, labels, **kwargs)

    trainers_module.distillation_terms = spy
    try:
        lora.train()
        with trainer.sampled_ranks(*trainer.draw_ranks()):
            trainer.compute_loss(lora, dict(batch))
    finally:
        trainers_module.distillation_terms = original
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        expected = base(**inputs).logits
        adapted = lora(**inputs).logits
    real = batch["attention_mask"].bool()  # PcaLlama numbers pad positions from the mask; pads are not scored
    assert bool((~real).any())
    assert torch.equal(seen["teacher"][real], expected[real])
    assert not torch.allclose(adapted[real], expected[real], atol=1e-3)  # the adapter does change the student


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk,recompute", [(1, 0), (3, 0), (3, 10**9), (512, 0), (512, 10**9)])
def test_chunked_distillation_terms_equal_one_pass_with_gradients(chunk, recompute, temperature):
    """Chunks, recomputed or kept, give the same sums and the same gradients as one pass over all tokens."""
    torch.manual_seed(0)
    student = torch.randn(2, 9, 11, requires_grad=True)
    teacher = torch.randn(2, 9, 11)
    labels = torch.tensor([[1, 2, 3, -100, -100, 4, 5, 6, 7], [-100, 4, 5, 6, 1, 2, -100, -100, -100]])
    kl, ce, count = distillation_terms(student, teacher, labels, temperature=temperature, chunk_tokens=chunk,
                                       recompute_above=recompute)
    (0.25 * kl + 0.75 * ce).backward()
    grad = student.grad.clone()

    reference = student.detach().clone().requires_grad_(True)
    mask = labels[:, 1:] != -100
    s, t = reference[:, :-1][mask], teacher[:, :-1][mask]
    ref_kl = torch.nn.functional.kl_div((s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1),
                                        reduction="sum", log_target=True) * temperature**2
    ref_ce = torch.nn.functional.cross_entropy(s, labels[:, 1:][mask], reduction="sum")
    (0.25 * ref_kl + 0.75 * ref_ce).backward()
    assert int(count) == int(mask.sum()) == 11
    assert kl.item() == pytest.approx(ref_kl.item(), rel=1e-5)
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-5)
    torch.testing.assert_close(grad, reference.grad, rtol=1e-5, atol=1e-6)

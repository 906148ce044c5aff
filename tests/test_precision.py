"""Reduced precision: a bfloat16 / float16 model's logits are upcast once (`output_logits`), so every draw and
every acceptance rule reads float32 probabilities; the shipped drafter runs on the demo LM in bfloat16."""

import copy

import pytest
import torch

import vadusa
import vadusa.accept
from tests.conftest import TEST_PROMPT, tiny_llama
from vadusa.batch import left_pad
from vadusa.blockdiff import generate as block_generate
from vadusa.blockdiff import make_student, save_adapter
from vadusa.blockdiff.student import BlockConfig
from vadusa.drafter import FeatureDrafter
from vadusa.generate import generate_ar, output_logits, scores_to_probs, split_model

SAMPLING = {"temperature": 1.0, "top_k": 30, "top_p": 0.9, "min_p": 0.02}  # every filter on


@pytest.fixture(scope="module")
def bf16_model():
    return tiny_llama().to(torch.bfloat16)


@pytest.fixture
def probs_dtypes(monkeypatch):
    """Every probability tensor a rule or a draw reads, by dtype: the rules' node and batch forms and
    `inverse_cdf` (behind `sample` and every rule's own draw) are wrapped to record it."""
    seen = []

    def spy(fn):
        def wrapped(probs, *args, **kwargs):
            seen.append(probs.dtype)
            return fn(probs, *args, **kwargs)

        return wrapped

    names = ["inverse_cdf"] + [f"{rule}{form}" for rule in vadusa.accept.ACCEPTANCE_RULES for form in ("", "_batch")]
    for name in names:
        monkeypatch.setattr(vadusa.accept, name, spy(getattr(vadusa.accept, name)))
    return seen


def prompts(batch: int):
    rows = [TEST_PROMPT, TEST_PROMPT[2:]][:batch]
    ids, mask = left_pad(rows)
    return (ids, mask) if batch > 1 else (ids, None)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("acceptance", vadusa.accept.ACCEPTANCE_RULES)
def test_every_rule_reads_float32_probabilities_of_a_bf16_model(bf16_model, probs_dtypes, acceptance, batch):
    heads = vadusa.DraftHeads.from_model(bf16_model, num_heads=3, num_layers=1).to(torch.bfloat16)
    ids, mask = prompts(batch)
    options = {"temperature": 0.0} if acceptance == "greedy" else SAMPLING
    out = vadusa.generate(bf16_model, heads, ids, attention_mask=mask, max_new_tokens=12, acceptance=acceptance,
                          generator=torch.Generator().manual_seed(0), **options)  # fmt: skip
    assert out.row_new_tokens == [12] * batch
    assert len(probs_dtypes) >= out.forward_passes - 1  # a rule decided after every verification at least
    assert set(probs_dtypes) == {torch.float32}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("decoder", ["ar", "block"])
def test_ar_and_block_draw_from_float32_probabilities_of_a_bf16_model(bf16_model, probs_dtypes, decoder, batch):
    ids, mask = prompts(batch)
    block = {"block_size": 3, "mask_token_id": 0, "unmask": "prefix", "sliding": batch > 1}  # batches slide
    run = generate_ar if decoder == "ar" else lambda *a, **k: block_generate(*a, **block, **k)
    out = run(bf16_model, ids, attention_mask=mask, max_new_tokens=10, generator=torch.Generator().manual_seed(0),
              **SAMPLING)  # fmt: skip
    assert out.row_new_tokens == [10] * batch
    assert len(probs_dtypes) >= 10 // 3 and set(probs_dtypes) == {torch.float32}


def test_output_logits_upcast_exactly_and_scores_to_probs_refuses_reduced_precision(bf16_model):
    _, out_layer = split_model(bf16_model)
    hidden = torch.randn(3, bf16_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    raw = out_layer(hidden.to(torch.bfloat16))  # (3, V) what the model computes, in bfloat16
    logits = output_logits(out_layer, hidden.to(torch.bfloat16))
    assert logits.dtype == torch.float32 and torch.equal(logits, raw.float())  # exact: no argmax moves
    history = torch.tensor([TEST_PROMPT])
    probs = scores_to_probs(logits, history, None, 0.7, None, top_p=0.9)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    with pytest.raises(TypeError, match="float32.*output_logits.*bfloat16"):
        scores_to_probs(raw, history, None, 0.7, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_greedy_ar_equals_transformers_greedy_in_reduced_precision(dtype):
    """The upcast sits where transformers' generate has it (before the processors), so greedy AR in reduced
    precision is still `model.generate` token for token."""
    model = tiny_llama().to(dtype)
    ids = torch.tensor([TEST_PROMPT])
    ours = generate_ar(model, ids, max_new_tokens=40, temperature=0.0).sequences
    theirs = model.generate(ids, max_new_tokens=40, do_sample=False, min_new_tokens=40)
    assert torch.equal(ours, theirs)


def test_feature_drafter_of_a_float32_base_runs_on_it_in_bfloat16():
    """The drafter's fingerprint is of the float32 output layer, which the rounded weights cannot reproduce: in
    reduced precision the drafter is checked by shape, and its float32 layer reads the base's states cast (before:
    "train a drafter for it", then a dtype mismatch in the first matmul). The demo test below shows it accepting."""
    base = tiny_llama()
    drafter = FeatureDrafter.from_model(base, depth=3)
    with pytest.raises(ValueError, match="train a drafter for it"):
        drafter.check_compatible(tiny_llama(seed=1))  # another float32 base of the same shape is still refused
    half = copy.deepcopy(base).to(torch.bfloat16)
    drafter.check_compatible(half)
    ids, mask = left_pad([TEST_PROMPT, TEST_PROMPT[2:]])
    for prompt, attention_mask in [(ids[:1], None), (ids, mask)]:  # one row, and the batched session
        out = vadusa.generate(half, drafter, prompt, attention_mask=attention_mask, max_new_tokens=8, temperature=0.0)
        assert out.row_new_tokens == [8] * len(prompt)


def test_block_adapter_of_a_float32_base_loads_on_it_in_bfloat16(tmp_path):
    """The block adapter's fingerprint (sums of the float32 embeddings) cannot be recomputed from rounded weights
    either: in reduced precision the adapter is checked by vocabulary (before: "distilled for another base")."""
    base = tiny_llama()
    save_adapter(make_student(copy.deepcopy(base), rank=4), BlockConfig.for_model(base, 0, 3), tmp_path / "block")
    with pytest.raises(ValueError, match="another base model"):
        vadusa.build_decoder("block", tiny_llama(seed=1), tmp_path)  # another float32 base is still refused
    run = vadusa.build_decoder("block", copy.deepcopy(base).to(torch.bfloat16), tmp_path)
    out = run(torch.tensor([TEST_PROMPT]), max_new_tokens=9, temperature=0.0)
    assert out.new_tokens == 9 and out.forward_passes <= 9


@pytest.fixture(scope="module")
def demo():
    from vadusa.speech import TTSPipeline

    return TTSPipeline.from_pretrained()


def test_demo_lm_greedy_vadusa_in_reduced_precision(demo):
    """What benchmarks/precision.py measured on 30 held-out texts (README, "Reduced precision"): in bfloat16,
    greedy VADUSA (shipped drafter, greedy tree) leaves greedy AR of the same dtype on 7 texts, the earliest at
    token 9, and this text (test sentence 1) not at all; in float16 both equal float32 greedy AR on all 30."""
    from vadusa.speech.corpus import held_out_texts

    text = held_out_texts("test", 2)[1]
    ids, cap = demo.prompt(text), demo.max_new_tokens(text)
    options = {"max_new_tokens": cap, "temperature": 0.0, "logits_processor": demo.logits_processor,
               "eos_token_id": demo.eos_token_id}  # fmt: skip
    reference = generate_ar(demo.model, ids, **options).tokens.tolist()  # float32
    for dtype in (torch.bfloat16, torch.float16):
        model = copy.deepcopy(demo.model).to(dtype)
        run = vadusa.build_decoder("vadusa", model, assets=demo.directory, acceptance="greedy", tree="auto")
        ar, ours = generate_ar(model, ids, **options), run(ids, **options)
        assert ours.tokens.tolist() == ar.tokens.tolist(), dtype
        assert ours.mean_accepted > 3.0, dtype  # the float32 drafter drafts as well on the rounded base (4.4)
        if dtype == torch.float16:
            assert ours.tokens.tolist() == reference
    logits = [output_logits(split_model(m)[1], torch.ones(demo.model.config.hidden_size, dtype=m.dtype))
              for m in (demo.model, model)]  # fmt: skip
    assert not torch.equal(*logits)  # float16 really rounds: its logits are not float32's

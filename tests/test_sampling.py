"""Top-p and min-p: the same filters as transformers' warpers, inside the one probability function, so every
decoder and every acceptance rule samples them exactly."""

import sys

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import vadusa
from tests.conftest import TEST_PROMPT, fitted_heads, tiny_llama
from tests.test_generate import empirical_joint, total_variation
from vadusa.generate import min_p_filter, scores_to_probs, top_p_filter


def random_scores(rows=64, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = 3 * torch.randn(rows, vocab, generator=g)
    scores[:4] = scores[:4].round()  # rows with ties
    scores[4, :] = 0.0  # a flat row
    return scores


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8, 0.95, 0.999])
def test_top_p_filter_equals_transformers(top_p):
    scores = random_scores()
    theirs = TopPLogitsWarper(top_p)(None, scores.clone())
    ours = top_p_filter(scores, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = torch.isfinite(ours).sum(-1)
    assert kept.min() >= 1 and kept.sum() < scores.numel()  # the filter does cut


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_filter_equals_transformers(min_p):
    scores = random_scores(seed=1)
    theirs = MinPLogitsWarper(min_p)(None, scores.clone())
    assert torch.equal(torch.isinf(min_p_filter(scores, min_p)), torch.isinf(theirs))


def test_scores_to_probs_equals_the_warper_chain():
    """processors -> temperature -> top-k -> top-p -> min-p, as model.generate chains them."""
    scores, history = random_scores(seed=2), torch.randint(0, 50, (1, 9))
    penalty = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3)])
    chain = LogitsProcessorList(
        [*penalty, TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)]
    )
    theirs = torch.softmax(chain(history.expand(64, -1), scores.clone()), -1)
    ours = scores_to_probs(scores, history, penalty, 0.7, 20, 0.8, 0.05)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (ours == 0).any(-1).all()  # every row lost tokens


def exact_warped_joint(model, prompt, steps, temperature, top_p):
    """P(x1..x_steps | prompt) under temperature + top-p, enumerated with transformers' own warpers."""
    warp = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])
    joint = {(): 1.0}
    for _ in range(steps):
        prefixes = list(joint)
        batch = torch.tensor([prompt + list(p) for p in prefixes])
        with torch.no_grad():
            probs = torch.softmax(warp(batch, model(batch).logits[:, -1]), -1)  # (P, V)
        joint = {p + (t,): joint[p] * float(probs[i, t]) for i, p in enumerate(prefixes) for t in range(probs.shape[1])}
    return {k: v for k, v in joint.items() if v > 0}


def test_lossless_with_top_p_matches_the_sampling_joint():
    """Lossless VADUSA at temperature 0.7, top-p 0.8: the 3-token joint equals AR sampling's (TV under the
    sampling-noise bound of test_generate), and the untruncated sampler's joint is far from it."""
    model = tiny_llama(vocab=8, seed=1)
    heads = fitted_heads(model, 2, steps=100, seed=1)
    tree = vadusa.Tree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0]])
    prompt, runs = [1, 5, 2], 1200
    exact = exact_warped_joint(model, prompt, 3, 0.7, 0.8)
    bound = 0.5 * sum((p * (1 - p) / runs) ** 0.5 for p in exact.values())

    def sampler(top_p):
        def sample(g):
            out = vadusa.generate(model, heads, torch.tensor([prompt]), tree=tree, max_new_tokens=3, temperature=0.7,
                                  top_p=top_p, acceptance="lossless", generator=g)  # fmt: skip
            return out.tokens.tolist()

        return sample

    tv = total_variation(empirical_joint(sampler(0.8), runs), exact)
    assert tv < bound, (tv, bound)
    assert total_variation(empirical_joint(sampler(1.0), 300), exact) > 2 * bound


def test_every_decoder_samples_what_transformers_samples(monkeypatch):
    """generate_ar with top-k, top-p and min-p draws exactly model.generate's tokens on the same seed once its
    sampler is transformers' (multinomial); greedy VADUSA ignores top-p / min-p (they never drop the argmax)."""
    multinomial = lambda probs, generator=None, num=1: torch.multinomial(probs, num, generator=generator)  # noqa: E731
    monkeypatch.setattr(sys.modules["vadusa.generate"], "sample", multinomial)
    model = tiny_llama()
    prompt = torch.tensor([TEST_PROMPT])
    sampling = dict(max_new_tokens=60, temperature=0.9, top_k=30, top_p=0.9, min_p=0.02)
    ours = vadusa.generate_ar(model, prompt, generator=torch.Generator().manual_seed(3), **sampling)
    hf = vadusa.build_decoder("hf-generate", model)(prompt, generator=torch.Generator().manual_seed(3), **sampling)
    assert torch.equal(ours.sequences, hf.sequences)
    plain = vadusa.generate_ar(model, prompt, generator=torch.Generator().manual_seed(3), max_new_tokens=60)
    assert not torch.equal(plain.sequences, ours.sequences)


@pytest.mark.parametrize("bad", [{"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -0.1}, {"min_p": 2}, {"top_p": True}])
def test_bad_top_p_min_p_raise(bad):
    model = tiny_llama()
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        vadusa.generate_ar(model, torch.tensor([[1]]), max_new_tokens=2, **bad)


@pytest.fixture(scope="module")
def mask_model_and_heads():
    from tests.test_block import base_with_mask

    model = base_with_mask()  # a tiny Llama with a reserved mask token, for block decoding
    return model, fitted_heads(model, steps=20)


@pytest.mark.parametrize("option", [{"top_p": 1e-4}, {"min_p": 1.0}])
def test_every_decoder_reads_top_p_and_min_p(mask_model_and_heads, option):
    """A nucleus of one token (top-p -> 0, or min-p 1) makes sampling greedy: every decoder's sampled output is
    then its greedy output, so each one applies the option (without it, sampling at temperature 1 differs)."""
    from tests.test_block import NoMask
    from vadusa.blockdiff import generate as block_generate

    model, heads = mask_model_and_heads
    prompt, ban = torch.tensor([TEST_PROMPT]), [NoMask()]
    decoders = {
        "ar": lambda **kw: vadusa.generate_ar(model, prompt, **kw),
        "hf-generate": lambda **kw: vadusa.build_decoder("hf-generate", model)(prompt, **kw),
        "vadusa": lambda **kw: vadusa.generate(model, heads, prompt, tree=vadusa.Tree.chain(3), **kw),
        "block": lambda **kw: block_generate(model, prompt, block_size=1, **kw),  # its confidences are the probs
    }
    for name, run in decoders.items():
        greedy = run(max_new_tokens=30, temperature=0, logits_processor=ban).sequences
        sampled = run(max_new_tokens=30, logits_processor=ban, generator=torch.Generator().manual_seed(0), **option)
        plain = run(max_new_tokens=30, logits_processor=ban, generator=torch.Generator().manual_seed(0))
        assert torch.equal(sampled.sequences, greedy), name
        assert not torch.equal(plain.sequences, greedy), name

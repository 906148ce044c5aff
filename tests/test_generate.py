import itertools
import sys

import pytest
import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor
from transformers.generation.streamers import BaseStreamer

import vadusa
from tests.conftest import TEST_PROMPT, assert_cache_continues, fitted_drafter, fitted_heads, tiny_gpt2, tiny_llama

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
WIDE = vadusa.Tree.from_paths([[r] for r in range(12)] + [[r, 0] for r in range(4)] + [[0, 1]])


KINDS = [("llama", "heads"), ("gpt2", "heads"), ("llama", "root-token"), ("llama", "shared"), ("llama", "feature"),
         ("gpt2", "feature")]  # fmt: skip


@pytest.fixture(scope="module", params=KINDS, ids=str)
def model_and_heads(request):
    """A tiny model with a fitted draft model of every kind: heads (own output layers, root token, shared
    output layer) and the feature drafter."""
    name, kind = request.param
    model = MODELS[name]()
    if kind == "feature":
        return model, fitted_drafter(model)
    return model, fitted_heads(model, root_token=kind == "root-token", shared_output=kind == "shared")


def trees(medusa_tree):
    return {"chain": vadusa.Tree.chain(4), "medusa63": medusa_tree, "wide": WIDE}


@pytest.mark.parametrize("tree_name", ["chain", "medusa63", "wide"])
@pytest.mark.parametrize("processors", [None, "penalty", "penalty+ngram"])
def test_greedy_equals_autoregressive(model_and_heads, medusa_tree, tree_name, processors):
    """Greedy VADUSA == greedy model.generate token for token, also under history-aware processors."""
    model, heads = model_and_heads
    prompt = torch.tensor([TEST_PROMPT])
    hf_kwargs, processor = {}, None
    if processors:
        hf_kwargs = {"repetition_penalty": 1.3} | ({"no_repeat_ngram_size": 3} if "ngram" in processors else {})
        processor = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3)])
        if "ngram" in processors:
            processor.append(NoRepeatNGramLogitsProcessor(3))
    reference = model.generate(prompt, max_new_tokens=200, min_new_tokens=200, do_sample=False, **hf_kwargs)
    ar = vadusa.generate_ar(model, prompt, max_new_tokens=200, temperature=0, logits_processor=processor)
    out = vadusa.generate(
        model,
        heads,
        prompt,
        tree=trees(medusa_tree)[tree_name],
        max_new_tokens=200,
        temperature=0,
        logits_processor=processor,
    )
    assert torch.equal(ar.sequences, reference)
    assert torch.equal(out.sequences, reference)
    assert out.new_tokens == 200 and sum(out.accepted_lengths) == 199  # + the token drawn after the prefill
    assert out.forward_passes == 1 + len(out.accepted_lengths)
    # the heads were fitted to futures without the n-gram ban, which moves greedy decoding off them
    assert out.mean_accepted > (1.05 if processors == "penalty+ngram" else 1.3), out.mean_accepted


def exact_joint(model, prompt, steps: int, temperature: float) -> dict:
    """P(x1..x_steps | prompt) for every sequence, enumerated from the model."""
    vocab = model.config.vocab_size
    joint = {(): 1.0}
    for _ in range(steps):
        prefixes = list(joint)
        batch = torch.tensor([prompt + list(p) for p in prefixes])
        with torch.no_grad():
            probs = torch.softmax(model(batch).logits[:, -1] / temperature, -1)  # (P, V)
        joint = {p + (t,): joint[p] * float(probs[i, t]) for i, p in enumerate(prefixes) for t in range(vocab)}
    return joint


def empirical_joint(sample, runs: int) -> dict:
    counts: dict = {}
    for seed in range(runs):
        key = tuple(sample(torch.Generator().manual_seed(seed)))
        counts[key] = counts.get(key, 0) + 1
    return {k: c / runs for k, c in counts.items()}


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["heads", "feature", "dynamic"])
def test_lossless_matches_autoregressive_joint_distribution(kind):
    """Joint of the first 3 tokens (8^3 outcomes) from lossless VADUSA vs the exact AR joint.

    Bound: with n samples, E|p_hat - p| <= sqrt(p(1-p)/n) per cell, so E[TV] <= B = 0.5 * sum sqrt(p(1-p)/n);
    the real mean is ~0.8 B (sqrt(2/pi)) and the spread of TV is a few % of B, so TV < B is a tight test.
    The lossy tolerance rule on the same draws lands well above B (asserted, so the test can fail).
    """
    model = tiny_llama(vocab=8, seed=1)
    fit = fitted_heads if kind == "heads" else fitted_drafter
    heads = fit(model, 2, steps=100, seed=1)
    tree = vadusa.Tree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0]])
    if kind == "dynamic":  # the drafter's own choice of 5 nodes, step by step
        tree = vadusa.DynamicTree(nodes=5, width=2)
    prompt, runs, temperature = [1, 5, 2], 3000, 0.7
    exact = exact_joint(model, prompt, 3, temperature)
    bound = 0.5 * sum((p * (1 - p) / runs) ** 0.5 for p in exact.values())

    def sampler(acceptance):
        def sample(g):
            out = vadusa.generate(
                model,
                heads,
                torch.tensor([prompt]),
                tree=tree,
                max_new_tokens=3,
                temperature=temperature,
                acceptance=acceptance,
                tolerance=4,
                generator=g,
            )
            return out.tokens.tolist()

        return sample

    tv_lossless = total_variation(empirical_joint(sampler("lossless"), runs), exact)
    tv_tolerance = total_variation(empirical_joint(sampler("tolerance"), runs), exact)
    assert tv_lossless < bound, (tv_lossless, bound)
    assert tv_tolerance > 1.2 * bound, (tv_tolerance, bound)


def test_mean_accepted_grows_with_tolerance(medusa_tree):
    model = tiny_llama(seed=2)
    heads = fitted_heads(model, seed=2)
    prompts = [torch.tensor([[p, 7, 11]]) for p in range(4)]
    means = []
    for tau in (1, 2, 4, 16):
        outs = [
            vadusa.generate(
                model,
                heads,
                p,
                tree=medusa_tree,
                max_new_tokens=100,
                acceptance="tolerance",
                tolerance=tau,
                generator=torch.Generator().manual_seed(i),
            )
            for i, p in enumerate(prompts)
        ]
        means.append(sum(sum(o.accepted_lengths) for o in outs) / sum(len(o.accepted_lengths) for o in outs))
    assert all(a < b for a, b in itertools.pairwise(means)), means


@pytest.mark.parametrize("acceptance", ["tolerance", "typical", "lossless"])
def test_cache_is_compacted_to_the_sequence(model_and_heads, medusa_tree, acceptance):
    """Continuing from the returned cache gives the logits of a fresh forward over the whole sequence."""
    model, heads = model_and_heads
    out = vadusa.generate(
        model,
        heads,
        torch.tensor([[1, 2, 3]]),
        tree=medusa_tree,
        max_new_tokens=97,
        acceptance=acceptance,
        generator=torch.Generator().manual_seed(0),
    )
    assert_cache_continues(model, out)


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.flatten().tolist())

    def end(self):
        self.ended += 1


def test_stops_exactly_at_eos_and_budget_and_streams(model_and_heads, medusa_tree):
    model, heads = model_and_heads
    prompt = torch.tensor([[3, 17, 5]])
    greedy = vadusa.generate_ar(model, prompt, max_new_tokens=60, temperature=0).tokens.tolist()
    eos = greedy[25]
    first = greedy.index(eos)
    for budget in (1, 2, 17, 60):
        for run in (
            lambda **kw: vadusa.generate(model, heads, prompt, tree=medusa_tree, temperature=0, **kw),
            lambda **kw: vadusa.generate_ar(model, prompt, temperature=0, **kw),
        ):
            rec = Recorder()
            out = run(max_new_tokens=budget, eos_token_id=eos, streamer=rec)
            expected = greedy[: min(budget, first + 1)]
            assert out.tokens.tolist() == expected and out.new_tokens == len(expected)
            assert rec.puts[0] == prompt[0].tolist() and sum(rec.puts[1:], []) == expected and rec.ended == 1


def test_same_seed_same_output(model_and_heads, medusa_tree):
    model, heads = model_and_heads
    runs = [
        vadusa.generate(
            model,
            heads,
            torch.tensor([[4, 4]]),
            tree=medusa_tree,
            max_new_tokens=80,
            generator=torch.Generator().manual_seed(7),
        ).tokens
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_bad_inputs_raise(model_and_heads):
    model, heads = model_and_heads
    with pytest.raises(ValueError, match="batch size must be >= 1"):  # batches: tests/test_batch.py
        vadusa.generate(model, heads, torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        vadusa.generate_ar(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the number of draft heads"):
        vadusa.generate(model, heads, torch.tensor([[1]]), tree=vadusa.Tree.chain(5))
    with pytest.raises(ValueError, match="vocabulary size 48, the model has 40"):  # heads and drafters alike
        vadusa.generate(tiny_llama(vocab=40), heads, torch.tensor([[1]]))
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        vadusa.generate_ar(model, torch.tensor([[1]]), max_new_tokens=0)


def test_sampled_ar_equals_transformers_sampling_on_the_same_seed(model_and_heads, monkeypatch):
    """generate_ar draws exactly what model.generate draws: the same processors, warpers and RNG calls, once
    its sampler (`accept.sample`, inverse CDF) is swapped for the one transformers calls."""
    multinomial = lambda probs, generator=None, num=1: torch.multinomial(probs, num, generator=generator)  # noqa: E731
    monkeypatch.setattr(sys.modules["vadusa.generate"], "sample", multinomial)
    model, _ = model_and_heads
    prompt = torch.tensor([TEST_PROMPT])
    processor = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2)])
    sampling = dict(max_new_tokens=60, temperature=0.8, top_k=10, logits_processor=processor)
    ours = vadusa.generate_ar(model, prompt, generator=torch.Generator().manual_seed(5), **sampling)
    hf = vadusa.build_decoder("hf-generate", model)(prompt, generator=torch.Generator().manual_seed(5), **sampling)
    assert torch.equal(ours.sequences, hf.sequences)

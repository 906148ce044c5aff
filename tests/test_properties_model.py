"""Property (hypothesis): for random valid trees on random tiny models, greedy VADUSA == greedy AR, token for token.

Models are tiny random-init Llama and Qwen2 (vocabulary, seed and number of heads drawn); draft heads are random
(every kind: own output layers, root token, shared output layer) or, for one model, fitted so that several
tokens are accepted per step. Prompts, budgets and an end-of-sequence id are drawn too.
"""

from functools import cache

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import vadusa
from tests.conftest import budget, fitted_heads, tiny_llama
from tests.test_hf import tiny_qwen2
from tests.test_properties import check_buffers, valid_paths

MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2}
HEADS = {"heads": {}, "root-token": {"root_token": True}, "shared": {"shared_output": True}}


@cache
def model_and_heads(kind: str, vocab: int, seed: int, heads_kind: str, num_heads: int, fitted: bool):
    model = MODELS[kind](vocab=vocab, seed=seed)
    heads = fitted_heads(model, num_heads=num_heads, steps=40 if fitted else 0, seed=seed, **HEADS[heads_kind])
    return model, heads


@st.composite
def cases(draw):
    if draw(st.integers(0, 3)) == 0:  # a fitted draft: several tokens accepted per step
        key = ("llama", 48, 0, "heads", 4, True)
    else:
        key = (draw(st.sampled_from(sorted(MODELS))), draw(st.sampled_from([16, 32, 48])), draw(st.integers(0, 3)),
               draw(st.sampled_from(sorted(HEADS))), draw(st.integers(1, 4)), False)  # fmt: skip
    vocab, num_heads = key[1], key[4]
    paths = draw(valid_paths(max_nodes=20, max_rank=5, max_depth=num_heads))
    prompt = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8))
    eos = draw(st.none() | st.integers(0, vocab - 1))
    return key, paths, prompt, draw(st.integers(1, 40)), eos


@settings(max_examples=budget(30), deadline=None)
@given(case=cases())
def test_greedy_vadusa_equals_greedy_ar(case):
    key, paths, prompt, max_new_tokens, eos = case
    model, heads = model_and_heads(*key)
    tree = vadusa.Tree.from_paths(paths)
    check_buffers(tree)
    ids = torch.tensor([prompt])
    ar = vadusa.generate_ar(model, ids, max_new_tokens=max_new_tokens, temperature=0, eos_token_id=eos)
    out = vadusa.generate(model, heads, ids, tree=tree, max_new_tokens=max_new_tokens, temperature=0,
                          eos_token_id=eos)  # fmt: skip
    assert torch.equal(out.sequences, ar.sequences), (out.sequences, ar.sequences)
    assert out.new_tokens == ar.new_tokens <= max_new_tokens
    assert out.forward_passes == 1 + len(out.accepted_lengths) <= ar.forward_passes
    event(f"mean accepted {'> 1.5' if out.mean_accepted > 1.5 else '<= 1.5'}")

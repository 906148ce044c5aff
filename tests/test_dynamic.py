"""Dynamic trees (vadusa.dynamic): greedy stays exact, the grown tree is the most probable one, bad input raises."""

import pytest
import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

import vadusa
from tests.conftest import TEST_PROMPT, assert_cache_continues, fitted_drafter, fitted_heads, tiny_gpt2, tiny_llama
from vadusa.dynamic import DynamicTree, buffers, choose

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
SPECS = [DynamicTree(nodes=1, width=1), DynamicTree(nodes=6, width=2), DynamicTree(nodes=12, width=4),
         DynamicTree(nodes=9, width=3, depth=2)]  # fmt: skip


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_drafter(request):
    model = MODELS[request.param]()
    return model, fitted_drafter(model)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("processors", [None, "penalty+ngram"])
def test_greedy_with_dynamic_trees_equals_transformers_greedy(model_and_drafter, spec, processors):
    model, drafter = model_and_drafter
    prompt = torch.tensor([TEST_PROMPT])
    hf_kwargs, processor = {}, None
    if processors:
        hf_kwargs = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}
        processor = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(3)])
    reference = model.generate(prompt, max_new_tokens=120, min_new_tokens=120, do_sample=False, **hf_kwargs)
    out = vadusa.generate(model, drafter, prompt, tree=spec, max_new_tokens=120, temperature=0,
                          logits_processor=processor)  # fmt: skip
    assert torch.equal(out.sequences, reference)
    assert out.forward_passes == 1 + len(out.accepted_lengths)
    assert max(out.accepted_lengths) <= spec.depth_for(drafter.max_depth) + 1
    if spec.nodes > 1 and not processors:
        assert out.mean_accepted > 1.3, out.mean_accepted


@pytest.mark.parametrize("acceptance", ["tolerance", "typical", "lossless"])
def test_sampling_with_a_dynamic_tree_keeps_the_cache_of_the_sequence(model_and_drafter, acceptance):
    """Reproducible from a seed, and the returned cache continues like a fresh forward over the sequence."""
    model, drafter = model_and_drafter
    runs = [
        vadusa.generate(
            model,
            drafter,
            torch.tensor([[1, 2, 3]]),
            tree=DynamicTree(8, 2),
            max_new_tokens=97,
            acceptance=acceptance,
            generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
        for _ in range(2)
    ]
    out = runs[0]
    assert torch.equal(out.sequences, runs[1].sequences) and out.new_tokens == 97
    assert_cache_continues(model, out)


def test_choose_keeps_the_most_probable_nodes_as_a_tree():
    # node: 0 root; depth 1: 1 (p .6), 2 (p .4); depth 2 under 1: 3 (.6 * 1.0, a tie with its parent), 4 (.6 * .5)
    tokens = torch.tensor([9, 11, 12, 13, 14])
    scores = torch.tensor([0.0, 0.6, 0.4, 0.6, 0.3], dtype=torch.float64).log()
    parents, depths = torch.tensor([-1, 0, 0, 1, 1]), torch.tensor([0, 1, 1, 2, 2])
    for nodes, want in [(1, [9, 11]), (2, [9, 11, 13]), (3, [9, 11, 12, 13]), (9, [9, 11, 12, 13, 14])]:
        toks, par, dep = choose(tokens, scores, parents, depths, nodes)
        assert toks.tolist() == want  # the parent before its child of equal probability
        assert all(par[i] < i and dep[i] == dep[par[i]] + 1 for i in range(1, len(par)))
    bias, d, walk = buffers([-1, 0, 0, 1], [0, 1, 1, 2], width=2, dtype=torch.float32, device="cpu")
    tree = vadusa.Tree.from_paths([[0], [1], [0, 0]])  # the same tree, static
    assert torch.equal(bias, tree.attention_bias(torch.float32)) and torch.equal(d, tree.depths)
    assert walk.children == [[1, 2], [3], [], []] and walk.child_index.tolist() == [[1, 2], [3, -1], [-1, -1], [-1, -1]]
    assert walk.ancestors.tolist() == [[0, 0], [1, 0], [2, 0], [1, 3]]


def test_dynamic_tree_bad_inputs_raise(model_and_drafter, tmp_path):
    model, drafter = model_and_drafter
    prompt = torch.tensor([TEST_PROMPT])
    with pytest.raises(ValueError, match="dynamic tree nodes must be an integer in \\[1, 256\\], got 0"):
        DynamicTree(nodes=0)
    with pytest.raises(ValueError, match="dynamic tree depth 9 exceeds the drafter's depth 4"):
        vadusa.generate(model, drafter, prompt, tree=DynamicTree(depth=9))
    with pytest.raises(ValueError, match="width 1 and depth 4 drafts 4 nodes, fewer than the 5 to verify"):
        vadusa.generate(model, drafter, prompt, tree=DynamicTree(nodes=5, width=1))
    heads = fitted_heads(model, steps=5)
    with pytest.raises(ValueError, match="dynamic trees need a feature drafter"):
        vadusa.generate(model, heads, prompt, tree=DynamicTree())
    with pytest.raises(ValueError, match="dynamic trees decode one prompt at a time"):
        vadusa.generate(model, drafter, prompt.repeat(2, 1), tree=DynamicTree(), attention_mask=torch.ones(2, 6))
    drafter.save_pretrained(tmp_path / "d")
    vadusa.Tree.chain(3).to_json(tmp_path / "t.json")
    with pytest.raises(ValueError, match="cannot be combined with tree="):
        vadusa.build_decoder("vadusa", model, heads=str(tmp_path / "d"), tree=str(tmp_path / "t.json"), dynamic_nodes=8)
    with pytest.raises(ValueError, match="dynamic_nodes must be an integer in \\[0, 256\\]"):
        vadusa.build_decoder("vadusa", model, heads=str(tmp_path / "d"), dynamic_nodes=-1)
    run = vadusa.build_decoder("vadusa", model, heads=str(tmp_path / "d"), dynamic_nodes=8, dynamic_width=2)
    assert run.tree == DynamicTree(8, 2)
    greedy = run(prompt, max_new_tokens=40, temperature=0)
    assert torch.equal(greedy.sequences, vadusa.generate_ar(model, prompt, max_new_tokens=40, temperature=0).sequences)


@pytest.mark.filterwarnings("ignore:Passing `")
def test_dynamic_tree_through_custom_generate_equals_model_generate(model_and_drafter):
    """model.generate(custom_generate=vadusa.custom_generate, tree=DynamicTree(...)) == plain greedy generate,
    with every usual processor (repetition penalty, n-gram ban, suppressed and bad words, min_new_tokens, EOS)."""
    from tests.test_hf import usual_arguments

    model, drafter = model_and_drafter
    prompt = {"input_ids": torch.tensor([TEST_PROMPT])}
    kw = usual_arguments(model, prompt)
    reference = model.generate(**prompt, **kw)
    ours = model.generate(**prompt, **kw, custom_generate=vadusa.custom_generate, draft_heads=drafter,
                          tree=DynamicTree(8, 2), return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(ours.sequences, reference)
    assert ours.forward_passes < reference.shape[1] - len(TEST_PROMPT)

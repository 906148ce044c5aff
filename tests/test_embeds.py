"""Prompts as embeddings: generate, generate_ar and block decoding take inputs_embeds (1, T, D), embed generated
tokens with the model's own input embeddings, and decode what model.generate(inputs_embeds=...) decodes."""

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

import vadusa
from tests.conftest import TEST_PROMPT, fitted_drafter, fitted_heads, tiny_llama
from tests.test_block import MODES, base_with_mask
from vadusa.blockdiff import generate as block_generate


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def mixed_prompt(model, seed=0):
    """(1, 9, D): random 'text' embeddings (not rows of the model's table) followed by embedded prompt tokens."""
    g = torch.Generator().manual_seed(seed)
    text = 0.05 * torch.randn(1, 3, model.config.hidden_size, generator=g)
    with torch.no_grad():
        tokens = model.get_input_embeddings()(torch.tensor([TEST_PROMPT]))
    return torch.cat([text, tokens], 1)


@pytest.mark.parametrize("drafter", ["heads", "feature"])
@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_greedy_with_embeddings_equals_model_generate(llama, drafter):
    embeds = mixed_prompt(llama)
    heads = fitted_heads(llama) if drafter == "heads" else fitted_drafter(llama, steps=40)
    penalty = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2)])
    ref = llama.generate(inputs_embeds=embeds, max_new_tokens=80, min_new_tokens=80, do_sample=False,
                         repetition_penalty=1.2)  # fmt: skip
    ar = vadusa.generate_ar(llama, inputs_embeds=embeds, max_new_tokens=80, temperature=0, logits_processor=penalty)
    out = vadusa.generate(llama, heads, inputs_embeds=embeds, max_new_tokens=80, temperature=0,
                          logits_processor=penalty)  # fmt: skip
    assert ref.shape == (1, 80)  # transformers returns the new tokens alone for an embeddings prompt
    assert torch.equal(ar.sequences, ref) and torch.equal(out.sequences, ref)
    assert torch.equal(out.tokens, ref[0]) and out.mean_accepted > (1.2 if drafter == "heads" else 1.05)
    ids_run = vadusa.generate_ar(llama, torch.tensor([TEST_PROMPT]), max_new_tokens=80, temperature=0)
    assert not torch.equal(ids_run.tokens, ar.tokens)  # the text embeddings matter


def test_ids_and_embeddings_of_the_same_prompt_agree(llama):
    """Embeddings of the prompt's own tokens, with the ids beside them for the processors: the same run as ids."""
    ids = torch.tensor([TEST_PROMPT])
    with torch.no_grad():
        embeds = llama.get_input_embeddings()(ids)
    penalty = [RepetitionPenaltyLogitsProcessor(1.3)]
    a = vadusa.generate_ar(llama, ids, max_new_tokens=40, temperature=0, logits_processor=penalty)
    b = vadusa.generate_ar(llama, ids, inputs_embeds=embeds, max_new_tokens=40, temperature=0, logits_processor=penalty)
    assert torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize("mode", MODES)
def test_block_decoding_with_embeddings(mode):
    """Block size 1 == generate_ar on the same embeddings prompt; block size 4 on the embeddings of the prompt's
    tokens == block size 4 on the ids (every window row inside the prompt reads the prompt's embedding)."""
    model = base_with_mask()
    embeds = mixed_prompt(model)
    ar = vadusa.generate_ar(model, inputs_embeds=embeds, max_new_tokens=50, temperature=0)
    one = block_generate(model, inputs_embeds=embeds, block_size=1, temperature=0, max_new_tokens=50, **MODES[mode])
    assert torch.equal(one.sequences, ar.sequences)
    ids = torch.tensor([TEST_PROMPT])
    with torch.no_grad():
        own = model.get_input_embeddings()(ids)
    kw = dict(block_size=4, threshold=0.005, max_new_tokens=50, **MODES[mode])
    by_ids = block_generate(model, ids, generator=torch.Generator().manual_seed(1), **kw)
    by_embeds = block_generate(model, inputs_embeds=own, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(by_embeds.sequences, by_ids.tokens[None]) and by_ids.forward_passes < 50


def test_bad_embeddings_raise(llama):
    heads = fitted_heads(llama, steps=1)
    with pytest.raises(ValueError, match="hidden size 32, the model's input embeddings have 64"):
        vadusa.generate(llama, heads, inputs_embeds=torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="hidden size 32"):
        vadusa.generate_ar(llama, inputs_embeds=torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="batch size 1"):
        vadusa.generate_ar(llama, inputs_embeds=torch.zeros(2, 4, 64))
    with pytest.raises(ValueError, match="same prompt positions"):
        vadusa.generate_ar(llama, torch.tensor([[1, 2]]), inputs_embeds=torch.zeros(1, 4, 64))
    with pytest.raises(ValueError, match="input_ids or as inputs_embeds"):
        vadusa.generate_ar(llama)
    with pytest.raises(TypeError, match="float tensor"):
        vadusa.generate_ar(llama, inputs_embeds=torch.zeros(1, 4, 64, dtype=torch.long))

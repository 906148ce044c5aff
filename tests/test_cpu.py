"""transpose_linear_weights: same parameters and values, a transposed layout, the same decoding."""

import copy

import torch
from torch import nn
from transformers import LlamaForCausalLM

import vadusa
from tests.conftest import TEST_PROMPT, tiny_llama


def transposed(weight: torch.Tensor) -> bool:
    return weight.stride() == (1, weight.shape[0]) and not weight.is_contiguous()


def test_weights_keep_names_and_values_and_change_layout():
    model = tiny_llama()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    assert vadusa.transpose_linear_weights(model) is model
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    tied = model.get_input_embeddings().weight
    assert len(linears) == 2 * 7 + 1  # 7 projections per layer, the output layer
    for m in linears:
        assert m.weight.is_contiguous() if m.weight is tied else transposed(m.weight)
    assert transposed(copy.deepcopy(model).model.layers[0].mlp.up_proj.weight)  # copies (block students) keep it


def test_tied_output_layer_is_left_alone():
    config = tiny_llama().config
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    vadusa.transpose_linear_weights(model)
    assert model.lm_head.weight is model.get_input_embeddings().weight and model.lm_head.weight.is_contiguous()
    assert transposed(model.model.layers[1].self_attn.o_proj.weight)


def test_outputs_and_greedy_decoding_are_unchanged(tmp_path):
    reference, model = tiny_llama(), vadusa.transpose_linear_weights(tiny_llama())
    prompt = torch.tensor([TEST_PROMPT])
    with torch.no_grad():
        assert torch.allclose(model(prompt).logits, reference(prompt).logits, atol=1e-5)
    ours = vadusa.generate_ar(model, prompt, max_new_tokens=120, temperature=0)
    theirs = vadusa.generate_ar(reference, prompt, max_new_tokens=120, temperature=0)
    assert torch.equal(ours.sequences, theirs.sequences)
    model.save_pretrained(tmp_path)  # safetensors saves the transposed weights as ordinary ones
    loaded = type(model).from_pretrained(tmp_path)
    saved, kept = loaded.state_dict(), model.state_dict()
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in kept)

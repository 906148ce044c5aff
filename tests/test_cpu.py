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


# ----- multirow_onednn: products of more than two rows on oneDNN's packed weights -----
def test_multirow_linear_equals_linear_and_follows_weight_changes():
    from vadusa.cpu import MultirowLinear, multirow_onednn

    plain = nn.Linear(64, 96)
    layer = multirow_onednn(nn.Sequential(copy.deepcopy(plain)))[0]
    assert type(layer) is MultirowLinear and layer.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(16, 64)
    with torch.inference_mode():
        for rows in (1, 2, 3, 9, 16):
            torch.testing.assert_close(layer(x[:rows]), plain(x[:rows]), atol=1e-5, rtol=1e-5)
        packed = torch.ops.mkldnn._linear_pointwise(x[:9], layer.weight, layer.bias, "none", [], "")
        assert torch.equal(layer(x[:9]), packed)  # more than two rows: the oneDNN kernel
    with torch.no_grad():
        layer.weight.mul_(2.0)  # changed in place (a LoRA merge does this): packed again
        plain.weight.mul_(2.0)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x[:9]), plain(x[:9]), atol=1e-5, rtol=1e-5)
    twin = copy.deepcopy(layer)  # a copy (the block student) gets its own packing
    with torch.inference_mode():
        torch.testing.assert_close(twin(x[:9]), plain(x[:9]), atol=1e-5, rtol=1e-5)
    x.requires_grad_(True)
    layer(x[:9]).sum().backward()  # training takes nn.Linear's path
    torch.testing.assert_close(x.grad[:9], plain.weight.sum(0).expand(9, -1), atol=1e-5, rtol=1e-5)


def test_greedy_vadusa_equals_greedy_ar_with_multirow_onednn():
    from tests.conftest import fitted_drafter
    from vadusa.cpu import multirow_onednn

    model = tiny_llama(seed=4)
    drafter = fitted_drafter(model, steps=40, seed=4)
    prompt = torch.tensor([TEST_PROMPT])
    reference = model.generate(prompt, max_new_tokens=120, min_new_tokens=120, do_sample=False)
    multirow_onednn(vadusa.transpose_linear_weights(model))
    tree = vadusa.Tree.from_paths([[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 0, 0]])
    out = vadusa.generate(model, drafter, prompt, tree=tree, max_new_tokens=120, temperature=0)
    assert torch.equal(out.sequences, reference) and out.mean_accepted > 1.2

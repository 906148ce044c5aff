import pytest
import torch

from tests.conftest import tiny_gpt2, tiny_llama
from vadusa import DraftHeads


def test_fresh_heads_reproduce_the_base_distribution():
    model = tiny_llama()
    heads = DraftHeads.from_model(model, num_heads=3, num_layers=2)
    h = torch.randn(5, 64)
    expected = model.get_output_embeddings()(h)  # (5, V)
    assert torch.allclose(heads(h), expected[:, None].expand(-1, 3, -1), atol=1e-5)


def test_fresh_root_token_heads_ignore_the_root_and_trained_ones_use_it():
    model = tiny_llama()
    heads = DraftHeads.from_model(model, num_heads=2, num_layers=1, root_token=True)
    h, roots = torch.randn(5, 64), torch.tensor([0, 3, 3, 7, 47])
    torch.testing.assert_close(heads(h, roots), DraftHeads.from_model(model, 2, 1)(h))
    with torch.no_grad():
        heads.root_embed[3].add_(1.0)
    changed = (heads(h, roots) - DraftHeads.from_model(model, 2, 1)(h)).abs().amax(dim=(1, 2)) > 1e-3
    assert changed.tolist() == [False, True, True, False, False]
    with pytest.raises(ValueError, match="pass roots"):
        heads(h)


def test_heads_are_independent_and_not_shared_with_the_base():
    model = tiny_gpt2()  # GPT-2 ties its output layer to the input embeddings: heads must copy, not share
    heads = DraftHeads.from_model(model, num_heads=2, num_layers=1)
    with torch.no_grad():
        heads.out_weight[0].add_(1.0)
        heads.block_weight[0].add_(1.0)
    assert torch.equal(heads.out_weight[1], model.get_output_embeddings().weight)
    assert heads.block_weight[1].abs().sum() == 0
    assert heads.config.hidden_size == 64 and heads.config.vocab_size == 48


@pytest.mark.parametrize("root_token", [False, True])
def test_save_load_roundtrip_is_bit_exact(tmp_path, root_token):
    model = tiny_llama()
    heads = DraftHeads.from_model(model, num_heads=4, num_layers=1, root_token=root_token)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
    heads.save_pretrained(tmp_path / "h")
    assert sorted(f.name for f in (tmp_path / "h").iterdir()) == ["config.json", "model.safetensors"]
    loaded = DraftHeads.from_pretrained(tmp_path / "h", model=model)
    for (name, a), (_, b) in zip(heads.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.config == heads.config
    assert ("root_embed" in loaded.state_dict()) == root_token


def test_mismatched_model_raises(tmp_path):
    heads = DraftHeads.from_model(tiny_llama(vocab=48), num_heads=2)
    with pytest.raises(ValueError, match="vocabulary size 48, the model has 40"):
        heads.check_compatible(tiny_llama(vocab=40))
    heads.config.base_model = "org/speech-lm-a"
    other = tiny_llama()
    other.config._name_or_path = "org/speech-lm-b"
    with pytest.raises(ValueError, match="speech-lm-a.*speech-lm-b"):
        heads.check_compatible(other)


def test_missing_or_corrupt_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DraftHeads.from_pretrained(tmp_path)
    DraftHeads.from_model(tiny_llama(), num_heads=2).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="corrupt"):
        DraftHeads.from_pretrained(tmp_path)

"""The shipped block adapter (vadusa/assets/demo/block) on the shipped demo LM: loads, decodes, is faster per pass."""

import pytest
import torch

from vadusa.blockdiff import load_student
from vadusa.decoders import build_decoder

torch.set_num_threads(1)
speech = pytest.importorskip("vadusa.speech")

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def pipe():
    try:
        return speech.TTSPipeline.from_pretrained()
    except FileNotFoundError as e:
        pytest.skip(f"demo weights not built: {e}")


@pytest.fixture(scope="module")
def adapter_dir(pipe):
    path = pipe.directory / "block"
    if not (path / "adapter_model.safetensors").is_file():
        pytest.skip("no shipped block adapter")
    return path


def test_shipped_adapter_is_for_the_shipped_lm(pipe, adapter_dir):
    student, config = load_student(pipe.model, adapter_dir)
    assert config.mask_token_id == pipe.vocab.pad  # the reserved id named in block_config.json
    assert config.vocab_size == pipe.model.config.vocab_size and config.block_size >= 2
    assert student.config.mask_token_id == pipe.vocab.pad


def test_shipped_adapter_decodes_several_units_per_pass(pipe, adapter_dir):
    run = build_decoder("block", pipe.model, pipe.directory, threshold=0.02)
    prompt = pipe.prompt(TEXT)
    out = run(prompt, max_new_tokens=pipe.max_new_tokens(TEXT), eos_token_id=pipe.eos_token_id,
              logits_processor=pipe.logits_processor, generator=torch.Generator().manual_seed(0))  # fmt: skip
    units = pipe.units(out)
    assert out.tokens[-1] == pipe.eos_token_id and len(units) == out.new_tokens - 1  # only units, then EOS
    assert 40 < out.new_tokens < pipe.max_new_tokens(TEXT)
    assert out.new_tokens / out.forward_passes > 1.5, out.new_tokens / out.forward_passes
    greedy = build_decoder("block", pipe.model, pipe.directory, threshold=0.02, block_size=1)
    one = greedy(prompt, max_new_tokens=30, temperature=0, logits_processor=pipe.logits_processor)
    assert one.forward_passes == one.new_tokens == 30  # block size 1: one unit per pass


def test_adapter_option_loads_the_same_student_as_assets(pipe, adapter_dir):
    """`adapter=<dir>` (any adapter, e.g. an ablation) decodes exactly as the assets' block/ it points to."""
    prompt = pipe.prompt(TEXT)
    kwargs = dict(max_new_tokens=60, eos_token_id=pipe.eos_token_id, logits_processor=pipe.logits_processor)
    by_assets = build_decoder("block", pipe.model, pipe.directory, threshold=0.05)
    by_adapter = build_decoder("block", pipe.model, None, threshold=0.05, adapter=adapter_dir)
    a = by_assets(prompt, generator=torch.Generator().manual_seed(3), **kwargs)
    b = by_adapter(prompt, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(a.sequences, b.sequences) and a.forward_passes == b.forward_passes
    with pytest.raises(ValueError, match="needs an adapter directory"):
        build_decoder("block", pipe.model, None)

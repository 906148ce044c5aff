"""Serving formats: the exported tensors, run the way vLLM's and Medusa's loaders run them, give heads(h)."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from tests.conftest import TEST_PROMPT, fitted_heads, tiny_gpt2, tiny_llama
from vadusa import DraftHeads, FeatureDrafter, Tree, build_decoder, formats, generate_ar, load_drafter

BASE = "org/tiny-speech-lm"


def base(shared_tied: bool = False):
    model = tiny_gpt2() if shared_tied else tiny_llama()
    model.config._name_or_path = BASE
    return model


def trained_heads(model, num_heads=3, num_layers=1, **kw) -> DraftHeads:
    """Heads with every weight moved off its initial value (a zero block is the identity: it tests nothing)."""
    heads = DraftHeads.from_model(model, num_heads=num_heads, num_layers=num_layers, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return heads


def states(seed=2) -> torch.Tensor:
    return torch.randn(7, 64, generator=torch.Generator().manual_seed(seed))  # (N, D)


# ----- the formats' own definitions, written here from their loaders (vLLM medusa.py, Medusa ResBlock) -----
def vllm_logits(config: dict, tensors: dict, h: torch.Tensor) -> torch.Tensor:
    """vLLM: per head, ResidualBlock (x = x + SiLU(layer(x)) per layer, bias iff medusa_fc_bias), then its
    lm_heads[k] (or the single lm_head when original_lm_head)."""
    out = []
    for k in range(config["num_heads"]):
        x = h
        for i in range(config["num_hidden_layers"]):
            bias = tensors[f"blocks.{k}.layers.{i}.bias"] if config.get("medusa_fc_bias", False) else None
            x = x + F.silu(F.linear(x, tensors[f"blocks.{k}.layers.{i}.weight"], bias))
        lm = tensors["lm_head.weight"] if config.get("original_lm_head", False) else tensors[f"lm_heads.{k}.weight"]
        out.append(F.linear(x, lm))
    return torch.stack(out, -2)  # (N, H, V)


def medusa_logits(config: dict, tensors: dict, h: torch.Tensor) -> torch.Tensor:
    """Medusa: head k = nn.Sequential(ResBlock x L, Linear(D, V, bias=False)); ResBlock = x + SiLU(linear(x))."""
    out, layers = [], config["medusa_num_layers"]
    for k in range(config["medusa_num_heads"]):
        x = h
        for i in range(layers):
            x = x + F.silu(F.linear(x, tensors[f"{k}.{i}.linear.weight"], tensors[f"{k}.{i}.linear.bias"]))
        out.append(F.linear(x, tensors[f"{k}.{layers}.weight"]))
    return torch.stack(out, -2)  # (N, H, V)


def read(d, weights):
    return json.loads((d / "config.json").read_text()), load_file(d / weights)


@pytest.mark.parametrize("num_layers", [0, 1, 2])
@pytest.mark.parametrize("shared_output", [False, True])
def test_vllm_export_keys_config_and_logits(tmp_path, num_layers, shared_output):
    model = base()
    heads = trained_heads(model, 3, num_layers, shared_output=shared_output)
    heads.save_pretrained(tmp_path / "v", format="vllm")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["config.json", "model.safetensors"]
    config, tensors = read(tmp_path / "v", "model.safetensors")
    assert {k: config[k] for k in ("model_type", "architectures", "num_heads", "num_hidden_layers")} == {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "num_heads": 3,
        "num_hidden_layers": num_layers,
    }
    assert (config["hidden_size"], config["vocab_size"], config["truncated_vocab_size"]) == (64, 48, 48)
    assert config["medusa_fc_bias"] is True and config["original_lm_head"] is shared_output
    blocks = {f"blocks.{k}.layers.{i}.{p}" for k in range(3) for i in range(num_layers) for p in ("weight", "bias")}
    outs = {"lm_head.weight"} if shared_output else {f"lm_heads.{k}.weight" for k in range(3)}
    assert set(tensors) == blocks | outs
    if shared_output:
        assert torch.equal(tensors["lm_head.weight"], model.lm_head.weight)  # vLLM's one head = the base's layer
    h = states()
    assert torch.allclose(vllm_logits(config, tensors, h), heads(h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_layers", [0, 1, 2])
@pytest.mark.parametrize("shared_output", [False, True])
def test_medusa_export_keys_config_and_logits(tmp_path, num_layers, shared_output):
    model = base(shared_tied=shared_output)  # GPT-2's output layer is tied to its embeddings: written as a copy
    heads = trained_heads(model, 4, num_layers, shared_output=shared_output)
    if num_layers > 1:  # Medusa's own model repeats one block per head: the export says so
        with pytest.warns(UserWarning, match=r"\[ResBlock\] \* n"):
            heads.save_pretrained(tmp_path / "m", format="medusa")
    else:
        heads.save_pretrained(tmp_path / "m", format="medusa")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "medusa_lm_head.safetensors"]
    config, tensors = read(tmp_path / "m", "medusa_lm_head.safetensors")
    assert (config["medusa_num_heads"], config["medusa_num_layers"], config["base_model_name_or_path"]) == (
        4,
        num_layers,
        BASE,
    )
    blocks = {f"{k}.{i}.linear.{p}" for k in range(4) for i in range(num_layers) for p in ("weight", "bias")}
    assert set(tensors) == blocks | {f"{k}.{num_layers}.weight" for k in range(4)}
    assert tensors[f"0.{num_layers}.weight"].shape == (48, 64)
    h = states()
    assert torch.allclose(medusa_logits(config, tensors, h), heads(h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("format", ["medusa", "vllm"])
def test_round_trip_through_a_serving_format_is_bit_identical(tmp_path, format):
    model = base()
    heads = trained_heads(model, 3, 1)
    heads.save_pretrained(tmp_path / "ours")
    DraftHeads.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / format, format=format)
    back = DraftHeads.from_pretrained(tmp_path / format, model)
    assert back.config == heads.config
    h = states()
    assert torch.equal(back(h), heads(h))
    assert torch.equal(load_drafter(tmp_path / format, model)(h), heads(h))  # the CLI's loader reads it too


def test_shared_output_heads_load_back_with_identical_logits(tmp_path):
    model = base()
    heads = trained_heads(model, 2, 1, shared_output=True)
    heads.save_pretrained(tmp_path / "m", format="medusa")
    back = DraftHeads.from_pretrained(tmp_path / "m", model)
    assert not back.config.shared_output  # Medusa stores an output layer per head: copies of the base's
    assert torch.allclose(back(states()), heads(states()), atol=1e-5, rtol=1e-5)


def test_hand_written_checkpoints_load_as_their_loaders_run_them(tmp_path):
    """Directories written here from each format's definition, not by our exporter: a vLLM one without biases
    and with original_lm_head, a Medusa one with two different layers per head."""
    g = torch.Generator().manual_seed(3)
    r = lambda *shape: 0.1 * torch.randn(*shape, generator=g)  # noqa: E731
    vllm = {f"blocks.{k}.layers.{i}.weight": r(64, 64) for k in range(2) for i in range(2)}
    vllm["lm_head.weight"] = r(48, 64)
    vllm_config = {"model_type": "medusa", "num_heads": 2, "num_hidden_layers": 2, "hidden_size": 64,
                   "vocab_size": 48, "original_lm_head": True}  # fmt: skip
    (tmp_path / "v").mkdir()
    save_file(vllm, tmp_path / "v" / "model.safetensors")
    (tmp_path / "v" / "config.json").write_text(json.dumps(vllm_config))
    medusa = {f"{k}.{i}.linear.{p}": r(64, 64) if p == "weight" else r(64) for k in range(3) for i in range(2)
              for p in ("weight", "bias")} | {f"{k}.2.weight": r(48, 64) for k in range(3)}  # fmt: skip
    medusa_config = {"medusa_num_heads": 3, "medusa_num_layers": 2, "base_model_name_or_path": BASE}
    (tmp_path / "m").mkdir()
    save_file(medusa, tmp_path / "m" / "medusa_lm_head.safetensors")
    (tmp_path / "m" / "config.json").write_text(json.dumps(medusa_config))
    h, model = states(), base()
    heads = DraftHeads.from_pretrained(tmp_path / "v", model)
    assert torch.allclose(heads(h), vllm_logits(vllm_config, vllm, h), atol=1e-5, rtol=1e-5)
    assert torch.equal(heads.block_bias, torch.zeros(2, 2, 64))
    heads = DraftHeads.from_pretrained(tmp_path / "m", model)
    assert heads.config.base_model == BASE and heads.config.num_layers == 2
    assert torch.allclose(heads(h), medusa_logits(medusa_config, medusa, h), atol=1e-5, rtol=1e-5)


def test_medusa_without_output_layers_reads_the_base_output_layer(tmp_path):
    """TGI's Medusa-2 layout: blocks only, every head feeds the base's lm_head."""
    model = base()
    heads = trained_heads(model, 3, 1, shared_output=True)
    heads.save_pretrained(tmp_path / "m", format="medusa")
    path = tmp_path / "m" / "medusa_lm_head.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "linear" in k}, path)
    with pytest.raises(ValueError, match=r"no tensor '0.1.weight'.*from_pretrained\(directory, model\)"):
        DraftHeads.from_pretrained(tmp_path / "m")
    back = DraftHeads.from_pretrained(tmp_path / "m", model)
    assert back.config.shared_output and back.config.vocab_size == 48
    assert torch.equal(back(states()), heads(states()))


def test_formats_refuse_what_they_cannot_hold(tmp_path):
    model = base()
    root = trained_heads(model, 2, 1, root_token=True)
    for format in ("vllm", "medusa"):
        with pytest.raises(ValueError, match=f"format '{format}' cannot hold root-token heads"):
            root.save_pretrained(tmp_path / format, format=format)
    drafter = FeatureDrafter.from_model(model, depth=2)
    for format in ("vllm", "medusa"):
        with pytest.raises(ValueError, match=f"format '{format}' cannot hold a feature drafter.*parent-aware"):
            drafter.save_pretrained(tmp_path / format, format=format)
    with pytest.raises(ValueError, match=r"format 'eagle' cannot hold the feature drafter exactly.*RMSNorm is not"):
        drafter.save_pretrained(tmp_path / "e", format="eagle")
    with pytest.raises(ValueError, match="draft heads are not one"):
        trained_heads(model, 2, 1).save_pretrained(tmp_path / "e", format="eagle")
    unbound = DraftHeads(trained_heads(model, 2, 1, shared_output=True).config)
    with pytest.raises(ValueError, match="call heads.bind"):
        unbound.save_pretrained(tmp_path / "u", format="vllm")
    nameless = trained_heads(model, 2, 1)
    nameless.config.base_model = ""
    with pytest.raises(ValueError, match="needs base_model_name_or_path"):
        nameless.save_pretrained(tmp_path / "n", format="medusa")
    for module in (nameless, drafter):
        with pytest.raises(ValueError, match="unknown draft-model format 'onnx'; known formats: vadusa, vllm, medusa"):
            module.save_pretrained(tmp_path / "x", format="onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written by any refused save


def test_broken_medusa_directories_name_the_file_and_key(tmp_path):
    model = base()
    trained_heads(model, 3, 1).save_pretrained(tmp_path / "m", format="medusa")
    path = tmp_path / "m" / "medusa_lm_head.safetensors"
    good = load_file(path)
    save_file({k: v for k, v in good.items() if k != "1.0.linear.bias"}, path)
    with pytest.raises(ValueError, match=r"medusa_lm_head.safetensors has no tensor '1.0.linear.bias'"):
        DraftHeads.from_pretrained(tmp_path / "m")
    save_file(good | {"2.0.linear.weight": torch.zeros(64, 65)}, path)
    with pytest.raises(ValueError, match=r"tensor '2.0.linear.weight' has shape \(64, 65\), expected 64x64"):
        DraftHeads.from_pretrained(tmp_path / "m")
    save_file(good | {"2.1.weight": torch.zeros(40, 64)}, path)
    with pytest.raises(ValueError, match=r"tensor '2.1.weight' has shape \(40, 64\), expected 48x64"):
        DraftHeads.from_pretrained(tmp_path / "m")
    save_file(good, path)
    (tmp_path / "m" / "config.json").write_text(json.dumps({"medusa_num_heads": 3}))
    with pytest.raises(ValueError, match=r"config.json needs 'medusa_num_layers'"):
        DraftHeads.from_pretrained(tmp_path / "m")
    path.rename(tmp_path / "m" / "medusa_lm_head.pt")
    with pytest.raises(ValueError, match="medusa_lm_head.pt is a pickle, which vadusa never loads"):
        DraftHeads.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"num_heads": 3, "hidden": 64}))
    (tmp_path / "m" / "medusa_lm_head.pt").unlink()
    save_file(good, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="not a valid heads config of any known format"):
        DraftHeads.from_pretrained(tmp_path / "m")


def test_exports_replace_a_directory_whole_or_not_at_all(tmp_path, monkeypatch):
    model = base()
    first, second = trained_heads(model, 2, 1), trained_heads(model, 3, 1)
    first.save_pretrained(tmp_path / "v", format="vllm")
    second.save_pretrained(tmp_path / "v", format="vllm")  # a second export replaces the first one
    assert DraftHeads.from_pretrained(tmp_path / "v").config.num_heads == 3
    before = (tmp_path / "v" / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(formats, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        first.save_pretrained(tmp_path / "v", format="vllm")
    assert (tmp_path / "v" / "model.safetensors").read_bytes() == before  # the old export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]  # and no temporary directory is left
    monkeypatch.undo()
    first.save_pretrained(tmp_path / "v", format="medusa")  # a vllm export is replaced by a medusa one
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["config.json", "medusa_lm_head.safetensors"]
    (tmp_path / "v" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds config.json, medusa_lm_head.safetensors, notes.txt, not an earlier"):
        first.save_pretrained(tmp_path / "v", format="medusa")
    assert (tmp_path / "v" / "notes.txt").read_text() == "mine"
    first.save_pretrained(tmp_path / "ours")  # vadusa's own heads are never replaced by an export
    with pytest.raises(ValueError, match="not an earlier vllm or medusa export"):
        first.save_pretrained(tmp_path / "ours", format="vllm")
    assert DraftHeads.from_pretrained(tmp_path / "ours").config == first.config


def test_medusa_heads_drive_the_vadusa_decoder(tmp_path):
    """Heads read from a Medusa directory decode through a tree: greedy output == greedy AR, several tokens/step."""
    model = base()
    heads = fitted_heads(model, num_heads=3, steps=30)
    heads.config.base_model = BASE
    heads.save_pretrained(tmp_path / "m", format="medusa")
    tree = Tree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    run = build_decoder("vadusa", model, heads=tmp_path / "m", tree=tree, acceptance="greedy")
    prompt = torch.tensor([TEST_PROMPT])
    out = run(prompt, max_new_tokens=60, temperature=0)
    ar = generate_ar(model, prompt, max_new_tokens=60, temperature=0)
    assert torch.equal(out.sequences, ar.sequences)
    assert out.forward_passes <= 0.75 * ar.forward_passes, (out.forward_passes, ar.forward_passes)


def test_medusa_warns_only_when_its_own_model_would_misread_the_layers(tmp_path):
    heads = trained_heads(base(), 2, 2)
    with torch.no_grad():
        heads.block_weight[:, 0] = heads.block_weight[:, 1]
        heads.block_bias[:, 0] = heads.block_bias[:, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal layers: Medusa's [ResBlock] * n reads them right, no warning
        heads.save_pretrained(tmp_path / "same", format="medusa")
    with torch.no_grad():
        heads.block_bias[1, 0] += 1.0
    with pytest.warns(UserWarning, match="last layer repeated"):
        heads.save_pretrained(tmp_path / "differ", format="medusa")

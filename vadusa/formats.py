"""Serving formats of draft heads: vLLM's Medusa draft model and FasterDecoding Medusa heads (TGI, TensorRT-LLM).

Both hold heads of exactly our math: head k is `num_layers` blocks x <- x + SiLU(W x + b) on the base's last
hidden state (after the final norm, the input of the base's output layer), then an output layer (V, D)
without bias, and it predicts the token two positions after the one that state predicts (head 0: x_{t+2}).

    vadusa   config.json (HeadsConfig) + model.safetensors (stacked (H, L, D, D) weights)
    vllm     config.json {model_type: "medusa", num_heads, num_hidden_layers, hidden_size, vocab_size,
             truncated_vocab_size, medusa_fc_bias, original_lm_head} + model.safetensors with
             blocks.{h}.layers.{l}.weight / .bias and lm_heads.{h}.weight (or one lm_head.weight when
             original_lm_head: a single output layer, read from the checkpoint, shared by every head)
    medusa   config.json {medusa_num_heads, medusa_num_layers, base_model_name_or_path} +
             medusa_lm_head.safetensors with {h}.{l}.linear.weight / .bias and {h}.{L}.weight

What the formats cannot hold is refused, naming the format and the reason: root-token heads (no input
for the drawn root token) and the feature drafter (its drafts read the token chosen above them; Medusa
loaders run independent heads on one hidden state). format="eagle" (vLLM's EAGLE draft layers) is known
and refused: no EAGLE layout computes the feature drafter's function (`EAGLE_REFUSAL` says why).
Exports are written into a temporary directory that is then renamed into place. Reading:
`read_serving(directory, format)` gives the config fields and the state dict of `DraftHeads` for a vLLM or
Medusa directory (`detect` tells which; pickled `medusa_lm_head.pt` files are refused: safetensors only).
"""

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from .artifacts import read_json_object, read_safetensors

FORMATS = ("vadusa", "vllm", "medusa")  # the formats `DraftHeads.save_pretrained` writes
CONFIG = "config.json"
VLLM_WEIGHTS = "model.safetensors"  # vLLM loads every *.safetensors of the directory; we write this one
MEDUSA_WEIGHTS = "medusa_lm_head.safetensors"  # the name TGI, TensorRT-LLM and Medusa's training script use
MEDUSA_PICKLE = "medusa_lm_head.pt"
EXPORT_FILES = {CONFIG, VLLM_WEIGHTS, MEDUSA_WEIGHTS}  # the files of an earlier export, which a new one replaces


EAGLE_REFUSAL = (
    "format 'eagle' cannot hold the feature drafter exactly: vLLM's EAGLE-1 layer (llama_eagle.py) feeds "
    "fc([E(x); f]) to attention without an input norm and returns the unnormalised residual stream (no final "
    "norm), while the feature drafter normalises fc([E(x); f]) before attention (attn_norm) and its output "
    "(out_norm); vLLM's EAGLE-3 layer (llama_eagle3.py) normalises E(x) and f separately, feeds their 2D-wide "
    "concatenation to q/k/v, keeps f alone as the residual and carries the pre-norm stream to the next depth. "
    "RMSNorm is not linear, so no weights of either layout give the drafter's logits; save it with format='vadusa'"
)


def check_format(format: str) -> None:
    if format not in FORMATS and format != "eagle":  # "eagle" is known, and refused with its reason
        raise ValueError(f"unknown draft-model format {format!r}; known formats: {', '.join(FORMATS)}")


def refuse_feature_drafter(format: str) -> None:
    """The feature drafter has its own artifact only: say why a serving format cannot hold it."""
    check_format(format)
    if format == "eagle":
        raise ValueError(EAGLE_REFUSAL)
    if format != "vadusa":
        raise ValueError(
            f"format {format!r} cannot hold a feature drafter: its heads are independent Medusa heads on one "
            "hidden state, while the feature drafter is parent-aware (each depth reads the token and the "
            "feature chosen above it, through its own attention layer); save it with format='vadusa'"
        )


def check_exportable(heads, format: str) -> None:
    """Raise a clear error when `heads` cannot be written exactly in `format`."""
    check_format(format)
    c = heads.config
    if format == "vadusa":
        return
    if format == "eagle":
        raise ValueError(
            "format 'eagle' holds an EAGLE draft layer (vLLM's methods 'eagle' / 'eagle3'); draft heads are not one: "
            "export them with format='vllm' (vLLM's method 'medusa')"
        )
    if c.root_token:
        raise ValueError(
            f"format {format!r} cannot hold root-token heads (root_token=True): its heads read only the hidden "
            "state, and it has no place for the root-token embedding nor a way to feed the drawn root token"
        )
    if c.shared_output and heads.shared_weight is None:
        raise ValueError(
            f"format {format!r} stores the output layer of shared_output heads, which these heads do not hold: "
            "call heads.bind(model) first"
        )
    if format == "medusa" and not c.base_model:
        raise ValueError(
            "format 'medusa' needs base_model_name_or_path, which these heads lack (config.base_model is empty): "
            "set heads.config.base_model to the base model's hub name or path first"
        )


def private_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().clone()  # a private copy: safetensors refuses shared storage


def vllm_export(heads) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, tensors) of vLLM's Medusa draft model (vllm/model_executor/models/medusa.py)."""
    c = heads.config
    config = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "truncated_vocab_size": c.vocab_size,  # no token_map: the full vocabulary
        "num_heads": c.num_heads,
        "num_hidden_layers": c.num_layers,
        "medusa_fc_bias": True,  # vLLM's blocks default to no bias; ours always have one
        "original_lm_head": c.shared_output,  # one output layer for every head
        "base_model_name_or_path": c.base_model,
    }
    tensors = {}
    for h in range(c.num_heads):
        for layer in range(c.num_layers):
            tensors[f"blocks.{h}.layers.{layer}.weight"] = private_copy(heads.block_weight[h, layer])  # (D_out, D_in)
            tensors[f"blocks.{h}.layers.{layer}.bias"] = private_copy(heads.block_bias[h, layer])  # (D,)
        if not c.shared_output:
            tensors[f"lm_heads.{h}.weight"] = private_copy(heads.out_weight[h])  # (V, D)
    if c.shared_output:
        tensors["lm_head.weight"] = private_copy(heads.shared_weight.to(heads.dtype))  # (V, D) the base's own layer
    return config, tensors


def medusa_export(heads) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, tensors) of FasterDecoding Medusa heads (medusa_lm_head.safetensors)."""
    c = heads.config
    config = {
        "medusa_num_heads": c.num_heads,
        "medusa_num_layers": c.num_layers,
        "base_model_name_or_path": c.base_model,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
    }
    tensors = {}
    for h in range(c.num_heads):
        for layer in range(c.num_layers):
            tensors[f"{h}.{layer}.linear.weight"] = private_copy(heads.block_weight[h, layer])  # (D_out, D_in)
            tensors[f"{h}.{layer}.linear.bias"] = private_copy(heads.block_bias[h, layer])  # (D,)
        out = heads.shared_weight.to(heads.dtype) if c.shared_output else heads.out_weight[h]
        tensors[f"{h}.{c.num_layers}.weight"] = private_copy(out)  # (V, D): shared output layers written per head
    w, b = heads.block_weight.detach(), heads.block_bias.detach()  # (H, L, D, D), (H, L, D)
    if c.num_layers > 1 and ((w != w[:, -1:]).any() or (b != b[:, -1:]).any()):  # layers differ within a head
        warnings.warn(
            "FasterDecoding's own MedusaModel builds each head's layers as one repeated block ([ResBlock] * n), "
            "so it runs these heads with their last layer repeated; TGI and TensorRT-LLM read every layer",
            stacklevel=3,
        )
    return config, tensors


def export(heads, directory: str | os.PathLike, format: str) -> None:
    """Write `heads` to `directory` in serving `format` ("vllm" or "medusa"): a temp directory, then a rename."""
    check_exportable(heads, format)
    config, tensors = vllm_export(heads) if format == "vllm" else medusa_export(heads)
    weights = VLLM_WEIGHTS if format == "vllm" else MEDUSA_WEIGHTS
    target = Path(directory)
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"cannot export {format!r} heads to {target}: it is a file, expected a directory")
        held = sorted(p.name for p in target.iterdir())
        if held and (detect(target) is None or not set(held) <= EXPORT_FILES):  # only an old export is replaced
            raise ValueError(
                f"cannot export {format!r} heads to {target}: it holds {', '.join(held)}, not an earlier vllm or "
                "medusa export, and an export replaces the whole directory; choose a new or empty directory"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = target.with_name(f".{target.name}.tmp-{tag}")
    try:
        tmp.mkdir()
        save_file(tensors, tmp / weights, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        swap_in(tmp, target, tag)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(tmp: Path, target: Path, tag: str) -> None:
    """Rename the finished `tmp` directory to `target`; an old `target` is moved aside first, then deleted."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{tag}")
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


# ----- reading -----
def detect(directory: Path) -> str | None:
    """The serving format ("vllm" or "medusa") `directory` holds; None otherwise (vadusa's own, or nothing)."""
    config = read_json_object(directory / CONFIG) if (directory / CONFIG).is_file() else {}
    if (directory / MEDUSA_WEIGHTS).is_file() or (directory / MEDUSA_PICKLE).is_file():
        return "medusa"
    if any(k.startswith("medusa_num") for k in config):
        return "medusa"
    if config.get("model_type") == "medusa":
        return "vllm"
    return None


def config_int(config: dict, key: str, path: Path, minimum: int) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{path} needs {key!r}, an integer >= {minimum}; got {value!r}")
    return value


def take(tensors: dict, key: str, shape: tuple, path: Path) -> torch.Tensor:
    """tensors[key] checked to exist with `shape` (None entries: any size)."""
    if key not in tensors:
        raise ValueError(f"{path} has no tensor {key!r} (the config asks for it)")
    t = tensors[key]
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape, strict=True)):
        expected = "x".join("?" if s is None else str(s) for s in shape)
        raise ValueError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, expected {expected}")
    return t


def per_head(tensors: dict, template: str, shape: tuple, path: Path, heads: int, layers: int | None = None):
    """(H, *shape) from keys template.format(h=...), or (H, L, *shape) from template.format(h=..., l=...)."""
    if layers is None:
        return torch.stack([take(tensors, template.format(h=h), shape, path) for h in range(heads)])
    rows = [[take(tensors, template.format(h=h, l=i), shape, path) for i in range(layers)] for h in range(heads)]
    return torch.stack([torch.stack(r) for r in rows]) if layers else torch.zeros(heads, 0, *shape)


def read_medusa(directory: Path, vocab_size: int | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HeadsConfig fields, DraftHeads state dict) of a FasterDecoding Medusa directory.

    Without output layers ({h}.{L}.weight) the heads feed the base's own output layer (TGI's Medusa-2 layout):
    they load as shared_output heads, and `vocab_size` (from the model) is needed."""
    path = directory / MEDUSA_WEIGHTS
    if not path.is_file():
        if (directory / MEDUSA_PICKLE).is_file():
            raise ValueError(
                f"{directory / MEDUSA_PICKLE} is a pickle, which vadusa never loads (safetensors only): convert it "
                f"to {MEDUSA_WEIGHTS} with safetensors' save_file, only if you trust its source"
            )
        raise FileNotFoundError(f"Medusa heads directory {directory} has no {MEDUSA_WEIGHTS}")
    if not (directory / CONFIG).is_file():
        raise FileNotFoundError(f"Medusa heads directory {directory} has no {CONFIG}")
    config = read_json_object(directory / CONFIG)
    heads = config_int(config, "medusa_num_heads", directory / CONFIG, 1)
    layers = config_int(config, "medusa_num_layers", directory / CONFIG, 0)
    tensors = read_safetensors(path)
    out = "{h}." + f"{layers}.weight"  # the output layer follows the blocks in Medusa's nn.Sequential
    shared = not any(out.format(h=h) in tensors for h in range(heads))
    if shared and (layers != 1 or vocab_size is None):
        raise ValueError(
            f"{path} has no tensor {out.format(h=0)!r}: without output layers, its heads feed the base's own "
            "output layer (TGI's Medusa-2 layout), which needs medusa_num_layers 1 and the model: "
            "DraftHeads.from_pretrained(directory, model)"
        )
    first = take(tensors, "0.0.linear.weight" if shared else out.format(h=0), (None, None), path)  # (., D)
    dim = first.shape[1]
    state = {
        "block_weight": per_head(tensors, "{h}.{l}.linear.weight", (dim, dim), path, heads, layers),
        "block_bias": per_head(tensors, "{h}.{l}.linear.bias", (dim,), path, heads, layers),
    }
    if not shared:
        state["out_weight"] = per_head(tensors, out, (first.shape[0], dim), path, heads)
    vocab = vocab_size if shared else first.shape[0]
    fields = dict(num_heads=heads, num_layers=layers, hidden_size=dim, vocab_size=vocab,
                  base_model=str(config.get("base_model_name_or_path") or ""), shared_output=shared)  # fmt: skip
    return fields, state


def read_vllm(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HeadsConfig fields, DraftHeads state dict) of a vLLM Medusa directory (model_type "medusa")."""
    path = directory / CONFIG
    config = read_json_object(path)
    heads = config_int(config, "num_heads", path, 1)
    layers = config_int(config, "num_hidden_layers", path, 0)
    dim = config_int(config, "hidden_size", path, 1)
    vocab = config_int(config, "vocab_size", path, 1)
    truncated = config.get("truncated_vocab_size") or vocab
    if truncated != vocab:
        raise ValueError(
            f"{path} has truncated_vocab_size {truncated} < vocab_size {vocab} (a token_map): those heads give -inf "
            "outside the map, which draft heads with a full output layer cannot represent"
        )
    files = sorted(directory.glob("*.safetensors"))  # vLLM reads them all
    if not files:
        raise FileNotFoundError(f"vLLM Medusa directory {directory} has no *.safetensors file")
    tensors = {}
    for f in files:
        tensors.update({k.removeprefix("medusa_heads."): v for k, v in read_safetensors(f).items()})
    where = files[0] if len(files) == 1 else directory
    state = {"block_weight": per_head(tensors, "blocks.{h}.layers.{l}.weight", (dim, dim), where, heads, layers)}
    if config.get("medusa_fc_bias", False):
        state["block_bias"] = per_head(tensors, "blocks.{h}.layers.{l}.bias", (dim,), where, heads, layers)
    else:  # vLLM's blocks without bias are ours with a zero bias
        state["block_bias"] = torch.zeros(heads, layers, dim, dtype=state["block_weight"].dtype)
    if config.get("original_lm_head", False):  # one output layer stored once, read by every head: a copy each
        key = "lm_head.weight" if "lm_head.weight" in tensors else "lm_heads.0.weight"
        state["out_weight"] = take(tensors, key, (vocab, dim), where).expand(heads, -1, -1).clone()
    else:
        state["out_weight"] = per_head(tensors, "lm_heads.{h}.weight", (vocab, dim), where, heads)
    fields = dict(num_heads=heads, num_layers=layers, hidden_size=dim, vocab_size=vocab,
                  base_model=str(config.get("base_model_name_or_path") or ""))  # fmt: skip
    return fields, state


def read_serving(directory: Path, format: str, vocab_size: int | None = None):
    """(HeadsConfig fields, state dict) of a `format` ("vllm" | "medusa") directory, checked key by key."""
    return read_medusa(directory, vocab_size) if format == "medusa" else read_vllm(directory)

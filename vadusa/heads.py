"""Draft heads: H independent residual MLPs on the base model's last hidden state, one output layer each.

Head k (0-based) reads the hidden state h_t of the last token x_t and predicts x_{t+2+k}: the base's
own output layer already predicts x_{t+1}. Each head is `num_layers` blocks x + SiLU(W x + b) with W
zero-initialised, then Linear(hidden, vocab) initialised as a copy of the base output layer, so a fresh
head reproduces the base distribution. Weights are stacked along a leading head axis: every head has
its own slice (no sharing), and all heads run in one batched matmul.

With `root_token`, the heads also read x_{t+1} itself, the root the decoder has already drawn from the
base before drafting (Medusa heads never see it): x = h_t + E[x_{t+1}], E a learned (V, D) embedding
shared by the heads and zero-initialised, so fresh heads still reproduce the base. When the base samples,
the root is the one token of the future that is already known, and head 0's target follows it directly.

`save_pretrained(d, format="vllm" | "medusa")` writes the serving formats of `vadusa.formats`, and
`from_pretrained` reads them back (FasterDecoding Medusa checkpoints included).
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import formats
from .artifacts import config_from_json, read_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class HeadsConfig:
    num_heads: int = 4  # H: head k predicts the token k+2 positions after the last accepted one
    num_layers: int = 1  # residual SiLU blocks per head before its output layer
    hidden_size: int = 0  # the base model's hidden size the heads read
    vocab_size: int = 0  # the base model's vocabulary size the heads write
    base_model: str = ""  # name or path of the base model the heads were built for ("" = unknown)
    root_token: bool = False  # heads also read the root token x_{t+1} through a learned embedding (module doc)
    shared_output: bool = False  # heads feed the base's own output layer: no private (H, V, D) weights


MAX_SIZE = 2**31  # bound of every size in a config (tensor dimensions are int64; larger is a typo)


def check_sizes(config: HeadsConfig, where: str = "heads config") -> None:
    """Sizes in [1, MAX_SIZE) (num_layers in [0, MAX_SIZE)), else a ValueError naming `where`."""
    for name, low in (("num_heads", 1), ("num_layers", 0), ("hidden_size", 1), ("vocab_size", 1)):
        value = getattr(config, name)
        if type(value) is not int or not low <= value < MAX_SIZE:
            raise ValueError(f"{where} needs {name} an integer in [{low}, {MAX_SIZE}), got {value!r}")


def save_artifact(module: nn.Module, directory: str | os.PathLike) -> None:
    """`module.config` -> config.json and its state dict -> model.safetensors, each written atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, d / (WEIGHTS_NAME + ".tmp"), metadata={"format": "pt"})
    os.replace(d / (WEIGHTS_NAME + ".tmp"), d / WEIGHTS_NAME)
    (d / (CONFIG_NAME + ".tmp")).write_text(json.dumps(asdict(module.config), indent=2))
    os.replace(d / (CONFIG_NAME + ".tmp"), d / CONFIG_NAME)


def load_weights(module: nn.Module, directory: Path) -> None:
    """Load directory/model.safetensors into `module`; corrupt or mismatched files raise ValueError naming them."""
    state = read_safetensors(directory / WEIGHTS_NAME)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{directory / WEIGHTS_NAME} does not match {directory / CONFIG_NAME}: {e}") from e


def check_weight_shapes(build, directory: Path) -> None:
    """Compare the tensors `build()` would hold (built on the meta device: no memory) with the header of
    directory/model.safetensors, before anything is allocated: a config.json asking for other (or huge)
    sizes raises a ValueError naming both files instead of allocating them."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    except RuntimeError as e:  # "Storage size calculation overflowed": sizes whose product exceeds int64
        raise ValueError(f"{directory / CONFIG_NAME} asks for tensors too large to exist: {e}") from e
    found = read_safetensors(directory / WEIGHTS_NAME, shapes_only=True)
    if expected != found:
        diff = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        key = diff[0]
        raise ValueError(
            f"{directory / WEIGHTS_NAME} does not match {directory / CONFIG_NAME}: tensor {key!r} has shape "
            f"{found.get(key, 'absent')} in the file, the config asks for {expected.get(key, 'none')}"
        )


def model_dims(model) -> tuple[int, int, str]:
    """(hidden size, vocab size, name or path) of a transformers causal LM, read off its output layer."""
    out = model.get_output_embeddings()
    vocab, hidden = out.weight.shape
    return hidden, vocab, str(getattr(model.config, "_name_or_path", "") or "")


def reduced_precision(model) -> bool:
    """Whether the model's output layer is held in bfloat16 or float16. A fingerprint of its float32 weights
    (a feature drafter's, a block adapter's) cannot be recomputed from the rounded ones, so an artifact trained on
    the float32 base is then checked by shape alone."""
    return model.get_output_embeddings().weight.dtype in (torch.bfloat16, torch.float16)


class DraftHeads(nn.Module):
    def __init__(self, config: HeadsConfig):
        super().__init__()
        check_sizes(config)
        self.config = config
        h, n, d, v = config.num_heads, config.num_layers, config.hidden_size, config.vocab_size
        self.block_weight = nn.Parameter(torch.zeros(h, n, d, d))  # (H, L, D_out, D_in), zero: blocks start as identity
        self.block_bias = nn.Parameter(torch.zeros(h, n, d))  # (H, L, D)
        if not config.shared_output:
            self.out_weight = nn.Parameter(torch.zeros(h, v, d))  # (H, V, D)
        self.shared_weight = None  # (V, D) the base's output layer when shared_output (bound, never saved)
        if config.root_token:
            self.root_embed = nn.Parameter(torch.zeros(v, d))  # (V, D), zero: fresh heads ignore the root

    @classmethod
    def from_model(
        cls, model, num_heads: int = 4, num_layers: int = 1, root_token: bool = False, shared_output: bool = False
    ) -> "DraftHeads":
        """Fresh heads for `model`: residual blocks at zero, output layers copied from the base (or shared)."""
        hidden, vocab, name = model_dims(model)
        heads = cls(HeadsConfig(num_heads, num_layers, hidden, vocab, name, root_token, shared_output))
        base_out = model.get_output_embeddings().weight.detach()
        if shared_output:
            heads.bind(model)
        else:
            with torch.no_grad():
                heads.out_weight.copy_(base_out.to(heads.out_weight.dtype).expand(num_heads, -1, -1))
        return heads.to(base_out.device)

    def bind(self, model) -> "DraftHeads":
        """Read logits through `model`'s output layer (shared_output heads; a no-op for heads with their own)."""
        if self.config.shared_output:  # a detached view: not a parameter of the heads, never trained or saved
            self.shared_weight = model.get_output_embeddings().weight.detach()
        return self

    @property
    def max_depth(self) -> int:
        """The deepest tree these heads can fill (one head per depth)."""
        return self.config.num_heads

    @property
    def dtype(self) -> torch.dtype:
        return self.block_weight.dtype

    def check_compatible(self, model) -> None:
        """Raise a clear error if these heads were built for a model of another shape or name."""
        hidden, vocab, name = model_dims(model)
        c = self.config
        if c.hidden_size != hidden:
            raise ValueError(f"heads were built for hidden size {c.hidden_size}, the model has {hidden}")
        if c.vocab_size != vocab:
            raise ValueError(f"heads were built for vocabulary size {c.vocab_size}, the model has {vocab}")
        if c.base_model and name and Path(c.base_model).name != Path(name).name:
            raise ValueError(f"heads were built for base model {c.base_model!r}, the model is {name!r}")

    def hidden(self, h: torch.Tensor, roots: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D) states [and (...) root ids] -> (..., H, D): each head's residual blocks on the same input."""
        if self.config.root_token:
            if roots is None:
                raise ValueError("these heads read the root token (root_token=True): pass roots, the drawn x_{t+1}")
            h = h + self.root_embed[roots]  # (..., D)
        x = h.unsqueeze(-2).expand(*h.shape[:-1], self.config.num_heads, h.shape[-1])  # (..., H, D)
        for layer in range(self.config.num_layers):
            w, b = self.block_weight[:, layer], self.block_bias[:, layer]  # (H, D, D), (H, D)
            x = x + nn.functional.silu(torch.einsum("...hi,hoi->...ho", x, w) + b)
        return x

    def forward(self, h: torch.Tensor, roots: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D) states [and (...) root ids, read only by root_token heads] -> (..., H, V) logits of every head."""
        x = self.hidden(h, roots)  # (..., H, D)
        if not self.config.shared_output:
            return torch.einsum("...hd,hvd->...hv", x, self.out_weight)
        if self.shared_weight is None:
            raise ValueError("shared_output heads read the base's output layer: call heads.bind(model) first")
        return x @ self.shared_weight.to(x.dtype).T  # (..., H, V)

    # ----- artifacts -----
    def save_pretrained(self, directory: str | os.PathLike, format: str = "vadusa") -> None:
        """Write the heads to `directory` in `format` (`vadusa.formats`):

        "vadusa": config.json + model.safetensors, each written atomically (write then rename);
        "vllm": vLLM's Medusa draft model, for speculative_config={"method": "medusa", "model": directory};
        "medusa": FasterDecoding Medusa heads (medusa_lm_head.safetensors), read by TGI and TensorRT-LLM.
        The serving formats are written into a temporary directory renamed into place; heads they cannot
        hold exactly (root-token heads, unbound shared_output heads) are refused with the reason."""
        formats.check_format(format)
        if format == "vadusa":
            save_artifact(self, directory)
        else:
            formats.export(self, directory, format)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model=None) -> "DraftHeads":
        """Load heads saved by `save_pretrained` in any format, or FasterDecoding Medusa heads (config.json +
        medusa_lm_head.safetensors) or a vLLM Medusa directory; with `model`, check they were built for it."""
        d = Path(directory)
        serving = formats.detect(d) if d.is_dir() else None
        if serving is not None:
            vocab = model.get_output_embeddings().weight.shape[0] if model is not None else None
            fields, state = formats.read_serving(d, serving, vocab)
            heads = cls(HeadsConfig(**fields))
            heads.to(state.get("out_weight", state["block_bias"]).dtype).load_state_dict(state)  # the file's dtype
        else:
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                if not (d / name).is_file():
                    raise FileNotFoundError(f"draft heads directory {d} has no {name}")
            try:
                config = config_from_json(HeadsConfig, d / CONFIG_NAME)
            except ValueError as e:
                raise ValueError(
                    f"{e} (not a valid heads config of any known format: {', '.join(formats.FORMATS)}; "
                    "Medusa configs have medusa_num_heads, vLLM's model_type 'medusa')"
                ) from e
            check_sizes(config, str(d / CONFIG_NAME))
            check_weight_shapes(lambda: cls(config), d)  # before allocating: the config may ask for any size
            heads = cls(config)
            load_weights(heads, d)
        if model is not None:
            heads.check_compatible(model)
            heads.to(model.get_output_embeddings().weight.device).bind(model)
        return heads

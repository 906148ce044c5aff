"""The student: the base LM + a small peft LoRA + a mask token, saved as a peft adapter directory.

    student = make_student(model, BlockConfig.for_model(model, mask_token_id=0, block_size=4), rank=8)
    save_adapter(student, config, "out/block")     # adapter_config.json, adapter_model.safetensors, block_config.json
    merged, config = load_student(model, "out/block")   # a merged copy of the base; the base is untouched

Mask token: a token id of the base vocabulary that never occurs in the text the model reads or writes
(a reserved id), named in `block_config.json`. No vocabulary row is added: a new row would change the
output layer (tied embeddings add a logit) and the teacher would no longer be the student at block
size 1. The demo LM uses its `<pad>` id. Its input embedding stays frozen; the LoRA learns to read it.

Token shift: the student keeps the base's next-token alignment (the prediction for position i is read
at position i - 1), so at block size 1 (no mask token in any window) and with the LoRA at its initial
value (B = 0) the student is exactly the auto-regressive teacher.

Teacher prefix (`BlockConfig.teacher_prefix`): the LoRA acts only on the current block's window; the
committed prefix goes through the base's weights, so the KV cache is the base's own and each block's
first target is drawn from the base's exact distribution. At block size 1 such a student decodes
exactly like the base whatever its LoRA.
"""

import copy
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from ..artifacts import config_from_json, read_json_object, read_safetensors
from ..heads import reduced_precision

CONFIG_NAME = "block_config.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def base_fingerprint(model) -> str:
    """A short hash of the base model's shapes and input embeddings: an adapter is only loaded on its own base."""
    emb = model.get_input_embeddings().weight.detach().float()
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters() if "lora_" not in name]
    summary = f"{sorted(shapes)}|{emb.abs().sum().item():.5e}|{emb[:, 0].sum().item():.5e}"
    return hashlib.sha256(summary.encode()).hexdigest()[:16]


@dataclass
class BlockConfig:
    mask_token_id: int  # reserved id of the base vocabulary fed at masked positions
    block_size: int  # block size the adapter was distilled for (the decoder's default)
    vocab_size: int  # the base's vocabulary size
    base_fingerprint: str  # base_fingerprint(base) at training time; checked on load
    causal_clean: bool = False  # committed blocks attend causally (else bidirectionally within the block)
    teacher_prefix: bool = False  # the base runs the prefix (LoRA off): its cache and each block's first target
    training: dict = field(default_factory=dict)  # how the adapter was made (config, steps, tokens seen)

    @classmethod
    def for_model(
        cls, model, mask_token_id: int | None, block_size: int, causal_clean: bool = False, teacher_prefix: bool = False
    ) -> "BlockConfig":
        vocab = model.get_input_embeddings().weight.shape[0]
        check_mask_token(mask_token_id, vocab)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        return cls(
            int(mask_token_id),
            int(block_size),
            int(vocab),
            base_fingerprint(model),
            bool(causal_clean),
            bool(teacher_prefix),
        )

    def save(self, directory: Path) -> None:
        tmp = Path(directory) / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, Path(directory) / CONFIG_NAME)

    @classmethod
    def load(cls, directory: Path) -> "BlockConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a block-distillation adapter directory")
        config = config_from_json(cls, path)
        if config.block_size < 1 or config.vocab_size < 1:
            raise ValueError(
                f"{path}: block_size, vocab_size must be >= 1, got {config.block_size}, {config.vocab_size}"
            )
        return config


def check_mask_token(mask_token_id, vocab_size: int) -> None:
    if mask_token_id is None:
        raise ValueError(
            "missing mask token: block decoding needs a reserved token id of the base vocabulary (e.g. its pad id)"
        )
    if not 0 <= int(mask_token_id) < vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab_size})")


def make_student(model, rank: int = 8, alpha: float = 16.0, target_modules: str | list[str] = "all-linear"):
    """Wrap `model` (in place) with a fresh LoRA whose B matrices are zero: the student starts as the teacher."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, bias="none")
    return get_peft_model(model, config)


def save_adapter(student, config: BlockConfig, directory: str | os.PathLike) -> Path:
    """peft adapter files + block_config.json into `directory`, atomically (a temp dir swapped in)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    student.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "README.md").unlink(missing_ok=True)  # peft's model-card template
    adapter_config = json.loads((tmp / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = None  # no machine paths; block_config.json names the base
    if isinstance(adapter_config.get("target_modules"), list):  # a set in peft: sorted for reproducible files
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    config.save(tmp)
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def check_adapter(model, directory: Path, same_base: bool = True) -> BlockConfig:
    """The adapter's BlockConfig, after checking that it exists and was made for this base model (by vocabulary
    alone when the base is in bfloat16 / float16: `reduced_precision`, or when `same_base` is False: a warm
    start may come from an earlier version of the base, such as the demo LM before its fine-tune)."""
    directory = Path(directory)
    missing = [f for f in ADAPTER_FILES if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"block adapter directory {directory} lacks {missing}")
    read_json_object(directory / ADAPTER_FILES[0])  # peft's own errors would not name a broken file
    read_safetensors(directory / ADAPTER_FILES[1])
    config = BlockConfig.load(directory)
    vocab = model.get_input_embeddings().weight.shape[0]
    other_base = same_base and config.base_fingerprint != base_fingerprint(model) and not reduced_precision(model)
    if config.vocab_size != vocab or other_base:
        raise ValueError(
            f"the block adapter in {directory} was distilled for another base model (fingerprint "
            f"{config.base_fingerprint}, vocabulary {config.vocab_size}); this model has fingerprint "
            f"{base_fingerprint(model)}, vocabulary {vocab}"
        )
    try:
        check_mask_token(config.mask_token_id, vocab)
    except ValueError as e:
        raise ValueError(f"{directory / CONFIG_NAME}: {e}") from e
    return config


def load_student(model, directory: str | os.PathLike):
    """(student, BlockConfig): the adapter in `directory` merged into a copy of `model` (left untouched).

    The student is a transformers model of the base's class; its config carries `mask_token_id`,
    `block_causal_clean` and `block_teacher_prefix`, which `vadusa.blockdiff.generate` reads. In a
    teacher-prefix student every adapted layer is a `TwoWayLinear`: the leading `student.base_tokens.count`
    tokens of a forward go through the base alone.
    """
    config = check_adapter(model, Path(directory))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(directory))
    two_way = {}
    if config.teacher_prefix:
        split = BaseTokens()
        for name, module in peft_model.base_model.model.named_modules():
            if isinstance(module, LoraLinear):
                a = module.lora_A["default"].weight.detach()  # (r, in)
                b = module.lora_B["default"].weight.detach() * module.scaling["default"]  # (out, r)
                two_way[name] = TwoWayLinear(module.base_layer, a, b, split)
    merged = peft_model.merge_and_unload()
    for name, layer in two_way.items():
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent), child, layer)
    if two_way:
        merged.base_tokens = split
    merged.config.mask_token_id = config.mask_token_id
    merged.config.block_causal_clean = config.causal_clean
    merged.config.block_teacher_prefix = config.teacher_prefix
    return merged.eval().requires_grad_(False), config


class BaseTokens:
    """Shared by a student's `TwoWayLinear` layers: how many leading tokens of the next forward are the base's."""

    count: int = 0


class TwoWayLinear(nn.Module):
    """A linear layer that is the base for the first `split.count` tokens of its (N, T, D) input and the
    student (base + LoRA) for the rest. One base matmul plus the low-rank update on the student's tokens:
    reading a second full weight matrix instead costs more on a CPU (measured on the demo LM)."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, split: BaseTokens):
        super().__init__()
        weight = base.weight.detach()  # (out, in)
        self.base_weight = nn.Parameter(weight.clone(), requires_grad=False)  # (out, in)
        self.weight = nn.Parameter(weight + lora_b @ lora_a, requires_grad=False)  # (out, in) merged student
        self.lora_a = nn.Parameter(lora_a.t().contiguous(), requires_grad=False)  # (in, r)
        self.lora_b = nn.Parameter(lora_b.t().contiguous(), requires_grad=False)  # (r, out), scaling folded in
        self.bias = base.bias  # (out,) or None: the LoRA leaves it alone
        self.split = split

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, in) -> (N, T, out)
        c = self.split.count
        if c <= 0:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.base_weight, self.bias)  # (N, T, out)
        if c < x.shape[-2]:
            for xn, yn in zip(x, y, strict=True):  # (T, in), (T, out): decoding has N = 1
                yn[c:].addmm_(xn[c:] @ self.lora_a, self.lora_b)  # in place: the student's low-rank update
        return y

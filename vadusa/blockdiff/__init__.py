"""Block distillation: the codec LM, LoRA-distilled from itself into a block-causal mask predictor.

    merged, config = load_student(model, "assets/demo/block")
    out = generate(merged, input_ids, block_size=config.block_size, threshold=0.02, max_new_tokens=500)

Modules: masks (attention masks), student (LoRA + mask token, adapter files), loss (generalised JSD),
train (data-free distillation), generate (confidence-threshold block decoding).
"""

from .generate import generate
from .loss import generalized_jsd

__all__ = ["BlockConfig", "generalized_jsd", "generate", "load_student", "make_student", "save_adapter"]
_STUDENT = ("BlockConfig", "load_student", "make_student", "save_adapter")  # need peft: imported on first use


def __getattr__(name: str):
    if name in _STUDENT:
        from . import student  # peft costs seconds of start-up; decoding without an adapter never pays it

        return getattr(student, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

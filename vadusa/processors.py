"""Logits processors as the decoders call them: a lean list, and whether a processor reads the history.

A tree node's processors must see the history the node would have in auto-regressive decoding (the
prefix plus its own path). Processors that ignore input_ids say so with `reads_history = False` (the demo's
units-only mask); the decoders then call them once on every row at once.
"""

import torch
from transformers import LogitsProcessorList


class Processors(LogitsProcessorList):
    """A LogitsProcessorList that calls its processors directly: transformers' own reads every processor's
    signature on every call (~30 us each here, a few % of a demo AR step). Decoding passes no extra kwargs."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


def as_processor(logits_processor) -> Processors | None:
    """None, a processor list or an iterable of processors -> `Processors` (None when empty)."""
    return Processors(logits_processor) if logits_processor else None


def reads_history(processor) -> bool:
    """Whether any processor may read input_ids (only ones that say `reads_history = False` do not)."""
    return any(getattr(p, "reads_history", True) for p in processor)

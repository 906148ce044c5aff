"""One small module per real TTS pipeline: its token layout, its sampling defaults, and logits processors that
reproduce its constraints exactly, so greedy VADUSA is the pipeline's greedy loop and lossless VADUSA samples
the pipeline's own distribution.

    from vadusa.integrations import llasa, orpheus, cosyvoice2, spark_tts

Every module has a frozen `Layout` dataclass (defaults: the real pipeline's ids), `SAMPLING` (its own
`model.generate` sampling arguments) and `generate_kwargs(layout, ...)`: the keyword arguments for
`model.generate(..., custom_generate=vadusa.custom_generate, draft_heads=heads, **generate_kwargs(...))`.
Processors are transformers `LogitsProcessor`s: `(input_ids (N, t), scores (N, V)) -> scores`; the engine calls
them on every tree node with that node's own history, and the ones that ignore the history say
`reads_history = False`.
"""

import torch
from transformers import LogitsProcessor


class TokenRange(LogitsProcessor):
    """Only tokens in [start, stop) and the `extra` ids (e.g. the end of speech) may be generated."""

    reads_history = False

    def __init__(self, start: int, stop: int, extra: tuple[int, ...] = ()):
        if not 0 <= start < stop:
            raise ValueError(f"token range needs 0 <= start < stop, got [{start}, {stop})")
        self.start, self.stop, self.extra = start, stop, tuple(int(e) for e in extra)
        self._mask = None  # (V,) bool, True where banned (built on first call, per vocabulary size)

    def mask(self, vocab: int, device) -> torch.Tensor:
        if self._mask is None or self._mask.shape[0] != vocab or self._mask.device != device:
            banned = torch.ones(vocab, dtype=torch.bool, device=device)
            banned[self.start : self.stop] = False
            banned[list(self.extra)] = False
            self._mask = banned
        return self._mask

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(self.mask(scores.shape[-1], scores.device), float("-inf"))


__all__ = ["TokenRange"]

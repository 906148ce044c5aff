"""Orpheus TTS (Canopy Labs): a Llama-3.2-3B causal LM writing SNAC codes, 7 tokens per frame.

Layout: audio token i = 128256 + i; position j (0..6) of a frame holds code c of its codebook as
128266 + j * 4096 + c; 128258 ends the speech. Orpheus samples with `do_sample=True, temperature=0.6,
top_p=0.95, repetition_penalty=1.1` (>= 1.1 is required for stable speech), `max_new_tokens=1200`.
`FrameCodes` holds every generated position to its own codebook range (and lets the end token come only at
a frame boundary): it reads the position off the history length, so every tree node gets its own range.

    from vadusa.integrations import orpheus
    ids = model.generate(input_ids, custom_generate=vadusa.custom_generate, draft_heads=heads, tree="auto",
                         acceptance="tolerance", tolerance=3, **orpheus.generate_kwargs(input_ids.shape[1]))
    frames = orpheus.snac_frames(ids[0, input_ids.shape[1]:])   # (F, 7) codes -> SNAC's three layers

Heads for it (prompts: Orpheus-formatted text prompts, one per line):
    python train_heads.py --model canopylabs/orpheus-3b-0.1-ft --prompts orpheus_prompts.txt \\
        --cache runs/orpheus-cache --train --out runs/orpheus-heads --shared-output
    python train_heads.py --model canopylabs/orpheus-3b-0.1-ft --out runs/orpheus-heads --accuracy --heldout held.txt
    python train_heads.py --model canopylabs/orpheus-3b-0.1-ft --out runs/orpheus-heads --build-trees --name orpheus
"""

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor


@dataclass(frozen=True)
class Layout:
    code_start: int = 128266  # code c at frame position j is code_start + j * codebook + c
    codebook: int = 4096  # codes per position
    frame: int = 7  # tokens per SNAC frame
    end_of_speech: int = 128258  # the EOS
    vocab_size: int = 156940  # the LM's vocabulary


SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "repetition_penalty": 1.1, "max_new_tokens": 1200}


class FrameCodes(LogitsProcessor):
    """Generated position i may only hold a code of frame position i % 7 (its 4,096-token range); the end of
    speech may only come at a frame boundary. `prompt_len` is the number of prompt ids in input_ids."""

    def __init__(self, prompt_len: int, layout: Layout = Layout()):
        self.prompt_len, self.layout = prompt_len, layout
        self._masks = {}  # (vocab, device) -> (frame, V) bool, True where banned

    def masks(self, vocab: int, device) -> torch.Tensor:
        key = (vocab, str(device))
        if key not in self._masks:
            lay = self.layout
            banned = torch.ones(lay.frame, vocab, dtype=torch.bool, device=device)
            for j in range(lay.frame):
                start = lay.code_start + j * lay.codebook
                banned[j, start : start + lay.codebook] = False
            banned[0, lay.end_of_speech] = False
            self._masks[key] = banned
        return self._masks[key]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        position = (input_ids.shape[-1] - self.prompt_len) % self.layout.frame  # same for every row of a call
        return scores.masked_fill(self.masks(scores.shape[-1], scores.device)[position], float("-inf"))


def logits_processor(prompt_len: int, layout: Layout = Layout(), repetition_penalty: float | None = None) -> list:
    """The frame-code constraint (and, for callers of the engine directly, Orpheus's repetition penalty first)."""
    penalty = [RepetitionPenaltyLogitsProcessor(repetition_penalty)] if repetition_penalty else []
    return penalty + [FrameCodes(prompt_len, layout)]


def generate_kwargs(prompt_len: int, layout: Layout = Layout(), **overrides) -> dict:
    """`model.generate` keyword arguments of Orpheus's sampling (its repetition penalty is generate's own)."""
    kw = {"eos_token_id": layout.end_of_speech, "logits_processor": logits_processor(prompt_len, layout)}
    return SAMPLING | kw | overrides


def snac_frames(tokens: torch.Tensor, layout: Layout = Layout()) -> torch.Tensor:
    """Generated ids -> (F, 7) codes in 0..4095, whole frames only (the end token and a partial frame dropped)."""
    tokens = tokens[tokens != layout.end_of_speech]
    usable = tokens[: len(tokens) // layout.frame * layout.frame].reshape(-1, layout.frame)
    return usable - layout.code_start - layout.codebook * torch.arange(layout.frame, device=tokens.device)

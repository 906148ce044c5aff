"""The demo codec LM's vocabulary and model: a stock `transformers.LlamaForCausalLM`.

One vocabulary: specials, voice tokens, rate tokens, phoneme symbols, then the K unit tokens last.
A training sequence is

    <bos> <voice:us_male> <rate:normal> p h o n e m e s <sep> u17 u902 ... <eos>

and the prompt of a synthesis is everything up to and including <sep>.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor

from ..artifacts import config_from_json

SPECIALS = ["<pad>", "<bos>", "<sep>", "<eos>"]


@dataclass
class Vocab:
    voices: list[str]  # voice names, one token each
    rates: list[str]  # speaking-rate names, one token each
    phonemes: list[str]  # espeak phoneme symbols, ' ' (word break) and clause punctuation
    num_units: int  # codec units K: tokens unit_offset .. unit_offset + K - 1
    tokens: list[str] = field(init=False)  # every token string, index = id

    def __post_init__(self):
        self.tokens = (
            SPECIALS
            + [f"<voice:{v}>" for v in self.voices]
            + [f"<rate:{r}>" for r in self.rates]
            + list(self.phonemes)
            + [f"<u{i}>" for i in range(self.num_units)]
        )
        self.index = {t: i for i, t in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ValueError("vocabulary has duplicate tokens")

    def __len__(self) -> int:
        return len(self.tokens)

    pad = property(lambda self: self.index["<pad>"])
    bos = property(lambda self: self.index["<bos>"])
    sep = property(lambda self: self.index["<sep>"])
    eos = property(lambda self: self.index["<eos>"])
    unit_offset = property(lambda self: len(self.tokens) - self.num_units)

    def prompt_ids(self, phonemes: list[str], voice: str, rate: str) -> list[int]:
        """<bos> voice rate phonemes <sep>; phoneme symbols never seen in training are dropped."""
        if voice not in self.voices:
            raise ValueError(f"unknown voice {voice!r}; expected one of {self.voices}")
        if rate not in self.rates:
            raise ValueError(f"unknown rate {rate!r}; expected one of {self.rates}")
        body = [self.index[p] for p in phonemes if p in self.index and p not in SPECIALS]
        return [self.bos, self.index[f"<voice:{voice}>"], self.index[f"<rate:{rate}>"], *body, self.sep]

    def sequence_ids(self, phonemes: list[str], voice: str, rate: str, units: torch.Tensor) -> list[int]:
        """A whole training sequence: prompt, units shifted to their token ids, <eos>."""
        return self.prompt_ids(phonemes, voice, rate) + (units + self.unit_offset).tolist() + [self.eos]

    def to_json(self) -> dict:
        return {"voices": self.voices, "rates": self.rates, "phonemes": self.phonemes, "num_units": self.num_units}

    def save(self, path: Path) -> None:
        from .store import write_json

        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "Vocab":
        return config_from_json(cls, Path(path))


@dataclass
class LMConfig:
    layers: int = 4  # decoder layers
    width: int = 256  # hidden size
    heads: int = 4  # attention heads (key/value heads the same)
    mlp: int = 768  # MLP intermediate size
    max_positions: int = 640  # longest prompt + units (text <= 300 chars, about 8 s of speech at most)


def make_model(vocab: Vocab, cfg: LMConfig) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        bos_token_id=vocab.bos,
        eos_token_id=vocab.eos,
        pad_token_id=vocab.pad,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(config)


def lm_config_dict(cfg: LMConfig) -> dict:
    return asdict(cfg)


class UnitsOnly(LogitsProcessor):
    """Restricts sampling to unit tokens and EOS (every other logit -> -inf). It ignores the history, and says
    so (`reads_history = False`), so the decoders may process every tree node in one call."""

    reads_history = False

    def __init__(self, unit_offset: int, num_units: int, eos_token_id: int, vocab_size: int):
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        allowed[unit_offset : unit_offset + num_units] = True
        allowed[eos_token_id] = True
        self.blocked = ~allowed  # (V,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(self.blocked.to(scores.device), float("-inf"))  # (B, V)

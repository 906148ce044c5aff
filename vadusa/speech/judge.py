"""The judge: a small CTC recogniser (log-mel -> characters) that scores speech by character error rate.

    judge = Judge.from_pretrained(d)
    judge.transcribe(wav, 16000)          # -> 'hello world'
    judge.cer(wav, 16000, "Hello, world.") # -> 0.0 .. (edit distance / reference characters)

conv (50 -> 25 frames/s) + bidirectional GRU + linear over JUDGE_CHARS plus the CTC blank (index 0).
Log-mels are mean-normalised per utterance (per band), so gain differences between espeak audio
and vocoded audio do not matter.
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import jiwer
import torch
from torch import nn

from ..artifacts import config_from_json
from .audio import MEL, log_mel
from .store import read_tensors, write_json, write_tensors
from .text import JUDGE_CHARS, judge_text


@dataclass
class JudgeConfig:
    n_mels: int = MEL.n_mels  # input log-mel bands
    channels: int = 256  # conv channels
    hidden: int = 192  # GRU hidden size per direction
    layers: int = 2  # GRU layers
    vocab: int = len(JUDGE_CHARS) + 1  # characters + the CTC blank
    scale: float = 2.5  # divide normalised log-mels by this


def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences (insertions, deletions, substitutions cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate of `hypothesis` against `reference`, both compared as judge text (jiwer)."""
    ref, hyp = judge_text(reference), judge_text(hypothesis)
    if not ref:
        raise ValueError(f"reference {reference!r} has no letters to score against")
    return float(jiwer.cer(ref, hyp)) if hyp else 1.0


def encode_text(text: str) -> torch.Tensor:
    """Judge text -> (L,) label ids in 1..len(JUDGE_CHARS) (0 is the CTC blank)."""
    return torch.tensor([JUDGE_CHARS.index(c) + 1 for c in judge_text(text)], dtype=torch.long)


def greedy_ctc(ids: torch.Tensor) -> str:
    """(T,) best-path label ids -> text: collapse repeats, drop blanks."""
    ids = torch.unique_consecutive(ids)
    return "".join(JUDGE_CHARS[i - 1] for i in ids.tolist() if i > 0).strip()


class Judge(nn.Module):
    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = c = config
        self.conv = nn.Sequential(
            nn.Conv1d(c.n_mels, c.channels, 5, padding=2),
            nn.GELU(),
            nn.Conv1d(c.channels, c.channels, 5, stride=2, padding=2),
            nn.GELU(),
        )
        self.rnn = nn.GRU(c.channels, c.hidden, c.layers, batch_first=True, bidirectional=True, dropout=0.1)
        self.out = nn.Linear(2 * c.hidden, c.vocab)

    @staticmethod
    def out_lengths(lengths: torch.Tensor) -> torch.Tensor:
        return (lengths + 1) // 2

    def normalise(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, M) padded log-mels -> per-utterance, per-band mean removed (padding stays 0), scaled."""
        mask = (torch.arange(mel.shape[1])[None] < lengths[:, None]).unsqueeze(-1)  # (B, T, 1)
        mean = (mel * mask).sum(1, keepdim=True) / lengths.clamp(min=1)[:, None, None]
        return (mel - mean) * mask / self.config.scale

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, M) log-mels, (B,) lengths -> (B, ceil(T / 2), V) log-probabilities."""
        x = self.conv(self.normalise(mel, lengths).transpose(1, 2)).transpose(1, 2)  # (B, T/2, C)
        packed = nn.utils.rnn.pack_padded_sequence(
            x, self.out_lengths(lengths).clamp(max=x.shape[1]), batch_first=True, enforce_sorted=False
        )
        y, _ = self.rnn(packed)
        y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])  # (B, T/2, 2H)
        return self.out(y).log_softmax(-1)

    @torch.no_grad()
    def transcribe_mels(self, mels: list[torch.Tensor]) -> list[str]:
        """Greedy CTC transcripts of a batch of (T, M) log-mels."""
        if not mels:
            return []
        lengths = torch.tensor([m.shape[0] for m in mels])
        padded = nn.utils.rnn.pad_sequence([m.float() for m in mels], batch_first=True)
        best = self(padded, lengths).argmax(-1)  # (B, T/2)
        return [greedy_ctc(b[:n]) for b, n in zip(best, self.out_lengths(lengths).tolist(), strict=True)]

    def transcribe(self, wav, sample_rate: int) -> str:
        if len(wav) < sample_rate // 10:  # under 0.1 s: nothing a recogniser could hear
            return ""
        mel = log_mel(wav, sample_rate)
        if mel.shape[0] < 4:
            return ""
        return self.transcribe_mels([mel])[0]

    def cer(self, wav, sample_rate: int, text: str) -> float:
        return cer(text, self.transcribe(wav, sample_rate))

    def save_pretrained(self, directory: Path, dtype: torch.dtype = torch.float16) -> None:
        """config.json + model.safetensors; weights stored in `dtype` (half by default: it is only a judge)."""
        directory = Path(directory)
        tensors = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in self.state_dict().items()}
        write_tensors(directory / "model.safetensors", tensors)
        write_json(directory / "config.json", asdict(self.config))

    @classmethod
    def from_pretrained(cls, directory: Path) -> "Judge":
        directory = Path(directory)
        judge = cls(config_from_json(JudgeConfig, directory / "config.json"))
        try:
            judge.load_state_dict(read_tensors(directory / "model.safetensors"))  # copies into float32 parameters
        except RuntimeError as e:  # missing or mis-shaped tensors
            raise ValueError(f"{directory / 'model.safetensors'} does not match its config.json: {e}") from e
        return judge.eval()

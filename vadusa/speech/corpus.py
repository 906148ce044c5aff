"""Corpus of the demo TTS: English sentences from Debian's `fortunes` files spoken by espeak-ng.

Nothing here is committed: the text is read from the system package at build time. Each sentence
is spoken once, by a voice and a speaking rate drawn from its hash, and kept as log-mel frames.

    sentences = read_sentences()                    # normalised, unique, sorted
    split_of("Some sentence.")                      # 'train' | 'valid' | 'test', fixed by the text
    item = synthesize(sentence)                     # {'text', 'voice', 'rate', 'phonemes', 'mel'}
    item = text_item(sentence)                      # the same without audio (a prompt for the LM)
"""

import hashlib
import os
import re
import tempfile
from pathlib import Path

import soundfile
import torch

from .audio import MEL, log_mel, resample
from .text import ALLOWED, check_text, espeak_lines, normalise, phonemize

FORTUNES = Path("/usr/share/games/fortunes")
VOICES = {"us_male": "en-us", "us_female": "en-us+f3", "gb_male": "en-gb"}  # voice name -> espeak-ng voice
RATES = {"slow": 145, "normal": 170, "fast": 200}  # rate name -> espeak-ng words per minute
DEFAULT_VOICE, DEFAULT_RATE = "us_male", "normal"
SPLITS = {"test": 0.02, "valid": 0.02}  # fraction of sentences held out, fixed by a hash of the text


def _digest(text: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.sha256((salt + text).encode()).digest()[:8], "big")


def split_of(sentence: str) -> str:
    """'train', 'valid' or 'test' for a sentence, stable across machines and corpus sizes."""
    u = _digest(sentence, "split") / 2**64
    if u < SPLITS["test"]:
        return "test"
    return "valid" if u < SPLITS["test"] + SPLITS["valid"] else "train"


def voice_rate_of(sentence: str) -> tuple[str, str]:
    """The (voice, rate) names a sentence is spoken with in the corpus, drawn from its hash."""
    h = _digest(sentence, "voice")
    return list(VOICES)[h % len(VOICES)], list(RATES)[(h // len(VOICES)) % len(RATES)]


def fortune_files(root: Path = FORTUNES) -> list[Path]:
    """The plain-text fortune files (not the .dat indexes, not the off/ directory)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: install Debian's `fortunes` package (apt install fortunes)")
    return sorted(p for p in root.iterdir() if p.is_file() and "." not in p.name)


def candidate_sentences(fortune: str) -> list[str]:
    """Split one fortune into sentences; drops attributions ('-- Author') and indented verse layout."""
    fortune = re.split(r"\n\s*--", fortune)[0]
    flat = " ".join(fortune.split())
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat) if s.strip()]


def usable(sentence: str, min_words: int = 4, max_chars: int = 140) -> bool:
    """A sentence the corpus keeps: plain characters, full stop / ? / ! at the end, 4 words to 140 chars."""
    if not (sentence[-1:] in ".?!" and sentence[:1].isupper()):
        return False
    if len(sentence) > max_chars or len(sentence.split()) < min_words or set(sentence) - ALLOWED:
        return False
    return not re.search(r"[A-Z]{2,}|[-']{2}|\b[b-hj-zB-HJ-Z]\.", sentence)  # acronyms, initials, odd marks


def read_sentences(root: Path = FORTUNES) -> list[str]:
    """Every usable, normalised, unique sentence of the fortune files, sorted."""
    found = set()
    for path in fortune_files(root):
        text = path.read_text(encoding="utf-8", errors="replace")
        for fortune in text.split("\n%\n"):
            for s in candidate_sentences(fortune):
                s = normalise(s)
                if usable(s):
                    found.add(s)
    return sorted(found)


def speak(text: str, voice: str, rate: str) -> tuple[torch.Tensor, list[str]]:
    """espeak-ng audio at 16 kHz (N,) float32 and its phoneme lines, from ONE espeak call."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a.wav")
        lines = espeak_lines(text, VOICES[voice], RATES[rate], wav_path=path)
        wav, sr = soundfile.read(path, dtype="float32")
    return resample(torch.from_numpy(wav) * 0.89, sr, MEL.sample_rate), lines  # 0.89: sox's `gain -1`


def synthesize(sentence: str, voice: str | None = None, rate: str | None = None) -> dict:
    """One corpus item: text, voice, rate, phoneme symbols and (T, 80) float16 log-mel."""
    text = check_text(sentence)
    if voice is None or rate is None:
        voice, rate = voice_rate_of(text)
    wav, lines = speak(text, voice, rate)
    phonemes = phonemize(text, VOICES[voice], RATES[rate], lines=lines)
    return {"text": text, "voice": voice, "rate": rate, "phonemes": phonemes, "mel": log_mel(wav).half()}


def text_item(sentence: str) -> dict:
    """`synthesize` without the audio: text, voice, rate and phoneme symbols (all a prompt of the LM needs)."""
    text = check_text(sentence)
    voice, rate = voice_rate_of(text)
    return {"text": text, "voice": voice, "rate": rate, "phonemes": phonemize(text, VOICES[voice], RATES[rate])}


def held_out_texts(split: str = "test", count: int | None = 20, root: Path = FORTUNES) -> list[str]:
    """Sentences of a split of the full build (the shipped model never trained on 'valid' or 'test').

    Read from the fortunes files at run time, in a fixed order, so harnesses get held-out texts
    without any third-party text being committed.
    """
    if split not in ("train", *SPLITS):
        raise ValueError(f"unknown split {split!r}; expected 'train', 'valid' or 'test'")
    chosen = [s for s in read_sentences(root) if split_of(s) == split]
    chosen.sort(key=lambda s: _digest(s, "order"))
    return chosen[:count]

"""Text side of the demo TTS: normalisation, clause splitting, espeak-ng phonemes, judge targets.

    normalise("“Hello” — world…")      -> 'Hello, world.'
    phonemize("Hello, world.", "en-us") -> ['h', '@', 'l', "'oU", ',', ' ', 'w', "'3:", 'l', 'd', '.']

Phonemes come from `espeak-ng -q -x --sep=_` run with the same voice as the audio (en-gb and en-us
differ). espeak writes one line per clause; in its notation `,` is secondary stress, so the
punctuation that closes each clause is added back as its own token. Words are separated by ' '.
"""

import re
import shutil
import subprocess
import unicodedata

PUNCTUATION = ",.?!;:"  # clause-closing punctuation kept as tokens of their own
ALLOWED = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ '-" + PUNCTUATION)
JUDGE_CHARS = " 'abcdefghijklmnopqrstuvwxyz"  # what the judge transcribes (CTC blank is index 0)
WORD = " "  # word-boundary token in the phoneme stream
MAX_CHARS = 200  # longest text accepted by the pipeline (training sentences have at most 140)

_REPLACE = {
    "\u2018": "'", "\u2019": "'", "`": "'", "\u201c": "", "\u201d": "", '"': "",
    "\u2013": ", ", "\u2014": ", ", "--": ", ", "\u2026": ".", "...": ".", "(": ", ", ")": ", ",
    "\t": " ", "\n": " ", "\r": " ",
}  # fmt: skip


def normalise(text: str) -> str:
    """Map typography to the plain character set (quotes, dashes, accents, spacing). Never raises."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    for a, b in _REPLACE.items():
        text = text.replace(a, b)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.?!;:])", r"\1", text)  # no space before punctuation
    text = re.sub(r"([,.?!;:])[,.?!;:]+", r"\1", text)  # one punctuation mark per break
    return text.strip(" ,;:")


def check_text(text: str, max_chars: int = MAX_CHARS) -> str:
    """Normalise `text` and raise a clear ValueError if it cannot be spoken; returns the normalised text."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    clean = normalise(text)
    if not any(c.isalpha() for c in clean):
        raise ValueError(f"text {text!r} is empty or has no letters: nothing to say")
    bad = sorted(set(clean) - ALLOWED)
    if bad:
        raise ValueError(
            f"text contains unsupported character(s) {bad}; the demo speaks letters, spaces, apostrophes,"
            f" hyphens and {PUNCTUATION!r} (spell numbers and symbols out as words)"
        )
    if len(clean) > max_chars:
        raise ValueError(
            f"text is {len(clean)} characters long after normalisation; the demo takes at most {max_chars}"
        )
    return clean


def clauses(text: str) -> list[tuple[str, str]]:
    """'Hi, you.' -> [('Hi', ','), ('you', '.')]; a text without final punctuation gets '' as its last mark."""
    parts = re.findall(r"([^,.?!;:]+)([,.?!;:]?)", text)
    return [(words.strip(), mark) for words, mark in parts if words.strip(" -'")]


def judge_text(text: str) -> str:
    """What the judge should hear: lower case letters, apostrophes and single spaces."""
    text = normalise(text).lower().replace("-", " ")
    text = "".join(c if c in JUDGE_CHARS else " " for c in text)
    return re.sub(r"\s+", " ", text).strip()


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("espeak-ng is not installed: the demo TTS needs it for phonemes (apt install espeak-ng)")
    return path


def espeak_lines(text: str, voice: str, rate: int, wav_path: str | None = None) -> list[str]:
    """espeak-ng's phoneme lines (one per clause) for `text`; also writes the 22,050 Hz wav if asked."""
    cmd = [espeak_binary(), "-v", voice, "-s", str(rate), "-x", "--sep=_"]
    cmd += ["-w", wav_path] if wav_path else ["-q"]
    done = subprocess.run(cmd + ["--", text], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"espeak-ng failed on {text!r} with voice {voice!r}: {done.stderr.strip()}")
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def line_symbols(line: str) -> list[str]:
    """ "h_@_l_'oU w_'3:l_d" -> ['h', '@', 'l', "'oU", ' ', 'w', "'3:", 'l', 'd']."""
    out = []
    for word in line.split():
        if out:
            out.append(WORD)
        out += [s for s in word.split("_") if s]
    return out


def join_clauses(lines: list[list[str]], marks: list[str]) -> list[str]:
    out = []
    for symbols, mark in zip(lines, marks, strict=True):
        if out:
            out.append(WORD)
        out += symbols + ([mark] if mark else [])
    return out


def phonemize(text: str, voice: str, rate: int = 175, lines: list[str] | None = None) -> list[str]:
    """Phoneme symbols of normalised `text` for `voice`, with clause punctuation as tokens.

    `lines` are espeak's lines for the whole text if already computed (the corpus gets them from the
    call that writes the audio). When espeak does not break where the punctuation is, each clause is
    phonemized on its own instead, so every mark still lands at its clause end.
    """
    parts = clauses(text)
    lines = espeak_lines(text, voice, rate) if lines is None else lines
    if len(lines) != len(parts):
        lines = [" ".join(espeak_lines(words, voice, rate)) for words, _ in parts]
    return join_clauses([line_symbols(line) for line in lines], [mark for _, mark in parts])

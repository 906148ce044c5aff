"""Short phrases of the demo corpus: what a person types first, one to three words.

The sentence corpus keeps only sentences of four words or more, so an LM trained on it alone has never
seen a one-word utterance ("No." came out as mush). These phrases fill that gap, in the training split
only; a fixed list of other short phrases is held out to measure them.

    read_phrases()          # every training phrase, sorted: common words, names, fortune fragments
    fragments("Well, I never did.")  -> ['Well.']   (pieces of 1-3 words between punctuation)
    HELD_OUT                # 40 short phrases never in the corpus, for the short-phrase CER

Fragments come only from fortune sentences of the training split, so no piece of a test or valid
sentence is trained on. Each phrase is spoken by espeak-ng in every voice and every rate.
"""

import re
from pathlib import Path

from . import corpus
from .text import ALLOWED, normalise

MAX_WORDS = 3  # longest phrase, in words
MAX_FRAGMENTS = 2400  # fortune fragments kept: all that occur twice or more, then singletons by hash

# One-word and two-word utterances people type first: answers, greetings, interjections, numbers.
COMMON = (
    "Yes. No. Hello. Hi. Hey. Okay. Thanks. Please. Sorry. Wait. Stop! Go! Sure. Great. Fine. Good. Bad. "
    "Right. Wrong. Really? What? Why? How? When? Where? Who? Now. Later. Never. Always. Again. Here. There. "
    "Done. Ready. Listen. Look. Run! Oh. Ah. Hmm. Huh? Ouch! Yay! Hooray! Bravo! Cheers. Alright. Nope. "
    "Yep. Indeed. Certainly. Of course. Good luck. Welcome back. Hello there. Hello, world. Thank you. "
    "No way. Yes, please. No, thanks. Not now. Me too. Good evening. Good afternoon. Bye. See you soon. "
    "Come on! Let's go. Watch out! Be quiet. Keep going. Try again. One. Two. Three. Four. Five. Six. "
    "Seven. Eight. Nine. Ten. Zero. Hundred. Monday. Friday. Sunday. Morning. Tonight. Coffee. Water. "
    "Music. Weather. Computer. Amazing! Terrible. Beautiful. Interesting. Congratulations! Excellent. "
    "Never mind. All right. I see. I know. I agree. Not sure. Why me? Almost. Enough! Nothing. Everything."
)
# First names, each said on its own.
NAMES = (
    "Anna. Emma. Sophia. Mia. Charlotte. Amelia. Harper. Ella. Grace. Chloe. Lucy. Alice. Hannah. Laura. "
    "Maria. Julia. Rose. Kate. Emily. Claire. James. John. Robert. David. William. Thomas. Daniel. Matthew. "
    "Anthony. Mark. Paul. Steven. Andrew. Joshua. Kevin. Brian. George. Edward. Peter. Henry. Jack. Oliver. "
    "Noah. Liam. Lucas. Ethan. Samuel. Benjamin. Alexander. Victor."
)
# Held out: never in the corpus (removed from the fragments too); 1-3 words, 15 / 15 / 10.
HELD_OUT = (
    "Maybe.", "Perfect.", "Absolutely.", "Goodbye.", "Welcome.", "Help!", "Wow!", "Oops.", "Careful!",
    "Tomorrow.", "Olivia.", "Michael.", "Seriously?", "Delicious.", "Exactly.",
    "Good morning.", "Not today.", "See you.", "Come here.", "Oh no!", "Right away.", "Good night.",
    "Well done.", "Excuse me.", "Hi, Sarah.", "Happy birthday!", "Sit down.", "Why not?", "Hurry up!",
    "Nice work.",
    "See you later.", "I love you.", "What is this?", "Where are you?", "Let's go home.", "Open the door.",
    "I am hungry.", "Call me back.", "How are you?", "Turn it off.",
)  # fmt: skip
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "adj", "inc", "ltd", "prof", "co"}


def key(phrase: str) -> str:
    """What makes two phrases the same: lower-case words, punctuation ignored ('Oh, no!' == 'oh no.')."""
    return " ".join(re.findall(r"[a-z'-]+", phrase.lower()))


def _split_list(text: str) -> list[str]:
    return re.findall(r"[^.?!]+[.?!]", text)


def fragments(sentence: str) -> list[str]:
    """Pieces of 1-3 plain words between punctuation marks, capitalised, ending in '.', '?' or '!'."""
    out = []
    for words, mark in re.findall(r"([^,.?!;:]+)([,.?!;:])", sentence):
        w = words.strip()
        tokens = w.split()
        if not 1 <= len(tokens) <= MAX_WORDS or set(w) - ALLOWED:
            continue
        if re.search(r"[A-Z]{2,}|[-']{2}|^[-']|[-']$", w) or any(len(t) == 1 and t not in "IaA" for t in tokens):
            continue
        if mark == "." and len(tokens) == 1 and tokens[0].lower() in _ABBREVIATIONS:
            continue  # 'Mr.' of 'Mr. Smith': an abbreviation, not an utterance
        out.append(w[0].upper() + w[1:] + (mark if mark in "?!" else "."))
    return out


def read_phrases(root: Path = corpus.FORTUNES) -> list[str]:
    """Every training phrase, sorted: COMMON, NAMES and fragments of training-split fortune sentences.

    A phrase whose key is a held-out phrase's is dropped, and so is one equal to a valid or test sentence.
    """
    counts: dict[str, int] = {}
    held_sentences = set()
    for path in corpus.fortune_files(root):
        text = path.read_text(encoding="utf-8", errors="replace")
        for fortune in text.split("\n%\n"):
            for s in corpus.candidate_sentences(fortune):
                s = normalise(s)
                if corpus.split_of(s) != "train":
                    held_sentences.add(key(s))
                    continue
                for f in fragments(s):
                    counts[f] = counts.get(f, 0) + 1
    frequent = sorted(f for f, n in counts.items() if n >= 2)
    rare = sorted((f for f, n in counts.items() if n < 2), key=lambda f: corpus._digest(f, "phrase"))
    chosen = frequent + rare[: max(0, MAX_FRAGMENTS - len(frequent))]
    banned = {key(p) for p in HELD_OUT} | held_sentences
    phrases, seen = [], set()
    for p in _split_list(COMMON) + _split_list(NAMES) + chosen:
        p = normalise(p)
        if key(p) not in banned and p not in seen:
            seen.add(p)
            phrases.append(p)
    return sorted(phrases)


def phrase_rows(phrases: list[str]) -> list[dict]:
    """One corpus row per phrase, voice and rate; every row in the training split."""
    return [
        {"text": p, "split": "train", "voice": v, "rate": r, "kind": "phrase"}
        for p in phrases
        for v in corpus.VOICES
        for r in corpus.RATES
    ]

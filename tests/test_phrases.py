"""Short phrases of the demo corpus: what they are, and that they only ever reach the training split."""

import pytest

from vadusa.speech import corpus, phrases
from vadusa.speech.text import check_text

WORDS = ["gently", "slowly", "quietly", "boldly", "warmly", "softly", "loudly", "calmly", "kindly", "wisely"]


def _fortunes(tmp_path, sentences):
    (tmp_path / "lines").write_text("\n%\n".join(sentences) + "\n")
    return tmp_path


def _sentences_by_split():
    """Fortune-like sentences 'The cat walked home, gently now.' and their corpus split."""
    found = {}
    for a in WORDS:
        for b in WORDS:
            s = f"The cat walked home, {a} {b}."
            found[s] = corpus.split_of(s)
    return found


def test_fragments_are_short_capitalised_and_closed():
    assert phrases.fragments("Well, I never did that again.") == ["Well."]
    assert phrases.fragments("Mr. Smith, come here! Why not?") == ["Smith.", "Come here!", "Why not?"]
    assert phrases.fragments("Call the FBI, now.") == ["Now."]  # acronyms dropped
    assert phrases.fragments("So, x marks it.") == ["So."]  # a single letter (not I or a) drops its piece
    for f in phrases.fragments("Oh, the humanity; the noise, the heat, the smell!"):
        assert 1 <= len(f.split()) <= phrases.MAX_WORDS and f[-1] in ".?!" and f[0].isupper()


def test_held_out_list_is_short_and_speakable():
    assert len(phrases.HELD_OUT) >= 30 and len(set(phrases.HELD_OUT)) == len(phrases.HELD_OUT)
    assert {len(p.split()) for p in phrases.HELD_OUT} == {1, 2, 3}
    for p in phrases.HELD_OUT:
        assert check_text(p) == p


def test_training_phrases_come_from_training_sentences_only(tmp_path):
    split = _sentences_by_split()
    assert {"train", "test", "valid"} <= set(split.values())  # the fixture has every split
    root = _fortunes(tmp_path, [*split, "Good morning, Anna sat down."])
    chosen = phrases.read_phrases(root)
    for s, where in split.items():
        tail = phrases.fragments(s)[-1]  # 'Gently slowly.': unique to its sentence
        assert (tail in chosen) == (where == "train"), (s, where)
    keys = {phrases.key(p) for p in chosen}
    assert not keys & {phrases.key(p) for p in phrases.HELD_OUT}  # 'Good morning.' is held out, even as a fragment
    assert {"No.", "Hello.", "Stop!", "Yes.", "Anna."} <= set(chosen)
    assert all(1 <= len(p.split()) <= phrases.MAX_WORDS for p in chosen)


def test_phrase_rows_are_every_voice_and_rate_in_the_train_split():
    rows = phrases.phrase_rows(["No.", "Thank you."])
    assert len(rows) == 2 * len(corpus.VOICES) * len(corpus.RATES)
    assert {r["split"] for r in rows} == {"train"} and {r["kind"] for r in rows} == {"phrase"}
    assert {(r["voice"], r["rate"]) for r in rows if r["text"] == "No."} == {
        (v, r) for v in corpus.VOICES for r in corpus.RATES
    }


@pytest.mark.parametrize("text", ["Oh, no!", "oh no.", "OH NO?"])
def test_key_ignores_case_and_punctuation(text):
    assert phrases.key(text) == "oh no"

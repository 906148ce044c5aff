"""Demo TTS parts on their own: text, phonemes, audio maths, codec, judge, vocabulary (fast, tiny)."""

import math
import shutil

import numpy as np
import pytest
import torch

from vadusa.speech import audio, codec, corpus, judge, lm, text

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


# ----- edit distance and CER -----
@pytest.mark.parametrize(
    "a, b, d",
    [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("flaw", "lawn", 2), ("same", "same", 0)],
)
def test_edit_distance_known_pairs(a, b, d):
    assert judge.edit_distance(a, b) == d


def test_cer_known_pairs():
    assert judge.cer("Hello, world.", "hello world") == 0.0  # punctuation and case are not judged
    assert judge.cer("hello world", "hello wrld") == pytest.approx(1 / 11)
    assert judge.cer("abcd", "xbcdy") == pytest.approx(2 / 4)
    assert judge.cer("abc", "") == 1.0
    with pytest.raises(ValueError, match="no letters"):
        judge.cer("...", "abc")


# ----- text -----
def test_normalise_maps_typography():
    assert text.normalise("\u201cCaf\u00e9\u201d \u2014 it\u2019s  fine\u2026") == "Cafe, it's fine."
    assert text.normalise("  a , b !!  ") == "a, b!"


@pytest.mark.parametrize(
    "bad, message",
    [("", "empty"), ("   \n ", "empty"), ("...", "empty"), ("I have 3 cats & 2 dogs", r"\['&', '2', '3'\]")],
)
def test_check_text_errors_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        text.check_text(bad)


def test_check_text_too_long():
    with pytest.raises(ValueError, match="at most 200"):
        text.check_text("word " * 100)


def test_clauses_and_judge_text():
    assert text.clauses("Hi, you there. Go!") == [("Hi", ","), ("you there", "."), ("Go", "!")]
    assert text.clauses("no end") == [("no end", "")]
    assert text.judge_text("Well-known, ISN'T it?") == "well known isn't it"


@needs_espeak
def test_phonemize_punctuation_tokens_and_voices():
    us = text.phonemize("Hello, world.", "en-us")
    assert us[-1] == "." and "," in us and us.count(text.WORD) == 1
    assert us[: us.index(",")] == ["h", "@", "l", "'oU"]
    assert "'A:" in text.phonemize("Tomato.", "en-gb") and "'eI" in text.phonemize("Tomato.", "en-us")


def test_line_symbols():
    assert text.line_symbols("h_@_l_'oU w_'3:_l_d") == ["h", "@", "l", "'oU", " ", "w", "'3:", "l", "d"]


@needs_espeak
def test_text_item_is_the_corpus_item_without_audio():
    """Distillation prompts phonemized on the spot read exactly as the corpus's (same voice, rate, symbols)."""
    sentence = "Never trust a computer you can't throw out a window."
    item, spoken = corpus.text_item(sentence), corpus.synthesize(sentence)
    assert {k: item[k] for k in ("text", "voice", "rate", "phonemes")} == {k: spoken[k] for k in item}
    assert (item["voice"], item["rate"]) == corpus.voice_rate_of(sentence) and len(item["phonemes"]) > 30


# ----- corpus -----
def test_splits_are_stable_and_sized():
    sentences = [f"Sentence number {i} is here." for i in range(4000)]
    splits = [corpus.split_of(s) for s in sentences]
    assert splits == [corpus.split_of(s) for s in sentences]
    assert 0.01 < splits.count("test") / 4000 < 0.03 and 0.01 < splits.count("valid") / 4000 < 0.03


def test_candidate_sentences_and_usable():
    fortune = "You will be rich.  Really!\n\tAnd happy too.\n\t\t-- Some Author, 1999"
    assert corpus.candidate_sentences(fortune) == ["You will be rich.", "Really!", "And happy too."]
    assert corpus.usable("You will be rich soon.")
    assert not corpus.usable("Too short.") and not corpus.usable("Call the FBI right now.")


# ----- audio -----
def test_resample_keeps_a_tone():
    sr, f = 22050, 440.0
    t = torch.arange(sr) / sr
    y = audio.resample(torch.sin(2 * math.pi * f * t), sr, 16000)
    assert y.shape == (16000,)
    spectrum = torch.fft.rfft(y[2000:14000]).abs()
    assert abs(spectrum.argmax().item() * 16000 / 12000 - f) < 2.0
    assert y[2000:14000].abs().max() == pytest.approx(1.0, abs=0.02)


def test_log_mel_shape_and_peak_band():
    t = torch.arange(16000) / 16000
    mel = audio.log_mel(0.5 * torch.sin(2 * math.pi * 1000 * t))
    assert mel.shape == (51, 80)
    centres = audio.mel_filterbank().argmax(1) * 16000 / 1024  # Hz at each band's peak
    assert abs(centres[mel[25].argmax()] - 1000) < 100


def test_griffin_lim_roundtrip_keeps_the_spectrum():
    gen = torch.Generator().manual_seed(0)
    wav = 0.3 * torch.sin(2 * math.pi * 300 * torch.arange(8000) / 16000) + 0.01 * torch.randn(8000, generator=gen)
    mel = audio.log_mel(wav)
    back = audio.mel_to_wav(mel, iters=32)
    assert back.dtype == np.float32 and abs(len(back) - 8000) <= 320
    err = (audio.log_mel(torch.from_numpy(back))[2:-2] - mel[2:-2]).abs().mean()
    assert err < 0.6, err


# ----- codec -----
def test_kmeans_finds_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = centres.repeat_interleave(200, 0) + 0.1 * torch.randn(600, 2, generator=gen)
    found = codec.kmeans(x, 3, iters=10)
    assert torch.cdist(found, centres).min(1).values.max() < 0.1


def test_codec_roundtrip_shapes_and_determinism(tmp_path):
    gen = torch.Generator().manual_seed(0)
    mels = [torch.randn(int(n), 80, generator=gen) - 4 for n in (41, 60, 33)]
    c = codec.UnitCodec.fit(mels, num_units=8)
    units = c.encode(mels[0])
    assert units.shape == (21,) and units.dtype == torch.long and units.max() < 8
    assert c.decode(units).shape == (42, 80)
    c.save_pretrained(tmp_path)
    c2 = codec.UnitCodec.from_pretrained(tmp_path)
    assert torch.equal(c2.encode(mels[0]), units)
    w1, sr = c.vocode(units)
    w2, _ = c2.vocode(units)
    assert sr == 16000 and np.array_equal(w1, w2) and len(w1) == 41 * 320
    with pytest.raises(ValueError, match="unit ids must be in"):
        c.decode(torch.tensor([0, 8]))


def test_stack_frames_pads_with_last_frame():
    mel = torch.arange(6.0).reshape(3, 2)
    assert codec.stack_frames(mel, 2).tolist() == [[0, 1, 2, 3], [4, 5, 4, 5]]


# ----- judge -----
def test_greedy_ctc_collapses_repeats_and_blanks():
    ids = [0, 9, 9, 0, 9, 6, 6, 0, 0, 1, 1, 0]  # 'h','h' -> 'h'; blank separates the two 'h's
    hello = "".join(text.JUDGE_CHARS[i - 1] for i in [9, 9, 6])
    assert judge.greedy_ctc(torch.tensor(ids)) == hello.strip()


def test_judge_shapes_and_save_load(tmp_path):
    torch.manual_seed(0)
    j = judge.Judge(judge.JudgeConfig(channels=16, hidden=8)).eval()
    mel = torch.randn(2, 30, 80)
    with torch.no_grad():
        out = j(mel, torch.tensor([30, 21]))
    assert out.shape == (2, 15, len(text.JUDGE_CHARS) + 1)
    assert torch.allclose(out.exp().sum(-1), torch.ones(2, 15), atol=1e-5)
    j.save_pretrained(tmp_path)
    j2 = judge.Judge.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(j2(mel, torch.tensor([30, 21])), out, atol=1e-2)  # stored in float16


def test_ctc_training_step_lowers_loss():
    torch.manual_seed(0)
    j = judge.Judge(judge.JudgeConfig(channels=16, hidden=16))
    mel, lengths = torch.randn(2, 40, 80), torch.tensor([40, 40])
    y = torch.cat([judge.encode_text("ab"), judge.encode_text("cd")])
    ctc = torch.nn.CTCLoss()
    opt = torch.optim.Adam(j.parameters(), 1e-2)
    losses = []
    for _ in range(20):
        loss = ctc(j(mel, lengths).transpose(0, 1), y, torch.tensor([20, 20]), torch.tensor([2, 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ----- vocabulary and logits processor -----
def test_vocab_layout_and_prompt():
    v = lm.Vocab(voices=["a", "b"], rates=["n"], phonemes=[" ", "h", "i", "."], num_units=5)
    assert len(v) == 4 + 2 + 1 + 4 + 5 and v.unit_offset == len(v) - 5
    ids = v.prompt_ids(["h", "i", "zz", "."], "b", "n")  # 'zz' never seen: dropped
    assert v.tokens[ids[0]] == "<bos>" and v.tokens[ids[-1]] == "<sep>"
    assert [v.tokens[i] for i in ids[1:-1]] == ["<voice:b>", "<rate:n>", "h", "i", "."]
    seq = v.sequence_ids(["h"], "a", "n", torch.tensor([0, 4]))
    assert seq[-3:] == [v.unit_offset, v.unit_offset + 4, v.eos]
    with pytest.raises(ValueError, match="unknown voice 'c'"):
        v.prompt_ids(["h"], "c", "n")


def test_units_only_processor():
    proc = lm.UnitsOnly(unit_offset=6, num_units=3, eos_token_id=2, vocab_size=9)
    scores = proc(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 9))
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [2, 6, 7, 8]


def test_warm_restart_schedule_continues_a_finished_run():
    """A second cosine cycle from `restart`: the first cycle is exactly a run of `restart` steps, then it re-warms."""
    from vadusa.speech.train import Schedule

    first, both = Schedule(100, 1e-3, 10), Schedule(300, 1e-3, 10, restart=100)
    assert [both.lr_at(s) for s in range(100)] == [first.lr_at(s) for s in range(100)]
    assert both.lr_at(99) == pytest.approx(1e-4, rel=0.01)  # cycle 1 ends at final * lr
    assert both.lr_at(100) == pytest.approx(1e-4) and both.lr_at(109) == pytest.approx(1e-3)  # warm-up again
    assert both.lr_at(299) == pytest.approx(1e-4, rel=0.01)
    second = [both.lr_at(s) for s in range(110, 300)]
    assert all(a >= b for a, b in zip(second, second[1:], strict=False))  # cosine decay, monotone

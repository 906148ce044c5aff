"""TTSPipeline and decode.py: a tiny random demo directory (fast), then the shipped weights."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from vadusa.cli import decode
from vadusa.speech import TTSPipeline, codec, judge, lm
from vadusa.speech.build import save_lm
from vadusa.speech.pipeline import DEMO_DIR, REQUIRED

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
ROOT = Path(__file__).resolve().parents[1]
PHONEMES = [" ", ",", ".", "?", "!", "h", "@", "l", "'oU", "w", "'3:", "d", "D", "E", "r", "'E"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random but complete demo directory: 1-layer LM, 16-unit codec, small judge."""
    d = tmp_path_factory.mktemp("tiny_demo")
    torch.manual_seed(0)
    vocab = lm.Vocab(voices=["us_male", "us_female", "gb_male"], rates=["slow", "normal", "fast"],
                     phonemes=PHONEMES, num_units=16)  # fmt: skip
    cfg = lm.LMConfig(layers=1, width=32, heads=2, mlp=64, max_positions=320)
    save_lm(lm.make_model(vocab, cfg), vocab, cfg, d / "lm")
    codec.UnitCodec(torch.randn(16, 160) - 4, codec.CodecConfig(num_units=16)).save_pretrained(d / "codec")
    judge.Judge(judge.JudgeConfig(channels=16, hidden=8)).save_pretrained(d / "judge")
    return d


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> TTSPipeline:
    return TTSPipeline.from_pretrained(tiny_dir)


def test_prompt_layout(tiny):
    ids = tiny.prompt("Hello, world.", voice="us_female")
    tokens = [tiny.vocab.tokens[i] for i in ids[0].tolist()]
    assert ids.dtype == torch.long and ids.shape[0] == 1
    assert tokens[:3] == ["<bos>", "<voice:us_female>", "<rate:normal>"] and tokens[-1] == "<sep>"
    assert tokens[3:-1] == ["h", "@", "l", "'oU", ",", " ", "w", "'3:", "l", "d", "."]


def test_synthesize_units_and_wav_agree(tiny):
    wav, sr, out = tiny.synthesize("Hello there.", seed=7, max_new_tokens=40)
    units = tiny.units(out)
    assert sr == 16000 and wav.dtype == np.float32
    assert out.new_tokens <= 40 and len(units) == out.new_tokens - int(out.tokens[-1] == tiny.eos_token_id)
    assert len(units) > 0 and units.min() >= 0 and units.max() < 16
    assert len(wav) == (2 * len(units) - 1) * 320
    wav2, _, out2 = tiny.synthesize("Hello there.", seed=7, max_new_tokens=40)
    assert torch.equal(out.sequences, out2.sequences) and np.array_equal(wav, wav2)  # seeded: reproducible
    every = [tiny.vocab.tokens[t] for t in out.tokens.tolist()]
    assert all(t.startswith("<u") or t == "<eos>" for t in every)  # the processor allows nothing else


def test_decoder_runs_are_cached_and_unknown_decoder_raises(tiny):
    tiny.synthesize("Hello.", seed=0, max_new_tokens=5)
    first = tiny.decoder("ar")
    tiny.synthesize("Hello.", seed=1, max_new_tokens=5)
    assert tiny.decoder("ar") is first
    with pytest.raises(ValueError, match="unknown decoder 'nope'"):
        tiny.synthesize("Hello.", decoder="nope")


def test_max_new_tokens_grows_with_text(tiny):
    short, long = tiny.max_new_tokens("Hello."), tiny.max_new_tokens("Hello there, hello world, hello hello.")
    assert 50 < short < long <= 320


@pytest.mark.parametrize(
    "text, voice, message",
    [
        ("", None, "empty"),
        ("   ", None, "empty"),
        ("Pay $5 now.", None, r"\['\$', '5'\]"),
        ("Hello.", "robot", "unknown voice 'robot'"),
        ("word " * 50, None, "at most 200"),
        ("Hello hello hello. " * 10, None, "too long for the demo model"),
    ],
)
def test_bad_input_raises_clear_errors(tiny, text, voice, message):
    with pytest.raises(ValueError, match=message):
        tiny.synthesize(text, voice=voice)


def test_missing_and_corrupt_directories(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        TTSPipeline.from_pretrained(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "lm" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        TTSPipeline.from_pretrained(broken)


def test_decode_cli_texts_json(tiny_dir, tmp_path, monkeypatch):
    texts = tmp_path / "texts.txt"
    texts.write_text("Hello there.\n\nHello world!\n")
    code = decode.main(["--texts", str(texts), "--out-dir", str(tmp_path / "wavs"), "--json", str(tmp_path / "s.json"),
                        "--model-dir", str(tiny_dir), "--seed", "0", "--decoder", "ar"])  # fmt: skip
    assert code == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    keys = {"cer", "audio_seconds", "new_tokens", "tokens_per_second", "rtf", "forward_passes"}
    assert len(stats["texts"]) == 2 and keys <= set(stats["texts"][0]) and keys <= set(stats["summary"]["mean"])
    row = stats["texts"][1]
    wav, sr = soundfile.read(row["wav"])
    assert sr == 16000 and len(wav) / sr == pytest.approx(row["audio_seconds"], abs=1e-3)
    assert row["forward_passes"] == row["new_tokens"]  # AR: prefill + one pass per further token
    assert decode.main(["Hello 42.", "-o", str(tmp_path / "x.wav"), "--model-dir", str(tiny_dir)]) == 2


def test_decode_cli_sampling_flags(tiny_dir, tmp_path):
    """--top-p / --min-p reach the decoder: a one-token nucleus samples the greedy (--temperature 0) speech."""

    def speak(name, *flags):
        argv = ["Hello there.", "-o", str(tmp_path / name), "--model-dir", str(tiny_dir), "--decoder", "ar"]
        assert decode.main(argv + list(flags)) == 0
        return soundfile.read(tmp_path / name)[0]

    greedy = speak("greedy.wav", "--temperature", "0")
    assert np.array_equal(speak("top_p.wav", "--seed", "0", "--top-p", "0.0001"), greedy)
    assert np.array_equal(speak("min_p.wav", "--seed", "0", "--min-p", "1", "--top-k", "5"), greedy)
    sampled = speak("sampled.wav", "--seed", "0")
    assert sampled.shape != greedy.shape or not np.array_equal(sampled, greedy)


# ----- the shipped demo -----
shipped = pytest.mark.skipif(
    not all((DEMO_DIR / f).is_file() for f in REQUIRED), reason="demo weights not built (scripts/build_demo.py)"
)


@shipped
def test_shipped_pipeline_speaks_a_known_sentence():
    pipe = TTSPipeline.from_pretrained()
    text = "The weather is nice today, so we will walk to the park."
    wav, sr, out = pipe.synthesize(text, seed=0)
    seconds = len(wav) / sr
    assert out.tokens[-1].item() == pipe.eos_token_id  # it stopped on its own
    assert 2.0 < seconds < 6.0, seconds  # espeak-ng says it in about 3.5 s at the default rate
    assert pipe.cer(wav, sr, text) < 0.2
    assert pipe.voices == ["us_male", "us_female", "gb_male"]


@shipped
def test_shipped_weights_fit_the_budget():
    """Everything shipped for the demo (lm, codec, judge, heads, block adapter) stays within 30 MB."""
    size = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert size <= 30e6, size


@shipped
def test_shipped_cli_default_decoder_speaks(tmp_path):
    """`decode.py TEXT -o a.wav` as a user first runs it: the default decoder (vadusa, shipped drafter)."""
    wav_path = tmp_path / "a.wav"
    assert decode.main(["Hello.", "-o", str(wav_path), "--seed", "0"]) == 0
    wav, sr = soundfile.read(wav_path)
    assert sr == 16000 and 0.2 < len(wav) / sr < 2.0


@shipped
def test_shipped_greedy_vadusa_equals_greedy_ar():
    """Through the pipeline (inference mode, drafter loaded on first use): greedy VADUSA == greedy AR."""
    pipe = TTSPipeline.from_pretrained()
    text = "Stop the car, please."
    ar = pipe.generate(text, decoder="ar", temperature=0.0)
    fast = pipe.generate(text, decoder="vadusa", temperature=0.0, acceptance="greedy", tree="auto")
    assert torch.equal(fast.tokens, ar.tokens) and ar.tokens[-1].item() == pipe.eos_token_id
    assert fast.forward_passes < ar.forward_passes


@shipped
def test_ar_decoding_does_not_import_peft():
    """Start-up: peft (seconds of imports) is loaded only where a block adapter is, checked in a fresh process."""
    code = (
        "import sys\nfrom vadusa.speech import TTSPipeline\n"
        "pipe = TTSPipeline.from_pretrained()\nout = pipe.generate('Hello there.', decoder='ar', seed=0)\n"
        "assert out.new_tokens > 5\nprint('peft' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"

"""Streaming: StreamVocoder chunks vs the one-shot vocoder, TTSPipeline.stream on the tiny and shipped demos."""

import json
import shutil
import warnings

import numpy as np
import pytest
import soundfile
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from tests.test_speech_pipeline import tiny_dir  # noqa: F401  (the tiny random demo directory fixture)
from vadusa.cli import decode
from vadusa.speech import TTSPipeline, UnitCodec, codec
from vadusa.speech.audio import initial_phases
from vadusa.speech.pipeline import DEMO_DIR
from vadusa.speech.stream import NoSpeechWarning, StreamConfig, StreamVocoder, stall_seconds

TOLERANCE = 5e-3  # relative L2 of the concatenated stream vs the one-shot wav (measured ~5e-4 .. 1.4e-3)
JUMP = 0.01  # |sample step at a chunk join| may exceed the one-shot's step at the same place by this much


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def join_excess(stream: np.ndarray, oneshot: np.ndarray, joins: list[int]) -> float:
    """Max over chunk joins of how much larger the stream's sample step is than the one-shot's there."""
    return max(abs(stream[j] - stream[j - 1]) - abs(oneshot[j] - oneshot[j - 1]) for j in joins)


def stream_in_bursts(vocoder: StreamVocoder, units: torch.Tensor, bursts=(1, 3, 1, 7, 2, 5)) -> np.ndarray:
    chunks, i, k = [], 0, 0
    while i < len(units):
        chunks += vocoder.push(units[i : i + bursts[k % len(bursts)]])
        i, k = i + bursts[k % len(bursts)], k + 1
    return np.concatenate(chunks + vocoder.finish())


def test_initial_phases_depend_on_the_absolute_frame_only():
    whole = initial_phases(0, 200, 9, seed=3)
    assert torch.equal(initial_phases(37, 100, 9, seed=3), whole[:, 37:137])
    assert not torch.equal(initial_phases(0, 200, 9, seed=4), whole)


@pytest.mark.parametrize("which", ["shipped", "random"])
def test_stream_vocoder_matches_the_one_shot_wav(which):
    c = UnitCodec.from_pretrained(DEMO_DIR / "codec")
    if which == "random":
        centroids = torch.randn(16, 160, generator=torch.Generator().manual_seed(1)) - 4
        c = codec.UnitCodec(centroids, codec.CodecConfig(num_units=16))
    units = torch.randint(c.config.num_units, (120,), generator=torch.Generator().manual_seed(0))
    oneshot, _ = c.vocode(units)
    joins = []
    for config in (StreamConfig(), StreamConfig(max_chunk_units=10)):  # growing chunks; 10 units each
        vocoder = StreamVocoder(c, config)
        stream = stream_in_bursts(vocoder, units)
        assert len(stream) == len(oneshot) == (2 * len(units) - 1) * 320
        assert relative_l2(stream, oneshot) < TOLERANCE
        assert join_excess(stream, oneshot, vocoder.joins) < JUMP
        joins.append(vocoder.joins)
    assert np.diff([0] + joins[0]).tolist() == [4 * 640, 10 * 640, 20 * 640, 40 * 640]  # then the last 46 units
    assert len(joins[1]) == 11  # 4 + 10 x 10 units, then the last 16
    # the context is what makes windows agree: with a single unit of it the error is far larger
    narrow = stream_in_bursts(StreamVocoder(c, StreamConfig(context_units=1, fade_frames=1)), units)
    assert relative_l2(narrow, oneshot) > 10 * relative_l2(stream, oneshot)


def test_stream_vocoder_short_and_empty():
    c = UnitCodec.from_pretrained(DEMO_DIR / "codec")
    vocoder = StreamVocoder(c)
    assert vocoder.push([5, 6, 7]) == [] and vocoder.joins == []  # fewer units than first chunk + lookahead
    (only,) = vocoder.finish()
    assert np.allclose(only, c.vocode(torch.tensor([5, 6, 7]))[0], atol=1e-6)
    assert StreamVocoder(c).finish() == []


def test_stall_seconds_of_a_player():
    assert stall_seconds([]) == 0.0 and stall_seconds([(0.1, 0.16), (0.2, 0.4), (0.5, 0.8)]) == 0.0
    assert stall_seconds([(0.1, 0.16), (0.2, 0.4), (0.9, 0.8)]) == pytest.approx(0.24)  # plays 0.1-0.26-0.66


@pytest.mark.parametrize("field, value", [("first_units", 0), ("chunk_units", 2.5), ("fade_frames", 16)])
def test_stream_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"StreamConfig.{field}"):
        StreamConfig(**{field: value})


@pytest.fixture(scope="module")
def tiny(tiny_dir):  # noqa: F811
    return TTSPipeline.from_pretrained(tiny_dir)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_tiny_stream_equals_synthesize(tiny):
    text = "Hello there, hello world."
    oneshot, sr, out = tiny.synthesize(text, seed=7, max_new_tokens=80)
    stream = tiny.stream(text, seed=7, max_new_tokens=80)
    audio = np.concatenate(list(stream))
    assert stream.sample_rate == sr and torch.equal(stream.output.sequences, out.sequences)
    assert len(audio) == len(oneshot) and relative_l2(audio, oneshot) < TOLERANCE
    assert 0 < stream.first_audio_seconds <= stream.seconds


class OnlyEOS(LogitsProcessor):
    def __init__(self, eos: int):
        self.eos = eos

    def __call__(self, input_ids, scores):
        keep = torch.full_like(scores, float("-inf"))
        keep[:, self.eos] = 0
        return scores + keep


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_stream_without_units_yields_nothing_and_warns(tiny_dir):  # noqa: F811
    pipe = TTSPipeline.from_pretrained(tiny_dir)
    pipe.logits_processor = LogitsProcessorList([OnlyEOS(pipe.eos_token_id)])
    stream = pipe.stream("Hello.", seed=0)
    with pytest.warns(NoSpeechWarning, match="no speech units for 'Hello.'"):
        assert list(stream) == []
    assert stream.output.new_tokens == 1 and stream.first_audio_seconds is None


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_stream_bad_input_raises_before_running_and_errors_reach_the_reader(tiny):
    with pytest.raises(ValueError, match="unknown voice 'nobody'"):
        tiny.stream("Hello.", voice="nobody")
    with pytest.raises(ValueError, match="unknown decoder 'nope'"):
        tiny.stream("Hello.", decoder="nope")
    with pytest.raises(ValueError, match="own streamer"):
        tiny.stream("Hello.", streamer=object())
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):  # raised in the decoder's thread
        list(tiny.stream("Hello.", max_new_tokens=0))


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_a_reader_that_stops_early_stops_the_decoder(tiny):
    stream = tiny.stream("Hello there, hello world, hello hello.", seed=0, max_new_tokens=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chunks = iter(stream)
        first = next(chunks)
        chunks.close()  # joins the decoder's thread: it must end, cancelled or finished
    assert len(first) == 2 * StreamConfig().first_units * 320 and stream.streamer.cancelled.is_set()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
@pytest.mark.parametrize("decoder", ["ar", "vadusa", "block"])
def test_shipped_stream_matches_synthesize(decoder, shipped):
    text = "The quick brown fox jumps over the lazy dog."
    oneshot, _, out = shipped.synthesize(text, decoder=decoder, seed=0)
    stream = shipped.stream(text, decoder=decoder, seed=0)
    audio = np.concatenate(list(stream))
    assert torch.equal(stream.output.sequences, out.sequences)  # the streamer does not change decoding
    assert len(audio) == len(oneshot) and relative_l2(audio, oneshot) < TOLERANCE
    assert join_excess(audio, oneshot, stream.vocoder.joins) < JUMP


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return TTSPipeline.from_pretrained()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_decode_cli_stream_prints_time_to_first_audio(tiny_dir, tmp_path, capsys):  # noqa: F811
    text, common = "Hello there, hello world.", ["--model-dir", str(tiny_dir), "--decoder", "ar", "--seed", "7"]
    streamed_args = [text, "-o", str(tmp_path / "s.wav"), "--stream", "--json", str(tmp_path / "s.json")]
    assert decode.main(streamed_args + common) == 0
    assert "time to first audio: 0." in capsys.readouterr().out
    assert decode.main([text, "-o", str(tmp_path / "o.wav")] + common) == 0
    streamed, oneshot = soundfile.read(tmp_path / "s.wav")[0], soundfile.read(tmp_path / "o.wav")[0]
    assert len(streamed) == len(oneshot) > 0 and relative_l2(streamed, oneshot) < TOLERANCE
    row = json.loads((tmp_path / "s.json").read_text())["texts"][0]
    assert 0 < row["first_audio_seconds"] <= row["stream_seconds"] and row["chunks"] >= 2

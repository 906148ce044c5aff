"""Streaming vocoder: unit ids arrive a few at a time, audio leaves in cross-faded chunks.

    vocoder = StreamVocoder(codec)
    for units in bursts:                       # e.g. what each verification step accepted
        for chunk in vocoder.push(units):      # float32 audio, ready to play
            play(chunk)
    for chunk in vocoder.finish():             # the rest, up to the one-shot length
        play(chunk)

Each chunk vocodes a window of mel frames: the new frames plus `context_units` of already-emitted frames
on the left and of not-yet-emitted frames on the right. Griffin-Lim starts every frame from phases that
depend on its absolute index only (`audio.initial_phases`), so with a few units of context a window
converges to the same samples as the whole utterance; a short raised-cosine cross-fade hides what is
left. Chunks grow (4, 10, 20, 40, 40 ... units), so that little context is vocoded twice. The concatenated
chunks have the one-shot `codec.vocode` length and match it within ~1e-3 relative L2 (tests/test_stream.py).
One difference: the one-shot wav is rescaled when its peak exceeds 0.95; a stream cannot know its peak in
advance and clips at 0.95 instead.
"""

import queue
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .audio import MEL, griffin_lim, mel_to_linear
from .codec import UnitCodec

PEAK = 0.95  # the vocoder's peak limit (mel_to_wav rescales to it, a stream clips at it)


@dataclass
class StreamConfig:
    first_units: int = 4  # new units in the first chunk (0.16 s of audio at 25 units/s)
    chunk_units: int = 10  # new units in the second chunk; each later chunk doubles, up to max_chunk_units
    max_chunk_units: int = 40  # cap on a chunk's new units (1.6 s): bigger chunks re-vocode less context
    context_units: int = 8  # units of context vocoded on each side of a chunk's own frames, then dropped
    fade_frames: int = 2  # mel frames (20 ms) of raised-cosine cross-fade between consecutive chunks

    def __post_init__(self):
        for name in ("first_units", "chunk_units", "max_chunk_units", "context_units", "fade_frames"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"StreamConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if 2 * self.context_units <= self.fade_frames:
            raise ValueError(
                f"StreamConfig.fade_frames ({self.fade_frames}) must be < the context's {2 * self.context_units} frames"
            )


class StreamVocoder:
    def __init__(self, codec: UnitCodec, config: StreamConfig | None = None, seed: int = 0):
        self.codec = codec
        self.config = config or StreamConfig()
        self.seed = seed
        self.hop = MEL.hop
        self.stack = codec.config.stack
        self.units: list[int] = []  # every unit pushed so far
        self.frame = 0  # first mel frame not emitted yet
        self.tail = np.zeros(0, dtype=np.float32)  # samples past `frame` vocoded by the last chunk, to fade into
        self.joins: list[int] = []  # sample offsets of the chunk boundaries in the concatenated stream
        self.chunks = 0  # chunks emitted so far

    @property
    def emitted_samples(self) -> int:
        return self.frame * self.hop

    def push(self, units) -> list[np.ndarray]:
        """Add unit ids (0..K-1); return the chunks that became ready (possibly none)."""
        self.units.extend(int(u) for u in units)
        chunks = []
        while True:
            size = self.stack * self.chunk_units(self.chunks)
            lookahead = self.stack * self.config.context_units
            if self.stack * len(self.units) - lookahead < self.frame + size:
                return chunks
            chunks.append(self._chunk(self.frame + size, final=False))

    def chunk_units(self, index: int) -> int:
        """New units in chunk `index`: first_units, then chunk_units doubling up to max_chunk_units.

        Doubling keeps the stream ahead of playback (chunk k + 1 has twice as long to be made as chunk k
        lasts, once the decoder runs faster than 2x real time) while re-vocoding less context per unit.
        """
        cfg = self.config
        return cfg.first_units if index == 0 else min(cfg.max_chunk_units, cfg.chunk_units * 2 ** (index - 1))

    def finish(self) -> list[np.ndarray]:
        """The last chunk: everything up to the one-shot length ((2U - 1) * hop samples). Nothing for no units."""
        if not self.units:
            return []
        return [self._chunk(self.stack * len(self.units), final=True)]

    def _chunk(self, stop: int, final: bool) -> np.ndarray:
        """Vocode frames [frame, stop) with context and return their samples, cross-faded into the last tail."""
        cfg, hop = self.config, self.hop
        total = self.stack * len(self.units)  # mel frames the pushed units decode to
        lo = max(0, self.frame - self.stack * cfg.context_units)
        lo -= lo % self.stack  # windows start at a unit boundary
        hi = total if final else min(total, stop + self.stack * cfg.context_units)
        mel = self.codec.decode(torch.tensor(self.units[lo // self.stack : hi // self.stack]))  # (hi - lo, M)
        mag = mel_to_linear(mel)  # (n_freq, hi - lo)
        wav = griffin_lim(mag, iters=self.codec.config.gl_iters, seed=self.seed, first_frame=lo).numpy()
        wav = np.clip(wav, -PEAK, PEAK).astype(np.float32)  # samples lo * hop .. (hi - 1) * hop
        start = (self.frame - lo) * hop
        end = len(wav) if final else (stop - lo) * hop
        out = wav[start:end].copy()
        n = min(len(self.tail), len(out))
        if n:  # raised-cosine cross-fade from the previous window's tail into this window
            ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)
            out[:n] = self.tail[:n] * (1 - ramp) + out[:n] * ramp
        if self.frame > 0:
            self.joins.append(self.emitted_samples)
        self.tail = wav[end : end + cfg.fade_frames * hop].copy()
        self.frame = stop
        self.chunks += 1
        return out.astype(np.float32)


class Cancelled(Exception):
    """Raised inside the decoder's streamer when the reader of a SpeechStream stops early."""


class UnitStreamer:
    """A transformers-style streamer (put / end): skips the prompt, queues each put's unit ids (0..K-1)."""

    def __init__(self, unit_offset: int, num_units: int):
        self.unit_offset, self.num_units = unit_offset, num_units
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.prompt_seen = False
        self.cancelled = threading.Event()

    def put(self, value: torch.Tensor) -> None:
        if self.cancelled.is_set():
            raise Cancelled
        if not self.prompt_seen:  # decoders put the prompt first, as transformers' generate does
            self.prompt_seen = True
            return
        tokens = value.flatten().long() - self.unit_offset
        self.queue.put(tokens[(tokens >= 0) & (tokens < self.num_units)].tolist())

    def end(self) -> None:
        pass


class SpeechStream:
    """Iterate over float32 audio chunks while a decoder runs in a background thread.

    After the iteration: `output` is the decoder's GenerationOutput, `first_audio_seconds` the wall time from
    the start of the iteration to the first chunk (None when nothing was streamed), `seconds` the total and
    `vocoder.joins` the chunk boundaries, `stall_seconds` the gaps a real-time player would have had. A
    generation without units yields no chunks and warns (`NoSpeechWarning`).
    """

    def __init__(self, run, streamer: UnitStreamer, vocoder: StreamVocoder, sample_rate: int, text: str):
        self.run, self.streamer, self.vocoder = run, streamer, vocoder
        self.sample_rate, self.text = sample_rate, text
        self.output = None
        self.first_audio_seconds: float | None = None
        self.chunk_seconds: list[tuple[float, float]] = []  # (wall time the chunk was ready, its audio seconds)
        self.seconds: float | None = None
        self._error: BaseException | None = None
        self._done = object()

    def _generate(self) -> None:
        try:
            with torch.inference_mode():
                self.output = self.run(self.streamer)  # the decoder calls streamer.put per step
        except Cancelled:
            pass
        except BaseException as e:  # re-raised in the reading thread
            self._error = e
        finally:
            self.streamer.queue.put(self._done)

    def __iter__(self):
        start = time.perf_counter()
        worker = threading.Thread(target=self._generate, name="vadusa-stream", daemon=True)
        worker.start()
        try:
            while (units := self.streamer.queue.get()) is not self._done:
                yield from self._timed(self.vocoder.push(units), start)
            if self._error is not None:
                raise self._error
            yield from self._timed(self.vocoder.finish(), start)
            self.seconds = time.perf_counter() - start
            if not self.vocoder.units:
                warnings.warn(
                    f"the decoder produced no speech units for {self.text!r} (it ended at once): nothing to stream",
                    NoSpeechWarning,
                    stacklevel=2,
                )
        finally:
            self.streamer.cancelled.set()  # a reader that stopped early stops the decoder at its next step
            worker.join()

    def _timed(self, chunks, start):
        for chunk in chunks:
            ready = time.perf_counter() - start
            if self.first_audio_seconds is None:
                self.first_audio_seconds = ready
            self.chunk_seconds.append((ready, len(chunk) / self.sample_rate))
            yield chunk

    @property
    def stall_seconds(self) -> float:
        return stall_seconds(self.chunk_seconds)


def stall_seconds(chunks: list[tuple[float, float]]) -> float:
    """Silence a real-time player inserts for chunks (ready time, audio seconds): playback starts with the
    first chunk and waits for any chunk not ready when the audio before it has played out (0: kept ahead)."""
    stall, end = 0.0, None
    for ready, seconds in chunks:
        if end is not None and ready > end:
            stall += ready - end
        end = (ready if end is None else max(ready, end)) + seconds
    return stall


class NoSpeechWarning(UserWarning):
    """A streamed text whose generation held no speech units."""

"""Audio side of the demo TTS in plain torch (no torchaudio): resampling, log-mel, Griffin-Lim.

mel = log_mel(wav)               # (T, 80) at 50 frames/s from 16 kHz float audio
wav = griffin_lim(mel_to_linear(mel))   # and back, 32 iterations of fast Griffin-Lim
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 16000  # Hz of every waveform the codec and the judge see
    n_fft: int = 1024  # FFT size (and Hann window length), 64 ms
    hop: int = 320  # samples between frames: 50 frames per second
    n_mels: int = 80  # mel bands from 0 Hz to Nyquist
    floor: float = 1e-5  # magnitude floor before the log


MEL = MelConfig()


def resample(wav: torch.Tensor, orig: int, new: int, width: int = 6, rolloff: float = 0.99) -> torch.Tensor:
    """(N,) float audio from `orig` Hz to `new` Hz with a Hann-windowed sinc (torchaudio's algorithm)."""
    if orig == new:
        return wav
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    base = min(orig, new) * rolloff
    pad = math.ceil(width * orig / base)
    idx = torch.arange(-pad, pad + orig, dtype=torch.float64)[None, None] / orig  # (1, 1, L)
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx) * base  # (new, 1, L)
    t = t.clamp(-width, width)
    window = torch.cos(t * math.pi / width / 2) ** 2
    t = t * math.pi
    kernels = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    x = torch.nn.functional.pad(wav.double()[None, None], (pad, pad + orig))  # (1, 1, N + pads)
    y = torch.nn.functional.conv1d(x, kernels, stride=orig)  # (1, new, frames)
    y = y.transpose(1, 2).reshape(-1)
    return y[: math.ceil(new * wav.shape[-1] / orig)].to(wav.dtype)


@lru_cache(maxsize=4)
def mel_filterbank(cfg: MelConfig = MEL) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular HTK-mel filters, each normalised to unit area (Slaney style)."""
    n_freq = cfg.n_fft // 2 + 1
    freqs = torch.linspace(0, cfg.sample_rate / 2, n_freq, dtype=torch.float64)
    to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    mels = torch.linspace(0.0, to_mel(cfg.sample_rate / 2), cfg.n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)  # (n_mels + 2,) band edges
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    fb = torch.clamp(torch.minimum(up, down), min=0.0)  # (n_mels, n_freq)
    fb = fb * (2.0 / (hi - lo))
    return fb.float()


@lru_cache(maxsize=4)
def _window(n: int) -> torch.Tensor:
    return torch.hann_window(n)


def magnitude(wav: torch.Tensor, cfg: MelConfig = MEL) -> torch.Tensor:
    """(N,) audio -> (n_fft // 2 + 1, T) STFT magnitudes, T = N // hop + 1."""
    spec = torch.stft(wav.float(), cfg.n_fft, cfg.hop, window=_window(cfg.n_fft), center=True, return_complex=True)
    return spec.abs()


def log_mel(wav, sample_rate: int = MEL.sample_rate, cfg: MelConfig = MEL) -> torch.Tensor:
    """Float audio (numpy or torch, any rate) -> (T, n_mels) natural-log mel magnitudes at 50 frames/s."""
    wav = torch.as_tensor(np.asarray(wav, dtype=np.float32)) if not torch.is_tensor(wav) else wav.float()
    if wav.dim() != 1:
        raise ValueError(f"expected mono audio of shape (N,), got shape {tuple(wav.shape)}")
    wav = resample(wav, sample_rate, cfg.sample_rate)
    mel = mel_filterbank(cfg) @ magnitude(wav, cfg)  # (n_mels, T)
    return torch.log(mel.clamp(min=cfg.floor)).T.contiguous()


@lru_cache(maxsize=4)
def _mel_pinv(cfg: MelConfig = MEL) -> torch.Tensor:
    return torch.linalg.pinv(mel_filterbank(cfg))  # (n_freq, n_mels)


def mel_to_linear(mel: torch.Tensor, cfg: MelConfig = MEL) -> torch.Tensor:
    """(T, n_mels) log-mel -> (n_freq, T) non-negative linear magnitudes (pseudo-inverse, clamped)."""
    return (_mel_pinv(cfg) @ mel.float().exp().T).clamp(min=0.0)


PHASE_BLOCK = 64  # frames per seeded block of initial Griffin-Lim phases


def initial_phases(first_frame: int, num_frames: int, n_freq: int, seed: int = 0) -> torch.Tensor:
    """(n_freq, num_frames) uniform [0, 1) initial phases of frames first_frame .. first_frame + num_frames - 1.

    Each frame's phases depend only on (seed, its absolute index), drawn in seeded blocks of PHASE_BLOCK
    frames, so a window of frames starts from the same phases as the whole utterance (streaming relies on it).
    """
    blocks = []
    for b in range(first_frame // PHASE_BLOCK, (first_frame + num_frames - 1) // PHASE_BLOCK + 1):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
        blocks.append(torch.rand(PHASE_BLOCK, n_freq, generator=gen))  # (PHASE_BLOCK, n_freq)
    offset = first_frame % PHASE_BLOCK
    return torch.cat(blocks)[offset : offset + num_frames].T


def griffin_lim(
    mag: torch.Tensor,
    iters: int = 32,
    momentum: float = 0.99,
    seed: int = 0,
    cfg: MelConfig = MEL,
    first_frame: int = 0,
) -> torch.Tensor:
    """(n_freq, T) magnitudes -> (N,) float32 waveform: fast Griffin-Lim (Perraudin et al.) from seeded phases.

    `first_frame` is the absolute index of the first column (a window of a longer utterance); N = (T - 1) * hop.
    """
    window = _window(cfg.n_fft)
    angles = torch.exp(2j * math.pi * initial_phases(first_frame, mag.shape[1], mag.shape[0], seed))  # (n_freq, T)
    length = (mag.shape[1] - 1) * cfg.hop
    previous = torch.zeros_like(angles)
    for _ in range(iters):
        wav = torch.istft(mag * angles, cfg.n_fft, cfg.hop, window=window, length=length)
        rebuilt = torch.stft(wav, cfg.n_fft, cfg.hop, window=window, return_complex=True)
        angles = rebuilt - (momentum / (1 + momentum)) * previous
        angles = angles / angles.abs().clamp(min=1e-16)
        previous = rebuilt
    wav = torch.istft(mag * angles, cfg.n_fft, cfg.hop, window=window, length=length)
    return wav


def mel_to_wav(mel: torch.Tensor, iters: int = 32, seed: int = 0, cfg: MelConfig = MEL) -> np.ndarray:
    """(T, n_mels) log-mel -> float32 numpy waveform at cfg.sample_rate, peak-limited to 0.95."""
    wav = griffin_lim(mel_to_linear(mel, cfg), iters=iters, seed=seed, cfg=cfg).numpy().astype(np.float32)
    peak = float(np.abs(wav).max()) if wav.size else 0.0
    return wav * (0.95 / peak) if peak > 0.95 else wav

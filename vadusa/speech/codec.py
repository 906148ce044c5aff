"""Discrete unit codec: log-mel at 50 frames/s -> pairs of frames -> k-means unit ids at 25 units/s, and back.

codec = UnitCodec.fit(mels, num_units=1024)      # torch k-means (k-means++ seeding, Lloyd steps)
units = codec.encode(mel)                        # (T, 80) -> (ceil(T / 2),) long
mel = codec.decode(units)                        # -> (2 * U, 80) centroid frames, lightly smoothed
wav = codec.vocode(units)                        # -> float32 numpy at 16 kHz (Griffin-Lim)
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import config_from_json
from .audio import MEL, mel_to_wav
from .store import read_tensors, write_json, write_tensors


@dataclass
class CodecConfig:
    num_units: int = 1024  # k-means codebook size K
    stack: int = 2  # 50 Hz mel frames per unit: 2 -> 25 units per second
    n_mels: int = MEL.n_mels  # mel bands per frame
    frame_rate: float = MEL.sample_rate / MEL.hop  # mel frames per second
    sample_rate: int = MEL.sample_rate  # Hz of the vocoded audio
    smooth: float = 0.25  # weight of each neighbour frame in the decode smoothing ([s, 1 - 2s, s])
    gl_iters: int = 32  # Griffin-Lim iterations of the vocoder

    @property
    def unit_rate(self) -> float:
        return self.frame_rate / self.stack


def stack_frames(mel: torch.Tensor, stack: int) -> torch.Tensor:
    """(T, M) -> (ceil(T / stack), stack * M), repeating the last frame to fill the final group."""
    pad = (-mel.shape[0]) % stack
    if pad:
        mel = torch.cat([mel, mel[-1:].expand(pad, -1)])
    return mel.reshape(mel.shape[0] // stack, stack * mel.shape[1])


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(N, D) vectors -> (N,) index of the nearest centroid (squared Euclidean), in chunks."""
    c_sq = (centroids * centroids).sum(1)  # (K,)
    out = []
    for part in x.split(chunk):
        out.append((c_sq[None] - 2 * part @ centroids.T).argmin(1))  # (n, K) -> (n,)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """(N, D) float32 -> (k, D) centroids: k-means++ seeding on a subsample, then Lloyd iterations.

    Empty clusters are re-seeded at the points farthest from their centroid, so every unit is used.
    """
    gen = torch.Generator().manual_seed(seed)
    sub = x[torch.randperm(x.shape[0], generator=gen)[: min(x.shape[0], 20 * k)]]
    centroids = [sub[torch.randint(sub.shape[0], (1,), generator=gen)]]
    dist = ((sub - centroids[0]) ** 2).sum(1)  # (n,) distance to the nearest chosen centroid
    for _ in range(1, k):
        pick = torch.multinomial(dist / dist.sum(), 1, generator=gen)
        centroids.append(sub[pick])
        dist = torch.minimum(dist, ((sub - sub[pick]) ** 2).sum(1))
    c = torch.cat(centroids)  # (k, D)
    for _ in range(iters):
        assign = nearest(x, c)  # (N,)
        counts = torch.bincount(assign, minlength=k).float()  # (k,)
        sums = torch.zeros_like(c).index_add_(0, assign, x)  # (k, D)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = ((x - c[assign]) ** 2).sum(1).topk(len(empty)).indices
            c[empty] = x[far]
    return c


class UnitCodec:
    def __init__(self, centroids: torch.Tensor, config: CodecConfig):
        if centroids.shape != (config.num_units, config.stack * config.n_mels):
            raise ValueError(
                f"codebook has shape {tuple(centroids.shape)}, config expects"
                f" ({config.num_units}, {config.stack * config.n_mels})"
            )
        self.centroids = centroids.float()  # (K, stack * n_mels)
        self.config = config

    @classmethod
    def fit(cls, mels: list[torch.Tensor], num_units: int = 1024, max_vectors: int = 200_000, seed: int = 0):
        """k-means over stacked frames of `mels` (a random subset of at most `max_vectors`)."""
        cfg = CodecConfig(num_units=num_units)
        x = torch.cat([stack_frames(m.float(), cfg.stack) for m in mels])  # (N, stack * M)
        gen = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(x.shape[0], generator=gen)[:max_vectors]]
        return cls(kmeans(x, num_units, seed=seed), cfg)

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """(T, n_mels) log-mel -> (ceil(T / stack),) unit ids."""
        return nearest(stack_frames(mel.float(), self.config.stack), self.centroids)

    def decode(self, units: torch.Tensor) -> torch.Tensor:
        """(U,) unit ids -> (stack * U, n_mels) log-mel: centroid frames smoothed by [s, 1 - 2s, s]."""
        units = torch.as_tensor(units, dtype=torch.long).flatten()
        if len(units) and (units.min() < 0 or units.max() >= self.config.num_units):
            raise ValueError(f"unit ids must be in [0, {self.config.num_units}), got {units.min()}..{units.max()}")
        mel = self.centroids[units].reshape(-1, self.config.n_mels)  # (stack * U, M)
        if mel.shape[0] < 3:
            return mel
        s = self.config.smooth
        padded = torch.cat([mel[:1], mel, mel[-1:]])
        return s * padded[:-2] + (1 - 2 * s) * padded[1:-1] + s * padded[2:]

    def vocode(self, units: torch.Tensor, seed: int = 0) -> tuple[np.ndarray, int]:
        """(U,) unit ids -> (float32 waveform, sample rate); an empty unit list gives an empty wav."""
        if len(units) == 0:
            return np.zeros(0, dtype=np.float32), self.config.sample_rate
        return mel_to_wav(self.decode(units), iters=self.config.gl_iters, seed=seed), self.config.sample_rate

    def save_pretrained(self, directory: Path) -> None:
        directory = Path(directory)
        write_tensors(directory / "model.safetensors", {"centroids": self.centroids})
        write_json(directory / "config.json", asdict(self.config))

    @classmethod
    def from_pretrained(cls, directory: Path) -> "UnitCodec":
        directory = Path(directory)
        config = config_from_json(CodecConfig, directory / "config.json")
        tensors = read_tensors(directory / "model.safetensors")
        centroids = tensors.get("centroids")
        expected = (config.num_units, config.stack * config.n_mels)
        if centroids is None or tuple(centroids.shape) != expected:
            shape = None if centroids is None else tuple(centroids.shape)
            raise ValueError(
                f"{directory / 'model.safetensors'} must hold 'centroids' of shape {expected}, got {shape}"
            )
        return cls(centroids, config)

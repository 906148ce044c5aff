"""Figures of the demo TTS on held-out corpus sentences: judge ceilings, sampled speech CER, speed.

judge_figures(judge, codec, rows, mels, units, "test")  -> CER on espeak audio and on vocoded units
lm_figures(pipe, rows, temperatures=[1.0, 0.7])          -> CER, length ratio, tokens/s, RTF per T
"""

import statistics
import time

import torch
from tqdm import tqdm

from .audio import log_mel
from .judge import cer


def judge_figures(judge, codec, rows, mels, units, split: str = "test", limit: int | None = None) -> dict:
    """Judge CER (mean over sentences) on espeak log-mels and on Griffin-Lim audio of the true units."""
    idx = [i for i, r in enumerate(rows) if r["split"] == split][:limit]
    texts = [rows[i]["text"] for i in idx]
    espeak = []
    for start in range(0, len(idx), 32):
        espeak += judge.transcribe_mels([mels[i] for i in idx[start : start + 32]])
    vocoded = []
    for i in tqdm(idx, desc=f"vocode {split}", unit="sent"):
        vocoded.append(judge.transcribe_mels([log_mel(codec.vocode(units[i])[0])])[0])
    return {
        "split": split,
        "sentences": len(idx),
        "cer_espeak": statistics.mean(cer(t, h) for t, h in zip(texts, espeak, strict=True)),
        "cer_vocoded_units": statistics.mean(cer(t, h) for t, h in zip(texts, vocoded, strict=True)),
        "examples": [
            {"text": t, "espeak": a, "vocoded": b} for t, a, b in list(zip(texts, espeak, vocoded, strict=True))[:5]
        ],
    }


def lm_figures(pipe, rows, temperatures=(1.0,), split: str = "test", limit: int | None = None, seed: int = 0):
    """Sampled AR speech on held-out sentences, each in its corpus voice and rate, at each temperature."""
    items = [r for r in rows if r["split"] == split][:limit]
    out = {}
    for temp in temperatures:
        cers, ratios, tokens, seconds, audio = [], [], 0, 0.0, 0.0
        for k, r in enumerate(tqdm(items, desc=f"AR T={temp}", unit="sent")):
            wav, sr, gen = pipe.synthesize(r["text"], voice=r["voice"], rate=r["rate"], temperature=temp, seed=seed + k)
            cers.append(pipe.cer(wav, sr, r["text"]))
            true_units = r.get("num_units")
            if true_units:
                ratios.append(len(pipe.units(gen)) / true_units)
            tokens += gen.new_tokens
            seconds += gen.seconds
            audio += len(wav) / sr
        out[str(temp)] = {
            "sentences": len(items),
            "cer": statistics.mean(cers),
            "cer_median": statistics.median(cers),
            "length_ratio": statistics.mean(ratios) if ratios else None,
            "tokens_per_second": tokens / seconds,
            "rtf": seconds / audio,
            "threads": torch.get_num_threads(),
        }
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start

"""Soak: N syntheses in one process through the demo TTSPipeline; memory, speed and descriptors over time.

    python benchmarks/soak.py                        # 1,000 syntheses (~45 min on one loaded core), then the table
    python benchmarks/soak.py --n 60 --json soak.json

The schedule (seeded) mixes the decoders below, the three voices, held-out test-split texts of the demo
(`corpus.held_out_texts`) and seeds; its last `window` syntheses repeat its first `window` exactly, so the
two speed windows do the same work (and must give the same tokens: a check that nothing drifts). A
warm-up (each decoder twice) runs first; then RSS (VmRSS of /proc/self/status, after gc), open file
descriptors (/proc/self/fd) and threads are read, and again at the end.
Targets: RSS growth <= 5%, last-window tokens/s >= 90% of the first window's, no more descriptors or threads
at the end than after the warm-up. Tokens/s = new tokens / decoder seconds (GenerationOutput.seconds).
"""

import argparse
import gc
import json
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

# label -> (decoder, decoder options, temperature, streamed): one synthesis of each kind
MIX = {
    "ar": ("ar", {}, 1.0, False),
    "vadusa": ("vadusa", {}, 1.0, False),  # tolerance acceptance, the shipped tree
    "vadusa-greedy": ("vadusa", {"acceptance": "greedy"}, 0.0, False),
    "vadusa-typical": ("vadusa", {"acceptance": "typical"}, 1.0, False),
    "block": ("block", {}, 1.0, False),
    "vadusa-stream": ("vadusa", {}, 1.0, True),  # pipe.stream: a decoder thread and a streamer per call
}
VOICES = ["us_male", "us_female", "gb_male"]
TARGETS = {"rss_growth": 0.05, "speed_ratio": 0.90}  # at most +5% RSS; last window >= 90% of the first's speed


@dataclass(frozen=True)
class Item:
    label: str  # a key of MIX
    text: str  # a held-out sentence
    voice: str  # one of VOICES
    seed: int  # sampling seed


# ----- pure parts -----
def schedule(n: int, texts: list[str], window: int, seed: int = 0) -> list[Item]:
    """`n` seeded random syntheses; the last `window` repeat the first `window` (the same work to time)."""
    if n < 2 * window or window < 1:
        raise ValueError(f"n must be >= 2 * window >= 2, got n={n}, window={window}")
    rng = random.Random(seed)
    items = [Item(rng.choice(list(MIX)), rng.choice(texts), rng.choice(VOICES), rng.randrange(2**31)) for _ in range(n)]
    return items[: n - window] + items[:window]


def tokens_per_second(records: list[dict]) -> float:
    return sum(r["tokens"] for r in records) / sum(r["seconds"] for r in records)


def summary(records: list[dict], start: dict, end: dict, window: int) -> dict:
    """Figures and PASS/FAIL per target from the per-synthesis `records` and the two probes (`probe()`)."""
    first, last = records[:window], records[-window:]
    speed_first, speed_last = tokens_per_second(first), tokens_per_second(last)
    rss_growth = (end["rss_kb"] - start["rss_kb"]) / start["rss_kb"]
    figures = {
        "syntheses": len(records),
        "window": window,
        "rss_mb_after_warmup": round(start["rss_kb"] / 1024, 1),
        "rss_mb_end": round(end["rss_kb"] / 1024, 1),
        "rss_growth": round(rss_growth, 4),
        "tokens_per_s_first": round(speed_first, 1),
        "tokens_per_s_last": round(speed_last, 1),
        "speed_ratio": round(speed_last / speed_first, 4),
        "fds_after_warmup": start["fds"],
        "fds_end": end["fds"],
        "threads_after_warmup": start["threads"],
        "threads_end": end["threads"],
        "repeat_same_tokens": sum(a["digest"] == b["digest"] for a, b in zip(first, last, strict=True)),
    }
    figures["checks"] = {
        "rss_growth <= 5%": rss_growth <= TARGETS["rss_growth"],
        "last-window speed >= 90% of first": speed_last >= TARGETS["speed_ratio"] * speed_first,
        "no leaked descriptors": end["fds"] <= start["fds"],
        "no leaked threads": end["threads"] <= start["threads"],
    }
    return figures


def table(figures: dict) -> str:
    f = figures
    rows = [
        ("RSS (MB)", f["rss_mb_after_warmup"], f["rss_mb_end"], f"{100 * f['rss_growth']:+.2f}%", "rss_growth <= 5%"),
        ("tokens/s (first / last window)", f["tokens_per_s_first"], f["tokens_per_s_last"],
         f"{f['speed_ratio']:.3f}x", "last-window speed >= 90% of first"),
        ("open file descriptors", f["fds_after_warmup"], f["fds_end"], f["fds_end"] - f["fds_after_warmup"],
         "no leaked descriptors"),
        ("threads", f["threads_after_warmup"], f["threads_end"], f["threads_end"] - f["threads_after_warmup"],
         "no leaked threads"),
    ]  # fmt: skip
    lines = [
        f"{f['syntheses']} syntheses, windows of {f['window']}; the repeated window gave the same tokens"
        f" {f['repeat_same_tokens']}/{f['window']} times",
        "",
        "| measure | after warm-up (first window) | end (last window) | change | target |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [f"| {m} | {a} | {b} | {c} | {'PASS' if f['checks'][k] else 'FAIL'}: {k} |" for m, a, b, c, k in rows]
    return "\n".join(lines)


# ----- the process -----
def rss_kb() -> int:
    """Resident set size of this process now (VmRSS of /proc/self/status), in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS line in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def probe() -> dict:
    gc.collect()
    return {"rss_kb": rss_kb(), "fds": open_fds(), "threads": threading.active_count()}


def synthesize(pipe, item: Item) -> dict:
    """One synthesis of `item` (wav included); its tokens, decoder seconds and a digest of the tokens."""
    decoder, options, temperature, streamed = MIX[item.label]
    kwargs = dict(decoder=decoder, seed=item.seed, temperature=temperature, **options)
    if streamed:
        stream = pipe.stream(item.text, item.voice, **kwargs)
        wav = np.concatenate([np.zeros(0, np.float32), *stream])
        out = stream.output
    else:
        wav, _, out = pipe.synthesize(item.text, item.voice, **kwargs)
    tokens = out.tokens.tolist()
    return {"label": item.label, "tokens": out.new_tokens, "seconds": out.seconds, "samples": len(wav),
            "digest": hash(tuple(tokens))}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="syntheses after the warm-up")
    p.add_argument("--window", type=int, default=100, help="syntheses per speed window (capped at n // 2)")
    p.add_argument("--texts", type=int, default=50, help="held-out test-split texts to draw from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the figures and per-synthesis records here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    from vadusa.speech import TTSPipeline
    from vadusa.speech.corpus import held_out_texts

    pipe = TTSPipeline.from_pretrained()
    texts = held_out_texts("test", args.texts)
    window = min(args.window, args.n // 2)
    plan = schedule(args.n, texts, window, args.seed)
    for k, label in enumerate(list(MIX) * 2):  # warm-up: every decoder built, its caches filled
        synthesize(pipe, Item(label, texts[k % len(texts)], VOICES[k % len(VOICES)], k))
    start, rss_trace, records = probe(), [], []
    t0, every = time.perf_counter(), max(1, args.n // 20)
    for i, item in enumerate(tqdm(plan, desc="soak", unit="synth")):
        records.append(synthesize(pipe, item))
        if (i + 1) % every == 0:
            rss_trace.append([i + 1, rss_kb()])
    end = probe()
    figures = summary(records, start, end, window)
    figures |= {"wall_seconds": round(time.perf_counter() - t0, 1), "threads_torch": args.threads}
    figures["decoder_runs_cached"] = len(pipe._runs)
    print(table(figures))
    print(json.dumps(figures["checks"]))
    if args.json:
        body = {"figures": figures, "rss_trace_kb": rss_trace, "schedule": [asdict(i) for i in plan]}
        args.json.write_text(json.dumps(body | {"records": records}, indent=1) + "\n")
    return 0 if all(figures["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Time to first audio and total time of TTSPipeline.stream for ar, vadusa and block, on held-out texts.

    python -m vadusa.cli.build_demo --write-texts test --count 20 --texts-out /tmp/w20.txt
    python benchmarks/streaming.py --texts /tmp/w20.txt [--threads 1] [--json streaming.json]

For every text (seed = its index) the decoders run interleaved, after one warm-up text: the stream
(time to first audio chunk, total time, its match with the one-shot wav as relative L2) and the one-shot
`synthesize` (decoder + vocoder wall time, the time a non-streaming user waits for any audio), and whether
a real-time player would have stalled waiting for a chunk (`SpeechStream.stall_seconds`).
Prints a Markdown table of medians over the texts.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from vadusa.bench import read_texts
from vadusa.speech import TTSPipeline

DECODERS = ["ar", "vadusa", "block"]


def measure(pipe: TTSPipeline, text: str, decoder: str, seed: int) -> dict:
    start = time.perf_counter()
    oneshot, sr, _ = pipe.synthesize(text, decoder=decoder, seed=seed)
    oneshot_seconds = time.perf_counter() - start
    stream = pipe.stream(text, decoder=decoder, seed=seed)
    audio = np.concatenate(list(stream))
    return {
        "decoder": decoder,
        "seed": seed,
        "audio_seconds": len(audio) / sr,
        "first_audio_seconds": stream.first_audio_seconds,
        "stream_seconds": stream.seconds,
        "stall_seconds": stream.stall_seconds,
        "oneshot_seconds": oneshot_seconds,
        "relative_l2": float(np.linalg.norm(audio - oneshot) / np.linalg.norm(oneshot)),
    }


def table(rows: list[dict], threads: int) -> str:
    lines = [
        f"{len(rows) // len(DECODERS)} texts, {threads} torch thread(s), medians:",
        "",
        "| decoder | time to first audio (s) | stream total (s) | one-shot synthesize (s) | audio (s) |"
        " stream vs one-shot, rel. L2 | texts with a playback stall |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for d in DECODERS:
        mine = [r for r in rows if r["decoder"] == d]
        med = {k: statistics.median(r[k] for r in mine) for k in mine[0] if k not in ("decoder", "seed")}
        lines.append(
            f"| {d} | {med['first_audio_seconds']:.3f} | {med['stream_seconds']:.3f} | {med['oneshot_seconds']:.3f}"
            f" | {med['audio_seconds']:.2f} | {med['relative_l2']:.1e}"
            f" | {sum(r['stall_seconds'] > 0 for r in mine)} (max {max(r['stall_seconds'] for r in mine):.3f} s) |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=Path, required=True, help="one text per line")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", type=Path, help="write every row here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    pipe = TTSPipeline.from_pretrained()
    texts = read_texts(args.texts)
    for d in DECODERS:  # warm-up: loads heads / adapter, first-call allocations
        measure(pipe, texts[0], d, 0)
    rows = [measure(pipe, text, d, i) for i, text in enumerate(texts) for d in DECODERS]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows, args.threads))


if __name__ == "__main__":
    main()

"""Intelligibility of the demo TTS: held-out short phrases and the test-split sentences, by the judge's CER.

    python benchmarks/demo_quality.py --phrases [--decoders "ar; vadusa; vadusa:acceptance=typical"] [--seeds 3]
    python benchmarks/demo_quality.py --sentences [--limit 295] [--json sentences.json]

--phrases: every phrase of `phrases.HELD_OUT` (never in the corpus) plus the first phrases people type
(`--also`, trained on), each in its corpus voice and rate, seeds 0..S-1 per decoder, against the judge's
CER on espeak-ng's own audio of the phrase. The bound of the demo issue: decoder CER <= 2 x espeak + 0.05.
--sentences: AR sampling at T=1.0 on every test-split sentence (seed = its index), as in the README.
CER means come with a 95% bootstrap interval over phrases / sentences.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from vadusa.bench import bootstrap_interval, parse_configs
from vadusa.speech import TTSPipeline, corpus, phrases

ALSO = ("No.", "Hello.", "Stop!", "Yes.")  # the worst phrases of the demo issue (in the training phrases now)


def espeak_cer(pipe: TTSPipeline, text: str, voice: str, rate: str) -> float:
    wav, _ = corpus.speak(text, voice, rate)
    return pipe.cer(wav.numpy(), 16000, text)


def phrase_figures(pipe: TTSPipeline, texts, decoders, seeds: int) -> dict:
    """Per phrase: espeak CER and, per decoder row (`parse_configs` rows), the mean CER over seeds; then means
    with intervals."""
    rows = []
    for text in texts:
        voice, rate = corpus.voice_rate_of(text)
        row = {"text": text, "words": len(text.split()), "voice": voice, "rate": rate,
               "espeak": espeak_cer(pipe, text, voice, rate)}  # fmt: skip
        for spec in decoders:
            cers = [
                pipe.cer(*pipe.synthesize(text, voice, spec.decoder, seed=s, rate=rate, **spec.config)[:2], text)
                for s in range(seeds)
            ]
            row[spec.label] = statistics.mean(cers)
        rows.append(row)
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{v}" for k, v in row.items()), flush=True)
    summary = {}
    decoders = [spec.label for spec in decoders]
    for name in ("espeak", *decoders):
        values = [r[name] for r in rows]
        summary[name] = {"cer": statistics.mean(values), "cer_ci": bootstrap_interval(values)}
    bound = 2 * summary["espeak"]["cer"] + 0.05
    for name in decoders:
        summary[name]["within_bound"] = summary[name]["cer"] <= bound
    return {"phrases": len(rows), "seeds": seeds, "bound": bound, "summary": summary, "rows": rows}


def sentence_figures(pipe: TTSPipeline, limit: int | None) -> dict:
    texts = corpus.held_out_texts("test", limit)
    cers = []
    for k, text in enumerate(texts):
        voice, rate = corpus.voice_rate_of(text)
        wav, sr, _ = pipe.synthesize(text, voice, "ar", seed=k, rate=rate, temperature=1.0)
        cers.append(pipe.cer(wav, sr, text))
        if k % 25 == 0:
            print(f"{k}/{len(texts)} mean CER so far {statistics.mean(cers):.3f}", flush=True)
    return {"sentences": len(texts), "temperature": 1.0, "cer": statistics.mean(cers),
            "cer_median": statistics.median(cers), "cer_ci": bootstrap_interval(cers)}  # fmt: skip


def markdown(figures: dict) -> str:
    out = []
    if "phrases" in figures:
        f = figures["phrases"]
        out.append(f"Held-out short phrases: {f['held_out']['phrases']} x {f['held_out']['seeds']} seeds; "
                   f"bound 2 x espeak + 0.05 = {f['held_out']['bound']:.3f}\n")  # fmt: skip
        out.append("| | " + " | ".join(f["held_out"]["summary"]) + " |")
        out.append("|---|" + "---:|" * len(f["held_out"]["summary"]))
        for part in ("held_out", "also"):
            s = f[part]["summary"]
            cells = [f"{v['cer']:.3f} [{v['cer_ci'][0]:.3f}, {v['cer_ci'][1]:.3f}]" for v in s.values()]
            out.append(f"| {part} ({f[part]['phrases']}) | " + " | ".join(cells) + " |")
        for words in (1, 2, 3):
            rows = [r for r in f["held_out"]["rows"] if r["words"] == words]
            if rows:
                cells = [f"{statistics.mean(r[k] for r in rows):.3f}" for k in f["held_out"]["summary"]]
                out.append(f"| {words}-word ({len(rows)}) | " + " | ".join(cells) + " |")
    if "sentences" in figures:
        f = figures["sentences"]
        out.append(f"\nTest sentences: {f['sentences']}, AR T=1.0: CER {f['cer']:.3f} "
                   f"[{f['cer_ci'][0]:.3f}, {f['cer_ci'][1]:.3f}], median {f['cer_median']:.3f}")  # fmt: skip
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phrases", action="store_true", help="held-out short phrases")
    p.add_argument("--sentences", action="store_true", help="test-split sentences, AR at T=1")
    p.add_argument("--decoders", default="ar; vadusa", help="decoder rows for --phrases, as decode.py --configs")
    p.add_argument("--seeds", type=int, default=3, help="seeds per phrase")
    p.add_argument("--limit", type=int, default=None, help="first N test sentences (default: all)")
    p.add_argument("--demo", type=Path, default=None, help="demo directory (default: the shipped one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    if not (args.phrases or args.sentences):
        p.error("choose --phrases and/or --sentences")
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    pipe = TTSPipeline.from_pretrained(args.demo)
    figures = {"threads": torch.get_num_threads(), "demo": str(pipe.directory)}
    if args.phrases:
        decoders = parse_configs(args.decoders)
        figures["phrases"] = {
            "held_out": phrase_figures(pipe, phrases.HELD_OUT, decoders, args.seeds),
            "also": phrase_figures(pipe, ALSO, decoders, args.seeds),
        }
    if args.sentences:
        figures["sentences"] = sentence_figures(pipe, args.limit)
    print(markdown(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

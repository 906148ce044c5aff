"""Greedy decoding of the demo LM in reduced precision: where VADUSA leaves greedy AR, and what CER costs.

    python benchmarks/precision.py [--count 30] [--dtypes bfloat16 float16] [--decoders ar vadusa block]
                                   [--json precision.json] [--md precision.md]

The shipped demo LM (`TTSPipeline.from_pretrained()`) is cast to each dtype; the shipped drafter and its greedy
tree ("auto") decode it at temperature 0, as do `generate_ar` and the shipped block adapter (its default
threshold), on `--count` held-out test sentences. float32 is always run too, as the reference. For every text,
the new tokens of each run are compared with greedy AR in the same dtype, with greedy AR in float32 and with
the same decoder in float32: whether they differ, and the index of the first token that does (on a divergence
both continue on their own, so later tokens say nothing). CER is the judge's on the vocoded units, as
`vadusa.bench` scores it. The drafter stays in its own float32 (it reads the base's states, cast), so only the
base's precision changes; block decoding is not meant to equal AR (its float32 row is the baseline). Not a
speed benchmark: run it on one thread, load does not matter.
"""

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from vadusa.bench import machine_info
from vadusa.decoders import build_decoder
from vadusa.speech import TTSPipeline
from vadusa.speech.corpus import held_out_texts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where a and b differ (the shorter length if one is a prefix of the other);
    None when they are identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def decode(pipe: TTSPipeline, run, text: str) -> dict:
    """One greedy decoding of `text` -> its tokens, CER and tokens per verification pass."""
    ids = pipe.prompt(text)
    out = run(ids, max_new_tokens=pipe.max_new_tokens(text), temperature=0.0,
              logits_processor=pipe.logits_processor, eos_token_id=pipe.eos_token_id)  # fmt: skip
    wav, sr = pipe.vocode(pipe.units(out))
    return {"tokens": out.tokens.tolist(), "cer": pipe.cer(wav, sr, text), "mean_accepted": out.mean_accepted}


def runs_for(pipe: TTSPipeline, dtype: torch.dtype, decoders: list[str]) -> dict:
    """{decoder: run} on a copy of the demo LM cast to `dtype` (float32: the pipeline's own)."""
    model = pipe.model if dtype == torch.float32 else copy.deepcopy(pipe.model).to(dtype)
    options = {"vadusa": {"acceptance": "greedy", "tree": "auto"}}
    return {name: build_decoder(name, model, assets=pipe.directory, **options.get(name, {})) for name in decoders}


def divergence_stats(first: list[int | None]) -> dict:
    """Per-text first-divergence indices (None: identical) -> how many differ, and how early."""
    hits = [i for i in first if i is not None]
    return {
        "identical": len(first) - len(hits),
        "diverged": len(hits),
        "first_min": min(hits) if hits else None,
        "first_median": statistics.median(hits) if hits else None,
        "first": first,
    }


def against(outs: list[dict], reference: list[dict]) -> dict:
    """`divergence_stats` of each text's tokens against the reference decoding of the same text."""
    first = [first_divergence(o["tokens"], r["tokens"]) for o, r in zip(outs, reference, strict=True)]
    return divergence_stats(first)


def measure(pipe: TTSPipeline, texts: list[str], dtypes: list[str], decoders: list[str], progress: bool = True):
    """Every (decoder, dtype) on every text -> the report (rows of figures + machine). AR always runs."""
    names = ["float32", *[d for d in dtypes if d != "float32"]]
    decoders = ["ar", *[d for d in decoders if d != "ar"]]
    results = {}  # (decoder, dtype) -> per-text decodings
    for name in names:
        runs = runs_for(pipe, DTYPES[name], decoders)
        for decoder, run in runs.items():
            bar = tqdm(texts, desc=f"{decoder} {name}", disable=not progress)
            results[decoder, name] = [decode(pipe, run, text) for text in bar]
    rows = []
    for (decoder, name), outs in results.items():
        rows.append(
            {
                "decoder": decoder,
                "dtype": name,
                "cer": statistics.mean(o["cer"] for o in outs),
                "new_tokens": statistics.mean(len(o["tokens"]) for o in outs),
                "mean_accepted": statistics.mean(o["mean_accepted"] for o in outs),
                "vs_ar_same_dtype": against(outs, results["ar", name]),
                "vs_ar_float32": against(outs, results["ar", "float32"]),
                "vs_own_float32": against(outs, results[decoder, "float32"]),
            }
        )  # fmt: skip
    return {"texts": len(texts), "rows": rows, "machine": machine_info()}


def _fmt(stats: dict, n: int) -> str:
    if not stats["diverged"]:
        return f"0/{n}"
    return f"{stats['diverged']}/{n} (first at {stats['first_min']}, median {stats['first_median']:g})"


def markdown_table(report: dict) -> str:
    n, m = report["texts"], report["machine"]
    lines = [
        f"{n} held-out texts, greedy (temperature 0), {m['cpu']}, {m['threads']} thread(s), torch {m['torch']}, "
        f"{m['date']}. Divergence: texts whose tokens differ from greedy AR (index of the first differing token).",
        "",
        "| decoder | dtype | CER | tokens/text | tokens/pass | differs from AR, same dtype | from AR float32 "
        "| from itself in float32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['decoder']} | {r['dtype']} | {r['cer']:.3f} | {r['new_tokens']:.1f} | {r['mean_accepted']:.2f} | "
            f"{_fmt(r['vs_ar_same_dtype'], n)} | {_fmt(r['vs_ar_float32'], n)} | {_fmt(r['vs_own_float32'], n)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=30, help="held-out test sentences to decode")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=sorted(DTYPES),
                   help="reduced precisions to run (float32 always runs, as the reference)")  # fmt: skip
    p.add_argument("--decoders", nargs="+", default=["ar", "vadusa", "block"], choices=["ar", "vadusa", "block"],
                   help="decoders to run (ar always runs, as the reference)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", type=Path, default=Path("precision.json"), help="report file (JSON)")
    p.add_argument("--md", type=Path, default=Path("precision.md"), help="table file (Markdown)")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error(f"--count must be >= 1, got {args.count}")
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    pipe = TTSPipeline.from_pretrained()
    report = measure(pipe, held_out_texts("test", args.count), args.dtypes, args.decoders)
    args.json.write_text(json.dumps(report, indent=1))
    table = markdown_table(report)
    args.md.write_text(table)
    print(table)


if __name__ == "__main__":
    main()

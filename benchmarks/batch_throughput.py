"""Batch throughput of ar, vadusa and block on the demo TTS: one process, every batch size, one table.

    python -m vadusa.cli.build_demo --write-texts test --count 32 --texts-out /tmp/b32.txt
    python benchmarks/batch_throughput.py --texts /tmp/b32.txt --batch-sizes 1 2 4 8 16 --out /tmp/batch.json

For each batch size B the A/B harness (`vadusa.bench.run_benchmark(..., batch_size=B)`) decodes the texts B
at a time with every decoder (rows interleaved, same seeds); tokens/s is the total new tokens of every row
over the batches' wall time. Each decoder's ratio is to `ar` at the same B, measured in the same process.
Writes the JSON (every report) and prints a Markdown table.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's vadusa

from vadusa.bench import parse_configs, read_texts, run_benchmark, task_from_pipeline  # noqa: E402
from vadusa.speech import TTSPipeline  # noqa: E402


def table(reports: dict) -> str:
    lines = [
        "| B | decoder | tokens/s (all rows) | vs ar at B | CER | accepted/step | latency mean / p90 (s) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for b, report in reports.items():
        for r in report["rows"]:
            if r["decoder"] == "hf-generate":
                continue
            lines.append(
                f"| {b} | {r['decoder']} | {r['tokens_per_second']:.0f} | {r['speedup_vs_ar']:.2f}x | {r['cer']:.3f} | "
                f"{r['mean_accepted']:.2f} | {r['latency_mean_s']:.2f} / {r['latency_p90_s']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=Path, required=True, help="one text per line")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--configs", default="vadusa; block", help="rows besides ar (harness syntax)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--out", type=Path, required=True, help="JSON with every report")
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes):
        p.error(f"--batch-sizes must all be >= 1, got {args.batch_sizes}")
    torch.set_num_threads(args.threads)
    pipe = TTSPipeline.from_pretrained()
    task = task_from_pipeline(pipe, read_texts(args.texts), temperature=args.temperature)
    reports = {}
    for b in args.batch_sizes:
        reports[b] = run_benchmark(task, parse_configs(args.configs), repeats=args.repeats, batch_size=b,
                                   command="python " + " ".join(sys.argv))  # fmt: skip
        print(table({b: reports[b]}), flush=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(reports, indent=1))
    os.replace(tmp, args.out)
    print(table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())

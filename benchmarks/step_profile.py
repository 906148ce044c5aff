"""Where one VADUSA step goes: verify / draft / walk / bookkeeping, in AR steps, at 1 and 2 torch threads.

    python benchmarks/step_profile.py [--heads DIR ...] [--rules tau3,typical] [--threads 1,2] [--repeats 40]
                                      [--json out.json]

For each draft model (default: the shipped demo drafter) and its tree for each rule (`tree-<rule>.json`), the
parts of `vadusa.cost.step_parts` run on the demo LM (CPU weight layout, its units-only processor), all
interleaved round by round with an AR step (`vadusa.cost.ar_step`) and reported as medians:

    draft    the draft model's work for the tree (heads: one batched call; feature drafter: the commit of
             the accepted rows, then one call per tree depth)
    verify   the verification pass over every node
    walk     the output layer over every node, the processors, the rule's draws, the integer walk
    keep     cache compaction to an accepted path and the emitted tokens' bookkeeping
    step     the four in a row (what a decoding step costs)

"outside verify" = step - verify: the work a step adds beyond the forward itself.
"""

import argparse
import json
from pathlib import Path

import torch

from vadusa.cost import ar_step, interleaved_medians, step_parts
from vadusa.draft import resolve_tree
from vadusa.drafter import load_drafter
from vadusa.speech import TTSPipeline

DEMO_HEADS = Path(__file__).resolve().parents[1] / "vadusa" / "assets" / "demo" / "heads"
PARTS = ("draft", "verify", "walk", "keep", "step")


def profile(pipe, heads_dir: Path, rule: str, repeats: int) -> dict:
    drafter = load_drafter(heads_dir, pipe.model)
    acceptance, tolerance = ("typical", 3) if rule == "typical" else ("tolerance", int(rule.removeprefix("tau")))
    tree = resolve_tree("auto", drafter, heads_dir, acceptance, tolerance)
    parts = step_parts(pipe.model, drafter, tree, pipe.logits_processor)
    fns = {"ar": ar_step(pipe.model, pipe.logits_processor)} | {p: parts[p] for p in PARTS}
    t = interleaved_medians(fns, repeats)
    row = {
        "heads": str(heads_dir),
        "kind": type(drafter).__name__,
        "rule": rule,
        "nodes": len(tree),
        "depth": tree.depth,
    }
    row |= {"threads": torch.get_num_threads(), "ar_ms": t["ar"] * 1e3}
    row |= {f"{p}_ms": t[p] * 1e3 for p in PARTS} | {f"{p}_ar": t[p] / t["ar"] for p in PARTS}
    row["outside_verify_ar"] = (t["step"] - t["verify"]) / t["ar"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=Path, nargs="*", default=[DEMO_HEADS], help="draft model directories")
    parser.add_argument("--rules", default="tau3,typical", help="trees to profile: tau1..tau4, typical (comma list)")
    parser.add_argument("--threads", default="1,2", help="torch thread counts, comma separated")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    pipe = TTSPipeline.from_pretrained()
    rows = []
    print("threads | kind | rule | nodes | AR ms | draft | verify | walk | keep | step (AR steps) | outside verify")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for heads_dir, rule in [(h, r) for h in args.heads for r in args.rules.split(",")]:
            r = profile(pipe, heads_dir, rule, args.repeats)
            rows.append(r)
            print(
                f"{threads} | {r['kind']} | {rule} | {r['nodes']} | {r['ar_ms']:.2f} | "
                + " | ".join(f"{r[p + '_ar']:.3f}" for p in PARTS)
                + f" | {r['outside_verify_ar']:.3f}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Rebuild the shipped demo TTS from scratch: corpus -> codec -> judge -> lm -> finetune (short phrases).

    python scripts/build_demo.py                       # full build into vadusa/assets/demo (~1.5 h on 2 cores)
    python scripts/build_demo.py --quick --out /tmp/d  # tiny build in about two minutes (CI)
    python scripts/build_demo.py --stage lm            # one stage (resumes from its checkpoint)
    python scripts/build_demo.py --write-texts test --count 20 --texts-out held_out.txt
                                                       # held-out sentences for benchmarks, no build

Needs espeak-ng and Debian's `fortunes` (the text is read at build time, never committed).
"""

import argparse
import sys
from pathlib import Path

import torch

from vadusa.cli import Parser, nonnegative_int, positive_int, reports_user_errors
from vadusa.speech import build, corpus

DEMO_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo"  # the package's shipped demo


@reports_user_errors
def main(argv=None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEMO_DIR, help="shipped directory")
    p.add_argument("--work", type=Path, default=None, help="cache directory (default: ~/.cache/vadusa/demo-build)")
    p.add_argument("--quick", action="store_true", help="tiny corpus and models, about two minutes")
    p.add_argument("--stage", choices=build.STAGES, action="append", help="run only these stages (repeatable)")
    p.add_argument("--max-sentences", type=positive_int, default=None, help="cap the corpus size")
    p.add_argument("--workers", type=positive_int, default=2, help="processes for the corpus synthesis")
    d = build.BuildConfig(work=Path(), out=Path())
    p.add_argument("--judge-steps", type=positive_int, default=d.judge_steps, help="judge optimizer steps (full build)")
    p.add_argument(
        "--judge-restart", type=nonnegative_int, default=d.judge_restart, help="judge warm-restart step (0: none)"
    )
    p.add_argument("--lm-steps", type=positive_int, default=d.lm_steps, help="LM optimizer steps (full build)")
    p.add_argument("--lm-restart", type=nonnegative_int, default=d.lm_restart, help="LM warm-restart step (0: none)")
    p.add_argument("--finetune-steps", type=positive_int, default=d.finetune_steps,
                   help="steps of the LM fine-tune on sentences + short phrases")  # fmt: skip
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr, help="peak learning rate of the fine-tune")
    p.add_argument("--finetune-restart", type=nonnegative_int, default=d.finetune_restart,
                   help="fine-tune warm-restart step (0: none)")  # fmt: skip
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads of this process")
    p.add_argument("--write-texts", choices=["train", "valid", "test"], help="only write sentences of this split")
    p.add_argument("--count", type=positive_int, default=20, help="how many sentences --write-texts writes")
    p.add_argument("--texts-out", type=Path, default=Path("held_out.txt"), help="file --write-texts writes")
    args = p.parse_args(argv)
    if args.write_texts:
        texts = corpus.held_out_texts(args.write_texts, args.count)
        args.texts_out.write_text("".join(t + "\n" for t in texts))
        print(f"wrote {len(texts)} {args.write_texts} sentences to {args.texts_out}")
        return 0
    torch.set_num_threads(args.threads)
    work = args.work or Path.home() / ".cache" / "vadusa" / ("demo-build-quick" if args.quick else "demo-build")
    cfg = build.BuildConfig(
        work=work,
        out=args.out,
        quick=args.quick,
        max_sentences=args.max_sentences,
        workers=args.workers,
        judge_steps=args.judge_steps,
        judge_restart=args.judge_restart,
        lm_steps=args.lm_steps,
        lm_restart=args.lm_restart,
        finetune_steps=args.finetune_steps,
        finetune_lr=args.finetune_lr,
        finetune_restart=args.finetune_restart,
    )
    build.run(cfg, args.stage or build.STAGES)
    return 0


if __name__ == "__main__":
    sys.exit(main())

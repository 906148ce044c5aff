"""Train VADUSA draft heads data-free, measure their accuracy, build this machine's trees.

    # 1. sample the base on text prompts, cache its states, train heads (frozen base; or --mode joint)
    python train_heads.py --demo --prompts train.txt --cache runs/cache --train --out runs/heads --steps 2000
    # 2. accuracy table acc[h][r] on held-out prompts (greedy, tau=1..4) -> <out>/accuracy.json
    python train_heads.py --demo --out runs/heads --accuracy --heldout test.txt
    # 3. best tree per size and rule, size chosen from measured step costs -> trees/, <out>/tree-<rule>.json
    python train_heads.py --demo --out runs/heads --build-trees --name demo
    # 4. measured accepted tokens per step with vadusa.generate (tree=auto) on held-out prompts
    python train_heads.py --demo --out runs/heads --measure --heldout test.txt

--demo loads the embedded TTS (prompts are texts, spoken with the corpus voice/rate of each text);
--model loads any transformers causal LM directory (prompts are tokenised lines).
Every TrainConfig field is an option (--num-heads, --loss, --lr, ...).

Several processes (torchrun; gloo on CPU, NCCL on GPUs): sampling and training are shared by the ranks,
--batch-tokens / --batch-sequences are per rank (global batch = per rank x ranks); --accuracy, --build-trees
and --measure run on rank 0 alone.
    torchrun --standalone --nproc_per_node 2 train_heads.py --demo --prompts train.txt --cache runs/cache \
        --train --out runs/heads --batch-tokens 512
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from vadusa import accuracy as acc_lib
from vadusa import distributed
from vadusa import train as train_lib
from vadusa.cli import Parser, nonnegative_int, positive_int, reports_user_errors
from vadusa.draft import vadusa_factory
from vadusa.drafter import load_drafter


def load_base(args):
    """(model, encode(text) -> ids, logits_processor, eos_token_id, max_new_tokens(text) -> int)."""
    if args.demo is not None:
        from vadusa.speech import TTSPipeline
        from vadusa.speech.corpus import voice_rate_of

        pipe = TTSPipeline.from_pretrained(args.demo or None)

        def encode(text):
            return pipe.prompt(text, *voice_rate_of(text))[0].tolist()

        def cap(text):
            return pipe.max_new_tokens(text, *voice_rate_of(text))

        return pipe.model, encode, pipe.logits_processor, pipe.eos_token_id, cap
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().to(distributed.device())
    tok = AutoTokenizer.from_pretrained(args.model)
    return model, lambda t: tok(t).input_ids, None, tok.eos_token_id, lambda t: args.max_new_tokens


def config_args(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(train_lib.TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):  # --root-token / --no-root-token
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, dest=f.name)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, dest=f.name)


@reports_user_errors
def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", nargs="?", const="", default=None, help="use the demo TTS (optional weights dir)")
    p.add_argument("--model", default=None, help="a transformers causal LM directory (instead of --demo)")
    p.add_argument("--prompts", type=Path, help="training prompts, one text per line: sample the base into --cache")
    p.add_argument("--cache", type=Path, help="cache directory for the base's states (outside the repo)")
    p.add_argument("--train", action="store_true", help="train heads on --cache into --out")
    p.add_argument("--out", type=Path, required=True, help="heads directory")
    p.add_argument("--max-prompts", type=positive_int, default=None, help="use only the first N training prompts")
    p.add_argument("--resume", action="store_true", help="resume training from <out>/checkpoint.safetensors")
    p.add_argument("--accuracy", action="store_true", help="measure acc[h][r] on --heldout -> <out>/accuracy.json")
    p.add_argument("--heldout", type=Path, help="held-out prompts, one text per line")
    p.add_argument("--max-heldout", type=positive_int, default=None, help="use only the first N held-out prompts")
    p.add_argument("--max-rank", type=nonnegative_int, default=9, help="highest top-k rank measured / used in trees")
    p.add_argument("--build-trees", action="store_true", help="choose and write trees from <out>/accuracy.json")
    p.add_argument("--name", default="demo", help="model name in tree file names")
    p.add_argument("--trees-dir", type=Path, default=Path("trees"), help="where tree JSON/PNG files go")
    p.add_argument("--max-nodes", type=positive_int, default=64, help="largest tree (non-root nodes) considered")
    p.add_argument("--sweep-sizes", default="", help="also write best trees of these sizes (comma list)")
    p.add_argument("--sweep-dir", type=Path, default=None, help="where --sweep-sizes trees go (outside the repo)")
    p.add_argument("--measure", action="store_true", help="measured accepted tokens/step on --heldout (tree=auto)")
    p.add_argument("--tolerances", default="1,2,3,4", help="tau values for --measure")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    config_args(p)
    args = p.parse_args(argv)
    if args.demo is None and args.model is None:
        p.error("pass --demo [DIR] or --model DIR")
    if (args.prompts is not None or args.train) and args.cache is None:
        p.error("--prompts and --train need --cache DIR (the base's cached states)")
    if (args.accuracy or args.measure) and args.heldout is None:
        p.error("--accuracy and --measure need --heldout FILE")
    if args.model is not None and not Path(args.model).is_dir():
        raise NotADirectoryError(f"--model {args.model} is not a directory (a transformers causal LM)")
    tolerances = parse_ints(p, "--tolerances", args.tolerances)
    sweep_sizes = parse_ints(p, "--sweep-sizes", args.sweep_sizes)
    # every file is read before the base is loaded: a bad one fails at once
    train_texts = train_lib.read_prompts(args.prompts)[: args.max_prompts] if args.prompts is not None else None
    heldout_texts = train_lib.read_prompts(args.heldout)[: args.max_heldout] if args.heldout is not None else None
    torch.set_num_threads(args.threads)
    world = distributed.init()  # torchrun's process group; world size 1 (nothing initialised) under plain python
    config = train_lib.config_from_dict(
        {f.name: getattr(args, f.name) for f in dataclasses.fields(train_lib.TrainConfig)}
    )
    model, encode, processor, eos, cap = load_base(args)
    heldout = None
    if heldout_texts is not None:
        heldout = ([encode(t) for t in heldout_texts], [cap(t) for t in heldout_texts])

    if train_texts is not None:
        prompts, caps = [encode(t) for t in train_texts], [cap(t) for t in train_texts]
        train_lib.build_cache(model, prompts, config, args.cache, processor, eos, caps=caps)
    if args.train or args.resume:
        heads = train_lib.train(model, config, args.cache, args.out, resume=args.resume)
        if world.is_main:
            cache = train_lib.load_cache(args.cache).to(distributed.device())
            print(json.dumps(train_lib.evaluate(heads, cache, config.loss, model=model)))
    distributed.teardown()
    if not world.is_main:  # measuring and building trees are single-process: rank 0's
        return 0

    if args.accuracy:
        heads = load_drafter(args.out, model)
        base = vadusa_factory(model, None, heads=str(args.out), tree="chain").model  # merged LoRA if joint
        report = acc_lib.measure_accuracy(
            base, heads, heldout[0], max_rank=args.max_rank, max_new_tokens=heldout[1],
            logits_processor=processor, eos_token_id=eos, states_path=args.out / acc_lib.STATES_NAME,
        )  # fmt: skip
        acc_lib.save_accuracy(report, args.out / acc_lib.ACCURACY_NAME)
        print(json.dumps({r: [round(a[0], 3) for a in t] for r, t in report["acc"].items()}))

    if args.build_trees:
        heads = load_drafter(args.out, model)
        report = acc_lib.load_accuracy(args.out / acc_lib.ACCURACY_NAME, heads)
        states_file = args.out / acc_lib.STATES_NAME
        states = acc_lib.load_states(states_file, report["heads"]) if states_file.is_file() else None
        summary = acc_lib.build_trees(
            model, heads, report, args.trees_dir, args.name, heads_dir=args.out,
            max_nodes=args.max_nodes, max_rank=args.max_rank, states=states,
            sweep_sizes=sweep_sizes, sweep_dir=args.sweep_dir,
            logits_processor=processor,
        )  # fmt: skip
        acc_lib.save_accuracy(summary, args.out / "trees.json")
        for rule, s in summary["rules"].items():
            print(f"{rule}: size {s['size']} expected {s['expected_tokens_per_step']:.2f} tokens/step -> {s['file']}")

    if args.measure:
        results = {}
        for tau in tolerances:
            run = vadusa_factory(model, None, heads=str(args.out), tree="auto", tolerance=tau)
            m = acc_lib.measure_accepted(run, heldout[0], heldout[1], logits_processor=processor, eos_token_id=eos)
            m["predicted"] = run.tree.meta.get("expected_tokens_per_step")
            m["tree_size"] = len(run.tree.paths)
            results[f"tau{tau}"] = m
            print(f"tau{tau}: " + json.dumps(m))
        acc_lib.save_accuracy(results, args.out / "measured.json")


def parse_ints(parser: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """A comma list of integers >= 1 ("1,2,3"); anything else is a usage error naming `flag`."""
    try:
        values = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        parser.error(f"{flag} must be a comma list of integers, got {text!r}")
    if any(v < 1 for v in values):
        parser.error(f"{flag} must hold integers >= 1, got {text!r}")
    return values


if __name__ == "__main__":
    sys.exit(main())

"""CLI: data-free block distillation of a causal LM (vadusa.blockdiff.train); every TrainConfig field is a flag.

    # the demo codec LM, prompts from the corpus train split, adapter installed into the shipped assets
    python train_block.py --demo --corpus runs/speech/work/corpus --out-dir runs/block/demo \
        --block-size 4 --max-minutes 35 --install vadusa/assets/demo/block
    # any transformers causal LM: prompts as a JSON list of token-id lists
    python train_block.py --model my-lm --prompts prompts.json --mask-token-id 0 --eos-token-id 2 --out-dir runs/b
    # continue after an interruption: the same command plus --resume
    # several processes (gloo on CPU, NCCL on GPUs): --batch-size is per rank (global = x ranks)
    torchrun --standalone --nproc_per_node 2 train_block.py --demo --out-dir runs/block/demo --batch-size 8
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import typing
from pathlib import Path

import torch

from vadusa import distributed
from vadusa.artifacts import read_json
from vadusa.blockdiff.train import TrainConfig, read_log, train
from vadusa.cli import Parser, positive_int, reports_user_errors


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, type=float, nargs=2, default=f.default, metavar=("LO", "HI"))
        else:
            cast = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(flag, type=cast, default=f.default)


def demo_items(corpus: Path | None, count: int) -> list[dict]:
    """Train-split sentences with voice, rate and phonemes: from a built corpus, or (no corpus) the first
    `count` train-split fortunes phonemized by espeak-ng here; the distillation needs no audio."""
    from multiprocessing import Pool

    from vadusa.speech.corpus import held_out_texts, text_item

    if corpus is None:
        with Pool(os.cpu_count()) as pool:
            return pool.map(text_item, held_out_texts("train", count), chunksize=64)
    items = [item for shard in sorted(corpus.glob("*.json")) for item in json.loads(shard.read_text())]
    items = [item for item in items if item.get("split") == "train"]
    if not items:
        raise ValueError(f"no train-split sentences found in {corpus}/*.json")
    return items


def demo_task(corpus: Path | None, lm_dir: Path, count: int):
    """(model, prompts, mask id, eos id, logits processor) of the demo TTS, prompts from `demo_items`."""
    from transformers import LlamaForCausalLM, LogitsProcessorList

    from vadusa.speech.lm import UnitsOnly, Vocab

    vocab = Vocab.load(lm_dir / "vocab.json")
    model = LlamaForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    prompts = [vocab.prompt_ids(item["phonemes"], item["voice"], item["rate"]) for item in demo_items(corpus, count)]
    processor = LogitsProcessorList([UnitsOnly(vocab.unit_offset, vocab.num_units, vocab.eos, len(vocab))])
    return model, prompts, vocab.pad, vocab.eos, processor


@reports_user_errors
def main(argv=None) -> int:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true", help="the demo codec LM, train-split prompts")
    source.add_argument("--model", type=Path, help="a transformers causal LM directory")
    parser.add_argument(
        "--corpus", type=Path, help="a built demo corpus (shard-*.json); default: phonemize train-split fortunes"
    )
    parser.add_argument("--lm-dir", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "demo" / "lm")
    parser.add_argument("--prompts", type=Path, help="with --model: JSON list of prompt token-id lists")
    parser.add_argument("--mask-token-id", type=int, help="with --model: a reserved id used as the mask token")
    parser.add_argument("--eos-token-id", type=int, help="with --model: the stop token of the teacher's samples")
    parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint")
    parser.add_argument("--install", type=Path, help="copy the final adapter into this directory")
    parser.add_argument("--threads", type=positive_int, default=1)
    add_config_flags(parser)
    args = parser.parse_args(argv)
    if args.model is not None and args.prompts is None:
        parser.error("--model needs --prompts")
    for flag, path in (("--corpus", args.corpus), ("--model", args.model), ("--lm-dir", args.demo and args.lm_dir)):
        if path and not path.is_dir():
            raise NotADirectoryError(f"{flag} {path} is not a directory")
    prompts = read_json(args.prompts) if args.model is not None else None
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})  # checked here
    torch.set_num_threads(args.threads)
    world = distributed.init()  # torchrun's process group; world size 1 (nothing initialised) under plain python

    if args.demo:
        model, prompts, mask_id, eos_id, processor = demo_task(args.corpus, args.lm_dir, args.pool_size)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        mask_id, eos_id, processor = (
            args.mask_token_id,
            args.eos_token_id,
            None,
        )

    adapter = train(model.to(distributed.device()), prompts, config, mask_id, eos_id, processor, resume=args.resume)
    distributed.teardown()
    if not world.is_main:
        return 0
    log = read_log(config.out_dir)
    if log:
        print(json.dumps(log[-1]))
    if args.install:
        tmp = args.install.with_name(args.install.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(adapter, tmp)
        shutil.rmtree(args.install, ignore_errors=True)
        os.replace(tmp, args.install)
        print(f"adapter installed in {args.install}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

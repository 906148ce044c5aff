"""Synthesise speech with the demo TTS (or weights from --model-dir), offline.

    python decode.py "Hello there, how are you?" -o out.wav [--voice us_female] [--decoder vadusa|ar|block]
                     [--temperature 1.0] [--top-k K] [--top-p P] [--min-p M] [--seed 0] [--json stats.json]
                     [--stream]
    python decode.py --texts texts.txt --out-dir wavs/ --json stats.json [--batch-size 8]
    python decode.py --compare --texts texts.txt --out-dir ab/ [--configs SPEC] [--repeats 3] [--seed 0] [--quick]

--stream synthesises through TTSPipeline.stream (audio chunks while the decoder runs) and prints the
time to the first audio chunk; the wav written is the chunks concatenated.

--compare runs the A/B harness (vadusa.bench): every decoder row on the same texts and seeds, interleaved,
and writes ab/report.json, ab/report.md and ab/pareto.png. SPEC is `decoder:key=v1|v2,key=v; ...`, e.g.
"vadusa:tolerance=1|2|3|4,tree=auto; block:threshold=0.3|0.4"; `hf-generate` and `ar` are always included
(with --batch-size B > 1: `ar` only, and every row decodes B texts at a time; the report gives throughput,
total new tokens per second over all rows, and per-request latency).

Stats JSON keys are documented in vadusa/speech/stats.py: one row per text (cer, audio_seconds,
new_tokens, tokens_per_second, rtf, forward_passes, ...) under "texts", and "summary" with their
means and totals.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from vadusa.bench import compare, read_texts, task_from_pipeline
from vadusa.checks import check_values
from vadusa.cli import Parser, positive_int, reports_user_errors
from vadusa.decoders import check_options
from vadusa.speech import TTSPipeline
from vadusa.speech.stats import summary, text_stats
from vadusa.speech.text import check_text

# given to the decoder if set
DECODER_FLAGS = ("tree", "acceptance", "tolerance", "dynamic_nodes", "dynamic_width", "threshold", "block_size",
                 "unmask", "approximate_cache", "sliding")  # fmt: skip
SAMPLING_FLAGS = ("top_k", "top_p", "min_p")  # given to every decoder's run if set


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="?", help="text to speak")
    p.add_argument("-o", "--output", type=Path, help="output wav (single text)")
    p.add_argument("--texts", type=Path, help="file with one text per line")
    p.add_argument("--out-dir", type=Path, help="directory for the wavs of --texts (0000.wav, 0001.wav, ...)")
    p.add_argument("--voice", default=None, help="voice name (default: the demo's first voice)")
    p.add_argument(
        "--decoder",
        default="vadusa",
        help="vadusa (default: shipped draft heads, typical acceptance, the builder's tree), ar, block, hf-generate, "
        "vadusa-hf (vadusa through model.generate(custom_generate=...))",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only (0: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the most likely tokens holding mass p")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (text i of --texts uses seed + i)")
    p.add_argument("--json", type=Path, help="write per-text and summary statistics here")
    p.add_argument("--model-dir", type=Path, default=None, help="demo weights directory (default: shipped)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    p.add_argument(
        "--batch-size", type=positive_int, default=1,
        help="--texts / --compare: decode this many texts together (left-padded batch; 1: one at a time)",
    )  # fmt: skip
    p.add_argument("--stream", action="store_true", help="stream the audio in chunks; print the time to first audio")
    g = p.add_argument_group("decoder options (vadusa: tree, acceptance, tolerance; block: threshold, block size...)")
    g.add_argument("--tree", help="vadusa tree: auto (the builder's choice), chain, or a tree JSON file")
    g.add_argument("--acceptance", help="vadusa acceptance rule: tolerance, typical, lossless, greedy")
    g.add_argument("--tolerance", type=int, help="vadusa tolerance tau (draws from the base per node)")
    g.add_argument("--dynamic-nodes", type=int, help="vadusa dynamic tree (EAGLE-2): nodes verified per step")
    g.add_argument("--dynamic-width", type=int, help="vadusa dynamic tree: nodes expanded per depth (default 3)")
    g.add_argument("--threshold", type=float, help="block decoding confidence threshold in (0, 1] (default 0.35)")
    g.add_argument("--block-size", type=int, help="block decoding block size (default: the adapter's)")
    g.add_argument(
        "--unmask", choices=["any", "prefix"],
        help="block decoding: confident targets anywhere (Fast-dLLM) or only a leading run (default prefix)",
    )  # fmt: skip
    g.add_argument(
        "--sliding", action=argparse.BooleanOptionalAction, default=None,
        help="block decoding: slide a window of --block-size inputs instead of fixed blocks (default: with prefix)",
    )  # fmt: skip
    g.add_argument(
        "--approximate-cache", action=argparse.BooleanOptionalAction, default=None,
        help="block decoding in fixed blocks: keep settled rows' keys and values within a block (default off)",
    )  # fmt: skip
    c = p.add_argument_group("A/B comparison")
    c.add_argument("--compare", action="store_true", help="run the A/B harness on --texts into --out-dir")
    c.add_argument("--configs", help="rows to compare (default: every shipped decoder and the key sweeps)")
    c.add_argument("--repeats", type=positive_int, default=3, help="timed repeats per row and text (median reported)")
    c.add_argument("--quick", action="store_true", help="a couple of minutes: a few rows, one repeat")
    args = p.parse_args(argv)
    if args.batch_size > 1 and args.texts is None:
        p.error("--batch-size needs --texts FILE (or --compare)")
    if args.batch_size > 1 and args.stream:
        p.error("--stream decodes one text at a time: drop --batch-size")
    if args.compare:
        if args.texts is None or args.out_dir is None:
            p.error("--compare needs --texts FILE and --out-dir DIR")
        return args
    if (args.text is None) == (args.texts is None):
        p.error("give either a text or --texts FILE")
    if args.text is not None and args.output is None:
        p.error("a single text needs -o OUT.wav")
    if args.texts is not None and args.out_dir is None:
        p.error("--texts needs --out-dir DIR")
    return args


def user_options(args) -> dict:
    """The decoder and sampling options the user set (the rest keep the decoder's defaults)."""
    return {k: getattr(args, k) for k in DECODER_FLAGS + SAMPLING_FLAGS if getattr(args, k) is not None}


def check_args(args) -> None:
    """The options' values, the decoder and the output paths, checked before any weights are loaded."""
    check_values(temperature=args.temperature, **user_options(args))
    if not args.compare:
        build = {k: getattr(args, k) for k in DECODER_FLAGS if getattr(args, k) is not None}
        check_options(args.decoder, build)  # an unknown decoder, or e.g. --tolerance for --decoder ar
    if args.output is not None:
        if args.output.is_dir():
            raise IsADirectoryError(f"-o {args.output} is a directory: give a file name such as out.wav")
        if args.output.suffix[1:].upper() not in soundfile.available_formats():
            raise ValueError(f"-o {args.output}: soundfile cannot write {args.output.suffix!r} audio; use .wav")
    for flag, path in (("-o", args.output and args.output.parent), ("--out-dir", args.out_dir),
                       ("--json", args.json and args.json.parent)):  # fmt: skip
        while path is not None and not path.exists() and path != path.parent:
            path = path.parent  # the nearest existing ancestor must be a directory
        if path is not None and not path.is_dir():
            raise NotADirectoryError(f"{flag}: {path} is a file, not a directory")


def write_wav(path: Path, wav: np.ndarray, sample_rate: int) -> None:
    """Write a wav (its directory made); a path libsndfile cannot open is the user's: an OSError naming it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        soundfile.write(str(path), wav, sample_rate)
    except soundfile.LibsndfileError as e:
        raise PermissionError(f"cannot write {path}: {e.error_string}") from e


def speak(pipe: TTSPipeline, text: str, wav_path: Path, args, seed, out=None) -> dict:
    """Synthesise one text (or vocode its decoder output `out`), write its wav, return its stats row."""
    if out is None:
        options = user_options(args)
        if args.stream:
            return speak_streamed(pipe, text, wav_path, args, seed, options)
        out = pipe.generate(
            text, voice=args.voice, decoder=args.decoder, seed=seed, temperature=args.temperature, **options
        )
    start = time.perf_counter()
    wav, sr = pipe.vocode(pipe.units(out))
    vocode_seconds = time.perf_counter() - start
    write_wav(wav_path, wav, sr)
    voice = args.voice or pipe.voices[0]
    return text_stats(text, wav_path, voice, args.decoder, args.temperature, seed, pipe.cer(wav, sr, text),
                      len(wav) / sr, out, vocode_seconds)  # fmt: skip


def speak_batches(pipe: TTSPipeline, texts: list[str], args) -> list[dict]:
    """--texts with --batch-size B: decode B texts at a time (batch k seeded seed + k), then one stats row per
    text; its seconds are its request latency (its batch's start until its row finished)."""
    options = user_options(args)
    outs = pipe.generate_batch(texts, voice=args.voice, decoder=args.decoder, seed=args.seed,
                               temperature=args.temperature, batch_size=args.batch_size, **options)  # fmt: skip
    rows_out = [out.row(i) for out in outs for i in range(len(out.row_new_tokens))]
    seeds = [None if args.seed is None else args.seed + k for k, out in enumerate(outs) for _ in out.row_new_tokens]
    return [speak(pipe, text, args.out_dir / f"{i:04d}.wav", args, seeds[i], rows_out[i])
            for i, text in enumerate(tqdm(texts, desc="vocode", unit="text"))]  # fmt: skip


def speak_streamed(pipe: TTSPipeline, text: str, wav_path: Path, args, seed, options: dict) -> dict:
    """`speak` through `pipe.stream`: the row also has first_audio_seconds and stream_seconds."""
    stream = pipe.stream(text, voice=args.voice, decoder=args.decoder, seed=seed, temperature=args.temperature,
                         **options)  # fmt: skip
    chunks = list(stream)
    wav = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    sr = stream.sample_rate
    write_wav(wav_path, wav, sr)
    out, voice = stream.output, args.voice or pipe.voices[0]
    row = text_stats(text, wav_path, voice, args.decoder, args.temperature, seed, pipe.cer(wav, sr, text),
                     len(wav) / sr, out, stream.seconds - out.seconds)  # fmt: skip
    row.update(first_audio_seconds=stream.first_audio_seconds, stream_seconds=stream.seconds, chunks=len(chunks))
    first = "none (no audio)" if stream.first_audio_seconds is None else f"{stream.first_audio_seconds:.3f} s"
    print(f"time to first audio: {first}; stream total {stream.seconds:.3f} s, {len(chunks)} chunk(s), "
          f"{len(wav) / sr:.2f} s of audio")  # fmt: skip
    return row


@reports_user_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # no "Loading weights" bar for a 4 MB model
    texts = read_texts(args.texts) if args.texts is not None else None  # a bad file fails before any loading
    for i, text in enumerate(texts or [args.text]):
        try:
            check_text(text)
        except ValueError as e:
            raise ValueError(f"{args.texts}, text {i + 1}: {e}" if texts else str(e)) from e
    pipe = TTSPipeline.from_pretrained(args.model_dir)
    if args.compare:
        task = task_from_pipeline(pipe, texts, args.voice, args.temperature)
        report = compare(
            task,
            args.out_dir,
            args.configs,
            args.repeats,
            args.seed or 0,
            args.quick,
            command="python " + " ".join(sys.argv),
            batch_size=args.batch_size,
        )
        print(f"{len(report['rows'])} rows -> {args.out_dir}/report.md, report.json, pareto.png")
        return 0
    if args.text is not None:
        rows = [speak(pipe, args.text, args.output, args, args.seed)]
    elif args.batch_size > 1:
        rows = speak_batches(pipe, texts, args)
    else:
        rows = []
        for i, text in enumerate(tqdm(texts, desc="synthesise", unit="text")):
            seed = None if args.seed is None else args.seed + i
            rows.append(speak(pipe, text, args.out_dir / f"{i:04d}.wav", args, seed))
    stats = {"texts": rows, "summary": summary(rows)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(stats, indent=1) + "\n")
    m = stats["summary"]["mean"]
    print(
        f"{len(rows)} text(s): CER {m['cer']:.3f}, {m['audio_seconds']:.2f} s audio, "
        f"{m['tokens_per_second']:.0f} tokens/s, RTF {m['rtf']:.3f} ({torch.get_num_threads()} thread(s))"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Synthesise speech with the demo TTS (or weights from --model-dir), offline.

    python decode.py "Hello there, how are you?" -o out.wav [--voice us_female] [--decoder ar]
                     [--temperature 1.0] [--seed 0] [--json stats.json]
    python decode.py --texts texts.txt --out-dir wavs/ --json stats.json

Stats JSON keys are documented in vadusa/speech/stats.py: one row per text (cer, audio_seconds,
new_tokens, tokens_per_second, rtf, forward_passes, ...) under "texts", and "summary" with their
means and totals.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import soundfile
import torch
from tqdm import tqdm

from vadusa.speech import TTSPipeline
from vadusa.speech.stats import summary, text_stats


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="?", help="text to speak")
    p.add_argument("-o", "--output", type=Path, help="output wav (single text)")
    p.add_argument("--texts", type=Path, help="file with one text per line")
    p.add_argument("--out-dir", type=Path, help="directory for the wavs of --texts (0000.wav, 0001.wav, ...)")
    p.add_argument("--voice", default=None, help="voice name (default: the demo's first voice)")
    p.add_argument("--decoder", default="ar", help="decoder name from vadusa.decoders (default: ar)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (text i of --texts uses seed + i)")
    p.add_argument("--json", type=Path, help="write per-text and summary statistics here")
    p.add_argument("--model-dir", type=Path, default=None, help="demo weights directory (default: shipped)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    if (args.text is None) == (args.texts is None):
        p.error("give either a text or --texts FILE")
    if args.text is not None and args.output is None:
        p.error("a single text needs -o OUT.wav")
    if args.texts is not None and args.out_dir is None:
        p.error("--texts needs --out-dir DIR")
    return args


def read_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise SystemExit(f"error: texts file {path} not found")
    texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise SystemExit(f"error: texts file {path} has no non-empty lines")
    return texts


def speak(pipe: TTSPipeline, text: str, wav_path: Path, args, seed) -> dict:
    """Synthesise one text, write its wav, return its stats row."""
    wav, sr, out = pipe.synthesize(
        text, voice=args.voice, decoder=args.decoder, seed=seed, temperature=args.temperature
    )
    start = time.perf_counter()
    wav, sr = pipe.vocode(pipe.units(out))  # timed on its own: synthesize already vocoded once
    vocode_seconds = time.perf_counter() - start
    wav_path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(wav_path), wav, sr)
    voice = args.voice or pipe.voices[0]
    return text_stats(text, wav_path, voice, args.decoder, args.temperature, seed, pipe.cer(wav, sr, text),
                      len(wav) / sr, out, vocode_seconds)  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        pipe = TTSPipeline.from_pretrained(args.model_dir)
        if args.text is not None:
            rows = [speak(pipe, args.text, args.output, args, args.seed)]
        else:
            texts = read_texts(args.texts)
            rows = []
            for i, text in enumerate(tqdm(texts, desc="synthesise", unit="text")):
                seed = None if args.seed is None else args.seed + i
                rows.append(speak(pipe, text, args.out_dir / f"{i:04d}.wav", args, seed))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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

"""Synthesis statistics with stable keys (the CLI's --json and the harness read these).

Per text (`text_stats`):
    text             the input text
    wav              path of the written wav ('' if none)
    voice, decoder   the voice and decoder used
    temperature      sampling temperature
    seed             the seed of the sampling generator (null: unseeded)
    cer              judge character error rate of the audio against the text (0 = perfect)
    audio_seconds    length of the synthesised audio
    new_tokens       tokens the decoder generated (EOS included when generated)
    forward_passes   forward passes of the LM, prefill included
    seconds          wall time of the decoder call (the LM part: what decoders speed up)
    vocode_seconds   wall time of units -> wav (Griffin-Lim)
    tokens_per_second  new_tokens / seconds
    rtf              real-time factor of the LM: seconds / audio_seconds (< 1: faster than real time)
    with decode.py --stream, also: first_audio_seconds (wall time to the first audio chunk, null if none),
    stream_seconds (wall time of the whole stream), chunks (audio chunks streamed); vocode_seconds is then
    the stream's time beyond the decoder's

Summary (`summary`): {"count", "threads", "mean": arithmetic mean of every numeric per-text key,
"total": sums of audio_seconds, new_tokens, forward_passes, seconds, vocode_seconds, with
tokens_per_second and rtf recomputed from those sums}.
"""

import torch

NUMERIC = ["cer", "audio_seconds", "new_tokens", "forward_passes", "seconds", "vocode_seconds",
           "tokens_per_second", "rtf"]  # fmt: skip
SUMMED = ["audio_seconds", "new_tokens", "forward_passes", "seconds", "vocode_seconds"]


def text_stats(text, wav_path, voice, decoder, temperature, seed, cer, audio_seconds, out, vocode_seconds) -> dict:
    seconds = float(out.seconds)
    return {
        "text": text,
        "wav": str(wav_path or ""),
        "voice": voice,
        "decoder": decoder,
        "temperature": float(temperature),
        "seed": seed,
        "cer": float(cer),
        "audio_seconds": float(audio_seconds),
        "new_tokens": int(out.new_tokens),
        "forward_passes": int(out.forward_passes),
        "seconds": seconds,
        "vocode_seconds": float(vocode_seconds),
        "tokens_per_second": out.new_tokens / seconds if seconds > 0 else 0.0,
        "rtf": seconds / audio_seconds if audio_seconds > 0 else float("inf"),
    }


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    mean = {k: sum(r[k] for r in rows) / n for k in NUMERIC} if n else {}
    total = {k: sum(r[k] for r in rows) for k in SUMMED}
    total["tokens_per_second"] = total["new_tokens"] / total["seconds"] if total["seconds"] > 0 else 0.0
    total["rtf"] = total["seconds"] / total["audio_seconds"] if total["audio_seconds"] > 0 else float("inf")
    return {"count": n, "threads": torch.get_num_threads(), "mean": mean, "total": total}

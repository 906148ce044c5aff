"""The web demo page (Gradio, optional extra [app]): one text, AR and accelerated decoders side by side.

    demo = build_app(TTSPipeline.from_pretrained())   # gr.Blocks
    demo.launch()                                     # or `python app.py` / `vadusa-app`

Each selected decoder streams its audio (`TTSPipeline.stream`) into its own player, in turn, so their
timings do not share the CPU. Then the page shows, per decoder, tokens/s, speed-up over AR, forward
passes, tokens per pass, time to first audio and the judge's CER, a picture of the accepted units (one
block per forward pass, coloured by how many units that pass accepted) and the spectrograms. Bad input
(empty text, unsupported characters, too long, unknown voice, bad decoder option) shows the CLI's message
(`error: ...`) in the status line, and the server keeps running.

Everything but `build_app` is plain Python (no gradio), so it is tested without a browser.
"""

import shutil
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

from .cli import message
from .generate import GenerationOutput
from .speech.audio import log_mel
from .speech.pipeline import TTSPipeline

DECODERS = ["ar", "vadusa", "block"]  # the page's columns, AR first (the speed-up reference)
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError, TypeError)  # shown, not raised


@dataclass
class PageOptions:
    text: str  # what to say
    voice: str | None = None  # a voice of the demo (None: its default)
    rate: str | None = None  # speaking rate name (None: the default)
    decoders: list[str] = field(default_factory=lambda: list(DECODERS))  # the columns to run, in page order
    temperature: float = 1.0  # sampling temperature (0: greedy)
    seed: int = 0  # sampling seed, the same for every decoder
    tree: str = "auto"  # vadusa: tree (auto, chain, or a tree JSON file)
    acceptance: str = "typical"  # vadusa: acceptance rule (the decoder's preset)
    tolerance: int = 3  # vadusa: tolerance tau
    threshold: float = 0.35  # block: confidence threshold


@dataclass
class Result:
    decoder: str  # decoder name
    wav: np.ndarray  # float32 audio, the stream's chunks concatenated
    sample_rate: int  # Hz
    output: GenerationOutput  # the streamed run's output (tokens, forward passes, accepted lengths)
    timed: GenerationOutput  # the same seeded run again, decoder alone: its seconds give tokens/s
    first_audio_seconds: float | None  # wall time to the first audio chunk
    cer: float  # judge CER of `wav` against the text


def decoder_kwargs(options: PageOptions, decoder: str) -> dict:
    """The page's options that `decoder` takes (the CLI's flags of the same names)."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; the page compares {DECODERS}")
    if decoder == "vadusa":
        tolerance = options.tolerance
        if isinstance(tolerance, float) and tolerance.is_integer():
            tolerance = int(tolerance)  # number boxes send floats
        return {"tree": options.tree, "acceptance": options.acceptance, "tolerance": tolerance}
    if decoder == "block":
        return {"threshold": float(options.threshold)}
    return {}


def check_page(pipe: TTSPipeline, options: PageOptions) -> None:
    """Raise the pipeline's ValueError for a bad text / voice / rate and the page's for bad choices, before any run."""
    if not options.decoders:
        raise ValueError("no decoder selected; pick at least one of " + ", ".join(DECODERS))
    for d in options.decoders:
        decoder_kwargs(options, d)
    if not (isinstance(options.temperature, (int, float)) and 0 <= options.temperature <= 10):
        raise ValueError(f"temperature must be a number in [0, 10], got {options.temperature!r}")
    if options.seed is None or int(options.seed) != options.seed or options.seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {options.seed!r}")
    pipe.prompt(options.text, options.voice, options.rate)


def stream_decoder(pipe: TTSPipeline, options: PageOptions, decoder: str):
    """Yield the decoder's float32 audio chunks; the last item yielded is its `Result`.

    While streaming, the decoder shares the CPU with the vocoder and the page's audio encoding, so its speed
    is measured on a second run of the same seed with nothing else going on (`Result.timed`).
    """
    kwargs = dict(voice=options.voice, decoder=decoder, seed=int(options.seed), rate=options.rate,
                  temperature=float(options.temperature), **decoder_kwargs(options, decoder))  # fmt: skip
    stream = pipe.stream(options.text, **kwargs)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        yield chunk
    wav = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    cer = pipe.cer(wav, stream.sample_rate, options.text) if len(wav) else 1.0
    timed = pipe.generate(options.text, **kwargs)
    yield Result(decoder, wav, stream.sample_rate, stream.output, timed, stream.first_audio_seconds, cer)


def run_all(pipe: TTSPipeline, options: PageOptions) -> list[Result]:
    """Every selected decoder in turn, without the page: what the page shows, for tests and scripts."""
    check_page(pipe, options)
    return [list(stream_decoder(pipe, options, d))[-1] for d in options.decoders]


def steps(out: GenerationOutput) -> list[int]:
    """Tokens emitted by each forward pass: the first pass's (one token for ar and vadusa; block decoding's
    first window may decide several), then every later pass's."""
    if not out.new_tokens:
        return []
    return [out.new_tokens - sum(out.accepted_lengths)] + list(out.accepted_lengths)


def stats_markdown(results: list[Result]) -> str:
    """A Markdown table: per decoder tokens/s (decoder alone), speed-up over AR, forward passes, tokens/pass,
    time to first audio (of the stream, as the page played it), audio length and CER."""
    ar = next((r for r in results if r.decoder == "ar"), None)
    rows = [
        "| decoder | tokens/s | speed-up vs AR | forward passes | tokens/pass | first audio (s) | audio (s) | CER |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        tps = r.timed.tokens_per_second
        speedup = f"{tps / ar.timed.tokens_per_second:.2f}x" if ar is not None else "(no AR run)"
        first = "-" if r.first_audio_seconds is None else f"{r.first_audio_seconds:.3f}"
        per_pass = r.output.new_tokens / max(1, r.output.forward_passes)
        rows.append(
            f"| {r.decoder} | {tps:.0f} | {speedup} | {r.output.forward_passes} | {per_pass:.2f} | {first}"
            f" | {len(r.wav) / r.sample_rate:.2f} | {r.cer:.3f} |"
        )
    return "\n".join(rows)


def accepted_figure(results: list[Result]) -> Figure:
    """One strip per decoder: a block per forward pass, as wide as the units it accepted, coloured by that count."""
    top = max([max(steps(r.output), default=1) for r in results] + [1])
    colours = [(0.75, 0.75, 0.75)] + [_cmap(i / max(1, top - 1)) for i in range(top)]  # index = tokens accepted
    fig = Figure(figsize=(10, 0.7 + 0.55 * len(results)), layout="constrained")
    ax = fig.add_subplot()
    for row, r in enumerate(results):
        start = 0
        for n in steps(r.output):
            ax.barh(row, n, left=start, height=0.8, color=colours[min(n, top)], edgecolor="white", linewidth=0.4)
            start += n
    ax.set_yticks(range(len(results)), [f"{r.decoder} ({r.output.forward_passes} passes)" for r in results])
    ax.invert_yaxis()
    ax.set_xlabel("generated unit (each block: one forward pass; colour and width: units it accepted)")
    ax.set_xlim(0, max([r.output.new_tokens for r in results] + [1]))
    handles = [_patch(colours[n]) for n in range(1, top + 1)]
    ax.legend(handles, [str(n) for n in range(1, top + 1)], title="units / pass", loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=7, title_fontsize=7, ncols=1 + top // 6)  # fmt: skip
    return fig


def spectrogram_figure(results: list[Result]) -> Figure:
    """Log-mel spectrogram of each decoder's audio, one row per decoder, on a shared time axis."""
    fig = Figure(figsize=(10, 0.4 + 1.5 * len(results)), layout="constrained")
    axes = fig.subplots(len(results), 1, sharex=True, squeeze=False)[:, 0]
    longest = max([len(r.wav) / r.sample_rate for r in results] + [0.1])
    for ax, r in zip(axes, results, strict=True):
        seconds = len(r.wav) / r.sample_rate
        if len(r.wav):
            mel = log_mel(r.wav, r.sample_rate).numpy().T  # (n_mels, T)
            ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, 0, mel.shape[0]))
        ax.set_ylabel(r.decoder)
        ax.set_yticks([])
        ax.set_facecolor("#eeeeee")  # past the end of a shorter take
        ax.set_xlim(0, longest)
    axes[-1].set_xlabel("seconds")
    return fig


def _cmap(x: float):
    from matplotlib import colormaps

    return colormaps["viridis"](0.15 + 0.8 * x)


def _patch(colour):
    from matplotlib.patches import Patch

    return Patch(color=colour)


def int16(wav: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] -> int16 PCM (gradio would peak-normalise each float chunk on its own)."""
    return (np.clip(wav, -1.0, 1.0) * 32767).astype(np.int16)


def error_message(e: BaseException) -> str:
    """The CLI's wording (`error: ...`, as decode.py prints it: `vadusa.cli.message`)."""
    return f"error: {message(e)}"


# ----- the page -----
def page_updates(pipe: TTSPipeline, options: PageOptions, stream_audio: bool):
    """What the page shows, as a generator of {output name: new value}: the status line, each player ("ar",
    "vadusa", "block": int16 chunks when streaming, else the whole wav), then "stats", "accepted", "spectrograms".
    A user error ends it with the CLI's message in "status"; nothing is raised, so the server keeps running."""
    cleared = {"stats": "", "accepted": None, "spectrograms": None, **{d: None for d in DECODERS}}
    try:
        options.decoders = [d for d in DECODERS if d in (options.decoders or [])]
        check_page(pipe, options)
    except USER_ERRORS as e:
        yield {"status": error_message(e), **cleared}
        return
    yield {"status": "synthesising ...", **cleared}
    results = []
    try:
        for d in options.decoders:
            yield {"status": f"synthesising with {d} ..."}
            for item in stream_decoder(pipe, options, d):
                if isinstance(item, Result):
                    results.append(item)
                    if not stream_audio and len(item.wav):
                        yield {d: (item.sample_rate, int16(item.wav))}
                elif stream_audio:
                    yield {d: (pipe.codec.config.sample_rate, int16(item))}
    except USER_ERRORS as e:
        yield {"status": error_message(e)}
        return
    silent = [r.decoder for r in results if not len(r.wav)]
    note = f" ({', '.join(silent)}: no speech units, nothing to play)" if silent else ""
    yield {
        "status": f"done: {len(results)} decoder(s), seed {int(options.seed)}{note}",
        "stats": stats_markdown(results),
        "accepted": accepted_figure(results),
        "spectrograms": spectrogram_figure(results),
    }


def build_app(pipe: TTSPipeline, stream_audio: bool | None = None):
    """The gr.Blocks page for `pipe`. `stream_audio`: stream into the players (gradio needs ffmpeg for that;
    default: when ffmpeg is on PATH); otherwise each player gets its decoder's whole wav when it is done."""
    import gradio as gr

    stream_audio = shutil.which("ffmpeg") is not None if stream_audio is None else stream_audio
    with gr.Blocks(title="vadusa: multi-token speech decoding") as demo:
        gr.Markdown(
            "## vadusa demo TTS: auto-regressive vs accelerated decoding\n"
            "Type a sentence, pick a voice and the decoders; each one speaks in turn"
            + (" (streamed as it decodes)" if stream_audio else "")
            + ". The table compares their speed; the pictures show what each forward pass accepted."
        )
        with gr.Row():
            with gr.Column(scale=3):
                text = gr.Textbox(label="Text", value="The quick brown fox jumps over the lazy dog.", lines=2,
                                  elem_id="text")  # fmt: skip
                with gr.Row():
                    voice = gr.Dropdown(pipe.voices, value=pipe.voices[0], label="Voice", allow_custom_value=True)
                    rate = gr.Dropdown(pipe.rates, value="normal" if "normal" in pipe.rates else pipe.rates[0],
                                       label="Rate", allow_custom_value=True)  # fmt: skip
                    decoders = gr.CheckboxGroup(DECODERS, value=DECODERS, label="Decoders")
            with gr.Column(scale=2):
                with gr.Row():
                    temperature = gr.Number(1.0, label="Temperature", minimum=0, maximum=10, step=0.1)
                    seed = gr.Number(0, label="Seed", precision=0)
                with gr.Row():
                    tree = gr.Textbox("auto", label="vadusa tree", max_lines=1)
                    acceptance = gr.Dropdown(["typical", "tolerance", "lossless", "greedy"], value="typical",
                                             label="vadusa acceptance", allow_custom_value=True)  # fmt: skip
                    tolerance = gr.Number(3, label="vadusa tolerance", precision=0)
                    threshold = gr.Number(0.35, label="block threshold", step=0.05)
        run = gr.Button("Synthesize", variant="primary", elem_id="run")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            players = {
                d: gr.Audio(
                    label=d,
                    streaming=stream_audio,
                    autoplay=stream_audio,
                    type="numpy",
                    interactive=False,
                    elem_id=f"audio-{d}",
                )  # fmt: skip
                for d in DECODERS
            }
        stats = gr.Markdown(elem_id="stats")
        accepted = gr.Plot(label="accepted units", elem_id="accepted")
        spectrograms = gr.Plot(label="spectrograms", elem_id="spectrograms")
        inputs = [text, voice, rate, decoders, temperature, seed, tree, acceptance, tolerance, threshold]
        outputs = [status, *players.values(), stats, accepted, spectrograms]
        names = ["status", *DECODERS, "stats", "accepted", "spectrograms"]  # of `outputs`, in order

        def respond(*values):  # page updates by name -> the outputs' list, gr.skip() for the unchanged
            for changes in page_updates(pipe, PageOptions(*values), stream_audio):
                yield [changes.get(name, gr.skip()) for name in names]

        run.click(respond, inputs, outputs, concurrency_limit=1)
        text.submit(respond, inputs, outputs, concurrency_limit=1)
    return demo

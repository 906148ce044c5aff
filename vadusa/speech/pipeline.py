"""TTSPipeline: text -> phoneme prompt -> codec LM (any decoder) -> units -> Griffin-Lim wav, plus the judge.

    pipe = TTSPipeline.from_pretrained()                 # the shipped vadusa/assets/demo
    wav, sr, out = pipe.synthesize("Hello there.", seed=0)
    pipe.cer(wav, sr, "Hello there.")                    # judge CER of what was said

Each step is also public, for decoders and harnesses that drive the model themselves:
`prompt`, `logits_processor`, `eos_token_id`, `max_new_tokens`, `units`, `vocode`, `cer`.
`stream` yields audio chunks while the decoder runs (vadusa/speech/stream.py).
"""

import json
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM, LogitsProcessorList

from ..cpu import multirow_onednn, onednn_pays, transpose_linear_weights
from ..decoders import DECODERS, build_decoder, decoder_options
from ..generate import GenerationOutput
from .codec import UnitCodec
from .corpus import DEFAULT_RATE, DEFAULT_VOICE, VOICES
from .corpus import RATES as RATE_WPM
from .judge import Judge
from .lm import UnitsOnly, Vocab
from .stream import SpeechStream, StreamConfig, StreamVocoder, UnitStreamer
from .text import check_text, phonemize

DEMO_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo"
REQUIRED = ["lm/config.json", "lm/model.safetensors", "lm/vocab.json", "codec/config.json",
            "codec/model.safetensors", "judge/config.json", "judge/model.safetensors"]  # fmt: skip


class TTSPipeline:
    def __init__(self, model, vocab: Vocab, codec: UnitCodec, judge: Judge | None, directory: Path):
        self.model = model.eval()
        self.vocab = vocab
        self.codec = codec
        self.judge = judge
        self.directory = Path(directory)
        self.eos_token_id = vocab.eos
        self.logits_processor = LogitsProcessorList(
            [UnitsOnly(vocab.unit_offset, vocab.num_units, vocab.eos, model.config.vocab_size)]
        )
        self.max_positions = model.config.max_position_embeddings
        self._runs = {}  # (decoder, build options) -> bound run

    @classmethod
    def from_pretrained(cls, directory: Path | str | None = None) -> "TTSPipeline":
        """Load lm/, codec/ and judge/ from `directory` (default: the shipped demo weights)."""
        directory = Path(directory) if directory is not None else DEMO_DIR
        missing = [name for name in REQUIRED if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"demo TTS weights missing in {directory}: {missing}; rebuild them with"
                f" `python scripts/build_demo.py --out {directory}`"
            )
        try:
            vocab = Vocab.load(directory / "lm" / "vocab.json")
            model = transpose_linear_weights(LlamaForCausalLM.from_pretrained(directory / "lm", dtype=torch.float32))
            if onednn_pays():  # this CPU's multi-row products are faster on oneDNN (`vadusa.cpu`)
                multirow_onednn(model)
            codec = UnitCodec.from_pretrained(directory / "codec")
            judge = Judge.from_pretrained(directory / "judge")
        except Exception as e:  # a truncated or edited file: say which directory, not a deep traceback
            raise ValueError(
                f"demo TTS weights in {directory} are corrupt or incompatible ({type(e).__name__}: {e})"
            ) from e
        if model.config.vocab_size != len(vocab) or vocab.num_units != codec.config.num_units:
            raise ValueError(
                f"demo TTS weights in {directory} do not match: LM vocabulary {model.config.vocab_size},"
                f" vocab.json {len(vocab)}, codec units {codec.config.num_units} vs {vocab.num_units}"
            )
        return cls(model, vocab, codec, judge, directory)

    # ----- text -> prompt -----
    @property
    def voices(self) -> list[str]:
        return list(self.vocab.voices)

    @property
    def rates(self) -> list[str]:
        return list(self.vocab.rates)

    def _check_voice(self, voice: str | None, rate: str | None) -> tuple[str, str]:
        voice = DEFAULT_VOICE if voice is None else voice
        rate = DEFAULT_RATE if rate is None else rate
        if voice not in self.vocab.voices or voice not in VOICES:
            raise ValueError(f"unknown voice {voice!r}; expected one of {self.voices}")
        if rate not in self.vocab.rates or rate not in RATE_WPM:
            raise ValueError(f"unknown rate {rate!r}; expected one of {self.rates}")
        return voice, rate

    def prompt(self, text: str, voice: str | None = None, rate: str | None = None) -> torch.Tensor:
        """(1, T) prompt ids `<bos> voice rate phonemes <sep>`; bad text, voice or rate raise ValueError."""
        voice, rate = self._check_voice(voice, rate)
        clean = check_text(text)
        ids = self.vocab.prompt_ids(phonemize(clean, VOICES[voice], RATE_WPM[rate]), voice, rate)
        room = self.max_positions - len(ids)
        if room < 2 * len(ids):
            raise ValueError(
                f"text is too long for the demo model: {len(ids)} prompt tokens leave {room} of"
                f" {self.max_positions} positions for the speech; split it into shorter sentences"
            )
        return torch.tensor([ids], dtype=torch.long)

    def max_new_tokens(self, text: str, voice: str | None = None, rate: str | None = None) -> int:
        """A generous cap on units: 3 units per prompt token + 2 s, within the model's positions."""
        return self._cap(self.prompt(text, voice, rate).shape[1])

    def _cap(self, prompt_len: int) -> int:
        return min(self.max_positions - prompt_len, 3 * prompt_len + 50)  # speech is ~1.5 units per phoneme

    # ----- units -> audio, judge -----
    def units(self, out: GenerationOutput) -> torch.Tensor:
        """(U,) unit ids 0..K-1 of a generation (EOS and anything that is not a unit dropped)."""
        tokens = out.tokens.long() - self.vocab.unit_offset
        return tokens[(tokens >= 0) & (tokens < self.vocab.num_units)]

    def vocode(self, units: torch.Tensor) -> tuple[np.ndarray, int]:
        return self.codec.vocode(units)

    def cer(self, wav, sample_rate: int, text: str) -> float:
        """Judge character error rate of `wav` against `text` (edit distance / reference length)."""
        if self.judge is None:
            raise RuntimeError("this pipeline has no judge")
        return self.judge.cer(wav, sample_rate, text)

    # ----- the whole path -----
    def decoder(self, name: str = "ar", **options):
        """The run bound by `vadusa.decoders.build_decoder` for (name, options), built once and cached."""
        key = (name, json.dumps(options, sort_keys=True, default=str))
        if key not in self._runs:
            self._runs[key] = build_decoder(name, self.model, assets=self.directory, **options)
        return self._runs[key]

    @torch.inference_mode()
    def generate(
        self,
        text: str,
        voice: str | None = None,
        decoder: str = "ar",
        seed: int | None = None,
        rate: str | None = None,
        temperature: float = 1.0,
        **decode_kwargs,
    ) -> GenerationOutput:
        """text -> the decoder's GenerationOutput (units as tokens), without vocoding.

        `decode_kwargs` that name options of the decoder's factory (for example a tree) build the
        decoder; the others go to its run (for example top_k, acceptance, max_new_tokens, streamer).
        """
        return self._bind(text, voice, decoder, seed, rate, temperature, decode_kwargs)()

    def _bind(self, text, voice, decoder, seed, rate, temperature, decode_kwargs):
        """Check the text, voice and options and build the decoder now; return `call(**more_run_kwargs)`."""
        ids = self.prompt(text, voice, rate)
        build_names = set(decoder_options(decoder)) if decoder in DECODERS else set()
        options = {k: v for k, v in decode_kwargs.items() if k in build_names}
        call = {k: v for k, v in decode_kwargs.items() if k not in build_names}
        call.setdefault("max_new_tokens", self._cap(ids.shape[1]))
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        run = self.decoder(decoder, **options)
        return lambda **more: run(
            ids,
            temperature=temperature,
            logits_processor=self.logits_processor,
            eos_token_id=self.eos_token_id,
            generator=generator,
            **call,
            **more,
        )

    def stream(
        self,
        text: str,
        voice: str | None = None,
        decoder: str = "ar",
        seed: int | None = None,
        stream_config: StreamConfig | None = None,
        **kwargs,
    ) -> SpeechStream:
        """text -> an iterable of float32 audio chunks (at `self.codec.config.sample_rate`) produced while the
        decoder runs: `for chunk in pipe.stream("Hello.", decoder="vadusa", seed=0): play(chunk)`.

        Same arguments as `synthesize`; bad text, voice or options raise ValueError here, before anything runs.
        The chunks concatenate to (nearly) the one-shot `synthesize` wav of the same seed (see `speech.stream`).
        A generation with no units yields nothing and warns with `NoSpeechWarning`.
        """
        if "streamer" in kwargs:
            raise ValueError("stream() brings its own streamer; call generate(..., streamer=...) to use yours")
        kwargs = dict(kwargs)
        rate, temperature = kwargs.pop("rate", None), kwargs.pop("temperature", 1.0)
        call = self._bind(text, voice, decoder, seed, rate, temperature, kwargs)
        streamer = UnitStreamer(self.vocab.unit_offset, self.vocab.num_units)
        vocoder = StreamVocoder(self.codec, stream_config)
        return SpeechStream(lambda s: call(streamer=s), streamer, vocoder, self.codec.config.sample_rate, text)

    def synthesize(
        self, text: str, voice: str | None = None, decoder: str = "ar", seed: int | None = None, **kwargs
    ) -> tuple[np.ndarray, int, GenerationOutput]:
        """text -> (float32 wav, sample rate, GenerationOutput): `generate`, then `vocode` of its units."""
        out = self.generate(text, voice, decoder, seed, **kwargs)
        wav, sr = self.vocode(self.units(out))
        return wav, sr, out

    @torch.inference_mode()
    def generate_batch(
        self,
        texts: list[str],
        voice: str | None = None,
        decoder: str = "ar",
        seed: int | None = None,
        rate: str | None = None,
        temperature: float = 1.0,
        batch_size: int = 8,
        **decode_kwargs,
    ) -> list[GenerationOutput]:
        """texts -> one GenerationOutput per batch of `batch_size` texts (left-padded prompts, each row with its
        own budget, `GenerationOutput.row(i)` its text's output). Batch k samples with seed + k."""
        if isinstance(texts, str) or not texts:
            raise ValueError(f"texts must be a non-empty list of strings, got {texts!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        from ..batch import left_pad

        prompts = [self.prompt(t, voice, rate)[0] for t in texts]  # every text checked before any decoding
        build_names = set(decoder_options(decoder)) if decoder in DECODERS else set()
        options = {k: v for k, v in decode_kwargs.items() if k in build_names}
        call = {k: v for k, v in decode_kwargs.items() if k not in build_names}
        caps = call.pop("max_new_tokens", None)
        run = self.decoder(decoder, **options)
        outs = []
        for k, first in enumerate(range(0, len(texts), batch_size)):
            chunk = prompts[first : first + batch_size]
            ids, mask = left_pad(chunk, self.vocab.pad)  # (b, T): a lone text has no padding
            budgets = [self._cap(len(p)) for p in chunk] if caps is None else caps
            if len(chunk) == 1 and isinstance(budgets, list):
                budgets = budgets[0]  # batch size 1 keeps its own loop
            generator = torch.Generator().manual_seed(seed + k) if seed is not None else None
            outs.append(
                run(
                    ids,
                    attention_mask=mask if len(chunk) > 1 else None,
                    max_new_tokens=budgets,
                    temperature=temperature,
                    logits_processor=self.logits_processor,
                    eos_token_id=self.eos_token_id,
                    generator=generator,
                    **call,
                )
            )
        return outs

    def synthesize_batch(
        self, texts: list[str], voice: str | None = None, decoder: str = "ar", seed: int | None = None,
        batch_size: int = 8, **kwargs,
    ) -> list[tuple[np.ndarray, int, GenerationOutput]]:  # fmt: skip
        """texts -> one (float32 wav, sample rate, GenerationOutput of its row) per text, decoded `batch_size`
        texts at a time (`generate_batch`), then vocoded one by one."""
        results = []
        for out in self.generate_batch(texts, voice, decoder, seed, batch_size=batch_size, **kwargs):
            for i in range(len(out.row_new_tokens)):
                row = out.row(i)
                results.append((*self.vocode(self.units(row)), row))
        return results

"""The one registry of decoders: a name -> a factory that binds a backend to a model.

    run = build_decoder("vadusa", model, assets=Path("my-heads-dir"), tree="auto")
    out = run(input_ids, max_new_tokens=500, temperature=1.0, eos_token_id=..., logits_processor=...,
              streamer=None, generator=g)          # -> GenerationOutput
    out = run(ids, attention_mask=mask, max_new_tokens=[...])  # a left-padded batch: "ar", "vadusa", "block"

A factory loads whatever its backend needs once (heads, trees, adapters) and returns `run`. The
pipeline, the CLI and the A/B harness only ever call `build_decoder`; adding a backend is one entry
in DECODERS.
"""

import inspect
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .blockdiff.generate import block_factory
from .checks import check_values
from .draft import vadusa_factory
from .generate import GenerationOutput, check_prompt, generate_ar
from .hf import sampling_config, vadusa_hf_factory
from .processors import as_processor

Run = Callable[..., GenerationOutput]


def _ar(model, assets: Path | None = None) -> Run:
    return lambda input_ids, **kw: generate_ar(model, input_ids, **kw)


def _hf_generate(model, assets: Path | None = None) -> Run:
    """transformers' own `model.generate` with its KV cache: the baseline a user would otherwise run."""

    def run(
        input_ids,
        max_new_tokens=256,
        temperature=1.0,
        top_k=None,
        eos_token_id=None,
        logits_processor=None,
        streamer=None,
        generator=None,
        top_p=1.0,
        min_p=0.0,
        attention_mask=None,
    ) -> GenerationOutput:
        if attention_mask is not None or not isinstance(max_new_tokens, int):
            raise ValueError("hf-generate decodes one prompt per call here: batches go to 'ar', 'vadusa', 'block'")
        start = time.perf_counter()
        prompt = check_prompt(input_ids).to(model.device)
        if generator is not None:  # generate() samples from the global RNG: seed it from the generator
            torch.manual_seed(generator.initial_seed())
        config = sampling_config(max_new_tokens, temperature, top_k, top_p, min_p, eos_token_id)
        sequences = model.generate(
            prompt, generation_config=config, logits_processor=as_processor(logits_processor), streamer=streamer
        )
        new = sequences.shape[1] - prompt.shape[1]
        return GenerationOutput(sequences, new, new, [1] * (new - 1), time.perf_counter() - start)

    return run


DECODERS: dict[str, Callable[..., Run]] = {
    "ar": _ar,
    "hf-generate": _hf_generate,
    "vadusa": vadusa_factory,
    "vadusa-hf": vadusa_hf_factory,  # the same heads and tree through model.generate(custom_generate=...)
    "block": block_factory,
}


def build_decoder(name: str, model, assets: Path | None = None, **options) -> Run:
    """Bind decoder `name` to `model`; `assets` is the directory holding its artifacts (heads, trees...)."""
    check_options(name, options)
    return DECODERS[name](model, assets, **options)


def decoder_options(name: str) -> list[str]:
    """The option names decoder `name` accepts when it is built."""
    params = list(inspect.signature(DECODERS[name]).parameters.values())[2:]  # after (model, assets)
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD]


def check_options(name: str, options: dict) -> None:
    """Raise ValueError for an unknown decoder, an option it does not take, or a bad value (`checks.check_values`)."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; expected one of {sorted(DECODERS)}")
    unknown = sorted(set(options) - set(decoder_options(name)))
    if unknown:
        accepted = decoder_options(name) or "none"
        raise ValueError(f"unknown option(s) {unknown} for decoder {name!r}; it accepts {accepted}")
    check_values(**options)

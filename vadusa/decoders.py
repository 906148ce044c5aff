"""The one registry of decoders: a name -> a factory that binds a backend to a model.

    run = build_decoder("vadusa", model, assets=Path("my-heads-dir"), tree="auto")
    out = run(input_ids, max_new_tokens=500, temperature=1.0, eos_token_id=..., logits_processor=...,
              streamer=None, generator=g)          # -> GenerationOutput

A factory loads whatever its backend needs once (heads, trees, adapters) and returns `run`. The
pipeline, the CLI and the A/B harness only ever call `build_decoder`; adding a backend is one entry
in DECODERS.
"""

from collections.abc import Callable
from pathlib import Path

from .generate import GenerationOutput, generate_ar

Run = Callable[..., GenerationOutput]


def _ar(model, assets: Path | None = None) -> Run:
    return lambda input_ids, **kw: generate_ar(model, input_ids, **kw)


DECODERS: dict[str, Callable[..., Run]] = {"ar": _ar}


def build_decoder(name: str, model, assets: Path | None = None, **options) -> Run:
    """Bind decoder `name` to `model`; `assets` is the directory holding its artifacts (heads, trees...)."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; expected one of {sorted(DECODERS)}")
    return DECODERS[name](model, assets, **options)

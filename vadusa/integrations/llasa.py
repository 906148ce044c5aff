"""Llasa (HKUST): a Llama-3.2 causal LM writing XCodec2 speech tokens.

Layout: vocabulary 193,800; speech tokens `<|s_0|>` .. `<|s_65535|>` = 128264 .. 193799; the prompt ends with
`<|SPEECH_GENERATION_START|>` = 128260; `<|SPEECH_GENERATION_END|>` = 128261 is the EOS. Llasa samples with
`model.generate(input_ids, max_length=2048, eos_token_id=128261, do_sample=True, top_p=1, temperature=0.8)`.

    from vadusa.integrations import llasa
    ids = model.generate(input_ids, custom_generate=vadusa.custom_generate, draft_heads=heads, tree="auto",
                         acceptance="tolerance", tolerance=3, **llasa.generate_kwargs())
    codes = llasa.speech_codes(ids[0, input_ids.shape[1]:])     # -> XCodec2 decode_code

Heads for it (prompts: one formatted chat prompt per line, ending with <|SPEECH_GENERATION_START|>):
    python train_heads.py --model HKUSTAudio/Llasa-1B --prompts llasa_prompts.txt --cache runs/llasa-cache \\
        --train --out runs/llasa-heads --shared-output
    python train_heads.py --model HKUSTAudio/Llasa-1B --out runs/llasa-heads --accuracy --heldout held.txt
    python train_heads.py --model HKUSTAudio/Llasa-1B --out runs/llasa-heads --build-trees --name llasa
(`--shared-output`: the heads feed the base's 193,800-row output layer instead of private copies of it.)
"""

from dataclasses import dataclass

import torch

from . import TokenRange


@dataclass(frozen=True)
class Layout:
    speech_start: int = 128264  # id of <|s_0|>
    num_codes: int = 65536  # XCodec2 codes: <|s_0|> .. <|s_65535|>
    generation_start: int = 128260  # <|SPEECH_GENERATION_START|>, last prompt token
    generation_end: int = 128261  # <|SPEECH_GENERATION_END|>, the EOS
    vocab_size: int = 193800  # the LM's vocabulary


SAMPLING = {"do_sample": True, "temperature": 0.8, "top_p": 1.0, "max_length": 2048}  # Llasa's own call


def logits_processor(layout: Layout = Layout()) -> list:
    """Speech tokens and the end of speech only."""
    return [TokenRange(layout.speech_start, layout.speech_start + layout.num_codes, (layout.generation_end,))]


def generate_kwargs(layout: Layout = Layout(), **overrides) -> dict:
    """`model.generate` keyword arguments of Llasa's sampling, with the speech-range processor."""
    return SAMPLING | {"eos_token_id": layout.generation_end, "logits_processor": logits_processor(layout)} | overrides


def speech_codes(tokens: torch.Tensor, layout: Layout = Layout()) -> torch.Tensor:
    """Generated token ids -> XCodec2 codes (the EOS and anything outside the speech range dropped)."""
    codes = tokens - layout.speech_start
    return codes[(codes >= 0) & (codes < layout.num_codes)]

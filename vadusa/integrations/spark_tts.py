"""Spark-TTS (SparkAudio): a Qwen2.5-0.5B causal LM writing BiCodec semantic tokens `<|bicodec_semantic_N|>`.

Layout: the semantic tokens are consecutive added tokens of the tokenizer (`layout_from_tokenizer` reads them);
`<|im_end|>` ends the speech. Spark-TTS samples with `model.generate(max_new_tokens=3000, do_sample=True,
top_k=50, top_p=0.95, temperature=0.8)`.

    from vadusa.integrations import spark_tts
    layout = spark_tts.layout_from_tokenizer(tokenizer)
    ids = model.generate(input_ids, custom_generate=vadusa.custom_generate, draft_heads=heads, tree="auto",
                         acceptance="tolerance", tolerance=3, **spark_tts.generate_kwargs(layout))
    semantic = spark_tts.semantic_codes(ids[0, input_ids.shape[1]:], layout)   # -> BiCodec detokenize

Heads for it (prompts: Spark-TTS prompts, text + global tokens, one per line):
    python train_heads.py --model SparkAudio/Spark-TTS-0.5B/LLM --prompts spark_prompts.txt \\
        --cache runs/spark-cache --train --out runs/spark-heads
"""

from dataclasses import dataclass

import torch

from . import TokenRange


@dataclass(frozen=True)
class Layout:
    semantic_start: int  # id of <|bicodec_semantic_0|>
    num_semantic: int = 8192  # BiCodec semantic codebook size
    end: int = 151645  # <|im_end|>, the EOS


SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "max_new_tokens": 3000}


def layout_from_tokenizer(tokenizer, num_semantic: int = 8192) -> Layout:
    """The layout of a Spark-TTS tokenizer: its <|bicodec_semantic_0|> id; the codebook must be consecutive ids."""
    first = tokenizer.convert_tokens_to_ids("<|bicodec_semantic_0|>")
    last = tokenizer.convert_tokens_to_ids(f"<|bicodec_semantic_{num_semantic - 1}|>")
    if first is None or last != first + num_semantic - 1:
        raise ValueError(f"tokenizer has no consecutive <|bicodec_semantic_0..{num_semantic - 1}|> tokens")
    return Layout(first, num_semantic, tokenizer.convert_tokens_to_ids("<|im_end|>"))


def logits_processor(layout: Layout) -> list:
    """Semantic tokens and the end token only."""
    return [TokenRange(layout.semantic_start, layout.semantic_start + layout.num_semantic, (layout.end,))]


def generate_kwargs(layout: Layout, **overrides) -> dict:
    """`model.generate` keyword arguments of Spark-TTS's sampling, with the semantic-range processor."""
    return SAMPLING | {"eos_token_id": layout.end, "logits_processor": logits_processor(layout)} | overrides


def semantic_codes(tokens: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Generated ids -> BiCodec semantic codes (the end token and anything else dropped)."""
    codes = tokens - layout.semantic_start
    return codes[(codes >= 0) & (codes < layout.num_semantic)]

"""`custom_generate`: VADUSA behind transformers' own `model.generate(...)`.

    ids = model.generate(input_ids, custom_generate=vadusa.custom_generate, draft_heads=heads, tree=tree,
                         acceptance="tolerance", tolerance=3, do_sample=True, top_p=0.95, max_new_tokens=500)

transformers 5.x prepares everything as for its own sampling loop (generation config, logits processors and
warpers, stopping criteria, prompt embeddings) and calls `custom_generate(model, input_ids, logits_processor=...,
stopping_criteria=..., generation_config=..., **model_kwargs)`; the parameters below that its `_sample` lacks
(draft_heads, tree, acceptance, ...) are taken from `generate`'s keyword arguments. So every usual argument keeps
its meaning: the prepared processors (repetition penalty, n-gram ban, min new tokens, suppressed and bad words,
the user's own) run at every tree node with that node's history, and the trailing warpers (temperature, top-k,
top-p, min-p) become the engine's own options, applied once in `scores_to_probs`, never twice.

A left-padded batch (`input_ids` (B, T) + `attention_mask`) decodes through `vadusa.batch`, each row accepting
its own tokens per step; finished rows end in the pad token, as in transformers.

`generate` hands neither `streamer` nor `assistant_model` to a callable; both are read from its frame (the
caller), so a streamer streams and an assistant model is refused instead of ignored.
"""

import copy
import inspect
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, StoppingCriteriaList
from transformers.generation import (
    EosTokenCriteria,
    GenerateDecoderOnlyOutput,
    MaxLengthCriteria,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .checks import check_values
from .draft import resolve_tree, vadusa_factory
from .drafter import load_drafter
from .generate import GenerationOutput, check_prompt, generate
from .processors import as_processor

NATIVE_WARPERS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)  # in their order
HISTORY_FREE = (SuppressTokensLogitsProcessor, *NATIVE_WARPERS)  # transformers processors that ignore input_ids
UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


@dataclass
class VadusaGenerateOutput(GenerateDecoderOnlyOutput):
    """transformers' decoder-only output, plus what the verification loop did."""

    forward_passes: int | None = None  # forward passes of the base model, prefill included
    accepted_lengths: list[int] | None = None  # tokens emitted by each pass after the prefill


class _HistoryFree:
    """A transformers processor known not to read input_ids: the engine may run it on every tree node at once."""

    reads_history = False

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, input_ids, scores):
        return self.processor(input_ids, scores)


def split_warpers(processors) -> tuple[list, dict]:
    """transformers' prepared list -> (processors, native sampling options).

    When the list ends with temperature / top-k / top-p / min-p warpers in transformers' own order (min tokens
    to keep 1), they become the engine's options (same filters, one sort per step instead of one per depth);
    otherwise the whole list stays as processors and the engine samples at temperature 1, unfiltered.
    """
    items = list(processors)
    options = {"temperature": 1.0, "top_k": None, "top_p": 1.0, "min_p": 0.0}
    start = len(items)
    while start > 0 and type(items[start - 1]) in NATIVE_WARPERS:
        start -= 1
    kinds = [NATIVE_WARPERS.index(type(w)) for w in items[start:]]
    plain = all(getattr(w, "min_tokens_to_keep", 1) == 1 and getattr(w, "filter_value", -1) == -float("inf")
                for w in items[start:] if not isinstance(w, TemperatureLogitsWarper))  # fmt: skip
    if kinds != sorted(set(kinds)) or not plain:
        return items, options
    for w in items[start:]:
        if isinstance(w, TemperatureLogitsWarper):
            options["temperature"] = float(w.temperature)
        elif isinstance(w, TopKLogitsWarper):
            options["top_k"] = int(w.top_k)
        elif isinstance(w, TopPLogitsWarper):
            options["top_p"] = float(w.top_p)
        else:
            options["min_p"] = float(w.min_p)
    return items[:start], options


def per_node(processor):
    """A processor ready for the engine's per-node calls (rows = tree nodes, not batch rows): history-free ones
    are marked so. A repetition penalty's prompt_ignore_length tensor is what generate builds from the
    attention mask (each row's left padding); the engine's histories never hold padding, so it is dropped."""
    if type(processor) in HISTORY_FREE:
        return _HistoryFree(processor)
    ignore = getattr(processor, "prompt_ignore_length", None)
    if isinstance(processor, RepetitionPenaltyLogitsProcessor) and torch.is_tensor(ignore):
        processor = copy.copy(processor)
        processor.prompt_ignore_length = None
    return processor


class _AfterPrompt:
    """A streamer that skips the engine's prompt `put`: transformers' generate has already put the prompt."""

    def __init__(self, streamer):
        self.streamer, self.skipped = streamer, False

    def put(self, value):
        if self.skipped:
            self.streamer.put(value)
        self.skipped = True

    def end(self):
        self.streamer.end()


def caller_arguments() -> dict:
    """`streamer` and `assistant_model` of the `generate` call that called custom_generate (two frames up)."""
    frame = inspect.currentframe().f_back.f_back
    if frame is None or frame.f_code.co_name != "generate" or "custom_generate" not in frame.f_locals:
        return {}
    return {k: frame.f_locals.get(k) for k in ("streamer", "assistant_model")}


def resolve_draft(model, draft_heads):
    """DraftHeads / FeatureDrafter / an artifact directory -> a draft model checked against `model`."""
    if draft_heads is None:
        raise ValueError(
            "custom_generate needs draft_heads=: a DraftHeads, a FeatureDrafter or the directory they were saved to"
        )
    if isinstance(draft_heads, str | Path):
        draft_heads = load_drafter(Path(draft_heads), model)
    if not hasattr(draft_heads, "check_compatible"):
        raise TypeError(f"draft_heads must be DraftHeads, FeatureDrafter or a directory, got {type(draft_heads)}")
    draft_heads.check_compatible(model)  # hidden size, vocabulary, base name / output-layer fingerprint
    return draft_heads


def check_call(generation_config, input_ids, model_kwargs, assistant_model, streamer) -> None:
    """Refuse what the engine cannot do yet, with the argument named."""
    if generation_config.num_beams is not None and generation_config.num_beams > 1:
        raise ValueError(f"custom_generate decodes with one sequence: num_beams must be 1, got "
                         f"{generation_config.num_beams}")  # fmt: skip
    if assistant_model is not None:
        raise ValueError("custom_generate drafts with its own draft heads: drop assistant_model")
    if "inputs_embeds" in model_kwargs and model_kwargs["inputs_embeds"].shape[0] != 1:
        rows = model_kwargs["inputs_embeds"].shape[0]
        raise ValueError(f"custom_generate takes inputs_embeds one prompt at a time, got {rows} rows (batch input_ids)")
    if input_ids is not None and input_ids.shape[0] > 1 and streamer is not None:
        raise ValueError(f"a streamer follows one sequence, got a batch of {input_ids.shape[0]} prompts")
    cache = model_kwargs.get("past_key_values")
    if getattr(cache, "_is_user_defined", False) and cache.get_seq_length() > 0:
        raise ValueError("custom_generate starts from the prompt: pass no filled past_key_values")
    asked = [name for name in UNSUPPORTED_OUTPUTS if getattr(generation_config, name, False)]
    if asked and generation_config.return_dict_in_generate:
        raise ValueError(f"custom_generate returns sequences only: {asked} are not supported")


def padded_batch_processors(processors, attention_mask) -> list:
    """The engine's per-row histories hold no padding, while transformers counts min_length / min_new_tokens
    over the padded rows. On a left-padded batch, such processors that never bite there (min_length within the
    padded prompt width, min_new_tokens 0) are dropped; ones that would are refused, naming them."""
    if attention_mask is None or bool((attention_mask == 1).all()):
        return processors
    width, kept, refused = attention_mask.shape[1], [], []
    for p in processors:
        if isinstance(p, MinLengthLogitsProcessor) and p.min_length <= width:
            continue  # the padded length is never below it
        if isinstance(p, MinNewTokensLengthLogitsProcessor) and p.min_new_tokens <= 0:
            continue
        if isinstance(p, MinLengthLogitsProcessor | MinNewTokensLengthLogitsProcessor):
            refused.append(type(p).__name__)
        kept.append(p)
    if refused:
        raise ValueError(
            f"custom_generate on a left-padded batch does not take {refused} (min_length / min_new_tokens count "
            "padding in transformers): decode such prompts one at a time, or unpadded"
        )
    return kept


def native_stops(stopping_criteria, max_length: int) -> tuple[int, list[int] | None, StoppingCriteriaList | None]:
    """(max_length, EOS ids, the other criteria): length and EOS are the engine's own stops."""
    eos, others = None, StoppingCriteriaList()
    for criterion in stopping_criteria:
        if isinstance(criterion, MaxLengthCriteria):
            max_length = min(max_length, criterion.max_length)
        elif isinstance(criterion, EosTokenCriteria):
            eos = criterion.eos_token_id.flatten().tolist()
        else:
            others.append(criterion)
    return max_length, eos, others or None


def custom_generate(
    model,
    input_ids: torch.Tensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config: GenerationConfig | None = None,
    synced_gpus: bool = False,
    streamer=None,
    draft_heads=None,
    tree=None,
    acceptance: str = "tolerance",
    tolerance: int = 3,
    typical_epsilon: float = 0.09,
    typical_alpha: float = 0.3,
    generator: torch.Generator | None = None,
    **model_kwargs,
):
    """The decoding method `model.generate(..., custom_generate=vadusa.custom_generate)` calls (module doc).

    `draft_heads` (required) and `tree` (None: the top-1 chain; "chain", "auto" for a heads directory, a JSON
    path, a Tree or a DynamicTree), `acceptance`, `tolerance`, `typical_epsilon`, `typical_alpha` and
    `generator` are VADUSA's options; everything else is transformers'. `do_sample=False` decodes greedily
    (identical to greedy `model.generate`); with `do_sample=True`, "lossless" samples exactly `model.generate`'s
    distribution. Returns the sequences tensor, or a `VadusaGenerateOutput` with `return_dict_in_generate=True`.
    """
    caller = caller_arguments()
    streamer = streamer if streamer is not None else caller.get("streamer")
    config = generation_config if generation_config is not None else model.generation_config
    check_call(config, input_ids, model_kwargs, caller.get("assistant_model"), streamer)
    heads = resolve_draft(model, draft_heads)
    heads_dir = Path(draft_heads) if isinstance(draft_heads, str | Path) else None
    resolved = resolve_tree(tree, heads, heads_dir, acceptance, tolerance)

    processors, sampling = split_warpers(logits_processor or [])
    if not config.do_sample:
        sampling["temperature"] = 0.0
    max_length, eos, others = native_stops(stopping_criteria or [], config.max_length or 20)
    if eos is None and config.eos_token_id is not None:
        eos = config.eos_token_id
    embeds = model_kwargs.get("inputs_embeds")
    processors = padded_batch_processors(processors, model_kwargs.get("attention_mask") if embeds is None else None)
    ids = input_ids if input_ids is not None and input_ids.shape[-1] > 0 else None
    out = generate(
        model,
        heads,
        ids,
        tree=resolved,
        max_new_tokens=max_length - (input_ids.shape[-1] if input_ids is not None else 0),
        acceptance=acceptance,
        tolerance=tolerance,
        eos_token_id=eos,
        logits_processor=[per_node(p) for p in processors],
        streamer=_AfterPrompt(streamer) if streamer is not None else None,
        generator=generator,
        typical_epsilon=typical_epsilon,
        typical_alpha=typical_alpha,
        inputs_embeds=embeds,
        stopping_criteria=others,
        attention_mask=model_kwargs.get("attention_mask") if embeds is None else None,
        **sampling,
    )
    sequences = pad_finished(out, config, eos)
    if not config.return_dict_in_generate:
        return sequences
    return VadusaGenerateOutput(
        sequences=sequences, forward_passes=out.forward_passes, accepted_lengths=out.accepted_lengths
    )


def pad_finished(out, config: GenerationConfig, eos) -> torch.Tensor:
    """A batch's rows that finished early end in transformers' pad token (its EOS when none is set), as there."""
    if out.sequences.shape[0] == 1:
        return out.sequences
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    sequences, width = out.sequences.clone(), out.sequences.shape[1] - max(out.row_new_tokens)
    for i, new in enumerate(out.row_new_tokens):
        sequences[i, width + new :] = 0 if pad is None else pad
    return sequences


def sampling_config(max_new_tokens, temperature, top_k, top_p, min_p, eos_token_id, **extra) -> GenerationConfig:
    """The GenerationConfig of the engine's sampling options: do_sample at temperature > 0, greedy at 0."""
    check_values(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or 0, "top_p": top_p,
                "min_p": min_p or None}  # fmt: skip
    return GenerationConfig(
        **(sampling if temperature > 0 else {"do_sample": False}),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id if isinstance(eos_token_id, int) else None,
        **extra,
    )


def vadusa_hf_factory(
    model,
    assets: Path | None = None,
    heads=None,
    tree="auto",
    acceptance: str = "typical",  # the "vadusa" decoder's preset
    tolerance: int = 3,
    typical_epsilon: float = 0.09,
    typical_alpha: float = 0.3,
    dynamic_nodes: int = 0,
    dynamic_width: int = 3,
):
    """The "vadusa-hf" decoder: the "vadusa" decoder's heads and tree, driven through `model.generate(...,
    custom_generate=custom_generate)` as a transformers user would call it (the harness row beside "vadusa")."""
    native = vadusa_factory(model, assets, heads, tree, acceptance, tolerance, typical_epsilon, typical_alpha,
                            dynamic_nodes, dynamic_width)  # fmt: skip
    base, drafter, resolved = native.model, native.heads, native.tree

    def run(input_ids, max_new_tokens=256, temperature=1.0, top_k=None, eos_token_id=None, logits_processor=None,
            streamer=None, generator=None, top_p=1.0, min_p=0.0) -> GenerationOutput:  # fmt: skip
        start = time.perf_counter()
        prompt = check_prompt(input_ids).to(base.device)
        config = sampling_config(max_new_tokens, temperature, top_k, top_p, min_p, eos_token_id,
                                 return_dict_in_generate=True)  # fmt: skip
        out = base.generate(
            prompt,
            generation_config=config,
            logits_processor=as_processor(logits_processor),
            streamer=streamer,
            custom_generate=custom_generate,
            draft_heads=drafter,
            tree=resolved,
            acceptance=acceptance,
            tolerance=tolerance,
            typical_epsilon=typical_epsilon,
            typical_alpha=typical_alpha,
            generator=generator,
        )
        new = out.sequences.shape[1] - prompt.shape[1]
        seconds = time.perf_counter() - start
        return GenerationOutput(out.sequences, new, out.forward_passes, out.accepted_lengths, seconds)

    run.tree, run.heads, run.model = resolved, drafter, base
    return run

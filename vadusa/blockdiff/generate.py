"""Block decoding with confidence thresholding, on the engine's pre-allocated KV cache.

One block of n <= block_size targets p .. p+n-1 at a time. Because of the token shift, the block's
window of inputs is [x_{p-1}, y_p, ..., y_{p+n-2}] (y = the target or the mask token while it is
undecided) and the output at window slot j is the prediction for target p + j. Each forward:

    1. runs [commit ; window]: the commit is the previous, completed window (or the prompt at prefill),
       written to the cache once and kept; the window's cache entries are dropped again,
    2. samples every undecided target and unmasks all whose sampled probability >= threshold, and
       always the most confident one (`unmask="any"`, Fast-dLLM's rule); or only the leading run of them
       from the first undecided target on, which is always unmasked (`unmask="prefix"`: the block's
       decided targets then always form a prefix, as in speculative decoding),
    3. emits the decided prefix of the block (streaming), shrinks the block at an EOS or the budget.

The prefix is never recomputed; a completed block rides along with the next block's first forward, so
it costs no forward of its own; and when the block's last forward had no mask token among its inputs
(block-causal students), that forward's keys and values are the commit's, kept, and the commit is not
run at all (test: the same tokens as a no-cache reference). At block size 1 this is auto-regressive
decoding (test: temperature 0 gives greedy `generate_ar`'s tokens). The mask token is never sampled.
Logits processors see the emitted prefix as history (for targets after undecided ones inside a block, it
lacks the block's own).

Approximate cache (`approximate_cache=True`, block-causal students; Fast-dLLM's approximate block cache):
a window row whose input was already decided when it was fed, and whose target is decided now, keeps its
keys and values from that forward, so later forwards of the block start after it and the completed block
costs no commit beyond its rows that were fed as masks. Approximate because such a row attended to mask
tokens that were decided later; with the prefix rule most rows are settled this way, and each forward
carries about the block's undecided part instead of the whole block plus a commit.

Sliding windows (`sliding=True`, with `unmask="prefix"`): no fixed blocks. Every forward reads a window of
`block_size` inputs, [the k inputs the last forward decided ; block_size - k mask tokens], bidirectionally,
as a training block whose first k units are unmasked; it predicts the next block_size - k + 1 targets and
decides their leading confident run. The k decided inputs are settled and stay in the cache (as with the
approximate cache, they saw mask tokens), so there is no commit, every forward carries exactly `block_size`
rows, and a run of confident targets is never cut by a block boundary.

Teacher prefix (`block_teacher_prefix` adapters, masks.py): the commit is the completed block's targets,
run causally through the base's weights (the cache is generate_ar's own); the commit's last row is the
base's prediction of target p, drawn and kept at the block's first forward like an auto-regressive
step; the window [y_p, ..., y_{p+n-2}] runs through the student and predicts p+1 .. p+n-1.
"""

import torch

from ..accept import sample
from ..batch import Rows, additive, check_batch, embeds_batch
from ..checks import check_values
from ..generate import (
    GenerationOutput,
    _Decoding,
    output_logits,
    scores_to_probs,
    split_model,
)
from ..processors import as_processor, reads_history
from .masks import MaskBuffer


def block_probs(
    logits, history, processor, temperature: float, top_k: int | None, mask_token_id: int, top_p=1.0, min_p=0.0
) -> torch.Tensor:
    """(k, V) float32 logits (`output_logits`) -> (k, V) probabilities: processors, then temperature, top-k,
    top-p, min-p (`scores_to_probs`).

    The mask token is never a target: its probability is 0.
    """
    scores = logits if processor is None else processor(history.expand(logits.shape[0], -1), logits)
    scores[:, mask_token_id] = float("-inf")
    return scores_to_probs(scores, history, None, temperature, top_k, top_p, min_p)


def sample_and_select(
    probs, temperature: float, threshold: float, generator, keep: int | None = None, prefix: bool = False
):
    """(k, V) probs of the undecided targets in order -> (tokens (k,), chosen (k,) bool): draw every row, keep
    rows whose draw has prob >= threshold.

    Row `keep` (default: the most confident row; with `prefix`, row 0) is always kept, so every forward decides
    at least one target. With `prefix` only the leading run of kept rows is kept.
    """
    greedy = temperature == 0
    tokens = probs.argmax(-1) if greedy else sample(probs, generator)[:, 0]  # (k,)
    confidence = probs.gather(-1, tokens[:, None])[:, 0]  # (k,)
    chosen = confidence >= threshold
    chosen[keep if keep is not None else 0 if prefix else confidence.argmax()] = True
    if prefix:
        chosen = chosen.cumprod(0).bool()
    return tokens, chosen


def settled_rows(fed: list[bool], decided: list[bool]) -> int:
    """How many leading window rows the approximate cache keeps: rows whose input was decided when fed
    (`fed`, one per row) and whose target is decided now (`decided`, the targets of the same rows)."""
    kept = 0
    while kept < len(fed) and fed[kept] and decided[kept]:
        kept += 1
    return kept


def shifted(index: list[int], offset: int, device=None) -> slice | torch.Tensor:
    """An ascending list of positions + offset, as a slice when it is one run (the usual case: no gather)."""
    if index[-1] - index[0] + 1 == len(index):
        return slice(index[0] + offset, index[-1] + 1 + offset)
    return torch.tensor(index, device=device) + offset


def window_inputs(body, ids: torch.Tensor, past: int, prompt_embeds) -> dict:
    """Model inputs of rows `ids` (1, w) at positions past.. : {"input_ids"}, or {"inputs_embeds"} whose rows
    inside an embeddings prompt (1, T, D) are the prompt's own and the others the model's token embeddings."""
    inside = 0 if prompt_embeds is None else max(0, prompt_embeds.shape[1] - past)
    if inside == 0:
        return {"input_ids": ids}
    embeds = body.get_input_embeddings()(ids)  # (1, w, D)
    embeds[:, :inside] = prompt_embeds[:, past : past + inside]
    return {"inputs_embeds": embeds}


def forward_window(body, cache, masks: MaskBuffer, commit, window, causal_commit: bool, prompt_embeds=None):
    """One forward of [commit ; window] after the cache, under the decoding mask -> (c + w, D) hidden states.

    The commit sees the cache and itself (causally if `causal_commit`), the window sees everything before it
    and itself; both are appended to the cache (callers crop what they do not keep). Rows at positions of an
    embeddings prompt (`prompt_embeds`, 1, T, D) read its embeddings instead of their placeholder ids."""
    past = cache.get_seq_length()
    ids = torch.cat([commit, window])[None]  # (1, c + w)
    mask = masks.take(past, len(commit), len(window), causal_commit)
    positions = torch.arange(past, past + ids.shape[1], device=ids.device)[None]
    inputs = window_inputs(body, ids, past, prompt_embeds)
    out = body(**inputs, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    masks.clear()
    return out.last_hidden_state[0]


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor | None = None,
    block_size: int = 4,
    threshold: float = 0.02,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    eos_token_id=None,
    logits_processor=None,
    generator: torch.Generator | None = None,
    streamer=None,
    top_k: int | None = None,
    mask_token_id: int | None = None,
    causal_clean: bool | None = None,
    teacher_prefix: bool | None = None,
    unmask: str = "any",
    approximate_cache: bool = False,
    sliding: bool = False,
    top_p: float = 1.0,
    min_p: float = 0.0,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> GenerationOutput:
    """Decode block by block with a distilled student (see `load_student`); returns a `GenerationOutput`.

    `approximate_cache` keeps settled rows across the forwards of a block, `sliding` slides a window of
    `block_size` inputs instead of stepping through fixed blocks (see above; block-causal students only;
    sliding needs `unmask="prefix"`). `mask_token_id`, `causal_clean` (how a completed block is committed:
    causally, or bidirectionally within the block, as in training) and `teacher_prefix` (see above) default
    to the model config's `mask_token_id` / `block_causal_clean` / `block_teacher_prefix`, set by
    `load_student`. `accepted_lengths` holds the targets decided by each forward after the first. The
    returned `cache` is None: block-causal keys and values are not an auto-regressive cache to continue from.
    The prompt may be `inputs_embeds` (1, T, D) instead of ids (`sequences` then holds the new tokens only).
    (B, T) prompts with a left-padding `attention_mask` decode as a batch in sliding windows (`slide_rows`).
    """
    check_values(
        block_size=block_size, threshold=threshold, unmask=unmask, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
    )  # fmt: skip
    mask_token_id = mask_token_id if mask_token_id is not None else getattr(model.config, "mask_token_id", None)
    vocab = model.get_input_embeddings().weight.shape[0]
    if mask_token_id is None or not 0 <= int(mask_token_id) < vocab:
        raise ValueError(
            f"missing mask token: got mask_token_id={mask_token_id!r}; load the model with "
            f"vadusa.blockdiff.load_student or pass a reserved id in [0, {vocab})"
        )
    if causal_clean is None:
        causal_clean = bool(getattr(model.config, "block_causal_clean", False))
    if teacher_prefix is None:
        teacher_prefix = bool(getattr(model.config, "block_teacher_prefix", False))
    split = getattr(model, "base_tokens", None)  # a teacher-prefix student's TwoWayLinear switch
    body, out_layer = split_model(model)
    processor = as_processor(logits_processor)
    ids, pad_mask = check_batch(input_ids, attention_mask) if inputs_embeds is None else embeds_batch(attention_mask)
    if ids is not None and (ids.shape[0] > 1 or not isinstance(max_new_tokens, int)):
        if not (sliding and unmask == "prefix" and not (teacher_prefix or causal_clean)):
            raise ValueError(
                "batched block decoding runs sliding windows (sliding=True, unmask='prefix', a block-causal student:"
                f" the 'block' decoder's default); got sliding={sliding}, unmask={unmask!r}, "
                f"causal_clean={causal_clean}, teacher_prefix={teacher_prefix}"
            )
        r = Rows(model, ids, pad_mask, max_new_tokens, block_size, eos_token_id, streamer)
        return slide_rows(r, body, out_layer, processor, block_size, threshold, temperature, top_k, generator,
                          int(mask_token_id), top_p, min_p)  # fmt: skip
    if ids is not None:  # one request: its padding (if any) dropped
        input_ids = ids if pad_mask is None else ids[:, pad_mask[0].bool()]
    d = _Decoding(model, input_ids, max_new_tokens, block_size, eos_token_id, streamer, inputs_embeds)
    device, dtype = model.device, out_layer.weight.dtype
    masks = MaskBuffer(2 * block_size, d.seq.shape[1], dtype, device)
    seq = d.seq[0]  # (capacity,) prompt + decided tokens (decided-but-not-emitted ones sit past d.length)
    shift = 0 if teacher_prefix else 1  # the window starts at input p - shift
    # a window whose inputs were all decided already holds the keys and values its commit would write
    reusable = not (teacher_prefix or causal_clean)

    def probs_of(rows):  # (k, D) hidden rows -> (k, V) probabilities of their targets
        logits, history = output_logits(out_layer, rows), d.history()  # (k, V)
        return block_probs(logits, history, processor, temperature, top_k, mask_token_id, top_p, min_p)

    if (approximate_cache or sliding) and not reusable:
        name = "sliding" if sliding else "approximate_cache"
        raise ValueError(f"{name} needs a block-causal student; this one is causal-clean or teacher-prefix")
    if sliding:
        if unmask != "prefix":
            raise ValueError(f"sliding windows decide a prefix of their targets: needs unmask='prefix', got {unmask!r}")
        return slide(d, body, probs_of, masks, block_size, threshold, temperature, generator, mask_token_id)
    commit, causal_commit = d.prompt[0, : d.prompt_len - shift], True  # the prefill: inputs before the window
    while not d.done:
        p = d.length  # first target of this block
        n = min(block_size, d.max_new_tokens - (p - d.prompt_len))  # block shrinks at the budget
        seq[p : p + n] = mask_token_id
        values: list[int | None] = [None] * n  # the block's decided targets (None: still masked)
        emitted = 0  # targets of this block already emitted
        start = p - shift  # the window's first input (with the approximate cache, the inputs before it are cached)
        while emitted < n:
            past = d.cache.get_seq_length()
            window = seq[start : p - 1 + n]  # (w,) inputs up to the block's last target but one
            fed = [q < p or values[q - p] is not None for q in range(start, p - 1 + n)]  # (w,) input decided
            clean = all(fed)  # no mask token among the window's inputs
            if split is not None:
                split.count = len(commit) if teacher_prefix else 0
            hidden = forward_window(body, d.cache, masks, commit, window, causal_commit, d.embeds)
            hidden = hidden[max(0, p - 1 - past) :]  # (r, D) rows of inputs p-1 ... p+n-2: targets n-r .. n-1
            first_pass = d.forward_passes == 0
            d.forward_passes += 1
            teacher_row = teacher_prefix and len(commit) > 0  # this forward draws target p from the base
            commit = commit[:0]

            todo = [j for j in range(n) if values[j] is None]  # undecided slots, all >= n - r
            probs = probs_of(hidden[shifted(todo, hidden.shape[0] - n, device)])  # (k, V)
            keep = 0 if teacher_row else None
            tokens, chosen = sample_and_select(probs, temperature, threshold, generator, keep, unmask == "prefix")
            slots = [j for j, c in zip(todo, chosen.tolist(), strict=True) if c]  # decided by this forward
            picked = tokens[chosen]  # (len(slots),)
            for j, token in zip(slots, picked.tolist(), strict=True):
                values[j] = token
            seq[shifted(slots, p, device)] = picked
            first_eos = next((j for j in range(n) if values[j] in d.eos), None)
            if first_eos is not None:  # nothing after the first decided EOS is needed
                n = first_eos + 1
            if not first_pass:
                d.accepted_lengths.append(sum(j < n for j in slots))

            ready = emitted  # end of the block's decided prefix
            while ready < n and values[ready] is not None:
                ready += 1
            if ready > emitted:
                d.emit(values[emitted:ready])
                emitted = ready
            if approximate_cache:
                kept = settled_rows(fed, [v is not None for v in values[start - p + 1 :]])
                if kept < len(window):
                    d.cache.crop(kept - len(window))  # keep the commit and the settled rows
                start += kept
            elif emitted < n or not (reusable and clean):
                d.cache.crop(-len(window))  # keep the commit, drop the window
        if approximate_cache:  # the commit is the completed block's rows that were fed as masks
            commit, causal_commit = seq[start : p - 1 + n].clone(), False
            continue
        if reusable and clean:  # the last window was the completed block's clean inputs: its cache is the commit
            continue
        commit, causal_commit = seq[p - shift : p - shift + n].clone(), causal_clean or teacher_prefix
    out = d.output()
    out.cache = None
    return out


def slide(d: _Decoding, body, probs_of, masks: MaskBuffer, size: int, threshold, temperature, generator, mask_token_id):
    """Sliding windows of `size` inputs: [the inputs the last forward decided ; mask tokens]; see the module doc.

    The window's first k inputs are decided targets, fed for the first time; its other rows are masks whose
    outputs, with the last decided input's, predict the next size - k + 1 targets. The leading run of confident
    ones is decided (prefix rule), the k decided rows stay in the cache (settled: their targets are decided),
    and the next window starts at the first newly decided input.
    """
    seq = d.seq[0]
    start = d.prompt_len - 1  # first input not in the cache; inputs start .. p-1 are decided
    commit = d.prompt[0, :start]  # the prefill: the prompt before its last token, causal
    while not d.done:
        p = d.length  # first undecided target
        n = min(size - (p - start) + 1, d.max_new_tokens - (p - d.prompt_len))  # targets p .. p+n-1
        seq[p : p + n - 1] = mask_token_id
        window = seq[start : p - 1 + n]  # (w,) w = (p - start) + n - 1 <= size
        hidden = forward_window(body, d.cache, masks, commit, window, True, d.embeds)[-n:]  # (n, D) inputs p-1 .. p+n-2
        tokens, chosen = sample_and_select(probs_of(hidden), temperature, threshold, generator, prefix=True)
        decided = tokens[: int(chosen.sum())].tolist()  # the leading run, >= 1 target
        before = d.length
        d.emit(decided)  # cut at the first EOS and at the budget
        if d.forward_passes > 0:
            d.accepted_lengths.append(d.length - before)  # what was emitted, as vadusa counts
        d.forward_passes += 1
        if n > 1:
            d.cache.crop(1 - n)  # keep the commit and the decided inputs start .. p-1
        commit, start = commit[:0], p
    out = d.output()
    out.cache = None
    return out


def window_mask(pad, start, widths, commit: int, window: int, dtype) -> torch.Tensor:
    """(B, 1, commit + W, E) mask of one batched sliding forward, E = max(start) + commit + W: row b's window
    (its first widths[b] of W slots) sees its cached prefix [pad[b], start[b]), the commit and itself
    bidirectionally; the commit (the prefill's prompt, every start 0) is causal; slots past a row's width and
    padding see only themselves."""
    n = commit + window
    cols = torch.arange(int(start.max()) + n, device=pad.device)  # (E,)
    rel = cols[None, :] - start[:, None]  # (B, E) column relative to the row's forward
    slot = torch.arange(n, device=pad.device)  # (n,)
    valid = (slot[None, :] < commit + widths[:, None]) & (
        slot[None, :] >= torch.where(slot[None, :] < commit, pad[:, None], 0)
    )
    key_valid = valid.gather(1, rel.clamp(0, n - 1)) & (rel >= 0) & (rel < n)  # (B, E) forward slots visible
    prefix = (cols[None, :] >= pad[:, None]) & (rel < 0)  # (B, E)
    visible = (prefix | key_valid)[:, None, :] & valid[:, :, None]  # (B, n, E)
    causal = (rel[:, None, :] <= slot[None, :, None]) | (slot[None, :, None] >= commit)  # the commit is causal
    visible = visible & causal
    visible = visible | (rel[:, None, :] == slot[None, :, None])  # every slot sees itself
    return additive(visible, dtype)[:, None]


def slide_rows(r: Rows, body, out_layer, processor, size: int, threshold, temperature, top_k, generator,
               mask_token_id: int, top_p=1.0, min_p=0.0) -> GenerationOutput:  # fmt: skip
    """`slide` over a batch: every active row runs its own window (width <= size; narrower rows padded with
    hidden slots) in ONE forward, decides its own leading run of targets and keeps its own decided inputs in
    the ragged cache (its cache length is its window's start); finished rows leave the batch."""
    device, dtype = r.seq.device, out_layer.weight.dtype
    start = torch.full((r.active,), r.width - 1, dtype=torch.long, device=device)  # (B,) first input not cached
    commit = r.width - 1  # the prefill carries every row's prompt before its last token
    per_row = processor is not None and reads_history(processor)
    while r.active:
        lengths = r.lengths.tolist()
        starts = start.tolist()
        budgets = [r.budgets[row] - (p - r.width) for row, p in zip(r.rows, lengths, strict=True)]
        n = [min(size - (p - s) + 1, b) for p, s, b in zip(lengths, starts, budgets, strict=True)]  # targets
        widths = [p - s + k - 1 for p, s, k in zip(lengths, starts, n, strict=True)]  # window inputs
        window = max(widths)
        ids = torch.full((r.active, commit + window), mask_token_id, dtype=torch.long, device=device)
        ids[:, :commit] = r.seq[:, :commit]
        for i, (p, s, k) in enumerate(zip(lengths, starts, n, strict=True)):
            r.seq[i, p : p + k - 1] = mask_token_id
            ids[i, commit : commit + widths[i]] = r.seq[i, s : p - 1 + k]
        first = commit > 0
        offset = torch.zeros_like(start) if first else start  # cache length of each row
        r.cache.set_starts(None if first else start)
        positions = (offset - r.pad)[:, None] + torch.arange(commit + window, device=device)  # (B, c + W)
        widths_t = torch.tensor(widths, device=device)
        hidden = body(
            input_ids=ids,
            attention_mask=window_mask(r.pad, offset, widths_t, commit, window, dtype),
            position_ids=positions.clamp(min=0),
            past_key_values=r.cache,
            use_cache=True,
        ).last_hidden_state  # (B, c + W, D)
        rows = [hidden[i, commit + widths[i] - n[i] : commit + widths[i]] for i in range(r.active)]  # (n_i, D) each
        logits = output_logits(out_layer, torch.cat(rows))  # (sum n, V)
        if per_row:
            parts = logits.split(n)
            probs = torch.cat([block_probs(x, r.history(i), processor, temperature, top_k, mask_token_id, top_p, min_p)
                               for i, x in enumerate(parts)])  # fmt: skip
        else:
            probs = block_probs(logits, r.seq[:1, :1], processor, temperature, top_k, mask_token_id, top_p, min_p)
        decided = []
        for part in probs.split(n):
            tokens, chosen = sample_and_select(part, temperature, threshold, generator, prefix=True)
            decided.append(tokens[: int(chosen.sum())].tolist())  # the leading run, >= 1 target
        r.forward_passes += 1
        r.emit(decided, step=not first)
        start, commit = r.lengths.new_tensor(lengths), 0  # each row's decided inputs up to its old length stay
        keep = r.drop_finished()
        if keep is not None and r.active:
            start = start[keep]
    return r.output()


def block_factory(
    model,
    assets=None,
    threshold: float = 0.35,
    block_size: int | None = None,
    adapter=None,
    unmask: str = "prefix",
    approximate_cache: bool = False,
    sliding: bool | None = None,
):
    """The "block" entry of `vadusa.decoders`: a distilled adapter merged into a copy of `model`.

    `adapter` is the adapter directory (default <assets>/block); `block_size` defaults to the one it was
    distilled for; `run(input_ids, **kw)` calls `generate`. The other options are `generate`'s, but their
    defaults are the quality point measured on the demo (README): the prefix rule in sliding windows at
    threshold 0.35, where `generate` keeps Fast-dLLM's rule and 0.02. `sliding` defaults to on with the prefix
    rule unless `approximate_cache` asks for fixed blocks.
    """
    from pathlib import Path

    from .student import load_student

    if adapter is None and assets is None:
        raise ValueError("decoder 'block' needs an adapter directory, or assets holding block/ (the distilled adapter)")
    check_values(threshold=threshold, block_size=block_size, unmask=unmask, approximate_cache=approximate_cache,
                 sliding=sliding)  # fmt: skip
    student, config = load_student(model, Path(adapter) if adapter is not None else Path(assets) / "block")
    block_size = config.block_size if block_size is None else block_size
    sliding = unmask == "prefix" and not approximate_cache if sliding is None else sliding
    return lambda input_ids, **kw: generate(
        student, input_ids, block_size, threshold, unmask=unmask, approximate_cache=approximate_cache,
        sliding=sliding, **kw
    )  # fmt: skip

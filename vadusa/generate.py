"""Decoding loops: `generate` (draft heads -> tree -> one verification pass -> accept) and `generate_ar`.

Both work on any stock transformers decoder-only causal LM through `model.base_model` (the body that
returns hidden states) and `model.get_output_embeddings()` (the output layer), with the same pre-allocated
KV cache, so `generate_ar` is a fair baseline. The loops here decode one row; a batch of (B, T) left-padded
prompts goes to `vadusa.batch`, whose loops reuse these helpers.

Vocabulary of the loop (one step of `generate`):
    root      the token already drawn from the base at the last accepted position (not yet in the cache)
    tree      root + N candidate nodes filled from the heads' top-k, verified in ONE forward
    walk      the acceptance rule goes down from the root while it accepts a child
    next root the rule's own draw where the walk stopped
"""

import numbers
import time
from dataclasses import dataclass, field

import torch

from .accept import get_rule, sample
from .cache import BufferCache, num_decoder_layers
from .checks import check_values
from .drafter import DraftSession, FeatureDrafter, tree_plan
from .dynamic import DynamicTree, check_drafter
from .dynamic import buffers as dynamic_buffers
from .dynamic import draft as dynamic_draft
from .heads import DraftHeads
from .processors import as_processor, reads_history
from .tree import Tree

_NO_CHILDREN = torch.empty(0, dtype=torch.long)


@dataclass
class GenerationOutput:
    """One call's result. A batch (B > 1, `vadusa.batch`): `sequences` is (B, T + longest row) with each row's
    prompt as given (left padding included), its tokens, then right padding (the first EOS id, else 0); the
    totals add up over rows; `row_*` hold each row's own figures; `cache` is None."""

    sequences: torch.Tensor  # (B, prompt + new) prompt followed by the generated tokens (B = 1 unless batched)
    new_tokens: int  # number of generated tokens (EOS included when it was generated), summed over rows
    forward_passes: int  # forward passes of the base model, prefill included (a batched forward counts once)
    accepted_lengths: list[int] = field(default_factory=list)  # tokens emitted by each pass after the prefill
    # (batches: every row's steps, row after row)
    seconds: float = 0.0  # wall time of the call
    cache: object = field(default=None, repr=False)  # KV cache of sequences[:, :-1], to continue from (B = 1)
    row_new_tokens: list[int] | None = None  # per row: its generated tokens
    row_seconds: list[float] | None = None  # per row: wall time from the call's start until the row finished
    row_forward_passes: list[int] | None = None  # per row: forwards it took part in, prefill included
    row_accepted_lengths: list[list[int]] | None = None  # per row: tokens it emitted at each step after the prefill
    row_prompt_lengths: list[int] | None = None  # per row: its prompt's tokens (padding excluded)

    def __post_init__(self):
        if self.row_new_tokens is None:  # batch size 1: the row is the call
            self.row_new_tokens, self.row_seconds = [self.new_tokens], [self.seconds]
            self.row_forward_passes, self.row_accepted_lengths = [self.forward_passes], [self.accepted_lengths]
            self.row_prompt_lengths = [self.sequences.shape[1] - self.new_tokens]

    @property
    def tokens(self) -> torch.Tensor:
        """(new_tokens,) the generated tokens alone (batch size 1; a batch: `row_tokens(i)`)."""
        if self.sequences.shape[0] != 1:
            raise ValueError(
                f"tokens is for batch size 1, this output has {self.sequences.shape[0]} rows: use row_tokens"
            )
        return self.sequences[0, self.sequences.shape[1] - self.new_tokens :]

    def row_tokens(self, i: int) -> torch.Tensor:
        """(row_new_tokens[i],) the tokens row i generated."""
        start = self.sequences.shape[1] - max(self.row_new_tokens)
        return self.sequences[i, start : start + self.row_new_tokens[i]]

    def row(self, i: int) -> "GenerationOutput":
        """Row i as a batch-1 output: its prompt without padding + its tokens, its own figures, no cache."""
        width = self.sequences.shape[1] - max(self.row_new_tokens)
        n = self.row_new_tokens[i]
        return GenerationOutput(
            self.sequences[i : i + 1, width - self.row_prompt_lengths[i] : width + n], n, self.row_forward_passes[i],
            self.row_accepted_lengths[i], self.row_seconds[i],
        )  # fmt: skip

    @property
    def mean_accepted(self) -> float:
        """Mean tokens per verification pass (1.0 for auto-regressive decoding)."""
        return sum(self.accepted_lengths) / max(1, len(self.accepted_lengths))

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


# ----- small pure helpers -----
def split_model(model):
    """(body, output layer) of a transformers causal LM: body(...).last_hidden_state feeds the output layer."""
    body, out = model.base_model, model.get_output_embeddings()
    if body is model or out is None:
        raise TypeError(f"{type(model).__name__} is not a transformers causal LM with a body and an output layer")
    return body, out


def check_prompt(input_ids: torch.Tensor) -> torch.Tensor:
    """(T,) or (1, T) token ids -> (1, T); batch size > 1 and empty prompts raise."""
    if not torch.is_tensor(input_ids) or input_ids.dtype not in (torch.long, torch.int):
        raise TypeError(f"input_ids must be an integer tensor, got {type(input_ids).__name__}")
    ids = input_ids.long().reshape(1, -1) if input_ids.dim() == 1 else input_ids.long()
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"only batch size 1 is supported for now, got input_ids of shape {tuple(input_ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: the prompt needs at least one token")
    return ids


def check_embeds(model, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """(T, D) or (1, T, D) prompt embeddings -> (1, T, D); batch size > 1, empty prompts and a hidden size other
    than the model's input embeddings' raise."""
    if not torch.is_tensor(inputs_embeds) or not inputs_embeds.is_floating_point():
        raise TypeError(f"inputs_embeds must be a float tensor (1, T, D), got {type(inputs_embeds).__name__}")
    embeds = inputs_embeds[None] if inputs_embeds.dim() == 2 else inputs_embeds
    if embeds.dim() != 3 or embeds.shape[0] != 1:
        raise ValueError(f"only batch size 1 is supported for now, got inputs_embeds of shape {tuple(embeds.shape)}")
    if embeds.shape[1] == 0:
        raise ValueError("inputs_embeds is empty: the prompt needs at least one position")
    hidden = model.get_input_embeddings().weight.shape[1]
    if embeds.shape[2] != hidden:
        raise ValueError(
            f"inputs_embeds has hidden size {embeds.shape[2]}, the model's input embeddings have {hidden}: "
            f"expected (1, T, {hidden})"
        )
    return embeds


def eos_set(eos_token_id) -> set[int]:
    """The end-of-sequence ids: None, one id, or a list / tuple / tensor of ids, each an integer >= 0."""
    if eos_token_id is None:
        return set()
    ids = eos_token_id.flatten().tolist() if torch.is_tensor(eos_token_id) else eos_token_id
    ids = list(ids) if isinstance(ids, list | tuple | set) else [ids]
    if not all(isinstance(e, numbers.Integral) and not isinstance(e, bool) and e >= 0 for e in ids):
        raise ValueError(f"eos_token_id must be None, a token id >= 0 or a list of them, got {eos_token_id!r}")
    return {int(e) for e in ids}


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """(N, V) scores -> the same with -inf outside each row's nucleus: the most likely tokens whose mass reaches
    top_p. A token goes when it and every less likely token together hold at most 1 - top_p of the mass
    (transformers' TopPLogitsWarper rule, ties broken by the same sort); the most likely token always stays."""
    ascending, order = torch.sort(scores, dim=-1)  # (N, V)
    mass_up_to = ascending.softmax(-1).cumsum(-1)  # (N, V) mass of each token and all less likely ones
    drop = mass_up_to <= 1 - top_p
    drop[..., -1] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """(N, V) scores -> the same with -inf where a token's probability is below min_p x the row's top probability
    (transformers' MinPLogitsWarper rule; with min_p <= 1 the most likely token always stays)."""
    probs = scores.softmax(-1)  # (N, V)
    return scores.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))


def output_logits(out_layer, hidden: torch.Tensor) -> torch.Tensor:
    """(..., D) last hidden states -> (..., V) float32 logits: the one place logits leave the model.

    The output layer runs in the model's dtype and its logits are upcast here, once, as transformers' generate
    does before its processors: logits processors, temperature, top-k / top-p / min-p, the softmax and every
    acceptance rule then work in float32 whatever the model's dtype (bfloat16 or float16 probabilities would
    round a top-p nucleus, a min-p cut or a typical threshold). The upcast is exact, so argmaxes do not move."""
    return out_layer(hidden).float()


def scores_to_probs(
    scores: torch.Tensor,
    history: torch.Tensor,
    processor,
    temperature: float,
    top_k: int | None,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """(N, V) float32 logits (`output_logits`) -> (N, V) float32 probabilities: logits processors (row i reading
    history[i]), then temperature, then top-k, then top-p, then min-p.

    The order is transformers' own (processors, then its warpers in this order), so `generate_ar` samples
    exactly what `model.generate(do_sample=True, temperature=T, top_k=K, top_p=P, min_p=M)` samples, and every
    acceptance rule, which reads only these probabilities, stays exact under them. At temperature 0 the
    distribution is the softmax of the processed scores and decoders take its argmax (the warpers never remove
    the argmax, so they are skipped).
    """
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be float32 (pass logits through output_logits), got {scores.dtype}")
    if processor is not None:
        scores = processor(history.expand(scores.shape[0], -1), scores)
    if temperature > 0:
        # float(): a Python int beyond int64 overflows torch's scalar. Below TINY_TEMPERATURE, float32 scores / T
        # reach inf or 0 / 0 (NaN probabilities): there the max is taken off in float64 first (softmax is
        # shift-invariant); at every usual temperature this is transformers' plain scores / T, token for token
        if temperature < TINY_TEMPERATURE:
            scores = scores.double() - scores.double().amax(-1, keepdim=True)
        scores = scores / float(temperature)
        if top_k:
            kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p < 1.0:
            scores = top_p_filter(scores, top_p)
        if min_p > 0.0:
            scores = min_p_filter(scores, min_p)
    return torch.softmax(scores, dim=-1).float()


def logits_to_probs(
    scores: torch.Tensor, history: torch.Tensor, processor, temperature: float, top_k, top_p=1.0, min_p=0.0
) -> torch.Tensor:
    """(V,) float32 logits -> (V,) probabilities (`scores_to_probs` of one row)."""
    return scores_to_probs(scores[None], history, processor, temperature, top_k, top_p, min_p)[0]


def draw(probs: torch.Tensor, temperature: float, generator) -> int:
    """One token from probs (argmax at temperature 0)."""
    if temperature == 0:
        return int(probs.argmax())
    return int(sample(probs, generator))


def take(tokens: list[int], budget: int, eos: set[int]) -> tuple[list[int], bool]:
    """The tokens that may be emitted (at most `budget`, none after an EOS) and whether generation is done."""
    kept = []
    for t in tokens[:budget]:
        kept.append(t)
        if t in eos:
            return kept, True
    return kept, len(kept) == budget


TINY_TEMPERATURE = 1e-20  # below it, scores are shifted to a max of 0 (in float64) before T divides them


def check_context(model, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse a budget beyond the model's positions (config.max_position_embeddings, GPT-2's n_positions) before
    buffers of prompt + max_new_tokens positions are allocated: a budget of 10^9 would take the machine's memory."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"max_new_tokens {max_new_tokens} after a prompt of {prompt_len} positions exceeds the model's "
            f"{limit} positions (config.max_position_embeddings)"
        )


class _Decoding:
    """What both loops share: the output buffer, the cache, stopping, streaming and timing."""

    def __init__(
        self, model, input_ids, max_new_tokens, extra_positions, eos_token_id, streamer, inputs_embeds=None, stop=None
    ):
        check_values(max_new_tokens=max_new_tokens)
        self.start = time.perf_counter()
        self.embeds, self.history_start = None, 0  # prompt embeddings; where the token history starts in seq
        if inputs_embeds is not None:
            weight = model.get_input_embeddings().weight
            self.embeds = check_embeds(model, inputs_embeds).to(weight.device, weight.dtype)  # (1, T, D)
            if input_ids is None:  # no ids: placeholders keep seq positions = cache positions; history skips them
                input_ids = torch.zeros(1, self.embeds.shape[1], dtype=torch.long)
                self.history_start = self.embeds.shape[1]
            elif check_prompt(input_ids).shape[1] != self.embeds.shape[1]:
                raise ValueError(
                    f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} "
                    "must cover the same prompt positions"
                )
        elif input_ids is None:
            raise ValueError("give the prompt as input_ids or as inputs_embeds")
        self.prompt = check_prompt(input_ids).to(model.device)
        self.prompt_len = self.prompt.shape[1]
        check_context(model, self.prompt_len, max_new_tokens)
        self.max_new_tokens = max_new_tokens
        capacity = self.prompt_len + max_new_tokens + extra_positions
        self.seq = torch.zeros(1, capacity, dtype=torch.long, device=model.device)  # prompt + emitted tokens
        self.seq[:, : self.prompt_len] = self.prompt
        self.length = self.prompt_len  # filled part of seq
        self.cache = BufferCache(num_decoder_layers(model), capacity)
        self.eos = eos_set(eos_token_id)
        self.stop = stop  # transformers StoppingCriteria: (history, scores) -> (1,) bool, checked after each token
        self.streamer = streamer
        self.forward_passes = 0
        self.accepted_lengths: list[int] = []
        self.done = False
        if streamer is not None:
            streamer.put(self.history().cpu())  # as transformers' generate does, so skip_prompt streamers work

    def history(self) -> torch.Tensor:
        """(1, t) the token history processors read: the prompt ids (none for an embeddings prompt) + emitted."""
        return self.seq[:, self.history_start : self.length]

    def prompt_inputs(self, start: int = 0, end: int | None = None) -> dict:
        """The model inputs of prompt positions [start, end): {"input_ids": ...} or {"inputs_embeds": ...}."""
        if self.embeds is not None:
            return {"inputs_embeds": self.embeds[:, start:end]}
        return {"input_ids": self.prompt[:, start:end]}

    def emit(self, tokens: list[int]) -> None:
        kept, self.done = take(tokens, self.max_new_tokens - (self.length - self.prompt_len), self.eos)
        self.seq[0, self.length : self.length + len(kept)] = torch.tensor(kept, dtype=torch.long)
        if self.stop is not None:  # the first token after which a stopping criterion holds ends generation
            for i in range(len(kept)):
                if bool(self.stop(self.seq[:, self.history_start : self.length + i + 1], None).any()):
                    kept, self.done = kept[: i + 1], True
                    break
        self.length += len(kept)
        if self.streamer is not None and kept:
            self.streamer.put(torch.tensor(kept, dtype=torch.long))

    def output(self) -> GenerationOutput:
        if self.streamer is not None:
            self.streamer.end()
        extra = self.cache.get_seq_length() - (self.length - 1)  # tree nodes past a truncation at EOS / budget
        if extra > 0:
            self.cache.crop(-extra)
        return GenerationOutput(
            sequences=self.seq[:, self.history_start : self.length].clone(),  # an embeddings prompt: new tokens
            new_tokens=self.length - self.prompt_len,
            forward_passes=self.forward_passes,
            accepted_lengths=self.accepted_lengths,
            seconds=time.perf_counter() - self.start,
            cache=self.cache,
        )


@torch.no_grad()
def generate_ar(
    model,
    input_ids: torch.Tensor | None = None,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id=None,
    logits_processor=None,
    streamer=None,
    generator: torch.Generator | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    inputs_embeds: torch.Tensor | None = None,
    stopping_criteria=None,
    attention_mask: torch.Tensor | None = None,
) -> GenerationOutput:
    """Auto-regressive decoding, one token per forward, on the same cache machinery as `generate`.

    The prompt is `input_ids` (1, T) or `inputs_embeds` (1, T, D) (then `sequences` holds the new tokens only, as
    in transformers); generated tokens go through the model's own input embeddings. `stopping_criteria`
    (transformers' StoppingCriteria) are checked after every token. (B, T) prompts with a left-padding
    `attention_mask` decode as a batch (`vadusa.batch`)."""
    from .batch import check_batch, check_batch_extras, embeds_batch, generate_ar_rows

    check_values(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    processor = as_processor(logits_processor)
    ids, mask = check_batch(input_ids, attention_mask) if inputs_embeds is None else embeds_batch(attention_mask)
    if ids is not None and (ids.shape[0] > 1 or not isinstance(max_new_tokens, int)):
        check_batch_extras(stopping_criteria)
        return generate_ar_rows(model, ids, mask, max_new_tokens, temperature, top_k, eos_token_id, processor,
                                streamer, generator, top_p, min_p)  # fmt: skip
    if ids is not None:  # one request: its padding (if any) dropped
        input_ids = ids if mask is None else ids[:, mask[0].bool()]
    body, out_layer = split_model(model)
    d = _Decoding(model, input_ids, max_new_tokens, 0, eos_token_id, streamer, inputs_embeds, stopping_criteria)
    hidden = body(**d.prompt_inputs(), past_key_values=d.cache, use_cache=True).last_hidden_state[0, -1]  # (D,)
    d.forward_passes = 1
    while True:
        logits = output_logits(out_layer, hidden)  # (V,)
        probs = logits_to_probs(logits, d.history(), processor, temperature, top_k, top_p, min_p)
        d.emit([draw(probs, temperature, generator)])
        if d.done:
            return d.output()
        token = d.seq[:, d.length - 1 : d.length]  # (1, 1)
        hidden = body(input_ids=token, past_key_values=d.cache, use_cache=True).last_hidden_state[0, -1]
        d.forward_passes += 1
        d.accepted_lengths.append(1)


def draft_tokens(heads: DraftHeads, hidden, root: torch.Tensor, tree: Tree, history, processor) -> torch.Tensor:
    """(N+1,) tree tokens: the root (a 0-dim id), then each node's (head, rank) pick from the heads' top-k."""
    logits = heads(hidden.to(heads.dtype), root)  # (H, V)
    if processor is not None and reads_history(processor):
        # head k drafts k tokens past the root: its history is that long too (for position-aware processors)
        rows = [processor(draft_history(history, k), logits[k : k + 1].float()) for k in range(logits.shape[0])]
        logits = torch.cat(rows)  # (H, V)
    elif processor is not None:
        logits = processor(history.expand(logits.shape[0], -1), logits.float())
    top = torch.topk(logits, tree.max_rank + 1, dim=-1).indices  # (H, K)
    head, rank = tree.heads_and_ranks.unbind(-1)  # (N,), (N,)
    return torch.cat([root.reshape(1), top[head, rank]])  # (N+1,)


def draft_history(history: torch.Tensor, extra: int) -> torch.Tensor:
    """(1, t) -> (1, t + extra): the history a draft `extra` tokens past the root is processed with; the unknown
    tokens are copies of the root (drafting only: verification reads each node's true path)."""
    return torch.cat([history, history[:, -1:].expand(1, extra)], dim=1) if extra else history


def verify(body, tokens, tree_bias, depths, mask, cache, past: int) -> torch.Tensor:
    """ONE forward over root + tree nodes (n,), each node seeing the cached prefix and its own ancestors.

    `mask` (1, 1, n, capacity) is a buffer of zeros: the (n, n) tree bias is written at the columns of
    the tree, used, then cleared, so no mask is rebuilt per step. Returns the (n, D) last hidden states.
    """
    n = tokens.shape[0]
    mask[..., past : past + n] = tree_bias
    states = body(
        input_ids=tokens[None],
        attention_mask=mask[..., : past + n],
        position_ids=(past + depths)[None],
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[0]  # (n, D)
    mask[..., past : past + n] = 0
    return states


@dataclass
class WalkBuffers:
    """What the vectorised walk needs of a tree, built once per call."""

    children: list[list[int]]  # children[i]: node ids of node i's children in rank order (the integer walk)
    child_index: torch.Tensor  # (N+1, C) the same, -1 padded
    by_depth: list[torch.Tensor]  # by_depth[d]: (n_d,) node ids at depth d
    ancestors: torch.Tensor  # (N+1, depth) node id of each node's ancestor at depth 1.. (itself at its own)


def walk_buffers(tree: Tree, device) -> WalkBuffers:
    children = [c.tolist() for c in tree.children]
    width = max(len(c) for c in children)
    child_index = torch.full((len(tree), width), -1, dtype=torch.long)
    for i, c in enumerate(children):
        child_index[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    depths = tree.depths
    ancestors = torch.zeros(len(tree), tree.depth, dtype=torch.long)
    for i in range(len(tree)):
        for a in tree.ancestor_mask[i].nonzero().flatten().tolist():
            if a > 0:
                ancestors[i, int(depths[a]) - 1] = a
    by_depth = [(depths == d).nonzero().flatten().to(device) for d in range(tree.depth + 1)]
    return WalkBuffers(children, child_index.to(device), by_depth, ancestors.to(device))


def node_probs(
    logits, tokens, history, buffers: WalkBuffers, processor, temperature: float, top_k, top_p=1.0, min_p=0.0
) -> torch.Tensor:
    """(n, V) float32 logits of every tree node -> (n, V) probabilities, each node's processors reading the history it
    would have in AR decoding (prefix + its path): one processor call per depth, softmax once. Processors that
    all declare `reads_history = False` (they ignore input_ids) are called once on every node."""
    if processor is None or not reads_history(processor):
        return scores_to_probs(logits, history, processor, temperature, top_k, top_p, min_p)
    scores = torch.empty_like(logits)  # (n, V)
    for d, nodes in enumerate(buffers.by_depth):
        path = tokens[buffers.ancestors[nodes, :d]]  # (n_d, d)
        rows = torch.cat([history.expand(len(nodes), -1), path], dim=1)  # (n_d, T + d)
        scores[nodes] = processor(rows, logits[nodes])
    return scores_to_probs(scores, history, None, temperature, top_k, top_p, min_p)


def walk(probs, tokens, buffers: WalkBuffers, rule, u) -> tuple[list[int], int]:
    """The rule decides at every node at once (`rule.batch`); then an integer walk from the root.

    Returns the accepted path (node ids, root first) and the next root: the rule's token where it stopped.
    """
    valid = buffers.child_index >= 0
    child_tokens = torch.where(valid, tokens[buffers.child_index.clamp(min=0)], -1)  # (n, C)
    index, token = rule.batch(probs, child_tokens, u)
    index, token = index.tolist(), token.tolist()
    return follow(index, token, buffers.children)


def follow(index: list[int], token: list[int], children: list[list[int]]) -> tuple[list[int], int]:
    """The integer walk from the root along the rule's decisions -> (accepted path, next root)."""
    node, path = 0, [0]
    while index[node] >= 0:
        node = children[node][index[node]]
        path.append(node)
    return path, token[node]


@torch.no_grad()
def generate(
    model,
    heads: "DraftHeads | FeatureDrafter",
    input_ids: torch.Tensor | None = None,
    tree: Tree | None = None,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    acceptance: str = "tolerance",
    tolerance: int = 3,
    eos_token_id=None,
    logits_processor=None,
    streamer=None,
    generator: torch.Generator | None = None,
    typical_epsilon: float = 0.09,
    typical_alpha: float = 0.3,
    top_p: float = 1.0,
    min_p: float = 0.0,
    inputs_embeds: torch.Tensor | None = None,
    stopping_criteria=None,
    attention_mask: torch.Tensor | None = None,
) -> GenerationOutput:
    """Draft -> verify -> accept decoding (VADUSA). `tree` defaults to the top-1 chain over all heads.

    At temperature 0 every rule is greedy, and the output equals greedy auto-regressive decoding (in float32,
    token for token). In bfloat16 it can leave it: a verification pass computes several rows at once, whose
    rounding differs from one-row AR steps, so a near-tie between the two best tokens can flip and the texts
    then continue apart (measured on the demo LM over 30 texts: 7 differ from bfloat16 AR, the earliest at
    token 9, with the same CER; float16 matched float32 AR on all 30: benchmarks/precision.py, README).
    Probabilities are float32 whatever the model's dtype (`output_logits`).

    Top-p and min-p (as transformers' warpers) shape the base distribution every rule reads, so lossless stays
    exact.
    The prompt may be `inputs_embeds` (1, T, D), as in `generate_ar` (a feature drafter then sees the prompt's
    last state only); `stopping_criteria` are checked after every emitted token. (B, T) prompts with a
    left-padding `attention_mask` decode as a batch (`vadusa.batch`): each row accepts its own number of
    tokens per step and stops on its own.
    """
    from .batch import check_batch, check_batch_extras, embeds_batch, generate_rows

    check_values(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        acceptance=acceptance, tolerance=tolerance, typical_epsilon=typical_epsilon, typical_alpha=typical_alpha,
    )  # fmt: skip
    tree = tree if tree is not None else Tree.chain(heads.max_depth)
    tree.validate_for(heads.max_depth, heads.config.vocab_size)
    heads.check_compatible(model)
    dynamic = isinstance(tree, DynamicTree)
    if dynamic:
        check_drafter(tree, heads)
    rule = get_rule("greedy" if temperature == 0 else acceptance, tolerance, typical_epsilon, typical_alpha)
    processor = as_processor(logits_processor)
    ids, mask = check_batch(input_ids, attention_mask) if inputs_embeds is None else embeds_batch(attention_mask)
    if ids is not None and (ids.shape[0] > 1 or not isinstance(max_new_tokens, int)):
        if dynamic:
            raise ValueError("dynamic trees decode one prompt at a time; batches need a static tree")
        check_batch_extras(stopping_criteria)
        return generate_rows(model, heads, ids, mask, tree, max_new_tokens, temperature, top_k, rule, eos_token_id,
                             processor, streamer, generator, top_p, min_p)  # fmt: skip
    if ids is not None:  # one request: its padding (if any) dropped
        input_ids = ids if mask is None else ids[:, mask[0].bool()]
    body, out_layer = split_model(model)
    n = len(tree)
    d = _Decoding(model, input_ids, max_new_tokens, n, eos_token_id, streamer, inputs_embeds, stopping_criteria)
    device, dtype = model.device, out_layer.weight.dtype

    # Buffers built once per call (a dynamic tree's, every step): the tree's additive mask lives in a
    # prefix-wide buffer of zeros.
    mask = torch.zeros(1, 1, n, d.seq.shape[1], dtype=dtype, device=device)  # (1, 1, n, capacity)
    if dynamic:
        width, depth = tree.width, tree.depth_for(heads.max_depth)
    else:
        tree_bias = tree.attention_bias(dtype).to(device)  # (n, n)
        depths = tree.depths.to(device)  # (n,)
        buffers = tree.memo(("walk", device), lambda: walk_buffers(tree, device))
        width = buffers.child_index.shape[1]

    prompt_states = body(**d.prompt_inputs(), past_key_values=d.cache, use_cache=True).last_hidden_state[0]  # (P, D)
    hidden = prompt_states[-1]  # (D,)
    d.forward_passes = 1
    probs = logits_to_probs(output_logits(out_layer, hidden), d.history(), processor, temperature, top_k, top_p, min_p)
    d.emit([rule(probs, _NO_CHILDREN.to(device), generator)[1]])
    feature = isinstance(heads, FeatureDrafter)
    if feature:  # the drafter's own cache: rows (x_{j+1}, f_j) of the prompt, the root's last
        session = DraftSession(heads, model, d.seq.shape[1])
        plan = None if dynamic else tree.memo(("plan", heads.dtype), lambda: tree_plan(tree, heads.dtype))
        skip = max(d.history_start - 1, 0)  # an embeddings prompt has no token ids: commit its last row alone
        root_feat = session.commit(d.seq[0, 1 + skip : d.length], prompt_states[skip:])  # (D,)
    while not d.done:
        past = d.length - 1  # cache holds everything before the root
        root = d.seq[0, past]  # 0-dim
        history = d.history()  # (1, t) prompt ids (if any) + emitted tokens
        if dynamic:  # this step's tree, grown by the drafter's confidence
            tokens, parents, node_depths = dynamic_draft(session, tree, depth, root, root_feat, history, processor)
            tree_bias, depths, buffers = dynamic_buffers(parents, node_depths, width, dtype, device)
        elif feature:
            tokens = session.draft(plan, root, root_feat, history, processor)  # (n,)
        else:
            tokens = draft_tokens(heads, hidden, root, tree, history, processor)  # (n,)

        states = verify(body, tokens, tree_bias, depths, mask, d.cache, past)  # (n, D)
        d.forward_passes += 1

        logits = output_logits(out_layer, states)  # (n, V)
        probs = node_probs(logits, tokens, history, buffers, processor, temperature, top_k, top_p, min_p)  # (n, V)
        path, next_root = walk(probs, tokens, buffers, rule, rule.uniforms(n, width, generator, device))

        d.cache.keep(past, path)
        hidden = states[path[-1]]
        accepted = tokens[path[1:]].tolist() + [next_root]
        if feature:
            root_feat = session.commit(torch.tensor(accepted, device=device), states[path])
        length_before = d.length
        d.emit(accepted)
        d.accepted_lengths.append(d.length - length_before)
    return d.output()

"""Batched decoding: (B, T) left-padded prompts, every row stopping and accepting on its own.

`generate_ar` and `generate` hand a batch of more than one row to the loops here (batch size 1 keeps its
own loop in `vadusa.generate`). Layout of row b in the batch buffers (tokens, KV cache, masks):

    columns [0, pad[b])              left padding: never visible to any query
    columns [pad[b], T)              the row's prompt
    columns [T, lengths[b])          the tokens the row emitted so far

Rows never wait for each other. `generate_ar`'s rows all grow by one token per forward, so they keep one
length; `generate`'s rows accept different numbers of tokens per step, so the KV cache runs in its ragged
mode (`BufferCache.set_starts`): row b writes its tree at its own length, sees its own prefix and tree
ancestors through its own additive float mask, and is compacted to its own accepted path (`keep_rows`).
Position ids are per row (position = column - pad). The prefix is never re-run. A row that reaches its EOS
or its budget leaves the batch at once (`Rows.drop_finished`: its cache rows are released), so it costs no
further forward. Logits processors that read the history are called per row on that row's own history
(its prompt without padding, then its tokens); ones that declare `reads_history = False` are called once.
The feature drafter drafts every row at once (`BatchDraftSession`: one call per tree depth); block decoding's
batched sliding windows (`vadusa.blockdiff.generate.slide_rows`) use the same `Rows` and ragged cache.
"""

import time

import torch

from .accept import sample
from .cache import BufferCache, num_decoder_layers
from .checks import check_values
from .drafter import FeatureDrafter, decoding_weights, tree_plan, unit
from .generate import (
    GenerationOutput,
    check_context,
    draft_tokens,
    eos_set,
    follow,
    node_probs,
    output_logits,
    scores_to_probs,
    split_model,
    take,
    walk_buffers,
)
from .processors import reads_history


# ----- input checks -----
def left_pad(prompts, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths (lists or 1-D tensors) -> (B, T) left-padded ids and their 0/1 attention_mask."""
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if not rows:
        raise ValueError("batch size must be >= 1, got no prompts")
    if any(len(r) == 0 for r in rows):
        raise ValueError(f"prompt {[len(r) for r in rows].index(0)} is empty: every prompt needs a token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def check_batch(input_ids, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(T,) / (B, T) ids (or a list of equal-length prompts) and an optional 0/1 left-padding mask ->
    ((B, T) long ids, (B, T) long mask or None when nothing is padded). Bad batches raise ValueError."""
    if input_ids is None:
        raise ValueError("give the prompt as input_ids or as inputs_embeds")
    if isinstance(input_ids, list | tuple):
        lengths = [len(torch.as_tensor(p).flatten()) for p in input_ids]
        if attention_mask is None and len(set(lengths)) > 1:
            raise ValueError(
                f"prompts of different lengths {lengths} need left padding and an attention_mask: "
                "ids, mask = vadusa.left_pad(prompts)"
            )
        input_ids = torch.stack([torch.as_tensor(p).flatten() for p in input_ids]) if input_ids else torch.zeros(0, 1)
    if not torch.is_tensor(input_ids) or input_ids.dtype not in (torch.long, torch.int):
        raise TypeError(f"input_ids must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
    ids = input_ids.long().reshape(1, -1) if input_ids.dim() == 1 else input_ids.long()
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (T,) or (B, T), got shape {tuple(input_ids.shape)}")
    if ids.shape[0] < 1:
        raise ValueError(f"batch size must be >= 1, got input_ids of shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: the prompt needs at least one token")
    if attention_mask is None:
        return ids, None
    mask = torch.as_tensor(attention_mask).to(ids.device)
    mask = mask.reshape(1, -1) if mask.dim() == 1 else mask
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}: they must match")
    if not ((mask == 0) | (mask == 1)).all():
        bad = sorted({float(v) for v in mask[(mask != 0) & (mask != 1)].flatten()[:5].tolist()})
        raise ValueError(f"attention_mask must hold only 0 and 1, got values {bad}")
    mask = mask.long()
    holes = (mask[:, 1:] < mask[:, :-1]).any(1).nonzero().flatten().tolist()  # a 1 followed by a 0
    if holes:
        raise ValueError(
            f"attention_mask rows {holes} are right-padded or have holes: only left padding is supported "
            "(zeros before each prompt, e.g. tokenizer(..., padding_side='left'))"
        )
    empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty} are all zeros: every prompt needs a token")
    return ids, (None if bool(mask.all()) else mask)


def embeds_batch(attention_mask) -> tuple[None, None]:
    """An `inputs_embeds` prompt is one unpadded request: a mask with zeros is refused, naming why."""
    if attention_mask is not None and not bool((torch.as_tensor(attention_mask) == 1).all()):
        raise ValueError("an inputs_embeds prompt is one unpadded request: its attention_mask must be all ones")
    return None, None


def check_batch_extras(stopping_criteria) -> None:
    """What batched decoding does not take yet raises, naming it (one request at a time takes it)."""
    if stopping_criteria:
        raise ValueError("stopping_criteria work with one prompt at a time; batched rows stop at EOS or their budget")


# ----- masks (0 where visible, dtype-min elsewhere) -----
def additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)


def prefill_mask(pad: torch.Tensor, width: int, dtype) -> torch.Tensor:
    """(B, 1, T, T): causal, padding hidden (a padding query sees itself, so no softmax row is empty)."""
    cols = torch.arange(width, device=pad.device)
    causal = cols[None, :] <= cols[:, None]  # (T, T)
    visible = causal[None] & (cols >= pad[:, None])[:, None, :]  # (B, T, T)
    return additive(visible | torch.eye(width, dtype=torch.bool, device=pad.device), dtype)[:, None]


def step_mask(pad: torch.Tensor, length: int, dtype) -> torch.Tensor:
    """(B, 1, 1, length + 1) for one new token per row after `length` cached positions, padding hidden."""
    cols = torch.arange(length + 1, device=pad.device)
    return additive(cols[None, :] >= pad[:, None], dtype)[:, None, None]


def tree_mask(ancestors: torch.Tensor, past: torch.Tensor, pad: torch.Tensor, dtype) -> torch.Tensor:
    """(B, 1, n, max(past) + n): row b's tree at columns past[b] .. past[b]+n-1 sees its own prefix
    [pad[b], past[b]) and its tree ancestors (ancestors (n, n) bool); everything else is hidden."""
    n = ancestors.shape[0]
    cols = torch.arange(int(past.max()) + n, device=past.device)
    prefix = (cols >= pad[:, None]) & (cols < past[:, None])  # (B, E)
    rel = cols[None, :] - past[:, None]  # (B, E) column relative to the row's tree
    in_tree = (rel >= 0) & (rel < n)
    tree = ancestors[:, rel.clamp(0, n - 1)].transpose(0, 1) & in_tree[:, None, :]  # (B, n, E)
    return additive(prefix[:, None, :] | tree, dtype)[:, None]


def check_budgets(max_new_tokens, batch: int) -> list[int]:
    """max_new_tokens: one int for every row, or one per row -> the per-row list (each >= 1)."""
    budgets = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != batch:
        raise ValueError(f"max_new_tokens has {len(budgets)} budgets for a batch of {batch} rows")
    for b in budgets:
        check_values(max_new_tokens=b)
    return budgets


# ----- the batch's shared state -----
class Rows:
    """Token buffer, per-row lengths and padding, the KV cache, stopping and timing of a batch; finished rows
    leave it (`drop_finished`), their results are kept per original row."""

    def __init__(self, model, ids, mask, max_new_tokens, extra_positions: int, eos_token_id, streamer=None):
        self.budgets = check_budgets(max_new_tokens, ids.shape[0])  # per original row
        if streamer is not None:
            raise ValueError(f"a streamer takes one row: got a batch of {ids.shape[0]}; stream with batch size 1")
        self.start = time.perf_counter()
        device = model.device
        self.prompt = ids.to(device)  # (B, T) as given, padding included
        batch, self.width = ids.shape
        check_context(model, self.width, max(self.budgets))
        mask = torch.ones_like(ids) if mask is None else mask
        self.pad = (self.width - mask.sum(1)).to(device)  # (B,) padding columns of each active row
        self.prompt_pad = self.pad.clone()  # (B,) of every original row
        self.padded = bool(self.pad.any())
        capacity = self.width + max(self.budgets) + extra_positions
        self.seq = torch.zeros(batch, capacity, dtype=torch.long, device=device)  # (B, capacity)
        self.seq[:, : self.width] = self.prompt
        self.lengths = torch.full((batch,), self.width, dtype=torch.long, device=device)  # (B,) filled part
        self.cache = BufferCache(num_decoder_layers(model), capacity)
        self.capacity = capacity
        self.eos = eos_set(eos_token_id)
        self.rows = list(range(batch))  # original row of each active row
        self.forward_passes = 0
        self.results: list[dict | None] = [None] * batch  # per original row, set when it finishes
        self.accepted: list[list[int]] = [[] for _ in range(batch)]  # per original row
        self.done = [False] * batch  # per active row

    @property
    def active(self) -> int:
        return len(self.rows)

    def history(self, i: int) -> torch.Tensor:
        """(1, t) what active row i's processors read: its prompt without padding and its tokens."""
        return self.seq[i : i + 1, int(self.pad[i]) : int(self.lengths[i])]

    def emit(self, tokens: list[list[int]], step: bool = True) -> None:
        """Active row i emits tokens[i] (cut at its budget and first EOS); `step`: count it as a step's tokens."""
        lengths = self.lengths.tolist()
        for i, row_tokens in enumerate(tokens):
            budget = self.budgets[self.rows[i]] - (lengths[i] - self.width)
            kept, self.done[i] = take(row_tokens, budget, self.eos)
            self.seq[i, lengths[i] : lengths[i] + len(kept)] = torch.tensor(kept, dtype=torch.long)
            lengths[i] += len(kept)
            if step:
                self.accepted[self.rows[i]].append(len(kept))
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=self.seq.device)

    def drop_finished(self) -> torch.Tensor | None:
        """Release the rows that are done; returns the kept active rows (B',) or None when none finished."""
        if not any(self.done):
            return None
        now = time.perf_counter() - self.start
        for i, done in enumerate(self.done):
            if done:
                length = int(self.lengths[i])
                self.results[self.rows[i]] = {
                    "tokens": self.seq[i, self.width : length].clone(),
                    "seconds": now,
                    "forward_passes": self.forward_passes,
                }
        keep = [i for i, done in enumerate(self.done) if not done]
        self.rows = [self.rows[i] for i in keep]
        self.done = [False] * len(keep)
        index = torch.tensor(keep, dtype=torch.long, device=self.seq.device)
        if keep:
            self.seq, self.lengths, self.pad = self.seq[index], self.lengths[index], self.pad[index]
            self.cache.select_rows(index)
        return index

    def output(self) -> GenerationOutput:
        """Every row's prompt (as given, padding included) + its tokens, right-padded with the first EOS id
        (0 without one) to the longest row."""
        rows = self.results
        new = [len(r["tokens"]) for r in rows]
        fill = min(self.eos) if self.eos else 0
        sequences = torch.full((len(rows), self.width + max(new)), fill, dtype=torch.long, device=self.seq.device)
        sequences[:, : self.width] = self.prompt
        for i, r in enumerate(rows):
            sequences[i, self.width : self.width + new[i]] = r["tokens"]
        return GenerationOutput(
            sequences=sequences,
            new_tokens=sum(new),
            forward_passes=self.forward_passes,
            accepted_lengths=[a for acc in self.accepted for a in acc],
            seconds=time.perf_counter() - self.start,
            cache=None,
            row_new_tokens=new,
            row_seconds=[r["seconds"] for r in rows],
            row_forward_passes=[r["forward_passes"] for r in rows],
            row_accepted_lengths=self.accepted,
            row_prompt_lengths=(self.width - self.prompt_pad).tolist(),
        )


def prefill(body, r: Rows, dtype) -> torch.Tensor:
    """One forward over every row's prompt -> (B, T, D) last hidden states (padding rows: meaningless)."""
    r.forward_passes = 1
    if not r.padded:
        return body(input_ids=r.prompt, past_key_values=r.cache, use_cache=True).last_hidden_state
    mask = prefill_mask(r.pad, r.width, dtype)
    positions = (torch.arange(r.width, device=r.pad.device)[None] - r.pad[:, None]).clamp(min=0)  # (B, T)
    return body(
        input_ids=r.prompt, attention_mask=mask, position_ids=positions, past_key_values=r.cache, use_cache=True
    ).last_hidden_state


def row_probs(logits, r: Rows, processor, temperature: float, top_k, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """(B, V) float32 logits of each active row's next token -> (B, V) probabilities, processors on each row's
    history."""
    if processor is None or not reads_history(processor):
        return scores_to_probs(logits, r.seq[:1, :1], processor, temperature, top_k, top_p, min_p)
    scores = torch.stack([processor(r.history(i), logits[i : i + 1])[0] for i in range(r.active)])
    return scores_to_probs(scores, r.seq[:1, :1], None, temperature, top_k, top_p, min_p)


# ----- auto-regressive -----
def generate_ar_rows(model, ids, mask, max_new_tokens, temperature, top_k, eos_token_id, processor, streamer,
                     generator, top_p=1.0, min_p=0.0) -> GenerationOutput:  # fmt: skip
    """`generate_ar` over a batch: one token per active row per forward; rows keep one common length."""
    body, out_layer = split_model(model)
    r = Rows(model, ids, mask, max_new_tokens, 0, eos_token_id, streamer)
    dtype = out_layer.weight.dtype
    hidden = prefill(body, r, dtype)[:, -1]  # (B, D)
    while True:
        probs = row_probs(output_logits(out_layer, hidden), r, processor, temperature, top_k, top_p, min_p)  # (B, V)
        tokens = probs.argmax(-1) if temperature == 0 else sample(probs, generator)[:, 0]  # (B,)
        r.emit([[t] for t in tokens.tolist()], step=r.forward_passes > 1)
        r.drop_finished()
        if r.active == 0:
            return r.output()
        length = int(r.lengths[0])  # every active row has this length
        step = {"input_ids": r.seq[:, length - 1 : length], "past_key_values": r.cache, "use_cache": True}
        if r.padded:
            step |= {
                "attention_mask": step_mask(r.pad, length - 1, dtype),
                "position_ids": (length - 1 - r.pad)[:, None],
            }
        hidden = body(**step).last_hidden_state[:, -1]  # (B, D)
        r.forward_passes += 1


# ----- the feature drafter over a batch -----
class BatchDraftSession:
    """`vadusa.drafter.DraftSession` for a batch: one drafter cache of (B, heads, capacity, dh), per-row committed
    lengths; a commit (ragged: each row its own accepted rows, right-padded) and each tree depth's draft rows are
    ONE drafter call for every row, with per-row positions and additive masks. The same folded weights and the
    same values as the one-row session, to float rounding (tests: batch rows == batch-1 decodes)."""

    def __init__(self, drafter: FeatureDrafter, model, batch: int, capacity: int):
        c = drafter.config
        self.dim, self.heads, self.dh = c.hidden_size, c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.w = decoding_weights(drafter, model)
        device, dtype = self.w.out_t.device, self.w.out_t.dtype
        self.keys = torch.zeros(batch, self.heads, capacity, self.dh, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) committed rows
        cos, sin = drafter.rope(torch.arange(capacity, device=device))  # (capacity, dh)
        self.cos, self.sin = cos.to(dtype).repeat(1, 2 * self.heads), sin.to(dtype).repeat(1, 2 * self.heads)
        self.capacity, self.dtype = capacity, dtype

    def select_rows(self, rows: torch.Tensor) -> None:
        self.keys, self.values, self.lengths = self.keys[rows], self.values[rows], self.lengths[rows]

    def write(self, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor) -> None:
        """(B, h, n, dh) keys / values of row b at starts[b] .. starts[b] + n - 1."""
        b, _, n, _ = k.shape
        rows = torch.arange(b, device=k.device)[:, None]
        cols = (starts[:, None] + torch.arange(n, device=k.device)).clamp(max=self.capacity - 1)  # (B, n)
        self.keys[rows, :, cols] = k.transpose(1, 2)
        self.values[rows, :, cols] = v.transpose(1, 2)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """(B, n, D) residual and (B, h, n, dh) attention output -> (B, n, D) predicted next features."""
        b, n = x.shape[0], x.shape[1]
        x = x + attended.transpose(1, 2).reshape(b, n, self.dim) @ self.w.w_o
        gate, up = (unit(x) @ self.w.w_gate_up).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ self.w.w_down
        return unit(x) * self.w.out_scale

    def commit(self, tokens: torch.Tensor, feats: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Row b's first counts[b] of (B, m) tokens / (B, m, D) true features join its prefix -> (B, D) the output
        of each row's last committed row (it drafts depth 1)."""
        b, m = tokens.shape
        d, h, dh = self.dim, self.heads, self.dh
        start, end = self.lengths, self.lengths + counts
        feats = feats.to(self.w.feat_proj.dtype)  # the base's states, cast to the drafter's dtype
        x = self.w.token_proj[tokens] + feats @ self.w.feat_proj  # (B, m, D)
        xn = unit(x)
        kv = xn @ self.w.w_kv  # (B, m, 3D): k, v, rot(k)
        pos = (start[:, None] + torch.arange(m, device=tokens.device)).clamp(max=self.capacity - 1)  # (B, m)
        k = kv[..., :d] * self.cos[pos][..., d:] + kv[..., 2 * d :] * self.sin[pos][..., d:]  # (B, m, D) rotary k
        self.write(k.view(b, m, h, dh).transpose(1, 2), kv[..., d : 2 * d].view(b, m, h, dh).transpose(1, 2), start)
        rows = torch.arange(b, device=tokens.device)
        last = xn[rows, counts - 1]  # (B, D)
        qr = last @ self.w.w_q  # (B, 2D): q, rot(q)
        q = qr[:, :d] * self.cos[end - 1, :d] + qr[:, d:] * self.sin[end - 1, :d]  # (B, D)
        width = int(end.max())
        mask = additive(torch.arange(width, device=tokens.device)[None] < end[:, None], self.dtype)  # (B, E)
        attended = torch.nn.functional.scaled_dot_product_attention(
            q.view(b, h, 1, dh), self.keys[:, :, :width], self.values[:, :, :width], attn_mask=mask[:, None, None]
        )  # (B, h, 1, dh)
        self.lengths = end
        return self.finish(x[rows, counts - 1][:, None], attended)[:, 0]

    def rows(self, tokens, feats, position: torch.Tensor, written: int, bias: torch.Tensor) -> torch.Tensor:
        """One tree depth's inner rows, (B, k) tokens / (B, k, D) features at `position` (B,), written after each
        row's committed rows and the `written` scratch rows above them; bias (k, written + k) is their mask over
        the scratch rows. -> (B, k, D)."""
        b, k = tokens.shape
        d, h, dh = self.dim, self.heads, self.dh
        x = self.w.token_proj[tokens] + feats @ self.w.feat_proj  # (B, k, D)
        y = unit(x) @ self.w.w_qkv  # (B, k, 5D): q, k, v, rot(q), rot(k)
        qk = y[..., : 2 * d] * self.cos[position][:, None] + y[..., 3 * d :] * self.sin[position][:, None]
        qk = qk.view(b, k, 2, h, dh).permute(2, 0, 3, 1, 4)  # (2, B, h, k, dh)
        self.write(qk[1], y[..., 2 * d : 3 * d].view(b, k, h, dh).transpose(1, 2), self.lengths + written)
        seen = written + k
        cols = torch.arange(int(self.lengths.max()) + seen, device=tokens.device)
        rel = cols[None] - self.lengths[:, None]  # (B, E) column relative to the row's scratch rows
        scratch = bias[:, rel.clamp(0, seen - 1)].transpose(0, 1)  # (B, k, E)
        hidden = torch.full_like(scratch, torch.finfo(self.dtype).min)
        mask = torch.where((rel < 0)[:, None], 0.0, torch.where((rel < seen)[:, None], scratch, hidden))
        attended = torch.nn.functional.scaled_dot_product_attention(
            qk[0], self.keys[:, :, : cols.shape[0]], self.values[:, :, : cols.shape[0]], attn_mask=mask[:, None]
        )  # (B, h, k, dh)
        return self.finish(x, attended)

    def draft(self, plan, roots: torch.Tensor, root_feats: torch.Tensor, r: "Rows", processor) -> torch.Tensor:
        """(B, N+1) tree tokens of every row: each node is its parent's rank-r candidate, depth by depth."""
        b = roots.shape[0]
        tokens = torch.empty(b, plan.size, dtype=torch.long, device=roots.device)
        tokens[:, 0] = roots
        feats = root_feats[:, None]  # (B, 1, D): outputs of the inner rows of the depth above
        written = 0
        for d, nodes in enumerate(plan.nodes, start=1):
            logits = feats @ self.w.out_t  # (B, m, V)
            if processor is not None:
                if reads_history(processor):
                    logits = torch.stack(
                        [processor(r.history(i).expand(logits.shape[1], -1), logits[i].float()) for i in range(b)]
                    )
                else:
                    logits = processor(r.seq[:1, :1], logits.flatten(0, 1).float()).view(logits.shape)
            top = torch.topk(logits, plan.max_rank + 1, dim=-1).indices  # (B, m, K)
            tokens[:, nodes] = top[:, plan.parent_row[d - 1], plan.ranks[d - 1]]
            inner = plan.inner[d - 1]
            if len(inner) == 0:
                break
            parent_feats = feats[:, plan.inner_parent_row[d - 1]]  # (B, m_d, D)
            feats = self.rows(tokens[:, inner], parent_feats, self.lengths - 1 + d, written, plan.bias[d - 1])
            written += len(inner)
        return tokens


# ----- draft -> verify -> accept -----
def draft_rows(heads, hidden, roots, tree, r: Rows, processor) -> torch.Tensor:
    """(B, n) tree tokens of every active row from the draft heads (one heads call for the batch)."""
    if processor is not None and reads_history(processor):
        return torch.stack(
            [draft_tokens(heads, hidden[i], roots[i], tree, r.history(i), processor) for i in range(r.active)]
        )
    logits = heads(hidden.to(heads.dtype), roots)  # (B, H, V)
    if processor is not None:
        logits = processor(r.seq[:1, :1].expand(logits.shape[0] * logits.shape[1], -1), logits.flatten(0, 1).float())
        logits = logits.view(hidden.shape[0], -1, logits.shape[-1])
    top = torch.topk(logits, tree.max_rank + 1, dim=-1).indices  # (B, H, K)
    head, rank = tree.heads_and_ranks.to(roots.device).unbind(-1)  # (N,), (N,)
    return torch.cat([roots[:, None], top[:, head, rank]], dim=1)  # (B, N+1)


def rows_node_probs(
    logits, tokens, r: Rows, buffers, processor, temperature: float, top_k, top_p=1.0, min_p=0.0
) -> torch.Tensor:
    """(B, n, V) float32 logits of every row's tree -> (B, n, V) probabilities, processors on each node's own
    history."""
    if processor is None or not reads_history(processor):
        flat = scores_to_probs(logits.flatten(0, 1), r.seq[:1, :1], processor, temperature, top_k, top_p, min_p)
        return flat.view(logits.shape)
    return torch.stack(
        [
            node_probs(logits[i], tokens[i], r.history(i), buffers, processor, temperature, top_k, top_p, min_p)
            for i in range(r.active)
        ]
    )


def generate_rows(model, heads, ids, mask, tree, max_new_tokens, temperature, top_k, rule, eos_token_id, processor,
                  streamer, generator, top_p=1.0, min_p=0.0) -> GenerationOutput:  # fmt: skip
    """`generate` over a batch: every active row drafts its tree, ONE forward verifies every row's tree, each
    row walks, emits and is compacted to its own accepted path."""
    body, out_layer = split_model(model)
    n = len(tree)
    r = Rows(model, ids, mask, max_new_tokens, n, eos_token_id, streamer)
    device, dtype = model.device, out_layer.weight.dtype
    ancestors = tree.ancestor_mask.to(device)  # (n, n)
    depths = tree.depths.to(device)  # (n,)
    buffers = tree.memo(("walk", device), lambda: walk_buffers(tree, device))
    width = buffers.child_index.shape[1]
    valid = buffers.child_index >= 0  # (n, C)

    prompt_states = prefill(body, r, dtype)  # (B, T, D)
    hidden = prompt_states[:, -1]  # (B, D)
    probs = row_probs(output_logits(out_layer, hidden), r, processor, temperature, top_k, top_p, min_p)  # (B, V)
    no_children = torch.empty(r.active, 0, dtype=torch.long, device=device)
    r.emit([[t] for t in rule.batch(probs, no_children, rule.uniforms(r.active, 0, generator, device))[1].tolist()],
           step=False)  # fmt: skip
    feature = isinstance(heads, FeatureDrafter)
    if feature:  # the drafter's cache: rows (x_{j+1}, f_j) of each row's prompt, the root's last
        plan = tree.memo(("plan", heads.dtype), lambda: tree_plan(tree, heads.dtype))
        session = BatchDraftSession(heads, model, r.active, r.capacity)
        index = (r.pad[:, None] + torch.arange(r.width, device=device)).clamp(max=r.width - 1)  # (B, T) left-aligned
        root_feats = session.commit(
            r.seq.gather(1, index + 1),
            prompt_states.gather(1, index[..., None].expand(-1, -1, prompt_states.shape[-1])),
            r.width - r.pad,
        )  # (B, D)
    keep = r.drop_finished()
    if keep is not None and r.active:
        hidden = hidden[keep]
        if feature:
            session.select_rows(keep)
            root_feats = root_feats[keep]
    while r.active:
        past = r.lengths - 1  # (B,) each row's cache holds everything before its root
        roots = r.seq.gather(1, past[:, None])[:, 0]  # (B,)
        if feature:
            tokens = session.draft(plan, roots, root_feats, r, processor)  # (B, n)
        else:
            tokens = draft_rows(heads, hidden, roots, tree, r, processor)  # (B, n)

        r.cache.set_starts(past)
        states = body(
            input_ids=tokens,
            attention_mask=tree_mask(ancestors, past, r.pad, dtype),
            position_ids=(past - r.pad)[:, None] + depths,
            past_key_values=r.cache,
            use_cache=True,
        ).last_hidden_state  # (B, n, D)
        r.forward_passes += 1

        logits = output_logits(out_layer, states)  # (B, n, V)
        probs = rows_node_probs(logits, tokens, r, buffers, processor, temperature, top_k, top_p, min_p)
        child_tokens = torch.where(valid, tokens[:, buffers.child_index.clamp(min=0)], -1)  # (B, n, C)
        u = rule.uniforms(r.active * n, width, generator, device)
        index, next_token = rule.batch(probs.flatten(0, 1), child_tokens.flatten(0, 1), u)
        index, next_token = index.view(r.active, n).tolist(), next_token.view(r.active, n).tolist()
        paths, accepted = [], []
        for i in range(r.active):
            path, next_root = follow(index[i], next_token[i], buffers.children)
            paths.append(path)
            accepted.append(tokens[i, path[1:]].tolist() + [next_root])

        longest = max(len(p) for p in paths)
        kept = torch.tensor([p + p[-1:] * (longest - len(p)) for p in paths], device=device)  # (B, P)
        r.cache.keep_rows(past, kept, past + torch.tensor([len(p) for p in paths], device=device))
        last = torch.tensor([p[-1] for p in paths], device=device)  # (B,) node where each walk stopped
        hidden = states[torch.arange(r.active, device=device), last]  # (B, D)
        if feature:  # each row commits its accepted tokens with the features of its path (right-padded)
            padded = torch.tensor([a + a[-1:] * (longest - len(a)) for a in accepted], device=device)  # (B, P)
            path_states = states.gather(1, kept[..., None].expand(-1, -1, states.shape[-1]))  # (B, P, D)
            root_feats = session.commit(padded, path_states, kept.new_tensor([len(p) for p in paths]))
        r.emit(accepted)
        keep = r.drop_finished()
        if keep is not None and r.active:
            hidden = hidden[keep]
            if feature:
                session.select_rows(keep)
                root_feats = root_feats[keep]
    return r.output()

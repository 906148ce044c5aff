"""Block-causal attention masks, as 4D additive float masks (0 = visible, dtype-min = hidden).

Layout of a sequence with prompt length P and block size B. The generation stream starts at position
s = P - 1 (the prompt's last token) and is cut into blocks of B positions, block k = [s + kB, s + (k+1)B).
Because of the token shift (the prediction for position i is read at position i - 1), block k's B
positions are the *inputs* that predict the B targets s + kB + 1 ... s + (k+1)B; its first input is
always a known token (the prompt's last token or the previous block's last target).

Training sequence (BD3-LM style): [clean x_0..x_{T-1} ; noised copy 1 ; ... ; noised copy C], each noised
copy holding positions s .. T-2 (some tokens replaced by the mask token):
    clean  -> clean     causal over the prompt; in the generation stream block-causal (a block sees
                        the blocks before it and itself, bidirectionally), or causal (`causal_clean`)
    noised -> clean     noised block k sees the clean prompt and the clean blocks < k
    noised -> noised    only its own block of its own copy, bidirectionally
    clean  -> noised    never
Teacher-prefix layout (`teacher_prefix`): the clean sequence is run by the base itself (LoRA off,
causal), so its keys and values are exactly the auto-regressive cache, and block k holds the targets
p .. p+B-1 with p = prompt_len + kB. Target p is the teacher's own prediction (read at clean row p-1);
the student's window is the B-1 inputs y_p .. y_{p+B-2} (any of them masked), predicting p+1 .. p+B-1.
The student's rows then attend to keys [clean (the teacher's cache) ; noised copies]:
    noised -> clean     window k sees the clean positions < p (the cache as decoding has it)
    noised -> noised    only its own window of its own copy, bidirectionally

Decoding: the cache holds everything before the current block's first input; one forward carries an
optional `commit` segment (the completed previous block, or the prompt at prefill) and the `draft`
window (the current block): commit sees the cache and itself (causal for the prompt, bidirectional for
a block), the draft sees the cache, the commit and itself.
"""

import torch


def additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean visibility (..., q, k) -> additive float mask: 0 where visible, the dtype's minimum elsewhere."""
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)


def training_layout(prompt_len: int, length: int, clean_size: int, noised_size: int, copies: int):
    """Per row of the [clean ; noised x copies] input: (position (L,), copy (L,) 0 = clean, valid (L,)).

    `length` is this sample's true length T (<= clean_size); its noised copies hold T - prompt_len
    positions (<= noised_size); the rest is right padding.
    """
    if not 1 <= prompt_len < length <= clean_size or length - prompt_len > noised_size:
        raise ValueError(
            f"bad layout: prompt_len={prompt_len}, length={length}, clean_size={clean_size}, noised_size={noised_size}"
        )
    start = prompt_len - 1
    clean_pos = torch.arange(clean_size)
    noised_pos = start + torch.arange(noised_size)
    position = torch.cat([clean_pos] + [noised_pos] * copies)  # (L,)
    copy = torch.cat(
        [torch.zeros(clean_size, dtype=torch.long)] + [torch.full((noised_size,), c + 1) for c in range(copies)]
    )
    valid = torch.cat([clean_pos < length] + [noised_pos < length - 1] * copies)  # (L,)
    return position, copy, valid


def training_visibility(
    prompt_len: int,
    length: int,
    block_size: int,
    clean_size: int,
    noised_size: int,
    copies: int = 1,
    causal_clean: bool = False,
) -> torch.Tensor:
    """(L, L) boolean visibility of the training input, L = clean_size + copies * noised_size (rules above).

    `causal_clean` keeps the clean copy causal everywhere (the variant whose cache is the teacher's own).
    Padding rows see only themselves (so no softmax row is empty); nothing sees padding.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    position, copy, valid = training_layout(prompt_len, length, clean_size, noised_size, copies)
    start = prompt_len - 1
    in_stream = position >= start
    block = torch.where(in_stream, (position - start) // block_size, -1)  # (L,) -1 for the prompt
    q_pos, k_pos = position[:, None], position[None, :]
    q_blk, k_blk = block[:, None], block[None, :]
    q_copy, k_copy = copy[:, None], copy[None, :]
    q_clean, k_clean = q_copy == 0, k_copy == 0
    same_block = (q_blk == k_blk) & in_stream[:, None] & in_stream[None, :]
    clean_clean = q_clean & k_clean & ((k_pos <= q_pos) | (same_block & (not causal_clean)))
    noised_clean = ~q_clean & k_clean & ((k_blk < 0) | (k_blk < q_blk))
    noised_noised = ~q_clean & (q_copy == k_copy) & same_block
    visible = (clean_clean | noised_clean | noised_noised) & valid[None, :]
    return visible | torch.eye(len(position), dtype=torch.bool)


def training_mask(
    prompt_len: int,
    length: int,
    block_size: int,
    clean_size: int,
    noised_size: int,
    copies: int = 1,
    dtype: torch.dtype = torch.float32,
    causal_clean: bool = False,
) -> torch.Tensor:
    """(1, L, L) additive mask of one training sample (stack samples on dim 0 for a (N, 1, L, L) batch)."""
    visible = training_visibility(prompt_len, length, block_size, clean_size, noised_size, copies, causal_clean)
    return additive(visible, dtype)[None]


def decoding_visibility(past: int, commit: int, draft: int, causal_commit: bool) -> torch.Tensor:
    """(commit + draft, past + commit + draft) boolean visibility of one decoding forward (rules above)."""
    n = commit + draft
    visible = torch.ones(n, past + n, dtype=torch.bool)
    visible[:commit, past + commit :] = False  # the commit never sees the draft
    if causal_commit:
        visible[:commit, past : past + commit] = torch.ones(commit, commit, dtype=torch.bool).tril()
    return visible


def decoding_mask(past: int, commit: int, draft: int, causal_commit: bool, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, commit + draft, past + commit + draft) additive mask of one decoding forward."""
    return additive(decoding_visibility(past, commit, draft, causal_commit), dtype)[None, None]


def prefix_layout(prompt_len: int, length: int, block_size: int, noised_size: int):
    """Teacher-prefix noised copy: (position (G,), window (G,), valid (G,)) of its slots, slot j at position
    prompt_len + j; a slot is a student input if it is not a block's last target and its target exists."""
    if not 1 <= prompt_len < length or length - prompt_len - 1 > noised_size:
        raise ValueError(f"bad layout: prompt_len={prompt_len}, length={length}, noised_size={noised_size}")
    j = torch.arange(noised_size)
    valid = (j % block_size < block_size - 1) & (prompt_len + j < length - 1)
    return prompt_len + j, j // block_size, valid


def prefix_training_visibility(
    prompt_len: int, length: int, block_size: int, clean_size: int, noised_size: int, copies: int = 1
) -> torch.Tensor:
    """(copies * G, clean_size + copies * G) boolean visibility of the teacher-prefix student rows (G = noised_size).

    Keys are the clean sequence (the teacher's cache) then the noised copies; invalid slots (a block's last
    target, padding) see only themselves and are seen by no one.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    position, window, valid = prefix_layout(prompt_len, length, block_size, noised_size)
    clean_pos = torch.arange(clean_size)
    first_target = prompt_len + window * block_size  # (G,) position of the window's teacher-drawn target
    sees_clean = (clean_pos[None, :] < first_target[:, None]) & (clean_pos < length)[None, :]  # (G, S)
    own = (window[:, None] == window[None, :]) & valid[None, :]  # (G, G)
    eye = torch.eye(copies * noised_size, dtype=torch.bool)
    noised = torch.block_diag(*[own] * copies) | eye
    return torch.cat([sees_clean.repeat(copies, 1), noised], dim=1)


def prefix_training_mask(
    prompt_len: int, length: int, block_size: int, clean_size: int, noised_size: int, copies: int = 1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # fmt: skip
    """(1, copies * G, clean_size + copies * G) additive mask of one teacher-prefix sample."""
    visible = prefix_training_visibility(prompt_len, length, block_size, clean_size, noised_size, copies)
    return additive(visible, dtype)[None]


class MaskBuffer:
    """Decoding masks cut from one zero buffer, as `verify` does for trees: every row sees the cached prefix,
    so only the forward's own n columns are non-zero; `take` writes them, `clear` zeroes them after the
    forward. Forwards larger than the buffer (the prefill) get a fresh `decoding_mask`."""

    def __init__(self, rows: int, capacity: int, dtype: torch.dtype, device=None):
        self.buffer = torch.zeros(1, 1, rows, capacity, dtype=dtype, device=device)  # (1, 1, rows, capacity)
        self.blocks: dict[tuple[int, int, bool], torch.Tensor] = {}  # (commit, draft, causal) -> (n, n) block
        self.written: tuple[int, int] | None = None  # (rows, first column) of the block in the buffer

    def take(self, past: int, commit: int, draft: int, causal_commit: bool) -> torch.Tensor:
        """(1, 1, commit + draft, past + commit + draft) == decoding_mask(past, commit, draft, causal_commit)."""
        n, (rows, capacity) = commit + draft, self.buffer.shape[2:]
        dtype, device = self.buffer.dtype, self.buffer.device
        if n > rows or past + n > capacity:
            return decoding_mask(past, commit, draft, causal_commit, dtype).to(device)
        key = (commit, draft, causal_commit)
        if key not in self.blocks:
            self.blocks[key] = decoding_mask(0, commit, draft, causal_commit, dtype)[0, 0].to(device)  # (n, n)
        self.buffer[0, 0, :n, past : past + n] = self.blocks[key]
        self.written = (n, past)
        return self.buffer[..., :n, : past + n]

    def clear(self) -> None:
        if self.written is not None:
            n, past = self.written
            self.buffer[0, 0, :n, past : past + n] = 0
            self.written = None

"""Block distillation: masks vs brute force, student == teacher at block size 1, generalised JSD,
decoding == greedy AR at block size 1, exact stops, a short distillation lowering the loss, bad inputs."""

import itertools
import math

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

import vadusa
from tests.conftest import TEST_PROMPT, tiny_llama
from vadusa.blockdiff import generalized_jsd, generate, load_student, make_student, save_adapter
from vadusa.blockdiff.masks import (
    MaskBuffer,
    decoding_mask,
    decoding_visibility,
    prefix_training_mask,
    prefix_training_visibility,
    training_mask,
    training_visibility,
)
from vadusa.blockdiff.student import BlockConfig, base_fingerprint
from vadusa.blockdiff.train import (
    Stage,
    TrainConfig,
    batch_loss,
    make_batch,
    sample_masks,
    teacher_forward,
    train,
    unknown_targets,
)
from vadusa.cache import BufferCache
from vadusa.decoders import build_decoder
from vadusa.generate import split_model

MASK = 0  # mask token of the tiny models (a reserved id: never a prompt token below)
EOS = 7


# ----- masks -----
def brute_training_visibility(prompt_len, length, block, clean_size, noised_size, copies, causal_clean):
    """The training rules written out row by row: who may the row for (copy, position) attend to?"""
    s = prompt_len - 1
    rows = [("clean", a, a < length) for a in range(clean_size)]
    for c in range(copies):
        rows += [(f"noised{c}", s + j, s + j < length - 1) for j in range(noised_size)]
    n = len(rows)
    visible = torch.zeros(n, n, dtype=torch.bool)
    for q, (q_kind, a, _) in enumerate(rows):
        for k, (k_kind, b, k_valid) in enumerate(rows):
            if q == k:
                visible[q, k] = True
                continue
            if not k_valid:
                continue
            if q_kind == "clean" and k_kind == "clean":
                same_block = a >= s and b >= s and (a - s) // block == (b - s) // block
                visible[q, k] = b <= a or (same_block and not causal_clean)
            elif q_kind != "clean" and k_kind == "clean":
                block_start = s + ((a - s) // block) * block  # noised block sees clean positions before it
                visible[q, k] = b < block_start
            elif q_kind == k_kind:
                visible[q, k] = (a - s) // block == (b - s) // block
    return visible


@pytest.mark.parametrize(
    "prompt_len,length,block,clean_size,noised_size,copies",
    [(1, 2, 1, 2, 1, 1), (3, 11, 1, 11, 8, 1), (3, 11, 4, 13, 9, 2), (5, 9, 3, 9, 6, 2), (2, 12, 5, 14, 12, 1)],
)
@pytest.mark.parametrize("causal_clean", [False, True])
def test_training_mask_matches_brute_force(prompt_len, length, block, clean_size, noised_size, copies, causal_clean):
    args = (prompt_len, length, block, clean_size, noised_size, copies)
    got = training_visibility(*args, causal_clean=causal_clean)
    assert torch.equal(got, brute_training_visibility(*args, causal_clean))
    mask = training_mask(*args, dtype=torch.bfloat16, causal_clean=causal_clean)
    assert mask.dtype == torch.bfloat16 and set(mask.unique().tolist()) <= {0.0, torch.finfo(torch.bfloat16).min}
    assert torch.equal(mask[0] == 0, got)


def test_training_mask_block_size_1_is_causal():
    vis = training_visibility(4, 12, 1, 12, 8, 1)
    assert torch.equal(vis[:12, :12], torch.ones(12, 12, dtype=torch.bool).tril())
    for j in range(8):  # noised slot j (position 3 + j) sees the clean prefix before it and itself
        row = vis[12 + j]
        assert row[: 3 + j].all() and not row[3 + j : 12].any() and row[12:].tolist() == [k == j for k in range(8)]


@pytest.mark.parametrize("past,commit,draft,causal", itertools.product([0, 5], [0, 3], [1, 4], [True, False]))
def test_decoding_mask_matches_brute_force(past, commit, draft, causal):
    n = commit + draft
    expected = torch.zeros(n, past + n, dtype=torch.bool)
    for q in range(n):
        for k in range(past + n):
            if k < past or q >= commit:
                expected[q, k] = True
            elif k < past + commit:  # a commit row sees the commit (causally at prefill), never the draft
                expected[q, k] = (k - past <= q) or not causal
    assert torch.equal(decoding_visibility(past, commit, draft, causal), expected)
    mask = decoding_mask(past, commit, draft, causal, torch.float32)
    assert mask.shape == (1, 1, n, past + n) and torch.equal(mask[0, 0] == 0, expected)


def test_mask_buffer_equals_decoding_mask():
    """Masks cut from the shared buffer equal fresh ones, call after call, as the prefix grows and shrinks."""
    masks = MaskBuffer(8, 40, torch.float32)
    calls = [(5, 0, 4, False), (5, 4, 4, True), (9, 0, 4, False), (9, 3, 1, False), (2, 0, 8, False),
             (30, 4, 4, False), (0, 12, 4, True), (39, 0, 1, False)]  # fmt: skip
    for past, commit, draft, causal in calls:
        got = masks.take(past, commit, draft, causal)
        assert torch.equal(got, decoding_mask(past, commit, draft, causal, torch.float32))
        masks.clear()
    assert not masks.buffer.any()


@pytest.mark.parametrize("causal_clean", [False, True])
def test_decoding_forward_equals_training_forward(causal_clean):
    """The student at decode time computes exactly what it was trained on: the noised rows of a block in
    the training forward == the draft window after the prefix was committed block by block."""
    model = tiny_llama()
    seq, prompt_len, block = torch.tensor([5, 9, 13, 2, 30, 31, 8, 44, 12, 19, 21, 3, 6]), 4, 3
    masked = torch.tensor([False, True, True, False, False, True, False, True, True])  # noised slots 0..8
    batch_in = seq.clone()
    s, gen = prompt_len - 1, len(seq) - prompt_len
    noised = torch.where(masked, MASK, seq[s : s + gen])
    ids = torch.cat([seq, noised])[None]
    positions = torch.cat([torch.arange(len(seq)), s + torch.arange(gen)])[None]
    mask = training_mask(prompt_len, len(seq), block, len(seq), gen, 1, causal_clean=causal_clean)[None]
    with torch.no_grad():
        trained = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[0, len(seq) :]  # (G, V)
        body, out_layer = split_model(model)
        for k in range(math.ceil(gen / block)):
            cache = BufferCache(2, 64)
            body(
                input_ids=batch_in[:s][None], past_key_values=cache, use_cache=True
            )  # prefill: the prompt but its last
            past = s
            for j in range(k):  # committed blocks, each bidirectional over itself
                window = batch_in[s + j * block : s + (j + 1) * block]
                m = decoding_mask(past, len(window), 0, causal_clean, torch.float32)
                body(input_ids=window[None], attention_mask=m, position_ids=(past + torch.arange(len(window)))[None],
                     past_key_values=cache, use_cache=True)  # fmt: skip
                past += len(window)
            draft = noised[k * block : (k + 1) * block]
            m = decoding_mask(past, 0, len(draft), False, torch.float32)
            hidden = body(input_ids=draft[None], attention_mask=m, position_ids=(past + torch.arange(len(draft)))[None],
                          past_key_values=cache, use_cache=True).last_hidden_state[0]  # fmt: skip
            torch.testing.assert_close(out_layer(hidden), trained[k * block : (k + 1) * block], atol=1e-5, rtol=1e-5)


# ----- student and loss -----
def test_student_is_teacher_at_block_size_1():
    model = tiny_llama()
    student = make_student(model, rank=4)
    pool = [(torch.tensor(TEST_PROMPT + [11, 12, 13, 14, 15, 16, 17]), 6), (torch.tensor([4, 5, 6, 20, 21]), 3)]
    gen = torch.Generator().manual_seed(0)
    batch = make_batch(pool, Stage(1, 1.0, (0.5, 1.0)), True, MASK, gen)
    for i, (seq, p) in enumerate(pool):  # no window holds a mask token at block size 1
        for at in (13, 13 + 7):  # the two noised copies (clean size 13, noised size 7)
            assert torch.equal(batch.ids[i, at : at + len(seq) - p], seq[p - 1 : -1])
    with torch.no_grad():
        loss = batch_loss(student, batch, beta=0.5)
        s = student(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions).logits
        with student.disable_adapter():
            t = student(input_ids=batch.clean).logits
    vocab = s.shape[-1]
    torch.testing.assert_close(s.reshape(-1, vocab)[batch.rows], t.reshape(-1, vocab)[batch.teacher_rows])
    assert len(batch.rows) == 2 * (7 + 2) and loss.item() < 1e-6
    # with masks (block size 4) the initial student is not the teacher: the test can tell the two apart
    batch4 = make_batch(pool, Stage(4, 1.0, (1.0, 1.0)), False, MASK, gen)
    with torch.no_grad():
        assert batch_loss(student, batch4, beta=0.5).item() > 1e-4


def test_unknown_targets_and_complementary_masks():
    masked = sample_masks(11, Stage(4, 1.0, (0.5, 0.5)), torch.Generator().manual_seed(3))
    assert not masked[[0, 4, 8]].any()  # a block's first input is always known
    comp = ~masked & (torch.arange(11) % 4 > 0)
    both = unknown_targets(masked, 4) | unknown_targets(comp, 4)
    assert both.all()  # with the complementary copy every target is trained as unknown
    assert unknown_targets(torch.zeros(11, dtype=torch.bool), 4).nonzero()[:, 0].tolist() == [3, 7, 10]
    suffix = sample_masks(12, Stage(4, 0.0, (1.0, 1.0)), torch.Generator())
    assert suffix.tolist() == [False, True, True, True] * 3
    half = sample_masks(4000, Stage(4, 0.0, (0.0, 1.0)), torch.Generator().manual_seed(0)).view(-1, 4)
    counts = half.sum(1)
    assert all(
        torch.equal(row[4 - int(c) :], torch.ones(int(c), dtype=torch.bool))
        for row, c in zip(half, counts, strict=True)
    )


def direct_jsd(p, q, beta):
    """Loops in float64 over the vocabulary, the definitions in loss.py's doc."""
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)  # noqa: E731
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
    return (beta * kl(p, m) + (1 - beta) * kl(q, m)) / (beta * (1 - beta))


def test_generalized_jsd():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=gen) * 2, torch.randn(5, 7, generator=gen) * 2
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        got = generalized_jsd(s, t, beta)
        p, q = torch.softmax(t.double(), -1).tolist(), torch.softmax(s.double(), -1).tolist()
        want = torch.tensor([direct_jsd(pi, qi, beta) for pi, qi in zip(p, q, strict=True)], dtype=torch.float32)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert generalized_jsd(s, s, beta).abs().max() < 1e-6  # 0 for equal distributions
        assert (got > 0).all()
    torch.testing.assert_close(generalized_jsd(s, t, 0.5), generalized_jsd(t, s, 0.5))  # symmetric at 1/2
    assert not torch.allclose(generalized_jsd(s, t, 0.1), generalized_jsd(t, s, 0.1), atol=1e-3)
    # the endpoints are the limits of the definition: forward KL(T||S) at 0, reverse KL(S||T) at 1 (float64)
    p, q = torch.softmax(t.double(), -1).tolist(), torch.softmax(s.double(), -1).tolist()
    for end, near in ((0.0, 1e-7), (1.0, 1 - 1e-7)):
        for pi, qi in zip(p, q, strict=True):
            assert direct_jsd(pi, qi, near) == pytest.approx(direct_jsd(pi, qi, end), rel=1e-4)
    assert (generalized_jsd(s, t, 0.5) <= 4 * math.log(2) + 1e-6).all()
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, 1.5)


# ----- decoding -----
class NoMask:
    def __call__(self, input_ids, scores):
        return scores.index_fill(-1, torch.tensor([MASK]), float("-inf"))


def base_with_mask():
    model = tiny_llama()
    model.config.mask_token_id = MASK
    return model


MODES = {  # the decoding modes of `generate` beyond its rule: fixed blocks (exact or approximate cache), sliding
    "exact": {},
    "approximate": {"approximate_cache": True},
    "sliding": {"sliding": True, "unmask": "prefix"},
}


@pytest.mark.parametrize("penalty", [None, 1.3])
@pytest.mark.parametrize("mode", MODES)
def test_block_size_1_greedy_equals_generate_ar(penalty, mode):
    model = base_with_mask()
    prompt = torch.tensor([TEST_PROMPT])
    processor = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty)]) if penalty else None
    ar = vadusa.generate_ar(model, prompt, max_new_tokens=150, temperature=0, logits_processor=processor)
    out = generate(model, prompt, block_size=1, temperature=0, max_new_tokens=150, logits_processor=processor,
                   **MODES[mode])  # fmt: skip
    assert torch.equal(out.sequences, ar.sequences) and out.new_tokens == 150
    assert out.forward_passes == 150 and out.accepted_lengths == [1] * 149


def test_block_size_1_sampling_equals_generate_ar_sampling():
    """At block size 1 every draw is the AR draw: same generator, same tokens (the mask token banned in both)."""
    model = base_with_mask()
    prompt, ban = torch.tensor([TEST_PROMPT]), [NoMask()]
    ar = vadusa.generate_ar(model, prompt, max_new_tokens=60, generator=torch.Generator().manual_seed(4),
                            logits_processor=ban)  # fmt: skip
    out = generate(model, prompt, block_size=1, max_new_tokens=60, generator=torch.Generator().manual_seed(4),
                   logits_processor=ban)  # fmt: skip
    assert torch.equal(out.sequences, ar.sequences)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_size,threshold", [(2, 0.02), (4, 0.02), (4, 0.9), (8, 0.005)])
def test_block_decoding_stops_exactly(block_size, threshold, mode):
    model = base_with_mask()
    prompt = torch.tensor([TEST_PROMPT])
    for seed in range(6):
        for budget in (1, 5, 23):
            out = generate(model, prompt, block_size, threshold, max_new_tokens=budget, eos_token_id=EOS,
                           generator=torch.Generator().manual_seed(seed), **MODES[mode])  # fmt: skip
            tokens = out.tokens.tolist()
            assert out.new_tokens == len(tokens) <= budget
            assert EOS not in tokens[:-1] and (tokens[-1] == EOS or len(tokens) == budget)
            assert MASK not in tokens
            assert out.forward_passes == 1 + len(out.accepted_lengths)
    many = generate(model, prompt, 8, 0.005, max_new_tokens=64, generator=torch.Generator().manual_seed(0),
                    **MODES[mode])  # fmt: skip
    assert many.new_tokens == 64 and many.forward_passes < 40  # a low threshold decides several tokens per pass


def reference_block_decode(model, prompt, block_size: int, threshold: float, max_new_tokens: int, prefix=False):
    """Greedy block decoding with no cache: every forward reruns the whole sequence under a brute-force mask
    (prompt causal; from the prompt's last token on, blocks of `block_size` inputs, each seeing everything
    before it and itself). The rules of `generate` at temperature 0, written out slot by slot."""
    seq, start = list(prompt), len(prompt) - 1
    while len(seq) - len(prompt) < max_new_tokens:
        p = len(seq)
        n = min(block_size, max_new_tokens - (p - len(prompt)))
        values = [None] * n
        while None in values:
            ids = seq[: p - 1] + [seq[p - 1]] + [MASK if v is None else v for v in values[: n - 1]]
            group = [i if i < start else len(seq) + (i - start) // block_size for i in range(len(ids))]
            visible = torch.tensor([[k <= q if k < start else group[k] <= group[q] for k in range(len(ids))]
                                    for q in range(len(ids))])  # fmt: skip
            mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
            with torch.no_grad():
                logits = model(torch.tensor([ids]), attention_mask=mask[None, None]).logits[0, p - 1 :]  # (n, V)
            logits[:, MASK] = float("-inf")
            probs = torch.softmax(logits, -1)
            confidence, tokens = probs.max(-1)
            todo = [j for j in range(n) if values[j] is None]
            best = todo[0] if prefix else max(todo, key=lambda j: confidence[j])
            for j in todo:
                if confidence[j] >= threshold or j == best:
                    values[j] = int(tokens[j])
                elif prefix:  # only the leading run of confident targets
                    break
        seq += values
    return seq[len(prompt) :]


def generate_counting_rows(model, *args, **kwargs):
    """(generate(model, *args, **kwargs), the number of input rows of each forward of the model's body)."""
    rows = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kw: rows.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        return generate(model, *args, **kwargs), rows
    finally:
        hook.remove()


@pytest.mark.parametrize("unmask", ["any", "prefix"])
@pytest.mark.parametrize("block_size,threshold", [(2, 0.5), (4, 0.9), (4, 0.05), (3, 0.3)])
def test_block_decoding_equals_a_no_cache_reference(block_size, threshold, unmask):
    """The cached decoder (commits fused into the next forward, or skipped when the last window was already
    clean) decodes exactly what full recomputation under the block-causal mask decodes."""
    model = sharp_llama(seed=3)
    model.config.mask_token_id = MASK
    out, rows = generate_counting_rows(model, torch.tensor([TEST_PROMPT]), block_size, threshold, temperature=0,
                                       max_new_tokens=37, unmask=unmask)  # fmt: skip
    expected = reference_block_decode(model, TEST_PROMPT, block_size, threshold, 37, prefix=unmask == "prefix")
    assert out.tokens.tolist() == expected
    blocks, fused = math.ceil(37 / block_size), sum(r > block_size for r in rows[1:])  # passes with a commit
    if threshold >= 0.5:  # one target at a time, left to right: most completed windows were clean
        assert fused < blocks - 1


def causal_take(self, past, commit, draft, causal_commit):
    """A MaskBuffer.take under which every row sees the cache and the inputs up to its own, nothing later."""
    return decoding_mask(past, commit + draft, 0, True, self.buffer.dtype)


@pytest.mark.parametrize("unmask", ["any", "prefix"])
@pytest.mark.parametrize("block_size,threshold,temperature", [(4, 0.3, 0), (8, 0.1, 0), (3, 0.9, 0), (6, 0.2, 1)])
def test_approximate_cache_is_exact_when_rows_never_see_later_inputs(
    monkeypatch, block_size, threshold, temperature, unmask
):
    """The approximate cache keeps a row's keys and values from the forward that fed its decided input; that
    row also saw the mask tokens after it, hence the approximation. Under causal masks it saw nothing later, so
    both caches must decode the same tokens in the same passes: this checks which rows are kept, where each
    window starts and what the commit holds, while the approximate cache forwards fewer rows."""
    monkeypatch.setattr(MaskBuffer, "take", causal_take)
    model = sharp_llama(seed=3)
    model.config.mask_token_id = MASK
    runs = {}
    for approximate in (False, True):
        g = torch.Generator().manual_seed(2)
        out, rows = generate_counting_rows(model, torch.tensor([TEST_PROMPT]), block_size, threshold,
                                           temperature=temperature, max_new_tokens=45, unmask=unmask,
                                           approximate_cache=approximate, generator=g)  # fmt: skip
        runs[approximate] = out.tokens.tolist(), out.forward_passes, sum(rows[1:])
    (exact, exact_passes, exact_rows), (approx, approx_passes, approx_rows) = runs[False], runs[True]
    assert approx == exact and approx_passes == exact_passes
    assert approx_rows < exact_rows


def reference_sliding_decode(model, prompt, size: int, threshold: float, max_new_tokens: int):
    """Greedy sliding-window decoding with no cache under a causal mask: each forward reruns the decided
    sequence followed by mask tokens up to a window of `size` inputs from the first input the last forward
    decided, and decides the leading run of confident targets (always the first)."""
    seq, start = list(prompt), len(prompt) - 1
    while len(seq) - len(prompt) < max_new_tokens:
        p = len(seq)
        n = min(size - (p - start) + 1, max_new_tokens - (p - len(prompt)))
        with torch.no_grad():
            logits = model(torch.tensor([seq + [MASK] * (n - 1)])).logits[0, p - 1 :]  # (n, V), causal
        logits[:, MASK] = float("-inf")
        confidence, tokens = torch.softmax(logits, -1).max(-1)
        k = 1
        while k < n and confidence[k] >= threshold:
            k += 1
        seq, start = seq + tokens[:k].tolist(), p
    return seq[len(prompt) :]


@pytest.mark.parametrize("size,threshold", [(2, 0.3), (4, 0.2), (6, 0.05), (5, 0.9)])
def test_sliding_equals_a_no_cache_reference_under_causal_masks(monkeypatch, size, threshold):
    """Under causal masks the settled rows a sliding window leaves in the cache are exact, so the cached decoder
    must match full recomputation token for token: this checks the window's start and length and the crop."""
    monkeypatch.setattr(MaskBuffer, "take", causal_take)
    model = sharp_llama(seed=3)
    model.config.mask_token_id = MASK
    out = generate(model, torch.tensor([TEST_PROMPT]), size, threshold, temperature=0, max_new_tokens=41,
                   unmask="prefix", sliding=True)  # fmt: skip
    assert out.tokens.tolist() == reference_sliding_decode(model, TEST_PROMPT, size, threshold, 41)
    assert out.forward_passes == 1 + len(out.accepted_lengths) and sum(out.accepted_lengths) < 41


def test_sliding_windows_carry_block_size_rows():
    model = sharp_llama(seed=3)
    model.config.mask_token_id = MASK
    g = torch.Generator().manual_seed(1)
    out, rows = generate_counting_rows(model, torch.tensor([TEST_PROMPT]), 6, 0.1, max_new_tokens=60,
                                       unmask="prefix", sliding=True, generator=g)  # fmt: skip
    assert rows[0] == len(TEST_PROMPT) - 1 + 6  # the prefill carries the prompt and the first window
    assert all(r <= 6 for r in rows[1:]) and sum(r == 6 for r in rows[1:]) >= len(rows[1:]) - 3
    assert out.new_tokens == 60 and out.mean_accepted > 1


def test_streamer_gets_every_token_once():
    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, x):
            self.chunks.append(x.reshape(-1).tolist())

        def end(self):
            self.ended = True

    model, streamer = base_with_mask(), Collect()
    out = generate(model, torch.tensor([TEST_PROMPT]), 4, 0.02, max_new_tokens=30, streamer=streamer,
                   generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert streamer.chunks[0] == TEST_PROMPT and streamer.ended
    assert sum(streamer.chunks[1:], []) == out.tokens.tolist()


# ----- training, adapters, the registry -----
def sharp_llama(seed: int = 0):
    """A tiny Llama with peaked, context-dependent next-token distributions (a random one is near uniform)."""
    model = tiny_llama(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def prompts(n=48, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(8, 48, (int(torch.randint(3, 8, (1,), generator=gen)),), generator=gen).tolist() for _ in range(n)
    ]


@pytest.mark.parametrize("teacher_prefix", [False, True])
def test_short_distillation_lowers_the_loss(tmp_path, teacher_prefix):
    model = sharp_llama()
    cfg = TrainConfig(out_dir=str(tmp_path), block_size=4, steps=40, batch_size=8, lr=5e-3, warmup_steps=5,
                      anneal_fraction=0.0, pool_size=64, max_new_tokens=24, progress=False,
                      teacher_prefix=teacher_prefix)  # fmt: skip
    from peft import PeftModel

    from vadusa.blockdiff.train import load_pool

    adapter = train(model, prompts(), cfg, mask_token_id=MASK, eos_token_id=EOS)
    pool = load_pool(tmp_path)
    eval_batch = make_batch(pool[:32], Stage(4, 1.0, (0.2, 1.0)), True, MASK, torch.Generator().manual_seed(9),
                            teacher_prefix=teacher_prefix)  # fmt: skip
    with torch.no_grad():
        before = batch_loss(make_student(sharp_llama(), rank=cfg.rank), eval_batch, cfg.beta).item()
        after = batch_loss(PeftModel.from_pretrained(sharp_llama(), str(adapter)), eval_batch, cfg.beta).item()
    merged, config = load_student(sharp_llama(), adapter)
    assert config.block_size == 4 and config.mask_token_id == MASK and config.teacher_prefix == teacher_prefix
    # held-out sequences of a random model; the teacher-prefix rows are only the hard ones (targets after a
    # masked or unseen input: measured 1.17 -> 0.98), the block-causal ones include each block's first
    assert after < (0.9 if teacher_prefix else 0.8) * before, (before, after)


def test_resume_continues_from_the_checkpoint(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), block_size=2, steps=3, batch_size=4, pool_size=8, max_new_tokens=10,
                      log_every=1, eval_sequences=2, eval_every=2, progress=False)  # fmt: skip
    train(sharp_llama(), prompts(8), cfg, mask_token_id=MASK, eos_token_id=EOS)
    pool_bytes = (tmp_path / "pool-00000.safetensors").read_bytes()
    cfg.steps = 5
    train(sharp_llama(), prompts(8), cfg, mask_token_id=MASK, eos_token_id=EOS, resume=True)
    from vadusa.blockdiff.train import read_log

    log = read_log(tmp_path)
    assert [line["step"] for line in log if "loss" in line] == [1, 2, 3, 4, 5]
    assert [line["step"] for line in log if "eval_loss" in line] == [0, 2, 3, 4, 5]  # at 0, every 2 steps, at the end
    assert (tmp_path / "pool-00000.safetensors").read_bytes() == pool_bytes  # the teacher's pool is not resampled
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_warm_start_begins_at_the_initial_adapter(tmp_path):
    """`init_adapter`: the new run's step-0 evaluation is the first run's final one (same pool, same held-out)."""
    first = TrainConfig(out_dir=str(tmp_path / "a"), block_size=2, steps=4, batch_size=4, pool_size=12,
                        max_new_tokens=10, eval_sequences=4, eval_every=100, progress=False)  # fmt: skip
    adapter = train(sharp_llama(), prompts(12), first, mask_token_id=MASK, eos_token_id=EOS)
    from vadusa.blockdiff.train import read_log

    second = TrainConfig(**{**first.__dict__, "out_dir": str(tmp_path / "b"), "init_adapter": str(adapter)})
    train(sharp_llama(), prompts(12), second, mask_token_id=MASK, eos_token_id=EOS)
    end_of_first, start_of_second = read_log(tmp_path / "a")[-1], read_log(tmp_path / "b")[0]
    assert start_of_second["step"] == 0 and end_of_first["step"] == 4
    assert start_of_second["eval_loss"] == pytest.approx(end_of_first["eval_loss"], rel=1e-5)
    assert abs(read_log(tmp_path / "a")[0]["eval_loss"] - start_of_second["eval_loss"]) > 1e-3  # not a fresh LoRA
    record = BlockConfig.load(tmp_path / "b" / "adapter").training
    assert record["config"]["init_adapter"] == "adapter" and record["init_adapter"]["step"] == 4
    with pytest.raises(ValueError, match="rank"):
        train(sharp_llama(), prompts(12), TrainConfig(**{**second.__dict__, "rank": 4}), MASK, EOS)
    other = sharp_llama(seed=5)  # another version of the base (a fine-tune): same shapes, other weights
    third = TrainConfig(**{**second.__dict__, "out_dir": str(tmp_path / "c"), "steps": 1})
    fingerprint = base_fingerprint(other)
    third_adapter = train(other, prompts(12), third, MASK, EOS)
    assert BlockConfig.load(third_adapter).base_fingerprint == fingerprint  # bound to the new base
    wider = tiny_llama(vocab=56)
    with pytest.raises(ValueError, match="another base model .* vocabulary 48"):
        train(wider, prompts(12), TrainConfig(**{**second.__dict__, "out_dir": str(tmp_path / "d")}), MASK, EOS)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """An adapter for tiny_llama(seed 0) in <assets>/block, with a non-zero LoRA."""
    root = tmp_path_factory.mktemp("assets")
    student = make_student(tiny_llama(), rank=4)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(student, BlockConfig.for_model(tiny_llama(), MASK, 4), root / "block")
    return root


def test_decoder_registry_entry(assets):
    model = tiny_llama()
    run = build_decoder("block", model, assets, threshold=0.05, unmask="any")
    merged, config = load_student(model, assets / "block")
    prompt = torch.tensor([TEST_PROMPT])
    out = run(prompt, max_new_tokens=40, temperature=1.0, generator=torch.Generator().manual_seed(2))
    ref = generate(
        merged, prompt, config.block_size, 0.05, max_new_tokens=40, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(out.sequences, ref.sequences)
    preset = build_decoder("block", model, assets)
    out = preset(prompt, max_new_tokens=40, generator=torch.Generator().manual_seed(2))
    ref = generate(merged, prompt, config.block_size, 0.35, max_new_tokens=40, unmask="prefix", sliding=True,
                   generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert torch.equal(out.sequences, ref.sequences)  # the registry's defaults: the demo's quality point
    fixed = build_decoder("block", model, assets, approximate_cache=True)  # asks for fixed blocks: no sliding
    out = fixed(prompt, max_new_tokens=40, generator=torch.Generator().manual_seed(2))
    ref = generate(merged, prompt, config.block_size, 0.35, max_new_tokens=40, unmask="prefix",
                   approximate_cache=True, generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert torch.equal(out.sequences, ref.sequences)
    plain = generate(model, prompt, 4, 0.05, max_new_tokens=40, generator=torch.Generator().manual_seed(2),
                     mask_token_id=MASK)  # fmt: skip
    assert not torch.equal(plain.sequences, out.sequences)  # the adapter is applied
    assert torch.equal(tiny_llama().lm_head.weight, model.lm_head.weight)  # the base model is left untouched
    with torch.no_grad():  # merged weights == the peft model's logits
        peft_logits = make_student(tiny_llama(), rank=4)
        from peft import PeftModel

        peft_logits = PeftModel.from_pretrained(tiny_llama(), str(assets / "block"))(prompt).logits
    torch.testing.assert_close(merged(prompt).logits, peft_logits, atol=1e-5, rtol=1e-5)


# ----- bad input -----
@pytest.mark.parametrize("threshold", [0, -0.1, 1.5, float("nan")])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        generate(base_with_mask(), torch.tensor([TEST_PROMPT]), 4, threshold, max_new_tokens=5)


@pytest.mark.parametrize("unmask", ["first", None, "Prefix"])
def test_bad_unmask_rule(unmask):
    with pytest.raises(ValueError, match="unmask"):
        generate(base_with_mask(), torch.tensor([TEST_PROMPT]), 4, 0.02, max_new_tokens=5, unmask=unmask)


def test_approximate_cache_and_sliding_need_a_block_causal_student():
    model = base_with_mask()
    for layout in ({"causal_clean": True}, {"teacher_prefix": True}):
        with pytest.raises(ValueError, match="approximate_cache needs a block-causal student"):
            generate(model, torch.tensor([TEST_PROMPT]), 4, 0.1, approximate_cache=True, **layout)
        with pytest.raises(ValueError, match="sliding needs a block-causal student"):
            generate(model, torch.tensor([TEST_PROMPT]), 4, 0.1, unmask="prefix", sliding=True, **layout)
    with pytest.raises(ValueError, match="needs unmask='prefix', got 'any'"):
        generate(model, torch.tensor([TEST_PROMPT]), 4, 0.1, sliding=True)


@pytest.mark.parametrize("block_size", [0, -2, 1.5])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        generate(base_with_mask(), torch.tensor([TEST_PROMPT]), block_size, 0.02, max_new_tokens=5)


def test_missing_mask_token(assets):
    with pytest.raises(ValueError, match="missing mask token"):
        generate(tiny_llama(), torch.tensor([TEST_PROMPT]), 4, 0.02, max_new_tokens=5)
    with pytest.raises(ValueError, match="missing mask token"):
        BlockConfig.for_model(tiny_llama(), None, 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        BlockConfig.for_model(tiny_llama(), 48, 4)


def test_adapter_for_another_base(assets):
    with pytest.raises(ValueError, match="another base model"):
        build_decoder("block", tiny_llama(seed=1), assets)
    with pytest.raises(ValueError, match="threshold"):
        build_decoder("block", tiny_llama(), assets, threshold=2.0)
    with pytest.raises(ValueError, match="block_size"):
        build_decoder("block", tiny_llama(), assets, block_size=0)
    with pytest.raises(FileNotFoundError, match="block"):
        build_decoder("block", tiny_llama(), assets / "nowhere")
    with pytest.raises(ValueError, match="assets"):
        build_decoder("block", tiny_llama(), None)


def test_bad_train_config():
    with pytest.raises(ValueError, match="block_size"):
        TrainConfig(block_size=0)
    assert TrainConfig(block_size=1).start_block_size == 1  # the annealing start never exceeds the block size
    with pytest.raises(ValueError, match="beta"):
        TrainConfig(beta=-0.5)
    with pytest.raises(ValueError, match="mask-ratio"):
        TrainConfig(ratio_end=(0.9, 0.1))


# ----- the teacher-prefix variant -----
def brute_prefix_visibility(prompt_len, length, block, clean_size, noised_size, copies):
    """Teacher-prefix rules row by row: noised slot j is input position prompt_len + j of window j // block."""
    rows = []
    for c in range(copies):
        for j in range(noised_size):
            a = prompt_len + j
            rows.append((c, a, j // block, j % block < block - 1 and a < length - 1))
    visible = torch.zeros(len(rows), clean_size + len(rows), dtype=torch.bool)
    for q, (c, _, w, _) in enumerate(rows):
        for b in range(clean_size):  # the teacher's cache: positions before the window's first target
            visible[q, b] = b < prompt_len + w * block and b < length
        for k, (c2, _, w2, ok) in enumerate(rows):
            visible[q, clean_size + k] = q == k or (ok and c == c2 and w == w2)
    return visible


@pytest.mark.parametrize(
    "prompt_len,length,block,clean_size,noised_size,copies",
    [(1, 2, 1, 2, 1, 1), (3, 11, 2, 11, 7, 1), (3, 11, 4, 13, 9, 2), (5, 9, 3, 9, 6, 2), (2, 12, 5, 14, 12, 1)],
)
def test_prefix_training_mask_matches_brute_force(prompt_len, length, block, clean_size, noised_size, copies):
    args = (prompt_len, length, block, clean_size, noised_size, copies)
    got = prefix_training_visibility(*args)
    assert torch.equal(got, brute_prefix_visibility(*args))
    mask = prefix_training_mask(*args, dtype=torch.bfloat16)
    assert torch.equal(mask[0] == 0, got)


def random_lora(model, rank=4, seed=0):
    student = make_student(model, rank=rank)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + len(name)))
    return student


def teacher_prefix_student(tmp_path, seed=0):
    """(peft student with a random LoRA, the loaded teacher-prefix student of its adapter)."""
    student = random_lora(tiny_llama(), seed=seed)
    save_adapter(student, BlockConfig.for_model(tiny_llama(), MASK, 3, teacher_prefix=True), tmp_path / "tp")
    loaded, config = load_student(tiny_llama(), tmp_path / "tp")
    assert config.teacher_prefix and loaded.config.block_teacher_prefix
    return student, loaded


def test_teacher_prefix_decoding_forward_equals_training_forward(tmp_path):
    """A teacher-prefix window at decode time (commit through the base's weights, window through the
    student's, one forward) computes exactly the training rows of that window, and the commit's last row
    is the teacher's own prediction of the block's first target."""
    student, loaded = teacher_prefix_student(tmp_path)
    seq, p, block = torch.tensor([5, 9, 13, 2, 30, 31, 8, 44, 12, 19, 21, 3, 6, 40]), 4, 3
    batch = make_batch([(seq, p)], Stage(block, 1.0, (0.6, 0.6)), False, MASK, torch.Generator().manual_seed(2),
                       teacher_prefix=True)  # fmt: skip
    assert batch.ids.shape == (1, len(seq) - p - 1) and (batch.ids == MASK).any() and (batch.ids != MASK).any()
    with torch.no_grad():
        teacher, cache = teacher_forward(student, batch.clean, 0, cache=True)
        trained = student(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions,
                          past_key_values=cache).logits[0]  # fmt: skip
        body, out_layer = split_model(loaded)
        for k in range(math.ceil((len(seq) - p) / block)):
            first = p + k * block  # the window's first target; commit = the block before it (or the prompt)
            start = 0 if k == 0 else first - block
            cache = BufferCache(2, 64)
            if start:  # the cache before the commit: run by the base alone
                loaded.base_tokens.count = start
                body(input_ids=seq[None, :start], past_key_values=cache, use_cache=True)
            window = batch.ids[0, k * block : k * block + block - 1]  # the noised inputs y_first ...
            ids = torch.cat([seq[start:first], window])[None]
            loaded.base_tokens.count = first - start
            m = decoding_mask(start, first - start, len(window), True, torch.float32)
            hidden = body(input_ids=ids, attention_mask=m, position_ids=torch.arange(start, start + ids.shape[1])[None],
                          past_key_values=cache, use_cache=True).last_hidden_state[0]  # fmt: skip
            logits = out_layer(hidden)
            torch.testing.assert_close(logits[first - start - 1], teacher[0, first - 1], atol=1e-5, rtol=1e-5)
            valid = min(len(window), len(seq) - 1 - first)
            torch.testing.assert_close(
                logits[first - start : first - start + valid], trained[k * block : k * block + valid],
                atol=1e-5, rtol=1e-5)  # fmt: skip


def test_teacher_prefix_block_size_1_is_generate_ar_whatever_the_lora(tmp_path):
    """With the teacher prefix every block's first target is the base's draw: at block size 1 a student
    with a large random LoRA still decodes exactly generate_ar's tokens, greedy and sampled."""
    _, loaded = teacher_prefix_student(tmp_path)
    base, prompt, ban = base_with_mask(), torch.tensor([TEST_PROMPT]), [NoMask()]
    ar = vadusa.generate_ar(base, prompt, max_new_tokens=80, temperature=0)
    out = generate(loaded, prompt, block_size=1, temperature=0, max_new_tokens=80)
    assert torch.equal(out.sequences, ar.sequences) and out.forward_passes == 80
    ar = vadusa.generate_ar(base, prompt, max_new_tokens=60, generator=torch.Generator().manual_seed(4),
                            logits_processor=ban)  # fmt: skip
    out = generate(loaded, prompt, block_size=1, max_new_tokens=60, generator=torch.Generator().manual_seed(4),
                   logits_processor=ban)  # fmt: skip
    assert torch.equal(out.sequences, ar.sequences)
    # at block size 3 the student's window changes the tokens after each block's first, not the first
    out3 = generate(loaded, prompt, block_size=3, temperature=0, max_new_tokens=30)
    free = generate(merged_without_split(tmp_path), prompt, block_size=3, temperature=0, max_new_tokens=30)
    assert not torch.equal(out3.sequences, free.sequences)


def merged_without_split(tmp_path):
    """The same adapter loaded as a plain merged student (the block-causal-prefix decoder)."""
    config = BlockConfig.load(tmp_path / "tp")
    config.teacher_prefix = False
    config.save(tmp_path / "tp")
    merged, _ = load_student(tiny_llama(), tmp_path / "tp")
    return merged


@pytest.mark.parametrize("block_size,threshold", [(2, 0.02), (4, 0.9), (4, 0.005)])
def test_teacher_prefix_decoding_stops_exactly(tmp_path, block_size, threshold):
    _, loaded = teacher_prefix_student(tmp_path)
    for seed in range(4):
        for budget in (1, 5, 23):
            out = generate(loaded, torch.tensor([TEST_PROMPT]), block_size, threshold, max_new_tokens=budget,
                           eos_token_id=EOS, generator=torch.Generator().manual_seed(seed))  # fmt: skip
            tokens = out.tokens.tolist()
            assert out.new_tokens == len(tokens) <= budget and MASK not in tokens
            assert EOS not in tokens[:-1] and (tokens[-1] == EOS or len(tokens) == budget)
            assert out.forward_passes == 1 + len(out.accepted_lengths)

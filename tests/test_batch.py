"""Batched decoding (vadusa.batch): every row of a batch decodes exactly as it would alone."""

from functools import cache

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

import vadusa
from tests.conftest import fitted_drafter, fitted_heads, tiny_gpt2, tiny_llama
from tests.test_generate import Recorder, exact_joint, total_variation
from vadusa.batch import left_pad

MODELS = {"llama": tiny_llama, "gpt2": lambda: tiny_gpt2(init=0.2)}  # init: greedy decodes that do not just repeat
# the demo's greedy tree of 2026-12-06 (9 nodes, depth 6, ranks 0-1): a chain with two side branches
BRANCHED_PATHS = [[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
PROMPTS = [[3, 17, 5, 40, 22, 9], [1, 2], [7, 7, 7, 1, 30], [4, 30, 2, 11, 8, 6, 13, 21]]  # 4 different lengths
BUDGET = 40


@cache
def setup_for(name: str):
    """A tiny model, 6 fitted draft heads and a lightly fitted 6-deep feature drafter, and an EOS id that stops the
    rows at 3 or more different times (none before its 6th token)."""
    model = MODELS[name]()
    heads = fitted_heads(model, num_heads=6, steps=30)
    drafter = fitted_drafter(model, depth=6, steps=10)
    greedy = [vadusa.generate_ar(model, torch.tensor([p]), max_new_tokens=BUDGET, temperature=0) for p in PROMPTS]
    for eos in dict.fromkeys(t for g in greedy for t in g.tokens[5:].tolist()):
        stops = {(g.tokens.tolist() + [eos]).index(eos) for g in greedy}
        if len(stops) >= 3 and min(stops) >= 5:
            return model, heads, drafter, eos
    raise AssertionError("no EOS id stops the rows at 3 different times")


@pytest.fixture(scope="module")
def setup():
    return setup_for("llama")


def decoders(setup, medusa_tree):
    model, heads, drafter, _ = setup
    branched = vadusa.Tree.from_paths(BRANCHED_PATHS)
    runs = {"ar": lambda ids, **kw: vadusa.generate_ar(model, ids, **kw)}
    for kind, draft in (("heads", heads), ("feature", drafter)):
        for name, tree in (("chain", vadusa.Tree.chain(6)), ("medusa63", medusa_tree), ("branched", branched)):
            runs[f"{kind}-{name}"] = lambda ids, draft=draft, tree=tree, **kw: vadusa.generate(
                model, draft, ids, tree=tree, **kw
            )
    return runs


DECODERS = ["ar"] + [f"{k}-{t}" for k in ("heads", "feature") for t in ("chain", "medusa63", "branched")]


ROW_CASES = [("llama", d) for d in DECODERS] + [
    ("gpt2", d) for d in ("ar", "heads-chain", "heads-medusa63", "feature-branched")
]


@pytest.mark.parametrize("name, decoder", ROW_CASES)
def test_batch_rows_equal_single_decodes(medusa_tree, name, decoder):
    """Greedy batch of 4 (different prompt lengths, left padding, different EOS times) == each row alone, token
    for token; each row takes exactly the steps and accepted lengths it takes alone, the batch runs as long as
    its slowest row, and a finished row leaves the batch (the forwards carry only the rows still running)."""
    setup = setup_for(name)
    model, _, _, eos = setup
    run = decoders(setup, medusa_tree)[decoder]
    kw = {"max_new_tokens": BUDGET, "temperature": 0, "eos_token_id": eos}
    singles = [run(torch.tensor([p]), **kw) for p in PROMPTS]
    ids, mask = left_pad(PROMPTS)
    rows_seen = []
    hook = model.base_model.register_forward_pre_hook(
        lambda m, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        out = run(ids, attention_mask=mask, **kw)
    finally:
        hook.remove()
    for i, single in enumerate(singles):
        assert out.row_tokens(i).tolist() == single.tokens.tolist(), (decoder, i)
        assert out.row_accepted_lengths[i] == single.accepted_lengths, (decoder, i)
        assert out.row_forward_passes[i] == single.forward_passes
    assert len(set(out.row_new_tokens)) >= 2  # rows of different lengths
    assert out.new_tokens == sum(s.new_tokens for s in singles)
    assert out.forward_passes == max(s.forward_passes for s in singles) == len(rows_seen)
    assert rows_seen == [sum(s.forward_passes > k for s in singles) for k in range(len(rows_seen))]
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    if decoder != "ar":  # the rows accept several tokens at some steps
        assert max(a for row in out.row_accepted_lengths for a in row) >= 2, out.row_accepted_lengths


@pytest.mark.parametrize("decoder", ["ar", "heads-medusa63", "feature-branched"])
def test_batch_processors_read_each_rows_own_history(setup, medusa_tree, decoder):
    """A history-reading processor (repetition penalty) in a batch: each row's tokens are its batch-1 tokens."""
    run = decoders(setup, medusa_tree)[decoder]
    kw = {"max_new_tokens": 30, "temperature": 0}
    kw["logits_processor"] = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])
    singles = [run(torch.tensor([p]), **kw).tokens.tolist() for p in PROMPTS]
    plain = [run(torch.tensor([p]), max_new_tokens=30, temperature=0).tokens.tolist() for p in PROMPTS]
    assert singles != plain  # the penalty changes the decodes
    ids, mask = left_pad(PROMPTS)
    out = run(ids, attention_mask=mask, **kw)
    assert [out.row_tokens(i).tolist() for i in range(len(PROMPTS))] == singles


def test_batch_size_one_with_padding_is_the_unpadded_decode(setup):
    model, heads, _, _ = setup
    plain = vadusa.generate(model, heads, torch.tensor([[1, 2, 3]]), max_new_tokens=20, temperature=0)
    padded = vadusa.generate(
        model, heads, torch.tensor([[0, 0, 1, 2, 3]]), attention_mask=torch.tensor([[0, 0, 1, 1, 1]]),
        max_new_tokens=20, temperature=0,
    )  # fmt: skip
    assert padded.tokens.tolist() == plain.tokens.tolist() and padded.sequences.shape == plain.sequences.shape


@pytest.mark.parametrize("decoder", ["ar", "lossless"])
def test_batched_sampling_keeps_ar_distribution_per_row(decoder):
    """Joint of the first 3 tokens of two prompts of different lengths, sampled in batches of 400 rows (200
    left-padded copies of each, interleaved), vs the exact AR joint of each prompt: TV below the sampling bound
    (see test_generate's lossless test); tolerance sampling on the same batches lands above it for row 0."""
    model = tiny_llama(vocab=8, seed=1)
    heads = fitted_heads(model, 2, steps=60, seed=1)
    tree = vadusa.Tree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0]])
    prompts, copies, calls, temperature = [[1, 5, 2], [4, 6]], 200, 10, 0.7
    ids, mask = left_pad(prompts * copies)

    def joints(acceptance):
        counts = [{}, {}]
        for c in range(calls):
            g = torch.Generator().manual_seed(c)
            kw = {"max_new_tokens": 3, "temperature": temperature, "attention_mask": mask, "generator": g}
            if acceptance == "ar":
                out = vadusa.generate_ar(model, ids, **kw)
            else:
                out = vadusa.generate(model, heads, ids, tree=tree, acceptance=acceptance, tolerance=4, **kw)
            for i in range(ids.shape[0]):
                key = tuple(out.row_tokens(i).tolist())
                counts[i % 2][key] = counts[i % 2].get(key, 0) + 1
        return [{k: v / (copies * calls) for k, v in c.items()} for c in counts]

    runs = copies * calls
    for row, empirical in enumerate(joints(decoder)):
        exact = exact_joint(model, prompts[row], 3, temperature)
        bound = 0.5 * sum((p * (1 - p) / runs) ** 0.5 for p in exact.values())
        assert total_variation(empirical, exact) < bound, (row, total_variation(empirical, exact), bound)
    if decoder == "lossless":
        exact = exact_joint(model, prompts[0], 3, temperature)
        bound = 0.5 * sum((p * (1 - p) / runs) ** 0.5 for p in exact.values())
        assert total_variation(joints("tolerance")[0], exact) > 1.2 * bound


def test_bad_batches_raise(setup):
    model, heads, _, _ = setup
    for run in (lambda ids, **kw: vadusa.generate_ar(model, ids, **kw),
                lambda ids, **kw: vadusa.generate(model, heads, ids, **kw)):  # fmt: skip
        with pytest.raises(ValueError, match=r"different lengths \[3, 2\] need left padding and an attention_mask"):
            run([torch.tensor([1, 2, 3]), torch.tensor([4, 5])])
        with pytest.raises(ValueError, match=r"rows \[0\] are right-padded"):
            run(torch.tensor([[1, 2, 0], [1, 2, 3]]), attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
        with pytest.raises(ValueError, match=r"only 0 and 1, got values \[2.0\]"):
            run(torch.tensor([[1, 2, 3], [1, 2, 3]]), attention_mask=torch.tensor([[1, 1, 2], [1, 1, 1]]))
        with pytest.raises(ValueError, match=r"only 0 and 1, got values \[0.5\]"):
            run(torch.tensor([[1, 2, 3], [1, 2, 3]]), attention_mask=torch.tensor([[0.5, 1, 1], [1, 1, 1]]))
        with pytest.raises(ValueError, match=r"batch size must be >= 1, got input_ids of shape \(0, 3\)"):
            run(torch.zeros(0, 3, dtype=torch.long))
        with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 2\), input_ids \(2, 3\)"):
            run(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 2))
        with pytest.raises(ValueError, match=r"rows \[1\] are all zeros"):
            run(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
        with pytest.raises(ValueError, match="a streamer takes one row: got a batch of 2"):
            run(torch.ones(2, 3, dtype=torch.long), streamer=Recorder())
    with pytest.raises(ValueError, match="batch size must be >= 1, got no prompts"):
        left_pad([])


@pytest.mark.parametrize("size, threshold", [(4, 0.2), (6, 0.05)])
def test_batched_block_rows_equal_single_decodes(size, threshold):
    """Sliding-window block decoding (the 'block' decoder's preset) of a batch of 4 (different prompt lengths,
    different EOS times) == each row alone, token for token, with the same forwards; rows leave when done."""
    from tests.test_block import MASK, sharp_llama
    from vadusa.blockdiff import generate as block_generate

    model = sharp_llama(seed=3)
    model.config.mask_token_id = MASK
    prompts = [p for p in PROMPTS]  # no prompt holds the mask token 0
    kw = {"max_new_tokens": BUDGET, "temperature": 0, "unmask": "prefix", "sliding": True}
    greedy = [block_generate(model, torch.tensor([p]), size, threshold, **kw).tokens.tolist() for p in prompts]
    eos = next(
        t for t in dict.fromkeys(t for g in greedy for t in g[5:])
        if len({(g + [t]).index(t) for g in greedy}) >= 3
    )  # fmt: skip
    singles = [block_generate(model, torch.tensor([p]), size, threshold, eos_token_id=eos, **kw) for p in prompts]
    ids, mask = left_pad(prompts)
    out = block_generate(model, ids, size, threshold, attention_mask=mask, eos_token_id=eos, **kw)
    for i, single in enumerate(singles):
        assert out.row_tokens(i).tolist() == single.tokens.tolist(), i
        assert out.row_forward_passes[i] == single.forward_passes
    assert out.forward_passes == max(s.forward_passes for s in singles)
    assert max(a for row in out.row_accepted_lengths for a in row) >= 2  # several targets per forward
    with pytest.raises(ValueError, match="batched block decoding runs sliding windows"):
        block_generate(model, ids, size, threshold, attention_mask=mask, sliding=False)


def test_per_row_budgets_and_bad_budgets(setup):
    """max_new_tokens per row: each row stops at its own budget, as it does alone with that budget."""
    model, heads, _, _ = setup
    ids, mask = left_pad(PROMPTS)
    budgets = [5, 30, 1, 12]
    for run in (
        lambda x, **kw: vadusa.generate_ar(model, x, **kw),
        lambda x, **kw: vadusa.generate(model, heads, x, **kw),
    ):
        out = run(ids, attention_mask=mask, max_new_tokens=budgets, temperature=0)
        singles = [
            run(torch.tensor([p]), max_new_tokens=b, temperature=0).tokens.tolist()
            for p, b in zip(PROMPTS, budgets, strict=True)
        ]
        assert [out.row_tokens(i).tolist() for i in range(4)] == singles and out.row_new_tokens == budgets
        with pytest.raises(ValueError, match="max_new_tokens has 3 budgets for a batch of 4 rows"):
            run(ids, attention_mask=mask, max_new_tokens=[1, 2, 3])
        with pytest.raises(ValueError, match=r"max_new_tokens\[2\] must be an integer >= 1 .*, got 0"):
            run(ids, attention_mask=mask, max_new_tokens=[1, 2, 0, 3])


def test_bench_batch_size_reports_throughput_and_latency(tmp_path):
    from vadusa.bench import BenchTask, parse_configs, run_benchmark, validate_report, write_report

    model = tiny_llama()
    prompts = [torch.tensor([p]) for p in PROMPTS] + [torch.tensor([[5, 9, 11]])]
    task = BenchTask(
        model=model, texts=[f"t{i}" for i in range(5)], prompts=prompts, max_new_tokens=[20, 9, 30, 14, 25]
    )
    report = run_benchmark(
        task, parse_configs("ar:temperature=0"), repeats=1, progress=False, command="t", batch_size=2
    )
    validate_report(report)
    assert report["batch_size"] == 2 and [r["decoder"] for r in report["rows"]] == ["ar", "ar"]  # no hf-generate
    greedy = next(r for r in report["rows"] if r["config"])
    singles = [
        vadusa.generate_ar(model, p, max_new_tokens=b, temperature=0)
        for p, b in zip(prompts, task.max_new_tokens, strict=True)
    ]
    assert greedy["new_tokens"] == [sum(s.new_tokens for s in singles)]
    assert greedy["speedup_vs_hf"] is None and 0 < greedy["latency_mean_s"] <= greedy["latency_p90_s"]
    assert greedy["tokens_per_second"] == pytest.approx(greedy["new_tokens"][0] / greedy["seconds"][0])
    assert "batch size 2" in (write_report(report, tmp_path) / "report.md").read_text()
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        run_benchmark(task, parse_configs("ar"), repeats=1, progress=False, batch_size=0)


def demo_ready() -> bool:
    import shutil

    from vadusa.speech.pipeline import DEMO_DIR, REQUIRED

    return shutil.which("espeak-ng") is not None and all((DEMO_DIR / f).is_file() for f in REQUIRED)


@pytest.mark.skipif(not demo_ready(), reason="needs espeak-ng and the shipped demo weights")
def test_shipped_synthesize_batch_equals_synthesize_and_cli(tmp_path):
    """The shipped pipeline: greedy synthesize_batch (batches of 2 and a lone text) == synthesize per text for
    the shipped feature drafter + tree and the block preset; decode.py --texts --batch-size writes every wav."""
    import json

    from vadusa.cli import decode
    from vadusa.speech import TTSPipeline

    pipe = TTSPipeline.from_pretrained()
    texts = ["Hello there.", "The weather is nice today, is it not?", "Yes."]
    for decoder in ("vadusa", "block"):
        batch = pipe.synthesize_batch(texts, decoder=decoder, temperature=0, batch_size=2)
        for text, (wav, _, out) in zip(texts, batch, strict=True):
            ref_wav, _, ref = pipe.synthesize(text, decoder=decoder, temperature=0)
            assert out.tokens.tolist() == ref.tokens.tolist() and np.allclose(wav, ref_wav), (decoder, text)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        pipe.synthesize_batch(texts, batch_size=0)
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    argv = ["--texts", str(tmp_path / "t.txt"), "--out-dir", str(tmp_path / "w"), "--json", str(tmp_path / "s.json")]
    assert decode.main(argv + ["--batch-size", "2", "--temperature", "0", "--decoder", "block"]) == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    assert [r["new_tokens"] for r in stats["texts"]] == [r[2].new_tokens for r in batch]
    assert all((tmp_path / "w" / f"{i:04d}.wav").is_file() for i in range(3))
    with pytest.raises(SystemExit):
        decode.parse_args(argv + ["--batch-size", "0"])


@pytest.mark.parametrize("decoder", ["ar", "heads-chain", "feature-branched"])
def test_batch_rows_read_top_p(setup, medusa_tree, decoder):
    """Batched rows apply top-p like single requests: sampling at T=1 with a nucleus of one token (top_p tiny) is
    greedy decoding, row for row; without top-p the same sampled batch leaves the greedy tokens."""
    model, _, _, eos = setup
    run = decoders(setup, medusa_tree)[decoder]
    greedy = [run(torch.tensor([p]), max_new_tokens=BUDGET, temperature=0, eos_token_id=eos) for p in PROMPTS]
    ids, mask = left_pad(PROMPTS)
    sampled = {
        top_p: run(
            ids,
            attention_mask=mask,
            max_new_tokens=BUDGET,
            temperature=1.0,
            eos_token_id=eos,
            top_p=top_p,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        for top_p in (1e-6, 1.0)
    }
    assert all(torch.equal(sampled[1e-6].row_tokens(i), g.tokens) for i, g in enumerate(greedy))
    assert not all(torch.equal(sampled[1.0].row_tokens(i), g.tokens) for i, g in enumerate(greedy))

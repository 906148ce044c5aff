"""Data-free head training, accuracy tables and the "vadusa" decoder, on tiny random Llamas (seconds)."""

import itertools
import json

import pytest
import torch

import vadusa
from tests.conftest import fitted_heads, tiny_llama
from vadusa import accuracy, train
from vadusa.accept import typical
from vadusa.draft import vadusa_factory

VOCAB = 48


def peaky_llama(seed: int = 0):
    """A tiny random Llama whose next-token distributions are peaked enough for heads to learn something."""
    model = tiny_llama(VOCAB, seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
    return model


def random_prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


CONFIG = dict(
    max_new_tokens=48, temperature=0.4, sample_batch=16, shard_size=16, teacher_top_k=16,
    steps=120, batch_tokens=512, lr=3e-3, warmup=5, checkpoint_every=40,
)  # fmt: skip


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    model = peaky_llama()
    root = tmp_path_factory.mktemp("cache")
    config = train.TrainConfig(**CONFIG)
    train.build_cache(model, random_prompts(160, 0), config, root / "train", progress=False)
    train.build_cache(model, random_prompts(40, 1), config, root / "test", progress=False)
    return model, root / "train", root / "test"


def test_cache_matches_the_base(caches):
    """Cached states are the base's own (engine body), teacher = its distribution of the sampled token."""
    model, train_dir, _ = caches
    cache = train.load_cache(train_dir)
    s = 3
    a, n = int(cache.starts[s]), int(cache.lengths[s])
    full = torch.cat([cache.prompts[s], cache.gen[a : a + n]])[None]
    with torch.no_grad():
        states = model.model(full).last_hidden_state[0]  # (T, D)
        probs = torch.softmax(model.lm_head(states) / 0.4, -1)
    p = len(cache.prompts[s])
    torch.testing.assert_close(cache.hidden[a : a + n], states[p - 1 : p - 1 + n], atol=1e-5, rtol=1e-4)
    top = probs[p - 1 : p - 1 + n].topk(16, -1)
    torch.testing.assert_close(cache.teacher_probs[a : a + n], top.values, atol=1e-5, rtol=1e-4)
    assert torch.equal(cache.teacher_ids[a : a + n], top.indices)
    assert len(cache.lengths) == 160 and len(cache.gen) == int(cache.lengths.sum())
    torch.testing.assert_close(cache.prompt_hidden[s], states[: p - 1], atol=1e-5, rtol=1e-4)  # feature drafters


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_short_training_lowers_loss_and_raises_top1(caches, tmp_path, loss):
    model, train_dir, test_dir = caches
    config = train.TrainConfig(**CONFIG, loss=loss)
    held_out = train.load_cache(test_dir)
    before = train.evaluate(vadusa.DraftHeads.from_model(model, 4, 1), held_out, loss)
    heads = train.train(model, config, train_dir, tmp_path, progress=False)
    after = train.evaluate(heads, held_out, loss)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(after["loss"]) < mean(before["loss"]) - 0.1, (before, after)
    assert mean(after["top1"]) > mean(before["top1"]) + 0.01, (before, after)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "checkpoint.safetensors").is_file()


@pytest.mark.parametrize("kind", ["shared", "feature"])
def test_short_training_of_each_kind_lowers_loss_and_raises_top1(caches, tmp_path, kind):
    """Heads sharing the base's output layer, and the feature drafter (unrolled, on whole sequences)."""
    model, train_dir, test_dir = caches
    options = {"shared_output": True} if kind == "shared" else {"kind": "feature", "batch_sequences": 16, "steps": 60}
    config = train.TrainConfig(**{**CONFIG, **options})
    held_out = train.load_cache(test_dir)
    fresh = (
        vadusa.DraftHeads.from_model(model, 4, 1, True, shared_output=True)
        if kind == "shared"
        else vadusa.FeatureDrafter.from_model(model, depth=4)
    )
    before = train.evaluate(fresh, held_out, model=model)
    trained = train.train(model, config, train_dir, tmp_path, progress=False)
    after = train.evaluate(trained, held_out, model=model)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(after["loss"]) < mean(before["loss"]) - 0.1, (before, after)
    assert mean(after["top1"]) > mean(before["top1"]) + 0.01, (before, after)
    assert type(vadusa.load_drafter(tmp_path, model)) is type(fresh)


def test_root_token_heads_learn_what_medusa_heads_cannot_see(caches, tmp_path):
    """Head 0 predicts x_{t+2}; the base's x_{t+2} depends on the sampled x_{t+1}, which only root-token heads read."""
    model, train_dir, test_dir = caches
    held_out = train.load_cache(test_dir)
    result = {}
    for root_token in (False, True):
        config = train.TrainConfig(**CONFIG, root_token=root_token)
        heads = train.train(model, config, train_dir, tmp_path / str(root_token), progress=False)
        result[root_token] = train.evaluate(heads, held_out, "kl")
    assert result[True]["loss"][0] < result[False]["loss"][0] - 0.05, result
    assert result[True]["top1"][0] > result[False]["top1"][0] + 0.02, result


@pytest.mark.parametrize("mode", ["frozen", "joint"])
def test_resume_gives_the_same_heads_as_an_uninterrupted_run(caches, tmp_path, mode):
    model, train_dir, _ = caches
    config = train.TrainConfig(**{**CONFIG, "steps": 12, "checkpoint_every": 5, "batch_sequences": 4}, mode=mode)
    whole = train.train(model, config, train_dir, tmp_path / "whole", progress=False)
    train.train(model, config, train_dir, tmp_path / "cut", progress=False, stop_after=5)  # "interrupted" at 5
    resumed = train.train(model, config, train_dir, tmp_path / "cut", progress=False, resume=True)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    if mode == "joint":
        from safetensors.torch import load_file

        wa = load_file(tmp_path / "whole" / "adapter_model.safetensors")
        wb = load_file(tmp_path / "cut" / "adapter_model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # a stopped run is really behind: its first checkpoint differs from the final heads
    cut = train.train(model, config, train_dir, tmp_path / "early", progress=False, stop_after=5)
    assert not torch.equal(cut.block_weight, whole.block_weight)


def test_cache_refuses_other_prompts(caches, tmp_path):
    model = caches[0]
    config = train.TrainConfig(**{**CONFIG, "max_new_tokens": 8})
    train.build_cache(model, random_prompts(4, 3), config, tmp_path, progress=False)
    train.build_cache(model, random_prompts(4, 3), config, tmp_path, progress=False)  # same: reused
    with pytest.raises(ValueError, match="other prompts or sampling settings"):
        train.build_cache(model, random_prompts(4, 4), config, tmp_path, progress=False)
    with pytest.raises(ValueError, match="no prompts"):
        train.build_cache(model, [], config, tmp_path / "x", progress=False)


def test_resume_with_another_config_raises(caches, tmp_path):
    model, train_dir, _ = caches
    config = train.TrainConfig(**{**CONFIG, "steps": 6, "checkpoint_every": 3})
    train.train(model, config, train_dir, tmp_path, progress=False, stop_after=3)
    with pytest.raises(ValueError, match="lr"):
        train.train(model, train.TrainConfig(**{**CONFIG, "steps": 6, "lr": 1e-2}), train_dir, tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.train(model, config, train_dir, tmp_path / "fresh", resume=True, progress=False)


def test_joint_mode_saves_an_adapter_the_decoder_merges(caches, tmp_path):
    model, train_dir, _ = caches
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = train.TrainConfig(**{**CONFIG, "steps": 4, "batch_sequences": 4, "lora_lr": 1e-2}, mode="joint")
    train.train(model, config, train_dir, tmp_path, progress=False)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # base untouched
    run = vadusa_factory(model, None, heads=str(tmp_path), tree="chain")
    assert run.model is not model
    prompt = torch.tensor([[3, 17, 5, 40]])
    with torch.no_grad():
        merged, base = run.model(prompt).logits, model(prompt).logits
    assert not torch.allclose(merged, base)  # the LoRA changed the decoding model
    out = run(prompt, max_new_tokens=30, temperature=0)
    ar = vadusa.generate_ar(run.model, prompt, max_new_tokens=30, temperature=0)
    assert torch.equal(out.sequences, ar.sequences)


# ----- accuracy tables -----
def test_tolerance_accept_matches_enumeration():
    """P(rank r is the first candidate among tau draws) vs enumerating every tuple of tau draws."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=torch.float64)
    cands = torch.tensor([1, 0, 4])
    for tau in (1, 2, 3):
        exact = torch.zeros(3, dtype=torch.float64)
        for draws in itertools.product(range(6), repeat=tau):
            hits = [r for r, c in enumerate(cands.tolist()) if c in draws]
            if hits:
                exact[hits[0]] += torch.prod(probs[list(draws)])
        torch.testing.assert_close(accuracy.tolerance_accept(probs[cands], tau), exact)


def test_typical_table_is_the_typical_rules_choice():
    """acc['typical'] marks the rank the decoder's typical rule accepts (first over the threshold), state by state."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 12, generator=g) * torch.linspace(0.5, 4.0, 40)[:, None]  # flat to peaked
    log_probs = torch.log_softmax(logits, -1)
    cands = torch.stack([torch.randperm(12, generator=g)[:4] for _ in range(40)])[:, None]  # (G, 1, R)
    gen = torch.randint(0, 12, (40,), generator=g)
    vals, valid = accuracy.node_values(gen, log_probs, cands, "typical")
    checked = 0
    for i in valid[:, 0].nonzero().flatten().tolist():
        index, _ = typical(log_probs[i + 1].exp(), cands[i, 0], torch.zeros(1))
        want = torch.zeros(4, dtype=torch.float64)
        if index >= 0:
            want[index] = 1.0
        torch.testing.assert_close(vals[i, 0], want)
        checked += int(index >= 0)
    assert checked > 5  # some states do accept a candidate


@pytest.fixture(scope="module")
def model_heads_report():
    model = tiny_llama(VOCAB)
    heads = fitted_heads(model)
    report = accuracy.measure_accuracy(
        model, heads, random_prompts(6, 2), max_rank=5, max_new_tokens=60, progress=False
    )
    return model, heads, report


def test_accuracy_table_is_a_distribution_over_ranks(model_heads_report):
    _, heads, report = model_heads_report
    assert report["heads"] == accuracy.heads_fingerprint(heads)
    for rule, table in report["acc"].items():
        assert len(table) == 4 and all(len(row) == 6 for row in table)
        for row in table:
            assert all(a >= 0 for a in row) and sum(row) <= 1 + 1e-9, (rule, row)
    tau = [report["acc"][f"tau{t}"][0][0] for t in (1, 2, 3, 4)]
    assert tau == sorted(tau) and tau[3] > tau[0]  # more draws, more acceptance
    assert report["acc_per_position"]["greedy"][0][0] > 0.3  # fitted heads mostly get the greedy token right


def test_accuracy_file_for_other_heads_raises(model_heads_report, tmp_path):
    model, heads, report = model_heads_report
    accuracy.save_accuracy(report, tmp_path / "accuracy.json")
    assert accuracy.load_accuracy(tmp_path / "accuracy.json", heads)["acc"] == report["acc"]
    other = fitted_heads(model, seed=1)
    with pytest.raises(ValueError, match="measured for heads"):
        accuracy.load_accuracy(tmp_path / "accuracy.json", other)
    with pytest.raises(FileNotFoundError):
        accuracy.load_accuracy(tmp_path / "missing.json", heads)


def test_auto_tree_built_from_accuracy_drives_the_decoder(model_heads_report, tmp_path):
    """build_trees writes trees/<name>-<rule>-<size>.json and heads/tree-<rule>.json; tree='auto' loads it."""
    model, heads, report = model_heads_report
    assets = tmp_path / "assets"
    heads.save_pretrained(assets / "heads")
    costs = {"threads": 1, "seconds": {1: 1.0, 8: 1.2, 16: 1.5, 32: 2.4, 64: 4.0}}  # a made-up machine
    summary = accuracy.build_trees(
        model, heads, report, tmp_path / "trees", "tiny", heads_dir=assets / "heads", costs=costs, max_nodes=40
    )
    for rule, s in summary["rules"].items():
        assert (tmp_path / "trees" / s["file"]).is_file() and (tmp_path / "trees" / s["file"]).with_suffix(
            ".png"
        ).is_file()
        best = max(s["sweep"], key=lambda r: r["tokens_per_second"])
        assert s["size"] == best["size"] and 1 <= s["size"] <= 40, rule
    run = vadusa.build_decoder("vadusa", model, assets=assets, tree="auto", acceptance="tolerance", tolerance=3)
    assert run.tree.paths == vadusa.Tree.from_json(assets / "heads" / "tree-tau3.json").paths
    assert run.tree.meta["rule"] == "tau3" and len(run.tree.paths) == summary["rules"]["tau3"]["size"]
    prompt = torch.tensor([[3, 17, 5, 40, 22, 9]])
    greedy = vadusa.build_decoder("vadusa", model, assets=assets, tree="auto", acceptance="greedy")
    out = greedy(prompt, max_new_tokens=60, temperature=0)
    assert torch.equal(out.sequences, vadusa.generate_ar(model, prompt, max_new_tokens=60, temperature=0).sequences)
    sampled = run(prompt, max_new_tokens=60, generator=torch.Generator().manual_seed(0))
    assert sampled.new_tokens == 60 and sampled.mean_accepted > 1.0
    typical_run = vadusa.build_decoder("vadusa", model, assets=assets, acceptance="typical")
    assert typical_run.tree.meta["rule"] == "typical"  # its own table and tree
    (assets / "heads" / "tree-typical.json").unlink()  # heads built before typical had a table: tau1's tree
    older = vadusa.build_decoder("vadusa", model, assets=assets, acceptance="typical")
    assert older.tree.meta["rule"] == "tau1"


# ----- bad input -----
def test_bad_inputs_raise(model_heads_report, tmp_path):
    model, heads, _ = model_heads_report
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.read_prompts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no non-empty line"):
        train.read_prompts(tmp_path / "empty.txt")
    heads.save_pretrained(tmp_path / "heads")
    other = tiny_llama(vocab=50)
    with pytest.raises(ValueError, match="vocabulary size 48"):
        vadusa.build_decoder("vadusa", other, heads=str(tmp_path / "heads"), tree="chain")
    wider = vadusa.DraftHeads.from_model(model, num_heads=2)
    with pytest.raises(ValueError, match="exceeds the number of draft heads"):
        vadusa.build_decoder("vadusa", model, heads=wider, tree=vadusa.Tree.chain(3))
    with pytest.raises(FileNotFoundError, match="tree-typical.json"):
        vadusa.build_decoder("vadusa", model, heads=str(tmp_path / "heads"), tree="auto")
    with pytest.raises(FileNotFoundError, match="draft heads directory"):
        vadusa.build_decoder("vadusa", model, heads=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="mode"):
        train.TrainConfig(mode="both")
    with pytest.raises(ValueError, match="loss"):
        train.TrainConfig(loss="mse")
    with pytest.raises(ValueError, match="init_heads"):
        train.train(model, train.TrainConfig(num_heads=3, init_heads=str(tmp_path / "heads")), tmp_path, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="no cache shards"):
        train.train(model, train.TrainConfig(), tmp_path / "nocache", tmp_path / "out", progress=False)


def test_cli_end_to_end(tmp_path):
    """train_heads.py on a saved tiny model: prompts file -> heads -> accuracy -> trees -> measured acceptance."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vadusa.cli import train_heads

    model = peaky_llama()
    model.save_pretrained(tmp_path / "lm")
    vocab = {chr(97 + i): i for i in range(26)} | {"[UNK]": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "lm")
    (tmp_path / "train.txt").write_text("\n".join("abcdefghij"[i % 7 :] + "xyz"[: i % 3] for i in range(24)))
    (tmp_path / "test.txt").write_text("hello\nworld\n")
    common = ["--model", str(tmp_path / "lm"), "--out", str(tmp_path / "heads"), "--max-new-tokens", "24"]
    train_heads.main(
        common
        + [
            "--prompts",
            str(tmp_path / "train.txt"),
            "--cache",
            str(tmp_path / "cache"),
            "--train",
            "--steps",
            "20",
            "--batch-tokens",
            "128",
        ]
    )
    train_heads.main(common + ["--accuracy", "--heldout", str(tmp_path / "test.txt"), "--max-rank", "3"])
    train_heads.main(
        common + ["--build-trees", "--trees-dir", str(tmp_path / "trees"), "--max-nodes", "8", "--name", "tiny"]
    )
    train_heads.main(common + ["--measure", "--heldout", str(tmp_path / "test.txt"), "--tolerances", "1,3"])
    measured = json.loads((tmp_path / "heads" / "measured.json").read_text())
    assert set(measured) == {"tau1", "tau3"} and all(m["mean_accepted"] >= 1.0 for m in measured.values())
    assert sorted(p.name for p in (tmp_path / "heads").glob("tree-*.json")) == [
        "tree-greedy.json", "tree-tau1.json", "tree-tau2.json", "tree-tau3.json", "tree-tau4.json",
        "tree-typical.json",
    ]  # fmt: skip


@pytest.mark.parametrize("root_token", [False, True])
def test_renewal_prediction_matches_the_engine(model_heads_report, tmp_path, root_token):
    """Greedy decoding is deterministic, so the renewal model's tokens/step must equal the engine's exactly.

    With root-token heads this also checks that the accuracy tables feed each state the same root as the engine.
    """
    model, heads, _ = model_heads_report
    if root_token:
        heads = fitted_heads(model, root_token=True)
    prompts = random_prompts(12, 7)
    report = accuracy.measure_accuracy(
        model, heads, prompts, rules=("greedy",), max_rank=3, max_new_tokens=80, states_path=tmp_path / "s.safetensors",
        progress=False,
    )  # fmt: skip
    states = accuracy.load_states(tmp_path / "s.safetensors", report["heads"])
    with pytest.raises(ValueError, match="holds states of heads"):
        accuracy.load_states(tmp_path / "s.safetensors", "0" * 16)
    for paths in ([[0]], [[0], [0, 0], [0, 0, 0]], report["reference"]["greedy"]["paths"]):
        predicted = accuracy.renewal_tokens_per_step(states["greedy"], report["acc"]["greedy"], paths)
        tree = vadusa.Tree.from_paths(paths)
        outs = [
            vadusa.generate(model, heads, torch.tensor([p]), tree=tree, max_new_tokens=80, temperature=0)
            for p in prompts
        ]
        measured = sum(sum(o.accepted_lengths) for o in outs) / sum(len(o.accepted_lengths) for o in outs)
        assert predicted == pytest.approx(measured, rel=1e-9), paths  # greedy: the model is exact

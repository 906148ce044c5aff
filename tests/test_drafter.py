"""The feature drafter: decoding rows == the training unroll, the vectorised walk == the per-node walk,
artifacts round-trip bit-exactly, and bad input raises clearly."""

import json

import pytest
import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

import vadusa
from tests.conftest import fitted_drafter, tiny_gpt2, tiny_llama
from vadusa.accept import ACCEPTANCE_RULES, get_rule
from vadusa.drafter import DraftSession, FeatureDrafter, base_fingerprint, load_drafter, tree_plan
from vadusa.generate import logits_to_probs, node_probs, walk, walk_buffers


@pytest.fixture(scope="module")
def llama_and_drafter():
    model = tiny_llama(seed=3)
    return model, fitted_drafter(model, depth=4, steps=40, seed=3)


def test_session_rows_equal_the_training_unroll(llama_and_drafter):
    """Committed rows + one tree row per depth (a chain fed the true tokens) give the unroll's features."""
    model, drafter = llama_and_drafter
    seq = torch.tensor([[3, 17, 5, 40, 22, 9, 1, 30, 12, 7, 44, 2, 19]])
    with torch.no_grad():
        feats = model(seq, output_hidden_states=True).hidden_states[-1][:, :-1]  # (1, T, D)
        emb = model.get_input_embeddings().weight[torch.cat([seq[:, 1:], seq[:, -1:].expand(-1, 3)], 1)]
        outs = drafter.unrolled_features(emb, feats, 4)
        for root in (5, 8):  # the step's root row j = root - 1 (its token x_root is the last committed)
            session = DraftSession(drafter, model, 32)
            feat = session.commit(seq[0, 1 : root + 1], feats[0, :root])  # rows 0 .. root-1
            assert torch.allclose(feat, outs[0][0, root - 1], atol=1e-5)
            for depth in range(1, 4):  # a chain of the true next tokens, written as scratch rows
                bias = torch.zeros(1, depth)
                token = seq[0, root + depth : root + depth + 1]
                feat = session.rows(token, feat[None], root - 1 + depth, True, session.length + depth - 1, bias)[0]
                assert torch.allclose(feat, outs[depth][0, root - 1], atol=1e-5), depth


def random_tree_inputs(tree, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = len(tree)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    logits = 3 * torch.randn(n, vocab, generator=g)
    for i, kids in enumerate(tree.children):  # make children likely so walks go deep
        if len(kids):
            logits[i, tokens[kids]] += 4.0
    history = torch.randint(0, vocab, (1, 12), generator=g)
    return tokens, logits, history


def per_node_walk(logits, tokens, history, tree, rule, u, processor, temperature):
    """The reference: the rule's node form, visiting nodes one by one with each node's own history."""
    node, path = 0, [0]
    while True:
        hist = torch.cat([history, tokens[path[1:]][None]], 1)
        probs = logits_to_probs(logits[node], hist, processor, temperature, None)
        kids = tree.children[node]
        j, token = rule.node(probs, tokens[kids], u[node])
        if j < 0:
            return path, token
        node = int(kids[j])
        path.append(node)


@pytest.mark.parametrize("acceptance", ACCEPTANCE_RULES)
@pytest.mark.parametrize("with_processors", [False, True])
def test_vectorised_walk_equals_per_node_walk(medusa_tree, acceptance, with_processors):
    processor = None
    if with_processors:
        processor = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5), NoRepeatNGramLogitsProcessor(2)])
    rule = get_rule(acceptance, 3)
    temperature = 0.0 if acceptance == "greedy" else 0.9
    buffers = walk_buffers(medusa_tree, "cpu")
    depths = []
    for seed in range(60):
        tokens, logits, history = random_tree_inputs(medusa_tree, 40, seed)
        u = rule.uniforms(len(medusa_tree), buffers.child_index.shape[1], torch.Generator().manual_seed(seed))
        probs = node_probs(logits, tokens, history, buffers, processor, temperature, None)
        fast = walk(probs, tokens, buffers, rule, u)
        slow = per_node_walk(logits, tokens, history, medusa_tree, rule, u, processor, temperature)
        assert fast == slow, (seed, fast, slow)
        depths.append(len(fast[0]) - 1)
    assert max(depths) >= 2  # the comparison covers deep walks, not only rejections at the root


def test_drafter_save_load_round_trip_is_bit_exact(llama_and_drafter, tmp_path):
    model, drafter = llama_and_drafter
    drafter.save_pretrained(tmp_path)
    loaded = load_drafter(tmp_path, model)
    assert isinstance(loaded, FeatureDrafter) and loaded.config == drafter.config
    for (k, a), (_, b) in zip(drafter.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    prompt = torch.tensor([[4, 9, 2]])
    runs = [vadusa.generate(model, d, prompt, max_new_tokens=30, temperature=0).tokens for d in (drafter, loaded)]
    assert torch.equal(*runs)
    assert not list(tmp_path.glob("*.tmp"))


def test_shared_output_heads_round_trip_without_output_weights(tmp_path):
    model = tiny_gpt2()
    heads = vadusa.DraftHeads.from_model(model, num_heads=3, shared_output=True)
    with torch.no_grad():
        heads.block_weight.normal_(0, 0.1)
    heads.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert "out_weight" not in load_file(tmp_path / "model.safetensors")
    loaded = vadusa.DraftHeads.from_pretrained(tmp_path, model)
    h = torch.randn(5, 64)
    assert torch.equal(heads(h), loaded(h))
    assert torch.allclose(heads(h)[:, 0], model.lm_head(heads.hidden(h)[:, 0]), atol=1e-6)  # the base's own layer
    unbound = vadusa.DraftHeads.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="call heads.bind"):
        unbound(h)


def test_drafter_bad_inputs_raise(llama_and_drafter, tmp_path):
    model, drafter = llama_and_drafter
    drafter.save_pretrained(tmp_path / "d")
    other = tiny_llama(seed=9)  # same shapes, other weights
    with pytest.raises(ValueError, match="trained for base .* train a drafter for it"):
        load_drafter(tmp_path / "d", other)
    with pytest.raises(ValueError, match="vocabulary size 48, the model has 40"):
        vadusa.generate(tiny_llama(vocab=40), drafter, torch.tensor([[1]]))
    with pytest.raises(ValueError, match="tree depth 5 exceeds"):
        vadusa.generate(model, drafter, torch.tensor([[1]]), tree=vadusa.Tree.chain(5))
    (tmp_path / "d" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        load_drafter(tmp_path / "d", model)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_drafter(tmp_path / "missing")
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "config.json").write_text(json.dumps({"kind": "eagle9"}))
    (tmp_path / "k" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown kind 'eagle9'"):
        load_drafter(tmp_path / "k")


def test_tree_plan_rows_follow_the_tree(medusa_tree):
    plan = tree_plan(medusa_tree)
    assert sum(len(n) for n in plan.nodes) == len(medusa_tree) - 1
    for d, nodes in enumerate(plan.nodes, start=1):
        assert (medusa_tree.depths[nodes] == d).all()
        inner = plan.inner[d - 1]
        assert all(len(medusa_tree.children[i]) > 0 for i in inner.tolist())
        assert plan.bias[d - 1].shape[0] == len(inner)


@pytest.mark.parametrize("kind", ["heads", "feature"])
def test_step_parts_run_the_engine_and_leave_its_state_as_they_found_it(llama_and_drafter, medusa_tree, kind):
    """The cost model times the engine's own step; every part must leave the caches as it found them, or the
    timings of later rounds would measure a growing cache."""
    from tests.conftest import fitted_heads
    from vadusa.cost import step_parts

    model, drafter = llama_and_drafter
    if kind == "heads":
        drafter = fitted_heads(model, steps=5)
    tree = vadusa.Tree.from_paths([p for p in medusa_tree.paths if len(p) <= 4])
    parts = step_parts(model, drafter, tree, prefix_len=32)
    lengths = []
    for name in ("draft", "verify", "walk", "keep", "step", "step"):
        parts[name]()
        lengths.append(parts["cache"].get_seq_length())
    assert lengths == [31] * 6  # the prefix minus the root, every time


def test_warm_start_follows_a_changed_base_and_refuses_another_kind(llama_and_drafter, tmp_path):
    """init_heads loads a drafter trained on an earlier version of the base (a fine-tune): weights copied, the
    new drafter carries the new base's fingerprint; it may unroll deeper than the one it starts from (the depth
    is a training length, not a layout); a drafter of another kind or size is refused."""
    from vadusa import train

    model, drafter = llama_and_drafter
    drafter.save_pretrained(tmp_path / "d")
    finetuned = tiny_llama(seed=9)  # same shapes, other weights: load_drafter(.., finetuned) would refuse it
    for depth in (4, 7):
        fresh = FeatureDrafter.from_model(finetuned, depth=depth, seed=1)
        train.warm_start(fresh, train.TrainConfig(kind="feature", num_heads=depth, init_heads=str(tmp_path / "d")))
        for (k, a), (_, b) in zip(drafter.state_dict().items(), fresh.state_dict().items(), strict=True):
            assert torch.equal(a, b), k
        assert fresh.config.base_fingerprint != drafter.config.base_fingerprint and fresh.max_depth == depth
        fresh.check_compatible(finetuned)  # bound to the new base
    wider = FeatureDrafter.from_model(finetuned, depth=4, intermediate_size=3 * finetuned.config.hidden_size)
    with pytest.raises(ValueError, match=r"does not fit this model's sizes"):
        train.warm_start(wider, train.TrainConfig(kind="feature", num_heads=4, init_heads=str(tmp_path / "d")))
    heads = vadusa.DraftHeads.from_model(finetuned, num_heads=4)
    with pytest.raises(ValueError, match=r"holds \('feature',\), the config asks for \('heads', 4, 1, False\)"):
        train.warm_start(heads, train.TrainConfig(num_heads=4, init_heads=str(tmp_path / "d")))


def test_base_fingerprint_is_remembered_until_the_weights_change():
    """The fingerprint is hashed once per output layer, and again after an in-place change or a swapped storage,
    so a drafter check never passes on a stale hash."""
    import hashlib

    model = tiny_llama(seed=5)
    weight = model.get_output_embeddings().weight

    def fresh():
        return hashlib.sha256(weight.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]

    first = base_fingerprint(model)
    assert first == fresh() and base_fingerprint(model) == first
    with torch.no_grad():
        weight.mul_(2.0)  # in place: the version moves
    assert base_fingerprint(model) == fresh() != first
    weight.data = torch.randn_like(weight)  # a new storage, same version
    assert base_fingerprint(model) == fresh()
    assert base_fingerprint(tiny_llama(seed=6)) != base_fingerprint(model)

"""Tiny random models built in the tests (no downloads) and draft heads fitted to them in a second."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import vadusa

torch.set_num_threads(1)


def tiny_llama(vocab: int = 48, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab: int = 48, seed: int = 0, init: float = 0.02) -> GPT2LMHeadModel:
    """`init`: the weights' std (GPT-2's 0.02 makes a 2-layer random model repeat its last token greedily)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=1024, bos_token_id=None, eos_token_id=None,
        initializer_range=init,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


TEST_PROMPT = [3, 17, 5, 40, 22, 9]  # the prompt the greedy tests decode from


def fitted_heads(
    model, num_heads: int = 4, steps: int = 150, seed: int = 0, root_token: bool = False, shared_output: bool = False
):
    """Random (non-zero) heads, then a few Adam steps towards the model's own greedy future tokens.

    Gives heads that are right often enough for several tokens to be accepted per step, so tests
    exercise the multi-token path, while still being wrong at times (rank > 0 nodes matter).
    `root_token` heads also read the token after each state (vadusa.heads). steps=0: the random heads only.
    """
    gen = torch.Generator().manual_seed(seed)
    heads = vadusa.DraftHeads.from_model(
        model, num_heads=num_heads, num_layers=1, root_token=root_token, shared_output=shared_output
    )
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    heads.bind(model)
    if steps == 0:
        return heads.eval().requires_grad_(False)
    vocab = heads.config.vocab_size
    prompts = torch.randint(0, vocab, (31, len(TEST_PROMPT)), generator=gen)
    prompts = torch.cat([prompts, torch.tensor([TEST_PROMPT]) % vocab])
    with torch.no_grad():  # the model's own futures: greedy, then sampled continuations of the same prompts
        greedy = model.generate(prompts, max_new_tokens=120, do_sample=False, min_new_tokens=120)
        sampled = model.generate(prompts, max_new_tokens=120, do_sample=True, top_k=0, min_new_tokens=120)
        seqs = torch.cat([greedy, sampled])
        hidden = model(seqs, output_hidden_states=True).hidden_states[-1]  # (B, T, D)
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    for _ in range(steps):
        logits = heads(hidden[:, :-1], seqs[:, 1:])  # (B, T-1, H, V): state t, root t+1
        loss = sum(
            torch.nn.functional.cross_entropy(logits[:, : -(k + 1), k].reshape(-1, vocab), seqs[:, k + 2 :].reshape(-1))
            for k in range(num_heads)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return heads.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def medusa_tree() -> vadusa.Tree:
    import json
    from pathlib import Path

    local = Path(__file__).parent / "data" / "medusa_mc_sim_7b_63.json"
    return vadusa.Tree.from_paths(json.loads(local.read_text())["paths"])


def fitted_drafter(model, depth: int = 4, steps: int = 120, seed: int = 0):
    """A feature drafter fitted for a few Adam steps to the model's own greedy and sampled futures
    (the training-time-test unroll of `FeatureDrafter.unrolled_features`, cross-entropy on the true tokens)."""
    from vadusa.drafter import FeatureDrafter

    gen = torch.Generator().manual_seed(seed)
    drafter = FeatureDrafter.from_model(model, depth=depth, seed=seed)
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (15, len(TEST_PROMPT)), generator=gen)
    prompts = torch.cat([prompts, torch.tensor([TEST_PROMPT]) % vocab])
    with torch.no_grad():
        greedy = model.generate(prompts, max_new_tokens=100, do_sample=False, min_new_tokens=100)
        sampled = model.generate(prompts, max_new_tokens=100, do_sample=True, top_k=0, min_new_tokens=100)
        seqs = torch.cat([greedy, sampled])  # (B, T + 1)
        feats = model(seqs, output_hidden_states=True).hidden_states[-1][:, :-1]  # (B, T, D)
        embed = model.get_input_embeddings().weight
        out_weight = model.get_output_embeddings().weight.detach()
        emb = embed[torch.cat([seqs[:, 1:], seqs[:, -1:].expand(-1, depth)], 1)]  # (B, T + depth, D)
    t = feats.shape[1]
    opt = torch.optim.Adam(drafter.parameters(), lr=3e-3)
    for _ in range(steps):
        outs = drafter.unrolled_features(emb, feats, depth)
        loss = 0
        for k, out in enumerate(outs):  # step k, row j predicts x_{j+2+k}
            rows = t - 1 - k
            logits = out[:, :rows] @ out_weight.T
            loss = loss + torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), seqs[:, 2 + k :].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return drafter.eval().requires_grad_(False)


def budget(examples: int) -> int:
    """Hypothesis examples for a property: `examples` in CI, times $PROPERTY_SCALE when hunting bugs."""
    import os

    return examples * int(os.environ.get("PROPERTY_SCALE", "1"))


def assert_cache_continues(model, out) -> None:
    """The cache a generation returns holds `sequences[:, :-1]`: continuing from it gives a fresh forward's logits."""
    seq = out.sequences
    assert out.cache.get_seq_length() == seq.shape[1] - 1
    with torch.no_grad():
        continued = model(seq[:, -1:], past_key_values=out.cache, position_ids=torch.tensor([[seq.shape[1] - 1]]))
        fresh = model(seq)
    assert torch.allclose(continued.logits[0, -1], fresh.logits[0, -1], atol=1e-4)

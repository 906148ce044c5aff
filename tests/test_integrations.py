"""Llasa, Orpheus, CosyVoice2, Spark-TTS on tiny random-init lookalikes (their architecture and token layout,
scaled down): greedy VADUSA through each integration == the pipeline's own loop written here from its
algorithm, token for token; lossless VADUSA under RAS has the direct RAS sampler's distribution."""

import pytest
import torch
from transformers import DynamicCache

import vadusa
from tests.conftest import fitted_heads, tiny_llama
from tests.test_generate import empirical_joint, total_variation
from tests.test_hf import tiny_qwen2
from vadusa.integrations import TokenRange, cosyvoice2, llasa, orpheus, spark_tts


@torch.no_grad()
def own_loop(model, prompt, pick, eos, max_new):
    """A pipeline's KV-cached loop: prefill, then pick(history, logits) -> token, fed back, until EOS / budget."""
    cache = DynamicCache()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    history = prompt[0].tolist()
    for _ in range(max_new):
        token = pick(history, out.logits[0, -1].float())
        history.append(token)
        if token == eos:
            break
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
    return history


def masked_argmax(logits, allowed):
    banned = torch.ones_like(logits, dtype=torch.bool)
    banned[allowed] = False
    return int(logits.masked_fill(banned, float("-inf")).argmax())


def through_generate(model, heads, prompt, **kwargs):
    return model.generate(prompt, custom_generate=vadusa.custom_generate, draft_heads=heads, tree=TREE, **kwargs)


TREE = vadusa.Tree.from_paths([[0], [1], [0, 0], [1, 0], [0, 0, 0]])


def test_llasa_greedy_equals_its_loop():
    layout = llasa.Layout(speech_start=24, num_codes=38, generation_start=20, generation_end=21, vocab_size=64)
    model = tiny_llama(vocab=64)
    heads = fitted_heads(model, 3, steps=40)
    prompt = torch.tensor([[3, 17, 5, 9, layout.generation_start]])
    allowed = list(range(24, 62)) + [21]
    ref = own_loop(model, prompt, lambda h, logits: masked_argmax(logits, allowed), 21, 60)
    ids = through_generate(model, heads, prompt, **llasa.generate_kwargs(layout, do_sample=False, max_length=65))
    assert ids[0].tolist() == ref and len(ref) > 20
    codes = llasa.speech_codes(ids[0, 5:], layout)
    assert codes.tolist() == [t - 24 for t in ref[5:] if t != 21]


def orpheus_pick(prompt_len, layout):
    """Orpheus greedy: repetition penalty 1.1 over the history, then the frame position's codebook range."""

    def pick(history, logits):
        seen = torch.tensor(sorted(set(history)))
        logits = logits.clone()
        logits[seen] = torch.where(logits[seen] < 0, logits[seen] * 1.1, logits[seen] / 1.1)
        j = (len(history) - prompt_len) % layout.frame
        allowed = list(range(layout.code_start + j * layout.codebook, layout.code_start + (j + 1) * layout.codebook))
        return masked_argmax(logits, allowed + ([layout.end_of_speech] if j == 0 else []))

    return pick


def test_orpheus_greedy_equals_its_loop():
    layout = orpheus.Layout(code_start=10, codebook=6, frame=7, end_of_speech=5, vocab_size=56)
    model = tiny_llama(vocab=56, seed=3)
    heads = fitted_heads(model, 3, steps=40)
    prompt = torch.tensor([[1, 2, 3, 4, 6, 7]])
    ref = own_loop(model, prompt, orpheus_pick(6, layout), 5, 70)
    kw = orpheus.generate_kwargs(6, layout, do_sample=False, max_new_tokens=70)
    out = through_generate(model, heads, prompt, return_dict_in_generate=True, **kw)
    assert out.sequences[0].tolist() == ref and len(ref) > 40
    frames = orpheus.snac_frames(out.sequences[0, 6:], layout)
    assert frames.shape[1] == 7 and frames.min() >= 0 and frames.max() < 6  # every position in its codebook
    assert out.forward_passes < len(ref) - 6  # the heads draft across frame positions


def cosyvoice_lm(vocab=20, seed=0):
    """A tiny Qwen2 causal LM with a CosyVoice2-style speech embedding and decoder swapped in."""
    qwen = tiny_qwen2(vocab=100, seed=seed)
    torch.manual_seed(seed + 1)
    speech_embedding, llm_decoder = torch.nn.Embedding(vocab, 64), torch.nn.Linear(64, vocab)
    return cosyvoice2.as_causal_lm(qwen, speech_embedding, llm_decoder).eval()


def prompt_embeds(lm, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(1, 7, 64, generator=g)  # sos + text + task id + prompt speech, already embedded


@torch.no_grad()
def cosyvoice_loop(lm, embeds, pick, eos, max_len):
    """CosyVoice2's loop: the Qwen2 body on embeddings, llm_decoder logits, speech_embedding of each token."""
    body, decoder, embed = lm.model, lm.get_output_embeddings(), lm.get_input_embeddings()
    cache, x, out = DynamicCache(), embeds, []
    for i in range(max_len):
        h = body(inputs_embeds=x, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        token = pick(i, out, torch.log_softmax(decoder(h)[0], -1))
        if token == eos:
            return out + [eos]
        out.append(token)
        x = embed.weight[token][None, None]
    return out


def test_cosyvoice2_greedy_with_min_len_equals_its_loop():
    layout = cosyvoice2.Layout(num_codes=17, eos=17, vocab_size=20, hidden_size=64)
    lm = cosyvoice_lm()
    with torch.no_grad():
        lm.get_output_embeddings().bias[layout.eos] += 6.0  # the EOS wins as soon as it is allowed
    heads = fitted_heads(lm, 3, steps=40)
    embeds = prompt_embeds(lm)
    min_len, max_len = cosyvoice2.lengths(text_len=9)

    def pick(i, out, logp):
        logp = logp.clone()
        if i < min_len:
            logp[layout.eos] = float("-inf")
        return int(logp.argmax())

    ref = cosyvoice_loop(lm, embeds, pick, layout.eos, max_len)
    processors = cosyvoice2.logits_processor(min_len, None, layout)
    out = vadusa.generate(lm, heads, inputs_embeds=embeds, tree=TREE, max_new_tokens=max_len, temperature=0,
                          eos_token_id=layout.eos, logits_processor=processors)  # fmt: skip
    assert out.tokens.tolist() == ref and len(ref) == min_len + 1  # EOS held back exactly until min_len


def ras_direct(lm, embeds, config, min_len, eos, steps):
    """CosyVoice2's RAS sampler as its code reads: nucleus draw; a draw repeated in the window is redrawn from
    the full distribution; the EOS is redrawn away before min_len."""

    def nucleus_draw(logp):
        probs, chosen, mass = logp.exp(), [], 0.0
        ranked, order = torch.sort(probs, descending=True)
        for p, t in zip(ranked.tolist(), order.tolist(), strict=True):
            if mass < config.top_p and len(chosen) < config.top_k:
                mass += p
                chosen.append((p, t))
            else:
                break
        weights = torch.tensor([p for p, _ in chosen])
        return chosen[int(torch.multinomial(weights, 1))][1]

    def pick(i, out, logp):
        while True:
            token = nucleus_draw(logp)
            if out[-config.win_size :].count(token) >= config.win_size * config.tau_r:
                token = int(torch.multinomial(logp.exp(), 1))
            if i >= min_len or token != eos:
                return token

    def sample(g):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        return cosyvoice_loop(lm, embeds, pick, eos, steps)

    return sample


@pytest.mark.slow
def test_lossless_under_ras_matches_the_direct_ras_sampler():
    """3-token joint, 8-token vocabulary: lossless VADUSA with the RAS processor vs CosyVoice2's own sampler
    (Monte Carlo both, 1500 runs each: TV within the two-sample noise bound); plain nucleus sampling (no RAS)
    on the same draws lands far from the RAS sampler."""
    layout = cosyvoice2.Layout(num_codes=7, eos=7, vocab_size=8, hidden_size=64)
    lm = cosyvoice_lm(vocab=8, seed=2)
    heads = fitted_heads(lm, 2, steps=60, seed=1)
    tree = vadusa.Tree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0]])
    embeds, config, runs = prompt_embeds(lm, 1), cosyvoice2.RasConfig(top_p=0.8, top_k=4, win_size=10), 1500
    direct = empirical_joint(ras_direct(lm, embeds, config, 2, layout.eos, 3), runs)

    def ours(ras):
        def sample(g):
            out = vadusa.generate(lm, heads, inputs_embeds=embeds, tree=tree, max_new_tokens=3, acceptance="lossless",
                                  eos_token_id=layout.eos, generator=g, **cosyvoice2.SAMPLING,
                                  logits_processor=cosyvoice2.logits_processor(2, ras, layout))  # fmt: skip
            return out.tokens.tolist()

        return sample

    bound = 2**0.5 * 0.5 * sum((p * (1 - p) / runs) ** 0.5 for p in direct.values())  # two-sample noise
    tv = total_variation(empirical_joint(ours(config), runs), direct)
    assert tv < 1.2 * bound, (tv, bound)
    plain = cosyvoice2.RasConfig(top_p=0.8, top_k=4, win_size=10, tau_r=100.0)  # never redraws: nucleus only
    assert total_variation(empirical_joint(ours(plain), runs), direct) > 1.5 * bound


def test_ras_distribution_closed_form():
    """RAS's q on one row by hand: nucleus {a, b}; b was generated in the window, so its mass goes to the full
    distribution."""
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    q = cosyvoice2.RAS(cosyvoice2.RasConfig(top_p=0.7, top_k=3, win_size=2, tau_r=0.5))(torch.tensor([[3, 1]]), scores)
    near = torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8
    expected = near * torch.tensor([1.0, 0.0, 1.0, 1.0]) + near[1] * torch.tensor([0.5, 0.3, 0.15, 0.05])
    torch.testing.assert_close(q.exp()[0], expected)


def test_spark_tts_greedy_equals_its_loop():
    model = tiny_qwen2(vocab=56, seed=4)
    heads = fitted_heads(model, 3, steps=40)

    class Tokenizer:  # the two lookups layout_from_tokenizer makes
        def convert_tokens_to_ids(self, token):
            if token == "<|im_end|>":
                return 7
            return 30 + int(token.removeprefix("<|bicodec_semantic_").removesuffix("|>"))

    layout = spark_tts.layout_from_tokenizer(Tokenizer(), num_semantic=20)
    assert layout == spark_tts.Layout(30, 20, 7)
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    ref = own_loop(model, prompt, lambda h, logits: masked_argmax(logits, list(range(30, 50)) + [7]), 7, 50)
    kw = spark_tts.generate_kwargs(layout, do_sample=False, max_new_tokens=50)
    ids = through_generate(model, heads, prompt, **kw)
    assert ids[0].tolist() == ref
    assert spark_tts.semantic_codes(ids[0, 5:], layout).tolist() == [t - 30 for t in ref[5:] if t != 7]


def test_bad_layouts_raise():
    with pytest.raises(ValueError, match="start < stop"):
        TokenRange(5, 5)
    with pytest.raises(ValueError, match="hidden size 64"):
        cosyvoice2.as_causal_lm(tiny_qwen2(), torch.nn.Embedding(8, 32), torch.nn.Linear(64, 8))

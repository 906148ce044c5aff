"""vadusa.custom_generate behind model.generate: every usual argument keeps its meaning, greedy equals greedy
model.generate token for token, lossless sampling has model.generate's own distribution."""

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    Qwen2Config,
    Qwen2ForCausalLM,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

import vadusa
from tests.conftest import TEST_PROMPT, fitted_heads, tiny_llama
from tests.test_generate import empirical_joint, total_variation


def tiny_qwen2(vocab: int = 48, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         tie_word_embeddings=False)  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_heads(request):
    model = {"llama": tiny_llama, "qwen2": tiny_qwen2}[request.param]()
    return model, fitted_heads(model, steps=60)


TREE = vadusa.Tree.from_paths([[0], [1], [0, 0], [1, 0], [0, 0, 0], [0, 1], [0, 0, 0, 0]])


def usual_arguments(model, prompt_kwargs) -> dict:
    """Processors of every kind, and an EOS the processed greedy path reaches early (before min_new_tokens)."""
    kw = dict(max_new_tokens=70, do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=25)
    free = model.generate(**prompt_kwargs, max_new_tokens=40, do_sample=False)[0, -40:].tolist()
    kw |= dict(suppress_tokens=[free[2]], bad_words_ids=[[free[4], free[5]]])
    processed = model.generate(**prompt_kwargs, **kw)[0, -70:].tolist()
    return kw | dict(eos_token_id=processed[8], pad_token_id=processed[8])


@pytest.mark.filterwarnings("ignore:Passing `")
@pytest.mark.parametrize("prompt", ["ids", "embeds"])
def test_greedy_custom_generate_equals_model_generate(model_and_heads, prompt):
    model, heads = model_and_heads
    ids = torch.tensor([TEST_PROMPT])
    if prompt == "ids":
        prompt_kwargs = {"input_ids": ids}
    else:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            embeds = torch.cat([0.05 * torch.randn(1, 3, 64, generator=g), model.get_input_embeddings()(ids)], 1)
        prompt_kwargs = {"inputs_embeds": embeds}
    kw = usual_arguments(model, prompt_kwargs)
    reference = model.generate(**prompt_kwargs, **kw)
    ours = model.generate(**prompt_kwargs, **kw, custom_generate=vadusa.custom_generate, draft_heads=heads,
                          tree=TREE, return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(ours.sequences, reference), (ours.sequences, reference)
    new = reference[0, -(reference.shape[1] - (ids.shape[1] if prompt == "ids" else 0)) :].tolist()
    assert len(new) >= 25 and (new[-1] == kw["eos_token_id"] or len(new) == 70)
    early = model.generate(**prompt_kwargs, **(kw | {"min_new_tokens": 0}))
    assert early.shape[1] < reference.shape[1]  # min_new_tokens held the EOS back
    assert kw["suppress_tokens"][0] not in new
    assert ours.forward_passes == 1 + len(ours.accepted_lengths) and ours.forward_passes < len(new)
    plain = model.generate(**prompt_kwargs, max_new_tokens=len(new), do_sample=False)
    assert not torch.equal(plain, reference)  # the processors changed the output: the test can tell


@pytest.mark.filterwarnings("ignore:Passing `")
def test_batched_greedy_custom_generate_equals_model_generate(model_and_heads):
    """A left-padded batch of 3 prompts (the usual processors but min_new_tokens, rows stopping at different
    times): the same sequences as transformers' own batched greedy generate, finished rows padded with the pad
    token as there; min_new_tokens on a padded batch is refused (transformers counts the padding)."""
    model, heads = model_and_heads
    prompts = [TEST_PROMPT, TEST_PROMPT[2:], [7, 30, 1, 2, 11, 8, 6]]
    ids, mask = vadusa.left_pad(prompts)
    kw = usual_arguments(model, {"input_ids": torch.tensor([TEST_PROMPT])}) | {"min_new_tokens": 0}
    reference = model.generate(ids, attention_mask=mask, **kw)
    ours = model.generate(ids, attention_mask=mask, **kw, custom_generate=vadusa.custom_generate, draft_heads=heads,
                          tree=TREE)  # fmt: skip
    assert torch.equal(ours, reference), (ours, reference)
    ends = [(row[ids.shape[1] :] == kw["pad_token_id"]).sum().item() for row in reference]
    assert len(set(ends)) > 1  # the rows finished at different times
    with pytest.raises(ValueError, match="MinNewTokensLengthLogitsProcessor"):
        model.generate(ids, attention_mask=mask, **(kw | {"min_new_tokens": 5}), custom_generate=vadusa.custom_generate,
                       draft_heads=heads)  # fmt: skip


class StopAfter(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


class Collect(BaseStreamer):
    def __init__(self):
        self.puts = []

    def put(self, value):
        self.puts.append(value.flatten().tolist())

    def end(self):
        self.puts.append("end")


def test_streamer_stopping_criteria_and_return_types(model_and_heads):
    model, heads = model_and_heads
    ids = torch.tensor([TEST_PROMPT])
    free = model.generate(ids, max_new_tokens=40, do_sample=False)[0, len(TEST_PROMPT) :].tolist()
    k = next(j for j in range(10, 40) if free.index(free[j]) == j)  # a token first generated at step k >= 10
    stop = StoppingCriteriaList([StopAfter(free[k])])
    reference = model.generate(ids, max_new_tokens=40, do_sample=False, stopping_criteria=stop)
    streamer = Collect()
    ours = model.generate(ids, max_new_tokens=40, do_sample=False, stopping_criteria=stop, streamer=streamer,
                          custom_generate=vadusa.custom_generate, draft_heads=heads, tree=TREE)  # fmt: skip
    assert torch.is_tensor(ours) and torch.equal(ours, reference) and reference.shape[1] == len(TEST_PROMPT) + k + 1
    assert streamer.puts[0] == TEST_PROMPT and streamer.puts[-1] == "end"  # the prompt once, then the tokens
    assert sum(streamer.puts[1:-1], []) == free[: k + 1]


def exact_joint(model, prompt, steps, processors):
    """P(x1..x_steps | prompt) through transformers' own processors and warpers, enumerated."""
    joint = {(): 1.0}
    for _ in range(steps):
        prefixes = list(joint)
        batch = torch.tensor([prompt + list(p) for p in prefixes])
        with torch.no_grad():
            probs = torch.softmax(processors(batch, model(batch).logits[:, -1]), -1)  # (P, V)
        joint = {p + (t,): joint[p] * float(probs[i, t]) for i, p in enumerate(prefixes) for t in range(probs.shape[1])}
    return {k: v for k, v in joint.items() if v > 0}


@pytest.mark.slow
def test_lossless_sampling_has_model_generate_distribution():
    """do_sample, temperature 0.7, top-p 0.8 and a repetition penalty (history-aware at every node): the 3-token
    joint of lossless custom_generate equals model.generate's (its processors, enumerated)."""
    model = tiny_llama(vocab=8, seed=1)
    heads = fitted_heads(model, 2, steps=100, seed=1)
    tree = vadusa.Tree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0]])
    prompt, runs = [1, 5, 2], 2000
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5), TemperatureLogitsWarper(0.7),
                                      TopPLogitsWarper(0.8)])  # fmt: skip
    exact = exact_joint(model, prompt, 3, processors)
    bound = 0.5 * sum((p * (1 - p) / runs) ** 0.5 for p in exact.values())

    def sample(g):
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=3, min_new_tokens=3, do_sample=True,
                             temperature=0.7, top_p=0.8, repetition_penalty=1.5, custom_generate=vadusa.custom_generate,
                             draft_heads=heads, tree=tree, acceptance="lossless", generator=g)  # fmt: skip
        return ids[0, 3:].tolist()

    tv = total_variation(empirical_joint(sample, runs), exact)
    assert tv < bound, (tv, bound)
    untruncated = exact_joint(model, prompt, 3, LogitsProcessorList(processors[:2]))
    assert total_variation(untruncated, exact) > 2 * bound  # top-p matters at this size: the test can tell


def test_bad_calls_raise(model_and_heads):
    model, heads = model_and_heads
    ids = torch.tensor([TEST_PROMPT])
    call = dict(max_new_tokens=5, custom_generate=vadusa.custom_generate)
    with pytest.raises(ValueError, match="num_beams must be 1, got 2"):
        model.generate(ids, num_beams=2, draft_heads=heads, **call)
    with pytest.raises(ValueError, match="assistant_model"):
        model.generate(ids, assistant_model=model, draft_heads=heads, **call)
    with pytest.raises(ValueError, match="inputs_embeds one prompt at a time, got 2 rows"):
        model.generate(inputs_embeds=torch.zeros(2, 3, 64), draft_heads=heads, **call)
    with pytest.raises(ValueError, match="right-padded"):
        model.generate(ids.repeat(2, 1), attention_mask=torch.tensor([[1] * 5 + [0]] * 2), draft_heads=heads, **call)
    with pytest.raises(ValueError, match="needs draft_heads"):
        model.generate(ids, **call)
    other = fitted_heads(tiny_llama(vocab=40), steps=1)
    with pytest.raises(ValueError, match="vocabulary size 40"):
        model.generate(ids, draft_heads=other, **call)

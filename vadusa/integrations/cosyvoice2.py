"""CosyVoice2 (FunAudioLLM): a Qwen2 body (hidden 896) with its own speech embedding and output layer.

Layout: `speech_embedding = Embedding(6564, 896)` embeds generated speech tokens, `llm_decoder = Linear(896, 6564)`
reads their logits; codes 0 .. 6560, EOS 6561. Its own KV-cached loop (not `model.generate`) starts from
mixed prompt embeddings (sos, text, task id, prompt speech), blocks the EOS until `min_len = 2 * text_len`,
stops at `max_len = 20 * text_len`, and samples with RAS (repetition-aware sampling): draw from the nucleus
(top-p 0.8 within the top 25); if the draw occurs >= win_size * tau_r times in the last win_size = 10 generated
tokens (tau_r 0.1), redraw from the full distribution.

RAS as an exact distribution: with N the nucleus distribution, P the full one and R the tokens over-repeated in
the node's window, the token is distributed as  q = N * [not in R] + N(R) * P.  `RAS` writes log q as the
scores (so decode at temperature 1, no top-k / top-p of the engine's own: `SAMPLING`); it reads each node's
own history, so tolerance and lossless acceptance stay exact. `MinLenEos` then blocks the EOS (CosyVoice2
redraws until the token is not the EOS: q renormalised without it, which is what -inf on the EOS gives).

The recipe on a transformers Qwen2 causal LM (the body of CosyVoice2's LM, loaded into Qwen2ForCausalLM):

    from vadusa.integrations import cosyvoice2
    lm = cosyvoice2.as_causal_lm(qwen2_causal_lm, speech_embedding, llm_decoder)  # swaps its embed / head
    out = vadusa.generate(lm, heads, inputs_embeds=prompt_embeds, tree=tree, acceptance="lossless",
                          max_new_tokens=max_len, eos_token_id=6561,
                          logits_processor=cosyvoice2.logits_processor(min_len), **cosyvoice2.SAMPLING)

Heads for it: `train_heads.py --model DIR` on the converted LM directory (save `lm` with save_pretrained);
the heads read `lm`'s hidden states and write through `llm_decoder` (`--shared-output`):
    python train_heads.py --model runs/cosyvoice2-lm --prompts cv2_prompts.txt --cache runs/cv2-cache \\
        --train --out runs/cv2-heads --shared-output
"""

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor


@dataclass(frozen=True)
class Layout:
    num_codes: int = 6561  # speech codes 0 .. 6560
    eos: int = 6561  # end of speech
    vocab_size: int = 6564  # rows of speech_embedding and llm_decoder
    hidden_size: int = 896  # the Qwen2 body's hidden size


SAMPLING = {"temperature": 1.0, "top_k": None, "top_p": 1.0}  # RAS is the whole sampling rule: no other warper


@dataclass(frozen=True)
class RasConfig:
    top_p: float = 0.8  # nucleus mass
    top_k: int = 25  # nucleus size cap
    win_size: int = 10  # window of generated tokens checked for repetition
    tau_r: float = 0.1  # a draw seen >= win_size * tau_r times in the window is redrawn from the full distribution


def nucleus(probs: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """(N, V) -> (N, V) CosyVoice2's nucleus distribution: the most likely tokens, taken while the mass taken so
    far is < top_p and fewer than top_k are taken; renormalised."""
    ranked, order = torch.sort(probs, dim=-1, descending=True)  # (N, V)
    before = ranked.cumsum(-1) - ranked  # mass taken before each token
    rank = torch.arange(probs.shape[-1], device=probs.device)
    taken = torch.where((before < top_p) & (rank < top_k), ranked, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, taken)
    return kept / kept.sum(-1, keepdim=True)


class RAS(LogitsProcessor):
    """Repetition-aware sampling as an exact distribution: scores -> log q (module doc). `prompt_len` prompt ids
    at the start of input_ids are not part of the window (0 for an embeddings prompt)."""

    def __init__(self, config: RasConfig = RasConfig(), prompt_len: int = 0):
        self.config, self.prompt_len = config, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        c = self.config
        full = torch.softmax(scores.float(), dim=-1)  # (N, V)
        near = nucleus(full, c.top_p, c.top_k)  # (N, V)
        window = input_ids[:, self.prompt_len :][:, -c.win_size :]  # (N, w) the last generated tokens
        counts = torch.zeros_like(full).scatter_add_(-1, window, torch.ones_like(window, dtype=full.dtype))
        repeated = counts >= c.win_size * c.tau_r  # (N, V) a draw of these is redrawn from the full distribution
        redraw = (near * repeated).sum(-1, keepdim=True)  # (N, 1)
        return torch.log(near * ~repeated + redraw * full)


class MinLenEos(LogitsProcessor):
    """The EOS is blocked until `min_len` tokens were generated (`prompt_len` prompt ids lead input_ids)."""

    def __init__(self, min_len: int, eos: int = Layout.eos, prompt_len: int = 0):
        self.min_len, self.eos, self.prompt_len = min_len, eos, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] - self.prompt_len < self.min_len:
            scores = scores.clone()
            scores[:, self.eos] = float("-inf")
        return scores


def lengths(text_len: int) -> tuple[int, int]:
    """(min_len, max_len) of CosyVoice2: 2 and 20 speech tokens per text token."""
    return 2 * text_len, 20 * text_len


def logits_processor(min_len: int, ras: RasConfig | None = RasConfig(), layout: Layout = Layout()) -> list:
    """RAS (None: plain softmax sampling), then the min_len EOS block."""
    return ([RAS(ras)] if ras is not None else []) + [MinLenEos(min_len, layout.eos)]


def as_causal_lm(model, speech_embedding: torch.nn.Embedding, llm_decoder: torch.nn.Linear):
    """A Qwen2 causal LM reading speech tokens through `speech_embedding` and writing logits with `llm_decoder`."""
    hidden = model.config.hidden_size
    if speech_embedding.weight.shape[1] != hidden or llm_decoder.weight.shape[1] != hidden:
        raise ValueError(
            f"speech_embedding {tuple(speech_embedding.weight.shape)} and llm_decoder "
            f"{tuple(llm_decoder.weight.shape)} must have hidden size {hidden}, the model's"
        )
    model.set_input_embeddings(speech_embedding)
    model.set_output_embeddings(llm_decoder)
    model.config.vocab_size = llm_decoder.weight.shape[0]
    model.config.tie_word_embeddings = False
    return model

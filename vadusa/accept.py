"""Acceptance rules: which of a tree node's candidate children the base model accepts.

Every rule comes in two forms that make the same decision from the same uniforms:

    node(probs, children, u)  -> (index, next_token)                 one node (the reference form)
    batch(probs, children, u) -> (index (N,), next_token (N,))        every node of a tree at once

probs     (V,) / (N, V) the base distribution at the node (after logits processors, temperature, top-k)
children  (C,) / (N, C) the node's candidate child tokens in rank order (-1 pads a row of `batch`)
u         (U,) / (N, U) uniforms in [0, 1): the rule's only randomness (`Rule.uniforms` draws them)
index     position in `children` of the accepted child, or -1 when the walk stops here
next_token the token to emit after the node when the walk stops (meaningless when index >= 0)

At a leaf (no children) every rule falls back to its own way of drawing the next token, so the
generation loop needs no special case for the end of the tree. Every draw, here and in the decoding
loops, is an inverse-CDF draw (`inverse_cdf`, `sample`).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checks import ACCEPTANCE_RULES, check_values


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(..., V) probabilities and (..., num) uniforms -> (..., num) tokens: for each u, the first token whose
    cumulative sum exceeds u * total. u * total is kept below the total (it can round up to it), so a token of
    probability 0 is never drawn."""
    cdf = probs.cumsum(-1)  # (..., V)
    total = cdf[..., -1:]  # (..., 1)
    u = torch.minimum(u.to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)  # (..., num)


def sample(probs: torch.Tensor, generator=None, num: int = 1) -> torch.Tensor:
    """(..., V) probabilities -> (..., num) independent draws per row, by inverse CDF: one uniform per draw.

    The distribution of `torch.multinomial(probs, num, replacement=True)`, which draws V exponentials per row
    (measured here: 30 us for one row of 1171 tokens, 170 us for 8 rows; this takes 11 and 16).
    """
    u = torch.rand((*probs.shape[:-1], num), generator=generator, dtype=probs.dtype, device=probs.device)
    return inverse_cdf(probs, u)


def first_hit(hits: torch.Tensor) -> torch.Tensor:
    """(N, C) bool -> (N,) index of the first True per row, -1 where there is none."""
    if hits.shape[-1] == 0:
        return torch.full(hits.shape[:-1], -1, dtype=torch.long, device=hits.device)
    return torch.where(hits.any(-1), hits.int().argmax(-1), -1)


# ----- greedy -----
def greedy(probs: torch.Tensor, children: torch.Tensor, u=None) -> tuple[int, int]:
    """Accept a child iff it is the argmax; otherwise the argmax is the next token."""
    best = int(probs.argmax())
    hits = (children == best).nonzero()
    return (int(hits[0]), best) if len(hits) else (-1, best)


def greedy_batch(probs, children, u=None):
    best = probs.argmax(-1)  # (N,)
    return first_hit(children == best[:, None]), best


# ----- tolerance (VADUSA) -----
def tolerance(probs: torch.Tensor, children: torch.Tensor, u: torch.Tensor) -> tuple[int, int]:
    """VADUSA tolerance sampling: draw tau = len(u) tokens from the base; accept the first child (rank order)
    among them. If no child was drawn, the walk stops and the next token is the first of the tau draws, so
    tau=1 is plain sample-and-match and the fallback token is always an honest sample from the base."""
    draws = inverse_cdf(probs, u)  # (tau,)
    hits = torch.isin(children, draws).nonzero()
    return (int(hits[0]), int(draws[0])) if len(hits) else (-1, int(draws[0]))


def tolerance_batch(probs, children, u):
    draws = inverse_cdf(probs, u)  # (N, tau)
    hits = (children[:, :, None] == draws[:, None, :]).any(-1)  # (N, C); -1 pads never match
    return first_hit(hits), draws[:, 0]


# ----- typical (Medusa-2) -----
TYPICAL_EPSILON, TYPICAL_ALPHA = 0.09, 0.3  # Medusa-2's typical acceptance defaults


def typical_threshold(probs: torch.Tensor, epsilon: float, alpha: float) -> torch.Tensor:
    """(..., V) -> (...,) min(epsilon, alpha * exp(-entropy))."""
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    return torch.clamp(alpha * torch.exp(-entropy), max=epsilon)


def typical(probs, children, u, epsilon: float = TYPICAL_EPSILON, alpha: float = TYPICAL_ALPHA) -> tuple[int, int]:
    """Medusa-2 typical acceptance: accept the first child with p > min(epsilon, alpha * exp(-entropy))."""
    hits = (probs[children] > typical_threshold(probs, epsilon, alpha)).nonzero()
    if len(hits):
        return int(hits[0]), int(children[hits[0]])
    return -1, int(inverse_cdf(probs, u[:1]))


def typical_batch(probs, children, u, epsilon: float = TYPICAL_EPSILON, alpha: float = TYPICAL_ALPHA):
    p = probs.gather(-1, children.clamp(min=0))  # (N, C)
    hits = (p > typical_threshold(probs, epsilon, alpha)[:, None]) & (children >= 0)
    index = first_hit(hits)
    picked = children.gather(-1, index.clamp(min=0)[:, None])[:, 0] if children.shape[1] else index
    return index, torch.where(index >= 0, picked, inverse_cdf(probs, u[:, :1])[:, 0])


# ----- lossless (recursive rejection sampling) -----
def lossless(probs: torch.Tensor, children: torch.Tensor, u: torch.Tensor) -> tuple[int, int]:
    """Recursive rejection sampling over deterministic sibling drafts: the output is distributed exactly as p.

    Child c is accepted with probability r(c), r the residual (initially p); a rejected child is removed
    from r (r(c)=0, renormalised). If every child is rejected the next token is sampled from r. u[i] judges
    child i; the last uniform draws the fallback token.
    """
    residual = probs.clone()
    for i, c in enumerate(children.tolist()):
        if u[i] < residual[c]:
            return i, c
        residual[c] = 0.0
        total = residual.sum()
        if total <= 0:  # every token with mass was a rejected draft: only possible through rounding
            return -1, int(inverse_cdf(probs, u[-1:]))
        residual /= total
    return -1, int(inverse_cdf(residual, u[-1:]))


def lossless_batch(probs, children, u):
    residual = probs.clone()  # (N, V)
    index = torch.full(children.shape[:1], -1, dtype=torch.long, device=probs.device)
    dead = torch.zeros_like(index, dtype=torch.bool)  # every token with mass rejected (rounding)
    rows = torch.arange(len(index), device=probs.device)
    for i in range(children.shape[1]):
        c = children[:, i]
        open_ = (index < 0) & (c >= 0) & ~dead
        accept = open_ & (u[:, i] < residual[rows, c.clamp(min=0)])
        index = torch.where(accept, i, index)
        reject = open_ & ~accept
        residual[rows[reject], c[reject]] = 0.0
        total = residual[reject].sum(-1, keepdim=True)
        dead[rows[reject]] = total[:, 0] <= 0
        residual[rows[reject]] = residual[reject] / total
    fallback = torch.where(dead[:, None], probs, residual)
    token = inverse_cdf(fallback, u[:, -1:])[:, 0]
    picked = children.gather(-1, index.clamp(min=0)[:, None])[:, 0] if children.shape[1] else index
    return index, torch.where(index >= 0, picked, token)


@dataclass(frozen=True)
class Rule:
    """An acceptance rule with its options bound."""

    name: str  # one of ACCEPTANCE_RULES
    num_uniforms: Callable[[int], int]  # uniforms per node, given the most children a node has
    node: Callable  # (probs (V,), children (C,), u (U,)) -> (index, next_token)
    batch: Callable  # (probs (N, V), children (N, C), u (N, U)) -> (index (N,), next_token (N,))

    def uniforms(self, rows: int, max_children: int, generator=None, device=None) -> torch.Tensor:
        """(rows, U) uniforms, drawn once per step for every node (the same ones either form reads)."""
        return torch.rand(rows, self.num_uniforms(max_children), generator=generator, device=device)

    def __call__(self, probs: torch.Tensor, children: torch.Tensor, generator=None) -> tuple[int, int]:
        """The node form with fresh uniforms: rule(probs, children, generator) -> (index, next_token)."""
        return self.node(probs, children, self.uniforms(1, len(children), generator, probs.device)[0])


def get_rule(acceptance: str, tau: int = 3, epsilon: float = TYPICAL_EPSILON, alpha: float = TYPICAL_ALPHA) -> Rule:
    """The rule called `acceptance`, with its options bound."""
    if acceptance == "greedy":
        return Rule("greedy", lambda c: 0, greedy, greedy_batch)
    if acceptance == "tolerance":
        check_values(tolerance=tau)
        return Rule("tolerance", lambda c: tau, tolerance, tolerance_batch)
    if acceptance == "typical":
        return Rule(
            "typical",
            lambda c: 1,
            lambda p, c, u: typical(p, c, u, epsilon, alpha),
            lambda p, c, u: typical_batch(p, c, u, epsilon, alpha),
        )
    if acceptance == "lossless":
        return Rule("lossless", lambda c: c + 1, lossless, lossless_batch)
    raise ValueError(f"unknown acceptance rule {acceptance!r}; expected one of {ACCEPTANCE_RULES}")

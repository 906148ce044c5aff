"""Acceptance rules: which of a tree node's candidate children the base model accepts.

Every rule is a small pure function with the same shape:

    rule(probs, children, generator, **options) -> (index, next_token)

probs     (V,) the base distribution at the node (after logits processors, temperature and top-k)
children  (C,) the node's candidate child tokens in rank order (C may be 0 at a leaf)
index     position in `children` of the accepted child, or -1 when the walk stops here
next_token the token to emit after the node when the walk stops (meaningless when index >= 0)

At a leaf (no children) every rule falls back to its own way of drawing the next token, so the
generation loop needs no special case for the end of the tree.
"""

import math

import torch

ACCEPTANCE_RULES = ("greedy", "tolerance", "typical", "lossless")


def greedy(probs: torch.Tensor, children: torch.Tensor, generator=None) -> tuple[int, int]:
    """Accept a child iff it is the argmax; otherwise the argmax is the next token."""
    best = int(probs.argmax())
    hits = (children == best).nonzero()
    return (int(hits[0]), best) if len(hits) else (-1, best)


def tolerance(probs: torch.Tensor, children: torch.Tensor, generator=None, tau: int = 3) -> tuple[int, int]:
    """VADUSA tolerance sampling: draw tau tokens from the base; accept the first child (rank order) among them.

    If no child was drawn, the walk stops and the next token is the first of the tau draws, so tau=1 is
    plain sample-and-match and the fallback token is always an honest sample from the base.
    """
    draws = torch.multinomial(probs, tau, replacement=True, generator=generator)  # (tau,)
    hits = torch.isin(children, draws).nonzero()
    return (int(hits[0]), int(draws[0])) if len(hits) else (-1, int(draws[0]))


def typical(
    probs: torch.Tensor, children: torch.Tensor, generator=None, epsilon: float = 0.09, alpha: float = 0.3
) -> tuple[int, int]:
    """Medusa-2 typical acceptance: accept the first child with p > min(epsilon, alpha * exp(-entropy))."""
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
    threshold = min(epsilon, alpha * math.exp(-float(entropy)))
    hits = (probs[children] > threshold).nonzero()
    if len(hits):
        return int(hits[0]), int(children[hits[0]])
    return -1, int(torch.multinomial(probs, 1, generator=generator))


def lossless(probs: torch.Tensor, children: torch.Tensor, generator=None) -> tuple[int, int]:
    """Recursive rejection sampling over deterministic sibling drafts: the output is distributed exactly as p.

    Child c is accepted with probability r(c), r the residual (initially p); a rejected child is removed
    from r (r(c)=0, renormalised). If every child is rejected the next token is sampled from r.
    """
    residual = probs.clone()
    uniforms = torch.rand(len(children), generator=generator)  # (C,)
    for i, c in enumerate(children.tolist()):
        if uniforms[i] < residual[c]:
            return i, c
        residual[c] = 0.0
        total = residual.sum()
        if total <= 0:  # every token with mass was a rejected draft: only possible through rounding
            return -1, int(torch.multinomial(probs, 1, generator=generator))
        residual /= total
    return -1, int(torch.multinomial(residual, 1, generator=generator))


def get_rule(acceptance: str, tau: int = 3, epsilon: float = 0.09, alpha: float = 0.3):
    """The rule called `acceptance`, with its options bound: rule(probs, children, generator)."""
    if acceptance == "greedy":
        return greedy
    if acceptance == "tolerance":
        if not isinstance(tau, int) or tau < 1:
            raise ValueError(f"tolerance must be an integer >= 1, got {tau!r}")
        return lambda p, c, g: tolerance(p, c, g, tau=tau)
    if acceptance == "typical":
        return lambda p, c, g: typical(p, c, g, epsilon=epsilon, alpha=alpha)
    if acceptance == "lossless":
        return lossless
    raise ValueError(f"unknown acceptance rule {acceptance!r}; expected one of {ACCEPTANCE_RULES}")

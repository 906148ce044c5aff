"""Generalised Jensen-Shannon divergence between the teacher's and the student's next-token distributions.

With the mixture M = beta * T + (1 - beta) * S (T teacher, S student),

    JSD_beta(T, S) = beta * KL(T || M) + (1 - beta) * KL(S || M)            (TRL's GKD form)

tends to 0 at both ends of beta. In this project beta is the weight of the teacher in the mixture and
the loss is that divergence divided by beta * (1 - beta), which has finite, useful limits:

    beta = 0    KL(T || S)  forward KL: mean-covering, the student spreads mass over all teacher modes
    beta = 1    KL(S || T)  reverse KL: mode-seeking, the student keeps to the teacher's likely tokens
    beta = 1/2  4 * JSD(T, S): symmetric in T and S, bounded by 4 log 2

Both endpoints are supported exactly (and the formula is continuous towards them). Everything is in
log space; zero-probability teacher tokens (a top-k teacher) contribute nothing (0 log 0 = 0).
"""

import math

import torch


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last dim from log-probabilities, with 0 log 0 = 0. (..., V) -> (...)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """(..., V) student and teacher logits -> (...) divergence per position (see the module doc for beta)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    log_s = torch.log_softmax(student_logits.float(), -1)  # (..., V)
    log_t = torch.log_softmax(teacher_logits.float(), -1)  # (..., V)
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]), dim=0)
    jsd = beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    return jsd / (beta * (1.0 - beta))

import pytest
import torch

from vadusa.accept import get_rule, greedy, sample


def outcome_histogram(rule, probs, children, n=40000, seed=0):
    """Empirical distribution of the token that follows the node: the accepted child or the fallback draw."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros_like(probs)
    for _ in range(n):
        j, nxt = rule(probs, children, g)
        counts[int(children[j]) if j >= 0 else nxt] += 1
    return counts / n


PROBS = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])


def test_sample_draws_each_row_from_its_distribution():
    rows = torch.tensor(
        [[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.7, 0.0, 0.0, 0.0, 0.0, 0.3], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]
    )
    draws = sample(rows, torch.Generator().manual_seed(0), num=60000)  # (3, 60000)
    assert draws.shape == (3, 60000) and draws.dtype == torch.long
    for row, drawn in zip(rows, draws, strict=True):
        freq = torch.bincount(drawn, minlength=6) / drawn.numel()
        assert (freq[row == 0] == 0).all()  # never a token of probability 0
        assert (freq - row).abs().max() < 0.01  # 60000 draws: std <= 0.002
    one = sample(rows[0], torch.Generator().manual_seed(1))  # a single (V,) distribution -> (1,)
    assert one.shape == (1,) and rows[0, one] > 0


def test_sample_never_draws_a_zero_probability_token_at_the_extremes(monkeypatch):
    """u = 0 and u rounding up to the total are the two places an inverse CDF can land on a token of mass 0."""
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]])
    for u in (0.0, 1.0, 1 - 2**-24):
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: torch.full(a[0], u))
        assert sample(probs).item() == (1 if u == 0 else 3)


def test_lossless_output_is_distributed_as_the_base():
    children = torch.tensor([3, 2, 0])  # drafts in rank order, deliberately not the most likely tokens
    tv = 0.5 * (outcome_histogram(get_rule("lossless"), PROBS, children) - PROBS).abs().sum()
    assert tv < 0.012  # 5 cells, n=40000: E[TV] ~ 0.006


def test_tolerance_is_lossy_in_the_direction_of_the_drafts():
    children = torch.tensor([3])
    hist = outcome_histogram(get_rule("tolerance", tau=3), PROBS, children)
    assert hist[3] == pytest.approx(1 - (1 - 0.2) ** 3, abs=0.01)  # accepted iff one of 3 draws hits it


def test_greedy_and_typical():
    assert greedy(PROBS, torch.tensor([2, 1]), None) == (1, 1)
    assert greedy(PROBS, torch.tensor([2, 3]), None) == (-1, 1)
    # entropy of PROBS ~1.42 nats: threshold = min(0.09, 0.3 * exp(-1.42)) ~ 0.0725 -> 0.05 rejected, 0.1 accepted
    assert get_rule("typical")(PROBS, torch.tensor([0, 4]), torch.Generator().manual_seed(0))[0] == 1
    j, nxt = get_rule("typical")(PROBS, torch.tensor([0]), torch.Generator().manual_seed(0))
    assert j == -1 and 0 <= nxt < 5


def test_leaf_draws_from_the_base():
    hist = outcome_histogram(get_rule("tolerance", tau=4), PROBS, torch.empty(0, dtype=torch.long), n=20000)
    assert (hist - PROBS).abs().max() < 0.015


def test_unknown_rule_and_bad_tolerance_raise():
    with pytest.raises(ValueError, match="unknown acceptance rule 'fast'"):
        get_rule("fast")
    with pytest.raises(ValueError, match="tolerance must be an integer in \\[1, 1024\\], got 0"):
        get_rule("tolerance", tau=0)

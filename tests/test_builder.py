"""Greedy sparse-tree builder: hand-computed order, expected acceptance vs brute force, size choice."""

import itertools

import pytest

import vadusa
from vadusa.tree import best_trees, choose_tree_size, expected_accept_length, greedy_tree_order, interpolate_cost

ACC = [[0.6, 0.2, 0.1], [0.5, 0.3], [0.4]]  # acc[head][rank], made up by hand

# Worked by hand: each step adds the frontier node (next rank of a node in the tree) of largest product;
# ties (0.1 = 0.1 for [2] and [1, 0]) go to the shallower node.
HAND_ORDER = [
    (0,),  # 0.6
    (0, 0),  # 0.6 * 0.5 = 0.3
    (1,),  # 0.2
    (0, 1),  # 0.6 * 0.3 = 0.18
    (0, 0, 0),  # 0.3 * 0.4 = 0.12
    (2,),  # 0.1 (tie with [1, 0], shallower first)
    (1, 0),  # 0.2 * 0.5 = 0.1
    (0, 1, 0),  # 0.18 * 0.4 = 0.072
    (1, 1),  # 0.2 * 0.3 = 0.06
    (2, 0),  # 0.1 * 0.5 = 0.05
    (1, 0, 0),  # 0.1 * 0.4 = 0.04
    (2, 1),  # 0.1 * 0.3 = 0.03
    (1, 1, 0),  # 0.06 * 0.4 = 0.024
    (2, 0, 0),  # 0.05 * 0.4 = 0.02
    (2, 1, 0),  # 0.03 * 0.4 = 0.012
]


def test_greedy_order_matches_hand_computation():
    assert greedy_tree_order(ACC, 100) == HAND_ORDER  # stops when every allowed node is in
    assert greedy_tree_order(ACC, 5) == HAND_ORDER[:5]
    assert greedy_tree_order(ACC, 100, max_rank=0) == [(0,), (0, 0), (0, 0, 0)]
    assert greedy_tree_order(ACC, 100, max_rank=1) == [p for p in HAND_ORDER if max(p) <= 1]
    assert greedy_tree_order(ACC, 100, max_depth=1) == [(0,), (1,), (2,)]
    trees = best_trees(ACC, 6)
    assert trees[6][0] == HAND_ORDER[:6]
    assert trees[6][1] == pytest.approx(0.6 + 0.3 + 0.2 + 0.18 + 0.12 + 0.1)


def walk_brute_force(paths, acc) -> float:
    """E[accepted nodes] by enumerating every outcome: at each depth, rank r accepted w.p. acc[d][r], else none."""
    tree = set(map(tuple, paths))
    choices = [list(range(len(row))) + [None] for row in acc]
    total = 0.0
    for outcome in itertools.product(*choices):
        prob, path, length = 1.0, (), 0
        for depth, r in enumerate(outcome):
            prob *= (1 - sum(acc[depth])) if r is None else acc[depth][r]
        for r in outcome:
            if r is None or path + (r,) not in tree:
                break
            path, length = path + (r,), length + 1
        total += prob * length
    return total


@pytest.mark.parametrize("n", [1, 4, 9, 15])
def test_expected_acceptance_matches_enumeration(n):
    paths = HAND_ORDER[:n]
    assert expected_accept_length(paths, ACC) == pytest.approx(walk_brute_force(paths, ACC), abs=1e-12)
    medusa_like = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    assert expected_accept_length(medusa_like, ACC) == pytest.approx(walk_brute_force(medusa_like, ACC), abs=1e-12)


def closed_trees(size: int):
    """Every tree of `size` nodes from HAND_ORDER's node set with parents present and contiguous sibling ranks."""
    for subset in itertools.combinations(HAND_ORDER, size):
        s = set(subset)
        if all((len(p) == 1 or p[:-1] in s) and (p[-1] == 0 or p[:-1] + (p[-1] - 1,) in s) for p in s):
            yield subset


@pytest.mark.parametrize("size", [3, 5, 7])
def test_greedy_tree_is_the_best_tree_of_its_size(size):
    best = max(expected_accept_length(t, ACC) for t in closed_trees(size))
    assert best_trees(ACC, size)[size][1] == pytest.approx(best)


def test_choose_size_maximises_expected_tokens_per_second():
    trees = best_trees(ACC, 15)
    costs = {1: 1.0, 4: 1.2, 16: 2.0}  # seconds per pass of n nodes (root included)
    assert interpolate_cost(costs, 3) == pytest.approx(1.0 + 0.2 * 2 / 3)
    assert interpolate_cost(costs, 10) == pytest.approx(1.6)
    assert interpolate_cost(costs, 20) == pytest.approx(2.0 + 0.8 * 4 / 12)  # extrapolated
    size, rows = choose_tree_size(trees, costs)
    by_hand = {n: (1 + trees[n][1]) / interpolate_cost(costs, n + 1) for n in trees}
    assert size == max(by_hand, key=by_hand.get)
    assert [r["tokens_per_second"] for r in rows] == pytest.approx([by_hand[n] for n in sorted(by_hand)])
    flat = {1: 1.0, 64: 1.0}  # free verification: the biggest tree wins
    assert choose_tree_size(trees, flat)[0] == 15
    steep = {1: 1.0, 2: 10.0}  # verification is ruinous: the smallest tree wins
    assert choose_tree_size(trees, steep)[0] == 1


def test_bad_tables_raise():
    with pytest.raises(ValueError, match="outside"):
        greedy_tree_order([[1.5]], 3)
    with pytest.raises(ValueError, match=">= 1 head"):
        greedy_tree_order([], 3)
    with pytest.raises(ValueError, match="max_rank"):
        greedy_tree_order(ACC, 3, max_rank=-1)


def test_built_tree_is_a_valid_tree_and_draws(tmp_path):
    from vadusa.tree import draw_tree

    tree = vadusa.Tree.from_paths(HAND_ORDER, meta={"rule": "hand"})
    assert len(tree) == 16 and tree.depth == 3
    draw_tree(tree, tmp_path / "t.png", ACC)
    assert (tmp_path / "t.png").stat().st_size > 1000

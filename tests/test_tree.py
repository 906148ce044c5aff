import pytest
import torch

from vadusa import Tree


def brute_force_ancestors(paths):
    """mask[i, j] iff path j is a prefix of path i (the root, path (), is a prefix of everything)."""
    nodes = [()] + [tuple(p) for p in paths]
    return torch.tensor([[a == b[: len(a)] for a in nodes] for b in nodes])


def test_medusa_63_buffers(medusa_tree):
    t = medusa_tree
    assert len(t) == 64 and t.depth == 4 and t.max_rank == 9
    assert torch.equal(t.ancestor_mask, brute_force_ancestors(t.paths))
    # parents, depths and (head, rank) agree with the paths
    for i, p in enumerate(t.paths, start=1):
        assert t.paths[int(t.parents[i]) - 1] == p[:-1] if len(p) > 1 else int(t.parents[i]) == 0
        assert int(t.depths[i]) == len(p)
        assert t.heads_and_ranks[i - 1].tolist() == [len(p) - 1, p[-1]]
    # parents come before children, so one forward can be built in node order
    assert all(int(t.parents[i]) < i for i in range(1, len(t)))
    # every root-to-leaf path is a chain of parent links
    for path in t.leaf_paths:
        assert path[0] == 0 and all(int(t.parents[b]) == a for a, b in zip(path, path[1:], strict=False))
    assert sum(len(c) for c in t.children) == 63
    bias = t.attention_bias(torch.float32)
    assert bias[t.ancestor_mask].eq(0).all() and bias[~t.ancestor_mask].eq(torch.finfo(torch.float32).min).all()


def test_children_in_rank_order():
    t = Tree.from_paths([[2], [0], [1], [0, 3], [0, 1]])
    kids = [t.paths[i - 1][-1] for i in t.children[0].tolist()]
    assert kids == [0, 1, 2]
    assert [t.paths[i - 1] for i in t.children[t.paths.index((0,)) + 1].tolist()] == [(0, 1), (0, 3)]


def test_chain_json_networkx_roundtrip(tmp_path):
    t = Tree.chain(3)
    assert t.paths == ((0,), (0, 0), (0, 0, 0)) and len(t) == 4
    t.to_json(tmp_path / "t.json")
    assert Tree.from_json(tmp_path / "t.json").paths == t.paths
    g = t.to_networkx()
    assert sorted(g.edges) == [(0, 1), (1, 2), (2, 3)] and g.nodes[3]["rank"] == 0


@pytest.mark.parametrize(
    "paths, message",
    [
        ([], "empty"),
        ([[0], [1, 0, 0]], "prefix"),
        ([[0], [0]], "duplicate"),
        ([[0], [-1]], "non-negative"),
        ([[]], "root is implicit"),
    ],
)
def test_invalid_trees_raise(paths, message):
    with pytest.raises(ValueError, match=message):
        Tree.from_paths(paths)


def test_tree_deeper_than_heads_raises():
    with pytest.raises(ValueError, match="depth 5 exceeds the number of draft heads \\(4\\)"):
        Tree.chain(5).validate_for(4)


def test_bad_tree_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tree.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tree.from_json(tmp_path / "bad.json")


def all_trees(nodes: int, depth: int, ranks: int):
    """Every valid tree of exactly `nodes` nodes (brute force): prefix-closed, ranks contiguous."""
    trees = set()

    def grow(tree: frozenset):
        if len(tree) == nodes:
            trees.add(tree)
            return
        for node in [()] + list(tree):
            rank = sum(1 for p in tree if len(p) == len(node) + 1 and p[:-1] == node)
            child = node + (rank,)
            if len(child) <= depth and rank < ranks:
                grow(tree | {child})

    grow(frozenset())
    return trees


def test_optimal_tree_is_the_brute_force_optimum_and_bounds_greedy():
    from vadusa.tree import best_trees, expected_accept_length, optimal_tree

    g = torch.Generator().manual_seed(0)
    gaps = []
    for trial in range(6):
        acc = (torch.rand(3, 3, generator=g) * 0.6).tolist()  # ranks deliberately not sorted by value
        for n in range(1, 7):
            brute = max(expected_accept_length(t, acc) for t in all_trees(n, 3, 3))
            paths, value = optimal_tree(acc, n)
            assert len(paths) == n and abs(expected_accept_length(paths, acc) - value) < 1e-12
            assert abs(value - brute) < 1e-12, (trial, n)
            greedy = best_trees(acc, n)[n][1]
            assert greedy <= value + 1e-12
            gaps.append(value - greedy)
    assert max(gaps) > 0.01  # with ranks out of order the greedy builder does fall short: the check has teeth

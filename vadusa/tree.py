"""Candidate trees as data: Medusa-style paths of top-k ranks, turned once into the buffers a step needs.

Path [0, 2] is the node reached by head 1's best token followed by head 2's third-best token.
Node 0 is the root (the token already sampled from the base); nodes 1..N are the paths sorted by
(depth, path), so a parent always comes before its children.
"""

import json
import os
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path

import torch

from .artifacts import read_json

MAX_RANK = 2**31 - 1  # a rank is a top-k index into a vocabulary: it fits the int32 / int64 buffers


def as_paths(paths) -> list[tuple[int, ...]]:
    """`paths` (a list of rank lists) as tuples, or a TypeError saying what was expected."""
    if not isinstance(paths, list | tuple):
        raise TypeError(f"tree paths must be a list of rank lists such as [[0], [0, 1]], got {type(paths).__name__}")
    for p in paths:
        if not isinstance(p, list | tuple):
            raise TypeError(f"tree path {p!r} is a {type(p).__name__}, expected a list of ranks such as [0, 1]")
    return [tuple(p) for p in paths]


def _validate(paths: list[tuple[int, ...]]) -> None:
    if not paths:
        raise ValueError("a tree needs at least one path, got an empty list")
    seen = set()
    for p in paths:
        if len(p) == 0:
            raise ValueError("empty path [] in tree: the root is implicit, list only paths of length >= 1")
        if any(type(r) is not int or not 0 <= r <= MAX_RANK for r in p):  # type(): bools are not ranks
            raise ValueError(f"path {list(p)} has a rank that is not a non-negative integer <= {MAX_RANK}")
        if p in seen:
            raise ValueError(f"duplicate path {list(p)} in tree")
        seen.add(p)
    for p in paths:
        if len(p) > 1 and p[:-1] not in seen:
            raise ValueError(f"path {list(p)} has no parent: its prefix {list(p[:-1])} is missing from the tree")


@dataclass(frozen=True, eq=False)
class Tree:
    """A sparse candidate tree. Build with `from_paths`, `chain`, `from_json`; buffers are cached properties."""

    paths: tuple[tuple[int, ...], ...]  # sorted by (depth, path); node i+1 is paths[i]
    meta: dict = field(default_factory=dict)  # free-form provenance (builder, rule, expected length...)

    @classmethod
    def from_paths(cls, paths, meta: dict | None = None) -> "Tree":
        paths = as_paths(paths)
        _validate(paths)
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"tree meta must be a dict or None, got {type(meta).__name__}")
        return cls(tuple(sorted(paths, key=lambda p: (len(p), p))), dict(meta or {}))

    @classmethod
    def chain(cls, depth: int) -> "Tree":
        """The top-1 chain of `depth` nodes (plain Medusa-1 style speculation)."""
        if depth < 1:
            raise ValueError(f"chain depth must be >= 1, got {depth}")
        return cls.from_paths([[0] * d for d in range(1, depth + 1)], meta={"name": f"chain-{depth}"})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Tree":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tree file {path} does not exist")
        data = read_json(path)
        if isinstance(data, list):  # a bare list of paths, as Medusa ships them
            data = {"paths": data}
        if not isinstance(data, dict) or "paths" not in data:
            raise ValueError(f"tree file {path} must hold {{'paths': [...], 'meta': {{...}}}}")
        try:
            return cls.from_paths(data["paths"], data.get("meta"))
        except (ValueError, TypeError) as e:  # the file's paths are not a list of rank lists
            raise ValueError(f"tree file {path}: {e}") from e

    def to_json(self, path: str | os.PathLike) -> None:
        """Write {"paths": [...], "meta": {...}} atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"paths": [list(p) for p in self.paths], "meta": self.meta}))
        os.replace(tmp, path)

    def __len__(self) -> int:
        """Number of nodes including the root."""
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    @property
    def max_rank(self) -> int:
        return max(max(p) for p in self.paths)

    def validate_for(self, num_heads: int, vocab_size: int | None = None) -> None:
        """Raise if draft heads of `num_heads` heads over `vocab_size` tokens cannot fill this tree."""
        if self.depth > num_heads:
            raise ValueError(f"tree depth {self.depth} exceeds the number of draft heads ({num_heads})")
        if vocab_size is not None and self.max_rank >= vocab_size:
            raise ValueError(
                f"tree rank {self.max_rank} needs a top-{self.max_rank + 1} of the heads' vocabulary of {vocab_size}"
            )

    # ----- buffers (built once per tree) -----
    def memo(self, key, build):
        """build() once per tree and key, then the same object: what a decoder derives from a tree (its drafting
        plan, its walk buffers) is built on the first call, not on every one. The result must not be mutated."""
        store = self.__dict__.setdefault("_memo", {})
        if key not in store:
            store[key] = build()
        return store[key]

    @cached_property
    def _index(self) -> dict[tuple[int, ...], int]:
        return {(): 0} | {p: i + 1 for i, p in enumerate(self.paths)}

    @cached_property
    def parents(self) -> torch.Tensor:
        """(N+1,) parent node of each node; -1 for the root."""
        return torch.tensor([-1] + [self._index[p[:-1]] for p in self.paths])

    @cached_property
    def depths(self) -> torch.Tensor:
        """(N+1,) depth of each node; the root has depth 0."""
        return torch.tensor([0] + [len(p) for p in self.paths])

    @cached_property
    def heads_and_ranks(self) -> torch.Tensor:
        """(N, 2) for nodes 1..N: the draft head (0-based: depth-1) and the top-k rank that fills it."""
        return torch.tensor([[len(p) - 1, p[-1]] for p in self.paths], dtype=torch.long).reshape(-1, 2)

    @cached_property
    def ancestor_mask(self) -> torch.Tensor:
        """(N+1, N+1) bool: mask[i, j] is True iff node j is node i or one of its ancestors (root included)."""
        n = len(self)
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):  # parents come first, so a parent's row is complete before its children's
            mask[i] |= mask[int(self.parents[i])]
        return mask

    @cached_property
    def children(self) -> list[torch.Tensor]:
        """children[i]: (C_i,) node ids of node i's children in rank order."""
        kids: list[list[tuple[int, int]]] = [[] for _ in range(len(self))]
        for p in self.paths:
            kids[self._index[p[:-1]]].append((p[-1], self._index[p]))
        return [torch.tensor([node for _, node in sorted(k)], dtype=torch.long) for k in kids]

    @cached_property
    def leaf_paths(self) -> list[list[int]]:
        """Node ids along every root-to-leaf path (root included): how an accepted path is read back."""
        leaves = [i for i, k in enumerate(self.children) if len(k) == 0]
        return [self.ancestor_mask[leaf].nonzero().flatten().tolist() for leaf in leaves]

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """(N+1, N+1) additive float mask: 0 where a node may attend (its ancestors and itself), dtype-min elsewhere."""
        bias = torch.full((len(self), len(self)), torch.finfo(dtype).min, dtype=dtype)
        return bias.masked_fill(self.ancestor_mask, 0.0)

    def to_networkx(self):
        """A networkx DiGraph: nodes 0..N with attributes path, depth, head, rank; edges parent -> child."""
        import networkx as nx

        g = nx.DiGraph()
        g.add_node(0, path=(), depth=0, head=None, rank=None)
        for i, p in enumerate(self.paths, start=1):
            g.add_node(i, path=p, depth=len(p), head=len(p) - 1, rank=p[-1])
            g.add_edge(self._index[p[:-1]], i)
        return g


# ----- greedy sparse-tree builder (pure functions over an accuracy table acc[h][r]) -----
def path_value(path, acc) -> float:
    """Probability that the node `path` is accepted: the product of acc[depth][rank] along the path."""
    value = 1.0
    for depth, rank in enumerate(path):
        value *= acc[depth][rank]
    return value


def expected_accept_length(paths, acc) -> float:
    """Expected number of tree nodes accepted per step (the root excluded): sum of path values.

    Exact when acceptances at different depths are independent, each depth's ranks are exclusive
    events (sum_r acc[h][r] <= 1, as `vadusa.accuracy` measures them) and every node's lower-ranked
    siblings are in the tree. Tokens per step = 1 + this (the token drawn where the walk stops).
    """
    return sum(path_value(p, acc) for p in paths)


def check_accuracy_table(acc, max_rank: int | None = None) -> None:
    if not acc or any(len(row) == 0 for row in acc):
        raise ValueError("accuracy table must have >= 1 head with >= 1 rank each")
    for h, row in enumerate(acc):
        if any(not 0.0 <= a <= 1.0 for a in row):
            raise ValueError(f"accuracy table row {h} has values outside [0, 1]: {row}")
    if max_rank is not None and max_rank < 0:
        raise ValueError(f"max_rank must be >= 0, got {max_rank}")


def greedy_tree_order(acc, max_nodes: int, max_rank: int | None = None, max_depth: int | None = None) -> list:
    """Paths in the order the greedy builder adds them: each time the candidate node of largest value.

    Candidates are the next-ranked child of every node already in the tree (so ranks stay contiguous),
    with depth <= max_depth (default: the number of heads in `acc`) and rank <= max_rank (default: the
    ranks measured). A node is never worth more than its parent, so the first n paths are the best tree
    of n nodes under `expected_accept_length` (Medusa's argument). Ties go to the shallower, lower path.
    """
    import networkx as nx

    check_accuracy_table(acc, max_rank)
    depth_limit = len(acc) if max_depth is None else min(max_depth, len(acc))
    g = nx.DiGraph()
    g.add_node((), value=1.0)
    order = []
    while len(order) < max_nodes:
        best = None
        for node in g.nodes:
            depth, rank = len(node), g.out_degree(node)  # the node's next child rank
            limit = len(acc[depth]) - 1 if depth < depth_limit else -1
            if max_rank is not None:
                limit = min(limit, max_rank)
            if rank > limit:
                continue
            child = node + (rank,)
            value = g.nodes[node]["value"] * acc[depth][rank]
            key = (-value, len(child), child)
            if best is None or key < best[0]:
                best = (key, node, child, value)
        if best is None:  # every allowed node is in the tree
            break
        _, parent, child, value = best
        g.add_node(child, value=value)
        g.add_edge(parent, child)
        order.append(child)
    return order


def best_trees(acc, max_nodes: int, max_rank: int | None = None, max_depth: int | None = None) -> dict:
    """{n: (paths, expected accepted length)} for the best tree of every size n = 1..max_nodes (non-root nodes)."""
    order = greedy_tree_order(acc, max_nodes, max_rank, max_depth)
    trees, total = {}, 0.0
    for n, p in enumerate(order, start=1):
        total += path_value(p, acc)
        trees[n] = (order[:n], total)
    return trees


def optimal_tree(acc, nodes: int, max_rank: int | None = None, max_depth: int | None = None):
    """(paths, expected accepted length) of the best tree of exactly `nodes` nodes under
    `expected_accept_length`, by exact dynamic programming over every valid tree (ranks contiguous under
    each node, depth <= max_depth, rank <= max_rank): the optimum the greedy builder is checked against.

    best(d, r, k) = the largest value of the children of rank >= r of a depth-d node, using exactly k nodes:
    stop (k = 0), or take rank r with a subtree of j nodes, acc[d][r] * (1 + best(d+1, 0, j-1)), and go on.
    """

    check_accuracy_table(acc, max_rank)
    depth_limit = len(acc) if max_depth is None else min(max_depth, len(acc))
    ranks = [len(row) if max_rank is None else min(len(row), max_rank + 1) for row in acc]

    @cache
    def best(d: int, r: int, k: int) -> tuple[float, tuple]:
        if k == 0:
            return 0.0, ()
        if d >= depth_limit or r >= ranks[d]:
            return float("-inf"), ()
        top = (float("-inf"), ())
        for j in range(1, k + 1):  # rank r takes itself and j - 1 descendants
            below, sub = best(d + 1, 0, j - 1)
            rest, others = best(d, r + 1, k - j)
            value = acc[d][r] * (1.0 + below) + rest
            if value > top[0]:
                top = (value, (((r,), sub),) + others)
        return top

    value, forest = best(0, 0, nodes)
    if value == float("-inf"):
        raise ValueError(f"no valid tree of {nodes} nodes within depth {depth_limit} and the ranks measured")

    def paths(prefix, forest):
        for (rank,), sub in forest:
            yield prefix + (rank,)
            yield from paths(prefix + (rank,), sub)

    return sorted(paths((), forest), key=lambda p: (len(p), p)), value


def interpolate_cost(seconds: dict, nodes: int) -> float:
    """Cost of a pass over `nodes` nodes from measured {nodes: seconds}, linear between measured sizes."""
    sizes = sorted(int(n) for n in seconds)
    table = {int(n): float(s) for n, s in seconds.items()}
    if nodes <= sizes[0]:
        return table[sizes[0]]
    if nodes >= sizes[-1]:
        if len(sizes) == 1:
            return table[sizes[-1]]
        a, b = sizes[-2], sizes[-1]  # extrapolate along the last segment
        return table[b] + (table[b] - table[a]) * (nodes - b) / (b - a)
    for a, b in zip(sizes, sizes[1:], strict=False):
        if a <= nodes <= b:
            return table[a] + (table[b] - table[a]) * (nodes - a) / (b - a)
    raise AssertionError("unreachable")


def choose_tree_size(trees: dict, seconds: dict, overhead: float = 0.0) -> tuple[int, list[dict]]:
    """The size maximising expected tokens/s = (1 + expected accepted) / (cost of n+1 nodes + overhead).

    trees: `best_trees` output; seconds: measured {nodes incl. root: seconds per verification pass}
    (`vadusa.cost.step_costs(...)["seconds"]`); overhead: per-step seconds outside the pass (heads).
    Returns (best size, one row per size).
    """
    if not trees:
        raise ValueError("no trees to choose from")
    rows = []
    for n, (_, expected) in sorted(trees.items()):
        cost = interpolate_cost(seconds, n + 1) + overhead
        rows.append(
            {"size": n, "expected_accepted": expected, "seconds": cost, "tokens_per_second": (1 + expected) / cost}
        )
    best = max(rows, key=lambda r: r["tokens_per_second"])
    return best["size"], rows


def draw_tree(tree: Tree, path, acc=None, title: str = "") -> None:
    """PNG drawing of a tree: one row per depth, nodes labelled by rank (and acceptance value with acc)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    g = tree.to_networkx()
    x, pos = [0], {}

    def place(node, depth):  # leaves left to right, parents centred over their children
        kids = sorted(g.successors(node), key=lambda c: g.nodes[c]["rank"])
        if not kids:
            pos[node] = (x[0], -depth)
            x[0] += 1
        else:
            for c in kids:
                place(c, depth + 1)
            pos[node] = (sum(pos[c][0] for c in kids) / len(kids), -depth)

    place(0, 0)
    labels = {0: "root"}
    for i, p in enumerate(tree.paths, start=1):
        labels[i] = f"{p[-1]}" + (f"\n{path_value(p, acc):.2f}" if acc is not None else "")
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * x[0]), 1.6 * (tree.depth + 1)))
    nx.draw_networkx(g, pos, ax=ax, labels=labels, node_size=420, font_size=6, node_color="#cfe3f7", arrows=False)
    ax.set_title(title or f"{len(tree.paths)}-node tree (label: rank / P(accepted))", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)

"""Candidate trees as data: Medusa-style paths of top-k ranks, turned once into the buffers a step needs.

Path [0, 2] is the node reached by head 1's best token followed by head 2's third-best token.
Node 0 is the root (the token already sampled from the base); nodes 1..N are the paths sorted by
(depth, path), so a parent always comes before its children.
"""

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch


def _validate(paths: list[tuple[int, ...]]) -> None:
    if not paths:
        raise ValueError("a tree needs at least one path, got an empty list")
    seen = set()
    for p in paths:
        if len(p) == 0:
            raise ValueError("empty path [] in tree: the root is implicit, list only paths of length >= 1")
        if any((not isinstance(r, int)) or r < 0 for r in p):
            raise ValueError(f"path {list(p)} has a rank that is not a non-negative integer")
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
        paths = [tuple(p) for p in paths]
        _validate(paths)
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
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"tree file {path} is not valid JSON: {e}") from e
        if isinstance(data, list):  # a bare list of paths, as Medusa ships them
            data = {"paths": data}
        if not isinstance(data, dict) or "paths" not in data:
            raise ValueError(f"tree file {path} must hold {{'paths': [...], 'meta': {{...}}}}")
        return cls.from_paths(data["paths"], data.get("meta"))

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

    def validate_for(self, num_heads: int) -> None:
        if self.depth > num_heads:
            raise ValueError(f"tree depth {self.depth} exceeds the number of draft heads ({num_heads})")

    # ----- buffers (built once per tree) -----
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

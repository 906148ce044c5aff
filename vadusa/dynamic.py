"""Dynamic trees (EAGLE-2): the feature drafter grows each step's tree by its own cumulative confidence.

A static tree fixes once per model which ranks are drafted at which depth. A dynamic tree decides per
step: at every depth the `width` most probable nodes of that depth (probability = the product of the
drafter's probabilities along the node's path) are expanded, each into its top-`width` children, in one
drafter call per depth; after `depth` depths the `nodes` most probable of all drafted nodes are verified.
A node is never more probable than its parent (ties go to the shallower node), so the chosen nodes form
a tree. Its masks and walk buffers are rebuilt every step, from the parents.

    generate(model, drafter, ids, tree=DynamicTree(nodes=10, width=3))
    build_decoder("vadusa", model, assets=demo, dynamic_nodes=10, dynamic_width=3)
"""

from dataclasses import dataclass

import torch

from .checks import check_values

MAX_NODES, MAX_WIDTH = 256, 16  # bounds of a dynamic tree's size and width


@dataclass(frozen=True)
class DynamicTree:
    nodes: int = 10  # nodes verified per step (root excluded)
    width: int = 3  # nodes expanded per depth, and children drafted per expanded node
    depth: int = 0  # depths drafted (0: the drafter's own depth)

    def __post_init__(self):
        for name, value, low, high in (("nodes", self.nodes, 1, MAX_NODES), ("width", self.width, 1, MAX_WIDTH),
                                       ("depth", self.depth, 0, MAX_NODES)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"dynamic tree {name} must be an integer in [{low}, {high}], got {value!r}")

    def __len__(self) -> int:
        return self.nodes + 1  # nodes verified per step, root included

    def depth_for(self, max_depth: int) -> int:
        return self.depth or max_depth

    def validate_for(self, max_depth: int, vocab_size: int | None = None) -> None:
        """Raise if the tree drafts deeper than the drafter was trained for, or wider than the vocabulary."""
        if self.depth > max_depth:
            raise ValueError(f"dynamic tree depth {self.depth} exceeds the drafter's depth {max_depth}")
        depth = self.depth_for(max_depth)
        drafted = self.width + (depth - 1) * self.width**2  # width children of the root, then width x width a depth
        if self.nodes > drafted:
            raise ValueError(
                f"a dynamic tree of width {self.width} and depth {depth} drafts {drafted} nodes, fewer than the "
                f"{self.nodes} to verify: widen or deepen it, or verify fewer"
            )
        if vocab_size is not None and self.width > vocab_size:
            raise ValueError(f"dynamic tree width {self.width} exceeds the vocabulary size {vocab_size}")


def check_drafter(tree: DynamicTree, heads) -> None:
    """Raise unless `heads` is a feature drafter that `tree` fits (depth, width, nodes)."""
    from .drafter import FeatureDrafter

    if not isinstance(heads, FeatureDrafter):
        raise ValueError("dynamic trees need a feature drafter (kind 'feature'); these are independent draft heads")
    tree.validate_for(heads.max_depth, heads.config.vocab_size)


def dynamic_tree(nodes: int, width: int = 3) -> DynamicTree | None:
    """The decoder options' DynamicTree (None when nodes is 0: the static tree)."""
    check_values(dynamic_nodes=nodes, dynamic_width=width)
    return DynamicTree(nodes, width) if nodes else None


@torch.no_grad()
def draft(session, spec: DynamicTree, depth: int, root, root_feat, history, processor):
    """Grow this step's tree -> (tokens (n,), parents [n], depths [n]), n = spec.nodes + 1, node 0 the root,
    nodes in breadth-first order, siblings most probable first (the rank order the rules read)."""
    k, w = spec.width, session.w
    tok, score, parent = [root.view(1)], [torch.zeros(1, dtype=torch.float64)], [torch.tensor([-1])]
    level = [torch.zeros(1, dtype=torch.long)]  # depth of every drafted node
    feats = root_feat[None]  # (m, D): outputs of the rows expanded at the depth above (the root first)
    above_score = score[0]  # (m,) their path log-probabilities
    above_id = torch.zeros(1, dtype=torch.long)  # (m,) their ids among the drafted nodes
    above_row = torch.full((1,), -1)  # (m,) their scratch rows (-1: the root, a committed row)
    ancestors = torch.zeros(0, 0, dtype=torch.bool)  # (rows, rows): scratch rows each scratch row sees
    drafted = 1
    for d in range(1, depth + 1):
        logits = session.depth_logits(feats, d, history, processor)  # (m, V)
        top = torch.topk(torch.log_softmax(logits.float(), -1), min(k, logits.shape[-1]), dim=-1)  # (m, k)
        paths = (above_score[:, None] + top.values.double()).flatten()  # (m * k,) path log-probabilities
        tok.append(top.indices.flatten())
        score.append(paths)
        parent.append(above_id.repeat_interleave(top.indices.shape[1]))
        level.append(torch.full((paths.shape[0],), d))
        ids = torch.arange(drafted, drafted + paths.shape[0])
        drafted += paths.shape[0]
        if d == depth:
            break
        best = torch.topk(paths, min(k, paths.shape[0])).indices  # (e,) the nodes expanded at depth d
        from_row = best // top.indices.shape[1]  # (e,) their parents among the rows above
        rows_above = above_row[from_row]  # (e,) the parents' scratch rows
        e, start = best.shape[0], ancestors.shape[0]
        grown = torch.zeros(start + e, start + e, dtype=torch.bool)
        grown[:start, :start] = ancestors
        has_row = rows_above >= 0
        grown[start + has_row.nonzero().flatten(), :start] = ancestors[rows_above[has_row]]
        grown[torch.arange(start, start + e), torch.arange(start, start + e)] = True
        ancestors = grown
        bias = torch.zeros(e, start + e, dtype=w.out_t.dtype).masked_fill_(
            ~ancestors[start:], torch.finfo(w.out_t.dtype).min
        )
        feats = session.rows(tok[-1][best], feats[from_row], session.length - 1 + d, True, session.length + start, bias)
        above_score, above_id, above_row = paths[best], ids[best], torch.arange(start, start + e)
    return choose(torch.cat(tok), torch.cat(score), torch.cat(parent), torch.cat(level), spec.nodes)


def choose(tokens, scores, parents, depths, nodes: int):
    """The `nodes` most probable drafted nodes and the root -> (tokens (n,), parents [n], depths [n]) in
    breadth-first order, siblings most probable first (`validate_for` ensures at least `nodes` were drafted)."""
    key = scores - 1e-9 * depths  # a child never outranks its parent, even at probability 1
    keep = (torch.topk(key[1:], min(nodes, key.shape[0] - 1)).indices + 1).tolist()
    depth_list, key_list, parent_list = depths.tolist(), key.tolist(), parents.tolist()
    order = sorted(keep, key=lambda i: (depth_list[i], -key_list[i]))
    new = {0: 0} | {old: j for j, old in enumerate(order, start=1)}
    return (
        tokens[[0] + order],
        [-1] + [new[parent_list[i]] for i in order],
        [0] + [depth_list[i] for i in order],
    )


def buffers(parents: list[int], depths: list[int], width: int, dtype, device):
    """(tree bias (n, n), depths (n,), WalkBuffers) of a tree given by its parents, as `generate` reads them.
    Built from Python lists with one tensor per buffer: it runs every step."""
    from .generate import WalkBuffers

    n, top, low = len(parents), max(depths), torch.finfo(dtype).min
    ancestors = [[0]]  # node ids from the root down to the node itself
    children = [[] for _ in range(n)]
    for i in range(1, n):
        ancestors.append(ancestors[parents[i]] + [i])
        children[parents[i]].append(i)
    seen = [set(a) for a in ancestors]
    bias = torch.tensor([[0.0 if j in a else low for j in range(n)] for a in seen], dtype=dtype)  # (n, n)
    child_index = torch.tensor([c + [-1] * (width - len(c)) for c in children], dtype=torch.long)
    at_depth = torch.tensor([a[1:] + [0] * (max(top, 1) - len(a) + 1) for a in ancestors], dtype=torch.long)
    by_depth = [torch.tensor([i for i in range(n) if depths[i] == j], dtype=torch.long) for j in range(top + 1)]
    walk = WalkBuffers(children, child_index.to(device), [b.to(device) for b in by_depth], at_depth.to(device))
    return bias.to(device), torch.tensor(depths, device=device), walk

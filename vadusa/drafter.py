"""A feature drafter (EAGLE-style): one small transformer layer that drafts over the base's own features.

Draft heads (`vadusa.heads`) guess every depth of the tree from one hidden state, blind to the
candidate chosen above them. The feature drafter is sequential: a row reads a token and the feature
that came before it, attends over the rows of the whole prefix (the phonemes included) through its
own KV cache, and predicts the next feature; the base's own output layer turns that feature into
the next token's logits. Deeper rows read the drafter's own predicted features.

    row j input   [E(x_{j+1}) ; f_j]   E the base's input embedding, f_j the base's last hidden state
                                       at position j (it predicted x_{j+1}); deeper rows: f^_j instead
    row j output  f^_{j+1}             -> logits = base output layer (f^_{j+1}) for x_{j+2}

Decoding, one step (`DraftSession`): the rows of the tokens accepted last step are committed with
their true features (one call; its last row, the root's, gives depth 1's logits), then one call per
tree depth over that depth's inner nodes, each attending to the committed rows and its own
ancestors. The drafter stores no embedding or output layer: it shares the base's, so its artifact is
small and no extra output weights are read per step.

Training (`unrolled_logits`, used by `vadusa.train.train_drafter`) unrolls the same recursion on the
base's cached samples ("training-time test", EAGLE-3): step s feeds the drafter's own step s-1
features, and a step-s row attends to the true rows before it and to its own chain, exactly the
attention a depth-s tree node has at decoding time. Tokens along the chain are the sampled ones: a
node's children only matter once the node was accepted, i.e. once its token is one the base emits.
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .heads import CONFIG_NAME, WEIGHTS_NAME, model_dims

KIND = "feature"  # config.json "kind" of a feature drafter (draft heads have none)


@dataclass
class DrafterConfig:
    hidden_size: int = 0  # D: the base's hidden size (features in and out)
    vocab_size: int = 0  # V: the base's vocabulary (embedding and output layer are the base's own)
    num_attention_heads: int = 4  # attention heads of the draft layer
    intermediate_size: int = 0  # gated-MLP width (0: 2 * hidden_size)
    depth: int = 6  # unrolled steps trained: the deepest tree it drafts
    rope_theta: float = 10000.0  # rotary base of the draft layer's attention
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    base_model: str = ""  # name or path of the base model it was trained for ("" = unknown)
    base_fingerprint: str = ""  # sha256 prefix of the base's output layer: refuses another base of equal shape
    kind: str = KIND  # artifact kind, read by `load_drafter`

    def __post_init__(self):
        if self.intermediate_size == 0:
            self.intermediate_size = 2 * self.hidden_size
        if self.kind != KIND:
            raise ValueError(f"a feature drafter config needs kind={KIND!r}, got {self.kind!r}")
        if self.depth < 1 or self.num_attention_heads < 1:
            raise ValueError(
                f"need depth >= 1 and num_attention_heads >= 1, got {self.depth}, {self.num_attention_heads}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")


def base_fingerprint(model) -> str:
    """sha256 prefix of the base's output layer (what the drafter's features are read through)."""
    import hashlib

    w = model.get_output_embeddings().weight.detach().float().cpu().contiguous()
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (half-split convention) of (..., T, dh) with (T, dh) cos / sin."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


class FeatureDrafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        d, i = config.hidden_size, config.intermediate_size
        self.fc = nn.Parameter(torch.zeros(d, 2 * d))  # [E(x); f] -> residual stream
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.qkv = nn.Parameter(torch.zeros(3 * d, d))
        self.o = nn.Parameter(torch.zeros(d, d))
        self.mlp_norm = nn.Parameter(torch.ones(d))
        self.gate_up = nn.Parameter(torch.zeros(2 * i, d))
        self.down = nn.Parameter(torch.zeros(d, i))
        self.out_norm = nn.Parameter(torch.ones(d))
        dh = d // config.num_attention_heads
        inv = 1.0 / config.rope_theta ** (torch.arange(0, dh, 2).float() / dh)
        self.register_buffer("inv_freq", inv, persistent=False)

    @classmethod
    def from_model(cls, model, depth: int = 6, num_attention_heads: int = 4, intermediate_size: int = 0, seed=0):
        """A fresh drafter for `model`: random layer, fc initialised to pass the feature through."""
        hidden, vocab, name = model_dims(model)
        config = DrafterConfig(hidden, vocab, num_attention_heads, intermediate_size, depth,
                               base_model=name, base_fingerprint=base_fingerprint(model))  # fmt: skip
        drafter = cls(config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in (drafter.fc, drafter.qkv, drafter.o, drafter.gate_up, drafter.down):
                p.normal_(0.0, 0.02, generator=g)
            drafter.fc[:, hidden:] += torch.eye(hidden)  # start near "next feature = this feature"
        return drafter.to(model.get_output_embeddings().weight.device)

    def check_compatible(self, model) -> None:
        """Raise a clear error if this drafter was trained for another base."""
        hidden, vocab, name = model_dims(model)
        c = self.config
        if c.hidden_size != hidden:
            raise ValueError(f"feature drafter was trained for hidden size {c.hidden_size}, the model has {hidden}")
        if c.vocab_size != vocab:
            raise ValueError(f"feature drafter was trained for vocabulary size {c.vocab_size}, the model has {vocab}")
        if c.base_fingerprint and c.base_fingerprint != base_fingerprint(model):
            raise ValueError(
                f"feature drafter was trained for base {c.base_model!r} (output layer {c.base_fingerprint}), "
                f"this model's output layer is {base_fingerprint(model)}: train a drafter for it"
            )

    @property
    def max_depth(self) -> int:
        """The deepest tree this drafter was trained to unroll."""
        return self.config.depth

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.dtype

    # ----- the layer, in pieces shared by training and decoding -----
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) positions -> (T, dh) cos and sin."""
        angles = positions.float()[:, None] * self.inv_freq[None]  # (T, dh/2)
        angles = torch.cat([angles, angles], -1)
        return angles.cos(), angles.sin()

    def project(self, emb: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """(..., D) token embeddings and features -> (..., D) residual stream."""
        return torch.cat([emb, feat], -1) @ self.fc.T

    def qkv_heads(self, x: torch.Tensor, cos, sin):
        """(B, T, D) residual -> q, k, v (B, h, T, dh), rotary applied to q and k."""
        b, t, d = x.shape
        h = self.config.num_attention_heads
        q, k, v = (rms_norm(x, self.attn_norm, self.config.rms_norm_eps) @ self.qkv.T).split(d, -1)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))  # (B, h, T, dh)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """(B, T, D) residual and (B, h, T, dh) attention output -> (B, T, D) predicted next features."""
        b, t, d = x.shape
        x = x + attended.transpose(1, 2).reshape(b, t, d) @ self.o.T
        gate, up = (rms_norm(x, self.mlp_norm, self.config.rms_norm_eps) @ self.gate_up.T).chunk(2, -1)
        x = x + (nn.functional.silu(gate) * up) @ self.down.T
        return rms_norm(x, self.out_norm, self.config.rms_norm_eps)

    # ----- training: the unrolled recursion over whole sequences -----
    def unrolled_features(
        self, emb: torch.Tensor, feats: torch.Tensor, steps: int, start: int = 0
    ) -> list[torch.Tensor]:
        """Drafted features of every row at unroll steps 0..steps-1 (training-time test).

        emb (B, T + steps - 1, D): embeddings of x_1 .. (x_{j+1+s} feeds row j at step s);
        feats (B, T, D): the base's features f_0 .. f_{T-1}. Returns `steps` tensors: step s, row j predicts
        f_{j+1+s} (and so x_{j+2+s}); step 0 is (B, T, D), deeper steps only rows j >= `start` (B, T - start, D)
        (decoding never drafts deep from a prompt row). Step-0 rows attend causally to step-0 rows; a step-s
        row j attends to step-0 rows <= j and to row j of steps 1..s, as a depth-s tree node does.
        """
        b, t, _ = feats.shape
        dh = self.config.hidden_size // self.config.num_attention_heads
        causal = torch.full((t, t), float("-inf"), device=feats.device).triu(1)  # (T, T)
        positions = torch.arange(t, device=feats.device)
        outs, chain_k, chain_v = [], [], []
        feat = feats
        for s in range(steps):
            if s == 1:  # deeper steps: rows >= start only
                positions, causal, feat = positions[start:], causal[start:], feat[:, start:]
            rows = feat.shape[1]
            cos, sin = self.rope(positions + s)
            x = self.project(emb[:, s + t - rows : s + t], feat)  # (B, rows, D)
            q, k, v = self.qkv_heads(x, cos, sin)  # (B, h, T, dh)
            if s == 0:
                k0, v0 = k, v
            else:
                chain_k.append(k)
                chain_v.append(v)
            scores = [(q @ k0.transpose(-1, -2)) / dh**0.5 + causal]  # (B, h, T, T)
            scores += [(q * ck).sum(-1, keepdim=True) / dh**0.5 for ck in chain_k]  # s x (B, h, T, 1)
            weights = torch.softmax(torch.cat(scores, -1), -1)
            attended = weights[..., :t] @ v0  # (B, h, rows, dh)
            for i, cv in enumerate(chain_v):
                attended = attended + weights[..., t + i : t + i + 1] * cv
            feat = self.finish(x, attended)
            outs.append(feat)
        return outs

    # ----- artifacts -----
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json + model.safetensors, each written atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, d / (WEIGHTS_NAME + ".tmp"), metadata={"format": "pt"})
        os.replace(d / (WEIGHTS_NAME + ".tmp"), d / WEIGHTS_NAME)
        (d / (CONFIG_NAME + ".tmp")).write_text(json.dumps(asdict(self.config), indent=2))
        os.replace(d / (CONFIG_NAME + ".tmp"), d / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model=None) -> "FeatureDrafter":
        d = Path(directory)
        config = read_config(d)
        try:
            drafter = cls(DrafterConfig(**config))
        except TypeError as e:
            raise ValueError(f"{d / CONFIG_NAME} is not a valid feature drafter config: {e}") from e
        try:
            state = load_file(d / WEIGHTS_NAME)
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise ValueError(f"{d / WEIGHTS_NAME} is corrupt or not a safetensors file: {e}") from e
        try:
            drafter.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{d / WEIGHTS_NAME} does not match {d / CONFIG_NAME}: {e}") from e
        if model is not None:
            drafter.check_compatible(model)
            drafter.to(model.get_output_embeddings().weight.device)
        return drafter


def read_config(directory: Path) -> dict:
    """The config.json of a drafter directory (heads or feature drafter), checked to exist and parse."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"draft model directory {directory} has no {name}")
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / CONFIG_NAME} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{directory / CONFIG_NAME} must hold a JSON object, got {type(config).__name__}")
    return config


def load_drafter(directory: str | os.PathLike, model=None):
    """DraftHeads or FeatureDrafter, whichever `directory` holds (config.json "kind")."""
    from .heads import DraftHeads

    d = Path(directory)
    kind = read_config(d).get("kind")
    if kind == KIND:
        return FeatureDrafter.from_pretrained(d, model)
    if kind is not None:
        raise ValueError(f"{d / CONFIG_NAME} has unknown kind {kind!r}; expected {KIND!r} or none (draft heads)")
    return DraftHeads.from_pretrained(d, model)


# ----- decoding -----
@dataclass
class TreePlan:
    """What drafting a static tree needs, per depth d = 1..depth, built once per tree."""

    nodes: list[torch.Tensor]  # nodes[d-1] (n_d,): node ids at depth d
    parent_row: list[torch.Tensor]  # (n_d,): row of each node's parent among depth d-1's inner nodes
    ranks: list[torch.Tensor]  # (n_d,): each node's rank among its parent's candidates
    inner: list[torch.Tensor]  # inner[d-1] (m_d,): node ids at depth d that have children
    inner_row: list[torch.Tensor]  # (m_d,): row of each inner node among depth d's nodes
    bias: list[torch.Tensor]  # (m_d, m_1 + .. + m_d): additive mask of the inner rows over tree rows
    max_rank: int


def tree_plan(tree, dtype=torch.float32) -> TreePlan:
    depth = tree.depth
    parents, depths = tree.parents.tolist(), tree.depths.tolist()
    has_kids = [len(c) > 0 for c in tree.children]
    by_depth = [[i for i in range(len(tree)) if depths[i] == d] for d in range(depth + 1)]
    inner = [[i for i in by_depth[d] if has_kids[i]] for d in range(depth + 1)]  # inner[0] = [root]
    tree_rows = [i for d in range(1, depth + 1) for i in inner[d]]  # scratch rows, depth by depth
    row = {n: r for r, n in enumerate(tree_rows)}
    plan = TreePlan([], [], [], [], [], [], tree.max_rank)
    for d in range(1, depth + 1):
        nodes = by_depth[d]
        plan.nodes.append(torch.tensor(nodes, dtype=torch.long))
        plan.parent_row.append(torch.tensor([inner[d - 1].index(parents[n]) for n in nodes], dtype=torch.long))
        plan.ranks.append(torch.tensor([tree.paths[n - 1][-1] for n in nodes], dtype=torch.long))
        plan.inner.append(torch.tensor(inner[d], dtype=torch.long))
        plan.inner_row.append(torch.tensor([nodes.index(n) for n in inner[d]], dtype=torch.long))
        seen = sum(len(inner[e]) for e in range(1, d + 1))
        bias = torch.full((len(inner[d]), seen), torch.finfo(dtype).min, dtype=dtype)
        for i, n in enumerate(inner[d]):
            for a in tree_rows[:seen]:
                if tree.ancestor_mask[n, a]:
                    bias[i, row[a]] = 0.0
        plan.bias.append(bias)
    return plan


class DraftSession:
    """The drafter's KV cache for one generation: committed rows (true features) + scratch tree rows."""

    def __init__(self, drafter: FeatureDrafter, model, capacity: int):
        c = drafter.config
        self.drafter, self.eps = drafter, c.rms_norm_eps
        self.embed = model.get_input_embeddings().weight  # (V, D)
        self.out_weight = model.get_output_embeddings().weight  # (V, D)
        h, dh = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        device, dtype = self.out_weight.device, drafter.fc.dtype
        self.keys = torch.zeros(1, h, capacity, dh, device=device, dtype=dtype)
        self.values = torch.zeros(1, h, capacity, dh, device=device, dtype=dtype)
        self.length = 0  # committed rows
        self.scale = dh**-0.5
        cos, sin = drafter.rope(torch.arange(capacity, device=device))
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)  # (capacity, dh)

    def rows(self, tokens: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor, start: int, bias):
        """Run rows (n,) tokens / (n, D) features at `positions`, writing their keys at [start, start + n);
        each sees the committed rows and the scratch rows [length, start + n) through `bias`. -> (n, D)."""
        dr = self.drafter
        n = tokens.shape[0]
        x = dr.project(self.embed[tokens].to(feats.dtype), feats)[None]  # (1, n, D)
        q, k, v = dr.qkv_heads(x, self.cos[positions], self.sin[positions])  # (1, h, n, dh)
        self.keys[:, :, start : start + n] = k
        self.values[:, :, start : start + n] = v
        end = start + n
        scores = (q @ self.keys[:, :, :end].transpose(-1, -2)) * self.scale  # (1, h, n, end)
        scores[..., self.length :] += bias
        attended = torch.softmax(scores, -1) @ self.values[:, :, :end]  # (1, h, n, dh)
        return dr.finish(x, attended)[0]  # (n, D)

    def commit(self, tokens: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Rows with true inputs (x_{j+1}, f_j) become part of the prefix; -> (D,) the last row's output."""
        n = tokens.shape[0]
        causal = torch.full((n, n), float("-inf"), device=feats.device, dtype=feats.dtype).triu(1)
        start = self.length
        positions = torch.arange(start, start + n, device=feats.device)
        out = self.rows(tokens, feats, positions, start, causal)
        self.length = start + n
        return out[-1]

    def draft(self, plan: TreePlan, root: torch.Tensor, root_feat: torch.Tensor, history, processor):
        """(N+1,) tree tokens: each node is its parent's rank-r candidate, depth by depth."""
        n_nodes = 1 + sum(len(x) for x in plan.nodes)
        tokens = torch.empty(n_nodes, dtype=torch.long, device=root_feat.device)
        tokens[0] = root
        feats = root_feat[None]  # (1, D): outputs of the inner rows of the depth above
        written = 0
        for d, nodes in enumerate(plan.nodes, start=1):
            logits = feats @ self.out_weight.T  # (m_{d-1}, V)
            if processor is not None:
                logits = processor(history.expand(logits.shape[0], -1), logits.float())
            top = torch.topk(logits, plan.max_rank + 1, dim=-1).indices  # (m_{d-1}, K)
            tokens[nodes] = top[plan.parent_row[d - 1], plan.ranks[d - 1]]
            inner = plan.inner[d - 1]
            if len(inner) == 0:
                break
            parent_feats = feats[plan.parent_row[d - 1][plan.inner_row[d - 1]]]  # (m_d, D)
            positions = torch.full((len(inner),), self.length - 1 + d, device=feats.device)
            feats = self.rows(tokens[inner], parent_feats, positions, self.length + written, plan.bias[d - 1])
            written += len(inner)
        return tokens

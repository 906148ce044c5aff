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

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import formats
from .artifacts import config_from_json, read_json_object
from .heads import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_weight_shapes,
    load_weights,
    model_dims,
    reduced_precision,
    save_artifact,
)
from .processors import reads_history

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
        if min(self.hidden_size, self.vocab_size, self.intermediate_size) < 0:
            raise ValueError(
                f"sizes must be >= 0, got hidden_size {self.hidden_size}, vocab_size {self.vocab_size}, "
                f"intermediate_size {self.intermediate_size}"
            )
        if self.depth < 1 or self.num_attention_heads < 1:
            raise ValueError(
                f"need depth >= 1 and num_attention_heads >= 1, got {self.depth}, {self.num_attention_heads}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")


def base_fingerprint(model) -> str:
    """sha256 prefix of the base's output layer (what the drafter's features are read through).

    Remembered per weight tensor until it changes (every generate call checks it: hashing the demo's output
    layer each time cost 0.6 ms a call, ~5% of a short synthesis' decoding)."""
    import hashlib

    weight = model.get_output_embeddings().weight
    # the in-place version and the storage (`.data = ...` swaps it, as Module.to does): either change -> rehash
    state = (None if weight.is_inference() else weight._version, weight.data_ptr(), weight.dtype)
    cached = getattr(weight, "_vadusa_fingerprint", None)  # on the tensor itself: it lives and dies with it
    if cached is None or cached[0] != state:
        w = weight.detach().float().cpu().contiguous()
        cached = (state, hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16])
        weight._vadusa_fingerprint = cached
    return cached[1]


def unit(x: torch.Tensor) -> torch.Tensor:
    """(..., D) rows scaled to unit length (x / rms(x) / sqrt(D): decoding folds sqrt(D) into the next matrix),
    as F.normalize does, in about 60% of its time on one row here (its Python wrappers cost more than the kernel)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight  # faster on CPU than F.rms_norm


def out_in(rows: int, cols: int) -> nn.Parameter:
    """A zero (rows, cols) weight stored as the transpose of a contiguous (cols, rows) array, so x @ W.T runs on
    a contiguous matrix (MKL's few-row GEMM is markedly faster that way: `vadusa.cpu`)."""
    return nn.Parameter(torch.zeros(cols, rows).t())


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (half-split convention) of (..., T, dh) with (T, dh) cos / sin."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


class FeatureDrafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        d, i = config.hidden_size, config.intermediate_size
        self.fc = out_in(d, 2 * d)  # [E(x); f] -> residual stream
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.qkv = out_in(3 * d, d)
        self.o = out_in(d, d)
        self.mlp_norm = nn.Parameter(torch.ones(d))
        self.gate_up = out_in(2 * i, d)
        self.down = out_in(d, i)
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
        """Raise a clear error if this drafter was trained for another base (by shape alone in reduced precision)."""
        hidden, vocab, name = model_dims(model)
        c = self.config
        if c.hidden_size != hidden:
            raise ValueError(f"feature drafter was trained for hidden size {c.hidden_size}, the model has {hidden}")
        if c.vocab_size != vocab:
            raise ValueError(f"feature drafter was trained for vocabulary size {c.vocab_size}, the model has {vocab}")
        if c.base_fingerprint and c.base_fingerprint != base_fingerprint(model) and not reduced_precision(model):
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
        qkv = rms_norm(x, self.attn_norm, self.config.rms_norm_eps) @ self.qkv.T  # (B, T, 3D)
        qkv = qkv.view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (3, B, h, T, dh)
        qk = rotate(qkv[:2], cos, sin)  # q and k rotated in one go
        return qk[0], qk[1], qkv[2]

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
    def save_pretrained(self, directory: str | os.PathLike, format: str = "vadusa") -> None:
        """config.json + model.safetensors, each written atomically; no serving format can hold it (`formats`)."""
        formats.refuse_feature_drafter(format)
        save_artifact(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model=None) -> "FeatureDrafter":
        d = Path(directory)
        read_config(d)
        config = config_from_json(DrafterConfig, d / CONFIG_NAME)
        check_weight_shapes(lambda: cls(config), d)  # before allocating: the config may ask for any size
        drafter = cls(config)
        load_weights(drafter, d)
        if model is not None:
            drafter.check_compatible(model)
            drafter.to(model.get_output_embeddings().weight.device)
        return drafter


def read_config(directory: Path) -> dict:
    """The config.json of a drafter directory (heads or feature drafter), checked to exist and parse."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"draft model directory {directory} has no {name}")
    return read_json_object(directory / CONFIG_NAME)


def load_drafter(directory: str | os.PathLike, model=None):
    """DraftHeads or FeatureDrafter, whichever `directory` holds (config.json "kind")."""
    from .heads import DraftHeads

    d = Path(directory)
    if d.is_dir() and formats.detect(d) is not None:  # vLLM or FasterDecoding Medusa heads
        return DraftHeads.from_pretrained(d, model)
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
    open: list[bool]  # whether bias[d-1] is all zeros (every inner row sees every tree row: a chain's), so
    # the depth's attention needs no mask
    inner_parent_row: list[torch.Tensor]  # (m_d,): row of each inner node's parent among depth d-1's inner nodes
    max_rank: int  # the highest rank the tree reads
    size: int  # nodes, root included


def tree_plan(tree, dtype=torch.float32) -> TreePlan:
    depth = tree.depth
    parents, depths = tree.parents.tolist(), tree.depths.tolist()
    has_kids = [len(c) > 0 for c in tree.children]
    by_depth = [[i for i in range(len(tree)) if depths[i] == d] for d in range(depth + 1)]
    inner = [[i for i in by_depth[d] if has_kids[i]] for d in range(depth + 1)]  # inner[0] = [root]
    tree_rows = [i for d in range(1, depth + 1) for i in inner[d]]  # scratch rows, depth by depth
    row = {n: r for r, n in enumerate(tree_rows)}
    plan = TreePlan([], [], [], [], [], [], [], [], tree.max_rank, len(tree))
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
        plan.open.append(bool((bias == 0).all()))
        plan.inner_parent_row.append(plan.parent_row[-1][plan.inner_row[-1]])
    return plan


@dataclass
class DecodingWeights:
    """The drafter's matrices as decoding reads them (x @ W, W contiguous), norms and sqrt(D) folded in."""

    out_t: torch.Tensor  # (D, V) the base's output layer, transposed
    token_proj: torch.Tensor  # (V, D) E @ W_tok^T: the token half of the input projection, a lookup
    feat_proj: torch.Tensor  # (D, D) the feature half
    w_qkv: torch.Tensor  # (D, 5D) q, k, v, rot(q), rot(k), attention norm folded in
    w_q: torch.Tensor  # (D, 2D) q, rot(q)
    w_kv: torch.Tensor  # (D, 3D) k, v, rot(k)
    w_o: torch.Tensor  # (D, D)
    w_gate_up: torch.Tensor  # (D, 2I), MLP norm folded in
    w_down: torch.Tensor  # (I, D)
    out_scale: torch.Tensor  # (D,) output norm * sqrt(D)


def decoding_weights(drafter: FeatureDrafter, model) -> DecodingWeights:
    """The drafter's weights folded for decoding (see `DraftSession`), built once per drafter and base and
    kept on the drafter until either changes (a generate call costs a few AR steps less)."""
    params = [*drafter.parameters(), model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    key = tuple((p.data_ptr(), None if p.is_inference() else p._version) for p in params)  # inference: frozen
    cached = getattr(drafter, "_decoding_weights", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    c = drafter.config
    d, h = c.hidden_size, c.num_attention_heads
    dtype = drafter.fc.dtype
    with torch.no_grad():
        w = {"out_t": model.get_output_embeddings().weight.to(dtype).T.contiguous()}  # (D, V) the base's
        embed = model.get_input_embeddings().weight.to(dtype)
        root_d = d**0.5  # unit(x) * sqrt(D) is x / rms(x)
        w["token_proj"] = embed @ drafter.fc[:, :d].T  # (V, D) token half of the input projection
        w["feat_proj"] = drafter.fc[:, d:].T.contiguous()  # (D, D) feature half
        q, k, v = (drafter.qkv * drafter.attn_norm * root_d).split(d)  # (D, D) each, rows = outputs
        rot = torch.cat([torch.arange(d // (2 * h), d // h), torch.arange(0, d // (2 * h))])  # rotate-half
        sign = torch.cat([-torch.ones(d // (2 * h)), torch.ones(d // (2 * h))]).repeat(h)[:, None]
        perm = (torch.arange(h)[:, None] * (d // h) + rot[None]).flatten()
        w["w_qkv"] = torch.cat([q, k, v, q[perm] * sign, k[perm] * sign]).T.contiguous()  # (D, 5D)
        w["w_q"] = torch.cat([q, q[perm] * sign]).T.contiguous()  # (D, 2D): q, rot(q)
        w["w_kv"] = torch.cat([k, v, k[perm] * sign]).T.contiguous()  # (D, 3D): k, v, rot(k)
        w["w_o"] = drafter.o.T.contiguous()  # (D, D)
        w["w_gate_up"] = (drafter.gate_up * drafter.mlp_norm * root_d).T.contiguous()  # (D, 2I)
        w["w_down"] = drafter.down.T.contiguous()  # (I, D)
        w["out_scale"] = drafter.out_norm * root_d  # (D,)
    weights = DecodingWeights(**w)
    drafter._decoding_weights = (key, weights)
    return weights


class DraftSession:
    """The drafter's KV cache for one generation: committed rows (true features) + scratch tree rows.

    Decoding calls the layer once per tree depth, and on this CPU a call costs in ops and in weights
    read, not in FLOPs. So the session folds what it can into weights built once: the token half of the
    input projection becomes a (V, D) table (E @ W_tok^T), the norm weights (and sqrt(D)) are folded into
    the matrices after them, the rotary's rotate-half is folded into extra q / k columns, and every matrix
    is stored the way a few-row product reads it fastest (`decoding_weights`, cached on the drafter). The same
    values as the layer's training form
    (`unrolled_features`), to float rounding: a test holds them together."""

    def __init__(self, drafter: FeatureDrafter, model, capacity: int):
        c = drafter.config
        d, h = c.hidden_size, c.num_attention_heads
        self.heads, self.dh, self.dim = h, d // h, d
        self.w = decoding_weights(drafter, model)
        device, dtype = self.w.out_t.device, self.w.out_t.dtype
        self.keys = torch.zeros(1, h, capacity, self.dh, device=device, dtype=dtype)
        self.values = torch.zeros(1, h, capacity, self.dh, device=device, dtype=dtype)
        self.mask = None  # (capacity, capacity) additive, zero but where written; allocated when a tree needs it
        self.length = 0  # committed rows
        cos, sin = drafter.rope(torch.arange(capacity, device=device))  # (capacity, dh)
        self.cos, self.sin = cos.to(dtype).repeat(1, 2 * h), sin.to(dtype).repeat(1, 2 * h)  # (capacity, 2D): q, k

    def rows(self, tokens: torch.Tensor, feats: torch.Tensor, position: int, same_position: bool, start: int, bias):
        """Run rows (n,) tokens / (n, D) features, writing their keys at [start, start + n); each sees the
        committed rows and the scratch rows [length, start + n) through `bias` (None: every one of them).
        Positions: `position` for every row (tree rows of one depth), or position, position+1, ... (committed
        rows). -> (n, D)."""
        n, end, d, h, dh = tokens.shape[0], start + tokens.shape[0], self.dim, self.heads, self.dh
        x = torch.addmm(self.w.token_proj[tokens], feats, self.w.feat_proj)  # (n, D)
        y = unit(x) @ self.w.w_qkv  # (n, 5D): q, k, v, rot(q), rot(k)
        span = slice(position, position + 1) if same_position else slice(position, position + n)
        qk = torch.addcmul(y[:, : 2 * d] * self.cos[span], y[:, 3 * d :], self.sin[span])  # (n, 2D) rotary q, k
        qk = qk.view(n, 2, h, dh).permute(1, 2, 0, 3)  # (2, h, n, dh)
        self.keys[0, :, start:end] = qk[1]
        self.values[0, :, start:end] = y[:, 2 * d : 3 * d].view(n, h, dh).transpose(0, 1)
        keys, values = self.keys[:, :, :end], self.values[:, :, :end]
        if bias is None:
            attended = nn.functional.scaled_dot_product_attention(qk[:1], keys, values)  # (1, h, n, dh)
            return self.finish(x, attended)
        if self.mask is None:
            self.mask = self.keys.new_zeros(self.keys.shape[2], self.keys.shape[2])
        mask = self.mask[:n, :end]  # (n, end)
        mask[:, self.length :] = bias
        attended = nn.functional.scaled_dot_product_attention(qk[:1], keys, values, attn_mask=mask)
        mask[:, self.length :] = 0.0
        return self.finish(x, attended)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """(n, D) residual and (1, h, n, dh) attention output -> (n, D) predicted next features."""
        x = torch.addmm(x, attended[0].transpose(0, 1).reshape(x.shape[0], self.dim), self.w.w_o)
        gate, up = (unit(x) @ self.w.w_gate_up).chunk(2, -1)
        x = torch.addmm(x, nn.functional.silu(gate) * up, self.w.w_down)
        return unit(x) * self.w.out_scale  # (n, D)

    def commit(self, tokens: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Rows with true inputs (x_{j+1}, f_j) become part of the prefix; -> (D,) the last row's output.

        Only the last row's output is read (it drafts depth 1), so the other rows compute their keys and values
        alone: the same cache, a fraction of the work."""
        n, start, d, h, dh = tokens.shape[0], self.length, self.dim, self.heads, self.dh
        end = start + n
        feats = feats.to(self.w.feat_proj.dtype)  # the base's states, cast to the drafter's dtype
        x = torch.addmm(self.w.token_proj[tokens], feats, self.w.feat_proj)  # (n, D)
        xn = unit(x)
        kv = xn @ self.w.w_kv  # (n, 3D): k, v, rot(k)
        k = torch.addcmul(kv[:, :d] * self.cos[start:end, d:], kv[:, 2 * d :], self.sin[start:end, d:])  # (n, D)
        self.keys[0, :, start:end] = k.view(n, h, dh).transpose(0, 1)
        self.values[0, :, start:end] = kv[:, d : 2 * d].view(n, h, dh).transpose(0, 1)
        qr = xn[-1:] @ self.w.w_q  # (1, 2D): q, rot(q) of the last row, which sees every committed row
        q = torch.addcmul(qr[:, :d] * self.cos[end - 1 : end, :d], qr[:, d:], self.sin[end - 1 : end, :d])
        attended = nn.functional.scaled_dot_product_attention(
            q.view(1, h, 1, dh), self.keys[:, :, :end], self.values[:, :, :end]
        )  # (1, h, 1, dh)
        self.length = end
        return self.finish(x[-1:], attended)[0]

    def depth_logits(self, feats: torch.Tensor, d: int, history, processor) -> torch.Tensor:
        """(m, D) outputs of depth d - 1's rows -> (m, V) logits of their children at depth d, processed."""
        logits = feats @ self.w.out_t  # (m, V)
        if processor is None:
            return logits
        if not reads_history(processor):
            return processor(history.expand(logits.shape[0], -1), logits.float())
        # depth d drafts d - 1 tokens past the root (root copies stand in for them)
        rows = torch.cat([history, history[:, -1:].expand(1, d - 1)], dim=1)  # (1, t + d - 1)
        return processor(rows.expand(logits.shape[0], -1), logits.float())

    def draft(self, plan: TreePlan, root: torch.Tensor, root_feat: torch.Tensor, history, processor):
        """(N+1,) tree tokens: each node is its parent's rank-r candidate, depth by depth."""
        tokens = torch.empty(plan.size, dtype=torch.long, device=root_feat.device)
        tokens[0] = root
        feats = root_feat[None]  # (1, D): outputs of the inner rows of the depth above
        written = 0
        for d, nodes in enumerate(plan.nodes, start=1):
            logits = self.depth_logits(feats, d, history, processor)  # (m_{d-1}, V)
            top = torch.topk(logits, plan.max_rank + 1, dim=-1).indices  # (m_{d-1}, K)
            tokens[nodes] = top[plan.parent_row[d - 1], plan.ranks[d - 1]]
            inner = plan.inner[d - 1]
            if len(inner) == 0:
                break
            parent_feats = feats[plan.inner_parent_row[d - 1]]  # (m_d, D)
            start = self.length + written
            bias = None if plan.open[d - 1] else plan.bias[d - 1]
            feats = self.rows(tokens[inner], parent_feats, self.length - 1 + d, True, start, bias)
            written += len(inner)
        return tokens

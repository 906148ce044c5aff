"""Head accuracy tables acc[h][r]: how often head h's rank-r candidate is accepted, given the path before it was.

Measured on held-out prompts, teacher-forced along the base's own continuations: for the state before
generated token i, head h's candidates c_0..c_R (its processed top-(R+1), as the engine drafts them) sit at
depth h+1 of the tree and are judged by the base distribution p of token i+1+h. The path before them was
accepted when every earlier token i+1..i+h is among the earlier heads' candidates; only those states count.
Per rule, the probability that rank r is the accepted child (the first one in rank order the rule takes):

    greedy      1[c_r == argmax p]                                    (on greedy continuations)
    tau         (1 - S_{r-1})^tau - (1 - S_r)^tau,  S_r = p(c_0) + ... + p(c_r)   (tolerance sampling)
    typical     1[p(c_r) > t] * prod_{r' < r} 1[p(c_r') <= t],  t = min(0.09, 0.3 exp(-H(p)))   (Medusa-2,
                the decoder's default epsilon and alpha)

These are exclusive over ranks (sum_r acc[h][r] <= 1), so a tree whose ranks are contiguous has expected
accepted length sum over nodes of the product of acc along the node's path (`tree.expected_accept_length`).
The JSON records a fingerprint of the heads it belongs to; loading it for other heads raises.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .accept import TYPICAL_ALPHA, TYPICAL_EPSILON, typical_threshold
from .drafter import FeatureDrafter
from .heads import DraftHeads
from .processors import as_processor
from .train import TrainConfig, batch_hidden, sample_batch
from .tree import expected_accept_length, greedy_tree_order

ACCURACY_NAME = "accuracy.json"
STATES_NAME = "accuracy-states.safetensors"  # per-state values (not shipped: large)
RENEWAL_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64)


def heads_fingerprint(heads: DraftHeads) -> str:
    """sha256 of the heads' config and weights: which heads an accuracy table belongs to."""
    digest = hashlib.sha256(json.dumps(heads.config.__dict__, sort_keys=True).encode())
    for name, tensor in sorted(heads.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def rule_name(acceptance: str, tolerance: int = 3) -> str:
    """The accuracy/tree key of an acceptance rule: 'greedy', 'tau<k>', 'typical' (lossless uses 'tau1')."""
    if acceptance in ("greedy", "typical"):
        return acceptance
    if acceptance == "tolerance":
        return f"tau{tolerance}"
    return "tau1"  # lossless accepts roughly like sample-and-match


def tolerance_accept(p_cands: torch.Tensor, tau: int) -> torch.Tensor:
    """(..., R) probabilities of the candidates in rank order -> (..., R) P(rank r is the first drawn among tau)."""
    s = torch.cumsum(p_cands, -1).clamp(max=1.0)  # (..., R)
    before = torch.cat([torch.zeros_like(s[..., :1]), s[..., :-1]], -1)
    return (1 - before) ** tau - (1 - s) ** tau


@torch.no_grad()
def head_candidates(heads: DraftHeads, hidden: torch.Tensor, history: torch.Tensor, processor, k: int):
    """(G, H, k) the heads' top-k at every state, after the logits processor (history: prompt + gen, (P+G,))."""
    roots = history[len(history) - hidden.shape[0] :]  # (G,) the token each state's base distribution drew
    logits = heads(hidden.to(heads.dtype), roots).float()  # (G, H, V)
    if processor is not None:
        p_len = len(history) - hidden.shape[0]
        for i in range(hidden.shape[0]):  # the engine processes the heads with the history up to the root
            h = history[: p_len + i + 1][None].expand(logits.shape[1], -1)
            logits[i] = processor(h, logits[i])
    return torch.topk(logits, k, dim=-1).indices


@torch.no_grad()
def drafter_candidates(drafter, model, states: torch.Tensor, history: torch.Tensor, prompt_len: int, processor, k):
    """(G, depth, k) a feature drafter's top-k at every state and depth, drafting along the sampled path (its own
    features, the sampled tokens), after the logits processor. states (P+G-1, D) the base's, history (P+G,)."""
    depth, start = drafter.config.depth, prompt_len - 1
    ids = torch.cat([history[1:], history[-1:].expand(depth - 1)])  # (T + depth - 1,)
    emb = model.get_input_embeddings().weight[ids].float()[None]
    outs = drafter.unrolled_features(emb, states.float()[None], depth, start)
    rows = [outs[0][0, start:]] + [o[0] for o in outs[1:]]  # depth x (G, D): root rows j = P-1+i
    logits = torch.stack(rows, 1) @ model.get_output_embeddings().weight.float().T  # (G, depth, V)
    if processor is not None:
        for i in range(logits.shape[0]):  # the engine processes drafts with the history up to the root
            h = history[: prompt_len + i + 1][None].expand(depth, -1)
            logits[i] = processor(h, logits[i])
    return torch.topk(logits, k, dim=-1).indices


def path_accepted(gen: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """(G, H) bool: for state i, whether tokens i+1..i+h are all among heads 0..h-1's candidates (h = column)."""
    g, h, _ = cands.shape
    ok = torch.ones(g, h, dtype=torch.bool)
    for k in range(1, h):
        i = torch.arange(g)
        j = i + k  # token judged by head k-1 at state i
        inside = torch.zeros(g, dtype=torch.bool)
        valid = j < g
        inside[valid] = (cands[i[valid], k - 1] == gen[j[valid], None]).any(-1)
        ok[:, k] = ok[:, k - 1] & inside
    return ok


def node_values(gen, log_probs, cands, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per state i, head k, rank r: P(rank r is the accepted child), teacher-forced on this sequence.

    Returns vals (G, H, R) float64 and valid (G, H) bool (head k's target exists and the path before
    it is among the earlier heads' candidates).
    """
    g, h, r = cands.shape
    valid = path_accepted(gen, cands) & (torch.arange(g)[:, None] + 1 + torch.arange(h)[None] < g)
    vals = torch.zeros(g, h, r, dtype=torch.float64)
    probs = log_probs.exp()  # (G, V)
    for k in range(h):
        i = valid[:, k].nonzero().flatten()
        if len(i) == 0:
            continue
        p, c = probs[i + 1 + k], cands[i, k]  # (n, V), (n, R)
        if rule == "greedy":
            vals[i, k] = (c == p.argmax(-1, keepdim=True)).double()
        elif rule == "typical":
            hits = p.gather(-1, c) > typical_threshold(p, TYPICAL_EPSILON, TYPICAL_ALPHA)[:, None]  # (n, R)
            vals[i, k] = (hits & (hits.cumsum(-1) == 1)).double()  # the first rank over the threshold
        else:
            vals[i, k] = tolerance_accept(p.gather(-1, c).double(), int(rule[3:]))
    return vals, valid


def step_starts(vals, valid, table: torch.Tensor, paths) -> torch.Tensor:
    """(G,) probability that a decoding step starts at state i, decoding this sequence with tree `paths`.

    A step at state i accepts d nodes with the probability the tree gives from the per-state values
    (the table's where the path before a node left the sampled sequence), then the next step starts at
    i + 1 + d. Easy stretches are crossed in few steps, so they weigh less per step than per position.
    """
    g, h, _ = vals.shape
    filled = torch.where(valid[..., None], vals, table[None, : vals.shape[1], : vals.shape[2]])  # (G, H, R)
    filled = filled * (torch.arange(g)[:, None] + 1 + torch.arange(h)[None] < g)[..., None]  # no target: 0
    depth = max(len(p) for p in paths)
    at_least = torch.zeros(g, depth + 2, dtype=torch.float64)
    at_least[:, 0] = 1.0
    for p in paths:  # nodes at one depth are exclusive events: their probabilities add up
        reach = torch.ones(g, dtype=torch.float64)
        for j, rank in enumerate(p):
            reach = reach * filled[:, j, rank]
        at_least[:, len(p)] += reach
    exactly = (at_least[:, :-1] - at_least[:, 1:]).clamp(min=0)  # (G, depth + 1)
    start = torch.zeros(g + depth + 2, dtype=torch.float64)
    start[0] = 1.0
    for i in range(g - 1):  # a step at the last state never happens: its root was the last token
        start[i + 1 : i + 2 + depth] += start[i] * exactly[i]
    return start[:g] * (torch.arange(g) < g - 1)


def weighted_table(items, weights=None) -> tuple[torch.Tensor, list[float]]:
    """acc (H, R) = sum_i w_i vals_i / sum_i w_i over the valid states of every sequence; and that weight per head."""
    num, den = 0.0, 0.0
    for n, (vals, valid) in enumerate(items):
        w = weights[n] if weights is not None else torch.ones(len(vals), dtype=torch.float64)  # (G,)
        m = valid.double() * w[:, None]  # (G, H)
        num = num + (vals * m[..., None]).sum(0)  # (H, R)
        den = den + m.sum(0)  # (H,)
    return num / den.clamp(min=1e-12)[:, None], den.tolist()


@torch.no_grad()
def measure_accuracy(
    model,
    heads: DraftHeads,
    prompts: list[list[int]],
    rules=("greedy", "tau1", "tau2", "tau3", "tau4", "typical"),
    max_rank: int = 9,
    max_new_tokens: int | list[int] = 256,
    temperature: float = 1.0,
    top_k: int = 0,
    logits_processor=None,
    eos_token_id=None,
    seed: int = 1234,
    batch: int = 16,
    reference_nodes: int = 16,
    states_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """acc[rule][h][r] for ranks 0..max_rank on the base's own continuations of held-out `prompts`.

    Each state is weighted by the probability that a decoding step starts there (`step_starts`, with a
    reference tree of `reference_nodes` nodes built from the per-position table), because that is how
    decoding samples states. `max_new_tokens` caps every continuation, or each one (one cap per prompt).
    `states_path`: also save the per-state values (safetensors) so `build_trees` can predict each tree's
    tokens per step with the renewal model instead of the table alone.
    """
    if not prompts:
        raise ValueError("no held-out prompts to measure head accuracy on")
    caps = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(caps) != len(prompts):
        raise ValueError(f"got {len(caps)} max_new_tokens caps for {len(prompts)} prompts")
    heads.check_compatible(model)
    processor = as_processor(logits_processor)
    h, k = heads.max_depth, max_rank + 1
    config = TrainConfig(max_new_tokens=max(caps), temperature=temperature, top_k=top_k)
    items: dict = {r: [] for r in rules}  # rule -> [(vals (G, H, R), valid (G, H))] per sequence
    kinds = [True] if "greedy" in rules else []  # greedy continuations for the greedy rule
    kinds += [False] if any(r != "greedy" for r in rules) else []  # sampled ones for tolerance
    bar = tqdm(total=len(prompts) * len(kinds), desc="head accuracy", disable=not progress)
    for greedy in kinds:
        for b in range(0, len(prompts), batch):
            chunk = prompts[b : b + batch]
            rows = sample_batch(model, chunk, config, processor, eos_token_id, seed + b, greedy, caps[b : b + batch])
            hiddens = batch_hidden(model, chunk, [g for g, _ in rows])  # (P+G-1, D) each
            for prompt, (gen, lp), states in zip(chunk, rows, hiddens, strict=True):
                history = torch.cat([torch.as_tensor(prompt, dtype=torch.long), gen])
                if isinstance(heads, FeatureDrafter):
                    cands = drafter_candidates(heads, model, states, history, len(prompt), processor, k)
                else:  # (G, H, K) from the states before each generated token
                    cands = head_candidates(heads, states[len(prompt) - 1 :], history, processor, k)
                for rule in rules:
                    if (rule == "greedy") == greedy:
                        items[rule].append(node_values(gen, lp, cands, rule))
            bar.update(len(chunk))
    bar.close()
    report = {
        "heads": heads_fingerprint(heads),
        "num_heads": h,
        "max_rank": max_rank,
        "temperature": temperature,
        "prompts": len(prompts),
        "reference_nodes": reference_nodes,
        "acc": {},  # step-weighted: what the builder uses
        "acc_per_position": {},  # every state weighted alike
        "positions": {},  # valid states per head
        "reference": {},  # the reference tree and its tokens/step (renewal model vs table formula)
    }
    for rule in rules:
        flat, counts = weighted_table(items[rule])
        paths = greedy_tree_order(flat.tolist(), reference_nodes)
        weights = [step_starts(v, m, flat, paths) for v, m in items[rule]]
        acc, _ = weighted_table(items[rule], weights)
        report["acc"][rule] = acc.tolist()
        report["acc_per_position"][rule] = flat.tolist()
        report["positions"][rule] = [int(c) for c in counts]
        tokens = sum(len(v) - 1 for v, _ in items[rule])
        report["reference"][rule] = {
            "paths": [list(p) for p in paths],
            "tokens_per_step_renewal": tokens / float(sum(w.sum() for w in weights)),
            "tokens_per_step_table": 1 + expected_accept_length(paths, report["acc"][rule]),
            "tokens_per_step_per_position": 1 + expected_accept_length(paths, report["acc_per_position"][rule]),
        }
    if states_path is not None:
        save_states(items, report["heads"], states_path)
    return report


def save_states(items: dict, fingerprint: str, path: str | os.PathLike) -> None:
    """Per-state values of every rule, flat over sequences, in one safetensors file (atomic)."""
    tensors = {}
    for rule, seqs in items.items():
        tensors[f"{rule}.vals"] = torch.cat([v for v, _ in seqs]).float().contiguous()  # (M, H, R)
        tensors[f"{rule}.valid"] = torch.cat([m for _, m in seqs]).to(torch.uint8).contiguous()  # (M, H)
        tensors[f"{rule}.lengths"] = torch.tensor([len(v) for v, _ in seqs])
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"heads": fingerprint})
    os.replace(tmp, path)


def load_states(path: str | os.PathLike, fingerprint: str) -> dict:
    """rule -> [(vals (G, H, R) float64, valid (G, H) bool)] per sequence; raises for other heads' states."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        if f.metadata().get("heads") != fingerprint:
            raise ValueError(f"{path} holds states of heads {f.metadata().get('heads')}, not of {fingerprint}")
    tensors = load_file(path)
    items = {}
    for rule in {k.split(".")[0] for k in tensors}:
        sizes = tensors[f"{rule}.lengths"].tolist()
        vals = torch.split(tensors[f"{rule}.vals"].double(), sizes)
        valid = torch.split(tensors[f"{rule}.valid"].bool(), sizes)
        items[rule] = list(zip(vals, valid, strict=True))
    return items


def renewal_tokens_per_step(seqs, table, paths) -> float:
    """Predicted tokens per step of tree `paths`: tokens / expected steps, stepping through every sequence."""
    table = torch.as_tensor(table, dtype=torch.float64)
    steps = sum(float(step_starts(v, m, table, paths).sum()) for v, m in seqs)
    return sum(len(v) - 1 for v, _ in seqs) / max(steps, 1e-12)


def save_accuracy(report: dict, path: str | os.PathLike) -> None:
    """Write a JSON report atomically (also used for the builder's and the measurement's summaries)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


def load_accuracy(path: str | os.PathLike, heads: DraftHeads | None = None) -> dict:
    """Read an accuracy JSON; with `heads`, raise unless it was measured for exactly these heads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"accuracy file {path} does not exist: measure it with train_heads.py --accuracy")
    report = json.loads(path.read_text())
    if not isinstance(report, dict) or "acc" not in report or "heads" not in report:
        raise ValueError(f"{path} is not a head accuracy file (needs 'acc' and 'heads')")
    if heads is not None and report["heads"] != heads_fingerprint(heads):
        raise ValueError(
            f"accuracy file {path} was measured for heads {report['heads']}, "
            f"but these heads are {heads_fingerprint(heads)}: re-measure it for them"
        )
    return report


# ----- from accuracy tables to the trees a machine should use -----
def build_trees(
    model,
    heads: DraftHeads,
    report: dict,
    trees_dir: str | os.PathLike,
    model_name: str,
    heads_dir: str | os.PathLike | None = None,
    rules=None,
    max_nodes: int = 64,
    max_rank: int | None = None,
    costs: dict | None = None,
    cost_repeats: int = 20,
    states: dict | None = None,
    sweep_sizes=(),
    sweep_dir: str | os.PathLike | None = None,
    logits_processor=None,
) -> dict:
    """Best tree of every size per rule, the size maximising expected tokens/s on this machine, written out.

    Writes trees/<model>-<rule>-<size>.json and .png for the chosen size of each rule, and
    <heads_dir>/tree-<rule>.json (what tree="auto" loads). The cost of a size is a whole engine step on
    that rule's best tree of that size (draft + verification pass + walk, `vadusa.cost.tree_step_costs`,
    measured on a grid of sizes and interpolated between), unless `costs` ({"seconds": {nodes: s}}) is
    given. With `states` (`load_states`), each rule's size is chosen by
    the renewal model's tokens per step on a grid of sizes (RENEWAL_SIZES) rather than by the table sum.
    `sweep_sizes`: also write the best tree of each of these sizes to `sweep_dir` (for measured sweeps).
    Returns {"costs", "overhead", "rules": {rule: {...}}}.
    """
    from .cost import tree_step_costs
    from .tree import Tree, best_trees, choose_tree_size, draw_tree

    if sweep_sizes and sweep_dir is None:
        raise ValueError("sweep_sizes needs a sweep_dir to write the trees to")
    if report["heads"] != heads_fingerprint(heads):
        raise ValueError(f"accuracy report is for heads {report['heads']}, these heads are {heads_fingerprint(heads)}")
    rules = list(rules or report["acc"])
    rank_limit = report["max_rank"] if max_rank is None else min(max_rank, report["max_rank"])
    trees_dir = Path(trees_dir)
    trees_dir.mkdir(parents=True, exist_ok=True)
    summary = {"costs": {}, "rules": {}}
    for rule in rules:
        acc = report["acc"][rule]
        trees = best_trees(acc, max_nodes, rank_limit)
        rule_costs = costs
        if rule_costs is None:
            grid = {n: trees[n][0] for n in RENEWAL_SIZES if n in trees}
            rule_costs = tree_step_costs(model, heads, grid, logits_processor, cost_repeats)
        summary["costs"][rule] = rule_costs
        size, rows = choose_tree_size(trees, rule_costs["seconds"])
        predicted = 1 + trees[size][1]
        if states is not None and rule in states:  # renewal model on a grid of sizes: choose by it
            for row in rows:
                if row["size"] in RENEWAL_SIZES or row["size"] == size:
                    tps = renewal_tokens_per_step(states[rule], acc, trees[row["size"]][0])
                    row["renewal_tokens_per_step"] = tps
                    row["renewal_tokens_per_second"] = tps / row["seconds"]
            best = max(
                (r for r in rows if "renewal_tokens_per_step" in r), key=lambda r: r["renewal_tokens_per_second"]
            )
            size, predicted = best["size"], best["renewal_tokens_per_step"]
        paths, expected = trees[size]
        meta = {
            "builder": "greedy",
            "rule": rule,
            "size": size,
            "expected_tokens_per_step": predicted,  # renewal model when states were given, else 1 + table sum
            "table_tokens_per_step": 1 + expected,
            "heads": report["heads"],
            "threads": rule_costs.get("threads"),
            "step_cost_ar_steps": rule_costs.get("relative", {}).get(size + 1),
        }
        tree = Tree.from_paths(paths, meta)
        stem = f"{model_name}-{rule}-{size}"
        tree.to_json(trees_dir / f"{stem}.json")
        draw_tree(tree, trees_dir / f"{stem}.png", acc, f"{stem}: predicted {predicted:.2f} tokens/step")
        if heads_dir is not None:
            tree.to_json(Path(heads_dir) / f"tree-{rule}.json")
        for n in sweep_sizes:
            if n in trees:
                sweep_meta = {"builder": "greedy", "rule": rule, "size": n, "table_tokens_per_step": 1 + trees[n][1]}
                Path(sweep_dir).mkdir(parents=True, exist_ok=True)
                Tree.from_paths(trees[n][0], sweep_meta).to_json(Path(sweep_dir) / f"{model_name}-{rule}-{n}.json")
        summary["rules"][rule] = {
            "size": size,
            "expected_tokens_per_step": predicted,
            "file": f"{stem}.json",
            "sweep": rows,
        }
    return summary


def measure_accepted(run, prompts, max_new_tokens, seed: int = 0, **kw) -> dict:
    """Mean tokens per verification pass of a bound decoder `run` over prompts (each with its own seed)."""
    accepted, steps, tokens, seconds = 0, 0, 0, 0.0
    for i, (prompt, cap) in enumerate(zip(prompts, max_new_tokens, strict=True)):
        out = run(
            torch.as_tensor(prompt)[None], max_new_tokens=cap, generator=torch.Generator().manual_seed(seed + i), **kw
        )
        accepted += sum(out.accepted_lengths)
        steps += len(out.accepted_lengths)
        tokens += out.new_tokens
        seconds += out.seconds
    return {"mean_accepted": accepted / max(1, steps), "tokens": tokens, "tokens_per_second": tokens / seconds}

"""Measured step costs on this machine: what one verification pass of n tree nodes costs vs one AR step.

The tree builder divides expected tokens per step by these costs to pick the tree size that maximises
tokens per second, so they are measured with the engine's own `verify` on its own cache, not guessed.
Timings on a shared CPU drift: every measurement here is interleaved (one call of each candidate per
round) and summarised by its median, so drift hits all sizes alike.
"""

import statistics
import time
from collections.abc import Callable

import torch

from .cache import BufferCache, num_decoder_layers
from .generate import output_logits, split_model, verify
from .tree import Tree


def interleaved_medians(fns: dict, repeats: int = 20, warmup: int = 3) -> dict:
    """{name: median seconds} of calling each fn() once per round, rounds interleaving all names."""
    times: dict = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def verify_pass(model, n: int, prefix_len: int = 128) -> Callable[[], None]:
    """A closure running one engine verification pass over n nodes after a cached prefix, then undoing it."""
    body, out_layer = split_model(model)
    dtype, device = out_layer.weight.dtype, model.device
    vocab = out_layer.weight.shape[0]
    cache = BufferCache(num_decoder_layers(model), prefix_len + n)
    with torch.no_grad():
        body(input_ids=torch.randint(0, vocab, (1, prefix_len), device=device), past_key_values=cache, use_cache=True)
    tree = Tree.from_paths([[r] for r in range(n - 1)]) if n > 1 else None  # any shape of n nodes costs the same
    bias = tree.attention_bias(dtype).to(device) if tree else torch.zeros(1, 1, dtype=dtype, device=device)
    depths = tree.depths.to(device) if tree else torch.zeros(1, dtype=torch.long, device=device)
    mask = torch.zeros(1, 1, n, prefix_len + n, dtype=dtype, device=device)
    tokens = torch.randint(0, vocab, (n,), device=device)

    @torch.no_grad()
    def run():
        states = verify(body, tokens, bias, depths, mask, cache, prefix_len)
        output_logits(out_layer, states[0])  # the walk reads at least the root's logits
        cache.crop(-n)

    return run


def step_costs(model, sizes=(1, 4, 8, 16, 32, 64, 128), prefix_len: int = 128, repeats: int = 20) -> dict:
    """{"threads", "prefix_len", "seconds": {n: s}, "relative": {n: s / s_1}} for verification passes of n nodes.

    n = 1 is a plain AR step (root only), so relative[n] is the cost of n nodes in AR steps.
    """
    sizes = sorted(set(sizes) | {1})
    seconds = interleaved_medians({n: verify_pass(model, n, prefix_len) for n in sizes}, repeats)
    return {
        "threads": torch.get_num_threads(),
        "prefix_len": prefix_len,
        "seconds": seconds,
        "relative": {n: seconds[n] / seconds[1] for n in sizes},
    }


def step_parts(model, drafter, tree: Tree, logits_processor=None, prefix_len: int = 128, tolerance: int = 3):
    """Closures for the parts of one engine step on `tree` after a cached prefix, as `vadusa.generate` runs
    them, each leaving the state as it found it: {"draft", "verify", "walk", "keep"} and "step" (all four
    in a row, each feeding the next); "cache" is the base's KV cache they share.

    draft   the heads' logits and top-k; or the feature drafter's commit of 4 rows and its per-depth calls
    verify  the verification pass over every node
    walk    the output layer over every node, the processors per depth, the rule, the integer walk
    keep    cache compaction to a path of the tree's depth, and the emitted tokens' bookkeeping
    """
    from .accept import get_rule
    from .drafter import DraftSession, FeatureDrafter, tree_plan
    from .generate import draft_tokens, node_probs, walk, walk_buffers
    from .processors import as_processor

    body, out_layer = split_model(model)
    dtype, device = out_layer.weight.dtype, model.device
    vocab, n = out_layer.weight.shape[0], len(tree)
    processor = as_processor(logits_processor)
    cache = BufferCache(num_decoder_layers(model), prefix_len + n)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, prefix_len), generator=g).to(device)
    with torch.no_grad():
        prefix_states = body(input_ids=prefix, past_key_values=cache, use_cache=True).last_hidden_state[0]
    cache.crop(-1)  # the root is re-fed by every step
    past = prefix_len - 1
    bias, depths, buffers = tree.attention_bias(dtype).to(device), tree.depths.to(device), walk_buffers(tree, device)
    mask = torch.zeros(1, 1, n, prefix_len + n, dtype=dtype, device=device)
    rule = get_rule("tolerance", tolerance)
    feature = isinstance(drafter, FeatureDrafter)
    if feature:
        session, plan = DraftSession(drafter, model, prefix_len + n + 8), tree_plan(tree, dtype)
        with torch.no_grad():
            session.commit(prefix[0, 1:], prefix_states[:-1])
    history, root = prefix, prefix[0, -1]
    deepest = int(tree.depths.argmax())
    path = tree.ancestor_mask[deepest].nonzero().flatten().tolist()  # a path as deep as the tree
    state = {}

    @torch.no_grad()
    def draft():
        if feature:
            length = session.length
            feat = session.commit(prefix[0, -4:], prefix_states[-4:])  # a typical step commits ~4 rows
            state["tokens"] = session.draft(plan, root, feat, history, processor)
            session.length = length
        else:
            state["tokens"] = draft_tokens(drafter, prefix_states[-1], root, tree, history, processor)

    @torch.no_grad()
    def verify_pass_(keep_rows=False):
        state["states"] = verify(body, state["tokens"], bias, depths, mask, cache, past)
        if not keep_rows:
            cache.crop(-n)

    @torch.no_grad()
    def walk_():
        logits = output_logits(out_layer, state["states"])  # (n, V)
        probs = node_probs(logits, state["tokens"], history, buffers, processor, 1.0, None)
        walk(probs, state["tokens"], buffers, rule, rule.uniforms(n, buffers.child_index.shape[1], g))

    @torch.no_grad()
    def keep(after_verify=False):
        if not after_verify:  # n rows to compact, as a verification pass leaves them
            for layer in cache.layers:
                layer.update(layer.key_buffer[:, :, :n], layer.value_buffer[:, :, :n])
        cache.keep(past, path)
        state["tokens"][path[1:]].tolist()
        cache.crop(-(len(path)))

    def step():
        draft()
        verify_pass_(keep_rows=True)
        walk_()
        keep(after_verify=True)

    draft()
    verify_pass_()
    parts = {"draft": draft, "verify": verify_pass_, "walk": walk_, "keep": keep, "step": step}
    parts["cache"] = cache  # what the parts share, for checks
    return parts


def tree_step(model, drafter, tree: Tree, logits_processor=None, prefix_len: int = 128, tolerance: int = 3):
    """A closure running one whole engine step on `tree` (draft, verify, walk, keep; `step_parts`)."""
    return step_parts(model, drafter, tree, logits_processor, prefix_len, tolerance)["step"]


def ar_step(model, logits_processor=None, prefix_len: int = 128):
    """A closure running one `generate_ar` step (one-token forward, output layer, processors, a draw)."""
    from .accept import sample
    from .generate import logits_to_probs
    from .processors import as_processor

    body, out_layer = split_model(model)
    vocab = out_layer.weight.shape[0]
    processor = as_processor(logits_processor)
    cache = BufferCache(num_decoder_layers(model), prefix_len + 1)
    prefix = torch.randint(0, vocab, (1, prefix_len), generator=torch.Generator().manual_seed(0)).to(model.device)
    with torch.no_grad():
        body(input_ids=prefix[:, :-1], past_key_values=cache, use_cache=True)

    @torch.no_grad()
    def run():
        hidden = body(input_ids=prefix[:, -1:], past_key_values=cache, use_cache=True).last_hidden_state[0, -1]
        sample(logits_to_probs(output_logits(out_layer, hidden), prefix, processor, 1.0, None))
        cache.crop(-1)

    return run


def tree_step_costs(model, drafter, trees: dict, logits_processor=None, repeats: int = 20) -> dict:
    """{"threads", "ar_seconds", "seconds": {nodes incl. root: s}, "relative": {...: s / AR step}} of whole
    engine steps on each of `trees` ({size: paths}), measured interleaved with an AR step."""
    fns = {"ar": ar_step(model, logits_processor)}
    fns |= {len(p) + 1: tree_step(model, drafter, Tree.from_paths(p), logits_processor) for p in trees.values()}
    seconds = interleaved_medians(fns, repeats)
    ar = seconds.pop("ar")
    return {
        "threads": torch.get_num_threads(),
        "ar_seconds": ar,
        "seconds": seconds,
        "relative": {n: s / ar for n, s in seconds.items()},
    }

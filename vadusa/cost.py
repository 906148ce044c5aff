"""Measured step costs on this machine: what one verification pass of n tree nodes costs vs one AR step.

The tree builder divides expected tokens per step by these costs to pick the tree size that maximises
tokens per second, so they are measured with the engine's own `verify` on its own cache, not guessed.
"""

import statistics
import time

import torch

from .cache import BufferCache, num_decoder_layers
from .generate import split_model, verify
from .tree import Tree


def wide_tree(n: int) -> Tree:
    """A tree of n nodes (root included); a verification pass costs the same for any shape of that size."""
    return Tree.from_paths([[r] for r in range(n - 1)]) if n > 1 else None


@torch.no_grad()
def verify_seconds(model, n: int, prefix_len: int = 128, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of one engine verification pass over n nodes after a cached prefix of prefix_len tokens."""
    body, out_layer = split_model(model)
    dtype, device = out_layer.weight.dtype, model.device
    vocab = out_layer.weight.shape[0]
    cache = BufferCache(num_decoder_layers(model), prefix_len + n)
    prefix = torch.randint(0, vocab, (1, prefix_len), device=device)
    body(input_ids=prefix, past_key_values=cache, use_cache=True)
    tree = wide_tree(n)
    bias = tree.attention_bias(dtype).to(device) if tree else torch.zeros(1, 1, dtype=dtype, device=device)
    depths = tree.depths.to(device) if tree else torch.zeros(1, dtype=torch.long, device=device)
    mask = torch.zeros(1, 1, n, prefix_len + n, dtype=dtype, device=device)
    tokens = torch.randint(0, vocab, (n,), device=device)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        states = verify(body, tokens, bias, depths, mask, cache, prefix_len)
        out_layer(states[0])  # the walk reads at least the root's logits
        if i >= warmup:
            times.append(time.perf_counter() - start)
        cache.crop(-n)
    return statistics.median(times)


def step_costs(model, sizes=(1, 4, 8, 16, 32, 64, 128), prefix_len: int = 128, repeats: int = 20) -> dict:
    """{"threads", "prefix_len", "seconds": {n: s}, "relative": {n: s / s_1}} for verification passes of n nodes.

    n = 1 is a plain AR step (root only), so relative[n] is the cost of n nodes in AR steps.
    """
    sizes = sorted(set(sizes) | {1})
    seconds = {n: verify_seconds(model, n, prefix_len, repeats) for n in sizes}
    return {
        "threads": torch.get_num_threads(),
        "prefix_len": prefix_len,
        "seconds": seconds,
        "relative": {n: seconds[n] / seconds[1] for n in sizes},
    }

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
from .generate import split_model, verify
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
        out_layer(states[0])  # the walk reads at least the root's logits
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

"""CPU layouts and kernels for the few-row matrix products of decoding.

`nn.Linear` computes x @ W.T with W stored (out, in). For the 1 to 16 rows a decoding forward carries,
MKL's GEMM is markedly faster when W.T is the contiguous array, i.e. when W is stored as the transpose
of an (in, out) tensor (measured on a 2-core Xeon, 1 thread: a 256 -> 768 layer takes 11 -> 7 us for 1
row, 26 -> 17 us for 8). `transpose_linear_weights` re-stores every Linear weight that way: the same
values, modules and parameter names, only the strides change, so outputs agree up to float rounding.
Copies keep the layout (`copy.deepcopy`, peft's merge), so a block student made from a transposed base
is transposed too. A weight shared with the input embedding (tied output layer) is left alone, so token
lookups stay row-contiguous.

`multirow_onednn` sends products of more than two rows (verification passes, block windows) to oneDNN's
packed-weight kernel where `onednn_pays` measures it faster; the demo pipeline does both at load.
"""

import time
import weakref

import torch
from torch import nn


def transpose_linear_weights(model: nn.Module) -> nn.Module:
    """Store every Linear weight of `model` as the transpose of a contiguous (in, out) tensor; returns `model`."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = embeddings.weight if embeddings is not None else None
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and weight is not tied and weight.is_contiguous():
            with torch.no_grad():
                module.weight = nn.Parameter(weight.t().contiguous().t(), requires_grad=weight.requires_grad)
    return model


# ----- oneDNN for few-row products of more than two rows -----
# On the AMD EPYC this project was measured on, MKL's GEMM costs about 5x a one-row product for 9 rows, where
# oneDNN's packed-weight kernel costs 1.5x (a 256 -> 768 layer: 57 vs 29 us; one row: MKL 12 us, oneDNN 20 us).
# A verification pass carries several rows, an AR step one: `multirow_onednn` sends products of more than two
# rows to oneDNN and leaves the rest to MKL. Whether it pays is the machine's business: `onednn_pays` measures it.
_PACKED: dict = {}  # id(weight) -> (weakref to the weight, (version, data_ptr) when packed, packed weight)


def _version(t: torch.Tensor):
    return None if t.is_inference() else t._version  # inference tensors cannot change in place


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of a (out, in) float32 weight, made once and again only if the weight changed.

    Kept beside the module, not on it, so `copy.deepcopy` of a model (the block student's merge) works: a copy's
    weight is another tensor and gets its own packing; a weight that is freed drops its entry."""
    key = (_version(weight), weight.data_ptr())
    found = _PACKED.get(id(weight))
    if found is None or found[0]() is not weight or found[1] != key:
        if found is None or found[0]() is not weight:
            weakref.finalize(weight, _PACKED.pop, id(weight), None)
        with torch.no_grad():
            found = (weakref.ref(weight), key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        _PACKED[id(weight)] = found
    return found[2]


class MultirowLinear(nn.Linear):
    """nn.Linear whose inference products of more than `MKL_ROWS` rows run on oneDNN's packed weights (same
    parameters, names and state dict; training, other dtypes and devices take nn.Linear's path)."""

    MKL_ROWS = 2  # products of at most this many rows stay with MKL (faster for one row)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // max(1, x.shape[-1])
        plain = rows <= self.MKL_ROWS or w.dtype != torch.float32 or w.device.type != "cpu" or x.dtype != w.dtype
        if plain or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return nn.functional.linear(x, w, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed_weight(w), self.bias, "none", [], "")


def multirow_onednn(model: nn.Module) -> nn.Module:
    """Make every plain nn.Linear of `model` a `MultirowLinear` (in place); returns `model`."""
    if not torch.backends.mkldnn.is_available():
        return model
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MultirowLinear
    return model


def onednn_pays(features: int = 256, out: int = 768, rows: int = 9, repeats: int = 200) -> bool:
    """Whether oneDNN's packed kernel beats MKL by 20% on a `rows`-row product on this machine, now."""
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, features, generator=g), torch.randn(out, features, generator=g)
    w = w.t().contiguous().t()  # the layout transpose_linear_weights gives
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)

    def best(fn) -> float:
        for _ in range(20):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    with torch.inference_mode():
        mkl = best(lambda: nn.functional.linear(x, w))
        onednn = best(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
    return onednn * 1.2 < mkl

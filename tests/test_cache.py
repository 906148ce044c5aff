"""BufferCache: in-place writes, compaction to an accepted path, crop."""

import pytest
import torch

from vadusa.cache import BufferCache


def filled(layers=2, length=10, max_len=16, seed=0):
    """A cache whose layers hold `length` random positions, and the keys / values written."""
    g = torch.Generator().manual_seed(seed)
    cache = BufferCache(layers, max_len)
    written = []
    for layer in cache.layers:
        k, v = torch.randn(1, 2, length, 4, generator=g), torch.randn(1, 2, length, 4, generator=g)
        keys, values = layer.update(k, v)
        assert torch.equal(keys, k) and torch.equal(values, v)
        written.append((k, v))
    return cache, written


@pytest.mark.parametrize("path", [[0, 2, 3], [0, 1, 2], [0], [0, 1, 4, 5]])
def test_keep_compacts_every_layer_to_the_prefix_and_the_path(path):
    start = 4
    cache, written = filled()
    cache.keep(start, path)
    index = torch.tensor([*range(start), *(start + p for p in path)])
    for layer, (k, v) in zip(cache.layers, written, strict=True):
        assert layer.get_seq_length() == start + len(path)
        assert torch.equal(layer.keys, k[:, :, index]) and torch.equal(layer.values, v[:, :, index])
    assert cache.get_seq_length() == start + len(path)


def test_keep_then_write_continues_after_the_path_and_crop_drops_the_end():
    cache, written = filled()
    cache.keep(6, [0, 1])  # a walk down a chain: already in place
    layer, (k, _) = cache.layers[0], written[0]
    new = torch.ones(1, 2, 3, 4)
    keys, _ = layer.update(new, new)
    assert keys.shape[2] == 11 and torch.equal(keys[:, :, :8], k[:, :, :8]) and torch.equal(keys[:, :, 8:], new)
    layer.crop(-5)
    assert layer.get_seq_length() == 6 and torch.equal(layer.keys, k[:, :, :6])
    with pytest.raises(ValueError, match="negative count"):
        layer.crop(2)


def test_overflow_is_an_error_naming_the_buffer():
    cache, _ = filled(length=10, max_len=12)
    with pytest.raises(RuntimeError, match="13 positions needed, buffer holds max_len=12"):
        cache.layers[0].update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))

"""A pre-allocated KV cache for stock transformers models, with in-place compaction.

transformers' `DynamicCache` grows by `torch.cat`, copying every layer's keys and values on every
forward. `BufferCache` allocates each layer once (max_len positions) and writes new entries in
place; `keep` compacts the cache to an accepted tree path without touching the prefix.
Its layers are plain (non-sliding) layers whatever the model config says, so compaction never has
to keep a sliding window's bookkeeping in sync (the 4D masks the engine passes decide visibility).

Batches whose rows hold different numbers of positions (batched speculative decoding: each row accepts
its own number of tokens per step) use the ragged mode: `set_starts(starts)` before a forward makes every
layer write row b's new entries at starts[b], starts[b]+1, ...; the layer's views reach the end of the
longest row, and the caller's per-row 4D masks hide what lies beyond each row's own length.
`keep_rows` compacts every row to its own accepted path; `select_rows` drops finished rows.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer


class BufferLayer(DynamicLayer):
    """One layer's keys/values in a buffer of `max_len` positions; `keys`/`values` are views of the filled part."""

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.length = 0  # filled positions (ragged mode: the end of the longest row)
        self.starts = None  # (B,) ragged mode: where each row's next entries go (None: every row at `length`)
        self.max_start = 0  # int(starts.max()), kept so a forward needs no device sync

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, dk = key_states.shape
        self.key_buffer = key_states.new_zeros(b, h, self.max_len, dk)  # (B, heads, max_len, d)
        self.value_buffer = value_states.new_zeros(b, h, self.max_len, value_states.shape[-1])
        self._set_views()
        self.is_initialized = True

    def _set_views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.starts is not None:
            return self._update_rows(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions needed, buffer holds max_len={self.max_len}")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._set_views()
        return self.keys, self.values

    def _update_rows(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Ragged write: row b's n new entries at starts[b] .. starts[b] + n - 1."""
        b, _, n, _ = key_states.shape
        end = self.max_start + n
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions needed, buffer holds max_len={self.max_len}")
        rows = torch.arange(b, device=key_states.device)[:, None]  # (B, 1)
        cols = self.starts[:, None] + torch.arange(n, device=key_states.device)  # (B, n)
        self.key_buffer[rows, :, cols] = key_states.transpose(1, 2)  # (B, n, heads, d)
        self.value_buffer[rows, :, cols] = value_states.transpose(1, 2)
        self.length = end
        self._set_views()
        return self.keys, self.values

    def keep_rows(self, starts: torch.Tensor, index: torch.Tensor, max_end: int) -> None:
        """Row b keeps positions starts[b] + index[b] at starts[b], starts[b]+1, ... (index (B, P) ascending;
        a row with fewer kept positions repeats its last one: the copies land past its new length, unused)."""
        if not self.is_initialized:
            return
        rows = torch.arange(index.shape[0], device=index.device)[:, None]  # (B, 1)
        src = starts[:, None] + index  # (B, P)
        dst = starts[:, None] + torch.arange(index.shape[1], device=index.device)  # (B, P)
        self.key_buffer[rows, :, dst] = self.key_buffer[rows, :, src]
        self.value_buffer[rows, :, dst] = self.value_buffer[rows, :, src]
        self.length = max_end
        self._set_views()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (B',) of the buffers (finished rows leave the batch)."""
        if not self.is_initialized:
            return
        self.key_buffer = self.key_buffer[rows]
        self.value_buffer = self.value_buffer[rows]
        self._set_views()

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        # transformers 5.x convention: a negative count of positions to drop from the end.
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)
        if self.is_initialized:
            self._set_views()

    def keep(self, start: int, index: torch.Tensor) -> None:
        """Keep positions start + index (ascending, relative to start) at start, start+1, ...; drop the rest."""
        if not self.is_initialized:
            return
        src = index + start  # (n,)
        n = index.numel()
        self.key_buffer[:, :, start : start + n] = self.key_buffer[:, :, src]
        self.value_buffer[:, :, start : start + n] = self.value_buffer[:, :, src]
        self.length = start + n
        self._set_views()

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._set_views()


class BufferCache(Cache):
    """A `Cache` of `BufferLayer`s, one per decoder layer, each holding up to `max_len` positions."""

    def __init__(self, num_layers: int, max_len: int):
        super().__init__(layers=[BufferLayer(max_len) for _ in range(num_layers)])
        self.max_len = max_len

    def keep(self, start: int, path: list[int]) -> None:
        """Compact every layer to the prefix [0, start) followed by positions start + path (ascending node ids).
        A path that is already in place (0, 1, 2, ...: any walk down a chain) only drops what follows it."""
        if not self.layers[0].is_initialized:
            return
        if path == list(range(len(path))):
            for layer in self.layers:
                layer.crop(start + len(path) - layer.length)
            return
        index = torch.tensor(path, device=self.layers[0].key_buffer.device)
        for layer in self.layers:
            layer.keep(start, index)

    # ----- ragged batches (module doc) -----
    def set_starts(self, starts: torch.Tensor | None) -> None:
        """(B,) where each row's entries of the next forward go (None: back to one length for every row)."""
        max_start = int(starts.max()) if starts is not None else 0
        for layer in self.layers:
            layer.starts, layer.max_start = starts, max_start

    def keep_rows(self, starts: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor) -> None:
        """Compact row b to its prefix [0, starts[b]) + positions starts[b] + index[b]; `lengths` (B,) the rows'
        new lengths (starts + number kept)."""
        max_end = int(lengths.max())
        for layer in self.layers:
            layer.keep_rows(starts, index, max_end)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (B',) in every layer."""
        for layer in self.layers:
            layer.select_rows(rows)


def num_decoder_layers(model) -> int:
    """Number of attention layers of a stock transformers causal LM (Llama `num_hidden_layers`, GPT-2 `n_layer`)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the number of layers from config {type(config).__name__}")

"""KV storage in fixed slots with per-row positions.

Each layer keeps K and V as ``[slots, kv_heads, capacity, head_dim]``. A sequence owns one
slot for its lifetime; running sequences occupy slots ``0..n-1`` so that a decode step reads
``cache[:n, :, :length]`` as a view. When a sequence leaves, the sequence in the last slot
moves into the hole: one sequence's cache is copied, never every sequence's, and nothing is
re-padded. The object also acts as a transformers ``Cache`` for one forward call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize


SWAP_CHUNK = 256  # positions exchanged at a time by swap()


class SlotKVCache:
    def __init__(
        self, shape: KVShape, slots: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.shape = shape
        self.slots = slots
        self.capacity = capacity
        size = (slots, shape.kv_heads, capacity, shape.head_dim)
        self.k = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.v = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.used = 0  # slots 0..used-1 hold sequences
        # per-forward state, set by bind()
        self._rows: slice | None = slice(0, 0)
        self._index = torch.zeros(0, dtype=torch.long)
        self.bound_slots = self._index
        self._positions: torch.Tensor | None = None  # [B, q]
        self._flat_index = torch.zeros(0, dtype=torch.long)  # [B * kv_heads * q] write rows
        self._length = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    # ------------------------------------------------------------------ slots

    def can_allocate(self) -> bool:
        return self.used < self.slots

    def allocate(self) -> int:
        if not self.can_allocate():
            raise RuntimeError("no free KV slot")  # callers check can_allocate first
        self.used += 1
        return self.used - 1

    def free(self, slot: int) -> int | None:
        """Frees ``slot``. If another sequence sits in the last used slot, the caller must
        :meth:`move` it into ``slot``; returns that last slot's number (or None)."""
        last = self.used - 1
        self.used -= 1
        return None if slot == last else last

    def move(self, source: int, target: int, length: int) -> None:
        """Copies one sequence's first ``length`` cached positions to another slot."""
        if length > 0:
            for store in (*self.k, *self.v):
                store[target, :, :length].copy_(store[source, :, :length])

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchanges the first ``length`` positions of two slots, through a scratch buffer of
        at most SWAP_CHUNK positions per layer (no unbudgeted copy of a whole context)."""
        if a == b or length <= 0:
            return
        for store in (*self.k, *self.v):
            for start in range(0, length, SWAP_CHUNK):
                stop = min(start + SWAP_CHUNK, length)
                scratch = store[a, :, start:stop].clone()
                store[a, :, start:stop].copy_(store[b, :, start:stop])
                store[b, :, start:stop].copy_(scratch)

    # ------------------------------------------------------------------ one forward

    def bind(self, slots: list[int], positions: torch.Tensor, length: int) -> None:
        """Prepares a forward over ``slots`` (one per batch row) writing at ``positions``
        ([B, q]) and attending over the first ``length`` cached positions."""
        device = self.k[0].device
        self._index = torch.tensor(slots, dtype=torch.long, device=device)
        self.bound_slots = self._index  # [B] int64: each row's slot
        first = slots[0] if slots else 0
        contiguous = slots == list(range(first, first + len(slots)))
        self._rows = slice(first, first + len(slots)) if contiguous else None
        self._positions = positions
        self._length = length
        # Writes go through index_copy_ on a [slots * kv_heads * capacity, head_dim] view of
        # each layer's store: row (slot * kv_heads + head) * capacity + position; one flat
        # index serves decode, prefill chunks and batched prefill alike.
        heads, capacity = self.shape.kv_heads, self.capacity
        head = torch.arange(heads, device=device).view(1, -1, 1)
        rows = self._index.view(-1, 1, 1) * heads + head  # [B, kvh, 1]
        self._flat_index = (rows * capacity + positions.unsqueeze(1)).reshape(-1)

    # transformers Cache protocol (the parts the attention layers call)
    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: object = None,
        **_extra: object,  # newer transformers pass kwargs=...; nothing in them is needed
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: [B, kv_heads, q, head_dim]
        positions = self._positions
        if positions is None:
            raise RuntimeError("cache used outside a bound forward")
        k_store, v_store = self.k[layer_idx], self.v[layer_idx]
        # key_states: [B, kvh, q, d] -> [B * kvh * q, d], in the order of _flat_index
        depth = k_store.shape[-1]
        k_store.view(-1, depth).index_copy_(
            0, self._flat_index, key_states.reshape(-1, depth).to(k_store.dtype)
        )
        v_store.view(-1, depth).index_copy_(
            0, self._flat_index, value_states.reshape(-1, depth).to(v_store.dtype)
        )
        if self._rows is not None:  # a view, no copy
            return k_store[self._rows, :, : self._length], v_store[self._rows, :, : self._length]
        return (
            k_store[:, :, : self._length].index_select(0, self._index),
            v_store[:, :, : self._length].index_select(0, self._index),
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._length

    def get_mask_sizes(self, *args: object, **kwargs: object) -> tuple[int, int]:
        return self._length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.shape.layers

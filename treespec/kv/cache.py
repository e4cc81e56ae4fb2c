"""Per-request KV cache: contiguous committed prefix + speculative (pending) slots after it.

Invariant: slots [0, length) hold the committed tokens at positions 0..length-1, in order. A forward
reserves its n new tokens after the pending ones and writes their K/V there; pending slots stay visible
to later forwards until `commit` (a drafter grows its tree level by level this way; the target verifies
a whole tree in one forward). `commit` keeps a subset of the pending slots (the accepted tree path) by
moving them to the next contiguous slots, and drops the rest. Plain prefill / decode commits everything.
"""
from __future__ import annotations

import torch

_GROW = 256  # slots added at a time; amortises reallocation without reserving the whole context


class KVCache:
    """K/V for every layer of one request. Shapes: k, v: [layers, kv_heads, capacity, head_dim]."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_len = max_len
        self.length = 0   # committed tokens
        self.pending = 0  # slots written by the latest forward, not yet committed
        shape = (num_layers, num_kv_heads, 0, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.pos = torch.empty(0, dtype=torch.long, device=device)  # [capacity] position of each slot

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def visible(self) -> int:
        """Slots a forward sees: committed + pending."""
        return self.length + self.pending

    def reserve(self, n: int, positions: torch.Tensor | None = None) -> None:
        """Make room for n new pending slots (call once per forward, before it).

        positions: [n] positions of the new tokens (default: right after the visible slots, a chain).
        """
        start = self.visible
        need = start + n
        if need > self.max_len:
            raise ValueError(f"sequence of {need} tokens exceeds the context length {self.max_len}")
        if need > self.capacity:
            new_cap = min(self.max_len, max(need, self.capacity + _GROW, self.capacity * 3 // 2))
            for name in ("k", "v"):
                old = getattr(self, name)
                buf = old.new_empty((self.num_layers, self.num_kv_heads, new_cap, self.head_dim))
                buf[:, :, :start] = old[:, :, :start]
                setattr(self, name, buf)
            pos = self.pos.new_empty(new_cap)
            pos[:start] = self.pos[:start]
            self.pos = pos
        self.pos[start:need] = torch.arange(start, need) if positions is None else positions
        self.pending += n

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's K/V for one layer and return all visible keys/values.

        k_new, v_new: [kv_heads, n, head_dim], the n slots of the latest reserve().
        Returns k, v: [kv_heads, length + pending, head_dim] (committed prefix, then every pending slot).
        """
        end = self.visible
        start = end - k_new.shape[1]
        self.k[layer, :, start:end] = k_new
        self.v[layer, :, start:end] = v_new
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def commit(self, keep: torch.Tensor | list[int] | None = None) -> None:
        """Keep the pending slots `keep` (indices relative to the first pending slot, ascending), drop the rest.

        keep=None keeps every pending slot (prefill, plain decode). For a tree, keep is the accepted
        root-to-node path; its K/V move to slots length, length+1, ... so the prefix stays contiguous.
        """
        if keep is None:
            self.length += self.pending
        else:
            idx = torch.as_tensor(keep, dtype=torch.long)
            m = idx.numel()
            if m and not torch.equal(idx, torch.arange(m)):  # already in place when keep == 0..m-1
                src = idx.to(self.k.device) + self.length
                self.k[:, :, self.length:self.length + m] = self.k[:, :, src]
                self.v[:, :, self.length:self.length + m] = self.v[:, :, src]
            self.pos[self.length:self.length + m] = torch.arange(self.length, self.length + m)
            self.length += m
        self.pending = 0

    def truncate(self, length: int) -> None:
        """Roll back to the first `length` committed tokens."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length, self.pending = length, 0

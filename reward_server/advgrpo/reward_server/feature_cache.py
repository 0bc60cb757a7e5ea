"""A bounded LRU cache of per-image backbone features, keyed by image content.

A frozen backbone maps the same image to the same features forever, and a discriminator sees
the same reference images again and again (Adv-GRPO trains D on 9 of every 10 epochs with
references drawn from a fixed set). The cache keeps those features so a repeated image skips
preprocessing and the backbone.

- Keys are content digests of the uint8 pixels and shape (``models.base.content_digest``), so a
  copy of an image in another memory layout is the same key.
- Values are tensors (the model decides which: the DINO discriminator stores an image's
  transformed tokens [1+N, D] on the model's device). ``put`` stores its own copy, so a value is
  never a view that keeps a whole batch alive, and never aliases a tensor the caller may change.
- The bound is on the total bytes of the stored tensors (``numel * element_size``): inserting
  evicts least recently used entries until the new one fits; an entry larger than the whole
  budget is not cached. ``get`` hits refresh recency.
- ``max_bytes == 0`` disables the cache: ``get`` finds nothing, ``put`` stores nothing, and the
  counters stay at zero (the DINO model hashes every image anyway: the digest seeds its patch
  sampling).

Threading: the host runs each model's calls on one worker thread, so lookups and inserts never
race; the host (or a /metrics scrape) may read ``stats()`` from another thread, and a single lock
around every operation keeps that consistent. Its cost is a few hundred nanoseconds per image,
nothing next to the hashing a lookup needs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["CacheStats", "FeatureCache"]


@dataclass(frozen=True)
class CacheStats:
    hits: int  # lookups that found their key
    misses: int  # lookups that did not
    evictions: int  # entries dropped to make room (replacing a key's value is not an eviction)
    bytes: int  # total bytes of the stored tensors now
    entries: int  # number of stored tensors now
    max_bytes: int  # the budget

    def as_dict(self, prefix: str = "") -> dict[str, int]:
        return {
            f"{prefix}hits": self.hits,
            f"{prefix}misses": self.misses,
            f"{prefix}evictions": self.evictions,
            f"{prefix}bytes": self.bytes,
            f"{prefix}entries": self.entries,
        }


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class FeatureCache:
    """LRU map ``key (bytes) -> tensor``, bounded by the tensors' total bytes."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # oldest first
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: bytes) -> torch.Tensor | None:
        """The stored tensor (do not modify it) or None; counts a hit or a miss."""
        if not self.enabled:
            return None
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key: bytes, value: torch.Tensor) -> bool:
        """Stores a copy of ``value`` as the most recently used entry; False if it cannot fit."""
        if not self.enabled:
            return False
        size = tensor_bytes(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= tensor_bytes(old)
            if size > self.max_bytes:
                return False
            while self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= tensor_bytes(evicted)
                self._evictions += 1
            # Own memory: a row of a batch output would otherwise pin the whole batch.
            self._entries[key] = value.detach().clone(memory_format=torch.contiguous_format)
            self._bytes += size
            return True

    def __contains__(self, key: bytes) -> bool:  # no counting, no recency change
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        """Drops every entry (counters are kept: they are totals)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._hits, self._misses, self._evictions, self._bytes, len(self._entries), self.max_bytes
            )

"""LRU of prompt embeddings: a live stream repeats its prompt every frame, so encode it once.

An entry is whatever conditioning the model's text encoders give one prompt: a tuple of tensors
(SD: the hidden states; SDXL and Flux: hidden states and a pooled vector)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch


class PromptCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self._entries.values() for t in entry)

    def get_many(self, prompts: list[str], encode: Callable[[list[str]], list[tuple[torch.Tensor, ...]]]
                 ) -> tuple[torch.Tensor, ...]:
        """Each conditioning tensor stacked over the prompts ([len(prompts), ...]); misses are encoded
        together in one call."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._entries))
        self.misses += len(missing)  # each distinct prompt is encoded once; repeats in a batch are hits
        self.hits += len(prompts) - len(missing)
        fresh = dict(zip(missing, encode(missing))) if missing else {}
        out = []
        for p in prompts:
            emb = fresh.get(p)
            if emb is None:
                emb = self._entries[p]
                self._entries.move_to_end(p)
            out.append(emb)
        for p, emb in fresh.items():
            if self.capacity > 0:
                self._entries[p] = emb
                if len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        return tuple(torch.stack(parts) for parts in zip(*out))

"""The observed-query window: a ring of the last W queries of one layer of
one sequence (after RoPE), which scores such as attn() read."""
from __future__ import annotations

import torch


class QueryWindow:
    def __init__(self, size: int):
        self.size = size
        self.queries: torch.Tensor | None = None  # [Hq, <=W, D]
        self.positions: torch.Tensor | None = None  # [<=W] long

    def append(self, queries: torch.Tensor, positions: torch.Tensor) -> None:
        """queries [Hq, n, D] at logical positions [n]; keeps the last `size`."""
        if self.size <= 0:
            return
        queries = queries[:, -self.size :].detach()
        positions = positions[-self.size :].detach()
        if self.queries is None:
            self.queries, self.positions = queries.clone(), positions.clone()
        else:
            self.queries = torch.cat([self.queries, queries], dim=1)[:, -self.size :]
            self.positions = torch.cat([self.positions, positions])[-self.size :]

    def __len__(self) -> int:
        return 0 if self.positions is None else int(self.positions.numel())

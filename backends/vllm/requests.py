"""Worker-side state of the requests a policy runs on, and one compression
event of one request inside vLLM's paged cache (tail-aligned compaction).

A request of `logical` tokens physically holds the logical slots
[dropped * bs, logical) of its block table; blocks before are gone (the
scheduler replaced them with vLLM's null block). After an event, each
(layer, kv_head) holds its kept tokens, in position order, in the slots
[dropped' * bs, logical); new tokens keep going to their own logical slots,
so vLLM's positions (RoPE), slot mapping and token counts never change. Only
the attention metadata is a shifted view (vllm032.py). Nothing here imports
vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpolicy.backends.torch import LayerInputs
from kvpolicy.runtime import blocks

from .paged_cpu import PageLayout


@dataclass
class RequestState:
    req_id: str
    prompt_len: int
    prefill_end: int  # logical length at which the (re)computed prefill is done
    run: object  # the policy's SequenceRun
    dropped: int = 0  # whole leading blocks freed
    compacted_at: int = 0  # logical length at the last compaction
    region_pos: torch.Tensor | None = None  # [layers, Hkv, compacted_at - dropped*bs] logical position of each slot
    region_tiers: torch.Tensor | None = None  # the same slots' cascade tiers (cascade policies; later slots are tier 0)
    prefilled: bool = False
    selected: list[int] = field(default_factory=list)  # per layer: the largest per-head selection at the last event
    selected_mean: list[float] = field(default_factory=list)  # per layer: the mean per-head selection (what a per-head cache would hold)
    events: int = 0

    def physical(self, logical: int, block_size: int) -> int:
        return logical - self.dropped * block_size


@dataclass
class StepRow:
    """One batch row of this step, as the metadata builder saw it."""

    state: RequestState
    block_ids: torch.Tensor  # [n_blocks] the request's logical block table
    query_start: int
    query_end: int
    logical: int  # seq_len after this step


class Compressor:
    """Runs a compiled policy on requests whose KV lives in paged caches.

    `engine` is what kvpolicy.backends.compile returns (any backend): used
    through new_sequence / observe / due / compress_layer, and its lowered
    `program` for what the policy observes and when it compresses."""

    def __init__(self, engine, block_size: int, layout: PageLayout):
        self.engine = engine
        self.program = engine.program
        self.block_size = block_size
        self.layout = layout
        self.decode_observes = any(t.kind != "prefill" for t in self.program.policy.triggers)
        self.cascade = bool(self.program.policy.cascade)
        self.shape = self.program.shape

    def new_state(self, req_id: str, prompt_len: int, prefill_end: int) -> RequestState:
        return RequestState(req_id, prompt_len, prefill_end, self.engine.new_sequence())

    def wants_queries(self, row: StepRow) -> bool:
        """Whether this step's queries of the row go into the observed window."""
        if not self.program.observe_window:
            return False
        return not row.state.prefilled or self.decode_observes

    def observe(self, row: StepRow, layer: int, query: torch.Tensor) -> None:
        """query [tokens, Hq, D] of the whole batch (post-RoPE)."""
        window = self.program.observe_window
        lo = max(row.query_start, row.query_end - window)
        positions = torch.arange(row.logical - (row.query_end - lo), row.logical)
        self.engine.observe(row.state.run, layer, query[lo:row.query_end].transpose(0, 1).float(), positions)

    def phase(self, row: StepRow) -> str | None:
        """'prefill' at the step that completes the prompt (the last chunk),
        'decode' at a decode step, None in the middle of a chunked prefill."""
        state = row.state
        if not state.prefilled:
            if row.logical >= state.prefill_end:
                state.prefilled = True
                return "prefill"
            return None
        state.run.decode_step = row.logical - state.prompt_len
        return "decode"

    def compress(self, row: StepRow, caches: list[torch.Tensor], phase: str) -> int | None:
        """One event: the new number of dropped blocks, or None if nothing is freed."""
        state, bs, engine = row.state, self.block_size, self.engine
        logical = row.logical
        physical = state.physical(logical, bs)
        due = [engine.due(state.run, layer, phase, physical) for layer in range(len(caches))]
        if not any(due):
            return None
        slot_block, slot_offset = self._slots(row.block_ids, state.dropped * bs, logical)
        key_pos = self._positions(state, logical)  # [layers, Hkv, physical]
        tiers = self._tiers(state, key_pos) if self.cascade else None
        valid = torch.ones(key_pos.shape[1:], dtype=torch.bool)
        kept, selected, selected_mean = [], [], []
        for layer, cache in enumerate(caches):
            if not due[layer]:
                kept.append(valid)
                selected.append(physical)
                selected_mean.append(float(physical))
                continue
            keys, values = self.layout.read(cache, slot_block, slot_offset)
            inputs = LayerInputs(keys=keys.float(), values=values.float(), valid=valid, key_pos=key_pos[layer],
                                 tiers=None if tiers is None else tiers[layer])
            decision = engine.compress_layer(state.run, layer, inputs)
            # a masked tier is compacted like a dropped token: attention never
            # sees it again either way (merges are refused at startup)
            kept.append(decision.kept)
            if tiers is not None and decision.tiers is not None:
                tiers[layer] = decision.tiers
            per_head = decision.kept.sum(dim=1)
            selected.append(int(per_head.max()))
            selected_mean.append(round(float(per_head.float().mean()), 2))
        state.selected, state.selected_mean, state.events = selected, selected_mean, state.events + 1
        kept, new_physical = blocks.apply(kept, list(key_pos), [valid] * len(caches), logical, physical, bs)
        if new_physical == physical:
            if tiers is not None:  # nothing moves, but tokens changed tier: the whole region is now described
                state.region_pos, state.region_tiers, state.compacted_at = key_pos.clone(), tiers, logical
            return None
        dropped = (logical - new_physical) // bs
        target_block, target_offset = self._slots(row.block_ids, dropped * bs, logical)
        region, region_tiers = [], []
        for layer, cache in enumerate(caches):
            # kept slots in position order (the region is already position-sorted per head)
            order = torch.sort((~kept[layer]).to(torch.int8), dim=1, stable=True).indices[:, :new_physical]
            keys, values = self.layout.read(cache, slot_block[order], slot_offset[order])  # gathered first: sources may be overwritten
            self.layout.write(cache, target_block, target_offset, keys, values)
            region.append(torch.gather(key_pos[layer], 1, order))
            if tiers is not None:
                region_tiers.append(torch.gather(tiers[layer], 1, order))
        state.region_pos = torch.stack(region)
        state.region_tiers = torch.stack(region_tiers) if tiers is not None else None
        state.dropped, state.compacted_at = dropped, logical
        return dropped

    def _slots(self, block_ids: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block id, offset) of logical slots start..end-1."""
        index = torch.arange(start, end)
        return block_ids[index // self.block_size].long(), index % self.block_size

    def _tiers(self, state: RequestState, key_pos: torch.Tensor) -> torch.Tensor:
        """[layers, Hkv, physical] cascade tier of each slot (new tokens are in tier 0)."""
        tiers = torch.zeros_like(key_pos)
        if state.region_tiers is not None:
            tiers[..., : state.region_tiers.shape[-1]] = state.region_tiers
        return tiers

    def _positions(self, state: RequestState, logical: int) -> torch.Tensor:
        """[layers, Hkv, physical] logical position held in each physical slot."""
        layers, heads = self.shape.num_layers, self.shape.num_kv_heads
        tail = torch.arange(state.compacted_at if state.region_pos is not None else state.dropped * self.block_size, logical)
        tail = tail.expand(layers, heads, -1)
        if state.region_pos is None:
            return tail.clone()
        return torch.cat([state.region_pos, tail], dim=2)

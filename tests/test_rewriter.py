"""Invariants of the runtime core (block pool, paged store, rewriter): no block
lost or freed twice, kept K/V bit-identical, logical positions unchanged,
blocks held match the physical length."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvpolicy.runtime import (
    INVALID_POSITION,
    BlockLeak,
    BlockPool,
    DoubleFree,
    InvalidKeep,
    Layout,
    PagedKV,
    PoolExhausted,
    compact,
    sequence_stats,
    store_stats,
)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def make_store(layers=1, heads=2, head_dim=1, block_size=4, num_blocks=4) -> PagedKV:
    return PagedKV(
        num_layers=layers, num_kv_heads=heads, head_dim=head_dim, block_size=block_size, num_blocks=num_blocks
    )


def position_coded_kv(layers: int, heads: int, start: int, count: int, head_dim: int = 1):
    """K = logical position + 1000 * (layer * 10 + head), V = -K: every value
    says where it came from, which makes layout assertions readable."""
    pos = torch.arange(start, start + count, dtype=torch.float32)
    origin = (torch.arange(layers)[:, None] * 10 + torch.arange(heads)[None, :]).float() * 1000
    keys = (pos[None, None, :] + origin[..., None])[..., None].expand(layers, heads, count, head_dim).contiguous()
    return keys, -keys


# ---------------------------------------------------------------------------
# Property test: random interleavings of appends, compactions and frees.


class RewriterMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.integers(1, 16),
        layers=st.integers(1, 3),
        heads=st.integers(1, 4),
        head_dim=st.integers(1, 3),
        num_seqs=st.integers(1, 3),
        num_blocks=st.integers(0, 40),
    )
    def setup(self, block_size, layers, heads, head_dim, num_seqs, num_blocks):
        self.store = PagedKV(
            num_layers=layers, num_kv_heads=heads, head_dim=head_dim, block_size=block_size, num_blocks=num_blocks
        )
        self.seq_ids = [f"seq{i}" for i in range(num_seqs)]
        # Reference model, independent of the store: per (seq, layer, head),
        # logical position -> (key row, value row) of every token still kept.
        self.reference: dict[tuple, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.tokens_appended: dict[str, int] = {}
        for seq_id in self.seq_ids:
            self._start(seq_id)

    def _start(self, seq_id):
        self.store.add_sequence(seq_id)
        self.tokens_appended[seq_id] = 0
        for layer in range(self.store.num_layers):
            for head in range(self.store.num_kv_heads):
                self.reference[(seq_id, layer, head)] = {}

    def _snapshot(self, seq_id):
        state = self.store.sequence(seq_id)
        return (
            list(state.block_ids),
            state.physical_length,
            state.logical_length,
            state.positions.clone(),
            state.valid.clone(),
            self.store.pool.num_free,
        )

    @rule(data=st.data(), count=st.integers(0, 20), seed=st.integers(0, 2**31 - 1))
    def append(self, data, count, seed):
        seq_id = data.draw(st.sampled_from(self.seq_ids))
        store, state = self.store, self.store.sequence(seq_id)
        generator = torch.Generator().manual_seed(seed)
        shape = (store.num_layers, store.num_kv_heads, count, store.head_dim)
        keys = torch.randn(shape, generator=generator)
        values = torch.randn(shape, generator=generator)
        blocks_needed = ceil_div(state.physical_length + count, store.block_size) - len(state.block_ids)
        if blocks_needed > store.pool.num_free:
            before = self._snapshot(seq_id)
            with pytest.raises(PoolExhausted):
                store.append(seq_id, keys, values)
            after = self._snapshot(seq_id)
            assert before[:3] == after[:3] and before[5] == after[5]
            assert torch.equal(before[3], after[3]) and torch.equal(before[4], after[4])
            event("append: pool exhausted")
            return
        start_logical, start_physical = state.logical_length, state.physical_length
        written = store.append(seq_id, keys, values)
        assert written.tolist() == list(range(start_physical, start_physical + count))
        self.tokens_appended[seq_id] += count
        for layer in range(store.num_layers):
            for head in range(store.num_kv_heads):
                ref = self.reference[(seq_id, layer, head)]
                for i in range(count):
                    ref[start_logical + i] = (keys[layer, head, i].clone(), values[layer, head, i].clone())

    @rule(
        data=st.data(),
        layout=st.sampled_from(list(Layout)),
        pattern=st.sampled_from(["random", "all", "none", "first", "last"]),
        keep_probability=st.sampled_from([0.1, 0.5, 0.9]),
        as_indices=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def compact(self, data, layout, pattern, keep_probability, as_indices, seed):
        # Prefer sequences holding tokens: compacting an empty one teaches little
        # (test_compact_empty_sequence covers it).
        holding = [s for s in self.seq_ids if self.store.sequence(s).physical_length]
        seq_id = data.draw(st.sampled_from(holding or self.seq_ids))
        store, state = self.store, self.store.sequence(seq_id)
        length = state.physical_length
        valid = state.valid[..., :length]
        generator = torch.Generator().manual_seed(seed)
        if pattern == "random":
            kept = valid & (torch.rand(valid.shape, generator=generator) < keep_probability)
        elif pattern == "all":
            kept = valid.clone()
        elif pattern == "none":
            kept = torch.zeros_like(valid)
        else:  # first / last n valid tokens of each head, n random per head
            rank = valid.cumsum(-1) if pattern == "first" else valid.flip(-1).cumsum(-1).flip(-1)
            limit = torch.randint(0, 6, valid.shape[:2], generator=generator)[..., None]
            kept = valid & (rank <= limit)
        if as_indices:
            kept_arg = [[row.nonzero().flatten() for row in layer] for layer in kept]
        else:
            kept_arg = kept

        positions_before = state.positions[..., :length].clone()
        blocks_before = list(state.block_ids)
        free_before = store.pool.num_free
        result = compact(store, seq_id, kept_arg, layout)
        event(f"compact {layout.value}: {'freed blocks' if result.freed_block_ids else 'freed none'}")
        rank = kept.cumsum(-1) - 1
        if layout is Layout.FLATTEN_MAX and (rank != torch.arange(length))[kept].any():
            event("compact flatten_max: tokens moved")

        counts = kept.sum(-1)
        assert torch.equal(result.kept_counts, counts)
        assert torch.equal(state.head_lengths(), counts)
        assert state.logical_length == self.tokens_appended[seq_id]
        # Freed blocks are exactly the dropped tail of the block table.
        assert state.block_ids == blocks_before[: len(state.block_ids)]
        assert result.freed_block_ids == blocks_before[len(state.block_ids) :]
        assert store.pool.num_free == free_before + len(result.freed_block_ids)
        if layout is Layout.FLATTEN_MAX:
            assert state.physical_length == (int(counts.max()) if counts.numel() else 0)
            prefix = torch.arange(state.capacity)[None, None, :] < counts[..., None]
            assert torch.equal(state.valid, prefix)
        else:
            # Nothing moved: each kept token keeps its physical slot.
            new_length = state.physical_length
            assert torch.equal(state.valid[..., :new_length], kept[..., :new_length])
            assert not kept[..., new_length:].any()
            assert torch.equal(
                state.positions[..., :new_length][kept[..., :new_length]],
                positions_before[..., :new_length][kept[..., :new_length]],
            )
        # Reference: drop what was not kept.
        for layer in range(store.num_layers):
            for head in range(store.num_kv_heads):
                kept_positions = set(positions_before[layer, head][kept[layer, head]].tolist())
                ref = self.reference[(seq_id, layer, head)]
                for position in list(ref):
                    if position not in kept_positions:
                        del ref[position]

    @rule(data=st.data())
    def free_and_restart(self, data):
        seq_id = data.draw(st.sampled_from(self.seq_ids))
        held = list(self.store.sequence(seq_id).block_ids)
        free_before = self.store.pool.num_free
        released = self.store.free(seq_id)
        assert released == held
        assert self.store.pool.num_free == free_before + len(held)
        assert seq_id not in self.store
        self._start(seq_id)

    @precondition(lambda self: hasattr(self, "store"))
    @invariant()
    def blocks_accounted_for(self):
        store = self.store
        self.store.check_consistency()
        # Independent of check_consistency: recount from the block tables.
        held = [b for s in self.seq_ids for b in store.sequence(s).block_ids]
        assert len(held) == len(set(held)), "a block is held twice"
        free = store.pool.free_ids()
        assert not (set(held) & free), "a held block is also free"
        assert len(held) + store.pool.num_free == store.num_blocks, "a block was lost"
        assert store_stats(store).blocks_held == len(held)

    @precondition(lambda self: hasattr(self, "store"))
    @invariant()
    def kept_tokens_are_what_was_appended(self):
        store = self.store
        for seq_id in self.seq_ids:
            state = store.sequence(seq_id)
            assert state.logical_length == self.tokens_appended[seq_id]
            assert len(state.block_ids) == ceil_div(state.physical_length, store.block_size)
            stats = sequence_stats(store, seq_id)
            assert stats.kv_bytes == len(state.block_ids) * store.bytes_per_block
            for layer in range(store.num_layers):
                for head in range(store.num_kv_heads):
                    keys, values, positions = store.gather(seq_id, layer, head)
                    ref = self.reference[(seq_id, layer, head)]
                    # Physical order is append order, so logical positions ascend.
                    assert positions.tolist() == sorted(ref)
                    assert stats.kept[layer][head] == len(ref)
                    for i, position in enumerate(positions.tolist()):
                        ref_key, ref_value = ref[position]
                        assert torch.equal(keys[i], ref_key)
                        assert torch.equal(values[i], ref_value)


RewriterMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_rewriter_state_machine = RewriterMachine.TestCase


# ---------------------------------------------------------------------------
# Examples: exact layouts.


def test_flatten_max_exact_slot_layout():
    store = make_store(layers=1, heads=2, block_size=4, num_blocks=4)
    store.add_sequence("a")
    keys, values = position_coded_kv(1, 2, 0, 6)
    store.append("a", keys, values)
    assert store.block_table("a") == [0, 1]

    result = compact(store, "a", [[torch.tensor([1, 4, 5]), [0, 2]]], "flatten_max")

    assert result.previous_physical_length == 6 and result.physical_length == 3
    assert result.freed_block_ids == [1]
    assert store.block_table("a") == [0]
    state = store.sequence("a")
    assert state.positions[0].tolist() == [[1, 4, 5, INVALID_POSITION], [0, 2, INVALID_POSITION, INVALID_POSITION]]
    assert state.valid[0].tolist() == [[True, True, True, False], [True, True, False, False]]
    # Raw storage in block 0: head 0 slots 0..2 hold positions 1, 4, 5; head 1 slots 0..1 hold 0, 2.
    raw_keys = store.keys(0)[0, :, :, 0]
    assert raw_keys[0, :3].tolist() == [1.0, 4.0, 5.0]
    assert raw_keys[1, :2].tolist() == [1000.0, 1002.0]
    assert store.values(0)[0, 0, :3, 0].tolist() == [-1.0, -4.0, -5.0]
    assert state.logical_length == 6

    # The next token lands at physical slot 3 for both heads, logical position 6;
    # head 1 carries a hole at slot 2.
    keys, values = position_coded_kv(1, 2, 6, 1)
    assert store.append("a", keys, values).tolist() == [3]
    assert state.positions[0, :, 3].tolist() == [6, 6]
    assert state.valid[0].tolist() == [[True] * 4, [True, True, False, True]]
    k, v, pos = store.gather("a", 0, 1)
    assert pos.tolist() == [0, 2, 6] and k[:, 0].tolist() == [1000.0, 1002.0, 1006.0]
    assert store.slot_mapping("a", torch.tensor([0, 3])).tolist() == [0, 3]
    store.check_consistency()


def test_mask_layout_moves_nothing_and_trims_only_dead_tail():
    store = make_store(layers=1, heads=2, block_size=2, num_blocks=4)
    store.add_sequence("a")
    keys, values = position_coded_kv(1, 2, 0, 7)
    store.append("a", keys, values)
    raw_before = store.kv_caches[0].clone()

    # Both heads drop slots 4..6: blocks 2 and 3 (slots 4..7) are dead for every
    # head and are freed; slot 1 is a hole in head 0 only, block 0 stays.
    result = compact(store, "a", [[[0, 2, 3], [0, 1, 3]]], "mask")

    assert torch.equal(store.kv_caches[0], raw_before)
    assert result.physical_length == 4 and result.freed_block_ids == [2, 3]
    state = store.sequence("a")
    assert state.valid[0].tolist() == [[True, False, True, True], [True, True, False, True]]
    assert state.positions[0].tolist() == [[0, -1, 2, 3], [0, 1, -1, 3]]
    k, _, pos = store.gather("a", 0, 0)
    assert pos.tolist() == [0, 2, 3] and k[:, 0].tolist() == [0.0, 2.0, 3.0]

    # A later flatten_max condenses the masked holes.
    compact(store, "a", store.sequence("a").valid[..., :4].clone(), "flatten_max")
    assert state.positions[0].tolist() == [[0, 2, 3, -1], [0, 1, 3, -1]]
    assert state.physical_length == 3 and store.block_table("a") == [0, 1]
    store.check_consistency()


def test_compact_to_nothing_frees_everything_but_keeps_logical_length():
    store = make_store(block_size=4, num_blocks=3)
    store.add_sequence("a")
    store.append("a", *position_coded_kv(1, 2, 0, 9))
    result = compact(store, "a", torch.zeros(1, 2, 9, dtype=torch.bool))
    assert result.freed_block_ids == [0, 1, 2] and store.pool.num_free == 3
    state = store.sequence("a")
    assert state.physical_length == 0 and state.logical_length == 9
    assert store.append("a", *position_coded_kv(1, 2, 9, 1)).tolist() == [0]
    assert store.gather("a", 0, 1)[2].tolist() == [9]
    store.check_consistency()


def test_kept_as_index_tensor_with_equal_counts():
    store = make_store(layers=2, heads=2, block_size=2, num_blocks=8)
    store.add_sequence("a")
    store.append("a", *position_coded_kv(2, 2, 0, 5))
    top2 = torch.tensor([[[0, 4], [1, 3]], [[2, 3], [0, 1]]])
    result = compact(store, "a", top2)
    assert result.kept_counts.tolist() == [[2, 2], [2, 2]] and store.block_table("a") == [0]
    assert [store.gather("a", 1, 0)[2].tolist(), store.gather("a", 0, 1)[2].tolist()] == [[2, 3], [1, 3]]
    store.check_consistency()


def test_compact_empty_sequence():
    store = make_store()
    store.add_sequence("a")
    for layout in Layout:
        result = compact(store, "a", torch.zeros(1, 2, 0, dtype=torch.bool), layout)
        assert result.physical_length == 0 and result.freed_block_ids == []
    store.check_consistency()


def test_read_layer_pads_to_physical_length():
    store = make_store(layers=2, heads=2, head_dim=3, block_size=3, num_blocks=4)
    store.add_sequence("a")
    store.append("a", *position_coded_kv(2, 2, 0, 5, head_dim=3))
    compact(store, "a", [[[0, 4], [1, 2, 3]], [[], [4]]])
    view = store.read_layer("a", 1)
    assert view.keys.shape == (2, 3, 3) and view.valid.tolist() == [[False] * 3, [True, False, False]]
    assert view.keys[1, 0].tolist() == [11004.0] * 3 and view.positions[1, 0] == 4


# ---------------------------------------------------------------------------
# Examples: errors and freeing.


def test_pool_exhaustion_is_atomic_and_explained():
    store = make_store(block_size=4, num_blocks=2)
    store.add_sequence("a")
    store.add_sequence("b")
    store.append("a", *position_coded_kv(1, 2, 0, 5))
    with pytest.raises(PoolExhausted, match=r"need 1 KV block\(s\) but only 0 of 2 are free"):
        store.append("b", *position_coded_kv(1, 2, 0, 1))
    with pytest.raises(PoolExhausted, match="need 1"):
        store.append("a", *position_coded_kv(1, 2, 5, 4))
    assert store.sequence("a").physical_length == 5 and store.sequence("a").logical_length == 5
    assert store.sequence("b").block_ids == [] and store.sequence("b").logical_length == 0
    # Filling the rest of the last block needs no new block.
    store.append("a", *position_coded_kv(1, 2, 5, 3))
    store.check_consistency()


def test_pool_refuses_double_free():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(DoubleFree, match="is not allocated"):
        pool.free(blocks[:1])
    with pytest.raises(DoubleFree, match="twice"):
        pool.free(pool.allocate(1) * 2)
    pool.check()


def test_free_returns_every_block_and_forgets_the_sequence():
    store = make_store(block_size=2, num_blocks=6)
    for seq_id in ("a", "b"):
        store.add_sequence(seq_id)
        store.append(seq_id, *position_coded_kv(1, 2, 0, 5))
    assert store_stats(store).blocks_held == 6 and store.pool.num_free == 0
    held_by_a = store.block_table("a")
    assert store.free("a") == held_by_a
    assert store.pool.num_free == 3 and "a" not in store
    with pytest.raises(KeyError):
        store.gather("a", 0, 0)
    with pytest.raises(KeyError):
        store.free("a")
    store.check_consistency()


def test_consistency_check_detects_a_leaked_block():
    store = make_store(num_blocks=4)
    store.add_sequence("a")
    store.append("a", *position_coded_kv(1, 2, 0, 3))
    store.pool.allocate(1)  # taken from the pool but held by no sequence
    with pytest.raises(BlockLeak, match="held by no sequence"):
        store.check_consistency()


def test_consistency_check_detects_a_shared_block():
    store = make_store(num_blocks=4)
    for seq_id in ("a", "b"):
        store.add_sequence(seq_id)
        store.append(seq_id, *position_coded_kv(1, 2, 0, 3))
    store.sequence("b").block_ids[0] = store.sequence("a").block_ids[0]
    with pytest.raises(BlockLeak):
        store.check_consistency()


@pytest.mark.parametrize(
    "kept, message",
    [
        ([[[2, 1], [0]]], "strictly increasing"),
        ([[[0, 3], [0]]], "out of range"),
        ([[[0], [1]]], "slot 1 is kept but holds no valid token"),
        ([[[0]]], "must list 1 layers of 2 kv heads"),
        (torch.ones(1, 2, 2, dtype=torch.bool), "shaped"),
    ],
)
def test_invalid_kept_sets_are_rejected(kept, message):
    store = make_store(block_size=4, num_blocks=2)
    store.add_sequence("a")
    store.append("a", *position_coded_kv(1, 2, 0, 3))
    compact(store, "a", [[[0, 1, 2], [0, 2]]], "mask")  # head 1 slot 1 is now a hole
    with pytest.raises(InvalidKeep, match=message):
        compact(store, "a", kept)


def test_append_checks_shapes_dtype_and_positions():
    store = make_store(block_size=4, num_blocks=2)
    store.add_sequence("a")
    keys, values = position_coded_kv(1, 2, 0, 2)
    with pytest.raises(ValueError, match="must be torch.float32"):
        store.append("a", keys.double(), values.double())
    with pytest.raises(ValueError, match="keys must be"):
        store.append("a", keys[0], values[0])
    store.append("a", keys, values, positions=torch.tensor([3, 7]))
    assert store.sequence("a").logical_length == 8
    with pytest.raises(ValueError, match="strictly increasing"):
        store.append("a", keys, values, positions=torch.tensor([7, 9]))

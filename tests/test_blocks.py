"""The per-head block rule (kvpolicy/runtime/blocks.py), property-tested."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy.runtime import blocks


@given(st.integers(1, 64), st.integers(0, 40), st.integers(0, 400), st.integers(0, 400))
def test_physical_length_drops_whole_blocks_and_keeps_room(block_size, dropped, need, extra):
    logical = dropped * block_size + need + extra
    physical = logical - dropped * block_size
    new = blocks.physical_length(need, logical, physical, block_size)
    assert (logical - new) % block_size == 0  # only whole leading blocks go
    assert need <= new <= physical  # room for the largest selection; never grows
    assert new - need < block_size or new == physical  # less than one block of slack, unless nothing more could go


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 40), st.integers(0, 40), st.data())
def test_fill_keeps_the_selection_and_adds_the_most_recent(heads, length, count, data):
    count = min(count, length)
    kept = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=heads, max_size=heads)))
    kept &= kept.cumsum(dim=1) <= count  # a selection no larger than count
    key_pos = torch.stack([torch.randperm(1000)[:length] for _ in range(heads)])
    valid = torch.ones(heads, length, dtype=torch.bool)
    grown = blocks.fill_to(kept, key_pos, valid, count)
    assert (grown.sum(dim=1) == count).all()
    assert (grown | ~kept).all()  # the selection stays
    for h in range(heads):
        added = key_pos[h][grown[h] & ~kept[h]]
        left = key_pos[h][~grown[h]]
        if added.numel() and left.numel():
            assert added.min() > left.max()  # the fill takes the most recent unselected tokens


def test_apply_keeps_everything_when_no_block_can_go():
    valid = [torch.ones(2, 40, dtype=torch.bool)]
    kept = [torch.zeros(2, 40, dtype=torch.bool)]
    kept[0][:, :20] = True  # need 20 of 40 with 32-token blocks: (40 - 20) // 32 = 0 blocks go
    out, physical = blocks.apply(kept, [torch.arange(40).expand(2, 40)], valid, 40, 40, 32)
    assert physical == 40 and out[0].all()


def test_apply_pads_every_layer_to_the_largest_need():
    pos = torch.arange(100).expand(1, 100)
    valid = torch.ones(1, 100, dtype=torch.bool)
    small, large = torch.zeros(1, 100, dtype=torch.bool), torch.zeros(1, 100, dtype=torch.bool)
    small[0, :5] = True
    large[0, :30] = True
    out, physical = blocks.apply([small, large], [pos, pos], [valid, valid], 100, 100, 16)
    assert physical == 100 - ((100 - 30) // 16) * 16 == 36
    assert [int(k.sum()) for k in out] == [36, 36]
    assert out[0][0, :5].all() and out[0][0, 100 - 31:].all()  # its 5, then the 31 most recent

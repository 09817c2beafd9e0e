"""Helpers every generated module starts with (pasted verbatim, so a module
reads alone): order-preserving keys, radix threshold search, tie-ranked
marking, the shared rounding rule.

Conventions (docs/triton.md says the same): fp32 arithmetic; natural-log
LSE; a kept set is in ascending slot order; ties go to the lower slot, as
the torch backend's stable sort gives them.
"""

LIBRARY = '''
@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")


@triton.jit
def _order_key(x):
    # fp32 -> int64 in [0, 2^32), monotone in x; -0.0 and 0.0 get one key
    # (torch compares them equal, so they must tie here too).
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648


@triton.jit
def _kth_largest(KEY, n, k, BLOCK: tl.constexpr):
    # The largest theta with #(key >= theta) >= k over KEY[0:n] (non-candidates
    # hold -1): 32 passes that each decide one bit, no sort.
    one = tl.full([], 1, tl.int64)
    theta = tl.full([], 0, tl.int64)
    for i in range(32):
        cand = theta + (one << (31 - i))
        count = tl.full([], 0, tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            key = tl.load(KEY + offs, mask=offs < n, other=-1)
            count += tl.sum((key >= cand).to(tl.int32), axis=0)
        theta = tl.where(count >= k, cand, theta)
    return theta


@triton.jit
def _mass_threshold(KEY, MASS, n, kept, need, BLOCK: tl.constexpr):
    # The largest theta with kept + mass(key >= theta) >= need.
    one = tl.full([], 1, tl.int64)
    theta = tl.full([], 0, tl.int64)
    for i in range(32):
        cand = theta + (one << (31 - i))
        mass = tl.full([], 0.0, tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            key = tl.load(KEY + offs, mask=offs < n, other=-1)
            m = tl.load(MASS + offs, mask=offs < n, other=0.0)
            mass += tl.sum(tl.where(key >= cand, m, 0.0), axis=0)
        theta = tl.where(kept + mass >= need, cand, theta)
    return theta


@triton.jit
def _mark_top(KEY, KEEP, n, k, BLOCK: tl.constexpr):
    # KEEP |= the k largest keys, ties to the lower slot (k <= #candidates).
    if k > 0:
        theta = _kth_largest(KEY, n, k, BLOCK)
        above = tl.full([], 0, tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            key = tl.load(KEY + offs, mask=offs < n, other=-1)
            above += tl.sum((key > theta).to(tl.int32), axis=0)
        room = k - above
        seen = tl.full([], 0, tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < n
            key = tl.load(KEY + offs, mask=inside, other=-1)
            tie = (key == theta).to(tl.int32)
            rank = seen + tl.cumsum(tie, axis=0)
            take = (key > theta) | ((tie > 0) & (rank <= room))
            old = tl.load(KEEP + offs, mask=inside, other=0)
            tl.store(KEEP + offs, (old | take.to(tl.int8)), mask=inside)
            seen += tl.sum(tie, axis=0)


@triton.jit
def _round_half_even(x):
    # torch.round's rule, exactly: x - floor(x) is exact in fp32 for |x| < 2^23.
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
'''

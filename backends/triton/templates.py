"""The kernel templates. Each is the text of one @triton.jit kernel with
named holes the renderer fills:

    __NAME__       the kernel's name in the generated module
    __FN__         the fused expression it reads (a @triton.jit function of
                   h, r, offs, tmask and the leaf arguments)
    __PARAMS__     the leaf arguments in the signature (pointers, strides,
                   folded constants), collected after the body was rendered
    __ARGS__       the same names, passed on to __FN__

Templates without __FN__ are pasted as they are (one copy per module).
Structural choices are tl.constexpr parameters; every numeric parameter of
the policy is a runtime argument, so changing one generates no new code.
"""

# ---------------------------------------------------------------- fused expressions

MAP = '''
@triton.jit
def __NAME__(OUT, T, R, __PARAMS__, BLOCK_T: tl.constexpr):
    # out[h, r, :] = the expression; grid (kv heads, rows)
    h = tl.program_id(0)
    r = tl.program_id(1)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        x = __FN__(h, r, offs, tmask, __ARGS__)
        tl.store(OUT + (h * R + r) * T + offs, x, mask=tmask)
'''

SOFTMAX = '''
@triton.jit
def __NAME__(OUT, VALID, T, R, __PARAMS__, BLOCK_T: tl.constexpr):
    # softmax over the held tokens of row (h, r); invalid slots -inf in, 0 out;
    # a row with nothing finite gives 0 (torch: nan_to_num)
    h = tl.program_id(0)
    r = tl.program_id(1)
    m = tl.full([], float("-inf"), tl.float32)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        held = tl.load(VALID + h * T + offs, mask=tmask, other=0) != 0
        x = tl.where(held, __FN__(h, r, offs, tmask, __ARGS__), float("-inf"))
        m = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(m == float("-inf"), 0.0, m)
    total = tl.full([], 0.0, tl.float32)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        held = tl.load(VALID + h * T + offs, mask=tmask, other=0) != 0
        x = tl.where(held, __FN__(h, r, offs, tmask, __ARGS__), float("-inf"))
        total += tl.sum(tl.exp(x - shift), axis=0)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        held = tl.load(VALID + h * T + offs, mask=tmask, other=0) != 0
        x = tl.where(held, __FN__(h, r, offs, tmask, __ARGS__), float("-inf"))
        out = tl.exp(x - shift) / total
        out = tl.where(out == out, out, 0.0)
        tl.store(OUT + (h * R + r) * T + offs, out, mask=tmask)
'''

NORMALIZE = '''
@triton.jit
def __NAME__(OUT, VALID, T, R, __PARAMS__, BLOCK_T: tl.constexpr):
    # shift so the smallest finite held entry is 0, divide by the sum;
    # uniform over the finite held entries when the sum is 0
    h = tl.program_id(0)
    r = tl.program_id(1)
    low = tl.full([], float("inf"), tl.float32)
    count = tl.full([], 0.0, tl.float32)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        x = __FN__(h, r, offs, tmask, __ARGS__)
        ok = (tl.load(VALID + h * T + offs, mask=tmask, other=0) != 0) & _finite(x)
        low = tl.minimum(low, tl.min(tl.where(ok, x, float("inf")), axis=0))
        count += tl.sum(ok.to(tl.float32), axis=0)
    total = tl.full([], 0.0, tl.float32)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        x = __FN__(h, r, offs, tmask, __ARGS__)
        ok = (tl.load(VALID + h * T + offs, mask=tmask, other=0) != 0) & _finite(x)
        total += tl.sum(tl.where(ok, x - low, 0.0), axis=0)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        x = __FN__(h, r, offs, tmask, __ARGS__)
        ok = (tl.load(VALID + h * T + offs, mask=tmask, other=0) != 0) & _finite(x)
        shifted = tl.where(ok, x - low, 0.0)
        uniform = ok.to(tl.float32) / tl.maximum(count, 1.0)
        out = tl.where(total > 0, shifted / tl.maximum(total, 1e-30), uniform)
        tl.store(OUT + (h * R + r) * T + offs, out, mask=tmask)
'''

POOL = '''
@triton.jit
def __NAME__(OUT, HELD, COUNT, T, R, __PARAMS__, KS: tl.constexpr, IS_MAX: tl.constexpr, BLOCK_T: tl.constexpr):
    # centred pooling, stride 1, over each head's held tokens: HELD[h] lists
    # its held slots in slot order, then its holes; COUNT[h] is how many are
    # held. Windows run over that list, so holes are skipped (the layout does
    # not change a score); past its ends nothing counts (-inf for max, 0 for
    # mean, which divides by KS); each result is stored at its slot, so
    # invalid slots stay invalid
    h = tl.program_id(0)
    r = tl.program_id(1)
    n = tl.load(COUNT + h)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        if IS_MAX:
            acc = tl.full([BLOCK_T], float("-inf"), tl.float32)
        else:
            acc = tl.zeros([BLOCK_T], tl.float32)
        for j in tl.static_range(KS):
            at = offs + (j - KS // 2)
            inside = (at >= 0) & (at < n)
            slot = tl.load(HELD + h * T + at, mask=inside, other=0)
            x = __FN__(h, r, slot, inside, __ARGS__)
            if IS_MAX:
                acc = tl.maximum(acc, tl.where(inside, x, float("-inf")))
            else:
                acc = acc + tl.where(inside & _finite(x), x, 0.0)
        held = offs < n
        if IS_MAX:
            out = tl.where(held, acc, float("-inf"))
        else:
            out = tl.where(held, acc / KS, 0.0)
        slot = tl.load(HELD + h * T + offs, mask=tmask, other=0)
        tl.store(OUT + (h * R + r) * T + slot, out, mask=tmask)
'''

HEAD_MEAN = '''
@triton.jit
def __NAME__(OUT, VALID, H, T, R, __PARAMS__, BLOCK_T: tl.constexpr):
    # mean over the kv heads of a layer where each slot is valid and finite;
    # every head gets the mean (0 where it does not hold the slot); grid (rows,)
    r = tl.program_id(0)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        total = tl.zeros([BLOCK_T], tl.float32)
        count = tl.zeros([BLOCK_T], tl.float32)
        for h in range(0, H):
            x = __FN__(h, r, offs, tmask, __ARGS__)
            ok = (tl.load(VALID + h * T + offs, mask=tmask, other=0) != 0) & _finite(x)
            total += tl.where(ok, x, 0.0)
            count += ok.to(tl.float32)
        mean = total / tl.maximum(count, 1.0)
        for h in range(0, H):
            held = tl.load(VALID + h * T + offs, mask=tmask, other=0) != 0
            tl.store(OUT + (h * R + r) * T + offs, tl.where(held, mean, 0.0), mask=tmask)
'''

TOKEN_SCORES = '''
@triton.jit
def __NAME__(OUT, VALID, T, R, __PARAMS__, BLOCK_T: tl.constexpr):
    # [kv head, token]: the mean over observed rows of the finite entries
    # (the max where none is finite); -inf where the slot is not held
    h = tl.program_id(0)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        total = tl.zeros([BLOCK_T], tl.float32)
        count = tl.zeros([BLOCK_T], tl.float32)
        top = tl.full([BLOCK_T], float("-inf"), tl.float32)
        for r in range(0, R):
            x = __FN__(h, r, offs, tmask, __ARGS__)
            ok = _finite(x)
            total += tl.where(ok, x, 0.0)
            count += ok.to(tl.float32)
            top = tl.where(x == x, tl.maximum(top, x), x)
        out = tl.where(count > 0, total / tl.maximum(count, 1.0), top)
        held = tl.load(VALID + h * T + offs, mask=tmask, other=0) != 0
        tl.store(OUT + h * T + offs, tl.where(held, out, float("-inf")), mask=tmask)
'''

TOP_P_COUNT = '''
@triton.jit
def __NAME__(OUT, VALID, KEY, MASS, T, R, P1, __PARAMS__, BLOCK_T: tl.constexpr):
    # per row: how many largest entries reach mass p (P1 = p - 1e-6) of the
    # row's non-negative total; T when it is never reached
    h = tl.program_id(0)
    r = tl.program_id(1)
    row = h * R + r
    KEY += row * T
    MASS += row * T
    total = tl.full([], 0.0, tl.float32)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        x = __FN__(h, r, offs, tmask, __ARGS__)
        ok = (tl.load(VALID + h * T + offs, mask=tmask, other=0) != 0) & _finite(x)
        x = tl.maximum(tl.where(ok, x, 0.0), 0.0)
        total += tl.sum(tl.where(tmask, x, 0.0), axis=0)
        tl.store(MASS + offs, x, mask=tmask)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        prob = tl.load(MASS + offs, mask=tmask, other=0.0) / tl.maximum(total, 1e-30)
        tl.store(MASS + offs, prob, mask=tmask)
        tl.store(KEY + offs, _order_key(prob), mask=tmask)
    count = _mass_count(KEY, MASS, T, 0.0, P1, BLOCK_T)
    tl.store(OUT + row, tl.where(count < 0, T, count).to(tl.int64))
'''

# ---------------------------------------------------------------- fixed kernels

MASS_COUNT = '''
@triton.jit
def _mass_count(KEY, MASS, n, kept, P1, BLOCK: tl.constexpr):
    # How many of the largest keys must join `kept` for the mass to reach P1,
    # counted as the torch backend's sorted cumsum counts them:
    # -1 when even all of them fall short, 0 when nothing is needed.
    reach = tl.full([], 0.0, tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        key = tl.load(KEY + offs, mask=offs < n, other=-1)
        m = tl.load(MASS + offs, mask=offs < n, other=0.0)
        reach += tl.sum(tl.where(key >= 0, m, 0.0), axis=0)
    # one path for every row (compiled Triton wants one type per variable
    # across branches); the search result is unused when the answer is 0 or -1
    theta = _mass_threshold(KEY, MASS, n, kept, P1, BLOCK)
    above = tl.full([], 0, tl.int32)
    above_mass = tl.full([], 0.0, tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        key = tl.load(KEY + offs, mask=offs < n, other=-1)
        m = tl.load(MASS + offs, mask=offs < n, other=0.0)
        above += tl.sum((key > theta).to(tl.int32), axis=0)
        above_mass += tl.sum(tl.where(key > theta, m, 0.0), axis=0)
    ties = tl.full([], 0, tl.int32)
    carry = tl.full([], 0.0, tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        key = tl.load(KEY + offs, mask=offs < n, other=-1)
        m = tl.where(key == theta, tl.load(MASS + offs, mask=offs < n, other=0.0), 0.0)
        before = carry + tl.cumsum(m, axis=0) - m
        ties += tl.sum(((key == theta) & (kept + (above_mass + before) < P1)).to(tl.int32), axis=0)
        carry += tl.sum(m, axis=0)
    count = tl.where(kept >= P1, 0, tl.where(kept + reach < P1, -1, above + ties))
    return count
'''

WINDOW_STATS = '''
@triton.jit
def window_stats(Q, K, VALID, KPOS, QPOS, M, L, NQ, T, SQRT_D,
                 G: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # per query head and observed query: the row max and sum of exp of
    # q.k / sqrt(d) over the keys it sees (valid, at or before its position);
    # grid (kv heads, query blocks), the G heads of the group in turn
    h = tl.program_id(0)
    oq = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = oq < NQ
    od = tl.arange(0, BLOCK_D)
    dmask = od < D
    qpos = tl.load(QPOS + oq, mask=qmask, other=0)
    for g in tl.static_range(G):
        hq = h * G + g
        q = tl.load(Q + (hq * NQ + oq[:, None]) * D + od[None, :], mask=qmask[:, None] & dmask[None, :], other=0.0)
        m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        for start in range(0, T, BLOCK_T):
            ot = start + tl.arange(0, BLOCK_T)
            tmask = ot < T
            k = tl.load(K + (h * T + ot[:, None]) * D + od[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
            held = (tl.load(VALID + h * T + ot, mask=tmask, other=0) != 0) & tmask
            kpos = tl.load(KPOS + h * T + ot, mask=tmask, other=0)
            seen = held[None, :] & (kpos[None, :] <= qpos[:, None])
            s = tl.where(seen, tl.dot(q, tl.trans(k), input_precision="ieee") / SQRT_D, float("-inf"))
            m = tl.maximum(m, tl.max(s, axis=1))
        shift = tl.where(m == float("-inf"), 0.0, m)
        total = tl.zeros([BLOCK_Q], tl.float32)
        for start in range(0, T, BLOCK_T):
            ot = start + tl.arange(0, BLOCK_T)
            tmask = ot < T
            k = tl.load(K + (h * T + ot[:, None]) * D + od[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
            held = (tl.load(VALID + h * T + ot, mask=tmask, other=0) != 0) & tmask
            kpos = tl.load(KPOS + h * T + ot, mask=tmask, other=0)
            seen = held[None, :] & (kpos[None, :] <= qpos[:, None])
            s = tl.where(seen, tl.dot(q, tl.trans(k), input_precision="ieee") / SQRT_D, float("-inf"))
            total += tl.sum(tl.exp(s - shift[:, None]), axis=1)
        tl.store(M + hq * NQ + oq, shift, mask=qmask)
        tl.store(L + hq * NQ + oq, total, mask=qmask)
'''

WINDOW_SIGNAL = '''
@triton.jit
def window_signal(Q, K, VALID, KPOS, QPOS, M, L, OUT, NQ, T, SQRT_D,
                  PROBS: tl.constexpr, GROUP: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[h, q, t]: attention probabilities (PROBS) or logits of the observed
    # queries, reduced over the GQA group (GROUP 0 mean, 1 max, 2 sum) in head
    # order; unseen keys: 0 probability, -inf logit
    h = tl.program_id(0)
    oq = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = oq < NQ
    od = tl.arange(0, BLOCK_D)
    dmask = od < D
    qpos = tl.load(QPOS + oq, mask=qmask, other=0)
    for start in range(0, T, BLOCK_T):
        ot = start + tl.arange(0, BLOCK_T)
        tmask = ot < T
        k = tl.load(K + (h * T + ot[:, None]) * D + od[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
        held = (tl.load(VALID + h * T + ot, mask=tmask, other=0) != 0) & tmask
        kpos = tl.load(KPOS + h * T + ot, mask=tmask, other=0)
        seen = held[None, :] & (kpos[None, :] <= qpos[:, None])
        if GROUP == 1:
            acc = tl.full([BLOCK_Q, BLOCK_T], float("-inf"), tl.float32)
        else:
            acc = tl.zeros([BLOCK_Q, BLOCK_T], tl.float32)
        for g in tl.static_range(G):
            hq = h * G + g
            q = tl.load(Q + (hq * NQ + oq[:, None]) * D + od[None, :], mask=qmask[:, None] & dmask[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") / SQRT_D
            if PROBS:
                m = tl.load(M + hq * NQ + oq, mask=qmask, other=0.0)
                l = tl.load(L + hq * NQ + oq, mask=qmask, other=0.0)
                x = tl.where(seen & (l[:, None] > 0), tl.exp(s - m[:, None]) / l[:, None], 0.0)
            elif GROUP == 1:
                x = tl.where(seen, s, float("-inf"))
            else:
                x = tl.where(seen, s, 0.0)
            if GROUP == 1:
                acc = tl.maximum(acc, x)
            else:
                acc = acc + x
        if GROUP == 0:
            acc = acc / G
        if not PROBS:
            acc = tl.where(seen, acc, float("-inf"))
        tl.store(OUT + (h * NQ + oq[:, None]) * T + ot[None, :], acc, mask=qmask[:, None] & tmask[None, :])
'''

REDUCE_QUERIES = '''
@triton.jit
def reduce_queries(X, OUT, NQ, T, HOW: tl.constexpr, BLOCK_T: tl.constexpr):
    # [h, q, t] -> [h, 1, t] over the observed queries (HOW 0 mean, 1 sum, 2 max)
    h = tl.program_id(0)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        if HOW == 2:
            acc = tl.full([BLOCK_T], float("-inf"), tl.float32)
        else:
            acc = tl.zeros([BLOCK_T], tl.float32)
        for q in range(0, NQ):
            x = tl.load(X + (h * NQ + q) * T + offs, mask=tmask, other=0.0)
            if HOW == 2:
                acc = tl.maximum(acc, x)
            else:
                acc = acc + x
        if HOW == 0:
            acc = acc / NQ
        tl.store(OUT + h * T + offs, acc, mask=tmask)
'''

ROW_NORM = '''
@triton.jit
def row_norm(X, OUT, T, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # L2 norm of each held key (or value) [h, t, :]
    h = tl.program_id(0)
    od = tl.arange(0, BLOCK_D)
    for start in range(0, T, BLOCK_T):
        ot = start + tl.arange(0, BLOCK_T)
        tmask = ot < T
        x = tl.load(X + (h * T + ot[:, None]) * D + od[None, :], mask=tmask[:, None] & (od[None, :] < D), other=0.0).to(tl.float32)
        tl.store(OUT + h * T + ot, tl.sqrt(tl.sum(x * x, axis=1)), mask=tmask)
'''

KEY_SIM = '''
@triton.jit
def key_sim(K, VALID, OUT, T, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # cosine of each unit key to the normalised mean of the head's valid unit keys
    h = tl.program_id(0)
    od = tl.arange(0, BLOCK_D)
    dmask = od < D
    anchor = tl.zeros([BLOCK_D], tl.float32)
    count = tl.full([], 0.0, tl.float32)
    for start in range(0, T, BLOCK_T):
        ot = start + tl.arange(0, BLOCK_T)
        tmask = ot < T
        k = tl.load(K + (h * T + ot[:, None]) * D + od[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        unit = k / tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), 1e-12)[:, None]
        w = (tl.load(VALID + h * T + ot, mask=tmask, other=0) != 0).to(tl.float32)
        anchor += tl.sum(unit * w[:, None], axis=0)
        count += tl.sum(w, axis=0)
    anchor = anchor / tl.maximum(count, 1.0)
    anchor = anchor / tl.maximum(tl.sqrt(tl.sum(anchor * anchor, axis=0)), 1e-12)
    for start in range(0, T, BLOCK_T):
        ot = start + tl.arange(0, BLOCK_T)
        tmask = ot < T
        k = tl.load(K + (h * T + ot[:, None]) * D + od[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        unit = k / tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), 1e-12)[:, None]
        tl.store(OUT + h * T + ot, tl.sum(unit * anchor[None, :], axis=1), mask=tmask)
'''

REDUNDANCY = '''
@triton.jit
def redundancy_rows(K, VALID, KPOS, OUT, T, THRESHOLD, D: tl.constexpr,
                    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    # R-KV: each key's summed cosine to the other valid keys (pairs below
    # THRESHOLD count 0) over the head's valid count; 0 for a key with no
    # similar later key (the most recent of a group is spared); grid (h, row blocks)
    h = tl.program_id(0)
    oi = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = oi < T
    od = tl.arange(0, BLOCK_D)
    dmask = od < D
    ki = tl.load(K + (h * T + oi[:, None]) * D + od[None, :], mask=imask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    ui = ki / tl.maximum(tl.sqrt(tl.sum(ki * ki, axis=1)), 1e-12)[:, None]
    vi = (tl.load(VALID + h * T + oi, mask=imask, other=0) != 0) & imask
    pi = tl.load(KPOS + h * T + oi, mask=imask, other=0)
    total = tl.zeros([BLOCK_I], tl.float32)
    later = tl.zeros([BLOCK_I], tl.int32)
    count = tl.full([], 0.0, tl.float32)
    for start in range(0, T, BLOCK_J):
        oj = start + tl.arange(0, BLOCK_J)
        jmask = oj < T
        kj = tl.load(K + (h * T + oj[:, None]) * D + od[None, :], mask=jmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        uj = kj / tl.maximum(tl.sqrt(tl.sum(kj * kj, axis=1)), 1e-12)[:, None]
        vj = (tl.load(VALID + h * T + oj, mask=jmask, other=0) != 0) & jmask
        pj = tl.load(KPOS + h * T + oj, mask=jmask, other=0)
        sim = tl.dot(ui, tl.trans(uj), input_precision="ieee")
        ok = vi[:, None] & vj[None, :] & (oi[:, None] != oj[None, :]) & (sim >= THRESHOLD)
        sim = tl.where(ok, sim, 0.0)
        total += tl.sum(sim, axis=1)
        later += tl.sum(((sim > 0) & (pj[None, :] > pi[:, None])).to(tl.int32), axis=1)
        count += tl.sum(vj.to(tl.float32), axis=0)
    mean = total / tl.maximum(count, 1.0)
    tl.store(OUT + h * T + oi, tl.where(later > 0, mean, 0.0), mask=imask)
'''

SELECT_ROWS = '''
@triton.jit
def select_rows(SCORE, POS, CAND, PROT, VALID, FORCE, KEY, MASS, KEEP, N, COUNT, P1, LIMIT, TAU,
                MODE: tl.constexpr, OP: tl.constexpr, HAS_FORCE: tl.constexpr, BLOCK: tl.constexpr):
    # KEEP[row] |= one selection over the candidates of a row (a kv head, or a
    # whole layer for shared budgets). MODE: 0 top_k, 1 top_p, 2 threshold
    # (OP 0 >, 1 >=, 2 <, 3 <=), 3 first, 4 last (by logical position). Ranking:
    # higher score first, ties to the lower slot; candidates scored -inf still
    # outrank non-candidates; FORCE'd slots rank first (a per-head floor).
    row = tl.program_id(0)
    base = row * N
    SCORE += base
    POS += base
    CAND += base
    PROT += base
    VALID += base
    FORCE += base
    KEY += base
    MASS += base
    KEEP += base
    total = tl.full([], 0.0, tl.float32)
    kept = tl.full([], 0.0, tl.float32)
    ncand = tl.full([], 0, tl.int32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < N
        cand = (tl.load(CAND + offs, mask=inside, other=0) != 0) & inside
        if MODE == 3:
            s = -tl.load(POS + offs, mask=inside, other=0).to(tl.float32)
        elif MODE == 4:
            s = tl.load(POS + offs, mask=inside, other=0).to(tl.float32)
        else:
            s = tl.load(SCORE + offs, mask=inside, other=0.0)
        if MODE == 2:
            if OP == 0:
                passed = s > TAU
            elif OP == 1:
                passed = s >= TAU
            elif OP == 2:
                passed = s < TAU
            else:
                passed = s <= TAU
            old = tl.load(KEEP + offs, mask=inside, other=0)
            tl.store(KEEP + offs, old | (passed & cand).to(tl.int8), mask=inside)
        else:
            keyed = tl.where(s == float("-inf"), -3.4028234663852886e38, s)
            if HAS_FORCE:
                keyed = tl.where(tl.load(FORCE + offs, mask=inside, other=0) != 0, float("inf"), keyed)
            tl.store(KEY + offs, tl.where(cand, _order_key(keyed), -1), mask=inside)
            ncand += tl.sum(cand.to(tl.int32), axis=0)
            if MODE == 1:
                held = (tl.load(VALID + offs, mask=inside, other=0) != 0) & inside & _finite(s)
                m = tl.maximum(tl.where(held, s, 0.0), 0.0)
                total += tl.sum(m, axis=0)
                tl.store(MASS + offs, m, mask=inside)
    if MODE != 2:
        k = tl.minimum(COUNT, ncand)
        if MODE == 1:
            for start in range(0, N, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                inside = offs < N
                m = tl.load(MASS + offs, mask=inside, other=0.0) / tl.maximum(total, 1e-30)
                prot = tl.load(PROT + offs, mask=inside, other=0) != 0
                kept += tl.sum(tl.where(prot, m, 0.0), axis=0)
                cand = tl.load(CAND + offs, mask=inside, other=0) != 0
                tl.store(MASS + offs, tl.where(cand, m, 0.0), mask=inside)
            need = _mass_count(KEY, MASS, N, kept, P1, BLOCK)
            k = tl.where(need < 0, ncand, need)
            if LIMIT >= 0:
                k = tl.minimum(k, LIMIT)
        _mark_top(KEY, KEEP, N, k, BLOCK)
'''

COMPACT = '''
@triton.jit
def compact(KEEP, IDX, COUNT, T, BLOCK_T: tl.constexpr):
    # kept slots of each row in ascending order, then -1; COUNT[row] of them
    row = tl.program_id(0)
    seen = tl.full([], 0, tl.int32)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        inside = offs < T
        tl.store(IDX + row * T + offs, tl.full([BLOCK_T], -1, tl.int64), mask=inside)
    seen = tl.full([], 0, tl.int32)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        inside = offs < T
        keep = (tl.load(KEEP + row * T + offs, mask=inside, other=0) != 0).to(tl.int32)
        at = seen + tl.cumsum(keep, axis=0) - 1
        tl.store(IDX + row * T + at, offs.to(tl.int64), mask=inside & (keep > 0))
        seen += tl.sum(keep, axis=0)
    tl.store(COUNT + row, seen.to(tl.int64))
'''

GATHER = '''
@triton.jit
def gather_kept(SRC, DST, IDX, COUNT, START, T, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # row h's kept entries SRC[h, IDX[h, i], :] -> DST[START[h] + i, :]
    # (START: h * width for a padded layout, the running sum for per-head
    # segments); a bit-exact copy in the tensor's own dtype
    h = tl.program_id(0)
    n = tl.load(COUNT + h)
    first = tl.load(START + h)
    od = tl.arange(0, BLOCK_D)
    for start in range(0, n, BLOCK_T):
        oi = start + tl.arange(0, BLOCK_T)
        imask = oi < n
        slot = tl.load(IDX + h * T + oi, mask=imask, other=0)
        m = imask[:, None] & (od[None, :] < D)
        x = tl.load(SRC + (h * T + slot[:, None]) * D + od[None, :], mask=m)
        tl.store(DST + (first + oi[:, None]) * D + od[None, :], x, mask=m)
'''

MERGE_ASSIGN = '''
@triton.jit
def merge_assign(K, W, KEEP, GONE, TARGET, T, NEAREST: tl.constexpr, D: tl.constexpr,
                 BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    # TARGET[h, i] for each evicted slot i: the kept slot with the most similar
    # unit key (NEAREST) or with the largest weight; the lower slot on ties
    h = tl.program_id(0)
    oi = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = oi < T
    od = tl.arange(0, BLOCK_D)
    dmask = od < D
    gone = (tl.load(GONE + h * T + oi, mask=imask, other=0) != 0) & imask
    ki = tl.load(K + (h * T + oi[:, None]) * D + od[None, :], mask=imask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    ui = ki / tl.maximum(tl.sqrt(tl.sum(ki * ki, axis=1)), 1e-12)[:, None]
    best = tl.full([BLOCK_I], float("-inf"), tl.float32)
    target = tl.full([BLOCK_I], -1, tl.int64)
    for start in range(0, T, BLOCK_J):
        oj = start + tl.arange(0, BLOCK_J)
        jmask = oj < T
        keep = (tl.load(KEEP + h * T + oj, mask=jmask, other=0) != 0) & jmask
        if NEAREST:
            kj = tl.load(K + (h * T + oj[:, None]) * D + od[None, :], mask=jmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            uj = kj / tl.maximum(tl.sqrt(tl.sum(kj * kj, axis=1)), 1e-12)[:, None]
            s = tl.dot(ui, tl.trans(uj), input_precision="ieee")
        else:
            w = tl.load(W + h * T + oj, mask=jmask, other=0.0)
            s = tl.zeros([BLOCK_I, BLOCK_J], tl.float32) + w[None, :]
        s = tl.where(keep[None, :], s, float("-inf"))
        block_best = tl.max(s, axis=1)
        # the lowest kept slot reaching this block's best
        hit = (s == block_best[:, None]) & keep[None, :]
        block_arg = tl.min(tl.where(hit, oj[None, :], 2147483647), axis=1).to(tl.int64)
        better = (block_best > best) | ((target < 0) & (block_arg < 2147483647))
        best = tl.where(better, block_best, best)
        target = tl.where(better, block_arg, target)
    tl.store(TARGET + h * T + oi, tl.where(gone, target, -1), mask=imask)
'''

MERGE_APPLY = '''
@triton.jit
def merge_apply(V, W, TARGET, OUT, T, D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    # kept slot t that received evicted slots j: v_t <- (w_t v_t + sum w_j v_j) / (w_t + sum w_j);
    # each program owns a block of targets and reads every evicted slot (no atomics)
    h = tl.program_id(0)
    ot = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    tmask = ot < T
    od = tl.arange(0, BLOCK_D)
    m2 = tmask[:, None] & (od[None, :] < D)
    vt = tl.load(V + (h * T + ot[:, None]) * D + od[None, :], mask=m2, other=0.0).to(tl.float32)
    wt = tl.load(W + h * T + ot, mask=tmask, other=0.0)
    num = vt * wt[:, None]
    den = wt
    touched = tl.zeros([BLOCK_I], tl.int32)
    for start in range(0, T, BLOCK_J):
        oj = start + tl.arange(0, BLOCK_J)
        jmask = oj < T
        tj = tl.load(TARGET + h * T + oj, mask=jmask, other=-1)
        wj = tl.load(W + h * T + oj, mask=jmask, other=0.0)
        vj = tl.load(V + (h * T + oj[:, None]) * D + od[None, :], mask=jmask[:, None] & (od[None, :] < D), other=0.0).to(tl.float32)
        into = tj[None, :] == ot[:, None]
        weight = tl.where(into, wj[None, :], 0.0)
        num += tl.dot(weight, vj, input_precision="ieee")
        den += tl.sum(weight, axis=1)
        touched += tl.sum(into.to(tl.int32), axis=1)
    safe = (touched > 0) & (den > 0)
    out = tl.where(safe[:, None], num / tl.where(safe, den, 1.0)[:, None], vt)
    tl.store(OUT + (h * T + ot[:, None]) * D + od[None, :], out, mask=m2)
'''

QUANTIZE = '''
@triton.jit
def quantize_groups(X, HELD, CODES, SCALE, ZERO, N, INNER, OUTER_STRIDE, INNER_STRIDE, STEP,
                    HELD_OUTER, HELD_STEP, GROUPS, LEVELS,
                    HAS_HELD: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr):
    # one row of N entries (STEP apart) cut into groups of GROUP: zero = min,
    # scale = (max - min) / LEVELS over the held entries (0, 0 when none), then
    # code = round_half_even((x - zero) / scale) clamped to [0, LEVELS], the
    # torch backend's rule (backends/hf/quantized.py)
    r = tl.program_id(0)
    base = (r // INNER) * OUTER_STRIDE + (r % INNER) * INNER_STRIDE
    held_base = (r // INNER) * HELD_OUTER
    og = tl.arange(0, BLOCK_G)
    oj = tl.arange(0, GROUP)
    for start in range(0, GROUPS, BLOCK_G):
        g = start + og
        i = g[:, None] * GROUP + oj[None, :]
        inside = (g[:, None] < GROUPS) & (i < N)
        x = tl.load(X + base + i * STEP, mask=inside, other=0.0).to(tl.float32)
        held = inside
        if HAS_HELD:
            held = held & (tl.load(HELD + held_base + i * HELD_STEP, mask=inside, other=0) != 0)
        lo = tl.min(tl.where(held, x, float("inf")), axis=1)
        hi = tl.max(tl.where(held, x, float("-inf")), axis=1)
        empty = tl.sum(held.to(tl.int32), axis=1) == 0
        lo = tl.where(empty, 0.0, lo)
        hi = tl.where(empty, 0.0, hi)
        scale = tl.math.div_rn(hi - lo, LEVELS + 0.0)
        steps = tl.math.div_rn(x - lo[:, None], tl.where(scale > 0, scale, 1.0)[:, None])
        codes = tl.minimum(tl.maximum(_round_half_even(steps), 0.0), LEVELS + 0.0)
        tl.store(CODES + base + i * STEP, codes.to(tl.uint8), mask=inside)
        tl.store(SCALE + r * GROUPS + g, scale, mask=g < GROUPS)
        tl.store(ZERO + r * GROUPS + g, lo, mask=g < GROUPS)
'''

PACK_INT4 = '''
@triton.jit
def pack_int4(CODES, PACKED, ROWS, D, HALF, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    # two 4-bit codes per byte along the last dim: the even index in the low nibble
    orow = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    oh = tl.arange(0, BLOCK_H)
    m = (orow[:, None] < ROWS) & (oh[None, :] < HALF)
    low = tl.load(CODES + orow[:, None] * D + 2 * oh[None, :], mask=m, other=0)
    high = tl.load(CODES + orow[:, None] * D + 2 * oh[None, :] + 1, mask=m & (2 * oh[None, :] + 1 < D), other=0)
    tl.store(PACKED + orow[:, None] * HALF + oh[None, :], low | (high << 4), mask=m)
'''

DECODE_TIER = '''
@triton.jit
def _load_kv(C, SC, ZE, b, h, t, od, m, T, HKV, GROUPS_T, GROUPS_D,
             QUANT: tl.constexpr, PER_CHANNEL: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr):
    # one tier's keys or values at slots t of (b, h), dequantized on read:
    # x = code * scale + zero, codes nibble-packed for int4
    row = (b * HKV + h) * T + t
    if QUANT == 0:
        x = tl.load(C + row[:, None] * D + od[None, :], mask=m, other=0.0).to(tl.float32)
    else:
        if QUANT == 4:
            byte = tl.load(C + row[:, None] * ((D + 1) // 2) + od[None, :] // 2, mask=m, other=0)
            code = tl.where(od[None, :] % 2 == 0, byte & 15, byte >> 4)
        else:
            code = tl.load(C + row[:, None] * D + od[None, :], mask=m, other=0)
        if PER_CHANNEL:
            at = ((b * HKV + h) * D + od[None, :]) * GROUPS_T + t[:, None] // GROUP
        else:
            at = row[:, None] * GROUPS_D + od[None, :] // GROUP
        x = code.to(tl.float32) * tl.load(SC + at, mask=m, other=0.0) + tl.load(ZE + at, mask=m, other=0.0)
    return x


@triton.jit
def decode_tier(Q, KC, KS, KZ, VC, VS, VZ, LENS, O, LSE, T, HKV, GROUPS_T, GROUPS_D, SQRT_D,
                QUANT: tl.constexpr, G: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
                BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # one decode query per q head over one tier's first LENS[b, h] slots of kv
    # head h; partial output and natural-log LSE per q head (0 and -inf when
    # the tier holds nothing for this head); grid (batch, kv heads)
    b = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(LENS + b * HKV + h)
    og = tl.arange(0, BLOCK_G)
    gmask = og < G
    od = tl.arange(0, BLOCK_D)
    dmask = od < D
    hq = h * G + og
    q = tl.load(Q + (b * HKV * G + hq[:, None]) * D + od[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(0, n, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        tmask = t < n
        mk = tmask[:, None] & dmask[None, :]
        k = _load_kv(KC, KS, KZ, b, h, t, od, mk, T, HKV, GROUPS_T, GROUPS_D, QUANT, True, D, GROUP)
        v = _load_kv(VC, VS, VZ, b, h, t, od, mk, T, HKV, GROUPS_T, GROUPS_D, QUANT, False, D, GROUP)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) / SQRT_D
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    empty = l == 0
    out = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, l)))
    tl.store(O + (b * HKV * G + hq[:, None]) * D + od[None, :], out, mask=gmask[:, None] & dmask[None, :])
    tl.store(LSE + b * HKV * G + hq, lse, mask=gmask)
'''

LSE_MERGE = '''
@triton.jit
def lse_merge(O, LSE, OUT, OUT_LSE, TIERS, ROWS, D: tl.constexpr, BLOCK_D: tl.constexpr):
    # merge partial attentions by log-sum-exp (scales first); a row no tier
    # holds anything for gives 0 and -inf, not NaN
    row = tl.program_id(0)
    od = tl.arange(0, BLOCK_D)
    dmask = od < D
    top = tl.full([], float("-inf"), tl.float32)
    for i in range(0, TIERS):
        top = tl.maximum(top, tl.load(LSE + i * ROWS + row))
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for i in range(0, TIERS):
        w = tl.exp(tl.load(LSE + i * ROWS + row) - shift)
        total += w
        acc += w * tl.load(O + (i * ROWS + row) * D + od, mask=dmask, other=0.0)
    empty = total == 0
    tl.store(OUT + row * D + od, acc / tl.where(empty, 1.0, total), mask=dmask)
    tl.store(OUT_LSE + row, tl.where(empty, float("-inf"), shift + tl.log(tl.where(empty, 1.0, total))))
'''

ROW_MASS = '''
@triton.jit
def row_mass(METRIC, VALID, COUNTS, KEY, MASS, T, R, BLOCK_T: tl.constexpr):
    # calibration: per observed row, the mass of the COUNTS[row] largest
    # entries of the metric normalised over the row (non-negative, held,
    # finite entries); grid (kv heads * rows,)
    row = tl.program_id(0)
    h = row // R
    total = tl.full([], 0.0, tl.float32)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        x = tl.load(METRIC + row * T + offs, mask=tmask, other=0.0)
        ok = (tl.load(VALID + h * T + offs, mask=tmask, other=0) != 0) & _finite(x)
        total += tl.sum(tl.where(tmask, tl.maximum(tl.where(ok, x, 0.0), 0.0), 0.0), axis=0)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        x = tl.load(METRIC + row * T + offs, mask=tmask, other=0.0)
        ok = (tl.load(VALID + h * T + offs, mask=tmask, other=0) != 0) & _finite(x)
        tl.store(KEY + row * T + offs, _order_key(tl.maximum(tl.where(ok, x, 0.0), 0.0) / tl.maximum(total, 1e-30)), mask=tmask)
    k = tl.minimum(tl.maximum(tl.load(COUNTS + row), 1), T)
    theta = _kth_largest(KEY + row * T, T, k, BLOCK_T)
    above = tl.full([], 0.0, tl.float32)
    n_above = tl.full([], 0, tl.int32)
    at_theta = tl.full([], 0.0, tl.float32)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        tmask = offs < T
        x = tl.load(METRIC + row * T + offs, mask=tmask, other=0.0)
        ok = (tl.load(VALID + h * T + offs, mask=tmask, other=0) != 0) & _finite(x)
        v = tl.maximum(tl.where(ok, x, 0.0), 0.0) / tl.maximum(total, 1e-30)
        key = tl.load(KEY + row * T + offs, mask=tmask, other=-1)
        above += tl.sum(tl.where(key > theta, v, 0.0), axis=0)
        n_above += tl.sum((key > theta).to(tl.int32), axis=0)
        at_theta = tl.maximum(at_theta, tl.max(tl.where(key == theta, v, 0.0), axis=0))
    tl.store(MASS + row, above + (k - n_above).to(tl.float32) * at_theta)
'''

FIXED = {
    "mass_count": MASS_COUNT,
    "window_stats": WINDOW_STATS,
    "window_signal": WINDOW_SIGNAL,
    "reduce_queries": REDUCE_QUERIES,
    "row_norm": ROW_NORM,
    "key_sim": KEY_SIM,
    "redundancy_rows": REDUNDANCY,
    "select_rows": SELECT_ROWS,
    "row_mass": ROW_MASS,
    "compact": COMPACT,
    "gather_kept": GATHER,
    "merge_assign": MERGE_ASSIGN,
    "merge_apply": MERGE_APPLY,
    "quantize_groups": QUANTIZE,
    "pack_int4": PACK_INT4,
    "decode_tier": DECODE_TIER,
    "lse_merge": LSE_MERGE,
}

FUSED = {
    "map": MAP,
    "softmax": SOFTMAX,
    "normalize": NORMALIZE,
    "pool": POOL,
    "head_mean": HEAD_MEAN,
    "token_scores": TOKEN_SCORES,
    "top_p_count": TOP_P_COUNT,
}

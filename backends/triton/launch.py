"""Host side: allocate outputs, pick block sizes and grids, launch the
generated kernels. Each function here has the signature of the torch
backend function it replaces (backends/torch/{signals,evaluate,select,merge}.py,
backends/hf/quantized.py), so the conformance tests call both alike.

Tensors are [Hkv, T] / [Hkv, R, T] float32 rows, one sequence's layer, as
the torch backend holds them. Block sizes are chosen here (the interpreter
wants few, large program instances; `Blocks.cap` lets tests force several
blocks per row).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvpolicy.backends.torch.evaluate import held_first

from .lowering import Buffer, Step


@dataclass
class Blocks:
    cap: int = 1024  # largest token block
    pairs: int = 64  # token block of the T x T kernels (redundancy, merge)


BLOCKS = Blocks()


def _pow2(n: int, low: int = 16) -> int:
    return max(low, 1 << max(0, math.ceil(math.log2(max(1, n)))))


def block_t(n: int) -> int:
    return min(_pow2(n), BLOCKS.cap)


def _i8(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.int8).contiguous()


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous()


# ----------------------------------------------------------------- scores


def run_steps(mod, steps: tuple[Step, ...], inputs, calibration: dict[str, torch.Tensor], wanted=None) -> dict[int, torch.Tensor]:
    """Run a policy's scoring steps on one layer; buffer id -> tensor."""
    out: dict[int, torch.Tensor] = {}
    h, t = inputs.valid.shape
    q = 0 if inputs.queries is None else inputs.queries.shape[1]
    valid = _i8(inputs.valid)
    for step in steps:
        if wanted is not None and step.out.id not in wanted:
            continue
        rows = q if step.out.rows == "Q" else 1
        launch = _FIXED_STEPS.get(step.template)
        if launch is not None:
            out[step.out.id] = launch(mod, step, inputs, valid, out)
        else:
            out[step.out.id] = _fused(mod, step, inputs, valid, out, calibration, rows)
    return out


def needed(steps: tuple[Step, ...], roots) -> set[int]:
    """Ids of the steps the buffers `roots` depend on (themselves included)."""
    by_id = {s.out.id: s for s in steps}
    todo, seen = [r.id for r in roots], set()
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        step = by_id[i]
        todo += [b.id for b in step.inputs]
        if step.inline is not None:
            todo += [b.id for b in step.inline.tensors if isinstance(b, Buffer)]
    return seen


def _leaf_args(step: Step, inputs, out, calibration) -> list:
    args = []
    for leaf in step.inline.tensors:
        if isinstance(leaf, Buffer):
            x = out[leaf.id]
        else:
            x = _f32(inputs.states[leaf[1]])[:, None, :]
        if x.dim() == 2:  # token scores [Hkv, T]
            x = x[:, None, :]
        x = x.contiguous()
        rows = x.shape[1]
        args += [x, x.stride(0), x.stride(1) if rows > 1 else 0]
    for name in step.inline.scalars:
        s = calibration[name].float().contiguous()
        args += [s, s.stride(0) if s.numel() > 1 else 0]
    return args + [float(c) for c in step.inline.consts]


def _fused(mod, step: Step, inputs, valid, out, calibration, rows) -> torch.Tensor:
    h, t = inputs.valid.shape
    kernel = getattr(mod, step.kernel)
    args = _leaf_args(step, inputs, out, calibration)
    bt = block_t(t)
    if step.template == "token_scores":
        rows = (inputs.queries.shape[1] if inputs.queries is not None else 0) if step.inline.rows == "Q" else 1
        res = torch.empty(h, t)
        kernel[(h,)](res, valid, t, rows, *args, BLOCK_T=bt)
        return res
    if step.template == "top_p_count":
        res = torch.empty(h, rows, dtype=torch.int64)
        key = torch.empty(h * rows * t, dtype=torch.int64)
        mass = torch.empty(h * rows * t)
        kernel[(h, rows)](res, valid, key, mass, t, rows, float(step.args["p"]) - 1e-6, *args, BLOCK_T=bt)
        return res
    res = torch.empty(h, rows, t)
    if step.template == "map":
        kernel[(h, rows)](res, t, rows, *args, BLOCK_T=bt)
    elif step.template == "pool":
        held, count = pool_index(inputs.valid)
        kernel[(h, rows)](res, held, count, t, rows, *args, KS=step.static["KS"], IS_MAX=step.static["IS_MAX"], BLOCK_T=bt)
    elif step.template == "head_mean":
        kernel[(rows,)](res, valid, h, t, rows, *args, BLOCK_T=bt)
    else:  # softmax, normalize
        kernel[(h, rows)](res, valid, t, rows, *args, BLOCK_T=bt)
    return res


def pool_index(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: its held slots in slot order, then its holes ([Hkv, T] int32),
    and how many it holds ([Hkv] int32). The pool kernel reads through it."""
    return held_first(valid).to(torch.int32).contiguous(), valid.sum(dim=-1).to(torch.int32).contiguous()


def _window(mod, step: Step, inputs, valid, out):
    return window_signal(mod, inputs.queries, inputs.keys, inputs.valid, inputs.key_pos, inputs.query_pos,
                         probs=step.static["PROBS"], group=step.static["GROUP"])


def _reduce_queries(mod, step: Step, inputs, valid, out):
    x = out[step.inputs[0].id].contiguous()
    h, q, t = x.shape
    res = torch.empty(h, 1, t)
    mod.reduce_queries[(h,)](x, res, q, t, HOW=step.static["HOW"], BLOCK_T=block_t(t))
    return res


def _row_norm(mod, step: Step, inputs, valid, out):
    x = inputs.keys if step.static["WHICH"] == "key_norm" else inputs.values
    return row_norm(mod, x)


def _key_sim(mod, step, inputs, valid, out):
    return key_sim(mod, inputs.keys, inputs.valid)


def _redundancy_rows(mod, step: Step, inputs, valid, out):
    return redundancy_rows(mod, inputs.keys, inputs.valid, inputs.key_pos, step.args["threshold"])


_FIXED_STEPS = {
    "window_signal": _window,
    "reduce_queries": _reduce_queries,
    "row_norm": _row_norm,
    "key_sim": _key_sim,
    "redundancy_rows": _redundancy_rows,
}


def window_signal(mod, queries, keys, valid, key_pos, query_pos, probs: bool, group: int) -> torch.Tensor:
    """[Hkv, Q, T] attention probabilities (probs) or logits of the observed
    queries, reduced over the GQA group (0 mean, 1 max, 2 sum)."""
    hq, nq, d = queries.shape
    h, t = valid.shape
    g = hq // h
    qs, ks = _f32(queries), _f32(keys)
    v, kp, qp = _i8(valid), key_pos.long().contiguous(), query_pos.long().contiguous()
    bq, bt, bd = min(_pow2(nq), 64), min(_pow2(t), 256 if BLOCKS.cap >= 256 else BLOCKS.cap), _pow2(d)
    grid = (h, triton_cdiv(nq, bq))
    m = torch.zeros(hq, nq)
    l = torch.zeros(hq, nq)
    sqrt_d = math.sqrt(d)
    if probs:
        mod.window_stats[grid](qs, ks, v, kp, qp, m, l, nq, t, sqrt_d, G=g, D=d, BLOCK_Q=bq, BLOCK_T=bt, BLOCK_D=bd)
    out = torch.empty(h, nq, t)
    mod.window_signal[grid](qs, ks, v, kp, qp, m, l, out, nq, t, sqrt_d, PROBS=probs, GROUP=group, G=g, D=d,
                            BLOCK_Q=bq, BLOCK_T=bt, BLOCK_D=bd)
    return out


def row_norm(mod, x: torch.Tensor) -> torch.Tensor:
    h, t, d = x.shape
    out = torch.empty(h, 1, t)
    mod.row_norm[(h,)](x.contiguous(), out, t, D=d, BLOCK_T=block_t(t), BLOCK_D=_pow2(d))
    return out


def key_sim(mod, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    h, t, d = keys.shape
    out = torch.empty(h, 1, t)
    mod.key_sim[(h,)](keys.contiguous(), _i8(valid), out, t, D=d, BLOCK_T=block_t(t), BLOCK_D=_pow2(d))
    return out


def redundancy_rows(mod, keys, valid, key_pos, threshold: float) -> torch.Tensor:
    """The mean similarity R-KV's redundancy takes a softmax of ([Hkv, 1, T])."""
    h, t, d = keys.shape
    out = torch.empty(h, 1, t)
    bi = min(_pow2(t), BLOCKS.pairs)
    mod.redundancy_rows[(h, triton_cdiv(t, bi))](keys.contiguous(), _i8(valid), key_pos.long().contiguous(), out, t, float(threshold),
                                                 D=d, BLOCK_I=bi, BLOCK_J=min(_pow2(t), BLOCKS.cap), BLOCK_D=_pow2(d))
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def row_mass(mod, metric: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[Hkv, R]: mass of the counts largest entries of each normalised metric row."""
    h, r, t = metric.shape
    out = torch.empty(h, r)
    key = torch.empty(h * r * t, dtype=torch.int64)
    mod.row_mass[(h * r,)](_f32(metric), _i8(valid), counts.long().contiguous(), key, out, t, r, BLOCK_T=block_t(t))
    return out


# ----------------------------------------------------------------- selection

TOP_K, TOP_P, THRESHOLD, FIRST, LAST = 0, 1, 2, 3, 4
OPS = {">": 0, ">=": 1, "<": 2, "<=": 3}


def select_rows(mod, mode: int, scores=None, candidates=None, protected=None, valid=None, key_pos=None, count: int = 0,
                p: float = 1.0, limit: int | None = None, tau: float = 0.0, op: str = ">", force=None) -> torch.Tensor:
    """[rows, N] bool: one selection per row (see the select_rows kernel)."""
    like = candidates
    rows, n = like.shape
    zeros8 = torch.zeros(rows, n, dtype=torch.int8)
    score = _f32(scores) if scores is not None else torch.zeros(rows, n)
    pos = key_pos.long().contiguous() if key_pos is not None else torch.zeros(rows, n, dtype=torch.int64)
    keep = torch.zeros(rows, n, dtype=torch.int8)
    key = torch.empty(rows, n, dtype=torch.int64)
    mass = torch.empty(rows, n)
    mod.select_rows[(rows,)](
        score, pos, _i8(candidates), _i8(protected) if protected is not None else zeros8, _i8(valid) if valid is not None else zeros8,
        _i8(force) if force is not None else zeros8, key, mass, keep, n, int(count), float(p) - 1e-6, -1 if limit is None else int(limit),
        float(tau), MODE=mode, OP=OPS[op], HAS_FORCE=force is not None, BLOCK=block_t(n),
    )
    return keep != 0


def top_k(mod, scores, candidates, k: int) -> torch.Tensor:
    return select_rows(mod, TOP_K, scores=scores, candidates=candidates, count=k)


def top_p(mod, scores, candidates, protected, valid, p: float, limit: int | None) -> torch.Tensor:
    return select_rows(mod, TOP_P, scores=scores, candidates=candidates, protected=protected, valid=valid, p=p, limit=limit)


def threshold(mod, scores, candidates, op: str, value: float) -> torch.Tensor:
    return select_rows(mod, THRESHOLD, scores=scores, candidates=candidates, tau=value, op=op)


def positional(mod, first: bool, n: int, valid, key_pos) -> torch.Tensor:
    return select_rows(mod, FIRST if first else LAST, candidates=valid, key_pos=key_pos, count=n)


def per_layer_top_k(mod, scores, candidates, k: int, floor: float | None) -> torch.Tensor:
    """The heads of a layer share k x heads tokens; each first gets its best
    floor x k. One row of the whole layer, so ties go to the lower (head, slot)."""
    heads, t = scores.shape
    total = min(k * heads, int(candidates.sum()))
    safe = int(k * floor) if floor else 0
    forced = top_k(mod, scores, candidates, safe) if safe > 0 else None
    flat = select_rows(mod, TOP_K, scores=scores.reshape(1, -1), candidates=candidates.reshape(1, -1), count=total,
                       force=None if forced is None else forced.reshape(1, -1))
    return flat.reshape(heads, t) & candidates


def compact(mod, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots [rows, T] ascending then -1, counts [rows])."""
    rows, t = keep.shape
    idx = torch.empty(rows, t, dtype=torch.int64)
    count = torch.empty(rows, dtype=torch.int64)
    mod.compact[(rows,)](_i8(keep), idx, count, t, BLOCK_T=block_t(t))
    return idx, count


def gather_kept(mod, x: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, layout: str) -> torch.Tensor:
    """Kept rows of x [Hkv, T, D]: flatten_max -> [Hkv, max count, D] (zero
    padded); flatten_sum -> [sum of counts, D], head after head."""
    h, t, d = x.shape
    if layout == "flatten_max":
        width = int(count.max()) if h else 0
        dst = torch.zeros(h * width, d, dtype=x.dtype)
        start = torch.arange(h, dtype=torch.int64) * width
    else:
        dst = torch.zeros(int(count.sum()), d, dtype=x.dtype)
        start = torch.cumsum(count, 0) - count
    src = x.contiguous()
    if dst.numel():
        mod.gather_kept[(h,)](src, dst, idx.contiguous(), count.contiguous(), start.contiguous(), t, D=d,
                              BLOCK_T=block_t(t), BLOCK_D=_pow2(d))
    return dst.reshape(h, width, d) if layout == "flatten_max" else dst


# ----------------------------------------------------------------- merge-on-evict


def merge_evicted(mod, keys, values, valid, kept, weights, into: str) -> torch.Tensor:
    evicted = valid & ~kept
    if not bool(evicted.any()) or not bool(kept.any()):
        return values
    h, t, d = keys.shape
    w = torch.ones(h, t) if weights is None else torch.where(torch.isfinite(weights), weights, torch.zeros_like(weights)).clamp(min=0)
    w = _f32(w)
    target = torch.empty(h, t, dtype=torch.int64)
    bi, bj, bd = min(_pow2(t), BLOCKS.pairs), min(_pow2(t), BLOCKS.cap), _pow2(d)
    mod.merge_assign[(h, triton_cdiv(t, bi))](keys.contiguous(), w, _i8(kept), _i8(evicted), target, t, NEAREST=into == "nearest", D=d,
                                              BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd)
    out = torch.empty(h, t, d)
    mod.merge_apply[(h, triton_cdiv(t, bi))](values.contiguous(), w, target, out, t, D=d, BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd)
    return out.to(values.dtype)


# ----------------------------------------------------------------- quantized tiers


def quantize(mod, x: torch.Tensor, bits: int, dim: int, group: int, held: torch.Tensor | None = None):
    """Codes of x [Hkv, T, D] grouped along dim 1 (keys: per channel) or 2
    (values: per token), in backends/hf/quantized.py's layout and rule."""
    from kvpolicy.backends.hf.quantized import Quantized, pack_int4  # noqa: F401  (layout reference)

    h, t, d = x.shape
    x = x.contiguous()
    levels = 2**bits - 1
    if dim == 1:  # rows (h, d), entries along t
        rows, n, inner, outer, inner_stride, step = h * d, t, d, t * d, 1, d
        held_outer, held_step = t, 1
    else:  # rows (h, t), entries along d
        rows, n, inner, outer, inner_stride, step = h * t, d, 1, d, 0, 1
        held_outer, held_step = 0, 0
    groups = triton_cdiv(n, group)
    codes = torch.empty(h, t, d, dtype=torch.uint8)
    shape = (h, d, groups) if dim == 1 else (h, t, groups)
    scale, zero = torch.empty(shape), torch.empty(shape)
    held_t = _i8(held) if held is not None else torch.zeros(1, dtype=torch.int8)
    mod.quantize_groups[(rows,)](x, held_t, codes, scale, zero, n, inner, outer, inner_stride, step, held_outer, held_step, groups, levels,
                                 HAS_HELD=held is not None, GROUP=group, BLOCK_G=min(_pow2(groups, 1), 64))
    if bits == 4:
        codes = pack(mod, codes)
    return Quantized(codes=codes, scale=scale, zero=zero, bits=bits, dim=dim, group=group, shape=(h, t, d))


def pack(mod, codes: torch.Tensor) -> torch.Tensor:
    *lead, d = codes.shape
    rows = int(math.prod(lead))
    half = (d + 1) // 2
    out = torch.empty(*lead, half, dtype=torch.uint8)
    br = min(_pow2(rows), 256)
    mod.pack_int4[(triton_cdiv(rows, br),)](codes.contiguous(), out, rows, d, half, BLOCK_R=br, BLOCK_H=_pow2(half, 1))
    return out


# ----------------------------------------------------------------- decode attention


@dataclass
class Tier:
    """One tier of one layer for decode: [B, Hkv, T, D] keys and values,
    native (float) or quantized codes + scales (keys per channel in groups
    along tokens, values per token in groups along channels); lens [B, Hkv]."""

    keys: torch.Tensor
    values: torch.Tensor
    lens: torch.Tensor
    bits: int = 0
    key_scale: torch.Tensor | None = None
    key_zero: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None
    value_zero: torch.Tensor | None = None
    group: int = 32


def decode(mod, q: torch.Tensor, tiers: list[Tier], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one decode query per head q [B, Hq, D] over every tier,
    merged by log-sum-exp: (out [B, Hq, D], lse [B, Hq])."""
    b, hq, d = q.shape
    qs = _f32(q)
    outs, lses = [], []
    for tier in tiers:
        hkv, t = tier.lens.shape[1], tier.keys.shape[2]
        g = hq // hkv
        o = torch.empty(b, hq, d)
        lse = torch.empty(b, hq)
        dummy = torch.zeros(1)
        if tier.bits:
            groups_t = tier.key_scale.shape[-1]
            groups_d = tier.value_scale.shape[-1]
            ks, kz, vs, vz = (x.contiguous() for x in (tier.key_scale, tier.key_zero, tier.value_scale, tier.value_zero))
        else:
            groups_t = groups_d = 1
            ks = kz = vs = vz = dummy
        keys = tier.keys.contiguous() if tier.bits else _f32(tier.keys)
        values = tier.values.contiguous() if tier.bits else _f32(tier.values)
        mod.decode_tier[(b, hkv)](
            qs, keys, ks, kz, values, vs, vz, tier.lens.long().contiguous(), o, lse, t, hkv, groups_t, groups_d,
            math.sqrt(head_dim), QUANT=tier.bits, G=g, D=d, GROUP=tier.group, BLOCK_G=_pow2(g, 1), BLOCK_T=min(_pow2(t), 128),
            BLOCK_D=_pow2(d),
        )
        outs.append(o)
        lses.append(lse)
    o_all = torch.stack(outs).contiguous()
    l_all = torch.stack(lses).contiguous()
    out = torch.empty(b, hq, d)
    out_lse = torch.empty(b, hq)
    mod.lse_merge[(b * hq,)](o_all, l_all, out, out_lse, len(tiers), b * hq, D=d, BLOCK_D=_pow2(d))
    return out, out_lse

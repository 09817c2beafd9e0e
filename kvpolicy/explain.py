"""`kvpolicy explain`: what a policy keeps and when, in plain words, from its IR."""
from __future__ import annotations

from . import ir
from .budgets import layer_counts
from .ops import PRECEDENCE
from .typecheck import fmt_number


NEGATE_PRECEDENCE = PRECEDENCE["neg"]


def expr_text(e, outer: int = 0) -> str:
    """An IR expression as source-like text (params already substituted),
    with parentheses only where precedence needs them: `outer` is the
    precedence the surrounding operator requires of this expression."""
    if isinstance(e, ir.Const):
        return fmt_number(e.value)
    if isinstance(e, ir.Ref):
        return e.name
    if isinstance(e, ir.Signal):
        opts = ", ".join(f"{k} = {v}" for k, v in e.options.items() if not (k == "queries" and v == "none"))
        return f"{e.name}({opts})"
    if isinstance(e, ir.Apply):
        args = [expr_text(a) for a in e.args]
        if e.fn == "pool":
            return f"pool({e.options['op']}, {e.options['kernel']}, {args[0]})"
        args += [f"{fmt_number(v) if isinstance(v, (int, float)) else v}" for v in e.options.values()]
        return f"{e.fn}({', '.join(args)})"
    if isinstance(e, ir.Arith):
        own = PRECEDENCE[e.operator]
        # Left-associative: a right operand of equal precedence needs parentheses (a - (b + c)).
        text = f"{expr_text(e.left, own)} {e.operator} {expr_text(e.right, own + 1)}"
        return f"({text})" if own < outer else text
    if isinstance(e, ir.Negate):
        text = f"-{expr_text(e.operand, NEGATE_PRECEDENCE)}"
        return f"({text})" if NEGATE_PRECEDENCE < outer else text
    raise TypeError(type(e))


def selection_text(sel) -> str:
    if isinstance(sel, ir.First):
        return f"the first {_tokens(sel.count)}"
    if isinstance(sel, ir.Last):
        return f"the last {_tokens(sel.count)}"
    if isinstance(sel, ir.TopK):
        return f"the {_tokens(sel.count)} with the highest {expr_text(sel.score)}"
    if isinstance(sel, ir.TopP):
        limit = f", at most {_tokens(sel.limit)}" if sel.limit is not None else ""
        floor = f", at least {_tokens(sel.floor)}" if sel.floor is not None else ""
        return f"the fewest tokens holding mass {fmt_number(sel.p)} of {expr_text(sel.score)}{limit}{floor}"
    if isinstance(sel, ir.Threshold):
        return f"every token with {expr_text(sel.score)} {sel.operator} {fmt_number(sel.value)}"
    assert isinstance(sel, ir.SelectUnion)
    return " and ".join(selection_text(p) for p in sel.parts)


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def _trigger_text(t: ir.Trigger) -> str:
    guard = f" once a head holds {t.min_length} tokens or more" if t.min_length is not None else ""
    if t.kind == "prefill":
        return f"right after prefill{guard}"
    if t.kind == "every":
        return f"every {t.every} decode step{'s' if t.every != 1 else ''}{guard}"
    return f"at any step{guard}"


def explain(policy: ir.Policy, num_layers: int | None = None) -> str:
    """Plain-words description; with num_layers, per-layer budgets are listed."""
    out = [f"{policy.name}: {policy.doc or '(no description)'}", f"hash: {policy.content_hash}"]
    if policy.params:
        out.append("params: " + ", ".join(f"{n} = {fmt_number(p.value)} {p.unit}" for n, p in policy.params.items()))
    if not policy.compresses:
        out.append("keeps every token: this policy never compresses.")
        return "\n".join(out) + "\n"
    if policy.observe:
        out.append(f"observes the last {policy.observe} queries (a ring buffer per sequence)")
    for name, e in policy.scores.items():
        out.append(f"score {name} = {expr_text(e)}")
    for st in policy.states:
        decay = f", decayed by {fmt_number(st.decay)} per query" if st.decay != 1 else ""
        out.append(f"state {st.name}: per token, accumulates {expr_text(st.update)} over every query{decay}")
    for cal in policy.calibrations:
        solver = f"Adam (lr {fmt_number(cal.solver.lr)}, up to {cal.solver.steps} steps, tol {fmt_number(cal.solver.tol)})" if cal.solver.kind == "adam" else f"bisection (up to {cal.solver.steps} steps, tol {fmt_number(cal.solver.tol)})"
        when = {"once": "at a sequence's first compression", "every": f"refitted every {cal.fit.every} compressions", "file": f"loaded from {cal.fit.file}"}[cal.fit.kind]
        out.append(
            f"calibrates {cal.name} per ({', '.join(cal.scope)}): so that {expr_text(cal.metric)} needs as many tokens "
            f"as {expr_text(cal.target)}; {solver}, init {fmt_number(cal.init)}, clamped to [{fmt_number(cal.clamp[0])}, {fmt_number(cal.clamp[1])}], {when}"
        )
    if policy.skip_layers:
        out.append(f"never compresses layers {', '.join(map(str, policy.skip_layers))}")
    if policy.keeps:
        out.append("keeps:")
        for keep in policy.keeps:
            out.append(f"  {keep.name}: {selection_text(keep.select)}{_keep_scope(keep)}")
            if keep.by_layer is not None and isinstance(keep.select, ir.TopK):
                layers = num_layers or (len(keep.by_layer.weights) if keep.by_layer.kind == "table" else 8)
                counts = layer_counts(keep.select.count, keep.by_layer, layers)
                out.append(f"    by layer ({keep.by_layer.kind}, {layers} layers): {', '.join(map(str, counts))}")
    if policy.cap is not None:
        out.append(f"holds at most {_tokens(policy.cap)} per kv head")
    if policy.layout == "flatten_sum":
        out.append("stores each kv head's kept tokens back to back (flatten_sum): bytes follow the sum of the heads' counts")
    if policy.merge is not None:
        weight = f", weighted by {expr_text(policy.merge.weight)}" if policy.merge.weight else ""
        out.append(f"merges evicted tokens into the {policy.merge.into} kept token{weight}")
    for tier in policy.cascade:
        out.append(_tier_text(tier))
    out.append("compresses " + "; and ".join(_trigger_text(t) for t in policy.triggers))
    return "\n".join(out) + "\n"


def _keep_scope(keep: ir.Keep) -> str:
    parts = []
    if isinstance(keep.select, (ir.First, ir.Last)):
        parts.append("")
    elif keep.per == "layer":
        floor = f", each head at least {fmt_number(keep.floor)} of an even share" if keep.floor else ""
        parts.append(f", shared by the heads of each layer{floor}")
    else:
        parts.append(", per kv head")
    if keep.layers is not None:
        parts.append(f", in layers {_ranges(keep.layers)}")
    if keep.kv_heads is not None:
        parts.append(f", in kv heads {_ranges(keep.kv_heads)}")
    return "".join(parts)


def _ranges(values: tuple[int, ...]) -> str:
    if len(values) > 2 and values == tuple(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))


def _tier_text(tier: ir.Tier) -> str:
    source = "new tokens since the last compression" if tier.source == "new" else f"tokens from tier {tier.source}"
    every = f" every {tier.every} compressions" if tier.every != 1 else ""
    select = f", keeping {selection_text(tier.select)} per {tier.per.replace('_', ' ')}" if tier.select is not None else ""
    store = f", stored as {tier.store}" if tier.store != "native" else ""
    cap = f", at most {_tokens(tier.cap)} per kv head" if tier.cap is not None else ""
    merge = f", evicted tokens merged into the {tier.merge.into} kept one" if tier.merge else ""
    return f"tier {tier.name}: {source}{every}{select}; layout {tier.layout}{store}{cap}{merge}"

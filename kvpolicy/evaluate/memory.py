"""Equal physical KV memory: a memory fraction -> each policy's params.

`--memory 0.25` means every policy holds ~25% of the bytes a full cache holds
for the same context. How a policy gets there depends on what sizes it:

- reference  `full` (a policy that never compresses): holds 100%, run once.
- fixed      every kv head keeps a fixed count (`budget`, the same for all
             heads of a layer; per-layer shapes average to it): budget =
             fraction x context tokens. The bytes each run holds are still
             measured and reported.
- search     the count depends on the input: top-p / threshold selections
             (topp, hardkv) or a budget shared by the heads of a layer
             (adakv). What they hold depends on the input and on the layout
             (flatten_max: a layer holds as many slots as its fullest head;
             flatten_sum: each head its own), so the bytes held are
             measured on the first sample for candidate values of the size
             param (`budget`, else `p`) until they are within tolerance of
             the target (or the probes run out: the closest is used).
- unsized    no size param (e.g. kivi): runs unchanged; bytes measured.

One adjustment keeps a policy valid at small budgets, and is said in the
setting's explanation: a `window` that would fill the budget is halved to fit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from kvpolicy import ir
from kvpolicy.diagnostics import PolicyError
from kvpolicy.errors import KvpolicyError
from kvpolicy.program import sized_by_scores, storage_layout

TOLERANCE_ABS, TOLERANCE_REL = 0.005, 0.03
MAX_PROBES = 7
P_RANGE = (0.5, 1 - 1e-6)


class SizingError(KvpolicyError):
    """A policy cannot be sized to a memory fraction."""


@dataclass
class Setting:
    """How one policy was sized for one memory fraction."""

    policy: str  # the label the user gave (name or path)
    memory: float  # the requested fraction of full KV bytes
    method: str  # reference | fixed | search | unsized
    params: dict = field(default_factory=dict)  # params the harness set
    how: str = ""  # in words, for the report
    measured: float | None = None  # held fraction measured after prefill (search only)
    probes: list = field(default_factory=list)  # [(value, held fraction)] of the search

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> "Setting":
        data = dict(data)
        data["probes"] = [tuple(p) for p in data.get("probes", [])]
        return Setting(**data)


def tolerance(target: float) -> float:
    return max(TOLERANCE_ABS, TOLERANCE_REL * target)


# ----------------------------------------------------------------- classify


def input_dependent(policy_ir: ir.Policy) -> bool:
    """True when how many tokens a layer holds depends on the input."""
    if sized_by_scores(policy_ir):
        return True
    return any(k.per == "layer" for k in policy_ir.keeps) or any(t.per == "layer" for t in policy_ir.cascade)


def classify(policy) -> str:
    pir = policy.ir
    if not pir.compresses and not pir.cascade:
        return "reference" if policy.name == "full" else "unsized"
    params = pir.params
    has_budget = "budget" in params and params["budget"].unit == "tokens"
    if not input_dependent(pir):
        return "fixed" if has_budget else "unsized"
    if has_budget or ("p" in params and params["p"].unit == "prob"):
        return "search"
    return "unsized"


def knob(policy) -> str | None:
    """The param a search moves: `budget` when there is one, else `p`."""
    params = policy.ir.params
    if "budget" in params and params["budget"].unit == "tokens":
        return "budget"
    if "p" in params and params["p"].unit == "prob":
        return "p"
    return None


# ----------------------------------------------------------------- params


def sized(policy, params: dict):
    """policy.with_params(**params), halving `window` if it fills the budget.
    Returns (policy, the params actually set, notes)."""
    try:
        return policy.with_params(**params), dict(params), []
    except PolicyError as err:
        first = err
    budget = params.get("budget")
    if budget is not None and "window" in policy.ir.params and "window" not in params:
        window = max(1, int(budget) // 2)
        if window < policy.ir.params["window"].value:
            params2 = dict(params, window=window)
            try:
                note = f"window={window} (default {policy.ir.params['window'].value} fills budget {budget})"
                return policy.with_params(**params2), params2, [note]
            except PolicyError:
                pass
    message = first.diagnostics[0].message if first.diagnostics else str(first)
    raise SizingError(f"{policy.name} cannot be sized to {params}: {message}")


def fixed_budget(fraction: float, context: int) -> int:
    return max(1, round(fraction * context))


def plan_fixed(label: str, policy, fraction: float, context: int) -> tuple[Setting, object]:
    """Setting and sized policy for reference, fixed and unsized policies."""
    method = classify(policy)
    if method == "reference":
        return Setting(label, 1.0, method, {}, "reference: holds every token"), policy
    if method == "unsized":
        sized_policy, params, more = sized(policy, {})
        how = "; ".join(["no size param: runs with its own params"] + more)
        return Setting(label, fraction, method, params, how), sized_policy
    if method != "fixed":
        raise ValueError(f"{label} needs a measured search")
    budget = fixed_budget(fraction, context)
    sized_policy, params, more = sized(policy, {"budget": budget})
    how = "; ".join([f"budget={budget} (= {fraction:g} x {context} tokens)"] + more)
    return Setting(label, fraction, method, params, how), sized_policy


# ----------------------------------------------------------------- search


def search(measure: Callable[[float], float], target: float, x0: float, lo: float, hi: float,
           integer: bool, max_probes: int = MAX_PROBES, known: dict | None = None) -> tuple[float, float, list[tuple[float, float]]]:
    """Find x in [lo, hi] whose measured held fraction is closest to target,
    for a measure that grows with x. Budgets (integer) step proportionally
    (bytes ~ budget); probabilities move in u = -ln(1 - p). Once the target
    is bracketed, the next probe interpolates linearly between the closest
    probes on either side. The search stops early when the measure no longer
    moves (a plateau: the target cannot be reached with this param).
    `known` holds probes already measured. Returns (x, held, probes)."""
    if integer:
        to_u, from_u = float, lambda u: float(min(hi, max(lo, round(u))))
    else:
        to_u = lambda x: -math.log(1 - x)  # noqa: E731
        from_u = lambda u: round(min(hi, max(lo, 1 - math.exp(-u))), 6)  # noqa: E731
    probes: dict[float, float] = dict(known or {})
    budget = max_probes + len(probes)
    tol = tolerance(target)

    def probe(x: float) -> None:
        if x not in probes and len(probes) < budget:
            probes[x] = float(measure(x))

    def best() -> tuple[float, float]:
        return min(probes.items(), key=lambda item: (abs(item[1] - target), item[1]))

    probe(from_u(to_u(x0)))
    while len(probes) < budget:
        bx, bh = best()
        if abs(bh - target) <= tol:
            break
        below = sorted((x, h) for x, h in probes.items() if h < target)
        above = sorted((x, h) for x, h in probes.items() if h > target)
        if below and above:
            (xl, hl), (xh, hh) = below[-1], above[0]
            ul, uh = to_u(xl), to_u(xh)
            u = ul + (target - hl) * (uh - ul) / (hh - hl) if hh > hl else (ul + uh) / 2
            nxt = from_u(u)
            if nxt in probes:  # interpolation stalls: bisect
                nxt = from_u((ul + uh) / 2)
            if nxt in probes:
                break  # integer steps exhausted
        else:
            side = below if below else above
            x, h = side[-1] if below else side[0]
            end = hi if below else lo
            if len(side) >= 2:
                (_, h1), (_, h2) = (side[-2], side[-1]) if below else (side[0], side[1])
                if abs(h2 - h1) < tol / 4:
                    # A plateau: more of this param does not change the bytes
                    # held here. It may further on (a top-p set that has not
                    # yet outgrown the prompt's first interval), so the end of
                    # the range is probed once before giving up.
                    if from_u(to_u(end)) in probes:
                        break
                    probe(from_u(to_u(end)))
                    continue
            if integer:
                nxt = from_u(x * target / h if h > 0 else x * 2)
            else:
                nxt = from_u(to_u(x) + (1.5 if below else -1.5))
            if nxt in probes:
                break  # at the end of the range: the target cannot be reached
        probe(nxt)
    x, held = best()
    return x, held, sorted(probes.items())


def cap_of(policy) -> int | None:
    """The most tokens a kv head may hold, if the policy states a cap."""
    caps = [c for c in [policy.ir.cap, *(t.cap for t in policy.ir.cascade)] if c is not None]
    return max(caps) if caps else None


def plan_search(label: str, policy, fraction: float, context: int, measure_policy) -> tuple[Setting, object]:
    """Measured search; measure_policy(policy) -> held fraction after prefill.

    A policy with a budget and a `p` (hardkv: cap 2 x budget + window) stored
    flatten_sum gets the fixed policies' budget and a searched `p`. Stored
    flatten_max (a layer pays for its fullest head), it first gets the
    largest budget whose cap fits the target, so no head can exceed it; when
    top-p keeps fewer tokens than that, `p` is raised until the bytes held
    reach the target. Otherwise the one size param is searched."""
    params = policy.ir.params
    target_tokens = max(1, round(fraction * context))
    cache: dict[tuple, tuple] = {}

    def build(**values):
        key = tuple(sorted(values.items()))
        if key not in cache:
            cache[key] = sized(policy, values)
        return cache[key]

    has_p = "p" in params and params["p"].unit == "prob"
    name = knob(policy)
    steps: list[str] = []
    fixed: dict = {}
    per_head_bytes = storage_layout(policy.ir) == "flatten_sum"
    if name == "budget" and has_p and per_head_bytes:
        # Each head pays only for its own tokens: the budget is the fixed
        # policies' one (hardkv's cap 2 x budget + window lets a diffuse head
        # hold more than a focused one, as the method intends) and p is
        # searched until the bytes held reach the target.
        fixed = {"budget": fixed_budget(fraction, context)}
        held0 = measure_policy(build(**fixed)[0])
        steps.append(f"budget={fixed['budget']} (= {fraction:g} x {context} tokens) holds {held0:.1%}")
        name = "p"
        known = {float(params["p"].value): held0}
    elif name == "budget" and has_p and cap_of(build(budget=context)[0]) is not None:
        lo, hi = 1, context  # the largest budget whose cap fits the target (compile only)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cap_of(build(budget=mid)[0]) <= target_tokens else (lo, mid - 1)
        fixed = {"budget": lo}
        held0 = measure_policy(build(budget=lo)[0])
        steps.append(f"budget={lo} (cap {cap_of(build(budget=lo)[0])} = {fraction:g} x {context} tokens) holds {held0:.1%}")
        if held0 < fraction - tolerance(fraction):
            name = "p"  # top-p keeps fewer than the cap: raise p
            known = {float(params["p"].value): held0}
        else:
            known = {float(lo): held0}
    else:
        known = {}

    def measure(x: float) -> float:
        return measure_policy(build(**fixed, **{name: _value(name, x)})[0]) if name == "p" else measure_policy(build(budget=_value(name, x))[0])

    if name == "budget":
        x0, lo_x, hi_x, integer = (fixed.get("budget") or fixed_budget(fraction, context)), 1, context, True
        fixed = {}
    else:
        x0, lo_x, hi_x, integer = float(params["p"].value), P_RANGE[0], P_RANGE[1], False
    x, held, probes = search(measure, fraction, x0, lo_x, hi_x, integer, known=known)
    values = dict(fixed, **{name: _value(name, x)})
    sized_policy, set_params, more = build(**values)
    verdict = "within tolerance" if abs(held - fraction) <= tolerance(fraction) else "closest reachable"
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    how = f"{shown} (searched {name}: holds {held:.1%} after prefill on the first sample, {verdict}, {len(probes)} probes)"
    how = "; ".join([how] + more)
    return Setting(label, fraction, "search", set_params, how, held, [(round(a, 6), round(b, 5)) for a, b in probes]), sized_policy


def _value(name: str, x: float):
    return int(x) if name == "budget" else round(x, 6)


# ----------------------------------------------------------------- decode regime: peak bytes


def prefill_only(policy) -> bool:
    """A policy that compresses only right after the prefill: over a long
    continuation it holds every generated token, so at equal peak memory it
    is not comparable with policies that compress while decoding."""
    triggers = policy.ir.triggers
    return bool(triggers) and all(t.kind == "prefill" for t in triggers)


def decode_slack(policy) -> int:
    """Tokens a head may gain over `budget` between two decode compressions,
    by the schedule: `when length >= L` -> L - budget; `every N steps` -> N
    (a cascade that rewrites every c compressions: N x c). A first guess for
    the search; the bytes are measured."""
    budget = policy.params().get("budget", 0)
    rewrite = max([t.every for t in policy.ir.cascade if t.layout in ("flatten_max", "flatten_sum")] or [1])
    slack = 0
    for t in policy.ir.triggers:
        if t.kind == "when" and t.min_length is not None:
            slack = max(slack, t.min_length - budget)
        elif t.kind == "every":
            slack = max(slack, t.every * rewrite)
    return max(slack, 0)


def plan_peak(label: str, policy, fraction: float, total: int, measure_policy) -> tuple[Setting, object]:
    """Size a policy so that its PEAK KV bytes over the continuation are
    `fraction` of what the full cache holds at the end (`total` tokens):
    measure_policy(policy) -> that peak fraction, one run over the whole
    continuation. The budget is searched first, from the schedule's first
    guess (budget + slack = target); a policy that also has `p` (top-p
    selection under a cap) whose peak the budget cannot bring to the target
    then gets `p` searched at that budget: raised when the peak stops growing
    below the target, lowered when it stops falling above it. A policy with
    `p` only gets `p` searched."""
    name = knob(policy)
    if name is None:
        raise SizingError(f"{label} has no size param (budget or p): it cannot be sized to a peak memory")
    params = policy.ir.params
    cache: dict[tuple, tuple] = {}

    def build(**values):
        key = tuple(sorted(values.items()))
        if key not in cache:
            cache[key] = sized(policy, values)
        return cache[key]

    target_tokens = fraction * total
    steps: list[str] = []
    fixed: dict = {}
    if name == "budget":
        slack = decode_slack(build(budget=max(1, round(target_tokens)))[0])
        x0 = max(2, round(target_tokens - slack))
        x, held, probes = search(lambda b: measure_policy(build(budget=_value("budget", b))[0]), fraction, x0, 2, total, True)
        values = {"budget": _value("budget", x)}
        steps.append(f"first guess budget={x0} (= {fraction:g} x {total} tokens - {slack} the schedule adds)")
        if "p" in params and params["p"].unit == "prob" and abs(held - fraction) > tolerance(fraction):
            # The budget alone cannot reach the target: below it, top-p keeps
            # less than the cap allows (raise p); above it, the peak no longer
            # falls with the budget, because top-p's own set plus the tokens of
            # an interval already exceed it (lower p).
            fixed = dict(values)
            known = {float(params["p"].value): held}
            raise_p = held < fraction
            x, held, more = search(lambda p: measure_policy(build(**fixed, p=_value("p", p))[0]), fraction,
                                   float(params["p"].value), P_RANGE[0], P_RANGE[1], False, known=known)
            values = dict(fixed, p=_value("p", x))
            steps.append(f"top-p keeps {'less' if raise_p else 'more'} than the target at budget={fixed['budget']}: p {'raised' if raise_p else 'lowered'}")
            probes = probes + [(f"p={a}", b) for a, b in more]
    else:
        x, held, probes = search(lambda p: measure_policy(build(p=_value("p", p))[0]), fraction,
                                 float(params["p"].value), P_RANGE[0], P_RANGE[1], False)
        values = {"p": _value("p", x)}
    sized_policy, set_params, notes = build(**values)
    verdict = "within tolerance" if abs(held - fraction) <= tolerance(fraction) else "closest reachable"
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    how = f"{shown} (searched: peak {held:.1%} over the continuation on the first sample, {verdict}, {len(probes)} probes)"
    how = "; ".join([how] + steps + notes)
    probes = [(a if isinstance(a, str) else round(a, 6), round(b, 5)) for a, b in probes]
    return Setting(label, fraction, "search", set_params, how, held, probes), sized_policy

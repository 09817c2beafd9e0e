"""AST -> IR: name resolution, statement rules and whole-policy rules.

Every error is collected (none stops the check) and reported together as a
PolicyError. Expressions are checked by typecheck.ExprChecker; this module
owns the statements: params and overrides, definitions and their cycles,
keep sets against caps, schedules and cascades.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from . import ast, ir
from .ops import BUILTINS, GRANULARITIES, LAYOUTS, MERGE_TARGETS, POLICY_LAYOUTS, RESTRICTABLE, SCOPES, STORES, UNITS
from .diagnostics import Diagnostic, PolicyError, Source, Span, did_you_mean
from .budgets import layer_peak
from .program import selection_leaves
from .syntax import keywords
from .typecheck import ERROR, MAX_MAGNITUDE, ExprChecker, Typed, describe, fmt_number

MAX_INDEX = 4096  # layer / head indices; no model has more


@dataclass
class _Definition:
    kind: str  # param | score | state | calibration
    node: object
    span: Span
    typed: Typed | None = None
    checking: bool = False


def check(policy: ast.Policy, source: Source, overrides: dict[str, object] | None = None) -> ir.Policy:
    """Check a parsed policy and return its IR; raise PolicyError listing every error."""
    checker = _Checker(policy, source, overrides or {})
    try:
        result = checker.run()
    except RecursionError:
        checker.errors.append(Diagnostic(policy.span, "policy is nested too deeply to check"))
        result = None
    if checker.errors:
        raise PolicyError(_dedupe(checker.errors), source)
    assert result is not None
    return result


def _dedupe(errors: list[Diagnostic]) -> list[Diagnostic]:
    seen, unique = set(), []
    for d in errors:
        if (d.span, d.message) not in seen:
            seen.add((d.span, d.message))
            unique.append(d)
    return unique


class _Checker:
    def __init__(self, policy: ast.Policy, source: Source, overrides: dict[str, object]):
        self.policy = policy
        self.source = source
        self.overrides = overrides
        self.errors: list[Diagnostic] = []
        self.defs: dict[str, _Definition] = {}
        self.score_order: list[str] = []
        self.expr = ExprChecker(self._resolve, lambda: list(self.defs), self.errors)
        self.observe_span: Span | None = None
        self.params: dict[str, ir.Param] = {}
        self.definition_irs: dict[str, object] = {}  # score / state name -> its expression's IR
        self.protected = 0  # tokens kept by top-level first/last, in every tier

    def error(self, span: Span, message: str) -> None:
        self.errors.append(Diagnostic(span, message))

    # ------------------------------------------------------------- driver

    def run(self) -> ir.Policy | None:
        statements = self.policy.statements
        if self.policy.name.name in keywords():
            self.error(self.policy.name.span, f"'{self.policy.name.name}' is a reserved word; choose another policy name")
        self._collect_definitions(statements)
        self._apply_overrides()
        singles: dict[type, ast.Statement] = {}
        out: dict[str, object] = {"keeps": [], "states": [], "calibrations": []}
        for st in statements:
            if isinstance(st, (ast.Observe, ast.Cap, ast.Skip, ast.Layout, ast.Merge, ast.Compress, ast.Cascade)):
                if type(st) in singles:
                    first = singles[type(st)]
                    self.error(st.span, f"a policy has at most one '{_keyword(st)}' statement (the first is on line {first.span.line})")
                    continue
                singles[type(st)] = st
        observe = singles.get(ast.Observe)
        if observe is not None:
            self.observe_span = observe.span
            out["observe"] = self.expr.expect_number(observe.window, "tokens", "the observed query window", low=1)
        for name, d in self.defs.items():
            self._typed(name)  # check every definition, used or not
        for st in statements:
            if isinstance(st, ast.State):
                out["states"].append(self._state(st))
            elif isinstance(st, ast.Calibrate):
                out["calibrations"].append(self._calibrate(st))
            elif isinstance(st, ast.Keep):
                out["keeps"].append(self._keep(st))
        self.protected = sum(t.protected for _, t in out["keeps"] if t.kind == "selection")
        keep_names = {}
        for st in statements:
            if isinstance(st, ast.Keep):
                if st.name.name in keep_names:
                    self.error(st.name.span, f"keep '{st.name.name}' is already defined on line {keep_names[st.name.name]}")
                keep_names.setdefault(st.name.name, st.name.span.line)
        cap = singles.get(ast.Cap)
        out["cap"] = self.expr.expect_number(cap.value, "tokens", "cap", low=1) if cap else None
        skip = singles.get(ast.Skip)
        out["skip_layers"] = self._index_set(skip.layers, "layer") if skip else ()
        merge = singles.get(ast.Merge)
        out["merge"] = self._merge(merge) if merge else None
        compress = singles.get(ast.Compress)
        out["triggers"] = self._compress(compress) if compress else ()
        cascade = singles.get(ast.Cascade)
        out["cascade"] = self._cascade(cascade, out["cap"]) if cascade else ()
        out["layout"] = self._layout(singles.get(ast.Layout), cascade)
        self._whole_policy_rules(statements, out, compress, cascade, cap)
        if self.errors:
            return None
        return self._build(out)

    def _build(self, out: dict) -> ir.Policy:
        scores = {name: self.definition_irs[name] for name in self.score_order}
        keeps = [k for k, _ in out["keeps"]]
        return ir.Policy(
            name=self.policy.name.name,
            doc=self.policy.doc,
            params={name: self.params[name] for name, d in self.defs.items() if d.kind == "param" and name in self.params},
            observe=out.get("observe"),
            scores=scores,
            states=tuple(out["states"]),
            calibrations=tuple(out["calibrations"]),
            keeps=tuple(keeps),
            cap=out["cap"],
            skip_layers=tuple(out["skip_layers"] or ()),
            merge=out["merge"],
            triggers=tuple(out["triggers"]),
            cascade=tuple(out["cascade"]),
            layout=out["layout"],
        )

    def _layout(self, st: ast.Layout | None, cascade: ast.Cascade | None) -> str:
        """How compaction stores the kept tokens of a non-cascade policy."""
        if st is None:
            return "flatten_max"
        word = st.word.name
        if cascade is not None:
            self.error(st.span, "with a cascade, each tier gives its own layout ('tier NAME: ..., layout L'); remove this statement")
        elif word in LAYOUTS and word not in POLICY_LAYOUTS:
            self.error(st.word.span, f"layout '{word}' is for cascade tiers; a policy compacts what it keeps: expected {', '.join(POLICY_LAYOUTS)}")
        elif word not in POLICY_LAYOUTS:
            self.error(st.word.span, f"unknown layout '{word}'{did_you_mean(word, POLICY_LAYOUTS)}; expected {', '.join(POLICY_LAYOUTS)}")
        return word if word in POLICY_LAYOUTS else "flatten_max"

    # ------------------------------------------------------------- definitions

    def _collect_definitions(self, statements) -> None:
        kinds = {ast.Param: "param", ast.Score: "score", ast.State: "state", ast.Calibrate: "calibration"}
        reserved = keywords()
        for st in statements:
            kind = kinds.get(type(st))
            if kind is None:
                continue
            name = st.name.name
            if name in BUILTINS:
                self.error(st.name.span, f"'{name}' is a built-in function; choose another name for this {kind}")
                continue
            if name in reserved:
                self.error(st.name.span, f"'{name}' is a reserved word; choose another name")
                continue
            if name in self.defs:
                prev = self.defs[name]
                self.error(st.name.span, f"'{name}' is already defined on line {prev.span.line} (as a {prev.kind})")
                continue
            self.defs[name] = _Definition(kind, st, st.name.span)

    def _apply_overrides(self) -> None:
        params = [n for n, d in self.defs.items() if d.kind == "param"]
        for name in self.overrides:
            if name not in params:
                known = ", ".join(params) if params else "none"
                self.error(self.policy.name.span, f"no param '{name}' to set{did_you_mean(name, params)} (params: {known})")

    def _resolve(self, name: str, span: Span) -> Typed | None:
        if name not in self.defs:
            return None
        return self._typed(name, span)

    def _typed(self, name: str, use_span: Span | None = None) -> Typed:
        d = self.defs[name]
        if d.typed is not None:
            return d.typed
        if d.checking:
            self.error(use_span or d.span, f"'{name}' depends on itself")
            d.typed = ERROR
            return ERROR
        d.checking = True
        try:
            typed = {"param": self._param, "score": self._score, "state": self._state_symbol, "calibration": self._calibration_symbol}[d.kind](d.node)
        finally:
            d.checking = False
        if d.typed is None:  # not already poisoned by a cycle
            d.typed = typed
        if d.kind == "score" and name not in self.score_order and d.typed is not ERROR:
            self.score_order.append(name)
        return d.typed

    def _param(self, st: ast.Param) -> Typed:
        unit = st.unit.name
        if unit not in UNITS:
            self.error(st.unit.span, f"unknown unit '{unit}' (units are {', '.join(UNITS)}){did_you_mean(unit, UNITS)}")
            return ERROR
        what = f"param {st.name.name}"
        typed = self.expr.check(st.default)
        # A written number must be whole; a computed one (budget / 2) rounds down like any count.
        literal = isinstance(st.default, (ast.Number, ast.Neg))
        if literal and not _whole_if_needed(typed.value, unit):
            self.error(st.default.span, f"{what} must be {_whole_words(unit)}, got {fmt_number(typed.value)}")
            return ERROR
        default = self.expr.number_value(st.default, typed, unit, what)
        if default is None:
            return ERROR
        value, note = default, ""
        if st.name.name in self.overrides:
            raw = self.overrides[st.name.name]
            value = _parse_override(raw)
            note = f" (set to {raw})"
            if value is None:
                self.error(st.default.span, f"{what} must be a number; --set gave '{raw}'")
                return ERROR
            if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
                self.error(st.default.span, f"{what} is too large{note}; the limit is {MAX_MAGNITUDE:g}")
                return ERROR
            if not _whole_if_needed(value, unit):
                self.error(st.default.span, f"{what} must be {_whole_words(unit)}, got {fmt_number(value)}{note}")
                return ERROR
            value = self.expr.value_in_range(st.default.span, value, unit, what, note=note)
            if value is None:
                return ERROR
        if unit in ("tokens", "steps", "int"):
            value, default = int(value), int(default)
        self.params[st.name.name] = ir.Param(unit=unit, value=value, default=default)
        # Where a param is used, its value is substituted; the IR keeps the table too.
        return Typed("number", ir.Const(value=value, unit=unit), unit=unit, value=value, nonneg=value >= 0)

    def _score(self, st: ast.Score) -> Typed:
        typed = self.expr.check(st.expr)
        if typed.kind == "error":
            return ERROR
        if typed.kind != "tensor":
            self.error(st.expr.span, f"a score is a per-token value; this is {describe(typed)}" + (" (use it in a keep)" if typed.kind == "selection" else ""))
            return ERROR
        self._require_queries(typed)
        self.definition_irs[st.name.name] = typed.ir
        return Typed("tensor", ir.Ref(name=st.name.name, kind="score"), nonneg=typed.nonneg, query_span=typed.query_span, uses=typed.uses | {st.name.name})

    def _state_symbol(self, st: ast.State) -> Typed:
        typed = self.expr.check(st.update)
        if typed.kind == "error":
            return ERROR
        if typed.kind != "tensor":
            self.error(st.update.span, f"a state accumulates a per-token value; this is {describe(typed)}")
            return ERROR
        if not (isinstance(typed.ir, ir.Signal) and typed.ir.name == "attn"):
            # What the checker accepts, a backend runs: states are accumulated
            # from the attention rows the engine already computes.
            self.error(st.update.span, "a state accumulates attention as queries arrive: its update is attn(...) "
                                       "(e.g. state acc += attn(group = sum)); other per-token updates are not supported yet")
            return ERROR
        # States see every query as it is decoded, so they need no observe window.
        self.definition_irs[st.name.name] = typed.ir
        return Typed("tensor", ir.Ref(name=st.name.name, kind="state"), nonneg=typed.nonneg, uses=typed.uses | {st.name.name})

    def _calibration_symbol(self, st: ast.Calibrate) -> Typed:
        # A calibrated scalar is positive (its clamp is), known only at run time.
        return Typed("number", ir.Ref(name=st.name.name, kind="calibration"), unit="float", nonneg=True, uses=frozenset({st.name.name}))

    def _require_queries(self, typed: Typed) -> None:
        if typed.query_span is not None and self.observe_span is None:
            self.error(typed.query_span, "this signal reads observed queries; add 'observe queries last N'")

    # ------------------------------------------------------------- statements

    def _state(self, st: ast.State) -> ir.State | None:
        d = self.defs.get(st.name.name)
        # A state whose name was rejected (a built-in, a reserved word, a
        # duplicate) has no definition of its own; that error is already recorded.
        typed = self._typed(st.name.name) if d is not None and d.node is st else ERROR
        decay = 1.0
        if st.decay is not None:
            decay = self.expr.expect_number(st.decay, "prob", "decay")
        if typed is ERROR or decay is None:
            return None
        return ir.State(name=st.name.name, update=self.definition_irs[st.name.name], decay=decay)

    def _calibrate(self, st: ast.Calibrate) -> ir.Calibration | None:
        name = st.name.name
        scope = []
        for ident in st.scope:
            if ident.name not in SCOPES:
                self.error(ident.span, f"unknown scope '{ident.name}'{did_you_mean(ident.name, SCOPES)}; expected layer, kv_head or (layer, kv_head)")
            elif ident.name in scope:
                self.error(ident.span, f"'{ident.name}' is listed twice")
            else:
                scope.append(ident.name)
        items: dict[str, ast.CalibItem] = {}
        for item in st.items:
            if item.kind in items:
                self.error(item.span, f"'{item.kind}' is given twice in this calibrate block (first on line {items[item.kind].span.line})")
            items.setdefault(item.kind, item)
        for required in ("target", "metric"):
            if required not in items:
                self.error(st.name.span, f"calibrate {name} needs a '{required}' line")
        target = metric = None
        if "target" in items:
            node = items["target"].values[0]
            typed = self.expr.check(node)
            if typed.kind not in ("count", "error"):
                self.error(node.span, f"a calibration target is a count such as top_p_count(softmax(z), p); this is {describe(typed)}")
            elif typed.kind == "count":
                if name in typed.uses:
                    self.error(node.span, f"the target must not depend on {name}, the value being fitted")
                self._require_queries(typed)
                target = typed.ir
        if "metric" in items:
            node = items["metric"].values[0]
            typed = self.expr.check(node)
            if typed.kind not in ("tensor", "error"):
                self.error(node.span, f"a calibration metric is a per-token score; this is {describe(typed)}")
            elif typed.kind == "tensor":
                if name not in typed.uses:
                    self.error(node.span, f"the metric must use {name}, the value being fitted")
                elif not typed.nonneg:
                    self.error(node.span, "the metric must be non-negative (a distribution such as softmax(...)), since its mass is matched")
                else:
                    self._require_queries(typed)
                    metric = typed.ir
        solver = ir.Solver(kind="adam", steps=50, tol=0.01, lr=0.01)
        if "solve" in items:
            typed = self.expr.check(items["solve"].values[0])
            if typed.kind == "solver":
                solver = typed.ir
            elif typed.kind != "error":
                self.error(items["solve"].values[0].span, "solve expects adam(...) or bisect(...)")
        init = 1.0
        if "init" in items:
            init = self.expr.expect_number(items["init"].values[0], "float", "init")
        clamp, clamp_ok = (1e-3, 10.0), True
        if "clamp" in items:
            lo_node, hi_node = items["clamp"].values
            lo = self.expr.expect_number(lo_node, "float", "the clamp's lower bound")
            hi = self.expr.expect_number(hi_node, "float", "the clamp's upper bound")
            clamp_ok = lo is not None and hi is not None and 0 < lo < hi
            if lo is not None and hi is not None:
                if lo <= 0:
                    self.error(lo_node.span, f"the clamp's lower bound must be positive (a temperature), got {fmt_number(lo)}")
                elif lo >= hi:
                    self.error(items["clamp"].span, f"clamp [{fmt_number(lo)}, {fmt_number(hi)}] is empty: the lower bound must be below the upper")
                else:
                    clamp = (lo, hi)
        if init is not None and clamp_ok and not clamp[0] <= init <= clamp[1]:
            span = items["init"].span if "init" in items else st.name.span
            self.error(span, f"init {fmt_number(init)} is outside the clamp [{fmt_number(clamp[0])}, {fmt_number(clamp[1])}]")
        fit = ir.Fit(kind="once")
        if "fit" in items:
            item = items["fit"]
            if item.fit == "every":
                every = self.expr.expect_number(item.values[0], "int", "fit every", low=1)
                fit = ir.Fit(kind="every", every=every) if every is not None else fit
            elif item.fit == "from":
                if not item.file:
                    self.error(item.span, "fit from needs a file name")
                fit = ir.Fit(kind="file", file=item.file)
        if None in (target, metric, init) or not scope:
            return None
        return ir.Calibration(name=name, scope=tuple(scope), target=target, metric=metric, solver=solver, init=init, clamp=clamp, fit=fit)

    def _keep(self, st: ast.Keep):
        typed = self.expr.check(st.selection)
        if typed.kind not in ("selection", "error"):
            self.error(st.selection.span, f"keep needs a selection (first, last, top_k, top_p or SCORE > NUMBER); this is {describe(typed)}")
            typed = ERROR
        if typed.kind == "selection":
            self._require_queries(typed)
        clauses: dict[str, object] = {}
        seen: dict[str, ast.KeepClause] = {}
        for clause in st.clauses:
            key = clause.word.name if clause.kind == "restrict" and clause.word else clause.kind
            if key in seen:
                self.error(clause.span, f"'{_clause_words(clause)}' is given twice in this keep")
                continue
            seen[key] = clause
            if clause.kind == "per":
                if clause.word.name not in GRANULARITIES:
                    self.error(clause.word.span, f"unknown granularity '{clause.word.name}'{did_you_mean(clause.word.name, GRANULARITIES)}; expected per kv_head or per layer")
                else:
                    clauses["per"] = clause.word.name
            elif clause.kind == "floor":
                clauses["floor"] = self.expr.expect_number(clause.value, "prob", "floor")
            elif clause.kind == "by_layer":
                clauses["by_layer"] = self._layer_shape(clause.value)
            elif clause.kind == "restrict":
                word = clause.word.name
                if word not in RESTRICTABLE:
                    self.error(clause.word.span, f"keep can be restricted 'in layers' or 'in kv_heads', not '{word}'{did_you_mean(word, RESTRICTABLE)}")
                else:
                    clauses[word] = self._index_set(clause.index_set, word[:-1])
        if "floor" in clauses and clauses.get("per") != "layer":
            self.error(seen["floor"].span, "floor applies to a budget shared per layer; add 'per layer'")
        positional = isinstance(typed.ir, (ir.First, ir.Last))
        for key in ("per", "floor", "by_layer"):
            if positional and key in seen:
                self.error(seen[key].span, f"'{_clause_words(seen[key])}' has no meaning for first/last, which keep the same tokens in every head")
        if typed.kind != "selection" or any(v is None for v in clauses.values()):
            return (None, typed)
        keep = ir.Keep(
            name=st.name.name,
            select=typed.ir,
            per=clauses.get("per", "kv_head"),
            floor=clauses.get("floor"),
            by_layer=clauses.get("by_layer"),
            layers=clauses.get("layers"),
            kv_heads=clauses.get("kv_heads"),
        )
        return (keep, typed)

    def _layer_shape(self, node: ast.Expr) -> ir.LayerShape | None:
        if isinstance(node, ast.List):
            weights = []
            for item in node.items:
                w = self.expr.expect_number(item, "float", "a layer weight", low=0)
                if w is None:
                    return None
                weights.append(float(w))
            if not weights or sum(weights) <= 0:
                self.error(node.span, "a by-layer table needs at least one positive weight")
                return None
            return ir.LayerShape(kind="table", weights=tuple(weights))
        typed = self.expr.check(node)
        if typed.kind == "layer_shape":
            if typed.ir.kind == "linear" and typed.ir.start + typed.ir.end <= 0:
                self.error(node.span, "linear(start, end) needs a positive weight somewhere")
                return None
            return typed.ir
        if typed.kind != "error":
            self.error(node.span, f"'by layer' expects uniform(), pyramid(beta), linear(start, end) or a list of weights; this is {describe(typed)}")
        return None

    def _index_set(self, node: ast.IndexSet, what: str) -> tuple[int, ...] | None:
        if node.items is not None:
            if not node.items:
                self.error(node.span, f"an empty list names no {what}")
                return None
            values = [self.expr.expect_number(item, "int", f"a {what} index", low=0, high=MAX_INDEX) for item in node.items]
            if None in values:
                return None
            if len(set(values)) != len(values):
                self.error(node.span, f"a {what} index is listed twice")
                return None
            return tuple(sorted(values))
        start = self.expr.expect_number(node.start, "int", f"a {what} index", low=0, high=MAX_INDEX)
        stop = self.expr.expect_number(node.stop, "int", f"a {what} index", low=0, high=MAX_INDEX)
        if start is None or stop is None:
            return None
        if start > stop:
            self.error(node.span, f"empty range {start}..{stop}: ranges are inclusive and ascending")
            return None
        return tuple(range(start, stop + 1))

    def _merge(self, st: ast.Merge) -> ir.Merge | None:
        if st.target.name not in MERGE_TARGETS:
            self.error(st.target.span, f"unknown merge target '{st.target.name}'{did_you_mean(st.target.name, MERGE_TARGETS)}; expected nearest or top")
            return None
        weight = None
        if st.weight is not None:
            typed = self.expr.check(st.weight)
            if typed.kind == "error":
                return None
            if typed.kind != "tensor" or not typed.nonneg:
                self.error(st.weight.span, "merge weights must be a non-negative per-token score")
                return None
            self._require_queries(typed)
            weight = typed.ir
        return ir.Merge(into=st.target.name, weight=weight)

    def _compress(self, st: ast.Compress) -> tuple[ir.Trigger, ...]:
        triggers, prefill_seen = [], False
        for t in st.triggers:
            if t.kind == "prefill":
                if prefill_seen:
                    self.error(t.span, "'at prefill' is given twice")
                prefill_seen = True
            every = self.expr.expect_number(t.every, "steps", "every") if t.every is not None else None
            min_length = None
            if t.guard is not None:
                bound = self.expr.expect_number(t.guard, "tokens", "the length bound")
                if bound is not None:
                    min_length = bound + 1 if t.guard_op == ">" else bound
                    if t.guard_op in ("<", "<="):
                        self.error(t.span, "compress when length > N (or >= N): compression is for long sequences")
                        continue
            if (t.every is not None and every is None) or (t.guard is not None and min_length is None):
                continue
            triggers.append(ir.Trigger(kind=t.kind, every=every, min_length=min_length))
        return tuple(triggers)

    # ------------------------------------------------------------- cascade

    def _cascade(self, st: ast.Cascade, policy_cap: int | None) -> tuple[ir.Tier, ...]:
        tiers: list[ir.Tier] = []
        names: dict[str, int] = {}
        if not st.tiers:
            self.error(st.span, "a cascade needs at least one tier")
        for index, tier in enumerate(st.tiers):
            name = tier.name.name
            if name in names:
                self.error(tier.name.span, f"tier '{name}' is already defined on line {names[name]}")
                continue
            built = self._tier(tier, index, list(names))
            names[name] = tier.name.span.line
            if built is not None:
                tiers.append(built)
        return tuple(tiers)

    def _tier(self, tier: ast.Tier, index: int, earlier: list[str]) -> ir.Tier | None:
        seen: dict[str, ast.TierClause] = {}
        fields: dict[str, object] = {}
        ok = True
        for clause in tier.clauses:
            if clause.kind in seen:
                self.error(clause.span, f"'{clause.kind}' is given twice in tier {tier.name.name}")
                ok = False
                continue
            seen[clause.kind] = clause
            if clause.kind == "new":
                fields["source"] = "new"
            elif clause.kind == "from":
                src = clause.word.name
                if src not in earlier:
                    hint = did_you_mean(src, earlier)
                    self.error(clause.word.span, f"tier '{src}' is not an earlier tier{hint}" + ("" if hint else f" (earlier: {', '.join(earlier) or 'none'})"))
                    ok = False
                fields["source"] = src
                if clause.value is not None:
                    fields["every"] = self.expr.expect_number(clause.value, "int", "every ... compressions", low=1)
            elif clause.kind == "select":
                typed = self.expr.check(clause.value)
                if typed.kind not in ("selection", "error"):
                    self.error(clause.value.span, f"select needs a selection (top_k, top_p, SCORE > NUMBER); this is {describe(typed)}")
                    ok = False
                elif typed.kind == "selection":
                    self._require_queries(typed)
                    fields["select"] = typed
                else:
                    ok = False
                if clause.word is not None:
                    if clause.word.name not in GRANULARITIES:
                        self.error(clause.word.span, f"unknown granularity '{clause.word.name}'{did_you_mean(clause.word.name, GRANULARITIES)}")
                        ok = False
                    fields["per"] = clause.word.name
            elif clause.kind in ("layout", "store"):
                choices = LAYOUTS if clause.kind == "layout" else STORES
                if clause.word.name not in choices:
                    self.error(clause.word.span, f"unknown {clause.kind} '{clause.word.name}'{did_you_mean(clause.word.name, choices)}; expected {', '.join(choices)}")
                    ok = False
                fields[clause.kind] = clause.word.name
            elif clause.kind == "cap":
                fields["cap"] = self.expr.expect_number(clause.value, "tokens", "tier cap", low=1)
            elif clause.kind == "merge":
                fields["merge"] = self._merge(clause.merge)
        if index == 0 and fields.get("source") != "new":
            self.error(tier.name.span, f"the first tier holds the new tokens: write 'tier {tier.name.name}: new, ...'")
            ok = False
        if index > 0 and "new" in seen:
            self.error(seen["new"].span, "only the first tier holds the new tokens")
            ok = False
        if index > 0 and "source" not in fields:
            fields["source"] = earlier[-1] if earlier else "new"  # default: the tier above
        if "new" in seen and "select" in seen:
            self.error(seen["select"].span, "the new tier holds every new token; selection happens in a later tier")
            ok = False
        select = fields.get("select")
        if isinstance(select, Typed) and fields.get("cap") is not None:
            self._check_cap([select], fields["cap"], seen["cap"].span, "tier cap", protected=self.protected, per=[fields.get("per", "kv_head")])
        if not ok or any(v is None for k, v in fields.items() if k != "select"):
            return None
        return ir.Tier(
            name=tier.name.name,
            source=fields["source"],
            every=fields.get("every", 1),
            select=select.ir if isinstance(select, Typed) else None,
            per=fields.get("per", "kv_head"),
            layout=fields.get("layout", "contiguous"),
            store=fields.get("store", "native"),
            cap=fields.get("cap"),
            merge=fields.get("merge"),
        )

    # ------------------------------------------------------------- whole-policy rules

    def _whole_policy_rules(self, statements, out, compress, cascade, cap_stmt) -> None:
        keeps = [(k, t) for k, t in out["keeps"] if t.kind == "selection"]
        keep_statements = [st for st in statements if isinstance(st, ast.Keep)]
        scored = [(k, t, st) for (k, t), st in zip(out["keeps"], keep_statements) if t.kind == "selection" and not _positional_only(t.ir)]
        if cascade is not None and scored:
            self.error(scored[0][2].span, "with a cascade, scored selection belongs in a tier's 'select'; keep only first/last outside it")
        if (keep_statements or cascade is not None) and compress is None:
            where = keep_statements[0].span if keep_statements else cascade.span
            self.error(where, "this policy selects tokens but never compresses; add 'compress at prefill' or 'compress every N steps'")
        if compress is not None and not keep_statements and cascade is None:
            self.error(compress.span, "compress has nothing to do: no keep rule or cascade selects tokens")
        if compress is not None and not out["triggers"] and not self.errors:
            self.error(compress.span, "compress needs at least one trigger")
        if cascade is not None and any(t.kind != "prefill" for t in out["triggers"]):
            self._repeated_tier_caps(cascade)
        cap = out["cap"]
        if cap is not None and keeps:
            self._check_cap([t for _, t in keeps], cap, cap_stmt.span, "cap", by_layer=[k.by_layer if k else None for k, _ in keeps], per=[k.per if k else "kv_head" for k, _ in keeps])

    def _repeated_tier_caps(self, cascade: ast.Cascade) -> None:
        """A later tier without a select keeps every token it takes and takes its
        source's at each of its compressions, so once the policy compresses
        while decoding it grows without bound: a cap on it cannot hold."""
        for index, tier in enumerate(cascade.tiers):
            kinds = {clause.kind: clause for clause in tier.clauses}
            if index > 0 and "cap" in kinds and "select" not in kinds:
                self.error(kinds["cap"].span, f"tier {tier.name.name} has a cap but no select: it keeps every token it takes, "
                                              "and this policy compresses while decoding, so it outgrows the cap; "
                                              "add 'select ...' to the tier (or compress only at prefill)")

    def _check_cap(self, selections: list[Typed], cap: int, span: Span, what: str, protected: int = 0, by_layer=None, per=None) -> None:
        """A keep set that can exceed its cap is an error, not a silent truncation."""
        total, parts = protected, [f"{protected} protected"] if protected else []
        for i, typed in enumerate(selections):
            if per and per[i] == "layer":
                self.error(span, f"a 'per layer' keep lets one head take the layer's whole budget, which can exceed {what} {cap}")
                return
            if typed.max_tokens is None:
                hint = "give top_p a limit (top_p(s, p, limit = N))" if _has_top_p(typed.ir) else "use top_k, or top_p with a limit"
                self.error(span, f"{what} {cap} can be exceeded: {_selection_words(typed)} has no upper bound; {hint}")
                return
            factor = layer_peak(by_layer[i]) if by_layer and by_layer[i] is not None else 1.0
            most = typed.max_tokens * factor
            total += most
            parts.append(f"{_selection_words(typed)} {fmt_number(most)}")
        if total > cap:
            self.error(span, f"the keep set can hold {fmt_number(total)} tokens per kv head ({' + '.join(parts)}), more than {what} {cap}")
        elif protected and protected >= cap:
            self.error(span, f"protected tokens ({protected}) fill {what} {cap}; nothing is left to select")
        elif selections and not protected:
            positional = sum(t.protected for t in selections)
            scored = [t for t in selections if not _positional_only(t.ir)]
            if scored and positional >= cap:
                self.error(span, f"first/last keeps ({positional} tokens) fill {what} {cap}; nothing is left for scored selection")


def _positional_only(selection) -> bool:
    return all(isinstance(leaf, (ir.First, ir.Last)) for leaf in selection_leaves(selection))


def _has_top_p(selection) -> bool:
    return any(isinstance(leaf, ir.TopP) for leaf in selection_leaves(selection))


def _whole_if_needed(value, unit: str) -> bool:
    return value is None or unit not in ("tokens", "steps", "int") or float(value).is_integer()


def _whole_words(unit: str) -> str:
    return "a whole number" if unit == "int" else f"a whole number of {unit}"


def _selection_words(typed: Typed) -> str:
    sel = typed.ir
    return {"first": "first", "last": "last", "top_k": "top_k", "top_p": "top_p", "threshold": "a threshold", "union": "a union"}[sel.kind]


def _clause_words(clause: ast.KeepClause) -> str:
    return {"per": "per", "floor": "floor", "by_layer": "by layer", "restrict": f"in {clause.word.name if clause.word else ''}"}[clause.kind]


def _keyword(st) -> str:
    return type(st).__name__.lower()


def _parse_override(raw: object) -> float | None:
    """The number an override gives (inf when it is too large for a float); None if it is not one."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        try:
            value = float(raw)
        except OverflowError:  # an int beyond any float
            return math.inf
    else:
        try:
            value = float(str(raw).strip())
        except ValueError:
            return None
    return value if value == value else None  # NaN is not a number

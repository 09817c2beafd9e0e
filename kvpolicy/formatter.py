"""AST -> canonical text (`kvpolicy fmt`).

Canonical means: two-space indent, one statement per line, single spaces
around operators and `=`, minimal parentheses, numbers as written, at most
one blank line between statements (kept where the author put one), and every
comment kept: a comment on a statement's line stays at its end, any other
comment moves with the statement after it. fmt(fmt(x)) == fmt(x).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import ast
from .ops import PRECEDENCE

INDENT = "  "
WIDTH = 88  # tiers longer than this wrap after a comma

# Binding strength, loosest first; a child binding looser than its slot needs parentheses.
_PREC = PRECEDENCE


def expr(node: ast.Expr) -> str:
    return _expr(node)


def _prec(node: ast.Expr) -> int:
    if isinstance(node, ast.Binary):
        return _PREC[node.op]
    if isinstance(node, ast.Positional):
        return _PREC["positional"]
    if isinstance(node, ast.Neg):
        return _PREC["neg"]
    return _PREC["atom"]


def _wrap(node: ast.Expr, at_least: int) -> str:
    text = _expr(node)
    return f"({text})" if _prec(node) < at_least else text


def _expr(node: ast.Expr) -> str:
    if isinstance(node, ast.Number):
        return node.text
    if isinstance(node, ast.Name):
        return node.name
    if isinstance(node, ast.Neg):
        return "-" + _wrap(node.operand, _PREC["neg"])
    if isinstance(node, ast.Positional):
        return f"{node.which} {_wrap(node.count, _PREC['+'])}"
    if isinstance(node, ast.List):
        return "[" + ", ".join(_expr(i) for i in node.items) + "]"
    if isinstance(node, ast.Call):
        args = [_expr(a) for a in node.args] + [f"{k.name} = {_expr(k.value)}" for k in node.kwargs]
        return f"{node.func}({', '.join(args)})"
    assert isinstance(node, ast.Binary)
    p = _PREC[node.op]
    if node.op == "|":
        return f"{_wrap(node.left, p)} | {_wrap(node.right, p)}"
    if p == 3:  # comparisons do not chain
        return f"{_wrap(node.left, 4)} {node.op} {_wrap(node.right, 4)}"
    return f"{_wrap(node.left, p)} {node.op} {_wrap(node.right, p + 1)}"


def _index_set(s: ast.IndexSet) -> str:
    if s.items is not None:
        return "[" + ", ".join(_expr(i) for i in s.items) + "]"
    return f"{_wrap(s.start, 4)}..{_wrap(s.stop, 4)}"


def _merge(m: ast.Merge) -> str:
    text = f"merge evicted into {m.target.name}"
    return text + (f" weighted by {_expr(m.weight)}" if m.weight is not None else "")


# ----------------------------------------------------------------- statements


@dataclass
class _Block:
    """Output lines standing for source lines start..end (comments attach here)."""

    start: int
    end: int
    depth: int
    lines: list[str]
    leading: list[str] = field(default_factory=list)
    trailing: list[str] = field(default_factory=list)
    opens_body: bool = False  # first block inside a { } body: never a blank line before
    closes_body: bool = False  # a closing brace: comments above it belong to the body


def _statement_blocks(st: ast.Statement, depth: int) -> list[_Block]:
    line, end = st.span.line, st.span.end_line
    if isinstance(st, ast.Param):
        return [_Block(line, end, depth, [f"param {st.name.name}: {st.unit.name} = {_expr(st.default)}"])]
    if isinstance(st, ast.Observe):
        return [_Block(line, end, depth, [f"observe queries last {_expr(st.window)}"])]
    if isinstance(st, ast.Score):
        return [_Block(line, end, depth, [f"score {st.name.name} = {_expr(st.expr)}"])]
    if isinstance(st, ast.State):
        decay = f" decay {_expr(st.decay)}" if st.decay is not None else ""
        return [_Block(line, end, depth, [f"state {st.name.name} += {_expr(st.update)}{decay}"])]
    if isinstance(st, ast.Keep):
        return [_Block(line, end, depth, [f"keep {st.name.name} = {_expr(st.selection)}" + "".join(" " + _keep_clause(c) for c in st.clauses)])]
    if isinstance(st, ast.Cap):
        return [_Block(line, end, depth, [f"cap {_expr(st.value)}"])]
    if isinstance(st, ast.Layout):
        return [_Block(line, end, depth, [f"layout {st.word.name}"])]
    if isinstance(st, ast.Skip):
        return [_Block(line, end, depth, [f"skip layers {_index_set(st.layers)}"])]
    if isinstance(st, ast.Merge):
        return [_Block(line, end, depth, [_merge(st)])]
    if isinstance(st, ast.Compress):
        return [_Block(line, end, depth, ["compress " + ", ".join(_trigger(t) for t in st.triggers)])]
    if isinstance(st, ast.Calibrate):
        scope = st.scope[0].name if len(st.scope) == 1 else "(" + ", ".join(s.name for s in st.scope) + ")"
        blocks = [_Block(line, line, depth, [f"calibrate {st.name.name} per {scope} {{"])]
        for i, item in enumerate(st.items):
            blocks.append(_Block(item.span.line, item.span.end_line, depth + 1, [_calib_item(item)], opens_body=i == 0))
        blocks.append(_Block(end, end, depth, ["}"], opens_body=not st.items, closes_body=True))
        return blocks
    assert isinstance(st, ast.Cascade)
    blocks = [_Block(line, line, depth, ["cascade {"])]
    for i, tier in enumerate(st.tiers):
        blocks.append(_Block(tier.span.line, tier.span.end_line, depth + 1, _tier_lines(tier, depth + 1), opens_body=i == 0))
    blocks.append(_Block(end, end, depth, ["}"], opens_body=not st.tiers, closes_body=True))
    return blocks


def _keep_clause(c: ast.KeepClause) -> str:
    if c.kind == "per":
        return f"per {c.word.name}"
    if c.kind == "floor":
        return f"floor {_wrap(c.value, 4)}"
    if c.kind == "by_layer":
        return f"by layer {_expr(c.value)}"
    return f"in {c.word.name} {_index_set(c.index_set)}"


def _trigger(t: ast.Trigger) -> str:
    guard = f"when length {t.guard_op} {_expr(t.guard)}" if t.guard is not None else ""
    if t.kind == "prefill":
        return "at prefill" + (f" {guard}" if guard else "")
    if t.kind == "when":
        return guard
    return f"every {_expr(t.every)} steps" + (f" {guard}" if guard else "")


def _calib_item(item: ast.CalibItem) -> str:
    if item.kind == "clamp":
        return f"clamp [{_expr(item.values[0])}, {_expr(item.values[1])}]"
    if item.kind == "fit":
        if item.fit == "once":
            return "fit once"
        if item.fit == "every":
            return f"fit every {_expr(item.values[0])} compressions"
        return f'fit from "{item.file}"'
    return f"{item.kind} {_expr(item.values[0])}"


def _tier_clause(c: ast.TierClause) -> str:
    if c.kind == "new":
        return "new"
    if c.kind == "from":
        return f"from {c.word.name}" + (f" every {_expr(c.value)} compressions" if c.value is not None else "")
    if c.kind == "select":
        return f"select {_expr(c.value)}" + (f" per {c.word.name}" if c.word is not None else "")
    if c.kind in ("layout", "store"):
        return f"{c.kind} {c.word.name}"
    if c.kind == "cap":
        return f"cap {_expr(c.value)}"
    return _merge(c.merge)


def _tier_lines(tier: ast.Tier, depth: int) -> list[str]:
    head = f"tier {tier.name.name}: "
    clauses = [_tier_clause(c) for c in tier.clauses]
    one_line = head + ", ".join(clauses)
    if len(INDENT * depth + one_line) <= WIDTH:
        return [one_line]
    lines, current = [], head + clauses[0]
    hang = " " * len(head)
    for clause in clauses[1:]:
        if len(INDENT * depth + current + ", " + clause) > WIDTH:
            lines.append(current + ",")
            current = hang + clause
        else:
            current += ", " + clause
    lines.append(current)
    return lines


# ----------------------------------------------------------------- the file


def format_policy(policy: ast.Policy, source_text: str) -> str:
    source_lines = source_text.split("\n")
    doc = f' "{policy.doc}"' if policy.doc is not None else ""
    blocks = [_Block(policy.span.line, policy.span.line, 0, [f"policy {policy.name.name}{doc} {{"])]
    for i, st in enumerate(policy.statements):
        new = _statement_blocks(st, 1)
        new[0].opens_body = i == 0
        blocks.extend(new)
    blocks.append(_Block(policy.span.end_line, policy.span.end_line, 0, ["}"], opens_body=not policy.statements, closes_body=True))
    footer = _attach_comments(blocks, policy.comments)
    out: list[str] = []
    for index, block in enumerate(blocks):
        first_line = min([block.start] + [c_line for c_line, _ in block.leading])
        if index > 0 and not block.opens_body and _blank_before(source_lines, first_line) and out and out[-1] != "":
            out.append("")
        pad = INDENT * block.depth
        comment_pad = INDENT * (block.depth + 1) if block.closes_body else pad
        out.extend(comment_pad + text for _, text in block.leading)
        out.extend(pad + text for text in block.trailing[1:])  # a second same-line comment goes above
        lines = [pad + text for text in block.lines]
        if block.trailing:
            lines[-1] += "  " + block.trailing[0]
        out.extend(lines)
    out.extend(footer)
    return "\n".join(out).rstrip("\n") + "\n"


def _attach_comments(blocks: list[_Block], comments) -> list[str]:
    footer: list[str] = []
    for comment in comments:
        holders = [b for b in blocks if b.start <= comment.line <= b.end]
        if holders:
            holders[-1].trailing.append(comment.text)
            continue
        after = next((b for b in blocks if b.start > comment.line), None)
        if after is None:
            footer.append(comment.text)
        else:
            after.leading.append((comment.line, comment.text))
    return footer


def _blank_before(source_lines: list[str], line: int) -> bool:
    return line >= 2 and source_lines[line - 2].strip() == ""

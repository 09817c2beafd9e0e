"""Text -> AST: the lark parser, and syntax errors a person can act on.

Input is screened before lark sees it (size, encoding, nesting depth) so that
no input can hang the parser or blow the stack; lark's exceptions are turned
into positioned diagnostics that name what was expected.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from importlib import resources

import lark
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ast
from .diagnostics import NOWHERE, Diagnostic, PolicyError, Source, Span, did_you_mean

MAX_BYTES = 64 << 10  # a policy is a screenful; 64 KiB is generous and bounds parse time (~1 s)
MAX_NESTING = 64  # brackets deeper than this are an error, not a stack overflow
# Operators chained in one expression (`1 + 1 + ... + 1`, `- - - x`, `a | b | ...`)
# nest the tree without brackets; deeper than this is an error, since the
# checker and the formatter walk expressions recursively.
MAX_EXPR_DEPTH = 100


@functools.lru_cache(maxsize=1)
def parser() -> Lark:
    grammar = resources.files("kvpolicy.grammar").joinpath("kvpolicy.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=True,
        lexer_callbacks={"COMMENT": _on_comment},
    )


def keywords() -> set[str]:
    """Reserved words of the language (every quoted word in the grammar)."""
    words = set()
    for term in parser().terminals:
        pattern = term.pattern
        if isinstance(pattern, lark.lexer.PatternStr) and pattern.value.isidentifier():
            words.add(pattern.value)
    return words


def parse(text: str | bytes, filename: str = "<string>") -> ast.Policy:
    """Parse one policy; raise PolicyError with a positioned diagnostic on bad input."""
    source, early = _screen(text, filename)
    if early:
        raise PolicyError([early], source)
    comments: list[ast.Comment] = []
    try:
        tree = _parse_collecting(source.text, comments)
    except UnexpectedInput as err:
        raise PolicyError([_syntax_diagnostic(err, source)], source) from None
    too_deep = _expression_depth_error(tree)
    if too_deep:
        raise PolicyError([too_deep], source)
    builder = _ToAst()
    try:
        policy = builder.transform(tree)
    except RecursionError:
        raise PolicyError([Diagnostic(NOWHERE, "policy is nested too deeply to check")], source) from None
    if builder.problems:
        raise PolicyError(builder.problems, source)
    return ast.Policy(policy.name, policy.doc, policy.statements, policy.span, tuple(comments))


def _parse_collecting(text: str, comments: list[ast.Comment]):
    # Comments are ignored by the grammar; the lexer hands them to us so `fmt` keeps them.
    _comment_sink.append(comments)
    try:
        return parser().parse(text)
    finally:
        _comment_sink.pop()


_comment_sink: list[list[ast.Comment]] = []


def _on_comment(token: Token) -> Token:
    if _comment_sink:
        _comment_sink[-1].append(ast.Comment(str(token).rstrip(), token.line))
    return token


# ----------------------------------------------------------------- screening


def _screen(text: str | bytes, filename: str) -> tuple[Source, Diagnostic | None]:
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            return Source("", filename), _too_large(len(text))
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            good = text[: err.start].decode("utf-8")
            line = good.count("\n") + 1
            col = len(good) - (good.rfind("\n") + 1) + 1
            source = Source(good, filename)
            return source, Diagnostic(Span.point(line, col), f"invalid UTF-8 (byte 0x{text[err.start]:02x}); a policy is UTF-8 text")
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    source = Source(text, filename)
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        return source, _too_large(len(text))
    try:  # a str may hold lone surrogates (bytes never decode to them); not text, and not JSON-serializable
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        before = text[: err.start]
        line, col = before.count("\n") + 1, err.start - (before.rfind("\n") + 1) + 1
        return source, Diagnostic(Span.point(line, col), f"invalid character U+{ord(text[err.start]):04X} (a lone surrogate); a policy is Unicode text")
    if not text.strip():
        return source, Diagnostic(NOWHERE, "empty policy; expected 'policy NAME { ... }'")
    return source, _nesting_error(text)


def _too_large(size: int) -> Diagnostic:
    # A file is read only up to MAX_BYTES + 1 bytes, so its size is not always known.
    shown = f"{size / 1e6:.1f} MB" if size > MAX_BYTES + 1 else f"over {MAX_BYTES // 1024} KiB"
    return Diagnostic(NOWHERE, f"file too large ({shown}); a policy may be at most {MAX_BYTES // 1024} KiB")


def _code_chars(text: str) -> Iterator[tuple[int, int, str]]:
    """(line, column, char), both 1-based, of every character outside strings
    and comments; string quotes, comments and newlines themselves are skipped."""
    line, col = 1, 0
    in_string = in_comment = False
    for ch in text:
        col += 1
        if ch == "\n":
            line, col, in_string, in_comment = line + 1, 0, False, False
        elif in_comment:
            continue
        elif ch == '"':
            in_string = not in_string
        elif in_string:
            continue
        elif ch == "#":
            in_comment = True
        else:
            yield line, col, ch


def _nesting_error(text: str) -> Diagnostic | None:
    depth = 0
    for line, col, ch in _code_chars(text):
        if ch in "([{":
            depth += 1
            if depth > MAX_NESTING:
                return Diagnostic(Span.point(line, col), f"brackets nested more than {MAX_NESTING} deep")
        elif ch in ")]}":
            depth = max(0, depth - 1)
    return None


# ----------------------------------------------------------------- syntax errors

_TERMINAL_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "CMP": "a comparison (> >= < <=)",
    "$END": "end of file",
    "<END-OF-FILE>": "end of file",  # what lark's contextual lexer calls $END
}


def _describe_terminal(name: str) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    try:
        pattern = parser().get_terminal(name).pattern
    except KeyError:
        return name.lower()
    return f"'{pattern.value}'" if isinstance(pattern, lark.lexer.PatternStr) else name.lower()


def _expected_words(expected) -> list[str]:
    return sorted({_describe_terminal(t) for t in expected})


def _end_span(source: Source) -> Span:
    lines = source.text.rstrip().split("\n")
    return Span.point(len(lines), len(lines[-1]) + 1)


def _unclosed_brace_line(text: str) -> int | None:
    """Line of the innermost '{' still open at the end of the text."""
    opened: list[int] = []
    for line, _, ch in _code_chars(text):
        if ch == "{":
            opened.append(line)
        elif ch == "}" and opened:
            opened.pop()
    return opened[-1] if opened else None


_EXPRESSION_RULES = {"union_", "first", "last", "compare", "add", "sub", "mul", "div", "neg", "call", "kwarg", "list"}


def _expression_depth_error(tree: lark.Tree) -> Diagnostic | None:
    """An expression nested more than MAX_EXPR_DEPTH deep, found without recursion.

    A union `a | b | c` is one flat node in the parse tree but a chain of
    binary nodes in the AST, so it counts one level per '|'."""
    height: dict[int, int] = {}
    stack: list[tuple[lark.Tree, bool]] = [(tree, False)]
    while stack:
        node, children_done = stack.pop()
        subtrees = [c for c in node.children if isinstance(c, lark.Tree)]
        if not children_done:
            stack.append((node, True))
            stack.extend((c, False) for c in subtrees)
            continue
        below = max((height[id(c)] for c in subtrees), default=0)
        height[id(node)] = below + (max(1, len(node.children) - 1) if node.data == "union_" else 1)
    # Report the outermost expression that is too deep, at its start.
    stack2: list[lark.Tree] = [tree]
    while stack2:
        node = stack2.pop()
        if node.data in _EXPRESSION_RULES and height[id(node)] > MAX_EXPR_DEPTH and not node.meta.empty:
            return Diagnostic(
                Span.point(node.meta.line, node.meta.column),
                f"expression nested too deeply ({height[id(node)]} levels; at most {MAX_EXPR_DEPTH}): split it into named params or scores",
            )
        stack2.extend(reversed([c for c in node.children if isinstance(c, lark.Tree)]))
    return None


def _syntax_diagnostic(err: UnexpectedInput, source: Source) -> Diagnostic:
    if isinstance(err, UnexpectedCharacters):
        span = Span.point(err.line, err.column)
        char = source.text[err.pos_in_stream] if err.pos_in_stream < len(source.text) else ""
        if char == '"':
            return Diagnostic(span, "unterminated string (strings end on the same line)")
        shown = repr(char) if char.isprintable() else f"U+{ord(char):04X}" if char else "end of file"
        return Diagnostic(span, f"unexpected character {shown}")
    if isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken) and err.token.type in ("$END", "<END-OF-FILE>")):
        expected = _expected_words(err.expected)
        if "'}'" in expected:
            opened = _unclosed_brace_line(source.text)
            where = f" (the one opened on line {opened})" if opened is not None else ""
            return Diagnostic(_end_span(source), f"unexpected end of file: a '{{' block is not closed{where}; expected '}}'")
        return Diagnostic(_end_span(source), f"unexpected end of file; expected {_or_list(expected)}")
    assert isinstance(err, UnexpectedToken)
    token = err.token
    span = Span(token.line, token.column, token.end_line or token.line, token.end_column or token.column + 1)
    expected_terms = set(err.expected)
    words = _expected_words(expected_terms)
    expected_keywords = [w.strip("'") for w in words if w.startswith("'") and w.strip("'").isidentifier()]
    if token.type == "NAME" and expected_keywords and "NAME" not in expected_terms:
        if "keep" in expected_keywords:
            return Diagnostic(span, f"unknown statement '{token}'{did_you_mean(str(token), expected_keywords)}")
        return Diagnostic(span, f"unexpected '{token}'; expected {_or_list(words)}{did_you_mean(str(token), expected_keywords)}")
    if str(token) in keywords() and "NAME" in expected_terms:
        return Diagnostic(span, f"'{token}' is a reserved word and cannot be used as a name")
    word = _argument_name_before(source.text, token.start_pos) if str(token) == "=" and token.start_pos is not None else None
    if word is not None and word[0] in keywords():
        # `linear(first = 1, ...)`: a keyword cannot name an argument.
        name, line, col = word
        return Diagnostic(Span.point(line, col, len(name)), f"'{name}' is a reserved word and cannot be used as an argument name; pass the argument by position")
    return Diagnostic(span, f"unexpected {_show_token(token)}; expected {_or_list(words)}")


def _argument_name_before(text: str, pos: int) -> tuple[str, int, int] | None:
    """(word, line, col) of the identifier written as a keyword argument's
    name just before `pos` (`f(WORD =` or `, WORD =`), else None."""
    end = pos
    while end > 0 and text[end - 1] in " \t":
        end -= 1
    start = end
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
        start -= 1
    if start == end:
        return None
    before = start
    while before > 0 and text[before - 1] in " \t\r\n":
        before -= 1
    if before == 0 or text[before - 1] not in "(,":  # only an argument list: f(WORD = ...)
        return None
    line_start = text.rfind("\n", 0, start) + 1
    return (text[start:end], text.count("\n", 0, start) + 1, start - line_start + 1)


def _show_token(token: Token) -> str:
    return "end of file" if token.type in ("$END", "<END-OF-FILE>") else f"'{token}'"


def _or_list(words: list[str]) -> str:
    if len(words) > 8:
        words = words[:8] + ["..."]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


# ----------------------------------------------------------------- tree -> AST


def _span(meta) -> Span:
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(token: Token) -> Span:
    return Span(token.line, token.column, token.end_line, token.end_column)


def _ident(token: Token) -> ast.Ident:
    return ast.Ident(str(token), _tok_span(token))


@v_args(meta=True)
class _ToAst(Transformer):
    """Builds ast nodes bottom-up; one method per grammar rule or alias.
    Problems the grammar cannot express are collected in `problems`."""

    def __init__(self):
        super().__init__()
        self.problems: list[Diagnostic] = []

    def start(self, meta, children):
        return children[0]

    def policy(self, meta, children):
        name, doc, *statements = children
        return ast.Policy(_ident(name), str(doc)[1:-1] if doc is not None else None, tuple(statements), _span(meta))

    # statements
    def param(self, meta, c):
        return ast.Param(_ident(c[0]), _ident(c[1]), c[2], _span(meta))

    def observe(self, meta, c):
        return ast.Observe(c[0], _span(meta))

    def score(self, meta, c):
        return ast.Score(_ident(c[0]), c[1], _span(meta))

    def state(self, meta, c):
        return ast.State(_ident(c[0]), c[1], c[2], _span(meta))

    def calibrate(self, meta, c):
        name, scope, *items = c
        return ast.Calibrate(_ident(name), scope, tuple(items), _span(meta))

    def scope(self, meta, c):
        return tuple(_ident(t) for t in c)

    def _calib(kind):  # noqa: N805 - a factory for the six calibrate lines
        def build(self, meta, c):
            return ast.CalibItem(kind, tuple(c), None, None, _span(meta))

        return build

    calib_target = _calib("target")
    calib_metric = _calib("metric")
    calib_solve = _calib("solve")
    calib_init = _calib("init")
    calib_clamp = _calib("clamp")

    def calib_fit(self, meta, c):
        kind, value, file = c[0]
        return ast.CalibItem("fit", (value,) if value is not None else (), kind, file, _span(meta))

    def fit_once(self, meta, c):
        return ("once", None, None)

    def fit_every(self, meta, c):
        return ("every", c[0], None)

    def fit_file(self, meta, c):
        return ("from", None, str(c[0])[1:-1])

    def keep(self, meta, c):
        name, selection, *clauses = c
        return ast.Keep(_ident(name), selection, tuple(clauses), _span(meta))

    def per(self, meta, c):
        return ast.KeepClause("per", _ident(c[0]), None, None, _span(meta))

    def floor(self, meta, c):
        return ast.KeepClause("floor", None, c[0], None, _span(meta))

    def by_layer(self, meta, c):
        return ast.KeepClause("by_layer", None, c[0], None, _span(meta))

    def restrict(self, meta, c):
        return ast.KeepClause("restrict", _ident(c[0]), None, c[1], _span(meta))

    def index_range(self, meta, c):
        return ast.IndexSet(c[0], c[1], None, _span(meta))

    def index_list(self, meta, c):
        return ast.IndexSet(None, None, c[0].items, _span(meta))

    def cap(self, meta, c):
        return ast.Cap(c[0], _span(meta))

    def skip(self, meta, c):
        return ast.Skip(c[0], _span(meta))

    def layout(self, meta, c):
        return ast.Layout(_ident(c[0]), _span(meta))

    def merge(self, meta, c):
        return ast.Merge(_ident(c[0]), c[1], _span(meta))

    def compress(self, meta, c):
        return ast.Compress(tuple(c), _span(meta))

    def at_prefill(self, meta, c):
        op, guard = c[0] if c[0] is not None else (None, None)
        return ast.Trigger("prefill", None, op, guard, _span(meta))

    def every_steps(self, meta, c):
        op, guard = c[1] if c[1] is not None else (None, None)
        return ast.Trigger("every", c[0], op, guard, _span(meta))

    def when_only(self, meta, c):
        op, guard = c[0]
        return ast.Trigger("when", None, op, guard, _span(meta))

    def guard(self, meta, c):
        return (str(c[0]), c[1])

    def cascade(self, meta, c):
        return ast.Cascade(tuple(c), _span(meta))

    def tier(self, meta, c):
        name, *clauses = c
        return ast.Tier(_ident(name), tuple(clauses), _span(meta))

    def tier_new(self, meta, c):
        return ast.TierClause("new", None, None, None, _span(meta))

    def tier_from(self, meta, c):
        return ast.TierClause("from", _ident(c[0]), c[1], None, _span(meta))

    def tier_select(self, meta, c):
        return ast.TierClause("select", _ident(c[1]) if c[1] is not None else None, c[0], None, _span(meta))

    def tier_layout(self, meta, c):
        return ast.TierClause("layout", _ident(c[0]), None, None, _span(meta))

    def tier_store(self, meta, c):
        return ast.TierClause("store", _ident(c[0]), None, None, _span(meta))

    def tier_cap(self, meta, c):
        return ast.TierClause("cap", None, c[0], None, _span(meta))

    def tier_merge(self, meta, c):
        return ast.TierClause("merge", None, None, c[0], _span(meta))

    # expressions
    def number(self, meta, c):
        return ast.Number(str(c[0]), _tok_span(c[0]))

    def name(self, meta, c):
        return ast.Name(str(c[0]), _tok_span(c[0]))

    def _binary(op):  # noqa: N805
        def build(self, meta, c):
            return ast.Binary(op, c[0], c[1], _span(meta))

        return build

    add, sub, mul, div = _binary("+"), _binary("-"), _binary("*"), _binary("/")

    def union_(self, meta, c):
        result = c[0]
        for right in c[1:]:
            result = ast.Binary("|", result, right, Span(result.span.line, result.span.col, right.span.end_line, right.span.end_col))
        return result

    def compare(self, meta, c):
        return ast.Binary(str(c[1]), c[0], c[2], _span(meta))

    def neg(self, meta, c):
        return ast.Neg(c[0], _span(meta))

    def first(self, meta, c):
        return ast.Positional("first", c[0], _span(meta))

    def last(self, meta, c):
        return ast.Positional("last", c[0], _span(meta))

    def call(self, meta, c):
        name, *args = c
        args = [a for a in args if a is not None]  # `f()` yields one placeholder
        seen_keyword = False
        for arg in args:
            if isinstance(arg, ast.KwArg):
                seen_keyword = True
            elif seen_keyword:
                self.problems.append(Diagnostic(arg.span, "a positional argument cannot follow a keyword argument"))
                break
        positional = tuple(a for a in args if not isinstance(a, ast.KwArg))
        keywords_ = tuple(a for a in args if isinstance(a, ast.KwArg))
        return ast.Call(str(name), positional, keywords_, _span(meta), _tok_span(name))

    def kwarg(self, meta, c):
        return ast.KwArg(str(c[0]), c[1], _tok_span(c[0]))

    def list(self, meta, c):
        return ast.List(tuple(x for x in c if x is not None), _span(meta))

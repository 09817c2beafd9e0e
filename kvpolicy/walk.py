"""The one generic walk over a tree of nodes: IR (frozen pydantic models) or
AST (frozen dataclasses). Everything that looks through expressions or
selections (which signals a policy reads, which calibrations a score
depends on, where a call is written) goes through `children`/`walk`."""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

from pydantic import BaseModel


def _fields(node) -> Iterator[object]:
    if isinstance(node, BaseModel):
        return (getattr(node, name) for name in type(node).model_fields)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return (getattr(node, f.name) for f in dataclasses.fields(node))
    return iter(())


def _is_node(value) -> bool:
    return isinstance(value, BaseModel) or (dataclasses.is_dataclass(value) and not isinstance(value, type))


def children(node) -> Iterator[object]:
    """The direct sub-nodes of a node, in field order (tuples and dict values flattened)."""
    for value in _fields(node):
        if isinstance(value, dict):
            value = tuple(value.values())
        if isinstance(value, (tuple, list)):
            yield from (item for item in value if _is_node(item))
        elif _is_node(value):
            yield value


def walk(node, scores: dict | None = None, stop: Callable[[object], bool] | None = None) -> Iterator[object]:
    """Every node under `node`, itself first (pre-order). With `scores` (a
    policy's named scores), a reference to a named score is followed into its
    expression, each name once. `stop(n)` true: n is yielded but not entered."""
    from . import ir

    seen: set[str] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        if stop is not None and stop(current):
            continue
        if scores is not None and isinstance(current, ir.Ref) and current.kind == "score" and current.name not in seen:
            seen.add(current.name)
            stack.append(scores[current.name])
        stack.extend(reversed(list(children(current))))


def transform(node, fn: Callable[[object], object]):
    """Rebuild an IR tree bottom-up: each node's children are transformed
    first, then `fn(node)` may return a replacement (or the node itself)."""
    if not isinstance(node, BaseModel):
        return node
    updates = {}
    for name in type(node).model_fields:
        value = getattr(node, name)
        if isinstance(value, BaseModel):
            new = transform(value, fn)
        elif isinstance(value, tuple):
            new = tuple(transform(item, fn) for item in value)
        elif isinstance(value, dict):
            new = {key: transform(item, fn) for key, item in value.items()}
        else:
            continue
        if new is not value and new != value:
            updates[name] = new
    return fn(node.model_copy(update=updates) if updates else node)

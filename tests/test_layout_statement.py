"""The policy-level `layout` statement: checked, formatted, in the IR, explained."""
import pytest

import kvpolicy
from kvpolicy import explain, formatter, syntax
from kvpolicy.ir import Policy
from kvpolicy.program import storage_layout
from kvpolicy.policy import compile_text

BASE = 'policy p {{\n  observe queries last 8\n  score s = attn()\n  keep recent = last 8\n  keep selected = top_k(s, 24) per layer floor 0.2\n{extra}  compress at prefill\n}}\n'


def source(extra: str = "") -> str:
    return BASE.format(extra=extra)


def errors_of(text: str) -> list[str]:
    with pytest.raises(kvpolicy.PolicyError) as info:
        compile_text(text, "p.kvp")
    return [d.message for d in info.value.diagnostics]


def test_default_is_flatten_max_and_flatten_sum_is_kept():
    assert compile_text(source()).layout == "flatten_max"
    policy = compile_text(source("  layout flatten_sum\n"))
    assert policy.layout == "flatten_sum"
    assert storage_layout(policy) == "flatten_sum"
    assert Policy.model_validate_json(policy.model_dump_json()) == policy
    assert policy.content_hash != compile_text(source()).content_hash  # the layout is behaviour


def test_bad_layouts_are_positioned_errors():
    messages = errors_of(source("  layout flaten_sum\n"))
    assert messages == ["unknown layout 'flaten_sum'; did you mean 'flatten_sum'?; expected flatten_max, flatten_sum"]
    (message,) = errors_of(source("  layout mask\n"))
    assert message.startswith("layout 'mask' is for cascade tiers")
    (message,) = errors_of(source("  layout flatten_sum\n  layout flatten_max\n"))
    assert message == "a policy has at most one 'layout' statement (the first is on line 6)"


def test_cascade_takes_its_layout_from_its_tiers():
    text = kvpolicy.policy.read_source("hardkv")[0]
    messages = errors_of(text.replace("  compress", "  layout flatten_sum\n  compress"))
    assert any(m.startswith("with a cascade, each tier gives its own layout") for m in messages)
    tiers = {layout: storage_layout(compile_text(text.replace("layout flatten_sum,", f"layout {layout},").replace("layout flatten_max,", f"layout {layout},"))) for layout in ("flatten_max", "flatten_sum")}
    assert tiers == {"flatten_max": "flatten_max", "flatten_sum": "flatten_sum"}


def test_format_and_explain():
    text = source("  layout    flatten_sum   # segments\n")
    formatted = formatter.format_policy(syntax.parse(text), text)
    assert "  layout flatten_sum  # segments\n" in formatted
    assert formatter.format_policy(syntax.parse(formatted), formatted) == formatted
    assert "flatten_sum" in explain.explain(compile_text(text))
    assert "flatten_sum" not in explain.explain(compile_text(source()))

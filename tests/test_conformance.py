"""Conformance: every operation of the table on every registered backend,
against a direct formula written here (float64, loops where clearer).

Rows: (operation, backend). Backends come from the registry, so a backend
that registers (triton) gets its rows without editing this file. Expression
operations are checked node by node through `Backend.evaluate`; selections
through the engine object's compress_layer. The policy-formula tests stay
the end-to-end oracle.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvpolicy
from kvpolicy.backends import BACKENDS, compile
from kvpolicy.backends.torch import LayerInputs
from kvpolicy.model_shape import ModelShape
from kvpolicy.ops import OPS
from kvpolicy.program import Calibrate, lower

HQ, HKV, T, D, Q = 4, 2, 12, 8, 3
SHAPE = ModelShape(num_layers=1, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, name="tiny")


def make_inputs(seed: int = 0) -> LayerInputs:
    g = torch.Generator().manual_seed(seed)
    return LayerInputs(
        keys=torch.randn(HKV, T, D, generator=g),
        values=torch.randn(HKV, T, D, generator=g),
        valid=torch.ones(HKV, T, dtype=torch.bool),
        key_pos=torch.arange(T).expand(HKV, T).clone(),
        queries=torch.randn(HQ, Q, D, generator=g),
        query_pos=torch.arange(T - Q, T),
        states={"acc": torch.rand(HKV, T, generator=g)},
    )


# ---------------------------------------------------------------- direct formulas, [Hkv, Q|1, T]


def logits(x):  # [Hq, Q, T], causal
    k = x.keys.double().repeat_interleave(HQ // HKV, dim=0)
    out = x.queries.double() @ k.transpose(1, 2) / math.sqrt(D)
    causal = x.key_pos[0][None, :] <= x.query_pos[:, None]
    return out.masked_fill(~causal[None], float("-inf"))


def group(t, how):
    g = t.reshape(HKV, HQ // HKV, *t.shape[1:])
    return {"mean": g.mean(1), "max": g.amax(1), "sum": g.sum(1)}[how]


def key_norm(x):
    return x.keys.double().norm(dim=-1)[:, None, :]


def value_norm(x):
    return x.values.double().norm(dim=-1)[:, None, :]


def key_sim(x):
    unit = x.keys.double() / x.keys.double().norm(dim=-1, keepdim=True)
    anchor = unit.mean(dim=1, keepdim=True)
    anchor = anchor / anchor.norm(dim=-1, keepdim=True)
    return (unit * anchor).sum(-1)[:, None, :]


def redundancy(x, threshold=0.5):
    out = torch.empty(HKV, 1, T, dtype=torch.float64)
    for h in range(HKV):
        unit = x.keys[h].double() / x.keys[h].double().norm(dim=-1, keepdim=True)
        sim = unit @ unit.T
        sim.fill_diagonal_(0.0)
        sim = torch.where(sim >= threshold, sim, torch.zeros_like(sim))
        later = torch.arange(T)[None, :] > torch.arange(T)[:, None]
        duplicate = ((sim > 0) & later).any(dim=-1)
        out[h, 0] = torch.softmax(torch.where(duplicate, sim.sum(-1) / T, torch.zeros(T, dtype=torch.float64)), -1)
    return out


def pool(t, op, kernel):  # along the last axis, every entry held
    pad = kernel // 2
    out = torch.empty_like(t)
    for i in range(t.shape[-1]):
        window = t[..., max(0, i - pad): i + pad + 1]
        out[..., i] = window.amax(-1) if op == "max" else window.sum(-1) / kernel
    return out


def normalize(t):
    shifted = t - t.amin(-1, keepdim=True)
    return shifted / shifted.sum(-1, keepdim=True)


def top_p_count(t, p):
    probs = t / t.sum(-1, keepdim=True)
    ordered = probs.sort(-1, descending=True).values.cumsum(-1)
    return (ordered < p - 1e-6).sum(-1) + 1


TEMPERATURE = torch.tensor([0.7, 1.3])

# op -> (score expression, direct formula). The policy around it observes the
# last Q queries and declares `state acc` and `calibrate T`.
EXPRESSIONS = {
    "attn": ("attn(group = mean)", lambda x: group(torch.softmax(logits(x), -1), "mean")),
    "attn_logits": ("attn_logits(group = max)", lambda x: group(logits(x), "max")),
    "key_norm": ("key_norm()", key_norm),
    "value_norm": ("value_norm()", value_norm),
    "key_sim": ("key_sim()", key_sim),
    "redundancy": ("redundancy(threshold = 0.5)", redundancy),
    "softmax": ("softmax(key_norm())", lambda x: torch.softmax(key_norm(x), -1)),
    "normalize": ("normalize(key_sim())", lambda x: normalize(key_sim(x))),
    "log": ("log(key_norm())", lambda x: key_norm(x).log()),
    "exp": ("exp(key_sim())", lambda x: key_sim(x).exp()),
    "pool": ("pool(max, 3, key_norm()) + pool(mean, 5, value_norm())", lambda x: pool(key_norm(x), "max", 3) + pool(value_norm(x), "mean", 5)),
    "head_mean": ("head_mean(key_norm())", lambda x: key_norm(x).mean(0, keepdim=True).expand(HKV, 1, T)),
    "const": ("key_norm() + 2", lambda x: key_norm(x) + 2),
    "add": ("key_norm() + value_norm()", lambda x: key_norm(x) + value_norm(x)),
    "sub": ("key_norm() - value_norm()", lambda x: key_norm(x) - value_norm(x)),
    "mul": ("key_norm() * value_norm()", lambda x: key_norm(x) * value_norm(x)),
    "div": ("key_norm() / value_norm()", lambda x: key_norm(x) / value_norm(x)),
    "neg": ("-key_norm()", lambda x: -key_norm(x)),
    "state": ("acc", lambda x: x.states["acc"].double()[:, None, :]),
    "calibration": ("softmax(attn_logits(group = max) / T)", lambda x: torch.softmax(group(logits(x), "max") / TEMPERATURE.double()[:, None, None], -1)),
    "top_p_count": (None, lambda x: top_p_count(torch.softmax(group(logits(x), "max"), -1), 0.8)),
}


def policy_with(score: str):
    return kvpolicy.compile_text(f"""policy conformance {{
      observe queries last {Q}
      state acc += attn(group = sum)
      score z = attn_logits(group = max)
      calibrate T per (layer, kv_head) {{
        target top_p_count(softmax(z), 0.8)
        metric softmax(z / T)
        solve bisect(steps = 5, tol = 0.01)
        init 0.5
        clamp [0.001, 10]
        fit once
      }}
      score s = {score}
      keep top = top_k(s, 4)
      compress at prefill
    }}""")


def expression_rows():
    for backend in BACKENDS.values():
        for op in EXPRESSIONS:
            marks = () if op in backend.ops and backend.evaluate else (pytest.mark.skip(reason=f"{backend.name} lacks {op}"),)
            yield pytest.param(op, backend.name, id=f"{op}-{backend.name}", marks=marks)


@pytest.mark.parametrize("op, backend", list(expression_rows()))
def test_expression(op, backend):
    text, formula = EXPRESSIONS[op]
    program = lower(policy_with(text or "key_norm()"), SHAPE)
    node = program.scores["s"] if text else program.of(Calibrate)[0].target
    assert op in {program.nodes[i].op for i in range(node + 1)}, "the row exercises its operation"
    x = make_inputs()
    got = BACKENDS[backend].evaluate(program, x, node, {"T": TEMPERATURE})
    torch.testing.assert_close(got.double(), formula(x).double().expand_as(got.double()), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- pooling skips holes


def pool_held(t, valid, op, kernel):
    """Each head's held tokens pooled as if its holes were not there: its held
    slots, in slot order, pooled as one row (`pool` above) and put back in
    their slots; holes stay invalid (-inf for max, 0 for mean)."""
    out = torch.full_like(t, float("-inf") if op == "max" else 0.0)
    for h in range(t.shape[0]):
        slots = valid[h].nonzero()[:, 0]
        out[h, :, slots] = pool(t[h][:, slots], op, kernel)
    return out


POOLS = {
    "max": ("pool(max, 3, key_norm())", lambda x: pool_held(key_norm(x), x.valid, "max", 3)),
    "mean": ("pool(mean, 5, value_norm())", lambda x: pool_held(value_norm(x), x.valid, "mean", 5)),
}


def pool_rows():
    for backend in BACKENDS.values():
        for op in POOLS:
            marks = () if "pool" in backend.ops and backend.evaluate else (pytest.mark.skip(reason=f"{backend.name} lacks pool"),)
            yield pytest.param(op, backend.name, id=f"pool-{op}-holes-{backend.name}", marks=marks)


@pytest.mark.parametrize("op, backend", list(pool_rows()))
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(held=st.lists(st.booleans(), min_size=HKV * T, max_size=HKV * T))
def test_pool_skips_holes(op, backend, held):
    """A head with holes pools exactly like the same head with its holes
    removed: a layout (where a head's tokens sit in the slots) must not change
    a pooled score, or a re-selecting tier keeps different tokens."""
    text, formula = POOLS[op]
    program = lower(policy_with(text), SHAPE)
    x = make_inputs()
    x.valid = torch.tensor(held).reshape(HKV, T)
    got = BACKENDS[backend].evaluate(program, x, program.scores["s"], {"T": TEMPERATURE})
    torch.testing.assert_close(got.double(), formula(x).expand_as(got.double()), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- selections, [Hkv, T] kept masks


def ranked(scores):  # [Hkv, T] -> slots best first
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def mask_of(slots_per_head):
    out = torch.zeros(HKV, T, dtype=torch.bool)
    for h, slots in enumerate(slots_per_head):
        out[h, list(slots)] = True
    return out


def keep_top_k(x, k):
    return mask_of(ranked(key_norm(x)[:, 0])[h, :k].tolist() for h in range(HKV))


def keep_top_p(x, p):
    norms = key_norm(x)[:, 0]
    mass = norms / norms.sum(-1, keepdim=True)
    out = []
    for h in range(HKV):
        total, kept = 0.0, []
        for slot in ranked(norms)[h].tolist():
            if total >= p - 1e-6:
                break
            kept.append(slot)
            total += float(mass[h, slot])
        out.append(kept)
    return mask_of(out)


def keep_threshold(x, tau):
    return key_norm(x)[:, 0] > tau


SELECTIONS = {
    "top_k": ("top_k(key_norm(), 5)", lambda x: keep_top_k(x, 5)),
    "top_p": ("top_p(key_norm(), 0.6)", lambda x: keep_top_p(x, 0.6)),
    "threshold": ("key_norm() > 2.8", lambda x: keep_threshold(x, 2.8)),
    "first": ("first 3", lambda x: mask_of([range(3)] * HKV)),
    "last": ("last 4", lambda x: mask_of([range(T - 4, T)] * HKV)),
    "union": ("first 2 | top_k(key_norm(), 3)", lambda x: mask_of([range(2)] * HKV) | keep_top_k_after(x, 2, 3)),
}


def keep_top_k_after(x, protected, k):
    """top_k among the tokens that `first protected` did not already keep."""
    norms = key_norm(x)[:, 0].clone()
    norms[:, :protected] = float("-inf")
    return mask_of(ranked(norms)[h, :k].tolist() for h in range(HKV))


def selection_rows():
    for backend in BACKENDS.values():
        for op in SELECTIONS:
            marks = () if op in backend.ops else (pytest.mark.skip(reason=f"{backend.name} lacks {op}"),)
            yield pytest.param(op, backend.name, id=f"{op}-{backend.name}", marks=marks)


@pytest.mark.parametrize("op, backend", list(selection_rows()))
def test_selection(op, backend):
    text, formula = SELECTIONS[op]
    pol = kvpolicy.compile_text(f"policy sel {{\n  keep k = {text}\n  compress at prefill\n}}")
    engine = compile(pol, SHAPE, backend=backend)
    assert op in engine.program.ops()
    x = make_inputs()
    run = engine.new_sequence()
    decision = engine.compress_layer(run, 0, x)
    assert torch.equal(decision.kept, formula(x))


def test_every_operation_has_a_row():
    """Adding an operation to the table means adding its conformance row."""
    covered = set(EXPRESSIONS) | set(SELECTIONS)
    expected = {name for name, op in OPS.items() if op.role not in ("layer_shape", "solver")}
    assert expected == covered

"""`kvpolicy eval`: tasks, metrics, memory sizing, bad input, and runs on SmolLM2."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import kvpolicy
from kvpolicy import cli
from kvpolicy.evaluate import memory as mem
from kvpolicy.evaluate import metrics, runner, tasks
from kvpolicy.evaluate.results import Store


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's tokenizer only (no weights): from the converted model directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(kvpolicy.models.path("smollm2-135m"), local_files_only=True)


# ----------------------------------------------------------------- tasks


@pytest.mark.parametrize("task", tasks.ANSWER_TASKS)
@pytest.mark.parametrize("context", [600, 2048])
def test_answer_is_in_the_prompt_at_the_stated_depth(tok, task, context):
    for index in range(5):
        s = tasks.make(task, tok, context, seed=7, index=index)
        assert len(s.prompt_ids) == context  # measured in the model's tokens, exactly
        d0, d1 = s.document
        n0, n1 = s.needle
        assert d0 <= n0 < n1 <= d1
        # The stated depth points at the needle's first token.
        assert n0 == d0 + round(s.depth * (d1 - d0))
        # ...and is near the requested one: needles snap to a line start and
        # the other needles inserted before it push it a little.
        others = sum(len(tok.encode(line)) for line in s.details.get("chain", [])) + 20 * len(s.details.get("keys", []))
        assert abs(s.depth - s.requested_depth) <= (tasks.SNAP_TOKENS + others + 8) / (d1 - d0)
        assert s.requested_depth == tasks.depth_for(index)
        needle_text = tok.decode(list(s.prompt_ids[n0:n1]))
        assert s.answer in needle_text
        before = tok.decode(list(s.prompt_ids[d0:n0]))
        assert n0 == d0 or "\n" in before and not before.rsplit("\n", 1)[1].strip()  # at a line start
        # The answer tokens are the answer, and the prompt ends with the question's answer prefix.
        assert tok.decode(list(s.answer_ids)).strip() == s.answer
        prompt = tok.decode(list(s.prompt_ids))
        assert s.question in prompt and prompt.rstrip().endswith(tok.decode(list(s.prompt_ids[-3:])).rstrip())
        assert "<|im_start|>assistant" in prompt


def test_needle_tasks_hold_the_value_once_and_distractors_elsewhere(tok):
    s = tasks.make("multikey", tok, 1024, seed=1, index=2)
    prompt = tok.decode(list(s.prompt_ids))
    keys, values = s.details["keys"], s.details["values"]
    assert len(set(keys)) == 4 and s.answer == values[0]
    for key, value in zip(keys, values):
        assert prompt.count(f"The special magic number for {key} is: {value}.") == 1
    assert f"magic number for {keys[0]}" in s.question
    v = tasks.make("vartrack", tok, 1024, seed=1, index=0)
    chain = v.details["chain"]
    assert chain[0].endswith(f"= {v.answer}.") and chain[-1].split()[1] in v.question
    assert all(line in tok.decode(list(v.prompt_ids)) for line in chain)


def test_qa_answer_is_a_span_of_the_document(tok):
    for index in range(4):
        s = tasks.make("qa", tok, 1500, seed=3, index=index)
        document = tok.decode(list(s.prompt_ids[s.document[0] : s.document[1]]))
        quote = s.details["quote"]
        assert document.count(quote) == 1
        after = document[document.index(quote) + len(quote) :]
        assert " ".join(after.split()[:3]).startswith(s.answer)


def test_text_task_continues_the_prompt(tok):
    s = tasks.make("text", tok, 777, seed=0, index=1, text_tokens=20)
    assert len(s.prompt_ids) == 777 and len(s.answer_ids) == 20 and s.answer is None
    c = tasks.corpus(tok)
    start = s.details["corpus_token"]
    assert list(s.prompt_ids) + list(s.answer_ids) == c.ids[start : start + 797]


@pytest.mark.parametrize("task", tasks.TASKS)
def test_generation_is_deterministic_by_seed(tok, task):
    a = tasks.make(task, tok, 700, seed=11, index=3)
    b = tasks.make(task, tok, 700, seed=11, index=3)
    c = tasks.make(task, tok, 700, seed=12, index=3)
    assert a == b and a.fingerprint == b.fingerprint
    assert a.prompt_ids != c.prompt_ids
    if task != "text":
        assert a.answer != c.answer
    assert tasks.make(task, tok, 700, seed=11, index=4).prompt_ids != a.prompt_ids


def test_lengths_at_long_contexts(tok):
    for task in ("passkey", "multikey", "text"):
        assert len(tasks.make(task, tok, 8168, seed=0, index=2).prompt_ids) == 8168


def test_depth_sequence_covers_the_document():
    assert [tasks.depth_for(i) for i in range(9)] == [0.5, 0.0, 1.0, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875]


# ----------------------------------------------------------------- metrics


def logs(*rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def test_kl_on_known_values():
    ref = logs([0.5, 0.5], [1.0, 0.0], [0.2, 0.8])
    out = logs([0.25, 0.75], [0.5, 0.5], [0.2, 0.8])
    kl = metrics.kl_per_position(ref, out)
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3); a zero-probability
    # reference token contributes nothing: 1 * ln(1/0.5) = ln 2; equal: 0.
    assert kl.tolist() == pytest.approx([0.5 * math.log(4 / 3), math.log(2), 0.0], abs=1e-12)
    assert metrics.mean_kl(ref, out) == pytest.approx((0.5 * math.log(4 / 3) + math.log(2)) / 3, abs=1e-12)
    assert metrics.mean_kl(ref, ref) == 0.0


def test_top1_perplexity_and_answer_logprob_on_known_values():
    ref = logs([0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8])
    out = logs([0.6, 0.3, 0.1], [0.1, 0.3, 0.6], [0.3, 0.2, 0.5])
    assert metrics.top1_agreement(ref, out) == pytest.approx(2 / 3)
    lp = logs([0.5, 0.25, 0.25], [0.125, 0.125, 0.75])
    # log P = ln 0.5 + ln 0.125 = -4 ln 2; perplexity = exp(4 ln 2 / 2) = 4
    assert metrics.sequence_logprob(lp, [0, 1]) == pytest.approx(-4 * math.log(2))
    assert metrics.perplexity(lp, [0, 1]) == pytest.approx(4.0)
    assert metrics.greedy_follows(lp, [0, 2]) and not metrics.greedy_follows(lp, [0, 1])


def test_accuracy_is_containment():
    assert metrics.contains_answer(" 48213.\n", "48213")
    assert not metrics.contains_answer("148213", "48213") and not metrics.contains_answer("482135", "48213")
    assert metrics.contains_answer(' Thus  Published\non the MMC site."', "thus published on")
    assert not metrics.contains_answer("", "48213")


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError):
        metrics.kl_per_position(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError):
        metrics.perplexity(torch.zeros(2, 3), [0])


# ----------------------------------------------------------------- memory


def test_policies_are_classified_by_what_sizes_them():
    kinds = {name: mem.classify(kvpolicy.load(name)) for name in kvpolicy.library.shipped_names()}
    assert kinds["full"] == "reference" and kinds["kivi"] == "unsized"
    for name in ("snapkv", "streaming_llm", "h2o", "pyramidkv", "tova", "knorm", "keydiff", "sliding_window", "rkv", "cam"):
        assert kinds[name] == "fixed", name
    for name in ("adakv", "topp", "hardkv", "hardkv_rkv"):  # a layer's fullest head depends on the input
        assert kinds[name] == "search", name
    assert mem.knob(kvpolicy.load("topp")) == "p" and mem.knob(kvpolicy.load("hardkv")) == "budget"


def test_fixed_policies_get_fraction_times_context():
    setting, policy = mem.plan_fixed("snapkv", kvpolicy.load("snapkv"), 0.25, 2048)
    assert setting.params == {"budget": 512} and policy.params()["budget"] == 512
    assert setting.how.startswith("budget=512 (= 0.25 x 2048 tokens)")
    setting, policy = mem.plan_fixed("h2o", kvpolicy.load("h2o"), 0.1, 1000)
    assert policy.params()["budget"] == 100 and policy.params()["recent"] == 50
    # A window that fills the budget is halved, and the report says so.
    setting, policy = mem.plan_fixed("snapkv", kvpolicy.load("snapkv"), 0.1, 512)
    assert setting.params == {"budget": 51, "window": 25} and "window=25" in setting.how
    setting, _ = mem.plan_fixed("full", kvpolicy.load("full"), 0.25, 2048)
    assert setting.method == "reference" and setting.memory == 1.0


def test_search_finds_a_budget_within_tolerance():
    calls = []

    def measure(budget):  # bytes grow with the budget, 1.4x faster than a fixed policy's
        calls.append(budget)
        return min(1.0, 1.4 * budget / 2048)

    x, held, probes = mem.search(measure, 0.25, 512, 1, 2048, integer=True)
    assert abs(held - 0.25) <= mem.tolerance(0.25) and held == measure(x)
    assert len(probes) == len(calls) - 1 <= 3 and x == pytest.approx(2048 * 0.25 / 1.4, abs=2)


def test_search_moves_p_in_log_space_and_reports_unreachable_targets():
    def measure(p):  # top-p: the held share rises steeply as p nears 1
        return min(1.0, 0.02 / (1 - p) ** 0.5 / 10)

    x, held, probes = mem.search(measure, 0.1, 0.9, *mem.P_RANGE, integer=False)
    assert abs(held - 0.1) <= mem.tolerance(0.1) and 0.9 < x < 1
    assert len(probes) <= mem.MAX_PROBES
    x, held, probes = mem.search(lambda b: min(0.1, b / 1000), 0.5, 300, 1, 1000, integer=True)
    assert held == 0.1 and len(probes) < mem.MAX_PROBES  # capped: the closest reachable, without wasting probes


def test_search_probes_the_end_of_a_plateau_before_giving_up():
    """hardkv_decode's peak while decoding: flat in p while the prompt's first
    interval sets it (every top-p set is smaller), rising once the sets
    outgrow it. Two equal probes must not end the search there."""
    def measure(p):
        u = -math.log(1 - p)
        return 0.2 if u < 4.6 else 0.2 + 0.6 * (u - 4.6) / (13.8 - 4.6)

    x, held, probes = mem.search(measure, 0.25, 0.9, *mem.P_RANGE, integer=False)
    assert abs(held - 0.25) <= mem.tolerance(0.25) and -math.log(1 - x) > 4.6
    assert mem.P_RANGE[1] in dict(probes)  # the end was probed once


def test_plan_search_reports_param_and_measurement():
    def measure_policy(policy):
        return min(1.0, 1.3 * policy.params()["budget"] / 1000)

    setting, policy = mem.plan_search("adakv", kvpolicy.load("adakv"), 0.25, 1000, measure_policy)
    assert setting.method == "search" and abs(setting.measured - 0.25) <= mem.tolerance(0.25)
    assert setting.params["budget"] == policy.params()["budget"] and setting.how.startswith(f"budget={policy.params()['budget']} (searched")


def hardkv_stored(layout: str):
    from kvpolicy.diagnostics import Source

    text = kvpolicy.library.shipped_text("hardkv").replace("layout flatten_sum", f"layout {layout}")
    return kvpolicy.Policy(kvpolicy.compile_text(text, "hardkv.kvp"), Source(text, "hardkv.kvp"))


def test_hardkv_flatten_sum_gets_the_fixed_budget_then_a_searched_p():
    def measure_policy(policy):  # each head pays for its own tokens: what p asks for, capped
        params = policy.params()
        return min((2 * params["budget"] + params["window"]) / 1000, 0.02 / (1 - params["p"]) ** 0.5)

    assert "layout flatten_sum" in kvpolicy.library.shipped_text("hardkv")
    setting, policy = mem.plan_search("hardkv", kvpolicy.load("hardkv"), 0.25, 1000, measure_policy)
    params = policy.params()
    assert params["budget"] == mem.fixed_budget(0.25, 1000) and params["p"] > 0.99
    assert abs(setting.measured - 0.25) <= mem.tolerance(0.25) and setting.how.startswith(f"budget=250, p={params['p']} (searched p")


def test_hardkv_flatten_max_gets_a_cap_at_the_target_then_a_larger_p():
    def measure_policy(policy):  # top-p keeps what p asks for, never more than the cap
        params = policy.params()
        wanted = 0.02 / (1 - params["p"]) ** 0.5  # 0.063 at p = 0.9
        return min((2 * params["budget"] + params["window"]) / 1000, wanted)

    setting, policy = mem.plan_search("hardkv", hardkv_stored("flatten_max"), 0.25, 1000, measure_policy)
    params = policy.params()
    assert 2 * params["budget"] + params["window"] <= 250  # no head can exceed 25%
    assert params["p"] > 0.99 and abs(setting.measured - 0.25) <= mem.tolerance(0.25)
    assert setting.how.startswith(f"budget={params['budget']}, p={params['p']} (searched p")
    # When the cap binds, the first probe is already at the target and p stays.
    setting, policy = mem.plan_search("hardkv", hardkv_stored("flatten_max"), 0.05, 1000, measure_policy)
    assert policy.params()["p"] == 0.9 and len(setting.probes) == 1


# ----------------------------------------------------------------- bad input (no model)


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr(kvpolicy.models, "load", refuse)


@pytest.mark.parametrize(
    "flags, code, message",
    [
        (["--task", "passky"], 2, "unknown task 'passky'; did you mean 'passkey'?"),
        (["--policy", "snapkv,nosuch"], 2, "no policy file or shipped policy named 'nosuch'"),
        (["--context", "8193"], 2, "--context 8193 is longer than smollm2-135m supports (8192 tokens)"),
        (["--context", "100"], 2, "--context 100 is too short"),
        (["--memory", "0"], 2, "--memory 0 is outside (0, 1]"),
        (["--memory", "0.25,1.01"], 2, "--memory 1.01 is outside (0, 1]"),
        (["--memory", "quarter"], 2, "--memory expects fractions in (0, 1]"),
        (["--samples", "0"], 2, "--samples must be at least 1"),
        (["--policy", "snapkv,snapkv"], 2, "--policy lists 'snapkv' twice"),
        (["--png", "plot.svg"], 2, "--png plot.svg must end in .png"),
    ],
)
def test_bad_input_is_one_line_before_any_model_work(no_model, capsys, tmp_path, flags, code, message):
    assert cli.main(["eval", "--json", str(tmp_path / "out.json"), *flags]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unwritable_outputs(no_model, capsys, tmp_path):
    assert cli.main(["eval", "--json", str(tmp_path / "missing" / "out.json")]) == 2
    assert "directory" in capsys.readouterr().err
    assert cli.main(["eval", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not shutil.os.access(locked, shutil.os.W_OK):  # root can write anyway
            assert cli.main(["eval", "--json", str(locked / "out.json")]) == 2
            assert "cannot write --json" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_invalid_policy_file_exits_1(no_model, capsys, tmp_path):
    bad = tmp_path / "bad.kvp"
    bad.write_text('policy bad "x" {\n  keep k = top_k(atn(), 8) per kv_head\n  compress at prefill\n}\n')
    assert cli.main(["eval", "--policy", str(bad), "--json", str(tmp_path / "o.json")]) == 1
    assert "error: unknown signal 'atn'" in capsys.readouterr().err


def test_resume_refuses_another_experiment(no_model, capsys, tmp_path):
    out = tmp_path / "o.json"
    store = Store.new(out, {"model": "other"}, "kvpolicy eval", 1)
    store.save()
    assert cli.main(["eval", "--json", str(out), "--resume"]) == 2
    assert "holds another experiment" in capsys.readouterr().err
    out.write_text("{not json")
    assert cli.main(["eval", "--json", str(out), "--resume"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


# ----------------------------------------------------------------- the loop, with a stand-in model


class FakeEvaluator:
    """Deterministic records instead of model runs; counts what it ran."""

    calls: list = []
    prefills: list = []
    interrupt_at: str | None = None

    def __init__(self, model, tok):
        pass

    def prefill(self, sample, window, states):
        FakeEvaluator.prefills.append((sample.id, window, len(states)))
        return [sample.id]

    def held_after_prefill(self, sample, policy, prefilled=None):
        assert prefilled == [sample.id]  # the sample's own shared prefill
        return min(1.0, 1.3 * policy.params().get("budget", 1000) / len(sample.prompt_ids))

    def run(self, sample, policy, reference=None, prefilled=None):
        assert prefilled == [sample.id]
        if sample.id == FakeEvaluator.interrupt_at:
            raise KeyboardInterrupt
        FakeEvaluator.calls.append((sample.id, policy.name))
        budget = policy.params().get("budget")
        held = 1.0 if budget is None else budget / len(sample.prompt_ids)
        record = {"kl": 0.0 if reference is None else 0.1, "kl_max": 0.1, "top1": 1.0, "ppl": 2.0,
                  "answer_logprob": -1.0 if sample.answer else None, "correct": True if sample.answer else None,
                  "output": None, "greedy": None, "held": held, "kv_bytes": 1, "kv_bytes_full": 1, "seconds": 0.0}
        return record, None


@pytest.fixture
def fake_model(monkeypatch, tok):
    FakeEvaluator.calls = []
    FakeEvaluator.prefills = []
    FakeEvaluator.interrupt_at = None
    FakeEvaluator.tok = tok
    monkeypatch.setattr(kvpolicy.models, "load", lambda name: (None, tok))
    monkeypatch.setattr(runner, "Evaluator", FakeEvaluator)
    return FakeEvaluator


def test_interrupt_keeps_finished_samples_and_resume_continues(fake_model, capsys, tmp_path):
    out = tmp_path / "o.json"
    args = ["eval", "--policy", "snapkv,adakv", "--task", "passkey", "--context", "512", "--memory", "0.1,0.5",
            "--samples", "3", "--json", str(out)]
    fake_model.interrupt_at = "passkey#2"
    assert cli.main(args) == 130
    data = json.loads(out.read_text())
    assert [s["id"] for s in data["samples"]] == ["passkey#0", "passkey#1"] and not data["complete"]
    assert "interrupted; 2 finished samples" in capsys.readouterr().err
    fake_model.interrupt_at = None
    fake_model.calls = []
    assert cli.main(args + ["--resume"]) == 0
    assert {sid for sid, _ in fake_model.calls} == {"passkey#2"}  # nothing finished is recomputed
    data = json.loads(out.read_text())
    assert [s["id"] for s in data["samples"]] == ["passkey#0", "passkey#1", "passkey#2"] and data["complete"]
    # adakv was sized once, by a measured search, and the setting was reused on resume.
    adakv = [s for s in data["settings"] if s["policy"] == "adakv"]
    assert len(adakv) == 2 and all(s["method"] == "search" and s["probes"] for s in adakv)
    table = capsys.readouterr().out
    assert "snapkv" in table and "adakv" in table and "3/3" in table
    # A stored sample that this machine would generate differently is refused.
    data["samples"][0]["fingerprint"] = "sha256:0"
    data["samples"].pop()
    out.write_text(json.dumps(data))
    assert cli.main(args + ["--resume"]) == 2
    assert "passkey#0 in" in capsys.readouterr().err


def test_suites_set_defaults_and_one_prefill_serves_a_sample(fake_model, capsys, tmp_path, monkeypatch):
    from kvpolicy.evaluate import command

    seen = {}

    def record(config):
        seen["config"] = config
        return 0

    monkeypatch.setattr(runner, "run", record)
    assert cli.main(["eval", "--suite", "hardkv", "--quick", "--json", str(tmp_path / "q.json")]) == 0
    config = seen["config"]
    assert list(config.policies) == command.HARDKV_QUICK["policy"].split(",")
    assert config.context == command.HARDKV_QUICK["context"] and config.samples == command.HARDKV_QUICK["samples"]
    assert cli.main(["eval", "--suite", "hardkv", "--samples", "3", "--json", str(tmp_path / "h.json")]) == 0
    config = seen["config"]
    assert config.tasks == command.HARDKV["task"].split(",") and config.samples == 3  # explicit flags win
    assert {"hardkv", "snapkv", "h2o", "streaming_llm", "adakv", "topp"} <= set(config.policies)
    monkeypatch.undo()
    monkeypatch.setattr(kvpolicy.models, "load", lambda name: (None, fake_model.tok))
    monkeypatch.setattr(runner, "Evaluator", FakeEvaluator)
    args = ["eval", "--policy", "snapkv,h2o", "--task", "passkey", "--context", "512", "--memory", "0.25",
            "--samples", "2", "--json", str(tmp_path / "o.json")]
    assert cli.main(args) == 0
    # One prefill per sample, recording snapkv's window and h2o's state.
    assert fake_model.prefills == [("passkey#0", 64, 1), ("passkey#1", 64, 1)]


# ----------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One real run: 512-token prompts, 1 sample of each task, full + snapkv at 25%."""
    out = tmp_path_factory.mktemp("eval") / "smoke.json"
    png = out.with_suffix(".png")
    args = ["eval", "--policy", "full,snapkv", "--task", "passkey,text", "--context", "512", "--memory", "0.25",
            "--samples", "1", "--json", str(out), "--png", str(png)]
    assert cli.main(args) == 0
    return args, out, png


@pytest.mark.model
def test_smoke_run_on_smollm2(smoke, smollm2):
    _, out, png = smoke
    data = json.loads(out.read_text())
    assert data["format"] == "kvpolicy-eval/1" and data["complete"]
    assert data["command"].startswith("kvpolicy eval --policy full,snapkv")
    env = data["environment"]
    assert {"kvpolicy", "torch", "transformers", "model", "date", "policy_hashes"} <= set(env)
    assert data["config"]["policies"]["snapkv"] == kvpolicy.load("snapkv").hash
    assert [s["id"] for s in data["samples"]] == ["passkey#0", "text#0"]
    for sample in data["samples"]:
        full, snap = sample["runs"]
        assert full["policy"] == "full" and full["kl"] == 0.0 and full["top1"] == 1.0 and full["held"] == 1.0
        assert snap["policy"] == "snapkv" and snap["params"] == {"budget": 128} and snap["kl"] > 0
        n = sample["continuation_tokens"]
        assert snap["kv_bytes"] / snap["kv_bytes_full"] == pytest.approx((128 + n - 1) / (512 + n - 1))
        for run in (full, snap):
            assert {"correct", "answer_logprob", "ppl", "top1", "kv_bytes", "peak_kv_bytes", "seconds"} <= set(run)
    passkey = data["samples"][0]
    assert isinstance(passkey["runs"][0]["correct"], bool) and passkey["runs"][0]["answer_logprob"] < 0
    assert data["samples"][1]["runs"][0]["correct"] is None  # text has no answer
    assert png.stat().st_size > 10_000
    # The teacher-forced shortcut is exact: greedy decoding under the full cache agrees.
    model, tok = smollm2
    sample = tasks.make("passkey", tok, 512, 0, 0)
    res = kvpolicy.hf.generate(model, tok, torch.tensor([sample.prompt_ids]), policy="full", max_new_tokens=len(sample.answer_ids) + 4)
    assert metrics.contains_answer(res.text, sample.answer) == passkey["runs"][0]["correct"]
    if passkey["runs"][0]["greedy"] == "teacher-forced":
        assert res.tokens[: len(sample.answer_ids)] == list(sample.answer_ids)


@pytest.mark.model
def test_resume_does_not_recompute_finished_samples(smoke, tmp_path, monkeypatch, capsys):
    args, out, _ = smoke
    copy = tmp_path / "resume.json"
    shutil.copy(out, copy)
    before = json.loads(copy.read_text())
    ran = []
    original = runner.Evaluator.run

    def spy(self, sample, policy, reference=None, prefilled=None):
        ran.append(sample.id)
        return original(self, sample, policy, reference, prefilled)

    monkeypatch.setattr(runner.Evaluator, "run", spy)
    i = args.index("--json")
    resumed = args[:i] + ["--json", str(copy), "--resume"]
    resumed[resumed.index("--samples") + 1] = "2"
    resumed = [a for a in resumed if a not in ("--png", str(out.with_suffix(".png")))]
    assert cli.main(resumed) == 0
    assert set(ran) == {"passkey#1", "text#1"}
    after = json.loads(copy.read_text())
    assert [s["id"] for s in after["samples"]] == ["passkey#0", "passkey#1", "text#0", "text#1"]
    assert after["samples"][0] == before["samples"][0] and after["samples"][2] == before["samples"][1]
    assert after["history"][0]["command"].endswith("--resume")
    assert after["environment"] == before["environment"] and after["history"][0]["environment"]["model"] == "smollm2-135m"
    assert "resuming" in capsys.readouterr().err

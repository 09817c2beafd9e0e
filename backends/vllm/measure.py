"""Run one policy on vLLM over a fixed set of requests and measure it; one
engine per process (vLLM keeps per-process state), so callers run

    python -m kvpolicy.backends.vllm.measure '{"policy": "snapkv", "params": {...},
        "prompts": [[ids], ...], "max_tokens": 64, "engine": {...}}'

which prints one `RESULT {...}` line: per request its tokens, text and what
it held (RequestOutput.kv_transfer_params["kvpolicy"]); decode tokens/s over
the steps where every request of the first wave decodes; peak KV blocks in
use; the most requests running at once; the end-to-end seconds.
"""
from __future__ import annotations

import json
import os
import sys
import time


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    from kvpolicy import models

    from . import vllm032

    kwargs = dict(model=str(models.path(spec.get("model", "smollm2-135m"))), dtype="float32", enforce_eager=True, seed=0)
    kwargs.update(spec.get("engine", {}))
    if spec.get("policy") and spec["policy"] != "none":
        kwargs["additional_config"] = {"kvpolicy": {"policy": spec["policy"], "params": spec.get("params", {})}}
    llm = LLM(**kwargs)
    engine = llm.llm_engine
    pool = vllm032.block_pool_of(llm)
    running = vllm032.running_count_of(llm)
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=spec.get("ignore_eos", True))
    prompts = spec["prompts"]
    start = time.perf_counter()
    for index, ids in enumerate(prompts):
        engine.add_request(str(index), {"prompt_token_ids": ids}, params)
    wave = min(len(prompts), kwargs.get("max_num_seqs", len(prompts)))
    produced, outputs = {}, {}
    decode_tokens, decode_seconds, peak_blocks, most_running = 0, 0.0, 0, 0
    while engine.has_unfinished_requests():
        before = time.perf_counter()
        all_decoding = len(produced) >= wave and not outputs
        step = engine.step()
        elapsed = time.perf_counter() - before
        new = 0
        for output in step:
            count = len(output.outputs[0].token_ids)
            new += count - produced.get(output.request_id, 0)
            produced[output.request_id] = count
            if output.finished:
                outputs[output.request_id] = output
        if all_decoding:  # a pure decode step of the first wave
            decode_tokens, decode_seconds = decode_tokens + new, decode_seconds + elapsed
        peak_blocks = max(peak_blocks, pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
        most_running = max(most_running, running())
    total = time.perf_counter() - start
    ordered = [outputs[str(index)] for index in range(len(prompts))]
    return {
        "tokens": [list(o.outputs[0].token_ids) for o in ordered],
        "texts": [o.outputs[0].text for o in ordered],
        "held": [(o.kv_transfer_params or {}).get("kvpolicy") for o in ordered],
        "decode_tokens_per_second": decode_tokens / decode_seconds if decode_seconds else 0.0,
        "decode_steps_seconds": decode_seconds,
        "peak_blocks": peak_blocks,
        "pool_blocks": pool.num_gpu_blocks - 1,
        "most_running": most_running,
        "seconds": total,
    }


def in_subprocess(spec: dict, timeout: int = 3600) -> dict:
    """`run(spec)` in a fresh process; raises with the child's last lines on failure."""
    import subprocess

    env = dict(os.environ)
    for key, value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("VLLM_TARGET_DEVICE", "cpu"),
                       ("VLLM_CPU_KVCACHE_SPACE", "2"), ("VLLM_CPU_OMP_THREADS_BIND", "nobind"), ("OMP_NUM_THREADS", "1")):
        env.setdefault(key, value)
    done = subprocess.run([sys.executable, "-m", __name__, json.dumps(spec)], capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = [line for line in done.stderr.splitlines() if line.strip()][-3:]
        raise RuntimeError(" | ".join(tail) or f"exit {done.returncode}")
    return json.loads(lines[-1][len("RESULT "):])


if __name__ == "__main__":
    print("RESULT " + json.dumps(run(json.loads(sys.argv[1]))), flush=True)

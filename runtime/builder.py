"""Build a model's parts from its checked folder and a RuntimeConfig, in one downward pass:

  run mode -> calibration + cost model (built once, shared) -> memory plan (refuses before anything big is read)
  -> dense weights -> predictors -> FFN backend for the plan -> run state

Nothing here computes; the forward pass (runtime/model.py) only uses what this returns.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from .lazy import lazy_module
from .config import RuntimeConfig, dense_engine
from .errors import FlashlmError
from .cost_model import CostModel
from .embedding_rows import FileEmbeddingRows
from .ffn import BundleKernel, FFNBackend, FlashFFN, GraphFFN, MmapFFN, ResidentFFN, bundle_kernel, read_layer_checked
from .memory import MODES, PREFILL_CHUNK, BudgetError, MemoryPlan, Placement, plan_memory
from .modelfile import (ROW_CRC_TENSOR, ModelFileError, ModelFolder, RowCheck, bundle_layers, map_verified,
                        read_verified, resident_part_name, tensors_from_buffer)
from .runstate import BLAS_BLOCK_BYTES, RunState

# numba loads on a kernel's first use: the one-graph decoder runs none (runtime/lazy.py)
K = lazy_module(f"{__package__}.kernels")

log = logging.getLogger("flashlm")


@dataclass
class ModelParts:
    weights: dict[str, np.ndarray]      # dense tensors as the kernels take them
    plan: MemoryPlan
    costs: CostModel                    # the run's cost model (the planner and the sparse path used it)
    ffn: FFNBackend
    kernel: BundleKernel | None         # None: the FFN layers run inside onnxruntime (GraphFFN)
    state: RunState
    threads: int
    ctx_len: int
    quantized: bool                     # block-quantized dense weights (run by onnxruntime when ort, else numba)
    widened: bool = False               # ... which onnxruntime could not run here: widened to f16 for numba
    ort: bool = False                   # quantized dense weights run in onnxruntime sessions (else qmatmul.py)
    embedding_rows: FileEmbeddingRows | None = None   # token embeddings read per token (not resident)
    whole: bool = False                 # the decoder runs as one onnxruntime graph (no numba kernel runs)


def passive_openmp() -> None:
    """Make numba's OpenMP workers sleep instead of spinning after each parallel region, when onnxruntime
    sessions run between numba kernels (a spinning worker takes a core from onnxruntime: SmolLM2 q4 decode
    measured 541 ms/token wall with 2 threads vs 15 with passive waiting, under load). Only then: for
    float weights, where numba runs every kernel, passive waiting costs each of the ~180 parallel regions
    of a token a wake-up (SmolLM2 f16 dense decode 18.6 vs 40.3 tok/s, 2 threads, idle). libgomp reads this
    once, when numba first starts its thread pool, so it must run before the first parallel kernel; a
    user's own OMP_WAIT_POLICY wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def compute_threads(requested: int | None) -> int:
    """The run's compute threads: `requested` (None: every core this process may run on), at most numba's
    pool size (NUMBA_NUM_THREADS, which defaults to those cores). Worked out without importing numba: the
    one-graph decoder never starts numba's pool (see runtime/lazy.py)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    pool = int(os.environ.get("NUMBA_NUM_THREADS") or cores)
    return max(1, min(requested or cores, pool))


def one_graph(folder: ModelFolder, rt: RuntimeConfig, ffn_in_graph: bool) -> bool:
    """Whether the whole decoder runs as one onnxruntime graph (RuntimeConfig.ort_graph): only when every
    layer's FFN is resident (a streamed FFN needs numba between layers), and under auto only where it is
    the faster path (OrtDecoder.pays: models with small layers)."""
    from .ort_model import OrtDecoder
    if rt.ort_graph == "layers":
        return False
    why = "FFN rows stream from flash" if not ffn_in_graph else OrtDecoder.supports(folder.config)
    if why is not None and rt.ort_graph == "whole":
        raise FlashlmError(f"ort_graph 'whole': {folder.path}: cannot run as one graph: {why}")
    return why is None and OrtDecoder.wanted(folder.config, rt.ort_graph)


def activation_bytes(folder: ModelFolder, threads: int) -> int:
    """What the run state and the kernels' scratch allocate (the plan's activation line)."""
    c = folder.config
    return (RunState.nbytes_for(c, PREFILL_CHUNK) + BundleKernel.scratch_bytes(c, threads)
            + BLAS_BLOCK_BYTES                       # the dense matmuls' widened block for prompts
            + 2 * PREFILL_CHUNK * c.d_model * 4)       # the FFN backends' accumulation buffers


def build(folder: ModelFolder, rt: RuntimeConfig, *, predictors=None) -> ModelParts:
    """Plan and build everything `rt` asks for. `predictors` (one per layer, with .predict(h) and .hot)
    replaces the calibrated ones, e.g. an oracle in tests."""
    c = folder.config
    mode = MODES.get(rt.mode)
    if mode is None:
        raise BudgetError(f"unknown mode {rt.mode!r}; choose one of {list(MODES)}")
    threads = compute_threads(rt.threads)
    if mode.needs_predictors:
        from .predictor import read_calibration     # numba's kernels: only runs that predict import them
        calibration = read_calibration(folder)
    else:
        calibration = None
    costs = CostModel.for_run(folder, rt, compute_threads=threads)      # the one cost model of this run
    quantized = any(t.storage is not None and t.storage.block_elems > 1 for t in folder.dense.values())
    ort = quantized and dense_engine(rt) == "onnxruntime"
    ort_unusable = None             # why onnxruntime cannot run here: the numba dense path instead (below)
    if ort:
        from .engines import onnxruntime_status
        status = onnxruntime_status()
        if not status.usable:
            ort, ort_unusable = False, status.detail
    # A dense-mode run of a quantized folder keeps its FFN layers whole in the onnxruntime sessions
    # (ffn_matrices), and then may run the whole decoder as one graph, with no numba kernel at all.
    graph_ffn = ort and mode.rows_from == "file" and bool(folder.matrices)
    whole = ort and one_graph(folder, rt, graph_ffn)
    if ort:
        passive_openmp()
    if not whole:
        K.set_threads(threads)      # imports numba and sizes its pool, before the runtime is measured below
    runtime_bytes = ram = 0
    if rt.memory_limit is not None:
        # The runtime itself counts against a whole-process limit: measure it once every module the run
        # needs is imported (onnxruntime, which runs the sessions; numba unless the run is one graph),
        # before anything big is read. (The graphs are written by onnx_proto: no `onnx` import.)
        from .process_memory import physical_memory_bytes, release_freed_heap, rss_bytes
        if ort:
            import onnxruntime  # noqa: F401
        release_freed_heap()
        runtime_bytes, ram = rss_bytes(), physical_memory_bytes()
    plan = plan_memory(folder, rt, activations=activation_bytes(folder, threads), costs=costs,
                       calibration=calibration, runtime_bytes=runtime_bytes, ram_bytes=ram or None)
    state = RunState(c, PREFILL_CHUNK)
    emb = folder.dense["tok_embeddings"]
    # Embedding rows read per token: an untied matrix is never read into memory; a tied quantized one is
    # (onnxruntime's lm_head session takes it), and the model drops it once the session holds its copy.
    skip = plan.embeddings_from_file and not c.tied_embeddings
    entries = {n: e for n, e in folder.dense.items() if not (skip and n == "tok_embeddings")}
    if ort:
        # Quantized dense weights that only feed onnxruntime sessions, which prepack their own copies: map
        # them (file-backed pages, released after the sessions are built) instead of copying them to the heap.
        weights = tensors_from_buffer(map_verified(folder, "dense.safetensors"), entries)
    else:
        # Weights the kernels read for the whole run live in anonymous memory: file-backed pages would be
        # page cache a memory limit evicts and faults back in, token after token (llama.cpp's thrashing).
        weights = tensors_from_buffer(read_verified(folder, "dense.safetensors",
                                                    ((emb.offset, emb.nbytes),) if skip else ()), entries)
    embedding_rows = FileEmbeddingRows(folder.file("dense.safetensors"), emb) if plan.embeddings_from_file else None
    # The gate-resident layout's W_gate: a dense tensor the FFN kernel and the gate selectors share.
    gates, ups = ([weights[resident_part_name(i, part)] for i in range(c.n_layers)] if part in folder.bundles.resident
                  else None for part in ("gate", "up"))
    if plan.predictor_layers and predictors is None:
        from .predictor import load_predictors
        predictors = load_predictors(folder.path, c, plan.predictor_layers, state, gate_rows=gates, up_rows=ups)
    biases = [weights.get(f"layers.{i}.ffn.up.bias") for i in range(c.n_layers)]
    row_crc = (RowCheck(weights[ROW_CRC_TENSOR], folder.file(folder.bundles.file), folder.bundles.stride_bytes)
               if rt.verify_reads and ROW_CRC_TENSOR in weights else None)
    widened = ort_unusable is not None
    if widened:                     # block-quantized weights widened to f16 once, for the numba kernels
        weights = widen_blocks(folder, weights)
        quantized = False
        log.warning("%s: onnxruntime cannot be used here (%s); running the dense weights on the numba "
                    "kernels instead, widened to f16 (%.0f MiB more than the plan's dense line)", folder.path,
                    ort_unusable, (sum(a.nbytes for a in weights.values()) - plan.dense) / 2**20)
    if graph_ffn:
        ffn, kernel = GraphFFN(), None      # the FFN layers run inside the onnxruntime sessions: no bundle kernel
    else:
        kernel = bundle_kernel(c, folder.bundles, threads, gates, ups)
        ffn = build_ffn(folder, rt, plan, kernel, biases, predictors, row_crc, costs)
    return ModelParts(weights, plan, costs, ffn, kernel, state, threads,
                      min(rt.ctx_len, c.max_position), quantized, widened, ort, embedding_rows, whole)


def widen_blocks(folder: ModelFolder, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The dense tensors with every block-quantized one decoded to f16 bits (what the numba kernels take)."""
    out = {}
    for name, arr in weights.items():
        storage = folder.dense[name].storage if name in folder.dense else None
        if storage is not None and storage.block_elems > 1:
            arr = np.ascontiguousarray(storage.decode(arr).astype(np.float16).view(np.uint16))
        out[name] = arr
    return out


def build_ffn(folder: ModelFolder, rt: RuntimeConfig, plan: MemoryPlan, kernel: BundleKernel, biases: list,
              predictors, row_crc, costs: CostModel | None) -> FFNBackend:
    """The FFN backend the plan calls for (see runtime/ffn.py)."""
    from .aligned import aligned_empty
    from .flash_reader import FlashReader
    from .layer_stream import RingStreamer, RowSource
    from .neuron_cache import NeuronCache
    c, b = folder.config, folder.bundles
    path = folder.file(b.file)
    rows_from = plan.run_mode.rows_from
    if rows_from == "file":
        return ResidentFFN(bundle_layers(folder, read_verified(folder, b.file)), kernel, biases)
    if rows_from == "mmap":
        return MmapFFN(path, b, kernel, biases, row_crc)
    try:
        reader = FlashReader(path, layer_offsets=list(b.layer_offsets), stride_bytes=b.stride_bytes, n_rows=c.n_ff,
                             mode=rt.io, threads=rt.io_threads, max_gap_bytes=rt.max_gap_bytes,
                             row_bytes=b.stride_bytes, submit=rt.io_submit)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot open for flash reads ({e.strerror or e})") from None
    all_rows = np.arange(c.n_ff, dtype=np.int32)
    # Layers used whole (resident, streamed) come from the packed copy when the folder has one (no padding:
    # q4_0 rows of 2592 bytes instead of a 4096-byte stride), else from the bundle file.
    rows = RowSource.of_folder(folder, row_crc, verify=rt.verify_reads, direct=rt.io == "direct")
    resident = {}
    for i in plan.resident_layers:
        if folder.packed is not None:
            resident[i] = aligned_empty((c.n_ff, rows.stride // b.dtype.itemsize), b.dtype)
            rows.read_layer(i, resident[i])
        else:
            resident[i] = np.empty((c.n_ff, b.stride_items), b.dtype)
            read_layer_checked(reader, i, resident[i], row_crc, all_rows)
    streamed = plan.layers_placed(Placement.STREAM)
    ring_bytes = 2 * plan.stream_buffer_rows * rows.stride
    whole = None
    if streamed:
        def whole(stats):
            return RingStreamer(rows, kernel, biases, streamed, ring_bytes, stats, threads=rt.io_threads,
                                read_ahead=rt.pipeline)
    row_items = b.cache_row_bytes // b.dtype.itemsize          # packed: no block padding in DRAM
    caches = [NeuronCache(c.n_ff, p.cache_rows, row_items, b.dtype, window=plan.window_of(i),
                          pinned=predictors[i].hot[:plan.pin_rows] if plan.pin_rows else None)
              if p.placement == Placement.SPARSE else None for i, p in enumerate(plan.layers)]
    return FlashFFN(reader, kernel, biases, b, resident=resident, streamed=plan.layers_placed(Placement.STREAM),
                    stream_buffer_rows=plan.stream_buffer_rows, predictors=predictors, caches=caches,
                    sparse_buffer_rows=plan.sparse_buffer_rows, costs=costs, layer_io=rt.layer_io, row_crc=row_crc,
                    pipeline=rt.pipeline, pipeline_trial=rt.pipeline_trial, whole=whole)

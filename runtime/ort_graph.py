"""onnxruntime graphs that flashlm builds itself (the `onnx` helper API) for its resident weights.

Quantized matrices (runtime/quant.py) become `com.microsoft.MatMulNBits` nodes with their codes as
constant initializers: onnxruntime prepacks them once and runs decode matvecs with int8 activations
(accuracy_level 4) at several times the rate a numba loop reaches (no VNNI from LLVM). Measured
(onnxruntime 1.32, CPU EP): a float zero point is 20x slower than none and is refused for 8 bits, so a
type with a min (q4_1, q8_1) runs as MatMulNBits with the implicit zero point plus a small f32 MatMul
of per-block input sums with the folded mins:
    sum_j (q_j s + m) x_j = sum_j (q_j - z) s x_j + (m + z s) * sum_j x_j          (per block)
The block sums are f32 (a ReduceSum over x), so the correction adds no activation rounding.
f16/f32 matrices become a plain MatMul over f32 initializers (used only where a folder mixes types).

A graph is a short chain of such nodes plus norms, residual adds and activations, so one `run()`
covers everything between two attention calls (see runtime/ort_model.py). Sessions spin at most a few
microseconds (`session.intra_op.spin_duration_us`), or not at all, so numba's threads get the cores back
between runs.

Memory: weight matrices are not serialized into the model proto. Each is declared with external data
in an in-memory "file" that is our own array (`SessionOptions.add_external_initializers_from_files_in_memory`):
onnxruntime reads it in place, prepacks it into its own buffer and keeps only that (measured,
onnxruntime 1.32: a 49152 x 576 q8_0 MatMulNBits session adds ~34 MiB of RSS for 30.4 MiB of weights
handed over in place vs 68 MiB with the weights in the proto, and its build peaks at 142 vs 338 MiB).
The session does not read our arrays after it is built (tests/test_quant_model.py overwrites them and
checks the outputs), so temporaries such as stacked q|k|v codes or f32 scales are freed, and mapped
file pages can be released.
"""
from __future__ import annotations

import numpy as np

from . import onnx_proto as proto
from .quant import QTensor

INT8_ACTIVATIONS = 4      # MatMulNBits accuracy_level: int8 activations, int32 sums (the fast CPU path)
F32_ACTIVATIONS = 0       # f32 activations: exact up to f32 rounding, 2-3x slower (tests, reference runs)
# RuntimeConfig.activations -> the linears (by their hint) whose MatMulNBits take f32 activations; None: all.
# Why q|k|v in "mixed": of the SmolLM2 Q4_1 linears made f32 one kind at a time, only q|k|v (or gate|up,
# 3.2x its weights) moved the held-out perplexity toward f16's (one 901-token window: int8 +0.77%, f32 q|k|v
# +0.18%, f32 gate|up +0.39%, f32 down/o/logits +0.68-0.87%; windows of 512: int8 +0.17%, f32 q|k|v +0.19%;
# llama.cpp's own Q8_1 activations +0.40/+0.39%, tools/ppl_llamacpp.py). f32 q|k|v costs ~14 us of a 576 x 960
# matvec per layer (2 threads; 27 at 1), within the decode token's run-to-run noise. 4-bit codes only (below).
F32_LINEARS = {"int8": frozenset(), "mixed": frozenset({"qkv"}), "f32": None}
OPSET = 17


class GraphBuilder:
    """Accumulates nodes and constant initializers for one onnxruntime session."""

    def __init__(self, name: str, activations: str = "int8"):
        self.f32_linears = F32_LINEARS[activations]     # KeyError: not a RuntimeConfig.activations value
        self.name = name
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []     # serialized protos (onnx_proto)
        self.weights: dict[str, np.ndarray] = {}       # initializers handed over as OrtValues (see above)
        self._sums: dict[tuple, str] = {}               # block sums already computed, by (input, k, block)
        self._n = 0

    def _fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, arr: np.ndarray, hint: str = "c") -> str:
        """A small constant, serialized into the graph."""
        name = self._fresh(hint)
        self.inits.append(proto.tensor(name, arr))
        return name

    def weight(self, arr: np.ndarray, hint: str = "w") -> str:
        """A weight consumed by a prepacking node (MatMulNBits, MatMul): declared with external data in an
        in-memory "file" that is `arr` itself, so the session reads it in place (see the module docstring)."""
        name = self._fresh(hint)
        arr = np.ascontiguousarray(arr)
        self.weights[name + ".bin"] = arr
        self.inits.append(proto.external_tensor(name, arr.dtype, arr.shape, name + ".bin", 0, arr.nbytes))
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, domain: str = "", n_out: int = 1,
             names: list[str] | None = None, **attrs):
        """One node; its outputs get fresh names, or `names` (graph outputs written by the node itself; None: fresh)."""
        outs = [n or self._fresh(hint or op.lower()) for n in names] if names else \
            [self._fresh(hint or op.lower()) for _ in range(n_out)]
        self.nodes.append(proto.node(op, inputs, outs, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def input(self, name: str, width: int) -> str:
        self.inputs.append(proto.value_info(name, proto.FLOAT, ["T", width]))
        return name

    def output(self, value: str, name: str, width: int) -> None:
        self.nodes.append(proto.node("Identity", [value], [name]))
        self.outputs.append(proto.value_info(name, proto.FLOAT, ["T", width]))

    def typed_input(self, name: str, dtype, shape: list) -> str:
        """An input of any numpy dtype and shape (ints for fixed sizes, strings for free ones)."""
        self.inputs.append(proto.value_info(name, proto.tensor_dtype(dtype), shape))
        return name

    def typed_output(self, name: str, dtype, shape: list) -> None:
        """Declare an output that a node already writes under this name (no Identity: a present-KV output
        must be the attention node's own, to share its buffer with the past input)."""
        self.outputs.append(proto.value_info(name, proto.tensor_dtype(dtype), shape))

    # --- layers -------------------------------------------------------------------------------------
    def linear(self, x: str, w, bias: np.ndarray | None = None, hint: str = "y") -> str:
        """x[T, k] @ w.T (+ bias): w a QTensor [n, k] or a float array [n, k] (f16 as float16 or uint16 bits)."""
        if isinstance(w, QTensor):
            y = self._matmul_nbits(x, w, hint)
        else:
            arr = w.view(np.float16) if w.dtype == np.uint16 else w
            y = self.node("MatMul", [x, self.weight(np.ascontiguousarray(arr.astype(np.float32).T), hint + "_w")], hint)
        if bias is not None:
            y = self.node("Add", [y, self.const(np.asarray(bias, np.float32), hint + "_b")], hint)
        return y

    def _matmul_nbits(self, x: str, w: QTensor, hint: str) -> str:
        n, k = w.shape
        bits, block = w.qtype.bits, w.block
        nb = w.scales.shape[1]
        codes = w.qs.reshape(n, nb, block * bits // 8)
        scales = w.scales.astype(np.float32)
        inputs = [x, self.weight(codes, hint + "_q"), self.weight(scales.reshape(-1), hint + "_s")]
        zero = 1 << (bits - 1)
        if w.mins is not None and bits == 8:
            # 8-bit codes with a min come from 5-bit GGUF types (0..31): centre them with an explicit
            # zero point, as the default 128 would multiply int8-activation error by |q - 128| ~ 100.
            zero = (int(w.qs.max()) + 1) // 2
            inputs.append(self.weight(np.full(n * nb, zero, np.uint8), hint + "_z"))
        # "mixed" keeps 8-bit codes on int8 activations: MatMulNBits has no f32 kernel for them (its fallback
        # ran 18-21x slower here, 896 x 128: 146-183 vs 8.3-8.6 us; Qwen2.5's Q6_K v made mixed decode 2.5x slower)
        f32 = self.f32_linears is None or (hint in self.f32_linears and bits == 4)
        y = self.node("MatMulNBits", inputs, hint, domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                      accuracy_level=F32_ACTIVATIONS if f32 else INT8_ACTIVATIONS)
        if w.mins is None:
            return y
        folded = w.mins.astype(np.float32) + np.float32(zero) * scales      # m + z s, [n, nb]
        # y + sums(x) @ folded.T as one Gemm (its C input is y), f32 throughout.
        return self.node("Gemm", [self.block_sums(x, k, block), self.weight(np.ascontiguousarray(folded.T), hint + "_m"),
                                  y], hint)

    def block_sums(self, x: str, k: int, block: int) -> str:
        """[T, n_blocks] sums of x over consecutive blocks of `block` columns (the last one zero-padded),
        one node pair per distinct input: graphs that apply several min-corrected linears to one input
        (q|k|v, gate|up when they do not stack) share it.
        A Reshape + ReduceSum reads nothing but x; the 0/1 [k, n_blocks] f32 MatMul it replaces read
        k * n_blocks * 4 bytes per linear (12.5 MB per SmolLM2 token, 295 KB for each down projection)."""
        key = (x, k, block)
        if key not in self._sums:
            nb = -(-k // block)
            xp = x if nb * block == k else self.node(
                "Pad", [x, self.const(np.array([0, 0, 0, nb * block - k], np.int64))], "pad")
            blocks = self.node("Reshape", [xp, self.const(np.array([0, nb, block], np.int64))], "blocks")
            self._sums[key] = self.node("ReduceSum", [blocks, self.const(np.array([-1], np.int64))], "sums",
                                        keepdims=0)
        return self._sums[key]

    def linears(self, x: str, ws: list, biases: list, hint: str = "y") -> str:
        """[x @ w.T + b for w, b] concatenated along the last axis: one node when the matrices stack."""
        if stackable(ws):
            bias = None if all(b is None for b in biases) else np.concatenate(
                [np.zeros(w.shape[0], np.float32) if b is None else b for w, b in zip(ws, biases)])
            return self.linear(x, stack_rows(ws), bias, hint)
        return self.node("Concat", [self.linear(x, w, b, hint) for w, b in zip(ws, biases)], hint, axis=-1)

    def rmsnorm(self, x: str, w: np.ndarray, eps: float) -> str:
        return self.node("SimplifiedLayerNormalization", [x, self.const(np.asarray(w, np.float32), "norm_w")],
                         "norm", axis=-1, epsilon=float(eps))

    def layernorm(self, x: str, w: np.ndarray, b: np.ndarray, eps: float) -> str:
        return self.node("LayerNormalization", [x, self.const(np.asarray(w, np.float32), "norm_w"),
                                                self.const(np.asarray(b, np.float32), "norm_b")],
                         "norm", axis=-1, epsilon=float(eps))

    def add(self, a: str, b: str) -> str:
        return self.node("Add", [a, b], "add")

    def gated(self, gate_up: str, n_ff: int, act: str, threshold: float = 0.0) -> str:
        """act(g) * u for gate_up = [g | u] along the last axis (one fused MatMulNBits produced it);
        act silu (SwiGLU), relu (ReGLU), drelu (relu(g) * relu(u), dReLU) or gelu_tanh (GeGLU,
        gelu_pytorch_tanh). threshold > 0 (relu, drelu): FATReLU, the gate passes only g > threshold."""
        g, u = self.node("Split", [gate_up, self.const(np.array([n_ff, n_ff], np.int64))], "split", n_out=2, axis=-1)
        if act == "silu":
            a = self.node("Mul", [g, self.node("Sigmoid", [g])], "silu")
        elif act in ("relu", "drelu"):
            if threshold:
                t = self.const(np.array(threshold, np.float32), "fatrelu_t")
                a = self.node("Where", [self.node("Greater", [g, t]), g, self.const(np.array(0, np.float32), "zero")])
            else:
                a = self.node("Relu", [g])
            if act == "drelu":
                u = self.node("Relu", [u])
        else:
            a = self.node("FastGelu", [g], "gelu", domain="com.microsoft")
        return self.node("Mul", [a, u], "act")

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def model(self) -> bytes:
        """The serialized ModelProto (onnx_proto: no `onnx` import in a decoding process)."""
        return proto.model(self.nodes, self.name, self.inputs, self.outputs, self.inits,
                           opsets=[("", OPSET), ("com.microsoft", 1)], ir_version=9)


def session(builder: GraphBuilder, threads: int, spin_us: int = 0):
    """An onnxruntime CPU session for the builder's graph: `threads` intra-op threads whose idle workers
    spin `spin_us` microseconds before sleeping (0: never spin), and not at all once a run has returned."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning only where it is bounded (onnxruntime >= 1.26 reads spin_duration_us; older ones would spin
    # unbounded): a worker outliving its run would take the core from the next session's worker or numba.
    spin = spin_us > 0 and threads > 1 and bounded_spinning()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        so.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
        # ...within a run only (`session.force_spinning_stop`): when run() returns its workers stop at once instead
        # of spinning on beside the next session's (one pool per session, 8 per SmolLM2 token) or numba's threads.
        # Measured (SmolLM2 one graph, 2 threads, past 128, load ~8, alternating): decode wall median 12.15 vs
        # 15.67 ms per token, the same CPU time.
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    # No arena and no memory patterns: measured on SmolLM2 (31 sessions) they keep ~125 MiB of peak-size
    # activation buffers per process for a few percent of speed.
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    # The buffers must outlive the session's construction (the options hold pointers to them); after it
    # the session keeps only its prepacked copies (module docstring).
    if builder.weights:
        buffers = [a.reshape(-1).view(np.uint8) for a in builder.weights.values()]
        so.add_external_initializers_from_files_in_memory(list(builder.weights), buffers, [b.size for b in buffers])
    return ort.InferenceSession(builder.model(), so, providers=["CPUExecutionProvider"])


def bounded_spinning() -> bool:
    """Whether this onnxruntime bounds its workers' spinning (`session.intra_op.spin_duration_us`, 1.26+)."""
    import onnxruntime as ort
    major, minor = (int(p) for p in ort.__version__.split(".")[:2])
    return (major, minor) >= (1, 26)


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise): building sessions allocates and
    frees several copies of every weight (proto, serialized bytes), which would stay in the RSS."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):   # not glibc: nothing to do
        return
    trim(0)


def stackable(parts: list) -> bool:
    """Whether matrices can be stacked along n into one MatMulNBits (same type, block, scale dtype, k)."""
    first = parts[0]
    return all(isinstance(p, QTensor) and p.qtype == first.qtype and p.block == first.block
               and p.scales.dtype == first.scales.dtype and p.shape[1] == first.shape[1] for p in parts)


def stack_rows(parts: list[QTensor]) -> QTensor:
    """q|k|v or gate|up as one QTensor, so one MatMulNBits (one pass over the input) serves them all."""
    first = parts[0]
    return QTensor(first.qtype, (sum(p.shape[0] for p in parts), first.shape[1]), first.block,
                   np.concatenate([p.qs for p in parts]), np.concatenate([p.scales for p in parts]),
                   None if first.mins is None else np.concatenate([p.mins for p in parts]))

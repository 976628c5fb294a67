"""What a model is (ModelConfig, from the manifest) and how this device runs it (RuntimeConfig)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .cpu import cpu_flags
from .errors import FlashlmError

FORMAT_VERSION = 1
SUPPORTED_ARCHITECTURES = ("llama", "opt", "gemma3")
# geglu: gate through tanh-approximated GELU (gelu_pytorch_tanh); reglu: relu(gate) * up (a Llama config
# with hidden_act relu, as ReluLLaMA and ProSparse ship; with act_threshold t > 0 it is FATReLU,
# hidden_act fatrelu: the gate is zero unless above t); drelu: relu(gate) * relu(up), TurboSparse /
# Bamboo's dReLU, zero whenever either projection is not positive
FFN_KINDS = ("swiglu", "geglu", "reglu", "drelu", "relu")
GATED_KINDS = ("swiglu", "geglu", "reglu", "drelu")
RELU_GATED_KINDS = ("reglu", "drelu")   # gated kinds whose activation is exactly zero for many neurons


@dataclass
class ModelConfig:
    architecture: str            # "llama" (Llama/Mistral/Qwen2/Qwen3-style), "gemma3" or "opt"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_ff: int                    # FFN neurons per layer
    ffn_kind: str                # "swiglu" / "geglu" / "reglu" / "drelu" (gate, up, down) or "relu" (up, down)
    norm_kind: str               # "rms" or "layer"; weights are plain multipliers (Gemma's 1 + w is folded in)
    norm_eps: float
    pos_kind: str                # "rope" or "learned"
    max_position: int            # context length the model was trained for
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # HF rope_scaling dict (e.g. llama3), None = plain RoPE
    pos_offset: int = 0          # OPT's learned positions start at index 2
    tied_embeddings: bool = False
    attn_qkv_bias: bool = False  # Qwen2 / OPT
    attn_out_bias: bool = False  # OPT
    ffn_bias: bool = False       # OPT: up bias per neuron, down bias per output (both dense)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Gemma 3 / Qwen 3 variations (defaults: the Llama layer)
    qk_norm: bool = False        # RMSNorm over head_dim of every query and key head, before RoPE
    sandwich_norm: bool = False  # extra norms on the attention output and the FFN output before the residual add
    embed_scale: float = 1.0     # token embeddings multiplied by this (Gemma: sqrt(d_model))
    attn_scale: float | None = None      # attention score scale; None = 1/sqrt(head_dim)
    sliding_window: int | None = None    # a sliding layer's query sees its last `sliding_window` positions
    sliding_layers: list[int] = field(default_factory=list)   # layers with sliding-window attention
    rope_local_theta: float | None = None  # RoPE base of sliding layers (unscaled); None = rope_theta
    # FATReLU (reglu, drelu): the gate's ReLU passes g only when g > act_threshold (0: plain ReLU)
    act_threshold: float = 0.0

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; supported: {SUPPORTED_ARCHITECTURES}")
        if self.ffn_kind not in FFN_KINDS:
            raise ValueError(f"unsupported ffn_kind {self.ffn_kind!r}; supported: {FFN_KINDS}")
        if not (self.act_threshold >= 0.0 and self.act_threshold < float("inf")):
            raise ValueError(f"act_threshold {self.act_threshold} is not a finite number >= 0")
        if self.act_threshold and self.ffn_kind not in RELU_GATED_KINDS:
            raise ValueError(f"act_threshold {self.act_threshold} needs a ReLU-gated FFN {RELU_GATED_KINDS}, "
                             f"not {self.ffn_kind!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.sliding_layers and not (self.sliding_window and self.sliding_window > 0):
            raise ValueError(f"sliding layers {self.sliding_layers} need a positive sliding_window")
        if any(not 0 <= i < self.n_layers for i in self.sliding_layers):
            raise ValueError(f"sliding layers {self.sliding_layers} outside 0..{self.n_layers - 1}")

    @property
    def gated(self) -> bool:
        """FFN with a gate projection (SwiGLU, GeGLU, ReGLU, dReLU): a = act(gate.h) * up.h (dReLU: * relu(up.h))."""
        return self.ffn_kind in GATED_KINDS

    @property
    def relu_gated(self) -> bool:
        """A gated FFN whose activation is exactly zero for many neurons (ReGLU/FATReLU, dReLU): a neuron
        scored zero contributes nothing, so selectors never read it."""
        return self.ffn_kind in RELU_GATED_KINDS

    def layer_window(self, layer: int) -> int:
        """Positions a query of `layer` attends to, counting itself; 0 = all (global attention)."""
        return self.sliding_window if layer in self.sliding_layers else 0

    def layer_rope(self, layer: int) -> tuple[float, dict | None]:
        """(RoPE base, scaling) of `layer`: sliding layers use the local base without scaling (Gemma 3)."""
        if layer in self.sliding_layers and self.rope_local_theta is not None:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def bundle_parts(self) -> list[tuple[str, int]]:
        """(name, length in elements) of one neuron's bundle row, in storage order."""
        d = self.d_model
        # Biases stay dense: one extra element would push a 16 KiB OPT-6.7B row into a fifth 4 KiB block.
        return [("gate", d), ("up", d), ("down", d)] if self.gated else [("up", d), ("down", d)]

    @property
    def bundle_elems(self) -> int:
        return sum(n for _, n in self.bundle_parts)

    def row_parts(self, resident: tuple[str, ...] = ()) -> list[tuple[str, int]]:
        """bundle_parts without the parts a layout keeps resident (the gate-resident variant: up, down)."""
        return [(n, length) for n, length in self.bundle_parts if n not in resident]


@dataclass
class RuntimeConfig:
    """How this device runs a model: set from a device profile and CLI flags, never from globals."""
    ctx_len: int = 2048          # KV cache length (tokens)
    threads: int | None = None   # compute threads for numba; None = all cores
    mode: str = "dense"          # dense | flash | naive | hybrid | mmap  (see runtime/ffn.py)
    budget: str | None = None    # "60%", "0.6", "512MiB": resident bytes allowed (None = unlimited)
    memory_limit: str | None = None  # the whole process (runtime, weights, caches, KV, buffers): "700MiB", "5%"
    embeddings: str = "auto"     # token embeddings: resident | flash (one row read per token) | auto (flash
    #                              under a budget or memory limit, where no resident copy is needed anyway)
    window: int | None = None    # sliding window in tokens (None: largest the budget allows)
    pin: float = 0.0             # fraction of each layer's hottest neurons kept resident for good
    io: str = "direct"           # direct (O_DIRECT) | buffered (page cache)
    io_threads: int = 4          # reader threads, each looping over its share of a batch of reads
    io_submit: str = "auto"      # how reads reach the kernel: aio (Linux native AIO, a batch per syscall) | pread
    #                              (one read per syscall) | auto (aio where the kernel and filesystem take it)
    max_gap_bytes: int = 0       # coalesce reads across gaps up to this size (reads a little extra)
    layer_io: str = "auto"       # flash mode per layer: auto (cheaper of sparse/stream) | sparse | stream
    profile: str | None = None   # device profile (devices/NAME.toml or a path): measured flash speeds
    verify_reads: bool = True    # check every bundle row read from flash against its CRC-32
    kv_dtype: str = "auto"       # KV cache storage: f16 (half the bytes; attention widens in-register) | f32 |
    #                              auto (f32 where the decoder runs as one onnxruntime graph, else f16: kv_storage)
    dense_engine: str = "auto"   # quantized dense weights: onnxruntime (MatMulNBits, fast, ~1.5x their bytes
    #                              resident) | numba (from the stored rows, 1x) | auto (numba under --memory-limit)
    activations: str = "auto"    # what onnxruntime's quantized matvecs (MatMulNBits) multiply: int8 (every input
    #                              quantized to int8 blocks of 32, the fast path, as llama.cpp's Q8 activations) |
    #                              mixed (the same but the attention's 4-bit q|k|v projection reads f32: closer to
    #                              f16, the measured why in ort_graph.F32_LINEARS) | f32 (every input f32: exact,
    #                              slower) | auto (mixed or int8 by the CPU: activation_policy)
    ort_spin_us: int = 100       # onnxruntime dense weights, threads > 1: every session splits its matvecs across
    #                              the threads and its idle worker spins this long (µs) before it sleeps, never past
    #                              the end of a run; 0: no spinning, sessions run on the calling thread (the lm_head
    #                              split), prompts in row blocks. 100 covers the serial stretches between a run's
    #                              parallel nodes (25-86 us, tools/ort_profile.py): SmolLM2 2-thread decode at idle
    #                              88.6-98.6 tok/s vs 74.5-82.5 at 10 (two runs of tools/bench_llamacpp.py, session 8);
    #                              on a loaded machine 10 loses less (docs/BENCHMARKS.md, session 7 dec2)
    ort_graph: str = "auto"      # onnxruntime dense weights, every FFN resident: whole (the decoder as one graph,
    #                              attention in it: one run per token) | layers (a graph between numba attention
    #                              calls) | auto (whole where the model allows it and its layers are small: measured
    #                              faster on SmolLM2-135M, slower on Qwen2.5-0.5B; OrtDecoder.pays)
    pipeline: bool = True        # flash reads start ahead of the layer that needs them (lookahead, read-ahead
    #                              of the next streamed layer, wrapping to the next token); False: none do
    pipeline_trial: bool = True  # with the pipeline: time decode tokens with the lookahead on and off, keep the
    #                              faster (runtime/pipeline_switch.py); False: the lookahead always runs

    def __post_init__(self):
        def bad(field: str, why: str):
            raise RuntimeConfigError(f"{field} {getattr(self, field)!r}: {why}")
        if self.ctx_len < 1:
            bad("ctx_len", "the context must hold at least one token")
        if self.threads is not None and self.threads < 1:
            bad("threads", "use at least one thread")
        if self.window is not None and self.window < 1:
            bad("window", "the window is at least one token")
        if not 0.0 <= self.pin < 1.0:
            bad("pin", "the pinned fraction is in [0, 1)")
        if self.io not in ("direct", "buffered"):
            bad("io", "use direct or buffered")
        if self.io_threads < 1:
            bad("io_threads", "use at least one reader thread")
        if self.io_submit not in ("auto", "aio", "pread"):
            bad("io_submit", "use auto, aio or pread")
        if self.max_gap_bytes < 0:
            bad("max_gap_bytes", "a gap is not negative")
        if self.layer_io not in ("auto", "sparse", "stream"):
            bad("layer_io", "use auto, sparse or stream")
        if self.embeddings not in ("auto", "resident", "flash"):
            bad("embeddings", "use auto, resident or flash")
        if self.dense_engine not in ("auto", "onnxruntime", "numba"):
            bad("dense_engine", "use auto, onnxruntime or numba")
        if self.ort_spin_us < 0:
            bad("ort_spin_us", "a spin time is not negative")
        if self.ort_graph not in ("auto", "whole", "layers"):
            bad("ort_graph", "use auto, whole or layers")
        if self.kv_dtype not in ("auto", "f16", "f32"):
            bad("kv_dtype", "the KV cache dtype is auto, f16 or f32")
        if self.activations not in ("auto", "int8", "mixed", "f32"):
            bad("activations", "use auto, int8, mixed or f32")


def dense_engine(rt: RuntimeConfig) -> str:
    """The engine that runs block-quantized dense weights for `rt` (float weights always run in numba)."""
    if rt.dense_engine != "auto":
        return rt.dense_engine
    return "numba" if rt.memory_limit is not None else "onnxruntime"


def kv_storage(rt: RuntimeConfig, one_graph: bool) -> str:
    """The KV cache's element type for `rt` when the decoder does (one_graph) or does not run as one
    onnxruntime graph. auto: f32 for the one graph, whose GroupQueryAttention over an f16 cache made a
    SmolLM2 decode token ~8% slower at past 128, 1 thread (onnxruntime 1.32 CPU, no f16 arithmetic on AVX2;
    ~3% from position 0, none measured at 2 threads: docs/BENCHMARKS.md, issue 7 session 6); f16 for
    numba's attention, which widens in-register at no cost.
    The cache's pages are touched as positions fill, so f32 costs RSS only for the positions used."""
    if rt.kv_dtype != "auto":
        return rt.kv_dtype
    return "f32" if one_graph else "f16"


def activation_policy(rt: RuntimeConfig, flags: frozenset[str] | None = None) -> str:
    """The activations policy for `rt` on a CPU with these instruction-set flags (None: this CPU's).
    auto: mixed where the CPU has AVX-512, int8 elsewhere. MatMulNBits' f32-input 4-bit kernel is the
    cost: on an AVX-512 VNNI EPYC f32 q|k|v added ~27 us a SmolLM2 layer (1 thread) and bought perplexity
    (int8 +0.77% over f16 on one 901-token window, mixed +0.18%); on an AVX2 EPYC it runs 3x slower than
    int8 (113 vs 38 us a 960 x 576 q4_1 matvec), SmolLM2 decode fell from 75.4 to 53.8 tok/s, and int8
    there was the closer of the two (+0.02% / -0.15% against mixed +0.16% / +0.26%; docs/BENCHMARKS.md,
    session 11). Where the flags are unknown (no /proc/cpuinfo, aarch64), int8: the path llama.cpp takes."""
    if rt.activations != "auto":
        return rt.activations
    return "mixed" if "avx512f" in (cpu_flags() if flags is None else flags) else "int8"


class RuntimeConfigError(FlashlmError):
    """A runtime setting out of range; the message names it."""

"""`flashlm info`: what a model folder holds and how much memory running it needs."""
from __future__ import annotations

import numpy as np

from .config import RuntimeConfig
from .builder import activation_bytes, compute_threads
from .memory import RUNTIME_OVERHEAD, plan_memory
from .modelfile import ModelFolder


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def model_info(folder: ModelFolder, *, ctx_len: int = 2048) -> dict:
    """Sizes by part and the resident-memory estimate of running everything in DRAM."""
    c = folder.config
    dense = {}
    for name, t in folder.dense.items():
        part = ("embeddings" if "embeddings" in name or name == "lm_head" else
                "attention" if ".attn." in name else
                "resident FFN parts" if ".ffn." in name and name.endswith(".weight") else "norms+biases")
        dense[part] = dense.get(part, 0) + t.nbytes
    b = folder.bundles
    ffn_bytes = c.n_layers * b.layer_bytes
    ctx = min(ctx_len, c.max_position)
    plan = plan_memory(folder, RuntimeConfig(ctx_len=ctx), activations=activation_bytes(folder, compute_threads(None)))
    kv = plan.kv_cache
    dense_total = sum(dense.values())
    resident = plan.total + RUNTIME_OVERHEAD
    n_params = sum(int(np.prod(t.shape)) for t in folder.dense.values() if t.storage is not None) \
        + c.n_layers * c.n_ff * c.bundle_elems
    return {
        "config": c.to_dict(),
        "dtype": folder.storage.name,
        "bytes": {"dense": dense, "ffn_bundles": ffn_bytes, "kv_cache": kv},
        "summary": {
            "model": str(folder.path),
            "architecture": f"{c.architecture} ({c.ffn_kind} FFN, {c.norm_kind} norm, {c.pos_kind} positions)",
            "parameters": f"{n_params / 1e6:,.1f} M",
            "layers": c.n_layers,
            "d_model / n_ff": f"{c.d_model} / {c.n_ff}",
            "heads (q / kv) x dim": f"{c.n_heads} / {c.n_kv_heads} x {c.head_dim}",
            "vocab": c.vocab_size,
            "context (trained)": c.max_position,
            "storage dtype": folder.storage.name,
            "dense bytes": f"{_mib(dense_total)} (" + ", ".join(f"{k} {_mib(v)}" for k, v in dense.items()) + ")",
            "FFN bundle bytes": f"{_mib(ffn_bytes)} ({c.n_ff} rows/layer, {b.row_bytes} B/row, "
                                f"stride {b.stride_bytes} B, aligned {b.alignment}; parts "
                                f"{'|'.join(p.name for p in b.parts)}"
                                + (f", {'+'.join(b.resident)} resident" if b.resident else "") + ")",
            f"KV cache @ {ctx} ctx": _mib(kv),
            "resident estimate": f"{_mib(resident)} (dense + all FFN + KV + activations {_mib(plan.activations)} "
                                 f"+ ~{_mib(RUNTIME_OVERHEAD)} runtime); --budget runs in less (flashlm run --budget)",
            "source": folder.manifest.get("source", {}).get("path", "?"),
        },
    }

"""GGUF files (llama.cpp's format) of the llama, qwen2, qwen3 and gemma3 architectures as a converter Source.

Tensors are read through gguf's memory map one at a time and dequantized to float32. GGUF stores
dims fastest-first (ne[0] = in_features), so the reader's numpy view is already [out, in]. For the
`llama` architecture only, llama.cpp's converter interleaves the Q/K rows of every head for its RoPE
kernel; `unpermute_qk` undoes that (qwen2/qwen3/gemma3 use NeoX-style RoPE, stored unpermuted).
What each architecture's metadata means beyond the shared keys is in `architecture_fields`.
The tokenizer lives in metadata, so `tokenizer.json` is rebuilt from it the way transformers'
GGUF loader builds its tokenizer (checked by tests against `AutoTokenizer(..., gguf_file=...)`).
"""
from __future__ import annotations

import os
import re

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from flashlm.converters.gguf_file import GGUFFile, check_model_metadata
from flashlm.converters.source import SUPPORTED_SOURCES, ConversionError, SourceInfo, expected_tensors
from flashlm.runtime import quant
from flashlm.runtime.config import ModelConfig

# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4

_GLOBAL_NAMES = {"token_embd.weight": "tok_embeddings", "output_norm.weight": "norm.weight", "output.weight": "lm_head"}
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "attn.q.weight", "attn_k.weight": "attn.k.weight", "attn_v.weight": "attn.v.weight",
    "attn_output.weight": "attn.o.weight", "attn_q.bias": "attn.q.bias", "attn_k.bias": "attn.k.bias",
    "attn_v.bias": "attn.v.bias", "attn_output.bias": "attn.o.bias",
    "ffn_gate.weight": "ffn.gate.weight", "ffn_up.weight": "ffn.up.weight", "ffn_down.weight": "ffn.down.weight",
    "attn_q_norm.weight": "attn.q_norm.weight", "attn_k_norm.weight": "attn.k_norm.weight",      # qwen3, gemma3
    "post_attention_norm.weight": "attn_post_norm.weight", "post_ffw_norm.weight": "ffn_post_norm.weight",  # gemma3
}
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
# Chat models end a turn with these rather than with the file's eos token.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
# llama.cpp's Gemma 3 constants for what older files do not state (llama-model.cpp, LLM_ARCH_GEMMA3).
GEMMA3_SWA_PATTERN = 6            # every 6th layer is global, the others slide
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # RoPE base of the sliding layers
GEMMA3_27B_LAYERS = 62            # Gemma 3 27B scales attention by 1/sqrt(d/heads) instead of 1/sqrt(head_dim)

# Pre-tokenizer split patterns, keyed by tokenizer.ggml.pre (same patterns as llama.cpp's llama-vocab).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_GPT2_PRES = ("default", "gpt2", "smollm")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation: HF rotate-half rows -> interleaved RoPE rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`: within each head, row 2i+j (interleaved) goes back to row j*hd/2 + i."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def canonical_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


class GGUFSource:
    def __init__(self, path):
        self.path = os.fspath(path)
        # Structure, hyperparameters and tokenizer arrays are checked before anything uses them.
        self._reader = GGUFFile(self.path)
        self.arch = arch = self._meta("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ConversionError(f"{self.path}: GGUF architecture {arch!r} is not supported; supported: "
                                  + "; ".join(SUPPORTED_SOURCES))
        check_model_metadata(self._reader)
        self._tensors = self._index_tensors()
        self.config = self._read_config()
        self._check_shapes()
        self.info = self._read_info()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(int(n) for n in reversed(t.shape)) for name, t in self._tensors.items()}

    def load(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ConversionError(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, "
                                  f"which cannot be dequantized ({e})") from e
        if np.may_share_memory(w, t.data):   # F32 comes back as a view into the memory map
            w = w.copy()
        w = w.astype(np.float32, copy=False).reshape(tuple(reversed(t.shape.tolist())))
        # (gemma3's norm weights need no change: llama.cpp's converter already stored the multiplier 1 + w)
        if self.arch == "llama":
            if name.endswith((".attn.q.weight", ".attn.q.bias")):
                w = unpermute_qk(w, self.config.n_heads)
            elif name.endswith((".attn.k.weight", ".attn.k.bias")):
                w = unpermute_qk(w, self.config.n_kv_heads)
        return w

    def quantized_storage(self, name: str) -> str | None:
        """The dense storage type tensor `name` repacks into without loss (runtime/quant.py), or None."""
        t = self._tensors[name]
        target = quant.gguf_target(t.tensor_type)
        if target is None or len(t.shape) != 2:
            return None
        return quant.format_of(self.load_quantized(name, rows=1)).name

    def load_quantized(self, name: str, rows: int | None = None) -> "quant.QTensor":
        """A quantized 2-D tensor's blocks repacked exactly (Q/K rows un-permuted like `load`).
        rows: only the first few rows (to learn the layout without decoding the tensor)."""
        t = self._tensors[name]
        n, k = (int(v) for v in reversed(t.shape.tolist()))
        raw = np.asarray(t.data).view(np.uint8).reshape(n, -1)
        if rows is not None:
            return quant.from_gguf(raw[:rows], t.tensor_type, (rows, k))
        try:
            qt = quant.from_gguf(raw, t.tensor_type, (n, k))
        except quant.QuantError as e:
            raise ConversionError(f"{self.path}: tensor {t.name}: {e}") from e
        heads = {".attn.q.weight": self.config.n_heads, ".attn.k.weight": self.config.n_kv_heads}
        for suffix, n_head in (heads.items() if self.arch == "llama" else ()):   # as `load` does
            if name.endswith(suffix):
                qt = quant.permute_rows(qt, unpermute_qk(np.arange(n), n_head))
        return qt

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._tensors, self._reader = {}, None

    # --- metadata -----------------------------------------------------------------------------
    def _meta(self, key: str, default=None):
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _require(self, key: str):
        value = self._meta(key)
        if value is None:
            raise ConversionError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return value

    def _index_tensors(self) -> dict:
        size = os.path.getsize(self.path)
        tensors = {}
        for t in self._reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ConversionError(f"{self.path}: truncated or corrupt GGUF file "
                                      f"(tensor {t.name} ends past the end of the file)")
            if t.name == "rope_freqs.weight":
                raise ConversionError(f"{self.path}: has a rope_freqs tensor (Llama 3.1 'llama3' rope scaling); "
                                      "llama3 rope scaling from GGUF is not supported yet")
            name = canonical_name(t.name)
            if name is None:
                raise ConversionError(f"{self.path}: unexpected tensor {t.name!r} for a {self.arch} model")
            tensors[name] = t
        return tensors

    def _read_config(self) -> ModelConfig:
        a = self.arch
        if self._meta(f"{a}.expert_count", 0):
            raise ConversionError(f"{self.path}: mixture-of-experts GGUFs (Mixtral, Qwen MoE) are not supported")
        d = int(self._require(f"{a}.embedding_length"))
        n_heads = int(self._require(f"{a}.attention.head_count"))
        n_kv = int(self._meta(f"{a}.attention.head_count_kv", n_heads))
        head_dim = int(self._meta(f"{a}.attention.key_length", d // n_heads))
        rope_dim = int(self._meta(f"{a}.rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise ConversionError(f"{self.path}: partial RoPE (rope.dimension_count {rope_dim} != head_dim "
                                  f"{head_dim}) is not supported")
        value_dim = int(self._meta(f"{a}.attention.value_length", head_dim))
        if value_dim != head_dim:
            raise ConversionError(f"{self.path}: attention.value_length {value_dim} != key_length {head_dim} "
                                  "is not supported")
        embd = self._tensors.get("tok_embeddings")
        vocab = int(embd.shape[1]) if embd is not None else len(self._meta("tokenizer.ggml.tokens", []))
        fields = dict(
            architecture="llama", vocab_size=vocab, d_model=d, n_layers=int(self._require(f"{a}.block_count")),
            n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, n_ff=int(self._require(f"{a}.feed_forward_length")),
            ffn_kind="swiglu", norm_kind="rms", norm_eps=float(self._require(f"{a}.attention.layer_norm_rms_epsilon")),
            pos_kind="rope", max_position=int(self._require(f"{a}.context_length")),
            rope_theta=float(self._meta(f"{a}.rope.freq_base", 10000.0)), rope_scaling=self._rope_scaling(),
            tied_embeddings="lm_head" not in self._tensors,
            attn_qkv_bias="layers.0.attn.q.bias" in self._tensors,
            attn_out_bias="layers.0.attn.o.bias" in self._tensors,
            bos_token_id=self._meta("tokenizer.ggml.bos_token_id"), eos_token_ids=self._eos_ids())
        fields.update(self.architecture_fields(fields))
        try:
            return ModelConfig(**fields)
        except ValueError as e:   # ModelConfig's own consistency checks (e.g. heads vs kv heads)
            raise ConversionError(f"{self.path}: {e}") from e

    # --- what each architecture adds to the shared keys ----------------------------------------
    def architecture_fields(self, shared: dict) -> dict:
        """ModelConfig fields particular to this file's architecture (the shared ones are in `shared`)."""
        if self.arch == "qwen3":
            return {"qk_norm": True}
        if self.arch == "gemma3":
            return self._gemma3_fields(shared)
        return {}   # llama, qwen2 (its q/k/v biases are found among the tensors)

    def _gemma3_fields(self, shared: dict) -> dict:
        a, n_layers, d = self.arch, shared["n_layers"], shared["d_model"]
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if self._meta(f"{a}.{key}"):
                raise ConversionError(f"{self.path}: {a}.{key} (logit soft-capping) is not supported")
        window = int(self._meta(f"{a}.attention.sliding_window", 0))
        pattern = self._meta(f"{a}.attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
        if window <= 0:                    # llama.cpp: no window stated, every layer global
            sliding = []
        elif isinstance(pattern, list):    # one flag per layer, true = sliding
            if len(pattern) != n_layers:
                raise ConversionError(f"{self.path}: {a}.attention.sliding_window_pattern has {len(pattern)} "
                                      f"entries for {n_layers} layers")
            sliding = [i for i, slides in enumerate(pattern) if slides]
        else:                              # every pattern-th layer is global (llama.cpp's set_swa_pattern)
            sliding = [i for i in range(n_layers) if int(pattern) <= 0 or (i + 1) % int(pattern) != 0]
        heads = shared["n_heads"]
        query_scalar = d // heads if n_layers == GEMMA3_27B_LAYERS else shared["head_dim"]
        scale = self._meta(f"{a}.attention.scale")
        return dict(
            architecture="gemma3", ffn_kind="geglu", qk_norm=True, sandwich_norm=True, embed_scale=d ** 0.5,
            attn_scale=float(scale) if scale else query_scalar ** -0.5,
            sliding_window=window if sliding else None, sliding_layers=sliding,
            rope_local_theta=float(self._meta(f"{a}.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)))

    def _rope_scaling(self) -> dict | None:
        a = self.arch
        kind = self._meta(f"{a}.rope.scaling.type")
        factor = self._meta(f"{a}.rope.scaling.factor")
        if kind is None and self._meta(f"{a}.rope.scale_linear") is not None:  # older files
            kind, factor = "linear", self._meta(f"{a}.rope.scale_linear")
        if kind in (None, "none"):
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        raise ConversionError(f"{self.path}: rope scaling type {kind!r} is not supported")

    def _eos_ids(self) -> list[int]:
        eos = self._meta("tokenizer.ggml.eos_token_id")
        ids = [] if eos is None else [int(eos)]
        tokens, types = self._meta("tokenizer.ggml.tokens", []), self._meta("tokenizer.ggml.token_type", [])
        template = self._meta("tokenizer.chat_template") or ""
        for i, (tok, kind) in enumerate(zip(tokens, types)):
            if tok in _END_OF_TURN and kind == CONTROL and tok in template and i not in ids:
                ids.append(i)
        return ids

    def _check_shapes(self) -> None:
        got, want = self.shapes(), expected_tensors(self.config)
        for name, shape in want.items():
            if name not in got:
                raise ConversionError(f"{self.path}: tensor {name!r} is missing")
            if got[name] != shape:
                raise ConversionError(f"{self.path}: tensor {name!r} has shape {got[name]}, expected {shape}")
        extra = sorted(set(got) - set(want))
        if extra:
            raise ConversionError(f"{self.path}: unexpected tensors {extra} for this config")

    def _read_info(self) -> SourceInfo:
        tokens = self._meta("tokenizer.ggml.tokens", [])
        special = {}
        for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
            i = self._meta(f"tokenizer.ggml.{key}_token_id")
            if i is not None and i < len(tokens):
                special[name] = tokens[i]
        try:
            tokenizer_json = self._tokenizer_json() if tokens else None
        except Exception as e:   # noqa: BLE001 - the tokenizers library raises plain Exceptions on bad vocabularies
            if isinstance(e, ConversionError):
                raise
            raise ConversionError(f"{self.path}: the tokenizer metadata is invalid ({type(e).__name__}: {e})") from None
        return SourceInfo(
            tokenizer_json=tokenizer_json,
            chat_template=self._meta("tokenizer.chat_template"),
            generation_config={"bos_token_id": self.config.bos_token_id, "eos_token_id": list(self.config.eos_token_ids)},
            special_tokens=special,
            description={"format": "gguf", "path": self.path, "bytes": os.path.getsize(self.path),
                         "file_type": self._meta("general.file_type"), "name": self._meta("general.name")})

    # --- tokenizer ----------------------------------------------------------------------------
    def _tokenizer_json(self) -> str:
        kind = self._meta("tokenizer.ggml.model")
        tokens = self._meta("tokenizer.ggml.tokens")
        types = self._meta("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = self._meta("tokenizer.ggml.merges")
        if kind == "gpt2":
            tok = _byte_level_bpe(tokens, types, merges or [], self._meta("tokenizer.ggml.pre", "default"), self.path)
            add_bos_default = False
        elif kind == "llama" and self.arch == "gemma3":
            tok = _gemma_sentencepiece(tokens, merges)
            add_bos_default = True
        elif kind == "llama":
            if merges is None:
                merges = _merges_from_scores(tokens, self._require("tokenizer.ggml.scores"))
            tok = _sentencepiece_bpe(tokens, merges, self._meta("tokenizer.ggml.add_space_prefix", True))
            add_bos_default = True   # llama.cpp adds BOS to sentencepiece vocabularies unless told otherwise
        else:
            raise ConversionError(f"{self.path}: tokenizer.ggml.model {kind!r} is not supported (gpt2, llama)")
        # llama.cpp matches control, unknown and user-defined tokens whole in the input text.
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)])
        # ... but only as the ids the vocabulary gives them: a spelling it lacks (Gemma's "  " tokens, looked up
        # as "▁▁") would become a new id past the model's vocabulary.
        vocab = tok.get_vocab(with_added_tokens=False)
        tok.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])
        tok.post_processor = self._post_processor(tokens, add_bos_default)
        return tok.to_str()

    def _post_processor(self, tokens, add_bos_default: bool):
        single, specials = "$A:0", []
        for key, default, fmt in (("bos", add_bos_default, "{} $A:0"), ("eos", False, "$A:0 {}")):
            i = self._meta(f"tokenizer.ggml.{key}_token_id")
            if self._meta(f"tokenizer.ggml.add_{key}_token", default) and i is not None:
                single = single.replace("$A:0", fmt.format(f"{tokens[i]}:0"))
                specials.append((tokens[i], int(i)))
        pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
        return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest move to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def _byte_level_bpe(tokens, types, merges, pre: str, path: str) -> Tokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Regular tokens are stored in the byte alphabet already; respell any that are not (as transformers does).
    # Control/user-defined tokens keep their literal text: they are matched whole as added tokens, and a
    # respelled key would make the added token a new id past the model's vocabulary.
    vocab = {t if k != NORMAL or set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
             for i, (t, k) in enumerate(zip(tokens, types))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _GPT2_PRES:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        # SmolLM splits every digit apart first (its HF tokenizer.json and llama.cpp both do); its vocabulary
        # has no multi-digit tokens, so this tokenizes the same as transformers' plain GPT-2 split.
        tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if pre == "smollm" else byte_level)
    else:
        raise ConversionError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                              + ", ".join(sorted([*_GPT2_PRES, *_SPLITS])))
    tok.decoder = decoders.ByteLevel()
    return tok


def _merges_from_scores(tokens, scores) -> list[tuple[str, str]]:
    """Sentencepiece files carry scores, not merges: every split of a token into two vocabulary pieces
    is a merge, ranked by the token's score, then longer left/right piece first (transformers' order)."""
    vocab = set(tokens)
    found = [(tok[:k], tok[k:], score) for tok, score in dict(zip(tokens, scores)).items()
             for k in range(1, len(tok)) if tok[:k] in vocab and tok[k:] in vocab]
    found.sort(key=lambda m: (-m[2], -len(m[0]), -len(m[1])))
    return [(left, right) for left, right, _ in found]


def _gemma_sentencepiece(tokens, merges) -> Tokenizer:
    """Gemma's sentencepiece vocabulary, built as transformers' GGUF loader builds it (GemmaTokenizer):
    whitespace-only tokens of several spaces are stored as spaces but looked up as "▁▁..."; the file has
    no merges and its scores do not follow the merge order, its token order does; spaces become "▁" with
    no prefix space and no splitting, unknown bytes fall back to <0xXX> tokens."""
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    if merges is None:
        merges = _merges_from_scores(tokens, [-float(i) for i in range(len(tokens))])
    elif isinstance(merges[0], str):
        merges = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _sentencepiece_bpe(tokens, merges, add_space_prefix: bool) -> Tokenizer:
    if merges and isinstance(merges[0], str):
        merges = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if add_space_prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tok

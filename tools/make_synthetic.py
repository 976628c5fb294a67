"""A synthetic ReLU model shaped like a 7B-class model, written as a flashlm folder without a checkpoint.

    python tools/make_synthetic.py OUT.flashlm [--d-model 2560] [--layers 32] [--n-ff 10240] [--heads 20]
        [--vocab 32000] [--max-position 2048] [--seed 0] [--active-fraction 0.05] [--predictor-rank 128]
        [--hot-fraction 0.05] [--hot-activity 0.5] [--noise 0.05] [--dtype f16] [--bundle-dtype q4_0] [--force]

`SyntheticReluSource` implements the converters.source.Source protocol for architecture "opt" (pre-norm
LayerNorm, learned positions with offset 2, biases everywhere, ReLU FFN with up/down), so the model runs
on the existing OPT forward path. Every tensor is generated when `load(name)` is called, from a random
generator seeded by (seed, sha256(key)) where key is the tensor name or a named ingredient (for example
"layers.3.ffn.up.U"): the same recipe gives the same bytes on any machine, and the model is never held
in memory whole.

How the weights are built (d = d_model, F = n_ff, r = predictor_rank, eps = noise)
-------------------------------------------------------------------------------------
The goal is a model on which "LLM in a flash" has something real to find: ~95 % of FFN neurons inactive
on every token of every layer, a skewed activation frequency (hot neurons worth pinning), and
pre-activations that a rank-r predictor can learn.

* FFN input. Each FFN sees h = LayerNorm(x) with LayerNorm weight 1 and bias 0, so every token's h has
  zero mean and unit variance across its d coordinates (|h| = sqrt(d)). Nothing in the model is aligned
  with any layer's up-projection, so h is "generic" with respect to it.

* Up projection, low rank plus noise. V_l (r x d) has orthonormal rows (QR of a Gaussian matrix),
  U_l (F x r) is Gaussian, N_l (F x d) is Gaussian. Row i of W_up is
      W_i = sqrt(1 - eps^2) * (U_i V_l) / |U_i V_l|  +  eps * N_i / |N_i|,   then rescaled to |W_i| = 1.
  With unit-norm rows and generic h, u_i = W_i . h is ~N(0, 1) for every token; a fraction 1 - eps^2
  (99.75 % at eps = 0.05) of its variance is a function of the r numbers V_l h, so a rank-r linear
  predictor h -> u can learn the pre-activations; the noise keeps W_up full rank, so the predictor
  is not exact near the threshold.

* Up bias = minus a per-neuron threshold z_i: neuron i fires when u_i > z_i, which with u_i ~ N(0, 1)
  happens with probability p_i = 1 - Phi(z_i). A random `hot_fraction` of the neurons (hot) and the rest
  (cold) each draw z_i = c_g + s * g_i, g_i ~ N(0, 1), spread s = 0.3 (so frequencies form a continuum
  inside each group). Averaged over the group, P(u > c + s g) = P(u - s g > c) = 1 - Phi(c / sqrt(1 + s^2)),
  so c_g = sqrt(1 + s^2) * Phi^-1(1 - q_g) sets the group's mean activation probability q_g exactly:
      q_hot  = hot_activity (0.5)
      q_cold = (active_fraction - hot_fraction * q_hot) / (1 - hot_fraction)   (0.0263 for the defaults)
  so the mean over all neurons is `active_fraction` (5 %: 95 % of neurons inactive per token) and hot
  neurons fire ~19x more often than cold ones. Phi^-1 is a bisection on math.erf (no scipy).
  `neuron_stats(layer)` returns z, p and the hot mask: the ground truth for tests and benchmarks.

* Down projection, centred. W_down (d x F) is Gaussian with std
      sigma = ffn_scale / sqrt(sum_i Var[a_i]),   a_i = ReLU(u_i - z_i),  ffn_scale = 0.3,
  using the closed forms for u ~ N(0, 1): E[a] = phi(z) - z (1 - Phi(z)), E[a^2] = (1 + z^2)(1 - Phi(z)) - z phi(z).
  Each output coordinate of the FFN then has std ~0.3 against a residual of std >= 1 (the embeddings).
  The down bias is -W_down E[a], which makes the FFN output zero-mean over tokens: without it the
  always-positive activations would add the same vector to every token in every layer, a shared
  offset that shifts every later layer's pre-activations away from N(0, 1).

* Attention. Q, K, V, O weights N(0, (0.5 / sqrt(d))^2), biases 0: small, near-uniform attention that
  keeps the residual stream well-conditioned over the layers (its per-coordinate variance grows roughly
  as 1 + 0.1 * layer, and the LayerNorm in front of each FFN removes the growth).

* Embeddings N(0, 1); learned positions N(0, 0.1^2) with OPT's offset 2; final LayerNorm weight 1 bias 0;
  a separate lm_head N(0, 1/d) so the logits have std ~1 (tied N(0, 1) embeddings would give logits of
  std sqrt(d) that always echo the input token).

* Tokenizer. vocab >= 257: byte-level BPE without merges, ids 0..255 are the 256 bytes (so any text
  encodes) and ids 256.. are filler words " t256", " t257", ... that the model can sample and decode.
  Smaller vocabularies: WordLevel "<unk>", "t1" .. "t{vocab-1}" with a whitespace pre-tokenizer.
  No chat template, no special tokens, no EOS: `flashlm run` generates raw completions.

Sizes for the defaults (f16): FFN 3.36 GB of weights (4.03 GB on disk: 10 KiB bundle rows padded to
12 KiB so each row is 3 whole 4 KiB blocks), attention 1.68 GB, embeddings + lm_head 0.33 GB.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashlm.converters.source import SourceInfo, expected_tensors, is_ffn_bundle_tensor  # noqa: E402
from flashlm.converters.writer import bundle_stride, write_model  # noqa: E402
from flashlm.runtime.storage import BUNDLE_STORAGE, STORAGE_TYPES  # noqa: E402
from flashlm.runtime.config import ModelConfig  # noqa: E402

THRESHOLD_SPREAD = 0.3     # s: std of the per-neuron threshold inside the hot and the cold group
FFN_SCALE = 0.3            # per-coordinate std of the FFN output (the residual starts at std 1)
ATTN_SCALE = 0.5           # attention weights ~ N(0, (ATTN_SCALE / sqrt(d))^2)
POS_STD = 0.1


# --- the normal distribution without scipy ---------------------------------------------------------------------

def normal_cdf(z):
    """Phi(z), elementwise for arrays."""
    z = np.asarray(z, dtype=np.float64)
    return 0.5 * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(z / math.sqrt(2.0)))


def normal_pdf(z):
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def normal_quantile(p: float) -> float:
    """Phi^-1(p) by bisection on math.erf (to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile of {p} is undefined")
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return 0.5 * (lo + hi)


def relu_moments(z):
    """E[a], E[a^2] for a = ReLU(u - z), u ~ N(0, 1)."""
    z = np.asarray(z, dtype=np.float64)
    tail, pdf = 1.0 - normal_cdf(z), normal_pdf(z)
    return pdf - z * tail, (1.0 + z * z) * tail - z * pdf


# --- the source -------------------------------------------------------------------------------------------------

def _byte_level_tokenizer(vocab: int) -> str:
    """Byte-level BPE with no merges: id b < 256 is byte b, ids 256.. filler words ' t256', ' t257', ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    # GPT-2's byte -> printable character map, so that token id b is byte b
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    extra = iter(range(256, 512))
    alphabet = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    space = "\u0120"                                               # byte-level stand-in for " "
    tokens = alphabet + [f"{space}t{i}" for i in range(256, vocab)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def _word_level_tokenizer(vocab: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok.to_str()


class SyntheticReluSource:
    """Source protocol: a deterministic synthetic OPT-style ReLU model (see the module docstring)."""

    def __init__(self, d_model: int = 2560, n_layers: int = 32, n_ff: int = 10240, n_heads: int = 20,
                 vocab: int = 32000, max_position: int = 2048, seed: int = 0, active_fraction: float = 0.05,
                 predictor_rank: int = 128, hot_fraction: float = 0.05, *, hot_activity: float = 0.5,
                 noise: float = 0.05):
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        if not 0 < predictor_rank <= d_model:
            raise ValueError(f"predictor_rank {predictor_rank} must be in 1..d_model")
        if not 0.0 < active_fraction < 1.0 or not 0.0 <= hot_fraction < 1.0 or not 0.0 < hot_activity < 1.0:
            raise ValueError("active_fraction, hot_activity must be in (0, 1) and hot_fraction in [0, 1)")
        if hot_fraction * hot_activity >= active_fraction:
            raise ValueError(f"hot neurons alone ({hot_fraction} x {hot_activity}) would exceed "
                             f"active_fraction {active_fraction}; lower --hot-fraction or --hot-activity")
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise {noise} must be in [0, 1)")
        self.recipe = dict(d_model=d_model, n_layers=n_layers, n_ff=n_ff, n_heads=n_heads, vocab=vocab,
                           max_position=max_position, seed=seed, active_fraction=active_fraction,
                           predictor_rank=predictor_rank, hot_fraction=hot_fraction, hot_activity=hot_activity,
                           noise=noise, threshold_spread=THRESHOLD_SPREAD, ffn_scale=FFN_SCALE,
                           attn_scale=ATTN_SCALE, pos_std=POS_STD)
        self.seed, self.rank, self.noise = seed, predictor_rank, noise
        self.n_hot = int(round(hot_fraction * n_ff))
        self.q_hot = hot_activity if self.n_hot else 0.0
        self.q_cold = (active_fraction * n_ff - self.n_hot * self.q_hot) / (n_ff - self.n_hot)
        self.config = ModelConfig(
            architecture="opt", vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=n_heads, head_dim=d_model // n_heads, n_ff=n_ff, ffn_kind="relu", norm_kind="layer",
            norm_eps=1e-5, pos_kind="learned", max_position=max_position, pos_offset=2, tied_embeddings=False,
            attn_qkv_bias=True, attn_out_bias=True, ffn_bias=True)
        self.info = SourceInfo(
            tokenizer_json=_byte_level_tokenizer(vocab) if vocab >= 257 else _word_level_tokenizer(vocab),
            chat_template=None, generation_config={}, special_tokens={},
            description={"format": "synthetic", "path": f"synthetic (tools/make_synthetic.py, seed {seed})",
                         "generator": "tools/make_synthetic.py", "recipe": self.recipe,
                         "mean_activation": {"hot": self.q_hot, "cold": self.q_cold, "n_hot": self.n_hot}})
        self._shapes = expected_tensors(self.config)
        self._stats_cache: dict[int, dict] = {}

    # -- Source protocol

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def close(self) -> None:
        self._stats_cache.clear()

    def load(self, name: str) -> np.ndarray:
        if name not in self._shapes:
            raise KeyError(f"synthetic model has no tensor {name!r}")
        shape = self._shapes[name]
        d = self.config.d_model
        if name.startswith("layers."):
            layer = int(name.split(".")[1])
            if name.endswith("ffn.up.weight"):
                return self._up_weight(layer)
            if name.endswith("ffn.up.bias"):
                return (-self.neuron_stats(layer)["z"]).astype(np.float32)
            if name.endswith("ffn.down.weight"):
                return self._down_weight(layer)
            if name.endswith("ffn.down.bias"):
                mean_a = relu_moments(self.neuron_stats(layer)["z"])[0]
                return -(self._down_weight(layer) @ mean_a.astype(np.float32))
            if ".attn." in name and name.endswith(".weight"):
                return self._normal(name, shape, ATTN_SCALE / math.sqrt(d))
        if name == "tok_embeddings":
            return self._normal(name, shape, 1.0)
        if name == "pos_embeddings":
            return self._normal(name, shape, POS_STD)
        if name == "lm_head":
            return self._normal(name, shape, 1.0 / math.sqrt(d))
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        if name.endswith(".bias"):                      # norms and attention
            return np.zeros(shape, np.float32)
        raise AssertionError(f"no recipe for {name}")

    # -- ingredients

    def _rng(self, key: str) -> np.random.Generator:
        digest = hashlib.sha256(key.encode()).digest()
        words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
        return np.random.default_rng(np.random.SeedSequence([self.seed, *words]))

    def _normal(self, key: str, shape, std: float) -> np.ndarray:
        x = self._rng(key).standard_normal(shape, dtype=np.float32)
        x *= np.float32(std)
        return x

    def neuron_stats(self, layer: int) -> dict:
        """Per neuron of `layer`: threshold z (up bias = -z), activation probability p = 1 - Phi(z)
        for u ~ N(0, 1), and the hot mask."""
        if layer not in self._stats_cache:
            F, s = self.config.n_ff, THRESHOLD_SPREAD
            rng = self._rng(f"layers.{layer}.ffn.thresholds")
            hot = np.zeros(F, bool)
            hot[rng.permutation(F)[:self.n_hot]] = True
            c_cold = math.sqrt(1 + s * s) * normal_quantile(1.0 - self.q_cold)
            c_hot = math.sqrt(1 + s * s) * normal_quantile(1.0 - self.q_hot) if self.n_hot else 0.0
            z = np.where(hot, c_hot, c_cold) + s * rng.standard_normal(F)
            self._stats_cache = {layer: {"z": z, "p": 1.0 - normal_cdf(z), "hot": hot}}   # one layer at a time
        return self._stats_cache[layer]

    def _up_weight(self, layer: int) -> np.ndarray:
        c, r, eps = self.config, self.rank, self.noise
        p = f"layers.{layer}.ffn.up."
        q, _ = np.linalg.qr(self._rng(p + "V").standard_normal((c.d_model, r)))   # [d, r] orthonormal columns
        low = self._rng(p + "U").standard_normal((c.n_ff, r)).astype(np.float32) @ q.T.astype(np.float32)
        low /= np.linalg.norm(low, axis=1, keepdims=True)
        low *= np.float32(math.sqrt(1.0 - eps * eps))
        if eps > 0:
            n = self._rng(p + "noise").standard_normal((c.n_ff, c.d_model), dtype=np.float32)
            n *= np.float32(eps) / np.linalg.norm(n, axis=1, keepdims=True)
            low += n
            del n
        low /= np.linalg.norm(low, axis=1, keepdims=True)
        return low

    def _down_weight(self, layer: int) -> np.ndarray:
        mean_a, mean_a2 = relu_moments(self.neuron_stats(layer)["z"])
        sigma = FFN_SCALE / math.sqrt(float(np.sum(mean_a2 - mean_a ** 2)))
        return self._normal(f"layers.{layer}.ffn.down.weight", self._shapes[f"layers.{layer}.ffn.down.weight"], sigma)


# --- CLI --------------------------------------------------------------------------------------------------------

def model_bytes(source: SyntheticReluSource, dtype: str = "f16", bundle_dtype: str | None = None) -> int:
    """Bytes the written folder's two safetensors files will take (weights + bundle padding)."""
    st = STORAGE_TYPES[dtype]
    bundle = bundle_dtype or dtype
    bst = STORAGE_TYPES[BUNDLE_STORAGE.get(bundle, bundle)]
    c = source.config
    dense = sum(st.nbytes(s) if len(s) == 2 else 4 * int(np.prod(s)) for n, s in source.shapes().items()
                if not is_ffn_bundle_tensor(n))
    return dense + c.n_layers * c.n_ff * bundle_stride(bst.row_bytes(c.bundle_elems))


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write a synthetic sparse ReLU (OPT-style) model as a flashlm folder.")
    ap.add_argument("output", help="destination folder, e.g. synth-2560.flashlm")
    ap.add_argument("--d-model", type=int, default=2560)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--n-ff", type=int, default=10240)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--max-position", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--active-fraction", type=float, default=0.05, help="mean fraction of neurons active per token")
    ap.add_argument("--predictor-rank", type=int, default=128, help="rank of the up-projection's structured part")
    ap.add_argument("--hot-fraction", type=float, default=0.05, help="fraction of neurons that are hot")
    ap.add_argument("--hot-activity", type=float, default=0.5, help="mean activation probability of a hot neuron")
    ap.add_argument("--noise", type=float, default=0.05, help="full-rank share of each up row's norm")
    ap.add_argument("--dtype", choices=sorted(n for n in STORAGE_TYPES if not n.endswith(".lanes")), default="f16")
    ap.add_argument("--bundle-dtype", choices=["f16", "f32", *sorted(BUNDLE_STORAGE)], default=None,
                    help="storage type of the FFN bundle rows (default: as --dtype)")
    ap.add_argument("--force", action="store_true", help="replace an existing output folder")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    out = Path(args.output)
    try:
        source = SyntheticReluSource(
            d_model=args.d_model, n_layers=args.layers, n_ff=args.n_ff, n_heads=args.heads, vocab=args.vocab,
            max_position=args.max_position, seed=args.seed, active_fraction=args.active_fraction,
            predictor_rank=args.predictor_rank, hot_fraction=args.hot_fraction, hot_activity=args.hot_activity,
            noise=args.noise)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out.exists() and not args.force:
        print(f"error: {out} already exists (use --force to replace it)", file=sys.stderr)
        return 1
    need = model_bytes(source, args.dtype, args.bundle_dtype)
    probe = out.resolve().parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < 2 * need:
        print(f"error: the model needs {need / 1e9:.2f} GB and {probe} has {free / 1e9:.2f} GB free; "
              f"refusing with less than 2x ({2 * need / 1e9:.2f} GB) free", file=sys.stderr)
        return 1
    print(f"writing {out}: d_model {args.d_model}, {args.layers} layers, n_ff {args.n_ff}, "
          f"{args.dtype}" + (f", bundles {args.bundle_dtype}" if args.bundle_dtype else "")
          + f", ~{need / 1e9:.2f} GB", file=sys.stderr)
    t0 = time.perf_counter()
    write_model(source, out, dtype=args.dtype, bundle_dtype=args.bundle_dtype, force=args.force,
                progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    size = _folder_bytes(out)
    files = ", ".join(f"{p.name} {p.stat().st_size / 1e9:.2f} GB" for p in sorted(out.glob("*.safetensors")))
    print(f"wrote {out} in {seconds:.1f} s: {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB; {files})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

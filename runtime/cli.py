"""`flashlm` command line: convert, info, run, chat, serve, calibrate, ppl, bench.

Only this module prints; stdout carries generated text only, everything else (progress, logs, stats)
goes to stderr so output can be piped. The project's own errors (FlashlmError) become one line;
anything else is a bug and keeps its traceback (with -v, every error shows its traceback)."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

from .errors import FlashlmError

log = logging.getLogger("flashlm")
DESCRIPTION = "On-device LLM inference that streams sparse FFN neurons from flash (LLM in a flash)."


class InputError(FlashlmError):
    """A command-line argument that cannot be used (an unreadable file, conflicting flags)."""


def _read_text(path) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e.strerror if isinstance(e, OSError) else e})") from None


def _err(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported on one line (usage is one `--help` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- argument types: out-of-range values are refused before anything loads -------------------------
def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} is below the minimum {low}")
        return v
    parse.__name__ = f"integer >= {low}"
    return parse


def _int_in(low: int, high: int):
    at_least = _int_at_least(low)

    def parse(text: str) -> int:
        v = at_least(text)
        if v > high:
            raise argparse.ArgumentTypeError(f"{v} is above the maximum {high}")
        return v
    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


def _float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    span = f"{lo}{low:g}, {high:g}{hi}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)):
            raise argparse.ArgumentTypeError(f"{text} is outside {span}")
        return v
    parse.__name__ = f"number in {span}"
    return parse


def _budget(text: str) -> str:
    from .memory import parse_size
    try:
        parse_size(text, 1 << 30)          # syntax and range; the real total is known only at load
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty")
    return text


_POSITIVE = _int_at_least(1)
_NON_NEGATIVE = _int_at_least(0)
_FRACTION = _float_in(0.0, 1.0)


# --- shared flags ----------------------------------------------------------------------------------
def _add_runtime_flags(p: argparse.ArgumentParser, *, stats: bool = True, mode_list: bool = False) -> None:
    p.add_argument("-c", "--ctx", type=_POSITIVE, default=2048, help="context length (KV cache tokens)")
    p.add_argument("-t", "--threads", type=_POSITIVE, default=None, help="compute threads (default: all cores)")
    from .memory import MODES
    modes = "; ".join(f"{m.name}: {m.description}" for m in MODES.values())
    if mode_list:
        p.add_argument("--mode", default=None, help=f"comma list of run modes ({modes}; "
                       "default: flash when --budget is given, else dense)")
    else:
        p.add_argument("--mode", default=None, choices=list(MODES),
                       help=f"where FFN rows live ({modes}; default: flash when --budget is given, else dense)")
    p.add_argument("--budget", type=_budget, default=None,
                   help="memory for the model's weights, caches and buffers (the runtime not counted): 60%%, 0.6, 512MiB, 2GB")
    p.add_argument("--memory-limit", type=_budget, default=None, metavar="SIZE",
                   help="the whole process (runtime measured at start, weights, caches, KV, buffers), as a device "
                        "or cgroup enforces it: 700MiB, 2GB, 5%% of RAM; refused before loading if it cannot fit")
    p.add_argument("--dense-engine", default="auto", choices=["auto", "onnxruntime", "numba"],
                   help="quantized dense weights: onnxruntime (fast, ~1.5x their bytes resident, more while building), numba (from the "
                        "stored rows) or auto (numba under --memory-limit)")
    p.add_argument("--ort-spin-us", type=_NON_NEGATIVE, default=100, metavar="US",
                   help="onnxruntime dense weights with several threads: split every matvec across them, idle workers "
                        "spinning this many microseconds before sleeping, within a run (0: no spinning, layers on one thread; 10 on a busy machine)")
    p.add_argument("--ort-graph", default="auto", choices=["auto", "whole", "layers"],
                   help="onnxruntime dense weights with every FFN resident: whole (the decoder in a few graphs, attention "
                        "included: a few run() per token), layers (a graph between numba attention calls), auto (whole "
                        "where the model allows it)")
    p.add_argument("--embeddings", default="auto", choices=["auto", "resident", "flash"],
                   help="token embeddings resident or one row read from the file per token "
                        "(auto: from the file under --budget or --memory-limit)")
    p.add_argument("--window", type=_POSITIVE, default=None, help="sliding window in tokens (default: largest that fits)")
    p.add_argument("--pin", type=_FRACTION, default=0.0, help="fraction of each layer's hottest neurons kept resident")
    p.add_argument("--io", default="direct", choices=["direct", "buffered"], help="flash reads: O_DIRECT or page cache")
    p.add_argument("--io-threads", type=_POSITIVE, default=4, help="reader threads")
    p.add_argument("--io-submit", default="auto", choices=["auto", "aio", "pread"],
                   help="flash reads: batches through Linux native AIO, one pread per read, or aio where it works")
    p.add_argument("--max-gap", type=_NON_NEGATIVE, default=0, help="coalesce reads across gaps up to this many bytes")
    p.add_argument("--layer-io", default="auto", choices=["auto", "sparse", "stream"],
                   help="flash mode: per layer, sparse reads, streaming the layer, or the cheaper (measured)")
    p.add_argument("--profile", default=None, help="device profile: devices/NAME.toml or a path (flash read speeds)")
    p.add_argument("--no-verify", action="store_true", help="skip the CRC-32 check of bundle rows read from flash")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "f16", "f32"],
                   help="KV cache storage (auto: f32 for the one-graph decoder, else f16)")
    p.add_argument("--activations", default="auto", choices=["auto", "int8", "mixed", "f32"],
                   help="quantized weights in onnxruntime: inputs quantized to int8 blocks (fastest), the same but "
                        "f32 into the attention's q|k|v (mixed: closer to f16), or f32 everywhere (exact, slower); "
                        "auto: mixed on AVX-512 CPUs, int8 elsewhere")
    p.add_argument("--no-pipeline", action="store_true",
                   help="start no flash read before its layer runs (no lookahead, no read-ahead of the next "
                        "streamed layer): the baseline the pipeline is measured against")
    p.add_argument("--pipeline-always", action="store_true",
                   help="run the lookahead on every decode token instead of timing tokens with it on and off "
                        "and keeping the faster")
    if stats:
        p.add_argument("--stats", action="store_true", help="print load time, TTFT, tokens/s, flash I/O, peak RSS")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _runtime_config(args):
    from .config import RuntimeConfig
    from .tune import apply_run_profile
    limited = args.budget is not None or args.memory_limit is not None
    mode = (args.mode or ("flash" if limited else "dense")).split(",")[0]
    # --profile may name a run profile written by `flashlm tune`: it fills the flags not given
    return apply_run_profile(RuntimeConfig(
        ctx_len=args.ctx, threads=args.threads, mode=mode, budget=args.budget, memory_limit=args.memory_limit,
        embeddings=args.embeddings, dense_engine=args.dense_engine, window=args.window,
        pin=args.pin, io=args.io, io_threads=args.io_threads, io_submit=args.io_submit, max_gap_bytes=args.max_gap,
        layer_io=args.layer_io, profile=args.profile, verify_reads=not args.no_verify, kv_dtype=args.kv_dtype,
        activations=args.activations, pipeline=not args.no_pipeline, pipeline_trial=not args.pipeline_always, ort_spin_us=args.ort_spin_us, ort_graph=args.ort_graph))


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=_NON_NEGATIVE, default=None, help="tokens to generate (default 256)")
    p.add_argument("--temp", type=_float_in(0.0), default=None, help="temperature (0 = greedy; default from the model)")
    p.add_argument("--top-k", type=_NON_NEGATIVE, default=None, help="0 = off")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=None, help="1 = off")
    p.add_argument("--min-p", type=_FRACTION, default=None, help="0 = off")
    p.add_argument("--repeat-penalty", type=_float_in(0.0, low_open=True), default=None, help="1 = off")
    p.add_argument("--seed", type=_NON_NEGATIVE, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system message for chat prompts")


def _sampling(args, folder):
    from .sampling import SamplingParams
    return SamplingParams.from_generation_config(
        folder.manifest.get("generation_config", {}), where=f"{folder.file('manifest.json')}: generation_config",
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed)


def _load(model_arg, args):
    """(Model, Tokenizer) for a folder, or for the embedded default model when model_arg is None."""
    from .loader import load
    model, tokenizer, plan = load(model_arg, _runtime_config(args), progress=not args.no_progress)
    if plan.run_mode.reads_flash or args.verbose:
        _err(*plan.lines())
    return model, tokenizer


# --- verbs -----------------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    from flashlm.converters.convert import convert, plan
    if args.dry_run:
        print(json.dumps(plan(args.source), indent=1))
        return 0
    out = Path(args.output) if args.output else Path(Path(args.source).stem + ".flashlm")
    t0 = time.perf_counter()
    convert(args.source, out, dtype=args.dtype, bundle_dtype=args.bundle_dtype,
            resident=tuple(p for p in args.resident.split(",") if p != "none"),
            force=args.force, progress=not args.no_progress, tie_embeddings=args.tie_embeddings)
    from .generate import peak_rss_bytes
    _err(f"wrote {out} in {time.perf_counter() - t0:.1f} s (peak RSS {peak_rss_bytes() / 2**20:.0f} MiB)")
    return 0


def cmd_info(args) -> int:
    from .info import model_info
    from .modelfile import open_folder
    info = model_info(open_folder(args.model), ctx_len=args.ctx)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print("\n".join(f"{k:22s} {v}" for k, v in info["summary"].items()))
    return 0


def _switch_line(ffn) -> list[str]:
    """What the lookahead switch (runtime/pipeline_switch.py) decided, when the run has one."""
    switch, fs = getattr(ffn, "switch", None), ffn.stats
    if switch is None or not fs.decode_tokens:
        return []
    trial = (f"; last trial {switch.last[0]:.1f} ms/token on vs {switch.last[1]:.1f} off"
             + (f", on won {switch.last_pairs[0]} of {switch.last_pairs[1]} pairs" if switch.last_pairs else "")
             if switch.last else "; no trial decided yet")
    return [f"lookahead switch:    on for {fs.lookahead_tokens} of {fs.decode_tokens} decode tokens{trial}"]


def _submission_line(ffn) -> list[str]:
    reader = getattr(ffn, "reader", None)
    if reader is None:
        return []
    return [f"flash reads:         {'native AIO' if reader.submission == 'aio' else 'pread'}, "
            f"{reader.threads} reader threads" + (f" ({reader.submission_note})" if reader.submission_note else "")]


def _stats_lines(stats, model) -> list[str]:
    """The generation figures, plus the flash accounting of the paper's Table 3 when FFN rows stream."""
    lines = stats.lines()
    fs = model.ffn_backend.stats
    if model.plan.run_mode.reads_flash and fs.tokens:
        n = fs.tokens
        nbytes, reads = model.ffn_backend.io_counts()
        cp = model.critical_path()
        lines += [f"flash (per decode token):   {nbytes / n / 2**20:.2f} MiB in {reads / n:.0f} reads"
                  + (f" ({nbytes / cp.io_busy_ms / n / 1e3:.0f} MB/s while busy)" if cp.io_busy_ms else "")
                  + f"; FFN kernels {1e3 * fs.ffn_s / n:.2f} ms",
                  f"critical path:       {cp.line()}" + ("" if model.runtime.pipeline else " (--no-pipeline)"),
                  *_submission_line(model.ffn_backend),
                  *_switch_line(model.ffn_backend),
                  *([f"lookahead:           recall {100 * fs.guess_recall:.1f} % of a guessed layer's rows; misses "
                     f"{fs.guess_missed * model.folder.bundles.stride_bytes / n / 2**20:.2f} MiB, over-fetched "
                     f"{(fs.guess_rows - fs.guess_used) * model.folder.bundles.stride_bytes / n / 2**20:.2f} MiB per token; "
                     f"guess bookkeeping on the I/O thread {1e3 * fs.mm_bg_s / n:.2f} ms"]
                    if fs.guess_recall is not None else []),
                  f"neuron cache:        hit {100 * fs.hit_rate:.1f} %, window {model.plan.window}"
                  + (f", streamed {100 * fs.streamed_layers / (n * model.config.n_layers):.0f} % of layer-steps"
                     if model.plan.run_mode.needs_predictors else "")]
    if model.plan.budget:
        lines.append(f"budget:              {model.plan.budget / 2**20:.1f} MiB for the model "
                     f"(+ runtime overhead); peak RSS {stats.peak_rss / 2**20:.1f} MiB")
    return lines


def _print_stats(stats, model) -> None:
    stats.load_s = model.load_seconds
    _err("", *_stats_lines(stats, model))


def cmd_run(args) -> int:
    from .generate import GenerationStats, stream_generate
    prompt = args.prompt
    if args.file is not None:
        prompt = _read_text(args.file)
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    model, tok = _load(args.model, args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        ids = tok.encode_chat(messages)
    else:
        ids = tok.encode(prompt)
    stats = GenerationStats()
    for piece in stream_generate(model, tok, ids, _sampling(args, model.folder),
                                 max_tokens=256 if args.max_tokens is None else args.max_tokens,
                                 stop=args.stop, stats=stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        _print_stats(stats, model)
    return 0


CHAT_HELP = "/reset  new conversation | /system TEXT  set the system message | /stats  last reply's figures | /bye  quit"


def cmd_chat(args) -> int:
    from .generate import GenerationStats, stream_generate
    model, tok = _load(args.model, args)
    params = _sampling(args, model.folder)
    system = args.system
    messages: list[dict] = []
    stats = None
    _err(f"flashlm chat: {model.folder.path.name} ({model.config.architecture}, {model.config.n_layers} layers). "
         f"{CHAT_HELP}; Ctrl-C stops a reply, Ctrl-D quits.")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, rest = text.partition(" ")
            if cmd in ("/bye", "/exit", "/quit"):
                return 0
            if cmd == "/reset":
                messages.clear()
                model.reset()
                _err("(conversation cleared)")
            elif cmd == "/system":
                system = rest.strip() or None
                messages.clear()
                _err(f"(system message {'set' if system else 'cleared'}; conversation cleared)")
            elif cmd == "/stats":
                _err(*(_stats_lines(stats, model) if stats else ["(no reply yet)"]))
            else:
                _err(CHAT_HELP)
            continue
        messages.append({"role": "user", "content": line})
        full = ([{"role": "system", "content": system}] if system else []) + messages
        ids = tok.encode_chat(full)
        budget = 512 if args.max_tokens is None else args.max_tokens
        while len(ids) + budget > model.ctx_len and len(messages) > 1:
            del messages[:2]                      # drop the oldest exchange to stay inside the context
            full = ([{"role": "system", "content": system}] if system else []) + messages
            ids = tok.encode_chat(full)
            _err("(context full: dropped the oldest exchange)")
        stats = GenerationStats(load_s=model.load_seconds)
        reply = []
        try:
            for piece in stream_generate(model, tok, ids, params, max_tokens=budget, stop=args.stop, stats=stats):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stats.finish_reason = "interrupted"
            _err(" [interrupted]")
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
        if args.stats:
            _err(*_stats_lines(stats, model))


def _serve_loader(args):
    """How `serve` loads its model: runtime/loader.load() via _load, on the engine's thread while /health answers 503."""
    return _load(args.model, args)


def cmd_serve(args) -> int:
    import os
    from .engine import Engine
    from .server import HttpServer, ServerSettings
    if args.queue < 0:
        raise InputError(f"--queue must be >= 0, got {args.queue}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("FLASHLM_API_KEY") or None
    engine = Engine(lambda: _serve_loader(args), queue_size=args.queue)
    try:
        server = HttpServer(engine, ServerSettings(host=args.host, port=args.port, api_key=api_key))
    except OSError as e:
        raise InputError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    if api_key is None and server.host not in ("127.0.0.1", "::1", "localhost"):
        _err(f"flashlm serve: warning: listening on {server.host} without --api-key: anyone who can reach "
             f"this port can use the model")
    _err(f"flashlm serve: listening on {server.url}/v1 (OpenAI API; GET /health), loading the model...")
    server.run(on_ready=lambda: _err(f"flashlm serve: {engine.name} ready in {engine.load_seconds:.1f} s "
                                     f"(context {engine.ctx_len} tokens, queue {args.queue})"))
    return 0


def cmd_calibrate(args) -> int:
    from flashlm.converters.calibrate import calibrate
    report = calibrate(args.model, text_file=args.file, random_tokens=args.random_tokens, n_tokens=args.tokens, keep=args.keep, recall=args.recall,
                       selector=args.selector, output_recall=args.output_recall, threads=args.threads, progress=not args.no_progress,
                       predictor_dtype=args.predictor_dtype)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print("| layer | rank | rule | recall | contribution recall | predicted active | window 4 holds | window 4 misses |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for i, q in enumerate(report["layers"]):
        w = q["windows"].get("4", {})
        print(f"| {i} | {q['rank']} | {q['rule']} | {q['recall']:.3f} | {q.get('contribution_recall', float('nan')):.3f} "
              f"| {100 * q['predicted_fraction']:.1f} % | {100 * w.get('mean_held', 0):.1f} % | {100 * w.get('miss_fraction', 0):.1f} % |")
    _err(f"selector {report['selector']} (held-out output recall {report['selector_quality']})")
    phases = ", ".join(f"{k} {v} s" for k, v in report.get("phase_seconds", {}).items())
    _err(f"calibrated on {report['tokens']} tokens ({report['source']}) in {report['seconds']} s ({phases}); "
         f"predictors written to {args.model}/predictor.safetensors")
    return 0


def cmd_ppl(args) -> int:
    from .memory import PREFILL_CHUNK
    from .perplexity import perplexity
    text = _read_text(args.file)
    model, tok = _load(args.model, args)
    rt = model.runtime
    ids = tok.encode(text)
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    if len(ids) < 2:
        raise InputError(f"{args.file}: {len(ids)} token(s); perplexity needs at least 2")
    chunk = args.chunk or (1 if model.plan.run_mode.reads_flash else PREFILL_CHUNK)
    result = perplexity(model, ids, chunk=chunk, progress=not args.no_progress)
    print(f"perplexity: {result['perplexity']:.4f}")
    _err(f"{result['tokens']} tokens, mode {rt.mode}, chunk {chunk}")
    model.close()
    return 0


def cmd_bench(args) -> int:
    from .bench import as_json_lines, bench, bench_one, table
    from .memory import MODES
    bad = [m for m in (args.mode or "").split(",") if args.mode and m.strip() not in MODES]
    if bad:
        raise InputError(f"--mode {bad[0]!r} is not a run mode; choose from {', '.join(MODES)}")
    rt = _runtime_config(args)
    if args.one:
        print(as_json_lines(bench_one(args.model, rt, pp=args.n_prompt, tg=args.n_gen, reps=args.reps)))
        return 0
    modes = [m.strip() for m in (args.mode or rt.mode).split(",")]
    cap = None
    if args.cgroup is not None:
        import dataclasses
        from .memory import parse_size
        from .process_memory import physical_memory_bytes
        cap = parse_size(args.cgroup, physical_memory_bytes())
        if rt.memory_limit is None:          # the children plan for the cap they run under
            rt = dataclasses.replace(rt, memory_limit=str(cap))
    rows = bench(args.model, modes, rt, pp=args.n_prompt, tg=args.n_gen, reps=args.reps, cgroup_limit=cap,
                 llamacpp=args.llamacpp, deadline=args.deadline)
    print(as_json_lines(rows) if args.json else table(rows))
    failed = [r for r in rows if "error" in r]
    if failed:
        raise InputError(f"{len(failed)} of {len(rows)} bench runs failed; first: mode {failed[0]['mode']}: "
                         f"{failed[0]['error']}")
    return 0


def cmd_probe(args) -> int:
    from .device import load_profile, parse_profile, shipped_profiles
    if args.list:
        for name in shipped_profiles():
            prof = load_profile(name)
            tag = "measured" if prof.measured else "published figures"
            print(f"{name:28s} {prof.memory_bytes / 2**30:5.1f} GiB  {prof.cores:2d} cores  "
                  f"{16384 / prof.flash_speeds(4).random_seconds(16384) / 1e6:7.0f} MB/s rand16K@4  ({tag}) {prof.description}")
        return 0
    if args.show:
        print(Path(load_profile(args.show).path).read_text(), end="")
        return 0
    from .probe import probe, to_toml
    directory = Path(args.dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: --dir must be an existing folder on the disk to measure")

    def on_point(kind, pt):
        if kind == "flash":
            what = "seq 1M" if pt.get("sequential") else f"rand {pt['read_bytes'] >> 10:5d}K"
            _err(f"  flash {pt['io']:8s} {what} x{pt['threads']:<2d} {pt['mb_s']:8.1f} MB/s")
        elif kind == "reader" and "call_us" in pt:
            _err(f"  FlashReader {pt['what']} x{pt['threads']}, compute x{pt['compute_threads']}: layers "
                 f"{pt['stream_mb_s']:.0f} MB/s, rows {pt['call_us']:.0f} us/call + {pt['row_us']:.1f} us/read; "
                 f"compute slowed {pt['stream_slowdown']:.2f}x streaming, {pt['call_compute_us']:.0f} us lost per rows call")
        elif kind == "reader" and pt["what"] == "submission":
            _err(f"  FlashReader reads through {pt['submit']}")
        elif kind == "reader" and pt["what"] == "ring":
            _err(f"  FlashReader layers x{pt['threads']} through a 1/{pt['ring_fraction']} ring: {pt['mb_s']:.0f} MB/s "
                 f"(median of {', '.join(f'{x:.0f}' for x in pt['rounds'])})")
        elif kind == "reader" and pt["what"] == "row reads":
            _err(f"  FlashReader x{pt['threads']}: {pt['row_us']:.1f} us per read in 128-row calls "
                 f"(median of {', '.join(f'{x:.1f}' for x in pt['rounds'])})")
        elif kind == "reader":
            _err(f"  FlashReader {pt['what']} x{pt['threads']}: {pt.get('useful_mb_s', pt.get('mb_s')):.1f} MB/s")
        elif kind == "dram":
            _err("  DRAM read " + ", ".join(f"{v:.1f} GB/s x{t}" for t, v in pt["gb_s"].items()))
        elif kind == "compute":
            for k, v in pt["gweights_s"].items():
                _err(f"  matvec {k:10s} " + ", ".join(f"{g:.2f} G weights/s x{t}" for t, g in v.items()))
            for k, e in pt["errors"].items():
                _err(f"  matvec {k}: not available ({e})")
        elif kind == "cache":
            _err(f"  neuron cache step {pt['cache_step_us']:.1f} us + {pt['cache_step_row_us']:.3f} us per wanted row")
    _err(f"probing {directory} ({'full' if args.full else 'quick'}) ...")
    data = probe(directory, quick=not args.full, on_point=on_point)
    name = Path(args.output).stem if args.output else "this-machine"
    data["device"]["name"] = name
    if args.description:
        data["device"]["description"] = args.description
    parse_profile(data, name)           # what is written must load back
    text = to_toml(data, [f"Device profile written by `flashlm probe` on {data['probe']['date']}.",
                          "MB = 10^6 bytes/s, GB = 10^9; random reads at random size-aligned offsets."])
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        _err(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0


def cmd_tune(args) -> int:
    from .device import load_profile, shipped_profile
    from .memory import parse_size
    from .modelfile import open_folder
    from .predictor import calibration_report
    from .tune import candidates, run_profile_toml
    folder = open_folder(args.model)
    profile_ref = args.profile or "this-machine-2core"
    profile = load_profile(profile_ref)
    limit = parse_size(args.memory_limit, profile.memory_bytes)
    try:
        calibration = calibration_report(folder.path)
    except FileNotFoundError:
        calibration = None
    ranked = candidates(folder, profile, limit, calibration, profile_ref=profile_ref, ctx_len=args.ctx)
    if args.measure:
        from .tune import measure_ms
        _err(f"measuring the {args.measure} best predicted settings ({args.tokens} decode tokens each) ...")
        for cand in ranked[:args.measure]:
            cand.measured_ms = measure_ms(folder.path, cand.rt, args.tokens)
            _err(f"  {cand.describe():55s} predicted {cand.ms:8.2f} ms  measured {cand.measured_ms:8.2f} ms")
        best = min(ranked[:args.measure], key=lambda c: c.measured_ms)
    else:
        best = ranked[0]
    _err(f"tuned {folder.path.name} for {profile.name} within {limit / 2**20:,.0f} MiB "
         f"({len(ranked)} settings fit): {best.describe()}")
    if args.explain:
        _err(*best.plan.lines())
        _err(*best.cost.lines())
        _err("  runners-up:")
        for cand in ranked[1:6]:
            _err(f"    {cand.ms:8.2f} ms/token  {cand.describe()}")
    text = run_profile_toml(best, model=str(folder.path), device=profile_ref if shipped_profile(profile_ref)
                            else str(Path(profile_ref).resolve()), memory_limit=limit)
    if args.output:
        Path(args.output).write_text(text)
        _err(f"wrote {args.output} (use it with --profile {args.output})")
    else:
        print(text, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="flashlm", description=DESCRIPTION,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="log what happens; errors show their traceback")
    sub = ap.add_subparsers(dest="verb", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("convert", help="convert a GGUF file or HF folder into a flashlm model folder", formatter_class=fmt)
    p.add_argument("source", type=_path, help="model.gguf or a folder with config.json + *.safetensors")
    p.add_argument("-o", "--output", type=_path, help="output folder (default: SOURCE-NAME.flashlm)")
    p.add_argument("--dtype", choices=["auto", "f32", "f16", "q8_0", "q4_0", "q4_1"], default="auto",
                   help="storage of the 2-D weights: auto keeps a GGUF's quantized blocks exactly (float "
                        "sources stay f16); q8_0/q4_0/q4_1 quantize (4-bit keeps embeddings at q8_0); "
                        "f16 is the exact reference")
    p.add_argument("--bundle-dtype", choices=["f16", "f32", "q4_0", "q4_1", "q8_0"], default=None,
                   help="storage type of the FFN bundle rows read from flash (default: as --dtype); the "
                        "quantized types hold GGUF blocks and the FFN runs on them")
    p.add_argument("--resident", choices=["none", "gate", "gate,up"], default="none",
                   help="gated FFNs: keep W_gate (gate) or W_gate and W_up (gate,up) in DRAM as dense tensors and "
                        "store only up|down or only down in the bundle rows; what `calibrate --selector gate` "
                        "(gate) and `--selector exact` (gate,up) rank with")
    p.add_argument("--tie-embeddings", action="store_true",
                   help="drop the source's lm_head and use the token embeddings for it (one copy of the matrix; "
                        "for GGUFs of tied-embedding models that store it twice, e.g. Qwen2.5 0.5B-3B)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--dry-run", action="store_true", help="print what would be converted and stop")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="architecture, sizes and a resident-memory estimate", formatter_class=fmt)
    p.add_argument("model", type=_path)
    p.add_argument("-c", "--ctx", type=_POSITIVE, default=2048)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="complete a raw prompt (stdout: generated text only)", formatter_class=fmt)
    p.add_argument("model", nargs="?", type=_path, default=None, help="model folder (default: embedded SmolLM2)")
    p.add_argument("-p", "--prompt", default=None, help="prompt text ('-' or none: read stdin)")
    p.add_argument("-f", "--file", default=None, help="read the prompt from a file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user message in the chat template")
    _add_sampling_flags(p)
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template", formatter_class=fmt)
    p.add_argument("model", nargs="?", type=_path, default=None, help="model folder (default: embedded SmolLM2)")
    _add_sampling_flags(p)
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)",
                       formatter_class=fmt)
    p.add_argument("model", nargs="?", type=_path, default=None, help="model folder (default: embedded SmolLM2)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8080, help="TCP port (0: any free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $FLASHLM_API_KEY, else no key)")
    p.add_argument("--queue", type=_NON_NEGATIVE, default=4,
                   help="requests that may wait while one generates; more get 503 + Retry-After")
    _add_runtime_flags(p, stats=False)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("calibrate", help="train the per-layer sparsity predictors", formatter_class=fmt)
    p.add_argument("model", type=_path)
    p.add_argument("-f", "--file", default=None, help="calibration text (default: text the model generates)")
    p.add_argument("--random-tokens", action="store_true", help="calibrate on random token ids (synthetic models)")
    p.add_argument("--tokens", type=_int_at_least(2), default=2048, help="calibration tokens")
    p.add_argument("--selector", choices=("auto", "lowrank", "gate", "exact"), default="auto",
                   help="gated FFNs: lowrank (gate and up estimated), gate (W_gate resident: a third of the FFN "
                        "in DRAM), exact (W_gate and W_up resident: two thirds); auto: the cheapest whose "
                        "held-out output recall reaches --output-recall")
    p.add_argument("--output-recall", type=_float_in(0.0, 1.0, low_open=True), default=0.97,
                   help="auto selector's goal: share of the true top-k output mass the selection keeps")
    p.add_argument("--keep", type=_float_in(0.0, 1.0, low_open=True), default=0.5,
                   help="SwiGLU: fraction of neurons kept per token")
    p.add_argument("--recall", type=_float_in(0.0, 1.0, low_open=True), default=0.99,
                   help="ReLU: recall of active neurons to aim for")
    p.add_argument("--predictor-dtype", choices=("auto", "f16", "int8"), default="auto",
                   help="storage of the low-rank maps: int8 (one scale per row) halves the predictors' DRAM; "
                        "auto: int8 when the FFN rows are quantized, else f16")
    p.add_argument("-t", "--threads", type=_POSITIVE, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("ppl", help="perplexity of a text file under a run mode", formatter_class=fmt)
    p.add_argument("model", type=_path)
    p.add_argument("-f", "--file", required=True, help="text file")
    p.add_argument("-n", "--max-tokens", type=_int_at_least(2), default=None, help="use only the first N tokens")
    p.add_argument("--chunk", type=_POSITIVE, default=None,
                   help="tokens per forward (default: a prefill chunk dense, 1 otherwise = as decoding sees the model)")
    _add_runtime_flags(p, stats=False)
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("bench", help="llama-bench-like table of run modes", formatter_class=fmt)
    p.add_argument("model", type=_path)
    p.add_argument("-p", "--n-prompt", type=_NON_NEGATIVE, default=128, help="prompt tokens (pp test; 0 = skip)")
    p.add_argument("-n", "--n-gen", type=_NON_NEGATIVE, default=32, help="generated tokens (tg test; 0 = skip)")
    p.add_argument("-r", "--reps", type=_POSITIVE, default=3)
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cgroup", default=None, metavar="SIZE",
                   help="run each mode in its own memory cgroup capped at SIZE (RSS + page cache, as a device "
                        "with that much RAM): 700MiB, 60%% of RAM; reports the group's peak and whether it hit the cap")
    p.add_argument("--llamacpp", default=None, metavar="GGUF",
                   help="add a llama.cpp row (llama-cpp-python, the bench extra) on this GGUF, same cap")
    p.add_argument("--deadline", type=float, default=None, metavar="S",
                   help="stop a llama.cpp decode repetition after S seconds (under a tight cap a token can take a minute)")
    _add_runtime_flags(p, stats=False, mode_list=True)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("probe", help="measure this machine into a device profile; list or show shipped ones",
                       formatter_class=fmt)
    p.add_argument("--dir", default=".", help="a folder on the disk that will hold the models (not tmpfs)")
    p.add_argument("-o", "--output", default=None, help="write the profile here (NAME.toml; default: stdout)")
    p.add_argument("--quick", action="store_true", help="short run: 512 MiB file, 0.4 s per point (the default)")
    p.add_argument("--full", action="store_true", help="thorough grid: 2 GiB file, 1.5 s per point, FlashReader checks")
    p.add_argument("--list", action="store_true", help="list the shipped device profiles")
    p.add_argument("--show", metavar="NAME", default=None, help="print a shipped (or given) profile")
    p.add_argument("--description", default=None, help="the profile's device.description (default: measured by flashlm probe)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("tune", help="pick run settings for a model under a memory limit on a device (cost model)",
                       formatter_class=fmt)
    p.add_argument("model")
    p.add_argument("--memory-limit", required=True, help="whole-process memory: 60%% (of the device's), 1.5GiB, 700MiB")
    p.add_argument("--profile", default=None, help="device profile (shipped name or path; default this-machine-2core)")
    p.add_argument("-c", "--ctx", type=int, default=2048, help="context length to plan the KV cache for")
    p.add_argument("-o", "--output", default=None, help="write the run profile here (default: stdout)")
    p.add_argument("--explain", action="store_true", help="print the plan and the predicted per-token breakdown")
    p.add_argument("--measure", type=int, default=0, metavar="K",
                   help="on this machine: measure the K best predicted settings and keep the fastest")
    p.add_argument("--tokens", type=int, default=16, help="decode tokens per --measure run")
    p.set_defaults(func=cmd_tune)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="flashlm: %(message)s", stream=sys.stderr)
    try:
        return args.func(args) or 0
    except FlashlmError as e:
        if args.verbose:
            traceback.print_exc()
        _err(f"flashlm {args.verb}: error: {e}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`flashlm` command line: convert, info, run, chat. Only this module prints; stdout carries generated
text only, everything else (progress, logs, stats) goes to stderr so output can be piped."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("flashlm")


def _err(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr)


# --- shared flags ----------------------------------------------------------------------------------
def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--ctx", type=int, default=2048, help="context length (KV cache tokens)")
    p.add_argument("-t", "--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--stats", action="store_true", help="print load time, TTFT, tokens/s, peak RSS to stderr")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=None, help="tokens to generate")
    p.add_argument("--temp", type=float, default=None, help="temperature (0 = greedy; default from the model)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repeat-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system message for chat prompts")


def _sampling(args, manifest: dict):
    from .sampling import SamplingParams
    return SamplingParams.from_generation_config(
        manifest.get("generation_config", {}), temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed)


def _load(model_arg, args):
    """(Model, Tokenizer) for a folder, or for the embedded default model when model_arg is None."""
    from .config import RuntimeConfig
    from .default_model import default_model_folder
    from .model import Model
    from .modelfile import open_folder
    from .tokenizer import Tokenizer
    path = Path(model_arg) if model_arg else default_model_folder(progress=not args.no_progress)
    t0 = time.perf_counter()
    folder = open_folder(path)
    model = Model(folder, RuntimeConfig(ctx_len=args.ctx, threads=args.threads))
    tokenizer = Tokenizer.from_folder(folder.path, folder.manifest)
    model.warmup()
    model.load_seconds = time.perf_counter() - t0
    return model, tokenizer


# --- verbs -----------------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    from converters.convert import convert, plan
    if args.dry_run:
        print(json.dumps(plan(args.source), indent=1))
        return 0
    out = Path(args.output) if args.output else Path(Path(args.source).stem + ".flashlm")
    t0 = time.perf_counter()
    convert(args.source, out, dtype=args.dtype, force=args.force, progress=not args.no_progress)
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


def _print_stats(stats, model) -> None:
    stats.load_s = model.load_seconds
    _err("", *stats.lines())


def cmd_run(args) -> int:
    from .generate import GenerationStats, stream_generate
    prompt = args.prompt
    if args.file:
        prompt = Path(args.file).read_text()
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
    for piece in stream_generate(model, tok, ids, _sampling(args, model.folder.manifest),
                                 max_tokens=args.max_tokens or 256, stop=args.stop, stats=stats):
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
    params = _sampling(args, model.folder.manifest)
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
                _err(*(stats.lines() if stats else ["(no reply yet)"]))
            else:
                _err(CHAT_HELP)
            continue
        messages.append({"role": "user", "content": line})
        full = ([{"role": "system", "content": system}] if system else []) + messages
        ids = tok.encode_chat(full)
        budget = args.max_tokens or 512
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
            _err(*stats.lines())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flashlm", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="verb", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("convert", help="convert a GGUF file or HF folder into a flashlm model folder", formatter_class=fmt)
    p.add_argument("source", help="model.gguf or a folder with config.json + *.safetensors")
    p.add_argument("-o", "--output", help="output folder (default: SOURCE-NAME.flashlm)")
    p.add_argument("--dtype", choices=["f16", "f32"], default="f16", help="storage dtype of the weights")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--dry-run", action="store_true", help="print what would be converted and stop")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="architecture, sizes and a resident-memory estimate", formatter_class=fmt)
    p.add_argument("model")
    p.add_argument("-c", "--ctx", type=int, default=2048)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="complete a raw prompt (stdout: generated text only)", formatter_class=fmt)
    p.add_argument("model", nargs="?", default=None, help="model folder (default: embedded SmolLM2)")
    p.add_argument("-p", "--prompt", default=None, help="prompt text ('-' or none: read stdin)")
    p.add_argument("-f", "--file", default=None, help="read the prompt from a file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user message in the chat template")
    _add_sampling_flags(p)
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template", formatter_class=fmt)
    p.add_argument("model", nargs="?", default=None, help="model folder (default: embedded SmolLM2)")
    _add_sampling_flags(p)
    _add_runtime_flags(p)
    p.set_defaults(func=cmd_chat)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="flashlm: %(message)s", stream=sys.stderr)
    from converters.source import ConversionError
    from .modelfile import ModelFileError
    try:
        return args.func(args) or 0
    except (ConversionError, ModelFileError, FileNotFoundError, ValueError) as e:
        _err(f"flashlm {args.verb}: error: {e}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

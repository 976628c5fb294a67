"""The headline: Qwen2.5-Coder-1.5B Q4_K_M under memory cgroups of 900, 700 and 560 MiB, flashlm's flash,
hybrid and naive modes against llama.cpp on the same GGUF, one table.

    sudo .venv/bin/python tools/headline_qwen15.py [--prepare] [--caps 900,700,560] [-n 4] [--llamacpp-n 2]

Each engine runs in its own child process inside a fresh memory cgroup capped at the limit (cgroup v1
memory.limit_in_bytes or v2 memory.max: RSS and page cache together, as a board with that much RAM;
runtime/cgroup.py), and flashlm's child plans for the same limit (--memory-limit, the whole process).
Rows: decode tokens/s, bytes read from storage per token, the cgroup's peak and whether it reached the cap
(failcnt), and held-out perplexity (tools/data/heldout.txt, the first --ppl-tokens tokens) of each flashlm
mode under the middle cap, beside dense (the same folder, everything resident, no cap) as the reference.
llama.cpp (llama-cpp-python, mmap, as it ships) under a tight cap re-reads its evicted weights for every
token, ~50 s per token at 700 MiB: it decodes only --llamacpp-n tokens, each repetition stopping after
--deadline seconds (the row counts the tokens it finished).

--prepare converts the GGUF first (q4_0 bundle rows, --tie-embeddings: the file stores the tied
embedding matrix twice, once as output.weight in Q6_K) and calibrates it on tools/data/prompts-*.txt.
Engines alternate cap by cap (llama.cpp, then each flashlm mode). Needs root (or a delegated cgroup) and
llama-cpp-python (the `bench` extra).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MiB = 1 << 20
GGUF = "/work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


def _flashlm(*args) -> list[str]:
    return [sys.executable, "-m", "flashlm", *map(str, args)]


def prepare(gguf: str, folder: Path) -> None:
    subprocess.run(_flashlm("convert", gguf, "-o", folder, "--bundle-dtype", "q4_0", "--tie-embeddings",
                            "--force", "--no-progress"), check=True)
    text = "\n".join((ROOT / "tools/data" / f).read_text() for f in ("prompts-code.txt", "prompts-facts.txt"))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    subprocess.run(_flashlm("calibrate", folder, "-f", f.name, "--tokens", 1024, "--no-progress"), check=True)


def perplexity(folder: Path, mode: str, cap: int | None, tokens: int, ctx: int, chunk: int) -> dict:
    """flashlm ppl in a child (inside a cgroup of `cap` bytes when given)."""
    cmd = _flashlm("ppl", folder, "-f", ROOT / "tools/data/heldout.txt", "-n", tokens, "--mode", mode, "--ctx", ctx,
                   "--chunk", chunk, "--dense-engine", "numba", "--no-progress")
    if cap is not None:
        cmd += ["--memory-limit", str(cap)]
        from flashlm.runtime.cgroup import run_capped
        proc, use = run_capped(cmd, cap, capture_output=True, text=True)
        usage = use.as_dict()
    else:
        proc, usage = subprocess.run(cmd, capture_output=True, text=True), {}
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1], **usage}
    return {"perplexity": float(proc.stdout.split("perplexity:")[1].split()[0]), **usage}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=GGUF)
    ap.add_argument("--folder", default="/work/qwen15.flashlm", help="the converted, calibrated model folder")
    ap.add_argument("--prepare", action="store_true", help="convert and calibrate the GGUF into --folder first")
    ap.add_argument("--caps", default="900,700,560", help="cgroup caps in MiB")
    ap.add_argument("--modes", default="flash,hybrid,naive")
    ap.add_argument("-n", "--n-gen", type=int, default=4, help="flashlm decode tokens per mode and cap")
    ap.add_argument("--llamacpp-n", type=int, default=2, help="llama.cpp decode tokens per cap")
    ap.add_argument("--deadline", type=float, default=150.0, help="llama.cpp: stop a repetition after S seconds")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-tokens", type=int, default=64)
    ap.add_argument("--ppl-cap", type=int, default=700, help="MiB: the cap the perplexity runs use")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--json", default=None, help="also write every row here")
    a = ap.parse_args()
    folder = Path(a.folder)
    if a.prepare or not folder.exists():
        prepare(a.gguf, folder)
    from flashlm.runtime.bench import bench
    from flashlm.runtime.cgroup import CgroupError, MemoryCgroup
    from flashlm.runtime.config import RuntimeConfig
    try:
        MemoryCgroup.create(64 * MiB).remove()
    except CgroupError as e:
        raise SystemExit(f"headline_qwen15: memory cgroups are not available here: {e}")
    modes = a.modes.split(",")
    from flashlm.runtime.predictor import PREDICTOR_FILE
    calibrated = (folder / PREDICTOR_FILE).exists()
    skipped = [m for m in modes if m == "flash" and not calibrated]      # flash needs predictors
    modes = [m for m in modes if m not in skipped]
    caps = [int(c) * MiB for c in a.caps.split(",")]
    t0 = time.perf_counter()
    rows = []
    for cap in caps:
        rt = RuntimeConfig(ctx_len=a.ctx, threads=a.threads, memory_limit=str(cap))
        if not a.no_llamacpp:
            rows += bench(folder, [], rt, pp=0, tg=a.llamacpp_n, reps=1, cgroup_limit=cap, llamacpp=a.gguf,
                          deadline=a.deadline)
        rows += bench(folder, modes, rt, pp=0, tg=a.n_gen, reps=1, cgroup_limit=cap)
        rows += [{"mode": m, "cgroup_limit": cap, "error": f"not calibrated (no {PREDICTOR_FILE}: flashlm calibrate)"}
                 for m in skipped]
        print(f"# cap {cap // MiB} MiB done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    ppl_cap = a.ppl_cap * MiB
    ppl = {"dense": perplexity(folder, "dense", None, a.ppl_tokens, a.ctx, a.ppl_tokens)}
    for mode in skipped:
        ppl[mode] = {"error": "not calibrated"}
    for mode in modes:
        # naive and hybrid compute the dense function over whole layers: a prompt-sized chunk gives the
        # same perplexity faster; flash predicts per token, so it sees the text as decoding does (chunk 1).
        ppl[mode] = perplexity(folder, mode, ppl_cap, a.ppl_tokens, a.ctx, 1 if mode == "flash" else a.ppl_tokens)
    print(f"# perplexity done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "perplexity": ppl}, indent=1))
    print(table(rows, ppl, a))


def table(rows: list[dict], ppl: dict, a) -> str:
    out = [f"Qwen2.5-Coder-1.5B-Instruct Q4_K_M, {a.threads} threads, ctx {a.ctx}, decode of random token ids; "
           f"perplexity: first {a.ppl_tokens} tokens of tools/data/heldout.txt under the {a.ppl_cap} MiB cap "
           f"(dense: no cap)",
           "", "| cap | engine | tok/s (x llama.cpp) | MiB read/tok | planned | cgroup peak | hit cap (failcnt) | tokens | perplexity |",
           "| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    base = {}
    for r in rows:
        cap = r.get("cgroup_limit", 0) // MiB
        name = "llama.cpp (mmap)" if r["mode"] == "llama.cpp" else f"flashlm {r['mode']}"
        peak = f"{r['cgroup_peak'] / MiB:.0f} MiB" if r.get("cgroup_peak") else "-"
        hit = ("yes" if r.get("cgroup_hit_cap") else "no") + (f" ({r['cgroup_failcnt']})" if "cgroup_failcnt" in r else "")
        planned = f"{r['planned_process'] / MiB:.0f} MiB" if r.get("planned_process") else "-"
        p = ppl.get(r["mode"], {}) if cap == a.ppl_cap else {}
        pcell = f"{p['perplexity']:.3f}" if "perplexity" in p else (p.get("error", "-")[:60] if p else "")
        if "error" in r:
            out.append(f"| {cap} | {name} | {r['error'][:90]} | | | {peak} | {hit} | | {pcell} |")
            continue
        n = r.get("decoded_tokens", a.n_gen if r["mode"] != "llama.cpp" else a.llamacpp_n)
        if r["mode"] == "llama.cpp":
            base[cap] = r["avg_ts"]
        ratio = f" ({r['avg_ts'] / base[cap]:.0f}x)" if r["mode"] != "llama.cpp" and base.get(cap) else ""
        out.append(f"| {cap} | {name} | {r['avg_ts']:.3f}{ratio} | {r['bytes_per_token'] / MiB:.0f} | {planned} | {peak} "
                   f"| {hit} | {n} | {pcell} |")
    d = ppl["dense"]
    out.append(f"| - | flashlm dense (no cap, reference) | | | | | | | "
               f"{d['perplexity']:.3f} |" if "perplexity" in d else f"| - | flashlm dense | error: {d['error']} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()

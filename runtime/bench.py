"""`flashlm bench`: llama-bench-style table of run modes, one model, one machine, one invocation.

Each mode runs in its own child process so its peak RSS is its own. Prompts are random token ids,
decode feeds one token per step with no sampling and no EOS; every test is repeated -r times after a
warm-up. Bytes read, reads, hit rate and the I/O / memory-management / compute split are measured
during the decode repetitions (the paper's Table 3 columns), with the critical path of a token
(runtime/critical_path.py: I/O wait, I/O busy, memory management, compute, overlap).
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from .config import RuntimeConfig, activation_policy
from .critical_path import critical_path
from .ffn import FFNStats
from .generate import peak_rss_bytes
from .loader import load
from .modelfile import open_folder


def _drop_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_one(folder_path, rt: RuntimeConfig, *, pp: int, tg: int, reps: int, seed: int = 0) -> list[dict]:
    """Rows for one mode, measured in this process."""
    folder = open_folder(folder_path)
    _drop_page_cache(folder.file(folder.bundles.file))     # a cold start: load and flash reads hit the disk
    if folder.packed is not None:
        _drop_page_cache(folder.file(folder.packed.file))
    model, _, plan = load(folder_path, rt)
    load_s = model.load_seconds
    c = model.config
    # Fresh token ids for every repetition, the warm-up's included: a neuron cache that outlives
    # model.reset() would otherwise hold exactly the rows the timed rep asks for (with -n at most the
    # window, every one), which no real conversation gets. Rep r reads ids[r]: its prompt test the first pp,
    # its decode test the rest.
    ids = np.random.default_rng(seed).integers(0, c.vocab_size, size=(reps + 1, pp + tg + 1))
    base = {"model": folder.path.name, "size": plan.model_bytes, "budget": plan.budget,
            "window": plan.window or None, "mode": rt.mode, "threads": model.threads,
            "io": rt.io if plan.run_mode.rows_from == "reader" else None, "max_gap": rt.max_gap_bytes,
            "activations": activation_policy(rt), "pipeline": rt.pipeline, "pipeline_trial": rt.pipeline and rt.pipeline_trial,
            "load_s": round(load_s, 2), "memory_limit": plan.memory_limit,
            "planned_process": plan.process_total if plan.memory_limit is not None else None}
    rows = []
    if pp:
        times = []
        for r in range(reps + 1):
            model.reset()
            t = time.perf_counter()
            model.forward(ids[r, :pp])              # in run-state chunks of PREFILL_CHUNK tokens
            if r:
                times.append(time.perf_counter() - t)
        rows.append(_row(base, f"pp{pp}", pp, times))
    if tg:
        times, ffn = [], model.ffn_backend
        logits = model.state.logits
        fields = [f.name for f in dataclasses.fields(FFNStats)]
        sums = dict.fromkeys(fields + ["bytes", "reads"], 0)
        for r in range(reps + 1):
            model.reset()
            model.forward(ids[r, pp:pp + 1])
            # Count only the timed decode tokens (not this rep's one-token prompt).
            before = (*ffn.io_counts(), *(getattr(ffn.stats, f) for f in fields))
            t = time.perf_counter()
            for i in range(tg):
                model.forward(ids[r, pp + 1 + i:pp + 2 + i], out=logits)
            if r:
                times.append(time.perf_counter() - t)
                after = (*ffn.io_counts(), *(getattr(ffn.stats, f) for f in fields))
                for key, x, y in zip(["bytes", "reads"] + fields, before, after):
                    sums[key] += y - x
        n = tg * reps
        nbytes, nreads = sums["bytes"], sums["reads"]
        stats = FFNStats(**{f: sums[f] for f in fields})
        row = _row(base, f"tg{tg}", tg, times)
        cp = critical_path(sum(times), n, io_wait_s=stats.io_s, mem_s=stats.mm_s, predict_s=stats.predict_s,
                           io_busy_s=stats.io_busy_s, ffn_s=stats.ffn_s)
        row.update(bytes_per_token=nbytes / n, reads_per_token=nreads / n,
                   hit_rate=stats.hit_rate if stats.wanted else None, **cp.fields(),
                   streamed_layer_fraction=(stats.streamed_layers / (n * c.n_layers)
                                            if plan.run_mode.needs_predictors else None),
                   flash_mb_s=nbytes / stats.io_busy_s / 1e6 if stats.io_busy_s else None,
                   stream_mb_s=stats.stream_bytes / stats.stream_read_s / 1e6 if stats.stream_read_s else None,
                   predicted_ms=_predicted_ms(model, folder, plan, rt),
                   mem_bg_ms=1e3 * stats.mm_bg_s / n, io_cpu_ms=1e3 * stats.io_cpu_s / n,
                   io_submit=getattr(getattr(ffn, "reader", None), "submission", None),
                   **lookahead_fields(stats, n, folder.bundles.stride_bytes, nbytes))
        switch = getattr(ffn, "switch", None)
        if switch is not None:              # the timed tokens' share with the lookahead on, and the last trial
            row.update(lookahead_on=stats.lookahead_tokens / stats.decode_tokens if stats.decode_tokens else None,
                       trial_ms_on=switch.last[0] if switch.last else None,
                       trial_ms_off=switch.last[1] if switch.last else None,
                       trial_pairs_won=switch.last_pairs[0] if switch.last_pairs else None,
                       trial_pairs=switch.last_pairs[1] if switch.last_pairs else None,
                       trials=switch.trials, trial_tokens=switch.trial_tokens,
                       **switch_count_fields(ffn))
        rows.append(row)
    model.close()
    for row in rows:
        row["peak_rss"] = peak_rss_bytes()
    return rows


def _predicted_ms(model, folder, plan, rt: RuntimeConfig) -> float:
    """The run's own cost model on its plan (runtime/cost_model.py): ms per decode token."""
    from .predictor import read_calibration
    calibration = read_calibration(folder) if plan.run_mode.needs_predictors else None
    return 1e3 * model.costs.plan_cost(plan, calibration, pin=rt.pin).total_s


def switch_count_fields(ffn) -> dict:
    """The pipeline switch's trial tokens, per setting: each of the backend's SWITCH_COUNTS per token
    (e.g. trial_on_reads, trial_off_io_wait_ms): what the lookahead bought and cost, measured."""
    out = {}
    for setting, tag in ((True, "on"), (False, "off")):
        sums, n = ffn.switch.counts[setting], ffn.switch.count_tokens[setting]
        for name, v in zip(ffn.SWITCH_COUNTS, sums or ()):
            out[f"trial_{tag}_{name}"] = v / n if n else None
    return out


def lookahead_fields(stats: FFNStats, n: int, stride: int, nbytes: int) -> dict:
    """The lookahead's figures per token: recall of the early guess, bytes its misses cost (rows the
    guessed layers still read once their true input came) and bytes it over-fetched."""
    miss = stats.guess_missed * stride
    return dict(guess_recall=stats.guess_recall, guess_miss_bytes_per_token=miss / n,
                guess_overfetch_bytes_per_token=(stats.guess_rows - stats.guess_used) * stride / n,
                guess_miss_fraction=miss / nbytes if nbytes and stats.guess_used + stats.guess_missed else None)


def _row(base: dict, test: str, n: int, times: list[float]) -> dict:
    tps = [n / t for t in times]
    return dict(base, test=test, avg_ts=statistics.mean(tps),
                stddev_ts=statistics.stdev(tps) if len(tps) > 1 else 0.0, samples_ts=tps)


def _run_child(cmd: list[str], cgroup_limit: int | None) -> tuple[subprocess.CompletedProcess, dict]:
    """Run one bench child; inside a fresh memory cgroup capped at cgroup_limit when given (runtime/cgroup.py)."""
    if cgroup_limit is None:
        return subprocess.run(cmd, capture_output=True, text=True), {}
    from .cgroup import run_capped
    proc, usage = run_capped(cmd, cgroup_limit, capture_output=True, text=True)
    return proc, usage.as_dict()


def _child_rows(proc, usage: dict, mode: str) -> list[dict]:
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        if usage.get("cgroup_oom_kills"):
            why = f"killed at the cgroup cap ({why})" if proc.returncode < 0 else why
        return [{"mode": mode, "error": why, **usage}]
    return [dict(json.loads(line), **usage) for line in proc.stdout.splitlines() if line.startswith("{")]


def bench(folder_path, modes: list[str], rt: RuntimeConfig, *, pp: int, tg: int, reps: int,
          cgroup_limit: int | None = None, llamacpp: str | None = None, deadline: float | None = None) -> list[dict]:
    """Run every mode in a child process (`flashlm bench --one`) and collect their rows.

    cgroup_limit: each child runs in its own memory cgroup capped at that many bytes (RSS + page cache,
    as a device of that size); rows gain the group's peak and whether it reached the cap. llamacpp: a
    GGUF file, benchmarked by llama.cpp (runtime/bench_peer.py) in the same way and under the same cap."""
    rows = []
    if llamacpp is not None:
        cmd = [sys.executable, "-m", "flashlm.runtime.bench_peer", str(llamacpp), "-p", str(pp), "-n", str(tg),
               "-r", str(reps), "--ctx", str(rt.ctx_len), "--threads", str(rt.threads or os.cpu_count() or 1)]
        if deadline is not None:
            cmd += ["--deadline", str(deadline)]
        rows += _child_rows(*_run_child(cmd, cgroup_limit), "llama.cpp")
    for mode in modes:
        cmd = [sys.executable, "-m", "flashlm", "bench", str(folder_path), "--one", "--json", "--mode", mode,
               "-p", str(pp), "-n", str(tg), "-r", str(reps), "--ctx", str(rt.ctx_len), "--io", rt.io,
               "--io-threads", str(rt.io_threads), "--io-submit", rt.io_submit, "--layer-io", rt.layer_io, "--pin", str(rt.pin),
               "--max-gap", str(rt.max_gap_bytes)]
        if rt.threads:
            cmd += ["--threads", str(rt.threads)]
        if rt.budget is not None and mode != "dense":
            cmd += ["--budget", str(rt.budget)]
        if rt.memory_limit is not None:
            cmd += ["--memory-limit", str(rt.memory_limit)]
        if rt.dense_engine != "auto":
            cmd += ["--dense-engine", rt.dense_engine]
        cmd += ["--ort-spin-us", str(rt.ort_spin_us)]
        if rt.ort_graph != "auto":
            cmd += ["--ort-graph", rt.ort_graph]
        if rt.embeddings != "auto":
            cmd += ["--embeddings", rt.embeddings]
        cmd += ["--kv-dtype", rt.kv_dtype, "--activations", rt.activations]
        if rt.window:
            cmd += ["--window", str(rt.window)]
        if rt.profile:
            cmd += ["--profile", str(rt.profile)]
        if not rt.verify_reads:
            cmd += ["--no-verify"]
        if not rt.pipeline:
            cmd += ["--no-pipeline"]
        elif not rt.pipeline_trial:
            cmd += ["--pipeline-always"]
        rows += _child_rows(*_run_child(cmd, cgroup_limit), mode)
    return rows


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)


def _num(v, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, fmt)


def table(rows: list[dict]) -> str:
    capped = any("cgroup_limit" in r for r in rows)
    head = ["model", "size", "budget", "window", "mode", "test", "t/s", "MiB/tok", "reads/tok", "hit %",
            "ms/tok", "io wait", "io busy", "mem ms", "compute ms", "overlap", "x bound", "peak RSS"] + (["cgroup cap", "cgroup peak", "hit cap"] if capped else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in rows:
        cg = [_fmt_bytes(r.get("cgroup_limit")), _fmt_bytes(r.get("cgroup_peak")),
              "yes" if r.get("cgroup_hit_cap") else "no"] if capped else []
        if "error" in r:
            lines.append(f"| | | | | {r['mode']} | error: {r['error']} |" + "".join(f" {c} |" for c in cg[-3:])
                         if capped else f"| | | | | {r['mode']} | error: {r['error']} |")
            continue
        tg = r["test"].startswith("tg")
        mode = r["mode"] + ("" if r.get("pipeline", True) else " (no pipeline)")
        cells = [r["model"], _fmt_bytes(r["size"]), _fmt_bytes(r["budget"]), str(r["window"] or "-"), mode,
                 r["test"], f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}",
                 _num(r.get("bytes_per_token"), ".2f", 1 / 2**20) if tg else "-",
                 _num(r.get("reads_per_token"), ".0f") if tg else "-",
                 _num(r.get("hit_rate"), ".1f", 100) if tg else "-",
                 *(_num(r.get(k), ".2f") if tg else "-"
                   for k in ("ms_per_token", "io_wait_ms", "io_busy_ms", "mem_ms", "compute_ms")),
                 _num(r.get("overlap"), ".0f", 100) if tg else "-", _num(r.get("bound_ratio"), ".2f") if tg else "-",
                 _fmt_bytes(r["peak_rss"])] + cg
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def as_json_lines(rows: list[dict]) -> str:
    return "\n".join(json.dumps(r) for r in rows)


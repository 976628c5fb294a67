"""Budget sweep: tokens/s, MB read per token and perplexity of flash vs hybrid at several budgets.

    python tools/sweep_budget.py MODEL.flashlm --text tools/data/heldout.txt \
        --budgets 40,50,60,80,100 --ctx 256 -n 16 --profile this-machine-2core --svg docs/sweep.svg

Every figure comes from `flashlm bench --json` and `flashlm ppl` run as child processes (one per
point), so each point has its own process and peak RSS. Writes a markdown table to stdout and an SVG
plot (no plotting dependency).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path


def _flashlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashlm", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)


def point(model: str, budget: str, mode: str, args) -> dict:
    common = ["--budget", budget, "--mode", mode, "--ctx", str(args.ctx)] + (
        ["--profile", args.profile] if args.profile else [])
    row = {"budget": budget, "mode": mode}
    b = _flashlm("bench", model, "-p", "0", "-n", str(args.n_gen), "-r", str(args.reps), "--json", *common)
    rows = [json.loads(line) for line in b.stdout.splitlines() if line.startswith("{")]
    if b.returncode or not rows or "error" in rows[0]:
        row["error"] = (rows[0].get("error") if rows else None) or b.stderr.strip().splitlines()[-1]
        return row
    r = rows[0]
    row.update(tps=r["avg_ts"], sd=r["stddev_ts"], mb_per_token=r["bytes_per_token"] / 1e6,
               hit=r.get("hit_rate"), peak_rss_mib=r["peak_rss"] / 2**20)
    p = _flashlm("ppl", model, "-f", args.text, "-n", str(args.ppl_tokens), "--no-progress", *common)
    m = re.search(r"perplexity: ([\d.]+)", p.stdout)
    row["ppl"] = float(m.group(1)) if m else None
    plan = re.search(r"layers: (\d+) sparse.*?(\d+) resident, (\d+) streamed", p.stderr)
    row["layers"] = "/".join(plan.groups()) if plan else "-"
    return row


def svg(rows: list[dict], path: Path) -> None:
    """Two panels: tokens/s and MB read per token against budget, one line per mode."""
    ok = [r for r in rows if "error" not in r]
    modes = sorted({r["mode"] for r in ok})
    colors = {"flash": "#d62728", "hybrid": "#1f77b4", "naive": "#7f7f7f"}
    W, H, pad = 360, 240, 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H}" font-family="sans-serif" font-size="11">']
    for panel, (key, label) in enumerate((("tps", "decode tokens/s"), ("mb_per_token", "MB read / token"))):
        x0 = panel * W
        xs = [float(r["budget"].rstrip("%")) for r in ok]
        ys = [r[key] for r in ok] or [1]
        xmin, xmax, ymax = min(xs, default=0), max(xs, default=100), max(ys) * 1.1 or 1
        sx = lambda v: x0 + pad + (v - xmin) / max(xmax - xmin, 1) * (W - 2 * pad)
        sy = lambda v: H - pad - v / ymax * (H - 2 * pad)
        out.append(f'<text x="{x0 + W / 2}" y="14" text-anchor="middle">{label} vs budget (% of model bytes)</text>')
        out.append(f'<line x1="{x0 + pad}" y1="{H - pad}" x2="{x0 + W - pad}" y2="{H - pad}" stroke="black"/>')
        out.append(f'<line x1="{x0 + pad}" y1="{pad}" x2="{x0 + pad}" y2="{H - pad}" stroke="black"/>')
        out.append(f'<text x="{x0 + 4}" y="{pad}">{ymax:.3g}</text>')
        for v in sorted(set(xs)):
            out.append(f'<text x="{sx(v)}" y="{H - pad + 14}" text-anchor="middle">{v:g}</text>')
        for i, mode in enumerate(modes):
            pts = sorted((float(r["budget"].rstrip("%")), r[key]) for r in ok if r["mode"] == mode)
            poly = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in pts)
            out.append(f'<polyline points="{poly}" fill="none" stroke="{colors.get(mode, "black")}" stroke-width="2"/>')
            out.append(f'<text x="{x0 + W - pad}" y="{pad + 14 * i}" fill="{colors.get(mode, "black")}" '
                       f'text-anchor="end">{mode}</text>')
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--text", default="tools/data/heldout.txt")
    ap.add_argument("--budgets", default="40,50,60,80,100")
    ap.add_argument("--modes", default="flash,hybrid")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("-n", "--n-gen", type=int, default=16)
    ap.add_argument("-r", "--reps", type=int, default=2)
    ap.add_argument("--ppl-tokens", type=int, default=400)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--svg", default=None)
    args = ap.parse_args()
    rows = [point(args.model, f"{b}%", mode, args) for b in args.budgets.split(",") for mode in args.modes.split(",")]
    print("| budget | mode | tokens/s | MB read/token | hit % | perplexity | layers sparse/resident/streamed | peak RSS MiB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['budget']} | {r['mode']} | refused: {r['error']} |")
            continue
        hit = f"{100 * r['hit']:.1f}" if r.get("hit") is not None else "-"
        ppl = f"{r['ppl']:.3f}" if r.get("ppl") else "-"
        print(f"| {r['budget']} | {r['mode']} | {r['tps']:.2f} ± {r['sd']:.2f} | {r['mb_per_token']:.1f} | {hit} | "
              f"{ppl} | {r.get('layers', '-') if r['mode'] == 'flash' else '-'} | {r['peak_rss_mib']:.0f} |")
    if args.svg:
        svg(rows, Path(args.svg))
    return 0


if __name__ == "__main__":
    sys.exit(main())

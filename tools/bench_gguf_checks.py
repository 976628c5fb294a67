"""Time to a checked GGUF header: flashlm's validating reader vs gguf.GGUFReader (what the converter
used before), alternating the two in one run. Usage: python tools/bench_gguf_checks.py FILE.gguf... [-r 3]

Columns: flashlm parse + hyperparameter/tokenizer checks (what runs before any error can be reported),
the same plus decoding the vocabulary (what a successful conversion then needs), and GGUFReader's parse.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import gguf

from flashlm.converters.gguf_file import GGUFFile, check_model_metadata


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("-r", "--reps", type=int, default=3)
    args = ap.parse_args()

    def checked(p):
        f = GGUFFile(p)
        check_model_metadata(f)
        return f

    def decoded(p):
        checked(p).fields["tokenizer.ggml.tokens"].contents()

    print("| file | tokens | flashlm checks (s) | + vocabulary decoded (s) | gguf.GGUFReader (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for p in args.files:
        a, b, c = [], [], []
        for _ in range(args.reps):                   # alternate, so load changes hit all three alike
            a += _time(lambda: checked(p), 1)
            b += _time(lambda: decoded(p), 1)
            c += _time(lambda: gguf.GGUFReader(str(p)), 1)
        n = len(checked(p).fields["tokenizer.ggml.tokens"].value)
        print(f"| {p.name} | {n} | {statistics.median(a):.3f} | {statistics.median(b):.3f} | {statistics.median(c):.2f} |")


if __name__ == "__main__":
    main()

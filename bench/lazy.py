#!/usr/bin/env python3
"""Cold lazy safetensors load (tensors in random order through mmap, the LAZY
loader of suite.py scenario 3) through modelfs from a local dir and from S3
(Garage), through s3fs on the same bucket, and straight from the source dir.
Reports MB/s, the ratio to the source dir, modelfs CPU seconds and origin
bytes, and checks every tensor digest against the source dir's.

  bench/lazy.py [--size 512] [--files 4] [--repeat 2] [--bin A --bin B ...] [-- mount flags]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import suite  # noqa: E402  (only its helpers: LAZY, drop_caches, sh, Env, S3fs)


# suite.LAZY, then how long the loader slept (waiting for bytes): wall time
# less time on a CPU and time waiting for one, which on a loaded 2-core
# machine is steadier than MB/s.
LAZY = "import time as _t; _w0 = _t.time(); _s0 = open('/proc/self/schedstat').read().split()\n" + suite.LAZY + """
_s1 = open('/proc/self/schedstat').read().split()
_d = [(int(b) - int(a)) / 1e9 for a, b in zip(_s0[:2], _s1[:2])]
print((_t.time() - _w0) - sum(_d), *_d)
"""


def lazy(d, waits=None):
    out = suite.sh(sys.executable, "-c", LAZY, d).stdout.split()
    if waits is not None:
        waits.append({"loader_slept_s": round(float(out[2]), 2), "loader_cpu_s": round(float(out[3]), 2),
                      "loader_runqueue_s": round(float(out[4]), 2)})
    return float(out[0]), out[1]


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def mounted_modelfs(binary, src, mp, cache, env, extra):
    suite.sh(binary, "mount", src, mp, "--cache-dir", cache, "--cache-size", "16GiB", *extra, env=env)
    st = json.loads(suite.sh(binary, "stat", mp, "--json").stdout)
    return st["pid"]


def run_modelfs(binary, src, work, env, extra, digest, direct):
    mp = tempfile.mkdtemp(prefix="m-", dir=work)
    cache = tempfile.mkdtemp(prefix="modelfs-lazy-cache-", dir="/dev/shm")
    try:
        pid = mounted_modelfs(binary, src, mp, cache, env, extra)
        suite.drop_caches()
        c0 = cpu_seconds(pid)
        waits = []
        cold, d = lazy(mp, waits)
        cpu = cpu_seconds(pid) - c0
        st = json.loads(suite.sh(binary, "stat", mp, "--json").stdout)
        if d != digest:
            raise RuntimeError(f"WRONG TENSORS through {src}")
        return {"cold_MBps": round(cold), "vs_source_dir": round(cold / direct, 2), "cpu_s": round(cpu, 2), **waits[0],
                "origin_MB": round(st["bytes_from_source"] / 1e6), "source_requests": st["source_requests"]}
    finally:
        suite.sh(binary, "unmount", mp, check=False)
        shutil.rmtree(cache, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512, help="MiB")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--bin", action="append", help="modelfs binaries to compare, in turn (default target/release/modelfs)")
    ap.add_argument("--no-s3fs", action="store_true")
    ap.add_argument("extra", nargs="*", help="extra modelfs mount flags (after --)")
    a = ap.parse_args()
    a.bin = a.bin or [suite.BIN]
    work = tempfile.mkdtemp(prefix="modelfs-lazy-", dir="/var/tmp")
    env = suite.Env(work, True)
    try:
        model = os.path.join(work, "model")
        suite.sh(a.bin[0], "synth", model, "--size", f"{a.size}MiB", "--files", str(a.files), "--dtype", "f16")
        env.push(model, "model")
        rows = {}
        for r in range(a.repeat):
            suite.drop_caches()
            waits = []
            direct, digest = lazy(model, waits)
            rows.setdefault("source_dir", []).append({"cold_MBps": round(direct), **waits[0]})
            for b in a.bin:
                tag = os.path.basename(b)
                rows.setdefault(f"{tag} local", []).append(
                    run_modelfs(b, model, work, env.env, a.extra, digest, direct))
                rows.setdefault(f"{tag} s3", []).append(
                    run_modelfs(b, "s3://models/model", work, env.env, ["--endpoint", env.endpoint, *a.extra],
                                digest, direct))
            if not a.no_s3fs:
                s = suite.S3fs(env)
                try:
                    mp = s.mount("model", env.endpoint)
                    suite.drop_caches()
                    waits = []
                    cold, d = lazy(mp, waits)
                    if d != digest:
                        raise RuntimeError("WRONG TENSORS through s3fs")
                    rows.setdefault("s3fs", []).append({"cold_MBps": round(cold), "vs_source_dir": round(cold / direct, 2),
                                                     **waits[0]})
                finally:
                    s.unmount()
        print(json.dumps(rows, indent=1))
    finally:
        env.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

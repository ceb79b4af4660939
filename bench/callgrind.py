"""One fixed cold read of modelfs under callgrind: the instruction count is the
stable figure to track (wall clock on a shared 2-core machine is not).

The daemon runs in the foreground under valgrind, mounts a local directory
holding one synthetic file (fixed size and seed), `cat` reads it once, the
mount is unmounted and callgrind writes its profile when the daemon exits.
The count covers the daemon's whole life: start, the read, unmount.
"""
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time

MIB = 1 << 20


def _b2(path):
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while b := f.read(8 * MIB):
            h.update(b)
    return h.hexdigest()


def _annotate(out, inclusive, only=None):
    """(total Ir, the 5 costliest functions, those whose name holds `only` if given)."""
    args = ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", out]
    text = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True).stdout
    total, top = None, []
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([\s\d.]+%\)\s+)?(.*)$", line)
        if not m:
            continue
        ir, what = int(m.group(1).replace(",", "")), m.group(2).strip()
        if what.startswith("PROGRAM TOTALS"):
            total = ir
        elif total is not None and len(top) < 5:
            # "file:function [object]": the function is what is tracked.
            function = re.sub(r"\s*\[[^\]]*\]$", "", what).split(":", 1)[-1]
            if only is None or only in function:
                top.append({"Ir": ir, "function": function})
    if total is None:
        raise RuntimeError(f"callgrind_annotate printed no PROGRAM TOTALS: {text[-300:]}")
    return total, top


def run(binary, work, drop_caches, size_mib=64, seed=11):
    """Mounts, reads, unmounts; returns the Ir figures (every byte read checked)."""
    if not shutil.which("valgrind") or not shutil.which("callgrind_annotate"):
        raise RuntimeError("valgrind is missing (apt-get install valgrind)")
    base = tempfile.mkdtemp(prefix="callgrind-", dir=work)
    src, mp, cache = (os.path.join(base, d) for d in ("src", "mnt", "cache"))
    os.makedirs(mp)
    subprocess.run([binary, "synth", src, "--size", f"{size_mib}MiB", "--files", "1", "--seed", str(seed)],
                   check=True, capture_output=True, timeout=300)
    name = next(f for f in os.listdir(src) if f.endswith(".safetensors"))
    want = _b2(os.path.join(src, name))
    nbytes = os.path.getsize(os.path.join(src, name))
    out = os.path.join(base, "callgrind.out")
    with open(os.path.join(base, "valgrind.log"), "w") as log:
        # fuse-compatible: a daemon thread stat-ing its own mount must not
        # hold valgrind's lock while the threads that would answer wait for it.
        daemon = subprocess.Popen(["valgrind", "--tool=callgrind", "--sim-hints=fuse-compatible",
                                   f"--callgrind-out-file={out}", binary, "mount", src, mp, "--foreground",
                                   "--cache-dir", cache, "--cache-size", "1GiB"],
                                  stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    try:
        # Under valgrind the daemon starts about fifty times slower.
        for _ in range(1200):
            if os.path.ismount(mp) or daemon.poll() is not None:
                break
            time.sleep(0.1)
        if not os.path.ismount(mp):
            raise RuntimeError(f"the daemon under valgrind did not mount (see {base}/valgrind.log)")
        drop_caches()
        cat = subprocess.run(f"cat {mp}/{name} | b2sum -l 128", shell=True, capture_output=True, text=True,
                             timeout=1200)
        if cat.returncode != 0 or cat.stdout.split()[0] != want:
            raise RuntimeError(f"WRONG BYTES from the mount under valgrind: {cat.stderr[-200:]}")
    finally:
        subprocess.run([binary, "unmount", mp], capture_output=True, timeout=120)
        try:
            daemon.wait(timeout=300)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
            subprocess.run(["umount", "-l", mp], capture_output=True)
    seconds = time.time() - t0
    if daemon.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"the daemon under valgrind exited {daemon.returncode} without a profile")
    # Inclusive cost is topped by thread-start wrappers that hold everything;
    # modelfs's own functions are what a change moves.
    total, inclusive = _annotate(out, True, only="modelfs")
    _, self_cost = _annotate(out, False)
    shutil.rmtree(base, ignore_errors=True)
    return {"file_MiB": round(nbytes / MIB, 1), "seed": seed, "total_Ir": total,
            "Ir_per_MiB": round(total / (nbytes / MIB)), "seconds_under_valgrind": round(seconds),
            "rows": [{"cost": "inclusive (modelfs functions)", **r} for r in inclusive]
            + [{"cost": "self", **r} for r in self_cost]}

"""The report's opening: the issue's goals, each with this run's figure and
whether it is met, then the daemon CPU and memory of every system, then the
callgrind count to track across commits."""

CHUNK_MIB = 8
PREFETCH_CONCURRENCY = 16
# Memory the read path may hold in flight: --max-inflight (128 MiB by
# default, the 16 prefetched chunks) plus the two chunks kept for readers'
# misses. The RSS goal is 64 MiB on top of that.
PREFETCH_BOUND_MIB = CHUNK_MIB * (PREFETCH_CONCURRENCY + 2)
# The row of scenario 0 with what a cache's copies cost here without modelfs.
FLOOR = "floor: the source copied into tmpfs and read back once, by dd"
S5CMD = "s5cmd (raw parallel download to /dev/shm)"
S3_FLOOR = "floor: the objects downloaded into tmpfs by curl and read back once"


def _row(scenario, system):
    for r in (scenario or {}).get("rows", []):
        if r.get("system") == system:
            return r
    return {}


def _check(value, ok):
    if not isinstance(value, (int, float)):
        return "-", "not measured"
    return value, "yes" if ok(value) else "**no**"


def _goal_with_floor(goal, scenario, floor):
    """`goal`, with the run's floor of the same copies beside it."""
    v = _row(scenario, floor).get("cold_cpu_s_per_GiB")
    return goal + (f" (this run's floor: {v}, before a checksum or FUSE)" if v is not None else "")


def goal_rows(s):
    local = _row(s.get("0_local_dir"), "modelfs over the directory")
    huge = _row(s.get("0_local_dir"), "modelfs over the directory, huge-page tmpfs cache")
    s3 = _row(s.get("1_2_cold_warm"), "modelfs")
    lazy = s.get("3_lazy_mmap") or {}
    lazy_mfs = _row(lazy, "modelfs")
    others = [r["cold_MBps"] for r in lazy.get("rows", [])
              if r.get("system") not in ("modelfs", "source directory, read directly") and "cold_MBps" in r]
    rss_cap = 64 + PREFETCH_BOUND_MIB
    local_goal = _goal_with_floor("<= 0.6", s.get("0_local_dir"), FLOOR)
    s3_goal = _goal_with_floor("<= 0.9", s.get("1_2_cold_warm"), S3_FLOOR)
    rows = [
        ("daemon CPU-s/GiB, cold, local-dir source", local_goal, local.get("cold_cpu_s_per_GiB"), lambda v: v <= 0.6),
        ("the same, cache on a tmpfs mounted with huge=within_size", "<= 0.6", huge.get("cold_cpu_s_per_GiB"),
         lambda v: v <= 0.6),
        ("daemon CPU-s/GiB, cold, S3 (Garage on loopback)", s3_goal, s3.get("cold_cpu_s_per_GiB"), lambda v: v <= 0.9),
        ("cold, 4 readers, local dir / reading the source dir", ">= 0.9", local.get("cold_vs_source_dir"), lambda v: v >= 0.9),
        ("daemon peak RSS MiB, cold from S3", f"<= 64 + {PREFETCH_BOUND_MIB} (--max-inflight 128 MiB + 2 x "
         f"{CHUNK_MIB} MiB for readers) = {rss_cap}", s3.get("cold_peak_rss_MiB"), lambda v: v <= rss_cap),
        ("lazy load cold / reading the source dir", ">= 0.9", lazy_mfs.get("cold_vs_source_dir"), lambda v: v >= 0.9),
        ("lazy load cold MB/s, ahead of every other system", f"> {max(others)}" if others else "> the others",
         lazy_mfs.get("cold_MBps"), lambda v: bool(others) and v > max(others)),
    ]
    out = []
    for name, goal, value, ok in rows:
        v, met = _check(value, ok)
        out.append({"figure": name, "goal": goal, "this_run": v, "met": met})
    tracked = [
        ("warm (after drop_caches) / tmpfs, local dir", local.get("warm_vs_tmpfs")),
        ("first reopen after cold / tmpfs, local dir", local.get("first_reopen_vs_tmpfs")),
        ("warm / tmpfs, S3", s3.get("warm_vs_tmpfs")),
        ("after `warm`, first open / tmpfs, S3", s3.get("after_warm_first_open_vs_tmpfs")),
        ("cold S3 / s5cmd", s3.get("cold_vs_s5cmd")),
        ("8 readers, seconds", _row(s.get("4_multiprocess"), "modelfs").get("seconds")),
        ("`modelfs demo` cold / source dir", next((r["vs_source"] for r in (s.get("11_demo") or {}).get("rows", [])
                                                   if r["load"].startswith("modelfs, cold")), None)),
    ]
    for name, value in tracked:
        out.append({"figure": name, "goal": "no slower than the previous run", "this_run": value if value is not None
                    else "-", "met": "compare with the previous report"})
    return out


def daemon_rows(s):
    """Daemon CPU and peak RSS of every system, cold and warm, S3 and local dir."""
    out = []
    for key, source in (("0_local_dir", "local dir"), ("1_2_cold_warm", "S3")):
        for r in (s.get(key) or {}).get("rows", []):
            if "cold_cpu_s_per_GiB" in r or "error" in r:
                keep = ("system", "cold_cpu_s_per_GiB", "cold_peak_rss_MiB", "warm_cpu_s_per_GiB",
                        "warm_peak_rss_MiB", "error")
                out.append({"source": source, **{k: r[k] for k in keep if k in r}})
    return out


def plot_daemon(res, out, plt):
    """daemon.png: cold CPU-s/GiB and peak RSS per system; returns its name or None."""
    # Daemons only: the floors and s5cmd have no daemon (and no RSS measured).
    rows = [r for r in daemon_rows(res["scenarios"]) if "cold_cpu_s_per_GiB" in r and "cold_peak_rss_MiB" in r]
    if not rows:
        return None
    names = [f"{r['system'].replace(' over the directory', '').replace(', ', chr(10))}\n({r['source']})" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(names, [r["cold_cpu_s_per_GiB"] for r in rows])
    a.set_ylabel("daemon CPU-s per GiB, cold")
    b.bar(names, [r["cold_peak_rss_MiB"] for r in rows])
    b.set_ylabel("daemon peak RSS, MiB, cold")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}/daemon.png")
    return "daemon.png"


def callgrind_lines(cg, table):
    if cg is None or "error" in cg:
        return [f"Did not run: {cg.get('error') if cg else 'skipped'}", ""]
    return [f"modelfs daemon under `valgrind --tool=callgrind`, local-dir source, one cold `cat` of a "
            f"{cg['file_MiB']} MiB synthetic file (seed {cg['seed']}), from start to unmount: "
            f"**{cg['total_Ir']:,} Ir**, {cg['Ir_per_MiB']:,} Ir per MiB read "
            f"({cg['seconds_under_valgrind']} s under valgrind).", "",
            table(cg["rows"], ["cost", "Ir", "function"]), ""]


def lines(res, table):
    s = res["scenarios"]
    size = ("Quick run: a 256 MiB model; the issue states the RSS goal for 2 GiB (the full run)." if res["quick"]
            else "The model is 2 GiB, the size the issue states the RSS goal for.")
    md = ["## Goals (issue #11)", "", table(goal_rows(s), ["figure", "goal", "this_run", "met"]), "", size, ""]
    md += ["## Daemon CPU and memory per system", "",
           "CPU: utime+stime of the FUSE daemon's processes (from /proc/PID/stat, before and after the load) per GiB "
           "read. Peak RSS: VmHWM of the process serving /dev/fuse (reset through clear_refs before each load). The "
           "floor rows (dd, curl) and s5cmd's are those tools' own CPU (getrusage of the children) for the same bytes "
           "without FUSE: what putting the model in tmpfs, and reading it once, costs here at all.", "",
           table(daemon_rows(s), ["system", "source", "cold_cpu_s_per_GiB", "cold_peak_rss_MiB", "warm_cpu_s_per_GiB",
                                  "warm_peak_rss_MiB", "note"]), ""]
    md += ["## Instruction count (the stable figure to track)", ""] + callgrind_lines(s.get("10_callgrind"), table)
    return md

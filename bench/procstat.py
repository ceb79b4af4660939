"""CPU seconds and peak RSS of the FUSE daemon serving a mount, from /proc.

A daemon is found by its mount point: the processes whose command line names
it (a daemon that forks, like `juicefs mount -d`, keeps a supervisor and a
child), their descendants, and among them the one holding /dev/fuse, which
serves the mount and whose memory is the figure (a supervisor's is not).
"""
import os

CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30


def _stat(pid):
    """(ppid, CPU seconds of the process and its reaped children), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # Fields after the command name: state, ppid, ..., utime (index 11),
    # stime, cutime, cstime. Children a daemon reaped count as its own work.
    return int(rest[1]), sum(int(x) for x in rest[11:15]) / CLK_TCK


def _cmdline(pid):
    """The words of a command line; split on blanks too, as some daemons
    (juicefs) rewrite their arguments into one string."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [w.rstrip("/") for w in f.read().decode(errors="replace").replace("\0", " ").split()]
    except OSError:
        return []


def _pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def daemon_tree(mountpoint, pid=None):
    """The pids serving mountpoint: pid (if known), every process naming the
    mount point as an argument, and all their descendants."""
    mp = os.path.realpath(mountpoint).rstrip("/")
    parent = {}
    roots = {pid} if pid else set()
    for p in _pids():
        st = _stat(p)
        if st is None:
            continue
        parent[p] = st[0]
        if mp in _cmdline(p):
            roots.add(p)
    tree = set(roots)
    grew = True
    while grew:
        kids = {p for p, pp in parent.items() if pp in tree and p not in tree}
        tree |= kids
        grew = bool(kids)
    return tree


def _holds_fuse(pid):
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                return True
        except OSError:
            pass
    return False


def server_pid(mountpoint, pid=None):
    """The process that serves the mount: the one of the tree holding
    /dev/fuse, or if a supervisor holds it too (juicefs keeps the fd to
    restart its child), the child."""
    if pid:
        return pid
    tree = daemon_tree(mountpoint)
    holders = {p for p in tree if _holds_fuse(p)}
    for p in sorted(holders):
        st = _stat(p)
        if st and st[0] in holders:
            return p
    if holders:
        return min(holders)
    raise RuntimeError(f"no process serving {mountpoint} holds /dev/fuse (daemon tree {sorted(tree)})")


def _peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


class Meter:
    """Daemon CPU and peak RSS over one load: start() before it, stop() after."""

    def __init__(self, mountpoint, pid=None):
        self.mp = mountpoint
        self.server = server_pid(mountpoint, pid)
        self.pid = pid

    def _cpu(self):
        out = {}
        for p in daemon_tree(self.mp, self.pid or self.server):
            st = _stat(p)
            if st:
                out[p] = st[1]
        return out

    def start(self):
        self.before = self._cpu()
        # "5" resets VmHWM to the current RSS, so each load gets its own peak.
        with open(f"/proc/{self.server}/clear_refs", "w") as f:
            f.write("5")

    def stop(self, label, nbytes):
        """{label_cpu_s_per_GiB, label_peak_rss_MiB} for a load of nbytes."""
        after = self._cpu()
        secs = sum(v - self.before.get(p, 0.0) for p, v in after.items())
        return {f"{label}_cpu_s_per_GiB": round(secs / (nbytes / GIB), 3),
                f"{label}_peak_rss_MiB": round(_peak_rss_kib(self.server) / 1024, 1)}

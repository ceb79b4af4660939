#!/usr/bin/env python3
"""A flow-level simulation of N modelfs nodes loading one model through the
peer group, for the old protocol (every node sweeps chunks 0, 1, 2, ... and
asks each chunk's owner) and the new one (own chunks first, then from a
per-node offset; owners over their load bound redirect to holders).

Why flow-level: store-and-forward over FIFO links (the model this replaces)
has no fair sharing, so it cannot show N-1 nodes crowding the same owner's
uplink while other uplinks idle, which is the whole problem.

Model: every node has an uplink and a downlink; the origin has an aggregate
link and a per-GET cap. A flow is one chunk moving origin->node or
node->node. Rates are max-min fair over the links each flow crosses
(progressive filling). Time advances in steps: each step the rates of all
active flows are computed at once (numpy), the clock moves to the time by
which a small fraction of them finishes, finished flows are retired and
their nodes issue new requests. A flow that finishes inside a step frees its
slot at the step's end, so times are slightly pessimistic; `batch` sets the
fraction (smaller is more exact and slower).

Assumptions (see `Params`): owners are uniform random per chunk (what
rendezvous hashing gives); no latency, CPU, disk or protocol overhead; a
holder always still has the chunk (no eviction); requests waiting for an
owner's origin fetch hold their slot; a fast reader reads each file in order
(a reader's miss is requested at once, outside the prefetch slots); the
prefetch window bounds chunks held unread plus prefetches in flight.
Run `python3 bench/fleetsim.py --help`.
"""
import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass

import numpy as np

MIB = 1 << 20
ORIGIN, PEER = 0, 1


@dataclass
class Params:
    nodes: int = 1
    model_bytes: int = 62 * 10**9
    files: int = 1
    chunk: int = 8 * MIB
    up_bps: float = 25e9
    down_bps: float = 25e9
    origin_bps: float = 100e9
    get_bps: float = 1e9  # per origin GET; math.inf for none
    concurrency: int = 16
    protocol: str = "old"  # "old", "new", or "none" (no peers: every node reads the origin)
    load_bound: int = 4  # new: an owner with more uploads than this redirects
    holders_kept: int = 8  # new: holders an owner remembers per chunk
    window_bytes: float = math.inf  # prefetched and unread at most; inf = warm/preload
    reader: bool = True  # a fast reader per file, whose misses jump the queue
    unfairness: float = 0.0  # a flow's weight is uniform in 1 +- this (TCP is not fair); 0: exact fair shares
    batch: float = 0.01  # fraction of active flows that may finish per step
    seed: int = 1


def maxmin(links, fcap, cap, weight=None):
    """Max-min fair rates. links: (k, F) index of each flow's k links; fcap:
    per-flow cap; cap: link capacities; weight: a flow's share relative to
    others on a link (weighted max-min; None: all 1). Progressive filling, done in rounds:
    a link's level (capacity left / flows left) only rises as flows freeze
    elsewhere at lower levels, so every link whose level no flow on it finds
    lower on another link or in its cap is a bottleneck now, and all of
    them (not only the global minimum) freeze at once. Exact, and far fewer
    rounds than raising all flows level by level."""
    nl = len(cap)
    rate = np.empty(links.shape[1])
    left = cap.astype(float).copy()
    live = np.arange(links.shape[1])
    w = np.ones(links.shape[1]) if weight is None else weight
    lk, fc = links, fcap / w
    tol = 1 + 1e-9
    while live.size:
        cnt = np.zeros(nl)
        for row in lk:
            cnt += np.bincount(row, weights=w, minlength=nl)
        with np.errstate(divide="ignore", invalid="ignore"):
            level = np.where(cnt > 0, np.maximum(left, 0) / cnt, np.inf)
        per = [level[row] for row in lk]
        low = np.minimum.reduce(per + [fc])
        seen = np.full(nl, np.inf)
        for row in lk:
            np.minimum.at(seen, row, low)
        bottleneck = level <= seen * tol
        freeze = fc <= low * tol
        for row, lv in zip(lk, per):
            freeze |= bottleneck[row] & (lv <= low * tol)
        r = low[freeze] * w[freeze]
        rate[live[freeze]] = r
        for row in lk:
            left -= np.bincount(row[freeze], weights=r, minlength=nl)
        keep = ~freeze
        live, lk, fc, w = live[keep], lk[:, keep], fc[keep], w[keep]
    return rate


class Sim:
    def __init__(self, p: Params):
        self.p = p
        n = p.nodes
        rng = np.random.default_rng(p.seed)
        self.rnd = random.Random(p.seed)
        # Files of equal size, each in chunks; the last chunk of a file may be short.
        fsize = [p.model_bytes // p.files + (1 if i < p.model_bytes % p.files else 0) for i in range(p.files)]
        self.size, self.file_of, self.file_start, self.file_end = [], [], [], []
        for f, fs in enumerate(fsize):
            self.file_start.append(len(self.size))
            k = max(1, -(-fs // p.chunk))
            self.size += [min(p.chunk, fs - i * p.chunk) for i in range(k)]
            self.file_of += [f] * k
            self.file_end.append(len(self.size))
        self.nchunks = c = len(self.size)
        self.owner = rng.integers(0, n, c).tolist()
        self.has = [bytearray(c) for _ in range(n)]
        self.asked = [bytearray(c) for _ in range(n)]
        self.got = [0] * n
        self.done_at = [None] * n
        self.busy = [0] * n  # prefetches in flight (or waiting for an owner's fetch)
        self.unread = [0] * n
        self.pos = [list(self.file_start) for _ in range(n)]
        self.uploads = [0] * n
        self.uploaded = [0] * n
        self.fetching = {}  # (owner, chunk) -> requesters waiting for the owner's origin fetch
        self.holders = {}  # chunk -> nodes its owner served it to, newest last
        self.origin_bytes = 0
        self.redirects = 0
        self.order = [self._order(i) for i in range(n)]
        self.ptr = [0] * n
        self.wchunks = math.inf if p.window_bytes == math.inf else max(1, int(p.window_bytes // p.chunk))
        # Links: uplinks 0..n-1, downlinks n..2n-1, origin 2n.
        self.cap = np.array([p.up_bps / 8] * n + [p.down_bps / 8] * n + [p.origin_bps / 8])
        self.new = []  # flows to start: (kind, chunk, sender, receiver, prefetch)
        self.t = 0.0
        self.wrng = rng

    def _order(self, node):
        """The chunks in the order this node's prefetch asks for them."""
        p = self.p
        per_file = []
        for f in range(p.files):
            a, b = self.file_start[f], self.file_end[f]
            if p.protocol != "new":
                per_file.append(list(range(a, b)))
                continue
            own = [c for c in range(a, b) if self.owner[c] == node]
            off = self.rnd.randrange(b - a)
            rest = [a + (off + i) % (b - a) for i in range(b - a)]
            per_file.append(own + [c for c in rest if self.owner[c] != node])
        # Files are read at once: interleave their sweeps.
        out = []
        for i in range(max(len(x) for x in per_file)):
            out += [x[i] for x in per_file if i < len(x)]
        return out

    # Requests.

    def request(self, node, c, prefetch):
        self.asked[node][c] = 1
        if prefetch:
            self.busy[node] += 1
        # Without peers every node is the owner of every chunk it reads.
        o = node if self.p.protocol == "none" else self.owner[c]
        key = (o, c)
        if o == node:
            if key not in self.fetching:
                self.fetching[key] = []
                self.new.append((ORIGIN, c, -1, node, 0))
            self.fetching[key].append((node, prefetch))
            return
        if self.has[o][c]:
            self.serve(o, node, c, prefetch)
        elif key in self.fetching:
            self.fetching[key].append((node, prefetch))
        else:
            self.fetching[key] = [(node, prefetch)]
            self.new.append((ORIGIN, c, -1, o, False))

    def serve(self, o, node, c, prefetch):
        """The owner o has chunk c and node asks for it."""
        p = self.p
        sender = o
        if p.protocol == "new" and self.uploads[o] > p.load_bound:
            hs = [h for h in self.holders.get(c, ()) if h != node]
            if hs:
                # The asker tries up to 4 of them in a shuffled order; here
                # the first always still holds the chunk, so it is a uniform pick.
                sender = hs[self.rnd.randrange(len(hs))]
                self.redirects += 1
        self.uploads[sender] += 1
        self.new.append((PEER, c, sender, node, prefetch))

    def fill(self, node):
        """Issue the reader's miss and then prefetches up to the limits."""
        if self.done_at[node] is not None:
            return
        p, has, asked = self.p, self.has[node], self.asked[node]
        if p.reader:
            for f in range(p.files):
                c = self.pos[node][f]
                if c < self.file_end[f] and not asked[c]:
                    self.request(node, c, False)
        order, i = self.order[node], self.ptr[node]
        while self.busy[node] < p.concurrency and self.unread[node] + self.busy[node] < self.wchunks:
            while i < len(order) and asked[order[i]]:
                i += 1
            if i == len(order):
                break
            self.request(node, order[i], True)
            i += 1
        self.ptr[node] = i

    # Arrivals.

    def arrive(self, node, c, prefetch, t):
        if prefetch:
            self.busy[node] -= 1
        self.hold(node, c, t)

    def hold(self, node, c, t):
        """Node now has chunk c; a fast reader reads on as far as it can.
        Unread counts every chunk held past the reader, including chunks an
        owner fetched for the group before its own sweep reached them."""
        has = self.has[node]
        self.asked[node][c] = 1
        has[c] = 1
        self.got[node] += 1
        if self.p.reader:
            self.unread[node] += 1
            f = self.file_of[c]
            pos, end = self.pos[node][f], self.file_end[f]
            while pos < end and has[pos]:
                pos += 1
                self.unread[node] -= 1
            self.pos[node][f] = pos
        if self.got[node] == self.nchunks:
            self.done_at[node] = t

    def finish(self, kind, c, sender, receiver, prefetch, t):
        if kind == ORIGIN:
            self.origin_bytes += self.size[c]
            waiters = self.fetching.pop((receiver, c))
            if all(node != receiver for node, _ in waiters):
                self.hold(receiver, c, t)
            for node, pf in waiters:
                if node == receiver:
                    self.arrive(node, c, pf, t)
                else:
                    self.serve(receiver, node, c, pf)
            self.fill(receiver)
            return
        self.uploads[sender] -= 1
        self.uploaded[sender] += self.size[c]
        if sender == self.owner[c] and self.p.protocol == "new":
            hs = self.holders.setdefault(c, [])
            if receiver in hs:
                hs.remove(receiver)
            hs.append(receiver)
            if len(hs) > self.p.holders_kept:
                del hs[0]
        self.arrive(receiver, c, prefetch, t)
        self.fill(receiver)

    # The clock.

    def run(self):
        p, n = self.p, self.p.nodes
        for i in range(n):
            self.fill(i)
        # Active flows, as parallel arrays.
        links = np.zeros((2, 0), dtype=np.int64)
        fcap = np.zeros(0)
        weight = np.zeros(0)
        rem = np.zeros(0)
        meta = np.zeros((5, 0), dtype=np.int64)  # kind, chunk, sender, receiver, prefetch
        steps = 0
        while True:
            if self.new:
                m = np.array(self.new, dtype=np.int64).T
                self.new = []
                src = np.where(m[0] == ORIGIN, 2 * n, m[2])
                links = np.concatenate([links, np.stack([src, n + m[3]])], axis=1)
                fcap = np.concatenate([fcap, np.where(m[0] == ORIGIN, p.get_bps / 8, np.inf)])
                weight = np.concatenate([weight, 1 + p.unfairness * self.wrng.uniform(-1, 1, m.shape[1])])
                rem = np.concatenate([rem, np.array([self.size[c] for c in m[1]], dtype=float)])
                meta = np.concatenate([meta, m], axis=1)
            if rem.size == 0:
                break
            rate = maxmin(links, fcap, self.cap, weight)
            tf = rem / rate
            k = max(1, int(rem.size * p.batch))
            dt = np.partition(tf, k - 1)[k - 1] if k < rem.size else tf.max()
            fin = tf <= dt * (1 + 1e-9)
            steps += 1
            order = np.argsort(tf[fin], kind="stable")
            ends = (self.t + tf[fin])[order]
            done = meta[:, fin][:, order].T.tolist()
            keep = ~fin
            links, fcap, weight, meta = links[:, keep], fcap[keep], weight[keep], meta[:, keep]
            rem = rem[keep] - rate[keep] * dt
            self.t += dt
            for (kind, c, s, r, pf), te in zip(done, ends.tolist()):
                self.finish(kind, c, s, r, pf, te)
        if any(d is None for d in self.done_at):
            raise RuntimeError("fleetsim: a node never finished (a bug in the simulation)")
        total_up = sum(self.uploaded)
        return {
            "N": n,
            "protocol": p.protocol,
            "seconds": round(max(self.done_at), 3),
            "mean_seconds": round(sum(self.done_at) / n, 3),
            "origin_per_model": round(self.origin_bytes / p.model_bytes, 3),
            "max_upload_share": round(max(self.uploaded) / total_up, 4) if total_up else 0.0,
            "max_upload_per_model": round(max(self.uploaded) / p.model_bytes, 2),
            "redirects": self.redirects,
            "steps": steps,
        }


def bound(p: Params):
    """Seconds no protocol can beat: a node's downlink; the origin sending
    the model once; all bytes the fleet needs over all uplinks plus the
    origin; a single node's origin GETs."""
    m = p.model_bytes * 8
    b = max(m / p.down_bps, m / p.origin_bps, p.nodes * m / (p.nodes * p.up_bps + p.origin_bps))
    if p.protocol == "none":
        b = max(b, p.nodes * m / p.origin_bps)
    if p.nodes == 1 or p.protocol == "none":
        b = max(b, m / min(p.origin_bps, p.concurrency * p.get_bps))
    return round(b, 2)


def check(p: Params):
    """Refuses parameters the model cannot run, naming the fix."""
    if p.protocol not in ("old", "new", "none"):
        raise ValueError(f"protocol {p.protocol!r}: use old, new or none")
    if p.nodes < 1 or p.concurrency < 1 or p.files < 1 or p.chunk < 1 or p.model_bytes < 1:
        raise ValueError("nodes, concurrency, files, chunk and model must be at least 1")
    if min(p.up_bps, p.down_bps, p.origin_bps, p.get_bps, p.window_bytes) <= 0:
        raise ValueError("rates and the window must be above 0")
    if not 0 < p.batch <= 1 or not 0 <= p.unfairness < 1:
        raise ValueError("batch must be in (0, 1] and unfairness in [0, 1)")


def simulate(p: Params):
    check(p)
    t = time.process_time()
    out = Sim(p).run()
    out["bound_s"] = bound(p)
    out["cpu_s"] = round(time.process_time() - t, 1)
    return out


def rate(text):
    """'800mbit', '25gbit', '200Mbit/s', '1e9' -> bits per second."""
    s = str(text).strip().lower().removesuffix("/s").removesuffix("ps").removesuffix("bit")
    mult = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    if s and s[-1] in mult:
        return float(s[:-1]) * mult[s[-1]]
    return float(s)


def size(text):
    """'128MiB', '62GB', '1GiB', '4096' -> bytes."""
    s = str(text).strip()
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "KB": 10**3, "MB": 10**6,
             "GB": 10**9, "TB": 10**12, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1}
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            return int(float(s[: -len(u)]) * units[u])
    return int(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="1 1000", help="node counts, space-separated")
    ap.add_argument("--protocol", default="old new", help="old, new, none (no peers), space-separated")
    ap.add_argument("--model", default="62GB")
    ap.add_argument("--files", type=int, default=1)
    ap.add_argument("--chunk", default="8MiB")
    ap.add_argument("--nic", default="25gbit", help="each node's uplink and downlink")
    ap.add_argument("--origin", default="100gbit", help="the origin's aggregate rate")
    ap.add_argument("--get", default="1gbit", help="one origin GET's rate ('inf' for no cap)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--load-bound", type=int, default=4)
    ap.add_argument("--window", default="inf", help="prefetch window ('inf': whole files, as warm does)")
    ap.add_argument("--no-reader", action="store_true")
    ap.add_argument("--unfairness", type=float, default=0.0)
    ap.add_argument("--batch", type=float, default=0.01)
    a = ap.parse_args()
    try:
        runs = [(proto, int(n)) for proto in a.protocol.split() for n in a.nodes.split()]
        model, chunk, nic = size(a.model), size(a.chunk), rate(a.nic)
        origin, get = rate(a.origin), rate(a.get)
        window = math.inf if a.window == "inf" else size(a.window)
    except ValueError as e:
        ap.error(f"{e}: give sizes like 62GB or 8MiB and rates like 25gbit or 800mbit")
    for proto, n in runs:
        try:
            p = Params(nodes=n, model_bytes=model, files=a.files, chunk=chunk, up_bps=nic, down_bps=nic,
                       origin_bps=origin, get_bps=get, concurrency=a.concurrency, protocol=proto,
                       load_bound=a.load_bound, window_bytes=window, reader=not a.no_reader,
                       unfairness=a.unfairness, batch=a.batch)
            print(json.dumps(simulate(p)), flush=True)
        except ValueError as e:
            ap.error(str(e))


if __name__ == "__main__":
    sys.exit(main())

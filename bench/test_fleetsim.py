#!/usr/bin/env python3
"""Checks of bench/fleetsim.py on cases whose answers are known by hand.
Run: python3 bench/test_fleetsim.py (or python3 -m pytest bench/test_fleetsim.py)."""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fleetsim  # noqa: E402

INF = math.inf
MIB = 1 << 20


def rates(flows, caps, fcap=None):
    """flows: (first link, second link) per flow."""
    links = np.array(flows, dtype=np.int64).T
    fc = np.full(len(flows), INF) if fcap is None else np.array(fcap, dtype=float)
    return fleetsim.maxmin(links, fc, np.array(caps, dtype=float)).tolist()


def close(a, b):
    assert len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, b)), (a, b)


def test_one_flow_gets_the_link():
    close(rates([(0, 1)], [10, INF]), [10])


def test_two_flows_share_a_link():
    close(rates([(0, 1), (0, 2)], [10, INF, INF]), [5, 5])


def test_bottlenecked_elsewhere_leaves_the_rest():
    # Both cross link 0 (10); the first also crosses link 1 (2): it gets 2, the other 8.
    close(rates([(0, 1), (0, 2)], [10, 2, INF]), [2, 8])


def test_per_flow_cap_leaves_the_rest():
    close(rates([(0, 1), (0, 1)], [10, INF], fcap=[1, INF]), [1, 9])


def test_weights_split_a_link():
    links = np.array([[0, 0], [1, 1]])
    got = fleetsim.maxmin(links, np.full(2, INF), np.array([10.0, INF]), np.array([1.0, 3.0])).tolist()
    close(got, [2.5, 7.5])


def test_chain_of_bottlenecks():
    # Link 0 (3) has flows a, b; link 1 (10) has b, c, d; link 2 (1) has d.
    # d = 1 (link 2); a = b = 1.5 (link 0); c takes the rest of link 1: 7.5.
    close(rates([(0, 3), (0, 1), (1, 3), (1, 2)], [3, 10, 1, INF]), [1.5, 1.5, 7.5, 1])


def test_random_cases_match_level_by_level_filling():
    rng = np.random.default_rng(5)
    for _ in range(100):
        nf, nl = int(rng.integers(1, 60)), int(rng.integers(2, 12))
        first = rng.integers(0, nl, nf)
        links = np.stack([first, (first + rng.integers(1, nl, nf)) % nl])  # two different links
        cap = rng.uniform(1, 10, nl)
        fc = np.where(rng.random(nf) < 0.3, rng.uniform(0.1, 3, nf), INF)
        close(fleetsim.maxmin(links, fc, cap).tolist(), slow_maxmin(links, fc, cap))


def slow_maxmin(links, fc, cap):
    """Textbook progressive filling: raise every unfrozen flow together until
    a link fills or a flow reaches its cap, freeze those, repeat."""
    rate, left, live = [0.0] * links.shape[1], list(cap), set(range(links.shape[1]))
    while live:
        cnt = [0] * len(cap)
        for f in live:
            for lnk in links[:, f]:
                cnt[lnk] += 1
        inc = min([left[i] / cnt[i] for i in range(len(cap)) if cnt[i]] + [fc[f] - rate[f] for f in live])
        for f in live:
            rate[f] += inc
        left = [left[i] - inc * cnt[i] for i in range(len(cap))]
        full = {i for i in range(len(cap)) if cnt[i] and left[i] <= 1e-9 * cap[i]}
        live = {f for f in live if not (set(links[:, f].tolist()) & full) and fc[f] - rate[f] > 1e-9}
    return rate


def one(**kw):
    return fleetsim.simulate(fleetsim.Params(**kw))


def test_one_node_from_the_origin():
    # 16 chunks, 16 GETs at 1 Gbit/s at once: one chunk's time.
    r = one(nodes=1, model_bytes=16 * 8 * MIB, get_bps=1e9)
    assert math.isclose(r["seconds"], 8 * MIB * 8 / 1e9, rel_tol=0.01), r
    assert r["origin_per_model"] == 1.0


def test_origin_aggregate_bounds_one_node():
    r = one(nodes=1, model_bytes=10**9, get_bps=INF, origin_bps=8e9, down_bps=1e12)
    assert math.isclose(r["seconds"], 1.0, rel_tol=0.01), r


def test_two_nodes_fetch_the_origin_once():
    for proto in ("old", "new"):
        r = one(nodes=2, model_bytes=64 * 8 * MIB, protocol=proto)
        assert r["origin_per_model"] == 1.0, r
        assert r["seconds"] >= r["bound_s"]


def test_without_peers_every_node_reads_the_origin():
    # 4 nodes share a 1 GB/s origin for 4 GB: 4 s, origin bytes 4x the model.
    r = one(nodes=4, model_bytes=10**9, protocol="none", get_bps=INF, origin_bps=8e9, down_bps=1e12)
    assert math.isclose(r["seconds"], 4.0, rel_tol=0.01) and r["origin_per_model"] == 4.0, r


def test_issue_single_node_figure():
    # The issue: 62 GB, 16 GETs of 1 Gbit/s: 31 s at N = 1.
    r = one(nodes=1)
    assert 30.5 <= r["seconds"] <= 31.5, r


def test_window_limits_prefetch_not_the_result():
    r = one(nodes=4, model_bytes=64 * 8 * MIB, protocol="new", window_bytes=8 * 8 * MIB)
    assert r["origin_per_model"] == 1.0, r


if __name__ == "__main__":
    tests = [(k, v) for k, v in sorted(globals().items()) if k.startswith("test_")]
    for name, fn in tests:
        fn()
        print("ok", name)
    print(f"{len(tests)} passed")

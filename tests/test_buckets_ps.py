"""Per-bucket pushes of the parameter-server algorithms (issue 16; qprsgd/algorithms/dist_ef.py):
signSGD / signum with majority vote always, dist-EF-SGD/blockSGD/blockSGDM/SGDM where the codec's
statistics are per parameter block (``per_bucket`` null) or when asked (``per_bucket: true``).

* Reference: the same algorithm, gradients and draws with many buckets (odd boundaries, empty
  sign shares) and with one bucket give the same iterates and error-feedback state bit for bit,
  on every rank, rank 0 doubling as server and a dedicated server, odd and even M.
* Bits: every rank's ledger counts exactly the payload bytes it handed to the transport (the
  in-process trace); the majority votes send the same bytes as with one bucket, block_sign
  Σ_b (4·B_b + ⌈n_b/8⌉) bytes per worker per step; through the runner the logged bits_up /
  bits_down / payload_bits match.
* ``per_bucket: true`` with ``sign`` is the bucketwise scaled sign (a scale per bucket), and the
  default leaves it whole-vector.
"""
from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import final_params, run_many
from qprsgd.algorithms.base import Env
from qprsgd.algorithms.dist_ef import (DistEFBlockSGD, DistEFBlockSGDM, DistEFSGD, DistEFSGDM, SignSGDMV,
                                       SignumMV, bucket_plan, per_bucket_exact, sign_segments)
from qprsgd.buckets import oracle, plan
from qprsgd.inprocess import LocalCluster, LocalTransport
from qprsgd.logger import read
from qprsgd.registry import CODECS

D, BLOCKS = 61, (5, 3, 20, 2, 1, 17, 13)
SCALE = np.repeat(np.array([1e-3, 1.0, 30.0, 0.1, 5.0, 1.0, 3.0], np.float32), BLOCKS)
LRS = [0.1, 0.1, 0.1, 0.01, 0.01, 0.05, 0.05, 0.001]     # a ÷10 drop, a ×5 rise, a ÷50 drop
LAYOUTS = {"rank0-M3": (3, 0, (0, 1, 2)), "dedicated-M3": (4, 3, (0, 1, 2)),
           "rank0-M2": (2, 0, (0, 1)), "dedicated-M4": (5, 4, (0, 1, 2, 3))}


def ranges_for(cap: int) -> tuple:
    return tuple((lo, hi) for lo, hi, _ in plan(BLOCKS, cap)) if cap else ()


def test_plans_used_here_have_odd_edges_and_empty_shares():
    r = ranges_for(8)
    assert len(r) == 7 and any(lo % 8 for lo, _ in r)
    segs = sign_segments(list(r), D)
    assert (32, 32) in segs and (8, 8) in segs                 # empty shares: no message
    assert segs[0] == (48, 61) and segs[-1] == (0, 8)
    assert all(b == a2 for (a2, _), (_, b) in zip(segs, segs[1:]))   # tiles [0, d), top down


def grad_of(i: int, t: int, x: np.ndarray) -> np.ndarray:
    """Worker i's gradient at step t: A_i x − b_i + noise, block scales 1e-3 … 30 (ties in sign
    are rare but exact zeros occur in no coordinate)."""
    a = np.linspace(0.5, 2.0 + i, D).astype(np.float32)
    b = np.random.default_rng([78, i]).standard_normal(D).astype(np.float32)
    noise = np.random.default_rng([77, i, t]).standard_normal(D).astype(np.float32) * SCALE
    return (a * x - b + noise).astype(np.float32)


class PSCluster:
    """size ranks of one algorithm on the in-process transport with gradient buckets of ``cap``
    bytes over BLOCKS (0: one bucket, env.buckets empty, the oracle's single range)."""

    def __init__(self, cls, layout, cap, codec=None, codec_params=None, wd=0.0, **params):
        size, server, workers = LAYOUTS[layout]
        self.net = LocalCluster(size, timeout=30)
        self.net.trace = []
        self.size, self.server, self.workers = size, server, workers
        self.ranges = ranges_for(cap)
        cp = codec_params or {}
        make = (lambda d, b: CODECS.get(codec).factory(int(d), tuple(b), **cp)) if codec else None
        self.algs = []
        for r in range(size):
            env = Env(comm=LocalTransport(self.net, range(size), r), d=D, workers=workers, server=server,
                      codec=make(D, BLOCKS) if make else None, rng=np.random.default_rng([9, 1, r]),
                      blocks=BLOCKS, weight_decay=wd, make_codec=make, buckets=self.ranges)
            self.algs.append(cls(np.random.default_rng(5).standard_normal(D).astype(np.float32), env, **params))

    def step(self, t, lr):
        def one(r, a):
            g = None
            if r in self.workers:
                i = self.workers.index(r)
                g = oracle(lambda: grad_of(i, t, a.x), self.ranges or None)
            try:
                a.step(t, lr, g)
            except BaseException as e:
                self.net.fail(r, e)
                raise
        with ThreadPoolExecutor(self.size) as ex:
            for f in [ex.submit(one, r, a) for r, a in enumerate(self.algs)]:
                f.result()

    def traced(self) -> dict:
        """{(rank, channel): bytes handed to the transport} from the trace of every message."""
        out = defaultdict(int)
        for ch, src, _dst, data in self.net.trace:
            out[(src, ch)] += data.nbytes
        return out

    def state(self, alg) -> dict:
        return {k: np.array(v, copy=True) for k, v in alg.state_dict().items()} | {"x": alg.x.copy()}


CASES = {
    "signsgd_mv": (SignSGDMV, None, {}),
    "signum_mv": (SignumMV, None, {"momentum": 0.9}),
    "dist_ef_blocksgd": (DistEFBlockSGD, "block_sign", {}),
    "dist_ef_blocksgdm": (DistEFBlockSGDM, "block_sign", {"momentum": 0.9}),
    "dist_ef_sgd+identity": (DistEFSGD, "identity", {}),
    "dist_ef_sgdm+block_sign": (DistEFSGDM, "block_sign", {"momentum": 0.5}),
}


def _check_ledgers_equal_trace(cl: PSCluster) -> None:
    traced = cl.traced()
    for r, a in enumerate(cl.algs):
        led = a.env.comm.ledger
        for ch in ("up", "down"):
            assert led.bytes.get(ch, 0) == traced.get((r, ch), 0), (r, ch)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_bucketed_equals_one_bucket_bit_for_bit(name, layout):
    """Buckets of 8 bytes (7 buckets, odd edges, empty sign shares) and of 100 bytes give the
    one-bucket iterates and state on every rank after every step, across lr changes with weight
    decay; each rank's counted bytes are the bytes it handed over; the votes' bytes equal the
    one-bucket run's, block_sign's up bytes Σ_b (4·B_b + ⌈n_b/8⌉) per worker per step."""
    cls, codec, params = CASES[name]
    runs = {cap: PSCluster(cls, layout, cap, codec=codec, wd=0.01, **params) for cap in (0, 8, 100)}
    if codec is not None:
        assert all(a.per_bucket for cl in runs.values() for a in cl.algs)     # on by default
    for t, lr in enumerate(LRS):
        for cl in runs.values():
            cl.step(t, lr)
        for cap in (8, 100):
            for a, b in zip(runs[0].algs, runs[cap].algs):
                sa, sb = runs[0].state(a), runs[cap].state(b)
                assert sa.keys() == sb.keys()
                for k in sa:
                    np.testing.assert_array_equal(sa[k], sb[k], err_msg=f"{name} cap={cap} step {t}: {k}")
    size, server, workers = LAYOUTS[layout]
    ws = [runs[0].algs[r].x for r in workers]
    assert all(np.array_equal(ws[0], w) for w in ws)                        # one model on every worker
    steps = len(LRS)
    for cap, cl in runs.items():
        _check_ledgers_equal_trace(cl)
        up = {r: cl.algs[r].env.comm.ledger.bytes.get("up", 0) for r in workers if r != server}
        msgs = {r: cl.algs[r].env.comm.ledger.messages.get("up", 0) for r in workers if r != server}
        plan_ = bucket_plan(cl.algs[0].env)
        if codec is None:
            shares = [(a, b) for a, b in sign_segments(plan_, D) if b > a]
            assert all(v == steps * ((D + 7) // 8) for v in up.values()), (cap, up)
            assert all(v == steps * len(shares) for v in msgs.values())
        elif codec == "block_sign":
            per = sum(4 * len([1 for o, s in zip(np.cumsum((0,) + BLOCKS), BLOCKS) if lo <= o < hi])
                      + (hi - lo + 7) // 8 for lo, hi in plan_)
            assert all(v == steps * per for v in up.values()), (cap, up, per)
        for r in range(cl.size):
            np.testing.assert_array_equal(cl.algs[r].env.comm.ledger.bytes.get("down", 0),
                                          runs[0].algs[r].env.comm.ledger.bytes.get("down", 0))


def test_per_bucket_decision():
    env = Env(comm=None, d=D, workers=(0,), server=0, blocks=BLOCKS, buckets=ranges_for(8))
    f = CODECS.get
    assert per_bucket_exact(f("block_sign").factory(D, BLOCKS), env)
    assert per_bucket_exact(f("identity").factory(D, BLOCKS), env)
    assert not per_bucket_exact(f("block_sign").factory(D, BLOCKS, block_size=8), env)
    assert not per_bucket_exact(f("sign").factory(D, BLOCKS), env)
    assert not per_bucket_exact(f("topk").factory(D, BLOCKS, k=5), env)
    odd = Env(comm=None, d=D, workers=(0,), server=0, blocks=BLOCKS, buckets=((29, 61), (0, 29)))
    assert not per_bucket_exact(f("block_sign").factory(D, BLOCKS), odd)   # cuts a block
    with pytest.raises(ValueError, match="tile"):
        bucket_plan(Env(comm=None, d=D, workers=(0,), buckets=((0, 30), (30, 61))))


@pytest.mark.parametrize("layout", ["rank0-M3", "dedicated-M3"])
def test_sign_per_bucket_true_is_the_bucketwise_scaled_sign(layout):
    """dist_ef_sgd + sign: by default whole-vector (one scale); per_bucket: true compresses each
    bucket with its own scale ‖p_b‖₁/n_b: after step 0 (p = g, r_0 = 0) every worker's
    e = p − C_buckets(p), C_buckets = block_sign with the buckets as blocks; the server's Δ̃
    keeps the configured whole-vector sign."""
    plain = PSCluster(DistEFSGD, layout, 8, codec="sign")
    per = PSCluster(DistEFSGD, layout, 8, codec="sign", per_bucket=True)
    assert not any(a.per_bucket for a in plain.algs) and all(a.per_bucket for a in per.algs)
    per.step(0, 0.1)
    plain.step(0, 0.1)
    sizes = [hi - lo for lo, hi in reversed(per.ranges)]
    cb = CODECS.get("block_sign").factory(D, tuple(sizes))
    cw = CODECS.get("sign").factory(D)
    x0 = np.random.default_rng(5).standard_normal(D).astype(np.float32)
    for i, r in enumerate(per.workers):
        g = grad_of(i, 0, x0)
        np.testing.assert_array_equal(per.algs[r].e, g - cb.decode(cb.encode(g).data))
        np.testing.assert_array_equal(plain.algs[r].e, g - cw.decode(cw.encode(g).data))
    assert not np.array_equal(per.algs[per.workers[0]].x, plain.algs[plain.workers[0]].x)
    _check_ledgers_equal_trace(per)


def test_a_bucket_out_of_plan_is_refused():
    cl = PSCluster(SignSGDMV, "rank0-M2", 8)
    a = cl.algs[1]
    with pytest.raises(ValueError, match="env.buckets"):
        a.step(0, 0.1, oracle(lambda: np.ones(D, np.float32), [(0, 61)]))


# ---------------------------------------------------------------------------------------------
# through the runner (in-process): tiny buckets from the backward hooks vs none

def _cfg(alg: dict, bucket_mb: float, server: str = "rank0") -> dict:
    return {"seed": 3, "run": {"progress": False, "server": server},
            "train": {"epochs": 0.25, "batch_size": 8, "lr": 0.05, "eval_every": 20, "log_every": 2,
                      "weight_decay": 1e-3, "bucket_mb": bucket_mb,
                      "schedule": {"kind": "step", "milestones": [0.5], "gamma": 0.1}},
            "model": {"name": "mlp", "hidden": [9, 7]},        # odd parameter sizes: odd bucket edges
            "data": {"name": "digits", "params": {"max_train": 256, "max_test": 64}},
            "algorithm": alg}


def _runs(n, algs, server, tmp_path):
    cfgs = {}
    for name, alg in algs.items():
        cfgs[f"{name}-none"] = _cfg(alg, 0.0, server)
        cfgs[f"{name}-tiny"] = _cfg(alg, 0.0002, server)       # d = 735: one bucket per tensor, odd edges
    return run_many(n, cfgs, tmp_path)


@pytest.mark.parametrize("n,server,algs", [
    (2, "rank0", {"signsgd_mv": {"name": "signsgd_mv"}, "blocksgdm": {"name": "dist_ef_blocksgdm"}}),
    (3, "dedicated", {"signum_mv": {"name": "signum_mv"}}),
])
def test_runner_buckets_equal_none(n, server, algs, tmp_path):
    """The runner in-process: buckets delivered from the backward hooks give the final parameters
    of one bucket bit for bit; the votes log the same bits up and down; blockSGDM the same bits
    down and the same unpadded payload_bits, and up what its per-bucket payloads hold."""
    runs = _runs(n, algs, server, tmp_path)
    for name in algs:
        a, b = read(str(runs[f"{name}-none"])), read(str(runs[f"{name}-tiny"]))
        np.testing.assert_array_equal(final_params(runs[f"{name}-none"]), final_params(runs[f"{name}-tiny"]))
        ma, mb = a["metrics"], b["metrics"]
        for k in ("bits_down", "payload_bits", "rounds"):
            np.testing.assert_array_equal(ma[k], mb[k], err_msg=f"{name}: {k}")
        assert (mb["messages"] > ma["messages"]).all()
        blocks = [int(v) for v in b["attrs"]["blocks"]]
        ranges = [(lo, hi) for lo, hi, _ in plan(blocks, int(0.0002 * 2 ** 20))]
        assert len(ranges) == len(blocks) == 6 and any(lo % 8 for lo, _ in ranges)
        M = len(a["attrs"]["workers"])
        pushers = M - (1 if server == "rank0" else 0)
        steps = int(ma["steps"].sum())
        if name == "blocksgdm":
            per = sum(4 * sum(1 for o in np.cumsum([0] + blocks)[:-1] if lo <= o < hi) + (hi - lo + 7) // 8
                      for lo, hi in ranges)
            assert int(mb["bits_up"][-1]) == 8 * per * pushers * steps
            d = sum(blocks)
            assert int(ma["bits_up"][-1]) == 8 * (4 * len(blocks) + (d + 7) // 8) * pushers * steps
        else:
            np.testing.assert_array_equal(ma["bits_up"], mb["bits_up"])
            assert int(mb["bits_up"][-1]) == 8 * ((sum(blocks) + 7) // 8) * pushers * steps

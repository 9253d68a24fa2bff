"""Run by tests/test_codecs_cuda.py in a fresh interpreter with NUMBA_ENABLE_CUDASIM=1 (numba
reads it when numba.cuda is first imported): every CUDA kernel, in numba's CUDA simulator, on
small vectors, against the numpy backend -- byte-identical payloads, identical decoded vectors,
the same generator state after encode, the same CodecError messages on malformed payloads."""
import os
import sys

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "set NUMBA_ENABLE_CUDASIM=1 before starting"

import warnings  # noqa: E402

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

from qprsgd.codecs import CodecError  # noqa: E402
from qprsgd.codecs.sparse import sample_threshold  # noqa: E402
from qprsgd.registry import CODECS  # noqa: E402


def _poisoned_device_array(shape, dtype=np.float64, **kw):
    """cuda.device_array with every byte 0xA5: a kernel that leaves part of a fresh payload or
    scratch buffer unwritten is caught (numpy's allocator would often hand back a freed buffer
    that still holds the previous, identical payload)."""
    kw.pop("stream", None)
    a = np.empty(shape, dtype=dtype, **kw)
    a.reshape(-1).view(np.uint8).fill(0xA5)
    return cuda.to_device(a)


cuda.device_array = _poisoned_device_array

# bernoulli_p's overflow case casts a too large float64 to float32 on purpose (on every thread
# the simulator starts, so a filter, not np.errstate, which is per thread)
warnings.filterwarnings("ignore", message="overflow encountered in cast", category=RuntimeWarning)

CASES = [("identity", {}, None), ("sign", {}, None), ("block_sign", {}, [3, 60, 1, 36]),
         ("stochastic_bits", {"b": 1}, None), ("stochastic_bits", {"b": 3}, None),
         ("stochastic_bits", {"b": 8}, None), ("stochastic_bits", {"b": 16}, None),
         ("qsgd", {}, None), ("qsgd", {"s": 1}, None), ("qsgd", {"s": 2**20}, None),
         ("qsgd_scaled", {"s": 7}, None), ("randk", {"k": 5}, None),
         ("qsgd_runlength", {}, None), ("qsgd_runlength", {"s": 1}, None),
         ("qsgd_runlength", {"s": 3}, None), ("qsgd_runlength", {"s": 2**20}, None),
         ("qsgd_ans", {}, None)]
SEG_BITS = 32   # the qsgd family's decode segments under the simulator: many segments per payload
# sparse: topk with k = 1, most (past the ties at 0 and +-0.5), k = d and (not --quick) a few;
# bernoulli_p with p small (k often 0-3), 1/2 and 1
CASES += [("topk", {"ratio": 0.03}, None), ("topk", {"ratio": 0.8}, None),
          ("topk", {"ratio": 1.0}, None), ("topk", {"ratio": 0.15}, None),
          ("bernoulli_p", {"p": 0.05}, None), ("bernoulli_p", {"p": 0.5}, None),
          ("bernoulli_p", {"p": 1.0}, None)]
SPARSE = ("topk", "bernoulli_p")
SLOW_ONLY = [("topk", {"ratio": 0.15})]

# qsgd_ans with its format constants shrunk on both codecs (chunk elements, elements per lane),
# so a few hundred elements make several chunks of up to 32 lanes (d not a multiple of either):
# (params, d, chunk_elems, lane_elems, vector kinds)
ANS_SMALL = [({}, 200, 128, 4, ("gauss",)),                  # chunks of 32 and 18 lanes
             ({"s": 2**20}, 1000, 256, 8, ("mixed",)),       # escapes (levels >= 1024)
             ({"s": 3}, 300, 64, 2, ("zeros",))]             # 5 chunks, small E


def vec(kind, d, seed):
    r = np.random.default_rng(seed)
    x = r.standard_normal(d).astype(np.float32)
    if kind == "zeros":
        x[:] = 0
        x[::2] = -0.0
    elif kind == "mixed":
        x *= r.choice(np.array([1e-30, 1.0, 1e30], np.float32), size=d)
        x[::3] = -0.0
    elif kind == "ties":          # five magnitudes, +-0.0: top-k ties broken by index
        x = (r.integers(-2, 3, d) * 0.5).astype(np.float32)
        x[::4] = -0.0
    return x


def sparse_bads(name, data, d):
    """Malformed sparse payloads aimed at each check, and at their order (an out-of-range index
    and a NaN value together must report the index, as the CPU does)."""
    h = 8 if name == "bernoulli_p" else 4
    k = (len(data) - h) // 8
    u32 = lambda v: np.array([v], "<u4").view(np.uint8)  # noqa: E731
    bads = []

    def put(at, v, b=None):
        b = data.copy() if b is None else b
        b[at:at + 4] = v if isinstance(v, np.ndarray) and v.dtype == np.uint8 else u32(v)
        return b

    bads.append(put(0, d + 1))                                   # a payload for another d
    if h == 8:
        bads += [put(4, d + 1), put(4, k + 1), put(4, max(k - 1, 0))]  # count > d, wrong count
    if k:
        nan = np.array([np.nan], "<f4").view(np.uint8)
        inf = np.array([-np.inf], "<f4").view(np.uint8)
        last_idx, first_val = h + 4 * (k - 1), h + 4 * k
        bads += [put(last_idx, d), put(h, 0xFFFFFFFF), put(first_val, nan), put(first_val, inf),
                 put(last_idx, d, put(first_val + 4 * (k - 1), nan))]
        if k >= 2:
            i0 = int(data[h:h + 4].view("<u4")[0])
            i1 = int(data[h + 4:h + 8].view("<u4")[0])
            bads += [put(h, i1, put(h + 4, i0)), put(h + 4, i0),
                     put(h + 4, i0, put(first_val, nan))]
    return bads


def check_encode_errors(a, g, d):
    """A NaN or -Inf element (rejected before any draw: the generator state must match too) and,
    for bernoulli_p with p < 1, every element 3e38 (z/p overflows float32 after the draws)."""
    x = vec("gauss", d, 1)
    ys = [np.where(np.arange(d) == d - 1, v, x).astype(np.float32) for v in (np.nan, -np.inf)]
    if a.name == "bernoulli_p" and a.p < 1:
        ys.append(np.full(d, 3e38, np.float32))
    for y in ys:
        ra, rg = np.random.default_rng(5), np.random.default_rng(5)
        pa, pg = outcome(lambda: a.encode(y, ra)), outcome(lambda: g.encode(y, rg))
        assert pa == pg and pa[0] == "CodecError", (a.name, pa, pg)
        assert ra.bit_generator.state == rg.bit_generator.state, a.name
    return len(ys)


def check_topk_threshold(quick):
    """topk's threshold path on a small vector: the CUDA backend's sample shrunk to 8 elements
    so d = 160 > 4 * 8 filters with t > 0 (gauss), and falls back to t = 0 when the sampled
    elements are the only large ones (sample_heavy).  The selection must not change."""
    d = 160
    checked = 0
    for k in ((6,) if quick else (6, 20)):
        a = CODECS.get("topk").factory(d, None, backend="numpy", k=k)
        g = CODECS.get("topk").factory(d, None, backend="cuda", k=k)
        g.impl.sample = 8
        for kind in ("gauss", "sample_heavy"):
            x = vec("gauss", d, k)
            if kind == "sample_heavy":
                x[::d // 8] = 100.0 + np.arange(len(x[::d // 8]), dtype=np.float32)
            pa, pg = outcome(lambda: a.encode(x)), outcome(lambda: g.encode(x))
            assert pa == pg and pa[0] == "ok", (k, kind)
            last = g.impl.last
            assert last["t"] > 0 and last["fallback"] == (kind == "sample_heavy"), (k, kind, last)
            # the device gathered the CPU's strided sample (x[::d // m][:m], m = 8 here)
            want_t = sample_threshold(x.view(np.uint32)[::d // 8][:8] & np.uint32(0x7FFFFFFF), k, d)
            assert last["t"] == want_t, (k, kind, last, want_t)
            checked += 1
    return checked


def outcome(f):
    try:
        r = f()
        if hasattr(r, "nbits"):
            return ("ok", np.asarray(r.data).tobytes(), r.nbits)
        return ("ok", np.asarray(r).tobytes())
    except CodecError as e:
        return ("CodecError", str(e))


def check(a, g, name, params, d, kind, quick):
    """One vector: encode on both backends (same bytes, same generator state), decode on both
    (same vector), then malformed payloads (same CodecError) for the qsgd family, stochastic_bits
    and the sparsifiers."""
    x = vec(kind, d, d)
    ra, rg = np.random.default_rng(3), np.random.default_rng(3)
    pa, pg = outcome(lambda: a.encode(x, ra)), outcome(lambda: g.encode(x, rg))
    assert pa == pg, (name, params, d, kind, pa[:1], pg[:1])
    assert ra.bit_generator.state == rg.bit_generator.state, (name, d, kind)
    if pa[0] != "ok":
        return 0
    data = np.frombuffer(pa[1], np.uint8).copy()
    da, dg = outcome(lambda: a.decode(data)), outcome(lambda: g.decode(data))
    assert da == dg, (name, params, d, kind)
    if name in SPARSE and quick and kind != "gauss":
        return 1            # the record checks do not depend on the vector: once
    if name.startswith("qsgd") or name in ("stochastic_bits",) + SPARSE:
        r = np.random.default_rng(d)
        bads = [data[:n] for n in (0, 3, 4, len(data) - 1)] + \
            [np.concatenate([data, np.zeros(1, np.uint8)])]
        for _ in range(2 if quick else 6):
            b = data.copy()
            b[int(r.integers(0, len(b)))] ^= np.uint8(1 << int(r.integers(0, 8)))
            bads.append(b)
        if name in SPARSE:
            bads += sparse_bads(name, data, d)
        for b in bads:
            assert outcome(lambda: a.decode(b)) == outcome(lambda: g.decode(b)), \
                (name, params, d, kind, b.tobytes().hex())
    return 1


def main():
    quick = "--quick" in sys.argv     # the default test run: fewer sizes and vector kinds
    checked = 0
    for name, params, blocks in CASES:
        if quick and ((name == "qsgd" and params) or params.get("s") == 2**20
                      or [name, params] in map(list, SLOW_ONLY)):
            continue
        sizes = ([100] if blocks else [7, 100]) if not quick else ([100] if blocks else [37])
        for d in sizes:
            a = CODECS.get(name).factory(d, blocks, backend="numpy", **params)
            g = CODECS.get(name).factory(d, blocks, backend="cuda", **params)
            if hasattr(g.impl, "seg_bits"):
                g.impl.seg_bits = SEG_BITS
            kinds = ("gauss", "mixed") if quick else ("gauss", "zeros", "mixed")
            if name == "topk":
                kinds += ("ties",)
            if name == "qsgd_runlength" and quick:
                kinds = ("gauss", "zeros")
            for kind in kinds:
                checked += check(a, g, name, params, d, kind, quick)
        if name in SPARSE:     # encode errors: NaN / Inf input (before any draw), z/p overflow
            checked += check_encode_errors(a, g, d)
    for params, d, ce, le, kinds in (ANS_SMALL[:1] if quick else ANS_SMALL):   # quick: 7 s less
        a = CODECS.get("qsgd_ans").factory(d, None, backend="numpy", **params)
        g = CODECS.get("qsgd_ans").factory(d, None, backend="cuda", **params)
        for c in (a, g):
            c.chunk_elems, c.lane_elems = ce, le
        for kind in kinds:
            checked += check(a, g, "qsgd_ans", params, d, kind, quick)
    checked += check_topk_threshold(quick)
    checked += segment_checks(quick)
    print(f"cuda-sim ok {checked}")


def same(a, g, data, what):
    """The numpy and cuda backends decode ``data`` to the same vector or the same message."""
    ra, rg = outcome(lambda: a.decode(data)), outcome(lambda: g.decode(data))
    assert ra == rg, (what, data.tobytes().hex(), ra[:1] + ra[1:][:1], rg[:1] + rg[1:][:1])
    return ra


def segment_checks(quick):
    """The qsgd family's segment decoder (qprsgd/codecs/_cuda_qsgd.py) against the numpy backend:
    Gaussian payloads cut into many segments whose guessed starts must resynchronise, the
    payload that never resynchronises (one fix-up pass per segment), and malformed payloads
    damaged at segment boundaries.  Payloads come from the numpy backend (the CUDA encoder is
    checked above)."""
    checked = 0
    d = 500 if quick else 1500
    for name, params, seg in (("qsgd", {}, 128), ("qsgd_runlength", {}, 128),
                              ("qsgd_runlength", {"s": 3}, 48)):
        a = CODECS.get(name).factory(d, None, backend="numpy", **params)
        g = CODECS.get(name).factory(d, None, backend="cuda", **params)
        g.impl.seg_bits = seg
        r = np.random.default_rng(11)
        x = r.standard_normal(d).astype(np.float32)
        data = np.asarray(a.encode(x, r).data).copy()
        assert same(a, g, data, (name, params, "gauss"))[0] == "ok"
        st = g.impl.stats
        # several segments, some of which started at a wrong guess and re-parsed from the
        # previous one's exit until they met a start of their own: a few records each
        assert st["segments"] >= 6 and st["reparsed"] >= 3, (name, params, st)
        assert st["reparsed"] <= st["reparsed_records"] <= 8 * st["reparsed"], (name, params, st)
        assert 1 <= st["fixup_passes"] <= max(2, st["segments"] // 4), (name, params, st)
        print("segment decoder", name, params, st)
        checked += 1
        nbits = 8 * len(data)
        starts = 32 * np.arange(3, nbits // 32)      # segment starts (multiples of 32 bits)
        bads = [data[:n] for n in (len(data) // 2, len(data) - 1)]
        bads.append(np.concatenate([data, np.zeros(1, np.uint8)]))
        for t in r.choice(starts, size=2 if quick else 12, replace=False):
            for off in ((-1, 2) if quick else (-3, -1, 0, 1, 2, 5)):
                b = data.copy()
                p = int(t) + off
                b[p // 8] ^= np.uint8(0x80 >> (p % 8))
                bads.append(b)
            for fill in (0, 255):
                b = data.copy()
                b[int(t) // 8 - 1:int(t) // 8 + 2] = fill
                bads.append(b)
        if not quick:
            for _ in range(10):
                b = data.copy()
                b[8:] = r.integers(0, 256, len(b) - 8).astype(np.uint8)
                bads.append(b)
        msgs = set()
        for b in bads:
            res = same(a, g, b, (name, params))
            msgs.add(res[0] if res[0] == "ok" else res[1].split(":")[1].split(" at bit")[0])
            checked += 1
        # the damage reaches the parse: impossible codes among several outcomes
        assert any("impossible code length" in m for m in msgs) and len(msgs) >= 3, msgs
    # levels > s in records of later segments: a payload of s = 6 read with s = 3 (the same
    # longest code, 2 floor(log2(s + 1)) + 2 bits)
    for name in ("qsgd", "qsgd_runlength"):
        a = CODECS.get(name).factory(d, None, backend="numpy", s=3)
        g = CODECS.get(name).factory(d, None, backend="cuda", s=3)
        g.impl.seg_bits = 64
        x = np.random.default_rng(5).standard_normal(d).astype(np.float32)
        x[d - 20] = 100
        data = np.asarray(CODECS.get(name).factory(d, None, backend="numpy", s=6)
                          .encode(x, np.random.default_rng(5)).data).copy()
        res = same(a, g, data, (name, "level > s"))
        assert res == ("CodecError", f"{name}: level > s=3"), res
        assert g.impl.stats["segments"] >= 4, g.impl.stats
        checked += 1
    # a valid payload whose guessed starts never resynchronise: a 2-bit record, then 4-bit
    # records 0010 (level 1, s = 8 = sqrt(64)); a parse starting 2 bits off reads 8-bit records
    # 1 0001 000 forever, so every fix-up pass corrects one more segment (the worst case)
    dw = 65
    a = CODECS.get("qsgd").factory(dw, None, backend="numpy", s=8)
    g = CODECS.get("qsgd").factory(dw, None, backend="cuda", s=8)
    g.impl.seg_bits = SEG_BITS
    x = np.ones(dw, np.float32)
    x[0] = 0
    data = np.asarray(a.encode(x, np.random.default_rng(0)).data).copy()
    assert data[4:8].tobytes().hex() == "48888888", data[4:8].tobytes().hex()
    assert same(a, g, data, "worst case")[0] == "ok"
    st = g.impl.stats
    assert st["segments"] >= 8 and st["fixup_passes"] == st["segments"] - 1, st
    return checked + 1


if __name__ == "__main__":
    sys.exit(main())

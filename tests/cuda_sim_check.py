"""Run by tests/test_codecs_cuda.py in a fresh interpreter with NUMBA_ENABLE_CUDASIM=1 (numba
reads it when numba.cuda is first imported): every CUDA kernel, in numba's CUDA simulator, on
small vectors, against the numpy backend -- byte-identical payloads, identical decoded vectors,
the same generator state after encode, the same CodecError messages on malformed payloads."""
import os
import sys

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "set NUMBA_ENABLE_CUDASIM=1 before starting"

import numpy as np  # noqa: E402

from qprsgd.codecs import CodecError  # noqa: E402
from qprsgd.registry import CODECS  # noqa: E402

CASES = [("identity", {}, None), ("sign", {}, None), ("block_sign", {}, [3, 60, 1, 36]),
         ("stochastic_bits", {"b": 1}, None), ("stochastic_bits", {"b": 3}, None),
         ("stochastic_bits", {"b": 8}, None), ("stochastic_bits", {"b": 16}, None),
         ("qsgd", {}, None), ("qsgd", {"s": 1}, None), ("qsgd", {"s": 2**20}, None),
         ("qsgd_scaled", {"s": 7}, None), ("randk", {"k": 5}, None), ("qsgd_ans", {}, None)]

# qsgd_ans with its format constants shrunk on both codecs (chunk elements, elements per lane),
# so a few hundred elements make several chunks of up to 32 lanes (d not a multiple of either):
# (params, d, chunk_elems, lane_elems, vector kinds)
ANS_SMALL = [({}, 700, 512, 16, ("gauss",)),                 # chunks of 32 and 12 lanes
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
    return x


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
    (same vector), then malformed payloads (same CodecError) for the qsgd family."""
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
    if name.startswith("qsgd") or name == "stochastic_bits":
        r = np.random.default_rng(d)
        bads = [data[:n] for n in (0, 3, 4, len(data) - 1)] + \
            [np.concatenate([data, [0]])]
        for _ in range(2 if quick else 6):
            b = data.copy()
            b[int(r.integers(0, len(b)))] ^= np.uint8(1 << int(r.integers(0, 8)))
            bads.append(b)
        for b in bads:
            assert outcome(lambda: a.decode(b)) == outcome(lambda: g.decode(b)), \
                (name, params, d, kind, b.tobytes().hex())
    return 1


def main():
    quick = "--quick" in sys.argv     # the default test run: fewer sizes and vector kinds
    checked = 0
    for name, params, blocks in CASES:
        if quick and name == "qsgd" and params:
            continue
        sizes = ([100] if blocks else [7, 100]) if not quick else ([100] if blocks else [37])
        for d in sizes:
            a = CODECS.get(name).factory(d, blocks, backend="numpy", **params)
            g = CODECS.get(name).factory(d, blocks, backend="cuda", **params)
            for kind in (("gauss", "mixed") if quick else ("gauss", "zeros", "mixed")):
                checked += check(a, g, name, params, d, kind, quick)
    for params, d, ce, le, kinds in ANS_SMALL:
        a = CODECS.get("qsgd_ans").factory(d, None, backend="numpy", **params)
        g = CODECS.get("qsgd_ans").factory(d, None, backend="cuda", **params)
        for c in (a, g):
            c.chunk_elems, c.lane_elems = ce, le
        for kind in kinds:
            checked += check(a, g, "qsgd_ans", params, d, kind, quick)
    print(f"cuda-sim ok {checked}")


if __name__ == "__main__":
    sys.exit(main())

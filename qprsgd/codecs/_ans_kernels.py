"""rANS of ``qsgd_ans`` (wire format: qprsgd/codecs/qsgd_ans.py): the format's constants, the
coding tables, and the numpy reference coder -- every chunk and every lane of the format at once,
one numpy operation per step over a (chunks x 32 lanes) array, so the reference is vectorized
even though each rANS state is sequential.  The numba (``_nb_ans``) and CUDA (``_cuda_ans``)
kernels run the same arithmetic per lane and must give the same bytes.

rANS with 31-bit states and 16-bit renormalisation: state x in [L, 2^16 L), L = 2^15;
frequencies quantized to M = 2^14 (L / M = 2, so a decoder reads at most one 16-bit word per
symbol and an encoder writes at most one).  Elements are cut into chunks of CHUNK_ELEMS; chunk
t (n elements) is coded by W = lanes(n) interleaved states sharing one stream: element k of the
chunk belongs to lane k mod W and group k // W.  Decoding goes group by group; in a group each
lane decodes its symbol and the lanes whose state fell below L then read one word each, *in lane
order*, from the stream (so W lanes are decoded independently -- SIMD or one GPU thread per lane
-- and the words they need are found by a prefix count of the lanes that need one).  Encoding is
the mirror image: groups in reverse, within a group the lanes in reverse order, each lane
renormalising (writing its low 16 bits backwards) before it encodes its symbol.  The encoder
divides by a frequency with a precomputed reciprocal (exact for 31-bit states)."""
from __future__ import annotations

import numpy as np

SCALE_BITS = 14
M = 1 << SCALE_BITS
RANS_L = 1 << 15                 # states in [L, 2^31)
CHUNK_ELEMS = 1 << 18            # elements per chunk (one stream, decoded independently)
LANE_ELEMS = 8192                # a chunk of n elements has min(32, ceil(n / 8192)) lanes
MAX_LANES = 32

ERR_OK = 0
ERR_PASTEND = 2    # the stream's bytes ran out
ERR_STATE = 3      # an initial state outside [L, 2^31), a final state != L or bytes left over

_U = np.uint64


def lanes(n: int, lane_elems: int = LANE_ELEMS) -> int:
    """Lanes of a chunk of n >= 1 elements."""
    return int(min(MAX_LANES, -(-int(n) // lane_elems)))


def plan(d: int, chunk_elems: int = CHUNK_ELEMS, lane_elems: int = LANE_ELEMS):
    """(first element, elements, lanes) of every chunk, int64 arrays."""
    nch = -(-d // chunk_elems)
    a = np.arange(nch, dtype=np.int64) * chunk_elems
    n = np.minimum(d - a, chunk_elems).astype(np.int64)
    w = np.minimum(MAX_LANES, -(-n // lane_elems)).astype(np.int64)
    return a, n, w


RENORM_SHIFT = 16 + (15 - SCALE_BITS)    # x_max = f << RENORM_SHIFT = ((L / M) << 16) f
# packed table entries (uint64):
#   decoder, per slot:  value bits (bits 0-31) | f << 32 (15 bits) | (slot - cum) << 48 (14 bits)
#   encoder, per symbol: rcp - 2^31 (bits 0-30; rcp is in [2^31, 2^32)) | (f - 1) << 31 (14 bits)
#                        | bias << 45 (15 bits) | shift << 60
DF_SHIFT, DF_MASK, DB_SHIFT, DB_MASK = 32, 0x7FFF, 48, M - 1
EF_SHIFT, EF_MASK, EB_SHIFT, EB_MASK, ES_SHIFT = 31, M - 1, 45, 0x7FFF, 60
RCP_TOP = 1 << 31


def enc_tables(freq, cum):
    """Per symbol one packed uint64 (layout above) of ryg's reciprocal encoder: x -> x + bias +
    ((x * rcp) >> 32 >> shift) (M - f) = (x // f) M + x % f + cum for x < 2^31; renormalise
    first when x >= x_max = f << RENORM_SHIFT, i.e. (x >> RENORM_SHIFT) >= f."""
    n = freq.shape[0]
    ec = np.zeros(n, dtype=np.uint64)
    for s in range(n):
        f = int(freq[s])
        if f == 0:
            continue
        if f < 2:
            rcp, sh, bias = 0xFFFFFFFF, 0, int(cum[s]) + M - 1
        else:
            shift = (f - 1).bit_length()
            rcp = ((1 << (shift + 31)) + f - 1) // f
            sh, bias = shift - 1, int(cum[s])
        assert rcp >> 31 == 1
        ec[s] = (rcp - RCP_TOP) | ((f - 1) << EF_SHIFT) | (bias << EB_SHIFT) | (sh << ES_SHIFT)
    return ec


def dec_table(freq, cum, vals):
    """Per slot (M) one packed uint64 (layout above): float32 bits of the symbol's decoded value,
    f, slot - cum.  Escape symbols (the last two) carry value 0: a decoder tells them by the
    slot (>= cum[2E - 1]; >= cum[2E] is the negative one)."""
    na = freq.shape[0]
    sym = np.repeat(np.arange(na, dtype=np.int64), freq)
    v = np.zeros(na, dtype=np.float32)
    v[:na - 2] = vals[:na - 2]
    bits = v.view(np.uint32).astype(np.uint64)
    bias = (np.arange(M, dtype=np.int64) - cum[sym]).astype(np.uint64)
    return bits[sym] | (freq[sym].astype(np.uint64) << _U(DF_SHIFT)) | (bias << _U(DB_SHIFT))


def encode_ref(syms, pl, ec, out16, hi):
    """Every chunk's stream at once.  Chunk t's stream is written backwards into out16 (uint16
    words) ending at hi[t]; returns the first word of each stream.  Stream = W final states
    (uint32, lane order, as 2 words low first) then the renormalisation words."""
    a, n, w = pl
    nch = a.shape[0]
    j = np.arange(MAX_LANES, dtype=np.int64)[None, :]
    x = np.full((nch, MAX_LANES), RANS_L, dtype=np.uint64)
    p = np.asarray(hi, dtype=np.int64).copy()
    s16, s32 = _U(16), _U(32)
    G = int(((n + w - 1) // w).max()) if nch else 0
    for g in range(G - 1, -1, -1):
        k = g * w[:, None] + j
        act = (j < w[:, None]) & (k < n[:, None])
        s = np.where(act, syms[np.minimum(a[:, None] + k, syms.shape[0] - 1)], 0)
        e = ec[s]
        f = ((e >> _U(EF_SHIFT)) & _U(EF_MASK)) + _U(1)
        need = act & ((x >> _U(RENORM_SHIFT)) >= f)
        cnt = need.sum(axis=1)
        rank = np.cumsum(need, axis=1) - need
        pos = (p - cnt)[:, None] + rank
        out16[pos[need]] = (x[need] & _U(0xFFFF)).astype(np.uint16)
        p -= cnt
        x = np.where(need, x >> s16, x)
        rcp = (e & _U(RCP_TOP - 1)) | _U(RCP_TOP)
        q = ((x * rcp) >> s32) >> (e >> _U(ES_SHIFT))
        x = np.where(act, x + ((e >> _U(EB_SHIFT)) & _U(EB_MASK)) + q * (_U(M) - f), x)
    p -= 2 * w
    for t in range(nch):
        st = x[t, :w[t]].astype("<u4").view("<u2")
        out16[p[t]:p[t] + 2 * w[t]] = st
    return p


def decode_ref(data, offs, pl, tab, esc0, esc1, out32, escpos):
    """Decode every chunk at once: chunk t from data[offs[t]:offs[t + 1]] (bytes) into out32
    (the uint32 view of the output: tab's value bits), an escape slot s >= esc0 recording
    2 i + (s >= esc1) at escpos[a_t + j], j from 0.  Returns res (chunks x 2): (error, escapes)."""
    a, n, w = pl
    nch = a.shape[0]
    data = np.asarray(data, dtype=np.uint8)
    j = np.arange(MAX_LANES, dtype=np.int64)[None, :]
    lane = j < w[:, None]
    res = np.zeros((nch, 2), dtype=np.int64)
    ps, pe = offs[:-1].astype(np.int64), offs[1:].astype(np.int64)
    short = pe - ps < 4 * w
    res[short, 0] = ERR_PASTEND
    d8 = np.concatenate([data, np.zeros(4, dtype=np.uint8)]).astype(np.uint64)
    q = np.where(lane & ~short[:, None], ps[:, None] + 4 * j, 0)
    x = d8[q] | (d8[q + 1] << _U(8)) | (d8[q + 2] << _U(16)) | (d8[q + 3] << _U(24))
    x = np.where(lane, x, _U(RANS_L))
    bad = ~short & ((x < RANS_L) | (x >= (1 << 31))).any(axis=1)
    res[bad, 0] = ERR_STATE
    live = res[:, 0] == ERR_OK
    p = ps + 4 * w
    L = _U(RANS_L)
    mask, sb = _U(M - 1), _U(SCALE_BITS)
    ne = np.zeros(nch, dtype=np.int64)
    G = int(((n + w - 1) // w).max()) if nch else 0
    for g in range(G):
        if not live.any():
            break
        k = g * w[:, None] + j
        act = live[:, None] & lane & (k < n[:, None])
        slot = x & mask
        e = tab[slot]
        x = np.where(act, ((e >> _U(DF_SHIFT)) & _U(DF_MASK)) * (x >> sb)
                     + ((e >> _U(DB_SHIFT)) & _U(DB_MASK)), x)
        idx = (a[:, None] + k)[act]
        out32[idx] = (e[act] & _U(0xFFFFFFFF)).astype(np.uint32)
        esc = act & (slot >= esc0)
        if esc.any():
            erank = np.cumsum(esc, axis=1) - esc
            tgt = (a + ne)[:, None] + erank
            escpos[tgt[esc]] = 2 * (a[:, None] + k)[esc] + (slot[esc] >= esc1)
            ne += esc.sum(axis=1)
        need = act & (x < L)
        cnt = need.sum(axis=1)
        over = live & (p + 2 * cnt > pe)
        res[over, 0] = ERR_PASTEND
        live &= ~over
        need &= live[:, None]
        rank = np.cumsum(need, axis=1) - need
        qq = np.where(need, p[:, None] + 2 * rank, 0)
        wv = d8[qq] | (d8[qq + 1] << _U(8))
        x = np.where(need, (x << _U(16)) | wv, x)
        p += np.where(live, 2 * cnt, 0)
    fin = live & (((x != L) & lane).any(axis=1) | (p != pe))
    res[fin, 0] = ERR_STATE
    res[:, 1] = ne
    return res

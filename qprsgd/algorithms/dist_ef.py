"""dist-ef-blocksgdm (Zheng, Huang, Kwok, NeurIPS 2019): error feedback through a parameter server,
plus the baselines the paper compares against.

  sgdm               full-precision all-reduce SGD with Nesterov momentum (§3.3, L183)
  ef_sgd             EF-SGD, one machine (Algorithm 1, L52–58)
  dist_ef_sgd        Algorithm 2 (L73–85), any compressor
  dist_ef_blocksgd   Algorithm 3, blockwise scaled sign by default
  dist_ef_blocksgdm  Algorithm 4 (L187–199) + Appendix A weight decay (L293–295)
  dist_ef_sgdm       Algorithm 4 with any compressor ("the non-block variant is analogous", L183)
  signsgd_mv         signSGD with majority vote (cited [3], L28)
  signum_mv          signum (sign of momentum) with majority vote (cited [3, 4])

Notation: M workers, x_t the model, g_{t,i} worker i's stochastic gradient at x_t, η_t the
step size of 0-based step t (``lr``), μ the momentum, λ the weight decay, C the configured
codec (``env.codec``: Δ = decode(encode(p)), the value the receivers see).

Conventions shared by the parameter-server classes (docs/algorithms-ps.md):

* Server.  ``env.server`` is rank 0 (doubling as worker 0, ``run.server: rank0``) or a dedicated
  last rank (``run.server: dedicated``).  The server holds ẽ, never x (a dedicated server's
  parameter buffer is left untouched at x_0).
* Transport.  Workers push Δ_{t,i} to the server (channel "up"), non-blocking, one payload per
  gradient bucket where the algorithm works per bucket (issue 16: posted from the backward hooks;
  ``_ServerAlgorithm.ipush``, ``env.buckets``), else one per step; the server decodes each, forms
  p̃_t, compresses it and sends the same bytes to every worker with
  ``comm.broadcast_bytes(.., channel="down")``.  Every worker -- the server's own worker role
  included -- applies decode(the bytes it received), so all workers apply the identical Δ̃_t.
  Bits of both directions are therefore logged separately (``bits_up``, ``bits_down``).
* Buckets.  Majority vote: always per bucket (sign is element-wise; byte-aligned shares of the
  packed signs: the same iterates, bytes and bits).  dist_ef_*: ``per_bucket`` -- by default
  exactly where the codec's statistics are per parameter block (``block_sign``, ``identity``:
  the same iterates, ≤ 7 more padding bits per bucket up); ``true`` makes any codec per bucket
  (a different compressor for a per-vector one, docs/algorithms-ps.md).  The pull stays one
  message.
* Mean.  p̃_t = (Σ_i Δ_{t,i}, summed in float32 in worker order 0..M−1) / M + r_t ẽ_t.
* Rescaling.  r_t = η_{t−1}/η_t with η_{−1} = 0: r_0 = 0 without any division (the stored
  η_{t−1} is 0 before the first step).  With a step decay ÷10, r_t = 10 on the first step after
  each milestone.  r_t is computed in float64 and cast to float32 once.
* Error feedback.  e ← p − Δ in float32, Δ being exactly what was sent (decoded); so
  Δ + e equals p up to one float32 rounding (exactly where Sterbenz applies).
* Weight decay is never compressed (Appendix A, L293): non-momentum dist_ef_*:
  x_{t+1} = x_t − η_t(Δ̃_t + λx_t); momentum: m̃_t = μm̃_{t−1} + λx_t,
  x_{t+1} = x_t − η_t(Δ̃_t + μm̃_t + λx_t), x_t taken before the update.
* Draws.  Codec draws use ``env.rng`` only; on rank 0 doubling as server the worker's encode
  comes before the server's encode in every step.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..devices import data_ptr
from ..registry import ALGORITHMS
from ..transport import Request
from .aggregation import chunk_blocks
from .base import Algorithm


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MomentumParams(_Params):
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum parameter μ (0 ≤ μ < 1)")


def lr_ratio(lr_prev: float, lr: float) -> np.float32:
    """r_t = η_{t−1}/η_t as float32; r_0 = 0 (η_{−1} = 0) with no division."""
    if lr_prev == 0.0:
        return np.float32(0.0)
    if not lr > 0:
        raise ValueError(f"lr must be > 0 for the η_(t−1)/η_t rescaling, got {lr!r}")
    return np.float32(lr_prev / lr)


def _f32(v) -> np.ndarray:
    """``v`` as float32 on its own device (no copy when it already is)."""
    return v.astype(np.float32, copy=False) if hasattr(v, "astype") else np.asarray(v, np.float32)


def aligned_zeros(d: int, align: int = 64, xp=np) -> np.ndarray:
    """A float32 zero vector whose data starts on an ``align``-byte boundary.

    Codec inputs p and p̃ live in such buffers.  Historical: the sign codecs' scales once came
    from BLAS ``sasum``, whose order depends on the address; they are now summed in a fixed order
    (``qsgd.norm_acc``), so per-bucket inputs at any offset give the same scales.
    """
    raw = xp.zeros(d + align // 4, dtype=np.float32)    # (on the device of array module xp)
    off = (-data_ptr(raw) % align) // 4
    return raw[off:off + d]


# ----------------------------------------------------------------------------------------------
# all-reduce baseline
# ----------------------------------------------------------------------------------------------
@ALGORITHMS.register("sgdm", params=MomentumParams)
class SGDM(Algorithm):
    """Full-precision distributed SGD with Nesterov momentum (dist-ef-blocksgdm §3.3, L183).

    Each step, on every worker i (m_{−1,i} = 0):
      1. g_{t,i} = ∇f(x_t; ξ_{t,i}) + λx_t                    (weight decay inside g, L183 has none)
      2. m_{t,i} = μ m_{t−1,i} + g_{t,i}
      3. z_{t,i} = μ m_{t,i} + g_{t,i}
      4. z̄_t = (1/M) Σ_i z_{t,i}                               (all-reduce mean, channel "allreduce")
      5. x_{t+1} = x_t − η_t z̄_t
    32d bits per worker per step are handed to MPI (float32 all-reduces, one per gradient bucket:
    lines 1–4 run per bucket while backward produces the gradient; the 1/M is folded into line
    5's step size, as ``psgd``).
    """

    name = "sgdm"

    def __init__(self, x, env, momentum: float = 0.9):
        super().__init__(x, env)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.mu = np.float32(momentum)
        self.m = self.xp.zeros(env.d, dtype=np.float32)
        self._z = self.xp.zeros(env.d, dtype=np.float32)   # scratch for z_t (no per-step temporary)

    def step(self, t, lr, grad):
        comm = self.env.worker_comm
        z = self._z
        pending = []

        def bucket(g, lo, hi):                             # 1.–4. for one gradient bucket, as backward
            self._wd_into(g, lo, hi)                       #    produces it (train.bucket_mb)
            m, gb, zb = self.m[lo:hi], g[lo:hi], z[lo:hi]
            m *= self.mu                                   # 2. m_t = μ m_{t−1} + g_t
            m += gb
            np.multiply(m, self.mu, out=zb)                # 3. z_t = μ m_t + g_t
            zb += gb
            pending.append(comm.iallreduce_sum(zb))       # 4. Σ_i z_{t,i}, started now

        grad(on_bucket=bucket)                             # 1.
        for r in pending:                                  # 4.
            r.wait()
        z *= np.float32(lr / comm.size)                    # 5. x ← x − (η/M) Σ_i z_{t,i}
        self.x -= z
        self.rounds += 1

    def state_dict(self):
        return {**super().state_dict(), "m": self.m}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._load_array(self.m, state["m"])


# ----------------------------------------------------------------------------------------------
# EF-SGD, one machine
# ----------------------------------------------------------------------------------------------
@ALGORITHMS.register("ef_sgd")
class EFSGD(Algorithm):
    """SGD with error feedback, one machine (dist-ef-blocksgdm Algorithm 1, L52–58; Karimireddy et al.).

      2. e_0 = 0
      4. p_t = η_t g_t + e_t                  (g_t = ∇f(x_t; ξ_t); the step size is applied *before* C)
      5. Δ_t = C(p_t)                          (decode(encode(p_t)); draws from env.rng)
      6. x_{t+1} = x_t − Δ_t                   (− η_t λ x_t: weight decay outside C, as Appendix A)
      7. e_{t+1} = p_t − Δ_t
    The paper's single machine: M must be 1 (a ValueError names the world size otherwise).
    It is not dist_ef_sgd with M = 1 (L69): η multiplies g before compression and e is never
    rescaled.  Nothing is sent, so ``rounds`` stays 0; ``payload_bits`` counts what C produced.
    Default codec ``sign``, the scaled sign C(v) = ‖v‖₁/d · sign(v) of eq. (1).
    """

    name = "ef_sgd"
    uses_codec = True
    default_codec = "sign"

    def __init__(self, x, env):
        super().__init__(x, env)
        if env.M != 1 or env.comm.size != 1:
            raise ValueError("ef_sgd is the single-machine EF-SGD (dist-ef Algorithm 1) and needs "
                             f"exactly one process; got world size {env.comm.size} ({env.M} workers). "
                             "Use dist_ef_sgd for M > 1.")
        if env.codec is None:
            raise ValueError("ef_sgd needs a codec (the `codec` section)")
        self.e = self.xp.zeros(env.d, dtype=np.float32)
        self._p = aligned_zeros(env.d, xp=self.xp)

    def step(self, t, lr, grad):
        env = self.env
        eta = np.float32(lr)
        g = grad()                                              # 4. g_t
        p = self._p
        np.multiply(eta, g, out=p)                              # 4. p_t = η g_t + e_t
        p += self.e
        delta = _f32(env.codec.decode(env.codec.encode(p, env.rng).data))   # 5. Δ_t = C(p_t)
        if env.weight_decay:
            wd = eta * (np.float32(env.weight_decay) * self.x)  #    η_t λ x_t (outside C)
            self.x -= delta + wd                                # 6. x_{t+1} = x_t − Δ_t − η_t λ x_t
        else:
            self.x -= delta                                     # 6. x_{t+1} = x_t − Δ_t
        np.subtract(p, delta, out=self.e)                       # 7. e_{t+1} = p_t − Δ_t

    def state_dict(self):
        return {**super().state_dict(), "e": self.e}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._load_array(self.e, state["e"])


# ----------------------------------------------------------------------------------------------
# parameter-server machinery shared by dist_ef_* and the majority votes
# ----------------------------------------------------------------------------------------------
def bucket_plan(env) -> list[tuple[int, int]]:
    """``env.buckets`` as a list ([(0, d)] when empty), checked to be what ``buckets.plan`` makes:
    contiguous ranges tiling [0, d) from the top down (bucket 0 ends at d, the last starts at 0)."""
    d = env.d
    plan = [(int(lo), int(hi)) for lo, hi in env.buckets] or [(0, d)]
    top = d
    for lo, hi in plan:
        if hi != top or not lo < hi:
            raise ValueError(f"env.buckets must tile [0, {d}) from the top down (buckets.plan), got {plan}")
        top = lo
    if top != 0:
        raise ValueError(f"env.buckets must tile [0, {d}) from the top down (buckets.plan), got {plan}")
    return plan


def sign_segments(plan, d: int) -> list[tuple[int, int]]:
    """Bucket k's share [a_k, b_k) of the packed sign vector: a_k = ⌈lo_k⌉₈, b_k = ⌈hi_k⌉₈ (⌈v⌉₈ the
    next multiple of 8, at most d).  Every share but the top one starts and ends on a byte, so the
    shares' packed bytes laid end to end are the whole vector's packing, byte for byte.  Bucket k
    holds back its lowest < 8 elements for bucket k + 1 and sends the ones bucket k − 1 held back
    (final by then: the buckets arrive from the top down); a share may be empty (no message)."""
    def up(v):
        return min(d, -(-v // 8) * 8)
    return [(up(lo), up(hi)) for lo, hi in plan]


def fixed_nbytes(codec) -> Optional[int]:
    """The payload size of every encode of ``codec`` when it is fixed (its ``nbytes``: sign,
    block_sign, stochastic_bits), else None (received at the wait, size unknown beforehand)."""
    n = getattr(codec, "nbytes", None)
    return int(n) if isinstance(n, (int, np.integer)) else None


class _ServerAlgorithm(Algorithm):
    """Roles and the two transfers of one step (push to the server per bucket, pull from it)."""

    needs_server = True

    def __init__(self, x, env):
        super().__init__(x, env)
        if env.server is None:
            raise ValueError(f"{self.name} needs a server rank (env.server is None)")
        self.is_server = env.rank == env.server
        self.is_worker = env.is_worker
        self.plan = bucket_plan(env)

    def ipush(self, data: Optional[np.ndarray], nbytes: Optional[int]) -> Request:
        """One bucket's push, posted now (channel "up"): a worker's payload ``data`` to the server.
        Every rank calls it once per bucket, in bucket order (a dedicated server with None).
        ``nbytes``: every worker's payload size, when known (the server posts exact receives at
        once), else None (received at the wait).  ``wait()``: at the server, the payloads in
        worker order (its own worker's crosses no transport and is not counted); else None."""
        env = self.env
        comm, srv = env.comm, env.server
        own = None
        if self.is_server:
            others = [j for j in env.workers if j != srv]
            req = (comm.isendrecv_bytes({}, {j: nbytes for j in others}, channel="up") if nbytes is not None
                   else comm.isparse_exchange({}, others, channel="up"))
            own = data
        else:
            req = (comm.isendrecv_bytes({srv: data}, {}, channel="up") if nbytes is not None
                   else comm.isparse_exchange({srv: data}, [], channel="up"))

        def finish():
            got = req.wait()
            if not self.is_server:
                return None
            got = dict(got)
            if own is not None:
                got[srv] = own
            return [got[j] for j in env.workers]
        return Request(finish)

    def each_bucket(self, grad, fn, per_bucket: bool = True) -> list:
        """``fn(g, lo, hi, k)`` for each gradient bucket k = [lo, hi) of :attr:`plan` (a push
        Request, or None); returns what it returned, in bucket order.  A worker calls it while
        backward produces the bucket (``grad(on_bucket=...)``), or -- ``per_bucket`` False, today's
        contract -- once for (0, d) after ``grad()``.  A dedicated server (no gradient) calls
        ``fn(None, lo, hi, k)`` for every bucket at once: it posts its receives."""
        plan = self.plan if per_bucket else [(0, self.env.d)]
        out: list = []
        if not self.is_worker:
            return [fn(None, lo, hi, k) for k, (lo, hi) in enumerate(plan)]
        if not per_bucket:
            g = grad()
            return [fn(g, 0, self.env.d, 0)]

        def on_bucket(g, lo, hi):
            k = len(out)
            if k >= len(plan) or plan[k] != (lo, hi):
                raise ValueError(f"{self.name}: gradient bucket [{lo}, {hi}) delivered as bucket {k}, but "
                                 f"env.buckets (which the server posts its receives by) is {plan}")
            out.append(fn(g, lo, hi, k))
        grad(on_bucket=on_bucket)
        if len(out) != len(plan):
            raise ValueError(f"{self.name}: {len(out)} gradient buckets delivered, env.buckets has {len(plan)}")
        return out

    @staticmethod
    def arrived(posted: list) -> list:
        """Wait for every posted push: per bucket, the payloads in worker order at the server (None
        elsewhere, and for a bucket that sent nothing)."""
        return [None if r is None else r.wait() for r in posted]

    def pull(self, data: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """The server sends ``data`` to every worker (channel "down"); each worker returns its copy."""
        env = self.env
        return env.comm.broadcast_bytes(data, root=env.server, dests=env.workers, channel="down")


def per_bucket_exact(codec, env) -> bool:
    """Is compressing each gradient bucket on its own the same compressor as one encode of the whole
    vector (the same decoded values)?  Yes for a codec whose statistics are per parameter block,
    the buckets being unions of whole blocks (``buckets.plan``): ``identity`` (element-wise) and
    ``block_sign`` over the parameter blocks (not with ``block_size``).  No for the others: ``sign``'s
    one scale, top-k's k, QSGD's norm are per vector."""
    name = getattr(codec, "name", None)
    if name == "identity":
        return True
    if name != "block_sign":
        return False
    blocks = tuple(env.blocks) or (env.d,)
    if tuple(codec.blocks) != blocks:
        return False
    edges = set(np.cumsum((0,) + blocks).tolist())
    return all(lo in edges and hi in edges for lo, hi in bucket_plan(env))


class PerBucketParams(_Params):
    per_bucket: Optional[bool] = Field(
        None, description="compress and push each gradient bucket (train.bucket_mb) to the server as "
        "backward produces it, each with its own codec: null (default) = exactly where that is the same "
        "compressor (block_sign over the parameter blocks, identity: the same iterates as one bucket); "
        "true = with any codec (a codec with per-vector statistics -- sign's scale, topk's k, QSGD's norm "
        "-- computes them per bucket, and block_sign with block_size re-cuts its blocks from each "
        "bucket's start: a different compressor, docs/algorithms-ps.md); false = never")


class MomentumPerBucketParams(MomentumParams, PerBucketParams):
    pass


class _DistEF(_ServerAlgorithm):
    """State and server side of Algorithms 2–4 (subclasses write the worker lines of one bucket)."""

    uses_codec = True
    momentum = False

    def __init__(self, x, env, momentum: float = 0.0, per_bucket: Optional[bool] = None):
        super().__init__(x, env)
        if env.codec is None:
            raise ValueError(f"{self.name} needs a codec (the `codec` section)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.mu = np.float32(momentum)
        self.lr_prev = 0.0                                   # η_{−1} = 0
        d = env.d
        if self.is_worker:
            xp = self.xp
            self.e = xp.zeros(d, dtype=np.float32)           # e_{0,i} = 0
            self._p = aligned_zeros(d, xp=xp)                # p_{t,i} (scratch, aligned codec input)
            if self.momentum:
                self.m = xp.zeros(d, dtype=np.float32)       # m_{−1,i} = 0
                self.m_wd = xp.zeros(d, dtype=np.float32)    # m̃_{−1} = 0 (weight-decay momentum)
        if self.is_server:
            self.e_srv = self.xp.zeros(d, dtype=np.float32)  # ẽ_0 = 0
            self._p_srv = aligned_zeros(d, xp=self.xp)       # p̃_t (scratch, aligned codec input)
        # per gradient bucket (issue 16): on where asked, or (None) where it is the same compressor
        self.per_bucket = per_bucket_exact(env.codec, env) if per_bucket is None else bool(per_bucket)
        self._codecs = {(0, d): env.codec}
        if self.per_bucket:                                  # C_b of every bucket, built and warmed now
            for lo, hi in self.plan:
                if (lo, hi) != (0, d):
                    self.codec_for(lo, hi).warmup()

    def codec_for(self, lo: int, hi: int):
        """C_b of bucket [lo, hi): the configured codec and parameters for length hi − lo and the
        parameter blocks in it (``env.make_codec``); the configured codec itself for (0, d)."""
        c = self._codecs.get((lo, hi))
        if c is None:
            if self.env.make_codec is None:
                raise ValueError(f"{self.name}: per-bucket compression needs env.make_codec")
            c = self._codecs[(lo, hi)] = self.env.make_codec(
                hi - lo, chunk_blocks(self.env.blocks or (self.env.d,), lo, hi))
        return c

    # -- the two halves every step shares ------------------------------------------------------
    def compress(self, p: np.ndarray, codec=None):
        """(payload bytes, Δ = decode(bytes)): what is sent and what the receiver will see."""
        c = self.env.codec if codec is None else codec
        data = c.encode(p, self.env.rng).data
        return data, _f32(c.decode(data))

    def worker_p(self, g: np.ndarray, r: np.float32, lo: int, hi: int) -> np.ndarray:  # pragma: no cover
        """p_{t,i}[lo:hi] from this bucket of the gradient (the algorithm's lines), in ``self._p``."""
        raise NotImplementedError

    def push_bucket(self, r: np.float32):
        """``each_bucket``'s fn: the worker lines of one bucket, then its push (a dedicated server:
        its receives).  Δ_b = C_b(p[lo:hi]); e[lo:hi] = p[lo:hi] − Δ_b."""
        def fn(g, lo, hi, k):
            c = self.codec_for(lo, hi)
            data = None
            if g is not None:
                p = self.worker_p(g, r, lo, hi)              # p_{t,i} on the bucket
                data, delta = self.compress(p, c)            # Δ_{t,i} = C_b(p_{t,i})
                np.subtract(p, delta, out=self.e[lo:hi])     # e_{t+1,i} = p_{t,i} − Δ_{t,i}
            return self.ipush(data, fixed_nbytes(c))         # push Δ_{t,i} (posted now)
        return fn

    def server_step(self, r: np.float32, arrived: list) -> Optional[np.ndarray]:
        """Server lines: p̃ = (1/M) Σ_i Δ_i + r ẽ;  Δ̃ = C(p̃);  ẽ ← p̃ − Δ̃.  Returns Δ̃'s bytes.
        ``arrived``: per bucket of the step, the workers' payloads in worker order."""
        if not self.is_server:
            return None
        acc = self._p_srv
        acc[...] = 0
        plan = self.plan if self.per_bucket else [(0, self.env.d)]
        for (lo, hi), payloads in zip(plan, arrived):        # Σ_i Δ_{t,i}, worker order, per bucket
            c, a = self.codec_for(lo, hi), acc[lo:hi]
            for data in payloads:
                a += _f32(c.decode(data))
        acc /= np.float32(self.env.M)
        acc += r * self.e_srv                                # p̃_t = mean_i Δ_{t,i} + r_t ẽ_t
        p_srv = acc
        data, d_srv = self.compress(p_srv)                   # Δ̃_t = C(p̃_t)
        np.subtract(p_srv, d_srv, out=self.e_srv)            # ẽ_{t+1} = p̃_t − Δ̃_t
        return data

    def apply(self, lr: float, data: Optional[np.ndarray]) -> None:
        """Worker: x_{t+1} = x_t − η_t(Δ̃_t [+ weight decay outside C])."""
        if not self.is_worker:
            return
        eta = np.float32(lr)
        d_tilde = _f32(self.env.codec.decode(data))          # Δ̃_t pulled from the server
        lam = self.env.weight_decay
        if not lam:
            self.x -= eta * d_tilde
        elif not self.momentum:                              # Alg. 2/3 + L293: Δ̃ + λx_t
            self.x -= eta * (d_tilde + np.float32(lam) * self.x)
        else:                                                # Appendix A (L295)
            wd = np.float32(lam) * self.x                    #   λ x_t
            self.m_wd *= self.mu                             #   m̃_t = μ m̃_{t−1} + λ x_t
            self.m_wd += wd
            self.x -= eta * ((d_tilde + self.mu * self.m_wd) + wd)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self):
        s = {**super().state_dict(), "lr_prev": np.float64(self.lr_prev)}
        if self.is_worker:
            s["e"] = self.e
            if self.momentum:
                s["m"] = self.m
                s["m_wd"] = self.m_wd
        if self.is_server:
            s["e_srv"] = self.e_srv
        return s

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.lr_prev = float(state["lr_prev"])
        if self.is_worker:
            self._load_array(self.e, state["e"])
            if self.momentum:
                self._load_array(self.m, state["m"])
                self._load_array(self.m_wd, state["m_wd"])
        if self.is_server:
            self._load_array(self.e_srv, state["e_srv"])


@ALGORITHMS.register("dist_ef_sgd", params=PerBucketParams)
class DistEFSGD(_DistEF):
    """Distributed SGD with error feedback (dist-ef-blocksgdm Algorithm 2, L73–85), any compressor.

      1. η_{−1} = 0                      2. e_{0,i} = 0 on each worker, ẽ_0 = 0 on the server
      3. for t = 0..T−1:  r_t = η_{t−1}/η_t (r_0 = 0)
      4.   on each worker i
      5.     p_{t,i} = g_{t,i} + r_t e_{t,i}
      6.     push Δ_{t,i} = C(p_{t,i}) to the server                      (channel "up")
      7.     x_{t+1} = x_t − η_t Δ̃_t   (Δ̃_t pulled from the server; − η_t λ x_t outside C, L293)
      8.     e_{t+1,i} = p_{t,i} − Δ_{t,i}
      9.   on the server
     10.     pull Δ_{t,i};  p̃_t = (1/M) Σ_i Δ_{t,i} + r_t ẽ_t
     11.     push Δ̃_t = C(p̃_t) to each worker                            (channel "down")
     12.     ẽ_{t+1} = p̃_t − Δ̃_t
    Line 7 needs Δ̃_t, so it runs after lines 10–11 in time.  Default codec ``sign`` (the
    scaled sign ‖v‖₁/d · sign(v), eq. (1)); any codec may be configured, e.g. ``qsgd_scaled``
    (c·Q_s, L111) or ``topk``; with ``identity`` this is full-precision distributed SGD (L69).

    Per bucket (issue 16, ``per_bucket``): lines 5, 6 and 8 run for each gradient bucket
    [lo, hi) while backward produces it -- p, Δ = C_b(p) and e on the bucket, C_b the configured
    codec built for the bucket (``codec_for``), its payload pushed at once -- and line 10 decodes
    each bucket's payloads into p̃[lo:hi]; lines 11, 12 and 7 are unchanged (one Δ̃ for the whole
    vector).  Default (``per_bucket`` null): on exactly where C_b is the same compressor
    (``per_bucket_exact``: block_sign over the parameter blocks, identity), where the iterates
    equal one bucket's bit for bit; ``true`` with another codec is a different compressor on the
    workers (docs/algorithms-ps.md).
    """

    name = "dist_ef_sgd"
    default_codec = "sign"

    def __init__(self, x, env, per_bucket: Optional[bool] = None):
        super().__init__(x, env, momentum=0.0, per_bucket=per_bucket)

    def worker_p(self, g, r, lo, hi):
        p = self._p[lo:hi]
        np.multiply(r, self.e[lo:hi], out=p)                 # 5. p_{t,i} = g_{t,i} + r_t e_{t,i}
        p += g[lo:hi]
        return p

    def step(self, t, lr, grad):
        r = lr_ratio(self.lr_prev, lr)                       # 3. r_t = η_{t−1}/η_t
        posted = self.each_bucket(grad, self.push_bucket(r), self.per_bucket)   # 4.–6., 8. per bucket
        down = self.server_step(r, self.arrived(posted))     # 10.–12. (6./10. the pushes arrive)
        self.apply(lr, self.pull(down))                      # 11. push Δ̃_t; 7. x_{t+1}
        self.lr_prev = lr
        self.rounds += 1


@ALGORITHMS.register("dist_ef_blocksgd", params=PerBucketParams)
class DistEFBlockSGD(DistEFSGD):
    """Distributed blockwise SGD with error feedback (dist-ef-blocksgdm Algorithm 3).

    Algorithm 2 with C_B(v) = [‖v_{G_b}‖₁/d_b · sign(v_{G_b})]_b, blocks = parameter tensors
    (L162): the default codec is ``block_sign`` (any codec may be configured).  Lines as
    Algorithm 2: 5. p_{t,i} = g_{t,i} + r_t e_{t,i}; 6. push C_B(p_{t,i}); 7. x_{t+1} = x_t −
    η_t(Δ̃_t + λx_t); 8. e_{t+1,i} = p_{t,i} − Δ_{t,i}; 10. p̃_t = mean_i Δ_{t,i} + r_t ẽ_t;
    11. push C_B(p̃_t); 12. ẽ_{t+1} = p̃_t − Δ̃_t.  Per step each of the M workers pushes d + 32B
    bits and receives as many: 2Md + 64MB (Table 1, L179; with rank 0 doubling as server its own
    push and pull cross no transport and are not counted), plus at most 7 padding bits per message.
    C_B's scales are per block and a gradient bucket is a union of whole blocks, so by default
    lines 5, 6 and 8 run per bucket as backward produces it (Algorithm 2's ``per_bucket``): the
    same iterates; each bucket is its own message up (≤ 7 padding bits each).
    """

    name = "dist_ef_blocksgd"
    default_codec = "block_sign"


@ALGORITHMS.register("dist_ef_blocksgdm", params=MomentumPerBucketParams)
class DistEFBlockSGDM(_DistEF):
    """Distributed blockwise momentum SGD with error feedback (dist-ef-blocksgdm Algorithm 4, L187–199).

      1. η_{−1} = 0, 0 ≤ μ < 1          2. m_{−1,i} = e_{0,i} = 0 on each worker, ẽ_0 = 0 on the server
      3. for t = 0..T−1:  r_t = η_{t−1}/η_t (r_0 = 0)
      4.   on each worker i
      5.     m_{t,i} = μ m_{t−1,i} + g_{t,i}
      6.     p_{t,i} = μ m_{t,i} + g_{t,i} + r_t e_{t,i}
      7.     push Δ_{t,i} = C_B(p_{t,i}) to the server                    (channel "up")
      8.     x_{t+1} = x_t − η_t Δ̃_t   (Δ̃_t pulled from the server)
             with weight decay (Appendix A, L295): m̃_t = μ m̃_{t−1} + λ x_t;
             x_{t+1} = x_t − η_t(Δ̃_t + μ m̃_t + λ x_t)
      9.     e_{t+1,i} = p_{t,i} − Δ_{t,i}
     10.   on the server
     11.     pull Δ_{t,i};  p̃_t = (1/M) Σ_i Δ_{t,i} + r_t ẽ_t
     12.     push Δ̃_t = C_B(p̃_t) to each worker  (the box's "‖p̃_t, G_b‖" is ‖p̃_{t,G_b}‖)
     13.     ẽ_{t+1} = p̃_t − Δ̃_t
    Default codec ``block_sign``.  With μ = 0 the iterates are bit-identical to dist_ef_blocksgd.

    Per bucket (issue 16, ``per_bucket`` as Algorithm 2's): lines 5, 6, 7 and 9 run for each
    gradient bucket while backward produces it, line 11 decodes per bucket; by default on with
    ``block_sign`` over the parameter blocks (the same iterates), off with a per-vector codec.
    """

    name = "dist_ef_blocksgdm"
    default_codec = "block_sign"
    momentum = True

    def __init__(self, x, env, momentum: float = 0.9, per_bucket: Optional[bool] = None):
        super().__init__(x, env, momentum=momentum, per_bucket=per_bucket)

    def worker_p(self, g, r, lo, hi):
        m, gb, p = self.m[lo:hi], g[lo:hi], self._p[lo:hi]
        m *= self.mu                                         # 5. m_{t,i} = μ m_{t−1,i} + g_{t,i}
        m += gb
        np.multiply(self.mu, m, out=p)                       # 6. p_{t,i} = μ m_{t,i} + g_{t,i} + r_t e_{t,i}
        p += gb
        p += r * self.e[lo:hi]
        return p

    def step(self, t, lr, grad):
        r = lr_ratio(self.lr_prev, lr)                       # 3. r_t = η_{t−1}/η_t
        posted = self.each_bucket(grad, self.push_bucket(r), self.per_bucket)   # 4.–7., 9. per bucket
        down = self.server_step(r, self.arrived(posted))     # 11.–13. (7./11. the pushes arrive)
        self.apply(lr, self.pull(down))                      # 12. push Δ̃_t; 8. x_{t+1} (+ m̃)
        self.lr_prev = lr
        self.rounds += 1


@ALGORITHMS.register("dist_ef_sgdm", params=MomentumPerBucketParams)
class DistEFSGDM(DistEFBlockSGDM):
    """Momentum dist-EF-SGD with any compressor: Algorithm 4 with C in place of C_B ("the
    corresponding non-block variant is analogous", L183).  Default codec ``sign`` (eq. (1)), whose
    one scale is per vector: per bucket only with ``per_bucket: true`` (then a scale per bucket)."""

    name = "dist_ef_sgdm"
    default_codec = "sign"


# ----------------------------------------------------------------------------------------------
# majority vote
# ----------------------------------------------------------------------------------------------
def pack_signs(v: np.ndarray) -> np.ndarray:
    """1 bit per element, the sign codec's packing (qprsgd/codecs/sign.py): MSB-first, zero-padded
    to a byte, bit 1 ⇔ v_j < 0 (sign(0) = +1)."""
    from ..codecs import sign as _sign_codec

    return _sign_codec.pack_signs(v)


def unpack_signs(data, d: int) -> np.ndarray:
    """The ±1 float32 vector of a :func:`pack_signs` payload of d elements."""
    from ..codecs import sign as _sign_codec

    return _sign_codec.unpack_signs(data, d)


def majority_vote(payloads, d: int) -> np.ndarray:
    """Bits of sign(Σ_i s_i) for M packed sign vectors s_i ∈ {−1, +1}^d, with sign(0) = +1.

    Σ_i s_i = M − 2·(number of −1); with M odd it is odd, hence never 0; with M even a tie
    (as many +1 as −1) votes +1.  Returns the packed majority (1 bit per element).
    """
    from ..codecs import sign as _sign_codec

    return _sign_codec.majority_signs(payloads, d)


class _MajorityVote(_ServerAlgorithm):
    """Worker sends sign(v_i) (1 bit/element); the server returns sign(Σ_i sign(v_i)) (1 bit/element).

    Per bucket, always (issue 16): the sign is element-wise, so bucket k's share [a_k, b_k) of
    the packed signs (:func:`sign_segments`, byte-aligned) is pushed as soon as backward has
    produced it; the server votes share by share into one packed vector, byte for byte the
    whole-vector vote, and pulls it back whole.  Same iterates, bytes and bits as one bucket;
    one message up per non-empty share instead of one per step.
    """

    uses_codec = False

    def __init__(self, x, env, momentum: float = 0.0):
        super().__init__(x, env)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.mu = np.float32(momentum)
        self.one_minus_mu = np.float32(1.0 - momentum)
        self.m = self.xp.zeros(env.d, dtype=np.float32) if self.is_worker else None
        self.segments = sign_segments(self.plan, env.d)

    def signed(self, g: np.ndarray, lo: int, hi: int) -> np.ndarray:  # pragma: no cover
        """The vector whose signs are sent, brought up to date on [lo, hi) (the algorithm's line 1)."""
        raise NotImplementedError

    def push_signs(self, grad) -> list:
        """Line 1 per bucket: bring the signed vector up to date on the bucket, push its share."""
        def fn(g, lo, hi, k):
            a, b = self.segments[k]
            v = None if g is None else self.signed(g, lo, hi)
            if b == a:
                return None                                   # an empty share: no message
            return self.ipush(None if v is None else pack_signs(v[a:b]), (b - a + 7) // 8)
        return self.each_bucket(grad, fn)

    def vote_and_apply(self, lr, posted: list) -> None:
        arrived = self.arrived(posted)                                        # 1. the pushes arrive
        down = None
        if self.is_server:                                                    # 2. server: vote per share
            down = self.xp.zeros((self.env.d + 7) // 8, dtype=np.uint8)
            for (a, b), payloads in zip(self.segments, arrived):
                if b > a:
                    down[a // 8:(b + 7) // 8] = majority_vote(payloads, b - a)
        got = self.pull(down)                                                 # 2. pull the vote
        if self.is_worker:
            s = unpack_signs(got, self.env.d)
            lam = self.env.weight_decay
            if lam:
                s = s + np.float32(lam) * self.x                              # λx_t outside the sign
            self.x -= np.float32(lr) * s                                      # 3. x_{t+1} = x_t − η_t(·)
        self.rounds += 1

    def state_dict(self):
        s = super().state_dict()
        if self.is_worker:
            s["m"] = self.m
        return s

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if self.is_worker:
            self._load_array(self.m, state["m"])


@ALGORITHMS.register("signsgd_mv")
class SignSGDMV(_MajorityVote):
    """signSGD with majority vote (Bernstein et al., cited as [3], dist-ef L28; ALGORITHMS.md §A).

    Each step t:
      1. worker i: g_{t,i} = ∇f(x_t; ξ_{t,i}); push s_{t,i} = sign(g_{t,i})  (1 bit each, sign(0) = +1)
      2. server:   push v_t = sign(Σ_i s_{t,i}) to every worker              (1 bit each; tie → +1)
      3. worker i: x_{t+1} = x_t − η_t (v_t + λ x_t)                          (weight decay outside the sign)
    Wire: d bits each way per worker (Table 1: 2Md), zero-padded to a byte; no codec section.
    Line 1 runs per gradient bucket while backward produces it (byte-aligned shares of s_{t,i},
    :class:`_MajorityVote`): the same iterates and bits as after backward.
    """

    name = "signsgd_mv"

    def __init__(self, x, env):
        super().__init__(x, env, momentum=0.0)

    def signed(self, g, lo, hi):
        return g                                              # 1. sign(g_{t,i}) is sent

    def step(self, t, lr, grad):
        posted = self.push_signs(grad)                        # 1. per bucket
        self.vote_and_apply(lr, posted)                       # 2., 3.


@ALGORITHMS.register("signum_mv", params=MomentumParams)
class SignumMV(_MajorityVote):
    """Signum with majority vote (Bernstein et al. [3, 4]; ALGORITHMS.md §A).

    Each step t (m_{−1,i} = 0):
      1. worker i: m_{t,i} = μ m_{t−1,i} + (1 − μ) g_{t,i}; push sign(m_{t,i})   (sign(0) = +1)
      2. server:   push v_t = sign(Σ_i sign(m_{t,i})) to every worker            (tie → +1)
      3. worker i: x_{t+1} = x_t − η_t (v_t + λ x_t)
    Line 1 (momentum and sign, both element-wise) runs per gradient bucket while backward
    produces it (:class:`_MajorityVote`): the same iterates and bits as after backward.
    """

    name = "signum_mv"

    def __init__(self, x, env, momentum: float = 0.9):
        super().__init__(x, env, momentum=momentum)

    def signed(self, g, lo, hi):
        m = self.m[lo:hi]
        m *= self.mu                                           # 1. m_t = μ m_{t−1} + (1 − μ) g_t
        m += self.one_minus_mu * g[lo:hi]
        return self.m                                          # 1. sign(m_t) is sent

    def step(self, t, lr, grad):
        posted = self.push_signs(grad)                         # 1. per bucket
        self.vote_and_apply(lr, posted)                        # 2., 3.

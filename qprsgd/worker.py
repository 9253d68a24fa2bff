"""The worker loop: batch -> algorithm.step(t) -> logger.record(...).

Per step t (0-based), every rank calls ``algorithm.step(t, lr_t, grad)``; on a worker ``grad``
computes the stochastic gradient at the current x on the next batch of this rank's shard
(time counted as compute); a dedicated server gets ``grad=None``.  Every ``log_every`` steps
one row of metrics is reduced over ranks (sums of bits and losses, max of times) and rank 0
appends it; every ``eval_every`` steps and at the end each worker evaluates its own model on
its test shard and the sums are reduced.  Checkpoints every ``checkpoint_every`` steps.
"""
from __future__ import annotations

import json
import math
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import interrupt
from .buckets import GradBuckets, cap_bytes
from .devices import is_device, to_host
from .divergence import Detector
from .experiment import Experiment
from .logger import CHANNELS
from .models import loss_fn


class Loop:
    def __init__(self, exp: Experiment, logger=None):
        self.exp = exp
        self.logger = logger  # rank 0 only
        d = exp.data
        dev = exp.flat.flat.device
        # the dataset sits on the model's device once, so a batch is an index_select there
        self.x_train = torch.from_numpy(np.ascontiguousarray(d.x_train)).to(dev)
        self.y_train = torch.from_numpy(np.ascontiguousarray(d.y_train)).to(dev)
        self.x_test = torch.from_numpy(np.ascontiguousarray(d.x_test)).to(dev)
        self.y_test = torch.from_numpy(np.ascontiguousarray(d.y_test)).to(dev)
        self.t = 0
        self.wall_offset = 0.0
        self._reset_row()
        self.last_eval: Optional[dict] = None
        self.divergence = Detector()  # raises divergence.Diverged on every rank at the same row
        # gradient buckets (train.bucket_mb): hooks on the parameters hand the flat gradient to an
        # algorithm that asks for it (grad(on_bucket=...)) range by range as backward produces it
        # (the hooks poke every transport the algorithm posts on: the workers' group for the
        # all-reduce family, the world for a parameter server's per-bucket pushes)
        env = exp.algorithm.env
        pokes = [c.progress for c in (env.worker_comm, env.comm) if c is not None]
        if env.worker_comm is env.comm:
            pokes = pokes[:1]

        def poke():
            for p in pokes:
                p()
        self.buckets = GradBuckets(exp.flat.params, exp.flat.blocks, cap_bytes(exp.cfg.train.bucket_mb),
                                   hooks=exp.bucket_hooks, poke=poke,
                                   ready=exp.placement.bucket_ready)   # (GPU) accumulation has run
        if env.buckets and [(lo, hi) for lo, hi, _ in self.buckets.ranges] != list(env.buckets):
            raise RuntimeError("the loop's gradient buckets differ from env.buckets (experiment.build)")

    # -- accounting (the ledger is the only source of bytes and seconds) ------------------------
    def _reset_row(self):
        self.row_loss = 0.0
        self.row_loss_n = 0
        self.row_compute = 0.0
        self.row_step = 0.0
        self.row_steps = 0
        led = self.exp.ledger
        self.row_comm0 = led.comm_seconds
        self.row_codec0 = led.codec_seconds
        self.row_copy0 = led.copy_seconds

    def _bytes(self):
        """(total, up, down, messages) handed to the transport by this worker."""
        led = self.exp.ledger
        return (led.total_bytes(), led.bytes.get("up", 0), led.bytes.get("down", 0),
                led.total_messages())

    def _channels(self):
        """Per-channel bytes then messages of this worker, in logger.CHANNELS order."""
        b, m = self.exp.ledger.channel_rows(CHANNELS)
        return b + m

    # -- gradient oracle ---------------------------------------------------------------------
    def make_grad(self):
        e = self.exp
        lossf = loss_fn(e.module)

        led = e.ledger

        def grad(on_bucket=None):
            """The stochastic gradient at the current x on this step's batch (a float32 host
            vector, the flat gradient buffer itself on the CPU).  ``on_bucket(g, lo, hi)``: called
            for each bucket of :attr:`buckets` as soon as g[lo:hi] is final (``g`` the vector
            grad() will return) -- during backward where ``exp.bucket_hooks`` (cpu, sim, cuda),
            in bucket order, every bucket exactly once before grad() returns."""
            t0 = time.perf_counter()
            other0 = led.comm_seconds + led.codec_seconds + led.copy_seconds
            idx, _ = e.stream.next()
            gi = torch.from_numpy(e.train_idx[idx]).to(self.x_train.device)
            xb, yb = self.x_train[gi], self.y_train[gi]
            e.placement.before_forward()
            e.module.train()
            e.flat.zero_grad()
            out = e.module(xb)
            loss = lossf(out, yb)
            gbuf = e.placement.g        # the flat gradient, on the model's device
            if on_bucket is not None:
                self.buckets.begin(lambda lo, hi: on_bucket(gbuf, lo, hi))
            try:
                # backward on this thread (a GPU's otherwise runs on autograd's device thread):
                # the bucket hooks, and the MPI calls they make, stay on the main thread
                with torch.autograd.set_multithreading_enabled(False):
                    loss.backward()
            except BaseException:
                self.buckets.abort()
                raise
            self.row_loss += float(loss.detach())
            self.row_loss_n += 1
            e.placement.after_backward()   # (GPU) backward is done before anyone reads g
            g = gbuf
            if on_bucket is not None:
                self.buckets.end()
            # compute time: without what the buckets' transport and codec work took meanwhile
            self.row_compute += (time.perf_counter() - t0
                                 - (led.comm_seconds + led.codec_seconds + led.copy_seconds - other0))
            return g

        return grad

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        e = self.exp
        loss_sum = correct = n = 0.0
        if e.is_worker and len(e.test_idx):
            e.placement.before_forward()
            e.module.eval()
            for s in range(0, len(e.test_idx), 1024):
                gi = torch.from_numpy(e.test_idx[s:s + 1024]).to(self.x_test.device)
                xb, yb = self.x_test[gi], self.y_test[gi]
                out = e.module(xb)
                if e.loss_name == "mse":
                    loss_sum += float(F.mse_loss(out.reshape(yb.shape), yb, reduction="sum"))
                else:
                    loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
                    correct += float((out.argmax(1) == yb).sum())
                n += len(gi)
        # consensus distance among workers: mean_i ||x_i - xbar||^2 / ||xbar||^2
        cons = 0.0
        wc = e.algorithm.env.worker_comm
        if e.is_worker:
            x = e.placement.host_x().astype(np.float64)
            xbar = x.copy()
            wc.allreduce_mean(xbar, count=False)  # measurement traffic: neither bytes nor t_comm
            cons_local = float(np.sum((x - xbar) ** 2))
            nb = float(np.sum(xbar ** 2))
        else:
            cons_local, nb = 0.0, 0.0
        tot = e.comm.allreduce_scalars([loss_sum, correct, n, cons_local])
        nbar = e.comm.allreduce_scalars([nb], op="max")[0]
        loss = tot[0] / max(tot[2], 1.0)
        acc = float("nan") if e.loss_name == "mse" else tot[1] / max(tot[2], 1.0)
        cons = tot[3] / e.roles.M / nbar if nbar > 0 else 0.0
        return {"test_loss": loss, "test_accuracy": acc, "consensus": cons}

    # -- checkpoint ---------------------------------------------------------------------------
    def save_checkpoint(self, elapsed: float):
        e = self.exp
        rows = self.logger.rows() if self.logger is not None else {}
        arrays = {"x": e.placement.host_x()}
        for k, v in e.algorithm.state_dict().items():   # device state: copied to the host here
            arrays["alg/" + k] = to_host(v) if is_device(v) else v
        for k, v in e.flat.buffers_state().items():
            arrays["buf/" + k] = v
        if self.logger is not None:  # the log rows so far: a resume rebuilds run.h5 from them
            arrays.update(self.logger.snapshot())
        meta = {
            "t": self.t,
            "rng_alg": ckpt.rng_state(e.algorithm.env.rng),
            "stream": e.stream.state_dict() if e.stream is not None else None,
            "ledger": e.ledger.state_dict(),
            "wall": self.wall_offset + elapsed,
        }
        ckpt.save_rank(e.out_dir, e.comm.rank, self.t, arrays, meta)
        e.comm.barrier()
        if e.comm.rank == 0:
            ckpt.commit(e.out_dir, self.t, {"rows": rows, "world_size": e.comm.size,
                                            "fingerprint": ckpt.fingerprint(e.cfg.to_yaml(), e.comm.size)})
        e.comm.barrier()

    def load_checkpoint(self, info: dict):
        e = self.exp
        arrays, meta = ckpt.load_rank(e.out_dir, e.comm.rank, int(info["step"]))
        e.placement.load_x(arrays["x"])
        e.algorithm.load_state_dict({k[4:]: v for k, v in arrays.items() if k.startswith("alg/")})
        e.flat.load_buffers_state({k[4:]: v for k, v in arrays.items() if k.startswith("buf/")})
        ckpt.set_rng_state(e.algorithm.env.rng, meta["rng_alg"])
        if e.stream is not None:
            e.stream.load_state_dict(meta["stream"])
        if "ledger" not in meta:
            raise ValueError("checkpoint predates the run ledger (written by an older qprsgd): "
                             "start the run again without --resume")
        e.ledger.load_state_dict(meta["ledger"])
        self.t = int(meta["t"])
        self.wall_offset = float(meta["wall"])
        self._reset_row()

    # -- the loop ------------------------------------------------------------------------------
    def _log_row(self, lr: float, elapsed: float):
        e = self.exp
        tot, up, down, msgs = self._bytes()
        led = e.ledger
        pbits = led.payload_bits
        sums = e.comm.allreduce_scalars([self.row_loss, self.row_loss_n, tot, up, down, msgs, pbits,
                                         led.copy_down_bytes] + self._channels())
        nch = len(CHANNELS)
        ch_bytes = sums[8:8 + nch].astype(np.int64)
        ch_msgs = sums[8 + nch:].astype(np.int64)
        t_comm = led.comm_seconds - self.row_comm0
        # one MAX reduction gives the maxima and, through negation, the minimum of comm time
        maxes = e.comm.allreduce_scalars(
            [self.row_compute, led.codec_seconds - self.row_codec0,
             t_comm, self.row_step, -t_comm, led.copy_seconds - self.row_copy0], op="max")
        comm_min = -maxes[4]
        per_rank = e.comm.gather_rows([msgs, tot])
        if self.logger is not None:
            self.logger.record("metrics", {
                "step": self.t, "epoch": self.t / e.steps_per_epoch, "rounds": e.algorithm.rounds, "lr": lr,
                "train_loss": sums[0] / sums[1] if sums[1] else float("nan"),
                "bits_sent": int(8 * sums[2]), "bits_up": int(8 * sums[3]), "bits_down": int(8 * sums[4]),
                "payload_bits": int(sums[6]), "messages": int(sums[5]), "bits_to_host": int(8 * sums[7]),
                "wall_time": self.wall_offset + elapsed,
                "t_compute": maxes[0], "t_codec": maxes[1], "t_comm": maxes[2], "t_comm_min": comm_min,
                "t_step": maxes[3], "t_copy": maxes[5],
                "steps": self.row_steps,
            }, per_rank=(per_rank[:, 0].astype(np.int64), per_rank[:, 1].astype(np.int64), ch_bytes, ch_msgs))
        self.divergence.check(self.t, sums[0] / sums[1] if sums[1] else None, lr, e.placement.x, e.comm)
        self._reset_row()
        return sums

    def _eval_row(self, elapsed: float):
        e = self.exp
        ev = self.evaluate()
        tot = e.comm.allreduce_scalars([self._bytes()[0]])[0]
        row = {"step": self.t, "epoch": self.t / e.steps_per_epoch, "rounds": e.algorithm.rounds,
               "bits_sent": int(8 * tot), "wall_time": self.wall_offset + elapsed, **ev}
        self.last_eval = row
        if self.logger is not None:
            self.logger.record("eval", row)
            self.logger.flush()
            if e.cfg.run.progress:
                acc = row["test_accuracy"]
                print(f"epoch {row['epoch']:6.2f}  step {self.t:6d}  loss {row['test_loss']:.4f}  "
                      f"acc {acc:.4f}  bits {row['bits_sent']:.3e}  elapsed {row['wall_time']:.1f}s",
                      flush=True)

    def run(self, stop_after: Optional[int] = None) -> None:
        """Train to ``total_steps`` (or stop after ``stop_after`` steps: tests)."""
        e = self.exp
        tr = e.cfg.train
        grad = self.make_grad() if e.is_worker else None
        start = time.perf_counter()
        if self.t == 0:
            self._eval_row(0.0)
            self.divergence.reference(self.last_eval["test_loss"])
        lr = e.lr_at(self.t)
        while self.t < e.total_steps:
            if stop_after is not None and self.t >= stop_after:
                return
            interrupt.check()    # a Ctrl-C whose exception a finalizer swallowed
            lr = e.lr_at(self.t)
            t0 = time.perf_counter()
            e.algorithm.step(self.t, lr, grad)
            self.row_step += time.perf_counter() - t0
            self.row_steps += 1
            self.t += 1
            elapsed = time.perf_counter() - start
            if self.t % tr.log_every == 0 or self.t == e.total_steps:
                self._log_row(lr, elapsed)
            if self.t % tr.eval_every == 0 or self.t == e.total_steps:
                self._eval_row(time.perf_counter() - start)
            if tr.checkpoint_every and self.t % tr.checkpoint_every == 0 and self.t < e.total_steps:
                if self.row_steps:
                    self._log_row(lr, elapsed)
                self.save_checkpoint(time.perf_counter() - start)
        e.algorithm.finish()
        if self.logger is not None:
            self.logger.flush()

    def final_params(self) -> Optional[np.ndarray]:
        """Gather every rank's flat parameters to rank 0 (world_size x d float32)."""
        e = self.exp
        return e.comm.gather_vectors(np.ascontiguousarray(e.placement.host_x(), dtype=np.float32))

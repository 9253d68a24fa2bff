"""Per-pair references for compressed gossip on time-varying graphs (an extension beyond the
dcd-ecd-psgd and quantized-pr-sgd papers, whose replicas assume fixed neighbours).

Every ordered pair j → i that ever communicates (W_k[i, j] ≠ 0 for some k) has one reference
vector h_{j→i}: the receiver i keeps it (``in_refs``) and mixes with it in place of x_j, the
sender j keeps an identical copy (``out_refs``).  Both change only when the pair talks, by the
same decoded payload through the same float32 operation (``apply``), so the two copies are equal
bit for bit at every step.  The payload of a talk at step k is:

* the sender's one shared payload of the step (its own compressed update, what the static
  algorithm sends to every neighbour) when the pair is *fresh*: h_{j→i} equals the sender's
  public value (DCD: x_j; ECD: its own estimate x̃_j; D-Q-PR-SGD: its own replica x̃_j) exactly,
  which holds from the start (all values are x_0) for as long as the pair talks at every step;
* otherwise a catch-up payload C(catchup(h_{j→i})) encoded for this pair alone (the algorithm's
  rule, docs/algorithms-gossip.md), after which the pair is no longer fresh.

A message sent at step k is mixed at step k + 1, so step k's sends follow W_{k+1}'s pattern.
With a static W every pair talks at every step and stays fresh: the payloads, the codec draws
(one encode per step) and the iterates are those of the static algorithm, bit for bit.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..devices import to_device


class PairReferences:
    """Worker i's references h_{j→i} (in) and h_{i→j} (out) over a ``TopologySequence``."""

    def __init__(self, topo, i: int, x0: np.ndarray, transport, codec, rng):
        self.i = int(i)
        self.inn = topo.in_peers(self.i)
        self.out = topo.out_peers(self.i)
        self._in_idx = {j: k for k, j in enumerate(self.inn)}
        x0 = x0.astype(np.float32, copy=False)          # (on x0's device)
        self.in_refs = np.tile(x0, (len(self.inn), 1))
        self.out_refs = np.tile(x0, (len(self.out), 1))
        self.fresh = np.ones(len(self.out), dtype=bool)
        self.transport, self.codec, self.rng = transport, codec, rng

    def ref(self, j: int) -> np.ndarray:
        """h_{j→i}, this worker's reference of in-peer j."""
        return self.in_refs[self._in_idx[j]]

    def out_ref(self, j: int) -> np.ndarray:
        """h_{i→j}, this worker's copy of what out-peer j holds for it."""
        return self.out_refs[self.out.index(j)]

    def mix_values(self, sources, own: np.ndarray) -> dict:
        """{j: h_{j→i}} for the step's sources, and {i: own}."""
        v = {j: self.in_refs[self._in_idx[j]] for j in sources}
        v[self.i] = own
        return v

    def _decode(self, data) -> np.ndarray:
        return self.codec.decode(data).astype(np.float32, copy=False)

    def talk(self, W_next: np.ndarray, shared_data, shared_decoded: np.ndarray,
             apply: Callable[[np.ndarray, np.ndarray], None],
             catchup: Callable[[np.ndarray], np.ndarray]) -> None:
        """Send along W_next's pattern (to each j with W_next[j, i] ≠ 0, from each j with
        W_next[i, j] ≠ 0) and update the references.  Call after the owner has applied
        ``apply(public, shared_decoded)`` to its own public value."""
        i = self.i
        dests = {j for j in self.out if W_next[j, i] != 0.0}
        sources = [j for j in self.inn if W_next[i, j] != 0.0]
        sends = {}
        for k, j in enumerate(self.out):
            if j not in dests:
                self.fresh[k] = False
            elif self.fresh[k]:
                sends[j] = shared_data
                apply(self.out_refs[k], shared_decoded)
            else:
                p = self.codec.encode(catchup(self.out_refs[k]), self.rng)
                sends[j] = p.data
                apply(self.out_refs[k], self._decode(p.data))
        got = self.transport.isparse_exchange(sends, sources).wait()
        for j in sources:
            apply(self.in_refs[self._in_idx[j]], self._decode(got[j]))

    def state_dict(self) -> dict:
        return {"pair_in": np.asarray(self.inn, np.int64), "pair_out": np.asarray(self.out, np.int64),
                "in_refs": self.in_refs, "out_refs": self.out_refs, "fresh": self.fresh}

    def load_state_dict(self, s) -> None:
        if not (np.array_equal(np.asarray(s["pair_in"]), np.asarray(self.inn, np.int64))
                and np.array_equal(np.asarray(s["pair_out"]), np.asarray(self.out, np.int64))):
            raise ValueError(f"checkpoint was written with pair peers in={list(s['pair_in'])} "
                             f"out={list(s['pair_out'])}, this topology gives in={self.inn} out={self.out}")
        for name in ("in_refs", "out_refs", "fresh"):
            src, dst = np.asarray(s[name]), getattr(self, name)
            if src.shape != dst.shape:
                raise ValueError(f"checkpoint array {name} has shape {src.shape}, expected {dst.shape}")
            to_device(src, dst, out=dst)     # (references on x's device; ``fresh`` on the host)

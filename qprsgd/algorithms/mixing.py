"""Neighbour mixing: the one component that forms Σⱼ Wᵢⱼ vⱼ, for every algorithm that mixes.

Used by the gossip family (dcd-ecd-psgd: ``d_psgd``, ``d_psgd_naive_q``, ``dcd_psgd``,
``ecd_psgd``; quantized-pr-sgd Alg. 2: ``dqpr_sgd``) and by cooperative-sgd's A(τ, W, v)
family (``d_pasgd``, ``cooperative``, ``pasgd`` on ``complete``, and the auxiliary-node members
through :func:`combine`).

Order and precision (documented once, here): Σⱼ Wᵢⱼ vⱼ runs over j ∈ {i} ∪ neighbours(i) in
ascending j, each term ``float64(Wᵢⱼ) · float64(vⱼ)`` accumulated in float64, and the sum is
rounded once to float32.  The single rounding makes the result all but independent of the
summation order, so a single-process reference ``(W @ X).astype(float32)`` matches it in
practice -- which matters because a stochastic codec turns a 1-ulp difference in its input into
a whole quantization level now and then.

Uncompressed models cross the transport as raw float32 (:func:`raw_bytes`, 32·d bits per
neighbour on the ``peer`` channel).  The neighbours of worker i are the j ≠ i with Wᵢⱼ ≠ 0; a
:class:`NeighborMixer` takes its row of W and can be given a new row per step (time-varying
graphs W_k: :meth:`NeighborMixer.set_row`).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from ..codecs.identity import from_raw as _identity_from_raw
from ..devices import array_module
from ..codecs.identity import raw_bytes as _identity_raw


def raw_bytes(v: np.ndarray) -> np.ndarray:
    """Uncompressed float32 payload (32·d bits; what D-PSGD sends): the identity codec's wire."""
    return _identity_raw(v)


def from_raw(buf: np.ndarray, d: int) -> np.ndarray:
    """The float32 vector of an identity payload of d elements (a payload of another length is a
    CodecError, a ValueError)."""
    return _identity_from_raw(buf, d)


def combine(terms: Sequence[tuple[int, float]], values: Mapping[int, np.ndarray], d: int,
            out: Optional[np.ndarray] = None) -> np.ndarray:
    """Σ over ``terms`` = [(j, w_j)] (ascending j) of w_j · values[j]: float64 accumulation,
    one rounding to float32 (into ``out`` if given)."""
    xp = array_module(values[terms[0][0]]) if terms else np   # the values' device
    acc = xp.zeros(d, dtype=np.float64)
    tmp = xp.empty(d, dtype=np.float64)
    for j, w in terms:
        np.multiply(values[j], float(w), out=tmp, dtype=np.float64)   # float64(v_j) · w_j
        acc += tmp
    if out is None:
        return acc.astype(np.float32)
    out[...] = acc
    return out


class NeighborMixer:
    """Worker i's side of one gossip step over a transport whose ranks are the workers.

    ``row`` is row i of W (length M).  :meth:`exchange` sends one payload to every neighbour and
    returns a request for theirs; :meth:`mix` forms Σⱼ Wᵢⱼ vⱼ (module docstring);
    :meth:`mix_models` does both for an uncompressed float32 vector.
    """

    def __init__(self, transport, i: int, row: np.ndarray, d: int, channel: str = "peer"):
        if transport is None:
            raise ValueError("transport: a NeighborMixer needs the workers' transport, got None")
        self.transport = transport
        self.i = int(i)
        self.d = int(d)
        self.channel = channel
        self.set_row(row)

    def set_row(self, row: np.ndarray) -> None:
        """Use row i of a (new) mixing matrix from now on (W_k for time-varying graphs)."""
        row = np.asarray(row, dtype=np.float64)
        if row.ndim != 1 or not (0 <= self.i < row.size):
            raise ValueError(f"row: need row {self.i} of W as a 1-D array, got shape {row.shape}")
        self.row = row
        self.neighbors = [j for j in range(row.size) if j != self.i and row[j] != 0.0]
        self.support = sorted([self.i] + self.neighbors)
        self.terms = [(j, float(row[j])) for j in self.support]
        self.send_to = None            # symmetric: send to the neighbours (see set_matrix)

    def set_matrix(self, W: np.ndarray) -> None:
        """Use W_k (a whole, possibly directed, doubly stochastic matrix) for the next exchange:
        receive from the j ≠ i with W[i, j] ≠ 0 (``neighbors``, mixed by row i) and send to the
        j ≠ i with W[j, i] ≠ 0 (``send_to``: those who mix this worker's value).  For a symmetric
        W the two sets agree and the exchange is the symmetric one of :meth:`set_row`."""
        W = np.asarray(W, dtype=np.float64)
        self.set_row(W[self.i])
        col = W[:, self.i]
        send_to = [j for j in range(col.size) if j != self.i and col[j] != 0.0]
        self.send_to = None if send_to == self.neighbors else send_to

    def exchange(self, data):
        """Post ``data`` (a payload) to every neighbour; ``.wait()`` gives ``{j: payload}``."""
        if self.send_to is not None:   # directed step (set_matrix): sends and receives differ
            return self.transport.isparse_exchange({j: data for j in self.send_to}, self.neighbors,
                                                   channel=self.channel)
        return self.transport.ineighbor_exchange(data, self.neighbors, channel=self.channel)

    def mix(self, values: Mapping[int, np.ndarray], out: Optional[np.ndarray] = None) -> np.ndarray:
        """Σⱼ Wᵢⱼ values[j] over i and its neighbours (float64 accumulation, one rounding)."""
        return combine(self.terms, values, self.d, out)

    def mix_models(self, y: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Exchange the float32 vector ``y`` with the neighbours and return Σⱼ Wᵢⱼ yⱼ."""
        got = self.exchange(raw_bytes(y)).wait()
        vals = {j: from_raw(got[j], self.d) for j in self.neighbors}
        vals[self.i] = y
        return self.mix(vals, out)

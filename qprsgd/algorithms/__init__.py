"""Algorithms, one module per paper (see docs/algorithms.md).

quantized_pr         quantized-pr-sgd: psgd, pr_sgd, qsgd, qpr_sgd (Alg. 1, all-reduce)
quantized_pr_gossip  quantized-pr-sgd: dqpr_sgd (Alg. 2, gossip)
dist_ef              dist-ef-blocksgdm: sgdm, ef_sgd, dist_ef_*, signsgd_mv, signum_mv
dcd_ecd              dcd-ecd-psgd: d_psgd, d_psgd_naive_q, dcd_psgd, ecd_psgd
cooperative          cooperative-sgd: the A(τ, W, v) family
powersgd             PowerSGD (Vogels et al. 2019): powersgd
"""
from .base import Algorithm, Env  # noqa: F401
from . import quantized_pr, quantized_pr_gossip, dist_ef, dcd_ecd, cooperative, powersgd  # noqa: F401

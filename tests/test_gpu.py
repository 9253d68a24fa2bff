"""GPU path (run.device: cuda, issue 19).  The GPU tests skip cleanly without CUDA; the same
code path is checked on the CPU by tests/test_devices.py (``run.device: sim``) and the CUDA
codec kernels by tests/test_codecs_cuda.py (numba's simulator).

On a GPU (``pytest -m gpu``): 2 MPI ranks sharing one GPU (``run.share_gpus``) train as the
CPU run does -- forward/backward round differently on the GPU, so parameters agree to float32
noise, not bit for bit -- with the device name and staging path in the HDF5 attributes, only
payload bytes copied to the host for a compressed all-gather algorithm, and an exact resume.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import final_params, run_many, run_qprsgd
from qprsgd.logger import read
from reference import rel_err

CFG = {"seed": 2, "run": {"progress": False}, "train": {"epochs": 1, "batch_size": 8, "lr": 0.1,
       "eval_every": 1000}, "model": {"name": "mlp", "hidden": [16]},
       "data": {"name": "digits", "params": {"max_train": 300, "max_test": 50}}, "algorithm": {"name": "psgd"}}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _on(device: str, alg: dict, **run) -> dict:
    c = copy.deepcopy(CFG)
    c["run"].update({"device": device, **run})
    c["algorithm"] = alg
    return c


@pytest.mark.mpi
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_refused_clearly_without_a_gpu(tmp_path):
    cfg = dict(CFG, run={"progress": False, "device": "cuda"})
    rc, out, err, h5 = run_qprsgd(2, cfg, tmp_path, check=False, timeout=60, mpi=True)
    assert rc == 2 and "run.device" in err and "no CUDA device" in err, err


@pytest.mark.gpu
@pytest.mark.mpi
@needs_cuda
@pytest.mark.parametrize("alg", [{"name": "psgd"}, {"name": "qpr_sgd", "K": 2},
                                 {"name": "dist_ef_blocksgdm"}])
def test_cuda_run_matches_cpu_run(alg, tmp_path):
    cfgs = {"cpu": _on("cpu", alg), "gpu": _on("cuda", alg, share_gpus=True),
            "host": _on("cuda_host", alg, share_gpus=True)}
    h5 = run_many(2, cfgs, tmp_path, mpi=True)
    for k in ("gpu", "host"):   # same equations, same batches and draws: float32 noise only
        assert rel_err(final_params(h5[k]), final_params(h5["cpu"])) < 1e-3, k
    g = read(str(h5["gpu"]))
    assert g["attrs"]["device"] == "cuda" and "cuda" in g["attrs"]["device_name"]
    assert g["attrs"]["gpu_mpi"] in ("staged", "cuda_aware")
    if alg["name"] == "qpr_sgd" and g["attrs"]["gpu_mpi"] == "staged":
        # only the payloads crossed to the host
        np.testing.assert_array_equal(g["metrics"]["bits_to_host"], g["metrics"]["bits_sent"])


@pytest.mark.gpu
@pytest.mark.mpi
@needs_cuda
@pytest.mark.parametrize("alg", [{"name": "psgd"}, {"name": "sgdm"}, {"name": "signsgd_mv"}, {"name": "dist_ef_blocksgdm"}])
def test_cuda_buckets_during_backward_match_one_bucket(alg, tmp_path):
    """Gradient buckets handed over during backward on the GPU (about 1 kB each: the MLP's
    gradient in 5 buckets) train the iterates of one bucket after backward, to float32 noise (the
    same arithmetic: the algorithms whose per-bucket transport is the same compressor -- psgd and
    sgdm's all-reduce, signsgd_mv's byte-aligned sign shares, blockSGDM's block_sign over whole
    parameters), and the run says the hooks delivered buckets during backward."""
    def cfg(mb):
        c = _on("cuda", alg, share_gpus=True)
        c["train"] = dict(c["train"], bucket_mb=mb)
        return c
    h5 = run_many(2, {"one": cfg(0), "buckets": cfg(0.001)}, tmp_path, mpi=True)
    assert rel_err(final_params(h5["buckets"]), final_params(h5["one"])) < 1e-4
    a, b = read(str(h5["one"])), read(str(h5["buckets"]))
    assert int(b["attrs"]["bucket_hooks"]) == 1 and int(a["attrs"]["bucket_hooks"]) == 0
    assert int(b["attrs"]["bucket_hook_deliveries"]) > 0     # handed over during backward
    assert b["metrics"]["messages"][-1] > a["metrics"]["messages"][-1]


@pytest.mark.gpu
@pytest.mark.mpi
@needs_cuda
def test_more_ranks_than_gpus_refused(tmp_path):
    n = torch.cuda.device_count() + 1
    rc, out, err, _ = run_qprsgd(n, _on("cuda", {"name": "psgd"}), tmp_path, check=False,
                                 timeout=120, mpi=True)
    assert rc != 0 and "visible GPU" in err and "run.share_gpus" in err, err


@pytest.mark.gpu
@pytest.mark.mpi
@needs_cuda
def test_cuda_resume_exact(tmp_path):
    from resume_util import check_kill_resume

    cfg = _on("cuda", {"name": "dist_ef_blocksgdm"}, share_gpus=True)
    cfg["train"].update({"epochs": 6, "checkpoint_every": 20, "log_every": 5})
    ref = run_many(2, {"ref": cfg}, tmp_path, mpi=True)["ref"]
    assert check_kill_resume(2, cfg, tmp_path, "gpu", ref, min_step=20, mpi=True) >= 20


@pytest.mark.gpu
@needs_cuda
def test_cuda_payloads_equal_cpu_payloads_on_a_gpu():
    """Every codec with a CUDA backend, on CuPy input on the GPU, gives the CPU backend's payload
    byte for byte and the same decoded vector for the same input and draws (the simulator check
    of tests/test_codecs_cuda.py, on the real device)."""
    import cupy

    from qprsgd.registry import CODECS

    params = {"topk": {"k": 50}, "randk": {"k": 50}, "bernoulli_p": {"p": 0.1},
              "stochastic_bits": {"b": 3}}
    x = np.random.default_rng(0).standard_normal(4099).astype(np.float32)
    checked = []
    for name in CODECS.names():
        f = CODECS.get(name).factory
        if "cuda" not in getattr(f, "IMPLS", {}):
            continue
        kw = params.get(name, {})
        cpu, gpu = f(x.size, None, **kw), f(x.size, None, xp=cupy, backend="cuda", **kw)
        pc = cpu.encode(x, np.random.default_rng(1))
        pg = gpu.encode(cupy.asarray(x), np.random.default_rng(1))
        assert np.asarray(pc.data).tobytes() == cupy.asnumpy(pg.data).tobytes(), name
        assert pc.nbits == pg.nbits, name
        np.testing.assert_array_equal(cpu.decode(pc.data), cupy.asnumpy(gpu.decode(pg.data)), err_msg=name)
        checked.append(name)
    assert "qsgd" in checked and "block_sign" in checked

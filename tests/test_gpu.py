"""GPU path (run.device: cuda): host staging of x and gradients.  Skips cleanly without CUDA."""
from __future__ import annotations

import pytest
import torch

from conftest import final_params, run_many, run_qprsgd
from reference import rel_err

CFG = {"seed": 2, "run": {"progress": False}, "train": {"epochs": 1, "batch_size": 8, "lr": 0.1,
       "eval_every": 1000}, "model": {"name": "mlp", "hidden": [16]},
       "data": {"name": "digits", "params": {"max_train": 300, "max_test": 50}}, "algorithm": {"name": "psgd"}}


@pytest.mark.mpi
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_refused_clearly_without_a_gpu(tmp_path):
    cfg = dict(CFG, run={"progress": False, "device": "cuda"})
    rc, out, err, h5 = run_qprsgd(2, cfg, tmp_path, check=False, timeout=60)
    assert rc == 2 and "run.device" in err and "no CUDA device" in err, err


@pytest.mark.gpu
@pytest.mark.mpi
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_matches_cpu_run(tmp_path):
    gpu = dict(CFG, run={"progress": False, "device": "cuda"})
    h5 = run_many(2, {"cpu": CFG, "gpu": gpu}, tmp_path)
    # same equations, same batches; GPU kernels round differently: agree to float32 noise
    assert rel_err(final_params(h5["gpu"]), final_params(h5["cpu"])) < 1e-4

"""The device code path (issue 19) without a GPU: ``run.device: sim``.

* :class:`qprsgd.devices.SimArray` behaves as CuPy does where it matters: arithmetic stays on the
  device, a host numpy array in a device operation and an implicit conversion to the host raise;
* :class:`qprsgd.transport.Staged` gives device arrays the inner transport's results, and counts
  every host/device copy (bytes down = what it hands the transport, bytes up = what comes back);
* every registered algorithm, run in-process with ``run.device: sim`` -- its state allocated on
  the device, its payloads staged through host buffers -- gives the same final parameters, bits
  and logged metrics as the CPU run, bit for bit, and for the compressed all-gather algorithms
  the bytes that crossed to the host are exactly the payload bytes handed to the transport;
* resume is exact on the device path; a node with fewer GPUs than ranks is refused.
"""
from __future__ import annotations

import copy
import threading

import numpy as np
import pytest

from conftest import inprocess, write_config
from qprsgd.devices import (DeviceMixError, SimArray, Stager, array_module, gpu_for_rank, is_device,
                            sim, to_host)
from qprsgd.inprocess import LocalCluster, LocalTransport
from qprsgd.logger import read
from qprsgd.transport import Ledger, Staged

from test_inprocess import alg_configs


# ---------------------------------------------------------------------------------------------
# the simulated device array

def test_simarray_stays_on_device_and_refuses_host_mixing():
    h = np.arange(6, dtype=np.float32)
    x = sim.asarray(h)
    y = x * np.float32(2) - 1
    assert isinstance(y, SimArray) and array_module(y) is sim
    np.testing.assert_array_equal(to_host(y), h * 2 - 1)
    np.multiply(x, x, out=y)
    np.testing.assert_array_equal(to_host(y), h * h)
    assert isinstance(np.tile(x, (2, 1)), SimArray)
    assert isinstance(np.concatenate([x, y]).view(np.uint8), SimArray)
    assert float(x[2]) == 2.0
    with pytest.raises(DeviceMixError, match="host numpy array"):
        x + h
    with pytest.raises(DeviceMixError, match="host numpy array"):
        x[...] = h
    with pytest.raises(DeviceMixError, match="implicit conversion"):
        np.asarray(x)
    assert is_device(x) and not is_device(h)
    assert array_module(h) is np


def test_gpu_binding_refuses_more_ranks_than_gpus():
    assert gpu_for_rank(1, 2, 2, share=False) == 1
    with pytest.raises(ValueError, match="2 ranks on this node but only 1 visible GPU"):
        gpu_for_rank(1, 2, 1, share=False)
    assert gpu_for_rank(1, 2, 1, share=True) == 0
    with pytest.raises(ValueError, match="no visible CUDA device"):
        gpu_for_rank(0, 1, 0, share=True)


def test_bucket_hooks_decision():
    """Buckets during backward on cpu, sim and cuda when there is more than one; never on
    cuda_host (its gradient is the host copy made after backward)."""
    from qprsgd.experiment import bucket_hooks

    assert bucket_hooks("cpu", 2) and bucket_hooks("sim", 3) and bucket_hooks("cuda", 2)
    assert not bucket_hooks("cpu", 1) and not bucket_hooks("cuda", 1)
    assert not bucket_hooks("cuda_host", 5)


def test_config_refuses_cuda_in_process_and_share_gpus_off_gpu():
    from qprsgd.config import validate

    with pytest.raises(ValueError, match="run.workers"):
        validate({"run": {"device": "cuda", "workers": 2}})
    with pytest.raises(ValueError, match="run.share_gpus"):
        validate({"run": {"device": "sim", "share_gpus": True}})


# ---------------------------------------------------------------------------------------------
# the staged transport

def _on_two_workers(fn):
    cluster = LocalCluster(2, timeout=30)
    out, errs = [None, None], []

    def work(r):
        try:
            led = Ledger()
            t = Staged(LocalTransport(cluster, [0, 1], r, ledger=led), Stager("sim", led))
            out[r] = (fn(t, r), led)
        except BaseException as e:  # surfaced below with its rank
            errs.append((r, e))
            cluster.fail(r, e)

    th = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in th:
        t.start()
    for t in th:
        t.join(60)
    assert not errs, errs
    return out


def test_staged_transport_results_are_device_arrays_and_copies_counted():
    d = 5

    def fn(t, r):
        buf = sim.asarray(np.full(d, r + 1, np.float32))
        t.allreduce_mean(buf)                                       # 20 B down, 20 B up
        pay = sim.asarray(np.full(3 + r, r, np.uint8))
        got = t.allgather_bytes(pay)                                # 3+r down, 3 + 4 up
        nb = t.neighbor_exchange(pay, [1 - r])                      # 3+r down, 4-r up
        return buf, got, nb

    out = _on_two_workers(fn)
    for r, ((buf, got, nb), led) in enumerate(out):
        assert isinstance(buf, SimArray) and all(isinstance(g, SimArray) for g in got)
        np.testing.assert_array_equal(to_host(buf), np.full(d, 1.5, np.float32))
        assert [to_host(g).tolist() for g in got] == [[0] * 3, [1] * 4]
        assert to_host(nb[1 - r]).tolist() == [1 - r] * (4 - r)
        assert led.copy_down_bytes == 20 + 2 * (3 + r)
        assert led.copy_bytes == led.copy_down_bytes + 20 + 7 + (4 - r)
        assert led.total_bytes() == 20 + 2 * (3 + r)     # what the inner transport was handed


# ---------------------------------------------------------------------------------------------
# every algorithm: sim == cpu, bit for bit

M = 2
# the compressed all-gather algorithms: everything they hand the transport is a codec payload
PAYLOAD_ONLY = ("qsgd", "qpr_sgd", "qsgd_per_bucket", "qsgd_rs", "qpr_sgd_rs")


@pytest.fixture(scope="module")
def both_devices(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    out = {}
    for name, cfg in alg_configs(M).items():
        for dev in ("cpu", "sim"):
            c = copy.deepcopy(cfg)
            c["run"]["device"] = dev
            path = write_config(root / f"{name}-{dev}.yaml", c)
            inprocess(M, ["run", str(path), "--out", str(root / f"{name}-{dev}")])
            out[name, dev] = read(str(root / f"{name}-{dev}" / "run.h5"))
    return out


@pytest.mark.parametrize("name", sorted(alg_configs(M)))
def test_sim_device_equals_cpu_bit_for_bit(name, both_devices):
    a, b = both_devices[name, "cpu"], both_devices[name, "sim"]
    np.testing.assert_array_equal(a["final"]["params"], b["final"]["params"], err_msg=name)
    for k in ("bits_sent", "bits_up", "bits_down", "messages", "payload_bits", "rounds", "step",
              "train_loss"):
        np.testing.assert_array_equal(a["metrics"][k], b["metrics"][k], err_msg=f"{name}: {k}")
    assert a["attrs"]["device"] == "cpu" and b["attrs"]["device"] == "sim"
    assert a["attrs"]["gpu_mpi"] == "host" and b["attrs"]["gpu_mpi"] == "staged"
    bucketed = "bucket" in name          # the configs with train.bucket_mb small enough to split d
    for r in (a, b):
        assert int(r["attrs"]["bucket_hooks"]) == bucketed
        assert (int(r["attrs"]["bucket_hook_deliveries"]) > 0) == bucketed   # overlap happened
    assert np.all(a["metrics"]["t_copy"] == 0) and b["metrics"]["t_copy"].sum() > 0
    assert np.all(a["metrics"]["bits_to_host"] == 0)
    if name in PAYLOAD_ONLY:   # only payload bytes left the device: exactly the bits handed to MPI
        np.testing.assert_array_equal(b["metrics"]["bits_to_host"], b["metrics"]["bits_sent"])
    else:
        assert np.all(b["metrics"]["bits_to_host"] >= b["metrics"]["bits_sent"] * 0)


# ---------------------------------------------------------------------------------------------
# exact resume on the device path: state saved from the device, loaded back onto it

def _resume_cfg(alg: dict, device: str, topo=None) -> dict:
    c = {"seed": 5, "run": {"progress": False, "device": device},
         "train": {"epochs": 2, "batch_size": 8, "lr": 0.05, "eval_every": 20, "log_every": 5,
                   "checkpoint_every": 10},
         "model": {"name": "mlp", "hidden": [8]},
         "data": {"name": "digits", "params": {"max_train": 480, "max_test": 40}}, "algorithm": alg}
    if topo is not None:
        c["topology"] = topo
    return c


@pytest.mark.parametrize("alg,topo", [({"name": "dist_ef_blocksgdm"}, None),
                                      pytest.param({"name": "ecd_psgd"}, {"name": "complete"},
                                                   marks=pytest.mark.slow)])
def test_resume_on_sim_device_is_exact_and_equals_cpu(alg, topo, tmp_path):
    from resume_util import assert_same_run, check_stop_resume

    ref = {}
    for dev in ("cpu", "sim"):
        path = write_config(tmp_path / f"ref-{dev}.yaml", _resume_cfg(alg, dev, topo))
        inprocess(2, ["run", str(path), "--out", str(tmp_path / f"ref-{dev}")])
        ref[dev] = tmp_path / f"ref-{dev}" / "run.h5"
    assert_same_run(ref["sim"], ref["cpu"])                      # the device path is the CPU's
    step = check_stop_resume(2, _resume_cfg(alg, "sim", topo), tmp_path, alg["name"], ref["sim"],
                             min_step=10)
    assert step >= 10


@pytest.mark.mpi
@pytest.mark.slow      # (make test-all) the staged path's MPI side is the CPU path's Comm
def test_sim_device_under_mpiexec_equals_cpu_in_process(both_devices, tmp_path):
    """The staged path over real MPI (``mpiexec -n 2``, run.device sim): the same parameters and
    bits as the CPU run in-process (at M = 2 the backends agree bit for bit), for one algorithm
    with a server, per-bucket pushes and error feedback, and one gossip algorithm."""
    from conftest import run_many

    cfgs = {}
    for name in ("dist_ef_blocksgdm_buckets", "dcd_psgd"):
        c = copy.deepcopy(alg_configs(M)[name])
        c["run"]["device"] = "sim"
        cfgs[name] = c
    h5 = run_many(M, cfgs, tmp_path, mpi=True)
    for name in cfgs:
        a, b = both_devices[name, "cpu"], read(str(h5[name]))
        assert b["attrs"]["backend"] == "mpi" and b["attrs"]["gpu_mpi"] == "staged"
        assert int(b["attrs"]["bucket_hooks"]) == ("bucket" in name)
        np.testing.assert_array_equal(a["final"]["params"], b["final"]["params"], err_msg=name)
        for k in ("bits_sent", "bits_up", "bits_down", "messages", "payload_bits"):
            np.testing.assert_array_equal(a["metrics"][k], b["metrics"][k], err_msg=f"{name}: {k}")


def test_cuda_refuses_cupy_per_thread_default_stream():
    from qprsgd.experiment import check_cuda_streams

    check_cuda_streams({})
    check_cuda_streams({"CUPY_CUDA_PER_THREAD_DEFAULT_STREAM": "0"})
    with pytest.raises(ValueError, match=r"CUPY_CUDA_PER_THREAD_DEFAULT_STREAM='1'.*legacy default stream"):
        check_cuda_streams({"CUPY_CUDA_PER_THREAD_DEFAULT_STREAM": "1"})

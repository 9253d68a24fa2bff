import numpy as np
import pytest
import torch

from qprsgd.models import FlatParams, build_model, evaluate, init_parameters, loss_and_grad, loss_fn
from qprsgd.registry import MODELS

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar": (3, 32, 32)}


def _d(name, shape=(3, 32, 32), classes=10, **params):
    return FlatParams(build_model(name, shape, classes, seed=0, **params)).d


def test_registry_names_and_params():
    assert {"logreg", "mlp", "lenet", "resnet20", "resnet18", "vgg11", "linreg"} <= set(MODELS.names())
    with pytest.raises(Exception):
        build_model("mlp", (4,), 3, bogus=1)
    m = build_model("mlp", (4,), 3, hidden=[5, 6])
    assert FlatParams(m).d == 4 * 5 + 5 + 5 * 6 + 6 + 6 * 3 + 3


def test_d_counts():
    assert _d("resnet18") == 11_173_962
    assert _d("vgg11") == 9_750_922
    assert _d("resnet20") == 269_722  # option A (default): parameter-free shortcuts
    assert _d("resnet20", shortcut="B") == 272_474  # option B: 1x1 conv + BN projections
    assert _d("logreg", (1, 8, 8)) == 64 * 10 + 10
    assert _d("linreg", (7,), 0) == 7
    # d does not depend on the input size
    assert _d("vgg11", (1, 28, 28)) == 9_750_922 - 2 * 64 * 9
    assert _d("resnet20", (1, 8, 8)) == 269_722 - 2 * 16 * 9


@pytest.mark.parametrize("name", ["logreg", "mlp", "lenet", "resnet20", "resnet18", "vgg11"])
@pytest.mark.parametrize("ds", sorted(SHAPES))
def test_forward_shapes(name, ds):
    shape = SHAPES[ds]
    m = build_model(name, shape, 10, seed=0)
    m.eval()
    with torch.no_grad():
        out = m(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    assert m.loss_name == "cross_entropy"


def test_flat_feature_models():
    for name in ("logreg", "mlp"):
        m = build_model(name, (13,), 4, seed=0)
        assert m(torch.randn(3, 13)).shape == (3, 4)
    m = build_model("linreg", (13,), 0, seed=0)
    assert m.loss_name == "mse" and m(torch.randn(3, 13)).shape == (3, 1)
    assert float(FlatParams(m).flat.abs().sum()) == 0.0  # x0 = 0
    with pytest.raises(ValueError, match="image"):
        build_model("lenet", (13,), 4)


def _inside(t, buf):
    lo = buf.data_ptr()
    hi = lo + buf.numel() * buf.element_size()
    return lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi


def test_views_share_memory_and_backward_fills_flat_grad():
    torch.manual_seed(0)
    m = build_model("lenet", (1, 8, 8), 10, seed=3)
    before = [p.detach().clone() for p in m.parameters()]
    f = FlatParams(m)
    assert f.d == sum(f.blocks) == sum(p.numel() for p in m.parameters())
    assert len(f.names) == len(f.blocks)
    # flattening kept the values
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p.detach(), b)
    # writing into flat changes the parameters (numpy view too)
    x = f.x_numpy()
    assert np.shares_memory(x, f.flat.numpy())
    x[:] = 0.5
    assert all(bool((p.detach() == 0.5).all()) for p in m.parameters())
    f.flat.normal_(generator=torch.Generator().manual_seed(0))
    p0 = next(m.parameters())
    assert torch.equal(p0.detach().reshape(-1), f.flat[: p0.numel()])

    xb = torch.randn(4, 1, 8, 8)
    yb = torch.tensor([0, 1, 2, 3])
    loss = loss_and_grad(m, f, xb, yb)
    assert np.isfinite(loss)
    g = f.grad_numpy()
    assert np.shares_memory(g, f.grad.numpy()) and np.abs(g).sum() > 0
    for p in m.parameters():
        assert _inside(p.data, f.flat) and _inside(p.grad, f.grad)
    # the flat gradient equals autograd's on an independent copy
    ref = build_model("lenet", (1, 8, 8), 10, seed=3)
    with torch.no_grad():
        for q, p in zip(ref.parameters(), m.parameters()):
            q.copy_(p)
    loss_fn(ref)(ref(xb), yb).backward()
    gref = torch.cat([q.grad.reshape(-1) for q in ref.parameters()])
    assert torch.allclose(gref, f.grad, atol=1e-6)
    # zeroing is in place; a second call does not accumulate
    loss_and_grad(m, f, xb, yb)
    assert torch.allclose(gref, f.grad, atol=1e-6)
    # optimizer-free update in place on flat: views stay
    f.flat.add_(f.grad, alpha=-0.1)
    f.x_numpy()[:] -= 0.01 * f.grad_numpy()
    loss_and_grad(m, f, xb, yb)
    assert f.views_intact()
    for p in m.parameters():
        assert _inside(p.data, f.flat) and _inside(p.grad, f.grad)
    # module.zero_grad() sets p.grad = None; loss_and_grad repairs the views
    m.zero_grad()
    assert not f.views_intact()
    loss_and_grad(m, f, xb, yb)
    assert f.views_intact() and float(f.grad.abs().sum()) > 0


def test_same_seed_same_x_and_global_rng_untouched():
    state = torch.get_rng_state()
    a = FlatParams(build_model("resnet20", (3, 32, 32), 10, seed=7)).x_numpy().copy()
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(123)  # the global RNG must not matter
    b = FlatParams(build_model("resnet20", (3, 32, 32), 10, seed=7)).x_numpy().copy()
    c = FlatParams(build_model("resnet20", (3, 32, 32), 10, seed=8)).x_numpy().copy()
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    m = build_model("mlp", (5,), 2, seed=1)
    init_parameters(m, 9)
    f = FlatParams(build_model("mlp", (5,), 2, seed=2), seed=9)
    assert np.array_equal(FlatParams(m).x_numpy(), f.x_numpy())


def test_buffers_state_roundtrip():
    m = build_model("resnet20", (3, 8, 8), 10, seed=0)
    f = FlatParams(m)
    s0 = f.buffers_state()
    assert any("running_mean" in k for k in s0)
    assert not any("running_mean" in n for n in f.names)  # BN stats are not in x
    m.train()
    loss_and_grad(m, f, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    s1 = f.buffers_state()
    assert any(not np.array_equal(s0[k], s1[k]) for k in s0)
    f.load_buffers_state(s0)
    assert all(np.array_equal(v, f.buffers_state()[k]) for k, v in s0.items())
    with pytest.raises(KeyError):
        f.load_buffers_state({})


def test_mse_loss_matches_least_squares_gradient():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((8, 5)).astype(np.float32)
    y = rng.standard_normal(8).astype(np.float32)
    m = build_model("linreg", (5,), 0, seed=0)
    f = FlatParams(m)
    x = rng.standard_normal(5).astype(np.float32)
    f.x_numpy()[:] = x
    loss = loss_and_grad(m, f, A, y)
    r = A @ x - y
    assert np.isclose(loss, np.mean(r**2), rtol=1e-5)
    assert np.allclose(f.grad_numpy(), 2.0 / len(y) * A.T @ r, rtol=1e-4, atol=1e-5)
    lval, acc = evaluate(m, A, y)
    assert np.isclose(lval, loss, rtol=1e-5) and np.isnan(acc)

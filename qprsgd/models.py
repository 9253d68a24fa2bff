"""Models (plain torch) and the flat parameter buffer that algorithms and codecs work on.

Every builder is registered in :data:`qprsgd.registry.MODELS` with a pydantic params model and
is called as ``factory(in_shape, num_classes, **params.model_dump())``.  ``in_shape`` is
``(C, H, W)`` for images or ``(F,)`` for flat features.  Every returned module carries
``loss_name`` (``"cross_entropy"`` or ``"mse"``); :func:`loss_fn` turns it into a callable.

Use :func:`build_model` to validate params, build and initialise deterministically from a seed,
and :class:`FlatParams` to put all parameters (and their gradients) into one contiguous float32
vector of length ``d``.  See docs/models.md.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .registry import MODELS

__all__ = [
    "FlatParams",
    "build_model",
    "init_parameters",
    "loss_fn",
    "loss_and_grad",
    "evaluate",
    "LogReg",
    "MLP",
    "LeNet",
    "ResNet20",
    "ResNet18",
    "VGG11",
    "LinReg",
]


# --------------------------------------------------------------------------------------------
# params models
class NoParams(BaseModel):
    """Models without hyper-parameters."""

    model_config = ConfigDict(extra="forbid")


class MLPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden: list[int] = Field(default_factory=lambda: [64])

    def model_post_init(self, __context: Any) -> None:
        if any(int(h) < 1 for h in self.hidden):
            raise ValueError(f"mlp: hidden sizes must be >= 1, got {self.hidden}")


# --------------------------------------------------------------------------------------------
# helpers
def _image_shape(name: str, in_shape: Sequence[int]) -> tuple[int, int, int]:
    s = tuple(int(v) for v in in_shape)
    if len(s) != 3 or min(s) < 1:
        raise ValueError(f"{name}: needs an image input shape (C, H, W), got {s}")
    return s  # type: ignore[return-value]


def _num_features(in_shape: Sequence[int]) -> int:
    s = tuple(int(v) for v in in_shape)
    if not s or min(s) < 1:
        raise ValueError(f"bad input shape {s}")
    return int(np.prod(s))


def _classes(name: str, num_classes: int) -> int:
    if int(num_classes) < 1:
        raise ValueError(f"{name}: classification model needs num_classes >= 1, got {num_classes}")
    return int(num_classes)


# --------------------------------------------------------------------------------------------
# models
class LogReg(nn.Module):
    """Multinomial logistic regression: one affine layer on the flattened input."""

    loss_name = "cross_entropy"
    init_scheme = "default"

    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.fc = nn.Linear(_num_features(in_shape), _classes("logreg", num_classes))

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


class MLP(nn.Module):
    """Fully connected net: flatten -> [Linear -> ReLU] * len(hidden) -> Linear."""

    loss_name = "cross_entropy"
    init_scheme = "default"

    def __init__(self, in_shape, num_classes, hidden: Sequence[int] = (64,)):
        super().__init__()
        sizes = [_num_features(in_shape), *[int(h) for h in hidden]]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-1], _classes("mlp", num_classes)))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(torch.flatten(x, 1))


class LeNet(nn.Module):
    """LeNet-5 style CNN: conv5(6)-relu-pool2 -> conv5(16)-relu-pool2 -> 120 -> 84 -> classes.

    conv1 is always 'same' padded (padding 2).  conv2 is unpadded as in LeNet-5 when the map it
    sees is at least 10x10 (MNIST 28 -> 14 -> 10 -> 5: the classic 16*5*5 = 400 features; CIFAR
    32 -> 16 -> 12 -> 6: 576) and 'same' padded for small inputs (digits 8 -> 4 -> 4 -> 2: 64).
    Pools use floor; a map of size 1 is not pooled further.
    """

    loss_name = "cross_entropy"
    init_scheme = "default"

    def __init__(self, in_shape, num_classes):
        super().__init__()
        c, h, w = _image_shape("lenet", in_shape)
        h1, w1 = _pool(h), _pool(w)
        pad2 = 0 if min(h1, w1) >= 10 else 2
        h2, w2 = h1 + 2 * pad2 - 4, w1 + 2 * pad2 - 4
        self.pool_h2, self.pool_w2 = h2 >= 2, w2 >= 2
        h3, w3 = _pool(h2), _pool(w2)
        self.conv1 = nn.Conv2d(c, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=pad2)
        self.pool1 = nn.MaxPool2d((2 if h >= 2 else 1, 2 if w >= 2 else 1))
        self.pool2 = nn.MaxPool2d((2 if h2 >= 2 else 1, 2 if w2 >= 2 else 1))
        self.fc1 = nn.Linear(16 * h3 * w3, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, _classes("lenet", num_classes))

    def forward(self, x):
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _pool(n: int) -> int:
    return n // 2 if n >= 2 else n


class ResNet20Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shortcut: Literal["A", "B"] = "A"


class _BasicBlockA(nn.Module):
    """ResNet basic block with the parameter-free option-A shortcut (He et al. 2016, sec. 4.2):
    when the shape changes, the identity is subsampled by 2 and zero-padded in channels."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.pad = cout - cin

    def shortcut(self, x):
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            lo = self.pad // 2
            x = F.pad(x, (0, 0, 0, 0, lo, self.pad - lo))
        return x

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, sec. 4.2): 3x3 conv(16) stem, 3 stages x 3 basic blocks
    with 16/32/64 channels (stride 2 at stages 2 and 3), global average pool, linear head.

    ``shortcut="A"`` (default, the paper's CIFAR choice): parameter-free zero-padding shortcuts,
    d = 269,722 for 10 classes.  ``shortcut="B"``: 1x1 conv + BN projections at the two
    down-sampling blocks (+512+64 and +2048+128 parameters), d = 272,474 for 10 classes."""

    loss_name = "cross_entropy"
    init_scheme = "he"

    def __init__(self, in_shape, num_classes, shortcut: str = "A"):
        super().__init__()
        c, _, _ = _image_shape("resnet20", in_shape)
        self.conv1 = nn.Conv2d(c, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(3):
                stride = 2 if (stage > 0 and i == 0) else 1
                if shortcut == "A":
                    blocks.append(_BasicBlockA(cin, cout, stride))
                elif shortcut == "B":
                    blocks.append(_BasicBlockB(cin, cout, stride))
                else:
                    raise ValueError(f"resnet20: shortcut must be 'A' or 'B', got {shortcut!r}")
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, _classes("resnet20", num_classes))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class _BasicBlockB(nn.Module):
    """ResNet basic block with the projection (option-B, 1x1 conv + BN) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-sized ResNet-18: 3x3 conv(64) stem without max-pool, 4 stages x 2 basic blocks with
    64/128/256/512 channels (stride 2 from stage 2), projection shortcuts, global average pool,
    linear head.  d = 11,173,962 for 10 classes."""

    loss_name = "cross_entropy"
    init_scheme = "default"

    def __init__(self, in_shape, num_classes):
        super().__init__()
        c, _, _ = _image_shape("resnet18", in_shape)
        self.conv1 = nn.Conv2d(c, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks: list[nn.Module] = []
        cin = 64
        for stage, cout in enumerate((64, 128, 256, 512)):
            for i in range(2):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(_BasicBlockB(cin, cout, stride))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, _classes("resnet18", num_classes))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


_VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """CIFAR VGG-11 (configuration A of Simonyan & Zisserman), no batch norm: eight 3x3 convs
    64-M-128-M-256-256-M-512-512-M-512-512-M, then a 512-512-10 MLP head, i.e. three linear
    layers Linear(512,512)-ReLU-Linear(512,512)-ReLU-Linear(512,classes) (no dropout).
    d = 9,220,480 (convs) + 530,442 (head) = 9,750,922 for 10 classes.

    On 32x32 inputs the five max-pools reduce the map to 1x1.  For smaller inputs a pool that
    would see a 1-pixel map is skipped, and a global average pool before the head makes the
    512 features independent of the input size (a no-op at 1x1); d does not depend on H, W.
    """

    loss_name = "cross_entropy"
    init_scheme = "default"

    def __init__(self, in_shape, num_classes):
        super().__init__()
        c, h, w = _image_shape("vgg11", in_shape)
        layers: list[nn.Module] = []
        cin = c
        for v in _VGG11_CFG:
            if v == "M":
                kh, kw = (2 if h >= 2 else 1), (2 if w >= 2 else 1)
                layers.append(nn.MaxPool2d((kh, kw)) if (kh, kw) != (1, 1) else nn.Identity())
                h, w = _pool(h), _pool(w)
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, _classes("vgg11", num_classes)),
        )

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


class LinReg(nn.Module):
    """Least squares: one bias-free linear layer x -> <a, x> (d = number of features), MSE loss.
    Initialised to zero (x0 = 0), so the distance to x* at step 0 is ||x*||."""

    loss_name = "mse"
    init_scheme = "zeros"

    def __init__(self, in_shape, num_classes=0):
        super().__init__()
        out = int(num_classes) if int(num_classes) > 0 else 1
        self.fc = nn.Linear(_num_features(in_shape), out, bias=False)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------
# registry
@MODELS.register("logreg", params=NoParams)
def logreg(in_shape, num_classes):
    """Multinomial logistic regression (one linear layer), cross-entropy."""
    return LogReg(in_shape, num_classes)


@MODELS.register("mlp", params=MLPParams)
def mlp(in_shape, num_classes, hidden=(64,)):
    """Fully connected ReLU net with the given hidden sizes, cross-entropy."""
    return MLP(in_shape, num_classes, hidden)


@MODELS.register("lenet", params=NoParams)
def lenet(in_shape, num_classes):
    """LeNet-5 style CNN for 1x8x8, 1x28x28 and 3x32x32 inputs, cross-entropy."""
    return LeNet(in_shape, num_classes)


@MODELS.register("resnet20", params=ResNet20Params)
def resnet20(in_shape, num_classes, shortcut="A"):
    """CIFAR ResNet-20, option-A (d = 269,722) or -B (d = 272,474) shortcuts, cross-entropy."""
    return ResNet20(in_shape, num_classes, shortcut)


@MODELS.register("resnet18", params=NoParams)
def resnet18(in_shape, num_classes):
    """CIFAR ResNet-18 (3x3 stem, no max-pool; d = 11,173,962 for 10 classes), cross-entropy."""
    return ResNet18(in_shape, num_classes)


@MODELS.register("vgg11", params=NoParams)
def vgg11(in_shape, num_classes):
    """CIFAR VGG-11 without BN, 512-512-classes head (d = 9,750,922 for 10), cross-entropy."""
    return VGG11(in_shape, num_classes)


@MODELS.register("linreg", params=NoParams)
def linreg(in_shape, num_classes=0):
    """Bias-free linear model for the synthetic least-squares problem, MSE loss."""
    return LinReg(in_shape, num_classes)


# --------------------------------------------------------------------------------------------
# deterministic initialisation
def init_parameters(module: nn.Module, seed: int) -> nn.Module:
    """(Re)initialise every parameter of ``module`` from ``torch.Generator().manual_seed(seed)``.

    The global torch RNG is neither used nor advanced, so the same seed gives bit-identical
    parameters in every process.  Scheme, by the top module's ``init_scheme``:

    * ``"default"``: PyTorch's default for Conv/Linear (Kaiming-uniform with a = sqrt(5),
      bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))), drawn from the generator;
    * ``"he"``: Kaiming-normal (fan_in, ReLU gain) weights for Conv and Linear, zero biases
      (He et al. 2015, as used for the CIFAR ResNets);
    * ``"zeros"``: every parameter is 0 (the least-squares model).

    BatchNorm weight = 1, bias = 0 in every scheme; buffers (running stats) are reset.
    Modules are visited in ``named_modules()`` order, parameters in registration order.
    """
    scheme = getattr(module, "init_scheme", "default")
    if scheme not in ("default", "he", "zeros"):
        raise ValueError(f"unknown init_scheme {scheme!r}")
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                if m.affine:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                if m.track_running_stats:
                    m.reset_running_stats()
                continue
            if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                if any(True for _ in m.parameters(recurse=False)):
                    raise TypeError(f"init_parameters: no rule for {type(m).__name__}")
                continue
            w = m.weight
            b = m.bias
            if scheme == "zeros":
                w.zero_()
                if b is not None:
                    b.zero_()
                continue
            # draw on the CPU generator, then copy (works for any device of the module)
            tmp = torch.empty(w.shape, dtype=torch.float32)
            if scheme == "he":
                nn.init.kaiming_normal_(tmp, mode="fan_in", nonlinearity="relu", generator=g)
                w.copy_(tmp)
                if b is not None:
                    b.zero_()
            else:
                nn.init.kaiming_uniform_(tmp, a=math.sqrt(5), generator=g)
                w.copy_(tmp)
                if b is not None:
                    fan_in = w[0].numel()
                    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    tb = torch.empty(b.shape, dtype=torch.float32)
                    nn.init.uniform_(tb, -bound, bound, generator=g)
                    b.copy_(tb)
    return module


def build_model(
    name: str, in_shape: Sequence[int], num_classes: int, *, seed: int = 0, **params: Any
) -> nn.Module:
    """Validate ``params`` with the registered params model (unknown keys raise), build the
    module and initialise it with :func:`init_parameters` (``seed``).  Construction runs inside
    ``torch.random.fork_rng`` so the global RNG state is left exactly as it was."""
    entry = MODELS.get(name)
    if entry.params is not None:
        kwargs = entry.params.model_validate(params).model_dump()
    else:
        kwargs = dict(params)
    with torch.random.fork_rng(devices=[]):
        module = entry.factory(tuple(int(v) for v in in_shape), int(num_classes), **kwargs)
    init_parameters(module, seed)
    return module


# --------------------------------------------------------------------------------------------
# losses
def _cross_entropy(out, target):
    return F.cross_entropy(out, target)


def _mse(out, target):
    # mean over the batch of (<a_i, x> - y_i)^2 (no 1/2): grad = (2/B) A^T (A x - y)
    if out.dim() == 2 and out.shape[1] == 1 and target.dim() == 1:
        out = out[:, 0]
    return F.mse_loss(out, target.to(out.dtype))


_LOSSES: dict[str, Callable] = {"cross_entropy": _cross_entropy, "mse": _mse}


def loss_fn(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss the model declares (``model.loss_name``) as ``f(output, target) -> scalar``
    (mean over the batch)."""
    name = getattr(model, "loss_name", None)
    if name not in _LOSSES:
        raise ValueError(f"model {type(model).__name__} declares no known loss_name (got {name!r})")
    return _LOSSES[name]


# --------------------------------------------------------------------------------------------
# flat parameters
class FlatParams:
    """All parameters of ``module`` in one contiguous 1-D float32 tensor ``flat`` (length ``d``),
    with every ``p.data`` a view into it, and every ``p.grad`` a view into one flat ``grad``.

    * Order: ``module.named_parameters()`` (shared parameters once), ``names``/``blocks`` give
      the name and size of each slice; ``offsets[i]`` is where parameter ``i`` starts.
    * After ``zero_grad()`` (which is ``grad.zero_()``) ``loss.backward()`` accumulates in place
      into the views, so ``grad`` holds the gradient with no copy.  Never call
      ``module.zero_grad()`` / ``optimizer.zero_grad()`` (they set ``p.grad = None`` and break
      the views); :meth:`rebind` repairs that (and :func:`loss_and_grad` calls it).
    * Updates must be in place on ``flat`` (``flat.add_(...)``, ``x_numpy()[:] = ...``).
    * Buffers (BatchNorm running stats) are not in ``flat``: they stay module buffers, local to
      the rank; :meth:`buffers_state` / :meth:`load_buffers_state` save and restore them.
    * ``seed``: if given, :func:`init_parameters` (module, seed) runs first, so every rank that
      passes the same seed starts from the same x0.
    """

    def __init__(self, module: nn.Module, seed: Optional[int] = None):
        if seed is not None:
            init_parameters(module, seed)
        self.module = module
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("FlatParams: module has no trainable parameters")
        devices = {p.device for _, p in named}
        if len(devices) != 1:
            raise ValueError(f"FlatParams: parameters live on several devices: {devices}")
        device = devices.pop()
        self.names: tuple[str, ...] = tuple(n for n, _ in named)
        self.blocks: tuple[int, ...] = tuple(int(p.numel()) for _, p in named)
        self.shapes: tuple[tuple[int, ...], ...] = tuple(tuple(p.shape) for _, p in named)
        offs = np.concatenate([[0], np.cumsum(self.blocks)]).astype(np.int64)
        self.offsets: tuple[int, ...] = tuple(int(o) for o in offs[:-1])
        self.d: int = int(offs[-1])
        self.params: tuple[nn.Parameter, ...] = tuple(p for _, p in named)
        self.flat = torch.empty(self.d, dtype=torch.float32, device=device)
        self.grad = torch.zeros(self.d, dtype=torch.float32, device=device)
        with torch.no_grad():
            for p, o, n in zip(self.params, self.offsets, self.blocks):
                self.flat[o : o + n].copy_(p.detach().reshape(-1))
        self._xviews = tuple(
            self.flat[o : o + n].view(s) for o, n, s in zip(self.offsets, self.blocks, self.shapes)
        )
        self._gviews = tuple(
            self.grad[o : o + n].view(s) for o, n, s in zip(self.offsets, self.blocks, self.shapes)
        )
        self.rebind()

    # -- views -------------------------------------------------------------------------
    def rebind(self) -> bool:
        """Make every ``p.data`` / ``p.grad`` a view into ``flat`` / ``grad`` again.

        A parameter whose data was replaced has its current values copied into ``flat``; a
        replaced gradient is copied into ``grad``.  Returns True if anything had to be fixed."""
        fixed = False
        with torch.no_grad():
            for p, xv, gv in zip(self.params, self._xviews, self._gviews):
                if p.data.data_ptr() != xv.data_ptr():
                    xv.copy_(p.data)
                    p.data = xv
                    fixed = True
                g = p.grad
                if g is None or g.data_ptr() != gv.data_ptr():
                    if g is not None:
                        gv.copy_(g)
                    p.grad = gv
                    fixed = True
        return fixed

    def views_intact(self) -> bool:
        """True if every ``p.data`` and ``p.grad`` still points into ``flat`` / ``grad``."""
        for p, xv, gv in zip(self.params, self._xviews, self._gviews):
            if p.data.data_ptr() != xv.data_ptr():
                return False
            if p.grad is None or p.grad.data_ptr() != gv.data_ptr():
                return False
        return True

    def zero_grad(self) -> None:
        """``grad.zero_()``: zero the flat gradient in place (the views stay)."""
        self.grad.zero_()

    # -- numpy access ------------------------------------------------------------------
    def x_numpy(self) -> np.ndarray:
        """A numpy float32 array sharing memory with ``flat`` (CPU only)."""
        if self.flat.device.type != "cpu":
            raise RuntimeError("x_numpy() needs the flat buffer on the CPU")
        return self.flat.numpy()

    def grad_numpy(self) -> np.ndarray:
        """A numpy float32 array sharing memory with ``grad`` (CPU only)."""
        if self.grad.device.type != "cpu":
            raise RuntimeError("grad_numpy() needs the flat buffer on the CPU")
        return self.grad.numpy()

    def split(self, v) -> list:
        """Split a length-d vector (numpy or torch) into per-parameter slices (in ``names`` order)."""
        return [v[o : o + n] for o, n in zip(self.offsets, self.blocks)]

    # -- buffers -------------------------------------------------------------------------
    def buffers_state(self) -> "OrderedDict[str, np.ndarray]":
        """Copies of the module's buffers (BatchNorm running mean/var, num_batches_tracked)."""
        return OrderedDict(
            (n, b.detach().cpu().numpy().copy()) for n, b in self.module.named_buffers()
        )

    def load_buffers_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore buffers saved by :meth:`buffers_state`; names and shapes must match exactly."""
        bufs = dict(self.module.named_buffers())
        missing = sorted(set(bufs) - set(state))
        extra = sorted(set(state) - set(bufs))
        if missing or extra:
            raise KeyError(f"load_buffers_state: missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for n, b in bufs.items():
                v = np.asarray(state[n])
                if tuple(v.shape) != tuple(b.shape):
                    raise ValueError(
                        f"load_buffers_state: {n} has shape {tuple(v.shape)}, expected {tuple(b.shape)}"
                    )
                b.copy_(torch.as_tensor(v, dtype=b.dtype))

    def __repr__(self) -> str:
        return f"FlatParams(d={self.d}, params={len(self.blocks)}, device={self.flat.device})"


def _as_tensor(a, device, dtype=None):
    if isinstance(a, torch.Tensor):
        t = a
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.to(device) if t.device != device else t


def loss_and_grad(module: nn.Module, flat: FlatParams, xb, yb) -> float:
    """Zero ``flat.grad``, run forward, the module's loss and backward; ``flat.grad`` then holds
    the mini-batch gradient (mean over the batch).  Returns the loss as a Python float.

    ``xb``/``yb`` may be numpy arrays or tensors; they are moved to the flat buffer's device.
    The module's train/eval mode is left as the caller set it."""
    if flat.module is not module:
        raise ValueError("loss_and_grad: flat was built for a different module")
    flat.rebind()
    flat.zero_grad()
    dev = flat.flat.device
    x = _as_tensor(xb, dev, torch.float32)
    y = _as_tensor(yb, dev)
    out = module(x)
    loss = loss_fn(module)(out, y)
    loss.backward()
    if not flat.views_intact():  # pragma: no cover - autograd accumulates in place
        flat.rebind()
    return float(loss.detach())


@torch.no_grad()
def evaluate(module: nn.Module, x, y, batch_size: int = 1000) -> tuple[float, float]:
    """Mean loss and accuracy of ``module`` on ``(x, y)`` in eval mode (accuracy is NaN for the
    MSE models).  Restores the previous train/eval mode."""
    was_training = module.training
    module.eval()
    f = loss_fn(module)
    dev = next(module.parameters()).device
    n = len(x)
    tot_loss, correct = 0.0, 0
    try:
        for s in range(0, n, batch_size):
            xb = _as_tensor(x[s : s + batch_size], dev, torch.float32)
            yb = _as_tensor(y[s : s + batch_size], dev)
            out = module(xb)
            tot_loss += float(f(out, yb)) * len(xb)
            if module.loss_name == "cross_entropy":
                correct += int((out.argmax(1) == yb).sum())
    finally:
        module.train(was_training)
    acc = correct / n if module.loss_name == "cross_entropy" else float("nan")
    return tot_loss / max(n, 1), acc

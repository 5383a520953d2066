"""Test cases held as data, shared by the test modules: the nets users write, builders, checks.

``CASES`` are the problems every registered strategy is checked on (``test_strategies``);
``USER_CASES`` are the nets and losses users write (custom modules, lambdas, LayerNorm,
subsets of parameters), on which the structured strategy is checked (``test_kron``) and
the first three of which every strategy is checked on too.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from bench.problems.models import LayerNormMLP, custom_mse, small_conv


def mlp(act: type[nn.Module] = nn.Tanh, sizes=(3, 5, 4, 2), bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _regression(net: nn.Module, n_in: int, n_out: int, n: int = 7):
    return net, (torch.randn(n, n_in), torch.randn(n, n_out)), None


def tanh_mse():
    return _regression(mlp(), 3, 2)


def ce_several_outputs():
    net = mlp(sizes=(4, 6, 5))
    return net, (torch.randn(9, 4), torch.randint(0, 5, (9,))), F.cross_entropy


def relu_mse():
    return _regression(mlp(nn.ReLU, sizes=(3, 6, 6, 2)), 3, 2)


def conv_net():
    net = small_conv()
    return net, (torch.randn(4, 1, 5, 5), torch.randint(0, 3, (4,))), F.cross_entropy


def _batchnorm_net(train: bool):
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            net(torch.randn(16, 3) * 2 + 1)
    net.train(train)
    return _regression(net, 3, 2, n=8)


def batchnorm_eval():
    return _batchnorm_net(train=False)


def batchnorm_train():
    return _batchnorm_net(train=True)


def bias_free():
    return _regression(mlp(sizes=(3, 4, 2), bias=False), 3, 2)


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = mlp(sizes=(3, 4, 2))
        self.spare = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return self.body(x)


def unused_parameter():
    return _regression(_Unused(), 3, 2)


class _Tied(nn.Module):
    """Applies the same square Linear twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


def weight_used_twice():
    return _regression(_Tied(), 3, 1)


def _subset(builder: Callable, names: list[str]) -> Callable:
    def build():
        net, batch, loss_fn = builder()
        own = dict(net.named_parameters())
        return net, batch, loss_fn, {n: own[n] for n in names}

    return build


def _frozen():
    net, batch, loss_fn = tanh_mse()
    for p in net[0].parameters():
        p.requires_grad_(False)
    return net, batch, loss_fn


CASES: dict[str, Callable] = {
    "tanh_mse": tanh_mse,
    "ce_several_outputs": ce_several_outputs,
    "relu_mse": relu_mse,
    "conv_net": conv_net,
    "batchnorm_eval": batchnorm_eval,
    "batchnorm_train": batchnorm_train,
    # shuffled order: the output must follow the mapping, not the net
    "subset": _subset(tanh_mse, ["4.bias", "2.weight", "0.bias"]),
    "frozen_layer": _subset(_frozen, ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight"]),
    "bias_free": bias_free,
    "unused_parameter": unused_parameter,
    "weight_used_twice": weight_used_twice,
}


def build(case: str, dtype: torch.dtype = torch.float64):
    """``(net, params, batch, loss_fn)`` of ``CASES[case]`` in ``dtype``, deterministic."""
    torch.manual_seed(0)
    made = CASES[case]()
    net, batch, loss_fn = made[:3]
    net = net.to(dtype)
    names = list(made[3]) if len(made) == 4 else [n for n, _ in net.named_parameters()]
    own = dict(net.named_parameters())
    inputs, targets = batch
    inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
    targets = targets.to(dtype) if targets.is_floating_point() else targets
    return net, {n: own[n] for n in names}, (inputs, targets), loss_fn


def snapshot(net: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in net.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in net.named_parameters()},
        "grad": {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()},
        "training": [m.training for m in net.modules()],
    }


def assert_unchanged(net: nn.Module, before: dict) -> None:
    after = snapshot(net)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"
    assert after["requires_grad"] == before["requires_grad"]
    for n, g in before["grad"].items():
        assert (g is None) == (after["grad"][n] is None), f"{n}.grad changed"
        if g is not None:
            assert torch.equal(g, after["grad"][n]), f"{n}.grad changed"
    assert after["training"] == before["training"]


def assert_close_to(H: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    scale = ref.abs().max().clamp_min(1e-30)
    err = (H.double() - ref).abs().max() / scale
    assert err <= rel, f"max error {err:.3e} relative to the largest entry (allowed {rel:.0e})"


# --- the nets users write ---


class ReadmeModel(nn.Module):
    """The form of the question this project answers, the README's ``Model``: two Linear layers,
    a squeezed output (``bench.problems.models.Model``, the forum thread's, keeps its output
    dimension)."""

    def __init__(self, input_dim: int = 8, hidden_dim: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden_dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))).squeeze(-1)


class Residual(nn.Module):
    """Functional activations and a skip connection around a wide Linear: ``hidden`` and
    ``out`` see ``width`` >= 32 inputs (kron's one-GEMM-per-direction path), at a P small
    enough for every strategy's loop (324)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.hidden = nn.Linear(width, 1)  # broadcast over the width by the skip connection
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h = F.silu(self.inp(x))
        h = h + F.gelu(self.hidden(h))
        return self.out(h)


def layernorm_mlp(dims=(6, 12, 12, 2)) -> LayerNormMLP:
    """LayerNorm after each hidden Linear: its affine parameters get Hessian-vector rows."""
    return LayerNormMLP([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])], "tanh")


class FunctionalNorm(nn.Module):
    """F.layer_norm called in the forward with weights of its own."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.w = nn.Parameter(torch.rand(6) + 0.5)
        self.b = nn.Linear(6, 2, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(F.layer_norm(self.a(x), (6,), self.w)))


class Tied(nn.Module):
    """One Linear applied twice, and a weight also used outside its layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(torch.tanh(self.a(x)))
        return self.b(torch.tanh(h)) + 0.1 * (self.b.weight**2).sum()


class Sequence(nn.Module):
    """A Linear on a (batch, time, features) input: its rows come from Hessian-vector products."""

    def __init__(self):
        super().__init__()
        self.step = nn.Linear(3, 4)
        self.head = nn.Linear(4 * 5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.step(x)).flatten(1))


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.emb(x)))


class Recurrent(nn.Module):
    """A GRU has no forward-mode batching rule: every row comes from reverse-over-reverse."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


class PINN(nn.Module):
    """A physics-informed net: its output is u and du/dx, through autograd.grad in the forward."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.u = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x):
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        u = self.u(x)
        (du,) = torch.autograd.grad(u, x, torch.ones_like(u), create_graph=True)
        return torch.cat([u, du], dim=1)


class RawWeights(nn.Module):
    """Weights held as plain parameters and used by matmul: no Linear for kron to exploit."""

    def __init__(self, n_in: int = 8, width: int = 40):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_in, width) / n_in**0.5)
        self.v = nn.Parameter(torch.randn(width, 1) / width**0.5)

    def forward(self, x):
        return torch.tanh(x @ self.w) @ self.v


class MeanOverBatch(nn.Module):
    """Subtracts the batch mean: samples are not independent."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0))


def seq(*dims, act=nn.Tanh) -> nn.Sequential:
    """``mlp`` with its sizes as arguments."""
    return mlp(act, dims)


def _x(n: int, d: int):
    return torch.randn(n, d)


#: name -> (net builder, batch builder, loss, parameter names or None for all)
USER_CASES = {
    "thread_model": (ReadmeModel, lambda: (_x(16, 8), torch.randn(16)), custom_mse, None),
    "residual_silu_gelu": (Residual, lambda: (_x(12, 5), torch.randn(12, 3)), None, None),
    "layernorm_mlp": (layernorm_mlp, lambda: (_x(10, 6), torch.randn(10, 2)), None, None),
    "functional_layer_norm": (FunctionalNorm, lambda: (_x(9, 4), torch.randn(9, 2)), None, None),
    "huber": (Residual, lambda: (_x(12, 5), 3 * torch.randn(12, 3)), F.huber_loss, None),
    "smooth_l1_sum": (
        ReadmeModel,
        lambda: (_x(10, 8), 2 * torch.randn(10)),
        functools.partial(F.smooth_l1_loss, reduction="sum", beta=0.5),
        None,
    ),
    "bce_with_logits": (
        lambda: seq(4, 9, 3),
        lambda: (_x(11, 4), torch.rand(11, 3)),
        F.binary_cross_entropy_with_logits,
        None,
    ),
    "ce_label_smoothing": (
        lambda: seq(4, 9, 5, act=nn.GELU),
        lambda: (_x(11, 4), torch.randint(0, 5, (11,))),
        nn.CrossEntropyLoss(label_smoothing=0.1),
        None,
    ),
    "ce_weight_ignore_index": (
        lambda: seq(4, 9, 5),
        lambda: (_x(11, 4), torch.tensor([0, 1, 2, 3, 4, -100, 1, 2, 3, 0, 4])),
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0]), ignore_index=-100),
        None,
    ),
    "gaussian_nll": (
        lambda: seq(4, 8, 2),
        lambda: (_x(10, 4), torch.randn(10, 1)),
        lambda out, y: F.gaussian_nll_loss(out[:, :1], y, F.softplus(out[:, 1:]) + 0.1),
        None,
    ),
    "mse_module": (Residual, lambda: (_x(12, 5), torch.randn(12, 3)), nn.MSELoss(), None),
    "weights_only": (
        lambda: seq(4, 40, 6, 2),
        lambda: (_x(9, 4), torch.randn(9, 2)),
        None,
        ["0.weight", "2.weight", "4.weight"],
    ),
    "last_layer_only": (
        lambda: seq(4, 6, 6, 2),
        lambda: (_x(9, 4), torch.randn(9, 2)),
        None,
        ["4.weight", "4.bias"],
    ),
    "shuffled_order": (
        layernorm_mlp,
        lambda: (_x(10, 6), torch.randn(10, 2)),
        None,
        [
            "fcs.2.bias",
            "norms.0.weight",
            "fcs.0.weight",
            "fcs.1.bias",
            "fcs.2.weight",
            "norms.1.bias",
            "fcs.1.weight",
        ],
    ),  # fmt: skip
    "bias_without_weight": (
        lambda: seq(3, 40, 2),
        lambda: (_x(9, 3), torch.randn(9, 2)),
        None,
        ["0.bias", "2.weight"],
    ),
    "tied_linear": (Tied, lambda: (_x(8, 4), torch.randn(8, 2)), None, None),
    "linear_on_sequence": (Sequence, lambda: (torch.randn(6, 5, 3), torch.randn(6, 2)), None, None),
    "embedding_inputs": (
        Embed,
        lambda: (torch.randint(0, 7, (10,)), torch.randint(0, 2, (10,))),
        F.cross_entropy,
        None,
    ),
    "gru_then_linear": (Recurrent, lambda: (torch.randn(5, 4, 3), torch.randn(5, 2)), None, None),
    "conv_then_linear": (
        small_conv,
        lambda: (torch.randn(5, 1, 5, 5), torch.randint(0, 3, (5,))),
        F.cross_entropy,
        None,
    ),
}


def build_user(case: str, dtype: torch.dtype = torch.float64):
    """``(net, params, batch, loss_fn)`` of ``USER_CASES[case]`` in ``dtype``, deterministic."""
    make_net, make_batch, loss, names = USER_CASES[case]
    torch.manual_seed(0)
    net = make_net().to(dtype)
    if isinstance(loss, nn.Module):
        loss = loss.to(dtype)
    batch = tuple(t.to(dtype) if t.is_floating_point() else t for t in make_batch())
    own = dict(net.named_parameters())
    params = own if names is None else {n: own[n] for n in names}
    return net, params, batch, loss


def _user_case(name: str):
    make_net, make_batch, loss, names = USER_CASES[name]
    made = (make_net(), make_batch(), loss)
    return made if names is None else (*made, names)


# every strategy is checked on the first nets users write, too
for _name in ("thread_model", "residual_silu_gelu", "layernorm_mlp"):
    CASES[_name] = functools.partial(_user_case, _name)


# --- nets whose Hessian autograd leaves ill-defined or wrong, and batches of several inputs ---


class HookedLinear(nn.Module):
    """A user's forward hook doubles a Linear's output, or a pre-hook doubles its input."""

    def __init__(self, pre: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        if pre:
            self.b.register_forward_pre_hook(lambda module, args: (2 * args[0],))
        else:
            self.a.register_forward_hook(lambda module, args, output: 2 * output)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class PaddedEmbedding(nn.Module):
    """Token ids with padding index 0, mean-pooled over the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3, padding_idx=0)
        self.fc = nn.Linear(3, 2)

    def forward(self, ids):
        return self.fc(torch.tanh(self.emb(ids))).mean(1)


_IDS = [[0, 1, 2], [3, 0, 4], [1, 2, 3], [4, 4, 0]]


class NoGradGate(nn.Module):
    """A side branch computed under torch.no_grad() gates the main branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.side = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            gate = torch.sigmoid(self.side(x))
        return self.b(torch.tanh(self.a(x)) * gate)


class FrozenFirstLayer(nn.Module):
    """The first layer run without autograd, as when freezing a feature extractor by hand:
    under torch.no_grad() or, held constant on every path, through .detach()."""

    def __init__(self, detach: bool = False) -> None:
        super().__init__()
        self.detach = detach
        self.features = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        if self.detach:
            h = self.features(x).detach()
        else:
            with torch.no_grad():
                h = self.features(x)
        return self.head(torch.tanh(h))


class DetachedGate(NoGradGate):
    """The side branch's gate held constant through .detach()."""

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) * torch.sigmoid(self.side(x)).detach())


def weight_norm_net(old_api: bool = False) -> nn.Sequential:
    torch.manual_seed(0)  # both APIs start from the same weights
    layer = nn.Linear(3, 4)
    if old_api:
        layer = nn.utils.weight_norm(layer)
    else:
        layer = nn.utils.parametrizations.weight_norm(layer)
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 2))


def pruned_net() -> nn.Sequential:
    """Half the first layer's weights pruned: a forward pre-hook computes weight_orig * mask."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    return net


def spectral_norm_net(train: bool) -> nn.Sequential:
    net = nn.Sequential(
        nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)
    )
    return net.train(train)


class PenaltyInForward(nn.Module):
    """The supported way to a weight penalty: the forward computes it from its own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        penalty = sum(p.pow(2).sum() for p in self.parameters())
        return self.b(torch.tanh(self.a(x))), penalty


class TinyUNet(nn.Module):
    """Down, pool, up by nearest-neighbour upsampling, and a skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Conv2d(2, 2, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        d = torch.tanh(self.down(x))
        return self.out(torch.cat([d, self.up(torch.tanh(self.mid(self.pool(d))))], 1))


class TwoInputs(nn.Module):
    """forward(x, z): called as net(*inputs) with a tuple of inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.c = nn.Linear(2, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x, z):
        return self.b(torch.tanh(self.a(x) + self.c(z)))


class MaskedTokenClassifier(nn.Module):
    """A HuggingFace-style model: forward(input_ids, attention_mask), called as net(**inputs)
    (not ``bench.problems.models.TokenClassifier``, the benchmark's transformer)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.emb(input_ids)) * attention_mask[..., None]
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))


def _weight_penalty_loss(net: nn.Module):
    return lambda o, t: F.mse_loss(o, t) + 1e-3 * sum(p.pow(2).sum() for p in net.parameters())


def _with_penalty(outputs, targets):
    out, penalty = outputs
    return ((out - targets) ** 2).mean() + 1e-3 * penalty


def _regress(n: int = 6, d: int = 3, out: int = 2):
    return torch.randn(n, d), torch.randn(n, out)


def _mask() -> torch.Tensor:
    return torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])


#: name -> dict(net, batch, loss (or loss_of_net: a function of the net giving the loss), params
#: (absent: all), then either refused (what every strategy's ValueError must say) or reference:
#: "loop" (float64 double backward), "fd" (central differences, where torch's double
#: backward is wrong), or a builder of an equivalent net to take central differences of;
#: allowed: what a refusal of an exact case may say, for the strategies that refuse it)
ROBUST_CASES: dict[str, dict] = {
    "forward_hook": dict(net=HookedLinear, batch=_regress, reference="loop"),
    "forward_pre_hook": dict(net=lambda: HookedLinear(pre=True), batch=_regress, reference="loop"),
    "embedding_padding_in_batch": dict(
        net=PaddedEmbedding,
        batch=lambda: (torch.tensor(_IDS), torch.randn(4, 2)),
        refused=r"module 'emb'.*padding_idx=0 meets index 0",
    ),
    "embedding_padding_not_in_batch": dict(
        net=PaddedEmbedding,
        batch=lambda: (torch.tensor(_IDS).clamp_min(1), torch.randn(4, 2)),
        reference="loop",
    ),
    "embedding_padding_weight_not_chosen": dict(
        net=PaddedEmbedding,
        batch=lambda: (torch.tensor(_IDS), torch.randn(4, 2)),
        params=["fc.weight", "fc.bias"],
        reference="loop",
    ),
    "no_grad_side_branch": dict(
        net=NoGradGate, batch=_regress, refused=r"without autograd.*enters Tensor.mul in module"
    ),
    "no_grad_branch_not_chosen": dict(
        net=NoGradGate, batch=_regress, params=["a.weight", "b.weight"], reference="loop"
    ),
    "no_grad_first_layer": dict(
        net=FrozenFirstLayer,
        batch=_regress,
        refused=r"without autograd.*enters F.linear in module 'head'",
    ),
    "no_grad_first_layer_head_only": dict(
        net=FrozenFirstLayer, batch=_regress, params=["head.weight"], reference="loop"
    ),
    "detached_first_layer": dict(
        net=lambda: FrozenFirstLayer(detach=True), batch=_regress, reference="loop"
    ),
    "detached_side_branch": dict(net=DetachedGate, batch=_regress, reference="loop"),
    "weight_norm": dict(
        net=weight_norm_net,
        batch=_regress,
        reference="fd",
        allowed="_weight_norm_interface",
    ),
    "weight_norm_old_api": dict(
        net=lambda: weight_norm_net(old_api=True),
        batch=_regress,
        reference=weight_norm_net,  # deepcopy (and so fd_hessian) refuses the old API's net
        allowed="_weight_norm_interface",
    ),
    "pruned": dict(net=pruned_net, batch=_regress, reference="loop"),
    "spectral_norm_train": dict(
        net=lambda: spectral_norm_net(train=True),
        batch=_regress,
        refused=r"updates the net's buffer '0.parametrizations.weight.0._u' in place",
    ),
    "spectral_norm_eval": dict(
        net=lambda: spectral_norm_net(train=False), batch=_regress, reference="loop"
    ),
    "weight_penalty_in_loss": dict(
        net=lambda: seq(3, 4, 2),
        batch=_regress,
        loss_of_net=_weight_penalty_loss,
        refused=r"loss_fn reads the net's parameter '0.weight' directly",
    ),
    "weight_penalty_in_forward": dict(
        net=PenaltyInForward,
        batch=_regress,
        loss=_with_penalty,
        reference="loop",
        allowed="outputs to be a tensor",  # kron takes one output tensor
    ),
    "upsample_nearest_unet": dict(
        net=TinyUNet,
        batch=lambda: (torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)),
        reference="loop",
        allowed="upsample_nearest2d",
    ),
    "tuple_inputs": dict(
        net=TwoInputs,
        batch=lambda: ((torch.randn(6, 3), torch.randn(6, 2)), torch.randn(6, 2)),
        reference="loop",
        allowed="takes the inputs as one tensor",
    ),
    "dict_inputs": dict(
        net=MaskedTokenClassifier,
        batch=lambda: (
            {"input_ids": torch.randint(0, 6, (4, 3)), "attention_mask": _mask()},
            torch.randint(0, 2, (4,)),
        ),
        loss=F.cross_entropy,
        reference="loop",
        allowed="takes the inputs as one tensor",
    ),
}


def _to(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def build_robust(case: str, dtype: torch.dtype = torch.float64):
    """``(net, params, batch, loss_fn)`` of ``ROBUST_CASES[case]`` in ``dtype``, deterministic."""
    spec = ROBUST_CASES[case]
    torch.manual_seed(0)
    net = spec["net"]().to(dtype)
    torch.manual_seed(1)
    inputs, targets = spec["batch"]()
    if isinstance(inputs, dict):
        inputs = {k: _to(t, dtype) for k, t in inputs.items()}
    elif isinstance(inputs, tuple):
        inputs = tuple(_to(t, dtype) for t in inputs)
    else:
        inputs = _to(inputs, dtype)
    loss = spec["loss_of_net"](net) if "loss_of_net" in spec else spec.get("loss")
    own = dict(net.named_parameters())
    names = spec.get("params") or list(own)
    return net, {n: own[n] for n in names}, (inputs, _to(targets, dtype)), loss


def call(net: nn.Module, inputs):
    """``net`` called on inputs as the contract says: a tensor, ``*tuple`` or ``**dict``."""
    if isinstance(inputs, dict):
        return net(**inputs)
    if isinstance(inputs, tuple):
        return net(*inputs)
    return net(inputs)


def double_backward_hessian(net: nn.Module, names: list[str], batch, loss_fn=None) -> torch.Tensor:
    """The float64 Hessian by a double-backward loop on a copy of ``net``, called directly.

    Independent of every strategy (no functional_call, no torch.func); takes tuple and dict
    inputs, which ``bench.reference.loop_hessian`` does not.
    """
    # a pruned net keeps its computed weight as a plain attribute, which deepcopy refuses;
    # the pruning hook computes it again before the copy's forward
    memo = {
        id(v): v.detach()
        for m in net.modules()
        for v in vars(m).values()
        if isinstance(v, torch.Tensor)
    }
    clone = copy.deepcopy(net, memo)
    own = dict(clone.named_parameters())
    for p in own.values():
        p.requires_grad_(False)
    leaves = [own[n].requires_grad_(True) for n in names]
    inputs, targets = batch
    loss_fn = loss_fn or F.mse_loss

    def flat(grads) -> torch.Tensor:  # None: a leaf the output does not use
        return torch.cat(
            [torch.zeros(p.numel()) if d is None else d.reshape(-1) for d, p in zip(grads, leaves)]
        ).to(leaves[0])

    with torch.enable_grad():
        loss = loss_fn(call(clone, inputs), targets)
        g = flat(torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True))
        rows = [
            flat(torch.autograd.grad(gi, leaves, retain_graph=True, allow_unused=True))
            if gi.requires_grad
            else torch.zeros_like(g)
            for gi in g
        ]
    return torch.stack(rows).detach()

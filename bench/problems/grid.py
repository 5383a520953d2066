"""The benchmark grid: cases (net, size, activation, loss, batch, dtype, device) and named grids."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import asdict, dataclass

__all__ = [
    "Case",
    "GRIDS",
    "ARCHS",
    "MLP_ARCHS",
    "USER_ARCHS",
    "ARCH_KINDS",
    "SEQUENCE",
    "HEADS",
    "ACTIVATIONS",
    "LOSSES",
    "DTYPES",
    "DEVICES",
    "expand",
    "cases",
]

#: how the net is written: an ``nn.Sequential`` MLP; the same weights in a custom module whose
#: forward ends in ``squeeze(-1)``, with a hand-written MSE lambda and ``(batch,)`` targets;
#: a custom module with an affine LayerNorm after each hidden Linear (``MLP_ARCHS``); then the
#: nets users bring (``USER_ARCHS``); then ``convnet``, the structured grid's CNN
ARCHS = (
    "mlp",
    "custom",
    "layernorm",
    "forum",
    "cnn",
    "pinn_grad",
    "pinn_hessian",
    "transformer",
    "weighted",
    "convnet",
)
#: the ``users`` family, each net as its users write it (``bench.problems.models`` builds them), and
#: what the case's fields mean for it where that is not an MLP's ``input -> width x depth ->
#: output``:
#:
#: - ``forum``: a forum thread's Model, ``fc1 = nn.Linear(input, width); act; fc2 =
#:   nn.Linear(width, output)`` in attributes (depth 1);
#: - ``cnn``: a classifier of 1 x input x input images: ``depth`` blocks of 3x3 conv
#:   (``width`` channels), activation and 2x2 max pooling, then a Linear head to ``output``
#:   classes, cross-entropy; the Hessian of the head only (the chosen parameters);
#: - ``pinn_grad``: a PINN, ``u = MLP(x)`` (output 1) whose forward returns the Poisson
#:   residual ``-laplacian(u)`` by ``torch.autograd.grad(..., create_graph=True)``;
#: - ``pinn_hessian``: the same PINN with the Laplacian from
#:   ``torch.func.vmap(torch.func.hessian(u))`` in the inputs;
#: - ``transformer``: ``depth`` pre-LayerNorm blocks (``nn.MultiheadAttention``, 2 heads,
#:   batch_first, need_weights=True; an MLP of ``2 x width`` with the activation) of width
#:   ``width`` on an input projection of ``input`` features, ``batch`` sequences of
#:   ``SEQUENCE`` tokens, per-token logits of ``output`` classes, cross-entropy;
#: - ``weighted``: an ``nn.Sequential`` MLP with an MSE weighted per sample by a fixed tensor
#:   in the loss closure.
#:
#: and ``convnet``, a CNN classifier with every parameter chosen: ``depth`` blocks of 3x3 conv
#: (``width`` channels, padding 1), activation and 2x2 max pooling on 1 x input x input
#: images, then a hidden Linear of ``4 x width`` units with the activation and a Linear to
#: ``output`` classes, cross-entropy.
MLP_ARCHS = ARCHS[:3]
USER_ARCHS = ARCHS[3:9]
#: ``strategies.kinds_signature`` of each arch's nets where it is not "" (a plain net): the
#: modules that set it apart among those the Hessian's derivatives pass through
#: (``strategies.kinds_on_path``: the ``cnn``'s convolutions only compute the input of its
#: chosen last Linear, so it is plain). The planner's table ranks the strategies over the cases of each
#: signature too (``bench.analysis.rule.kinds_rankings``); tests/test_grid.py checks this
#: against the nets ``bench.problems.models`` builds
ARCH_KINDS = {
    "layernorm": "layernorm",
    "transformer": "attention+layernorm",
    "convnet": "conv",
}
#: tokens per sequence of the ``transformer`` arch
SEQUENCE = 8
#: attention heads of the ``transformer`` arch
HEADS = 2
ACTIVATIONS = ("tanh", "relu", "gelu")
LOSSES = ("mse", "ce")
DTYPES = ("float32", "float64")
DEVICES = ("cpu", "cuda")
_DTYPE_TAGS = {"float32": "f32", "float64": "f64"}


@dataclass(frozen=True, order=True)
class Case:
    """One benchmark problem: an MLP of ``depth`` hidden layers of ``width`` units.

    The net is ``input -> width -> ... -> width -> output`` (``depth + 1`` Linear layers with
    the activation between them), evaluated on ``batch`` samples, written as ``arch`` says
    (see ``ARCHS``).
    """

    input: int
    width: int
    depth: int
    output: int
    activation: str
    loss: str
    batch: int
    dtype: str
    device: str
    arch: str = "mlp"

    def __post_init__(self) -> None:
        for name in ("input", "width", "depth", "output", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "depth" else 1):
                raise ValueError(f"Case.{name} must be a positive int, got {value!r}")
        choices = {
            "activation": ACTIVATIONS,
            "loss": LOSSES,
            "dtype": DTYPES,
            "device": DEVICES,
            "arch": ARCHS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"Case.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.loss == "ce" and self.output < 2:
            raise ValueError("Case with loss 'ce' needs output >= 2 classes")
        for arch, rule, ok in (
            ("custom", "output 1, loss 'mse'", (self.output, self.loss) == (1, "mse")),
            ("pinn_grad", "output 1, loss 'mse'", (self.output, self.loss) == (1, "mse")),
            ("pinn_hessian", "output 1, loss 'mse'", (self.output, self.loss) == (1, "mse")),
            ("weighted", "loss 'mse'", self.loss == "mse"),
            ("forum", "depth 1", self.depth == 1),
            ("cnn", "loss 'ce', input divisible by 2**depth, depth >= 1",
             self.loss == "ce" and self.depth >= 1 and self.input % 2**self.depth == 0),
            ("convnet", "loss 'ce', input divisible by 2**depth, depth >= 1",
             self.loss == "ce" and self.depth >= 1 and self.input % 2**self.depth == 0),
            ("transformer", "loss 'ce', depth >= 1, width divisible by the heads",
             self.loss == "ce" and self.depth >= 1 and self.width % HEADS == 0),
        ):  # fmt: skip
            if self.arch == arch and not ok:
                raise ValueError(f"Case with arch {arch!r} needs {rule}")

    @property
    def id(self) -> str:
        """Readable id, e.g. ``w64-d2-b128-tanh-mse-f32-cpu`` (input/output when not 8/1, the
        arch when not ``mlp``: ``custom-w64-...``)."""
        io = "" if (self.input, self.output) == (8, 1) else f"i{self.input}-o{self.output}-"
        arch = "" if self.arch == "mlp" else f"{self.arch}-"
        return (
            f"{arch}{io}w{self.width}-d{self.depth}-b{self.batch}-{self.activation}-{self.loss}-"
            f"{_DTYPE_TAGS[self.dtype]}-{self.device}"
        )

    @property
    def P(self) -> int:
        """Number of chosen weights and biases (``bench.problems.models.chosen_params``): all of the
        net's (LayerNorm's affine ones included) but for ``cnn``, whose head alone is chosen."""
        w, out = self.width, self.output
        if self.arch == "cnn":
            side = self.input // 2**self.depth
            return w * side * side * out + out
        if self.arch == "convnet":
            side, hidden = self.input // 2**self.depth, 4 * w
            convs = (9 * w + w) + (self.depth - 1) * (9 * w * w + w)
            return convs + (w * side * side * hidden + hidden) + (hidden * out + out)
        if self.arch == "transformer":
            block = (4 * w * w + 4 * w) + 2 * (2 * w) + (2 * w * w + 2 * w) + (2 * w * w + w)
            return (self.input * w + w) + self.depth * block + (w * out + out)
        dims = [self.input] + [w] * self.depth + [out]
        norms = 2 * w * self.depth if self.arch == "layernorm" else 0
        return sum(a * b + b for a, b in zip(dims[:-1], dims[1:])) + norms

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 8

    @property
    def hessian_bytes(self) -> int:
        return self.P * self.P * self.itemsize

    @property
    def family(self) -> tuple:
        """Cases that differ only in the net's size: time and memory extrapolate in P within one."""
        return (
            self.input,
            self.output,
            self.activation,
            self.loss,
            self.batch,
            self.dtype,
            self.device,
            self.arch,
        )

    def fields(self) -> dict:
        """The case as plain strings and numbers, with its id under ``case``."""
        return {"case": self.id, **asdict(self)}


def expand(**axes) -> list[Case]:
    """The cross product of the given axes (each a value or a sequence of values) as Cases."""
    names = [f for f in Case.__dataclass_fields__]
    unknown = set(axes) - set(names)
    if unknown:
        raise ValueError(f"unknown case fields {sorted(unknown)}; valid: {names}")
    fields = Case.__dataclass_fields__.items()
    defaults = {n: f.default for n, f in fields if f.default is not dataclasses.MISSING}
    axes = {**defaults, **axes}
    missing = set(names) - set(axes)
    if missing:
        raise ValueError(f"missing case fields {sorted(missing)}")
    values = [axes[n] if isinstance(axes[n], (list, tuple)) else [axes[n]] for n in names]
    return [Case(**dict(zip(names, combo))) for combo in itertools.product(*values)]


_BASE = dict(input=8, output=1, activation="tanh", loss="mse", batch=128, dtype="float32")

#: The nets users bring, each written as its users write it (``USER_ARCHS``), float32, cpu.
_USER = dict(_BASE, device="cpu")
_USERS = [
    dict(_USER, input=1, width=16, depth=1, batch=100, arch="forum"),  # P = 49
    dict(_USER, width=64, depth=1, batch=100, arch="forum"),  # P = 641
    dict(_USER, input=16, width=4, depth=2, output=10, loss="ce", batch=64,
         activation="relu", arch="cnn"),  # P = 650: the head alone
    dict(_USER, input=2, width=24, depth=2, batch=64,
         arch=["pinn_grad", "pinn_hessian"]),  # P = 697
    dict(_USER, width=12, depth=1, output=4, loss="ce", batch=8, activation="gelu",
         arch="transformer"),  # P = 1,444
    dict(_USER, width=32, depth=2, activation="gelu", arch="weighted"),  # P = 1,377
]  # fmt: skip

GRIDS: dict[str, list[dict]] = {
    # Seconds: tiny nets, every activation, both losses, both dtypes, every MLP arch.
    "smoke": [
        dict(_BASE, input=4, width=3, depth=1, batch=8),
        dict(_BASE, input=4, width=3, depth=1, batch=8, activation="relu", dtype="float64"),
        dict(_BASE, input=4, width=3, depth=2, batch=8, output=3, loss="ce", activation="gelu"),
        dict(_BASE, input=4, width=3, depth=1, batch=8, output=3, loss="ce", dtype="float64"),
        dict(_BASE, input=4, width=3, depth=2, batch=8, arch="custom"),
        dict(_BASE, input=4, width=3, depth=1, batch=8, output=2, arch="layernorm"),
    ],
    # P from about 300 to about 14,000 (the users family adds P = 49, alone in its range):
    # at least three MLP nets of different shapes (width,
    # depth, batch, activation, loss, output size, arch) in each P range of the report's
    # recommendation; the three docs/DESIGN.md cases (tanh, MSE, batch 128: P = 1,377, 4,801,
    # 13,121) and, on the same weights, their custom-module and LayerNorm forms; and the
    # ``users`` family. float32
    # only, to stay within about 20 minutes on 2 cores; the full grid sweeps float64.
    "default": [
        dict(_BASE, width=[32, 64], depth=2, arch=["mlp", "custom", "layernorm"]),
        dict(_BASE, width=64, depth=4, arch=["mlp", "custom", "layernorm"]),
        dict(_BASE, width=32, depth=1, arch="custom"),
        dict(_BASE, width=16, depth=2, batch=64, output=4, loss="ce", activation="gelu"),
        dict(_BASE, width=24, depth=2, batch=32, activation="relu"),
        dict(_BASE, width=24, depth=3, batch=256, output=10, loss="ce", activation="gelu"),
        dict(_BASE, width=48, depth=3, batch=64, output=10, loss="ce", activation="relu"),
        dict(_BASE, width=96, depth=2, batch=256, output=10, loss="ce", activation="gelu"),
        *_USERS,
    ],
    # Sweeps: batch size at fixed net, depth at fixed width, both losses and dtypes.
    "full": [
        dict(_BASE, width=32, depth=2, batch=[16, 64, 256, 1024]),
        dict(_BASE, width=64, depth=[1, 2, 3, 4, 5], activation=["tanh", "relu", "gelu"]),
        dict(_BASE, width=[32, 64, 96], depth=2, output=10, loss="ce"),
        dict(_BASE, width=[32, 64], depth=2, dtype="float64"),
        dict(_BASE, width=[128, 192], depth=2, device="cuda"),
        dict(_BASE, width=128, depth=4, device="cuda"),
    ],
    # The nets users bring (``USER_ARCHS``), also part of the default grid.
    "users": _USERS,
    # The structured nets of the transformer and CNN families, all their parameters chosen,
    # P from about 900 to about 21,000: where ``kron`` takes Kronecker directions per
    # position (attention's projections, convolutions on their unfolded patches) against
    # the strategies that do not. Its own grid and run (11 to 13 minutes with
    # --time-budget 20): the default run takes 25 to 33 minutes without it.
    "structured": [
        dict(_USER, width=16, depth=[1, 2], output=4, loss="ce", batch=8, activation="gelu",
             arch="transformer"),  # P = 2,436 and 4,660
        dict(_USER, width=32, depth=[1, 2], output=4, loss="ce", batch=8, activation="gelu",
             arch="transformer"),  # P = 8,964 and 17,508
        # from P = 940, so that the memory of the larger ones extrapolates: the unchunked
        # vmapped strategies hold every direction's activations at once
        dict(_USER, input=28, width=[2, 4, 6, 10], depth=2, output=10, loss="ce", batch=32,
             activation="relu", arch="convnet"),  # P = 940, 3,510, 7,720 and 21,060
    ],  # fmt: skip
    # The two larger DESIGN.md cases, for compiled against eager strategies
    # (``--strategies all``: compiled variants are not run unless named).
    "compile": [dict(_BASE, width=64, depth=[2, 4])],
    # Towards the machine's limit (a float32 Hessian of P = 70,000 is 18 GiB): one family
    # from P = 13,121 up, so that time and memory extrapolate and the strategies that would
    # not fit or not finish are recorded as over budget or over memory.
    "large": [
        dict(_BASE, width=[32, 64], depth=2),  # cheap: they start the predictions
        dict(_BASE, width=64, depth=4),
        dict(_BASE, width=128, depth=[2, 3]),
        dict(_BASE, width=160, depth=3),
        # A GPU's memory goes further: P = 76,033, a 21.5 GiB float32 Hessian, so that the
        # timed rounds (two Hessians alive at once) and JAX's share fit 141 GiB.
        dict(_BASE, width=192, depth=3, device="cuda"),
    ],
}
# The GPU run (bench/cuda_run.sh): the default grid and the large one in one session, so that
# the larger cases extrapolate from the smaller ones and the worker starts once.
GRIDS["gpu"] = GRIDS["default"] + GRIDS["large"]


def cases(grid: str, devices: tuple[str, ...] = DEVICES) -> list[Case]:
    """The cases of a named grid, sorted by device then P, on each of ``devices``.

    Rows of a grid that name no device are run on every device in ``devices``; rows that
    name one keep it when it is in ``devices``. Sorting by P puts the smaller cases of a
    family first, so the suite can extrapolate a strategy's time and memory to larger P.
    """
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; valid grids: {sorted(GRIDS)}")
    bad = [d for d in devices if d not in DEVICES]
    if bad:
        raise ValueError(f"unknown devices {bad}; valid devices: {list(DEVICES)}")
    out: dict[str, Case] = {}
    for row in GRIDS[grid]:
        row_devices = row.get("device", devices)
        row_devices = [row_devices] if isinstance(row_devices, str) else row_devices
        row_devices = [d for d in row_devices if d in devices]
        if not row_devices:
            continue
        for case in expand(**{**row, "device": row_devices}):
            out.setdefault(case.id, case)
    return sorted(out.values(), key=lambda c: (c.device, c.P, c.id))

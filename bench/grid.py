"""The benchmark grid: MLP cases (size, activation, loss, batch, dtype, device) and named grids."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

__all__ = ["Case", "GRIDS", "ACTIVATIONS", "LOSSES", "DTYPES", "DEVICES", "expand", "cases"]

ACTIVATIONS = ("tanh", "relu", "gelu")
LOSSES = ("mse", "ce")
DTYPES = ("float32", "float64")
DEVICES = ("cpu", "cuda")
_DTYPE_TAGS = {"float32": "f32", "float64": "f64"}


@dataclass(frozen=True, order=True)
class Case:
    """One benchmark problem: an MLP of ``depth`` hidden layers of ``width`` units.

    The net is ``input -> width -> ... -> width -> output`` (``depth + 1`` Linear layers with
    the activation between them), evaluated on ``batch`` samples.
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
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"Case.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.loss == "ce" and self.output < 2:
            raise ValueError("Case with loss 'ce' needs output >= 2 classes")

    @property
    def id(self) -> str:
        """Readable id, e.g. ``w64-d2-b128-tanh-mse-f32-cpu`` (input/output when not 8/1)."""
        io = "" if (self.input, self.output) == (8, 1) else f"i{self.input}-o{self.output}-"
        return (
            f"{io}w{self.width}-d{self.depth}-b{self.batch}-{self.activation}-{self.loss}-"
            f"{_DTYPE_TAGS[self.dtype]}-{self.device}"
        )

    @property
    def P(self) -> int:
        """Number of weights and biases of the MLP."""
        dims = [self.input] + [self.width] * self.depth + [self.output]
        return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))

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
    missing = set(names) - set(axes)
    if missing:
        raise ValueError(f"missing case fields {sorted(missing)}")
    values = [axes[n] if isinstance(axes[n], (list, tuple)) else [axes[n]] for n in names]
    return [Case(**dict(zip(names, combo))) for combo in itertools.product(*values)]


_BASE = dict(input=8, output=1, activation="tanh", loss="mse", batch=128, dtype="float32")

GRIDS: dict[str, list[dict]] = {
    # Seconds: tiny nets, every activation, both losses, both dtypes.
    "smoke": [
        dict(_BASE, input=4, width=3, depth=1, batch=8),
        dict(_BASE, input=4, width=3, depth=1, batch=8, activation="relu", dtype="float64"),
        dict(_BASE, input=4, width=3, depth=2, batch=8, output=3, loss="ce", activation="gelu"),
        dict(_BASE, input=4, width=3, depth=1, batch=8, output=3, loss="ce", dtype="float64"),
    ],
    # P from about 400 to about 13,000; the three DESIGN.md cases are the last three rows.
    "default": [
        dict(_BASE, width=16, depth=2, batch=64, output=4, loss="ce", activation="gelu"),
        dict(_BASE, width=32, depth=2, activation="relu", dtype="float64"),
        dict(_BASE, width=32, depth=2),
        dict(_BASE, width=64, depth=2),
        dict(_BASE, width=64, depth=4),
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
}


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

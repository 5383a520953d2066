"""What ``strategies.verify`` catches and accepts, measured: the numbers in its docstring.

``python -m bench.verify_power [--seeds N]`` corrupts correct Hessians of a few small nets
in the ways a wrong strategy would (a symmetric pair of entries, a block with or without
its mirror, a scale, a coarser dtype), checks each with ``verify`` under N probe seeds,
and prints, per corruption, the share it rejected; and, per strategy, whether the correct
Hessian passed and its largest measured error relative to the tolerance.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import strategies
from bench.reference import loop_hessian

__all__ = ["main"]

#: strategies whose correct float32 Hessians must pass
_STRATEGIES = ("full_autograd", "symmetric_half", "vmap_jvp", "block_symmetric", "kron")


def _nets() -> Iterator[tuple[str, nn.Module, tuple[Tensor, Tensor], Callable | None]]:
    torch.manual_seed(0)
    yield (
        "tanh-mse",
        nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)),
        (torch.randn(16, 4), torch.randn(16, 3)),
        None,
    )
    yield (
        "relu-ce",
        nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 6)),
        (torch.randn(32, 5), torch.randint(0, 6, (32,))),
        F.cross_entropy,
    )
    yield (
        "conv-ce",
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)),
        (torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))),
        F.cross_entropy,
    )
    yield (
        "sigmoid-mse",
        nn.Sequential(nn.Linear(6, 12), nn.Sigmoid(), nn.Linear(12, 2)),
        (torch.randn(24, 6) * 3, torch.randn(24, 2) * 5),
        None,
    )


def _blocks(params: dict[str, Tensor]) -> list[slice]:
    out, start = [], 0
    for p in params.values():
        out.append(slice(start, start + p.numel()))
        start += p.numel()
    return out


def _corruptions(
    fraction: float,
) -> dict[str, Callable[[Tensor, list[slice], torch.Generator], Tensor]]:
    """name -> corrupt(H, blocks, generator): a copy of H with an error of ``fraction`` max|H|."""

    def pair(H, blocks, g):
        i, j = torch.randperm(H.shape[0], generator=g)[:2].tolist()
        delta = fraction * H.abs().max()
        H[i, j] += delta
        H[j, i] += delta
        return H

    def block(signs: bool, mirror: bool):
        def corrupt(H, blocks, g):
            a, b = (blocks[k] for k in torch.randint(0, len(blocks), (2,), generator=g).tolist())
            E = torch.full_like(H[a, b], float(fraction * H.abs().max()))
            if signs:
                E *= 2 * torch.randint(0, 2, E.shape, generator=g).to(E.dtype) - 1
            H[a, b] += E
            if mirror and a != b:
                H[b, a] += E.T
            elif mirror:
                H[a, a] += E.T
            return H

        return corrupt

    return {
        "pair": pair,
        "block+mirror": block(False, True),
        "block+mirror, random signs": block(True, True),
        "block, no mirror": block(False, False),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.verify_power", description=__doc__)
    parser.add_argument("--seeds", type=int, default=100)
    args = parser.parse_args(argv)
    caught: dict[str, list[int]] = {}
    worst_correct: dict[str, float] = {}

    def tally(label: str, ok: bool) -> None:
        counts = caught.setdefault(label, [0, 0])
        counts[0] += not ok
        counts[1] += 1

    for label, net, batch, loss_fn in _nets():
        params = dict(net.named_parameters())
        twin = copy.deepcopy(net).double()
        cast = tuple(t.double() if t.is_floating_point() else t for t in batch)
        exact = loop_hessian(twin, list(params), cast, loss_fn)
        P = exact.shape[0]
        for name in _STRATEGIES:
            H = strategies.compute(name, net, params, batch, loss_fn)
            ok, detail = strategies.verify(H, net, params, batch, loss_fn)
            tally(f"correct float32 H ({name})", ok)
            entry = float(detail.split("largest entry ")[1].split(" ")[0])
            worst_correct[name] = max(worst_correct.get(name, 0.0), entry)
        H32 = exact.float()
        twin_params = dict(twin.named_parameters())
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            probes = torch.Generator().manual_seed(10_000 + seed)
            for fraction in (1e-2, 1e-3):
                for kind, corrupt in _corruptions(fraction).items():
                    bad = corrupt(H32.clone(), _blocks(params), g)
                    ok, _ = strategies.verify(bad, net, params, batch, loss_fn, generator=probes)
                    tally(f"float32 {kind} off by {fraction:.1%} of max|H|", ok)
            for scale in (1.0001, 1.001):
                ok, _ = strategies.verify(
                    H32 * scale, net, params, batch, loss_fn, generator=probes
                )
                tally(f"float32 H x {scale}", ok)
            for dtype in (torch.float16, torch.bfloat16):
                for scale in (1.0, 1.05, 1.2, 1.3):
                    H = (exact * scale).to(dtype)
                    ok, _ = strategies.verify(H, twin, twin_params, cast, loss_fn, generator=probes)
                    tally(f"float64 params, {dtype} H x {scale}", ok)
        print(f"{label}: P = {P}")
    print("\nrejected / tried:")
    for label, (rejected, tried) in caught.items():
        print(f"  {label}: {rejected}/{tried}")
    tol = strategies.default_rtol(torch.float32)
    print(f"\nlargest entry error of correct float32 Hessians, x max|H| (tolerance {tol:.1e}):")
    for name, worst in worst_correct.items():
        print(f"  {name}: {worst:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

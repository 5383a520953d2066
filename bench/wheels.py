"""Wheels for a machine without a package registry: what a run there may lack, fetched and installed.

A GPU machine lent for a few minutes has torch, JAX, pandas, matplotlib, pytest and
pytest-benchmark, but may reach no package index. What else the benchmark runs (the
curvlinops peer, pytest-split, a pytest-benchmark new enough for the plugin) travels with
the working tree as pure-Python wheels:

    python -m bench.wheels download wheels          # where PyPI is reachable
    python -m bench.wheels install wheels --target DIR   # there: only what is missing
    python -m bench.wheels check                    # what this environment lacks

The download is pure-Python only (``py3-none-any``), so the same folder serves any platform
and any Python 3; nothing installed touches the packages already there (``--target`` with
``--no-deps``: torch stays the machine's own). ``bench.cuda_run`` calls ``install``.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import cli

__all__ = ["Wheel", "WHEELS", "MAX_BYTES", "missing", "download", "check_pure", "install", "main"]


@dataclass(frozen=True)
class Wheel:
    """One distribution a run may need: what an installed one must satisfy, what is fetched."""

    name: str
    #: the version range an installed distribution must be in ("" for any)
    needs: str
    #: the version downloaded: the one the project's tests run with
    version: str

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


#: What a machine with torch, JAX, pandas, matplotlib and pytest may lack (imports of the
#: curvlinops peer included; backpack without torchvision, which curvlinops does not import),
#: and a pytest new enough for pytest-benchmark 5.3, with what that pytest needs.
WHEELS = (
    Wheel("pytest-benchmark", ">=5.3", "5.3.1"),  # the plugin's JSON hooks need 5.3
    Wheel("py-cpuinfo2", ">=10.1", "10.1.1"),  # pytest-benchmark 5.3's
    Wheel("pytest", ">=8.1", "9.2.0"),  # pytest-benchmark 5.3's
    Wheel("pluggy", ">=1.6,<2", "1.7.0"),
    Wheel("iniconfig", ">=2", "2.3.1"),
    Wheel("pygments", ">=2.15", "2.21.0"),
    Wheel("packaging", ">=24", "26.4"),
    Wheel("pytest-split", ">=0.9", "0.11.0"),
    Wheel("curvlinops-for-pytorch", ">=3.0", "3.0.1"),
    Wheel("einconv", "", "0.1.0"),
    Wheel("einops", "", "0.8.2"),
    Wheel("linear_operator", "", "0.6.1"),
    Wheel("opt_einsum", "", "3.4.0"),
    Wheel("tqdm", "", "4.70.1"),
    Wheel("backpack-for-pytorch", "", "1.7.1"),
    Wheel("unfoldNd", "", "0.2.3"),
)
#: the most the folder may weigh: it travels with the working tree
MAX_BYTES = 30 * 2**20


def _satisfied(wheel: Wheel) -> bool:
    from packaging.specifiers import SpecifierSet

    try:
        installed = importlib.metadata.version(wheel.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return SpecifierSet(wheel.needs).contains(installed, prereleases=True)


def missing(wheels: tuple[Wheel, ...] = WHEELS) -> list[Wheel]:
    """The wheels whose distribution is absent here, or installed outside its range."""
    return [w for w in wheels if not _satisfied(w)]


def check_pure(folder: Path) -> list[Path]:
    """The folder's wheels, checked pure-Python and within ``MAX_BYTES`` in all.

    Raises:
        ValueError: a file is not a ``py3-none-any``-style wheel, one of ``WHEELS`` has
            none, or the folder is too heavy to travel.
    """
    files = sorted(folder.glob("*"))
    impure = [f.name for f in files if not f.name.endswith("-none-any.whl")]
    if impure:
        raise ValueError(f"{folder}: not pure-Python wheels: {impure}")
    names = {f.name.split("-")[0].lower().replace("_", "-") for f in files}
    absent = [w.name for w in WHEELS if w.name.lower().replace("_", "-") not in names]
    if absent:
        raise ValueError(f"{folder}: no wheel of {absent}")
    size = sum(f.stat().st_size for f in files)
    if size > MAX_BYTES:
        raise ValueError(f"{folder}: {size / 2**20:.1f} MiB > {MAX_BYTES / 2**20:.0f} MiB")
    return files


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download(folder: Path) -> list[Path]:
    """Fetch every pinned wheel of ``WHEELS`` into ``folder``, pure-Python only; checked."""
    folder.mkdir(parents=True, exist_ok=True)
    _pip(
        "download", "--no-deps", "--only-binary=:all:", "--implementation", "py",
        "--abi", "none", "--platform", "any", "--python-version", "3.12",
        "--dest", str(folder), *(w.pin for w in WHEELS),
    )  # fmt: skip
    return check_pure(folder)


def install(folder: Path, target: Path) -> list[Wheel]:
    """Install into ``target`` the wheels this environment lacks, from ``folder`` alone.

    Nothing already installed changes: ``target`` goes first on ``PYTHONPATH`` of whatever
    runs next. Returns what was installed.
    """
    lacking = missing()
    if lacking:
        check_pure(folder)
        _pip(
            "install", "--quiet", "--no-index", "--no-deps", "--find-links", str(folder),
            "--target", str(target), *(w.pin for w in lacking),
        )  # fmt: skip
    return lacking


def main(argv: list[str] | None = None) -> int:
    """``download FOLDER``, ``install FOLDER --target DIR`` or ``check``; 1 where a wheel is
    still missing after it, 2 for a bad argument."""
    parser = cli.Parser(prog="python -m bench.wheels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("download").add_argument("folder", type=Path)
    add = sub.add_parser("install")
    add.add_argument("folder", type=Path)
    add.add_argument("--target", type=Path, required=True)
    sub.add_parser("check")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            files = download(args.folder)
            size = sum(f.stat().st_size for f in files)
            print(f"{len(files)} pure-Python wheels in {args.folder}, {size / 2**20:.1f} MiB")
            return 0
        if args.command == "install":
            done = install(args.folder, args.target)
            print(f"installed into {args.target}: {[w.pin for w in done] or 'nothing'}")
            return 0
    except ValueError as exc:
        return cli.fail(parser.prog, str(exc))
    lacking = missing()
    for wheel in lacking:
        print(f"missing: {wheel.name}{wheel.needs}")
    return 1 if lacking else 0


if __name__ == "__main__":
    sys.exit(main())

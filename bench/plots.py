"""Figures of the benchmark report, drawn from the tidy frame of ``bench.results.load``."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from bench.results import family
from bench.vocabulary import BASELINE, OK, TIMED

__all__ = [
    "strategy_colours",
    "time_vs_p",
    "memory_vs_p",
    "speedup",
    "cost_ratios",
    "png_bytes",
    "save",
    "write_figures",
]

MIB = 2**20
#: shown instead of a bar or point, so that a cell that did not run is never just absent
NOT_TIMED_MARKER = "x"
_TIMES = FuncFormatter(lambda value, _: f"{value:g}×")


def strategy_colours(names: Iterable[str]) -> dict[str, tuple]:
    """One fixed colour per strategy: sorted names mapped onto tab20 (wrapping past 20).

    Sorting makes the mapping depend only on the set of names in the report, so every figure
    of one report agrees, and strategies unknown when this was written still get a colour.
    """
    cmap = colormaps["tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(sorted(set(names)))}


def _panels(df: pd.DataFrame, keys: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    return [(k if isinstance(k, tuple) else (k,), g) for k, g in df.groupby(keys, sort=True)]


def _grid(n: int, width: float = 6.0, height: float = 4.2) -> tuple[Figure, list]:
    ncols = min(n, 2)
    nrows = -(-n // ncols)
    # Room on the right for one shared legend of up to ~15 strategies.
    fig = Figure(figsize=(width * ncols + 3.0, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _family_lines(ax, rows: pd.DataFrame, column: str, scale: float, label: str, **style) -> None:
    """One line per case family through ``column`` vs P; only the first carries the label."""
    rows = rows.dropna(subset=[column])
    rows = rows[rows[column] > 0]
    for _, line in rows.groupby(family(rows), sort=True):
        line = line.sort_values("P")
        ax.plot(line["P"], line[column] / scale, label=label, **style)
        label = "_nolegend_"


def _mark_not_timed(ax, rows: pd.DataFrame, colour) -> None:
    """Crosses at the top edge of the axes, at the P of each cell that was not timed."""
    if rows.empty:
        return
    ax.scatter(
        rows["P"],
        np.full(len(rows), 0.97),
        marker=NOT_TIMED_MARKER,
        color=colour,
        transform=ax.get_xaxis_transform(),
        clip_on=False,
        zorder=5,
    )


def _sized_panels(
    df: pd.DataFrame,
    colours: dict[str, tuple],
    value: str,
    scale: float,
    ylabel: str,
    references: list[tuple[str, str, dict]],
    title: str,
) -> Figure:
    panels = _panels(df, ["machine", "device", "dtype"])
    fig, axes = _grid(len(panels))
    for ax, ((machine, device, dtype), g) in zip(axes, panels):
        timed = (g["status"] == OK).any()
        for strategy, rows in g.groupby("strategy", sort=True):
            peer = bool(rows["peer"].fillna(False).any())
            _family_lines(
                ax,
                rows[rows["status"] == OK],
                value,
                scale,
                strategy,
                marker="o",
                markersize=4,
                linestyle="--" if peer else "-",
                color=colours[strategy],
            )
            _mark_not_timed(ax, rows[rows["status"] != OK], colours[strategy])
        for column, label, style in references if timed else []:
            _family_lines(
                ax, g.drop_duplicates("case"), column, scale, label, color="black", **style
            )
        ax.set_xscale("log")
        # Crosses alone (drawn in axes coordinates for y) do not widen the data limits.
        ax.set_xlim(g["P"].min() / 1.3, g["P"].max() * 1.3)
        if timed:
            ax.set_yscale("log")
        else:
            # A whole device skipped (e.g. no CUDA here) says so rather than vanishing.
            ax.text(
                0.5,
                0.5,
                f"nothing timed: {len(g)} cells, see 'Cells not timed'",
                transform=ax.transAxes,
                ha="center",
            )
            ax.set_yticks([])
        ax.set_xlabel("P (number of weights)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{machine}\n{device}, {dtype}", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = _legend_entries(axes)
    handles.append(Line2D([], [], color="grey", marker=NOT_TIMED_MARKER, linestyle=""))
    labels.append("not timed (see table)")
    handles.append(Line2D([], [], color="grey", linestyle="--"))
    labels.append("dashed: peer (reference only)")
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle(title)
    return fig


def _legend_entries(axes: list) -> tuple[list, list[str]]:
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    # Strategies first, alphabetically, then the black reference lines.
    labels = sorted(seen, key=lambda label: (seen[label].get_color() == "black", label))
    return [seen[label] for label in labels], labels


def time_vs_p(df: pd.DataFrame, colours: dict[str, tuple]) -> Figure:
    """Minimum time per Hessian vs P, a panel per machine, device and dtype.

    A line joins the cases of one family (same input, output, activation, loss, batch) in
    order of P. The reference lines are P gradients (``P x grad_s``) and the
    ``(P x B) @ (B x P)`` product.
    """
    df = df.assign(p_grads_s=df["P"] * df["grad_s"])
    return _sized_panels(
        df,
        colours,
        "min",
        1.0,
        "time per Hessian, min of rounds (s)",
        [
            ("p_grads_s", "P × one gradient", {"linestyle": "--", "linewidth": 1}),
            ("gemm_s", "(P×B)(B×P) GEMM", {"linestyle": ":", "linewidth": 1.5}),
        ],
        "Time vs number of weights",
    )


def memory_vs_p(df: pd.DataFrame, colours: dict[str, tuple]) -> Figure:
    """Peak memory above baseline vs P, with the Hessian's own size as reference."""
    return _sized_panels(
        df,
        colours,
        "peak_bytes",
        MIB,
        "peak memory above baseline (MiB)",
        [("hessian_bytes", "the Hessian itself (P² × itemsize)", {"linestyle": "--"})],
        "Peak memory vs number of weights",
    )


def speedup(df: pd.DataFrame, colours: dict[str, tuple], baseline: str = BASELINE) -> Figure:
    """Speedup over ``baseline`` per case (baseline min / strategy min), a panel per machine.

    A cell that was not timed is a hatched bar of height 1 labelled with its status; a case
    where the baseline itself was not timed says so instead of showing bars.
    """
    # Cases where nothing at all was timed (a device absent here) would be empty slots: they
    # are counted in the panel title and listed in the report's "Cells not timed" table.
    timed_cases = set(df.loc[df["status"].isin(TIMED), "case"])
    untimed = df.loc[~df["case"].isin(timed_cases), "case"].nunique()
    panels = _panels(df[df["case"].isin(timed_cases)], ["machine", "device"])
    if not panels:
        panels = [(("nothing timed", ""), df.iloc[:0])]
    n_bars = max(g["case"].nunique() * g["strategy"].nunique() for _, g in panels)
    fig = Figure(
        figsize=(min(24.0, max(8.0, 0.12 * n_bars + 4.0)), 4.8 * len(panels)),
        layout="constrained",
    )
    axes = fig.subplots(len(panels), 1, squeeze=False).ravel().tolist()
    for ax, ((machine, device), g) in zip(axes, panels):
        strategies = sorted(set(g["strategy"]) - {baseline})
        width = 0.8 / max(len(strategies), 1)
        cases = sorted(g["case"].unique(), key=lambda c: (g.loc[g["case"] == c, "P"].iloc[0], c))
        ax.set_title(f"{machine}, {device}", fontsize=9)
        cells = g.set_index(["case", "strategy"])
        for i, case in enumerate(cases):
            base = cells["min"].get((case, baseline))
            base_ok = cells["status"].get((case, baseline)) == OK
            if not base_ok:
                ax.text(i, 1.0, f"{baseline}\nnot timed", ha="center", va="center", fontsize=7)
                continue
            for j, strategy in enumerate(strategies):
                if (case, strategy) not in cells.index:
                    continue
                x = i - 0.4 + (j + 0.5) * width
                status = cells["status"].get((case, strategy))
                if status == OK:
                    ax.bar(x, base / cells["min"][(case, strategy)], width, color=colours[strategy])
                else:
                    ax.bar(
                        x,
                        1.0,
                        width,
                        facecolor="none",
                        edgecolor=colours[strategy],
                        hatch="///",
                    )
                    ax.text(x, 1.0, status, rotation=90, ha="center", va="bottom", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(_TIMES)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"speedup over {baseline} (×, log)")
    handles = [Patch(color=colours[s], label=s) for s in sorted(set(df["strategy"]) - {baseline})]
    handles.append(Patch(facecolor="none", edgecolor="grey", hatch="///", label="not timed"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    note = f"\n{untimed} cases with nothing timed are left out (see 'Cells not timed')"
    fig.suptitle(f"Speedup over {baseline} per case (higher is faster){note if untimed else ''}")
    return fig


def cost_ratios(df: pd.DataFrame, colours: dict[str, tuple]) -> Figure:
    """``cost_vs_grad`` and ``vs_gemm`` per strategy, one point per timed case."""
    ok = df[df["status"] == OK]
    strategies = sorted(df["strategy"].unique())
    fig = Figure(figsize=(max(9.0, 0.6 * len(strategies) * 2 + 3), 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    rng = np.random.default_rng(0)
    markers = {"cpu": "o", "cuda": "s"}
    for ax, column, label in (
        (axes[0], "cost_vs_grad", "time / (P × one gradient)"),
        (axes[1], "vs_gemm", "time / (P×B)(B×P) GEMM time"),
    ):
        for i, strategy in enumerate(strategies):
            rows = ok[ok["strategy"] == strategy]
            for device, part in rows.groupby("device"):
                ax.scatter(
                    i + rng.uniform(-0.2, 0.2, len(part)),
                    part[column],
                    color=colours[strategy],
                    marker=markers.get(device, "^"),
                    s=18,
                )
        ax.axhline(1.0, color="black", linewidth=1, linestyle=":")
        ax.set_yscale("log")
        ax.set_xticks(range(len(strategies)), strategies, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(f"{label} (ratio, log)")
        ax.grid(True, axis="y", alpha=0.3)
    handles = [
        Line2D([], [], color="grey", marker=m, linestyle="", label=d) for d, m in markers.items()
    ]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="device")
    fig.suptitle("Cost relative to one gradient and to a GEMM (lower is better)")
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes, for embedding in the HTML."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def save(fig: Figure, path: Path) -> bytes:
    """Write the figure as PNG to ``path`` and return the bytes written."""
    data = png_bytes(fig)
    path.write_bytes(data)
    return data


def write_figures(df: pd.DataFrame, plots_dir: Path) -> dict[str, bytes]:
    """Draw the report's figures into ``plots_dir`` as PNG; returns {caption: PNG bytes}.

    ``headline.png`` (time vs P on CPU, for the README) is written too but not returned.
    """
    if df.empty:
        return {}
    colours = strategy_colours(df["strategy"])
    figures = {
        "time_vs_P": (
            "Time per Hessian vs P, with P gradients and the GEMM as references",
            time_vs_p(df, colours),
        ),
        "memory_vs_P": (
            "Peak memory vs P, with the Hessian's own size as reference",
            memory_vs_p(df, colours),
        ),
        "cost_ratios": ("cost_vs_grad and vs_gemm per strategy", cost_ratios(df, colours)),
    }
    if (df["strategy"] == BASELINE).any():
        figures["speedup"] = (f"Speedup over {BASELINE} per case", speedup(df, colours))
    headline = df[df["device"] == "cpu"] if (df["device"] == "cpu").any() else df
    save(time_vs_p(headline, colours), plots_dir / "headline.png")
    return {
        caption: save(fig, plots_dir / f"{name}.png") for name, (caption, fig) in figures.items()
    }

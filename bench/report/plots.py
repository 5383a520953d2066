"""Figures of the benchmark report, drawn from the tidy frame of ``bench.analysis.tidy.load``.

Strategies are drawn by family (``bench.analysis.tidy.strategy_facts``): one hue per family,
a shade and a marker per strategy within it; a compiled variant takes its eager form's colour
and marker with a dashed line, a peer a dash-dot line; the recommended strategy (the fastest
in some size range of the panel) is drawn thicker.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from bench.analysis.audit_tables import (
    NOT_RUN,
    accuracy_matrix,
    accuracy_statuses,
    audit_frame,
)
from bench.analysis.numbers import case_cells
from bench.analysis.rule import recommend
from bench.analysis.tidy import family, strategy_facts
from bench.vocabulary import BASELINE, ERROR, OK, TIMED, UNSUPPORTED, WRONG

__all__ = [
    "STATUS_COLOURS",
    "PAGE_WIDTH",
    "CONTENDER_RANK",
    "OTHERS_COLOUR",
    "Style",
    "Drawn",
    "strategy_styles",
    "time_vs_p",
    "memory_vs_p",
    "speedup",
    "cost_ratios",
    "accuracy_heatmap",
    "png_bytes",
    "save",
    "write_figures",
]

MIB = 2**20
#: shown instead of a bar or point, so that a cell that did not run is never just absent
NOT_TIMED_MARKER = "x"
_TIMES = FuncFormatter(lambda value, _: f"{value:g}×")
#: colour of an audit cell by status, in the heat map and the HTML table alike
STATUS_COLOURS = {
    OK: "#a8dca8",
    WRONG: "#e8685f",
    ERROR: "#f5b95f",
    UNSUPPORTED: "#cfcfcf",
    NOT_RUN: "#ffffff",
}
#: one colour map per family, in the order of the families (``strategies.FAMILIES``, then
#: "other"): loops red, transforms blue, forward-over-reverse green, structured purple,
#: peers orange, the dispatcher grey, unregistered names magenta
_FAMILY_HUES = ("Reds", "Blues", "Greens", "Purples", "Oranges", "Greys", "PuRd")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")
_LINE_WIDTH, _RECOMMENDED_WIDTH = 1.3, 3.2
#: the widest figure (inches at ``png_bytes``' 100 dpi): the report's page at 1400 px shows
#: it at full size, so that no tick label is shrunk below its 7-8 pt
PAGE_WIDTH = 13.4
#: strategies among the fastest this many of some case of a panel are its contenders, drawn
#: in their colours; the others are drawn thin and grey
CONTENDER_RANK = 3
#: the colour of every strategy that is not a contender
OTHERS_COLOUR = "#c4c4c4"


class Style(NamedTuple):
    """How one strategy is drawn in every figure of a report."""

    colour: tuple
    marker: str
    linestyle: str
    family: str


class Drawn(NamedTuple):
    """One figure of the report: its caption and PNG bytes."""

    caption: str
    png: bytes


def strategy_styles(names: Iterable[str]) -> dict[str, Style]:
    """A fixed style per strategy: its family's hue, a shade and marker of its own.

    Within a family, strategies take shades from dark to light and markers in registration
    order; a compiled variant has its eager form's colour and marker with a dashed line; a
    peer has a dash-dot line. The styles depend only on the set of names, so every figure
    of one report agrees.
    """
    names = set(names)
    facts = strategy_facts(names)
    styles: dict[str, Style] = {}
    for i, (fam, members) in enumerate(facts.groupby("family", observed=True, sort=True)):
        cmap = colormaps[_FAMILY_HUES[i % len(_FAMILY_HUES)]]
        bases = list(members.index[members["eager"].isna()])
        shades = np.linspace(0.92, 0.55, len(bases)) if len(bases) > 1 else [0.7]
        for j, (base, shade) in enumerate(zip(bases, shades)):
            linestyle = "-." if fam == "peers" else "-"
            styles[base] = Style(cmap(shade), _MARKERS[j % len(_MARKERS)], linestyle, str(fam))
    for name, eager in facts["eager"].dropna().items():
        styles[name] = styles[eager]._replace(linestyle="--")
    return {name: styles[name] for name in facts.index if name in names}


def _legend(fig: Figure, styles: dict[str, Style], names: Iterable[str], extra: list) -> None:
    """One legend for the figure: strategies under a bold heading per family, then ``extra``."""
    handles, labels, headings = [], [], []
    current = None
    for name in (n for n in styles if n in set(names)):
        style = styles[name]
        if style.family != current:
            current = style.family
            headings.append(len(labels))
            handles.append(Line2D([], [], linestyle="none"))
            labels.append(current)
        handles.append(
            Line2D([], [], color=style.colour, marker=style.marker, linestyle=style.linestyle)
        )
        labels.append(name)
    for handle in extra:
        handles.append(handle)
        labels.append(handle.get_label())
    # long handles, so that a compiled variant's dashes show
    legend = fig.legend(handles, labels, loc="outside right upper", fontsize=8, handlelength=3.5)
    for i in headings:
        legend.get_texts()[i].set_fontweight("bold")


def _recommended(rows: pd.DataFrame) -> set[str]:
    """Strategies that are the fastest in some size range of these rows."""
    return set(recommend(rows)["fastest"].dropna())


def _contenders(rows: pd.DataFrame) -> set[str]:
    """The recommended strategies and those among the ``CONTENDER_RANK`` fastest of some case."""
    cells = case_cells(rows)
    return _recommended(rows) | set(cells.loc[cells["rank"] <= CONTENDER_RANK, "strategy"])


def _arch(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with an ``arch`` column (runs made before it existed are MLPs)."""
    return df.assign(arch=df["arch"].fillna("mlp")) if "arch" in df else df.assign(arch="mlp")


def _others_handle() -> Line2D:
    return Line2D([], [], color=OTHERS_COLOUR, linewidth=1, label="grey: every other strategy")


def _panels(df: pd.DataFrame, keys: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    return [(k if isinstance(k, tuple) else (k,), g) for k, g in df.groupby(keys, sort=True)]


#: height of one legend entry (inches), so that a figure is never shorter than its legend
_LEGEND_ENTRY = 0.19


def _grid(n: int, entries: int, height: float = 4.0) -> tuple[Figure, list]:
    ncols = min(n, 2)
    nrows = -(-n // ncols)
    # Room on the right for one shared legend of ``entries`` lines, strategies by family.
    fig = Figure(
        figsize=(PAGE_WIDTH, max(height * nrows, _LEGEND_ENTRY * entries + 1.0)),
        layout="constrained",
    )
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _family_lines(ax, rows: pd.DataFrame, column: str, scale: float, **style) -> None:
    """One line per case family through ``column`` vs P."""
    rows = rows.dropna(subset=[column])
    rows = rows[rows[column] > 0]
    for _, line in rows.groupby(family(rows), sort=True):
        line = line.sort_values("P")
        ax.plot(line["P"], line[column] / scale, **style)


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


def _left_out_note(n: int, what: str) -> str:
    """A title's second line counting the panels or cases left out for want of timings."""
    if not n:
        return ""
    return (
        f"\n{n} {what if n > 1 else what[:-1]} with nothing timed left out (see 'Cells not timed')"
    )


def _sized_panels(
    df: pd.DataFrame,
    styles: dict[str, Style],
    value: str,
    scale: float,
    ylabel: str,
    references: list[tuple[str, str, dict]],
    title: str,
) -> Figure | None:
    """A panel per machine, device, dtype and arch holding a measured ``value``; None if none
    does. Each panel's contenders (``_contenders``) are drawn in their colours, the other
    strategies thin and grey; the legend, outside the axes, names the contenders.

    Panels where no cell was timed with a ``value`` (a device absent here, a peer's memory)
    are left out and counted in the title; their cells are in the report's tables.
    """
    panels = _panels(_arch(df), ["machine", "device", "dtype", "arch"])
    measured = [
        (key, g) for key, g in panels if g.loc[g["status"] == OK, value].fillna(0).gt(0).any()
    ]
    if not measured:
        return None
    contenders = {key: _contenders(g) for key, g in measured}
    shown = set().union(*contenders.values())
    families = {styles[name].family for name in shown}
    fig, axes = _grid(len(measured), len(shown) + len(families) + len(references) + 5)
    for ax, ((machine, device, dtype, arch), g) in zip(axes, measured):
        recommended = _recommended(g)
        for strategy, rows in g.groupby("strategy", sort=True):
            style = styles[strategy]
            strong = strategy in contenders[(machine, device, dtype, arch)]
            _family_lines(
                ax,
                rows[rows["status"] == OK],
                value,
                scale,
                marker=style.marker if strong else None,
                markersize=4,
                linestyle=style.linestyle,
                color=style.colour if strong else OTHERS_COLOUR,
                linewidth=_RECOMMENDED_WIDTH if strategy in recommended else _LINE_WIDTH,
                zorder=3 if strong else 1,
            )
            _mark_not_timed(
                ax, rows[rows["status"] != OK], style.colour if strong else OTHERS_COLOUR
            )
        for column, _, style in references:
            _family_lines(ax, g.drop_duplicates("case"), column, scale, color="black", **style)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
        # Crosses alone (drawn in axes coordinates for y) do not widen the data limits.
        ax.set_xlim(g["P"].min() / 1.3, g["P"].max() * 1.3)
        ax.set_yscale("log")
        ax.set_xlabel("P (number of weights)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{arch}: {machine}\n{device}, {dtype}", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
    extra = [Line2D([], [], color="black", label=label, **style) for _, label, style in references]
    extra += [
        _others_handle(),
        Line2D([], [], color="grey", linewidth=_RECOMMENDED_WIDTH, label="thick: recommended"),
        Line2D([], [], color="grey", linestyle="--", label="dashed: compiled variant"),
        Line2D([], [], color="grey", linestyle="-.", label="dash-dot: peer (reference only)"),
        Line2D([], [], color="grey", marker=NOT_TIMED_MARKER, linestyle="", label="x: not timed"),
    ]
    _legend(fig, styles, shown, extra)
    fig.suptitle(title + _left_out_note(len(panels) - len(measured), "panels"))
    return fig


def time_vs_p(df: pd.DataFrame, styles: dict[str, Style]) -> Figure | None:
    """Minimum time per Hessian vs P, a panel per machine, device and dtype with timings.

    A line joins the cases of one family (same input, output, activation, loss, batch,
    arch) in order of P. The reference lines are P gradients (``P x grad_s``) and the
    ``(P x B) @ (B x P)`` product. None where nothing was timed.
    """
    df = df.assign(p_grads_s=df["P"] * df["grad_s"])
    return _sized_panels(
        df,
        styles,
        "min",
        1.0,
        "time per Hessian, min of rounds (s)",
        [
            ("p_grads_s", "P × one gradient", {"linestyle": "--", "linewidth": 1}),
            ("gemm_s", "(P×B)(B×P) GEMM", {"linestyle": ":", "linewidth": 1.5}),
        ],
        "Time vs number of weights",
    )


def memory_vs_p(df: pd.DataFrame, styles: dict[str, Style]) -> Figure | None:
    """Peak memory above baseline vs P, with the Hessian's own size as reference."""
    return _sized_panels(
        df,
        styles,
        "peak_bytes",
        MIB,
        "peak memory above baseline (MiB)",
        [("hessian_bytes", "the Hessian itself (P² × itemsize)", {"linestyle": "--"})],
        "Peak memory vs number of weights",
    )


def speedup(df: pd.DataFrame, styles: dict[str, Style], baseline: str = BASELINE) -> Figure | None:
    """Speedup over ``baseline`` per case (baseline min / strategy min), a panel per machine,
    device and arch.

    A cell that was not timed is a cross at 1x (a marker, never a bar) labelled with its
    status; a compiled variant's bar is dotted; the recommended strategy's bars are edged in
    black; the panel's contenders (``_contenders``) have their colours, the others grey. A
    case where the baseline itself was not timed says so instead of showing bars. None where
    nothing was timed.
    """
    # Cases where nothing at all was timed (a device absent here) would be empty slots: they
    # are counted in the title and listed in the report's "Cells not timed".
    timed_cases = set(df.loc[df["status"].isin(TIMED), "case"])
    untimed = df.loc[~df["case"].isin(timed_cases), "case"].nunique()
    panels = _panels(_arch(df[df["case"].isin(timed_cases)]), ["machine", "device", "arch"])
    # an arch the baseline refuses on every case (LayerNorm for torch_func) has no bars: its
    # multiples of the case's fastest are in the report's tables
    based = [
        (key, g) for key, g in panels if ((g["strategy"] == baseline) & (g["status"] == OK)).any()
    ]
    kept = {key for key, _ in based}
    without = sorted({key[-1] for key, _ in panels if key not in kept})
    panels = based
    if not panels:
        return None
    contenders = {key: _contenders(g) for key, g in panels}
    shown = set().union(*contenders.values()) - {baseline}
    entries = len(shown) + len({styles[name].family for name in shown}) + 4
    fig = Figure(
        figsize=(PAGE_WIDTH, max(3.6 * len(panels), _LEGEND_ENTRY * entries + 1.0)),
        layout="constrained",
    )
    axes = fig.subplots(len(panels), 1, squeeze=False).ravel().tolist()
    for ax, ((machine, device, arch), g) in zip(axes, panels):
        recommended = _recommended(g)
        strong = contenders[(machine, device, arch)]
        strategies = [s for s in styles if s in set(g["strategy"]) - {baseline}]
        width = 0.8 / max(len(strategies), 1)
        cases = sorted(g["case"].unique(), key=lambda c: (g.loc[g["case"] == c, "P"].iloc[0], c))
        ax.set_title(f"{arch}: {machine}, {device}", fontsize=9)
        cells = g.set_index(["case", "strategy"])
        for i, case in enumerate(cases):
            base = cells["min"].get((case, baseline))
            if cells["status"].get((case, baseline)) != OK:
                ax.text(i, 1.0, f"{baseline}\nnot timed", ha="center", va="center", fontsize=7)
                continue
            for j, strategy in enumerate(strategies):
                if (case, strategy) not in cells.index:
                    continue
                x = i - 0.4 + (j + 0.5) * width
                style = styles[strategy]
                colour = style.colour if strategy in strong else OTHERS_COLOUR
                status = cells["status"].get((case, strategy))
                if status == OK:
                    ax.bar(
                        x,
                        base / cells["min"][(case, strategy)],
                        width,
                        color=colour,
                        hatch=".." if style.linestyle == "--" else None,
                        edgecolor="black" if strategy in recommended else colour,
                        linewidth=1.2 if strategy in recommended else 0,
                    )
                else:
                    ax.scatter(x, 1.0, marker=NOT_TIMED_MARKER, color=colour, s=20, zorder=4)
                    ax.text(x, 1.08, status, rotation=90, ha="center", va="bottom", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(_TIMES)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"speedup over {baseline} (×, log)")
    extra = [
        Patch(facecolor="lightgrey", edgecolor="black", label="black edge: recommended"),
        Patch(facecolor="lightgrey", hatch="..", label="dotted: compiled variant"),
        Line2D([], [], color="grey", marker=NOT_TIMED_MARKER, linestyle="", label="x: not timed"),
        Patch(facecolor=OTHERS_COLOUR, label="grey: every other strategy"),
    ]
    _legend(fig, styles, shown, extra)
    fig.suptitle(
        f"Speedup over {baseline} per case (higher is faster)"
        + _left_out_note(untimed, "cases")
        + (f"\n{baseline} timed on no case of: {', '.join(without)}" if without else "")
    )
    return fig


def cost_ratios(df: pd.DataFrame, styles: dict[str, Style]) -> Figure | None:
    """``cost_vs_grad`` and ``vs_gemm`` per strategy, one point per timed case.

    Strategies in family order; recommended ones in bold. None where nothing was timed.
    """
    ok = df[df["status"] == OK]
    if ok.empty:
        return None
    recommended = _recommended(df)
    strategies = [s for s in styles if s in set(ok["strategy"])]
    fig = Figure(figsize=(PAGE_WIDTH, 8.0), layout="constrained")
    axes = fig.subplots(2, 1)
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
                    color=styles[strategy].colour,
                    marker=markers.get(device, "^"),
                    s=18,
                )
        ax.axhline(1.0, color="black", linewidth=1, linestyle=":")
        ax.set_yscale("log")
        ax.set_xticks(range(len(strategies)), strategies, rotation=45, ha="right", fontsize=7)
        for tick, strategy in zip(ax.get_xticklabels(), strategies):
            tick.set_fontweight("bold" if strategy in recommended else "normal")
        ax.set_ylabel(f"{label} (ratio, log)")
        ax.grid(True, axis="y", alpha=0.3)
    handles = [
        Line2D([], [], color="grey", marker=m, linestyle="", label=d) for d, m in markers.items()
    ]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="device")
    fig.suptitle("Cost relative to one gradient and to a GEMM (lower is better; bold: recommended)")
    return fig


def accuracy_heatmap(audits: list[dict]) -> Figure | None:
    """The audit's strategy x model statuses as a colour-coded grid, a panel per audit file.

    Cells are coloured by status (``STATUS_COLOURS``); a wrong cell shows its relative error,
    an error cell its exception. Strategies in family order. None without audit records.
    """
    records = audit_frame(audits)
    if records.empty:
        return None
    sources = list(dict.fromkeys(records["source"]))
    order = list(strategy_facts(records["strategy"].unique()).index)
    statuses = list(STATUS_COLOURS)
    cmap = ListedColormap([STATUS_COLOURS[s] for s in statuses])
    n_models = records["model"].nunique()
    n_strategies = len(order)
    fig = Figure(
        figsize=(
            min(PAGE_WIDTH, max(8.0, 0.8 * n_models + 4.0)),
            (0.3 * n_strategies + 2.4) * len(sources),
        ),
        layout="constrained",
    )
    axes = fig.subplots(len(sources), 1, squeeze=False).ravel().tolist()
    for ax, source in zip(axes, sources):
        part = records[records["source"] == source]
        rows = [s for s in order if s in set(part["strategy"])]
        status = accuracy_statuses(part).loc[rows]
        text = accuracy_matrix(part).loc[rows]
        codes = status.apply(lambda column: column.map(statuses.index)).to_numpy()
        ax.imshow(codes, cmap=cmap, vmin=-0.5, vmax=len(statuses) - 0.5, aspect="auto")
        for (i, j), cell in np.ndenumerate(text.to_numpy()):
            detail = cell[len(status.iat[i, j]) :].strip(" ()").removeprefix("rel err ")
            if detail:
                ax.text(j, i, detail, ha="center", va="center", fontsize=7.5)
        ax.set_xticks(range(len(status.columns)), status.columns, rotation=35, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.tick_params(labelsize=8)
        ax.set_xticks(np.arange(len(status.columns) + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(len(rows) + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
        audit = next(a for a in audits if a["source"] == source)
        ax.set_title(
            f"{audit.get('machine_label')}, torch {audit.get('torch_version')}\n"
            f"{audit.get('command')}",
            fontsize=9,
        )
    handles = [Patch(facecolor=STATUS_COLOURS[s], edgecolor="grey", label=s) for s in statuses]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="audit status")
    fig.suptitle("Accuracy audit: strategy × model (wrong: relative error; error: exception)")
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


def write_figures(
    df: pd.DataFrame, plots_dir: Path, audits: Iterable[dict] = ()
) -> dict[str, Drawn]:
    """Draw the report's figures into ``plots_dir`` as PNG; returns {file stem: Drawn}.

    Only figures with something to show are drawn: no timing, no time figure; no audit, no
    ``accuracy.png``. ``headline.png`` (time vs P on CPU, for the README) is written too but
    not returned.
    """
    audits = list(audits)
    figures: dict[str, tuple[str, Figure | None]] = {}
    if not df.empty:
        styles = strategy_styles(df["strategy"])
        figures = {
            "time_vs_P": (
                "Time per Hessian vs P, with P gradients and the GEMM as references",
                time_vs_p(df, styles),
            ),
            "memory_vs_P": (
                "Peak memory vs P, with the Hessian's own size as reference",
                memory_vs_p(df, styles),
            ),
            "cost_ratios": ("cost_vs_grad and vs_gemm per strategy", cost_ratios(df, styles)),
        }
        if (df["strategy"] == BASELINE).any():
            figures["speedup"] = (f"Speedup over {BASELINE} per case", speedup(df, styles))
        headline = df[df["device"] == "cpu"] if (df["device"] == "cpu").any() else df
        headline_fig = time_vs_p(headline, styles)
        if headline_fig is not None:
            save(headline_fig, plots_dir / "headline.png")
    figures["accuracy"] = (
        "Accuracy audit: strategy × model, coloured by status",
        accuracy_heatmap(audits),
    )
    return {
        name: Drawn(caption, save(fig, plots_dir / f"{name}.png"))
        for name, (caption, fig) in figures.items()
        if fig is not None
    }

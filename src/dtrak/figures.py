"""Matplotlib figures of the report: LDS charts, the loss curve, attribution galleries.

Every function draws one figure with the Agg backend (a bare ``Figure``, so pyplot's global
state and the user's interactive backend are never touched), writes it as a PNG (parent
folders created), releases it and returns the path. Images are [C, H, W] / [N, C, H, W]
arrays in [-1, 1] as everywhere in dtrak (see :mod:`dtrak.images`).

Record and curve formats are those of ``RUN/results/lds.json`` and
``RUN/results/counterfactual.json`` (see :mod:`dtrak.report`); LDS values are in percent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from dtrak.images import to_uint8

__all__ = [
    "attribution_gallery",
    "counterfactual_distribution",
    "display_name",
    "image_strip",
    "lds_bar_chart",
    "lds_vs_lambda",
    "loss_curve",
    "method_color",
    "samples_per_prompt",
]

log = logging.getLogger(__name__)

DPI = 110
_NAMES = {"trak": "TRAK", "dtrak": "D-TRAK", "journey_trak": "Journey TRAK", "tracin": "TracIn",
          "random": "random", "ceiling": "seed ceiling"}
_COLORS = {"trak": "#4C72B0", "dtrak": "#DD8452", "random": "#8C8C8C"}
_CYCLE = ("#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#CCB974", "#64B5CD")


def display_name(method: str) -> str:
    """Human name of a method ("dtrak" -> "D-TRAK"); unknown names are returned as they are."""
    return _NAMES.get(method, method)


def method_color(method: str) -> str:
    """A fixed colour per method, so every figure of a report agrees."""
    if method in _COLORS:
        return _COLORS[method]
    return _CYCLE[sum(map(ord, method)) % len(_CYCLE)]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight" if tight else None,
                facecolor="white")
    fig.clear()
    log.debug("wrote %s", path)
    return path


def _style(ax: Axes) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)


def _show_image(ax: Axes, image: np.ndarray) -> None:
    """Draw one [C, H, W] image in [-1, 1] without ticks."""
    u = to_uint8(np.asarray(image, dtype=np.float32))
    ax.imshow(u, cmap="gray" if u.ndim == 2 else None, vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _ordered(values: Sequence[str]) -> list[str]:
    """Distinct values in order of first appearance."""
    return list(dict.fromkeys(values))


def _interval_text(lds: float, lo: float | None, hi: float | None) -> str:
    if lo is None or hi is None:
        return f"{lds:.1f}"
    return f"{lds:.1f}\n[{lo:.1f}, {hi:.1f}]"


# ---------------------------------------------------------------------------------------------
# LDS
# ---------------------------------------------------------------------------------------------


def lds_bar_chart(
    records: Sequence[Mapping],
    path: str | Path,
    title: str,
    ceiling: Sequence[Mapping] = (),
) -> Path:
    """Bar chart of LDS (%) with its bootstrap interval as error bars and value labels.

    Args:
        records: ``lds.json`` records (``method``, ``targets``, ``lds``, ``ci_low``,
            ``ci_high``, ``lambda_selection``); one group of bars per (targets, selection),
            one bar per method.
        path: the PNG to write.
        title: the figure title; put the settings that made the numbers in it.
        ceiling: optional ``lds.json`` ceiling entries, drawn as a dashed line over the
            groups of their target set.
    """
    if not records:
        raise ValueError("lds_bar_chart needs at least one LDS record")
    groups = _ordered([(r["targets"], r.get("lambda_selection", "")) for r in records])
    methods = _ordered([r["method"] for r in records])
    width = 0.8 / len(methods)
    fig = _figure(max(5.0, 1.1 + 0.75 * len(groups) * len(methods)), 4.2)
    ax = fig.add_subplot()
    for j, method in enumerate(methods):
        _bars_of_method(ax, records, groups, method, (j - (len(methods) - 1) / 2) * width, width)
    _ceiling_lines(ax, ceiling, groups)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{t}\nλ: {s}" if s else t for t, s in groups])
    ax.set_ylabel("LDS (%)  ·  95% bootstrap interval")
    ax.axhline(0, color="#444444", linewidth=0.8)
    ax.set_ylim(top=max(ax.get_ylim()[1] * 1.12, 1.0))
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title, fontsize=9, loc="left")
    _style(ax)
    return _save(fig, path)


def _bars_of_method(
    ax: Axes, records: Sequence[Mapping], groups: list, method: str, offset: float, width: float
) -> None:
    by_group = {(r["targets"], r.get("lambda_selection", "")): r for r in records
                if r["method"] == method}
    xs, ys, lo, hi, labels = [], [], [], [], []
    for g, key in enumerate(groups):
        if key not in by_group:
            continue
        r = by_group[key]
        low, high = r.get("ci_low"), r.get("ci_high")
        xs.append(g + offset)
        ys.append(r["lds"])
        lo.append(r["lds"] - low if low is not None else 0.0)
        hi.append(high - r["lds"] if high is not None else 0.0)
        labels.append(_interval_text(r["lds"], low, high))
    ax.bar(xs, ys, width * 0.92, yerr=[lo, hi], capsize=3, color=method_color(method),
           label=display_name(method), error_kw={"elinewidth": 1, "ecolor": "#333333"})
    for x, y, h, text in zip(xs, ys, hi, labels, strict=True):
        ax.annotate(text, (x, max(y + h, 0.0)), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7.5, linespacing=1.0)


def _ceiling_lines(ax: Axes, ceiling: Sequence[Mapping], groups: list) -> None:
    for c in ceiling:
        idx = [g for g, (t, _) in enumerate(groups) if t == c.get("targets")]
        if not idx:
            continue
        label = f"seed ceiling ({c['targets']}): {c['lds']:.1f}"
        if c.get("ci_low") is not None and c.get("ci_high") is not None:
            label += f" [{c['ci_low']:.1f}, {c['ci_high']:.1f}]"
        ax.hlines(c["lds"], min(idx) - 0.45, max(idx) + 0.45, colors="#555555",
                  linestyles="--", linewidth=1.2, label=label)


def lds_vs_lambda(
    curves: Sequence[Mapping],
    path: str | Path,
    title: str,
    chosen: Sequence[Mapping] = (),
) -> Path:
    """LDS (%) against the ridge lambda, one panel per target set, one line per method.

    Args:
        curves: ``lds.json`` ``lds_by_lambda`` entries (``method``, ``targets``, ``lambdas``
            ``[L]``, ``lds`` ``[L]``, optional ``ci_low`` / ``ci_high`` ``[L]`` drawn as a band).
        path: the PNG to write.
        title: the figure title (the settings that made the numbers).
        chosen: optional LDS records; their ``lambda`` is marked with a star on the curve of
            the same method and targets.
    """
    if not curves:
        raise ValueError("lds_vs_lambda needs at least one curve")
    target_sets = _ordered([c["targets"] for c in curves])
    fig = _figure(max(5.5, 4.6 * len(target_sets)), 3.9)
    axes = fig.subplots(1, len(target_sets), squeeze=False)[0]
    for ax, targets in zip(axes, target_sets, strict=True):
        for c in (c for c in curves if c["targets"] == targets):
            _draw_curve(ax, c, chosen)
        ax.set_title(f"targets: {targets}", fontsize=9)
        ax.set_xlabel("λ")
        _style(ax)
    axes[0].set_ylabel("LDS (%)  ·  band: 95% interval")
    axes[-1].legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.subplots_adjust(wspace=0.22)
    fig.suptitle(title, fontsize=9, x=0.06, y=0.93, ha="left", va="bottom")
    return _save(fig, path)


def _draw_curve(ax: Axes, curve: Mapping, chosen: Sequence[Mapping]) -> None:
    lams = np.asarray(curve["lambdas"], dtype=float)
    lds = np.asarray(curve["lds"], dtype=float)
    order = np.argsort(lams)
    lams, lds = lams[order], lds[order]
    color = method_color(curve["method"])
    ax.plot(lams, lds, marker="o", markersize=3, color=color, label=display_name(curve["method"]))
    if curve.get("ci_low") is not None and curve.get("ci_high") is not None:
        lo = np.asarray(curve["ci_low"], dtype=float)[order]
        hi = np.asarray(curve["ci_high"], dtype=float)[order]
        ax.fill_between(lams, lo, hi, color=color, alpha=0.18, linewidth=0)
    if np.all(lams > 0):
        ax.set_xscale("log")
        # plain tick labels (1e-2 .. 1e3): avoids mathtext, and matches the tables
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}".replace("e+0", "e")
                                                   .replace("e-0", "e-").replace("e+", "e")))
    for r in chosen:
        if (r.get("method"), r.get("targets")) != (curve["method"], curve["targets"]):
            continue
        lam = r.get("lambda")
        if lam is None or not np.any(np.isclose(lams, lam, rtol=1e-6)):
            continue
        i = int(np.argmin(np.abs(lams - lam)))
        ax.plot([lams[i]], [lds[i]], marker="*", markersize=12, color=color,
                markeredgecolor="black", markeredgewidth=0.6, linestyle="none")
        break


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _read_stats(stats_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    steps, losses = [], []
    for line in Path(stats_path).read_text().splitlines():
        try:
            row = json.loads(line)
            steps.append(float(row["step"]))
            losses.append(float(row["loss"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    if not steps:
        raise ValueError(f"{stats_path} has no lines with 'step' and 'loss'")
    return np.asarray(steps), np.asarray(losses)


def _ema(values: np.ndarray, span: int) -> np.ndarray:
    alpha = 2.0 / (span + 1.0)
    out = np.empty_like(values)
    acc = values[0]
    for i, v in enumerate(values):
        acc = alpha * v + (1 - alpha) * acc
        out[i] = acc
    return out


def _two_five(value: float, _pos: int) -> str:
    """Label a log-axis minor tick if it is 2 or 5 times a power of ten."""
    lead = round(value / 10 ** np.floor(np.log10(value)), 6) if value > 0 else 0
    return f"{value:g}" if lead in (2, 5) else ""


def loss_curve(stats_path: str | Path, path: str | Path) -> Path:
    """Training loss against step from ``RUN/model/stats.jsonl`` (raw and smoothed)."""
    steps, losses = _read_stats(stats_path)
    fig = _figure(6.0, 3.4)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="#4C72B0", alpha=0.3, linewidth=0.8, label="loss")
    span = max(1, len(losses) // 20)
    ax.plot(steps, _ema(losses, span), color="#4C72B0", linewidth=1.6,
            label=f"moving average (span {span})")
    if np.all(losses > 0):
        ax.set_yscale("log")
        # plain labels (no mathtext); over < 2 decades also the 2x and 5x minor ticks
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        short = losses.max() / losses.min() < 100
        ax.yaxis.set_minor_formatter(FuncFormatter(_two_five) if short else NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"training loss: {len(steps)} logged steps, last {losses[-1]:.4g}",
                 fontsize=9, loc="left")
    ax.legend(frameon=False, fontsize=8)
    _style(ax)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Attribution galleries
# ---------------------------------------------------------------------------------------------


def _top_bottom(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k highest (descending) and k lowest (ascending) scores; stable ties."""
    order = np.argsort(-scores, kind="stable")
    return order[:k], order[::-1][:k]


def _check_gallery(target: np.ndarray, train: np.ndarray, scores: Mapping[str, np.ndarray]
                   ) -> None:
    if target.ndim != 3 or train.ndim != 4 or target.shape != train.shape[1:]:
        raise ValueError(f"need target [C, H, W] and train images [N, C, H, W] of the same "
                         f"image shape, got {target.shape} and {train.shape}")
    if not scores:
        raise ValueError("attribution_gallery needs scores of at least one method")
    for method, s in scores.items():
        if np.asarray(s).shape != (train.shape[0],):
            raise ValueError(f"scores of {method!r} have shape {np.asarray(s).shape}; "
                             f"expected [{train.shape[0]}] (one per training image)")


# Gallery layout in tile units (one tile = 1 x 1); y grows downwards.
_LABEL_W, _TILE_GAP, _BLOCK_GAP = 0.45, 0.1, 0.45
_CAPTION, _ROW_GAP, _HEADER, _TITLE = 0.56, 0.18, 0.5, 0.45
_INCH_PER_TILE = 0.9


def attribution_gallery(
    target: np.ndarray,
    train_images: np.ndarray,
    scores_by_method: Mapping[str, np.ndarray],
    path: str | Path,
    k: int = 8,
    title: str | None = None,
) -> Path:
    """One row per method: the target, its top-k proponents, then its top-k opponents.

    Args:
        target: ``[C, H, W]`` in [-1, 1].
        train_images: ``[N, C, H, W]`` in [-1, 1].
        scores_by_method: method -> ``[N]`` scores of this target (positive = helps it).
        path: the PNG to write.
        k: tiles per side (at most N).
        title: optional title above the rows.

    Each tile is captioned with the training index and the score. All tiles are drawn on
    one axes (fast even for many rows).
    """
    target = np.asarray(target, dtype=np.float32)
    train = np.asarray(train_images, dtype=np.float32)
    _check_gallery(target, train, scores_by_method)
    k = max(1, min(k, train.shape[0]))
    starts = (_LABEL_W, _LABEL_W + 1 + _BLOCK_GAP,
              _LABEL_W + 1 + 2 * _BLOCK_GAP + k * (1 + _TILE_GAP) - _TILE_GAP)
    width = starts[2] + k * (1 + _TILE_GAP) + 0.05
    top = _HEADER + (_TITLE if title else 0.0)
    height = top + len(scores_by_method) * (_CAPTION + 1 + _ROW_GAP)
    fig = _figure(width * _INCH_PER_TILE, height * _INCH_PER_TILE)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    for row, (method, scores) in enumerate(scores_by_method.items()):
        y = top + row * (_CAPTION + 1 + _ROW_GAP) + _CAPTION
        _gallery_row(ax, y, starts, method, target, train, np.asarray(scores, float), k)
    _gallery_headers(ax, starts, k, top, title)
    return _save(fig, path, tight=False)


def _tile(ax: Axes, image: np.ndarray, x: float, y: float) -> None:
    u = to_uint8(image)
    ax.imshow(u, cmap="gray" if u.ndim == 2 else None, vmin=0, vmax=255,
              interpolation="nearest", extent=(x, x + 1, y + 1, y))


def _gallery_row(ax: Axes, y: float, starts: tuple[float, float, float], method: str,
                 target: np.ndarray, train: np.ndarray, scores: np.ndarray, k: int) -> None:
    _tile(ax, target, starts[0], y)
    ax.text(starts[0] + 0.5, y - 0.04, "target", ha="center", va="bottom", fontsize=12)
    ax.text(starts[0] - 0.08, y + 0.5, display_name(method), rotation=90, ha="right",
            va="center", fontsize=15, fontweight="bold", color=method_color(method))
    for start, idx in zip(starts[1:], _top_bottom(scores, k), strict=True):
        for j, i in enumerate(idx):
            x = start + j * (1 + _TILE_GAP)
            _tile(ax, train[i], x, y)
            color = "#1a7f37" if scores[i] > 0 else ("#b42318" if scores[i] < 0 else "#555555")
            ax.text(x + 0.5, y - 0.04, f"#{i}\n{scores[i]:+.3g}", ha="center", va="bottom",
                    fontsize=12, color=color, linespacing=1.0)


def _gallery_headers(ax: Axes, starts: tuple[float, float, float], k: int, top: float,
                     title: str | None) -> None:
    span = k * (1 + _TILE_GAP) - _TILE_GAP
    y = top - 0.06
    for start, text in ((starts[1], f"top {k} proponents (highest score)"),
                        (starts[2], f"top {k} opponents (lowest score)")):
        ax.text(start + span / 2, y, text, ha="center", va="bottom", fontsize=14,
                color="#333333")
        ax.plot([start, start + span], [y + 0.02, y + 0.02], color="#999999", linewidth=0.8)
    if title:
        ax.text(0.08, 0.06, title, ha="left", va="top", fontsize=14, fontweight="bold")


def image_strip(
    images: Sequence[np.ndarray], captions: Sequence[str], path: str | Path,
    title: str | None = None,
) -> Path:
    """A row of [C, H, W] images in [-1, 1], each with its caption (e.g. a counterfactual)."""
    if len(images) == 0 or len(images) != len(captions):
        raise ValueError(f"need one caption per image and at least one image, got "
                         f"{len(images)} images and {len(captions)} captions")
    fig = _figure(1.5 * len(images) + 0.2, 1.9 if title else 1.7)
    axes = fig.subplots(1, len(images), squeeze=False)[0]
    for ax, image, caption in zip(axes, images, captions, strict=True):
        _show_image(ax, image)
        ax.set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def samples_per_prompt(
    images: np.ndarray, prompts: Sequence[str], path: str | Path, per_prompt: int = 10,
) -> Path:
    """One row per distinct prompt (in order of first use): its first ``per_prompt`` samples.

    ``images`` are [N, C, H, W] in [-1, 1] and ``prompts[i]`` is the prompt of image i."""
    if len(images) == 0 or len(images) != len(prompts):
        raise ValueError(f"need one prompt per image and at least one image, got "
                         f"{len(images)} images and {len(prompts)} prompts")
    rows = _ordered(prompts)
    ids = [[i for i, p in enumerate(prompts) if p == row][:per_prompt] for row in rows]
    cols = max(len(r) for r in ids)
    fig = _figure(0.9 * cols + 2.2, 0.95 * len(rows) + 0.1)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (row, members) in enumerate(zip(rows, ids, strict=True)):
        for c, ax in enumerate(axes[r]):
            if c < len(members):
                _show_image(ax, images[members[c]])
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(f'"{row}"' if row else '"" (unconditional)', rotation=0,
                              ha="right", va="center", fontsize=9)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Counterfactual
# ---------------------------------------------------------------------------------------------


def counterfactual_distribution(
    records: Sequence[Mapping], path: str | Path, metric: str = "pixel_l2"
) -> Path:
    """Box plot with the individual targets as points, one box per method, of ``metric``.

    Args:
        records: ``counterfactual.json`` records (``target``, ``method``, ``metric``); records
            whose value is missing or null are left out.
        path: the PNG to write.
        metric: ``pixel_l2`` (higher = the removal changed the image more) or ``clip_cos``
            (lower = more change).
    """
    values: dict[str, list[float]] = {}
    for r in records:
        v = r.get(metric)
        if v is not None and np.isfinite(v):
            values.setdefault(r["method"], []).append(float(v))
    if not values:
        raise ValueError(f"no counterfactual record has a value for {metric!r}")
    methods = list(values)
    fig = _figure(max(4.0, 1.3 * len(methods) + 1.5), 3.6)
    ax = fig.add_subplot()
    box = ax.boxplot([values[m] for m in methods], widths=0.5, patch_artist=True,
                     showfliers=False, medianprops={"color": "black"})
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    for i, (method, patch) in enumerate(zip(methods, box["boxes"], strict=True)):
        patch.set_facecolor(method_color(method))
        patch.set_alpha(0.45)
        v = np.asarray(values[method])
        ax.scatter(i + 1 + rng.uniform(-0.12, 0.12, v.size), v, s=10, color=method_color(method),
                   edgecolor="black", linewidth=0.3, zorder=3)
    ax.set_xticks(range(1, len(methods) + 1))
    ax.set_xticklabels([f"{display_name(m)}\n(n={len(values[m])})" for m in methods])
    better = "higher" if metric == "pixel_l2" else "lower"
    ax.set_ylabel(metric)
    ax.set_title(f"counterfactual {metric} per target ({better} = larger change)", fontsize=9,
                 loc="left")
    _style(ax)
    return _save(fig, path)

"""The run report: one self-contained HTML page made from saved artefacts only.

:func:`write_report` reads what the stages saved under ``RUN/`` (see :mod:`dtrak.paths`) and
writes ``RUN/report/index.html`` with its figures as PNG files beside it (referenced by
relative paths, so the folder works offline and the figures can go into a paper). Nothing is
recomputed; an artefact that is missing is skipped with a note in the page.

Sections, in order: data and model summary (with the training-loss curve), generated samples,
LDS (table with intervals, bar chart, LDS against lambda), attribution galleries (TRAK and
D-TRAK side by side), counterfactuals, and the config that produced the run.

Artefacts read::

    RUN/config.json                     the resolved config
    RUN/data/summary.json, preview.png  data summary, a grid of training images
    RUN/model/done.json, stats.jsonl    training summary and per-step log
    RUN/gen/grid.png, images.npy        generated images [G, C, H, W] in [-1, 1]
    RUN/scores/<method>/<targets>.npy   score matrices [T, N] (+ .json metadata)
    RUN/results/lds.json                LDS records, LDS-by-lambda curves, seed ceiling
    RUN/results/counterfactual.json     counterfactual metrics (optional)
    RUN/counterfactual/panels/target-*.png or RUN/counterfactual/images/<method>/*.png

Training and validation images are not saved in the run; the caller passes them.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from dtrak import figures
from dtrak.images import load_pngs, save_grid
from dtrak.paths import RunPaths

__all__ = ["LDS_DECIMALS", "format_lambda", "format_lds", "write_report"]

log = logging.getLogger(__name__)

LDS_DECIMALS = 1  # LDS values (%) and their interval bounds are shown with this many decimals
GALLERY_K = 8  # proponents / opponents per gallery row
MAX_PANELS = 12  # counterfactual panels shown at most
SELECTION_ORDER = {"paper": 0, "heldout": 1}


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    """A number for a table cell: ints with separators, floats with 4 significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def format_lambda(lam: float | None) -> str:
    """``1000.0`` -> ``"1e3"``, ``0.5`` -> ``"0.5"``, None -> ``"—"``."""
    if lam is None:
        return "—"
    text = f"{lam:.3g}"
    if "e" in text:
        mant, exp = text.split("e")
        text = f"{mant}e{int(exp)}"
    return text


def format_lds(lds: float, ci_low: float | None = None, ci_high: float | None = None) -> str:
    """``"12.3 [10.1, 14.5]"`` with :data:`LDS_DECIMALS` decimals (interval left out if None)."""
    text = f"{lds:.{LDS_DECIMALS}f}"
    if ci_low is not None and ci_high is not None:
        text += f" [{ci_low:.{LDS_DECIMALS}f}, {ci_high:.{LDS_DECIMALS}f}]"
    return text


def _read_json(path: Path) -> Any | None:
    """The parsed file, or None if it is missing or unreadable (logged)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("cannot read %s: %s", path, e)
        return None


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv_table(items: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in items.items())
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


@dataclass
class _Section:
    id: str
    title: str
    body: str


@dataclass
class _Report:
    """What the section writers share: the run, the output folder and the notes."""

    run: RunPaths
    out: Path
    config: dict
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> str:
        """Record a note (listed at the top of the page) and return it as a paragraph."""
        self.notes.append(text)
        log.info("report: %s", text)
        return f'<p class="note">{_esc(text)}</p>'

    def copy(self, src: Path, name: str) -> str:
        shutil.copyfile(src, self.out / name)
        return name

    def figure(self, name: str, caption: str, make: Callable[[Path], Any], cls: str = "") -> str:
        """Run ``make(path)`` for ``out/name`` and return a <figure>, or a note if it fails."""
        try:
            make(self.out / name)
        except (ValueError, KeyError, TypeError, IndexError, OSError) as e:
            log.warning("figure %s failed: %s", name, e)
            return self.note(f"Figure {name} could not be made from the saved artefacts: {e}")
        return _figure_html(name, caption, cls)


def _figure_html(src: str, caption: str, cls: str = "") -> str:
    return (f'<figure class="{cls}"><a href="{_esc(src)}"><img src="{_esc(src)}" '
            f'alt="{_esc(caption)}"></a><figcaption>{caption}</figcaption></figure>')


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------


def _data_html(rep: _Report) -> str:
    summary = _read_json(rep.run.data / "summary.json")
    if summary is None:
        return rep.note("No data summary (data/summary.json) in this run.")
    items = {k: summary.get(k) for k in ("name", "source", "resolution", "channels")}
    classes = summary.get("class_names") or []
    items["classes"] = ", ".join(map(str, classes)) if classes else None
    for split in ("train", "val"):
        items[f"{split} images"] = (summary.get(split) or {}).get("size")
    out = "<h3>Data</h3>" + _kv_table(items)
    counts = {s: (summary.get(s) or {}).get("class_counts") or {} for s in ("train", "val")}
    names = list(dict.fromkeys([*classes, *counts["train"], *counts["val"]]))
    if names and (counts["train"] or counts["val"]):
        rows = [(n, counts["train"].get(n), counts["val"].get(n)) for n in names]
        out += _table(("class", "train", "val"), rows, "counts")
    return out


def _model_html(rep: _Report) -> str:
    done = _read_json(rep.run.model / "done.json")
    if done is None:
        return "<h3>Model</h3>" + rep.note("No training summary (model/done.json) in this run.")
    labels = {"steps": "steps", "final_loss": "final loss", "seconds": "training time (s)",
              "steps_per_second": "steps / second", "n_examples": "training examples"}
    items = {label: done.get(key) for key, label in labels.items()}
    model_cfg = rep.config.get("model") or {}
    if model_cfg.get("preset") is not None:
        items = {"UNet preset": model_cfg["preset"], **items}
    return "<h3>Model</h3>" + _kv_table(items)


def _summary_section(rep: _Report) -> _Section:
    figs = []
    preview = rep.run.data / "preview.png"
    if preview.is_file():
        figs.append(_figure_html(rep.copy(preview, "data-preview.png"),
                                 "Training images (data/preview.png).", "pixel"))
    stats = rep.run.model / "stats.jsonl"
    if stats.is_file():
        figs.append(rep.figure("training-loss.png", "Training loss of the full model "
                               "(model/stats.jsonl).", lambda p: figures.loss_curve(stats, p)))
    else:
        figs.append(rep.note("No training log (model/stats.jsonl); no loss curve."))
    body = (f'<div class="cols"><div>{_data_html(rep)}</div><div>{_model_html(rep)}</div></div>'
            f'<div class="figs">{"".join(figs)}</div>')
    return _Section("summary", "Data and model", body)


def _samples_section(rep: _Report) -> _Section:
    grid = rep.run.gen / "grid.png"
    images = rep.run.gen / "images.npy"
    if grid.is_file():
        name = rep.copy(grid, "gen-grid.png")
    elif images.is_file():
        name = save_grid(np.load(images, mmap_mode="r")[:64], rep.out / "gen-grid.png").name
    else:
        return _Section("samples", "Generated samples",
                        rep.note("No generated images (gen/grid.png, gen/images.npy)."))
    n = np.load(images, mmap_mode="r").shape[0] if images.is_file() else None
    caption = "Generated images (gen/grid.png)" + (f"; {n} in all." if n else ".")
    body = _figure_html(name, caption, "pixel")
    per_prompt = rep.run.gen / "prompts.png"
    if per_prompt.is_file():
        body += _figure_html(rep.copy(per_prompt, "gen-prompts.png"),
                             "The first samples of each prompt, one row per prompt "
                             "(gen/prompts.png).", "pixel")
    return _Section("samples", "Generated samples", body)


# ---------------------------------------------------------------------------------------------
# LDS
# ---------------------------------------------------------------------------------------------


def _score_meta(run: RunPaths, method: str, targets: str) -> dict:
    return _read_json(run.scores(method, targets).with_suffix(".json")) or {}


def _distinct(values: Iterable[Any]) -> list:
    return [v for v in dict.fromkeys(values) if v is not None]


def _setting(rep: _Report, lds: dict, keys: Sequence[str], section: str) -> str:
    """One setting from the records, else lds.json settings, else score metadata, else config."""
    records = lds.get("records", [])
    for key in keys:
        found = _distinct(r.get(key) for r in records)
        if not found:
            found = _distinct([(lds.get("settings") or {}).get(key)])
        if not found:
            found = _distinct(_score_meta(rep.run, r.get("method", ""), r.get("targets", ""))
                              .get(key) for r in records)
        if found:
            return ", ".join(map(str, found))
    found = _distinct((rep.config.get(section) or {}).get(k) for k in keys)
    return ", ".join(map(str, found)) if found else "?"


def _n_targets_text(records: Sequence[Mapping]) -> str:
    per = {r.get("targets"): r.get("n_targets") for r in records if r.get("n_targets")}
    if not per:
        return "?"
    if len(set(per.values())) == 1:
        return str(next(iter(per.values())))
    return ", ".join(f"{n} ({t})" for t, n in per.items())


def _lds_settings(rep: _Report, lds: dict) -> str:
    """The settings behind the LDS numbers, as one line for titles and captions."""
    records = lds.get("records", [])
    ci = _distinct(r.get("ci") for r in records) or [(lds.get("settings") or {}).get("ci", 0.95)]
    n_boot = _setting(rep, lds, ("n_boot",), "lds")
    parts = [
        f"n_subsets M = {_setting(rep, lds, ('n_subsets',), 'lds')}",
        f"n_targets = {_n_targets_text(records)}",
        f"K = {_setting(rep, lds, ('n_timesteps', 'K'), 'attribution')} timesteps",
        f"k = {_setting(rep, lds, ('proj_dim', 'k'), 'attribution')} dims",
        "λ selection: " + ", ".join(_distinct(r.get("lambda_selection") for r in records)),
        f"{100 * float(ci[0]):g}% bootstrap interval ({n_boot} resamples)",
    ]
    return " · ".join(parts)


def _columns(records: Sequence[Mapping]) -> list[tuple[str, str]]:
    cols = dict.fromkeys((r["targets"], r.get("lambda_selection", "")) for r in records)
    targets = list(dict.fromkeys(t for t, _ in cols))
    return sorted(cols, key=lambda c: (targets.index(c[0]), SELECTION_ORDER.get(c[1], 9), c[1]))


def _method_order(records: Sequence[Mapping], methods: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(r["method"] for r in records))
    return [m for m in methods if m in present] + [m for m in present if m not in methods]


def _lds_cell(r: Mapping | None, best: bool, kind: str = "method") -> str:
    if r is None:
        return '<td class="num empty">—</td>'
    value = format_lds(r["lds"], r.get("ci_low"), r.get("ci_high"))
    main, _, interval = value.partition(" ")
    extra = (f' <span class="lam">(λ = {format_lambda(r.get("lambda"))})</span>'
             if kind == "method" else f' <span class="lam">({r.get("n_seeds", "?")} seeds)</span>')
    attrs = (f'data-kind="{kind}" data-method="{_esc(r.get("method", "ceiling"))}" '
             f'data-targets="{_esc(r.get("targets"))}" '
             f'data-selection="{_esc(r.get("lambda_selection", ""))}" data-lds="{_esc(main)}"')
    cls = "num best" if best else "num"
    return (f'<td class="{cls}" {attrs}><span class="v">{_esc(main)}</span> '
            f'<span class="ci">{_esc(interval)}</span>{extra}</td>')


def _lds_table(lds: dict, methods: Sequence[str]) -> str:
    """Rows: methods (then the seed ceiling); columns: (targets, lambda selection)."""
    records = lds["records"]
    cols = _columns(records)
    index = {(r["method"], r["targets"], r.get("lambda_selection", "")): r for r in records}
    best = {c: max((r["lds"] for r in records
                    if (r["targets"], r.get("lambda_selection", "")) == c), default=None)
            for c in cols}
    targets = list(dict.fromkeys(t for t, _ in cols))
    head1 = "".join(f'<th colspan="{sum(c[0] == t for c in cols)}">targets: {_esc(t)}</th>'
                    for t in targets)
    head2 = "".join(f"<th>λ: {_esc(s or '—')}</th>" for _, s in cols)
    rows = []
    for m in _method_order(records, methods):
        cells = "".join(_lds_cell(index.get((m, *c)), index.get((m, *c), {}).get("lds") == best[c])
                        for c in cols)
        rows.append(f"<tr><th>{_esc(figures.display_name(m))}</th>{cells}</tr>")
    ceiling = {c.get("targets"): c for c in lds.get("ceiling") or []}
    if ceiling:
        cells = "".join(_lds_cell(ceiling.get(t), False, "ceiling") for t, _ in cols)
        rows.append(f'<tr class="ceiling"><th>seed ceiling</th>{cells}</tr>')
    return (f'<table class="lds" id="lds-table"><thead><tr><th rowspan="2">method</th>{head1}'
            f'</tr><tr>{head2}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _records_details(records: Sequence[Mapping]) -> str:
    keys = list(dict.fromkeys(k for r in records for k, v in r.items()
                              if not isinstance(v, list | dict)))
    rows = [[r.get(k) for k in keys] for r in records]
    return ("<details><summary>All LDS records (results/lds.json)</summary>"
            f"{_table(keys, rows, 'records')}</details>")


def _lds_section(rep: _Report, methods: Sequence[str]) -> _Section:
    lds = _read_json(rep.run.results / "lds.json")
    if not lds or not lds.get("records"):
        return _Section("lds", "Linear datamodeling score",
                        rep.note("No LDS results (results/lds.json) in this run."))
    settings = _lds_settings(rep, lds)
    name = rep.config.get("name", rep.run.root.name)
    parts = [f'<p class="settings">{_esc(settings)}</p>', _lds_table(lds, methods),
             '<p class="hint">Cells: LDS % [interval] (λ chosen). Bold: best in its column. '
             "λ selection “paper” picks λ on all targets (optimistic); “heldout” scores each "
             "half of the targets at the λ chosen on the other half.</p>",
             _records_details(lds["records"])]
    title = f"LDS (%) of run {name}\n{settings}"
    parts.append(rep.figure(
        "lds-bar.png", f"LDS with its interval per method. {_esc(settings)}.",
        lambda p: figures.lds_bar_chart(lds["records"], p, _wrap(title),
                                        ceiling=lds.get("ceiling") or ())))
    if lds.get("lds_by_lambda"):
        parts.append(rep.figure(
            "lds-vs-lambda.png", "LDS against λ per method; the band is the interval, the star "
            f"the λ chosen. {_esc(settings)}.",
            lambda p: figures.lds_vs_lambda(lds["lds_by_lambda"], p, _wrap(title),
                                            chosen=lds["records"])))
    else:
        parts.append(rep.note("lds.json has no lds_by_lambda curves; no LDS-against-λ chart."))
    return _Section("lds", "Linear datamodeling score", "".join(parts))


def _wrap(text: str, width: int = 110) -> str:
    """Break long title lines at ' · ' so they fit over a chart."""
    lines = []
    for line in text.split("\n"):
        current = ""
        for part in line.split(" · "):
            if current and len(current) + len(part) + 3 > width:
                lines.append(current)
                current = part
            else:
                current = f"{current} · {part}" if current else part
        lines.append(current)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Attribution galleries
# ---------------------------------------------------------------------------------------------


def _load_scores(rep: _Report, methods: Sequence[str], targets: str, n_train: int
                 ) -> dict[str, np.ndarray]:
    out = {}
    for m in methods:
        path = rep.run.scores(m, targets)
        if not path.is_file():
            continue
        s = np.load(path, mmap_mode="r")
        if s.ndim != 2 or s.shape[1] != n_train:
            rep.note(f"scores/{m}/{targets}.npy has shape {tuple(s.shape)}, not [targets, "
                     f"{n_train}] as the training images given; left out of the galleries.")
            continue
        out[m] = s
    return out


def _target_images(rep: _Report, targets: str, val_images: np.ndarray | None
                   ) -> np.ndarray | None:
    if targets == "gen":
        path = rep.run.gen / "images.npy"
        return np.load(path, mmap_mode="r") if path.is_file() else None
    return val_images


def _gallery_numbers(scores: Mapping[str, np.ndarray], k: int) -> str:
    rows = []
    for m, s in scores.items():
        order = np.argsort(-s, kind="stable")
        pro = ", ".join(f"#{i} ({s[i]:+.3g})" for i in order[:k])
        opp = ", ".join(f"#{i} ({s[i]:+.3g})" for i in order[::-1][:k])
        rows.append((figures.display_name(m), pro, opp))
    return ("<details><summary>Scores of the tiles</summary>"
            f"{_table(('method', 'proponents', 'opponents'), rows, 'scores')}</details>")


def _one_gallery(rep: _Report, targets: str, i: int, image: np.ndarray, train: np.ndarray,
                 scores: Mapping[str, np.ndarray]) -> str:
    row = {m: np.asarray(s[i], dtype=np.float64) for m, s in scores.items()}
    lams = ", ".join(f"{figures.display_name(m)} λ = "
                     f"{format_lambda(_score_meta(rep.run, m, targets).get('lambda'))}"
                     for m in scores)
    caption = (f"{_esc(targets)} target #{i}: the {GALLERY_K} training images with the highest "
               f"and the lowest scores, per method ({_esc(lams)}).")
    fig = rep.figure(f"gallery-{targets}-{i:04d}.png", caption,
                     lambda p: figures.attribution_gallery(
                         np.asarray(image, np.float32), train, row, p, k=GALLERY_K,
                         title=f"{targets} target #{i}"), "wide")
    return fig + _gallery_numbers(row, GALLERY_K)


def _galleries_of(rep: _Report, targets: str, n: int, train: np.ndarray,
                  val_images: np.ndarray | None, methods: Sequence[str]) -> list[str]:
    scores = _load_scores(rep, methods, targets, len(train))
    images = _target_images(rep, targets, val_images)
    if not scores:
        return []
    if images is None:
        what = "gen/images.npy" if targets == "gen" else "val_images"
        return [rep.note(f"Scores on {targets} targets exist but no {what}; "
                         f"no {targets} galleries.")]
    n = min(n, len(images), *(s.shape[0] for s in scores.values()))
    return [_one_gallery(rep, targets, i, images[i], train, scores) for i in range(n)]


def _gallery_section(rep: _Report, train_images: np.ndarray | None,
                     val_images: np.ndarray | None, n_gallery: int, methods: Sequence[str]
                     ) -> _Section:
    title = "Attribution galleries"
    if train_images is None:
        return _Section("galleries", title, rep.note(
            "Training images were not passed to the report (train_images=None); "
            "galleries skipped."))
    if n_gallery < 1:
        return _Section("galleries", title, rep.note("n_gallery = 0: no galleries asked for."))
    train = np.asarray(train_images, dtype=np.float32)
    parts = [f'<p class="hint">The first {n_gallery} generated, then the first {n_gallery} '
             "validation target(s); tiles are captioned with the training index and the score "
             "(positive = the training image helps the target).</p>"]
    for targets in ("gen", "val"):
        parts += _galleries_of(rep, targets, n_gallery, train, val_images, methods)
    if len(parts) == 1:
        parts.append(rep.note(f"No score matrices of {', '.join(methods)} "
                              "(scores/<method>/<targets>.npy); galleries skipped."))
    return _Section("galleries", title, "".join(parts))


# ---------------------------------------------------------------------------------------------
# Counterfactual
# ---------------------------------------------------------------------------------------------


def _cf_caption(records: Sequence[Mapping], target: int) -> str:
    parts = []
    for r in records:
        if r.get("target") != target:
            continue
        text = f"{figures.display_name(r['method'])}: pixel L2 {_fmt(r.get('pixel_l2'))}"
        if r.get("clip_cos") is not None:
            text += f", CLIP cos {_fmt(r['clip_cos'])}"
        parts.append(text)
    return f"Target #{target}. " + "; ".join(parts)


def _cf_strip(rep: _Report, target: int, path: Path, order: Sequence[str]) -> Path:
    """A panel from counterfactual/images/<method>/<target>.png (+ the original).

    Methods in ``order`` first (as in the records), then any other folder by name.
    """
    images, captions = [], []
    gen = rep.run.gen / "images.npy"
    if gen.is_file() and target < np.load(gen, mmap_mode="r").shape[0]:
        images.append(np.asarray(np.load(gen, mmap_mode="r")[target]))
        captions.append("original")
    folders = [p for p in (rep.run.counterfactual / "images").iterdir() if p.is_dir()]
    rank = {m: i for i, m in enumerate(order)}
    for folder in sorted(folders, key=lambda p: (rank.get(p.name, len(rank)), p.name)):
        found = sorted(folder.glob(f"{target:04d}.png")) or sorted(folder.glob(f"*{target}.png"))
        if found:
            images.append(load_pngs(found[:1])[0].numpy())
            captions.append(figures.display_name(folder.name))
    return figures.image_strip(images, captions, path)


def _panel_caption(records: Sequence[Mapping], panel: Path) -> str:
    tail = panel.stem.split("-")[-1]
    return _esc(_cf_caption(records, int(tail)) if tail.isdigit() else panel.stem)


def _cf_panels(rep: _Report, records: Sequence[Mapping]) -> list[str]:
    """Ready-made panels if there are any, else strips made from the per-method images."""
    panels = sorted((rep.run.counterfactual / "panels").glob("target-*.png"))[:MAX_PANELS]
    if panels:
        return [_figure_html(rep.copy(p, f"cf-{p.name}"), _panel_caption(records, p),
                             "pixel panel") for p in panels]
    if not (rep.run.counterfactual / "images").is_dir():
        return [rep.note("No counterfactual panels or images (counterfactual/panels, "
                         "counterfactual/images).")]
    targets = sorted(dict.fromkeys(int(r["target"]) for r in records))[:MAX_PANELS]
    order = list(dict.fromkeys(str(r["method"]) for r in records))
    return [rep.figure(f"cf-target-{t:04d}.png", _esc(_cf_caption(records, t)),
                       lambda p, t=t: _cf_strip(rep, t, p, order)) for t in targets]


def _cf_settings(rep: _Report) -> str:
    cfg = rep.config.get("counterfactual") or {}
    if not cfg:
        return ""
    remove = cfg.get("remove")
    what = (f"the top {remove:g} training images" if isinstance(remove, int | float)
            and remove >= 1 else f"the top {remove} fraction of the training set")
    return (f'<p class="settings">{_esc(cfg.get("n_targets", "?"))} generated targets · '
            f"{_esc(what)} removed per target and method · seed "
            f'{_esc(cfg.get("seed", "?"))} · methods: '
            f'{_esc(", ".join(map(str, cfg.get("methods") or [])))}</p>')


def _cf_section(rep: _Report) -> _Section:
    title = "Counterfactual evaluation"
    cf = _read_json(rep.run.results / "counterfactual.json")
    if not cf:
        return _Section("counterfactual", title, rep.note(
            "No counterfactual results (results/counterfactual.json) in this run."))
    records = cf.get("records") or []
    parts = [_cf_settings(rep)]
    if cf.get("summary"):
        keys = ("method", "metric", "mean", "median", "n")
        rows = ([figures.display_name(str(s.get("method"))), *(s.get(k) for k in keys[1:])]
                for s in cf["summary"])
        parts.append(_table(keys, rows, "cf"))
    if cf.get("differences"):
        keys = ("difference of medians", "metric", "diff", "95% low", "95% high", "n")
        rows = ([f'{figures.display_name(str(d.get("a")))} - '
                 f'{figures.display_name(str(d.get("b")))}',
                 *(d.get(k) for k in ("metric", "diff", "ci_low", "ci_high", "n"))]
                for d in cf["differences"])
        parts.append("<p>Paired bootstrap over targets: both medians of a resample come from "
                     "the same targets.</p>" + _table(keys, rows, "cf-diff"))
    plots = [m for m in ("pixel_l2", "clip_cos") if any(r.get(m) is not None for r in records)]
    figs = [rep.figure(f"cf-{m}.png", f"{m} between each target and its counterfactual, per "
                       "method (one point per target).",
                       lambda p, m=m: figures.counterfactual_distribution(records, p, m))
            for m in plots]
    parts.append(f'<div class="figs">{"".join(figs)}</div>')
    parts.append('<h3>Panels</h3><div class="panels">' + "".join(_cf_panels(rep, records))
                 + "</div>")
    return _Section("counterfactual", title, "".join(parts))


# ---------------------------------------------------------------------------------------------
# Page
# ---------------------------------------------------------------------------------------------


def _config_section(rep: _Report) -> _Section:
    if not rep.config:
        return _Section("config", "Config", rep.note("No config.json in this run."))
    text = json.dumps(rep.config, indent=2)
    return _Section("config", "Config (config.json)", f'<pre class="config">{_esc(text)}</pre>')


_STYLE = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg2:#f6f8fa; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; color:var(--fg); background:#fff; }
header, main, footer { max-width:1160px; margin:0 auto; padding:0 24px; }
header { padding-top:28px; border-bottom:1px solid var(--line); }
h1 { font-size:26px; margin:0 0 4px; } h1 .run { color:var(--accent); }
h2 { font-size:20px; margin:36px 0 12px; padding-bottom:6px; border-bottom:1px solid var(--line); }
h3 { font-size:16px; margin:18px 0 8px; }
.meta { color:var(--muted); margin:0 0 10px; font-size:14px; }
nav { display:flex; flex-wrap:wrap; gap:6px 16px; padding:8px 0 14px; font-size:14px; }
nav a { color:var(--accent); text-decoration:none; } nav a:hover { text-decoration:underline; }
table { border-collapse:collapse; margin:8px 0 14px; font-size:14px; }
th, td { border:1px solid var(--line); padding:5px 10px; text-align:left; vertical-align:top; }
thead th { background:var(--bg2); font-weight:600; }
tbody tr:nth-child(even) td { background:#fbfcfd; }
table.kv th { background:var(--bg2); font-weight:600; width:11em; }
td.num { font-variant-numeric:tabular-nums; white-space:nowrap; }
td.best .v { font-weight:700; }
.ci { color:var(--muted); } .lam { color:var(--muted); font-size:12.5px; }
tr.ceiling th, tr.ceiling td { font-style:italic; background:#fafafa; }
table.lds thead th { text-align:center; } table.scores td { font-size:12.5px; }
.cols { display:grid; grid-template-columns:repeat(auto-fit, minmax(340px, 1fr)); gap:8px 32px; }
.figs { display:flex; flex-wrap:wrap; gap:16px 28px; align-items:flex-start; }
.panels { display:flex; flex-wrap:wrap; gap:12px 24px; }
figure { margin:10px 0 18px; max-width:100%; }
figure img { max-width:100%; height:auto; display:block; border:1px solid var(--line); }
figure.pixel img { image-rendering:pixelated; }
figure.panel img { min-height:150px; }
figure.wide, figure.wide img { width:100%; }
figcaption { color:var(--muted); font-size:13px; margin-top:5px; max-width:1100px; }
.settings { background:var(--bg2); border:1px solid var(--line); border-radius:6px;
  padding:8px 12px; font-size:13.5px; }
.hint { color:var(--muted); font-size:13px; }
.note { color:#7d4e00; background:#fff8c5; border:1px solid #eed888; border-radius:6px;
  padding:6px 12px; font-size:13.5px; }
ul.notes { font-size:13.5px; color:#7d4e00; }
details { margin:4px 0 16px; font-size:14px; } summary { cursor:pointer; color:var(--accent); }
pre.config { background:var(--bg2); border:1px solid var(--line); border-radius:6px;
  padding:12px 16px; font-size:12.5px; line-height:1.4; overflow:auto; max-height:640px; }
footer { color:var(--muted); font-size:12.5px; padding:24px; border-top:1px solid var(--line);
  margin-top:40px; }
"""

# Records page errors and checks that every image loaded, into #dtrak-check (read by tests).
_CHECK_SCRIPT = """
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push(e.message || ("failed to load " + (t && (t.src || t.href) || "?")));
  }, true);
  var origError = console.error;
  console.error = function () {
    errors.push(Array.prototype.join.call(arguments, " "));
    return origError.apply(console, arguments);
  };
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images);
    var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
    var el = document.getElementById("dtrak-check");
    el.setAttribute("data-images-ok", (imgs.length - bad.length) + "/" + imgs.length);
    el.setAttribute("data-broken", JSON.stringify(bad.map(function (i) { return i.src; })));
    el.setAttribute("data-errors", JSON.stringify(errors));
    el.setAttribute("data-status", "done");
  });
})();
"""


def _version() -> str:
    try:
        return metadata.version("dtrak")
    except metadata.PackageNotFoundError:
        return "?"


def _header(rep: _Report, sections: Sequence[_Section]) -> str:
    name = rep.config.get("name") or rep.run.root.name
    made = dt.datetime.fromtimestamp(rep.run.config.stat().st_mtime).astimezone() \
        if rep.run.config.is_file() else None
    now = dt.datetime.now().astimezone()
    when = f"run made {made:%Y-%m-%d %H:%M %Z} · " if made else ""
    nav = "".join(f'<a href="#{s.id}">{_esc(s.title)}</a>' for s in sections)
    notes = "".join(f"<li>{_esc(n)}</li>" for n in rep.notes)
    notes = f'<ul class="notes">{notes}</ul>' if notes else ""
    return (f'<header><h1>dtrak report · <span class="run">{_esc(name)}</span></h1>'
            f'<p class="meta">{when}report written {now:%Y-%m-%d %H:%M %Z} · run folder '
            f"<code>{_esc(rep.run.root.resolve())}</code></p>{notes}<nav>{nav}</nav></header>")


def _page(rep: _Report, sections: Sequence[_Section]) -> str:
    name = rep.config.get("name") or rep.run.root.name
    body = "".join(f'<section id="{s.id}"><h2>{_esc(s.title)}</h2>{s.body}</section>'
                   for s in sections)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>dtrak report · {_esc(name)}</title><style>{_STYLE}</style>"
            f"<script>{_CHECK_SCRIPT}</script></head><body>{_header(rep, sections)}"
            f"<main>{body}</main><footer>Written by dtrak {_esc(_version())} from the saved "
            "artefacts of the run; nothing was recomputed. Figures are PNG files beside this "
            'page.</footer><div id="dtrak-check" hidden data-status="pending"></div>'
            "</body></html>\n")


def _prepare_out(out: Path) -> None:
    """Create RUN/report/, removing the PNG figures of an earlier report."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()


def write_report(
    run_dir: str | Path,
    train_images: np.ndarray | None = None,
    val_images: np.ndarray | None = None,
    n_gallery: int = 4,
    methods: Sequence[str] = ("trak", "dtrak"),
    out_dir: str | Path | None = None,
) -> Path:
    """Write ``RUN/report/index.html`` (and its PNG figures) from the run's saved artefacts.

    Args:
        run_dir: the run directory.
        train_images: ``[N, C, H, W]`` in [-1, 1], the training set in the order of the score
            columns; None skips the galleries (with a note).
        val_images: ``[V, C, H, W]`` in [-1, 1], the validation targets in the order of the
            score rows; None skips the validation galleries.
        n_gallery: galleries per target set (the first n generated, then the first n
            validation targets).
        methods: the methods shown side by side in the galleries (and first in the tables).
        out_dir: where the page and its figures go (default ``RUN/report``; another folder
            leaves the run untouched, e.g. a read-only one).

    Returns:
        The path of index.html.
    """
    run = RunPaths(Path(run_dir))
    if not run.root.is_dir():
        raise FileNotFoundError(f"run directory {run.root} does not exist; pass a run folder "
                                "made by `dtrak run`")
    out = Path(out_dir) if out_dir is not None else run.report
    if out_dir is None and not os.access(run.root, os.W_OK):
        raise PermissionError(f"cannot write the report into the read-only run {run.root}; "
                              "write it elsewhere: dtrak report RUN --to DIR")
    _prepare_out(out)
    rep = _Report(run, out, _read_json(run.config) or {})
    sections = [
        _summary_section(rep),
        _samples_section(rep),
        _lds_section(rep, methods),
        _gallery_section(rep, train_images, val_images, n_gallery, methods),
        _cf_section(rep),
        _config_section(rep),
    ]
    path = out / "index.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(_page(rep, sections), encoding="utf-8")
    tmp.replace(path)
    log.info("wrote report %s", path)
    return path

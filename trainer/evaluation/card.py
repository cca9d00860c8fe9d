"""The model card: a self-contained HTML report (figures embedded as base64 PNG) written into the package.

It shows what model.json records, for people: the summary per artifact, the confusion matrix, the
reliability diagram before and after temperature scaling, the robustness heatmap (corruption by
severity), per-slice accuracy bars, the drift reference, the gate and the data manifest summary.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.package import ModelManifest
from edge_agent.package_evaluation import Evaluation, SliceScore
from edge_agent.reference import ReferenceStats

CARD = "card.html"

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:0}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.muted{color:#777}
.fail{color:#b00;font-weight:bold}.pass{color:#070}img{max-width:100%}
"""


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _e(x: object) -> str:
    return html.escape(str(x))


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if str(c).startswith('<') else _e(c)}</td>" for c in r) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def confusion_figure(cm: Sequence[Sequence[int]], labels: Sequence[str], title: str) -> str:
    import matplotlib.pyplot as plt

    a = np.asarray(cm)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * n, 1 + 0.5 * n))
    ax.imshow(a, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if a[i, j]:
                    ax.text(
                        j,
                        i,
                        str(a[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if a[i, j] > a.max() / 2 else "black",
                    )
    return _png(fig)


def reliability_figure(
    before: Mapping[str, Any], after: Mapping[str, Any], ece_before: float, ece_after: float
) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, r, title in (
        (axes[0], before, f"before (T=1): ECE {_pct(ece_before)}"),
        (axes[1], after, f"after: ECE {_pct(ece_after)}"),
    ):
        edges = np.asarray(r["edges"])
        centres = (edges[:-1] + edges[1:]) / 2
        count = np.asarray(r["count"])
        acc = np.where(count > 0, r["accuracy"], np.nan)
        ax.bar(centres, acc, width=edges[1] - edges[0], edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
        ax.set_xlabel("confidence")
        ax.set_title(title)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    return _png(fig)


def robustness_figure(rob: Mapping[str, Any], model: str) -> str:
    import matplotlib.pyplot as plt

    acc = rob["models"][model]["accuracy"]
    names = list(acc)
    a = np.array([acc[n] for n in names])
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1.2))
    im = ax.imshow(a, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(len(rob["severities"])), [str(s) for s in rob["severities"]])
    ax.set_xlabel("severity")
    ax.set_title(f"accuracy under corruption: {model}")
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            ax.text(j, i, f"{100 * a[i, j]:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _png(fig)


def slices_figure(slices: Mapping[str, Mapping[str, SliceScore]], title: str) -> str:
    import matplotlib.pyplot as plt

    bars = [(f"{k}={v}", s.accuracy, s.images) for k, vals in slices.items() for v, s in vals.items()]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(bars) + 1.2))
    ax.barh(range(len(bars)), [b[1] for b in bars], color="#4a7ab5")
    ax.set_yticks(range(len(bars)), [f"{b[0]} (n={b[2]})" for b in bars])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title(title)
    return _png(fig)


def render_card(manifest: ModelManifest, evaluation: Evaluation, reference: ReferenceStats | None) -> str:
    """The HTML text of the card: summary, gate, confusion, calibration, robustness, slices, drift
    reference, data and training, each section from its own function."""
    ev = evaluation
    device = ev.device_artifact
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(manifest.name)} {_e(manifest.version)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(manifest.name)} {_e(manifest.version)}</h1>",
        f"<p class='muted'>created {_e(manifest.created)} &middot; {len(manifest.labels)} classes &middot; "
        f"temperature {manifest.temperature:.3f} &middot; devices run <b>{_e(device)}</b></p>",
        *_summary_section(ev),
        *_gate_section(ev),
        *_device_section(ev, manifest.labels),
        *_calibration_section(ev),
        *_other_sections(ev, manifest, reference),
        "</body></html>",
    ]
    return "\n".join(parts)


def _summary_section(ev: Evaluation) -> list[str]:
    models = ev.models
    parts = ["<h2>Summary (test split)</h2>"]
    rob = ev.robustness
    rows = []
    for key, r in models.items():
        mca = rob["models"][key]["mean_corruption_accuracy"] if rob and key in rob["models"] else None
        rows.append(
            [
                key,
                r.images,
                _pct(r.accuracy),
                _pct(ev.heldout_accuracy.get(key)),
                _pct(r.macro_f1),
                _pct(r.ece),
                _pct(mca),
            ]
        )
    parts.append(
        _table(
            [
                "model",
                "test images",
                "accuracy",
                "held-out accuracy (val+test)",
                "macro F1",
                "ECE",
                "mean corruption acc.",
            ],
            rows,
        )
    )
    return parts


def _gate_section(ev: Evaluation) -> list[str]:
    parts: list[str] = []
    gate = ev.gate
    if gate:
        parts.append("<h2>Gate</h2>")
        if ev.champion:
            ch = ev.champion
            parts.append(
                f"<p>champion: {_e(ch['name'])} {_e(ch['version'])} (test accuracy {_pct(ch['device']['accuracy'])})</p>"
            )
        parts.append(
            _table(
                ["rule", "result", "detail"],
                [
                    [
                        r.rule,
                        f"<span class='{'pass' if r.passed else 'fail'}'>{'pass' if r.passed else 'FAIL'}</span>",
                        r.detail,
                    ]
                    for r in gate.rules
                ],
            )
        )
    return parts


def _device_section(ev: Evaluation, labels: list[str]) -> list[str]:
    device, models = ev.device_artifact, ev.models
    d = models[device]
    parts = [
        "<h2>Confusion matrix</h2>",
        confusion_figure(d.confusion, labels, f"{device}, test split"),
    ]
    parts.append(
        _table(
            ["class", "precision", "recall", "F1", "support"],
            [
                [lab, _pct(c.precision), _pct(c.recall), _pct(c.f1), c.support]
                for lab, c in d.per_class.items()
            ],
        )
    )
    return parts


def _calibration_section(ev: Evaluation) -> list[str]:
    cal = ev.calibration
    return [
        "<h2>Calibration</h2>",
        f"<p>Temperature {cal['temperature']:.3f} fitted on {cal['fitted_on']} ({cal['fit_images']} images) by NLL; "
        f"torch fp32 on the test split: ECE {_pct(cal['test']['ece_before'])} &rarr; {_pct(cal['test']['ece_after'])}, "
        f"NLL {cal['test']['nll_before']:.3f} &rarr; {cal['test']['nll_after']:.3f}.</p>",
        reliability_figure(
            cal["reliability_before"],
            cal["reliability_after"],
            cal["test"]["ece_before"],
            cal["test"]["ece_after"],
        ),
    ]


def _added_section(added: dict[str, Any] | None, labels: list[str]) -> list[str]:
    """The training-set diff against the champion: images per device (or source) and class, labellers."""
    if not added:
        return []
    head = f"<h3>Added since the champion ({_e(added['champion'])})</h3>"
    if "note" in added:
        return [head, f"<p class='muted'>{_e(added['note'])}</p>"]
    rows = [
        [dev, *(per.get(lab, 0) for lab in labels), sum(per.values())]
        for dev, per in added["by_device"].items()
    ]
    parts = [
        head,
        f"<p>{added['images']} images added, {added['removed']} removed.</p>",
        _table(["device / source", *labels, "total"], rows),
    ]
    if added.get("labellers"):
        parts.append(_table(["labeller", "labels"], list(added["labellers"].items())))
    return parts


def _other_sections(ev: Evaluation, manifest: ModelManifest, reference: ReferenceStats | None) -> list[str]:
    """Robustness, slices, the drift reference, the data and the training settings."""
    device, rob = ev.device_artifact, ev.robustness
    d = ev.device_report()
    parts: list[str] = []
    if rob:
        parts += [
            f"<h2>Robustness</h2><p>{rob['images']} test images per corruption and severity (ImageNet-C corruptions, "
            "same corrupted frames for every model).</p>",
            robustness_figure(rob, device),
        ]
    if d.slices:
        parts += ["<h2>Slices</h2>", slices_figure(d.slices, f"{device}: accuracy per slice (test split)")]
    if reference is not None:
        parts += [
            "<h2>Drift reference</h2>",
            f"<p>{reference.images} held-out images through {_e(reference.artifact)} with the edge preprocessing: "
            f"accuracy {_pct(reference.accuracy)}, mean confidence {_pct(reference.mean_confidence)}, "
            f"ATC threshold {reference.atc_threshold if reference.atc_threshold is not None else 'n/a'}.</p>",
            _table(
                ["class", "prior"], [[lab, _pct(p)] for lab, p in zip(manifest.labels, reference.class_prior)]
            ),
        ]
    data = ev.dataset
    parts += [
        "<h2>Data</h2>",
        f"<p>{_e(data['origin'])}: {data['images']} images, {data['skipped']} skipped; split fractions "
        f"{_e(data['split_fractions'])} by content hash.</p>",
        _table(
            ["class", *data["per_split"]],
            [[lab, *(data["per_split"][s][lab] for s in data["per_split"])] for lab in manifest.labels],
        ),
        _table(["source", "images"], list(data["sources"].items())),
        _table(["licence / consent", "images"], list(data["licences"].items())),
        *_added_section(data.get("added_since_champion"), manifest.labels),
    ]
    tr = ev.training
    if tr:
        parts += [
            "<h2>Training</h2>",
            _table(["setting", "value"], [[k, v] for k, v in tr.items() if not isinstance(v, (dict, list))]),
        ]
    return parts


def write_card(
    root: Path, manifest: ModelManifest, evaluation: Evaluation, reference: ReferenceStats | None
) -> Path:
    """Write ``card.html`` into the package directory ``root``."""
    import matplotlib

    matplotlib.use("Agg")
    path = Path(root) / CARD
    path.write_text(render_card(manifest, evaluation, reference), encoding="utf-8")
    return path

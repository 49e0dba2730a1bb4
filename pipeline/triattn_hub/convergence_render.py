"""Markdown table and PNG curves of a convergence report, for Prefect artifacts and model cards."""

from __future__ import annotations

import logging

import numpy as np

from .convergence_metrics import TOP_FRACTIONS

logger = logging.getLogger(__name__)


def _cell(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict) -> str:
    """Render the convergence section as a Markdown summary table, with the verdict and hint."""
    gate_record = report.get("gate", {})
    lines = [
        f"**Convergence: {report.get('verdict', 'unchecked')}**"
        f" (N* = {report.get('n_star') if report.get('n_star') is not None else 'not reached'})",
        "",
        "| estimate | prompts | cosine mean | cosine p5 | center err p95 | phase err p95 (rad) "
        "| MRL err dominant p95 | Spearman mean | overlap L/16 | overlap L/8 | overlap L/4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    rows = []
    if report.get("split_half"):
        rows.append(("split half", "–", report["split_half"]["metrics"], report["split_half"].get("key_agreement") or {}))
    if report.get("split_interleaved"):
        rows.append(("even/odd sequences", "–", report["split_interleaved"]["metrics"], {}))
    for entry in report.get("online", []):
        rows.append((f"online N={entry['n']}", str(entry["prompts"]), entry["metrics"], entry["key_agreement"]))
    for label, prompts, metrics, agreement in rows:
        overlaps = [_cell(agreement.get(f"overlap_l{f}", {}).get("mean"), 3) for f in TOP_FRACTIONS]
        lines.append(
            f"| {label} | {prompts} | {_cell(metrics['cosine']['mean'])} | {_cell(metrics['cosine']['p5'])} "
            f"| {_cell(metrics['center_rel_error']['p95'])} | {_cell(metrics['phase_error']['p95'])} "
            f"| {_cell(metrics['mrl_error_dominant']['p95'])} | {_cell(agreement.get('spearman', {}).get('mean'))} "
            f"| {' | '.join(overlaps)} |"
        )

    lines.append("")
    for check in gate_record.get("checks", []):
        mark = "passed" if check["passed"] else "FAILED"
        lines.append(f"- {check['name']}: {_cell(check['value'])} (limit {check['limit']}) {mark}")
    se = report.get("standard_error", {}).get("relative_se", {})
    lines.append(f"- relative SE of the centers: mean {_cell(se.get('mean'))}, max {_cell(se.get('max'))}")
    if gate_record.get("failing_head_count"):
        listed = ", ".join(f"{h['layer']}/{h['head']}" for h in gate_record["failing_heads"])
        lines.append(
            f"- {gate_record['failing_head_count']} failing (layer/head) pairs in layers "
            f"{gate_record['failing_layers']}: {listed}"
        )
    if gate_record.get("hint"):
        lines.append(f"- hint: {gate_record['hint']}")
    return "\n".join(lines) + "\n"


def plot_curves(report: dict, path) -> str | None:
    """Plot cosine p5, Spearman and top-L/8 overlap against N with the split-half floor as a PNG.

    Returns the path written, or None (with a warning logged) when matplotlib is not installed
    or the report has no online estimates.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed, so no convergence plot is written. Install triattn-hub[calibrate].")
        return None
    online = report.get("online") or []
    if not online:
        logger.warning("the convergence report has no online estimates, so no plot is written")
        return None
    n = [entry["n"] for entry in online]
    split_half = report.get("split_half") or {}
    panels = [
        ("cosine p5", [e["metrics"]["cosine"]["p5"] for e in online], (split_half.get("metrics") or {}).get("cosine", {}).get("p5")),
        ("Spearman mean", [e["key_agreement"]["spearman"]["mean"] for e in online],
         (split_half.get("key_agreement") or {}).get("spearman", {}).get("mean")),
        ("top-L/8 overlap mean", [e["key_agreement"]["overlap_l8"]["mean"] for e in online],
         (split_half.get("key_agreement") or {}).get("overlap_l8", {}).get("mean")),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), constrained_layout=True)
    for axis, (title, values, floor) in zip(axes, panels):
        axis.plot(n, [np.nan if v is None else v for v in values], marker="o", label="online (mean over prompts)")
        if floor is not None:
            axis.axhline(floor, color="grey", linestyle="--", label="split-half floor")
        if report.get("n_star") is not None:
            axis.axvline(report["n_star"], color="green", linestyle=":", label="N*")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("prefill tokens N")
        axis.set_title(title)
    axes[0].legend(fontsize="small")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)

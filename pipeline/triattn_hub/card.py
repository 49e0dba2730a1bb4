"""The hub's dataset card: README.md with YAML front matter, rendered from the index."""

from __future__ import annotations


def render_card(index: dict, *, title: str = "TriAttention calibrations") -> str:
    """Return a dataset card listing every model, its versions, token counts and verdicts."""
    lines = [
        "---",
        "license: apache-2.0",
        "pretty_name: " + title,
        "tags:",
        "- triattention",
        "- kv-cache",
        "- calibration",
        "viewer: false",
        "---",
        "",
        f"# {title}",
        "",
        "Per-head, per-band statistics of pre-RoPE queries (Q-centers E[q_f], mean magnitudes E|q_f|, "
        "omega) for TriAttention KV-cache compression, written by triattn-hub. "
        "Fetch one with `triattn-hub fetch MODEL_ID`.",
        "",
        "| model | version | created | tokens | corpus | convergence | private |",
        "|---|---|---|---:|---|---|---|",
    ]
    for model_id in sorted(index["models"]):
        model = index["models"][model_id]
        for version in sorted(model["versions"], key=lambda v: int(v[1:]), reverse=True):
            entry = model["versions"][version]
            corpus = entry.get("corpus", {})
            corpus_name = corpus.get("version") or corpus.get("kind") or "?"
            marker = " (latest)" if version == model["latest"] else ""
            lines.append(
                f"| `{model_id}` | {version}{marker} | {entry['created'][:10]} | {entry['token_count']:,} "
                f"| {corpus_name} | {entry.get('convergence', 'unchecked')} | {'yes' if entry.get('private') else 'no'} |"
            )
    if not index["models"]:
        lines.append("| (none yet) | | | | | | |")
    lines.append("")
    return "\n".join(lines)

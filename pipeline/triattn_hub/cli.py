"""The `triattn-hub` command line: calibrate, fetch and report.

Heavy modules (mlx, prefect, datasets) are imported inside the commands that need them, so
`triattn-hub fetch` starts fast and runs where mlx is not installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .errors import TriattnHubError

logger = logging.getLogger("triattn_hub")


def _add_calibrate(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="calibrate a model and publish the result to a hub",
        description="Run the calibration flow (pull, calibrate, write, publish) in Prefect's local ephemeral mode.",
    )
    parser.add_argument("model_id", help="upstream model id recorded in the artifact, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--from", dest="source", metavar="PATH", help="load the model from this directory, .gguf file, or package:NAME (the GGUF file an installed Python package ships) instead of the Hub")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) to download; recorded as the model revision")
    parser.add_argument("--corpus", default="builtin", metavar="SPEC", help="calibration corpus: builtin[:VERSION], a text file path, or hf:DATASET[:CONFIG]@REVISION#split=S&column=C (default: builtin)")
    parser.add_argument("--hub", metavar="HUB", help="hub to publish to: a directory or hf://datasets/ORG/NAME (default: first entry of $TRIATTN_HUB, else the local default hub)")
    parser.add_argument("--private", action="store_true", default=None, help="mark the model private; its calibration then goes to private hubs only")
    parser.add_argument("--sequence-length", type=int, metavar="TOKENS", help="tokens per calibration sequence (default: the model's context, at most 8192)")
    parser.add_argument("--chunk-size", type=int, default=512, metavar="TOKENS", help="tokens per forward pass through the KV cache (default: 512)")
    parser.add_argument("--allow-unconverged", action="store_true", help="publish even if the convergence gate fails; the manifest is marked so that clients warn")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.set_defaults(run=_run_calibrate)


def check_calibrate_arguments(args) -> None:
    """Raise a TriattnHubError for a --from path or --corpus spec that cannot work.

    Runs before the Prefect flow starts, so a typo fails in a second instead of after the
    model has loaded.
    """
    from pathlib import Path

    from .corpus import check_corpus_spec
    from .errors import ModelSourceError
    from .sources import PACKAGE_PREFIX

    if args.source and not args.source.startswith(PACKAGE_PREFIX) and not Path(args.source).expanduser().exists():
        raise ModelSourceError(f"model source {args.source!r} does not exist; pass a model directory, a .gguf file or package:NAME")
    check_corpus_spec(args.corpus)


def _run_calibrate(args) -> int:
    import os

    check_calibrate_arguments(args)
    # The temporary Prefect server would report usage to Prefect over the network; calibration
    # runs offline unless the user sets these themselves.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from .flows import calibrate_flow

    summary = calibrate_flow(
        model_id=args.model_id,
        source=args.source,
        revision=args.revision,
        corpus=args.corpus,
        hub=args.hub,
        private=args.private,
        sequence_length=args.sequence_length,
        chunk_size=args.chunk_size,
        progress=args.progress,
        allow_unconverged=args.allow_unconverged,
    )
    state = "published" if summary["created"] else "already published (identical inputs), nothing new written"
    print(
        f"{summary['model_id']} {summary['version']}: {state}\n"
        f"  hub:      {summary['hub']}\n"
        f"  location: {summary['location']}\n"
        f"  tokens:   {summary['token_count']} in {summary['seconds']} s ({summary['tokens_per_second']} tokens/s, "
        f"{summary['compute_dtype']}, BLAS {summary['blas']})\n"
        f"  layers:   {summary['calibrated_layers']} calibrated\n"
        f"  convergence: {summary['convergence']} (N* = {summary['n_star'] or 'not reached'}, "
        f"check took {summary['convergence_seconds']} s)",
        file=sys.stderr,
    )
    return 0


def _add_fetch(subparsers) -> None:
    from .exports import FORMATS, NATIVE, PAIRINGS

    parser = subparsers.add_parser(
        "fetch",
        help="resolve a calibration by model id and print the path of its calibration.safetensors",
        description=(
            "Search the hubs in order, verify the artifact's sha256 and manifest, and print its local path on stdout. "
            "Hub tokens come from $HF_TOKEN, the login stored by `hf auth login`, or the GitHub Actions OIDC exchange."
        ),
    )
    parser.add_argument("model_id", help="model id, matched in full, e.g. google/gemma-4-31b-it")
    parser.add_argument("--version", help="artifact version such as v2 (default: the latest)")
    parser.add_argument("--hub", action="append", metavar="HUB", help="hub to search: a directory or hf://datasets/ORG/NAME (repeatable, searched in order; default: $TRIATTN_HUB, else the local default hub then the public hub)")
    parser.add_argument("--endpoint", metavar="URL", help="Hugging Face Hub endpoint (default: $HF_ENDPOINT, else https://huggingface.co)")
    parser.add_argument("--lock", metavar="FILE", help="lockfile: reuse the hub, commit and version it records for this model, or record them there")
    parser.add_argument("--model-path", metavar="DIR", help="local model directory whose config.json and README.md declare the base model, for the base-model fallback (default: read them from the model's Hub repo)")
    parser.add_argument("--output", metavar="DIR", help="write the calibration into DIR in --format")
    parser.add_argument("--format", dest="export_format", choices=FORMATS, default=NATIVE, help="format written into --output: native (calibration.safetensors + manifest.json), mlx-vlm (the file of MLX-VLM pull request 985) or triattention-npz (the .npz of the TriAttention MLX loader); default: native")
    parser.add_argument("--check-model", metavar="SOURCE", help="also check the calibration's omega and geometry against the live model loaded from SOURCE (a model directory, .gguf file or package:NAME); imports mlx")
    parser.add_argument("--pairing", choices=PAIRINGS, help="RoPE pairing of the mlx-vlm format: rope (the model's true bands) or pr985 (what the published pull request computes); required with --format mlx-vlm")
    parser.set_defaults(run=_run_fetch)


def _run_fetch(args) -> int:
    from .client import fetch

    resolved = fetch(
        args.model_id,
        version=args.version,
        hubs=args.hub,
        output=args.output,
        endpoint=args.endpoint,
        lock=args.lock,
        model_path=args.model_path,
        export_format=args.export_format,
        pairing=args.pairing,
    )
    for warning in resolved.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.check_model:
        from .client import check_against_model

        check_against_model(resolved, args.check_model)
        print(f"{resolved.model_id} {resolved.version}: omega and geometry match the model from {args.check_model}", file=sys.stderr)
    for path in resolved.exported if args.export_format != "native" else [resolved.path]:
        print(path)
    return 0


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="print the convergence table of a published calibration",
        description="Fetch a calibration (as `fetch` does) and print the convergence section of its manifest as a table.",
    )
    parser.add_argument("model_id", help="model id, matched in full")
    parser.add_argument("--version", help="artifact version such as v2 (default: the latest)")
    parser.add_argument("--hub", action="append", metavar="HUB", help="hub to search (repeatable, searched in order; default as for fetch)")
    parser.add_argument("--endpoint", metavar="URL", help="Hugging Face Hub endpoint (default: $HF_ENDPOINT, else https://huggingface.co)")
    parser.set_defaults(run=_run_report)


def _run_report(args) -> int:
    from .client import fetch
    from .convergence_render import render_markdown

    resolved = fetch(args.model_id, version=args.version, hubs=args.hub, endpoint=args.endpoint)
    convergence = resolved.manifest.get("convergence")
    print(f"# {resolved.model_id} {resolved.version} ({resolved.hub})\n")
    if not convergence or convergence.get("verdict") == "unchecked":
        print("This calibration has no convergence check in its manifest.")
        return 0
    print(render_markdown(convergence))
    if convergence.get("published_unconverged"):
        print("\nPublished although it failed the convergence gate.")
    for warning in resolved.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triattn-hub", description="Calibrate, publish and fetch TriAttention Q-center statistics.")
    parser.add_argument("--version", action="version", version=f"triattn-hub {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_calibrate(subparsers)
    _add_fetch(subparsers)
    _add_report(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except TriattnHubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (for example `| head`): stop quietly, as Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())

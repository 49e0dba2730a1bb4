"""The nightly flow, which keeps every catalog model calibrated, and the commands GitHub Actions runs.

`nightly_flow` loads the catalog, queries the Hugging Face Hub for each model's current revision
and runs the discovery rules. It compares every model with its hub's index (discovery.py), then
calibrates each model that needs it as its own run of the `calibrate` flow and publishes it.
It ends with a markdown artifact `nightly-summary` listing what was calibrated, skipped and
failed, with the reasons. One model failing does not stop the others, and the run ends
Failed if any model failed.

A calibration is first written to `work_dir/{candidate key}` (see staging.py) and published
from there. The key covers the weights, corpus text, settings and calibrator version, so a
retried run whose calibration finished but whose publish failed publishes the stored result
instead of calibrating again. Models published by the failed run are skipped by the hub
comparison.

Command line (GitHub Actions runs these in separate jobs, so only `publish` needs a token):

  python -m triattn_hub.nightly discover [--catalog FILE] [--json]
  python -m triattn_hub.nightly calibrate-one --candidate JSON --output DIR
  python -m triattn_hub.nightly publish DIR [DIR ...] [--hub HUB] [--summary FILE]
  python -m triattn_hub.nightly run [--catalog FILE]
"""

from __future__ import annotations

# Imported first: it selects the fast CPU BLAS, which works only before mlx is imported.
from .flows import calibrate_flow  # noqa: I001

import argparse
import inspect
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.states import Completed, Failed
from prefect.tasks import exponential_backoff

from .catalog import Catalog, load_catalog, source_path
from .discovery import (
    CALIBRATE,
    FAILED,
    SKIP,
    UNSUPPORTED,
    Candidate,
    Decision,
    candidate_from_spec,
    candidates_from_rule,
    compare_with_hub,
    route_private,
)
from .errors import AccessDeniedError, CatalogError, HubError, OfflineError, TriattnHubError, UnsupportedModelError
from .nightly_state import new_record, open_state, state_key
from .staging import is_complete, read_unpublished
from .tokens import hf_token

logger = logging.getLogger(__name__)

SUMMARY_ARTIFACT = "nightly-summary"
CANDIDATE_FILE = "candidate.json"
OUTCOME_FILE = "outcome.json"
# Outcome names in the summary, in table order.
CALIBRATED = "calibrated"
PLANNED = "planned"
OUTCOME_ORDER = (CALIBRATED, FAILED, UNSUPPORTED, PLANNED, SKIP)


def default_work_dir() -> Path:
    """Return $XDG_CACHE_HOME/triattn-hub/nightly (~/.cache/... by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "triattn-hub" / "nightly"


# --- retries ----------------------------------------------------------------------------------


def is_transient(exc: BaseException) -> bool:
    """Return True for errors that a later attempt may not hit: timeouts, lost connections, HTTP 429 and 5xx."""
    if isinstance(exc, (OfflineError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, (AccessDeniedError, TriattnHubError)):
        return False
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return exc.response.status_code == 429 or exc.response.status_code >= 500
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry a failed network task only for a transient error."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


NETWORK_RETRIES = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_policy=NONE,
)


# --- planning ---------------------------------------------------------------------------------


def _api(endpoint: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=hf_token())


@task(name="resolve-model", **NETWORK_RETRIES)
def resolve_model(spec, state_address: str | None, endpoint: str | None) -> Decision:
    """Resolve one catalog model: its current revision and weights, or why it is skipped."""
    return candidate_from_spec(spec, api=_api(endpoint), state=open_state(state_address), corpus_cache={})


@task(name="discover", **NETWORK_RETRIES)
def run_rule(rule, catalog: Catalog, state_address: str | None, endpoint: str | None, exclude: set) -> list[Decision]:
    """Run one discovery rule against the Hub."""
    return candidates_from_rule(rule, catalog, api=_api(endpoint), state=open_state(state_address), corpus_cache={}, exclude=exclude)


@task(name="compare-with-hub", **NETWORK_RETRIES)
def compare(decisions: list[Decision], endpoint: str | None) -> list[Decision]:
    """Skip every model whose hub already has a current calibration."""
    hubs: dict = {}
    token = hf_token()
    return [compare_with_hub(decision, hubs=hubs, token=token, endpoint=endpoint) for decision in decisions]


def plan(catalog: Catalog, *, state_address: str | None, endpoint: str | None, only: list[str] | None = None) -> list[Decision]:
    """Return a decision for every catalog model and every model the discovery rules find."""
    decisions = []
    for spec in catalog.models:
        if only and spec.model_id not in only:
            continue
        try:
            decision = resolve_model(spec, state_address, endpoint)
        except Exception as exc:  # noqa: BLE001  (one model's failure must not stop the others)
            logger.error("resolving %s failed: %s: %s", spec.model_id, type(exc).__name__, exc)
            decision = Decision(spec.model_id, FAILED, f"{type(exc).__name__}: {exc}", "catalog")
        decisions.append(route_private(decision, catalog))

    listed = {spec.model_id for spec in catalog.models}
    for rule in catalog.discovery:
        try:
            found = run_rule(rule, catalog, state_address, endpoint, listed)
        except Exception as exc:  # noqa: BLE001
            logger.error("discovery rule %s failed: %s: %s", rule.name, type(exc).__name__, exc)
            decisions.append(Decision(f"(rule {rule.name})", FAILED, f"{type(exc).__name__}: {exc}", f"discovery:{rule.name}"))
            continue
        for decision in found:
            if only and decision.model_id not in only:
                continue
            if decision.model_id in {d.model_id for d in decisions}:
                continue  # two rules found the same model; the first one keeps it
            decisions.append(decision)

    try:
        return compare(decisions, endpoint)
    except Exception as exc:  # noqa: BLE001
        logger.error("reading the hub index failed: %s: %s", type(exc).__name__, exc)
        reason = f"reading the hub index failed: {type(exc).__name__}: {exc}"
        return [Decision(d.model_id, FAILED, reason, d.origin, d.candidate) if d.action == CALIBRATE else d for d in decisions]


# --- calibrating and publishing -----------------------------------------------------------------


def flow_parameters(candidate: Candidate, output: str) -> dict:
    """Return the calibrate flow's keyword arguments for a candidate, writing to `output`.

    Raises CatalogError for a catalog setting that is not a parameter of the calibrate flow.
    """
    accepted = set(inspect.signature(calibrate_flow.fn).parameters)
    unknown = sorted(set(candidate.settings) - accepted)
    if unknown:
        raise CatalogError(
            f"{candidate.model_id}: settings {unknown} are not parameters of the calibrate flow; "
            f"remove them from the catalog (accepted: {', '.join(sorted(accepted))})"
        )
    return {
        "model_id": candidate.model_id,
        "source": source_path(candidate.source),
        "revision": candidate.revision,
        "corpus": candidate.corpus,
        "private": candidate.private,
        "progress": False,
        **candidate.settings,
        "output": output,
    }


@task(name="publish-calibration", **NETWORK_RETRIES)
def publish_directory(directory: str, hub_address: str, private: bool) -> dict:
    """Publish an unpublished calibration directory to `hub_address` and return where it went."""
    from .hub import open_hub
    from .privacy import publish_target

    address = publish_target(hub_address, private)
    tensors, manifest = read_unpublished(directory)
    hub = open_hub(address, token=hf_token()) if address.startswith("hf://") else open_hub(address)
    result = hub.publish(tensors, manifest)
    return {"version": result.version, "created": result.created, "location": result.location, "hub": address}


def calibrate_and_publish(candidate: Candidate, work_dir: Path) -> dict:
    """Calibrate one candidate (unless work_dir contains its finished calibration) and publish it.

    Returns {"version", "created", "location", "hub", "reused"}. Removes the work directory
    once the hub contains the calibration.
    """
    run_logger = get_run_logger()
    directory = work_dir / candidate.key()
    reused = is_complete(directory)
    if reused:
        run_logger.info("%s: publishing the finished calibration in %s without calibrating again", candidate.model_id, directory)
    else:
        if directory.exists():
            shutil.rmtree(directory)
        named = calibrate_flow.with_options(flow_run_name=f"nightly {candidate.model_id}")
        named(**flow_parameters(candidate, str(directory)))
    outcome = publish_directory(str(directory), candidate.hub, bool(candidate.private))
    shutil.rmtree(directory, ignore_errors=True)
    return {**outcome, "reused": reused}


# --- the summary --------------------------------------------------------------------------------


def _cell(text) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def render_summary(rows: list[dict]) -> str:
    """Return the markdown summary: counts, then one table row per model."""
    counts = {name: sum(1 for row in rows if row["outcome"] == name) for name in OUTCOME_ORDER}
    planned = f"{counts[PLANNED]} planned, " if counts[PLANNED] else ""
    lines = [
        "# Nightly calibration",
        "",
        f"{counts[CALIBRATED]} calibrated, {counts[FAILED]} failed, {counts[UNSUPPORTED]} newly found unsupported, "
        f"{planned}{counts[SKIP]} skipped.",
        "",
        "| model | outcome | detail | origin |",
        "| --- | --- | --- | --- |",
    ]
    ordered = sorted(rows, key=lambda row: (OUTCOME_ORDER.index(row["outcome"]), row["model_id"]))
    for row in ordered:
        lines.append(f"| {_cell(row['model_id'])} | {row['outcome']} | {_cell(row['detail'])} | {_cell(row['origin'])} |")
    return "\n".join(lines) + "\n"


def decision_row(decision: Decision) -> dict:
    """Return a summary row; a model still to calibrate is "planned"."""
    if decision.action == CALIBRATE:
        return {"model_id": decision.model_id, "outcome": PLANNED, "detail": "needs calibrating", "origin": decision.origin}
    return {"model_id": decision.model_id, "outcome": decision.action, "detail": decision.reason, "origin": decision.origin}


# --- the flow -----------------------------------------------------------------------------------


@flow(name="nightly", log_prints=False)
def nightly_flow(
    catalog: str | None = None,
    state: str | None = None,
    work_dir: str | None = None,
    hf_endpoint: str | None = None,
    only: list[str] | None = None,
    max_models: int | None = None,
    dry_run: bool = False,
):
    """Calibrate and publish every catalog or discovered model that its hub lacks a current calibration of.

    `catalog` defaults to calibrations/catalog.yaml of the checkout. `state` is where models
    that cannot be calibrated are remembered: "prefect" (Prefect Variables) or a JSON file path
    (default: nightly_state.default_state_path()). `hf_endpoint` is the Hub that discovery and
    the hub comparison query; model downloads use $HF_ENDPOINT, so set both to the same Hub.
    `only` restricts the run to these model ids, `max_models` caps the calibrations of one
    run, and `dry_run` plans without calibrating.
    Returns the summary rows; the run ends Failed if any model failed.
    """
    run_logger = get_run_logger()
    loaded = load_catalog(catalog)
    work = Path(work_dir).expanduser() if work_dir else default_work_dir()
    decisions = plan(loaded, state_address=state, endpoint=hf_endpoint, only=only)
    store = open_state(state)

    rows = []
    started = 0
    for decision in decisions:
        if decision.action != CALIBRATE:
            rows.append(decision_row(decision))
            continue
        candidate = decision.candidate
        if dry_run or (max_models is not None and started >= max_models):
            reason = "dry run" if dry_run else f"max_models={max_models} reached"
            rows.append({**decision_row(decision), "outcome": SKIP, "detail": f"needs calibrating ({reason})"})
            continue
        started += 1
        try:
            outcome = calibrate_and_publish(candidate, work)
        except UnsupportedModelError as exc:
            run_logger.warning("%s cannot be calibrated: %s", candidate.model_id, exc)
            store.put(state_key(candidate.model_id, candidate.weights), new_record(candidate.model_id, candidate.weights, str(exc)))
            rows.append({**decision_row(decision), "outcome": UNSUPPORTED, "detail": str(exc)})
            continue
        except Exception as exc:  # noqa: BLE001  (one model's failure must not stop the others)
            run_logger.error("%s failed: %s: %s", candidate.model_id, type(exc).__name__, exc)
            rows.append({**decision_row(decision), "outcome": FAILED, "detail": f"{type(exc).__name__}: {exc}"})
            continue
        state_word = "published" if outcome["created"] else "already published"
        reused = ", from the finished calibration of an earlier attempt" if outcome["reused"] else ""
        detail = f"{outcome['version']} {state_word} to {outcome['hub']}{reused}"
        rows.append({**decision_row(decision), "outcome": CALIBRATED, "detail": detail, "version": outcome["version"], "reused": outcome["reused"]})

    markdown = render_summary(rows)
    create_markdown_artifact(markdown, key=SUMMARY_ARTIFACT, description="Models calibrated, skipped and failed by this nightly run")
    run_logger.info("\n%s", markdown)
    failed = [row["model_id"] for row in rows if row["outcome"] == FAILED]
    if failed:
        return Failed(message=f"{len(failed)} model(s) failed: {', '.join(failed)}", data=rows)
    return Completed(data=rows)


# --- command line -------------------------------------------------------------------------------


def _candidate_argument(value: str) -> Candidate:
    text = Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value
    try:
        return Candidate.from_json(json.loads(text))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CatalogError(f"--candidate is not a candidate record from `discover --json`: {exc}") from None


def command_discover(args) -> int:
    """Print the models that need calibrating, as JSON for a GitHub Actions matrix or as a table."""
    catalog = load_catalog(args.catalog)
    decisions = plan(catalog, state_address=args.state, endpoint=args.endpoint, only=args.only)
    include = [d.candidate.to_json() for d in decisions if d.action == CALIBRATE]
    if args.public_only:
        include = [c for c in include if not c["private"]]
    if args.max_models is not None:
        include = include[: args.max_models]
    markdown = render_summary([decision_row(d) for d in decisions])
    if args.json:
        others = [decision_row(d) for d in decisions if d.action != CALIBRATE]
        print(json.dumps({"include": include, "others": others}, sort_keys=True))
    else:
        print(markdown)
    if args.summary:
        with open(args.summary, "a", encoding="utf-8") as handle:
            handle.write(markdown)
    return 0


def command_calibrate_one(args) -> int:
    """Calibrate one candidate into --output without publishing."""
    candidate = _candidate_argument(args.candidate)
    output = Path(args.output)
    try:
        calibrate_flow(**flow_parameters(candidate, str(output)))
    except UnsupportedModelError as exc:
        output.mkdir(parents=True, exist_ok=True)
        (output / OUTCOME_FILE).write_text(json.dumps({"action": UNSUPPORTED, "reason": str(exc)}) + "\n", encoding="utf-8")
        print(f"{candidate.model_id} cannot be calibrated: {exc}", file=sys.stderr)
    (output / CANDIDATE_FILE).write_text(json.dumps(candidate.to_json(), sort_keys=True) + "\n", encoding="utf-8")
    return 0


def command_publish(args) -> int:
    """Publish calibration directories written by calibrate-one, and record unsupported models."""
    store = open_state(args.state)
    rows = []
    for directory in args.directories:
        directory = Path(directory)
        candidate = _candidate_argument(f"@{directory / CANDIDATE_FILE}")
        row = {"model_id": candidate.model_id, "origin": candidate.origin}
        outcome_path = directory / OUTCOME_FILE
        if outcome_path.is_file():
            reason = json.loads(outcome_path.read_text(encoding="utf-8"))["reason"]
            store.put(state_key(candidate.model_id, candidate.weights), new_record(candidate.model_id, candidate.weights, reason))
            rows.append({**row, "outcome": UNSUPPORTED, "detail": reason})
            continue
        try:
            outcome = publish_directory(str(directory), args.hub or candidate.hub, bool(candidate.private))
        except (TriattnHubError, OSError) as exc:
            logger.error("publishing %s from %s failed: %s", candidate.model_id, directory, exc)
            rows.append({**row, "outcome": FAILED, "detail": f"{type(exc).__name__}: {exc}"})
            continue
        state_word = "published" if outcome["created"] else "already published"
        rows.append({**row, "outcome": CALIBRATED, "detail": f"{outcome['version']} {state_word} to {outcome['hub']}"})
    markdown = render_summary(rows)
    print(markdown)
    if args.summary:
        with open(args.summary, "a", encoding="utf-8") as handle:
            handle.write(markdown)
    return 1 if any(row["outcome"] == FAILED for row in rows) else 0


def command_run(args) -> int:
    """Run the nightly flow in this process (Prefect's ephemeral mode unless PREFECT_API_URL is set)."""
    state = nightly_flow(
        catalog=args.catalog, state=args.state, work_dir=args.work_dir, hf_endpoint=args.endpoint,
        only=args.only, max_models=args.max_models, dry_run=args.dry_run, return_state=True,
    )
    return 0 if state.is_completed() else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m triattn_hub.nightly", description="Keep the catalog's models calibrated.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    def planning(sub):
        sub.add_argument("--catalog", help="catalog file (default: calibrations/catalog.yaml of this checkout)")
        sub.add_argument("--state", help='where unsupported models are remembered: a JSON file path or "prefect" (default: ~/.local/state/triattn-hub/unsupported.json)')
        sub.add_argument("--endpoint", help="Hugging Face Hub endpoint (default: $HF_ENDPOINT, else huggingface.co)")
        sub.add_argument("--only", action="append", metavar="MODEL_ID", help="consider only this model id (repeatable)")
        sub.add_argument("--max-models", type=int, metavar="N", help="calibrate at most N models")

    discover = commands.add_parser("discover", help="list the models that need calibrating")
    planning(discover)
    discover.add_argument("--json", action="store_true", help='print {"include": [candidates], "others": [skipped rows]} for a job matrix')
    discover.add_argument("--public-only", action="store_true", help="leave out private and gated models (for runners without a token)")
    discover.add_argument("--summary", metavar="FILE", help="append the markdown plan to FILE (for example $GITHUB_STEP_SUMMARY)")
    discover.set_defaults(run=command_discover)

    one = commands.add_parser("calibrate-one", help="calibrate one candidate into a directory, without publishing")
    one.add_argument("--candidate", required=True, help="one candidate record from `discover --json`, or @FILE")
    one.add_argument("--output", required=True, metavar="DIR", help="directory to create for the calibration")
    one.set_defaults(run=command_calibrate_one)

    publish = commands.add_parser("publish", help="publish directories written by calibrate-one")
    publish.add_argument("directories", nargs="+", metavar="DIR")
    publish.add_argument("--hub", help="publish here instead of each candidate's hub")
    publish.add_argument("--state", help='where unsupported models are remembered: a JSON file path or "prefect"')
    publish.add_argument("--summary", metavar="FILE", help="append the markdown summary to FILE (for example $GITHUB_STEP_SUMMARY)")
    publish.set_defaults(run=command_publish)

    run = commands.add_parser("run", help="run the whole nightly flow in this process")
    planning(run)
    run.add_argument("--work-dir", help="where calibrations wait to be published (default: ~/.cache/triattn-hub/nightly)")
    run.add_argument("--dry-run", action="store_true", help="plan and report without calibrating")
    run.set_defaults(run=command_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except TriattnHubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

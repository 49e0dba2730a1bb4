"""Prefect flows: pull a model, calibrate it on a corpus, check convergence, write and publish.

`calibrate_flow` is the unit of work for one model; the CLI runs it in Prefect's local
ephemeral mode and deployments run it on workers. Tokens never travel as flow parameters:
they come from the worker's environment (HF_TOKEN), the Prefect Secret block `hf-token` or
the stored Hugging Face login (see tokens.py).
"""

from __future__ import annotations

from .blas import enable_fast_cpu_blas

# Must run before mlx.core is imported anywhere in this process.
BLAS_INFO = enable_fast_cpu_blas()

import logging  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from .calibrate import DEFAULT_CHUNK_SIZE, calibrate, default_sequence_length, model_compute_dtype  # noqa: E402
from .convergence import convergence_report, plot_curves, render_markdown  # noqa: E402
from .corpus import encode_prompt, load_prompts, parse_corpus_spec, tokenize_corpus  # noqa: E402
from .errors import NotConvergedError, OfflineError  # noqa: E402
from .hub import open_hub  # noqa: E402
from .index import find_by_inputs  # noqa: E402
from .manifest import inputs_fingerprint  # noqa: E402
from .locks import model_lock  # noqa: E402
from .model_check import layers_from_artifact, verify_against_model  # noqa: E402
from .privacy import publish_target  # noqa: E402
from .results import build_manifest, calibration_tensors  # noqa: E402
from .sources import LoadedModel, load_model  # noqa: E402
from .staging import write_unpublished  # noqa: E402
from .tokens import hf_token  # noqa: E402

logger = logging.getLogger(__name__)


def _tokenizer_label(loaded: LoadedModel) -> str:
    """Name the tokenizer by where it came from: the GGUF file or the model id and revision."""
    if loaded.source.get("kind") == "gguf":
        return f"gguf:{loaded.source['file_name']}"
    return f"{loaded.model_id}@{loaded.revision}" if loaded.revision else loaded.model_id


def _is_transient(task, task_run, state) -> bool:
    """Return True for failures worth retrying: network and Hub errors, not bad input."""
    from .errors import AccessDeniedError, TriattnHubError

    try:
        state.result()
    except (AccessDeniedError, NotConvergedError):
        return False
    except OfflineError:
        return True
    except TriattnHubError:
        return False
    except Exception:  # noqa: BLE001  (a Prefect retry condition sees every exception type)
        return True
    return False


@task(name="pull-model", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_is_transient, cache_policy=NONE)
def pull_model(model_id: str, source: str | None, revision: str | None, private: bool | None) -> LoadedModel:
    """Download or open the model and load it for calibration."""
    return load_model(model_id, source=source, revision=revision, private=private, token=hf_token())


@task(name="tokenize-corpus", cache_policy=NONE)
def prepare_corpus(spec: str, tokenizer, tokenizer_label: str) -> tuple[list[int], dict]:
    corpus = parse_corpus_spec(spec)
    token_ids, record = tokenize_corpus(corpus, tokenizer, tokenizer_label=tokenizer_label)
    return token_ids, {**corpus.spec, **record}


@task(name="calibrate", cache_policy=NONE)
def run_calibration(loaded: LoadedModel, token_ids, sequence_length: int | None, chunk_size: int, progress: bool):
    bos_id = getattr(loaded.tokenizer, "bos_token_id", None)
    # One calibration per model at a time across all workers of the Prefect server.
    with model_lock(loaded.model_id):
        return calibrate(
            loaded.model, token_ids, bos_id=bos_id, sequence_length=sequence_length, chunk_size=chunk_size, progress=progress
        )


@task(name="check-convergence", cache_policy=NONE)
def check_convergence(loaded: LoadedModel, calibration, prompts_version: str, progress: bool) -> dict:
    """Run the convergence check on the held-out prompts and attach its table as an artifact."""
    prompts = [encode_prompt(prompt, loaded.tokenizer) for prompt in load_prompts(prompts_version)]
    report = convergence_report(calibration, loaded.model, prompts, progress=progress)
    _convergence_artifact(loaded.model_id, report)
    return report


def _convergence_artifact(model_id: str, report: dict) -> None:
    """Publish the report's table and curves as a Prefect markdown artifact."""
    import base64
    import tempfile
    from pathlib import Path

    from prefect.artifacts import create_markdown_artifact

    markdown = f"## Convergence of {model_id}\n\n" + render_markdown(report)
    with tempfile.TemporaryDirectory() as work:
        png = plot_curves(report, Path(work) / "convergence.png")
        if png:
            encoded = base64.b64encode(Path(png).read_bytes()).decode("ascii")
            markdown += f"\n\n![convergence curves](data:image/png;base64,{encoded})\n"
    key = "convergence-" + "".join(c if c.isalnum() else "-" for c in model_id.lower())
    create_markdown_artifact(markdown, key=key[:100], description=f"Convergence check of {model_id}")


def enforce_gate(model_id: str, report: dict, allow_unconverged: bool) -> dict:
    """Return the manifest's convergence section, or raise NotConvergedError when the gate failed.

    With `allow_unconverged`, a failed calibration is returned marked `published_unconverged`,
    so that clients warn.
    """
    if report["verdict"] != "failed":
        return {**report, "published_unconverged": False}
    if allow_unconverged:
        logger.warning("%s failed the convergence gate; publishing anyway because allow_unconverged is set", model_id)
        return {**report, "published_unconverged": True}
    gate = report.get("gate", {})
    failing = gate.get("failing_heads", [])[:10]
    heads = ", ".join(f"layer {h.get('layer')} head {h.get('head')}" for h in failing) or "see the report"
    raise NotConvergedError(
        f"{model_id}: the calibration did not converge, so it was not published. "
        f"{gate.get('failing_head_count', len(failing))} heads failed ({heads}). {gate.get('hint', '')} "
        "Pass --allow-unconverged to publish it anyway, marked as unconverged."
    )


@task(name="find-published", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_is_transient, cache_policy=NONE)
def find_published(hub_address: str, loaded: LoadedModel, corpus_record: dict, sequence_length: int | None, chunk_size: int) -> dict | None:
    """Return the flow summary of a version already calibrated from these inputs, or None.

    The inputs fingerprint needs only the weights, the corpus token ids and the settings, so
    an identical run is recognised before the calibration instead of after it.
    """
    settings = {
        "sequence_length": sequence_length or default_sequence_length(loaded.model),
        "chunk_size": chunk_size,
        "compute_dtype": model_compute_dtype(loaded.model),
    }
    fingerprint = inputs_fingerprint(weights=loaded.weights_fingerprint, corpus=corpus_record, settings=settings)
    index = open_hub(hub_address).read_index()
    version = find_by_inputs(index, loaded.model_id, fingerprint)
    if version is None:
        return None
    entry = index["models"][loaded.model_id]["versions"][version]
    return {
        "model_id": loaded.model_id,
        "hub": hub_address,
        "version": version,
        "created": False,
        "location": entry["path"],
        "token_count": entry["token_count"],
        "calibrated_layers": len(entry["geometry"]["calibrated_layers"]),
        "seconds": 0.0,
        "tokens_per_second": 0.0,
        "compute_dtype": settings["compute_dtype"],
        "blas": BLAS_INFO.get("backend"),
        "convergence": entry.get("convergence", "unchecked"),
        "n_star": None,
        "convergence_seconds": 0.0,
    }


@task(name="publish", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_is_transient, cache_policy=NONE)
def publish(hub_address: str, tensors: dict, manifest: dict) -> dict:
    hub = open_hub(hub_address)
    result = hub.publish(tensors, manifest)
    return {"version": result.version, "created": result.created, "location": result.location}


@flow(name="calibrate", log_prints=False)
def calibrate_flow(
    model_id: str,
    source: str | None = None,
    revision: str | None = None,
    corpus: str = "builtin",
    hub: str | None = None,
    private: bool | None = None,
    sequence_length: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    output: str | None = None,
    allow_unconverged: bool = False,
) -> dict:
    """Calibrate one model and publish it; return a summary (version, whether new, token count, speed).

    `source` is a local model directory or .gguf file; without it the model is downloaded
    from the Hugging Face Hub at `revision`. The hub is chosen by privacy.publish_target:
    `hub`, else hub.publish_address() for public models and $TRIATTN_PRIVATE_HUB for private
    ones. With `output`, the calibration is written to that directory (see staging.py) and not
    published; the summary then has `output` and no version. A calibration that fails the
    convergence gate raises NotConvergedError before anything is written, unless
    `allow_unconverged` is set.
    """
    run_logger = get_run_logger()
    if private and not output:
        publish_target(hub, True)  # a private model without a private hub fails before the download
    loaded = pull_model(model_id, source, revision, private)
    hub_address = None if output else publish_target(hub, loaded.private)
    token_ids, corpus_record = prepare_corpus(corpus, loaded.tokenizer, _tokenizer_label(loaded))
    run_logger.info("corpus %s: %d tokens", corpus_record.get("version") or corpus_record["kind"], corpus_record["token_count"])
    if not output:
        existing = find_published(hub_address, loaded, corpus_record, sequence_length, chunk_size)
        if existing is not None:
            run_logger.info("%s %s already contains these inputs in %s; nothing to calibrate", model_id, existing["version"], hub_address)
            return existing
    calibration = run_calibration(loaded, token_ids, sequence_length, chunk_size, progress)
    report = check_convergence(loaded, calibration, corpus_record.get("version") or "v1", progress)
    convergence = enforce_gate(model_id, report, allow_unconverged)
    manifest = build_manifest(loaded, calibration, corpus_record, blas=BLAS_INFO, convergence=convergence)
    tensors = calibration_tensors(calibration)
    # The loader check: the artifact's omega and geometry must match the live model's RoPE.
    verify_against_model(layers_from_artifact(manifest, tensors), loaded.model)
    if output:
        write_unpublished(output, tensors, manifest)
        run_logger.info("%s: calibration written to %s, not published", model_id, output)
        outcome = {"version": None, "created": None, "location": None, "output": output}
    else:
        outcome = publish(hub_address, tensors, manifest)
    summary = {
        "model_id": model_id,
        "hub": hub_address,
        **outcome,
        "token_count": calibration.token_count,
        "calibrated_layers": len(calibration.model_layers.layers),
        "seconds": round(calibration.seconds, 1),
        "tokens_per_second": round(calibration.token_count / max(calibration.seconds, 1e-9), 1),
        "compute_dtype": calibration.compute_dtype,
        "blas": BLAS_INFO.get("backend"),
        "convergence": convergence["verdict"],
        "n_star": convergence.get("n_star"),
        "convergence_seconds": convergence.get("cost", {}).get("seconds"),
    }
    if output:
        return summary
    run_logger.info(
        "%s %s %s (%d tokens, %.1f tokens/s)",
        model_id, summary["version"], "published" if summary["created"] else "already published, nothing new",
        summary["token_count"], summary["tokens_per_second"],
    )
    return summary

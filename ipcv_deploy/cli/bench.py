"""Benchmarks: FLOPs, PyTorch and ONNX Runtime latency, kernels, end-to-end runtime.

--flops: analytic FLOPs report; --latency: PyTorch eager, dense vs IPCV.

--ort exports dense and IPCV artifacts (peak RSS measured per export) and times both on ONNX
Runtime CPU next to PyTorch eager dense, with the ipcv ops' share of ORT time (profiler).
Prints a table (or one JSON document with --json) and writes the JSON to --out.
Default models: the full-size Qwen2-VL-7B ViT and InternViT-300M with random weights.
--ort --int8 adds the dynamic-int8 exports (int8 dense, int8 IPCV, int8-full IPCV).
--runtime times whole answers (vision + LLM) on Qwen2-VL-2B shapes: time to first token and
decode tokens/s for dense, IPCV, DART, IPCV + DART and TokenCarve; with --llm-backend
ort-genai, dense and IPCV on the transformers backend and on ONNX Runtime GenAI instead.
--native exports dense and IPCV at native resolution and times both at several image grids
(448x448, 16:9, ~1 MP); --plot PNG draws speed-up and FLOP ratio against image size.
--serve loads `ipcv-export serve` on loopback (dense vs IPCV + DART): requests/s, TTFT.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ipcv_deploy.bench.flops import FLOPS_HEADERS, flops_report, flops_table
from ipcv_deploy.bench.latency import LATENCY_GOAL, LATENCY_HEADERS, latency_table, torch_latency
from ipcv_deploy.bench.native import NATIVE_GRIDS, parse_grid
from ipcv_deploy.bench.onnxruntime import (
    EXPORT_RSS_GOAL_GB,
    INT8_HEADERS,
    INT8_VS_FP32_DENSE_GOAL,
    INT8_VS_INT8_DENSE_GOAL,
    ORT_HEADERS,
    ORT_OP_SHARE_GOAL,
    ORT_SPEEDUP_GOAL,
    int8_table,
    ort_latency,
    ort_table,
)
from ipcv_deploy.bench.report import format_table, machine_info
from ipcv_deploy.cli.common import LLM_BACKENDS
from ipcv_deploy.cli.options import (
    add_device_args,
    add_ipcv_args,
    add_model_args,
    add_output_args,
    ipcv_config,
    parse_image_size,
    print_json,
    require_at_least,
)
from ipcv_deploy.errors import ConfigError
from ipcv_deploy.fileio import write_json
from ipcv_deploy.models import (
    BENCHMARK_PRESETS,
    NATIVE_BENCHMARK_PRESETS,
    RUNTIME_BENCHMARK_PRESET,
    SERVE_BENCHMARK_PRESET,
    LoadedModel,
    load_model,
    native_families,
    parse_dtype,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench``."""
    parser.add_argument("--flops", action="store_true", help="analytic FLOPs report")
    parser.add_argument(
        "--latency", action="store_true", help="PyTorch eager latency, dense vs IPCV"
    )
    parser.add_argument(
        "--ort", action="store_true", help="export, then ONNX Runtime latency, dense vs IPCV"
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="native-resolution exports on ONNX Runtime CPU, dense vs IPCV at each of --grids "
        f"(default models {', '.join(NATIVE_BENCHMARK_PRESETS)})",
    )
    parser.add_argument(
        "--grids",
        nargs="+",
        default=[f"{h}x{w}" for h, w in NATIVE_GRIDS],
        help="patch grids (rows x columns) for --native (default: 448x448, 16:9 644x364, "
        "1008x1008)",
    )
    parser.add_argument(
        "--plot", type=Path, help="with --native: draw speed-up and FLOP ratio to this PNG"
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="with --ort: also the dynamic-int8 exports (int8 dense, int8 IPCV, int8-full IPCV)",
    )
    parser.add_argument(
        "--runtime",
        action="store_true",
        help=f"TTFT and decode speed of whole answers (default model {RUNTIME_BENCHMARK_PRESET})",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="load the OpenAI-compatible server on loopback: req/s and TTFT, dense vs "
        f"IPCV + DART (default model {SERVE_BENCHMARK_PRESET})",
    )
    parser.add_argument("--requests", type=int, default=50, help="requests per load (--serve)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[4, 16], help="in flight (--serve)"
    )
    parser.add_argument("--max-batch", type=int, default=8, help="server batch size (--serve)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=16,
        help="tokens decoded per answer (--runtime, --serve)",
    )
    parser.add_argument(
        "--llm-keep", type=float, default=0.35, help="LLM-side pruning keep ratio (--runtime)"
    )
    parser.add_argument(
        "--llm-backend",
        choices=[b for b in LLM_BACKENDS if b != "vllm"],
        default="transformers",
        help="with --runtime: ort-genai sets transformers and ONNX Runtime GenAI side by side, "
        "dense and IPCV (exports the package into --workdir; needs onnxruntime-genai)",
    )
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (--ort)")
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="roofline of the ipcv kernels (bytes, FLOPs, floor per GPU); on a CUDA GPU also "
        "the Triton kernels' and PyTorch ops' measured times",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("engines") / "bench",
        help="where --ort writes its artifacts (default engines/bench)",
    )
    add_model_args(parser, default=None)
    add_device_args(parser)
    parser.set_defaults(model=None)
    parser.add_argument(
        "--models",
        nargs="+",
        help=f"several models at once (default: {' '.join(BENCHMARK_PRESETS)})",
    )
    add_ipcv_args(parser)
    parser.add_argument("--batch", type=int, default=1, help="images per call (latency)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (latency)")
    parser.add_argument("--out", type=Path, help="JSON output (default engines/bench/<kind>.json)")
    add_output_args(parser)


def run(args: argparse.Namespace) -> int:
    """Run the requested benchmarks over the models."""
    if args.kernels:
        return _run_kernels(args)
    if args.native:
        return _run_native(args)
    if args.runtime:
        return _run_runtime(args)
    if args.serve:
        return _run_serve(args)
    if not (args.flops or args.latency or args.ort):
        raise ConfigError(
            "pick at least one benchmark: --flops, --latency, --ort, --runtime, --serve or "
            "--kernels"
        )
    if args.int8 and not args.ort:
        raise ConfigError("--int8 adds rows to the ONNX Runtime benchmark: pass --ort too")
    if args.batch < 1 or args.runs < 1:
        raise ConfigError(f"--batch and --runs must be >= 1, got {args.batch} and {args.runs}")
    names = args.models or ([args.model] if args.model else list(BENCHMARK_PRESETS))
    results: dict[str, Any] = {"machine": machine_info(), "flops": [], "latency": [], "ort": []}
    for name in names:
        if args.ort and (args.dtype != "float32" or args.device != "cpu"):
            raise ConfigError(
                "--ort measures float32 exports on ONNX Runtime's CPU provider; drop --dtype "
                "and --device"
            )
        loaded = load_model(
            name, parse_dtype(args.dtype), args.seed, weights=args.latency, device=args.device
        )
        adapter = loaded.adapter(loaded.vision)
        image_size = parse_image_size(args.image_size) if args.image_size else loaded.image_size
        config = ipcv_config(args, loaded.adapter)
        report = {"model": name, **flops_report(adapter, image_size, config)}
        results["flops"].append(report)
        if args.latency:
            results["latency"].append(
                torch_latency(loaded, config, image_size, args.batch, args.runs, seed=args.seed)
            )
        if args.ort:
            del loaded
            results["ort"].append(
                ort_latency(
                    name,
                    config,
                    image_size,
                    args.workdir,
                    args.runs,
                    args.threads,
                    args.seed,
                    int8=args.int8,
                )
            )
    kind = "_".join(k for k in ("flops", "latency", "ort", "int8") if getattr(args, k))
    out = args.out or Path("engines") / "bench" / f"{kind}.json"
    write_json(out, results)
    if args.json:
        print_json(results)
        return 0
    for report in results["flops"]:
        h, w = report["image_size"]
        cfg = report["ipcv"]
        print(
            f"\nFLOPs per image: {report['model']} at {h}x{w} ({report['tokens_per_image']} -> "
            f"{report['kept_per_image']} tokens, K={cfg['prune_layer']}, AS={cfg['as_layers']})"
        )
        print(format_table(FLOPS_HEADERS, flops_table(report)))
    if results["latency"]:
        m = results["machine"]
        print(
            f"\nPyTorch eager latency, {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}"
        )
        print(format_table(LATENCY_HEADERS, latency_table(results["latency"])))
        print(
            f"(median of {args.runs} runs; goal: speed-up >= {LATENCY_GOAL:.0%} of the FLOP ratio)"
        )
    if results["ort"]:
        _print_ort(results, args.runs)
    print(f"\nwrote {out}")
    return 0


def _print_ort(results: dict[str, Any], runs: int) -> None:
    m = results["machine"]
    print(f"\nONNX Runtime CPU, {m['cpu']}, {results['ort'][0]['threads']} threads, batch 1")
    print(format_table(ORT_HEADERS, ort_table(results["ort"])))
    print(
        f"(median of {runs} runs; goals: IPCV speed-up >= {ORT_SPEEDUP_GOAL}x on "
        f"{BENCHMARK_PRESETS[0]}, ipcv ops <= {ORT_OP_SHARE_GOAL:.0%} of encoder time, "
        f"export RSS <= {EXPORT_RSS_GOAL_GB:.0f} GB)"
    )
    if "int8" in results["ort"][0]:
        print("\nint8 (dynamic: int8 weights per channel, activations per call), same run")
        print(format_table(INT8_HEADERS, int8_table(results["ort"])))
        print(
            f"(goals: int8 IPCV >= {INT8_VS_INT8_DENSE_GOAL}x int8 dense and >= "
            f"{INT8_VS_FP32_DENSE_GOAL:g}x fp32 dense; int8 keeps the blocks before K fp32, "
            "int8-full quantizes them too)"
        )


def _run_native(args: argparse.Namespace) -> int:
    from ipcv_deploy.bench.native import NATIVE_GOALS, NATIVE_HEADERS, native_latency, native_table

    require_at_least("--runs", args.runs, 1)
    grids = tuple(parse_grid(g) for g in args.grids)
    names = args.models or ([args.model] if args.model else list(NATIVE_BENCHMARK_PRESETS))
    out = args.out or Path("engines") / "bench" / "native.json"
    results: dict[str, Any] = {"machine": machine_info(), "native": []}
    for name in names:
        loaded = load_model(name, seed=args.seed, weights=False)
        if not loaded.adapter.native_resolution:
            raise ConfigError(
                f"--native needs a native-resolution model ({native_families()}), not {name}"
            )
        config = ipcv_config(args, loaded.adapter)
        del loaded
        results["native"].append(
            native_latency(name, config, grids, args.workdir, args.runs, args.threads, args.seed)
        )
        write_json(out, results)  # after each model: a later model's failure keeps these
    write_json(out, results)
    if args.plot:
        from ipcv_deploy.bench.plot import plot_native

        plot_native(results, args.plot)
    if args.json:
        print_json(results)
        return 0
    m = results["machine"]
    print(
        f"Native resolution, ONNX Runtime CPU, {m['cpu']}, {results['native'][0]['threads']} "
        f"threads, one image per call; median of {args.runs} runs"
    )
    print(format_table(NATIVE_HEADERS, native_table(results["native"])))
    print(f"({NATIVE_GOALS})")
    if args.plot:
        print(f"drew {args.plot}")
    print(f"\nwrote {out}")
    return 0


def _run_kernels(args: argparse.Namespace) -> int:
    from ipcv_deploy.bench.kernels import KERNEL_HEADERS, kernel_report, kernel_table

    report = {"machine": machine_info(), "kernels": kernel_report(runs=max(args.runs, 5))}
    out = args.out or Path("engines") / "bench" / "kernels.json"
    write_json(out, report)
    if args.json:
        print_json(report)
        return 0
    k = report["kernels"]
    where = f"measured on {k['gpu']}" if k["gpu"] else "no CUDA GPU here: floors only"
    print(f"ipcv kernels at {k['model']} shapes, {k['dtype']}, {where}")
    print(format_table(KERNEL_HEADERS, kernel_table(k)))
    print(f"\nwrote {out}")
    return 0


def _run_runtime(args: argparse.Namespace) -> int:
    from ipcv_deploy.bench.report import progress
    from ipcv_deploy.bench.runtime import RUNTIME_HEADERS, runtime_benchmark, runtime_table

    if args.runs < 1:
        raise ConfigError(f"--runs must be >= 1, got {args.runs}")
    name = args.model or RUNTIME_BENCHMARK_PRESET
    progress(f"building {name} ...")
    loaded = load_model(name, parse_dtype(args.dtype), args.seed, device=args.device)
    if args.llm_backend == "ort-genai":
        return _run_backends(args, loaded)
    report = {
        "machine": machine_info(),
        "runtime": runtime_benchmark(
            loaded, args.runs, args.max_new_tokens, args.llm_keep, progress
        ),
    }
    out = args.out or Path("engines") / "bench" / "runtime.json"
    write_json(out, report)
    if args.json:
        print_json(report)
        return 0
    r, m = report["runtime"], report["machine"]
    print(
        f"{r['model']}, {r['image_size'][0]}x{r['image_size'][1]} image, torch vision backend, "
        f"{m['cpu']}, {m['torch_threads']} threads; median of {r['runs']} runs, "
        f"{r['new_tokens']} new tokens"
    )
    print(format_table(RUNTIME_HEADERS, runtime_table(r)))
    print(f"\nwrote {out}")
    return 0


def _run_backends(args: argparse.Namespace, loaded: LoadedModel) -> int:
    from ipcv_deploy.bench.report import progress
    from ipcv_deploy.bench.runtime import BACKEND_HEADERS, backend_benchmark, backend_table

    report = {
        "machine": machine_info(),
        "backends": backend_benchmark(
            loaded, args.workdir, args.runs, args.max_new_tokens, progress
        ),
    }
    out = args.out or Path("engines") / "bench" / "backends.json"
    write_json(out, report)
    if args.json:
        print_json(report)
        return 0
    r, m = report["backends"], report["machine"]
    print(
        f"{r['model']}, {r['image_size'][0]}x{r['image_size'][1]} image at its native size, "
        f"{m['cpu']}; median of {r['runs']} runs, {r['new_tokens']} new tokens"
    )
    print(format_table(BACKEND_HEADERS, backend_table(r)))
    print(f"\nwrote {out}")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from ipcv_deploy.bench.report import progress
    from ipcv_deploy.bench.serving import SERVING_HEADERS, serving_benchmark, serving_table

    require_at_least("--requests", args.requests, 1)
    require_at_least("--max-batch", args.max_batch, 1)
    require_at_least("--max-new-tokens", args.max_new_tokens, 1)
    for concurrency in args.concurrency:
        require_at_least("--concurrency", concurrency, 1)
    name = args.model or SERVE_BENCHMARK_PRESET
    report = {
        "machine": machine_info(),
        "serve": serving_benchmark(
            name,
            args.requests,
            args.concurrency,
            args.max_new_tokens,
            args.max_batch,
            progress,
            device=args.device,
        ),
    }
    out = args.out or Path("engines") / "bench" / "serve.json"
    write_json(out, report)
    if args.json:
        print_json(report)
        return 0
    m = report["machine"]
    print(
        f"OpenAI-compatible server on loopback, {m['cpu']}, {m['torch_threads']} threads; "
        f"streamed, greedy, {args.max_new_tokens} new tokens, server batch {args.max_batch}"
    )
    print(format_table(SERVING_HEADERS, serving_table(report["serve"])))
    print(f"\nwrote {out}")
    return 0

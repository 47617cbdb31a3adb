"""``resnet-deploy bench``: interleaved latency and throughput."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..core.errors import UserError
from ..core.files import check_outputs
from ..core.machine import describe
from .app import main
from .options import (SEED, FilePath, Finite, batch_sizes as batch_sizes_of, emit, json_option,
                      provider_option, terminal_progress, weights_option, write_json_if)

if TYPE_CHECKING:
    from ..checks.bench import BenchReport


# Each thread is a pool worker with its own stack: a typo of 100000 exhausts memory.
MAX_THREADS = 1024


@main.command()
@click.option("--model", "models", multiple=True,
              type=FilePath(),
              help="ONNX model to time (repeatable; ratios are to the first). With --url: "
                   "the file the server serves, timed in-process beside it.")
@click.option("--url", default=None, metavar="http://HOST:PORT|grpc://HOST:PORT",
              help="Time a model served by Triton instead (needs --served-model).")
@click.option("--served-model", default=None, metavar="NAME",
              help="With --url: the served model (NAME_image takes photos from --images).")
@click.option("--concurrency", default="1,2,4,8,16", show_default=True,
              help="With --url: concurrent clients, one level each.")
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --url: photos for a photos endpoint [default: calibration/].")
@provider_option(single=True)
@click.option("--batch-size", "batch_sizes", default="1", show_default=True,
              help="Comma-separated batch sizes, e.g. 1,8,32.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed iterations per model and batch size.")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Timed iterations per model and batch size (default 100).")
@click.option("--duration", type=Finite(min=0, min_open=True), default=None,
              help="Seconds per model and batch size instead of --iterations.")
@click.option("--block", type=click.IntRange(min=1), default=5, show_default=True,
              help="Back-to-back iterations a model gets per round-robin round.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
              help="Intra-op threads for ORT (and torch); default: ORT's choice.")
@click.option("--torch", "torch_baseline", is_flag=True,
              help="Add PyTorch eager (inference_mode, channels_last) as a baseline.")
@weights_option(None)
@click.option("--io-binding", is_flag=True,
              help="Inputs and outputs bound on the device (run_with_iobinding).")
@click.option("--cuda-graph", is_flag=True,
              help="Capture and replay a CUDA graph (cuda/tensorrt; needs --io-binding).")
@click.option("--trt-cache", type=click.Path(file_okay=False), default=None,
              help="TensorRT engine cache folder (default artifacts/trt_cache).")
@click.option("--placement/--no-placement", default=True, show_default=True,
              help="Count nodes per provider in a separate short profiled session.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@json_option
@click.option("--markdown", "markdown_path", type=FilePath(),
              default=None, help="Also write the table as Markdown here.")
@click.option("--plot", "plot_path", type=FilePath(),
              default=None, help="Also draw latency and throughput to this PNG (matplotlib).")
def bench(models: tuple[Path, ...], url: str | None, served_model: str | None,
          concurrency: str, images: Path | None, providers: tuple[str, ...], batch_sizes: str,
          warmup: int,
          iterations: int | None, duration: float | None, block: int, threads: int | None,
          torch_baseline: bool, weights: str | None, io_binding: bool, cuda_graph: bool,
          trt_cache: str | None, placement: bool, seed: int, json_path: Path | None,
          markdown_path: Path | None, plot_path: Path | None) -> None:
    """Measure latency and throughput of ONNX models, interleaved so drift hits all equally.

    Per model and batch size: p50/p90/p99/mean/min latency, images/s, session creation
    time, peak RSS and how many nodes each provider ran. Only the inference call is timed;
    models take turns in small blocks. --weights without --torch is ignored.

    With --url, a model served by Triton instead: each --concurrency level runs until
    --iterations requests (default 400) or --duration seconds (default 10), reporting
    images/s, p50/p90/p99 and Triton's own batch, queue and compute times, beside the
    --model file run in-process at the batch the level's concurrent requests make.

    \b
    Examples:
      resnet-deploy bench --model artifacts/resnet18.onnx \\
          --model artifacts/resnet18.int8.onnx --batch-size 1,32 --torch
      resnet-deploy bench --model a.onnx --provider cuda --io-binding --cuda-graph \\
          --batch-size 1,32,256 --json bench.json --markdown bench.md --plot bench.png
      resnet-deploy bench --url grpc://127.0.0.1:8001 --served-model resnet18_int8 \\
          --model artifacts/resnet18.int8.onnx --concurrency 1,8 --duration 5
    """
    check_outputs({"--json": json_path, "--markdown": markdown_path, "--plot": plot_path},
                  models)
    if url is not None or served_model is not None:
        served(url, served_model, models, concurrency, images, batch_sizes, iterations,
               duration, seed, json_path)
        return
    if not models:
        raise UserError("give --model PATH (repeatable), or --url and --served-model")
    from ..checks.bench import BenchOptions, run_bench

    if iterations is not None and duration is not None:
        raise UserError("give either --iterations or --duration, not both")
    if plot_path is not None:
        from ..core.render import require_matplotlib

        require_matplotlib()
    options = BenchOptions(
        provider=providers[0], batch_sizes=batch_sizes_of(batch_sizes, "--batch-size"),
        warmup=warmup,
        iterations=iterations or 100, duration_s=duration, block=block, threads=threads,
        io_binding=io_binding, cuda_graph=cuda_graph, torch_baseline=torch_baseline,
        torch_weights=weights, placement=placement, trt_cache_dir=trt_cache, seed=seed)
    with terminal_progress() as progress:
        report = run_bench(list(models), options, progress=progress)
    render_bench(report)
    write_json_if(json_path, report.to_dict())
    if markdown_path is not None:
        from ..core.files import write_text
        from ..core.render import format_markdown

        write_text(markdown_path, f"{machine_line(report)}\n\n"
                   + format_markdown(table_rows(report), bench_columns(report)))
        emit(f"wrote {markdown_path}")
    if plot_path is not None:
        from ..core.render import plot_bench

        plot_bench([r.to_dict() for r in report.results], plot_path, machine=report.machine)
        emit(f"wrote {plot_path}")


def served(url: str | None, served_model: str | None, models: tuple[Path, ...],
           concurrency: str, images: Path | None, batch_sizes: str, iterations: int | None,
           duration: float | None, seed: int, json_path: Path | None) -> None:
    """``bench --url``: the served sweep, rendered."""
    from ..checks.served import ServedBenchOptions, run_served_bench

    if url is None or served_model is None:
        raise UserError("--url and --served-model go together")
    if len(models) > 1:
        raise UserError("with --url, give at most one --model: the file the server serves")
    sizes = batch_sizes_of(batch_sizes, "--batch-size")
    if len(sizes) > 1:
        raise UserError("with --url, give one --batch-size: the rows of each request")
    options = ServedBenchOptions(concurrency=batch_sizes_of(concurrency, "--concurrency"),
                                 batch_size=sizes[0], max_requests=iterations or 400,
                                 duration_s=duration or 10.0, seed=seed)
    with terminal_progress() as progress:
        report = run_served_bench(url, served_model, local_model=models[0] if models else None,
                                  images=images or Path("calibration"), options=options,
                                  progress=progress)
    render_served(report)
    write_json_if(json_path, report.to_dict())


def render_served(report: Any) -> None:
    from ..core.render import Column, format_table

    emit(f"machine: {describe(report.machine)}")
    options = report.options
    emit(f"{report.model} at {report.url} ({report.input}), requests of {options.batch_size}; "
         f"each level until {options.max_requests} requests or {options.duration_s:g} s")
    rows = [{**level.to_dict(), **{k: v for k, v in level.server.items()}}
            for level in report.levels]
    local = Path(report.local_model).name if report.local_model else "no --model"
    emit(format_table(rows, [
        Column("concurrency", "clients", "int"), Column("requests", "requests", "int"),
        Column("errors", "errors", "int"),
        Column("throughput_ips", "images/s", "number", "rows answered per second"),
        Column("p50_ms", "p50 ms", "ms"), Column("p90_ms", "p90 ms", "ms"),
        Column("p99_ms", "p99 ms", "ms", "request latency at the client"),
        Column("avg_batch", "batch", "number", "Triton's requests per execution"),
        Column("queue_ms", "queue ms", "ms", "Triton's queue time per request"),
        Column("compute_infer_ms", "infer ms", "ms", "Triton's compute time per request "
               "(the model's execute, for a Python model its IPC included)"),
        Column("inprocess_batch", "in-process batch", "int"),
        Column("inprocess_ips", "in-process images/s", "number",
               f"{local} in this process at clients x request batch"),
        Column("ratio", "served/in-process", "ratio")]))
    failed = [level for level in report.levels if level.errors]
    for level in failed:
        click.echo(f"warning: {level.errors} request(s) failed at {level.concurrency} clients: "
                   f"{level.first_error}", err=True)


PROVIDER_NAMES = {"cpu": "CPU", "cuda": "CUDA", "tensorrt": "TensorRT"}


def table_rows(report: Any) -> list[dict[str, Any]]:
    """Result rows flattened for tables: the spread as ``p10-p90`` text, placement as
    ``CPU 49`` (or ``CUDA 120, CPU 3``)."""
    from ..core.render import significant

    rows = []
    for result in report.results:
        row = result.to_dict()
        row["spread_text"] = f"{significant(result.p10_ms)}-{significant(result.p90_ms)}"
        placement = result.placement
        row["placement_text"] = ("-" if placement is None else ", ".join(
            f"{PROVIDER_NAMES.get(k, k)} {v}"
            for k, v in sorted(placement.items(), key=lambda kv: -kv[1])))
        rows.append(row)
    return rows


def bench_columns(report: Any) -> list[Any]:
    from ..core.render import Column

    first = Path(report.results[0].model).name if report.results else "the first model"
    return [
        Column("model", "model"), Column("provider", "provider"),
        Column("precision", "precision"), Column("batch_size", "batch", "int"),
        Column("p50_ms", "p50 ms", "ms", "median time of one call"),
        Column("spread_text", "p10-p90 ms", means="the middle 80% of calls; a range wider "
               "than 1.5x means other work shared the cores"),
        Column("p99_ms", "p99 ms", "ms", "1 call in 100 is slower"),
        Column("min_ms", "min ms", "ms"),
        Column("throughput_ips", "images/s", "number", "batch / p50"),
        Column("ratio_p50", "vs first", "ratio",
               f"p50 relative to {first} at the same batch (below 1x is faster)"),
        Column("session_s", "session s", "number", "time to create the session"),
        Column("peak_rss_mb", "peak MB", "number",
               "peak resident memory while loading and warming up"),
        Column("placement_text", "nodes on", means="graph nodes each provider ran"),
    ]


def machine_line(report: BenchReport) -> str:
    """What the figures were measured on, for the console and the Markdown alike."""
    machine = report.machine
    return (f"machine: {describe(machine)}; onnxruntime {machine['versions']['onnxruntime']}; "
            f"providers: {', '.join(machine['providers'])}")


def render_bench(report: BenchReport) -> None:
    from ..core.render import format_table

    emit(machine_line(report))
    options = report.options
    how = (f"{options.duration_s:g}s" if options.duration_s else f"{options.iterations} iterations")
    emit(f"{how} per model and batch after {options.warmup} warm-up, round-robin in blocks "
         f"of {options.block}{'; IO binding' if options.io_binding else ''}"
         f"{'; CUDA graph' if options.cuda_graph else ''}")
    emit(format_table(table_rows(report), bench_columns(report)))
    for note in report.notes:
        emit(f"note: {note}")
    if report.busy:
        click.echo(f"warning: {report.busy}", err=True)

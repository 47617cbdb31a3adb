"""``resnet-deploy bench``: interleaved latency and throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import UserError
from .app import main
from .options import (
    describe_machine,
    emit,
    json_option,
    progress_enabled,
    weights_option,
    write_json_if,
)


def split_batch_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--batch-size {value!r}: give comma-separated integers, "
                        "e.g. 1,8,32") from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-size {value!r}: give positive integers, e.g. 1,8,32")
    return tuple(dict.fromkeys(sizes))


@main.command()
@click.option("--model", "models", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="ONNX model to time (repeatable; ratios are to the first).")
@click.option("--provider", default="cpu", show_default=True,
              help="ORT provider: cpu, cuda or tensorrt (strict: no silent fallback).")
@click.option("--batch-size", "batch_sizes", default="1", show_default=True,
              help="Comma-separated batch sizes, e.g. 1,8,32.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed iterations per model and batch size.")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Timed iterations per model and batch size (default 100).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds per model and batch size instead of --iterations.")
@click.option("--block", type=click.IntRange(min=1), default=5, show_default=True,
              help="Back-to-back iterations a model gets per round-robin round.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
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
@click.option("--seed", type=int, default=0, show_default=True)
@json_option
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write the table as Markdown here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also draw latency and throughput to this PNG (matplotlib).")
def bench(models: tuple[Path, ...], provider: str, batch_sizes: str, warmup: int,
          iterations: int | None, duration: float | None, block: int, threads: int | None,
          torch_baseline: bool, weights: str | None, io_binding: bool, cuda_graph: bool,
          trt_cache: str | None, placement: bool, seed: int, json_path: Path | None,
          markdown_path: Path | None, plot_path: Path | None) -> None:
    """Measure latency and throughput of ONNX models, interleaved so drift hits all equally.

    Per model and batch size: p50/p90/p99/mean/min latency, images/s, session creation
    time, peak RSS and how many nodes each provider ran. Only the inference call is timed;
    models take turns in small blocks. --weights without --torch is ignored.

    \b
    Examples:
      resnet-deploy bench --model artifacts/resnet18.onnx \\
          --model artifacts/resnet18.int8.onnx --batch-size 1,32 --torch
      resnet-deploy bench --model a.onnx --provider cuda --io-binding --cuda-graph \\
          --batch-size 1,32,256 --json bench.json --markdown bench.md --plot bench.png
    """
    from ..bench import BenchOptions, run_bench

    if iterations is not None and duration is not None:
        raise UserError("give either --iterations or --duration, not both")
    if plot_path is not None:
        from ..report import require_matplotlib

        require_matplotlib()
    options = BenchOptions(
        provider=provider, batch_sizes=split_batch_sizes(batch_sizes), warmup=warmup,
        iterations=iterations or 100, duration_s=duration, block=block, threads=threads,
        io_binding=io_binding, cuda_graph=cuda_graph, torch_baseline=torch_baseline,
        torch_weights=weights, placement=placement, trt_cache_dir=trt_cache, seed=seed)
    say = (lambda message: click.echo(message, err=True)) if progress_enabled() else None
    report = run_bench(list(models), options, progress=say)
    render_bench(report)
    write_json_if(json_path, report.to_dict())
    if markdown_path is not None:
        from ..bench import TABLE_COLUMNS, table_rows
        from ..report import format_markdown, write_text

        machine = report.machine
        write_text(markdown_path, f"Machine: {describe_machine()}; onnxruntime "
                   f"{machine['versions']['onnxruntime']}\n\n"
                   + format_markdown(table_rows(report), TABLE_COLUMNS))
        emit(f"wrote {markdown_path}")
    if plot_path is not None:
        from ..report import plot_bench

        plot_bench([r.to_dict() for r in report.results], plot_path)
        emit(f"wrote {plot_path}")


def render_bench(report: Any) -> None:
    from ..bench import TABLE_COLUMNS, table_rows
    from ..report import format_table

    machine = report.machine
    emit(f"machine: {describe_machine()}; onnxruntime "
         f"{machine['versions']['onnxruntime']}; providers: {', '.join(machine['providers'])}")
    options = report.options
    how = (f"{options.duration_s:g}s" if options.duration_s else f"{options.iterations} iterations")
    emit(f"{how} per model and batch after {options.warmup} warm-up, round-robin in blocks "
         f"of {options.block}{'; IO binding' if options.io_binding else ''}"
         f"{'; CUDA graph' if options.cuda_graph else ''}")
    emit(format_table(table_rows(report), TABLE_COLUMNS))
    first = report.results[0].model if report.results else "-"
    emit(f"p50 x first: p50 latency relative to {first} at the same batch size")
    for note in report.notes:
        emit(f"note: {note}")

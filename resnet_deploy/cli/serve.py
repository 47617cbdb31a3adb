"""``resnet-deploy serve``: a real Triton server on a model repository, until Ctrl-C."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from ..core.errors import UserError
from .app import main
from .options import (FilePath, Finite, emit, json_option, show_result, terminal_progress,
                      write_json_if)

PORT = click.IntRange(0, 65535)


@main.command()
@click.argument("repository", required=False,
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0: every interface).")
@click.option("--http-port", type=PORT, default=8000, show_default=True,
              help="HTTP/REST (KServe v2) port; 0: a free one.")
@click.option("--grpc-port", type=PORT, default=8001, show_default=True,
              help="gRPC port; 0: a free one.")
@click.option("--metrics-port", type=PORT, default=8002, show_default=True,
              help="Prometheus metrics port; 0: a free one.")
@click.option("--no-metrics", is_flag=True, help="Serve no metrics.")
@click.option("--triton-bin", type=FilePath(), default=None,
              help="A full Triton's tritonserver (an NGC container's) instead of the "
                   "nvidia-pytriton wheel's.")
@click.option("--backend-directory", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="That Triton's backends [default: beside its bin/].")
@click.option("--ready-timeout", type=Finite(min=0, min_open=True), default=120.0,
              show_default=True, help="Seconds to wait for every model to be READY.")
@click.option("--log", "log_path", type=FilePath(), default=None,
              help="Append Triton's log to this file.")
@click.option("--check-images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Try it and stop: send these photos to every model and its _image "
                   "endpoint over HTTP and gRPC, compare with onnxruntime in this process "
                   "(by each model's parity tolerance); exit 1 if any answer differs.")
@click.option("--limit", type=click.IntRange(min=1), default=64, show_default=True,
              help="At most N photos of --check-images (a seeded subset).")
@click.option("--prepare", is_flag=True,
              help="Only build (or check) the stub env and say where it is; no REPOSITORY.")
@click.option("--rebuild-env", is_flag=True, help="Build the stub env again first.")
@json_option
def serve(repository: Path | None, host: str, http_port: int, grpc_port: int,
          metrics_port: int, no_metrics: bool, triton_bin: Path | None,
          backend_directory: Path | None, ready_timeout: float, log_path: Path | None,
          check_images: Path | None, limit: int, prepare: bool, rebuild_env: bool,
          json_path: Path | None) -> None:
    """Serve a Triton model repository (from 'resnet-deploy package') with a real Triton.

    Runs Triton 2.51 from the nvidia-pytriton wheel (or --triton-bin), waits until every
    model is READY, prints the endpoints and the models, and serves until Ctrl-C or SIGTERM
    (exit 130 / 143), which stop it within 20 s leaving no process, shared memory or temp
    folder. onnxruntime models run on Triton's C++ onnxruntime backend where it exists, else
    on resnet-deploy's Python one. The server's Python stub runs in an env of its own
    (numpy<2, onnxruntime, Pillow, this package), built on first use from the package index
    and cached in $RESNET_DEPLOY_STUB_ENV (default ~/.cache/resnet-deploy/triton-stub);
    it is rebuilt when Python, onnxruntime, Pillow or the wheel change, or with
    --rebuild-env. A model that fails to load is exit 2 with Triton's reason.
    --check-images tries the repository before shipping it: it serves, proves every
    endpoint against onnxruntime in this process on those photos, and stops.
    Needs: pip install 'resnet-deploy[serve]' && pip install --no-deps nvidia-pytriton==0.7.0

    \b
    Examples:
      resnet-deploy serve --prepare
      resnet-deploy serve artifacts/model_repository
      resnet-deploy serve artifacts/model_repository --check-images calibration/
      resnet-deploy serve model_repository/ --http-port 0 --grpc-port 0 --no-metrics
    """
    from ..serving.server import ServerFailed, ServerOptions, TritonServer
    from ..serving.stub_env import stub_env

    if prepare or rebuild_env:
        with terminal_progress() as progress:
            env = None if triton_bin else stub_env(rebuild=rebuild_env, progress=progress)
        if env is not None:
            versions = ", ".join(f"{k} {v}" for k, v in env.versions().items())
            emit(f"Triton stub env: {env.root} ({versions}); tritonserver of nvidia-pytriton "
                 f"{env.wheel.version}: {env.wheel.tritonserver}")
        if prepare:
            if repository is not None:
                raise UserError("--prepare builds the stub env only; drop REPOSITORY")
            write_json_if(json_path, {"stub_env": None if env is None else {
                "root": str(env.root), "versions": env.versions(),
                "nvidia_pytriton": env.wheel.version, "tritonserver": str(env.wheel.tritonserver)}})
            return
    if repository is None:
        raise UserError("give the REPOSITORY to serve (or --prepare)")
    options = ServerOptions(host=host, http_port=http_port or None, grpc_port=grpc_port or None,
                            metrics_port=None if no_metrics else _port(metrics_port, host),
                            triton_bin=triton_bin, backend_directory=backend_directory,
                            ready_timeout_s=ready_timeout, log_path=log_path)
    if check_images is not None:
        show_result(lambda: _check(repository, check_images, limit, options), render_proof,
                    json_path)
        return
    with terminal_progress() as progress:
        server = TritonServer(repository, options, progress=progress)
        server.start()
    try:
        report = _report(server)
        render_serve(report)
        write_json_if(json_path, report)
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(0.2)
        raise ServerFailed(f"tritonserver exited by itself: {(list(server.log) or [''])[-1]}")
    finally:
        emit(f"stopped Triton in {server.stop():.1f} s")


def _check(repository: Path, folder: Path, limit: int, options: Any) -> Any:
    from ..serving.proof import prove_against_inprocess

    with terminal_progress() as progress:
        return prove_against_inprocess(repository, folder, limit=limit, options=options,
                                       progress=progress)


def render_proof(proof: Any) -> None:
    from ..core.render import Column, format_table

    emit(f"Triton {proof.triton} served {proof.repository}; onnxruntime models ran on "
         f"{proof.onnxruntime_backend}")
    emit(f"{proof.images} photos through every endpoint, against onnxruntime in this process:")
    emit(format_table([{**c.to_dict(), **c.result.to_dict(),
                        "verdict": "PASS" if c else "FAIL"} for c in proof.checks], [
        ("endpoint", "endpoint"), ("sent", "sent"), ("protocol", "protocol"),
        ("precision", "precision"), Column("max_abs_diff", "max abs diff", "error"),
        Column("top1_agreement", "top-1", "share"), ("verdict", "verdict")]))
    if proof.without_photos:
        emit(f"no photo endpoint (no preprocessing recorded): {', '.join(proof.without_photos)}")


def _port(port: int, host: str) -> int:
    from ..serving.server import free_port

    return port or free_port(host if host not in ("0.0.0.0", "") else "127.0.0.1")


def _report(server: Any) -> dict[str, Any]:
    metadata = server.metadata()
    return {"triton": metadata.get("version"), "repository": str(server.repository),
            "pid": server.proc.pid, "ready_s": round(server.startup_s, 2),
            "endpoints": {"http": f"http://{server.http_url}", "grpc": server.grpc_url,
                          "metrics": (f"http://{server.client_host}:{server.metrics_port}"
                                      "/metrics" if server.metrics_port else None)},
            "onnxruntime_backend": server.onnxruntime_backend(),
            "models": [m.to_dict() for m in server.models()]}


def render_serve(report: dict[str, Any]) -> None:
    from ..core.render import format_table

    emit(f"Triton {report['triton']} serving {report['repository']} (pid {report['pid']}), "
         f"ready in {report['ready_s']:.1f} s")
    for name, url in report["endpoints"].items():
        if url:
            emit(f"  {name:<8} {url}")
    emit(f"onnxruntime models run on {report['onnxruntime_backend']}")
    emit(format_table(report["models"], [
        ("name", "model"), ("precision", "precision"), ("inputs", "inputs"),
        ("max_batch_size", "max batch"), ("backend", "backend")]))
    emit("Ctrl-C or SIGTERM stops it")

"""A real Triton (2.51, from the nvidia-pytriton wheel) on what ``package`` and ``pipeline
--triton`` write: answers equal to onnxruntime in this process, bad requests refused while
the server keeps serving, dynamic batching, and ``serve`` stopping clean.

Every server binds loopback on free ports, is stopped by its PID, and every request is
bounded (tritonclient's timeouts, a fixed count)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from resnet_deploy.checks.served import ServedClient
from resnet_deploy.cli import main
from resnet_deploy.serving.server import TritonServer

from .conftest import CALIBRATION, CIFAR_DEV, IMAGENET_SAMPLES, cli_command, running_triton

PHOTOS = sorted(p for p in CALIBRATION.iterdir() if p.suffix != ".md")[:12]


def _invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def repository(random_onnx: Path, static_onnx: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP32 with dynamic batch, its default INT8, and a static-batch FP32, packaged."""
    from resnet_deploy.convert.quantize.publish import quantize
    from resnet_deploy.convert.quantize.recipe import QuantizeOptions
    from resnet_deploy.serving.repository import package_triton

    folder = tmp_path_factory.mktemp("serve-models")
    fp32 = Path(shutil.copy(random_onnx, folder / "net.onnx"))
    static = Path(shutil.copy(static_onnx, folder / "static.onnx"))
    quantize(fp32, CALIBRATION, folder / "net.int8.onnx",
             options=QuantizeOptions(num_samples=8, check=False))
    repo = folder / "repo"
    package_triton([fp32, folder / "net.int8.onnx", static], repo)
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[TritonServer]:
    with running_triton(repository) as started:
        yield started


def _client(server: TritonServer, protocol: str) -> ServedClient:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return ServedClient(f"{protocol}://{url}")


# --- answers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_endpoint_answers_bit_for_bit_as_onnxruntime_here(
        repository: Path, server: TritonServer, protocol: str) -> None:
    """FP32, INT8 and static batch, tensors and photos: the same onnxruntime build on the
    same CPU gives the same bits, so anything but 0.0 is a serving bug."""
    from resnet_deploy.serving.proof import inprocess_outputs, prove_repository

    expected = inprocess_outputs(repository, PHOTOS)
    assert set(expected) == {"net", "net_int8", "static"}
    proof = prove_repository(repository, PHOTOS, expected, protocol=protocol,
                             server=server)
    assert proof, [c.result.reason for c in proof.failures]
    assert {(c.endpoint, c.sent) for c in proof.checks} == {
        (name, "tensor") for name in expected} | {(f"{n}_image", "photos") for n in expected}
    assert all(c.result.comparison.max_abs_diff == 0.0 for c in proof.checks)
    assert "Python onnxruntime backend" in proof.onnxruntime_backend


def test_photo_endpoint_equals_evaluates_preprocessing_on_real_photos(
        cifar_onnx: Path, tmp_path: Path) -> None:
    """The trained CIFAR model on the labelled dev photos, plus photos of every size and
    colour mode: ``<name>_image`` decodes and preprocesses exactly as ``evaluate`` does."""
    from resnet_deploy.data.folders import labelled_images
    from resnet_deploy.data.images import list_images, seeded_subset
    from resnet_deploy.serving.proof import inprocess_outputs
    from resnet_deploy.serving.repository import package_triton

    dev = seeded_subset(labelled_images(CIFAR_DEV).paths, 96)
    odd = list_images(IMAGENET_SAMPLES)
    photos = [*dev, *odd]
    package_triton([cifar_onnx], tmp_path / "repo")
    expected = inprocess_outputs(tmp_path / "repo", photos)["cifar"]
    with running_triton(tmp_path / "repo") as server:
        client = ServedClient(f"http://{server.http_url}")
        try:
            served = np.concatenate([client.infer(
                "cifar_image", {"image": np.array([[p.read_bytes()] for p in photos[i:i + 8]],
                                                  dtype=object)}, "logits")
                for i in range(0, len(photos), 8)])
        finally:
            client.close()
    assert np.array_equal(served, expected)
    assert (served.argmax(1) == expected.argmax(1)).all()


# --- bad requests ------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_each_bad_request_is_refused_and_the_next_good_one_answers(
        server: TritonServer, protocol: str) -> None:
    from resnet_deploy.core.errors import UserError

    client = _client(server, protocol)
    good = np.zeros((1, 3, 64, 64), np.float32)
    photo = PHOTOS[0].read_bytes()
    bad = {
        "wrong dtype": ("net", {"input": good.astype(np.float64)}, "logits", "FP64"),
        "wrong shape": ("net", {"input": np.zeros((1, 3, 32, 32), np.float32)}, "logits",
                        "shape"),
        "above max batch": ("net", {"input": np.zeros((33, 3, 64, 64), np.float32)}, "logits",
                            "batch"),
        "static batch of 2": ("static", {"input": np.zeros((2, 3, 64, 64), np.float32)},
                              "logits", "shape"),
        "undecodable": ("net_image", {"image": np.array([[b"not an image"]], dtype=object)},
                        "logits", "image 0"),
        "empty bytes": ("net_image", {"image": np.array([[b""]], dtype=object)}, "logits",
                        "image 0"),
        "one bad in a batch": ("net_image", {"image": np.array([[photo], [photo[:200]],
                                                                [photo]], dtype=object)},
                               "logits", "image 1"),
        "unknown model": ("nope", {"input": good}, "logits", "nope"),
    }
    try:
        for what, (model, inputs, output, says) in bad.items():
            with pytest.raises(UserError) as refused:
                client.infer(model, inputs, output)
            assert says.lower() in str(refused.value).lower(), (what, str(refused.value))
            assert client.infer("net", {"input": good}, "logits").shape == (1, 10), what
            one = {"image": np.array([[photo]], dtype=object)}
            assert client.infer("net_image", one, "logits").shape == (1, 10), what
    finally:
        client.close()


def test_concurrent_clients_are_batched_by_triton(server: TritonServer) -> None:
    """8 clients x 12 requests of one image: Triton's statistics show fewer executions
    than requests (dynamic batching), and every request answered."""
    from resnet_deploy.checks.served import stats_delta

    probe = _client(server, "http")
    before = probe.statistics("net")
    errors: list[BaseException] = []

    def client() -> None:
        mine = _client(server, "http")
        try:
            for _ in range(12):
                mine.infer("net", {"input": np.ones((1, 3, 64, 64), np.float32)}, "logits")
        except BaseException as exc:  # shown below, in the main thread
            errors.append(exc)
        finally:
            mine.close()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    delta = stats_delta(before, probe.statistics("net"))
    probe.close()
    assert not errors, errors[0]
    assert delta["inferences"] == 96
    assert 0 < delta["executions"] < delta["inferences"], delta


def test_bench_url_sweeps_the_served_model_beside_in_process(
        server: TritonServer, random_onnx: Path, tmp_path: Path) -> None:
    url = f"http://{server.http_url}"
    result = _invoke("bench", "--url", url, "--served-model", "net", "--model", random_onnx,
                     "--concurrency", "1,4", "--iterations", "24", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    levels = json.loads((tmp_path / "b.json").read_text())["levels"]
    assert [level["concurrency"] for level in levels] == [1, 4]
    for level in levels:
        assert level["errors"] == 0 and level["requests"] > 0
        assert level["throughput_ips"] > 0 and level["inprocess_ips"] > 0
        assert level["server"]["executions"] > 0
    assert "served/in-process" in result.output


# --- serve, the command ----------------------------------------------------------------------

def _leftovers() -> tuple[set[str], set[str]]:
    return ({p.name for p in Path("/dev/shm").glob("rdtriton*")},
            {p.name for p in Path("/tmp").glob("python_env_*")})


def _start(repository: Path, *extra: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """``resnet-deploy serve`` on free loopback ports, read until it says it serves."""
    proc = subprocess.Popen([*cli_command(), "serve", str(repository), "--http-port", "0",
                             "--grpc-port", "0", "--no-metrics", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    endpoints: dict[str, str] = {}
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    for line in proc.stdout:
        words = line.split()
        if len(words) == 2 and words[0] in ("http", "grpc"):
            endpoints[words[0]] = words[1]
        if "Ctrl-C or SIGTERM stops it" in line or time.monotonic() > deadline:
            break
    assert set(endpoints) == {"http", "grpc"}, proc.stderr.read() if proc.stderr else ""
    return proc, endpoints


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_serve_stops_clean_with_clients_connected(repository: Path, signum: int,
                                                  code: int) -> None:
    import tritonclient.http as http

    from resnet_deploy.serving.server import descendants

    before = _leftovers()
    proc, endpoints = _start(repository)
    assert endpoints["http"].startswith("http://127.0.0.1:")
    children = descendants(proc.pid)
    assert children, "no tritonserver under serve"
    client = http.InferenceServerClient(endpoints["http"].removeprefix("http://"),
                                        network_timeout=30)
    assert client.is_model_ready("net_image")  # a keep-alive connection stays open
    host, port = endpoints["grpc"].rsplit(":", 1)
    idle = socket.create_connection((host, int(port)), timeout=10)  # an idle gRPC peer
    start = time.monotonic()
    proc.send_signal(signum)
    try:
        rc = proc.wait(timeout=25)
    finally:
        proc.kill()
        idle.close()
        client.close()
    assert rc == code and time.monotonic() - start < 20
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert _leftovers() == before


def test_serve_a_model_that_fails_to_load_is_exit_2_with_tritons_reason(
        repository: Path, tmp_path: Path) -> None:
    """A graph that parses, so the repository check passes it, but that onnxruntime in the
    server cannot run: Triton's own reason, in one line."""
    import onnx

    broken = Path(shutil.copytree(repository, tmp_path / "repo"))
    model = onnx.load(str(broken / "net" / "1" / "model.onnx"))
    next(n for n in model.graph.node if n.op_type == "Relu").op_type = "NoSuchOp"
    onnx.save(model, str(broken / "net" / "1" / "model.onnx"))
    proc = subprocess.run([*cli_command(), "serve", str(broken), "--http-port", "0",
                           "--grpc-port", "0", "--no-metrics"], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "'net' failed to load" in last and "NoSuchOp" in last, last
    assert not subprocess.run(["pgrep", "-f", f"model-repository={broken}"],
                              capture_output=True).stdout


def _no_model_py(repo: Path) -> None:
    (repo / "net_image" / "1" / "model.py").unlink()


def _wrong_output_dims(repo: Path) -> None:
    config = repo / "net" / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: 10", "dims: 7", 1))


def _corrupt_model(repo: Path) -> None:
    (repo / "net" / "1" / "model.onnx").write_bytes(b"not a model")


@pytest.mark.parametrize("damage, message", [
    (_no_model_py, "net_image/config.pbtxt: Triton would refuse it: 1/model.py is missing"),
    (_wrong_output_dims, "net/config.pbtxt: Triton would refuse it: output 'logits': dims [7]"),
    (_corrupt_model, "net/1/model.onnx: not a readable ONNX model"),
])
def test_serve_refuses_a_repository_triton_would_refuse_before_starting(
        repository: Path, tmp_path: Path, damage: Any, message: str) -> None:
    """A missing model.py left Triton waiting out --ready-timeout; output dims that
    disagree with the graph were served. The package's rules now run first."""
    broken = Path(shutil.copytree(repository, tmp_path / "repo"))
    damage(broken)
    result = _invoke("serve", broken, "--http-port", "0", "--grpc-port", "0", "--no-metrics")
    assert result.exit_code == 2, result.output
    assert message in result.stderr.splitlines()[-1], result.stderr


@pytest.mark.parametrize("args, message", [
    (("--host", "no-such-host.invalid"), "--host 'no-such-host.invalid': no such address"),
    (("--http-port", "FREE", "--grpc-port", "FREE"), "--http-port and --grpc-port are both"),
    (("--http-port", "BUSY"), "is in use (--http-port)"),
    (("--grpc-port", "BUSY"), "is in use (--grpc-port)"),
    (("--metrics-port", "BUSY"), "is in use (--metrics-port)"),
    (("--log", "MISSING"), "its folder does not exist; create it or pass another --log"),
])
def test_serve_refuses_addresses_it_cannot_serve_on(repository: Path, tmp_path: Path,
                                                    args: tuple[str, ...], message: str) -> None:
    """Each was Triton loading every model and then dying (a port in use: after readiness
    was answered by the server holding it), a traceback (a host that does not resolve), an
    empty error line (one port twice), or a log never written (its folder missing)."""
    with socket.socket() as busy, socket.socket() as free:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        free.bind(("127.0.0.1", 0))
        values = {"BUSY": str(busy.getsockname()[1]), "FREE": str(free.getsockname()[1]),
                  "MISSING": str(tmp_path / "no-such-folder" / "triton.log")}
        metrics = () if "--metrics-port" in args else ("--no-metrics",)
        result = _invoke("serve", repository, "--http-port", "0", "--grpc-port", "0", *metrics,
                         *[values.get(a, a) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr.splitlines()[-1], result.stderr
    assert "Traceback" not in result.output


def test_a_port_left_in_time_wait_is_free_and_a_listening_one_is_not() -> None:
    """Triton binds with SO_REUSEADDR, so the check does too: the connections a stopped
    server leaves in TIME_WAIT (8000 after the README's server, in this suite) do not
    hold its port; a listening socket does."""
    from resnet_deploy.core.errors import UserError
    from resnet_deploy.serving.server import free_port

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
        time.sleep(0.1)
        client.close()
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use"):
            free_port("127.0.0.1", port, "http_port")
    assert free_port("127.0.0.1", port, "http_port") == port


def test_serve_names_the_flag_that_lets_a_slow_start_finish(repository: Path) -> None:
    result = _invoke("serve", repository, "--http-port", "0", "--grpc-port", "0",
                     "--no-metrics", "--ready-timeout", "0.001")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1].endswith("raise --ready-timeout"), result.stderr


def test_serve_check_images_proves_the_repository_and_stops(repository: Path,
                                                             tmp_path: Path) -> None:
    result = _invoke("serve", repository, "--check-images", CALIBRATION, "--limit", "6",
                     "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["passed"] and data["images"] == 6 and len(data["checks"]) == 12
    assert {c["protocol"] for c in data["checks"]} == {"http", "grpc"}
    assert "PASS" in result.output and "FAIL" not in result.output


def test_serve_without_the_wheel_names_the_install_command(
        repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import util

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec",
                        lambda name, *a: None if name == "pytriton" else real(name, *a))
    result = _invoke("serve", repository)
    assert result.exit_code == 2
    assert "pip install --no-deps nvidia-pytriton==0.7.0" in \
        result.stderr.splitlines()[-1]


def test_the_project_keeps_numpy_2_and_the_stub_env_numpy_1() -> None:
    from resnet_deploy.serving.stub_env import stub_env

    assert int(np.__version__.split(".")[0]) >= 2
    assert stub_env(build=False).versions()["numpy"].startswith("1.26.")


# --- pipeline --triton --------------------------------------------------------------------------

PIPELINE = ("pipeline", "--weights", "random", "--num-classes", "10", "--input-size", "64",
            "--exporter", "torchscript", "--calibration", CALIBRATION, "--num-samples", "8",
            "--bench-iterations", "2", "--min-top1", "0", "--min-cosine", "0", "--triton")


def test_pipeline_serves_its_repository_and_records_the_verdict(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke(*PIPELINE, "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    serve = manifest["steps"]["serve"]
    assert serve["status"] == "built" and serve["results"]["passed"] is True
    checks = serve["results"]["checks"]
    assert {(c["endpoint"], c["protocol"]) for c in checks} == {
        (e, p) for e in ("resnet18", "resnet18_image", "resnet18_int8", "resnet18_int8_image")
        for p in ("http", "grpc")}
    assert "parity_outputs.npz" in {o["path"] for o in manifest["steps"]["parity"]["outputs"]}
    report = (out / "report.md").read_text()
    assert "## Served by Triton 2.51" in report and "| resnet18_int8_image | photos |" in report
    assert _invoke("verify", out / "manifest.json").exit_code == 0
    again = _invoke(*PIPELINE, "-o", out)
    assert "serve: up to date" in again.output


def test_pipeline_fails_on_a_wrong_served_answer_and_skips_without_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from resnet_deploy.serving import stub_env

    infer = ServedClient.infer
    monkeypatch.setattr(ServedClient, "infer", lambda self, model, inputs, output: (
        infer(self, model, inputs, output) + (1.0 if model == "resnet18_image" else 0.0)))
    out = tmp_path / "out"
    result = _invoke(*PIPELINE, "-o", out)
    assert result.exit_code == 1, result.output
    assert "resnet18_image (photos, http)" in \
        result.stderr.splitlines()[-1]
    serve = json.loads((out / "manifest.json").read_text())["steps"]["serve"]
    assert serve["status"] == "failed" and serve["results"]["passed"] is False

    monkeypatch.setattr(ServedClient, "infer", infer)
    monkeypatch.setattr(stub_env, "unavailable", lambda: "the serve extra is not installed")
    result = _invoke(*PIPELINE, "-o", out)
    assert result.exit_code == 0, result.output
    assert "serve: skipped: the serve extra is not installed" in result.output
    serve = json.loads((out / "manifest.json").read_text())["steps"]["serve"]
    assert serve["status"] == "skipped"
    assert "Not served: the serve extra is not installed" in (out / "report.md").read_text()

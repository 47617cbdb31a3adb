"""bench: schema and sanity of the figures, interleaving, placement, strict providers, outputs,
the torch baseline, CLI start-up time, and the GPU check script (syntax and CPU smoke mode)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from resnet_deploy.checks import bench
from resnet_deploy.checks.bench import (BUSY_SPREAD, BenchOptions, BenchReport, BenchResult, Runner,
                                        _interleave, _summary, busy_warning, run_bench)
from resnet_deploy.cli import main
from resnet_deploy.core.errors import ProviderUnavailable, UserError
from resnet_deploy.weights.checkpoints import weights_for

from .conftest import assert_names_machine, cli_command

ROOT = Path(__file__).resolve().parents[1]
RESULT_KEYS = {"model", "provider", "batch_size", "p10_ms", "p50_ms", "p90_ms", "p99_ms",
               "mean_ms", "min_ms", "spread", "throughput_ips", "session_s", "peak_rss_mb",
               "placement"}
FAST = dict(warmup=1, iterations=6, block=2)


@pytest.fixture(scope="module")
def two_models(random_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The random model and an FP16 copy: two different models of the same shape."""
    from resnet_deploy.convert.fp16 import convert_fp16

    half = tmp_path_factory.mktemp("bench") / "random10.fp16.onnx"
    convert_fp16(random_onnx, half)
    return [random_onnx, half]


@pytest.fixture(scope="module")
def report(two_models: list[Path]) -> BenchReport:
    options = BenchOptions(batch_sizes=(1, 2), torch_baseline=True, threads=1, **FAST)
    return run_bench(two_models, options)


def test_json_schema_and_sane_values(report: BenchReport) -> None:
    data = json.loads(json.dumps(report.to_dict()))
    assert {"cpu", "cores", "providers", "versions"} <= set(data["machine"])
    assert "CPUExecutionProvider" in data["machine"]["providers"]
    assert "onnxruntime" in data["machine"]["versions"]
    for row in data["results"]:
        assert RESULT_KEYS <= set(row), RESULT_KEYS - set(row)
        assert 0 < row["min_ms"] <= row["p10_ms"] <= row["p50_ms"] <= row["p90_ms"] \
            <= row["p99_ms"]
        assert row["spread"] == pytest.approx(row["p90_ms"] / row["p10_ms"], rel=1e-2)
        assert row["min_ms"] <= row["mean_ms"]
        expected = row["batch_size"] * 1000.0 / row["p50_ms"]
        assert row["throughput_ips"] == pytest.approx(expected, rel=1e-3)
        assert row["session_s"] > 0 and row["peak_rss_mb"] > 50
        assert row["iterations"] == FAST["iterations"]


def test_every_model_at_every_batch_size_in_order(report: BenchReport,
                                                  two_models: list[Path]) -> None:
    keys = [(r.model, r.batch_size) for r in report.results]
    labels = [str(two_models[0]), str(two_models[1]), "torch"]
    assert keys == [(label, b) for b in (1, 2) for label in labels]
    first = [r for r in report.results if r.model == labels[0]]
    assert all(r.ratio_p50 == 1.0 for r in first)
    assert all(r.ratio_p50 and r.ratio_p50 > 0 for r in report.results)


def test_placement_shows_cpu_nodes(report: BenchReport, two_models: list[Path]) -> None:
    for result in report.results:
        if result.model == "torch":
            assert result.placement is None
        else:
            assert result.placement and result.placement.get("cpu", 0) > 0
            assert set(result.placement) == {"cpu"}
    assert {r.precision for r in report.results if r.model == str(two_models[1])} == {"fp16"}


def test_torch_baseline_present_and_says_its_weights(report: BenchReport) -> None:
    torch_rows = [r for r in report.results if r.model == "torch"]
    assert [r.provider for r in torch_rows] == ["torch-cpu", "torch-cpu"]
    assert any("random weights" in note for note in report.notes)


def test_fp16_on_cpu_carries_a_note(report: BenchReport) -> None:
    notes = [n for n in report.notes if "FP16 is a GPU format" in n]
    assert len(notes) == 1 and "`provider` cuda" in notes[0]


def _result(samples_ms: list[float], model: str = "m.onnx") -> BenchResult:
    figures = _summary([int(ms * 1e6) for ms in samples_ms], 1)
    return BenchResult(model=model, provider="cpu", batch_size=1, **figures, session_s=0.1,
                       peak_rss_mb=100.0, placement=None, precision="fp32",
                       iterations=len(samples_ms), io_binding=False, cuda_graph=False)


def test_busy_machine_is_named_quiet_machine_is_not() -> None:
    quiet = _result([5.0, 5.1, 5.2, 5.05, 5.15, 4.95, 5.0, 5.1, 5.3, 5.0])
    busy = _result([4.9, 5.0, 5.1, 5.0, 16.0, 15.0, 5.0, 14.0, 16.1, 5.2], "b.onnx")
    assert quiet.p10_ms <= quiet.p50_ms <= quiet.p90_ms and quiet.spread < BUSY_SPREAD
    assert busy.spread > 2.5
    assert busy_warning([quiet]) is None
    warning = busy_warning([quiet, busy])
    assert warning and warning.startswith("machine busy: compare ratios only")
    assert "b.onnx at batch 1" in warning and "1 of 2 rows" in warning


def test_busy_warning_printed_by_the_cli(random_onnx: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Timings with a slow tail in every third call, as when another job shares the cores."""
    def noisy(runners, inputs, options, say, batch, which=""):
        return [[(3_000_000 if i % 3 == 0 else 1_000_000) for i in range(12)] for _ in runners]

    monkeypatch.setattr(bench, "_interleave", noisy)
    result = CliRunner().invoke(main, ["bench", "--model", str(random_onnx), "--warmup", "1",
                                       "--no-placement"])
    assert result.exit_code == 0, result.output
    assert "1.00-3.00" in result.output  # the p10-p90 column
    lines = [line for line in result.output.splitlines() if "machine busy" in line]
    assert lines == ["warning: machine busy: compare ratios only (p90/p10 3.00 for "
                     f"{random_onnx.name} at batch 1, 1 of 1 rows above 1.5)"]


class _Recorder(Runner):
    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log, self.active = name, log, True

    def _activate_impl(self) -> None:
        pass

    def _deactivate_impl(self) -> None:
        pass

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        self.log.append(self.name)
        self.last_inference_ns = 1000
        return batch


_BATCH = np.zeros((1, 3, 8, 8), np.float32)


def test_round_robin_blocks_with_rotating_order() -> None:
    calls: list[str] = []
    runners = [_Recorder("a", calls), _Recorder("b", calls), _Recorder("c", calls)]
    lines: list[tuple[str, bool]] = []
    samples = _interleave(runners, [_BATCH] * 3, BenchOptions(iterations=6, block=2),
                          lambda m, transient=False: lines.append((m, transient)), 4,
                          " (2 of 3)")
    assert [len(s) for s in samples] == [6, 6, 6]
    assert "".join(calls) == "aabbcc" + "bbccaa" + "ccaabb"  # each model leads one round
    # A transient progress line after every block: the count so far and the time left.
    assert len(lines) == 9 and all(transient for _, transient in lines)
    assert lines[0][0].startswith("batch 4 (2 of 3): 2/18 timed runs of 3 models, ")
    assert lines[-1][0].startswith("batch 4 (2 of 3): 18/18 timed runs")
    assert all(" s left" in m for m, _ in lines)


def test_duration_mode_gives_equal_counts() -> None:
    calls: list[str] = []
    runners = [_Recorder("a", calls), _Recorder("b", calls)]
    options = BenchOptions(duration_s=10e-6, block=1)  # 10 us per runner at 1 us a call
    samples = _interleave(runners, [_BATCH] * 2, options, lambda m, transient=False: None, 1)
    assert len(samples[0]) == len(samples[1]) == 10


def test_io_binding_on_cpu_and_duration(random_onnx: Path) -> None:
    options = BenchOptions(batch_sizes=(2,), io_binding=True, duration_s=0.05, warmup=1,
                           block=1, placement=False)
    result = run_bench([random_onnx], options).results[0]
    assert result.io_binding and not result.cuda_graph and result.placement is None
    assert result.iterations >= 1 and result.p50_ms > 0


def test_torch_weights_default() -> None:
    """The PyTorch model behind an ONNX one: its own weights when they can be had."""
    assert weights_for({"source": "imagenet"}) == ("imagenet", None)
    assert weights_for({"source": __file__}) == (__file__, None)
    weights, note = weights_for({"source": "/no/such.pth"})
    assert weights == "random" and note and "/no/such.pth" in note
    weights, note = weights_for({"source": "random", "seed": 3})
    assert weights == "random" and note and "seed 3" in note
    assert weights_for(None, "x.pth") == ("x.pth", None)
    assert weights_for(None)[0] == "random" and "records no weights" in weights_for(None)[1]


def test_unavailable_provider_is_an_error_naming_the_install(random_onnx: Path) -> None:
    result = CliRunner().invoke(main, ["bench", "--model", str(random_onnx),
                                       "--provider", "cuda"])
    assert result.exit_code == 2, result.output
    assert "pip install 'resnet-deploy[cuda]'" in result.output
    with pytest.raises(ProviderUnavailable):
        run_bench([random_onnx], BenchOptions(provider="tensorrt"))


@pytest.mark.parametrize("args, message", [
    (["--cuda-graph"], "--cuda-graph needs --provider cuda or tensorrt"),
    (["--iterations", "3", "--duration", "1"], "either --iterations or --duration"),
    (["--batch-size", "1,x"], "comma-separated integers"),
])
def test_bad_options_exit_2(random_onnx: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["bench", "--model", str(random_onnx), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_missing_model_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such model file"):
        run_bench([tmp_path / "absent.onnx"], BenchOptions(**FAST))


def test_cli_writes_table_json_markdown_and_plot(random_onnx: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = {k: tmp_path / f"bench.{k}" for k in ("json", "md", "png")}
    result = CliRunner().invoke(main, [
        "bench", "--model", str(random_onnx), "--batch-size", "1,2", "--warmup", "1",
        "--iterations", "3", "--json", str(out["json"]), "--markdown", str(out["md"]),
        "--plot", str(out["png"])])
    assert result.exit_code == 0, result.output
    assert "p50 ms" in result.output and "p10-p90 ms" in result.output
    assert re.search(r"  CPU \d+\n", result.output)  # nodes on each provider
    assert "columns: p50 ms = median time of one call" in result.output
    data = json.loads(out["json"].read_text())
    assert_names_machine(data, result.output)
    assert "CPUExecutionProvider" in data["machine"]["providers"]
    assert [r["batch_size"] for r in data["results"]] == [1, 2]
    assert data["results"][0]["model"] == str(random_onnx)
    assert out["md"].read_text().count("\n| ") >= 3
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_fails_before_measuring(random_onnx: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["bench", "--model", str(random_onnx),
                                       "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 2
    assert "pip install 'resnet-deploy[plot]'" in result.output
    assert time.perf_counter() - start < 2 and not (tmp_path / "p.png").exists()


def test_help_starts_fast_and_imports_no_heavy_module() -> None:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([*cli_command(), "--help"], check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    assert best < 0.5, f"resnet-deploy --help took {best:.2f}s (best of 3)"
    code = ("import sys, resnet_deploy.cli; print(sorted({'torch', 'onnxruntime', 'onnx', "
            "'matplotlib', 'numpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == "[]"


# --- scripts/gpu_check.sh ---------------------------------------------------------------------

SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _gpu_check_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work"),
            "SHARED_DIR": str(tmp_path / "no-shared"), **extra}


def test_gpu_check_dry_run_lists_gpu_steps(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "r"), "--dry-run"],
                          env=_gpu_check_env(tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for needle in ("bench-r224-cuda:", "--cuda-graph", "bench-r224-tensorrt-graph:",
                   "--io-binding", "convert-fp16", "--batch-size 1,32,256"):
        assert needle in proc.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["counts"]["dry-run"] >= 8


def test_gpu_check_cpu_smoke_mode(random_onnx: Path, tmp_path: Path) -> None:
    """The whole flow on CPU with a prebuilt model: steps recorded, results written."""
    model = tmp_path / "m.onnx"
    shutil.copy(random_onnx, model)
    results = tmp_path / "results"
    env = _gpu_check_env(tmp_path, GPU_CHECK_PROVIDERS="cpu", GPU_CHECK_MODELS=str(model),
                         GPU_CHECK_ITERATIONS="3", GPU_CHECK_WARMUP="1",
                         GPU_CHECK_BATCHES="1")
    proc = subprocess.run(["bash", str(SCRIPT), str(results)], env=env, capture_output=True,
                          text=True, timeout=240, cwd=tmp_path)
    summary = json.loads((results / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert steps["fp16-m"]["status"] == "ok", proc.stderr
    assert steps["bench-m-cpu"]["status"] == "ok", (results / "logs/bench-m-cpu.log").read_text()
    assert steps["bench-gpu"]["status"] == "skipped"
    assert {"parity-m", "quantize-m"} <= set(steps)
    # On CPU every step that can run must succeed; only the GPU steps are skipped.
    failed = {name: s["status"] for name, s in steps.items()
              if s["status"] not in ("ok", "skipped")}
    assert not failed, (failed, proc.stderr[-2000:])
    assert proc.returncode == 0 and summary["passed"]
    bench = json.loads((results / "bench-m-cpu.json").read_text())
    models = [r["model"] for r in bench["results"]]
    assert str(model) in models and "torch" in models and len(models) >= 3


@pytest.mark.gpu
def test_cuda_io_binding_and_cuda_graph(two_models: list[Path]) -> None:
    options = BenchOptions(provider="cuda", batch_sizes=(1, 4), io_binding=True,
                           cuda_graph=True, warmup=3, iterations=10, block=2)
    report = run_bench(two_models, options)
    assert len(report.results) == 4
    for result in report.results:
        assert result.provider == "cuda" and result.io_binding and result.cuda_graph
        assert result.placement and result.placement.get("cuda", 0) > 0
        assert result.p50_ms <= result.p99_ms
    assert "gpu" in report.machine


@pytest.mark.gpu
def test_cuda_io_binding_with_torch_baseline(random_onnx: Path) -> None:
    options = BenchOptions(provider="cuda", batch_sizes=(8,), io_binding=True,
                           torch_baseline=True, warmup=3, iterations=10)
    report = run_bench([random_onnx], options)
    assert [r.model for r in report.results] == [str(random_onnx), "torch"]
    assert report.results[0].throughput_ips > 0

"""Tests for the speed benchmark (svhn.bench): it runs, reports and computes its ratios.

Only the shape of the report is checked; speed itself is measured by ``python -m svhn.bench``,
never by a timed test.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch

from svhn.analysis import bench, timing
from svhn.data.datamodule import SVHNDataModule
from svhn.inference.predictor import PREDICT_BATCH_SIZE

TINY_RUN = ["--backbones", "simple_cnn", "--batch_size", "8", "--max_batches", "2",
            "--repeats", "1", "--num_workers", "0", "--device", "cpu", "--threads", "1"]
MEASUREMENTS = ("cache_build", "pipeline", "tutorial_pipeline")
BACKBONE_MEASUREMENTS = ("model_alone", "end_to_end", "end_to_end_device_augment", "predict",
                         "tutorial_predict")
STAGES = ("gather", "device_augment")


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return timing.prepare_synthetic(tmp_path_factory.mktemp("bench") / "data", 24, 12)


@pytest.fixture(scope="module")
def bench_run(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny benchmark run with --json and --out: its stdout, stderr and written file."""
    out_file = tmp_path_factory.mktemp("report") / "bench.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = bench.main([*TINY_RUN, "--data_dir", str(synthetic_dir), "--json",
                           "--out", str(out_file)])
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
            "file": out_file.read_text()}


def is_positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_json_report_has_every_measurement_as_positive_rate(bench_run: dict) -> None:
    assert bench_run["code"] == 0
    report = json.loads(bench_run["stdout"])  # stdout holds exactly one JSON object
    for name in MEASUREMENTS:
        assert is_positive_number(report[name]["images_per_s"]), name
    assert is_positive_number(report["cache_build"]["seconds"])
    assert list(report["backbones"]) == ["simple_cnn"]
    for name in BACKBONE_MEASUREMENTS:
        measurement = report["backbones"]["simple_cnn"][name]
        assert is_positive_number(measurement["images_per_s"]), name
        assert all(is_positive_number(run) for run in measurement["runs"]), name
    env = report["environment"]
    assert env["device"] == "cpu" and env["num_workers"] == 0 and env["torch_threads"] >= 1


def test_stages_say_where_the_time_goes(bench_run: dict) -> None:
    report = json.loads(bench_run["stdout"])
    stages = report["stages"]
    for name in STAGES:
        assert is_positive_number(stages[name]["images_per_s"]), name
    for name in ("gather", "albumentations"):
        assert is_positive_number(stages["per_core"][name]["images_per_s"]), name
    assert stages["host_to_device"] is None  # on the CPU nothing is copied
    assert stages["device_augment"]["backend"] == "opencv"  # CPU tensors: the OpenCV backend
    assert report["config"]["augment"] == "baseline" and report["config"]["cache_scale"] == 1


def test_cores_to_feed_a_model_round_up() -> None:
    assert bench.cores_to_feed(20_000, 1_500) == 14
    assert bench.cores_to_feed(100, 1_500) == 1


def test_ratios_are_computed_from_the_measurements(bench_run: dict) -> None:
    report = json.loads(bench_run["stdout"])
    simple = report["backbones"]["simple_cnn"]
    expected = {
        ("pipeline / tutorial pipeline", None): (
            report["pipeline"]["images_per_s"] / report["tutorial_pipeline"]["images_per_s"], 3.0),
        ("end-to-end / model alone", "simple_cnn"): (
            simple["end_to_end"]["images_per_s"] / simple["model_alone"]["images_per_s"], None),
        ("predict / tutorial predict", "simple_cnn"): (
            simple["predict"]["images_per_s"] / simple["tutorial_predict"]["images_per_s"], 2.0),
        ("per-core: gather / albumentations", None): (
            report["stages"]["per_core"]["gather"]["images_per_s"]
            / report["stages"]["per_core"]["albumentations"]["images_per_s"], 10.0),
        ("e2e device aug / e2e cpu aug", "simple_cnn"): (
            statistics.median(simple["end_to_end_device_augment"]["paired"]), None),
    }
    found = {(r["name"], r["backbone"]): r for r in report["ratios"]}
    assert set(found) == set(expected)
    for key, (value, target) in expected.items():
        ratio = found[key]
        assert ratio["value"] == pytest.approx(value)
        assert ratio["target"] == target
        assert ratio["pass"] == (None if target is None else value >= target)


def test_end_to_end_epochs_take_turns_and_pair_up(bench_run: dict) -> None:
    simple = json.loads(bench_run["stdout"])["backbones"]["simple_cnn"]
    cpu, device = simple["end_to_end"], simple["end_to_end_device_augment"]
    assert len(cpu["runs"]) == len(device["runs"]) == 1  # --repeats 1, after a warm-up turn
    assert device["paired"] == pytest.approx(
        [d / c for d, c in zip(device["runs"], cpu["runs"])])
    assert "paired" not in cpu


def test_table_is_printed_and_json_written_to_out(bench_run: dict) -> None:
    table = bench_run["stderr"]
    for text in ("cache build", "pipeline", "tutorial pipeline", "simple_cnn",
                 "predict / tutorial predict", "torch threads", "num_workers: 0",
                 "gather + collate", "pipeline capacity per CPU core", "cores to feed simple_cnn",
                 "host-to-device copy", "e2e dev aug"):
        assert text in table
    assert "PASS" in table or "FAIL" in table
    assert json.loads(bench_run["file"]) == json.loads(bench_run["stdout"])


def test_resnet18_end_to_end_ratio_has_the_target() -> None:
    rate = {"images_per_s": 1.0}
    report = {"pipeline": rate, "tutorial_pipeline": rate,
              "backbones": {"resnet18": dict.fromkeys(BACKBONE_MEASUREMENTS, rate)}}
    report["backbones"]["resnet18"]["end_to_end_device_augment"] = {
        "images_per_s": 1.0, "paired": [0.9, 1.2, 1.1]}
    ratios = {(r["name"], r["backbone"]): r for r in bench.compute_ratios(report)}
    assert ratios[("end-to-end / model alone", "resnet18")]["target"] == 0.9
    assert ratios[("end-to-end / model alone", "resnet18")]["pass"] is True
    paired = ratios[("e2e device aug / e2e cpu aug", "resnet18")]
    assert paired["target"] == 1.0 and paired["value"] == pytest.approx(1.1)  # the median
    assert ratios[("pipeline / tutorial pipeline", None)]["pass"] is False


def test_compile_is_measured_against_eager(synthetic_dir: Path, monkeypatch) -> None:
    # torch.compile itself takes minutes on 2 cores: here it is the identity, and the test
    # checks that --compile adds the eager measurement, its ratio and the warm-up time.
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **_: compiled.append(module) or module)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        bench.main([*TINY_RUN, "--max_batches", "1", "--data_dir", str(synthetic_dir),
                    "--compile", "--json"])
    report = json.loads(stdout.getvalue())
    simple = report["backbones"]["simple_cnn"]
    assert compiled and is_positive_number(simple["model_alone_eager"]["images_per_s"])
    assert is_positive_number(simple["model_alone"]["warmup_s"])
    ratio = next(r for r in report["ratios"] if r["name"] == "compiled / eager model alone")
    assert ratio["value"] == pytest.approx(simple["model_alone"]["images_per_s"]
                                           / simple["model_alone_eager"]["images_per_s"])
    assert "torch.compile warm-up" in stderr.getvalue()


def test_the_tutorial_reference_runs_as_the_tutorial_does() -> None:
    ours = bench.BenchConfig(precision="bf16-mixed", channels_last=True, compile=True)
    reference = bench.tutorial_settings(ours)
    assert (reference.precision, reference.channels_last, reference.compile) == \
        ("32-true", False, False)
    cpu = torch.device("cpu")
    with bench.autocast(ours, cpu):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with bench.autocast(reference, cpu):
        assert not torch.is_autocast_enabled("cpu")


def test_synthetic_set_is_reused_when_it_matches(synthetic_dir: Path) -> None:
    marker = synthetic_dir / "SYNTHETIC_DATASET.txt"
    before = marker.stat().st_mtime_ns
    assert timing.prepare_synthetic(synthetic_dir, 24, 12) == synthetic_dir
    assert marker.stat().st_mtime_ns == before


# ------------------------------------------------------------------ --search and --scale


@pytest.mark.parametrize("majority", [None, 0.5])
def test_the_search_bench_times_both_searches_and_its_sweep_matches_the_gated_pass(
        easy_zoom_run, tmp_path, monkeypatch, majority) -> None:
    """The sweep's scores come from the full pass alone; the gated pass is a real second
    run, so at the timed gate the two must agree, image for image counted (with a
    majority: the reader's two-step search against the sweep's replay of it)."""
    out = tmp_path / "search.json"
    steps = [] if majority is None else ["--search_majority", str(majority)]
    cached = []  # the splits whose image cache the bench builds or opens
    built_cache = SVHNDataModule._built_cache

    def recording_built_cache(self, split, root):
        cached.append(split)
        return built_cache(self, split, root)

    monkeypatch.setattr(SVHNDataModule, "_built_cache", recording_built_cache)
    code = bench.main(["--search", str(easy_zoom_run.best), "--data_dir",
                       str(easy_zoom_run.data_dir), "--split", "val", "--gate", "0.2",
                       "--batch_size", "16", "--num_workers", "0", "--device", "cpu",
                       "--repeats", "2", "--out", str(out), *steps])
    assert code == 0
    report = json.loads(out.read_text())["search"][0]
    assert report["images"] == 81 and report["gate"] == 0.2 and report["batch_size"] == 16
    assert set(cached) == {"val"}  # the split searched only: never the train set's cache
    for key in ("full", "gated"):  # each pass timed twice, its median reported
        each = report[key]["seconds_each"]
        assert len(each) == 2 and report[key]["seconds"] == pytest.approx(sum(each) / 2)
    assert report["majority"] == majority
    for row in report["sweep"]:
        assert row["every_window_share"] <= row["searched_share"] + 1e-9
        if majority is None:
            assert row["every_window_share"] == row["searched_share"]
    assert report["full"]["images_per_s"] > 0 and report["gated"]["images_per_s"] > 0
    # Crops read per image: the whole image, then 29 chains of the same zoom steps in the
    # full search; fewer where the gate searched fewer images.
    full_reads, gated_reads = (report[key]["reads_per_image"] for key in ("full", "gated"))
    assert full_reads > 1 and (full_reads - 1) % 29 == pytest.approx(0)
    assert gated_reads <= full_reads
    if report["gated"]["searched_share"] < 1:
        assert gated_reads < full_reads
    at_gate = next(row for row in report["sweep"] if row["gate"] == 0.2)
    assert at_gate["score"] == pytest.approx(report["gated"]["score"], abs=1e-6)
    assert at_gate["searched_share"] == pytest.approx(report["gated"]["searched_share"])
    # Image by image, the gated pass strays from the full one where the sweep says it does.
    gated = report["gated"]
    assert (gated["changed"], gated["changed_full_right"], gated["changed_gated_right"]) == (
        at_gate["missed_changes"], at_gate["missed_full_right"], at_gate["missed_first_right"])
    full_row = next(row for row in report["sweep"] if row["gate"] == 1.0)
    assert full_row["searched_share"] == 1.0
    assert full_row["score"] == pytest.approx(report["full"]["score"], abs=1e-6)
    shares = [row["searched_share"] for row in report["sweep"]]
    assert shares == sorted(shares)  # a higher gate never searches fewer images


def test_the_scale_bench_measures_each_size_in_its_own_process(tmp_path) -> None:
    out = tmp_path / "scale.json"
    code = bench.main(["--scale", "--scale_train", "24", "48", "--scale_test", "16",
                       "--synthetic_dir", str(tmp_path / "data"), "--image_size", "32", "64",
                       "--backbones", "simple_cnn", "--batch_size", "8", "--num_workers", "0",
                       "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [row["train_size"] for row in rows] == [24, 48]
    assert [row["train_images"] for row in rows] == [24, 48]
    assert [row["test_images"] for row in rows] == [8, 16]  # in proportion
    for row in rows:
        for key in ("cache_ms_per_image", "epoch_ms_per_image", "predict_ms_per_image",
                    "peak_anonymous_mb", "peak_resident_mb"):
            assert row[key] > 0, key
    assert set(report["largest_over_smallest"]) == {
        "cache_ms_per_image", "epoch_ms_per_image", "predict_ms_per_image"}
    assert out.with_suffix(".png").stat().st_size > 10_000  # the log-log figure


def test_the_gpu_check_script_parses_and_says_why_it_cannot_run_without_a_gpu(tmp_path):
    import subprocess

    from helpers.repository import REPO

    script = REPO / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run the script itself")
    # The script calls python3: this interpreter's, as in an activated environment.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    done = subprocess.run(["bash", str(script)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "PATH": path})
    assert done.returncode != 0
    assert "no CUDA device visible to torch" in done.stderr
    assert not (tmp_path / "out" / "bench.json").exists()  # nothing measured, nothing faked


@pytest.mark.parametrize("steady, batches, rate", [
    (False, 4, 4 * 8 / 8.0),  # the whole epoch: the slow first batch counts
    (True, 4, 3 * 8 / 3.0),  # after the first batch: the steady state
    (True, 1, 1 * 8 / 5.0),  # one batch only: nothing after it, the epoch timed whole
])
def test_the_epoch_timer_leaves_the_first_batch_out_when_steady(monkeypatch, steady, batches,
                                                                rate):
    # The clock: the epoch starts at 0, the first batch (the workers' start) ends at 5,
    # each later one 1 s after the last; the epoch ends with its last batch.
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    timer = timing.EpochTimer(torch.device("cpu"), steady=steady)
    batch = {"image": torch.zeros(8, 3, 4, 4)}
    timer.on_train_epoch_start(None, None)
    for index in range(batches):
        now[0] = 5.0 + index
        timer.on_train_batch_end(None, None, None, batch, index)
    timer.on_train_epoch_end(None, None)
    assert timer.rates == [pytest.approx(rate)]


def test_timm_args_reach_the_benched_reader_written_as_fit_takes_them(capsys) -> None:
    narrow = {"channels": [32, 64, 128, 256], "stem_width": 16}  # configs/real_cpu.yaml's
    # JSON, and YAML's flow form as `svhn.fit --model.timm_args` and the README write it
    for text in ('{"channels": [32, 64, 128, 256], "stem_width": 16}',
                 "{channels: [32, 64, 128, 256], stem_width: 16}"):
        cfg, _ = bench.parse_args(["--backbones", "resnet18d", "--timm_args", text])
        assert cfg.timm_args == narrow
    body = bench.build_model("resnet18d", cfg, torch.device("cpu")).backbone  # the timm ResNet
    assert body.conv1[0].out_channels == 16 and body.layer4[-1].conv2.out_channels == 256
    for bad in ("{channels: [32}", "[32, 64]", "16"):
        with pytest.raises(SystemExit) as stop:
            bench.parse_args(["--timm_args", bad])
        assert stop.value.code == 2
        assert "--timm_args" in capsys.readouterr().err


def test_the_search_is_timed_at_the_batch_svhn_predict_reads_in() -> None:
    """--search measures svhn.predict's path, so by default at its batch too (the speed-up
    moved from 3.7x to 4.2x between 64 and 128 on one machine); other modes keep theirs."""
    search, _ = bench.parse_args(["--search", "run.ckpt", "--data_dir", "data"])
    assert search.batch_size == PREDICT_BATCH_SIZE
    stages, _ = bench.parse_args([])
    assert stages.batch_size == bench.BenchConfig().batch_size != PREDICT_BATCH_SIZE
    chosen, _ = bench.parse_args(["--search", "run.ckpt", "--batch_size", "16"])
    assert chosen.batch_size == 16

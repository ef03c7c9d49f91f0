"""common.bench's folder modes: host overhead per step, training-loader throughput, one-device projections."""

from __future__ import annotations

import dataclasses
import json

import pytest

from common.bench import (
    FOLDER_CASES,
    ROOT,
    host_overhead,
    loader_throughput,
    main,
    projection,
    read_results,
    step_times,
)
from common.errors import ConfigError

# UNet_nested on the smallest demo data: 24 images, 19 for training, 4 steps per epoch at batch 4.
TINY_UNET = dataclasses.replace(FOLDER_CASES["UNet_nested"], demo_n=None, batch=4)


def _event(kind, wall, cpu, own_wall=0.0, own_cpu=0.0):
    return (kind, wall, cpu, own_wall, own_cpu)


def test_step_times_are_the_intervals_between_optimizer_steps_that_no_validation_interrupted():
    events = [
        _event("train", 0.0, 0.0),
        _event("step", 1.0, 0.5, 0.1, 0.1),  # step 1: warm-up
        _event("train", 1.1, 0.6, 0.1, 0.1),
        _event("step", 3.0, 1.5, 0.4, 0.3),  # step 2: warm-up
        _event("train", 3.1, 1.6, 0.4, 0.3),
        _event("train", 3.2, 1.7, 0.4, 0.3),  # two micro-batches
        _event("step", 6.0, 3.5, 1.0, 0.8),  # step 3: 3.0 s wall, 2.0 s CPU of which 0.5 the stand-in's
        _event("eval", 6.5, 3.6, 1.0, 0.8),  # validation: the next interval is not a step's
        _event("train", 7.0, 3.7, 1.0, 0.8),
        _event("step", 8.0, 4.0, 1.1, 0.9),
        _event("train", 8.1, 4.1, 1.1, 0.9),
        _event("step", 9.0, 4.5, 1.2, 1.0),  # step 5: 1.0 s wall, 0.5 s CPU, 0.1 the stand-in's
    ]
    times = step_times(events, warmup=2)
    assert times["wall"] == pytest.approx([3.0, 1.0])
    assert times["cpu"] == pytest.approx([2.0, 0.5])
    assert times["own_cpu"] == pytest.approx([0.5, 0.1])
    assert times["host_cpu"] == pytest.approx([1.5, 0.4])
    assert times["forwards"] == [2, 1]
    assert step_times(events, warmup=5)["wall"] == []


def test_projection_is_the_least_of_the_compute_host_and_loader_bounds():
    flops = 3e11
    row = projection("AttU_Net", flops_per_image=flops, host_cpu_s_per_image=0.002, loader_per_core=100.0,
                     peak_tflops=500.0, workers=8)  # fmt: skip
    assert row["compute_bound"] == pytest.approx(500e12 / flops)
    assert row["host_bound"] == pytest.approx(500.0) and row["loader_bound"] == pytest.approx(800.0)
    assert row["bound_by"] == "host" and row["projected_images_per_s"] == pytest.approx(500.0)
    assert row["projected_over_best_published"] == pytest.approx(500.0 / 846)
    starved = projection("UNet_mindspore", flops_per_image=flops, host_cpu_s_per_image=None, loader_per_core=10.0,
                         peak_tflops=500.0, workers=8)  # fmt: skip
    assert starved["bound_by"] == "loader" and "host_bound" not in starved
    assert starved["projected_over_best_published"] is None


def test_results_are_the_median_over_invocations_of_one_checkout(tmp_path):
    rows = [
        {"mode": "host_overhead", "folder": "VNet", "tree": str(ROOT), "host_cpu_ms_per_image": ms}
        for ms in (2.0, 4.0, 3.0)
    ] + [
        {"mode": "loader", "folder": "AttU_Net", "tree": str(ROOT), "samples_per_worker_cpu_s": 100.0},
        {"mode": "loader", "folder": "AttU_Net", "tree": "/elsewhere", "samples_per_worker_cpu_s": 1.0},
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    host, loader = read_results(path, ROOT)
    assert host == {"VNet": pytest.approx(0.003)} and loader == {"AttU_Net": 100.0}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_data")


def test_host_overhead_times_the_real_entry_point_with_a_one_by_one_convolution(data_dir):
    row = host_overhead(
        "UNet_nested", steps=6, warmup=2, runs=1, workers=0, data_dir=data_dir, case=TINY_UNET
    )
    # steps 3, 4 and 6 (step 5 follows the first epoch's validation)
    assert row["steps_timed"] == [3] and row["forwards_per_step"] == 1 and row["batch"] == 4
    # the stand-in ran (its own compute is counted apart) and the rest of the step costs host time
    assert row["stub_cpu_ms_per_step"] > 0 and row["host_cpu_ms_per_step"] > 0
    assert row["cpu_ms_per_step"] == pytest.approx(
        row["stub_cpu_ms_per_step"] + row["host_cpu_ms_per_step"], rel=0.5
    )
    assert row["host_bound_images_per_s"] == pytest.approx(4000 / row["host_cpu_ms_per_step"])
    # the extra counting run: the step's loss, backward, metrics and optimizer are operator calls
    assert 20 < row["ops_per_step"] < 2000


def test_step_times_count_the_operator_calls_between_optimizer_steps():
    events = [_event("step", 1.0, 0.5) + (100,), _event("train", 1.1, 0.6) + (101,),
              _event("step", 2.0, 1.0) + (260,), _event("eval", 2.5, 1.1) + (300,),
              _event("step", 3.0, 1.5) + (900,), _event("step", 4.0, 2.0) + (1050,)]  # fmt: skip
    assert step_times(events, warmup=0)["ops"] == [160, 150]
    assert step_times([e[:5] for e in events], warmup=0)["ops"] == [0, 0]  # a run that did not count


def test_loader_mode_reads_the_folders_training_dataset_with_one_worker(data_dir):
    row = loader_throughput("UNet_nested", batches=2, runs=1, data_dir=data_dir, case=TINY_UNET)
    assert row["dataset"] == "NucleiDataset" and row["sample_shapes"] == [[3, 96, 96], [1, 96, 96]]
    assert row["batch"] == 4 and row["samples_per_s"] > 0 and row["samples_per_worker_cpu_s"] > 0


def test_folder_modes_refuse_what_they_cannot_measure(tmp_path):
    with pytest.raises(ConfigError, match="VNet/benchmark.py|benchmark.py loader"):
        loader_throughput("VNet", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="not a checkout"):
        host_overhead("UNet_nested", tree=tmp_path, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="--steps"):
        host_overhead("UNet_nested", steps=3, warmup=5, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="--loader_rate"):
        main(["--projection", "--results", str(tmp_path / "none.jsonl"), "--loader_rate", "VNet:12"])

"""The benchmark measures every model of the zoo (tiny sizes: it must measure, not be fast)."""

from __future__ import annotations

import json

import pytest
import torch

from common.bench import MODELS, load_factory, main, run_benchmark
from common.device import select_device
from common.errors import ConfigError

TINY = {
    "U_Net": (3, 16, 16),
    "R2U_Net": (3, 16, 16),
    "AttU_Net": (3, 16, 16),
    "R2AttU_Net": (3, 16, 16),
    "UNet": (3, 16, 16),
    "NestedUNet": (3, 16, 16),
    "UNetMedical": (1, 188, 188),
    "VNet": (1, 32, 16, 16),
}
PARAMS = {"U_Net": 34_527_041, "R2U_Net": 39_091_393, "AttU_Net": 34_878_573, "R2AttU_Net": 39_442_925,
          "UNet": 7_852_545, "NestedUNet": 9_163_329, "UNetMedical": 31_030_658, "VNet": 45_603_934}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_is_measured(name):
    factory, kwargs, _ = MODELS[name]
    batch = 1 if name in ("UNetMedical", "VNet") else 2  # BatchNorm needs 2 values at the 1x1 bottleneck
    result = run_benchmark(name, load_factory(factory), kwargs, TINY[name], batch=batch, device=select_device("cpu"),
                           steps=1, warmup=0, inference=name != "VNet")  # fmt: skip
    assert result.params == PARAMS[name]
    assert result.train_images_per_s > 0 and result.train_step_ms_median > 0
    assert result.train_gflop_per_step > 0 and result.achieved_tflops > 0
    assert 0 <= result.data_wait_fraction < 1 and result.peak_host_rss_mb > 0
    if name != "VNet":
        assert result.infer_images_per_s > 0


def test_cli_with_an_external_factory_prints_json_and_a_table(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    # one --size number means a square input, as for --model
    main(["--model_factory", "common/tests/toy/train.py:ToyNet", "--channels", "1", "--size", "16",
          "--batch", "2", "--steps", "2", "--warmup", "1", "--amp", "O2", "--channels_last", "--json", str(out)])  # fmt: skip
    row = json.loads(out.read_text().splitlines()[0])
    assert row["input_shape"] == [1, 16, 16]
    assert row["precision"] == "bf16" and row["channels_last"] and row["train_images_per_s"] > 0
    assert "train img/s" in capsys.readouterr().out


def test_channels_last_is_channels_last_3d_for_a_volume_network(monkeypatch):
    seen = []
    real_contiguous = torch.Tensor.contiguous

    def contiguous(self, *args, **kwargs):  # every input the benchmark lays out
        seen.append(kwargs.get("memory_format", args[0] if args else torch.contiguous_format))
        return real_contiguous(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)
    factory, kwargs, _ = MODELS["VNet"]
    result = run_benchmark("VNet", load_factory(factory), kwargs, TINY["VNet"], batch=1, device=select_device("cpu"),
                           steps=1, warmup=0, inference=False, channels_last=True)  # fmt: skip
    assert result.channels_last and seen and set(seen) == {torch.channels_last_3d}


def test_bad_factories_are_clear():
    with pytest.raises(ConfigError, match="package.module:function"):
        load_factory("no_colon")
    with pytest.raises(ConfigError, match="does not exist"):
        load_factory("nowhere/missing.py:Net")


def test_conv_algo_auto_is_measured_with_its_selection_time_apart(tmp_path):
    out = tmp_path / "bench.jsonl"
    for algo in ("direct", "auto"):
        main(["--model", "UNet", "--size", "16", "--batch", "2", "--steps", "1", "--warmup", "1",
              "--no_inference", "--conv_algo", algo, "--json", str(out)])  # fmt: skip
    direct, auto = (json.loads(line) for line in out.read_text().splitlines())
    assert auto["conv_algo"] == "auto" and auto["compile_seconds"] > 0 and auto["train_images_per_s"] > 0
    assert direct["compile_seconds"] is None
    # FLOPs are the network's convolutions, whichever algorithm runs them
    assert auto["train_gflop_per_step"] == direct["train_gflop_per_step"] > 0

"""Every folder's ModelZoo performance scripts on a node that looks like an Ascend NPU node with apex: the
real scripts and trainers, with torch_npu, Ascend's apex.amp and an "hccl" process group faked for whole
processes by common/fakes/site/sitecustomize.py (MODELZOO_FAKE_NPU=<devices>). The shell library then
counts NPUs, asks for O2 mixed precision, and every rank runs the NPU code paths on the CPU.

Also the unit cases of what those runs rely on: the site module's pieces, and DDP's device_ids.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.demo_data import write_dsb2018, write_isbi2012, write_isic2018, write_luna16
from common.device import DeviceInfo
from common.distributed import DistContext
from common.summary import parse_summary
from common.testing import REPO_ROOT, child_env

SITE = REPO_ROOT / "common" / "fakes" / "site"
FOLDERS = ("AttU_Net", "R2U_Net", "UNet_nested", "UNet_mindspore", "VNet")
# Two ranks for the three folders whose 2-rank run is quickest: all ten runs take about 4.7 minutes on two
# cores, over this file's share of CI. AttU_Net and R2U_Net (about 32 s each) share common/isic/solver.py,
# whose two-rank path their own tests/test_scripts.py run on the CPU.
TWO_RANK_FOLDERS = ("UNet_nested", "UNet_mindspore", "VNet")
_NOT_COPIED = ("output", "demo_data", "models", "work", "result", "tests", "__pycache__", "*.pth*", "*.onnx")

# Per folder: the demo dataset, the CaseName's network, the global batch for 1 and 2 ranks, and the
# pass-through flags that make a run a few steps on tiny inputs (the folders' own script tests use them),
# with one BatchNorm-recomputation batch (bf16 convolutions of the fake apex are slow on CPUs without bf16).
ISIC = ["--image_size=32", "--epochs=1", "--workers=0", "--max_steps=2", "--precise_bn_batches=1"]
CASES = {
    "AttU_Net": ("isic2018", "AttU_Net", 2, 4, ISIC),
    "R2U_Net": ("isic2018", "R2U_Net", 2, 4, ISIC),
    "UNet_nested": ("dsb2018", "UNet", 4, 4, ["--input_w=32", "--input_h=32", "--workers=0", "--train_steps=2", "--precise_bn_batches=1"]),
    "UNet_mindspore": (
        "isbi2012", "UNet_mindspore", 1, 2,
        ["--epochs=1", "--image_size=188", "--workers=0", "--train_steps=2", "--precise_bn_batches=1"],
    ),
    "VNet": (
        "luna16", "VNet", 2, 2,
        ["--epochs=1", "--vox_spacing=4", "--volume_size=32x32x32", "--patch_size=16x32x32", "--val_overlap=0",
         "--samples_per_volume=1", "--workers=0", "--max_steps=2", "--precise_bn_batches=1"],
    ),
}  # fmt: skip


def fake_npu_env(devices: int | str = 8, *, repo: Path | None = None, **extra: str) -> dict[str, str]:
    """A child's environment on the fake NPU node: the site module (and `repo`, which holds the `common`
    it imports; the scripts put their own first) on the path, one torch thread."""
    env = child_env(threads=1, MODELZOO_FAKE_NPU=str(devices), **extra)
    paths = [
        str(SITE),
        *([str(repo)] if repo else []),
        *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []),
    ]
    env["PYTHONPATH"] = ":".join(paths)
    return env


# ---------------------------------------------------------------- unit cases
class _RecordingDDP:
    def __init__(self, module, device_ids=None, **kwargs):
        self.module, self.device_ids = module, device_ids


@pytest.mark.parametrize(
    ("device", "ids"),
    [
        (DeviceInfo(kind="npu", index=1, name="Ascend910A", backend="hccl", torch_device="cpu"), None),
        (DeviceInfo(kind="cuda", index=1, name="gpu", backend="nccl", torch_device="cuda:1"), [1]),
        (DeviceInfo(kind="cpu", index=0, name="cpu", backend="gloo", torch_device="cpu"), None),
    ],
)
def test_ddp_gets_device_ids_only_for_a_model_on_an_accelerator_device(monkeypatch, device, ids):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", _RecordingDDP)
    wrapped = DistContext(rank=0, world_size=2, backend=device.backend).wrap(torch.nn.Linear(2, 2), device)
    assert isinstance(wrapped, _RecordingDDP) and wrapped.device_ids == ids


def test_apex_with_a_bfloat16_stand_in_casts_and_keeps_fp32_masters_as_with_float16():
    from common.fakes import installed_apex, installed_torch_npu

    torch.manual_seed(0)
    with installed_torch_npu(), installed_apex("ascend", half_dtype=torch.bfloat16) as amp:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = amp.initialize(model, optimizer, opt_level="O2", combine_grad=True)
        assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
        output = model(torch.randn(2, 3))
        assert output.dtype == torch.float32
        with amp.scale_loss((output**2).mean(), optimizer) as scaled:
            scaled.backward()
        master = optimizer.param_groups[0]["params"][0]  # the fp32 copy of the first layer's weight
        before = master.detach().clone()
        optimizer.step()
        assert master.dtype == torch.float32 and not torch.equal(master, before)
        assert torch.equal(model[0].weight, master.detach().to(torch.bfloat16))
        assert model.state_dict()["0.weight"].dtype == torch.float32
    with installed_torch_npu(), installed_apex("ascend") as amp:  # float16 unless told otherwise
        assert amp.initialize(torch.nn.Linear(3, 1), opt_level="O2").weight.dtype == torch.float16
    with pytest.raises(ValueError, match="half_dtype"):
        with installed_apex("ascend", half_dtype=torch.float32):
            pass


_SITE_PROBE = """
import datetime, json, sys, tempfile
import torch, torch.distributed as dist
from common.device import select_device
from common.amp import MixedPrecision
import torch_npu

info = select_device("auto")
store = dist.FileStore(tempfile.mktemp(), 1)
dist.init_process_group(info.backend, store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
out = {"kind": info.kind, "device": str(info.device), "backend": dist.get_backend(),
       "inf_nan": torch_npu.npu.utils.is_support_inf_nan(), "precision": MixedPrecision(info, True).describe()}
dist.all_reduce(torch.ones(2))
for name, tensor in (("float64", torch.ones(2, dtype=torch.float64)), ("meta", torch.ones(2, device="meta"))):
    try:
        dist.all_reduce(tensor)
    except RuntimeError as exc:
        out[name] = str(exc)
dist.destroy_process_group()
print(json.dumps(out))
"""


def test_the_site_module_makes_a_process_an_npu_node_with_apex_and_hccl():
    count = subprocess.run([sys.executable, "-m", "common.device", "--count"], cwd=REPO_ROOT,
                           env=fake_npu_env(3, repo=REPO_ROOT), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (count.returncode, count.stdout, count.stderr) == (0, "3\n", "")
    probe = subprocess.run([sys.executable, "-c", _SITE_PROBE], cwd=REPO_ROOT, env=fake_npu_env(2, repo=REPO_ROOT),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    out = json.loads(probe.stdout.splitlines()[-1])
    assert out["kind"] == "npu" and out["device"] == "cpu" and out["backend"] == "hccl"
    assert out["inf_nan"] is False  # saturation mode, as the Atlas training series
    assert out["precision"].startswith("O2 fp16 via apex.amp")
    assert "HCCL allreduce: Unsupported data type at::kDouble" in out["float64"]
    assert "Tensors must be NPU and dense" in out["meta"]


def test_the_site_module_stops_a_process_it_cannot_set_up():
    proc = subprocess.run([sys.executable, "-c", "print('ran')"], cwd=REPO_ROOT, env=fake_npu_env("two", repo=REPO_ROOT),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 3 and "ran" not in proc.stdout
    assert "MODELZOO_FAKE_NPU='two'" in proc.stderr


# ---------------------------------------------------------------- the scripts
@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """Copies of the five folders beside a link to `common`: the scripts' test/output, checkpoints and
    work folders land there, never in the checkout."""
    root = tmp_path_factory.mktemp("repo")
    (root / "common").symlink_to(REPO_ROOT / "common", target_is_directory=True)
    for folder in FOLDERS:
        shutil.copytree(REPO_ROOT / folder, root / folder, ignore=shutil.ignore_patterns(*_NOT_COPIED))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory, repo) -> dict[str, Path]:
    """The demo datasets, small; LUNA16 normalised once at the tiny settings, as VNet's tests do."""
    root = tmp_path_factory.mktemp("data")
    found = {
        "isic2018": write_isic2018(root / "isic2018", n=10, sizes=((64, 48), (80, 60))),
        "dsb2018": write_dsb2018(root / "dsb2018", n=12),
        "isbi2012": write_isbi2012(root / "isbi2012", pages=4, size=64),
        "luna16": write_luna16(root / "luna16", n=4, shape=(16, 32, 32)),
    }
    normalize = (
        "import sys; from normalize_dataset import Settings, normalize_tree; "
        "normalize_tree(sys.argv[1], Settings(4.0, (32, 32, 32)), workers=1, log=lambda _: None)"
    )
    proc = subprocess.run([sys.executable, "-c", normalize, str(found["luna16"])], cwd=repo / "VNet",
                          env=child_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return found


def _run(repo: Path, data: dict[str, Path], folder: str, ranks: int) -> tuple[Path, str]:
    dataset, network, batch_1p, batch_2p, tiny = CASES[folder]
    batch = batch_1p if ranks == 1 else batch_2p
    script = "train_performance_1p.sh" if ranks == 1 else "train_performance_8p.sh"
    # One timed step in 1p (the first is warm-up); both steps timed with two ranks.
    warmup = "--warmup_steps=1" if ranks == 1 else "--warmup_steps=0"
    args = [f"--data_path={data[dataset]}", f"--batch_size={batch}", *tiny, warmup]
    env = fake_npu_env(RANK_SIZE=str(ranks), MODELZOO_CACHE_DIR=str(repo / "cache"))
    proc = subprocess.run(["bash", f"test/{script}", *args], cwd=repo / folder, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    output = repo / folder / "test" / "output"
    log = output / "0" / "train_0.log"
    assert proc.returncode == 0, proc.stdout + proc.stderr + (log.read_text()[-3000:] if log.exists() else "")
    assert "No NPU/GPU found" not in proc.stdout
    return output, f"{network}_bs{batch}_{ranks}p_perf"


def _check(output: Path, case: str, ranks: int) -> dict:
    summary = parse_summary(output / "0" / f"{case}.log")
    assert summary["CaseName"] == case and summary["RankSize"] == str(ranks)
    assert 0 < float(summary["ActualFPS"]) < float("inf")
    details = json.loads((output / "0" / "summary.json").read_text())
    assert details["device"]["kind"] == "npu" and details["device"]["backend"] == "hccl"
    assert details["precision"].startswith("O2 fp16 via apex.amp")
    assert details["world_size"] == ranks
    assert "Device: npu:0 (Ascend910A)" in (output / "0" / "train_0.log").read_text()
    return details


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS)
def test_performance_1p_on_a_fake_npu_with_apex(repo, data, folder):
    output, case = _run(repo, data, folder, ranks=1)
    _check(output, case, ranks=1)


@pytest.mark.slow
@pytest.mark.parametrize("folder", TWO_RANK_FOLDERS)
def test_performance_8p_on_two_fake_npus_over_hccl(repo, data, folder):
    output, case = _run(repo, data, folder, ranks=2)
    _check(output, case, ranks=2)
    assert (output / "1" / "train_1.log").exists()

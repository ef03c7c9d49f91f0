"""Precision and memory format chosen per device: bf16 where the hardware has it, `--amp=auto` timed on
the CPU, channels_last on by default for 2-D networks on CUDA, and what the shell library passes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import common.amp as amp_module
from common.amp import MixedPrecision, bf16_support, cpu_bf16_flags, cpu_bf16_support
from common.cli import RunOptions, Runtime, add_common_args
from common.device import DeviceInfo
from common.distributed import DistContext
from common.engine import to_device
from common.fakes import installed_apex, installed_torch_npu
from common.summary import SummaryTarget
from common.testing import REPO_ROOT, child_env
from common.trainer import LoopConfig, fit, memory_format_for, prepare

CPU = DeviceInfo(kind="cpu", index=0, name="cpu", backend="gloo")
CUDA = DeviceInfo(kind="cuda", index=0, name="NVIDIA GPU", backend="nccl", torch_device="cpu")

X86_HEADER = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\n"
X86_FLAGS = "fpu vme sse sse2 avx avx2 avx512f avx512bw avx512vl avx512dq avx512_vnni"


def _cpuinfo(flags: str) -> str:
    return f"{X86_HEADER}flags\t\t: {flags}\n\n"


def _fake_cuda(monkeypatch, capability: tuple[int, int], reports_bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: reports_bf16)


def _cpu_with_bf16(monkeypatch, has: bool) -> None:
    detail = "avx512_bf16" if has else "no avx512_bf16, amx_bf16 or Arm bf16 in /proc/cpuinfo"
    monkeypatch.setattr(amp_module, "cpu_bf16_support", lambda cpuinfo=None: (has, detail))


# ---- bf16 in hardware ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        (_cpuinfo(X86_FLAGS), []),
        (_cpuinfo(X86_FLAGS + " avx512_bf16"), ["avx512_bf16"]),
        (_cpuinfo(X86_FLAGS + " amx_bf16 amx_tile avx512_bf16") * 2, ["amx_bf16", "avx512_bf16"]),
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n", ["bf16"]),
        ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n", []),
    ],
    ids=["avx512-without-bf16", "avx512_bf16", "amx", "arm-bf16", "arm-without"],
)
def test_cpu_bf16_instructions_are_read_from_cpuinfo(text, expected):
    assert cpu_bf16_flags(text) == expected


def test_a_cpu_with_bf16_flags_counts_only_where_torch_runs_bf16_on_it(monkeypatch):
    text = _cpuinfo(X86_FLAGS + " avx512_bf16")
    monkeypatch.setattr(amp_module, "_onednn_runs_bf16", lambda: True)
    assert cpu_bf16_support(text) == (True, "avx512_bf16")
    assert cpu_bf16_support(_cpuinfo(X86_FLAGS))[0] is False
    monkeypatch.setattr(amp_module, "_onednn_runs_bf16", lambda: False)
    assert cpu_bf16_support(text)[0] is False


@pytest.mark.parametrize(
    "capability, reports_bf16, expected",
    [((8, 0), True, torch.bfloat16), ((9, 0), True, torch.bfloat16), ((7, 0), True, torch.float16),
     ((8, 6), False, torch.float16)],
    ids=["ampere", "hopper", "volta-emulated", "not-reported"],
)  # fmt: skip
def test_auto_dtype_on_cuda_is_bf16_without_scaler_only_from_compute_capability_8(
    monkeypatch, capability, reports_bf16, expected
):
    _fake_cuda(monkeypatch, capability, reports_bf16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler("cuda") disables itself here, where CUDA is absent
        amp = MixedPrecision(CUDA, enabled=True, opt_level="O2")
    assert amp.backend == "torch" and amp.dtype == expected
    assert (amp._scaler is None) == (expected == torch.bfloat16)
    text = amp.describe()
    assert f"compute capability {capability[0]}.{capability[1]}" in text
    assert ("no loss scale" in text) == (expected == torch.bfloat16)


def test_an_explicit_amp_dtype_wins_over_the_hardware(monkeypatch):
    _fake_cuda(monkeypatch, (9, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        amp = MixedPrecision(CUDA, enabled=True, dtype="fp16")
    assert amp.dtype == torch.float16 and amp._scaler is not None


@pytest.mark.parametrize(
    "soc, expected",
    [("Ascend910B2", torch.bfloat16), ("Ascend910_9392", torch.bfloat16), ("Ascend910A", torch.float16),
     ("Ascend910ProB", torch.float16), ("Ascend910B", torch.float16)],
)  # fmt: skip
def test_auto_dtype_on_npu_follows_the_soc_without_is_bf16_supported(soc, expected):
    npu = DeviceInfo(kind="npu", index=0, name=soc, backend="hccl", torch_device="cpu")
    with installed_torch_npu(name=soc, support_inf_nan=expected == torch.bfloat16):
        amp = MixedPrecision(npu, enabled=True)
        assert amp.backend == "torch" and amp.dtype == expected
        assert (amp._scaler is None) == (expected == torch.bfloat16)
        assert soc in amp.describe()


def test_torch_npus_own_bf16_answer_wins_over_the_soc_name(monkeypatch):
    npu = DeviceInfo(kind="npu", index=0, name="Ascend910A", backend="hccl", torch_device="cpu")
    with installed_torch_npu(name="Ascend910A"):
        monkeypatch.setattr(torch.npu, "is_bf16_supported", lambda: True, raising=False)
        assert bf16_support(npu) == (True, "Ascend910A")
        assert MixedPrecision(npu, enabled=True).dtype == torch.bfloat16


def test_apex_on_npu_keeps_fp16_even_on_a_910b():
    npu = DeviceInfo(kind="npu", index=0, name="Ascend910B2", backend="hccl", torch_device="cpu")
    with installed_torch_npu(name="Ascend910B2", support_inf_nan=True), installed_apex("ascend"):
        amp = MixedPrecision(npu, enabled=True, opt_level="O2")
        assert amp.backend == "apex" and amp.dtype == torch.float16
        assert "apex.amp" in amp.describe()


# ---- --amp=auto on the CPU ----------------------------------------------------------------------------
def test_cpu_auto_is_fp32_without_bf16_hardware(monkeypatch):
    _cpu_with_bf16(monkeypatch, False)
    amp = MixedPrecision(CPU, enabled="auto")
    assert not amp.enabled and not amp.pending
    assert amp.describe() == (
        "fp32 (no mixed precision; --amp=auto: fp32, no bf16 in this CPU's hardware: "
        "no avx512_bf16, amx_bf16 or Arm bf16 in /proc/cpuinfo)"
    )


def test_cpu_auto_waits_for_the_timing_where_the_cpu_has_bf16(monkeypatch):
    _cpu_with_bf16(monkeypatch, True)
    amp = MixedPrecision(CPU, enabled="auto")
    assert amp.pending and not amp.enabled and amp.amp_type == "fp32"  # fp32 until timed


def test_deterministic_keeps_fp32_unless_bf16_is_forced(monkeypatch):
    _cpu_with_bf16(monkeypatch, True)
    amp = MixedPrecision(CPU, enabled="auto", deterministic=True)
    assert not amp.enabled and not amp.pending and "--deterministic" in amp.describe()
    forced = MixedPrecision(CPU, enabled="auto", dtype="bf16", deterministic=True)
    assert forced.dtype == torch.bfloat16 and not forced.pending
    assert MixedPrecision(CPU, enabled=True, deterministic=True).dtype == torch.bfloat16


def test_plain_amp_on_the_cpu_stays_bf16_and_says_when_it_is_emulated(monkeypatch):
    _cpu_with_bf16(monkeypatch, False)
    amp = MixedPrecision(CPU, enabled=True)
    assert amp.dtype == torch.bfloat16 and "emulated" in amp.describe()


class FakeClock:
    """A clock that a step advances by its precision's cost."""

    def __init__(self, amp: MixedPrecision, fp32: float, bf16: float):
        self.amp, self.cost, self.now, self.calls = amp, {"fp32": fp32, "bf16": bf16}, 0.0, []

    def step(self) -> None:
        precision = "bf16" if self.amp.dtype == torch.bfloat16 else "fp32"
        self.calls.append(precision)
        self.now += self.cost[precision]

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("fp32, bf16, chosen", [(1.0, 0.6, "bf16"), (0.6, 1.0, "fp32")])
def test_the_timing_keeps_the_faster_precision(monkeypatch, fp32, bf16, chosen):
    _cpu_with_bf16(monkeypatch, True)
    amp = MixedPrecision(CPU, enabled="auto")
    clock = FakeClock(amp, fp32, bf16)
    seconds = amp.choose_by_timing(clock.step, steps=2, clock=clock)
    assert clock.calls == ["fp32"] * 3 + ["bf16"] * 3  # one warm-up and two timed steps each
    assert seconds == pytest.approx({"fp32": fp32, "bf16": bf16})
    assert not amp.pending and (amp.dtype == torch.bfloat16) == (chosen == "bf16")
    assert f"--amp=auto: {chosen}" in amp.describe() and f"fp32 {fp32:.3f} s" in amp.describe()


def test_every_rank_decides_on_the_agreed_times(monkeypatch):
    _cpu_with_bf16(monkeypatch, True)
    amp = MixedPrecision(CPU, enabled="auto")
    clock = FakeClock(amp, 1.0, 0.6)  # faster here, slower on the slowest rank
    amp.choose_by_timing(clock.step, clock=clock, agree=lambda values: [values[0], 1.5])
    assert not amp.enabled


@pytest.mark.parametrize("fp32, bf16, chosen", [(1.0, 0.6, "bf16"), (0.6, 1.0, "fp32")])
def test_a_checkpoint_carries_the_timed_choice_to_its_evaluation_and_its_resume(
    monkeypatch, fp32, bf16, chosen
):
    _cpu_with_bf16(monkeypatch, True)
    trained = MixedPrecision(CPU, enabled="auto")
    assert "precision" not in trained.state_dict()  # nothing chosen yet
    clock = FakeClock(trained, fp32, bf16)
    trained.choose_by_timing(clock.step, clock=clock)
    checkpoint = {"state_dict": {}, "amp": trained.state_dict()}
    assert checkpoint["amp"]["precision"] == chosen

    evaluation = MixedPrecision(CPU, enabled="auto")
    evaluation.follow(checkpoint)
    assert not evaluation.pending and (evaluation.dtype == torch.bfloat16) == (chosen == "bf16")
    assert f"--amp=auto: {chosen}, as the run that wrote the checkpoint chose" in evaluation.describe()
    resumed = MixedPrecision(CPU, enabled="auto")
    resumed.load_state_dict(checkpoint["amp"])
    assert not resumed.pending and resumed.amp_type == trained.amp_type

    untimed = MixedPrecision(CPU, enabled="auto")  # a checkpoint without the choice, or bare weights
    for other in ({"amp": {"skipped_steps": 0}}, {"state_dict": {}}, None):
        untimed.follow(other)
    assert untimed.pending
    explicit = MixedPrecision(CPU, enabled=False)  # --amp off (or O0) is never overridden
    explicit.follow(checkpoint)
    assert not explicit.enabled and not explicit.pending


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2, 1, 8, 8, generator=gen), (torch.rand(2, 1, 8, 8, generator=gen) > 0.5).float())
        for _ in range(n)
    ]


def _runtime(amp: MixedPrecision, **options) -> Runtime:
    return Runtime(device=amp.device, dist=DistContext(), amp=amp, flags={},
                   options=RunOptions(log_interval=1, warmup_steps=0, **options))  # fmt: skip


def test_settling_leaves_weights_optimizer_and_statistics_as_they_were(monkeypatch, capsys):
    _cpu_with_bf16(monkeypatch, True)
    amp = MixedPrecision(CPU, enabled="auto")
    runtime = _runtime(amp)
    model = _tiny_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    amp.settle(runtime, model, optimizer, _batches(), nn.BCEWithLogitsLoss(), to_device)
    assert not amp.pending and "timed 2 training step(s)" in amp.describe()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer.state_dict()["state"] == {} and not model.training
    assert amp.skipped_steps == 0
    assert "Precision: --amp=auto" in capsys.readouterr().out


def test_fit_times_the_choice_once_before_the_first_epoch(monkeypatch, tmp_path):
    from common.engine import TrainingRun

    _cpu_with_bf16(monkeypatch, True)
    amp = MixedPrecision(CPU, enabled="auto")
    timed: list[int] = []
    original = MixedPrecision.choose_by_timing

    def recording(self, step, **kwargs):
        timed.append(len(timed))
        return original(self, step, **kwargs)

    monkeypatch.setattr(MixedPrecision, "choose_by_timing", recording)
    runtime = _runtime(amp)
    model, optimizer = prepare(_tiny_net(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), runtime)
    target = SummaryTarget(tmp_path, "Toy", "Toy_bs2_1p_acc", 2, 1, "acc", time.time())
    run = TrainingRun(runtime, tmp_path / "run", model=model, optimizer=optimizer, selection_key="score",
                      target=target)  # fmt: skip
    fit(run, LoopConfig(epochs=2), train_loader=_batches(), loss_fn=nn.BCEWithLogitsLoss())
    assert timed == [0] and not amp.pending


# ---- flags --------------------------------------------------------------------------------------------
def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    return parser.parse_args(list(argv))


def test_amp_flag_is_a_switch_or_auto():
    assert _parse().amp is False and _parse("--amp").amp is True
    assert _parse("--amp=auto").amp == "auto" and _parse("--amp", "auto").amp == "auto"
    assert _parse("--amp=auto", "--no-amp").amp is False
    assert RunOptions.from_args(_parse("--amp=auto")).amp == "auto"


def test_bad_amp_value_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        _parse("--amp=fast")
    assert "--amp" in capsys.readouterr().err


def test_channels_last_is_on_off_or_auto():
    assert _parse().channels_last is None
    assert _parse("--channels_last").channels_last is True
    assert _parse("--no-channels_last").channels_last is False
    assert _parse("--channels_last", "--no_channels_last").channels_last is False


def test_setup_runtime_passes_deterministic_to_the_auto_choice(monkeypatch):
    from common.cli import setup_runtime

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "RANK_SIZE", "RANK_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "0")  # recorded, so what setup_runtime writes is undone afterwards
        monkeypatch.delenv(key)  # one process, no group
    _cpu_with_bf16(monkeypatch, True)
    monkeypatch.setattr("common.cli.make_deterministic", lambda device: None)
    runtime = setup_runtime(RunOptions(device="cpu", amp="auto", deterministic=True))
    assert not runtime.amp.enabled and not runtime.amp.pending
    assert setup_runtime(RunOptions(device="cpu", amp="auto")).amp.pending


# ---- memory format ------------------------------------------------------------------------------------
def _net3d() -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Conv3d(2, 1, 1))


@pytest.mark.parametrize(
    "net, channels_last, kind, expected",
    [
        (_tiny_net, None, "cuda", torch.channels_last),
        (_tiny_net, None, "cpu", torch.contiguous_format),
        (_tiny_net, None, "npu", torch.contiguous_format),
        (_net3d, None, "cuda", torch.contiguous_format),
        (_net3d, True, "cpu", torch.channels_last_3d),
        (_tiny_net, True, "cpu", torch.channels_last),
        (_tiny_net, False, "cuda", torch.contiguous_format),
    ],
)
def test_memory_format_per_device_and_dimensions(net, channels_last, kind, expected):
    assert memory_format_for(net(), channels_last=channels_last, device_kind=kind) == expected


def test_prepare_resolves_auto_so_the_inputs_follow_the_model():
    runtime = _runtime(MixedPrecision(CUDA))
    model, _ = prepare(_tiny_net(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), runtime)
    assert runtime.options.channels_last is True
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    runtime = _runtime(MixedPrecision(CUDA), channels_last=False)
    model, _ = prepare(_tiny_net(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), runtime)
    assert runtime.options.channels_last is False and model[0].weight.is_contiguous()
    runtime = _runtime(MixedPrecision(CPU))
    prepare(_tiny_net(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), runtime)
    assert runtime.options.channels_last is False


def test_volumes_follow_a_channels_last_3d_model():
    volume = torch.randn(2, 1, 4, 6, 8)
    inputs, _ = to_device((volume, volume), torch.device("cpu"), True)
    assert inputs.is_contiguous(memory_format=torch.channels_last_3d)
    inputs, _ = to_device((volume, volume), torch.device("cpu"), False)
    assert inputs.is_contiguous()


# ---- the shell library --------------------------------------------------------------------------------
CASE = """#!/usr/bin/env bash
Network="Fake"
export RANK_SIZE=1
batch_size=4
epochs=1
mode=acc
demo_dataset=dsb2018
train_command() {{ CMD=("$FAKE_TRAIN"); }}
source "{repo}/common/scripts/modelzoo.sh"
modelzoo_main "$@"
"""

FAKE_TRAIN = """
import json, os, sys
with open(os.environ["FAKE_ARGV"], "w") as handle:
    json.dump(sys.argv[1:], handle)
out, case = os.environ["MODELZOO_OUTPUT_DIR"], os.environ["MODELZOO_CASE_NAME"]
open(os.path.join(out, case + ".log"), "w").write("CaseName = " + case + "\\n")
open(os.path.join(out, "final_result.txt"), "w").write("done\\n")
"""


def _script_argv(tmp_path: Path, devices: int, *args: str) -> list[str]:
    python = tmp_path / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1 $2" = "-m common.device_count" ]; then echo {devices}; exit 0; fi\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    case = tmp_path / "case"
    (case / "test").mkdir(parents=True, exist_ok=True)
    script = case / "test" / "train.sh"
    script.write_text(CASE.format(repo=REPO_ROOT))
    train = tmp_path / "fake_train.py"
    train.write_text(FAKE_TRAIN)
    (tmp_path / "data").mkdir(exist_ok=True)
    for path in (python, script):
        path.chmod(0o755)
    record = tmp_path / "argv.json"
    env = child_env(PYTHON=str(python), FAKE_TRAIN=str(train), FAKE_ARGV=str(record))
    for key in ("NNODES", "NODE_RANK", "RANK_SIZE"):
        env.pop(key, None)
    proc = subprocess.run(["bash", str(script), f"--data_path={tmp_path / 'data'}", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(record.read_text())


def test_the_shell_passes_the_auto_choice_on_a_cpu(tmp_path):
    argv = _script_argv(tmp_path, 0)
    assert "--amp=auto" in argv and "--opt-level=O0" not in argv


def test_the_shell_keeps_fp32_on_a_cpu_with_fp32_or_the_origin_dtype(tmp_path):
    for flags in (("--fp32",), ("--precision_mode=must_keep_origin_dtype",)):
        argv = _script_argv(tmp_path, 0, *flags)
        assert "--opt-level=O0" in argv and not any(a.startswith("--amp") for a in argv)


def test_the_shell_passes_mixed_precision_on_an_accelerator(tmp_path):
    argv = _script_argv(tmp_path, 1)
    assert "--amp" in argv and "--opt-level=O2" in argv and "--amp=auto" not in argv

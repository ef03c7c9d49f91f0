"""UNet and NestedUNet (UNet++) against the facts of 4uiiurz1/pytorch-nested-unet (references.md §1, §3).

The pinned outputs were computed with the reference archs.py @ 557ea02 outside this repository: with
`torch.manual_seed(0)` before construction the reference and ours have identical initial weights
(modules are created in the same order), so they check ours against the original without its code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import archs
import pytest
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from common.registry import get_model_builder, list_models


@dataclass(frozen=True)
class Case:
    name: str
    kwargs: dict = field(default_factory=dict)
    params: int = 0
    keys: int = 0
    key_hash: str = ""  # sha256 of the sorted "key:shape" lines of the state_dict
    golden_sums: tuple[float, ...] = ()  # reference output sum per head, seeded, eval mode, 1x3x32x32
    golden_values: tuple[float, ...] = ()  # reference last head at flat indices GOLDEN_INDICES
    exact_keys: tuple[str, ...] = ()


GOLDEN_INDICES = (0, 517, 1023)
CASES = [
    Case(
        "UNet",
        params=7_852_545,
        keys=128,
        key_hash="3720ae2f7e075958ba5380ca5cb0f3152fde423c37e2db7f3c069191d2a79541",
        golden_sums=(31.922162,),
        golden_values=(0.023126, 0.0308531, 0.0324615),
        exact_keys=(
            "conv0_0.conv1.weight",
            "conv3_1.bn1.running_mean",
            "conv0_4.bn2.num_batches_tracked",
            "final.weight",
        ),
    ),
    Case(
        "NestedUNet",
        params=9_163_329,
        keys=212,
        key_hash="647da5f3eb27878c5a947dbfe70f163b307e41dd8e8246fb007a6e9fbfecc1a6",
        golden_sums=(159.608201,),
        golden_values=(0.1532243, 0.1601296, 0.1512047),
        exact_keys=(
            "conv0_4.bn2.num_batches_tracked",
            "conv1_2.conv1.weight",
            "conv2_1.bn2.bias",
            "final.bias",
        ),
    ),
    Case(
        "NestedUNet",
        {"deep_supervision": True},
        params=9_163_428,
        keys=218,
        key_hash="036dee80f9dfd2fce85eff07187d8e2c106f459b8bbe2064f4d78de5ad6f2cde",
        golden_sums=(139.995918, 124.852584, -85.775253, 167.771068),
        golden_values=(0.1613096, 0.1667929, 0.1658451),
        exact_keys=("final1.weight", "final4.bias", "conv0_4.bn2.num_batches_tracked"),
    ),
]
IDS = ["UNet", "NestedUNet", "NestedUNet-DS"]


def key_hash(state_dict: dict[str, torch.Tensor]) -> str:
    lines = sorted(f"{key}:{tuple(value.shape)}" for key, value in state_dict.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def build(case: Case, num_classes: int = 1, input_channels: int = 3) -> torch.nn.Module:
    return archs.ARCHS[case.name](num_classes, input_channels, **case.kwargs)


def as_list(y: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return y if isinstance(y, list) else [y]


def test_registry_and_archs_table():
    assert archs.__all__ == ["UNet", "NestedUNet"]
    assert archs.ARCHS == {"UNet": archs.UNet, "NestedUNet": archs.NestedUNet}
    assert list_models("nested_unet") == ["UNet", "NestedUNet"]
    assert get_model_builder("NestedUNet", family="nested_unet") is archs.NestedUNet
    with pytest.raises(ConfigError, match=r"unknown --arch 'UNet\+\+'; valid: UNet, NestedUNet"):
        get_model_builder("UNet++", family="nested_unet", flag="--arch")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parameter_count_and_state_dict_keys(case: Case):
    with torch.device("meta"):
        model = build(case)
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == case.params
    assert len(state) == case.keys
    assert key_hash(state) == case.key_hash
    for key in case.exact_keys:
        assert key in state, key


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference_output(case: Case):
    torch.manual_seed(0)
    model = build(case).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = as_list(model(x))
    assert [tuple(y.shape) for y in outputs] == [(1, 1, 32, 32)] * len(case.golden_sums)
    for y, expected in zip(outputs, case.golden_sums):
        assert y.double().sum().item() == pytest.approx(expected, abs=1e-3)
    torch.testing.assert_close(
        outputs[-1].flatten()[list(GOLDEN_INDICES)], torch.tensor(case.golden_values), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shape_and_every_parameter_gets_a_finite_gradient(case: Case):
    torch.manual_seed(0)
    model = build(case, num_classes=2, input_channels=1).train()
    x = torch.randn(2, 1, 16, 32)
    outputs = as_list(model(x))
    expected_heads = 4 if case.kwargs.get("deep_supervision") else 1
    assert len(outputs) == expected_heads
    target = (x > 0).float().expand(2, 2, 16, 32)
    for y in outputs:
        assert y.shape == (2, 2, 16, 32)
        assert torch.isfinite(y).all()
    # Deep supervision trains every head, as the reference's train.py averages the 4 losses.
    sum(F.binary_cross_entropy_with_logits(y, target) for y in outputs).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        # conv1/conv2 biases feed a train-mode BatchNorm, which removes their (mean) gradient exactly.
        if not (name.endswith("conv1.bias") or name.endswith("conv2.bias")):
            assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 3, 100, 130), "input 3x100x130 must have H and W divisible by 16; pad to 112x144"),
        ((2, 3, 96, 90), "input 3x96x90 must have H and W divisible by 16; pad to 96x96"),
        ((3, 32, 32), "expected a 4-D input (N, C, H, W), got shape (3, 32, 32)"),
    ],
)
def test_bad_input_size_names_the_padded_size(case: Case, shape: tuple[int, ...], message: str):
    with torch.device("meta"):
        model = build(case)
    with pytest.raises(ValueError) as info:
        model(torch.empty(shape, device="meta"))
    assert str(info.value) == message


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compiles_without_graph_breaks(case: Case):
    torch.manual_seed(0)
    model = build(case).eval()
    x = torch.randn(1, 3, 16, 16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(as_list(compiled(x)), as_list(model(x)))


def test_unet_accepts_the_train_script_call_and_rejects_deep_supervision():
    with torch.device("meta"):
        # The reference's train.py calls arch(num_classes, input_channels, deep_supervision), which made
        # its UNet raise TypeError; extra config keys are ignored, as in the reference.
        model = archs.UNet(1, 3, False, loss="BCEDiceLoss")
        assert model.deep_supervision is False
        with pytest.raises(ValueError, match="only supported by NestedUNet"):
            archs.UNet(1, 3, True)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"num_classes": 1, "input_channels": 0}])
@pytest.mark.parametrize("name", ["UNet", "NestedUNet"])
def test_constructor_rejects_invalid_arguments(name: str, kwargs: dict):
    with pytest.raises(ValueError, match=">= 1"):
        archs.ARCHS[name](**kwargs)

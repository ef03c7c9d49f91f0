"""The ISIC family (U_Net, R2U_Net, AttU_Net, R2AttU_Net) against the facts of LeeJunHyun/Image_Segmentation.

Numbers come from references.md §1 and §2.2 and from the reference network.py @ db34de2, run outside
this repository: with `torch.manual_seed(0)` before construction the reference and ours have identical
initial weights (modules are created in the same order), so the pinned outputs below, computed with the
reference code, check ours against the original without shipping its code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from common.networks import attention_r2unet as nets
from common.registry import get_model, list_models


@dataclass(frozen=True)
class Case:
    name: str
    kwargs: dict = field(default_factory=dict)
    params: int = 0
    keys: int = 0
    key_hash: str = ""  # sha256 of the sorted "key:shape" lines of the state_dict
    golden_sum: float = 0.0  # reference output sum, seeded weights and input, eval mode, 1x3x32x32
    golden_values: tuple[float, ...] = ()  # reference output at flat indices GOLDEN_INDICES
    exact_keys: tuple[str, ...] = ()


GOLDEN_INDICES = (0, 517, 1023)
CASES = [
    Case(
        "U_Net",
        params=34_527_041,
        keys=156,
        key_hash="7a12031a2c54312ba9502806ea250c0204377ad5e48eaec32e38af916aebcf7c",
        golden_sum=-39.002959,
        golden_values=(-0.0390144, -0.0365127, -0.0396216),
        exact_keys=(
            "Conv1.conv.0.weight",
            "Conv5.conv.4.num_batches_tracked",
            "Up5.up.1.weight",
            "Conv_1x1.bias",
        ),
    ),
    Case(
        "R2U_Net",
        {"t": 2},
        params=39_091_393,
        keys=174,
        key_hash="8f57004b18b89e52fb89f95a0d006ad61465ab2ebdd05c9ede25fe20d2235818",
        golden_sum=137.496786,
        golden_values=(0.3404828, 0.1575253, -0.2207816),
        exact_keys=(
            "RRCNN1.RCNN.0.conv.0.weight",
            "RRCNN1.Conv_1x1.weight",
            "Up_RRCNN2.RCNN.1.conv.1.running_var",
        ),
    ),
    # main.py's default t: the same weights, one more conv application per recurrent block.
    Case(
        "R2U_Net",
        {"t": 3},
        params=39_091_393,
        keys=174,
        key_hash="8f57004b18b89e52fb89f95a0d006ad61465ab2ebdd05c9ede25fe20d2235818",
        golden_sum=138.036861,
        golden_values=(0.3396369, 0.1602582, -0.2212646),
    ),
    Case(
        "AttU_Net",
        params=34_878_573,
        keys=240,
        key_hash="c6a4d2a7254f245dff97e5ea1fa04c27a418f7dcc61550d18c36fe315133578d",
        golden_sum=81.316979,
        golden_values=(0.0804659, 0.0797812, 0.079895),
        exact_keys=(
            "Att5.psi.1.running_var",
            "Att2.W_g.0.weight",
            "Att3.W_x.1.bias",
            "Up_conv2.conv.3.weight",
        ),
    ),
    Case(
        "R2AttU_Net",
        {"t": 2},
        params=39_442_925,
        keys=258,
        key_hash="e02b5d89ea7a27e5f9fea0b25627f54a1928b2d1b4050dee358354c29487862c",
        golden_sum=-64.223946,
        golden_values=(-0.0084098, -0.0787499, -0.0521277),
        exact_keys=("RRCNN1.RCNN.0.conv.0.weight", "Att5.psi.1.running_var", "Up_RRCNN5.Conv_1x1.bias"),
    ),
]
IDS = [f"{c.name}-t{c.kwargs['t']}" if "t" in c.kwargs else c.name for c in CASES]
# One case per class for the checks that do not depend on t.
CLASS_CASES = [c for c in CASES if c.kwargs.get("t", 2) == 2]
CLASS_IDS = [c.name for c in CLASS_CASES]


def key_hash(state_dict: dict[str, torch.Tensor]) -> str:
    lines = sorted(f"{key}:{tuple(value.shape)}" for key, value in state_dict.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def build_on_meta(case: Case, **overrides: object) -> torch.nn.Module:
    # Shapes and names only: no memory, no initialisation cost.
    with torch.device("meta"):
        return getattr(nets, case.name)(**{**case.kwargs, **overrides})


def test_registry_lists_the_family_in_reference_order():
    assert list_models("isic") == ["U_Net", "R2U_Net", "AttU_Net", "R2AttU_Net"]
    with torch.device("meta"):
        model = get_model("R2AttU_Net", family="isic", img_ch=1, output_ch=2, t=3)
    assert type(model) is nets.R2AttU_Net and model.t == 3


def test_unknown_model_type_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        get_model("X", family="isic")
    assert str(info.value) == "unknown --model_type 'X'; valid: U_Net, R2U_Net, AttU_Net, R2AttU_Net"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parameter_count_and_state_dict_keys(case: Case):
    model = build_on_meta(case)
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == case.params
    assert len(state) == case.keys
    assert key_hash(state) == case.key_hash
    for key in case.exact_keys:
        assert key in state, key


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference_output(case: Case):
    torch.manual_seed(0)
    model = getattr(nets, case.name)(**case.kwargs).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 1, 32, 32)
    flat = y.flatten()
    torch.testing.assert_close(
        flat[list(GOLDEN_INDICES)], torch.tensor(case.golden_values), rtol=1e-4, atol=1e-5
    )
    assert y.double().sum().item() == pytest.approx(case.golden_sum, abs=1e-3)


@pytest.mark.parametrize("case", CLASS_CASES, ids=CLASS_IDS)
def test_shape_and_every_parameter_gets_a_finite_gradient(case: Case):
    torch.manual_seed(0)
    model = getattr(nets, case.name)(img_ch=1, output_ch=2, **case.kwargs).train()
    x = torch.randn(1, 1, 16, 32)  # batch 1 keeps the heavy R2 models fast; BN still sees 2 values
    y = model(x)
    assert y.shape == (1, 2, 16, 32)  # logits: no sigmoid inside, so values leave [0, 1]
    assert torch.isfinite(y).all() and (y.min() < 0 or y.max() > 1)
    F.binary_cross_entropy_with_logits(y, (x > 0).float().expand_as(y)).backward()
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        # A conv bias feeding a train-mode BatchNorm has a mathematically zero gradient (BN removes the
        # mean), so only weights and BN affine parameters must have a non-zero one.
        if param.dim() > 1 or isinstance(modules[name.rpartition(".")[0]], torch.nn.BatchNorm2d):
            assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("case", CLASS_CASES, ids=CLASS_IDS)
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 3, 100, 130), "input 3x100x130 must have H and W divisible by 16; pad to 112x144"),
        ((2, 3, 32, 40), "input 3x32x40 must have H and W divisible by 16; pad to 32x48"),
        ((3, 32, 32), "expected a 4-D input (N, C, H, W), got shape (3, 32, 32)"),
    ],
)
def test_bad_input_size_names_the_padded_size(case: Case, shape: tuple[int, ...], message: str):
    model = build_on_meta(case)
    with pytest.raises(ValueError) as info:
        model(torch.empty(shape, device="meta"))
    assert str(info.value) == message


@pytest.mark.parametrize("case", CLASS_CASES, ids=CLASS_IDS)
def test_compiles_without_graph_breaks(case: Case):
    torch.manual_seed(0)
    # t=1 traces the same code as t=2 with fewer unrolled steps (tracing time is the cost here).
    kwargs = {**case.kwargs, "t": 1} if "t" in case.kwargs else case.kwargs
    model = getattr(nets, case.name)(**kwargs).eval()
    x = torch.randn(1, 3, 16, 16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("U_Net", {"img_ch": 0}),
        ("AttU_Net", {"output_ch": 0}),
        ("R2U_Net", {"t": 0}),
        ("R2AttU_Net", {"img_ch": 3, "t": -1}),
        ("R2AttU_Net", {"output_ch": 1.5}),
    ],
)
def test_constructor_rejects_invalid_arguments(name: str, kwargs: dict):
    with pytest.raises(ValueError, match=">= 1"):
        getattr(nets, name)(**kwargs)


@pytest.mark.parametrize("t", [1, 2, 3])
def test_recurrent_block_applies_its_conv_t_plus_one_times(t: int):
    block = nets.Recurrent_block(4, t=t)
    calls = []
    block.conv.register_forward_hook(lambda *_: calls.append(1))
    block(torch.randn(1, 4, 8, 8))
    assert len(calls) == t + 1


def test_r2_models_keep_the_parameter_free_upsample_attribute():
    for name in ("R2U_Net", "R2AttU_Net"):
        model = build_on_meta(Case(name))
        assert isinstance(model.Upsample, torch.nn.Upsample)
        assert not any(key.startswith("Upsample") for key in model.state_dict())
    assert not hasattr(build_on_meta(Case("U_Net")), "Upsample")

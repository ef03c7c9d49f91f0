"""V-Net against the facts of mattmacy/vnet.pytorch@a00c8ea (references.md section 4).

The pinned outputs come from a golden run: the reference vnet.py, patched only to run on current PyTorch
(cat on dim 1, no parent BN input check, explicit softmax dim), loaded our state_dict with strict=True and,
with BatchNorm on batch statistics and dropout off on both sides, gave the same log-probabilities as
`to_reference_output` of our logits (max difference 0.0, gradients equal), for PReLU and ELU.
The same seed gives the same initial weights on both sides, because modules are created in the same order.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from vnet import VNet, check_input_shape, reference_weights_init_, to_reference_output

STAGE_PARAMS_PRELU = {
    "in_tr": 2_064,
    "down_tr32": 132_384,
    "down_tr64": 1_041_216,
    "down_tr128": 6_211_712,
    "down_tr256": 16_649_472,
    "up_tr256": 16_648_960,
    "up_tr128": 4_228_480,
    "up_tr64": 545_216,
    "up_tr32": 136_416,
    "out_tr": 8_014,
}
# sha256 of the sorted "key:shape" lines of the reference's state_dict (same as ours).
KEYS_SHA256_PRELU = "abc8ef70ecf9944d092842a5cf97a7a630745130a31e7579fb706cc81e3c23bb"
KEYS_SHA256_ELU = "82d81058d27ebcfedaf3a14a4392590e2f832e43067202be4ecc97dc28614087"


def _keys_sha256(model: torch.nn.Module) -> str:
    lines = sorted(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _without_dropout(model: VNet) -> VNet:
    """Training mode (BatchNorm on batch statistics, as the reference always was) with dropout off."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout3d):
            m.eval()
    return model


@pytest.fixture(scope="module")
def prelu() -> VNet:
    torch.manual_seed(0)
    return VNet(elu=False, nll=True)


@pytest.fixture(scope="module")
def elu() -> VNet:
    torch.manual_seed(0)
    return VNet(elu=True, nll=False)


def test_parameter_counts_and_keys(prelu, elu):
    assert sum(p.numel() for p in prelu.parameters()) == 45_603_934
    assert sum(p.numel() for p in elu.parameters()) == 45_600_316
    assert {
        n: sum(p.numel() for p in c.parameters()) for n, c in prelu.named_children()
    } == STAGE_PARAMS_PRELU
    keys = list(prelu.state_dict())
    assert len(keys) == 202
    assert len(elu.state_dict()) == 202 - 32  # no PReLU slopes: 32 activations
    assert _keys_sha256(prelu) == KEYS_SHA256_PRELU
    assert _keys_sha256(elu) == KEYS_SHA256_ELU
    for key in (
        "in_tr.conv1.weight",
        "in_tr.bn1.num_batches_tracked",
        "in_tr.relu1.weight",
        "down_tr128.ops.2.conv1.bias",
        "up_tr256.up_conv.weight",
        "up_tr32.relu2.weight",
        "out_tr.conv2.weight",
    ):
        assert key in keys
    assert tuple(prelu.up_tr256.up_conv.weight.shape) == (256, 128, 2, 2, 2)


def test_reference_state_dict_loads_strictly(prelu):
    fresh = VNet(elu=False, nll=True, skip_dropout=False, checkpoint_stages=True)
    assert str(fresh.load_state_dict(prelu.state_dict(), strict=True)) == "<All keys matched successfully>"


def test_seeded_initialisation_matches_reference(prelu):
    # Numbers from the reference class built after torch.manual_seed(0).
    assert prelu.in_tr.conv1.weight.sum().item() == pytest.approx(-0.6277853846549988, rel=1e-5)
    assert prelu.down_tr256.ops[1].conv1.weight.sum().item() == pytest.approx(-11.155582427978516, rel=1e-4)
    torch.testing.assert_close(
        prelu.out_tr.conv2.weight.flatten(),
        torch.tensor([0.48266324400901794, 0.0545484721660614, 0.6704608201980591, 0.0959789901971817]),
    )


def test_outputs_match_the_golden_reference_run(prelu):
    model = _without_dropout(prelu)
    torch.manual_seed(1)
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        logits = model(x)
    prelu.eval()
    assert logits.shape == (2, 2, 16, 32, 32)
    torch.testing.assert_close(
        logits[0, :, 0, 0, 0], torch.tensor([-0.4778937101364136, -0.3544180989265442]), atol=1e-4, rtol=1e-4
    )
    assert logits.mean().item() == pytest.approx(-0.258205771446228, abs=1e-4)
    assert logits.std().item() == pytest.approx(0.4022315740585327, abs=1e-4)
    ref = to_reference_output(logits, nll=True)
    assert ref.shape == (2 * 16 * 32 * 32, 2)
    torch.testing.assert_close(
        ref[:2],
        torch.tensor(
            [[-0.7567895650863647, -0.6333139538764954], [-0.7359914183616638, -0.6520634293556213]]
        ),
        atol=1e-4,
        rtol=1e-4,
    )


def test_output_shapes(prelu, elu):
    # 2x1x16x32x32 is covered by the golden-run test.
    prelu.eval()
    with torch.no_grad():
        assert prelu(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
        assert elu.eval()(torch.randn(2, 1, 16, 16, 32)).shape == (2, 2, 16, 16, 32)


def test_input_block_replicates_on_channels_not_batch(prelu):
    block = prelu.in_tr.eval()
    torch.manual_seed(2)
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        expected = block.relu1(block.bn1(block.conv1(x)) + torch.cat([x] * 16, dim=1))
        torch.testing.assert_close(block(x), expected)


def test_eval_is_deterministic_and_independent_of_batch_composition(prelu):
    """The reference's ContBatchNorm3d normalised with batch statistics even in eval: A's prediction
    changed with what else was in the batch. Running statistics make it a function of A alone."""
    prelu.eval()
    torch.manual_seed(4)
    a, b = torch.randn(1, 1, 16, 16, 32), 3.0 * torch.randn(1, 1, 16, 16, 32) + 1.0
    with torch.no_grad():
        alone = prelu(a)
        assert torch.equal(alone, prelu(a))
        in_batch = prelu(torch.cat([a, b]))[:1]
    torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=1e-5)


def test_bad_input_shapes():
    with pytest.raises(ValueError) as err:
        check_input_shape((1, 1, 40, 64, 64))
    assert str(err.value) == "input 1x40x64x64 needs D, H, W divisible by 16: pad to 48x64x64"
    with pytest.raises(ValueError, match="pad to 16x32x48"):
        check_input_shape((2, 1, 8, 17, 33))
    with pytest.raises(ValueError, match=r"1 channel, got shape \(1, 3, 16, 16, 16\)"):
        check_input_shape((1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match=r"\(N, 1, D, H, W\)"):
        check_input_shape((1, 16, 16, 16))
    check_input_shape((3, 1, 16, 48, 32))


def test_forward_rejects_bad_size_before_computing(prelu):
    with pytest.raises(ValueError, match="pad to 48x64x64"):
        prelu(torch.zeros(1, 1, 40, 64, 64))


def test_to_reference_output_layout():
    torch.manual_seed(5)
    logits = torch.randn(2, 2, 3, 4, 5)
    flat = to_reference_output(logits, nll=True)
    probs = to_reference_output(logits, nll=False)
    assert flat.shape == probs.shape == (2 * 3 * 4 * 5, 2)
    row = 0
    for n in range(2):
        for d in range(3):
            for h in range(4):
                for w in range(5):
                    pair = logits[n, :, d, h, w]
                    torch.testing.assert_close(flat[row], pair - torch.logsumexp(pair, 0))
                    torch.testing.assert_close(probs[row], torch.exp(pair) / torch.exp(pair).sum())
                    row += 1


@pytest.fixture(scope="module")
def training_steps(prelu):
    """One forward and backward in training mode (dropout on), without and with checkpointed stages.

    Shared by two tests because a V-Net backward takes seconds on a CPU.
    """
    plain = VNet(elu=False, nll=True)
    ckpt = VNet(elu=False, nll=True, checkpoint_stages=True)
    plain.load_state_dict(prelu.state_dict())
    ckpt.load_state_dict(prelu.state_dict())
    torch.manual_seed(6)
    x = torch.randn(1, 1, 32, 16, 16)
    target = torch.randint(0, 2, (1, 32, 16, 16))
    start = int(prelu.state_dict()["down_tr64.ops.1.bn1.num_batches_tracked"])
    results = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(7)  # same dropout masks; the recompute must replay them
        out = model(x)
        F.cross_entropy(out, target).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((out.detach(), grads, model.state_dict(), start))
    return results


def test_every_parameter_gets_a_gradient(training_steps):
    _, grads, _, _ = training_steps[0]
    assert len(grads) == 202 - 3 * 24  # each of the 24 BatchNorms has 3 buffers among the 202 keys
    for name, grad in grads.items():
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_outputs_gradients_and_statistics(training_steps):
    (out_a, grads_a, state_a, start), (out_b, grads_b, state_b, _) = training_steps
    torch.testing.assert_close(out_b, out_a)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, msg=name)
    # BatchNorm statistics updated exactly once, not again during the recompute.
    for key, value in state_a.items():
        if "running" in key or "num_batches_tracked" in key:
            torch.testing.assert_close(state_b[key], value, msg=key)
    assert state_b["down_tr64.ops.1.bn1.num_batches_tracked"].item() == start + 1


def test_torch_compile_fullgraph(prelu):
    prelu.eval()
    compiled = torch.compile(prelu, backend="eager", fullgraph=True)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), prelu(x))


def test_reference_weights_init(elu):
    torch.manual_seed(8)
    up_before = elu.up_tr256.up_conv.weight.clone()
    reference_weights_init_(elu)
    conv = elu.down_tr256.ops[0].conv1
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx((2.0 / fan_in) ** 0.5, rel=0.01)
    assert torch.count_nonzero(conv.bias) == 0
    assert torch.equal(elu.up_tr256.up_conv.weight, up_before)  # the reference's class-name test skips it

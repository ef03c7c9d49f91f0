"""common.losses against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.errors import ConfigError, DataError
from common.losses import (
    LOSSES,
    BCEDiceLoss,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    DeepSupervisionLoss,
    LovaszHingeLoss,
    SoftDiceLoss,
    TwoClassDiceLoss,
    build_loss,
)
from common.testing import SyncCounter


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def ref_bce(x: np.ndarray, t: np.ndarray) -> float:
    p = sigmoid(x.astype(np.float64))
    return float(np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))))


def ref_soft_dice_loss(x: np.ndarray, t: np.ndarray) -> float:
    p = sigmoid(x.astype(np.float64))
    dices = []
    for i in range(x.shape[0]):
        inter = np.sum(p[i] * t[i])
        dices.append((2 * inter + 1e-5) / (np.sum(p[i]) + np.sum(t[i]) + 1e-5))
    return 1 - float(np.mean(dices))


def binary_case(seed: int, shape, soft: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=2.0, size=shape).astype(np.float32)
    t = rng.random(shape) if soft else (rng.random(shape) < 0.4).astype(np.float64)
    return x, t


# ---------------------------------------------------------------- binary losses
@pytest.mark.parametrize("shape", [(3, 1, 7, 9), (2, 1, 4, 5, 6)], ids=["2d", "3d"])
def test_bce_soft_dice_and_bce_dice_by_hand(shape):
    x, t = binary_case(0, shape, soft=True)
    xt, tt = torch.from_numpy(x), torch.from_numpy(t).float()
    bce = BCEWithLogitsLoss()(xt, tt)
    dice = SoftDiceLoss()(xt, tt)
    both = BCEDiceLoss()(xt, tt)
    assert bce.item() == pytest.approx(ref_bce(x, t), rel=1e-5)
    assert dice.item() == pytest.approx(ref_soft_dice_loss(x, t), rel=1e-5)
    expected = 0.5 * F.binary_cross_entropy_with_logits(xt, tt).item() + ref_soft_dice_loss(x, t)
    assert both.item() == pytest.approx(expected, rel=1e-5)


def test_binary_losses_accept_target_with_or_without_channel():
    x, t = binary_case(1, (2, 1, 6, 6))
    xt, tt = torch.from_numpy(x), torch.from_numpy(t).float()
    for loss in (BCEWithLogitsLoss(), SoftDiceLoss(), BCEDiceLoss(), LovaszHingeLoss()):
        a = loss(xt, tt)
        torch.testing.assert_close(loss(xt, tt[:, 0]), a)  # (N,*sp) target
        torch.testing.assert_close(loss(xt[:, 0], tt), a)  # (N,*sp) logits, (N,1,*sp) target
    with pytest.raises(ConfigError, match="TwoClassDiceLoss"):
        BCEWithLogitsLoss()(torch.zeros(2, 2, 6, 6), torch.zeros(2, 6, 6))


def test_bce_pos_weight_by_hand():
    x, t = binary_case(2, (2, 1, 5, 5))
    p = sigmoid(x.astype(np.float64))
    ref = np.mean(-(3.0 * t * np.log(p) + (1 - t) * np.log(1 - p)))
    got = BCEWithLogitsLoss(pos_weight=3.0)(torch.from_numpy(x), torch.from_numpy(t))
    assert got.item() == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------- Lovasz hinge
def jaccard_set_loss(mistakes: set[int], positives: set[int]) -> float:
    """Delta_J(M) = |M| / |positives union M| (Berman et al. 2018, Eq. 3)."""
    if not mistakes:
        return 0.0
    return len(mistakes) / len(positives | mistakes)


def ref_lovasz_hinge(logits: np.ndarray, labels: np.ndarray) -> float:
    """The Lovasz extension of Delta_J at the hinge errors, evaluated from its definition with sets:
    f(m) = sum_i m_(i) [Delta_J({pi_1..pi_i}) - Delta_J({pi_1..pi_(i-1)})], pi sorting m decreasingly."""
    signs = 2.0 * labels - 1.0
    m = np.maximum(1.0 - logits * signs, 0.0)
    positives = {i for i, lab in enumerate(labels) if lab > 0.5}
    order = sorted(range(len(m)), key=lambda i: -m[i])
    total, prefix = 0.0, set()
    for i in order:
        before = jaccard_set_loss(prefix, positives)
        prefix = prefix | {i}
        total += m[i] * (jaccard_set_loss(prefix, positives) - before)
    return total


def ref_lovasz_by_integral(logits: np.ndarray, labels: np.ndarray) -> float:
    """Same extension as an integral over thresholds: integral_0^inf Delta_J({i: m_i >= s}) ds."""
    m = np.maximum(1.0 - logits * (2.0 * labels - 1.0), 0.0)
    positives = {i for i, lab in enumerate(labels) if lab > 0.5}
    levels = np.concatenate([[0.0], np.unique(m)])
    total = 0.0
    for lo, hi in zip(levels[:-1], levels[1:]):
        total += (hi - lo) * jaccard_set_loss({i for i in range(len(m)) if m[i] >= hi}, positives)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lovasz_hinge_against_set_function_definition(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=1.5, size=(3, 1, 3, 4)).astype(np.float32)
    t = (rng.random((3, 1, 3, 4)) < 0.5).astype(np.float32)
    t[2] = 0  # an image without foreground
    got = LovaszHingeLoss()(torch.from_numpy(x), torch.from_numpy(t)).item()
    per_image = [ref_lovasz_hinge(x[i].ravel().astype(np.float64), t[i].ravel()) for i in range(3)]
    assert got == pytest.approx(np.mean(per_image), rel=1e-5)
    by_integral = [ref_lovasz_by_integral(x[i].ravel().astype(np.float64), t[i].ravel()) for i in range(3)]
    np.testing.assert_allclose(per_image, by_integral, rtol=1e-9)


def test_lovasz_hinge_known_values_and_gradient():
    labels = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # Every margin beyond 1: no error, zero loss.
    assert LovaszHingeLoss()(torch.tensor([[2.0, 3.0, -2.0, -1.5]]), labels).item() == 0.0
    # All logits 0: every hinge error is 1, everything counts as wrong, Delta_J = 4/4.
    assert LovaszHingeLoss()(torch.zeros(1, 4), labels).item() == pytest.approx(1.0)
    x = torch.randn(2, 1, 8, 8, 5, requires_grad=True)  # 3-D
    t = (torch.rand(2, 1, 8, 8, 5) > 0.5).float()
    LovaszHingeLoss()(x, t).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- multi-class losses
def ref_ce(x: np.ndarray, cls: np.ndarray, weight=None) -> float:
    """Weighted mean of -log softmax at the target class, over pixels (N,C,*sp) with (N,*sp) labels."""
    x = x.astype(np.float64)
    logp = x - np.log(np.sum(np.exp(x), axis=1, keepdims=True))
    w = np.ones(x.shape[1]) if weight is None else np.asarray(weight, np.float64)
    num = den = 0.0
    for idx in np.ndindex(cls.shape):
        c = int(cls[idx])
        num += -w[c] * logp[(idx[0], c, *idx[1:])]
        den += w[c]
    return num / den


@pytest.mark.parametrize("weight", [None, (0.2, 0.8)])
def test_cross_entropy_by_hand_with_each_target_form(weight):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 2, 3, 4, 5)).astype(np.float32)
    cls = rng.integers(0, 2, size=(2, 3, 4, 5))
    loss = CrossEntropyLoss(weight=weight)
    xt = torch.from_numpy(x)
    got = loss(xt, torch.from_numpy(cls))
    assert got.item() == pytest.approx(ref_ce(x, cls, weight), rel=1e-5)
    torch.testing.assert_close(loss(xt, torch.from_numpy(cls).unsqueeze(1)), got)
    torch.testing.assert_close(loss(xt, torch.from_numpy(cls).float()), got)  # float class map
    if weight is None:  # one-hot target (weighted soft-target CE is normalised differently)
        one_hot = F.one_hot(torch.from_numpy(cls), 2).movedim(-1, 1).float()
        torch.testing.assert_close(loss(xt, one_hot), got)


def test_cross_entropy_rejects_bad_targets():
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(DataError, match="3 classes"):
        CrossEntropyLoss()(x, torch.full((1, 4, 4), 3))
    with pytest.raises(DataError, match="non-integer"):
        CrossEntropyLoss()(x, torch.full((1, 4, 4), 0.5))
    with pytest.raises(ConfigError, match="class weights"):
        CrossEntropyLoss(weight=[1.0, 2.0])(x, torch.zeros(1, 4, 4, dtype=torch.long))


def test_cross_entropy_class_weights_are_a_buffer_that_moves_with_the_loss():
    loss = CrossEntropyLoss(weight=[0.3, 0.7])
    assert dict(loss.named_buffers())["weight"] is loss.weight
    assert loss.to("meta").weight.device.type == "meta"


def test_cross_entropy_takes_logits_on_another_device_than_its_weights():
    # The weights stay on the host (a loss never moved); the logits live on another device ("meta" here,
    # an accelerator in training). One-hot targets: the path that reads nothing back to the host.
    loss = CrossEntropyLoss(weight=[0.3, 0.7])
    logits = torch.randn(2, 2, 4, 4, device="meta")
    target = torch.zeros(2, 2, 4, 4, device="meta")
    out = loss(logits, target)
    assert out.device.type == "meta" and out.shape == ()
    assert loss.weight.device.type == "meta"  # moved once, not on every step
    assert loss(logits, target).device.type == "meta"


def test_two_class_dice_by_hand():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 2, 3, 5, 4)).astype(np.float64)
    cls = rng.integers(0, 2, size=(2, 3, 5, 4))
    p1 = np.exp(x[:, 1]) / (np.exp(x[:, 0]) + np.exp(x[:, 1]))
    for squared in (True, False):
        dices = []
        for i in range(2):
            p, t = p1[i].ravel(), cls[i].ravel().astype(np.float64)
            den = np.sum(p**2) + np.sum(t**2) if squared else np.sum(p) + np.sum(t)
            dices.append((2 * np.sum(p * t) + 1e-5) / (den + 1e-5))
        loss = TwoClassDiceLoss(squared=squared)
        xt = torch.from_numpy(x).float()
        got = loss(xt, torch.from_numpy(cls))
        assert got.item() == pytest.approx(1 - np.mean(dices), rel=1e-5)
        one_hot = F.one_hot(torch.from_numpy(cls), 2).movedim(-1, 1).float()
        torch.testing.assert_close(loss(xt, one_hot), got)
        torch.testing.assert_close(loss(xt, torch.from_numpy(cls)[:, None]), got)
    with pytest.raises(ConfigError, match="N,2"):
        TwoClassDiceLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4))


# ---------------------------------------------------------------- AMP, registry, deep supervision
def _case_for(name: str):
    torch.manual_seed(0)
    if name in ("CrossEntropyLoss", "TwoClassDiceLoss"):
        return 3 * torch.randn(2, 2, 24, 24), torch.randint(0, 2, (2, 24, 24))
    return 3 * torch.randn(2, 1, 96, 96), (torch.rand(2, 1, 96, 96) > 0.6).float()


@pytest.mark.parametrize("name", LOSSES)
def test_bf16_autocast_returns_float32_close_to_fp32(name):
    loss = build_loss(name)
    x, t = _case_for(name)
    ref = loss(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(x.bfloat16(), t)
    assert got.dtype == torch.float32 and ref.dtype == torch.float32
    # bf16 only rounds the logits (~3 significant digits); the reduction itself stays fp32.
    assert got.item() == pytest.approx(ref.item(), rel=1e-2, abs=1e-3)
    torch.testing.assert_close(got, loss(x.bfloat16().float(), t), rtol=1e-6, atol=1e-6)


def test_build_loss_names_and_errors():
    assert set(LOSSES) == {
        "BCEWithLogitsLoss",
        "SoftDiceLoss",
        "BCEDiceLoss",
        "LovaszHingeLoss",
        "CrossEntropyLoss",
        "TwoClassDiceLoss",
    }
    for name in LOSSES:
        assert type(build_loss(name)).__name__ == name
    assert isinstance(build_loss("bcediceloss"), BCEDiceLoss)
    assert torch.equal(build_loss("CrossEntropyLoss", weight=[1.0, 3.0]).weight, torch.tensor([1.0, 3.0]))
    with pytest.raises(ConfigError) as err:
        build_loss("FocalLoss")
    for name in LOSSES:
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="does not take"):
        build_loss("SoftDiceLoss", smooth=1.0)


def test_deep_supervision_loss_averages():
    base = BCEDiceLoss()
    t = (torch.rand(2, 1, 8, 8) > 0.5).float()
    outs = [torch.randn(2, 1, 8, 8) for _ in range(4)]
    parts = torch.stack([base(o, t) for o in outs])
    torch.testing.assert_close(DeepSupervisionLoss(base)(outs, t), parts.mean())
    torch.testing.assert_close(DeepSupervisionLoss(base)(tuple(outs), t), parts.mean())
    w = [1.0, 2.0, 3.0, 4.0]
    torch.testing.assert_close(DeepSupervisionLoss(base, w)(outs, t), (parts * torch.tensor(w)).sum() / 10)
    torch.testing.assert_close(DeepSupervisionLoss(base)(outs[0], t), parts[0])
    with pytest.raises(ConfigError, match="4 outputs"):
        DeepSupervisionLoss(base, [1.0, 1.0])(outs, t)


# ---------------------------------------------------------------- batched Lovasz hinge and host syncs
def _lovasz_hinge_image_by_image(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The Lovasz hinge one image at a time with 1-D sorts, as LovaszHingeLoss computed it before it was
    batched: the reference for the batched form's values and gradients."""
    x = logits.float().reshape(logits.shape[0], -1)
    t = (target.float().reshape(target.shape[0], -1) > 0.5).float()
    losses = []
    for xi, ti in zip(x, t):
        errors = 1 - xi * (2 * ti - 1)
        errors_sorted, order = torch.sort(errors, descending=True)
        labels = ti[order]
        missed, false_alarms = labels.cumsum(0), (1 - labels).cumsum(0)
        loss_at = (missed + false_alarms) / (labels.sum() + false_alarms)
        grad = torch.cat([loss_at[:1], loss_at[1:] - loss_at[:-1]])
        losses.append((F.relu(errors_sorted) * grad).sum())
    return torch.stack(losses).mean()


def _lovasz_case(seed: int, shape: tuple[int, ...], masks: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(shape, generator=g)
    t = (torch.rand(shape, generator=g) < 0.4).float()
    if masks == "empty":
        t.zero_()
    elif masks == "full":
        t.fill_(1.0)
    elif masks == "mixed":  # one image without foreground, one all foreground, the rest random
        t[0] = 0.0
        if shape[0] > 1:
            t[1] = 1.0
    return x, t


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 7, 9), (2, 1, 16, 16), (5, 1, 6, 6), (3, 1, 4, 5, 6),
                                   (4, 9, 11)], ids=str)  # fmt: skip
@pytest.mark.parametrize("masks", ["random", "empty", "full", "mixed"])
def test_batched_lovasz_hinge_equals_image_by_image_in_value_and_gradient(shape, masks):
    x, t = _lovasz_case(sum(shape), shape, masks)
    x_batched = x.clone().requires_grad_()
    x_loop = x.clone().requires_grad_()
    got = LovaszHingeLoss()(x_batched, t)
    expected = _lovasz_hinge_image_by_image(x_loop, t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got.backward()
    expected.backward()
    torch.testing.assert_close(x_batched.grad, x_loop.grad, rtol=1e-5, atol=1e-6)
    assert x_batched.grad.abs().sum() > 0 or got.item() == 0


def test_lovasz_hinge_with_tied_errors_keeps_its_value():
    """Equal errors sort in any order; the Lovasz extension sums the same increments over a tie."""
    x = torch.zeros(3, 1, 5, 5)  # every hinge error is 1
    x[1, 0, :2] = 0.5
    _, t = _lovasz_case(7, (3, 1, 5, 5), "mixed")
    torch.testing.assert_close(LovaszHingeLoss()(x, t), _lovasz_hinge_image_by_image(x, t))


def test_lovasz_hinge_runs_the_same_ops_whatever_the_batch_size():
    """No Python loop over images: a batch of 8 dispatches exactly as many ATen ops as a batch of 1."""
    counts = []
    for n in (1, 8):
        x, t = _lovasz_case(n, (n, 1, 12, 12), "random")
        x.requires_grad_()
        with SyncCounter() as syncs:
            LovaszHingeLoss()(x, t).backward()
        counts.append(syncs.ops)
    assert counts[0] == counts[1], counts


def _sync_free_case(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A case for each loss in the target form that stays on the device: class maps for the two-class
    Dice loss, one-hot maps for cross-entropy (its class-map form checks indices on the host)."""
    torch.manual_seed(0)
    if name == "TwoClassDiceLoss":
        return 3 * torch.randn(2, 2, 6, 8, 8), torch.randint(0, 2, (2, 6, 8, 8))
    if name == "CrossEntropyLoss":
        cls = torch.randint(0, 2, (2, 24, 24))
        return 3 * torch.randn(2, 2, 24, 24), F.one_hot(cls, 2).movedim(-1, 1).float()
    return 3 * torch.randn(2, 1, 24, 24), (torch.rand(2, 1, 24, 24) > 0.6).float()


@pytest.mark.parametrize("name", LOSSES)
def test_forward_and_backward_of_each_loss_never_wait_for_the_device(name):
    loss = build_loss(name)
    x, t = _sync_free_case(name)
    x.requires_grad_()
    with SyncCounter() as syncs:
        loss(x, t).backward()
        DeepSupervisionLoss(loss, [1.0, 2.0])([x, 2 * x], t).backward()
    assert syncs.total == 0, syncs
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("target_form", ["long", "float", "bool", "channel"])
def test_two_class_dice_takes_every_class_map_form_without_host_reads(target_form):
    x, cls = _sync_free_case("TwoClassDiceLoss")
    reference = TwoClassDiceLoss()(x, F.one_hot(cls, 2).movedim(-1, 1).float())  # the one-hot path
    target = {"long": cls, "float": cls.float(), "bool": cls.bool(), "channel": cls[:, None]}[target_form]
    with SyncCounter() as syncs:
        got = TwoClassDiceLoss()(x, target)
    assert syncs.total == 0, syncs
    torch.testing.assert_close(got, reference)


@pytest.mark.parametrize("bad", [0.5, 2, -1], ids=["fraction", "class 2", "negative"])
def test_two_class_dice_turns_loss_and_gradients_nan_for_labels_outside_0_1(bad):
    x, cls = _sync_free_case("TwoClassDiceLoss")
    x.requires_grad_()
    target = cls.float() if isinstance(bad, float) else cls.clone()
    target[1, 2, 3, 4] = bad
    loss = TwoClassDiceLoss()(x, target)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(x.grad).all()  # so the training loop skips the step instead of learning from it

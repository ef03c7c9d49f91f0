"""common.testing.SyncCounter: which ops it counts as host-device synchronisations, and which it leaves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from common.sync_counter import ALWAYS_SYNC, SOMETIMES_SYNC
from common.testing import REPO_ROOT, SyncCounter, child_env


def _vec() -> torch.Tensor:
    return torch.tensor([-1.5, 0.5, 2.0, -0.25, 3.0])


# (what the code does, the op it must be counted as)
SYNCING = [
    ("item", lambda t: t.sum().item(), "aten._local_scalar_dense"),
    ("bool", lambda t: bool(t[0] > 0), "aten._local_scalar_dense"),
    ("float", lambda t: float(t[1]), "aten._local_scalar_dense"),
    ("int", lambda t: int(t[2]), "aten._local_scalar_dense"),
    ("if tensor", lambda t: 1 if (t > 0).any() else 0, "aten._local_scalar_dense"),
    ("format", lambda t: f"{t.max():.3f}", "aten._local_scalar_dense"),
    ("bool mask read", lambda t: t[t > 0], "aten.index"),
    ("equal", lambda t: torch.equal(t, t.clone()), "aten.equal"),
    ("allclose", lambda t: torch.allclose(t, t + 1e-9), "aten.allclose"),
    ("nonzero", lambda t: torch.nonzero(t > 0), "aten.nonzero"),
    ("where with one argument", lambda t: torch.where(t > 0), "aten.nonzero"),
    ("masked_select", lambda t: torch.masked_select(t, t > 0), "aten.masked_select"),
    ("unique", lambda t: torch.unique(t), "aten._unique2"),
    ("unique_consecutive", lambda t: torch.unique_consecutive(t), "aten.unique_consecutive"),
    ("bincount", lambda t: torch.bincount((t > 0).long()), "aten.bincount"),
    (
        "repeat_interleave",
        lambda t: torch.repeat_interleave(t, torch.ones(5, dtype=torch.long)),
        "aten.repeat_interleave",
    ),
    (
        "bool mask write of a tensor",
        lambda t: t.clone().__setitem__(t > 0, torch.zeros(3)),
        "aten.index_put_",
    ),
    ("tolist", lambda t: t.tolist(), "Tensor.tolist"),
    ("numpy", lambda t: t.numpy(), "Tensor.numpy"),
    ("cpu", lambda t: t.cpu(), "Tensor.cpu"),
]


@pytest.mark.parametrize("name, run, op", SYNCING, ids=[s[0] for s in SYNCING])
def test_each_synchronising_op_is_counted_once_under_its_name(name, run, op):
    t = _vec()
    with SyncCounter() as syncs:
        run(t)
    assert syncs.by_op == {op: 1}, syncs
    assert syncs.total == 1


NOT_SYNCING = [
    ("elementwise", lambda t: (t * 2 + 1).exp().clamp(max=3.0).sigmoid() / (t.abs() + 1)),
    ("comparisons", lambda t: torch.where(t > 0, t, -t) * (t < 1)),
    ("reductions", lambda t: (t.sum(), t.mean(), t.max(), t.amin(), t.std(), torch.aminmax(t), t.argmax())),
    ("scans and sorts", lambda t: (t.cumsum(0), torch.sort(t), torch.topk(t, 2), t.gather(0, t.argsort()))),
    ("integer index", lambda t: t[torch.tensor([0, 2])]),
    ("basic slicing", lambda t: t[1:4][::2]),
    ("network layers", lambda t: F.conv2d(t.reshape(1, 1, 1, 5), torch.ones(2, 1, 1, 3)).relu().softmax(1)),
    ("bool mask write of a python scalar", lambda t: t.clone().__setitem__(t > 0, 0.0)),  # masked_fill_
    (
        "repeat_interleave with output_size",
        lambda t: torch.repeat_interleave(t, torch.ones(5, dtype=torch.long), output_size=5),
    ),
    ("repeat_interleave by an int", lambda t: torch.repeat_interleave(t, 2)),
    ("nonzero_static", lambda t: torch.nonzero_static(t > 0, size=5)),
    # A device-side assert: a kernel launch on CUDA, the host does not wait (cuda/TensorCompare.cu).
    ("assert_async", lambda t: torch._assert_async((t.abs() >= 0).all())),
]


@pytest.mark.parametrize("name, run", NOT_SYNCING, ids=[s[0] for s in NOT_SYNCING])
def test_math_reductions_and_static_indexing_are_not_counted(name, run):
    t = _vec()
    with SyncCounter() as syncs:
        run(t)
    assert syncs.total == 0, syncs
    assert syncs.ops > 0  # the ops did pass through the counter


def test_counts_add_up_per_op_and_stop_at_exit():
    t = _vec()
    with SyncCounter() as syncs:
        for _ in range(3):
            t.sum().item()
        t[t > 0]
        torch.equal(t, t)
    t.sum().item()  # after the block: not counted
    assert syncs.by_op == {"aten._local_scalar_dense": 3, "aten.index": 1, "aten.equal": 1}
    assert syncs.total == 5
    assert [name for name, _ in syncs.sites] == ["aten._local_scalar_dense"] * 3 + [
        "aten.index",
        "aten.equal",
    ]
    # Each site is the line of this file that asked for the value, not a line inside torch.
    assert all(Path(site.rsplit(":", 1)[0]) == Path(__file__) for _, site in syncs.sites)


class _ReadsGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        grad.abs().max().item()  # a host read that only the backward pass makes
        return grad * 2


def test_backward_ops_are_counted():
    x = torch.randn(4, requires_grad=True)
    with SyncCounter() as syncs:
        (x.exp() * 3).sum().backward()
    assert syncs.total == 0 and syncs.ops > 0
    with SyncCounter() as syncs:
        _ReadsGradient.apply(x).sum().backward()
    assert syncs.by_op == {"aten._local_scalar_dense": 1}


def test_copies_between_host_and_device_are_counted_unless_non_blocking():
    with FakeTensorMode():  # stands in for a CUDA tensor on a machine without one; no data is copied
        device = torch.empty(3, device="cuda")
        host = torch.empty(3)
        cases = [
            (lambda: device.cpu(), {"aten._to_copy": 1}),
            (lambda: device.to("cpu"), {"aten._to_copy": 1}),
            (lambda: host.to("cuda"), {"aten._to_copy": 1}),
            (lambda: host.copy_(device), {"aten.copy_": 1}),
            (lambda: device.to("cpu", non_blocking=True), {}),
            (lambda: host.to("cuda", non_blocking=True), {}),
            (lambda: device.sum() * 2, {}),
        ]
        for run, expected in cases:
            with SyncCounter() as syncs:
                run()
            assert syncs.by_op == expected, syncs


def test_every_op_aten_tags_as_data_dependent_is_covered():
    """ATen tags the ops whose output value or size depends on the data (tags.yaml); each one that reaches
    a dispatch mode (composite-implicit ops decompose before it) must be in the counter's lists."""
    tags = {torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape}
    tagged, missing = [], []
    for name in dir(torch.ops.aten):
        packet = getattr(torch.ops.aten, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if not tags & set(op.tags):
                continue
            tagged.append(str(op))
            if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd"):
                continue
            if str(op.overloadpacket) not in ALWAYS_SYNC | SOMETIMES_SYNC:
                missing.append(str(op))
    assert "aten.nonzero.default" in tagged and "aten._local_scalar_dense.default" in tagged
    assert not missing, f"ops with data-dependent outputs that the counter ignores: {missing}"


def test_common_testing_still_imports_without_torch():
    """The script suites import common.testing and never torch; SyncCounter loads torch only when asked for."""
    code = "import sys, common.testing; assert 'torch' not in sys.modules; common.testing.SyncCounter"
    probe = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr

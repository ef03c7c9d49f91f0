"""Sliding-window inference: exact invariances, coverage, padding, TTA and agreement with one forward pass."""

from __future__ import annotations

import itertools

import pytest
import torch
from sliding_window import flip_sets, gaussian_importance, sliding_window_inference, window_starts
from vnet import VNet


@pytest.mark.parametrize("shape", [(1, 1, 37, 50, 29), (2, 1, 10, 12, 70), (1, 2, 32, 32, 32)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_identity_plus_one_gives_input_plus_one_everywhere(shape, overlap, blend):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = sliding_window_inference(
        x, lambda w: w + 1, (16, 32, 32), overlap=overlap, batch_size=3, blend=blend, activation="none"
    )
    assert out.shape == x.shape
    torch.testing.assert_close(out, x + 1, rtol=0, atol=1e-5)


def test_mirroring_tta_and_cpu_accumulation_keep_the_invariance():
    x = torch.randn(1, 1, 20, 33, 47)
    out = sliding_window_inference(
        x, lambda w: w + 1, (16, 16, 32), tta=True, activation="none", accumulate_device="cpu"
    )
    torch.testing.assert_close(out, x + 1, rtol=0, atol=1e-5)
    assert len(flip_sets(True)) == 8 and flip_sets(False) == [()] and flip_sets([(2,)]) == [(), (2,)]


def test_windows_cover_the_volume_with_the_requested_overlap():
    for size, patch, overlap in itertools.product((16, 31, 64, 100, 257), (16, 32, 48), (0.0, 0.25, 0.5)):
        starts = window_starts(size, patch, overlap)
        assert starts[0] == 0 and starts[-1] == max(0, size - patch)
        if size > patch:
            gaps = [b - a for a, b in zip(starts, starts[1:])]
            assert max(gaps) <= patch * (1 - overlap) + 1 and min(gaps) >= 1


def test_gaussian_weights_peak_in_the_centre_and_stay_positive():
    w = gaussian_importance((16, 32, 48))
    assert w.shape == (16, 32, 48) and float(w.max()) == 1.0 and float(w.min()) > 0
    assert w[8, 16, 24] > w[8, 16, 2] > w[0, 0, 0]


def test_position_dependent_outputs_are_blended_by_the_weights():
    # Each window reports its own batch slot; with constant blending a voxel gets the mean of the windows
    # covering it, which the independent count below reproduces.
    x = torch.zeros(1, 1, 16, 16, 48)
    calls = {"n": 0}

    def _tag(w: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(w, float(calls["n"]))
        calls["n"] += 1
        return out

    out = sliding_window_inference(x, _tag, (16, 16, 16), overlap=0.5, blend="constant", activation="none")
    starts = window_starts(48, 16, 0.5)
    expected = torch.zeros(48)
    counts = torch.zeros(48)
    for i, s in enumerate(starts):
        expected[s : s + 16] += i
        counts[s : s + 16] += 1
    torch.testing.assert_close(out[0, 0, 3, 5], expected / counts)


def test_one_window_equals_the_model_and_bad_arguments_are_refused():
    torch.manual_seed(0)
    model = VNet(elu=False, nll=True).eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        direct = torch.softmax(model(x), dim=1)
    blended = sliding_window_inference(x, model, (16, 32, 32))
    torch.testing.assert_close(blended, direct, rtol=1e-5, atol=1e-6)
    assert torch.allclose(blended.sum(1), torch.ones(1, 16, 32, 32))
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(x, model, (16, 32, 32), overlap=1.0)
    with pytest.raises(ValueError, match="N, C, D, H, W"):
        sliding_window_inference(x[0], model, (16, 32, 32))

"""predict.py writes masks in each input's exact geometry (after resampling to the training voxel size and
back), scores them against reference masks, and pthtar2onnx.py exports with onnxruntime parity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from predict import Preprocessing, dice_score, main, predict_probability
from pthtar2onnx import main as export_main
from vnet import VNet

from common.imageio import Volume, read_volume, same_geometry, write_volume
from common.metrics import hd95

OBLIQUE = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # x and y swapped, one flipped


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A V-Net checkpoint as train.py writes it, for a LUNA16 run (4 mm voxels) and a Decathlon run."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    weights = VNet(elu=False, nll=True).state_dict()
    luna = {"epoch": 1, "state_dict": weights, "config": {"dataset": "luna16", "elu": False,
            "normalization": {"vox_spacing": 4.0}, "patch_size": [16, 32, 32], "label_map": "3,4"}}  # fmt: skip
    msd = {"state_dict": weights, "config": {"dataset": "msd", "intensity": "zscore", "label_map": "gt0",
           "patch_size": [16, 16, 16], "val_patch_size": [16, 16, 32]}}  # fmt: skip
    torch.save(luna, root / "luna.pth.tar")
    torch.save(msd, root / "msd.pth.tar")
    return root


def scan(shape=(23, 37, 29), spacing=(2.5, 0.7, 0.8), origin=(12.5, -30.0, -250.0), direction=OBLIQUE):
    rng = np.random.default_rng(0)
    ct = rng.normal(-700, 150, shape).astype(np.int16)
    labels = np.zeros(shape, np.uint8)
    labels[5:15, 10:25, 8:20] = 3
    labels[15:18, 10:25, 8:20] = 5
    return Volume(ct, spacing, origin, direction), Volume(labels, spacing, origin, direction)


@pytest.mark.parametrize("fmt", [".mhd", ".nii.gz"])
def test_masks_keep_the_input_geometry_exactly_and_are_scored(tmp_path, checkpoints, fmt, capsys):
    ct, labels = scan()
    write_volume(tmp_path / "in" / "case.mhd", ct.array, like=ct)
    write_volume(tmp_path / "ref" / "case.nii.gz", labels.array, like=labels)
    args = ["--checkpoint", str(checkpoints / "luna.pth.tar"), "--input", str(tmp_path / "in"),
            "--output", str(tmp_path / "out"), "--reference", str(tmp_path / "ref"), "--format", fmt,
            "--threshold", "0.45", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    written = read_volume(tmp_path / "out" / f"case{fmt}")
    assert same_geometry(written, ct, tol=1e-6) is None
    assert written.array.dtype == np.uint8 and set(np.unique(written.array)) <= {0, 1}
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    (row,) = metrics["cases"]
    truth = np.isin(labels.array, (3, 4))
    assert row["dice"] == pytest.approx(dice_score(written.array.astype(bool), truth))
    expected_hd = hd95(written.array.astype(bool), truth, spacing=ct.spacing)
    assert row["hd95_mm"] == (pytest.approx(expected_hd) if np.isfinite(expected_hd) else None)
    assert "resampled to 4.0 mm" in capsys.readouterr().out


def test_probabilities_come_back_on_the_native_grid_without_resampling(checkpoints):
    from predict import load_model, preprocessing_from_config

    model, config = load_model(checkpoints / "msd.pth.tar", torch.device("cpu"))
    prep = preprocessing_from_config(config)
    assert prep == Preprocessing("zscore", None, (16, 16, 32), "gt0")
    mri = Volume(np.random.default_rng(1).normal(300, 80, (16, 13, 30)).astype(np.float32), (1.0, 1.2, 0.9))
    prob = predict_probability(model, mri, prep, overlap=0.25, tta=True)
    assert prob.shape == (16, 13, 30) and prob.dtype == np.float32 and 0 <= prob.min() <= prob.max() <= 1


def test_single_file_output_name_and_reference_geometry_check(tmp_path, checkpoints):
    ct, labels = scan(shape=(12, 20, 20))
    write_volume(tmp_path / "ct.nii.gz", ct.array, like=ct)
    moved = Volume(labels.array, labels.spacing, (0.0, 0.0, 0.0), labels.direction)
    write_volume(tmp_path / "ref.nii.gz", moved.array, like=moved)
    base = ["--checkpoint", str(checkpoints / "luna.pth.tar"), "--input", str(tmp_path / "ct.nii.gz"),
            "--output", str(tmp_path / "mask.mhd"), "--device", "cpu"]  # fmt: skip
    assert main(base) == 0
    assert same_geometry(read_volume(tmp_path / "mask.mhd"), ct, tol=1e-6) is None
    from common.errors import DataError

    with pytest.raises(DataError, match="origin"):
        main([*base, "--reference", str(tmp_path / "ref.nii.gz")])


def test_onnx_export_matches_pytorch(tmp_path, checkpoints, capsys):
    out = tmp_path / "vnet.onnx"
    args = [
        "--checkpoint",
        str(checkpoints / "luna.pth.tar"),
        "--output",
        str(out),
        "--input_size",
        "16x32x32",
    ]
    assert export_main(args) == 0
    assert out.is_file() and "onnxruntime matches PyTorch" in capsys.readouterr().out
    assert export_main([*args[:-1], "20x32x32"]) == 2  # not a multiple of 16: refused with the padded size
    assert "use 32x32x32" in capsys.readouterr().err

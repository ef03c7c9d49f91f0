"""common/isic: ISIC 2018 preparation, the decoded-once Dataset, the solver's schedule and log lines, the
loss-curve file, and one tiny in-process train / test / resume / predict / export round."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.demo_data import write_isic2018
from common.engine import StepInfo
from common.errors import ConfigError, DataError
from common.isic import dataset as isic_dataset
from common.isic import prepare as P
from common.isic.dataset import (
    ISICDataset,
    augment_pair,
    build_split,
    cache_size_for,
    decode_image,
    open_split_cache,
)
from common.isic.losscurve import config_differences, read_curve, split_hash, write_curve
from common.isic.solver import build_network, epoch_lines, lr_factor, scores_text, step_line
from common.testing import shared_data

SIZES = ((64, 48), (80, 60))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Ten ISIC-format pairs (7 / 1 / 2 after the 70/10/20 split)."""
    return write_isic2018(tmp_path_factory.mktemp("isic") / "isic2018", n=10, sizes=SIZES)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    # Never write beside a shared read-only dataset, and keep runs of this file apart.
    monkeypatch.setenv("MODELZOO_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("MODELZOO_OUTPUT_DIR", "MODELZOO_CASE_NAME", "MODELZOO_NETWORK", "MODELZOO_MODE",
                 "MODELZOO_BATCH_SIZE", "MODELZOO_RANK_SIZE", "WORLD_SIZE", "RANK", "LOCAL_RANK"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------------------------- split


def test_split_counts_follow_the_reference_truncation():
    assert P.split_counts(2594) == (1815, 259, 520)
    assert P.split_counts(40) == (28, 4, 8)
    assert P.split_counts(10) == (7, 1, 2)
    assert P.split_counts(100, (0.6, 0.2, 0.2)) == (60, 20, 20)
    with pytest.raises(ConfigError, match="three numbers"):
        P.split_counts(10, (0.0, 0.5, 0.5))


def test_split_is_seeded_disjoint_complete_and_order_free():
    ids = [f"ISIC_{i:07d}" for i in range(50)]
    a = P.split_ids(ids, seed=7)
    assert a == P.split_ids(list(reversed(ids)), seed=7)
    assert a != P.split_ids(ids, seed=8)
    assert [len(a[s]) for s in P.SPLITS] == [35, 5, 10]
    joined = a["train"] + a["valid"] + a["test"]
    assert sorted(joined) == ids and len(set(joined)) == 50


def _zip_side(folder: Path, archive: Path) -> None:
    # As ISIC distributes them: a top-level folder of the zip's name plus licence files.
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"{folder.name}/LICENSE.txt", "CC BY-NC")
        for path in sorted(folder.iterdir()):
            zf.write(path, f"{folder.name}/{path.name}")


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != P.SPLIT_FILE and ".cache" not in p.parts
    }


def test_prepare_from_folders_and_from_zips_gives_the_same_layout(demo, tmp_path, capsys):
    source = P.find_source(demo)
    record = P.prepare(source, tmp_path / "from_folders", seed=3)
    out = capsys.readouterr().out
    assert "image count in train path :7" in out and "image count in test path :2" in out
    assert record["counts"] == {"train": 7, "valid": 1, "test": 2}
    assert P.is_prepared(tmp_path / "from_folders")
    for split in P.SPLITS:
        images = sorted(p.stem for p in (tmp_path / "from_folders" / split).iterdir())
        masks = sorted(p.stem for p in (tmp_path / "from_folders" / f"{split}_GT").iterdir())
        assert images == record["splits"][split] and masks == [f"{i}_segmentation" for i in images]
    zips = tmp_path / "zips"
    zips.mkdir()
    _zip_side(demo / P.IMAGE_DIR, zips / f"{P.IMAGE_DIR}.zip")
    _zip_side(demo / P.GT_DIR, zips / f"{P.GT_DIR}.zip")
    zipped = P.find_source(zips)
    assert zipped.images.suffix == ".zip"
    P.prepare(zipped, tmp_path / "from_zips", seed=3)
    assert _tree_bytes(tmp_path / "from_zips") == _tree_bytes(tmp_path / "from_folders")
    saved = json.loads((tmp_path / "from_folders" / P.SPLIT_FILE).read_text())
    assert saved["seed"] == 3 and saved["splits"] == record["splits"]


def test_a_split_file_reproduces_a_split(demo, tmp_path):
    first = P.prepare(P.find_source(demo), tmp_path / "a", seed=11, log=lambda _: None)
    again = P.prepare(P.find_source(demo), tmp_path / "b", split_file=tmp_path / "a" / P.SPLIT_FILE,
                      log=lambda _: None)  # fmt: skip
    assert again["splits"] == first["splits"] and again["seed"] == 11


def test_missing_and_mis_sized_masks_are_reported_by_name(demo, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(demo, broken)
    (broken / P.GT_DIR / "ISIC_0000003_segmentation.png").unlink()
    with pytest.raises(DataError, match="ISIC_0000003.jpg: image has no mask"):
        P.prepare(P.find_source(broken), tmp_path / "out", log=lambda _: None)
    shutil.rmtree(broken)
    shutil.copytree(demo, broken)
    Image.new("L", (10, 10)).save(broken / P.GT_DIR / "ISIC_0000004_segmentation.png")
    with pytest.raises(DataError, match=r"ISIC_0000004_segmentation.png: size \(10, 10\) differs"):
        P.prepare(P.find_source(broken), tmp_path / "out", log=lambda _: None)


def test_resolve_prepares_once_then_reuses_and_accepts_every_form(demo, tmp_path):
    messages: list[str] = []
    prepared = P.resolve_data_path(demo, log=messages.append)
    assert P.is_prepared(prepared) and str(prepared).startswith(str(tmp_path / "cache"))
    assert any(m.startswith("Preparing") for m in messages)
    stamp = (prepared / P.SPLIT_FILE).stat().st_mtime_ns
    messages.clear()
    assert P.resolve_data_path(demo / P.IMAGE_DIR, log=messages.append) == prepared
    assert (
        messages[0].startswith("Using the prepared split")
        and (prepared / P.SPLIT_FILE).stat().st_mtime_ns == stamp
    )
    assert P.resolve_data_path(prepared, log=messages.append) == prepared  # a prepared layout as it is
    assert all((prepared / "train" / f).is_symlink() for f in os.listdir(prepared / "train"))
    with pytest.raises(DataError, match="neither ISIC 2018 Task 1 as distributed"):
        P.resolve_data_path(tmp_path, log=messages.append)


def _broken_copy(dest: Path) -> tuple[Path, Path]:
    """Twelve pairs, one image cut in its header and one mask removed; returns the two files."""
    write_isic2018(dest, n=12, sizes=SIZES)
    images = sorted((dest / P.IMAGE_DIR).iterdir())
    garbled = images[1]
    garbled.write_bytes(garbled.read_bytes()[:40])
    lonely = images[4]
    (dest / P.GT_DIR / f"{lonely.stem}{P.GT_SUFFIX}.png").unlink()
    return garbled, lonely


def test_bad_samples_are_refused_by_default_every_file_named(tmp_path):
    garbled, lonely = _broken_copy(tmp_path / "broken")
    with pytest.raises(DataError) as info:
        P.prepare(P.find_source(tmp_path / "broken"), tmp_path / "out", log=lambda _: None)
    assert f"{lonely}: image has no mask" in str(info.value) and "--skip_bad_samples" in str(info.value)
    (tmp_path / "broken" / P.GT_DIR / f"{lonely.stem}{P.GT_SUFFIX}.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as info:
        P.resolve_data_path(tmp_path / "broken", log=lambda _: None)
    message = str(info.value)
    assert "2 problem(s) in 2 file(s) out of 12 pairs" in message and f"{garbled}: cannot be read" in message
    assert f"{lonely.stem}{P.GT_SUFFIX}.png: cannot be read as a mask" in message
    assert "--skip_bad_samples" in message
    assert not (tmp_path / "out").exists()


def test_bad_samples_are_left_out_before_the_split_and_listed_with_skip_bad(tmp_path):
    garbled, lonely = _broken_copy(tmp_path / "broken")
    messages: list[str] = []
    root = P.resolve_data_path(tmp_path / "broken", log=messages.append, skip_bad=True)
    record = json.loads((root / P.SPLIT_FILE).read_text())
    kept = sorted(i for s in P.SPLITS for i in record["splits"][s])
    assert len(kept) == 10 and garbled.stem not in kept and lonely.stem not in kept
    skipped = P.prepared_skips(root)
    assert [(b.id, b.path) for b in skipped] == [(garbled.stem, str(garbled)), (lonely.stem, str(lonely))]
    listed = (root / "skipped_samples.txt").read_text().splitlines()
    assert [line.split("\t")[:2] for line in listed] == [[b.id, b.path] for b in skipped]
    assert any("2 bad sample(s) left out" in m and str(root / "skipped_samples.txt") in m for m in messages)
    # Reused as it is with the flag; refused without it, the left-out files named.
    stamp = (root / P.SPLIT_FILE).stat().st_mtime_ns
    assert P.resolve_data_path(tmp_path / "broken", log=lambda _: None, skip_bad=True) == root
    assert (root / P.SPLIT_FILE).stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match=f"{lonely}: image has no mask"):
        P.resolve_data_path(tmp_path / "broken", log=lambda _: None)
    # A sample fixed since is noticed: prepared again (here refused: the garbled image is still bad) ...
    mask = tmp_path / "broken" / P.GT_DIR / f"{lonely.stem}{P.GT_SUFFIX}.png"
    Image.new("L", Image.open(lonely).size).save(mask)
    with pytest.raises(DataError, match="1 problem.s. in 1 file.s. out of 12 pairs") as info:
        P.resolve_data_path(tmp_path / "broken", log=lambda _: None)
    assert str(garbled) in str(info.value)
    assert P.resolve_data_path(tmp_path / "broken", log=lambda _: None, skip_bad=True) == root
    assert [b.id for b in P.prepared_skips(root)] == [garbled.stem]
    # ... a preparation that left a sample out is refused by name without the flag ...
    with pytest.raises(DataError, match="was prepared with --skip_bad_samples") as info:
        P.resolve_data_path(tmp_path / "broken", log=lambda _: None)
    assert str(garbled) in str(info.value) and "--skip_bad_samples to leave" in str(info.value)
    # ... and once every file is fixed, prepared again from all twelve.
    shutil.copyfile(sorted((tmp_path / "broken" / P.IMAGE_DIR).iterdir())[0], garbled)
    assert P.resolve_data_path(tmp_path / "broken", log=lambda _: None) == root
    assert P.prepared_skips(root) == [] and not (root / "skipped_samples.txt").exists()
    assert sum(json.loads((root / P.SPLIT_FILE).read_text())["counts"].values()) == 12


def test_files_that_fail_only_when_decoded_are_all_named_or_left_out(demo, tmp_path):
    root = tmp_path / "prepared"
    P.prepare(P.find_source(demo), root, seed=3, log=lambda _: None)
    train_images = sorted((root / "train").iterdir())
    cut = [train_images[0], train_images[3]]
    for path in cut:  # headers intact, pixels missing: only a decode finds them
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.8)])
    with pytest.raises(DataError) as info:
        build_split(root, "train", 32, log=lambda _: None)
    message = str(info.value)
    assert "2 of 7 sample(s) cannot be decoded" in message and "--skip_bad_samples" in message
    assert all(str(path) in message for path in cut)
    # Remembered: the next refusal decodes nothing.
    with pytest.raises(DataError, match="2 of 7 sample"):
        build_split(root, "train", 32, log=lambda m: pytest.fail(f"decoded again: {m}"))
    train = build_split(root, "train", 32, log=lambda _: None, skip_bad=True)
    assert len(train) == 5 and sorted(b.path for b in train.skipped) == sorted(str(p) for p in cut)
    assert not {p.stem for p in cut} & set(train.ids)
    assert train[4][0].abs().sum() > 0  # the rows are decoded images, not the stand-ins of failed ones
    again = build_split(root, "train", 32, log=lambda m: pytest.fail(f"decoded again: {m}"), skip_bad=True)
    assert again.ids == train.ids and again.skipped == train.skipped


@pytest.mark.shared_data
def test_the_real_pairs_split_70_10_20():
    root = shared_data("isic2018")
    source = P.find_source(root)
    pairs = P.source_pairs(source)
    assert len(pairs) == 40
    splits = P.split_ids([k for k, _, _ in pairs])
    assert [len(splits[s]) for s in P.SPLITS] == [28, 4, 8]


# ----------------------------------------------------------------------------------------------- dataset


def test_cache_size_is_a_multiple_of_16_above_the_image_size():
    assert [cache_size_for(s) for s in (32, 128, 224)] == [48, 160, 288]


def test_jpeg_draft_decoding_matches_a_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:600, 0:800]
    smooth = np.stack([xx / 800 * 255, yy / 600 * 255, (xx + yy) / 1400 * 255], axis=2)
    image = np.clip(smooth + rng.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.jpg", quality=95)
    fast = decode_image(tmp_path / "a.jpg", 96).astype(np.float64)
    full = np.asarray(
        Image.open(tmp_path / "a.jpg").convert("RGB").resize((96, 96), Image.Resampling.BILINEAR)
    )
    assert fast.shape == (96, 96, 3)
    assert np.abs(fast - full).mean() < 2.0


def test_dataset_items_and_that_later_epochs_never_decode(demo, monkeypatch):
    root = P.resolve_data_path(demo, log=lambda _: None)
    train = build_split(root, "train", 32, augmentation_prob=1.0, seed=5, log=lambda _: None)
    image, mask = train[0]
    assert image.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
    assert image.min() >= -1 and image.max() <= 1 and set(mask.unique().tolist()) <= {0.0, 1.0}
    # Evaluation items: the cached row resized, computed independently with PIL.
    row = np.load(open_split_cache(root, "train", 48, log=lambda _: None).array_path)[0]
    expected = np.array(Image.fromarray(row[..., :3]).resize((32, 32), Image.Resampling.BILINEAR))
    assert torch.allclose(train[0][0], torch.from_numpy(expected).permute(2, 0, 1).float() / 127.5 - 1)
    expected_mask = np.asarray(Image.fromarray(row[..., 3]).resize((32, 32), Image.Resampling.NEAREST)) >= 128
    assert torch.equal(train[0][1][0], torch.from_numpy(expected_mask).float())
    # Training keys are reproducible, and differ between epochs.
    assert torch.equal(train[(0, 2)][0], train[(0, 2)][0])
    assert not torch.equal(train[(0, 2)][0], train[(1, 2)][0])

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(isic_dataset, "decode_pair", no_decoding)
    again = build_split(root, "train", 32, augmentation_prob=1.0, seed=5, log=lambda _: None)
    for name in os.listdir(root / "train"):  # the JPEGs may even be gone: rows come from the cache
        (root / "train" / name).rename(root / "train" / f".{name}.away")
    try:
        items = [again[(3, i)] for i in range(len(again))]
    finally:
        for name in os.listdir(root / "train"):
            (root / "train" / name).rename(root / "train" / name[1:].removesuffix(".away"))
    assert len(items) == 7


def test_augmentation_moves_image_and_mask_together():
    size = 96
    mask = np.zeros((size, size), bool)
    mask[20:60, 30:80] = True
    image = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)  # grey: hue cannot move it
    for seed in range(6):
        out, out_mask = augment_pair(image, mask, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out_mask.dtype == bool and out.shape[:2] == out_mask.shape
        follows = out[..., 0] >= 128
        iou = (follows & out_mask).sum() / max(1, (follows | out_mask).sum())
        assert iou > 0.9


def test_bad_sizes_and_probabilities_are_refused(demo):
    with pytest.raises(ConfigError, match="multiple of 16"):
        isic_dataset.check_image_size(100)
    with pytest.raises(ConfigError, match=r"augmentation_prob must lie in \[0, 1\]"):
        ISICDataset("unused.npy", [], 32, augmentation_prob=1.5)


# ----------------------------------------------------------------------------------------------- solver


def test_linear_decay_is_the_references():
    n, d = 150, 70
    assert [lr_factor(e, n, d) for e in (0, 79, 80)] == [1.0, 1.0, 1.0]
    assert lr_factor(81, n, d) == pytest.approx(1 - 1 / 70)
    assert lr_factor(149, n, d) == pytest.approx(1 / 70)
    assert lr_factor(150, n, d) == pytest.approx(0.0)
    assert lr_factor(5, 10, 0) == 1.0
    # More decay epochs than epochs: the reference lowers the rate after every epoch from the first.
    assert lr_factor(0, 5, 70) == 1.0 and lr_factor(1, 5, 70) == pytest.approx(1 - 1 / 70)


def test_log_lines_have_the_modelzoo_formats():
    metrics = {
        f"{k}_mean": v
        for k, v in zip(("acc", "se", "sp", "pc", "f1", "jaccard", "dice"), np.linspace(0.1, 0.7, 7))
    }
    info = StepInfo(epoch=1, step=7, steps=14, global_step=21, loss=0.25, loss_avg=0.3, lr=2e-4, step_time=0.1,
                    data_time=0.0, fps=20.0, train_metrics=metrics)  # fmt: skip
    scores = r"Acc: 0\.1000, SE: 0\.2000, SP: 0\.3000, PC: 0\.4000, F1: 0\.5000, JS: 0\.6000, DC: 0\.7000"
    assert re.fullmatch(
        rf"Epoch \[2/100\], Step:\[7/14\], Loss: 0\.2500, \[Training\] {scores}", step_line(info, 100)
    )
    assert re.fullmatch(rf"Epoch \[2/100\], Loss: 0\.3000, \n\[Training\] {scores}, FPS: 12\.35",
                        epoch_lines(1, 100, 0.3, metrics, 12.345))  # fmt: skip
    validation = f"[Validation] {scores_text(metrics)}"
    # The ModelZoo script's TrainAccuracy: the number after "Acc: " up to the comma.
    assert validation.split("Acc: ")[1].split(",")[0] == "0.1000"


def test_networks_get_t_only_where_it_exists():
    r2 = build_network("R2AttU_Net", t=3)
    assert r2.RRCNN1.RCNN[0].t == 3
    assert type(build_network("AttU_Net")).__name__ == "AttU_Net"


# ----------------------------------------------------------------------------------------------- curve


def test_loss_curve_round_trip_and_tamper_check(tmp_path):
    config = {k: 1 for k in ("model_type", "t", "image_size", "img_ch", "output_ch", "batch_size", "world_size",
                             "lr", "beta1", "beta2", "augmentation_prob", "num_epochs", "num_epochs_decay",
                             "max_iters", "seed")}  # fmt: skip
    config["split"] = split_hash({"train": ["b", "a"], "valid": ["c"]})
    assert config["split"] == split_hash({"valid": ["c"], "train": ["a", "b"]})
    path = write_curve(tmp_path / "c.csv", config, [0.5, 0.25])
    curve = read_curve(path)
    assert curve.losses == [0.5, 0.25] and curve.config == config
    assert config_differences(config, {**config, "lr": 2}) == ["lr: 1 vs 2"]
    assert config_differences(config, {**config, "lr": 2}, ignore=["lr"]) == []
    path.write_text(path.read_text().replace('"lr": 1', '"lr": 3'))
    with pytest.raises(DataError, match="does not match its config"):
        read_curve(path)
    (tmp_path / "log.txt").write_text("Epoch [1/1], Step:[1/1], Loss: 0.5\n")
    with pytest.raises(DataError, match="raw log carries no configuration"):
        read_curve(tmp_path / "log.txt")


# ----------------------------------------------------------------------------------------------- a real run


def _main(*argv: str) -> int:
    from common.isic.solver import main

    return main(list(argv), defaults={"model_type": "U_Net"})


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """U_Net, 32 px, batch 2: 2 epochs of 3 steps; checkpoints, results, summary."""
    out = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setenv("MODELZOO_CACHE_DIR", str(out / "cache"))
    args = ["--data_path", str(demo), "--image_size", "32", "--batch_size", "2", "--workers", "0",
            "--warmup_steps", "1", "--seed", "3"]  # fmt: skip
    try:
        whole = ["--model_path", str(out / "models"), "--result_path", str(out / "result")]
        assert _main(*args, "--num_epochs", "2", *whole) == 0
        # The same run in two pieces: one epoch, then resumed to two.
        pieces = ["--model_path", str(out / "pieces"), "--result_path", str(out / "pieces_result")]
        assert _main(*args, "--num_epochs", "1", *pieces) == 0
        resume = str(out / "pieces" / "U_Net" / "checkpoint.pth.tar")
        assert _main(*args, "--num_epochs", "2", *pieces, "--resume", resume) == 0
    finally:
        mp.undo()
    return out


def test_a_run_writes_summary_results_curve_and_selects_by_dice_plus_jaccard(trained):
    summary = json.loads((trained / "models" / "U_Net" / "summary.json").read_text())
    assert summary["selection_key"] == "score" and summary["epochs_done"] == 2
    best = max(summary["history"], key=lambda row: row["dice_mean"] + row["jaccard_mean"])
    assert summary["best_epoch"] == best["epoch"]
    assert summary["train_accuracy"] == pytest.approx(summary["best_validation"]["acc"])
    for key in ("acc", "se", "sp", "pc", "f1", "jaccard", "dice", "hd95"):
        assert key in summary["test"] and key in summary["best_validation"]
    assert summary["test"]["images"] == 2
    curve = read_curve(trained / "result" / "U_Net" / "loss_curve.csv")
    assert len(curve.losses) == 6 and curve.config["batch_size"] == 2 and curve.config["t"] is None
    assert (trained / "result" / "U_Net" / "result.csv").read_text().startswith("model_type,acc,SE")


def test_resume_continues_exactly(trained):
    from common.checkpoint import load_checkpoint

    whole = load_checkpoint(trained / "models" / "U_Net" / "checkpoint.pth.tar")
    pieces = load_checkpoint(trained / "pieces" / "U_Net" / "checkpoint.pth.tar")
    assert whole["epoch"] == pieces["epoch"] == 2
    for key, value in whole["state_dict"].items():
        assert torch.allclose(value.float(), pieces["state_dict"][key].float(), atol=1e-5), key


def test_mode_test_scores_the_best_checkpoint_on_the_test_split(trained, demo, monkeypatch):
    monkeypatch.setenv("MODELZOO_CACHE_DIR", str(trained / "cache"))
    result = trained / "test_result"
    assert _main("--mode", "test", "--data_path", str(demo), "--image_size", "32", "--workers", "0",
                 "--model_path", str(trained / "models"), "--result_path", str(result)) == 0  # fmt: skip
    tested = json.loads((result / "U_Net" / "summary.json").read_text())
    trained_summary = json.loads((trained / "models" / "U_Net" / "summary.json").read_text())
    assert tested["mode"] == "eval" and tested["test"]["dice"] == pytest.approx(
        trained_summary["test"]["dice"]
    )


def test_predict_and_export(trained, demo):
    from common.isic.export import build_parser as export_parser
    from common.isic.export import run as export
    from common.isic.predict import build_parser as predict_parser
    from common.isic.predict import run as predict

    weights = str(trained / "models" / "U_Net" / "model_best.pth.tar")
    images = demo / P.IMAGE_DIR
    rows = predict(predict_parser({"model_type": "U_Net"}).parse_args(
        ["--input", str(images / "ISIC_0000001.jpg"), "--output", str(trained / "pred"), "--pth_path", weights,
         "--image_size", "32", "--gt_dir", str(demo / P.GT_DIR)]))  # fmt: skip
    mask = np.asarray(Image.open(rows[0]["mask"]))
    assert mask.shape == np.asarray(Image.open(images / "ISIC_0000001.jpg")).shape[:2]
    assert set(np.unique(mask)) <= {0, 255} and 0.0 <= rows[0]["dice"] <= 1.0
    path = export(export_parser({"model_type": "U_Net"}).parse_args(
        ["--pth_path", weights, "--image_size", "32", "--output", str(trained / "u.onnx")]))  # fmt: skip
    assert path.stat().st_size > 1_000_000


def test_a_damaged_image_is_refused_by_default_and_left_out_listed_and_noted_with_skip_bad_samples(
    tmp_path, capsys
):
    """One image cut in its header: training and testing stop with one error naming it; with
    --skip_bad_samples the split is made from the other ten, and both summaries count the sample and say
    in final_result.txt where it is listed."""
    data = write_isic2018(tmp_path / "isic2018", n=11, sizes=SIZES)
    garbled = sorted((data / P.IMAGE_DIR).iterdir())[2]
    garbled.write_bytes(garbled.read_bytes()[:40])
    models, results = tmp_path / "models", tmp_path / "result"
    args = ["--data_path", str(data), "--image_size", "32", "--batch_size", "2", "--workers", "0",
            "--num_epochs", "1", "--max_steps", "1", "--warmup_steps", "0", "--model_path", str(models),
            "--result_path", str(results)]  # fmt: skip
    capsys.readouterr()
    assert _main(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("[Error] ") and str(garbled) in err and "--skip_bad_samples" in err
    assert not models.exists()

    assert _main(*args, "--skip_bad_samples") == 0
    listed = models / "U_Net" / "skipped_samples.txt"
    note = f"--skip_bad_samples: 1 bad sample(s) left out (1 problem(s)); listed in {listed}"
    summary = json.loads((models / "U_Net" / "summary.json").read_text())
    assert summary["skipped_samples"] == 1 and summary["notes"] == [note]
    assert f"Note: {note}" in (models / "U_Net" / "final_result.txt").read_text()
    assert listed.read_text().split("\t")[:2] == [garbled.stem, str(garbled)]
    assert summary["best_validation"]["images"] + summary["test"]["images"] == 3  # 10 pairs: 7 / 1 / 2

    tested = ["--mode", "test", *args[:2], "--image_size", "32", "--workers", "0", "--model_path", str(models),
              "--result_path", str(results)]  # fmt: skip
    assert _main(*tested) == 2 and str(garbled) in capsys.readouterr().err
    assert _main(*tested, "--skip_bad_samples") == 0
    summary = json.loads((results / "U_Net" / "summary.json").read_text())
    assert summary["skipped_samples"] == 1 and summary["mode"] == "eval"
    assert f"listed in {results / 'U_Net' / 'skipped_samples.txt'}" in summary["notes"][0]
    assert summary["notes"][0] in (results / "U_Net" / "final_result.txt").read_text()


def test_flag_rules_are_stated(demo, capsys):
    with pytest.raises(SystemExit):
        _main("--data_path", str(demo), "--image_size", "40")
    assert "multiple of 16" in capsys.readouterr().err
    assert _main("--data_path", str(demo), "--image_size", "16", "--batch_size", "1", "--workers", "0") == 2
    assert "one value per channel" in capsys.readouterr().err
    assert math.isclose(lr_factor(0, 1, 1), 1.0)

"""Loss, Dice metrics, log lines, checkpoint names and rank tables against independent computations."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from src.loss import CrossEntropyWithLogits
from src.rank_table import read_rank_table
from src.utils import (
    StepLossTimeMonitor,
    UnetMetrics,
    checkpoint_name,
    dice_coeff,
    epoch_line,
    keep_named_checkpoint,
    named_checkpoints,
    step_line,
)

from common.engine import EpochStats, StepInfo
from common.errors import ConfigError, DataError

STEP_RE = re.compile(r"^step: \d+, loss is -?\d+(\.\d+)?(e-?\d+)?, fps is \d+(\.\d+)?(e[-+]?\d+)?$")
EPOCH_RE = re.compile(
    r"^epoch: +\d+, avg loss:\d+\.\d{4}, total cost: \d+\.\d{3} s, per step fps: *\d+\.\d{3}$"
)


def _onehot(classes: torch.Tensor, n: int = 2) -> torch.Tensor:
    return F.one_hot(classes, n).permute(0, 3, 1, 2).float()


# ------------------------------------------------------------------------------------------------ loss


def test_cross_entropy_with_one_hot_equals_torch_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 5, 5)
    classes = torch.randint(0, 2, (2, 5, 5))
    loss = CrossEntropyWithLogits()
    expected = F.cross_entropy(logits, classes)
    torch.testing.assert_close(loss(logits, _onehot(classes)), expected)
    torch.testing.assert_close(loss(logits, classes), expected)
    # The original's layout: channels last, (-1, C) rows, mean of -sum(y log softmax).
    rows = logits.permute(0, 2, 3, 1).reshape(-1, 2)
    labels = _onehot(classes).permute(0, 2, 3, 1).reshape(-1, 2)
    torch.testing.assert_close(loss(logits, _onehot(classes)), -(labels * rows.log_softmax(1)).sum(1).mean())
    assert loss(logits.bfloat16(), classes).dtype == torch.float32
    with pytest.raises(ConfigError, match="cropped to the network's output size"):
        loss(logits, _onehot(classes)[..., :4])


# ------------------------------------------------------------------------------------------------ metrics


def test_dice_coeff_is_the_originals_soft_formula():
    rng = np.random.default_rng(0)
    prob = rng.random((3, 2, 6, 6))
    prob /= prob.sum(1, keepdims=True)
    label = np.eye(2)[rng.integers(0, 2, (3, 6, 6))].transpose(0, 3, 1, 2)
    got = dice_coeff(torch.from_numpy(prob), torch.from_numpy(label)).numpy()
    for i in range(3):
        p, y = prob[i].ravel(), label[i].ravel()
        assert got[i] == pytest.approx(2 * np.dot(p, y) / (np.dot(p, p) + np.dot(y, y) + 1e-6))


def test_all_cell_prediction_scores_the_cell_fraction():
    """Predicting cell interior everywhere: dice_coeff = 2 N_cell / (N + N) = the cell fraction (~0.78)."""
    classes = torch.zeros(1, 10, 10, dtype=torch.long)
    classes[0, :, :8] = 1  # 80% cell interior
    logits = torch.stack([torch.full((10, 10), -30.0), torch.full((10, 10), 30.0)])[None]
    metrics = UnetMetrics()
    record = metrics.update(logits, _onehot(classes))[0]
    assert record["dice_coeff"] == pytest.approx(0.8, abs=1e-6)
    assert record["iou"] == pytest.approx(0.8 / 1.2, abs=1e-6)
    assert record["hard_dice_membrane"] == 0.0 and record["hard_dice_cell"] == pytest.approx(2 * 80 / 180)


def test_hard_scores_count_pixels_and_states_merge_exactly():
    torch.manual_seed(1)
    logits = torch.randn(4, 2, 8, 8)
    classes = torch.randint(0, 2, (4, 8, 8))
    onehot = _onehot(classes)
    whole = UnetMetrics(compute_hd95=True)
    records = whole.update(logits, onehot)
    pred_m, true_m = logits.argmax(1) == 0, classes == 0
    tp = (pred_m & true_m).sum((1, 2)).double()
    fp = (pred_m & ~true_m).sum((1, 2)).double()
    fn = (~pred_m & true_m).sum((1, 2)).double()
    per_image = 2 * tp / (2 * tp + fp + fn)
    assert [r["hard_dice_membrane"] for r in records] == pytest.approx(per_image.tolist())
    result = whole.compute()
    assert result["hard_dice_membrane"] == pytest.approx(per_image.mean().item())
    assert result["hard_dice_membrane_pooled"] == pytest.approx(
        (2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum())).item()
    )
    assert result["dice_coeff"] == pytest.approx(np.mean([r["dice_coeff"] for r in records]))
    assert result["hd95_membrane"] == pytest.approx(np.mean([r["hd95_membrane"] for r in records]))
    # Two ranks' sums merged through the state tensor equal one pass over all images.
    first, second = UnetMetrics(compute_hd95=True), UnetMetrics(compute_hd95=True)
    first.update(logits[:1], onehot[:1])
    second.update(logits[1:], onehot[1:])
    merged = UnetMetrics(compute_hd95=True)
    merged.load_state_tensor(first.state_tensor() + second.state_tensor())
    for key, value in result.items():
        assert merged.compute()[key] == pytest.approx(value), key


# ------------------------------------------------------------------------------------------------ log lines


def test_step_and_epoch_lines_match_mindspore():
    assert (
        step_line(3, 0.69189453, 57.3293877244179) == "step: 3, loss is 0.69189453, fps is 57.3293877244179"
    )
    assert (
        step_line(600, 0.22070312, 56.99692546024671)
        == "step: 600, loss is 0.22070312, fps is 56.99692546024671"
    )
    assert epoch_line(1, 0.33123, 160.1234, 59.9634) == (
        "epoch:   1, avg loss:0.3312, total cost: 160.123 s, per step fps:59.963"
    )
    lines = []
    monitor = StepLossTimeMonitor(batch_size=16, world_size=8, print_fn=lines.append)
    info = StepInfo(epoch=0, step=7, steps=75, global_step=7, loss=0.6931471805599453, loss_avg=0.7, lr=1e-4,
                    step_time=0.28, data_time=0.0, fps=8 * 16 / 0.28)  # fmt: skip
    monitor.step_end(info)
    stats = EpochStats(loss_mean=0.5, last_loss=0.4, steps=75, images=1200, skipped_steps=0, seconds=21.0,
                       data_wait_seconds=0.0, timed_images=1000, timed_seconds=20.0)  # fmt: skip
    monitor.epoch_end(1, stats)
    assert lines[0] == "step: 7, loss is 0.6931472, fps is 57.14285714285714"  # per device, as MindSpore
    assert lines[1] == "epoch:   1, avg loss:0.5000, total cost: 21.000 s, per step fps:57.143"
    assert STEP_RE.match(lines[0]) and EPOCH_RE.match(lines[1])


# ------------------------------------------------------------------------------------------------ checkpoints


def test_named_checkpoints_link_the_latest_and_keep_the_newest(tmp_path):
    latest = tmp_path / "checkpoint.pth.tar"
    for epoch in range(1, 5):
        tmp = tmp_path / ".new"
        tmp.write_text(f"epoch {epoch}")
        os.replace(tmp, latest)  # how save_checkpoint replaces the file each epoch
        keep_named_checkpoint(latest, tmp_path, epoch, 60, keep_max=2)
    names = [p.name for p in named_checkpoints(tmp_path)]
    assert (
        names
        == [checkpoint_name(3, 60), checkpoint_name(4, 60)]
        == [
            "ckpt_unet_medical_adam-3_60.pth",
            "ckpt_unet_medical_adam-4_60.pth",
        ]
    )
    assert (tmp_path / names[0]).read_text() == "epoch 3" and (tmp_path / names[1]).read_text() == "epoch 4"
    keep_named_checkpoint(latest, tmp_path, 10, 5, keep_max=0)  # 0 keeps every file
    assert [p.name for p in named_checkpoints(tmp_path)][-1] == "ckpt_unet_medical_adam-10_5.pth"
    assert len(named_checkpoints(tmp_path)) == 3  # epoch 10 sorts after 4 (numerically)


# ------------------------------------------------------------------------------------------------ rank tables


def _v1(devices, server="10.0.0.1"):
    return {"version": "1.0", "server_count": "1", "status": "completed",
            "server_list": [{"server_id": server, "host_nic_ip": "reserve",
                             "device": [{"device_id": str(d), "device_ip": f"192.168.{d}.1", "rank_id": str(r)}
                                        for d, r in devices]}]}  # fmt: skip


def test_rank_tables_of_both_formats(tmp_path):
    path = tmp_path / "hccl_2p.json"
    path.write_text(json.dumps(_v1([(4, 0), (5, 1)])))
    table = read_rank_table(path)
    assert table.world_size == 2 and table.servers[0].device_ids == [4, 5] and table.master_addr == "10.0.0.1"
    legacy = {"status": "completed", "group_count": "1",
              "group_list": [{"device_num": "2", "server_num": "2", "instance_count": "2", "instance_list": [
                  {"rank_id": "1", "server_id": "10.0.0.2", "devices": [{"device_id": "0", "device_ip": "x"}]},
                  {"rank_id": "0", "server_id": "10.0.0.1", "devices": [{"device_id": "3", "device_ip": "y"}]}]}]}  # fmt: skip
    path.write_text(json.dumps(legacy))
    table = read_rank_table(path)
    assert [s.server_id for s in table.servers] == ["10.0.0.1", "10.0.0.2"] and table.world_size == 2
    assert table.server_index("10.0.0.2") == 1 and table.servers[0].device_ids == [3]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({**_v1([(0, 0)]), "status": "initializing"}), "status is 'initializing'"),
        (json.dumps(_v1([(0, 0), (1, 0)])), "rank_ids must be 0..1"),
        (json.dumps(_v1([(0, 0), (0, 1)])), "device_ids \\[0, 0\\] with repeats"),
        (json.dumps({"server_list": []}), "lists no device"),
        (json.dumps({"version": "1.0"}), "neither 'server_list'"),
    ],
)
def test_bad_rank_tables_are_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "table.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_rank_table(path)


def test_launcher_maps_a_two_server_table_onto_torchrun(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("unet_mindspore_launch_8p", folder / "launch_8p.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    table_json = {"version": "1.0", "server_count": "2", "status": "completed", "server_list": [
        _v1([(0, 0), (1, 1)], server="10.0.0.1")["server_list"][0],
        _v1([(0, 2), (1, 3)], server="10.0.0.2")["server_list"][0]]}  # fmt: skip
    path = tmp_path / "hccl_4p.json"
    path.write_text(json.dumps(table_json))
    table = read_rank_table(path)
    assert table.world_size == 4 and launcher.this_server(table, "10.0.0.2") == 1
    with pytest.raises(ConfigError, match="pass --server_id"):
        launcher.this_server(table, None)
    args, rest = launcher.build_parser().parse_known_args([f"--rank_table_file={path}", "--lr=1e-3"])
    command = launcher.torchrun_command(args, [0, 1], 2, 1, table.master_addr, rest)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    for flag in (
        "--nnodes=2",
        "--node_rank=1",
        "--master_addr=10.0.0.1",
        "--nproc_per_node=2",
        "--max_restarts=0",
    ):
        assert flag in command
    entry = command.index(launcher.ENTRY)
    assert command[entry + 1 : entry + 4] == ["logs", "0,1", str(path)]
    assert command[-3:] == ["--", "train.py", "--lr=1e-3"]

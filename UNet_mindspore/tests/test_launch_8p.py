"""launch_8p.py and src/rank_table.py on NPU servers: a rank table becomes torchrun and ModelZoo variables
(never RANK_TABLE_FILE unless asked), with the table's physical device ids mapped to the logical indices
ASCEND_RT_VISIBLE_DEVICES gives them. torchrun is recorded instead of run; the rank entry runs for real
in front of a script that dumps its environment."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from src.rank_table import logical_device, visible_devices

from common.errors import ConfigError
from common.testing import child_env

FOLDER = Path(__file__).resolve().parents[1]


def _table(path: Path, devices: list[int]) -> Path:
    path.write_text(json.dumps({
        "version": "1.0", "server_count": "1", "status": "completed",
        "server_list": [{"server_id": "10.0.0.1", "host_nic_ip": "reserve", "device": [
            {"device_id": str(d), "device_ip": f"192.168.{d}.1", "rank_id": str(r)} for r, d in enumerate(devices)]}]}))  # fmt: skip
    return path


@pytest.fixture
def launcher(monkeypatch):
    """launch_8p as a module on a server with 2 visible NPUs; `launcher.started` records torchrun starts."""
    spec = importlib.util.spec_from_file_location(
        "unet_mindspore_launch_8p_under_test", FOLDER / "launch_8p.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.started = []

    def fake_run(command, env=None, **_):
        module.started.append((command, env))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    monkeypatch.setattr(module, "accelerator_count", lambda: 2)
    for key in (
        "RANK_SIZE",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "RANK_TABLE_FILE",
        "ASCEND_RT_VISIBLE_DEVICES",
    ):
        monkeypatch.delenv(key, raising=False)
    return module


def _entry_devices(command: list[str], launcher) -> str:
    return command[command.index(launcher.ENTRY) + 2]


def test_a_table_on_renumbered_npus_is_mapped_to_their_logical_indices(launcher, tmp_path, monkeypatch):
    table = _table(tmp_path / "hccl_2p.json", [4, 5])
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4,5")  # NPUs 4 and 5 are this process's 0 and 1
    assert launcher.main([f"--rank_table_file={table}", f"--log_dir={tmp_path / 'logs'}"]) == 0
    ((command, _),) = launcher.started
    assert "--nproc_per_node=2" in command
    assert launcher.parse_device_spec(_entry_devices(command, launcher)) == [(4, 0), (5, 1)]


def test_a_table_device_that_visible_devices_hides_is_refused(launcher, tmp_path, monkeypatch):
    table = _table(tmp_path / "hccl_2p.json", [4, 6])
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ConfigError) as info:
        launcher.main([f"--rank_table_file={table}"])
    assert f"rank table {table}" in str(info.value) and "NPU 6" in str(info.value)
    assert "ASCEND_RT_VISIBLE_DEVICES=4,5" in str(info.value) and launcher.started == []


def test_without_a_table_the_ranks_take_the_visible_npus(launcher, tmp_path, monkeypatch):
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "2,3")
    assert launcher.main(["--nproc=2", f"--log_dir={tmp_path / 'logs'}"]) == 0
    ((command, _),) = launcher.started
    assert launcher.parse_device_spec(_entry_devices(command, launcher)) == [(2, 0), (3, 1)]


def test_rank_table_file_reaches_the_ranks_only_when_asked(launcher, tmp_path, monkeypatch, capsys):
    table = _table(tmp_path / "hccl_2p.json", [0, 1])
    monkeypatch.setenv("RANK_TABLE_FILE", str(table))  # exported by the caller's shell, MindSpore style
    assert launcher.main([f"--rank_table_file={table}", f"--log_dir={tmp_path / 'logs'}"]) == 0
    assert "RANK_TABLE_FILE" not in launcher.started[-1][1]
    assert f"RANK_TABLE_FILE={table} is not passed to the ranks" in capsys.readouterr().out
    monkeypatch.delenv("RANK_TABLE_FILE")
    assert (
        launcher.main([f"--rank_table_file={table}", "--export_rank_table", f"--log_dir={tmp_path / 'logs'}"])
        == 0
    )
    assert launcher.started[-1][1]["RANK_TABLE_FILE"] == str(table.resolve())
    assert "--export_rank_table" not in launcher.started[-1][0]  # the launcher's flag, not train.py's
    with pytest.raises(ConfigError, match="--export_rank_table needs --rank_table_file"):
        launcher.main(["--nproc=2", "--export_rank_table"])


def test_rank_entry_exports_the_rank_and_the_logical_npu_index(tmp_path):
    dump = tmp_path / "dump_env.py"
    dump.write_text("import json, os, sys\njson.dump(dict(os.environ), open(sys.argv[1], 'w'))\n")
    table = _table(tmp_path / "hccl_4p.json", [4, 5])
    env = child_env(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4")
    env.pop("RANK_TABLE_FILE", None)
    logs, seen = tmp_path / "logs", tmp_path / "env.json"
    proc = subprocess.run([sys.executable, "launch_8p.py", "--rank_entry", str(logs), "4:0,5:1", str(table), "--",
                           str(dump), str(seen)], cwd=FOLDER, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rank_env = json.loads(seen.read_text())
    assert {k: rank_env[k] for k in ("RANK_ID", "RANK_SIZE", "DEVICE_ID", "ASCEND_DEVICE_ID", "LOCAL_RANK")} == {
        "RANK_ID": "3", "RANK_SIZE": "4", "DEVICE_ID": "5", "ASCEND_DEVICE_ID": "1", "LOCAL_RANK": "1"}  # fmt: skip
    assert "RANK_TABLE_FILE" not in rank_env
    log = (logs / "device5" / "log.log").read_text()
    assert log.startswith(f"rank 3 of 4 on device 5 (index 1), rank table {table}")


@pytest.mark.parametrize(
    ("value", "message"),
    [("4,a", "must list NPU ids separated by commas"), ("", "must list NPU ids"),
     ("5,4", "in ascending order"), ("4,4", "in ascending order")],
)  # fmt: skip
def test_unreadable_visible_devices_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        visible_devices({"ASCEND_RT_VISIBLE_DEVICES": value})


def test_physical_ids_map_through_visible_devices():
    assert visible_devices({}) is None and logical_device(6, None) == 6
    visible = visible_devices({"ASCEND_RT_VISIBLE_DEVICES": "1, 3,6"})
    assert visible == [1, 3, 6] and [logical_device(d, visible) for d in (1, 3, 6)] == [0, 1, 2]

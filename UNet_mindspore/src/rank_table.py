"""Ascend rank tables (RANK_TABLE_FILE): which devices of which servers run which ranks.

MindSpore's run_distribute_train.sh takes the HCCL rank table that `hccl_tools.py` writes. Two formats exist;
both are read here. Version 1.0 (current):

    {"version": "1.0", "server_count": "1", "status": "completed",
     "server_list": [{"server_id": "10.0.0.1", "host_nic_ip": "reserve",
                      "device": [{"device_id": "0", "device_ip": "192.168.100.101", "rank_id": "0"},
                                 {"device_id": "1", "device_ip": "192.168.101.101", "rank_id": "1"}]}]}

and the older "group_list" form (MindSpore 0.x/1.0 era):

    {"status": "completed", "group_count": "1",
     "group_list": [{"device_num": "2", "server_num": "1", "instance_count": "2",
                     "instance_list": [{"rank_id": "0", "server_id": "10.0.0.1",
                                        "devices": [{"device_id": "0", "device_ip": "192.168.100.101"}]},
                                       {"rank_id": "1", "server_id": "10.0.0.1",
                                        "devices": [{"device_id": "1", "device_ip": "192.168.101.101"}]}]}]}

The number of ranks is the number of devices listed; a server's processes use its `device_id`s. PyTorch does
not need the device IPs (HCCL/NCCL/gloo rendezvous through MASTER_ADDR), they are only checked for shape.
Ranks must be numbered server by server (0..n-1 on the first server, n..2n-1 on the second, ...), with the
same number of devices on every server, which is how torchrun numbers them too.

A table's `device_id`s are physical NPU ids. Under ASCEND_RT_VISIBLE_DEVICES the runtime renumbers the
visible NPUs 0..n-1 in the order listed (torch_npu/npu/__init__.py `_parse_visible_devices`: ids separated
by commas, ascending), and a process selects its NPU by that logical index: `logical_device` maps one to
the other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError, DataError

VISIBLE_DEVICES = "ASCEND_RT_VISIBLE_DEVICES"


@dataclass(frozen=True)
class RankDevice:
    rank_id: int
    device_id: int
    device_ip: str | None = None


@dataclass(frozen=True)
class RankServer:
    server_id: str
    devices: tuple[RankDevice, ...]

    @property
    def device_ids(self) -> list[int]:
        return [d.device_id for d in self.devices]


@dataclass(frozen=True)
class RankTable:
    path: Path
    servers: tuple[RankServer, ...]

    @property
    def world_size(self) -> int:
        return sum(len(s.devices) for s in self.servers)

    @property
    def master_addr(self) -> str:
        """The server holding rank 0."""
        return self.servers[0].server_id

    def server_index(self, server_id: str) -> int:
        for i, server in enumerate(self.servers):
            if server.server_id == server_id:
                return i
        known = ", ".join(s.server_id for s in self.servers)
        raise DataError(self.path, f"server {server_id!r} is not in the rank table (servers: {known})")


def _int(value: object, what: str, path: Path) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise DataError(path, f"{what} {value!r} is not an integer") from None
    if number < 0:
        raise DataError(path, f"{what} {value!r} is negative")
    return number


def _v1_devices(table: dict, path: Path) -> list[tuple[str, RankDevice]]:
    found = []
    for server in table["server_list"]:
        if (
            not isinstance(server, dict)
            or "server_id" not in server
            or not isinstance(server.get("device"), list)
        ):
            raise DataError(path, f"server_list entry {server} needs a server_id and a device list")
        for dev in server["device"]:
            if not isinstance(dev, dict) or "device_id" not in dev or "rank_id" not in dev:
                raise DataError(
                    path, f"device entry {dev} of server {server['server_id']} needs device_id and rank_id"
                )
            device = RankDevice(
                _int(dev["rank_id"], "rank_id", path),
                _int(dev["device_id"], "device_id", path),
                dev.get("device_ip"),
            )
            found.append((str(server["server_id"]), device))
    return found


def _legacy_devices(table: dict, path: Path) -> list[tuple[str, RankDevice]]:
    found = []
    for group in table["group_list"]:
        instances = group.get("instance_list") if isinstance(group, dict) else None
        if not isinstance(instances, list):
            raise DataError(path, f"group_list entry {group} needs an instance_list")
        for inst in instances:
            devices = inst.get("devices") if isinstance(inst, dict) else None
            if (
                not isinstance(devices, list)
                or "rank_id" not in inst
                or "server_id" not in inst
                or len(devices) != 1
            ):
                raise DataError(path, f"instance {inst} needs rank_id, server_id and exactly one device")
            dev = devices[0]
            if not isinstance(dev, dict) or "device_id" not in dev:
                raise DataError(path, f"instance {inst} needs a device with a device_id")
            device = RankDevice(
                _int(inst["rank_id"], "rank_id", path),
                _int(dev["device_id"], "device_id", path),
                dev.get("device_ip"),
            )
            found.append((str(inst["server_id"]), device))
    return found


def read_rank_table(path: str | Path) -> RankTable:
    """Parse and check a rank table; every problem raises DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "rank table file not found")
    try:
        table = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"rank table is not valid JSON ({exc}); is the file complete?") from None
    if not isinstance(table, dict):
        raise DataError(path, "rank table must be a JSON object")
    if table.get("status", "completed") != "completed":
        raise DataError(path, f"rank table status is {table.get('status')!r}, expected 'completed'")
    if isinstance(table.get("server_list"), list):
        entries = _v1_devices(table, path)
    elif isinstance(table.get("group_list"), list):
        entries = _legacy_devices(table, path)
    else:
        raise DataError(path, "rank table has neither 'server_list' (version 1.0) nor 'group_list'")
    if not entries:
        raise DataError(path, "rank table lists no device")

    ranks = sorted(device.rank_id for _, device in entries)
    if ranks != list(range(len(ranks))):
        raise DataError(path, f"rank_ids must be 0..{len(ranks) - 1}, each once; got {ranks}")
    by_server: dict[str, list[RankDevice]] = {}
    for server_id, device in entries:
        by_server.setdefault(server_id, []).append(device)
    servers = sorted(
        (RankServer(sid, tuple(sorted(devs, key=lambda d: d.rank_id))) for sid, devs in by_server.items()),
        key=lambda s: s.devices[0].rank_id,
    )
    for server in servers:
        ids = server.device_ids
        if len(set(ids)) != len(ids):
            raise DataError(path, f"server {server.server_id} lists device_ids {ids} with repeats")
    per_server = len(servers[0].devices)
    for index, server in enumerate(servers):
        expected = list(range(index * per_server, (index + 1) * per_server))
        if [d.rank_id for d in server.devices] != expected:
            raise DataError(
                path,
                f"server {server.server_id} holds ranks {[d.rank_id for d in server.devices]}; ranks must be "
                f"numbered server by server with {per_server} devices on each (expected {expected})",
            )
    declared = table.get("server_count")
    if declared is not None and _int(declared, "server_count", path) != len(servers):
        raise DataError(path, f"server_count is {declared} but {len(servers)} servers are listed")
    return RankTable(path=path, servers=tuple(servers))


def visible_devices(env: Mapping[str, str] | None = None) -> list[int] | None:
    """The physical NPU ids ASCEND_RT_VISIBLE_DEVICES makes visible, in logical order; None when it is unset.

    A value the runtime would read differently from what it says (a stray character ends torch_npu's parse
    there; ids out of ascending order make it see no NPU) raises ConfigError instead.
    """
    text = (os.environ if env is None else env).get(VISIBLE_DEVICES)
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or not all(part.isdigit() for part in parts):
        raise ConfigError(f"{VISIBLE_DEVICES}={text!r} must list NPU ids separated by commas, e.g. 4,5,6,7")
    ids = [int(part) for part in parts]
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ConfigError(
            f"{VISIBLE_DEVICES}={text!r} must list its NPU ids in ascending order, each once "
            "(the Ascend runtime sees no NPU otherwise)"
        )
    return ids


def logical_device(physical: int, visible: list[int] | None, table: str | Path | None = None) -> int:
    """The index a process passes to set_device for the physical NPU `physical` of a rank table."""
    if visible is None:
        return physical
    if physical not in visible:
        where = f"the rank table {table} puts a rank on" if table else "a rank asks for"
        raise ConfigError(
            f"{where} NPU {physical}, which {VISIBLE_DEVICES}={','.join(map(str, visible))} hides; "
            "list it there or fix the table"
        )
    return visible.index(physical)

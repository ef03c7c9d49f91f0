"""Start one training process per device, from an Ascend rank table or for N local devices.

    python launch_8p.py [--rank_table_file=hccl_8p.json] [--nproc=N] [train.py flags ...]

With a rank table (see src/rank_table.py for the format) the number of ranks and this server's device ids
come from the table; without one, N ranks on devices 0..N-1 (N = --nproc, else RANK_SIZE, else the number
of NPUs/GPUs, else 2 on a CPU-only machine). Either way the processes are started by torchrun, which stops
every rank when one fails; each rank writes stdout and stderr to logs/device<X>/log.log (X = its physical
device id), as the original's run_distribute_train.sh, and runs `python train.py --run_distribute <flags>`.
Several servers: run the same command on each; this server is found by --server_id (or SERVER_ID), and
rank 0's server is the rendezvous address.

The table is translated, not handed on: torchrun's RANK / WORLD_SIZE / MASTER_ADDR and the ModelZoo's
RANK_ID / RANK_SIZE / DEVICE_ID (physical) / ASCEND_DEVICE_ID and LOCAL_RANK (the logical index under
ASCEND_RT_VISIBLE_DEVICES, which common.device selects). RANK_TABLE_FILE reaches the ranks only with
--export_rank_table: torch_npu then builds its HCCL communicator from the file instead of the rendezvous.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import repo_path  # noqa: F401  (puts the monorepo root on sys.path)
from src.rank_table import VISIBLE_DEVICES, RankTable, logical_device, read_rank_table, visible_devices

from common.cli import run_main
from common.errors import ConfigError

HERE = Path(__file__).resolve().parent
ENTRY = "--rank_entry"
DEFAULT_MASTER_PORT = 29688


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every other flag goes to the training script.",
        allow_abbrev=False,
    )
    parser.add_argument("--rank_table_file", "--rank_table", dest="rank_table_file", default=None)
    parser.add_argument("--nproc", "--device_num", dest="nproc", type=int, default=None,
                        help="ranks on this machine without a rank table")  # fmt: skip
    parser.add_argument("--log_dir", default="logs", help="logs/device<X>/log.log per rank")
    parser.add_argument(
        "--server_id", default=os.environ.get("SERVER_ID"), help="this server's id in the table"
    )
    parser.add_argument(
        "--master_port", type=int, default=int(os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT))
    )
    parser.add_argument("--script", default="train.py", help="training script started on every rank")
    parser.add_argument("--export_rank_table", action="store_true",
                        help="pass RANK_TABLE_FILE to the ranks (torch_npu then links HCCL from the table)")  # fmt: skip
    return parser


def accelerator_count() -> int:
    from common.device import device_count

    return device_count("npu") or device_count("cuda")


def rank_size_env() -> int | None:
    """RANK_SIZE from the environment (the ModelZoo's number of ranks), or None when unset."""
    text = os.environ.get("RANK_SIZE", "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"RANK_SIZE must be a positive integer, got {text!r}")
    return value


def local_ips() -> set[str]:
    names = {"127.0.0.1", "localhost", socket.gethostname()}
    try:
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return names


def this_server(table: RankTable, server_id: str | None) -> int:
    if len(table.servers) == 1:
        return 0
    if server_id:
        return table.server_index(server_id)
    matches = [i for i, s in enumerate(table.servers) if s.server_id in local_ips()]
    if len(matches) != 1:
        known = ", ".join(s.server_id for s in table.servers)
        raise ConfigError(f"which server of {table.path} is this one? pass --server_id (one of {known})")
    return matches[0]


def device_spec(physical: list[int], logical: list[int]) -> str:
    """The rank entry's device list: "P" per rank, "P:L" where the logical index L differs from P."""
    return ",".join(str(p) if p == q else f"{p}:{q}" for p, q in zip(physical, logical))


def parse_device_spec(text: str) -> list[tuple[int, int]]:
    """(physical, logical) per local rank, from `device_spec`'s text."""
    pairs = []
    for item in text.split(","):
        physical, _, logical = item.partition(":")
        pairs.append((int(physical), int(logical or physical)))
    return pairs


def torchrun_command(args: argparse.Namespace, devices: list[int], nnodes: int, node_rank: int,
                     master_addr: str, train_args: list[str], logical: list[int] | None = None) -> list[str]:  # fmt: skip
    rendezvous = ["--standalone"] if nnodes == 1 else [
        f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
        f"--master_port={args.master_port}",
    ]  # fmt: skip
    entry = [
        str(HERE / "launch_8p.py"),
        ENTRY,
        args.log_dir,
        device_spec(devices, devices if logical is None else logical),
        args.rank_table_file or "",
    ]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={len(devices)}",
            "--max_restarts=0", *entry, "--", args.script, *train_args]  # fmt: skip


def launch(argv: list[str]) -> int:
    args, train_args = build_parser().parse_known_args(argv)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    rank_size = rank_size_env()
    available = accelerator_count()
    visible = visible_devices() if available else None
    if args.rank_table_file:
        table = read_rank_table(args.rank_table_file)
        for what, asked in (("--nproc", args.nproc), ("RANK_SIZE", rank_size)):
            if asked is not None and asked != table.world_size:
                raise ConfigError(
                    f"{what}={asked} asks for {asked} rank(s) but the rank table {table.path} lists "
                    f"{table.world_size} device(s); fix the table or {what} (the table decides when it is given)"
                )
        node = this_server(table, args.server_id)
        devices, nnodes, master, world = table.servers[node].device_ids, len(table.servers), table.master_addr, table.world_size  # fmt: skip
        source = f"rank table {table.path}: {world} rank(s) on {nnodes} server(s)"
        # The table's ids are physical; under ASCEND_RT_VISIBLE_DEVICES the process uses the logical index.
        logical = [logical_device(d, visible, table.path) for d in devices]
        if available and max(logical) >= available:
            raise ConfigError(
                f"the rank table {table.path} puts ranks on devices {devices} of this server, but only "
                f"{available} NPU/GPU(s) (0..{available - 1}) are visible here; fix the table"
            )
    else:
        nproc = args.nproc if args.nproc is not None else rank_size or available or 2
        if nproc < 1:
            raise ConfigError(f"--nproc must be a positive integer, got {nproc}")
        if available and nproc > available:
            raise ConfigError(
                f"{nproc} ranks asked for on a machine with {available} NPU/GPU(s); "
                f"pass --nproc={available} (or RANK_SIZE={available})"
            )
        logical, nnodes, node, master, world = list(range(nproc)), 1, 0, "127.0.0.1", nproc
        devices = [visible[i] for i in logical] if visible else logical
        source = f"no rank table: {nproc} local rank(s)"
    env = dict(os.environ)
    # torch_npu's ProcessGroupHCCL::createHCCLCommEx (torch_npu/csrc/distributed/ProcessGroupHCCL.cpp, via
    # OptionsManager::GetRankTableFilePath) builds the global HCCL communicator from a readable
    # RANK_TABLE_FILE with hcclCommInitClusterInfoConfig(table, rank) instead of the rendezvous: devices and
    # links come from the file, and only an error returned by that call falls back to the rendezvous. So the
    # table reaches the ranks only when asked for, never by inheritance from the caller's shell.
    inherited = env.pop("RANK_TABLE_FILE", None)
    if args.export_rank_table:
        exported = args.rank_table_file or inherited
        if not exported:
            raise ConfigError("--export_rank_table needs --rank_table_file=FILE (or RANK_TABLE_FILE set)")
        env["RANK_TABLE_FILE"] = str(Path(exported).resolve())
        print(
            f"RANK_TABLE_FILE={env['RANK_TABLE_FILE']} is passed to the ranks (--export_rank_table)",
            flush=True,
        )
    elif inherited:
        print(f"RANK_TABLE_FILE={inherited} is not passed to the ranks: they meet through torchrun "
              "(--export_rank_table passes it)", flush=True)  # fmt: skip
    if available == 0:
        print(f"No NPU/GPU found: the {len(devices)} rank(s) run on the CPU (gloo)", flush=True)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(devices))))
    env.setdefault("PYTHONUNBUFFERED", "1")
    print(f"Distributed training, {source}; devices {devices} here", flush=True)
    first_rank = node * len(devices)
    for local, (device, index) in enumerate(zip(devices, logical)):
        shown = (
            f"device {device}" if device == index else f"device {device} (index {index} of {VISIBLE_DEVICES})"
        )
        print(f"start training for rank {first_rank + local}, {shown}: "
              f"{Path(args.log_dir) / f'device{device}' / 'log.log'}", flush=True)  # fmt: skip
    if "--run_distribute" not in " ".join(train_args) and world > 1:
        train_args = ["--run_distribute", *train_args]
    if not Path(args.script).exists():
        args.script = str(HERE / args.script)  # relative to this folder when not found where we run
    command = torchrun_command(args, devices, nnodes, node, master, train_args, logical)
    proc = subprocess.run(command, env=env)
    if proc.returncode == 0:
        print(f"Distributed training finished; logs in {Path(args.log_dir)}/device<X>/log.log", flush=True)
    else:
        print(f"[Error] distributed training failed (exit {proc.returncode}); last lines of each rank's log:",
              file=sys.stderr)  # fmt: skip
        for device in devices:
            log = Path(args.log_dir) / f"device{device}" / "log.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {log}\n" + "\n".join(tail), file=sys.stderr)
    return proc.returncode


def rank_entry(argv: list[str]) -> None:
    """Inside torchrun: this rank's device and ModelZoo variables, its log file, then the training script.

    DEVICES lists each local rank's device as P or P:L (`device_spec`); TABLE names the rank table the
    launcher read (recorded in the log; RANK_TABLE_FILE is the launcher's to pass or not).
    """
    log_dir, devices, table, separator, *command = argv
    if separator != "--" or not command:
        raise SystemExit("usage: launch_8p.py --rank_entry LOG_DIR DEVICES TABLE -- script.py [args]")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device, index = parse_device_spec(devices)[local_rank]
    rank = os.environ.get("RANK", str(local_rank))
    os.environ.update(
        RANK_ID=rank,
        RANK_SIZE=os.environ.get("WORLD_SIZE", "1"),
        DEVICE_ID=str(device),
        ASCEND_DEVICE_ID=str(index),
        LOCAL_RANK=str(index),  # the device index common.device selects; the table's ids need not start at 0
    )
    folder = Path(log_dir) / f"device{device}"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "log.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    origin = f"rank table {table}" if table else "no rank table"
    print(
        f"rank {rank} of {os.environ['RANK_SIZE']} on device {device} (index {index}), {origin}", flush=True
    )
    os.execv(sys.executable, [sys.executable, *command])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [ENTRY]:
        rank_entry(argv[1:])
    return launch(argv)


if __name__ == "__main__":
    run_main(main)

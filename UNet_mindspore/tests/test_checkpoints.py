"""src/checkpoints.py: without --ckpt_dir every rank uses rank 0's checkpoint folder, so an N-device
`--resume=True` finds on every rank the checkpoint that rank 0 wrote."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from src.checkpoints import default_ckpt_dir

from common.device import DeviceInfo
from common.distributed import DistContext
from common.testing import child_env

FOLDER = Path(__file__).resolve().parents[1]

# One rank of a gloo group whose device index is the physical id it was given (NPU 5 for rank 0, NPU 2 for
# rank 1, as a rank table may assign them); prints the folder it would save to and resume from.
RANK = """
import sys
from types import SimpleNamespace
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from src.checkpoints import default_ckpt_dir
from common.device import DeviceInfo
from common.distributed import init_distributed
device = DeviceInfo(kind="cpu", index=int(sys.argv[3]), name="test", backend="gloo")
dist = init_distributed(device, timeout_s=60)
print(default_ckpt_dir(SimpleNamespace(device=device, dist=dist)))
dist.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_every_rank_resumes_from_rank_0s_folder(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    port, devices = str(_free_port()), {0: 5, 1: 2}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(FOLDER), str(FOLDER.parent), str(device)],
            env=child_env(
                RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, device in devices.items()
    ]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), outputs
    assert [out.strip().splitlines()[-1] for out, _ in outputs] == [f"ckpt_{devices[0]}"] * 2


def test_one_process_keeps_mindspores_name():
    device = DeviceInfo(kind="cpu", index=3, name="test", backend="gloo")
    assert default_ckpt_dir(SimpleNamespace(device=device, dist=DistContext())) == "ckpt_3"

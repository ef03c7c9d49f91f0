"""The launch path of common/scripts/modelzoo.sh and common/launch_rank.py on NPU nodes and several nodes.

Small fakes stand in for what cannot run here: a `PYTHON` whose `-m common.device_count` reports the
devices an env_npu.sh stand-in made visible, a torchrun that starts one node's ranks (or records its
command), a `dmesg`, and a training script that records its flags, writes rank 0's summary or kills
itself with SIGKILL. Each case is a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.testing import REPO_ROOT, child_env

FAKE_TORCHRUN = r"""
import json, os, subprocess, sys
args, options = sys.argv[1:], {}
while args[0] != "-m":
    key, _, value = args.pop(0).lstrip("-").partition("=")
    options[key] = value
if os.environ.get("FAKE_TORCHRUN_RECORD"):
    with open(os.environ["FAKE_TORCHRUN_RECORD"], "w") as handle:
        env = {k: v for k, v in os.environ.items() if k.startswith("MODELZOO_")}
        json.dump({"options": options, "command": args, "env": env}, handle)
    sys.exit(0)
nproc, nnodes, node = int(options["nproc_per_node"]), int(options.get("nnodes", 1)), int(options.get("node_rank", 0))
ranks = []
for local in range(nproc):
    env = dict(os.environ, RANK=str(node * nproc + local), LOCAL_RANK=str(local), GROUP_RANK=str(node),
               WORLD_SIZE=str(nnodes * nproc), LOCAL_WORLD_SIZE=str(nproc))
    ranks.append(subprocess.Popen([sys.executable, *args], env=env))
sys.exit(0 if all(rank.wait() == 0 for rank in ranks) else 1)
"""

FAKE_TRAIN = r"""
import json, os, signal, sys, time
rank = int(os.environ.get("RANK", "0"))
if os.environ.get("FAKE_TRAIN_RECORD"):
    os.makedirs(os.environ["FAKE_TRAIN_RECORD"], exist_ok=True)
    with open(os.path.join(os.environ["FAKE_TRAIN_RECORD"], f"{rank}.json"), "w") as handle:
        json.dump({"argv": sys.argv[1:], "local_rank": os.environ.get("LOCAL_RANK")}, handle)
print(f"fake training, rank {rank}", flush=True)
if os.environ.get("FAKE_KILL_RANK") == str(rank):
    ballast = bytearray(int(os.environ.get("FAKE_BALLAST_MB", "64")) << 20)
    for page in range(0, len(ballast), 4096):  # touched, so resident
        ballast[page] = 1
    with open(os.environ["FAKE_PID_FILE"], "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(float(os.environ.get("FAKE_KILL_AFTER", "0")))
    os.kill(os.getpid(), signal.SIGKILL)
if os.environ.get("FAKE_KILL_RANK") is not None:
    time.sleep(60)  # the other ranks wait to be stopped by torchrun
if rank == 0:
    out, case = os.environ["MODELZOO_OUTPUT_DIR"], os.environ["MODELZOO_CASE_NAME"]
    with open(os.path.join(out, case + ".log"), "w") as handle:
        handle.write(f"CaseName = {case}\n")
    with open(os.path.join(out, "final_result.txt"), "w") as handle:
        handle.write("fake final result\n")
"""

CASE = """#!/usr/bin/env bash
Network="Fake"
export RANK_SIZE=${{RANK_SIZE:-1}}
batch_size=${{FAKE_BATCH:-8}}
epochs=1
mode=acc
demo_dataset=dsb2018
train_command() {{ CMD=("$FAKE_TRAIN" --batch_size="$per_rank_batch"); }}
source "{repo}/common/scripts/modelzoo.sh"
modelzoo_main "$@"
"""

# A kernel OOM report as mm/oom_kill.c prints it, for the process whose pid the fake training wrote.
FAKE_DMESG = """#!/usr/bin/env bash
[ -f "$FAKE_PID_FILE" ] || exit 1
echo "[ 4242.4242] Out of memory: Killed process $(cat "$FAKE_PID_FILE") (python) total-vm:9000000kB, \
anon-rss:{anon}kB, file-rss:{file}kB, shmem-rss:{shmem}kB, UID:0 pgtables:8000kB oom_score_adj:0"
"""
OOM_RSS_KB = {"anon": 3145728, "file": 1024, "shmem": 512}
UNREADABLE_DMESG = """#!/usr/bin/env bash
echo "dmesg: read kernel buffer failed: Operation not permitted" >&2
exit 1
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fakes(tmp_path) -> dict[str, Path]:
    """The fake interpreter, torchrun, training script and case folder (test/train.sh, no env_npu.sh)."""
    tools = tmp_path / "tools"
    tools.mkdir()
    torchrun = tools / "fake_torchrun.py"
    torchrun.write_text(FAKE_TORCHRUN)
    python = _executable(
        tools / "python",
        "#!/usr/bin/env bash\n"
        'if [ "$1 $2" = "-m common.device_count" ]; then echo "${FAKE_DEVICES:-0}"; exit 0; fi\n'
        'if [ "$1 $2" = "-m torch.distributed.run" ] && [ "${FAKE_TORCHRUN:-}" != real ]; then\n'
        f'    shift 2; exec "{sys.executable}" "{torchrun}" "$@"\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n',
    )
    train = tools / "fake_train.py"
    train.write_text(FAKE_TRAIN)
    bin_dir = tools / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "dmesg", UNREADABLE_DMESG)
    case = tmp_path / "case"
    (case / "test").mkdir(parents=True)
    _executable(case / "test" / "train.sh", CASE.format(repo=REPO_ROOT))
    data = tmp_path / "data"
    data.mkdir()
    return {"python": python, "train": train, "bin": bin_dir, "case": case, "data": data,
            "output": case / "test" / "output", "record": tmp_path / "record", "pid": tmp_path / "killed.pid"}  # fmt: skip


def run_case(fakes: dict[str, Path], *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = child_env(
        PYTHON=str(fakes["python"]),
        FAKE_TRAIN=str(fakes["train"]),
        FAKE_TRAIN_RECORD=str(fakes["record"]),
        FAKE_PID_FILE=str(fakes["pid"]),
        PATH=f"{fakes['bin']}{os.pathsep}{os.environ['PATH']}",
        **env,
    )
    for key in ("NNODES", "NODE_RANK", "etp_running_flag", "FAKE_DEVICES"):
        if key not in env:
            full_env.pop(key, None)
    return subprocess.run(
        ["bash", str(fakes["case"] / "test" / "train.sh"), f"--data_path={fakes['data']}", *args],
        env=full_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def recorded_argv(fakes: dict[str, Path], rank: int = 0) -> list[str]:
    return json.loads((fakes["record"] / f"{rank}.json").read_text())["argv"]


# ---- CANN's environment before the device count -----------------------------------------------------


def test_env_npu_is_sourced_before_the_devices_are_counted(fakes):
    # The stand-in for CANN's set_env.sh: only after it does the (fake) torch_npu see the NPUs.
    (fakes["case"] / "test" / "env_npu.sh").write_text("export FAKE_DEVICES=2\n")
    proc = run_case(fakes, RANK_SIZE="2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No NPU/GPU found" not in proc.stdout
    argv = recorded_argv(fakes)
    assert "--amp" in argv and "--opt-level=O2" in argv, argv


def test_etp_running_flag_still_skips_env_npu(fakes):
    (fakes["case"] / "test" / "env_npu.sh").write_text("export FAKE_DEVICES=2\n")
    proc = run_case(fakes, RANK_SIZE="2", etp_running_flag="true")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No NPU/GPU found: running 2 ranks on the CPU" in proc.stdout
    argv = recorded_argv(fakes)
    assert "--amp=auto" in argv and "--opt-level=O0" not in argv, argv


# ---- several nodes: logs by global rank ---------------------------------------------------------------


def _other_nodes_files(output: Path) -> dict[Path, str]:
    files = {
        output / "0" / "train_0.log": "node 0, rank 0\n",
        output / "1" / "train_1.log": "node 0, rank 1\n",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


def test_second_node_logs_its_global_ranks_and_leaves_node_0s_files(fakes):
    output = fakes["output"]
    node0 = _other_nodes_files(output)  # a shared filesystem: node 0's logs are already there
    (output / "2").mkdir(parents=True)
    (output / "2" / "stale.txt").write_text("from an earlier run of this node")
    proc = run_case(fakes, RANK_SIZE="2", NNODES="2", NODE_RANK="1", MASTER_ADDR="127.0.0.1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(path.read_text() == text for path, text in node0.items())
    assert not (output / "2" / "stale.txt").exists()
    for rank in (2, 3):
        assert (output / str(rank) / f"train_{rank}.log").read_text() == f"fake training, rank {rank}\n"
    summary = output / "0" / "Fake_bs8_4p_acc.log"
    assert f"node 1 finished; the summary is written on node 0 ({summary})" in proc.stdout
    assert not summary.exists() and "[Error]" not in proc.stderr


def test_first_node_prints_the_summary_and_keeps_node_1s_files(fakes):
    output = fakes["output"]
    (output / "2").mkdir(parents=True)
    (output / "2" / "train_2.log").write_text("node 1, rank 2\n")
    proc = run_case(fakes, RANK_SIZE="2", NNODES="2", NODE_RANK="0", MASTER_ADDR="127.0.0.1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fake final result" in proc.stdout
    assert f"Summary: {output / '0' / 'Fake_bs8_4p_acc.log'}" in proc.stdout
    assert (output / "2" / "train_2.log").read_text() == "node 1, rank 2\n"
    assert (output / "1" / "train_1.log").read_text() == "fake training, rank 1\n"


def test_bad_node_rank_is_refused(fakes):
    proc = run_case(fakes, RANK_SIZE="2", NNODES="2", NODE_RANK="2", MASTER_ADDR="127.0.0.1")
    assert proc.returncode != 0 and "NODE_RANK must be 0..1 with NNODES=2, got '2'" in proc.stderr


def test_rank_log_is_named_by_the_global_rank(tmp_path):
    env = child_env(RANK="5", LOCAL_RANK="1")
    proc = subprocess.run([sys.executable, "-m", "common.launch_rank", str(tmp_path), "--", "-c", "print('hi')"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "5" / "train_5.log").read_text() == "hi\n"
    assert not (tmp_path / "1").exists()
    env["RANK"] = "five"
    proc = subprocess.run([sys.executable, "-m", "common.launch_rank", str(tmp_path), "--", "-c", "pass"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "[Error] RANK must be a non-negative integer, got 'five'" in proc.stderr


# ---- one batch rule: --batch_size is global over every rank of every node ---------------------------

# What each entry point's batch flag means (its argparse help and the code that splits it): "global" is
# divided by the world size in Python (common.loader.per_rank_batch), "per process" is used as is.
BATCH_FLAGS = {
    "AttU_Net": ("batch_size", "global"),
    "R2U_Net": ("batch_size", "global"),
    "UNet_nested": ("batch_size", "global"),
    "UNet_mindspore": ("batchsize", "per process"),
    "VNet": ("batchSz", "per process"),
}

# Parses each recorded command with its folder's real parser (one interpreter; folder modules dropped
# between folders, whose train.py names clash) and prints {script: batch value} as JSON.
PARSE_BATCH = r"""
import importlib, json, os, sys
jobs, found = json.loads(sys.argv[1]), {}
for job in jobs:
    folder = job["folder"]
    sys.path.insert(0, folder)
    os.chdir(folder)
    if job["argv"][0] == "main.py":
        from common.isic.solver import build_parser
        parser = build_parser()
    else:
        parser = importlib.import_module("train").build_parser()
    args, _ = parser.parse_known_args(job["argv"][1:])
    found[job["script"]] = getattr(args, job["dest"])
    sys.path.remove(folder)
    for name, module in list(sys.modules.items()):
        if (getattr(module, "__file__", None) or "").startswith(folder + os.sep):
            del sys.modules[name]
print(json.dumps(found))
"""


def test_every_multi_rank_script_gives_each_rank_its_share_of_the_global_batch(fakes, tmp_path):
    """RANK_SIZE=8 on 2 nodes: each Python computes global batch / 16 per rank, and the CaseName says bs<global>."""
    world, copies, jobs, cases = 16, tmp_path / "repo", [], {}
    (copies).mkdir()
    (copies / "common").symlink_to(REPO_ROOT / "common")  # the wrappers source ../../common/...
    for folder in BATCH_FLAGS:
        shutil.copytree(
            REPO_ROOT / folder / "test", copies / folder / "test", ignore=shutil.ignore_patterns("output")
        )
        for script in sorted((copies / folder / "test").glob("train_*8p.sh")):
            record = tmp_path / f"{folder}_{script.stem}.json"
            env = child_env(PYTHON=str(fakes["python"]), FAKE_DEVICES="8", FAKE_TORCHRUN_RECORD=str(record),
                            RANK_SIZE="8", NNODES="2", NODE_RANK="1", MASTER_ADDR="127.0.0.1")  # fmt: skip
            proc = subprocess.run(["bash", str(script), f"--data_path={fakes['data']}"], env=env,
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
            assert proc.returncode == 0, (script, proc.stdout + proc.stderr)
            launched = json.loads(record.read_text())
            assert launched["options"]["nproc_per_node"] == "8" and launched["options"]["nnodes"] == "2"
            argv = launched["command"][launched["command"].index("--") + 1 :]
            declared = int(re.search(r"^batch_size=(\d+)$", script.read_text(), re.M).group(1))
            cases[f"{folder}/{script.name}"] = (declared, launched["env"])
            jobs.append({"folder": str(REPO_ROOT / folder), "script": f"{folder}/{script.name}", "argv": argv,
                         "dest": BATCH_FLAGS[folder][0]})  # fmt: skip
    assert {job["script"].split("/")[0] for job in jobs} == set(BATCH_FLAGS)
    proc = subprocess.run([sys.executable, "-c", PARSE_BATCH, json.dumps(jobs)], env=child_env(PYTHONPATH=str(REPO_ROOT)),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    from common.loader import per_rank_batch

    for script, (declared, env) in cases.items():
        value = int(parsed[script])
        meaning = BATCH_FLAGS[script.split("/")[0]][1]
        per_rank = per_rank_batch(value, world) if meaning == "global" else value
        assert per_rank * world == declared, (script, value, meaning)
        assert int(env["MODELZOO_BATCH_SIZE"]) == declared and env["MODELZOO_RANK_SIZE"] == str(world)
        assert f"_bs{declared}_{world}p" in env["MODELZOO_CASE_NAME"], env["MODELZOO_CASE_NAME"]


def test_a_global_batch_that_the_ranks_cannot_share_is_refused(fakes):
    proc = run_case(
        fakes, "--batch_size=6", RANK_SIZE="2", NNODES="2", NODE_RANK="1", MASTER_ADDR="127.0.0.1"
    )
    assert proc.returncode != 0
    assert "global batch size 6 is not divisible by 4 ranks" in proc.stderr and "NNODES=2" in proc.stderr


# ---- a rank killed by the kernel ----------------------------------------------------------------------


def _killed_pid(fakes) -> str:
    return fakes["pid"].read_text().strip()


def test_sigkilled_training_is_reported_with_the_kernels_oom_figure(fakes):
    _executable(fakes["bin"] / "dmesg", FAKE_DMESG.format(**OOM_RSS_KB))
    proc = run_case(fakes, FAKE_KILL_RANK="0")
    assert proc.returncode == 137
    mb = (sum(OOM_RSS_KB.values()) + 512) // 1024  # rounded to the nearest MB
    assert (f"the training process (pid {_killed_pid(fakes)}) was killed by SIGKILL, probably by the kernel's "
            f"out-of-memory killer; its peak resident memory: {mb} MB (kernel log)") in proc.stderr  # fmt: skip


def test_sigkilled_training_without_kernel_log_reports_the_sampled_peak(fakes):
    proc = run_case(fakes, FAKE_KILL_RANK="0", FAKE_BALLAST_MB="64", FAKE_KILL_AFTER="1.5",
                    MODELZOO_MEMORY_POLL_S="0.2")  # fmt: skip
    assert proc.returncode == 137
    found = re.search(r"\(pid (\d+)\) was killed by SIGKILL.*peak resident memory: at least (\d+) MB \(last sample",
                      proc.stderr)  # fmt: skip
    assert found, proc.stderr
    assert found.group(1) == _killed_pid(fakes) and int(found.group(2)) >= 64


def test_sigkilled_training_with_nothing_known_says_unknown(fakes):
    proc = run_case(fakes, FAKE_KILL_RANK="0", MODELZOO_MEMORY_POLL_S="0")
    assert proc.returncode == 137
    assert "probably by the kernel's out-of-memory killer; its peak resident memory: unknown." in proc.stderr


def test_rank_killed_under_torchrun_is_named_with_its_memory(fakes):
    _executable(fakes["bin"] / "dmesg", FAKE_DMESG.format(**OOM_RSS_KB))
    proc = run_case(fakes, RANK_SIZE="2", FAKE_TORCHRUN="real", FAKE_KILL_RANK="1")
    assert proc.returncode != 0
    mb = (sum(OOM_RSS_KB.values()) + 512) // 1024  # rounded to the nearest MB
    assert (f"[Error] rank 1 (pid {_killed_pid(fakes)}) was killed by SIGKILL, probably by the kernel's "
            f"out-of-memory killer; its peak resident memory: {mb} MB (kernel log)") in proc.stderr  # fmt: skip
    assert "fake training, rank 1" in proc.stderr  # the killed rank's log is the one shown

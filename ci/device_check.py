"""Device check: every folder's ModelZoo scripts, short, on one node's GPU(s) or NPU(s).

    bash ci/device_check.sh                       # on a GPU/NPU machine, from the repository root
    bash ci/device_check.sh --dry-run             # anywhere: plan every case and check it can run

For each folder (R2U_Net, AttU_Net, UNet_nested, UNet_mindspore, VNet), on its demo data:

* bf16 / fp16: `test/train_performance_1p.sh` with `--amp --amp-dtype=... --opt-level=O1`, capped short;
* deterministic: the bf16 case again with `--deterministic`;
* kill_resume: `test/train_full_1p.sh` for a few epochs, SIGKILLed once its first checkpoint exists, then
  the same command with `--resume=<that checkpoint>`, which must report the resume and end at the last
  epoch;
* 8p: `RANK_SIZE=2 test/train_performance_8p.sh` (bf16), where two or more devices are visible;

then `python -m common.bench --sweep` at a few steps. One JSON report (each case: folder, name, command,
exit code, seconds, FPS and accuracy from the case's `test/output/<id>/summary.json`, the log tail on
failure) and a table. The whole check stays inside `--budget` seconds: each case gets at most
`--case_timeout`, and never more than the budget has left.

The dry run trains nothing: it checks that the scripts exist and parse, asks the shell library which
flags of each case reach Python, parses those with the folder's own entry-point parser, and writes the
report with every case "planned".
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.errors import ConfigError, ModelZooError  # noqa: E402

SHELL_LIBRARY = ROOT / "common" / "scripts" / "modelzoo.sh"
WORK = "{work}"  # in a folder's flags: the case's own scratch folder
BF16 = ("--amp", "--amp-dtype=bf16", "--opt-level=O1")
FP16 = ("--amp", "--amp-dtype=fp16", "--opt-level=O1")
KINDS = ("bf16", "fp16", "deterministic", "kill_resume", "8p", "bench_sweep")
BENCH_FLAGS = ("--sweep", "--steps=5", "--warmup=2", "--amp=O1", "--amp_dtype=bf16")
MIN_CASE_SECONDS = 10.0
POLL_SECONDS = 0.02
RESUMED = re.compile(r"Resumed from (.+?): (\d+) epoch\(s\) done")


@dataclass(frozen=True)
class Folder:
    """How one folder is run short: its entry point's parser and the flags that keep each case small."""

    name: str
    entry: str  # the Python file its test scripts launch
    parser: str  # "module:function" building that entry point's argparse parser, imported from the folder
    perf: tuple[str, ...]  # a short train_performance_*.sh run on the demo data
    checkpoints: tuple[str, ...]  # every checkpoint into the case's scratch folder, not the user's
    latest: str  # file name of the checkpoint written after every epoch
    full: tuple[str, ...]  # a short train_full_1p.sh run of `full_epochs` checkpointed epochs
    full_epochs: int
    eight_p: tuple[str, ...] = ()  # 8p batch that the demo data can fill on 2 ranks


_ISIC = {
    "entry": "main.py",
    "parser": "common.isic.solver:build_parser",
    # Demo: 28 training images, one step per epoch at batch 16; validate only at the end.
    "perf": ("--epochs=12", "--max_iters=12", "--val_step=12", "--warmup_steps=2"),
    "checkpoints": (f"--model_path={WORK}/models", f"--result_path={WORK}/result"),
    "latest": "checkpoint.pth.tar",
    "full": ("--epochs=4", "--batch_size=8"),
    "full_epochs": 4,
    "eight_p": ("--batch_size=16",),
}
FOLDERS: dict[str, Folder] = {
    "R2U_Net": Folder("R2U_Net", **_ISIC),
    "AttU_Net": Folder("AttU_Net", **_ISIC),
    "UNet_nested": Folder(
        "UNet_nested",
        "train.py",
        "train:build_parser",
        perf=("--train_steps=12", "--warmup_steps=2"),
        checkpoints=(f"--models_dir={WORK}/models",),
        latest="checkpoint.pth.tar",
        full=("--epochs=4", "--batch_size=8"),
        full_epochs=4,
        eight_p=("--batch_size=16",),
    ),
    "UNet_mindspore": Folder(
        "UNet_mindspore",
        "train.py",
        "train:build_parser",
        perf=("--train_steps=12", "--warmup_steps=2"),
        checkpoints=(f"--ckpt_dir={WORK}/ckpt",),
        latest="checkpoint.pth.tar",
        # 8 passes over the pages in checkpoint epochs of 2 passes: 4 epochs.
        full=("--epochs=8", "--repeat=2"),
        full_epochs=4,
        eight_p=("--batch_size=16",),
    ),
    "VNet": Folder(
        "VNet",
        "train.py",
        "train:build_parser",
        # The demo's few volumes give a handful of steps per epoch: 3 epochs, validated at the end.
        perf=("--epochs=3", "--val_interval=3", "--warmup_steps=2"),
        checkpoints=(f"--save={WORK}/work",),
        latest="vnet_checkpoint.pth.tar",
        full=("--epochs=4",),
        full_epochs=4,
    ),
}


@dataclass
class Case:
    """One planned run and, once run, its outcome."""

    folder: str
    name: str
    argv: list[str]  # relative to `cwd`; flags may hold WORK
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    devices: int = 1  # accelerators it needs
    epochs: int | None = None  # kill_resume: the epoch the resumed run must end at
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.folder}:{self.name}"

    @property
    def script(self) -> Path | None:
        return self.cwd / self.argv[1] if self.argv[0] == "bash" else None

    @property
    def flags(self) -> list[str]:
        return self.argv[2:] if self.argv[0] == "bash" else self.argv[3:]

    def command(self, work: Path | str, extra: Sequence[str] = ()) -> list[str]:
        return [arg.replace(WORK, str(work)) for arg in self.argv] + list(extra)

    def shell_line(self, work: Path | str, extra: Sequence[str] = ()) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        where = "" if self.cwd == ROOT else f"cd {shlex.quote(self.cwd.relative_to(ROOT).as_posix())} && "
        return where + (env + " " if env else "") + shlex.join(self.command(work, extra))


def plan(
    folders: Sequence[str] = tuple(FOLDERS), kinds: Sequence[str] = KINDS, extra: Sequence[str] = ()
) -> list[Case]:
    """Every case of the check, in running order; `extra` flags go to every training case."""
    cases = []
    for name in folders:
        folder, cwd = FOLDERS[name], ROOT / name
        perf = [*folder.perf, *folder.checkpoints]
        runs = {
            "bf16": ("test/train_performance_1p.sh", [*perf, *BF16], 1, {}),
            "fp16": ("test/train_performance_1p.sh", [*perf, *FP16], 1, {}),
            "deterministic": ("test/train_performance_1p.sh", [*perf, *BF16, "--deterministic"], 1, {}),
            # The scripts' own precision (mixed on GPU/NPU): the loss scaler's state is resumed too.
            "kill_resume": ("test/train_full_1p.sh", [*folder.full, *folder.checkpoints], 1, {}),
            "8p": ("test/train_performance_8p.sh", [*perf, *folder.eight_p, *BF16], 2, {"RANK_SIZE": "2"}),
        }
        for kind, (script, flags, devices, env) in runs.items():
            if kind in kinds:
                cases.append(
                    Case(name, kind, ["bash", script, *flags, *extra], cwd,
                         env={"RANK_SIZE": "1", **env}, devices=devices,
                         epochs=folder.full_epochs if kind == "kill_resume" else None)
                )  # fmt: skip
    if "bench_sweep" in kinds:
        bench = ["python", "-m", "common.bench", *BENCH_FLAGS, f"--json={WORK}/bench.jsonl"]
        cases.append(Case("common", "bench_sweep", bench, ROOT))
    return cases


# ------------------------------------------------------------------------------------------- dry run


def python_flags(flags: Sequence[str]) -> list[str]:
    """The flags a test script hands to Python: the shell library's own parser decides, not a copy of it."""
    code = 'source "$0" && modelzoo_parse_args "$@" && printf "%s\\0" "${MODELZOO_PASSTHROUGH[@]}"'
    proc = subprocess.run(
        ["bash", "-c", code, str(SHELL_LIBRARY), *flags], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise ConfigError(
            f"the test scripts refuse these flags: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return [flag for flag in proc.stdout.split("\0") if flag]


@contextlib.contextmanager
def _folder_imports(folder: Path):
    """Import from `folder` as its entry points do, then forget its modules: several folders have a
    train.py and a dataset.py, which would otherwise shadow each other in one process."""
    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in set(sys.modules) - before:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if origin.startswith(str(folder) + os.sep):
                del sys.modules[name]


def load_parser(folder: Folder) -> argparse.ArgumentParser:
    module_name, _, function = folder.parser.partition(":")
    with _folder_imports(ROOT / folder.name):
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - any import failure is this folder's to report
            raise ConfigError(f"{folder.name}/{folder.entry}: cannot import {module_name} ({exc})") from None
        build = getattr(module, function, None)
        if not callable(build):
            raise ConfigError(f"{folder.name}/{folder.entry}: {module_name} has no {function}()")
        return build()


def parser_refusal(parser: argparse.ArgumentParser, flags: Sequence[str]) -> str | None:
    """argparse's own message when `parser` refuses `flags`, else None."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(list(flags))
    except SystemExit as exc:
        if exc.code:
            lines = errors.getvalue().strip().splitlines()
            return lines[-1].partition("error: ")[2] or lines[-1] if lines else f"exit code {exc.code}"
    return None


def help_refusal(main: Callable[[list[str]], Any], flags: Sequence[str]) -> str | None:
    """For an entry point without a parser factory: each flag must be listed by its --help."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        main(["--help"])
    missing = [
        f
        for f in flags
        if not re.search(rf"(?<![\w-]){re.escape(f.split('=')[0])}(?![\w-])", text.getvalue())
    ]
    return f"not in its --help: {' '.join(missing)}" if missing else None


def check_script(script: Path) -> str | None:
    """The script exists, is valid bash, and its flag parsing answers --help without training."""
    if not script.is_file():
        return f"{script.relative_to(ROOT)} does not exist"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    if syntax.returncode != 0:
        return f"{script.relative_to(ROOT)} is not valid bash: {syntax.stderr.strip()}"
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    if usage.returncode != 0 or "usage:" not in usage.stdout:
        return (
            f"bash {script.relative_to(ROOT)} --help failed: {(usage.stderr or usage.stdout).strip()[-300:]}"
        )
    return None


def dry_run(cases: list[Case]) -> list[str]:
    """Check every case as far as can be without training; returns the problems (empty when all is well)."""
    problems: list[str] = []
    parsers: dict[str, argparse.ArgumentParser | str] = {}
    scripts: dict[Path, str | None] = {}
    for case in cases:
        problem = None
        if case.script is not None:
            if case.script not in scripts:
                scripts[case.script] = check_script(case.script)
            problem = scripts[case.script]
        if problem is None:
            problem = _flag_problem(case, parsers)
        case.result = {"status": "planned" if problem is None else "invalid"}
        if problem is not None:
            case.result["error"] = problem
            problems.append(f"{case.id}: {problem}")
    return problems


def _flag_problem(case: Case, parsers: dict[str, argparse.ArgumentParser | str]) -> str | None:
    if case.folder == "common":
        from common import bench

        return help_refusal(bench.main, case.flags)
    folder = FOLDERS[case.folder]
    try:
        flags = python_flags(case.command(f"WORK/{_slug(case)}")[2:])
    except ConfigError as exc:
        return str(exc)
    if case.folder not in parsers:
        try:
            parsers[case.folder] = load_parser(folder)
        except ConfigError as exc:
            parsers[case.folder] = str(exc)
    parser = parsers[case.folder]
    if isinstance(parser, str):
        return parser
    refusal = parser_refusal(parser, flags)
    if refusal:
        return f"{case.folder}/{folder.entry} ({folder.parser}) refuses {' '.join(flags)}: {refusal}"
    return None


# ------------------------------------------------------------------------------------------- running

_LAUNCHER_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def child_env(case: Case) -> dict[str, str]:
    """This environment for a case, less what would redirect it: a launcher's rank variables (they pick the
    device) and a parent run's MODELZOO_* targets (they pick the output folder)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("MODELZOO_")}
    env.update(case.env)
    env["PYTHON"] = sys.executable
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    return env


def _executable(argv: list[str]) -> list[str]:
    return [sys.executable, *argv[1:]] if argv[0] == "python" else argv


def start(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    # A session of its own: the script, its Python, torchrun's ranks and loader workers share one process
    # group, which a timeout or the kill of kill_resume ends together.
    with open(log, "w") as out:
        return subprocess.Popen(_executable(argv), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait()


def stop(proc: subprocess.Popen) -> None:
    """TERM first (the scripts pass it on to their ranks), KILL what is left after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    kill_group(proc)


def wait(proc: subprocess.Popen, seconds: float) -> int | None:
    """The exit code, or None after stopping a process that outlived `seconds`."""
    try:
        return proc.wait(timeout=max(seconds, 0.1))
    except subprocess.TimeoutExpired:
        stop(proc)
        return None


def output_dir(case: Case) -> Path:
    """Where the case's script writes test/output/<id>/: device 0 for several ranks, as the scripts do."""
    rank_size = int(case.env.get("RANK_SIZE", "1"))
    device = "0" if rank_size > 1 else os.environ.get("ASCEND_DEVICE_ID", "0")
    return case.cwd / "test" / "output" / device


def fresh_json(path: Path, since: float) -> dict | None:
    """The file's content if this case wrote it; an older one is a previous run's."""
    try:
        if path.stat().st_mtime < since - 1:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def log_tail(case: Case, *logs: Path) -> str:
    parts = [f"--- {log.name}\n{text}" for log in logs if (text := tail(log))]
    train_log = output_dir(case) / f"train_{output_dir(case).name}.log"
    if text := tail(train_log):
        parts.append(f"--- {train_log.relative_to(ROOT)}\n{text}")
    return "\n".join(parts)


def _from_summary(case: Case, since: float) -> dict[str, Any]:
    path = output_dir(case) / "summary.json"
    summary = fresh_json(path, since)
    if summary is None:
        return {"error": f"no summary.json written in {path.parent.relative_to(ROOT)}"}
    return {
        "summary": str(path.relative_to(ROOT)),
        "fps": summary.get("actual_fps"),
        "accuracy": summary.get("train_accuracy"),
        "epochs_done": summary.get("epochs_done"),
        "precision": summary.get("precision"),
    }


def run_script(case: Case, work: Path, timeout: float) -> dict[str, Any]:
    began = time.time()
    log = work / "output.log"
    code = wait(start(case.command(work), case.cwd, child_env(case), log), timeout)
    result: dict[str, Any] = {"exit_code": code, "seconds": time.time() - began}
    if code is None:
        result.update(status="timeout", error=f"stopped after {timeout:.0f} s", log_tail=log_tail(case, log))
        return result
    result.update(_from_summary(case, began))
    asked = next((dtype for dtype in ("bf16", "fp16") if f"--amp-dtype={dtype}" in case.argv), None)
    if asked and result.get("precision") and asked not in result["precision"]:
        # Not a failure: on an NPU apex.amp, which is fp16 only, takes precedence (common/amp.py).
        result["note"] = f"asked for {asked}; the run reports {result['precision']}"
    if code != 0 or "error" in result:
        result.update(status="failed", log_tail=log_tail(case, log))
        result.setdefault("error", f"exit code {code}")
    else:
        result["status"] = "passed"
    return result


def _first_checkpoint(work: Path, name: str) -> Path | None:
    # Checkpoints are renamed into place whole (common/checkpoint.py), so an existing file is complete.
    return next(iter(sorted(work.rglob(name))), None)


def run_kill_resume(case: Case, work: Path, timeout: float) -> dict[str, Any]:
    """Train, SIGKILL once the first checkpoint exists, resume from it; the resumed run must say where it
    resumed and end at the last epoch."""
    began = time.time()
    deadline = began + timeout
    env, first_log, resume_log = child_env(case), work / "killed.log", work / "resumed.log"
    latest = FOLDERS[case.folder].latest
    proc = start(case.command(work), case.cwd, env, first_log)
    checkpoint = None
    while proc.poll() is None and time.time() < deadline:
        checkpoint = _first_checkpoint(work, latest)
        if checkpoint is not None:
            kill_group(proc)
            break
        time.sleep(POLL_SECONDS)
    result: dict[str, Any] = {"seconds": time.time() - began}
    if checkpoint is None and proc.poll() == 0 and _first_checkpoint(work, latest) is not None:
        return {**result, "status": "failed", "exit_code": 0, "error": "the first run ended before it could be "
                f"killed: raise the epochs of {case.folder}'s kill_resume case"}  # fmt: skip
    if checkpoint is None:
        if proc.poll() is None:
            stop(proc)
            return {**result, "status": "timeout", "exit_code": None, "log_tail": log_tail(case, first_log),
                    "error": f"no {latest} within {timeout:.0f} s"}  # fmt: skip
        return {**result, "status": "failed", "exit_code": proc.returncode, "log_tail": log_tail(case, first_log),
                "error": f"the first run ended (exit code {proc.returncode}) without writing {latest}"}  # fmt: skip
    resume = [f"--resume={checkpoint}"]
    result.update(checkpoint=str(checkpoint), resume_command=case.shell_line(work, resume))
    resumed_at = time.time()
    code = wait(start(case.command(work, resume), case.cwd, env, resume_log), deadline - time.time())
    result.update(exit_code=code, seconds=time.time() - began)
    if code is None:
        return {**result, "status": "timeout", "error": f"the resumed run was stopped at {timeout:.0f} s",
                "log_tail": log_tail(case, resume_log)}  # fmt: skip
    result.update(_from_summary(case, resumed_at))
    problem = result.get("error") or (f"the resumed run's exit code is {code}" if code else None)
    if problem is None:
        problem = _resume_problem(case, result)
    if problem:
        return {
            **result,
            "status": "failed",
            "error": problem,
            "log_tail": log_tail(case, first_log, resume_log),
        }
    return {**result, "status": "passed"}


def _resume_problem(case: Case, result: dict[str, Any]) -> str | None:
    train_log = output_dir(case) / f"train_{output_dir(case).name}.log"
    found = RESUMED.search(tail(train_log, 100_000))
    if found is None:
        return f"the resumed run's {train_log.name} has no 'Resumed from ...' line"
    done = int(found.group(2))
    result["killed_after_epoch"] = done
    if not 0 < done < (case.epochs or 0):
        return f"killed after epoch {done} of {case.epochs}: nothing was left to resume"
    if result.get("epochs_done") != case.epochs:
        return f"the resumed run ended after epoch {result.get('epochs_done')}, not {case.epochs}"
    return None


def run_bench(case: Case, work: Path, timeout: float) -> dict[str, Any]:
    began = time.time()
    log = work / "output.log"
    code = wait(start(case.command(work), case.cwd, child_env(case), log), timeout)
    result: dict[str, Any] = {"exit_code": code, "seconds": time.time() - began}
    rows = []
    with contextlib.suppress(OSError, ValueError):
        rows = [json.loads(line) for line in (work / "bench.jsonl").read_text().splitlines() if line.strip()]
    result["bench"] = [
        {k: row.get(k) for k in ("model", "device", "precision", "batch", "train_images_per_s",
                                 "infer_images_per_s", "peak_device_mem_mb")}
        for row in rows
    ]  # fmt: skip
    unmeasured = [row.get("model") for row in rows if not (row.get("train_images_per_s") or 0) > 0]
    if code is None:
        result.update(status="timeout", error=f"stopped after {timeout:.0f} s")
    elif code != 0 or not rows or unmeasured:
        result.update(status="failed", error=f"exit code {code}; models without a training speed: {unmeasured}"
                      if rows else f"exit code {code}; no results")  # fmt: skip
    else:
        result["status"] = "passed"
    if result["status"] != "passed":
        result["log_tail"] = tail(log)
    return result


def run_case(case: Case, work: Path, timeout: float) -> dict[str, Any]:
    import shutil

    # A checkpoint left by an earlier check in a reused --work_dir would be taken for this run's.
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if case.name == "kill_resume":
        return run_kill_resume(case, work, timeout)
    if case.name == "bench_sweep":
        return run_bench(case, work, timeout)
    return run_script(case, work, timeout)


def count_devices() -> tuple[int, str]:
    """Accelerators visible, counted as the scripts count them, and what they are."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
    }
    count = subprocess.run([sys.executable, "-m", "common.device_count"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = count.stdout.strip().splitlines()
    if count.returncode != 0 or not lines or not lines[-1].isdigit():
        raise ConfigError(
            f"python -m common.device_count failed: {(count.stderr or count.stdout).strip()[-300:]}"
        )
    describe = subprocess.run([sys.executable, "-m", "common.device"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    return int(lines[-1]), describe.stdout.strip().splitlines()[-1] if describe.stdout.strip() else ""


# ------------------------------------------------------------------------------------------- report


def record(case: Case, work: Path | str) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": case.id, "folder": case.folder, "name": case.name,
                             "command": case.shell_line(work), "status": None, "exit_code": None,
                             "seconds": None, "fps": None, "accuracy": None}  # fmt: skip
    if case.name == "kill_resume":
        entry["resume_command"] = case.shell_line(
            work, [f"--resume=<first {FOLDERS[case.folder].latest} in {work}>"]
        )
        entry["epochs"] = case.epochs
    entry.update(case.result)
    return entry


def write_report(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def table(entries: list[dict[str, Any]]) -> str:
    width = max([len("case"), *(len(e["id"]) for e in entries)])
    lines = [f"{'case':<{width}}  {'status':<8}  {'seconds':>8}  {'FPS':>10}"]
    for e in entries:
        seconds = "-" if e.get("seconds") is None else f"{e['seconds']:.1f}"
        fps = e.get("fps")
        fps = f"{fps:.1f}" if isinstance(fps, (int, float)) else "-"
        lines.append(f"{e['id']:<{width}}  {e['status']:<8}  {seconds:>8}  {fps:>10}")
    return "\n".join(lines)


FAILED = ("failed", "timeout", "not_run", "invalid")


# ------------------------------------------------------------------------------------------- main


def _choices(text: str, valid: Sequence[str], flag: str) -> list[str]:
    chosen = [item for item in text.split(",") if item]
    unknown = [item for item in chosen if item not in valid]
    if unknown or not chosen:
        raise ConfigError(
            f"{flag} {text!r}: unknown {', '.join(unknown) or 'empty list'}; valid: {', '.join(valid)}"
        )
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bash ci/device_check.sh",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="plan and check every case, train nothing")  # fmt: skip
    parser.add_argument("--json", default="device_check.json", help="the report")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds for the whole check; cases that no longer fit are not run (and fail)")  # fmt: skip
    parser.add_argument("--case_timeout", type=float, default=150.0, help="seconds at most for one case")
    parser.add_argument("--folders", default=",".join(FOLDERS), help="comma-separated subset")
    parser.add_argument("--cases", default=",".join(KINDS), help="comma-separated subset of the case names")
    parser.add_argument(
        "--extra_args", default="",
        help="more flags for every training case (the script's or the entry point's), as one string: "
        "--extra_args='--workers=2 --log_interval=5'",
    )  # fmt: skip
    parser.add_argument("--work_dir", default=None,
                        help="scratch folder for checkpoints and logs; without it a new temporary one, removed at the end")  # fmt: skip
    parser.add_argument("--keep_work", action="store_true", help="keep the scratch folder")
    parser.add_argument("--allow_cpu", action="store_true",
                        help="run even without NPU/GPU (slow: only to try the check itself)")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.budget <= 0 or args.case_timeout <= 0:
        raise ConfigError("--budget and --case_timeout must be positive numbers of seconds")
    folders = _choices(args.folders, tuple(FOLDERS), "--folders")
    kinds = _choices(args.cases, KINDS, "--cases")
    try:
        extra = shlex.split(args.extra_args)
    except ValueError as exc:
        raise ConfigError(f"--extra_args {args.extra_args!r}: {exc}") from None
    cases = plan(folders, kinds, extra)
    report_path = Path(args.json)
    began = time.time()
    payload: dict[str, Any] = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "budget_s": args.budget, "case_timeout_s": args.case_timeout,
                               "extra_args": extra}  # fmt: skip
    if args.dry_run:
        problems = dry_run(cases)
        payload.update(seconds=time.time() - began, cases=[record(c, "WORK/" + _slug(c)) for c in cases])
        write_report(report_path, payload)
        print(f"Device check plan ({len(cases)} cases; 8p cases run where 2+ devices are visible):")
        for case in cases:
            print(f"  {case.id:<28} {case.result['status']:<8} {case.shell_line('WORK/' + _slug(case))}")
        for problem in problems:
            print(f"[Error] {problem}", file=sys.stderr)
        print(f"{len(cases) - len(problems)} of {len(cases)} cases runnable; plan written to {report_path} "
              f"in {time.time() - began:.1f} s")  # fmt: skip
        return 1 if problems else 0
    return _run_all(cases, args, payload, report_path, began)


def _slug(case: Case) -> str:
    return f"{case.folder}-{case.name}"


def _run_all(
    cases: list[Case], args: argparse.Namespace, payload: dict, report_path: Path, began: float
) -> int:
    devices, device = count_devices()
    if devices == 0 and not args.allow_cpu:
        raise ConfigError(
            "no NPU or GPU is visible (python -m common.device_count prints 0): run the check on a machine "
            "with one, or plan it only with --dry-run"
        )
    owned = args.work_dir is None
    work_root = Path(tempfile.mkdtemp(prefix="device_check_") if owned else args.work_dir).resolve()
    payload.update(devices=devices, device=device, work_dir=str(work_root))
    deadline = began + args.budget
    print(f"Device check: {len(cases)} cases on {device or 'no accelerator'} ({devices} visible), "
          f"budget {args.budget:.0f} s, report {report_path}", flush=True)  # fmt: skip
    for index, case in enumerate(cases, 1):
        work, left = work_root / _slug(case), deadline - time.time()
        if case.devices > max(devices, 1):
            case.result = {"status": "skipped", "error": f"needs {case.devices} devices, {devices} visible"}
        elif left < MIN_CASE_SECONDS:
            case.result = {"status": "not_run", "error": f"the budget of {args.budget:.0f} s was spent"}
        else:
            print(f"[{index}/{len(cases)}] {case.id}: {case.shell_line(work)}", flush=True)
            case.result = run_case(case, work, min(args.case_timeout, left))
        entry = record(case, work)
        line = f"[{index}/{len(cases)}] {case.id}: {entry['status']}"
        if entry.get("seconds") is not None:
            line += f" in {entry['seconds']:.1f} s"
        if entry.get("error"):
            line += f" ({entry['error']})"
        print(line, flush=True)
        payload.update(seconds=time.time() - began, cases=[record(c, work_root / _slug(c)) for c in cases])
        write_report(report_path, payload)
    entries = payload["cases"]
    failed = [e["id"] for e in entries if e["status"] in FAILED]
    payload.update(failed=failed, passed=sum(e["status"] == "passed" for e in entries))
    if owned and not args.keep_work:
        import shutil

        shutil.rmtree(work_root, ignore_errors=True)
        payload["work_dir"] = None
    write_report(report_path, payload)
    print(table(entries))
    print(f"{payload['passed']} passed, {len(failed)} failed, {len(entries) - payload['passed'] - len(failed)} "
          f"skipped in {time.time() - began:.0f} s; report: {report_path}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ModelZooError as exc:
        print(f"[Error] {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None

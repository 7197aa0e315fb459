"""A harness that runs ``otbr-onnx`` on hostile inputs as real processes and records what a user
(or an attacker) would see: exit code, stderr line count, traceback or not, raw terminal
control characters or not, partial output or not, input hashes before and after, wall time and
peak RSS (``wait4``'s rusage of that one process).

Two ways to start a run:

* ``Zygote``: one interpreter imports the tool once, then forks a child per case (file
  descriptors 0/1/2 redirected, own process group, as a shell would start it). A case then
  costs its own work, not the 4 s of importing torch, so the whole corpus fits CI's minute.
* ``run_fresh``: a new ``python -m otbr_onnx`` for cases about start-up itself (Ctrl-C while
  the imports run).

``judge`` turns a record into the list of contract violations; the runner test fails on any.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ERROR_PREFIX = "otbr-onnx: error:"
# what a terminal acts on: C0 controls but newline, DEL, the C1 CSI, a bidi override
RAW_CONTROL = tuple(chr(c) for c in range(0x20) if chr(c) != "\n") + ("\x7f", "\x9b", "\u202e")


@dataclass
class Setup:
    """What a case built in its folder: the command line and what must stay as it was."""

    args: list[str]
    guarded: list[Path] = field(default_factory=list)  # inputs whose bytes must not change
    watched: list[Path] = field(default_factory=list)  # folders where nothing new may appear...
    allowed_new: frozenset[str] = frozenset()  # ...but these names (a success case's outputs)


@dataclass(frozen=True)
class HostileCase:
    name: str
    build: Callable[[Path], Setup]
    exit_codes: tuple[int, ...]
    message: str | None = None  # a fragment stderr (or stdout) must contain
    stderr_lines: int | None = 1  # exact count; None: not checked
    sigint_after: float | None = None  # Ctrl-C to the process group after this many seconds
    fresh: bool = False  # a new interpreter (start-up is what is tested)
    timeout_s: float = 60.0
    max_rss_mb: float = 1500.0


@dataclass
class Record:
    case: str
    args: list[str]
    exit_code: int | None
    timed_out: bool
    wall_s: float
    peak_rss_mb: float
    stderr_lines: int
    traceback: bool
    raw_control: bool
    partial_output: list[str]
    input_hashes: dict[str, tuple[str, str]]  # path -> (before, after)
    stdout: str
    stderr: str
    violations: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["stdout"], data["stderr"] = self.stdout[:2000], self.stderr[:2000]
        return data


def sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        return f"unreadable: {error.strerror}"


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def _wait(pid: int, timeout_s: float, sigint_after: float | None) -> tuple[int | None, float, float, bool]:
    """Wait for ``pid`` (leader of its own process group): (exit code, wall s, peak RSS MiB, timed out).

    The exit code is negative for a death by signal, None after a timeout (then the whole group
    is killed). ``wait4`` gives the rusage of this child alone, not of all children so far.
    """
    start = time.monotonic()
    interrupted = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        elapsed = time.monotonic() - start
        if done:
            return os.waitstatus_to_exitcode(status), elapsed, usage.ru_maxrss / 1024, False
        if sigint_after is not None and not interrupted and elapsed >= sigint_after:
            _signal_group(pid, signal.SIGINT)  # what a terminal's Ctrl-C does
            interrupted = True
        if elapsed > timeout_s:
            _signal_group(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            return None, elapsed, usage.ru_maxrss / 1024, True
        time.sleep(0.01)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def _sigint_default() -> None:
    """In the child: Ctrl-C as a terminal's foreground command gets it (a shell's background job,
    CI's runner, may start us with SIGINT ignored, which the child would inherit)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


REPO = Path(__file__).resolve().parents[1]


def _child_env() -> dict[str, str]:
    """The environment of a run: this checkout's code first on the path, whatever is installed
    (an editable install of another worktree would otherwise be what runs)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_fresh(args: list[str], cwd: Path, out: Path, err: Path, timeout_s: float,
              sigint_after: float | None) -> tuple[int | None, float, float, bool]:
    """``python -m otbr_onnx ARGS`` in a new session (its own process group)."""
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "otbr_onnx", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                                   stdout=stdout, stderr=stderr, start_new_session=True, preexec_fn=_sigint_default,
                                   env=_child_env())
    result = _wait(process.pid, timeout_s, sigint_after)
    process.returncode = result[0]  # reaped by wait4: keep Popen from waiting again
    return result


class Zygote:
    """An interpreter that has imported the tool, forking one child per command (see above)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=_child_env())
        ready = self.process.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the zygote did not start: {ready!r}")

    def run(self, args: list[str], cwd: Path, out: Path, err: Path, timeout_s: float,
            sigint_after: float | None) -> tuple[int | None, float, float, bool]:
        request = {"args": args, "cwd": str(cwd), "out": str(out), "err": str(err), "timeout_s": timeout_s,
                   "sigint_after": sigint_after}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline())
        return reply["exit_code"], reply["wall_s"], reply["peak_rss_mb"], reply["timed_out"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _serve() -> None:
    """The zygote's loop: one JSON request per line on stdin, one JSON reply per line on stdout."""
    from otbr_onnx.errors import register_exit_hook

    register_exit_hook()  # before multiprocessing is imported, as in a real process (see run())
    import otbr_onnx.batch  # noqa: F401 - every command's imports, done once before any fork
    import otbr_onnx.data  # noqa: F401
    import PIL.Image  # noqa: F401 - --data decodes with it
    import otbr_onnx.describe  # noqa: F401
    import otbr_onnx.evaluate  # noqa: F401
    import otbr_onnx.pipeline  # noqa: F401
    import otbr_onnx.report  # noqa: F401
    import otbr_onnx.verify  # noqa: F401
    from otbr_onnx.__main__ import run

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()  # an unflushed buffer would be written again by the child
        pid = os.fork()
        if pid == 0:
            _child(request, run)
        code, wall, rss, timed_out = _wait(pid, request["timeout_s"], request["sigint_after"])
        print(json.dumps({"exit_code": code, "wall_s": wall, "peak_rss_mb": rss, "timed_out": timed_out}), flush=True)


def _child(request: dict, run: Callable[[], None]) -> None:
    """In the forked child: become a process group of its own, as a shell starts a command."""
    code = 1
    try:
        os.setpgid(0, 0)
        os.chdir(request["cwd"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY | os.O_CREAT),
                                (2, request["err"], os.O_WRONLY | os.O_CREAT)):
            target = os.open(path, flags, 0o644)
            os.dup2(target, fd)
            os.close(target)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = ["otbr-onnx", *request["args"]]
        try:
            run()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - anything else is what a user would see as a crash
        import traceback

        traceback.print_exc()
        code = 1
    # Leave as a real process does: exit handlers first (multiprocessing's semaphore cleanup,
    # the tool's own exit-130 hook), then the exit itself. Not a full interpreter shutdown: the
    # zygote's thread bookkeeping, inherited through fork, would make that wait forever.
    import atexit

    try:
        atexit._run_exitfuncs()  # noqa: SLF001 - a test harness may use CPython's own hook
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def execute(case: HostileCase, folder: Path, zygote: Zygote | None) -> Record:
    """Build ``case`` in ``folder``, run it, and judge the outcome."""
    setup = case.build(folder)
    before = {str(p): sha256(p) for p in setup.guarded}
    listed = {str(w): listing(w) for w in setup.watched}
    out, err = folder.parent / f"{folder.name}.stdout", folder.parent / f"{folder.name}.stderr"
    if case.fresh or zygote is None:
        code, wall, rss, timed_out = run_fresh(setup.args, folder, out, err, case.timeout_s, case.sigint_after)
    else:
        code, wall, rss, timed_out = zygote.run(setup.args, folder, out, err, case.timeout_s, case.sigint_after)
    stdout = out.read_bytes().decode("utf-8", "backslashreplace")
    stderr = err.read_bytes().decode("utf-8", "backslashreplace")
    new = sorted(f"{w}/{name}" for w in setup.watched for name in listing(w) - listed[str(w)]
                 if name not in setup.allowed_new or name.endswith(".tmp"))
    record = Record(
        case=case.name, args=setup.args, exit_code=code, timed_out=timed_out, wall_s=round(wall, 3),
        peak_rss_mb=round(rss, 1), stderr_lines=len(stderr.splitlines()),
        traceback="Traceback" in stdout + stderr, raw_control=any(c in stdout + stderr for c in RAW_CONTROL),
        partial_output=new, input_hashes={p: (h, sha256(Path(p))) for p, h in before.items()},
        stdout=stdout, stderr=stderr,
    )
    record.violations = judge(case, record)
    return record


def judge(case: HostileCase, record: Record) -> list[str]:
    """Every way ``record`` breaks the contract (README, "Threat model")."""
    found = []
    if record.timed_out:
        found.append(f"hang: killed after {record.wall_s} s")
    elif record.exit_code not in case.exit_codes:
        found.append(f"exit {record.exit_code}, expected {case.exit_codes}")
    if case.stderr_lines is not None and record.stderr_lines != case.stderr_lines:
        found.append(f"{record.stderr_lines} stderr lines, expected {case.stderr_lines}")
    # a failure's one line is an error line (batch progress lines and verify's verdict are not)
    if case.stderr_lines == 1 and record.exit_code not in (0, 5, None) and not record.stderr.startswith(ERROR_PREFIX):
        found.append(f"stderr does not start with '{ERROR_PREFIX}'")
    if case.message is not None and case.message not in record.stderr + record.stdout:
        found.append(f"the output lacks {case.message!r}")
    if record.traceback:
        found.append("a traceback was printed")
    if record.raw_control:
        found.append("a raw control character reached stdout or stderr")
    if record.partial_output:
        found.append(f"files written: {record.partial_output}")
    changed = [p for p, (a, b) in record.input_hashes.items() if a != b]
    if changed:
        found.append(f"inputs changed: {changed}")
    if record.peak_rss_mb > case.max_rss_mb:
        found.append(f"peak RSS {record.peak_rss_mb} MiB above {case.max_rss_mb}")
    return found


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()

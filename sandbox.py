"""The code interpreter of the `math` env: run model-written Python, isolated and limited.

The paper's math agent calls a Python code interpreter as its tool; here that call is `run_python`.
Model code is hostile: it never runs in the trainer, and the (multi-GB) trainer is never forked. A
small pool of pre-warmed executor servers (executor.py, started once with a scrubbed environment)
forks one child per call; this file is the trainer's side: the pool, deadlines, replacing servers
that die or hang, and the isolation level they report (kernel layers: jail.py; docs/security.md).
"""
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from executor import recv, remove_tree, send

MAX_CODE_CHARS = 100_000          # longer code is "rejected"
GRACE = 2.0                       # s the trainer waits past `timeout` before it declares a server hung
STARTUP_TIMEOUT = 30.0            # s a new server may take to say it is ready
POOL_SIZE = max(2, os.cpu_count() or 1)
STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "crashed", "rejected", "infra_error")

_PYTHON = sys.executable
_EXECUTOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "executor.py")
_WITHOUT = ()          # jail layers to leave out ("uid", "tmpfs", "landlock", "seccomp"): tests only
_STRICT = False        # configure(strict=True): refuse to run unless every layer is in force
_LEVEL = None          # the isolation level the servers reported


@dataclass
class Result:
    """status: ok (exit 0, also sys.exit(0)) | error (uncaught exception, output ends with its traceback;
    or sys.exit(n != 0)) | timeout (wall clock, or the CPU-seconds backstop) | memory (MemoryError under
    the address-space limit) | output_limit (more than executor.OUTPUT_LIMIT bytes: killed, output cut)
    | crashed (killed by a signal, or the code killed its own server) | rejected (never run: not a str,
    NUL bytes, too long) | infra_error (the sandbox failed before the code started: never score it as a
    wrong answer). Whatever happens once the child exists is blamed on the code, so a policy cannot
    turn a wrong answer into an unscored infra_error by killing its server."""
    status: str             # one of STATUSES
    output: str             # stdout+stderr, at most OUTPUT_LIMIT bytes, UTF-8 decoded with "replace"
    returncode: int | None  # exit status, -signal if killed, None if never run
    seconds: float          # wall time of the execution (queueing for a free server excluded)


def isolation_level() -> str:
    """The isolation layers every execution gets, as detected by the executor servers at their start
    (starts one if none ran yet), for the logs: e.g. "rlimits+setsid+tmpdir+subreaper+uid=65534+
    tmpfs=64M+landlock(abi=7)+seccomp"; a layer not in force is named as missing, with the reason."""
    if _LEVEL is None:
        _POOL.release(_POOL.acquire())
    return _LEVEL


def missing_layers(level=None) -> list[str]:
    """The layers of `level` (default: isolation_level()) that are not in force, with the reason."""
    return [layer for layer in (level or isolation_level()).split("+") if "missing" in layer]


def configure(*, strict: bool):
    """strict=True: every later run_python raises RuntimeError instead of running code unless every
    isolation layer is in force; checked now too (RuntimeError), so a trainer started with
    `--sandbox strict` fails at once on a machine that cannot isolate. strict=False: run anyway
    (the default), with the level logged."""
    global _STRICT
    _STRICT = bool(strict)
    if _STRICT:
        _check_strict(isolation_level())


def _check_strict(level):
    if missing_layers(level):
        raise RuntimeError(f"sandbox strict mode: isolation layer(s) not in force on this machine: "
                           f"{'; '.join(missing_layers(level))} (level {level}). Run where they are "
                           f"available (root, x86_64, Linux >= 6.12 with Landlock enabled), or without strict.")


def _server_env():
    """The servers' whole environment: nothing is inherited from the trainer (no tokens, no keys).
    PYTHONHASHSEED=0: str hashes, and so the order of a printed set, are the same in every run."""
    tmp = tempfile.gettempdir()
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                "NUMEXPR_NUM_THREADS")}
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", **threads}


class _ServerFailure(Exception):
    """A server died, hung or garbled the protocol; `started`: after the child was forked."""

    def __init__(self, started, timed_out, cause):
        super().__init__(f"sandbox server {'hung' if timed_out else 'died'} "
                         f"{'during' if started else 'before'} the run ({cause!r})")
        self.started, self.timed_out = started, timed_out


class _Worker:
    """One executor server process and the trainer's ends of its two pipes."""

    def __init__(self):
        without = ["--without", ",".join(_WITHOUT)] if _WITHOUT else []
        self.proc = subprocess.Popen(
            [_PYTHON, "-P", "-s", "-S", "-B", _EXECUTOR, "--serve", *without], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=_server_env(), cwd="/",   # stderr: the trainer's log
            close_fds=True, start_new_session=True, bufsize=0)
        self.rfd, self.wfd = self.proc.stdout.fileno(), self.proc.stdin.fileno()
        self.tmp = None
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        try:
            hello = recv(self.rfd, time.monotonic() + STARTUP_TIMEOUT)
        except (OSError, EOFError, ValueError) as e:
            hello = e
        if not (isinstance(hello, dict) and isinstance(hello.get("ready"), str)):
            self.close()
            raise RuntimeError(f"sandbox server did not start ({_PYTHON} {_EXECUTOR}): {hello!r}")
        global _LEVEL
        if hello["ready"] != _LEVEL:                    # logged once (and whenever it changes)
            print(f"sandbox isolation level: {hello['ready']}", file=sys.stderr, flush=True)
        self.level = _LEVEL = hello["ready"]

    def execute(self, request, deadline):
        """One request -> the server's reply dict. Raises _ServerFailure (and kills the server and
        the child) if the server dies, garbles the protocol or misses the deadline."""
        child = None
        try:
            send(self.wfd, request, deadline)
            child = recv(self.rfd, deadline)
            self.tmp = child["tmp"]
            reply = recv(self.rfd, deadline)
            if reply.get("status") not in STATUSES:
                raise ValueError(f"bad reply {reply!r:.200}")
            return reply
        except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
            self.close()
            if child is not None:
                try:
                    os.killpg(child["pid"], signal.SIGKILL)
                except OSError:
                    pass
            raise _ServerFailure(child is not None, isinstance(e, TimeoutError), e) from e

    def close(self):
        """Kill the server; remove the temp dir of its last run if it died before doing so."""
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()
        if self.tmp:
            remove_tree(self.tmp)


class _Pool:
    """Up to `size` servers, started lazily on demand; a dead one is dropped and replaced later."""

    def __init__(self, size):
        self.size, self.idle, self.count = size, [], 0
        self.cond = threading.Condition()

    def acquire(self):
        with self.cond:
            while True:
                while self.idle:
                    worker = self.idle.pop(0)           # oldest first: it has cleaned up
                    if worker.proc.poll() is None:
                        return worker
                    worker.close()                      # died while idle
                    self.count -= 1
                if self.count < self.size:
                    break
                self.cond.wait()
            self.count += 1
        try:
            return _Worker()                            # started outside the lock
        except BaseException:
            self.release(None)
            raise

    def release(self, worker):
        """Give a worker back; None means it died (frees its slot)."""
        with self.cond:
            if worker is None:
                self.count -= 1
            else:
                self.idle.append(worker)
            self.cond.notify()


def _new_pool():
    global _POOL
    _POOL = _Pool(POOL_SIZE)


def run_python(code, *, timeout=5.0, memory_mb=512, strict=None) -> Result:
    """Run untrusted Python `code` in the sandbox; thread-safe. `timeout` (wall-clock seconds) and
    `memory_mb` (address-space limit) come from config, never from model text. A call returns
    within timeout + GRACE once a server is free (calls beyond the pool size queue for one).
    strict (default: configure()'s setting): raise RuntimeError, naming the missing isolation
    layers, instead of running the code if any layer is not in force."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise ValueError(f"timeout must be in (0, 3600] seconds, got {timeout!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 32:
        raise ValueError(f"memory_mb must be an int >= 32, got {memory_mb!r}")
    if not isinstance(code, str):
        return Result("rejected", f"code must be a str, got {type(code).__name__}", None, 0.0)
    if len(code) > MAX_CODE_CHARS:
        return Result("rejected", f"code is longer than {MAX_CODE_CHARS} characters", None, 0.0)
    if "\x00" in code:
        return Result("rejected", "code contains NUL bytes", None, 0.0)
    request = {"code": code, "timeout": float(timeout), "memory_mb": memory_mb}
    for attempt in (1, 2):             # a server found dead before the code started: retry once
        t0 = time.monotonic()
        try:
            worker = _POOL.acquire()
        except (OSError, RuntimeError) as e:              # no server could be started
            return Result("infra_error", str(e), None, time.monotonic() - t0)
        if (_STRICT if strict is None else strict) and missing_layers(worker.level):
            _POOL.release(worker)
            _check_strict(worker.level)                   # raises
        t0 = time.monotonic()
        try:
            reply = worker.execute(request, t0 + timeout + GRACE)
        except _ServerFailure as e:
            _POOL.release(None)
            if e.started:              # blamed on the code: it may have killed or stopped its server
                return Result("timeout" if e.timed_out else "crashed", str(e), None,
                              time.monotonic() - t0)
            if attempt == 2:
                return Result("infra_error", str(e), None, time.monotonic() - t0)
            continue
        _POOL.release(worker)
        return Result(reply["status"], reply["output"], reply["returncode"], time.monotonic() - t0)


_new_pool()
os.register_at_fork(after_in_child=_new_pool)           # a forked trainer must not share our servers

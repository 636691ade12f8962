"""The code interpreter of the `math` env (DESIGN §6): run model-written Python, isolated and limited.

Model code is hostile. It never runs in the trainer, and the (multi-GB) trainer is never forked: a
small pool of pre-warmed executor servers (this file run as `python -I -S -B sandbox.py --serve`
with a scrubbed environment) forks one child per execution. The child (`_isolate`) gets a new
session, hard rlimits, a fresh private temp dir as cwd, stdin from /dev/null and stdout+stderr into
a pipe the server reads into a bounded buffer, then runs the code as a fresh `__main__`. The server
enforces the wall-clock timeout and after every run SIGKILLs the child's process group and, as a
child subreaper, every descendant that escaped it (setsid, double fork). The trainer side
(`run_python`) speaks length-prefixed JSON to the servers, bounds every wait by a deadline and
replaces servers that die or hang. `-S` skips .pth side effects; site-packages are appended after.

Result.status: ok (exit 0, also sys.exit(0)) | error (uncaught exception, output ends with its
traceback; or sys.exit(n != 0)) | timeout (wall clock, or the CPU-seconds backstop) | memory
(MemoryError under the address-space limit) | output_limit (more than OUTPUT_LIMIT bytes: killed,
output cut) | crashed (killed by a signal, or the code killed its own server) | rejected (never run:
not a str, NUL bytes, too long) | infra_error (the sandbox failed before the code started: never
score it as a wrong answer). Whatever happens after the child exists is blamed on the code, so a
policy cannot turn a wrong answer into an unscored infra_error by killing its server.

Kernel layers (jail.py, applied at the end of `_isolate`): when the trainer is root, a dedicated
uid (nobody) and a private size-capped tmpfs (DISK_LIMIT) as the server's temp root; Landlock
(writes only in the run's temp dir, reads only the interpreter's files, no exec, no TCP, no signals
out); a seccomp filter (no exec, no new processes, no ptrace, no sockets, no SysV IPC, signals and
prlimit only on itself; threads work). Each server detects at its start what this kernel and user
allow (by applying each layer once in a throwaway child) and reports it to the trainer, which logs
it: `isolation_level()` is e.g. "rlimits+setsid+tmpdir+subreaper+uid=65534+tmpfs=64M+
landlock(abi=7)+seccomp"; a layer not in force is named as missing with the reason, e.g.
"landlock(missing: ENOSYS, kernel without Landlock)". Never silently weaker: a detected layer that
fails to apply makes the run an infra_error. Strict mode (`configure(strict=True)` for all calls,
or `run_python(..., strict=True)` for one; what the trainer's `--sandbox strict` is meant to set)
raises RuntimeError naming the missing layers instead of running code, unless all are in force.
Still open where layers are missing: without root, files of the trainer's user can get their
metadata changed (chmod/utime: Landlock does not cover it) and disk use is bounded only per file
(RLIMIT_FSIZE) and by the timeout; without Landlock, a uid that keeps cap_dac_read_search (its
level says so) can read every file.
"""
import ctypes
import gc
import json
import linecache
import math
import os
import resource
import select
import shutil
import signal
import site
import struct
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass

if __name__ != "__main__":   # trainer side only: in the server, threading's at-fork hook alone would
    import subprocess         # cost every forked child ~130 page faults (~0.4 ms here)
    import threading

OUTPUT_LIMIT = 64 * 1024          # bytes of stdout+stderr kept; more -> "output_limit"
MAX_CODE_CHARS = 100_000          # longer code is "rejected"
FILE_LIMIT = 16 * 1024 * 1024     # RLIMIT_FSIZE: largest file the code may write
DISK_LIMIT = 64 * 1024 * 1024     # size of a server's private tmpfs (root only): all files of a run
OPEN_FILES = 64                   # RLIMIT_NOFILE
GRACE = 2.0                       # s the trainer waits past `timeout` before it declares a server hung
STARTUP_TIMEOUT = 30.0            # s a new server may take to say it is ready
POOL_SIZE = max(2, os.cpu_count() or 1)
ISOLATION = "rlimits+setsid+tmpdir+subreaper"   # always; jail.py's layers are appended by the server
STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "crashed", "rejected", "infra_error")
# RLIMIT_NPROC is not set: it counts every process of the user (the trainer's threads included) and
# is ignored for root. Fork bombs are bounded by the timeout and the process-tree kill instead.

_PYTHON = sys.executable
_MEMORY_EXIT = 113     # child exit status for an uncaught MemoryError (reported as returncode 1)
_ACK = b"\x06"         # the child's first output byte, written once isolation is in place
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
_LIBC = ctypes.CDLL(None, use_errno=True)
_WITHOUT = ()          # jail layers to leave out ("uid", "tmpfs", "landlock", "seccomp"): tests only
_STRICT = False        # configure(strict=True): refuse to run unless every layer is in force
_LEVEL = None          # the isolation level the servers reported


@dataclass
class Result:
    status: str             # one of STATUSES
    output: str             # stdout+stderr, at most OUTPUT_LIMIT bytes, UTF-8 decoded with "replace"
    returncode: int | None  # exit status, -signal if killed, None if never run
    seconds: float          # wall time of the execution (queueing for a free server excluded)


def isolation_level() -> str:
    """The isolation layers every execution gets, as detected by the executor servers at their start
    (starts one if none ran yet), for the logs (DESIGN §6: never weaker silently)."""
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


# ------------------------------------------------------------------------ wire protocol (both sides)
def _wait(fd, events, deadline):
    """Block until fd is ready for `events` (select.POLL*), or raise TimeoutError at `deadline`."""
    poller = select.poll()
    poller.register(fd, events)
    if not poller.poll(max(0, math.ceil((deadline - time.monotonic()) * 1000))):
        raise TimeoutError("sandbox server missed its deadline")


def _send(fd, obj, deadline=None):
    """Write one message: 4-byte big-endian length, then JSON (ASCII, so any str survives)."""
    data = json.dumps(obj).encode()
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        if deadline is not None:
            _wait(fd, select.POLLOUT, deadline)
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            pass


def _recv(fd, deadline=None):
    """Read one message written by `_send`; EOFError if the other side is gone."""
    def read_exact(n):
        buf = bytearray()
        while len(buf) < n:
            if deadline is not None:
                _wait(fd, select.POLLIN, deadline)
            try:
                chunk = os.read(fd, n - len(buf))
            except BlockingIOError:
                continue
            if not chunk:
                raise EOFError("sandbox server closed its pipe")
            buf += chunk
        return bytes(buf)
    (n,) = struct.unpack(">I", read_exact(4))
    return json.loads(read_exact(n))


# ------------------------------------------------------------- executor server (its own process)
def _prctl(option, arg):
    if _LIBC.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def _serve():
    """Server main loop: answer each request {code, timeout, memory_mb} with {pid, tmp} as soon as
    the child exists, then {status, output, returncode}. Exits when the trainer closes the pipe."""
    proto_in, proto_out = os.dup(0), os.dup(1)          # fds 0/1 become /dev/null: children never
    devnull = os.open(os.devnull, os.O_RDWR)            # see the protocol pipes, and inherit stdin
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace", line_buffering=True)
    sys.stderr.reconfigure(encoding="utf-8", errors="backslashreplace", line_buffering=True)
    sys.path += [p for p in site.getsitepackages() if p not in sys.path]
    sys.path.insert(0, os.path.dirname(__file__))       # -I left this dir out: import jail.py from it
    import jail
    del sys.path[0]                                     # ... and keep the repo unreadable for the code
    without = sys.argv[3].split(",") if sys.argv[2:3] == ["--without"] else ()
    try:
        cage = jail.Jail(without, DISK_LIMIT)           # detects the layers; private tmpfs when root
    except BaseException as e:                          # the trainer logs it; runs are infra_error
        _send(proto_out, {"error": f"jail setup failed: {e!r}"})
        return
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)                  # orphaned descendants come back to us
    gc.freeze()                                         # children's GC never touches (copies) our objects
    try:
        _send(proto_out, {"ready": f"{ISOLATION}+{cage.level}"})
        while True:
            request = _recv(proto_in)
            tmp = tempfile.mkdtemp(prefix="spear-sandbox-")
            try:
                cage.chown_tmp(tmp)
                _send(proto_out, _execute(request, tmp, proto_out, cage))
            finally:
                _remove_tree(tmp)                       # after the reply: off the caller's clock
    except (EOFError, BrokenPipeError):                 # the trainer is gone
        pass


def _execute(request, tmp, proto_out, cage):
    """Fork one child for one request in the empty dir `tmp`, supervise it, classify the outcome."""
    code, timeout, memory_mb = request["code"], request["timeout"], request["memory_mb"]
    r, w = os.pipe()
    server = os.getpid()
    pid = os.fork()
    if pid == 0:                                        # the child: never returns
        status = 1
        try:
            os.close(r)
            _isolate(w, tmp, timeout, memory_mb, cage, server)
            os.write(1, _ACK)
            status = _run_user_code(code)
        except BaseException as e:                      # only _isolate can get here
            os.write(2, f"sandbox setup failed: {e!r}".encode())
        finally:
            os._exit(status)
    os.close(w)
    _send(proto_out, {"pid": pid, "tmp": tmp})
    status, wait_status, out = _supervise(pid, r, timeout)
    os.close(r)
    if not out.startswith(_ACK):                        # no model code ran: the sandbox broke
        return {"status": "infra_error", "output": out.decode("utf-8", "replace"), "returncode": None}
    out = out[len(_ACK):]
    if len(out) > OUTPUT_LIMIT:
        status, out = status or "output_limit", out[:OUTPUT_LIMIT]
    returncode = os.waitstatus_to_exitcode(wait_status)
    if status is None and returncode < 0:
        status = "timeout" if returncode == -signal.SIGXCPU else "crashed"
    elif status is None and returncode == _MEMORY_EXIT:
        status, returncode = "memory", 1
    elif status is None:
        status = "ok" if returncode == 0 else "error"
    return {"status": status, "output": out.decode("utf-8", "replace"), "returncode": returncode}


def _isolate(out_fd, tmp, timeout, memory_mb, cage, server):
    """The child's isolation layers, applied before any model code runs: session, fds, cwd, rlimits,
    then the kernel layers of `cage` (jail.Jail: uid, Landlock, seccomp; raises if one fails)."""
    os.setsid()                                         # own session and process group
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)           # die with the server
    os.dup2(out_fd, 1)                                  # sys.stdout/err: the server's line-buffered
    os.dup2(out_fd, 2)                                  # UTF-8 streams; stdin stays /dev/null
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])   # every inherited fd
    os.chdir(tmp)
    os.environ.update(HOME=tmp, TMPDIR=tmp)
    tempfile.tempdir = tmp
    cpu = math.ceil(timeout) + 1                        # backstop for the wall clock: SIGXCPU, SIGKILL
    for limit, soft, hard in ((resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
                              (resource.RLIMIT_CPU, cpu, cpu + 1),
                              (resource.RLIMIT_FSIZE, FILE_LIMIT, FILE_LIMIT),
                              (resource.RLIMIT_NOFILE, OPEN_FILES, OPEN_FILES),
                              (resource.RLIMIT_CORE, 0, 0)):
        resource.setrlimit(limit, (soft, hard))
    cage.confine(tmp)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)           # again: a uid change cleared it
    if os.getppid() != server:                          # the server died before that: don't run
        os._exit(1)


def _run_user_code(code):
    """Run `code` as a fresh __main__ module (fresh globals; builtins are the server's pristine ones,
    since every run is a new fork). Returns the exit status python itself would give."""
    linecache.cache["<tool>"] = (len(code), None, code.splitlines(True), "<tool>")  # source in tracebacks
    main = types.ModuleType("__main__")
    sys.modules["__main__"], sys.argv = main, ["<tool>"]
    try:
        exec(compile(code, "<tool>", "exec"), main.__dict__)
        status = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = (e.code or 0) & 0xFF
        else:                                           # sys.exit("message")
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException as e:
        status = _MEMORY_EXIT if isinstance(e, MemoryError) else 1
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != "<tool>":
            tb = tb.tb_next                             # hide the sandbox's own frames
        try:
            traceback.print_exception(type(e), e, tb)
        except BaseException:                           # e.g. no memory left to format it
            os.write(2, f"{type(e).__name__}\n".encode())
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    return status


def _supervise(pid, r, timeout):
    """Read the child's output (bounded) until it exits or the wall clock runs out; then kill its
    whole process tree. Returns (status or None if it exited by itself, wait status, output bytes)."""
    os.set_blocking(r, False)
    pidfd = os.pidfd_open(pid)                          # readable once the child has exited
    poller = select.poll()
    poller.register(r, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    out, status, exited = bytearray(), None, False
    deadline = time.monotonic() + timeout
    try:
        while not exited and status is None:
            left = deadline - time.monotonic()
            if left <= 0:
                status = "timeout"
                break
            for fd, _ in poller.poll(max(1, math.ceil(left * 1000))):
                if fd == pidfd:
                    exited = True
                elif not _drain(r, out):                # EOF: stop watching the pipe
                    poller.unregister(r)
            if len(out) > len(_ACK) + OUTPUT_LIMIT:
                status = "output_limit"
    finally:
        os.close(pidfd)
    if not exited:
        os.kill(pid, signal.SIGKILL)
    _, wait_status = os.waitpid(pid, 0)
    _kill_tree(pid)
    _drain(r, out)                                      # what the tree wrote before it died
    return status, wait_status, bytes(out)


def _drain(fd, out):
    """Append what the non-blocking pipe holds (up to the cap) to `out`; False at EOF."""
    while len(out) <= len(_ACK) + OUTPUT_LIMIT:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        out += chunk
    return True


def _kill_tree(pgid):
    """SIGKILL the run's process group, then every process that escaped it (reparented to this
    server, a child subreaper), until the server has no children left. Runs after every execution."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return                                      # no children at all
        if pid == 0:                                    # live ones: kill all, wait for one to go
            for kid in _children():
                try:
                    os.kill(kid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.waitpid(-1, 0)


def _children():
    """Pids of this (single-threaded) server's children."""
    me = os.getpid()
    try:
        with open(f"/proc/self/task/{me}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:                                     # no CONFIG_PROC_CHILDREN: scan all processes
        kids = []
        for p in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        kids.append(int(p))
            except (OSError, ValueError, IndexError):
                pass
        return kids


def _remove_tree(path):
    """Delete the run's temp dir, even if the code took away its own permissions on it."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700)
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------- trainer side: the pool
def _server_env():
    """The servers' whole environment: nothing is inherited from the trainer (no tokens, no keys)."""
    tmp = tempfile.gettempdir()
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                "NUMEXPR_NUM_THREADS")}
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", **threads}


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
            [_PYTHON, "-I", "-S", "-B", os.path.abspath(__file__), "--serve", *without], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=_server_env(), cwd="/",   # stderr: the trainer's log
            close_fds=True, start_new_session=True, bufsize=0)
        self.rfd, self.wfd = self.proc.stdout.fileno(), self.proc.stdin.fileno()
        self.tmp = None
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        try:
            hello = _recv(self.rfd, time.monotonic() + STARTUP_TIMEOUT)
        except (OSError, EOFError, ValueError) as e:
            hello = e
        if not (isinstance(hello, dict) and isinstance(hello.get("ready"), str)):
            self.close()
            raise RuntimeError(f"sandbox server did not start ({_PYTHON} {__file__}): {hello!r}")
        global _LEVEL
        if hello["ready"] != _LEVEL:                    # logged once (and whenever it changes)
            print(f"sandbox isolation level: {hello['ready']}", file=sys.stderr, flush=True)
        self.level = _LEVEL = hello["ready"]

    def execute(self, request, deadline):
        """One request -> the server's reply dict. Raises _ServerFailure (and kills the server and
        the child) if the server dies, garbles the protocol or misses the deadline."""
        child = None
        try:
            _send(self.wfd, request, deadline)
            child = _recv(self.rfd, deadline)
            self.tmp = child["tmp"]
            reply = _recv(self.rfd, deadline)
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
            _remove_tree(self.tmp)


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


if __name__ != "__main__":
    _new_pool()
    os.register_at_fork(after_in_child=_new_pool)       # a forked trainer must not share our servers
elif sys.argv[1:2] == ["--serve"]:
    _serve()

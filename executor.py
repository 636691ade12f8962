"""The executor server of the code interpreter: the process that forks one child per model-written program.

Run by sandbox.py's pool as `python -P -s -S -B executor.py --serve` with a scrubbed environment (-I
without -E, so that the environment's PYTHONHASHSEED=0 holds; -S skips .pth side effects; site-packages
are appended after). It answers length-prefixed JSON requests {code, timeout, memory_mb} on
stdin/stdout. Per request it forks a child (`_isolate`: new session, hard rlimits, a fresh private temp
dir, stdin from /dev/null, output into a bounded pipe, then jail.py's kernel layers) that runs the code
as a fresh `__main__`; the server enforces the wall clock and afterwards SIGKILLs the child's process
group and, as a child subreaper, every descendant that escaped it. The trainer imports only the wire
protocol (`send`, `recv`) and `remove_tree` from here.
A program's output is the same in every run (a rerun or a resumed training run sees the same tool
outputs): fixed str hashes, `random` seeded with 0 in every child, object addresses renumbered. What
still varies: the wall-clock timeout under load, the clock, process ids, numpy's global random state.
"""
import ctypes
import gc
import json
import linecache
import math
import os
import random
import re
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

OUTPUT_LIMIT = 64 * 1024          # bytes of stdout+stderr kept; more -> "output_limit"
FILE_LIMIT = 16 * 1024 * 1024     # RLIMIT_FSIZE: largest file the code may write
DISK_LIMIT = 64 * 1024 * 1024     # size of a server's private tmpfs (root only): all files of a run
OPEN_FILES = 64                   # RLIMIT_NOFILE
ISOLATION = "rlimits+setsid+tmpdir+subreaper"   # always; jail.py's layers are appended by the server
# RLIMIT_NPROC is not set: it counts every process of the user (the trainer's threads included) and
# is ignored for root. Fork bombs are bounded by the timeout and the process-tree kill instead.

_MEMORY_EXIT = 113     # child exit status for an uncaught MemoryError (reported as returncode 1)
_ACK = b"\x06"         # the child's first output byte, written once isolation is in place
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
_LIBC = ctypes.CDLL(None, use_errno=True)
_ADDRESS = re.compile(r"(?<= at )0x[0-9a-f]+")   # CPython's '%p' in '<... at 0x...>' reprs


# ------------------------------------------------- wire protocol (also used by the pool in sandbox.py)
def _wait(fd, events, deadline):
    """Block until fd is ready for `events` (select.POLL*), or raise TimeoutError at `deadline`."""
    poller = select.poll()
    poller.register(fd, events)
    if not poller.poll(max(0, math.ceil((deadline - time.monotonic()) * 1000))):
        raise TimeoutError("sandbox server missed its deadline")


def send(fd, obj, deadline=None):
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


def recv(fd, deadline=None):
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


# ------------------------------------------------------------------------------- the server
def _prctl(option, arg):
    if _LIBC.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def serve():
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
        send(proto_out, {"error": f"jail setup failed: {e!r}"})
        return
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)                  # orphaned descendants come back to us
    gc.freeze()                                         # children's GC never touches (copies) our objects
    try:
        send(proto_out, {"ready": f"{ISOLATION}+{cage.level}"})
        while True:
            request = recv(proto_in)
            tmp = tempfile.mkdtemp(prefix="spear-sandbox-")
            try:
                cage.chown_tmp(tmp)
                send(proto_out, _execute(request, tmp, proto_out, cage))
            finally:
                remove_tree(tmp)                       # after the reply: off the caller's clock
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
    send(proto_out, {"pid": pid, "tmp": tmp})
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
    return {"status": status, "output": renumber_addresses(out.decode("utf-8", "replace")),
            "returncode": returncode}


def renumber_addresses(text):
    """Object addresses in default reprs ('<function f at 0x7f3a...>') change from process to process
    (ASLR, heap layout): number them 0x1, 0x2, ... in order of first appearance, so that the same object
    keeps the same address within one output."""
    seen = {}
    return _ADDRESS.sub(lambda m: hex(seen.setdefault(m.group(), len(seen) + 1)), text)


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
    random.seed(0)                                      # the module the code imports: a fixed stream
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


def remove_tree(path):
    """Delete the run's temp dir, even if the code took away its own permissions on it."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700)
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve()

"""The `python` tool: runs model-written code in a fresh, limited, network-less interpreter.

WebSailor-V2 gives the agent a Python interpreter (code inside `<code>...</code>`; the agent loop
passes that text as `{"code": ...}`). The code is untrusted and runs next to the trainer, so every
call gets a new process:

    tool = PythonTool(wall_s=10, cpu_s=10, memory_mb=1024, output_chars=8192)
    tool.isolation()        # what this host enforces, probed once (see below)
    ToolRunner([tool, ...], per_tool={"python": ToolLimits(retries=0, timeout_s=15)})

What each call does, in order (the bootstrap is `_bootstrap` below, run with `python -I -B -u -c`):

1. A private temp directory (mode 0700) as cwd, HOME and TMPDIR; deleted afterwards. The child's
   environment is rebuilt from scratch, so the trainer's API keys never reach it. With `uid=`
   (a trainer running as root, e.g. 65534 = nobody) the child drops to that user and group first;
   the interpreter and its packages must then be readable by it (a venv under /root is not).
2. Its own session (`start_new_session`): on the wall limit, on cancellation by the runner, and
   after every normal exit, the whole process group is SIGKILLed.
3. No network. `network="namespace"` (the default): the child moves into new user + network
   namespaces (`unshare(CLONE_NEWUSER | CLONE_NEWNET)`) before any user code runs, then checks
   that only a down loopback interface is left. This is enforced by the kernel: no route exists,
   not even to 127.0.0.1. If the namespace cannot be made (many containers forbid it) the tool
   refuses to run and says why. `network="audit"` is the opt-in weaker mode: sockets are denied
   by the audit hook only.
4. Resource limits (kernel-enforced): RLIMIT_CPU (SIGXCPU at cpu_s, SIGKILL one second later),
   RLIMIT_AS = memory_mb (allocations fail with MemoryError), RLIMIT_FSIZE (files <= 64 MiB),
   no core files, RLIMIT_NPROC = 1 (no new processes or threads: enforced for a non-root user,
   since the new user namespace counts only the sandbox's own tasks; root is exempt).
5. An audit hook (`sys.addaudithook`, installed before user code, cannot be removed) refuses:
   socket creation other than AF_UNIX socketpairs and every socket connect/bind/send/resolve; open
   for writing, create, delete, rename, chmod, ... outside the temp directory; subprocess, fork,
   exec, spawn, system, kill; ctypes loading and calling foreign functions.
6. Output: stdout and stderr interleaved, cut at output_chars with a marker; a traceback names
   the user's lines; a trailing expression's value is printed as in a REPL.

What it does not guarantee: the audit hook is a guard-rail against mistakes, not a security
boundary. C extensions, or a determined program, can bypass it (e.g. `_posixsubprocess`, or a
write through `os.open(name, ..., dir_fd=...)`, whose path the hook cannot resolve; a test shows
it). The kernel-enforced parts are the network namespace, the rlimits, the process-group kill and,
with `uid=`, file permissions: then writes outside the temp directory fail in the kernel too.
Without it, a root trainer's sandbox is stopped from writing by the audit hook alone, and root is
exempt from RLIMIT_NPROC. Reads are not restricted (the code can read any file its user can).
`isolation()` reports which parts are active on this host; the tests check each of them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Literal

import msgspec

from sailor_engine.env.protocol import ToolError

_ISOLATION_FAILED = 71  # bootstrap exit status: the network namespace could not be made
_OUT_OF_MEMORY = 72  # bootstrap exit status: user code ended with MemoryError
_FILE_SIZE_LIMIT = 64 << 20
_READ_CHUNK = 1 << 16


class PythonArgs(msgspec.Struct, forbid_unknown_fields=True):
    code: str  # the content of the agent's <code>...</code> block


def _unshare_network() -> None:
    """Move into new user + network namespaces and check that only loopback is left (in the child)."""
    try:
        flags = 0x10000000 | 0x40000000  # CLONE_NEWUSER | CLONE_NEWNET
        if hasattr(os, "unshare"):  # Python >= 3.12
            os.unshare(flags)
        else:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(flags) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        with open("/proc/self/net/dev") as f:
            ifaces = {line.split(":")[0].strip() for line in f.readlines()[2:]}
        if ifaces - {"lo"}:
            raise OSError(f"interfaces {sorted(ifaces)} still visible in the new namespace")
    except OSError as e:
        sys.stderr.write(f"sandbox: cannot isolate the network: unshare(CLONE_NEWUSER|CLONE_NEWNET): {e}\n")
        os._exit(71)  # = _ISOLATION_FAILED (this runs standalone in the child)


def _audit_hook(root: str):
    """The hook refusing network, processes, ctypes and writes outside root (in the child)."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
                   "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
                   "os.chflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,), "os.mkfifo": (0,),
                   "os.mknod": (0,), "shutil.rmtree": (0,)}  # event -> which arguments are paths
    denied = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
              "os.forkpty", "os.kill", "os.killpg", "os.startfile", "ctypes.dlopen", "ctypes.dlsym",
              "ctypes.call_function", "ctypes.cdata")

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # a descriptor the process already holds (its opening was checked)
        try:
            real = os.path.realpath(os.fsdecode(path))  # symlinks resolved: no escape through a link
        except (TypeError, ValueError):
            return False
        return real == root or real.startswith(root + os.sep) or real == os.devnull

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & write_flags
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing outside the sandbox directory is refused: {path!r}")
        elif event in path_events:
            if any(i < len(args) and not inside(args[i]) for i in path_events[event]):
                raise PermissionError(f"sandbox: {event} outside the sandbox directory is refused")
        elif event == "socket.__new__" and len(args) > 1 and args[1] == 1:  # AF_UNIX: socketpair (asyncio)
            return
        elif event.startswith(denied):
            what = "network access" if event.startswith("socket.") else event
            raise PermissionError(f"sandbox: {what} is refused")

    return hook


def _bootstrap(tmp: str, cpu_s: int, memory_bytes: int, fsize: int, netns: bool, uid: int | None) -> None:
    """Runs in the child before the user's code (stdlib only; its source is passed with -c)."""
    import ast
    import linecache
    import resource
    import traceback

    if uid is not None:  # first: the namespace is then owned by uid, and RLIMIT_NPROC applies to it
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        except OSError as e:
            sys.stderr.write(f"sandbox: cannot switch to uid {uid}: {e}\n")
            os._exit(71)  # = _ISOLATION_FAILED
    if netns:
        _unshare_network()
    for limit, value in ((resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)), (resource.RLIMIT_AS, (memory_bytes,) * 2),
                         (resource.RLIMIT_FSIZE, (fsize,) * 2), (resource.RLIMIT_CORE, (0, 0)),
                         (resource.RLIMIT_NPROC, (1, 1))):
        resource.setrlimit(limit, value)
    code = sys.stdin.read()
    # Imported before the hook: from Python 3.12 importing ctypes dlopens the interpreter itself
    # (ctypes.pythonapi), which the hook refuses, and numpy imports ctypes. Loading a library or
    # calling through ctypes is still refused.
    import ctypes  # noqa: F401
    sys.addaudithook(_audit_hook(os.path.realpath(tmp)))

    sys.argv = ["<code>"]
    linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        tree = ast.parse(code, "<code>")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<code>", "exec"), namespace)
        if last is not None:  # a trailing expression's value is printed, as in a REPL
            value = eval(compile(ast.Expression(last.value), "<code>", "eval"), namespace)
            if value is not None:
                print(repr(value))
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - report it as python would, minus the bootstrap's frames
        namespace.clear()  # frees a memory bomb's data so the traceback can be printed
        report = traceback.TracebackException(type(e), e, e.__traceback__)
        report.stack = traceback.StackSummary.from_list([f for f in report.stack if f.filename != "<string>"])
        sys.stderr.write("".join(report.format()))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(72 if isinstance(e, MemoryError) else 1)  # 72 = _OUT_OF_MEMORY


_BOOTSTRAP_SOURCE = "import os, sys\n\n" + "\n\n".join(
    inspect.getsource(f) for f in (_unshare_network, _audit_hook, _bootstrap))


class PythonTool:
    """The `python` tool (see the module docstring for what is and is not guaranteed)."""

    name = "python"
    description = ("Run Python 3 code in a fresh sandboxed interpreter without network access and return its "
                   "printed output (stdout and stderr); a trailing expression's value is printed too.")
    args_type = PythonArgs
    cacheable = False  # the same code may print something else (time, randomness)

    def __init__(self, *, wall_s: float = 10.0, cpu_s: float = 10.0, memory_mb: int = 1024, output_chars: int = 8192,
                 network: Literal["namespace", "audit"] = "namespace", python: str = sys.executable,
                 tmp_root: str | None = None, uid: int | None = None):
        if network not in ("namespace", "audit"):
            raise ValueError(f"network must be 'namespace' or 'audit', got {network!r}")
        if wall_s <= 0 or cpu_s <= 0 or memory_mb < 16 or output_chars < 1:
            raise ValueError("wall_s, cpu_s must be > 0, memory_mb >= 16, output_chars >= 1")
        self.wall_s, self.cpu_s, self.memory_mb = wall_s, cpu_s, memory_mb
        self.output_chars, self.network, self.python = output_chars, network, python
        self.tmp_root = tmp_root  # where the per-call directories go (None: the system's temp dir)
        if uid is not None and os.geteuid() != 0:
            raise ValueError("uid: only a trainer running as root can run the code as another user")
        self.uid = uid  # run the code as this user (and group): kernel-enforced writes and RLIMIT_NPROC
        self._isolation: dict[str, str] | None = None

    # -- the child process -----------------------------------------------------------------------

    def _mkdtemp(self) -> str:
        tmp = tempfile.mkdtemp(prefix="sailor-python-", dir=self.tmp_root)  # mode 0700
        if self.uid is not None:
            os.chown(tmp, self.uid, self.uid)
        return tmp

    def _argv(self, tmp: str) -> list[str]:
        call = (f"_bootstrap({tmp!r}, {max(1, round(self.cpu_s))}, {self.memory_mb << 20}, {_FILE_SIZE_LIMIT}, "
                f"{self.network == 'namespace'}, {self.uid!r})")
        # -I: no PYTHON* variables, user site or cwd on sys.path; -B: no .pyc writes; -u: unbuffered,
        # so output written before a kill is kept and stdout / stderr interleave as written.
        return [self.python, "-I", "-B", "-u", "-c", f"{_BOOTSTRAP_SOURCE}\n{call}\n"]

    @staticmethod
    def _env(tmp: str) -> dict[str, str]:
        return {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    async def __call__(self, args: PythonArgs) -> str:
        tmp = self._mkdtemp()
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._argv(tmp), cwd=tmp, env=self._env(tmp), start_new_session=True,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            except OSError as e:
                raise ToolError(f"cannot start the interpreter {self.python!r}: {e}") from e
            output = _Output(self.output_chars)
            # Tasks, awaited with asyncio.wait: unlike gather, a timeout does not cancel them.
            reader, exited = asyncio.ensure_future(output.drain(proc.stdout)), asyncio.ensure_future(proc.wait())
            wall_killed = False
            try:
                async with asyncio.timeout(self.wall_s):
                    await _feed(proc.stdin, args.code.encode("utf-8", "surrogatepass"))
                    await asyncio.wait([reader, exited])
            except TimeoutError:
                wall_killed = True
            finally:
                # Also on cancellation by the runner, and after a normal exit (leftover children).
                _kill_group(proc.pid)
                await _reap(reader, exited)
            return self._result(proc.returncode, output.text(), wall_killed)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _result(self, rc: int | None, out: str, wall_killed: bool) -> str:
        before = f" Output before it:\n{out}" if out else ""
        if rc is None:
            raise ToolError(f"the process did not exit after SIGKILL.{before}")
        if wall_killed:
            raise ToolError(f"wall time limit ({self.wall_s:g}s) exceeded; process group killed.{before}")
        if rc == _ISOLATION_FAILED and out.startswith("sandbox: cannot"):
            hint = " (PythonTool(network='audit') accepts the weaker audit-hook isolation)" if "isolate" in out else ""
            raise ToolError(f"refusing to run code: {out.strip()}{hint}")
        if rc in (-signal.SIGXCPU, -signal.SIGKILL):
            raise ToolError(f"CPU time limit ({max(1, round(self.cpu_s))}s) exceeded; process killed.{before}")
        if rc == _OUT_OF_MEMORY:
            return f"{out}[memory limit ({self.memory_mb} MiB) exceeded]"
        if rc < 0:
            return f"{out}[process killed by {signal.Signals(-rc).name}]"
        if rc != 0:
            return f"{out}[exit status {rc}]"
        return out or "[no output]"

    # -- what this host enforces -----------------------------------------------------------------

    def isolation(self) -> dict[str, str]:
        """Which protections are active here, probed once by running a snippet in the sandbox."""
        if self._isolation is None:
            self._isolation = _probe(self)
        return dict(self._isolation)


class _Output:
    """Keeps the first output_chars characters (bytes beyond 4 per char are dropped unread)."""

    def __init__(self, chars: int):
        self.chars, self.kept, self.total = chars, bytearray(), 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(_READ_CHUNK):
            self.total += len(chunk)
            room = 4 * self.chars + 4 - len(self.kept)  # utf-8 is at most 4 bytes a character
            if room > 0:
                self.kept += chunk[:room]

    def text(self) -> str:
        text = self.kept.decode("utf-8", "replace")
        if len(text) <= self.chars and self.total == len(self.kept):
            return text
        dropped = self.total - len(text[: self.chars].encode("utf-8", "replace"))
        return f"{text[: self.chars]}\n[output truncated: {self.chars} characters kept, {dropped} more bytes dropped]\n"


async def _feed(stdin: asyncio.StreamWriter, data: bytes) -> None:
    try:
        stdin.write(data)
        await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child exited (or was killed) before reading all of its code
    finally:
        stdin.close()


async def _reap(reader: asyncio.Future, exited: asyncio.Future) -> None:
    """Wait for the SIGKILLed group to exit and its pipe to reach EOF.

    Its directory must not be deleted under it, and the transport must see both the exit and the
    EOF to close itself: one left to the garbage collector is finalised later, on whatever thread,
    against a loop that may be closed by then.
    """
    await asyncio.wait([reader, exited], timeout=5.0)
    if not reader.done():  # a process in uninterruptible sleep (a hung filesystem): the kernel's now
        reader.cancel()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


_PROBE = """
import json, threading
with open("/proc/self/net/dev") as f:
    ifaces = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
try:
    threading.Thread(target=int).start()
    threads = True
except RuntimeError:
    threads = False
print(json.dumps({"ifaces": ifaces, "threads": threads}))
"""


def _probe(tool: PythonTool) -> dict[str, str]:
    tmp = tool._mkdtemp()
    try:
        proc = subprocess.run(tool._argv(tmp), input=_PROBE.encode(), capture_output=True, cwd=tmp,
                              env=tool._env(tmp), timeout=30, start_new_session=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        return {"network": f"unavailable ({out.splitlines()[-1] if out else proc.returncode}): the tool refuses to run"}
    report = json.loads(out.splitlines()[-1])
    netns = tool.network == "namespace" and report["ifaces"] == ["lo"]
    return {
        "network": "kernel: private network namespace (loopback only) + audit hook" if netns else "audit hook only",
        "processes": "kernel: RLIMIT_NPROC=1 + audit hook" if not report["threads"] else "audit hook only",
        "writes": (f"kernel: runs as uid {tool.uid} + audit hook" if tool.uid is not None
                   else "audit hook only (outside the temp directory)"),
        "cpu": f"kernel: RLIMIT_CPU={max(1, round(tool.cpu_s))}s",
        "memory": f"kernel: RLIMIT_AS={tool.memory_mb} MiB",
        "wall": f"process-group SIGKILL after {tool.wall_s:g}s",
    }

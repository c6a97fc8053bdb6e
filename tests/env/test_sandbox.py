"""The python tool's sandbox: network denied, limits enforced, writes confined, output bounded."""

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sailor_engine.env.protocol import ToolError
from sailor_engine.env.runner import ToolLimits, ToolRunner
from sailor_engine.env.sandbox import PythonArgs, PythonTool


def run(tool, code):
    return asyncio.run(tool(PythonArgs(code)))


def kernel_allows_netns() -> bool:
    """Asked independently of the sandbox: can an unprivileged child make user + network namespaces?"""
    code = ("import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
            "sys.exit(0 if libc.unshare(0x10000000 | 0x40000000) == 0 else 1)")
    return subprocess.run([sys.executable, "-I", "-c", code], timeout=30).returncode == 0


NETNS = kernel_allows_netns()


@pytest.fixture
def tool(tmp_path):
    return PythonTool(wall_s=5, cpu_s=5, memory_mb=512, output_chars=2000, tmp_root=str(tmp_path))


def test_normal_code_returns_its_output(tool, tmp_path):
    assert run(tool, "print('hello')\nimport sys; print('err', file=sys.stderr)\nx = 6\nx * 7") == "hello\nerr\n42\n"
    assert run(tool, "x = 1") == "[no output]"
    assert run(tool, "import numpy as np\nprint(np.arange(4).sum())") == "6\n"
    # From Python 3.12 importing ctypes dlopens the interpreter; numpy imports it, so it must import
    assert run(tool, "import ctypes\nprint(ctypes.sizeof(ctypes.c_int32))") == "4\n"
    assert list(tmp_path.iterdir()) == []  # the per-call directory is deleted afterwards


def test_exceptions_read_like_python_without_the_bootstrap(tool):
    out = run(tool, "def f():\n    return 1 / 0\nf()")
    assert 'File "<code>", line 2, in f' in out and "return 1 / 0" in out
    assert out.endswith("ZeroDivisionError: division by zero\n[exit status 1]") and "<string>" not in out
    assert "SyntaxError" in run(tool, "def f(:")
    assert run(tool, "import sys; print('bye'); sys.exit(3)") == "bye\n[exit status 3]"


def test_isolation_report_matches_the_host(tool):
    iso = tool.isolation()
    if NETNS:
        assert iso["network"].startswith("kernel: private network namespace")
    else:
        assert iso["network"].startswith("unavailable") and "refuses" in iso["network"]
        pytest.skip("user + network namespaces are not permitted here; the refusal is tested below")
    threads = run(tool, "import threading\ntry:\n    threading.Thread(target=int).start(); print('yes')\n"
                        "except RuntimeError:\n    print('no')")
    # Root is exempt from RLIMIT_NPROC; any other user is held to it inside its new user namespace.
    assert iso["processes"] == ("audit hook only" if os.geteuid() == 0 else "kernel: RLIMIT_NPROC=1 + audit hook")
    assert threads == ("yes\n" if iso["processes"] == "audit hook only" else "no\n")


@pytest.fixture
def loopback_server():
    """A TCP listener the parent can reach on 127.0.0.1; accepts at most a few connections, then stops."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.05)
    accepted, stop = [], threading.Event()

    def serve():
        deadline = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < deadline and len(accepted) < 3:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            accepted.append(conn)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1], accepted
    stop.set()
    thread.join(1)
    srv.close()


@pytest.mark.skipif(not NETNS, reason="needs user + network namespaces")
def test_network_is_denied_by_the_namespace_and_the_hook(tool, loopback_server):
    port, accepted = loopback_server
    socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from outside the sandbox
    # The kernel layer: a different network namespace, with loopback as its only interface.
    ns = run(tool, "import os\nprint(os.readlink('/proc/self/ns/net'))\n"
                   "print(sorted(l.split(':')[0].strip() for l in open('/proc/self/net/dev').readlines()[2:]))")
    assert ns.splitlines() == [ns.splitlines()[0], "['lo']"] and ns.splitlines()[0] != os.readlink("/proc/self/ns/net")
    # The hook layer on top: every socket connect, resolve or plain creation is refused.
    for code in (f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
                 "import socket; socket.getaddrinfo('example.com', 80)",
                 "import socket; socket.socket(socket.AF_INET, socket.SOCK_STREAM)",
                 f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)"):
        out = run(tool, code)
        assert "PermissionError: sandbox: network access is refused" in out, out
    assert len(accepted) == 1  # only the parent's own connection arrived


def test_audit_mode_denies_network_without_a_namespace(tmp_path, loopback_server):
    port, accepted = loopback_server
    tool = PythonTool(network="audit", tmp_root=str(tmp_path))
    assert tool.isolation()["network"] == "audit hook only"
    assert os.readlink("/proc/self/ns/net") == run(tool, "import os; print(os.readlink('/proc/self/ns/net'))").strip()
    out = run(tool, f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)")
    assert "PermissionError: sandbox: network access is refused" in out and accepted == []
    assert run(tool, "import asyncio; print(asyncio.run(asyncio.sleep(0, 'socketpairs still work')))") == \
        "socketpairs still work\n"


def test_refuses_to_run_when_the_network_cannot_be_isolated(tmp_path):
    # A stand-in interpreter that fails the way the bootstrap does when unshare() is not permitted.
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'sandbox: cannot isolate the network: unshare(CLONE_NEWUSER|CLONE_NEWNET): "
                    "[Errno 1] Operation not permitted' >&2\ncat > /dev/null\nexit 71\n")
    fake.chmod(0o755)
    tool = PythonTool(python=str(fake), tmp_root=str(tmp_path))
    with pytest.raises(ToolError, match="refusing to run code: sandbox: cannot isolate the network.*network='audit'"):
        run(tool, "print('must not run')")
    assert tool.isolation()["network"].startswith("unavailable") and "refuses" in tool.isolation()["network"]


@pytest.mark.parametrize("kind", ["wall", "cpu"])
def test_infinite_loops_are_killed(tmp_path, kind):
    wall, cpu = (1.0, 30) if kind == "wall" else (30.0, 1)
    tool = PythonTool(wall_s=wall, cpu_s=cpu, tmp_root=str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(ToolError) as err:
        run(tool, "print('started')\nwhile True:\n    pass")
    elapsed = time.perf_counter() - t0
    expected = "wall time limit (1s) exceeded; process group killed" if kind == "wall" else \
        "CPU time limit (1s) exceeded; process killed"
    assert str(err.value).startswith(expected) and "Output before it:\nstarted" in str(err.value)
    assert elapsed < 1.0 + 1.0 + 5.0  # the limit, RLIMIT_CPU's one-second grace, slack for a shared machine
    assert list(tmp_path.iterdir()) == []


def test_sleeping_code_is_killed_by_the_wall_limit(tmp_path):
    tool = PythonTool(wall_s=0.5, tmp_root=str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(ToolError, match=r"wall time limit \(0.5s\)"):
        run(tool, "import time; time.sleep(60)")
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("code", ["x = bytearray(2 * 1024**3)",
                                  "chunks = []\nwhile True:\n    chunks.append(bytearray(10 * 1024**2))"])
def test_memory_bombs_are_stopped(tmp_path, code):
    tool = PythonTool(memory_mb=256, tmp_root=str(tmp_path))
    out = run(tool, code)
    assert "MemoryError" in out and out.endswith("[memory limit (256 MiB) exceeded]")


def sandbox_processes(root: Path) -> list[int]:
    """Live processes whose command line names a per-call directory under root."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(root).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_runner_timeout_kills_the_process_group(tmp_path):
    tool = PythonTool(wall_s=30, tmp_root=str(tmp_path))
    with ToolRunner([tool], limits=ToolLimits(timeout_s=0.5, retries=0)) as runner:
        fut = runner.submit("python", {"code": "import time; time.sleep(60)"})
        deadline = time.monotonic() + 5
        while not sandbox_processes(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sandbox_processes(tmp_path)  # it did start
        obs = fut.result(10)
    assert obs.text == "[tool error] python: timeout after 0.5s"
    assert sandbox_processes(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_writes_outside_the_temp_dir_are_refused(tool, tmp_path):
    outside = tmp_path.parent / f"outside-{os.getpid()}"
    outside.mkdir(exist_ok=True)
    keep = outside / "keep.txt"
    keep.write_text("original")
    attempts = [f"open({str(outside / 'new.txt')!r}, 'w')",
                f"open({str(keep)!r}, 'a').write('x')",
                f"import os; os.open({str(outside / 'raw')!r}, os.O_WRONLY | os.O_CREAT)",
                f"import os; os.remove({str(keep)!r})",
                f"import os; os.rename({str(keep)!r}, 'stolen.txt')",
                f"import os; os.chmod({str(keep)!r}, 0o777)",
                f"import shutil; shutil.rmtree({str(outside)!r})",
                f"import os; os.symlink({str(keep)!r}, 'link'); open('link', 'w')",
                "import subprocess; subprocess.run(['touch', '/tmp/sandbox-escape'])",
                "import os; os.system('true')",
                "import os; os.fork()",
                "import ctypes; ctypes.CDLL(None)",
                "import ctypes; ctypes.pythonapi.Py_GetVersion()"]  # ctypes is imported, but calls stay refused
    for code in attempts:
        out = run(tool, code)
        assert "PermissionError: sandbox:" in out and "refused" in out, (code, out)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"] and keep.read_text() == "original"
    assert not Path("/tmp/sandbox-escape").exists()
    # Inside its own directory, files work as usual.
    inside = "open('a.txt', 'w').write('kept')\nimport os; os.mkdir('d')\nprint(open('a.txt').read())"
    assert run(tool, inside) == "kept\n"


SYSTEM_PYTHON = "/usr/bin/python3"  # world-readable, unlike a venv under /root: usable by another uid


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
                    reason="dropping to another uid needs root and an interpreter that uid can read")
def test_dropped_uid_makes_write_confinement_kernel_enforced(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    outside.chmod(0o755)  # readable by everyone, writable by root only
    (tmp_path / "calls").mkdir()
    # A write the audit hook cannot see: the path it checks ('f') is relative to dir_fd, not the cwd.
    code = (f"import os\nd = os.open({str(outside)!r}, os.O_RDONLY)\n"
            "os.close(os.open('f', os.O_WRONLY | os.O_CREAT, dir_fd=d))\nprint('written')")
    hook_only = PythonTool(tmp_root=str(tmp_path / "calls"))
    assert hook_only.isolation()["writes"] == "audit hook only (outside the temp directory)"
    assert run(hook_only, code) == "written\n" and (outside / "f").exists()  # the documented gap
    (outside / "f").unlink()
    as_nobody = PythonTool(python=SYSTEM_PYTHON, uid=65534, tmp_root=str(tmp_path / "calls"))
    iso = as_nobody.isolation()
    assert iso["writes"] == "kernel: runs as uid 65534 + audit hook"
    if NETNS:
        assert iso["processes"] == "kernel: RLIMIT_NPROC=1 + audit hook"  # not root any more
    out = run(as_nobody, code)
    assert "PermissionError: [Errno 13] Permission denied" in out and not (outside / "f").exists()
    assert run(as_nobody, "import os; open('mine.txt', 'w').write('x'); print(os.getuid())") == "65534\n"
    assert list((tmp_path / "calls").iterdir()) == []


def test_output_is_truncated_with_a_marker(tmp_path):
    tool = PythonTool(output_chars=100, wall_s=1, tmp_root=str(tmp_path))
    out = run(tool, "print('x' * 100_000)")
    assert out == "x" * 100 + "\n[output truncated: 100 characters kept, 99901 more bytes dropped]\n"
    with pytest.raises(ToolError) as err:  # an endless stream is drained, bounded, and killed at the wall limit
        run(tool, "while True:\n    print('y' * 1000)")
    assert "wall time limit" in str(err.value) and "[output truncated: 100 characters kept" in str(err.value)


def test_environment_is_scrubbed(tool, monkeypatch):
    monkeypatch.setenv("SAILOR_TEST_SECRET", "s3cret")
    assert run(tool, "import os; print(os.environ.get('SAILOR_TEST_SECRET'), os.getcwd() == os.environ['HOME'])") == \
        "None True\n"


def test_concurrent_calls_through_the_runner(tool):
    with ToolRunner([tool], per_tool={"python": ToolLimits(concurrency=4, retries=0)}) as runner:
        obs = runner.map([("python", {"code": f"print({i} ** 2)"}) for i in range(8)] + [("python", '{"code": 1}')])
    assert [o.text for o in obs[:8]] == [f"{i ** 2}\n" for i in range(8)] and not any(o.cached for o in obs)
    assert obs[8].text == "[tool error] python: bad arguments: Expected `str`, got `int` - at `$.code`"


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="network"):
        PythonTool(network="none")
    with pytest.raises(ValueError, match="memory_mb"):
        PythonTool(memory_mb=1)


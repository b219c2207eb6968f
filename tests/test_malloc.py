"""keymgr.malloc: the daemon caps glibc's malloc arenas (benchmarks/bench_scale.py:
38 MB of RSS at 100,000 rings), leaves an operator's MALLOC_ARENA_MAX alone and
never fails where there is nothing to tune."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from keymgr import malloc

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc malloc arenas are Linux-only"
)

#: Eight threads that allocate (through ctypes' libc malloc), then glibc's own
#: account of its arenas: malloc_info writes one <heap nr=...> per arena.
_PROBE = r"""
import ctypes, sys, threading
from keymgr.malloc import limit_arenas
if sys.argv[1] != "default":
    assert limit_arenas(int(sys.argv[1]))
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
start = threading.Barrier(8)
def work():
    start.wait()  # all eight allocate at once: each wants an arena of its own
    for _ in range(2000):
        libc.malloc(256)
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
f = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, f)
libc.fclose(f)
"""


def _heaps(tmp_path: Path, arenas: str) -> int:
    out = tmp_path / f"malloc-{arenas}.xml"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    subprocess.run(
        [sys.executable, "-c", _PROBE, arenas, str(out)], env=env, check=True, timeout=60
    )
    return out.read_text().count("<heap nr=")


def test_the_daemon_keeps_at_most_the_arenas_it_asked_for(tmp_path: Path) -> None:
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except ValueError:  # a libc that does not know the name is not glibc
        libc = ""
    if not libc.startswith("glibc"):
        pytest.skip(f"malloc arenas are glibc's; this libc is {libc or 'another'}")
    assert _heaps(tmp_path, "default") > 2  # what limit_arenas is for
    assert _heaps(tmp_path, "1") == 1
    assert _heaps(tmp_path, "2") <= 2


def test_an_operators_malloc_arena_max_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(*args: object) -> None:
        raise AssertionError("mallopt called although MALLOC_ARENA_MAX is set")

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setattr("ctypes.CDLL", no_libc)
    assert malloc.limit_arenas() is False


def test_nothing_to_tune_is_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(*args: object) -> None:
        raise OSError("no libc here")

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setattr("ctypes.CDLL", no_libc)
    monkeypatch.setattr(malloc, "_libc", None)  # forget the glibc a test before found
    assert malloc.limit_arenas() is False
    assert malloc.release() is False
    monkeypatch.setattr(malloc, "_libc", None)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert malloc.limit_arenas() is False
    assert malloc.release() is False


#: A heap as a pass leaves it: 80 MB of 4 KiB blocks (under glibc's mmap
#: threshold, so on the heap), written to, then freed except every 16th, which
#: keeps the free runs inside the heap. Prints VmRSS (kB) after the frees and
#: after release().
_FRAGMENTED = r"""
import ctypes, sys
from keymgr.malloc import release
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
blocks = []
for _ in range(20000):
    p = libc.malloc(4096)
    ctypes.memset(p, 1, 4096)
    blocks.append(p)
for i, p in enumerate(blocks):
    if i % 16:
        libc.free(p)
freed = rss()
assert release(), "malloc_trim found nothing to return"
print(freed, rss())
"""


def test_release_returns_what_a_pass_freed_inside_the_heap() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run(
        [sys.executable, "-c", _FRAGMENTED], env=env, check=True, timeout=60,
        capture_output=True, text=True,
    ).stdout.split()
    freed, released = int(out[0]), int(out[1])
    # ~75 MB of the 80 lie in whole free pages between the kept blocks: glibc
    # keeps them resident on its own, release() hands them back.
    assert freed - released > 50_000, (freed, released)

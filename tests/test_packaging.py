"""The package without its C module: ``import sshrpc`` falls back to the
pure-Python codec and frame buffer, says so once, and works."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

HIDE_C = textwrap.dedent(
    """
    import importlib.abc, sys

    class HideC(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "sshrpc._sshrpc_c":
                raise ImportError("No module named 'sshrpc._sshrpc_c' (hidden by the test)")
            return None

    sys.meta_path.insert(0, HideC())
    """
)


def run_hidden(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SSHRPC_PURE_PYTHON"}
    return subprocess.run(
        [sys.executable, "-c", HIDE_C + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_import_without_the_c_module_falls_back_and_warns_once() -> None:
    result = run_hidden(
        """
        import sshrpc, sshrpc.protocol, sshrpc.node
        from sshrpc import _accel
        assert sshrpc.c_accelerated is False
        assert _accel.FrameBuffer.__module__ == "sshrpc._pyframing"
        term = (sshrpc.Atom("call"), 7, [1.5, b"x" * 3000, {"k": [2**70]}])
        want = (term[0], 7, [1.5, b"x" * 3000, {b"k": [2**70]}])
        assert sshrpc.decode(sshrpc.encode(term)) == want
        frame = _accel.encode_frame(term)
        fb = _accel.FrameBuffer(1 << 20)
        for i in range(len(frame)):
            fb.feed(frame[i : i + 1])
        assert sshrpc.decode(fb.next_frame()) is not None
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    warnings = [line for line in result.stderr.splitlines() if "without its C module" in line]
    assert len(warnings) == 1, result.stderr
    assert "slower" in warnings[0] and "C module is missing" in warnings[0]


def test_the_c_module_is_used_when_present() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import sshrpc; print(sshrpc.c_accelerated)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    assert "C module" not in result.stderr

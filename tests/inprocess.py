"""Run a training script's __main__ in the test process: the bad-input matrices use it because it is fast
(torch is imported once, not once per case). Each test file also checks a few cases in a real process."""

import contextlib
import io
import os
import runpy
import signal
import sys


def run_main(script: str, argv: list, cwd) -> tuple:
    """(exit code, stdout, stderr) of `python script *argv` run in cwd; the working folder, sys.argv and the
    SIGINT/SIGTERM handlers the script installs are restored afterwards."""
    out, err, old_cwd, old_argv = io.StringIO(), io.StringIO(), os.getcwd(), sys.argv
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.chdir(cwd)
    sys.argv = [script, *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
        for s, h in handlers.items():
            signal.signal(s, h)
    return code, out.getvalue(), err.getvalue()

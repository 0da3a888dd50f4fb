"""Running `jaxllm <command>` in-process with its output captured, for the CLI tests."""

import contextlib
import io

from jaxllm.cli import main


def run_main(argv):
    """(exit code, stdout, stderr) of `jaxllm *argv`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()

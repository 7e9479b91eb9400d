"""`refused_commands.py CASES.json`: run several `fixmatch-train` command lines, one after another, in this one
process, and write each one's exit status, stdout and stderr to CASES.json.out.json.

For commands that are expected to stop with an input error: they share the ~5 s of imports a fresh process
pays, and each still goes through the command's own entry point (`cli.main`) and its one-line error.
accelerate's process-wide state is reset between commands, as a fresh process would have it.
"""

import contextlib
import io
import json
import sys

from accelerate.state import AcceleratorState, GradientState

from fixmatch_accel.cli import main


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
        except Exception as e:  # a traceback is what the caller checks for
            import traceback

            code = 1
            err.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception(e)))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return dict(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    with open(sys.argv[1] + ".out.json", "w") as f:
        json.dump([run(argv) for argv in cases], f)

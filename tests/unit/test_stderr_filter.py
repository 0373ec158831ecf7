"""Ray's core-worker line about actor constructor arguments and the raylet's worker start-up note
are dropped from the quiet console (issue 28: "no core-worker line on any command"); everything
else passes, at once."""

from __future__ import annotations

import subprocess
import sys

NOISE = ("[2026-12-05 05:49:54,126 E 1005 1005] core_worker.cc:2465: Actor with class name: "
         "'MapWorker(MapBatches(_PartLabeler))' and ID: '393113a2dab29efdfca380b801000000' has constructor "
         "arguments in the object store and max_restarts > 0. If the arguments in the object store go out of "
         "scope or are lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 "
         "for more details.\n")
OTHER = "[2026-12-05 05:49:54,127 E 1005 1005] core_worker.cc:99: a line raykd does not know\n"

SCRIPT = f"""
import os, sys
from raykd import console

def command():
    with console.core_worker_noise_filtered():
        sys.stderr.write("labeling: 1/2\\r"); sys.stderr.flush()
        os.write(2, {NOISE.encode()!r})  # C++ writes to the descriptor, not through sys.stderr
        os.write(2, {OTHER.encode()!r})
    sys.stderr.write("after\\n")
    print("(raylet) WARNING: 8 PYTHON worker processes have been started on node: ab with address: 1.2.3.4, which is 4x")
    print("(raylet) A worker died or was killed while executing a task")
    print("the table")

sys.exit(console.run(command, verbose=sys.argv[1] == "verbose"))
"""


def _stderr(mode: str) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, timeout=60, check=True)
    return out.stderr.decode(), out.stdout.decode()  # bytes: text mode would turn the bar's \r into \n


DIED = "(raylet) A worker died or was killed while executing a task\n"


def test_the_constructor_arguments_line_and_the_startup_note_are_dropped_and_the_rest_passes():
    assert _stderr("quiet") == ("labeling: 1/2\r" + OTHER + "after\n", DIED + "the table\n")


def test_verbose_shows_everything():
    err, out = _stderr("verbose")
    assert err == "labeling: 1/2\r" + NOISE + OTHER + "after\n"
    assert out.startswith("(raylet) WARNING: 8 PYTHON worker processes") and out.endswith(DIED + "the table\n")

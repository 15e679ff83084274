"""The command runtime's signal rule: SIGTERM is told from Ctrl-C however a wait re-raised it."""

import subprocess
import sys

import pytest

# a process that stops itself by SIGNAL while its main thread is in a wait that turns any
# interrupt into a plain KeyboardInterrupt (as Ray's core worker does in ray.wait / ray.get)
STOPPED_IN_A_WAIT = """
import os, signal, time
from tessera.core.runtime import stop_on_sigterm, terminated
stop_on_sigterm()
try:
    try:
        os.kill(os.getpid(), signal.{signal})
        time.sleep(30)
    except KeyboardInterrupt:
        raise KeyboardInterrupt()
except KeyboardInterrupt as e:
    print(type(e).__name__, terminated(e))
"""


@pytest.mark.parametrize(("sent", "told"), [("SIGTERM", "True"), ("SIGINT", "False")])
def test_sigterm_is_told_from_ctrl_c_when_a_wait_raised_a_plain_interrupt(sent, told):
    done = subprocess.run([sys.executable, "-c", STOPPED_IN_A_WAIT.format(signal=sent)], capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.split() == ["KeyboardInterrupt", told], done.stderr[-2000:]

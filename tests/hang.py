"""The test suite's one rule for time: nothing it checks depends on how
fast the machine is.  Timeouts on subprocesses, threads and pipes only catch
a hang, so they are all ``HANG_S`` (an hour by default; environment
``DUALSPARSE_TEST_HANG_S``), far above the minutes any step takes on a busy
two-core machine.  Compilations get no timeout at all (a compiler does not
hang; on a loaded machine it is just slow)."""
import os

HANG_S = float(os.environ.get("DUALSPARSE_TEST_HANG_S", "3600"))

"""What every test process shares. pytest.ini runs the tests in two processes (pytest-xdist), so
each takes one CPU thread, as do the trainers the tests start: two busy processes on two cores
with two threads each ran slower than one at a time."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here and in subprocesses

"""A bound on tests that spawn processes: a hang in a collective fails the test instead of blocking
the session."""
import contextlib
import multiprocessing
import threading


@contextlib.contextmanager
def watchdog(seconds: float):
    """Kill the processes spawned (``multiprocessing``) meanwhile if this takes longer than
    ``seconds``."""
    def kill_children():
        for child in multiprocessing.active_children():
            child.kill()

    timer = threading.Timer(seconds, kill_children)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()

"""Ctrl-C in a run (qprsgd/interrupt.py): held back across a block of writes even when another
thread receives the signal; never lost when a finalizer swallows its exception."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from qprsgd import interrupt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_deferred_holds_sigint_until_the_block_ends():
    # another live thread that does not block SIGINT: the kernel may hand it the signal (this is
    # what made a pthread_sigmask-based deferral raise halfway through a flush)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, args=(5,), daemon=True)
    t.start()
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupt.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                t_end = time.monotonic() + 0.2
                while time.monotonic() < t_end:   # bytecodes run: a pending interrupt would raise here
                    pass
                done.append("whole")
    finally:
        stop.set()
        t.join()
    assert done == ["whole"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored


def test_deferred_without_sigint_raises_nothing():
    with interrupt.deferred():
        x = sum(range(1000))
    assert x == 499500 and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupt_swallowed_by_a_finalizer_is_raised_again_by_check():
    code = textwrap.dedent("""
        import gc, signal, sys
        from qprsgd import interrupt
        interrupt.install()

        class Finalized:
            def __del__(self):
                signal.raise_signal(signal.SIGINT)   # Ctrl-C arrives while a finalizer runs
                sum(range(10))
        Finalized()          # dropped at once: __del__ runs, its KeyboardInterrupt is swallowed
        gc.collect()
        print("trained on", flush=True)
        assert interrupt.pending()
        try:
            interrupt.check()
        except KeyboardInterrupt:
            print("raised by check", flush=True)
            sys.exit(0)
        sys.exit(1)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:2] == ["trained on", "raised by check"]
    assert "Exception ignored" not in p.stderr and "KeyboardInterrupt" not in p.stderr, p.stderr


def test_check_is_silent_without_ctrl_c():
    assert not interrupt.pending()
    interrupt.check()

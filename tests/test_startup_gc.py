"""recon.startup: garbage collection paused for start-up and resumed (frozen) after the first training step."""
from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from recon import startup

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def collector():
    """Leave the collector as the test found it: enabled, nothing frozen by the test, not paused."""
    was_enabled, frozen = gc.isenabled(), gc.get_freeze_count()
    yield
    startup._paused = False
    if gc.get_freeze_count() > frozen:
        gc.unfreeze()
    (gc.enable if was_enabled else gc.disable)()


def test_pause_then_resume_freezes_and_enables(collector):
    gc.enable()
    startup.pause()
    assert not gc.isenabled() and startup.paused()
    startup.pause()  # twice: still paused, resume still restores
    assert startup.paused()
    garbage = [[] for _ in range(3)]
    for a, b in zip(garbage, garbage[1:] + garbage[:1]):
        a.append(b)  # a reference cycle made while paused
    del garbage, a, b
    frozen = gc.get_freeze_count()
    startup.resume()
    assert gc.isenabled() and not startup.paused()
    assert gc.get_freeze_count() > frozen  # what was alive now sits in the permanent generation
    startup.resume()  # again: nothing
    assert gc.isenabled()


def test_a_collector_switched_off_by_the_caller_stays_off(collector):
    gc.disable()
    startup.pause()
    assert not startup.paused()
    startup.resume()
    assert not gc.isenabled()


def test_resume_callback_runs_once_after_the_first_step(collector):
    from recon.callbacks.startup_gc import ResumeCollection

    gc.enable()
    startup.pause()
    cb = ResumeCollection()
    cb.on_train_batch_end(None, None, None, None, 0)
    assert gc.isenabled() and not startup.paused()
    frozen = gc.get_freeze_count()
    cb.on_train_batch_end(None, None, None, None, 1)  # later steps: nothing more is frozen
    assert gc.get_freeze_count() == frozen


def test_train_py_pauses_collection_for_its_imports():
    code = ("import gc, runpy; runpy.run_path('train.py', run_name='not_main'); from recon import startup; "
            "print(gc.isenabled(), startup.paused())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_process_forked_while_paused_collects_again(collector):
    import os

    gc.enable()
    startup.pause()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it collects, then leave without running the parent's cleanup
        os.write(write, b"1" if gc.isenabled() and not startup.paused() else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert not gc.isenabled() and startup.paused()  # the parent stays paused until its first step
    startup.resume()

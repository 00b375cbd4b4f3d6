"""The per-artifact lock file: serializes builds of one artifact, and is gone once no build holds or waits for it."""

from __future__ import annotations

import fcntl
import threading
import time

import pytest

from builder.pipeline import _locked


def _held_by_someone(path) -> bool:
    with open(path, "a") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
        return False


def test_a_waiter_on_the_deleted_file_locks_its_successor_and_the_last_one_out_deletes_it(tmp_path, capsys):
    path = tmp_path / ".tiny.lock"
    second_in = threading.Event()
    release_second = threading.Event()

    def second() -> None:
        with _locked(tmp_path, "tiny"):
            second_in.set()
            release_second.wait(30)

    with _locked(tmp_path, "tiny"):
        waiter = threading.Thread(target=second)
        waiter.start()
        deadline = time.monotonic() + 30
        while "tiny: waiting for another build" not in capsys.readouterr().err:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not second_in.is_set()
    # The first deleted the file the second was waiting on; the second must hold the path's file now, so a third
    # build (or this probe) finds it locked instead of taking a lock of its own beside it.
    assert second_in.wait(30)
    assert path.exists() and _held_by_someone(path)
    release_second.set()
    waiter.join(30)
    assert not path.exists()


def test_the_lock_file_is_deleted_after_a_failure_too(tmp_path):
    with pytest.raises(RuntimeError), _locked(tmp_path, "tiny"):
        raise RuntimeError("a step failed")
    assert list(tmp_path.iterdir()) == []

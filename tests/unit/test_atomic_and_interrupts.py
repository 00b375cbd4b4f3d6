"""Replacing an artifact is atomic, and an interrupt is never lost (issue 20, items 5 and 7)."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from test_pipeline import write_recipe

from builder import artifact
from builder.cli import main


def _folder(path, files: dict[str, str]):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_replacing_exchanges_the_folders_in_one_step(tmp_path, monkeypatch):
    final = _folder(tmp_path / "a", {"manifest.json": "old", "w": "old"})
    new = _folder(tmp_path / ".tmp-a-xxxxxxxx", {"manifest.json": "new", "w": "new", "extra": "new"})
    renames = []
    monkeypatch.setattr(artifact.os, "rename", lambda *args: renames.append(args))
    artifact.replace_folder(new, final)
    assert renames == []  # no rename window: the exchange did it
    assert {p.name: p.read_text() for p in final.iterdir()} == {"manifest.json": "new", "w": "new", "extra": "new"}
    assert not new.exists()


@pytest.mark.parametrize("exchange", [True, False])
def test_the_final_path_always_names_a_whole_artifact(tmp_path, monkeypatch, exchange):
    """A thread resolves the final path while it is replaced 300 times: with the exchange it always names one of
    the complete folders; the two-rename fallback (no exchange) leaves moments with nothing there."""
    if not exchange:
        monkeypatch.setattr(artifact, "_exchange", lambda a, b: False)
    final = _folder(tmp_path / "a", {"manifest.json": "0"})
    complete, seen, stop = {final.stat().st_ino}, [], threading.Event()

    def watch():
        while not stop.is_set():
            try:
                seen.append(os.stat(final).st_ino)
            except FileNotFoundError:
                seen.append(None)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(1, 301):
            new = _folder(tmp_path / f".tmp-a-{i:08d}", {"manifest.json": str(i)})
            complete.add(new.stat().st_ino)
            artifact.replace_folder(new, final)
    finally:
        stop.set()
        watcher.join()
    assert (final / "manifest.json").read_text() == "300"
    if exchange:
        assert None not in seen and set(seen) <= complete
    else:
        assert None in seen or pytest.skip("the watcher missed the fallback's gap this time")


def _swallowing(signum):
    """A step during which the signal arrives and its exception is swallowed (as in a weakref callback)."""

    def step(ctx):
        try:
            os.kill(os.getpid(), signum)
            signal.sigtimedwait([], 0) if hasattr(signal, "sigtimedwait") else None
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        except KeyboardInterrupt:
            pass

    return step


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_whose_exception_was_swallowed_still_stops_the_build(
    tiny_llama, tmp_path, monkeypatch, capsys, signum, code
):
    from builder.kinds import bnb_4bit

    monkeypatch.setattr(bnb_4bit, "build", _swallowing(signum))  # the nf4 recipe's build stage (its kind's step)
    recipe = write_recipe(tmp_path, tiny_llama)
    out = tmp_path / "out"
    assert main(["build", str(recipe), "--out", str(out), "--device", "cpu"]) == code
    assert f"interrupted ({signal.Signals(signum).name})" in capsys.readouterr().err
    assert [p.name for p in out.iterdir() if not p.name.endswith(".lock")] == []  # nothing installed, temp removed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the CLI's handler is gone afterwards


def test_a_failed_publish_refresh_leaves_the_old_artifact_whole(tiny_llama, tmp_path, monkeypatch, capsys):
    from builder.steps import write

    recipe = write_recipe(tmp_path, tiny_llama)
    out = tmp_path / "out"
    assert main(["build", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crash(new, final):
        raise OSError("simulated crash before the exchange")

    monkeypatch.setattr(write, "replace_folder", crash)
    recipe.write_text(recipe.read_text() + "publish: {repo: org/tiny, license: mit}\n")
    assert main(["build", str(recipe), "--out", str(out), "--device", "cpu"]) == 3
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # no staging folder left, no file rewritten in place
    monkeypatch.undo()
    assert main(["build", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    assert "org/tiny" in (out / "tiny-nf4" / "README.md").read_text()


@pytest.mark.slow
def test_killing_rebuilds_at_random_points_never_leaves_a_partial_artifact(tiny_llama, tmp_path):
    """8 forced rebuilds of an installed artifact, each sent SIGKILL, SIGINT or SIGTERM at a random moment (seeded):
    afterwards the final path holds a complete artifact (every listed file at its size), and exits say why."""
    import random
    import subprocess
    import sys
    import time

    recipe = write_recipe(tmp_path, tiny_llama)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "builder", "build", str(recipe), "--out", str(out), "--device", "cpu"]
    assert subprocess.run(command, capture_output=True, check=False).returncode == 0
    rng, outcomes = random.Random(20), []
    started = time.monotonic()
    for _ in range(8):
        signum = rng.choice([signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
        process = subprocess.Popen([*command, "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(1.0, 14.0))
        process.send_signal(signum)
        code = process.wait(timeout=120)
        outcomes.append((signum.name, code))
        assert code in (0, -9, 130, 143), process.stderr.read()[-2000:]
        manifest = artifact.load_manifest(out / "tiny-nf4")
        assert manifest.passed
        for name, entry in (manifest.files or {}).items():
            assert (out / "tiny-nf4" / name).stat().st_size == entry.size, name
        assert time.monotonic() - started < 600
    assert subprocess.run(command, capture_output=True, check=False).returncode == 0  # up to date, leftovers removed
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".lock")) == ["tiny-nf4"]
    print(outcomes)


def test_a_bad_device_is_refused_even_when_the_artifact_is_up_to_date(tiny_llama, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_llama)
    out = tmp_path / "out"
    assert main(["build", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["build", str(recipe), "--out", str(out), "--device", "tpu"]) == 1
    assert "--device 'tpu' is not cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.parametrize("code, signum", [(0, signal.SIGINT), (1, signal.SIGTERM)])
def test_a_signal_in_the_teardown_after_a_command_leaves_its_exit_code(code, signum):
    # A build that had printed "built" was killed by SIGINT (exit -2) in the interpreter's teardown.
    import subprocess
    import sys
    import time

    script = (
        "import sys, torch, bitsandbytes\n"  # what a build imports: their teardown takes a second or more
        "from builder.interrupts import finished\n"
        "finished()\n"
        "print('over', flush=True)\n"
        f"sys.exit({code})\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline() == b"over\n"
    time.sleep(0.3)
    assert process.poll() is None  # still tearing down
    process.send_signal(signum)
    assert process.wait(timeout=60) == code
    assert b"Traceback" not in process.stderr.read()

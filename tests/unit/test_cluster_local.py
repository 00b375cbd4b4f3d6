"""`builder build --executor ray` on the cluster builder starts on this machine (no address): the Hub token is in no
Ray process's environment, only a task that uses the Hub gets it, and a task whose worker is killed on every attempt
leaves no temporary folder. One cluster for the module, started by `builder.cluster.connected(None)` as the CLI
starts it."""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")

from builder import cluster  # noqa: E402
from builder.cluster import connected, uses_hub  # noqa: E402
from builder.fleet import artifact_units  # noqa: E402
from builder.leases import LEASE_SECONDS, leases_actor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VERIFY = 'verify:\n  prompts: ["Hello"]\n  max_new_tokens: 2\n  thresholds: {footprint_ratio: 1.0}\n'


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """The cluster a `builder build --executor ray` without an address starts, while HF_TOKEN is set; yields the
    token."""
    token = f"hf_{secrets.token_hex(16)}"
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "BUILDER_CACHE_DIR", "HF_TOKEN", "RAY_ADDRESS")}
    # The workers start from this environment: they import this checkout's builder.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved["PYTHONPATH"]]))
    os.environ["BUILDER_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HF_TOKEN"] = token
    os.environ.pop("RAY_ADDRESS", None)
    try:
        with connected(None):
            assert os.environ["HF_TOKEN"] == token  # the submitter keeps it
            yield token
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def recipe(folder: Path, model: Path, name: str, publish: bool = False) -> Path:
    file = folder / f"{name}.yaml"
    file.write_text(
        f"schema_version: 1\nname: {name}\nsource:\n  model: {model}\n  dtype: bfloat16\n"
        f"quantize:\n  method: bnb-4bit\n  compute_dtype: bfloat16\n{VERIFY}"
        + (f"publish: {{repo: org/{name}}}\n" if publish else "")
    )
    return file


def temporary(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-")))


def test_no_ray_process_has_the_token_in_its_environment(local_cluster):
    """Every process of the cluster (this process's descendants): GCS, raylet, agents, log monitor, the workers and
    the leases actor the raylet starts. (A publishing task gets the token as its argument: test_cluster.py publishes
    from the workers to a registry that refuses pushes without it.)"""
    token = local_cluster
    ray.get(leases_actor().held.remote())
    assert ray.get(_environment_of_a_task.remote("HF_TOKEN")) is None
    processes = psutil.Process().children(recursive=True)
    commands = [" ".join(p.cmdline()) for p in processes]
    for part in ("gcs_server", "raylet", "ray::ArtifactLeases"):
        assert any(part in command for command in commands), (part, commands)
    holding = [c for p, c in zip(processes, commands, strict=True) if token.encode() in _environ(p)]
    assert holding == [], f"HF_TOKEN in the environment of {holding} (of {len(processes)} Ray processes)"


@ray.remote(num_cpus=0)
def _environment_of_a_task(key: str) -> str | None:
    return os.environ.get(key)


def _environ(process: psutil.Process) -> bytes:
    """The environment the process started with (what it inherited; a later os.environ change is not in it)."""
    return Path(f"/proc/{process.pid}/environ").read_bytes()


def test_only_a_task_that_publishes_or_downloads_from_the_hub_gets_the_token(tiny_llama, tmp_path):
    local = recipe(tmp_path, tiny_llama, "tiny-local")
    [unit] = artifact_units([local], None)
    assert not uses_hub(unit, None)
    assert uses_hub(unit, {"repo": "org/tiny-local"})
    hub = tmp_path / "hub.yaml"
    hub.write_text(local.read_text().replace(f"model: {tiny_llama}", "model: org/some-model"))
    [unit] = artifact_units([hub], None)
    assert uses_hub(unit, None)


def test_a_task_whose_worker_dies_on_every_attempt_leaves_no_temporary_folder(
    local_cluster, tiny_llama, tmp_path, monkeypatch
):
    """The retry takes over its dead attempt's lease and removes its folder; after the last attempt, the submitter
    has its folder removed. Each attempt is killed (no cleanup runs, as with os._exit) once its folder exists."""
    monkeypatch.setattr(cluster, "TASK_RETRIES", 1)  # one retry, then the last attempt: both cleanups, in seconds
    out = tmp_path / "out"
    file = recipe(tmp_path, tiny_llama, "tiny-killed")
    outcomes = []
    build = threading.Thread(target=lambda: outcomes.extend(cluster.build_on_ray([file], out=out)))
    build.start()
    killed: list[tuple[int, list[str], float]] = []
    deadline = time.monotonic() + 240
    while build.is_alive():
        assert time.monotonic() < deadline, "the build did not end"
        worker = next((p for p in _workers("ray::build tiny-killed") if p.pid not in {pid for pid, *_ in killed}), None)
        # The attempt made its own folder: one no killed attempt had seen.
        folders = temporary(out) if out.is_dir() else []
        if worker is not None and set(folders) - {f for _, seen, _ in killed for f in seen}:
            os.kill(worker.pid, signal.SIGKILL)
            killed.append((worker.pid, folders, time.monotonic()))
        time.sleep(0.05)
    build.join()
    assert temporary(out) == [] and not (out / "tiny-killed").exists()
    [outcome] = outcomes
    assert "the build task failed after 1 retries" in outcome.error, outcome
    # The retry started once the killed attempt's lease was its own (no 20 s wait for it to lapse) and removed the
    # dead attempt's folder before making its own.
    assert [len(folders) for _, folders, _ in killed] == [1, 1], killed
    assert killed[1][2] - killed[0][2] < LEASE_SECONDS
    assert f"{out}/tiny-killed" not in ray.get(leases_actor().held.remote())  # the cleanup released the lease


def _workers(title: str) -> list[psutil.Process]:
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[:1] == [title]:
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found

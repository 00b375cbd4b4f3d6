"""`builder build --executor ray` on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and a
second node, one CPU each): every artifact built and verified with a local plan's build hash, published from the
workers with the submitter's token (which no Ray file records), one build of a recipe submitted twice at once, and
a node killed mid-build whose task is retried on the other node. One cluster for the module."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")

from ray.cluster_utils import Cluster  # noqa: E402

from builder.artifact import load_manifest  # noqa: E402
from builder.cli import main  # noqa: E402
from builder.cluster import unshared_problem  # noqa: E402
from builder.hub.server import start_in_thread  # noqa: E402
from builder.leases import ArtifactLeases, leases_actor  # noqa: E402
from builder.plan import make_plan  # noqa: E402
from builder.recipe import load_recipes  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
# The same gate settings everywhere: after the first build the gate's reference outputs come from its cache.
VERIFY = 'verify:\n  prompts: ["Hello"]\n  max_new_tokens: 2\n  thresholds: {footprint_ratio: 1.0}\n'


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The head and a second node; this process is a driver of it (worker logs not forwarded: stdout is JSON)."""
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "BUILDER_CACHE_DIR")}
    # The nodes' workers start from this environment: they import this checkout's builder.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved["PYTHONPATH"]]))
    os.environ["BUILDER_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    second = cluster.add_node(**NODE)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield {"cluster": cluster, "head": cluster.head_node.node_id, "second": second}
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def recipes(tiny_llama, tmp_path_factory) -> Path:
    """Four artifacts of the tiny Llama: one recipe file, and one with three variants (each variant is a task)."""
    folder = tmp_path_factory.mktemp("fleet")
    head = f"schema_version: 1\nsource:\n  model: {tiny_llama}\n  dtype: bfloat16\n"
    (folder / "nf4.yaml").write_text(
        f"{head}name: tiny-nf4\nquantize:\n  method: bnb-4bit\n  compute_dtype: bfloat16\n{VERIFY}"
        "publish: {repo: org/tiny-nf4}\n"
    )
    (folder / "more.yaml").write_text(
        f"{head}name: tiny\nquantize:\n  method: bnb-4bit\n  compute_dtype: bfloat16\n{VERIFY}"
        "variants:\n  fp4:\n    quantize: {quant_type: fp4}\n    publish: {repo: org/tiny-fp4}\n"
        "  dq:\n    quantize: {double_quant: true}\n    publish: {repo: org/tiny-dq}\n"
        "  int8:\n    quantize: {method: bnb-8bit}\n    publish: {repo: org/tiny-int8}\n"
    )
    return folder


def leftovers(out: Path) -> list[str]:
    """What a build must not leave in --out: temporary or aside folders, the shared-storage probe's marker."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-", ".builder-shared-")))


def submit(*argv: str) -> subprocess.Popen:
    """`builder build ... --executor ray --json` as a separate submitter (its own Ray driver)."""
    return subprocess.Popen(
        [sys.executable, "-m", "builder", "build", *argv, "--executor", "ray", "--json"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def rows_of(process: subprocess.Popen, timeout: float = 400) -> tuple[list[dict], str]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out), err


def test_every_artifact_builds_verified_on_both_nodes_and_publishes_with_the_submitters_token(
    cluster, recipes, tmp_path, monkeypatch, capsys
):
    # A fifth artifact whose source is missing fails alone; the others go on.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "gone.yaml").write_text(
        f"schema_version: 1\nname: tiny-gone\nsource:\n  model: {tmp_path / 'no-such-model'}\n"
        f"quantize:\n  method: bnb-8bit\n{VERIFY}"
    )
    token = f"hf_{secrets.token_hex(16)}"
    server = start_in_thread(tmp_path / "registry", token=token)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    out = tmp_path / "artifacts"
    try:
        code = main(["build", str(recipes), str(broken), "--executor", "ray", "--out", str(out), "--publish", "--json"])
    finally:
        server.shutdown()
        server.server_close()
    captured = capsys.readouterr()
    assert code == 1, captured.err
    *rows, failed = json.loads(captured.out)
    assert failed["name"] == "tiny-gone" and failed["status"] == "failed" and "no-such-model" in failed["error"]
    local = {p.recipe.name: make_plan(p).build_hash for f in sorted(recipes.iterdir()) for p in load_recipes(f)}
    assert {row["name"]: row["build_hash"] for row in rows} == local  # the hashes a local build records
    assert {row["status"] for row in rows} == {"built"} and all(row["verification_passed"] for row in rows)
    assert {row["node"] for row in rows} == {cluster["head"], cluster["second"].node_id}
    for row in rows:
        assert load_manifest(Path(row["path"])).passed
        assert row["publish"]["status"] == "published" and row["publish"]["repo"] == f"org/{row['name']}", row
    assert leftovers(out) == []
    assert "ray: 5 artifact(s): 4 built, 1 failed" in captured.err and "error: tiny-gone: " in captured.err
    # The token reached every worker (the registry refuses pushes without it) and no Ray file holds it.
    session = Path(cluster["cluster"].head_node.get_session_dir_path())
    holding = [str(p) for p in session.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert holding == []


def test_the_same_recipe_submitted_twice_at_once_builds_once(cluster, recipes, tmp_path):
    out = tmp_path / "artifacts"
    argv = (str(recipes / "nf4.yaml"), "--out", str(out), "--ray-address", cluster["cluster"].address)
    first, second = submit(*argv), submit(*argv)
    (a, a_err), (b, b_err) = rows_of(first), rows_of(second)
    assert sorted(row["status"] for row in a + b) == ["built", "up to date"]
    assert "waiting for another build of it on the cluster" in a_err + b_err
    assert load_manifest(out / "tiny-nf4").passed and leftovers(out) == []


def test_a_lease_lapses_when_its_holder_stops_renewing_or_its_node_dies(cluster):
    leases = ArtifactLeases(seconds=0.5)
    assert leases.acquire("out/a", "first", cluster["head"]) is None
    assert leases.acquire("out/a", "second", cluster["head"]) == cluster["head"]
    assert leases.renew("out/a", "first") and not leases.renew("out/a", "second")
    time.sleep(0.6)
    assert leases.held() == {}
    assert leases.acquire("out/a", "second", cluster["head"]) is None
    assert leases.acquire("out/b", "gone", "f" * 56) is None  # a node id the cluster does not have
    assert leases.acquire("out/b", "next", cluster["head"]) is None


def test_an_out_folder_a_node_cannot_see_is_refused_unless_the_workers_publish():
    views = {"10.0.0.1 aaaa": (True, []), "10.0.0.2 bbbb": (False, [])}
    problem = unshared_problem(Path("/scratch/artifacts"), views, publishing=False)
    assert problem.startswith("--out /scratch/artifacts is not storage every node of the Ray cluster sees")
    assert "10.0.0.2 bbbb" in problem and "--publish" in problem
    assert unshared_problem(Path("/scratch/artifacts"), views, publishing=True) is None
    missing = {"10.0.0.2 bbbb": (True, ["/recipes/a.yaml"])}
    assert "has no /recipes/a.yaml" in unshared_problem(Path("/x"), missing, publishing=True)


def test_a_node_killed_mid_build_has_its_task_retried_on_the_other(cluster, recipes, tmp_path):
    """Runs last: it removes the second node."""
    out = tmp_path / "artifacts"
    head, second = cluster["head"], cluster["second"]
    # The head's CPU is reserved, so the build starts on the second node; freed once that node is gone.
    reserved = ray.util.placement_group([{"CPU": 1, "node:__internal_head__": 0.001}])
    ray.get(reserved.ready(), timeout=60)
    build = submit(str(recipes / "nf4.yaml"), "--out", str(out), "--ray-address", cluster["cluster"].address)
    key, deadline = f"{out}/tiny-nf4", time.monotonic() + 180
    # Mid-build: the second node holds the artifact's lease and the build's temporary folder exists.
    while ray.get(leases_actor().held.remote()).get(key) != second.node_id or not any(out.glob(".tmp-tiny-nf4-*")):
        assert time.monotonic() < deadline and build.poll() is None, "the build never ran on the second node"
        time.sleep(0.5)
    cluster["cluster"].remove_node(second)
    ray.util.remove_placement_group(reserved)
    [row], _ = rows_of(build)
    assert row["status"] == "built" and row["node"] == head
    assert load_manifest(out / "tiny-nf4").passed
    assert leftovers(out) == []

"""`builder build --executor ray`: the recipe fleet on a Ray cluster, one Ray task per artifact.

Each artifact (a recipe, or one variant of it: `builder.fleet`) is a task asking for what its plan needs: one GPU
for a GPU build, the plan's peak memory, one CPU. The task runs `builder.pipeline.build_file` for that one artifact
on the node Ray picks, so it is the build a local `builder build` makes (same build hash for the same versions),
written into `--out`, which every node must see (or `--publish`: each worker pushes its artifact to the Hub).

Exclusion across nodes: a task builds under its artifact folder's cluster lease (`builder.leases`); within one host
the pipeline's flock still applies. A task whose worker or node dies is retried by Ray (`max_retries`); the retry
takes over its dead attempt's lease and deletes its temporary folder under the lock; when the last attempt died, the
submitter has that done on the node that held the lease. Nothing partial ever reaches a final path (the pipeline's
rename is its last act).

Secrets (HF_TOKEN) reach no Ray process's environment: Ray's processes are started from an environment without them,
and a task that uses the Hub gets them as an argument, held in memory only (Ray writes `runtime_env` env_vars into
the runtime-env agent's log under /tmp/ray/session_*/logs, so only the non-secret settings go that way).
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from builder import interrupts
from builder.batch import FileOutcome, check_out
from builder.console import QUIET_ENV, environment, say
from builder.errors import BuilderError
from builder.fleet import ArtifactUnit, UnreadableFile, artifact_units
from builder.hub.publish import publish, use_network_timeouts
from builder.leases import NAMESPACE, alive_nodes, leased, leases_actor, node_id, task_id
from builder.pipeline import build_file, remove_leftovers
from builder.plan import make_plan

SETTINGS = (
    "HF_ENDPOINT",
    "HF_HUB_DISABLE_XET",
    "HF_HUB_OFFLINE",
    "BUILDER_HTTP_TIMEOUT",
    QUIET_ENV,
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "TQDM_DISABLE",
)
"""The submitter's settings its tasks' workers start with (the task's runtime_env env_vars: huggingface_hub reads
them when first imported). Ray logs them; they are not secrets."""
SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
"""The submitter's secrets (huggingface_hub reads either): never in the environment of Ray's processes; an argument
of the tasks that use the Hub, set in the worker's environment for the task's duration only."""
TASK_RETRIES = 2
"""Ray retries a task whose worker process or node died this many times (an error of the build is not retried)."""
CANCEL_SECONDS = 30


def build_on_ray(
    files: list[Path],
    *,
    address: str | None = None,
    names: list[str] | None = None,
    out: str | Path = "artifacts",
    device: str | None = None,
    publish_options: dict | None = None,
    **options,
) -> list[FileOutcome]:
    """Build every artifact of `files` (only those in `names` when given) as Ray tasks; one outcome per artifact,
    in file order, or per file that does not load. `options` go to `builder.pipeline.build`; `publish_options`
    (repo, revision, private, create_pr) publish each artifact from its worker.

    Connects to `address`, else $RAY_ADDRESS, else starts a cluster on this machine; a process that is already
    connected (`ray.init` done) builds on its cluster."""
    out = Path(out).resolve()  # the workers' working folder is not this one
    check_out(out)
    units = artifact_units(files, names)
    outcomes = {
        k: FileOutcome(str(unit.recipe_file), [], str(unit.error))
        for k, unit in enumerate(units)
        if isinstance(unit, UnreadableFile)
    }
    with connected(address):
        artifacts = {k: u for k, u in enumerate(units) if isinstance(u, ArtifactUnit)}
        out.mkdir(parents=True, exist_ok=True)
        _refuse_unshared(out, sorted({u.recipe_file.resolve() for u in artifacts.values()}), publish_options)
        settings = {key: os.environ[key] for key in SETTINGS if key in os.environ}
        secret = {key: os.environ[key] for key in SECRETS if key in os.environ}
        nodes = alive_nodes()
        pending = {}
        for k, unit in artifacts.items():
            try:
                resources = task_resources(unit, device, nodes)
            except BuilderError as error:
                outcomes[k] = FileOutcome(str(unit.recipe_file), [], str(error), name=unit.name)
                continue
            task = _build_artifact.options(
                **resources,
                name=f"build {unit.name}",
                max_retries=TASK_RETRIES,
                runtime_env={"env_vars": settings} if settings else None,
            )
            ref = task.remote(
                str(unit.recipe_file.resolve()),
                unit.name,
                str(out),
                device,
                options,
                publish_options,
                secret if uses_hub(unit, publish_options) else {},
            )
            pending[ref] = (k, unit)
        outcomes |= _collect(pending, out)
    counts = Counter("failed" if o.error else o.results[0]["status"] for o in outcomes.values())
    say(f"ray: {len(outcomes)} artifact(s): " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return [outcomes[k] for k in sorted(outcomes)]


@contextmanager
def connected(address: str | None) -> Iterator[None]:
    """Connected to `address`, else $RAY_ADDRESS, else to a cluster started on this machine for the block (without
    the secrets in its processes' environment); a process already connected stays on its cluster."""
    if ray.is_initialized():
        yield
        return
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if local:
        say("no --ray-address or $RAY_ADDRESS: starting a Ray cluster on this machine")
    # Ray prints the workers' and raylets' lines (retries among them) to sys.stdout, which holds --json's rows.
    with redirect_stdout(sys.stderr):
        # The processes of a cluster started here (GCS, raylet, agents, and the workers the raylet starts) inherit
        # this environment for the cluster's life; the secrets reach the tasks that need them as an argument.
        with _without(SECRETS):
            ray.init(address=address, namespace=NAMESPACE, include_dashboard=False if local else None)
        try:
            yield
        finally:
            ray.shutdown()


@contextmanager
def _without(keys: tuple[str, ...]) -> Iterator[None]:
    """`keys` absent from os.environ for the block; back after it."""
    saved = {key: os.environ.pop(key) for key in keys if key in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def uses_hub(unit: ArtifactUnit, publish_options: dict | None) -> bool:
    """Whether the unit's task needs the Hub token: it publishes, or downloads its source from the Hub (a gated or
    private repo needs it). A build of a local folder that is not published gets no secret."""
    return publish_options is not None or not unit.loaded.recipe.source.is_local


def task_resources(unit: ArtifactUnit, device: str | None, nodes: list[dict]) -> dict:
    """Ray resources for the unit's build: one GPU when it builds on one (`--device`, else the recipe's wish when
    the cluster has GPUs), the plan's peak memory, one CPU. Refuses what no node of the cluster offers."""
    plan = make_plan(unit.loaded)
    has_gpus = any(node["Resources"].get("GPU", 0) >= 1 for node in nodes)
    gpu = device.startswith("cuda") if device else unit.device == "cuda" and has_gpus
    if gpu and not has_gpus:
        raise BuilderError(f"{unit.name}: --device {device} but no node of the Ray cluster has a GPU")
    memory = max((stage.peak_memory_bytes or 0) for stage in plan.stages)
    largest = max(node["Resources"].get("memory", 0) for node in nodes)
    if memory > largest:
        raise BuilderError(
            f"{unit.name}: its plan needs ~{memory / 2**30:.1f} GiB of memory and the largest node of the Ray "
            f"cluster offers {largest / 2**30:.1f} GiB; add a larger node (`builder plan` shows the estimate)"
        )
    return {"num_cpus": 1, "num_gpus": 1 if gpu else 0, **({"memory": memory} if memory else {})}


def _collect(pending: dict, out: Path) -> dict[int, FileOutcome]:
    """Wait for every task, saying each result as it comes."""
    outcomes: dict[int, FileOutcome] = {}
    start, total = time.monotonic(), len(pending)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            interrupts.check()  # ray.wait blocks outside Python, where a signal's exception cannot be raised
            if ready:
                k, unit = pending.pop(ready[0])
                outcomes[k] = _outcome(ready[0], unit, out)
                status = "failed" if outcomes[k].error else outcomes[k].results[0]["status"]
                say(f"[{total - len(pending)}/{total}] {unit.name}: {status} ({time.monotonic() - start:.0f} s)")
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)  # KeyboardInterrupt in the task: its build deletes its temporary folder
        say(f"interrupted: cancelling {len(pending)} build(s), waiting up to {CANCEL_SECONDS} s for them to clean up")
        ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_SECONDS)
        raise
    return outcomes


def _outcome(ref, unit: ArtifactUnit, out: Path) -> FileOutcome:
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as error:  # the worker or node died past the retries, or a bug raised
        result = {"error": _task_failure(error)}
        _remove_dead_task_leftovers(ref.task_id().hex(), out, unit.name)
    if "error" in result:
        return FileOutcome(str(unit.recipe_file), [], result["error"], name=unit.name)
    return FileOutcome(str(unit.recipe_file), [result["row"]], name=unit.name)


def _task_failure(error: Exception) -> str:
    cause = getattr(error, "cause", None)
    if isinstance(cause, Exception):
        return f"internal error in the build task: {type(cause).__name__}: {str(cause)[:500]}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"the build task failed after {TASK_RETRIES} retries: {first}"


@ray.remote(retry_exceptions=False)
def _build_artifact(
    recipe_file: str,
    name: str,
    out: str,
    device: str | None,
    options: dict,
    publish_options: dict | None,
    secret: dict[str, str],
) -> dict:
    """The Ray task: build one artifact under its lease; {"row": ...} or {"error": message}."""
    # The worker process outlives the task: the token is set for this task only.
    with environment(secret), leased(f"{out}/{name}", name, task_id()):
        try:
            results = build_file(recipe_file, names=[name], out=out, device=device, **options)
        except BuilderError as error:
            return {"error": str(error)}
        if not results:
            return {"error": f"{recipe_file} no longer defines {name} on node {node_id()[:8]}"}
        row = results[0].as_json() | {"node": node_id()}
        if publish_options is not None:
            row["publish"] = _publish(results[0].path, publish_options | {"token": secret.get("HF_TOKEN")})
    return {"row": row}


def _remove_dead_task_leftovers(task: str, out: Path, name: str) -> None:
    """After a task's last attempt died (no retry will clean up after it): remove what it left in `out`, on the node
    where it held the artifact's lease. A task that ended in Python released its lease (its build cleaned up)."""
    try:
        node = ray.get(leases_actor().holder_node.remote(f"{out}/{name}", task))
        if node is None:
            return
        # soft: when that node is gone too, any node (which sees the same shared --out) does it
        where = NodeAffinitySchedulingStrategy(node, soft=True)
        ray.get(_remove_leftovers_under_lease.options(scheduling_strategy=where).remote(str(out), name, task))
    except ray.exceptions.RayError as error:
        say(
            f"{name}: warning: could not remove {out}/.tmp-{name}-* left by its dead task ({type(error).__name__}); "
            "the next build of it does"
        )


@ray.remote(num_cpus=0, max_retries=TASK_RETRIES)
def _remove_leftovers_under_lease(out: str, name: str, task: str) -> None:
    """Under the dead task's lease (taken back as its holder), delete the temporary folders of `name` in `out`."""
    with leased(f"{out}/{name}", name, task):
        if Path(out).is_dir():
            remove_leftovers(Path(out), name)


def _publish(artifact: Path, options: dict) -> dict:
    use_network_timeouts()
    try:
        return publish(artifact, progress=say, **options).as_json()
    except BuilderError as error:
        return {"status": "failed", "error": str(error)}


# --- shared storage ----------------------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
def _sees(marker: str, token: str, files: list[str]) -> tuple[bool, list[str]]:
    """On one node: whether it reads `token` in `marker` (the submitter's --out), and which `files` it lacks."""
    try:
        sees = Path(marker).read_text() == token
    except OSError:
        sees = False
    return sees, [file for file in files if not Path(file).is_file()]


def _refuse_unshared(out: Path, recipe_files: list[Path], publish_options: dict | None) -> None:
    """On a cluster of several nodes, have each node read a marker written into `out` here and look for the recipe
    files; refuse when one does not see them."""
    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    token = secrets.token_hex(16)
    marker = out / f".builder-shared-{token[:8]}"
    marker.write_text(token)
    try:
        probes = {
            node["NodeManagerAddress"] + " " + node["NodeID"][:8]: _sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(marker), token, [str(f) for f in recipe_files])
            for node in nodes
        }
        views = {node: ray.get(ref) for node, ref in probes.items()}
    finally:
        marker.unlink(missing_ok=True)
    if problem := unshared_problem(out, views, publishing=publish_options is not None):
        raise BuilderError(problem)


def unshared_problem(out: Path, views: dict[str, tuple[bool, list[str]]], *, publishing: bool) -> str | None:
    """What is not shared, from each node's view (sees --out, recipe files it lacks); None when all is."""
    lacking = {node: missing for node, (_, missing) in views.items() if missing}
    if lacking:
        node, missing = next(iter(lacking.items()))
        return (
            f"node {node} has no {missing[0]}: on a Ray cluster the recipe files (and local source folders) must be "
            "at the same path on every node; keep them on a shared filesystem or in the image every node runs "
            "(docs/cluster.md)"
        )
    blind = [node for node, (sees, _) in views.items() if not sees]
    if blind and not publishing:
        return (
            f"--out {out} is not storage every node of the Ray cluster sees: {', '.join(blind)} cannot read what "
            "this machine writes there. Put --out on a filesystem mounted at the same path on every node (NFS, a "
            "shared volume), or add --publish so each worker publishes its artifact to the Hub (docs/cluster.md)"
        )
    return None

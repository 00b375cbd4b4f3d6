"""`builder` command line: parse, call the library, return an exit code.

Exit codes: 0 ok, 1 a known failure (bad recipe, gate failed, publish refused), 2 usage, 3 unexpected (traceback
in a log file), 130 interrupted, 141 the reader of stdout or stderr went away (`builder schema | head -1`: what a
shell reports for `cat` killed by SIGPIPE, so `set -o pipefail` scripts see the same as with other tools).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from builder.artifact import load_manifest
from builder.batch import build_files
from builder.changes import recipes_changed_since
from builder.console import configured, say
from builder.demo import run_demo
from builder.errors import BuilderError, RecipeError
from builder.fleet import artifact_units, github_matrix
from builder.gates import describe
from builder.hub.publish import publish, use_network_timeouts
from builder.hub.server import serve
from builder.interrupts import Interrupted, finished, handling_signals
from builder.inventory import CURRENT, artifact_states, format_table, write_stamp
from builder.kinds.base import footprint_threshold
from builder.plan import DISTRIBUTION, make_plan, source_problems
from builder.recipe import (
    files_defining,
    find_recipe_files,
    json_schema,
    load_recipes,
    name_clashes,
    require_unique_names,
)
from builder.report import DEFAULT_OUT as REPORT_OUT
from builder.report import write_report
from builder.reverify import reverify  # deferred: the gate imports torch
from builder.steps.gate import format_report, format_summary

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED, EXIT_CLOSED_PIPE = 0, 1, 2, 3, 130, 141


def _print_json(payload: object) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True))


def cmd_validate(args: argparse.Namespace) -> int:

    files = find_recipe_files(args.paths or ["recipes"])
    results: dict[Path, dict] = {}
    failed = False
    for file in files:
        try:
            loaded = load_recipes(file)
            # Variants share their source: one problem of it is reported once.
            problems = (
                [] if args.schema_only else list(dict.fromkeys(p for item in loaded for p in source_problems(item)))
            )
            results[file] = {
                "file": str(file),
                "ok": not problems,
                "recipes": [r.recipe.name for r in loaded],
                "problems": [p.as_json() for p in problems],
            }
            failed = failed or bool(problems)
            if problems and not args.json:
                print("\n".join(map(str, problems)))
        except RecipeError as error:
            failed = True
            results[file] = {
                "file": str(file),
                "ok": False,
                "recipes": [],
                "problems": [p.as_json() for p in error.problems],
            }
            if not args.json:
                print(error)
    for file, problem in name_clashes(files):
        failed = True
        results[file]["ok"] = False
        results[file]["problems"].append(problem.as_json())
        if not args.json:
            print(problem)
    if args.json:
        _print_json({"ok": not failed, "files": list(results.values())})
    elif not failed:
        count = sum(len(r["recipes"]) for r in results.values())
        print(f"{len(files)} file(s), {count} recipe(s): ok")
    if not files:
        print("no recipe files found", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if failed else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:

    plans = [make_plan(loaded) for loaded in load_recipes(args.recipe)]
    if args.json:
        _print_json([p.as_json() | {"thresholds": p.thresholds} for p in plans])
        return EXIT_OK
    for plan in plans:
        print(_format_plan(plan))
    return EXIT_OK


def _format_plan(plan) -> str:
    import yaml

    recipe = plan.loaded.recipe
    lines = [
        f"# {recipe.name}"
        + (f"  (variant {plan.loaded.variant} of {plan.loaded.path})" if plan.loaded.variant else ""),
        f"build hash:  {plan.build_hash}",
        f"source:      {recipe.source.model} @ {plan.source.revision}",
        f"parameters:  {plan.parameter_count:,}",
        f"source size: {_size(plan.source_bytes)}",
        f"artifact:    ~{_size(plan.expected_artifact_bytes)} (estimate)",
        *(
            [
                f"footprint:   ~{plan.expected_footprint_ratio:.4f}x the source, loaded (gate default footprint_ratio "
                f"<= {footprint_threshold(plan.expected_footprint_ratio)})"
            ]
            if plan.expected_footprint_ratio
            else []
        ),
        "versions:    " + ", ".join(f"{k} {v}" for k, v in sorted(plan.versions.items())),
        "steps:",
    ]
    for stage in plan.stages:
        peak = f"  [peak ~{_size(stage.peak_memory_bytes)}]" if stage.peak_memory_bytes else ""
        lines.append(f"  {stage.name:<11} {stage.description}{peak}")
    lines.append(f"gate:        {describe(plan.thresholds)}")
    lines += [f"warning: {w}" for w in plan.warnings]
    lines += ["resolved recipe:", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).rstrip()]
    return "\n".join(lines) + "\n"


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TiB"


def _selected_files(args: argparse.Namespace) -> list[Path]:
    """The recipe files `build` and `matrix` take: PATHS, narrowed by --changed-since and --name."""
    paths = args.paths or ["recipes"]
    every = find_recipe_files(paths)
    require_unique_names(every)
    files = recipes_changed_since(args.changed_since, paths) if args.changed_since else every
    if args.name:
        named = files_defining(args.name, every)
        files = [file for file in files if file in named]
    return files


def cmd_build(args: argparse.Namespace) -> int:

    files = _selected_files(args)
    if not files:
        print(
            f"no recipe changed since {args.changed_since}" if args.changed_since else "no recipe files found",
            file=sys.stderr,
        )
        if args.json:
            _print_json([])
        return EXIT_OK if args.changed_since else EXIT_FAILED
    options = dict(
        names=args.name,
        out=args.out,
        device=args.device,
        force=args.force,
        keep_temp=args.keep_temp,
        keep_failed=args.keep_failed,
        use_cache=not args.no_cache,
        max_gpu_memory=args.max_gpu_memory,
    )
    on_ray = args.executor == "ray"
    if args.ray_address and not on_ray:
        raise BuilderError("--ray-address is for --executor ray; add it, or drop --ray-address")
    if on_ray:
        if args.jobs > 1:
            raise BuilderError("--jobs is for --executor local; a Ray cluster runs what its resources hold")
        try:
            from builder.cluster import build_on_ray  # deferred: ray, only for --executor ray (the `ray` extra)
        except ModuleNotFoundError as error:
            if (error.name or "").partition(".")[0] != "ray":
                raise
            raise BuilderError("--executor ray needs Ray: pip install 'recipe-builder[ray]'") from None

        publish_options = (
            dict(repo=args.repo, revision=args.revision, private=args.private or None, create_pr=args.create_pr or None)
            if args.publish
            else None
        )
        outcomes = build_on_ray(files, address=args.ray_address, publish_options=publish_options, **options)
    else:
        outcomes = build_files(files, jobs=args.jobs, **options)
    rows = [{"recipe_file": o.recipe_file, **row} for o in outcomes for row in o.results]
    failed = [
        {"recipe_file": o.recipe_file, **({"name": o.name} if o.name else {}), "status": "failed", "error": o.error}
        for o in outcomes
        if o.error
    ]
    if not args.json:
        for row in rows:
            print(f"{row['name']}: {row['status']} -> {row['path']}")
            if row["status"] == "built":
                print(_gate_summary(Path(row["path"])))
    for failure in failed:
        where = f"{failure.get('name') or failure['recipe_file']}: " if len(outcomes) > 1 else ""
        print(f"error: {where}{failure['error']}", file=sys.stderr)
    publish_failed = False
    if args.publish:
        for row in rows:
            if on_ray:  # each worker published its artifact
                publish_failed = publish_failed or row["publish"]["status"] == "failed"
                if row["publish"]["status"] == "failed":
                    print(f"error: publishing {row['name']}: {row['publish']['error']}", file=sys.stderr)
                elif not args.json:
                    print(f"{row['name']}: published ({row['publish']['status']}) to {row['publish']['repo']}")
                continue
            try:
                result = _publish(Path(row["path"]), args)
            except BuilderError as error:
                publish_failed = True
                row["publish"] = {"status": "failed", "error": str(error)}
                print(f"error: publishing {row['name']}: {error}", file=sys.stderr)
                continue
            row["publish"] = result.as_json()
            if not args.json:
                _print_publish(result, Path(row["path"]))
    if args.json:
        _print_json(rows + failed)
    return EXIT_FAILED if failed or publish_failed else EXIT_OK


def cmd_matrix(args: argparse.Namespace) -> int:

    _print_json(github_matrix(artifact_units(_selected_files(args), args.name)))
    return EXIT_OK


def _gate_summary(artifact: Path) -> str:

    verification = load_manifest(artifact).verification
    return format_summary(verification) if verification is not None else "  no verification report"


def cmd_verify(args: argparse.Namespace) -> int:

    report = reverify(
        Path(args.artifact),
        write=args.write,
        device=args.device,
        use_cache=not args.no_cache,
        max_gpu_memory=args.max_gpu_memory,
    )
    if args.json:
        _print_json(report.to_json())
    else:
        print(format_report(report))
    return EXIT_OK if report.passed else EXIT_FAILED


def cmd_publish(args: argparse.Namespace) -> int:
    artifact = Path(args.artifact)
    result = _publish(artifact, args)
    if args.json:
        _print_json(result.as_json())
    else:
        _print_publish(result, artifact)
    return EXIT_OK


def _publish(artifact: Path, args: argparse.Namespace):

    use_network_timeouts()
    return publish(
        artifact,
        repo=args.repo,
        revision=args.revision,
        private=args.private or None,
        create_pr=args.create_pr or None,
        dry_run=getattr(args, "dry_run", False),
        progress=say,
    )


def _print_publish(result, artifact: Path) -> None:
    if result.status == "dry-run":
        print(
            f"would publish {len(result.uploaded)} files of {artifact} to {result.repo}@{result.revision} "
            f"({result.endpoint}):"
        )
        print("\n".join(f"  {path}" for path in result.uploaded))
        print(f"--- README.md (model card) ---\n{result.card or '(none)'}")
    elif result.status == "unchanged":
        print(f"{result.repo}@{result.revision} is up to date (commit {result.commit}); nothing pushed")
    else:
        print(
            f"published {artifact} to {result.endpoint}/{result.repo} @ {result.commit}"
            + (f" ({result.pr_url})" if result.pr_url else "")
        )


def cmd_demo(args: argparse.Namespace) -> int:

    run_demo(
        args.recipe, out=args.out, root=Path(args.root) if args.root else None, say=lambda line: print(line, flush=True)
    )
    return EXIT_OK


def cmd_hub_serve(args: argparse.Namespace) -> int:

    serve(
        Path(args.root),
        host=args.host,
        port=args.port,
        token=_hub_token(args),
        max_body_bytes=args.max_body_bytes,
        max_connections=args.max_connections,
        timeout=args.timeout,
    )
    return EXIT_OK


def _hub_token(args: argparse.Namespace) -> str | None:
    """--token, else the first line of --token-file, else $BUILDER_HUB_TOKEN, else None (no token)."""
    import os

    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise BuilderError(
                f"cannot read --token-file {args.token_file}: {getattr(error, 'strerror', error)}"
            ) from None
        if not token:
            raise BuilderError(f"--token-file {args.token_file} is empty; write the token in it")
        return token
    return args.token or os.environ.get("BUILDER_HUB_TOKEN") or None


def cmd_schema(args: argparse.Namespace) -> int:

    _print_json(json_schema())
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:

    states = artifact_states(args.paths or ["recipes"], Path(args.artifacts), names=args.name, hashes=not args.quick)
    if args.json:
        _print_json([s.as_json() for s in states])
    else:
        print(format_table(states))
    return EXIT_FAILED if any(s.state == "invalid" for s in states) else EXIT_OK


def cmd_stamp(args: argparse.Namespace) -> int:

    files = find_recipe_files(args.paths or ["recipes"])
    require_unique_names(files)
    # sizes only, as `builder build` decides what to skip: make rebuilds exactly when builder would
    [state] = artifact_states(list(files), Path(args.artifacts), names=[args.name], hashes=False)
    path = write_stamp(state, Path(args.artifacts))
    say(f"{state.name}: {'up to date' if state.state in CURRENT else state.state + ', to build'} ({path})")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:

    out, data = write_report(args.paths or ["artifacts"], args.out, x=args.x)
    if args.json:
        _print_json({"html": str(out), **data})
    else:
        count = sum(len(group["artifacts"]) for group in data["groups"])
        print(f"wrote {out}: {count} artifact(s) from {len(data['groups'])} source model(s)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="builder", description="Declarative, verified model builds from YAML recipes."
    )
    parser.add_argument("--version", action="version", version=f"builder {_own_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The commands that report progress take --quiet; bars also switch off by themselves when stderr is no terminal.
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no status lines or progress bars on stderr (errors and results still print)",
    )

    validate = commands.add_parser(
        "validate", parents=[quiet], help="check recipes (files or folders; default recipes/)"
    )
    validate.add_argument("paths", nargs="*", help="recipe files or folders")
    validate.add_argument("--json", action="store_true", help="machine-readable output")
    validate.add_argument(
        "--schema-only",
        action="store_true",
        help="check the recipe language only, not the local "
        "source folders (that they exist, and that skip_modules name modules of their checkpoint)",
    )
    validate.set_defaults(run=cmd_validate)

    plan = commands.add_parser(
        "plan", parents=[quiet], help="show the resolved recipe, build hash, steps and a preflight"
    )
    plan.add_argument("recipe", help="a recipe file")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(run=cmd_plan)

    build = commands.add_parser("build", parents=[quiet], help="build, verify and write the artifacts of recipe files")
    build.add_argument(
        "paths",
        nargs="*",
        help="recipe files or folders (default recipes/); a file with variants "
        "builds each; up-to-date artifacts are skipped",
    )
    build.add_argument(
        "--name",
        action="append",
        metavar="ARTIFACT",
        help="only the recipe (or variant) that builds this artifact; repeatable",
    )
    build.add_argument(
        "--changed-since",
        metavar="REF",
        help="only recipes whose file or `extends` parents changed since this git ref (committed or not)",
    )
    build.add_argument(
        "--jobs",
        "-j",
        type=_positive,
        default=1,
        help="builds at once, each in its own process and, when there are several GPUs, on its own GPU (default 1)",
    )
    build.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: this host (--jobs); ray: one Ray task per artifact on a Ray cluster (the `ray` extra; "
        "docs/cluster.md)",
    )
    build.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the Ray cluster to build on (default $RAY_ADDRESS, else a cluster started on this machine)",
    )
    build.add_argument(
        "--device", help="cpu, cuda or cuda:N (default: the recipe's load.device_map, else CUDA when present, else cpu)"
    )
    build.add_argument(
        "--out", default="artifacts", help="artifacts folder; each artifact goes to OUT/<name>/ (default artifacts/)"
    )
    build.add_argument("--force", action="store_true", help="rebuild even when the artifact is up to date")
    build.add_argument(
        "--keep-temp",
        action="store_true",
        help="keep the temporary build folder after a failure (until the recipe's next build)",
    )
    build.add_argument(
        "--keep-failed", action="store_true", help="keep a build that failed verification under OUT/.failed/<name>/"
    )
    _add_gate_options(build)
    build.add_argument("--json", action="store_true", help="machine-readable output")
    build.add_argument(
        "--publish",
        action="store_true",
        help="publish each artifact after it builds (HF_TOKEN, HF_ENDPOINT, HF_HUB_DISABLE_XET: see publish --help)",
    )
    _add_publish_options(build)
    build.set_defaults(run=cmd_build)

    matrix = commands.add_parser(
        "matrix",
        help="print a GitHub Actions matrix: one entry per artifact (recipe, variant, artifact, device), at most 256",
    )
    matrix.add_argument("paths", nargs="*", help="recipe files or folders (default recipes/)")
    matrix.add_argument("--name", action="append", metavar="ARTIFACT", help="only this artifact; repeatable")
    matrix.add_argument(
        "--changed-since", metavar="REF", help="only recipes whose file or `extends` parents changed since this ref"
    )
    matrix.set_defaults(run=cmd_matrix)

    verify = commands.add_parser(
        "verify", parents=[quiet], help="re-run the verification of an artifact against its recorded source"
    )
    verify.add_argument("artifact", help="an artifact folder (artifacts/<name>/)")
    verify.add_argument(
        "--write",
        action="store_true",
        help="rewrite verify-report.json and the manifest's verification and file hashes (default: change nothing)",
    )
    verify.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when present, else cpu)")
    _add_gate_options(verify)
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(run=cmd_verify)

    publish = commands.add_parser(
        "publish",
        parents=[quiet],
        help="push a verified artifact to the Hugging Face Hub (HF_ENDPOINT) in one commit",
        epilog=PUBLISH_ENVIRONMENT,
    )
    publish.add_argument("artifact", help="an artifact folder (artifacts/<name>/)")
    _add_publish_options(publish)
    publish.add_argument(
        "--dry-run", action="store_true", help="list what would be uploaded and print the card; touch nothing"
    )
    publish.add_argument("--json", action="store_true", help="machine-readable output")
    publish.set_defaults(run=cmd_publish)

    demo = commands.add_parser(
        "demo",
        parents=[quiet],
        help="build + verify SmolLM2 nf4, publish it to a local registry, load it back with transformers and generate",
    )
    demo.add_argument("--recipe", default="recipes/smollm2/nf4.yaml", help="recipe to build (default: %(default)s)")
    demo.add_argument("--out", default="artifacts", help="artifacts folder (default artifacts/)")
    demo.add_argument("--root", help="registry folder to keep (default: a temporary folder)")
    demo.set_defaults(run=cmd_demo)

    hub = commands.add_parser("hub", help="the local Hub-compatible registry").add_subparsers(
        dest="hub_command", required=True, metavar="COMMAND"
    )
    serve = hub.add_parser(
        "serve", help="serve a Hub-compatible registry from a folder (clients: HF_ENDPOINT=URL HF_HUB_DISABLE_XET=1)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8808, help="port (default 8808; 0 = any free port)")
    serve.add_argument(
        "--root", default="artifacts/.hub", help="folder the registry persists to (default artifacts/.hub)"
    )
    secret = serve.add_mutually_exclusive_group()
    secret.add_argument(
        "--token",
        help="require this bearer token for writes and private repos; visible to "
        "every user in the process list, so prefer --token-file or $BUILDER_HUB_TOKEN",
    )
    secret.add_argument(
        "--token-file",
        metavar="FILE",
        help="read the token from this file (default: $BUILDER_HUB_TOKEN; no token = every request accepted)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=_positive,
        default=5 * 1024**3,
        metavar="N",
        help="largest upload accepted (default 5 GiB; JSON bodies at most 100 MiB)",
    )
    serve.add_argument(
        "--max-connections",
        type=_positive,
        default=64,
        metavar="N",
        help="connections served at once; more get 503 (default 64)",
    )
    serve.add_argument(
        "--timeout",
        type=_positive,
        default=60,
        metavar="SECONDS",
        help="drop a client that sends or reads nothing for this long (default 60)",
    )
    serve.set_defaults(run=cmd_hub_serve)

    schema = commands.add_parser("schema", help="print the recipe JSON Schema (for editors)")
    schema.set_defaults(run=cmd_schema)

    listing = commands.add_parser(
        "list",
        parents=[quiet],
        help="recipes and the state of their artifacts (missing/stale/built/verified/up-to-date/invalid, published)",
    )
    listing.add_argument("paths", nargs="*", help="recipe files or folders (default recipes/)")
    listing.add_argument("--artifacts", default="artifacts", help="artifacts folder (default artifacts/)")
    listing.add_argument("--name", action="append", metavar="ARTIFACT", help="only this artifact; repeatable")
    listing.add_argument(
        "--quick",
        action="store_true",
        help="compare file sizes, not sha256: an artifact that passes is `up-to-date`, not `verified`",
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=cmd_list)

    report = commands.add_parser(
        "report",
        parents=[quiet],
        help="an HTML page comparing artifacts by source "
        "model: size vs quality, the Pareto front, gate thresholds, latency, failed builds",
    )
    report.add_argument(
        "paths",
        nargs="*",
        help="artifact folders or folders holding them (default artifacts/; "
        "their .failed/ builds from `build --keep-failed` are shown as failed)",
    )
    report.add_argument(
        "--out",
        default=str(REPORT_OUT),
        help="the HTML file to write (default %(default)s); card links are relative to its folder",
    )
    report.add_argument(
        "--x",
        choices=("size", "bits"),
        default="size",
        help="across the scatters: the weight footprint (default) or bits per parameter of the weight files",
    )
    report.add_argument("--json", action="store_true", help="also print the data the page is drawn from")
    report.set_defaults(run=cmd_report)

    stamp = commands.add_parser(
        "stamp",
        parents=[quiet],
        help="for make: write ARTIFACTS/.stamps/NAME.hash, dated "
        "like the artifact's manifest when it is up to date and now otherwise",
    )
    stamp.add_argument("name", help="the artifact's name (the recipe's `name`, with a variant's suffix)")
    stamp.add_argument("paths", nargs="*", help="recipe files or folders to find it in (default recipes/)")
    stamp.add_argument("--artifacts", default="artifacts", help="artifacts folder (default artifacts/)")
    stamp.set_defaults(run=cmd_stamp)
    return parser


def _positive(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (1 or more)")
    return value


def _port(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: use 0 to 65535 (0 = any free port)")
    return value


def _integer(text: str) -> int:
    digits = text.strip().lstrip("+-")
    if not (digits.isascii() and digits.isdigit()) or len(text) > 20:
        raise argparse.ArgumentTypeError(f"{text[:20]!r}{'...' if len(text) > 20 else ''} is not an integer")
    return int(text)


def _add_gate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the gate's reference outputs instead of "
        "reusing cached ones (cache: $BUILDER_CACHE_DIR/references, default ~/.cache/builder)",
    )
    parser.add_argument(
        "--max-gpu-memory",
        type=_byte_size,
        metavar="SIZE",
        help="GPU memory a build may use (e.g. 16GiB); a model larger than it is verified one decoder block at a time",
    )


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def _byte_size(text: str) -> int:
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].upper() not in _UNITS or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 16GiB, 12GB or 8000MiB")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def _add_publish_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", help="target repo org/name (default: the recipe's publish.repo)")
    parser.add_argument(
        "--revision", help="branch to push to, created when missing (default: publish.revision, else main)"
    )
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of pushing")


PUBLISH_ENVIRONMENT = (
    "environment: HF_TOKEN (a write token; else the one `hf auth login` saved), HF_ENDPOINT (the Hub to push to; "
    "default https://huggingface.co, or a `builder hub serve` URL), HF_HUB_DISABLE_XET=1 (upload through git-LFS; "
    "needed for `builder hub serve`, which has no Xet storage), BUILDER_HTTP_TIMEOUT (seconds without progress "
    "before a request is retried; default 60)."
)


def _own_version() -> str:
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_USAGE if exit_.code else EXIT_OK
    try:
        with configured(quiet=getattr(args, "quiet", False)), handling_signals():
            return args.run(args)
    except BuilderError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except Interrupted as interrupt:
        print(f"interrupted ({interrupt})", file=sys.stderr)
        return interrupt.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError as error:
        if _reader_gone():
            return EXIT_CLOSED_PIPE
        return _internal_error(error)  # a socket's, say: a bug like any other
    except Exception as error:
        return _internal_error(error)


def _internal_error(error: Exception) -> int:
    """A bug: keep the traceback in a log file, show one line."""
    where = _crash_log(traceback.format_exc())
    print(f"internal error: {type(error).__name__}: {str(error)[:500]} ({where})", file=sys.stderr)
    return EXIT_BUG


def _reader_gone() -> bool:
    """Whether stdout or stderr is a pipe nobody reads any more; each such one is pointed at /dev/null, so the
    interpreter's last flush has nowhere to fail ("Exception ignored ... BrokenPipeError", exit 120)."""
    import os
    import select

    gone = False
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # replaced by a test's capture, or closed
            continue
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        # A pipe's write end polls as an error once its last reader closed (Linux, macOS).
        if any(events & select.POLLERR for _, events in poll.poll(0)):
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
            gone = True
    return gone


def _crash_log(text: str) -> str:
    """Write a traceback to a new file of its own under the user's cache folder (the temporary folder when that
    cannot be written); says where.

    mkstemp creates the file exclusively (O_EXCL): a name planted by someone else, a symlink included, is never
    followed or overwritten, and two runs never share a file."""
    import os

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "builder" / "crash"
    prefix = f"builder-crash-{time.strftime('%Y%m%d-%H%M%S')}-"
    for folder in (cache, None):  # None: tempfile's own folder
        try:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".log", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            return f"traceback in {name}"
        except OSError as error:
            reason = error.strerror or str(error)
    return f"the traceback could not be saved: {reason}"


def main_entry() -> None:
    """Console-script entry point."""
    code = main()
    try:
        sys.stdout.flush()  # what is still buffered; a reader gone by now is the same closed pipe
    except BrokenPipeError:
        code = EXIT_CLOSED_PIPE if _reader_gone() else code
    finished()
    sys.exit(code)

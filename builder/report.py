"""`builder report`: one self-contained HTML page comparing built artifacts, grouped by source model.

Per source: a size vs quality scatter for each quality metric the gate checks (KL divergence, top-1 agreement,
perplexity ratio for causal LMs; lowest cosine and max abs difference for encoders), with the Pareto front among the
passing artifacts marked and the gate thresholds drawn as lines; latency bars (one chart per set of inputs they were
timed on) and throughput bars where the verification measured them; and a table of every figure linking each
artifact's README.md card. Builds kept by `builder build --keep-failed` (`<artifacts>/.failed/<name>/`: the files and
verify-report.json, no manifest) are drawn as failed.

`report_data` gathers what the page is drawn from (also what `--json` prints); `builder.report_page` draws it.
Reads JSON files only: no torch, no network.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Annotated, Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from builder.artifact import FAILED_DIR, Manifest, load_manifest
from builder.console import say
from builder.errors import ArtifactError, BuilderError
from builder.gates import GATES
from builder.recipe import Bnb4Bit, is_local_path
from builder.report_page import render_html
from builder.steps.gate import REPORT_FILE

REPORT_VERSION = 2  # 2: a group's `model`; a row's `latency_inputs` and `latency_inputs_id` replace `latency_basis`

# Quality metrics in the order they are charted, with their axis labels. Better is lower or higher as the gate
# bounds them (builder.gates.GATES: "max" -> lower is better); footprint_ratio is size, not quality.
QUALITY_LABELS = {
    "kl_divergence_mean": "KL divergence, mean (nats)",
    "top1_agreement": "top-1 agreement",
    "perplexity_ratio": "perplexity ratio (artifact / source)",
    "cosine_min": "cosine similarity, lowest",
    "max_abs_diff": "max abs difference",
}
_GATE_OF = {gate.metric: (key, gate.direction) for key, gate in GATES.items()}
# A failed build's config.json is matched to a built artifact's without what quantizing or exporting changes.
_BUILD_CONFIG_KEYS = {"quantization_config", "dtype", "torch_dtype", "transformers_version", "_name_or_path"}
_WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx_data", ".bin")
# `--x`: what the scatters put across, as (row field, axis label). The footprint is what loading costs in memory
# (every build records it); bits per parameter counts the weight files on disk, so it shows what double
# quantization saves (ONNX exports do not record it and are left off that axis).
X_AXES = {
    "size": ("size_bytes", "artifact weight footprint"),
    "bits": ("weight_bits_per_param", "bits per parameter (weight files)"),
}
# A figure the page draws: a finite number within +-1e18 (an exabyte; no measurement comes near), so no scale overflows;
# a file with anything else where a figure goes (NaN, 1e308, "0.5") is left out of the page with the reason.
_FIGURE_LIMIT = 1e18
_Figure = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-_FIGURE_LIMIT, le=_FIGURE_LIMIT)]


class _Read(BaseModel):
    """What the report reads of a file, checked once when it is read; other fields are not its concern."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class _Failure(_Read):
    metric: str | None = None
    message: str


class _Performance(_Read):
    candidate_latency_ms: _Figure | None = None
    reference_latency_ms: _Figure | None = None
    candidate_throughput_tokens_per_s: _Figure | None = None
    reference_throughput_tokens_per_s: _Figure | None = None
    candidate_footprint_bytes: _Figure | None = None
    reference_footprint_bytes: _Figure | None = None
    latency_tokens: Annotated[int, Field(strict=True, ge=0)] | None = None


class _Inputs(_Read):
    """What the verification fed: the evaluation text (by digest) and the prompts."""

    eval_text_sha256: str | None = None
    prompts: list[str] | None = None


class _Verification(_Read):
    """The fields of a verification report (verify-report.json, a manifest's `verification`) the page shows."""

    passed: bool = False
    task: str | None = None
    device: str | None = None
    provider: str | None = None
    metrics: dict[str, _Figure | None] | None = None
    thresholds: dict[str, _Figure] | None = None
    failures: list[_Failure] | None = None
    performance: _Performance | None = None
    inputs: _Inputs | None = None


class _Footprint(_Read):
    source_bytes: _Figure
    artifact_bytes: _Figure


class _Built(_Read):
    """What the page reads of a manifest beyond what `Manifest` checks (its floats may be NaN or 1e308, its
    verification any JSON object)."""

    verification: _Verification | None = None
    footprint: _Footprint | None = None
    bits_per_param: _Figure | None = None


def _invalid(error: ValidationError) -> str:
    """The first problem pydantic found, located: `thresholds.kl_divergence: Input should be a finite number (nan)`."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    got = repr(first["input"])
    message = first["msg"].split(" or instance of ")[0]  # the model's class name means nothing to a reader
    return f"{where}: {message} ({got[:40] + '...' if len(got) > 40 else got})"


DEFAULT_OUT = Path("artifacts") / "report.html"
"""Where the page goes by default: beside the artifacts (git-ignored), not into the folder a command runs in."""


def write_report(paths: list[str | Path], out: str | Path = DEFAULT_OUT, *, x: str = "size") -> tuple[Path, dict]:
    """Write the HTML report of the artifacts under `paths` to `out`; returns its path and the data drawn. `x`
    names what the scatters put across (a key of X_AXES)."""

    out = Path(out)
    data = report_data(paths, out.parent, x=x)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(data), encoding="utf-8")
    return out, data


def report_data(paths: list[str | Path], link_base: str | Path = ".", *, x: str = "size") -> dict:
    """Everything the report shows, by source model; card links are relative to `link_base` (the page's folder).
    Raises BuilderError when `paths` hold no artifact."""
    if x not in X_AXES:
        raise BuilderError(f"--x {x!r} is not one of {', '.join(X_AXES)}")
    field, label = X_AXES[x]
    built, failed = find_artifacts([Path(p) for p in paths])
    if not built and not failed:
        shown = ", ".join(str(p) for p in paths)
        raise BuilderError(
            f"no artifacts under {shown}: build some with `builder build` (or pass artifact folders, "
            "or folders holding them)"
        )
    rows: list[dict] = []
    skipped: list[dict] = []
    signatures: dict[str | None, dict] = {}
    for folder in built:
        try:
            row = _built_row(folder, load_manifest(folder), Path(link_base))
        except ValidationError as error:
            skipped.append(_skip(folder, f"manifest.json cannot be read ({_invalid(error)})"))
            continue
        except (ArtifactError, OSError) as error:
            skipped.append(_skip(folder, f"manifest.json cannot be read ({error})"))
            continue
        rows.append(row)
        signatures.setdefault(_config_signature(folder), {})[_source_key(row)] = (row["source"], row["revision"])
    by_name = {row["name"]: row for row in rows}
    for folder in failed:
        try:
            rows.append(_failed_row(folder, signatures, Path(link_base), by_name))
        except ValidationError as error:
            skipped.append(_skip(folder, f"{REPORT_FILE} cannot be read ({_invalid(error)})"))
        except (OSError, ValueError) as error:  # not JSON, not UTF-8, unreadable
            skipped.append(_skip(folder, f"{REPORT_FILE} cannot be read ({error})"))
    # One group per source revision (a local folder's is its content digest): the same weights reached by two
    # relative paths are one source, two revisions of one Hub repo are two.
    groups: dict[str | None, list[dict]] = {}
    for row in rows:
        groups.setdefault(_source_key(row), []).append(row)
    return {
        "report_version": REPORT_VERSION,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "x": {"axis": x, "field": field, "label": label},
        "groups": [_group(members, field) for _, members in sorted(groups.items(), key=_unknown_last)],
        "skipped": skipped,
    }


def _skip(folder: Path, reason: str) -> dict:
    say(f"report: leaving out {folder}: {reason}")
    return {"path": str(folder), "reason": reason}


def find_artifacts(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(built artifact folders, failed build folders) under `paths`: each path is an artifact, a kept failed build,
    or a folder holding them (and its `.failed/`); other dot folders (temporary builds, stamps) are left out."""
    built, failed = [], []
    for path in paths:
        if not path.is_dir():
            raise BuilderError(
                f"{path} is not a folder: pass artifact folders or folders holding them (default artifacts/)"
            )
        if (path / "manifest.json").is_file():
            built.append(path)
        elif (path / REPORT_FILE).is_file():
            failed.append(path)
        else:
            children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            built += [p for p in children if (p / "manifest.json").is_file()]
            kept = path / FAILED_DIR
            if kept.is_dir():
                failed += sorted(p for p in kept.iterdir() if p.is_dir() and (p / REPORT_FILE).is_file())
    return _unique(built), _unique(failed)


def _unique(folders: list[Path]) -> list[Path]:
    """Resolved, without repeats (a folder passed both itself and through its parent), in order."""
    return list(dict.fromkeys(p.resolve() for p in folders))


def _built_row(folder: Path, manifest: Manifest, link_base: Path) -> dict:
    # Python mode keeps NaN as NaN (JSON mode would write it as null, and the check would pass it).
    built = _Built.model_validate(manifest.model_dump(exclude_unset=True))
    verification = built.verification or _Verification()
    return _row(
        folder,
        manifest.name,
        "passed" if verification.passed else "failed",
        verification,
        origin="artifact",
        source=manifest.source.model,
        revision=manifest.source.revision,
        size=built.footprint.artifact_bytes if built.footprint else None,
        source_bytes=built.footprint.source_bytes if built.footprint else None,
        bits=built.bits_per_param,
        method=_method(manifest.recipe),
        built_at=manifest.built_at,
        device=manifest.device,
        card=_link(folder / "README.md", link_base),
    )


def _failed_row(folder: Path, signatures: dict, link_base: Path, built_rows: dict) -> dict:
    """A kept failed build: only its files and verify-report.json (the manifest is written after the gate). Its
    source is the one whose built artifacts have the same config.json, when exactly one does."""
    report = _Verification.model_validate_json((folder / REPORT_FILE).read_bytes())
    matches = list(signatures.get(_config_signature(folder), {}).values())
    source, revision = matches[0] if len(matches) == 1 else (None, None)
    performance = report.performance or _Performance()
    size = performance.candidate_footprint_bytes or _weight_bytes(folder) or None
    row = _row(
        folder,
        folder.name,
        "failed",
        report,
        origin="kept failed build",
        source=source,
        revision=revision,
        size=size,
        source_bytes=performance.reference_footprint_bytes,
        bits=None,
        method=_config_method(folder),
        built_at=_mtime(folder / REPORT_FILE),
        device=report.device,
        card=_link(folder / REPORT_FILE, link_base),
    )
    later = built_rows.get(folder.name)
    # A failed build stays in .failed/ after a later build of the same name passes; it no longer describes a choice.
    row["superseded"] = bool(later and later["status"] == "passed" and (later["built_at"] or "") > row["built_at"])
    return row


def _row(
    folder: Path,
    name: str,
    status: str,
    verification: _Verification,
    *,
    origin: str,
    source,
    revision,
    size,
    source_bytes,
    bits,
    method,
    built_at,
    device,
    card,
) -> dict:
    performance = verification.performance or _Performance()
    metrics = {k: v for k, v in (verification.metrics or {}).items() if v is not None}
    failures = verification.failures or []
    return {
        "name": name,
        "status": status,
        "origin": origin,
        "path": str(folder),
        "card": card,
        "source": source,
        "revision": revision,
        "task": verification.task,
        "method": method,
        "size_bytes": size,
        "source_bytes": source_bytes,
        "bits_per_param": bits,
        "weight_bits_per_param": metrics.get("bits_per_param"),
        "metrics": metrics,
        "thresholds": verification.thresholds or {},
        "failures": [f.message for f in failures],
        "failed_metrics": [f.metric for f in failures],
        "latency_ms": performance.candidate_latency_ms,
        **_latency_inputs(name, verification),
        "reference_latency_ms": performance.reference_latency_ms,
        "throughput_tokens_per_s": performance.candidate_throughput_tokens_per_s,
        "reference_throughput_tokens_per_s": performance.reference_throughput_tokens_per_s,
        "device": verification.provider or device,
        "built_at": built_at,
        "superseded": False,
    }


def _latency_inputs(name: str, verification: _Verification) -> dict[str, str]:
    """What the latency was timed on, in words (`latency_inputs`) and as a key equal only for the same inputs
    (`latency_inputs_id`): latencies of different inputs are not comparable. The transformers verifier times
    `latency_tokens` tokens of the evaluation text at batch 1; the ONNX verifier times its prompts."""
    tokens = (verification.performance or _Performance()).latency_tokens
    inputs = verification.inputs or _Inputs()
    if tokens:
        text = inputs.eval_text_sha256 or ""
        return {"latency_inputs": f"{tokens} tokens, batch 1", "latency_inputs_id": f"tokens:{tokens}:{text}"}
    if inputs.prompts:
        digest = hashlib.sha256(json.dumps(inputs.prompts).encode()).hexdigest()
        return {
            "latency_inputs": f"the {len(inputs.prompts)} verification prompts #{digest[:8]}",
            "latency_inputs_id": f"prompts:{digest}",
        }
    return {"latency_inputs": "inputs not recorded", "latency_inputs_id": f"unknown:{name}"}


def _source_key(row: dict) -> str | None:
    return row["revision"] or row["source"]


def _unknown_last(item: tuple[str | None, list[dict]]) -> tuple:
    key, rows = item
    return key is None, rows[0]["source"] or "", key or ""


def _group(rows: list[dict], x_field: str) -> dict:
    # The shortest of the source paths its manifests record names the group (one folder, two relative paths).
    sources = sorted({r["source"] for r in rows if r["source"]}, key=lambda s: (len(s), s)) or [None]
    rows = sorted(rows, key=lambda r: (r[x_field] is None, r[x_field] or 0, r["name"]))
    charts = []
    for metric, label in QUALITY_LABELS.items():
        key, bound = _GATE_OF[metric]
        gated = [r for r in rows if key in r["thresholds"]]
        if not gated or not any(metric in r["metrics"] for r in gated):
            continue
        higher = bound == "min"
        lines: dict[float, list[str]] = {}
        for r in gated:
            lines.setdefault(r["thresholds"][key], []).append(r["name"])
        points = [
            (r["name"], r[x_field], r["metrics"].get(metric))
            for r in rows
            if r["status"] == "passed" and not r["superseded"]
        ]
        charts.append(
            {
                "metric": metric,
                "label": label,
                "gate": key,
                "better": "higher" if higher else "lower",
                "thresholds": [
                    {"value": v, "bound": "min" if higher else "max", "artifacts": sorted(names)}
                    for v, names in sorted(lines.items())
                ],
                "pareto": sorted(pareto_front(points, higher_is_better=higher)),
            }
        )
    # A built artifact's manifest measures the source's weights; a kept failed build only its loaded footprint.
    source_sizes = [r["source_bytes"] for r in rows if r["source_bytes"] and r["origin"] == "artifact"] or [
        r["source_bytes"] for r in rows if r["source_bytes"]
    ]
    return {
        "model": model_name(sources[0]),
        "source": sources[0],
        "source_aliases": sources[1:],
        "revision": rows[0]["revision"],
        "task": next((r["task"] for r in rows if r["task"]), None),
        "source_bytes": max(source_sizes) if source_sizes else None,
        "charts": charts,
        "artifacts": rows,
    }


def model_name(source: str | None) -> str | None:
    """What a source is called: a Hub id as it is, a local folder by its folder name (`../../models/x` -> `x`; not
    config.json's `_name_or_path`, which may name the model it was fine-tuned from)."""
    if source is None or not is_local_path(source):
        return source
    return PurePosixPath(source.replace("\\", "/").rstrip("/")).name or source


def pareto_front(points: list[tuple[str, float | None, float | None]], *, higher_is_better: bool) -> set[str]:
    """Names of the points (name, size, quality) that no other point dominates: none is at most as large and at
    least as good with one of the two strictly better. Equal points do not dominate each other (both stay);
    points missing a size or a quality are left out."""
    known = [
        (name, size, quality if higher_is_better else -quality)
        for name, size, quality in points
        if size is not None and quality is not None
    ]
    return {
        name
        for name, size, quality in known
        if not any(s <= size and q >= quality and (s < size or q > quality) for _, s, q in known)
    }


def _config(folder: Path) -> dict[str, Any]:
    """The folder's config.json, or {} when it has none that is a JSON object (the page does without it)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _config_signature(folder: Path) -> str | None:
    config = _config(folder)
    if not config:
        return None
    return json.dumps({k: v for k, v in config.items() if k not in _BUILD_CONFIG_KEYS}, sort_keys=True)


DEFAULT_BLOCKSIZE = Bnb4Bit.model_fields["blocksize"].default


def _method(recipe: dict[str, Any]) -> str | None:
    """What the build did, in a few words: "bnb-4bit nf4 dq", "bnb-8bit", "onnx float32 dynamic-int8"."""
    if isinstance(quantize := recipe.get("quantize"), dict):
        words = [quantize.get("method"), quantize.get("quant_type"), "dq" if quantize.get("double_quant") else None]
        if quantize.get("blocksize", DEFAULT_BLOCKSIZE) != DEFAULT_BLOCKSIZE:
            words.append(f"blocksize {quantize['blocksize']}")
    elif isinstance(export := recipe.get("export"), dict):
        words = [export.get("format"), export.get("dtype"), export.get("quantize")]
        words = [w for w in words if w != "none"]
    else:
        return None
    return " ".join(str(w) for w in words if w)


def _config_method(folder: Path) -> str | None:
    """The failed build's method from its config.json's quantization_config (bitsandbytes), else None."""
    quantization = _config(folder).get("quantization_config")
    if not isinstance(quantization, dict):
        return None
    if quantization.get("load_in_4bit"):
        quant_type, double = quantization.get("bnb_4bit_quant_type"), quantization.get("bnb_4bit_use_double_quant")
        words = ["bnb-4bit", quant_type, "dq" if double else None]
    elif quantization.get("load_in_8bit"):
        words = ["bnb-8bit"]
    else:
        words = [quantization.get("quant_method")]
    return " ".join(str(w) for w in words if w) or None


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")


def _link(target: Path, base: Path) -> str:
    """`target` as a URL relative to the page's folder `base` (the page may be moved along with the artifacts)."""
    return quote(Path(os.path.relpath(target.resolve(), base.resolve())).as_posix())

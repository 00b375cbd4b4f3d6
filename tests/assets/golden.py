"""Manifests of four shipped recipes' artifacts, kept in tests/assets/golden/, and the comparison that says a build
today describes the same artifact: a refactor must leave them equal (issue 12 checked its refactor against the
manifests built before it); a change that alters artifacts on purpose regenerates them, and its commit says why:

    for r in minilm/int8 minilm/nf4 minilm/onnx-cpu smollm2/nf4; do
        builder build recipes/$r.yaml --out /tmp/golden --device cpu --force; done
    cp /tmp/golden/<name>/manifest.json tests/assets/golden/<name>.json

Last regenerated for issues 13 and 16 (sentence-transformers files, MiniLM streamed, the footprint bound derived from
the plan, source.base_model); issue 15 added the ONNX report's `placement` to the MiniLM ONNX manifest (only that key,
from a build of it); issue 19 added the gate workers' `stages`, the candidate's `overlapped` and
`performance.compare_seconds` to the three bitsandbytes manifests (only those keys, from builds of them), and
regenerated the MiniLM ONNX manifest when O2 gained onnxscript's fusions (6 Attention nodes: a new graph); issue 28
moved the three bitsandbytes manifests to version 3 without a build (the same artifacts): their recipes gained
`quantize.allow_unquantized_experts: false`, `weight_share` is the plan's (from the source's headers) and
`bits_per_param` the bits per parameter reached (the weight files in their `files` table over the source's parameters;
it was `quantized_layers.bits_per_param` again). What may differ: when and where it was built and with which versions
(build hash, versions, device, dates, timings, latencies, the gate workers' stages, the reference's cache key and
whether it came from the cache), the four files that carry those (README.md, recipe.lock.yaml, verify-report.json and,
since issue 31, .eval_results/builder-gate.yaml, whose entry each golden took from a build of it at 1295fec), under
another transformers release than the golden's the files it stamps with its version (config.json,
generation_config.json) and the content digest of a local source converted with it (transformers 5.25.0 moved both),
and the gate's metrics within 5% (the CPU's instruction set changes bfloat16 kernels: a host without AVX-512 moved
SmolLM2 nf4's top-1 agreement by 0.4% and its greedy continuations by a token), the greedy token counts compared by
prompt count only and `greedy_match` by name, the gate's `intervals` and `interval_verdicts` (issue 31; the goldens
predate them: they are derived from the metrics, which are compared) by metric name where the golden has them; the
ONNX gate's metric values and prompts are compared by name only, its placement by the provider it was measured on and
the providers that ran nodes (the counts per op type follow onnxruntime's fusions, which change with its version).
Everything else must be equal: the recipe, the source, the footprints, bits per parameter, the quantize path, the
layers, the ONNX record and every weight file's sha256.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"
# manifest_version (and the report's report_version): the ONNX golden is a version-1 manifest, which holds the same
# fields as version 2 and reads as written; the bitsandbytes ones are version 3 (builder.artifact.MANIFEST_VERSION).
# The share of greedy tokens that match is taken over continuations cut at their first end token, so one token that
# the CPU's bfloat16 kernels flip changes its denominator too: 4ba81e6 itself scores SmolLM2 nf4 0.294 (5 of 17) on
# an AVX-512 host where the golden has 0.241 (7 of 29). Compared like the greedy token counts: by name.
_GREEDY_METRICS = ("greedy_match",)
_BUILD_CONDITIONS = ("manifest_version", "build_hash", "versions", "device", "device_uuid", "built_at", "timings")
_DESCRIBE_THE_BUILD = ("README.md", "recipe.lock.yaml", "verify-report.json", ".eval_results/builder-gate.yaml")
# save_pretrained writes `transformers_version` into these: under another transformers release their hashes differ,
# and so does the digest of a source that tests/assets/make_models.py converted with it (SmolLM2 from its GGUF).
_VERSION_STAMPED = ("config.json", "generation_config.json")


def differences(built: dict, name: str) -> list[str]:
    """How the manifest `built` differs from the golden one of artifact `name` (empty: the same artifact)."""
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    stamped = built.get("versions", {}).get("transformers") != golden.get("versions", {}).get("transformers")
    found = []
    if set(built) != set(golden):
        found.append(f"keys: {sorted(set(built) ^ set(golden))}")
    for key in sorted(set(built) & set(golden)):
        if key in _BUILD_CONDITIONS:
            continue
        new, old = built[key], golden[key]
        if key == "recipe_files":
            if len(new) != len(old) or not all(n.endswith(o) for n, o in zip(new, old, strict=True)):
                found.append(f"recipe_files: {new} != {old}")
        elif key == "files":
            if set(new) != set(old):
                found.append(f"files: {sorted(set(new) ^ set(old))}")
            found += [
                f"files.{f}: sha256 differs"
                for f in sorted(set(new) & set(old))
                if f not in _DESCRIBE_THE_BUILD and not (stamped and f in _VERSION_STAMPED) and new[f] != old[f]
            ]
        elif key == "source" and stamped and str(old.get("revision", "")).startswith("sha256:"):
            if {k: v for k, v in new.items() if k != "revision"} != {k: v for k, v in old.items() if k != "revision"}:
                found.append(f"source: {new!r} != {old!r}")
        elif key == "verification":
            found += _report_differences(new, old, onnx=built.get("kind") == "export")
        elif key == "onnx":
            if {k: v for k, v in new.items() if k != "timings"} != {k: v for k, v in old.items() if k != "timings"}:
                found.append("onnx record differs")
        elif new != old:
            found.append(f"{key}: {new!r} != {old!r}")
    return found


_INTERVALS = ("intervals", "interval_verdicts")


def _report_differences(new: dict, old: dict, *, onnx: bool) -> list[str]:
    new, old = ({k: v for k, v in report.items() if k != "report_version"} for report in (new, old))
    if not any(key in old for key in _INTERVALS):
        new = {k: v for k, v in new.items() if k not in _INTERVALS}
    found = []
    if set(new) != set(old):
        found.append(f"verification keys: {sorted(set(new) ^ set(old))}")
    for key in sorted(set(new) & set(old)):
        a, b = new[key], old[key]
        if key in ("performance", "outputs", *_INTERVALS):
            if set(a) != set(b):
                found.append(f"verification.{key} keys differ")
        elif key == "metrics":
            if set(a) != set(b):
                found.append(f"verification.metrics keys: {sorted(set(a) ^ set(b))}")
            elif not onnx:
                found += [
                    f"verification.metrics.{m}: {a[m]} != {b[m]}"
                    for m in a
                    if m not in _GREEDY_METRICS and not _close(a[m], b[m], rel=0.05)
                ]
        elif key == "inputs" and onnx:
            if set(a) != set(b):
                found.append("verification.inputs keys differ")
        elif key == "placement":  # node counts follow onnxruntime's fusions, which change with its version
            if (a["measured_on"], sorted(a["nodes"])) != (b["measured_on"], sorted(b["nodes"])):
                found.append(
                    f"verification.placement: {a['measured_on']} {sorted(a['nodes'])} != "
                    f"{b['measured_on']} {sorted(b['nodes'])}"
                )
        elif key == "inputs":
            found += [
                f"verification.inputs.{k} differs"
                for k in set(a) | set(b)
                if not (
                    _same_length(a.get(k), b.get(k)) if k.startswith("greedy_tokens") else _close(a.get(k), b.get(k))
                )
            ]
        elif key in ("reference", "candidate"):
            if _without_conditions(a) != _without_conditions(b):
                found.append(f"verification.{key}: {_without_conditions(a)!r} != {_without_conditions(b)!r}")
        elif a != b:
            found.append(f"verification.{key}: {a!r} != {b!r}")
    return found


def _without_conditions(run: dict) -> dict:
    """A gate run's record without what depends on the build's conditions: its stages' durations, the reference's
    cache key (it hashes the code and versions) and whether it came from the cache."""
    return {k: v for k, v in run.items() if k not in ("stages", "key", "cached")}


def _same_length(a, b) -> bool:
    return isinstance(a, list) and isinstance(b, list) and len(a) == len(b)


def _close(a, b, rel: float = 1e-3) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-6)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b, strict=True))
    return a == b

"""The model card (README.md) of an artifact, rendered from its manifest alone.

The YAML block is huggingface_hub's `ModelCardData` (base_model + base_model_relation so the Hub links the card to
its source, library_name, pipeline_tag, license, tags); the body says how to load the model with stock libraries,
what was done to it, how well it matched the source, what it costs, and exactly how to rebuild it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from builder.artifact import REACHED_BITS_VERSION, Manifest
from builder.errors import Location, Problem
from builder.gates import GATES, bounds_by_metric
from builder.kinds import block_of, kind_of
from builder.recipe import REPO_ID_PATTERN, LoadedRecipe, is_local_path
from builder.recipe.licenses import card_license_problems
from builder.tasks import AUTO_CLASSES, BARE_MODEL_TASK, family
from builder.verification import VerificationReport

# optimum task -> the Hub's pipeline_tag, where the two names differ (None: the Hub has no such pipeline).
_PIPELINE_TAGS = {
    "semantic-segmentation": "image-segmentation",
    "audio-frame-classification": "audio-classification",
    "audio-xvector": None,
    "masked-im": None,
    "multiple-choice": None,
    "image-to-image": "image-to-image",
}


def render_card(manifest: Manifest, *, repo_id: str | None = None, folder: Path | None = None) -> str:
    """README.md for the artifact `manifest` describes. `repo_id` (default: the recipe's `publish.repo`) is the
    repo the usage snippets load from; `folder`, the artifact's folder, says how they pool and prompt (its
    sentence-transformers config, its chat template)."""
    from huggingface_hub import ModelCard

    recipe = manifest.recipe
    repo_id = repo_id or (recipe.get("publish") or {}).get("repo") or f"<org>/{manifest.name}"
    sections = [
        f"# {manifest.name}",
        _summary(manifest),
        *(["## Warnings\n\n" + "\n".join(f"- {w}" for w in manifest.warnings)] if manifest.warnings else []),
        "## Usage\n\n" + _usage(manifest, repo_id, folder),
        "## Build settings\n\n" + _settings(manifest),
        "## Verification\n\n" + _verification(manifest.verification) + _placement(manifest),
        "## Size\n\n" + _size(manifest),
        "## Reproduce\n\n" + _reproduce(manifest),
    ]
    extra = (recipe.get("publish") or {}).get("card")
    if extra:
        sections.append(extra.strip())
    body = "\n\n".join(sections) + "\n"
    return str(ModelCard(f"---\n{_card_data(manifest).to_yaml()}\n---\n\n{body}"))


def _card_data(manifest: Manifest):
    from huggingface_hub import ModelCardData

    recipe, task = manifest.recipe, manifest.source.task
    inherited = source_card(manifest)
    fields: dict = {
        "library_name": manifest.library_name,
        "pipeline_tag": inherited.get("pipeline_tag") or (_PIPELINE_TAGS.get(task, task) if task else None),
        "license": (recipe.get("publish") or {}).get("license") or inherited.get("license"),
        "language": inherited.get("language"),
        "datasets": inherited.get("datasets"),
        "tags": _tags(recipe),
    }
    base_model = base_model_of(manifest)
    if base_model:
        fields["base_model"] = base_model
        if _is_quantized(recipe):
            fields["base_model_relation"] = "quantized"
    if results := _eval_results(manifest, fields["pipeline_tag"] or task or BARE_MODEL_TASK):
        fields |= {"model_name": manifest.name, "eval_results": results}
    return ModelCardData(**{key: value for key, value in fields.items() if value is not None})


def base_model_of(manifest: Manifest) -> str | None:
    """The Hub repo the artifact derives from: the recipe's `source.base_model`, else the Hub source's id, else the
    `base_model` of a local source folder's README.md front matter; None when none says (never a guess from
    config.json, whose `_name_or_path` may name a grandparent or nothing)."""
    declared = (manifest.recipe.get("source") or {}).get("base_model")
    if declared:
        return declared
    if not is_local_path(manifest.source.model):
        return manifest.source.model
    found = source_card(manifest).get("base_model")
    if isinstance(found, list) and len(found) == 1:
        found = found[0]
    return found if isinstance(found, str) and "/" in found and REPO_ID_PATTERN.match(found) else None


EVAL_DATASET = "builder/eval_text"
"""The evaluation data the gate compares on: builder/data/eval_text.txt (three public-domain texts) and the
recipe's prompts; the card names it with the sha256 the report recorded."""


def _eval_results(manifest: Manifest, task: str) -> list:
    """The gate's metrics as model-index results: each metric it computed, against the evaluation data it used,
    marked verified only when the gate passed."""
    from huggingface_hub import EvalResult

    report = manifest.verification
    if report is None:
        return []
    digest = (report.inputs or {}).get("eval_text_sha256")
    return [
        EvalResult(
            task_type=task,
            dataset_type=EVAL_DATASET,
            dataset_name="builder evaluation text and prompts",
            dataset_revision=digest,
            metric_type=_METRIC_NAMES.get(metric, metric),
            metric_value=value,
            verified=False,
            metric_config="compared with the source model" + ("" if report.passed else " (gate FAILED)"),
        )
        for metric, value in sorted(report.metrics.items())
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


# The gate's `bits_per_param` counts every weight file over the parameters of the loaded model; its Hub name says
# so, apart from the quantized layers' figure the card's Size section also shows.
_METRIC_NAMES = {"bits_per_param": "weight_file_bits_per_param"}


EVAL_RESULTS_FILE = ".eval_results/builder-gate.yaml"
"""Where the artifact holds the gate's results in the Hub's format: a YAML file in huggingface_hub's
`EVAL_RESULTS_FOLDER` (the Hub aggregates every `.eval_results/*.yaml` it finds); the card's `model-index` keeps them
as well, for readers of the older format."""


def eval_results_files(manifest: Manifest) -> dict[str, str]:
    """The artifact's `.eval_results/*.yaml` files (path -> text): the gate's results, {} when it gated no number."""
    import huggingface_hub

    # The interop environment (make test-interop) installs builder without its dependencies beside transformers
    # 4.57's huggingface_hub 0.x, below the range pyproject admits; its artifacts keep their results in model-index.
    if manifest.verification is None or not hasattr(huggingface_hub, "EvalResultEntry"):
        return {}
    entries = gate_eval_results(manifest.verification, reference=reference_model(manifest), date=manifest.built_at)
    if not entries:
        return {}
    from huggingface_hub import eval_result_entries_to_yaml

    return {EVAL_RESULTS_FILE: yaml.safe_dump(eval_result_entries_to_yaml(entries), sort_keys=False, width=2**16)}


def gate_eval_results(report: VerificationReport, *, reference: str, date: str) -> list:
    """One huggingface_hub `EvalResultEntry` (present since 1.33, the oldest huggingface_hub we admit) per metric the
    gate `report` held to a threshold: the evaluation data as the dataset (`EVAL_DATASET`, at the sha256 the report
    recorded), the metric as its task id, and in the notes the model's task, the `reference` it was compared with,
    the threshold and the verdict. The entry format has no metric field, so the metric is the task id."""
    from huggingface_hub import EvalResultEntry

    failed = {failure.metric for failure in report.failures}
    digest = (report.inputs or {}).get("eval_text_sha256")
    entries = []
    for key, bound in report.thresholds.items():
        gate = GATES[key]
        metric = gate.metric
        value = report.metrics.get(metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        verdict = "failed" if metric in failed else "passed"
        notes = f"task {report.task}; compared with {reference}; gate {gate.sign} {_number(bound)}: {verdict}"
        entries.append(
            EvalResultEntry(
                dataset_id=EVAL_DATASET,
                task_id=_METRIC_NAMES.get(metric, metric),
                value=value,
                dataset_revision=digest,
                date=date,
                notes=notes,
            )
        )
    return sorted(entries, key=lambda entry: entry.task_id)


def reference_model(manifest: Manifest) -> str:
    """The source model the gate compared with, as a reader outside the build host can name it: a Hub repo at its
    commit, or a local folder by its content digest (and the Hub repo it copies, where known), never by its path."""
    source = manifest.source
    if not source.revision.startswith("sha256:"):
        return f"the source model {source.model} at revision {source.revision}"
    base = base_model_of(manifest)
    return f"the source model, a local copy{f' of {base}' if base else ''} with content digest {source.revision}"


_INHERITED = ("base_model", "license", "language", "datasets", "pipeline_tag")


def front_matter(card: str) -> str | None:
    """The YAML metadata block of a card's text as the Hub finds it, None when it has none. The pattern is
    huggingface_hub's `REGEX_YAML_BLOCK`, the Hub server's own: the block ends at the first line that is `---`, so a
    `---` inside a value does not end it. Only the text: the registry parses it with its own bounds (`card_yaml`)."""
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    match = REGEX_YAML_BLOCK.search(card)
    return match.group(2) if match else None


def source_card(manifest: Manifest) -> dict:
    """The fields of `_INHERITED` in the front matter of a local source folder's README.md ({} when the source is
    a Hub repo, or the folder has no card or none that parses)."""
    model = manifest.source.model
    if not is_local_path(model):
        return {}
    for recipe_file in manifest.recipe_files:
        if (fields := _folder_card(Path(recipe_file).parent / Path(model).expanduser())) is not None:
            return fields
    return {}


def _folder_card(folder: Path) -> dict | None:
    """The fields of `_INHERITED` in `folder`/README.md's front matter: {} when it has none that parses, None when
    there is no README.md to read."""
    try:
        text = (folder / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        front = yaml.safe_load(front_matter(text) or "")
    except yaml.YAMLError:
        return {}
    return {key: front[key] for key in _INHERITED if isinstance(front, dict) and front.get(key)}


def inherited_license_problem(loaded: LoadedRecipe) -> Problem | None:
    """Why the license the artifact's card would inherit from the local source folder's README.md is not one the
    Hub accepts (located at `source.model`), checked before a build as `publish.license` is; None when the recipe
    sets `publish.license` (which overrides it), the source is a Hub repo, or the source card names none or a good
    one."""
    folder = loaded.source_path
    if folder is None or (loaded.recipe.publish is not None and loaded.recipe.publish.license is not None):
        return None
    return source_card_license_problem(folder, loaded.where(("source", "model")))


def source_card_license_problem(folder: Path, where: Location) -> Problem | None:
    """Why the license of the source card `folder`/README.md is not one the Hub accepts, located at `where`
    (`source.model`); None when the card names none or a good one."""
    inherited = (_folder_card(folder) or {}).get("license")
    if inherited is None or not (problems := card_license_problems(inherited)):
        return None
    return Problem(
        where,
        "source.model",
        f"the artifact's card would inherit `license` from the source card {folder / 'README.md'}: "
        f"{'; '.join(problems)}. Set `publish.license` in the recipe to override the source card's, or fix the "
        "source card",
    )


def _is_quantized(recipe: dict) -> bool:
    return kind_of(recipe).quantized(block_of(recipe))


def _tags(recipe: dict) -> list[str]:
    tags = ["builder", *kind_of(recipe).card_tags(block_of(recipe))]
    tags += list((recipe.get("publish") or {}).get("tags") or ())
    return list(dict.fromkeys(tags))


def _summary(manifest: Manifest) -> str:
    recipe, source = manifest.recipe, manifest.source
    what = kind_of(recipe).card_summary(block_of(recipe))
    passed = manifest.passed
    origin = (
        f"a local copy{f' of `{base}`' if (base := base_model_of(manifest)) else ''} (content digest "
        f"`{source.revision}`)"
        if source.revision.startswith("sha256:")
        else f"`{source.model}` (revision `{source.revision}`)"
    )
    share = manifest.weight_share
    if share is not None and share.unquantized_experts:
        # Not "a 4-bit build": most of a mixture of experts' weights are its experts, and they were not quantized.
        what = (
            f"Only partly quantized: the mixture-of-experts experts ({share.unquantized_experts:.1%} of the weights) "
            f"are kept in {share.kept_dtype or 'the source dtype'}, not quantized, because bitsandbytes converts only "
            f"nn.Linear and transformers holds the experts as fused 3-D parameters (bitsandbytes #1849); "
            f"{what} covers the other Linear layers ({share.quantized:.1%} of the weights). A"
        )
    return (
        f"{what} build of {origin}, made by "
        f"`builder` from a YAML recipe and "
        f"{'verified against the source model before publishing' if passed else 'NOT verified'}. "
        f"Build hash `{manifest.build_hash}`."
    )


def _usage(manifest: Manifest, repo_id: str, folder: Path | None) -> str:
    """How to run the artifact with stock libraries: snippets that run as written (tests/unit/test_card_snippets.py
    executes each one against the built folder). `folder` is the artifact's folder (its sentence-transformers
    config and chat template decide pooling and prompting); without one the snippets assume neither. The task's
    family (builder/tasks/) writes the lines that run the model."""
    task = manifest.source.task or BARE_MODEL_TASK
    local = (
        f'Replace `"{repo_id}"` with the path of a local copy of this folder to run it from disk.'
        if manifest.library_name == "onnx"
        else f'`model_id` may be the path of a local copy of this folder instead of `"{repo_id}"`.'
    )
    if manifest.library_name == "onnx":
        provider = manifest.recipe["export"]["provider"]
        if manifest.onnx is not None and manifest.onnx.exporter == "genai":  # the genai folder is for its runtime
            return _usage_genai(repo_id, provider) + f"\n\n{local}"
        graphs = sorted(path for path in manifest.files or {} if path.endswith(".onnx"))
        session = _ort_session(repo_id, graphs[0] if graphs else "model.onnx", provider)
        run = family(task).onnx_usage(task, folder)
        return (
            f"With `onnxruntime` (the graph targets `{provider}`):\n\n```python\n{session}{run}```\n\n"
            f"{_optimum(repo_id, task, provider)}\n\n{local}"
        )
    auto = AUTO_CLASSES.get(task, "AutoModel")
    snippet = family(task).transformers_usage(task, folder, repo_id)
    # A manifest's recipe has a `quantize` block where it has no `export` one.
    intro = (
        "Stock `transformers` (with `bitsandbytes` installed) loads it; the quantization settings are in `config.json`."
    )
    load = (
        f"from transformers import AutoTokenizer, {auto}\n\n"
        f'model_id = "{repo_id}"\n'
        "tokenizer = AutoTokenizer.from_pretrained(model_id)\n"
        f'model = {auto}.from_pretrained(model_id, device_map="auto")\n'
    )
    return f"{intro}{snippet.intro}\n\n```python\n{snippet.imports}{load}{snippet.run}```\n\n{local}"


def _usage_genai(repo_id: str, provider: str) -> str:
    package = "onnxruntime-genai-cuda" if provider == "CUDAExecutionProvider" else "onnxruntime-genai"
    return (
        f"With `onnxruntime_genai` (`pip install {package}`; the graph targets `{provider}`):\n\n```python\n"
        "import onnxruntime_genai as og\nfrom huggingface_hub import snapshot_download\n\n"
        f'folder = snapshot_download("{repo_id}")\n'
        "model = og.Model(folder)\ntokenizer = og.Tokenizer(model)\n"
        "params = og.GeneratorParams(model)\nparams.set_search_options(max_length=256)\n"
        "generator = og.Generator(model, params)\n"
        'generator.append_tokens(tokenizer.encode("The capital of France is"))\n'
        "stream = tokenizer.create_stream()\nwhile not generator.is_done():\n"
        "    generator.generate_next_token()\n"
        '    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)\n```'
    )


def _optimum(repo_id: str, task: str, provider: str) -> str:
    """optimum's ORTModel class for the task loads the folder (its layout is optimum's: `make test-interop`)."""
    ort_class = family(task).ort_class(task)
    return (
        f"With `optimum` (optimum-onnx installed):\n\n```python\nfrom optimum.onnxruntime import {ort_class}\n\n"
        f'model = {ort_class}.from_pretrained("{repo_id}", provider="{provider}")\n```'
    )


def _ort_session(repo_id: str, graph: str, provider: str) -> str:
    return (
        "import numpy as np\nimport onnxruntime as ort\nfrom huggingface_hub import snapshot_download\n"
        "from transformers import AutoTokenizer\n\n"
        f'folder = snapshot_download("{repo_id}")\n'
        "tokenizer = AutoTokenizer.from_pretrained(folder)\n"
        f'session = ort.InferenceSession(f"{{folder}}/{graph}", providers=["{provider}"])\n'
        "graph_inputs = {i.name: i for i in session.get_inputs()}\n"
    )


def _settings(manifest: Manifest) -> str:
    recipe = manifest.recipe
    block, name = (recipe["quantize"], "quantize") if recipe.get("quantize") else (recipe["export"], "export")
    rows = "\n".join(f"| `{name}.{key}` | `{_plain(value)}` |" for key, value in block.items())
    return f"| setting | value |\n|---|---|\n{rows}\n\nBuilt on `{manifest.device}`."


def _verification(report: VerificationReport | None) -> str:
    if report is None:
        return "No verification report."
    failed = {failure.metric for failure in report.failures}
    bounds = bounds_by_metric(report.thresholds)  # `cosine` bounds `cosine_min`, as the gate checks
    intervals, robustness = report.intervals or {}, report.interval_verdicts or {}
    rows = []
    for metric, value in sorted(report.metrics.items()):
        limit = bounds.get(metric)
        verdict = "" if limit is None else ("fail" if metric in failed else "pass")
        if metric in robustness:  # whether the whole interval gets the same verdict
            verdict += f" ({robustness[metric]})"
        shown_limit = "" if limit is None else _number(limit)
        interval = intervals.get(metric)
        shown_interval = "" if interval is None else f"[{_number(interval[0])}, {_number(interval[1])}]"
        rows.append(
            f"| {_METRIC_NAMES.get(metric, metric)} | {_number(value)} | {shown_interval} | {shown_limit} | {verdict} |"
        )
    lines = [
        f"Task `{report.task}`, compared with the source on `{report.provider or report.device}`: "
        f"**{'passed' if report.passed else 'FAILED'}**.",
        "",
        "| metric | value | 95% interval | threshold | |",
        "|---|---|---|---|---|",
        *rows,
    ]
    if intervals:
        lines += [
            "",
            "The intervals resample the evaluation inputs (blocks of 64 positions of a text, or sentences); "
            "*clear*: the whole interval is on the same side of the threshold as the value, *straddles*: the "
            "threshold lies inside it.",
        ]
    if report.performance:
        lines += ["", "| performance | value |", "|---|---|"]
        lines += [f"| {key} | {_number(value)} |" for key, value in sorted(report.performance.items())]
    return "\n".join(lines)


def _placement(manifest: Manifest) -> str:
    """ONNX exports: the table of nodes per execution provider in the gate's session ("" without one)."""
    placement = manifest.placement
    if placement is None:
        return ""
    target = manifest.verification.target_provider if manifest.verification else None
    rows = "\n".join(
        f"| {provider} | {sum(placement.nodes[provider].values())} | {placement.op_types(provider)} |"
        for provider in placement.providers()
    )
    note = (
        f" The target, `{target}`, could not run on the build host (`export.verify_on`), so this is where the "
        f"graph ran on `{placement.measured_on}`, not its placement on the target."
        if target and target != placement.measured_on
        else ""
    )
    return (
        f"\n\nNodes by execution provider in the gate's onnxruntime session on `{placement.measured_on}`, after "
        f"onnxruntime's graph optimizations.{note}\n\n| provider | nodes | op types |\n|---|---|---|\n{rows}"
    )


def _size(manifest: Manifest) -> str:
    footprint = manifest.footprint.model_dump() if manifest.footprint else {}
    files = manifest.files or {}
    lines = [f"- files: {len(files)}, {_bytes(sum(f.size for f in files.values()))} in total"] if files else []
    if footprint.get("source_bytes"):
        lines.append(f"- source weights: {_bytes(footprint['source_bytes'])}")
    if footprint.get("artifact_bytes"):
        ratio, expected = footprint.get("ratio"), footprint.get("expected_ratio")
        lines.append(
            f"- artifact weights: {_bytes(footprint['artifact_bytes'])}"
            + (f" ({ratio:.2f}x the source)" if isinstance(ratio, (int, float)) else "")
        )
        if isinstance(expected, (int, float)):
            lines.append(f"- expected footprint ratio (from the plan): {expected:.4f}")
    for key, value in sorted(footprint.items()):
        if key not in ("source_bytes", "artifact_bytes", "ratio", "expected_ratio"):
            lines.append(f"- {key}: {_number(value)}")
    if manifest.weight_share is not None:
        lines.append(f"- quantized: {manifest.weight_share.describe()}")
    reached, layers = manifest.bits_per_param, manifest.quantized_layers
    if manifest.manifest_version < REACHED_BITS_VERSION:  # its bits_per_param was the quantized layers' figure
        reached, layers_bits = None, manifest.bits_per_param
    else:
        layers_bits = layers.bits_per_param if layers is not None else None
    if reached is not None:
        lines.append(f"- bits per parameter (weight files over all parameters): {reached:.2f}")
    if layers_bits is not None:
        lines.append(f"- bits per quantized-layer weight (quantized layers only): {layers_bits:.2f}")
    return "\n".join(lines) or "Not measured."


def _reproduce(manifest: Manifest) -> str:
    recipe = manifest.recipe
    if is_local_path(manifest.source.model):  # a path on the build host means nothing to a reader of the card
        recipe = {**recipe, "source": {**recipe["source"], "model": LOCAL_SOURCE}}
    recipe_yaml = yaml.safe_dump(recipe, sort_keys=False).rstrip()
    versions = "\n".join(f"| {name} | {version} |" for name, version in sorted(manifest.versions.items()))
    return (
        f"The resolved recipe (also in `recipe.lock.yaml`); `builder build` on it with the versions below "
        f"reproduces build hash `{manifest.build_hash}`.\n\n```yaml\n{recipe_yaml}\n```\n\n"
        f"| package | version |\n|---|---|\n{versions}\n\nBuilt at {manifest.built_at}; "
        "`manifest.json` lists every file with its sha256."
    )


LOCAL_SOURCE = "./<local folder with the content digest above>"


def _plain(value) -> str:
    """A setting as YAML writes it: true/false/null, lists and mappings in flow style."""
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"

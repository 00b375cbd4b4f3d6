"""The conformance matrix: family x method cells, what the code predicts for each (cheap: the plan's refusals,
the streaming quantizer's reasons, the exporter's choice), what a build really does, and the support table.

`python tests/conformance/matrix.py [--build]` rewrites docs/support.md: from the predictions alone, or (with
--build) after building every cell and checking each outcome against its prediction.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "assets"), str(Path(__file__).parent)]

from families import FAMILIES, Family, make_family, slug  # noqa: E402 (after the sys.path entries above)

METHODS = ("nf4-dq", "fp4", "int8", "onnx-fp32")
SUPPORT_TABLE = REPO / "docs" / "support.md"
_BLOCKS = {
    "nf4-dq": "quantize:\n  method: bnb-4bit\n  quant_type: nf4\n  double_quant: true\n  compute_dtype: {dtype}\n",
    "fp4": "quantize:\n  method: bnb-4bit\n  quant_type: fp4\n  compute_dtype: {dtype}\n",
    "int8": "quantize:\n  method: bnb-8bit\n",
    "onnx-fp32": "export:\n  format: onnx\n  exporter: torch\n",
}
# Random weights: quality gates only have to be finite-ish; the footprint gate keeps its default (from the plan).
_THRESHOLDS = {
    "text-generation": "{top1_agreement: 0.0, kl_divergence: 100.0, perplexity_ratio: 100.0}",
    "encoder": "{cosine: 0.5}",
}
_ONNX_THRESHOLDS = {"text-generation": "{top1_agreement: 0.9}", "encoder": "{}"}
# Cells that only a build can refuse (the exporter fails inside torch.export), as the build's message says.
BUILD_REFUSALS = {
    ("Mixtral (MoE)", "onnx-fp32"): "torch.onnx.export cannot export MixtralForCausalLM (mixtral) for "
    "text-generation: Failed to convert the exported program to an ONNX model",
}


@dataclass(frozen=True)
class Cell:
    family: str
    method: str
    status: str
    """"streamed", "transformers" (the transformers quantize path), "exported" or "refused"."""
    detail: str = ""
    """Why not streamed, or why refused."""
    share: str = ""
    """What a bitsandbytes build of a mixture of experts quantizes and keeps (`WeightShare.describe`)."""

    def shown(self) -> str:
        kept = f"; quantized: {self.share}" if self.share else ""
        match self.status:
            case "streamed":
                return f"streamed{kept}"
            case "exported":
                return "exported"
            case "transformers":
                return f"transformers path ({self.detail}){kept}"
        return f"**refused**: {self.detail}"


def make_sources(root: Path) -> dict[str, Path]:
    """Every family's tiny model under `root`, built once (a folder with config.json is reused)."""
    tokenizers = {"lm": REPO / "models" / "smollm2-135m-instruct", "encoder": REPO / "models" / "all-minilm-l6-v2"}
    folders = {}
    for family in FAMILIES:
        folder = root / slug(family)
        if not (folder / "config.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            make_family(family, folder, tokenizers)
        folders[family.name] = folder
    return folders


def is_moe(family: Family) -> bool:
    return any(key in family.kwargs for key in ("num_local_experts", "num_experts"))


def recipe_file(family: Family, method: str, source: Path, folder: Path) -> Path:
    """The cell's recipe: the method's block, random-weight quality thresholds, few generated tokens. A mixture of
    experts' bitsandbytes recipes accept that its experts stay unquantized (bitsandbytes #1849): the table records
    the share that was quantized."""
    lm = family.tokenizer == "lm"
    kind = "text-generation" if lm else "encoder"
    thresholds = (_ONNX_THRESHOLDS if method == "onnx-fp32" else _THRESHOLDS)[kind]
    task = f"  task: {family.task}\n" if family.task else ""
    text = (
        f"schema_version: 1\nname: {slug(family)}-{method}\nsource:\n  model: {source}\n{task}  dtype: auto\n"
        + _BLOCKS[method].format(dtype="bfloat16" if lm else "float32")
        + ("  allow_unquantized_experts: true\n" if is_moe(family) and method != "onnx-fp32" else "")
        + f"verify:\n  max_new_tokens: 4\n  thresholds: {thresholds}\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slug(family)}-{method}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def predict(family: Family, method: str, recipe: Path) -> Cell:
    """What the code says of a cell without building it: plan's refusal, else the streaming quantizer's verdict
    (bitsandbytes) or the exporter's refusal (ONNX)."""
    from builder.errors import BuilderError
    from builder.plan import make_plan
    from builder.recipe import load_recipes

    [loaded] = load_recipes(recipe)
    if (family.name, method) in BUILD_REFUSALS:
        return Cell(family.name, method, "refused", BUILD_REFUSALS[(family.name, method)])
    try:
        plan = make_plan(loaded)
    except BuilderError as error:
        return Cell(family.name, method, "refused", str(error).split(": ", 1)[1])
    if method == "onnx-fp32":
        from builder.steps.export import choose_exporter

        task = loaded.recipe.source.task or _task(plan)
        try:
            choose_exporter(loaded.recipe.export, task)
        except BuilderError as error:
            return Cell(family.name, method, "refused", str(error))
        return Cell(family.name, method, "exported")
    from builder.steps.stream import NOTHING_QUANTIZED, streamable

    reason = streamable(loaded.recipe, loaded.source_path)
    if reason is not None and reason.startswith(NOTHING_QUANTIZED):
        return Cell(family.name, method, "refused", reason)
    share = plan.weight_share.describe() if plan.weight_share and plan.weight_share.unquantized_experts else ""
    if reason is None:
        return Cell(family.name, method, "streamed", share=share)
    return Cell(family.name, method, "transformers", reason, share)


def _task(plan) -> str:
    from builder.tasks import infer_task

    return infer_task(plan.source.config.get("architectures"))


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    stderr: str
    manifest: dict | None
    seconds: float


def build_cell(recipe: Path, out: Path) -> Outcome:
    """`builder build` of the cell's recipe, in this process (stdout and stderr captured)."""
    from builder.cli import main

    err = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["build", str(recipe), "--out", str(out), "--device", "cpu", "--quiet"])
    manifest_file = out / recipe.stem / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if code == 0 and manifest_file.is_file() else None
    return Outcome(code, err.getvalue(), manifest, time.perf_counter() - started)


def render(cells: list[Cell]) -> str:
    """docs/support.md: one row per family, one column per method."""
    by = {(c.family, c.method): c for c in cells}
    lines = [
        "# What builder builds, by architecture",
        "",
        "Generated by `python tests/conformance/matrix.py --build` (the conformance matrix, `make test-conformance`)",
        "from tiny models of each family built with transformers' own config classes; `tests/conformance/` checks",
        "that this table is what the code reports. A build listed here passed its verification gate (the artifact",
        "reloaded from its folder by stock transformers, or run by onnxruntime). *streamed*: the streaming",
        "quantizer wrote it, tensor for tensor what the transformers path writes; *transformers path*: loaded and",
        "quantized by transformers, for the reason given; *refused*: `builder plan`/`build` exits 1 with the reason.",
        "",
        "| architecture | " + " | ".join(METHODS) + " |",
        "|---|" + "---|" * len(METHODS),
    ]
    for family in FAMILIES:
        row = [by[(family.name, method)].shown().replace("|", "\\|") for method in METHODS]
        lines.append(f"| {family.name} | " + " | ".join(row) + " |")
    counts = {
        status: sum(c.status == status for c in cells) for status in ("streamed", "transformers", "exported", "refused")
    }
    lines += [
        "",
        f"{len(cells)} cells: {counts['streamed']} streamed, {counts['transformers']} through the "
        f"transformers path, {counts['exported']} exported, {counts['refused']} refused.",
        "",
    ]
    return "\n".join(lines)


def predictions(root: Path) -> list[Cell]:
    sources = make_sources(root / "sources")
    return [
        predict(family, method, recipe_file(family, method, sources[family.name], root / "recipes"))
        for family in FAMILIES
        for method in METHODS
    ]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        root = Path(tmp)
        cells = predictions(root)
        if "--build" in sys.argv:
            started = time.perf_counter()
            for cell in cells:
                family = next(f for f in FAMILIES if f.name == cell.family)
                outcome = build_cell(root / "recipes" / f"{slug(family)}-{cell.method}.yaml", root / "out")
                got = (
                    "refused"
                    if outcome.exit_code == 1
                    else outcome.manifest and outcome.manifest.get("quantize_path", "exported")
                )
                print(
                    f"{cell.family:<14} {cell.method:<10} exit {outcome.exit_code} {outcome.seconds:6.1f}s "
                    f"predicted {cell.status}: got {got} "
                    f"{outcome.stderr.strip().splitlines()[-1:] if outcome.exit_code else ''}",
                    flush=True,
                )
            print(f"full matrix: {time.perf_counter() - started:.0f}s", flush=True)
        SUPPORT_TABLE.write_text(render(cells), encoding="utf-8")
        print(render(cells))

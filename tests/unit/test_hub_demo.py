"""`builder demo`'s stages end to end on the tiny random Llama (the real SmolLM2 run is `make demo`)."""

from __future__ import annotations

from builder.demo import run_demo

# Random weights: the gate is opened wide, the point here is build -> registry -> publish -> load back.
RECIPE = """schema_version: 1
name: tiny-llama-nf4
source: {{model: {model}, task: text-generation, dtype: bfloat16}}
quantize: {{method: bnb-4bit, quant_type: nf4}}
verify:
  prompts: ["The capital of France is"]
  max_new_tokens: 4
  thresholds: {{top1_agreement: 0.0, kl_divergence: 100.0, perplexity_ratio: 100.0, footprint_ratio: 10.0}}
publish: {{repo: demo/tiny-llama-nf4}}
"""


def test_demo_builds_publishes_to_a_local_registry_and_loads_back(tiny_llama, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE.format(model=tiny_llama))
    lines: list[str] = []
    try:
        run_demo(recipe, out=tmp_path / "artifacts", root=tmp_path / "hub", say=lines.append)
    finally:
        print("\n".join(lines))  # what each stage printed, shown when the test fails
    text = "\n".join(lines)
    assert [line.split()[0] for line in lines if line.startswith("[")] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert "verification passed" in text
    assert "HF_ENDPOINT=http://127.0.0.1:" in text and "HF_HUB_DISABLE_XET=1" in text
    assert "remote files match the manifest" in text
    assert "every sha256 matches the manifest" in text
    assert "bitsandbytes 4-bit nf4" in text and "generated: 'What is the capital of France?' -> '" in text
    assert (tmp_path / "hub" / "repos" / "models" / "demo" / "tiny-llama-nf4" / "refs.json").is_file()
    assert "hf_demo_" not in text  # the registry's token is never printed
    report = tmp_path / "artifacts" / "report.html"
    assert lines[-2] == f"report of {tmp_path / 'artifacts'} (size vs quality, gates): {report}"
    assert 'data-artifact="tiny-llama-nf4"' in report.read_text()

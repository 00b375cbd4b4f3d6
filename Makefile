# Every target calls `builder` or pytest; the logic lives in the package. Targets create/reuse .venv themselves.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BUILDER := $(VENV)/bin/builder
PYTEST := $(PY) -m pytest
R      ?= recipes/smollm2/nf4.yaml
RECIPES   ?= recipes
ARTIFACTS ?= artifacts

.PHONY: demo report chromium test test-slow test-conformance test-gpu test-core test-interop test-hub-oldest quality validate plan build all models schema clean publish bench FORCE

# The environment: torch's CPU wheel first (a plain `torch` requirement would pull GBs of CUDA packages), then the
# package with its quantize, onnx, test, quality and ray extras.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[quantize,onnx,test,quality,ray]'
	touch $@

# The core install alone (pydantic, pyyaml, huggingface_hub; no torch): what `validate`, `plan` and `schema` need,
# so they work on a laptop and in a recipe repository's CI in seconds.
VENV_CORE ?= .venv-core
$(VENV_CORE)/.installed: pyproject.toml
	test -x $(VENV_CORE)/bin/python || python3 -m venv $(VENV_CORE)
	$(VENV_CORE)/bin/python -m pip install -q --upgrade pip
	$(VENV_CORE)/bin/python -m pip install -q -e . 'pytest>=8' 'hypothesis>=6.100'
	touch $@

models/.ready: $(VENV)/.installed tests/assets/make_models.py
	$(PY) tests/assets/make_models.py models
	touch $@

models: models/.ready

# Build + verify SmolLM2 nf4, publish it to the embedded Hub-compatible registry, load it back and generate.
demo: models/.ready
	$(BUILDER) demo

# One self-contained HTML page comparing the built artifacts by source model: size vs quality, the Pareto front,
# the gate thresholds, latency, failed builds kept by --keep-failed. Open $(ARTIFACTS)/report.html in a browser.
report: $(VENV)/.installed
	$(BUILDER) report $(ARTIFACTS) --out $(ARTIFACTS)/report.html

# Build one recipe file (R=...), or every recipe; both skip artifacts whose build hash is unchanged ("up to date").
build: models/.ready
	$(BUILDER) build $(R)

all: models/.ready
	$(BUILDER) build $(RECIPES)/

# `make artifacts/<name>/manifest.json` builds the recipe (or variant) whose artifact is <name>, for other rules to
# depend on. Its prerequisite, a stamp holding the build hash, is rewritten on every run by `builder stamp`: dated
# like the manifest when the artifact is up to date (same build hash, verified, files intact) and now otherwise, so
# make's own up-to-date check rebuilds exactly when `builder build` would.
$(ARTIFACTS)/%/manifest.json: $(ARTIFACTS)/.stamps/%.hash
	$(BUILDER) build $(RECIPES) --name $* --out $(ARTIFACTS)

$(ARTIFACTS)/.stamps/%.hash: FORCE | models/.ready
	$(BUILDER) stamp $* $(RECIPES) --artifacts $(ARTIFACTS)

# Kept between runs, and never deleted by an interrupted make (the manifest is builder's to write).
.PRECIOUS: $(ARTIFACTS)/%/manifest.json $(ARTIFACTS)/.stamps/%.hash
FORCE:

# Publish what recipe file R builds (building it first unless up to date) to HF_ENDPOINT (default: the public Hub);
# needs HF_TOKEN or `hf auth login`. For the local registry: HF_ENDPOINT=http://127.0.0.1:8808 HF_HUB_DISABLE_XET=1
publish: models/.ready
	$(BUILDER) build $(R) --publish

# Headless Chromium renders `builder report`'s page in tests/unit/test_report.py (those tests skip without it).
# Installed here only when make runs as root (a CI container); otherwise it says how and the tests skip.
chromium:
	@command -v chromium >/dev/null || if [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; \
	else echo "chromium is missing: the report rendering tests will skip (sudo apt-get install -y chromium)"; fi

test: models/.ready chromium
	$(PYTEST) -q

test-slow: models/.ready
	$(PYTEST) -q -m slow

# The whole architecture conformance matrix (tests/conformance/: 18 families x nf4+dq, fp4, int8, ONNX fp32; about
# 20 minutes on a 2-core CPU). `make test` runs its fast cells. docs/support.md is its table: after a change that
# moves a cell, rewrite it with `$(PY) tests/conformance/matrix.py --build`.
test-conformance: models/.ready
	$(PYTEST) -q tests/conformance -m "slow or not slow"

# Needs a CUDA host; on a CPU-only machine every test here is skipped.
test-gpu: models/.ready
	$(PYTEST) -q -m gpu

# The streaming quantizer vs the transformers script vs plain file I/O (docs/benchmarks.md). On CPU by default with
# the SmolLM2 shape (a few minutes); e.g. BENCH_ARGS="--shape llama3-8b --device cuda --cap-gb 1 --hf-cap-gb 4" on a GPU.
BENCH_ARGS ?= --shape smollm2 --device cpu
bench: $(VENV)/.installed
	$(PY) bench/run.py $(BENCH_ARGS)

# The interop environment: optimum-onnx needs transformers < 4.58 (and optimum 2.1), which the main venv cannot hold.
# tests/interop/ has the main env's `builder build` export into $(INTEROP_DIR) (`make test` already built them there,
# so they are up to date), loads those folders with optimum's ORTModelFor* here, and builds with the `optimum`
# exporter backend. torch is the CPU wheel, pinned (plain `torch` pulls CUDA).
VENV_INTEROP ?= .venv-interop
INTEROP_DIR  ?= artifacts/.interop
$(VENV_INTEROP)/.installed: pyproject.toml
	test -x $(VENV_INTEROP)/bin/python || python3 -m venv $(VENV_INTEROP)
	$(VENV_INTEROP)/bin/python -m pip install -q --upgrade pip
	$(VENV_INTEROP)/bin/python -m pip install -q torch==2.13.0
	$(VENV_INTEROP)/bin/python -m pip install -q 'transformers>=4.57,<4.58' 'optimum-onnx[onnxruntime]' onnxscript pytest pydantic pyyaml
	$(VENV_INTEROP)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-interop: models/.ready $(VENV_INTEROP)/.installed
	BUILDER_INTEROP_DIR=$(INTEROP_DIR) BUILDER_MAIN_PYTHON=$(PY) $(VENV_INTEROP)/bin/python -m pytest -q tests/interop

# The core install (validate, plan, publish, hub serve) with the oldest huggingface_hub it admits, 1.33 (what the
# GPU machines' image has): the publish and registry tests, no torch.
VENV_HUB_OLDEST ?= .venv-hub-oldest
$(VENV_HUB_OLDEST)/.installed: pyproject.toml
	test -x $(VENV_HUB_OLDEST)/bin/python || python3 -m venv $(VENV_HUB_OLDEST)
	$(VENV_HUB_OLDEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_HUB_OLDEST)/bin/python -m pip install -q 'huggingface-hub==1.33.*' pytest
	$(VENV_HUB_OLDEST)/bin/python -m pip install -q -e .
	touch $@

test-hub-oldest: $(VENV_HUB_OLDEST)/.installed
	$(VENV_HUB_OLDEST)/bin/python -m pytest -q tests/unit/test_core_install.py tests/unit/test_hub_publish.py \
		tests/unit/test_hub_server.py -k "not transformers_loads"

# Also checks the local source folders the recipes name (models/), so it needs them; no torch.
validate: models/.ready $(VENV_CORE)/.installed
	$(VENV_CORE)/bin/builder validate recipes/

plan: models/.ready $(VENV_CORE)/.installed
	$(VENV_CORE)/bin/builder plan $(R)

schema: $(VENV_CORE)/.installed
	$(VENV_CORE)/bin/builder schema > docs/recipe.schema.json

# The tests of what the core install does (recipe language, validate/plan/schema, the registry, the package's
# import graph), run where torch is not installed at all.
test-core: $(VENV_CORE)/.installed
	$(VENV_CORE)/bin/python -m pytest -q tests/unit/test_core_install.py tests/unit/test_loader.py \
		tests/unit/test_loader_corpus.py tests/unit/test_recipe_fields.py tests/unit/test_recipe_rules.py \
		tests/unit/test_recipe_limits.py tests/unit/test_architecture.py tests/unit/test_hub_server.py \
		tests/unit/test_hub_security.py -k "not transformers_loads"

# Lint, format and types (config in pyproject.toml; .pre-commit-config.yaml runs the same on commit).
quality: $(VENV)/.installed
	$(VENV)/bin/ruff check builder tests bench
	$(VENV)/bin/ruff format --check builder tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf artifacts .pytest_cache .hypothesis

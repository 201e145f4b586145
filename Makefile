# The two commands of the README: `make demo` and `make test`.
# Both create .venv if absent and install into it (once; again when setup.py changes).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only where no torch is importable (here: the CPU build that lies on disk).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-slow clean

# A torch already importable by $(PYTHON) (say, a CUDA build on a GPU machine) is reused
# through the system site-packages; otherwise the venv is isolated.
$(PY):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "make: reusing the torch of $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

$(VENV)/.installed: setup.py | $(PY)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	# fairseq-fixed compiles Cython/C++ extensions against the torch above: build it
	# without isolation, so that pip does not fetch a second torch for the build.
	$(PY) -m pip install "setuptools>=61,<81" wheel cython "numpy>=1.21"
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/quickstart/demo.py

# One pytest worker per CPU core (pytest-xdist), each test file on one worker (its module
# fixtures built once), one torch thread per worker so that the workers do not oversubscribe
# the cores; TEST_WORKERS=0 runs in one process. -rs prints why each skipped test skipped.
TEST_WORKERS ?= auto
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

# long soak runs, kept out of `make test`
test-slow: install
	$(PY) -m pytest -q -m slow --run-slow $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

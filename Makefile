# The two set-up commands of the README: `make demo` and `make test`.
# Both build .venv from scratch on first use; nothing is installed by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on disk on CPU machines; an unpinned torch would
# pull a multi-GB CUDA build, so it is installed first and pinned.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.5.1
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,interop,eval]'
	$(PY) -c "import torch; assert not torch.version.cuda or '$(ALLOW_CUDA)', 'a CUDA build of torch was installed on a CPU machine'"
	# Triton for the tests only: its interpreter runs the GPTQ column kernel on the CPU (a CUDA torch brings its own).
	$(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" || \
		$(PY) -m pip install -q --disable-pip-version-check "$(TRITON_SPEC)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m compress run recipes/default.yaml --out out/demo --force

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) out build *.egg-info

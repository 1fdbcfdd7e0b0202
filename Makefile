# Set-up and the two everyday commands. `make demo` and `make test` create .venv when missing,
# install (torch/torchvision pinned by constraints.txt), and run; a second call reuses .venv.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.vitshrink-installed
ASSETS  ?= $(abspath ../shared/assets)
DEMO_OUT ?= out/demo

export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
ifneq ($(wildcard $(ASSETS)),)
export VITSHRINK_ASSETS ?= $(ASSETS)
endif

.PHONY: test demo install lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import vitshrink, torchvision, timm" && touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check vitshrink tests benchmarks

demo: $(STAMP)
	$(VENV)/bin/vitshrink compress vitshrink:fashion-vit --recipe fashion-vit \
		--calib fashion-mnist-sample --split train --eval-data fashion-mnist-sample \
		--output $(DEMO_OUT)/fashion-vit-dgssa-glad --overwrite
	$(VENV)/bin/vitshrink eval $(DEMO_OUT)/fashion-vit-dgssa-glad --data fashion-mnist-sample \
		--reference vitshrink:fashion-vit --output $(DEMO_OUT)/eval.json --overwrite --runs 5
	$(VENV)/bin/vitshrink bench vitshrink:fashion-vit $(DEMO_OUT)/fashion-vit-dgssa-glad --batch-size 64 --rounds 5 \
		--output $(DEMO_OUT)/bench.json --overwrite

clean:
	rm -rf $(VENV) out .pytest_cache

# Two entry points: `make demo` (set up, make synthetic cases, train, evaluate) and `make test`.
# `make demo LABEL_SCHEME=brats2024_ped` runs the demo with today's BraTS-PEDs labels (1 ET, 2 NET, 3 CC, 4 ED);
# `make demo MODEL=unet2d` trains and evaluates the 2D U-Net variant (configs/unet2d.yaml) instead of Swin UNETR.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
LABEL_SCHEME ?= brats2023_ped
MODEL ?= swin_unetr
DEMO_DATA := data/demo/$(LABEL_SCHEME)
BUNDLE_RUN := $(PYTHON) -m monai.bundle run
# The configs layered on train.yaml for each model.
MODEL_CONFIGS_swin_unetr := 'configs/demo.yaml'
MODEL_CONFIGS_unet2d := 'configs/demo.yaml', 'configs/unet2d.yaml'
MODEL_CONFIGS := $(or $(MODEL_CONFIGS_$(MODEL)),$(error MODEL must be swin_unetr or unet2d, not $(MODEL)))
DEMO_CONFIGS := "['configs/train.yaml', $(MODEL_CONFIGS)]"
DEMO_EVALUATE_CONFIGS := "['configs/train.yaml', $(MODEL_CONFIGS), 'configs/evaluate.yaml']"

.PHONY: setup demo test lint clean-demo

setup: $(VENV)/.installed

# torch is pinned (requirements.txt): an unpinned torch would pull a newer multi-GB build.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(DEMO_DATA)/datalist.json: | setup
	$(PYTHON) -m scripts.synthetic --output_dir $(DEMO_DATA) --num_train 24 --num_val 4 --seed 0 \
		--label_scheme $(LABEL_SCHEME)
	$(PYTHON) -m scripts.prepare_datalist --dataset_dir $(DEMO_DATA) --output $@ --num_folds 5 \
		--label_scheme $(LABEL_SCHEME)

demo: $(DEMO_DATA)/datalist.json
	$(BUNDLE_RUN) training --config_file $(DEMO_CONFIGS) --label_scheme $(LABEL_SCHEME)
	$(BUNDLE_RUN) evaluating --config_file $(DEMO_EVALUATE_CONFIGS) --label_scheme $(LABEL_SCHEME)

test: setup
	$(PYTHON) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check scripts tests
	$(VENV)/bin/ruff format --check scripts tests

clean-demo:
	rm -rf data/demo models/demo

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
# The model's configs after evaluate.yaml, so that their evaluation settings (the demo's post-processing) hold.
DEMO_EVALUATE_CONFIGS := "['configs/train.yaml', 'configs/evaluate.yaml', $(MODEL_CONFIGS)]"

.PHONY: setup demo test lint clean-demo monailabel-setup monailabel-check

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

# MONAI Label 0.8.5's stock monaibundle app serving this bundle, end to end (docs/monailabel.md). Its own venv holds
# MONAI Label with this bundle's torch and MONAI and nothing else of the bundle, as a MONAI Label install would.
MONAILABEL_VENV ?= .venv-monailabel
TORCH_PIN := $(shell grep -E '^torch==' requirements.txt)

monailabel-setup: $(MONAILABEL_VENV)/.installed

# PyPI's build of the pinned torch first, so that pip keeps it (about 3 GB with its CUDA libraries; it runs on a CPU
# too): MONAI Label imports torchvision, whose PyPI wheels do not load with a CPU-only (+cpu) build of the same torch.
$(MONAILABEL_VENV)/.installed: requirements.txt requirements-monailabel.txt
	python3 -m venv $(MONAILABEL_VENV)
	$(MONAILABEL_VENV)/bin/python -m pip install --quiet "$(TORCH_PIN),!=$(subst torch==,,$(TORCH_PIN))+cpu"
	$(MONAILABEL_VENV)/bin/python -m pip install --quiet -r requirements-monailabel.txt
	touch $@

monailabel-check: setup monailabel-setup
	$(PYTHON) -m scripts.monailabel_check --monailabel $(MONAILABEL_VENV)/bin/monailabel

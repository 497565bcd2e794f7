# nat_mm: the two commands of the README, and a few more.
PYTHON ?= python
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: install demo test test-slow benchmark build gpu-check gpu-dry-run

install:            ## everything on a fresh machine (idempotent)
	PYTHON=$(PYTHON) bash tools/install.sh

demo: install       ## the main job: train + evaluate NAT Mask R-CNN on built-in demo data
	PYTHON=$(PYTHON) bash tools/run_demo.sh

test:               ## the test suite (CPU; GPU tests skip without CUDA)
	$(PYTHON) -m pytest tests -q

test-slow:          ## the slow tests (large maps, long soaks)
	$(PYTHON) -m pytest tests -q -m slow

build:              ## rebuild the extension in place
	$(PYTHON) setup.py build_ext --inplace

benchmark:          ## operator and backbone benchmarks (CPU)
	$(PYTHON) tools/benchmark_ops.py
	$(PYTHON) tools/benchmark_backbone.py

gpu-check:          ## on a GPU machine: build, CUDA tests, GPU benchmark
	bash tools/gpu_check.sh

gpu-dry-run:        ## without a GPU: gpu-check's build and tests in the GPU image's versions
	bash tools/gpu_image_dry_run.sh

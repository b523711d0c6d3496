# Every target creates the virtual environment it needs (.venv) from constraints.txt, so a fresh clone needs
# only python3 (>= 3.10) and make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.vtc-installed

.PHONY: run test bench eval demo list clean default-model fidelity gpu-check gpu-wheels

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt torch torchvision
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

## the main job: 40 held-out questions with all tokens and with every compressor, on the embedded default model
run: $(STAMP)
	$(PY) -m vtc run

## Debian's chromium for the demo's browser test (Playwright drives it; nothing is downloaded at test time)
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; \
	else echo "warning: cannot install chromium here (needs root and apt-get); the browser test will fail" >&2; fi

## the test suite (offline, CPU); pytest's exit 5 ("no tests ran") counts as a failure
test: $(STAMP) $(CHROMIUM)
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

## benchmarks: signal-capture overhead and selection cost vs a CLIP-L/14-336-shaped tower, prefill speedup vs the
## ideal on a LLaVA-1.5-shaped model (ratios from one run each)
bench: $(STAMP)
	$(PY) -m vtc.eval.bench.capture
	$(PY) -m vtc.eval.bench.selection
	$(PY) -m vtc.eval.bench.prefill

## on a CUDA machine (no network needed): benchmarks in bf16 + the equality tests on the GPU, ~8 min, into
## ./gpu_check (JSON + markdown); uses the machine's python3 and installs what it lacks from .gpuwheels/
gpu-check:
	$(PYTHON) eval/gpu_check.py --out gpu_check

## here, with network: the wheels a GPU machine may lack (versions pinned from this venv), into .gpuwheels/
gpu-wheels: $(STAMP)
	$(PIP) download --quiet --no-deps -d .gpuwheels $$($(PY) -c "import importlib.metadata as m, runpy; \
	  names = runpy.run_path('eval/gpu_check.py')['WHEELS']; print(' '.join(f'{n}=={m.version(n)}' for n in names))")

## lmms-eval sweep on the embedded model: every compressor at 33 % / 11 % on the offline tasks (./vtc_eval)
eval: $(STAMP)
	$(PY) -m vtc eval

## retrain the embedded default model into the package (about 95 min on 2 CPU cores; resumable: after an interruption
## run it again and it continues from integrations/transformers/default_model.checkpoints/), then measure it
default-model: $(STAMP)
	$(PY) -m vtc.eval.default_model.train --out integrations/transformers/default_model
	$(PY) -m vtc.eval.default_model.fidelity --out integrations/transformers/default_model/fidelity.json

## accuracy of the embedded model at 100 / 33 / 11 % of its visual tokens, for every compressor
fidelity: $(STAMP)
	$(PY) -m vtc.eval.default_model.fidelity

## the web demo on http://127.0.0.1:7860: which visual tokens survive, for images and videos
demo: $(STAMP)
	$(PY) -m vtc demo

list: $(STAMP)
	$(PY) -m vtc list

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info

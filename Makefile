# make test: creates/reuses .venv, installs the project with every extra, runs the tests.
# make demo: the same install, then the pipeline end to end (scripts/demo.py).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TRACKERS := $(VENV)/.trackers
DOCS   := $(VENV)/.docs
RAY    := $(VENV)/.ray
ARM64  := $(VENV)/arm64
PYTEST_ARGS ?=

.PHONY: test test-tools install demo docs screenshots clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet -e '.[train,dicom,serve,dev]'
	# wheels of the edge install, so the no-torch venv test runs offline
	$(PY) -m pip download --quiet --only-binary=:all: -d $(VENV)/edge-wheels onnxruntime numpy pillow click pyyaml \
		fastapi uvicorn python-multipart prometheus-client httptools uvloop fastapi-offline
	touch $(STAMP)

# Debian tools only the tests use (make demo does not wait for them; checked in a subshell, so that a missing one
# installs them all rather than exiting make):
# chromium + its driver for the page's real-browser test (a browser that downloads itself fails offline);
# qemu-user for the int8 tests on emulated CPUs (qemu-x86_64 -cpu Haswell runs onnxruntime's AVX2 kernels,
# qemu-aarch64 its Arm kernels), debootstrap for the arm64 root those run in;
# Orthanc (the PACS) with its DICOMweb plugin (a file, not a command: the STOW-RS archive) and DCMTK (modality,
# second PACS, img2dcm) for the DICOM node's tests against real peers
TOOLS := chromium chromedriver qemu-x86_64 debootstrap Orthanc storescu storescp img2dcm openssl curl nginx systemd-analyze
TOOL_FILES := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
test-tools:
	@( for t in $(TOOLS); do command -v $$t >/dev/null || exit 1; done; \
		for f in $(TOOL_FILES); do test -f $$f || exit 1; done ) || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver qemu-user debootstrap \
		orthanc orthanc-dicomweb dcmtk openssl curl nginx-light systemd >/dev/null; }

# the trackers' extras (MLflow, W&B) for the tracking tests only: make demo does not pay for them
$(TRACKERS): $(STAMP)
	$(PY) -m pip install --quiet -e '.[train,dicom,serve,dev,mlflow,wandb]'
	touch $(TRACKERS)

# the documentation site's tools (mkdocs-material): make docs and the tests' strict build; make demo does not pay
$(DOCS): $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS)

# Ray Data for xray-infer --engine ray (its tests and scripts/bench_ray.py); make demo does not pay for it
$(RAY): $(STAMP)
	$(PY) -m pip install --quiet -e '.[ray]'
	touch $(RAY)

# make docs: the manual in docs/ as a site in build/site/ (offline: no CDN font or script); a broken link fails
docs: $(DOCS)
	$(VENV)/bin/mkdocs build --strict

# make screenshots: docs/serve_page.png from the demo model's page in Chromium (after make demo; look at it before
# committing it)
screenshots: $(STAMP) test-tools
	test -d runs/demo/export || { echo "error: no runs/demo/export: run make demo first" >&2; exit 2; }
	$(PY) scripts/screenshot_page.py --model runs/demo/export --out docs/serve_page.png

# an arm64 Debian root with this venv's numpy + onnxruntime as aarch64 wheels (about a minute)
$(ARM64): $(STAMP) | test-tools
	PYTHON=$(PY) scripts/arm64_root.sh $(ARM64)

install: $(STAMP)

# make demo: the whole pipeline offline (synthetic data unless data/raw has images); FRESH=1 redoes every step
demo: $(STAMP)
	$(PY) scripts/demo.py $(if $(FRESH),--fresh,) $(DEMO_ARGS)

test: $(STAMP) $(TRACKERS) $(DOCS) $(RAY) test-tools $(ARM64)
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache

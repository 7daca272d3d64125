# The README's commands. Every target sets itself up first (Debian packages, venv, package),
# so `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: setup demo test test-avx2 test-unit lint bench constraints clean

setup:
	@scripts/setup.sh

demo: setup
	$(PY) -m rkan_dist.cli train --config configs/demo.yaml --nproc 2 $(ARGS)

lint: setup
	$(PY) -m ruff check rkan_dist launch tests bench

# Everything CI runs: lint, then unit, integration and slurm tests (the slurm ones start a
# local cluster through slurm/dev-cluster and stop it afterwards).
test: lint
	@EXTRA_APT="slurm-wlm slurm-client munge chromium" scripts/setup.sh
	$(PY) -m pytest tests -m "unit or integration or slurm" $(ARGS)

# The numerics tests (two code paths' floating-point results compared) again on AVX2 kernels only, as
# on CPUs without AVX-512 (AMD EPYC Milan, many login nodes), where ATen's, oneDNN's and numba's kernels
# round differently. CI runs it after `test`; ~10 min here (2 cores, AVX-512 CPU). Inductor's cache
# gets a folder of its own: torch 2.14 does not key it by instruction set, and AVX2 code reused by an
# AVX-512 process gave wrong gradients (AVX-512 code under AVX2: NaN).
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 NUMBA_CPU_NAME=haswell \
	TORCHINDUCTOR_CACHE_DIR=$(or $(TMPDIR),/tmp)/torchinductor-avx2-$(shell id -un)
test-avx2: setup
	@$(AVX2) $(PY) -c "import torch, sys; c = torch.backends.cpu.get_cpu_capability(); \
		sys.exit(None if c == 'AVX2' else f'test-avx2: torch runs {c} kernels here, not AVX2')"
	$(AVX2) $(PY) -m pytest tests -m numerics $(ARGS)

test-unit: setup
	$(PY) -m pytest tests -m unit $(ARGS)

# All benchmarks side by side (~14 min here, ~8 of them bench/faults.py's two Slurm jobs on the local
# dev cluster, which it starts): bench/results/<date>.json, bench/REPORT.md with plots, and
# docs/SCALING.md recomputed from the new figures.
bench: setup
	@EXTRA_APT="slurm-wlm slurm-client munge" scripts/setup.sh
	OMP_NUM_THREADS=2 $(PY) -m rkan_dist.cli bench all --report
	$(PY) -m bench.scaling

constraints: setup
	$(VENV)/bin/pip freeze --exclude-editable > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info

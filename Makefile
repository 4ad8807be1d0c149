# The README's two commands: `make test` and `make demo`. Each does its own set-up and is safe to re-run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: test demo bins node-packages venv bench soak clean

venv: $(VENV)/.installed

# constraints.txt pins the versions the suite was last run with, so a fresh machine installs the same.
$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	@touch $@

# Go-built Kubernetes (control plane + node), etcd, helm, kube-oidc-proxy, Argo CD; cached in ~/.cache/keyless/bin.
bins:
	@tools/build-binaries.sh

# Debian packages a test node needs (containerd, runc, CNI plugins). Without root they are not
# installed and the node tests are skipped with the reason, unless KEYLESS_REQUIRE_NODE=1 (CI).
node-packages:
	@tools/install-node-packages.sh || { rc=$$?; [ $$rc -eq 3 ] && [ "$${KEYLESS_REQUIRE_NODE:-0}" != 1 ]; }

# pytest exits 5 when it collected no test: that must fail, not pass silently.
test: venv bins node-packages
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: venv bins node-packages
	$(BIN)/python -m keyless.envtest.demo

# The benchmarks behind the README's performance table (they take a few minutes each).
bench: venv bins
	$(BIN)/python bench/bench_operator_scale.py
	$(BIN)/python bench/bench_broker.py
	$(BIN)/python bench/bench_exec.py
	$(BIN)/python bench/bench_webhook.py
	$(BIN)/python bench/bench_argocd.py

# The fault soak (~27 min, root): real Argo CD, 3 tenants, nine faults one at a time; see bench/soak.py.
soak: venv bins node-packages
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) .pytest_cache

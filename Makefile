# The two entry points: `make demo` and `make test`. Both do all set-up first.
.PHONY: setup build fixtures demo test lint audit fuzz clean kernel-matrix

CARGO ?= cargo

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --workspace --all-targets

fixtures: setup
	@scripts/build-fixtures.sh

# Creates a local pod on this machine and runs the static Go fixture in it with kmirror.
demo: build fixtures
	$(CARGO) run -q --example demo

# Format, clippy, and cargo deny: licences, bans and sources (see deny.toml), then security
# advisories for all three Rust lock files (workspace, protocol/fuzz, fixtures/rust-app) against
# the RustSec snapshot in ../shared/advisory-db with fetching disabled, then a test that this
# advisories check does report a vulnerable crate (scripts/test-advisories.sh).
lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@command -v cargo-deny >/dev/null || $(CARGO) install --locked cargo-deny
	$(CARGO) deny --workspace check licenses bans sources
	@scripts/advisories.sh
	@scripts/test-advisories.sh

# Everything cargo deny checks, with advisories for all three lock files against the live
# RustSec database (needs GitHub; fails if it cannot be reached).
audit: setup
	@command -v cargo-deny >/dev/null || $(CARGO) install --locked cargo-deny
	$(CARGO) deny --workspace check licenses bans sources
	@scripts/advisories.sh --live

# Every wire-protocol decoder under libFuzzer for a bounded time (FUZZ_SECONDS per target).
fuzz: setup
	@scripts/fuzz.sh

# Lint and fuzz, then unit tests of every crate and the end-to-end suite against local pods,
# the process-tree and service-manager tests again under the ptrace interceptor, then the test
# cluster (needs root): its smoke suite on a running one, or else the whole cycle
# (tests/cluster/test.sh; a fresh machine first builds the cluster, about 19 minutes).
test: build fixtures lint fuzz
	$(CARGO) test --workspace
	KMIRROR_INTERCEPTOR=ptrace $(CARGO) test --test process_trees --test systemd_run --test service_manager
	@tests/cluster/test.sh

clean:
	$(CARGO) clean

# Boots Debian's 5.10, 6.1 and 6.12 kernels under qemu and runs the core end-to-end subset in
# each (needs root; KERNELS="6.1" for one). One line per kernel; fails if any kernel fails.
kernel-matrix: build fixtures
	@tests/kernels/matrix.sh

# Measures kmirror's overheads against same-run baselines (needs root); BENCH_ARGS=--quick for
# a short run. Prints a table and writes target/bench/results.json; see BENCHMARKS.md.
.PHONY: bench
bench: setup fixtures
	$(CARGO) build --release --workspace
	$(CARGO) run --release -p kmirror-suite --bin kmirror-bench -- $(BENCH_ARGS)

# A real single-node Kubernetes built from source (README, "Kubernetes test cluster"); `make
# test` runs it too. Needs root. cluster-build builds what is missing into
# /var/cache/kmirror/cluster (cold: tens of minutes); cluster-up builds, starts and waits for
# the node to be Ready, printing `export KUBECONFIG=...` last; cluster-down removes everything
# up made; cluster-import IMAGE=archive.tar imports an OCI archive (scripts/oci-image.sh).
.PHONY: cluster-build cluster-up cluster-down cluster-status cluster-import cluster-test-images
cluster-build:
	@tests/cluster/build.sh
cluster-up: fixtures
	@tests/cluster/cluster.sh up
cluster-down:
	@tests/cluster/cluster.sh down
cluster-status:
	@tests/cluster/cluster.sh status
cluster-import:
	@tests/cluster/cluster.sh import $(IMAGE)
cluster-test-images:
	@tests/cluster/test-oci-image.sh
# The smoke suite on a running cluster; the whole cycle (up, smoke, down, nothing left, twice).
.PHONY: cluster-smoke cluster-test
cluster-smoke:
	@tests/cluster/smoke.sh
cluster-test: fixtures
	@tests/cluster/cycle.sh

# cloudinfra: the original workflow (cloudapps, runserver, rundeploy), plus
# test, demo, bench and clean. See README.md.

CARGO ?= cargo
RELEASE := target/release
CLIENT_LINKS := client/cloud client/deploy client/status client/retrieve client/cancel
# Where `make runserver` listens and which nodes it runs; on a shared machine
# pick free ones: make runserver LISTEN=127.0.0.1:9100 NODES=my_nodes.txt
# SERVER_ARGS="--time-limit 60" (see README.md, "On a shared machine").
LISTEN ?= 127.0.0.1:9000
NODES ?= cloud_nodes.txt
SERVER_ARGS ?=
# `make rundeploy` deploys to $CLOUD_SERVER if set, else to LISTEN.
CLOUD_SERVER ?= $(LISTEN)
# The client program (client/cloud and its names deploy, status, retrieve,
# cancel) is built for musl where Rust's musl target is installed
# (`rustup target add x86_64-unknown-linux-musl`): a static program that
# starts without glibc's CPU-feature probing, a quarter of a millisecond
# less CPU per command on a VM (docs/PERFORMANCE.md). Without that target,
# or with CLIENT_LIBC=gnu, the glibc build (static-pie: build.rs).
MUSL_TARGET := $(shell uname -m)-unknown-linux-musl
MUSL_LIBDIR := $(shell rustc --print target-libdir --target $(MUSL_TARGET) 2>/dev/null)
HAVE_MUSL := $(if $(wildcard $(MUSL_LIBDIR)/libstd-*.rlib),yes)
CLIENT_LIBC ?= $(if $(HAVE_MUSL),musl,gnu)
ifeq ($(CLIENT_LIBC),musl)
ifneq ($(HAVE_MUSL),yes)
$(error CLIENT_LIBC=musl, but Rust's $(MUSL_TARGET) target is not installed: rustup target add $(MUSL_TARGET))
endif
CLIENT_NOTE := @echo "client: the musl build (CLIENT_LIBC=gnu for the glibc one)"
CLIENT_BUILD := $(CARGO) build --release --target $(MUSL_TARGET) --bin cloud
CLIENT_BIN := target/$(MUSL_TARGET)/release/cloud
else ifeq ($(CLIENT_LIBC),gnu)
CLIENT_NOTE := @echo "client: the glibc build ($(if $(HAVE_MUSL),CLIENT_LIBC=gnu,no Rust musl target: rustup target add $(MUSL_TARGET) for a leaner one))"
CLIENT_BUILD := @:
CLIENT_BIN := $(RELEASE)/cloud
else
$(error CLIENT_LIBC is musl or gnu, not "$(CLIENT_LIBC)")
endif

.PHONY: all cloudapps runserver rundeploy test demo bench clean

all: cloudapps

# Release binaries, the client programs in client/, and client/client.tar.gz.
cloudapps:
	$(CARGO) build --release --bins
	$(CLIENT_NOTE)
	$(CLIENT_BUILD)
	ln -sf ../$(CLIENT_BIN) client/cloud
	ln -sf cloud client/deploy
	ln -sf cloud client/status
	ln -sf cloud client/retrieve
	ln -sf cloud client/cancel
	tar czf client/client.tar.gz -C client/sample .

# The server in the foreground, with ./cloud_nodes.txt (Ctrl-C stops it).
runserver: cloudapps
	$(RELEASE)/cloud-server --nodes $(NODES) --listen $(LISTEN) $(SERVER_ARGS)

# Deploy the sample with one replica (needs `make runserver` elsewhere).
rundeploy: cloudapps
	cd client && CLOUD_SERVER=$(CLOUD_SERVER) ./deploy 1 client.tar.gz

# Everything CI checks: formatting, lints (benches included), unit,
# integration and interop tests; then, where the client is built for musl,
# the client's tests again with that build of it (CLOUD_TEST_CLIENT). The
# benchmark runs only with `make bench`.
CLIENT_TESTS := --test cli --test client_errors --test client_disconnect --test lean_client \
	--test end_to_end --test ownership --test docs
test:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test
ifeq ($(CLIENT_LIBC),musl)
	$(CARGO) build --target $(MUSL_TARGET) --bin cloud
	CLOUD_TEST_CLIENT=$(CURDIR)/target/$(MUSL_TARGET)/debug/cloud $(CARGO) test $(CLIENT_TESTS)
endif

# A guided tour: server in the background, 2 replicas, status, retrieve.
demo: cloudapps
	sh client/demo.sh

# What a user measures, against what they would script instead (the real
# client programs; ext4 work dir and tmpfs): a table on stdout,
# target/bench/results.json and target/bench/ratios.svg. 1.5 to 3 minutes;
# CLOUD_BENCH_QUICK=1 skips the 1 GiB transfer, CLOUD_BENCH_PROFILE=1 adds
# strace counts and a perf flame graph. See docs/PERFORMANCE.md.
bench:
	$(CLIENT_NOTE)
	$(CLIENT_BUILD)
	CLOUD_BENCH_CLIENT=$(CURDIR)/$(CLIENT_BIN) $(CARGO) bench --bench pipeline

clean:
	$(CARGO) clean
	rm -f $(CLIENT_LINKS) client/client.tar.gz
	rm -rf work client/outdir* client/ticket_* client/demo-out
	rm -f client/cloud.x client/cloud.h client/cloud_*.c client/cloud_interop

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

.PHONY: all cloudapps runserver rundeploy test demo bench clean

all: cloudapps

# Release binaries, the client programs in client/, and client/client.tar.gz.
cloudapps:
	$(CARGO) build --release --bins
	ln -sf ../$(RELEASE)/cloud client/cloud
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
# integration and interop tests. The benchmark runs only with `make bench`.
test:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test

# A guided tour: server in the background, 2 replicas, status, retrieve.
demo: cloudapps
	sh client/demo.sh

# What a user measures, against what they would script instead (the real
# client programs; ext4 work dir and tmpfs): a table on stdout,
# target/bench/results.json and target/bench/ratios.svg. 1.5 to 3 minutes;
# CLOUD_BENCH_QUICK=1 skips the 1 GiB transfer, CLOUD_BENCH_PROFILE=1 adds
# strace counts and a perf flame graph. See docs/PERFORMANCE.md.
bench:
	$(CARGO) bench --bench pipeline

clean:
	$(CARGO) clean
	rm -f $(CLIENT_LINKS) client/client.tar.gz
	rm -rf work client/outdir* client/ticket_* client/demo-out
	rm -f client/cloud.x client/cloud.h client/cloud_*.c client/cloud_interop

#!/bin/sh
# `make demo`: start a server in the background, deploy the sample with 2
# replicas, show its status, retrieve the outputs, print them, stop, clean.
# Every port is a free one the kernel picks (two students on one machine
# never collide): 4 nodes on port 0 lines, clients on 127.0.0.1:0, and the
# ports taken are printed. SERVER_ARGS passes more cloud-server options.
set -eu
cd "$(dirname "$0")/.."
SERVER=target/release/cloud-server
LOG=$(mktemp)
WORK=$(mktemp -d)
NODES=$WORK/nodes.txt
printf '4\n0\n0\n0\n0\n' > "$NODES"
cleanup() {
    [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    rm -rf "$WORK" "$LOG" client/demo-out
}
trap cleanup EXIT INT TERM

echo "== starting cloud-server (4 nodes and the client port on free ports)"
# SERVER_ARGS is split into words on purpose.
# shellcheck disable=SC2086
"$SERVER" --nodes "$NODES" --listen "127.0.0.1:0" --work-dir "$WORK/work" ${SERVER_ARGS:-} 2>"$LOG" &
PID=$!
# Wait for the ready line (or for the server to give up with its reason).
tries=0
until grep -q "listening on" "$LOG"; do
    if ! kill -0 "$PID" 2>/dev/null; then
        cat "$LOG"
        exit 1
    fi
    tries=$((tries + 1)); [ $tries -gt 100 ] && { echo "server did not start"; cat "$LOG"; exit 1; }
    sleep 0.1
done
grep "listening on" "$LOG"
CLOUD_SERVER=$(sed -n 's/.*listening on \([^ ]*\) .*/\1/p' "$LOG" | head -n 1)
export CLOUD_SERVER
echo "== clients talk to $CLOUD_SERVER (CLOUD_SERVER); nodes: $(sed -n 's/.* nodes: \([0-9.: ]*\);.*/\1/p' "$LOG" | head -n 1)"

cd client
echo; echo "== ./deploy 2 client.tar.gz"
TICKET=$(./deploy 2 client.tar.gz | sed -n 's/^Job ticket#: //p')
echo "Job ticket#: $TICKET"
echo; echo "== ./status $TICKET"
./status "$TICKET"
echo; echo "== ./retrieve $TICKET demo-out   (waits for both replicas, then closes the ticket)"
./retrieve "$TICKET" demo-out
for f in demo-out/output_*.txt; do
    echo; echo "== $f"; cat "$f"
done
# Each replica counted its own share of the samples: add them up.
awk '/^samples/ { n += $2; k += $4 } END { if (n) printf "\n== both replicas together: pi is about %.6f (%d samples)\n", 4 * k / n, n }' demo-out/output_*.txt
echo; echo "== ./status $TICKET --json   (the ticket is closed now)"
./status "$TICKET" --json || true
cd ..
echo; echo "== stopping the server"
kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
tail -n 1 "$LOG"

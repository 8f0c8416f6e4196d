//! `cloud-server --register` against a real rpcbind: `rpcinfo -p` lists
//! CLOUD_PROG, `rpcinfo -t` pings it, and after a clean stop it is gone.
//! Everything runs in private network and mount namespaces (`unshare -n -m`,
//! a tmpfs on /run for rpcbind's socket and lock), so the machine's own
//! rpcbind, if any, is never touched. The course's C client (rpcgen stubs,
//! `clnt_create(host, PROG, VERS, "tcp")`) finds the server the same way.
//! Needs root (CI runs as root).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Run inside the namespaces; prints markers the test checks.
const SCRIPT: &str = r#"
set -u
mount -t tmpfs tmpfs /run || exit 90
ip link set lo up || exit 91
cd "$DIR"
# Ports of this private network namespace: nothing else is in it.
printf '1\n47311\n' > nodes.txt
ready() { i=0; while ! grep -q "listening on\|^cloud-server:" "$1" 2>/dev/null; do i=$((i+1)); [ $i -gt 300 ] && return 1; sleep 0.1; done; }

echo "== without rpcbind"
"$SERVER" --nodes nodes.txt --listen 127.0.0.1:0 --work-dir w1 --no-slot-uids --register 2> s1.log &
S=$!
ready s1.log || echo "NOT READY"
kill -TERM $S; wait $S
cat s1.log

mkdir -p /run/rpcbind
rpcbind -f &
RB=$!
i=0; while ! rpcinfo -p >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 300 ] && echo "RPCBIND DID NOT START" && break; sleep 0.1; done
# A stale mapping, left by a server that was killed: replaced at start.
"$SERVER" --nodes nodes.txt --listen 127.0.0.1:0 --work-dir w0 --no-slot-uids --register 2> s0.log &
S=$!
ready s0.log || echo "NOT READY"
kill -KILL $S; wait $S
echo "== stale"
rpcinfo -p | grep 536920333

echo "== with rpcbind"
"$SERVER" --nodes nodes.txt --listen 127.0.0.1:0 --work-dir w2 --no-slot-uids --register 2> s2.log &
S=$!
ready s2.log || echo "NOT READY"
cat s2.log
echo "== rpcinfo -p"
rpcinfo -p
echo "== rpcinfo -t"
rpcinfo -t 127.0.0.1 536920333 1 && echo "PING OK"
echo "== clnt_create"
"$CLNT" 127.0.0.1 4000000000; echo "client exit $?"
kill -TERM $S; wait $S; echo "server exit $?"
echo "== after stop"
rpcinfo -p
kill $RB
"#;

/// rpcgen's stubs for docs/cloud.x and tests/interop/cloud_portmap.c, on
/// libtirpc (as tests/interop.rs builds them; .ci/run installs the tools).
fn build_course_client(d: &Path) -> std::path::PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    std::fs::copy(format!("{root}/docs/cloud.x"), d.join("cloud.x")).unwrap();
    std::fs::copy(format!("{root}/tests/interop/cloud_portmap.c"), d.join("cloud_portmap.c")).unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd.current_dir(d).output().expect("run a build tool (rpcgen, cc)");
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    for (flag, out) in [("-h", "cloud.h"), ("-c", "cloud_xdr.c"), ("-l", "cloud_clnt.c")] {
        run(Command::new("rpcgen").args([flag, "-o", out, "cloud.x"]));
    }
    run(Command::new("cc").args([
        "-D_GNU_SOURCE",
        "-I/usr/include/tirpc",
        "-o",
        "cloud_portmap",
        "cloud_portmap.c",
        "cloud_clnt.c",
        "cloud_xdr.c",
        "-ltirpc",
    ]));
    d.join("cloud_portmap")
}

fn have(tool: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().any(|d| Path::new(d).join(tool).exists())
}

#[test]
fn register_lists_the_server_with_rpcbind_and_unsets_it_at_stop() {
    let test = "register_lists_the_server_with_rpcbind_and_unsets_it_at_stop";
    if !need_root(test) {
        return;
    }
    for tool in ["rpcbind", "rpcinfo", "unshare", "ip", "rpcgen", "cc"] {
        if !have(tool) {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{test} needs {tool} (.ci/run installs rpcbind, util-linux, iproute2, rpcsvc-proto, gcc)");
            }
            eprintln!("SKIPPED {test}: no {tool}");
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let clnt = build_course_client(dir.path());
    let out = Command::new("timeout")
        .args(["120", "unshare", "-n", "-m", "sh", "-c", SCRIPT])
        .env("SERVER", SERVER)
        .env("DIR", dir.path())
        .env("CLNT", &clnt)
        .output()
        .expect("run unshare");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let section =
        |name: &str| text.split(&format!("== {name}\n")).nth(1).unwrap_or("").split("== ").next().unwrap_or("");
    assert!(out.status.success(), "{text}");

    // Without rpcbind: one line, and the server serves anyway.
    let alone = section("without rpcbind");
    assert!(
        alone.contains(
            "cloud-server: cannot register with rpcbind at 127.0.0.1:111 (Connection refused (os error 111)): \
             rpcinfo will not list the server; start rpcbind or drop --register\n"
        ),
        "{text}"
    );
    assert!(alone.contains("listening on"), "{text}");

    let port = section("with rpcbind")
        .split("listening on 127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("no ready line: {text}"))
        .to_string();
    assert!(section("stale").contains("536920333"), "a killed server leaves its mapping: {text}");
    let listed = section("rpcinfo -p");
    assert_eq!(listed.matches("536920333").count(), 1, "the stale mapping was replaced: {text}");
    assert!(
        listed.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["536920333", "1", "tcp", &port]),
        "rpcinfo -p lists CLOUD_PROG on TCP at our port {port}: {text}"
    );
    assert!(section("rpcinfo -t").contains("program 536920333 version 1 ready and waiting"), "{text}");
    // The course's own client code, unchanged: clnt_create through the portmapper.
    let course = section("clnt_create");
    assert!(course.contains("clnt_create found the server; STATUS 4000000000: stat 1 ("), "{text}");
    assert!(course.contains("client exit 0"), "{text}");
    assert!(text.contains("server exit 0"), "{text}");
    let after = section("after stop");
    assert!(after.contains("portmapper") && !after.contains("536920333"), "unset at stop: {text}");
}

//! Interop: `rpcgen` on docs/cloud.x, a C client on libtirpc, the real
//! server. Needs rpcgen (rpcsvc-proto), libtirpc-dev and a C compiler;
//! under CI=true a missing tool is a failure, elsewhere a loud skip.

mod common;

use std::path::Path;
use std::process::Command;

fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

fn tools_present() -> bool {
    let missing: Vec<&str> = ["rpcgen", "cc"].into_iter().filter(|t| !have(t)).collect();
    let tirpc = Path::new("/usr/include/tirpc/rpc/rpc.h").exists();
    if missing.is_empty() && tirpc {
        return true;
    }
    let what = format!("missing {missing:?}{}", if tirpc { "" } else { " and libtirpc-dev headers" });
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("interop test cannot run under CI: {what} (apt-get install rpcsvc-proto libtirpc-dev gcc)");
    }
    eprintln!("SKIPPED interop test: {what} (apt-get install rpcsvc-proto libtirpc-dev gcc)");
    false
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rpcgen_client_on_libtirpc_talks_to_the_server() {
    if !tools_present() {
        return;
    }
    let c = common::Cluster::start(2);
    let d = c.dir.path();
    let root = env!("CARGO_MANIFEST_DIR");
    std::fs::copy(format!("{root}/docs/cloud.x"), d.join("cloud.x")).unwrap();
    std::fs::copy(format!("{root}/tests/interop/cloud_interop.c"), d.join("cloud_interop.c")).unwrap();
    for (flag, out) in [("-h", "cloud.h"), ("-c", "cloud_xdr.c"), ("-l", "cloud_clnt.c")] {
        // rpcgen must accept docs/cloud.x unchanged.
        run(Command::new("rpcgen").current_dir(d).args([flag, "-o", out, "cloud.x"]));
    }
    run(Command::new("cc").current_dir(d).args([
        "-D_GNU_SOURCE",
        "-I/usr/include/tirpc",
        "-o",
        "cloud_interop",
        "cloud_interop.c",
        "cloud_clnt.c",
        "cloud_xdr.c",
        "-ltirpc",
    ]));
    // An archive over 64 KiB (incompressible filler), so libtirpc sends
    // the call in several fragments.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let filler: String = (0..150_000)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (b'!' + (seed % 90) as u8) as char
        })
        .collect();
    let archive = common::archive(
        d,
        "interop.tar.gz",
        &[("Makefile", "run:\n\t@echo interop says hello from $$CLOUD_NODE_PORT\n"), ("filler.txt", &filler)],
    );
    assert!(std::fs::metadata(&archive).unwrap().len() > 64 * 1024);
    let out = Command::new(d.join("cloud_interop"))
        .args([&c.addr.port().to_string(), archive.to_str().unwrap(), "interop says hello"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "C client failed:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("0 failure(s)"), "{text}");
}

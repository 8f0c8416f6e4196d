//! The client programs start lean (issue 11: a user pays two `cloud`
//! processes per job): the binary loads no shared libraries (build.rs links
//! it statically), and its own entry point (src/bin/cloud.rs) still does
//! what Rust's start-up did for it: a client started with stdout closed
//! does not print into its connection to the server.

mod common;

use std::io::Read;
use std::process::Command;

use common::{client, job, Cluster};

/// The `p_type` of each program header of the ELF64 little-endian file at `path`.
fn program_header_types(path: &str) -> Vec<u32> {
    let mut head = vec![0u8; 64 << 10];
    let n = std::fs::File::open(path).and_then(|mut f| f.read(&mut head)).expect("read the client binary");
    let b = &head[..n];
    assert!(b.len() >= 64 && b.starts_with(b"\x7fELF") && b[4] == 2 && b[5] == 1, "{path}: not an ELF64 LE file");
    let u16_at = |o: usize| usize::from(u16::from_le_bytes([b[o], b[o + 1]]));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes")) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    assert!(phoff + phnum * phentsize <= b.len(), "{path}: program headers past the first 64 KiB");
    (0..phnum).map(|i| u32::from_le_bytes(b[phoff + i * phentsize..][..4].try_into().expect("4 bytes"))).collect()
}

#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn client_program_loads_no_shared_libraries() {
    if std::env::var("CLOUD_CLIENT_DYNAMIC").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED client_program_loads_no_shared_libraries: CLOUD_CLIENT_DYNAMIC=1 links cloud dynamically");
        return;
    }
    const PT_LOAD: u32 = 1;
    const PT_INTERP: u32 = 3;
    let types = program_header_types(client());
    assert!(types.contains(&PT_LOAD), "{}: no loadable segment in {types:?}", client());
    assert!(
        !types.contains(&PT_INTERP),
        "{} names a dynamic loader (PT_INTERP): build.rs did not link it statically (its cargo warning says why)",
        client()
    );
}

#[test]
fn client_with_stdout_closed_does_not_print_into_its_connection() {
    let c = Cluster::start_with(1, &[]);
    let archive = job(c.dir.path(), "hi.tar.gz", &["echo hi from the job"]);
    let ticket = c.deploy(1, &archive).to_string();
    let done = c.cloud(&["status", &ticket, "--wait"]);
    assert!(done.status.success(), "status --wait: {}", String::from_utf8_lossy(&done.stderr));
    // `>&-`: the client starts without fd 1, and `--follow` opens its
    // connection first, then prints the output and makes another call. Had
    // the socket taken fd 1, the output would reach the server as the start
    // of that call, which would never be answered (--timeout: the client
    // gives up before the server's call timeout and a retry).
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"exec "$0" retrieve "$1" --follow --timeout 20 --server "$2" >&-"#)
        .arg(client())
        .arg(&ticket)
        .arg(c.addr.to_string())
        .output()
        .expect("run sh");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.is_empty(), "retrieve --follow with stdout closed: {err}");
    // The server still holds the output: nothing was lost or mixed up.
    let run = c.dir.path().join("out");
    let got = c.cloud(&["retrieve", &ticket, run.to_str().expect("utf-8 path")]);
    assert!(got.status.success(), "retrieve: {}", String::from_utf8_lossy(&got.stderr));
    let text: String = std::fs::read_dir(&run)
        .expect("read out dir")
        .flatten()
        .map(|f| std::fs::read_to_string(f.path()).unwrap_or_default())
        .collect();
    assert!(text.contains("hi from the job"), "output files hold {text:?}");
}

/// `retrieve DIR --sync` fsyncs each output and DIR before it closes the
/// ticket; plain `retrieve DIR` (like cp) fsyncs nothing. Seen with strace,
/// which CI installs; elsewhere the test says it is skipped without it.
#[test]
fn retrieve_fsyncs_only_when_asked() {
    if Command::new("strace").arg("-V").output().is_err() {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI installs strace");
        eprintln!("SKIPPED retrieve_fsyncs_only_when_asked: no strace");
        return;
    }
    let c = Cluster::start_with(2, &[]);
    let archive = job(c.dir.path(), "hi.tar.gz", &["echo hi from the job"]);
    for sync in [false, true] {
        let ticket = c.deploy(2, &archive).to_string();
        let out = c.dir.path().join(format!("out-{sync}"));
        let trace = c.dir.path().join(format!("trace-{sync}"));
        let mut args = vec!["retrieve", &ticket, out.to_str().expect("utf-8 path")];
        if sync {
            args.push("--sync");
        }
        let run = Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=fsync,fdatasync,sync,syncfs", "-o"])
            .arg(&trace)
            .arg(client())
            .args(&args)
            .arg("--server")
            .arg(c.addr.to_string())
            .output()
            .expect("run strace");
        assert!(run.status.success(), "retrieve: {}", String::from_utf8_lossy(&run.stderr));
        let calls = std::fs::read_to_string(&trace).expect("read the trace");
        let syncs = calls.lines().filter(|l| l.contains("sync")).count();
        assert_eq!(syncs, if sync { 3 } else { 0 }, "sync={sync}: two outputs and their directory; trace:\n{calls}");
        let text: Vec<String> = std::fs::read_dir(&out)
            .expect("read out dir")
            .flatten()
            .map(|f| std::fs::read_to_string(f.path()).unwrap_or_default())
            .collect();
        assert_eq!(text.len(), 2, "one file per replica: {text:?}");
        assert!(text.iter().all(|t| t.contains("hi from the job")), "outputs: {text:?}");
        // And the ticket is closed: the outputs are only here now.
        let gone = c.cloud(&["status", &ticket]);
        assert!(!gone.status.success(), "ticket {ticket} still open after retrieve");
    }
}

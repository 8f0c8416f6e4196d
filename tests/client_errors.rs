//! What a newcomer gets wrong first, and the one line the client programs
//! answer with: it must say what went wrong and what to do.

mod common;

use common::*;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A port nothing listens on (held, then released).
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[test]
fn a_directory_without_a_makefile_is_refused_naming_it_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job");
    std::fs::create_dir_all(job.join("sub")).unwrap();
    std::fs::write(job.join("main.c"), "int main(void) { return 0; }\n").unwrap();
    // No server: the directory is judged before any connection is tried.
    let server = closed_port();
    let out = Command::new(client()).args(["deploy", "1"]).arg(&job).args(["--server", &server]).output().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{} has no Makefile", job.display())), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A Makefile one level down: name the directory to deploy instead.
    std::fs::write(job.join("sub").join("Makefile"), "run:\n\ttrue\n").unwrap();
    let out = Command::new(client()).args(["deploy", "1"]).arg(&job).args(["--server", &server]).output().unwrap();
    let err = text(&out.stderr);
    assert!(err.contains(&format!("did you mean: deploy N {}", job.join("sub").display())), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_server_address_without_a_port_says_host_port() {
    for bad in ["127.0.0.1", "localhost", "9000"] {
        let out = Command::new(client()).args(["status", "1", "--server", bad]).output().unwrap();
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains("not a HOST:PORT address"), "{bad}: {err}");
        assert!(!err.contains("make runserver"), "{bad}: not a question of the server running: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        // The same through the environment.
        let out = Command::new(client()).args(["status", "1"]).env("CLOUD_SERVER", bad).output().unwrap();
        assert!(text(&out.stderr).contains("not a HOST:PORT address"), "{bad}: {}", text(&out.stderr));
    }
}

#[test]
fn a_client_pointed_at_a_node_port_is_told_to_use_the_ready_lines_address() {
    let c = Cluster::start(1);
    let node = format!("127.0.0.1:{}", c.ports[0]);
    for args in [vec!["status", "1"], vec!["retrieve", "1", "out"]] {
        let out = Command::new(client()).args(&args).args(["--server", &node]).output().unwrap();
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line, the retry's notice included: {err}");
        assert!(err.contains("a node's port is not") && err.contains("listening on"), "{args:?}: {err}");
    }
}

#[test]
fn a_work_dir_the_server_cannot_create_says_to_pick_another() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nodes = dir.path().join("nodes.txt");
    std::fs::write(&nodes, format!("1\n{port}\n")).unwrap();
    // A regular file where a directory of the work dir's path should be.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    let slot_base = (1_000_000 + u32::from(port) * 64).to_string();
    let out = Command::new(SERVER)
        .args(["--slot-uids", &slot_base, "--listen", "127.0.0.1:0", "--nodes"])
        .arg(&nodes)
        .arg("--work-dir")
        .arg(blocker.join("work"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("cannot create work dir") && err.contains("--work-dir"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn command_line_mistakes_get_one_line_with_the_usage_as_typed() {
    // As `cloud deploy`.
    let out = Command::new(client()).args(["deploy", "1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("cloud: ") && err.contains("<ARCHIVE>"), "{err}");
    assert!(err.contains("Usage: cloud deploy <REPLICAS> <ARCHIVE>"), "{err}");
    // As `deploy` (the original program names are links to `cloud`).
    let dir = tempfile::tempdir().unwrap();
    let deploy = dir.path().join("deploy");
    std::os::unix::fs::symlink(client(), &deploy).unwrap();
    let out = Command::new(&deploy).arg("x").arg("job.tar.gz").output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("deploy: invalid value 'x' for '<REPLICAS>'"), "{err}");
    let out = Command::new(&deploy).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("Usage: deploy [OPTIONS] <REPLICAS> <ARCHIVE>"), "{}", text(&out.stdout));
    // An argument that is not UTF-8 (a file name in Latin-1) is named as
    // such, not a panic.
    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9.tar.gz");
    let out = Command::new(&deploy).arg("1").arg(latin1).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stderr), "deploy: an argument is not valid UTF-8; give names and paths in UTF-8\n");
    // The server's options too.
    let out = Command::new(SERVER).args(["--max-memory", "12X"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("cloud-server: invalid value '12X'") && err.contains("is not a size"), "{err}");
}

/// An address copied with a space around it (`CLOUD_SERVER="HOST:PORT "`)
/// reaches the server as the bare address would.
#[test]
fn spaces_around_the_server_address_are_ignored() {
    let c = Cluster::start(1);
    for padded in [format!("{} ", c.addr), format!(" {}", c.addr)] {
        let out = Command::new(client()).args(["status"]).env("CLOUD_SERVER", &padded).output().unwrap();
        assert!(out.status.success(), "{padded:?}: {}", text(&out.stderr));
        let out = Command::new(client()).args(["status", "--server", &padded]).output().unwrap();
        assert!(out.status.success(), "{padded:?}: {}", text(&out.stderr));
    }
}

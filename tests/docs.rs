//! The docs cannot rot: every command block marked runnable in README.md,
//! docs/PROTOCOL.md and docs/LAB.md is run against a real server, in order,
//! one shell session per file, and must succeed.
//!
//! A block is runnable when its fence's info string says so:
//!
//! ```text
//! ```sh runnable
//! ./deploy 1 client.tar.gz
//! ```
//! ```
//!
//! Each file's blocks run with `sh -eu` in a fresh directory laid out like
//! `client/` after `make cloudapps`: `deploy`, `status`, `retrieve`,
//! `cancel` and `cloud` (links to the client binary), `client.tar.gz` and
//! `sample/`. `CLOUD_SERVER` points at a server of 4 nodes started for that
//! file, `CLOUD_SERVER_BIN` is the `cloud-server` binary and `REPO` the
//! source tree. Output of a failing block is shown with the block.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A runnable block: where it starts (1-based line of the fence) and its text.
#[derive(Debug, PartialEq)]
struct Block {
    line: usize,
    text: String,
}

/// The runnable blocks of a Markdown text, in order.
fn runnable_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String, bool)> = None;
    for (i, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut open {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    let runnable = info.split_whitespace().any(|w| w == "runnable");
                    open = Some((i + 1, String::new(), runnable));
                }
            }
            Some((start, text, runnable)) => {
                if trimmed.starts_with("```") {
                    if *runnable {
                        blocks.push(Block { line: *start, text: std::mem::take(text) });
                    }
                    open = None;
                } else {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
    }
    blocks
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A directory laid out like `client/` after `make cloudapps`.
fn client_dir(root: &Path) -> PathBuf {
    let dir = root.join("client");
    std::fs::create_dir_all(&dir).expect("mkdir client");
    for name in ["cloud", "deploy", "status", "retrieve", "cancel"] {
        std::os::unix::fs::symlink(client(), dir.join(name)).expect("link client");
    }
    let sample = repo().join("client/sample");
    let copied = Command::new("cp").arg("-r").arg(&sample).arg(dir.join("sample")).status().expect("cp");
    assert!(copied.success(), "cannot copy client/sample");
    let tarred = Command::new("tar")
        .arg("czf")
        .arg(dir.join("client.tar.gz"))
        .arg("-C")
        .arg(&sample)
        .arg(".")
        .status()
        .expect("tar");
    assert!(tarred.success(), "cannot pack client/sample");
    dir
}

/// Run every runnable block of `doc` (relative to the repo) and return a
/// description of each failure.
fn run_doc(doc: &str, must_have: bool) -> Vec<String> {
    let path = repo().join(doc);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return if must_have { vec![format!("{doc}: missing")] } else { Vec::new() };
    };
    let blocks = runnable_blocks(&text);
    if must_have && blocks.is_empty() {
        return vec![format!("{doc}: no block is marked runnable")];
    }
    if blocks.is_empty() {
        return Vec::new();
    }
    let c = Cluster::start(4);
    let root = tempfile::tempdir().expect("tempdir");
    let dir = client_dir(root.path());
    let mut failures = Vec::new();
    // One session per file: later blocks may use what earlier ones set.
    let mut script = String::from("set -eu\n");
    for b in &blocks {
        script.push_str(&format!("echo '>>> {doc} line {}' >&2\n", b.line));
        script.push_str(&b.text);
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .current_dir(&dir)
        .env("CLOUD_SERVER", c.addr.to_string())
        .env("CLOUD_SERVER_BIN", SERVER)
        .env("REPO", repo())
        .output()
        .expect("run sh");
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let at = stderr.lines().rfind(|l| l.starts_with(">>> ")).unwrap_or(">>> (before any block)");
        failures.push(format!(
            "{doc}: the block at {} failed ({})\n--- stdout\n{}\n--- stderr\n{stderr}\n--- server log\n{}",
            at.trim_start_matches(">>> "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            c.log()
        ));
    }
    failures
}

#[test]
fn runnable_blocks_are_found_in_order_and_others_are_not() {
    let md = "text\n```sh runnable\na\nb\n```\n```sh\nnot me\n```\n  ```text runnable\nc\n  ```\n";
    let blocks = runnable_blocks(md);
    assert_eq!(blocks, vec![Block { line: 2, text: "a\nb\n".into() }, Block { line: 9, text: "c\n".into() }]);
}

#[test]
fn a_failing_block_is_reported() {
    // The checker itself must be able to fail.
    let root = tempfile::tempdir().expect("tempdir");
    let doc = root.path().join("bad.md");
    std::fs::write(&doc, "```sh runnable\n./status --help >/dev/null\nfalse\n```\n").expect("write");
    let failures = run_doc(doc.to_str().expect("utf-8 path"), true);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].contains("line 1"), "{}", failures[0]);
}

#[test]
fn readme_commands_work() {
    let failures = run_doc("README.md", true);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn protocol_commands_work() {
    let failures = run_doc("docs/PROTOCOL.md", true);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn lab_commands_work() {
    let failures = run_doc("docs/LAB.md", false);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

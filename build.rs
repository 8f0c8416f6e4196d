//! Build script: links the `cloud` client program statically (static-pie)
//! on Linux with glibc, so that each `cloud deploy` / `cloud retrieve`
//! starts without loading and relocating shared libraries (about 0.4 ms of
//! CPU and 40 page faults a process; docs/PERFORMANCE.md, "Lean client
//! programs"). Every other binary (cloud-server, tests, benches) stays
//! dynamic, and nothing else is built differently.
//!
//! Why not `-C target-feature=+crt-static`: in RUSTFLAGS it also reaches
//! proc-macro crates, which cannot be static, unless every build names an
//! explicit `--target` (and a different target/ directory). Here the
//! `cloud` binary alone gets two link arguments: `-static-pie`, and a
//! library directory in OUT_DIR where `-lc`, `-lgcc_s` and the other
//! libraries rustc asks for dynamically are small linker scripts naming the
//! static archives (libc.a, libgcc_eh.a instead of libgcc_s, ...): the same
//! libraries rustc itself links for crt-static. With glibc 2.36 or later,
//! also `-z pack-relative-relocs` (fewer pages touched at start).
//!
//! (The Makefile builds the client for musl instead where Rust's musl
//! target is installed: static already, without glibc's start-up; README,
//! "The client program and musl". This script does nothing for that build.)
//!
//! Must not touch: any target but the `cloud` binary. When a static archive
//! cannot be found (no libc6-dev), or `CLOUD_CLIENT_DYNAMIC=1` is set, it
//! says so in a cargo warning and `cloud` is linked dynamically as before.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The libraries rustc passes as `-l` for a dynamic x86_64/aarch64 glibc
/// executable, and the static archives that stand in for each.
const SHADOWS: &[(&str, &[&str])] = &[
    ("gcc_s", &["libgcc_eh.a", "libgcc.a"]),
    ("c", &["libc.a", "libgcc_eh.a", "libgcc.a"]),
    ("m", &["libm.a"]),
    ("pthread", &["libpthread.a"]),
    ("rt", &["librt.a"]),
    ("util", &["libutil.a"]),
    ("dl", &["libdl.a"]),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CLOUD_CLIENT_DYNAMIC");
    println!("cargo:rerun-if-env-changed=CC");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CLOUD_CLIENT_DYNAMIC") == "1" {
        return;
    }
    // Only where this is known to work: a native Linux glibc build.
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" || var("TARGET") != var("HOST") {
        return;
    }
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return;
    };
    match shadow_dir(&out.join("static-client")) {
        Ok(dir) => {
            println!("cargo:rustc-link-arg-bin=cloud=-static-pie");
            println!("cargo:rustc-link-arg-bin=cloud=-L{}", dir.display());
            // Relative relocations packed (DT_RELR): the start-up code
            // applies them from a 1 KiB table instead of an 80 KiB one
            // (3 page faults, 0.02 ms). Only a glibc of 2.36 or later
            // applies them in a static program.
            if glibc_at_least(2, 36) {
                println!("cargo:rustc-link-arg-bin=cloud=-Wl,-z,pack-relative-relocs");
            }
        }
        Err(why) => println!("cargo:warning=the cloud client is linked dynamically: {why}"),
    }
}

/// Write the linker scripts into `dir`; the error says what is missing.
fn shadow_dir(dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for (lib, archives) in SHADOWS {
        let mut paths = Vec::new();
        for a in *archives {
            paths.push(find(a)?);
        }
        let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        let script =
            format!("/* cloudinfra build.rs: -l{lib} for the static cloud client */\nGROUP ( {} )\n", list.join(" "));
        let file = dir.join(format!("lib{lib}.so"));
        std::fs::write(&file, script).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    }
    Ok(dir.to_path_buf())
}

/// The build host's glibc (`getconf GNU_LIBC_VERSION`: "glibc 2.36") is
/// at least `major.minor`.
fn glibc_at_least(major: u32, minor: u32) -> bool {
    let Ok(out) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = text.trim().trim_start_matches("glibc ").split('.').map(|n| n.parse::<u32>().unwrap_or(0));
    let (a, b) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    out.status.success() && (a, b) >= (major, minor)
}

/// Where the C compiler finds `name` (e.g. libc.a), if it does.
fn find(name: &str) -> Result<PathBuf, String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .arg(format!("-print-file-name={name}"))
        .output()
        .map_err(|e| format!("cannot run {cc}: {e}"))?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    // cc prints the bare name when it does not find the file.
    if !out.status.success() || !path.is_absolute() || !path.is_file() {
        return Err(format!("{cc} finds no {name} (install libc6-dev, or set CLOUD_CLIENT_DYNAMIC=1 to silence this)"));
    }
    path.canonicalize().map_err(|e| format!("{}: {e}", path.display()))
}

//! Archives are checked while DEPLOY streams them in: a bad one gets no
//! ticket, the client says why in one line and exits nonzero, and nothing
//! is left in the spool; good ones in every usual shape deploy and run.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloudinfra::proto::{self, CloudStat};
use cloudinfra::record::{Event, RecordDecoder, Shape};
use cloudinfra::rpc;
use cloudinfra::xdr::XdrReader;
use common::tarkit::{entry, gnu_tar, gz, pax, tar_gz};
use common::*;
use tar::EntryType::*;

const LIMITS: &[&str] = &["--max-extract", "1M", "--max-path", "200", "--time-limit", "60"];

fn makefile(recipe: &str) -> Vec<u8> {
    entry("Makefile", Regular, 0o644, format!("run:\n\t{recipe}\n").as_bytes(), "")
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// `cloud deploy 1 FILE` must fail with one line saying `why`.
fn refused(c: &Cluster, path: &Path, why: &str) {
    let out = c.cloud(&["deploy", "1", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{} was accepted: {}", path.display(), String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.is_empty(), "no ticket printed");
    assert!(err.starts_with("deploy: bad archive: "), "{}: {err}", path.display());
    assert!(err.contains(why), "{}: {err:?} should say {why:?}", path.display());
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

fn spool_is_empty(c: &Cluster) -> bool {
    spool_data(c).is_empty()
}

/// A job that prints `text`, deployed and retrieved: its output.
fn runs(c: &Cluster, path: &Path) -> String {
    let t = c.deploy(1, path);
    let st = c.wait_status(t, |s| s["status"] == "COMPLETED" || s["status"] == "INVALID");
    assert_eq!(st["status"], "COMPLETED", "{}: {st}", path.display());
    let (ok, outs) = c.retrieve(t);
    assert!(ok);
    outs[0].1.clone()
}

#[test]
fn bad_archives_get_no_ticket_and_a_one_line_reason() {
    let c = Cluster::start_with(1, LIMITS);
    let d = c.dir.path();
    let good = tar_gz(&[makefile("@echo fine")]);
    let tar_only = [makefile("@echo x"), vec![0; 1024]].concat();
    let random: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut cases: Vec<(PathBuf, &str)> = vec![
        (write(d, "plain.tar", &tar_only), "not a gzip file"),
        (write(d, "random.tar.gz", &random), "not a gzip file"),
        (write(d, "empty.tar.gz", b""), "is empty"),
        (write(d, "notar.tar.gz", &gz(b"just some text, gzipped, but no tar inside")), "not a tar file"),
        (write(d, "cut.tar.gz", &good[..good.len() / 2]), "truncated"),
        (write(d, "nomake.tar.gz", &tar_gz(&[entry("main.c", Regular, 0o644, b"int main;", "")])), "no Makefile"),
        (
            write(d, "symmake.tar.gz", &tar_gz(&[entry("Makefile", Symlink, 0o777, b"", "/etc/passwd")])),
            "Makefile is a symbolic link",
        ),
        (
            write(d, "dirmake.tar.gz", &tar_gz(&[entry("Makefile/", Directory, 0o755, b"", "")])),
            "Makefile is a directory",
        ),
        (
            write(d, "submake.tar.gz", &tar_gz(&[entry("job/Makefile", Regular, 0o644, b"run:\n", "")])),
            "no Makefile at the top level, only job/Makefile",
        ),
        (
            write(d, "traversal.tar.gz", &tar_gz(&[makefile("@echo x"), entry("../../x", Regular, 0o644, b"x", "")])),
            "'..'",
        ),
        (
            write(d, "absolute.tar.gz", &tar_gz(&[makefile("@echo x"), entry("/tmp/x", Regular, 0o644, b"x", "")])),
            "absolute path",
        ),
        (
            write(d, "device.tar.gz", &tar_gz(&[makefile("@echo x"), entry("null", Char, 0o666, b"", "")])),
            "character device",
        ),
        (
            write(
                d,
                "pax-traversal.tar.gz",
                &tar_gz(&[makefile("@echo x"), pax(&[("path", "../../etc/x")]), {
                    let mut e = entry("innocent", Regular, 0o644, b"x", "");
                    e[257..265].copy_from_slice(b"ustar\x0000");
                    let mut h = tar::Header::from_byte_slice(&e[..512]).clone();
                    h.set_cksum();
                    e[..512].copy_from_slice(h.as_bytes());
                    e
                }]),
            ),
            "'..'",
        ),
    ];
    // A huge GNU long name: refused from its header, never buffered.
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(GNULongName);
    h.set_size(1 << 30);
    h.set_cksum();
    let long = [h.as_bytes().to_vec(), vec![b'a'; 64 * 1024]].concat();
    cases.push((write(d, "longname.tar.gz", &gz(&long)), "GNU long name of 1073741823 bytes"));
    // A gzip bomb: 64 MiB of zeros in one entry, a few tens of KiB compressed.
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(64 << 20);
    h.set_mode(0o644);
    t.append_data(&mut h, "bomb", std::io::repeat(0).take(64 << 20)).unwrap();
    let bomb = gz(&t.into_inner().unwrap());
    cases.push((write(d, "bomb.tar.gz", &bomb), "extraction limit (--max-extract)"));

    for (path, why) in &cases {
        refused(&c, path, why);
        assert!(spool_is_empty(&c), "{}: the refused archive was not emptied", path.display());
    }
    // No ticket was issued to any of them: the next good deploy gets ticket 1.
    let ok = write(d, "good.tar.gz", &good);
    assert_eq!(c.deploy(1, &ok), 1);
    wait_until("spool empty", || spool_is_empty(&c));
}

/// Send a DEPLOY by hand: the header, then only `send` bytes of `archive`.
fn partial_deploy(c: &Cluster, archive: &[u8], send: usize) -> (Result<(), (CloudStat, String)>, Duration) {
    let mut s = TcpStream::connect(c.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = rpc::call(7, proto::CLOUD_PROG, 1, proto::DEPLOY);
    w.u32(1).u32(archive.len() as u32);
    let head = w.into_bytes();
    let total = head.len() + archive.len().next_multiple_of(4);
    let mut wire = ((total as u32) | 0x8000_0000).to_be_bytes().to_vec();
    wire.extend_from_slice(&head);
    wire.extend_from_slice(&archive[..send]);
    let start = Instant::now();
    s.write_all(&wire).unwrap();
    let mut d = RecordDecoder::new(1 << 20, 0);
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("an answer before the upload is complete");
        assert!(n > 0, "closed without an answer");
        if let (_, Some(Event::Record(r))) = d.decode(&buf[..n], &mut |_| Shape::Whole) {
            let mut x = XdrReader::new(&r[rpc::SUCCESS_HEADER_LEN..]);
            return (proto::decode_stat(&mut x).unwrap(), start.elapsed());
        }
    }
}

#[test]
fn a_bomb_or_a_wrong_file_is_refused_before_the_upload_ends() {
    let c = Cluster::start_with(1, LIMITS);
    // Zeros after the end-of-archive marker: no header declares them.
    let mut tar = gnu_tar(&[("Makefile", b"run:\n\ttrue\n")]);
    tar.extend(std::iter::repeat_n(0u8, 32 << 20));
    let bomb = gz(&tar);
    let (r, _) = partial_deploy(&c, &bomb, bomb.len() / 2);
    let Err((stat, msg)) = r else { panic!("half a bomb was accepted") };
    assert_eq!(stat, CloudStat::BadArchive);
    assert!(msg.contains("after the end of the tar archive"), "{msg}");
    // A zip file: refused from its first bytes.
    let (r, _) = partial_deploy(&c, &[b"PK\x03\x04".as_slice(), &[0; 100_000]].concat(), 4);
    assert_eq!(r.unwrap_err().0, CloudStat::BadArchive);
    assert!(spool_is_empty(&c));
    assert_eq!(c.deploy(1, &job(c.dir.path(), "ok.tar.gz", &["@echo ok"])), 1);
}

#[test]
fn good_archives_in_every_usual_shape_deploy_and_run() {
    let c = Cluster::start_with(1, LIMITS);
    let d = c.dir.path();
    // `tar czf job.tar.gz -C dir .`: "./" and "./Makefile".
    let src = d.join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("Makefile"), "run:\n\t@cat sub/deeper/data.txt\n").unwrap();
    std::fs::write(src.join("sub/deeper/data.txt"), "from a tree\n").unwrap();
    let dotted = d.join("dotted.tar.gz");
    let st = std::process::Command::new("tar").arg("czf").arg(&dotted).arg("-C").arg(&src).arg(".").status().unwrap();
    assert!(st.success());
    assert_eq!(runs(&c, &dotted), "from a tree\n");
    // A directory, packed by the client.
    let out = c.cloud(&["deploy", "1", src.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // `makefile` and `GNUmakefile`, which make reads by itself.
    for name in ["makefile", "GNUmakefile"] {
        let a =
            write(d, &format!("{name}.tar.gz"), &tar_gz(&[entry(name, Regular, 0o644, b"run:\n\t@echo lower\n", "")]));
        assert_eq!(runs(&c, &a), "lower\n", "{name}");
    }
    // A PAX header naming a long UTF-8 file.
    let name = "données-".repeat(12) + ".txt";
    let mut e = entry("short", Regular, 0o644, b"pax ok\n", "");
    e[257..265].copy_from_slice(b"ustar\x0000");
    let mut h = tar::Header::from_byte_slice(&e[..512]).clone();
    h.set_cksum();
    e[..512].copy_from_slice(h.as_bytes());
    let recipe = format!("@cat '{name}'");
    let paxed = tar_gz(&[makefile(&recipe), pax(&[("path", &name)]), e]);
    assert_eq!(runs(&c, &write(d, "pax.tar.gz", &paxed)), "pax ok\n");
    // A GNU long name (a path over 100 bytes).
    let deep = format!("{}/f.txt", "long-directory-name".repeat(6));
    let recipe = format!("run:\n\t@cat {deep}\n");
    let gnu = gz(&gnu_tar(&[("Makefile", recipe.as_bytes()), (&deep, b"gnu ok\n")]));
    assert_eq!(runs(&c, &write(d, "gnu.tar.gz", &gnu)), "gnu ok\n");
    // The sample the README deploys.
    let sample = d.join("sample.tar.gz");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/client/sample");
    let st = std::process::Command::new("tar").arg("czf").arg(&sample).args(["-C", dir, "."]).status().unwrap();
    assert!(st.success());
    assert!(!runs(&c, &sample).is_empty());
}

/// `n` bytes nothing compresses (xorshift).
fn incompressible(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Past the first read, a DEPLOY's bytes are spliced into the spool file
/// and checked as they are read back from it: what comes late in a large
/// archive is still seen, to its last byte.
#[test]
fn large_archives_are_checked_to_their_last_byte() {
    let c = Cluster::start_with(1, &["--max-extract", "16M", "--time-limit", "60"]);
    let d = c.dir.path();
    let big = incompressible(3 << 20);
    let good = [makefile("@wc -c < big.bin"), entry("big.bin", Regular, 0o644, &big, "")];
    let archive = tar_gz(&good);
    assert!(archive.len() > 3 << 20, "incompressible: {} bytes", archive.len());
    assert_eq!(runs(&c, &write(d, "good.tar.gz", &archive)), format!("{}\n", 3 << 20));
    let late = |extra: Vec<u8>| tar_gz(&[good[0].clone(), good[1].clone(), extra]);
    refused(&c, &write(d, "late-traversal.tar.gz", &late(entry("../escape", Regular, 0o644, b"x", ""))), "'..'");
    refused(&c, &write(d, "late-link.tar.gz", &late(entry("l", Symlink, 0o777, b"", "/etc"))), "symbolic link");
    refused(
        &c,
        &write(d, "late-bomb.tar.gz", &late(entry("zeros", Regular, 0o644, &vec![0; 14 << 20], ""))),
        "extraction limit",
    );
    let mut cut = archive.clone();
    cut.truncate(archive.len() - 1);
    refused(&c, &write(d, "cut.tar.gz", &cut), "truncated");
    let mut flipped = archive.clone();
    let at = archive.len() - 100;
    flipped[at] ^= 0x55;
    refused(&c, &write(d, "flipped.tar.gz", &flipped), "");
    wait_until("the spool is empty", || spool_is_empty(&c));
    assert_eq!(runs(&c, &write(d, "again.tar.gz", &archive)), format!("{}\n", 3 << 20));
    // Compressible data late in the stream: checked over several turns
    // (each inflates at most a few MiB), then accepted whole.
    let zeros =
        tar_gz(&[makefile("@wc -c < zeros"), good[1].clone(), entry("zeros", Regular, 0o644, &vec![0; 12 << 20], "")]);
    assert_eq!(runs(&c, &write(d, "zeros.tar.gz", &zeros)), format!("{}\n", 12 << 20));
}

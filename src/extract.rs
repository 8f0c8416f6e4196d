//! Safe extraction of a job's `.tar.gz` into its fresh workspace.
//!
//! Owns: the rules for what an archive may create. Only regular files and
//! directories, strictly inside the workspace; no absolute paths, no `..`,
//! no links, devices, FIFOs or sockets; permission bits limited to 0777
//! with setuid/setgid/sticky dropped; limits on total bytes (checked while
//! inflating, so a gzip bomb stops early; GNU long-name and PAX data and the
//! data of any entry count too, and at most 64 KiB may follow the
//! end-of-archive marker),
//! entry count and path length. The inflated stream passes through
//! [`TarScan`] (the rules the main server applied at DEPLOY), which refuses a
//! long name or PAX header over its cap from its header, before the `tar`
//! crate buffers it; the whole gzip stream is read, so its checksum is checked.
//! Buffers are sized to the archive and its files (`extract_sized`), at
//! most 256 KiB each.
//! Must not touch: processes or sockets. It runs in the forked child before
//! exec, but is plain code so tests call it directly.

use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use flate2::bufread::DeflateDecoder;

use crate::archive_check::{checked_path, kind_name, shown, Refusal, TarScan};

/// Limits on what one archive may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct ExtractLimits {
    /// Total bytes of file contents.
    pub max_bytes: u64,
    pub max_entries: usize,
    /// Longest path inside the archive, in bytes.
    pub max_path: usize,
}

/// What was unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extracted {
    pub files: usize,
    pub dirs: usize,
    pub bytes: u64,
}

/// Unpack `archive` (gzip-compressed tar) into the existing directory `dest`.
/// The error is one line for the replica's message.
pub fn extract(archive: impl Read, dest: &Path, limits: &ExtractLimits) -> Result<Extracted, String> {
    extract_sized(archive, None, dest, limits)
}

/// [`extract`], told the archive's length (`archive_len`, when known):
/// its read buffer is then no larger than the archive. Buffers are sized
/// to what they will hold, at most `COPY_BLOCK`: a 200-byte echo job
/// neither allocates nor zeroes (and so faults in) 256 KiB blocks, while a
/// large archive still moves in 256 KiB blocks.
pub fn extract_sized(
    mut archive: impl Read,
    archive_len: Option<u64>,
    dest: &Path,
    limits: &ExtractLimits,
) -> Result<Extracted, String> {
    let mut magic = [0u8; 2];
    match archive.read_exact(&mut magic) {
        Ok(()) if magic == [0x1f, 0x8b] => {}
        Ok(()) => return Err("bad archive: not a gzip file (deploy expects a .tar.gz)".into()),
        Err(_) => return Err("bad archive: the file is empty or truncated".into()),
    }
    // Large reads of the archive; inflate writes straight into the copy
    // buffer below (the `tar` crate passes an entry's reads through).
    let capacity = archive_len.map_or(COPY_BLOCK, |len| len.clamp(64, COPY_BLOCK as u64) as usize);
    let gz = Gunzip::new(io::BufReader::with_capacity(capacity, io::Cursor::new(magic).chain(archive)))?;
    let mut tar = tar::Archive::new(Scanned { inner: gz, scan: TarScan::new(*limits) });
    let mut done = Extracted { files: 0, dirs: 0, bytes: 0 };
    let entries = tar.entries().map_err(|e| describe(&e))?;
    let mut count = 0usize;
    // One copy buffer for every file, grown to the largest one's size (at
    // most COPY_BLOCK) as they come.
    let mut buf = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| describe(&e))?;
        count += 1;
        if count > limits.max_entries {
            return Err(format!("bad archive: more than {} entries (limit --max-entries)", limits.max_entries));
        }
        let raw_path = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue; // metadata only (git archive writes one)
        }
        let rel = checked_path(&raw_path, limits.max_path)?;
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let target = dest.join(&rel);
        if kind.is_dir() {
            if rel.as_os_str().is_empty() {
                continue; // "./"
            }
            fs::DirBuilder::new()
                .recursive(true)
                .mode(mode | 0o700)
                .create(&target)
                .map_err(|e| format!("bad archive: cannot create directory {}: {e}", shown(&rel)))?;
            done.dirs += 1;
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            let declared = entry.size();
            if declared > limits.max_bytes - done.bytes {
                return Err(format!(
                    "bad archive: {} declares {declared} bytes, over the {} byte extraction limit (--max-extract)",
                    shown(&rel),
                    limits.max_bytes
                ));
            }
            // A top-level file's directory is `dest` itself: nothing to make.
            if let Some(parent) = target.parent().filter(|_| rel.components().nth(1).is_some()) {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(|e| format!("bad archive: cannot create directory for {}: {e}", shown(&rel)))?;
            }
            let mut out = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode | 0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&target)
                .map_err(|e| format!("bad archive: cannot create {}: {e}", shown(&rel)))?;
            let budget = limits.max_bytes - done.bytes;
            let copied = copy_limited(&mut entry, &mut out, budget, declared, &mut buf).map_err(|e| match e {
                CopyError::Limit => format!(
                    "bad archive: contents exceed the {} byte extraction limit (--max-extract)",
                    limits.max_bytes
                ),
                CopyError::Read(e) => describe(&e),
                CopyError::Write(e) => format!("cannot write {}: {e}", shown(&rel)),
            })?;
            done.bytes += copied;
            done.files += 1;
        } else {
            return Err(format!(
                "bad archive: {} is a {}; only regular files and directories are allowed",
                shown(&rel),
                kind_name(kind.as_byte())
            ));
        }
    }
    // The rest of the stream (end-of-archive padding, bounded by the
    // scanner) is inflated too, and reading to its end checks the gzip trailer.
    let mut rest = tar.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| describe(&e))?;
    rest.scan.finish().map_err(|r| r.0)?;
    Ok(done)
}

/// Inflate and check a tiny gzip member, once, in a process that forks
/// the replicas (a slot launcher): what the first inflate and CRC of a
/// process set up (CPU feature detection, with `cpuid`, a trap to the
/// hypervisor in a VM; zlib-rs's and crc32fast's choice of SIMD code) is
/// then inherited by every replica instead of redone in each.
pub fn warm_up() -> bool {
    // gzip of 64 bytes of 'x'.
    const TINY: [u8; 24] =
        [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 255, 171, 168, 160, 12, 0, 0, 18, 172, 210, 58, 64, 0, 0, 0];
    let Ok(mut gz) = Gunzip::new(&TINY[..]) else { return false };
    let mut out = [0u8; 80];
    let mut n = 0;
    loop {
        match gz.read(&mut out[n..]) {
            Ok(0) => return n == 64,
            Ok(k) => n += k,
            Err(_) => return false,
        }
    }
}

/// The inflated contents of a gzip member (RFC 1952) whose CRC32 and length
/// are checked against its trailer at its end. Its header was checked at
/// DEPLOY (`archive_check`) and is only skipped here. The CRC is crc32fast's
/// (SIMD), whatever flate2's backend.
struct Gunzip<R: BufRead> {
    inflate: DeflateDecoder<R>,
    crc: crc32fast::Hasher,
    len: u64,
    done: bool,
}

const GZ_FEXTRA: u8 = 4;
const GZ_FNAME: u8 = 8;
const GZ_FCOMMENT: u8 = 16;
const GZ_FHCRC: u8 = 2;

impl<R: BufRead> Gunzip<R> {
    /// Skip the member's header; the error is one line for the replica.
    fn new(mut r: R) -> Result<Self, String> {
        skip_gzip_header(&mut r).map_err(|e| describe(&e))?;
        Ok(Gunzip { inflate: DeflateDecoder::new(r), crc: crc32fast::Hasher::new(), len: 0, done: false })
    }
}

fn skip_gzip_header(r: &mut impl BufRead) -> io::Result<()> {
    let mut fixed = [0u8; 10];
    r.read_exact(&mut fixed)?;
    if fixed[..2] != [0x1f, 0x8b] || fixed[2] != 8 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a deflate gzip member"));
    }
    let flags = fixed[3];
    if flags & GZ_FEXTRA != 0 {
        let mut xlen = [0u8; 2];
        r.read_exact(&mut xlen)?;
        skip(r, u64::from(u16::from_le_bytes(xlen)))?;
    }
    for flag in [GZ_FNAME, GZ_FCOMMENT] {
        if flags & flag != 0 {
            // Up to and including a NUL, without keeping it.
            loop {
                let buf = r.fill_buf()?;
                if buf.is_empty() {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                let (n, found) = buf.iter().position(|b| *b == 0).map_or((buf.len(), false), |i| (i + 1, true));
                r.consume(n);
                if found {
                    break;
                }
            }
        }
    }
    if flags & GZ_FHCRC != 0 {
        skip(r, 2)?;
    }
    Ok(())
}

/// Skip `n` bytes; an early end is `UnexpectedEof`.
fn skip(r: &mut impl BufRead, n: u64) -> io::Result<()> {
    if io::copy(&mut r.by_ref().take(n), &mut io::sink())? < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

impl<R: BufRead> Read for Gunzip<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let n = self.inflate.read(buf)?;
        if n > 0 {
            self.crc.update(&buf[..n]);
            self.len += n as u64;
            return Ok(n);
        }
        // The deflate stream ended (or its input did: then there is no
        // trailer, and that is a truncation).
        let mut trailer = [0u8; 8];
        self.inflate.get_mut().read_exact(&mut trailer)?;
        let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
        let size = u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);
        if crc != self.crc.clone().finalize() || size != self.len as u32 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "corrupt gzip stream does not have a matching checksum",
            ));
        }
        self.done = true;
        Ok(0)
    }
}

/// The inflated stream, checked by the scanner as the `tar` crate reads it.
struct Scanned<R> {
    inner: R,
    scan: TarScan,
}

impl<R: Read> Read for Scanned<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.scan.feed(&buf[..n]).map_err(|r| io::Error::new(io::ErrorKind::InvalidData, r))?;
        Ok(n)
    }
}

fn describe(e: &io::Error) -> String {
    if let Some(r) = e.get_ref().and_then(|inner| inner.downcast_ref::<Refusal>()) {
        return r.0.clone();
    }
    let text = e.to_string();
    if e.kind() == io::ErrorKind::UnexpectedEof
        || text.contains("unexpected end")
        || text.contains("failed to fill whole buffer")
    {
        "bad archive: truncated (the .tar.gz ends early)".into()
    } else if text.contains("gzip") || text.contains("deflate") || text.contains("corrupt") {
        format!("bad archive: corrupt gzip data ({text})")
    } else {
        format!("bad archive: not a valid tar file ({text})")
    }
}

enum CopyError {
    Limit,
    Read(io::Error),
    Write(io::Error),
}

/// Bytes read from the archive and written to a file at a time: large
/// blocks make fewer system calls and let huge tmpfs pages fill in one go.
const COPY_BLOCK: usize = 256 * 1024;

/// Copy `from` (an entry of `declared` bytes) to `to`, at most `budget`
/// bytes, through `buf`, grown (never shrunk) to the entry's size, at
/// most COPY_BLOCK; the limit is enforced on what is read, whatever was declared.
fn copy_limited(
    from: &mut impl Read,
    to: &mut impl Write,
    budget: u64,
    declared: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, CopyError> {
    let want = declared.clamp(1, COPY_BLOCK as u64) as usize;
    if buf.len() < want {
        buf.resize(want, 0);
    }
    let mut total = 0u64;
    loop {
        let n = match from.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        total += n as u64;
        if total > budget {
            return Err(CopyError::Limit);
        }
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
}

#[cfg(test)]
#[path = "../tests/common/tarkit.rs"]
pub(crate) mod tarkit;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::tarkit::{entry, gz, tar_gz};
    use std::os::unix::fs::PermissionsExt;

    const LIMITS: ExtractLimits = ExtractLimits { max_bytes: 1 << 20, max_entries: 100, max_path: 200 };

    /// Extract both ways, length unknown (256 KiB buffers) and told the
    /// length (buffers sized to it); both must give the same result and the
    /// same tree. The first one's directory is returned.
    fn try_extract(archive: &[u8]) -> (tempfile::TempDir, Result<Extracted, String>) {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        fs::create_dir(&ws).unwrap();
        let r = extract(archive, &ws, &LIMITS);
        let sized = tempfile::tempdir().unwrap();
        let ws2 = sized.path().join("ws");
        fs::create_dir(&ws2).unwrap();
        let r2 = extract_sized(archive, Some(archive.len() as u64), &ws2, &LIMITS);
        assert_eq!(r, r2, "streamed and sized extraction differ");
        assert_eq!(tree(&ws), tree(&ws2), "streamed and sized extraction made different trees");
        (dir, r)
    }

    /// Every path under `dir` with its mode and contents, sorted.
    fn tree(dir: &Path) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().map(Result::unwrap) {
                let meta = e.metadata().unwrap();
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                let data = if meta.is_dir() {
                    stack.push(e.path());
                    Vec::new()
                } else {
                    fs::read(e.path()).unwrap()
                };
                out.push((rel, meta.permissions().mode(), data));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn the_warm_up_member_inflates_and_checks() {
        assert!(warm_up());
    }

    #[test]
    fn normal_archive_unpacks_and_drops_setuid() {
        let tarball = tar_gz(&[entry("sub/run.sh", tar::EntryType::Regular, 0o4755, b"echo hi\n", "")]);
        let (dir, r) = try_extract(&tarball);
        assert_eq!(r.unwrap(), Extracted { files: 1, dirs: 0, bytes: 8 });
        let meta = fs::metadata(dir.path().join("ws/sub/run.sh")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
    }

    #[test]
    fn hostile_entries_are_refused_and_nothing_escapes() {
        use tar::EntryType::*;
        let cases = [
            (entry("../escape", Regular, 0o644, b"x", ""), "'..'"),
            (entry("/tmp/abs-escape", Regular, 0o644, b"x", ""), "absolute"),
            (entry("link", Symlink, 0o777, b"", "/etc/passwd"), "symbolic link"),
            (entry("hard", Link, 0o644, b"", "../../x"), "hard link"),
            (entry("dev", Char, 0o644, b"", ""), "character device"),
            (entry("fifo", Fifo, 0o644, b"", ""), "FIFO"),
        ];
        for (tarball, why) in cases {
            let (dir, r) = try_extract(&tar_gz(&[tarball]));
            let err = r.unwrap_err();
            assert!(err.contains(why), "{err} should mention {why}");
            assert!(!dir.path().join("escape").exists());
            assert_eq!(fs::read_dir(dir.path().join("ws")).unwrap().count(), 0);
        }
    }

    #[test]
    fn gzip_bomb_stops_at_the_limit() {
        // Declares a small size per entry but many entries of zeros.
        let mut t = tar::Builder::new(Vec::new());
        for i in 0..50 {
            let mut h = tar::Header::new_gnu();
            h.set_size(64 * 1024);
            h.set_mode(0o644);
            h.set_cksum();
            t.append_data(&mut h, format!("f{i}"), &vec![0u8; 64 * 1024][..]).unwrap();
        }
        let (_d, r) = try_extract(&gz(&t.into_inner().unwrap()));
        assert!(r.unwrap_err().contains("extraction limit"));
    }

    #[test]
    fn not_gzip_and_truncated_say_so() {
        let (_d, r) = try_extract(b"PK\x03\x04 this is a zip");
        assert!(r.unwrap_err().contains("not a gzip"));
        let good = tar_gz(&[entry("a", tar::EntryType::Regular, 0o644, &[1u8; 5000], "")]);
        let (_d, r) = try_extract(&good[..good.len() / 2]);
        assert!(r.unwrap_err().contains("truncated"), "truncated gzip");
    }

    #[test]
    fn long_paths_and_many_entries_are_limited() {
        let deep = "d/".repeat(120) + "f";
        let mut t = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, &deep, &b"x"[..]).unwrap();
        let (_d, r) = try_extract(&gz(&t.into_inner().unwrap()));
        assert!(r.unwrap_err().contains("longer than the limit"));
    }
}

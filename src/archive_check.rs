//! Checking a job's `.tar.gz` while it streams in, before it gets a ticket.
//!
//! Owns: the decision whether an uploaded archive is one a replica can
//! unpack and run: a single gzip member (header parsed here, raw deflate
//! through `flate2::Decompress`, CRC32 (crc32fast) and ISIZE checked) holding a tar
//! archive (512-byte headers, checksums, octal or base-256 sizes, GNU 'L'/'K'
//! long names and PAX 'x' records read to learn the real names, PAX 'g'
//! skipped) that obeys the rules of [`crate::extract`] (only regular files
//! and directories, relative paths without `..`, entry count, path length,
//! total bytes with extension data and gzip-bomb stop) and has a regular
//! `Makefile` (or `makefile`, `GNUmakefile`) at its top level.
//! Sans-I/O: bytes in ([`ArchiveCheck::feed`]), a verdict out
//! ([`ArchiveCheck::finish`]); memory is bounded (a 32 KiB inflate buffer,
//! or one the caller lends to all its checks,
//! one header, and long-name / PAX data capped by `--max-path`), and nothing
//! is read twice. [`TarScan`] is also run by `extract` over the inflated
//! stream in the replica's child, so both apply one set of rules.
//! Must not touch: files, sockets or processes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crc32fast::Hasher as Crc;
use flate2::{Decompress, FlushDecompress, Status};

use crate::extract::ExtractLimits;

/// Why an archive is refused: one line for people, starting "bad archive: ".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

fn refuse<T>(why: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(why.into()))
}

/// A refusal that sticks: once refused, every later call gives the same
/// answer and looks at nothing more.
#[derive(Debug, Default)]
struct Sticky(Option<Refusal>);

impl Sticky {
    /// The earlier refusal, if there was one.
    fn check(&self) -> Result<(), Refusal> {
        self.0.as_ref().map_or(Ok(()), |r| Err(r.clone()))
    }

    /// Keep `r`'s refusal, if it is one.
    fn keep<T>(&mut self, r: Result<T, Refusal>) -> Result<T, Refusal> {
        if let Err(e) = &r {
            self.0 = Some(e.clone());
        }
        r
    }
}

/// What an accepted archive holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Members, as `--max-entries` counts them.
    pub entries: usize,
    pub files: usize,
    pub dirs: usize,
    /// Bytes counted toward `--max-extract`: entry data (of every kind of
    /// entry) and long-name and PAX data.
    pub bytes: u64,
    /// Whether a top-level regular `Makefile`, `makefile` or `GNUmakefile` is present.
    pub makefile: bool,
}

/// The names `make` reads by itself.
pub const MAKEFILE_NAMES: [&str; 3] = ["GNUmakefile", "makefile", "Makefile"];

/// PAX extended-header data beyond the longest path allowed.
const PAX_SLACK: u64 = 8 * 1024;

const BLOCK: u64 = 512;

/// Inflated bytes tolerated after the end-of-archive marker (tar pads its
/// output to 10 KiB records); more is refused, so no bomb hides there.
pub const END_SLACK: u64 = 64 * 1024;

// ---------------------------------------------------------------- gzip

const FHCRC: u8 = 2;
const FEXTRA: u8 = 4;
const FNAME: u8 = 8;
const FCOMMENT: u8 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gz {
    /// The 10 fixed header bytes, `have` of them so far.
    Fixed {
        have: usize,
    },
    XlenLo,
    XlenHi(u8),
    Extra(u16),
    Name,
    Comment,
    HeaderCrc {
        have: usize,
    },
    Deflate,
    Trailer {
        have: usize,
    },
    /// The member is complete; only zero padding may follow.
    Done,
}

/// The streaming checker for one uploaded `.tar.gz`.
pub struct ArchiveCheck {
    gz: Gz,
    fixed: [u8; 10],
    flags: u8,
    hcrc: Crc,
    hcrc_bytes: [u8; 2],
    inflate: Decompress,
    crc: Crc,
    trailer: [u8; 8],
    out: Vec<u8>,
    tar: TarScan,
    refused: Sticky,
    wire: u64,
    /// `inflate.total_out()` at the last `take_inflated`.
    charged: u64,
}

impl std::fmt::Debug for ArchiveCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveCheck")
            .field("gz", &self.gz)
            .field("wire", &self.wire)
            .field("inflated", &self.inflate.total_out())
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

impl ArchiveCheck {
    pub fn new(limits: ExtractLimits) -> ArchiveCheck {
        ArchiveCheck {
            gz: Gz::Fixed { have: 0 },
            fixed: [0; 10],
            flags: 0,
            hcrc: Crc::new(),
            hcrc_bytes: [0; 2],
            inflate: Decompress::new(false),
            crc: Crc::new(),
            trailer: [0; 8],
            out: vec![0; 32 * 1024],
            tar: TarScan::new(limits),
            refused: Sticky::default(),
            wire: 0,
            charged: 0,
        }
    }

    /// Check the next bytes of the upload. After a refusal every call
    /// returns the same refusal and looks at nothing more.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), Refusal> {
        let mut out = std::mem::take(&mut self.out);
        let r = self.feed_using(data, &mut out);
        self.out = out;
        r
    }

    /// `feed`, inflating into `scratch` (any size; larger means fewer
    /// inflate calls, and zlib copies at most 32 KiB of each call's output
    /// into its window): a server checking many uploads lends them one
    /// large buffer instead of giving each its own.
    pub fn feed_using(&mut self, data: &[u8], scratch: &mut [u8]) -> Result<(), Refusal> {
        self.refused.check()?;
        self.wire += data.len() as u64;
        let r = if scratch.is_empty() { self.step(data, &mut [0; 512]) } else { self.step(data, scratch) };
        self.refused.keep(r)
    }

    /// The upload is complete: the verdict.
    pub fn finish(&mut self) -> Result<Summary, Refusal> {
        self.refused.check()?;
        let r = match self.gz {
            Gz::Fixed { have: 0 } => refuse("bad archive: the file is empty (deploy expects a .tar.gz)"),
            Gz::Done => self.tar.finish().and_then(|s| if s.makefile { Ok(s) } else { refuse(self.tar.no_makefile()) }),
            Gz::Deflate | Gz::Trailer { .. } => refuse("bad archive: truncated (the gzip stream ends early)"),
            _ => refuse("bad archive: truncated (the gzip header is cut short)"),
        };
        self.refused.keep(r)
    }

    /// Bytes of the upload fed so far (up to a refusal).
    pub fn fed(&self) -> u64 {
        self.wire
    }

    /// Bytes of inflated data so far.
    pub fn inflated(&self) -> u64 {
        self.inflate.total_out()
    }

    /// Bytes inflated since the last call: the reactor charges a
    /// connection's read budget by it, so a highly compressed upload gets no
    /// more than its fair share of a turn.
    pub fn take_inflated(&mut self) -> u64 {
        let now = self.inflate.total_out();
        now - std::mem::replace(&mut self.charged, now)
    }

    fn step(&mut self, data: &[u8], out: &mut [u8]) -> Result<(), Refusal> {
        let mut i = 0;
        while i < data.len() {
            match self.gz {
                Gz::Deflate => i += self.deflate(&data[i..], out)?,
                Gz::Trailer { have } => {
                    let n = (8 - have).min(data.len() - i);
                    self.trailer[have..have + n].copy_from_slice(&data[i..i + n]);
                    i += n;
                    self.gz = Gz::Trailer { have: have + n };
                    if have + n == 8 {
                        self.check_trailer()?;
                        self.gz = Gz::Done;
                    }
                }
                Gz::Done => {
                    let rest = &data[i..];
                    if let Some(at) = rest.iter().position(|b| *b != 0) {
                        return refuse(if rest[at] == 0x1f {
                            "bad archive: more than one gzip member in the file (not supported; \
                             recompress it as one: gzip -dc FILE | gzip > NEW.tar.gz)"
                        } else {
                            "bad archive: unexpected data after the end of the gzip stream"
                        });
                    }
                    i = data.len();
                }
                _ => {
                    self.header_byte(data[i])?;
                    i += 1;
                }
            }
        }
        Ok(())
    }

    /// One byte of the gzip member header (RFC 1952, 2.3).
    fn header_byte(&mut self, b: u8) -> Result<(), Refusal> {
        if !matches!(self.gz, Gz::HeaderCrc { .. }) {
            self.hcrc.update(&[b]);
        }
        self.gz = match self.gz {
            Gz::Fixed { have } => {
                self.fixed[have] = b;
                match have {
                    0 if b != 0x1f => return refuse(NOT_GZIP),
                    1 if b != 0x8b => return refuse(NOT_GZIP),
                    2 if b != 8 => {
                        return refuse(format!(
                            "bad archive: gzip compression method {b} is not deflate (deploy expects a .tar.gz)"
                        ))
                    }
                    3 if b & 0xe0 != 0 => return refuse("bad archive: corrupt gzip header (reserved flags set)"),
                    3 => self.flags = b,
                    _ => {}
                }
                if have + 1 < 10 {
                    Gz::Fixed { have: have + 1 }
                } else {
                    self.after(0)
                }
            }
            Gz::XlenLo => Gz::XlenHi(b),
            Gz::XlenHi(lo) => match u16::from_le_bytes([lo, b]) {
                0 => self.after(FEXTRA),
                n => Gz::Extra(n),
            },
            Gz::Extra(1) => self.after(FEXTRA),
            Gz::Extra(n) => Gz::Extra(n - 1),
            Gz::Name if b == 0 => self.after(FNAME),
            Gz::Comment if b == 0 => self.after(FCOMMENT),
            s @ (Gz::Name | Gz::Comment) => s,
            Gz::HeaderCrc { have } => {
                self.hcrc_bytes[have] = b;
                if have == 0 {
                    Gz::HeaderCrc { have: 1 }
                } else {
                    let want = (self.hcrc.clone().finalize() & 0xffff) as u16;
                    if u16::from_le_bytes(self.hcrc_bytes) != want {
                        return refuse("bad archive: corrupt gzip header (header checksum mismatch)");
                    }
                    Gz::Deflate
                }
            }
            s => s,
        };
        Ok(())
    }

    /// The header stage that follows the one for flag `done` (0: fixed part).
    fn after(&self, done: u8) -> Gz {
        let f = self.flags;
        if done < FEXTRA && f & FEXTRA != 0 {
            Gz::XlenLo
        } else if done < FNAME && f & FNAME != 0 {
            Gz::Name
        } else if done < FCOMMENT && f & FCOMMENT != 0 {
            Gz::Comment
        } else if f & FHCRC != 0 {
            Gz::HeaderCrc { have: 0 }
        } else {
            Gz::Deflate
        }
    }

    /// Inflate from `input`, scanning what comes out; returns bytes used.
    fn deflate(&mut self, input: &[u8], out: &mut [u8]) -> Result<usize, Refusal> {
        let mut used = 0;
        loop {
            let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
            let status = self
                .inflate
                .decompress(&input[used..], out, FlushDecompress::None)
                .map_err(|e| Refusal(format!("bad archive: corrupt gzip data ({e})")))?;
            let consumed = (self.inflate.total_in() - in0) as usize;
            let produced = (self.inflate.total_out() - out0) as usize;
            used += consumed;
            self.crc.update(&out[..produced]);
            self.tar.feed(&out[..produced])?;
            if status == Status::StreamEnd {
                self.gz = Gz::Trailer { have: 0 };
                return Ok(used);
            }
            let full = produced == out.len();
            if (used == input.len() && !full) || (consumed == 0 && produced == 0) {
                return Ok(used);
            }
        }
    }

    fn check_trailer(&self) -> Result<(), Refusal> {
        let crc = u32::from_le_bytes([self.trailer[0], self.trailer[1], self.trailer[2], self.trailer[3]]);
        let size = u32::from_le_bytes([self.trailer[4], self.trailer[5], self.trailer[6], self.trailer[7]]);
        if crc != self.crc.clone().finalize() || size != self.inflate.total_out() as u32 {
            return refuse("bad archive: corrupt gzip data (checksum mismatch)");
        }
        Ok(())
    }
}

const NOT_GZIP: &str = "bad archive: not a gzip file (deploy expects a .tar.gz)";

// ---------------------------------------------------------------- tar

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Collect {
    LongName,
    LongLink,
    Pax,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TarState {
    /// Filling `hdr`.
    Header,
    /// `left` data bytes then `pad` padding bytes of the current member.
    Data { left: u64, pad: u64, collect: Option<Collect> },
    /// After the end-of-archive zero block, with this many bytes seen since.
    End(u64),
}

/// The tar layer: fed inflated bytes, it applies extraction's rules to
/// each member as its header (and long name) arrives. The rules mirror how
/// the `tar` crate, which `extract` uses, reads names and sizes.
#[derive(Debug)]
pub struct TarScan {
    limits: ExtractLimits,
    state: TarState,
    hdr: Vec<u8>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
    /// The extension data being read.
    buf: Vec<u8>,
    entries: usize,
    files: usize,
    dirs: usize,
    bytes: u64,
    headers: u64,
    makefile: bool,
    makefile_dir: bool,
    nested_makefile: Option<String>,
    refused: Sticky,
}

impl TarScan {
    pub fn new(limits: ExtractLimits) -> TarScan {
        TarScan {
            limits,
            state: TarState::Header,
            hdr: Vec::with_capacity(BLOCK as usize),
            long_name: None,
            long_link: None,
            pax: None,
            buf: Vec::new(),
            entries: 0,
            files: 0,
            dirs: 0,
            bytes: 0,
            headers: 0,
            makefile: false,
            makefile_dir: false,
            nested_makefile: None,
            refused: Sticky::default(),
        }
    }

    /// Scan the next inflated bytes.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), Refusal> {
        self.refused.check()?;
        let r = self.step(data);
        self.refused.keep(r)
    }

    /// The inflated stream ended: is the tar archive complete?
    pub fn finish(&mut self) -> Result<Summary, Refusal> {
        self.refused.check()?;
        let pending = self.long_name.is_some() || self.long_link.is_some() || self.pax.is_some();
        match self.state {
            TarState::Header if self.hdr.is_empty() && !pending => {}
            TarState::End(_) => {}
            _ if self.headers == 0 => return refuse(NOT_TAR),
            _ => return refuse("bad archive: truncated (the tar data ends in the middle of an entry)"),
        }
        if self.headers == 0 && !matches!(self.state, TarState::End(_)) {
            return refuse("bad archive: the tar archive is empty (make run needs a Makefile)");
        }
        Ok(Summary {
            entries: self.entries,
            files: self.files,
            dirs: self.dirs,
            bytes: self.bytes,
            makefile: self.makefile,
        })
    }

    /// The reason for an archive without a top-level Makefile.
    fn no_makefile(&self) -> String {
        if self.makefile_dir {
            "bad archive: Makefile is a directory; make run needs a regular file named Makefile at the top level".into()
        } else if let Some(nested) = &self.nested_makefile {
            let dir = nested.rsplit_once('/').map_or("", |(d, _)| d);
            format!(
                "bad archive: no Makefile at the top level, only {nested} (pack that directory's contents: \
                 tar czf job.tar.gz -C {dir} .)"
            )
        } else {
            "bad archive: no Makefile at the top level (make run needs one)".into()
        }
    }

    fn step(&mut self, mut data: &[u8]) -> Result<(), Refusal> {
        while !data.is_empty() {
            match self.state {
                TarState::Header => {
                    let n = (BLOCK as usize - self.hdr.len()).min(data.len());
                    self.hdr.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.hdr.len() == BLOCK as usize {
                        self.header()?;
                        self.hdr.clear();
                    }
                }
                TarState::Data { left, pad, collect } => {
                    if left > 0 {
                        let n = left.min(data.len() as u64) as usize;
                        if collect.is_some() {
                            self.buf.extend_from_slice(&data[..n]);
                        }
                        data = &data[n..];
                        self.state = TarState::Data { left: left - n as u64, pad, collect };
                    } else {
                        let n = pad.min(data.len() as u64) as usize;
                        data = &data[n..];
                        self.state = TarState::Data { left, pad: pad - n as u64, collect };
                    }
                    if let TarState::Data { left: 0, pad: 0, collect } = self.state {
                        let got = std::mem::take(&mut self.buf);
                        match collect {
                            Some(Collect::LongName) => self.long_name = Some(got),
                            Some(Collect::LongLink) => self.long_link = Some(got),
                            Some(Collect::Pax) => self.pax = Some(got),
                            None => {}
                        }
                        self.state = TarState::Header;
                    }
                }
                TarState::End(seen) => {
                    // Not extracted, but inflated all the same: a bomb may hide here.
                    let seen = seen + data.len() as u64;
                    if seen > END_SLACK {
                        return refuse(format!(
                            "bad archive: more than {} KiB of data after the end of the tar archive",
                            END_SLACK / 1024
                        ));
                    }
                    self.state = TarState::End(seen);
                    data = &[];
                }
            }
        }
        Ok(())
    }

    fn count(&mut self, n: u64) -> Result<(), Refusal> {
        if n > self.limits.max_bytes - self.bytes {
            return refuse(format!(
                "bad archive: contents exceed the {} byte extraction limit (--max-extract)",
                self.limits.max_bytes
            ));
        }
        self.bytes += n;
        Ok(())
    }

    /// A whole 512-byte header is in `hdr`.
    fn header(&mut self) -> Result<(), Refusal> {
        let h = &self.hdr;
        if h.iter().all(|b| *b == 0) {
            if self.long_name.is_some() || self.long_link.is_some() || self.pax.is_some() {
                return refuse("bad archive: not a valid tar file (a long-name or PAX header describes no entry)");
            }
            self.state = TarState::End(0);
            return Ok(());
        }
        let sum: u32 = h[..148].iter().chain(&h[156..]).map(|b| u32::from(*b)).sum::<u32>() + 8 * 32;
        if octal(&h[148..156]).map(|c| c as u32) != Some(sum) {
            return refuse(if self.headers == 0 {
                NOT_TAR.to_string()
            } else {
                format!("bad archive: not a valid tar file (header checksum mismatch after {} entries)", self.entries)
            });
        }
        self.headers += 1;
        let kind = h[156];
        let recognized = (&h[257..263] == b"ustar\0" && &h[263..265] == b"00")
            || (&h[257..263] == b"ustar " && &h[263..265] == b" \0");
        let extension = matches!(kind, b'L' | b'K' | b'x' | b'g');
        let mut size = number(&h[124..136])
            .ok_or_else(|| Refusal("bad archive: not a valid tar file (a size field is not a number)".into()))?;
        if !extension {
            if let Some(s) = self.pax.as_deref().and_then(|p| pax_number(p, "size")) {
                size = s;
            }
        }
        let Some(pad) = size.checked_next_multiple_of(BLOCK).map(|rounded| rounded - size) else {
            return refuse(format!(
                "bad archive: an entry declares {size} bytes, over the {} byte extraction limit (--max-extract)",
                self.limits.max_bytes
            ));
        };
        if recognized && matches!(kind, b'L' | b'K' | b'x') {
            let (slot, cap, what) = match kind {
                b'L' => (&self.long_name, self.limits.max_path as u64 + 1, "GNU long name"),
                b'K' => (&self.long_link, self.limits.max_path as u64 + 1, "GNU long link name"),
                _ => (&self.pax, self.limits.max_path as u64 + PAX_SLACK, "PAX header"),
            };
            if slot.is_some() {
                return refuse(format!("bad archive: not a valid tar file (two {what}s for one entry)"));
            }
            if size > cap {
                // A long name's data ends in a NUL, which the limit (on the
                // name) leaves out; a PAX header also holds other records.
                let max_path = self.limits.max_path;
                return refuse(match kind {
                    b'x' => format!(
                        "bad archive: a {what} of {size} bytes is longer than the limit of {cap} \
                         (--max-path {max_path}, and room for its other records)"
                    ),
                    _ => format!(
                        "bad archive: a {what} of {} bytes is longer than the limit of {max_path} (--max-path)",
                        size - 1
                    ),
                });
            }
            self.count(size)?;
            let collect = match kind {
                b'L' => Collect::LongName,
                b'K' => Collect::LongLink,
                _ => Collect::Pax,
            };
            self.buf = Vec::with_capacity(size as usize);
            self.state = TarState::Data { left: size, pad, collect: Some(collect) };
            return Ok(());
        }
        // A member.
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return refuse(format!("bad archive: more than {} entries (limit --max-entries)", self.limits.max_entries));
        }
        let raw = self.member_path();
        self.long_name = None;
        self.long_link = None;
        self.pax = None;
        self.state = TarState::Data { left: size, pad, collect: None };
        if kind == b'g' {
            return self.count(size); // metadata only (git archive writes one)
        }
        let rel = checked_path(&raw, self.limits.max_path).map_err(Refusal)?;
        let top = rel.to_str().filter(|r| MAKEFILE_NAMES.contains(r));
        let nested = rel.file_name().and_then(|f| f.to_str()).filter(|f| MAKEFILE_NAMES.contains(f));
        match kind {
            b'5' => {
                if !rel.as_os_str().is_empty() {
                    self.dirs += 1;
                    self.makefile_dir |= top.is_some();
                }
                self.count(size)
            }
            b'0' | b'\0' | b'7' => {
                if rel.as_os_str().is_empty() {
                    return refuse("bad archive: a file entry has an empty name");
                }
                if size > self.limits.max_bytes - self.bytes {
                    return refuse(format!(
                        "bad archive: {} declares {size} bytes, over the {} byte extraction limit (--max-extract)",
                        shown(&rel),
                        self.limits.max_bytes
                    ));
                }
                self.count(size)?;
                self.files += 1;
                if top.is_some() {
                    self.makefile = true;
                } else if nested.is_some() && self.nested_makefile.is_none() {
                    self.nested_makefile = Some(shown(&rel));
                }
                Ok(())
            }
            _ => match top {
                Some(name) => refuse(format!(
                    "bad archive: {name} is a {}; only regular files and directories are allowed \
                     (make run needs a real {name})",
                    kind_name(kind)
                )),
                None => refuse(format!(
                    "bad archive: {} is a {}; only regular files and directories are allowed",
                    shown(&rel),
                    kind_name(kind)
                )),
            },
        }
    }

    /// The member's name as the `tar` crate reads it: a GNU long name, else
    /// a PAX `path`, else the header's own (ustar prefix + name).
    fn member_path(&self) -> Vec<u8> {
        if let Some(n) = &self.long_name {
            return n.strip_suffix(&[0]).unwrap_or(n).to_vec();
        }
        if let Some(p) = self.pax.as_deref().and_then(|p| pax_records(p).find(|(k, _)| *k == b"path")) {
            return p.1.to_vec();
        }
        let h = &self.hdr;
        let name = nul_cut(&h[..100]);
        let ustar = &h[257..263] == b"ustar\0" && &h[263..265] == b"00";
        if ustar && (h[345] != 0 || name.contains(&b'\\')) {
            let prefix = nul_cut(&h[345..500]);
            let mut out = Vec::with_capacity(prefix.len() + 1 + name.len());
            if !prefix.is_empty() {
                out.extend_from_slice(prefix);
                out.push(b'/');
            }
            out.extend_from_slice(name);
            out
        } else {
            name.to_vec()
        }
    }
}

const NOT_TAR: &str = "bad archive: not a tar file (deploy expects a gzip-compressed tar archive, a .tar.gz)";

fn nul_cut(b: &[u8]) -> &[u8] {
    b.iter().position(|c| *c == 0).map_or(b, |i| &b[..i])
}

/// An octal field as tar writes it (up to the first NUL, spaces trimmed).
fn octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(nul_cut(field)).ok()?;
    u64::from_str_radix(text.trim(), 8).ok()
}

/// A numeric field: octal, or base-256 when the high bit of the first byte is set.
fn number(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 == 0 {
        return octal(field);
    }
    let skip = if field.len() == 8 { 1 } else { field.len() - 8 };
    let first = if field.len() == 8 { u64::from(field[0] ^ 0x80) } else { 0 };
    Some(field[skip..].iter().fold(first, |acc, b| (acc << 8) | u64::from(*b)))
}

/// The PAX records ("LEN key=value\n") of `data`, each as (key, value),
/// or `None` where a record is malformed.
fn pax_lines(data: &[u8]) -> impl Iterator<Item = Option<(&[u8], &[u8])>> {
    data.split(|b| *b == b'\n').take_while(|l| !l.is_empty()).map(|line| {
        let sp = line.iter().position(|b| *b == b' ')?;
        let len: usize = std::str::from_utf8(&line[..sp]).ok()?.parse().ok()?;
        if line.len() + 1 != len {
            return None;
        }
        let kv = &line[sp + 1..];
        let eq = kv.iter().position(|b| *b == b'=')?;
        Some((&kv[..eq], &kv[eq + 1..]))
    })
}

/// Well-formed PAX records as (key, value); malformed ones are skipped.
fn pax_records(data: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    pax_lines(data).flatten()
}

/// A numeric PAX value, as the `tar` crate reads it: the first malformed
/// record ends the search.
fn pax_number(data: &[u8], key: &str) -> Option<u64> {
    for record in pax_lines(data) {
        let (k, v) = record?;
        if k == key.as_bytes() {
            return std::str::from_utf8(v).ok()?.parse().ok();
        }
    }
    None
}

/// A relative path with only normal components, within the length limit.
pub fn checked_path(raw: &[u8], max_path: usize) -> Result<PathBuf, String> {
    let path = Path::new(OsStr::from_bytes(raw));
    if raw.len() > max_path {
        return Err(format!("bad archive: a path of {} bytes is longer than the limit of {max_path}", raw.len()));
    }
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!("bad archive: {} contains '..'; paths must stay inside the workspace", shown(path)))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("bad archive: {} is an absolute path; paths must be relative", shown(path)))
            }
        }
    }
    Ok(out)
}

/// A path for a one-line message: long ones are cut, so that a message
/// stays far below the protocol's string limit whatever `--max-path` is.
/// Control characters are escaped: the message may reach a terminal
/// (STATUS is open to all) and the server's log.
pub fn shown(path: &Path) -> String {
    let text = path.to_string_lossy();
    let cut = match text.char_indices().nth(120) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.into_owned(),
    };
    printable(&cut)
}

/// `text` with every control character escaped (`\u{1b}`, `\n`): for
/// messages that quote what a job or an archive chose.
pub fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// A tar type flag, for people.
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        b'2' => "symbolic link",
        b'1' => "hard link",
        b'3' => "character device",
        b'4' => "block device",
        b'6' => "FIFO",
        _ => "special entry",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::tarkit::{entry, gnu_tar, gz, pax, tar_gz, ustar};
    use proptest::prelude::*;
    use tar::EntryType::*;

    const LIMITS: ExtractLimits = ExtractLimits { max_bytes: 1 << 20, max_entries: 100, max_path: 200 };

    fn check_in(bytes: &[u8], chunk: usize, limits: ExtractLimits) -> Result<Summary, Refusal> {
        let mut c = ArchiveCheck::new(limits);
        for piece in bytes.chunks(chunk.max(1)) {
            c.feed(piece)?;
        }
        c.finish()
    }

    fn check(bytes: &[u8]) -> Result<Summary, Refusal> {
        let whole = check_in(bytes, bytes.len(), LIMITS);
        for chunk in [1, 7, 512, 4096] {
            assert_eq!(check_in(bytes, chunk, LIMITS), whole, "same verdict in chunks of {chunk}");
        }
        // The same verdict inflating into a lent buffer of any size.
        for size in [0, 1, 100, 256 * 1024] {
            let mut scratch = vec![0; size];
            let mut c = ArchiveCheck::new(LIMITS);
            let fed: Result<(), Refusal> = bytes.chunks(4096).try_for_each(|p| c.feed_using(p, &mut scratch));
            assert_eq!(fed.and_then(|()| c.finish()), whole, "same verdict with a {size} byte scratch buffer");
        }
        whole
    }

    fn refused(bytes: &[u8]) -> String {
        match check(bytes) {
            Ok(s) => panic!("accepted: {s:?}"),
            Err(r) => {
                assert!(r.0.starts_with("bad archive: ") && !r.0.contains('\n'), "one line: {r}");
                r.0
            }
        }
    }

    fn makefile() -> Vec<u8> {
        entry("Makefile", Regular, 0o644, b"run:\n\techo hi\n", "")
    }

    /// A .tar.gz built by the tar crate (GNU headers, long names as 'L').
    fn built(files: &[(&str, &[u8])]) -> Vec<u8> {
        gz(&gnu_tar(files))
    }

    #[test]
    fn a_plain_job_is_accepted() {
        let s = check(&tar_gz(&[
            entry("./", Directory, 0o755, b"", ""),
            makefile(),
            entry("src/a.c", Regular, 0o644, b"int x;", ""),
        ]))
        .unwrap();
        assert_eq!(s, Summary { entries: 3, files: 2, dirs: 0, bytes: 6 + 14, makefile: true });
    }

    #[test]
    fn every_makefile_name_make_reads_counts_at_the_top_level() {
        for name in ["Makefile", "./Makefile", "makefile", "GNUmakefile", ".//Makefile"] {
            let s = check(&tar_gz(&[entry(name, Regular, 0o644, b"run:\n", "")])).unwrap();
            assert!(s.makefile, "{name}");
        }
        for name in ["MAKEFILE", "Makefile.am", "sub/Makefile"] {
            let why = refused(&tar_gz(&[entry(name, Regular, 0o644, b"run:\n", "")]));
            assert!(why.contains("no Makefile at the top level"), "{name}: {why}");
        }
    }

    #[test]
    fn a_makefile_only_in_a_subdirectory_is_named() {
        let why = refused(&tar_gz(&[entry("job/Makefile", Regular, 0o644, b"run:\n", "")]));
        assert!(why.contains("only job/Makefile") && why.contains("-C job"), "{why}");
    }

    #[test]
    fn a_makefile_that_is_not_a_regular_file_is_refused() {
        let why = refused(&tar_gz(&[entry("Makefile", Symlink, 0o777, b"", "/etc/passwd")]));
        assert!(why.contains("Makefile is a symbolic link"), "{why}");
        let why = refused(&tar_gz(&[entry("Makefile/", Directory, 0o755, b"", "")]));
        assert!(why.contains("Makefile is a directory"), "{why}");
        let why = refused(&tar_gz(&[entry("makefile", Fifo, 0o644, b"", "")]));
        assert!(why.contains("makefile is a FIFO"), "{why}");
    }

    #[test]
    fn not_gzip_empty_and_not_tar_say_so() {
        assert!(refused(b"").contains("empty"));
        assert!(refused(b"PK\x03\x04 a zip").contains("not a gzip file"));
        let plain_tar = [makefile(), vec![0; 1024]].concat();
        assert!(refused(&plain_tar).contains("not a gzip file"));
        assert!(refused(&gz(b"hello, this is not a tar archive")).contains("not a tar file"));
        assert!(refused(&gz(&[7u8; 4096])).contains("not a tar file"));
        assert!(refused(&gz(b"")).contains("empty"));
        let mut bzip = vec![0x1f, 0x8b, 12];
        bzip.extend_from_slice(&[0; 20]);
        assert!(refused(&bzip).contains("not deflate"));
    }

    #[test]
    fn truncation_anywhere_is_refused() {
        let good = tar_gz(&[makefile(), entry("data", Regular, 0o644, &[5u8; 3000], "")]);
        check(&good).unwrap();
        for cut in [1, 5, 10, good.len() / 2, good.len() - 8, good.len() - 1] {
            let why = refused(&good[..cut]);
            assert!(why.contains("truncated"), "cut at {cut}: {why}");
        }
        // Well-formed gzip around a tar cut in the middle of an entry.
        let tar = [makefile(), entry("data", Regular, 0o644, &[5u8; 3000], "")].concat();
        assert!(refused(&gz(&tar[..1500])).contains("truncated"));
    }

    #[test]
    fn corrupt_gzip_data_and_checksums_are_refused() {
        let good = tar_gz(&[makefile()]);
        let mut bad_crc = good.clone();
        let n = bad_crc.len();
        bad_crc[n - 8] ^= 1;
        assert!(refused(&bad_crc).contains("checksum mismatch"));
        let mut bad_size = good.clone();
        bad_size[n - 1] ^= 1;
        assert!(refused(&bad_size).contains("checksum mismatch"));
        let mut reserved = good.clone();
        reserved[3] = 0x80;
        assert!(refused(&reserved).contains("reserved flags"));
        let mut garbage = good[..10].to_vec();
        garbage.extend_from_slice(&[0xff; 64]);
        assert!(refused(&garbage).contains("corrupt gzip data"));
    }

    #[test]
    fn gzip_header_fields_are_skipped_and_checked() {
        // FEXTRA + FNAME + FCOMMENT + FHCRC, written by hand.
        let body = tar_gz(&[makefile()]);
        let mut h = vec![0x1f, 0x8b, 8, FEXTRA | FNAME | FCOMMENT | FHCRC, 0, 0, 0, 0, 0, 3];
        h.extend_from_slice(&[4, 0, b'a', b'b', 2, 0]);
        h.extend_from_slice(b"job.tar\0a comment\0");
        let mut crc = Crc::new();
        crc.update(&h);
        h.extend_from_slice(&((crc.clone().finalize() & 0xffff) as u16).to_le_bytes());
        let with = [h.clone(), body[10..].to_vec()].concat();
        assert!(check(&with).unwrap().makefile);
        let n = h.len();
        h[n - 1] ^= 0xff;
        let with = [h, body[10..].to_vec()].concat();
        assert!(refused(&with).contains("header checksum"));
    }

    #[test]
    fn trailing_zeros_pass_and_a_second_member_is_refused_clearly() {
        let good = tar_gz(&[makefile()]);
        check(&[good.clone(), vec![0; 100]].concat()).unwrap();
        assert!(refused(&[good.clone(), good.clone()].concat()).contains("more than one gzip member"));
        assert!(refused(&[good, b"junk".to_vec()].concat()).contains("after the end of the gzip stream"));
    }

    #[test]
    fn hostile_entries_are_refused_with_extracts_words() {
        let cases = [
            (entry("../escape", Regular, 0o644, b"x", ""), "'..'"),
            (entry("a/../../escape", Regular, 0o644, b"x", ""), "'..'"),
            (entry("/tmp/abs", Regular, 0o644, b"x", ""), "absolute"),
            (entry("link", Symlink, 0o777, b"", "/etc/passwd"), "link is a symbolic link"),
            (entry("hard", Link, 0o644, b"", "Makefile"), "hard link"),
            (entry("dev", Char, 0o644, b"", ""), "character device"),
            (entry("blk", Block, 0o644, b"", ""), "block device"),
            (entry("fifo", Fifo, 0o644, b"", ""), "FIFO"),
            (entry(".", Regular, 0o644, b"x", ""), "empty name"),
        ];
        for (bad, why) in cases {
            let got = refused(&tar_gz(&[makefile(), bad]));
            assert!(got.contains(why), "{got} should mention {why}");
        }
    }

    #[test]
    fn limits_on_entries_paths_and_bytes() {
        let many: Vec<_> = (0..101).map(|i| entry(&format!("f{i}"), Regular, 0o644, b"", "")).collect();
        assert!(refused(&tar_gz(&[vec![makefile()], many].concat())).contains("more than 100 entries"));
        let deep = "d/".repeat(120) + "f";
        assert!(refused(&built(&[("Makefile", b"run:"), (&deep, b"x")])).contains("longer than the limit"));
        let big = vec![0u8; (1 << 20) + 1];
        assert!(refused(&built(&[("Makefile", b"run:"), ("big", &big)])).contains("extraction limit"));
        // Exactly at the limit is fine.
        let fits = vec![0u8; (1 << 20) - 4];
        assert_eq!(check(&built(&[("Makefile", b"run:"), ("fits", &fits)])).unwrap().bytes, 1 << 20);
        let over = vec![0u8; (1 << 20) - 3];
        assert!(refused(&built(&[("Makefile", b"run:"), ("over", &over)])).contains("extraction limit"));
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_limit_without_inflating_it_all() {
        let mut t = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(4 << 20);
        h.set_mode(0o644);
        t.append_data(&mut h, "bomb", std::io::repeat(0).take(4 << 20)).unwrap();
        let bomb = gz(&t.into_inner().unwrap());
        let mut c = ArchiveCheck::new(LIMITS);
        let r = c.feed(&bomb).and_then(|()| c.finish().map(|_| ()));
        assert!(r.unwrap_err().0.contains("declares 4194304 bytes"));
        assert!(c.inflated() < 64 * 1024, "stopped at the header, inflated {}", c.inflated());
        assert_eq!(c.take_inflated(), c.inflated());
        assert_eq!(c.take_inflated(), 0, "charged once");
        // Zeros hidden after the end-of-archive marker count as well.
        let tail = gz(&[makefile(), vec![0; 2 << 20]].concat());
        let mut c = ArchiveCheck::new(LIMITS);
        assert!(c.feed(&tail).unwrap_err().0.contains("after the end of the tar archive"));
        assert!(c.inflated() < 256 * 1024);
        check(&gz(&[makefile(), vec![0; 10240]].concat())).unwrap();
        // Data of a directory entry is inflated too, so it counts.
        let dir = tar_gz(&[makefile(), entry("d/", Directory, 0o755, &vec![0; (1 << 20) + 1], "")]);
        assert!(refused(&dir).contains("extraction limit"));
    }

    #[test]
    fn gnu_long_names_are_read_bounded_and_counted() {
        let long = format!("{}/Makefile", "x".repeat(150));
        let s = check(&built(&[("Makefile", b"run:"), (&long, b"y")])).unwrap();
        assert_eq!(s.entries, 2);
        assert_eq!(s.bytes, 4 + 1 + long.len() as u64 + 1, "the long name's data counts");
        // A long name naming a traversal is seen through.
        let evil = format!("{}/../../../etc/x", "a/".repeat(60));
        assert!(refused(&built(&[("Makefile", b"run:"), (&evil, b"y")])).contains("'..'"));
        // A huge long name is refused from its header, before it is buffered.
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        h.set_entry_type(GNULongName);
        h.set_size(1 << 30);
        h.set_cksum();
        let why = refused(&gz(h.as_bytes()));
        assert!(
            why.contains("GNU long name of 1073741823 bytes is longer than the limit of 200 (--max-path)"),
            "{why}"
        );
        // Two long names for one entry.
        let mut l = h.clone();
        l.set_size(2);
        l.set_cksum();
        let one = [l.as_bytes().to_vec(), b"a\0".to_vec(), vec![0; 510]].concat();
        let twice = [one.clone(), one, makefile()].concat();
        assert!(refused(&gz(&twice)).contains("two GNU long names"));
        // A long name and then the end.
        let mut dangling = [l.as_bytes().to_vec(), b"a\0".to_vec(), vec![0; 510]].concat();
        dangling.extend_from_slice(&[0; 1024]);
        assert!(refused(&gz(&[makefile(), dangling].concat())).contains("describes no entry"));
    }

    #[test]
    fn pax_records_rename_resize_and_are_bounded() {
        let name = "ü".repeat(80) + ".txt";
        let ok = tar_gz(&[makefile(), pax(&[("path", &name), ("mtime", "1.5")]), ustar("short", Regular, b"x")]);
        assert_eq!(check(&ok).unwrap().files, 2);
        // The PAX path is the one that counts.
        let sneaky = tar_gz(&[makefile(), pax(&[("path", "../../etc/cron.d/x")]), ustar("innocent", Regular, b"x")]);
        assert!(refused(&sneaky).contains("'..'"));
        let made = tar_gz(&[pax(&[("path", "Makefile")]), ustar("notmake", Regular, b"run:\n")]);
        assert!(check(&made).unwrap().makefile);
        // PAX size overrides the header's.
        let sized = [pax(&[("size", "600")]), ustar("f", Regular, &[1; 600]), makefile(), vec![0; 1024]].concat();
        let mut fixed = sized.clone();
        // Rewrite the member's header size to 0 (and its checksum): the data is 600 bytes anyway.
        let mut h = tar::Header::from_byte_slice(&fixed[512..1024]).clone();
        h.set_size(0);
        h.set_cksum();
        fixed[512..1024].copy_from_slice(h.as_bytes());
        assert_eq!(check(&gz(&fixed)).unwrap().files, 2);
        // Oversized and duplicated PAX headers.
        let huge = pax(&[("comment", &"c".repeat(10_000))]);
        assert!(refused(&tar_gz(&[makefile(), huge, ustar("f", Regular, b"")])).contains("PAX header of"));
        let two = tar_gz(&[makefile(), pax(&[("mtime", "1")]), pax(&[("mtime", "2")]), ustar("f", Regular, b"")]);
        assert!(refused(&two).contains("two PAX headers"));
        // A global header ('g') is metadata and counts as an entry, as git archive writes.
        let mut g = pax(&[("comment", "abc")]);
        g[156] = b'g';
        let mut h = tar::Header::from_byte_slice(&g[..512]).clone();
        h.set_cksum();
        g[..512].copy_from_slice(h.as_bytes());
        assert_eq!(check(&tar_gz(&[g, makefile()])).unwrap().entries, 2);
    }

    #[test]
    fn base256_sizes_and_checksums() {
        let mut e = makefile();
        let mut h = tar::Header::from_byte_slice(&e[..512]).clone();
        let size = h.size().unwrap();
        let field = &mut h.as_old_mut().size;
        field.fill(0);
        field[0] = 0x80;
        field[11] = size as u8;
        h.set_cksum();
        e[..512].copy_from_slice(h.as_bytes());
        assert!(check(&tar_gz(&[e.clone()])).unwrap().makefile);
        // The largest base-256 size: refused, not an overflow.
        let mut huge = tar::Header::from_byte_slice(&e[..512]).clone();
        huge.as_old_mut().size = [0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        huge.set_cksum();
        for kind in [Regular, Directory, GNULongName, Fifo] {
            huge.set_entry_type(kind);
            huge.set_cksum();
            assert!(refused(&gz(huge.as_bytes())).contains("18446744073709551615"), "{kind:?}");
        }
        e[100] ^= 1; // mode changed, checksum now wrong
        assert!(refused(&tar_gz(&[e])).contains("not a tar file"));
        let second = [makefile(), {
            let mut x = makefile();
            x[0] = b'N';
            x
        }]
        .concat();
        assert!(refused(&tar_gz(&[second])).contains("checksum mismatch after 1 entries"));
    }

    // ------------------------------------------------ agreement with extract

    #[derive(Debug, Clone)]
    enum Kind {
        File(usize),
        Dir,
        Symlink,
        Fifo,
    }

    #[derive(Debug, Clone)]
    enum Name {
        Plain,
        Dotted,
        Traversal,
        Absolute,
        /// Long enough for a GNU long name (or the path limit).
        Long(usize),
        Make(usize),
    }

    fn name_for(i: usize, n: &Name, dir: bool) -> String {
        let base = if dir { format!("d{i}") } else { format!("f{i}") };
        match n {
            Name::Plain => base,
            Name::Dotted => format!("./{base}"),
            Name::Traversal => format!("x/../../{base}"),
            Name::Absolute => format!("/tmp/{base}"),
            Name::Long(len) => format!("{}/{base}", "l".repeat(*len)),
            Name::Make(k) => MAKEFILE_NAMES[k % 3].to_string(),
        }
    }

    fn archive_strategy() -> impl Strategy<Value = Vec<u8>> {
        let kind = prop_oneof![
            6 => (0usize..3000).prop_map(Kind::File),
            2 => Just(Kind::Dir),
            1 => Just(Kind::Symlink),
            1 => Just(Kind::Fifo),
        ];
        let name = prop_oneof![
            6 => Just(Name::Plain),
            2 => Just(Name::Dotted),
            1 => Just(Name::Traversal),
            1 => Just(Name::Absolute),
            2 => (90usize..260).prop_map(Name::Long),
            2 => (0usize..3).prop_map(Name::Make),
        ];
        proptest::collection::vec((kind, name), 0..12).prop_map(|entries| {
            let mut t = tar::Builder::new(Vec::new());
            let mut used_makefile = false;
            for (i, (kind, name)) in entries.iter().enumerate() {
                let name = match name {
                    Name::Make(_) if used_makefile => Name::Plain,
                    n => n.clone(),
                };
                used_makefile |= matches!(name, Name::Make(_));
                let path = name_for(i, &name, matches!(kind, Kind::Dir));
                let mut h = tar::Header::new_gnu();
                h.set_mode(0o644);
                let data = match kind {
                    Kind::File(n) => vec![b'z'; *n],
                    _ => Vec::new(),
                };
                h.set_entry_type(match kind {
                    Kind::File(_) => Regular,
                    Kind::Dir => Directory,
                    Kind::Symlink => Symlink,
                    Kind::Fifo => Fifo,
                });
                h.set_size(data.len() as u64);
                // The builder refuses '..' and absolute names: write those raw.
                if matches!(name, Name::Traversal | Name::Absolute) {
                    h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
                    h.set_cksum();
                    t.append(&h, &data[..]).unwrap();
                } else {
                    t.append_data(&mut h, &path, &data[..]).unwrap();
                }
            }
            gz(&t.into_inner().unwrap())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048), chunk in 1usize..600) {
            let _ = check_in(&bytes, chunk, LIMITS);
            let mut gzipped = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
            gzipped.extend_from_slice(&bytes);
            let _ = check_in(&gzipped, chunk, LIMITS);
            let _ = check_in(&gz(&bytes), chunk, LIMITS);
        }

        #[test]
        fn never_panics_on_random_headers_with_good_checksums(
            blocks in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 512), 0usize..4), 1..6),
        ) {
            // Random headers that pass the checksum, typed as extensions and
            // members, with some data after each: every path past the checksum.
            let mut tar = Vec::new();
            for (bytes, extra) in blocks {
                let mut h = tar::Header::from_byte_slice(&bytes).clone();
                h.set_cksum();
                tar.extend_from_slice(h.as_bytes());
                tar.extend(std::iter::repeat_n(b'7', extra * 300));
            }
            let _ = check_in(&gz(&tar), 97, LIMITS);
            let mut scan = TarScan::new(LIMITS);
            let _ = scan.feed(&tar).and_then(|()| scan.finish());
        }

        #[test]
        fn never_panics_on_damaged_archives(archive in archive_strategy(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut damaged = archive.clone();
            let i = at.index(damaged.len());
            damaged[i] = byte;
            let _ = check_in(&damaged, 13, LIMITS);
            let _ = check_in(&archive[..cut.index(archive.len())], 100, LIMITS);
            let mut tar_damaged = Vec::new();
            flate2::read::GzDecoder::new(&archive[..]).read_to_end(&mut tar_damaged).unwrap();
            if !tar_damaged.is_empty() {
                let j = at.index(tar_damaged.len());
                tar_damaged[j] = byte;
                let _ = check_in(&gz(&tar_damaged), 512, LIMITS);
            }
        }

        #[test]
        fn agrees_with_extract(archive in archive_strategy(), chunk in 1usize..5000) {
            let limits = ExtractLimits { max_bytes: 8000, max_entries: 8, max_path: 200 };
            let checked = check_in(&archive, chunk, limits);
            let checked_ok = match &checked {
                Ok(_) => true,
                Err(r) => r.0.contains("Makefile at the top level") || r.0.contains("Makefile is a directory")
                    || r.0.contains("tar archive is empty"),
            };
            let dir = tempfile::tempdir().unwrap();
            let ws = dir.path().join("ws");
            std::fs::create_dir(&ws).unwrap();
            let extracted = crate::extract::extract(&archive[..], &ws, &limits);
            prop_assert_eq!(checked_ok, extracted.is_ok(), "check {:?} vs extract {:?}", checked, extracted);
        }
    }

    use std::io::Read;
}

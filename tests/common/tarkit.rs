//! Hand-built tar entries, for archives the `tar` crate would refuse to
//! write (`..`, absolute paths, links, devices). Shared by the unit tests
//! of `src/extract.rs` (through `#[path]`) and the integration tests.
#![allow(dead_code)]

use std::io::Write;

/// One ustar entry with its name and link name written raw, padded to 512.
pub fn entry(name: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: &str) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    {
        let b = h.as_old_mut();
        b.name[..name.len()].copy_from_slice(name.as_bytes());
        b.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// gzip-compress bytes.
pub fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("write to memory");
    e.finish().expect("finish gzip in memory")
}

/// A .tar.gz of these entries, with the end-of-archive marker.
pub fn tar_gz(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut tar = entries.concat();
    tar.extend_from_slice(&[0u8; 1024]);
    gz(&tar)
}

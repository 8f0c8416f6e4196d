//! Hand-built tar entries, for archives the `tar` crate would refuse to
//! write (`..`, absolute paths, links, devices), PAX headers, and GNU tars. Shared by the unit tests
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
    with_data(h, data)
}

/// One ustar-format entry (magic "ustar"), its name written raw, padded to 512.
pub fn ustar(name: &str, kind: tar::EntryType, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.as_ustar_mut().expect("a ustar header").name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(0o644);
    with_data(h, data)
}

/// A PAX extended header ('x') holding these records, padded to 512.
pub fn pax(records: &[(&str, &str)]) -> Vec<u8> {
    let mut data = Vec::new();
    for (k, v) in records {
        // The record's length counts its own digits.
        let body = format!(" {k}={v}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        data.extend_from_slice(format!("{len}{body}").as_bytes());
    }
    let mut h = tar::Header::new_ustar();
    h.set_path("PaxHeaders/0").expect("a short path");
    h.set_entry_type(tar::EntryType::XHeader);
    with_data(h, &data)
}

/// A tar built by the tar crate (GNU format: long names as 'L' entries).
pub fn gnu_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        t.append_data(&mut h, name, *data).expect("append to memory");
    }
    t.into_inner().expect("finish in memory")
}

/// The header with its size and checksum set, then `data`, padded to 512.
fn with_data(mut h: tar::Header, data: &[u8]) -> Vec<u8> {
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// gzip-compress bytes (the default level: zlib-rs's fastest level packs
/// long runs of zeros at about 130:1, too loosely for the bomb tests).
pub fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).expect("write to memory");
    e.finish().expect("finish gzip in memory")
}

/// A .tar.gz of these entries, with the end-of-archive marker.
pub fn tar_gz(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut tar = entries.concat();
    tar.extend_from_slice(&[0u8; 1024]);
    gz(&tar)
}

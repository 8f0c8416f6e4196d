//! XDR (RFC 4506) primitives: a writer that appends to a `Vec<u8>` and a
//! reader over a byte slice.
//!
//! Owns: the encoding of unsigned/signed ints, bools, enums, variable-length
//! opaques and strings, with zero padding to 4-byte boundaries.
//! Must not touch: record marking (see `record`), RPC headers (see `rpc`),
//! sockets or files. A short buffer is one small error, `XdrError::Short`.

use byteorder::{BigEndian, ByteOrder};

/// Why a value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XdrError {
    /// The buffer ended before the value did.
    Short,
    /// The bytes are there but do not make a valid value.
    Invalid(String),
}

impl std::fmt::Display for XdrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            XdrError::Short => write!(f, "message ended early"),
            XdrError::Invalid(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for XdrError {}

/// Number of zero bytes that follow `len` bytes of opaque data.
pub fn padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Appends XDR values to a byte vector.
#[derive(Debug, Default, Clone)]
pub struct XdrWriter {
    buf: Vec<u8>,
}

impl XdrWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        let mut word = [0u8; 4];
        BigEndian::write_u32(&mut word, v);
        self.buf.extend_from_slice(&word);
        self
    }

    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.u32(v as u32)
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u32(u32::from(v))
    }

    /// Variable-length opaque: length, bytes, padding.
    pub fn opaque(&mut self, data: &[u8]) -> &mut Self {
        self.u32(data.len() as u32);
        self.buf.extend_from_slice(data);
        self.pad(data.len())
    }

    /// Fixed-length opaque (`opaque x[n]`): the bytes and their padding,
    /// no length word.
    pub fn fixed(&mut self, data: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(data);
        self.pad(data.len())
    }

    /// Zero bytes that follow `len` bytes of opaque data written elsewhere.
    pub fn pad(&mut self, len: usize) -> &mut Self {
        self.buf.extend_from_slice(&[0u8; 3][..padding(len)]);
        self
    }

    pub fn string(&mut self, s: &str) -> &mut Self {
        self.opaque(s.as_bytes())
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads XDR values from the front of a byte slice.
#[derive(Debug, Clone)]
pub struct XdrReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> XdrReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        XdrReader { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], XdrError> {
        if self.remaining() < n {
            return Err(XdrError::Short);
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn u32(&mut self) -> Result<u32, XdrError> {
        Ok(BigEndian::read_u32(self.take(4)?))
    }

    pub fn i32(&mut self) -> Result<i32, XdrError> {
        Ok(self.u32()? as i32)
    }

    pub fn bool(&mut self) -> Result<bool, XdrError> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(XdrError::Invalid(format!("bool must be 0 or 1, got {other}"))),
        }
    }

    /// Variable-length opaque of at most `max` bytes. Padding must be zero.
    pub fn opaque(&mut self, max: usize) -> Result<&'a [u8], XdrError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(XdrError::Invalid(format!("opaque of {len} bytes exceeds the limit of {max}")));
        }
        let data = self.take(len)?;
        let pad = self.take(padding(len))?;
        if pad.iter().any(|&b| b != 0) {
            return Err(XdrError::Invalid("non-zero padding".into()));
        }
        Ok(data)
    }

    /// Fixed-length opaque (`opaque x[n]`): `n` bytes and their padding,
    /// which must be zero.
    pub fn fixed(&mut self, n: usize) -> Result<&'a [u8], XdrError> {
        let data = self.take(n)?;
        if self.take(padding(n))?.iter().any(|&b| b != 0) {
            return Err(XdrError::Invalid("non-zero padding".into()));
        }
        Ok(data)
    }

    /// A string of at most `max` bytes; must be UTF-8.
    pub fn string(&mut self, max: usize) -> Result<String, XdrError> {
        let bytes = self.opaque(max)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| XdrError::Invalid("string is not UTF-8".into()))
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), XdrError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(XdrError::Invalid(format!("{} unexpected trailing bytes", self.remaining())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_is_padded_to_four() {
        let mut w = XdrWriter::new();
        w.opaque(b"0123456789");
        assert_eq!(w.into_bytes(), b"\x00\x00\x00\x0a0123456789\x00\x00".to_vec());
    }

    #[test]
    fn empty_string_is_one_word() {
        let mut w = XdrWriter::new();
        w.string("");
        assert_eq!(w.into_bytes(), vec![0, 0, 0, 0]);
    }

    #[test]
    fn reader_reports_short_and_limits() {
        assert_eq!(XdrReader::new(&[0, 0]).u32(), Err(XdrError::Short));
        let bytes = [0, 0, 0, 5, b'a', b'b', b'c', b'd', b'e', 0, 0, 0];
        assert_eq!(XdrReader::new(&bytes).opaque(5).unwrap(), b"abcde");
        assert!(matches!(XdrReader::new(&bytes).opaque(4), Err(XdrError::Invalid(_))));
        assert_eq!(XdrReader::new(&bytes[..10]).opaque(5), Err(XdrError::Short));
        assert!(matches!(XdrReader::new(&[0, 0, 0, 2]).bool(), Err(XdrError::Invalid(_))));
    }

    #[test]
    fn nonzero_padding_is_rejected() {
        let bytes = [0, 0, 0, 1, b'a', 1, 0, 0];
        assert!(matches!(XdrReader::new(&bytes).opaque(8), Err(XdrError::Invalid(_))));
    }
}

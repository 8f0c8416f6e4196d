//! Registration with the local rpcbind (portmapper version 2, RFC 1833),
//! so that `rpcinfo -p` lists CLOUD_PROG and `clnt_create(host, PROG,
//! VERS, "tcp")` finds the server.
//!
//! Owns: the PMAPPROC_SET and PMAPPROC_UNSET calls (hand-written XDR with
//! `rpc` and `xdr`, sent as one record-marked call over TCP to
//! 127.0.0.1:111) and the decoding of their boolean replies.
//! These are a few BLOCKING calls with a short timeout, made once at start
//! (after binding, before serving) and once at a clean stop (after the
//! reactor loop has returned): never from the serving loop. A missing
//! rpcbind costs at most one connect refused (or the timeout) and one line.
//! Must not touch: the reactor, the server's sockets, any other program's
//! registration than (CLOUD_PROG, CLOUD_VERS).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::rpc::{self, ReplyOutcome};
use crate::xdr::XdrReader;

pub const PMAP_PROG: u32 = 100_000;
pub const PMAP_VERS: u32 = 2;
pub const PMAPPROC_SET: u32 = 1;
pub const PMAPPROC_UNSET: u32 = 2;
pub const IPPROTO_TCP: u32 = 6;
/// Where rpcbind listens.
pub const RPCBIND: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 111));
/// How long one call may take (connect, send, answer).
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// A `mapping` (prog, vers, prot, port) call to the portmapper, record-marked.
pub fn encode_call(xid: u32, proc_num: u32, prog: u32, vers: u32, port: u16) -> Vec<u8> {
    let mut w = rpc::call(xid, PMAP_PROG, PMAP_VERS, proc_num);
    w.u32(prog).u32(vers).u32(IPPROTO_TCP).u32(u32::from(port));
    crate::record::frame(&w.into_bytes())
}

/// The boolean a SET or UNSET reply carries for call `xid` (one record,
/// record marking already removed).
pub fn decode_bool_reply(xid: u32, record: &[u8]) -> Result<bool, String> {
    let (got, outcome) = rpc::decode_reply(record).map_err(|e| format!("bad reply: {e}"))?;
    if got != xid {
        return Err(format!("reply to xid {got:#x}, expected {xid:#x}"));
    }
    match outcome {
        ReplyOutcome::Success { results_at } => {
            XdrReader::new(&record[results_at..]).bool().map_err(|e| format!("bad reply: {e}"))
        }
        ReplyOutcome::Failed(why) | ReplyOutcome::Denied(why) => Err(why),
    }
}

/// One call to the portmapper at `at`; its boolean answer.
fn call(at: SocketAddr, proc_num: u32, prog: u32, vers: u32, port: u16) -> Result<bool, String> {
    let xid = std::process::id() ^ (proc_num << 24) ^ 0x5043_0000;
    let mut s = TcpStream::connect_timeout(&at, TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(TIMEOUT)).and_then(|_| s.set_write_timeout(Some(TIMEOUT))).map_err(|e| e.to_string())?;
    s.write_all(&encode_call(xid, proc_num, prog, vers, port)).map_err(|e| e.to_string())?;
    // One reply of a few dozen bytes, possibly in several fragments.
    let mut record = Vec::new();
    loop {
        let mut mark = [0u8; 4];
        s.read_exact(&mut mark).map_err(|e| format!("no reply: {e}"))?;
        let mark = u32::from_be_bytes(mark);
        let len = (mark & 0x7fff_ffff) as usize;
        if record.len() + len > 4096 {
            return Err("reply too long".into());
        }
        let at = record.len();
        record.resize(at + len, 0);
        s.read_exact(&mut record[at..]).map_err(|e| format!("short reply: {e}"))?;
        if mark & 0x8000_0000 != 0 {
            break;
        }
    }
    decode_bool_reply(xid, &record)
}

/// Unset any stale mapping of (prog, vers), then map it to TCP `port`.
/// `Err` is one line for the operator.
pub fn register_at(at: SocketAddr, prog: u32, vers: u32, port: u16) -> Result<(), String> {
    let fail = |why: String| {
        format!("cannot register with rpcbind at {at} ({why}): rpcinfo will not list the server; start rpcbind or drop --register")
    };
    // false: there was nothing to unset.
    call(at, PMAPPROC_UNSET, prog, vers, 0).map_err(fail)?;
    match call(at, PMAPPROC_SET, prog, vers, port).map_err(fail)? {
        true => Ok(()),
        false => Err(fail("it refused the mapping".into())),
    }
}

/// Remove our mapping of (prog, vers). `Err` is one line for the operator.
pub fn unregister_at(at: SocketAddr, prog: u32, vers: u32) -> Result<(), String> {
    call(at, PMAPPROC_UNSET, prog, vers, 0)
        .map(|_| ())
        .map_err(|why| format!("cannot unregister from rpcbind at {at} ({why}): `rpcinfo -p` may list a stale entry"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn set_call_is_the_portmapper_mapping() {
        let bytes = encode_call(7, PMAPPROC_SET, 0x2000_C10D, 1, 4242);
        // Record mark: last fragment, 56 bytes (40 header + 16 mapping).
        assert_eq!(&bytes[..4], &[0x80, 0, 0, 56]);
        let words: Vec<u32> = bytes[4..].chunks(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(words, [7, 0, 2, 100_000, 2, 1, 0, 0, 0, 0, 0x2000_C10D, 1, 6, 4242]);
    }

    #[test]
    fn replies_decode_to_their_boolean() {
        let mut w = rpc::accepted(9, rpc::AcceptStat::Success);
        w.bool(true);
        assert_eq!(decode_bool_reply(9, &w.into_bytes()), Ok(true));
        let mut w = rpc::accepted(9, rpc::AcceptStat::Success);
        w.bool(false);
        assert_eq!(decode_bool_reply(9, &w.into_bytes()), Ok(false));
        assert!(decode_bool_reply(8, &rpc::accepted(9, rpc::AcceptStat::Success).into_bytes()).is_err());
        let e = decode_bool_reply(9, &rpc::accepted(9, rpc::AcceptStat::ProgUnavail).into_bytes()).unwrap_err();
        assert!(e.contains("does not serve"), "{e}");
        assert!(decode_bool_reply(9, &[1, 2]).is_err());
    }

    #[test]
    fn without_rpcbind_the_error_is_one_line_saying_what_to_do() {
        // A port nobody listens on: bound, then closed.
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = register_at(addr, 0x2000_C10D, 1, 9000).unwrap_err();
        assert!(e.starts_with("cannot register with rpcbind at 127.0.0.1:"), "{e}");
        assert!(e.ends_with("start rpcbind or drop --register"), "{e}");
        assert!(!e.contains('\n'));
    }
}

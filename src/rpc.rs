//! ONC RPC v2 messages (RFC 5531): call headers, reply headers, and the
//! error replies every server owes its callers.
//!
//! Owns: the call header (xid, versions, credential and verifier, accepted
//! as AUTH_NONE or AUTH_SYS), the shape of a record's head while it is still
//! arriving (`call_shape`), every reply header, and the rules that turn a
//! call for the wrong program/version/procedure into the right reply.
//! Must not touch: procedure arguments (see `proto`) or sockets.

use crate::record::Shape;
use crate::xdr::{padding, XdrError, XdrReader, XdrWriter};

pub const RPC_VERSION: u32 = 2;
pub const MSG_CALL: u32 = 0;
pub const MSG_REPLY: u32 = 1;
pub const AUTH_NONE: u32 = 0;
pub const AUTH_SYS: u32 = 1;
/// RFC 5531 caps an opaque_auth body at 400 bytes.
pub const MAX_AUTH_BODY: usize = 400;

/// accept_stat values of a MSG_ACCEPTED reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptStat {
    Success = 0,
    ProgUnavail = 1,
    ProgMismatch = 2,
    ProcUnavail = 3,
    GarbageArgs = 4,
    SystemErr = 5,
}

/// auth_stat values of an AUTH_ERROR rejection.
pub const AUTH_BADCRED: u32 = 1;
pub const AUTH_REJECTEDCRED: u32 = 2;
pub const AUTH_TOOWEAK: u32 = 5;

/// Longest AUTH_SYS machine name (RFC 5531 appendix A).
pub const MAX_MACHINE_NAME: usize = 255;
/// Most supplementary groups an AUTH_SYS credential may list.
pub const MAX_AUTH_GIDS: usize = 16;

/// The body of an AUTH_SYS credential (RFC 5531 appendix A,
/// `authsys_parms`). What it claims is only a claim: see `peer` for how
/// the server checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSys {
    pub stamp: u32,
    pub machinename: String,
    pub uid: u32,
    pub gid: u32,
    pub gids: Vec<u32>,
}

impl AuthSys {
    pub fn decode(body: &[u8]) -> Result<AuthSys, XdrError> {
        let mut r = XdrReader::new(body);
        let stamp = r.u32()?;
        let name = r.opaque(MAX_MACHINE_NAME)?;
        let machinename = String::from_utf8_lossy(name).into_owned();
        let uid = r.u32()?;
        let gid = r.u32()?;
        let n = r.u32()? as usize;
        if n > MAX_AUTH_GIDS {
            return Err(XdrError::Invalid(format!("{n} groups in an AUTH_SYS credential (at most {MAX_AUTH_GIDS})")));
        }
        let gids = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
        r.finish()?;
        Ok(AuthSys { stamp, machinename, uid, gid, gids })
    }

    pub fn encode(&self, w: &mut XdrWriter) {
        let name = self.machinename.as_bytes();
        let name = &name[..name.len().min(MAX_MACHINE_NAME)];
        w.u32(self.stamp).opaque(name).u32(self.uid).u32(self.gid);
        let gids = &self.gids[..self.gids.len().min(MAX_AUTH_GIDS)];
        w.u32(gids.len() as u32);
        for &g in gids {
            w.u32(g);
        }
    }
}

/// A call's credential, as decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    None,
    Sys(AuthSys),
    /// AUTH_SYS whose body does not decode: refused with AUTH_BADCRED.
    BadSys,
    /// Any other flavor: refused with AUTH_TOOWEAK.
    Other(u32),
}

/// The parts of a call header a server dispatches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallHeader {
    pub xid: u32,
    pub rpcvers: u32,
    pub prog: u32,
    pub vers: u32,
    pub proc_num: u32,
    pub cred_flavor: u32,
    pub cred: Credential,
    /// Offset of the procedure's arguments within the record.
    pub args_at: usize,
}

impl CallHeader {
    /// Decode the header from the front of a record.
    pub fn decode(record: &[u8]) -> Result<CallHeader, XdrError> {
        let mut r = XdrReader::new(record);
        let xid = r.u32()?;
        let msg_type = r.u32()?;
        if msg_type != MSG_CALL {
            return Err(XdrError::Invalid(format!("expected a CALL, got message type {msg_type}")));
        }
        let rpcvers = r.u32()?;
        let prog = r.u32()?;
        let vers = r.u32()?;
        let proc_num = r.u32()?;
        let cred_flavor = r.u32()?;
        let body = r.opaque(MAX_AUTH_BODY)?;
        let cred = match cred_flavor {
            AUTH_NONE => Credential::None,
            AUTH_SYS => AuthSys::decode(body).map_or(Credential::BadSys, Credential::Sys),
            other => Credential::Other(other),
        };
        let _verf_flavor = r.u32()?;
        r.opaque(MAX_AUTH_BODY)?;
        Ok(CallHeader { xid, rpcvers, prog, vers, proc_num, cred_flavor, cred, args_at: r.position() })
    }
}

/// How a record that starts with a call header should be buffered.
/// `stream_at(prog, vers, proc)` gives, for procedures whose last argument is
/// a large opaque, the offset of its length word within the arguments.
/// A call with an RPC version other than 2 is discarded as soon as its
/// version is seen: whatever follows may have any layout, and the answer is
/// RPC_MISMATCH whatever the procedure (also for a DEPLOY that would stream).
pub fn call_shape(head: &[u8], stream_at: impl Fn(u32, u32, u32) -> Option<usize>) -> Shape {
    let word = |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]) as usize;
    if head.len() < 12 {
        return Shape::NeedMore(12);
    }
    if word(4) == MSG_CALL as usize && word(8) != RPC_VERSION as usize {
        return Shape::Discard;
    }
    if head.len() < 32 {
        return Shape::NeedMore(32);
    }
    let cred_len = word(28);
    if cred_len > MAX_AUTH_BODY {
        return Shape::Whole; // decoding will reject it
    }
    let verf_len_at = 32 + cred_len + padding(cred_len) + 4;
    if head.len() < verf_len_at + 4 {
        return Shape::NeedMore(verf_len_at + 4);
    }
    let verf_len = word(verf_len_at);
    if verf_len > MAX_AUTH_BODY {
        return Shape::Whole;
    }
    let args_at = verf_len_at + 4 + verf_len + padding(verf_len);
    match stream_at(word(12) as u32, word(16) as u32, word(20) as u32) {
        Some(off) if word(8) == RPC_VERSION as usize && word(4) == MSG_CALL as usize => {
            Shape::Stream { len_at: args_at + off }
        }
        _ => Shape::Whole,
    }
}

/// A program this server serves, for dispatch checks.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    pub prog: u32,
    pub vers: u32,
    /// Highest procedure number served.
    pub max_proc: u32,
}

/// Check a call header against the served programs. `Err` carries the
/// complete error reply to send.
pub fn admit(h: &CallHeader, programs: &[Program]) -> Result<(), Vec<u8>> {
    if h.rpcvers != RPC_VERSION {
        return Err(rpc_mismatch(h.xid));
    }
    match h.cred {
        Credential::None | Credential::Sys(_) => {}
        Credential::BadSys => return Err(auth_error(h.xid, AUTH_BADCRED)),
        Credential::Other(_) => return Err(auth_error(h.xid, AUTH_TOOWEAK)),
    }
    let Some(p) = programs.iter().find(|p| p.prog == h.prog) else {
        return Err(accepted(h.xid, AcceptStat::ProgUnavail).into_bytes());
    };
    if p.vers != h.vers {
        let mut w = accepted(h.xid, AcceptStat::ProgMismatch);
        w.u32(p.vers).u32(p.vers);
        return Err(w.into_bytes());
    }
    if h.proc_num > p.max_proc {
        return Err(accepted(h.xid, AcceptStat::ProcUnavail).into_bytes());
    }
    Ok(())
}

/// The reply to a record whose header could not even be decoded, if it has
/// an xid to answer: AUTH_BADCRED for a credential over the RFC's 400 bytes,
/// GARBAGE_ARGS otherwise.
pub fn garbage_reply(record: &[u8]) -> Option<Vec<u8>> {
    let mut r = XdrReader::new(record);
    let xid = r.u32().ok()?;
    let words: Vec<u32> = (0..6).map_while(|_| r.u32().ok()).collect();
    // msg_type, rpcvers, prog, vers, proc, cred flavor; then the cred length.
    if words.len() == 6 && words[0] == MSG_CALL && r.u32().is_ok_and(|len| len as usize > MAX_AUTH_BODY) {
        let mut w = reply_head(xid, 1);
        w.u32(1).u32(AUTH_BADCRED); // AUTH_ERROR
        return Some(w.into_bytes());
    }
    Some(accepted(xid, AcceptStat::GarbageArgs).into_bytes())
}

/// A MSG_DENIED / AUTH_ERROR reply with this auth_stat.
pub fn auth_error(xid: u32, auth_stat: u32) -> Vec<u8> {
    let mut w = reply_head(xid, 1);
    w.u32(1).u32(auth_stat);
    w.into_bytes()
}

/// MSG_DENIED, RPC_MISMATCH, versions 2..2: the answer to any call whose
/// RPC version is not 2.
pub fn rpc_mismatch(xid: u32) -> Vec<u8> {
    let mut w = reply_head(xid, 1);
    w.u32(0).u32(RPC_VERSION).u32(RPC_VERSION); // RPC_MISMATCH, low, high
    w.into_bytes()
}

fn reply_head(xid: u32, reply_stat: u32) -> XdrWriter {
    let mut w = XdrWriter::new();
    w.u32(xid).u32(MSG_REPLY).u32(reply_stat);
    w
}

/// A MSG_ACCEPTED reply header with an AUTH_NONE verifier and this status.
/// For `Success` the caller appends the results.
pub fn accepted(xid: u32, stat: AcceptStat) -> XdrWriter {
    let mut w = reply_head(xid, 0);
    w.u32(AUTH_NONE).u32(0).u32(stat as u32);
    w
}

/// The header of a call with AUTH_NONE credentials; append the arguments.
pub fn call(xid: u32, prog: u32, vers: u32, proc_num: u32) -> XdrWriter {
    let mut w = XdrWriter::new();
    w.u32(xid).u32(MSG_CALL).u32(RPC_VERSION).u32(prog).u32(vers).u32(proc_num);
    w.u32(AUTH_NONE).u32(0).u32(AUTH_NONE).u32(0);
    w
}

/// The header of a call with AUTH_SYS credentials; append the arguments.
pub fn call_sys(xid: u32, prog: u32, vers: u32, proc_num: u32, cred: &AuthSys) -> XdrWriter {
    let mut body = XdrWriter::new();
    cred.encode(&mut body);
    let mut w = XdrWriter::new();
    w.u32(xid).u32(MSG_CALL).u32(RPC_VERSION).u32(prog).u32(vers).u32(proc_num);
    w.u32(AUTH_SYS).opaque(&body.into_bytes());
    w.u32(AUTH_NONE).u32(0);
    w
}

/// Length of a success reply header: xid, REPLY, ACCEPTED, verf (2), SUCCESS.
pub const SUCCESS_HEADER_LEN: usize = 24;

/// What a reply says, up to its results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// Results follow at this offset.
    Success { results_at: usize },
    /// The call was accepted but not executed.
    Failed(String),
    /// The call was rejected.
    Denied(String),
}

/// How [`decode_reply`] words AUTH_TOOWEAK, as a client meets it. A node
/// link compares against it to say what it means there instead (a node
/// that wants a shared secret).
pub const AUTH_TOOWEAK_TEXT: &str = "the server does not take calls from this user here (root from another host, or a uid jobs run as; see the server's log)";

/// Decode a reply header: its xid and outcome.
pub fn decode_reply(record: &[u8]) -> Result<(u32, ReplyOutcome), XdrError> {
    let mut r = XdrReader::new(record);
    let xid = r.u32()?;
    let msg_type = r.u32()?;
    if msg_type != MSG_REPLY {
        return Err(XdrError::Invalid(format!("expected a REPLY, got message type {msg_type}")));
    }
    match r.u32()? {
        0 => {
            r.u32()?;
            r.opaque(MAX_AUTH_BODY)?;
            let outcome = match r.u32()? {
                0 => ReplyOutcome::Success { results_at: r.position() },
                1 => ReplyOutcome::Failed(
                    "the server does not serve this program (a cloud-server node's port? clients talk to the main server's \"listening on\" address)"
                        .into(),
                ),
                2 => {
                    let (lo, hi) = (r.u32()?, r.u32()?);
                    ReplyOutcome::Failed(format!("program version mismatch: server has {lo}..={hi}"))
                }
                3 => ReplyOutcome::Failed("the server does not know this procedure".into()),
                4 => ReplyOutcome::Failed("the server could not decode the arguments".into()),
                n => ReplyOutcome::Failed(format!("the server failed (accept_stat {n})")),
            };
            Ok((xid, outcome))
        }
        1 => {
            let why = match r.u32()? {
                0 => {
                    let (lo, hi) = (r.u32()?, r.u32()?);
                    format!("RPC version mismatch: server speaks {lo}..={hi}")
                }
                _ => match r.u32()? {
                    AUTH_BADCRED | AUTH_REJECTEDCRED => {
                        "the server refused our credentials: the uid they claim is not the one that owns this connection".into()
                    }
                    AUTH_TOOWEAK => AUTH_TOOWEAK_TEXT.into(),
                    n => format!("authentication error {n}"),
                },
            };
            Ok((xid, ReplyOutcome::Denied(why)))
        }
        n => Err(XdrError::Invalid(format!("unknown reply_stat {n}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cloud() -> [Program; 1] {
        [Program { prog: 0x2000_C10D, vers: 1, max_proc: 4 }]
    }

    fn header(rpcvers: u32, prog: u32, vers: u32, proc_num: u32) -> CallHeader {
        let mut raw = call(0xabcd, prog, vers, proc_num).into_bytes();
        raw[8..12].copy_from_slice(&rpcvers.to_be_bytes());
        CallHeader::decode(&raw).unwrap()
    }

    #[test]
    fn wrong_rpc_version_is_rpc_mismatch_2_2() {
        let reply = admit(&header(3, 0x2000_C10D, 1, 0), &cloud()).unwrap_err();
        let words: Vec<u32> = reply.chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect();
        assert_eq!(words, vec![0xabcd, 1, 1, 0, 2, 2]);
    }

    #[test]
    fn wrong_version_is_prog_mismatch_1_1() {
        let reply = admit(&header(2, 0x2000_C10D, 0, 0), &cloud()).unwrap_err();
        assert_eq!(&reply[20..], &[0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1]);
    }

    #[test]
    fn unknown_program_and_procedure() {
        let r = admit(&header(2, 0x2000_C10E, 1, 0), &cloud()).unwrap_err();
        assert_eq!(&r[20..], &[0, 0, 0, 1]);
        let r = admit(&header(2, 0x2000_C10D, 1, 42), &cloud()).unwrap_err();
        assert_eq!(&r[20..], &[0, 0, 0, 3]);
        assert!(admit(&header(2, 0x2000_C10D, 1, 4), &cloud()).is_ok());
    }

    #[test]
    fn oversized_credentials_are_auth_badcred() {
        let mut raw = call(0x77, 0x2000_C10D, 1, 0).into_bytes();
        raw[28..32].copy_from_slice(&401u32.to_be_bytes());
        raw.extend_from_slice(&[0u8; 404]);
        assert!(CallHeader::decode(&raw).is_err());
        let words: Vec<u32> =
            garbage_reply(&raw).unwrap().chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect();
        assert_eq!(words, vec![0x77, 1, 1, 1, AUTH_BADCRED]);
        assert_eq!(&garbage_reply(&raw[..12]).unwrap()[20..], &[0, 0, 0, 4], "too short: GARBAGE_ARGS");
    }

    /// The AUTH_SYS call of tests/vectors/status-auth-sys.txt (rpcgen +
    /// libtirpc, authsys_create("host", 0, 0, 0, NULL)), record mark removed.
    const STATUS_AUTH_SYS: [u8; 68] = [
        0xc9, 0x01, 0xe4, 0xde, 0, 0, 0, 0, 0, 0, 0, 2, 0x20, 0x00, 0xc1, 0x0d, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0,
        0, 0, 0x18, 0x6b, 0x04, 0x40, 0x21, 0, 0, 0, 4, b'h', b'o', b's', b't', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
    ];

    #[test]
    fn auth_sys_of_the_libtirpc_vector_decodes() {
        let h = CallHeader::decode(&STATUS_AUTH_SYS).unwrap();
        let want = AuthSys { stamp: 0x6b04_4021, machinename: "host".into(), uid: 0, gid: 0, gids: vec![] };
        assert_eq!(h.cred, Credential::Sys(want.clone()));
        assert_eq!(h.args_at, 64);
        assert!(admit(&h, &cloud()).is_ok());
        // Our own encoding of the same credential is byte for byte libtirpc's.
        let mine = call_sys(0xc901_e4de, 0x2000_C10D, 1, 2, &want).into_bytes();
        assert_eq!(&mine[..], &STATUS_AUTH_SYS[..64]);
    }

    #[test]
    fn auth_sys_with_groups_round_trips() {
        let cred = AuthSys { stamp: 1, machinename: "box".into(), uid: 1000, gid: 100, gids: vec![4, 24, 27] };
        let raw = call_sys(5, 0x2000_C10D, 1, 2, &cred).into_bytes();
        assert_eq!(CallHeader::decode(&raw).unwrap().cred, Credential::Sys(cred));
    }

    #[test]
    fn malformed_auth_sys_is_auth_badcred() {
        let words = |b: Vec<u8>| b.chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect::<Vec<_>>();
        // Body too short for its fields: stamp and a name length of 4, nothing else.
        let mut w = XdrWriter::new();
        w.u32(0x99).u32(MSG_CALL).u32(2).u32(0x2000_C10D).u32(1).u32(2);
        w.u32(AUTH_SYS).u32(8).u32(1).u32(4).u32(AUTH_NONE).u32(0).u32(7);
        let h = CallHeader::decode(&w.into_bytes()).unwrap();
        assert_eq!(h.cred, Credential::BadSys);
        assert_eq!(words(admit(&h, &cloud()).unwrap_err()), vec![0x99, 1, 1, 1, AUTH_BADCRED]);
        // 17 groups: one more than RFC 5531 allows.
        let mut body = XdrWriter::new();
        body.u32(0).string("h").u32(1).u32(1).u32(17);
        for g in 0..17 {
            body.u32(g);
        }
        assert!(AuthSys::decode(&body.into_bytes()).is_err());
        // Trailing bytes after the groups.
        let mut body = XdrWriter::new();
        body.u32(0).string("h").u32(1).u32(1).u32(0).u32(0);
        assert!(AuthSys::decode(&body.into_bytes()).is_err());
    }

    #[test]
    fn any_other_rpc_version_is_discarded_from_its_first_words() {
        let mut raw = call(1, 5, 1, 1).into_bytes();
        let at = |_, _, _| Some(4);
        for vers in [0u32, 1, 3, u32::MAX] {
            raw[8..12].copy_from_slice(&vers.to_be_bytes());
            assert_eq!(call_shape(&raw[..12], at), Shape::Discard, "rpcvers {vers}");
        }
    }

    #[test]
    fn shape_waits_for_credentials_then_streams() {
        let mut w = call(1, 5, 1, 1);
        w.u32(2).u32(10);
        let raw = w.into_bytes();
        let at = |p, v, n| (p == 5 && v == 1 && n == 1).then_some(4);
        assert_eq!(call_shape(&raw[..10], at), Shape::NeedMore(12));
        assert_eq!(call_shape(&raw[..12], at), Shape::NeedMore(32));
        assert_eq!(call_shape(&raw[..32], at), Shape::NeedMore(40));
        assert_eq!(call_shape(&raw, at), Shape::Stream { len_at: 44 });
    }
}

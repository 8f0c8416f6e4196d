//! The node link proves knowledge of a shared secret, both ways, before a
//! node takes any order (sans-I/O, apart from reading the secret file and
//! drawing nonces).
//!
//! Owns: the secret (`--secret-file`, [`load_secret`]), the handshake of
//! NODE_HELLO and NODE_AUTH as two small state machines, and the binding
//! rule ([`check_bind`]). Must not touch: sockets, the reactor, the job
//! table. The reactor feeds calls and replies in and sends what comes out.
//!
//! The handshake (mutual HMAC-SHA256 challenge/response):
//!
//! ```text
//! main -> node   NODE_HELLO(main_nonce)
//! node -> main   CLOUD_OK, node_nonce, node_proof = HMAC(secret, T("node"))
//! main -> node   NODE_AUTH(main_proof = HMAC(secret, T("main")))
//! node -> main   CLOUD_OK                (CLOUD_DENIED and close if wrong)
//!
//! T(role) = "cloudinfra node v1" | role | main address | node address
//!           | main_nonce | node_nonce      (each field length-prefixed)
//! ```
//!
//! Both nonces are 32 fresh bytes from getrandom ([`random_nonce`]), so a
//! recorded exchange proves nothing on another link: each side's proof
//! covers the nonce the *other* side just drew. The roles differ, so a
//! node's proof cannot be reflected back as the main server's. The
//! transcript also names the TCP endpoints as both ends see them ([`Link`]:
//! the main server's address and the node's), so a proof obtained by
//! relaying through a connection of one's own (e.g. someone who took a down
//! node's port and forwards to another node) does not verify: the endpoints
//! differ. The price: address translation (NAT, `docker -p`) between the
//! main server and a node makes the proofs disagree, and the handshake
//! fails with "wrong secret, or an address-translated link". Proofs are
//! compared in constant time (`verify_slice`).
//!
//! Wiring (for the reactor):
//! - Node side: one [`NodeGate`] per accepted link (only when a secret is
//!   configured). Every admitted call (a whole call, or a NODE_RUN's
//!   `StreamStart`) goes through [`NodeGate::on_call`] first. `Pass`: carry
//!   it out as before. `Answer`: send `reply` (for a stream, hand it to
//!   `CallReader::refuse_stream`), log `log` if any (it names the peer, and
//!   comes once per link for calls before auth), and close after the reply
//!   if `close`. A node *without* a secret answers NODE_HELLO with
//!   [`hello_refused_without_secret`] so that a main server with one says why.
//! - Main side: on connect, [`MainHandshake::new`], send NODE_HELLO with
//!   [`MainHandshake::hello_args`]; feed the results of its reply to
//!   [`MainHandshake::on_hello_results`], send NODE_AUTH with the returned
//!   arguments; feed that reply's results to
//!   [`MainHandshake::on_auth_results`]. Only after `Ok(())` is the node
//!   scheduled. Any `Err` is one line for the log: close and retry with the
//!   usual backoff. An RPC-level failure of NODE_HELLO (PROC_UNAVAIL from a
//!   node of an older version) is the caller's to report.
//!
//! What it does not do: protect the link after the handshake. The calls
//! that follow are neither encrypted nor authenticated one by one, so
//! someone who can inject into the TCP stream itself (on the path) can
//! still hijack an authenticated link. Run nodes on a network you trust or
//! under a VPN/tunnel.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::proto::{self, AuthArgs, CloudStat, HelloArgs, HelloRes, NONCE_LEN, PROOF_LEN};
use crate::rpc::{self, AcceptStat};
use crate::session::Call;
use crate::xdr::{XdrReader, XdrWriter};

/// The protocol label that starts every transcript.
pub const LABEL: &[u8] = b"cloudinfra node v1";
/// Shortest secret accepted, in bytes (after a trailing newline is cut).
pub const MIN_SECRET: usize = 16;
/// Longest secret file read, in bytes.
pub const MAX_SECRET: usize = 4096;

type HmacSha256 = Hmac<Sha256>;

/// The shared secret, keyed once. Its `Debug` never shows it.
#[derive(Clone)]
pub struct Secret {
    mac: HmacSha256,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret from its bytes: at least [`MIN_SECRET`] of them.
    pub fn from_bytes(bytes: &[u8]) -> Result<Secret, String> {
        if bytes.len() < MIN_SECRET {
            return Err(format!(
                "the secret is {} bytes, fewer than {MIN_SECRET}: put at least {MIN_SECRET} random bytes in it (e.g. `head -c 32 /dev/urandom | base64`)",
                bytes.len()
            ));
        }
        let mac = HmacSha256::new_from_slice(bytes).map_err(|_| "HMAC-SHA256 refused the secret".to_string())?;
        Ok(Secret { mac })
    }

    fn proof(
        &self,
        role: &[u8],
        link: &Link,
        main_nonce: &[u8; NONCE_LEN],
        node_nonce: &[u8; NONCE_LEN],
    ) -> HmacSha256 {
        let mut mac = self.mac.clone();
        for field in [LABEL, role, &addr_bytes(link.main), &addr_bytes(link.node), main_nonce, node_nonce] {
            mac.update(&(field.len() as u32).to_be_bytes());
            mac.update(field);
        }
        mac
    }
}

/// An address as both ends of a TCP connection see it: IPv4-mapped IPv6
/// as IPv4, without flow info or scope; family, address bytes, port.
fn addr_bytes(addr: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(19);
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
    out
}

/// The two ends of one node link. The main server fills it from its
/// socket's local address (`main`) and peer address (`node`); the node
/// from its socket's peer address (`main`) and local address (`node`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub main: SocketAddr,
    pub node: SocketAddr,
}

/// Read `--secret-file F`: a regular file, owned by the user running the
/// server (or root), not accessible to group or others, of at least
/// [`MIN_SECRET`] bytes once one trailing newline is cut. Errors are one
/// line that says what to do.
pub fn load_secret(path: &Path) -> Result<Secret, String> {
    let shown = path.display();
    // O_NONBLOCK: opening a FIFO must not hang; fstat then refuses it.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot open the secret file {shown}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat the secret file {shown}: {e}"))?;
    check_secret_file(path, meta.file_type().is_file(), meta.mode(), meta.uid(), nix::unistd::geteuid().as_raw())?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the secret file {shown}: {e}"))?;
    if bytes.len() > MAX_SECRET {
        return Err(format!("the secret file {shown} is over {MAX_SECRET} bytes: is it the right file?"));
    }
    Secret::from_bytes(trim_newline(&bytes)).map_err(|e| format!("{shown}: {e}"))
}

/// The secret file's metadata rules (pure, for [`load_secret`]).
pub fn check_secret_file(path: &Path, regular: bool, mode: u32, owner: u32, euid: u32) -> Result<(), String> {
    let shown = path.display();
    if !regular {
        return Err(format!("the secret file {shown} is not a regular file: give a file holding the secret"));
    }
    if owner != euid && owner != 0 {
        return Err(format!(
            "the secret file {shown} belongs to uid {owner}, who could change it: chown it to the user running the server (uid {euid})"
        ));
    }
    if mode & 0o077 != 0 {
        return Err(format!(
            "the secret file {shown} is open to group or others (mode {:03o}): chmod 600 {shown}",
            mode & 0o777
        ));
    }
    Ok(())
}

/// The file's bytes without one trailing "\n" or "\r\n".
pub fn trim_newline(bytes: &[u8]) -> &[u8] {
    match bytes.strip_suffix(b"\n") {
        Some(line) => line.strip_suffix(b"\r").unwrap_or(line),
        None => bytes,
    }
}

/// 32 fresh bytes from the kernel's CSPRNG (getrandom(2)).
pub fn random_nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut out = [0u8; NONCE_LEN];
    let mut filled = 0;
    while filled < out.len() {
        let rest = &mut out[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable
        // slice of `out`; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(out)
}

/// The binding rule: without a secret, only loopback addresses; with one,
/// any. `Err` is the one-line message to print before refusing to start.
pub fn check_bind(addr: SocketAddr, has_secret: bool) -> Result<(), String> {
    if has_secret || addr.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {addr} without a shared secret: anyone who reaches it could run code here; listen on 127.0.0.1, or give every node and the main server --secret-file F (chmod 600 F)"
    ))
}

/// What the node does with a call on a link that has a [`NodeGate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The link is authenticated: carry the call out.
    Pass,
    /// Send `reply` (a handshake answer or a refusal) instead; log `log`
    /// if any; close the link once the reply is sent if `close`.
    Answer { reply: Vec<u8>, close: bool, log: Option<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateState {
    AwaitHello,
    AwaitAuth { main_nonce: [u8; NONCE_LEN] },
    Open,
    Closed,
}

/// The node's end of one link: refuses every call until the main server
/// has proved the secret.
#[derive(Debug)]
pub struct NodeGate {
    secret: Secret,
    link: Link,
    node_nonce: [u8; NONCE_LEN],
    state: GateState,
    /// A call before auth has been logged on this link.
    logged: bool,
}

impl NodeGate {
    /// A gate for a new link; `node_nonce` from [`random_nonce`], used for
    /// this link's one handshake.
    pub fn new(secret: Secret, link: Link, node_nonce: [u8; NONCE_LEN]) -> Self {
        NodeGate { secret, link, node_nonce, state: GateState::AwaitHello, logged: false }
    }

    /// True once the main server has proved the secret.
    pub fn is_open(&self) -> bool {
        self.state == GateState::Open
    }

    /// The main server's address on this link, as the node sees it.
    pub fn peer(&self) -> SocketAddr {
        self.link.main
    }

    /// The line to log if the link ends now, halfway through the handshake:
    /// a main server that leaves after this node's proof did not accept it.
    pub fn ended_note(&self) -> Option<String> {
        matches!(self.state, GateState::AwaitAuth { .. }).then(|| {
            format!(
                "node link from {}: closed after NODE_HELLO without NODE_AUTH: the main server did not accept this node's proof (a different --secret-file, or an address-translated link)",
                self.link.main
            )
        })
    }

    /// Decide what to do with an admitted call.
    pub fn on_call(&mut self, call: &Call) -> Verdict {
        let peer = self.link.main;
        match (self.state, call.proc_num) {
            (GateState::Open, proto::NODE_HELLO | proto::NODE_AUTH) => {
                // Meaningless but harmless: the link is authenticated already.
                let mut w = rpc::accepted(call.xid, AcceptStat::Success);
                if call.proc_num == proto::NODE_HELLO {
                    HelloRes::Err(CloudStat::Denied, "this link is authenticated already".into()).encode(&mut w);
                } else {
                    w.u32(CloudStat::Ok as u32);
                }
                answer(w.into_bytes(), false, None)
            }
            (GateState::Open, _) => Verdict::Pass,
            (GateState::AwaitHello, proto::NODE_HELLO) => {
                let mut r = XdrReader::new(&call.args);
                let Ok(args) = HelloArgs::decode(&mut r).and_then(|a| r.finish().map(|()| a)) else {
                    self.state = GateState::Closed;
                    let log = format!("node link from {peer}: malformed NODE_HELLO; closing");
                    return answer(garbage(call.xid), true, Some(log));
                };
                let proof = self.secret.proof(b"node", &self.link, &args.main_nonce, &self.node_nonce);
                let mut node_proof = [0u8; PROOF_LEN];
                node_proof.copy_from_slice(&proof.finalize().into_bytes());
                self.state = GateState::AwaitAuth { main_nonce: args.main_nonce };
                let mut w = rpc::accepted(call.xid, AcceptStat::Success);
                HelloRes::Ok { node_nonce: self.node_nonce, node_proof }.encode(&mut w);
                answer(w.into_bytes(), false, None)
            }
            (GateState::AwaitAuth { main_nonce }, proto::NODE_AUTH) => {
                self.state = GateState::Closed;
                let mut r = XdrReader::new(&call.args);
                let Ok(args) = AuthArgs::decode(&mut r).and_then(|a| r.finish().map(|()| a)) else {
                    let log = format!("node link from {peer}: malformed NODE_AUTH; closing");
                    return answer(garbage(call.xid), true, Some(log));
                };
                let mut w = rpc::accepted(call.xid, AcceptStat::Success);
                let mac = self.secret.proof(b"main", &self.link, &main_nonce, &self.node_nonce);
                if mac.verify_slice(&args.main_proof).is_ok() {
                    self.state = GateState::Open;
                    w.u32(CloudStat::Ok as u32);
                    return answer(w.into_bytes(), false, None);
                }
                w.u32(CloudStat::Denied as u32);
                let log = format!(
                    "node link from {peer}: the main server's proof is wrong (a different --secret-file, or an address-translated link); refused, closing"
                );
                answer(w.into_bytes(), true, Some(log))
            }
            (GateState::AwaitAuth { .. }, proto::NODE_HELLO) | (GateState::Closed, _) => {
                // One handshake per link: its node nonce is spent.
                self.state = GateState::Closed;
                let log = format!("node link from {peer}: a second NODE_HELLO on one link; closing");
                answer(rpc::auth_error(call.xid, rpc::AUTH_TOOWEAK), true, self.log_once(log))
            }
            (GateState::AwaitHello | GateState::AwaitAuth { .. }, proc_num) => {
                let log = format!(
                    "node link from {peer}: call to procedure {proc_num} before authentication; refused with AUTH_TOOWEAK (is the main server started with --secret-file?)"
                );
                answer(rpc::auth_error(call.xid, rpc::AUTH_TOOWEAK), false, self.log_once(log))
            }
        }
    }

    fn log_once(&mut self, line: String) -> Option<String> {
        (!std::mem::replace(&mut self.logged, true)).then_some(line)
    }
}

fn answer(reply: Vec<u8>, close: bool, log: Option<String>) -> Verdict {
    Verdict::Answer { reply, close, log }
}

fn garbage(xid: u32) -> Vec<u8> {
    rpc::accepted(xid, AcceptStat::GarbageArgs).into_bytes()
}

/// The whole reply of a node without a secret to NODE_HELLO.
pub fn hello_refused_without_secret(xid: u32) -> Vec<u8> {
    let mut w = rpc::accepted(xid, AcceptStat::Success);
    HelloRes::Err(CloudStat::Denied, "this node has no --secret-file: give it the main server's".into()).encode(&mut w);
    w.into_bytes()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MainState {
    HelloSent,
    AuthSent,
    Done,
    Failed,
}

/// The main server's end of one link: proves the secret to a node and
/// checks that the node knows it too.
#[derive(Debug)]
pub struct MainHandshake {
    secret: Secret,
    link: Link,
    main_nonce: [u8; NONCE_LEN],
    state: MainState,
}

impl MainHandshake {
    /// Start a handshake on a new link; `main_nonce` from [`random_nonce`].
    /// Send NODE_HELLO with [`Self::hello_args`].
    pub fn new(secret: Secret, link: Link, main_nonce: [u8; NONCE_LEN]) -> Self {
        MainHandshake { secret, link, main_nonce, state: MainState::HelloSent }
    }

    /// The arguments of NODE_HELLO.
    pub fn hello_args(&self) -> Vec<u8> {
        let mut w = XdrWriter::new();
        HelloArgs { main_nonce: self.main_nonce }.encode(&mut w);
        w.into_bytes()
    }

    /// True once both sides have proved the secret.
    pub fn is_done(&self) -> bool {
        self.state == MainState::Done
    }

    /// The results of NODE_HELLO's reply: `Ok` holds the arguments of the
    /// NODE_AUTH to send; `Err` says why the node is not used.
    pub fn on_hello_results(&mut self, results: &[u8]) -> Result<Vec<u8>, String> {
        let node = self.link.node;
        if self.state != MainState::HelloSent {
            self.state = MainState::Failed;
            return Err(format!("node {node}: a NODE_HELLO reply out of turn; closing the link"));
        }
        self.state = MainState::Failed;
        let mut r = XdrReader::new(results);
        let res = HelloRes::decode(&mut r)
            .and_then(|res| r.finish().map(|()| res))
            .map_err(|e| format!("node {node}: a malformed NODE_HELLO reply ({e}); closing the link"))?;
        let (node_nonce, node_proof) = match res {
            HelloRes::Ok { node_nonce, node_proof } => (node_nonce, node_proof),
            HelloRes::Err(stat, message) => {
                return Err(format!("node {node} refused the handshake ({stat:?}): {message}"));
            }
        };
        let mac = self.secret.proof(b"node", &self.link, &self.main_nonce, &node_nonce);
        if mac.verify_slice(&node_proof).is_err() {
            return Err(format!(
                "node {node} did not prove the shared secret (a different --secret-file, an address-translated link, or not our node); not using it"
            ));
        }
        let mut main_proof = [0u8; PROOF_LEN];
        main_proof.copy_from_slice(
            &self.secret.proof(b"main", &self.link, &self.main_nonce, &node_nonce).finalize().into_bytes(),
        );
        self.state = MainState::AuthSent;
        let mut w = XdrWriter::new();
        AuthArgs { main_proof }.encode(&mut w);
        Ok(w.into_bytes())
    }

    /// The results of NODE_AUTH's reply (a `cloud_stat`). `Ok(())`: the
    /// link is authenticated both ways and the node may be scheduled.
    pub fn on_auth_results(&mut self, results: &[u8]) -> Result<(), String> {
        let node = self.link.node;
        if self.state != MainState::AuthSent {
            self.state = MainState::Failed;
            return Err(format!("node {node}: a NODE_AUTH reply out of turn; closing the link"));
        }
        self.state = MainState::Failed;
        let mut r = XdrReader::new(results);
        let stat = r
            .u32()
            .map_err(|e| e.to_string())
            .and_then(|v| CloudStat::from_u32(v).map_err(|e| e.to_string()))
            .and_then(|s| r.finish().map(|()| s).map_err(|e| e.to_string()))
            .map_err(|e| format!("node {node}: a malformed NODE_AUTH reply ({e}); closing the link"))?;
        if stat != CloudStat::Ok {
            return Err(format!(
                "node {node} refused our proof ({stat:?}): is it started with the same --secret-file as the main server?"
            ));
        }
        self.state = MainState::Done;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{decode_reply, ReplyOutcome};

    const SECRET: &[u8] = b"0123456789abcdef-shared";

    fn secret(bytes: &[u8]) -> Secret {
        Secret::from_bytes(bytes).unwrap()
    }

    fn link() -> Link {
        Link { main: "10.0.0.1:40000".parse().unwrap(), node: "10.0.0.5:9001".parse().unwrap() }
    }

    fn call(xid: u32, proc_num: u32, args: Vec<u8>) -> Call {
        Call { xid, proc_num, sys_uid: None, args }
    }

    /// The results of a success reply; panics on anything else.
    fn results(reply: &[u8]) -> Vec<u8> {
        match decode_reply(reply).unwrap() {
            (_, ReplyOutcome::Success { results_at }) => reply[results_at..].to_vec(),
            other => panic!("not a success: {other:?}"),
        }
    }

    fn reply_of(v: Verdict) -> (Vec<u8>, bool, Option<String>) {
        match v {
            Verdict::Answer { reply, close, log } => (reply, close, log),
            Verdict::Pass => panic!("passed"),
        }
    }

    fn is_too_weak(reply: &[u8]) -> bool {
        matches!(decode_reply(reply), Ok((_, ReplyOutcome::Denied(_))))
            && reply[12..16] == [0, 0, 0, 1]
            && reply[16..20] == [0, 0, 0, 5]
    }

    /// Run a whole handshake; the node's verdict on a NODE_RUN after it.
    fn handshake(
        main_secret: &[u8],
        node_secret: &[u8],
        main_link: Link,
        node_link: Link,
    ) -> (Result<(), String>, NodeGate) {
        let mut main = MainHandshake::new(secret(main_secret), main_link, [1; NONCE_LEN]);
        let mut gate = NodeGate::new(secret(node_secret), node_link, [2; NONCE_LEN]);
        let (reply, close, _) = reply_of(gate.on_call(&call(1, proto::NODE_HELLO, main.hello_args())));
        assert!(!close);
        let auth_args = match main.on_hello_results(&results(&reply)) {
            Ok(a) => a,
            Err(e) => return (Err(e), gate),
        };
        let (reply, close, log) = reply_of(gate.on_call(&call(2, proto::NODE_AUTH, auth_args)));
        let out = main.on_auth_results(&results(&reply));
        assert_eq!(close, out.is_err());
        assert_eq!(log.is_some(), out.is_err());
        assert_eq!(main.is_done(), out.is_ok());
        (out, gate)
    }

    #[test]
    fn same_secret_opens_the_link_and_calls_pass() {
        let (out, mut gate) = handshake(SECRET, SECRET, link(), link());
        out.unwrap();
        assert!(gate.is_open());
        for p in [proto::NODE_NULL, proto::NODE_RUN, proto::NODE_FETCH, proto::NODE_DROP] {
            assert_eq!(gate.on_call(&call(9, p, vec![0, 0, 0, 1])), Verdict::Pass);
        }
    }

    #[test]
    fn a_node_with_another_secret_is_not_used() {
        let (out, gate) = handshake(SECRET, b"another secret, 16+ bytes", link(), link());
        let e = out.unwrap_err();
        assert!(e.contains("did not prove the shared secret"), "{e}");
        assert!(!gate.is_open());
    }

    #[test]
    fn a_main_server_with_another_secret_is_refused_by_the_node() {
        // Play a main server that does not check the node's proof (an
        // attacker): its own proof must still fail.
        let mut gate = NodeGate::new(secret(SECRET), link(), [2; NONCE_LEN]);
        let mut evil = MainHandshake::new(secret(b"not the right secret!"), link(), [1; NONCE_LEN]);
        let (reply, _, _) = reply_of(gate.on_call(&call(1, proto::NODE_HELLO, evil.hello_args())));
        let res = results(&reply);
        let HelloRes::Ok { node_nonce, .. } = HelloRes::decode(&mut XdrReader::new(&res)).unwrap() else { panic!() };
        let mut proof = [0u8; PROOF_LEN];
        proof.copy_from_slice(
            &evil.secret.proof(b"main", &link(), &[1; NONCE_LEN], &node_nonce).finalize().into_bytes(),
        );
        let mut w = XdrWriter::new();
        AuthArgs { main_proof: proof }.encode(&mut w);
        let (reply, close, log) = reply_of(gate.on_call(&call(2, proto::NODE_AUTH, w.into_bytes())));
        assert_eq!(results(&reply), (CloudStat::Denied as u32).to_be_bytes());
        assert!(close);
        assert!(log.unwrap().contains("10.0.0.1:40000"), "the log names the peer");
        assert!(!gate.is_open());
        assert_ne!(gate.on_call(&call(3, proto::NODE_RUN, vec![])), Verdict::Pass);
        // And the honest main server would have refused this node's reply too.
        assert!(evil.on_hello_results(&res).is_err());
    }

    #[test]
    fn calls_before_auth_are_refused_too_weak_and_logged_once() {
        let mut gate = NodeGate::new(secret(SECRET), link(), [2; NONCE_LEN]);
        let mut logs = 0;
        for (xid, p) in [
            (1, proto::NODE_RUN),
            (2, proto::NODE_NULL),
            (3, proto::NODE_FETCH),
            (4, proto::NODE_DROP),
            (5, proto::NODE_AUTH),
        ] {
            let (reply, close, log) = reply_of(gate.on_call(&call(xid, p, vec![0; 32])));
            assert!(is_too_weak(&reply), "proc {p}");
            assert_eq!(u32::from_be_bytes(reply[..4].try_into().unwrap()), xid);
            assert!(!close);
            if let Some(line) = log {
                assert!(line.contains("10.0.0.1:40000") && line.contains("before authentication"), "{line}");
                logs += 1;
            }
        }
        assert_eq!(logs, 1);
        // Between HELLO and AUTH, too.
        let main = MainHandshake::new(secret(SECRET), link(), [1; NONCE_LEN]);
        reply_of(gate.on_call(&call(6, proto::NODE_HELLO, main.hello_args())));
        let (reply, _, log) = reply_of(gate.on_call(&call(7, proto::NODE_RUN, vec![])));
        assert!(is_too_weak(&reply) && log.is_none());
        assert!(!gate.is_open());
    }

    #[test]
    fn a_recorded_transcript_does_not_open_another_link() {
        // Record a good exchange between the real main server and a node.
        let mut main = MainHandshake::new(secret(SECRET), link(), [1; NONCE_LEN]);
        let mut gate = NodeGate::new(secret(SECRET), link(), [2; NONCE_LEN]);
        let hello = main.hello_args();
        let (hello_reply, _, _) = reply_of(gate.on_call(&call(1, proto::NODE_HELLO, hello.clone())));
        let auth = main.on_hello_results(&results(&hello_reply)).unwrap();

        // Replayed to the node on a new link (a fresh node nonce), even
        // from the same addresses: refused.
        let mut gate2 = NodeGate::new(secret(SECRET), link(), [3; NONCE_LEN]);
        reply_of(gate2.on_call(&call(1, proto::NODE_HELLO, hello)));
        let (reply, close, _) = reply_of(gate2.on_call(&call(2, proto::NODE_AUTH, auth)));
        assert_eq!(results(&reply), (CloudStat::Denied as u32).to_be_bytes());
        assert!(close && !gate2.is_open());

        // The node's recorded answer replayed to a main server with a
        // fresh nonce: refused.
        let mut main2 = MainHandshake::new(secret(SECRET), link(), [4; NONCE_LEN]);
        assert!(main2.on_hello_results(&results(&hello_reply)).is_err());
    }

    #[test]
    fn a_relayed_handshake_fails_on_the_endpoints() {
        // The main server believes it talks to 10.0.0.6:9001 (someone took
        // that port) who relays to the node at 10.0.0.5:9001 from its own
        // connection: the endpoints differ at each end.
        let main_sees = Link { main: "10.0.0.1:40000".parse().unwrap(), node: "10.0.0.6:9001".parse().unwrap() };
        let node_sees = Link { main: "10.0.0.6:50000".parse().unwrap(), node: "10.0.0.5:9001".parse().unwrap() };
        assert!(handshake(SECRET, SECRET, main_sees, node_sees).0.is_err());
        // IPv4 seen as mapped IPv6 at one end is the same link.
        let mapped =
            Link { main: "[::ffff:10.0.0.1]:40000".parse().unwrap(), node: "[::ffff:10.0.0.5]:9001".parse().unwrap() };
        handshake(SECRET, SECRET, link(), mapped).0.unwrap();
    }

    #[test]
    fn truncated_and_garbage_handshake_messages_close_the_link() {
        let good = MainHandshake::new(secret(SECRET), link(), [1; NONCE_LEN]).hello_args();
        for bad in [vec![], good[..31].to_vec(), [good.clone(), vec![0; 4]].concat()] {
            let mut gate = NodeGate::new(secret(SECRET), link(), [2; NONCE_LEN]);
            let (reply, close, log) = reply_of(gate.on_call(&call(1, proto::NODE_HELLO, bad)));
            assert_eq!(reply, garbage(1));
            assert!(close && log.is_some());
            assert!(!gate.is_open());
            assert_ne!(gate.on_call(&call(2, proto::NODE_RUN, vec![])), Verdict::Pass);
        }
        let mut gate = NodeGate::new(secret(SECRET), link(), [2; NONCE_LEN]);
        reply_of(gate.on_call(&call(1, proto::NODE_HELLO, good.clone())));
        let (reply, close, _) = reply_of(gate.on_call(&call(2, proto::NODE_AUTH, vec![0xff; 7])));
        assert_eq!(reply, garbage(2));
        assert!(close && !gate.is_open());
        // A second HELLO on one link: the nonce is spent.
        let mut gate = NodeGate::new(secret(SECRET), link(), [2; NONCE_LEN]);
        reply_of(gate.on_call(&call(1, proto::NODE_HELLO, good.clone())));
        let (reply, close, _) = reply_of(gate.on_call(&call(2, proto::NODE_HELLO, good)));
        assert!(is_too_weak(&reply) && close);

        // The main side: garbage, truncated and out-of-turn replies.
        for bad in [vec![], vec![0, 0, 0, 0, 1], vec![0, 0, 0, 99]] {
            let mut main = MainHandshake::new(secret(SECRET), link(), [1; NONCE_LEN]);
            assert!(main.on_hello_results(&bad).is_err());
            assert!(main.on_auth_results(&[0, 0, 0, 0]).is_err(), "out of turn");
            assert!(!main.is_done());
        }
        let mut main = MainHandshake::new(secret(SECRET), link(), [1; NONCE_LEN]);
        assert!(main.on_auth_results(&[0, 0, 0, 0]).is_err(), "AUTH's reply before HELLO's");
    }

    #[test]
    fn a_node_without_a_secret_says_so() {
        let reply = hello_refused_without_secret(5);
        let mut main = MainHandshake::new(secret(SECRET), link(), [1; NONCE_LEN]);
        let e = main.on_hello_results(&results(&reply)).unwrap_err();
        assert!(e.contains("no --secret-file"), "{e}");
    }

    #[test]
    fn secret_file_rules() {
        let p = Path::new("/etc/cloud.secret");
        check_secret_file(p, true, 0o100600, 0, 0).unwrap();
        check_secret_file(p, true, 0o100400, 1000, 1000).unwrap();
        check_secret_file(p, true, 0o100600, 0, 1000).unwrap(); // root's file
        let e = check_secret_file(p, true, 0o100644, 0, 0).unwrap_err();
        assert!(e.contains("chmod 600 /etc/cloud.secret") && e.contains("644"), "{e}");
        assert!(check_secret_file(p, true, 0o100640, 0, 0).unwrap_err().contains("chmod 600"));
        assert!(check_secret_file(p, true, 0o100602, 0, 0).unwrap_err().contains("chmod 600"));
        assert!(check_secret_file(p, false, 0o010600, 0, 0).unwrap_err().contains("not a regular file"));
        assert!(check_secret_file(p, true, 0o100600, 1001, 1000).unwrap_err().contains("chown"));

        assert_eq!(trim_newline(b"abc\n"), b"abc");
        assert_eq!(trim_newline(b"abc\r\n"), b"abc");
        assert_eq!(trim_newline(b"abc\n\n"), b"abc\n");
        assert_eq!(trim_newline(b"abc"), b"abc");
        assert!(Secret::from_bytes(&[b'x'; 15]).unwrap_err().contains("at least 16"));
        Secret::from_bytes(&[b'x'; 16]).unwrap();
        assert_eq!(format!("{:?}", secret(SECRET)), "Secret(..)");
    }

    #[test]
    fn loading_a_secret_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, b"0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_secret(&path).unwrap_err();
        assert!(e.contains(&format!("chmod 600 {}", path.display())), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let loaded = load_secret(&path).unwrap();
        // The newline is not part of the secret.
        let mut a = MainHandshake::new(loaded, link(), [1; NONCE_LEN]);
        let mut gate = NodeGate::new(secret(b"0123456789abcdef"), link(), [2; NONCE_LEN]);
        let (reply, _, _) = reply_of(gate.on_call(&call(1, proto::NODE_HELLO, a.hello_args())));
        a.on_hello_results(&results(&reply)).unwrap();

        std::fs::write(&path, b"short\n").unwrap();
        assert!(load_secret(&path).unwrap_err().contains("at least 16"));
        std::fs::write(&path, vec![b'x'; MAX_SECRET + 1]).unwrap();
        assert!(load_secret(&path).unwrap_err().contains("over 4096"));
        assert!(load_secret(dir.path()).unwrap_err().contains("not a regular file"));
        assert!(load_secret(&dir.path().join("missing")).unwrap_err().contains("cannot open"));
    }

    #[test]
    fn nonces_are_fresh() {
        let (a, b) = (random_nonce().unwrap(), random_nonce().unwrap());
        assert_ne!(a, b);
        assert_ne!(a, [0; NONCE_LEN]);
    }

    #[test]
    fn binding_needs_a_secret_off_loopback() {
        for ok in ["127.0.0.1:9000", "127.0.0.5:1", "[::1]:9000", "[::ffff:127.0.0.1]:9000"] {
            check_bind(ok.parse().unwrap(), false).unwrap();
        }
        for bad in ["0.0.0.0:9000", "10.0.0.5:9001", "[::]:9000"] {
            let e = check_bind(bad.parse().unwrap(), false).unwrap_err();
            assert!(e.contains(bad) && e.contains("--secret-file"), "{e}");
            check_bind(bad.parse().unwrap(), true).unwrap();
        }
    }
}

//! Who is on the other end of a loopback TCP connection, as the kernel
//! knows it (what identd answers): the uid that owns the peer's socket.
//!
//! Owns: the NETLINK_SOCK_DIAG inet_diag request for one exact 4-tuple and
//! the decoding of its answer (sans-I/O, tested with byte literals), the
//! fallback parser of /proc/net/tcp and /proc/net/tcp6, one blocking-free
//! lookup that uses them, and the rule for what a call's identity is.
//! Must not touch: connections, the reactor, tickets. The server asks once
//! per accepted client connection and keeps the answer with it, over one
//! netlink socket kept for the server's life ([`Diag`]: a request and its
//! answer per connection, no socket made and closed each time).
//!
//! Only peers on this host can be verified (loopback, or a local user who
//! connects to one of the host's own addresses: their sockets are in the
//! kernel's table too); for a socket on another host the uid is
//! unknowable here.

use std::io;
use std::net::{IpAddr, SocketAddr};

/// What the server knows about the uid behind a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerId {
    /// A peer on this host whose socket the kernel says belongs to this uid.
    Verified(u32),
    /// A loopback peer whose socket could not be found (it went away, or
    /// the lookup failed): its calls are anonymous and its claims refused.
    Unverified,
    /// A peer on another host: AUTH_SYS is taken as claimed (NFS sec=sys),
    /// except a claim of root, which is refused.
    Remote,
}

/// Who a call is from: `Ok(Some(uid))`, `Ok(None)` (anonymous), or
/// `Err(auth_stat)` when its AUTH_SYS claim must be refused.
pub fn caller_uid(peer: PeerId, claimed: Option<u32>) -> Result<Option<u32>, u32> {
    match (peer, claimed) {
        (PeerId::Verified(v), Some(c)) if c != v => Err(crate::rpc::AUTH_BADCRED),
        (PeerId::Verified(v), _) => Ok(Some(v)),
        (PeerId::Unverified, Some(_)) => Err(crate::rpc::AUTH_REJECTEDCRED),
        (PeerId::Unverified, None) => Ok(None),
        // Root is not taken on trust from another host (NFS's root_squash):
        // it could retrieve and close every ticket, local users' included.
        (PeerId::Remote, Some(0)) => Err(crate::rpc::AUTH_TOOWEAK),
        (PeerId::Remote, c) => Ok(c),
    }
}

/// True for 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// Identify the peer of a connection accepted on `local` from `peer`.
///
/// A peer that is not on loopback may still be on this host: a local user
/// who connects to one of the host's own addresses (when the server
/// listens on more than loopback). Its socket is then in the kernel's
/// table like a loopback one, so every peer is looked up, and only one
/// whose socket is not here is `Remote`.
pub fn identify(peer: SocketAddr, local: SocketAddr) -> PeerId {
    Diag::default().identify(peer, local)
}

/// A NETLINK_SOCK_DIAG socket kept open across lookups (made at start, or
/// at the first lookup if that failed), with the sequence number of its
/// last request. The kernel answers each request before `sendto` returns; an
/// answer to an earlier request still queued (one whose `recv` failed) is
/// read and dropped by its sequence number, never taken for this one's.
#[derive(Debug, Default)]
pub struct Diag {
    sock: Option<std::os::fd::OwnedFd>,
    seq: u32,
}

/// Answers read and dropped before a lookup gives up on its own.
const STALE_ANSWERS: usize = 8;

impl Diag {
    /// With its socket made now (a server opens it at start, so that its
    /// descriptor count does not change when the first client comes);
    /// a failure is tried again at the first lookup.
    pub fn open() -> Diag {
        let mut diag = Diag::default();
        if let Err(e) = diag.socket() {
            log::debug!("{e}; trying again at the first connection");
        }
        diag
    }

    /// The socket, made if there is none.
    fn socket(&mut self) -> Result<std::os::fd::RawFd, String> {
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockProtocol, SockType};
        use std::os::fd::AsRawFd;
        if let Some(fd) = &self.sock {
            return Ok(fd.as_raw_fd());
        }
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkSockDiag,
        )
        .map_err(|e| format!("netlink socket: {e}"))?;
        Ok(self.sock.insert(fd).as_raw_fd())
    }

    /// As [`identify`], over this socket.
    pub fn identify(&mut self, peer: SocketAddr, local: SocketAddr) -> PeerId {
        let (peer, local) = (canonical(peer), canonical(local));
        // On an error the socket is kept: an answer that comes late is
        // skipped by its sequence number.
        let netlink = self.owner(peer, local);
        judge(peer, local, netlink)
    }

    /// Ask the kernel who owns the socket `peer` connected to our `local`.
    /// Does not block: the kernel answers before `sendto` returns.
    fn owner(&mut self, peer: SocketAddr, local: SocketAddr) -> Result<Option<u32>, String> {
        use nix::sys::socket::{recvfrom, sendto, MsgFlags, NetlinkAddr};
        let fd = self.socket()?;
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let req = encode_request(seq, peer, local);
        sendto(fd, &req, &NetlinkAddr::new(0, 0), MsgFlags::empty()).map_err(|e| format!("sendto: {e}"))?;
        let mut buf = [0u8; 512];
        for _ in 0..STALE_ANSWERS {
            let (n, from) = recvfrom::<NetlinkAddr>(fd, &mut buf).map_err(|e| format!("recv: {e}"))?;
            if from.is_some_and(|a| a.pid() != 0) || answer_seq(&buf[..n]).is_some_and(|s| s != seq) {
                continue; // not the kernel's (only a privileged sender could), or an earlier request's answer
            }
            return decode_response(&buf[..n], seq, peer, local);
        }
        Err(format!("no answer to netlink request {seq} among {STALE_ANSWERS} queued"))
    }
}

/// The sequence number of a netlink answer, if it has a header.
fn answer_seq(buf: &[u8]) -> Option<u32> {
    buf.get(8..12).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// The identity from netlink's answer, or the /proc fallback's when
/// netlink itself failed.
fn judge(peer: SocketAddr, local: SocketAddr, netlink: Result<Option<u32>, String>) -> PeerId {
    let found = match &netlink {
        Ok(found) => *found,
        // Only when netlink itself fails: reading /proc/net/tcp costs time
        // in proportion to the host's sockets.
        Err(_) => proc_owner(peer, local),
    };
    match found {
        Some(uid) => PeerId::Verified(uid),
        None if !is_loopback(peer.ip()) => PeerId::Remote,
        None => {
            log::warn!("cannot tell who owns the socket {peer} (netlink: {netlink:?}); its calls are anonymous");
            PeerId::Unverified
        }
    }
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// Offsets of `id`, `idiag_uid` and `idiag_inode` in `struct inet_diag_msg`.
const MSG_ID_AT: usize = 4;
const MSG_UID_AT: usize = 64;
const MSG_INODE_AT: usize = 68;
const MSG_LEN: usize = 72;

/// The `inet_diag_sockid` of the socket bound to `src` and connected to `dst`.
fn sockid(src: SocketAddr, dst: SocketAddr) -> [u8; 48] {
    let mut id = [0u8; 48];
    id[0..2].copy_from_slice(&src.port().to_be_bytes());
    id[2..4].copy_from_slice(&dst.port().to_be_bytes());
    let put = |at: &mut [u8], ip: IpAddr| match ip {
        IpAddr::V4(a) => at[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => at[..16].copy_from_slice(&a.octets()),
    };
    put(&mut id[4..20], src.ip());
    put(&mut id[20..36], dst.ip());
    // idiag_if 0 (any); idiag_cookie INET_DIAG_NOCOOKIE (~0, ~0).
    id[40..48].fill(0xff);
    id
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, |v4| SocketAddr::new(v4.into(), a.port())),
        IpAddr::V4(_) => a,
    }
}

/// The (source, destination) of an `inet_diag_sockid` of this family.
fn id_addrs(family: u8, id: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let port = |at: usize| u16::from_be_bytes([id[at], id[at + 1]]);
    let ip = |at: usize| -> Option<IpAddr> {
        match i32::from(family) {
            libc::AF_INET => Some(std::net::Ipv4Addr::new(id[at], id[at + 1], id[at + 2], id[at + 3]).into()),
            libc::AF_INET6 => {
                let b: [u8; 16] = id[at..at + 16].try_into().ok()?;
                Some(std::net::Ipv6Addr::from(b).into())
            }
            _ => None,
        }
    };
    let src = canonical(SocketAddr::new(ip(4)?, port(0)));
    let dst = canonical(SocketAddr::new(ip(20)?, port(2)));
    Some((src, dst))
}

/// A SOCK_DIAG_BY_FAMILY request for the one TCP socket bound to `src` and
/// connected to `dst` (no dump: the kernel looks up the exact socket).
pub fn encode_request(seq: u32, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
    m.extend_from_slice(&((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // to the kernel
    let family = if src.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    m.push(family as u8);
    m.push(libc::IPPROTO_TCP as u8);
    m.push(0); // idiag_ext: no extensions
    m.push(0);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states: any
    m.extend_from_slice(&sockid(src, dst));
    m
}

/// The owner's uid from the kernel's answer to `encode_request(seq, src,
/// dst)`: `Ok(None)` when the kernel has no such socket open in a process.
///
/// Two answers must not be believed. The kernel falls back to a *listening*
/// socket on `src`'s port when no connection matches (so the answer's
/// addresses must be exactly the ones asked for); and a socket its process
/// has already closed is answered as a time-wait socket with uid 0 and no
/// inode (so a socket without an inode names nobody). Otherwise a client
/// that sends a call and closes at once would pass for root.
pub fn decode_response(buf: &[u8], seq: u32, src: SocketAddr, dst: SocketAddr) -> Result<Option<u32>, String> {
    let word = |at: usize| buf.get(at..at + 4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let half = |at: usize| buf.get(at..at + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let (Some(len), Some(kind), Some(rseq)) = (word(0), half(4), word(8)) else {
        return Err(format!("netlink answer of {} bytes is too short", buf.len()));
    };
    if (len as usize) < NLMSG_HDR || len as usize > buf.len() {
        return Err(format!("netlink message length {len} does not fit the {} bytes read", buf.len()));
    }
    if rseq != seq {
        return Err(format!("netlink answer to request {rseq}, expected {seq}"));
    }
    match kind {
        NLMSG_ERROR => {
            let errno = word(NLMSG_HDR).map(|e| e as i32).ok_or("short netlink error")?;
            if errno == -libc::ENOENT {
                Ok(None)
            } else {
                Err(format!("sock_diag: {}", io::Error::from_raw_os_error(-errno)))
            }
        }
        SOCK_DIAG_BY_FAMILY if len as usize >= NLMSG_HDR + MSG_LEN => {
            let family = buf[NLMSG_HDR];
            let id = &buf[NLMSG_HDR + MSG_ID_AT..NLMSG_HDR + MSG_ID_AT + 36];
            let inode = word(NLMSG_HDR + MSG_INODE_AT).unwrap_or(0);
            if id_addrs(family, id) != Some((canonical(src), canonical(dst))) || inode == 0 {
                return Ok(None);
            }
            Ok(word(NLMSG_HDR + MSG_UID_AT))
        }
        other => Err(format!("unexpected netlink message type {other} of {len} bytes")),
    }
}

/// The fallback: find the socket in /proc/net/tcp or /proc/net/tcp6.
fn proc_owner(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .find_map(|text| parse_proc_net_tcp(&text, peer, local))
}

/// In the text of /proc/net/tcp(6), the uid of the socket whose local
/// address is `src` and remote address `dst`, if a process holds it open
/// (inode not 0: closed and time-wait sockets show uid 0).
pub fn parse_proc_net_tcp(text: &str, src: SocketAddr, dst: SocketAddr) -> Option<u32> {
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (l, r, uid, inode) = (f.get(1)?, f.get(2)?, f.get(7)?, f.get(9)?);
        let open = *inode != "0";
        (proc_addr(l)? == src && proc_addr(r)? == dst && open).then(|| uid.parse().ok())?
    })
}

/// "0100007F:1F90" (IPv4) or 32 hex digits ":" port (IPv6): each 32-bit
/// word of the address is printed in host byte order.
fn proc_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<[u8; 4]> = (0..addr.len() / 8)
        .map(|i| addr.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()).map(u32::to_ne_bytes))
        .collect::<Option<_>>()?;
    let ip: IpAddr = match words.len() {
        1 => std::net::Ipv4Addr::from(words[0]).into(),
        4 => {
            let mut b = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(w);
            }
            let v6 = std::net::Ipv6Addr::from(b);
            // A dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d.
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn request_names_the_exact_socket() {
        let req = encode_request(7, a("127.0.0.1:40000"), a("127.0.0.2:9000"));
        let mut want = Vec::new();
        want.extend_from_slice(&72u32.to_ne_bytes());
        want.extend_from_slice(&20u16.to_ne_bytes()); // SOCK_DIAG_BY_FAMILY
        want.extend_from_slice(&1u16.to_ne_bytes()); // NLM_F_REQUEST, no dump
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[2, 6, 0, 0]); // AF_INET, IPPROTO_TCP
        want.extend_from_slice(&[0xff; 4]); // every state
        want.extend_from_slice(&[0x9c, 0x40, 0x23, 0x28]); // ports 40000, 9000, big-endian
        want.extend_from_slice(&[127, 0, 0, 1]);
        want.extend_from_slice(&[0; 12]);
        want.extend_from_slice(&[127, 0, 0, 2]);
        want.extend_from_slice(&[0; 12]);
        want.extend_from_slice(&[0; 4]); // any interface
        want.extend_from_slice(&[0xff; 8]); // no cookie
        assert_eq!(req, want);
        let v6 = encode_request(1, a("[::1]:5"), a("[::1]:6"));
        assert_eq!(v6[16], 10, "AF_INET6");
        assert_eq!(&v6[28..44], &std::net::Ipv6Addr::LOCALHOST.octets());
    }

    const CLIENT: &str = "127.0.0.1:40000";
    const SERVER: &str = "127.0.0.1:9000";

    /// The kernel's answer: a socket `src` -> `dst` in `state`, owned by
    /// `uid`, with `inode`.
    fn answer(seq: u32, src: &str, dst: &str, state: u8, uid: u32, inode: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&88u32.to_ne_bytes());
        m.extend_from_slice(&20u16.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&4242u32.to_ne_bytes());
        m.extend_from_slice(&[2, state, 0, 0]); // AF_INET
        let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        m.extend_from_slice(&src.port().to_be_bytes());
        m.extend_from_slice(&dst.port().to_be_bytes());
        m.extend_from_slice(&[127, 0, 0, 1]);
        m.extend_from_slice(&[0; 12]);
        m.extend_from_slice(&if dst.port() == 0 { [0; 4] } else { [127, 0, 0, 1] });
        m.extend_from_slice(&[0; 12]);
        m.extend_from_slice(&[1, 0, 0, 0]); // interface
        m.extend_from_slice(&[0x11; 8]); // cookie
        m.extend_from_slice(&[0; 12]); // expires, rqueue, wqueue
        m.extend_from_slice(&uid.to_ne_bytes());
        m.extend_from_slice(&inode.to_ne_bytes());
        m
    }

    fn decode(buf: &[u8], seq: u32) -> Result<Option<u32>, String> {
        decode_response(buf, seq, a(CLIENT), a(SERVER))
    }

    #[test]
    fn answer_gives_the_owner_uid() {
        assert_eq!(decode(&answer(3, CLIENT, SERVER, 1, 1000, 99), 3), Ok(Some(1000)));
        assert!(decode(&answer(3, CLIENT, SERVER, 1, 1000, 99), 4).is_err(), "another request's answer");
        assert!(decode(&answer(3, CLIENT, SERVER, 1, 1000, 99)[..60], 3).is_err(), "cut short");
    }

    #[test]
    fn closed_sockets_and_listeners_name_nobody() {
        // The client closed at once: a time-wait (here FIN_WAIT2) socket, uid 0, no inode.
        assert_eq!(decode(&answer(3, CLIENT, SERVER, 5, 0, 0), 3), Ok(None));
        // No connection matched; the kernel fell back to a listener on the client's port.
        assert_eq!(decode(&answer(3, CLIENT, "0.0.0.0:0", 10, 0, 77), 3), Ok(None));
        // A dual-stack client socket: AF_INET6 with IPv4-mapped addresses.
        let mut v6 = answer(3, CLIENT, SERVER, 1, 1000, 99);
        v6[16] = libc::AF_INET6 as u8;
        for at in [24, 40] {
            v6[at..at + 16].copy_from_slice(&std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets());
        }
        assert_eq!(decode(&v6, 3), Ok(Some(1000)));
    }

    #[test]
    fn no_such_socket_and_errors() {
        let err = |errno: i32| {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_ne_bytes());
            m.extend_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&5u32.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&(-errno).to_ne_bytes());
            m.extend_from_slice(&[0; 16]); // the request's header
            m
        };
        assert_eq!(decode(&err(libc::ENOENT), 5), Ok(None));
        assert!(decode(&err(libc::EPERM), 5).is_err());
    }

    #[test]
    fn proc_net_tcp_fallback() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:2328 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:9C40 0100007F:2328 01 00000000:00000000 00:00000000 00000000  1000        0 2 1 0 20 4 30 10 -1\n";
        let (client, server) = (a("127.0.0.1:40000"), a("127.0.0.1:9000"));
        if cfg!(target_endian = "little") {
            assert_eq!(parse_proc_net_tcp(text, client, server), Some(1000));
            assert_eq!(parse_proc_net_tcp(text, server, client), None);
        }
        let text6 = "  sl  local_address                         remote_address                        st\n\
   0: 0000000000000000FFFF00000100007F:9C40 0000000000000000FFFF00000100007F:2328 01 0:0 0:0 0 65534 0 3\n\
   1: 00000000000000000000000001000000:1388 00000000000000000000000001000000:1389 01 0:0 0:0 0 33 0 4\n";
        if cfg!(target_endian = "little") {
            assert_eq!(parse_proc_net_tcp(text6, client, server), Some(65534));
            assert_eq!(parse_proc_net_tcp(text6, a("[::1]:5000"), a("[::1]:5001")), Some(33));
        }
    }

    #[test]
    fn identity_of_a_call() {
        use crate::rpc::{AUTH_BADCRED, AUTH_REJECTEDCRED};
        assert_eq!(caller_uid(PeerId::Verified(1000), None), Ok(Some(1000)));
        assert_eq!(caller_uid(PeerId::Verified(1000), Some(1000)), Ok(Some(1000)));
        assert_eq!(caller_uid(PeerId::Verified(1000), Some(0)), Err(AUTH_BADCRED));
        assert_eq!(caller_uid(PeerId::Unverified, None), Ok(None));
        assert_eq!(caller_uid(PeerId::Unverified, Some(5)), Err(AUTH_REJECTEDCRED));
        assert_eq!(caller_uid(PeerId::Remote, Some(5)), Ok(Some(5)));
        assert_eq!(caller_uid(PeerId::Remote, Some(0)), Err(crate::rpc::AUTH_TOOWEAK), "remote root is squashed");
        assert_eq!(caller_uid(PeerId::Remote, None), Ok(None));
        assert!(is_loopback("127.3.4.5".parse().unwrap()));
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn the_kernel_knows_our_own_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let me = nix::unistd::Uid::effective().as_raw();
        let mut diag = Diag::default();
        assert_eq!(diag.owner(peer, s.local_addr().unwrap()), Ok(Some(me)));
        let listening = l.local_addr().unwrap();
        assert_eq!(diag.owner(listening, a("127.0.0.1:1")), Ok(None), "the listener names nobody");
        assert_eq!(identify(peer, s.local_addr().unwrap()), PeerId::Verified(me));
        assert_eq!(proc_owner(peer, s.local_addr().unwrap()), Some(me));
        drop(c);
        // Dual stack: a listener on [::] and an AF_INET6 client socket to
        // ::ffff:127.0.0.1 (skipped where the host has no IPv6).
        if let Ok(l6) = std::net::TcpListener::bind("[::]:0") {
            let to = SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), l6.local_addr().unwrap().port());
            let c6 = std::net::TcpStream::connect(to).unwrap();
            let (s6, peer6) = l6.accept().unwrap();
            assert_eq!(identify(peer6, s6.local_addr().unwrap()), PeerId::Verified(me), "{peer6}");
            drop(c6);
        }
    }

    #[test]
    fn one_netlink_socket_serves_every_lookup_and_skips_a_stale_answer() {
        use std::os::fd::AsRawFd;
        let me = nix::unistd::Uid::effective().as_raw();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = l.local_addr().unwrap();
        let mut diag = Diag::default();
        let mut fd = None;
        for i in 0..4 {
            let c = std::net::TcpStream::connect(local).unwrap();
            let (_s, peer) = l.accept().unwrap();
            if i == 2 {
                // A request whose answer nobody read: left queued, it must
                // not be taken for the next lookup's (it names the listener,
                // i.e. nobody).
                let sock = diag.sock.as_ref().expect("kept open").as_raw_fd();
                let req = encode_request(diag.seq.wrapping_add(7), local, a("127.0.0.1:1"));
                nix::sys::socket::sendto(
                    sock,
                    &req,
                    &nix::sys::socket::NetlinkAddr::new(0, 0),
                    nix::sys::socket::MsgFlags::empty(),
                )
                .unwrap();
            }
            // Netlink's own answer (not the /proc fallback's).
            assert_eq!(diag.owner(peer, local), Ok(Some(me)), "lookup {i}");
            assert_eq!(diag.identify(peer, local), PeerId::Verified(me), "lookup {i}");
            let now = diag.sock.as_ref().map(|s| s.as_raw_fd());
            assert!(now.is_some() && (fd.is_none() || fd == now), "the same socket every time");
            fd = now;
            drop(c);
        }
    }
}

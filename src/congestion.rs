//! Which TCP congestion control our connections use (`--tcp-congestion`).
//!
//! Owns: the rule, decided once at start ([`choose`]), and setting it on a
//! socket: the server's listeners (their connections inherit it), its
//! accepted and outgoing connections, and the `cloud` program's connection
//! to a server on this host ([`for_client`]).
//!
//! Why: BBR asks for paced sending, and without the `fq` qdisc the kernel
//! paces each socket itself with a high-resolution timer (tcp_bbr.c: "may
//! use more resources"). On a host whose default is BBR that halves a
//! loopback stream here (2,300 MB/s against 5,000 with CUBIC), and an
//! upload to a `cloud-server node` crosses two such hops. On loopback
//! there is no network for pacing to protect, so `auto` (the default)
//! gives connections whose peer is on loopback CUBIC, or Reno where this
//! user may not set CUBIC, when the system's default paces; it leaves
//! every other connection, and every other default, alone.
//!
//! Must not touch: anything but congestion control (keepalive, timeouts
//! and the rest stay with their owners: `reactor`, `client`).

use std::ffi::OsString;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::str::FromStr;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};

/// `--tcp-congestion`: what the server's connections use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// CUBIC (or Reno) on loopback connections where the system's default
    /// paces sockets (BBR); the system's default everywhere else.
    Auto,
    /// The system's default (`net.ipv4.tcp_congestion_control`) everywhere.
    System,
    /// This one on every connection, or the server does not start.
    Named(String),
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "system" => Ok(Self::System),
            _ if !s.is_empty() && s.len() < 16 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
                Ok(Self::Named(s.to_owned()))
            }
            _ => Err(format!("`{s}` is not a congestion control name: use auto, system, or a name such as cubic")),
        }
    }
}

/// What [`choose`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Choice {
    /// Set on every connection (`Policy::Named`).
    everywhere: Option<String>,
    /// Set on connections whose peer is on loopback (`Policy::Auto`).
    on_loopback: Option<String>,
    /// For the log, when anything changes: what replaces what, and why.
    pub line: Option<String>,
}

impl Choice {
    /// What a connection with `peer` gets (`None`: the system's default).
    pub fn for_peer(&self, peer: IpAddr) -> Option<&str> {
        match (&self.everywhere, peer.to_canonical().is_loopback()) {
            (Some(cc), _) => Some(cc),
            (None, true) => self.on_loopback.as_deref(),
            (None, false) => None,
        }
    }

    /// What a listener at `addr` gets, so that every connection it accepts
    /// inherits it: set where all of its peers get the same (named, or a
    /// listener on loopback, whose peers all are).
    pub fn for_listener(&self, addr: IpAddr) -> Option<&str> {
        match &self.everywhere {
            Some(cc) => Some(cc),
            None if addr.to_canonical().is_loopback() => self.on_loopback.as_deref(),
            None => None,
        }
    }

    /// What a connection accepted at `listener` from `peer` must still be
    /// given itself (what `for_listener` could not give it).
    pub fn after_accept(&self, listener: IpAddr, peer: IpAddr) -> Option<&str> {
        match self.for_listener(listener) {
            Some(_) => None,
            None => self.for_peer(peer),
        }
    }
}

/// The congestion controls whose pacing the kernel does per socket, with a
/// timer, unless the `fq` qdisc does it.
fn paces(name: &str) -> bool {
    name.starts_with("bbr")
}

/// `auto`'s pick on loopback: `None` keeps the system's `default`;
/// otherwise the first of CUBIC and Reno this user may set.
fn loopback_pick(default: &str, can_set: impl Fn(&str) -> bool) -> Option<&'static str> {
    if !paces(default) {
        return None;
    }
    ["cubic", "reno"].into_iter().find(|&cc| can_set(cc))
}

/// Decide at start. An explicit name this kernel or user cannot have is
/// refused in one line.
pub fn choose(policy: &Policy) -> Result<Choice, String> {
    if *policy == Policy::System {
        return Ok(Choice::default());
    }
    // A socket never connected: setsockopt says what connections could get.
    let probe = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot open a socket to choose a TCP congestion control: {e}"))?;
    let default = current(&probe).unwrap_or_default();
    let mut choice = Choice::default();
    match policy {
        Policy::Named(name) => {
            set(&probe, name).map_err(|e| refusal(name, e))?;
            if *name != default {
                choice.line = Some(format!(
                    "TCP connections use congestion control {name} instead of the system's {default} (--tcp-congestion)"
                ));
            }
            choice.everywhere = Some(name.clone());
        }
        _ => {
            if let Some(cc) = loopback_pick(&default, |cc| set(&probe, cc).is_ok()) {
                choice.line = Some(format!(
                    "TCP connections on loopback use congestion control {cc} instead of the system's {default}, \
                     which without the fq qdisc paces each socket with a timer (--tcp-congestion)"
                ));
                choice.on_loopback = Some(cc.to_owned());
            }
        }
    }
    Ok(choice)
}

/// The `cloud` program's pick for its connection to `server`: `auto`'s
/// rule (a server on loopback, a pacing default), best effort.
pub fn for_client(socket: &impl AsFd, server: IpAddr) {
    if !server.to_canonical().is_loopback() {
        return;
    }
    let default = current(socket).unwrap_or_default();
    let _ = loopback_pick(&default, |cc| set(socket, cc).is_ok());
}

fn refusal(name: &str, e: nix::Error) -> String {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}")).unwrap_or_default();
    match e {
        nix::Error::ENOENT => format!(
            "--tcp-congestion {name}: this kernel has no such congestion control (available: {}); pick one of those, auto or system",
            read("tcp_available_congestion_control").trim()
        ),
        nix::Error::EPERM => format!(
            "--tcp-congestion {name}: not allowed for this user (allowed: {}); pick one of those, auto or system, or run as root",
            read("tcp_allowed_congestion_control").trim()
        ),
        e => format!("--tcp-congestion {name}: refused by this kernel ({e}); pick another, auto or system"),
    }
}

/// The congestion control a socket uses.
pub fn current(s: &impl AsFd) -> Option<String> {
    getsockopt(s, sockopt::TcpCongestion).ok().map(|v| v.to_string_lossy().into_owned())
}

/// Set `cc` on a socket.
pub fn set(s: &impl AsFd, cc: &str) -> nix::Result<()> {
    setsockopt(s, sockopt::TcpCongestion, &OsString::from(cc))
}

/// Set what `choice` gives `peer` on a connection, best effort (a warning
/// if the kernel refuses: the connection works as it is).
pub fn apply(s: &impl AsFd, cc: Option<&str>) {
    if let Some(cc) = cc {
        if let Err(e) = set(s, cc) {
            log::warn!("cannot set TCP congestion control {cc} on a connection: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const LAN: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 1, 7));
    const ANY: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

    #[test]
    fn auto_replaces_only_a_pacing_default() {
        let all = |_: &str| true;
        assert_eq!(loopback_pick("bbr", all), Some("cubic"));
        assert_eq!(loopback_pick("bbr", |cc: &str| cc == "reno"), Some("reno"), "without cubic, reno");
        assert_eq!(loopback_pick("bbr", |_: &str| false), None, "nothing settable: the system's");
        for other in ["cubic", "reno", "dctcp", ""] {
            assert_eq!(loopback_pick(other, all), None, "{other}");
        }
    }

    #[test]
    fn auto_reaches_loopback_peers_only_and_a_name_every_peer() {
        let auto = Choice { on_loopback: Some("cubic".into()), ..Choice::default() };
        let v4_in_v6 = IpAddr::V6(std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        assert_eq!(auto.for_peer(LOOP), Some("cubic"));
        assert_eq!(auto.for_peer(v4_in_v6), Some("cubic"));
        assert_eq!(auto.for_peer(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)), Some("cubic"));
        assert_eq!(auto.for_peer(LAN), None);
        // A listener on loopback gives it to all it accepts; one on any
        // address leaves it to each accepted loopback peer.
        assert_eq!(auto.for_listener(LOOP), Some("cubic"));
        assert_eq!(auto.after_accept(LOOP, LOOP), None);
        assert_eq!(auto.for_listener(ANY), None);
        assert_eq!(auto.after_accept(ANY, LOOP), Some("cubic"));
        assert_eq!(auto.after_accept(ANY, LAN), None);
        let named = Choice { everywhere: Some("reno".into()), ..Choice::default() };
        assert_eq!(named.for_peer(LAN), Some("reno"));
        assert_eq!(named.for_listener(ANY), Some("reno"));
        assert_eq!(named.after_accept(ANY, LAN), None, "inherited from the listener");
        let system = Choice::default();
        assert_eq!((system.for_peer(LOOP), system.for_listener(LOOP)), (None, None));
    }

    #[test]
    fn the_option_reads_auto_system_or_a_name() {
        assert_eq!("auto".parse(), Ok(Policy::Auto));
        assert_eq!("system".parse(), Ok(Policy::System));
        assert_eq!("cubic".parse(), Ok(Policy::Named("cubic".into())));
        for bad in ["", "cu bic", "../x", "a-very-long-name-indeed"] {
            assert!(bad.parse::<Policy>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_named_control_reaches_accepted_connections_and_a_missing_one_is_refused() {
        // Reno is built into every kernel and allowed to every user.
        let choice = choose(&Policy::Named("reno".into())).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        apply(&l, choice.for_listener(LOOP));
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (accepted, _) = l.accept().unwrap();
        assert_eq!(current(&accepted).as_deref(), Some("reno"));
        let e = choose(&Policy::Named("nosuchcc".into())).unwrap_err();
        assert!(e.starts_with("--tcp-congestion nosuchcc: this kernel has no such"), "{e}");
        assert!(!e.contains('\n'));
        assert_eq!(choose(&Policy::System).unwrap(), Choice::default());
    }
}

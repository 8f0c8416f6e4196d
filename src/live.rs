//! The live page's sockets (`--http`), driven by the reactor's thread.
//!
//! Owns: the loopback HTTP listener, each browser's socket with its
//! `http::HttpConn`, the `http::EventHub`, and the keep-alive deadline of
//! the SSE streams. Sockets are registered edge-triggered for both
//! directions once (no reregistration per write). At most
//! `MAX_CONNECTIONS` browsers at once (more are accepted and closed); a
//! browser that sends more than a request's worth, or takes over
//! `REQUEST_TIMEOUT` to send a request and take the answer (event streams
//! excepted), is closed. The
//! coordinator's view is asked for only when a request arrives or, while
//! someone is subscribed, at most once per `VIEW_INTERVAL` after turns of
//! the loop: without the page the per-job path is untouched, and with it a
//! burst of jobs costs one view per interval.
//! Must not touch: the RPC connections, job rules, the HTTP rules (`http`).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::http::{ClusterView, EventHub, HttpConn, KEEPALIVE_SECS, MAX_REQUEST};

/// Tokens from here on are the live page's: the listener, then its connections.
pub const TOKEN_BASE: usize = usize::MAX / 2;
/// Browsers served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Subscribers get the view at most this often: a burst of jobs costs one
/// view per interval, not one per turn of the loop.
pub const VIEW_INTERVAL: Duration = Duration::from_millis(200);
/// Bytes read from a browser before it is closed as not a browser.
const MAX_READ: usize = 4 * MAX_REQUEST;
/// A browser must have sent its request and taken its answer (all but an
/// event stream) within this, or it is closed (a slowloris holds no slot).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One browser: its socket, its HTTP state, bytes read, when it came.
struct Browser {
    stream: TcpStream,
    conn: HttpConn,
    read: usize,
    since: Instant,
}

pub struct Live {
    listener: TcpListener,
    conns: Slab<Browser>,
    hub: EventHub,
    keepalive_at: Option<Instant>,
    /// The last time subscribers were sent the view (or it was compared).
    viewed_at: Option<Instant>,
    /// A turn of the loop ran since then: the view may have changed.
    stale: bool,
    buf: Vec<u8>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Live {
    /// Bind `addr` and register it. Errors are one line for the operator.
    pub fn start(addr: SocketAddr, registry: &Registry) -> Result<Live, String> {
        let mut listener = TcpListener::bind(addr).map_err(|e| format!("cannot listen on --http {addr}: {e}"))?;
        registry
            .register(&mut listener, Token(TOKEN_BASE), Interest::READABLE)
            .map_err(|e| format!("cannot register with epoll: {e}"))?;
        Ok(Live {
            listener,
            conns: Slab::new(),
            hub: EventHub::new(),
            keepalive_at: None,
            viewed_at: None,
            stale: false,
            buf: vec![0; 4096],
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn owns(token: Token) -> bool {
        token.0 >= TOKEN_BASE
    }

    fn subscribers(&self) -> bool {
        self.conns.iter().any(|(_, b)| b.conn.subscribed())
    }

    /// A readiness event for one of our tokens.
    pub fn on_event(&mut self, token: Token, registry: &Registry, view: &dyn Fn() -> ClusterView) {
        if token.0 == TOKEN_BASE {
            return self.accept(registry);
        }
        let key = token.0 - TOKEN_BASE - 1;
        let Some(Browser { stream, conn, read, .. }) = self.conns.get_mut(key) else { return };
        let mut close = false;
        let (mut refreshed, mut changed) = (false, false);
        loop {
            match stream.read(&mut self.buf) {
                Ok(0) => {
                    close = true;
                    break;
                }
                Ok(n) => {
                    *read += n;
                    if *read > MAX_READ {
                        close = true;
                        break;
                    }
                    if !refreshed && !conn.subscribed() && !conn.done() {
                        // The snapshot it may ask for is today's; the
                        // subscribers, if it changed, hear of it below.
                        refreshed = true;
                        changed = self.hub.update(view(), unix_now()).is_some();
                    }
                    conn.feed(&self.buf[..n], &self.hub);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    close = true;
                    break;
                }
            }
        }
        if close {
            self.close(key, registry);
        } else {
            self.flush(key, registry);
        }
        if changed {
            self.broadcast(registry, None);
        }
        self.retime();
    }

    fn accept(&mut self, registry: &Registry) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        log::debug!("live page: {MAX_CONNECTIONS} browsers already; closing a new one");
                        continue;
                    }
                    let entry = self.conns.vacant_entry();
                    let token = Token(TOKEN_BASE + 1 + entry.key());
                    if registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE).is_ok() {
                        entry.insert(Browser { stream, conn: HttpConn::new(), read: 0, since: Instant::now() });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("live page: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Write what can be written; close what is done.
    fn flush(&mut self, key: usize, registry: &Registry) {
        let Some(Browser { stream, conn, .. }) = self.conns.get_mut(key) else { return };
        while conn.wants_write() {
            match stream.write(conn.pending()) {
                Ok(0) => break,
                Ok(n) => conn.written(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(key, registry),
            }
        }
        if conn.done() {
            self.close(key, registry);
        }
    }

    fn close(&mut self, key: usize, registry: &Registry) {
        if let Some(mut b) = self.conns.try_remove(key) {
            let _ = registry.deregister(&mut b.stream);
        }
    }

    /// After a turn of the loop: tell subscribers what changed, at most
    /// once per `VIEW_INTERVAL` (`deadline` wakes the loop for the rest).
    /// Asks for the view only while someone is subscribed.
    pub fn after_turn(&mut self, now: Instant, registry: &Registry, view: &dyn Fn() -> ClusterView) {
        if !self.subscribers() {
            self.stale = false;
            return;
        }
        self.stale = true;
        if self.viewed_at.is_some_and(|at| now < at + VIEW_INTERVAL) {
            return;
        }
        self.stale = false;
        self.viewed_at = Some(now);
        if let Some(frame) = self.hub.update(view(), unix_now()) {
            self.broadcast(registry, Some(&frame));
        }
    }

    fn broadcast(&mut self, registry: &Registry, frame: Option<&[u8]>) {
        let frame = match frame {
            Some(f) => f.to_vec(),
            None => crate::http::sse_frame(self.hub.json()),
        };
        let keys: Vec<usize> = self.conns.iter().filter(|(_, b)| b.conn.subscribed()).map(|(k, _)| k).collect();
        for key in keys {
            if let Some(b) = self.conns.get_mut(key) {
                b.conn.push_event(&frame);
            }
            self.flush(key, registry);
        }
        self.retime();
    }

    fn retime(&mut self) {
        self.keepalive_at = match (self.subscribers(), self.keepalive_at) {
            (false, _) => None,
            (true, None) => Some(Instant::now() + Duration::from_secs(KEEPALIVE_SECS)),
            (true, at) => at,
        };
    }

    /// The next keep-alive comment (only while someone is subscribed), or
    /// the next browser's request timeout; `None` when no browser is here.
    pub fn deadline(&self) -> Option<Instant> {
        let requests = self.conns.iter().filter(|(_, b)| !b.conn.subscribed()).map(|(_, b)| b.since + REQUEST_TIMEOUT);
        let view = self.viewed_at.filter(|_| self.stale).map(|at| at + VIEW_INTERVAL);
        requests.chain(self.keepalive_at).chain(view).min()
    }

    pub fn on_timer(&mut self, now: Instant, registry: &Registry) {
        let late: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, b)| !b.conn.subscribed() && b.since + REQUEST_TIMEOUT <= now)
            .map(|(k, _)| k)
            .collect();
        for key in late {
            log::debug!("live page: a browser took over {REQUEST_TIMEOUT:?} for one request; closing it");
            self.close(key, registry);
        }
        if self.keepalive_at.is_none_or(|at| at > now) {
            return;
        }
        self.keepalive_at = None;
        let keys: Vec<usize> = self.conns.iter().filter(|(_, b)| b.conn.subscribed()).map(|(k, _)| k).collect();
        for key in keys {
            if let Some(b) = self.conns.get_mut(key) {
                b.conn.keepalive();
            }
            self.flush(key, registry);
        }
        self.retime();
    }
}

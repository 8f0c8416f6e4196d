//! The live page (`--http 127.0.0.1:PORT`), sans-I/O: HTTP requests in as
//! bytes, responses and Server-Sent Events out as bytes.
//!
//! Owns: `HttpConn`, one browser connection's state machine (request
//! parsed with `httparse`, at most `MAX_REQUEST` bytes of head; GET `/`
//! the page, `/cluster.json` the current snapshot, `/events` an SSE
//! stream; 400, 403 (a Host that is not loopback: DNS rebinding), 404,
//! 405, 431 otherwise; one request per connection), and `EventHub`, which
//! turns successive `ClusterView`s into the snapshot JSON and the recent
//! state transitions, and into SSE frames for every subscriber. A
//! subscriber's unsent frames are bounded (`MAX_BACKLOG`): a browser that
//! does not read is dropped, never allowed to grow memory.
//! Must not touch: sockets, the clock (times come in as arguments), job
//! rules. The reactor reads and writes the bytes and asks the coordinator
//! for a `ClusterView` only while someone is subscribed.

use std::collections::{HashMap, VecDeque};

use serde_json::{json, Value};

use crate::proto::JobState;

/// The page, compiled in: no build step, no external resources.
pub const PAGE: &str = include_str!("web/index.html");
/// Largest request head accepted (431 beyond it).
pub const MAX_REQUEST: usize = 8 * 1024;
/// Headers a request may carry (431 beyond them).
const MAX_HEADERS: usize = 32;
/// Unsent bytes an SSE subscriber may hold before it is dropped.
pub const MAX_BACKLOG: usize = 1 << 20;
/// Transitions kept for the page's "recent" list.
pub const RECENT: usize = 50;
/// How often an idle SSE stream gets a comment (keeps proxies and the
/// browser from timing it out; also how a dead subscriber is noticed).
pub const KEEPALIVE_SECS: u64 = 15;
/// What the browser waits before reconnecting, in milliseconds.
const RETRY_MS: u32 = 2000;

/// A node as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// Lost nodes are never handed out again.
    pub down: bool,
    pub slots: u32,
    /// (ticket, replica) it runs.
    pub running: Vec<(u32, u32)>,
}

/// A waiting job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedView {
    pub ticket: u32,
    pub replicas: u32,
    pub owner: Option<u32>,
}

/// What the coordinator knows, in plain data (`Coordinator::cluster_view`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    pub nodes: Vec<NodeView>,
    /// In queue order.
    pub queue: Vec<QueuedView>,
    /// Every job not yet closed: ticket -> each replica's state.
    pub jobs: Vec<(u32, Vec<JobState>)>,
}

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Waiting => "waiting",
        JobState::Running => "running",
        JobState::Completed => "completed",
        JobState::Invalid => "invalid",
    }
}

/// One state change of a replica (or of a node: ticket 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub at: u64,
    pub ticket: u32,
    pub replica: u32,
    pub from: String,
    pub to: String,
}

/// Snapshots and transitions for every subscriber.
#[derive(Debug, Default)]
pub struct EventHub {
    last: Option<ClusterView>,
    /// When each (ticket, replica) started on its node, unix seconds.
    since: HashMap<(u32, u32), u64>,
    recent: VecDeque<Transition>,
    /// The current snapshot, as JSON text (what /cluster.json serves).
    json: String,
}

impl EventHub {
    pub fn new() -> Self {
        let mut hub = EventHub::default();
        hub.json = hub.snapshot().to_string();
        hub
    }

    /// Take a new view at `now` (unix seconds). `Some(frame)`: it differs
    /// from the last one, and this SSE frame tells every subscriber.
    pub fn update(&mut self, view: ClusterView, now: u64) -> Option<Vec<u8>> {
        if self.last.as_ref() == Some(&view) {
            return None;
        }
        let old = self.last.take().unwrap_or_default();
        self.diff(&old, &view, now);
        self.last = Some(view);
        self.json = self.snapshot().to_string();
        Some(sse_frame(&self.json))
    }

    fn push(&mut self, t: Transition) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(t);
    }

    fn diff(&mut self, old: &ClusterView, new: &ClusterView, now: u64) {
        let states = |v: &ClusterView| -> HashMap<(u32, u32), JobState> {
            let mut m = HashMap::new();
            for (t, reps) in &v.jobs {
                for (r, s) in reps.iter().enumerate() {
                    m.insert((*t, r as u32), *s);
                }
            }
            m
        };
        let (before, after) = (states(old), states(new));
        let mut keys: Vec<_> = before.keys().chain(after.keys()).copied().collect();
        keys.sort_unstable();
        keys.dedup();
        for k in keys {
            let from = before.get(&k).map_or("new", |s| state_name(*s));
            let to = after.get(&k).map_or("closed", |s| state_name(*s));
            if from != to {
                self.push(Transition { at: now, ticket: k.0, replica: k.1, from: from.into(), to: to.into() });
            }
            if to == "running" {
                self.since.entry(k).or_insert(now);
            } else {
                self.since.remove(&k);
            }
        }
    }

    /// The snapshot as the page and /cluster.json show it.
    pub fn snapshot(&self) -> Value {
        let empty = ClusterView::default();
        let v = self.last.as_ref().unwrap_or(&empty);
        let nodes: Vec<Value> = v
            .nodes
            .iter()
            .map(|n| {
                let state = if n.down {
                    "down"
                } else if n.running.is_empty() {
                    "free"
                } else {
                    "busy"
                };
                let running: Vec<Value> = n
                    .running
                    .iter()
                    .map(|&(t, r)| json!({"ticket": t, "replica": r, "since": self.since.get(&(t, r))}))
                    .collect();
                json!({"name": n.name, "state": state, "slots": n.slots, "running": running})
            })
            .collect();
        let queue: Vec<Value> = v
            .queue
            .iter()
            .enumerate()
            .map(|(i, q)| json!({"ticket": q.ticket, "replicas": q.replicas, "position": i + 1, "owner": q.owner}))
            .collect();
        let count = |f: &dyn Fn(&NodeView) -> bool| v.nodes.iter().filter(|n| f(n)).count();
        let replicas = |s: JobState| v.jobs.iter().flat_map(|(_, r)| r).filter(|&&x| x == s).count();
        let recent: Vec<Value> = self
            .recent
            .iter()
            .rev()
            .map(|t| json!({"at": t.at, "ticket": t.ticket, "replica": t.replica, "from": t.from, "to": t.to}))
            .collect();
        json!({
            "nodes": nodes,
            "queue": queue,
            "totals": {
                "nodes": v.nodes.len(),
                "free": count(&|n| !n.down && n.running.is_empty()),
                "busy": count(&|n| !n.down && !n.running.is_empty()),
                "down": count(&|n| n.down),
                "waiting": v.queue.len(),
                "jobs": v.jobs.len(),
                "running": replicas(JobState::Running),
                "completed": replicas(JobState::Completed),
                "invalid": replicas(JobState::Invalid),
            },
            "recent": recent,
        })
    }

    pub fn json(&self) -> &str {
        &self.json
    }
}

/// One SSE event carrying `data` (JSON: one line).
pub fn sse_frame(data: &str) -> Vec<u8> {
    let mut f = Vec::with_capacity(data.len() + 8);
    for line in data.split('\n') {
        f.extend_from_slice(b"data: ");
        f.extend_from_slice(line.as_bytes());
        f.push(b'\n');
    }
    f.push(b'\n');
    f
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the request head.
    Request,
    /// Sending one response, then closing.
    Responding,
    /// An SSE stream: frames are appended as they come.
    Streaming,
    /// Dropped (a slow subscriber): close now, unsent bytes discarded.
    Dropped,
}

/// One browser connection.
#[derive(Debug)]
pub struct HttpConn {
    inbuf: Vec<u8>,
    out: VecDeque<u8>,
    phase: Phase,
}

impl Default for HttpConn {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpConn {
    pub fn new() -> Self {
        HttpConn { inbuf: Vec::new(), out: VecDeque::new(), phase: Phase::Request }
    }

    /// Bytes from the browser. Anything after the request is ignored.
    pub fn feed(&mut self, data: &[u8], hub: &EventHub) {
        if self.phase != Phase::Request {
            return;
        }
        let room = MAX_REQUEST + 1 - self.inbuf.len();
        self.inbuf.extend_from_slice(&data[..data.len().min(room)]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&self.inbuf) {
            Ok(httparse::Status::Complete(_)) => {
                let method = req.method.unwrap_or("").to_owned();
                let path = req.path.unwrap_or("").to_owned();
                let host = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host")).map(|h| h.value.to_vec());
                self.route(&method, &path, host.as_deref(), hub);
            }
            Ok(httparse::Status::Partial) if self.inbuf.len() > MAX_REQUEST => {
                self.respond(431, "Request Header Fields Too Large", "text/plain", b"request too large\n", &[]);
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                self.respond(431, "Request Header Fields Too Large", "text/plain", b"too many headers\n", &[]);
            }
            Err(_) => self.respond(400, "Bad Request", "text/plain", b"bad request\n", &[]),
        }
        if self.phase != Phase::Request {
            self.inbuf = Vec::new();
        }
    }

    fn route(&mut self, method: &str, target: &str, host: Option<&[u8]>, hub: &EventHub) {
        if !host.is_some_and(loopback_host) {
            // A page elsewhere that resolves its own name to 127.0.0.1
            // (DNS rebinding) must not read the cluster.
            return self.respond(403, "Forbidden", "text/plain", b"only loopback host names are served\n", &[]);
        }
        let path = target.split(['?', '#']).next().unwrap_or("");
        if !matches!(path, "/" | "/index.html" | "/events" | "/cluster.json") {
            return self.respond(404, "Not Found", "text/plain", b"not found: try /\n", &[]);
        }
        if method != "GET" {
            return self.respond(405, "Method Not Allowed", "text/plain", b"only GET\n", &[("Allow", "GET")]);
        }
        match path {
            "/events" => {
                self.out.extend(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\
                      X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
                );
                self.out.extend(format!("retry: {RETRY_MS}\n\n").as_bytes());
                self.out.extend(sse_frame(hub.json()));
                self.phase = Phase::Streaming;
            }
            "/cluster.json" => self.respond(200, "OK", "application/json", hub.json().as_bytes(), &[]),
            _ => self.respond(200, "OK", "text/html; charset=utf-8", PAGE.as_bytes(), &[]),
        }
    }

    fn respond(&mut self, code: u16, reason: &str, ctype: &str, body: &[u8], extra: &[(&str, &str)]) {
        let mut head = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
             X-Content-Type-Options: nosniff\r\nContent-Security-Policy: default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'\r\n\
             Connection: close\r\n",
            body.len()
        );
        for (k, v) in extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.out.extend(head.as_bytes());
        self.out.extend(body);
        self.phase = Phase::Responding;
    }

    /// Whether this connection takes SSE frames.
    pub fn subscribed(&self) -> bool {
        self.phase == Phase::Streaming
    }

    /// Append an SSE frame; a subscriber already `MAX_BACKLOG` behind is dropped.
    pub fn push_event(&mut self, frame: &[u8]) {
        if self.phase != Phase::Streaming {
            return;
        }
        if self.out.len() + frame.len() > MAX_BACKLOG {
            self.phase = Phase::Dropped;
            self.out.clear();
            return;
        }
        self.out.extend(frame);
    }

    /// A comment line that keeps an idle stream open.
    pub fn keepalive(&mut self) {
        self.push_event(b": keep-alive\n\n");
    }

    /// What is ready to be written.
    pub fn pending(&self) -> &[u8] {
        self.out.as_slices().0
    }

    /// `n` bytes of `pending()` were written.
    pub fn written(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
    }

    pub fn wants_write(&self) -> bool {
        !self.out.is_empty() && self.phase != Phase::Dropped
    }

    /// The connection should be closed now.
    pub fn done(&self) -> bool {
        match self.phase {
            Phase::Responding => self.out.is_empty(),
            Phase::Dropped => true,
            Phase::Request | Phase::Streaming => false,
        }
    }
}

/// `127.0.0.1[:port]`, `localhost[:port]` or `[::1][:port]`.
fn loopback_host(h: &[u8]) -> bool {
    let Ok(h) = std::str::from_utf8(h) else { return false };
    let name = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        h.rsplit_once(':').map_or(h, |(n, _)| n)
    };
    matches!(name.to_ascii_lowercase().as_str(), "127.0.0.1" | "localhost" | "::1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(c: &mut HttpConn) -> String {
        let mut all = Vec::new();
        while !c.pending().is_empty() {
            let n = c.pending().len();
            all.extend_from_slice(c.pending());
            c.written(n);
        }
        String::from_utf8(all).unwrap()
    }

    fn get(path: &str, hub: &EventHub) -> (HttpConn, String) {
        let mut c = HttpConn::new();
        c.feed(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n").as_bytes(), hub);
        let t = text(&mut c);
        (c, t)
    }

    fn view(running: &[(u32, u32)], queue: &[u32], jobs: &[(u32, Vec<JobState>)]) -> ClusterView {
        ClusterView {
            nodes: vec![
                NodeView { name: "127.0.0.1:9001".into(), down: false, slots: 1, running: running.to_vec() },
                NodeView { name: "127.0.0.1:9002".into(), down: true, slots: 1, running: vec![] },
            ],
            queue: queue.iter().map(|&t| QueuedView { ticket: t, replicas: 1, owner: Some(1000) }).collect(),
            jobs: jobs.to_vec(),
        }
    }

    #[test]
    fn the_page_the_snapshot_and_errors() {
        let hub = EventHub::new();
        let (c, t) = get("/", &hub);
        assert!(t.starts_with("HTTP/1.1 200 OK\r\n") && t.contains("text/html") && t.contains("EventSource"), "{t}");
        assert!(c.done());
        let (_, t) = get("/cluster.json?x=1", &hub);
        assert!(t.contains("application/json") && t.contains("\"nodes\":[]"), "{t}");
        assert!(get("/nope", &hub).1.starts_with("HTTP/1.1 404 "));
        let mut c = HttpConn::new();
        c.feed(b"POST / HTTP/1.1\r\nHost: localhost\r\n\r\n", &hub);
        let t = text(&mut c);
        assert!(t.starts_with("HTTP/1.1 405 ") && t.contains("Allow: GET"), "{t}");
        let mut c = HttpConn::new();
        c.feed(b"GET / HTTP/1.1\r\nHost: evil.example:8080\r\n\r\n", &hub);
        assert!(text(&mut c).starts_with("HTTP/1.1 403 "), "DNS rebinding refused");
        let mut c = HttpConn::new();
        c.feed(b"\x16\x03\x01 garbage\r\n\r\n", &hub);
        assert!(text(&mut c).starts_with("HTTP/1.1 400 "));
    }

    #[test]
    fn requests_are_bounded() {
        let hub = EventHub::new();
        let mut c = HttpConn::new();
        c.feed(b"GET / HTTP/1.1\r\n", &hub);
        let line = format!("X-Pad: {}\r\n", "a".repeat(1000));
        for _ in 0..20 {
            c.feed(line.as_bytes(), &hub);
        }
        assert!(text(&mut c).starts_with("HTTP/1.1 431 "));
        assert!(c.done());
        let mut c = HttpConn::new();
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        c.feed(format!("GET / HTTP/1.1\r\nHost: localhost\r\n{many}\r\n").as_bytes(), &hub);
        assert!(text(&mut c).starts_with("HTTP/1.1 431 "));
    }

    #[test]
    fn a_request_may_arrive_byte_by_byte() {
        let hub = EventHub::new();
        let mut c = HttpConn::new();
        for b in b"GET /cluster.json HTTP/1.1\r\nHost: [::1]:80\r\n\r\n" {
            c.feed(&[*b], &hub);
        }
        assert!(text(&mut c).starts_with("HTTP/1.1 200 "));
    }

    #[test]
    fn events_stream_snapshots_and_transitions() {
        let mut hub = EventHub::new();
        let (mut c, t) = get("/events", &hub);
        assert!(t.contains("Content-Type: text/event-stream") && t.contains("retry: 2000\n\ndata: {"), "{t}");
        assert!(c.subscribed() && !c.done());
        let f = hub.update(view(&[], &[5], &[(5, vec![JobState::Waiting])]), 100).expect("changed");
        assert!(hub.update(view(&[], &[5], &[(5, vec![JobState::Waiting])]), 101).is_none(), "no change, no frame");
        c.push_event(&f);
        let t = text(&mut c);
        assert!(t.starts_with("data: {") && t.ends_with("}\n\n"), "{t}");
        hub.update(view(&[(5, 0)], &[], &[(5, vec![JobState::Running])]), 102).unwrap();
        let s = hub.snapshot();
        assert_eq!(s["nodes"][0]["state"], "busy");
        assert_eq!(s["nodes"][0]["running"][0], json!({"ticket": 5, "replica": 0, "since": 102}));
        assert_eq!(s["nodes"][1]["state"], "down");
        assert_eq!(s["totals"]["running"], 1);
        hub.update(view(&[], &[], &[(5, vec![JobState::Completed])]), 103).unwrap();
        hub.update(view(&[], &[], &[]), 104).unwrap();
        let recent = hub.snapshot()["recent"].clone();
        let steps: Vec<(String, String)> = recent
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .map(|t| (t["from"].as_str().unwrap().into(), t["to"].as_str().unwrap().into()))
            .collect();
        let want = [("new", "waiting"), ("waiting", "running"), ("running", "completed"), ("completed", "closed")];
        assert_eq!(steps, want.map(|(a, b)| (a.to_string(), b.to_string())));
        assert_eq!(recent[0]["at"], 104, "most recent first");
    }

    #[test]
    fn a_subscriber_that_does_not_read_is_dropped() {
        let hub = EventHub::new();
        let (mut c, _) = get("/events", &hub);
        let frame = sse_frame(&"x".repeat(10_000));
        for _ in 0..(MAX_BACKLOG / frame.len() + 2) {
            c.push_event(&frame);
        }
        assert!(c.done(), "dropped");
        assert!(c.pending().is_empty() && !c.wants_write(), "its backlog is freed");
    }

    #[test]
    fn recent_is_bounded() {
        let mut hub = EventHub::new();
        for t in 0..200 {
            hub.update(view(&[], &[t], &[(t, vec![JobState::Waiting])]), u64::from(t));
        }
        assert_eq!(hub.snapshot()["recent"].as_array().unwrap().len(), RECENT);
    }
}

//! The live page (`--http`) in a real browser: headless Chromium driven by
//! chromedriver through its WebDriver HTTP API (a tiny hand-rolled client),
//! against a real server. Jobs deployed after the page loaded must appear
//! on it, pushed by Server-Sent Events, and a screenshot is kept under
//! target/test-artifacts/. Under CI=true a missing Chromium is a failure.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Ends the driver (and with it the browser) however the test ends.
struct Driver {
    child: Child,
    addr: SocketAddr,
    session: Option<String>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(id) = self.session.take() {
            let _ = wd(self.addr, "DELETE", &format!("/session/{id}"), None);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One WebDriver call: its `value`.
fn wd(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    if std::env::var("WD_TRACE").is_ok() {
        eprintln!("wd {method} {path}");
    }
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    // chromedriver keeps the connection open: read the head, then
    // Content-Length bytes (or chunks up to the last one).
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    let (head, body) = loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let lower = head.to_ascii_lowercase();
            let len = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            match len {
                Some(len) if rest.len() >= len => break (head.to_string(), rest[..len].to_string()),
                None if lower.contains("chunked") && rest.ends_with("0\r\n\r\n") => {
                    break (head.to_string(), unchunk(rest))
                }
                _ => {}
            }
        }
        if n == 0 {
            return Err("connection closed mid-response".into());
        }
    };
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{method} {path}: {}", v["value"]));
    }
    Ok(v["value"].clone())
}

fn unchunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The live page's address, from the server's log.
fn live_addr(c: &Cluster) -> SocketAddr {
    let find =
        || -> Option<SocketAddr> { c.log().split("live page at http://").nth(1)?.split('/').next()?.parse().ok() };
    wait_until("the server logs its live page", || find().is_some());
    find().expect("live page address")
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target dir").join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

fn have_chromium(test: &str) -> bool {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test} needs {CHROMIUM} and {CHROMEDRIVER} (Debian's chromium, chromium-driver; .ci/run installs them)"
        );
    }
    eprintln!("SKIPPED {test}: no {CHROMIUM} or {CHROMEDRIVER} (apt-get install chromium chromium-driver)");
    false
}

fn start_driver(profile: &Path) -> Driver {
    // A free port for chromedriver (it takes no port 0); retried if taken meanwhile.
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut driver = Driver { child, addr, session: None };
        let up = || wd(addr, "GET", "/status", None).is_ok_and(|v| v["ready"] == true);
        let exited = std::cell::Cell::new(false);
        wait_within(Duration::from_secs(20), "chromedriver answers /status", || {
            up() || {
                // A zombie: it exited (the port was taken).
                exited.set(
                    Path::new(&format!("/proc/{}/status", driver.child.id())).exists()
                        && std::fs::read_to_string(format!("/proc/{}/stat", driver.child.id()))
                            .is_ok_and(|s| s.contains(") Z ")),
                );
                exited.get()
            }
        });
        if exited.get() {
            let _ = driver.child.wait();
            continue; // it exited: the port was taken
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", "--window-size=1100,900",
                         format!("--user-data-dir={}", profile.display())],
            }
        }}});
        let v = wd(addr, "POST", "/session", Some(caps)).expect("a Chromium session");
        driver.session = Some(v["sessionId"].as_str().expect("session id").to_string());
        return driver;
    }
    panic!("chromedriver did not start");
}

impl Driver {
    fn path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session.as_deref().unwrap_or(""))
    }

    fn js(&self, script: &str) -> Value {
        wd(self.addr, "POST", &self.path("/execute/sync"), Some(json!({"script": script, "args": []})))
            .unwrap_or(Value::Null)
    }

    fn text(&self, selector: &str) -> String {
        let q = serde_json::to_string(selector).unwrap();
        self.js(&format!("const e = document.querySelector({q}); return e ? e.textContent : '';"))
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

#[test]
fn the_live_page_shows_jobs_as_they_are_deployed_and_end() {
    let test = "the_live_page_shows_jobs_as_they_are_deployed_and_end";
    if !have_chromium(test) {
        return;
    }
    // --allow-network: the held job reaches the test's gate.
    let c = Cluster::start_with(2, &["--http", "127.0.0.1:0", "--allow-network"]);
    let page = format!("http://{}/", live_addr(&c));
    let profile = tempfile::tempdir().unwrap();
    let d = start_driver(profile.path());
    wd(d.addr, "POST", &d.path("/url"), Some(json!({"url": page}))).expect("load the page");
    wait_until("the page renders its first snapshot", || d.text("#total-nodes") == "nodes: 2");
    assert_eq!(d.text("#conn"), "live");

    // Deployed after the page loaded: one job runs (held at the gate), the
    // next needs both nodes and waits.
    let gate = Gate::new();
    let dir = tempfile::tempdir().unwrap();
    let held = c.deploy(1, &job(dir.path(), "held.tar.gz", &gate.wait_recipe("held")));
    let (_, conn) = gate.arrive();
    let waits = c.deploy(2, &job(dir.path(), "wide.tar.gz", &["echo wide"]));
    wait_until("the page shows the running replica and the waiting job", || {
        d.text("#nodes tbody").contains(&format!("#{held}/0"))
            && d.text(&format!("#queue tr[data-ticket=\"{waits}\"]")).contains(&format!("#{waits}"))
    });
    assert!(d.text("#nodes tbody").contains("busy"), "{}", d.text("#nodes tbody"));
    assert_eq!(d.text("#total-waiting"), "waiting: 1");

    let shot = wd(d.addr, "GET", &d.path("/screenshot"), None).expect("screenshot");
    let png = base64_decode(shot.as_str().expect("base64 PNG"));
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let file = artifacts().join("web-live-page.png");
    std::fs::write(&file, &png).expect("keep the screenshot");
    eprintln!("screenshot: {}", file.display());

    // Released: both jobs end, and the transitions are shown.
    release(conn);
    // (A replica that runs for less than the page's update interval may go
    // from waiting to completed in one step.)
    let ended = |ticket: u32, replica: u32| {
        let rows = d.js(
            "return [...document.querySelectorAll('#recent tbody tr')].map(r => [...r.cells].map(c => c.textContent));",
        );
        rows.as_array().is_some_and(|rows| {
            rows.iter().any(|r| {
                r[1] == format!("#{ticket}").as_str() && r[2] == replica.to_string().as_str() && r[4] == "completed"
            })
        })
    };
    wait_until("the page shows both jobs completed", || ended(held, 0) && ended(waits, 0) && ended(waits, 1));
    assert!(d.text("#recent tbody").contains(&format!("#{held}0runningcompleted")), "{}", d.text("#recent tbody"));
    assert_eq!(d.text("#total-busy"), "busy: 0");
}

/// What a browser must not get: other hosts' names (DNS rebinding), other
/// methods, oversized requests. Plain sockets against the real server.
#[test]
fn the_live_page_refuses_what_a_browser_elsewhere_could_send() {
    let c = Cluster::start_with(1, &["--http", "127.0.0.1:0"]);
    let addr = live_addr(&c);
    let ask = |req: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = s.write_all(req);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(ask(b"GET /cluster.json HTTP/1.1\r\nHost: attacker.example\r\n\r\n").starts_with("HTTP/1.1 403 "));
    assert!(ask(b"DELETE / HTTP/1.1\r\nHost: localhost\r\n\r\n").starts_with("HTTP/1.1 405 "));
    assert!(ask(format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000)).as_bytes()).starts_with("HTTP/1.1 431 "));
    let ok = ask(b"GET /cluster.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200 ") && ok.contains("\"totals\""), "{ok}");
    // The RPC side is unaffected.
    assert!(c.cloud(&["status", "1"]).status.code().is_some());
}

/// A connection that never sends its request (a slowloris) is closed after
/// the request timeout, so it cannot hold one of the page's few slots.
#[test]
fn a_browser_that_sends_no_request_is_closed() {
    let c = Cluster::start_with(1, &["--http", "127.0.0.1:0"]);
    let mut s = TcpStream::connect(live_addr(&c)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(9) && took < Duration::from_secs(30), "closed after {took:?}");
}

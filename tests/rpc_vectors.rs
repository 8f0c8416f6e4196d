//! Byte-exact ONC RPC vectors captured from rpcgen + libtirpc
//! (tests/vectors/, see its README): our codec decodes every call, encodes
//! the same replies, and the live server answers the same bytes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use cloudinfra::coordinator::{OutputRef, Reply};
use cloudinfra::proto::{self, CloudStat, JobStatus, ReplicaStatus, CLOUD_PROGRAM};
use cloudinfra::record::{Event, Outbox, RecordDecoder};
use cloudinfra::rpc::{self, AcceptStat, CallHeader, ReplyOutcome};
use cloudinfra::server::encode_reply;
use cloudinfra::xdr::XdrReader;

/// The hex dumps of a vector file, by section title ("call", "reply 1", ...).
fn dumps(name: &str) -> Vec<(String, Vec<u8>)> {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for line in text.lines() {
        if let Some(title) = line.strip_prefix("== ") {
            out.push((title.trim_end_matches(" ==").to_string(), Vec::new()));
            continue;
        }
        // "  0010  20 00 c1 0d ...  |....|": offset, two spaces, bytes.
        let Some(rest) = line.strip_prefix("  ") else {
            continue;
        };
        let Some((offset, bytes)) = rest.split_once("  ") else {
            continue;
        };
        if offset.is_empty() || !offset.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let bytes = bytes.split("  |").next().unwrap_or("");
        if let Some((_, buf)) = out.last_mut() {
            assert_eq!(usize::from_str_radix(offset, 16).unwrap(), buf.len(), "{name}: dump is contiguous");
            buf.extend(bytes.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()));
        }
    }
    out
}

fn section(name: &str, title: &str) -> Vec<u8> {
    dumps(name)
        .into_iter()
        .find(|(t, _)| t.starts_with(title))
        .map(|(_, b)| b)
        .unwrap_or_else(|| panic!("{name}: no section {title}"))
}

/// Deframe a byte stream into whole records (all fragments joined).
fn records(wire: &[u8]) -> Vec<Vec<u8>> {
    let mut d = RecordDecoder::new(1 << 20, 0);
    let mut out = Vec::new();
    let mut rest = wire;
    loop {
        let (n, ev) = d.decode(rest, &mut |_| cloudinfra::record::Shape::Whole);
        rest = &rest[n..];
        match ev {
            Some(Event::Record(r)) => out.push(r),
            Some(other) => panic!("unexpected {other:?}"),
            None => return out,
        }
    }
}

fn one_record(wire: &[u8]) -> Vec<u8> {
    let mut r = records(wire);
    assert_eq!(r.len(), 1);
    r.remove(0)
}

fn wire_of(pieces: Vec<cloudinfra::record::Piece>) -> Vec<u8> {
    let mut ob = Outbox::new();
    ob.push(pieces);
    let mut wire = Vec::new();
    assert!(ob.write_to(&mut wire).unwrap());
    wire
}

fn call_of(name: &str) -> (CallHeader, Vec<u8>) {
    let rec = one_record(&section(name, "call"));
    (CallHeader::decode(&rec).expect("call header decodes"), rec)
}

#[test]
fn null_reply_is_byte_exact() {
    let (h, _) = call_of("null.txt");
    assert_eq!((h.prog, h.vers, h.proc_num), (proto::CLOUD_PROG, 1, 0));
    let reply = rpc::accepted(h.xid, AcceptStat::Success).into_bytes();
    assert_eq!(cloudinfra::record::frame(&reply), section("null.txt", "reply"));
}

#[test]
fn deploy_ok_decodes_and_the_reply_is_byte_exact() {
    let (h, rec) = call_of("deploy-ok.txt");
    let mut r = XdrReader::new(&rec[h.args_at..]);
    assert_eq!(r.u32().unwrap(), 2);
    assert_eq!(r.opaque(100).unwrap(), b"0123456789");
    let wire = wire_of(encode_reply(h.xid, Reply::Deploy(Ok(7))));
    assert_eq!(wire, section("deploy-ok.txt", "reply"));
}

#[test]
fn error_arms_are_byte_exact() {
    for (file, stat) in
        [("deploy-bad-replicas.txt", CloudStat::BadReplicas), ("status-no-such-ticket.txt", CloudStat::NoSuchTicket)]
    {
        let (h, _) = call_of(file);
        let expected = section(file, "reply");
        let rec = one_record(&expected);
        let (_, ReplyOutcome::Success { results_at }) = rpc::decode_reply(&rec).unwrap() else { panic!() };
        let Err((got_stat, msg)) = proto::decode_stat(&mut XdrReader::new(&rec[results_at..])).unwrap() else {
            panic!("{file}: expected an error arm")
        };
        assert_eq!(got_stat, stat);
        let reply = match stat {
            CloudStat::BadReplicas => Reply::Deploy(Err((stat, msg))),
            _ => Reply::Status(Err((stat, msg))),
        };
        assert_eq!(wire_of(encode_reply(h.xid, reply)), expected, "{file}");
    }
}

#[test]
fn status_ok_round_trips_byte_exact() {
    let (h, rec) = call_of("status-ok.txt");
    assert_eq!(XdrReader::new(&rec[h.args_at..]).u32().unwrap(), 7);
    let expected = section("status-ok.txt", "reply");
    let reply = one_record(&expected);
    let mut r = XdrReader::new(&reply[rpc::SUCCESS_HEADER_LEN..]);
    assert_eq!(proto::decode_stat(&mut r).unwrap(), Ok(()));
    let st = JobStatus::decode(&mut r).unwrap();
    assert_eq!(st.ticket, 7);
    assert_eq!(st.replicas.len(), 2);
    assert_eq!(st.replicas[0].node, "127.0.0.1:9001");
    assert_eq!(st.replicas[0].message, "");
    assert_eq!(wire_of(encode_reply(h.xid, Reply::Status(Ok(st)))), expected);
}

#[test]
fn retrieve_ok_streams_outputs_to_the_same_payload() {
    let (h, rec) = call_of("retrieve-ok.txt");
    assert_eq!(proto::decode_retrieve_args(&mut XdrReader::new(&rec[h.args_at..])).unwrap(), (7, true));
    let dir = tempfile::tempdir().unwrap();
    let outs = (0..2u32)
        .map(|i| {
            let path = dir.path().join(format!("out{i}"));
            std::fs::write(&path, format!("hello from replica {i}\n")).unwrap();
            let status = ReplicaStatus {
                replica: i,
                node: format!("127.0.0.1:900{}", i + 1),
                state: proto::JobState::Completed,
                exit_code: 0,
                message: "exit 0".into(),
            };
            OutputRef { status, path }
        })
        .collect();
    let wire = wire_of(encode_reply(h.xid, Reply::Retrieve(Ok(outs))));
    // Our reply streams the outputs as separate fragments; the payload is identical.
    assert_eq!(one_record(&wire), one_record(&section("retrieve-ok.txt", "reply")));
}

#[test]
fn close_ok_is_byte_exact() {
    let (h, _) = call_of("close-ok.txt");
    assert_eq!(wire_of(encode_reply(h.xid, Reply::Close(Ok(())))), section("close-ok.txt", "reply"));
}

#[test]
fn auth_sys_credentials_are_accepted() {
    let (h, rec) = call_of("status-auth-sys.txt");
    assert_eq!(h.cred_flavor, rpc::AUTH_SYS);
    assert!(rpc::admit(&h, &[CLOUD_PROGRAM]).is_ok());
    assert_eq!(XdrReader::new(&rec[h.args_at..]).u32().unwrap(), 7);
}

#[test]
fn dispatch_errors_are_byte_exact() {
    for (file, call, reply) in [
        ("unknown-proc.txt", "call", "reply"),
        ("wrong-prog.txt", "call", "reply"),
        ("rpcinfo-all-versions.txt", "call 1", "reply 1"),
        ("rpcvers-3.txt", "call", "for comparison"),
    ] {
        let h = CallHeader::decode(&one_record(&section(file, call))).unwrap();
        let got = rpc::admit(&h, &[CLOUD_PROGRAM]).expect_err(file);
        assert_eq!(cloudinfra::record::frame(&got), section(file, reply), "{file}");
    }
}

/// deploy-large.txt abridges its dump; rebuild the call from its description
/// (100000 bytes of a..z, sent as fragments of 65532 + 34516) and check the
/// abridged lines against it.
fn deploy_large_wire() -> Vec<u8> {
    let mut w = rpc::call(0x5a0a_8af4, proto::CLOUD_PROG, 1, proto::DEPLOY);
    let archive: Vec<u8> = (0..100_000).map(|i| b'a' + (i % 26) as u8).collect();
    w.u32(2).opaque(&archive);
    let payload = w.into_bytes();
    assert_eq!(payload.len(), 100_048);
    let mut wire = Vec::new();
    wire.extend_from_slice(&65532u32.to_be_bytes());
    wire.extend_from_slice(&payload[..65532]);
    wire.extend_from_slice(&(34516u32 | 0x8000_0000).to_be_bytes());
    wire.extend_from_slice(&payload[65532..]);
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/deploy-large.txt")).unwrap();
    let call_part = text.split("== reply").next().unwrap();
    for line in call_part.lines() {
        let Some((off, rest)) = line.strip_prefix("  ").and_then(|l| l.split_once("  ")) else {
            continue;
        };
        let Ok(off) = usize::from_str_radix(off, 16) else {
            continue;
        };
        let bytes: Vec<u8> =
            rest.split("  |").next().unwrap().split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
        assert_eq!(&wire[off..off + bytes.len()], &bytes[..], "abridged line at {off:#x}");
    }
    wire
}

#[test]
fn deploy_large_streams_across_a_fragment_boundary_inside_the_opaque() {
    let wire = deploy_large_wire();
    for chunk in [1usize, 7, 4096, wire.len()] {
        let mut d = RecordDecoder::new(64 * 1024, 1 << 20);
        let mut data = Vec::new();
        let mut ended = false;
        for piece in wire.chunks(chunk) {
            let mut rest = piece;
            loop {
                let (n, ev) = d.decode(rest, &mut |h| rpc::call_shape(h, proto::call_stream_at));
                rest = &rest[n..];
                match ev {
                    Some(Event::StreamStart { len, .. }) => assert_eq!(len, 100_000),
                    Some(Event::StreamData(b)) => data.extend_from_slice(b),
                    Some(Event::StreamEnd) => ended = true,
                    Some(other) => panic!("{other:?}"),
                    None => break,
                }
            }
        }
        assert!(ended);
        assert_eq!(data.len(), 100_000);
        assert!(data.iter().enumerate().all(|(i, &b)| b == b'a' + (i % 26) as u8));
    }
}

// ---- the same bytes against the live server ----

fn exchange(stream: &mut TcpStream, call: &[u8]) -> Vec<u8> {
    stream.write_all(call).unwrap();
    read_record(stream)
}

fn read_record(stream: &mut TcpStream) -> Vec<u8> {
    let mut d = RecordDecoder::new(1 << 20, 0);
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "server closed the connection");
        if let (_, Some(Event::Record(r))) = d.decode(&buf[..n], &mut |_| cloudinfra::record::Shape::Whole) {
            return r;
        }
    }
}

#[test]
fn live_server_answers_the_captured_calls() {
    let c = common::Cluster::start(2);
    let mut s = TcpStream::connect(c.addr).unwrap();
    for (file, call, reply) in [
        ("null.txt", "call", "reply"),
        ("null-two-fragments.txt", "call", "reply"),
        ("unknown-proc.txt", "call", "reply"),
        ("wrong-prog.txt", "call", "reply"),
        ("rpcinfo-version-1.txt", "call", "reply"),
        ("rpcinfo-all-versions.txt", "call 1", "reply 1"),
        ("rpcinfo-all-versions.txt", "call 2", "reply 2"),
        ("rpcvers-3.txt", "call", "for comparison"),
    ] {
        // One connection for all: the server keeps reading after each reply.
        let got = exchange(&mut s, &section(file, call));
        assert_eq!(got, one_record(&section(file, reply)), "{file} {call}");
    }
    // STATUS 99 on a fresh server: no such ticket.
    let got = exchange(&mut s, &section("status-no-such-ticket.txt", "call"));
    let mut r = XdrReader::new(&got[rpc::SUCCESS_HEADER_LEN..]);
    assert!(matches!(proto::decode_stat(&mut r).unwrap(), Err((CloudStat::NoSuchTicket, _))));
    // AUTH_SYS works like AUTH_NONE. The vector claims uid 0, which the
    // server checks against the socket's owner: claim our own uid.
    let mut call = section("status-auth-sys.txt", "call");
    call[0x30..0x34].copy_from_slice(&nix::unistd::Uid::effective().as_raw().to_be_bytes());
    let got = exchange(&mut s, &call);
    assert_eq!(&got[..rpc::SUCCESS_HEADER_LEN - 4], &one_record(&section("status-auth-sys.txt", "reply"))[..20]);
    // The 2-fragment deploy is accepted (its archive is not gzip: the replica
    // will be INVALID, which is the job's problem, not the protocol's).
    let got = exchange(&mut s, &deploy_large_wire());
    let mut r = XdrReader::new(&got[rpc::SUCCESS_HEADER_LEN..]);
    assert_eq!(proto::decode_stat(&mut r).unwrap(), Ok(()));
    let ticket = r.u32().unwrap();
    let st = c.wait_status(ticket, |s| s["replicas"].as_array().unwrap().iter().all(|r| r["status"] == "INVALID"));
    assert!(st["replicas"][0]["message"].as_str().unwrap().contains("not a gzip"), "{st}");
}

//! Both ends of an RPC connection as sans-I/O state machines: bytes in,
//! events out, unit-tested without sockets.
//!
//! Owns: what arrives on a connection and what it means at the RPC level.
//! [`CallReader`] is the serving end (a client's connection to the main
//! server, or the main server's link as seen by a node): it admits calls
//! for its program, turns everything it must refuse into the reply RFC 5531
//! prescribes (RPC_MISMATCH, AUTH_ERROR, PROG_UNAVAIL, PROG_MISMATCH,
//! PROC_UNAVAIL, GARBAGE_ARGS, CLOUD_TOO_LARGE), and passes a streamed
//! call's opaque through. [`ReplyReader`] is the calling end (the main
//! server's link to a node): it matches replies to pending calls by xid.
//! Must not touch: sockets, files, the job table. What a call *does* is for
//! the caller to decide.

use std::collections::HashMap;

use crate::proto::{self, CloudStat};
use crate::record::{Event, RecordDecoder, Shape};
use crate::rpc::{self, AcceptStat, CallHeader, Program, ReplyOutcome};
use crate::xdr::XdrReader;

/// A call that passed admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub xid: u32,
    pub proc_num: u32,
    /// The uid an AUTH_SYS credential claims; `None` for AUTH_NONE.
    pub sys_uid: Option<u32>,
    /// The arguments; for a streamed call, those before its opaque.
    pub args: Vec<u8>,
}

/// What a [`CallReader`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum CallEvent<'a> {
    /// A whole call to carry out.
    Call(Call),
    /// A call whose last argument, an opaque of `len` bytes, follows as
    /// `StreamData` and ends with `StreamEnd` (or `StreamBroken`).
    StreamStart {
        call: Call,
        len: u32,
    },
    StreamData(&'a [u8]),
    StreamEnd,
    /// The record ended inside the opaque: drop what was kept and send
    /// this GARBAGE_ARGS reply.
    StreamBroken(Vec<u8>),
    /// Send this reply: a refusal decided here.
    Reply(Vec<u8>),
    /// Send this reply, then close the connection: the peer broke a limit
    /// and nothing more it sends can be understood.
    ReplyAndClose(Vec<u8>),
    /// Close the connection once the replies queued so far are sent.
    Close,
}

/// The serving end of an RPC connection.
#[derive(Debug)]
pub struct CallReader {
    decoder: RecordDecoder,
    program: Program,
    max_record: usize,
    max_stream: u64,
    /// A streamed call being refused: its data is dropped and this event
    /// (the refusal) comes out when its record ends.
    refused: Option<CallEvent<'static>>,
    /// The xid of the streamed call in progress.
    streaming: Option<u32>,
}

impl CallReader {
    /// Serve `program`; buffer calls up to `max_record` bytes and stream
    /// opaques up to `max_stream` bytes.
    pub fn new(program: Program, max_record: usize, max_stream: u64) -> Self {
        CallReader {
            decoder: RecordDecoder::new(max_record, max_stream),
            program,
            max_record,
            max_stream,
            refused: None,
            streaming: None,
        }
    }

    /// True when no call is partly read.
    pub fn at_boundary(&self) -> bool {
        self.decoder.at_boundary()
    }

    /// True when the reader holds nothing a fresh one would not: between
    /// records, no stream in progress or being refused, not failed. Such a
    /// reader can be dropped and made again (`conn::Idle`).
    pub fn at_rest(&self) -> bool {
        self.decoder.at_boundary() && !self.decoder.failed() && self.refused.is_none() && self.streaming.is_none()
    }

    /// The caller will not take the streamed call that just started: its
    /// data is swallowed and `reply` comes out when it ends.
    pub fn refuse_stream(&mut self, reply: Vec<u8>) {
        self.refused = Some(CallEvent::Reply(reply));
    }

    /// Bytes of an admitted streamed call's opaque that come next on the
    /// wire, for the caller to move itself (`RecordDecoder::direct_len`);
    /// 0 while a refused call's data is swallowed, or between streams.
    pub fn direct_len(&self) -> u64 {
        match (self.streaming, &self.refused) {
            (Some(_), None) => self.decoder.direct_len(),
            _ => 0,
        }
    }

    /// At a fragment mark inside such an opaque: the mark's bytes still to
    /// come, for the caller to read alone (`RecordDecoder::mark_left_in_stream`).
    pub fn mark_left_in_stream(&self) -> usize {
        match (self.streaming, &self.refused) {
            (Some(_), None) => self.decoder.mark_left_in_stream(),
            _ => 0,
        }
    }

    /// `n` of those bytes were moved (`RecordDecoder::direct_taken`).
    pub fn direct_taken(&mut self, n: u64) {
        self.decoder.direct_taken(n);
    }

    /// Consume bytes until an event is ready or `input` is used up.
    /// Returns how many bytes were consumed; call again with the rest.
    pub fn read<'a>(&mut self, input: &'a [u8]) -> (usize, Option<CallEvent<'a>>) {
        let mut used = 0;
        loop {
            let (n, ev) = self.decoder.decode(&input[used..], &mut |head| rpc::call_shape(head, proto::call_stream_at));
            used += n;
            let Some(ev) = ev else { return (used, None) };
            if let Some(out) = self.on_record_event(ev) {
                return (used, Some(out));
            }
        }
    }

    fn on_record_event<'a>(&mut self, ev: Event<'a>) -> Option<CallEvent<'a>> {
        match ev {
            Event::Record(rec) => Some(self.admit(&rec).map_or_else(|refusal| refusal, CallEvent::Call)),
            Event::StreamStart { head, len } => match self.admit(&head[..head.len() - 4]) {
                Ok(call) => {
                    self.streaming = Some(call.xid);
                    Some(CallEvent::StreamStart { call, len })
                }
                Err(refusal) => {
                    // Swallow the opaque, then refuse.
                    self.refused = Some(refusal);
                    None
                }
            },
            Event::StreamData(data) if self.refused.is_none() => Some(CallEvent::StreamData(data)),
            Event::StreamData(_) => None,
            Event::StreamEnd => {
                self.streaming = None;
                Some(self.refused.take().unwrap_or(CallEvent::StreamEnd))
            }
            Event::Truncated => {
                let xid = self.streaming.take();
                self.refused.take().or_else(|| {
                    xid.map(|x| CallEvent::StreamBroken(rpc::accepted(x, AcceptStat::GarbageArgs).into_bytes()))
                })
            }
            Event::Discarded { head } => {
                // Only `call_shape` discards: an RPC version we do not speak.
                let xid = XdrReader::new(&head).u32().ok()?;
                self.streaming = None;
                Some(CallEvent::Reply(rpc::rpc_mismatch(xid)))
            }
            Event::TooLarge { head, what } => {
                // Inside a stream (endless empty fragments), the head is
                // gone: answer the streamed call.
                let xid = XdrReader::new(&head).u32().ok().or(self.streaming.take());
                let Some(xid) = xid else { return Some(CallEvent::Close) };
                let msg = match what {
                    "archive" => {
                        format!(
                            "archive too large: the limit is {} bytes (cloud-server --max-archive)",
                            self.max_stream
                        )
                    }
                    _ => format!("request too large: the limit is {} bytes per call", self.max_record),
                };
                let mut w = rpc::accepted(xid, AcceptStat::Success);
                proto::encode_error(&mut w, CloudStat::TooLarge, &msg);
                Some(CallEvent::ReplyAndClose(w.into_bytes()))
            }
        }
    }

    /// Decode and admit a call header. `Err` is the event that refuses it.
    fn admit(&self, record: &[u8]) -> Result<Call, CallEvent<'static>> {
        let h = CallHeader::decode(record).map_err(|_| match rpc::garbage_reply(record) {
            Some(reply) => CallEvent::Reply(reply),
            None => CallEvent::Close, // not even an xid: not RPC
        })?;
        rpc::admit(&h, &[self.program]).map_err(CallEvent::Reply)?;
        let sys_uid = match &h.cred {
            rpc::Credential::Sys(c) => Some(c.uid),
            _ => None,
        };
        Ok(Call { xid: h.xid, proc_num: h.proc_num, sys_uid, args: record[h.args_at..].to_vec() })
    }
}

/// What a [`ReplyReader`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyEvent<'a, K> {
    /// A whole reply to the call remembered as `call`: its results, or why
    /// the call failed at the RPC level.
    Reply {
        call: K,
        results: Result<Vec<u8>, String>,
    },
    /// A successful reply whose results end in a streamed opaque: `head`
    /// holds the results before it.
    StreamStart {
        call: K,
        head: Vec<u8>,
        len: u32,
    },
    StreamData(&'a [u8]),
    StreamEnd,
    /// The reply ended inside its opaque.
    StreamBroken,
    /// The peer sent something that is not a reply to us: close the link.
    Garbled(String),
}

/// The calling end of an RPC connection: pending calls by xid.
#[derive(Debug)]
pub struct ReplyReader<K> {
    decoder: RecordDecoder,
    pending: HashMap<u32, K>,
    /// For a pending call whose successful results end in a streamed
    /// opaque: the offset of its length word within the results.
    stream_at: fn(&K) -> Option<usize>,
}

impl<K> ReplyReader<K> {
    pub fn new(max_record: usize, max_stream: u64, stream_at: fn(&K) -> Option<usize>) -> Self {
        ReplyReader { decoder: RecordDecoder::new(max_record, max_stream), pending: HashMap::new(), stream_at }
    }

    /// Remember a call sent with this xid.
    pub fn expect(&mut self, xid: u32, call: K) {
        self.pending.insert(xid, call);
    }

    /// Calls still waiting for a reply.
    pub fn pending(&self) -> impl Iterator<Item = &K> {
        self.pending.values()
    }

    pub fn read<'a>(&mut self, input: &'a [u8]) -> (usize, Option<ReplyEvent<'a, K>>) {
        let (pending, stream_at) = (&self.pending, self.stream_at);
        let mut classify = |head: &[u8]| {
            let at = rpc::SUCCESS_HEADER_LEN;
            if head.len() < at {
                return Shape::NeedMore(at);
            }
            let word = |i: usize| u32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
            // Accepted, empty verifier, SUCCESS: the results follow at `at`.
            let plain_success = word(8) == 0 && word(16) == 0 && word(20) == 0;
            match pending.get(&word(0)).and_then(stream_at) {
                Some(off) if plain_success => Shape::Stream { len_at: at + off },
                _ => Shape::Whole,
            }
        };
        let (n, ev) = self.decoder.decode(input, &mut classify);
        let Some(ev) = ev else { return (n, None) };
        let out = match ev {
            Event::Record(rec) => match rpc::decode_reply(&rec) {
                Err(e) => ReplyEvent::Garbled(format!("undecodable reply: {e}")),
                Ok((xid, outcome)) => match self.pending.remove(&xid) {
                    None => ReplyEvent::Garbled(format!("reply to an unknown xid {xid:#x}")),
                    Some(call) => {
                        let results = match outcome {
                            ReplyOutcome::Success { results_at } => Ok(rec[results_at..].to_vec()),
                            ReplyOutcome::Failed(why) | ReplyOutcome::Denied(why) => Err(why),
                        };
                        ReplyEvent::Reply { call, results }
                    }
                },
            },
            Event::StreamStart { head, len } => {
                let xid = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                match self.pending.remove(&xid) {
                    Some(call) => {
                        let results = head[rpc::SUCCESS_HEADER_LEN..head.len() - 4].to_vec();
                        ReplyEvent::StreamStart { call, head: results, len }
                    }
                    None => ReplyEvent::Garbled(format!("reply to an unknown xid {xid:#x}")),
                }
            }
            Event::StreamData(d) => ReplyEvent::StreamData(d),
            Event::StreamEnd => ReplyEvent::StreamEnd,
            Event::Truncated => ReplyEvent::StreamBroken,
            Event::TooLarge { what, .. } => ReplyEvent::Garbled(format!("{what} too large")),
            Event::Discarded { .. } => ReplyEvent::Garbled("a record that is not a reply".into()),
        };
        (n, Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{CLOUD_PROGRAM, DEPLOY};
    use crate::record::frame;

    fn reader() -> CallReader {
        CallReader::new(CLOUD_PROGRAM, 1024, 100)
    }

    /// Feed `wire` in chunks of `chunk` bytes; collect owned events.
    fn run(r: &mut CallReader, wire: &[u8], chunk: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut data = Vec::new();
        for piece in wire.chunks(chunk) {
            let mut rest = piece;
            loop {
                let (n, ev) = r.read(rest);
                rest = &rest[n..];
                match ev {
                    None => break,
                    Some(CallEvent::StreamData(d)) => data.extend_from_slice(d),
                    Some(CallEvent::StreamEnd) => out.push(format!("end {:?}", String::from_utf8_lossy(&data))),
                    Some(ev) => out.push(format!("{ev:?}")),
                }
            }
        }
        out
    }

    fn deploy(xid: u32, replicas: u32, archive: &[u8]) -> Vec<u8> {
        let mut w = rpc::call(xid, proto::CLOUD_PROG, 1, DEPLOY);
        w.u32(replicas).opaque(archive);
        w.into_bytes()
    }

    #[test]
    fn a_streamed_deploy_reads_the_same_in_any_chunking() {
        let wire = frame(&deploy(7, 2, b"0123456789"));
        for chunk in [1, 3, wire.len()] {
            let events = run(&mut reader(), &wire, chunk);
            assert_eq!(
                events,
                vec![
                    format!(
                        "{:?}",
                        CallEvent::StreamStart {
                            call: Call { xid: 7, proc_num: 1, sys_uid: None, args: vec![0, 0, 0, 2] },
                            len: 10
                        }
                    ),
                    "end \"0123456789\"".to_string(),
                ]
            );
        }
    }

    #[test]
    fn refusals_come_out_as_replies() {
        let mut call = rpc::call(9, proto::CLOUD_PROG, 1, 0).into_bytes();
        call[8..12].copy_from_slice(&3u32.to_be_bytes()); // rpcvers 3
        let mut r = reader();
        let wire = frame(&call);
        let (n, ev) = r.read(&wire);
        let Some(CallEvent::Reply(bytes)) = ev else { panic!("{ev:?}") };
        assert_eq!(&bytes[8..], &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2]);
        assert_eq!(r.read(&wire[n..]), (wire.len() - n, None), "the rest of the record is dropped");
        let wire = frame(&rpc::call(10, proto::CLOUD_PROG, 1, 99).into_bytes());
        let (_, ev) = r.read(&wire);
        assert!(matches!(ev, Some(CallEvent::Reply(b)) if b[20..] == [0, 0, 0, 3]), "PROC_UNAVAIL");
    }

    #[test]
    fn a_refused_stream_is_swallowed_then_answered() {
        let mut r = reader();
        let wire = frame(&deploy(5, 9, b"abc"));
        let (n, ev) = r.read(&wire);
        assert!(matches!(ev, Some(CallEvent::StreamStart { .. })));
        r.refuse_stream(b"no".to_vec());
        let (_, ev) = r.read(&wire[n..]);
        assert_eq!(ev, Some(CallEvent::Reply(b"no".to_vec())));
    }

    #[test]
    fn a_streamed_deploy_of_another_rpc_version_is_rpc_mismatch() {
        let mut call = deploy(8, 1, &[7u8; 90]);
        call[8..12].copy_from_slice(&3u32.to_be_bytes());
        let mut wire = frame(&call);
        wire.extend(frame(&rpc::call(9, proto::CLOUD_PROG, 1, 0).into_bytes()));
        for chunk in [1, 7, wire.len()] {
            let events = run(&mut reader(), &wire, chunk);
            let mismatch = format!("{:?}", CallEvent::Reply(rpc::rpc_mismatch(8)));
            assert_eq!(events.len(), 2, "{events:?}");
            assert_eq!(events[0], mismatch);
            assert!(events[1].starts_with("Call(Call { xid: 9"), "{events:?}");
        }
    }

    #[test]
    fn empty_fragments_inside_an_upload_are_too_large_for_that_call() {
        let call = deploy(4, 1, b"0123456789");
        // One fragment up to the opaque's first 2 bytes, then empty ones.
        let mut wire = 50u32.to_be_bytes().to_vec();
        wire.extend_from_slice(&call[..50]);
        wire.extend(std::iter::repeat_n([0u8; 4], 1000).flatten());
        let events = run(&mut reader(), &wire, 64);
        assert!(events[0].starts_with("StreamStart"), "{events:?}");
        let last = events.last().unwrap();
        assert!(last.starts_with("ReplyAndClose([0, 0, 0, 4,"), "answered to xid 4: {last}");
    }

    #[test]
    fn too_large_is_answered_then_closed() {
        let events = run(&mut reader(), &frame(&deploy(5, 1, &[1u8; 200])), 64);
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].starts_with("ReplyAndClose("), "{events:?}");
    }

    #[test]
    fn bytes_that_are_not_rpc_close_the_connection() {
        // A record too short to hold an xid.
        assert_eq!(run(&mut reader(), &frame(b"GE"), 100), vec!["Close".to_string()]);
    }

    #[test]
    fn a_record_cut_inside_the_opaque_is_garbage_args() {
        let mut payload = deploy(6, 1, b"0123456789");
        payload.truncate(payload.len() - 6);
        let events = run(&mut reader(), &frame(&payload), 5);
        let garbage = rpc::accepted(6, AcceptStat::GarbageArgs).into_bytes();
        assert_eq!(events.last().unwrap(), &format!("{:?}", CallEvent::StreamBroken(garbage)));
    }

    proptest::proptest! {
        /// Hostile bytes never panic the reader, whatever their chunking;
        /// and garbage after a valid call prefix still yields events or waits.
        #[test]
        fn arbitrary_bytes_never_panic(
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
            chunk in 1usize..64,
            prefix in proptest::prelude::any::<bool>(),
        ) {
            let mut wire = if prefix { frame(&deploy(1, 1, b"abc")) } else { Vec::new() };
            wire.extend_from_slice(&noise);
            let _ = run(&mut reader(), &wire, chunk);
            let mut r: ReplyReader<Sent> = ReplyReader::new(1024, 1 << 20, fetch_streams);
            r.expect(0, Sent::Fetch);
            let mut rest = &wire[..];
            while !rest.is_empty() {
                let (n, ev) = r.read(rest);
                rest = &rest[n..];
                if ev.is_none() {
                    break;
                }
            }
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Sent {
        Ping,
        Fetch,
    }

    fn fetch_streams(k: &Sent) -> Option<usize> {
        (*k == Sent::Fetch).then_some(4)
    }

    #[test]
    fn replies_match_their_calls_and_fetches_stream() {
        let mut r = ReplyReader::new(1024, 1 << 20, fetch_streams);
        r.expect(1, Sent::Ping);
        r.expect(2, Sent::Fetch);
        let mut fetch = rpc::accepted(2, AcceptStat::Success);
        fetch.u32(0).opaque(b"output!");
        let mut wire = frame(&fetch.into_bytes());
        wire.extend(frame(&rpc::accepted(1, AcceptStat::Success).into_bytes()));
        let mut rest = &wire[..];
        let mut seen = Vec::new();
        loop {
            let (n, ev) = r.read(rest);
            rest = &rest[n..];
            match ev {
                None => break,
                Some(ReplyEvent::StreamData(d)) => seen.push(format!("data {}", String::from_utf8_lossy(d))),
                Some(ev) => seen.push(format!("{ev:?}")),
            }
        }
        assert_eq!(
            seen,
            vec![
                "StreamStart { call: Fetch, head: [0, 0, 0, 0], len: 7 }".to_string(),
                "data output!".into(),
                "StreamEnd".into(),
                "Reply { call: Ping, results: Ok([]) }".into(),
            ]
        );
        assert_eq!(r.pending().count(), 0);
        let wire = frame(&rpc::accepted(3, AcceptStat::Success).into_bytes());
        let (_, ev) = r.read(&wire);
        assert!(matches!(ev, Some(ReplyEvent::Garbled(_))), "unknown xid");
    }
}

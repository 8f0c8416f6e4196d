//! The main server role: client calls in, coordinator actions out.
//!
//! Owns: turning each CLOUD_PROG call into a coordinator call (the
//! caller's identity from `peer`, a retried DEPLOY or CLOSE answered from
//! the coordinator's duplicate request cache); a DEPLOY's archive streamed
//! to `<work-dir>/spool`, fed to `archive_check` as it arrives (refused
//! with CLOUD_BAD_ARCHIVE, spool file removed, no ticket) and answered
//! only once its ticket number is persisted (`tickets`); the coordinator's
//! actions turned into replies (encoded here) and node calls ([`Out`]):
//! a NODE_RUN/FETCH/DROP on a link's connection, or a direct call into the
//! in-process node service for a local node; a link's replies and the
//! node service's [`NodeEvent`]s turned back into coordinator events; a
//! lost link reported to the coordinator; the journal (`journal`): the
//! coordinator's records appended and synced once per reactor turn before
//! that turn's DEPLOY and CLOSE answers go out (they are held until then),
//! a lazy sync within a second for the others, compaction, and at start
//! the journal's jobs restored and the spool cleared of all but their
//! archives (kept across a restart and a clean stop alike).
//! Must not touch: the poll or the slab (the reactor carries out each
//! `Out`), job rules (`coordinator`), a node's replicas (`node_service`).

use std::collections::HashSet;
use std::fs::{self, File};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use crate::archive_check::ArchiveCheck;
use crate::conn::{Conn, Pending, Role, Sink, Streamed};
use crate::coordinator::{Action, Caller, Coordinator, Failure, NodeCall, OutputRef, Reply};
use crate::journal::{Journal, Record};
use crate::node_service::{garbage, NodeEvent};
use crate::peer::{self, PeerId};
use crate::proto::{self, CloudStat, RunResult};
use crate::record::{self, Piece};
use crate::rpc::{self, AcceptStat};
use crate::scheduler::NodeId;
use crate::session::{Call, ReplyEvent};
use crate::tickets::TicketStore;
use crate::xdr::XdrReader;

/// How the main server reaches node i.
#[derive(Debug)]
pub(crate) enum Link {
    /// In this process: direct calls into the node service.
    Local,
}

/// What the reactor must do to carry out one coordinator action.
#[derive(Debug)]
pub(crate) enum Out {
    /// Answer a client's call on connection `key`.
    Answer { key: usize, pieces: Vec<Piece> },
    /// A call into the in-process node service.
    Local { node: NodeId, call: NodeCall },
}

pub(crate) struct MainService {
    pub(crate) coord: Coordinator,
    pub(crate) spool: PathBuf,
    pub(crate) node_names: Vec<String>,
    pub(crate) links: Vec<Link>,
    /// The uids replicas run as (slot uids, or `--run-as`): a job (with
    /// `--allow-network`) calling its own server is refused, or it could
    /// deploy jobs that outlive its ticket, owned by a uid its deployer
    /// cannot close, and reach tickets of the uid's earlier tenants.
    pub(crate) job_uids: Vec<u32>,
    pub(crate) tickets: TicketStore,
    /// The rules a DEPLOY's archive is checked against as it arrives.
    pub(crate) extract_limits: crate::extract::ExtractLimits,
    pub(crate) next_spool: u64,
    /// The job state on disk (`<work-dir>/journal`).
    pub(crate) journal: Journal,
    /// DEPLOY and CLOSE answers of this turn, sent once their journal
    /// records are durable (`end_of_turn`).
    pub(crate) held: Vec<(Caller, Reply)>,
    /// When buffered records that no answer waits for are synced.
    pub(crate) sync_at: Option<Instant>,
}

/// Records no answer waits for (a replica started or ended, an expiry)
/// are synced within this.
const LAZY_SYNC: Duration = Duration::from_secs(1);

impl MainService {
    /// Carry out one coordinator action, or say what the reactor must do.
    pub(crate) fn perform(&mut self, action: Action) -> Option<Out> {
        match action {
            Action::Reply { to, reply } => {
                if matches!(&reply, Reply::Deploy(Ok(_)) | Reply::Close(Ok(_))) {
                    log::debug!("connection {}: xid {:#x}: {reply:?}", to.conn, to.xid);
                    // Not before its record is on disk (end of this turn).
                    self.held.push((to, reply));
                    return None;
                }
                Some(Out::Answer { key: to.conn, pieces: encode_reply(to.xid, reply) })
            }
            Action::RemoveFile(path) => {
                if let Err(e) = fs::remove_file(&path) {
                    log::warn!("cannot remove {}: {e}", path.display());
                }
                None
            }
            Action::Node { node, call } => match self.links[node] {
                Link::Local => Some(Out::Local { node, call }),
            },
        }
    }

    /// What an in-process node answered.
    pub(crate) fn on_node_event(&mut self, ev: NodeEvent) {
        match ev {
            NodeEvent::RunFinished { node, ticket, result } => {
                self.coord.run_finished(node, ticket, result, Instant::now())
            }
            NodeEvent::Fetched { ticket, replica, result } => match result {
                Ok(path) => self.coord.fetched(ticket, replica, Ok(path)),
                // Missing for good: final, the message says so.
                Err((true, why)) => self.coord.fetched(ticket, replica, Err(why)),
                Err((false, why)) => self.coord.fetch_failed(ticket, replica, &why),
            },
        }
    }

    /// Journaling, at the end of a reactor turn: append what the
    /// coordinator recorded, sync once if an answer waits for it (or the
    /// lazy sync is due), then release the held DEPLOY and CLOSE answers.
    /// If the sync fails, a held DEPLOY's job is dropped and answered
    /// CLOUD_INTERNAL (its `Closed` record follows the `Deployed` one, so
    /// a later sync cannot bring it back), a held CLOSE is answered
    /// CLOUD_INTERNAL too. Compacts the journal when due.
    pub(crate) fn end_of_turn(&mut self, now: Instant) -> Vec<Out> {
        self.append_records();
        if !self.journal.has_pending() {
            self.sync_at = None;
        } else if self.sync_at.is_none() {
            self.sync_at = Some(now + LAZY_SYNC);
        }
        let due = !self.held.is_empty() || self.sync_at.is_some_and(|t| t <= now);
        if !due {
            return Vec::new();
        }
        let synced = self.journal.sync();
        let held = std::mem::take(&mut self.held);
        let mut outs = Vec::with_capacity(held.len());
        match synced {
            Ok(()) => {
                self.sync_at = None;
                for (to, reply) in held {
                    outs.push(Out::Answer { key: to.conn, pieces: encode_reply(to.xid, reply) });
                }
                match self.journal.compact_if_due() {
                    Ok(true) => log::info!("journal compacted to {} bytes", self.journal.len()),
                    Ok(false) => {}
                    Err(e) => log::warn!("cannot compact the journal: {e}"),
                }
            }
            Err(e) => {
                log::error!("cannot write the journal: {e}; deploys and closes of this moment are refused");
                self.sync_at = Some(now + LAZY_SYNC);
                let failure = |what: &str| {
                    (CloudStat::Internal, format!("the server cannot record {what} on disk ({e}); retry later"))
                };
                for (to, reply) in held {
                    let reply = match reply {
                        Reply::Deploy(Ok(ticket)) => {
                            self.coord.abandon(to, ticket);
                            Reply::Deploy(Err(failure("the job")))
                        }
                        _ => Reply::Close(Err(failure("the close"))),
                    };
                    outs.push(Out::Answer { key: to.conn, pieces: encode_reply(to.xid, reply) });
                }
                self.append_records();
            }
        }
        outs
    }

    /// Move the coordinator's records into the journal's buffer, stamped.
    fn append_records(&mut self) {
        let mut secs = None;
        while let Some(mut rec) = self.coord.poll_record() {
            let secs = *secs.get_or_insert_with(|| {
                SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
            });
            match &mut rec {
                Record::Deployed { submitted: t, .. }
                | Record::Started { at: t, .. }
                | Record::Finished { ended: t, .. } => *t = secs,
                Record::Closed { .. } => {}
            }
            if let Err(why) = self.journal.append(&rec) {
                log::warn!("journal: record not written ({why}): {rec:?}");
            }
        }
    }

    /// When `end_of_turn` must run at the latest (a lazy sync).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.sync_at
    }

    /// At start: put back the journal's jobs into the coordinator, journal
    /// what the restart decided, and clear the spool of everything the
    /// restored jobs do not need (uploads cut short, fetched outputs).
    /// Returns the line for the log, if there was anything to restore.
    pub(crate) fn restore(&mut self, now: Instant) -> Result<Option<String>, String> {
        let links = &self.links;
        let r = self.coord.restore(self.journal.live(), |n| !matches!(links.get(n), Some(Link::Local) | None), now);
        let mut line = None;
        if r.jobs + r.skipped > 0 {
            line = Some(format!(
                "restored {} jobs from the journal: {} replicas queued, {} finished, {} running elsewhere, \
                 {} lost with the restart, {} requeued{}",
                r.jobs,
                r.queued,
                r.finished,
                r.running,
                r.lost,
                r.requeued,
                if r.skipped > 0 { format!(", {} left out", r.skipped) } else { String::new() }
            ));
        }
        self.append_records();
        self.journal.sync().map_err(|e| format!("cannot write the journal: {e}"))?;
        let kept: HashSet<PathBuf> = self.coord.kept_archives().cloned().collect();
        for path in &kept {
            if !path.exists() {
                log::warn!("{}: the archive of a queued job is missing; its replicas will fail", path.display());
            }
            // Spool names go on from the highest kept one.
            let n = path.file_name().and_then(|f| f.to_str()).and_then(|f| f.rsplit('-').next()?.parse::<u64>().ok());
            self.next_spool = self.next_spool.max(n.unwrap_or(0));
        }
        self.sweep_spool(&kept);
        self.coord.start_restored();
        Ok(line)
    }

    /// Remove every spool entry not in `kept`.
    fn sweep_spool(&self, kept: &HashSet<PathBuf>) {
        let Ok(entries) = fs::read_dir(&self.spool) else { return };
        let mut removed = 0;
        for e in entries.flatten() {
            let path = e.path();
            if kept.contains(&path) {
                continue;
            }
            let gone = match e.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
            match gone {
                Ok(()) => removed += 1,
                Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
            }
        }
        if removed > 0 {
            log::debug!("removed {removed} stale files from {}", self.spool.display());
        }
    }

    /// A link to node i is up (the link code calls this once it can carry
    /// calls): after a restart, the replicas restored as running there are
    /// asked for with NODE_WAIT; then it takes work.
    #[allow(dead_code)] // called by the remote-node link code (branch `split`)
    pub(crate) fn on_link_up(&mut self, node: NodeId) {
        self.coord.link_up(node, Instant::now());
    }

    /// A link to node i is gone: its running replica is lost.
    pub(crate) fn link_lost(&mut self, node: NodeId) {
        self.coord.node_down(node, Instant::now());
    }

    /// A whole call from a client of the main server.
    pub(crate) fn client_call(&mut self, key: usize, conn: &mut Conn, call: Call) {
        let caller = Caller { conn: key, xid: call.xid };
        let mut r = XdrReader::new(&call.args);
        log::debug!("connection {key}: call xid {:#x} proc {}", call.xid, call.proc_num);
        let who = match self.identify_call(key, conn, &call) {
            Ok(who) => who,
            Err(refusal) => return conn.outbox.push_bytes(refusal),
        };
        // STATUS, RETRIEVE and CLOSE are answered by the coordinator.
        conn.awaiting += 1;
        let ok = match call.proc_num {
            proto::CLOUD_NULL => {
                conn.awaiting -= 1;
                conn.outbox.push_bytes(rpc::accepted(call.xid, AcceptStat::Success).into_bytes());
                true
            }
            proto::STATUS => r.u32().map(|t| self.coord.status(caller, t)).is_ok(),
            proto::RETRIEVE => {
                proto::decode_retrieve_args(&mut r).map(|(t, w)| self.coord.retrieve(caller, who, t, w)).is_ok()
            }
            proto::CLOSE => r.u32().map(|t| self.coord.close(caller, who, t, Instant::now())).is_ok(),
            proto::DEPLOY | proto::DEPLOY_OPTS => false, // too short to stream
            _ => {
                // Numbers below DEPLOY_OPTS that do not exist (yet).
                conn.awaiting -= 1;
                return conn.outbox.push_bytes(rpc::accepted(call.xid, AcceptStat::ProcUnavail).into_bytes());
            }
        };
        if !ok {
            conn.awaiting -= 1;
            conn.outbox.push_bytes(garbage(call.xid));
        }
    }

    /// The uid a client call is made as (`None`: anonymous), or the
    /// AUTH_ERROR reply to a credential that lies about it.
    fn identify_call(&self, key: usize, conn: &Conn, call: &Call) -> Result<Option<u32>, Vec<u8>> {
        if let PeerId::Verified(uid) = conn.peer {
            if self.job_uids.contains(&uid) {
                log::warn!("connection {key}: xid {:#x}: a call from uid {uid}, a replica's: refused", call.xid);
                return Err(rpc::auth_error(call.xid, rpc::AUTH_TOOWEAK));
            }
        }
        peer::caller_uid(conn.peer, call.sys_uid).map_err(|auth_stat| {
            let owner = match conn.peer {
                PeerId::Verified(uid) => format!("uid {uid}"),
                _ => "an unknown user".into(),
            };
            log::warn!(
                "connection {key}: xid {:#x}: AUTH_SYS claims uid {} but the socket belongs to {owner}; refused",
                call.xid,
                call.sys_uid.unwrap_or(0)
            );
            rpc::auth_error(call.xid, auth_stat)
        })
    }

    /// A client's DEPLOY starts streaming its archive: refuse it now, or
    /// spool it (checked as it arrives).
    pub(crate) fn deploy_start(&mut self, key: usize, conn: &mut Conn, call: Call, len: u32) {
        let mut r = XdrReader::new(&call.args);
        let Ok(replicas) = r.u32() else { return conn.outbox.push_bytes(garbage(call.xid)) };
        // DEPLOY_OPTS carries flags after the replicas; unknown bits are refused.
        let flags = if call.proc_num == proto::DEPLOY_OPTS { r.u32().ok() } else { Some(0) };
        let Some(flags @ (0 | proto::DEPLOY_FAIL_FAST)) = flags else {
            return conn.answer_before_upload(len, garbage(call.xid));
        };
        let who = match self.identify_call(key, conn, &call) {
            Ok(who) => who,
            Err(refusal) => return conn.answer_before_upload(len, refusal),
        };
        if let Some(ticket) = self.coord.retried_deploy(call.xid, who, Instant::now()) {
            log::info!(
                "connection {key}: xid {:#x} is a retried DEPLOY; answering ticket {ticket} again, archive dropped",
                call.xid
            );
            let mut w = rpc::accepted(call.xid, AcceptStat::Success);
            w.u32(CloudStat::Ok as u32).u32(ticket);
            return conn.answer_before_upload(len, w.into_bytes());
        }
        // A network peer's AUTH_SYS uid is only a claim: it cannot
        // make it the server's own user (or root) where only that
        // user may deploy (a server without root).
        let verified = conn.peer != PeerId::Remote;
        if let Some(failure) = self.coord.deploy_refusal(who, verified, replicas) {
            return conn.answer_before_upload(len, failure_reply(call.xid, &failure));
        }
        let what = Streamed::Deploy { replicas, flags, who, check: Box::new(ArchiveCheck::new(self.extract_limits)) };
        log::debug!("connection {key}: xid {:#x}: receiving a {len} byte archive", call.xid);
        self.next_spool += 1;
        conn.sink = Sink::open(call.xid, what, self.spool.join(format!("incoming-{key}-{}", self.next_spool)));
    }

    /// A chunk of a DEPLOY's archive, checked before it is spooled. Returns
    /// true if it was refused (answered, the connection closing).
    pub(crate) fn deploy_data(&mut self, key: usize, conn: &mut Conn, data: &[u8]) -> bool {
        if let Sink::File { xid, what: Streamed::Deploy { check, .. }, error: None, .. } = &mut conn.sink {
            if let Err(why) = check.feed(data) {
                // Refused mid-stream (a bomb, a traversal, not gzip):
                // answer now and hang up rather than take the rest.
                log::info!("connection {key}: deploy refused: {why}");
                let reply = encode_reply(*xid, Reply::Deploy(Err((CloudStat::BadArchive, why.0))));
                conn.sink.discard();
                conn.outbox.push(reply);
                conn.close_after_answer();
                return true;
            }
        }
        false
    }

    /// The end of a streamed DEPLOY archive (a client) or NODE_FETCH output
    /// (a link).
    pub(crate) fn stream_end(&mut self, key: usize, conn: &mut Conn) {
        let Sink::File { xid, what, file, path, error } = std::mem::replace(&mut conn.sink, Sink::None) else {
            return;
        };
        drop(file);
        match what {
            Streamed::Fetch { ticket, replica, gone } => match error {
                Some(why) if !gone => {
                    let _ = fs::remove_file(&path);
                    self.coord.fetch_failed(ticket, replica, &why);
                }
                error => self.coord.fetched(ticket, replica, error.map_or(Ok(path), Err)),
            },
            Streamed::Deploy { replicas, flags, who, mut check } => {
                // The same call may have been uploaded on two connections at
                // once (a retry while the first upload was still arriving):
                // the one that ends second gets the first one's reply.
                if let Some(ticket) = self.coord.retried_deploy(xid, who, Instant::now()) {
                    log::info!("connection {key}: xid {xid:#x} was uploaded twice; answering as the first time");
                    let _ = fs::remove_file(&path);
                    return conn.outbox.push(encode_reply(xid, Reply::Deploy(Ok(ticket))));
                }
                let refusal = match (error, check.finish()) {
                    (Some(msg), _) => Some((CloudStat::Internal, msg)),
                    (None, Err(why)) => {
                        log::info!("connection {key}: deploy refused: {why}");
                        Some((CloudStat::BadArchive, why.0))
                    }
                    // The ticket this DEPLOY may get is on disk before it is answered.
                    (None, Ok(_)) => self.tickets.ensure(self.coord.next_ticket()).err().map(|e| {
                        log::error!("cannot persist the ticket counter: {e}");
                        (CloudStat::Internal, format!("the server cannot record ticket numbers ({e}); retry later"))
                    }),
                };
                match refusal {
                    Some(failure) => {
                        let _ = fs::remove_file(&path);
                        conn.outbox.push(encode_reply(xid, Reply::Deploy(Err(failure))));
                    }
                    None => {
                        conn.awaiting += 1;
                        self.coord.deploy_opts(Caller { conn: key, xid }, who, replicas, flags, path, Instant::now())
                    }
                }
            }
            Streamed::Run { .. } => {} // a node's, never a main server's
        }
    }

    /// Handle what the main server's link to a node read.
    pub(crate) fn on_reply_event(&mut self, conn: &mut Conn, ev: ReplyEvent<Pending>) {
        let Role::NodeLink { node, .. } = conn.role else { return };
        let name = &self.node_names[node];
        match ev {
            ReplyEvent::Reply { call: Pending::Run(ticket), results } => {
                let result = results
                    .and_then(|b| RunResult::decode(&mut XdrReader::new(&b)).map_err(|e| e.to_string()))
                    .unwrap_or_else(|why| RunResult::invalid(format!("node {name}: {why}")));
                self.coord.run_finished(node, ticket, result, Instant::now());
            }
            ReplyEvent::Reply { call: Pending::Fetch { ticket, replica, .. }, results } => {
                let why = results.err().unwrap_or_else(|| "the node sent no output".into());
                self.coord.fetched(ticket, replica, Err(why));
            }
            ReplyEvent::Reply { call: Pending::Drop, .. } => {}
            ReplyEvent::StreamStart { call: Pending::Fetch { ticket, replica, into }, head, .. } => {
                let stat = XdrReader::new(&head).u32().unwrap_or(u32::MAX);
                let gone = stat == CloudStat::NoSuchTicket as u32;
                let what = Streamed::Fetch { ticket, replica, gone };
                conn.sink = if gone {
                    // The opaque holds the node's error message.
                    Sink::failed(0, what, format!("node {name} has no output for ticket {ticket}"))
                } else if stat != CloudStat::Ok as u32 {
                    Sink::failed(0, what, format!("node {name} cannot open the output now"))
                } else {
                    Sink::open(0, what, into)
                };
            }
            ReplyEvent::StreamStart { .. } => conn.sink = Sink::None,
            ReplyEvent::StreamData(data) => conn.sink.write(data),
            ReplyEvent::StreamEnd => self.stream_end(0, conn),
            ReplyEvent::StreamBroken => {
                if let Sink::File { what: Streamed::Fetch { ticket, replica, .. }, .. } = conn.sink.discard() {
                    self.coord.fetch_failed(ticket, replica, &format!("node {name}'s reply was cut short"));
                }
            }
            ReplyEvent::Garbled(why) => {
                log::error!("node {name}: {why}; dropping the link");
                conn.closing = true;
            }
        }
    }

    /// Shutdown: journal what is buffered, keep the archives of queued
    /// jobs (they run after a restart) and remove the rest of the spool,
    /// give back unused ticket numbers.
    pub(crate) fn stop(&mut self) {
        self.append_records();
        if let Err(e) = self.journal.sync() {
            log::error!("cannot write the journal: {e}");
        }
        let kept: HashSet<PathBuf> = self.coord.kept_archives().cloned().collect();
        self.sweep_spool(&kept);
        if let Err(e) = self.tickets.release(self.coord.next_ticket()) {
            log::warn!("cannot give back unused ticket numbers: {e}");
        }
    }
}

/// Encode a CLOUD_PROG result; RETRIEVE outputs are streamed from their files.
pub fn encode_reply(xid: u32, reply: Reply) -> Vec<Piece> {
    let mut w = rpc::accepted(xid, AcceptStat::Success);
    let ok = CloudStat::Ok as u32;
    match reply {
        Reply::Deploy(Ok(ticket)) => {
            w.u32(ok).u32(ticket);
        }
        Reply::Status(Ok(st)) => {
            w.u32(ok);
            st.encode(&mut w);
        }
        Reply::Close(Ok(())) => {
            w.u32(ok);
        }
        Reply::Retrieve(Ok(outs)) => return retrieve_pieces(xid, outs),
        Reply::Deploy(Err(e)) | Reply::Status(Err(e)) | Reply::Retrieve(Err(e)) | Reply::Close(Err(e)) => {
            return vec![Piece::Bytes(failure_reply(xid, &e))]
        }
    }
    vec![Piece::Bytes(w.into_bytes())]
}

/// A CLOUD_PROG error result for call `xid`.
fn failure_reply(xid: u32, (stat, msg): &Failure) -> Vec<u8> {
    let mut w = rpc::accepted(xid, AcceptStat::Success);
    proto::encode_error(&mut w, *stat, msg);
    w.into_bytes()
}

/// RETRIEVE's OK reply. Every output is opened now, so the reply is OK only
/// if all of them can be sent (a queued reply holds at most one descriptor
/// per replica); if one cannot, the reply is an error, the spooled outputs
/// stay, and a retry may succeed.
fn retrieve_pieces(xid: u32, outs: Vec<OutputRef>) -> Vec<Piece> {
    let mut w = rpc::accepted(xid, AcceptStat::Success);
    w.u32(CloudStat::Ok as u32).u32(outs.len() as u32);
    let mut pieces = Vec::new();
    for out in outs {
        out.status.encode(&mut w);
        if out.path.as_os_str().is_empty() {
            w.u32(0); // never ran, or lost with its node: the message says so
            continue;
        }
        let opened = File::open(&out.path).and_then(|f| f.metadata().map(|m| (f, m.len())));
        match opened {
            Ok((file, len)) => w = record::push_opaque(&mut pieces, w, Piece::File { file, len }),
            Err(e) => {
                log::warn!("cannot open {}: {e}", out.path.display());
                let why = match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE) => "the server is out of file descriptors".to_string(),
                    _ => e.to_string(),
                };
                let failure = (CloudStat::Internal, format!("could not read the outputs: {why}; retry"));
                return vec![Piece::Bytes(failure_reply(xid, &failure))];
            }
        }
    }
    pieces.push(Piece::Bytes(w.into_bytes()));
    pieces
}

//! The main server's job state on disk, so that every ticket still answers
//! after a crash (kill -9) or a restart.
//!
//! Owns: `<work-dir>/journal` (and `journal.new` while compacting), an
//! append-only file of records: what was deployed, started, finished and
//! closed. Pure functions encode, decode and replay it ([`encode_record`],
//! [`replay`], [`encode_live`], [`apply`]); [`Journal`] is the thin file
//! layer. Must not touch: the job table, the scheduler, nodes, sockets.
//! The coordinator turns its decisions into [`Record`]s, the main service
//! appends and syncs them, and replays [`Live`] into the coordinator at
//! start (`Coordinator::restore`).
//!
//! Format: 8 bytes of magic `CLDJRNL1`, then records, each
//! `len: u32 BE | crc: u32 BE | payload` where `crc` is CRC-32 (IEEE) of
//! the length word and the payload, and the payload is XDR: a tag and the
//! record's fields (u64 as two words, high first; `owner` as an XDR
//! optional). A payload is at most [`MAX_RECORD`] bytes. After the last
//! record, zeros: room written ahead ([`PREALLOCATE`]), which replay
//! takes for the end of the records, not for damage.
//!
//! Durability (for the wiring): [`Journal::append`] only buffers (and
//! updates [`Journal::live`]); [`Journal::sync`] writes what is buffered at
//! the end of the valid file and fdatasyncs it. The same in two halves,
//! for a sync made by another process (the main service's `syncer`, so
//! the reactor never waits for the disk): [`Journal::write_pending`], then
//! `fdatasync` of [`Journal::fd`] elsewhere, then [`Journal::synced`] with
//! its outcome; records appended in between wait for the next sync. At the end of a reactor
//! turn, if [`Journal::sync_due`] (a `Deployed` or `Closed` is buffered),
//! call `sync` once, then send that turn's DEPLOY replies: a client never
//! holds a ticket the journal does not. The main service waits for the
//! sync before a CLOSE reply only when the close dropped a ticket on a
//! remote or Slurm node; a close on the server's own nodes is answered at
//! once, and its outputs go back to their pools only after the sync, so a
//! crash that loses the `Closed` brings the ticket back whole (closable
//! again), never without its output. `Started` and `Finished` do not wait
//! either: they ride along with the next sync, or a reactor timer (about
//! 1 s, armed only while [`Journal::has_pending`]) syncs them; losing them
//! in a crash means a replica is seen at an earlier state (below). So a
//! job costs one fdatasync, shared by everything else in the same turns
//! (measured on this project's CI-like VM: about 3.3 ms each). If `sync` fails, the
//! records stay buffered and are written again (at the same offset) by the
//! next `sync`: answer the DEPLOYs of that turn CLOUD_INTERNAL, and append
//! `Closed` for their tickets so a later sync does not bring back a job its
//! client was told failed.
//!
//! Replay: records are read until the first one that is torn or whose CRC
//! is wrong (a crash mid-write, or damage); the file is truncated there and
//! the number of bytes dropped is reported for the log. A record whose CRC
//! is right but that does not decode (a newer version's file) stops the
//! server with a message instead: truncating would destroy good data. A
//! record that contradicts the state (e.g. `Started` for a ticket never
//! deployed or closed) is counted and skipped. Crash during compaction:
//! `journal.new` is left over, `journal` is intact; `open` removes the
//! former.
//!
//! What a restart does with each replica, by its last record (the wiring's
//! contract; [`ReplicaLog::at_restart`] names the case):
//! - no `Started`, no `Finished`: **queued**. Its job goes back in the wait
//!   queue, jobs in ticket order, and starts again as nodes free up. Its
//!   archive (`archive`) must still be there: spooled archives of jobs not
//!   closed are kept across a restart.
//! - `Finished`: **finished**. Its state, exit code and message stand; its
//!   output stays retrievable from the node named in its `Started` (the node
//!   keeps `output_<port>/<ticket>/` of live tickets across the restart).
//! - `Started`, no `Finished`: **running at the crash**. On a node the main
//!   server hosts itself, it died with the server (PDEATHSIG): the replica
//!   becomes INVALID "server restarted" (append `Finished`). On a remote
//!   node it may still run: it stays RUNNING and the node reports how it
//!   ended when it reconnects (or it becomes INVALID "node lost" if the node
//!   does not come back within the node timeout).
//! - `Closed` tickets are gone: they answer CLOUD_NO_SUCH_TICKET as before.
//!
//! Compaction: when the file is over [`COMPACT_MIN`] bytes and more than
//! [`COMPACT_RATIO`] times what the live state encodes to, the live state
//! is written to `journal.new`, fsynced, renamed over `journal` and the
//! directory fsynced ([`Journal::compact_if_due`], checked at most once per
//! quarter of growth so the check costs nothing per record).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::proto::{JobState, MAX_STRING};
use crate::scheduler::Ticket;
use crate::xdr::{XdrError, XdrReader, XdrWriter};

/// The first bytes of every journal.
pub const MAGIC: &[u8; 8] = b"CLDJRNL1";
/// Largest record payload accepted; a length word above it is damage.
pub const MAX_RECORD: usize = 64 * 1024;
/// Most replicas a `Deployed` record may carry.
pub const MAX_REPLICAS: u32 = 4096;
/// Longest archive path stored.
pub const MAX_PATH: usize = 4096;
/// No compaction below this file size.
pub const COMPACT_MIN: u64 = 1 << 20;
/// Compact when the file is more than this many times the live state.
pub const COMPACT_RATIO: u64 = 4;

const TAG_DEPLOYED: u32 = 1;
const TAG_STARTED: u32 = 2;
const TAG_FINISHED: u32 = 3;
const TAG_CLOSED: u32 = 4;
const HEAD: usize = 8;
/// The file is kept up to this far ahead of its records in written zeros
/// (`Journal::write_pending`): a sync then overwrites blocks the file
/// already has: its fdatasync allocates no block and changes no size (the
/// file's size changes once per this, not per sync; ext4 without a journal
/// still writes the inode on every sync). A record-sized fdatasync on this
/// project's ext4 VM: 0.09 ms instead of 0.15 (p50 of 1000). Replay takes
/// a tail of zeros for room, not damage.
pub const PREALLOCATE: u64 = 1 << 20;

/// One event in a job's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A DEPLOY was accepted. `owner`: the caller's uid if known. `flags`:
    /// deploy options (bit meanings belong to the coordinator). Times are
    /// Unix seconds.
    Deployed { ticket: Ticket, owner: Option<u32>, replicas: u32, flags: u32, submitted: u64, archive: PathBuf },
    /// A replica was sent to a node.
    Started { ticket: Ticket, replica: u32, node: String, at: u64 },
    /// A replica ended (state COMPLETED or INVALID).
    Finished { ticket: Ticket, replica: u32, state: JobState, exit_code: i32, message: String, ended: u64 },
    /// The ticket was closed (or expired): forget it.
    Closed { ticket: Ticket },
}

/// Where and when a replica started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub node: String,
    pub at: u64,
}

/// How a replica ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    pub state: JobState,
    pub exit_code: i32,
    pub message: String,
    pub ended: u64,
}

/// A replica's last known state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaLog {
    pub started: Option<Start>,
    pub end: Option<End>,
}

/// What a restart does with a replica (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtRestart {
    Queued,
    RunningAtCrash,
    Finished,
}

impl ReplicaLog {
    pub fn at_restart(&self) -> AtRestart {
        match (&self.started, &self.end) {
            (_, Some(_)) => AtRestart::Finished,
            (Some(_), None) => AtRestart::RunningAtCrash,
            (None, None) => AtRestart::Queued,
        }
    }
}

/// A job that is not closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveJob {
    pub ticket: Ticket,
    pub owner: Option<u32>,
    pub flags: u32,
    pub submitted: u64,
    pub archive: PathBuf,
    /// One per replica, by index.
    pub replicas: Vec<ReplicaLog>,
}

/// Every job not closed, in ticket order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Live {
    pub jobs: BTreeMap<Ticket, LiveJob>,
}

/// What [`replay`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub live: Live,
    /// Bytes of the file that hold the magic and whole, good records; 0 for
    /// an empty file (or one torn while its magic was written).
    pub valid_len: usize,
    /// Bytes after `valid_len`: a torn or damaged tail, to truncate (0
    /// when they are all zeros: room written ahead, `PREALLOCATE`).
    pub dropped: usize,
    /// Good records that contradicted the state and were skipped.
    pub ignored: usize,
    pub records: usize,
}

fn u64_words(w: &mut XdrWriter, v: u64) {
    w.u32((v >> 32) as u32).u32(v as u32);
}

fn read_u64(r: &mut XdrReader) -> Result<u64, XdrError> {
    Ok((u64::from(r.u32()?) << 32) | u64::from(r.u32()?))
}

/// `s` cut to at most `max` bytes at a character boundary.
fn clamp(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One record, framed (length, CRC, payload). Strings are cut to
/// [`MAX_STRING`] bytes; an archive path over [`MAX_PATH`] is an error.
pub fn encode_record(rec: &Record) -> Result<Vec<u8>, String> {
    let mut w = XdrWriter::new();
    match rec {
        Record::Deployed { ticket, owner, replicas, flags, submitted, archive } => {
            let path = archive.as_os_str().as_bytes();
            if path.len() > MAX_PATH {
                return Err(format!("archive path of {} bytes is too long for the journal", path.len()));
            }
            w.u32(TAG_DEPLOYED).u32(*ticket);
            match owner {
                Some(uid) => w.bool(true).u32(*uid),
                None => w.bool(false),
            };
            w.u32(*replicas).u32(*flags);
            u64_words(&mut w, *submitted);
            w.opaque(path);
        }
        Record::Started { ticket, replica, node, at } => {
            w.u32(TAG_STARTED).u32(*ticket).u32(*replica).string(clamp(node, MAX_STRING));
            u64_words(&mut w, *at);
        }
        Record::Finished { ticket, replica, state, exit_code, message, ended } => {
            w.u32(TAG_FINISHED).u32(*ticket).u32(*replica).u32(*state as u32).i32(*exit_code);
            w.string(clamp(message, MAX_STRING));
            u64_words(&mut w, *ended);
        }
        Record::Closed { ticket } => {
            w.u32(TAG_CLOSED).u32(*ticket);
        }
    }
    let payload = w.into_bytes();
    let len = (payload.len() as u32).to_be_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(&payload);
    let mut out = Vec::with_capacity(HEAD + payload.len());
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decode one record's payload (its CRC already checked).
pub fn decode_payload(payload: &[u8]) -> Result<Record, XdrError> {
    let mut r = XdrReader::new(payload);
    let rec = match r.u32()? {
        TAG_DEPLOYED => {
            let ticket = r.u32()?;
            let owner = if r.bool()? { Some(r.u32()?) } else { None };
            let replicas = r.u32()?;
            let flags = r.u32()?;
            let submitted = read_u64(&mut r)?;
            let archive = PathBuf::from(std::ffi::OsString::from_vec(r.opaque(MAX_PATH)?.to_vec()));
            Record::Deployed { ticket, owner, replicas, flags, submitted, archive }
        }
        TAG_STARTED => {
            Record::Started { ticket: r.u32()?, replica: r.u32()?, node: r.string(MAX_STRING)?, at: read_u64(&mut r)? }
        }
        TAG_FINISHED => Record::Finished {
            ticket: r.u32()?,
            replica: r.u32()?,
            state: JobState::from_u32(r.u32()?)?,
            exit_code: r.i32()?,
            message: r.string(MAX_STRING)?,
            ended: read_u64(&mut r)?,
        },
        TAG_CLOSED => Record::Closed { ticket: r.u32()? },
        tag => return Err(XdrError::Invalid(format!("unknown record type {tag}"))),
    };
    r.finish()?;
    Ok(rec)
}

fn replica_of(live: &mut Live, ticket: Ticket, replica: u32) -> Result<&mut ReplicaLog, String> {
    let job = live.jobs.get_mut(&ticket).ok_or_else(|| format!("ticket {ticket} is not live"))?;
    job.replicas.get_mut(replica as usize).ok_or_else(|| format!("ticket {ticket} has no replica {replica}"))
}

/// Apply one record to the live state. `Err` (the state is unchanged): the
/// record contradicts it.
pub fn apply(live: &mut Live, rec: &Record) -> Result<(), String> {
    match rec {
        Record::Deployed { ticket, owner, replicas, flags, submitted, archive } => {
            if live.jobs.contains_key(ticket) {
                return Err(format!("ticket {ticket} deployed twice"));
            }
            if *replicas == 0 || *replicas > MAX_REPLICAS {
                return Err(format!("ticket {ticket} has {replicas} replicas"));
            }
            let job = LiveJob {
                ticket: *ticket,
                owner: *owner,
                flags: *flags,
                submitted: *submitted,
                archive: archive.clone(),
                replicas: vec![ReplicaLog::default(); *replicas as usize],
            };
            live.jobs.insert(*ticket, job);
        }
        Record::Started { ticket, replica, node, at } => {
            let r = replica_of(live, *ticket, *replica)?;
            // A replica started again (requeued) has not ended.
            *r = ReplicaLog { started: Some(Start { node: node.clone(), at: *at }), end: None };
        }
        Record::Finished { ticket, replica, state, exit_code, message, ended } => {
            if !state.is_final() {
                return Err(format!("ticket {ticket} replica {replica} finished as {}", state.name()));
            }
            let r = replica_of(live, *ticket, *replica)?;
            r.end = Some(End { state: *state, exit_code: *exit_code, message: message.clone(), ended: *ended });
        }
        Record::Closed { ticket } => {
            live.jobs.remove(ticket).ok_or_else(|| format!("ticket {ticket} closed but not live"))?;
        }
    }
    Ok(())
}

/// Read a journal's bytes. `Err`: not a journal, or a good record this
/// version cannot read (the file is left alone).
pub fn replay(bytes: &[u8]) -> Result<Replay, String> {
    let mut out = Replay { live: Live::default(), valid_len: 0, dropped: 0, ignored: 0, records: 0 };
    if bytes.len() < MAGIC.len() {
        if MAGIC.starts_with(bytes) {
            out.dropped = bytes.len();
            return Ok(out);
        }
        return Err("it is not a cloudinfra journal (wrong first bytes)".into());
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err("it is not a cloudinfra journal (wrong first bytes)".into());
    }
    let mut at = MAGIC.len();
    while bytes.len() - at >= HEAD {
        let len_word = &bytes[at..at + 4];
        let len = u32::from_be_bytes([len_word[0], len_word[1], len_word[2], len_word[3]]) as usize;
        let want = u32::from_be_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        if len > MAX_RECORD || bytes.len() - at - HEAD < len {
            break;
        }
        let payload = &bytes[at + HEAD..at + HEAD + len];
        let mut crc = crc32fast::Hasher::new();
        crc.update(len_word);
        crc.update(payload);
        if crc.finalize() != want {
            break;
        }
        let rec = decode_payload(payload).map_err(|e| {
            format!("the record at byte {at} is intact but unreadable ({e}): written by a newer version?")
        })?;
        if apply(&mut out.live, &rec).is_err() {
            out.ignored += 1;
        }
        out.records += 1;
        at += HEAD + len;
    }
    out.valid_len = at;
    if bytes[at..].iter().any(|&b| b != 0) {
        out.dropped = bytes.len() - at;
    }
    Ok(out)
}

/// The live state as a whole journal: magic, then for each job its
/// `Deployed` and each replica's `Started` and `Finished`.
pub fn encode_live(live: &Live) -> Result<Vec<u8>, String> {
    let mut out = MAGIC.to_vec();
    for job in live.jobs.values() {
        let deployed = Record::Deployed {
            ticket: job.ticket,
            owner: job.owner,
            replicas: job.replicas.len() as u32,
            flags: job.flags,
            submitted: job.submitted,
            archive: job.archive.clone(),
        };
        out.extend(encode_record(&deployed)?);
        for (i, r) in job.replicas.iter().enumerate() {
            let (ticket, replica) = (job.ticket, i as u32);
            if let Some(s) = &r.started {
                out.extend(encode_record(&Record::Started { ticket, replica, node: s.node.clone(), at: s.at })?);
            }
            if let Some(e) = &r.end {
                let rec = Record::Finished {
                    ticket,
                    replica,
                    state: e.state,
                    exit_code: e.exit_code,
                    message: e.message.clone(),
                    ended: e.ended,
                };
                out.extend(encode_record(&rec)?);
            }
        }
    }
    Ok(out)
}

/// True when a file of `file_len` bytes should be rewritten as the live
/// state, which encodes to `live_len` bytes.
pub fn compaction_due(file_len: u64, live_len: u64) -> bool {
    file_len > COMPACT_MIN && file_len > COMPACT_RATIO.saturating_mul(live_len)
}

/// `<work-dir>/journal`, open for appending.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    file: File,
    /// Bytes of the file known good (written and synced, or replayed).
    len: u64,
    /// The file's size: `len` and then zeros (`PREALLOCATE`).
    size: u64,
    /// Records appended since the last successful sync.
    pending: Vec<u8>,
    /// Bytes at the start of `pending` written by [`Journal::write_pending`]
    /// and waiting for a sync elsewhere (the syncer); 0 when none is asked.
    in_flight: usize,
    /// A `Deployed` or `Closed` is among them.
    due: bool,
    live: Live,
    /// File length at which compaction is next considered.
    next_check: u64,
}

/// What [`Journal::open`] found, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub records: usize,
    /// Bytes of a torn or damaged tail, truncated.
    pub dropped: usize,
    /// Records skipped because they contradicted the state.
    pub ignored: usize,
}

fn open_rw(path: &Path, create: bool) -> io::Result<File> {
    File::options().read(true).write(true).create(create).truncate(false).mode(0o600).open(path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Journal {
    /// Open (or create) `<work_dir>/journal`, replay it, truncate a torn
    /// tail. The live state is then [`Journal::live`]. Errors are one line
    /// for the operator.
    pub fn open(work_dir: &Path) -> Result<(Journal, Opened), String> {
        let path = work_dir.join("journal");
        let shown = path.display();
        match fs::remove_file(work_dir.join("journal.new")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(format!("cannot remove the unfinished {}/journal.new: {e}", work_dir.display()));
            }
            _ => {}
        }
        let file = open_rw(&path, true).map_err(|e| format!("cannot open the journal {shown}: {e}"))?;
        let bytes = fs::read(&path).map_err(|e| format!("cannot read the journal {shown}: {e}"))?;
        let found = replay(&bytes).map_err(|e| {
            format!("the journal {shown}: {e}; move it away to start with no jobs, or use the version that wrote it")
        })?;
        let fail = |e: io::Error| format!("cannot repair the journal {shown}: {e}");
        let mut len = found.valid_len as u64;
        // What follows the good records: zeros written ahead, kept; or a
        // torn tail, cut (the zeros after it go too, and are written again).
        let mut size = bytes.len() as u64;
        if found.dropped > 0 {
            file.set_len(len).map_err(fail)?;
            size = len;
        }
        if len == 0 {
            file.write_all_at(MAGIC, 0).map_err(fail)?;
            len = MAGIC.len() as u64;
            size = size.max(len);
        }
        if found.dropped > 0 || bytes.len() < MAGIC.len() {
            file.sync_all().map_err(fail)?;
            sync_dir(work_dir).map_err(fail)?;
        }
        let opened = Opened { records: found.records, dropped: found.dropped, ignored: found.ignored };
        let journal = Journal {
            dir: work_dir.to_path_buf(),
            file,
            len,
            size,
            pending: Vec::new(),
            in_flight: 0,
            due: false,
            live: found.live,
            next_check: COMPACT_MIN.max(len + len / 4),
        };
        Ok((journal, opened))
    }

    /// The jobs not closed, with every record appended so far applied.
    pub fn live(&self) -> &Live {
        &self.live
    }

    /// Buffer a record (no I/O). `Err`: it contradicts the live state, or
    /// cannot be encoded; nothing was buffered.
    pub fn append(&mut self, rec: &Record) -> Result<(), String> {
        let bytes = encode_record(rec)?;
        apply(&mut self.live, rec)?;
        self.pending.extend_from_slice(&bytes);
        self.due |= matches!(rec, Record::Deployed { .. } | Record::Closed { .. });
        Ok(())
    }

    /// True when records wait for [`Journal::sync`].
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// True when a record that a reply waits for (`Deployed`, `Closed`)
    /// is buffered: sync before this turn's replies.
    pub fn sync_due(&self) -> bool {
        self.due
    }

    /// Bytes in the file, synced.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a journal holds at least its magic.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Write the buffered records and fdatasync: one call per reactor turn,
    /// before the turn's DEPLOYs are acknowledged. Nothing to do, no
    /// syscall. On `Err` the records stay buffered for the next call.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.write_pending()?;
        let synced = self.file.sync_data();
        self.synced(synced)
    }

    /// The first half of a sync made elsewhere (the syncer, `syncer.rs`):
    /// write every buffered record at the end of the valid file. They are
    /// durable once `fdatasync` of [`Journal::fd`] has succeeded after
    /// this; say how it went with [`Journal::synced`]. Records appended
    /// meanwhile wait for the next sync. `Err`: nothing is in flight, the
    /// records stay buffered.
    pub fn write_pending(&mut self) -> io::Result<()> {
        self.in_flight = 0;
        let end = self.len + self.pending.len() as u64;
        if end > self.size {
            // Room ahead, in zeros written now (synced with these records).
            let size = end + PREALLOCATE;
            let zeros = vec![0u8; usize::try_from(size - end).unwrap_or(0)];
            self.file.write_all_at(&zeros, end)?;
            self.size = size;
        }
        self.file.write_all_at(&self.pending, self.len)?;
        self.in_flight = self.pending.len();
        Ok(())
    }

    /// Bytes written by [`Journal::write_pending`] that wait for their sync.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The journal's descriptor, for the syncer (it changes when the file
    /// is compacted).
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.file.as_raw_fd()
    }

    /// The sync of what [`Journal::write_pending`] wrote ended: on `Ok`
    /// those records are durable; on `Err` they stay buffered and are
    /// written again, at the same offset, before the next sync.
    pub fn synced(&mut self, result: io::Result<()>) -> io::Result<()> {
        let done = std::mem::take(&mut self.in_flight);
        result?;
        self.len += done as u64;
        self.pending.drain(..done);
        // A `Deployed` or `Closed` may be among the records appended
        // since the write: the next sync is due if anything is left.
        self.due &= !self.pending.is_empty();
        Ok(())
    }

    /// Rewrite the file as the live state if it has grown well past it
    /// (see [`compaction_due`]). Buffered records are part of the live
    /// state, so a compaction also makes them durable. `Ok(true)`: it did.
    pub fn compact_if_due(&mut self) -> io::Result<bool> {
        let file_len = self.len + self.pending.len() as u64;
        if file_len < self.next_check || self.in_flight > 0 {
            return Ok(false);
        }
        let live = encode_live(&self.live).map_err(io::Error::other)?;
        if !compaction_due(file_len, live.len() as u64) {
            self.next_check = file_len + file_len / 4;
            return Ok(false);
        }
        let new_path = self.dir.join("journal.new");
        let mut new = File::options().read(true).write(true).create(true).truncate(true).mode(0o600).open(&new_path)?;
        new.write_all(&live)?;
        new.sync_all()?;
        fs::rename(&new_path, self.dir.join("journal"))?;
        // From here on the new file is the journal, whatever follows.
        self.file = new;
        self.len = live.len() as u64;
        self.size = self.len;
        self.pending.clear();
        self.in_flight = 0;
        self.due = false;
        self.next_check = COMPACT_MIN.max(self.len.saturating_mul(COMPACT_RATIO));
        sync_dir(&self.dir)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployed(ticket: Ticket, replicas: u32) -> Record {
        Record::Deployed {
            ticket,
            owner: Some(1000),
            replicas,
            flags: 1,
            submitted: 1_800_000_000,
            archive: PathBuf::from(format!("/w/spool/{ticket}.tar.gz")),
        }
    }

    fn started(ticket: Ticket, replica: u32) -> Record {
        Record::Started { ticket, replica, node: "127.0.0.1:9001".into(), at: 1_800_000_010 }
    }

    fn finished(ticket: Ticket, replica: u32) -> Record {
        Record::Finished {
            ticket,
            replica,
            state: JobState::Invalid,
            exit_code: 3,
            message: "make run exited with status 3".into(),
            ended: 1_800_000_020,
        }
    }

    fn file_of(records: &[Record]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for r in records {
            out.extend(encode_record(r).unwrap());
        }
        out
    }

    /// Queued 1, running 2 (replica 0 of 2 started), finished 3, closed 4.
    fn sample() -> Vec<Record> {
        vec![
            deployed(1, 1),
            deployed(2, 2),
            deployed(3, 1),
            deployed(4, 1),
            started(2, 0),
            started(3, 0),
            finished(3, 0),
            Record::Closed { ticket: 4 },
        ]
    }

    #[test]
    fn records_round_trip() {
        let mut all = sample();
        all.push(Record::Deployed {
            ticket: u32::MAX,
            owner: None,
            replicas: 3,
            flags: 0,
            submitted: u64::MAX,
            archive: PathBuf::from("/odd/ \u{e9}"),
        });
        for rec in all {
            let bytes = encode_record(&rec).unwrap();
            assert_eq!(decode_payload(&bytes[HEAD..]).unwrap(), rec);
        }
    }

    #[test]
    fn replay_gives_the_live_jobs_in_ticket_order_with_each_replicas_last_state() {
        let out = replay(&file_of(&sample())).unwrap();
        assert_eq!((out.records, out.dropped, out.ignored), (8, 0, 0));
        let live = out.live;
        assert_eq!(live.jobs.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(live.jobs[&1].replicas[0].at_restart(), AtRestart::Queued);
        assert_eq!(live.jobs[&2].replicas[0].at_restart(), AtRestart::RunningAtCrash);
        assert_eq!(live.jobs[&2].replicas[1].at_restart(), AtRestart::Queued);
        let r = &live.jobs[&3].replicas[0];
        assert_eq!(r.at_restart(), AtRestart::Finished);
        assert_eq!(r.started.as_ref().unwrap().node, "127.0.0.1:9001");
        assert_eq!(r.end.as_ref().unwrap().exit_code, 3);
        assert_eq!(live.jobs[&1].owner, Some(1000));
        assert_eq!(live.jobs[&1].archive, Path::new("/w/spool/1.tar.gz"));
    }

    #[test]
    fn an_empty_file_and_a_torn_magic_are_no_jobs() {
        let out = replay(b"").unwrap();
        assert_eq!((out.valid_len, out.dropped, out.live.jobs.len()), (0, 0, 0));
        let out = replay(b"CLDJ").unwrap();
        assert_eq!((out.valid_len, out.dropped), (0, 4));
        let out = replay(MAGIC).unwrap();
        assert_eq!((out.valid_len, out.dropped, out.records), (8, 0, 0));
        assert!(replay(b"not a journal at all").unwrap_err().contains("not a cloudinfra journal"));
        assert!(replay(b"xy").is_err());
    }

    #[test]
    fn a_torn_tail_is_dropped_at_every_cut() {
        let records = sample();
        let whole = file_of(&records);
        let bounds: Vec<usize> = (0..=records.len()).map(|n| file_of(&records[..n]).len()).collect();
        for cut in MAGIC.len()..whole.len() {
            let out = replay(&whole[..cut]).unwrap();
            let good = *bounds.iter().rev().find(|&&b| b <= cut).unwrap();
            assert_eq!(out.valid_len, good, "cut at {cut}");
            // (A torn piece that is all zeros is room, as written ahead.)
            let zeros = whole[good..cut].iter().all(|&b| b == 0);
            assert_eq!(out.dropped, if zeros { 0 } else { cut - good });
            // Over zeros written ahead: the same, unless the bytes the cut
            // lost were zeros, so the record on disk is whole after all.
            let ahead = replay(&[&whole[..cut], &[0u8; 100][..]].concat()).unwrap().valid_len;
            assert!(ahead == good || (bounds.contains(&ahead) && whole[cut..ahead].iter().all(|&b| b == 0)), "{cut}");
            let n = bounds.iter().position(|&b| b == good).unwrap();
            assert_eq!(out.live, replay(&file_of(&records[..n])).unwrap().live);
        }
    }

    #[test]
    fn a_flipped_bit_stops_the_replay_at_its_record() {
        let records = sample();
        let whole = file_of(&records);
        let third = file_of(&records[..2]).len();
        for bit in 0..8 * (whole.len() - MAGIC.len()) {
            let mut bad = whole.clone();
            bad[MAGIC.len() + bit / 8] ^= 1 << (bit % 8);
            let out = replay(&bad).unwrap();
            assert!(out.valid_len < whole.len(), "bit {bit} went unnoticed");
            assert_eq!(out.valid_len + out.dropped, whole.len());
        }
        // A flip in the third record keeps the first two.
        let mut bad = whole.clone();
        bad[third + HEAD + 2] ^= 0x10;
        let out = replay(&bad).unwrap();
        assert_eq!(out.valid_len, third);
        assert_eq!(out.live.jobs.keys().copied().collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn an_intact_record_of_an_unknown_kind_is_an_error_not_a_truncation() {
        let mut w = XdrWriter::new();
        w.u32(99).u32(1);
        let payload = w.into_bytes();
        let len = (payload.len() as u32).to_be_bytes();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&len);
        crc.update(&payload);
        let mut bytes = file_of(&sample());
        bytes.extend_from_slice(&len);
        bytes.extend_from_slice(&crc.finalize().to_be_bytes());
        bytes.extend_from_slice(&payload);
        assert!(replay(&bytes).unwrap_err().contains("newer version"));
    }

    #[test]
    fn contradicting_records_are_skipped_and_counted() {
        let recs = [
            started(9, 0),
            deployed(1, 1),
            deployed(1, 2),
            started(1, 5),
            Record::Finished {
                ticket: 1,
                replica: 0,
                state: JobState::Running,
                exit_code: 0,
                message: String::new(),
                ended: 0,
            },
            Record::Closed { ticket: 7 },
            deployed(2, 0),
            deployed(3, MAX_REPLICAS + 1),
        ];
        let out = replay(&file_of(&recs)).unwrap();
        assert_eq!((out.records, out.ignored), (8, 7));
        assert_eq!(out.live.jobs[&1].replicas, vec![ReplicaLog::default()]);
    }

    #[test]
    fn a_requeued_replica_has_not_ended() {
        let mut live = Live::default();
        for r in [deployed(1, 1), started(1, 0), finished(1, 0)] {
            apply(&mut live, &r).unwrap();
        }
        apply(&mut live, &Record::Started { ticket: 1, replica: 0, node: "10.0.0.6:9001".into(), at: 5 }).unwrap();
        assert_eq!(live.jobs[&1].replicas[0].at_restart(), AtRestart::RunningAtCrash);
    }

    #[test]
    fn compaction_round_trip_keeps_exactly_the_live_state() {
        let mut records = sample();
        for t in 10..200 {
            records.extend([deployed(t, 2), started(t, 0), started(t, 1), finished(t, 0), finished(t, 1)]);
            if t % 3 != 0 {
                records.push(Record::Closed { ticket: t });
            }
        }
        let before = replay(&file_of(&records)).unwrap();
        let compact = encode_live(&before.live).unwrap();
        let after = replay(&compact).unwrap();
        assert_eq!(after.live, before.live);
        assert_eq!(after.ignored, 0);
        assert!(compact.len() * 2 < file_of(&records).len());
        assert_eq!(replay(&encode_live(&Live::default()).unwrap()).unwrap().valid_len, MAGIC.len());
    }

    #[test]
    fn compaction_is_due_only_when_large_and_mostly_dead() {
        assert!(!compaction_due(COMPACT_MIN, 1));
        assert!(compaction_due(COMPACT_MIN + 1, 1));
        assert!(!compaction_due(8 << 20, 2 << 20));
        assert!(compaction_due(8 << 20, (2 << 20) - 1));
    }

    #[test]
    fn long_strings_are_cut_at_a_character_boundary() {
        let rec = Record::Finished {
            ticket: 1,
            replica: 0,
            state: JobState::Invalid,
            exit_code: 1,
            message: "\u{e9}".repeat(MAX_STRING),
            ended: 0,
        };
        let Record::Finished { message, .. } = decode_payload(&encode_record(&rec).unwrap()[HEAD..]).unwrap() else {
            panic!()
        };
        assert_eq!(message.len(), MAX_STRING);
        let long = Record::Deployed {
            ticket: 1,
            owner: None,
            replicas: 1,
            flags: 0,
            submitted: 0,
            archive: PathBuf::from("x".repeat(MAX_PATH + 1)),
        };
        assert!(encode_record(&long).is_err());
    }

    #[test]
    fn the_file_survives_a_crash_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, opened) = Journal::open(dir.path()).unwrap();
        assert_eq!(opened, Opened { records: 0, dropped: 0, ignored: 0 });
        assert_eq!(fs::read(dir.path().join("journal")).unwrap(), MAGIC);
        j.append(&deployed(1, 1)).unwrap();
        assert!(j.sync_due(), "a DEPLOY waits for its record");
        j.sync().unwrap();
        j.append(&started(1, 0)).unwrap();
        assert!(j.has_pending() && !j.sync_due(), "a start does not hold up replies");
        for r in &sample()[1..] {
            j.append(r).unwrap();
        }
        assert!(j.append(&started(42, 0)).is_err(), "a contradiction is refused, not buffered");
        assert!(j.sync_due(), "a close waits for its record");
        j.sync().unwrap();
        assert!(!j.has_pending() && !j.sync_due());
        let live = j.live().clone();
        // Buffered but never synced: lost in the crash, like an
        // unacknowledged DEPLOY.
        j.append(&deployed(50, 1)).unwrap();
        drop(j);

        // A torn write at the end, over the zeros written ahead.
        let path = dir.path().join("journal");
        let mut torn = fs::read(&path).unwrap();
        let good_len = replay(&torn).unwrap().valid_len;
        assert!(torn.len() > good_len && torn[good_len..].iter().all(|&b| b == 0), "room ahead, in zeros");
        torn[good_len..good_len + 10].copy_from_slice(&encode_record(&deployed(60, 1)).unwrap()[..10]);
        fs::write(&path, &torn).unwrap();
        fs::write(dir.path().join("journal.new"), b"half a compaction").unwrap();

        let (mut j, opened) = Journal::open(dir.path()).unwrap();
        assert_eq!(opened, Opened { records: 9, dropped: torn.len() - good_len, ignored: 0 });
        assert_eq!(j.live(), &live);
        assert_eq!(fs::metadata(&path).unwrap().len(), good_len as u64, "truncated");
        assert!(!dir.path().join("journal.new").exists());

        // Appends after the repair land after the good records.
        j.append(&deployed(70, 1)).unwrap();
        j.sync().unwrap();
        drop(j);
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        assert!(j.live().jobs.contains_key(&70));

        // Grow past COMPACT_MIN with closed jobs, then compact.
        let mut t = 1000;
        while j.len() + (j.pending.len() as u64) < COMPACT_MIN + 1 {
            for r in [deployed(t, 1), started(t, 0), finished(t, 0), Record::Closed { ticket: t }] {
                j.append(&r).unwrap();
            }
            t += 1;
        }
        j.sync().unwrap();
        let live = j.live().clone();
        assert!(j.compact_if_due().unwrap());
        assert!(j.len() < 4096, "{} bytes after compaction", j.len());
        assert!(!j.compact_if_due().unwrap());
        j.append(&Record::Closed { ticket: 70 }).unwrap();
        j.sync().unwrap();
        drop(j);
        let (j, opened) = Journal::open(dir.path()).unwrap();
        let mut expect = live;
        expect.jobs.remove(&70);
        assert_eq!(j.live(), &expect);
        assert_eq!(opened.dropped, 0);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    /// Syncs overwrite zeros the file already has: its size changes once
    /// per `PREALLOCATE`, and a restart takes the zeros for room.
    #[test]
    fn records_overwrite_zeros_written_ahead_and_the_size_moves_once_per_preallocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let size = || fs::metadata(&path).unwrap().len();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(&deployed(1, 1)).unwrap();
        j.sync().unwrap();
        let first = size();
        assert_eq!(first, j.len() + PREALLOCATE);
        // Each sync after it writes within the zeros, until one does not fit.
        let mut t = 2;
        let grown = loop {
            let before = j.len();
            j.append(&deployed(t, 1)).unwrap();
            j.sync().unwrap();
            t += 1;
            if size() != first {
                assert!(j.len() > first && before <= first, "grown only when a record did not fit");
                break size();
            }
        };
        assert_eq!(grown, j.len() + PREALLOCATE);
        let live = j.live().clone();
        drop(j);
        let (j, opened) = Journal::open(dir.path()).unwrap();
        assert_eq!((opened.dropped, opened.records), (0, (t - 1) as usize));
        assert_eq!(j.live(), &live);
        assert!(size() > j.len(), "the zeros are kept");
    }

    #[test]
    fn a_sync_made_elsewhere_covers_what_was_written_before_it_was_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        let on_disk = |dir: &Path| replay(&fs::read(dir.join("journal")).unwrap()).unwrap().live;
        j.append(&deployed(1, 1)).unwrap();
        j.write_pending().unwrap();
        assert!(j.in_flight() > 0);
        // Appended while the sync is in flight: waits for the next one.
        j.append(&deployed(2, 1)).unwrap();
        j.synced(Ok(())).unwrap();
        assert_eq!(j.in_flight(), 0);
        assert!(j.has_pending() && j.sync_due(), "ticket 2 waits for the next sync");
        assert_eq!(on_disk(dir.path()).jobs.keys().copied().collect::<Vec<_>>(), [1]);
        // A failed sync: the records stay buffered and are written again at
        // the same offset (here: after another append).
        j.write_pending().unwrap();
        assert!(j.synced(Err(io::Error::other("disk gone"))).is_err());
        assert!(j.has_pending() && j.in_flight() == 0);
        j.append(&Record::Closed { ticket: 1 }).unwrap();
        j.write_pending().unwrap();
        j.synced(Ok(())).unwrap();
        assert!(!j.has_pending() && !j.sync_due());
        drop(j);
        let (j, opened) = Journal::open(dir.path()).unwrap();
        assert_eq!(opened.dropped, 0);
        assert_eq!(j.live().jobs.keys().copied().collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn a_foreign_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        fs::write(&path, b"something else entirely").unwrap();
        let e = Journal::open(dir.path()).unwrap_err();
        assert!(e.contains("not a cloudinfra journal") && e.contains("move it away"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"something else entirely");
    }
}

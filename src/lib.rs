//! cloudinfra: a one-thread job cluster speaking ONC RPC.
//!
//! A main server owns N side nodes; clients deploy a `.tar.gz` with a
//! makefile, each replica runs `make run` on its own node, and clients
//! retrieve every replica's output. See docs/ARCHITECTURE.md.
//!
//! Bytes and messages (sans-I/O):
//! - [`xdr`] - XDR primitives (RFC 4506).
//! - [`record`] - record marking, streaming decoder and fragmenting outbox.
//! - [`rpc`] - ONC RPC v2 headers and error replies (RFC 5531).
//! - [`proto`] - CLOUD_PROG and NODE_PROG from docs/cloud.x.
//! - [`peer`] - who owns a loopback peer's socket (the kernel's answer).
//! - [`node_auth`] - the node link's shared secret: HMAC challenge/response
//!   both ways before a node takes orders; `--secret-file`; binding rule.
//! - [`session`] - both ends of an RPC connection: calls in, refusals and
//!   streams out; replies matched to pending calls.
//!
//! Decisions (sans-I/O):
//! - [`scheduler`] - node slots, fair election, wait queue, job table.
//! - [`coordinator`] - the main server's logic; events in, actions out.
//! - [`drc`] - the duplicate request cache: at-most-once DEPLOY and CLOSE.
//! - [`journal`] - the main server's job state on disk, replayed after a
//!   crash: append-only, CRC-checked records, compacted.
//! - [`tickets`] - ticket numbers never reused, leased in blocks on disk.
//! - [`timers`] - client connection timeouts (idle, call, write) and eviction order.
//!
//! Processes and files:
//! - [`node`] - a side node and its running replica.
//! - [`slurm`] - a node whose replicas run in Slurm (`slurm:PARTITION`).
//! - [`spawn`] - fork, sandbox, exec `make run`, kill, classify exits.
//! - [`launcher`] - one process per node slot that starts its contained
//!   replicas (in the slot's cgroup), off the reactor thread.
//! - [`cgroup`] - per-slot memory and process totals, a second kill path.
//! - [`archive_check`] - a DEPLOY's archive checked as it streams in (sans-I/O).
//! - [`extract`] - safe archive extraction.
//! - [`pool`] - work-dir files reused from job to job (no create or delete per job).
//! - [`syncer`] - a child process that fdatasyncs the journal, so the
//!   reactor never waits for the disk.
//!
//! The reactor, the two roles, and the edges:
//! - `reactor` - the single-threaded mio reactor that drives all of the
//!   above: poll, slab, signals, accept, reads and writes, timeouts.
//! - `main_service` - the main server role: client calls to the
//!   coordinator, its actions to replies and node calls.
//! - `node_service` - the node role: NODE_PROG calls to `node`, replicas'
//!   output pipes and ends; in-process nodes are called directly.
//! - [`server`] - the public face: `Server`, `ServerConfig`.
//! - `conn` - one of the reactor's connections: socket, role, reader, outbox, the
//!   spool file a streamed opaque goes to, lingering close.
//! - [`config`] - `cloud_nodes.txt`.
//! - [`congestion`] - which TCP congestion control our connections use
//!   (`--tcp-congestion`: not a pacing one on loopback).
//! - [`client`] - a blocking client for the command-line programs.
//! - [`portmap`] - registration with the local rpcbind (`--register`).
//! - [`http`] - the live page (`--http`): requests and SSE frames, sans-I/O.
//! - [`live`] - the live page's sockets, driven from the reactor.

pub mod archive_check;
pub mod cgroup;
pub mod client;
pub mod config;
pub mod congestion;
mod conn;
pub mod coordinator;
pub mod drc;
pub mod extract;
pub mod http;
pub mod journal;
pub mod launcher;
pub mod live;
mod main_service;
pub mod node;
pub mod node_auth;
mod node_service;
pub mod peer;
pub mod pool;
pub mod portmap;
pub mod proto;
mod reactor;
pub mod record;
pub mod rpc;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod slurm;
pub mod spawn;
pub mod syncer;
pub mod tickets;
pub mod timers;
pub mod xdr;

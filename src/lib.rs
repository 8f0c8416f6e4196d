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
//! - [`session`] - both ends of an RPC connection: calls in, refusals and
//!   streams out; replies matched to pending calls.
//!
//! Decisions (sans-I/O):
//! - [`scheduler`] - free-node FIFO, wait queue, job table.
//! - [`coordinator`] - the main server's logic; events in, actions out.
//! - [`drc`] - the duplicate request cache: at-most-once DEPLOY and CLOSE.
//! - [`tickets`] - ticket numbers never reused, leased in blocks on disk.
//! - [`timers`] - client connection timeouts (idle, call, write) and eviction order.
//!
//! Processes and files:
//! - [`node`] - a side node and its running replica.
//! - [`spawn`] - fork, sandbox, exec `make run`, kill, classify exits.
//! - [`cgroup`] - per-replica memory and process totals, a second kill path.
//! - [`archive_check`] - a DEPLOY's archive checked as it streams in (sans-I/O).
//! - [`extract`] - safe archive extraction.
//!
//! The reactor and the edges:
//! - [`server`] - the single-threaded mio reactor that drives all of the above.
//! - `conn` - one of its connections: socket, role, reader, outbox, the
//!   spool file a streamed opaque goes to, lingering close.
//! - [`config`] - `cloud_nodes.txt`.
//! - [`client`] - a blocking client for the command-line programs.
//! - [`portmap`] - registration with the local rpcbind (`--register`).
//! - [`http`] - the live page (`--http`): requests and SSE frames, sans-I/O.
//! - [`live`] - the live page's sockets, driven from the reactor.

pub mod archive_check;
pub mod cgroup;
pub mod client;
pub mod config;
mod conn;
pub mod coordinator;
pub mod drc;
pub mod extract;
pub mod http;
pub mod live;
pub mod node;
pub mod peer;
pub mod portmap;
pub mod proto;
pub mod record;
pub mod rpc;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod spawn;
pub mod tickets;
pub mod timers;
pub mod xdr;

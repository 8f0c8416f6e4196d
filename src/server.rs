//! The server's public face: what `cloud-server` and the tests use.
//!
//! Owns nothing: the reactor (`reactor`), the main server role
//! (`main_service`) and the node role (`node_service`) live in their own
//! modules; this keeps the paths other code names (`server::Server`,
//! `server::ServerConfig`, `server::encode_reply`).
//! Must not touch: anything; add to the modules above instead.

pub use crate::main_service::encode_reply;
pub use crate::reactor::{effective_max_connections, Server, ServerConfig};

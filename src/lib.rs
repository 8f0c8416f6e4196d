//! cloudinfra: a one-thread job cluster speaking ONC RPC.
pub mod proto;
pub mod record;
pub mod rpc;
pub mod scheduler;
pub mod xdr;
pub mod extract;
pub mod coordinator;
pub mod spawn;
pub mod config;
pub mod node;
pub mod server;
pub mod client;

//! cloudinfra: a one-thread job cluster speaking ONC RPC.
pub mod client;
pub mod config;
pub mod coordinator;
pub mod extract;
pub mod node;
pub mod proto;
pub mod record;
pub mod rpc;
pub mod scheduler;
pub mod server;
pub mod spawn;
pub mod xdr;

//! cloudinfra: a one-thread job cluster speaking ONC RPC.
pub mod proto;
pub mod record;
pub mod rpc;
pub mod scheduler;
pub mod xdr;

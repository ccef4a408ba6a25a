//! The medledger node: the shell around the pure core. It owns the clock, the keys, the
//! embedded store, the ordering of transactions into blocks and the HTTP API.

pub mod api;
pub mod consortium;
pub mod ledger;
pub mod pki;
pub mod sealing;
pub mod store;
pub mod verify;

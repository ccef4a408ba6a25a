//! The pure core of medledger: identities, transactions, contracts, blocks and the
//! Merkle audit log.
//!
//! Nothing here does IO, reads a clock, draws randomness or depends on anything async.
//! Time arrives as the block's `time_ms`; state is read through the `StateRead` trait and
//! every change is returned as a write set for the shell to persist. Every node that
//! executes the same blocks reaches the same state hash.

pub mod audit;
pub mod block;
pub mod canonical;
pub mod cert;
pub mod contracts;
pub mod crypto;
pub mod hash;
pub mod identity;
pub mod merkle;
pub mod model;
pub mod state;
pub mod tx;

pub use hash::Hash;

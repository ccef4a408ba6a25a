//! Consensus: the member nodes agree on one order of blocks through Raft (openraft 0.9).
//!
//! A Raft log entry carries a block *proposal*: the leader's batch of signed transactions,
//! the block time it chose and a checkpoint (the hash of a block it has already applied).
//! Every node applies committed entries through the pure core (`execute_block`), so every
//! node computes the block itself; the checkpoint makes a node whose state diverged stop at
//! the first proposal after the divergence instead of serving wrong data.
//!
//! Raft's log and vote live in the node's write-ahead log; the state machine's position
//! lives in the ledger file, so that a block and "applied up to log id N" are staged and
//! written together.

// openraft's `StorageError` is what its storage traits return; it is large by its design.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod wal;

use std::fmt;
use std::io::Cursor;

use medledger_core::tx::SignedTx;
use medledger_core::Hash;
use serde::{Deserialize, Serialize};

pub use log_store::LogStore;
pub use state_machine::{Applied, StateMachine};

/// What a node is, for its peers: its enrolled id and where it listens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `name@org`, as enrolled on the ledger with the role `node`.
    pub node: String,
    /// `host:port` of its node-to-node (mutual TLS) listener.
    pub peer_addr: String,
    /// Base URL of its client API.
    pub api_url: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.node, self.peer_addr)
    }
}

/// The block the leader had applied when it proposed: every node checks it has the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub height: u64,
    pub block_hash: Hash,
}

/// A Raft entry's application data: one block's worth of transactions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The leader's node id (`name@org`): the block's proposer.
    pub proposer: String,
    /// Block time the leader chose; applied as `max(time_ms, previous block time)`.
    pub time_ms: u64,
    pub checkpoint: Option<Checkpoint>,
    pub txs: Vec<SignedTx>,
}

openraft::declare_raft_types!(
    /// The ledger's Raft types.
    pub TypeConfig:
        D = Proposal,
        R = Applied,
        NodeId = u64,
        Node = NodeInfo,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type Vote = openraft::Vote<u64>;
pub type StorageError = openraft::StorageError<u64>;
pub type SnapshotMeta = openraft::SnapshotMeta<u64, NodeInfo>;
pub type StoredMembership = openraft::StoredMembership<u64, NodeInfo>;

/// The Raft id of an organisation's node: the first 8 bytes of a tagged SHA-256 of the
/// organisation id (one node per member organisation), the same on every node.
pub fn raft_id(org: &str) -> u64 {
    let digest = Hash::digest_parts(&[b"medledger/raft-id/v1\n", org.as_bytes()]);
    u64::from_be_bytes(digest.0[..8].try_into().expect("8 bytes"))
}

/// A storage error from anything printable.
pub(crate) fn storage_error(
    subject: openraft::ErrorSubject<u64>,
    verb: openraft::ErrorVerb,
    detail: impl fmt::Display,
) -> StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::error(detail.to_string()))
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_ids_are_stable_and_distinct_per_organisation() {
        // Proves that a node's Raft id is a pure function of its organisation, so that every
        // node and the CLI derive the same id without asking anyone.
        assert_eq!(raft_id("hospital-a"), raft_id("hospital-a"));
        assert_ne!(raft_id("hospital-a"), raft_id("hospital-b"));
        assert_ne!(raft_id("hospital-a"), 0);
    }
}

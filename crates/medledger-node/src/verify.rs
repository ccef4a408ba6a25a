//! Independent re-checking of a stored ledger: every block re-executed from genesis.
//!
//! `verify_store` trusts nothing in the store but its bytes: it decodes each block,
//! re-executes it through the pure core (signatures, certificate chains, contracts), checks
//! the hash chain, the Merkle roots and the state hashes, then compares the stored state and
//! head with what re-execution produced. The first thing that does not hold is reported
//! with the block it belongs to.

use std::collections::BTreeMap;

use medledger_core::block::{replay, ChainHead};
use medledger_core::contracts::Candidate;
use medledger_core::state::apply_writes;
use serde::Serialize;

use crate::store::Store;

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub blocks: u64,
    pub txs: u64,
    pub committed: u64,
    pub rejected: u64,
    pub state_entries: u64,
    pub head: ChainHead,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyFailure {
    #[error("block {height} is bad: {detail}")]
    Block { height: u64, detail: String },
    #[error("the store is unreadable: {0}")]
    Store(String),
    #[error("the stored head does not match the re-executed chain: {0}")]
    Head(String),
}

impl VerifyFailure {
    /// The first bad block, when the failure belongs to one.
    pub fn height(&self) -> Option<u64> {
        match self {
            VerifyFailure::Block { height, .. } => Some(*height),
            _ => None,
        }
    }
}

pub fn verify_store(store: &Store) -> Result<VerifyReport, VerifyFailure> {
    let unreadable = |e: crate::store::StoreError| VerifyFailure::Store(e.to_string());
    let stored_head = store
        .head()
        .map_err(|e| VerifyFailure::Head(e.to_string()))?
        .ok_or_else(|| VerifyFailure::Head("the store holds no chain".into()))?;
    let count = store.block_count().map_err(unreadable)?;
    let mut state: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // The block that last wrote each key, to name the block a bad state entry belongs to.
    let mut written_by: BTreeMap<String, u64> = BTreeMap::new();
    let mut head: Option<ChainHead> = None;
    let (mut txs, mut committed) = (0u64, 0u64);
    for height in 0..count {
        let bad = |detail: String| VerifyFailure::Block { height, detail };
        let bytes = store
            .block_bytes(height)
            .map_err(unreadable)?
            .ok_or_else(|| bad("missing".into()))?;
        let block: medledger_core::block::Block =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("does not decode: {e}")))?;
        // The store writes blocks in one encoding; any other bytes were not written by a node.
        if serde_json::to_vec(&block).map_err(|e| bad(e.to_string()))? != bytes {
            return Err(bad("is not in its stored encoding".into()));
        }
        let executed = replay(&state, head.as_ref(), &block, |txs| {
            txs.into_iter().map(Candidate::Unverified).collect()
        })
        .map_err(|e| bad(e.to_string()))?;
        txs += block.txs.len() as u64;
        committed += block.outcomes.iter().filter(|o| o.is_committed()).count() as u64;
        for key in executed.writes.keys() {
            written_by.insert(key.clone(), height);
        }
        apply_writes(&mut state, &executed.writes);
        head = Some(executed.head);
    }
    let head = head.ok_or_else(|| VerifyFailure::Head("the store holds no blocks".into()))?;
    if head != stored_head {
        return Err(VerifyFailure::Head(format!(
            "stored head is at height {} with block hash {}, re-execution ends at {} with {}",
            stored_head.height, stored_head.block_hash, head.height, head.block_hash
        )));
    }
    compare_state(store, &state, &written_by)?;
    Ok(VerifyReport {
        blocks: count,
        txs,
        committed,
        rejected: txs - committed,
        state_entries: state.len() as u64,
        head,
    })
}

/// Compares the stored state with the re-executed one, entry by entry.
fn compare_state(
    store: &Store,
    expected: &BTreeMap<String, Vec<u8>>,
    written_by: &BTreeMap<String, u64>,
) -> Result<(), VerifyFailure> {
    let snapshot = store
        .snapshot()
        .map_err(|e| VerifyFailure::Store(e.to_string()))?;
    let mut expected_entries = expected.iter();
    let mut first_difference: Option<String> = None;
    snapshot
        .for_each(|key, value| {
            if first_difference.is_some() {
                return;
            }
            match expected_entries.next() {
                Some((k, v)) if k == key && v.as_slice() == value => {}
                Some((k, _)) => first_difference = Some(k.min(&key.to_string()).clone()),
                None => first_difference = Some(key.to_string()),
            }
        })
        .map_err(|e| VerifyFailure::Store(e.to_string()))?;
    if first_difference.is_none() {
        first_difference = expected_entries.next().map(|(k, _)| k.clone());
    }
    match first_difference {
        None => Ok(()),
        Some(key) => Err(VerifyFailure::Block {
            height: written_by.get(&key).copied().unwrap_or(0),
            detail: format!("stored state differs from re-execution at key {key:?}"),
        }),
    }
}

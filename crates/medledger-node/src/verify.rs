//! Independent re-checking of a stored ledger: every block re-executed from genesis.
//!
//! `verify_content` trusts nothing in what a store holds but its bytes: it checks that the
//! block keys run 0, 1, 2, … and decodes each block, re-executes it through the pure core
//! (signatures, certificate chains, contracts), checks the hash chain, the Merkle roots and
//! the state hashes, then compares the stored head and state with what re-execution
//! produced, byte for byte. The first thing that does not hold is reported with the block it
//! belongs to, and nothing after it is checked.
//!
//! It knows no storage engine: redb's page checksums are unkeyed, so anyone who rewrites the
//! file through redb passes them, and these checks alone must catch every change of content
//! (tests/tamper_content.rs changes every byte of it). `verify_store` only reads a store into
//! `StoredContent`.

use std::collections::BTreeMap;

use medledger_core::block::{replay, Block, ChainHead};
use medledger_core::contracts::Candidate;
use medledger_core::state::apply_writes;
use serde::Serialize;

use crate::store::{Store, StoreError};

/// What a store holds, as the bytes it holds them in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredContent {
    /// (height key, serde_json of a `Block`), in key order.
    pub blocks: Vec<(u64, Vec<u8>)>,
    /// serde_json of the `ChainHead` after the last block; None before genesis.
    pub head: Option<Vec<u8>>,
    /// (key, value), in key order.
    pub state: Vec<(String, Vec<u8>)>,
}

impl StoredContent {
    /// Reads everything a store holds. The reads are not one transaction: read a store that
    /// is not being written to (`medledger verify` reads a copy of the file).
    pub fn read(store: &Store) -> Result<StoredContent, StoreError> {
        let head = store.head_bytes()?;
        let mut blocks = Vec::new();
        store.for_each_block(|height, bytes| blocks.push((height, bytes.to_vec())))?;
        let mut state = Vec::new();
        store
            .snapshot()?
            .for_each(|key, value| state.push((key.to_string(), value.to_vec())))?;
        Ok(StoredContent {
            blocks,
            head,
            state,
        })
    }
}

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

/// Reads the store and verifies what it holds (`verify_content`).
pub fn verify_store(store: &Store) -> Result<VerifyReport, VerifyFailure> {
    let content =
        StoredContent::read(store).map_err(|error| VerifyFailure::Store(error.to_string()))?;
    verify_content(&content)
}

/// Re-executes the stored blocks from genesis and checks that they, the stored head and the
/// stored state are exactly what re-execution produces. Pure: no IO, no clock.
pub fn verify_content(content: &StoredContent) -> Result<VerifyReport, VerifyFailure> {
    let stored_head_bytes = content
        .head
        .as_deref()
        .ok_or_else(|| VerifyFailure::Head("the store holds no chain".into()))?;
    let stored_head: ChainHead = serde_json::from_slice(stored_head_bytes)
        .map_err(|e| VerifyFailure::Head(format!("stored head does not decode: {e}")))?;
    let mut state: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // The block that last wrote each key, to name the block a bad state entry belongs to.
    let mut written_by: BTreeMap<String, u64> = BTreeMap::new();
    let mut head: Option<ChainHead> = None;
    let (mut txs, mut committed) = (0u64, 0u64);
    for (height, (key, bytes)) in (0u64..).zip(&content.blocks) {
        let bad = |detail: String| VerifyFailure::Block { height, detail };
        // The store keys each block by its height; a key out of place means a block was
        // removed, repeated or moved, whatever the bytes under it say.
        if *key > height {
            return Err(bad(format!("missing: the next stored block key is {key}")));
        }
        if *key < height {
            return Err(bad(format!(
                "missing: block key {key} is stored again or out of order in its place"
            )));
        }
        let block: Block =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("does not decode: {e}")))?;
        // The store writes blocks in one encoding; any other bytes were not written by a node.
        if serde_json::to_vec(&block).map_err(|e| bad(e.to_string()))? != *bytes {
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
    // As for blocks: equal once decoded is not enough (hex digits, for one, decode in either
    // case), the stored bytes must be the ones the node writes.
    if serde_json::to_vec(&head).expect("heads encode") != stored_head_bytes {
        return Err(VerifyFailure::Head(
            "stored head is not in its stored encoding".into(),
        ));
    }
    compare_state(&content.state, &state, &written_by)?;
    Ok(VerifyReport {
        blocks: content.blocks.len() as u64,
        txs,
        committed,
        rejected: txs - committed,
        state_entries: state.len() as u64,
        head,
    })
}

/// Compares the stored state with the re-executed one, entry by entry.
fn compare_state(
    stored: &[(String, Vec<u8>)],
    expected: &BTreeMap<String, Vec<u8>>,
    written_by: &BTreeMap<String, u64>,
) -> Result<(), VerifyFailure> {
    let mut expected_entries = expected.iter();
    let mut first_difference: Option<&String> = None;
    for (key, value) in stored {
        match expected_entries.next() {
            Some((k, v)) if k == key && v == value => {}
            // The smaller key is the one the other side lacks (or, if equal, whose value
            // differs).
            Some((k, _)) => {
                first_difference = Some(k.min(key));
                break;
            }
            None => {
                first_difference = Some(key);
                break;
            }
        }
    }
    if first_difference.is_none() {
        first_difference = expected_entries.next().map(|(k, _)| k);
    }
    match first_difference {
        None => Ok(()),
        Some(key) => Err(VerifyFailure::Block {
            height: written_by.get(key).copied().unwrap_or(0),
            detail: format!("stored state differs from re-execution at key {key:?}"),
        }),
    }
}

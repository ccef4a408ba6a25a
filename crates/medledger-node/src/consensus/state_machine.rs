//! The Raft state machine: committed proposals become blocks, through the pure core.
//!
//! Applying an entry executes its proposal on top of this node's head and stages the block,
//! its state changes and "applied up to this log id" together (`Store::stage`), in memory,
//! where every read sees them; the ledger's flusher writes them into the ledger file later.
//! The entry is already in Raft's fsynced log on a quorum, a crash re-applies it from
//! there, and the log store purges no entry past the file's last durable write
//! (`LogStore`).
//!
//! A snapshot is the chain itself: every block, which the receiving node re-executes and
//! checks (signatures, links, roots and state hashes) before it takes any of it, in one
//! write transaction, so that a crash mid-install leaves the store as it was.

use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use medledger_core::audit::SignedTreeHead;
use medledger_core::block::{execute_block, replay, Block, ChainHead, BLOCK_TXS_MAX};
use medledger_core::contracts::Candidate;
use medledger_core::state::StateRead;
use medledger_core::tx::{SignedTx, TxId};
use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
};
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use std::sync::atomic::Ordering;
use tokio::sync::watch;

use super::{storage_error, Entry, LogId, Proposal, StorageError, StoredMembership, TypeConfig};
use crate::ledger::{preverify, sign_tree_head, Committed, LedgerStats, NodeIdentity, Waiters};
use crate::store::Store;
use crate::work::Work;

/// What applying an entry did, returned to the writer on the leader.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The height of the block the entry became, if it carried transactions.
    pub height: Option<u64>,
}

/// The state machine's position, stored with the block that moved it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Position {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// What the node shares between the state machine, its ledger and its API.
pub struct Shared {
    pub store: Arc<Store>,
    pub identity: Arc<NodeIdentity>,
    pub latest: Arc<RwLock<Arc<SignedTreeHead>>>,
    pub stats: Arc<LedgerStats>,
    pub waiters: Waiters,
    /// Transactions this node admitted (signature already checked), by id, until applied.
    pub admitted: Mutex<AdmittedCache>,
    /// Signalled whenever checks started by `verify_ahead` finish.
    pub verified_ahead: Condvar,
    /// Set once this node found itself diverged or its store failed: it then serves nothing.
    pub fatal: Mutex<Option<String>>,
    /// The head after the last applied block.
    pub head: watch::Sender<ChainHead>,
}

impl Shared {
    /// A node's shared state: no clients waiting, nothing verified ahead, not stopped.
    pub fn new(
        store: Arc<Store>,
        identity: Arc<NodeIdentity>,
        latest: Arc<RwLock<Arc<SignedTreeHead>>>,
        stats: Arc<LedgerStats>,
        head: watch::Sender<ChainHead>,
    ) -> Shared {
        Shared {
            store,
            identity,
            latest,
            stats,
            waiters: Waiters::default(),
            admitted: Mutex::new(AdmittedCache::default()),
            verified_ahead: Condvar::new(),
            fatal: Mutex::new(None),
            head,
        }
    }

    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().expect("fatal lock").clone()
    }

    fn stop(&self, reason: String) -> StorageError {
        eprintln!("medledger: FATAL: {reason}; this node stops ordering and serving");
        let mut fatal = self.fatal.lock().expect("fatal lock");
        if fatal.is_none() {
            *fatal = Some(reason.clone());
        }
        self.stats.ordering_stopped.store(true, Ordering::Relaxed);
        storage_error(ErrorSubject::StateMachine, ErrorVerb::Write, reason)
    }
}

/// Verified transactions waiting for their block, bounded: the oldest are forgotten first
/// (they are then verified again at apply, which costs time, not correctness).
#[derive(Default)]
pub struct AdmittedCache {
    by_id: std::collections::HashMap<TxId, medledger_core::tx::VerifiedTx>,
    order: std::collections::VecDeque<TxId>,
    /// Transactions whose signatures `verify_ahead` is checking now.
    checking: std::collections::HashSet<TxId>,
}

const ADMITTED_MAX: usize = 65_536;
/// How long applying a block waits for signature checks `verify_ahead` started.
const VERIFY_AHEAD_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(10);

impl AdmittedCache {
    pub fn insert(&mut self, tx: medledger_core::tx::VerifiedTx) {
        let id = tx.id();
        if self.by_id.insert(id, tx).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > ADMITTED_MAX {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }

    fn known(&self, id: &TxId) -> bool {
        self.by_id.contains_key(id) || self.checking.contains(id)
    }

    fn take(&mut self, id: &TxId) -> Option<medledger_core::tx::VerifiedTx> {
        self.by_id.remove(id)
    }
}

#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
    offload: bool,
}

fn read_sm(detail: impl std::fmt::Display) -> StorageError {
    storage_error(ErrorSubject::StateMachine, ErrorVerb::Read, detail)
}

/// The index of the last entry the state machine has stored as applied, if any.
pub(crate) fn applied_index(store: &Store) -> Result<Option<u64>, StorageError> {
    Ok(read_position(store)?
        .last_applied
        .map(|log_id| log_id.index))
}

/// The last entry applied as of the ledger file's last durable write: the furthest Raft's
/// log may be purged without losing what a restart must re-apply.
pub(crate) fn durable_applied(store: &Store) -> Result<Option<LogId>, StorageError> {
    match store.durable_applied_bytes() {
        None => Ok(None),
        Some(bytes) => Ok(decode_position(&bytes)?.last_applied),
    }
}

/// The state machine's stored position (nothing applied yet: the default).
fn read_position(store: &Store) -> Result<Position, StorageError> {
    match store.applied_bytes().map_err(read_sm)? {
        None => Ok(Position::default()),
        Some(bytes) => decode_position(&bytes),
    }
}

/// A stored position that has applied up to `last_applied`, for tests of the log store.
#[cfg(test)]
pub(crate) fn encode_position(last_applied: Option<LogId>) -> Vec<u8> {
    let position = Position {
        last_applied,
        membership: StoredMembership::default(),
    };
    serde_json::to_vec(&position).expect("positions encode")
}

fn decode_position(bytes: &[u8]) -> Result<Position, StorageError> {
    serde_json::from_slice(bytes)
        .map_err(|e| read_sm(format!("the applied position does not decode: {e}")))
}

impl StateMachine {
    pub fn new(shared: Arc<Shared>, offload: bool) -> StateMachine {
        StateMachine { shared, offload }
    }

    fn position(&self) -> Result<Position, StorageError> {
        read_position(&self.shared.store)
    }

    /// Applies entries in order; runs on a blocking thread when offloading.
    fn apply_all(shared: &Shared, entries: Vec<Entry>) -> Result<Vec<Applied>, StorageError> {
        let mut position = read_position(&shared.store)?;
        let mut results = Vec::with_capacity(entries.len());
        for entry in entries {
            position.last_applied = Some(entry.log_id);
            let proposal = match entry.payload {
                EntryPayload::Blank => None,
                EntryPayload::Membership(membership) => {
                    position.membership = StoredMembership::new(Some(entry.log_id), membership);
                    None
                }
                EntryPayload::Normal(proposal) => Some(proposal),
            };
            let position_bytes = serde_json::to_vec(&position).expect("positions encode");
            let height = match proposal {
                None => {
                    shared
                        .store
                        .stage(None, &position_bytes)
                        .map_err(|e| shared.stop(format!("storing the applied position: {e}")))?;
                    None
                }
                Some(proposal) => apply_proposal(shared, proposal, &position_bytes)?,
            };
            results.push(Applied { height });
        }
        Ok(results)
    }
}

/// Executes one proposal on top of this node's head and commits the block.
fn apply_proposal(
    shared: &Shared,
    proposal: Proposal,
    position: &[u8],
) -> Result<Option<u64>, StorageError> {
    let store = &shared.store;
    let head = store
        .head()
        .map_err(|e| shared.stop(format!("reading the head: {e}")))?
        .ok_or_else(|| shared.stop("the store has no genesis".into()))?;
    if let Some(checkpoint) = proposal.checkpoint {
        // Usually the block just before this one: the head names its hash.
        let ours = if checkpoint.height == head.height {
            Some(head.block_hash)
        } else {
            store
                .block(checkpoint.height)
                .map_err(|e| shared.stop(format!("reading block {}: {e}", checkpoint.height)))?
                .map(|block| block.header.hash())
        };
        match ours {
            Some(hash) if hash == checkpoint.block_hash => {}
            Some(hash) => {
                return Err(shared.stop(format!(
                    "state diverged: block {} here is {hash}, the leader {} has {}",
                    checkpoint.height, proposal.proposer, checkpoint.block_hash
                )))
            }
            None => {
                return Err(shared.stop(format!(
                    "state diverged: the leader {} has block {} and this node does not",
                    proposal.proposer, checkpoint.height
                )))
            }
        }
    }
    if proposal.txs.is_empty() || proposal.txs.len() > BLOCK_TXS_MAX {
        // An empty proposal makes no block; an oversized one (only a faulty leader sends
        // one) is skipped the same way on every node.
        if !proposal.txs.is_empty() {
            eprintln!(
                "medledger: skipping a proposal of {} transactions from {}",
                proposal.txs.len(),
                proposal.proposer
            );
        }
        store
            .stage(None, position)
            .map_err(|e| shared.stop(format!("storing the applied position: {e}")))?;
        return Ok(None);
    }
    let snapshot = store
        .snapshot()
        .map_err(|e| shared.stop(format!("reading state: {e}")))?;
    let candidates = candidates(shared, &snapshot, proposal.txs);
    let time_ms = proposal.time_ms.max(head.time_ms);
    let executed = store
        .work()
        .measure(Work::Execute, || {
            execute_block(&snapshot, &head, &proposal.proposer, time_ms, candidates)
        })
        .map_err(|e| shared.stop(format!("executing block {}: {e}", head.height + 1)))?;
    drop(snapshot);
    // Staged, every read sees the block; it is announced (its clients answered) only then.
    // The ledger file takes it at the next flush; a crash before that re-applies the entry
    // from Raft's log to the same outcome.
    store
        .work()
        .measure(Work::Stage, || store.stage(Some(&executed), position))
        .map_err(|e| shared.stop(format!("storing block {}: {e}", head.height + 1)))?;
    announce(shared, &head, &executed);
    Ok(Some(executed.head.height))
}

/// Checks the signatures of transactions this node will apply but did not admit itself
/// (in entries from the leader; forwarded to the leader by a follower) on a blocking thread,
/// off the node's serial apply: applying them later finds them verified (`candidates` waits
/// for checks under way rather than repeating them). A transaction whose signer is not yet
/// known here (registered in an entry not yet applied) is left to be checked when applied.
pub(crate) fn verify_ahead<'a>(shared: &Arc<Shared>, txs: impl IntoIterator<Item = &'a SignedTx>) {
    let txs: Vec<(TxId, SignedTx)> = {
        let mut admitted = shared.admitted.lock().expect("admitted lock");
        let mut fresh = Vec::new();
        for tx in txs {
            if let Ok(id) = tx.id() {
                if !admitted.known(&id) {
                    admitted.checking.insert(id);
                    fresh.push((id, tx.clone()));
                }
            }
        }
        fresh
    };
    if txs.is_empty() {
        return;
    }
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let ids: Vec<TxId> = txs.iter().map(|(id, _)| *id).collect();
        // A check on a key replaced by a block applied meanwhile is refused at apply, which
        // compares the key's fingerprint with the signer's then.
        let verified = match shared.store.snapshot() {
            Ok(snapshot) => preverify(
                &snapshot,
                shared.store.work(),
                txs.into_iter().map(|(_, tx)| tx).enumerate().collect(),
            ),
            Err(_) => Vec::new(),
        };
        let mut admitted = shared.admitted.lock().expect("admitted lock");
        for id in &ids {
            admitted.checking.remove(id);
        }
        for (_, candidate) in verified {
            if let Candidate::Verified(tx) = candidate {
                admitted.insert(tx);
            }
        }
        drop(admitted);
        shared.verified_ahead.notify_all();
    });
}

/// The transactions of entries that arrived from the leader.
pub(crate) fn entry_txs(entries: &[Entry]) -> impl Iterator<Item = &SignedTx> {
    entries
        .iter()
        .filter_map(|entry| match &entry.payload {
            EntryPayload::Normal(proposal) => Some(proposal.txs.iter()),
            _ => None,
        })
        .flatten()
}

/// The block's transactions as candidates: those this node admitted are already verified;
/// the others are verified here, in parallel, before the (serial) execution.
fn candidates<S: StateRead + ?Sized>(
    shared: &Shared,
    state: &S,
    txs: Vec<SignedTx>,
) -> Vec<Candidate> {
    let mut known = Vec::with_capacity(txs.len());
    let mut unknown = Vec::new();
    {
        let mut admitted = shared.admitted.lock().expect("admitted lock");
        // Checks under way finish within milliseconds; should one never report (its thread
        // died), the transactions are checked here after a while.
        let ids: Vec<TxId> = txs.iter().filter_map(|tx| tx.id().ok()).collect();
        let give_up = Instant::now() + VERIFY_AHEAD_WAIT_MAX;
        while ids.iter().any(|id| admitted.checking.contains(id)) {
            let Some(left) = give_up.checked_duration_since(Instant::now()) else {
                break;
            };
            admitted = shared
                .verified_ahead
                .wait_timeout(admitted, left)
                .expect("admitted lock")
                .0;
        }
        for (position, tx) in txs.into_iter().enumerate() {
            match tx.id().ok().and_then(|id| admitted.take(&id)) {
                Some(verified) if verified.tx() == &tx => {
                    known.push((position, Candidate::Verified(verified)))
                }
                _ => unknown.push((position, tx)),
            }
        }
    }
    let verified = preverify(state, shared.store.work(), unknown);
    let mut all: Vec<(usize, Candidate)> = known.into_iter().chain(verified).collect();
    all.sort_by_key(|(position, _)| *position);
    all.into_iter().map(|(_, candidate)| candidate).collect()
}

/// After a block is stored: the new tree head, counters and the clients waiting.
fn announce(
    shared: &Shared,
    previous: &ChainHead,
    executed: &medledger_core::block::ExecutedBlock,
) {
    let stats = &shared.stats;
    stats.blocks.fetch_add(1, Ordering::Relaxed);
    stats
        .txs
        .fetch_add(executed.block.txs.len() as u64, Ordering::Relaxed);
    let tree_head = Arc::new(sign_tree_head(&shared.identity, &executed.head));
    *shared.latest.write().expect("tree head lock") = tree_head.clone();
    for (position, (tx, outcome)) in executed
        .block
        .txs
        .iter()
        .zip(&executed.block.outcomes)
        .enumerate()
    {
        let Ok(tx_id) = tx.id() else { continue };
        shared.waiters.resolve(&tx_id, || Committed {
            tx_id,
            height: executed.head.height,
            leaf_index: previous.log_size + position as u64,
            position: position as u64,
            outcome: outcome.clone(),
            tree_head: tree_head.clone(),
        });
    }
    shared.head.send_replace(executed.head.clone());
}

/// The chain as a snapshot: length-prefixed stored blocks, in height order.
fn encode_blocks(store: &Store) -> Result<(Option<Vec<u8>>, Vec<u8>), StorageError> {
    let (position, blocks) = store.applied_and_blocks().map_err(read_sm)?;
    let mut data = Vec::new();
    for block in blocks {
        data.extend_from_slice(&(block.len() as u32).to_be_bytes());
        data.extend_from_slice(&block);
    }
    Ok((position, data))
}

fn decode_blocks(data: &[u8]) -> Result<Vec<Block>, String> {
    let mut blocks = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err("a truncated block length".into());
        }
        let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        rest = &rest[4..];
        if rest.len() < len {
            return Err("a truncated block".into());
        }
        let block: Block = serde_json::from_slice(&rest[..len])
            .map_err(|e| format!("block {} does not decode: {e}", blocks.len()))?;
        blocks.push(block);
        rest = &rest[len..];
    }
    Ok(blocks)
}

impl StateMachine {
    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let (position, data) = encode_blocks(&self.shared.store)?;
        let Some(position) = position else {
            return Ok(None);
        };
        // Read with the blocks, in one transaction: the position the blocks reach.
        let position = decode_position(&position)?;
        let Some(last) = position.last_applied else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            meta: SnapshotMeta {
                last_log_id: Some(last),
                last_membership: position.membership,
                snapshot_id: format!("{}-{}", last.leader_id.term, last.index),
            },
            snapshot: Box::new(Cursor::new(data)),
        }))
    }

    /// Takes a snapshot's blocks: those this node has must be the same; the others are
    /// re-executed and checked, all in one write transaction with the new position.
    fn install(shared: &Shared, position: Vec<u8>, blocks: Vec<Block>) -> Result<(), StorageError> {
        let mut head = shared
            .store
            .head()
            .map_err(|e| shared.stop(format!("reading the head: {e}")))?;
        let mut fresh = Vec::new();
        for block in blocks {
            let height = block.header.height;
            match &head {
                Some(ours) if height <= ours.height => {
                    let stored = shared
                        .store
                        .block(height)
                        .map_err(|e| shared.stop(format!("reading block {height}: {e}")))?;
                    if stored.map(|b| b.header.hash()) != Some(block.header.hash()) {
                        return Err(shared.stop(format!(
                            "state diverged: the snapshot's block {height} differs from this node's"
                        )));
                    }
                }
                _ => fresh.push(block),
            }
        }
        let previous = head.clone();
        let installed = shared
            .store
            .apply_blocks(&fresh, &position, |state, head, block| {
                replay(state, head, block, |txs| {
                    preverify(
                        state,
                        shared.store.work(),
                        txs.into_iter().enumerate().collect(),
                    )
                    .into_iter()
                    .map(|(_, c)| c)
                    .collect()
                })
                .map_err(|e| e.to_string())
            })
            .map_err(|e| {
                storage_error(
                    ErrorSubject::Snapshot(None),
                    ErrorVerb::Write,
                    format!("the snapshot does not check out: {e}"),
                )
            })?;
        if let Some(last) = installed.last() {
            head = Some(last.clone());
            let tree_head = Arc::new(sign_tree_head(&shared.identity, last));
            *shared.latest.write().expect("tree head lock") = tree_head;
            shared
                .stats
                .blocks
                .fetch_add(installed.len() as u64, Ordering::Relaxed);
        }
        if let Some(head) = head {
            if previous.as_ref() != Some(&head) {
                shared.head.send_replace(head);
            }
        }
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // The blocks are the snapshot and they are already stored: building one only marks
        // the point up to which Raft may purge its log; the bytes are read when a lagging
        // node needs them (`get_current_snapshot`), as of then.
        let position = self.position()?;
        let last = position.last_applied;
        Ok(Snapshot {
            meta: SnapshotMeta {
                last_log_id: last,
                last_membership: position.membership,
                snapshot_id: match last {
                    Some(last) => format!("{}-{}", last.leader_id.term, last.index),
                    None => "empty".into(),
                },
            },
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let position = self.position()?;
        Ok((position.last_applied, position.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        if let Some(reason) = self.shared.fatal() {
            return Err(read_sm(reason));
        }
        let entries: Vec<Entry> = entries.into_iter().collect();
        if self.offload {
            let shared = self.shared.clone();
            tokio::task::spawn_blocking(move || StateMachine::apply_all(&shared, entries))
                .await
                .map_err(read_sm)?
        } else {
            StateMachine::apply_all(&self.shared, entries)
        }
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, super::NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let blocks = decode_blocks(snapshot.get_ref()).map_err(|e| {
            storage_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                e,
            )
        })?;
        let position = Position {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let position = serde_json::to_vec(&position).expect("positions encode");
        if self.offload {
            let shared = self.shared.clone();
            tokio::task::spawn_blocking(move || StateMachine::install(&shared, position, blocks))
                .await
                .map_err(read_sm)?
        } else {
            StateMachine::install(&self.shared, position, blocks)
        }
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        if self.offload {
            let this = self.clone();
            tokio::task::spawn_blocking(move || this.current_snapshot())
                .await
                .map_err(read_sm)?
        } else {
            self.current_snapshot()
        }
    }
}

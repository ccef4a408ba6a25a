//! Raft's log and vote on disk: raft-log's write-ahead log in the node's `raft-log`
//! directory.
//!
//! A write is appended to the open chunk file and made durable with one `fdatasync`;
//! raft-log's flush worker syncs whatever writes have queued meanwhile together (group
//! commit). Every record carries a checksum: at open, a last record cut short by a crash is
//! dropped (it was never reported durable), and any other damage is an error, so a node
//! does not start on a log it cannot trust. Purged chunks are deleted once the purge is
//! durable.
//!
//! An entry is stored as the JSON the log always used, its log id as `((term, node), index)`
//! and the vote as JSON. A node whose data directory predates the write-ahead log kept its
//! log in the redb file `raft.redb`; `open` carries the vote, the purge point and the entries
//! over once, durably, and only then removes that file.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::CommittedLeaderId;
use raft_log::api::raft_log_writer::RaftLogWriter;
use redb::{ReadableDatabase, ReadableTable};

use super::LogId;
use crate::store::{StoreError, PURGED_KEY, RAFT_LOG, RAFT_META, VOTE_KEY};

/// The write-ahead log's directory inside a node's data directory.
pub const WAL_DIR: &str = "raft-log";
/// Where nodes kept Raft's log and vote before the write-ahead log.
pub const LEGACY_RAFT_FILE: &str = "raft.redb";
/// Largest chunk file: a purge deletes whole chunks, so this bounds what a purged log keeps.
const CHUNK_BYTES_MAX: usize = 64 << 20;
/// Bytes of entries raft-log keeps in memory for reads (the log store keeps the latest
/// entries decoded besides, see `log_store::Recent`).
const CACHE_BYTES_MAX: usize = 16 << 20;

/// The types raft-log stores for us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalTypes;

/// A log id as raft-log keeps it: `((term, leader node), index)`, ordered as openraft orders
/// log ids.
pub type WalLogId = ((u64, u64), u64);

impl raft_log::Types for WalTypes {
    type LogId = WalLogId;
    /// The entry's JSON encoding.
    type LogPayload = Vec<u8>;
    /// The vote's JSON encoding.
    type Vote = Vec<u8>;
    type UserData = ();
    type Callback = WalDone;

    fn log_index(log_id: &WalLogId) -> u64 {
        log_id.1
    }

    fn payload_size(payload: &Vec<u8>) -> u64 {
        payload.len() as u64
    }
}

pub fn wal_log_id(log_id: &LogId) -> WalLogId {
    (
        (log_id.leader_id.term, log_id.leader_id.node_id),
        log_id.index,
    )
}

pub fn log_id(wal: &WalLogId) -> LogId {
    LogId::new(CommittedLeaderId::new(wal.0 .0, wal.0 .1), wal.1)
}

/// What runs once raft-log has made a write durable, or failed to: called on its flush
/// worker's thread.
pub struct WalDone(Box<dyn FnOnce(io::Result<()>) + Send>);

impl WalDone {
    pub fn new(done: impl FnOnce(io::Result<()>) + Send + 'static) -> WalDone {
        WalDone(Box::new(done))
    }
}

impl fmt::Debug for WalDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WalDone")
    }
}

impl raft_log::Callback for WalDone {
    fn send(self, result: io::Result<()>) {
        (self.0)(result)
    }
}

/// The open write-ahead log; writers and readers take turns (writes only queue their bytes
/// for the flush worker, so none holds the lock across an fsync).
pub type Wal = Mutex<raft_log::RaftLog<WalTypes>>;

fn storage(error: impl fmt::Display) -> StoreError {
    StoreError::Storage(format!("raft log: {error}"))
}

/// Opens (creating if needed) the write-ahead log of the node whose data is in `data_dir`,
/// carrying over a log kept in `raft.redb` by an earlier version.
pub fn open(data_dir: &Path) -> Result<Wal, StoreError> {
    let dir = data_dir.join(WAL_DIR);
    std::fs::create_dir_all(&dir).map_err(storage)?;
    let path = dir
        .to_str()
        .ok_or_else(|| storage(format!("{} is not a UTF-8 path", dir.display())))?;
    let mut config = raft_log::Config::new(path);
    // A write is synced as soon as the worker takes it; writes that queue meanwhile join the
    // next sync. Waiting for company would only add latency to a lone client's commit.
    config.wal.flush_batch_wait = Some(Duration::ZERO);
    config.wal.chunk_max_size = Some(CHUNK_BYTES_MAX);
    config.log_cache_capacity = Some(CACHE_BYTES_MAX);
    let wal = Mutex::new(raft_log::RaftLog::open(Arc::new(config)).map_err(storage)?);
    let legacy = data_dir.join(LEGACY_RAFT_FILE);
    if legacy.exists() {
        migrate(&legacy, &wal)?;
        std::fs::remove_file(&legacy).map_err(storage)?;
        std::fs::File::open(data_dir)
            .and_then(|d| d.sync_all())
            .map_err(storage)?;
    }
    Ok(wal)
}

/// Queues a durable flush of everything written so far and waits until it is done.
pub fn flush_and_wait(wal: &Wal) -> io::Result<()> {
    let (done, durable) = std::sync::mpsc::sync_channel(1);
    wal.lock().expect("raft log lock").flush(
        true,
        Some(WalDone::new(move |result| {
            let _ = done.send(result);
        })),
    )?;
    durable
        .recv()
        .map_err(|_| io::Error::other("the raft log's flush worker stopped"))?
}

/// Copies the vote, the purge point and the entries of a `raft.redb` into an empty
/// write-ahead log, durably.
fn migrate(legacy: &Path, wal: &Wal) -> Result<(), StoreError> {
    let db = redb::Database::open(legacy).map_err(storage)?;
    let txn = db.begin_read().map_err(storage)?;
    let meta = txn.open_table(RAFT_META).map_err(storage)?;
    let vote = meta
        .get(VOTE_KEY)
        .map_err(storage)?
        .map(|v| v.value().to_vec());
    let purged: Option<LogId> = match meta.get(PURGED_KEY).map_err(storage)? {
        None => None,
        Some(bytes) => serde_json::from_slice(bytes.value()).map_err(storage)?,
    };
    let log = txn.open_table(RAFT_LOG).map_err(storage)?;
    let mut entries = Vec::new();
    for item in log.iter().map_err(storage)? {
        let (_, bytes) = item.map_err(storage)?;
        let entry: super::Entry = serde_json::from_slice(bytes.value()).map_err(storage)?;
        entries.push((wal_log_id(&entry.log_id), bytes.value().to_vec()));
    }
    {
        let mut wal = wal.lock().expect("raft log lock");
        let state = wal.log_state();
        if state.last().is_some() || state.vote().is_some() || state.purged().is_some() {
            return Err(storage(format!(
                "both {} and {WAL_DIR}/ hold a log; move one away",
                legacy.display()
            )));
        }
        if let Some(vote) = vote {
            wal.save_vote(vote).map_err(storage)?;
        }
        if let Some(purged) = purged {
            wal.purge(wal_log_id(&purged)).map_err(storage)?;
        }
        if !entries.is_empty() {
            wal.append(entries).map_err(storage)?;
        }
    }
    flush_and_wait(wal).map_err(storage)
}

//! Raft's log and vote, durable in the node's redb file.
//!
//! Every append, vote, truncation and purge is an fsynced redb commit before openraft hears
//! it is done. Because the state machine's commits share the file and skip their own fsync
//! (see `StateMachine`), each of these commits also makes every earlier block durable.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader};
use redb::{ReadableDatabase, ReadableTable};

use super::{storage_error, Entry, LogId, StorageError, TypeConfig, Vote};
use crate::ledger::LedgerStats;
use crate::store::{Store, RAFT_LOG, RAFT_META};

const VOTE_KEY: &str = "vote";
const COMMITTED_KEY: &str = "committed";
const PURGED_KEY: &str = "last_purged";

/// Raft's log store over the node's `Store`. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct LogStore {
    store: Arc<Store>,
    /// Run blocking IO on tokio's blocking pool (nodes) or inline (single-threaded
    /// simulations, where the store is in memory).
    offload: bool,
    /// Counts the fsyncs (durable log commits), when given.
    stats: Option<Arc<LedgerStats>>,
}

fn read_error(detail: impl std::fmt::Display) -> StorageError {
    storage_error(ErrorSubject::Logs, ErrorVerb::Read, detail)
}

fn write_error(detail: impl std::fmt::Display) -> StorageError {
    storage_error(ErrorSubject::Logs, ErrorVerb::Write, detail)
}

impl LogStore {
    pub fn new(store: Arc<Store>, offload: bool) -> LogStore {
        LogStore {
            store,
            offload,
            stats: None,
        }
    }

    /// Counts this log's durable commits in `stats.fsyncs`.
    pub fn with_stats(mut self, stats: Arc<LedgerStats>) -> LogStore {
        self.stats = Some(stats);
        self
    }

    fn synced(&self) {
        if let Some(stats) = &self.stats {
            stats
                .fsyncs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Runs `work` against the database, off the async threads when offloading.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Store) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        if self.offload {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || work(&store))
                .await
                .map_err(write_error)?
        } else {
            work(&self.store)
        }
    }

    fn meta<T: serde::de::DeserializeOwned>(
        store: &Store,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let txn = store.database().begin_read().map_err(read_error)?;
        let table = txn.open_table(RAFT_META).map_err(read_error)?;
        match table.get(key).map_err(read_error)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(bytes.value())
                .map(Some)
                .map_err(|e| read_error(format!("raft {key} does not decode: {e}"))),
        }
    }

    fn put_meta<T: serde::Serialize>(
        store: &Store,
        key: &str,
        value: &T,
        durable: bool,
    ) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(write_error)?;
        let mut txn = store.database().begin_write().map_err(write_error)?;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(write_error)?;
        }
        {
            let mut table = txn.open_table(RAFT_META).map_err(write_error)?;
            table.insert(key, bytes.as_slice()).map_err(write_error)?;
        }
        txn.commit().map_err(write_error)
    }

    fn entries(
        store: &Store,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<Vec<Entry>, StorageError> {
        let txn = store.database().begin_read().map_err(read_error)?;
        let table = txn.open_table(RAFT_LOG).map_err(read_error)?;
        let mut out = Vec::new();
        for item in table.range::<u64>((start, end)).map_err(read_error)? {
            let (index, bytes) = item.map_err(read_error)?;
            let entry: Entry = serde_json::from_slice(bytes.value()).map_err(|e| {
                read_error(format!(
                    "raft log entry {} does not decode: {e}",
                    index.value()
                ))
            })?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        self.run(move |store| LogStore::entries(store, start, end))
            .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.run(|store| {
            let last_purged_log_id: Option<LogId> = LogStore::meta(store, PURGED_KEY)?;
            let txn = store.database().begin_read().map_err(read_error)?;
            let table = txn.open_table(RAFT_LOG).map_err(read_error)?;
            let last = match table.last().map_err(read_error)? {
                None => None,
                Some((_, bytes)) => {
                    let entry: Entry = serde_json::from_slice(bytes.value())
                        .map_err(|e| read_error(format!("last raft entry: {e}")))?;
                    Some(entry.log_id)
                }
            };
            Ok(LogState {
                last_purged_log_id,
                last_log_id: last.or(last_purged_log_id),
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.synced();
        self.run(move |store| LogStore::put_meta(store, VOTE_KEY, &vote, true))
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.run(|store| LogStore::meta(store, VOTE_KEY)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // A hint that lets a restarted node apply what it knows committed before it hears
        // from a leader; losing it in a crash loses nothing, so no fsync of its own.
        self.run(move |store| LogStore::put_meta(store, COMMITTED_KEY, &committed, false))
            .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.run(|store| Ok(LogStore::meta::<Option<LogId>>(store, COMMITTED_KEY)?.flatten()))
            .await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(write_error)?;
            encoded.push((entry.log_id.index, bytes));
        }
        let result = self
            .run(move |store| {
                let txn = store.database().begin_write().map_err(write_error)?;
                {
                    let mut table = txn.open_table(RAFT_LOG).map_err(write_error)?;
                    for (index, bytes) in &encoded {
                        table
                            .insert(*index, bytes.as_slice())
                            .map_err(write_error)?;
                    }
                }
                txn.commit().map_err(write_error)
            })
            .await;
        match result {
            Ok(()) => {
                self.synced();
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(error) => {
                callback.log_io_completed(Err(std::io::Error::other(error.to_string())));
                Err(error)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.run(move |store| {
            let txn = store.database().begin_write().map_err(write_error)?;
            {
                let mut table = txn.open_table(RAFT_LOG).map_err(write_error)?;
                table
                    .retain_in::<u64, _>(log_id.index.., |_, _| false)
                    .map_err(write_error)?;
            }
            txn.commit().map_err(write_error)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.run(move |store| {
            let bytes = serde_json::to_vec(&Some(log_id)).map_err(write_error)?;
            // Durable, like every log commit: it also makes the blocks applied so far durable,
            // which must hold before the entries that produced them are gone.
            let txn = store.database().begin_write().map_err(write_error)?;
            {
                let mut table = txn.open_table(RAFT_LOG).map_err(write_error)?;
                table
                    .retain_in::<u64, _>(..=log_id.index, |_, _| false)
                    .map_err(write_error)?;
                let mut meta = txn.open_table(RAFT_META).map_err(write_error)?;
                meta.insert(PURGED_KEY, bytes.as_slice())
                    .map_err(write_error)?;
            }
            txn.commit().map_err(write_error)
        })
        .await
    }
}

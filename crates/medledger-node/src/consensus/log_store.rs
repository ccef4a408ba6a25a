//! Raft's log and vote, durable in the store's Raft log (`store::RaftDisk`): the
//! write-ahead log of a node on disk (`wal`), or redb tables of a store in memory.
//!
//! Every append, vote, truncation and purge is durable before openraft hears it is done.
//! The state machine stages what it applies in memory (see `StateMachine`); the ledger's
//! flusher thread, started with the writer, writes it into the ledger file every second and
//! fsyncs it every five (`flush_ledger`). A purge goes no further than the last of those
//! durable writes (`Store::durable_applied_bytes`), so it never waits for one.
//!
//! On a node, `append` puts the entries where reads see them (`recent`) and queues them on
//! the write-ahead log, whose flush worker syncs whatever has queued (group commit) and
//! then reports each append as flushed. (openraft 0.9's core still waits for that report
//! before it sends the entries to followers, so on the leader the sync precedes
//! replication; a Raft engine with asynchronous log IO would overlap them.) Truncations,
//! purges and votes go through the log's writer thread, in order, and are awaited.
//!
//! Reads of the latest entries (replication to followers that keep up, and the entries
//! openraft's core hands to the state machine, read inside its own loop) are served from
//! `recent`, which keeps the entries not yet durable and, within `RECENT_BYTES_MAX`, the
//! latest durable ones, with the stored vote; older ranges are read from the disk.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader};
use redb::{ReadableDatabase, ReadableTable};

use super::wal::{self, WalDone};
use super::{storage_error, Entry, LogId, StorageError, TypeConfig, Vote};
use crate::ledger::LedgerStats;
use crate::store::{RaftDisk, Store, PURGED_KEY, RAFT_LOG, RAFT_META, VOTE_KEY};
use raft_log::api::raft_log_writer::RaftLogWriter;

/// Longest a purge waits for the state machine to store what it would purge.
const PURGE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(120);
/// How often the ledger's flusher writes what the state machine staged into the ledger file
/// (`Store::flush`, from `flush_ledger`). Each flush writes every key changed since the
/// last one once, so the longer the interval the less B-tree work per block, and the longer
/// each flush holds redb's write lock (no reader waits for it) and the more it stages in
/// memory.
const LEDGER_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How often a flush is fsynced, making the ledger file durable. A durable commit writes
/// out every page changed since the last one and syncs them, and that disk traffic slows
/// every node's log syncs meanwhile; every five seconds keeps it rare. A restart then
/// re-applies at most five seconds of blocks from the log.
const LEDGER_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// Bytes (encoded) of durable entries that `recent` keeps for reads, besides those not yet
/// durable, which it always keeps.
const RECENT_BYTES_MAX: usize = 16 << 20;

/// Raft's log store over the node's `Store`. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct LogStore {
    store: Arc<Store>,
    /// Run blocking IO on a writer thread and tokio's blocking pool (nodes) or inline
    /// (single-threaded simulations, where the store is in memory).
    offload: bool,
    /// Counts the fsyncs (durable log commits), when given.
    stats: Option<Arc<LedgerStats>>,
    /// The latest entries and the vote, for reads (see [`Recent`]).
    recent: Arc<Mutex<Recent>>,
    writer: Option<mpsc::Sender<Job>>,
    /// Set on the readers handed to replication: the leader they replicate for. Once the
    /// stored vote names another leader, they read nothing (see `try_get_log_entries`).
    replicating_for: Option<openraft::LeaderId<u64>>,
}

/// The latest entries appended, by index, and the stored vote: what reads are answered from
/// without the database. Every entry not yet durable is here; durable ones stay while they
/// fit in `RECENT_BYTES_MAX`, the oldest leaving first. An append replaces the entries from
/// its index on, a truncation drops the end and a purge the start, so the entries held
/// normally form one unbroken run; reads check that they do and go to the disk when not.
#[derive(Default)]
struct Recent {
    /// Each entry with its encoded size and whether it is durable yet.
    entries: BTreeMap<u64, (Entry, usize, bool)>,
    /// Encoded bytes of the durable entries held.
    durable_bytes: usize,
    /// The vote as stored; `None` until known (read at start, or saved since).
    vote: Option<Option<Vote>>,
}

impl Recent {
    fn append(&mut self, entry: Entry, size: usize) {
        self.truncate(entry.log_id.index);
        self.entries
            .insert(entry.log_id.index, (entry, size, false));
    }

    /// The entry `log_id` is durable now (if it is still the one held at its index).
    fn made_durable(&mut self, log_id: &LogId) {
        if let Some((entry, size, durable)) = self.entries.get_mut(&log_id.index) {
            if entry.log_id == *log_id && !*durable {
                *durable = true;
                self.durable_bytes += *size;
            }
        }
        while self.durable_bytes > RECENT_BYTES_MAX {
            match self.entries.first_key_value() {
                Some((&index, (_, _, true))) => self.remove(index),
                _ => break,
            }
        }
    }

    fn remove(&mut self, index: u64) {
        if let Some((_, size, true)) = self.entries.remove(&index) {
            self.durable_bytes -= size;
        }
    }

    /// Drops the entries from `index` on.
    fn truncate(&mut self, index: u64) {
        let dropped = self.entries.split_off(&index);
        for (_, size, durable) in dropped.values() {
            if *durable {
                self.durable_bytes -= size;
            }
        }
    }

    /// Drops the entries up to `index`, included.
    fn purge(&mut self, index: u64) {
        while let Some(&first) = self.entries.keys().next() {
            if first > index {
                break;
            }
            self.remove(first);
        }
    }

    /// The entries in `[from, end)`, when every entry of the log from `from` on is held and
    /// the vote is known; `None` sends the read to the disk. A reader replicating for a
    /// leader the vote no longer names gets nothing (see `try_get_log_entries`).
    fn serve(
        &self,
        from: Bound<u64>,
        end: Bound<u64>,
        replicating_for: Option<openraft::LeaderId<u64>>,
    ) -> Option<Vec<Entry>> {
        let from = match from {
            Bound::Included(index) => index,
            Bound::Excluded(index) => index.checked_add(1)?,
            Bound::Unbounded => return None,
        };
        let (&first, _) = self.entries.first_key_value()?;
        if from < first {
            return None;
        }
        if let Some(leader) = replicating_for {
            let vote = self.vote?;
            if vote.map(|vote| vote.leader_id) != Some(leader) {
                return Some(Vec::new());
            }
        }
        let mut out = Vec::new();
        let held = self.entries.range((Bound::Included(from), end));
        for (expected, (&index, (entry, _, _))) in (from..).zip(held) {
            if index != expected {
                return None;
            }
            out.push(entry.clone());
        }
        Some(out)
    }
}

/// Work for the log's writer thread.
enum Job {
    Append(Vec<(LogId, Vec<u8>)>, LogFlushed<TypeConfig>),
    /// Anything else that must be durable in order: done, then answered.
    Other(LogWork, oneshot::Sender<Result<(), StorageError>>),
}

type LogWork = Box<dyn FnOnce(&Store) -> Result<(), StorageError> + Send>;

/// Counts one durable log commit, when counting.
fn count_fsync(stats: &Option<Arc<LedgerStats>>) {
    if let Some(stats) = stats {
        stats
            .fsyncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The writer thread: commits queued appends together, other jobs one by one, in order.
fn write_log(
    store: Arc<Store>,
    recent: Arc<Mutex<Recent>>,
    stats: Option<Arc<LedgerStats>>,
    jobs: mpsc::Receiver<Job>,
) {
    let synced = || count_fsync(&stats);
    // The ledger's flusher lives as long as this thread: it stops when the log is dropped.
    let (stop_flushing, stopped) = mpsc::channel::<()>();
    let flusher = {
        let store = store.clone();
        std::thread::Builder::new()
            .name("medledger-ledger".into())
            .spawn(move || flush_ledger(&store, &stopped))
            .expect("spawn the ledger flusher")
    };
    let next_job = || jobs.recv().ok();
    let mut next = next_job();
    while let Some(job) = next.take() {
        match job {
            Job::Other(work, reply) => {
                let _ = reply.send(work(&store));
                synced();
                next = next_job();
            }
            Job::Append(entries, callback) => {
                let mut batch = vec![(entries, callback)];
                // Group commit: every append already queued goes into this transaction.
                loop {
                    match jobs.try_recv() {
                        Ok(Job::Append(entries, callback)) => batch.push((entries, callback)),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let mut entries = Vec::new();
                let mut callbacks = Vec::new();
                for (batch_entries, callback) in batch {
                    entries.extend(batch_entries);
                    callbacks.push(callback);
                }
                let log_ids: Vec<LogId> = entries.iter().map(|(log_id, _)| *log_id).collect();
                let recent = recent.clone();
                append_durably(&store, entries, move |result| {
                    flushed(&recent, &log_ids, callbacks, result)
                });
                synced();
                if next.is_none() {
                    next = next_job();
                }
            }
        }
    }
    drop(stop_flushing);
    let _ = flusher.join();
}

/// The state machine stages what it applies in memory (a crash re-applies it from this
/// log); this thread flushes it into the ledger file every `LEDGER_FLUSH_INTERVAL`, and
/// makes the file durable every `LEDGER_SYNC_INTERVAL`, so that a restart has little to
/// re-apply, until `stopped` hears from its sender or loses it, or a flush fails (the
/// store then refuses to stage, and the node stops at its next entry).
///
/// It runs at a lower CPU priority than the node's other threads (`nice` 10, on Linux), so
/// a flush takes the time the node leaves idle rather than that of a commit under way
/// (alternating runs of `bench ledger --txs 4000`: single-client p99 4.4–4.8 ms against
/// 4.9–6.5 ms without). Should it fall behind, the state machine flushes itself
/// (`Store::stage`).
fn flush_ledger(store: &Store, stopped: &mpsc::Receiver<()>) {
    lower_priority();
    let mut synced = Instant::now();
    // Whether a flush since the last durable one skipped its fsync.
    let mut unsynced = false;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(LEDGER_FLUSH_INTERVAL) {
        let durable = synced.elapsed() >= LEDGER_SYNC_INTERVAL;
        let due = store.has_staged() || (durable && unsynced);
        if !due {
            continue;
        }
        match store.flush(durable) {
            Ok(()) if durable => {
                unsynced = false;
                synced = Instant::now();
            }
            Ok(()) => unsynced = true,
            Err(error) => {
                // redb refuses every write after an I/O error until the file is reopened,
                // and the store now refuses to stage, so the node stops at its next entry:
                // one message, not one a second until it does.
                eprintln!(
                    "medledger: writing the ledger file: {error}; no further flushes until \
                     the node restarts (what is only staged is applied again from Raft's log)"
                );
                return;
            }
        }
    }
}

/// Lowers the calling thread's CPU priority (Linux threads have their own `nice`) and asks
/// for a short time slice.
///
/// The slice matters on Linux 6.12 and later, whose scheduler (EEVDF) may let a running
/// thread finish its slice before a thread that wakes takes the core, even at a lower
/// priority: with the default (0.75 ms times one plus log2 of the cores) a commit woken
/// while a flush ran could wait for it. With 0.1 ms it waits less: over seven alternating
/// pairs of `bench ledger` runs (four default, three with `--txs 3000 --latency-txs
/// 3000`), single-client p99 3.2–4.9 ms (mean 4.0) against 3.6–5.8 ms (mean 4.7). Older
/// kernels take the nice value and ignore the slice.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        const FLUSH_NICE: libc::c_int = 10;
        const FLUSH_SLICE_NS: u64 = 100_000;
        // SAFETY: `attr` is a fully initialised `sched_attr` whose `size` says which
        // version of the struct it is; the kernel only reads it. With a thread id,
        // sched_setattr and setpriority change that thread only. A refusal changes nothing.
        let with_slice = unsafe {
            let mut attr: libc::sched_attr = std::mem::zeroed();
            attr.size = std::mem::size_of::<libc::sched_attr>() as u32;
            attr.sched_policy = libc::SCHED_OTHER as u32;
            attr.sched_nice = FLUSH_NICE;
            attr.sched_runtime = FLUSH_SLICE_NS;
            libc::syscall(
                libc::SYS_sched_setattr,
                libc::gettid(),
                &attr as *const libc::sched_attr,
                0_u32,
            ) == 0
        };
        // SAFETY: as above; plain integers.
        let lowered = with_slice
            || unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, FLUSH_NICE)
            } == 0;
        if !lowered {
            eprintln!(
                "medledger: the ledger flusher keeps its priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Appended entries are durable (or failed to be): `recent` and openraft hear it.
fn flushed(
    recent: &Mutex<Recent>,
    log_ids: &[LogId],
    callbacks: Vec<LogFlushed<TypeConfig>>,
    result: Result<(), StorageError>,
) {
    if result.is_ok() {
        let mut recent = recent.lock().expect("recent lock");
        for log_id in log_ids {
            recent.made_durable(log_id);
        }
    }
    for callback in callbacks {
        callback.log_io_completed(
            result
                .clone()
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
    }
}

/// Appends encoded entries durably; `done` hears the outcome once it is known: at once from
/// a redb table, from raft-log's flush worker after its `fdatasync` for the write-ahead log.
fn append_durably(
    store: &Store,
    entries: Vec<(LogId, Vec<u8>)>,
    done: impl FnOnce(Result<(), StorageError>) + Send + 'static,
) {
    match store.raft_disk() {
        RaftDisk::Tables(db) => {
            let result = (|| {
                let txn = db.begin_write().map_err(write_error)?;
                {
                    let mut table = txn.open_table(RAFT_LOG).map_err(write_error)?;
                    for (log_id, bytes) in &entries {
                        table
                            .insert(log_id.index, bytes.as_slice())
                            .map_err(write_error)?;
                    }
                }
                txn.commit().map_err(write_error)
            })();
            done(result)
        }
        RaftDisk::Wal(wal) => {
            let mut wal = wal.lock().expect("raft log lock");
            let written = wal.append(
                entries
                    .into_iter()
                    .map(|(log_id, bytes)| (wal::wal_log_id(&log_id), bytes)),
            );
            if let Err(error) = written {
                return done(Err(write_error(error)));
            }
            // A flush that cannot be queued drops `done` unheard; openraft then sees its
            // callback gone and stops on a storage error, as it must.
            let _ = wal.flush(
                true,
                Some(WalDone::new(move |result| {
                    done(result.map_err(write_error))
                })),
            );
        }
    }
}

/// Runs one change to the log and waits until it is durable.
fn change_durably(
    store: &Store,
    in_tables: impl FnOnce(&redb::WriteTransaction) -> Result<(), StorageError>,
    in_wal: impl FnOnce(&mut raft_log::RaftLog<wal::WalTypes>) -> std::io::Result<raft_log::Segment>,
) -> Result<(), StorageError> {
    match store.raft_disk() {
        RaftDisk::Tables(db) => {
            let txn = db.begin_write().map_err(write_error)?;
            in_tables(&txn)?;
            txn.commit().map_err(write_error)
        }
        RaftDisk::Wal(log) => {
            in_wal(&mut log.lock().expect("raft log lock")).map_err(write_error)?;
            wal::flush_and_wait(log).map_err(write_error)
        }
    }
}

fn read_error(detail: impl std::fmt::Display) -> StorageError {
    storage_error(ErrorSubject::Logs, ErrorVerb::Read, detail)
}

fn write_error(detail: impl std::fmt::Display) -> StorageError {
    storage_error(ErrorSubject::Logs, ErrorVerb::Write, detail)
}

impl LogStore {
    pub fn new(store: Arc<Store>, offload: bool) -> LogStore {
        LogStore::build(store, offload, None)
    }

    /// A log that counts its durable commits in `stats.fsyncs`, where it makes them itself
    /// (redb tables); the write-ahead log counts its own syncs (`Store::raft_log_syncs`).
    pub fn with_stats(store: Arc<Store>, offload: bool, stats: Arc<LedgerStats>) -> LogStore {
        LogStore::build(store, offload, Some(stats))
    }

    fn build(store: Arc<Store>, offload: bool, stats: Option<Arc<LedgerStats>>) -> LogStore {
        let stats = stats.filter(|_| matches!(store.raft_disk(), RaftDisk::Tables(_)));
        let recent = Arc::new(Mutex::new(Recent {
            vote: stored_vote(&store).ok(),
            ..Recent::default()
        }));
        let writer = offload.then(|| {
            let (jobs, queue) = mpsc::channel();
            let (store, recent, stats) = (store.clone(), recent.clone(), stats.clone());
            std::thread::Builder::new()
                .name("medledger-raft-log".into())
                .spawn(move || write_log(store, recent, stats, queue))
                .expect("spawn the log writer");
            jobs
        });
        LogStore {
            store,
            offload,
            stats,
            recent,
            writer,
            replicating_for: None,
        }
    }

    /// Runs `work` durably, in order with the appends before it.
    async fn in_order(
        &self,
        work: impl FnOnce(&Store) -> Result<(), StorageError> + Send + 'static,
    ) -> Result<(), StorageError> {
        match &self.writer {
            Some(writer) => {
                let (reply, answer) = oneshot::channel();
                writer
                    .send(Job::Other(Box::new(work), reply))
                    .map_err(|_| write_error("the log writer has stopped"))?;
                answer
                    .await
                    .map_err(|_| write_error("the log writer has stopped"))?
            }
            None => {
                let result = work(&self.store);
                self.synced();
                result
            }
        }
    }

    fn synced(&self) {
        count_fsync(&self.stats);
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
}

fn decode_vote(bytes: &[u8]) -> Result<Vote, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| read_error(format!("raft vote does not decode: {e}")))
}

fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry, StorageError> {
    serde_json::from_slice(bytes)
        .map_err(|e| read_error(format!("raft log entry {index} does not decode: {e}")))
}

/// A value of the Raft meta table.
fn table_meta<T: serde::de::DeserializeOwned>(
    txn: &redb::ReadTransaction,
    key: &str,
) -> Result<Option<T>, StorageError> {
    let table = txn.open_table(RAFT_META).map_err(read_error)?;
    match table.get(key).map_err(read_error)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(bytes.value())
            .map(Some)
            .map_err(|e| read_error(format!("raft {key} does not decode: {e}"))),
    }
}

/// The stored vote.
fn stored_vote(store: &Store) -> Result<Option<Vote>, StorageError> {
    match store.raft_disk() {
        RaftDisk::Tables(db) => table_meta(&db.begin_read().map_err(read_error)?, VOTE_KEY),
        RaftDisk::Wal(log) => {
            let log = log.lock().expect("raft log lock");
            log.log_state().vote().map(|v| decode_vote(v)).transpose()
        }
    }
}

/// The last purged log id and the last log id stored.
fn stored_bounds(store: &Store) -> Result<(Option<LogId>, Option<LogId>), StorageError> {
    match store.raft_disk() {
        RaftDisk::Tables(db) => {
            let txn = db.begin_read().map_err(read_error)?;
            let purged: Option<LogId> = table_meta(&txn, PURGED_KEY)?;
            let table = txn.open_table(RAFT_LOG).map_err(read_error)?;
            let last = match table.last().map_err(read_error)? {
                None => None,
                Some((index, bytes)) => Some(decode_entry(index.value(), bytes.value())?.log_id),
            };
            Ok((purged, last))
        }
        RaftDisk::Wal(log) => {
            let log = log.lock().expect("raft log lock");
            let state = log.log_state();
            Ok((
                state.purged().map(wal::log_id),
                state.last().map(wal::log_id),
            ))
        }
    }
}

/// The stored vote and the stored entries in `(start, end)`, read together.
fn stored_entries(
    store: &Store,
    start: Bound<u64>,
    end: Bound<u64>,
) -> Result<(Option<Vote>, Vec<Entry>), StorageError> {
    match store.raft_disk() {
        RaftDisk::Tables(db) => {
            let txn = db.begin_read().map_err(read_error)?;
            let vote = table_meta(&txn, VOTE_KEY)?;
            let table = txn.open_table(RAFT_LOG).map_err(read_error)?;
            let mut out = Vec::new();
            for item in table.range::<u64>((start, end)).map_err(read_error)? {
                let (index, bytes) = item.map_err(read_error)?;
                out.push(decode_entry(index.value(), bytes.value())?);
            }
            Ok((vote, out))
        }
        RaftDisk::Wal(log) => {
            let log = log.lock().expect("raft log lock");
            let vote = log.log_state().vote().map(|v| decode_vote(v)).transpose()?;
            let from = match start {
                Bound::Included(index) => index,
                Bound::Excluded(index) => index.saturating_add(1),
                Bound::Unbounded => 0,
            };
            let to = match end {
                Bound::Included(index) => index.saturating_add(1),
                Bound::Excluded(index) => index,
                Bound::Unbounded => u64::MAX,
            };
            let mut out = Vec::new();
            for item in log.read(from, to) {
                let (log_id, bytes) = item.map_err(read_error)?;
                out.push(decode_entry(log_id.1, &bytes)?);
            }
            Ok((vote, out))
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        // Recent first: an entry not yet durable is there and nowhere else.
        let pending: Vec<Entry> = {
            let recent = self.recent.lock().expect("recent lock");
            if let Some(entries) = recent.serve(start, end, self.replicating_for) {
                return Ok(entries);
            }
            recent
                .entries
                .range((start, end))
                .map(|(_, (entry, _, _))| entry.clone())
                .collect()
        };
        // The vote and the entries in one read transaction.
        let (vote, mut entries) = self
            .run(move |store| stored_entries(store, start, end))
            .await?;
        if !pending.is_empty() {
            let first = pending[0].log_id.index;
            entries.retain(|entry| entry.log_id.index < first);
            entries.extend(pending);
        }
        let Some(leader) = self.replicating_for else {
            return Ok(entries);
        };
        // openraft 0.9.25 does not wait for a deposed leader's replication tasks to end; one
        // may still read after the log was truncated, overwritten by a newer leader or
        // purged, and would send what it finds under its old term (the simulation found
        // gaps and newer leaders' entries on the wire). Such a reader reads nothing, which
        // replication treats as a heartbeat; and any reader gets only the unbroken run of
        // entries from where it asked.
        if vote.map(|vote| vote.leader_id) != Some(leader) {
            return Ok(Vec::new());
        }
        let mut expected = match start {
            Bound::Included(index) => index,
            Bound::Excluded(index) => index + 1,
            Bound::Unbounded => entries.first().map_or(0, |entry| entry.log_id.index),
        };
        let unbroken = entries
            .into_iter()
            .take_while(|entry| {
                let next = entry.log_id.index == expected;
                expected += 1;
                next
            })
            .collect();
        Ok(unbroken)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.run(|store| {
            let (last_purged_log_id, last) = stored_bounds(store)?;
            Ok(LogState {
                last_purged_log_id,
                last_log_id: last.or(last_purged_log_id),
            })
        })
        .await
        .map(|mut state| {
            let recent = self.recent.lock().expect("recent lock");
            if let Some((_, (entry, _, _))) = recent.entries.last_key_value() {
                state.last_log_id = Some(entry.log_id);
            }
            state
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        // Replication asks for a reader when a leader starts replicating: remember for whom.
        let known = self.recent.lock().expect("recent lock").vote;
        let vote: Option<Vote> = match known {
            Some(vote) => vote,
            None => {
                let store = self.store.clone();
                self.run(move |_| stored_vote(&store)).await.ok().flatten()
            }
        };
        LogStore {
            replicating_for: vote.map(|vote| vote.leader_id),
            ..self.clone()
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        let recent = self.recent.clone();
        self.in_order(move |store| {
            let bytes = serde_json::to_vec(&vote).map_err(write_error)?;
            let stored = change_durably(
                store,
                |txn| {
                    let mut table = txn.open_table(RAFT_META).map_err(write_error)?;
                    table
                        .insert(VOTE_KEY, bytes.as_slice())
                        .map_err(write_error)?;
                    Ok(())
                },
                |log| log.save_vote(bytes.clone()),
            );
            // Readers see the new vote once it is durable; after a failed write, the vote
            // is read from the disk again.
            recent.lock().expect("recent lock").vote = stored.is_ok().then_some(Some(vote));
            stored
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.run(stored_vote).await
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
        let mut appended = Vec::new();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(write_error)?;
            let size = bytes.len();
            encoded.push((entry.log_id, bytes));
            appended.push((entry, size));
        }
        {
            let mut recent = self.recent.lock().expect("recent lock");
            for (entry, size) in appended {
                recent.append(entry, size);
            }
        }
        if let (Some(_), RaftDisk::Wal(_)) = (&self.writer, self.store.raft_disk()) {
            // The write-ahead log only queues the bytes here, for its flush worker: the
            // writer thread would add a hop to every commit and spare no wait.
            let log_ids: Vec<LogId> = encoded.iter().map(|(log_id, _)| *log_id).collect();
            let recent = self.recent.clone();
            append_durably(&self.store, encoded, move |result| {
                flushed(&recent, &log_ids, vec![callback], result)
            });
            return Ok(());
        }
        let Some(writer) = &self.writer else {
            let log_ids: Vec<LogId> = encoded.iter().map(|(log_id, _)| *log_id).collect();
            let recent = self.recent.clone();
            let (done, outcome) = std::sync::mpsc::sync_channel(1);
            append_durably(&self.store, encoded, move |result| {
                flushed(&recent, &log_ids, vec![callback], result.clone());
                let _ = done.send(result);
            });
            self.synced();
            return outcome
                .recv()
                .map_err(|_| write_error("the raft log's flush worker stopped"))?;
        };
        writer
            .send(Job::Append(encoded, callback))
            .map_err(|_| write_error("the log writer has stopped"))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.recent
            .lock()
            .expect("recent lock")
            .truncate(log_id.index);
        self.in_order(move |store| {
            change_durably(
                store,
                |txn| {
                    let mut table = txn.open_table(RAFT_LOG).map_err(write_error)?;
                    table
                        .retain_in::<u64, _>(log_id.index.., |_, _| false)
                        .map_err(write_error)
                },
                |log| log.truncate(log_id.index),
            )
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Never purge entries the state machine has not stored: after a snapshot arrives,
        // openraft 0.9 asks for the purge while the snapshot is still being installed, and
        // a crash in between would leave a node that has neither the entries nor the blocks
        // (and cannot start). Wait for the install; give up (the node stops) if it never
        // lands.
        let started = tokio::time::Instant::now();
        loop {
            let store = self.store.clone();
            let applied = self
                .run(move |_| super::state_machine::applied_index(&store))
                .await?;
            if applied.is_some_and(|index| index >= log_id.index) {
                break;
            }
            if started.elapsed() > PURGE_WAIT_MAX {
                return Err(write_error(format!(
                    "the state machine did not reach entry {} within {PURGE_WAIT_MAX:?}; not purging",
                    log_id.index
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let recent = self.recent.clone();
        self.in_order(move |store| {
            // Entries go only once the ledger file holds their blocks durably: a crash loses
            // what was staged or flushed since, and the restart re-applies it from them. So
            // the purge stops at the last durable write (the flusher makes one every
            // `LEDGER_SYNC_INTERVAL`) and a later purge takes the rest, rather than making
            // the file durable here, where every append would wait for it.
            let upto = match super::state_machine::durable_applied(store)? {
                Some(durable) if durable.index < log_id.index => durable,
                Some(_) => log_id,
                None => return Ok(()),
            };
            recent.lock().expect("recent lock").purge(upto.index);
            let bytes = serde_json::to_vec(&Some(upto)).map_err(write_error)?;
            change_durably(
                store,
                |txn| {
                    let mut table = txn.open_table(RAFT_LOG).map_err(write_error)?;
                    table
                        .retain_in::<u64, _>(..=upto.index, |_, _| false)
                        .map_err(write_error)?;
                    let mut meta = txn.open_table(RAFT_META).map_err(write_error)?;
                    meta.insert(PURGED_KEY, bytes.as_slice())
                        .map_err(write_error)?;
                    Ok(())
                },
                |log| log.purge(wal::wal_log_id(&upto)),
            )
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    pub(super) fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(entries: &[Entry]) -> Vec<(u64, u64)> {
        entries
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    #[test]
    fn recent_serves_only_an_unbroken_run_it_holds_and_only_to_current_readers() {
        // Proves reads are answered from memory only when every entry asked for from the
        // start is held, and a replicating reader only under a known vote naming its leader.
        let mut recent = Recent::default();
        for index in 5..=8 {
            recent.append(entry(2, index), 10);
        }
        let all = recent
            .serve(Bound::Included(5), Bound::Unbounded, None)
            .unwrap();
        assert_eq!(indexes(&all), vec![(2, 5), (2, 6), (2, 7), (2, 8)]);
        let some = recent
            .serve(Bound::Excluded(5), Bound::Excluded(8), None)
            .unwrap();
        assert_eq!(indexes(&some), vec![(2, 6), (2, 7)]);
        // Before the first held entry, or from the log's start: the table answers.
        assert!(recent
            .serve(Bound::Included(4), Bound::Unbounded, None)
            .is_none());
        assert!(recent
            .serve(Bound::Unbounded, Bound::Unbounded, None)
            .is_none());
        // Past the end: nothing, as the table would say.
        assert_eq!(
            recent.serve(Bound::Included(9), Bound::Unbounded, None),
            Some(vec![])
        );
        // A gap (never made by Raft's own calls) sends the read to the table.
        recent.entries.remove(&7);
        assert!(recent
            .serve(Bound::Included(6), Bound::Unbounded, None)
            .is_none());

        let leader = Vote::new(2, 1);
        let other = Vote::new(3, 2);
        let for_leader = |recent: &Recent| {
            recent.serve(
                Bound::Included(5),
                Bound::Excluded(6),
                Some(leader.leader_id),
            )
        };
        assert!(for_leader(&recent).is_none(), "the vote is not known yet");
        recent.vote = Some(Some(leader));
        assert_eq!(indexes(&for_leader(&recent).unwrap()), vec![(2, 5)]);
        recent.vote = Some(Some(other));
        assert_eq!(for_leader(&recent), Some(vec![]));
        recent.vote = Some(None);
        assert_eq!(for_leader(&recent), Some(vec![]));
    }

    #[test]
    fn recent_keeps_every_entry_not_yet_durable_and_evicts_durable_ones_oldest_first() {
        // Proves the bound only ever drops entries the table holds, the oldest first, and
        // that a durability report for a replaced entry counts nothing.
        let mut recent = Recent::default();
        let big = RECENT_BYTES_MAX / 2 + 1;
        for index in 1..=4 {
            recent.append(entry(1, index), big);
        }
        assert_eq!(recent.entries.len(), 4, "nothing durable, nothing dropped");
        assert_eq!(recent.durable_bytes, 0);
        recent.made_durable(&entry(1, 1).log_id);
        recent.made_durable(&entry(1, 2).log_id);
        // Two durable entries exceed the bound: the older leaves.
        assert_eq!(
            recent.entries.keys().copied().collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(recent.durable_bytes, big);
        // Entry 4 is replaced by another leader's before its report arrives.
        recent.append(entry(2, 4), big);
        recent.made_durable(&entry(1, 4).log_id);
        assert_eq!(recent.durable_bytes, big);
        assert!(!recent.entries[&4].2);
        // Its own report counts once, and two durable entries exceed the bound again: entry
        // 2 leaves; entry 3 is not durable, so eviction stops there, over the bound, rather
        // than drop it or break the run behind it.
        recent.made_durable(&entry(2, 4).log_id);
        recent.made_durable(&entry(2, 4).log_id);
        assert_eq!(
            recent.entries.keys().copied().collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(recent.durable_bytes, big);
        recent.made_durable(&entry(1, 3).log_id);
        assert_eq!(recent.entries.keys().copied().collect::<Vec<_>>(), vec![4]);
    }

    #[test]
    fn recent_follows_truncation_purge_and_overwriting_appends() {
        // Proves truncation drops the end, a purge the start, an append replaces every
        // entry from its index on, and the durable byte count follows each.
        let mut recent = Recent::default();
        for index in 1..=6 {
            recent.append(entry(1, index), 10);
            recent.made_durable(&entry(1, index).log_id);
        }
        assert_eq!(recent.durable_bytes, 60);
        recent.truncate(5);
        assert_eq!(
            recent.entries.keys().copied().collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(recent.durable_bytes, 40);
        recent.purge(2);
        assert_eq!(
            recent.entries.keys().copied().collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(recent.durable_bytes, 20);
        recent.append(entry(2, 4), 5);
        recent.append(entry(2, 3), 5);
        let held = recent
            .serve(Bound::Included(3), Bound::Unbounded, None)
            .unwrap();
        assert_eq!(indexes(&held), vec![(2, 3)]);
        assert_eq!(recent.durable_bytes, 0);
        recent.purge(10);
        assert!(recent.entries.is_empty());
    }
}

#[cfg(test)]
mod wal_tests {
    use super::tests::entry;
    use super::*;

    fn encoded(entries: &[Entry]) -> Vec<(LogId, Vec<u8>)> {
        entries
            .iter()
            .map(|e| (e.log_id, serde_json::to_vec(e).expect("entries encode")))
            .collect()
    }

    /// The indexes of the entries stored from `from` on.
    fn held(store: &Store, from: u64) -> Vec<u64> {
        let (_, entries) =
            stored_entries(store, Bound::Included(from), Bound::Unbounded).expect("a read");
        entries.iter().map(|e| e.log_id.index).collect()
    }

    fn append_and_wait(store: &Store, entries: &[Entry]) {
        let (done, outcome) = std::sync::mpsc::sync_channel(1);
        append_durably(store, encoded(entries), move |result| {
            let _ = done.send(result);
        });
        outcome
            .recv()
            .expect("an outcome")
            .expect("a durable append");
    }

    fn chunk_files(data_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(data_dir.join(wal::WAL_DIR))
            .expect("the log directory")
            .map(|f| f.expect("a directory entry").path())
            .collect();
        files.sort();
        files
    }

    #[test]
    fn a_log_kept_in_raft_redb_moves_to_the_write_ahead_log_once_and_whole() {
        // Proves that a node whose data directory predates the write-ahead log keeps its
        // vote, its purge point and every entry, and that the old file is gone afterwards,
        // so that nothing is read from two places.
        let dir = tempfile::tempdir().expect("a directory");
        let vote = Vote::new(2, 1);
        let purged = entry(1, 3).log_id;
        {
            let db = redb::Database::create(dir.path().join(wal::LEGACY_RAFT_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(RAFT_META).unwrap();
                let vote_bytes = serde_json::to_vec(&vote).unwrap();
                meta.insert(VOTE_KEY, vote_bytes.as_slice()).unwrap();
                let purged_bytes = serde_json::to_vec(&Some(purged)).unwrap();
                meta.insert(PURGED_KEY, purged_bytes.as_slice()).unwrap();
                let mut log = txn.open_table(RAFT_LOG).unwrap();
                for (log_id, bytes) in encoded(&[entry(1, 4), entry(2, 5), entry(2, 6)]) {
                    log.insert(log_id.index, bytes.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        for _ in 0..2 {
            let store = Store::open(dir.path()).expect("the store opens");
            assert!(!dir.path().join(wal::LEGACY_RAFT_FILE).exists());
            assert_eq!(stored_vote(&store).unwrap(), Some(vote));
            assert_eq!(
                stored_bounds(&store).unwrap(),
                (Some(purged), Some(entry(2, 6).log_id))
            );
            assert_eq!(held(&store, 0), vec![4, 5, 6]);
        }
    }

    #[test]
    fn the_write_ahead_log_keeps_what_was_flushed_drops_a_torn_tail_and_refuses_damage() {
        // Proves that appends, truncations and purges survive a reopen; that a last record
        // cut short (a crash mid-write, never reported durable) is dropped at open; and that
        // a changed byte in an earlier record stops the open instead of serving a damaged log.
        let dir = tempfile::tempdir().expect("a directory");
        {
            let store = Store::open(dir.path()).expect("the store opens");
            append_and_wait(
                &store,
                &[entry(1, 1), entry(1, 2), entry(1, 3), entry(1, 4)],
            );
            let truncated = change_durably(&store, |_| Ok(()), |log| log.truncate(4));
            truncated.expect("a durable truncation");
            let purged = change_durably(
                &store,
                |_| Ok(()),
                |log| log.purge(wal::wal_log_id(&entry(1, 1).log_id)),
            );
            purged.expect("a durable purge");
            append_and_wait(&store, &[entry(2, 4), entry(2, 5)]);
        }
        let store = Store::open(dir.path()).expect("the store reopens");
        assert_eq!(held(&store, 0), vec![2, 3, 4, 5]);
        let (purged, last) = stored_bounds(&store).unwrap();
        assert_eq!(purged.map(|id| id.index), Some(1));
        assert_eq!(last, Some(entry(2, 5).log_id));
        drop(store);

        let chunk = chunk_files(dir.path()).pop().expect("a chunk file");
        let length = std::fs::metadata(&chunk).unwrap().len();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&chunk)
            .unwrap();
        file.set_len(length - 3).unwrap();
        drop(file);
        let store = Store::open(dir.path()).expect("a torn tail is dropped");
        assert_eq!(held(&store, 0), vec![2, 3, 4]);
        drop(store);

        let mut bytes = std::fs::read(&chunk).unwrap();
        let middle = bytes.len() / 3;
        bytes[middle] ^= 0x40;
        std::fs::write(&chunk, bytes).unwrap();
        assert!(Store::open(dir.path()).is_err());
    }

    #[test]
    fn a_purge_removes_only_entries_whose_blocks_are_durable_and_never_flushes() {
        // Proves that a purge stops at the ledger file's last durable write, however far
        // openraft asks for and the state machine has staged or flushed without a sync (and
        // removes nothing while the file holds no position at all), that it does not make
        // the file durable itself, and that a later purge takes the rest once the file is
        // durable further on.
        use openraft::storage::RaftLogStorage;
        let dir = tempfile::tempdir().expect("a directory");
        let store = Arc::new(Store::open(dir.path()).expect("the store opens"));
        let entries: Vec<Entry> = (1..=10).map(|index| entry(1, index)).collect();
        append_and_wait(&store, &entries);
        let position =
            |index: u64| super::super::state_machine::encode_position(Some(entry(1, index).log_id));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let mut log = LogStore::new(store.clone(), false);

        // Applied up to 8, but the file has never held a position durably.
        store.stage(None, &position(8)).expect("staged");
        runtime
            .block_on(log.purge(entry(1, 8).log_id))
            .expect("a purge");
        assert_eq!(held(&store, 0), (1..=10).collect::<Vec<u64>>());
        assert_eq!(stored_bounds(&store).unwrap().0, None);

        // Positions set directly from here: durable at 4, flushed unsynced at 6, staged 8.
        store.stage(None, &position(4)).expect("staged");
        store.flush(true).expect("a durable flush");
        store.stage(None, &position(6)).expect("staged");
        store.flush(false).expect("a flush without sync");
        store.stage(None, &position(8)).expect("staged");
        runtime
            .block_on(log.purge(entry(1, 8).log_id))
            .expect("a purge");
        assert_eq!(held(&store, 0), vec![5, 6, 7, 8, 9, 10]);
        assert_eq!(stored_bounds(&store).unwrap().0, Some(entry(1, 4).log_id));
        assert!(store.has_staged(), "the purge flushed what was staged");

        store.flush(true).expect("a durable flush");
        runtime
            .block_on(log.purge(entry(1, 8).log_id))
            .expect("a purge");
        assert_eq!(held(&store, 0), vec![9, 10]);
        assert_eq!(stored_bounds(&store).unwrap().0, Some(entry(1, 8).log_id));
    }
}

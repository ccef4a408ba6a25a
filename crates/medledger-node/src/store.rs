//! The node's embedded, crash-safe store (redb): blocks, replicated state and the head.
//!
//! A block, its state changes and the new head are written in one redb transaction, so after
//! a crash the ledger file holds every block it was told to hold durably and never half of
//! one. The same file is all `verify` needs.
//!
//! A consortium node keeps Raft's log and vote beside it, in a write-ahead log
//! (`consensus::wal`, directory `raft-log`): an append is one sequential write and one
//! `fdatasync`, where a durable redb commit writes pages across its file and its header;
//! and the log's appends and the ledger file's commits never wait for each other's lock.
//! A store in memory (simulations) keeps the log in a second in-memory redb database.
//!
//! Its state machine does not write the ledger file block by block: it *stages* each
//! applied entry (`stage`), in memory, where every read sees it at once, and the ledger's
//! flusher thread *flushes* what was staged into the file now and then (`flush`), many
//! blocks in one transaction. Each changed key then costs one B-tree insert per flush
//! rather than one per block, off the path that answers clients. A crash loses what was
//! staged and not flushed durably; the entries that produced it are in Raft's log, which
//! re-applies them, so nothing acknowledged is lost.

use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use medledger_core::block::{Block, ChainHead, ExecutedBlock};
use medledger_core::merkle::{self, NodeSource};
use medledger_core::model::AuditEvent;
use medledger_core::state::{keys, StateRead};
use medledger_core::Hash;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::work::{Work, WorkTimes};

const BLOCKS: TableDefinition<u64, &[u8]> = TableDefinition::new("blocks");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const HEAD_KEY: &str = "head";
/// Where the Raft state machine stands (last applied log id and membership); written with
/// the block it applied.
const APPLIED_KEY: &str = "raft_applied";
/// Raft's log in a Raft database (in memory, or `raft.redb` of earlier versions):
/// index → encoded entry.
pub(crate) const RAFT_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Raft's vote and purge point in a Raft database.
pub(crate) const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
/// The keys of `RAFT_META`: the vote and the last purged log id (JSON).
pub(crate) const VOTE_KEY: &str = "vote";
pub(crate) const PURGED_KEY: &str = "last_purged";
/// State changes staged beyond which the state machine flushes them itself, when no flush is
/// under way: the ledger's flusher (every second, at a low CPU priority) has fallen behind.
/// About ten seconds of peak load here.
const STAGED_KEYS_SOFT: usize = 400_000;
/// Most state changes staged and not yet flushed: reached only when flushes cannot keep up
/// at all (one that fails stops staging at once, see `Store::flush`). Staging then fails
/// and the node stops, rather than hold ever more in memory.
const STAGED_KEYS_MAX: usize = 4_000_000;

/// The state machine's stored position and every stored block.
pub(crate) type AppliedAndBlocks = (Option<Vec<u8>>, Vec<Vec<u8>>);

/// The file name of the ledger store inside a node's data directory.
pub const LEDGER_FILE: &str = "ledger.redb";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Storage(String),
    #[error("stored {what} does not decode: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("the store is empty: initialise the node with a genesis first")]
    Empty,
    #[error("the store already holds a chain")]
    NotEmpty,
    #[error("block {height} does not follow the stored head")]
    OutOfOrder { height: u64 },
    #[error("{staged} state changes wait to be written to the ledger file, which is failing")]
    Backlog { staged: usize },
    #[error("the ledger file could not be written ({0}); restarting the node re-applies what it held from the log")]
    Unflushed(String),
}

macro_rules! storage_error {
    ($($type:ty),*) => {$(
        impl From<$type> for StoreError {
            fn from(error: $type) -> StoreError {
                StoreError::Storage(error.to_string())
            }
        }
    )*};
}
storage_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The database; an enum so that a read-only variant can join it.
enum Db {
    Writable(redb::Database),
}

type Bytes = Arc<[u8]>;

/// Applied entries not yet in the ledger file: state changes (`None` deletes the key),
/// blocks by height, the head and the state machine's position. Cheap to clone (the maps
/// share their structure), so every read keeps what was staged when it began.
#[derive(Clone, Default)]
struct Staged {
    state: imbl::OrdMap<Arc<str>, Option<Bytes>>,
    blocks: imbl::OrdMap<u64, Bytes>,
    head: Option<(u64, Bytes)>,
    applied: Option<Bytes>,
}

impl Staged {
    fn is_empty(&self) -> bool {
        self.state.is_empty()
            && self.blocks.is_empty()
            && self.head.is_none()
            && self.applied.is_none()
    }

    /// `newer` staged on top of this: its entries win.
    fn absorb(&mut self, newer: Staged) {
        self.state = newer.state.union(std::mem::take(&mut self.state));
        self.blocks = newer.blocks.union(std::mem::take(&mut self.blocks));
        if newer.head.is_some() {
            self.head = newer.head;
        }
        if newer.applied.is_some() {
            self.applied = newer.applied;
        }
    }
}

/// What reads see above the ledger file: entries staged since the last flush began
/// (`newer`) over those a flush is writing now, or failed to write (`flushing`).
#[derive(Clone, Default)]
struct Pending {
    newer: Staged,
    flushing: Staged,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.newer.is_empty() && self.flushing.is_empty()
    }

    fn state(&self, key: &str) -> Option<&Option<Bytes>> {
        self.newer
            .state
            .get(key)
            .or_else(|| self.flushing.state.get(key))
    }

    fn block(&self, height: u64) -> Option<&Bytes> {
        self.newer
            .blocks
            .get(&height)
            .or_else(|| self.flushing.blocks.get(&height))
    }

    fn head(&self) -> Option<&(u64, Bytes)> {
        self.newer.head.as_ref().or(self.flushing.head.as_ref())
    }

    fn applied(&self) -> Option<&Bytes> {
        self.newer
            .applied
            .as_ref()
            .or(self.flushing.applied.as_ref())
    }

    /// Every staged block, newest version of each height, in height order.
    fn blocks(&self) -> std::collections::BTreeMap<u64, Bytes> {
        let mut blocks: std::collections::BTreeMap<u64, Bytes> = self
            .flushing
            .blocks
            .iter()
            .map(|(h, b)| (*h, b.clone()))
            .collect();
        blocks.extend(self.newer.blocks.iter().map(|(h, b)| (*h, b.clone())));
        blocks
    }

    /// Staged state entries from `start` on, in key order; a key staged in both layers
    /// comes once, as `newer` has it.
    fn state_from<'a>(
        &'a self,
        start: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Option<Bytes>)> + 'a {
        let range = (Bound::Included(start), Bound::Unbounded);
        merge_newest(
            self.newer
                .state
                .range::<_, str>(range)
                .map(|(k, v)| (&**k, v)),
            self.flushing
                .state
                .range::<_, str>(range)
                .map(|(k, v)| (&**k, v)),
        )
    }
}

/// Two key-ordered sequences merged into one; where both hold a key, `newer`'s entry is
/// kept and `older`'s dropped.
fn merge_newest<'a, V: 'a>(
    newer: impl Iterator<Item = (&'a str, V)>,
    older: impl Iterator<Item = (&'a str, V)>,
) -> impl Iterator<Item = (&'a str, V)> {
    let mut newer = newer.peekable();
    let mut older = older.peekable();
    std::iter::from_fn(move || {
        let (take_newer, same_key) = match (newer.peek(), older.peek()) {
            (None, None) => return None,
            (Some(_), None) => (true, false),
            (None, Some(_)) => (false, false),
            (Some((a, _)), Some((b, _))) => (a <= b, a == b),
        };
        if same_key {
            older.next();
        }
        if take_newer {
            newer.next()
        } else {
            older.next()
        }
    })
}

pub struct Store {
    db: Db,
    /// Raft's log and vote; absent in a store opened from a copy (for `verify`).
    raft: Option<RaftDisk>,
    /// Applied and not yet in the ledger file (`stage`, `flush`).
    pending: RwLock<Pending>,
    /// Held by a flush from start to end, and by the writes that go straight to the file
    /// (which flush first), so that the file takes staged entries in order.
    flush_lock: Mutex<()>,
    /// Where staging flushes itself, and where it refuses (`STAGED_KEYS_SOFT`, `_MAX`).
    backlog: Backlog,
    /// Why a flush failed, once one has: staging is refused from then on (`flush`).
    flush_failed: std::sync::OnceLock<String>,
    /// The state machine's position as of the last durable write of the ledger file: what
    /// a crash would leave, and so how far Raft's log may be purged (`durable_applied`).
    durable_applied: RwLock<Option<Bytes>>,
    /// CPU time spent on the node's transaction work (`work`).
    work: WorkTimes,
}

/// Staged state changes beyond which `Store::stage` flushes itself, and refuses.
struct Backlog {
    flush_at: usize,
    refuse_at: usize,
}

/// Where a store keeps Raft's log and vote.
pub(crate) enum RaftDisk {
    /// Tables `RAFT_LOG` and `RAFT_META` of a redb database (stores in memory).
    Tables(redb::Database),
    /// The write-ahead log in the data directory (stores on disk).
    Wal(Box<crate::consensus::wal::Wal>),
}

/// The ledger file as of one read transaction, with what was staged when it began.
struct View {
    txn: redb::ReadTransaction,
    pending: Pending,
}

impl View {
    /// The state machine's position, staged or in the file.
    fn applied(&self) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(applied) = self.pending.applied() {
            return Ok(Some(applied.to_vec()));
        }
        let table = self.txn.open_table(META)?;
        Ok(table.get(APPLIED_KEY)?.map(|bytes| bytes.value().to_vec()))
    }
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Storage(e.to_string()))?;
        let db = redb::Database::create(data_dir.join(LEDGER_FILE))?;
        let wal = crate::consensus::wal::open(data_dir)?;
        Store::with_tables(db, RaftDisk::Wal(Box::new(wal)))
    }

    /// An empty store in memory (simulations and tests of whole clusters).
    pub fn open_memory() -> Result<Store, StoreError> {
        let memory = || {
            redb::Builder::new()
                .create_with_backend(MemoryBackend(std::sync::RwLock::new(Vec::new())))
        };
        let raft = memory()?;
        let txn = raft.begin_write()?;
        txn.open_table(RAFT_LOG)?;
        txn.open_table(RAFT_META)?;
        txn.commit()?;
        Store::with_tables(memory()?, RaftDisk::Tables(raft))
    }

    fn with_tables(db: redb::Database, raft: RaftDisk) -> Result<Store, StoreError> {
        let txn = db.begin_write()?;
        txn.open_table(BLOCKS)?;
        txn.open_table(STATE)?;
        txn.open_table(META)?;
        txn.commit()?;
        let store = Store::over(db, Some(raft));
        store.note_durable()?;
        Ok(store)
    }

    fn over(db: redb::Database, raft: Option<RaftDisk>) -> Store {
        Store {
            db: Db::Writable(db),
            raft,
            pending: RwLock::new(Pending::default()),
            flush_lock: Mutex::new(()),
            backlog: Backlog {
                flush_at: STAGED_KEYS_SOFT,
                refuse_at: STAGED_KEYS_MAX,
            },
            flush_failed: std::sync::OnceLock::new(),
            durable_applied: RwLock::new(None),
            work: WorkTimes::default(),
        }
    }

    /// Raft's log and vote, for the Raft log store.
    ///
    /// # Panics
    /// On a store opened from a copy, which no log store is ever built on.
    pub(crate) fn raft_disk(&self) -> &RaftDisk {
        self.raft
            .as_ref()
            .expect("a store opened from a copy has no Raft log")
    }

    /// How many times the write-ahead log has synced since the store opened (several
    /// appends can share one sync); `None` for a log kept in tables.
    pub fn raft_log_syncs(&self) -> Option<u64> {
        match self.raft.as_ref()? {
            RaftDisk::Wal(wal) => Some(
                wal.lock()
                    .expect("raft log lock")
                    .stat()
                    .flush_metrics
                    .sync_batch_count,
            ),
            RaftDisk::Tables(_) => None,
        }
    }

    /// Opens a copy of the store at `path`, in memory, so that nothing in the file changes,
    /// not even the recovery redb runs after a crash (which only rebuilds its allocator state).
    /// The copy takes as much memory as the file.
    pub fn open_copy(path: &Path) -> Result<Store, StoreError> {
        let bytes = std::fs::read(path)
            .map_err(|e| StoreError::Storage(format!("{}: {e}", path.display())))?;
        Store::open_bytes(bytes)
    }

    /// Opens a store image held in memory (a copy of a store file).
    ///
    /// The image is what `verify` distrusts, so redb checks the checksum of every page before
    /// anything is read: a file changed outside redb is an error here, where a plain open may
    /// read garbage, panic or stall on it (tests/tamper.rs).
    pub fn open_bytes(bytes: Vec<u8>) -> Result<Store, StoreError> {
        let db = redb::Builder::new()
            .set_check_integrity_on_open(true)
            .create_with_backend(MemoryBackend(std::sync::RwLock::new(bytes)))?;
        Ok(Store::over(db, None))
    }

    fn pending(&self) -> std::sync::RwLockReadGuard<'_, Pending> {
        self.pending.read().expect("pending lock")
    }

    /// A read transaction of the ledger file and what was staged, taken together: a flush
    /// empties `flushing` only after its commit, so the pair never misses an entry.
    fn view(&self) -> Result<View, StoreError> {
        let pending = self.pending();
        let Db::Writable(db) = &self.db;
        Ok(View {
            txn: db.begin_read()?,
            pending: pending.clone(),
        })
    }

    /// The head after the last committed block, or None before genesis.
    pub fn head(&self) -> Result<Option<ChainHead>, StoreError> {
        match self.head_bytes()? {
            None => Ok(None),
            Some(bytes) => decode("head", &bytes).map(Some),
        }
    }

    /// The head's raw bytes as stored, for `verify`, which decodes them itself.
    pub fn head_bytes(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let view = self.view()?;
        if let Some((_, bytes)) = view.pending.head() {
            return Ok(Some(bytes.to_vec()));
        }
        let table = view.txn.open_table(META)?;
        Ok(table.get(HEAD_KEY)?.map(|bytes| bytes.value().to_vec()))
    }

    /// Writes a block, its state changes and the new head atomically and durably, after
    /// anything staged before it.
    pub fn commit_block(&self, executed: &ExecutedBlock) -> Result<(), StoreError> {
        let _flushing = self.lock_flushes();
        self.flush_locked(false)?;
        self.work
            .measure(Work::Flush, || self.write_block(executed))
    }

    /// `commit_block`'s own write, under the flush lock with nothing staged.
    fn write_block(&self, executed: &ExecutedBlock) -> Result<(), StoreError> {
        let Db::Writable(db) = &self.db;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let height = executed.block.header.height;
            let expected = match meta.get(HEAD_KEY)? {
                None => 0,
                Some(bytes) => decode::<ChainHead>("head", bytes.value())?.height + 1,
            };
            if height != expected {
                return Err(StoreError::OutOfOrder { height });
            }
            let mut blocks = txn.open_table(BLOCKS)?;
            blocks.insert(height, encode_block(&executed.block)?.as_slice())?;
            write_changes(&mut txn.open_table(STATE)?, &executed.writes)?;
            let head_bytes = serde_json::to_vec(&executed.head).expect("heads encode");
            meta.insert(HEAD_KEY, head_bytes.as_slice())?;
        }
        // redb's default durability is Immediate: commit returns after the fsync.
        txn.commit()?;
        self.note_durable()
    }

    /// Puts what applying one Raft entry did (a block, or nothing) and the state machine's
    /// new position where every read sees them, without writing the ledger file: a later
    /// flush does (`flush`). Raft's log holds the entry durably, so a crash before the flush
    /// loses nothing: the node re-applies it to the same outcome.
    pub(crate) fn stage(
        &self,
        executed: Option<&ExecutedBlock>,
        applied: &[u8],
    ) -> Result<(), StoreError> {
        if let Some(failure) = self.flush_failed.get() {
            return Err(StoreError::Unflushed(failure.clone()));
        }
        let applied: Bytes = applied.into();
        let Some(executed) = executed else {
            self.pending.write().expect("pending lock").newer.applied = Some(applied);
            return Ok(());
        };
        let height = executed.block.header.height;
        let block: Bytes = encode_block(&executed.block)?.into();
        let head: Bytes = serde_json::to_vec(&executed.head)
            .expect("heads encode")
            .into();
        let writes: Vec<(Arc<str>, Option<Bytes>)> = executed
            .writes
            .iter()
            .map(|(key, value)| (Arc::from(key.as_str()), value.as_deref().map(Bytes::from)))
            .collect();
        let mut pending = self.pending.write().expect("pending lock");
        let staged = pending.newer.state.len() + pending.flushing.state.len();
        if staged > self.backlog.refuse_at {
            return Err(StoreError::Backlog { staged });
        }
        let expected = match pending.head() {
            Some((stored, _)) => stored + 1,
            None => self.stored_head()?.map_or(0, |head| head.height + 1),
        };
        if height != expected {
            return Err(StoreError::OutOfOrder { height });
        }
        let newer = &mut pending.newer;
        for (key, value) in writes {
            newer.state.insert(key, value);
        }
        newer.blocks.insert(height, block);
        newer.head = Some((height, head));
        newer.applied = Some(applied);
        drop(pending);
        if staged > self.backlog.flush_at {
            if let Ok(_flushing) = self.flush_lock.try_lock() {
                self.flush_locked(false)?;
            }
        }
        Ok(())
    }

    /// The head in the ledger file, not counting what is staged.
    fn stored_head(&self) -> Result<Option<ChainHead>, StoreError> {
        let Db::Writable(db) = &self.db;
        let txn = db.begin_read()?;
        let table = txn.open_table(META)?;
        let Some(bytes) = table.get(HEAD_KEY)? else {
            return Ok(None);
        };
        decode("head", bytes.value()).map(Some)
    }

    /// Whether anything applied is not yet in the ledger file.
    pub(crate) fn has_staged(&self) -> bool {
        !self.pending().is_empty()
    }

    fn lock_flushes(&self) -> std::sync::MutexGuard<'_, ()> {
        // The lock guards no data: a flush that panicked left the file as redb keeps it.
        self.flush_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes everything staged into the ledger file in one transaction, fsynced when
    /// `durable` (otherwise made durable by the next durable flush or commit). Reads see
    /// the same state throughout. A failed flush keeps what it was writing staged, so reads
    /// still see it; but redb refuses every write after an I/O error until the file is
    /// reopened, so the store then refuses to stage (`StoreError::Unflushed`): the node stops
    /// at its next entry, and a restart re-applies from Raft's log what was only staged.
    pub(crate) fn flush(&self, durable: bool) -> Result<(), StoreError> {
        let _flushing = self.lock_flushes();
        self.flush_locked(durable)
    }

    fn flush_locked(&self, durable: bool) -> Result<(), StoreError> {
        self.work
            .measure(Work::Flush, || self.write_staged(durable))
            .inspect_err(|error| {
                let _ = self.flush_failed.set(error.to_string());
            })
    }

    /// The CPU time this node has spent verifying, executing, staging and flushing.
    pub fn work(&self) -> &WorkTimes {
        &self.work
    }

    fn write_staged(&self, durable: bool) -> Result<(), StoreError> {
        let batch = {
            let mut pending = self.pending.write().expect("pending lock");
            let newer = std::mem::take(&mut pending.newer);
            pending.flushing.absorb(newer);
            pending.flushing.clone()
        };
        if batch.is_empty() && !durable {
            return Ok(());
        }
        let Db::Writable(db) = &self.db;
        let mut txn = db.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StoreError::Storage(e.to_string()))?;
        }
        {
            let mut blocks = txn.open_table(BLOCKS)?;
            for (height, bytes) in batch.blocks.iter() {
                blocks.insert(*height, &bytes[..])?;
            }
            let mut state = txn.open_table(STATE)?;
            for (key, value) in batch.state.iter() {
                match value {
                    Some(value) => state.insert(&**key, &value[..])?,
                    None => state.remove(&**key)?,
                };
            }
            let mut meta = txn.open_table(META)?;
            if let Some((_, head)) = &batch.head {
                meta.insert(HEAD_KEY, &head[..])?;
            }
            if let Some(applied) = &batch.applied {
                meta.insert(APPLIED_KEY, &applied[..])?;
            }
        }
        txn.commit()?;
        // Only now: a read begun before the commit still finds these entries staged.
        self.pending.write().expect("pending lock").flushing = Staged::default();
        if durable {
            self.note_durable()?;
        }
        Ok(())
    }

    /// Records the position the ledger file holds, right after a durable commit.
    fn note_durable(&self) -> Result<(), StoreError> {
        let Db::Writable(db) = &self.db;
        let txn = db.begin_read()?;
        let applied = txn.open_table(META)?.get(APPLIED_KEY)?;
        let applied = applied.map(|bytes| Bytes::from(bytes.value()));
        *self.durable_applied.write().expect("durable lock") = applied;
        Ok(())
    }

    /// The state machine's position as of the last durable write of the ledger file (or as
    /// the file was opened): a crash loses nothing up to it, so Raft's log may be purged up
    /// to it without a flush.
    pub(crate) fn durable_applied_bytes(&self) -> Option<Vec<u8>> {
        let durable = self.durable_applied.read().expect("durable lock");
        durable.as_deref().map(<[u8]>::to_vec)
    }

    /// The state machine's position as staged or written.
    pub(crate) fn applied_bytes(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.view()?.applied()
    }

    /// The state machine's position and every stored block, read in one view.
    pub(crate) fn applied_and_blocks(&self) -> Result<AppliedAndBlocks, StoreError> {
        let view = self.view()?;
        let applied = view.applied()?;
        let mut blocks = Vec::new();
        blocks_of(&view, |_, bytes| blocks.push(bytes.to_vec()))?;
        Ok((applied, blocks))
    }

    /// Executes `blocks` one after the other with `execute` (on the state as it grows) and
    /// stores them with the state machine's new position, all in one durable transaction
    /// after what was staged before: after a crash, either all of them are stored or none.
    /// Returns the heads reached.
    pub(crate) fn apply_blocks(
        &self,
        blocks: &[Block],
        applied: &[u8],
        mut execute: impl FnMut(
            &dyn StateRead,
            Option<&ChainHead>,
            &Block,
        ) -> Result<ExecutedBlock, String>,
    ) -> Result<Vec<ChainHead>, StoreError> {
        let _flushing = self.lock_flushes();
        self.flush_locked(false)?;
        let Db::Writable(db) = &self.db;
        let txn = db.begin_write()?;
        let mut heads = Vec::new();
        {
            let mut meta = txn.open_table(META)?;
            let mut head: Option<ChainHead> = match meta.get(HEAD_KEY)? {
                None => None,
                Some(bytes) => Some(decode("head", bytes.value())?),
            };
            let mut table = txn.open_table(BLOCKS)?;
            let mut state = txn.open_table(STATE)?;
            for block in blocks {
                let executed = execute(&WriteState(&state), head.as_ref(), block).map_err(|e| {
                    StoreError::Corrupt {
                        what: format!("block {}", block.header.height),
                        detail: e,
                    }
                })?;
                table.insert(
                    executed.head.height,
                    encode_block(&executed.block)?.as_slice(),
                )?;
                write_changes(&mut state, &executed.writes)?;
                let head_bytes = serde_json::to_vec(&executed.head).expect("heads encode");
                meta.insert(HEAD_KEY, head_bytes.as_slice())?;
                heads.push(executed.head.clone());
                head = Some(executed.head);
            }
            meta.insert(APPLIED_KEY, applied)?;
        }
        txn.commit()?;
        self.note_durable()?;
        Ok(heads)
    }

    pub fn block(&self, height: u64) -> Result<Option<Block>, StoreError> {
        match self.block_bytes(height)? {
            None => Ok(None),
            Some(bytes) => decode(&format!("block {height}"), &bytes).map(Some),
        }
    }

    /// A committed transaction by id, as of `snapshot`: None when the ledger has no such
    /// transaction; an error when its event or block is missing (a corrupt store).
    pub fn committed_tx(
        &self,
        snapshot: &Snapshot,
        tx_id: &Hash,
    ) -> Result<Option<CommittedTx>, StoreError> {
        let Some(leaf_index) = snapshot.value::<u64>(&keys::tx(tx_id))? else {
            return Ok(None);
        };
        let missing = |what: String| StoreError::Corrupt {
            what,
            detail: "missing".into(),
        };
        let event: AuditEvent = snapshot
            .value(&keys::event(leaf_index))?
            .ok_or_else(|| missing(format!("the audit event of leaf {leaf_index}")))?;
        let block = self
            .block(event.height)?
            .ok_or_else(|| missing(format!("block {}", event.height)))?;
        let position = leaf_index
            .checked_sub(block.header.log_size - block.header.tx_count)
            .map(|p| p as usize)
            .filter(|p| *p < block.txs.len() && *p < block.outcomes.len())
            .ok_or_else(|| missing(format!("leaf {leaf_index} in block {}", event.height)))?;
        Ok(Some(CommittedTx {
            leaf_index,
            event,
            block,
            position,
        }))
    }

    /// The raw bytes of a block as stored.
    pub fn block_bytes(&self, height: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let view = self.view()?;
        if let Some(bytes) = view.pending.block(height) {
            return Ok(Some(bytes.to_vec()));
        }
        let table = view.txn.open_table(BLOCKS)?;
        Ok(table.get(height)?.map(|bytes| bytes.value().to_vec()))
    }

    /// The number of stored blocks, by their keys (not by the head).
    pub fn block_count(&self) -> Result<u64, StoreError> {
        let view = self.view()?;
        let table = view.txn.open_table(BLOCKS)?;
        let mut count = table.len()?;
        for height in view.pending.blocks().keys() {
            if table.get(*height)?.is_none() {
                count += 1;
            }
        }
        Ok(count)
    }

    /// Every stored block with its key, in key order, as stored bytes (for `verify`, which
    /// trusts neither the keys nor the bytes).
    pub fn for_each_block(&self, visit: impl FnMut(u64, &[u8])) -> Result<(), StoreError> {
        blocks_of(&self.view()?, visit)
    }

    /// A consistent view of state as of now, including every block applied so far.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let view = self.view()?;
        Ok(Snapshot {
            table: view.txn.open_table(STATE)?,
            pending: view.pending,
        })
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // A node shut down leaves its file complete; one that crashes re-applies from
        // Raft's log what it had only staged.
        let staged = !self.pending.get_mut().map_or(true, |p| p.is_empty());
        if staged {
            if let Err(error) = self.flush(true) {
                eprintln!("medledger: writing the ledger file on shutdown: {error}");
            }
        }
    }
}

/// Every block of `view`, staged or in the file, in height order; a height in both is
/// visited once, as staged.
fn blocks_of(view: &View, mut visit: impl FnMut(u64, &[u8])) -> Result<(), StoreError> {
    let staged = view.pending.blocks();
    let table = view.txn.open_table(BLOCKS)?;
    let mut staged_iter = staged.iter().peekable();
    for entry in table.iter()? {
        let (height, bytes) = entry?;
        let height = height.value();
        while let Some((&next, bytes)) = staged_iter.next_if(|(h, _)| **h < height) {
            visit(next, bytes);
        }
        if !staged.contains_key(&height) {
            visit(height, bytes.value());
        }
    }
    for (&height, bytes) in staged_iter {
        visit(height, bytes);
    }
    Ok(())
}

/// Applies a block's state changes to the state table.
fn write_changes(
    state: &mut redb::Table<&'static str, &'static [u8]>,
    writes: &medledger_core::state::WriteSet,
) -> Result<(), StoreError> {
    for (key, value) in writes {
        match value {
            Some(value) => state.insert(key.as_str(), value.as_slice())?,
            None => state.remove(key.as_str())?,
        };
    }
    Ok(())
}

fn encode_block(block: &Block) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(block).map_err(|e| StoreError::Corrupt {
        what: "block".into(),
        detail: e.to_string(),
    })
}

/// A committed transaction: its leaf, its audit event, and the block that holds it at
/// `position`.
pub struct CommittedTx {
    pub leaf_index: u64,
    pub event: AuditEvent,
    pub block: Block,
    pub position: usize,
}

impl CommittedTx {
    pub fn tx(&self) -> &medledger_core::tx::SignedTx {
        &self.block.txs[self.position]
    }

    pub fn outcome(&self) -> &medledger_core::contracts::TxOutcome {
        &self.block.outcomes[self.position]
    }
}

/// A read-only view of committed state, consistent for its whole life: the ledger file as
/// of one read transaction, under what was staged when it began.
pub struct Snapshot {
    table: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    pending: Pending,
}

impl Snapshot {
    /// Calls `visit` on every entry from `start` on, in key order, staged entries over
    /// those in the file (a staged deletion hides the key), until it returns false or an
    /// error.
    fn walk<E: From<StoreError>>(
        &self,
        start: &str,
        mut visit: impl FnMut(&str, &[u8]) -> Result<bool, E>,
    ) -> Result<(), E> {
        let mut stored = self.table.range(start..).map_err(StoreError::from)?;
        let mut staged = self.pending.state_from(start).peekable();
        let mut next_stored = stored.next().transpose().map_err(StoreError::from)?;
        loop {
            let staged_first = match (&next_stored, staged.peek()) {
                (None, None) => return Ok(()),
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((key, _)), Some((staged_key, _))) => *staged_key <= key.value(),
            };
            let more = if staged_first {
                let (key, value) = staged.next().expect("peeked");
                if next_stored
                    .as_ref()
                    .is_some_and(|(stored_key, _)| stored_key.value() == key)
                {
                    next_stored = stored.next().transpose().map_err(StoreError::from)?;
                }
                match value {
                    Some(value) => visit(key, value)?,
                    None => true,
                }
            } else {
                let (key, value) = next_stored.take().expect("matched");
                let more = visit(key.value(), value.value())?;
                next_stored = stored.next().transpose().map_err(StoreError::from)?;
                more
            };
            if !more {
                return Ok(());
            }
        }
    }

    /// Entries whose keys start with `prefix` and sort after `after`, at most `limit`.
    pub fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let start = match after {
            Some(after) if after > prefix => format!("{after}\0"),
            _ => prefix.to_string(),
        };
        let mut out = Vec::new();
        self.walk(&start, |key, value| -> Result<bool, StoreError> {
            if !key.starts_with(prefix) || out.len() >= limit {
                return Ok(false);
            }
            out.push((key.to_string(), value.to_vec()));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Visits the key of every entry under `prefix`, in key order, while `visit` succeeds;
    /// its first error ends the visit and is returned.
    pub fn visit_keys<E: From<StoreError>>(
        &self,
        prefix: &str,
        mut visit: impl FnMut(&str) -> Result<(), E>,
    ) -> Result<(), E> {
        self.walk(prefix, |key, _| {
            if !key.starts_with(prefix) {
                return Ok(false);
            }
            visit(key)?;
            Ok(true)
        })
    }

    /// Every entry, in key order (for `verify`).
    pub fn for_each(&self, mut visit: impl FnMut(&str, &[u8])) -> Result<(), StoreError> {
        self.walk("", |key, value| -> Result<bool, StoreError> {
            visit(key, value);
            Ok(true)
        })
    }

    /// The value at `key`, staged or in the file, handed to `read`.
    fn read<R>(&self, key: &str, read: impl FnOnce(&[u8]) -> R) -> Result<Option<R>, StoreError> {
        match self.pending.state(key) {
            Some(staged) => Ok(staged.as_deref().map(read)),
            None => Ok(self.table.get(key)?.map(|bytes| read(bytes.value()))),
        }
    }

    /// Decodes a domain value, reporting corruption as an error rather than stopping.
    pub fn value<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.read(key, |bytes| decode(key, bytes))?.transpose()
    }

    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, merkle::MerkleError> {
        merkle::inclusion_proof(self, index, size)
    }

    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, merkle::MerkleError> {
        merkle::consistency_proof(self, old, new)
    }
}

impl StateRead for Snapshot {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.read(key, <[u8]>::to_vec) {
            Ok(value) => value,
            // A read error means the disk failed under a decision: stop rather than decide
            // on partial state.
            Err(error) => panic!("state read failed at {key:?}: {error}"),
        }
    }
}

impl NodeSource for Snapshot {
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        let bytes = self.get(&keys::merkle_node(level, index))?;
        Some(Hash(bytes.try_into().ok()?))
    }
}

/// State as a write transaction sees it, for executing blocks inside that transaction.
struct WriteState<'a, 't>(&'a redb::Table<'t, &'static str, &'static [u8]>);

impl StateRead for WriteState<'_, '_> {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.0.get(key) {
            Ok(value) => value.map(|bytes| bytes.value().to_vec()),
            Err(error) => panic!("state read failed at {key:?}: {error}"),
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what: what.to_string(),
        detail: e.to_string(),
    })
}

/// A redb backend over bytes in memory.
#[derive(Debug)]
struct MemoryBackend(std::sync::RwLock<Vec<u8>>);

impl redb::StorageBackend for MemoryBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.0.read().expect("backend lock").len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let bytes = self.0.read().expect("backend lock");
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let end = start
            .checked_add(out.len())
            .filter(|end| *end <= bytes.len())
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past end")
            })?;
        out.copy_from_slice(&bytes[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        self.0.write().expect("backend lock").resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut bytes = self.0.write().expect("backend lock");
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let end = start
            .checked_add(data.len())
            .ok_or_else(|| std::io::Error::other("offset overflow"))?;
        if end > bytes.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "write past end",
            ));
        }
        bytes[start..end].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block that only carries `writes` at `height`: nothing here executes it.
    fn carrier(height: u64, writes: &[(&str, Option<&str>)]) -> ExecutedBlock {
        let header = medledger_core::block::BlockHeader {
            chain_id: "store-test".into(),
            height,
            prev_hash: Hash([0; 32]),
            time_ms: height,
            proposer: "node@test".into(),
            tx_count: 0,
            tx_root: Hash([0; 32]),
            log_size: 0,
            log_root: Hash([0; 32]),
            state_hash: Hash([height as u8; 32]),
        };
        ExecutedBlock {
            head: ChainHead::of(&header),
            block: Block {
                header,
                genesis: None,
                txs: Vec::new(),
                outcomes: Vec::new(),
            },
            writes: writes
                .iter()
                .map(|(key, value)| (key.to_string(), value.map(|v| v.as_bytes().to_vec())))
                .collect(),
        }
    }

    #[test]
    fn staged_blocks_are_read_at_once_and_reach_the_file_only_when_flushed() {
        // Proves the promise a consortium node answers clients on: a block staged is what
        // every read begun after it sees (state, deletions, scans, head, blocks, position),
        // while a snapshot begun before keeps its own state through a flush; the ledger file
        // holds a staged block only after a flush, and a durable one survives a reopen.
        let dir = tempfile::tempdir().expect("a directory");
        let store = Store::open(dir.path()).expect("a store");
        store.commit_block(&carrier(0, &[])).expect("block 0");
        let first = carrier(
            1,
            &[
                ("k/1", Some("one")),
                ("k/3", Some("three")),
                ("k/5", Some("five")),
            ],
        );
        store
            .commit_block(&first)
            .expect("a block written directly");
        let before = store.snapshot().expect("a snapshot");

        let staged = carrier(
            2,
            &[("k/2", Some("two")), ("k/3", None), ("k/4", Some("four"))],
        );
        store.stage(Some(&staged), b"position").expect("staged");
        let keys = |snapshot: &Snapshot| -> Vec<String> {
            snapshot
                .scan("k/", None, 10)
                .expect("a scan")
                .into_iter()
                .map(|(key, _)| key)
                .collect()
        };
        let now = store.snapshot().expect("a snapshot");
        assert_eq!(keys(&now), ["k/1", "k/2", "k/4", "k/5"]);
        assert_eq!(now.get("k/3"), None);
        assert_eq!(now.get("k/2").as_deref(), Some(&b"two"[..]));
        let after_k2: Vec<String> = now
            .scan("k/", Some("k/2"), 2)
            .expect("a scan")
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(after_k2, ["k/4", "k/5"]);
        assert_eq!(keys(&before), ["k/1", "k/3", "k/5"]);
        assert_eq!(store.head().unwrap().unwrap(), staged.head);
        assert_eq!(store.block_count().unwrap(), 3);
        assert_eq!(store.block(2).unwrap().unwrap(), staged.block);
        assert_eq!(
            store.applied_bytes().unwrap().as_deref(),
            Some(&b"position"[..])
        );
        let mut heights = Vec::new();
        store.for_each_block(|h, _| heights.push(h)).unwrap();
        assert_eq!(heights, [0, 1, 2]);

        // Not yet in the file.
        let file = dir.path().join(LEDGER_FILE);
        let copy = Store::open_copy(&file).expect("a copy");
        assert_eq!(copy.head().unwrap().unwrap(), first.head);
        drop(copy);

        store.flush(true).expect("a durable flush");
        assert_eq!(
            keys(&before),
            ["k/1", "k/3", "k/5"],
            "a flush changed a snapshot"
        );
        assert_eq!(
            keys(&store.snapshot().unwrap()),
            ["k/1", "k/2", "k/4", "k/5"]
        );
        drop((before, now));
        let copy = Store::open_copy(&file).expect("a copy");
        assert_eq!(copy.head().unwrap().unwrap(), staged.head);
        assert_eq!(
            keys(&copy.snapshot().unwrap()),
            ["k/1", "k/2", "k/4", "k/5"]
        );
        assert_eq!(
            copy.applied_bytes().unwrap().as_deref(),
            Some(&b"position"[..])
        );

        // A staged block must follow the head, staged or written.
        let gap = carrier(3, &[]);
        let skipping = carrier(4, &[]);
        assert!(matches!(
            store.stage(Some(&skipping), b"p"),
            Err(StoreError::OutOfOrder { height: 4 })
        ));
        store
            .stage(Some(&gap), b"p")
            .expect("the next block stages");
        assert!(matches!(
            store.stage(Some(&gap), b"p"),
            Err(StoreError::OutOfOrder { height: 3 })
        ));
    }

    /// A backend in memory whose writes and syncs fail while `failing` is set.
    #[derive(Debug)]
    struct Flaky {
        bytes: MemoryBackend,
        failing: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Flaky {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::other("the disk is failing"));
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for Flaky {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.bytes.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.bytes.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.bytes.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.check()?;
            self.bytes.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.bytes.write(offset, data)
        }
    }

    /// A store in memory whose ledger file fails on demand, with block 0 written.
    fn flaky_store() -> (Store, Arc<std::sync::atomic::AtomicBool>) {
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let memory = || MemoryBackend(std::sync::RwLock::new(Vec::new()));
        let db = redb::Builder::new()
            .create_with_backend(Flaky {
                bytes: memory(),
                failing: failing.clone(),
            })
            .expect("a database");
        let raft = redb::Builder::new()
            .create_with_backend(memory())
            .expect("a database");
        let store = Store::with_tables(db, RaftDisk::Tables(raft)).expect("a store");
        store.commit_block(&carrier(0, &[])).expect("block 0");
        (store, failing)
    }

    #[test]
    fn a_failed_flush_keeps_its_blocks_readable_and_refuses_further_staging() {
        // Proves that a flush the disk refuses loses nothing and hides nothing: the blocks it
        // was writing stay staged and readable; and since redb takes no write after an I/O
        // error, the next block is refused with a typed error (the node stops and restarts
        // from its log) rather than piled up in memory, even once the disk recovers.
        let (store, failing) = flaky_store();
        store
            .stage(Some(&carrier(1, &[("k/1", Some("one"))])), b"p1")
            .expect("staged");
        store
            .stage(Some(&carrier(2, &[("k/2", Some("two"))])), b"p2")
            .expect("staged");
        failing.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(store.flush(true).is_err(), "the failing disk took a flush");
        assert!(store.has_staged());
        let snapshot = store.snapshot().expect("a snapshot");
        assert_eq!(snapshot.get("k/1").as_deref(), Some(&b"one"[..]));
        assert_eq!(snapshot.get("k/2").as_deref(), Some(&b"two"[..]));
        assert_eq!(store.head().unwrap().unwrap().height, 2);
        assert_eq!(store.block_count().unwrap(), 3);
        assert_eq!(store.applied_bytes().unwrap().as_deref(), Some(&b"p2"[..]));

        failing.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(
            store.stage(Some(&carrier(3, &[])), b"p3"),
            Err(StoreError::Unflushed(_))
        ));
        assert!(matches!(
            store.stage(None, b"p3"),
            Err(StoreError::Unflushed(_))
        ));
        assert_eq!(store.head().unwrap().unwrap().height, 2);
    }

    #[test]
    fn staging_flushes_itself_when_behind_and_refuses_when_it_cannot_flush() {
        // Proves the staged layer's bounds: past `flush_at` changes, staging writes them to
        // the file itself (nothing is left staged, and every change is still read); while
        // another flush holds the file, staging goes on until `refuse_at` and then fails
        // with a typed error, and the refused block is not staged.
        let mut store = Store::open_memory().expect("a store");
        store.commit_block(&carrier(0, &[])).expect("block 0");
        store.backlog = Backlog {
            flush_at: 4,
            refuse_at: 8,
        };
        let key = |n: u64| format!("k/{n}");
        let block = |height: u64| {
            let (a, b) = (key(2 * height), key(2 * height + 1));
            carrier(height, &[(a.as_str(), Some("v")), (b.as_str(), Some("v"))])
        };
        for height in 1..=3 {
            store.stage(Some(&block(height)), b"p").expect("staged");
        }
        assert!(store.has_staged(), "flushed before the bound");
        store.stage(Some(&block(4)), b"p").expect("staged");
        assert!(!store.has_staged(), "past the bound, staging did not flush");
        let snapshot = store.snapshot().expect("a snapshot");
        for n in 2..10 {
            assert_eq!(snapshot.get(&key(n)).as_deref(), Some(&b"v"[..]));
        }
        drop(snapshot);

        let flushing = store.lock_flushes();
        for height in 5..=9 {
            store.stage(Some(&block(height)), b"p").expect("staged");
        }
        assert!(matches!(
            store.stage(Some(&block(10)), b"p"),
            Err(StoreError::Backlog { staged: 10 })
        ));
        assert_eq!(store.head().unwrap().unwrap().height, 9);
        drop(flushing);
        store.flush(false).expect("a flush");
        assert!(!store.has_staged());
    }

    #[test]
    fn visit_keys_sees_every_key_under_its_prefix_in_order_and_stops_at_an_error() {
        // Proves a visit covers exactly the keys under the prefix (not a neighbour that
        // shares its first characters), in key order, beyond any one page, and that the
        // visitor's error ends it and comes back unchanged.
        let store = Store::open_memory().expect("a store");
        let Db::Writable(db) = &store.db;
        let txn = db.begin_write().expect("a write");
        {
            let mut state = txn.open_table(STATE).expect("the state table");
            for i in (0..2500u32).rev() {
                state
                    .insert(format!("event/p/{i:08x}").as_str(), &[][..])
                    .expect("insert");
            }
            for key in ["event/", "event/o/1", "event/p", "event/q/1", "event/pz/1"] {
                state.insert(key, &[][..]).expect("insert");
            }
        }
        txn.commit().expect("commit");
        let snapshot = store.snapshot().expect("a snapshot");
        let mut seen = Vec::new();
        snapshot
            .visit_keys("event/p/", |key| -> Result<(), StoreError> {
                seen.push(key.to_string());
                Ok(())
            })
            .expect("a visit");
        let expected: Vec<String> = (0..2500u32).map(|i| format!("event/p/{i:08x}")).collect();
        assert_eq!(seen, expected);

        let mut visited = 0;
        let stopped = snapshot.visit_keys("event/p/", |_| {
            visited += 1;
            if visited == 3 {
                return Err(StoreError::Empty);
            }
            Ok(())
        });
        assert!(matches!(stopped, Err(StoreError::Empty)));
        assert_eq!(visited, 3);
    }
}

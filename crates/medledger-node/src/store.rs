//! The node's embedded, crash-safe store (redb): blocks, replicated state and the head.
//!
//! A block, its state changes and the new head are written in one redb transaction that is
//! fsynced before `commit_block` returns, so after a crash the store holds every block it
//! acknowledged and never half of one. The same file is all `verify` needs.
//!
//! A consortium node keeps Raft's log and vote beside it, in a write-ahead log
//! (`consensus::wal`, directory `raft-log`): an append is one sequential write and one
//! `fdatasync`, where a durable redb commit writes pages across its file and its header;
//! and the log's appends and the state machine's commits never wait for each other's lock.
//! A store in memory (simulations) keeps the log in a second in-memory redb database.

use std::path::Path;

use medledger_core::block::{Block, ChainHead, ExecutedBlock};
use medledger_core::merkle::{self, NodeSource};
use medledger_core::model::AuditEvent;
use medledger_core::state::{keys, StateRead};
use medledger_core::Hash;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

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
    #[error(
        "a block this node announced could not be written; restarting re-applies it from the log"
    )]
    Unwritten,
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

pub struct Store {
    db: Db,
    /// Raft's log and vote; absent in a store opened from a copy (for `verify`).
    raft: Option<RaftDisk>,
    /// Held by the state machine from announcing a block until the block is written
    /// (`hold_reads`); every read waits for it, so nothing read after an announcement is
    /// older than the block announced.
    settling: std::sync::Mutex<()>,
    /// Set when a block announced under `hold_reads` was not written: every read fails
    /// from then on rather than show state older than what was announced.
    unwritten: std::sync::atomic::AtomicBool,
}

/// Where a store keeps Raft's log and vote.
pub(crate) enum RaftDisk {
    /// Tables `RAFT_LOG` and `RAFT_META` of a redb database (stores in memory).
    Tables(redb::Database),
    /// The write-ahead log in the data directory (stores on disk).
    Wal(Box<crate::consensus::wal::Wal>),
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
        Ok(Store {
            db: Db::Writable(db),
            raft: Some(raft),
            settling: std::sync::Mutex::new(()),
            unwritten: std::sync::atomic::AtomicBool::new(false),
        })
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

    /// Makes every commit so far durable (an fsynced empty commit of the ledger file):
    /// before Raft purges the entries that produced them, and from time to time so that a
    /// restart re-applies little.
    pub(crate) fn make_durable(&self) -> Result<(), StoreError> {
        let Db::Writable(db) = &self.db;
        db.begin_write()?.commit()?;
        Ok(())
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
        Ok(Store {
            db: Db::Writable(db),
            raft: None,
            settling: std::sync::Mutex::new(()),
            unwritten: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Makes every read that begins from now on wait until the block being announced is
    /// written (`ReadsHeld::written`).
    ///
    /// The state machine takes it before it announces a block it has executed and not yet
    /// written (answering the clients waiting for it), so that a client told of its
    /// transaction, or anyone who saw the new head, reads state that includes the block.
    /// Reads already under way are not affected: they began before the announcement.
    /// Nothing that reads the store may run on the thread holding it, and it is taken only
    /// while holding redb's write lock (`commit_announced`), never before it.
    fn hold_reads(&self) -> ReadsHeld<'_> {
        ReadsHeld {
            store: self,
            _held: self.settled(),
            written: false,
        }
    }

    fn settled(&self) -> std::sync::MutexGuard<'_, ()> {
        // The lock guards no data: a panic while it was held left nothing half-changed.
        self.settling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction, StoreError> {
        drop(self.settled());
        self.begin_read_as_written()
    }

    /// A read of what is written now, without waiting for a block being written.
    fn begin_read_as_written(&self) -> Result<redb::ReadTransaction, StoreError> {
        if self.unwritten.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Unwritten);
        }
        let Db::Writable(db) = &self.db;
        Ok(db.begin_read()?)
    }

    /// The head after the last committed block, or None before genesis.
    pub fn head(&self) -> Result<Option<ChainHead>, StoreError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(META)?;
        let Some(bytes) = table.get(HEAD_KEY)? else {
            return Ok(None);
        };
        decode("head", bytes.value()).map(Some)
    }

    /// The head's raw bytes as stored, for `verify`, which decodes them itself.
    pub fn head_bytes(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(META)?;
        Ok(table.get(HEAD_KEY)?.map(|bytes| bytes.value().to_vec()))
    }

    /// Writes a block, its state changes and the new head atomically and durably.
    pub fn commit_block(&self, executed: &ExecutedBlock) -> Result<(), StoreError> {
        self.commit(Some(executed), None, true, None::<fn()>)
    }

    /// Writes what applying one Raft entry did (a block, or nothing) with the state machine's
    /// new position, atomically. `durable = false` skips the fsync: the entry is in Raft's
    /// fsynced log, from which a crash re-applies it, and the next durable commit
    /// (`make_durable`, before a purge and from time to time) makes this one durable too.
    pub(crate) fn commit_applied(
        &self,
        executed: Option<&ExecutedBlock>,
        applied: &[u8],
        durable: bool,
    ) -> Result<(), StoreError> {
        self.commit(executed, Some(applied), durable, None::<fn()>)
    }

    /// Writes an applied block like `commit_applied`, without an fsync, and calls
    /// `announce` (which answers the block's clients) just before: once this store holds
    /// redb's write lock, so that the reads held back meanwhile (`hold_reads`) wait for this
    /// write only, never for a durable commit of another thread.
    pub(crate) fn commit_announced(
        &self,
        executed: &ExecutedBlock,
        applied: &[u8],
        announce: impl FnOnce(),
    ) -> Result<(), StoreError> {
        self.commit(Some(executed), Some(applied), false, Some(announce))
    }

    /// The state machine's position as written by `commit_applied`.
    pub(crate) fn applied_bytes(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(META)?;
        Ok(table.get(APPLIED_KEY)?.map(|bytes| bytes.value().to_vec()))
    }

    fn commit(
        &self,
        executed: Option<&ExecutedBlock>,
        applied: Option<&[u8]>,
        durable: bool,
        announce: Option<impl FnOnce()>,
    ) -> Result<(), StoreError> {
        let Db::Writable(db) = &self.db;
        let mut txn = db.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StoreError::Storage(e.to_string()))?;
        }
        let held = announce.map(|announce| {
            let held = self.hold_reads();
            announce();
            held
        });
        {
            let mut meta = txn.open_table(META)?;
            if let Some(executed) = executed {
                let height = executed.block.header.height;
                let expected = match meta.get(HEAD_KEY)? {
                    None => 0,
                    Some(bytes) => decode::<ChainHead>("head", bytes.value())?.height + 1,
                };
                if height != expected {
                    return Err(StoreError::OutOfOrder { height });
                }
                let block_bytes =
                    serde_json::to_vec(&executed.block).map_err(|e| StoreError::Corrupt {
                        what: "block".into(),
                        detail: e.to_string(),
                    })?;
                let head_bytes = serde_json::to_vec(&executed.head).expect("heads encode");
                let mut blocks = txn.open_table(BLOCKS)?;
                blocks.insert(height, block_bytes.as_slice())?;
                let mut state = txn.open_table(STATE)?;
                for (key, value) in &executed.writes {
                    match value {
                        Some(value) => state.insert(key.as_str(), value.as_slice())?,
                        None => state.remove(key.as_str())?,
                    };
                }
                meta.insert(HEAD_KEY, head_bytes.as_slice())?;
            }
            if let Some(applied) = applied {
                meta.insert(APPLIED_KEY, applied)?;
            }
        }
        // redb's default durability is Immediate: commit returns after the fsync.
        txn.commit()?;
        if let Some(held) = held {
            held.written();
        }
        Ok(())
    }

    /// The state machine's position and every stored block, read in one transaction.
    pub(crate) fn applied_and_blocks(&self) -> Result<AppliedAndBlocks, StoreError> {
        let txn = self.begin_read()?;
        let meta = txn.open_table(META)?;
        let applied = meta.get(APPLIED_KEY)?.map(|bytes| bytes.value().to_vec());
        let table = txn.open_table(BLOCKS)?;
        let mut blocks = Vec::new();
        for entry in table.iter()? {
            blocks.push(entry?.1.value().to_vec());
        }
        Ok((applied, blocks))
    }

    /// Executes `blocks` one after the other with `execute` (on the state as it grows) and
    /// stores them with the state machine's new position, all in one durable transaction:
    /// after a crash, either all of them are stored or none. Returns the heads reached.
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
                let block_bytes =
                    serde_json::to_vec(&executed.block).map_err(|e| StoreError::Corrupt {
                        what: "block".into(),
                        detail: e.to_string(),
                    })?;
                table.insert(executed.head.height, block_bytes.as_slice())?;
                for (key, value) in &executed.writes {
                    match value {
                        Some(value) => state.insert(key.as_str(), value.as_slice())?,
                        None => state.remove(key.as_str())?,
                    };
                }
                let head_bytes = serde_json::to_vec(&executed.head).expect("heads encode");
                meta.insert(HEAD_KEY, head_bytes.as_slice())?;
                heads.push(executed.head.clone());
                head = Some(executed.head);
            }
            meta.insert(APPLIED_KEY, applied)?;
        }
        txn.commit()?;
        Ok(heads)
    }

    pub fn block(&self, height: u64) -> Result<Option<Block>, StoreError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        let Some(bytes) = table.get(height)? else {
            return Ok(None);
        };
        decode(&format!("block {height}"), bytes.value()).map(Some)
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
        let txn = self.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        Ok(table.get(height)?.map(|bytes| bytes.value().to_vec()))
    }

    /// The number of stored blocks, by their keys (not by the head).
    pub fn block_count(&self) -> Result<u64, StoreError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        Ok(table.len()?)
    }

    /// Every stored block with its key, in key order, as stored bytes (for `verify`, which
    /// trusts neither the keys nor the bytes).
    pub fn for_each_block(&self, mut visit: impl FnMut(u64, &[u8])) -> Result<(), StoreError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        for entry in table.iter()? {
            let (height, bytes) = entry?;
            visit(height.value(), bytes.value());
        }
        Ok(())
    }

    /// A consistent view of state as of now, including every block announced so far.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Snapshot::of(self.begin_read()?)
    }

    /// A consistent view of state as written now, without waiting for a block that was
    /// announced and is being written: it may lack that last block. Only for checks that
    /// decide nothing alone: admission (retried on `snapshot` when the signer or its key is
    /// not found), signature checks ahead of a block (repeated at execution if the key
    /// changed) and peer certificates (membership a block late).
    pub fn snapshot_as_written(&self) -> Result<Snapshot, StoreError> {
        Snapshot::of(self.begin_read_as_written()?)
    }
}

/// Reads held back while an announced block is written (`Store::hold_reads`). Dropped
/// without `written`, the block was not written, and the store refuses every read after.
struct ReadsHeld<'a> {
    store: &'a Store,
    _held: std::sync::MutexGuard<'a, ()>,
    written: bool,
}

impl ReadsHeld<'_> {
    /// The block is written: reads go on.
    fn written(mut self) {
        self.written = true;
    }
}

impl Drop for ReadsHeld<'_> {
    fn drop(&mut self) {
        // Runs before the lock is released, so no read slips in between.
        if !self.written {
            self.store
                .unwritten
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }
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

/// A read-only view of committed state, consistent for its whole life.
pub struct Snapshot {
    table: redb::ReadOnlyTable<&'static str, &'static [u8]>,
}

impl Snapshot {
    fn of(txn: redb::ReadTransaction) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            table: txn.open_table(STATE)?,
        })
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
        for entry in self.table.range(start.as_str()..)? {
            let (key, value) = entry?;
            if !key.value().starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((key.value().to_string(), value.value().to_vec()));
        }
        Ok(out)
    }

    /// Visits the key of every entry under `prefix`, in key order, while `visit` succeeds;
    /// its first error ends the visit and is returned.
    pub fn visit_keys<E: From<StoreError>>(
        &self,
        prefix: &str,
        mut visit: impl FnMut(&str) -> Result<(), E>,
    ) -> Result<(), E> {
        for entry in self.table.range(prefix..).map_err(StoreError::from)? {
            let (key, _) = entry.map_err(StoreError::from)?;
            if !key.value().starts_with(prefix) {
                break;
            }
            visit(key.value())?;
        }
        Ok(())
    }

    /// Every entry, in key order (for `verify`).
    pub fn for_each(&self, mut visit: impl FnMut(&str, &[u8])) -> Result<(), StoreError> {
        for entry in self.table.iter()? {
            let (key, value) = entry?;
            visit(key.value(), value.value());
        }
        Ok(())
    }

    /// Decodes a domain value, reporting corruption as an error rather than stopping.
    pub fn value<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.table.get(key)? {
            None => Ok(None),
            Some(bytes) => decode(key, bytes.value()).map(Some),
        }
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
        match self.table.get(key) {
            Ok(value) => value.map(|bytes| bytes.value().to_vec()),
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
    use std::sync::Arc;

    #[test]
    fn reads_begun_after_an_announcement_see_the_block_and_never_state_before_it() {
        // Proves the promise clients are answered on: while a block announced before it is
        // written is being written, a read waits and then sees it (never the state before
        // it); the read "as written" does not wait and does not see it; and a block that is
        // never written makes every read fail rather than show older state. The locks are
        // taken as `commit_announced` takes them: redb's write lock, then the reads.
        let store = Arc::new(Store::open_memory().expect("a store"));
        let Db::Writable(db) = &store.db;
        let txn = db.begin_write().expect("a write");
        let held = store.hold_reads();
        let reader = {
            let store = store.clone();
            std::thread::spawn(move || {
                let snapshot = store.snapshot().expect("a snapshot");
                snapshot.get("announced").is_some()
            })
        };
        // The read began after the announcement; it must not finish before the write, but
        // nothing here depends on how long it waits.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let as_written = store.snapshot_as_written().expect("a snapshot as written");
        assert!(as_written.get("announced").is_none());
        txn.open_table(STATE)
            .expect("the state table")
            .insert("announced", &b"1"[..])
            .expect("insert");
        txn.commit().expect("commit");
        held.written();
        assert!(
            reader.join().expect("the reader"),
            "the read saw older state"
        );
        assert!(store
            .snapshot()
            .expect("a snapshot")
            .get("announced")
            .is_some());

        // A commit that fails after its announcement: the write is dropped, then the hold.
        let txn = db.begin_write().expect("a write");
        let failed = store.hold_reads();
        drop(txn);
        drop(failed);
        assert!(matches!(store.snapshot(), Err(StoreError::Unwritten)));
        assert!(matches!(store.head(), Err(StoreError::Unwritten)));
        assert!(matches!(
            store.snapshot_as_written(),
            Err(StoreError::Unwritten)
        ));
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

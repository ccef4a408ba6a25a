//! The embedded record store (the default; nothing to install): a redb file of its own in
//! the node's data directory, every write acknowledged once an fsynced commit holds it.
//!
//! Writes are group-committed. redb has one write transaction at a time and a durable
//! commit waits for its fsync, so versions committed one by one queue behind each other's
//! fsyncs: concurrent creates were bound by them, whatever else the node could do. Instead,
//! a caller checks what it writes (so bad input is its own typed error, never its
//! neighbours'), hands it to the store's writer thread and waits. The writer takes every
//! write queued while it was committing into one transaction, commits it with one fsync,
//! and only then answers each caller with that commit's result: a write is acknowledged
//! only once the commit holding it is durable, and a commit that fails fails every write
//! in it. Reads do not go through the writer.

use std::path::Path;
use std::sync::{mpsc, Arc};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    check_blob, check_cid, check_recipient, stored_envelope, RecordStore, RecordStoreError,
    LIST_MAX,
};
use crate::keywrap::WrappedKey;

/// The file name of the embedded record store inside a node's data directory.
pub const RECORDS_FILE: &str = "records.redb";

const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
/// (content id, recipient) → wrapped data key.
const ENVELOPES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("envelopes");

/// Bytes one group commit gathers before it closes; the write that crosses the line still
/// joins, so a group holds at most this plus one version (blobs of up to `BLOB_BYTES_MAX`).
/// Bounds the transaction, not the queue: every queued write's caller is blocked on it.
const GROUP_BYTES_MAX: usize = 64 * 1024 * 1024;

pub struct EmbeddedStore {
    db: Arc<redb::Database>,
    /// Closed on drop, which ends the writer.
    writes: Option<mpsc::Sender<Write>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// One caller's checked write (a version, or a lone blob or envelope), copied from the
/// caller's borrows so that the writer thread can take it, and where its commit's result
/// goes.
struct Write {
    blobs: Vec<(String, Vec<u8>)>,
    /// (content id, recipient, wrapped key).
    envelopes: Vec<(String, String, Vec<u8>)>,
    done: mpsc::SyncSender<Result<(), RecordStoreError>>,
}

impl Write {
    fn bytes(&self) -> usize {
        let blobs: usize = self.blobs.iter().map(|(_, bytes)| bytes.len()).sum();
        let envelopes: usize = self.envelopes.iter().map(|(_, _, key)| key.len()).sum();
        blobs + envelopes
    }
}

fn backend(detail: impl std::fmt::Display) -> RecordStoreError {
    RecordStoreError::Backend {
        store: "embedded",
        detail: detail.to_string(),
    }
}

fn writer_stopped() -> RecordStoreError {
    backend("the store's writer has stopped")
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `data_dir` and starts its writer.
    pub fn open(data_dir: &Path) -> Result<EmbeddedStore, RecordStoreError> {
        std::fs::create_dir_all(data_dir).map_err(backend)?;
        let db = redb::Database::create(data_dir.join(RECORDS_FILE)).map_err(backend)?;
        EmbeddedStore::over(db)
    }

    /// The store over an open database: its tables, created if needed, and its writer.
    fn over(db: redb::Database) -> Result<EmbeddedStore, RecordStoreError> {
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(BLOBS).map_err(backend)?;
        txn.open_table(ENVELOPES).map_err(backend)?;
        txn.commit().map_err(backend)?;
        let db = Arc::new(db);
        let (writes, queue) = mpsc::channel();
        let writer = {
            let db = db.clone();
            std::thread::Builder::new()
                .name("medledger-records".into())
                .spawn(move || write_groups(&db, &queue))
                .map_err(backend)?
        };
        Ok(EmbeddedStore {
            db,
            writes: Some(writes),
            writer: Some(writer),
        })
    }
}

impl Drop for EmbeddedStore {
    /// Closes the queue and waits for the writer (nobody is waiting on it: dropping the
    /// store takes its last handle), so that the file is closed once the store is dropped
    /// and can be opened again.
    fn drop(&mut self) {
        self.writes.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The writer thread: waits for a write, takes every write queued behind it into the same
/// transaction (up to `GROUP_BYTES_MAX`), commits it durably, then answers each caller with
/// the commit's result. Writes arriving meanwhile gather for the next commit.
fn write_groups(db: &redb::Database, queue: &mpsc::Receiver<Write>) {
    while let Ok(first) = queue.recv() {
        let mut bytes = first.bytes();
        let mut group = vec![first];
        while bytes < GROUP_BYTES_MAX {
            match queue.try_recv() {
                Ok(write) => {
                    bytes += write.bytes();
                    group.push(write);
                }
                Err(_) => break,
            }
        }
        let result = commit_group(db, &group);
        for write in group {
            // The caller blocks until it hears; one that is gone has nobody to tell.
            let _ = write.done.send(result.clone());
        }
    }
}

/// Writes a group in one transaction, in queue order, and commits it with redb's default
/// durability: `commit` returns once the fsync is done. An error before the commit drops
/// the transaction, which aborts it; a commit that fails may have left the group on disk or
/// not, which callers must allow for anyway (see `RecordStore::put_version`).
fn commit_group(db: &redb::Database, group: &[Write]) -> Result<(), RecordStoreError> {
    let txn = db.begin_write().map_err(backend)?;
    {
        let mut blobs = txn.open_table(BLOBS).map_err(backend)?;
        for (cid, bytes) in group.iter().flat_map(|write| &write.blobs) {
            if blobs.get(cid.as_str()).map_err(backend)?.is_none() {
                blobs
                    .insert(cid.as_str(), bytes.as_slice())
                    .map_err(backend)?;
            }
        }
        let mut envelopes = txn.open_table(ENVELOPES).map_err(backend)?;
        for (cid, recipient, wrapped) in group.iter().flat_map(|write| &write.envelopes) {
            envelopes
                .insert((cid.as_str(), recipient.as_str()), wrapped.as_slice())
                .map_err(backend)?;
        }
    }
    txn.commit().map_err(backend)
}

impl RecordStore for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn put_blob(&self, cid: &str, bytes: &[u8]) -> Result<(), RecordStoreError> {
        self.put_version(&[(cid, bytes)], &[])
    }

    /// The whole version in one fsynced commit (shared with whatever other writes were
    /// waiting), checked before anything is queued.
    fn put_version(
        &self,
        blobs: &[(&str, &[u8])],
        envelopes: &[(&str, &str, &WrappedKey)],
    ) -> Result<(), RecordStoreError> {
        for (cid, bytes) in blobs {
            check_blob(cid, bytes)?;
        }
        for (cid, recipient, _) in envelopes {
            check_cid(cid)?;
            check_recipient(recipient)?;
        }
        let (done, answer) = mpsc::sync_channel(1);
        let write = Write {
            blobs: blobs
                .iter()
                .map(|(cid, bytes)| (cid.to_string(), bytes.to_vec()))
                .collect(),
            envelopes: envelopes
                .iter()
                .map(|(cid, recipient, wrapped)| {
                    (
                        cid.to_string(),
                        recipient.to_string(),
                        wrapped.as_bytes().to_vec(),
                    )
                })
                .collect(),
            done,
        };
        let writes = self.writes.as_ref().ok_or_else(writer_stopped)?;
        writes.send(write).map_err(|_| writer_stopped())?;
        // The writer answers every write it took; no answer means it ended (a panic in
        // redb), and then nothing of this write is known to be stored.
        answer.recv().map_err(|_| writer_stopped())?
    }

    fn get_blob(&self, cid: &str) -> Result<Option<Vec<u8>>, RecordStoreError> {
        check_cid(cid)?;
        let txn = self.db.begin_read().map_err(backend)?;
        let blobs = txn.open_table(BLOBS).map_err(backend)?;
        Ok(blobs
            .get(cid)
            .map_err(backend)?
            .map(|bytes| bytes.value().to_vec()))
    }

    fn blob_ids(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, RecordStoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let blobs = txn.open_table(BLOBS).map_err(backend)?;
        let range = match after {
            Some(after) => {
                blobs.range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            }
            None => blobs.range::<&str>(..),
        }
        .map_err(backend)?;
        let mut ids = Vec::new();
        for item in range.take(limit.min(LIST_MAX)) {
            ids.push(item.map_err(backend)?.0.value().to_string());
        }
        Ok(ids)
    }

    fn put_envelope(
        &self,
        cid: &str,
        recipient: &str,
        wrapped: &WrappedKey,
    ) -> Result<(), RecordStoreError> {
        self.put_version(&[], &[(cid, recipient, wrapped)])
    }

    fn get_envelope(
        &self,
        cid: &str,
        recipient: &str,
    ) -> Result<Option<WrappedKey>, RecordStoreError> {
        check_cid(cid)?;
        check_recipient(recipient)?;
        let txn = self.db.begin_read().map_err(backend)?;
        let envelopes = txn.open_table(ENVELOPES).map_err(backend)?;
        let Some(bytes) = envelopes.get((cid, recipient)).map_err(backend)? else {
            return Ok(None);
        };
        stored_envelope(cid, recipient, bytes.value()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Barrier, RwLock};

    use super::*;
    use crate::keywrap::{EncryptionKeyPair, WrapContext};

    /// A disk in memory that counts the syncs it finished and fails them when told to.
    #[derive(Debug, Default)]
    struct Disk {
        bytes: RwLock<Vec<u8>>,
        syncs: AtomicU64,
        failing: AtomicBool,
    }

    #[derive(Debug)]
    struct OnDisk(Arc<Disk>);

    impl redb::StorageBackend for OnDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            Ok(self.0.bytes.read().unwrap().len() as u64)
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            let bytes = self.0.bytes.read().unwrap();
            let start = offset as usize;
            let stored = bytes
                .get(start..start + out.len())
                .ok_or_else(|| std::io::Error::other("read past the end"))?;
            out.copy_from_slice(stored);
            Ok(())
        }

        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.0.bytes.write().unwrap().resize(len as usize, 0);
            Ok(())
        }

        fn sync_data(&self) -> Result<(), std::io::Error> {
            if self.0.failing.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("the disk failed"));
            }
            self.0.syncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            let mut bytes = self.0.bytes.write().unwrap();
            let start = offset as usize;
            bytes
                .get_mut(start..start + data.len())
                .ok_or_else(|| std::io::Error::other("write past the end"))?
                .copy_from_slice(data);
            Ok(())
        }
    }

    fn store_on(disk: &Arc<Disk>) -> EmbeddedStore {
        let db = redb::Builder::new()
            .create_with_backend(OnDisk(disk.clone()))
            .unwrap();
        EmbeddedStore::over(db).unwrap()
    }

    /// A version's ciphertext, its content id and its key wrapped for the custodian.
    fn version(n: u32) -> (String, Vec<u8>, WrappedKey) {
        let sealed = crate::sealing::seal(format!("version {n}").as_bytes(), b"r").unwrap();
        let context = WrapContext {
            record: "r",
            version: 1,
            custodian: "hospital-a",
            recipient: "hospital-a",
        };
        let wrapped = EncryptionKeyPair::generate()
            .public_key()
            .wrap_key(&[7; 32], &context)
            .unwrap();
        (sealed.cid, sealed.ciphertext, wrapped)
    }

    /// Stores version `n` (its blob and its envelope for the custodian).
    fn put(store: &EmbeddedStore, n: u32) -> Result<(), RecordStoreError> {
        let (cid, bytes, wrapped) = version(n);
        store.put_version(&[(&cid, &bytes)], &[(&cid, "hospital-a", &wrapped)])
    }

    #[test]
    fn a_write_is_answered_only_after_a_sync_that_followed_it() {
        // Proves a caller hears that its version is stored only after a sync finished since
        // it sent it, for every one of many writers whose versions share commits.
        let disk = Arc::new(Disk::default());
        let store = store_on(&disk);
        let start = Barrier::new(16);
        std::thread::scope(|scope| {
            for writer in 0..16 {
                let (store, disk, start) = (&store, &disk, &start);
                scope.spawn(move || {
                    start.wait();
                    for n in 0..20 {
                        let before = disk.syncs.load(Ordering::SeqCst);
                        put(store, writer * 100 + n).unwrap();
                        assert!(disk.syncs.load(Ordering::SeqCst) > before);
                    }
                });
            }
        });
    }

    #[test]
    fn a_failed_commit_fails_every_write_in_it() {
        // Proves a commit whose sync fails is an error for every caller whose version it
        // held: none hears that it is stored, none panics, and the store still closes.
        let disk = Arc::new(Disk::default());
        let store = store_on(&disk);
        put(&store, 0).unwrap();
        disk.failing.store(true, Ordering::SeqCst);
        let start = Barrier::new(16);
        let results: Vec<Result<(), RecordStoreError>> = std::thread::scope(|scope| {
            let writers: Vec<_> = (1..=16)
                .map(|n| {
                    let (store, start) = (&store, &start);
                    scope.spawn(move || {
                        start.wait();
                        put(store, n)
                    })
                })
                .collect();
            writers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        for result in results {
            assert!(
                matches!(
                    result,
                    Err(RecordStoreError::Backend {
                        store: "embedded",
                        ..
                    })
                ),
                "{result:?}"
            );
        }
        drop(store);
    }
}

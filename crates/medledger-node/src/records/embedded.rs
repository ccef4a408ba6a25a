//! The embedded record store (the default; nothing to install): a redb file of its own in
//! the node's data directory, every write an fsynced commit.

use std::path::Path;

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

pub struct EmbeddedStore {
    db: redb::Database,
}

fn backend(detail: impl std::fmt::Display) -> RecordStoreError {
    RecordStoreError::Backend {
        store: "embedded",
        detail: detail.to_string(),
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<EmbeddedStore, RecordStoreError> {
        std::fs::create_dir_all(data_dir).map_err(backend)?;
        let db = redb::Database::create(data_dir.join(RECORDS_FILE)).map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(BLOBS).map_err(backend)?;
        txn.open_table(ENVELOPES).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(EmbeddedStore { db })
    }
}

impl RecordStore for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn put_blob(&self, cid: &str, bytes: &[u8]) -> Result<(), RecordStoreError> {
        self.put_version(&[(cid, bytes)], &[])
    }

    /// One fsynced commit for the whole version, checked before anything is written.
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
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut table = txn.open_table(BLOBS).map_err(backend)?;
            for (cid, bytes) in blobs {
                if table.get(*cid).map_err(backend)?.is_none() {
                    table.insert(*cid, *bytes).map_err(backend)?;
                }
            }
            let mut table = txn.open_table(ENVELOPES).map_err(backend)?;
            for (cid, recipient, wrapped) in envelopes {
                table
                    .insert((*cid, *recipient), wrapped.as_bytes())
                    .map_err(backend)?;
            }
        }
        txn.commit().map_err(backend)
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

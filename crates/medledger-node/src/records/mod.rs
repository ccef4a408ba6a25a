//! Off-chain record stores: where a custodian keeps the encrypted record versions it holds.
//!
//! A store holds two kinds of things, both opaque to it: **blobs** (the ciphertext of a
//! record version or attachment, under its content id, `sealing::content_id`) and
//! **envelopes** (a version's data key wrapped for one recipient, `keywrap`). Nothing in a
//! store is plaintext; nothing in it needs trusting: whoever reads a blob checks it against
//! the content id, commitment and author signature on the ledger before decrypting.
//!
//! Every implementation passes one conformance suite (`tests/record_stores.rs`).

pub mod check;
mod embedded;
mod postgres;
pub mod service;

pub use embedded::{EmbeddedStore, RECORDS_FILE};
pub use postgres::{PostgresStore, CONNECTIONS_MAX};
pub use service::{RecordError, RecordService};

use crate::keywrap::WrappedKey;

/// The largest blob a store takes: a record version or one attachment (a scanned PDF, an
/// image), encrypted.
pub const BLOB_BYTES_MAX: usize = 32 * 1024 * 1024;
/// The most ids one listing returns.
pub const LIST_MAX: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordStoreError {
    #[error("{given:?} is not the content id of these bytes ({actual})")]
    WrongContentId { given: String, actual: String },
    #[error("a blob is at most {BLOB_BYTES_MAX} bytes; this one is {0}")]
    TooLarge(usize),
    #[error("{0:?} is not a content id (CIDv1, raw, sha2-256, base32)")]
    NotAContentId(String),
    #[error("a recipient is 1 to 256 bytes of printable ASCII")]
    BadRecipient,
    #[error("stored {what} does not decode: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("record store ({store}): {detail}")]
    Backend { store: &'static str, detail: String },
}

/// Where a custodian keeps ciphertext and wrapped keys. Calls block (run them off the async
/// threads); every write is durable when it returns.
pub trait RecordStore: Send + Sync {
    /// A short name for messages: "embedded", "postgresql".
    fn kind(&self) -> &'static str;

    /// Stores `bytes` under `cid`, which must be their content id. Storing a blob that is
    /// already there changes nothing.
    fn put_blob(&self, cid: &str, bytes: &[u8]) -> Result<(), RecordStoreError>;

    /// The blob stored under `cid`, as stored (the caller checks it against the ledger).
    fn get_blob(&self, cid: &str) -> Result<Option<Vec<u8>>, RecordStoreError>;

    /// Content ids of stored blobs in ascending order, after `after`, at most `limit`
    /// (capped at `LIST_MAX`).
    fn blob_ids(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, RecordStoreError>;

    /// Stores the data key of blob `cid` wrapped for `recipient`, replacing an earlier
    /// envelope for the same pair (a key re-wrapped after the recipient rotated its key).
    fn put_envelope(
        &self,
        cid: &str,
        recipient: &str,
        wrapped: &WrappedKey,
    ) -> Result<(), RecordStoreError>;

    /// Stores a version at once: its blobs (checked like `put_blob`) and envelopes, each
    /// `(cid, recipient, wrapped)`. A store that can makes it one durable commit; on an
    /// error, blobs already stored stay (they are content-addressed and harmless).
    fn put_version(
        &self,
        blobs: &[(&str, &[u8])],
        envelopes: &[(&str, &str, &WrappedKey)],
    ) -> Result<(), RecordStoreError> {
        for (cid, bytes) in blobs {
            self.put_blob(cid, bytes)?;
        }
        for (cid, recipient, wrapped) in envelopes {
            self.put_envelope(cid, recipient, wrapped)?;
        }
        Ok(())
    }

    /// The envelope of blob `cid` for `recipient`.
    fn get_envelope(
        &self,
        cid: &str,
        recipient: &str,
    ) -> Result<Option<WrappedKey>, RecordStoreError>;
}

/// Checks a blob before it is stored: its size and that `cid` is its content id.
pub fn check_blob(cid: &str, bytes: &[u8]) -> Result<(), RecordStoreError> {
    if bytes.len() > BLOB_BYTES_MAX {
        return Err(RecordStoreError::TooLarge(bytes.len()));
    }
    check_cid(cid)?;
    let actual = crate::sealing::content_id(bytes);
    if actual != cid {
        return Err(RecordStoreError::WrongContentId {
            given: cid.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Checks that `cid` is shaped like a content id (before it reaches a query).
pub fn check_cid(cid: &str) -> Result<(), RecordStoreError> {
    if medledger_core::contracts::is_valid_cid(cid) {
        Ok(())
    } else {
        Err(RecordStoreError::NotAContentId(
            cid.chars().take(80).collect(),
        ))
    }
}

/// Checks an envelope's recipient name.
pub fn check_recipient(recipient: &str) -> Result<(), RecordStoreError> {
    let fits =
        (1..=256).contains(&recipient.len()) && recipient.bytes().all(|b| b.is_ascii_graphic());
    if fits {
        Ok(())
    } else {
        Err(RecordStoreError::BadRecipient)
    }
}

/// A stored envelope's bytes as a wrapped key; anything else is a corrupt store.
pub(crate) fn stored_envelope(
    cid: &str,
    recipient: &str,
    bytes: &[u8],
) -> Result<WrappedKey, RecordStoreError> {
    WrappedKey::from_bytes(bytes).map_err(|e| RecordStoreError::Corrupt {
        what: format!("the envelope of {cid} for {recipient}"),
        detail: e.to_string(),
    })
}

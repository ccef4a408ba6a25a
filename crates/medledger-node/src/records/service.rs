//! The custodian's record service: creating versions, serving them to other members under
//! the ledger's decision, and reading them (from this node or another custodian) with every
//! check against the ledger before anything is decrypted.
//!
//! **Creating** a version (`prepare`): the resource is checked (`fhir`), gets its id and
//! version, is sealed under a fresh data key with its attachments, and the key is wrapped
//! for the custodian organisation and the patient under the keys they published on the
//! ledger. The ciphertext and envelopes are durable in the record store before the author
//! signs the `create_record` transaction that names them; a version is acknowledged only
//! when that transaction is committed.
//!
//! **Auditing** (`log_access`, the requester's side): each request, a read, a record's
//! history or a search across custodians, first commits exactly one `log_access` entry,
//! signed by the node the requester called (the requester is the actor; the query and the
//! answer appear as salted commitments), and waits for the ledger's decision at the
//! entry's place in the order. A denied entry ends the request there: no custodian is
//! asked.
//!
//! **Serving** (`serve`, the custodian's side of an exchange): a custodian serves only
//! under a granted entry on its own copy of the ledger that the requester's node signed,
//! for this actor, patient and purpose, that names this custodian and covers every version
//! asked for (named, or of a searched type, and indexed no later than the entry), is
//! recent, and whose grant still holds on the custodian's ledger now (a revoke committed
//! since stops it). Then the ciphertext as stored leaves with its data key: as the
//! custodian's own envelope for the custodian's own users, otherwise sealed under a key of
//! this one answer that only the requester's organisation opens (`keywrap`: one HPKE
//! encapsulation per answer, bound to the access entry).
//!
//! **Reading** (`read`, `history`, the requester's side): every served version is checked
//! against the requester's own copy of the ledger: its content id, the author's signature
//! on the `create_record` transaction, then the key unwrap, the decryption under the
//! record's binding and the plaintext commitment, then the resource itself. Any mismatch is
//! an integrity error: logged (ids only), refused, never decrypted into an answer.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use medledger_core::canonical::to_canonical_bytes;
use medledger_core::contracts::{decide, AccessQuery, TxOutcome};
use medledger_core::crypto::PublicKey;
use medledger_core::identity::{is_patient_pseudonym, split_user_id};
use medledger_core::model::{
    AccessDecision, Action, AuditEvent, EncryptionKey, Patient, Purpose, Record, RecordVersion,
    User, RESOURCE_TYPES,
};
use medledger_core::state::{keys, Overlay};
use medledger_core::tx::{NewRecordVersion, SignedTx, TxBody};
use medledger_core::Hash;
use serde::{Deserialize, Serialize};

use super::{RecordStore, RecordStoreError, BLOB_BYTES_MAX};
use crate::fhir::{self, AttachmentRef, FhirError};
use crate::keywrap::{
    AnswerBinding, AnswerKey, AnswerKeyShare, EncryptionKeyPair, EncryptionPublicKey, SealedKey,
    WrapContext, WrappedKey,
};
use crate::ledger::{now_ms, Ledger, NonceCounter, SubmitError};
use crate::sealing::{self, associated_data, content_id};
use crate::store::{Snapshot, StoreError};

/// Most record versions one exchange call names (a history asks in groups of this size).
pub const FETCH_VERSIONS_MAX: usize = 32;
/// Most attachments of one version.
pub const ATTACHMENTS_MAX: usize = 16;
/// Most bytes of attachments (before encryption) of one version.
pub const ATTACHMENT_BYTES_MAX: usize = BLOB_BYTES_MAX - 64;
/// Custodian calls one history makes at once.
const HISTORY_CALLS_MAX: usize = 8;
/// How long a custodian waits for its ledger to reach the requester's access entry.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after its block a custodian serves under an access entry.
pub const ACCESS_ENTRY_TTL_MS: u64 = 2 * 60 * 1000;
/// Create transactions whose author signature was checked, remembered up to this many.
const VERIFIED_CACHE_MAX: usize = 100_000;
/// How long an access entry signed by this node stays valid for ordering.
const ACCESS_TX_LIFETIME_MS: u64 = 5 * 60 * 1000;

/// Why a record operation failed. Each variant is one answer a client can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("not a valid FHIR R4 resource: {0}")]
    Fhir(#[from] FhirError),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("{0} has published no encryption key on the ledger")]
    NoEncryptionKey(String),
    #[error("access denied ({reason}); the refusal is access entry {access_tx}")]
    Denied { reason: String, access_tx: Hash },
    #[error("integrity check failed for {record}: {detail}")]
    Integrity { record: String, detail: String },
    #[error("custodian {custodian} unavailable: {detail}")]
    Unavailable { custodian: String, detail: String },
    #[error("ledger: {0}")]
    Ledger(String),
    #[error("no commit within the deadline; look the access entry up by its id {0}")]
    OutcomeUnknown(Hash),
    #[error("record store: {0}")]
    Store(String),
}

impl RecordError {
    /// A stable code for APIs and peers.
    pub fn code(&self) -> &'static str {
        match self {
            RecordError::Invalid(_) => "invalid_request",
            RecordError::Fhir(_) => "invalid_resource",
            RecordError::NotFound(_) => "not_found",
            RecordError::Conflict(_) => "conflict",
            RecordError::NoEncryptionKey(_) => "no_encryption_key",
            RecordError::Denied { .. } => "access_denied",
            RecordError::Integrity { .. } => "integrity",
            RecordError::Unavailable { .. } => "custodian_unavailable",
            RecordError::Ledger(_) => "ledger",
            RecordError::OutcomeUnknown(_) => "outcome_unknown",
            RecordError::Store(_) => "record_store",
        }
    }
}

impl From<RecordStoreError> for RecordError {
    fn from(error: RecordStoreError) -> RecordError {
        RecordError::Store(error.to_string())
    }
}

impl From<StoreError> for RecordError {
    fn from(error: StoreError) -> RecordError {
        RecordError::Ledger(error.to_string())
    }
}

impl From<SubmitError> for RecordError {
    fn from(error: SubmitError) -> RecordError {
        match error {
            SubmitError::OutcomeUnknown(tx_id) => RecordError::OutcomeUnknown(tx_id),
            other => RecordError::Ledger(other.to_string()),
        }
    }
}

/// An error as it crosses between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_tx: Option<Hash>,
}

impl WireError {
    /// The error a custodian reported, as the requester's own.
    pub fn into_error(self, custodian: &str) -> RecordError {
        match (self.code.as_str(), self.access_tx) {
            ("access_denied", Some(access_tx)) => RecordError::Denied {
                reason: self.message,
                access_tx,
            },
            ("integrity", _) => RecordError::Integrity {
                record: custodian.to_string(),
                detail: format!("reported by the custodian: {}", self.message),
            },
            ("not_found", _) => RecordError::NotFound(self.message),
            ("invalid_request", _) => RecordError::Invalid(self.message),
            ("no_encryption_key", _) => RecordError::NoEncryptionKey(self.message),
            _ => RecordError::Unavailable {
                custodian: custodian.to_string(),
                detail: format!("{}: {}", self.code, self.message),
            },
        }
    }
}

impl From<&RecordError> for WireError {
    fn from(error: &RecordError) -> WireError {
        WireError {
            code: error.code().to_string(),
            message: error.to_string(),
            access_tx: match error {
                RecordError::Denied { access_tx, .. } => Some(*access_tx),
                _ => None,
            },
        }
    }
}

/// An attachment as an author uploads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentUpload {
    pub content_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The file's bytes, base64url.
    pub data: String,
}

/// A new version for this custodian to seal and store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareRequest {
    /// The FHIR R4 resource.
    pub resource: serde_json::Value,
    /// The record to add a version to; by default the resource's `id`, or a new id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<AttachmentUpload>,
}

/// A sealed, stored version waiting for its author's signature.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prepared {
    pub record_id: String,
    pub version: u64,
    pub cid: String,
    /// Content ids of the attachments' ciphertexts, in order.
    pub attachments: Vec<String>,
    /// The `create_record` body for the author to sign and submit.
    pub body: TxBody,
    /// The resource as sealed, with its id, version and time set (kept on this node).
    #[serde(skip)]
    pub resource: serde_json::Value,
}

/// Where and for whom one version is sealed.
#[derive(Clone, Copy)]
struct Sealing<'a> {
    record_id: &'a str,
    version: u64,
    patient: &'a str,
    /// The custodian's key pair under its published key: its own envelope.
    custodian_key: &'a EncryptionKeyPair,
    patient_key: &'a EncryptionPublicKey,
    data_key: &'a [u8; 32],
}

/// One version asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRef {
    pub record_id: String,
    pub version: u64,
}

/// What a requester's node asks a custodian for, under the access entry it committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    /// The user at the requesting organisation, `name@org`.
    pub actor: String,
    pub patient: String,
    pub purpose: Purpose,
    pub versions: Vec<VersionRef>,
    /// Whether to include the versions' attachments.
    pub attachments: bool,
    /// The requester's granted access entry for this request, and the block holding it.
    pub access_tx: Hash,
    pub access_height: u64,
}

/// The access entry a requester's node committed for a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessReceipt {
    pub tx_id: Hash,
    pub height: u64,
    pub leaf_index: u64,
    pub decision: AccessDecision,
    /// The salts of the entry's query and answer commitments.
    pub query_salt: Hash,
    pub answer_salt: Hash,
}

/// A blob as it travels: content id and ciphertext (base64url).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobCopy {
    pub cid: String,
    pub ciphertext: String,
}

/// One version as a custodian serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedVersion {
    pub record_id: String,
    pub version: u64,
    pub ciphertext: String,
    /// The data key, for the requester's organisation only.
    pub key: ServedKey,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<BlobCopy>,
}

/// How a served version's data key travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServedKey {
    /// The custodian's own envelope as stored: only to the custodian's own node.
    Own(WrappedKey),
    /// Sealed under the answer's key at the version's position in the answer.
    Sealed(SealedKey),
}

/// A custodian's answer: the versions asked for, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchAnswer {
    pub custodian: String,
    /// Opens the answer's key for the requester's organisation (`keywrap::AnswerBinding`:
    /// this custodian, the requester, the access entry); absent when the custodian answers
    /// its own node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_share: Option<AnswerKeyShare>,
    pub versions: Vec<ServedVersion>,
}

/// Calls to other custodians (over the consortium's mutual TLS).
pub trait CustodianLink: Send + Sync {
    fn fetch<'a>(
        &'a self,
        custodian: &'a str,
        request: &'a FetchRequest,
    ) -> Pin<Box<dyn Future<Output = Result<FetchAnswer, RecordError>> + Send + 'a>>;
}

/// An attachment after decryption.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenedAttachment {
    pub cid: String,
    /// The plaintext, base64url.
    pub data: String,
}

/// A version that passed every check, decrypted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenedVersion {
    pub custodian: String,
    pub record_id: String,
    pub version: u64,
    pub resource_type: String,
    pub patient: String,
    pub author: String,
    /// The block that indexed the version.
    pub height: u64,
    pub cid: String,
    pub resource: serde_json::Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<OpenedAttachment>,
    /// The access entry under which it was served.
    pub access_tx: Hash,
    /// A tombstone, as the ledger indexes it: `resource` is the stub (`fhir::tombstone`).
    #[serde(default, skip_serializing_if = "medledger_core::tx::is_false")]
    pub deleted: bool,
}

/// What one read asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadRequest {
    pub actor: String,
    pub custodian: String,
    pub record_id: String,
    /// The latest version unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    pub purpose: Purpose,
    #[serde(default)]
    pub attachments: bool,
}

/// A patient's records across custodians, as far as the requester may see them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    pub patient: String,
    pub versions: Vec<OpenedVersion>,
    /// The one access entry the call committed, granted or denied.
    pub access: AccessReceipt,
    /// Custodians that could not answer, and versions that failed their checks.
    pub failures: Vec<WireError>,
}

/// What one request's access entry says it is about (the query it commits to).
#[derive(Debug, Serialize)]
struct AccessPlan<'a> {
    actor: &'a str,
    patient: &'a str,
    action: Action,
    /// `custodian/record_id` of each record read.
    records: Vec<String>,
    resource_types: Vec<String>,
    custodians: Vec<String>,
    purpose: Purpose,
}

impl<'a> AccessPlan<'a> {
    fn read(actor: &'a str, record: &'a Record, purpose: Purpose) -> AccessPlan<'a> {
        AccessPlan {
            actor,
            patient: &record.patient,
            action: Action::Read,
            records: vec![format!("{}/{}", record.custodian, record.record_id)],
            resource_types: Vec::new(),
            custodians: Vec::new(),
            purpose,
        }
    }
}

impl AccessReceipt {
    /// The ledger's refusal as an error, or nothing if it granted.
    fn require_granted(&self) -> Result<(), RecordError> {
        match &self.decision {
            AccessDecision::Denied { denial } => Err(RecordError::Denied {
                reason: denial_code(denial),
                access_tx: self.tx_id,
            }),
            AccessDecision::Granted { .. } => Ok(()),
        }
    }
}

/// A custodian's record service.
pub struct RecordService {
    ledger: Arc<Ledger>,
    store: Arc<dyn RecordStore>,
    org: String,
    /// The organisation's encryption key pairs, oldest first.
    keys: Vec<EncryptionKeyPair>,
    link: Option<Arc<dyn CustodianLink>>,
    nonces: NonceCounter,
    verified_versions: Mutex<HashSet<Hash>>,
    /// The custodian's clock for the age of access entries, in ms since the Unix epoch.
    clock: std::sync::RwLock<ServiceClock>,
}

/// A record service's clock: ms since the Unix epoch. Tests replace it to move time on.
pub type ServiceClock = Arc<dyn Fn() -> u64 + Send + Sync>;

impl RecordService {
    /// A service for the node behind `ledger`, keeping records in `store`; `keys` are the
    /// organisation's encryption key pairs (oldest first), `link` reaches other custodians.
    pub fn new(
        ledger: Arc<Ledger>,
        store: Arc<dyn RecordStore>,
        keys: Vec<EncryptionKeyPair>,
        link: Option<Arc<dyn CustodianLink>>,
    ) -> Result<RecordService, RecordError> {
        let org = split_user_id(ledger.node_id())
            .map(|(org, _)| org.to_string())
            .ok_or_else(|| RecordError::Invalid("the node id is not name@org".into()))?;
        if keys.is_empty() {
            return Err(RecordError::NoEncryptionKey(format!(
                "{org} (the node's identity file holds no encryption key)"
            )));
        }
        Ok(RecordService {
            ledger,
            store,
            org,
            keys,
            link,
            nonces: NonceCounter::default(),
            verified_versions: Mutex::new(HashSet::new()),
            clock: std::sync::RwLock::new(Arc::new(now_ms)),
        })
    }

    /// Replaces the clock that judges how old an access entry is (the system clock by
    /// default).
    pub fn set_clock(&self, clock: ServiceClock) {
        *self.clock.write().unwrap_or_else(|e| e.into_inner()) = clock;
    }

    fn now_ms(&self) -> u64 {
        let clock = self.clock.read().unwrap_or_else(|e| e.into_inner()).clone();
        clock()
    }

    pub fn org(&self) -> &str {
        &self.org
    }

    pub fn store(&self) -> &Arc<dyn RecordStore> {
        &self.store
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Publishes the organisation's newest encryption key unless the ledger already has it.
    /// Returns whether a transaction was committed.
    pub async fn publish_key(&self) -> Result<bool, RecordError> {
        let newest = self.keys.last().expect("at least one key").public_key();
        let snapshot = self.snapshot()?;
        let published: Option<EncryptionKey> = snapshot.value(&keys::encryption_key(&self.org))?;
        if published.is_some_and(|p| p.public_key == newest.to_base64url()) {
            return Ok(false);
        }
        let committed = self
            .submit_signed(|_| TxBody::SetEncryptionKey {
                public_key: newest.to_base64url(),
            })
            .await?;
        match committed.outcome {
            TxOutcome::Committed { .. } => Ok(true),
            TxOutcome::Rejected { rejection } => Err(RecordError::Ledger(rejection.to_string())),
        }
    }

    fn snapshot(&self) -> Result<Snapshot, RecordError> {
        Ok(self.ledger.store().snapshot()?)
    }

    /// Signs `body` as this node with a nonce above any it used, and submits it.
    async fn submit_signed(
        &self,
        body: impl FnMut(u64) -> TxBody,
    ) -> Result<crate::ledger::Committed, RecordError> {
        self.ledger
            .submit_signed(
                self.ledger.node_id(),
                &self.ledger.identity().key,
                &self.nonces,
                ACCESS_TX_LIFETIME_MS,
                body,
            )
            .await
    }

    /// Checks, seals and stores a new version; returns the body for its author to sign.
    pub async fn prepare(&self, request: PrepareRequest) -> Result<Prepared, RecordError> {
        let bytes = serde_json::to_vec(&request.resource)
            .map_err(|e| RecordError::Invalid(e.to_string()))?;
        let mut checked = fhir::check_resource(&bytes)?;
        let record_id = match (&request.record_id, &checked.id) {
            (Some(given), Some(own)) if given != own => {
                return Err(RecordError::Invalid(format!(
                    "record_id {given:?} differs from the resource's id {own:?}"
                )))
            }
            (Some(given), _) => given.clone(),
            (None, Some(own)) => own.clone(),
            (None, None) => new_record_id(&self.org)?,
        };
        if !medledger_core::contracts::is_valid_record_id(&record_id) {
            return Err(RecordError::Invalid(
                "record_id must be a FHIR id: [A-Za-z0-9-.], 1 to 64".into(),
            ));
        }
        if request.attachments.len() > ATTACHMENTS_MAX {
            return Err(RecordError::Invalid(format!(
                "at most {ATTACHMENTS_MAX} attachments"
            )));
        }
        let snapshot = self.snapshot()?;
        let patient = checked.patient.clone();
        snapshot
            .value::<Patient>(&keys::patient(&patient))?
            .ok_or_else(|| RecordError::NotFound(format!("patient {patient} is not registered")))?;
        let version = match snapshot.value::<Record>(&keys::record(&self.org, &record_id))? {
            None => 1,
            Some(record) => {
                if record.patient != patient || record.resource_type != checked.resource_type {
                    return Err(RecordError::Conflict(
                        "a new version keeps the record's patient and resource type".into(),
                    ));
                }
                record.versions.len() as u64 + 1
            }
        };
        let (custodian_key, patient_key) = self.recipient_keys(&snapshot, &patient)?;
        drop(snapshot);

        let data_key = sealing::fresh_key().map_err(|e| RecordError::Store(e.to_string()))?;
        let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
        let mut refs = Vec::new();
        let mut attachment_bytes = 0usize;
        for (index, upload) in request.attachments.iter().enumerate() {
            let data = medledger_core::crypto::from_base64url(&upload.data).map_err(|_| {
                RecordError::Invalid(format!("attachment {index}: data is not base64url"))
            })?;
            attachment_bytes += data.len();
            if attachment_bytes > ATTACHMENT_BYTES_MAX {
                return Err(RecordError::Invalid(format!(
                    "attachments are at most {ATTACHMENT_BYTES_MAX} bytes in all"
                )));
            }
            if !is_media_type(&upload.content_type) {
                return Err(RecordError::Invalid(format!(
                    "attachment {index}: {:?} is not a media type",
                    upload.content_type
                )));
            }
            let sealed = sealing::seal_with_key(
                &data_key,
                &data,
                &associated_data(&self.org, &record_id, version, Some(index)),
            )
            .map_err(|e| RecordError::Store(e.to_string()))?;
            let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &data);
            refs.push(AttachmentRef {
                content_type: upload.content_type.clone(),
                url: format!("cid:{}", sealed.cid),
                size: data.len() as u64,
                sha1_base64: base64::engine::general_purpose::STANDARD.encode(sha1.as_ref()),
                title: upload.title.clone(),
            });
            blobs.push((sealed.cid, sealed.ciphertext));
        }
        if !refs.is_empty() {
            fhir::add_attachments(&mut checked.value, &refs)?;
        }
        fhir::set_version_identity(&mut checked.value, &record_id, version, now_ms());
        let attachments: Vec<String> = blobs.iter().map(|(cid, _)| cid.clone()).collect();
        let (cid, commitment) = self
            .seal_and_store(
                &Sealing {
                    record_id: &record_id,
                    version,
                    patient: &patient,
                    custodian_key,
                    patient_key: &patient_key,
                    data_key: &data_key,
                },
                &checked.value,
                blobs,
            )
            .await?;
        Ok(Prepared {
            body: TxBody::CreateRecord {
                patient,
                record_id: record_id.clone(),
                version,
                resource_type: checked.resource_type,
                cid: cid.clone(),
                commitment,
                deleted: false,
            },
            record_id,
            version,
            cid,
            attachments,
            resource: checked.value,
        })
    }

    /// Seals and stores the tombstone that deletes this custodian's record `record_id`:
    /// the next version, whose content is a stub naming only the type, id, version and
    /// time (`fhir::tombstone`). Returns the `create_record` body (with `deleted`) for the
    /// author to sign. Refused when the record is unknown here or already deleted.
    pub async fn prepare_tombstone(&self, record_id: &str) -> Result<Prepared, RecordError> {
        let snapshot = self.snapshot()?;
        let record: Record = snapshot
            .value(&keys::record(&self.org, record_id))?
            .ok_or_else(|| RecordError::NotFound(format!("record {}/{record_id}", self.org)))?;
        if record.versions.last().is_some_and(|last| last.deleted) {
            return Err(RecordError::Conflict(format!(
                "record {}/{record_id} is already deleted",
                self.org
            )));
        }
        let version = record.versions.len() as u64 + 1;
        let (custodian_key, patient_key) = self.recipient_keys(&snapshot, &record.patient)?;
        drop(snapshot);
        let data_key = sealing::fresh_key().map_err(|e| RecordError::Store(e.to_string()))?;
        let stub = fhir::tombstone(&record.resource_type, record_id, version, now_ms());
        let (cid, commitment) = self
            .seal_and_store(
                &Sealing {
                    record_id,
                    version,
                    patient: &record.patient,
                    custodian_key,
                    patient_key: &patient_key,
                    data_key: &data_key,
                },
                &stub,
                Vec::new(),
            )
            .await?;
        Ok(Prepared {
            body: TxBody::CreateRecord {
                patient: record.patient.clone(),
                record_id: record_id.to_string(),
                version,
                resource_type: record.resource_type.clone(),
                cid: cid.clone(),
                commitment,
                deleted: true,
            },
            record_id: record_id.to_string(),
            version,
            cid,
            attachments: Vec::new(),
            resource: stub,
        })
    }

    /// A fresh id for a record this custodian will create (`<custodian>.<random>`), for
    /// clients that must know it before the version is prepared (a FHIR transaction
    /// rewrites references to it).
    pub fn new_record_id(&self) -> Result<String, RecordError> {
        new_record_id(&self.org)
    }

    /// This custodian's key pair under its published key (which this node must hold) and
    /// the patient's published key: every version's data key is wrapped for both.
    fn recipient_keys(
        &self,
        snapshot: &Snapshot,
        patient: &str,
    ) -> Result<(&EncryptionKeyPair, EncryptionPublicKey), RecordError> {
        let published = self.published_key(snapshot, &self.org)?;
        let custodian_key = self
            .keys
            .iter()
            .find(|k| k.public_key() == published)
            .ok_or_else(|| {
                RecordError::NoEncryptionKey(format!(
                    "{} (the published key is not in this node's identity file)",
                    self.org
                ))
            })?;
        let patient_key = self.published_key(snapshot, patient)?;
        Ok((custodian_key, patient_key))
    }

    /// Seals `resource` under `data_key` and the version's binding, wraps the key for the
    /// custodian and the patient, and stores the ciphertext, `blobs` (the attachments,
    /// sealed already) and the envelopes in one store commit. Returns the CID and the
    /// plaintext commitment for the `create_record` body.
    async fn seal_and_store(
        &self,
        sealing: &Sealing<'_>,
        resource: &serde_json::Value,
        mut blobs: Vec<(String, Vec<u8>)>,
    ) -> Result<(String, Hash), RecordError> {
        let Sealing {
            record_id,
            version,
            patient,
            custodian_key,
            patient_key,
            data_key,
        } = *sealing;
        let plaintext =
            serde_json::to_vec(resource).map_err(|e| RecordError::Invalid(e.to_string()))?;
        let sealed = sealing::seal_with_key(
            data_key,
            &plaintext,
            &associated_data(&self.org, record_id, version, None),
        )
        .map_err(|e| RecordError::Store(e.to_string()))?;
        let context = |recipient| WrapContext {
            record: record_id,
            version,
            custodian: &self.org,
            recipient,
        };
        let store_error = |e: crate::keywrap::WrapError| RecordError::Store(e.to_string());
        let envelopes = [
            (
                self.org.clone(),
                custodian_key
                    .seal_own(data_key, &context(&self.org))
                    .map_err(store_error)?,
            ),
            (
                patient.to_string(),
                patient_key
                    .wrap_key(data_key, &context(patient))
                    .map_err(store_error)?,
            ),
        ];
        let cid = sealed.cid.clone();
        blobs.push((sealed.cid.clone(), sealed.ciphertext));
        let store = self.store.clone();
        let envelope_cid = cid.clone();
        blocking(move || {
            let blobs: Vec<(&str, &[u8])> = blobs
                .iter()
                .map(|(cid, bytes)| (cid.as_str(), bytes.as_slice()))
                .collect();
            let envelopes: Vec<(&str, &str, &WrappedKey)> = envelopes
                .iter()
                .map(|(recipient, wrapped)| (envelope_cid.as_str(), recipient.as_str(), wrapped))
                .collect();
            Ok(store.put_version(&blobs, &envelopes)?)
        })
        .await?;
        Ok((cid, sealed.commitment))
    }

    fn published_key(
        &self,
        snapshot: &Snapshot,
        party: &str,
    ) -> Result<EncryptionPublicKey, RecordError> {
        let published: EncryptionKey = snapshot
            .value(&keys::encryption_key(party))?
            .ok_or_else(|| RecordError::NoEncryptionKey(party.to_string()))?;
        EncryptionPublicKey::from_base64url(&published.public_key)
            .map_err(|_| RecordError::NoEncryptionKey(format!("{party} (its key is unusable)")))
    }

    /// The custodian's side of an exchange: serves the versions only under the requester's
    /// granted access entry (see the module notes). `requester_org` is the organisation
    /// whose node asks (authenticated by mutual TLS, or this node itself).
    pub async fn serve(
        &self,
        requester_org: &str,
        request: FetchRequest,
    ) -> Result<FetchAnswer, RecordError> {
        match split_user_id(&request.actor) {
            Some((org, _)) if org == requester_org => {}
            // A patient reads through the custodian's own node, where they logged in; no
            // other member may speak for a patient.
            None if is_patient_pseudonym(&request.actor) && requester_org == self.org => {}
            _ => {
                return Err(RecordError::Invalid(format!(
                    "{requester_org} may ask only for its own users"
                )))
            }
        }
        // Attachments are up to 32 MiB a version: one version per call keeps an answer
        // inside one frame.
        if request.attachments && request.versions.len() > 1 {
            return Err(RecordError::Invalid(
                "attachments come with one version at a time".into(),
            ));
        }
        if request.versions.is_empty() || request.versions.len() > FETCH_VERSIONS_MAX {
            return Err(RecordError::Invalid(format!(
                "a fetch names 1 to {FETCH_VERSIONS_MAX} versions"
            )));
        }
        self.wait_for_height(request.access_height).await?;
        let snapshot = self.snapshot()?;
        let entry = self.access_entry_for(&snapshot, requester_org, &request)?;
        let requester_key = self.published_key(&snapshot, requester_org)?;
        let mut served: Vec<(VersionRef, RecordVersion)> = Vec::new();
        for wanted in &request.versions {
            let record = snapshot
                .value::<Record>(&keys::record(&self.org, &wanted.record_id))?
                .filter(|r| r.patient == request.patient)
                .ok_or_else(|| {
                    RecordError::NotFound(format!(
                        "record {}/{} of this patient",
                        self.org, wanted.record_id
                    ))
                })?;
            let covered = entry
                .records
                .contains(&format!("{}/{}", self.org, wanted.record_id))
                || (entry.action == Some(Action::Search)
                    && entry.resource_types.contains(&record.resource_type));
            if !covered {
                return Err(RecordError::Invalid(format!(
                    "access entry {} does not cover {}/{}",
                    request.access_tx, self.org, wanted.record_id
                )));
            }
            let version = record
                .versions
                .iter()
                .find(|v| v.version == wanted.version && v.height <= entry.height)
                .cloned()
                .ok_or_else(|| {
                    RecordError::NotFound(format!(
                        "version {} of {}/{} as of access entry {}",
                        wanted.version, self.org, wanted.record_id, request.access_tx
                    ))
                })?;
            served.push((wanted.clone(), version));
        }
        drop(snapshot);
        let store = self.store.clone();
        let keys = self.keys.clone();
        let org = self.org.clone();
        let requester = requester_org.to_string();
        let attachments = request.attachments;
        let access_tx = request.access_tx;
        blocking(move || {
            // Another member's node gets one key for the whole answer (see the module notes).
            let (key_share, answer_key) = if requester == org {
                (None, None)
            } else {
                let binding = AnswerBinding {
                    custodian: &org,
                    requester: &requester,
                    access_tx: &access_tx.0,
                };
                let (share, key) = requester_key
                    .answer_key(&binding)
                    .map_err(|e| RecordError::Store(e.to_string()))?;
                (Some(share), Some(key))
            };
            let server = VersionServer {
                store: store.as_ref(),
                keys: &keys,
                org: &org,
                requester: &requester,
                answer_key: answer_key.as_ref(),
                attachments,
            };
            let versions = served
                .iter()
                .enumerate()
                .map(|(index, (wanted, version))| server.serve(index, wanted, version))
                .collect::<Result<Vec<_>, RecordError>>()?;
            Ok(FetchAnswer {
                custodian: org.clone(),
                key_share,
                versions,
            })
        })
        .await
    }

    /// The requester's access entry, if it lets this custodian serve `request`: on this
    /// node's ledger, signed by the requester's node, granted, for this actor, patient and
    /// purpose, naming this custodian, recent, and still granted by the ledger's state now.
    fn access_entry_for(
        &self,
        snapshot: &Snapshot,
        requester_org: &str,
        request: &FetchRequest,
    ) -> Result<AuditEvent, RecordError> {
        let refuse = |detail: &str| {
            RecordError::Invalid(format!("access entry {}: {detail}", request.access_tx))
        };
        let leaf: u64 = snapshot
            .value(&keys::tx(&request.access_tx))?
            .ok_or_else(|| refuse("is not on the custodian's ledger"))?;
        let entry: AuditEvent = snapshot
            .value(&keys::event(leaf))?
            .ok_or_else(|| refuse("has no audit event"))?;
        let signer_org = split_user_id(&entry.signer).map(|(org, _)| org);
        let fits = entry.kind == "log_access"
            && entry.rejected.is_none()
            && signer_org == Some(requester_org)
            && entry.actor.as_deref() == Some(request.actor.as_str())
            && entry.patient.as_deref() == Some(request.patient.as_str())
            && entry.purpose == Some(request.purpose)
            && entry.custodians.contains(&self.org);
        if !fits {
            return Err(refuse(
                "is not the requester's entry for this actor, patient, purpose and custodian",
            ));
        }
        if !entry.decision.as_ref().is_some_and(|d| d.is_granted()) {
            return Err(refuse("was denied"));
        }
        let now = self.now_ms();
        if now.saturating_sub(entry.time_ms) > ACCESS_ENTRY_TTL_MS {
            return Err(refuse("has expired: a new request makes a new entry"));
        }
        let decision = decide(
            &Overlay::new(snapshot),
            &AccessQuery {
                actor: &request.actor,
                patient: &request.patient,
                action: entry.action.unwrap_or(Action::Read),
                resource_types: &entry.resource_types,
                purpose: Some(request.purpose),
                time_ms: now,
            },
        );
        if let AccessDecision::Denied { denial } = decision {
            return Err(RecordError::Denied {
                reason: denial_code(&denial),
                access_tx: request.access_tx,
            });
        }
        Ok(entry)
    }

    /// A salt only this organisation can recompute: from its newest key and the access
    /// entry's nonce, so it can later prove what was asked and answered without storing
    /// the salts, and no two entries share one.
    fn salt(&self, label: &[u8], nonce: u64) -> Hash {
        let secret = self.keys.last().expect("at least one key").secret_bytes();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        let mut context = ring::hmac::Context::with_key(&key);
        context.update(b"medledger access salt v1\n");
        context.update(label);
        context.update(&nonce.to_be_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(context.sign().as_ref());
        Hash(out)
    }

    async fn fetch(
        &self,
        custodian: &str,
        request: &FetchRequest,
    ) -> Result<FetchAnswer, RecordError> {
        if custodian == self.org {
            return self.serve(&self.org, request.clone()).await;
        }
        let link = self.link.as_ref().ok_or_else(|| RecordError::Unavailable {
            custodian: custodian.to_string(),
            detail: "this node has no peers".into(),
        })?;
        link.fetch(custodian, request).await
    }

    /// Commits the one access entry of a request and returns the ledger's decision on it.
    /// `planned` is every version the request will ask for, by custodian; only its salted
    /// commitment reaches the ledger, with one of the query.
    async fn log_access(
        &self,
        query: &AccessPlan<'_>,
        planned: &[(String, VersionRef)],
    ) -> Result<AccessReceipt, RecordError> {
        let query_bytes = canonical(query)?;
        let answer_bytes = canonical(planned)?;
        let mut salts = (Hash([0; 32]), Hash([0; 32]));
        let committed = self
            .submit_signed(|nonce| {
                salts = (self.salt(b"query", nonce), self.salt(b"answer", nonce));
                TxBody::LogAccess {
                    actor: query.actor.to_string(),
                    patient: query.patient.to_string(),
                    action: query.action,
                    records: query.records.clone(),
                    resource_types: query.resource_types.clone(),
                    custodians: query.custodians.clone(),
                    purpose: query.purpose,
                    custodian_denial: None,
                    query_commitment: Hash::digest_parts(&[&salts.0 .0, &query_bytes]),
                    answer_commitment: Hash::digest_parts(&[&salts.1 .0, &answer_bytes]),
                }
            })
            .await?;
        let (query_salt, answer_salt) = salts;
        let decision = match committed.outcome {
            TxOutcome::Committed {
                access: Some(decision),
            } => decision,
            TxOutcome::Committed { access: None } => {
                return Err(RecordError::Ledger(
                    "an access entry without a decision".into(),
                ))
            }
            TxOutcome::Rejected { rejection } => {
                return Err(RecordError::Ledger(format!(
                    "the access entry was refused: {rejection}"
                )))
            }
        };
        Ok(AccessReceipt {
            tx_id: committed.tx_id,
            height: committed.height,
            leaf_index: committed.leaf_index,
            decision,
            query_salt,
            answer_salt,
        })
    }

    /// Asks each custodian for its part of `planned` under the granted entry `access`,
    /// `FETCH_VERSIONS_MAX` versions a call and a few calls at once, and opens what they
    /// serve. A custodian that fails is reported in the failures; the rest still count.
    async fn fetch_all(
        self: &Arc<Self>,
        actor: &str,
        patient: &str,
        purpose: Purpose,
        access: &AccessReceipt,
        planned: Vec<(String, VersionRef)>,
    ) -> Result<(Vec<OpenedVersion>, Vec<WireError>), RecordError> {
        let mut groups: BTreeMap<String, Vec<VersionRef>> = BTreeMap::new();
        for (custodian, version) in planned {
            groups.entry(custodian).or_default().push(version);
        }
        let mut calls = Vec::new();
        for (custodian, versions) in groups {
            for chunk in versions.chunks(FETCH_VERSIONS_MAX) {
                let request = FetchRequest {
                    actor: actor.to_string(),
                    patient: patient.to_string(),
                    purpose,
                    versions: chunk.to_vec(),
                    attachments: false,
                    access_tx: access.tx_id,
                    access_height: access.height,
                };
                calls.push((custodian.clone(), request));
            }
        }
        let mut pending = calls.into_iter();
        let mut running = tokio::task::JoinSet::new();
        let mut answers = Vec::new();
        loop {
            while running.len() < HISTORY_CALLS_MAX {
                let Some((custodian, request)) = pending.next() else {
                    break;
                };
                let service = self.clone();
                running.spawn(async move {
                    let opened = match service.fetch(&custodian, &request).await {
                        Err(error) => Err(error),
                        // Checking signatures and decrypting is CPU work: off the async
                        // threads, and alongside the other custodians' answers.
                        Ok(answer) => Ok(tokio::task::spawn_blocking(move || {
                            service.open_answer(&answer, &request, request.access_tx)
                        })
                        .await
                        .map_err(|e| {
                            RecordError::Ledger(format!("opening an answer failed: {e}"))
                        })),
                    };
                    (custodian, opened)
                });
            }
            match running.join_next().await {
                None => break,
                Some(joined) => answers.push(
                    joined
                        .map_err(|e| RecordError::Ledger(format!("a history call failed: {e}")))?,
                ),
            }
        }
        let mut versions = Vec::new();
        let mut failures = Vec::new();
        for (custodian, opened) in answers {
            match opened {
                Err(error) => failures.push(WireError {
                    message: format!("{custodian}: {error}"),
                    ..WireError::from(&error)
                }),
                Ok(opened) => {
                    // An answer that could not be opened at all (the task failed, or this
                    // node's state could not be read) fails the whole call, as before.
                    for opened in opened?? {
                        match opened {
                            Ok(version) => versions.push(version),
                            Err(error) => failures.push(WireError::from(&error)),
                        }
                    }
                }
            }
        }
        Ok((versions, failures))
    }

    /// Reads one version (the latest unless named) from whichever custodian holds it,
    /// under one access entry.
    pub async fn read(&self, request: ReadRequest) -> Result<OpenedVersion, RecordError> {
        let record: Record = self
            .snapshot()?
            .value(&keys::record(&request.custodian, &request.record_id))?
            .ok_or_else(|| {
                RecordError::NotFound(format!(
                    "record {}/{}",
                    request.custodian, request.record_id
                ))
            })?;
        let version = match request.version {
            Some(version) => version,
            None => record.versions.last().map(|v| v.version).unwrap_or(1),
        };
        let wanted = VersionRef {
            record_id: request.record_id.clone(),
            version,
        };
        let access = self
            .log_access(
                &AccessPlan::read(&request.actor, &record, request.purpose),
                &[(request.custodian.clone(), wanted.clone())],
            )
            .await?;
        access.require_granted()?;
        let fetch = FetchRequest {
            actor: request.actor.clone(),
            patient: record.patient.clone(),
            purpose: request.purpose,
            versions: vec![wanted],
            attachments: request.attachments,
            access_tx: access.tx_id,
            access_height: access.height,
        };
        let answer = self.fetch(&request.custodian, &fetch).await?;
        if answer.custodian != request.custodian {
            return Err(RecordError::Integrity {
                record: format!("{}/{}", request.custodian, request.record_id),
                detail: format!("answered by {}", answer.custodian),
            });
        }
        let mut opened = self.open_answer(&answer, &fetch, access.tx_id)?;
        match opened.pop() {
            Some(Ok(version)) if opened.is_empty() => Ok(version),
            Some(Err(error)) => Err(error),
            _ => Err(RecordError::Integrity {
                record: format!("{}/{}", request.custodian, request.record_id),
                detail: "the custodian served a different set of versions".into(),
            }),
        }
    }

    /// Every version of one record, oldest first, under one access entry: a FHIR instance
    /// history.
    pub async fn versions(
        self: &Arc<Self>,
        actor: &str,
        custodian: &str,
        record_id: &str,
        purpose: Purpose,
    ) -> Result<Vec<OpenedVersion>, RecordError> {
        let record: Record = self
            .snapshot()?
            .value(&keys::record(custodian, record_id))?
            .ok_or_else(|| RecordError::NotFound(format!("record {custodian}/{record_id}")))?;
        let planned: Vec<(String, VersionRef)> = record
            .versions
            .iter()
            .map(|v| {
                (
                    custodian.to_string(),
                    VersionRef {
                        record_id: record_id.to_string(),
                        version: v.version,
                    },
                )
            })
            .collect();
        let access = self
            .log_access(&AccessPlan::read(actor, &record, purpose), &planned)
            .await?;
        access.require_granted()?;
        let (mut versions, failures) = self
            .fetch_all(actor, &record.patient, purpose, &access, planned)
            .await?;
        if let Some(failure) = failures.into_iter().next() {
            return Err(failure.into_error(custodian));
        }
        versions.sort_by_key(|v| v.version);
        Ok(versions)
    }

    /// Every version of the patient's records the actor may see, from every custodian,
    /// under one access entry; what is denied is simply absent.
    pub async fn history(
        self: &Arc<Self>,
        actor: &str,
        patient: &str,
        purpose: Purpose,
    ) -> Result<History, RecordError> {
        self.history_of(actor, patient, purpose, None, false).await
    }

    /// A patient's history limited to `types` (all types when None), and to each record's
    /// latest version when `latest_only`: what a FHIR search or `$everything` reads.
    ///
    /// One access entry, a search: of the types asked for, it names those the ledger would
    /// grant now (so a consent that covers only some leaves the rest absent rather than
    /// refusing all), or all of them when none would be granted, so that the refusal is on
    /// the ledger too; and it names the custodians holding records of the granted types.
    pub async fn history_of(
        self: &Arc<Self>,
        actor: &str,
        patient: &str,
        purpose: Purpose,
        types: Option<&[String]>,
        latest_only: bool,
    ) -> Result<History, RecordError> {
        let snapshot = self.snapshot()?;
        snapshot
            .value::<Patient>(&keys::patient(patient))?
            .ok_or_else(|| RecordError::NotFound(format!("patient {patient}")))?;
        let asked: Vec<String> = match types {
            Some(types) => types.to_vec(),
            None => RESOURCE_TYPES.iter().map(|(t, _)| t.to_string()).collect(),
        };
        let state = Overlay::new(&snapshot);
        let now = now_ms();
        let granted: Vec<String> = asked
            .iter()
            .filter(|t| {
                decide(
                    &state,
                    &AccessQuery {
                        actor,
                        patient,
                        action: Action::Search,
                        resource_types: std::slice::from_ref(*t),
                        purpose: Some(purpose),
                        time_ms: now,
                    },
                )
                .is_granted()
            })
            .cloned()
            .collect();
        drop(state);
        let mut planned: Vec<(String, VersionRef)> = Vec::new();
        let prefix = keys::patient_records_prefix(patient);
        if !granted.is_empty() {
            snapshot.visit_keys(&prefix, |key| -> Result<(), RecordError> {
                let Some((custodian, record_id)) = key[prefix.len()..].split_once('/') else {
                    return Ok(());
                };
                let Some(record) = snapshot.value::<Record>(&keys::record(custodian, record_id))?
                else {
                    return Ok(());
                };
                // A search or `$everything` leaves a deleted resource out: its latest
                // version is a tombstone, known from the index without fetching it.
                let deleted = record.versions.last().is_some_and(|v| v.deleted);
                if !granted.contains(&record.resource_type) || (latest_only && deleted) {
                    return Ok(());
                }
                let skip = if latest_only {
                    record.versions.len().saturating_sub(1)
                } else {
                    0
                };
                planned.extend(record.versions.iter().skip(skip).map(|v| {
                    (
                        custodian.to_string(),
                        VersionRef {
                            record_id: record_id.to_string(),
                            version: v.version,
                        },
                    )
                }));
                Ok(())
            })?;
        }
        drop(snapshot);
        let mut custodians: Vec<String> = planned.iter().map(|(c, _)| c.clone()).collect();
        custodians.sort();
        custodians.dedup();
        let plan = AccessPlan {
            actor,
            patient,
            action: Action::Search,
            records: Vec::new(),
            resource_types: if granted.is_empty() { asked } else { granted },
            custodians,
            purpose,
        };
        let access = self.log_access(&plan, &planned).await?;
        let mut history = History {
            patient: patient.to_string(),
            versions: Vec::new(),
            access: access.clone(),
            failures: Vec::new(),
        };
        if access.decision.is_granted() && !planned.is_empty() {
            let (versions, failures) = self
                .fetch_all(actor, patient, purpose, &access, planned)
                .await?;
            history.versions = versions;
            history.failures = failures;
        }
        Ok(history)
    }

    /// Checks and decrypts what a custodian served, version by version.
    fn open_answer(
        &self,
        answer: &FetchAnswer,
        request: &FetchRequest,
        access_tx: Hash,
    ) -> Result<Vec<Result<OpenedVersion, RecordError>>, RecordError> {
        let snapshot = self.snapshot()?;
        // One key agreement for the whole answer; with a rotated key, each of ours is tried.
        let binding = AnswerBinding {
            custodian: &answer.custodian,
            requester: &self.org,
            access_tx: &request.access_tx.0,
        };
        let answer_keys: Vec<AnswerKey> = match &answer.key_share {
            Some(share) => self
                .keys
                .iter()
                .rev()
                .filter_map(|pair| pair.answer_key(share, &binding).ok())
                .collect(),
            None => Vec::new(),
        };
        let mut out = Vec::new();
        let mut expected = request.versions.iter();
        for (index, served) in answer.versions.iter().enumerate() {
            let result = match expected.next() {
                Some(wanted)
                    if wanted.record_id == served.record_id && wanted.version == served.version =>
                {
                    let data_key = self.served_key(&answer.custodian, index, served, &answer_keys);
                    self.open_version(&snapshot, &answer.custodian, served, request, data_key)
                }
                _ => Err(RecordError::Integrity {
                    record: format!("{}/{}", answer.custodian, served.record_id),
                    detail: "a version that was not asked for".into(),
                }),
            }
            .map(|mut version| {
                version.access_tx = access_tx;
                version
            });
            if let Err(error) = &result {
                eprintln!("medledger: refused a served version: {error}");
            }
            out.push(result);
        }
        if expected.next().is_some() {
            out.push(Err(RecordError::Integrity {
                record: answer.custodian.clone(),
                detail: "fewer versions served than granted".into(),
            }));
        }
        Ok(out)
    }

    async fn wait_for_height(&self, height: u64) -> Result<(), RecordError> {
        let started = Instant::now();
        loop {
            if self.ledger.tree_head().tree_head.height >= height {
                return Ok(());
            }
            if started.elapsed() > CATCH_UP_TIMEOUT {
                return Err(RecordError::Ledger(format!(
                    "this node's ledger did not reach height {height} in {CATCH_UP_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The data key of the version at `index` of a custodian's answer, if it opens for this
    /// organisation: the custodian's own envelope when this node is the custodian, otherwise
    /// sealed under one of `answer_keys`.
    fn served_key(
        &self,
        custodian: &str,
        index: usize,
        served: &ServedVersion,
        answer_keys: &[AnswerKey],
    ) -> Option<[u8; 32]> {
        let context = WrapContext {
            record: &served.record_id,
            version: served.version,
            custodian,
            recipient: &self.org,
        };
        match &served.key {
            ServedKey::Own(envelope) => self
                .keys
                .iter()
                .rev()
                .find_map(|pair| pair.unwrap_key(envelope, &context).ok()),
            ServedKey::Sealed(sealed) => {
                let index = u32::try_from(index).ok()?;
                answer_keys
                    .iter()
                    .find_map(|key| key.open(index, sealed, &context).ok())
            }
        }
    }

    fn open_version(
        &self,
        snapshot: &Snapshot,
        custodian: &str,
        served: &ServedVersion,
        request: &FetchRequest,
        data_key: Option<[u8; 32]>,
    ) -> Result<OpenedVersion, RecordError> {
        let name = format!("{custodian}/{}@{}", served.record_id, served.version);
        let refuse = |detail: String| RecordError::Integrity {
            record: name.clone(),
            detail,
        };
        let record: Record = snapshot
            .value(&keys::record(custodian, &served.record_id))?
            .ok_or_else(|| refuse("no such record on this node's ledger".into()))?;
        if record.patient != request.patient {
            return Err(refuse("the record is another patient's".into()));
        }
        let indexed = record
            .versions
            .iter()
            .find(|v| v.version == served.version)
            .ok_or_else(|| refuse("no such version on this node's ledger".into()))?;
        let ciphertext = medledger_core::crypto::from_base64url(&served.ciphertext)
            .map_err(|_| refuse("the ciphertext is not base64url".into()))?;
        if content_id(&ciphertext) != indexed.cid {
            return Err(refuse(
                "the ciphertext is not the content id the ledger indexed".into(),
            ));
        }
        self.check_author_signature(snapshot, &record, indexed)
            .map_err(refuse)?;
        let data_key = data_key
            .ok_or_else(|| refuse("the data key does not open for this organisation".into()))?;
        let plaintext = sealing::open(
            &ciphertext,
            &data_key,
            &associated_data(custodian, &served.record_id, served.version, None),
            &indexed.commitment,
        )
        .ok_or_else(|| {
            refuse("does not decrypt under its binding or does not match its commitment".into())
        })?;
        let (resource, attachments) = if indexed.deleted {
            // A tombstone seals a stub, not a resource: it must name exactly this record.
            let stub = fhir::check_tombstone(&plaintext, &record.resource_type, &served.record_id)
                .map_err(|e| refuse(format!("the decrypted tombstone is not valid: {e}")))?;
            if request.attachments && !served.attachments.is_empty() {
                return Err(refuse("attachments served for a tombstone".into()));
            }
            (stub, Vec::new())
        } else {
            let checked = fhir::check_resource(&plaintext)
                .map_err(|e| refuse(format!("the decrypted resource is not valid: {e}")))?;
            if checked.resource_type != record.resource_type
                || checked.patient != record.patient
                || checked.id.as_deref() != Some(served.record_id.as_str())
            {
                return Err(refuse(
                    "the decrypted resource is not the indexed type, patient or id".into(),
                ));
            }
            let mut attachments = Vec::new();
            if request.attachments {
                let cids = fhir::attachment_cids(&checked.value);
                if cids.len() != served.attachments.len() {
                    return Err(refuse("attachments missing or extra".into()));
                }
                for (index, (cid, blob)) in cids.iter().zip(&served.attachments).enumerate() {
                    let bytes = medledger_core::crypto::from_base64url(&blob.ciphertext)
                        .map_err(|_| refuse("an attachment is not base64url".into()))?;
                    if blob.cid != *cid || content_id(&bytes) != *cid {
                        return Err(refuse(format!(
                            "attachment {index} is not the content id the resource names"
                        )));
                    }
                    let binding =
                        associated_data(custodian, &served.record_id, served.version, Some(index));
                    let data = sealing::open_part(&bytes, &data_key, &binding)
                        .ok_or_else(|| refuse(format!("attachment {index} does not decrypt")))?;
                    attachments.push(OpenedAttachment {
                        cid: cid.clone(),
                        data: medledger_core::crypto::base64url(&data),
                    });
                }
            }
            (checked.value, attachments)
        };
        Ok(OpenedVersion {
            custodian: custodian.to_string(),
            record_id: served.record_id.clone(),
            version: served.version,
            resource_type: record.resource_type.clone(),
            patient: record.patient.clone(),
            author: indexed.author.clone(),
            height: indexed.height,
            cid: indexed.cid.clone(),
            resource,
            attachments,
            access_tx: Hash([0; 32]),
            deleted: indexed.deleted,
        })
    }

    /// The `create_record` transaction the ledger indexed for this version names exactly
    /// this version and verifies under its author's key.
    fn check_author_signature(
        &self,
        snapshot: &Snapshot,
        record: &Record,
        indexed: &RecordVersion,
    ) -> Result<(), String> {
        if self
            .verified_versions
            .lock()
            .expect("cache lock")
            .contains(&indexed.tx_id)
        {
            return Ok(());
        }
        let found = self
            .ledger
            .store()
            .committed_tx(snapshot, &indexed.tx_id)
            .map_err(|e| format!("its create transaction: {e}"))?
            .ok_or("its create transaction is not on the ledger")?;
        let author: User = snapshot
            .value(&keys::user(&indexed.author))
            .map_err(|e| e.to_string())?
            .ok_or("the author is not on the ledger")?;
        check_create_tx(found.tx(), record, indexed, &author.public_key)?;
        let mut cache = self.verified_versions.lock().expect("cache lock");
        if cache.len() >= VERIFIED_CACHE_MAX {
            cache.clear();
        }
        cache.insert(indexed.tx_id);
        Ok(())
    }
}

/// Checks that `tx` is the transaction that indexed exactly this version, signed by its
/// author under `author_key`: a `create_record` naming it, or a `create_records` group
/// holding it (the group names each record once, so record and version find one entry).
pub fn check_create_tx(
    tx: &SignedTx,
    record: &Record,
    indexed: &RecordVersion,
    author_key: &PublicKey,
) -> Result<(), String> {
    let names_it = NewRecordVersion::all_of(&tx.payload.body)
        .iter()
        .filter(|v| v.record_id == record.record_id && v.version == indexed.version)
        .any(|v| {
            v.patient == record.patient
                && v.resource_type == record.resource_type
                && v.cid == indexed.cid
                && v.commitment == indexed.commitment
                && v.deleted == indexed.deleted
        });
    if !names_it || tx.payload.signer != indexed.author || tx.signature != indexed.author_signature
    {
        return Err("the create transaction does not name this version".into());
    }
    tx.clone()
        .verify_with(author_key)
        .map(|_| ())
        .map_err(|_| "the author's signature does not verify".to_string())
}

/// What a custodian needs to serve the versions of one answer.
struct VersionServer<'a> {
    store: &'a dyn RecordStore,
    keys: &'a [EncryptionKeyPair],
    org: &'a str,
    requester: &'a str,
    /// The answer's key, for another member's node.
    answer_key: Option<&'a AnswerKey>,
    attachments: bool,
}

impl VersionServer<'_> {
    /// The version at `index` of the answer, with its data key for the requester.
    fn serve(
        &self,
        index: usize,
        wanted: &VersionRef,
        version: &RecordVersion,
    ) -> Result<ServedVersion, RecordError> {
        let org = self.org;
        let name = format!("{org}/{}@{}", wanted.record_id, wanted.version);
        let lost = |what: &str| RecordError::Integrity {
            record: name.clone(),
            detail: format!("this custodian's store {what}"),
        };
        let ciphertext = self
            .store
            .get_blob(&version.cid)?
            .ok_or_else(|| lost("lost the ciphertext"))?;
        let own = self
            .store
            .get_envelope(&version.cid, org)?
            .ok_or_else(|| lost("lost the custodian's envelope"))?;
        let context = |recipient| WrapContext {
            record: &wanted.record_id,
            version: wanted.version,
            custodian: org,
            recipient,
        };
        let data_key = || {
            self.keys
                .iter()
                .rev()
                .find_map(|pair| pair.unwrap_key(&own, &context(org)).ok())
                .ok_or_else(|| lost("holds an envelope no key of this organisation opens"))
        };
        let key = match self.answer_key {
            None => ServedKey::Own(own.clone()),
            Some(answer_key) => ServedKey::Sealed(answer_key.seal(
                answer_position(index)?,
                &data_key()?,
                &context(self.requester),
            )),
        };
        let mut blobs = Vec::new();
        if self.attachments {
            let plaintext = sealing::open(
                &ciphertext,
                &data_key()?,
                &associated_data(org, &wanted.record_id, wanted.version, None),
                &version.commitment,
            )
            .ok_or_else(|| lost("holds a ciphertext that does not open"))?;
            let value: serde_json::Value = serde_json::from_slice(&plaintext)
                .map_err(|_| lost("holds a resource that does not parse"))?;
            for cid in fhir::attachment_cids(&value) {
                let bytes = self
                    .store
                    .get_blob(&cid)?
                    .ok_or_else(|| lost("lost an attachment"))?;
                blobs.push(BlobCopy {
                    cid,
                    ciphertext: medledger_core::crypto::base64url(&bytes),
                });
            }
        }
        Ok(ServedVersion {
            record_id: wanted.record_id.clone(),
            version: wanted.version,
            ciphertext: medledger_core::crypto::base64url(&ciphertext),
            key,
            attachments: blobs,
        })
    }
}

/// A version's position in an answer, the nonce of its sealed key.
fn answer_position(index: usize) -> Result<u32, RecordError> {
    u32::try_from(index).map_err(|_| RecordError::Invalid("an answer is too long".into()))
}

/// The reason code of a denial, as the ledger writes it.
pub fn denial_code(denial: &medledger_core::model::AccessDenial) -> String {
    serde_json::to_value(denial)
        .ok()
        .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_string))
        .unwrap_or_else(|| "denied".to_string())
}

/// A new record's id, `<custodian>.<32 hex>`: unique across the consortium, and it names
/// the custodian, so a FHIR id alone says where to fetch the record.
fn new_record_id(custodian: &str) -> Result<String, RecordError> {
    let key = sealing::fresh_key().map_err(|e| RecordError::Store(e.to_string()))?;
    let random = hex::encode(&key[..12]);
    // A FHIR id is at most 64 characters; a longer organisation name is left implicit.
    if custodian.len() + 1 + random.len() > 64 {
        return Ok(random);
    }
    Ok(format!("{custodian}.{random}"))
}

/// The custodian a FHIR id names: the part before the first dot when that is an
/// organisation's name; otherwise the id is one the custodian `local` chose.
pub fn custodian_of<'a>(record_id: &'a str, local: &'a str) -> &'a str {
    match record_id.split_once('.') {
        Some((org, _)) if medledger_core::identity::is_valid_name(org) => org,
        _ => local,
    }
}

/// `type/subtype`, printable, without spaces around.
fn is_media_type(text: &str) -> bool {
    text.len() <= 128
        && text
            .split_once('/')
            .is_some_and(|(t, s)| !t.is_empty() && !s.is_empty())
        && text.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

/// Runs store calls off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RecordError> + Send + 'static,
) -> Result<T, RecordError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| RecordError::Store(format!("a store call failed: {e}")))?
}

fn canonical<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, RecordError> {
    to_canonical_bytes(value).map_err(|e| RecordError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consortium::sign;
    use crate::pki::KeyPair;
    use medledger_core::tx::TxPayload;

    fn signed_version(author: &KeyPair) -> (SignedTx, Record, RecordVersion) {
        let body = TxBody::CreateRecord {
            patient: "pt-0123".into(),
            record_id: "obs-1".into(),
            version: 1,
            resource_type: "Observation".into(),
            cid: content_id(b"ciphertext"),
            commitment: Hash::digest(b"salt and plaintext"),
            deleted: false,
        };
        let tx = sign(
            TxPayload {
                chain_id: "c".into(),
                signer: "dr-alice@hospital-a".into(),
                nonce: 1,
                expires_at_ms: 1,
                body,
            },
            author,
        );
        let indexed = RecordVersion {
            version: 1,
            cid: content_id(b"ciphertext"),
            commitment: Hash::digest(b"salt and plaintext"),
            author: "dr-alice@hospital-a".into(),
            tx_id: tx.id().unwrap(),
            author_signature: tx.signature,
            height: 3,
            deleted: false,
        };
        let record = Record {
            custodian: "hospital-a".into(),
            record_id: "obs-1".into(),
            patient: "pt-0123".into(),
            resource_type: "Observation".into(),
            versions: vec![indexed.clone()],
        };
        (tx, record, indexed)
    }

    #[test]
    fn a_create_transaction_must_name_the_version_and_verify_under_its_author() {
        // Proves the author-signature check a reader runs before decrypting: the genuine
        // transaction passes; another key, another author, a signature from another
        // transaction, and a body naming another CID, commitment, version or patient fail.
        let author = KeyPair::generate().unwrap();
        let (tx, record, indexed) = signed_version(&author);
        assert_eq!(
            check_create_tx(&tx, &record, &indexed, &author.public_key()),
            Ok(())
        );
        let stranger = KeyPair::generate().unwrap();
        assert!(check_create_tx(&tx, &record, &indexed, &stranger.public_key()).is_err());
        let mut other_author = indexed.clone();
        other_author.author = "dr-eve@hospital-a".into();
        assert!(check_create_tx(&tx, &record, &other_author, &author.public_key()).is_err());
        let (other_tx, _, _) = signed_version(&stranger);
        let mut other_signature = indexed.clone();
        other_signature.author_signature = other_tx.signature;
        assert!(check_create_tx(&tx, &record, &other_signature, &author.public_key()).is_err());
        type Mutation = dyn Fn(&mut RecordVersion, &mut Record);
        let mutations: [&Mutation; 5] = [
            // The ledger calls it a tombstone; the author signed an ordinary version.
            &|v, _| v.deleted = true,
            &|v, _| v.cid = content_id(b"other ciphertext"),
            &|v, _| v.commitment = Hash::digest(b"other plaintext"),
            &|v, _| v.version = 2,
            &|_, r| r.patient = "pt-4567".into(),
        ];
        for mutate in mutations {
            let (mut version, mut record) = (indexed.clone(), record.clone());
            mutate(&mut version, &mut record);
            assert!(check_create_tx(&tx, &record, &version, &author.public_key()).is_err());
        }
        // A version indexed by a group is found in it by record and version, and checked
        // the same way; the group's other versions do not stand in for it.
        let TxBody::CreateRecord {
            patient,
            commitment,
            ..
        } = tx.payload.body.clone()
        else {
            unreachable!("signed_version signs a create_record")
        };
        let other = NewRecordVersion {
            patient,
            record_id: "obs-2".into(),
            version: 1,
            resource_type: "Observation".into(),
            cid: content_id(b"other ciphertext"),
            commitment,
            deleted: false,
        };
        let own = NewRecordVersion::of(&tx.payload.body).expect("a create_record");
        let group = |versions: Vec<NewRecordVersion>| {
            sign(
                TxPayload {
                    body: TxBody::CreateRecords { versions },
                    ..tx.payload.clone()
                },
                &author,
            )
        };
        let grouped = group(vec![other.clone(), own.clone()]);
        let mut in_group = indexed.clone();
        in_group.tx_id = grouped.id().unwrap();
        in_group.author_signature = grouped.signature;
        assert_eq!(
            check_create_tx(&grouped, &record, &in_group, &author.public_key()),
            Ok(())
        );
        assert!(check_create_tx(&grouped, &record, &in_group, &stranger.public_key()).is_err());
        let without = group(vec![other.clone(), other]);
        let mut not_in_group = indexed.clone();
        not_in_group.author_signature = without.signature;
        assert!(check_create_tx(&without, &record, &not_in_group, &author.public_key()).is_err());
        let mut flagged = in_group.clone();
        flagged.deleted = true;
        assert!(check_create_tx(&grouped, &record, &flagged, &author.public_key()).is_err());
        // A forged signature over the genuine body.
        let mut forged = tx.clone();
        forged.signature = other_tx.signature;
        let mut forged_index = indexed.clone();
        forged_index.author_signature = other_tx.signature;
        assert!(check_create_tx(&forged, &record, &forged_index, &author.public_key()).is_err());
    }
}

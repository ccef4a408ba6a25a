//! Signed transactions: the only way anything enters the ledger.
//!
//! A transaction is a payload (chain id, signer, nonce, expiry, body) and an ECDSA P-256
//! signature over `SIGNING_PREFIX || canonical(payload)`. Its id is the SHA-256 of those
//! same bytes, so a signer knows the id (of a grant, a request) before submitting, and a
//! re-encoded signature never yields a second id. `docs/transactions.md` specifies it.

use serde::{Deserialize, Serialize};

use crate::canonical::{to_canonical_bytes, CanonicalError};
use crate::crypto::{PublicKey, Signature};
use crate::hash::Hash;
use crate::model::{
    Action, BreakGlassVerdict, DenialReason, EmergencyReason, GovernanceAction, Grantee, Purpose,
    RevocationReason, Scope,
};

/// Domain separation for transaction signatures: no other signed object starts so.
pub const SIGNING_PREFIX: &[u8] = b"medledger/tx/v1\n";

/// Largest canonical transaction accepted, in bytes (a certificate is the bulkiest field).
pub const TX_BYTES_MAX: usize = 16 * 1024;

/// How far past the block time an expiry may lie: bounds how long a signed transaction
/// stays replayable to a node that has not yet seen its nonce.
pub const TX_LIFETIME_MS_MAX: u64 = 24 * 60 * 60 * 1000;

/// Most records named by one access entry.
pub const ACCESS_RECORDS_MAX: usize = 256;

/// A record as a `log_access` entry names it: `(custodian, record_id)` from
/// `custodian/record_id`, or from a bare id, which is at the signer's organisation.
pub fn access_record_name<'a>(name: &'a str, signer_org: &'a str) -> (&'a str, &'a str) {
    name.split_once('/').unwrap_or((signer_org, name))
}

/// Most versions in one `create_records` group. The worst case (longest record ids,
/// types, version numbers and names, every version a tombstone) takes 354 bytes a version,
/// so 40 of them and the rest of the payload, with a 64-byte chain id, stay inside
/// `TX_BYTES_MAX` with room to spare (the test `the_largest_group_fits_one_transaction`).
pub const RECORD_GROUP_MAX: usize = 40;

/// Longest record id, resource-type or CID string, in bytes.
pub const IDENTIFIER_BYTES_MAX: usize = 128;

pub type TxId = Hash;

/// What the signer asks the ledger to do, and the replay protection around it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxPayload {
    /// The consortium this transaction is for; any other chain refuses it.
    pub chain_id: String,
    /// `name@org` for a member's user or node, `pt-…` for a patient.
    pub signer: String,
    /// Must exceed the signer's last accepted nonce.
    pub nonce: u64,
    /// Unix milliseconds after which no block may include it.
    pub expires_at_ms: u64,
    pub body: TxBody,
}

/// The contract call. Every string id is validated by the contract that reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TxBody {
    /// An organisation admin proposes a change of membership; the proposer votes yes.
    ProposeGovernance { action: GovernanceAction },
    /// An organisation admin votes for their organisation.
    VoteGovernance { proposal_id: u64, approve: bool },
    /// An organisation admin enrolls a user or node of their own organisation.
    EnrollUser {
        /// DER certificate, base64url, issued by the organisation's CA.
        certificate: String,
    },
    /// An organisation admin revokes a user or node of their own organisation.
    RevokeUser {
        user: String,
        reason: RevocationReason,
    },
    /// A patient registers their own key; the signer is the key's pseudonym.
    RegisterPatient { public_key: PublicKey },
    /// A patient (for themselves) or an organisation's admin or node (for the organisation)
    /// publishes the public key that record keys are wrapped for. A later one replaces it:
    /// that is how a key is rotated. Readers keep their old secrets for older versions.
    SetEncryptionKey {
        /// P-256 point, SEC1 uncompressed (65 bytes), base64url.
        public_key: String,
    },
    /// An author adds a version of a record held by their organisation (the custodian).
    CreateRecord {
        patient: String,
        record_id: String,
        version: u64,
        resource_type: String,
        /// CIDv1 of the ciphertext held by the custodian.
        cid: String,
        /// SHA-256 over a salt and the plaintext; the salt travels inside the ciphertext.
        commitment: Hash,
        /// Set on a tombstone: the version that records the resource's deletion. Its
        /// sealed content is a stub naming only the type, id and version; earlier versions
        /// stay indexed. Omitted when false, so every other version encodes as before.
        #[serde(default, skip_serializing_if = "is_false")]
        deleted: bool,
    },
    /// An author adds versions of several records of one patient at once, all or none:
    /// the contract applies every version as `create_record` would, or refuses the whole
    /// transaction. One signature covers them all. 2 to `RECORD_GROUP_MAX` versions, each
    /// record at most once: a FHIR transaction Bundle.
    CreateRecords { versions: Vec<NewRecordVersion> },
    /// A patient grants a consent.
    Grant {
        grantee: Grantee,
        scope: Scope,
        actions: Vec<Action>,
        purposes: Vec<Purpose>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at_ms: Option<u64>,
    },
    /// A patient ends one of their consents.
    Revoke { grant_id: Hash },
    /// A user asks a patient for access.
    RequestAccess {
        patient: String,
        scope: Scope,
        actions: Vec<Action>,
        purpose: Purpose,
    },
    /// A patient approves a request, which becomes a consent for the requester.
    ApproveRequest {
        request_id: Hash,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at_ms: Option<u64>,
    },
    /// A patient denies a request.
    DenyRequest { request_id: Hash },
    /// A clinician opens emergency access without consent.
    BreakGlass {
        patient: String,
        reason: EmergencyReason,
        /// Salted SHA-256 of the free-text justification the custodian keeps off-chain.
        justification_commitment: Hash,
        duration_ms: u64,
    },
    /// An auditor closes the review of a break-glass access.
    ReviewBreakGlass {
        break_glass_id: Hash,
        verdict: BreakGlassVerdict,
    },
    /// A member's node records an access attempt (one per request, by the node the requester
    /// called); the ledger decides it (see `contracts::access`).
    LogAccess {
        actor: String,
        patient: String,
        action: Action,
        /// The records read, each `custodian/record_id` (a bare id is at the signer's
        /// organisation); empty for a search.
        records: Vec<String>,
        /// Resource types searched; for reads and writes the records' own types count.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        resource_types: Vec<String>,
        /// For a search: the custodians the requester will ask for the matching records.
        /// A read's custodians are its records'.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        custodians: Vec<String>,
        purpose: Purpose,
        /// Set when the custodian refused the request before asking the ledger.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        custodian_denial: Option<DenialReason>,
        query_commitment: Hash,
        answer_commitment: Hash,
    },
}

impl TxBody {
    /// The body's type as it appears in the `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            TxBody::ProposeGovernance { .. } => "propose_governance",
            TxBody::VoteGovernance { .. } => "vote_governance",
            TxBody::EnrollUser { .. } => "enroll_user",
            TxBody::RevokeUser { .. } => "revoke_user",
            TxBody::RegisterPatient { .. } => "register_patient",
            TxBody::SetEncryptionKey { .. } => "set_encryption_key",
            TxBody::CreateRecord { .. } => "create_record",
            TxBody::CreateRecords { .. } => "create_records",
            TxBody::Grant { .. } => "grant",
            TxBody::Revoke { .. } => "revoke",
            TxBody::RequestAccess { .. } => "request_access",
            TxBody::ApproveRequest { .. } => "approve_request",
            TxBody::DenyRequest { .. } => "deny_request",
            TxBody::BreakGlass { .. } => "break_glass",
            TxBody::ReviewBreakGlass { .. } => "review_break_glass",
            TxBody::LogAccess { .. } => "log_access",
        }
    }

    /// Emergency transactions skip the batching window.
    pub fn is_urgent(&self) -> bool {
        matches!(self, TxBody::BreakGlass { .. })
    }
}

/// One version in a `create_records` group: the fields of a `create_record`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRecordVersion {
    pub patient: String,
    pub record_id: String,
    pub version: u64,
    pub resource_type: String,
    pub cid: String,
    pub commitment: Hash,
    #[serde(default, skip_serializing_if = "is_false")]
    pub deleted: bool,
}

impl NewRecordVersion {
    /// The fields of a `create_record` body; None for any other body.
    pub fn of(body: &TxBody) -> Option<NewRecordVersion> {
        match body {
            TxBody::CreateRecord {
                patient,
                record_id,
                version,
                resource_type,
                cid,
                commitment,
                deleted,
            } => Some(NewRecordVersion {
                patient: patient.clone(),
                record_id: record_id.clone(),
                version: *version,
                resource_type: resource_type.clone(),
                cid: cid.clone(),
                commitment: *commitment,
                deleted: *deleted,
            }),
            _ => None,
        }
    }

    /// The versions a transaction body adds, in order: one for `create_record`, the
    /// group's for `create_records`, none for anything else.
    pub fn all_of(body: &TxBody) -> Vec<NewRecordVersion> {
        match body {
            TxBody::CreateRecords { versions } => versions.clone(),
            other => NewRecordVersion::of(other).into_iter().collect(),
        }
    }
}

/// For `skip_serializing_if`: a flag that is false is omitted, so it has one encoding.
pub fn is_false(flag: &bool) -> bool {
    !*flag
}

/// A payload and its signature, as submitted and as stored in blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedTx {
    pub payload: TxPayload,
    pub signature: Signature,
}

impl TxPayload {
    /// The exact bytes a signer signs: the prefix, then the canonical payload.
    pub fn signing_bytes(&self) -> Result<Vec<u8>, CanonicalError> {
        let canonical = to_canonical_bytes(self)?;
        let mut out = Vec::with_capacity(SIGNING_PREFIX.len() + canonical.len());
        out.extend_from_slice(SIGNING_PREFIX);
        out.extend_from_slice(&canonical);
        Ok(out)
    }
}

/// A transaction whose signature has been checked against a key. Only
/// `SignedTx::verify_with` builds one, so holding it proves the check was made.
#[derive(Debug, Clone)]
pub struct VerifiedTx {
    tx: SignedTx,
    id: TxId,
    key_fingerprint: Hash,
}

impl VerifiedTx {
    pub fn tx(&self) -> &SignedTx {
        &self.tx
    }
    pub fn id(&self) -> TxId {
        self.id
    }
    /// The key the signature verified under.
    pub fn key_fingerprint(&self) -> Hash {
        self.key_fingerprint
    }
    pub fn into_inner(self) -> SignedTx {
        self.tx
    }
}

/// Why a transaction could not even be decoded or checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxFormatError {
    #[error("transaction is not canonically encodable: {0}")]
    Canonical(#[from] CanonicalError),
    #[error("transaction is {size_bytes} bytes; the limit is {TX_BYTES_MAX}")]
    TooLarge { size_bytes: usize },
}

impl SignedTx {
    /// The transaction id: SHA-256 of the signing bytes.
    pub fn id(&self) -> Result<TxId, TxFormatError> {
        Ok(Hash::digest(&self.checked_signing_bytes()?))
    }

    fn checked_signing_bytes(&self) -> Result<Vec<u8>, TxFormatError> {
        let bytes = self.payload.signing_bytes()?;
        if bytes.len() > TX_BYTES_MAX {
            return Err(TxFormatError::TooLarge {
                size_bytes: bytes.len(),
            });
        }
        Ok(bytes)
    }

    /// Checks the signature against `key`. Err(None) when it does not verify.
    pub fn verify_with(self, key: &PublicKey) -> Result<VerifiedTx, SignatureCheck> {
        let bytes = self
            .checked_signing_bytes()
            .map_err(SignatureCheck::Format)?;
        if !key.verify(&bytes, &self.signature) {
            return Err(SignatureCheck::Invalid);
        }
        Ok(VerifiedTx {
            id: Hash::digest(&bytes),
            key_fingerprint: key.fingerprint(),
            tx: self,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureCheck {
    #[error(transparent)]
    Format(TxFormatError),
    #[error("signature does not verify under the signer's key")]
    Invalid,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::patient_pseudonym;

    /// The fixed vector of docs/transactions.md, produced by docs/reference/sign_tx.py.
    const VECTOR_TX: &str = r#"{
        "payload": {
            "chain_id": "medledger-vector",
            "signer": "pt-c43886833d68409aedabc77cc435967d81f9d485",
            "nonce": 1,
            "expires_at_ms": 1767225600000,
            "body": {
                "type": "register_patient",
                "public_key": "BPBj9QBQKahWhNBamCtWlN6gWFn-6zv2FhQnLnRUiC8bSPO01JT4evrmUXKxPp2pqbE7uoE-9XLpk1ih194jvFM"
            }
        },
        "signature": "ySYCTw6ey0zhaXUGqP85ez92R8eo63Wo7NGmkmNvFDKUOmv_kTCDtAuQt2e7m7XOrnsc8tTQKvu0yIeD4sqAvg"
    }"#;
    const VECTOR_CANONICAL: &str = r#"{"body":{"public_key":"BPBj9QBQKahWhNBamCtWlN6gWFn-6zv2FhQnLnRUiC8bSPO01JT4evrmUXKxPp2pqbE7uoE-9XLpk1ih194jvFM","type":"register_patient"},"chain_id":"medledger-vector","expires_at_ms":1767225600000,"nonce":1,"signer":"pt-c43886833d68409aedabc77cc435967d81f9d485"}"#;
    const VECTOR_ID: &str = "35792b3e4e49f68aa56286dda5ba0b713d817489f013d8789f1e889f8fa3502b";

    fn vector() -> (SignedTx, PublicKey) {
        let tx: SignedTx = serde_json::from_str(VECTOR_TX).expect("the vector parses");
        let TxBody::RegisterPatient { public_key } = &tx.payload.body else {
            panic!("the vector registers a patient");
        };
        let key = public_key.clone();
        (tx, key)
    }

    #[test]
    fn the_documented_vector_encodes_hashes_and_verifies_exactly() {
        let (tx, key) = vector();
        let mut expected = SIGNING_PREFIX.to_vec();
        expected.extend_from_slice(VECTOR_CANONICAL.as_bytes());
        assert_eq!(tx.payload.signing_bytes().unwrap(), expected);
        assert_eq!(tx.id().unwrap().to_hex(), VECTOR_ID);
        assert_eq!(patient_pseudonym(&key), tx.payload.signer);
        let verified = tx
            .verify_with(&key)
            .expect("the vector's signature verifies");
        assert_eq!(verified.id().to_hex(), VECTOR_ID);
    }

    #[test]
    fn any_change_to_the_vector_breaks_its_signature() {
        let (tx, key) = vector();
        let mut changed = tx.clone();
        changed.payload.nonce = 2;
        assert_eq!(
            changed.verify_with(&key).unwrap_err(),
            SignatureCheck::Invalid
        );
        let mut changed = tx.clone();
        changed.payload.chain_id = "medledger-other".into();
        assert_eq!(
            changed.verify_with(&key).unwrap_err(),
            SignatureCheck::Invalid
        );
        for byte in 0..crate::crypto::SIGNATURE_BYTES {
            let mut changed = tx.clone();
            changed.signature.0[byte] ^= 0x01;
            assert!(
                changed.verify_with(&key).is_err(),
                "flipped signature byte {byte}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_wrong_shapes_do_not_parse() {
        let with_extra = VECTOR_TX.replacen("\"nonce\": 1,", "\"nonce\": 1, \"extra\": true,", 1);
        assert!(serde_json::from_str::<SignedTx>(&with_extra).is_err());
        let float_nonce = VECTOR_TX.replacen("\"nonce\": 1,", "\"nonce\": 1.5,", 1);
        assert!(serde_json::from_str::<SignedTx>(&float_nonce).is_err());
        let unknown_type = VECTOR_TX.replacen("register_patient", "register_doctor", 1);
        assert!(serde_json::from_str::<SignedTx>(&unknown_type).is_err());
    }

    #[test]
    fn a_create_record_names_deleted_only_on_a_tombstone() {
        // Proves the flag keeps one canonical encoding: an ordinary version encodes exactly
        // as before the flag existed, a tombstone with `"deleted":true`, and a payload
        // spelling out `"deleted":false` decodes to the one encoding without it.
        let body = |deleted| TxBody::CreateRecord {
            patient: "pt-1".into(),
            record_id: "obs-1".into(),
            version: 2,
            resource_type: "Observation".into(),
            cid: "bafkrei".into(),
            commitment: Hash::digest(b"c"),
            deleted,
        };
        let live = String::from_utf8(to_canonical_bytes(&body(false)).unwrap()).unwrap();
        assert!(!live.contains("deleted"), "{live}");
        let gone = String::from_utf8(to_canonical_bytes(&body(true)).unwrap()).unwrap();
        assert!(gone.contains("\"deleted\":true"), "{gone}");
        let spelled = live.replacen("{", "{\"deleted\":false,", 1);
        let decoded: TxBody = serde_json::from_str(&spelled).unwrap();
        assert_eq!(decoded, body(false));
        assert_eq!(to_canonical_bytes(&decoded).unwrap(), live.as_bytes());
    }

    #[test]
    fn the_largest_group_fits_one_transaction() {
        // Proves RECORD_GROUP_MAX is sized to the transaction limit: the bulkiest group
        // (longest ids, names, types and numbers, every version a tombstone) signed by the
        // longest user id on a 64-byte chain id is within TX_BYTES_MAX, and ten more
        // versions would not be.
        let name = "n".repeat(crate::identity::NAME_BYTES_MAX);
        let version = NewRecordVersion {
            patient: format!("pt-{}", "a".repeat(40)),
            record_id: "r".repeat(64),
            version: 10_000,
            resource_type: "MedicationStatement".into(),
            cid: format!("bafkrei{}", "a".repeat(52)),
            commitment: Hash::digest(b"c"),
            deleted: true,
        };
        let tx = |count: usize| SignedTx {
            payload: TxPayload {
                chain_id: "c".repeat(64),
                signer: format!("{name}@{name}"),
                nonce: 9_007_199_254_740_991,
                expires_at_ms: 9_007_199_254_740_991,
                body: TxBody::CreateRecords {
                    versions: vec![version.clone(); count],
                },
            },
            signature: crate::crypto::Signature([0; 64]),
        };
        assert!(tx(RECORD_GROUP_MAX).id().is_ok());
        assert!(matches!(
            tx(RECORD_GROUP_MAX + 10).id(),
            Err(TxFormatError::TooLarge { .. })
        ));
    }

    #[test]
    fn oversized_transactions_have_no_id() {
        let (mut tx, _) = vector();
        tx.payload.chain_id = "x".repeat(TX_BYTES_MAX);
        assert!(matches!(tx.id(), Err(TxFormatError::TooLarge { .. })));
    }
}

//! The ledger's domain values: what transactions carry and what state holds.
//!
//! Nothing here may hold personal health information: patients are pseudonyms, clinical
//! content is represented only by content ids and salted commitments, and free-text reasons
//! are replaced by codes plus a commitment to text kept off-chain.

use serde::{Deserialize, Serialize};

use crate::crypto::{PublicKey, Signature};
use crate::hash::Hash;
use crate::identity::{OrgKind, Role};

/// The FHIR R4 resource types the ledger indexes, and the category each belongs to.
pub const RESOURCE_TYPES: [(&str, Category); 17] = [
    ("AllergyIntolerance", Category::Conditions),
    ("CarePlan", Category::Conditions),
    ("Condition", Category::Conditions),
    ("Procedure", Category::Conditions),
    ("DiagnosticReport", Category::Diagnostics),
    ("ImagingStudy", Category::Diagnostics),
    ("Observation", Category::Diagnostics),
    ("Specimen", Category::Diagnostics),
    ("Immunization", Category::Medications),
    ("MedicationRequest", Category::Medications),
    ("MedicationStatement", Category::Medications),
    ("Composition", Category::Documents),
    ("DocumentReference", Category::Documents),
    ("Encounter", Category::Encounters),
    ("Claim", Category::Financial),
    ("Coverage", Category::Financial),
    // The patient's demographics as a custodian holds them; the record id is the pseudonym.
    ("Patient", Category::Demographics),
];

/// The category of a supported resource type; None when the type is not supported.
pub fn category_of(resource_type: &str) -> Option<Category> {
    RESOURCE_TYPES
        .iter()
        .find(|(name, _)| *name == resource_type)
        .map(|(_, category)| *category)
}

/// Groups of resource types a patient can consent to as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Conditions,
    Diagnostics,
    Medications,
    Documents,
    Encounters,
    Financial,
    Demographics,
}

/// What a consent covers: every listed resource type and every type of a listed category.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<Category>,
}

impl Scope {
    pub fn covers(&self, resource_type: &str) -> bool {
        self.resource_types.iter().any(|t| t == resource_type)
            || category_of(resource_type).is_some_and(|c| self.categories.contains(&c))
    }

    pub fn is_empty(&self) -> bool {
        self.resource_types.is_empty() && self.categories.is_empty()
    }
}

/// Who a consent is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Grantee {
    /// One user, `name@org`.
    User { user: String },
    /// Every user with `role` at `org`.
    Role { org: String, role: Role },
    /// Every user of `org` (nodes excepted).
    Org { org: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Read,
    Write,
    Search,
}

/// Why data is accessed (after HL7's PurposeOfUse, reduced to what consents name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    Treatment,
    Emergency,
    Payment,
    Operations,
    Research,
    PatientRequest,
}

/// Coded reason for break-glass; the free text stays off-chain behind a commitment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmergencyReason {
    UnconsciousPatient,
    LifeThreatening,
    PatientUnableToConsent,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakGlassVerdict {
    Justified,
    Unjustified,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationReason {
    LeftOrganisation,
    KeyCompromise,
    Misconduct,
    Superseded,
}

/// Why a custodian refused a request on its own (before the ledger decided).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenialReason {
    /// The requester did not authenticate.
    Unauthenticated,
    /// The requested data does not exist at the custodian.
    NotFound,
    /// The request was malformed or over a limit.
    InvalidRequest,
}

/// A change of membership put to the member organisations' vote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum GovernanceAction {
    /// Admit a new organisation with its CA and first admin.
    AdmitOrg {
        org: String,
        org_kind: OrgKind,
        /// DER, base64url; must be issued by the consortium root.
        ca_certificate: String,
        /// DER, base64url; an org_admin certificate issued by the new CA.
        admin_certificate: String,
    },
    SuspendOrg {
        org: String,
    },
    ReinstateOrg {
        org: String,
    },
    RemoveOrg {
        org: String,
    },
}

impl GovernanceAction {
    pub fn target(&self) -> &str {
        match self {
            GovernanceAction::AdmitOrg { org, .. }
            | GovernanceAction::SuspendOrg { org }
            | GovernanceAction::ReinstateOrg { org }
            | GovernanceAction::RemoveOrg { org } => org,
        }
    }
}

// ---- state values -------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrgStatus {
    Active,
    Suspended,
    Removed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Org {
    pub id: String,
    pub kind: OrgKind,
    /// DER, base64url.
    pub ca_certificate: String,
    pub ca_not_after_ms: u64,
    pub status: OrgStatus,
    pub admitted_height: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserStatus {
    Active,
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub org: String,
    pub role: Role,
    pub public_key: PublicKey,
    /// DER, base64url.
    pub certificate: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    pub status: UserStatus,
    pub enrolled_height: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<RevocationReason>,
}

/// The public key a patient or an organisation receives wrapped record keys under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionKey {
    /// The patient's pseudonym or the organisation's id.
    pub party: String,
    /// P-256 point, SEC1 uncompressed (65 bytes), base64url.
    pub public_key: String,
    /// SHA-256 of the point's bytes: names the key in envelopes and key files.
    pub key_id: Hash,
    /// Who published it: the patient, or an admin or node of the organisation.
    pub set_by: String,
    pub tx_id: TxRef,
    pub height: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patient {
    pub id: String,
    pub public_key: PublicKey,
    pub registered_height: u64,
}

/// One immutable version of a record, as indexed on the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordVersion {
    pub version: u64,
    pub cid: String,
    pub commitment: Hash,
    pub author: String,
    /// The create transaction, whose signature is the author's signature over this version.
    pub tx_id: TxRef,
    pub author_signature: Signature,
    pub height: u64,
    /// A tombstone: the resource was deleted at this version. Omitted when false.
    #[serde(default, skip_serializing_if = "crate::tx::is_false")]
    pub deleted: bool,
}

/// A transaction id as stored in state.
pub type TxRef = Hash;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub custodian: String,
    pub record_id: String,
    pub patient: String,
    pub resource_type: String,
    pub versions: Vec<RecordVersion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    /// The id of the transaction that granted it.
    pub id: Hash,
    pub patient: String,
    pub grantee: Grantee,
    pub scope: Scope,
    pub actions: Vec<Action>,
    pub purposes: Vec<Purpose>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    pub granted_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
    /// The request this consent answers, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<Hash>,
}

impl Consent {
    pub fn is_active_at(&self, at_ms: u64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|end| at_ms < end)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    Pending,
    Approved,
    Denied,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    pub id: Hash,
    pub requester: String,
    pub patient: String,
    pub scope: Scope,
    pub actions: Vec<Action>,
    pub purpose: Purpose,
    pub requested_at_ms: u64,
    pub status: RequestStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_id: Option<Hash>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakGlass {
    pub id: Hash,
    pub actor: String,
    pub patient: String,
    pub reason: EmergencyReason,
    pub justification_commitment: Hash,
    pub starts_at_ms: u64,
    pub ends_at_ms: u64,
    /// None while the access awaits review: every break-glass is flagged until reviewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<BreakGlassReview>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakGlassReview {
    pub reviewer: String,
    pub verdict: BreakGlassVerdict,
    pub reviewed_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProposalStatus {
    Open,
    Approved,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub id: u64,
    pub action: GovernanceAction,
    pub proposer: String,
    pub opened_at_ms: u64,
    pub closes_at_ms: u64,
    /// Organisation id → its vote (true = approve), in organisation order.
    pub votes: std::collections::BTreeMap<String, bool>,
    pub status: ProposalStatus,
}

/// On what ground the ledger allowed an access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "basis", rename_all = "snake_case")]
pub enum AccessBasis {
    /// The actor is the patient.
    Patient,
    Consent {
        consent_id: Hash,
    },
    BreakGlass {
        break_glass_id: Hash,
    },
}

/// Why the ledger refused an access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum AccessDenial {
    UnknownActor,
    ActorNotActive,
    OrgNotActive,
    RoleNotPermitted,
    UnknownPatient,
    NoConsent { resource_type: String },
    Custodian { denial: DenialReason },
}

/// The ledger's answer to "may this actor do this now?".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum AccessDecision {
    Granted {
        #[serde(flatten)]
        basis: AccessBasis,
    },
    Denied {
        #[serde(flatten)]
        denial: AccessDenial,
    },
}

impl AccessDecision {
    pub fn is_granted(&self) -> bool {
        matches!(self, AccessDecision::Granted { .. })
    }
}

/// The audit trail's entry for one transaction, indexed by patient, actor and record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Position of the transaction in the Merkle log.
    pub leaf_index: u64,
    pub height: u64,
    pub tx_id: Hash,
    pub kind: String,
    pub signer: String,
    pub time_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// `custodian/record_id` of every record concerned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<String>,
    /// For an access entry: the resource types decided on (the records' types, and for a
    /// search the types searched), and the custodians it lets the requester ask.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custodians: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<Purpose>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<AccessDecision>,
    /// True for break-glass openings and accesses made under one: flagged for review.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flagged: bool,
    /// None when the transaction committed; the refusal code otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

/// An organisation's contribution to the consortium, counted by the ledger itself (the
/// incentive without tokens): blocks its node led, record versions it holds as custodian,
/// and accesses to its records it served (granted access entries it logged).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contribution {
    pub org: String,
    pub blocks_led: u64,
    pub records_held: u64,
    pub accesses_served: u64,
}

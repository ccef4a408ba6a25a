//! The contracts: the deterministic state machine that decides every transaction.
//!
//! `execute` runs one transaction in two stages. Authentication (chain, signer, signature,
//! expiry, nonce, the signer's certificate chain status) refuses a transaction without
//! touching state. Once it passes, the signer's nonce advances whatever the contract
//! decides, so a refused transaction can never be replayed into a later success. The
//! contract then either commits all its writes or none.

mod access;
mod consent;
mod governance;
mod patients;
mod policy;
mod records;

use serde::{Deserialize, Serialize};

pub use consent::{BREAK_GLASS_PER_PATIENT_MAX, CONSENTS_PER_PATIENT_MAX};
pub(crate) use governance::{
    admit as governance_admit, check_member_certificate as governance_check_member,
    check_org_certificates as governance_check_org, user_from_certificate as governance_user,
};
pub use policy::{decide, AccessQuery};
pub use records::{is_valid_cid, is_valid_record_id, AUTHOR_ROLES};

use crate::crypto::from_base64url;
use crate::hash::Hash;
use crate::identity::{
    is_patient_pseudonym, is_valid_name, patient_pseudonym, split_user_id, Role,
};
use crate::model::{AccessDecision, AuditEvent, Org, OrgStatus, Patient, User, UserStatus};
use crate::state::{keys, Overlay, StateRead};
use crate::tx::{SignedTx, TxBody, VerifiedTx, TX_LIFETIME_MS_MAX};

/// Chain-wide settings fixed at genesis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainConfig {
    pub chain_id: String,
    /// DER, base64url: the consortium root CA.
    pub root_certificate: String,
    pub root_not_after_ms: u64,
}

/// Why the ledger refused a transaction. The code and its fields are part of the block
/// (and so of the state hash): keep every message deterministic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Rejection {
    #[error("transaction is for chain {chain_id:?}, not this one")]
    WrongChain { chain_id: String },
    #[error("signer {signer:?} is neither name@org nor a patient pseudonym")]
    MalformedSigner { signer: String },
    #[error("signer {signer:?} is not enrolled")]
    UnknownSigner { signer: String },
    #[error("signature does not verify under the signer's key")]
    BadSignature,
    #[error("transaction is not canonically encodable or too large")]
    Malformed,
    #[error("transaction expired at {expires_at_ms} ms, before block time {time_ms} ms")]
    Expired { expires_at_ms: u64, time_ms: u64 },
    #[error("transaction expiry lies more than {TX_LIFETIME_MS_MAX} ms after block time")]
    ExpiryTooFar,
    #[error("nonce {nonce} is not above the signer's last nonce {last}: a replay or reordering")]
    StaleNonce { nonce: u64, last: u64 },
    #[error("transaction {tx_id} is already on the ledger")]
    Duplicate { tx_id: Hash },
    #[error("signer's certificate has been revoked")]
    SignerRevoked,
    #[error("signer's certificate chain is not valid at block time: {detail}")]
    CertificateNotValid { detail: String },
    #[error("organisation {org:?} is not an active member")]
    OrgNotActive { org: String },
    #[error("not permitted: {detail}")]
    NotPermitted { detail: String },
    #[error("invalid {field}: {detail}")]
    Invalid { field: String, detail: String },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    #[error("conflict: {detail}")]
    Conflict { detail: String },
    #[error("the patient's consent does not cover writing {resource_type}")]
    NoConsent { resource_type: String },
}

impl Rejection {
    pub fn code(&self) -> String {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map
                .get("code")
                .and_then(|c| c.as_str())
                .unwrap_or("unknown")
                .to_string(),
            _ => "unknown".to_string(),
        }
    }

    pub(crate) fn invalid(field: &str, detail: impl Into<String>) -> Rejection {
        Rejection::Invalid {
            field: field.to_string(),
            detail: detail.into(),
        }
    }

    pub(crate) fn not_permitted(detail: impl Into<String>) -> Rejection {
        Rejection::NotPermitted {
            detail: detail.into(),
        }
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Rejection {
        Rejection::NotFound { what: what.into() }
    }

    pub(crate) fn conflict(detail: impl Into<String>) -> Rejection {
        Rejection::Conflict {
            detail: detail.into(),
        }
    }
}

/// The outcome of one transaction, stored in the block beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum TxOutcome {
    Committed {
        /// The ledger's decision, for access entries.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        access: Option<AccessDecision>,
    },
    Rejected {
        #[serde(flatten)]
        rejection: Rejection,
    },
}

impl TxOutcome {
    pub fn is_committed(&self) -> bool {
        matches!(self, TxOutcome::Committed { .. })
    }
}

/// The authenticated signer of a transaction.
#[derive(Debug, Clone)]
pub enum Signer {
    User { user: User, org: Org },
    Patient(Patient),
}

impl Signer {
    pub fn id(&self) -> &str {
        match self {
            Signer::User { user, .. } => &user.id,
            Signer::Patient(patient) => &patient.id,
        }
    }

    /// The signer as a member with one of `roles`, or a refusal naming what was required.
    pub(crate) fn member_with_role(&self, roles: &[Role]) -> Result<(&User, &Org), Rejection> {
        match self {
            Signer::User { user, org } if roles.contains(&user.role) => Ok((user, org)),
            _ => Err(Rejection::not_permitted(format!(
                "requires a member with role {}",
                roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ))),
        }
    }

    pub(crate) fn patient(&self) -> Result<&Patient, Rejection> {
        match self {
            Signer::Patient(patient) => Ok(patient),
            Signer::User { .. } => Err(Rejection::not_permitted("only the patient may sign this")),
        }
    }
}

/// What a contract knows about the transaction it decides.
pub struct TxContext<'c> {
    pub height: u64,
    pub time_ms: u64,
    pub tx_id: Hash,
    pub leaf_index: u64,
    pub signer: &'c Signer,
    pub tx: &'c SignedTx,
    pub config: &'c ChainConfig,
}

/// A transaction whose signature may already have been checked by the shell, off the
/// critical path. `execute` trusts the check only if it was made under the signer's
/// current key; otherwise it verifies again.
pub enum Candidate {
    Verified(VerifiedTx),
    Unverified(SignedTx),
}

impl Candidate {
    pub fn tx(&self) -> &SignedTx {
        match self {
            Candidate::Verified(verified) => verified.tx(),
            Candidate::Unverified(tx) => tx,
        }
    }

    pub fn into_tx(self) -> SignedTx {
        match self {
            Candidate::Verified(verified) => verified.into_inner(),
            Candidate::Unverified(tx) => tx,
        }
    }
}

/// The result of one transaction: the outcome and the audit event to index.
pub struct Executed {
    pub tx: SignedTx,
    pub outcome: TxOutcome,
}

/// Reads the chain configuration; genesis writes it before any transaction.
pub fn chain_config<S: StateRead + ?Sized>(state: &Overlay<'_, S>) -> ChainConfig {
    state
        .get_value(keys::CHAIN)
        .expect("chain configuration is written at genesis")
}

/// Finds the key a transaction must be signed with, and the signer behind it.
fn resolve_signer<S: StateRead + ?Sized>(
    state: &Overlay<'_, S>,
    tx: &SignedTx,
) -> Result<(Signer, crate::crypto::PublicKey), Rejection> {
    let signer = &tx.payload.signer;
    if let Some((org_id, _)) = split_user_id(signer) {
        let user: User =
            state
                .get_value(&keys::user(signer))
                .ok_or_else(|| Rejection::UnknownSigner {
                    signer: signer.clone(),
                })?;
        let org: Org =
            state
                .get_value(&keys::org(org_id))
                .ok_or_else(|| Rejection::UnknownSigner {
                    signer: signer.clone(),
                })?;
        let key = user.public_key.clone();
        return Ok((Signer::User { user, org }, key));
    }
    if is_patient_pseudonym(signer) {
        if let TxBody::RegisterPatient { public_key } = &tx.payload.body {
            // A registration is signed by the key it registers; the signer names that key.
            if patient_pseudonym(public_key) != *signer {
                return Err(Rejection::invalid(
                    "signer",
                    "a registering patient's signer is the pseudonym of the registered key",
                ));
            }
            if state.contains(&keys::patient(signer)) {
                return Err(Rejection::AlreadyExists {
                    what: format!("patient {signer}"),
                });
            }
            let patient = Patient {
                id: signer.clone(),
                public_key: public_key.clone(),
                registered_height: 0,
            };
            return Ok((Signer::Patient(patient), public_key.clone()));
        }
        let patient: Patient =
            state
                .get_value(&keys::patient(signer))
                .ok_or_else(|| Rejection::UnknownSigner {
                    signer: signer.clone(),
                })?;
        let key = patient.public_key.clone();
        return Ok((Signer::Patient(patient), key));
    }
    Err(Rejection::MalformedSigner {
        signer: signer.clone(),
    })
}

/// Checks that a member's certificate chain is in force at `time_ms`: the root, the
/// organisation's CA and the user's certificate valid, the organisation active, the user
/// not revoked. The signatures of the chain were verified when each link entered the
/// ledger, and re-verified by every replay from genesis; what can change afterwards is
/// time and status, which are checked here on every transaction.
pub(crate) fn check_member_in_force(
    config: &ChainConfig,
    user: &User,
    org: &Org,
    time_ms: u64,
) -> Result<(), Rejection> {
    if org.status != OrgStatus::Active {
        return Err(Rejection::OrgNotActive {
            org: org.id.clone(),
        });
    }
    if user.status == UserStatus::Revoked {
        return Err(Rejection::SignerRevoked);
    }
    // notAfter is inclusive (RFC 5280, and `cert::check_valid_at`, which admitted these
    // certificates): a certificate ends after its not_after_ms, not at it.
    let detail = if time_ms > config.root_not_after_ms {
        "the consortium root has expired"
    } else if time_ms > org.ca_not_after_ms {
        "the organisation's CA has expired"
    } else if time_ms < user.not_before_ms {
        "the certificate is not yet valid"
    } else if time_ms > user.not_after_ms {
        "the certificate has expired"
    } else {
        return Ok(());
    };
    Err(Rejection::CertificateNotValid {
        detail: detail.to_string(),
    })
}

/// Where a transaction is decided: the chain, the block and its leaf in the log.
pub struct Placement<'p> {
    pub config: &'p ChainConfig,
    pub height: u64,
    pub time_ms: u64,
    pub leaf_index: u64,
}

/// Decides one transaction against `state` and records its audit event and nonce.
pub fn execute<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    candidate: Candidate,
    placement: &Placement<'_>,
) -> Executed {
    let Placement {
        config,
        height,
        time_ms,
        leaf_index,
    } = *placement;
    let (outcome, event) = match authenticate(state, config, &candidate, time_ms) {
        Err(rejection) => {
            // Nothing is written for an unauthenticated transaction: it may be forged,
            // and a forgery must not be able to change anything, not even an index.
            let outcome = TxOutcome::Rejected { rejection };
            let tx = candidate.into_tx();
            return Executed { tx, outcome };
        }
        Ok((signer, tx_id)) => {
            let tx = candidate.tx();
            state.put(keys::nonce(signer.id()), &tx.payload.nonce);
            state.put(keys::tx(&tx_id), &leaf_index);
            state.commit_tx();
            let context = TxContext {
                height,
                time_ms,
                tx_id,
                leaf_index,
                signer: &signer,
                tx,
                config,
            };
            let mut event = AuditEvent {
                leaf_index,
                height,
                tx_id,
                kind: tx.payload.body.kind().to_string(),
                signer: signer.id().to_string(),
                time_ms,
                actor: None,
                patient: None,
                records: Vec::new(),
                resource_types: Vec::new(),
                custodians: Vec::new(),
                action: None,
                purpose: None,
                decision: None,
                flagged: false,
                rejected: None,
            };
            let result = dispatch(state, &context, &mut event);
            let outcome = match result {
                Ok(access) => {
                    state.commit_tx();
                    TxOutcome::Committed { access }
                }
                Err(rejection) => {
                    state.discard_tx();
                    event.rejected = Some(rejection.code());
                    TxOutcome::Rejected { rejection }
                }
            };
            (outcome, event)
        }
    };
    index_event(state, &event);
    state.commit_tx();
    Executed {
        tx: candidate.into_tx(),
        outcome,
    }
}

fn authenticate<S: StateRead + ?Sized>(
    state: &Overlay<'_, S>,
    config: &ChainConfig,
    candidate: &Candidate,
    time_ms: u64,
) -> Result<(Signer, Hash), Rejection> {
    let tx = candidate.tx();
    let payload = &tx.payload;
    if payload.chain_id != config.chain_id {
        return Err(Rejection::WrongChain {
            chain_id: payload.chain_id.clone(),
        });
    }
    let tx_id = match candidate {
        Candidate::Verified(verified) => verified.id(),
        Candidate::Unverified(tx) => tx.id().map_err(|_| Rejection::Malformed)?,
    };
    // The same signed bytes again: a replay, whoever sends it.
    if state.contains(&keys::tx(&tx_id)) {
        return Err(Rejection::Duplicate { tx_id });
    }
    let (signer, key) = resolve_signer(state, tx)?;
    match candidate {
        Candidate::Verified(verified) if verified.key_fingerprint() == key.fingerprint() => {}
        _ => match tx.clone().verify_with(&key) {
            Ok(_) => {}
            Err(crate::tx::SignatureCheck::Invalid) => return Err(Rejection::BadSignature),
            Err(crate::tx::SignatureCheck::Format(_)) => return Err(Rejection::Malformed),
        },
    }
    if payload.expires_at_ms < time_ms {
        return Err(Rejection::Expired {
            expires_at_ms: payload.expires_at_ms,
            time_ms,
        });
    }
    if payload.expires_at_ms - time_ms > TX_LIFETIME_MS_MAX {
        return Err(Rejection::ExpiryTooFar);
    }
    let last: u64 = state.get_value(&keys::nonce(signer.id())).unwrap_or(0);
    if payload.nonce <= last {
        return Err(Rejection::StaleNonce {
            nonce: payload.nonce,
            last,
        });
    }
    if let Signer::User { user, org } = &signer {
        check_member_in_force(config, user, org, time_ms)?;
    }
    Ok((signer, tx_id))
}

fn dispatch<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    context: &TxContext<'_>,
    event: &mut AuditEvent,
) -> Result<Option<AccessDecision>, Rejection> {
    let body = &context.tx.payload.body;
    match body {
        TxBody::ProposeGovernance { .. } | TxBody::VoteGovernance { .. } => {
            governance::execute(state, context, body)
        }
        TxBody::EnrollUser { .. } | TxBody::RevokeUser { .. } => {
            governance::execute_membership(state, context, body, event)
        }
        TxBody::RegisterPatient { .. } => patients::register(state, context, event),
        TxBody::SetEncryptionKey { .. } => {
            patients::set_encryption_key(state, context, body, event)
        }
        TxBody::CreateRecord { .. } => records::create(state, context, body, event),
        TxBody::CreateRecords { .. } => records::create_group(state, context, body, event),
        TxBody::Grant { .. }
        | TxBody::Revoke { .. }
        | TxBody::RequestAccess { .. }
        | TxBody::ApproveRequest { .. }
        | TxBody::DenyRequest { .. }
        | TxBody::BreakGlass { .. }
        | TxBody::ReviewBreakGlass { .. } => consent::execute(state, context, body, event),
        TxBody::LogAccess { .. } => return access::log(state, context, body, event).map(Some),
    }
    .map(|()| None)
}

/// Writes the audit event and its indexes by patient, actor and record.
///
/// A refused transaction's event may name identifiers no contract has validated. The
/// event keeps them; only well-formed ones are indexed, so that no identifier (one holding
/// a `/`, say) can plant a key inside another identifier's index range.
fn index_event<S: StateRead + ?Sized>(state: &mut Overlay<'_, S>, event: &AuditEvent) {
    let leaf = event.leaf_index;
    state.put(keys::event(leaf), event);
    if let Some(patient) = event.patient.as_deref().filter(|p| is_patient_pseudonym(p)) {
        state.put_raw(keys::event_by_patient(patient, leaf), Vec::new());
    }
    state.put_raw(keys::event_by_actor(&event.signer, leaf), Vec::new());
    let is_identity = |id: &str| is_patient_pseudonym(id) || split_user_id(id).is_some();
    if let Some(actor) = event.actor.as_deref().filter(|a| is_identity(a)) {
        if actor != event.signer {
            state.put_raw(keys::event_by_actor(actor, leaf), Vec::new());
        }
    }
    for record in &event.records {
        if let Some((custodian, record_id)) = record
            .split_once('/')
            .filter(|(c, r)| is_valid_name(c) && is_valid_record_id(r))
        {
            state.put_raw(
                keys::event_by_record(custodian, record_id, leaf),
                Vec::new(),
            );
        }
    }
}

/// Decodes a base64url DER certificate field.
pub(crate) fn decode_certificate(field: &str, text: &str) -> Result<Vec<u8>, Rejection> {
    from_base64url(text).map_err(|_| Rejection::invalid(field, "not unpadded base64url"))
}

/// Reads a patient that must be registered.
pub(crate) fn registered_patient<S: StateRead + ?Sized>(
    state: &Overlay<'_, S>,
    patient: &str,
) -> Result<Patient, Rejection> {
    if !is_patient_pseudonym(patient) {
        return Err(Rejection::invalid("patient", "not a patient pseudonym"));
    }
    state
        .get_value(&keys::patient(patient))
        .ok_or_else(|| Rejection::not_found(format!("patient {patient}")))
}

/// Reads a value that must exist.
pub(crate) fn existing<T: serde::de::DeserializeOwned, S: StateRead + ?Sized>(
    state: &Overlay<'_, S>,
    key: &str,
    what: impl FnOnce() -> String,
) -> Result<T, Rejection> {
    state
        .get_value(key)
        .ok_or_else(|| Rejection::not_found(what()))
}

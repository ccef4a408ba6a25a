//! The record index: every version of every record, at its custodian, for its patient.

use crate::identity::Role;
use crate::model::{category_of, AccessDecision, Action, AuditEvent, Record, RecordVersion};
use crate::state::{keys, Overlay, StateRead};
use crate::tx::{NewRecordVersion, TxBody, RECORD_GROUP_MAX};
use std::collections::BTreeSet;

use super::policy::{decide, AccessQuery};
use super::{registered_patient, Rejection, TxContext};

/// Longest FHIR logical id (FHIR R4 `id` datatype: `[A-Za-z0-9\-\.]{1,64}`).
pub const RECORD_ID_BYTES_MAX: usize = 64;

/// Most versions one record may have.
pub const RECORD_VERSIONS_MAX: u64 = 10_000;

/// True for a FHIR R4 logical id.
pub fn is_valid_record_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= RECORD_ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// True for a CIDv1 of raw bytes with a sha2-256 multihash in base32 (multibase `b`): the
/// id IPFS gives a single-chunk blob. Its binary prefix 0x01 0x55 0x12 0x20 always
/// encodes as `bafkrei`, and the 36 bytes take 58 base32 characters.
pub fn is_valid_cid(cid: &str) -> bool {
    cid.len() == 59
        && cid.starts_with("bafkrei")
        && cid[1..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
}

pub(super) fn create<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    context: &TxContext<'_>,
    body: &TxBody,
    event: &mut AuditEvent,
) -> Result<(), Rejection> {
    let Some(new) = NewRecordVersion::of(body) else {
        unreachable!("dispatch routes only create_record here")
    };
    let (author, org) = context.signer.member_with_role(&AUTHOR_ROLES)?;
    let custodian = org.id.clone();
    event.patient = Some(new.patient.clone());
    event.records = vec![format!("{custodian}/{}", new.record_id)];
    event.action = Some(Action::Write);
    let decision = add_version(state, context, &author.id, &custodian, &new)?;
    event.decision = Some(decision);
    Ok(())
}

/// A group of versions, all or none. Each is checked and indexed as `create` would, in
/// order, against the state the earlier ones left; the first refusal refuses the whole
/// transaction, and `execute` then discards every write the group made.
pub(super) fn create_group<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    context: &TxContext<'_>,
    body: &TxBody,
    event: &mut AuditEvent,
) -> Result<(), Rejection> {
    let TxBody::CreateRecords { versions } = body else {
        unreachable!("dispatch routes only create_records here")
    };
    let (author, org) = context.signer.member_with_role(&AUTHOR_ROLES)?;
    let custodian = org.id.clone();
    event.action = Some(Action::Write);
    event.patient = versions.first().map(|v| v.patient.clone());
    event.records = versions
        .iter()
        .map(|v| format!("{custodian}/{}", v.record_id))
        .collect();
    // One version alone is a create_record: a group has one encoding of its own.
    if versions.len() < 2 || versions.len() > RECORD_GROUP_MAX {
        return Err(Rejection::invalid(
            "versions",
            format!("a group holds 2 to {RECORD_GROUP_MAX} versions"),
        ));
    }
    // One patient, so that the group's audit event is indexed under the one it concerns.
    if versions.iter().any(|v| v.patient != versions[0].patient) {
        return Err(Rejection::invalid(
            "versions",
            "a group's versions are all of one patient",
        ));
    }
    let mut seen = BTreeSet::new();
    if !versions.iter().all(|v| seen.insert(v.record_id.as_str())) {
        return Err(Rejection::invalid(
            "versions",
            "a group names each record at most once",
        ));
    }
    let mut decisions = Vec::with_capacity(versions.len());
    for v in versions {
        decisions.push(add_version(state, context, &author.id, &custodian, v)?);
    }
    // The basis of the writes when they share one (say, one consent); none otherwise.
    if decisions.iter().all(|d| *d == decisions[0]) {
        event.decision = decisions.into_iter().next();
    }
    Ok(())
}

/// The roles that author record versions.
pub const AUTHOR_ROLES: [Role; 4] = [
    Role::Clinician,
    Role::Nurse,
    Role::Radiologist,
    Role::LabTechnician,
];

/// Checks one version against the state (patient, id, type, CID, consent, numbering,
/// tombstone rules) and indexes it. Writes only when every check passed; the caller's
/// transaction is discarded as a whole on any refusal.
fn add_version<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    context: &TxContext<'_>,
    author: &str,
    custodian: &str,
    new: &NewRecordVersion,
) -> Result<AccessDecision, Rejection> {
    let NewRecordVersion {
        patient,
        record_id,
        resource_type,
        cid,
        commitment,
        ..
    } = new;
    let (version, deleted) = (new.version, new.deleted);
    registered_patient(state, patient)?;
    if !is_valid_record_id(record_id) {
        return Err(Rejection::invalid(
            "record_id",
            "must be a FHIR id: [A-Za-z0-9-.], 1 to 64",
        ));
    }
    if category_of(resource_type).is_none() {
        return Err(Rejection::invalid(
            "resource_type",
            "not a supported FHIR resource type",
        ));
    }
    // A Patient resource is found by the pseudonym alone, at whichever custodian holds it.
    if resource_type == "Patient" && record_id != patient {
        return Err(Rejection::invalid(
            "record_id",
            "a Patient record's id is the patient's pseudonym",
        ));
    }
    if !is_valid_cid(cid) {
        return Err(Rejection::invalid(
            "cid",
            "must be a base32 CIDv1 (raw, sha2-256)",
        ));
    }
    let decision = decide(
        state,
        &AccessQuery {
            actor: author,
            patient,
            action: Action::Write,
            resource_types: std::slice::from_ref(resource_type),
            purpose: None,
            time_ms: context.time_ms,
        },
    );
    if let AccessDecision::Denied { .. } = decision {
        return Err(Rejection::NoConsent {
            resource_type: resource_type.clone(),
        });
    }
    let key = keys::record(custodian, record_id);
    let mut record = match state.get_value::<Record>(&key) {
        // A tombstone deletes something: there is no first version that is one.
        None if deleted => {
            return Err(Rejection::not_found(format!(
                "record {custodian}/{record_id} to delete"
            )))
        }
        None => Record {
            custodian: custodian.to_string(),
            record_id: record_id.clone(),
            patient: patient.clone(),
            resource_type: resource_type.clone(),
            versions: Vec::new(),
        },
        Some(record) => {
            if record.patient != *patient || record.resource_type != *resource_type {
                return Err(Rejection::conflict(
                    "a new version keeps the record's patient and resource type",
                ));
            }
            record
        }
    };
    let expected = record.versions.len() as u64 + 1;
    if version != expected {
        return Err(Rejection::conflict(format!(
            "record {record_id} expects version {expected}, not {version}"
        )));
    }
    if version > RECORD_VERSIONS_MAX {
        return Err(Rejection::invalid("version", "too many versions"));
    }
    // One tombstone per deletion: deleting again adds nothing (FHIR's delete is
    // idempotent), and a later ordinary version recreates the resource.
    if deleted && record.versions.last().is_some_and(|last| last.deleted) {
        return Err(Rejection::conflict(format!(
            "record {record_id} is already deleted"
        )));
    }
    record.versions.push(RecordVersion {
        version,
        cid: cid.clone(),
        commitment: *commitment,
        author: author.to_string(),
        tx_id: context.tx_id,
        author_signature: context.tx.signature,
        height: context.height,
        deleted,
    });
    if version == 1 {
        state.put_raw(
            keys::patient_record(patient, custodian, record_id),
            Vec::new(),
        );
    }
    state.put(key, &record);
    Ok(decision)
}

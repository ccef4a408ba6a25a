//! Consent: the patient's grants and revocations, access requests and their answers, and
//! break-glass emergency access with its review.

use crate::hash::Hash;
use crate::identity::{split_user_id, Role};
use crate::model::{
    category_of, AccessRequest, Action, AuditEvent, BreakGlass, BreakGlassReview, Consent, Grantee,
    Org, Purpose, RequestStatus, Scope, User,
};
use crate::state::{keys, Overlay, StateRead};
use crate::tx::TxBody;

use super::{existing, registered_patient, Rejection, TxContext};

/// Most consents a patient may have in force at once (the policy reads them all on each
/// decision); revoked and expired ones no longer count.
pub const CONSENTS_PER_PATIENT_MAX: usize = 1024;
/// Most entries in a scope, actions or purposes list.
pub const LIST_ENTRIES_MAX: usize = 32;
/// Longest break-glass window.
pub const BREAK_GLASS_MS_MAX: u64 = 12 * 60 * 60 * 1000;
/// Most break-glass windows open at once for one patient.
pub const BREAK_GLASS_PER_PATIENT_MAX: usize = 1024;

pub(super) fn execute<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    context: &TxContext<'_>,
    body: &TxBody,
    event: &mut AuditEvent,
) -> Result<(), Rejection> {
    match body {
        TxBody::Grant {
            grantee,
            scope,
            actions,
            purposes,
            expires_at_ms,
        } => {
            let patient = context.signer.patient()?;
            event.patient = Some(patient.id.clone());
            check_grantee(state, grantee)?;
            check_terms(scope, actions, purposes)?;
            if expires_at_ms.is_some_and(|end| end <= context.time_ms) {
                return Err(Rejection::invalid("expires_at_ms", "already past"));
            }
            let consent = Consent {
                id: context.tx_id,
                patient: patient.id.clone(),
                grantee: grantee.clone(),
                scope: scope.clone(),
                actions: actions.clone(),
                purposes: purposes.clone(),
                expires_at_ms: *expires_at_ms,
                granted_at_ms: context.time_ms,
                revoked_at_ms: None,
                request_id: None,
            };
            store_consent(state, consent, context.time_ms)
        }
        TxBody::Revoke { grant_id } => {
            let patient = context.signer.patient()?;
            event.patient = Some(patient.id.clone());
            let mut consent: Consent = existing(state, &keys::consent(grant_id), || {
                format!("consent {grant_id}")
            })?;
            if consent.patient != patient.id {
                return Err(Rejection::not_permitted(
                    "a patient revokes only their own consents",
                ));
            }
            if consent.revoked_at_ms.is_some() {
                return Err(Rejection::conflict("the consent is already revoked"));
            }
            consent.revoked_at_ms = Some(context.time_ms);
            state.put(keys::consent(grant_id), &consent);
            // A consent pruned once it expired holds no slot any more.
            if let Some(slot) = state.get_value::<u64>(&keys::consent_slot(grant_id)) {
                free_consent_slot(state, &patient.id, slot, grant_id);
            }
            Ok(())
        }
        TxBody::RequestAccess {
            patient,
            scope,
            actions,
            purpose,
        } => {
            let (user, _) = context.signer.member_with_role(&[
                Role::Clinician,
                Role::Nurse,
                Role::Radiologist,
                Role::LabTechnician,
                Role::Auditor,
                Role::OrgAdmin,
            ])?;
            event.patient = Some(patient.clone());
            registered_patient(state, patient)?;
            check_terms(scope, actions, std::slice::from_ref(purpose))?;
            let request = AccessRequest {
                id: context.tx_id,
                requester: user.id.clone(),
                patient: patient.clone(),
                scope: scope.clone(),
                actions: actions.clone(),
                purpose: *purpose,
                requested_at_ms: context.time_ms,
                status: RequestStatus::Pending,
                consent_id: None,
            };
            state.put(keys::request(&request.id), &request);
            state.put_raw(keys::patient_request(patient, &request.id), Vec::new());
            Ok(())
        }
        TxBody::ApproveRequest {
            request_id,
            expires_at_ms,
        } => {
            let mut request = answerable_request(state, context, request_id, event)?;
            if expires_at_ms.is_some_and(|end| end <= context.time_ms) {
                return Err(Rejection::invalid("expires_at_ms", "already past"));
            }
            let consent = Consent {
                id: context.tx_id,
                patient: request.patient.clone(),
                grantee: Grantee::User {
                    user: request.requester.clone(),
                },
                scope: request.scope.clone(),
                actions: request.actions.clone(),
                purposes: vec![request.purpose],
                expires_at_ms: *expires_at_ms,
                granted_at_ms: context.time_ms,
                revoked_at_ms: None,
                request_id: Some(request.id),
            };
            request.status = RequestStatus::Approved;
            request.consent_id = Some(consent.id);
            event.actor = Some(request.requester.clone());
            state.put(keys::request(request_id), &request);
            store_consent(state, consent, context.time_ms)
        }
        TxBody::DenyRequest { request_id } => {
            let mut request = answerable_request(state, context, request_id, event)?;
            request.status = RequestStatus::Denied;
            event.actor = Some(request.requester.clone());
            state.put(keys::request(request_id), &request);
            Ok(())
        }
        TxBody::BreakGlass {
            patient,
            reason,
            justification_commitment,
            duration_ms,
        } => {
            let (user, _) = context.signer.member_with_role(&[Role::Clinician])?;
            event.patient = Some(patient.clone());
            event.flagged = true;
            event.purpose = Some(Purpose::Emergency);
            registered_patient(state, patient)?;
            if *duration_ms == 0 || *duration_ms > BREAK_GLASS_MS_MAX {
                return Err(Rejection::invalid(
                    "duration_ms",
                    format!("must be 1 to {BREAK_GLASS_MS_MAX}"),
                ));
            }
            let key = keys::patient_break_glass(patient);
            let mut ids: Vec<Hash> = state.get_value(&key).unwrap_or_default();
            let bound_key = keys::patient_break_glass_next_end(patient);
            let stored_bound: Option<u64> = state.get_value(&bound_key);
            // No window in the list ends before this; `None` with windows listed is not
            // known (a list stored before the bound was kept), so one may have ended.
            let mut next_end = stored_bound.filter(|_| !ids.is_empty());
            // Ended windows are pruned when the list is full, and only when one of them may
            // have ended: a break-glass at the bound with every window open is refused
            // without reading them all. The policy skips ended windows anyway.
            if ids.len() >= BREAK_GLASS_PER_PATIENT_MAX
                && next_end.is_none_or(|end| end <= context.time_ms)
            {
                let mut earliest: Option<u64> = None;
                ids.retain(|id| {
                    let open = state
                        .get_value::<BreakGlass>(&keys::break_glass(id))
                        .filter(|open| context.time_ms < open.ends_at_ms);
                    if let Some(open) = &open {
                        earliest =
                            Some(earliest.map_or(open.ends_at_ms, |e| e.min(open.ends_at_ms)));
                    }
                    open.is_some()
                });
                next_end = earliest;
            }
            if ids.len() >= BREAK_GLASS_PER_PATIENT_MAX {
                return Err(Rejection::conflict(
                    "the patient has the most break-glass windows open at once",
                ));
            }
            let opening = BreakGlass {
                id: context.tx_id,
                actor: user.id.clone(),
                patient: patient.clone(),
                reason: *reason,
                justification_commitment: *justification_commitment,
                starts_at_ms: context.time_ms,
                ends_at_ms: context.time_ms + duration_ms,
                review: None,
            };
            // Every window ends, so the bound is known again once the list was empty or
            // pruned; it stays unknown over a list from before it was kept.
            let bound = match next_end {
                Some(next) => Some(next.min(opening.ends_at_ms)),
                None if ids.is_empty() => Some(opening.ends_at_ms),
                None => None,
            };
            if bound != stored_bound {
                match bound {
                    Some(end) => state.put(bound_key, &end),
                    None => state.delete(bound_key),
                }
            }
            ids.push(opening.id);
            state.put(key, &ids);
            state.put_raw(
                keys::patient_break_glass_entry(patient, &opening.id),
                Vec::new(),
            );
            state.put(keys::break_glass(&opening.id), &opening);
            Ok(())
        }
        TxBody::ReviewBreakGlass {
            break_glass_id,
            verdict,
        } => {
            let (auditor, _) = context.signer.member_with_role(&[Role::Auditor])?;
            let mut opening: BreakGlass =
                existing(state, &keys::break_glass(break_glass_id), || {
                    format!("break-glass {break_glass_id}")
                })?;
            event.patient = Some(opening.patient.clone());
            event.actor = Some(opening.actor.clone());
            if opening.review.is_some() {
                return Err(Rejection::conflict("the break-glass is already reviewed"));
            }
            if opening.actor == auditor.id {
                return Err(Rejection::not_permitted(
                    "nobody reviews their own break-glass",
                ));
            }
            opening.review = Some(BreakGlassReview {
                reviewer: auditor.id.clone(),
                verdict: *verdict,
                reviewed_at_ms: context.time_ms,
            });
            state.put(keys::break_glass(break_glass_id), &opening);
            Ok(())
        }
        _ => unreachable!("dispatch routes only consent bodies here"),
    }
}

/// Stores a new consent: in the patient's history, and in a slot the policy reads. At most
/// `CONSENTS_PER_PATIENT_MAX` slots hold consents that may be in force at `time_ms`.
fn store_consent<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    consent: Consent,
    time_ms: u64,
) -> Result<(), Rejection> {
    let bound = CONSENTS_PER_PATIENT_MAX as u64;
    let mut count = consent_slot_count(state, &consent.patient);
    let mut next_end = consent_next_end(state, &consent.patient);
    // Revokes free their slots at once; expired consents are pruned only when the slots are
    // full, so that storing a consent stays cheap, and only when one of them may have ended,
    // so that a grant to a patient whose consents are all still in force is refused without
    // reading them all.
    if count >= bound && next_end.is_some_and(|end| end <= time_ms) {
        prune_consent_slots(state, &consent.patient, time_ms);
        count = consent_slot_count(state, &consent.patient);
        next_end = consent_next_end(state, &consent.patient);
    }
    if count >= bound {
        return Err(Rejection::conflict(
            "the patient has the most consents in force at once",
        ));
    }
    state.put(
        keys::patient_consent_slot(&consent.patient, count),
        &consent.id,
    );
    state.put(keys::consent_slot(&consent.id), &count);
    state.put(keys::patient_consent_count(&consent.patient), &(count + 1));
    state.put_raw(
        keys::patient_consent(&consent.patient, &consent.id),
        Vec::new(),
    );
    if let Some(end) = consent
        .expires_at_ms
        .filter(|end| next_end.is_none_or(|next| *end < next))
    {
        state.put(keys::patient_consent_next_end(&consent.patient), &end);
    }
    state.put(keys::consent(&consent.id), &consent);
    Ok(())
}

/// No consent in the patient's slots ends before this (`None`: none of them ends).
fn consent_next_end<S: StateRead + ?Sized>(state: &Overlay<'_, S>, patient: &str) -> Option<u64> {
    state.get_value(&keys::patient_consent_next_end(patient))
}

/// How many consent slots of the patient are in use.
fn consent_slot_count<S: StateRead + ?Sized>(state: &Overlay<'_, S>, patient: &str) -> u64 {
    state
        .get_value(&keys::patient_consent_count(patient))
        .unwrap_or(0)
}

/// The consent in one of the patient's slots in use. Every slot below the count holds one:
/// a missing slot is a bug or a corrupt store, and nothing can be decided on it.
fn consent_in_slot<S: StateRead + ?Sized>(
    state: &Overlay<'_, S>,
    patient: &str,
    slot: u64,
) -> Hash {
    state
        .get_value(&keys::patient_consent_slot(patient, slot))
        .unwrap_or_else(|| panic!("consent slot {slot} of {patient} is in use but empty"))
}

/// The ids of the patient's consents that may still be in force, in slot order.
pub(super) fn consents_in_slots<S: StateRead + ?Sized>(
    state: &Overlay<'_, S>,
    patient: &str,
) -> Vec<Hash> {
    (0..consent_slot_count(state, patient))
        .map(|slot| consent_in_slot(state, patient, slot))
        .collect()
}

/// Frees the patient's slot that holds consent `freed`: the last slot's consent moves into
/// it, so the slots in use stay `0..count` and the change is the same few keys whatever the
/// count.
fn free_consent_slot<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    patient: &str,
    slot: u64,
    freed: &Hash,
) {
    let count = consent_slot_count(state, patient);
    assert!(
        slot < count,
        "consent slot {slot} of {patient} is not below the count {count}"
    );
    assert_eq!(
        consent_in_slot(state, patient, slot),
        *freed,
        "consent slot {slot} of {patient} does not hold the consent that names it"
    );
    state.delete(keys::consent_slot(freed));
    let last = count - 1;
    if slot != last {
        let moved = consent_in_slot(state, patient, last);
        state.put(keys::patient_consent_slot(patient, slot), &moved);
        state.put(keys::consent_slot(&moved), &slot);
    }
    state.delete(keys::patient_consent_slot(patient, last));
    let count_key = keys::patient_consent_count(patient);
    if last == 0 {
        state.delete(count_key);
        if consent_next_end(state, patient).is_some() {
            state.delete(keys::patient_consent_next_end(patient));
        }
    } else {
        state.put(count_key, &last);
    }
}

/// Frees the slots of the patient's consents that are no longer in force at `time_ms`, and
/// sets the earliest end of those it keeps. Slots are visited in ascending order and a freed
/// slot is looked at again (it now holds what was the last), so every node prunes the same
/// slots in the same way.
fn prune_consent_slots<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    patient: &str,
    time_ms: u64,
) {
    let mut slot = 0;
    let mut next_end: Option<u64> = None;
    while slot < consent_slot_count(state, patient) {
        let id = consent_in_slot(state, patient, slot);
        let kept = state
            .get_value::<Consent>(&keys::consent(&id))
            .filter(|consent| consent.is_active_at(time_ms));
        match kept {
            Some(consent) => {
                if let Some(end) = consent.expires_at_ms {
                    next_end = Some(next_end.map_or(end, |next| next.min(end)));
                }
                slot += 1;
            }
            None => free_consent_slot(state, patient, slot, &id),
        }
    }
    let key = keys::patient_consent_next_end(patient);
    match next_end {
        Some(end) => state.put(key, &end),
        None if consent_next_end(state, patient).is_some() => state.delete(key),
        None => {}
    }
}

/// A pending request of the signing patient.
fn answerable_request<S: StateRead + ?Sized>(
    state: &Overlay<'_, S>,
    context: &TxContext<'_>,
    request_id: &Hash,
    event: &mut AuditEvent,
) -> Result<AccessRequest, Rejection> {
    let patient = context.signer.patient()?;
    event.patient = Some(patient.id.clone());
    let request: AccessRequest = existing(state, &keys::request(request_id), || {
        format!("request {request_id}")
    })?;
    if request.patient != patient.id {
        return Err(Rejection::not_permitted(
            "a patient answers only requests to them",
        ));
    }
    if request.status != RequestStatus::Pending {
        return Err(Rejection::conflict("the request is already answered"));
    }
    Ok(request)
}

fn check_grantee<S: StateRead + ?Sized>(
    state: &Overlay<'_, S>,
    grantee: &Grantee,
) -> Result<(), Rejection> {
    let org_id = match grantee {
        Grantee::User { user } => {
            let value: User = existing(state, &keys::user(user), || format!("user {user}"))?;
            if value.role == Role::Node {
                return Err(Rejection::invalid(
                    "grantee",
                    "a node cannot be granted access",
                ));
            }
            split_user_id(user).map(|(org, _)| org.to_string())
        }
        Grantee::Role { org, role } => {
            if *role == Role::Node {
                return Err(Rejection::invalid(
                    "grantee",
                    "a node cannot be granted access",
                ));
            }
            Some(org.clone())
        }
        Grantee::Org { org } => Some(org.clone()),
    };
    let org_id = org_id.unwrap_or_default();
    existing::<Org, S>(state, &keys::org(&org_id), || {
        format!("organisation {org_id}")
    })?;
    Ok(())
}

fn check_terms(scope: &Scope, actions: &[Action], purposes: &[Purpose]) -> Result<(), Rejection> {
    if scope.is_empty() {
        return Err(Rejection::invalid(
            "scope",
            "names no resource type or category",
        ));
    }
    if scope.resource_types.len() > LIST_ENTRIES_MAX || scope.categories.len() > LIST_ENTRIES_MAX {
        return Err(Rejection::invalid(
            "scope",
            format!("at most {LIST_ENTRIES_MAX} entries each"),
        ));
    }
    if let Some(bad) = scope
        .resource_types
        .iter()
        .find(|t| category_of(t).is_none())
    {
        return Err(Rejection::invalid(
            "scope",
            format!("{bad:?} is not a supported resource type"),
        ));
    }
    if actions.is_empty() || actions.len() > LIST_ENTRIES_MAX {
        return Err(Rejection::invalid("actions", "must name 1 to 32 actions"));
    }
    if purposes.is_empty() || purposes.len() > LIST_ENTRIES_MAX {
        return Err(Rejection::invalid("purposes", "must name 1 to 32 purposes"));
    }
    Ok(())
}

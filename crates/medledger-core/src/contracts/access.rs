//! Access entries: a member's node records every attempt by one of its users to read or
//! search a patient's records, and the ledger decides it.
//!
//! The entry is written once per request by the node the requester called, before any
//! custodian is asked; the custodians then serve only under a granted entry that names them
//! (see the node's record service). The node does not assert a decision; the contract
//! computes it with the same policy at the transaction's place in the order, so a revoke
//! committed before the entry always wins, and no entry can claim a grant the policy would
//! not give. The node may only add a refusal of its own (an unauthenticated requester,
//! say). The query and the answer appear only as salted commitments: the node can later
//! prove what was asked and answered, and nobody can test guesses of health data against
//! the ledger.

use crate::identity::{is_patient_pseudonym, split_user_id, Role};
use crate::model::{category_of, AccessDecision, AccessDenial, Action, AuditEvent, Record};
use crate::state::{keys, Overlay, StateRead};
use crate::tx::{access_record_name, TxBody, ACCESS_RECORDS_MAX};

use super::policy::{decide, AccessQuery};
use super::{registered_patient, Rejection, TxContext};

pub(super) fn log<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    context: &TxContext<'_>,
    body: &TxBody,
    event: &mut AuditEvent,
) -> Result<AccessDecision, Rejection> {
    let TxBody::LogAccess {
        actor,
        patient,
        action,
        records,
        resource_types,
        custodians,
        purpose,
        custodian_denial,
        query_commitment: _,
        answer_commitment: _,
    } = body
    else {
        unreachable!("dispatch routes only log_access here")
    };
    let (_, signer_org) = context
        .signer
        .member_with_role(&[Role::Node, Role::OrgAdmin])?;
    // A node speaks for its own organisation's users, and for patients who logged in at it;
    // an entry naming another member's user would put words in that member's mouth.
    match split_user_id(actor) {
        Some((org, _)) if org == signer_org.id => {}
        None if is_patient_pseudonym(actor) => {}
        _ => {
            return Err(Rejection::not_permitted(format!(
                "{} logs access only for its own users or for patients, not {actor}",
                signer_org.id
            )))
        }
    }
    event.patient = Some(patient.clone());
    event.actor = Some(actor.clone());
    event.action = Some(*action);
    event.purpose = Some(*purpose);
    registered_patient(state, patient)?;
    if records.len() > ACCESS_RECORDS_MAX {
        return Err(Rejection::invalid(
            "records",
            format!("at most {ACCESS_RECORDS_MAX}"),
        ));
    }
    if custodians.len() > super::consent::LIST_ENTRIES_MAX {
        return Err(Rejection::invalid(
            "custodians",
            format!("at most {}", super::consent::LIST_ENTRIES_MAX),
        ));
    }
    let mut types: Vec<String> = Vec::new();
    let mut named: Vec<String> = Vec::new();
    for name in records {
        let (custodian, record_id) = access_record_name(name, &signer_org.id);
        let qualified = format!("{custodian}/{record_id}");
        if event.records.contains(&qualified) {
            return Err(Rejection::invalid(
                "records",
                format!("{qualified} is named twice"),
            ));
        }
        let record: Record = state
            .get_value(&keys::record(custodian, record_id))
            .ok_or_else(|| Rejection::not_found(format!("record {qualified}")))?;
        if record.patient != *patient {
            return Err(Rejection::invalid(
                "records",
                "every record must be the patient's",
            ));
        }
        event.records.push(qualified);
        if !named.contains(&record.custodian) {
            named.push(record.custodian);
        }
        if !types.contains(&record.resource_type) {
            types.push(record.resource_type);
        }
    }
    match action {
        Action::Search => {
            if resource_types.is_empty() || resource_types.len() > super::consent::LIST_ENTRIES_MAX
            {
                return Err(Rejection::invalid(
                    "resource_types",
                    "a search names 1 to 32 types",
                ));
            }
            if let Some(bad) = resource_types.iter().find(|t| category_of(t).is_none()) {
                return Err(Rejection::invalid(
                    "resource_types",
                    format!("{bad:?} is not a supported resource type"),
                ));
            }
            for resource_type in resource_types {
                if !types.contains(resource_type) {
                    types.push(resource_type.clone());
                }
            }
            for custodian in custodians {
                if named.contains(custodian) {
                    return Err(Rejection::invalid(
                        "custodians",
                        format!("{custodian:?} is named twice"),
                    ));
                }
                if !state.contains(&keys::org(custodian)) {
                    return Err(Rejection::not_found(format!("organisation {custodian}")));
                }
                named.push(custodian.clone());
            }
        }
        Action::Read | Action::Write => {
            if !custodians.is_empty() {
                return Err(Rejection::invalid(
                    "custodians",
                    "only a search names custodians; a read's are its records'",
                ));
            }
            if records.is_empty() {
                return Err(Rejection::invalid(
                    "records",
                    "a read or write names its records",
                ));
            }
            if !resource_types.is_empty() {
                return Err(Rejection::invalid(
                    "resource_types",
                    "only a search names resource types",
                ));
            }
        }
    }
    event.resource_types = types.clone();
    event.custodians = named;
    let decision = match custodian_denial {
        Some(denial) => AccessDecision::Denied {
            denial: AccessDenial::Custodian { denial: *denial },
        },
        None => decide(
            state,
            &AccessQuery {
                actor,
                patient,
                action: *action,
                resource_types: &types,
                purpose: Some(*purpose),
                time_ms: context.time_ms,
            },
        ),
    };
    event.flagged = matches!(
        decision,
        AccessDecision::Granted {
            basis: crate::model::AccessBasis::BreakGlass { .. }
        }
    );
    event.decision = Some(decision.clone());
    Ok(decision)
}

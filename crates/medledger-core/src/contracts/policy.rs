//! The access policy: "may this actor do this action on this patient's records now?".
//!
//! One pure function answers it, for the contracts (which record its answer on the ledger)
//! and for custodians (which enforce it). An access is granted to the patient, under a
//! consent the patient granted, or under an open break-glass; to nobody else.

use crate::identity::{is_patient_pseudonym, split_user_id, Role};
use crate::model::{
    AccessBasis, AccessDecision, AccessDenial, Action, BreakGlass, Consent, Grantee, Org, Purpose,
    User,
};
use crate::state::{keys, Overlay, StateRead};

use super::consent::consents_in_slots;
use super::{chain_config, check_member_in_force, Rejection};

/// One question to the policy.
#[derive(Debug, Clone)]
pub struct AccessQuery<'q> {
    /// `name@org`, or the patient's own pseudonym.
    pub actor: &'q str,
    pub patient: &'q str,
    pub action: Action,
    /// Every resource type the access touches; each must be covered.
    pub resource_types: &'q [String],
    /// The declared purpose; None only for record creation, which consents cover for any purpose.
    pub purpose: Option<Purpose>,
    pub time_ms: u64,
}

fn denied(denial: AccessDenial) -> AccessDecision {
    AccessDecision::Denied { denial }
}

/// Decides an access as of `query.time_ms` on the given state.
pub fn decide<S: StateRead + ?Sized>(
    state: &Overlay<'_, S>,
    query: &AccessQuery<'_>,
) -> AccessDecision {
    if !state.contains(&keys::patient(query.patient)) {
        return denied(AccessDenial::UnknownPatient);
    }
    if is_patient_pseudonym(query.actor) {
        return if query.actor == query.patient {
            AccessDecision::Granted {
                basis: AccessBasis::Patient,
            }
        } else {
            denied(AccessDenial::NoConsent {
                resource_type: query.resource_types.first().cloned().unwrap_or_default(),
            })
        };
    }
    let Some((org_id, _)) = split_user_id(query.actor) else {
        return denied(AccessDenial::UnknownActor);
    };
    let (Some(user), Some(org)) = (
        state.get_value::<User>(&keys::user(query.actor)),
        state.get_value::<Org>(&keys::org(org_id)),
    ) else {
        return denied(AccessDenial::UnknownActor);
    };
    match check_member_in_force(&chain_config(state), &user, &org, query.time_ms) {
        Ok(()) => {}
        Err(Rejection::OrgNotActive { .. }) => return denied(AccessDenial::OrgNotActive),
        Err(_) => return denied(AccessDenial::ActorNotActive),
    }
    if user.role == Role::Node {
        return denied(AccessDenial::RoleNotPermitted);
    }
    let mut consents: Vec<(u64, Consent)> = consents_in_slots(state, query.patient)
        .iter()
        .filter_map(|id| state.get_value::<Consent>(&keys::consent(id)))
        .filter(|consent| consent.is_active_at(query.time_ms))
        .filter(|consent| grantee_matches(&consent.grantee, &user))
        .filter(|consent| covers_action(&consent.actions, query.action))
        .filter(|consent| query.purpose.is_none_or(|p| consent.purposes.contains(&p)))
        .map(|consent| (granted_leaf_index(state, &consent), consent))
        .collect();
    // Slots are in no particular order (a revoke moves the last slot into the one it frees);
    // the basis of a grant is the oldest consent that covers it, so order them as granted.
    consents.sort_by_key(|(leaf_index, _)| *leaf_index);
    let break_glass = open_break_glass(state, query);
    let mut basis = None;
    for resource_type in query.resource_types {
        match consents
            .iter()
            .map(|(_, consent)| consent)
            .find(|c| c.scope.covers(resource_type))
        {
            Some(consent) => {
                basis.get_or_insert(AccessBasis::Consent {
                    consent_id: consent.id,
                });
            }
            None => match &break_glass {
                Some(id) => {
                    basis = Some(AccessBasis::BreakGlass {
                        break_glass_id: *id,
                    })
                }
                None => {
                    return denied(AccessDenial::NoConsent {
                        resource_type: resource_type.clone(),
                    })
                }
            },
        }
    }
    match basis {
        Some(basis) => AccessDecision::Granted { basis },
        None => denied(AccessDenial::NoConsent {
            resource_type: String::new(),
        }),
    }
}

/// Where the transaction that granted a consent sits in the log: a consent's id is that
/// transaction's id, and every transaction that reached a contract has its place recorded.
/// (Were one missing, the consent sorts last, the same on every node.)
fn granted_leaf_index<S: StateRead + ?Sized>(state: &Overlay<'_, S>, consent: &Consent) -> u64 {
    state.get_value(&keys::tx(&consent.id)).unwrap_or(u64::MAX)
}

fn grantee_matches(grantee: &Grantee, user: &User) -> bool {
    match grantee {
        Grantee::User { user: id } => *id == user.id,
        Grantee::Role { org, role } => *org == user.org && *role == user.role,
        Grantee::Org { org } => *org == user.org,
    }
}

/// A consent to read also covers searching.
fn covers_action(actions: &[Action], action: Action) -> bool {
    actions.contains(&action) || (action == Action::Search && actions.contains(&Action::Read))
}

/// The break-glass the actor holds open for this patient, if the access is for an emergency.
fn open_break_glass<S: StateRead + ?Sized>(
    state: &Overlay<'_, S>,
    query: &AccessQuery<'_>,
) -> Option<crate::hash::Hash> {
    if !matches!(query.purpose, None | Some(Purpose::Emergency)) {
        return None;
    }
    let ids: Vec<crate::hash::Hash> = state
        .get_value(&keys::patient_break_glass(query.patient))
        .unwrap_or_default();
    ids.iter()
        .filter_map(|id| state.get_value::<BreakGlass>(&keys::break_glass(id)))
        .find(|bg| {
            bg.actor == query.actor
                && bg.starts_at_ms <= query.time_ms
                && query.time_ms < bg.ends_at_ms
        })
        .map(|bg| bg.id)
}

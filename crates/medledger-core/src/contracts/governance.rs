//! Governance: membership of organisations by the members' vote, and each organisation's
//! enrollment and revocation of its own users.

use crate::cert::{check_valid_at, parse_certificate, verify_issued_by, CertInfo};
use crate::identity::{is_valid_name, user_id, Role};
use crate::model::{
    AuditEvent, GovernanceAction, Org, OrgStatus, Proposal, ProposalStatus, User, UserStatus,
};
use crate::state::{keys, Overlay, StateRead};
use crate::tx::TxBody;

use super::{decode_certificate, existing, Rejection, TxContext};

/// How long a proposal stays open for votes.
pub const PROPOSAL_OPEN_MS: u64 = 7 * 24 * 60 * 60 * 1000;

pub(super) fn execute<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    context: &TxContext<'_>,
    body: &TxBody,
) -> Result<(), Rejection> {
    let (admin, _) = context.signer.member_with_role(&[Role::OrgAdmin])?;
    let voter_org = admin.org.clone();
    match body {
        TxBody::ProposeGovernance { action } => {
            validate_action(state, context, action)?;
            let id: u64 = state.get_value(keys::PROPOSAL_SEQ).unwrap_or(0) + 1;
            state.put(keys::PROPOSAL_SEQ.to_string(), &id);
            let mut proposal = Proposal {
                id,
                action: action.clone(),
                proposer: admin.id.clone(),
                opened_at_ms: context.time_ms,
                closes_at_ms: context.time_ms + PROPOSAL_OPEN_MS,
                votes: Default::default(),
                status: ProposalStatus::Open,
            };
            proposal.votes.insert(voter_org, true);
            tally(state, context, &mut proposal)?;
            state.put(keys::proposal(id), &proposal);
            Ok(())
        }
        TxBody::VoteGovernance {
            proposal_id,
            approve,
        } => {
            let mut proposal: Proposal = existing(state, &keys::proposal(*proposal_id), || {
                format!("proposal {proposal_id}")
            })?;
            if proposal.status != ProposalStatus::Open {
                return Err(Rejection::conflict("the proposal is already decided"));
            }
            if context.time_ms >= proposal.closes_at_ms {
                return Err(Rejection::conflict("the proposal's vote has closed"));
            }
            if proposal.action.target() == voter_org {
                return Err(Rejection::not_permitted(
                    "an organisation does not vote on its own membership",
                ));
            }
            if proposal.votes.contains_key(&voter_org) {
                return Err(Rejection::conflict("this organisation has already voted"));
            }
            proposal.votes.insert(voter_org, *approve);
            tally(state, context, &mut proposal)?;
            state.put(keys::proposal(*proposal_id), &proposal);
            Ok(())
        }
        _ => unreachable!("dispatch routes only governance bodies here"),
    }
}

/// Checks that an action makes sense now; checked again when it is carried out.
fn validate_action<S: StateRead + ?Sized>(
    state: &Overlay<'_, S>,
    context: &TxContext<'_>,
    action: &GovernanceAction,
) -> Result<(), Rejection> {
    let target = action.target();
    let org: Option<Org> = state.get_value(&keys::org(target));
    match (action, org) {
        (GovernanceAction::AdmitOrg { .. }, Some(_)) => Err(Rejection::AlreadyExists {
            what: format!("organisation {target}"),
        }),
        (
            GovernanceAction::AdmitOrg {
                org,
                ca_certificate,
                admin_certificate,
                ..
            },
            None,
        ) => {
            check_new_org(context, org, ca_certificate, admin_certificate)?;
            Ok(())
        }
        (_, None) => Err(Rejection::not_found(format!("organisation {target}"))),
        (GovernanceAction::SuspendOrg { .. }, Some(org)) if org.status != OrgStatus::Active => Err(
            Rejection::conflict("only an active organisation can be suspended"),
        ),
        (GovernanceAction::ReinstateOrg { .. }, Some(org))
            if org.status != OrgStatus::Suspended =>
        {
            Err(Rejection::conflict(
                "only a suspended organisation can be reinstated",
            ))
        }
        (GovernanceAction::RemoveOrg { .. }, Some(org)) if org.status == OrgStatus::Removed => {
            Err(Rejection::conflict("the organisation is already removed"))
        }
        _ => Ok(()),
    }
}

/// Validates a new member's CA (issued by the consortium root) and first admin (issued by
/// that CA, role org_admin), both for organisation `org` and valid now.
pub(crate) fn check_new_org(
    context: &TxContext<'_>,
    org: &str,
    ca_certificate: &str,
    admin_certificate: &str,
) -> Result<(CertInfo, CertInfo), Rejection> {
    let root = decode_certificate("root_certificate", &context.config.root_certificate)?;
    check_org_certificates(
        &root,
        org,
        ca_certificate,
        admin_certificate,
        context.time_ms,
    )
}

/// The certificate checks shared by genesis and admission.
pub(crate) fn check_org_certificates(
    root_der: &[u8],
    org: &str,
    ca_certificate: &str,
    admin_certificate: &str,
    time_ms: u64,
) -> Result<(CertInfo, CertInfo), Rejection> {
    if !is_valid_name(org) {
        return Err(Rejection::invalid(
            "org",
            "must be [a-z0-9-], 1 to 64 bytes",
        ));
    }
    let ca_der = decode_certificate("ca_certificate", ca_certificate)?;
    let certificate =
        |e: crate::cert::CertError| Rejection::invalid("ca_certificate", e.to_string());
    let ca = parse_certificate(&ca_der).map_err(certificate)?;
    verify_issued_by(&ca_der, root_der).map_err(certificate)?;
    check_valid_at(&ca, time_ms).map_err(certificate)?;
    if !ca.is_ca || ca.organization != org {
        return Err(Rejection::invalid(
            "ca_certificate",
            "must be a CA certificate whose organisation is the new member",
        ));
    }
    let admin_der = decode_certificate("admin_certificate", admin_certificate)?;
    let admin = check_member_certificate(&admin_der, &ca_der, org, time_ms)
        .map_err(|detail| Rejection::invalid("admin_certificate", detail))?;
    if admin.role != Some(Role::OrgAdmin) {
        return Err(Rejection::invalid(
            "admin_certificate",
            "role must be org_admin",
        ));
    }
    Ok((ca, admin))
}

/// Checks a user or node certificate against its organisation's CA.
pub(crate) fn check_member_certificate(
    der: &[u8],
    ca_der: &[u8],
    org: &str,
    time_ms: u64,
) -> Result<CertInfo, String> {
    let info = parse_certificate(der).map_err(|e| e.to_string())?;
    verify_issued_by(der, ca_der).map_err(|e| e.to_string())?;
    check_valid_at(&info, time_ms).map_err(|e| e.to_string())?;
    if info.is_ca {
        return Err("a member certificate must not be a CA".to_string());
    }
    if info.organization != org {
        return Err(format!("certificate organisation is not {org:?}"));
    }
    if info.role.is_none() {
        return Err("certificate carries no role".to_string());
    }
    if !is_valid_name(&info.common_name) {
        return Err("certificate name must be [a-z0-9-], 1 to 64 bytes".to_string());
    }
    Ok(info)
}

/// Builds the state value of a member whose certificate was checked.
pub(crate) fn user_from_certificate(info: &CertInfo, der_text: &str, height: u64) -> User {
    User {
        id: user_id(&info.organization, &info.common_name),
        org: info.organization.clone(),
        role: info
            .role
            .expect("member certificates are checked to carry a role"),
        public_key: info.public_key.clone(),
        certificate: der_text.to_string(),
        not_before_ms: info.not_before_ms,
        not_after_ms: info.not_after_ms,
        status: UserStatus::Active,
        enrolled_height: height,
        revocation: None,
    }
}

/// Organisations whose votes count: active members other than the proposal's target.
fn electorate<S: StateRead + ?Sized>(state: &Overlay<'_, S>, target: &str) -> Vec<String> {
    let orgs: Vec<String> = state.get_value(keys::ORGS).unwrap_or_default();
    orgs.into_iter()
        .filter(|id| id != target)
        .filter(|id| {
            state
                .get_value::<Org>(&keys::org(id))
                .is_some_and(|org| org.status == OrgStatus::Active)
        })
        .collect()
}

/// Decides a proposal once a strict majority of the electorate approved it, or once
/// approval has become impossible.
fn tally<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    context: &TxContext<'_>,
    proposal: &mut Proposal,
) -> Result<(), Rejection> {
    let voters = electorate(state, proposal.action.target());
    let approvals = voters
        .iter()
        .filter(|v| proposal.votes.get(*v) == Some(&true))
        .count();
    let refusals = voters
        .iter()
        .filter(|v| proposal.votes.get(*v) == Some(&false))
        .count();
    let majority = voters.len() / 2 + 1;
    if approvals >= majority {
        carry_out(state, context, &proposal.action)?;
        proposal.status = ProposalStatus::Approved;
    } else if voters.len() - refusals < majority {
        proposal.status = ProposalStatus::Rejected;
    }
    Ok(())
}

fn carry_out<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    context: &TxContext<'_>,
    action: &GovernanceAction,
) -> Result<(), Rejection> {
    validate_action(state, context, action)?;
    let set_status = |state: &mut Overlay<'_, S>, org: &str, status| {
        let mut value: Org = state.get_value(&keys::org(org)).expect("validated above");
        value.status = status;
        state.put(keys::org(org), &value);
    };
    match action {
        GovernanceAction::AdmitOrg {
            org,
            org_kind,
            ca_certificate,
            admin_certificate,
        } => {
            let (ca, admin) = check_new_org(context, org, ca_certificate, admin_certificate)?;
            admit(state, org, *org_kind, ca_certificate, &ca, context.height);
            let user = user_from_certificate(&admin, admin_certificate, context.height);
            state.put(keys::user(&user.id), &user);
        }
        GovernanceAction::SuspendOrg { org } => set_status(state, org, OrgStatus::Suspended),
        GovernanceAction::ReinstateOrg { org } => set_status(state, org, OrgStatus::Active),
        GovernanceAction::RemoveOrg { org } => set_status(state, org, OrgStatus::Removed),
    }
    Ok(())
}

/// Writes a new member organisation.
pub(crate) fn admit<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    org: &str,
    kind: crate::identity::OrgKind,
    ca_certificate: &str,
    ca: &CertInfo,
    height: u64,
) {
    let value = Org {
        id: org.to_string(),
        kind,
        ca_certificate: ca_certificate.to_string(),
        ca_not_after_ms: ca.not_after_ms,
        status: OrgStatus::Active,
        admitted_height: height,
    };
    state.put(keys::org(org), &value);
    let mut orgs: Vec<String> = state.get_value(keys::ORGS).unwrap_or_default();
    orgs.push(org.to_string());
    state.put(keys::ORGS.to_string(), &orgs);
}

/// Enrollment and revocation of an organisation's own users, by its admins.
pub(super) fn execute_membership<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    context: &TxContext<'_>,
    body: &TxBody,
    event: &mut AuditEvent,
) -> Result<(), Rejection> {
    let (admin, org) = context.signer.member_with_role(&[Role::OrgAdmin])?;
    match body {
        TxBody::EnrollUser { certificate } => {
            let der = decode_certificate("certificate", certificate)?;
            let ca_der = decode_certificate("ca_certificate", &org.ca_certificate)?;
            let info = check_member_certificate(&der, &ca_der, &org.id, context.time_ms)
                .map_err(|detail| Rejection::invalid("certificate", detail))?;
            let user = user_from_certificate(&info, certificate, context.height);
            if state.contains(&keys::user(&user.id)) {
                return Err(Rejection::AlreadyExists {
                    what: format!("user {}", user.id),
                });
            }
            event.actor = Some(user.id.clone());
            state.put(keys::user(&user.id), &user);
            Ok(())
        }
        TxBody::RevokeUser { user, reason } => {
            let mut value: User = existing(state, &keys::user(user), || format!("user {user}"))?;
            if value.org != admin.org {
                return Err(Rejection::not_permitted(
                    "an admin revokes only users of their own organisation",
                ));
            }
            if value.status == UserStatus::Revoked {
                return Err(Rejection::conflict("the user is already revoked"));
            }
            value.status = UserStatus::Revoked;
            value.revocation = Some(*reason);
            event.actor = Some(user.clone());
            state.put(keys::user(user), &value);
            Ok(())
        }
        _ => unreachable!("dispatch routes only membership bodies here"),
    }
}

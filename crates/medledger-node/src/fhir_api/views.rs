//! FHIR resources built from the ledger: Consent (grants), AuditEvent (access entries),
//! Provenance (the record index), Practitioner and Organization (the member registry), and
//! the CapabilityStatement.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use medledger_core::hash::Hash;
use medledger_core::identity::{is_patient_pseudonym, split_user_id, Role};
use medledger_core::model::{
    AccessDecision, Action, AuditEvent, Category, Consent, Grantee, Org, Purpose, Record, Scope,
    User, RESOURCE_TYPES,
};
use medledger_core::state::keys;
use medledger_core::tx::TxBody;
use serde_json::{json, Value};

use super::{fhir_json, Caller, FhirResult, FhirState, Outcome};
use crate::auth::ScopeContext;
use crate::ledger::now_ms;
use crate::store::Snapshot;

/// Our own codes in OperationOutcome details.
pub const ERROR_CODE_SYSTEM: &str = "https://medledger.dev/fhir/CodeSystem/error";
const CATEGORY_SYSTEM: &str = "https://medledger.dev/fhir/CodeSystem/consent-category";
const RESOURCE_TYPE_SYSTEM: &str = "http://hl7.org/fhir/resource-types";
const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
const CONSENT_ACTION: &str = "http://terminology.hl7.org/CodeSystem/consentaction";
const PROOF_EXTENSION: &str = "https://medledger.dev/fhir/StructureDefinition/inclusion-proof";
const LEDGER_EXTENSION: &str = "https://medledger.dev/fhir/StructureDefinition/ledger-position";
/// What a consent covers when it names no class: every category but the financial.
pub const CLINICAL_CATEGORIES: [Category; 6] = [
    Category::Conditions,
    Category::Diagnostics,
    Category::Medications,
    Category::Documents,
    Category::Encounters,
    Category::Demographics,
];
/// Most AuditEvents one search returns.
const AUDIT_PAGE_MAX: usize = 200;

/// A user `name@org` as a FHIR id (`@` is not allowed in one): `org.name`.
pub fn practitioner_id(user: &str) -> String {
    match split_user_id(user) {
        Some((org, name)) => format!("{org}.{name}"),
        None => user.to_string(),
    }
}

/// The user a Practitioner id names.
fn user_of_practitioner(id: &str) -> Option<String> {
    let (org, name) = id.split_once('.')?;
    Some(format!("{name}@{org}"))
}

pub use crate::auth::percent_encode;

/// Milliseconds since the epoch as a FHIR instant (UTC, milliseconds).
pub fn instant(ms: u64) -> String {
    let (date, rest) = civil_from_ms(ms);
    let secs = rest / 1000;
    format!(
        "{date}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        rest % 1000
    )
}

/// The date part and the milliseconds into that day.
fn civil_from_ms(ms: u64) -> (String, u64) {
    let days = (ms / 86_400_000) as i64;
    let rest = ms % 86_400_000;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (format!("{year:04}-{month:02}-{day:02}"), rest)
}

/// An HTTP date (RFC 9110 IMF-fixdate) for a FHIR instant the server wrote (UTC).
pub fn http_date(instant: &str) -> Option<String> {
    let (date, time) = instant.split_once('T')?;
    let mut parts = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (parts.next()??, parts.next()??, parts.next()??);
    let time = time.get(..8)?;
    // Day of the week from the civil date (Zeller-like, via days since the epoch).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = month;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let month_name = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .get(usize::try_from(month - 1).ok()?)?;
    Some(format!(
        "{weekday}, {day:02} {month_name} {year:04} {time} GMT"
    ))
}

fn value<T: serde::de::DeserializeOwned>(
    snapshot: &Snapshot,
    key: &str,
) -> Result<Option<T>, Outcome> {
    Ok(snapshot.value(key)?)
}

fn purpose_code(purpose: Purpose) -> &'static str {
    match purpose {
        Purpose::Treatment => "TREAT",
        Purpose::Emergency => "ETREAT",
        Purpose::Payment => "HPAYMT",
        Purpose::Operations => "HOPERAT",
        Purpose::Research => "HRESCH",
        Purpose::PatientRequest => "PATRQT",
    }
}

fn purpose_of_code(code: &str) -> Option<Purpose> {
    Some(match code {
        "TREAT" => Purpose::Treatment,
        "ETREAT" => Purpose::Emergency,
        "HPAYMT" => Purpose::Payment,
        "HOPERAT" => Purpose::Operations,
        "HRESCH" => Purpose::Research,
        "PATRQT" => Purpose::PatientRequest,
        _ => return None,
    })
}

fn category_code(category: Category) -> String {
    serde_json::to_value(category)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

// ---- Consent ----------------------------------------------------------------------------------

/// A ledger consent as an R4 Consent.
pub fn consent_resource(consent: &Consent, now_ms: u64) -> Value {
    let active =
        consent.revoked_at_ms.is_none() && consent.expires_at_ms.is_none_or(|end| end > now_ms);
    let actor = match &consent.grantee {
        Grantee::User { user } => json!([{
            "role": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP" }] },
            "reference": { "reference": format!("Practitioner/{}", practitioner_id(user)) },
        }]),
        Grantee::Org { org } => json!([{
            "role": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP" }] },
            "reference": { "reference": format!("Organization/{org}") },
        }]),
        Grantee::Role { org, role } => json!([{
            "role": { "coding": [{ "system": "https://medledger.dev/fhir/CodeSystem/role", "code": role.as_str() }] },
            "reference": { "reference": format!("Organization/{org}") },
        }]),
    };
    let mut actions = Vec::new();
    if consent
        .actions
        .iter()
        .any(|a| matches!(a, Action::Read | Action::Search))
    {
        actions.push(json!({ "coding": [{ "system": CONSENT_ACTION, "code": "access" }] }));
    }
    if consent.actions.contains(&Action::Write) {
        actions.push(json!({ "coding": [{ "system": CONSENT_ACTION, "code": "correct" }] }));
    }
    let mut class: Vec<Value> = consent
        .scope
        .resource_types
        .iter()
        .map(|t| json!({ "system": RESOURCE_TYPE_SYSTEM, "code": t }))
        .collect();
    class.extend(
        consent
            .scope
            .categories
            .iter()
            .map(|c| json!({ "system": CATEGORY_SYSTEM, "code": category_code(*c) })),
    );
    let mut period = json!({ "start": instant(consent.granted_at_ms) });
    if let Some(end) = consent.revoked_at_ms.or(consent.expires_at_ms) {
        period["end"] = json!(instant(end));
    }
    json!({
        "resourceType": "Consent",
        "id": consent.id.to_hex(),
        "meta": { "versionId": if consent.revoked_at_ms.is_some() { "2" } else { "1" } },
        "status": if active { "active" } else { "inactive" },
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": "http://loinc.org", "code": "59284-0" }] }],
        "patient": { "reference": format!("Patient/{}", consent.patient) },
        "dateTime": instant(consent.granted_at_ms),
        "policyRule": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN" }] },
        "provision": {
            "type": "permit",
            "period": period,
            "actor": actor,
            "action": actions,
            "purpose": consent.purposes.iter().map(|p| json!({ "system": ACT_REASON, "code": purpose_code(*p) })).collect::<Vec<_>>(),
            "class": class,
        },
    })
}

/// Reads a Consent's provision into a grant. Everything the ledger cannot express is
/// refused rather than dropped: a consent must mean exactly what the patient signed.
fn grant_of(resource: &Value) -> Result<TxBody, Outcome> {
    let invalid = |text: &str| {
        Outcome::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            text.to_string(),
        )
        .detail("invalid_consent")
    };
    let provision = resource
        .get("provision")
        .ok_or_else(|| invalid("a Consent names its provision"))?;
    if provision
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("permit")
        != "permit"
    {
        return Err(invalid("only permit provisions are supported"));
    }
    if provision.get("provision").is_some() {
        return Err(invalid("nested provisions are not supported"));
    }
    let actors = provision
        .get("actor")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 1)
        .ok_or_else(|| invalid("the provision names exactly one actor"))?;
    let reference = actors[0]
        .pointer("/reference/reference")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("the actor has a reference"))?;
    let role_code = actors[0]
        .pointer("/role/coding/0/code")
        .and_then(Value::as_str);
    let grantee = if let Some(id) = reference.strip_prefix("Practitioner/") {
        Grantee::User {
            user: user_of_practitioner(id)
                .ok_or_else(|| invalid("the Practitioner id is org.name"))?,
        }
    } else if let Some(org) = reference.strip_prefix("Organization/") {
        match role_code.map(|c| c.parse::<Role>()) {
            Some(Ok(role)) => Grantee::Role {
                org: org.to_string(),
                role,
            },
            _ => Grantee::Org {
                org: org.to_string(),
            },
        }
    } else {
        return Err(invalid(
            "the actor is a Practitioner or an Organization of the consortium",
        ));
    };
    let mut actions = Vec::new();
    for action in provision
        .get("action")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("the provision names its actions"))?
    {
        match action.pointer("/coding/0/code").and_then(Value::as_str) {
            Some("access") | Some("use") => {
                actions.extend([Action::Read, Action::Search]);
            }
            Some("correct") | Some("collect") => actions.push(Action::Write),
            _ => return Err(invalid("actions are access, use, correct or collect")),
        }
    }
    actions.sort();
    actions.dedup();
    let mut purposes = Vec::new();
    for purpose in provision
        .get("purpose")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        let code = purpose.get("code").and_then(Value::as_str).unwrap_or("");
        purposes
            .push(purpose_of_code(code).ok_or_else(|| invalid("an unsupported purpose of use"))?);
    }
    if purposes.is_empty() {
        purposes.push(Purpose::Treatment);
    }
    let mut scope = Scope {
        resource_types: Vec::new(),
        categories: Vec::new(),
    };
    for class in provision
        .get("class")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        let code = class.get("code").and_then(Value::as_str).unwrap_or("");
        match class.get("system").and_then(Value::as_str) {
            Some(RESOURCE_TYPE_SYSTEM) => scope.resource_types.push(code.to_string()),
            Some(CATEGORY_SYSTEM) => scope.categories.push(
                serde_json::from_value::<Category>(json!(code))
                    .map_err(|_| invalid("an unknown category"))?,
            ),
            _ => {
                return Err(invalid(
                    "a class is a resource type or one of our categories",
                ))
            }
        }
    }
    if scope.resource_types.is_empty() && scope.categories.is_empty() {
        // No class: every clinical category, as FHIR reads an unrestricted provision.
        scope.categories = CLINICAL_CATEGORIES.to_vec();
    }
    let expires_at_ms = match provision.pointer("/period/end").and_then(Value::as_str) {
        None => None,
        Some(end) => Some(
            crate::fhir_search::DateRange::parse(end)
                .and_then(|range| u64::try_from(range.start_ms).ok())
                .ok_or_else(|| invalid("provision.period.end is not a dateTime"))?,
        ),
    };
    Ok(TxBody::Grant {
        grantee,
        scope,
        actions,
        purposes,
        expires_at_ms,
    })
}

/// A patient's active Consent is a grant they sign.
pub async fn create_consent(state: &FhirState, caller: &Caller, resource: Value) -> FhirResult {
    let patient = resource
        .pointer("/patient/reference")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("Patient/"))
        .ok_or_else(|| {
            Outcome::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "processing",
                "a Consent names its patient",
            )
        })?;
    if caller.context != ScopeContext::Patient || caller.actor != patient {
        return Err(Outcome::forbidden(
            "a consent is granted by its patient, signed with their own key",
        )
        .detail("patient_only"));
    }
    if resource.get("status").and_then(Value::as_str) != Some("active") {
        return Err(Outcome::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            "a new Consent is active (a grant); end one by setting it inactive",
        ));
    }
    let body = grant_of(&resource)?;
    let committed = state.submit_for(caller, body).await?;
    let snapshot = state.snapshot()?;
    let consent: Consent = value(&snapshot, &keys::consent(&committed.tx_id))?
        .ok_or_else(|| Outcome::internal("the grant committed without its consent"))?;
    let resource = consent_resource(&consent, now_ms());
    let mut response = fhir_json(StatusCode::CREATED, &resource);
    if let Ok(location) = axum::http::HeaderValue::from_str(&format!(
        "{}/Consent/{}/_history/1",
        state.config.base_url,
        consent.id.to_hex()
    )) {
        response
            .headers_mut()
            .insert(axum::http::header::LOCATION, location);
    }
    Ok(response)
}

/// Setting a Consent inactive revokes the grant; nothing else about it may change.
pub async fn update_consent(
    state: &FhirState,
    caller: &Caller,
    id: &str,
    resource: Value,
) -> FhirResult {
    let grant_id = Hash::from_hex(id).map_err(|_| Outcome::not_found("no such Consent"))?;
    let snapshot = state.snapshot()?;
    let consent: Consent = value(&snapshot, &keys::consent(&grant_id))?
        .ok_or_else(|| Outcome::not_found("no such Consent"))?;
    if caller.context != ScopeContext::Patient || caller.actor != consent.patient {
        return Err(
            Outcome::forbidden("only the patient changes their consent").detail("patient_only")
        );
    }
    match resource.get("status").and_then(Value::as_str) {
        Some("inactive") | Some("rejected") => {}
        Some("active") if consent.revoked_at_ms.is_none() => {
            return Ok(fhir_json(
                StatusCode::OK,
                &consent_resource(&consent, now_ms()),
            ))
        }
        _ => {
            return Err(Outcome::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "processing",
                "a Consent's only change is to inactive (a revoke); grant anew for other terms",
            ))
        }
    }
    if consent.revoked_at_ms.is_none() {
        state
            .submit_for(caller, TxBody::Revoke { grant_id })
            .await?;
    }
    let consent: Consent = value(&state.snapshot()?, &keys::consent(&grant_id))?
        .ok_or_else(|| Outcome::internal("the consent vanished"))?;
    Ok(fhir_json(
        StatusCode::OK,
        &consent_resource(&consent, now_ms()),
    ))
}

// ---- reads and searches of ledger types ---------------------------------------------------------

/// May the caller see this patient's ledger entries (consents, audit trail)? The patient
/// themselves, and the consortium's auditors and organisation admins.
fn may_see_patient_ledger(
    snapshot: &Snapshot,
    caller: &Caller,
    patient: &str,
) -> Result<(), Outcome> {
    if caller.actor == patient {
        return Ok(());
    }
    if caller.context == ScopeContext::Patient {
        return Err(
            Outcome::forbidden("a patient sees only their own entries").detail("wrong_patient")
        );
    }
    let user: Option<User> = value(snapshot, &keys::user(&caller.actor))?;
    match user.map(|u| u.role) {
        Some(Role::Auditor) | Some(Role::OrgAdmin) => Ok(()),
        _ => Err(Outcome::forbidden(
            "a patient's consents and audit trail are theirs, their auditors' and admins'",
        )
        .detail("role_not_permitted")),
    }
}

pub fn read(
    state: &FhirState,
    caller: &Caller,
    resource_type: &str,
    id: &str,
) -> Result<Value, Outcome> {
    let snapshot = state.snapshot()?;
    match resource_type {
        "Practitioner" => {
            let user_id = user_of_practitioner(id)
                .ok_or_else(|| Outcome::not_found("no such Practitioner"))?;
            let user: User = value(&snapshot, &keys::user(&user_id))?
                .ok_or_else(|| Outcome::not_found("no such Practitioner"))?;
            Ok(practitioner(&user))
        }
        "Organization" => {
            let org: Org = value(&snapshot, &keys::org(id))?
                .ok_or_else(|| Outcome::not_found("no such Organization"))?;
            Ok(organization(&org))
        }
        "Consent" => {
            let grant_id = Hash::from_hex(id).map_err(|_| Outcome::not_found("no such Consent"))?;
            let consent: Consent = value(&snapshot, &keys::consent(&grant_id))?
                .ok_or_else(|| Outcome::not_found("no such Consent"))?;
            may_see_patient_ledger(&snapshot, caller, &consent.patient)?;
            Ok(consent_resource(&consent, now_ms()))
        }
        "AuditEvent" => {
            let leaf: u64 = id
                .parse()
                .map_err(|_| Outcome::not_found("no such AuditEvent"))?;
            let event: AuditEvent = value(&snapshot, &keys::event(leaf))?
                .ok_or_else(|| Outcome::not_found("no such AuditEvent"))?;
            let Some(patient) = event.patient.clone() else {
                return Err(Outcome::not_found("no such AuditEvent"));
            };
            may_see_patient_ledger(&snapshot, caller, &patient)?;
            Ok(audit_event(state, &event))
        }
        _ => Err(Outcome::not_supported(format!(
            "read {resource_type} by id"
        ))),
    }
}

pub async fn search(
    state: &FhirState,
    caller: &Caller,
    resource_type: &str,
    pairs: &[(String, String)],
) -> Result<Value, Outcome> {
    let snapshot = state.snapshot()?;
    let mut patient: Option<String> = caller.patient.clone();
    let mut target: Option<String> = None;
    let mut count = 50usize;
    for (name, raw) in pairs {
        match name.as_str() {
            "patient" | "subject" => {
                let id = raw.rsplit("Patient/").next().unwrap_or(raw).to_string();
                caller.require_patient(&id)?;
                patient = Some(id);
            }
            "target" if resource_type == "Provenance" => target = Some(raw.clone()),
            "_count" => {
                count = raw
                    .parse::<usize>()
                    .map_err(|_| Outcome::bad_request("_count is a number"))?
                    .min(AUDIT_PAGE_MAX)
            }
            "_format" => {}
            other => {
                return Err(Outcome::bad_request(format!(
                    "{resource_type} is searched by patient{} only, not {other:?}",
                    if resource_type == "Provenance" {
                        " or target"
                    } else {
                        ""
                    }
                ))
                .detail("invalid_search"))
            }
        }
    }
    let entries: Vec<Value> = match resource_type {
        "Consent" => {
            let patient =
                patient.ok_or_else(|| Outcome::bad_request("Consent is searched by patient"))?;
            may_see_patient_ledger(&snapshot, caller, &patient)?;
            let prefix = keys::patient_consent_prefix(&patient);
            let mut out = Vec::new();
            for (key, _) in snapshot.scan(&prefix, None, 1024)? {
                let Ok(id) = Hash::from_hex(&key[prefix.len()..]) else {
                    continue;
                };
                if let Some(consent) = value::<Consent>(&snapshot, &keys::consent(&id))? {
                    out.push(consent_resource(&consent, now_ms()));
                }
            }
            out.truncate(count);
            out
        }
        "AuditEvent" => {
            let patient =
                patient.ok_or_else(|| Outcome::bad_request("AuditEvent is searched by patient"))?;
            may_see_patient_ledger(&snapshot, caller, &patient)?;
            let prefix = keys::event_by_patient_prefix(&patient);
            let mut leaves = Vec::new();
            snapshot.visit_keys(&prefix, |key| -> Result<(), Outcome> {
                // The index key ends in the entry's place in the log, 16 hex digits.
                if let Ok(leaf) = u64::from_str_radix(&key[prefix.len()..], 16) {
                    leaves.push(leaf);
                }
                Ok(())
            })?;
            leaves.sort_unstable_by(|a, b| b.cmp(a));
            let mut out = Vec::new();
            for leaf in leaves.into_iter().take(count) {
                if let Some(event) = value::<AuditEvent>(&snapshot, &keys::event(leaf))? {
                    out.push(audit_event(state, &event));
                }
            }
            out
        }
        "Provenance" => {
            let target = target
                .ok_or_else(|| Outcome::bad_request("Provenance is searched by target=Type/id"))?;
            let (resource_type, id) = target
                .rsplit_once('/')
                .map(|(t, id)| (t.rsplit('/').next().unwrap_or(t), id))
                .ok_or_else(|| Outcome::bad_request("target is Type/id"))?;
            let custodian = crate::records::service::custodian_of(id, state.records.org());
            let record: Record = value::<Record>(&snapshot, &keys::record(custodian, id))?
                .filter(|r| r.resource_type == resource_type)
                .ok_or_else(|| Outcome::not_found(format!("{resource_type}/{id} is not known")))?;
            caller.require_patient(&record.patient)?;
            record
                .versions
                .iter()
                .rev()
                .take(count)
                .map(|v| provenance(state, &record, v))
                .collect::<Result<Vec<_>, _>>()?
        }
        "Practitioner" | "Organization" => {
            return Err(Outcome::not_supported(format!(
                "{resource_type} is read by id; the member registry is not searchable here"
            )))
        }
        other => return Err(Outcome::not_supported(format!("search {other}"))),
    };
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|resource| super::resources::entry(state, resource, "match"))
        .collect();
    Ok(json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": entries.len(),
        "entry": entries,
    }))
}

fn practitioner(user: &User) -> Value {
    let (org, name) = split_user_id(&user.id).unwrap_or(("", &user.id));
    json!({
        "resourceType": "Practitioner",
        "id": practitioner_id(&user.id),
        "identifier": [{ "system": "https://medledger.dev/fhir/user", "value": user.id }],
        "active": matches!(user.status, medledger_core::model::UserStatus::Active),
        "name": [{ "text": name }],
        "qualification": [{
            "code": { "coding": [{ "system": "https://medledger.dev/fhir/CodeSystem/role", "code": user.role.as_str() }] },
            "issuer": { "reference": format!("Organization/{org}") },
        }],
    })
}

fn organization(org: &Org) -> Value {
    json!({
        "resourceType": "Organization",
        "id": org.id,
        "identifier": [{ "system": "https://medledger.dev/fhir/org", "value": org.id }],
        "active": matches!(org.status, medledger_core::model::OrgStatus::Active),
        "type": [{ "coding": [{ "system": "https://medledger.dev/fhir/CodeSystem/org-kind", "code": serde_json::to_value(org.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default() }] }],
        "name": org.id,
    })
}

/// An access entry as an AuditEvent (after IHE Basic Audit Log Patterns): who, what,
/// why, the ledger's decision, and where its inclusion proof is.
fn audit_event(state: &FhirState, event: &AuditEvent) -> Value {
    let (outcome, description) = match (&event.decision, &event.rejected) {
        (_, Some(code)) => ("8", format!("rejected: {code}")),
        (Some(AccessDecision::Denied { denial }), None) => (
            "4",
            format!("denied: {}", crate::records::service::denial_code(denial)),
        ),
        (Some(AccessDecision::Granted { .. }), None) => ("0", "granted".to_string()),
        (None, None) => ("0", "committed".to_string()),
    };
    let (action, subtype) = match event.action {
        Some(Action::Read) => ("R", "read"),
        Some(Action::Search) => ("E", "search-type"),
        Some(Action::Write) => ("C", "create"),
        None if event.kind == "create_record" => ("C", "create"),
        None => ("E", "operation"),
    };
    let mut agents = Vec::new();
    if let Some(actor) = &event.actor {
        let who = if is_patient_pseudonym(actor) {
            format!("Patient/{actor}")
        } else {
            format!("Practitioner/{}", practitioner_id(actor))
        };
        agents.push(json!({
            "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type", "code": "humanuser" }] },
            "who": { "reference": who },
            "requestor": true,
        }));
    }
    agents.push(json!({
        "type": { "coding": [{ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110153", "display": "Source Role ID" }] },
        "who": { "identifier": { "system": "https://medledger.dev/fhir/user", "value": event.signer } },
        "requestor": false,
    }));
    let mut entities = Vec::new();
    if let Some(patient) = &event.patient {
        entities.push(json!({
            "what": { "reference": format!("Patient/{patient}") },
            "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1" },
        }));
    }
    for record in &event.records {
        if let Some((_, id)) = record.split_once('/') {
            entities.push(json!({
                "what": { "identifier": { "system": "https://medledger.dev/fhir/record", "value": id } },
                "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4" },
            }));
        }
    }
    let mut resource = json!({
        "resourceType": "AuditEvent",
        "id": event.leaf_index.to_string(),
        "extension": [
            { "url": PROOF_EXTENSION, "valueUri": format!("{}/v1/proofs/inclusion?leaf_index={}", state.config.issuer, event.leaf_index) },
            { "url": LEDGER_EXTENSION, "valueString": format!("height {} leaf {} tx {}", event.height, event.leaf_index, event.tx_id.to_hex()) },
        ],
        "type": { "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110", "display": "Patient Record" },
        "subtype": [{ "system": "http://hl7.org/fhir/restful-interaction", "code": subtype }],
        "action": action,
        "recorded": instant(event.time_ms),
        "outcome": outcome,
        "outcomeDesc": description,
        "agent": agents,
        "source": { "observer": { "identifier": { "value": event.signer } } },
    });
    if let Some(purpose) = event.purpose {
        resource["purposeOfEvent"] =
            json!([{ "coding": [{ "system": ACT_REASON, "code": purpose_code(purpose) }] }]);
    }
    if !entities.is_empty() {
        resource["entity"] = json!(entities);
    }
    resource
}

fn provenance(
    state: &FhirState,
    record: &Record,
    version: &medledger_core::model::RecordVersion,
) -> Result<Value, Outcome> {
    let recorded = state
        .ledger
        .store()
        .block(version.height)?
        .map(|block| instant(block.header.time_ms))
        .ok_or_else(|| Outcome::internal(format!("block {} is missing", version.height)))?;
    let mut resource = json!({
        "resourceType": "Provenance",
        "id": format!("{}-{}", version.tx_id.to_hex().get(..16).unwrap_or(""), version.version),
        "extension": [{ "url": LEDGER_EXTENSION, "valueString": format!("height {} tx {}", version.height, version.tx_id.to_hex()) }],
        "target": [{ "reference": format!("{}/{}/_history/{}", record.resource_type, record.record_id, version.version) }],
        "recorded": recorded,
        "agent": [{
            "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author" }] },
            "who": { "reference": format!("Practitioner/{}", practitioner_id(&version.author)) },
            "onBehalfOf": { "reference": format!("Organization/{}", record.custodian) },
        }],
        "signature": [{
            "type": [{ "system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1", "display": "Author's Signature" }],
            "when": recorded,
            "who": { "reference": format!("Practitioner/{}", practitioner_id(&version.author)) },
            "sigFormat": "application/octet-stream",
            "data": version.author_signature.to_base64url(),
        }],
        "entity": [{ "role": "source", "what": { "identifier": { "system": "urn:ietf:rfc:3986", "value": format!("cid:{}", version.cid) } } }],
    });
    if version.deleted {
        // FHIR's code for a deletion (v3 DataOperation DELETE) marks a tombstone.
        resource["activity"] = json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "DELETE" }] });
    }
    Ok(resource)
}

// ---- CapabilityStatement ------------------------------------------------------------------------

pub async fn capability_statement(State(state): State<Arc<FhirState>>) -> Response {
    let mut resources = Vec::new();
    for (resource_type, _) in RESOURCE_TYPES {
        let params: Vec<Value> = crate::fhir_search::search_parameters(resource_type)
            .into_iter()
            .map(|(name, ty, doc)| json!({ "name": name, "type": ty, "documentation": doc }))
            .collect();
        let mut operations = Vec::new();
        if resource_type == "Patient" {
            operations.push(json!({ "name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything" }));
        }
        let mut entry = json!({
            "type": resource_type,
            "versioning": "versioned-update",
            "readHistory": true,
            "updateCreate": true,
            "conditionalCreate": false,
            "conditionalUpdate": false,
            "conditionalDelete": "not-supported",
            "interaction": [
                { "code": "read" }, { "code": "vread" }, { "code": "update" },
                { "code": "delete", "documentation": "A delete adds a tombstone version signed by its author under the patient's consent to write; earlier versions stay readable by vread and in the history. A deleted resource reads 410 Gone and is left out of searches; an update recreates it." },
                { "code": "history-instance" },
                { "code": "history-type", "documentation": "One patient's versions of this type across custodians (patient=, or a patient token's own), newest first, with _since and _count." },
                { "code": "create" }, { "code": "search-type" }
            ],
            "searchInclude": [format!("{resource_type}:patient")],
            "searchParam": params,
        });
        if !operations.is_empty() {
            entry["operation"] = json!(operations);
        }
        resources.push(entry);
    }
    resources.push(json!({
        "type": "Consent",
        "interaction": [{ "code": "read" }, { "code": "create" }, { "code": "update" }, { "code": "search-type" }],
        "searchParam": [{ "name": "patient", "type": "reference" }],
        "documentation": "A Consent is a ledger grant signed by its patient; setting it inactive revokes it.",
    }));
    resources.push(json!({
        "type": "AuditEvent",
        "interaction": [{ "code": "read" }, { "code": "search-type" }],
        "searchParam": [{ "name": "patient", "type": "reference" }],
        "documentation": "Every ledger entry about a patient; each links to its Merkle inclusion proof.",
    }));
    resources.push(json!({
        "type": "Provenance",
        "interaction": [{ "code": "search-type" }],
        "searchParam": [{ "name": "target", "type": "reference" }],
    }));
    resources.push(json!({ "type": "Practitioner", "interaction": [{ "code": "read" }] }));
    resources.push(json!({ "type": "Organization", "interaction": [{ "code": "read" }] }));
    let statement = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": instant(now_ms()),
        "kind": "instance",
        "software": { "name": "medledger", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": format!("medledger node of {}", state.records.org()), "url": state.config.base_url },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "security": {
                "cors": false,
                "service": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR" }] }],
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [
                        { "url": "token", "valueUri": state.token_url() },
                        { "url": "authorize", "valueUri": state.authorize_url() },
                    ],
                }],
            },
            "resource": resources,
            "interaction": [
                { "code": "batch", "documentation": format!("POST /fhir with a batch Bundle of at most {} entries: reads, searches, history, $everything, creates, updates (ifMatch) and deletes of records, each on its own.", super::BATCH_ENTRIES_MAX) },
                { "code": "transaction", "documentation": format!("POST /fhir with a transaction Bundle: all or nothing, as one ledger transaction signed by the author. At most {} entries (what fits one 16 KiB ledger transaction), POST, PUT (ifMatch) and DELETE of record types only, every write about one patient, each record once; urn:uuid fullUrls of created entries are rewritten in the others' references. No reads (use a batch), no Patient creation (it takes the patient's own signatures), no conditional interactions.", super::TRANSACTION_ENTRIES_MAX) }
            ],
        }],
    });
    fhir_json(StatusCode::OK, &statement)
}

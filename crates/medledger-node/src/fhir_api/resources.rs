//! The FHIR interactions on records: create, read, vread, update, history, search and
//! `$everything`, and the ledger-backed types (Consent, AuditEvent, Provenance,
//! Practitioner, Organization) routed to `views`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use medledger_core::contracts::{Rejection, AUTHOR_ROLES};
use medledger_core::model::{category_of, Grantee, Purpose, Record, Scope};
use medledger_core::state::keys;
use medledger_core::tx::TxBody;
use serde_json::{json, Value};

use super::{
    authenticate, fhir_json, query_pairs, views, Caller, FhirResult, FhirState, Outcome, TypeAndId,
    SEARCH_PAGE_DEFAULT, SEARCH_PAGE_MAX,
};
use crate::auth::Interaction;
use crate::consortium::Identity;
use crate::fhir_search::{self, SearchParams};
use crate::records::service::{custodian_of, OpenedVersion, PrepareRequest, Prepared, ReadRequest};

/// Types served from the ledger rather than from records.
const LEDGER_TYPES: [&str; 5] = [
    "Consent",
    "AuditEvent",
    "Provenance",
    "Practitioner",
    "Organization",
];

pub(super) fn is_record_type(resource_type: &str) -> bool {
    category_of(resource_type).is_some()
}

pub(super) fn check_type(resource_type: &str) -> Result<(), Outcome> {
    if is_record_type(resource_type) || LEDGER_TYPES.contains(&resource_type) {
        Ok(())
    } else {
        Err(Outcome::not_found(format!(
            "{resource_type:?} is not a resource type this server supports"
        ))
        .detail("unsupported_type"))
    }
}

/// Every handler's first steps: a type this server serves, a valid token, and scopes that
/// allow the interaction.
fn admit(
    state: &FhirState,
    headers: &HeaderMap,
    resource_type: &str,
    interaction: Interaction,
) -> Result<Caller, Outcome> {
    check_type(resource_type)?;
    let caller = authenticate(state, headers)?;
    caller.require(resource_type, interaction)?;
    Ok(caller)
}

/// The version a FHIR `ETag` or `If-Match` names: `W/"3"` or `"3"`.
pub(super) fn etag_version(value: &str) -> Option<u64> {
    let value = value.trim();
    let value = value.strip_prefix("W/").unwrap_or(value);
    value.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
}

/// A resource answer with its ETag, Last-Modified and Location headers.
fn resource_response(
    state: &FhirState,
    status: StatusCode,
    resource_type: &str,
    resource: &Value,
) -> Response {
    let mut response = fhir_json(status, resource);
    let headers = response.headers_mut();
    set_version_headers(headers, resource);
    let id = resource.get("id").and_then(Value::as_str).unwrap_or("");
    if let Some(version) = resource.pointer("/meta/versionId").and_then(Value::as_str) {
        if status == StatusCode::CREATED {
            let location = format!(
                "{}/{resource_type}/{id}/_history/{version}",
                state.config.base_url
            );
            if let Ok(value) = HeaderValue::from_str(&location) {
                headers.insert(header::LOCATION, value.clone());
                headers.insert(header::CONTENT_LOCATION, value);
            }
        }
    }
    response
}

/// ETag and Last-Modified from a resource's (or a tombstone's) `meta`.
fn set_version_headers(headers: &mut HeaderMap, resource: &Value) {
    if let Some(version) = resource.pointer("/meta/versionId").and_then(Value::as_str) {
        if let Ok(value) = HeaderValue::from_str(&format!("W/\"{version}\"")) {
            headers.insert(header::ETAG, value);
        }
    }
    if let Some(updated) = resource
        .pointer("/meta/lastUpdated")
        .and_then(Value::as_str)
        .and_then(views::http_date)
    {
        if let Ok(value) = HeaderValue::from_str(&updated) {
            headers.insert(header::LAST_MODIFIED, value);
        }
    }
}

/// A request's body: 413 over the API's limit, 400 when it could not be read.
pub(super) fn request_body(body: &Result<Bytes, BytesRejection>) -> Result<&Bytes, Outcome> {
    match body {
        Ok(body) => Ok(body),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(Outcome::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-long",
            format!(
                "a request body is at most {} bytes",
                super::FHIR_BODY_BYTES_MAX
            ),
        )),
        Err(rejection) => Err(Outcome::bad_request(rejection.body_text())),
    }
}

/// The JSON body of a create or update: 413 over the limits, 400 when it is not JSON or
/// not the type the URL names.
pub(super) fn parse_body(
    resource_type: &str,
    body: &Result<Bytes, BytesRejection>,
) -> Result<Value, Outcome> {
    let body = request_body(body)?;
    if body.len() > crate::fhir::RESOURCE_BYTES_MAX {
        return Err(Outcome::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-long",
            format!(
                "a resource is at most {} bytes",
                crate::fhir::RESOURCE_BYTES_MAX
            ),
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Outcome::bad_request(format!("the body is not JSON: {e}")))?;
    match value.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == resource_type => Ok(value),
        Some(other) => Err(Outcome::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("the body is a {other}, the URL names {resource_type}"),
        )),
        None => Err(Outcome::bad_request("the body has no resourceType")),
    }
}

/// Where a record lives: the custodian a FHIR id names (a Patient is looked up by its
/// pseudonym, preferring this node's copy).
fn locate(state: &FhirState, resource_type: &str, id: &str) -> Result<(String, Record), Outcome> {
    let snapshot = state.snapshot()?;
    let not_found = || Outcome::not_found(format!("{resource_type}/{id} is not known"));
    let custodian = if resource_type == "Patient" {
        let local = state.records.org().to_string();
        if snapshot
            .value::<Record>(&keys::record(&local, id))?
            .is_some()
        {
            local
        } else {
            let prefix = keys::patient_records_prefix(id);
            let mut found = None;
            for (key, _) in snapshot.scan(&prefix, None, 1000)? {
                if let Some((custodian, record_id)) = key[prefix.len()..].split_once('/') {
                    if record_id == id {
                        found = Some(custodian.to_string());
                        break;
                    }
                }
            }
            found.ok_or_else(not_found)?
        }
    } else {
        custodian_of(id, state.records.org()).to_string()
    };
    let record: Record = snapshot
        .value(&keys::record(&custodian, id))?
        .ok_or_else(not_found)?;
    if record.resource_type != resource_type {
        return Err(not_found());
    }
    Ok((custodian, record))
}

// ---- create and update ------------------------------------------------------------------------

pub async fn create(
    State(state): State<Arc<FhirState>>,
    Path(resource_type): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> FhirResult {
    let caller = admit(&state, &headers, &resource_type, Interaction::Create)?;
    let resource = parse_body(&resource_type, &body)?;
    if resource_type == "Consent" {
        return views::create_consent(&state, &caller, resource).await;
    }
    let reply = create_record(&state, &caller, &resource_type, resource).await?;
    Ok(reply.into_response(&state, &resource_type))
}

/// A new record: the server assigns its id (a Patient's is a newly registered patient's
/// pseudonym) and version 1, seals it here and indexes it under the caller's signature.
pub(super) async fn create_record(
    state: &FhirState,
    caller: &Caller,
    resource_type: &str,
    mut resource: Value,
) -> Result<Reply, Outcome> {
    if !is_record_type(resource_type) {
        return Err(Outcome::not_supported(format!(
            "{resource_type} resources come from the ledger and cannot be created here"
        )));
    }
    strip_identity(&mut resource);
    if resource_type == "Patient" {
        return create_patient(state, caller, resource).await;
    }
    let stored = write_version(state, caller, resource, None).await?;
    Ok(Reply::Resource(StatusCode::CREATED, stored))
}

/// A Patient created through the API: a new patient, whose key pair this node keeps in its
/// `patients/` folder (0600), registered on the ledger (`register_patient`), then the
/// resource stored under the patient's pseudonym.
///
/// The resource is checked before anything is registered, so a Patient that would be
/// refused leaves no patient behind. A failure after that (the ledger stopped answering,
/// say) keeps the key file and says so: a PUT of the resource to `Patient/{id}` finishes
/// the creation (`finish_patient`, before the update), where a retried POST would make a
/// second patient.
async fn create_patient(
    state: &FhirState,
    caller: &Caller,
    mut resource: Value,
) -> Result<Reply, Outcome> {
    let org = registering_org(caller)?;
    require_author(state, caller)?;
    let identity = Identity::new_patient().map_err(|e| Outcome::internal(e.to_string()))?;
    resource["id"] = json!(identity.id);
    let bytes = serde_json::to_vec(&resource).map_err(|e| Outcome::bad_request(e.to_string()))?;
    crate::fhir::check_resource(&bytes)
        .map_err(|e| Outcome::from(crate::records::RecordError::from(e)))?;
    let dir = patients_dir(state);
    std::fs::create_dir_all(&dir).map_err(|e| Outcome::internal(e.to_string()))?;
    identity
        .save(&dir.join(format!("{}.json", identity.id)))
        .map_err(|e| Outcome::internal(e.to_string()))?;
    let created = async {
        register_patient(state, &identity, org).await?;
        write_version(state, caller, resource, None).await
    };
    match created.await {
        Ok(stored) => Ok(Reply::Resource(StatusCode::CREATED, stored)),
        Err(mut outcome) => {
            outcome.diagnostics = format!(
                "{}; the creation of Patient/{id} did not finish: PUT the resource to \
                 Patient/{id} to finish it",
                outcome.diagnostics,
                id = identity.id
            );
            Err(outcome)
        }
    }
}

/// A Patient is a record its creator authors: a caller whose role may not author (the
/// ledger would refuse the version) is refused before any patient is registered.
fn require_author(state: &FhirState, caller: &Caller) -> Result<(), Outcome> {
    let author = state
        .snapshot()?
        .value::<medledger_core::model::User>(&keys::user(&caller.actor))?;
    if author.is_some_and(|user| AUTHOR_ROLES.contains(&user.role)) {
        return Ok(());
    }
    let roles: Vec<&str> = AUTHOR_ROLES.iter().map(|role| role.as_str()).collect();
    Err(super::rejected(&Rejection::NotPermitted {
        detail: format!(
            "a Patient is a record its creator authors: requires a member with role {}",
            roles.join(" or ")
        ),
    }))
}

/// Where this node keeps the key files of patients created through the API.
fn patients_dir(state: &FhirState) -> std::path::PathBuf {
    state.config.data_dir.join("patients")
}

/// The organisation of a member's user, who alone registers patients.
fn registering_org(caller: &Caller) -> Result<&str, Outcome> {
    medledger_core::identity::split_user_id(&caller.actor)
        .map(|(org, _)| org)
        .ok_or_else(|| Outcome::forbidden("only a member's user registers patients"))
}

/// The server assigns the id and version of a created resource.
pub(super) fn strip_identity(resource: &mut Value) {
    if let Some(object) = resource.as_object_mut() {
        object.remove("id");
        object.remove("meta");
    }
}

pub async fn update(
    State(state): State<Arc<FhirState>>,
    Path((resource_type, id)): TypeAndId,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> FhirResult {
    let caller = admit(&state, &headers, &resource_type, Interaction::Update)?;
    let resource = parse_body(&resource_type, &body)?;
    match resource.get("id").and_then(Value::as_str) {
        Some(own) if own == id => {}
        Some(_) => {
            return Err(Outcome::bad_request(
                "the resource's id differs from the id in the URL",
            ))
        }
        None => return Err(Outcome::bad_request("an update carries the resource's id")),
    }
    if resource_type == "Consent" {
        return views::update_consent(&state, &caller, &id, resource).await;
    }
    if !is_record_type(&resource_type) {
        return Err(Outcome::not_supported(format!(
            "{resource_type} resources come from the ledger and cannot be changed here"
        )));
    }
    let expected = if_match(&headers)?;
    let reply = update_record(&state, &caller, &resource_type, &id, resource, expected).await?;
    Ok(reply.into_response(&state, &resource_type))
}

/// An update of a record kept here (or its creation under the client's id): 200 for a new
/// version of a live resource, 201 when it creates or recreates a deleted one.
pub(super) async fn update_record(
    state: &FhirState,
    caller: &Caller,
    resource_type: &str,
    id: &str,
    resource: Value,
    expected: Option<u64>,
) -> Result<Reply, Outcome> {
    if resource_type == "Patient" && unfinished_patient(state, id)? {
        finish_patient(state, caller, id).await?;
    }
    let (prepared, status) =
        prepare_update(state, caller, resource_type, id, resource, expected).await?;
    state.submit_for(caller, prepared.body).await?;
    Ok(Reply::Resource(status, prepared.resource))
}

/// Everything an update checks (custodian, If-Match, the resource, the patient), then the
/// sealed version waiting for its signature, and the status its success answers.
pub(super) async fn prepare_update(
    state: &FhirState,
    caller: &Caller,
    resource_type: &str,
    id: &str,
    resource: Value,
    expected: Option<u64>,
) -> Result<(Prepared, StatusCode), Outcome> {
    if !is_record_type(resource_type) {
        return Err(Outcome::not_supported(format!(
            "{resource_type} resources come from the ledger and cannot be changed here"
        )));
    }
    let custodian = writable_here(state, resource_type, id)?;
    let current = state
        .snapshot()?
        .value::<Record>(&keys::record(&custodian, id))?
        .and_then(|r| r.versions.last().map(|v| (v.version, v.deleted)));
    check_if_match(expected, current.map(|(version, _)| version))?;
    let prepared = prepare_write(state, caller, resource, Some(id.to_string())).await?;
    let status = match current {
        Some((_, false)) => StatusCode::OK,
        Some((_, true)) | None => StatusCode::CREATED,
    };
    Ok((prepared, status))
}

pub async fn delete(
    State(state): State<Arc<FhirState>>,
    Path((resource_type, id)): TypeAndId,
    headers: HeaderMap,
) -> FhirResult {
    let caller = admit(&state, &headers, &resource_type, Interaction::Delete)?;
    let expected = if_match(&headers)?;
    let reply = delete_resource(&state, &caller, &resource_type, &id, expected).await?;
    Ok(reply.into_response(&state, &resource_type))
}

/// What a write (or a delete) produced, for an HTTP response or a Bundle entry.
pub(super) enum Reply {
    /// A resource as stored, with the status to answer (its `meta` names the version).
    Resource(StatusCode, Value),
    /// A deletion. `stub` is the tombstone (`fhir::tombstone`): its `meta` names the
    /// tombstone's version and time. `already` when the resource was deleted before.
    Deleted { stub: Value, already: bool },
}

impl Reply {
    pub(super) fn into_response(self, state: &FhirState, resource_type: &str) -> Response {
        match self {
            Reply::Resource(status, resource) => {
                resource_response(state, status, resource_type, &resource)
            }
            Reply::Deleted { stub, already } => {
                let mut response = fhir_json(StatusCode::OK, &deletion_outcome(&stub, already));
                set_version_headers(response.headers_mut(), &stub);
                response
            }
        }
    }
}

/// The OperationOutcome a delete answers with (severity information).
pub(super) fn deletion_outcome(stub: &Value, already: bool) -> Value {
    let name = format!(
        "{}/{}",
        stub.get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or(""),
        stub.get("id").and_then(Value::as_str).unwrap_or("")
    );
    let version = stub
        .pointer("/meta/versionId")
        .and_then(Value::as_str)
        .unwrap_or("");
    let text = if already {
        format!("{name} was already deleted; version {version} is its tombstone")
    } else {
        format!("{name} deleted; version {version} is its tombstone, earlier versions stay in its history")
    };
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": "information", "code": "informational", "diagnostics": text }],
    })
}

/// The version an `If-Match` header names, if there is one; 400 when it is no ETag.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, Outcome> {
    match headers.get(header::IF_MATCH) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(etag_version)
            .map(Some)
            .ok_or_else(|| Outcome::bad_request("If-Match is not an ETag like W/\"2\"")),
    }
}

/// 412 unless the record's current version is `expected` (when an If-Match names one).
fn check_if_match(expected: Option<u64>, current: Option<u64>) -> Result<(), Outcome> {
    match expected {
        Some(expected) if current != Some(expected) => Err(Outcome::new(
            StatusCode::PRECONDITION_FAILED,
            "conflict",
            format!(
                "If-Match names version {expected}; the current version is {}",
                current.map_or("none".to_string(), |v| v.to_string())
            ),
        )
        .detail("version_conflict")),
        _ => Ok(()),
    }
}

/// The custodian that must write `resource_type/id`: this node, or 422 naming the one
/// that keeps it.
fn writable_here(state: &FhirState, resource_type: &str, id: &str) -> Result<String, Outcome> {
    let custodian = if resource_type == "Patient" {
        state.records.org().to_string()
    } else {
        custodian_of(id, state.records.org()).to_string()
    };
    if custodian != state.records.org() {
        return Err(Outcome::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
            format!("{resource_type}/{id} is kept by {custodian}: change it there"),
        )
        .detail("not_custodian"));
    }
    Ok(custodian)
}

/// 410 Gone for a tombstone: the ledger's index says so, nothing is fetched or decrypted.
fn gone(resource_type: &str, id: &str, version: u64) -> Outcome {
    Outcome::new(
        StatusCode::GONE,
        "deleted",
        format!("{resource_type}/{id} was deleted at version {version}"),
    )
    .detail("deleted")
}

/// Deletes a record kept at this custodian: its next version is a tombstone signed by the
/// caller under the same consent a write needs. Deleting a deleted record adds nothing.
pub(super) async fn delete_resource(
    state: &FhirState,
    caller: &Caller,
    resource_type: &str,
    id: &str,
    expected: Option<u64>,
) -> Result<Reply, Outcome> {
    if !is_record_type(resource_type) {
        return Err(Outcome::not_supported(format!(
            "{resource_type} resources come from the ledger and cannot be deleted{}",
            if resource_type == "Consent" {
                "; revoke a Consent by updating it to inactive"
            } else {
                ""
            }
        )));
    }
    let prepared = match prepare_delete(state, caller, resource_type, id, expected).await? {
        Err(already) => return Ok(already),
        Ok(prepared) => prepared,
    };
    state.submit_for(caller, prepared.body).await?;
    Ok(Reply::Deleted {
        stub: prepared.resource,
        already: false,
    })
}

/// Everything a delete checks, then the sealed tombstone waiting for its signature; or
/// Err(the reply) when the record is deleted already.
pub(super) async fn prepare_delete(
    state: &FhirState,
    caller: &Caller,
    resource_type: &str,
    id: &str,
    expected: Option<u64>,
) -> Result<Result<Prepared, Reply>, Outcome> {
    let custodian = writable_here(state, resource_type, id)?;
    let record = state
        .snapshot()?
        .value::<Record>(&keys::record(&custodian, id))?
        .filter(|r| r.resource_type == resource_type)
        .ok_or_else(|| Outcome::not_found(format!("{resource_type}/{id} is not known")))?;
    caller.require_patient(&record.patient)?;
    let last = record
        .versions
        .last()
        .ok_or_else(|| Outcome::internal("a record without versions"))?;
    check_if_match(expected, Some(last.version))?;
    if last.deleted {
        let time_ms = state
            .ledger
            .store()
            .block(last.height)?
            .map(|block| block.header.time_ms)
            .unwrap_or(0);
        return Ok(Err(Reply::Deleted {
            stub: crate::fhir::tombstone(resource_type, id, last.version, time_ms),
            already: true,
        }));
    }
    Ok(Ok(state.records.prepare_tombstone(id).await?))
}

/// Seals a version at this custodian and indexes it on the ledger under the caller's
/// signature. Returns the resource as stored.
async fn write_version(
    state: &FhirState,
    caller: &Caller,
    resource: Value,
    record_id: Option<String>,
) -> Result<Value, Outcome> {
    let prepared = prepare_write(state, caller, resource, record_id).await?;
    state.submit_for(caller, prepared.body).await?;
    Ok(prepared.resource)
}

/// Checks and seals a version at this custodian (`RecordService::prepare`); the caller
/// signs the returned body.
pub(super) async fn prepare_write(
    state: &FhirState,
    caller: &Caller,
    resource: Value,
    record_id: Option<String>,
) -> Result<Prepared, Outcome> {
    // A patient token may write only its own patient's records: that is checked before
    // anything is sealed. (`prepare` checks the resource itself, once, for everyone else.)
    if caller.patient.is_some() {
        let bytes =
            serde_json::to_vec(&resource).map_err(|e| Outcome::bad_request(e.to_string()))?;
        let checked = crate::fhir::check_resource(&bytes)
            .map_err(|e| Outcome::from(crate::records::RecordError::from(e)))?;
        caller.require_patient(&checked.patient)?;
    }
    Ok(state
        .records
        .prepare(PrepareRequest {
            resource,
            record_id,
            attachments: Vec::new(),
        })
        .await?)
}

/// Whether `id` names a Patient whose creation here did not finish: this node holds the
/// patient's key, and no Patient record is indexed here yet.
pub(super) fn unfinished_patient(state: &FhirState, id: &str) -> Result<bool, Outcome> {
    // Only a pseudonym names a key file: nothing else in the URL reaches the filesystem.
    if !medledger_core::identity::is_patient_pseudonym(id) {
        return Ok(false);
    }
    let indexed = state
        .snapshot()?
        .value::<Record>(&keys::record(state.records.org(), id))?
        .is_some();
    Ok(!indexed && patients_dir(state).join(format!("{id}.json")).exists())
}

/// Finishes the registration of a Patient whose creation here did not finish
/// (`unfinished_patient`), before its resource is written.
async fn finish_patient(state: &FhirState, caller: &Caller, id: &str) -> Result<(), Outcome> {
    let file = patients_dir(state).join(format!("{id}.json"));
    // A patient's own token writes its own Patient; only a member's user registers.
    let Ok(org) = registering_org(caller) else {
        return Ok(());
    };
    require_author(state, caller)?;
    let identity = Identity::load(&file).map_err(|e| {
        eprintln!("medledger: a patient's key file does not load: {e}");
        Outcome::internal("the patient's key file does not load")
    })?;
    if identity.id != id {
        return Err(Outcome::internal(
            "a patient's key file belongs to someone else",
        ));
    }
    let _finishing = state.finishing.lock().await;
    register_patient(state, &identity, org).await
}

/// Brings a patient whose key this node holds to where a Patient creation leads: registered
/// on the ledger, its encryption key published, and the organisation's consent to treat (the
/// patient grants `org` reading, writing and searching their clinical records for treatment,
/// which they can revoke). Each step is taken only if the ledger lacks it, so running this
/// again finishes a registration that was cut short, and a consent to `org` that the patient
/// has revoked since is never given again.
async fn register_patient(
    state: &FhirState,
    identity: &Identity,
    org: &str,
) -> Result<(), Outcome> {
    let snapshot = state.snapshot()?;
    if snapshot
        .value::<Value>(&keys::patient(&identity.id))?
        .is_none()
    {
        state
            .submit_as(
                identity,
                TxBody::RegisterPatient {
                    public_key: identity.key.public_key(),
                },
            )
            .await?;
    }
    if snapshot
        .value::<Value>(&keys::encryption_key(&identity.id))?
        .is_none()
    {
        let encryption_key = identity
            .encryption_key()
            .ok_or_else(|| Outcome::internal("a new patient has no encryption key"))?
            .public_key()
            .to_base64url();
        state
            .submit_as(
                identity,
                TxBody::SetEncryptionKey {
                    public_key: encryption_key,
                },
            )
            .await?;
    }
    let grantee = Grantee::Org {
        org: org.to_string(),
    };
    // A patient being registered has few consents: one page of them holds any to `org`.
    let prefix = keys::patient_consent_prefix(&identity.id);
    let mut consented = false;
    for (key, _) in snapshot.scan(&prefix, None, 1024)? {
        let Ok(id) = medledger_core::hash::Hash::from_hex(&key[prefix.len()..]) else {
            continue;
        };
        let consent = snapshot.value::<medledger_core::model::Consent>(&keys::consent(&id))?;
        consented |= consent.is_some_and(|consent| consent.grantee == grantee);
    }
    if !consented {
        state
            .submit_as(
                identity,
                TxBody::Grant {
                    grantee,
                    scope: Scope {
                        resource_types: Vec::new(),
                        categories: views::CLINICAL_CATEGORIES.to_vec(),
                    },
                    actions: vec![
                        medledger_core::model::Action::Read,
                        medledger_core::model::Action::Write,
                        medledger_core::model::Action::Search,
                    ],
                    purposes: vec![Purpose::Treatment],
                    expires_at_ms: None,
                },
            )
            .await?;
    }
    Ok(())
}

// ---- reads ----------------------------------------------------------------------------------

pub async fn read(
    State(state): State<Arc<FhirState>>,
    Path((resource_type, id)): TypeAndId,
    headers: HeaderMap,
) -> FhirResult {
    let caller = admit(&state, &headers, &resource_type, Interaction::Read)?;
    let resource = read_resource(&state, &caller, &resource_type, &id, None).await?;
    if !is_record_type(&resource_type) {
        return Ok(fhir_json(StatusCode::OK, &resource));
    }
    Ok(resource_response(
        &state,
        StatusCode::OK,
        &resource_type,
        &resource,
    ))
}

/// A read (the latest version) or a vread (`version`) of any type this server serves.
pub(super) async fn read_resource(
    state: &FhirState,
    caller: &Caller,
    resource_type: &str,
    id: &str,
    version: Option<u64>,
) -> Result<Value, Outcome> {
    if !is_record_type(resource_type) {
        if version.is_some() {
            return Err(Outcome::not_supported(format!(
                "{resource_type} has no versions on this server"
            )));
        }
        return views::read(state, caller, resource_type, id);
    }
    Ok(read_version(state, caller, resource_type, id, version)
        .await?
        .resource)
}

pub async fn vread(
    State(state): State<Arc<FhirState>>,
    Path((resource_type, id, version)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> FhirResult {
    let caller = admit(&state, &headers, &resource_type, Interaction::Read)?;
    if !is_record_type(&resource_type) {
        return Err(Outcome::not_supported(format!(
            "{resource_type} has no versions on this server"
        )));
    }
    let version: u64 = version
        .parse()
        .map_err(|_| Outcome::not_found(format!("no version {version:?}")))?;
    let resource = read_resource(&state, &caller, &resource_type, &id, Some(version)).await?;
    Ok(resource_response(
        &state,
        StatusCode::OK,
        &resource_type,
        &resource,
    ))
}

async fn read_version(
    state: &FhirState,
    caller: &Caller,
    resource_type: &str,
    id: &str,
    version: Option<u64>,
) -> Result<OpenedVersion, Outcome> {
    let (custodian, record) = locate(state, resource_type, id)?;
    caller.require_patient(&record.patient)?;
    let wanted = match version {
        None => record.versions.last(),
        Some(version) => record.versions.iter().find(|v| v.version == version),
    };
    match wanted {
        None => {
            return Err(Outcome::not_found(format!(
                "{resource_type}/{id} has no version {}",
                version.unwrap_or(0)
            )))
        }
        Some(tombstone) if tombstone.deleted => {
            return Err(gone(resource_type, id, tombstone.version))
        }
        Some(_) => {}
    }
    Ok(state
        .records
        .read(ReadRequest {
            actor: caller.actor.clone(),
            custodian,
            record_id: id.to_string(),
            version,
            purpose: caller.purpose(),
            attachments: false,
        })
        .await?)
}

/// `GET /fhir/{type}/{id}/_history` and `GET /fhir/Patient/{id}/$everything`.
pub async fn instance_operation(
    State(state): State<Arc<FhirState>>,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
    headers: HeaderMap,
    query: RawQuery,
) -> FhirResult {
    check_type(&resource_type)?;
    let caller = authenticate(&state, &headers)?;
    let pairs = query_pairs(&query)?;
    let bundle =
        instance_operation_of(&state, &caller, &resource_type, &id, &operation, &pairs).await?;
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// An instance history or `Patient/{id}/$everything`, as a Bundle.
pub(super) async fn instance_operation_of(
    state: &FhirState,
    caller: &Caller,
    resource_type: &str,
    id: &str,
    operation: &str,
    pairs: &[(String, String)],
) -> Result<Value, Outcome> {
    match operation {
        "_history" if is_record_type(resource_type) => {
            caller.require(resource_type, Interaction::Read)?;
            let (custodian, record) = locate(state, resource_type, id)?;
            caller.require_patient(&record.patient)?;
            let versions = state
                .records
                .versions(&caller.actor, &custodian, id, caller.purpose())
                .await?;
            let entries: Vec<Value> = versions
                .iter()
                .enumerate()
                .rev()
                .map(|(index, v)| {
                    let after_delete = index > 0 && versions[index - 1].deleted;
                    history_entry(state, resource_type, id, v, after_delete)
                })
                .collect();
            Ok(json!({
                "resourceType": "Bundle",
                "type": "history",
                "total": entries.len(),
                "link": [{ "relation": "self", "url": format!("{}/{resource_type}/{id}/_history", state.config.base_url) }],
                "entry": entries,
            }))
        }
        "$everything" if resource_type == "Patient" => everything(state, caller, id, pairs).await,
        _ => Err(Outcome::not_found(format!(
            "no operation {operation:?} on {resource_type}"
        ))),
    }
}

/// One version in an instance history (FHIR 3.1.0.11.2: a deletion is a DELETE entry
/// without a resource, answered 410 Gone).
fn history_entry(
    state: &FhirState,
    resource_type: &str,
    id: &str,
    version: &OpenedVersion,
    after_delete: bool,
) -> Value {
    let mut response = json!({ "etag": format!("W/\"{}\"", version.version) });
    if let Some(updated) = version.resource.pointer("/meta/lastUpdated") {
        response["lastModified"] = updated.clone();
    }
    let instance = format!("{resource_type}/{id}");
    let (method, url, status) = if version.deleted {
        ("DELETE", instance, "410 Gone")
    } else if version.version == 1 {
        ("POST", resource_type.to_string(), "201 Created")
    } else if after_delete {
        ("PUT", instance, "201 Created")
    } else {
        ("PUT", instance, "200 OK")
    };
    response["status"] = json!(status);
    let mut entry = json!({
        "fullUrl": format!("{}/{resource_type}/{id}", state.config.base_url),
        "request": { "method": method, "url": url },
        "response": response,
    });
    if !version.deleted {
        entry["resource"] = version.resource.clone();
    }
    entry
}

/// Most entries a type history answers with (`_count` asks for fewer).
const TYPE_HISTORY_MAX: usize = 1000;

/// `GET /fhir/{type}/_history?patient=…[&_since=…][&_count=…]`: every version of the
/// patient's records of one type, across custodians, newest first, under one access entry.
/// As with search, a type history is one patient's (a patient token's own by default),
/// because consent is per patient.
pub async fn type_history(
    State(state): State<Arc<FhirState>>,
    Path(resource_type): Path<String>,
    headers: HeaderMap,
    query: RawQuery,
) -> FhirResult {
    let caller = admit(&state, &headers, &resource_type, Interaction::Read)?;
    if !is_record_type(&resource_type) {
        return Err(Outcome::not_supported(format!(
            "{resource_type} has no history on this server"
        )));
    }
    let (mut patient, mut since, mut count) = (caller.patient.clone(), None, TYPE_HISTORY_MAX);
    for (name, value) in query_pairs(&query)? {
        match name.as_str() {
            "patient" | "subject" => {
                patient = Some(value.strip_prefix("Patient/").unwrap_or(&value).to_string())
            }
            "_since" => {
                since = Some(fhir_search::DateRange::parse(&value).ok_or_else(|| {
                    Outcome::bad_request(format!("_since {value:?} is not an instant"))
                })?)
            }
            "_count" => {
                count = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| Outcome::bad_request("_count is a positive number"))?
                    .min(TYPE_HISTORY_MAX)
            }
            "_format" => {}
            _ => {
                return Err(Outcome::bad_request(format!(
                    "a type history takes patient, _since and _count, not {name:?}"
                )))
            }
        }
    }
    let patient = patient.ok_or_else(|| {
        Outcome::bad_request("a type history names its patient (patient=): consent is per patient")
            .detail("patient_required")
    })?;
    caller.require_patient(&patient)?;
    let history = state
        .records
        .history_of(
            &caller.actor,
            &patient,
            caller.purpose(),
            Some(std::slice::from_ref(&resource_type)),
            false,
        )
        .await?;
    let updated = |v: &OpenedVersion| {
        v.resource
            .pointer("/meta/lastUpdated")
            .and_then(Value::as_str)
            .and_then(fhir_search::DateRange::parse)
            .map_or(0, |range| range.start_ms)
    };
    let deleted: std::collections::HashSet<(String, u64)> = history
        .versions
        .iter()
        .filter(|v| v.deleted)
        .map(|v| (v.record_id.clone(), v.version))
        .collect();
    let mut versions: Vec<&OpenedVersion> = history
        .versions
        .iter()
        .filter(|v| since.as_ref().is_none_or(|s| updated(v) >= s.start_ms))
        .collect();
    versions.sort_by(|a, b| {
        updated(b)
            .cmp(&updated(a))
            .then_with(|| b.version.cmp(&a.version))
    });
    let total = versions.len();
    let entries: Vec<Value> = versions
        .into_iter()
        .take(count)
        .map(|v| {
            let after_delete =
                deleted.contains(&(v.record_id.clone(), v.version.saturating_sub(1)));
            history_entry(&state, &resource_type, &v.record_id, v, after_delete)
        })
        .collect();
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "history",
        "total": total,
        "link": [{ "relation": "self", "url": format!("{}/{resource_type}/_history?patient={}", state.config.base_url, views::percent_encode(&patient)) }],
        "entry": entries,
    });
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// The most entries one page of `$everything` holds when `_count` asks for a page.
const EVERYTHING_PAGE_MAX: usize = 1000;

/// Every record of the patient the caller may see, latest versions, from every custodian.
/// Each page is a new request, with its own access entry, like each page of a search.
async fn everything(
    state: &FhirState,
    caller: &Caller,
    patient: &str,
    pairs: &[(String, String)],
) -> Result<Value, Outcome> {
    caller.require_patient(patient)?;
    // Paging as a search pages: `_count` entries from `_offset`; without `_count`, one page.
    let (mut count, mut offset) = (None, 0usize);
    for (name, value) in pairs {
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| Outcome::bad_request(format!("{name} is a non-negative integer")))
        };
        match name.as_str() {
            "_count" => count = Some(number()?.min(EVERYTHING_PAGE_MAX)),
            "_offset" => offset = number()?,
            "_format" => {}
            _ => {
                return Err(Outcome::bad_request(format!(
                    "$everything takes _count and _offset here, not {name:?}"
                )))
            }
        }
    }
    // Only the types the token may read are asked for: nothing else is fetched or logged.
    let types: Vec<String> = medledger_core::model::RESOURCE_TYPES
        .iter()
        .map(|(t, _)| t.to_string())
        .filter(|t| caller.scopes.allows(caller.context, t, Interaction::Read))
        .collect();
    if types.is_empty() {
        return Err(
            Outcome::forbidden("the token's scopes allow reading no record type")
                .detail("insufficient_scope"),
        );
    }
    let history = state
        .records
        .history_of(&caller.actor, patient, caller.purpose(), Some(&types), true)
        .await?;
    // A deleted record's latest version is its tombstone: it is left out.
    let mut resources: Vec<Value> = history
        .versions
        .into_iter()
        .filter(|v| !v.deleted)
        .map(|v| v.resource)
        .collect();
    // The Patient first, then the rest by type and id: a stable order clients can page.
    resources.sort_by_key(|r| {
        (
            r.get("resourceType").and_then(Value::as_str) != Some("Patient"),
            r.get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            r.get("id")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        )
    });
    let total = resources.len();
    let base = format!("{}/Patient/{patient}/$everything", state.config.base_url);
    let links = match count {
        Some(count) => page_links(
            |offset| format!("{base}?_count={count}&_offset={offset}"),
            offset,
            count,
            total,
        ),
        None if offset == 0 => vec![json!({ "relation": "self", "url": base })],
        None => vec![json!({ "relation": "self", "url": format!("{base}?_offset={offset}") })],
    };
    let entries: Vec<Value> = resources
        .into_iter()
        .skip(offset)
        .take(count.unwrap_or(usize::MAX))
        .map(|r| entry(state, r, "match"))
        .collect();
    Ok(json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": entries,
    }))
}

/// A searchset entry: the resource, its full URL and why it is there.
pub(super) fn entry(state: &FhirState, resource: Value, mode: &str) -> Value {
    let full_url = format!(
        "{}/{}/{}",
        state.config.base_url,
        resource
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or(""),
        resource.get("id").and_then(Value::as_str).unwrap_or("")
    );
    json!({ "fullUrl": full_url, "resource": resource, "search": { "mode": mode } })
}

// ---- search -----------------------------------------------------------------------------------

pub async fn search(
    State(state): State<Arc<FhirState>>,
    Path(resource_type): Path<String>,
    headers: HeaderMap,
    query: RawQuery,
) -> FhirResult {
    let caller = admit(&state, &headers, &resource_type, Interaction::Search)?;
    let pairs = query_pairs(&query)?;
    let bundle = search_type(&state, &caller, &resource_type, &pairs).await?;
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// A search of one type, as a searchset Bundle.
pub(super) async fn search_type(
    state: &FhirState,
    caller: &Caller,
    resource_type: &str,
    pairs: &[(String, String)],
) -> Result<Value, Outcome> {
    let resource_type = resource_type.to_string();
    if !is_record_type(&resource_type) {
        return views::search(state, caller, &resource_type, pairs).await;
    }
    let params = fhir_search::parse(&resource_type, pairs, SEARCH_PAGE_DEFAULT, SEARCH_PAGE_MAX)
        .map_err(|e| Outcome::bad_request(e.to_string()).detail("invalid_search"))?;
    let patient = match (&params.patient, &caller.patient, resource_type.as_str()) {
        (Some(patient), _, _) => patient.clone(),
        (None, Some(own), _) => own.clone(),
        (None, None, "Patient") if params.id.len() == 1 => params.id[0].clone(),
        _ => {
            return Err(Outcome::bad_request(
                "a search names its patient (patient= or subject=): records are searched \
                 one patient at a time, under that patient's consent",
            )
            .detail("patient_required"))
        }
    };
    caller.require_patient(&patient)?;
    let mut types = vec![resource_type.clone()];
    let include_patient = params.include_patient && resource_type != "Patient";
    if include_patient {
        caller.require("Patient", Interaction::Read)?;
        types.push("Patient".to_string());
    }
    let history = state
        .records
        .history_of(
            &caller.actor,
            &patient,
            caller.purpose(),
            Some(&types),
            true,
        )
        .await?;
    let mut matched = Vec::new();
    let mut patients = Vec::new();
    for version in history.versions.into_iter().filter(|v| !v.deleted) {
        if version.resource_type == resource_type {
            if fhir_search::matches(&resource_type, &params, &version.resource) {
                matched.push(version.resource);
            }
        } else {
            patients.push(version.resource);
        }
    }
    // Newest first unless the client sorts: the order HAPI and most servers default to.
    matched.sort_by(|a, b| {
        let updated = |r: &Value| {
            r.pointer("/meta/lastUpdated")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        updated(b).cmp(&updated(a)).then_with(|| {
            a.get("id")
                .and_then(Value::as_str)
                .cmp(&b.get("id").and_then(Value::as_str))
        })
    });
    if !params.sort.is_empty() {
        fhir_search::sort(&resource_type, &params.sort, &mut matched);
    }
    Ok(search_bundle(
        state,
        &resource_type,
        &params,
        matched,
        patients,
    ))
}

/// The links of the page at `offset` of `count` entries out of `total`: itself, the first,
/// the next and previous where there are, and the last. `url` addresses the page at an
/// offset.
fn page_links(
    url: impl Fn(usize) -> String,
    offset: usize,
    count: usize,
    total: usize,
) -> Vec<Value> {
    let mut links = vec![
        json!({ "relation": "self", "url": url(offset) }),
        json!({ "relation": "first", "url": url(0) }),
    ];
    // An offset is whatever the client sent: adding to it must not overflow.
    if count > 0 && offset.saturating_add(count) < total {
        links.push(json!({ "relation": "next", "url": url(offset + count) }));
    }
    if offset > 0 {
        links.push(
            json!({ "relation": "previous", "url": url(offset.saturating_sub(count.max(1))) }),
        );
    }
    if count > 0 && total > 0 {
        links.push(json!({ "relation": "last", "url": url((total - 1) / count * count) }));
    }
    links
}

/// One page of a searchset, with links that repeat the search at other offsets.
fn search_bundle(
    state: &FhirState,
    resource_type: &str,
    params: &SearchParams,
    matched: Vec<Value>,
    patients: Vec<Value>,
) -> Value {
    let total = matched.len();
    let link = |offset: usize| {
        let mut pairs = fhir_search::self_query(resource_type, params);
        pairs.push(("_offset".to_string(), offset.to_string()));
        let query: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{}={}", views::percent_encode(k), views::percent_encode(v)))
            .collect();
        format!(
            "{}/{resource_type}?{}",
            state.config.base_url,
            query.join("&")
        )
    };
    if params.summary_count {
        return json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": total,
            "link": [{ "relation": "self", "url": link(params.offset) }],
        });
    }
    let count = params.count;
    let links = page_links(link, params.offset, count, total);
    let page: Vec<Value> = matched
        .into_iter()
        .skip(params.offset)
        .take(count)
        .collect();
    let mut entries: Vec<Value> = Vec::new();
    let mut included: Vec<String> = Vec::new();
    for resource in &page {
        let patient_ref = resource
            .pointer("/subject/reference")
            .or_else(|| resource.pointer("/patient/reference"))
            .or_else(|| resource.pointer("/beneficiary/reference"))
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("Patient/"))
            .map(str::to_string);
        if let Some(patient) = patient_ref {
            if let Some(found) = patients
                .iter()
                .find(|p| p.get("id").and_then(Value::as_str) == Some(&patient))
            {
                if !included.contains(&patient) {
                    included.push(patient);
                    entries.push(entry(state, found.clone(), "include"));
                }
            }
        }
    }
    let mut all: Vec<Value> = page.into_iter().map(|r| entry(state, r, "match")).collect();
    all.extend(entries);
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": all,
    })
}

//! Batch and transaction Bundles: `POST /fhir`.
//!
//! A **batch** runs each entry on its own, through the same functions as the single
//! interactions (read, vread, history, `$everything`, search, create, update, delete), and
//! answers a `batch-response` with one status (and OperationOutcome when it failed) per
//! entry.
//!
//! A **transaction** is all or nothing. Every write here is a ledger transaction signed by
//! its author, so the writes of a transaction Bundle become one: each entry is checked and
//! sealed at this custodian first (scopes, If-Match, the resource, the patient), then the
//! caller signs one `create_records` group (one `create_record` when there is a single
//! version) and the ledger applies every version or none. Any failure before that, or the
//! ledger's refusal, fails the whole Bundle with that entry's status; nothing is indexed.
//! Ciphertexts sealed for a failed transaction stay in the record store unindexed:
//! `store check` lists them as orphans, and no reader can reach them.
//!
//! Limits of transactions: writes only (POST, PUT, DELETE of record types; a read is not
//! atomic with the writes, use a batch); no Patient creation (registering a patient takes
//! the patient's own signatures, which cannot join the author's group); every write about
//! one patient; each record at most once; at most `RECORD_GROUP_MAX` entries (what fits
//! one 16 KiB ledger transaction); no conditional create or update.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use medledger_core::tx::{NewRecordVersion, TxBody, RECORD_GROUP_MAX};
use serde_json::{json, Value};

use super::resources::{self, Reply};
use super::{authenticate, fhir_json, percent_decode, Caller, FhirResult, FhirState, Outcome};
use crate::auth::Interaction;
use crate::records::service::Prepared;

/// Most entries in a batch.
pub const BATCH_ENTRIES_MAX: usize = 100;
/// Most entries in a transaction: its versions must fit one ledger transaction.
pub const TRANSACTION_ENTRIES_MAX: usize = RECORD_GROUP_MAX;

/// `POST /fhir` with a Bundle of type `batch` or `transaction`.
pub async fn process(
    State(state): State<Arc<FhirState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> FhirResult {
    let caller = authenticate(&state, &headers)?;
    let bundle = parse_bundle(&body)?;
    let entries = match bundle.get("entry") {
        None => Vec::new(),
        Some(Value::Array(entries)) => entries.clone(),
        Some(_) => return Err(Outcome::bad_request("Bundle.entry is not an array")),
    };
    let answer = match bundle.get("type").and_then(Value::as_str) {
        Some("batch") => batch(&state, &caller, &entries).await?,
        Some("transaction") => transaction(&state, &caller, &entries).await?,
        _ => {
            return Err(Outcome::bad_request(
                "POST /fhir takes a Bundle of type batch or transaction",
            ))
        }
    };
    Ok(fhir_json(StatusCode::OK, &answer))
}

fn parse_bundle(body: &Result<Bytes, BytesRejection>) -> Result<Value, Outcome> {
    let body = super::resources::request_body(body)?;
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Outcome::bad_request(format!("the body is not JSON: {e}")))?;
    if value.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(Outcome::bad_request("POST /fhir takes a Bundle"));
    }
    Ok(value)
}

// ---- entries ----------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Put,
    Delete,
}

/// One entry's request, parsed.
struct EntryRequest {
    method: Method,
    /// The URL's path segments, relative to the base: `[Type]`, `[Type, id]`, ...
    path: Vec<String>,
    query: Vec<(String, String)>,
    if_match: Option<u64>,
    resource: Option<Value>,
    full_url: Option<String>,
}

impl EntryRequest {
    fn resource_type(&self) -> &str {
        self.path.first().map(String::as_str).unwrap_or("")
    }

    fn id(&self) -> Option<&str> {
        self.path.get(1).map(String::as_str)
    }

    /// The resource a POST or PUT carries, of the URL's type.
    fn body(&self) -> Result<Value, Outcome> {
        let resource = self
            .resource
            .clone()
            .ok_or_else(|| Outcome::bad_request("a POST or PUT entry carries a resource"))?;
        match resource.get("resourceType").and_then(Value::as_str) {
            Some(t) if t == self.resource_type() => Ok(resource),
            _ => Err(Outcome::bad_request(format!(
                "the entry's resource is not a {}",
                self.resource_type()
            ))),
        }
    }
}

fn parse_entry(state: &FhirState, entry: &Value) -> Result<EntryRequest, Outcome> {
    let request = entry
        .get("request")
        .ok_or_else(|| Outcome::bad_request("an entry has a request"))?;
    let method = match request.get("method").and_then(Value::as_str) {
        Some("GET") => Method::Get,
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        Some("DELETE") => Method::Delete,
        Some(other) => {
            return Err(Outcome::not_supported(format!(
                "{other} is not supported in a Bundle"
            )))
        }
        None => return Err(Outcome::bad_request("request.method is missing")),
    };
    for conditional in ["ifNoneExist", "ifNoneMatch", "ifModifiedSince"] {
        if request.get(conditional).is_some() {
            return Err(Outcome::not_supported(format!(
                "request.{conditional}: conditional interactions are not supported"
            )));
        }
    }
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| Outcome::bad_request("request.url is missing"))?;
    let url = url
        .strip_prefix(&state.config.base_url)
        .unwrap_or(url)
        .trim_start_matches('/');
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let path: Vec<String> = path
        .split('/')
        .map(|segment| percent_decode(segment).unwrap_or_default())
        .collect();
    if path.iter().any(String::is_empty) {
        return Err(Outcome::bad_request(format!(
            "request.url {url:?} is not Type, Type/id or Type/id/..."
        )));
    }
    let query = super::decode_pairs(query)
        .ok_or_else(|| Outcome::bad_request("request.url's query is not well encoded"))?;
    let if_match = match request.get("ifMatch").and_then(Value::as_str) {
        None => None,
        Some(tag) => Some(
            resources::etag_version(tag)
                .ok_or_else(|| Outcome::bad_request("ifMatch is not an ETag like W/\"2\""))?,
        ),
    };
    Ok(EntryRequest {
        method,
        path,
        query,
        if_match,
        resource: entry.get("resource").cloned(),
        full_url: entry
            .get("fullUrl")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// `"201 Created"`: an entry's response status.
fn status_line(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}

/// A response entry for a resource answered with `status`; a write's names its location.
fn resource_entry(state: &FhirState, status: StatusCode, resource: Value, write: bool) -> Value {
    let resource_type = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let id = resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let version = resource
        .pointer("/meta/versionId")
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut response = json!({ "status": status_line(status) });
    if let Some(version) = &version {
        response["etag"] = json!(format!("W/\"{version}\""));
    }
    if let Some(updated) = resource.pointer("/meta/lastUpdated") {
        response["lastModified"] = updated.clone();
    }
    let mut entry = json!({ "response": response });
    if let Some(id) = &id {
        if resource_type != "Bundle" {
            entry["fullUrl"] = json!(format!("{}/{resource_type}/{id}", state.config.base_url));
            if let (true, Some(version)) = (write, &version) {
                entry["response"]["location"] =
                    json!(format!("{resource_type}/{id}/_history/{version}"));
            }
        }
    }
    entry["resource"] = resource;
    entry
}

/// A response entry for a write's reply.
fn reply_entry(state: &FhirState, reply: Reply) -> Value {
    match reply {
        Reply::Resource(status, resource) => resource_entry(state, status, resource, true),
        Reply::Deleted { stub, already } => {
            let mut response = json!({
                "status": status_line(StatusCode::OK),
                "outcome": resources::deletion_outcome(&stub, already),
            });
            if let Some(version) = stub.pointer("/meta/versionId").and_then(Value::as_str) {
                response["etag"] = json!(format!("W/\"{version}\""));
            }
            if let Some(updated) = stub.pointer("/meta/lastUpdated") {
                response["lastModified"] = updated.clone();
            }
            json!({ "response": response })
        }
    }
}

/// A response entry for a failed one.
fn failure_entry(outcome: &Outcome) -> Value {
    json!({
        "response": {
            "status": status_line(outcome.status),
            "outcome": outcome.resource(),
        },
    })
}

/// The OperationOutcome of a failed transaction, naming the entry that failed it.
fn at_entry(index: usize, mut outcome: Outcome) -> Outcome {
    outcome.diagnostics = format!(
        "entry {index}: {}; nothing in the transaction was committed",
        outcome.diagnostics
    );
    outcome
}

// ---- batch ----------------------------------------------------------------------------------

async fn batch(state: &FhirState, caller: &Caller, entries: &[Value]) -> Result<Value, Outcome> {
    if entries.len() > BATCH_ENTRIES_MAX {
        return Err(Outcome::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-costly",
            format!("a batch holds at most {BATCH_ENTRIES_MAX} entries"),
        ));
    }
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let answer = match parse_entry(state, entry) {
            Ok(request) => batch_entry(state, caller, &request).await,
            Err(outcome) => Err(outcome),
        };
        out.push(answer.unwrap_or_else(|outcome| failure_entry(&outcome)));
    }
    Ok(json!({
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": out,
    }))
}

/// One batch entry, through the function its single interaction uses.
async fn batch_entry(
    state: &FhirState,
    caller: &Caller,
    request: &EntryRequest,
) -> Result<Value, Outcome> {
    let resource_type = request.resource_type();
    resources::check_type(resource_type)?;
    let path: Vec<&str> = request.path.iter().map(String::as_str).collect();
    match (request.method, path.as_slice()) {
        (Method::Get, [_]) => {
            caller.require(resource_type, Interaction::Search)?;
            let bundle =
                resources::search_type(state, caller, resource_type, &request.query).await?;
            Ok(resource_entry(state, StatusCode::OK, bundle, false))
        }
        (Method::Get, [_, id]) => {
            caller.require(resource_type, Interaction::Read)?;
            let resource = resources::read_resource(state, caller, resource_type, id, None).await?;
            Ok(resource_entry(state, StatusCode::OK, resource, false))
        }
        (Method::Get, [_, id, "_history", version]) => {
            caller.require(resource_type, Interaction::Read)?;
            let version: u64 = version
                .parse()
                .map_err(|_| Outcome::not_found(format!("no version {version:?}")))?;
            let resource =
                resources::read_resource(state, caller, resource_type, id, Some(version)).await?;
            Ok(resource_entry(state, StatusCode::OK, resource, false))
        }
        (Method::Get, [_, id, operation]) => {
            let bundle = resources::instance_operation_of(
                state,
                caller,
                resource_type,
                id,
                operation,
                &request.query,
            )
            .await?;
            Ok(resource_entry(state, StatusCode::OK, bundle, false))
        }
        (Method::Post, [_]) => {
            caller.require(resource_type, Interaction::Create)?;
            refuse_consent_write(resource_type)?;
            let reply =
                resources::create_record(state, caller, resource_type, request.body()?).await?;
            Ok(reply_entry(state, reply))
        }
        (Method::Put, [_, id]) => {
            caller.require(resource_type, Interaction::Update)?;
            refuse_consent_write(resource_type)?;
            let resource = own_id(request.body()?, id)?;
            let reply = resources::update_record(
                state,
                caller,
                resource_type,
                id,
                resource,
                request.if_match,
            )
            .await?;
            Ok(reply_entry(state, reply))
        }
        (Method::Delete, [_, id]) => {
            caller.require(resource_type, Interaction::Delete)?;
            let reply =
                resources::delete_resource(state, caller, resource_type, id, request.if_match)
                    .await?;
            Ok(reply_entry(state, reply))
        }
        _ => Err(Outcome::not_supported(format!(
            "{:?} {} is not an interaction this server supports in a Bundle",
            request.method,
            request.path.join("/")
        ))),
    }
}

/// Consents are the patient's own signed grants, written one at a time at `/fhir/Consent`.
fn refuse_consent_write(resource_type: &str) -> Result<(), Outcome> {
    if resource_type == "Consent" {
        return Err(Outcome::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-supported",
            "a Consent is written by its patient at /fhir/Consent, not in a Bundle",
        )
        .detail("not_in_bundle"));
    }
    Ok(())
}

/// An update's resource must carry the id its URL names.
fn own_id(resource: Value, id: &str) -> Result<Value, Outcome> {
    match resource.get("id").and_then(Value::as_str) {
        Some(own) if own == id => Ok(resource),
        Some(_) => Err(Outcome::bad_request(
            "the resource's id differs from the id in the URL",
        )),
        None => Err(Outcome::bad_request("an update carries the resource's id")),
    }
}

// ---- transaction ----------------------------------------------------------------------------

/// A transaction entry, checked and sealed, waiting for the one signature.
enum Staged {
    /// A version to index, and what its success answers.
    Write(Box<Prepared>, StatusCode),
    /// A delete of a record deleted already: nothing to index.
    AlreadyDeleted(Reply),
}

async fn transaction(
    state: &FhirState,
    caller: &Caller,
    entries: &[Value],
) -> Result<Value, Outcome> {
    if entries.len() > TRANSACTION_ENTRIES_MAX {
        return Err(Outcome::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-costly",
            format!(
                "a transaction holds at most {TRANSACTION_ENTRIES_MAX} entries (its versions \
                 are one ledger transaction of at most 16 KiB)"
            ),
        ));
    }
    let mut requests = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let request = parse_entry(state, entry).map_err(|o| at_entry(index, o))?;
        check_transaction_entry(&request).map_err(|o| at_entry(index, o))?;
        requests.push(request);
    }
    // Each record once: one version per record in a group.
    let mut targets = BTreeSet::new();
    for (index, request) in requests.iter().enumerate() {
        if let Some(id) = request.id() {
            if !targets.insert((request.resource_type().to_string(), id.to_string())) {
                return Err(at_entry(
                    index,
                    Outcome::bad_request(format!(
                        "{}/{id} appears twice in the transaction",
                        request.resource_type()
                    )),
                ));
            }
        }
    }
    // The ids of created resources are chosen first, so that references to their
    // `urn:uuid:` fullUrls can be rewritten before anything is sealed.
    let mut assigned: Vec<Option<String>> = Vec::with_capacity(requests.len());
    let mut rewrites: BTreeMap<String, String> = BTreeMap::new();
    for request in &requests {
        if request.method != Method::Post {
            assigned.push(None);
            continue;
        }
        let id = state.records.new_record_id()?;
        if let Some(full_url) = &request.full_url {
            if full_url.starts_with("urn:uuid:") || full_url.starts_with("urn:oid:") {
                rewrites.insert(
                    full_url.clone(),
                    format!("{}/{id}", request.resource_type()),
                );
            }
        }
        assigned.push(Some(id));
    }

    let mut staged = Vec::with_capacity(requests.len());
    for (index, (request, id)) in requests.iter().zip(&assigned).enumerate() {
        let step = stage(state, caller, request, id.as_deref(), &rewrites).await;
        staged.push(step.map_err(|o| at_entry(index, o))?);
    }
    let versions: Vec<NewRecordVersion> = staged
        .iter()
        .filter_map(|s| match s {
            Staged::Write(prepared, _) => NewRecordVersion::of(&prepared.body),
            Staged::AlreadyDeleted(_) => None,
        })
        .collect();
    if versions.iter().any(|v| v.patient != versions[0].patient) {
        return Err(Outcome::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
            "a transaction's writes are all about one patient (one ledger group); \
             nothing was committed",
        )
        .detail("one_patient_per_transaction"));
    }
    let body = match versions.len() {
        0 => None,
        1 => staged.iter().find_map(|s| match s {
            Staged::Write(prepared, _) => Some(prepared.body.clone()),
            Staged::AlreadyDeleted(_) => None,
        }),
        _ => Some(TxBody::CreateRecords { versions }),
    };
    if let Some(body) = body {
        // One signature, one ledger transaction: every version commits, or none does.
        state
            .submit_for(caller, body)
            .await
            .map_err(|mut outcome| {
                outcome.diagnostics = format!(
                    "the ledger refused the transaction: {}; nothing in it was committed",
                    outcome.diagnostics
                );
                outcome
            })?;
    }
    let entries: Vec<Value> = staged
        .into_iter()
        .map(|s| match s {
            Staged::Write(prepared, status) => {
                if is_tombstone(&prepared) {
                    reply_entry(
                        state,
                        Reply::Deleted {
                            stub: prepared.resource.clone(),
                            already: false,
                        },
                    )
                } else {
                    resource_entry(state, status, prepared.resource, true)
                }
            }
            Staged::AlreadyDeleted(reply) => reply_entry(state, reply),
        })
        .collect();
    Ok(json!({
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": entries,
    }))
}

fn is_tombstone(prepared: &Prepared) -> bool {
    matches!(prepared.body, TxBody::CreateRecord { deleted: true, .. })
}

/// What a transaction may hold: writes of record types, and no new Patient.
fn check_transaction_entry(request: &EntryRequest) -> Result<(), Outcome> {
    let resource_type = request.resource_type();
    resources::check_type(resource_type)?;
    let shape_fits = match request.method {
        Method::Get => {
            return Err(Outcome::bad_request(
                "a transaction holds only writes (POST, PUT, DELETE): a read is not atomic \
                 with them here; send reads in a batch",
            )
            .detail("read_in_transaction"))
        }
        Method::Post => request.path.len() == 1,
        Method::Put | Method::Delete => request.path.len() == 2,
    };
    if !shape_fits || !request.query.is_empty() {
        return Err(Outcome::not_supported(format!(
            "{:?} {} is not supported in a transaction (conditional interactions are not)",
            request.method,
            request.path.join("/")
        )));
    }
    if !resources::is_record_type(resource_type) {
        return Err(Outcome::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-supported",
            format!("{resource_type} resources come from the ledger and are not written in a transaction"),
        )
        .detail("not_in_transaction"));
    }
    if request.method == Method::Post && resource_type == "Patient" {
        return Err(patient_in_transaction(
            "a transaction cannot create a Patient: registering a patient takes the patient's \
             own signatures, which cannot join the author's atomic group; create the Patient \
             first (or in a batch)"
                .into(),
        ));
    }
    Ok(())
}

/// A transaction entry that would sign a patient's own transactions (registering one).
fn patient_in_transaction(diagnostics: String) -> Outcome {
    Outcome::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "not-supported",
        diagnostics,
    )
    .detail("patient_in_transaction")
}

/// Checks and seals one transaction entry (nothing is signed yet).
async fn stage(
    state: &FhirState,
    caller: &Caller,
    request: &EntryRequest,
    assigned: Option<&str>,
    rewrites: &BTreeMap<String, String>,
) -> Result<Staged, Outcome> {
    let resource_type = request.resource_type();
    match request.method {
        Method::Post => {
            caller.require(resource_type, Interaction::Create)?;
            let mut resource = request.body()?;
            rewrite_references(&mut resource, rewrites);
            resources::strip_identity(&mut resource);
            let id = assigned.ok_or_else(|| Outcome::internal("a create without its id"))?;
            resource["id"] = json!(id);
            let prepared =
                resources::prepare_write(state, caller, resource, Some(id.to_string())).await?;
            Ok(Staged::Write(Box::new(prepared), StatusCode::CREATED))
        }
        Method::Put => {
            caller.require(resource_type, Interaction::Update)?;
            let id = request.id().unwrap_or("");
            if resource_type == "Patient" && resources::unfinished_patient(state, id)? {
                // Finishing it signs the patient's own transactions, which cannot join the
                // author's atomic group.
                return Err(patient_in_transaction(format!(
                    "Patient/{id} is a creation that did not finish: finish it with its own \
                     PUT (or in a batch), not in a transaction"
                )));
            }
            let mut resource = own_id(request.body()?, id)?;
            rewrite_references(&mut resource, rewrites);
            let (prepared, status) = resources::prepare_update(
                state,
                caller,
                resource_type,
                id,
                resource,
                request.if_match,
            )
            .await?;
            Ok(Staged::Write(Box::new(prepared), status))
        }
        Method::Delete => {
            caller.require(resource_type, Interaction::Delete)?;
            let id = request.id().unwrap_or("");
            match resources::prepare_delete(state, caller, resource_type, id, request.if_match)
                .await?
            {
                Ok(prepared) => Ok(Staged::Write(Box::new(prepared), StatusCode::OK)),
                Err(already) => Ok(Staged::AlreadyDeleted(already)),
            }
        }
        Method::Get => Err(Outcome::bad_request("a transaction holds only writes")),
    }
}

/// Replaces every string equal to a created entry's `urn:uuid:` fullUrl with the
/// reference `Type/id` the server assigned (FHIR's transaction reference resolution).
fn rewrite_references(value: &mut Value, rewrites: &BTreeMap<String, String>) {
    if rewrites.is_empty() {
        return;
    }
    match value {
        Value::String(text) => {
            if let Some(reference) = rewrites.get(text.as_str()) {
                *text = reference.clone();
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| rewrite_references(item, rewrites)),
        Value::Object(map) => map
            .values_mut()
            .for_each(|item| rewrite_references(item, rewrites)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_to_created_entries_are_rewritten_wherever_they_appear() {
        // Proves the rewrite replaces exactly the strings equal to a created entry's
        // fullUrl, in nested objects and arrays, and leaves every other string alone.
        let rewrites: BTreeMap<String, String> = [(
            "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a".to_string(),
            "Encounter/hospital-a.1".to_string(),
        )]
        .into();
        let mut value = json!({
            "encounter": { "reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a" },
            "result": [{ "reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a" }],
            "note": [{ "text": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a and more" }],
            "subject": { "reference": "Patient/pt-1" },
        });
        rewrite_references(&mut value, &rewrites);
        assert_eq!(value["encounter"]["reference"], "Encounter/hospital-a.1");
        assert_eq!(value["result"][0]["reference"], "Encounter/hospital-a.1");
        assert_eq!(
            value["note"][0]["text"],
            "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a and more"
        );
        assert_eq!(value["subject"]["reference"], "Patient/pt-1");
    }
}

//! The node's HTTP JSON API: submit transactions, query state, read the audit trail, fetch
//! tree heads and proofs.
//!
//! Every error is a JSON object `{"error": {"code", "message"}}` with a fitting status;
//! bodies over `BODY_BYTES_MAX` are refused before they are parsed, and list endpoints page
//! with `after` and a bounded `limit`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use medledger_core::audit::{ConsistencyProof, InclusionProof, SignedTreeHead};
use medledger_core::block::{tx_leaf_bytes, Block};
use medledger_core::contracts::{decide, AccessQuery, TxOutcome};
use medledger_core::identity::Role;
use medledger_core::model::{
    AccessDecision, AccessRequest, Action, AuditEvent, BreakGlass, Consent, Contribution,
    EncryptionKey, Org, Patient, Purpose, Record, User, UserStatus,
};
use medledger_core::state::{keys, Overlay};
use medledger_core::tx::SignedTx;
use medledger_core::Hash;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::auth::{Interaction, ScopeContext};
use crate::fhir_api::{Caller, Outcome};
use crate::ledger::{now_ms, Ledger, SubmitError};
use crate::records::service::{History, OpenedVersion, PrepareRequest, Prepared, ReadRequest};
use crate::records::{RecordError, RecordService};
use crate::store::{Snapshot, StoreError};

/// Largest request body accepted, in bytes.
pub const BODY_BYTES_MAX: usize = 64 * 1024;
/// Largest body of a record upload: a resource and its attachments, base64url.
pub const RECORD_BODY_BYTES_MAX: usize = 48 * 1024 * 1024;
/// Longest a request may take; above the ledger's commit wait, so a submission answers
/// `outcome_unknown` itself before this cuts it off.
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Requests served at once; more wait their turn (and time out if the wait is too long).
pub const REQUESTS_IN_FLIGHT_MAX: usize = 1024;
/// Default and largest page of a listing.
pub const PAGE_DEFAULT: usize = 100;
pub const PAGE_MAX: usize = 1000;

pub fn router(ledger: Arc<Ledger>) -> Router {
    router_with(ledger, None)
}

/// The API with `more` routes (the FHIR API, and with it the record endpoints), all behind
/// the same limits: deadline, requests in flight, and no service from a stopped node.
pub fn router_with(ledger: Arc<Ledger>, more: Option<Router>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/transactions", post(submit))
        .route("/v1/transactions/{tx_id}", get(transaction))
        .route("/v1/blocks/{height}", get(block))
        .route("/v1/tree-head", get(tree_head))
        .route("/v1/proofs/inclusion", get(inclusion))
        .route("/v1/proofs/consistency", get(consistency))
        .route("/v1/nonces/{signer}", get(nonce))
        .route("/v1/orgs", get(orgs))
        .route("/v1/users/{user}", get(user))
        .route("/v1/patients/{patient}", get(patient))
        .route("/v1/encryption-keys/{party}", get(encryption_key))
        .route("/v1/patients/{patient}/records", get(patient_records))
        .route("/v1/patients/{patient}/consents", get(patient_consents))
        .route("/v1/patients/{patient}/requests", get(patient_requests))
        .route(
            "/v1/patients/{patient}/break-glass",
            get(patient_break_glass),
        )
        .route("/v1/records/{custodian}/{record_id}", get(record))
        .route("/v1/audit/patients/{patient}", get(audit_by_patient))
        .route("/v1/audit/actors/{actor}", get(audit_by_actor))
        .route(
            "/v1/audit/records/{custodian}/{record_id}",
            get(audit_by_record),
        )
        .route("/v1/access-decision", get(access_decision))
        .route("/v1/health", get(health))
        .route("/v1/contributions", get(contributions))
        .with_state(ledger.clone())
        .merge(more.unwrap_or_default())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            std::time::Duration::from_millis(REQUEST_TIMEOUT_MS),
        ))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            REQUESTS_IN_FLIGHT_MAX,
        ))
        .layer(axum::middleware::from_fn_with_state(
            ledger.clone(),
            refuse_when_fatal,
        ))
}

/// A node that stopped for good (a diverged state, a failed store) serves no ledger data,
/// only its status and health, which say why.
async fn refuse_when_fatal(
    State(ledger): State<Arc<Ledger>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    if path != "/v1/status" && path != "/v1/health" {
        if let Some(reason) = ledger.fatal() {
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "node_stopped", reason)
                .into_response();
        }
    }
    next.run(request).await
}

/// 200 while the node orders and serves; 503 with the reason otherwise.
async fn health(State(ledger): State<Arc<Ledger>>) -> Response {
    if let Some(reason) = ledger.fatal() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "node_stopped", reason)
            .into_response();
    }
    if ledger
        .stats()
        .ordering_stopped
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ordering_stopped",
            "the node serves reads but orders nothing",
        )
        .into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

#[derive(Deserialize)]
struct TransferRequest {
    /// The node to lead, `name@org`.
    to: String,
}

/// The operator endpoints: moving the consortium's leadership. Only an active org admin of
/// this node's organisation, with a user's token of this node's, may call them; `fhir_api`
/// mounts them behind the token check, as it does the record endpoints.
pub(crate) fn operator_routes(ledger: Arc<Ledger>) -> Router {
    Router::new()
        .route("/v1/consensus/transfer-leader", post(transfer_leader))
        .with_state(ledger)
}

async fn transfer_leader(
    State(ledger): State<Arc<Ledger>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Value> {
    operator(&ledger, &caller)?;
    let request: TransferRequest = json_body(body)?;
    ledger
        .transfer_leader(&request.to)
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "transfer_failed", e))?;
    Ok(Json(json!({"leader": request.to})))
}

/// Refuses unless the token's user is an active org admin of this node's organisation, as
/// the ledger has it now (a revoked admin's unexpired token is refused too).
fn operator(ledger: &Ledger, caller: &Caller) -> Result<(), ApiError> {
    let org = medledger_core::identity::split_user_id(ledger.node_id()).map(|(org, _)| org);
    let user: Option<User> = match org {
        Some(org) if user_of(caller, org) => snapshot(ledger)?.value(&keys::user(&caller.actor))?,
        _ => None,
    };
    match user {
        Some(user) if user.role == Role::OrgAdmin && user.status == UserStatus::Active => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "only an active org admin of {} may operate this node",
                org.unwrap_or("this node's organisation")
            ),
        )),
    }
}

/// An API error: a status and a stable code with a readable message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    tx_id: Option<Hash>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            tx_id: None,
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(tx_id) = self.tx_id {
            error["tx_id"] = json!(tx_id);
        }
        (self.status, Json(json!({ "error": error }))).into_response()
    }
}

/// A refused token or scope, in this API's error form.
impl From<Outcome> for ApiError {
    fn from(outcome: Outcome) -> ApiError {
        let code = match outcome.status {
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not_found",
            _ => "invalid_request",
        };
        let message = match &outcome.detail {
            Some(detail) => format!("{} ({detail})", outcome.diagnostics),
            None => outcome.diagnostics.clone(),
        };
        ApiError::new(outcome.status, code, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage",
            error.to_string(),
        )
    }
}

impl From<SubmitError> for ApiError {
    fn from(error: SubmitError) -> ApiError {
        let message = error.to_string();
        let (status, code) = match &error {
            SubmitError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_transaction"),
            SubmitError::WrongChain(_) => (StatusCode::BAD_REQUEST, "wrong_chain"),
            SubmitError::UnknownSigner(_) => (StatusCode::BAD_REQUEST, "unknown_signer"),
            SubmitError::BadSignature => (StatusCode::BAD_REQUEST, "bad_signature"),
            SubmitError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            SubmitError::OutcomeUnknown(_) => (StatusCode::GATEWAY_TIMEOUT, "outcome_unknown"),
            SubmitError::Stopped(_) => (StatusCode::SERVICE_UNAVAILABLE, "stopped"),
        };
        let mut api = ApiError::new(status, code, message);
        if let SubmitError::OutcomeUnknown(tx_id) = error {
            api.tx_id = Some(tx_id);
        }
        api
    }
}

impl From<RecordError> for ApiError {
    fn from(error: RecordError) -> ApiError {
        let status = match &error {
            RecordError::Invalid(_) => StatusCode::BAD_REQUEST,
            RecordError::Fhir(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RecordError::NotFound(_) => StatusCode::NOT_FOUND,
            RecordError::Conflict(_) | RecordError::NoEncryptionKey(_) => StatusCode::CONFLICT,
            RecordError::Denied { .. } => StatusCode::FORBIDDEN,
            RecordError::Integrity { .. } => StatusCode::BAD_GATEWAY,
            RecordError::Unavailable { .. } | RecordError::Ledger(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RecordError::OutcomeUnknown(_) => StatusCode::GATEWAY_TIMEOUT,
            RecordError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut api = ApiError::new(status, error.code(), error.to_string());
        if let RecordError::Denied { access_tx: tx, .. } | RecordError::OutcomeUnknown(tx) = error {
            api.tx_id = Some(tx);
        }
        api
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// A JSON body, or a typed refusal (too large, malformed).
fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            rejection.body_text(),
        )
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("malformed_json", e.to_string()))
}

/// The record endpoints: sealing a version to sign, reading a record, a patient's history.
/// Each acts for the user its bearer token names (a token of this node's, for one of its
/// organisation's users), as far as the token's scopes allow; `fhir_api` mounts them behind
/// the token check, which puts the verified `Caller` in the request.
pub(crate) fn record_routes(service: Arc<RecordService>) -> Router {
    Router::new()
        .route("/v1/records", post(prepare_record))
        .route(
            "/v1/records/{custodian}/{record_id}/read",
            post(read_record),
        )
        .route("/v1/patients/{patient}/history", post(patient_history))
        .layer(DefaultBodyLimit::max(RECORD_BODY_BYTES_MAX))
        .with_state(service)
}

/// Seals and stores a new record version; answers with the `create_record` body its
/// author signs and submits. The version exists once that transaction is committed.
async fn prepare_record(
    State(service): State<Arc<RecordService>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Prepared>), ApiError> {
    acting_user(&service, &caller, None)?;
    let request: PrepareRequest = json_body(body)?;
    let resource_type = request
        .resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default();
    caller.require(resource_type, Interaction::Create)?;
    Ok((StatusCode::CREATED, Json(service.prepare(request).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadBody {
    /// The user reading: the token's, which this may repeat (`name@org`).
    actor: Option<String>,
    version: Option<u64>,
    purpose: Purpose,
    #[serde(default)]
    attachments: bool,
}

/// Reads a record version from its custodian (this node or another), checked against the
/// ledger and decrypted; the custodian's access entry is on the ledger before it answers.
async fn read_record(
    State(service): State<Arc<RecordService>>,
    Extension(caller): Extension<Caller>,
    Path((custodian, record_id)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<OpenedVersion> {
    let body: ReadBody = json_body(body)?;
    let actor = acting_user(&service, &caller, body.actor)?;
    // The scopes are judged on the indexed type; an unknown record is the service's 404.
    let indexed = service
        .ledger()
        .store()
        .snapshot()?
        .value::<Record>(&keys::record(&custodian, &record_id))?;
    if let Some(record) = indexed {
        caller.require(&record.resource_type, Interaction::Read)?;
    }
    let request = ReadRequest {
        actor,
        custodian,
        record_id,
        version: body.version,
        purpose: body.purpose,
        attachments: body.attachments,
    };
    Ok(Json(service.read(request).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryBody {
    /// The user asking: the token's, which this may repeat (`name@org`).
    actor: Option<String>,
    purpose: Purpose,
}

/// A patient's records across custodians, as far as the actor may see them. The history
/// may hold any record type, so the token's scopes must allow reading every one.
async fn patient_history(
    State(service): State<Arc<RecordService>>,
    Extension(caller): Extension<Caller>,
    Path(patient): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<History> {
    let body: HistoryBody = json_body(body)?;
    let actor = acting_user(&service, &caller, body.actor)?;
    for resource_type in crate::fhir::record_types() {
        caller.require(resource_type, Interaction::Read)?;
    }
    Ok(Json(service.history(&actor, &patient, body.purpose).await?))
}

/// Whether `caller` holds a user's token (not a patient's or a backend client's) for a user
/// of `org`.
fn user_of(caller: &Caller, org: &str) -> bool {
    caller.context == ScopeContext::User
        && medledger_core::identity::split_user_id(&caller.actor)
            .is_some_and(|(user_org, _)| user_org == org)
}

/// The user a record request acts for: its token's, a user of this node's organisation
/// (not a patient or a backend client). An `actor` the body names must be that user.
fn acting_user(
    service: &RecordService,
    caller: &Caller,
    named: Option<String>,
) -> Result<String, ApiError> {
    let forbidden = |message: String| ApiError::new(StatusCode::FORBIDDEN, "forbidden", message);
    if !user_of(caller, service.org()) {
        return Err(forbidden(format!(
            "these endpoints act for a user of {} with a user's token",
            service.org()
        )));
    }
    match named {
        Some(named) if named != caller.actor => Err(forbidden(format!(
            "the token is {}'s, not {named}'s",
            caller.actor
        ))),
        _ => Ok(caller.actor.clone()),
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// axum's `Path`, refusing with a JSON `ApiError` (`invalid_path`) instead of axum's plain
/// text, so that every error keeps the API's shape.
struct Path<T>(T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(ApiError::new(
                rejection.status(),
                "invalid_path",
                rejection.body_text(),
            )),
        }
    }
}

/// axum's `Query`, refusing with a JSON `ApiError` (`invalid_query`) instead of axum's
/// plain text.
struct Query<T>(T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(ApiError::bad_request(
                "invalid_query",
                rejection.body_text(),
            )),
        }
    }
}

#[derive(Serialize)]
struct Status {
    chain_id: String,
    node: String,
    height: u64,
    block_hash: Hash,
    log_size: u64,
    log_root: Hash,
    state_hash: Hash,
    time_ms: u64,
    blocks_committed: u64,
    txs_committed: u64,
    /// `running`, or `stopped` when the node no longer accepts transactions.
    ordering: &'static str,
    /// Role, term, leader, log positions, voters and (on the leader) each peer's lag.
    #[serde(skip_serializing_if = "Option::is_none")]
    consensus: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fatal: Option<String>,
}

async fn status(State(ledger): State<Arc<Ledger>>) -> ApiResult<Status> {
    let head = ledger.store().head()?.ok_or(StoreError::Empty)?;
    let stats = ledger.stats();
    Ok(Json(Status {
        chain_id: head.chain_id,
        node: ledger.node_id().to_string(),
        height: head.height,
        block_hash: head.block_hash,
        log_size: head.log_size,
        log_root: head.log_root,
        state_hash: head.state_hash,
        time_ms: head.time_ms,
        blocks_committed: stats.blocks.load(std::sync::atomic::Ordering::Relaxed),
        txs_committed: stats.txs.load(std::sync::atomic::Ordering::Relaxed),
        ordering: if stats
            .ordering_stopped
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            "stopped"
        } else {
            "running"
        },
        consensus: ledger.consensus(),
        fatal: ledger.fatal(),
    }))
}

/// The answer to a committed transaction: where it landed, what the ledger decided, the
/// signed tree head after its block and the proof that it is in that tree.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SubmitResponse {
    pub tx_id: Hash,
    pub height: u64,
    pub leaf_index: u64,
    pub outcome: TxOutcome,
    pub tree_head: SignedTreeHead,
    pub inclusion_proof: InclusionProof,
}

async fn submit(
    State(ledger): State<Arc<Ledger>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<SubmitResponse> {
    let body = body.map_err(|rejection| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("{rejection} (limit {BODY_BYTES_MAX} bytes)"),
        )
    })?;
    let tx: SignedTx = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("malformed_json", e.to_string()))?;
    let committed = ledger.submit(tx.clone()).await?;
    let size = committed.tree_head.tree_head.log_size;
    let path = ledger
        .store()
        .snapshot()?
        .inclusion_proof(committed.leaf_index, size)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "proof", e.to_string()))?;
    let leaf = tx_leaf_bytes(
        committed.height,
        committed.position,
        &tx,
        &committed.outcome,
    );
    Ok(Json(SubmitResponse {
        tx_id: committed.tx_id,
        height: committed.height,
        leaf_index: committed.leaf_index,
        outcome: committed.outcome,
        tree_head: (*committed.tree_head).clone(),
        inclusion_proof: InclusionProof {
            leaf_index: committed.leaf_index,
            log_size: size,
            leaf: serde_json::from_slice(&leaf).expect("leaf bytes are JSON"),
            path,
        },
    }))
}

fn parse_hash(text: &str, what: &str) -> Result<Hash, ApiError> {
    Hash::from_hex(text)
        .map_err(|_| ApiError::bad_request("invalid_id", format!("{what} is 64 hex digits")))
}

fn snapshot(ledger: &Ledger) -> Result<Snapshot, ApiError> {
    Ok(ledger.store().snapshot()?)
}

fn required<T: serde::de::DeserializeOwned>(
    snapshot: &Snapshot,
    key: &str,
    what: &str,
) -> Result<T, ApiError> {
    snapshot
        .value(key)?
        .ok_or_else(|| ApiError::not_found(format!("{what} not found")))
}

/// A committed transaction by id: its audit event and outcome.
async fn transaction(
    State(ledger): State<Arc<Ledger>>,
    Path(tx_id): Path<String>,
) -> ApiResult<Value> {
    let tx_id = parse_hash(&tx_id, "tx_id")?;
    let found = ledger
        .store()
        .committed_tx(&snapshot(&ledger)?, &tx_id)?
        .ok_or_else(|| ApiError::not_found("transaction not found"))?;
    Ok(Json(json!({
        "tx_id": tx_id,
        "height": found.event.height,
        "leaf_index": found.leaf_index,
        "tx": found.tx(),
        "outcome": found.outcome(),
        "event": found.event,
    })))
}

async fn block(State(ledger): State<Arc<Ledger>>, Path(height): Path<u64>) -> ApiResult<Block> {
    ledger
        .store()
        .block(height)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("block {height}")))
}

async fn tree_head(State(ledger): State<Arc<Ledger>>) -> ApiResult<SignedTreeHead> {
    Ok(Json((*ledger.tree_head()).clone()))
}

#[derive(Deserialize)]
struct InclusionParams {
    leaf_index: u64,
    log_size: Option<u64>,
}

/// An inclusion proof of one leaf, with the leaf's bytes, against a given or the latest size.
async fn inclusion(
    State(ledger): State<Arc<Ledger>>,
    Query(params): Query<InclusionParams>,
) -> ApiResult<InclusionProof> {
    let latest = ledger.tree_head().tree_head.log_size;
    let size = params.log_size.unwrap_or(latest);
    if size > latest || params.leaf_index >= size {
        return Err(ApiError::bad_request(
            "out_of_range",
            format!("need leaf_index < log_size <= {latest}"),
        ));
    }
    let snapshot = snapshot(&ledger)?;
    let path = snapshot
        .inclusion_proof(params.leaf_index, size)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "proof", e.to_string()))?;
    let leaf = leaf_value(&ledger, &snapshot, params.leaf_index)?;
    Ok(Json(InclusionProof {
        leaf_index: params.leaf_index,
        log_size: size,
        leaf,
        path,
    }))
}

/// The bytes of a leaf, rebuilt from its block.
fn leaf_value(ledger: &Ledger, snapshot: &Snapshot, leaf_index: u64) -> Result<Value, ApiError> {
    // A transaction refused before the contracts ran (a replay, a stale nonce) and the
    // genesis leaf have no audit event: find their block by the blocks' log sizes.
    let height = match snapshot.value::<AuditEvent>(&keys::event(leaf_index))? {
        Some(event) => event.height,
        None => leaf_height(ledger, leaf_index)?,
    };
    let block = ledger
        .store()
        .block(height)?
        .ok_or_else(|| ApiError::not_found("block"))?;
    let first_leaf = block.header.log_size - block.header.tx_count.max(1);
    let leaves = medledger_core::block::block_leaves(&block);
    let bytes = leaves
        .get((leaf_index - first_leaf) as usize)
        .ok_or_else(|| ApiError::not_found("leaf"))?;
    Ok(serde_json::from_slice(bytes).expect("leaf bytes are JSON"))
}

/// The height of the block holding `leaf_index`: the first whose log size exceeds it.
fn leaf_height(ledger: &Ledger, leaf_index: u64) -> Result<u64, ApiError> {
    let head = ledger.store().head()?.ok_or(StoreError::Empty)?;
    let (mut low, mut high) = (0, head.height);
    while low < high {
        let middle = low + (high - low) / 2;
        let block = ledger
            .store()
            .block(middle)?
            .ok_or_else(|| ApiError::not_found("block"))?;
        if block.header.log_size > leaf_index {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    Ok(low)
}

#[derive(Deserialize)]
struct ConsistencyParams {
    old_size: u64,
    new_size: Option<u64>,
}

async fn consistency(
    State(ledger): State<Arc<Ledger>>,
    Query(params): Query<ConsistencyParams>,
) -> ApiResult<ConsistencyProof> {
    let latest = ledger.tree_head().tree_head.log_size;
    let new_size = params.new_size.unwrap_or(latest);
    if new_size > latest || params.old_size > new_size {
        return Err(ApiError::bad_request(
            "out_of_range",
            format!("need old_size <= new_size <= {latest}"),
        ));
    }
    let path = snapshot(&ledger)?
        .consistency_proof(params.old_size, new_size)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "proof", e.to_string()))?;
    Ok(Json(ConsistencyProof {
        old_size: params.old_size,
        new_size,
        path,
    }))
}

async fn nonce(State(ledger): State<Arc<Ledger>>, Path(signer): Path<String>) -> ApiResult<Value> {
    let last: u64 = snapshot(&ledger)?
        .value(&keys::nonce(&signer))?
        .unwrap_or(0);
    Ok(Json(json!({ "signer": signer, "last_nonce": last })))
}

async fn orgs(State(ledger): State<Arc<Ledger>>) -> ApiResult<Vec<Org>> {
    let snapshot = snapshot(&ledger)?;
    let ids: Vec<String> = snapshot.value(keys::ORGS)?.unwrap_or_default();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(required(&snapshot, &keys::org(&id), "organisation")?);
    }
    Ok(Json(out))
}

/// Every organisation's contribution as the ledger counted it, in organisation order.
async fn contributions(State(ledger): State<Arc<Ledger>>) -> ApiResult<Vec<Contribution>> {
    let snapshot = snapshot(&ledger)?;
    let ids: Vec<String> = snapshot.value(keys::ORGS)?.unwrap_or_default();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(
            snapshot
                .value(&keys::contribution(&id))?
                .unwrap_or(Contribution {
                    org: id,
                    ..Contribution::default()
                }),
        );
    }
    Ok(Json(out))
}

async fn user(State(ledger): State<Arc<Ledger>>, Path(user): Path<String>) -> ApiResult<User> {
    Ok(Json(required(
        &snapshot(&ledger)?,
        &keys::user(&user),
        "user",
    )?))
}

async fn patient(
    State(ledger): State<Arc<Ledger>>,
    Path(patient): Path<String>,
) -> ApiResult<Patient> {
    Ok(Json(required(
        &snapshot(&ledger)?,
        &keys::patient(&patient),
        "patient",
    )?))
}

/// The encryption key a patient or an organisation published.
async fn encryption_key(
    State(ledger): State<Arc<Ledger>>,
    Path(party): Path<String>,
) -> ApiResult<EncryptionKey> {
    Ok(Json(required(
        &snapshot(&ledger)?,
        &keys::encryption_key(&party),
        "encryption key",
    )?))
}

async fn record(
    State(ledger): State<Arc<Ledger>>,
    Path((custodian, record_id)): Path<(String, String)>,
) -> ApiResult<Record> {
    Ok(Json(required(
        &snapshot(&ledger)?,
        &keys::record(&custodian, &record_id),
        "record",
    )?))
}

#[derive(Deserialize)]
struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

impl Page {
    fn limit(&self) -> usize {
        self.limit.unwrap_or(PAGE_DEFAULT).clamp(1, PAGE_MAX)
    }
}

/// Keys under `prefix`, paged by the key suffix after the prefix.
fn page_keys(snapshot: &Snapshot, prefix: &str, page: &Page) -> Result<Vec<String>, ApiError> {
    let after = page.after.as_ref().map(|a| format!("{prefix}{a}"));
    Ok(snapshot
        .scan(prefix, after.as_deref(), page.limit())?
        .into_iter()
        .map(|(key, _)| key[prefix.len()..].to_string())
        .collect())
}

/// The patient's record index: every version of every record at every custodian.
async fn patient_records(
    State(ledger): State<Arc<Ledger>>,
    Path(patient): Path<String>,
    Query(page): Query<Page>,
) -> ApiResult<Vec<Record>> {
    let snapshot = snapshot(&ledger)?;
    let prefix = keys::patient_records_prefix(&patient);
    let mut out = Vec::new();
    for suffix in page_keys(&snapshot, &prefix, &page)? {
        if let Some((custodian, record_id)) = suffix.split_once('/') {
            out.push(required(
                &snapshot,
                &keys::record(custodian, record_id),
                "record",
            )?);
        }
    }
    Ok(Json(out))
}

/// Every consent the patient granted, in force or not, paged by consent id.
async fn patient_consents(
    State(ledger): State<Arc<Ledger>>,
    Path(patient): Path<String>,
    Query(page): Query<Page>,
) -> ApiResult<Vec<Consent>> {
    let prefix = keys::patient_consent_prefix(&patient);
    by_id_index(&ledger, &prefix, &page, keys::consent, "consent")
}

/// The values of an index whose key suffixes are ids, one page of them.
fn by_id_index<T: serde::de::DeserializeOwned>(
    ledger: &Ledger,
    prefix: &str,
    page: &Page,
    item_key: fn(&Hash) -> String,
    what: &str,
) -> ApiResult<Vec<T>> {
    let snapshot = snapshot(ledger)?;
    let mut out = Vec::new();
    for id in page_keys(&snapshot, prefix, page)? {
        out.push(required(
            &snapshot,
            &item_key(&parse_hash(&id, what)?),
            what,
        )?);
    }
    Ok(Json(out))
}

async fn patient_requests(
    State(ledger): State<Arc<Ledger>>,
    Path(patient): Path<String>,
    Query(page): Query<Page>,
) -> ApiResult<Vec<AccessRequest>> {
    let prefix = keys::patient_request_prefix(&patient);
    by_id_index(&ledger, &prefix, &page, keys::request, "request")
}

/// Every break-glass opened for the patient, paged by id.
async fn patient_break_glass(
    State(ledger): State<Arc<Ledger>>,
    Path(patient): Path<String>,
    Query(page): Query<Page>,
) -> ApiResult<Vec<BreakGlass>> {
    let prefix = keys::patient_break_glass_prefix(&patient);
    by_id_index(&ledger, &prefix, &page, keys::break_glass, "break-glass")
}

/// Audit events under an index prefix; `after` is a leaf index.
fn audit_events(ledger: &Ledger, prefix: String, page: &Page) -> ApiResult<Vec<AuditEvent>> {
    let snapshot = snapshot(ledger)?;
    let page = Page {
        after: match &page.after {
            Some(after) => Some(format!(
                "{:016x}",
                after
                    .parse::<u64>()
                    .map_err(|_| ApiError::bad_request("invalid_page", "after is a leaf index"))?
            )),
            None => None,
        },
        limit: page.limit,
    };
    let mut out = Vec::new();
    for suffix in page_keys(&snapshot, &prefix, &page)? {
        let leaf = u64::from_str_radix(&suffix, 16).map_err(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "index", "bad index key")
        })?;
        out.push(required(&snapshot, &keys::event(leaf), "audit event")?);
    }
    Ok(Json(out))
}

async fn audit_by_patient(
    State(ledger): State<Arc<Ledger>>,
    Path(patient): Path<String>,
    Query(page): Query<Page>,
) -> ApiResult<Vec<AuditEvent>> {
    audit_events(&ledger, keys::event_by_patient_prefix(&patient), &page)
}

async fn audit_by_actor(
    State(ledger): State<Arc<Ledger>>,
    Path(actor): Path<String>,
    Query(page): Query<Page>,
) -> ApiResult<Vec<AuditEvent>> {
    audit_events(&ledger, keys::event_by_actor_prefix(&actor), &page)
}

async fn audit_by_record(
    State(ledger): State<Arc<Ledger>>,
    Path((custodian, record_id)): Path<(String, String)>,
    Query(page): Query<Page>,
) -> ApiResult<Vec<AuditEvent>> {
    audit_events(
        &ledger,
        keys::event_by_record_prefix(&custodian, &record_id),
        &page,
    )
}

#[derive(Deserialize)]
struct DecisionParams {
    actor: String,
    action: Action,
    purpose: Purpose,
    /// `custodian/record_id`; or `patient` with `resource_type`.
    record: Option<String>,
    patient: Option<String>,
    resource_type: Option<String>,
}

/// "May this actor do this action on this record (or these types of the patient's) now?"
/// The same policy the ledger applies to access entries, evaluated on the latest state.
async fn access_decision(
    State(ledger): State<Arc<Ledger>>,
    Query(params): Query<DecisionParams>,
) -> ApiResult<Value> {
    let snapshot = snapshot(&ledger)?;
    let (patient, resource_type) = match (&params.record, &params.patient, &params.resource_type) {
        (Some(record), None, None) => {
            let (custodian, record_id) = record.split_once('/').ok_or_else(|| {
                ApiError::bad_request("invalid_record", "record is custodian/record_id")
            })?;
            let record: Record =
                required(&snapshot, &keys::record(custodian, record_id), "record")?;
            (record.patient, record.resource_type)
        }
        (None, Some(patient), Some(resource_type)) => (patient.clone(), resource_type.clone()),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "give either record, or patient and resource_type",
            ))
        }
    };
    let time_ms = now_ms().max(ledger.store().head()?.map(|h| h.time_ms).unwrap_or(0));
    let state = Overlay::new(&snapshot);
    let decision: AccessDecision = decide(
        &state,
        &AccessQuery {
            actor: &params.actor,
            patient: &patient,
            action: params.action,
            resource_types: std::slice::from_ref(&resource_type),
            purpose: Some(params.purpose),
            time_ms,
        },
    );
    Ok(Json(json!({
        "actor": params.actor,
        "patient": patient,
        "resource_type": resource_type,
        "action": params.action,
        "purpose": params.purpose,
        "time_ms": time_ms,
        "decision": decision,
    })))
}

/// Serves the ledger's API (no record endpoints) on `listener` until `shutdown` resolves.
pub async fn serve(
    ledger: Arc<Ledger>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_router(router(ledger), listener, shutdown).await
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve_router(
    router: Router,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

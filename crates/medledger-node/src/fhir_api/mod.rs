//! The FHIR R4 REST API at `/fhir`, with SMART on FHIR authorization.
//!
//! Every call carries a bearer token this node issued (`/auth/token`: a person's password
//! and one-time code, directly or through a SMART app's authorization code, or a system's
//! signed assertion). Three things must allow a call: the token's scopes, the person's
//! role (as the ledger knows it) and the patient's consent, which the ledger decides. The node signs ledger transactions for the person with their
//! own key, held in the key file their account names, so authorship on the ledger is the
//! person's, not the node's.
//!
//! Records are the encrypted versions of `records::service`; a read or search is the same
//! consented, audited exchange between custodians. Consents are the ledger's grants,
//! AuditEvents its access entries, Provenance its record index; Practitioner and
//! Organization come from its registry of members.

mod bundles;
mod launch;
mod resources;
mod views;

pub use bundles::{BATCH_ENTRIES_MAX, TRANSACTION_ENTRIES_MAX};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use medledger_core::contracts::{Rejection, TxOutcome};
use medledger_core::identity::{is_patient_pseudonym, split_user_id};
use medledger_core::tx::TxBody;
use serde_json::{json, Value};

use crate::auth::{
    is_code_verifier, verify_client_assertion, Account, AccountKind, AccountStore, AuthError,
    Claims, CodeStore, IdTokenClaims, Interaction, JtiCache, ScopeContext, Scopes, TokenError,
    TokenIssuer,
};
use crate::consortium::Identity;
use crate::ledger::{now_ms, Committed, Ledger, NonceCounter, SubmitError};
use crate::records::{RecordError, RecordService};
use crate::refresh::{RefreshError, RefreshSessions, SessionGrant, SESSIONS_FILE};
use crate::store::{Snapshot, StoreError};

/// The media type of every FHIR answer.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";
/// Largest FHIR request body: a resource is at most 1 MiB as JSON.
pub const FHIR_BODY_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Default and largest page of a search.
pub const SEARCH_PAGE_DEFAULT: usize = 20;
pub const SEARCH_PAGE_MAX: usize = 200;
/// How long a transaction the node signs for a person stays valid for ordering.
const SIGNED_TX_LIFETIME_MS: u64 = 5 * 60 * 1000;
/// The node's accounts (people and systems), in its data directory.
pub const ACCOUNTS_FILE: &str = "accounts.json";
/// The key the node signs access tokens with, in its data directory.
pub const TOKEN_KEY_FILE: &str = "token-key.pem";
/// How long an access token lives.
pub const TOKEN_LIFETIME_S: u64 = 3600;

/// The API's clock: seconds since the Unix epoch. Tests replace it to move time on.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Where the API lives and where accounts and keys are kept.
#[derive(Debug, Clone)]
pub struct FhirConfig {
    /// The FHIR base URL clients use, e.g. `http://127.0.0.1:7001/fhir`; tokens name it as
    /// their audience.
    pub base_url: String,
    /// The token issuer, e.g. `http://127.0.0.1:7001`.
    pub issuer: String,
    /// The node's data directory: account key files named relatively are found here, and
    /// patients created through the API keep their key files under `patients/`.
    pub data_dir: PathBuf,
}

/// Everything a FHIR call needs.
pub struct FhirState {
    pub ledger: Arc<Ledger>,
    pub records: Arc<RecordService>,
    accounts: Accounts,
    pub tokens: TokenIssuer,
    pub config: FhirConfig,
    assertions: JtiCache,
    /// Authorization codes of the SMART App Launch, until exchanged or expired.
    codes: CodeStore,
    /// The refresh sessions of logins granted `offline_access`.
    sessions: RefreshSessions,
    clock: RwLock<Clock>,
    signers: Signers,
    /// Held while a cut-short Patient creation is finished, so that two requests finishing
    /// the same patient do not both give its consent.
    pub(super) finishing: tokio::sync::Mutex<()>,
}

impl FhirState {
    pub fn new(
        records: Arc<RecordService>,
        accounts: Arc<AccountStore>,
        tokens: TokenIssuer,
        config: FhirConfig,
        sessions: RefreshSessions,
    ) -> FhirState {
        FhirState {
            sessions,
            signers: Signers::default(),
            ledger: records.ledger().clone(),
            records,
            accounts: Accounts::new(accounts, config.data_dir.join(ACCOUNTS_FILE)),
            tokens,
            config,
            assertions: JtiCache::default(),
            codes: CodeStore::default(),
            clock: RwLock::new(Arc::new(|| now_ms() / 1000)),
            finishing: tokio::sync::Mutex::new(()),
        }
    }

    /// The time now by the API's clock, in seconds: what tokens, codes and logins are
    /// judged against.
    pub fn now_s(&self) -> u64 {
        let clock = self
            .clock
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        clock()
    }

    /// Replaces the API's clock (the system clock by default).
    pub fn set_clock(&self, clock: Clock) {
        *self
            .clock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = clock;
    }

    /// The FHIR API of the node whose data directory is `data_dir` and whose API clients
    /// reach at `api_url`: its accounts file and token key (created on first use).
    pub fn open(
        records: Arc<RecordService>,
        data_dir: &std::path::Path,
        api_url: &str,
    ) -> Result<FhirState, String> {
        let accounts = AccountStore::open(&data_dir.join(ACCOUNTS_FILE))
            .map_err(|e| format!("{ACCOUNTS_FILE}: {e}"))?;
        let keys = crate::auth::TokenKeys::load_or_create(&data_dir.join(TOKEN_KEY_FILE))
            .map_err(|e| format!("{TOKEN_KEY_FILE}: {e}"))?;
        let api_url = api_url.trim_end_matches('/');
        let config = FhirConfig {
            base_url: format!("{api_url}/fhir"),
            issuer: api_url.to_string(),
            data_dir: data_dir.to_path_buf(),
        };
        let tokens = TokenIssuer::new(keys, &config.issuer, &config.base_url, TOKEN_LIFETIME_S);
        let sessions = RefreshSessions::open(&data_dir.join(SESSIONS_FILE))
            .map_err(|e| format!("{SESSIONS_FILE}: {e}"))?;
        Ok(FhirState::new(
            records,
            Arc::new(accounts),
            tokens,
            config,
            sessions,
        ))
    }

    /// The accounts as the file now holds them: `medledger account add` writes the file
    /// while the node runs, and the node reads it again when it changed.
    pub fn accounts(&self) -> Arc<AccountStore> {
        self.accounts.current()
    }

    /// The ledger's state now.
    pub(crate) fn snapshot(&self) -> Result<Snapshot, Outcome> {
        Ok(self.ledger.store().snapshot()?)
    }

    pub fn token_url(&self) -> String {
        format!("{}/auth/token", self.config.issuer)
    }

    /// Where a SMART app sends a person to log in.
    pub fn authorize_url(&self) -> String {
        format!("{}/auth/authorize", self.config.issuer)
    }
}

/// A node's whole HTTP API: the JSON API and, when it keeps records, the FHIR API with its
/// token endpoint and the JSON API's record endpoints (behind the same tokens). `api_url`
/// is how clients reach it.
pub fn node_api(
    ledger: Arc<Ledger>,
    records: Option<Arc<RecordService>>,
    data_dir: &std::path::Path,
    api_url: &str,
) -> Result<Router, String> {
    let fhir = match &records {
        None => None,
        Some(records) => Some(router(Arc::new(FhirState::open(
            records.clone(),
            data_dir,
            api_url,
        )?))),
    };
    Ok(crate::api::router_with(ledger, fhir))
}

/// The FHIR routes (nested at `/fhir`, with FHIR answers for unknown paths), the token
/// endpoint, the SMART discovery document, and the JSON API's record and operator endpoints
/// behind the same tokens (`api::record_routes`, `api::operator_routes`). It has no
/// fallback of its own at the top, so it merges into the node's API.
pub fn router(state: Arc<FhirState>) -> Router {
    let behind_tokens = crate::api::record_routes(state.records.clone())
        .merge(crate::api::operator_routes(state.ledger.clone()))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            with_caller,
        ));
    let fhir = Router::new()
        .route("/.well-known/smart-configuration", get(smart_configuration))
        .route("/metadata", get(views::capability_statement))
        .route("/", post(bundles::process))
        .route(
            "/{resource_type}",
            get(resources::search).post(resources::create),
        )
        .route("/{resource_type}/_history", get(resources::type_history))
        .route(
            "/{resource_type}/{id}",
            get(resources::read)
                .put(resources::update)
                .delete(resources::delete),
        )
        .route(
            "/{resource_type}/{id}/{operation}",
            get(resources::instance_operation),
        )
        .route(
            "/{resource_type}/{id}/_history/{version}",
            get(resources::vread),
        )
        .fallback(fhir_not_found)
        .method_not_allowed_fallback(fhir_method_not_allowed)
        .layer(DefaultBodyLimit::max(FHIR_BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn(name_access_entries))
        .with_state(state.clone());
    Router::new()
        .route("/.well-known/smart-configuration", get(smart_configuration))
        .route(
            "/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/auth/token", post(token))
        .route(
            "/auth/authorize",
            get(launch::authorize_form).post(launch::authorize_login),
        )
        .route("/auth/jwks", get(jwks))
        .with_state(state)
        .nest("/fhir", fhir)
        .merge(behind_tokens)
}

/// Lets a request through only with a valid bearer token of this node's, and hands the
/// verified caller to the handler; refusals are the JSON API's errors.
async fn with_caller(
    State(state): State<Arc<FhirState>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authenticate(&state, request.headers()) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(outcome) => crate::api::ApiError::from(outcome).into_response(),
    }
}

/// The header naming the ledger entries a FHIR request left: its access entry (a read or
/// search, granted or denied) or its record version (a create or update), as transaction
/// ids in hex, comma-separated when a request made several.
pub const ACCESS_ENTRY_HEADER: &str = "x-access-entry";

/// Answers every FHIR request with the access entries it committed, so a client can fetch
/// their inclusion proofs (`/v1/proofs/inclusion`).
async fn name_access_entries(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (mut response, entries) = crate::ledger::collect_access_entries(next.run(request)).await;
    if !entries.is_empty() {
        let names: Vec<String> = entries.iter().map(|id| id.to_hex()).collect();
        if let Ok(value) = HeaderValue::from_str(&names.join(",")) {
            response.headers_mut().insert(ACCESS_ENTRY_HEADER, value);
        }
    }
    response
}

async fn fhir_method_not_allowed() -> Response {
    Outcome::not_supported("this interaction is not supported on this path").into_response()
}

async fn fhir_not_found() -> Response {
    Outcome::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "no such FHIR endpoint on this server",
    )
    .into_response()
}

// ---- errors -------------------------------------------------------------------------------

/// A FHIR error: an OperationOutcome with one issue and an HTTP status.
#[derive(Debug)]
pub struct Outcome {
    pub status: StatusCode,
    /// The issue type (FHIR `IssueType`): invalid, security, forbidden, not-found, ...
    pub code: &'static str,
    pub diagnostics: String,
    /// Our own code, for programs (`access_denied`, `token_expired`, ...).
    pub detail: Option<String>,
}

impl Outcome {
    pub fn new(status: StatusCode, code: &'static str, diagnostics: impl Into<String>) -> Outcome {
        Outcome {
            status,
            code,
            diagnostics: diagnostics.into(),
            detail: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Outcome {
        self.detail = Some(detail.into());
        self
    }

    pub fn bad_request(diagnostics: impl Into<String>) -> Outcome {
        Outcome::new(StatusCode::BAD_REQUEST, "invalid", diagnostics)
    }

    pub fn forbidden(diagnostics: impl Into<String>) -> Outcome {
        Outcome::new(StatusCode::FORBIDDEN, "forbidden", diagnostics)
    }

    pub fn not_found(diagnostics: impl Into<String>) -> Outcome {
        Outcome::new(StatusCode::NOT_FOUND, "not-found", diagnostics)
    }

    pub fn not_supported(diagnostics: impl Into<String>) -> Outcome {
        Outcome::new(StatusCode::METHOD_NOT_ALLOWED, "not-supported", diagnostics)
    }

    pub fn internal(diagnostics: impl Into<String>) -> Outcome {
        Outcome::new(StatusCode::INTERNAL_SERVER_ERROR, "exception", diagnostics)
    }

    fn resource(&self) -> Value {
        let mut issue = json!({
            "severity": "error",
            "code": self.code,
            "diagnostics": self.diagnostics,
        });
        if let Some(detail) = &self.detail {
            issue["details"] = json!({
                "coding": [{ "system": views::ERROR_CODE_SYSTEM, "code": detail }],
            });
        }
        json!({ "resourceType": "OperationOutcome", "issue": [issue] })
    }
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        let mut response = fhir_json(self.status, &self.resource());
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                self.diagnostics.replace('"', "'")
            );
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
        }
        response
    }
}

impl From<RecordError> for Outcome {
    fn from(error: RecordError) -> Outcome {
        let code = error.code();
        let outcome = match &error {
            RecordError::Invalid(_) => Outcome::bad_request(error.to_string()),
            RecordError::Fhir(crate::fhir::FhirError::TooLarge { .. }) => {
                Outcome::new(StatusCode::PAYLOAD_TOO_LARGE, "too-long", error.to_string())
            }
            RecordError::Fhir(_) => Outcome::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "processing",
                error.to_string(),
            ),
            RecordError::NotFound(_) => Outcome::not_found(error.to_string()),
            RecordError::Conflict(_) => {
                Outcome::new(StatusCode::CONFLICT, "conflict", error.to_string())
            }
            RecordError::NoEncryptionKey(_) => {
                Outcome::new(StatusCode::CONFLICT, "processing", error.to_string())
            }
            RecordError::Denied { .. } => Outcome::forbidden(error.to_string()),
            RecordError::Integrity { .. } => {
                Outcome::new(StatusCode::BAD_GATEWAY, "exception", error.to_string())
            }
            RecordError::Unavailable { .. } => Outcome::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                error.to_string(),
            ),
            RecordError::OutcomeUnknown(_) => {
                Outcome::new(StatusCode::GATEWAY_TIMEOUT, "timeout", error.to_string())
            }
            RecordError::Ledger(_) | RecordError::Store(_) => Outcome::internal(error.to_string()),
        };
        outcome.detail(code)
    }
}

impl From<StoreError> for Outcome {
    fn from(error: StoreError) -> Outcome {
        Outcome::internal(error.to_string())
    }
}

impl From<SubmitError> for Outcome {
    fn from(error: SubmitError) -> Outcome {
        Outcome::from(RecordError::from(error))
    }
}

/// A ledger refusal of a transaction signed for the caller.
fn rejected(rejection: &Rejection) -> Outcome {
    let text = rejection.to_string();
    let outcome = match rejection {
        Rejection::NotPermitted { .. }
        | Rejection::NoConsent { .. }
        | Rejection::SignerRevoked
        | Rejection::OrgNotActive { .. }
        | Rejection::CertificateNotValid { .. }
        | Rejection::UnknownSigner { .. } => Outcome::forbidden(text),
        Rejection::NotFound { .. } => Outcome::not_found(text),
        Rejection::Conflict { .. }
        | Rejection::AlreadyExists { .. }
        | Rejection::StaleNonce { .. }
        | Rejection::Duplicate { .. } => Outcome::new(StatusCode::CONFLICT, "conflict", text),
        _ => Outcome::new(StatusCode::UNPROCESSABLE_ENTITY, "business-rule", text),
    };
    outcome.detail(rejection.code())
}

pub type FhirResult = Result<Response, Outcome>;

/// A FHIR JSON answer.
pub fn fhir_json(status: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

// ---- callers --------------------------------------------------------------------------------

/// Who is calling, from their verified token.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The ledger identity acting: `name@org`, or a patient's pseudonym.
    pub actor: String,
    pub context: ScopeContext,
    pub scopes: Scopes,
    /// The patient a patient-context token is bound to.
    pub patient: Option<String>,
    pub claims: Claims,
}

impl Caller {
    /// Refuses unless the token's scopes allow `interaction` on `resource_type`.
    pub fn require(&self, resource_type: &str, interaction: Interaction) -> Result<(), Outcome> {
        if self.scopes.allows(self.context, resource_type, interaction) {
            return Ok(());
        }
        Err(Outcome::forbidden(format!(
            "the token's scopes do not allow {interaction:?} on {resource_type}"
        ))
        .detail("insufficient_scope"))
    }

    /// Refuses a patient-context caller acting on another patient.
    pub fn require_patient(&self, patient: &str) -> Result<(), Outcome> {
        match &self.patient {
            Some(own) if own != patient => Err(Outcome::forbidden(
                "a patient token reaches only its own patient's records",
            )
            .detail("wrong_patient")),
            _ => Ok(()),
        }
    }

    /// Why the data is used, as consents name it.
    pub fn purpose(&self) -> medledger_core::model::Purpose {
        match self.context {
            ScopeContext::Patient => medledger_core::model::Purpose::PatientRequest,
            ScopeContext::User | ScopeContext::System => medledger_core::model::Purpose::Treatment,
        }
    }
}

/// Verifies the bearer token and builds the caller; 401 for anything wrong with it.
pub fn authenticate(state: &FhirState, headers: &HeaderMap) -> Result<Caller, Outcome> {
    let unauthorized =
        |text: &str, code: &str| Outcome::new(StatusCode::UNAUTHORIZED, "login", text).detail(code);
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("a bearer token is required", "token_missing"))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or_else(|| {
            unauthorized(
                "the Authorization header is not a bearer token",
                "token_malformed",
            )
        })?;
    let claims = state
        .tokens
        .verify(token, state.now_s())
        .map_err(|e: TokenError| unauthorized(&e.to_string(), e.code()))?;
    let scopes =
        Scopes::parse(&claims.scope).map_err(|e| unauthorized(&e.to_string(), "token_scope"))?;
    let context = if claims.client_id.is_some() {
        ScopeContext::System
    } else if is_patient_pseudonym(&claims.sub) {
        ScopeContext::Patient
    } else {
        ScopeContext::User
    };
    if split_user_id(&claims.sub).is_none() && context != ScopeContext::Patient {
        return Err(unauthorized(
            "the token names no ledger user",
            "token_subject",
        ));
    }
    let patient = match context {
        ScopeContext::Patient => Some(claims.sub.clone()),
        _ => None,
    };
    Ok(Caller {
        actor: claims.sub.clone(),
        context,
        scopes,
        patient,
        claims,
    })
}

/// A file's modification time and size: when either changes, it is read again.
type FileStamp = (std::time::SystemTime, u64);

/// The accounts file, read again whenever its modification time or size changes.
struct Accounts {
    path: PathBuf,
    current: Mutex<(Option<FileStamp>, Arc<AccountStore>)>,
}

impl Accounts {
    fn new(store: Arc<AccountStore>, path: PathBuf) -> Accounts {
        let stamp = Accounts::stamp(&path);
        Accounts {
            path,
            current: Mutex::new((stamp, store)),
        }
    }

    fn stamp(path: &std::path::Path) -> Option<FileStamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }

    fn current(&self) -> Arc<AccountStore> {
        let mut current = self.current.lock().expect("accounts lock");
        let stamp = Accounts::stamp(&self.path);
        if stamp != current.0 {
            match AccountStore::open(&self.path) {
                Ok(store) => *current = (stamp, Arc::new(store)),
                Err(e) => {
                    eprintln!("medledger: {ACCOUNTS_FILE} does not load, keeping the last: {e}")
                }
            }
        }
        current.1.clone()
    }
}

// ---- signing for callers ---------------------------------------------------------------------

/// The keys of the people (and systems) the node signs for, and their nonces.
#[derive(Default)]
struct Signers {
    identities: Mutex<HashMap<String, Arc<Identity>>>,
    nonces: Mutex<HashMap<String, Arc<NonceCounter>>>,
}

impl FhirState {
    /// The key file of the caller's account (or, for a system, of the user it acts as),
    /// looked up on every call so that a removed account stops signing at once.
    fn identity_of(&self, caller: &Caller) -> Result<Arc<Identity>, Outcome> {
        let accounts = self.accounts();
        // A system signs with the key of the member user it acts as, whose account (and key
        // file) is at this node.
        let person = match &caller.claims.client_id {
            Some(client) => accounts.client(client).map(|c| c.acts_as),
            None => Some(caller.actor.clone()),
        };
        let file = person
            .and_then(|person| accounts.account(&person))
            .map(|account| account.identity_file)
            .ok_or_else(|| Outcome::forbidden("the caller's account no longer exists"))?;
        let cached = self
            .signers
            .identities
            .lock()
            .expect("identity lock")
            .get(&file)
            .cloned();
        let identity = match cached {
            Some(identity) => identity,
            None => {
                let identity = Arc::new(self.load_identity(&file)?);
                self.signers
                    .identities
                    .lock()
                    .expect("identity lock")
                    .insert(file, identity.clone());
                identity
            }
        };
        if identity.id != caller.actor {
            return Err(Outcome::internal(
                "the account's key file belongs to someone else",
            ));
        }
        Ok(identity)
    }

    fn load_identity(&self, file: &str) -> Result<Identity, Outcome> {
        let path = PathBuf::from(file);
        let path = if path.is_relative() {
            self.config.data_dir.join(path)
        } else {
            path
        };
        Identity::load(&path).map_err(|e| {
            eprintln!("medledger: an account's key file does not load: {e}");
            Outcome::internal("the account's key file does not load")
        })
    }

    /// Signs `body` for the caller and submits it; a ledger refusal becomes its outcome.
    async fn submit_for(&self, caller: &Caller, body: TxBody) -> Result<Committed, Outcome> {
        let identity = self.identity_of(caller)?;
        self.submit_as(&identity, body).await
    }

    async fn submit_as(&self, identity: &Identity, body: TxBody) -> Result<Committed, Outcome> {
        let nonces = self
            .signers
            .nonces
            .lock()
            .expect("nonce lock")
            .entry(identity.id.clone())
            .or_default()
            .clone();
        let committed: Committed = self
            .ledger
            .submit_signed::<Outcome>(
                &identity.id,
                &identity.key,
                &nonces,
                SIGNED_TX_LIFETIME_MS,
                |_| body.clone(),
            )
            .await?;
        match &committed.outcome {
            TxOutcome::Committed { .. } => Ok(committed),
            TxOutcome::Rejected { rejection } => Err(rejected(rejection)),
        }
    }
}

// ---- SMART: discovery and tokens ------------------------------------------------------------

async fn smart_configuration(State(state): State<Arc<FhirState>>) -> Response {
    let body = json!({
        "issuer": state.config.issuer,
        "jwks_uri": format!("{}/auth/jwks", state.config.issuer),
        "token_endpoint": state.token_url(),
        "authorization_endpoint": state.authorize_url(),
        // Backend services sign an assertion; registered public apps (PKCE) send only their id.
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES384", "RS384", "ES256"],
        "grant_types_supported": [
            "authorization_code", "client_credentials", "password", "refresh_token"
        ],
        "scopes_supported": [
            "patient/*.rs", "patient/*.cruds", "user/*.rs", "user/*.cruds", "system/*.rs",
            "system/*.cruds", "openid", "fhirUser", "offline_access"
        ],
        "response_types_supported": ["code"],
        "capabilities": [
            "launch-standalone", "client-public", "client-confidential-asymmetric",
            "context-standalone-patient", "permission-v2", "permission-v1",
            "permission-patient", "permission-user", "permission-offline",
            "sso-openid-connect"
        ],
        "code_challenge_methods_supported": ["S256"]
    });
    axum::Json(body).into_response()
}

/// OpenID Connect discovery: what an app needs to check the ID tokens of its logins.
async fn openid_configuration(State(state): State<Arc<FhirState>>) -> Response {
    let body = json!({
        "issuer": state.config.issuer,
        "jwks_uri": format!("{}/auth/jwks", state.config.issuer),
        "authorization_endpoint": state.authorize_url(),
        "token_endpoint": state.token_url(),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "scopes_supported": ["openid", "fhirUser", "offline_access"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nonce", "fhirUser", "amr"],
        "token_endpoint_auth_methods_supported": ["none", "private_key_jwt"],
        "code_challenge_methods_supported": ["S256"]
    });
    axum::Json(body).into_response()
}

async fn jwks(State(state): State<Arc<FhirState>>) -> Response {
    axum::Json(state.tokens.keys().jwks()).into_response()
}

/// An OAuth2 error answer (RFC 6749 §5.2).
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut response = (
        status,
        axum::Json(json!({ "error": error, "error_description": description })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// What a login gets: the scopes it asked for, narrowed to what the account or client
/// (`whose`) may have.
fn grant(requested: &Scopes, allowed: &str, whose: &str) -> Result<Scopes, Box<Response>> {
    let allowed = Scopes::parse(allowed).map_err(|_| {
        Box::new(oauth_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &format!("the {whose}'s scopes do not parse"),
        ))
    })?;
    Ok(requested.intersect(&allowed))
}

/// A person's access token, as a password login or an authorization code gives it: a
/// patient gets their own patient context, a practitioner none.
fn issue_for_person(
    state: &FhirState,
    account: &Account,
    granted: &Scopes,
    now_s: u64,
) -> Result<(String, Claims), AuthError> {
    let (patient, fhir_user) = match account.kind {
        AccountKind::Patient => (
            Some(account.username.clone()),
            Some(format!(
                "{}/Patient/{}",
                state.config.base_url, account.username
            )),
        ),
        AccountKind::Practitioner => (
            None,
            Some(format!(
                "{}/Practitioner/{}",
                state.config.base_url,
                views::practitioner_id(&account.username)
            )),
        ),
    };
    state.tokens.issue(
        &account.username,
        granted,
        patient.as_deref(),
        fhir_user.as_deref(),
        None,
        &["pwd", "otp"],
        now_s,
    )
}

/// `POST /auth/token`, form-encoded:
/// - `grant_type=password`, `username`, `password`, `totp` (the second factor), `scope`:
///   a person's login;
/// - `grant_type=authorization_code`, `code`, `redirect_uri`, `client_id`,
///   `code_verifier`: a SMART app exchanging the code of a person's login (`launch`);
/// - `grant_type=refresh_token`, `refresh_token`, `client_id` (the app's, if an app logged
///   in), `scope` (optional, at most what the login was granted): a login granted
///   `offline_access` going on (`refresh`);
/// - `grant_type=client_credentials`, `client_assertion_type` (jwt-bearer),
///   `client_assertion`, `scope`: SMART Backend Services.
///
/// The two person logins answer a `refresh_token` when `offline_access` was granted; a
/// refresh answers the session's next one.
async fn token(State(state): State<Arc<FhirState>>, body: Bytes) -> Response {
    let form: HashMap<String, String> = match std::str::from_utf8(&body).ok().and_then(decode_pairs)
    {
        Some(pairs) => pairs.into_iter().collect(),
        None => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the body is not application/x-www-form-urlencoded",
            )
        }
    };
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or("");
    let now_s = state.now_s();
    let requested = match Scopes::parse(field("scope")) {
        Ok(scopes) => scopes,
        Err(e) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", &e.to_string()),
    };
    // A person's login granted `offline_access` starts a refresh session; a refresh goes on
    // with the next token of its session.
    let mut refresh: Option<Refresh> = None;
    // An app's login granted `openid` gets an ID token too.
    let mut id_token: Option<IdTokenFor> = None;
    let issued = match field("grant_type") {
        "password" => {
            let accounts = state.accounts();
            let (username, password, code) = (
                field("username").to_string(),
                field("password").to_string(),
                field("totp").to_string(),
            );
            // argon2 is deliberately slow: off the async threads.
            let login = tokio::task::spawn_blocking(move || {
                accounts.login(&username, &password, &code, now_s)
            })
            .await;
            let account = match login {
                Ok(Ok(account)) => account,
                Ok(Err(e)) => {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", &e.to_string())
                }
                Err(_) => {
                    return oauth_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        "the login failed",
                    )
                }
            };
            let granted = match grant(&requested, &account.allowed_scopes, "account") {
                Ok(granted) => granted,
                Err(refusal) => return *refusal,
            };
            refresh = Refresh::start(&account, None, &granted);
            issue_for_person(&state, &account, &granted, now_s)
        }
        "authorization_code" => {
            let accounts = state.accounts();
            let client_id = field("client_id");
            if accounts.app(client_id).is_none() {
                return oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "client_id names no app registered at this server",
                );
            }
            for name in ["code", "redirect_uri", "code_verifier"] {
                if field(name).is_empty() {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        &format!("{name} is required"),
                    );
                }
            }
            if !is_code_verifier(field("code_verifier")) {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "code_verifier must be 43 to 128 characters of A-Z a-z 0-9 - . _ ~",
                );
            }
            let grant = match state.codes.redeem(
                field("code"),
                client_id,
                field("redirect_uri"),
                field("code_verifier"),
                now_s,
            ) {
                Ok(grant) => grant,
                Err(e) => {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", &e.to_string())
                }
            };
            let (Some(account), Ok(granted)) = (
                accounts.account(&grant.username),
                Scopes::parse(&grant.scope),
            ) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "the account that logged in no longer exists",
                );
            };
            refresh = Refresh::start(&account, Some(client_id), &granted);
            id_token = IdTokenFor::app(Some(client_id), grant.nonce, &granted);
            issue_for_person(&state, &account, &granted, now_s)
        }
        "refresh_token" => match blocking({
            let (state, requested, form) = (state.clone(), requested.clone(), form.clone());
            move || refreshed(&state, &requested, &form, now_s)
        })
        .await
        .and_then(|refreshed| refreshed)
        {
            Ok((account, granted, next, client_id)) => {
                refresh = Some(Refresh::Next(next));
                id_token = IdTokenFor::app(client_id.as_deref(), None, &granted);
                issue_for_person(&state, &account, &granted, now_s)
            }
            Err(refusal) => return *refusal,
        },
        "client_credentials" => {
            if field("client_assertion_type")
                != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                );
            }
            let client = match verify_client_assertion(
                &state.accounts(),
                field("client_assertion"),
                &state.token_url(),
                now_s,
                &state.assertions,
            ) {
                Ok(client) => client,
                Err(e) => {
                    return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", &e.to_string())
                }
            };
            let granted = match grant(&requested, &client.allowed_scopes, "client") {
                Ok(granted) => granted,
                Err(refusal) => return *refusal,
            };
            // The user the client acts as signs through their own account at this node.
            let acts_as = match state.accounts().account(&client.acts_as) {
                Some(account) => account.username,
                None => {
                    return oauth_error(
                        StatusCode::UNAUTHORIZED,
                        "invalid_client",
                        "the user this client acts as has no account at this node",
                    )
                }
            };
            state.tokens.issue(
                &acts_as,
                &granted,
                None,
                None,
                Some(&client.client_id),
                &["private_key_jwt"],
                now_s,
            )
        }
        other => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &format!("{other:?} is not a grant this server supports"),
            )
        }
    };
    match issued {
        Ok((token, claims)) => {
            let mut body = json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": claims.exp.saturating_sub(now_s),
                "scope": claims.scope,
            });
            if let Some(patient) = &claims.patient {
                body["patient"] = json!(patient);
            }
            let refresh_token = match refresh {
                Some(Refresh::Next(token)) => Some(token),
                Some(Refresh::Start(grant)) => match blocking({
                    let state = state.clone();
                    move || {
                        state
                            .sessions
                            .start(grant, now_s)
                            .map_err(|e| e.to_string())
                    }
                })
                .await
                {
                    Ok(Ok(token)) => token,
                    Err(refusal) => return *refusal,
                    Ok(Err(e)) => {
                        return oauth_error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "server_error",
                            &format!("the refresh session could not be kept: {e}"),
                        )
                    }
                },
                None => None,
            };
            if let Some(refresh_token) = refresh_token {
                body["refresh_token"] = json!(refresh_token);
            }
            if let Some(wanted) = id_token {
                let claims = IdTokenClaims {
                    sub: &claims.sub,
                    client_id: &wanted.client_id,
                    nonce: wanted.nonce.as_deref(),
                    fhir_user: claims.fhir_user.as_deref().filter(|_| wanted.fhir_user),
                    amr: &claims.amr,
                };
                match state.tokens.issue_id_token(claims, now_s) {
                    Ok(token) => body["id_token"] = json!(token),
                    Err(e) => {
                        return oauth_error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "server_error",
                            &e.to_string(),
                        )
                    }
                }
            }
            let mut response = axum::Json(body).into_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(e) => oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", &e.to_string()),
    }
}

/// The ID token a token answer carries: for the app a person logged in through, when the
/// login was granted `openid`.
struct IdTokenFor {
    client_id: String,
    nonce: Option<String>,
    /// Whether the `fhirUser` claim was granted.
    fhir_user: bool,
}

impl IdTokenFor {
    fn app(client_id: Option<&str>, nonce: Option<String>, granted: &Scopes) -> Option<IdTokenFor> {
        let client_id = client_id.filter(|_| granted.openid)?;
        Some(IdTokenFor {
            client_id: client_id.to_string(),
            nonce,
            fhir_user: granted.fhir_user,
        })
    }
}

/// What a token answer says about refreshing: a new session to start, or a session's next
/// token.
enum Refresh {
    Start(SessionGrant),
    Next(String),
}

impl Refresh {
    /// A session for a person's login, when it was granted `offline_access`.
    fn start(account: &Account, client_id: Option<&str>, granted: &Scopes) -> Option<Refresh> {
        granted.offline_access.then(|| {
            Refresh::Start(SessionGrant {
                username: account.username.clone(),
                client_id: client_id.map(str::to_string),
                scope: granted.to_string(),
            })
        })
    }
}

/// Runs `work` off the async threads (refresh sessions commit to disk); a panic in it is a
/// server error.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Box<Response>> {
    tokio::task::spawn_blocking(work).await.map_err(|_| {
        Box::new(oauth_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the refresh session could not be handled",
        ))
    })
}

/// Redeems a refresh token: the account, what this refresh grants (what was asked for, at
/// most what the login was granted and what the account may hold now) and the session's
/// next token, with the app that logged in. A removed account's sessions end; a locked
/// account refreshes nothing.
fn refreshed(
    state: &FhirState,
    requested: &Scopes,
    form: &HashMap<String, String>,
    now_s: u64,
) -> Result<(Account, Scopes, String, Option<String>), Box<Response>> {
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or("");
    let invalid_grant =
        |text: &str| Box::new(oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", text));
    let refused = |e: RefreshError| match e {
        RefreshError::Store(_) => Box::new(oauth_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &e.to_string(),
        )),
        _ => invalid_grant(&e.to_string()),
    };
    if field("refresh_token").is_empty() {
        return Err(Box::new(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "refresh_token is required",
        )));
    }
    let client_id = Some(field("client_id")).filter(|id| !id.is_empty());
    let session = state
        .sessions
        .check(field("refresh_token"), client_id, now_s)
        .map_err(refused)?;
    let accounts = state.accounts();
    if let Some(app) = &session.client_id {
        if accounts.app(app).is_none() {
            return Err(Box::new(oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "the app that logged in is no longer registered",
            )));
        }
    }
    let Some(account) = accounts.account(&session.username) else {
        let _ = state.sessions.end_sessions_of(&session.username);
        return Err(invalid_grant("the account that logged in no longer exists"));
    };
    if account.locked_until_s > now_s {
        return Err(invalid_grant(&crate::auth::AuthError::Locked.to_string()));
    }
    let original = Scopes::parse(&session.scope).map_err(|_| {
        Box::new(oauth_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the session's scopes do not parse",
        ))
    })?;
    let wanted = if requested.is_empty() {
        original
    } else if requested.intersect(&original) == *requested {
        requested.clone()
    } else {
        return Err(Box::new(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "a refresh may ask for no more than the login was granted",
        )));
    };
    let granted = grant(&wanted, &account.allowed_scopes, "account")?;
    // Only a refresh that will answer uses its token up.
    let next = state
        .sessions
        .rotate(field("refresh_token"), now_s)
        .map_err(refused)?;
    Ok((account, granted, next, session.client_id))
}

/// `name=value` pairs joined by `&`, decoded, in order: a query string or a form body.
/// None when an escape or the text is not well formed.
fn decode_pairs(text: &str) -> Option<Vec<(String, String)>> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(name)?, percent_decode(value)?))
        })
        .collect()
}

/// Decodes `%XX` escapes and `+` (a space in forms and query strings).
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Query pairs in order, decoded; a malformed escape is a 400.
pub fn query_pairs(query: &RawQuery) -> Result<Vec<(String, String)>, Outcome> {
    decode_pairs(query.0.as_deref().unwrap_or(""))
        .ok_or_else(|| Outcome::bad_request("the query string is not well encoded"))
}

/// The path parameters of a resource route.
pub type TypeAndId = Path<(String, String)>;

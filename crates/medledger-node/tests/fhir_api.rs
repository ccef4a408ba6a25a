//! The FHIR R4 API at its HTTP boundary: SMART discovery, logins and tokens, the record
//! interactions, errors as OperationOutcomes, consents, audit and provenance.
//!
//! Every test starts one node of hospital-a (a solo ledger, an embedded record store and
//! the FHIR API over its data directory) and drives the node's whole router in process,
//! without a socket. People who sign ledger transactions have an account whose key file
//! lies in the node's data directory; tokens for them are signed with the node's own token
//! key, except in the tests about logging in, which go through `/auth/token`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use medledger_core::identity::Role;
use medledger_core::model::Record;
use medledger_core::state::keys;
use medledger_core::tx::TxBody;
use medledger_node::auth::{
    percent_encode, totp_code, AccountKind, Client, Scopes, TokenIssuer, TokenKeys,
};
use medledger_node::consortium::{Consortium, Identity};
use medledger_node::fhir_api::{self, FhirState, TOKEN_KEY_FILE, TOKEN_LIFETIME_S};
use medledger_node::ledger::{now_ms, Ledger, OrderingConfig};
use medledger_node::pki::Validity;
use medledger_node::records::{EmbeddedStore, RecordService};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
use serde_json::{json, Value};
use tower::ServiceExt;

mod common;

const CHAIN: &str = "fhir-api-test";
const ORG: &str = "hospital-a";
/// How clients reach the node; tokens name `{API_URL}/fhir` as their audience.
const API_URL: &str = "http://127.0.0.1:7400";
const FHIR_BASE: &str = "http://127.0.0.1:7400/fhir";
const TOKEN_URL: &str = "http://127.0.0.1:7400/auth/token";
const PASSWORD: &str = "correct horse battery staple";
const HOUR_MS: u64 = 3_600_000;
const LOINC: &str = "http://loinc.org";
const HEART_RATE: &str = "8867-4";
const BODY_WEIGHT: &str = "29463-7";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const PROOF_EXTENSION: &str = "https://medledger.dev/fhir/StructureDefinition/inclusion-proof";

fn now_s() -> u64 {
    now_ms() / 1000
}

/// What came back from one request.
struct Answer {
    what: String,
    status: StatusCode,
    headers: HeaderMap,
    bytes: Bytes,
    /// The body as JSON, or Null when it is not JSON.
    body: Value,
}

impl Answer {
    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn text(&self) -> String {
        format!(
            "{}: {} {}",
            self.what,
            self.status,
            String::from_utf8_lossy(&self.bytes)
        )
    }

    /// Asserts the status and that the body is FHIR JSON.
    fn expect_fhir(&self, status: StatusCode) -> &Value {
        assert_eq!(self.status, status, "{}", self.text());
        let content_type = self.header(header::CONTENT_TYPE).unwrap_or("");
        assert!(
            content_type.starts_with("application/fhir+json"),
            "{}: content type {content_type:?}",
            self.what
        );
        &self.body
    }

    /// Asserts an OperationOutcome with this status, this FHIR `IssueType` code and (when
    /// given) our own code in `details`.
    fn expect_outcome(&self, status: StatusCode, code: &str, detail: Option<&str>) {
        let body = self.expect_fhir(status);
        assert_eq!(body["resourceType"], "OperationOutcome", "{}", self.text());
        assert_eq!(body["issue"][0]["severity"], "error", "{}", self.text());
        assert_eq!(body["issue"][0]["code"], code, "{}", self.text());
        assert!(
            body["issue"][0]["diagnostics"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{}",
            self.text()
        );
        if let Some(detail) = detail {
            assert_eq!(
                body["issue"][0]["details"]["coding"][0]["code"],
                detail,
                "{}",
                self.text()
            );
        }
    }

    /// Asserts a 401 with a bearer challenge and an OperationOutcome naming `detail`.
    fn expect_unauthorized(&self, detail: &str) {
        self.expect_outcome(StatusCode::UNAUTHORIZED, "login", Some(detail));
        let challenge = self.header(header::WWW_AUTHENTICATE).unwrap_or("");
        assert!(
            challenge.starts_with("Bearer ") && challenge.contains("error=\"invalid_token\""),
            "{}: WWW-Authenticate {challenge:?}",
            self.what
        );
    }

    /// Asserts an OAuth2 error from the token endpoint.
    fn expect_oauth_error(&self, status: StatusCode, error: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(self.body["error"], error, "{}", self.text());
        assert_eq!(
            self.header(header::CACHE_CONTROL),
            Some("no-store"),
            "{}",
            self.what
        );
    }
}

/// One node of hospital-a with its FHIR API.
struct Node {
    app: Router,
    state: Arc<FhirState>,
    ledger: Arc<Ledger>,
    consortium: Consortium,
    nonces: Mutex<HashMap<String, u64>>,
    dir: tempfile::TempDir,
}

impl Node {
    async fn start() -> Node {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (consortium, ledger) =
            common::solo_ledger(dir.path(), CHAIN, OrderingConfig::default());
        let ledger = Arc::new(ledger);
        let store = EmbeddedStore::open(dir.path()).expect("the record store opens");
        let records = Arc::new(
            RecordService::new(
                ledger.clone(),
                Arc::new(store),
                consortium.orgs[0].node.encryption_keys.clone(),
                None,
            )
            .expect("a record service"),
        );
        records
            .publish_key()
            .await
            .expect("the organisation's encryption key is published");
        let state = Arc::new(
            FhirState::open(records.clone(), dir.path(), API_URL).expect("the FHIR API opens"),
        );
        let app =
            medledger_node::api::router_with(ledger.clone(), Some(fhir_api::router(state.clone())));
        Node {
            app,
            state,
            ledger,
            consortium,
            nonces: Mutex::new(HashMap::new()),
            dir,
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Signs `body` as `who` with their next nonce and waits for it to commit.
    async fn commit(&self, who: &Identity, body: TxBody) {
        let nonce = {
            let mut nonces = self.nonces.lock().expect("nonce lock");
            let next = nonces.entry(who.id.clone()).or_insert(0);
            *next += 1;
            *next
        };
        let tx = who.sign(CHAIN, nonce, now_ms() + 60_000, body);
        let committed = self.ledger.submit(tx).await.expect("the ledger answers");
        assert!(
            committed.outcome.is_committed(),
            "{}: {:?}",
            who.id,
            committed.outcome
        );
    }

    /// A new member user of hospital-a (certificate from its CA), not yet on the ledger.
    fn new_member(&self, name: &str, role: Role) -> Identity {
        let now = now_ms();
        let validity = Validity {
            not_before_ms: now - HOUR_MS,
            not_after_ms: now + HOUR_MS,
        };
        self.consortium.orgs[0]
            .authority
            .issue(name, role, validity)
            .expect("a member certificate")
    }

    /// A member user enrolled on the ledger by hospital-a's admin.
    async fn enroll(&self, name: &str, role: Role) -> Identity {
        let user = self.new_member(name, role);
        let certificate = user.certificate_text().expect("a member's certificate");
        self.commit(
            &self.consortium.orgs[0].admin,
            TxBody::EnrollUser { certificate },
        )
        .await;
        user
    }

    /// Saves `identity` as a key file in the node's data directory.
    fn save_key(&self, identity: &Identity, file_name: &str) -> PathBuf {
        let path = self.dir().join(file_name);
        identity.save(&path).expect("the key file is written");
        path
    }

    /// Adds a login for `username` whose transactions the node signs with `key_file`;
    /// returns the one-time code secret.
    fn add_account(
        &self,
        username: &str,
        kind: AccountKind,
        allowed_scopes: &str,
        key_file: &Path,
    ) -> Vec<u8> {
        self.state
            .accounts()
            .add_account(
                username,
                kind,
                PASSWORD,
                allowed_scopes,
                &key_file.display().to_string(),
            )
            .expect("the account is added")
    }

    /// A clinician enrolled on the ledger with an account at this node.
    async fn clinician(&self, name: &str) -> Identity {
        let user = self.enroll(name, Role::Clinician).await;
        let key_file = self.save_key(&user, &format!("{name}.json"));
        self.add_account(
            &user.id,
            AccountKind::Practitioner,
            "user/*.cruds openid fhirUser",
            &key_file,
        );
        user
    }

    /// An account for a patient created through the API, whose key the node keeps.
    fn patient_account(&self, patient: &str) {
        let key_file = self.patient_key_file(patient);
        self.add_account(
            patient,
            AccountKind::Patient,
            "patient/*.rs patient/Consent.cruds",
            &key_file,
        );
    }

    fn patient_key_file(&self, patient: &str) -> PathBuf {
        self.dir().join("patients").join(format!("{patient}.json"))
    }

    /// An access token signed with the node's key, valid from now.
    fn token(&self, sub: &str, scope: &str, patient: Option<&str>) -> String {
        self.token_at(sub, scope, patient, now_s())
    }

    fn token_at(&self, sub: &str, scope: &str, patient: Option<&str>, at_s: u64) -> String {
        let scopes = Scopes::parse(scope).expect("the scopes parse");
        self.state
            .tokens
            .issue(sub, &scopes, patient, None, None, &["pwd", "otp"], at_s)
            .expect("a token")
            .0
    }

    async fn call(&self, request: Request<Body>) -> Answer {
        let what = format!("{} {}", request.method(), request.uri());
        let response = self
            .app
            .clone()
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("the body reads")
            .to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            what,
            status,
            headers,
            bytes,
            body,
        }
    }

    async fn send(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        extra: &[(header::HeaderName, &str)],
        body: Body,
    ) -> Answer {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (name, value) in extra {
            request = request.header(name, *value);
        }
        self.call(request.body(body).expect("a well-formed request"))
            .await
    }

    async fn get(&self, uri: &str, token: &str) -> Answer {
        self.send(Method::GET, uri, Some(token), &[], Body::empty())
            .await
    }

    async fn get_anonymous(&self, uri: &str) -> Answer {
        self.send(Method::GET, uri, None, &[], Body::empty()).await
    }

    async fn post_bytes(&self, uri: &str, token: &str, body: impl Into<Body>) -> Answer {
        self.send(
            Method::POST,
            uri,
            Some(token),
            &[(header::CONTENT_TYPE, "application/fhir+json")],
            body.into(),
        )
        .await
    }

    async fn post(&self, uri: &str, token: &str, resource: &Value) -> Answer {
        self.post_bytes(uri, token, resource.to_string()).await
    }

    async fn put(
        &self,
        uri: &str,
        token: &str,
        resource: &Value,
        if_match: Option<&str>,
    ) -> Answer {
        let mut extra = vec![(header::CONTENT_TYPE, "application/fhir+json")];
        if let Some(etag) = if_match {
            extra.push((header::IF_MATCH, etag));
        }
        self.send(
            Method::PUT,
            uri,
            Some(token),
            &extra,
            Body::from(resource.to_string()),
        )
        .await
    }

    /// `POST /auth/token` with a form.
    async fn token_request(&self, form: &[(&str, &str)]) -> Answer {
        self.send(
            Method::POST,
            "/auth/token",
            None,
            &[(header::CONTENT_TYPE, "application/x-www-form-urlencoded")],
            Body::from(form_encode(form)),
        )
        .await
    }

    /// Asks for a system token with a client assertion (SMART Backend Services).
    async fn assertion_request(&self, assertion: &str) -> Answer {
        self.token_request(&[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion),
            ("scope", "system/*.rs"),
        ])
        .await
    }

    /// Creates a Patient through the API; returns its pseudonym.
    async fn create_patient(&self, token: &str) -> String {
        let created = self.post("/fhir/Patient", token, &patient_resource()).await;
        created.expect_fhir(StatusCode::CREATED);
        created.body["id"]
            .as_str()
            .expect("a created Patient has an id")
            .to_string()
    }

    /// Creates an Observation through the API; returns it as stored.
    async fn create_observation(
        &self,
        token: &str,
        patient: &str,
        code: &str,
        effective: &str,
        value: u64,
    ) -> Value {
        let created = self
            .post(
                "/fhir/Observation",
                token,
                &observation(patient, code, effective, value),
            )
            .await;
        created.expect_fhir(StatusCode::CREATED).clone()
    }

    /// The ledger's access entries (`log_access`) about `patient`, oldest first.
    async fn access_entries(&self, patient: &str) -> Vec<Value> {
        self.audit_trail(patient)
            .await
            .into_iter()
            .filter(|event| event["kind"] == "log_access")
            .collect()
    }

    /// Every ledger entry about `patient`, from the ledger's own JSON API.
    async fn audit_trail(&self, patient: &str) -> Vec<Value> {
        let answer = self
            .get_anonymous(&format!("/v1/audit/patients/{patient}?limit=1000"))
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        answer
            .body
            .as_array()
            .expect("a list of audit events")
            .clone()
    }
}

fn patient_resource() -> Value {
    json!({
        "resourceType": "Patient",
        "active": true,
        "name": [{ "family": "Syntheticsdottir", "given": ["Testa"] }],
        "gender": "female",
        "birthDate": "1980-02-29",
    })
}

fn observation(patient: &str, code: &str, effective: &str, value: u64) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs" }] }],
        "code": { "coding": [{ "system": LOINC, "code": code }] },
        "subject": { "reference": format!("Patient/{patient}") },
        "effectiveDateTime": effective,
        "valueQuantity": { "value": value, "unit": "1", "system": "http://unitsofmeasure.org", "code": "1" },
    })
}

fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(name, value)| format!("{}={}", percent_encode(name), percent_encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The claims of a compact JWS, read without checking anything.
fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWS has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url"))
        .expect("the payload is JSON")
}

fn b64_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// The ids of a Bundle's entries of one search mode, in order.
fn entry_ids(bundle: &Value, mode: &str) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["search"]["mode"] == mode)
                .filter_map(|e| e["resource"]["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The URL of a Bundle link, as a path and query on this node.
fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == relation)?["url"]
        .as_str()
        .map(|url| {
            url.strip_prefix(API_URL)
                .unwrap_or_else(|| panic!("{url} is not on this node"))
                .to_string()
        })
}

fn id_of(resource: &Value) -> String {
    resource["id"].as_str().expect("an id").to_string()
}

/// A P-384 key pair for a backend client and its public JWK.
fn client_key(kid: &str) -> (Vec<u8>, Value) {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng)
        .expect("a P-384 key")
        .as_ref()
        .to_vec();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &pkcs8, &rng)
        .expect("the key reads back");
    let point = pair.public_key().as_ref();
    // An uncompressed point: 0x04, then x and y of 48 bytes each.
    assert_eq!(point.len(), 97);
    let jwk = json!({
        "kty": "EC",
        "crv": "P-384",
        "x": URL_SAFE_NO_PAD.encode(&point[1..49]),
        "y": URL_SAFE_NO_PAD.encode(&point[49..97]),
        "kid": kid,
        "alg": "ES384",
        "use": "sig",
    });
    (pkcs8, jwk)
}

/// A SMART Backend Services client assertion, ES384, for the node's token URL.
fn client_assertion(pkcs8: &[u8], kid: &str, client_id: &str, jti: &str) -> String {
    let mut header = Header::new(Algorithm::ES384);
    header.kid = Some(kid.to_string());
    let now = now_s();
    let claims = json!({
        "iss": client_id,
        "sub": client_id,
        "aud": TOKEN_URL,
        "iat": now,
        "exp": now + 120,
        "jti": jti,
    });
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_der(pkcs8))
        .expect("the assertion is signed")
}

/// Asks for a system token with a fresh assertion, and checks it with a read and a refused
/// create.
async fn client_credentials_flow(node: &Node, client_id: &str, pkcs8: &[u8], kid: &str) {
    let assertion = client_assertion(pkcs8, kid, client_id, "assertion-1");
    let granted = node.assertion_request(&assertion).await;
    assert_eq!(granted.status, StatusCode::OK, "{}", granted.text());
    assert_eq!(granted.header(header::CACHE_CONTROL), Some("no-store"));
    assert_eq!(granted.body["token_type"], "Bearer");
    assert_eq!(granted.body["scope"], "system/*.rs");
    let token = granted.body["access_token"]
        .as_str()
        .expect("an access token")
        .to_string();
    let claims = jwt_claims(&token);
    assert_eq!(claims["client_id"], client_id);
    assert_eq!(claims["sub"], format!("dr-robot@{ORG}"));
    assert_eq!(claims["aud"], FHIR_BASE);
    assert_eq!(claims["amr"], json!(["private_key_jwt"]));

    let organization = node.get(&format!("/fhir/Organization/{ORG}"), &token).await;
    assert_eq!(
        organization.expect_fhir(StatusCode::OK)["resourceType"],
        "Organization"
    );
    // system/*.rs reads and searches; it does not create.
    node.post("/fhir/Observation", &token, &json!({}))
        .await
        .expect_outcome(
            StatusCode::FORBIDDEN,
            "forbidden",
            Some("insufficient_scope"),
        );

    // The same assertion a second time is a replay.
    node.assertion_request(&assertion)
        .await
        .expect_oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
}

// ---- discovery --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_smart_discovery_need_no_token() {
    // Goal: the CapabilityStatement and both SMART discovery documents are served without a
    // token, and say what the server does: FHIR 4.0.1, Observation searchable by its
    // parameters, Patient/$everything, the token endpoint and asymmetric client auth.
    let node = Node::start().await;

    let metadata = node.get_anonymous("/fhir/metadata").await;
    let statement = metadata.expect_fhir(StatusCode::OK);
    assert_eq!(statement["resourceType"], "CapabilityStatement");
    assert_eq!(statement["fhirVersion"], "4.0.1");
    assert_eq!(statement["kind"], "instance");
    assert_eq!(statement["implementation"]["url"], FHIR_BASE);
    let rest = &statement["rest"][0];
    assert_eq!(rest["mode"], "server");
    let whole: Vec<&str> = rest["interaction"]
        .as_array()
        .expect("system interactions")
        .iter()
        .filter_map(|i| i["code"].as_str())
        .collect();
    assert_eq!(whole, vec!["batch", "transaction"]);
    assert_eq!(
        rest["security"]["extension"][0]["extension"][0]["valueUri"],
        TOKEN_URL
    );
    let resources = rest["resource"].as_array().expect("resources");
    let resource = |name: &str| {
        resources
            .iter()
            .find(|r| r["type"] == name)
            .unwrap_or_else(|| panic!("{name} is listed"))
    };
    let interactions = |r: &Value| -> BTreeSet<String> {
        r["interaction"]
            .as_array()
            .expect("interactions")
            .iter()
            .map(|i| i["code"].as_str().expect("a code").to_string())
            .collect()
    };
    let observation = resource("Observation");
    let codes = interactions(observation);
    for code in [
        "read",
        "vread",
        "update",
        "create",
        "history-instance",
        "search-type",
    ] {
        assert!(codes.contains(code), "Observation lists {code}: {codes:?}");
    }
    assert!(
        codes.contains("delete"),
        "deletes are tombstones: {codes:?}"
    );
    let params: BTreeSet<&str> = observation["searchParam"]
        .as_array()
        .expect("search parameters")
        .iter()
        .map(|p| p["name"].as_str().expect("a name"))
        .collect();
    for name in [
        "_id",
        "_lastUpdated",
        "patient",
        "subject",
        "code",
        "category",
        "status",
        "date",
    ] {
        assert!(params.contains(name), "Observation searches by {name}");
    }
    assert_eq!(observation["searchInclude"], json!(["Observation:patient"]));
    let patient = resource("Patient");
    assert_eq!(patient["operation"][0]["name"], "everything");
    assert_eq!(
        patient["operation"][0]["definition"],
        "http://hl7.org/fhir/OperationDefinition/Patient-everything"
    );
    for ledger_type in [
        "Consent",
        "AuditEvent",
        "Provenance",
        "Practitioner",
        "Organization",
    ] {
        resource(ledger_type);
    }

    for path in [
        "/.well-known/smart-configuration",
        "/fhir/.well-known/smart-configuration",
    ] {
        let smart = node.get_anonymous(path).await;
        assert_eq!(smart.status, StatusCode::OK, "{}", smart.text());
        assert_eq!(smart.body["token_endpoint"], TOKEN_URL, "{path}");
        assert_eq!(smart.body["issuer"], API_URL, "{path}");
        assert_eq!(smart.body["jwks_uri"], format!("{API_URL}/auth/jwks"));
        let capabilities = smart.body["capabilities"].as_array().expect("a list");
        assert!(
            capabilities.contains(&json!("client-confidential-asymmetric")),
            "{path}: {capabilities:?}"
        );
        let grants = smart.body["grant_types_supported"]
            .as_array()
            .expect("a list");
        assert!(grants.contains(&json!("client_credentials")));
        assert!(grants.contains(&json!("password")));
        assert_eq!(
            smart.body["token_endpoint_auth_methods_supported"],
            json!(["private_key_jwt", "none"])
        );
    }

    let jwks = node.get_anonymous("/auth/jwks").await;
    assert_eq!(jwks.status, StatusCode::OK, "{}", jwks.text());
    assert_eq!(jwks.body["keys"][0]["kid"], node.state.tokens.keys().kid());
    assert_eq!(jwks.body["keys"][0]["alg"], "ES256");
    assert!(jwks.body["keys"][0].get("d").is_none(), "no private part");
}

// ---- logins and tokens ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_logs_in_with_password_and_one_time_code() {
    // Goal: a password login needs the right password and an unused current one-time code;
    // it returns a bearer token the FHIR API accepts, narrowed to what the account may
    // hold, and every refusal is an OAuth2 error that must not be cached.
    let node = Node::start().await;
    let alice = node.enroll("dr-alice", Role::Clinician).await;
    let key_file = node.save_key(&alice, "dr-alice.json");
    let secret = node.add_account(
        &alice.id,
        AccountKind::Practitioner,
        "user/*.cruds openid fhirUser",
        &key_file,
    );

    let first_code = totp_code(&secret, now_s());
    let at = &node;
    let login = |password: &'static str, code: String, scope: &'static str| {
        let username = alice.id.clone();
        async move {
            at.token_request(&[
                ("grant_type", "password"),
                ("username", &username),
                ("password", password),
                ("totp", &code),
                ("scope", scope),
            ])
            .await
        }
    };

    let granted = login(PASSWORD, first_code.clone(), "user/*.cruds").await;
    assert_eq!(granted.status, StatusCode::OK, "{}", granted.text());
    assert_eq!(granted.header(header::CACHE_CONTROL), Some("no-store"));
    assert_eq!(granted.body["token_type"], "Bearer");
    assert_eq!(granted.body["scope"], "user/*.cruds");
    assert_eq!(granted.body["expires_in"], TOKEN_LIFETIME_S);
    let token = granted.body["access_token"]
        .as_str()
        .expect("an access token")
        .to_string();
    let claims = jwt_claims(&token);
    assert_eq!(claims["sub"], alice.id);
    assert_eq!(claims["iss"], API_URL);
    assert_eq!(claims["aud"], FHIR_BASE);
    assert_eq!(claims["scope"], "user/*.cruds");
    assert_eq!(claims["amr"], json!(["pwd", "otp"]));
    assert_eq!(
        claims["fhirUser"],
        format!("{FHIR_BASE}/Practitioner/{ORG}.dr-alice")
    );
    let me = node
        .get(&format!("/fhir/Practitioner/{ORG}.dr-alice"), &token)
        .await;
    let practitioner = me.expect_fhir(StatusCode::OK);
    assert_eq!(practitioner["identifier"][0]["value"], alice.id);
    assert_eq!(
        practitioner["qualification"][0]["code"]["coding"][0]["code"],
        "clinician"
    );

    // The code of the next step is valid and unused: only the password is wrong.
    let next_code = totp_code(&secret, now_s() + 30);
    login("not the password at all", next_code, "user/*.cruds")
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    let valid: BTreeSet<String> = [now_s() - 30, now_s(), now_s() + 30]
        .iter()
        .map(|at| totp_code(&secret, *at))
        .collect();
    let wrong_code = (0..10u32)
        .map(|digit| format!("{digit}{digit}{digit}{digit}{digit}{digit}"))
        .find(|code| !valid.contains(code))
        .expect("a code that is not valid now");
    login(PASSWORD, wrong_code, "user/*.cruds")
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    login(PASSWORD, first_code, "user/*.cruds")
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    let stranger = node
        .token_request(&[
            ("grant_type", "password"),
            ("username", "nobody@hospital-a"),
            ("password", PASSWORD),
            ("totp", "123456"),
            ("scope", "user/*.cruds"),
        ])
        .await;
    stranger.expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");

    node.token_request(&[("grant_type", "refresh_token"), ("refresh_token", "x.0.y")])
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");

    // More than the account may hold is narrowed to what it may hold.
    let wide = login(
        PASSWORD,
        totp_code(&secret, now_s() + 30),
        "user/*.cruds system/*.cruds patient/*.rs openid offline_access",
    )
    .await;
    assert_eq!(wide.status, StatusCode::OK, "{}", wide.text());
    assert_eq!(wide.body["scope"], "user/*.cruds openid");
    assert!(
        wide.body.get("refresh_token").is_none(),
        "no offline_access, no refresh token"
    );
    let claims = jwt_claims(wide.body["access_token"].as_str().expect("a token"));
    assert_eq!(claims["scope"], "user/*.cruds openid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_client_gets_a_system_token_with_a_signed_assertion() {
    // Goal: a backend client enrolled with an ES384 public key gets a system token for a
    // fresh signed assertion; the token reads but cannot create, and replaying the same
    // assertion is refused as invalid_client.
    let node = Node::start().await;
    let robot = node.new_member("dr-robot", Role::Clinician);
    // The client acts as a member user with an account here: it signs with that key.
    let key_file = node.save_key(&robot, "dr-robot.json");
    node.add_account(&robot.id, AccountKind::Practitioner, "user/*.rs", &key_file);
    let (pkcs8, jwk) = client_key("robot-key-1");
    node.state
        .accounts()
        .add_client(Client {
            client_id: "lab-robot".to_string(),
            jwks: json!({ "keys": [jwk] }),
            allowed_scopes: "system/*.rs".to_string(),
            acts_as: robot.id.clone(),
        })
        .expect("the client is enrolled");

    client_credentials_flow(&node, "lab-robot", &pkcs8, "robot-key-1").await;

    // An assertion signed by a key that was not enrolled is refused.
    let (other_pkcs8, _) = client_key("robot-key-1");
    let forged = client_assertion(&other_pkcs8, "robot-key-1", "lab-robot", "assertion-2");
    node.assertion_request(&forged)
        .await
        .expect_oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_acting_as_a_user_without_an_account_gets_no_token() {
    // Goal: a backend client whose user has no account at this node (so no key the node
    // could sign with) is refused at the token endpoint as invalid_client, not with a 500.
    let node = Node::start().await;
    let (pkcs8, jwk) = client_key("orphan-key-1");
    node.state
        .accounts()
        .add_client(Client {
            client_id: "orphan".to_string(),
            jwks: json!({ "keys": [jwk] }),
            allowed_scopes: "system/*.rs".to_string(),
            acts_as: format!("nobody@{ORG}"),
        })
        .expect("the client is enrolled");
    let assertion = client_assertion(&pkcs8, "orphan-key-1", "orphan", "assertion-o1");
    node.assertion_request(&assertion)
        .await
        .expect_oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_401_and_narrow_scopes_with_403() {
    // Goal: the FHIR endpoints refuse a missing, non-bearer, expired, other-audience,
    // other-issuer, unsigned, foreign-signed or altered token with 401, a bearer challenge
    // and an OperationOutcome naming the reason; a valid token whose scopes do not cover
    // the interaction gets 403 insufficient_scope.
    let node = Node::start().await;
    let user = format!("dr-alice@{ORG}");
    let organization = format!("/fhir/Organization/{ORG}");

    // A sound token works, so every refusal below is about the token alone.
    let good = node.token(&user, "user/*.rs", None);
    assert_eq!(
        node.get(&organization, &good)
            .await
            .expect_fhir(StatusCode::OK)["id"],
        ORG
    );

    node.send(Method::GET, &organization, None, &[], Body::empty())
        .await
        .expect_unauthorized("token_missing");
    let basic = node
        .send(
            Method::GET,
            &organization,
            None,
            &[(header::AUTHORIZATION, "Basic ZHItYWxpY2U6cHc=")],
            Body::empty(),
        )
        .await;
    basic.expect_unauthorized("token_malformed");
    node.get(&organization, "not-a-jwt")
        .await
        .expect_unauthorized("malformed");

    let expired = node.token_at(&user, "user/*.rs", None, now_s() - TOKEN_LIFETIME_S - 60);
    node.get(&organization, &expired)
        .await
        .expect_unauthorized("expired");

    let same_keys =
        || TokenKeys::load_or_create(&node.dir().join(TOKEN_KEY_FILE)).expect("the node's key");
    let scopes = Scopes::parse("user/*.rs").expect("scopes");
    let signed_by = |issuer: &TokenIssuer| {
        issuer
            .issue(&user, &scopes, None, None, None, &["pwd", "otp"], now_s())
            .expect("a token")
            .0
    };
    let elsewhere = TokenIssuer::new(
        same_keys(),
        API_URL,
        "http://127.0.0.1:7401/fhir",
        TOKEN_LIFETIME_S,
    );
    node.get(&organization, &signed_by(&elsewhere))
        .await
        .expect_unauthorized("wrong_audience");
    let other_issuer = TokenIssuer::new(
        same_keys(),
        "http://127.0.0.1:7401",
        FHIR_BASE,
        TOKEN_LIFETIME_S,
    );
    node.get(&organization, &signed_by(&other_issuer))
        .await
        .expect_unauthorized("wrong_issuer");
    let foreign = TokenIssuer::new(
        TokenKeys::generate().expect("a key"),
        API_URL,
        FHIR_BASE,
        TOKEN_LIFETIME_S,
    );
    node.get(&organization, &signed_by(&foreign))
        .await
        .expect_unauthorized("bad_signature");

    let claims = jwt_claims(&good);
    let unsigned = format!(
        "{}.{}.",
        b64_json(&json!({ "alg": "none", "typ": "at+jwt" })),
        b64_json(&claims)
    );
    node.get(&organization, &unsigned)
        .await
        .expect_unauthorized("algorithm_not_allowed");

    // The payload re-encoded with a wider scope, the original signature kept.
    let narrow = node.token(&user, "user/Observation.r", None);
    let parts: Vec<&str> = narrow.split('.').collect();
    let mut widened = jwt_claims(&narrow);
    widened["scope"] = json!("user/*.cruds");
    let altered = format!("{}.{}.{}", parts[0], b64_json(&widened), parts[2]);
    node.get(&organization, &altered)
        .await
        .expect_unauthorized("bad_signature");

    // The unaltered narrow token is valid, but reading is not creating.
    node.post(
        "/fhir/Observation",
        &narrow,
        &json!({ "resourceType": "Observation" }),
    )
    .await
    .expect_outcome(
        StatusCode::FORBIDDEN,
        "forbidden",
        Some("insufficient_scope"),
    );
    node.get(&organization, &narrow).await.expect_outcome(
        StatusCode::FORBIDDEN,
        "forbidden",
        Some("insufficient_scope"),
    );
}

// ---- records ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_created_read_versioned_and_searched() {
    // Goal: with a clinician's token, a Patient (a new pseudonymous patient whose key the
    // node keeps) and Observations are created, read, read by version, updated under
    // If-Match, listed in their instance history, searched by patient, code, date, with
    // paging, counting, sorting and the patient included, and gathered by $everything, whole
    // and in pages.
    let node = Node::start().await;
    let alice = node.clinician("dr-alice").await;
    let token = node.token(&alice.id, "user/*.cruds", None);

    let created = node
        .post("/fhir/Patient", &token, &patient_resource())
        .await;
    let patient_body = created.expect_fhir(StatusCode::CREATED).clone();
    let patient = id_of(&patient_body);
    assert!(
        patient.starts_with("pt-") && patient.len() == 43,
        "a pseudonym: {patient}"
    );
    assert_eq!(
        created.header(header::LOCATION),
        Some(format!("{FHIR_BASE}/Patient/{patient}/_history/1").as_str())
    );
    assert_eq!(created.header(header::ETAG), Some("W/\"1\""));
    assert_eq!(patient_body["meta"]["versionId"], "1");
    assert_eq!(patient_body["name"], patient_resource()["name"]);
    let key_file = node.patient_key_file(&patient);
    let kept = Identity::load(&key_file).expect("the patient's key file is kept");
    assert_eq!(kept.id, patient);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file)
            .expect("key file metadata")
            .permissions(),
    );
    assert_eq!(
        mode & 0o077,
        0,
        "the key file is the owner's only: {mode:o}"
    );

    let posted = node
        .post(
            "/fhir/Observation",
            &token,
            &observation(&patient, HEART_RATE, "2025-03-10T08:00:00Z", 72),
        )
        .await;
    let first = posted.expect_fhir(StatusCode::CREATED).clone();
    let id = id_of(&first);
    assert!(
        id.starts_with(&format!("{ORG}.")),
        "custodian in the id: {id}"
    );
    assert_eq!(posted.header(header::ETAG), Some("W/\"1\""));
    assert_eq!(
        posted.header(header::LOCATION),
        Some(format!("{FHIR_BASE}/Observation/{id}/_history/1").as_str())
    );
    assert_eq!(first["valueQuantity"]["value"], 72);
    let second = node
        .create_observation(&token, &patient, HEART_RATE, "2025-04-15T08:00:00Z", 75)
        .await;
    let third = node
        .create_observation(&token, &patient, BODY_WEIGHT, "2024-12-01T08:00:00Z", 64)
        .await;
    let (second_id, third_id) = (id_of(&second), id_of(&third));

    // Read and vread.
    let uri = format!("/fhir/Observation/{id}");
    let read = node.get(&uri, &token).await;
    assert_eq!(read.expect_fhir(StatusCode::OK), &first);
    assert_eq!(read.header(header::ETAG), Some("W/\"1\""));
    assert!(read.header(header::LAST_MODIFIED).is_some());
    assert_eq!(
        node.get(&format!("/fhir/Patient/{patient}"), &token)
            .await
            .expect_fhir(StatusCode::OK),
        &patient_body
    );

    // Update under If-Match; a stale one is refused.
    let mut changed = first.clone();
    changed["valueQuantity"]["value"] = json!(80);
    let updated = node.put(&uri, &token, &changed, Some("W/\"1\"")).await;
    let current = updated.expect_fhir(StatusCode::OK).clone();
    assert_eq!(updated.header(header::ETAG), Some("W/\"2\""));
    assert_eq!(current["meta"]["versionId"], "2");
    assert_eq!(current["valueQuantity"]["value"], 80);
    node.put(&uri, &token, &changed, Some("W/\"1\""))
        .await
        .expect_outcome(
            StatusCode::PRECONDITION_FAILED,
            "conflict",
            Some("version_conflict"),
        );
    assert_eq!(
        node.get(&uri, &token).await.expect_fhir(StatusCode::OK),
        &current
    );
    let version_one = node.get(&format!("{uri}/_history/1"), &token).await;
    assert_eq!(version_one.expect_fhir(StatusCode::OK), &first);
    assert_eq!(version_one.header(header::ETAG), Some("W/\"1\""));
    assert_eq!(
        node.get(&format!("{uri}/_history/2"), &token)
            .await
            .expect_fhir(StatusCode::OK),
        &current
    );
    node.get(&format!("{uri}/_history/3"), &token)
        .await
        .expect_outcome(StatusCode::NOT_FOUND, "not-found", None);

    // Instance history, newest first.
    let history = node.get(&format!("{uri}/_history"), &token).await;
    let bundle = history.expect_fhir(StatusCode::OK);
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "history");
    assert_eq!(bundle["total"], 2);
    assert_eq!(bundle["entry"].as_array().map(Vec::len), Some(2));
    assert_eq!(bundle["entry"][0]["resource"], current);
    assert_eq!(bundle["entry"][0]["response"]["etag"], "W/\"2\"");
    assert_eq!(bundle["entry"][1]["resource"], first);
    assert_eq!(bundle["entry"][1]["request"]["method"], "POST");

    // Search by patient, two to a page, following the next link.
    let search = |query: String| {
        let token = token.clone();
        let node = &node;
        async move {
            let answer = node
                .get(&format!("/fhir/Observation?{query}"), &token)
                .await;
            let bundle = answer.expect_fhir(StatusCode::OK).clone();
            assert_eq!(bundle["resourceType"], "Bundle", "{query}");
            assert_eq!(bundle["type"], "searchset", "{query}");
            bundle
        }
    };
    let all: BTreeSet<String> = [id.clone(), second_id.clone(), third_id.clone()].into();
    let page_one = search(format!("patient={patient}&_count=2")).await;
    assert_eq!(page_one["total"], 3);
    let mut seen = entry_ids(&page_one, "match");
    assert_eq!(seen.len(), 2, "{page_one}");
    assert!(link(&page_one, "previous").is_none());
    let next = link(&page_one, "next").expect("a next link");
    let page_two = node.get(&next, &token).await;
    let page_two = page_two.expect_fhir(StatusCode::OK);
    assert_eq!(page_two["total"], 3);
    assert!(link(page_two, "next").is_none(), "{page_two}");
    assert!(link(page_two, "previous").is_some(), "{page_two}");
    seen.extend(entry_ids(page_two, "match"));
    assert_eq!(seen.len(), 3);
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), all);
    // A search returns each record's current version.
    let listed = page_one["entry"]
        .as_array()
        .into_iter()
        .chain(page_two["entry"].as_array())
        .flatten()
        .find(|e| e["resource"]["id"] == id.as_str())
        .expect("the updated record is listed");
    assert_eq!(listed["resource"], current);
    assert_eq!(listed["fullUrl"], format!("{FHIR_BASE}/Observation/{id}"));

    let by_code = search(format!(
        "patient=Patient/{patient}&code={}",
        percent_encode(&format!("{LOINC}|{HEART_RATE}"))
    ))
    .await;
    assert_eq!(by_code["total"], 2);
    assert_eq!(
        entry_ids(&by_code, "match")
            .into_iter()
            .collect::<BTreeSet<_>>(),
        [id.clone(), second_id.clone()].into()
    );
    let since_march = search(format!("subject={patient}&date=ge2025-03")).await;
    assert_eq!(
        entry_ids(&since_march, "match")
            .into_iter()
            .collect::<BTreeSet<_>>(),
        [id.clone(), second_id.clone()].into()
    );
    let last_year = search(format!("patient={patient}&date=lt2025-01-01")).await;
    assert_eq!(entry_ids(&last_year, "match"), vec![third_id.clone()]);

    let counted = search(format!("patient={patient}&_summary=count")).await;
    assert_eq!(counted["total"], 3);
    assert!(counted.get("entry").is_none(), "{counted}");

    let newest_first = search(format!("patient={patient}&_sort=-date")).await;
    assert_eq!(
        entry_ids(&newest_first, "match"),
        vec![second_id.clone(), id.clone(), third_id.clone()]
    );
    let oldest_first = search(format!("patient={patient}&_sort=date")).await;
    assert_eq!(
        entry_ids(&oldest_first, "match"),
        vec![third_id.clone(), id.clone(), second_id.clone()]
    );

    let with_patient = search(format!("patient={patient}&_include=Observation:patient")).await;
    assert_eq!(with_patient["total"], 3);
    assert_eq!(entry_ids(&with_patient, "match").len(), 3);
    assert_eq!(entry_ids(&with_patient, "include"), vec![patient.clone()]);
    let included = with_patient["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["search"]["mode"] == "include")
        .expect("the Patient is included");
    assert_eq!(included["resource"], patient_body);

    // $everything: the Patient first, then every record of the patient.
    let everything = node
        .get(&format!("/fhir/Patient/{patient}/$everything"), &token)
        .await;
    let everything = everything.expect_fhir(StatusCode::OK);
    assert_eq!(everything["type"], "searchset");
    assert_eq!(everything["total"], 4);
    assert_eq!(everything["entry"][0]["resource"], patient_body);
    let rest: BTreeSet<String> = everything["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .skip(1)
        .map(|e| {
            assert_eq!(e["resource"]["resourceType"], "Observation");
            e["resource"]["id"].as_str().expect("an id").to_string()
        })
        .collect();
    assert_eq!(rest, all);

    // $everything pages like a search: _count entries from _offset, in the same order, with
    // links that follow; a malformed _count is a 400.
    let mut paged: Vec<Value> = Vec::new();
    let mut next = Some(format!("/fhir/Patient/{patient}/$everything?_count=3"));
    while let Some(url) = next.take() {
        let page = node
            .get(&url, &token)
            .await
            .expect_fhir(StatusCode::OK)
            .clone();
        assert_eq!(page["total"], 4, "{url}");
        paged.extend(page["entry"].as_array().expect("entries").iter().cloned());
        next = page["link"]
            .as_array()
            .expect("links")
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| {
                let url = l["url"].as_str().expect("a url");
                url[url.find("/fhir/").expect("under /fhir")..].to_string()
            });
        assert!(paged.len() <= 4, "the links end");
    }
    assert_eq!(
        paged.as_slice(),
        everything["entry"].as_array().unwrap().as_slice()
    );
    node.get(
        &format!("/fhir/Patient/{patient}/$everything?_count=many"),
        &token,
    )
    .await
    .expect_fhir(StatusCode::BAD_REQUEST);
    // An offset at the end of the numbers is an empty page, not an overflow.
    let far = node
        .get(
            &format!(
                "/fhir/Patient/{patient}/$everything?_count=3&_offset={}",
                usize::MAX
            ),
            &token,
        )
        .await;
    assert!(far.expect_fhir(StatusCode::OK)["entry"]
        .as_array()
        .is_none_or(|entries| entries.is_empty()));
}

/// The record `id` of hospital-a as this node's ledger indexes it.
fn indexed_record(node: &Node, id: &str) -> Record {
    node.ledger
        .store()
        .snapshot()
        .expect("a snapshot")
        .value::<Record>(&keys::record(ORG, id))
        .expect("the state reads")
        .expect("the record is indexed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_patient_registers_nobody_and_a_cut_short_creation_is_finished_by_a_put() {
    // Goal: creating a Patient never leaves a half-made patient. A Patient the checks refuse,
    // or one created by a member who may not author records, registers nobody and keeps no
    // key. A creation cut short after the patient's
    // registration (key file kept, registered, no encryption key, no consent, no record) is
    // finished by a PUT of the resource to its id (not by such a member, not inside a
    // transaction, whose refusals sign nothing): the key is published, the organisation's
    // consent is given once, the Patient is stored; a second PUT is an ordinary update and
    // gives no second consent.
    let node = Node::start().await;
    let alice = node.clinician("dr-alice").await;
    let token = node.token(&alice.id, "user/*.cruds", None);
    let patients = |node: &Node| {
        let snapshot = node.ledger.store().snapshot().expect("a snapshot");
        snapshot.scan("patient/", None, 1024).expect("a scan").len()
    };
    let key_files =
        |node: &Node| std::fs::read_dir(node.dir().join("patients")).map_or(0, |dir| dir.count());
    let (patients_before, files_before) = (patients(&node), key_files(&node));
    let mut malformed = patient_resource();
    malformed["birthDate"] = json!("the twenty-ninth of February");
    let refused = node.post("/fhir/Patient", &token, &malformed).await;
    assert!(
        refused.status.is_client_error(),
        "a malformed Patient is refused: {}",
        refused.status
    );
    malformed["birthDate"] = json!("1980-02-29");
    malformed["favouriteColour"] = json!("teal");
    let refused = node.post("/fhir/Patient", &token, &malformed).await;
    assert!(refused.status.is_client_error(), "{}", refused.status);
    assert_eq!(patients(&node), patients_before, "nobody was registered");
    assert_eq!(key_files(&node), files_before, "no key was kept");

    // A creation that stopped right after the registration.
    let half = Identity::new_patient().expect("a patient identity");
    std::fs::create_dir_all(node.dir().join("patients")).expect("the patients folder");
    half.save(&node.patient_key_file(&half.id))
        .expect("the key file");
    node.commit(
        &half,
        TxBody::RegisterPatient {
            public_key: half.key.public_key(),
        },
    )
    .await;
    let uri = format!("/fhir/Patient/{}", half.id);
    let mut resource = patient_resource();
    resource["id"] = json!(half.id);
    let published = |node: &Node| {
        let snapshot = node.ledger.store().snapshot().expect("a snapshot");
        snapshot
            .value::<Value>(&keys::encryption_key(&half.id))
            .expect("a read")
            .is_some()
    };
    // Neither a member who may not author records nor a transaction finishes it: each
    // is refused before any of the patient's own transactions is signed.
    let auditor = node.enroll("audrey", Role::Auditor).await;
    let auditors = node.token(&auditor.id, "user/*.cruds", None);
    node.post("/fhir/Patient", &auditors, &patient_resource())
        .await
        .expect_outcome(StatusCode::FORBIDDEN, "forbidden", Some("not_permitted"));
    node.put(&uri, &auditors, &resource, None)
        .await
        .expect_outcome(StatusCode::FORBIDDEN, "forbidden", Some("not_permitted"));
    let in_transaction = bundle(
        "transaction",
        vec![
            request_entry(
                "PUT",
                &format!("Patient/{}", half.id),
                Some(resource.clone()),
            ),
            request_entry(
                "POST",
                "Observation",
                Some(observation(
                    &half.id,
                    HEART_RATE,
                    "2025-03-10T08:00:00Z",
                    70,
                )),
            ),
        ],
    );
    node.post("/fhir", &token, &in_transaction)
        .await
        .expect_outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-supported",
            Some("patient_in_transaction"),
        );
    assert!(!published(&node), "nothing was signed for the patient");
    assert_eq!(patients(&node), patients_before + 1);
    assert_eq!(key_files(&node), files_before + 1);

    let finished = node.put(&uri, &token, &resource, None).await;
    let stored = finished.expect_fhir(StatusCode::CREATED).clone();
    assert_eq!(stored["meta"]["versionId"], "1");
    assert!(published(&node));
    let consents = |node: &Node| {
        let snapshot = node.ledger.store().snapshot().expect("a snapshot");
        snapshot
            .scan(&keys::patient_consent_prefix(&half.id), None, 1024)
            .expect("a scan")
            .len()
    };
    assert_eq!(consents(&node), 1, "the organisation's consent, once");
    assert_eq!(
        node.get(&uri, &token).await.expect_fhir(StatusCode::OK),
        &stored
    );
    resource["active"] = json!(false);
    let updated = node.put(&uri, &token, &resource, Some("W/\"1\"")).await;
    assert_eq!(
        updated.expect_fhir(StatusCode::OK)["meta"]["versionId"],
        "2"
    );
    assert_eq!(consents(&node), 1, "no second consent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_active_org_admin_of_the_nodes_organisation_may_move_the_lead() {
    // Goal: the operator endpoint (leader transfer) needs a bearer token of this node's for
    // an org admin of its organisation, active on the ledger now: no token, a clinician's, a
    // patient's and a revoked admin's (still unexpired) token are refused before anything
    // moves; the admin's request reaches the orderer (a solo node has no lead to hand over).
    let node = Node::start().await;
    let alice = node.clinician("dr-alice").await;
    let patient = node
        .create_patient(&node.token(&alice.id, "user/*.cruds", None))
        .await;
    let second_admin = node.enroll("admin-2", Role::OrgAdmin).await;
    let second_admin_token = node.token(&second_admin.id, "user/*.cruds", None);
    node.commit(
        &node.consortium.orgs[0].admin,
        TxBody::RevokeUser {
            user: second_admin.id.clone(),
            reason: medledger_core::model::RevocationReason::LeftOrganisation,
        },
    )
    .await;
    let admin = &node.consortium.orgs[0].admin.id;
    let transfer = |token: Option<String>| {
        let node = &node;
        async move {
            let answer = node
                .send(
                    Method::POST,
                    "/v1/consensus/transfer-leader",
                    token.as_deref(),
                    &[(header::CONTENT_TYPE, "application/json")],
                    Body::from(json!({ "to": format!("node@{ORG}") }).to_string()),
                )
                .await;
            (answer.status, answer.body["error"]["code"].clone())
        }
    };
    let refusals = [
        (None, StatusCode::UNAUTHORIZED),
        (
            Some(node.token(&alice.id, "user/*.cruds", None)),
            StatusCode::FORBIDDEN,
        ),
        (
            Some(node.token(&patient, "patient/*.rs", Some(&patient))),
            StatusCode::FORBIDDEN,
        ),
        (Some(second_admin_token), StatusCode::FORBIDDEN),
    ];
    for (index, (token, status)) in refusals.into_iter().enumerate() {
        let (got, code) = transfer(token).await;
        assert_eq!(got, status, "refusal {index}: {code}");
    }
    let (status, code) = transfer(Some(node.token(admin, "user/*.cruds", None))).await;
    assert_eq!(
        (status, code),
        (StatusCode::CONFLICT, json!("transfer_failed")),
        "the admin passes the gate and the solo orderer answers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_record_endpoints_act_only_for_the_user_a_token_names() {
    // Goal: the JSON API's record endpoints (seal a version, read a record, a patient's
    // history) need a bearer token of this node's, act for the user it names, within its
    // scopes: no token, another user named in the body, a token without the scope, and a
    // patient's token are refused, and a refused request leaves no access entry.
    let node = Node::start().await;
    let alice = node.clinician("dr-alice").await;
    let token = node.token(&alice.id, "user/*.cruds", None);
    let patient = node.create_patient(&token).await;
    let created = node
        .create_observation(&token, &patient, HEART_RATE, "2025-03-10T08:00:00Z", 72)
        .await;
    let id = id_of(&created);
    let read_uri = format!("/v1/records/{ORG}/{id}/read");
    let history_uri = format!("/v1/patients/{patient}/history");
    let post = |uri: String, token: Option<String>, body: Value| {
        let node = &node;
        async move {
            let answer = node
                .send(
                    Method::POST,
                    &uri,
                    token.as_deref(),
                    &[(header::CONTENT_TYPE, "application/json")],
                    Body::from(body.to_string()),
                )
                .await;
            let body: Value = serde_json::from_slice(&answer.bytes).unwrap_or(Value::Null);
            (answer.status, body)
        }
    };
    let entries_before = node.audit_trail(&patient).await.len();
    let treatment = json!({ "purpose": "treatment" });

    let refusals = [
        (
            read_uri.clone(),
            None,
            treatment.clone(),
            StatusCode::UNAUTHORIZED,
        ),
        (
            read_uri.clone(),
            Some(token.clone()),
            json!({ "purpose": "treatment", "actor": format!("dr-bob@{ORG}") }),
            StatusCode::FORBIDDEN,
        ),
        (
            read_uri.clone(),
            Some(node.token(&alice.id, "user/Condition.rs", None)),
            treatment.clone(),
            StatusCode::FORBIDDEN,
        ),
        (
            read_uri.clone(),
            Some(node.token(&patient, "patient/*.rs", Some(&patient))),
            treatment.clone(),
            StatusCode::FORBIDDEN,
        ),
        (
            history_uri.clone(),
            None,
            treatment.clone(),
            StatusCode::UNAUTHORIZED,
        ),
        (
            history_uri.clone(),
            Some(node.token(&alice.id, "user/Observation.rs", None)),
            treatment.clone(),
            StatusCode::FORBIDDEN,
        ),
        (
            "/v1/records".to_string(),
            None,
            json!({ "resource": observation(&patient, HEART_RATE, "2025-03-11T08:00:00Z", 70) }),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "/v1/records".to_string(),
            Some(node.token(&alice.id, "user/*.rs", None)),
            json!({ "resource": observation(&patient, HEART_RATE, "2025-03-11T08:00:00Z", 70) }),
            StatusCode::FORBIDDEN,
        ),
    ];
    for (uri, bearer, body, status) in refusals {
        let (got, answer) = post(uri.clone(), bearer, body).await;
        assert_eq!(got, status, "{uri}: {answer}");
        assert!(answer["error"]["message"].is_string(), "{uri}: {answer}");
    }
    assert_eq!(
        node.audit_trail(&patient).await.len(),
        entries_before,
        "a refused request leaves no access entry"
    );

    // Alice's own token reads, and the entry names her.
    let (status, opened) = post(read_uri.clone(), Some(token.clone()), treatment.clone()).await;
    assert_eq!(status, StatusCode::OK, "{opened}");
    assert_eq!(opened["resource"]["valueQuantity"]["value"], 72);
    let (status, history) = post(
        history_uri,
        Some(token.clone()),
        json!({ "purpose": "treatment", "actor": alice.id }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{history}");
    assert!(!history["versions"].as_array().expect("versions").is_empty());
    let trail = node.audit_trail(&patient).await;
    assert_eq!(trail.len(), entries_before + 2);
    for event in &trail[entries_before..] {
        assert_eq!(event["kind"], "log_access", "{event}");
        assert!(
            event.to_string().contains(&alice.id),
            "the entry names the token's user: {event}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_is_a_tombstone_version_that_history_keeps_and_an_update_undoes() {
    // Goal: DELETE adds a tombstone version signed by the clinician (200 with an
    // OperationOutcome and the tombstone's ETag); afterwards the resource reads 410 Gone,
    // its earlier versions still vread, the tombstone's own version reads 410, the instance
    // history lists a DELETE entry answered "410 Gone" above the earlier versions, searches
    // and $everything leave it out, a second delete adds nothing, an unknown id is 404, a
    // token without `d` cannot delete, a stale If-Match is 412, and an update recreates
    // the resource as a new version.
    let node = Node::start().await;
    let alice = node.clinician("dr-alice").await;
    let token = node.token(&alice.id, "user/*.cruds", None);
    let patient = node.create_patient(&token).await;
    let first = node
        .create_observation(&token, &patient, HEART_RATE, "2025-03-10T08:00:00Z", 72)
        .await;
    let kept = node
        .create_observation(&token, &patient, BODY_WEIGHT, "2025-03-10T08:00:00Z", 64)
        .await;
    let (id, kept_id) = (id_of(&first), id_of(&kept));
    let uri = format!("/fhir/Observation/{id}");
    let mut changed = first.clone();
    changed["valueQuantity"]["value"] = json!(80);
    let second = node
        .put(&uri, &token, &changed, Some("W/\"1\""))
        .await
        .expect_fhir(StatusCode::OK)
        .clone();

    // The token's scopes and the If-Match come first: neither refusal leaves a version.
    // (The ledger's consent to write is checked as for any version: contracts.rs.)
    let no_delete = node.token(&alice.id, "user/*.crus", None);
    node.send(Method::DELETE, &uri, Some(&no_delete), &[], Body::empty())
        .await
        .expect_outcome(
            StatusCode::FORBIDDEN,
            "forbidden",
            Some("insufficient_scope"),
        );
    node.send(
        Method::DELETE,
        &uri,
        Some(&token),
        &[(header::IF_MATCH, "W/\"1\"")],
        Body::empty(),
    )
    .await
    .expect_outcome(
        StatusCode::PRECONDITION_FAILED,
        "conflict",
        Some("version_conflict"),
    );
    assert_eq!(indexed_record(&node, &id).versions.len(), 2);

    let deleted = node
        .send(Method::DELETE, &uri, Some(&token), &[], Body::empty())
        .await;
    let outcome = deleted.expect_fhir(StatusCode::OK);
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["severity"], "information");
    assert_eq!(deleted.header(header::ETAG), Some("W/\"3\""));
    assert!(deleted.header(header::LAST_MODIFIED).is_some());
    let record = indexed_record(&node, &id);
    let flags: Vec<bool> = record.versions.iter().map(|v| v.deleted).collect();
    assert_eq!(flags, vec![false, false, true]);
    assert_eq!(
        record.versions[2].author, alice.id,
        "the clinician signed it"
    );

    node.get(&uri, &token)
        .await
        .expect_outcome(StatusCode::GONE, "deleted", Some("deleted"));
    node.get(&format!("{uri}/_history/3"), &token)
        .await
        .expect_outcome(StatusCode::GONE, "deleted", Some("deleted"));
    assert_eq!(
        node.get(&format!("{uri}/_history/1"), &token)
            .await
            .expect_fhir(StatusCode::OK),
        &first
    );
    assert_eq!(
        node.get(&format!("{uri}/_history/2"), &token)
            .await
            .expect_fhir(StatusCode::OK),
        &second
    );

    let history = node.get(&format!("{uri}/_history"), &token).await;
    let bundle = history.expect_fhir(StatusCode::OK).clone();
    assert_eq!(bundle["total"], 3);
    let top = &bundle["entry"][0];
    assert_eq!(top["request"]["method"], "DELETE");
    assert_eq!(top["request"]["url"], format!("Observation/{id}"));
    assert_eq!(top["response"]["status"], "410 Gone");
    assert_eq!(top["response"]["etag"], "W/\"3\"");
    assert!(top["response"]["lastModified"].is_string(), "{top}");
    assert!(
        top.get("resource").is_none(),
        "a deletion has no resource: {top}"
    );
    assert_eq!(bundle["entry"][1]["resource"], second);
    assert_eq!(bundle["entry"][2]["resource"], first);

    let search = node
        .get(&format!("/fhir/Observation?patient={patient}"), &token)
        .await;
    let search = search.expect_fhir(StatusCode::OK);
    assert_eq!(search["total"], 1);
    assert_eq!(entry_ids(search, "match"), vec![kept_id.clone()]);
    let everything = node
        .get(&format!("/fhir/Patient/{patient}/$everything"), &token)
        .await;
    let ids: Vec<String> = everything.expect_fhir(StatusCode::OK)["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| id_of(&e["resource"]))
        .collect();
    assert_eq!(ids, vec![patient.clone(), kept_id.clone()]);

    // Deleting again is answered alike and adds no version; an unknown id is 404.
    let again = node
        .send(Method::DELETE, &uri, Some(&token), &[], Body::empty())
        .await;
    again.expect_fhir(StatusCode::OK);
    assert_eq!(again.header(header::ETAG), Some("W/\"3\""));
    assert_eq!(indexed_record(&node, &id).versions.len(), 3);
    node.send(
        Method::DELETE,
        &format!("/fhir/Observation/{ORG}.0000"),
        Some(&token),
        &[],
        Body::empty(),
    )
    .await
    .expect_outcome(StatusCode::NOT_FOUND, "not-found", None);

    // Provenance names the tombstone as a deletion.
    let provenance = node
        .get(&format!("/fhir/Provenance?target=Observation/{id}"), &token)
        .await;
    let provenance = provenance.expect_fhir(StatusCode::OK);
    assert_eq!(provenance["total"], 3);
    assert_eq!(
        provenance["entry"][0]["resource"]["activity"]["coding"][0]["code"],
        "DELETE"
    );

    // An update recreates it: 201, a fourth version, readable again.
    let mut revived = second.clone();
    revived["valueQuantity"]["value"] = json!(90);
    let recreated = node.put(&uri, &token, &revived, Some("W/\"3\"")).await;
    let recreated_body = recreated.expect_fhir(StatusCode::CREATED).clone();
    assert_eq!(recreated.header(header::ETAG), Some("W/\"4\""));
    assert_eq!(recreated_body["meta"]["versionId"], "4");
    assert_eq!(
        node.get(&uri, &token).await.expect_fhir(StatusCode::OK),
        &recreated_body
    );
    let history = node.get(&format!("{uri}/_history"), &token).await;
    let top = &history.expect_fhir(StatusCode::OK)["entry"][0];
    assert_eq!(top["request"]["method"], "PUT");
    assert_eq!(top["response"]["status"], "201 Created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_invalid_unknown_and_oversized_requests_get_operation_outcomes() {
    // Goal: each kind of bad request gets its own status with an OperationOutcome: 400 for
    // a body that is not JSON or not the URL's type and for searches without a patient or
    // with an unknown parameter, 422 for JSON that is not valid FHIR, 404 for unknown types
    // and ids, 405 for unsupported methods, 413 for oversized bodies, and 403 for a patient
    // token reaching another patient's record; a body above the JSON API's own limit but
    // within the FHIR one is accepted.
    let node = Node::start().await;
    let alice = node.clinician("dr-alice").await;
    let token = node.token(&alice.id, "user/*.cruds", None);
    let patient = node.create_patient(&token).await;
    let record = node
        .create_observation(&token, &patient, HEART_RATE, "2025-03-10T08:00:00Z", 72)
        .await;
    let id = id_of(&record);

    node.post_bytes("/fhir/Observation", &token, "{\"resourceType\": \"Obs")
        .await
        .expect_outcome(StatusCode::BAD_REQUEST, "invalid", None);
    node.post("/fhir/Observation", &token, &patient_resource())
        .await
        .expect_outcome(StatusCode::BAD_REQUEST, "invalid", None);
    let mut no_status = observation(&patient, HEART_RATE, "2025-03-11", 70);
    no_status
        .as_object_mut()
        .expect("an object")
        .remove("status");
    node.post("/fhir/Observation", &token, &no_status)
        .await
        .expect_outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            Some("invalid_resource"),
        );
    let mut other_id = record.clone();
    other_id["id"] = json!(format!("{ORG}.someone-else"));
    node.put(&format!("/fhir/Observation/{id}"), &token, &other_id, None)
        .await
        .expect_outcome(StatusCode::BAD_REQUEST, "invalid", None);

    node.get("/fhir/Foo", &token).await.expect_outcome(
        StatusCode::NOT_FOUND,
        "not-found",
        Some("unsupported_type"),
    );
    node.post("/fhir/Foo", &token, &json!({ "resourceType": "Foo" }))
        .await
        .expect_outcome(StatusCode::NOT_FOUND, "not-found", Some("unsupported_type"));
    node.get(
        &format!("/fhir/Observation/{ORG}.000000000000000000000000"),
        &token,
    )
    .await
    .expect_outcome(StatusCode::NOT_FOUND, "not-found", None);
    // A Patient id is not an Observation id.
    node.get(&format!("/fhir/Observation/{patient}"), &token)
        .await
        .expect_outcome(StatusCode::NOT_FOUND, "not-found", None);
    node.get("/fhir/Observation/a/b/c/d", &token)
        .await
        .expect_outcome(StatusCode::NOT_FOUND, "not-found", None);
    node.send(
        Method::PATCH,
        &format!("/fhir/Observation/{id}"),
        Some(&token),
        &[],
        Body::from("[]"),
    )
    .await
    .expect_outcome(StatusCode::METHOD_NOT_ALLOWED, "not-supported", None);

    node.get(
        &format!("/fhir/Observation?code={LOINC}%7C{HEART_RATE}"),
        &token,
    )
    .await
    .expect_outcome(StatusCode::BAD_REQUEST, "invalid", Some("patient_required"));
    node.get(
        &format!("/fhir/Observation?patient={patient}&colour=blue"),
        &token,
    )
    .await
    .expect_outcome(StatusCode::BAD_REQUEST, "invalid", Some("invalid_search"));
    node.get(
        &format!("/fhir/Observation?patient={patient}&code:text=pulse"),
        &token,
    )
    .await
    .expect_outcome(StatusCode::BAD_REQUEST, "invalid", Some("invalid_search"));

    // 200 KiB is over the JSON API's 64 KiB body limit but a fine FHIR resource.
    let mut large = observation(&patient, HEART_RATE, "2025-03-12T08:00:00Z", 71);
    large["note"] = json!([{ "text": "x".repeat(200 * 1024) }]);
    node.post("/fhir/Observation", &token, &large)
        .await
        .expect_fhir(StatusCode::CREATED);
    // Over the 1 MiB a resource may have, under the 2 MiB a body may have.
    let mut too_large = large.clone();
    too_large["note"] = json!([{ "text": "x".repeat(1536 * 1024) }]);
    node.post("/fhir/Observation", &token, &too_large)
        .await
        .expect_outcome(StatusCode::PAYLOAD_TOO_LARGE, "too-long", None);
    // Over 2 MiB: refused before the body is read.
    let huge = vec![b' '; 2 * 1024 * 1024 + 1];
    let refused = node.post_bytes("/fhir/Observation", &token, huge).await;
    assert_eq!(
        refused.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        refused.what
    );

    // A patient's token reaches only that patient's records.
    let someone_else = Identity::new_patient().expect("a patient key").id;
    let other = node.token(&someone_else, "patient/*.rs", Some(&someone_else));
    node.get(&format!("/fhir/Observation/{id}"), &other)
        .await
        .expect_outcome(StatusCode::FORBIDDEN, "forbidden", Some("wrong_patient"));
    node.get(&format!("/fhir/Observation?patient={patient}"), &other)
        .await
        .expect_outcome(StatusCode::FORBIDDEN, "forbidden", Some("wrong_patient"));
    node.get(&format!("/fhir/Patient/{patient}/$everything"), &other)
        .await
        .expect_outcome(StatusCode::FORBIDDEN, "forbidden", Some("wrong_patient"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_two_mebibytes_gets_an_operation_outcome() {
    // Goal: a request body over the FHIR API's 2 MiB limit is answered like every other
    // FHIR error: 413 with an OperationOutcome in application/fhir+json.
    let node = Node::start().await;
    let token = node.token(&format!("dr-alice@{ORG}"), "user/*.cruds", None);
    let huge = vec![b' '; 2 * 1024 * 1024 + 1];
    node.post_bytes("/fhir/Observation", &token, huge)
        .await
        .expect_outcome(StatusCode::PAYLOAD_TOO_LARGE, "too-long", None);
}

// ---- consent, provenance, audit -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_patient_grants_and_revokes_consent_and_provenance_names_the_author() {
    // Goal: only the patient grants and revokes consents (as FHIR Consent signed with the
    // key the node keeps for them), and the ledger applies them at once: a nurse loses
    // access when the organisation's consent is revoked, gains it through a Consent naming
    // her, and loses it again when that Consent is set inactive; a clinician cannot create
    // or read a patient's Consent; Provenance names each version's author and signature.
    let node = Node::start().await;
    let alice = node.clinician("dr-alice").await;
    let nurse = node.enroll("nurse-nora", Role::Nurse).await;
    let clinician = node.token(&alice.id, "user/*.cruds", None);
    let patient = node.create_patient(&clinician).await;
    let record = node
        .create_observation(&clinician, &patient, HEART_RATE, "2025-03-10T08:00:00Z", 72)
        .await;
    let id = id_of(&record);
    let record_uri = format!("/fhir/Observation/{id}");
    node.patient_account(&patient);
    let own = node.token(
        &patient,
        "patient/*.rs patient/Consent.cruds",
        Some(&patient),
    );
    let nora = node.token(&nurse.id, "user/*.rs", None);

    // The organisation's consent from the patient's creation covers the nurse.
    let consents = node
        .get(&format!("/fhir/Consent?patient={patient}"), &own)
        .await;
    let consents = consents.expect_fhir(StatusCode::OK);
    assert_eq!(consents["total"], 1, "{consents}");
    let org_consent = &consents["entry"][0]["resource"];
    assert_eq!(org_consent["status"], "active");
    assert_eq!(
        org_consent["provision"]["actor"][0]["reference"]["reference"],
        format!("Organization/{ORG}")
    );
    assert_eq!(
        org_consent["patient"]["reference"],
        format!("Patient/{patient}")
    );
    node.get(&record_uri, &nora)
        .await
        .expect_fhir(StatusCode::OK);

    // The patient revokes it; the nurse is refused, and the refusal is on the ledger.
    let org_consent_id = id_of(org_consent);
    let mut revoke = org_consent.clone();
    revoke["status"] = json!("inactive");
    let revoked = node
        .put(
            &format!("/fhir/Consent/{org_consent_id}"),
            &own,
            &revoke,
            None,
        )
        .await;
    let revoked = revoked.expect_fhir(StatusCode::OK);
    assert_eq!(revoked["status"], "inactive");
    assert!(revoked["provision"]["period"]["end"].is_string());
    let refused = node.get(&record_uri, &nora).await;
    refused.expect_outcome(StatusCode::FORBIDDEN, "forbidden", Some("access_denied"));
    let diagnostics = refused.body["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or("");
    assert!(diagnostics.contains("no_consent"), "{diagnostics}");
    let last = node.access_entries(&patient).await.pop().expect("an entry");
    assert_eq!(last["actor"], nurse.id);
    assert_eq!(last["decision"]["decision"], "denied");
    assert!(
        diagnostics.contains(last["tx_id"].as_str().expect("a tx id")),
        "the outcome names the access entry: {diagnostics}"
    );

    // Nobody but the patient grants.
    let grant = json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": "http://loinc.org", "code": "59284-0" }] }],
        "patient": { "reference": format!("Patient/{patient}") },
        "provision": {
            "type": "permit",
            "actor": [{
                "role": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP" }] },
                "reference": { "reference": format!("Practitioner/{ORG}.nurse-nora") },
            }],
            "action": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "access" }] }],
            "purpose": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT" }],
        },
    });
    node.post("/fhir/Consent", &clinician, &grant)
        .await
        .expect_outcome(StatusCode::FORBIDDEN, "forbidden", Some("patient_only"));
    node.get(&record_uri, &nora).await.expect_outcome(
        StatusCode::FORBIDDEN,
        "forbidden",
        Some("access_denied"),
    );

    // The patient grants the nurse.
    let granted = node.post("/fhir/Consent", &own, &grant).await;
    let consent = granted.expect_fhir(StatusCode::CREATED).clone();
    let consent_id = id_of(&consent);
    assert_eq!(
        granted.header(header::LOCATION),
        Some(format!("{FHIR_BASE}/Consent/{consent_id}/_history/1").as_str())
    );
    assert_eq!(consent["status"], "active");
    assert_eq!(
        consent["provision"]["actor"][0]["reference"]["reference"],
        format!("Practitioner/{ORG}.nurse-nora")
    );
    assert_eq!(consent["provision"]["purpose"][0]["code"], "TREAT");
    let consent_uri = format!("/fhir/Consent/{consent_id}");
    let read = node.get(&consent_uri, &own).await;
    assert_eq!(read.expect_fhir(StatusCode::OK), &consent);
    node.get(&consent_uri, &clinician).await.expect_outcome(
        StatusCode::FORBIDDEN,
        "forbidden",
        Some("role_not_permitted"),
    );
    assert_eq!(
        node.get(&record_uri, &nora)
            .await
            .expect_fhir(StatusCode::OK),
        &record
    );

    // A clinician cannot revoke it; the patient can.
    let mut inactive = consent.clone();
    inactive["status"] = json!("inactive");
    node.put(&consent_uri, &clinician, &inactive, None)
        .await
        .expect_outcome(StatusCode::FORBIDDEN, "forbidden", Some("patient_only"));
    let ended = node.put(&consent_uri, &own, &inactive, None).await;
    assert_eq!(ended.expect_fhir(StatusCode::OK)["status"], "inactive");
    assert_eq!(
        node.get(&consent_uri, &own)
            .await
            .expect_fhir(StatusCode::OK)["status"],
        "inactive"
    );
    node.get(&record_uri, &nora).await.expect_outcome(
        StatusCode::FORBIDDEN,
        "forbidden",
        Some("access_denied"),
    );

    // Provenance: who wrote each version, with their signature, from the ledger's index.
    let provenance = node
        .get(
            &format!("/fhir/Provenance?target=Observation/{id}"),
            &clinician,
        )
        .await;
    let provenance = provenance.expect_fhir(StatusCode::OK);
    assert_eq!(provenance["total"], 1);
    let entry = &provenance["entry"][0]["resource"];
    assert_eq!(entry["resourceType"], "Provenance");
    assert_eq!(
        entry["target"][0]["reference"],
        format!("Observation/{id}/_history/1")
    );
    let author = format!("Practitioner/{ORG}.dr-alice");
    assert_eq!(entry["agent"][0]["who"]["reference"], author);
    assert_eq!(
        entry["agent"][0]["onBehalfOf"]["reference"],
        format!("Organization/{ORG}")
    );
    assert_eq!(entry["signature"][0]["who"]["reference"], author);
    let signature = entry["signature"][0]["data"].as_str().unwrap_or("");
    assert!(
        URL_SAFE_NO_PAD
            .decode(signature)
            .is_ok_and(|bytes| !bytes.is_empty()),
        "signature data: {signature:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_are_exactly_the_patients_ledger_entries() {
    // Goal: AuditEvent?patient=… shows the patient every ledger entry about them and only
    // those, each with a link to its inclusion proof, including a refused read (outcome 4).
    let node = Node::start().await;
    let alice = node.clinician("dr-alice").await;
    let clinician = node.token(&alice.id, "user/*.cruds", None);
    // Two patients whose entries alternate on the log, far enough to reach indexes with
    // hex letters (0x0a..) and indexes past 0x10.
    let other = node.create_patient(&clinician).await;
    let other_record = node
        .create_observation(&clinician, &other, HEART_RATE, "2025-01-10", 60)
        .await;
    let patient = node.create_patient(&clinician).await;
    let record = node
        .create_observation(&clinician, &patient, HEART_RATE, "2025-03-10", 72)
        .await;
    let other_uri = format!("/fhir/Observation/{}", id_of(&other_record));
    let record_uri = format!("/fhir/Observation/{}", id_of(&record));
    for _ in 0..6 {
        for uri in [&other_uri, &other_uri, &other_uri, &record_uri] {
            node.get(uri, &clinician).await.expect_fhir(StatusCode::OK);
        }
    }
    node.patient_account(&patient);
    let own = node.token(
        &patient,
        "patient/*.rs patient/Consent.cruds",
        Some(&patient),
    );
    let consents = node
        .get(&format!("/fhir/Consent?patient={patient}"), &own)
        .await;
    let mut revoke = consents.expect_fhir(StatusCode::OK)["entry"][0]["resource"].clone();
    revoke["status"] = json!("inactive");
    node.put(
        &format!("/fhir/Consent/{}", id_of(&revoke)),
        &own,
        &revoke,
        None,
    )
    .await
    .expect_fhir(StatusCode::OK);
    node.get(&record_uri, &clinician).await.expect_outcome(
        StatusCode::FORBIDDEN,
        "forbidden",
        Some("access_denied"),
    );

    let trail = node.audit_trail(&patient).await;
    let expected: BTreeSet<String> = trail
        .iter()
        .map(|e| e["leaf_index"].as_u64().expect("a leaf index").to_string())
        .collect();
    assert!(
        expected
            .iter()
            .any(|leaf| leaf.parse::<u64>().is_ok_and(|n| n > 16)),
        "the trail reaches past leaf 0x10: {expected:?}"
    );

    let answer = node
        .get(&format!("/fhir/AuditEvent?patient={patient}"), &own)
        .await;
    let bundle = answer.expect_fhir(StatusCode::OK);
    let entries = bundle["entry"].as_array().expect("entries");
    let mut denied = 0;
    for entry in entries {
        let event = &entry["resource"];
        assert_eq!(event["resourceType"], "AuditEvent");
        let about: Vec<&Value> = event["entity"]
            .as_array()
            .map(|e| e.iter().collect())
            .unwrap_or_default();
        assert!(
            about
                .iter()
                .any(|e| e["what"]["reference"] == format!("Patient/{patient}")),
            "about the patient: {event}"
        );
        let proof = event["extension"]
            .as_array()
            .and_then(|e| e.iter().find(|x| x["url"] == PROOF_EXTENSION))
            .and_then(|x| x["valueUri"].as_str())
            .expect("a link to the inclusion proof");
        let path = proof.strip_prefix(API_URL).expect("a link to this node");
        let answer = node.get_anonymous(path).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(answer.body["leaf_index"].to_string(), id_of(event));
        if event["outcome"] == "4" {
            denied += 1;
        }
    }
    let found: BTreeSet<String> = entries.iter().map(|e| id_of(&e["resource"])).collect();
    assert_eq!(found, expected, "every entry about the patient is listed");
    assert_eq!(denied, 1, "the refused read is listed as denied");
}

// ---- access entries -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_and_search_leaves_an_access_entry_on_the_ledger() {
    // Goal: reading and searching a patient's records through the FHIR API is logged on the
    // ledger: a read at the custodian's own node adds exactly one access entry, for the
    // reader, the record and a granted decision; a search of one type at one custodian
    // adds one too, and so does a vread.
    let node = Node::start().await;
    let alice = node.clinician("dr-alice").await;
    let token = node.token(&alice.id, "user/*.cruds", None);
    let patient = node.create_patient(&token).await;
    let record = node
        .create_observation(&token, &patient, HEART_RATE, "2025-03-10T08:00:00Z", 72)
        .await;
    let id = id_of(&record);

    let before = node.access_entries(&patient).await.len();
    node.get(&format!("/fhir/Observation/{id}"), &token)
        .await
        .expect_fhir(StatusCode::OK);
    let after_read = node.access_entries(&patient).await;
    assert_eq!(after_read.len(), before + 1, "one entry for one read");
    let entry = after_read.last().expect("the read's entry");
    assert_eq!(entry["actor"], alice.id);
    assert_eq!(entry["patient"], patient);
    assert_eq!(entry["action"], "read");
    assert_eq!(entry["purpose"], "treatment");
    assert_eq!(entry["records"], json!([format!("{ORG}/{id}")]));
    assert_eq!(entry["decision"]["decision"], "granted");

    let search = node
        .get(&format!("/fhir/Observation?patient={patient}"), &token)
        .await;
    assert_eq!(search.expect_fhir(StatusCode::OK)["total"], 1);
    let after_search = node.access_entries(&patient).await;
    assert_eq!(
        after_search.len(),
        after_read.len() + 1,
        "one entry for one type at one custodian"
    );
    assert_eq!(
        after_search.last().expect("the search's entry")["actor"],
        alice.id
    );

    node.get(&format!("/fhir/Observation/{id}/_history/1"), &token)
        .await
        .expect_fhir(StatusCode::OK);
    assert_eq!(
        node.access_entries(&patient).await.len(),
        after_search.len() + 1
    );
}

/// One request of the random mix below, and the status it must answer.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    uri: String,
    body: Option<Value>,
    status: StatusCode,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_random_fhir_requests_leave_a_thousand_provable_access_entries() {
    // Goal: every FHIR request that touches patient data, allowed or denied, leaves exactly
    // one access entry on the ledger, named in its `x-access-entry` header. 1,000 seeded
    // random requests, eight at a time: reads, vreads, instance histories, searches with
    // random parameters, `$everything`, creates and updates for a consenting patient, and
    // searches, `$everything` and creates for a patient who gave this organisation no
    // consent (denied by the ledger). Each answer names exactly one entry; the 1,000 names
    // are distinct, are exactly the access and record entries the ledger gained (no request
    // left an unnamed one), carry the decision the caller saw, and each is proven in the
    // Merkle log against the final tree head.
    let node = Arc::new(Node::start().await);
    let alice = node.clinician("dr-alice").await;
    let token = node.token(&alice.id, "user/*.cruds", None);
    let consenting = node.create_patient(&token).await;
    // A patient registered on the ledger with an encryption key, but no consent to anyone.
    let stranger = Identity::new_patient().expect("a patient identity");
    node.commit(
        &stranger,
        TxBody::RegisterPatient {
            public_key: stranger.key.public_key(),
        },
    )
    .await;
    node.commit(
        &stranger,
        TxBody::SetEncryptionKey {
            public_key: stranger
                .encryption_key()
                .expect("a patient has an encryption key")
                .public_key()
                .to_base64url(),
        },
    )
    .await;
    let mut ids = Vec::new();
    for n in 0..4 {
        let day = format!("2025-03-{:02}T08:00:00Z", 10 + n);
        let created = node
            .create_observation(&token, &consenting, HEART_RATE, &day, 70 + n)
            .await;
        ids.push(id_of(&created));
    }
    let ids = Arc::new(Mutex::new(ids));
    let start = node.ledger.store().head().unwrap().unwrap().log_size;

    let mut seed: u64 = 0x00c0_ffee_1000;
    let mut random = move |bound: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % bound as u64) as usize
    };
    let total = 1000;
    let mut named: Vec<(String, StatusCode)> = Vec::new();
    let mut kinds = [0usize; 11];
    while named.len() < total {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..8.min(total - named.len()) {
            let known = ids.lock().unwrap().clone();
            let id = known[random(known.len())].clone();
            let kind = random(kinds.len());
            kinds[kind] += 1;
            let codes = [HEART_RATE, BODY_WEIGHT];
            let call = match kind {
                0 => Call::get(&format!("/fhir/Observation/{id}"), StatusCode::OK),
                1 => Call::get(
                    &format!("/fhir/Observation/{id}/_history/1"),
                    StatusCode::OK,
                ),
                2 => Call::get(&format!("/fhir/Observation/{id}/_history"), StatusCode::OK),
                3 => {
                    let filters = [
                        format!("code={LOINC}|{}", codes[random(2)]),
                        format!("date=ge2025-03-{:02}", 9 + random(6)),
                        format!("_count={}", 1 + random(5)),
                        "_sort=-date".to_string(),
                        "_include=Observation:patient".to_string(),
                    ];
                    let filter = &filters[random(filters.len())];
                    Call::get(
                        &format!("/fhir/Observation?patient={consenting}&{filter}"),
                        StatusCode::OK,
                    )
                }
                4 => Call::get(
                    &format!("/fhir/Patient/{consenting}/$everything"),
                    StatusCode::OK,
                ),
                5 => Call::get(
                    &format!("/fhir/Observation?patient={}", stranger.id),
                    StatusCode::OK,
                ),
                6 => Call::get(
                    &format!("/fhir/Patient/{}/$everything", stranger.id),
                    StatusCode::OK,
                ),
                7 => Call {
                    method: Method::POST,
                    uri: "/fhir/Observation".into(),
                    body: Some(observation(
                        &consenting,
                        codes[random(2)],
                        "2025-03-20T09:30:00Z",
                        60 + random(40) as u64,
                    )),
                    status: StatusCode::CREATED,
                },
                8 => {
                    let mut resource =
                        observation(&consenting, HEART_RATE, "2025-03-21T10:00:00Z", 80);
                    resource["id"] = json!(id);
                    Call {
                        method: Method::PUT,
                        uri: format!("/fhir/Observation/{id}"),
                        body: Some(resource),
                        status: StatusCode::OK,
                    }
                }
                9 => Call {
                    method: Method::POST,
                    uri: "/fhir/Observation".into(),
                    body: Some(observation(
                        &stranger.id,
                        HEART_RATE,
                        "2025-03-22T11:00:00Z",
                        75,
                    )),
                    status: StatusCode::FORBIDDEN,
                },
                _ => Call::get(&format!("/fhir/Patient/{consenting}"), StatusCode::OK),
            };
            let (node, token, ids) = (node.clone(), token.clone(), ids.clone());
            batch.spawn(async move {
                let body = match &call.body {
                    Some(resource) => Body::from(resource.to_string()),
                    None => Body::empty(),
                };
                let extra = [(header::CONTENT_TYPE, "application/fhir+json")];
                let answer = node
                    .send(call.method.clone(), &call.uri, Some(&token), &extra, body)
                    .await;
                assert_eq!(answer.status, call.status, "{call:?}: {}", answer.text());
                if call.status == StatusCode::CREATED {
                    ids.lock().unwrap().push(id_of(&answer.body));
                }
                let header = answer
                    .headers
                    .get(fhir_api::ACCESS_ENTRY_HEADER)
                    .unwrap_or_else(|| panic!("{call:?} names no access entry"))
                    .to_str()
                    .expect("a hex header")
                    .to_string();
                assert!(!header.contains(','), "{call:?} left several: {header}");
                (header, answer.status)
            });
        }
        while let Some(done) = batch.join_next().await {
            named.push(done.expect("a request task"));
        }
    }
    assert!(
        kinds.iter().all(|&n| n > 40),
        "every kind was exercised: {kinds:?}"
    );

    // The entries the ledger gained are exactly the ones the answers named.
    let store = node.ledger.store();
    let end = store.head().unwrap().unwrap().log_size;
    let snapshot = store.snapshot().unwrap();
    let mut on_ledger: HashMap<String, u64> = HashMap::new();
    let mut events: HashMap<u64, medledger_core::model::AuditEvent> = HashMap::new();
    for leaf in start..end {
        let Some(event) = snapshot
            .value::<medledger_core::model::AuditEvent>(&keys::event(leaf))
            .unwrap()
        else {
            continue;
        };
        if event.kind == "log_access" || event.kind == "create_record" {
            on_ledger.insert(event.tx_id.to_hex(), leaf);
            events.insert(leaf, event);
        }
    }
    let named_ids: BTreeSet<&String> = named.iter().map(|(id, _)| id).collect();
    assert_eq!(named_ids.len(), total, "every request named its own entry");
    assert_eq!(
        on_ledger.len(),
        total,
        "the ledger gained one entry per request"
    );
    for (id, status) in &named {
        let leaf = *on_ledger
            .get(id)
            .unwrap_or_else(|| panic!("entry {id} is not a new access entry"));
        let event = &events[&leaf];
        let granted = match &event.decision {
            Some(decision) => decision.is_granted(),
            None => event.rejected.is_none(),
        };
        let denied_patient = event.patient.as_deref() == Some(stranger.id.as_str());
        assert_eq!(
            granted, !denied_patient,
            "entry {id} ({}) decided as the caller saw",
            event.kind
        );
        assert_eq!(
            *status == StatusCode::FORBIDDEN,
            event.kind == "create_record" && !granted
        );
        common::prove_leaf(store, event.height, leaf, &format!("entry {id}"));
    }
    println!("1,000 requests by kind {kinds:?}: 1,000 distinct entries, each proven");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_history_lists_one_patients_versions_newest_first_under_one_entry() {
    // Goal: `GET /fhir/Observation/_history?patient=…` answers a history Bundle of every
    // version of the patient's Observations (creates, updates and the tombstone of a
    // delete), newest first, honouring `_count` and `_since`, under exactly one access entry;
    // without a patient it is a 400, and another type's records are not in it.
    let node = Node::start().await;
    let alice = node.clinician("dr-alice").await;
    let token = node.token(&alice.id, "user/*.cruds", None);
    let patient = node.create_patient(&token).await;
    let kept = node
        .create_observation(&token, &patient, HEART_RATE, "2025-03-10T08:00:00Z", 72)
        .await;
    let dropped = node
        .create_observation(&token, &patient, BODY_WEIGHT, "2025-03-11T08:00:00Z", 80)
        .await;
    let mut changed = kept.clone();
    changed["valueQuantity"]["value"] = json!(75);
    node.put(
        &format!("/fhir/Observation/{}", id_of(&kept)),
        &token,
        &changed,
        None,
    )
    .await
    .expect_fhir(StatusCode::OK);
    let deleted = node
        .send(
            Method::DELETE,
            &format!("/fhir/Observation/{}", id_of(&dropped)),
            Some(&token),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text());

    let history = node
        .get(
            &format!("/fhir/Observation/_history?patient={patient}"),
            &token,
        )
        .await;
    let bundle = history.expect_fhir(StatusCode::OK);
    assert_eq!(bundle["type"], "history");
    assert_eq!(bundle["total"], 4);
    let seen: Vec<(String, String, String)> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["request"]["method"].as_str().unwrap().to_string(),
                e["fullUrl"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string(),
                e["response"]["etag"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("DELETE".into(), id_of(&dropped), "W/\"2\"".into()),
            ("PUT".into(), id_of(&kept), "W/\"2\"".into()),
            ("POST".into(), id_of(&dropped), "W/\"1\"".into()),
            ("POST".into(), id_of(&kept), "W/\"1\"".into()),
        ],
        "newest first"
    );
    assert!(
        bundle["entry"][0].get("resource").is_none(),
        "a tombstone has no resource"
    );
    let entries = history
        .headers
        .get(fhir_api::ACCESS_ENTRY_HEADER)
        .expect("the access entry is named")
        .to_str()
        .unwrap();
    assert_eq!(entries.split(',').count(), 1, "one access entry");

    let page = node
        .get(
            &format!("/fhir/Observation/_history?patient={patient}&_count=2"),
            &token,
        )
        .await;
    let page = page.expect_fhir(StatusCode::OK);
    assert_eq!(page["total"], 4);
    assert_eq!(page["entry"].as_array().unwrap().len(), 2);
    let later = node
        .get(
            &format!("/fhir/Observation/_history?patient={patient}&_since=2100-01-01"),
            &token,
        )
        .await;
    assert_eq!(later.expect_fhir(StatusCode::OK)["total"], 0);
    let conditions = node
        .get(
            &format!("/fhir/Condition/_history?patient={patient}"),
            &token,
        )
        .await;
    assert_eq!(conditions.expect_fhir(StatusCode::OK)["total"], 0);
    node.get("/fhir/Observation/_history", &token)
        .await
        .expect_outcome(StatusCode::BAD_REQUEST, "invalid", Some("patient_required"));
    node.get(
        &format!("/fhir/Observation/_history?patient={patient}&_since=soon"),
        &token,
    )
    .await
    .expect_outcome(StatusCode::BAD_REQUEST, "invalid", None);
}

impl Call {
    fn get(uri: &str, status: StatusCode) -> Call {
        Call {
            method: Method::GET,
            uri: uri.to_string(),
            body: None,
            status,
        }
    }
}

// ---- batch and transaction Bundles ----------------------------------------------------------

fn encounter(patient: &str) -> Value {
    json!({
        "resourceType": "Encounter",
        "status": "finished",
        "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB" },
        "subject": { "reference": format!("Patient/{patient}") },
    })
}

fn coverage(patient: &str) -> Value {
    json!({
        "resourceType": "Coverage",
        "status": "active",
        "beneficiary": { "reference": format!("Patient/{patient}") },
        "payor": [{ "reference": "Organization/insurer-z" }],
    })
}

fn bundle(kind: &str, entries: Vec<Value>) -> Value {
    json!({ "resourceType": "Bundle", "type": kind, "entry": entries })
}

fn request_entry(method: &str, url: &str, resource: Option<Value>) -> Value {
    let mut entry = json!({ "request": { "method": method, "url": url } });
    if let Some(resource) = resource {
        entry["resource"] = resource;
    }
    entry
}

/// The id in an entry's `response.location` (`Type/id/_history/n`).
fn location_id(entry: &Value) -> String {
    let location = entry["response"]["location"]
        .as_str()
        .unwrap_or_else(|| panic!("a location: {entry}"));
    location.split('/').nth(1).expect("Type/id/...").to_string()
}

/// How many record versions of `patient` this node's ledger indexes, over all records.
fn indexed_versions(node: &Node, patient: &str) -> usize {
    let snapshot = node.ledger.store().snapshot().expect("a snapshot");
    let prefix = keys::patient_records_prefix(patient);
    snapshot
        .scan(&prefix, None, 1000)
        .expect("the index scans")
        .iter()
        .map(|(key, _)| {
            let (custodian, id) = key[prefix.len()..].split_once('/').expect("custodian/id");
            snapshot
                .value::<Record>(&keys::record(custodian, id))
                .expect("the state reads")
                .map_or(0, |r| r.versions.len())
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_each_entry_on_its_own() {
    // Goal: a batch Bundle runs every entry independently through the same checks as the
    // single interactions: reads, a search, a create (201 with location, ETag and
    // Last-Modified), a delete (200 with the tombstone's ETag) succeed while a read of an
    // unknown id (404), a stale If-Match (412), an invalid resource (422), a Consent write
    // (422) and an unsupported method (405) fail with their OperationOutcome, and the
    // failures do not stop the rest. Another Bundle type is refused with 400.
    let node = Node::start().await;
    let alice = node.clinician("dr-alice").await;
    let token = node.token(&alice.id, "user/*.cruds", None);
    let patient = node.create_patient(&token).await;
    let existing = node
        .create_observation(&token, &patient, HEART_RATE, "2025-03-10T08:00:00Z", 72)
        .await;
    let id = id_of(&existing);
    let mut stale = existing.clone();
    stale["valueQuantity"]["value"] = json!(99);
    let mut invalid = observation(&patient, HEART_RATE, "2025-03-11T08:00:00Z", 70);
    invalid.as_object_mut().expect("an object").remove("status");
    let mut stale_entry = request_entry("PUT", &format!("Observation/{id}"), Some(stale));
    stale_entry["request"]["ifMatch"] = json!("W/\"7\"");
    let batch = bundle(
        "batch",
        vec![
            request_entry("GET", &format!("Observation/{id}"), None),
            request_entry("GET", &format!("Observation/{ORG}.0000"), None),
            request_entry(
                "POST",
                "Observation",
                Some(observation(
                    &patient,
                    BODY_WEIGHT,
                    "2025-03-12T08:00:00Z",
                    64,
                )),
            ),
            stale_entry,
            request_entry("POST", "Observation", Some(invalid)),
            request_entry(
                "GET",
                &format!("{FHIR_BASE}/Observation?patient={patient}"),
                None,
            ),
            request_entry("DELETE", &format!("Observation/{id}"), None),
            request_entry(
                "POST",
                "Consent",
                Some(json!({ "resourceType": "Consent" })),
            ),
            request_entry("PATCH", &format!("Observation/{id}"), None),
        ],
    );
    let answer = node.post("/fhir", &token, &batch).await;
    let body = answer.expect_fhir(StatusCode::OK).clone();
    assert_eq!(body["type"], "batch-response");
    let entries = body["entry"].as_array().expect("entries");
    assert_eq!(entries.len(), 9, "one answer per entry");
    let status = |i: usize| entries[i]["response"]["status"].as_str().unwrap_or("");
    assert_eq!(status(0), "200 OK");
    assert_eq!(entries[0]["resource"], existing);
    assert_eq!(entries[0]["response"]["etag"], "W/\"1\"");
    assert_eq!(status(1), "404 Not Found");
    assert_eq!(
        entries[1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(status(2), "201 Created");
    let created = location_id(&entries[2]);
    assert_eq!(
        entries[2]["response"]["location"],
        format!("Observation/{created}/_history/1")
    );
    assert_eq!(entries[2]["response"]["etag"], "W/\"1\"");
    assert!(entries[2]["response"]["lastModified"].is_string());
    assert_eq!(status(3), "412 Precondition Failed");
    assert_eq!(status(4), "422 Unprocessable Entity");
    assert_eq!(status(5), "200 OK");
    assert_eq!(entries[5]["resource"]["type"], "searchset");
    // Entries run in order: the search sees the record created before it.
    assert_eq!(entries[5]["resource"]["total"], 2);
    assert_eq!(status(6), "200 OK");
    assert_eq!(entries[6]["response"]["etag"], "W/\"2\"");
    assert_eq!(status(7), "422 Unprocessable Entity");
    assert_eq!(status(8), "405 Method Not Allowed");

    node.get(&format!("/fhir/Observation/{id}"), &token)
        .await
        .expect_outcome(StatusCode::GONE, "deleted", None);
    node.get(&format!("/fhir/Observation/{created}"), &token)
        .await
        .expect_fhir(StatusCode::OK);
    node.post("/fhir", &token, &bundle("searchset", vec![]))
        .await
        .expect_outcome(StatusCode::BAD_REQUEST, "invalid", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_one_ledger_transaction_with_its_references_resolved() {
    // Goal: a transaction Bundle creating an Encounter and an Observation that refers to it
    // by urn:uuid, updating an existing Observation under If-Match (also referring to the
    // new Encounter) and deleting another is answered with a transaction-response in entry
    // order; the references name the ids the server assigned; all four versions are one
    // create_records transaction signed by the clinician; and every version reads back
    // through the checks a reader runs (the author's signature on the group included).
    let node = Node::start().await;
    let alice = node.clinician("dr-alice").await;
    let token = node.token(&alice.id, "user/*.cruds", None);
    let patient = node.create_patient(&token).await;
    let kept = node
        .create_observation(&token, &patient, HEART_RATE, "2025-03-10T08:00:00Z", 72)
        .await;
    let gone = node
        .create_observation(&token, &patient, BODY_WEIGHT, "2025-03-10T08:00:00Z", 64)
        .await;
    let (kept_id, gone_id) = (id_of(&kept), id_of(&gone));
    let encounter_url = "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a";
    let mut new_observation = observation(&patient, HEART_RATE, "2025-03-12T08:00:00Z", 70);
    new_observation["encounter"] = json!({ "reference": encounter_url });
    let mut updated = kept.clone();
    updated["valueQuantity"]["value"] = json!(75);
    updated["encounter"] = json!({ "reference": encounter_url });
    let mut encounter_entry = request_entry("POST", "Encounter", Some(encounter(&patient)));
    encounter_entry["fullUrl"] = json!(encounter_url);
    let mut update_entry = request_entry("PUT", &format!("Observation/{kept_id}"), Some(updated));
    update_entry["request"]["ifMatch"] = json!("W/\"1\"");
    let transaction = bundle(
        "transaction",
        vec![
            request_entry("POST", "Observation", Some(new_observation)),
            encounter_entry,
            update_entry,
            request_entry("DELETE", &format!("Observation/{gone_id}"), None),
        ],
    );
    let events_before = node.audit_trail(&patient).await.len();
    let answer = node.post("/fhir", &token, &transaction).await;
    let body = answer.expect_fhir(StatusCode::OK).clone();
    assert_eq!(body["type"], "transaction-response");
    let entries = body["entry"].as_array().expect("entries");
    assert_eq!(entries.len(), 4);
    assert_eq!(entries[0]["response"]["status"], "201 Created");
    assert_eq!(entries[1]["response"]["status"], "201 Created");
    assert_eq!(entries[2]["response"]["status"], "200 OK");
    assert_eq!(entries[2]["response"]["etag"], "W/\"2\"");
    assert_eq!(entries[3]["response"]["status"], "200 OK");
    assert_eq!(entries[3]["response"]["etag"], "W/\"2\"");
    let (observation_id, encounter_id) = (location_id(&entries[0]), location_id(&entries[1]));
    let reference = format!("Encounter/{encounter_id}");

    let read = node
        .get(&format!("/fhir/Observation/{observation_id}"), &token)
        .await;
    assert_eq!(
        read.expect_fhir(StatusCode::OK)["encounter"]["reference"],
        reference
    );
    let read = node
        .get(&format!("/fhir/Observation/{kept_id}"), &token)
        .await;
    let read = read.expect_fhir(StatusCode::OK);
    assert_eq!(read["encounter"]["reference"], reference);
    assert_eq!(read["valueQuantity"]["value"], 75);
    node.get(&format!("/fhir/Encounter/{encounter_id}"), &token)
        .await
        .expect_fhir(StatusCode::OK);
    node.get(&format!("/fhir/Observation/{gone_id}"), &token)
        .await
        .expect_outcome(StatusCode::GONE, "deleted", None);

    // One ledger transaction indexed all four versions.
    let versions = [
        indexed_record(&node, &observation_id).versions[0].clone(),
        indexed_record(&node, &encounter_id).versions[0].clone(),
        indexed_record(&node, &kept_id).versions[1].clone(),
        indexed_record(&node, &gone_id).versions[1].clone(),
    ];
    assert!(versions.iter().all(|v| v.tx_id == versions[0].tx_id));
    assert!(versions.iter().all(|v| v.author == alice.id));
    assert!(versions[3].deleted);
    let trail = node.audit_trail(&patient).await;
    let writes: Vec<&Value> = trail[events_before..]
        .iter()
        .filter(|e| e["kind"] != "log_access")
        .collect();
    assert_eq!(writes.len(), 1, "one write entry: {writes:?}");
    assert_eq!(writes[0]["kind"], "create_records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transaction_commits_nothing() {
    // Goal: a transaction fails whole, with the failing entry's status, and indexes no
    // version: a stale If-Match (412) or an invalid resource (422) after a valid create
    // leave the ledger exactly as it was (no version, no audit entry); a read in a
    // transaction (400), a new Patient (422) and a second patient's record (422) are
    // refused before anything is sealed; and when the ledger refuses the group (a type
    // the patient's consent does not cover, 403), no version is indexed and the only
    // trace is the ledger's record of the refused write.
    let node = Node::start().await;
    let alice = node.clinician("dr-alice").await;
    let token = node.token(&alice.id, "user/*.cruds", None);
    let patient = node.create_patient(&token).await;
    let other = node.create_patient(&token).await;
    let kept = node
        .create_observation(&token, &patient, HEART_RATE, "2025-03-10T08:00:00Z", 72)
        .await;
    let kept_id = id_of(&kept);
    let fresh = || {
        request_entry(
            "POST",
            "Observation",
            Some(observation(
                &patient,
                BODY_WEIGHT,
                "2025-03-12T08:00:00Z",
                64,
            )),
        )
    };
    let versions_before = indexed_versions(&node, &patient);
    let other_before = indexed_versions(&node, &other);
    let events_before = node.audit_trail(&patient).await.len();

    let mut stale = request_entry("PUT", &format!("Observation/{kept_id}"), Some(kept.clone()));
    stale["request"]["ifMatch"] = json!("W/\"5\"");
    let mut invalid = observation(&patient, HEART_RATE, "2025-03-11T08:00:00Z", 70);
    invalid.as_object_mut().expect("an object").remove("status");
    let refusals = [
        (
            vec![fresh(), stale],
            StatusCode::PRECONDITION_FAILED,
            "conflict",
        ),
        (
            vec![fresh(), request_entry("POST", "Observation", Some(invalid))],
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
        ),
        (
            vec![
                fresh(),
                request_entry("GET", &format!("Observation/{kept_id}"), None),
            ],
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            vec![
                fresh(),
                request_entry("POST", "Patient", Some(patient_resource())),
            ],
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-supported",
        ),
        (
            vec![
                fresh(),
                request_entry(
                    "POST",
                    "Observation",
                    Some(observation(&other, HEART_RATE, "2025-03-12T08:00:00Z", 61)),
                ),
            ],
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
        ),
    ];
    for (entries, status, code) in refusals {
        node.post("/fhir", &token, &bundle("transaction", entries))
            .await
            .expect_outcome(status, code, None);
        assert_eq!(indexed_versions(&node, &patient), versions_before);
        assert_eq!(node.audit_trail(&patient).await.len(), events_before);
    }
    assert_eq!(indexed_versions(&node, &other), other_before);

    // The ledger refuses the group: the consent covers no financial records.
    let denied = bundle(
        "transaction",
        vec![
            fresh(),
            request_entry("POST", "Coverage", Some(coverage(&patient))),
        ],
    );
    node.post("/fhir", &token, &denied).await.expect_outcome(
        StatusCode::FORBIDDEN,
        "forbidden",
        Some("no_consent"),
    );
    assert_eq!(indexed_versions(&node, &patient), versions_before);
    let trail = node.audit_trail(&patient).await;
    assert_eq!(trail.len(), events_before + 1, "only the refused write");
    let refused = trail.last().expect("the refused write");
    assert_eq!(refused["kind"], "create_records");
    assert_eq!(refused["rejected"], "no_consent");
    assert_eq!(
        node.get(&format!("/fhir/Observation/{kept_id}"), &token)
            .await
            .expect_fhir(StatusCode::OK),
        &kept
    );
}

// ---- SMART App Launch (standalone): authorization code with PKCE -------------------------

const APP_ID: &str = "pocket-chart";
const APP_REDIRECT: &str = "http://127.0.0.1:8765/callback";
const APP_OTHER_REDIRECT: &str = "https://pocket-chart.example/callback";
const APP_STATE: &str = "af0ifjsldkj<&\">'";
const APP_NONCE: &str = "n-0S6_WzA2Mj";
/// A PKCE verifier: 64 characters of the unreserved set.
const VERIFIER: &str = "m4Y-t3st.v3rifier~that_is_long_enough_for_rfc7636_0123456789abcd";

/// `BASE64URL(SHA256(verifier))`, computed here without the server's code.
fn challenge_of(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// A patient with a record and an account at the node, and a registered SMART app; the
/// API's clock is moved on 30 s for every login so that each one has a fresh one-time
/// code.
struct Launch {
    node: Node,
    patient: String,
    observation: String,
    secret: Vec<u8>,
    clock_offset_s: Arc<std::sync::atomic::AtomicU64>,
}

impl Launch {
    async fn start() -> Launch {
        Launch::start_allowing("patient/*.rs patient/Consent.cruds").await
    }

    /// The launch with the patient's account allowed `account_scopes`.
    async fn start_allowing(account_scopes: &str) -> Launch {
        let node = Node::start().await;
        let alice = node.clinician("dr-alice").await;
        let clinician = node.token(&alice.id, "user/*.cruds", None);
        let patient = node.create_patient(&clinician).await;
        let record = node
            .create_observation(&clinician, &patient, HEART_RATE, "2025-03-10T08:00:00Z", 72)
            .await;
        let secret = node.add_account(
            &patient,
            AccountKind::Patient,
            account_scopes,
            &node.patient_key_file(&patient),
        );
        node.state
            .accounts()
            .add_app(medledger_node::auth::App {
                client_id: APP_ID.to_string(),
                redirect_uris: vec![APP_REDIRECT.to_string(), APP_OTHER_REDIRECT.to_string()],
                allowed_scopes:
                    "patient/*.rs user/*.rs openid fhirUser launch/patient offline_access"
                        .to_string(),
            })
            .expect("the app is registered");
        let clock_offset_s = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let offset = clock_offset_s.clone();
        node.state.set_clock(Arc::new(move || {
            now_s() + offset.load(std::sync::atomic::Ordering::SeqCst)
        }));
        Launch {
            node,
            patient,
            observation: id_of(&record),
            secret,
            clock_offset_s,
        }
    }

    fn advance_clock(&self, seconds: u64) -> u64 {
        self.clock_offset_s
            .fetch_add(seconds, std::sync::atomic::Ordering::SeqCst)
            + seconds
    }

    /// The authorization request's parameters, with `changes` applied (None removes one).
    fn request(&self, changes: &[(&str, Option<&str>)]) -> Vec<(String, String)> {
        let challenge = challenge_of(VERIFIER);
        let mut params: Vec<(String, String)> = [
            ("response_type", "code"),
            ("client_id", APP_ID),
            ("redirect_uri", APP_REDIRECT),
            ("scope", "patient/*.rs launch/patient openid"),
            ("state", APP_STATE),
            ("aud", FHIR_BASE),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        for (name, value) in changes {
            params.retain(|(n, _)| n != name);
            if let Some(value) = value {
                params.push((name.to_string(), value.to_string()));
            }
        }
        params
    }

    async fn authorize_get(&self, params: &[(String, String)]) -> Answer {
        let pairs: Vec<(&str, &str)> = params
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        self.node
            .get_anonymous(&format!("/auth/authorize?{}", form_encode(&pairs)))
            .await
    }

    /// Posts the login form: the request's parameters plus the person's credentials.
    async fn authorize_post(&self, params: &[(String, String)], login: &[(&str, &str)]) -> Answer {
        let mut pairs: Vec<(&str, &str)> = params
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        pairs.extend_from_slice(login);
        self.node
            .send(
                Method::POST,
                "/auth/authorize",
                None,
                &[(header::CONTENT_TYPE, "application/x-www-form-urlencoded")],
                Body::from(form_encode(&pairs)),
            )
            .await
    }

    /// Logs the patient in through the form with a fresh one-time code; returns the answer.
    async fn log_in(&self, params: &[(String, String)], password: &str) -> Answer {
        let offset = self.advance_clock(30);
        let code = totp_code(&self.secret, now_s() + offset);
        self.authorize_post(
            params,
            &[
                ("username", &self.patient),
                ("password", password),
                ("totp", &code),
            ],
        )
        .await
    }

    /// A code for the default request (redirected to `APP_REDIRECT`).
    async fn code(&self) -> String {
        let answer = self.log_in(&self.request(&[]), PASSWORD).await;
        let back = redirected(&answer, APP_REDIRECT);
        assert_eq!(back.get("state").map(String::as_str), Some(APP_STATE));
        back.get("code").expect("a code").clone()
    }

    /// A login through the app asking for `scope`, its code exchanged for tokens.
    async fn tokens_for(&self, scope: &str) -> Answer {
        let login = self
            .log_in(
                &self.request(&[("scope", Some(scope)), ("nonce", Some(APP_NONCE))]),
                PASSWORD,
            )
            .await;
        let code = redirected(&login, APP_REDIRECT)["code"].clone();
        self.exchange_code(&code, &[]).await
    }

    async fn exchange(&self, changes: &[(&str, Option<&str>)]) -> Answer {
        let code = self.code().await;
        self.exchange_code(&code, changes).await
    }

    async fn exchange_code(&self, code: &str, changes: &[(&str, Option<&str>)]) -> Answer {
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", APP_REDIRECT),
            ("client_id", APP_ID),
            ("code_verifier", VERIFIER),
        ];
        for (name, value) in changes {
            form.retain(|(n, _)| n != name);
            if let Some(value) = value {
                form.push((name, value));
            }
        }
        self.node.token_request(&form).await
    }
}

/// Asserts a 303 back to `redirect_uri` and returns its query parameters.
fn redirected(answer: &Answer, redirect_uri: &str) -> HashMap<String, String> {
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.text());
    assert_eq!(answer.header(header::CACHE_CONTROL), Some("no-store"));
    let location = answer.header(header::LOCATION).expect("a Location");
    let query = location
        .strip_prefix(&format!("{redirect_uri}?"))
        .unwrap_or_else(|| panic!("{location} goes back to {redirect_uri}"));
    query
        .split('&')
        .map(|pair| {
            let (name, value) = pair.split_once('=').expect("name=value");
            (
                name.to_string(),
                fhir_api::percent_decode(value).expect("well encoded"),
            )
        })
        .collect()
}

/// Asserts the redirect of a refused authorization request: the error and the state.
fn expect_redirected_error(answer: &Answer, error: &str) {
    let back = redirected(answer, APP_REDIRECT);
    assert_eq!(
        back.get("error").map(String::as_str),
        Some(error),
        "{back:?}"
    );
    assert_eq!(back.get("state").map(String::as_str), Some(APP_STATE));
    assert!(!back.contains_key("code"), "{back:?}");
}

/// Asserts an HTML page that is not a redirect, with the login page's protections.
fn expect_page(answer: &Answer, status: StatusCode) -> String {
    assert_eq!(answer.status, status, "{}", answer.text());
    assert!(
        answer.header(header::LOCATION).is_none(),
        "{}",
        answer.text()
    );
    assert_eq!(
        answer.header(header::CONTENT_TYPE),
        Some("text/html; charset=utf-8")
    );
    let csp = answer
        .header(header::CONTENT_SECURITY_POLICY)
        .expect("a Content-Security-Policy");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(answer.header(header::X_FRAME_OPTIONS), Some("DENY"));
    assert_eq!(answer.header(header::CACHE_CONTROL), Some("no-store"));
    String::from_utf8(answer.bytes.to_vec()).expect("UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smart_app_logs_a_patient_in_with_an_authorization_code_and_pkce() {
    // Goal: the standalone launch works end to end: discovery names the authorization
    // endpoint and S256; the login page (no external resources, escaped, unframable)
    // posts the person's password and one-time code; the browser goes back to the app's
    // redirect URI with a code and the app's state; the code and the PKCE verifier give
    // a patient-context token (narrowed to what app and account both allow) that reads the
    // patient's record; and the code works once.
    let launch = Launch::start().await;
    let node = &launch.node;

    let smart = node.get_anonymous("/.well-known/smart-configuration").await;
    assert_eq!(
        smart.body["authorization_endpoint"],
        format!("{API_URL}/auth/authorize")
    );
    assert_eq!(
        smart.body["code_challenge_methods_supported"],
        json!(["S256"])
    );
    assert_eq!(smart.body["response_types_supported"], json!(["code"]));
    let grants = smart.body["grant_types_supported"]
        .as_array()
        .expect("a list");
    assert!(grants.contains(&json!("authorization_code")));
    let capabilities = smart.body["capabilities"].as_array().expect("a list");
    for capability in [
        "launch-standalone",
        "client-public",
        "context-standalone-patient",
    ] {
        assert!(capabilities.contains(&json!(capability)), "{capability}");
    }
    let metadata = node.get_anonymous("/fhir/metadata").await;
    let oauth = &metadata.body["rest"][0]["security"]["extension"][0]["extension"];
    assert_eq!(oauth[1]["url"], "authorize");
    assert_eq!(oauth[1]["valueUri"], format!("{API_URL}/auth/authorize"));

    let form = launch.authorize_get(&launch.request(&[])).await;
    let html = expect_page(&form, StatusCode::OK);
    for field in [
        "username",
        "password",
        "totp",
        "code_challenge",
        "state",
        "aud",
    ] {
        assert!(
            html.contains(&format!("name=\"{field}\"")),
            "{field}: {html}"
        );
    }
    assert!(
        html.contains("value=\"af0ifjsldkj&lt;&amp;&quot;&gt;&#39;\""),
        "the state is escaped: {html}"
    );
    assert!(!html.contains(APP_STATE), "{html}");
    for external in ["<script", "src=", "<link", "<style", "<iframe"] {
        assert!(!html.contains(external), "{external}: {html}");
    }
    let csp = form
        .header(header::CONTENT_SECURITY_POLICY)
        .expect("a policy");
    assert!(
        csp.contains("form-action 'self' http://127.0.0.1:8765"),
        "{csp}"
    );

    let code = launch.code().await;
    let exchanged = launch.exchange_code(&code, &[]).await;
    assert_eq!(exchanged.status, StatusCode::OK, "{}", exchanged.text());
    assert_eq!(exchanged.header(header::CACHE_CONTROL), Some("no-store"));
    assert_eq!(exchanged.body["token_type"], "Bearer");
    assert_eq!(exchanged.body["expires_in"], TOKEN_LIFETIME_S);
    assert_eq!(exchanged.body["patient"], launch.patient);
    // The app may have launch/patient and openid, the account neither.
    assert_eq!(exchanged.body["scope"], "patient/*.rs");
    assert!(
        exchanged.body.get("id_token").is_none(),
        "no openid, no ID token"
    );
    assert!(exchanged.body.get("refresh_token").is_none());
    let token = exchanged.body["access_token"]
        .as_str()
        .expect("an access token")
        .to_string();
    let claims = jwt_claims(&token);
    assert_eq!(claims["sub"], launch.patient);
    assert_eq!(claims["patient"], launch.patient);
    assert_eq!(claims["aud"], FHIR_BASE);
    assert_eq!(claims["amr"], json!(["pwd", "otp"]));
    assert_eq!(
        claims["fhirUser"],
        format!("{FHIR_BASE}/Patient/{}", launch.patient)
    );

    let record = node
        .get(&format!("/fhir/Observation/{}", launch.observation), &token)
        .await;
    let record = record.expect_fhir(StatusCode::OK);
    assert_eq!(
        record["subject"]["reference"],
        format!("Patient/{}", launch.patient)
    );

    launch
        .exchange_code(&code, &[])
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smart_app_granted_openid_and_offline_access_gets_id_and_refresh_tokens() {
    // Goal: a launch granted `openid` answers an ID token for the app (its nonce, the
    // fhirUser claim; refused as a bearer token); one granted `offline_access` answers a
    // refresh token; redeeming it (with
    // the app's client id) answers a working access token and the next refresh token;
    // another client and a wider scope are refused without using the token up; a narrower
    // scope is granted as asked; a replay of a used token is refused and ends the session,
    // so its newest token dies too; a locked account refreshes nothing until the lock ends;
    // and a removed account refreshes nothing. (The unit
    // tests of `refresh` show the sessions survive a restart.)
    let launch =
        Launch::start_allowing("patient/*.rs patient/Consent.cruds openid fhirUser offline_access")
            .await;
    let node = &launch.node;
    let scope = "patient/*.rs launch/patient openid fhirUser offline_access";
    let answer = launch.tokens_for(scope).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    // Narrowed to what the account allows: not launch/patient.
    assert_eq!(
        answer.body["scope"],
        "patient/*.rs openid fhirUser offline_access"
    );
    // openid: an ID token for the app, which is no bearer token for the API.
    let id_token = answer.body["id_token"].as_str().expect("an ID token");
    let id_claims = jwt_claims(id_token);
    assert_eq!(id_claims["iss"], API_URL);
    assert_eq!(id_claims["aud"], APP_ID);
    assert_eq!(id_claims["sub"], json!(launch.patient));
    assert_eq!(id_claims["nonce"], APP_NONCE);
    assert_eq!(id_claims["amr"], json!(["pwd", "otp"]));
    assert_eq!(
        id_claims["fhirUser"],
        format!("{FHIR_BASE}/Patient/{}", launch.patient)
    );
    node.get(
        &format!("/fhir/Observation/{}", launch.observation),
        id_token,
    )
    .await
    .expect_fhir(StatusCode::UNAUTHORIZED);
    let discovery = node
        .get_anonymous("/.well-known/openid-configuration")
        .await;
    assert_eq!(discovery.body["issuer"], API_URL);
    assert_eq!(
        discovery.body["id_token_signing_alg_values_supported"],
        json!(["ES256"])
    );
    let first = answer.body["refresh_token"]
        .as_str()
        .expect("a refresh token")
        .to_string();
    let refresh = |token: String, client: Option<&'static str>, scope: Option<&'static str>| async move {
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", token.as_str()),
        ];
        form.extend(client.map(|client| ("client_id", client)));
        form.extend(scope.map(|scope| ("scope", scope)));
        node.token_request(&form).await
    };

    refresh(first.clone(), Some("another-app"), None)
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    refresh(first.clone(), Some(APP_ID), Some("patient/*.cruds"))
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_scope");
    let renewed = refresh(first.clone(), Some(APP_ID), None).await;
    assert_eq!(renewed.status, StatusCode::OK, "{}", renewed.text());
    assert_eq!(renewed.header(header::CACHE_CONTROL), Some("no-store"));
    assert_eq!(renewed.body["patient"], json!(launch.patient));
    let renewed_id = jwt_claims(renewed.body["id_token"].as_str().expect("an ID token"));
    assert_eq!(renewed_id["aud"], APP_ID);
    assert!(renewed_id.get("nonce").is_none(), "a refresh has no nonce");
    let token = renewed.body["access_token"]
        .as_str()
        .expect("an access token");
    node.get(&format!("/fhir/Observation/{}", launch.observation), token)
        .await
        .expect_fhir(StatusCode::OK);
    let second = renewed.body["refresh_token"]
        .as_str()
        .expect("the next refresh token")
        .to_string();
    assert_ne!(second, first);

    let narrower = refresh(second.clone(), Some(APP_ID), Some("patient/Observation.rs")).await;
    assert_eq!(narrower.status, StatusCode::OK, "{}", narrower.text());
    assert_eq!(narrower.body["scope"], "patient/Observation.rs");
    let third = narrower.body["refresh_token"]
        .as_str()
        .expect("the next refresh token")
        .to_string();

    // A replay of a used token: someone else holds a copy, so the session ends.
    refresh(second, Some(APP_ID), None)
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    refresh(third, Some(APP_ID), None)
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");

    // A locked account refreshes nothing, and the refusal leaves the token good for when
    // the lock ends; a removed account refreshes nothing.
    let again = launch.tokens_for(scope).await;
    let locked = again.body["refresh_token"]
        .as_str()
        .expect("a refresh token")
        .to_string();
    for _ in 0..medledger_node::auth::MAX_FAILED_LOGINS {
        node.token_request(&[
            ("grant_type", "password"),
            ("username", &launch.patient),
            ("password", "not the password at all"),
            ("totp", "000000"),
            ("scope", "patient/*.rs"),
        ])
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    }
    refresh(locked.clone(), Some(APP_ID), None)
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    launch.advance_clock(medledger_node::auth::LOCKOUT_S + 1);
    let unlocked = refresh(locked, Some(APP_ID), None).await;
    assert_eq!(unlocked.status, StatusCode::OK, "{}", unlocked.text());
    let last = unlocked.body["refresh_token"]
        .as_str()
        .expect("the next refresh token")
        .to_string();
    node.state
        .accounts()
        .remove_account(&launch.patient)
        .expect("the account is removed");
    refresh(last, Some(APP_ID), None)
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_requests_from_unknown_apps_or_redirects_never_redirect() {
    // Goal: until the app and its exact redirect URI are known, a refusal is a page at the
    // server and never a redirect (an open redirector would send browsers anywhere);
    // after that, refusals (no PKCE, plain PKCE, a bad challenge, another audience, another
    // response type, a missing state, scopes the app may not have) go back to the app with
    // `error` and its `state`.
    let launch = Launch::start().await;
    for changes in [
        vec![("client_id", Some("no-such-app"))],
        vec![("client_id", None)],
        vec![("redirect_uri", Some("https://attacker.example/callback"))],
        vec![("redirect_uri", Some("http://127.0.0.1:8765/callback/other"))],
        vec![("redirect_uri", None)],
        vec![
            ("client_id", Some("no-such-app")),
            ("code_challenge_method", Some("plain")),
        ],
    ] {
        let params = launch.request(&changes);
        let shown = launch.authorize_get(&params).await;
        expect_page(&shown, StatusCode::BAD_REQUEST);
        let posted = launch.log_in(&params, PASSWORD).await;
        expect_page(&posted, StatusCode::BAD_REQUEST);
    }
    let duplicated = format!(
        "/auth/authorize?{}&redirect_uri={}",
        form_encode(
            &launch
                .request(&[])
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect::<Vec<_>>()
        ),
        percent_encode(APP_OTHER_REDIRECT)
    );
    expect_page(
        &launch.node.get_anonymous(&duplicated).await,
        StatusCode::BAD_REQUEST,
    );

    for (changes, error) in [
        (vec![("code_challenge_method", None)], "invalid_request"),
        (
            vec![("code_challenge_method", Some("plain"))],
            "invalid_request",
        ),
        (
            vec![
                ("code_challenge_method", Some("plain")),
                ("code_challenge", Some(VERIFIER)),
            ],
            "invalid_request",
        ),
        (vec![("code_challenge", None)], "invalid_request"),
        (
            vec![("code_challenge", Some("too-short"))],
            "invalid_request",
        ),
        (
            vec![("aud", Some("https://elsewhere.example/fhir"))],
            "invalid_request",
        ),
        (vec![("aud", None)], "invalid_request"),
        (
            vec![("response_type", Some("token"))],
            "unsupported_response_type",
        ),
        (vec![("scope", Some("system/*.rs"))], "invalid_scope"),
        (vec![("scope", Some("patient/*.launder"))], "invalid_scope"),
    ] {
        let params = launch.request(&changes);
        expect_redirected_error(&launch.authorize_get(&params).await, error);
        expect_redirected_error(&launch.log_in(&params, PASSWORD).await, error);
    }
    let stateless = launch.request(&[("state", None)]);
    let back = redirected(&launch.authorize_get(&stateless).await, APP_REDIRECT);
    assert_eq!(
        back.get("error").map(String::as_str),
        Some("invalid_request")
    );
    assert!(!back.contains_key("code"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_one_time_code_issues_no_code() {
    // Goal: a failed login shows the form again with one message for either factor and
    // sends nothing to the app; a good login afterwards still works.
    let launch = Launch::start().await;
    let params = launch.request(&[]);
    let wrong_password = launch.log_in(&params, "not the password at all").await;
    let html = expect_page(&wrong_password, StatusCode::OK);
    assert!(
        html.contains("invalid username, password or code"),
        "{html}"
    );
    assert!(html.contains("name=\"password\""), "{html}");

    let offset = launch.advance_clock(30);
    let good = totp_code(&launch.secret, now_s() + offset);
    let wrong_code = (0..10u32)
        .map(|digit| format!("{digit}{digit}{digit}{digit}{digit}{digit}"))
        .find(|code| *code != good)
        .expect("another code");
    let answer = launch
        .authorize_post(
            &params,
            &[
                ("username", &launch.patient),
                ("password", PASSWORD),
                ("totp", &wrong_code),
            ],
        )
        .await;
    let html = expect_page(&answer, StatusCode::OK);
    assert!(
        html.contains("invalid username, password or code"),
        "{html}"
    );
    let stranger = launch
        .authorize_post(
            &params,
            &[
                ("username", "pt-nobody"),
                ("password", PASSWORD),
                ("totp", &good),
            ],
        )
        .await;
    expect_page(&stranger, StatusCode::OK);

    let answer = launch.exchange(&[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_are_refused_with_a_wrong_verifier_client_redirect_or_after_expiry() {
    // Goal: a code gives a token only with the verifier of its challenge, to the app it
    // was issued to, at the redirect URI of its request, within sixty seconds (time moved
    // on through the API's clock), and only once: every other attempt is `invalid_grant`
    // (an unknown app `invalid_client`) and uses the code up.
    let launch = Launch::start().await;
    let other_verifier = "another-verifier-entirely-0123456789-abcdefghijklmnop";
    for changes in [
        vec![("code_verifier", Some(other_verifier))],
        vec![("code_verifier", Some(challenge_of(VERIFIER).as_str()))],
        vec![("redirect_uri", Some(APP_OTHER_REDIRECT))],
    ] {
        let code = launch.code().await;
        launch
            .exchange_code(&code, &changes)
            .await
            .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
        launch
            .exchange_code(&code, &[])
            .await
            .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    }

    // Another registered app cannot use this app's code.
    launch
        .node
        .state
        .accounts()
        .add_app(medledger_node::auth::App {
            client_id: "other-app".to_string(),
            redirect_uris: vec![APP_REDIRECT.to_string()],
            allowed_scopes: "patient/*.rs".to_string(),
        })
        .expect("the other app is registered");
    let code = launch.code().await;
    launch
        .exchange_code(&code, &[("client_id", Some("other-app"))])
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    launch
        .exchange_code(&code, &[])
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");

    let code = launch.code().await;
    launch
        .exchange_code(&code, &[("client_id", Some("no-such-app"))])
        .await
        .expect_oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    launch
        .exchange_code(&code, &[("code_verifier", None)])
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    launch
        .exchange_code(&code, &[("code_verifier", Some("short"))])
        .await
        .expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    // None of those used the code up: they never reached it.
    let answer = launch.exchange_code(&code, &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let reused = launch.exchange_code(&code, &[]).await;
    reused.expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    assert!(
        reused.body["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("already used")),
        "{}",
        reused.text()
    );

    let code = launch.code().await;
    launch.advance_clock(61);
    let expired = launch.exchange_code(&code, &[]).await;
    expired.expect_oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    assert!(
        expired.body["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("expired")),
        "{}",
        expired.text()
    );
}

//! The HTTP API at its boundary: a request goes in, a status and a JSON body come out.
//!
//! Every test starts a fresh consortium and a solo ledger in a temporary directory and
//! drives `api::router` in process, without a socket. One helper, `Api::check`, sends a
//! request and asserts the status and either the error code or fields of the JSON body,
//! so each case below is data: a request and what must come back.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use medledger_core::audit::{verify_inclusion, verify_tree_head, InclusionProof, SignedTreeHead};
use medledger_core::block::Block;
use medledger_core::contracts::TxOutcome;
use medledger_core::crypto::Signature;
use medledger_core::identity::{OrgKind, Role};
use medledger_core::merkle::{empty_root, verify_consistency};
use medledger_core::model::{Action, Category, EmergencyReason, Grantee, Purpose, Scope};
use medledger_core::tx::{SignedTx, TxBody, TxPayload, TX_LIFETIME_MS_MAX};
use medledger_core::Hash;
use medledger_node::api::{router, SubmitResponse, BODY_BYTES_MAX};
use medledger_node::consortium::{sign, Consortium, Identity};
use medledger_node::ledger::{initialise, now_ms, Ledger, NodeIdentity, OrderingConfig};
use medledger_node::pki::Validity;
use medledger_node::sealing::seal;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tower::ServiceExt;

const CHAIN: &str = "api-test";
const DAY_MS: u64 = 86_400_000;
/// How long a test transaction stays valid: well inside `TX_LIFETIME_MS_MAX`.
const TX_LIFETIME_MS: u64 = 60_000;

/// A request to the API.
enum Req {
    Get(String),
    Post(Vec<u8>),
}

fn get(path: impl Into<String>) -> Req {
    Req::Get(path.into())
}

fn post(body: impl Into<Vec<u8>>) -> Req {
    Req::Post(body.into())
}

fn post_tx(tx: &SignedTx) -> Req {
    post(serde_json::to_vec(tx).expect("transactions encode"))
}

impl Req {
    fn describe(&self) -> String {
        match self {
            Req::Get(path) => format!("GET {path}"),
            Req::Post(body) => format!(
                "POST /v1/transactions ({} bytes: {:.80})",
                body.len(),
                String::from_utf8_lossy(body)
            ),
        }
    }
}

/// What must come back.
enum Expect {
    /// 200, and a JSON body in which every JSON pointer of this object has its value.
    Ok(Value),
    /// This status and `{"error": {"code": this, "message": ...}}`.
    Error(StatusCode, &'static str),
}

/// 200 with any JSON body.
fn ok() -> Expect {
    Expect::Ok(json!({}))
}

/// 200 with these fields (JSON pointer → value).
fn has(fields: Value) -> Expect {
    Expect::Ok(fields)
}

fn bad_request(code: &'static str) -> Expect {
    Expect::Error(StatusCode::BAD_REQUEST, code)
}

fn not_found() -> Expect {
    Expect::Error(StatusCode::NOT_FOUND, "not_found")
}

/// A consortium of two hospitals, a ledger ordered by hospital-a's node, and its API.
struct Api {
    app: Router,
    consortium: Consortium,
    validity: Validity,
    /// The last nonce each identity signed with.
    nonces: Mutex<HashMap<String, u64>>,
    _dir: tempfile::TempDir,
}

impl Api {
    fn start() -> Api {
        let now = now_ms();
        // Certificates count whole seconds.
        let second_ms = now / 1000 * 1000;
        let validity = Validity {
            not_before_ms: second_ms - DAY_MS,
            not_after_ms: second_ms + DAY_MS,
        };
        let orgs = [
            ("hospital-a", OrgKind::Hospital),
            ("hospital-b", OrgKind::Hospital),
        ];
        let consortium =
            Consortium::create(CHAIN, &orgs, now, validity).expect("create the consortium");
        let dir = tempfile::tempdir().expect("temporary directory");
        initialise(dir.path(), &consortium.genesis).expect("write genesis");
        let node = &consortium.orgs[0].node;
        let identity = NodeIdentity::from_member(node).expect("a node identity");
        let ledger = Ledger::open_solo(dir.path(), identity, OrderingConfig::default())
            .expect("open the ledger");
        Api {
            app: router(Arc::new(ledger)),
            consortium,
            validity,
            nonces: Mutex::new(HashMap::new()),
            _dir: dir,
        }
    }

    fn admin(&self, org: usize) -> &Identity {
        &self.consortium.orgs[org].admin
    }

    fn root_der(&self) -> &[u8] {
        &self.consortium.root.certificate.der
    }

    /// Signs `body` as `identity` with its next nonce, for this chain, expiring soon.
    fn sign(&self, identity: &Identity, body: TxBody) -> SignedTx {
        self.sign_until(identity, now_ms() + TX_LIFETIME_MS, body)
    }

    fn sign_until(&self, identity: &Identity, expires_at_ms: u64, body: TxBody) -> SignedTx {
        let nonce = {
            let mut nonces = self.nonces.lock().expect("nonce lock");
            let nonce = nonces.entry(identity.id.clone()).or_insert(0);
            *nonce += 1;
            *nonce
        };
        identity.sign(CHAIN, nonce, expires_at_ms, body)
    }

    /// Sends a request; returns the status and the body, which must be JSON.
    async fn send(&self, request: &Req) -> (StatusCode, Value) {
        let built = match request {
            Req::Get(path) => Request::get(path.as_str()).body(Body::empty()),
            Req::Post(body) => Request::post("/v1/transactions")
                .header("content-type", "application/json")
                .body(Body::from(body.clone())),
        }
        .expect("a well-formed request");
        let response = self.app.clone().oneshot(built).await.expect("infallible");
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("read the body")
            .to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            panic!(
                "{}: {status} with a body that is not JSON ({error}): {:?}",
                request.describe(),
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, body)
    }

    /// Sends `request`, asserts `expect`, and returns the body.
    async fn check(&self, request: Req, expect: Expect) -> Value {
        let (status, body) = self.send(&request).await;
        let what = request.describe();
        match expect {
            Expect::Ok(fields) => {
                assert_eq!(status, StatusCode::OK, "{what}: {body}");
                for (pointer, expected) in fields.as_object().expect("pointer → value") {
                    let actual = body.pointer(pointer);
                    assert_eq!(actual, Some(expected), "{what}, at {pointer:?}: {body}");
                }
            }
            Expect::Error(expected, code) => {
                assert_eq!(status, expected, "{what}: {body}");
                assert_eq!(body["error"]["code"], code, "{what}: {body}");
                let message = body["error"]["message"].as_str().unwrap_or_default();
                assert!(!message.is_empty(), "{what}: an error says why: {body}");
            }
        }
        body
    }

    /// GETs `path`, which must answer 200, as a `T`.
    async fn fetch<T: DeserializeOwned>(&self, path: impl Into<String>) -> T {
        let body = self.check(get(path), ok()).await;
        serde_json::from_value(body).expect("the body has the documented shape")
    }

    /// Submits a transaction that must be ordered (committed or rejected by the contracts).
    async fn submit(&self, tx: &SignedTx) -> SubmitResponse {
        let body = self.check(post_tx(tx), ok()).await;
        serde_json::from_value(body).expect("a submit response")
    }

    /// Submits a transaction that the contracts must accept.
    async fn commit(&self, tx: &SignedTx) -> SubmitResponse {
        let response = self.submit(tx).await;
        assert_eq!(outcome_code(&response.outcome), "committed", "{tx:?}");
        response
    }

    /// The chain's position: height, log size and state hash.
    async fn position(&self) -> (u64, u64, Value) {
        let status = self.check(get("/v1/status"), ok()).await;
        let height = status["height"].as_u64().expect("height");
        (
            height,
            status["log_size"].as_u64().expect("log_size"),
            status["state_hash"].clone(),
        )
    }

    /// A new patient, registered.
    async fn patient(&self) -> Identity {
        let patient = Identity::new_patient().expect("patient key");
        self.commit(&self.sign(&patient, register(&patient))).await;
        patient
    }

    /// A new member of `org` with `role`, enrolled by the org's admin.
    async fn member(&self, org: usize, name: &str, role: Role) -> Identity {
        let member = self.consortium.orgs[org]
            .authority
            .issue(name, role, self.validity)
            .expect("issue a member certificate");
        let certificate = member
            .certificate_text()
            .expect("members have certificates");
        let tx = self.sign(self.admin(org), TxBody::EnrollUser { certificate });
        self.commit(&tx).await;
        member
    }

    /// Checks a submit response as a client would: the tree head verifies against the
    /// consortium root, and the proof shows exactly `tx` at `leaf_index` under that head.
    fn check_receipt(&self, tx: &SignedTx, response: &SubmitResponse) {
        let head = &response.tree_head;
        verify_tree_head(head, self.root_der(), CHAIN).expect("the tree head verifies");
        assert_eq!(head.tree_head.height, response.height);
        let proof = &response.inclusion_proof;
        assert_eq!(proof.leaf_index, response.leaf_index);
        assert_eq!(proof.log_size, head.tree_head.log_size);
        verify_inclusion(proof, &head.tree_head.log_root).expect("the inclusion proof verifies");
        assert_eq!(
            proof.leaf["tx"],
            json!(tx),
            "the leaf holds the submitted tx"
        );
        assert_eq!(proof.leaf["height"], response.height);
        assert_eq!(proof.leaf["outcome"], json!(response.outcome));
    }

    /// Fetches a fresh inclusion proof for `leaf_index` and checks it against the latest
    /// signed head; returns the leaf.
    async fn prove_leaf(&self, leaf_index: u64) -> Value {
        let head: SignedTreeHead = self.fetch("/v1/tree-head").await;
        verify_tree_head(&head, self.root_der(), CHAIN).expect("the tree head verifies");
        let path = format!("/v1/proofs/inclusion?leaf_index={leaf_index}");
        let proof: InclusionProof = self.fetch(path).await;
        assert_eq!(proof.leaf_index, leaf_index);
        assert_eq!(proof.log_size, head.tree_head.log_size);
        verify_inclusion(&proof, &head.tree_head.log_root).expect("the inclusion proof verifies");
        proof.leaf
    }
}

fn register(patient: &Identity) -> TxBody {
    TxBody::RegisterPatient {
        public_key: patient.key.public_key(),
    }
}

fn diagnostics() -> Scope {
    Scope {
        categories: vec![Category::Diagnostics],
        resource_types: vec![],
    }
}

/// A patient's consent for every user of `org` to read and write diagnostics for treatment.
fn grant_org(org: &str) -> TxBody {
    TxBody::Grant {
        grantee: Grantee::Org { org: org.into() },
        scope: diagnostics(),
        actions: vec![Action::Read, Action::Write],
        purposes: vec![Purpose::Treatment],
        expires_at_ms: None,
    }
}

/// A version of an Observation, sealed so that its CID and commitment are genuine.
fn create_record(patient: &Identity, record_id: &str, version: u64) -> TxBody {
    let place = format!("hospital-a/{record_id}/{version}");
    let sealed = seal(br#"{"resourceType":"Observation"}"#, place.as_bytes()).expect("seal");
    TxBody::CreateRecord {
        patient: patient.id.clone(),
        record_id: record_id.into(),
        version,
        resource_type: "Observation".into(),
        cid: sealed.cid,
        commitment: sealed.commitment,
        deleted: false,
    }
}

/// "committed", or the rejection code.
fn outcome_code(outcome: &TxOutcome) -> String {
    match outcome {
        TxOutcome::Committed { .. } => "committed".into(),
        TxOutcome::Rejected { rejection } => rejection.code(),
    }
}

fn tx_id(tx: &SignedTx) -> Hash {
    tx.id().expect("a well-formed tx")
}

/// An identity that signs under `id` with a fresh key nobody enrolled.
fn impostor(id: &str) -> Identity {
    Identity {
        id: id.into(),
        ..Identity::new_patient().expect("a key")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_transaction_commits_with_a_signed_head_and_a_proof_of_exactly_it() {
    // Proves the submit answer is a receipt a client can check without trusting the node:
    // the head verifies against the consortium root and the leaf under it is the tx sent.
    let api = Api::start();
    let (height, log_size, _) = api.position().await;
    let patient = Identity::new_patient().expect("patient key");
    let tx = api.sign(&patient, register(&patient));
    let expect = has(json!({"/tx_id": tx_id(&tx), "/outcome": {"outcome": "committed"}}));
    let body = api.check(post_tx(&tx), expect).await;
    let response: SubmitResponse = serde_json::from_value(body).expect("a submit response");
    assert_eq!(response.height, height + 1);
    assert_eq!(response.leaf_index, log_size);
    assert_eq!(response.tree_head.tree_head.log_size, log_size + 1);
    api.check_receipt(&tx, &response);
    assert_eq!(api.position().await.0, height + 1);
    // The same leaf, proven again later against the latest head.
    let leaf = api.prove_leaf(response.leaf_index).await;
    assert_eq!(leaf, response.inclusion_proof.leaf);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_submissions_get_their_error_code_and_change_nothing() {
    // Proves every kind of bad submission is answered with its own status and code and
    // leaves the chain as it was: no block, no leaf, no state change, no nonce spent.
    let api = Api::start();
    let patient = api.patient().await;
    let stranger = Identity::new_patient().expect("patient key");
    let grant = api.sign(&patient, grant_org("hospital-a"));
    let grant_json = serde_json::to_value(&grant).unwrap();
    // The grant's JSON with the field at `pointer` set (added if absent) to `value`.
    let with = |pointer: &str, value: Value| {
        let mut changed = grant_json.clone();
        let (parent, field) = pointer.rsplit_once('/').expect("a JSON pointer");
        changed.pointer_mut(parent).expect("the parent exists")[field] = value;
        serde_json::to_vec(&changed).unwrap()
    };
    let padded = |len: usize| {
        let mut body = serde_json::to_vec(&grant).unwrap();
        body.resize(len, b' ');
        body
    };
    let changed_after_signing = SignedTx {
        payload: TxPayload {
            nonce: grant.payload.nonce + 1,
            ..grant.payload.clone()
        },
        ..grant.clone()
    };
    let mut flipped = grant.signature.0;
    flipped[10] ^= 1;
    let flipped = SignedTx {
        signature: Signature(flipped),
        ..grant.clone()
    };
    let registration_as_other = TxPayload {
        chain_id: CHAIN.into(),
        signer: patient.id.clone(),
        nonce: 1,
        expires_at_ms: now_ms() + TX_LIFETIME_MS,
        body: register(&stranger),
    };
    let oversized = TxBody::EnrollUser {
        certificate: "A".repeat(20 * 1024),
    };
    let unencodable_nonce = SignedTx {
        payload: TxPayload {
            nonce: 1 << 60,
            ..grant.payload.clone()
        },
        signature: grant.signature,
    };
    let too_large = || Expect::Error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    let malformed = || bad_request("malformed_json");
    let later = now_ms() + TX_LIFETIME_MS;
    let cases: Vec<(&str, Req, Expect)> = vec![
        ("truncated JSON", post(&br#"{"payload":"#[..]), malformed()),
        ("not JSON at all", post(&b"hello"[..]), malformed()),
        (
            "JSON of the wrong shape",
            post(&b"[1,2,3]"[..]),
            malformed(),
        ),
        (
            "a string for the nonce",
            post(with("/payload/nonce", json!("7"))),
            malformed(),
        ),
        (
            "an unknown body type",
            post(with("/payload/body/type", json!("drop"))),
            malformed(),
        ),
        (
            "an unknown field",
            post(with("/payload/extra", json!(1))),
            malformed(),
        ),
        (
            "a short signature",
            post(with("/signature", json!("AAAA"))),
            malformed(),
        ),
        (
            "non-UTF-8 bytes",
            post(vec![0xff, 0xfe, b'{', 0x80]),
            malformed(),
        ),
        ("an empty body", post(Vec::new()), malformed()),
        (
            "JSON nested too deep",
            post("[".repeat(10_000)),
            malformed(),
        ),
        (
            "blanks up to the size limit",
            post(vec![b' '; BODY_BYTES_MAX]),
            malformed(),
        ),
        (
            "a byte over the size limit",
            post(padded(BODY_BYTES_MAX + 1)),
            too_large(),
        ),
        ("a megabyte", post(vec![b'{'; 1 << 20]), too_large()),
        (
            "a payload changed after signing",
            post_tx(&changed_after_signing),
            bad_request("bad_signature"),
        ),
        (
            "a flipped signature bit",
            post_tx(&flipped),
            bad_request("bad_signature"),
        ),
        (
            "a signature by another key",
            post_tx(&sign(grant.payload.clone(), &stranger.key)),
            bad_request("bad_signature"),
        ),
        (
            "an unregistered patient",
            post_tx(&api.sign(&stranger, grant_org("hospital-a"))),
            bad_request("unknown_signer"),
        ),
        (
            "an unenrolled member",
            post_tx(&api.sign(&impostor("ghost@hospital-a"), grant_org("x"))),
            bad_request("unknown_signer"),
        ),
        (
            "a signer of no known shape",
            post_tx(&api.sign(&impostor("ghost"), grant_org("x"))),
            bad_request("unknown_signer"),
        ),
        (
            "another chain",
            post_tx(&stranger.sign("other", 1, later, register(&stranger))),
            bad_request("wrong_chain"),
        ),
        (
            "a registration as another pseudonym",
            post_tx(&sign(registration_as_other, &stranger.key)),
            bad_request("invalid_transaction"),
        ),
        (
            "a tx over the tx size limit",
            post_tx(&api.sign(api.admin(0), oversized)),
            bad_request("invalid_transaction"),
        ),
        (
            "a nonce beyond 2^53",
            post_tx(&unencodable_nonce),
            bad_request("invalid_transaction"),
        ),
    ];
    for (name, request, expect) in cases {
        let before = api.position().await;
        let body = api.check(request, expect).await;
        assert_eq!(
            api.position().await,
            before,
            "{name} changed the chain: {body}"
        );
    }
    let nonce = api
        .check(get(format!("/v1/nonces/{}", patient.id)), ok())
        .await;
    assert_eq!(
        nonce["last_nonce"], 1,
        "no refusal spent the patient's nonce"
    );
    // So the grant signed before them all still commits.
    api.commit(&grant).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_refusals_and_replays_are_ordered_with_their_code_and_a_provable_leaf() {
    // Proves a transaction the ledger refuses after admission still becomes a leaf with a
    // receipt and a proof fetched later, whether the contracts refused it or authentication
    // did (a replay of the same signed bytes is refused as a duplicate).
    let api = Api::start();
    let patient = api.patient().await;
    let to_nobody = api.sign(
        &patient,
        TxBody::Grant {
            grantee: Grantee::User {
                user: "nobody@hospital-a".into(),
            },
            scope: diagnostics(),
            actions: vec![Action::Read],
            purposes: vec![Purpose::Treatment],
            expires_at_ms: None,
        },
    );
    let now = now_ms();
    let spent_nonce = to_nobody.payload.nonce;
    let cases: Vec<(&str, SignedTx, &str)> = vec![
        ("a grant to an unknown user", to_nobody.clone(), "not_found"),
        (
            "the same signed grant again",
            to_nobody.clone(),
            "duplicate",
        ),
        (
            "a new tx reusing a spent nonce",
            patient.sign(
                CHAIN,
                spent_nonce,
                now + TX_LIFETIME_MS,
                grant_org("hospital-a"),
            ),
            "stale_nonce",
        ),
        (
            "an expired tx",
            api.sign_until(&patient, now - 1_000, grant_org("hospital-a")),
            "expired",
        ),
        (
            "an expiry too far ahead",
            api.sign_until(
                &patient,
                now + 2 * TX_LIFETIME_MS_MAX,
                grant_org("hospital-a"),
            ),
            "expiry_too_far",
        ),
        (
            "a second registration",
            api.sign(&patient, register(&patient)),
            "already_exists",
        ),
        (
            "a grant signed by a member",
            api.sign(api.admin(0), grant_org("hospital-a")),
            "not_permitted",
        ),
    ];
    for (name, tx, code) in cases {
        let before = api.position().await;
        let response = api.submit(&tx).await;
        assert_eq!(outcome_code(&response.outcome), code, "{name}");
        assert_eq!(response.tx_id, tx_id(&tx), "{name}");
        api.check_receipt(&tx, &response);
        assert_eq!(api.position().await.1, before.1 + 1, "{name} adds one leaf");
        let leaf = api.prove_leaf(response.leaf_index).await;
        assert_eq!(leaf, response.inclusion_proof.leaf, "{name}");
    }
    // Looked up by id, the refused grant is at its first leaf with its refusal.
    let lookup = get(format!("/v1/transactions/{}", tx_id(&to_nobody)));
    let expect =
        json!({"/tx": to_nobody, "/outcome/code": "not_found", "/event/rejected": "not_found"});
    api.check(lookup, has(expect)).await;
}

/// The ledger after a small story: a patient, two clinicians, a consent, a record in two
/// versions, an access entry, an access request and a break-glass.
struct Story {
    patient: Identity,
    alice: Identity,
    bob: Identity,
    grant: SignedTx,
    request: SignedTx,
    break_glass: SignedTx,
    record_leaves: Vec<u64>,
}

async fn tell_story(api: &Api) -> Story {
    let patient = api.patient().await;
    let alice = api.member(0, "alice", Role::Clinician).await;
    let bob = api.member(1, "bob", Role::Clinician).await;
    let may_alice_read = || {
        let query = format!("patient={}&resource_type=Observation", patient.id);
        decision(&alice.id, "read", "treatment", &query)
    };
    let denied = json!({"/decision/decision": "denied", "/decision/reason": "no_consent"});
    api.check(may_alice_read(), has(denied)).await;
    let grant = api.sign(&patient, grant_org("hospital-a"));
    api.commit(&grant).await;
    let granted = json!({"/decision/decision": "granted", "/decision/consent_id": tx_id(&grant)});
    api.check(may_alice_read(), has(granted)).await;
    let mut record_leaves = Vec::new();
    for version in [1, 2] {
        let tx = api.sign(&alice, create_record(&patient, "obs-1", version));
        record_leaves.push(api.commit(&tx).await.leaf_index);
    }
    let log = TxBody::LogAccess {
        actor: alice.id.clone(),
        patient: patient.id.clone(),
        action: Action::Read,
        records: vec!["obs-1".into()],
        resource_types: vec![],
        custodians: vec![],
        purpose: Purpose::Treatment,
        custodian_denial: None,
        query_commitment: Hash::digest(b"query"),
        answer_commitment: Hash::digest(b"answer"),
    };
    let logged = api
        .commit(&api.sign(&api.consortium.orgs[0].node, log))
        .await;
    let access = json!(logged.outcome)["access"]["decision"].clone();
    assert_eq!(access, "granted", "{:?}", logged.outcome);
    record_leaves.push(logged.leaf_index);
    let request = api.sign(
        &bob,
        TxBody::RequestAccess {
            patient: patient.id.clone(),
            scope: diagnostics(),
            actions: vec![Action::Read],
            purpose: Purpose::Treatment,
        },
    );
    api.commit(&request).await;
    let break_glass = api.sign(
        &bob,
        TxBody::BreakGlass {
            patient: patient.id.clone(),
            reason: EmergencyReason::UnconsciousPatient,
            justification_commitment: Hash::digest(b"found unconscious"),
            duration_ms: 60_000,
        },
    );
    api.commit(&break_glass).await;
    Story {
        patient,
        alice,
        bob,
        grant,
        request,
        break_glass,
        record_leaves,
    }
}

/// GET /v1/access-decision for `actor` doing `action` for `purpose` on `target`.
fn decision(actor: &str, action: &str, purpose: &str, target: &str) -> Req {
    get(format!(
        "/v1/access-decision?actor={actor}&action={action}&purpose={purpose}&{target}"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_queries_answer_what_the_transactions_wrote_and_json_errors_otherwise() {
    // Proves each state endpoint returns the committed values after the transactions that
    // wrote them, and a JSON 404 or 400 (bad id, bad path, wrong method) for anything else.
    let api = Api::start();
    let story = tell_story(&api).await;
    let p = &story.patient.id;
    let alice = &story.alice.id;
    let bob = &story.bob.id;
    let nobody = Identity::new_patient().unwrap().id;
    let zeros = Hash::ZERO.to_hex();
    let method_not_allowed = Expect::Error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    let cases: Vec<(Req, Expect)> = vec![
        (
            get("/v1/status"),
            has(json!({"/chain_id": CHAIN, "/node": "node@hospital-a"})),
        ),
        (
            get("/v1/orgs"),
            has(json!({"/0/id": "hospital-a", "/1/id": "hospital-b"})),
        ),
        (
            get(format!("/v1/users/{alice}")),
            has(json!({"/id": alice, "/role": "clinician"})),
        ),
        (
            get(format!("/v1/users/{bob}")),
            has(json!({"/org": "hospital-b", "/status": "active"})),
        ),
        (get("/v1/users/nobody@hospital-a"), not_found()),
        (get("/v1/users/%FF"), bad_request("invalid_path")),
        (
            get(format!("/v1/patients/{p}")),
            has(json!({"/id": p, "/registered_height": 1})),
        ),
        (get(format!("/v1/patients/{nobody}")), not_found()),
        (
            get(format!("/v1/patients/{p}/records")),
            has(json!({"/0/record_id": "obs-1"})),
        ),
        (
            get(format!("/v1/patients/{p}/consents")),
            has(json!({"/0/id": tx_id(&story.grant)})),
        ),
        (
            get(format!("/v1/patients/{p}/requests")),
            has(json!({"/0/id": tx_id(&story.request)})),
        ),
        (
            get(format!("/v1/patients/{p}/requests")),
            has(json!({"/0/status": "pending"})),
        ),
        (
            get(format!("/v1/patients/{p}/break-glass")),
            has(json!({"/0/actor": bob})),
        ),
        (
            get(format!("/v1/patients/{p}/break-glass")),
            has(json!({"/0/id": tx_id(&story.break_glass)})),
        ),
        (
            get(format!("/v1/patients/{nobody}/records")),
            has(json!({"": []})),
        ),
        (
            get(format!("/v1/patients/{nobody}/consents")),
            has(json!({"": []})),
        ),
        (
            get(format!("/v1/patients/{nobody}/requests")),
            has(json!({"": []})),
        ),
        (
            get(format!("/v1/patients/{nobody}/break-glass")),
            has(json!({"": []})),
        ),
        (
            get("/v1/records/hospital-a/obs-1"),
            has(json!({"/patient": p, "/versions/1/version": 2})),
        ),
        (
            get("/v1/records/hospital-a/obs-1"),
            has(json!({"/versions/0/author": alice})),
        ),
        (get("/v1/records/hospital-b/obs-1"), not_found()),
        (
            get(format!("/v1/nonces/{p}")),
            has(json!({"/signer": p, "/last_nonce": 2})),
        ),
        (
            get(format!("/v1/nonces/{alice}")),
            has(json!({"/last_nonce": 2})),
        ),
        (
            get(format!("/v1/nonces/{nobody}")),
            has(json!({"/last_nonce": 0})),
        ),
        (
            get(format!("/v1/transactions/{}", tx_id(&story.grant))),
            has(json!({"/tx": story.grant})),
        ),
        (
            get(format!("/v1/transactions/{}", tx_id(&story.grant))),
            has(json!({"/event/kind": "grant"})),
        ),
        (get(format!("/v1/transactions/{zeros}")), not_found()),
        (get("/v1/transactions/xyz"), bad_request("invalid_id")),
        (
            get(format!("/v1/transactions/{}", "g".repeat(64))),
            bad_request("invalid_id"),
        ),
        (
            get("/v1/blocks/0"),
            has(json!({"/header/log_size": 1, "/genesis/chain_id": CHAIN})),
        ),
        (
            get("/v1/blocks/1"),
            has(json!({"/header/height": 1, "/header/tx_count": 1})),
        ),
        (get("/v1/blocks/999"), not_found()),
        (get("/v1/blocks/x"), bad_request("invalid_path")),
        (
            get("/v1/blocks/18446744073709551616"),
            bad_request("invalid_path"),
        ),
        (get("/v1/no-such-thing"), not_found()),
        (get("/v2/status"), not_found()),
        (get("/v1/transactions"), method_not_allowed),
    ];
    for (request, expect) in cases {
        api.check(request, expect).await;
    }
    // The status names the head block: its log size and state hash.
    let status = api.check(get("/v1/status"), ok()).await;
    let block: Block = api.fetch(format!("/v1/blocks/{}", status["height"])).await;
    assert_eq!(json!(block.header.log_size), status["log_size"]);
    assert_eq!(json!(block.header.log_root), status["log_root"]);
    assert_eq!(json!(block.header.state_hash), status["state_hash"]);
    assert_eq!(status["ordering"], "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_verify_against_the_signed_head_and_bad_ranges_are_refused() {
    // Proves the tree head and every inclusion and consistency proof the API serves
    // verify with the core's checks, and that bad or missing parameters are a JSON 400.
    let api = Api::start();
    let genesis: Block = api.fetch("/v1/blocks/0").await;
    tell_story(&api).await;
    let head: SignedTreeHead = api.fetch("/v1/tree-head").await;
    verify_tree_head(&head, api.root_der(), CHAIN).expect("the tree head verifies");
    assert!(verify_tree_head(&head, api.root_der(), "other-chain").is_err());
    let (size, root) = (head.tree_head.log_size, head.tree_head.log_root);
    let status = api.check(get("/v1/status"), ok()).await;
    assert_eq!(
        (status["log_size"].clone(), status["log_root"].clone()),
        (json!(size), json!(root))
    );
    for leaf_index in 0..size {
        api.prove_leaf(leaf_index).await;
    }
    // A proof at an older size verifies against the root the log had at that size.
    let proof: InclusionProof = api
        .fetch("/v1/proofs/inclusion?leaf_index=0&log_size=1")
        .await;
    assert!(proof.leaf.get("genesis").is_some(), "leaf 0 is the genesis");
    verify_inclusion(&proof, &genesis.header.log_root).expect("genesis inclusion verifies");
    for (old_size, old_root) in [
        (0, empty_root()),
        (1, genesis.header.log_root),
        (size, root),
    ] {
        let path = format!("/v1/proofs/consistency?old_size={old_size}");
        let expect = has(json!({"/old_size": old_size, "/new_size": size}));
        let body = api.check(get(path), expect).await;
        let path: Vec<Hash> = serde_json::from_value(body["path"].clone()).unwrap();
        verify_consistency(old_size, &old_root, size, &root, &path).expect("consistent");
    }
    let out_of_range = || bad_request("out_of_range");
    let invalid_query = || bad_request("invalid_query");
    let cases: Vec<(String, Expect)> = vec![
        (
            format!("/v1/proofs/inclusion?leaf_index={size}"),
            out_of_range(),
        ),
        (
            format!("/v1/proofs/inclusion?leaf_index={}", u64::MAX),
            out_of_range(),
        ),
        (
            format!("/v1/proofs/inclusion?leaf_index=0&log_size={}", size + 1),
            out_of_range(),
        ),
        (
            "/v1/proofs/inclusion?leaf_index=0&log_size=0".into(),
            out_of_range(),
        ),
        (
            "/v1/proofs/consistency?old_size=3&new_size=2".into(),
            out_of_range(),
        ),
        (
            format!("/v1/proofs/consistency?old_size=1&new_size={}", size + 1),
            out_of_range(),
        ),
        ("/v1/proofs/inclusion".into(), invalid_query()),
        ("/v1/proofs/inclusion?log_size=1".into(), invalid_query()),
        ("/v1/proofs/inclusion?leaf_index=-1".into(), invalid_query()),
        (
            "/v1/proofs/inclusion?leaf_index=one".into(),
            invalid_query(),
        ),
        ("/v1/proofs/consistency".into(), invalid_query()),
        (
            "/v1/proofs/consistency?old_size=1&new_size=x".into(),
            invalid_query(),
        ),
    ];
    for (path, expect) in cases {
        api.check(get(path), expect).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trails_page_by_leaf_index_without_gaps_or_repeats() {
    // Proves the audit listings hold each patient's, actor's and record's events in log
    // order, that paging with `limit` and `after` walks them without gaps or repeats, and
    // that a bad page parameter is a JSON 400.
    let api = Api::start();
    let story = tell_story(&api).await;
    let p = &story.patient.id;
    let trails = [
        (format!("/v1/audit/patients/{p}"), 7),
        (format!("/v1/audit/actors/{}", story.alice.id), 4),
        ("/v1/audit/records/hospital-a/obs-1".to_string(), 3),
    ];
    for (path, count) in &trails {
        let all = api.check(get(path.clone()), ok()).await;
        let all = all.as_array().expect("a list").clone();
        assert_eq!(all.len(), *count, "{path}: {all:?}");
        let leaves: Vec<u64> = all
            .iter()
            .map(|e| e["leaf_index"].as_u64().unwrap())
            .collect();
        assert!(leaves.windows(2).all(|w| w[0] < w[1]), "{path}: {leaves:?}");
        for limit in [1, 2, 5] {
            let mut paged = Vec::new();
            let mut query = format!("{path}?limit={limit}");
            loop {
                let page = api.check(get(query.clone()), ok()).await;
                let page = page.as_array().expect("a list").clone();
                assert!(page.len() <= limit, "{query}: at most {limit}");
                let Some(last) = page.last() else { break };
                query = format!("{path}?limit={limit}&after={}", last["leaf_index"]);
                paged.extend(page);
            }
            assert_eq!(paged, all, "{path} paged by {limit}");
        }
        let last = leaves.last().unwrap();
        let cases: Vec<(String, Expect)> = vec![
            (format!("{path}?after={last}"), has(json!({"": []}))),
            (format!("{path}?after={}", u64::MAX), has(json!({"": []}))),
            (
                format!("{path}?after=0&limit=1"),
                has(json!({"/0/leaf_index": leaves[0]})),
            ),
            (
                format!("{path}?limit=0"),
                has(json!({"/0/leaf_index": leaves[0]})),
            ),
            (format!("{path}?after=abc"), bad_request("invalid_page")),
            (format!("{path}?after=-1"), bad_request("invalid_page")),
            (format!("{path}?limit=many"), bad_request("invalid_query")),
        ];
        for (query, expect) in cases {
            api.check(get(query), expect).await;
        }
    }
    let record_trail = api
        .check(get("/v1/audit/records/hospital-a/obs-1"), ok())
        .await;
    let record_leaves: Vec<u64> = record_trail
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["leaf_index"].as_u64().unwrap())
        .collect();
    assert_eq!(record_leaves, story.record_leaves);
    let patient_trail = api
        .check(get(format!("/v1/audit/patients/{p}")), ok())
        .await;
    let kinds: Vec<&str> = patient_trail
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    let expected = [
        "register_patient",
        "grant",
        "create_record",
        "create_record",
        "log_access",
        "request_access",
        "break_glass",
    ];
    assert_eq!(kinds, expected);
    assert_eq!(
        patient_trail[6]["flagged"], true,
        "a break-glass is flagged"
    );
    let nobody = Identity::new_patient().unwrap().id;
    let cases: Vec<(String, Expect)> = vec![
        (format!("/v1/audit/patients/{nobody}"), has(json!({"": []}))),
        (
            "/v1/audit/actors/nobody@hospital-a".into(),
            has(json!({"": []})),
        ),
        (
            "/v1/audit/records/hospital-b/obs-1".into(),
            has(json!({"": []})),
        ),
        (
            "/v1/audit/records/hospital-a/obs-1".into(),
            has(json!({"/2/decision/decision": "granted"})),
        ),
    ];
    for (path, expect) in cases {
        api.check(get(path), expect).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_decisions_follow_the_policy_on_the_latest_state() {
    // Proves the access-decision endpoint answers with the ledger's policy (consent,
    // break-glass, the patient themself, and each denial reason) and refuses a query
    // that names neither a record nor a patient and type, or both.
    let api = Api::start();
    let story = tell_story(&api).await;
    let (p, alice, bob) = (&story.patient.id, &story.alice.id, &story.bob.id);
    let nobody = Identity::new_patient().unwrap().id;
    let obs = "record=hospital-a/obs-1";
    let of_type = |t: &str| format!("patient={p}&resource_type={t}");
    let granted =
        |basis: &str| has(json!({"/decision/decision": "granted", "/decision/basis": basis}));
    let denied =
        |reason: &str| has(json!({"/decision/decision": "denied", "/decision/reason": reason}));
    let cases: Vec<(Req, Expect)> = vec![
        (
            decision(alice, "read", "treatment", obs),
            granted("consent"),
        ),
        (
            decision(alice, "read", "treatment", obs),
            has(json!({"/patient": p, "/resource_type": "Observation"})),
        ),
        (
            decision(alice, "write", "treatment", &of_type("DiagnosticReport")),
            granted("consent"),
        ),
        (
            decision(alice, "search", "treatment", obs),
            granted("consent"),
        ),
        (
            decision(alice, "read", "research", obs),
            denied("no_consent"),
        ),
        (
            decision(alice, "read", "treatment", &of_type("Condition")),
            denied("no_consent"),
        ),
        (
            decision(bob, "read", "treatment", obs),
            denied("no_consent"),
        ),
        (
            decision(bob, "read", "emergency", obs),
            granted("break_glass"),
        ),
        (
            decision(p, "read", "patient_request", obs),
            granted("patient"),
        ),
        (
            decision("node@hospital-a", "read", "treatment", obs),
            denied("role_not_permitted"),
        ),
        (
            decision("ghost@hospital-a", "read", "treatment", obs),
            denied("unknown_actor"),
        ),
        (
            decision("ghost", "read", "treatment", obs),
            denied("unknown_actor"),
        ),
        (
            decision(
                alice,
                "read",
                "treatment",
                &format!("patient={nobody}&resource_type=Observation"),
            ),
            denied("unknown_patient"),
        ),
        (
            decision(alice, "read", "treatment", "record=hospital-a/obs-9"),
            not_found(),
        ),
        (
            decision(alice, "read", "treatment", "record=obs-1"),
            bad_request("invalid_record"),
        ),
        (
            decision(alice, "read", "treatment", &format!("{obs}&patient={p}")),
            bad_request("invalid_query"),
        ),
        (
            decision(alice, "read", "treatment", &format!("patient={p}")),
            bad_request("invalid_query"),
        ),
        (
            decision(alice, "read", "treatment", "resource_type=Observation"),
            bad_request("invalid_query"),
        ),
        (
            decision(alice, "read", "treatment", ""),
            bad_request("invalid_query"),
        ),
        (
            decision(alice, "delete", "treatment", obs),
            bad_request("invalid_query"),
        ),
        (
            decision(alice, "read", "curiosity", obs),
            bad_request("invalid_query"),
        ),
        (
            get(format!(
                "/v1/access-decision?action=read&purpose=treatment&{obs}"
            )),
            bad_request("invalid_query"),
        ),
    ];
    for (request, expect) in cases {
        api.check(request, expect).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_all_commit_at_distinct_leaves_with_valid_proofs() {
    // Proves that 200 clients submitting at once through the router are all answered,
    // each with its own leaf and a proof that verifies under the head it was given.
    const CLIENTS: usize = 200;
    let api = Arc::new(Api::start());
    let (height, log_size, _) = api.position().await;
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let api = api.clone();
        let patient = Identity::new_patient().expect("patient key");
        let tx = api.sign(&patient, register(&patient));
        clients.push(tokio::spawn(async move {
            let response = api.submit(&tx).await;
            (tx, response)
        }));
    }
    let mut leaves = BTreeSet::new();
    let mut heights = BTreeSet::new();
    for client in clients {
        let (tx, response) = client.await.expect("the client task ends");
        assert_eq!(outcome_code(&response.outcome), "committed");
        assert_eq!(response.tx_id, tx_id(&tx));
        if heights.insert(response.height) {
            api.check_receipt(&tx, &response);
        } else {
            // The head was checked once per block; the proof is checked for every client.
            let proof = &response.inclusion_proof;
            verify_inclusion(proof, &response.tree_head.tree_head.log_root).expect("verifies");
            assert_eq!(proof.leaf["tx"], json!(tx));
        }
        assert!(
            leaves.insert(response.leaf_index),
            "leaf {} twice",
            response.leaf_index
        );
    }
    let expected: BTreeSet<u64> = (log_size..log_size + CLIENTS as u64).collect();
    assert_eq!(
        leaves, expected,
        "the leaves are exactly the next {CLIENTS}"
    );
    let (height_after, log_size_after, _) = api.position().await;
    assert_eq!(log_size_after, log_size + CLIENTS as u64);
    assert_eq!(
        height_after,
        height + heights.len() as u64,
        "a block per distinct height"
    );
}

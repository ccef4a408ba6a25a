//! Records exchanged between custodians: three member nodes in one process, each with its
//! own ledger store and record store (the lab's in PostgreSQL), over mutual TLS on loopback.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medledger_core::identity::{OrgKind, Role};
use medledger_core::model::{
    AccessDecision, Action, AuditEvent, Category, Grantee, Purpose, Record, Scope,
};
use medledger_core::state::keys;
use medledger_core::tx::TxBody;
use medledger_core::Hash;
use medledger_node::cluster::{ClusterNode, ClusterSettings};
use medledger_node::consensus::NodeInfo;
use medledger_node::consortium::{Consortium, Identity};
use medledger_node::keywrap::{
    AnswerBinding, EncryptionKeyPair, SealedKey, WrappedKey, OWN_ENVELOPE_BYTES,
};
use medledger_node::ledger::{initialise, now_ms, Committed, NodeIdentity};
use medledger_node::pki::Validity;
use medledger_node::records::check::check_store;
use medledger_node::records::service::{
    AttachmentUpload, CustodianLink, FetchAnswer, FetchRequest, OpenedVersion, PrepareRequest,
    Prepared, ReadRequest, ServedKey, VersionRef, ACCESS_ENTRY_TTL_MS,
};
use medledger_node::records::{
    EmbeddedStore, PostgresStore, RecordError, RecordService, RecordStore, RecordStoreError,
};
use medledger_node::store::Store;
use serde_json::{json, Value};

mod common;
use common::TestPostgres;

const CHAIN: &str = "exchange-test";
const DAY_MS: u64 = 86_400_000;
const ORGS: [(&str, OrgKind); 3] = [
    ("hospital-a", OrgKind::Hospital),
    ("hospital-b", OrgKind::Hospital),
    ("lab-x", OrgKind::Lab),
];
/// Synthetic personal data that goes into the records and must never be found at rest.
const SYNTHETIC_NAME: &str = "Testa Syntheticsdottir";
const SYNTHETIC_NOTE: &str = "synthetic-marker-note 7c41 hypertension follow-up";
const HOSPITAL_A: usize = 0;
const HOSPITAL_B: usize = 1;
const LAB: usize = 2;

/// How a test store misbehaves when asked for one blob.
#[derive(Clone)]
enum Tamper {
    /// Flip one bit of the stored bytes.
    FlipByte(usize),
    /// Answer with another blob's bytes.
    SwapWith(String),
}

/// A real record store whose answers for one content id a test can corrupt, as a
/// tampered disk or database would return them.
struct TamperingStore {
    inner: Arc<dyn RecordStore>,
    tamper: Mutex<Option<(String, Tamper)>>,
}

impl RecordStore for TamperingStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn put_blob(&self, cid: &str, bytes: &[u8]) -> Result<(), RecordStoreError> {
        self.inner.put_blob(cid, bytes)
    }
    fn get_blob(&self, cid: &str) -> Result<Option<Vec<u8>>, RecordStoreError> {
        let tamper = self.tamper.lock().unwrap().clone();
        match tamper {
            Some((target, Tamper::FlipByte(index))) if target == cid => {
                Ok(self.inner.get_blob(cid)?.map(|mut bytes| {
                    let at = index % bytes.len();
                    bytes[at] ^= 0x01;
                    bytes
                }))
            }
            Some((target, Tamper::SwapWith(other))) if target == cid => self.inner.get_blob(&other),
            _ => self.inner.get_blob(cid),
        }
    }
    fn blob_ids(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, RecordStoreError> {
        self.inner.blob_ids(after, limit)
    }
    fn put_envelope(
        &self,
        cid: &str,
        recipient: &str,
        wrapped: &WrappedKey,
    ) -> Result<(), RecordStoreError> {
        self.inner.put_envelope(cid, recipient, wrapped)
    }
    fn get_envelope(
        &self,
        cid: &str,
        recipient: &str,
    ) -> Result<Option<WrappedKey>, RecordStoreError> {
        self.inner.get_envelope(cid, recipient)
    }
}

struct Net {
    consortium: Consortium,
    nodes: Vec<ClusterNode>,
    services: Vec<Arc<RecordService>>,
    stores: Vec<Arc<TamperingStore>>,
    nonces: Mutex<HashMap<String, u64>>,
    dirs: Vec<tempfile::TempDir>,
    postgres: Option<TestPostgres>,
}

fn validity() -> Validity {
    let now = now_ms();
    Validity {
        not_before_ms: now - DAY_MS,
        not_after_ms: now + 365 * DAY_MS,
    }
}

impl Net {
    /// Starts the three nodes; the lab keeps its records in PostgreSQL when `postgres`.
    async fn start(postgres: bool) -> Net {
        let consortium = Consortium::create(CHAIN, &ORGS, now_ms() - 1000, validity()).unwrap();
        let postgres = postgres.then(TestPostgres::start);
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        let mut stores = Vec::new();
        for (org, _) in ORGS {
            let member = &consortium.org(org).unwrap().node;
            let dir = tempfile::tempdir().unwrap();
            initialise(dir.path(), &consortium.genesis).unwrap();
            let store = Arc::new(Store::open(dir.path()).unwrap());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let info = NodeInfo {
                node: member.id.clone(),
                peer_addr: listener.local_addr().unwrap().to_string(),
                api_url: String::new(),
            };
            let settings = ClusterSettings {
                heartbeat_ms: 50,
                election_timeout_min_ms: 300,
                election_timeout_max_ms: 600,
                ..ClusterSettings::default()
            };
            let node = ClusterNode::start(
                store,
                NodeIdentity::from_member(member).unwrap(),
                info,
                listener,
                settings,
            )
            .await
            .unwrap();
            let inner: Arc<dyn RecordStore> = match (&postgres, org) {
                (Some(server), "lab-x") => {
                    let connection = server.connection.clone();
                    tokio::task::spawn_blocking(move || {
                        let store = PostgresStore::connect(&connection).unwrap();
                        wipe(&connection);
                        store
                    })
                    .await
                    .map(Arc::new)
                    .unwrap()
                }
                _ => Arc::new(EmbeddedStore::open(dir.path()).unwrap()),
            };
            stores.push(Arc::new(TamperingStore {
                inner,
                tamper: Mutex::new(None),
            }));
            nodes.push(node);
            dirs.push(dir);
        }
        let founders = nodes
            .iter()
            .map(|node| (node.id, node.info.clone()))
            .collect::<std::collections::BTreeMap<_, _>>();
        for node in &nodes {
            node.bootstrap(founders.clone()).await.unwrap();
        }
        let mut services = Vec::new();
        for (index, (org, _)) in ORGS.iter().enumerate() {
            let member = &consortium.org(org).unwrap().node;
            let service = Arc::new(
                RecordService::new(
                    nodes[index].ledger.clone(),
                    stores[index].clone(),
                    member.encryption_keys.clone(),
                    Some(nodes[index].custodian_link()),
                )
                .unwrap(),
            );
            nodes[index].attach_records(&service);
            services.push(service);
        }
        let net = Net {
            consortium,
            nodes,
            services,
            stores,
            nonces: Mutex::new(HashMap::new()),
            dirs,
            postgres,
        };
        for service in &net.services {
            let mut published = false;
            for _ in 0..100 {
                if service.publish_key().await.is_ok() {
                    published = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(published, "{} published its key", service.org());
        }
        net
    }

    /// Signs `body` as `who` and commits it through node `at`; every node applies it
    /// before this returns.
    async fn commit(&self, at: usize, who: &Identity, body: TxBody) -> Committed {
        let nonce = {
            let mut nonces = self.nonces.lock().unwrap();
            let next = nonces.entry(who.id.clone()).or_insert(0);
            *next += 1;
            *next
        };
        let tx = who.sign(CHAIN, nonce, now_ms() + 60_000, body);
        let committed = self.nodes[at].ledger.submit(tx).await.expect("committed");
        assert!(
            committed.outcome.is_committed(),
            "{}: {:?}",
            who.id,
            committed.outcome
        );
        self.all_reach(committed.height).await;
        committed
    }

    async fn all_reach(&self, height: u64) {
        for _ in 0..1000 {
            if self
                .nodes
                .iter()
                .all(|node| node.ledger.store().head().unwrap().unwrap().height >= height)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not every node applied block {height}");
    }

    async fn enroll(&self, org: &str, name: &str, role: Role) -> Identity {
        let founding = self.consortium.org(org).unwrap();
        let user = founding.authority.issue(name, role, validity()).unwrap();
        let certificate = user.certificate_text().unwrap();
        self.commit(0, &founding.admin, TxBody::EnrollUser { certificate })
            .await;
        user
    }

    /// A registered patient with a published encryption key.
    async fn patient(&self) -> Identity {
        let patient = Identity::new_patient().unwrap();
        let public_key = patient.key.public_key();
        self.commit(0, &patient, TxBody::RegisterPatient { public_key })
            .await;
        let key = patient
            .encryption_key()
            .unwrap()
            .public_key()
            .to_base64url();
        self.commit(0, &patient, TxBody::SetEncryptionKey { public_key: key })
            .await;
        patient
    }

    /// The author's node seals and stores the resource, the author signs its index entry.
    async fn add(&self, at: usize, author: &Identity, resource: Value) -> Prepared {
        self.add_with(at, author, resource, Vec::new()).await
    }

    async fn add_with(
        &self,
        at: usize,
        author: &Identity,
        resource: Value,
        attachments: Vec<AttachmentUpload>,
    ) -> Prepared {
        let prepared = self.services[at]
            .prepare(PrepareRequest {
                resource,
                record_id: None,
                attachments,
            })
            .await
            .expect("prepared");
        self.commit(at, author, prepared.body.clone()).await;
        prepared
    }

    /// `actor` reads the latest version of `record_id` through node `at`, without
    /// attachments: what the custodian serves is then exactly its stored ciphertext.
    async fn read(
        &self,
        at: usize,
        actor: &Identity,
        custodian: usize,
        record_id: &str,
    ) -> Result<OpenedVersion, RecordError> {
        self.read_as(at, actor, custodian, record_id, false).await
    }

    async fn read_as(
        &self,
        at: usize,
        actor: &Identity,
        custodian: usize,
        record_id: &str,
        attachments: bool,
    ) -> Result<OpenedVersion, RecordError> {
        self.services[at]
            .read(ReadRequest {
                actor: actor.id.clone(),
                custodian: ORGS[custodian].0.to_string(),
                record_id: record_id.to_string(),
                version: None,
                purpose: Purpose::Treatment,
                attachments,
            })
            .await
    }
}

/// Empties the PostgreSQL store's tables, so that a shared server starts each test clean.
fn wipe(connection: &str) {
    let mut client = postgres::Client::connect(connection, postgres::NoTls).unwrap();
    client
        .batch_execute("DELETE FROM medledger_envelopes; DELETE FROM medledger_blobs;")
        .unwrap();
}

fn observation(patient: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        "subject": {"reference": format!("Patient/{patient}"), "display": SYNTHETIC_NAME},
        "effectiveDateTime": "2026-11-20T09:30:00Z",
        "valueQuantity": {"value": 142, "unit": "mm[Hg]"},
        "note": [{"text": SYNTHETIC_NOTE}]
    })
}

fn condition(patient: &str) -> Value {
    json!({
        "resourceType": "Condition",
        "code": {"text": SYNTHETIC_NOTE},
        "subject": {"reference": format!("Patient/{patient}"), "display": SYNTHETIC_NAME}
    })
}

fn lab_report(patient: &str) -> Value {
    json!({
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "57698-3"}]},
        "subject": {"reference": format!("Patient/{patient}"), "display": SYNTHETIC_NAME},
        "conclusion": SYNTHETIC_NOTE
    })
}

fn grant(grantee: Grantee, categories: Vec<Category>, actions: Vec<Action>) -> TxBody {
    TxBody::Grant {
        grantee,
        scope: Scope {
            resource_types: vec![],
            categories,
        },
        actions,
        purposes: vec![Purpose::Treatment],
        expires_at_ms: None,
    }
}

/// The access entry `tx_id` on `node`'s ledger: proven included in the node's log, and its
/// decision.
fn proven_decision(node: &ClusterNode, tx_id: &Hash) -> AccessDecision {
    let store = node.ledger.store();
    let snapshot = store.snapshot().unwrap();
    let leaf: u64 = snapshot
        .value(&keys::tx(tx_id))
        .unwrap()
        .expect("on this ledger");
    let event: AuditEvent = snapshot.value(&keys::event(leaf)).unwrap().unwrap();
    assert_eq!(event.kind, "log_access");
    common::prove_leaf(store, event.height, leaf, "the access entry");
    event.decision.expect("an access entry has a decision")
}

/// When the ledger ordered the entry `tx_id`, as `node` holds it.
fn proven_time(node: &ClusterNode, tx_id: &Hash) -> u64 {
    let snapshot = node.ledger.store().snapshot().unwrap();
    let leaf: u64 = snapshot.value(&keys::tx(tx_id)).unwrap().unwrap();
    let event: AuditEvent = snapshot.value(&keys::event(leaf)).unwrap().unwrap();
    event.time_ms
}

fn denied_entry(result: Result<impl std::fmt::Debug, RecordError>) -> Hash {
    match result {
        Err(RecordError::Denied { access_tx, .. }) => access_tx,
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clinician_elsewhere_reads_exactly_while_the_patient_consents() {
    // Proves the exchange end to end across three custodians (the lab on PostgreSQL): a
    // clinician at another hospital is denied, reads the whole history (attachment
    // included) once the patient grants, is denied again after the revoke; every step's
    // access entry is on every node's ledger with a valid inclusion proof; and no store
    // holds the synthetic patient's name or clinical text.
    let net = Net::start(true).await;
    let alice = net.enroll("hospital-a", "dr-alice", Role::Clinician).await;
    let bob = net.enroll("hospital-b", "dr-bob", Role::Clinician).await;
    let carol = net.enroll("lab-x", "tech-carol", Role::LabTechnician).await;
    let patient = net.patient().await;
    let hospital_a = Grantee::Org {
        org: "hospital-a".into(),
    };
    let lab_techs = Grantee::Role {
        org: "lab-x".into(),
        role: Role::LabTechnician,
    };
    net.commit(
        0,
        &patient,
        grant(
            hospital_a,
            vec![Category::Diagnostics, Category::Conditions],
            vec![Action::Read, Action::Write],
        ),
    )
    .await;
    net.commit(
        0,
        &patient,
        grant(lab_techs, vec![Category::Diagnostics], vec![Action::Write]),
    )
    .await;
    let obs = net.add(HOSPITAL_A, &alice, observation(&patient.id)).await;
    let cond = net.add(HOSPITAL_A, &alice, condition(&patient.id)).await;
    let pdf = b"%PDF-1.4 synthetic lab printout".to_vec();
    let report = net
        .add_with(
            LAB,
            &carol,
            lab_report(&patient.id),
            vec![AttachmentUpload {
                content_type: "application/pdf".into(),
                title: Some("printout.pdf".into()),
                data: medledger_core::crypto::base64url(&pdf),
            }],
        )
        .await;
    assert_eq!(report.attachments.len(), 1);
    let mut entries: Vec<(Hash, bool)> = Vec::new();

    // No consent: denied, by the ledger, at the custodian; the history is empty.
    let denied = denied_entry(net.read(HOSPITAL_B, &bob, HOSPITAL_A, &obs.record_id).await);
    entries.push((denied, false));
    let history = net.services[HOSPITAL_B]
        .history(&bob.id, &patient.id, Purpose::Treatment)
        .await
        .unwrap();
    assert!(history.versions.is_empty(), "nothing readable yet");
    assert!(!history.access.decision.is_granted(), "one denied entry");
    assert!(history.failures.is_empty(), "{:?}", history.failures);
    entries.push((history.access.tx_id, false));

    // The patient grants dr-bob: the whole history, from both custodians.
    let consent = net
        .commit(
            0,
            &patient,
            grant(
                Grantee::User {
                    user: bob.id.clone(),
                },
                vec![Category::Diagnostics, Category::Conditions],
                vec![Action::Read],
            ),
        )
        .await;
    let history = net.services[HOSPITAL_B]
        .history(&bob.id, &patient.id, Purpose::Treatment)
        .await
        .unwrap();
    assert!(history.failures.is_empty(), "{:?}", history.failures);
    let mut seen: Vec<(String, String)> = history
        .versions
        .iter()
        .map(|v| (v.custodian.clone(), v.record_id.clone()))
        .collect();
    seen.sort();
    let mut expected = vec![
        ("hospital-a".to_string(), obs.record_id.clone()),
        ("hospital-a".to_string(), cond.record_id.clone()),
        ("lab-x".to_string(), report.record_id.clone()),
    ];
    expected.sort();
    assert_eq!(seen, expected);
    for version in &history.versions {
        assert_eq!(version.resource["subject"]["display"], SYNTHETIC_NAME);
        assert_eq!(version.resource["id"], version.record_id.as_str());
        assert_eq!(version.resource["meta"]["versionId"], "1");
    }
    assert!(
        history
            .versions
            .iter()
            .all(|v| v.access_tx == history.access.tx_id),
        "every custodian served under the one entry"
    );
    entries.push((history.access.tx_id, true));
    let read = net
        .read_as(HOSPITAL_B, &bob, LAB, &report.record_id, true)
        .await
        .expect("granted");
    assert_eq!(read.attachments.len(), 1);
    assert_eq!(
        medledger_core::crypto::from_base64url(&read.attachments[0].data).unwrap(),
        pdf
    );
    assert_eq!(
        read.resource["presentedForm"][0]["url"],
        format!("cid:{}", report.attachments[0])
    );
    entries.push((read.access_tx, true));

    // The patient revokes: denied again, everywhere.
    net.commit(
        0,
        &patient,
        TxBody::Revoke {
            grant_id: consent.tx_id,
        },
    )
    .await;
    let denied = denied_entry(net.read(HOSPITAL_B, &bob, LAB, &report.record_id).await);
    entries.push((denied, false));
    let history = net.services[HOSPITAL_B]
        .history(&bob.id, &patient.id, Purpose::Treatment)
        .await
        .unwrap();
    assert!(history.versions.is_empty());
    entries.push((history.access.tx_id, false));

    // Every entry, on every node, proven in its log, with the decision the caller saw.
    let last = net.nodes[HOSPITAL_B]
        .ledger
        .store()
        .head()
        .unwrap()
        .unwrap()
        .height;
    net.all_reach(last).await;
    assert_eq!(entries.len(), 6, "one entry per request");
    for node in &net.nodes {
        for (tx_id, granted) in &entries {
            assert_eq!(proven_decision(node, tx_id).is_granted(), *granted);
        }
    }

    // Nothing at rest names the patient or holds clinical text: not the ledgers, not the
    // record stores (embedded files, PostgreSQL tables), not the Raft logs.
    let Net {
        nodes,
        services,
        stores,
        dirs,
        postgres,
        ..
    } = net;
    // Closing PostgreSQL connections blocks: not on the test's async threads.
    tokio::task::spawn_blocking(move || drop((services, stores)))
        .await
        .unwrap();
    for node in &nodes {
        node.shutdown().await;
    }
    drop(nodes);
    // Every file of every node, the Raft log's chunk files under `raft-log/` included.
    let mut pending: Vec<std::path::PathBuf> =
        dirs.iter().map(|d| d.path().to_path_buf()).collect();
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            for needle in [SYNTHETIC_NAME, SYNTHETIC_NOTE] {
                assert!(
                    !contains(&bytes, needle.as_bytes()),
                    "{} holds {needle:?}",
                    path.display()
                );
            }
        }
    }
    let connection = postgres.as_ref().unwrap().connection.clone();
    let rows = tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&connection, postgres::NoTls).unwrap();
        let mut all = Vec::new();
        for row in client
            .query("SELECT cid::bytea, bytes FROM medledger_blobs", &[])
            .unwrap()
        {
            all.push(row.get::<_, Vec<u8>>(0));
            all.push(row.get::<_, Vec<u8>>(1));
        }
        for row in client
            .query(
                "SELECT cid::bytea, recipient::bytea, wrapped FROM medledger_envelopes",
                &[],
            )
            .unwrap()
        {
            for column in 0..3 {
                all.push(row.get::<_, Vec<u8>>(column));
            }
        }
        all
    })
    .await
    .unwrap();
    assert!(
        rows.len() >= 4,
        "the lab's blobs and envelopes are in PostgreSQL"
    );
    for value in rows {
        for needle in [SYNTHETIC_NAME, SYNTHETIC_NOTE] {
            assert!(
                !contains(&value, needle.as_bytes()),
                "PostgreSQL holds {needle:?}"
            );
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_is_granted_after_the_revoke_that_ends_its_consent() {
    // Proves the race between a revoke and reads in flight: over many rounds, reads and the
    // revoke go out together at seeded random moments; every read that was served has its
    // access entry ordered before the revoke, every read ordered after it was denied by the
    // ledger, and a read whose granted entry came before the revoke but reached the
    // custodian after it was refused there (the custodian checks the grant still holds).
    let net = Net::start(false).await;
    let alice = net.enroll("hospital-a", "dr-alice", Role::Clinician).await;
    let bob = net.enroll("hospital-b", "dr-bob", Role::Clinician).await;
    let patient = net.patient().await;
    net.commit(
        0,
        &patient,
        grant(
            Grantee::Org {
                org: "hospital-a".into(),
            },
            vec![Category::Diagnostics],
            vec![Action::Write],
        ),
    )
    .await;
    let obs = net.add(HOSPITAL_A, &alice, observation(&patient.id)).await;
    let mut seed: u64 = 0x005e_ed0f_4ace;
    let mut random = move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    };
    let net = Arc::new(net);
    let rounds = 12;
    let (mut granted, mut denied, mut stopped) = (0, 0, 0);
    for round in 0..rounds {
        let consent = net
            .commit(
                0,
                &patient,
                grant(
                    Grantee::User {
                        user: bob.id.clone(),
                    },
                    vec![Category::Diagnostics],
                    vec![Action::Read],
                ),
            )
            .await;
        let mut reads = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let delay = Duration::from_millis(random(40));
            let (net, bob, record) = (net.clone(), bob.id.clone(), obs.record_id.clone());
            reads.spawn(async move {
                tokio::time::sleep(delay).await;
                net.services[HOSPITAL_B]
                    .read(ReadRequest {
                        actor: bob,
                        custodian: "hospital-a".into(),
                        record_id: record,
                        version: None,
                        purpose: Purpose::Treatment,
                        attachments: false,
                    })
                    .await
            });
        }
        tokio::time::sleep(Duration::from_millis(random(40))).await;
        let revoke = net
            .commit(
                (round % 3) as usize,
                &patient,
                TxBody::Revoke {
                    grant_id: consent.tx_id,
                },
            )
            .await;
        while let Some(result) = reads.join_next().await {
            let (tx_id, served) = match result.unwrap() {
                Ok(opened) => (opened.access_tx, true),
                Err(RecordError::Denied { access_tx, .. }) => (access_tx, false),
                Err(other) => panic!("round {round}: {other}"),
            };
            // The requester's node committed the entry: its ledger has it.
            let snapshot = net.nodes[HOSPITAL_B].ledger.store().snapshot().unwrap();
            let leaf: u64 = snapshot.value(&keys::tx(&tx_id)).unwrap().unwrap();
            let entry: AuditEvent = snapshot.value(&keys::event(leaf)).unwrap().unwrap();
            let entry_granted = entry.decision.is_some_and(|d| d.is_granted());
            if served {
                granted += 1;
                assert!(
                    leaf < revoke.leaf_index,
                    "round {round}: a read served under entry {leaf}, after the revoke at {}",
                    revoke.leaf_index
                );
            } else if leaf > revoke.leaf_index {
                denied += 1;
                assert!(
                    !entry_granted,
                    "round {round}: an entry after the revoke was granted"
                );
            } else {
                // Granted before the revoke, refused by the custodian that saw the revoke.
                stopped += 1;
                assert!(
                    entry_granted,
                    "round {round}: denied before the revoke while the consent held"
                );
            }
        }
    }
    println!(
        "{rounds} rounds: {granted} reads served before their revoke, {denied} denied after \
         it, {stopped} granted before it but stopped at the custodian after it"
    );
    assert_eq!(granted + denied + stopped, rounds * 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custodian_serves_only_under_the_requesters_own_granted_entry() {
    // Proves the custodian's side of the exchange trusts nothing the requester says: the
    // genuine request under its granted entry is served, but the same entry is refused when
    // another organisation presents it, for another user of the same organisation, for
    // another purpose, for a record it does not name, or for a version indexed after it; a
    // denied entry and an unknown one are refused; the entry serves for its lifetime by the
    // custodian's clock and not a millisecond longer; and once the patient revokes, the old
    // granted entry no longer serves anything.
    let net = Net::start(false).await;
    let alice = net.enroll("hospital-a", "dr-alice", Role::Clinician).await;
    let bob = net.enroll("hospital-b", "dr-bob", Role::Clinician).await;
    let carl = net.enroll("hospital-b", "dr-carl", Role::Clinician).await;
    let patient = net.patient().await;
    net.commit(
        0,
        &patient,
        grant(
            Grantee::Org {
                org: "hospital-a".into(),
            },
            vec![Category::Diagnostics, Category::Conditions],
            vec![Action::Read, Action::Write],
        ),
    )
    .await;
    let obs = net.add(HOSPITAL_A, &alice, observation(&patient.id)).await;
    let cond = net.add(HOSPITAL_A, &alice, condition(&patient.id)).await;
    let denied = denied_entry(net.read(HOSPITAL_B, &bob, HOSPITAL_A, &obs.record_id).await);
    let consent = net
        .commit(
            0,
            &patient,
            grant(
                Grantee::User {
                    user: bob.id.clone(),
                },
                vec![Category::Diagnostics, Category::Conditions],
                vec![Action::Read],
            ),
        )
        .await;
    let granted = net
        .read(HOSPITAL_B, &bob, HOSPITAL_A, &obs.record_id)
        .await
        .expect("granted")
        .access_tx;
    let custodian = &net.services[HOSPITAL_A];
    let fetch = |actor: &Identity, record_id: &str, version: u64, access_tx: Hash| FetchRequest {
        actor: actor.id.clone(),
        patient: patient.id.clone(),
        purpose: Purpose::Treatment,
        versions: vec![VersionRef {
            record_id: record_id.to_string(),
            version,
        }],
        attachments: false,
        access_tx,
        // Already on the custodian's ledger: the read above was served under it.
        access_height: 0,
    };
    let genuine = fetch(&bob, &obs.record_id, 1, granted);
    let served = custodian
        .serve("hospital-b", genuine.clone())
        .await
        .expect("the genuine request is served");
    assert_eq!(served.versions.len(), 1);
    // Another member's node gets the data key sealed under a key of this one answer, never
    // the custodian's own envelope.
    assert!(served.key_share.is_some());
    assert!(matches!(served.versions[0].key, ServedKey::Sealed(_)));
    // An entry serves for ACCESS_ENTRY_TTL_MS by the custodian's clock, then no more.
    let entry_time = proven_time(&net.nodes[HOSPITAL_A], &granted);
    for (offset, serves) in [
        (ACCESS_ENTRY_TTL_MS, true),
        (ACCESS_ENTRY_TTL_MS + 1, false),
        (0, true),
    ] {
        custodian.set_clock(Arc::new(move || entry_time + offset));
        let result = custodian.serve("hospital-b", genuine.clone()).await;
        match result {
            Ok(_) if serves => {}
            Err(RecordError::Invalid(detail)) if !serves => {
                assert!(detail.contains("has expired"), "{detail}")
            }
            other => panic!("{offset} ms after its entry: {other:?}"),
        }
    }
    custodian.set_clock(Arc::new(medledger_node::ledger::now_ms));

    let refused = |result: Result<FetchAnswer, RecordError>, what: &str| match result {
        Err(RecordError::Invalid(detail)) => detail,
        other => panic!("{what}: expected a refusal, got {other:?}"),
    };
    let detail = refused(custodian.serve("lab-x", genuine.clone()).await, "lab-x");
    assert!(detail.contains("only for its own users"), "{detail}");
    let not_its = "is not the requester's entry for this actor, patient, purpose";
    for (what, request, reason) in [
        (
            "another user",
            fetch(&carl, &obs.record_id, 1, granted),
            not_its,
        ),
        (
            "another purpose",
            FetchRequest {
                purpose: Purpose::Research,
                ..genuine.clone()
            },
            not_its,
        ),
        (
            "a denied entry",
            fetch(&bob, &obs.record_id, 1, denied),
            "was denied",
        ),
        (
            "an unknown entry",
            fetch(&bob, &obs.record_id, 1, Hash::digest(b"no such entry")),
            "is not on the custodian's ledger",
        ),
        (
            "a record it does not name",
            fetch(&bob, &cond.record_id, 1, granted),
            "does not cover",
        ),
    ] {
        let detail = refused(custodian.serve("hospital-b", request).await, what);
        assert!(detail.contains(reason), "{what}: {detail}");
    }

    // A version indexed after the entry is not covered by it.
    let mut updated = observation(&patient.id);
    updated["id"] = json!(obs.record_id);
    let prepared = custodian
        .prepare(PrepareRequest {
            resource: updated,
            record_id: Some(obs.record_id.clone()),
            attachments: Vec::new(),
        })
        .await
        .expect("prepared");
    net.commit(HOSPITAL_A, &alice, prepared.body.clone()).await;
    assert!(matches!(
        custodian
            .serve("hospital-b", fetch(&bob, &obs.record_id, 2, granted))
            .await,
        Err(RecordError::NotFound(_))
    ));

    // After the revoke, the entry granted before it serves nothing more.
    net.commit(
        0,
        &patient,
        TxBody::Revoke {
            grant_id: consent.tx_id,
        },
    )
    .await;
    net.all_reach(net.nodes[0].ledger.tree_head().tree_head.height)
        .await;
    match custodian.serve("hospital-b", genuine).await {
        Err(RecordError::Denied { access_tx, .. }) => assert_eq!(access_tx, granted),
        other => panic!("served after the revoke: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_ciphertext_swapped_blobs_and_a_false_commitment_are_refused() {
    // Proves the requester never decrypts what does not match the ledger: a flipped byte in
    // the custodian's stored ciphertext, another record's blob served in its place, and a
    // version whose indexed commitment is not its plaintext's are each an integrity error,
    // with nothing opened into an answer; the untouched record still reads; and the
    // custodian's `store check` reports the same damage.
    let net = Net::start(false).await;
    let alice = net.enroll("hospital-a", "dr-alice", Role::Clinician).await;
    let bob = net.enroll("hospital-b", "dr-bob", Role::Clinician).await;
    let patient = net.patient().await;
    net.commit(
        0,
        &patient,
        grant(
            Grantee::Org {
                org: "hospital-a".into(),
            },
            vec![Category::Diagnostics, Category::Conditions],
            vec![Action::Read, Action::Write],
        ),
    )
    .await;
    net.commit(
        0,
        &patient,
        grant(
            Grantee::User {
                user: bob.id.clone(),
            },
            vec![Category::Diagnostics, Category::Conditions],
            vec![Action::Read],
        ),
    )
    .await;
    let obs = net.add(HOSPITAL_A, &alice, observation(&patient.id)).await;
    let cond = net.add(HOSPITAL_A, &alice, condition(&patient.id)).await;
    let integrity = |result: Result<_, RecordError>, what: &str| match result {
        Err(RecordError::Integrity { .. }) => {}
        Ok(_) => panic!("{what}: decrypted into an answer"),
        Err(other) => panic!("{what}: expected an integrity error, got {other}"),
    };
    let custodian = &net.stores[HOSPITAL_A];
    for index in [0usize, 11, 40, 100, 1_000_000] {
        *custodian.tamper.lock().unwrap() = Some((obs.cid.clone(), Tamper::FlipByte(index)));
        integrity(
            net.read(HOSPITAL_B, &bob, HOSPITAL_A, &obs.record_id).await,
            &format!("byte {index} flipped"),
        );
    }
    // Asked for attachments, the custodian must open the version itself to find them, and
    // refuses its own altered ciphertext; the requester hears an integrity error too.
    integrity(
        net.read_as(HOSPITAL_B, &bob, HOSPITAL_A, &obs.record_id, true)
            .await,
        "byte flipped, attachments asked for",
    );
    *custodian.tamper.lock().unwrap() = Some((obs.cid.clone(), Tamper::SwapWith(cond.cid.clone())));
    integrity(
        net.read(HOSPITAL_B, &bob, HOSPITAL_A, &obs.record_id).await,
        "another record's blob",
    );
    *custodian.tamper.lock().unwrap() = None;
    net.read(HOSPITAL_B, &bob, HOSPITAL_A, &obs.record_id)
        .await
        .expect("the untouched record reads");
    let local = net
        .read(HOSPITAL_A, &alice, HOSPITAL_A, &obs.record_id)
        .await
        .expect("the custodian's own clinician reads under its stored envelope");
    assert_eq!(local.resource["id"], obs.record_id.as_str());

    // An author's entry whose commitment is not the sealed plaintext's: the ciphertext is
    // the one indexed and signed, but what it decrypts to is not what the ledger commits to.
    let mut prepared = net.services[HOSPITAL_A]
        .prepare(PrepareRequest {
            resource: observation(&patient.id),
            record_id: None,
            attachments: Vec::new(),
        })
        .await
        .unwrap();
    if let TxBody::CreateRecord { commitment, .. } = &mut prepared.body {
        commitment.0[0] ^= 0x80;
    }
    net.commit(HOSPITAL_A, &alice, prepared.body.clone()).await;
    integrity(
        net.read(HOSPITAL_B, &bob, HOSPITAL_A, &prepared.record_id)
            .await,
        "a false commitment",
    );
    // The custodian's own reads are checked the same way.
    integrity(
        net.read(HOSPITAL_A, &alice, HOSPITAL_A, &prepared.record_id)
            .await,
        "a false commitment, read at the custodian",
    );
    let record: Record = net.nodes[HOSPITAL_B]
        .ledger
        .store()
        .snapshot()
        .unwrap()
        .value(&keys::record("hospital-a", &prepared.record_id))
        .unwrap()
        .unwrap();
    assert_eq!(record.versions.len(), 1);

    // `store check` finds the same: the false commitment, an altered blob, and a version
    // sealed but never indexed (an orphan, not a problem).
    let orphan = net.services[HOSPITAL_A]
        .prepare(PrepareRequest {
            resource: condition(&patient.id),
            record_id: None,
            attachments: Vec::new(),
        })
        .await
        .unwrap();
    let keys = net
        .consortium
        .org("hospital-a")
        .unwrap()
        .node
        .encryption_keys
        .clone();
    let check = |store: Arc<TamperingStore>| {
        check_store(
            net.nodes[HOSPITAL_A].ledger.store(),
            store.as_ref(),
            "hospital-a",
            &keys,
        )
        .unwrap()
    };
    let report = check(custodian.clone());
    assert_eq!(report.versions_checked, 3);
    assert_eq!(report.orphans, vec![orphan.cid.clone()]);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(report.problems[0].cid, prepared.cid);
    *custodian.tamper.lock().unwrap() = Some((cond.cid.clone(), Tamper::FlipByte(7)));
    let report = check(custodian.clone());
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert!(report
        .problems
        .iter()
        .any(|p| p.cid == cond.cid && p.problem.contains("altered")));
}

/// The real link between nodes, with each answer passed through `alter` before the
/// requester sees it: a custodian, or anything on the way, that lies about the keys.
struct AlteringLink {
    inner: Arc<dyn CustodianLink>,
    alter: Mutex<Alteration>,
}

/// What happens to an answer on its way.
type Alteration = fn(&mut FetchAnswer);

impl CustodianLink for AlteringLink {
    fn fetch<'a>(
        &'a self,
        custodian: &'a str,
        request: &'a FetchRequest,
    ) -> Pin<Box<dyn Future<Output = Result<FetchAnswer, RecordError>> + Send + 'a>> {
        Box::pin(async move {
            let mut answer = self.inner.fetch(custodian, request).await?;
            let alter = *self.alter.lock().unwrap();
            alter(&mut answer);
            Ok(answer)
        })
    }
}

/// The key of the answer's first version.
fn first_key(answer: &mut FetchAnswer) -> &mut ServedKey {
    &mut answer.versions[0].key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_key_that_was_altered_or_not_sealed_for_the_reader_is_refused() {
    // Proves the requester's side of the answer keys: with the consent in force, the
    // unaltered answer opens, but a flipped bit in a sealed key, a key share for another
    // key, a missing share, and the custodian's own-envelope form sent to another member
    // are all refused as integrity errors, and nothing is decrypted into an answer.
    let net = Net::start(false).await;
    let alice = net.enroll("hospital-a", "dr-alice", Role::Clinician).await;
    let bob = net.enroll("hospital-b", "dr-bob", Role::Clinician).await;
    let patient = net.patient().await;
    net.commit(
        0,
        &patient,
        grant(
            Grantee::Org {
                org: "hospital-a".into(),
            },
            vec![Category::Diagnostics],
            vec![Action::Read, Action::Write],
        ),
    )
    .await;
    net.commit(
        0,
        &patient,
        grant(
            Grantee::User {
                user: bob.id.clone(),
            },
            vec![Category::Diagnostics],
            vec![Action::Read],
        ),
    )
    .await;
    let obs = net.add(HOSPITAL_A, &alice, observation(&patient.id)).await;
    let member = &net.consortium.org("hospital-b").unwrap().node;
    let link = Arc::new(AlteringLink {
        inner: net.nodes[HOSPITAL_B].custodian_link(),
        alter: Mutex::new(|_| {}),
    });
    let reader = RecordService::new(
        net.nodes[HOSPITAL_B].ledger.clone(),
        net.stores[HOSPITAL_B].clone(),
        member.encryption_keys.clone(),
        Some(link.clone()),
    )
    .unwrap();
    let read = || {
        reader.read(ReadRequest {
            actor: bob.id.clone(),
            custodian: "hospital-a".into(),
            record_id: obs.record_id.clone(),
            version: None,
            purpose: Purpose::Treatment,
            attachments: false,
        })
    };
    let opened = read().await.expect("the unaltered answer opens");
    assert_eq!(opened.resource["resourceType"], "Observation");

    let alterations: [(&str, Alteration); 4] = [
        ("a flipped bit in the sealed key", |answer| {
            if let ServedKey::Sealed(sealed) = first_key(answer) {
                let mut bytes = sealed.as_bytes().to_vec();
                bytes[3] ^= 0x10;
                *sealed = SealedKey::from_bytes(&bytes).unwrap();
            }
        }),
        ("a key share for another key", |answer| {
            let stranger = EncryptionKeyPair::generate().public_key();
            let binding = AnswerBinding {
                custodian: "hospital-a",
                requester: "hospital-b",
                access_tx: &[0; 32],
            };
            answer.key_share = Some(stranger.answer_key(&binding).unwrap().0);
        }),
        ("no key share", |answer| answer.key_share = None),
        ("an own envelope sent to another member", |answer| {
            *first_key(answer) =
                ServedKey::Own(WrappedKey::from_bytes(&[7; OWN_ENVELOPE_BYTES]).unwrap());
        }),
    ];
    for (what, alter) in alterations {
        *link.alter.lock().unwrap() = alter;
        match read().await {
            Err(RecordError::Integrity { detail, .. }) => {
                assert!(detail.contains("does not open"), "{what}: {detail}")
            }
            other => panic!("{what}: expected an integrity error, got {other:?}"),
        }
    }
    *link.alter.lock().unwrap() = |_| {};
    read().await.expect("the unaltered answer still opens");
}

//! Boundary tests of the contracts: signed transactions in; outcomes, state and audit
//! events out.
//!
//! The core is driven as a node drives it, in memory: a `BTreeMap` state, blocks executed
//! with `execute_block` at fixed times (no wall clock), every transaction signed with real
//! P-256 keys and every member holding a certificate issued by `medledger_node::consortium`.
//! Each table row states one boundary; one `check` helper per boundary runs the rows, so a
//! change of harness touches one function, not a hundred tests.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use medledger_core::block::{self, Block, ChainHead, GenesisConfig};
use medledger_core::contracts::{
    decide, is_valid_record_id, AccessQuery, Candidate, Rejection, TxOutcome,
};
use medledger_core::crypto::{base64url, from_base64url};
use medledger_core::hash::Hash;
use medledger_core::identity::{is_patient_pseudonym, is_valid_name, split_user_id, OrgKind, Role};
use medledger_core::model::{
    AccessBasis, AccessDecision, AccessDenial, AccessRequest, Action, AuditEvent, BreakGlass,
    BreakGlassVerdict, Category, Consent, DenialReason, EmergencyReason, EncryptionKey,
    GovernanceAction, Grantee, Org, OrgStatus, Patient, Proposal, ProposalStatus, Purpose, Record,
    RequestStatus, RevocationReason, Scope, User, UserStatus,
};
use medledger_core::state::{apply_writes, keys, Overlay, StateRead, WriteSet};
use medledger_core::tx::{
    access_record_name, NewRecordVersion, SignedTx, TxBody, TxPayload, ACCESS_RECORDS_MAX,
    RECORD_GROUP_MAX, TX_LIFETIME_MS_MAX,
};
use medledger_node::consortium::{
    sign, Consortium, FoundingOrg, Identity, OrgAuthority, RootAuthority,
};
use medledger_node::keywrap::EncryptionKeyPair;
use medledger_node::pki::Validity;
use serde::de::DeserializeOwned;

// ---- fixed times and limits ---------------------------------------------------------

const CHAIN_ID: &str = "medledger-test";
const GENESIS_MS: u64 = 1_700_000_000_000;
/// The clock while the shared world is built: one second after genesis.
const WORLD_MS: u64 = GENESIS_MS + 1_000;
/// Every certificate of the consortium, unless a test says otherwise (whole seconds).
const VALIDITY: Validity = Validity {
    not_before_ms: 1_600_000_000_000,
    not_after_ms: 1_900_000_000_000,
};
const HOUR_MS: u64 = 60 * 60 * 1000;
const DAY_MS: u64 = 24 * HOUR_MS;
/// The last instant of sid's short certificate (notAfter is inclusive).
const SID_NOT_AFTER_MS: u64 = GENESIS_MS + 10 * DAY_MS;
/// How far past the clock the transactions signed here expire.
const TX_VALID_MS: u64 = HOUR_MS;
/// The break-glass alice holds open for Q from `WORLD_MS`.
const WORLD_BREAK_GLASS_MS: u64 = 2 * HOUR_MS;
/// Mirrors of private contract limits (`contracts::consent`, `contracts::governance`).
const BREAK_GLASS_MS_MAX: u64 = 12 * HOUR_MS;
const LIST_ENTRIES_MAX: usize = 32;
const PROPOSAL_OPEN_MS: u64 = 7 * DAY_MS;
/// The world's open proposals, both made by hospital-a.
const ADMIT_CLINIC_PROPOSAL: u64 = 1;
const SUSPEND_LAB_PROPOSAL: u64 = 2;
const PROPOSER: &str = "node@hospital-a";
const FOUNDERS: [(&str, OrgKind); 4] = [
    ("hospital-a", OrgKind::Hospital),
    ("hospital-b", OrgKind::Hospital),
    ("lab-x", OrgKind::Lab),
    ("regulator", OrgKind::Regulator),
];

// ---- the harness: a ledger in memory --------------------------------------------------

/// State, head and clock of one chain, with a nonce counter per signer. Cloning forks it.
#[derive(Clone)]
struct Ledger {
    state: BTreeMap<String, Vec<u8>>,
    head: ChainHead,
    now_ms: u64,
    nonces: BTreeMap<String, u64>,
    blocks: Vec<Block>,
    /// The id of the last committed transaction of each kind.
    last_committed: BTreeMap<&'static str, Hash>,
}

/// The harness's state, read through a count of the reads of keys under a prefix.
struct CountingReads<'a> {
    state: &'a BTreeMap<String, Vec<u8>>,
    prefix: &'a str,
    reads: Cell<usize>,
}

impl StateRead for CountingReads<'_> {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        if key.starts_with(self.prefix) {
            self.reads.set(self.reads.get() + 1);
        }
        self.state.get(key).cloned()
    }
}

impl Ledger {
    fn start(genesis: &GenesisConfig) -> Ledger {
        let mut state = BTreeMap::new();
        let executed = block::genesis(&state, genesis).expect("the test genesis is valid");
        apply_writes(&mut state, &executed.writes);
        Ledger {
            state,
            head: executed.head,
            now_ms: genesis.time_ms + 1_000,
            nonces: BTreeMap::new(),
            blocks: vec![executed.block],
            last_committed: BTreeMap::new(),
        }
    }

    fn set_time(&mut self, time_ms: u64) {
        assert!(time_ms >= self.now_ms, "the test clock never goes back");
        self.now_ms = time_ms;
    }

    fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
    }

    fn next_nonce(&mut self, signer: &str) -> u64 {
        let nonce = self.nonces.entry(signer.to_string()).or_insert(0);
        *nonce += 1;
        *nonce
    }

    fn sign(&mut self, who: &Identity, body: TxBody) -> SignedTx {
        self.sign_with(who, body, |_| {})
    }

    /// Signs with `who`'s key after `tamper` has edited the payload.
    fn sign_with(
        &mut self,
        who: &Identity,
        body: TxBody,
        tamper: impl FnOnce(&mut TxPayload),
    ) -> SignedTx {
        let mut payload = TxPayload {
            chain_id: CHAIN_ID.to_string(),
            signer: who.id.clone(),
            nonce: self.next_nonce(&who.id),
            expires_at_ms: self.now_ms + TX_VALID_MS,
            body,
        };
        tamper(&mut payload);
        sign(payload, &who.key)
    }

    /// Executes one block at the current time and keeps it.
    fn run(&mut self, txs: Vec<SignedTx>) -> Vec<TxOutcome> {
        self.run_with_writes(txs).0
    }

    /// Executes one block at the current time and keeps it; returns its write set too.
    fn run_with_writes(&mut self, txs: Vec<SignedTx>) -> (Vec<TxOutcome>, WriteSet) {
        let (outcomes, writes, _) = self.run_counting_reads(txs, "");
        (outcomes, writes)
    }

    /// Executes one block at the current time and keeps it; returns its write set and how
    /// many times it read a key of state that starts with `prefix`.
    fn run_counting_reads(
        &mut self,
        txs: Vec<SignedTx>,
        prefix: &str,
    ) -> (Vec<TxOutcome>, WriteSet, usize) {
        let candidates = txs.into_iter().map(Candidate::Unverified).collect();
        let counting = CountingReads {
            state: &self.state,
            prefix,
            reads: Cell::new(0),
        };
        let executed =
            block::execute_block(&counting, &self.head, PROPOSER, self.now_ms, candidates)
                .expect("a block at a time not before its head executes");
        let reads = counting.reads.get();
        apply_writes(&mut self.state, &executed.writes);
        self.head = executed.head;
        let block = executed.block;
        for (tx, outcome) in block.txs.iter().zip(&block.outcomes) {
            if outcome.is_committed() {
                let id = tx.id().expect("committed transactions encode");
                self.last_committed.insert(tx.payload.body.kind(), id);
            }
        }
        let outcomes = block.outcomes.clone();
        self.blocks.push(block);
        (outcomes, executed.writes, reads)
    }

    fn run1(&mut self, tx: SignedTx) -> TxOutcome {
        self.run(vec![tx]).remove(0)
    }

    /// Signs and runs `body` alone in a block; it must commit. Returns the transaction id.
    fn commit(&mut self, who: &Identity, body: TxBody) -> Hash {
        let tx = self.sign(who, body);
        self.commit_tx(tx)
    }

    fn commit_tx(&mut self, tx: SignedTx) -> Hash {
        let id = tx.id().expect("test transactions encode");
        let kind = tx.payload.body.kind();
        let signer = tx.payload.signer.clone();
        let outcome = self.run1(tx);
        assert!(
            outcome.is_committed(),
            "setup: {kind} by {signer} should commit: {outcome:?}"
        );
        id
    }

    fn last(&self, kind: &str) -> Hash {
        *self
            .last_committed
            .get(kind)
            .unwrap_or_else(|| panic!("no {kind} has committed"))
    }

    fn value<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        Overlay::new(&self.state).get_value(key)
    }

    fn must<T: DeserializeOwned>(&self, key: &str) -> T {
        self.value(key)
            .unwrap_or_else(|| panic!("state has no {key}"))
    }

    fn org(&self, id: &str) -> Org {
        self.must(&keys::org(id))
    }
    fn user(&self, id: &str) -> User {
        self.must(&keys::user(id))
    }
    fn consent(&self, id: &Hash) -> Consent {
        self.must(&keys::consent(id))
    }
    fn request(&self, id: &Hash) -> AccessRequest {
        self.must(&keys::request(id))
    }

    /// The ids in the patient's consent slots, the ones the policy reads, after checking
    /// that the layout holds together: a count that is absent rather than zero, one slot
    /// per id below it and none elsewhere, and for each of the patient's consents a record
    /// of its slot exactly when it occupies one.
    fn consents_in_force(&self, patient: &str) -> Vec<Hash> {
        let count: Option<u64> = self.value(&keys::patient_consent_count(patient));
        assert_ne!(count, Some(0), "a count of zero is deleted, not stored");
        let count = count.unwrap_or(0);
        let ids: Vec<Hash> = (0..count)
            .map(|slot| {
                let id: Hash = self.must(&keys::patient_consent_slot(patient, slot));
                assert_eq!(
                    self.value::<u64>(&keys::consent_slot(&id)),
                    Some(slot),
                    "consent {id} does not know its slot"
                );
                id
            })
            .collect();
        // Prefixes of the slot keys, from the layout itself: the numbers and ids are hex.
        let slot_key = keys::patient_consent_slot(patient, 0);
        let slot_prefix = slot_key.trim_end_matches('0');
        let slots = self.state.keys().filter(|k| k.starts_with(slot_prefix));
        assert_eq!(slots.count() as u64, count, "slots outside 0..count");
        let back_key = keys::consent_slot(&Hash::ZERO);
        let back_prefix = back_key.trim_end_matches('0');
        for key in self.state.keys().filter(|k| k.starts_with(back_prefix)) {
            let id = Hash::from_hex(&key[back_prefix.len()..]).expect("a consent id");
            if self.consent(&id).patient == patient {
                assert!(ids.contains(&id), "consent {id} records a slot it lost");
            }
        }
        ids
    }
    fn break_glass(&self, id: &Hash) -> BreakGlass {
        self.must(&keys::break_glass(id))
    }
    fn proposal(&self, id: u64) -> Proposal {
        self.must(&keys::proposal(id))
    }
    fn record(&self, custodian: &str, record_id: &str) -> Record {
        self.must(&keys::record(custodian, record_id))
    }
    fn event(&self, leaf_index: u64) -> Option<AuditEvent> {
        self.value(&keys::event(leaf_index))
    }
    fn last_event(&self) -> AuditEvent {
        self.event(self.head.log_size - 1)
            .expect("the last transaction wrote an event")
    }
}

// ---- the world: a consortium with staff, patients, a consent, records, proposals ------

/// Key material and the ids the tables refer to. Built once per test by `world()`.
struct World {
    consortium: Consortium,
    /// A CA under the consortium root for an organisation not yet admitted.
    clinic_c: OrgAuthority,
    clinic_c_admin: Identity,
    /// A clinician of clinic-c.
    cole: Identity,
    /// A CA for "clinic-r" under a root that is not the consortium's, and its admin.
    rogue_ca: OrgAuthority,
    rogue_admin: Identity,
    /// Enrolled: clinician, nurse and auditor at hospital-a.
    alice: Identity,
    ned: Identity,
    amy: Identity,
    /// Enrolled clinician at hospital-a whose certificate ends at `SID_NOT_AFTER_MS`.
    sid: Identity,
    /// Enrolled: clinician at hospital-b, lab technician at lab-x, auditor at the regulator.
    bob: Identity,
    lee: Identity,
    ann: Identity,
    /// Issued, not enrolled: a radiologist of hospital-a, a nurse of hospital-b, and
    /// hospital-a clinicians whose certificates expired before genesis or start later.
    rita: Identity,
    sam: Identity,
    old: Identity,
    early: Identity,
    /// Registered patients, and one who is not.
    p: Identity,
    q: Identity,
    stranger: Identity,
    /// P's consent for alice: diagnostics and conditions, read and write, for treatment.
    consent: Hash,
    /// Bob's pending request to P: observations, read, for treatment.
    request: Hash,
    /// Alice's break-glass for Q, open from `WORLD_MS` for `WORLD_BREAK_GLASS_MS`.
    break_glass: Hash,
}

impl World {
    fn founder(&self, org: &str) -> &FoundingOrg {
        self.consortium
            .org(org)
            .unwrap_or_else(|| panic!("{org} is not a founder"))
    }
    fn admin(&self, org: &str) -> &Identity {
        &self.founder(org).admin
    }
    fn node(&self, org: &str) -> &Identity {
        &self.founder(org).node
    }
}

/// Builds the shared world at `WORLD_MS`: the four founders, seven enrolled staff, patients
/// P and Q, P's consent for alice, bob's pending request to P, alice's break-glass for Q,
/// records obs-1 and cond-1 of P and obs-q of Q (all at hospital-a), and hospital-a's open
/// proposals 1 (admit clinic-c) and 2 (suspend lab-x).
fn world() -> (Ledger, World) {
    let consortium = Consortium::create(CHAIN_ID, &FOUNDERS, GENESIS_MS, VALIDITY)
        .expect("the consortium is created");
    let issue = |org: &str, name: &str, role: Role, validity: Validity| {
        consortium
            .org(org)
            .expect("a founder")
            .authority
            .issue(name, role, validity)
            .expect("the CA issues")
    };
    let alice = issue("hospital-a", "alice", Role::Clinician, VALIDITY);
    let ned = issue("hospital-a", "ned", Role::Nurse, VALIDITY);
    let amy = issue("hospital-a", "amy", Role::Auditor, VALIDITY);
    let sid = issue(
        "hospital-a",
        "sid",
        Role::Clinician,
        Validity {
            not_before_ms: VALIDITY.not_before_ms,
            not_after_ms: SID_NOT_AFTER_MS,
        },
    );
    let bob = issue("hospital-b", "bob", Role::Clinician, VALIDITY);
    let lee = issue("lab-x", "lee", Role::LabTechnician, VALIDITY);
    let ann = issue("regulator", "ann", Role::Auditor, VALIDITY);
    let rita = issue("hospital-a", "rita", Role::Radiologist, VALIDITY);
    let sam = issue("hospital-b", "sam", Role::Nurse, VALIDITY);
    let old = issue(
        "hospital-a",
        "old",
        Role::Clinician,
        Validity {
            not_before_ms: VALIDITY.not_before_ms,
            not_after_ms: GENESIS_MS - DAY_MS,
        },
    );
    let early = issue(
        "hospital-a",
        "early",
        Role::Clinician,
        Validity {
            not_before_ms: GENESIS_MS + 30 * DAY_MS,
            not_after_ms: VALIDITY.not_after_ms,
        },
    );
    let clinic_c = OrgAuthority::create(&consortium.root, "clinic-c", OrgKind::Clinic, VALIDITY)
        .expect("the root issues a CA");
    let clinic_c_admin = clinic_c
        .issue("admin", Role::OrgAdmin, VALIDITY)
        .expect("the CA issues");
    let cole = clinic_c
        .issue("cole", Role::Clinician, VALIDITY)
        .expect("the CA issues");
    let rogue_root = RootAuthority::create("rogue", VALIDITY).expect("a root is created");
    let rogue_ca = OrgAuthority::create(&rogue_root, "clinic-r", OrgKind::Clinic, VALIDITY)
        .expect("the rogue root issues a CA");
    let rogue_admin = rogue_ca
        .issue("admin", Role::OrgAdmin, VALIDITY)
        .expect("the CA issues");
    let patient = || Identity::new_patient().expect("a patient key");
    let (p, q, stranger) = (patient(), patient(), patient());

    let mut ledger = Ledger::start(&consortium.genesis);
    assert_eq!(ledger.now_ms, WORLD_MS);
    let admin = |org: &str| &consortium.org(org).expect("a founder").admin;
    let mut txs = Vec::new();
    for (org, member) in [
        ("hospital-a", &alice),
        ("hospital-a", &ned),
        ("hospital-a", &amy),
        ("hospital-a", &sid),
        ("hospital-b", &bob),
        ("lab-x", &lee),
        ("regulator", &ann),
    ] {
        txs.push(ledger.sign(admin(org), enroll(member)));
    }
    txs.push(ledger.sign(&p, register(&p)));
    txs.push(ledger.sign(&q, register(&q)));
    expect_all_committed(&ledger.run(txs), "the world's members and patients");

    let consent = ledger.commit(
        &p,
        grant(
            to_user(&alice.id),
            categories(&[Category::Diagnostics, Category::Conditions]),
            &[Action::Read, Action::Write],
            &[Purpose::Treatment],
            None,
        ),
    );
    let request = ledger.commit(
        &bob,
        request(
            &p.id,
            types(&["Observation"]),
            &[Action::Read],
            Purpose::Treatment,
        ),
    );
    let break_glass = ledger.commit(&alice, open_break_glass(&q.id, WORLD_BREAK_GLASS_MS));
    ledger.commit(&alice, create(&p.id, "obs-1", 1, "Observation"));
    ledger.commit(&alice, create(&p.id, "cond-1", 1, "Condition"));
    ledger.commit(&alice, create(&q.id, "obs-q", 1, "Observation"));
    ledger.commit(
        admin("hospital-a"),
        propose(admit(&clinic_c, &clinic_c_admin)),
    );
    ledger.commit(
        admin("hospital-a"),
        propose(GovernanceAction::SuspendOrg {
            org: "lab-x".into(),
        }),
    );
    assert_eq!(ledger.now_ms, WORLD_MS, "the world is built at one instant");

    let world = World {
        consortium,
        clinic_c,
        clinic_c_admin,
        cole,
        rogue_ca,
        rogue_admin,
        alice,
        ned,
        amy,
        sid,
        bob,
        lee,
        ann,
        rita,
        sam,
        old,
        early,
        p,
        q,
        stranger,
        consent,
        request,
        break_glass,
    };
    (ledger, world)
}

fn expect_all_committed(outcomes: &[TxOutcome], what: &str) {
    for (position, outcome) in outcomes.iter().enumerate() {
        assert!(
            outcome.is_committed(),
            "{what}: transaction {position} should commit: {outcome:?}"
        );
    }
}

// ---- transaction bodies ---------------------------------------------------------------

fn enroll(member: &Identity) -> TxBody {
    TxBody::EnrollUser {
        certificate: member
            .certificate_text()
            .expect("members have certificates"),
    }
}

fn revoke_user(user: &str) -> TxBody {
    TxBody::RevokeUser {
        user: user.to_string(),
        reason: RevocationReason::LeftOrganisation,
    }
}

fn register(patient: &Identity) -> TxBody {
    TxBody::RegisterPatient {
        public_key: patient.key.public_key(),
    }
}

fn set_encryption_key(public_key: String) -> TxBody {
    TxBody::SetEncryptionKey { public_key }
}

/// A fresh, valid encryption key: a SEC1 uncompressed P-256 point, unpadded base64url.
fn fresh_encryption_key() -> String {
    EncryptionKeyPair::generate().public_key().to_base64url()
}

/// The 65 bytes of a fresh, valid encryption key, for the tests that spoil them.
fn fresh_encryption_key_bytes() -> Vec<u8> {
    EncryptionKeyPair::generate()
        .public_key()
        .as_bytes()
        .to_vec()
}

/// The encryption key of the secret scalar `[secret; 32]` (`secret` nonzero): the same on
/// every run, so that a random sequence's seed names its keys too.
fn fixed_encryption_key(secret: u8) -> String {
    EncryptionKeyPair::from_secret_bytes(&[secret; 32])
        .expect("a small nonzero scalar is a secret key")
        .public_key()
        .to_base64url()
}

fn to_user(id: &str) -> Grantee {
    Grantee::User {
        user: id.to_string(),
    }
}

fn to_role(org: &str, role: Role) -> Grantee {
    Grantee::Role {
        org: org.to_string(),
        role,
    }
}

fn to_org(org: &str) -> Grantee {
    Grantee::Org {
        org: org.to_string(),
    }
}

fn types(names: &[&str]) -> Scope {
    Scope {
        resource_types: names.iter().map(|name| name.to_string()).collect(),
        categories: Vec::new(),
    }
}

fn categories(list: &[Category]) -> Scope {
    Scope {
        resource_types: Vec::new(),
        categories: list.to_vec(),
    }
}

fn grant(
    grantee: Grantee,
    scope: Scope,
    actions: &[Action],
    purposes: &[Purpose],
    expires_at_ms: Option<u64>,
) -> TxBody {
    TxBody::Grant {
        grantee,
        scope,
        actions: actions.to_vec(),
        purposes: purposes.to_vec(),
        expires_at_ms,
    }
}

/// The most common test consent: observations, read, for treatment, no end.
fn grant_observations(grantee: Grantee) -> TxBody {
    grant(
        grantee,
        types(&["Observation"]),
        &[Action::Read],
        &[Purpose::Treatment],
        None,
    )
}

fn revoke(grant_id: Hash) -> TxBody {
    TxBody::Revoke { grant_id }
}

fn request(patient: &str, scope: Scope, actions: &[Action], purpose: Purpose) -> TxBody {
    TxBody::RequestAccess {
        patient: patient.to_string(),
        scope,
        actions: actions.to_vec(),
        purpose,
    }
}

fn approve(request_id: Hash) -> TxBody {
    TxBody::ApproveRequest {
        request_id,
        expires_at_ms: None,
    }
}

fn deny(request_id: Hash) -> TxBody {
    TxBody::DenyRequest { request_id }
}

fn open_break_glass(patient: &str, duration_ms: u64) -> TxBody {
    TxBody::BreakGlass {
        patient: patient.to_string(),
        reason: EmergencyReason::UnconsciousPatient,
        justification_commitment: Hash::digest(b"salt|patient brought in unconscious"),
        duration_ms,
    }
}

fn review(break_glass_id: Hash) -> TxBody {
    TxBody::ReviewBreakGlass {
        break_glass_id,
        verdict: BreakGlassVerdict::Justified,
    }
}

/// A well-formed CIDv1 (raw, sha2-256, base32) derived from `seed`.
fn cid(seed: &str) -> String {
    const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let digest = Hash::digest(seed.as_bytes());
    let tail: String = (0..52)
        .map(|i| BASE32[(digest.0[i % 32] as usize + i) % 32] as char)
        .collect();
    format!("bafkrei{tail}")
}

fn create(patient: &str, record_id: &str, version: u64, resource_type: &str) -> TxBody {
    create_with_cid(
        patient,
        record_id,
        version,
        resource_type,
        &cid(&format!("{record_id}/{version}")),
    )
}

fn create_with_cid(
    patient: &str,
    record_id: &str,
    version: u64,
    resource_type: &str,
    cid: &str,
) -> TxBody {
    TxBody::CreateRecord {
        patient: patient.to_string(),
        record_id: record_id.to_string(),
        version,
        resource_type: resource_type.to_string(),
        cid: cid.to_string(),
        commitment: Hash::digest(format!("salt|{record_id}|{version}").as_bytes()),
        deleted: false,
    }
}

/// The tombstone that deletes `record_id` at `version`: a version like any other, flagged.
fn tombstone(patient: &str, record_id: &str, version: u64, resource_type: &str) -> TxBody {
    let TxBody::CreateRecord {
        patient,
        record_id,
        version,
        resource_type,
        cid,
        commitment,
        ..
    } = create(patient, record_id, version, resource_type)
    else {
        unreachable!("create builds a create_record")
    };
    TxBody::CreateRecord {
        patient,
        record_id,
        version,
        resource_type,
        cid,
        commitment,
        deleted: true,
    }
}

fn access(
    actor: &str,
    patient: &str,
    action: Action,
    records: &[&str],
    resource_types: &[&str],
    purpose: Purpose,
    custodian_denial: Option<DenialReason>,
) -> TxBody {
    TxBody::LogAccess {
        actor: actor.to_string(),
        patient: patient.to_string(),
        action,
        records: records.iter().map(|r| r.to_string()).collect(),
        resource_types: resource_types.iter().map(|t| t.to_string()).collect(),
        custodians: vec![],
        purpose,
        custodian_denial,
        query_commitment: Hash::digest(b"salt|query"),
        answer_commitment: Hash::digest(b"salt|answer"),
    }
}

fn read(actor: &str, patient: &str, records: &[&str], purpose: Purpose) -> TxBody {
    access(actor, patient, Action::Read, records, &[], purpose, None)
}

fn search(actor: &str, patient: &str, resource_types: &[&str], purpose: Purpose) -> TxBody {
    access(
        actor,
        patient,
        Action::Search,
        &[],
        resource_types,
        purpose,
        None,
    )
}

/// hospital-b's clinician reads P's obs-1, held at hospital-a, for treatment.
fn bob_reads_obs_1(w: &World) -> TxBody {
    read(
        &w.bob.id,
        &w.p.id,
        &["hospital-a/obs-1"],
        Purpose::Treatment,
    )
}

/// A search of the patient's observations that names the custodians to be asked.
fn search_at(actor: &str, patient: &str, custodians: &[&str]) -> TxBody {
    let mut body = search(actor, patient, &["Observation"], Purpose::Treatment);
    if let TxBody::LogAccess {
        custodians: named, ..
    } = &mut body
    {
        named.extend(custodians.iter().map(|c| c.to_string()));
    }
    body
}

fn propose(action: GovernanceAction) -> TxBody {
    TxBody::ProposeGovernance { action }
}

fn vote(proposal_id: u64, approve: bool) -> TxBody {
    TxBody::VoteGovernance {
        proposal_id,
        approve,
    }
}

fn admit(ca: &OrgAuthority, admin: &Identity) -> GovernanceAction {
    GovernanceAction::AdmitOrg {
        org: ca.id.clone(),
        org_kind: ca.kind,
        ca_certificate: base64url(&ca.ca_certificate.der),
        admin_certificate: admin.certificate_text().expect("admins have certificates"),
    }
}

fn suspend(org: &str) -> GovernanceAction {
    GovernanceAction::SuspendOrg {
        org: org.to_string(),
    }
}

fn reinstate(org: &str) -> GovernanceAction {
    GovernanceAction::ReinstateOrg {
        org: org.to_string(),
    }
}

fn remove(org: &str) -> GovernanceAction {
    GovernanceAction::RemoveOrg {
        org: org.to_string(),
    }
}

fn outcome_code(outcome: &TxOutcome) -> String {
    match outcome {
        TxOutcome::Committed { .. } => "committed".to_string(),
        TxOutcome::Rejected { rejection } => rejection.code(),
    }
}

/// Keys whose value differs between two states, added and removed ones included.
fn changed_keys(
    before: &BTreeMap<String, Vec<u8>>,
    after: &BTreeMap<String, Vec<u8>>,
) -> Vec<String> {
    let mut changed: Vec<String> = after
        .iter()
        .filter(|(key, value)| before.get(*key) != Some(*value))
        .map(|(key, _)| key.clone())
        .collect();
    changed.extend(
        before
            .keys()
            .filter(|key| !after.contains_key(*key))
            .cloned(),
    );
    changed
}

// ---- the transaction boundary: one transaction in, outcome and state out ----------------

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Commits: the nonce advances and an event without a refusal is written.
    Committed,
    /// Authenticated, then refused by its contract: the nonce advances and an event
    /// records the refusal; nothing else but the log changes.
    Refused(&'static str),
    /// Refused at authentication: nothing but the Merkle log changes, not even an event.
    Unauthenticated(&'static str),
}
use Expect::{Committed, Refused, Unauthenticated};

/// One row of a transaction table.
struct Case {
    what: &'static str,
    expect: Expect,
    /// Prepares the ledger (it may run blocks of its own) and returns the transaction under test.
    tx: fn(&mut Ledger, &World) -> SignedTx,
    /// What must also hold of the state after the transaction.
    then: fn(&Ledger, &World),
}

fn case(what: &'static str, expect: Expect, tx: fn(&mut Ledger, &World) -> SignedTx) -> Case {
    Case {
        what,
        expect,
        tx,
        then: |_, _| {},
    }
}

impl Case {
    fn then(self, then: fn(&Ledger, &World)) -> Case {
        Case { then, ..self }
    }
}

/// Runs each case on its own fork of `base`.
fn check_each(base: &Ledger, world: &World, cases: &[Case]) {
    for case in cases {
        check(&mut base.clone(), world, case);
    }
}

/// Runs the cases in order on one ledger: each sees the state the previous ones left.
fn check_in_order(ledger: &mut Ledger, world: &World, cases: &[Case]) {
    for case in cases {
        check(ledger, world, case);
    }
}

/// Runs one case's transaction alone in a block and checks its outcome, what it may and
/// may not have changed, its audit event, and the case's own state check.
fn check(ledger: &mut Ledger, world: &World, case: &Case) {
    // Shown only when a test fails: names the case whose `then` check panicked.
    eprintln!("case: {}", case.what);
    let what = case.what;
    let tx = (case.tx)(ledger, world);
    // None for an oversized transaction, which has no id.
    let tx_id = tx.id().ok();
    let signer = tx.payload.signer.clone();
    let before = ledger.state.clone();
    let leaf = ledger.head.log_size;
    let outcome = ledger.run1(tx.clone());
    let changed = changed_keys(&before, &ledger.state);
    let leaf_suffix = format!("/{leaf:016x}");
    // The block's own bookkeeping: its log nodes and the proposer's count of blocks led.
    let block_bookkeeping =
        |key: &String| key.starts_with("merkle/") || *key == keys::contribution("hospital-a");
    let bookkeeping = |key: &String| {
        block_bookkeeping(key)
            || *key == keys::nonce(&signer)
            || tx_id.is_some_and(|id| *key == keys::tx(&id))
            || *key == keys::event(leaf)
            || (key.starts_with("event_by_") && key.ends_with(&leaf_suffix))
    };
    let expected_code = match case.expect {
        Committed => "committed",
        Refused(code) | Unauthenticated(code) => code,
    };
    assert_eq!(
        outcome_code(&outcome),
        expected_code,
        "{what}: outcome {outcome:?}"
    );
    match case.expect {
        Committed | Refused(_) => {
            let tx_id = tx_id.expect("an authenticated transaction has an id");
            assert_eq!(
                ledger.value::<u64>(&keys::nonce(&signer)),
                Some(tx.payload.nonce),
                "{what}: an authenticated transaction advances its signer's nonce"
            );
            assert_eq!(
                ledger.value::<u64>(&keys::tx(&tx_id)),
                Some(leaf),
                "{what}: an authenticated transaction is findable by id"
            );
            let event = ledger
                .event(leaf)
                .unwrap_or_else(|| panic!("{what}: an authenticated transaction writes an event"));
            assert_eq!(event.kind, tx.payload.body.kind(), "{what}");
            assert_eq!(event.signer, signer, "{what}");
            assert_eq!(event.tx_id, tx_id, "{what}");
            assert_eq!(
                (event.height, event.time_ms),
                (ledger.head.height, ledger.now_ms),
                "{what}"
            );
            let rejected = match case.expect {
                Refused(code) => Some(code),
                _ => None,
            };
            assert_eq!(event.rejected.as_deref(), rejected, "{what}");
            if let Refused(_) = case.expect {
                let stray: Vec<&String> = changed.iter().filter(|k| !bookkeeping(k)).collect();
                assert!(
                    stray.is_empty(),
                    "{what}: a refused transaction changed {stray:?}"
                );
            }
        }
        Unauthenticated(_) => {
            let stray: Vec<&String> = changed.iter().filter(|k| !block_bookkeeping(k)).collect();
            assert!(
                stray.is_empty(),
                "{what}: an unauthenticated transaction changed {stray:?}"
            );
            assert!(ledger.event(leaf).is_none(), "{what}: no event");
        }
    }
    (case.then)(ledger, world);
}

// ---- 1. every kind commits, with its state change -------------------------------------

/// Checks that `party`'s stored encryption key is the one the last block published (its
/// only transaction, a set_encryption_key signed by `set_by`): the same text, an
/// uncompressed point named by SHA-256 of its 65 decoded bytes (not of the text), and the
/// transaction and height that set it. Returns the stored value.
fn assert_published_key(l: &Ledger, party: &str, set_by: &str) -> EncryptionKey {
    let block = l.blocks.last().expect("the chain has blocks");
    let [tx] = block.txs.as_slice() else {
        panic!("the publication runs alone in its block")
    };
    let TxBody::SetEncryptionKey { public_key } = &tx.payload.body else {
        panic!("the last block publishes an encryption key")
    };
    let stored: EncryptionKey = l.must(&keys::encryption_key(party));
    let bytes = from_base64url(&stored.public_key).expect("a stored key is base64url");
    assert_eq!((bytes.len(), bytes[0]), (65, 0x04), "an uncompressed point");
    assert_eq!(stored.party, party);
    assert_eq!(&stored.public_key, public_key);
    assert_eq!(stored.key_id, Hash::digest(&bytes));
    assert_ne!(stored.key_id, Hash::digest(public_key.as_bytes()));
    assert_eq!(stored.set_by, set_by);
    assert_eq!(
        stored.tx_id,
        tx.id().expect("committed transactions encode")
    );
    assert_eq!(stored.tx_id, l.last("set_encryption_key"));
    assert_eq!(stored.height, l.head.height);
    stored
}

#[test]
fn every_transaction_kind_commits_and_makes_its_state_change() {
    // Proves that each of the fifteen transaction kinds commits when it should, and that
    // the state it leaves is the one its contract promises, read back from state: the
    // governance cycle admit, suspend, reinstate, remove (with a proposal rejected once
    // approval is impossible), membership, patients, encryption keys, records, consents,
    // requests, break-glass and access entries.
    let (mut ledger, world) = world();
    let cases = [
        case(
            "hospital-b votes to admit clinic-c: 2 of 4, still open",
            Committed,
            |l, w| l.sign(w.admin("hospital-b"), vote(ADMIT_CLINIC_PROPOSAL, true)),
        )
        .then(|l, _| {
            let proposal = l.proposal(ADMIT_CLINIC_PROPOSAL);
            assert_eq!(proposal.status, ProposalStatus::Open);
            assert_eq!(proposal.votes.len(), 2);
            assert!(l.value::<Org>(&keys::org("clinic-c")).is_none());
        }),
        case(
            "lab-x's vote is a majority of 4: clinic-c is admitted with its admin",
            Committed,
            |l, w| l.sign(w.admin("lab-x"), vote(ADMIT_CLINIC_PROPOSAL, true)),
        )
        .then(|l, w| {
            assert_eq!(
                l.proposal(ADMIT_CLINIC_PROPOSAL).status,
                ProposalStatus::Approved
            );
            let org = l.org("clinic-c");
            assert_eq!(
                (org.status, org.kind, org.admitted_height),
                (OrgStatus::Active, OrgKind::Clinic, l.head.height)
            );
            assert!(l
                .must::<Vec<String>>(keys::ORGS)
                .contains(&"clinic-c".to_string()));
            let admin = l.user(&w.clinic_c_admin.id);
            assert_eq!(
                (admin.role, admin.status),
                (Role::OrgAdmin, UserStatus::Active)
            );
        }),
        case(
            "the new member's admin enrolls its staff",
            Committed,
            |l, w| l.sign(&w.clinic_c_admin, enroll(&w.cole)),
        )
        .then(|l, w| {
            let cole = l.user(&w.cole.id);
            assert_eq!(
                (cole.org.as_str(), cole.role),
                ("clinic-c", Role::Clinician)
            );
            assert_eq!(cole.enrolled_height, l.head.height);
            assert_eq!(cole.public_key, w.cole.key.public_key());
        }),
        case(
            "a proposal to suspend hospital-b opens with its proposer's vote",
            Committed,
            |l, w| l.sign(w.admin("hospital-a"), propose(suspend("hospital-b"))),
        )
        .then(|l, _| {
            let proposal = l.proposal(3);
            assert_eq!(proposal.status, ProposalStatus::Open);
            assert_eq!(proposal.votes.get("hospital-a"), Some(&true));
            assert_eq!(proposal.closes_at_ms, l.now_ms + PROPOSAL_OPEN_MS);
            assert_eq!(l.must::<u64>(keys::PROPOSAL_SEQ), 3);
        }),
        case(
            "the regulator's vote makes 2 of 4 voters: still open",
            Committed,
            |l, w| l.sign(w.admin("regulator"), vote(3, true)),
        )
        .then(|l, _| assert_eq!(l.org("hospital-b").status, OrgStatus::Active)),
        case(
            "clinic-c's vote makes 3 of 4: hospital-b is suspended",
            Committed,
            |l, w| l.sign(&w.clinic_c_admin, vote(3, true)),
        )
        .then(|l, _| assert_eq!(l.org("hospital-b").status, OrgStatus::Suspended)),
        case(
            "a user of the suspended organisation is refused",
            Unauthenticated("org_not_active"),
            |l, w| {
                l.sign(
                    &w.bob,
                    request(
                        &w.p.id,
                        types(&["Observation"]),
                        &[Action::Read],
                        Purpose::Treatment,
                    ),
                )
            },
        ),
        case("a proposal to reinstate hospital-b", Committed, |l, w| {
            l.sign(w.admin("hospital-a"), propose(reinstate("hospital-b")))
        }),
        case("lab-x votes to reinstate", Committed, |l, w| {
            l.sign(w.admin("lab-x"), vote(4, true))
        }),
        case(
            "the regulator's vote reinstates hospital-b",
            Committed,
            |l, w| l.sign(w.admin("regulator"), vote(4, true)),
        )
        .then(|l, _| assert_eq!(l.org("hospital-b").status, OrgStatus::Active)),
        case(
            "the reinstated organisation's user signs again",
            Committed,
            |l, w| {
                l.sign(
                    &w.bob,
                    request(
                        &w.p.id,
                        types(&["Condition"]),
                        &[Action::Read],
                        Purpose::Treatment,
                    ),
                )
            },
        ),
        case(
            "hospital-b proposes removing clinic-c",
            Committed,
            |l, w| l.sign(w.admin("hospital-b"), propose(remove("clinic-c"))),
        ),
        case("hospital-a votes to remove", Committed, |l, w| {
            l.sign(w.admin("hospital-a"), vote(5, true))
        }),
        case(
            "lab-x's vote makes 3 of 4: clinic-c is removed",
            Committed,
            |l, w| l.sign(w.admin("lab-x"), vote(5, true)),
        )
        .then(|l, _| assert_eq!(l.org("clinic-c").status, OrgStatus::Removed)),
        case(
            "a user of the removed organisation is refused",
            Unauthenticated("org_not_active"),
            |l, w| {
                l.sign(
                    &w.cole,
                    request(
                        &w.p.id,
                        types(&["Observation"]),
                        &[Action::Read],
                        Purpose::Treatment,
                    ),
                )
            },
        ),
        case(
            "hospital-b votes against suspending lab-x: 1 for, 1 against of 3, open",
            Committed,
            |l, w| l.sign(w.admin("hospital-b"), vote(SUSPEND_LAB_PROPOSAL, false)),
        )
        .then(|l, _| {
            assert_eq!(
                l.proposal(SUSPEND_LAB_PROPOSAL).status,
                ProposalStatus::Open
            )
        }),
        case(
            "a second vote against makes approval impossible: rejected",
            Committed,
            |l, w| l.sign(w.admin("regulator"), vote(SUSPEND_LAB_PROPOSAL, false)),
        )
        .then(|l, _| {
            assert_eq!(
                l.proposal(SUSPEND_LAB_PROPOSAL).status,
                ProposalStatus::Rejected
            );
            assert_eq!(l.org("lab-x").status, OrgStatus::Active);
        }),
        case(
            "an admin enrolls a radiologist of their organisation",
            Committed,
            |l, w| l.sign(w.admin("hospital-a"), enroll(&w.rita)),
        )
        .then(|l, w| {
            let rita = l.user(&w.rita.id);
            assert_eq!(
                (rita.org.as_str(), rita.role, rita.status),
                ("hospital-a", Role::Radiologist, UserStatus::Active)
            );
            assert_eq!(rita.certificate, w.rita.certificate_text().unwrap());
            assert_eq!(rita.not_after_ms, VALIDITY.not_after_ms);
        }),
        case(
            "an admin revokes a user of their organisation",
            Committed,
            |l, w| l.sign(w.admin("hospital-a"), revoke_user(&w.ned.id)),
        )
        .then(|l, w| {
            let ned = l.user(&w.ned.id);
            assert_eq!(ned.status, UserStatus::Revoked);
            assert_eq!(ned.revocation, Some(RevocationReason::LeftOrganisation));
        }),
        case(
            "the revoked user is refused",
            Unauthenticated("signer_revoked"),
            |l, w| {
                l.sign(
                    &w.ned,
                    request(
                        &w.p.id,
                        types(&["Observation"]),
                        &[Action::Read],
                        Purpose::Treatment,
                    ),
                )
            },
        ),
        case("a patient registers their own key", Committed, |l, w| {
            l.sign(&w.stranger, register(&w.stranger))
        })
        .then(|l, w| {
            let patient: Patient = l.must(&keys::patient(&w.stranger.id));
            assert_eq!(patient.public_key, w.stranger.key.public_key());
            assert_eq!(patient.registered_height, l.head.height);
        }),
        // Encryption keys: a patient publishes their own, an admin and then a node their
        // organisation's, the second replacing the first under the same key.
        case(
            "a patient publishes their encryption key",
            Committed,
            |l, w| l.sign(&w.p, set_encryption_key(fresh_encryption_key())),
        )
        .then(|l, w| {
            assert_published_key(l, &w.p.id, &w.p.id);
            assert_eq!(l.last_event().patient.as_deref(), Some(w.p.id.as_str()));
        }),
        case(
            "an admin publishes their organisation's encryption key",
            Committed,
            |l, w| {
                l.sign(
                    w.admin("hospital-a"),
                    set_encryption_key(fresh_encryption_key()),
                )
            },
        )
        .then(|l, w| {
            assert_published_key(l, "hospital-a", &w.admin("hospital-a").id);
            assert_eq!(l.last_event().patient, None);
        }),
        case(
            "the organisation's node publishes a new key: it replaces the admin's",
            Committed,
            |l, w| {
                l.sign(
                    w.node("hospital-a"),
                    set_encryption_key(fresh_encryption_key()),
                )
            },
        )
        .then(|l, w| {
            let stored = assert_published_key(l, "hospital-a", &w.node("hospital-a").id);
            let first = &l.blocks[l.blocks.len() - 2].txs[0];
            assert_eq!(first.payload.signer, w.admin("hospital-a").id);
            let TxBody::SetEncryptionKey {
                public_key: first_key,
            } = &first.payload.body
            else {
                panic!("the block before published the first key")
            };
            assert_ne!(
                &stored.public_key, first_key,
                "the second key replaces the first"
            );
            let published: Vec<&String> = l
                .state
                .keys()
                .filter(|k| k.starts_with("encryption_key/"))
                .collect();
            assert_eq!(
                published,
                [
                    &keys::encryption_key("hospital-a"),
                    &keys::encryption_key(&w.p.id)
                ],
                "one key per party, the patient's untouched"
            );
            let patients: EncryptionKey = l.must(&keys::encryption_key(&w.p.id));
            assert_eq!(patients.set_by, w.p.id);
        }),
        case(
            "a clinician with consent creates version 1 of a record",
            Committed,
            |l, w| l.sign(&w.alice, create(&w.p.id, "obs-2", 1, "Observation")),
        )
        .then(|l, w| {
            let record = l.record("hospital-a", "obs-2");
            assert_eq!(
                (record.patient.as_str(), record.resource_type.as_str()),
                (w.p.id.as_str(), "Observation")
            );
            assert_eq!(record.versions.len(), 1);
            let version = &record.versions[0];
            assert_eq!(
                (version.version, version.author.as_str()),
                (1, w.alice.id.as_str())
            );
            assert_eq!(version.cid, cid("obs-2/1"));
            assert_eq!(version.tx_id, l.last("create_record"));
            assert_eq!(version.height, l.head.height);
            assert!(l
                .state
                .contains_key(&keys::patient_record(&w.p.id, "hospital-a", "obs-2")));
        }),
        case("and version 2 of it", Committed, |l, w| {
            l.sign(&w.alice, create(&w.p.id, "obs-2", 2, "Observation"))
        })
        .then(|l, _| {
            let record = l.record("hospital-a", "obs-2");
            let numbers: Vec<u64> = record.versions.iter().map(|v| v.version).collect();
            assert_eq!(numbers, [1, 2]);
            assert_eq!(record.versions[1].cid, cid("obs-2/2"));
        }),
        case(
            "a patient grants a consent to an organisation",
            Committed,
            |l, w| l.sign(&w.p, grant_observations(to_org("hospital-b"))),
        )
        .then(|l, w| {
            let id = l.last("grant");
            let consent = l.consent(&id);
            assert_eq!(consent.id, id);
            assert_eq!(consent.grantee, to_org("hospital-b"));
            assert_eq!(
                (consent.granted_at_ms, consent.revoked_at_ms),
                (l.now_ms, None)
            );
            assert!(l.consents_in_force(&w.p.id).contains(&id));
        }),
        case("the patient revokes it", Committed, |l, w| {
            let id = l.last("grant");
            l.sign(&w.p, revoke(id))
        })
        .then(|l, _| assert_eq!(l.consent(&l.last("grant")).revoked_at_ms, Some(l.now_ms))),
        case("a lab technician requests access", Committed, |l, w| {
            l.sign(
                &w.lee,
                request(
                    &w.p.id,
                    types(&["Observation"]),
                    &[Action::Read, Action::Write],
                    Purpose::Treatment,
                ),
            )
        })
        .then(|l, w| {
            let id = l.last("request_access");
            let request = l.request(&id);
            assert_eq!(
                (request.status, request.requester.as_str()),
                (RequestStatus::Pending, w.lee.id.as_str())
            );
            assert!(l.state.contains_key(&keys::patient_request(&w.p.id, &id)));
        }),
        case(
            "the patient approves: a consent for the requester",
            Committed,
            |l, w| {
                let id = l.last("request_access");
                l.sign(&w.p, approve(id))
            },
        )
        .then(|l, w| {
            let request = l.request(&l.last("request_access"));
            let consent_id = l.last("approve_request");
            assert_eq!(
                (request.status, request.consent_id),
                (RequestStatus::Approved, Some(consent_id))
            );
            let consent = l.consent(&consent_id);
            assert_eq!(consent.grantee, to_user(&w.lee.id));
            assert_eq!(consent.request_id, Some(request.id));
            assert_eq!(consent.purposes, [Purpose::Treatment]);
        }),
        case(
            "the requester writes under the approved consent",
            Committed,
            |l, w| l.sign(&w.lee, create(&w.p.id, "lab-1", 1, "Observation")),
        )
        .then(|l, _| assert_eq!(l.record("lab-x", "lab-1").versions.len(), 1)),
        case("and is granted a read under it", Committed, |l, w| {
            l.sign(
                w.node("lab-x"),
                read(&w.lee.id, &w.p.id, &["lab-1"], Purpose::Treatment),
            )
        })
        .then(|l, _| {
            let decision = l
                .last_event()
                .decision
                .expect("an access entry records its decision");
            assert_eq!(label(&decision), "granted:consent");
        }),
        case("the patient denies a request", Committed, |l, w| {
            l.sign(&w.p, deny(w.request))
        })
        .then(|l, w| {
            let request = l.request(&w.request);
            assert_eq!(
                (request.status, request.consent_id),
                (RequestStatus::Denied, None)
            );
        }),
        case("a clinician opens break-glass", Committed, |l, w| {
            l.sign(&w.alice, open_break_glass(&w.p.id, HOUR_MS))
        })
        .then(|l, w| {
            let id = l.last("break_glass");
            let opening = l.break_glass(&id);
            assert_eq!(opening.actor, w.alice.id);
            assert_eq!(
                (opening.starts_at_ms, opening.ends_at_ms),
                (l.now_ms, l.now_ms + HOUR_MS)
            );
            assert_eq!(opening.review, None);
            assert!(l
                .must::<Vec<Hash>>(&keys::patient_break_glass(&w.p.id))
                .contains(&id));
            assert!(l.last_event().flagged);
        }),
        case("an auditor reviews it", Committed, |l, w| {
            let id = l.last("break_glass");
            l.sign(&w.ann, review(id))
        })
        .then(|l, w| {
            let review = l
                .break_glass(&l.last("break_glass"))
                .review
                .expect("reviewed");
            assert_eq!(review.reviewer, w.ann.id);
            assert_eq!(
                (review.verdict, review.reviewed_at_ms),
                (BreakGlassVerdict::Justified, l.now_ms)
            );
        }),
        case(
            "a node logs its own user's granted read",
            Committed,
            |l, w| {
                l.sign(
                    w.node("hospital-a"),
                    read(&w.alice.id, &w.p.id, &["obs-1"], Purpose::Treatment),
                )
            },
        )
        .then(|l, w| {
            let event = l.last_event();
            assert_eq!(
                event.decision.map(|d| label(&d)).as_deref(),
                Some("granted:consent")
            );
            assert_eq!(event.actor.as_deref(), Some(w.alice.id.as_str()));
        }),
        case(
            "a node logs its own user's denied read: the denial commits",
            Committed,
            |l, w| l.sign(w.node("hospital-b"), bob_reads_obs_1(w)),
        )
        .then(|l, _| {
            let decision = l
                .last_event()
                .decision
                .expect("an access entry records its decision");
            assert_eq!(label(&decision), "denied:no_consent");
        }),
    ];
    check_in_order(&mut ledger, &world, &cases);
}

// ---- 2. every way each kind is refused ------------------------------------------------

/// A request every enrolled clinician may make: the contract commits it.
fn harmless_request(patient: &Identity) -> TxBody {
    request(
        &patient.id,
        types(&["Observation"]),
        &[Action::Read],
        Purpose::Treatment,
    )
}

#[test]
fn governance_refuses_wrong_signers_bad_proposals_and_bad_votes() {
    // Proves that only organisation admins take part in governance, that a proposal must
    // make sense (a new organisation with a CA from the consortium root and an org_admin;
    // an existing organisation in the right status), and that each organisation votes
    // once, on an open proposal, before it closes, and never on its own membership.
    let (base, world) = world();
    let cases = [
        case(
            "a patient signs a proposal",
            Refused("not_permitted"),
            |l, w| l.sign(&w.p, propose(suspend("lab-x"))),
        ),
        case("a clinician proposes", Refused("not_permitted"), |l, w| {
            l.sign(&w.alice, propose(suspend("lab-x")))
        }),
        case("a node proposes", Refused("not_permitted"), |l, w| {
            l.sign(w.node("hospital-a"), propose(suspend("lab-x")))
        }),
        case("a nurse votes", Refused("not_permitted"), |l, w| {
            l.sign(&w.ned, vote(ADMIT_CLINIC_PROPOSAL, true))
        }),
        case(
            "admitting an existing organisation",
            Refused("already_exists"),
            |l, w| {
                let b = w.founder("hospital-b");
                l.sign(
                    w.admin("hospital-a"),
                    propose(admit(&b.authority, &b.admin)),
                )
            },
        ),
        case(
            "admitting an organisation whose CA another root issued",
            Refused("invalid"),
            |l, w| {
                l.sign(
                    w.admin("hospital-a"),
                    propose(admit(&w.rogue_ca, &w.rogue_admin)),
                )
            },
        ),
        case(
            "admitting an organisation whose first admin is not an org_admin",
            Refused("invalid"),
            |l, w| l.sign(w.admin("hospital-a"), propose(admit(&w.clinic_c, &w.cole))),
        ),
        case(
            "admitting under an id that is not the CA's organisation",
            Refused("invalid"),
            |l, w| {
                let GovernanceAction::AdmitOrg {
                    org_kind,
                    ca_certificate,
                    admin_certificate,
                    ..
                } = admit(&w.clinic_c, &w.clinic_c_admin)
                else {
                    unreachable!()
                };
                let action = GovernanceAction::AdmitOrg {
                    org: "clinic-z".into(),
                    org_kind,
                    ca_certificate,
                    admin_certificate,
                };
                l.sign(w.admin("hospital-a"), propose(action))
            },
        ),
        case(
            "admitting with a CA certificate that is not base64url",
            Refused("invalid"),
            |l, w| {
                let GovernanceAction::AdmitOrg {
                    org,
                    org_kind,
                    admin_certificate,
                    ..
                } = admit(&w.clinic_c, &w.clinic_c_admin)
                else {
                    unreachable!()
                };
                let action = GovernanceAction::AdmitOrg {
                    org,
                    org_kind,
                    ca_certificate: "not base64!".into(),
                    admin_certificate,
                };
                l.sign(w.admin("hospital-a"), propose(action))
            },
        ),
        case(
            "suspending an unknown organisation",
            Refused("not_found"),
            |l, w| l.sign(w.admin("hospital-a"), propose(suspend("nowhere"))),
        ),
        case(
            "reinstating an active organisation",
            Refused("conflict"),
            |l, w| l.sign(w.admin("hospital-a"), propose(reinstate("lab-x"))),
        ),
        case(
            "suspending a suspended organisation",
            Refused("conflict"),
            |l, w| {
                l.commit(w.admin("regulator"), vote(SUSPEND_LAB_PROPOSAL, true));
                assert_eq!(l.org("lab-x").status, OrgStatus::Suspended);
                l.sign(w.admin("hospital-b"), propose(suspend("lab-x")))
            },
        ),
        case(
            "removing a removed organisation",
            Refused("conflict"),
            |l, w| {
                l.commit(w.admin("hospital-a"), propose(remove("lab-x")));
                l.commit(w.admin("regulator"), vote(3, true));
                assert_eq!(l.org("lab-x").status, OrgStatus::Removed);
                l.sign(w.admin("hospital-b"), propose(remove("lab-x")))
            },
        ),
        case(
            "reinstating a removed organisation",
            Refused("conflict"),
            |l, w| {
                l.commit(w.admin("hospital-a"), propose(remove("lab-x")));
                l.commit(w.admin("regulator"), vote(3, true));
                l.sign(w.admin("hospital-b"), propose(reinstate("lab-x")))
            },
        ),
        case(
            "the proposer's organisation votes again",
            Refused("conflict"),
            |l, w| l.sign(w.admin("hospital-a"), vote(ADMIT_CLINIC_PROPOSAL, false)),
        ),
        case(
            "an organisation votes twice",
            Refused("conflict"),
            |l, w| {
                l.commit(w.admin("hospital-b"), vote(ADMIT_CLINIC_PROPOSAL, true));
                l.sign(w.admin("hospital-b"), vote(ADMIT_CLINIC_PROPOSAL, true))
            },
        ),
        case(
            "voting on an unknown proposal",
            Refused("not_found"),
            |l, w| l.sign(w.admin("hospital-b"), vote(99, true)),
        ),
        case(
            "the target organisation votes on its own membership",
            Refused("not_permitted"),
            |l, w| l.sign(w.admin("lab-x"), vote(SUSPEND_LAB_PROPOSAL, false)),
        ),
        case(
            "voting on a decided proposal",
            Refused("conflict"),
            |l, w| {
                l.commit(w.admin("regulator"), vote(SUSPEND_LAB_PROPOSAL, true));
                l.sign(w.admin("hospital-b"), vote(SUSPEND_LAB_PROPOSAL, true))
            },
        ),
        case(
            "a vote one millisecond before the close counts",
            Committed,
            |l, w| {
                let closes_at_ms = l.proposal(ADMIT_CLINIC_PROPOSAL).closes_at_ms;
                assert_eq!(closes_at_ms, WORLD_MS + PROPOSAL_OPEN_MS);
                l.set_time(closes_at_ms - 1);
                l.sign(w.admin("hospital-b"), vote(ADMIT_CLINIC_PROPOSAL, true))
            },
        )
        .then(|l, _| assert_eq!(l.proposal(ADMIT_CLINIC_PROPOSAL).votes.len(), 2)),
        case(
            "a vote at the close is refused",
            Refused("conflict"),
            |l, w| {
                l.set_time(l.proposal(ADMIT_CLINIC_PROPOSAL).closes_at_ms);
                l.sign(w.admin("hospital-b"), vote(ADMIT_CLINIC_PROPOSAL, true))
            },
        ),
        case(
            "a vote a day after the close is refused",
            Refused("conflict"),
            |l, w| {
                l.set_time(WORLD_MS + PROPOSAL_OPEN_MS + DAY_MS);
                l.sign(w.admin("hospital-b"), vote(ADMIT_CLINIC_PROPOSAL, true))
            },
        ),
    ];
    check_each(&base, &world, &cases);
}

#[test]
fn membership_refuses_wrong_signers_and_bad_certificates() {
    // Proves that only an organisation's admin enrolls and revokes its users, that an
    // enrolled certificate must be an end-entity certificate of that organisation's CA,
    // valid now, not yet enrolled; and that a user cannot be revoked twice.
    let (base, world) = world();
    let cases = [
        case(
            "a clinician enrolls a user",
            Refused("not_permitted"),
            |l, w| l.sign(&w.alice, enroll(&w.rita)),
        ),
        case(
            "a patient enrolls a user",
            Refused("not_permitted"),
            |l, w| l.sign(&w.p, enroll(&w.rita)),
        ),
        case("a node enrolls a user", Refused("not_permitted"), |l, w| {
            l.sign(w.node("hospital-a"), enroll(&w.rita))
        }),
        case(
            "enrolling an enrolled certificate again",
            Refused("already_exists"),
            |l, w| l.sign(w.admin("hospital-a"), enroll(&w.alice)),
        ),
        case(
            "enrolling a certificate of another organisation's CA",
            Refused("invalid"),
            |l, w| l.sign(w.admin("hospital-a"), enroll(&w.sam)),
        ),
        case(
            "enrolling the organisation's CA certificate as a user",
            Refused("invalid"),
            |l, w| {
                let ca = base64url(&w.founder("hospital-a").authority.ca_certificate.der);
                l.sign(
                    w.admin("hospital-a"),
                    TxBody::EnrollUser { certificate: ca },
                )
            },
        ),
        case(
            "enrolling the consortium root as a user",
            Refused("invalid"),
            |l, w| {
                let root = w.consortium.genesis.root_certificate.clone();
                l.sign(
                    w.admin("hospital-a"),
                    TxBody::EnrollUser { certificate: root },
                )
            },
        ),
        case(
            "enrolling an expired certificate",
            Refused("invalid"),
            |l, w| l.sign(w.admin("hospital-a"), enroll(&w.old)),
        ),
        case(
            "enrolling a certificate not yet valid",
            Refused("invalid"),
            |l, w| l.sign(w.admin("hospital-a"), enroll(&w.early)),
        ),
        case(
            "enrolling text that is not base64url",
            Refused("invalid"),
            |l, w| {
                l.sign(
                    w.admin("hospital-a"),
                    TxBody::EnrollUser {
                        certificate: "not base64!".into(),
                    },
                )
            },
        ),
        case(
            "enrolling bytes that are not a certificate",
            Refused("invalid"),
            |l, w| {
                l.sign(
                    w.admin("hospital-a"),
                    TxBody::EnrollUser {
                        certificate: base64url(b"hello"),
                    },
                )
            },
        ),
        case(
            "enrolling a certificate on its first valid second",
            Committed,
            |l, w| {
                l.set_time(GENESIS_MS + 30 * DAY_MS);
                l.sign(w.admin("hospital-a"), enroll(&w.early))
            },
        ),
        case(
            "an admin revokes another organisation's user",
            Refused("not_permitted"),
            |l, w| l.sign(w.admin("hospital-a"), revoke_user(&w.bob.id)),
        ),
        case("revoking an unknown user", Refused("not_found"), |l, w| {
            l.sign(w.admin("hospital-a"), revoke_user("ghost@hospital-a"))
        }),
        case("revoking a user twice", Refused("conflict"), |l, w| {
            l.commit(w.admin("hospital-a"), revoke_user(&w.ned.id));
            l.sign(w.admin("hospital-a"), revoke_user(&w.ned.id))
        }),
        case(
            "a nurse revokes a user",
            Refused("not_permitted"),
            |l, w| l.sign(&w.ned, revoke_user(&w.alice.id)),
        ),
        case(
            "a user signs a patient registration",
            Refused("not_permitted"),
            |l, w| l.sign(&w.alice, register(&w.stranger)),
        ),
    ];
    check_each(&base, &world, &cases);
}

#[test]
fn encryption_keys_refuse_other_signers_and_malformed_points() {
    // Proves that only a patient (for themselves) or an organisation's admin or node (for
    // the organisation) publishes an encryption key, that the key must be an uncompressed
    // P-256 point (65 bytes, first 0x04) in unpadded base64url, and that a refused
    // publication leaves the key in force untouched.
    let (base, world) = world();
    let cases = [
        case(
            "a clinician publishes a key",
            Refused("not_permitted"),
            |l, w| l.sign(&w.alice, set_encryption_key(fresh_encryption_key())),
        ),
        case(
            "a nurse publishes a key",
            Refused("not_permitted"),
            |l, w| l.sign(&w.ned, set_encryption_key(fresh_encryption_key())),
        ),
        case(
            "a lab technician publishes a key",
            Refused("not_permitted"),
            |l, w| l.sign(&w.lee, set_encryption_key(fresh_encryption_key())),
        ),
        case(
            "the regulator's auditor publishes a key",
            Refused("not_permitted"),
            |l, w| l.sign(&w.ann, set_encryption_key(fresh_encryption_key())),
        ),
        case(
            "the lab's node publishes: the key is the lab's, no other party's",
            Committed,
            |l, w| l.sign(w.node("lab-x"), set_encryption_key(fresh_encryption_key())),
        )
        .then(|l, w| {
            assert_published_key(l, "lab-x", &w.node("lab-x").id);
            assert!(l
                .value::<EncryptionKey>(&keys::encryption_key("hospital-a"))
                .is_none());
        }),
        case("a 64-byte key", Refused("invalid"), |l, w| {
            let bytes = fresh_encryption_key_bytes();
            l.sign(
                w.admin("hospital-a"),
                set_encryption_key(base64url(&bytes[..64])),
            )
        }),
        case(
            "the point's two coordinates without the 0x04 tag (64 bytes)",
            Refused("invalid"),
            |l, w| {
                let bytes = fresh_encryption_key_bytes();
                l.sign(&w.p, set_encryption_key(base64url(&bytes[1..])))
            },
        ),
        case("a 66-byte key", Refused("invalid"), |l, w| {
            let mut bytes = fresh_encryption_key_bytes();
            bytes.push(0);
            l.sign(w.node("hospital-a"), set_encryption_key(base64url(&bytes)))
        }),
        case(
            "a 65-byte key starting with 0x02",
            Refused("invalid"),
            |l, w| {
                let mut bytes = fresh_encryption_key_bytes();
                bytes[0] = 0x02;
                l.sign(&w.p, set_encryption_key(base64url(&bytes)))
            },
        ),
        case(
            "the point compressed (33 bytes, 0x02 or 0x03)",
            Refused("invalid"),
            |l, w| {
                let bytes = fresh_encryption_key_bytes();
                let mut compressed = vec![0x02 | (bytes[64] & 1)];
                compressed.extend_from_slice(&bytes[1..33]);
                l.sign(
                    w.admin("hospital-a"),
                    set_encryption_key(base64url(&compressed)),
                )
            },
        ),
        case("text that is not base64url", Refused("invalid"), |l, w| {
            l.sign(&w.p, set_encryption_key("not base64!".into()))
        }),
        case(
            "a valid key with base64 padding",
            Refused("invalid"),
            |l, w| {
                l.sign(
                    &w.p,
                    set_encryption_key(format!("{}=", fresh_encryption_key())),
                )
            },
        ),
        case(
            "a valid key in the standard base64 alphabet (+ and /)",
            Refused("invalid"),
            |l, w| {
                let standard = std::iter::repeat_with(fresh_encryption_key)
                    .map(|key| key.replace('-', "+").replace('_', "/"))
                    .find(|key| key.contains(['+', '/']))
                    .expect("some key has a character the alphabets spell differently");
                l.sign(&w.p, set_encryption_key(standard))
            },
        ),
        case("an empty key", Refused("invalid"), |l, w| {
            l.sign(w.admin("hospital-a"), set_encryption_key(String::new()))
        }),
        case(
            "a malformed rotation leaves the published key in force",
            Refused("invalid"),
            |l, w| {
                l.commit(
                    w.admin("hospital-a"),
                    set_encryption_key(fresh_encryption_key()),
                );
                let bytes = fresh_encryption_key_bytes();
                l.sign(
                    w.node("hospital-a"),
                    set_encryption_key(base64url(&bytes[..64])),
                )
            },
        )
        .then(|l, w| {
            let stored: EncryptionKey = l.must(&keys::encryption_key("hospital-a"));
            assert_eq!(stored.set_by, w.admin("hospital-a").id);
            assert_eq!(stored.height, l.head.height - 1);
        }),
    ];
    check_each(&base, &world, &cases);
}

#[test]
fn record_creation_refuses_bad_authors_ids_types_cids_versions_and_missing_consent() {
    // Proves that only clinical staff author records, for a registered patient, with a FHIR
    // id, a supported resource type and a CIDv1, one version after another without gaps,
    // keeping the record's patient and type, and only under a consent (or break-glass)
    // that covers writing that type.
    let (base, world) = world();
    let cases = [
        case(
            "a patient creates a record",
            Refused("not_permitted"),
            |l, w| l.sign(&w.p, create(&w.p.id, "obs-9", 1, "Observation")),
        ),
        case(
            "an admin creates a record",
            Refused("not_permitted"),
            |l, w| {
                l.sign(
                    w.admin("hospital-a"),
                    create(&w.p.id, "obs-9", 1, "Observation"),
                )
            },
        ),
        case(
            "an auditor creates a record",
            Refused("not_permitted"),
            |l, w| l.sign(&w.amy, create(&w.p.id, "obs-9", 1, "Observation")),
        ),
        case(
            "a node creates a record",
            Refused("not_permitted"),
            |l, w| {
                l.sign(
                    w.node("hospital-a"),
                    create(&w.p.id, "obs-9", 1, "Observation"),
                )
            },
        ),
        case(
            "a record for an unregistered patient",
            Refused("not_found"),
            |l, w| l.sign(&w.alice, create(&w.stranger.id, "obs-9", 1, "Observation")),
        ),
        case(
            "a record for a patient id that is no pseudonym",
            Refused("invalid"),
            |l, w| l.sign(&w.alice, create("patient-7", "obs-9", 1, "Observation")),
        ),
        case("a record id with a space", Refused("invalid"), |l, w| {
            l.sign(&w.alice, create(&w.p.id, "obs 9", 1, "Observation"))
        }),
        case("a record id with a slash", Refused("invalid"), |l, w| {
            l.sign(&w.alice, create(&w.p.id, "obs/9", 1, "Observation"))
        }),
        case("an empty record id", Refused("invalid"), |l, w| {
            l.sign(&w.alice, create(&w.p.id, "", 1, "Observation"))
        }),
        case(
            "a record id of 65 characters",
            Refused("invalid"),
            |l, w| l.sign(&w.alice, create(&w.p.id, &"a".repeat(65), 1, "Observation")),
        ),
        case("a record id of 64 characters", Committed, |l, w| {
            l.sign(
                &w.alice,
                create(
                    &w.p.id,
                    &format!("{}.-A9", "a".repeat(60)),
                    1,
                    "Observation",
                ),
            )
        }),
        case(
            "an unsupported resource type",
            Refused("invalid"),
            |l, w| l.sign(&w.alice, create(&w.p.id, "obs-9", 1, "Practitioner")),
        ),
        case(
            "a Patient record whose id is not the patient's pseudonym",
            Refused("invalid"),
            |l, w| l.sign(&w.alice, create(&w.p.id, "obs-9", 1, "Patient")),
        ),
        case(
            "a resource type in the wrong case",
            Refused("invalid"),
            |l, w| l.sign(&w.alice, create(&w.p.id, "obs-9", 1, "observation")),
        ),
        case("a CIDv0", Refused("invalid"), |l, w| {
            let v0 = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG";
            l.sign(
                &w.alice,
                create_with_cid(&w.p.id, "obs-9", 1, "Observation", v0),
            )
        }),
        case("a CID in upper case", Refused("invalid"), |l, w| {
            let upper = cid("x").to_uppercase();
            l.sign(
                &w.alice,
                create_with_cid(&w.p.id, "obs-9", 1, "Observation", &upper),
            )
        }),
        case("a CID one character short", Refused("invalid"), |l, w| {
            let short = &cid("x")[..58];
            l.sign(
                &w.alice,
                create_with_cid(&w.p.id, "obs-9", 1, "Observation", short),
            )
        }),
        case("a CID one character long", Refused("invalid"), |l, w| {
            let long = format!("{}a", cid("x"));
            l.sign(
                &w.alice,
                create_with_cid(&w.p.id, "obs-9", 1, "Observation", &long),
            )
        }),
        case(
            "a CID with a digit outside base32",
            Refused("invalid"),
            |l, w| {
                let bad = format!("{}1", &cid("x")[..58]);
                l.sign(
                    &w.alice,
                    create_with_cid(&w.p.id, "obs-9", 1, "Observation", &bad),
                )
            },
        ),
        case(
            "a new record starting at version 2",
            Refused("conflict"),
            |l, w| l.sign(&w.alice, create(&w.p.id, "obs-9", 2, "Observation")),
        ),
        case("a new record at version 0", Refused("conflict"), |l, w| {
            l.sign(&w.alice, create(&w.p.id, "obs-9", 0, "Observation"))
        }),
        case("version 1 again", Refused("conflict"), |l, w| {
            l.sign(&w.alice, create(&w.p.id, "obs-1", 1, "Observation"))
        }),
        case("a version gap", Refused("conflict"), |l, w| {
            l.sign(&w.alice, create(&w.p.id, "obs-1", 3, "Observation"))
        }),
        case(
            "a new version changing the resource type",
            Refused("conflict"),
            |l, w| l.sign(&w.alice, create(&w.p.id, "obs-1", 2, "DiagnosticReport")),
        ),
        case(
            "a new version changing the patient",
            Refused("conflict"),
            |l, w| {
                // Alice may write for Q under her break-glass; the record stays P's.
                l.sign(&w.alice, create(&w.q.id, "obs-1", 2, "Observation"))
            },
        ),
        case("the next version", Committed, |l, w| {
            l.sign(&w.alice, create(&w.p.id, "obs-1", 2, "Observation"))
        }),
        case(
            "a clinician without any consent writes",
            Refused("no_consent"),
            |l, w| l.sign(&w.bob, create(&w.p.id, "obs-9", 1, "Observation")),
        ),
        case(
            "a colleague of the consented clinician writes",
            Refused("no_consent"),
            |l, w| l.sign(&w.ned, create(&w.p.id, "obs-9", 1, "Observation")),
        ),
        case(
            "a type outside the consent's categories",
            Refused("no_consent"),
            |l, w| l.sign(&w.alice, create(&w.p.id, "med-1", 1, "MedicationRequest")),
        ),
        case(
            "a read-only consent does not cover writing",
            Refused("no_consent"),
            |l, w| {
                l.commit(&w.p, grant_observations(to_user(&w.bob.id)));
                l.sign(&w.bob, create(&w.p.id, "obs-9", 1, "Observation"))
            },
        ),
        case("a write under an open break-glass", Committed, |l, w| {
            l.sign(&w.alice, create(&w.q.id, "med-q", 1, "MedicationRequest"))
        }),
        case(
            "a write after the break-glass window",
            Refused("no_consent"),
            |l, w| {
                l.set_time(WORLD_MS + WORLD_BREAK_GLASS_MS);
                l.sign(&w.alice, create(&w.q.id, "med-q", 1, "MedicationRequest"))
            },
        ),
    ];
    check_each(&base, &world, &cases);
}

#[test]
fn a_tombstone_is_a_version_that_deletes_a_live_record_once() {
    // Proves that a delete is a version like any other: the same author roles and the
    // same consent to write, the next version number, kept in the record's version list
    // with its flag; that only an existing, live record can be deleted (not an unknown
    // one, not a deleted one again); and that a later ordinary version recreates it.
    let (base, world) = world();
    let refusals = [
        case(
            "a tombstone of a record that does not exist",
            Refused("not_found"),
            |l, w| l.sign(&w.alice, tombstone(&w.p.id, "obs-9", 1, "Observation")),
        ),
        case(
            "a tombstone numbered as a first version of an existing record",
            Refused("conflict"),
            |l, w| l.sign(&w.alice, tombstone(&w.p.id, "obs-1", 1, "Observation")),
        ),
        case(
            "a tombstone leaving a version gap",
            Refused("conflict"),
            |l, w| l.sign(&w.alice, tombstone(&w.p.id, "obs-1", 3, "Observation")),
        ),
        case(
            "a tombstone signed by the patient",
            Refused("not_permitted"),
            |l, w| l.sign(&w.p, tombstone(&w.p.id, "obs-1", 2, "Observation")),
        ),
        case(
            "a tombstone by a clinician without consent to write",
            Refused("no_consent"),
            |l, w| l.sign(&w.bob, tombstone(&w.p.id, "obs-1", 2, "Observation")),
        ),
        case(
            "a tombstone changing the record's type",
            Refused("conflict"),
            |l, w| l.sign(&w.alice, tombstone(&w.p.id, "obs-1", 2, "Condition")),
        ),
    ];
    check_each(&base, &world, &refusals);

    let mut ledger = base.clone();
    let in_order = [
        case("the tombstone", Committed, |l, w| {
            l.sign(&w.alice, tombstone(&w.p.id, "obs-1", 2, "Observation"))
        })
        .then(|l, w| {
            let record = l.record("hospital-a", "obs-1");
            assert_eq!(record.versions.len(), 2, "the earlier version stays");
            assert!(!record.versions[0].deleted);
            assert!(record.versions[1].deleted, "the new version is a tombstone");
            assert_eq!(record.versions[1].author, w.alice.id);
            assert_eq!(record.versions[1].tx_id, l.last("create_record"));
            let event = l.last_event();
            assert_eq!(event.action, Some(Action::Write));
            assert_eq!(event.records, vec!["hospital-a/obs-1".to_string()]);
        }),
        case(
            "deleting the deleted record again",
            Refused("conflict"),
            |l, w| l.sign(&w.alice, tombstone(&w.p.id, "obs-1", 3, "Observation")),
        ),
        case(
            "a version after the tombstone recreates it",
            Committed,
            |l, w| l.sign(&w.alice, create(&w.p.id, "obs-1", 3, "Observation")),
        )
        .then(|l, _| {
            let record = l.record("hospital-a", "obs-1");
            let flags: Vec<bool> = record.versions.iter().map(|v| v.deleted).collect();
            assert_eq!(flags, vec![false, true, false]);
        }),
        case("and it can be deleted again", Committed, |l, w| {
            l.sign(&w.alice, tombstone(&w.p.id, "obs-1", 4, "Observation"))
        }),
    ];
    check_in_order(&mut ledger, &world, &in_order);
    // Only a tombstone's own value carries the flag: the live record's stored bytes are
    // what they were before the field existed.
    let live: Vec<u8> = base.state[&keys::record("hospital-a", "cond-1")].clone();
    assert!(!String::from_utf8_lossy(&live).contains("deleted"));
    let deleted = &ledger.state[&keys::record("hospital-a", "obs-1")];
    assert_eq!(
        String::from_utf8_lossy(deleted)
            .matches("\"deleted\":true")
            .count(),
        2
    );
}

/// A `create_records` group of the given `create_record` bodies.
fn group(bodies: Vec<TxBody>) -> TxBody {
    TxBody::CreateRecords {
        versions: bodies
            .iter()
            .map(|body| NewRecordVersion::of(body).expect("a create_record"))
            .collect(),
    }
}

#[test]
fn a_group_of_versions_commits_all_of_them_or_none() {
    // Proves the atomic group behind FHIR transactions: one author's signature indexes
    // every version, each under the rules and consent a create_record meets, all sharing
    // the group's transaction id; a group with any refused version writes nothing of any
    // version (check's refusal rule: only the nonce, the id and the event change); a group
    // must hold 2 to RECORD_GROUP_MAX versions of one patient, each record once; and a
    // forged or replayed group is refused at authentication like any transaction.
    let (base, world) = world();
    let cases = [
        case(
            "a group of a new record, a new version and a tombstone",
            Committed,
            |l, w| {
                l.commit(&w.alice, create(&w.p.id, "cond-2", 1, "Condition"));
                l.sign(
                    &w.alice,
                    group(vec![
                        create(&w.p.id, "obs-9", 1, "Observation"),
                        create(&w.p.id, "obs-1", 2, "Observation"),
                        tombstone(&w.p.id, "cond-2", 2, "Condition"),
                    ]),
                )
            },
        )
        .then(|l, w| {
            let id = l.last("create_records");
            let new = l.record("hospital-a", "obs-9");
            let updated = l.record("hospital-a", "obs-1");
            let deleted = l.record("hospital-a", "cond-2");
            assert_eq!(new.versions.len(), 1);
            assert_eq!(updated.versions.len(), 2);
            assert!(deleted.versions[1].deleted);
            for version in [&new.versions[0], &updated.versions[1], &deleted.versions[1]] {
                assert_eq!(version.tx_id, id, "every version names the group");
                assert_eq!(version.author, w.alice.id);
            }
            let event = l.last_event();
            assert_eq!(event.kind, "create_records");
            assert_eq!(event.patient.as_deref(), Some(w.p.id.as_str()));
            assert_eq!(
                event.records,
                vec![
                    "hospital-a/obs-9".to_string(),
                    "hospital-a/obs-1".to_string(),
                    "hospital-a/cond-2".to_string()
                ]
            );
            assert!(event.decision.is_some_and(|d| d.is_granted()));
        }),
        case(
            "a group whose last version the consent does not cover",
            Refused("no_consent"),
            |l, w| {
                l.sign(
                    &w.alice,
                    group(vec![
                        create(&w.p.id, "obs-9", 1, "Observation"),
                        create(&w.p.id, "obs-1", 2, "Observation"),
                        create(&w.p.id, "med-1", 1, "MedicationRequest"),
                    ]),
                )
            },
        )
        .then(|l, _| {
            assert!(l
                .value::<Record>(&keys::record("hospital-a", "obs-9"))
                .is_none());
            assert_eq!(l.record("hospital-a", "obs-1").versions.len(), 1);
        }),
        case(
            "a group whose second version is stale",
            Refused("conflict"),
            |l, w| {
                l.sign(
                    &w.alice,
                    group(vec![
                        create(&w.p.id, "obs-9", 1, "Observation"),
                        create(&w.p.id, "cond-1", 1, "Condition"),
                    ]),
                )
            },
        ),
        case("a group of one version", Refused("invalid"), |l, w| {
            l.sign(
                &w.alice,
                group(vec![create(&w.p.id, "obs-9", 1, "Observation")]),
            )
        }),
        case("an empty group", Refused("invalid"), |l, w| {
            l.sign(&w.alice, group(vec![]))
        }),
        case("a group over the bound", Refused("invalid"), |l, w| {
            let bodies = (0..=RECORD_GROUP_MAX)
                .map(|i| create(&w.p.id, &format!("obs-g{i}"), 1, "Observation"))
                .collect();
            l.sign(&w.alice, group(bodies))
        }),
        case("a group of two patients", Refused("invalid"), |l, w| {
            l.sign(
                &w.alice,
                group(vec![
                    create(&w.p.id, "obs-9", 1, "Observation"),
                    create(&w.q.id, "obs-q", 2, "Observation"),
                ]),
            )
        }),
        case(
            "a group naming one record twice",
            Refused("invalid"),
            |l, w| {
                l.sign(
                    &w.alice,
                    group(vec![
                        create(&w.p.id, "obs-1", 2, "Observation"),
                        create(&w.p.id, "obs-1", 3, "Observation"),
                    ]),
                )
            },
        ),
        case(
            "a group signed by a patient",
            Refused("not_permitted"),
            |l, w| {
                l.sign(
                    &w.p,
                    group(vec![
                        create(&w.p.id, "obs-9", 1, "Observation"),
                        create(&w.p.id, "obs-1", 2, "Observation"),
                    ]),
                )
            },
        ),
        case(
            "a group signed with another clinician's key",
            Unauthenticated("bad_signature"),
            |l, w| {
                let body = group(vec![
                    create(&w.p.id, "obs-9", 1, "Observation"),
                    create(&w.p.id, "obs-1", 2, "Observation"),
                ]);
                let alice = w.alice.id.clone();
                l.sign_with(&w.bob, body, |payload| payload.signer = alice)
            },
        ),
        case("a group replayed", Unauthenticated("duplicate"), |l, w| {
            let tx = l.sign(
                &w.alice,
                group(vec![
                    create(&w.p.id, "obs-9", 1, "Observation"),
                    create(&w.p.id, "obs-1", 2, "Observation"),
                ]),
            );
            l.commit_tx(tx.clone());
            tx
        }),
    ];
    check_each(&base, &world, &cases);
}

#[test]
fn consent_refuses_wrong_signers_bad_grantees_bad_terms_and_stale_answers() {
    // Proves that only the patient grants, revokes and answers, only their own consents
    // and requests, once; that a grantee must exist and never be a node; that terms name
    // a scope of supported types, actions and purposes within the limits; that an expiry
    // lies in the future; and that requests come from staff for a registered patient.
    let (base, world) = world();
    let cases = [
        case("a user signs a grant", Refused("not_permitted"), |l, w| {
            l.sign(&w.alice, grant_observations(to_user(&w.bob.id)))
        }),
        case(
            "a grant to an unknown user",
            Refused("not_found"),
            |l, w| l.sign(&w.p, grant_observations(to_user("ghost@hospital-a"))),
        ),
        case(
            "a grant to an unknown organisation",
            Refused("not_found"),
            |l, w| l.sign(&w.p, grant_observations(to_org("nowhere"))),
        ),
        case(
            "a grant to a role at an unknown organisation",
            Refused("not_found"),
            |l, w| {
                l.sign(
                    &w.p,
                    grant_observations(to_role("nowhere", Role::Clinician)),
                )
            },
        ),
        case("a grant to a node", Refused("invalid"), |l, w| {
            l.sign(&w.p, grant_observations(to_user(&w.node("hospital-a").id)))
        }),
        case("a grant to the node role", Refused("invalid"), |l, w| {
            l.sign(&w.p, grant_observations(to_role("hospital-a", Role::Node)))
        }),
        case("a grant with an empty scope", Refused("invalid"), |l, w| {
            l.sign(
                &w.p,
                grant(
                    to_user(&w.bob.id),
                    types(&[]),
                    &[Action::Read],
                    &[Purpose::Treatment],
                    None,
                ),
            )
        }),
        case(
            "a grant naming an unsupported type",
            Refused("invalid"),
            |l, w| {
                l.sign(
                    &w.p,
                    grant(
                        to_user(&w.bob.id),
                        types(&["Observation", "Practitioner"]),
                        &[Action::Read],
                        &[Purpose::Treatment],
                        None,
                    ),
                )
            },
        ),
        case("a grant naming 33 types", Refused("invalid"), |l, w| {
            let many = vec!["Observation"; LIST_ENTRIES_MAX + 1];
            l.sign(
                &w.p,
                grant(
                    to_user(&w.bob.id),
                    types(&many),
                    &[Action::Read],
                    &[Purpose::Treatment],
                    None,
                ),
            )
        }),
        case("a grant naming 32 types", Committed, |l, w| {
            let many = vec!["Observation"; LIST_ENTRIES_MAX];
            l.sign(
                &w.p,
                grant(
                    to_user(&w.bob.id),
                    types(&many),
                    &[Action::Read],
                    &[Purpose::Treatment],
                    None,
                ),
            )
        }),
        case("a grant with no action", Refused("invalid"), |l, w| {
            l.sign(
                &w.p,
                grant(
                    to_user(&w.bob.id),
                    types(&["Observation"]),
                    &[],
                    &[Purpose::Treatment],
                    None,
                ),
            )
        }),
        case("a grant with no purpose", Refused("invalid"), |l, w| {
            l.sign(
                &w.p,
                grant(
                    to_user(&w.bob.id),
                    types(&["Observation"]),
                    &[Action::Read],
                    &[],
                    None,
                ),
            )
        }),
        case(
            "a grant expiring at the block time",
            Refused("invalid"),
            |l, w| {
                let now = l.now_ms;
                l.sign(
                    &w.p,
                    grant(
                        to_user(&w.bob.id),
                        types(&["Observation"]),
                        &[Action::Read],
                        &[Purpose::Treatment],
                        Some(now),
                    ),
                )
            },
        ),
        case(
            "a grant expiring one millisecond after the block",
            Committed,
            |l, w| {
                let now = l.now_ms;
                l.sign(
                    &w.p,
                    grant(
                        to_user(&w.bob.id),
                        types(&["Observation"]),
                        &[Action::Read],
                        &[Purpose::Treatment],
                        Some(now + 1),
                    ),
                )
            },
        ),
        case(
            "a patient revokes another patient's consent",
            Refused("not_permitted"),
            |l, w| l.sign(&w.q, revoke(w.consent)),
        ),
        case(
            "a user revokes a consent",
            Refused("not_permitted"),
            |l, w| l.sign(&w.alice, revoke(w.consent)),
        ),
        case(
            "revoking an unknown consent",
            Refused("not_found"),
            |l, w| l.sign(&w.p, revoke(Hash::digest(b"no such consent"))),
        ),
        case("revoking a consent twice", Refused("conflict"), |l, w| {
            l.commit(&w.p, revoke(w.consent));
            l.sign(&w.p, revoke(w.consent))
        }),
        case(
            "a node requests access",
            Refused("not_permitted"),
            |l, w| l.sign(w.node("hospital-b"), harmless_request(&w.p)),
        ),
        case(
            "a patient requests access",
            Refused("not_permitted"),
            |l, w| l.sign(&w.q, harmless_request(&w.p)),
        ),
        case(
            "a request to an unregistered patient",
            Refused("not_found"),
            |l, w| l.sign(&w.bob, harmless_request(&w.stranger)),
        ),
        case(
            "a request with an empty scope",
            Refused("invalid"),
            |l, w| {
                l.sign(
                    &w.bob,
                    request(&w.p.id, types(&[]), &[Action::Read], Purpose::Treatment),
                )
            },
        ),
        case(
            "a request naming an unsupported type",
            Refused("invalid"),
            |l, w| {
                l.sign(
                    &w.bob,
                    request(
                        &w.p.id,
                        types(&["Practitioner"]),
                        &[Action::Read],
                        Purpose::Treatment,
                    ),
                )
            },
        ),
        case("a request with no action", Refused("invalid"), |l, w| {
            l.sign(
                &w.bob,
                request(&w.p.id, types(&["Observation"]), &[], Purpose::Treatment),
            )
        }),
        case("an auditor requests access", Committed, |l, w| {
            l.sign(&w.ann, harmless_request(&w.p))
        }),
        case(
            "a patient approves another patient's request",
            Refused("not_permitted"),
            |l, w| l.sign(&w.q, approve(w.request)),
        ),
        case(
            "a patient denies another patient's request",
            Refused("not_permitted"),
            |l, w| l.sign(&w.q, deny(w.request)),
        ),
        case(
            "a user approves a request",
            Refused("not_permitted"),
            |l, w| l.sign(&w.bob, approve(w.request)),
        ),
        case(
            "approving an unknown request",
            Refused("not_found"),
            |l, w| l.sign(&w.p, approve(Hash::digest(b"no such request"))),
        ),
        case(
            "approving with an expiry already past",
            Refused("invalid"),
            |l, w| {
                let now = l.now_ms;
                l.sign(
                    &w.p,
                    TxBody::ApproveRequest {
                        request_id: w.request,
                        expires_at_ms: Some(now),
                    },
                )
            },
        ),
        case("approving a request twice", Refused("conflict"), |l, w| {
            l.commit(&w.p, approve(w.request));
            l.sign(&w.p, approve(w.request))
        }),
        case(
            "denying an approved request",
            Refused("conflict"),
            |l, w| {
                l.commit(&w.p, approve(w.request));
                l.sign(&w.p, deny(w.request))
            },
        ),
        case("approving a denied request", Refused("conflict"), |l, w| {
            l.commit(&w.p, deny(w.request));
            l.sign(&w.p, approve(w.request))
        }),
        case("denying a request twice", Refused("conflict"), |l, w| {
            l.commit(&w.p, deny(w.request));
            l.sign(&w.p, deny(w.request))
        }),
    ];
    check_each(&base, &world, &cases);
}

#[test]
fn break_glass_refuses_non_clinicians_bad_windows_and_bad_reviews() {
    // Proves that only a clinician opens break-glass, for a registered patient, for 1 ms to
    // 12 h; and that only an auditor reviews it, once. Reviewing one's own break-glass is
    // refused because the one role that opens break-glass is not the one that reviews it
    // (a user has one role), which makes the contract's self-review guard unreachable.
    let (base, world) = world();
    let cases = [
        case(
            "a nurse opens break-glass",
            Refused("not_permitted"),
            |l, w| l.sign(&w.ned, open_break_glass(&w.p.id, HOUR_MS)),
        ),
        case(
            "an auditor opens break-glass",
            Refused("not_permitted"),
            |l, w| l.sign(&w.amy, open_break_glass(&w.p.id, HOUR_MS)),
        ),
        case(
            "an admin opens break-glass",
            Refused("not_permitted"),
            |l, w| l.sign(w.admin("hospital-a"), open_break_glass(&w.p.id, HOUR_MS)),
        ),
        case(
            "a patient opens break-glass",
            Refused("not_permitted"),
            |l, w| l.sign(&w.q, open_break_glass(&w.p.id, HOUR_MS)),
        ),
        case(
            "break-glass for an unregistered patient",
            Refused("not_found"),
            |l, w| l.sign(&w.alice, open_break_glass(&w.stranger.id, HOUR_MS)),
        ),
        case("break-glass for 0 ms", Refused("invalid"), |l, w| {
            l.sign(&w.alice, open_break_glass(&w.p.id, 0))
        }),
        case("break-glass for 1 ms", Committed, |l, w| {
            l.sign(&w.alice, open_break_glass(&w.p.id, 1))
        }),
        case("break-glass for the longest window", Committed, |l, w| {
            l.sign(&w.alice, open_break_glass(&w.p.id, BREAK_GLASS_MS_MAX))
        })
        .then(|l, _| {
            let opening = l.break_glass(&l.last("break_glass"));
            assert_eq!(
                opening.ends_at_ms - opening.starts_at_ms,
                BREAK_GLASS_MS_MAX
            );
        }),
        case(
            "break-glass 1 ms longer than the longest window",
            Refused("invalid"),
            |l, w| l.sign(&w.alice, open_break_glass(&w.p.id, BREAK_GLASS_MS_MAX + 1)),
        ),
        case(
            "the clinician reviews her own break-glass",
            Refused("not_permitted"),
            |l, w| l.sign(&w.alice, review(w.break_glass)),
        ),
        case(
            "a nurse reviews a break-glass",
            Refused("not_permitted"),
            |l, w| l.sign(&w.ned, review(w.break_glass)),
        ),
        case(
            "a patient reviews a break-glass",
            Refused("not_permitted"),
            |l, w| l.sign(&w.q, review(w.break_glass)),
        ),
        case(
            "reviewing an unknown break-glass",
            Refused("not_found"),
            |l, w| l.sign(&w.ann, review(Hash::digest(b"no such break-glass"))),
        ),
        case(
            "an auditor of the actor's own organisation reviews",
            Committed,
            |l, w| l.sign(&w.amy, review(w.break_glass)),
        ),
        case(
            "reviewing a break-glass twice",
            Refused("conflict"),
            |l, w| {
                l.commit(&w.ann, review(w.break_glass));
                l.sign(&w.amy, review(w.break_glass))
            },
        ),
    ];
    check_each(&base, &world, &cases);
}

#[test]
fn access_entries_refuse_wrong_signers_and_records_not_of_the_patient_or_custodian() {
    // Proves that only a member's node or admin logs access, to records of the named
    // patient (a bare id at its own organisation, `custodian/record_id` at any), with
    // records for reads and writes, each named once, at most 256 per entry, and 1 to 32
    // supported types for searches, whose custodians (if named) are organisations, each
    // named once.
    let (base, world) = world();
    let cases = [
        case(
            "a clinician logs an access",
            Refused("not_permitted"),
            |l, w| {
                l.sign(
                    &w.alice,
                    read(&w.alice.id, &w.p.id, &["obs-1"], Purpose::Treatment),
                )
            },
        ),
        case(
            "an auditor logs an access",
            Refused("not_permitted"),
            |l, w| {
                l.sign(
                    &w.amy,
                    read(&w.alice.id, &w.p.id, &["obs-1"], Purpose::Treatment),
                )
            },
        ),
        case(
            "a patient logs an access",
            Refused("not_permitted"),
            |l, w| {
                l.sign(
                    &w.p,
                    read(&w.p.id, &w.p.id, &["obs-1"], Purpose::PatientRequest),
                )
            },
        ),
        case("the custodian's admin logs an access", Committed, |l, w| {
            l.sign(
                w.admin("hospital-a"),
                read(&w.alice.id, &w.p.id, &["obs-1"], Purpose::Treatment),
            )
        }),
        case(
            "an entry naming a record of another patient",
            Refused("invalid"),
            |l, w| {
                l.sign(
                    w.node("hospital-a"),
                    read(
                        &w.alice.id,
                        &w.p.id,
                        &["obs-1", "obs-q"],
                        Purpose::Treatment,
                    ),
                )
            },
        ),
        case(
            "a node logs access for another member's user",
            Refused("not_permitted"),
            |l, w| {
                l.sign(
                    w.node("hospital-a"),
                    read(&w.bob.id, &w.p.id, &["obs-1"], Purpose::Treatment),
                )
            },
        ),
        case(
            "a node logs access for an actor that is no user id",
            Refused("not_permitted"),
            |l, w| {
                l.sign(
                    w.node("hospital-a"),
                    read("hospital-a", &w.p.id, &["obs-1"], Purpose::Treatment),
                )
            },
        ),
        case(
            "a bare record id names a record of the signer's organisation",
            Refused("not_found"),
            |l, w| {
                l.sign(
                    w.node("hospital-b"),
                    read(&w.bob.id, &w.p.id, &["obs-1"], Purpose::Treatment),
                )
            },
        ),
        case(
            "a requester's node names a record at another custodian",
            Committed,
            |l, w| l.sign(w.node("hospital-b"), bob_reads_obs_1(w)),
        ),
        case(
            "an entry naming a record twice",
            Refused("invalid"),
            |l, w| {
                l.sign(
                    w.node("hospital-a"),
                    read(
                        &w.alice.id,
                        &w.p.id,
                        &["obs-1", "hospital-a/obs-1"],
                        Purpose::Treatment,
                    ),
                )
            },
        ),
        case("a search naming its custodians", Committed, |l, w| {
            l.sign(
                w.node("hospital-b"),
                search_at(&w.bob.id, &w.p.id, &["hospital-a", "hospital-b"]),
            )
        }),
        case(
            "a search naming an unknown custodian",
            Refused("not_found"),
            |l, w| {
                l.sign(
                    w.node("hospital-b"),
                    search_at(&w.bob.id, &w.p.id, &["hospital-z"]),
                )
            },
        ),
        case(
            "a search naming a custodian twice",
            Refused("invalid"),
            |l, w| {
                l.sign(
                    w.node("hospital-b"),
                    search_at(&w.bob.id, &w.p.id, &["hospital-a", "hospital-a"]),
                )
            },
        ),
        case("a read naming custodians", Refused("invalid"), |l, w| {
            let mut body = bob_reads_obs_1(w);
            if let TxBody::LogAccess { custodians, .. } = &mut body {
                custodians.push("hospital-a".into());
            }
            l.sign(w.node("hospital-b"), body)
        }),
        case(
            "an entry naming an unknown record",
            Refused("not_found"),
            |l, w| {
                l.sign(
                    w.node("hospital-a"),
                    read(&w.alice.id, &w.p.id, &["obs-404"], Purpose::Treatment),
                )
            },
        ),
        case(
            "an entry for an unregistered patient",
            Refused("not_found"),
            |l, w| {
                l.sign(
                    w.node("hospital-a"),
                    search(
                        &w.alice.id,
                        &w.stranger.id,
                        &["Observation"],
                        Purpose::Treatment,
                    ),
                )
            },
        ),
        case("a read naming no record", Refused("invalid"), |l, w| {
            l.sign(
                w.node("hospital-a"),
                read(&w.alice.id, &w.p.id, &[], Purpose::Treatment),
            )
        }),
        case(
            "a read naming resource types",
            Refused("invalid"),
            |l, w| {
                let body = access(
                    &w.alice.id,
                    &w.p.id,
                    Action::Read,
                    &["obs-1"],
                    &["Observation"],
                    Purpose::Treatment,
                    None,
                );
                l.sign(w.node("hospital-a"), body)
            },
        ),
        case("a search naming no type", Refused("invalid"), |l, w| {
            l.sign(
                w.node("hospital-a"),
                search(&w.alice.id, &w.p.id, &[], Purpose::Treatment),
            )
        }),
        case(
            "a search naming an unsupported type",
            Refused("invalid"),
            |l, w| {
                l.sign(
                    w.node("hospital-a"),
                    search(&w.alice.id, &w.p.id, &["Practitioner"], Purpose::Treatment),
                )
            },
        ),
        case("a search naming 33 types", Refused("invalid"), |l, w| {
            let many = vec!["Observation"; LIST_ENTRIES_MAX + 1];
            l.sign(
                w.node("hospital-a"),
                search(&w.alice.id, &w.p.id, &many, Purpose::Treatment),
            )
        }),
        case("an entry naming 257 records", Refused("invalid"), |l, w| {
            let many = vec!["obs-1"; ACCESS_RECORDS_MAX + 1];
            l.sign(
                w.node("hospital-a"),
                read(&w.alice.id, &w.p.id, &many, Purpose::Treatment),
            )
        }),
    ];
    check_each(&base, &world, &cases);
}

// ---- 3. authentication ------------------------------------------------------------------

#[test]
fn authentication_refusals_change_nothing_but_the_log() {
    // Proves that a transaction replayed, reordered, expired, too long-lived, for another
    // chain, forged, from an unknown, malformed, revoked, suspended or out-of-date signer,
    // or oversized, is refused before its contract runs and changes no state but the
    // Merkle log (no nonce, no event); and locates each time boundary to the millisecond.
    let (base, world) = world();
    let cases = [
        case(
            "the same transaction again in a later block",
            Unauthenticated("duplicate"),
            |l, w| {
                let tx = l.sign(&w.p, grant_observations(to_user(&w.bob.id)));
                l.commit_tx(tx.clone());
                l.advance(1_000);
                tx
            },
        ),
        case(
            "a transaction refused by its contract, resubmitted after the cause is gone",
            Unauthenticated("duplicate"),
            |l, w| {
                let tx = l.sign(&w.bob, create(&w.p.id, "obs-9", 1, "Observation"));
                assert_eq!(outcome_code(&l.run1(tx.clone())), "no_consent");
                l.commit(
                    &w.p,
                    grant(
                        to_user(&w.bob.id),
                        types(&["Observation"]),
                        &[Action::Write],
                        &[Purpose::Treatment],
                        None,
                    ),
                );
                tx
            },
        ),
        case(
            "a nonce below the signer's last",
            Unauthenticated("stale_nonce"),
            |l, w| {
                let first = l.sign_with(&w.p, grant_observations(to_user(&w.bob.id)), |p| {
                    p.nonce = 10
                });
                l.commit_tx(first);
                l.sign_with(&w.p, grant_observations(to_org("lab-x")), |p| p.nonce = 9)
            },
        ),
        case(
            "the signer's last nonce with another body",
            Unauthenticated("stale_nonce"),
            |l, w| {
                let first = l.sign_with(&w.p, grant_observations(to_user(&w.bob.id)), |p| {
                    p.nonce = 10
                });
                l.commit_tx(first);
                l.sign_with(&w.p, grant_observations(to_org("lab-x")), |p| p.nonce = 10)
            },
        ),
        case(
            "nonce 0 from a signer who has none yet",
            Unauthenticated("stale_nonce"),
            |l, w| l.sign_with(&w.stranger, register(&w.stranger), |p| p.nonce = 0),
        ),
        case(
            "nonce 1 from a signer who has none yet",
            Committed,
            |l, w| l.sign_with(&w.stranger, register(&w.stranger), |p| p.nonce = 1),
        ),
        case(
            "a nonce far above the last: gaps are allowed",
            Committed,
            |l, w| {
                l.sign_with(&w.p, grant_observations(to_user(&w.bob.id)), |p| {
                    p.nonce = 1_000_000
                })
            },
        ),
        case(
            "expired 1 ms before the block time",
            Unauthenticated("expired"),
            |l, w| {
                let now = l.now_ms;
                l.sign_with(&w.p, grant_observations(to_user(&w.bob.id)), |p| {
                    p.expires_at_ms = now - 1
                })
            },
        ),
        case("expiring at the block time", Committed, |l, w| {
            let now = l.now_ms;
            l.sign_with(&w.p, grant_observations(to_user(&w.bob.id)), |p| {
                p.expires_at_ms = now
            })
        }),
        case(
            "expiring the longest lifetime after the block",
            Committed,
            |l, w| {
                let now = l.now_ms;
                l.sign_with(&w.p, grant_observations(to_user(&w.bob.id)), |p| {
                    p.expires_at_ms = now + TX_LIFETIME_MS_MAX
                })
            },
        ),
        case(
            "expiring 1 ms later than that",
            Unauthenticated("expiry_too_far"),
            |l, w| {
                let now = l.now_ms;
                l.sign_with(&w.p, grant_observations(to_user(&w.bob.id)), |p| {
                    p.expires_at_ms = now + TX_LIFETIME_MS_MAX + 1
                })
            },
        ),
        case(
            "signed for another chain",
            Unauthenticated("wrong_chain"),
            |l, w| {
                l.sign_with(&w.p, grant_observations(to_user(&w.bob.id)), |p| {
                    p.chain_id = "other-chain".into()
                })
            },
        ),
        case(
            "signed with another patient's key",
            Unauthenticated("bad_signature"),
            |l, w| {
                let victim = w.p.id.clone();
                l.sign_with(&w.q, grant_observations(to_user(&w.bob.id)), |p| {
                    p.signer = victim
                })
            },
        ),
        case(
            "signed with another user's key",
            Unauthenticated("bad_signature"),
            |l, w| {
                let victim = w.admin("hospital-a").id.clone();
                l.sign_with(&w.alice, enroll(&w.rita), |p| p.signer = victim)
            },
        ),
        case(
            "one bit of the signature flipped",
            Unauthenticated("bad_signature"),
            |l, w| {
                let mut tx = l.sign(&w.p, grant_observations(to_user(&w.bob.id)));
                tx.signature.0[17] ^= 0x01;
                tx
            },
        ),
        case(
            "the payload changed after signing",
            Unauthenticated("bad_signature"),
            |l, w| {
                let mut tx = l.sign(&w.p, grant_observations(to_user(&w.bob.id)));
                tx.payload.body = grant_observations(to_user(&w.alice.id));
                tx
            },
        ),
        case(
            "a user who is not enrolled",
            Unauthenticated("unknown_signer"),
            |l, w| l.sign(&w.rita, harmless_request(&w.p)),
        ),
        case(
            "a user of an unknown organisation",
            Unauthenticated("unknown_signer"),
            |l, w| {
                l.sign_with(&w.alice, harmless_request(&w.p), |p| {
                    p.signer = "alice@nowhere".into()
                })
            },
        ),
        case(
            "an unregistered patient",
            Unauthenticated("unknown_signer"),
            |l, w| l.sign(&w.stranger, grant_observations(to_user(&w.bob.id))),
        ),
        case(
            "a signer that is neither name@org nor a pseudonym",
            Unauthenticated("malformed_signer"),
            |l, w| {
                l.sign_with(&w.alice, harmless_request(&w.p), |p| {
                    p.signer = "alice".into()
                })
            },
        ),
        case(
            "a signer name in upper case",
            Unauthenticated("malformed_signer"),
            |l, w| {
                l.sign_with(&w.alice, harmless_request(&w.p), |p| {
                    p.signer = "Alice@hospital-a".into()
                })
            },
        ),
        case(
            "a pseudonym in upper case",
            Unauthenticated("malformed_signer"),
            |l, w| {
                let upper = format!("pt-{}", w.p.id[3..].to_uppercase());
                l.sign_with(&w.p, grant_observations(to_user(&w.bob.id)), |p| {
                    p.signer = upper
                })
            },
        ),
        case(
            "a revoked user",
            Unauthenticated("signer_revoked"),
            |l, w| {
                l.commit(w.admin("hospital-a"), revoke_user(&w.ned.id));
                l.sign(&w.ned, harmless_request(&w.p))
            },
        ),
        case(
            "an admin who revoked themselves",
            Unauthenticated("signer_revoked"),
            |l, w| {
                let admin = w.admin("hospital-a");
                l.commit(admin, revoke_user(&admin.id));
                l.sign(admin, enroll(&w.rita))
            },
        ),
        case(
            "a user of a suspended organisation",
            Unauthenticated("org_not_active"),
            |l, w| {
                l.commit(w.admin("regulator"), vote(SUSPEND_LAB_PROPOSAL, true));
                l.sign(&w.lee, harmless_request(&w.p))
            },
        ),
        case(
            "the node of a removed organisation",
            Unauthenticated("org_not_active"),
            |l, w| {
                l.commit(w.admin("hospital-a"), propose(remove("lab-x")));
                l.commit(w.admin("regulator"), vote(3, true));
                l.sign(
                    w.node("lab-x"),
                    search(&w.lee.id, &w.p.id, &["Observation"], Purpose::Treatment),
                )
            },
        ),
        case(
            "a user on the last millisecond of their certificate",
            Committed,
            |l, w| {
                l.set_time(SID_NOT_AFTER_MS);
                l.sign(&w.sid, harmless_request(&w.p))
            },
        ),
        case(
            "a user 1 ms after their certificate ends",
            Unauthenticated("certificate_not_valid"),
            |l, w| {
                l.set_time(SID_NOT_AFTER_MS + 1);
                l.sign(&w.sid, harmless_request(&w.p))
            },
        ),
        case(
            "a user on the last millisecond of the root and CA",
            Committed,
            |l, w| {
                l.set_time(VALIDITY.not_after_ms);
                l.sign(&w.alice, harmless_request(&w.p))
            },
        ),
        case(
            "a user after the root and CA expire",
            Unauthenticated("certificate_not_valid"),
            |l, w| {
                l.set_time(VALIDITY.not_after_ms + 1);
                l.sign(&w.alice, harmless_request(&w.p))
            },
        ),
        case(
            "a registration signed by a key other than the registered one",
            Unauthenticated("bad_signature"),
            |l, w| {
                let pseudonym = w.stranger.id.clone();
                l.sign_with(&w.q, register(&w.stranger), |p| p.signer = pseudonym)
            },
        ),
        case(
            "a registration whose signer is not the key's pseudonym",
            Unauthenticated("invalid"),
            |l, w| l.sign(&w.stranger, register(&w.q)),
        ),
        case(
            "a registered patient registers again",
            Unauthenticated("already_exists"),
            |l, w| l.sign(&w.p, register(&w.p)),
        ),
        case(
            "a transaction over the size limit",
            Unauthenticated("malformed"),
            |l, w| {
                l.sign(
                    w.admin("hospital-a"),
                    TxBody::EnrollUser {
                        certificate: "A".repeat(17 * 1024),
                    },
                )
            },
        ),
    ];
    check_each(&base, &world, &cases);
}

#[test]
fn a_transaction_repeated_within_one_block_commits_once() {
    // Proves that a copy of a transaction later in the same block is refused as a
    // duplicate: the block's own writes count, not only committed state.
    let (mut ledger, world) = world();
    let tx = ledger.sign(&world.p, grant_observations(to_user(&world.bob.id)));
    let outcomes = ledger.run(vec![tx.clone(), tx.clone()]);
    let codes: Vec<String> = outcomes.iter().map(outcome_code).collect();
    assert_eq!(codes, ["committed", "duplicate"]);
    let consents = ledger.consents_in_force(&world.p.id);
    assert_eq!(
        consents
            .iter()
            .filter(|id| **id == tx.id().unwrap())
            .count(),
        1
    );
}

// ---- 4. the access policy ---------------------------------------------------------------

/// A decision as `verdict:ground`, e.g. `granted:consent` or `denied:no_consent`.
fn label(decision: &AccessDecision) -> String {
    let value = serde_json::to_value(decision).expect("decisions encode");
    let verdict = value["decision"]
        .as_str()
        .expect("a decision has a verdict");
    let ground = value
        .get("basis")
        .or_else(|| value.get("reason"))
        .and_then(|g| g.as_str())
        .expect("a decision has a basis or a reason");
    format!("{verdict}:{ground}")
}

/// One row of the policy table.
struct AccessCase {
    what: &'static str,
    /// Prepares the ledger and returns the last block: exactly one access entry, maybe
    /// with other transactions before or after it.
    block: fn(&mut Ledger, &World) -> Vec<SignedTx>,
    /// The decision the ledger records, as `label` spells it.
    expect: &'static str,
}

fn access_case(
    what: &'static str,
    expect: &'static str,
    block: fn(&mut Ledger, &World) -> Vec<SignedTx>,
) -> AccessCase {
    AccessCase {
        what,
        block,
        expect,
    }
}

/// Runs each case on its own fork of `base`: every transaction of the last block commits,
/// the entry records the expected decision in its outcome and its event, the event is
/// flagged exactly for break-glass access, and when the entry ends the block the policy
/// query `decide` gives the same answer on the state after it.
fn check_access(base: &Ledger, world: &World, cases: &[AccessCase]) {
    for case in cases {
        let what = case.what;
        let mut ledger = base.clone();
        let txs = (case.block)(&mut ledger, world);
        let entries: Vec<usize> = txs
            .iter()
            .enumerate()
            .filter(|(_, tx)| matches!(tx.payload.body, TxBody::LogAccess { .. }))
            .map(|(position, _)| position)
            .collect();
        assert_eq!(entries.len(), 1, "{what}: one access entry per case");
        let position = entries[0];
        let first_leaf = ledger.head.log_size;
        let outcomes = ledger.run(txs.clone());
        expect_all_committed(&outcomes, what);
        let TxOutcome::Committed {
            access: Some(decision),
        } = &outcomes[position]
        else {
            panic!("{what}: an access entry commits with a decision");
        };
        assert_eq!(label(decision), case.expect, "{what}: {decision:?}");
        let event = ledger
            .event(first_leaf + position as u64)
            .expect("the entry wrote an event");
        assert_eq!(event.decision.as_ref(), Some(decision), "{what}");
        assert_eq!(
            event.flagged,
            case.expect == "granted:break_glass",
            "{what}: flagged exactly under break-glass"
        );
        let entry = &txs[position];
        let TxBody::LogAccess {
            actor,
            patient,
            action,
            records,
            resource_types,
            purpose,
            custodian_denial: None,
            ..
        } = &entry.payload.body
        else {
            continue;
        };
        if position + 1 != txs.len() {
            continue;
        }
        let (signer_org, _) = split_user_id(&entry.payload.signer).expect("a member signs");
        let mut touched: Vec<String> = Vec::new();
        for name in records {
            let (custodian, record_id) = access_record_name(name, signer_org);
            let record = ledger.record(custodian, record_id);
            if !touched.contains(&record.resource_type) {
                touched.push(record.resource_type);
            }
        }
        for resource_type in resource_types {
            if !touched.contains(resource_type) {
                touched.push(resource_type.clone());
            }
        }
        let state = Overlay::new(&ledger.state);
        let again = decide(
            &state,
            &AccessQuery {
                actor,
                patient,
                action: *action,
                resource_types: &touched,
                purpose: Some(*purpose),
                time_ms: ledger.now_ms,
            },
        );
        assert_eq!(
            &again, decision,
            "{what}: decide agrees with the ledger's entry"
        );
    }
}

/// The actor's own node (hospital-a's for a patient or a stranger) logs `actor` reading
/// `records` of P, all held at hospital-a.
fn read_p(l: &mut Ledger, w: &World, actor: &str, records: &[&str], purpose: Purpose) -> SignedTx {
    let signer = split_user_id(actor)
        .and_then(|(org, _)| w.consortium.org(org))
        .map_or_else(|| w.node("hospital-a"), |org| &org.node);
    let records: Vec<String> = records.iter().map(|r| format!("hospital-a/{r}")).collect();
    let records: Vec<&str> = records.iter().map(String::as_str).collect();
    l.sign(signer, read(actor, &w.p.id, &records, purpose))
}

#[test]
fn the_policy_grants_exactly_what_consent_break_glass_or_the_patient_allows() {
    // Proves the policy's semantics through the ledger's own access entries: grantees
    // (user, role at an organisation, whole organisation, never a node), scope by type
    // and by category, actions (a read consent covers search, not the reverse), purpose,
    // expiry to the millisecond, revocation ordered within a block, break-glass (only
    // for emergencies, only its actor, only inside its window), the patient's own access,
    // custodian denials, and actors who are unknown, revoked or of a suspended member.
    let (base, world) = world();
    let cases = [
        access_case(
            "a consent to a user grants that user",
            "granted:consent",
            |l, w| vec![read_p(l, w, &w.alice.id, &["obs-1"], Purpose::Treatment)],
        ),
        access_case(
            "a consent to a user grants no colleague",
            "denied:no_consent",
            |l, w| vec![read_p(l, w, &w.ned.id, &["obs-1"], Purpose::Treatment)],
        ),
        access_case(
            "a consent to a role grants its holders",
            "granted:consent",
            |l, w| {
                l.commit(&w.p, grant_observations(to_role("hospital-a", Role::Nurse)));
                vec![read_p(l, w, &w.ned.id, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "a consent to a role grants no other role there",
            "denied:no_consent",
            |l, w| {
                l.commit(&w.p, grant_observations(to_role("hospital-a", Role::Nurse)));
                vec![read_p(l, w, &w.amy.id, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "a consent to a role grants no holder elsewhere",
            "denied:no_consent",
            |l, w| {
                l.commit(
                    &w.p,
                    grant_observations(to_role("hospital-a", Role::Clinician)),
                );
                vec![read_p(l, w, &w.bob.id, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "a consent to an organisation grants its users",
            "granted:consent",
            |l, w| {
                l.commit(&w.p, grant_observations(to_org("hospital-b")));
                vec![read_p(l, w, &w.bob.id, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "a consent to an organisation never grants its node",
            "denied:role_not_permitted",
            |l, w| {
                l.commit(&w.p, grant_observations(to_org("hospital-b")));
                let node = w.node("hospital-b").id.clone();
                vec![read_p(l, w, &node, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "a node is refused even by its own custodian",
            "denied:role_not_permitted",
            |l, w| {
                let node = w.node("hospital-a").id.clone();
                vec![read_p(l, w, &node, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "a scope by type covers that type",
            "granted:consent",
            |l, w| {
                l.commit(&w.p, grant_observations(to_user(&w.bob.id)));
                vec![read_p(l, w, &w.bob.id, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "a scope by type covers no other type",
            "denied:no_consent",
            |l, w| {
                l.commit(&w.p, grant_observations(to_user(&w.bob.id)));
                vec![read_p(l, w, &w.bob.id, &["cond-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "every record of a read must be covered",
            "denied:no_consent",
            |l, w| {
                l.commit(&w.p, grant_observations(to_user(&w.bob.id)));
                vec![read_p(
                    l,
                    w,
                    &w.bob.id,
                    &["obs-1", "cond-1"],
                    Purpose::Treatment,
                )]
            },
        ),
        access_case(
            "a scope by category covers each of its types",
            "granted:consent",
            |l, w| {
                vec![l.sign(
                    w.node("hospital-a"),
                    search(
                        &w.alice.id,
                        &w.p.id,
                        &["Specimen", "ImagingStudy", "Procedure"],
                        Purpose::Treatment,
                    ),
                )]
            },
        ),
        access_case(
            "a scope by category covers no other category",
            "denied:no_consent",
            |l, w| {
                vec![l.sign(
                    w.node("hospital-a"),
                    search(
                        &w.alice.id,
                        &w.p.id,
                        &["Observation", "MedicationRequest"],
                        Purpose::Treatment,
                    ),
                )]
            },
        ),
        access_case(
            "a purpose the consent does not name",
            "denied:no_consent",
            |l, w| vec![read_p(l, w, &w.alice.id, &["obs-1"], Purpose::Research)],
        ),
        access_case("a read consent covers search", "granted:consent", |l, w| {
            l.commit(&w.p, grant_observations(to_user(&w.bob.id)));
            vec![l.sign(
                w.node("hospital-b"),
                search(&w.bob.id, &w.p.id, &["Observation"], Purpose::Treatment),
            )]
        }),
        access_case(
            "a search consent does not cover read",
            "denied:no_consent",
            |l, w| {
                l.commit(
                    &w.p,
                    grant(
                        to_user(&w.bob.id),
                        types(&["Observation"]),
                        &[Action::Search],
                        &[Purpose::Treatment],
                        None,
                    ),
                );
                vec![read_p(l, w, &w.bob.id, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "a write consent does not cover read",
            "denied:no_consent",
            |l, w| {
                l.commit(
                    &w.p,
                    grant(
                        to_user(&w.bob.id),
                        types(&["Observation"]),
                        &[Action::Write],
                        &[Purpose::Treatment],
                        None,
                    ),
                );
                vec![read_p(l, w, &w.bob.id, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "a consent 1 ms before its expiry",
            "granted:consent",
            |l, w| {
                let end = l.now_ms + HOUR_MS;
                l.commit(
                    &w.p,
                    grant(
                        to_user(&w.bob.id),
                        types(&["Observation"]),
                        &[Action::Read],
                        &[Purpose::Treatment],
                        Some(end),
                    ),
                );
                l.set_time(end - 1);
                vec![read_p(l, w, &w.bob.id, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case("a consent at its expiry", "denied:no_consent", |l, w| {
            let end = l.now_ms + HOUR_MS;
            l.commit(
                &w.p,
                grant(
                    to_user(&w.bob.id),
                    types(&["Observation"]),
                    &[Action::Read],
                    &[Purpose::Treatment],
                    Some(end),
                ),
            );
            l.set_time(end);
            vec![read_p(l, w, &w.bob.id, &["obs-1"], Purpose::Treatment)]
        }),
        access_case(
            "an approved request grants its requester",
            "granted:consent",
            |l, w| {
                l.commit(&w.p, approve(w.request));
                vec![read_p(l, w, &w.bob.id, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "a denied request grants nothing",
            "denied:no_consent",
            |l, w| {
                l.commit(&w.p, deny(w.request));
                vec![read_p(l, w, &w.bob.id, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "a revoke in an earlier block",
            "denied:no_consent",
            |l, w| {
                l.commit(&w.p, revoke(w.consent));
                vec![read_p(l, w, &w.alice.id, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "a revoke earlier in the same block takes effect",
            "denied:no_consent",
            |l, w| {
                let withdrawal = l.sign(&w.p, revoke(w.consent));
                vec![
                    withdrawal,
                    read_p(l, w, &w.alice.id, &["obs-1"], Purpose::Treatment),
                ]
            },
        ),
        access_case(
            "an access earlier in the block than the revoke is granted",
            "granted:consent",
            |l, w| {
                let entry = read_p(l, w, &w.alice.id, &["obs-1"], Purpose::Treatment);
                vec![entry, l.sign(&w.p, revoke(w.consent))]
            },
        ),
        access_case(
            "break-glass grants its actor for an emergency",
            "granted:break_glass",
            |l, w| {
                vec![l.sign(
                    w.node("hospital-a"),
                    read(&w.alice.id, &w.q.id, &["obs-q"], Purpose::Emergency),
                )]
            },
        ),
        access_case(
            "break-glass covers no other purpose",
            "denied:no_consent",
            |l, w| {
                vec![l.sign(
                    w.node("hospital-a"),
                    read(&w.alice.id, &w.q.id, &["obs-q"], Purpose::Treatment),
                )]
            },
        ),
        access_case(
            "break-glass grants nobody but its actor",
            "denied:no_consent",
            |l, w| {
                vec![l.sign(
                    w.node("hospital-b"),
                    read(
                        &w.bob.id,
                        &w.q.id,
                        &["hospital-a/obs-q"],
                        Purpose::Emergency,
                    ),
                )]
            },
        ),
        access_case(
            "break-glass for one patient grants nothing for another",
            "denied:no_consent",
            |l, w| {
                vec![l.sign(
                    w.node("hospital-a"),
                    search(
                        &w.alice.id,
                        &w.p.id,
                        &["MedicationRequest"],
                        Purpose::Emergency,
                    ),
                )]
            },
        ),
        access_case(
            "break-glass 1 ms before its window ends",
            "granted:break_glass",
            |l, w| {
                l.set_time(WORLD_MS + WORLD_BREAK_GLASS_MS - 1);
                vec![l.sign(
                    w.node("hospital-a"),
                    read(&w.alice.id, &w.q.id, &["obs-q"], Purpose::Emergency),
                )]
            },
        ),
        access_case(
            "break-glass when its window ends",
            "denied:no_consent",
            |l, w| {
                l.set_time(WORLD_MS + WORLD_BREAK_GLASS_MS);
                vec![l.sign(
                    w.node("hospital-a"),
                    read(&w.alice.id, &w.q.id, &["obs-q"], Purpose::Emergency),
                )]
            },
        ),
        access_case(
            "break-glass covers what a consent leaves out",
            "granted:break_glass",
            |l, w| {
                l.commit(&w.q, grant_observations(to_user(&w.alice.id)));
                vec![l.sign(
                    w.node("hospital-a"),
                    search(
                        &w.alice.id,
                        &w.q.id,
                        &["Observation", "MedicationRequest"],
                        Purpose::Emergency,
                    ),
                )]
            },
        ),
        access_case(
            "the patient reads their own records",
            "granted:patient",
            |l, w| {
                let me = w.p.id.clone();
                vec![read_p(
                    l,
                    w,
                    &me,
                    &["obs-1", "cond-1"],
                    Purpose::PatientRequest,
                )]
            },
        ),
        access_case(
            "a patient reads no other patient's records",
            "denied:no_consent",
            |l, w| {
                let other = w.q.id.clone();
                vec![read_p(l, w, &other, &["obs-1"], Purpose::PatientRequest)]
            },
        ),
        access_case(
            "a custodian denial stands for the patient",
            "denied:custodian",
            |l, w| {
                let body = access(
                    &w.p.id,
                    &w.p.id,
                    Action::Read,
                    &["obs-1"],
                    &[],
                    Purpose::PatientRequest,
                    Some(DenialReason::Unauthenticated),
                );
                vec![l.sign(w.node("hospital-a"), body)]
            },
        ),
        access_case(
            "a custodian denial stands under a consent",
            "denied:custodian",
            |l, w| {
                let body = access(
                    &w.alice.id,
                    &w.p.id,
                    Action::Search,
                    &[],
                    &["Observation"],
                    Purpose::Treatment,
                    Some(DenialReason::InvalidRequest),
                );
                vec![l.sign(w.node("hospital-a"), body)]
            },
        ),
        access_case(
            "an actor who is not enrolled",
            "denied:unknown_actor",
            |l, w| {
                vec![read_p(
                    l,
                    w,
                    "ghost@hospital-a",
                    &["obs-1"],
                    Purpose::Treatment,
                )]
            },
        ),
        access_case(
            "an actor that is no identity",
            "denied:unknown_actor",
            |l, w| {
                vec![read_p(
                    l,
                    w,
                    "nobody@hospital-a",
                    &["obs-1"],
                    Purpose::Treatment,
                )]
            },
        ),
        access_case(
            "a revoked actor, even with consent",
            "denied:actor_not_active",
            |l, w| {
                l.commit(w.admin("hospital-a"), revoke_user(&w.alice.id));
                vec![read_p(l, w, &w.alice.id, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "an actor whose certificate has ended",
            "denied:actor_not_active",
            |l, w| {
                l.commit(&w.p, grant_observations(to_user(&w.sid.id)));
                l.set_time(SID_NOT_AFTER_MS + 1);
                vec![read_p(l, w, &w.sid.id, &["obs-1"], Purpose::Treatment)]
            },
        ),
        access_case(
            "an actor on their certificate's last millisecond",
            "granted:consent",
            |l, w| {
                l.commit(&w.p, grant_observations(to_user(&w.sid.id)));
                l.set_time(SID_NOT_AFTER_MS);
                vec![read_p(l, w, &w.sid.id, &["obs-1"], Purpose::Treatment)]
            },
        ),
    ];
    check_access(&base, &world, &cases);

    // An actor of a suspended organisation, even with consent: its node signs nothing any
    // more, so the entry is refused, and a custodian asking the policy is refused too.
    let mut ledger = base.clone();
    ledger.commit(&world.p, grant_observations(to_user(&world.lee.id)));
    ledger.commit(world.admin("regulator"), vote(SUSPEND_LAB_PROPOSAL, true));
    assert_eq!(
        label(&decide_read(
            &ledger,
            &world.lee.id,
            &world.p.id,
            "Observation"
        )),
        "denied:org_not_active"
    );
    let entry = read_p(
        &mut ledger,
        &world,
        &world.lee.id,
        &["obs-1"],
        Purpose::Treatment,
    );
    let outcomes = ledger.run(vec![entry]);
    assert_eq!(outcome_code(&outcomes[0]), "org_not_active");
}

// ---- 5. audit events ----------------------------------------------------------------------

/// What the audit event of one transaction must say, beyond kind, signer, id and time.
struct ExpectedEvent {
    patient: Option<String>,
    actor: Option<String>,
    records: Vec<String>,
    flagged: bool,
    rejected: Option<&'static str>,
}

fn event_of(patient: Option<&str>, actor: Option<&str>, records: &[&str]) -> ExpectedEvent {
    ExpectedEvent {
        patient: patient.map(str::to_string),
        actor: actor.map(str::to_string),
        records: records.iter().map(|r| r.to_string()).collect(),
        flagged: false,
        rejected: None,
    }
}

#[test]
fn every_authenticated_transaction_writes_an_indexed_audit_event() {
    // Proves that each authenticated transaction, committed or refused by its contract,
    // writes the event at its leaf index with its kind, signer, patient, actor, records
    // and refusal, indexed by patient, by signer and actor, and by record; that an
    // unauthenticated one writes none; and that the block writes no other index key.
    let (mut ledger, w) = world();
    let (p, q) = (w.p.id.clone(), w.q.id.clone());
    let node_a = w.node("hospital-a");
    let admin_a = w.admin("hospital-a");
    let flagged = |mut e: ExpectedEvent| {
        e.flagged = true;
        e
    };
    let rejected = |mut e: ExpectedEvent, code| {
        e.rejected = Some(code);
        e
    };
    let rows: Vec<(SignedTx, Option<ExpectedEvent>)> = vec![
        (
            ledger.sign(&w.stranger, register(&w.stranger)),
            Some(event_of(Some(&w.stranger.id), None, &[])),
        ),
        (
            ledger.sign(admin_a, enroll(&w.rita)),
            Some(event_of(None, Some(&w.rita.id), &[])),
        ),
        (
            ledger.sign(admin_a, revoke_user(&w.ned.id)),
            Some(event_of(None, Some(&w.ned.id), &[])),
        ),
        (
            ledger.sign(&w.alice, create(&p, "obs-2", 1, "Observation")),
            Some(event_of(Some(&p), None, &["hospital-a/obs-2"])),
        ),
        (
            ledger.sign(&w.bob, create(&p, "obs-3", 1, "Observation")),
            Some(rejected(
                event_of(Some(&p), None, &["hospital-b/obs-3"]),
                "no_consent",
            )),
        ),
        (
            ledger.sign(&w.p, grant_observations(to_org("hospital-b"))),
            Some(event_of(Some(&p), None, &[])),
        ),
        (
            ledger.sign(&w.p, revoke(w.consent)),
            Some(event_of(Some(&p), None, &[])),
        ),
        (
            ledger.sign(&w.q, revoke(w.consent)),
            Some(rejected(event_of(Some(&q), None, &[]), "not_permitted")),
        ),
        (
            ledger.sign(&w.lee, harmless_request(&w.p)),
            Some(event_of(Some(&p), None, &[])),
        ),
        (
            ledger.sign(&w.p, approve(w.request)),
            Some(event_of(Some(&p), Some(&w.bob.id), &[])),
        ),
        (
            ledger.sign(&w.alice, open_break_glass(&p, HOUR_MS)),
            Some(flagged(event_of(Some(&p), None, &[]))),
        ),
        (
            ledger.sign(&w.ann, review(w.break_glass)),
            Some(event_of(Some(&q), Some(&w.alice.id), &[])),
        ),
        (
            ledger.sign(
                node_a,
                read(&w.alice.id, &q, &["obs-q"], Purpose::Emergency),
            ),
            Some(flagged(event_of(
                Some(&q),
                Some(&w.alice.id),
                &["hospital-a/obs-q"],
            ))),
        ),
        (
            ledger.sign(
                w.node("hospital-b"),
                read(
                    &w.bob.id,
                    &p,
                    &["hospital-a/obs-1", "hospital-a/cond-1"],
                    Purpose::Treatment,
                ),
            ),
            Some(event_of(
                Some(&p),
                Some(&w.bob.id),
                &["hospital-a/obs-1", "hospital-a/cond-1"],
            )),
        ),
        (
            ledger.sign(w.admin("hospital-b"), vote(ADMIT_CLINIC_PROPOSAL, true)),
            Some(event_of(None, None, &[])),
        ),
        // An encryption key's event names the patient who publishes, even when refused,
        // and no patient for an organisation's key.
        (
            ledger.sign(&w.q, set_encryption_key(fresh_encryption_key())),
            Some(event_of(Some(&q), None, &[])),
        ),
        (
            ledger.sign(admin_a, set_encryption_key(fresh_encryption_key())),
            Some(event_of(None, None, &[])),
        ),
        (
            ledger.sign(&w.p, set_encryption_key("not base64!".into())),
            Some(rejected(event_of(Some(&p), None, &[]), "invalid")),
        ),
        (
            ledger.sign(&w.alice, set_encryption_key(fresh_encryption_key())),
            Some(rejected(event_of(None, None, &[]), "not_permitted")),
        ),
        (
            ledger.sign_with(&w.p, grant_observations(to_user(&w.bob.id)), |t| {
                t.chain_id = "other-chain".into()
            }),
            None,
        ),
    ];
    let first_leaf = ledger.head.log_size;
    let before = ledger.state.clone();
    let txs: Vec<SignedTx> = rows.iter().map(|(tx, _)| tx.clone()).collect();
    let outcomes = ledger.run(txs);
    let mut expected_index = BTreeSet::new();
    for (position, ((tx, expected), outcome)) in rows.iter().zip(&outcomes).enumerate() {
        let leaf = first_leaf + position as u64;
        let what = format!("transaction {position} ({})", tx.payload.body.kind());
        let Some(expected) = expected else {
            assert!(!outcome.is_committed(), "{what}");
            assert!(
                ledger.event(leaf).is_none(),
                "{what}: no event without authentication"
            );
            continue;
        };
        let code = outcome_code(outcome);
        assert_eq!(
            code,
            expected.rejected.unwrap_or("committed"),
            "{what}: {outcome:?}"
        );
        let event = ledger
            .event(leaf)
            .unwrap_or_else(|| panic!("{what}: an event"));
        assert_eq!(event.leaf_index, leaf, "{what}");
        assert_eq!(event.kind, tx.payload.body.kind(), "{what}");
        assert_eq!(event.signer, tx.payload.signer, "{what}");
        assert_eq!(event.tx_id, tx.id().unwrap(), "{what}");
        assert_eq!(
            (event.height, event.time_ms),
            (ledger.head.height, ledger.now_ms),
            "{what}"
        );
        assert_eq!(event.patient, expected.patient, "{what}");
        assert_eq!(event.actor, expected.actor, "{what}");
        assert_eq!(event.records, expected.records, "{what}");
        assert_eq!(event.flagged, expected.flagged, "{what}");
        assert_eq!(event.rejected.as_deref(), expected.rejected, "{what}");
        assert_eq!(
            ledger.value::<u64>(&keys::tx(&event.tx_id)),
            Some(leaf),
            "{what}"
        );
        if let Some(patient) = &event.patient {
            expected_index.insert(keys::event_by_patient(patient, leaf));
        }
        expected_index.insert(keys::event_by_actor(&event.signer, leaf));
        if let Some(actor) = &event.actor {
            expected_index.insert(keys::event_by_actor(actor, leaf));
        }
        for record in &event.records {
            let (custodian, record_id) = record.split_once('/').expect("custodian/record_id");
            expected_index.insert(keys::event_by_record(custodian, record_id, leaf));
        }
    }
    let written_index: BTreeSet<String> = changed_keys(&before, &ledger.state)
        .into_iter()
        .filter(|key| key.starts_with("event_by_"))
        .collect();
    assert_eq!(
        written_index, expected_index,
        "the block's index keys are exactly its events'"
    );
}

/// True unless `key` is an audit index key other than `<index>/<well-formed id>/<16 hex
/// digits>`: only then does a range scan of one id's prefix find only that id's entries.
fn index_key_well_formed(key: &str) -> bool {
    let well_formed = |rest: &str, id_ok: &dyn Fn(&str) -> bool| {
        rest.rsplit_once('/').is_some_and(|(id, leaf)| {
            id_ok(id) && leaf.len() == 16 && leaf.bytes().all(|b| b.is_ascii_hexdigit())
        })
    };
    if let Some(rest) = key.strip_prefix("event_by_patient/") {
        well_formed(rest, &|id| is_patient_pseudonym(id))
    } else if let Some(rest) = key.strip_prefix("event_by_actor/") {
        well_formed(rest, &|id| {
            is_patient_pseudonym(id) || split_user_id(id).is_some()
        })
    } else if let Some(rest) = key.strip_prefix("event_by_record/") {
        well_formed(rest, &|id| {
            id.split_once('/').is_some_and(|(custodian, record_id)| {
                is_valid_name(custodian) && is_valid_record_id(record_id)
            })
        })
    } else {
        true
    }
}

#[test]
fn refused_transactions_cannot_plant_keys_in_another_identifiers_index() {
    // Proves that identifiers no contract has validated (a patient, actor or record id
    // carrying a '/') are kept in the audit event but never become index keys: otherwise
    // a refused request for "pt-<P>/0" would plant a key inside P's own index range
    // whose suffix is not a leaf index, and break every listing of P's audit trail.
    let (mut ledger, w) = world();
    let p = w.p.id.clone();
    let first_leaf = ledger.head.log_size;
    let txs = vec![
        ledger.sign(
            &w.bob,
            request(
                &format!("{p}/0"),
                types(&["Observation"]),
                &[Action::Read],
                Purpose::Treatment,
            ),
        ),
        ledger.sign(&w.alice, open_break_glass(&format!("{p}/0"), HOUR_MS)),
        ledger.sign(&w.alice, create(&p, "obs-1/0", 1, "Observation")),
        ledger.sign(
            w.node("hospital-a"),
            read(
                &format!("{}/0", w.alice.id),
                &p,
                &["obs-1"],
                Purpose::Treatment,
            ),
        ),
    ];
    let codes: Vec<String> = ledger.run(txs).iter().map(outcome_code).collect();
    // An access entry is only ever for a well-formed user of the signer's organisation or
    // a patient: this one is refused outright.
    assert_eq!(codes, ["invalid", "invalid", "invalid", "not_permitted"]);
    for position in 0..4 {
        assert!(
            ledger.event(first_leaf + position).is_some(),
            "the attempt stays in the audit trail"
        );
    }
    for key in ledger.state.keys() {
        assert!(index_key_well_formed(key), "planted index key {key:?}");
    }
}

// ---- 6. determinism ---------------------------------------------------------------------

/// SplitMix64: a small, fixed pseudo-random generator, so a seed names a sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    /// Each item with probability 2/5, in order.
    fn some<T: Clone>(&mut self, items: &[T]) -> Vec<T> {
        items.iter().filter(|_| self.chance(40)).cloned().collect()
    }
}

/// What the generator knows of the transactions it made: ids later ones can refer to.
struct Generated {
    nonces: BTreeMap<String, u64>,
    consents: Vec<Hash>,
    requests: Vec<Hash>,
    openings: Vec<Hash>,
    signed: Vec<SignedTx>,
}

/// A random body and its signer: every kind, with valid and invalid arguments.
fn random_body<'w>(
    rng: &mut Rng,
    generated: &Generated,
    w: &'w World,
    now_ms: u64,
) -> (&'w Identity, TxBody) {
    let patients = [&w.p, &w.q];
    // The last id is P's with a '/' appended: refused, and never indexed under P.
    let patient_ids = [
        w.p.id.clone(),
        w.q.id.clone(),
        w.stranger.id.clone(),
        format!("{}/0", w.p.id),
    ];
    let staff = [&w.alice, &w.ned, &w.amy, &w.bob, &w.lee, &w.ann, &w.sid];
    let admins: Vec<&Identity> = FOUNDERS.iter().map(|(org, _)| w.admin(org)).collect();
    let custodians: Vec<&Identity> = FOUNDERS
        .iter()
        .map(|(org, _)| w.node(org))
        .chain([w.admin("hospital-a"), &w.alice])
        .collect();
    let actors = [
        w.alice.id.clone(),
        w.ned.id.clone(),
        w.bob.id.clone(),
        w.lee.id.clone(),
        w.p.id.clone(),
        w.q.id.clone(),
        w.node("hospital-a").id.clone(),
        "ghost@hospital-a".to_string(),
    ];
    let records = ["obs-1", "cond-1", "obs-q", "rec-a", "rec-b"];
    let resource_types = [
        "Observation",
        "Condition",
        "MedicationRequest",
        "Encounter",
        "Patient",
    ];
    let all_categories = [
        Category::Diagnostics,
        Category::Conditions,
        Category::Medications,
    ];
    let all_actions = [Action::Read, Action::Write, Action::Search];
    let all_purposes = [
        Purpose::Treatment,
        Purpose::Emergency,
        Purpose::Research,
        Purpose::PatientRequest,
    ];
    let known = |rng: &mut Rng, ids: &[Hash]| {
        if ids.is_empty() || rng.chance(10) {
            Hash::digest(&rng.next().to_be_bytes())
        } else {
            *rng.pick(ids)
        }
    };
    let scope = |rng: &mut Rng| Scope {
        resource_types: rng
            .some(&resource_types)
            .into_iter()
            .map(str::to_string)
            .collect(),
        categories: rng.some(&all_categories),
    };
    let orgs = ["hospital-a", "hospital-b", "lab-x", "regulator"];
    match rng.below(15) {
        0 => {
            let grantee = match rng.below(7) {
                0 => to_user(&w.alice.id),
                1 => to_user(&w.bob.id),
                2 => to_user(&w.lee.id),
                3 => to_user(&w.node("hospital-a").id),
                4 => to_role("hospital-a", Role::Nurse),
                5 => to_org("hospital-b"),
                _ => to_org(if rng.chance(50) { "lab-x" } else { "nowhere" }),
            };
            let expires_at_ms = rng.chance(30).then(|| now_ms + rng.below(4 * HOUR_MS));
            let signer = if rng.chance(10) {
                &w.alice
            } else {
                *rng.pick(&patients)
            };
            let body = TxBody::Grant {
                grantee,
                scope: scope(rng),
                actions: rng.some(&all_actions),
                purposes: rng.some(&all_purposes),
                expires_at_ms,
            };
            (signer, body)
        }
        1 => (
            *rng.pick(&patients),
            revoke(known(rng, &generated.consents)),
        ),
        2 => {
            let signer = *rng.pick(&[&w.bob, &w.lee, &w.alice, &w.ann, w.node("hospital-b")]);
            let body = TxBody::RequestAccess {
                patient: rng.pick(&patient_ids).clone(),
                scope: scope(rng),
                actions: rng.some(&all_actions),
                purpose: *rng.pick(&all_purposes),
            };
            (signer, body)
        }
        3 => {
            let id = known(rng, &generated.requests);
            let body = if rng.chance(60) {
                TxBody::ApproveRequest {
                    request_id: id,
                    expires_at_ms: rng.chance(20).then(|| now_ms + rng.below(2 * HOUR_MS)),
                }
            } else {
                deny(id)
            };
            (*rng.pick(&patients), body)
        }
        4 => {
            let signer = *rng.pick(&[&w.alice, &w.bob, &w.ned]);
            let duration = *rng.pick(&[0, HOUR_MS, BREAK_GLASS_MS_MAX, BREAK_GLASS_MS_MAX + 1]);
            let patient = rng.pick(&patient_ids).clone();
            (signer, open_break_glass(&patient, duration))
        }
        5 => {
            let signer = *rng.pick(&[&w.ann, &w.amy, &w.alice]);
            (signer, review(known(rng, &generated.openings)))
        }
        6 => {
            let signer = *rng.pick(&staff);
            let patient = rng.pick(&patient_ids).clone();
            let record_id = *rng.pick(&records);
            let version = rng.below(4);
            let resource_type = *rng.pick(&resource_types);
            let body = create(&patient, record_id, version, resource_type);
            (signer, body)
        }
        7 => {
            // Mostly hospital-a's node naming P's records there, so that entries commit;
            // sometimes another signer, patient or record, so that they are refused.
            let signer = if rng.chance(50) {
                w.node("hospital-a")
            } else {
                *rng.pick(&custodians)
            };
            let action = *rng.pick(&all_actions);
            let mut named = rng.some(&["obs-1", "cond-1"]);
            if rng.chance(15) {
                named.push(*rng.pick(&records));
            }
            let searched = rng.some(&resource_types[..4]);
            let denial = rng.chance(10).then_some(DenialReason::NotFound);
            let actor = rng.pick(&actors).clone();
            let patient = if rng.chance(70) {
                w.p.id.clone()
            } else {
                rng.pick(&patient_ids).clone()
            };
            let body = access(
                &actor,
                &patient,
                action,
                &named,
                if action == Action::Search {
                    &searched
                } else {
                    &[]
                },
                *rng.pick(&all_purposes),
                denial,
            );
            (signer, body)
        }
        8 => {
            let member = *rng.pick(&[&w.rita, &w.sam, &w.old, &w.early, &w.cole, &w.alice]);
            (*rng.pick(&admins), enroll(member))
        }
        9 => {
            let user = rng.pick(&staff).id.clone();
            (*rng.pick(&admins), revoke_user(&user))
        }
        10 => {
            let org = rng.pick(&orgs).to_string();
            let action = match rng.below(3) {
                0 => GovernanceAction::SuspendOrg { org },
                1 => GovernanceAction::ReinstateOrg { org },
                _ => GovernanceAction::RemoveOrg { org },
            };
            (*rng.pick(&admins), propose(action))
        }
        11 => (*rng.pick(&admins), vote(1 + rng.below(5), rng.chance(70))),
        12 => {
            if rng.chance(50) {
                (&w.stranger, register(&w.stranger))
            } else {
                (&w.p, register(&w.p))
            }
        }
        13 => {
            // Mostly a patient, admin or node with one of a few fixed keys, so that keys
            // are replaced; sometimes staff or a spoiled key, so that they are refused.
            let signer = *rng.pick(&[
                &w.p,
                &w.q,
                &w.stranger,
                w.admin("hospital-a"),
                w.node("hospital-b"),
                w.node("lab-x"),
                &w.alice,
                &w.ann,
            ]);
            let key = fixed_encryption_key(1 + rng.below(3) as u8);
            let public_key = match rng.below(8) {
                0 => {
                    let mut bytes = from_base64url(&key).expect("a fixed key is base64url");
                    bytes[0] = 0x02;
                    base64url(&bytes)
                }
                1 => {
                    let bytes = from_base64url(&key).expect("a fixed key is base64url");
                    base64url(&bytes[..64])
                }
                2 => "not base64!".to_string(),
                _ => key,
            };
            (signer, set_encryption_key(public_key))
        }
        _ => (
            &w.alice,
            create(&w.p.id, "rec-a", 1 + rng.below(3), "Observation"),
        ),
    }
}

/// A random transaction: a fresh body, or a replay of an earlier transaction, sometimes
/// tampered with (chain, expiry, nonce, signer, key, signature).
fn random_tx(rng: &mut Rng, generated: &mut Generated, w: &World, now_ms: u64) -> SignedTx {
    if rng.chance(4) && !generated.signed.is_empty() {
        return rng.pick(&generated.signed).clone();
    }
    let (who, body) = random_body(rng, generated, w, now_ms);
    let nonce = generated.nonces.entry(who.id.clone()).or_insert(0);
    *nonce += 1;
    let mut payload = TxPayload {
        chain_id: CHAIN_ID.to_string(),
        signer: who.id.clone(),
        nonce: *nonce,
        expires_at_ms: now_ms + TX_VALID_MS,
        body,
    };
    let mut key = &who.key;
    match rng.below(30) {
        0 => payload.chain_id = "other-chain".into(),
        1 => payload.expires_at_ms = now_ms - 1,
        2 => payload.expires_at_ms = now_ms + TX_LIFETIME_MS_MAX + 1,
        3 => payload.nonce = payload.nonce.saturating_sub(1 + rng.below(3)),
        4 => payload.signer = "ghost@hospital-a".into(),
        5 => key = &w.q.key,
        _ => {}
    }
    let mut tx = sign(payload, key);
    if rng.chance(3) {
        tx.signature.0[rng.below(64) as usize] ^= 0x80;
    }
    let id = tx.id().expect("generated transactions encode");
    match tx.payload.body {
        TxBody::Grant { .. } | TxBody::ApproveRequest { .. } => generated.consents.push(id),
        TxBody::RequestAccess { .. } => generated.requests.push(id),
        TxBody::BreakGlass { .. } => generated.openings.push(id),
        _ => {}
    }
    generated.signed.push(tx.clone());
    tx
}

/// `tx_count` random transactions after `base`, split into blocks at random points, with
/// the clock advancing up to 3 hours between blocks: (block time, transactions).
fn random_blocks(
    seed: u64,
    base: &Ledger,
    w: &World,
    tx_count: usize,
) -> Vec<(u64, Vec<SignedTx>)> {
    let mut rng = Rng(seed);
    let mut generated = Generated {
        nonces: base.nonces.clone(),
        consents: vec![w.consent],
        requests: vec![w.request],
        openings: vec![w.break_glass],
        signed: Vec::new(),
    };
    let mut now_ms = base.now_ms;
    let mut blocks: Vec<(u64, Vec<SignedTx>)> = vec![(now_ms, Vec::new())];
    for _ in 0..tx_count {
        if rng.chance(20) && !blocks.last().expect("a block").1.is_empty() {
            now_ms += rng.below(3 * HOUR_MS);
            blocks.push((now_ms, Vec::new()));
        }
        let tx = random_tx(&mut rng, &mut generated, w, now_ms);
        blocks.last_mut().expect("a block").1.push(tx);
    }
    blocks
}

/// Executes `blocks` on a fresh chain from `genesis`.
fn execute_from_genesis(genesis: &GenesisConfig, blocks: &[(u64, Vec<SignedTx>)]) -> Ledger {
    let mut ledger = Ledger::start(genesis);
    for (time_ms, txs) in blocks {
        ledger.set_time(*time_ms);
        ledger.run(txs.clone());
    }
    ledger
}

#[test]
fn random_sequences_execute_and_replay_to_the_same_hashes() {
    // Proves determinism: for 40 seeded sequences of 30 transactions mixing every kind,
    // valid and invalid (replayed, tampered, refused), split into blocks at random points,
    // two executions from genesis on fresh states reach identical block hashes and state,
    // and `replay` of every block from genesis reproduces every head; audit index keys
    // stay well-formed throughout. A failure names its seed.
    const SEEDS: u64 = 40;
    const TXS_PER_SEED: usize = 30;
    let (base, world) = world();
    let genesis = &world.consortium.genesis;
    let world_blocks: Vec<(u64, Vec<SignedTx>)> = base.blocks[1..]
        .iter()
        .map(|block| (block.header.time_ms, block.txs.clone()))
        .collect();
    let mut committed: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    for seed in 0..SEEDS {
        let mut blocks = world_blocks.clone();
        blocks.extend(random_blocks(seed, &base, &world, TXS_PER_SEED));
        let first = execute_from_genesis(genesis, &blocks);
        let second = execute_from_genesis(genesis, &blocks);
        let hashes = |ledger: &Ledger| -> Vec<Hash> {
            ledger.blocks.iter().map(|b| b.header.hash()).collect()
        };
        assert_eq!(
            hashes(&first),
            hashes(&second),
            "seed {seed}: block hashes differ"
        );
        assert_eq!(first.head, second.head, "seed {seed}: heads differ");
        assert!(first.state == second.state, "seed {seed}: states differ");

        let mut state = BTreeMap::new();
        let mut head: Option<ChainHead> = None;
        for block in &first.blocks {
            let executed = block::replay(&state, head.as_ref(), block, |txs| {
                txs.into_iter().map(Candidate::Unverified).collect()
            })
            .unwrap_or_else(|e| {
                panic!(
                    "seed {seed}: block {} does not replay: {e}",
                    block.header.height
                )
            });
            assert_eq!(
                executed.head,
                ChainHead::of(&block.header),
                "seed {seed}: replayed head of block {}",
                block.header.height
            );
            apply_writes(&mut state, &executed.writes);
            head = Some(executed.head);
        }
        assert_eq!(
            head.as_ref(),
            Some(&first.head),
            "seed {seed}: replayed chain head"
        );
        assert!(state == first.state, "seed {seed}: replayed state differs");
        for key in first.state.keys() {
            assert!(index_key_well_formed(key), "seed {seed}: index key {key:?}");
        }

        for block in &first.blocks[base.blocks.len()..] {
            for (tx, outcome) in block.txs.iter().zip(&block.outcomes) {
                match outcome {
                    TxOutcome::Committed { .. } => {
                        *committed.entry(tx.payload.body.kind()).or_default() += 1
                    }
                    TxOutcome::Rejected { rejection } => {
                        *refused.entry(rejection.code()).or_default() += 1
                    }
                }
            }
        }
    }
    eprintln!("committed by kind: {committed:?}\nrefused by code: {refused:?}");
    // The generator must reach deep enough to matter: every kind commits somewhere and
    // refusals come from both authentication and the contracts.
    assert_eq!(committed.len(), 15, "kinds that committed: {committed:?}");
    for code in [
        "duplicate",
        "bad_signature",
        "stale_nonce",
        "wrong_chain",
        "not_permitted",
        "invalid",
        "conflict",
        "not_found",
    ] {
        assert!(
            refused.contains_key(code),
            "no {code} refusal was generated: {refused:?}"
        );
    }
}

#[test]
fn consents_and_break_glass_no_longer_in_force_leave_the_lists_the_policy_reads() {
    // Proves that the bound on consents (and on break-glass windows) counts only what is in
    // force: a patient who granted and revoked more than the bound over the years can still
    // grant, the policy's slots hold only live ids, and the history index keeps them all.
    use medledger_core::contracts::{BREAK_GLASS_PER_PATIENT_MAX, CONSENTS_PER_PATIENT_MAX};
    let (mut ledger, world) = world();
    let in_force_at_start = ledger.consents_in_force(&world.p.id);
    let rounds = CONSENTS_PER_PATIENT_MAX + 8;
    let mut granted = Vec::new();
    for chunk in 0..rounds.div_ceil(256) {
        let count = 256.min(rounds - chunk * 256);
        let grants: Vec<SignedTx> = (0..count)
            .map(|_| ledger.sign(&world.p, grant_observations(to_user(&world.bob.id))))
            .collect();
        let ids: Vec<Hash> = grants.iter().map(|tx| tx.id().unwrap()).collect();
        expect_all_committed(&ledger.run(grants), "grants");
        let revokes: Vec<SignedTx> = ids
            .iter()
            .map(|id| ledger.sign(&world.p, revoke(*id)))
            .collect();
        expect_all_committed(&ledger.run(revokes), "revokes");
        granted.extend(ids);
    }
    let last = ledger.commit(&world.p, grant_observations(to_user(&world.bob.id)));
    let in_force = ledger.consents_in_force(&world.p.id);
    assert_eq!(in_force, [in_force_at_start, vec![last]].concat());
    for id in granted.iter().chain([&last]) {
        assert!(
            ledger
                .state
                .contains_key(&keys::patient_consent(&world.p.id, id)),
            "consent {id} is missing from the patient's history"
        );
    }

    // Break-glass windows that ended make room when the list is full.
    let txs: Vec<SignedTx> = (0..BREAK_GLASS_PER_PATIENT_MAX)
        .map(|_| ledger.sign(&world.alice, open_break_glass(&world.p.id, 1000)))
        .collect();
    let outcomes = ledger.run(txs);
    let refused = outcomes.iter().filter(|o| !o.is_committed()).count();
    let already_open = ledger
        .must::<Vec<Hash>>(&keys::patient_break_glass(&world.p.id))
        .len();
    assert_eq!(
        already_open, BREAK_GLASS_PER_PATIENT_MAX,
        "{refused} refused"
    );
    ledger.advance(1000);
    let next = ledger.commit(&world.alice, open_break_glass(&world.p.id, 1000));
    let open: Vec<Hash> = ledger.must(&keys::patient_break_glass(&world.p.id));
    assert_eq!(open, [next]);
}

// ---- consents in force: one slot per consent ------------------------------------------

/// Asserts that `outcome` is a refusal as a conflict, for `detail`.
fn assert_conflict(outcome: &TxOutcome, detail: &str) {
    let expected = TxOutcome::Rejected {
        rejection: Rejection::Conflict {
            detail: detail.to_string(),
        },
    };
    assert_eq!(outcome, &expected, "expected a refusal as a conflict");
}

/// The policy's answer, now, to `actor` reading `resource_type` of `patient` for treatment.
fn decide_read(ledger: &Ledger, actor: &str, patient: &str, resource_type: &str) -> AccessDecision {
    let resource_types = [resource_type.to_string()];
    decide(
        &Overlay::new(&ledger.state),
        &AccessQuery {
            actor,
            patient,
            action: Action::Read,
            resource_types: &resource_types,
            purpose: Some(Purpose::Treatment),
            time_ms: ledger.now_ms,
        },
    )
}

fn granted_by(consent_id: Hash) -> AccessDecision {
    AccessDecision::Granted {
        basis: AccessBasis::Consent { consent_id },
    }
}

fn no_consent(resource_type: &str) -> AccessDecision {
    AccessDecision::Denied {
        denial: AccessDenial::NoConsent {
            resource_type: resource_type.to_string(),
        },
    }
}

/// Runs `tx` alone in a block and returns the keys it wrote with their sizes in bytes (0
/// for a deletion), leaving out the Merkle log's nodes, which depend only on the log's size.
fn writes_alone(ledger: &mut Ledger, tx: SignedTx) -> BTreeMap<String, usize> {
    let (outcomes, writes) = ledger.run_with_writes(vec![tx]);
    expect_all_committed(&outcomes, "the transaction measured");
    writes
        .into_iter()
        .filter(|(key, _)| !key.starts_with("merkle/"))
        .map(|(key, value)| (key, value.map_or(0, |v| v.len())))
        .collect()
}

#[test]
fn a_grant_and_a_revoke_write_as_much_whatever_the_consents_in_force() {
    // Proves that a patient's consents in force cost a grant or a revoke nothing: the 1st
    // and the 500th grant write the same number of keys, of the same sizes but for a few
    // digits of growing counters, and so does a revoke with 2 or with 500 in force.
    let (mut ledger, w) = world();
    let q = &w.q.id;
    assert!(ledger.consents_in_force(q).is_empty());
    let bob_reads_observations = || grant_observations(to_user(&w.bob.id));

    let tx = ledger.sign(&w.q, bob_reads_observations());
    let first = tx.id().unwrap();
    let first_writes = writes_alone(&mut ledger, tx);
    for key in [
        keys::patient_consent_count(q),
        keys::patient_consent_slot(q, 0),
        keys::consent_slot(&first),
        keys::consent(&first),
        keys::patient_consent(q, &first),
    ] {
        assert!(first_writes.contains_key(&key), "the grant wrote no {key}");
    }
    let second = ledger.commit(&w.q, bob_reads_observations());
    // With 2 in force, revoking the first moves the second into its slot.
    let mut small = ledger.clone();
    let tx = small.sign(&w.q, revoke(first));
    let small_revoke_writes = writes_alone(&mut small, tx);
    assert_eq!(small.consents_in_force(q), [second]);

    let mut ids = vec![first, second];
    while ids.len() < 499 {
        let txs: Vec<SignedTx> = (0..256.min(499 - ids.len()))
            .map(|_| ledger.sign(&w.q, bob_reads_observations()))
            .collect();
        ids.extend(txs.iter().map(|tx| tx.id().unwrap()));
        expect_all_committed(&ledger.run(txs), "grants");
    }
    let tx = ledger.sign(&w.q, bob_reads_observations());
    let last = tx.id().unwrap();
    let last_writes = writes_alone(&mut ledger, tx);
    ids.push(last);
    assert_eq!(ledger.consents_in_force(q), ids);
    assert!(last_writes.contains_key(&keys::patient_consent_slot(q, 499)));
    // A revoke from the middle with 500 in force: the last slot's consent moves into it.
    let tx = ledger.sign(&w.q, revoke(ids[250]));
    let big_revoke_writes = writes_alone(&mut ledger, tx);
    ids.swap_remove(250);
    assert_eq!(ledger.consents_in_force(q), ids);

    for (what, few, many) in [
        ("grant", &first_writes, &last_writes),
        ("revoke", &small_revoke_writes, &big_revoke_writes),
    ] {
        assert_eq!(
            few.len(),
            many.len(),
            "{what}: keys written with few and many in force\n{few:?}\n{many:?}"
        );
        let bytes = |writes: &BTreeMap<String, usize>| writes.values().sum::<usize>();
        // Leaf indexes, heights and nonces gain a digit or two in a few values; a list of
        // 500 ids would be over 30,000 bytes.
        assert!(
            bytes(many) <= bytes(few) + 64,
            "{what}: {} bytes written with many in force, {} with few",
            bytes(many),
            bytes(few)
        );
    }
}

#[test]
fn revoking_the_middle_last_and_first_slots_keeps_every_other_consent_in_force() {
    // Proves that a revoke frees exactly its own consent's slot: after revoking the consent
    // in a middle slot, then the one in the last slot, then the one in the first, every
    // other consent still grants what it covers and no revoked one does, the oldest
    // covering consent stays the basis wherever the slots moved the others, and the count,
    // the slots and each consent's record of its slot agree after every step.
    let (mut ledger, w) = world();
    let q = &w.q.id;
    const TYPES: [&str; 6] = [
        "Observation",
        "Condition",
        "Procedure",
        "Encounter",
        "Claim",
        "Immunization",
    ];
    // Consent i covers TYPES[i]; the last one also covers TYPES[3], which consent 3 did first.
    let txs: Vec<SignedTx> = (0..TYPES.len())
        .map(|i| {
            let scope = match i {
                5 => types(&[TYPES[5], TYPES[3]]),
                _ => types(&[TYPES[i]]),
            };
            let body = grant(
                to_user(&w.bob.id),
                scope,
                &[Action::Read],
                &[Purpose::Treatment],
                None,
            );
            ledger.sign(&w.q, body)
        })
        .collect();
    let c: Vec<Hash> = txs.iter().map(|tx| tx.id().unwrap()).collect();
    expect_all_committed(&ledger.run(txs), "grants");
    assert_eq!(ledger.consents_in_force(q), c);

    let mut revoked = Vec::new();
    for (what, consent, slots_after) in [
        ("middle", 2, vec![c[0], c[1], c[5], c[3], c[4]]),
        ("last", 4, vec![c[0], c[1], c[5], c[3]]),
        ("first", 0, vec![c[3], c[1], c[5]]),
    ] {
        ledger.advance(1_000);
        ledger.commit(&w.q, revoke(c[consent]));
        revoked.push(consent);
        assert_eq!(
            ledger.consents_in_force(q),
            slots_after,
            "slots after revoking the {what} one"
        );
        for (i, resource_type) in TYPES.iter().enumerate() {
            let expected = if revoked.contains(&i) {
                no_consent(resource_type)
            } else {
                granted_by(c[i])
            };
            assert_eq!(
                decide_read(&ledger, &w.bob.id, q, resource_type),
                expected,
                "bob reads {resource_type} after revoking the {what} one"
            );
        }
    }
    assert_eq!(
        ledger.value::<u64>(&keys::patient_consent_count(q)),
        Some(3)
    );
    for consent in [c[0], c[2], c[4]] {
        assert_eq!(ledger.value::<u64>(&keys::consent_slot(&consent)), None);
        assert!(ledger.consent(&consent).revoked_at_ms.is_some());
    }

    // Revoking the rest empties the slots: no count, no slot, nothing granted.
    for consent in [c[1], c[3], c[5]] {
        ledger.commit(&w.q, revoke(consent));
    }
    assert!(ledger.consents_in_force(q).is_empty());
    assert_eq!(ledger.value::<u64>(&keys::patient_consent_count(q)), None);
    for resource_type in TYPES {
        assert_eq!(
            decide_read(&ledger, &w.bob.id, q, resource_type),
            no_consent(resource_type)
        );
    }
}

#[test]
fn a_grant_at_the_bound_prunes_only_expired_consents_and_the_rest_keep_working() {
    // Proves that a grant finding the patient's slots full frees exactly the slots of
    // consents no longer in force and commits, that the consents it keeps still grant and
    // can still be revoked (whichever slot the pruning moved them to), that an expired
    // consent it pruned can still be revoked, and that with nothing to prune a grant at
    // the bound is refused as a conflict that changes no slot.
    use medledger_core::contracts::CONSENTS_PER_PATIENT_MAX;
    let (mut ledger, w) = world();
    let q = &w.q.id;
    let ends_at_ms = ledger.now_ms + HOUR_MS;
    // Every third consent covers conditions until `ends_at_ms`; the others, observations
    // with no end.
    let expiring = |i: usize| i % 3 == 0;
    let mut ids = Vec::new();
    while ids.len() < CONSENTS_PER_PATIENT_MAX {
        let txs: Vec<SignedTx> = (ids.len()..CONSENTS_PER_PATIENT_MAX.min(ids.len() + 256))
            .map(|i| {
                let body = if expiring(i) {
                    grant(
                        to_user(&w.bob.id),
                        types(&["Condition"]),
                        &[Action::Read],
                        &[Purpose::Treatment],
                        Some(ends_at_ms),
                    )
                } else {
                    grant_observations(to_user(&w.bob.id))
                };
                ledger.sign(&w.q, body)
            })
            .collect();
        ids.extend(txs.iter().map(|tx| tx.id().unwrap()));
        expect_all_committed(&ledger.run(txs), "grants");
    }
    assert_eq!(ledger.consents_in_force(q), ids);
    let of_kind = |expires: bool| -> Vec<Hash> {
        (0..ids.len())
            .filter(|i| expiring(*i) == expires)
            .map(|i| ids[i])
            .collect()
    };
    let (expired, lasting) = (of_kind(true), of_kind(false));

    // Full, and everything still in force: refused, and the slots are as they were.
    let refuse_at_bound = |ledger: &mut Ledger| {
        let in_force = ledger.consents_in_force(q);
        let tx = ledger.sign(&w.q, grant_observations(to_user(&w.alice.id)));
        let outcome = ledger.run1(tx);
        assert_conflict(
            &outcome,
            "the patient has the most consents in force at once",
        );
        assert_eq!(ledger.consents_in_force(q), in_force);
    };
    refuse_at_bound(&mut ledger);
    assert_eq!(
        decide_read(&ledger, &w.bob.id, q, "Condition"),
        granted_by(ids[0])
    );

    // At their end the expiring consents are pruned, and only they.
    ledger.set_time(ends_at_ms);
    let next = ledger.commit(&w.q, grant_observations(to_user(&w.alice.id)));
    let in_force: BTreeSet<Hash> = ledger.consents_in_force(q).into_iter().collect();
    let expected: BTreeSet<Hash> = lasting.iter().copied().chain([next]).collect();
    assert_eq!(in_force, expected);
    for id in &expired {
        assert_eq!(ledger.value::<u64>(&keys::consent_slot(id)), None);
        assert_eq!(
            ledger.consent(id).revoked_at_ms,
            None,
            "pruning is no revoke"
        );
        assert!(ledger.state.contains_key(&keys::patient_consent(q, id)));
    }
    assert_eq!(
        decide_read(&ledger, &w.bob.id, q, "Observation"),
        granted_by(lasting[0])
    );
    assert_eq!(
        decide_read(&ledger, &w.bob.id, q, "Condition"),
        no_consent("Condition")
    );
    assert_eq!(
        decide_read(&ledger, &w.alice.id, q, "Observation"),
        granted_by(next)
    );

    // The oldest lasting consent, one the pruning moved to the first slot, and a pruned one
    // are revoked: the first two leave the slots, the pruned one changes none.
    let moved = ledger.consents_in_force(q)[0];
    assert_ne!(
        moved, ids[0],
        "the pruning moved a later consent into the first slot"
    );
    assert!(lasting.contains(&moved) && moved != lasting[0]);
    let txs = [lasting[0], moved, expired[0]]
        .map(|id| ledger.sign(&w.q, revoke(id)))
        .to_vec();
    expect_all_committed(&ledger.run(txs), "revokes");
    let in_force: BTreeSet<Hash> = ledger.consents_in_force(q).into_iter().collect();
    let expected: BTreeSet<Hash> = lasting[1..]
        .iter()
        .copied()
        .filter(|id| *id != moved)
        .chain([next])
        .collect();
    assert_eq!(in_force, expected);
    assert_eq!(
        decide_read(&ledger, &w.bob.id, q, "Observation"),
        granted_by(lasting[1])
    );

    // Filled again with consents that do not end: the bound holds as before.
    let missing = CONSENTS_PER_PATIENT_MAX - in_force.len();
    let txs: Vec<SignedTx> = (0..missing)
        .map(|_| ledger.sign(&w.q, grant_observations(to_user(&w.bob.id))))
        .collect();
    expect_all_committed(&ledger.run(txs), "grants up to the bound");
    assert_eq!(ledger.consents_in_force(q).len(), CONSENTS_PER_PATIENT_MAX);
    refuse_at_bound(&mut ledger);
}

#[test]
fn a_grant_at_the_bound_reads_the_slots_only_when_one_of_them_may_have_ended() {
    // Proves that a grant finding the patient's slots full reads the consents in them only
    // once the earliest end the ledger keeps for them has come: refused at once before it;
    // after a revoke left that bound too early, refused after reading them all and changing
    // nothing; at a real end, pruned and committed, with the bound set to the next end (the
    // grant's own when earlier), or to none once the consents left never end.
    use medledger_core::contracts::CONSENTS_PER_PATIENT_MAX;
    let (mut ledger, w) = world();
    let q = &w.q.id;
    let ends = [1, 2, 3].map(|hours| ledger.now_ms + hours * HOUR_MS);
    let ending = |end: u64| {
        grant(
            to_user(&w.bob.id),
            types(&["Condition"]),
            &[Action::Read],
            &[Purpose::Treatment],
            Some(end),
        )
    };
    let ending_ids = ends.map(|end| ledger.commit(&w.q, ending(end)));
    let fill = |ledger: &mut Ledger| loop {
        let room = CONSENTS_PER_PATIENT_MAX - ledger.consents_in_force(q).len();
        if room == 0 {
            break;
        }
        let txs: Vec<SignedTx> = (0..room.min(256))
            .map(|_| ledger.sign(&w.q, grant_observations(to_user(&w.bob.id))))
            .collect();
        expect_all_committed(&ledger.run(txs), "grants up to the bound");
    };
    let next_end = |ledger: &Ledger| ledger.value::<u64>(&keys::patient_consent_next_end(q));
    // One more grant, which ends never; returns its outcome and how many consents it read.
    let grant_one = |ledger: &mut Ledger| {
        let tx = ledger.sign(&w.q, grant_observations(to_user(&w.alice.id)));
        let (mut outcomes, _, reads) = ledger.run_counting_reads(vec![tx], "consent/");
        (outcomes.remove(0), reads)
    };
    let refused_reading = |ledger: &mut Ledger, expected_reads: usize| {
        let in_force = ledger.consents_in_force(q);
        let (outcome, reads) = grant_one(ledger);
        assert_conflict(
            &outcome,
            "the patient has the most consents in force at once",
        );
        assert_eq!(reads, expected_reads, "consents read by a refused grant");
        assert_eq!(ledger.consents_in_force(q), in_force);
    };
    fill(&mut ledger);
    assert_eq!(next_end(&ledger), Some(ends[0]));

    // Nothing can have ended yet: refused without reading a consent.
    refused_reading(&mut ledger, 0);

    // The consent with the earliest end is revoked and its slot refilled: a revoke leaves
    // the bound as it is, now earlier than any end. Once it has come, a grant at the bound
    // reads every consent, finds none ended, and is refused with no change.
    ledger.commit(&w.q, revoke(ending_ids[0]));
    fill(&mut ledger);
    assert_eq!(next_end(&ledger), Some(ends[0]));
    ledger.set_time(ends[0]);
    refused_reading(&mut ledger, CONSENTS_PER_PATIENT_MAX);
    assert_eq!(next_end(&ledger), Some(ends[0]));

    // At a real end, the consent that ended is pruned and the grant commits in its slot;
    // the bound moves to the earliest end kept, the grant's own when that is earlier.
    // Until then, grants read nothing again.
    ledger.set_time(ends[1]);
    ledger.commit(&w.q, ending(ends[1] + HOUR_MS / 2));
    assert!(!ledger.consents_in_force(q).contains(&ending_ids[1]));
    assert_eq!(next_end(&ledger), Some(ends[1] + HOUR_MS / 2));
    refused_reading(&mut ledger, 0);
    ledger.set_time(ends[1] + HOUR_MS / 2);
    let (outcome, _) = grant_one(&mut ledger);
    assert!(outcome.is_committed(), "{outcome:?}");
    assert_eq!(next_end(&ledger), Some(ends[2]));
    refused_reading(&mut ledger, 0);

    // The last consent with an end goes too: no bound is kept for consents that never end.
    ledger.set_time(ends[2]);
    let (outcome, _) = grant_one(&mut ledger);
    assert!(outcome.is_committed(), "{outcome:?}");
    assert!(!ledger.consents_in_force(q).contains(&ending_ids[2]));
    assert_eq!(next_end(&ledger), None);
    refused_reading(&mut ledger, 0);
}

#[test]
fn a_break_glass_at_the_bound_reads_the_windows_only_when_one_of_them_has_ended() {
    // Proves that a break-glass finding the patient's list of open windows full reads those
    // windows only once the earliest end the ledger keeps for them has come: refused at once
    // before it; at that end, the ended window is pruned, the break-glass commits and the
    // bound moves to the next end (its own when earlier). A full list stored before the
    // bound was kept is read and pruned as before, and has a bound from then on.
    use medledger_core::contracts::BREAK_GLASS_PER_PATIENT_MAX;
    let (mut ledger, w) = world();
    let p = &w.q.id;
    let list = |ledger: &Ledger| ledger.value::<Vec<Hash>>(&keys::patient_break_glass(p));
    let next_end = |ledger: &Ledger| ledger.value::<u64>(&keys::patient_break_glass_next_end(p));
    // The world's own window for Q ends first; three more end one, two and three hours
    // after it.
    let world_end = ledger.break_glass(&w.break_glass).ends_at_ms;
    let start = ledger.now_ms;
    let ends = [1, 2, 3].map(|hours| world_end + hours * HOUR_MS);
    let early: Vec<Hash> = ends
        .map(|end| ledger.commit(&w.alice, open_break_glass(p, end - start)))
        .to_vec();
    assert_eq!(next_end(&ledger), Some(world_end));
    let room = BREAK_GLASS_PER_PATIENT_MAX - list(&ledger).map_or(0, |ids| ids.len());
    let txs: Vec<SignedTx> = (0..room)
        .map(|_| ledger.sign(&w.alice, open_break_glass(p, BREAK_GLASS_MS_MAX)))
        .collect();
    expect_all_committed(&ledger.run(txs), "windows up to the bound");
    // Opens one more window of `duration_ms`; returns its outcome and the windows it read.
    let open_one = |ledger: &mut Ledger, duration_ms: u64| {
        let tx = ledger.sign(&w.alice, open_break_glass(p, duration_ms));
        let (mut outcomes, _, reads) = ledger.run_counting_reads(vec![tx], "break_glass/");
        (outcomes.remove(0), reads)
    };
    let refused_reading = |ledger: &mut Ledger, expected_reads: usize| {
        let before = list(ledger);
        let (outcome, reads) = open_one(ledger, HOUR_MS);
        assert_conflict(
            &outcome,
            "the patient has the most break-glass windows open at once",
        );
        assert_eq!(
            reads, expected_reads,
            "windows read by a refused break-glass"
        );
        assert_eq!(list(ledger), before);
    };
    let committed_reading = |ledger: &mut Ledger, duration_ms: u64| {
        let (outcome, reads) = open_one(ledger, duration_ms);
        assert!(outcome.is_committed(), "{outcome:?}");
        assert_eq!(
            reads, BREAK_GLASS_PER_PATIENT_MAX,
            "windows read by a pruning"
        );
        ledger.last("break_glass")
    };

    // Every window is open: refused without reading one.
    refused_reading(&mut ledger, 0);

    // The world's window has ended: pruned, and the new one, ending before all the others,
    // is the bound. Until it ends, nothing is read again.
    ledger.set_time(world_end);
    let short = committed_reading(&mut ledger, HOUR_MS / 2);
    let open = list(&ledger).expect("a full list");
    assert!(!open.contains(&w.break_glass) && open.contains(&short));
    assert_eq!(next_end(&ledger), Some(world_end + HOUR_MS / 2));
    refused_reading(&mut ledger, 0);

    // Once it and the first early window have ended, both are pruned and the bound moves
    // to the earliest end left; the slot left over is taken without reading a window.
    ledger.set_time(ends[0]);
    committed_reading(&mut ledger, BREAK_GLASS_MS_MAX);
    let open = list(&ledger).expect("a list");
    assert!(!open.contains(&short) && !open.contains(&early[0]));
    assert_eq!(open.len(), BREAK_GLASS_PER_PATIENT_MAX - 1);
    assert_eq!(next_end(&ledger), Some(ends[1]));
    let (outcome, reads) = open_one(&mut ledger, BREAK_GLASS_MS_MAX);
    assert!(
        outcome.is_committed() && reads == 0,
        "{outcome:?}, {reads} read"
    );
    refused_reading(&mut ledger, 0);

    // A full list from before the bound was kept: each break-glass reads the windows until
    // one has ended; that one prunes the list and keeps a bound again.
    ledger.state.remove(&keys::patient_break_glass_next_end(p));
    refused_reading(&mut ledger, BREAK_GLASS_PER_PATIENT_MAX);
    ledger.set_time(ends[1]);
    committed_reading(&mut ledger, BREAK_GLASS_MS_MAX);
    assert!(!list(&ledger).expect("a full list").contains(&early[1]));
    assert_eq!(next_end(&ledger), Some(ends[2]));
    refused_reading(&mut ledger, 0);
}

// ---- contribution counters ------------------------------------------------------------

#[test]
fn contributions_count_led_blocks_held_records_and_granted_accesses_only() {
    // Proves what the ledger's contribution counters count: the proposer's organisation
    // leads each block; a custodian holds each committed record version and serves each
    // granted access; a refused record, a denied access and an unauthenticated transaction
    // count for nobody.
    let (mut ledger, w) = world();
    let counters = |l: &Ledger, org: &str| -> (u64, u64, u64) {
        let c: medledger_core::model::Contribution =
            l.value(&keys::contribution(org)).unwrap_or_default();
        (c.blocks_led, c.records_held, c.accesses_served)
    };
    let (led_a, held_a, served_a) = counters(&ledger, "hospital-a");
    let before_b = counters(&ledger, "hospital-b");
    // The world was built one transaction per block, every block led by hospital-a's node,
    // with three record versions written at hospital-a.
    assert_eq!(led_a, ledger.head.height);
    assert_eq!(held_a, 3);

    // A forged access entry: signed, then altered, so its signature fails.
    let mut forged = ledger.sign(
        w.node("hospital-a"),
        read(&w.alice.id, &w.p.id, &["obs-1"], Purpose::Treatment),
    );
    forged.payload.expires_at_ms += 1;
    let txs = vec![
        ledger.sign(&w.alice, create(&w.p.id, "obs-2", 1, "Observation")),
        // The same version again: refused.
        ledger.sign(&w.alice, create(&w.p.id, "obs-1", 1, "Observation")),
        ledger.sign(
            w.node("hospital-a"),
            read(&w.alice.id, &w.p.id, &["obs-1"], Purpose::Treatment),
        ),
        // hospital-b's clinician has no consent: denied, logged by hospital-b.
        ledger.sign(w.node("hospital-b"), bob_reads_obs_1(&w)),
        forged,
    ];
    let outcomes = ledger.run(txs);
    let codes: Vec<String> = outcomes.iter().map(outcome_code).collect();
    assert_eq!(codes[0], "committed");
    assert_ne!(codes[1], "committed");
    assert_eq!(codes[2], "committed");
    assert_eq!(codes[3], "committed", "a denial is logged, and commits");
    assert_eq!(codes[4], "bad_signature");

    assert_eq!(
        counters(&ledger, "hospital-a"),
        (led_a + 1, held_a + 1, served_a + 1)
    );
    assert_eq!(counters(&ledger, "hospital-b"), before_b);
}

//! What several test binaries share: the small ledger the store and verify tests tamper
//! with, a PostgreSQL server for the record store tests, and an inclusion proof check.

#![allow(dead_code)] // each test binary that includes this module uses part of it

use medledger_core::block::execute_block;
use medledger_core::contracts::Candidate;
use medledger_core::identity::OrgKind;
use medledger_core::model::{Action, Category, Grantee, Purpose, Scope};
use medledger_core::tx::{SignedTx, TxBody};
use medledger_node::consortium::{Consortium, Identity};
use medledger_node::ledger::initialise;
use medledger_node::pki::Validity;
use medledger_node::store::Store;

#[allow(dead_code)] // not every test binary that includes this module uses it
pub const CHAIN_ID: &str = "tamper-test";
pub const DAY_MS: u64 = 24 * 60 * 60 * 1000;
#[allow(dead_code)]
pub const GENESIS_MS: u64 = 1_700_000_000_000;

/// A patient's grant: `org` may read `category` for treatment, with no end.
pub fn read_grant(org: &str, category: Category) -> TxBody {
    TxBody::Grant {
        grantee: Grantee::Org { org: org.into() },
        scope: Scope {
            resource_types: vec![],
            categories: vec![category],
        },
        actions: vec![Action::Read],
        purposes: vec![Purpose::Treatment],
        expires_at_ms: None,
    }
}

/// Writes genesis and three blocks (six transactions, one rejected) through the node's
/// store in `data_dir`.
#[allow(dead_code)]
pub fn build_ledger(data_dir: &std::path::Path) {
    let validity = Validity {
        not_before_ms: GENESIS_MS - DAY_MS,
        not_after_ms: GENESIS_MS + 365 * DAY_MS,
    };
    let consortium = Consortium::create(
        CHAIN_ID,
        &[("hospital-a", OrgKind::Hospital)],
        GENESIS_MS,
        validity,
    )
    .expect("a consortium");
    initialise(data_dir, &consortium.genesis).expect("genesis is stored");
    let proposer = consortium
        .org("hospital-a")
        .expect("hospital-a is founding")
        .node
        .id
        .clone();

    let expires_at_ms = GENESIS_MS + DAY_MS / 2;
    let maria = Identity::new_patient().expect("a patient key");
    let jonas = Identity::new_patient().expect("a patient key");
    let register = |patient: &Identity| {
        patient.sign(
            CHAIN_ID,
            1,
            expires_at_ms,
            TxBody::RegisterPatient {
                public_key: patient.key.public_key(),
            },
        )
    };
    let grant = |patient: &Identity| {
        patient.sign(
            CHAIN_ID,
            2,
            expires_at_ms,
            read_grant("hospital-a", Category::Conditions),
        )
    };
    let maria_grant = grant(&maria);
    let jonas_grant = grant(&jonas);
    let jonas_revoke = jonas.sign(
        CHAIN_ID,
        3,
        expires_at_ms,
        TxBody::Revoke {
            grant_id: jonas_grant.id().expect("a well-formed transaction"),
        },
    );
    let blocks: [Vec<SignedTx>; 3] = [
        vec![register(&maria), register(&jonas)],
        vec![maria_grant.clone(), jonas_grant],
        // The replayed grant is rejected (its nonce is stale) and recorded as rejected.
        vec![maria_grant, jonas_revoke],
    ];

    let store = Store::open(data_dir).expect("the store opens");
    let mut head = store
        .head()
        .expect("the head reads")
        .expect("genesis is stored");
    for (index, txs) in blocks.into_iter().enumerate() {
        let time_ms = GENESIS_MS + 1000 * (index as u64 + 1);
        let candidates = txs.into_iter().map(Candidate::Unverified).collect();
        let snapshot = store.snapshot().expect("a snapshot");
        let executed = execute_block(&snapshot, &head, &proposer, time_ms, candidates)
            .expect("the block executes");
        drop(snapshot);
        store.commit_block(&executed).expect("the block commits");
        head = executed.head;
    }
}

/// A consortium of one hospital whose node orders alone, over a fresh store in `dir`.
#[allow(dead_code)] // each test binary includes this module and uses part of it
pub fn solo_ledger(
    dir: &std::path::Path,
    chain_id: &str,
    config: medledger_node::ledger::OrderingConfig,
) -> (Consortium, medledger_node::ledger::Ledger) {
    use medledger_node::ledger::{now_ms, Ledger, NodeIdentity};
    let now = now_ms() / 1000 * 1000;
    let validity = Validity {
        not_before_ms: now - DAY_MS,
        not_after_ms: now + DAY_MS,
    };
    let consortium = Consortium::create(
        chain_id,
        &[("hospital-a", OrgKind::Hospital)],
        now,
        validity,
    )
    .expect("a consortium");
    initialise(dir, &consortium.genesis).expect("genesis is stored");
    let identity = NodeIdentity::from_member(&consortium.orgs[0].node).expect("a node identity");
    let ledger = Ledger::open_solo(dir, identity, config).expect("the ledger opens");
    (consortium, ledger)
}

/// A PostgreSQL server for one test: `MEDLEDGER_TEST_POSTGRES` (a connection string) when
/// set; otherwise one started by `scripts/test-postgres` (which installs PostgreSQL if
/// missing) in a temporary directory, stopped on drop.
pub struct TestPostgres {
    pub connection: String,
    started: Option<tempfile::TempDir>,
}

impl TestPostgres {
    pub fn start() -> TestPostgres {
        if let Ok(connection) = std::env::var("MEDLEDGER_TEST_POSTGRES") {
            return TestPostgres {
                connection,
                started: None,
            };
        }
        let dir = tempfile::tempdir().unwrap();
        let output = std::process::Command::new(script())
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("scripts/test-postgres runs");
        assert!(
            output.status.success(),
            "scripts/test-postgres start failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        TestPostgres {
            connection: String::from_utf8(output.stdout).unwrap().trim().to_string(),
            started: Some(dir),
        }
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if let Some(dir) = &self.started {
            let _ = std::process::Command::new(script())
                .arg("stop")
                .arg(dir.path())
                .status();
        }
    }
}

fn script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-postgres")
}

/// Proves that the transaction at `leaf`, in the block at `height`, is included in the log
/// of `store` as of its current head; panics (naming `what`) otherwise.
pub fn prove_leaf(store: &Store, height: u64, leaf: u64, what: &str) {
    let head = store.head().unwrap().unwrap();
    let snapshot = store.snapshot().unwrap();
    let block = store.block(height).unwrap().unwrap();
    let position = leaf - (block.header.log_size - block.header.tx_count);
    let bytes = medledger_core::block::tx_leaf_bytes(
        height,
        position,
        &block.txs[position as usize],
        &block.outcomes[position as usize],
    );
    let path = snapshot.inclusion_proof(leaf, head.log_size).unwrap();
    medledger_core::merkle::verify_inclusion(
        &medledger_core::merkle::leaf_hash(&bytes),
        leaf,
        head.log_size,
        &path,
        &head.log_root,
    )
    .unwrap_or_else(|e| panic!("{what} is not proven in the log: {e:?}"));
}

//! The ledger service's promises to a client: an answer only after commit, and when the
//! commit takes longer than the client waits, "outcome unknown" with the id to look up,
//! never a false success or a lost transaction.

use std::sync::Arc;

use medledger_core::model::AuditEvent;
use medledger_core::state::keys;
use medledger_core::tx::TxBody;
use medledger_node::consortium::Identity;
use medledger_node::ledger::{now_ms, Ledger, OrderingConfig, SubmitError};

mod common;

fn open(dir: &std::path::Path, config: OrderingConfig) -> Ledger {
    common::solo_ledger(dir, "ledger-test", config).1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_waiting_hears_outcome_unknown_and_the_transaction_still_commits() {
    // Goal: with a block window longer than the client's wait, the client gets
    // OutcomeUnknown carrying the tx id, and that id is later found committed.
    let dir = tempfile::tempdir().unwrap();
    let config = OrderingConfig {
        batch_delay_ms: 300,
        commit_timeout_ms: 1,
        ..OrderingConfig::default()
    };
    let ledger = Arc::new(open(dir.path(), config));
    let patient = Identity::new_patient().unwrap();
    let tx = patient.sign(
        "ledger-test",
        1,
        now_ms() + 60_000,
        TxBody::RegisterPatient {
            public_key: patient.key.public_key(),
        },
    );
    let expected_id = tx.id().unwrap();
    match ledger.submit(tx).await {
        Err(SubmitError::OutcomeUnknown(tx_id)) => assert_eq!(tx_id, expected_id),
        other => panic!("expected outcome_unknown, got {other:?}"),
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let leaf_index: u64 = loop {
        let found = ledger
            .store()
            .snapshot()
            .unwrap()
            .value(&keys::tx(&expected_id))
            .unwrap();
        if let Some(leaf_index) = found {
            break leaf_index;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the transaction never committed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let event: AuditEvent = ledger
        .store()
        .snapshot()
        .unwrap()
        .value(&keys::event(leaf_index))
        .unwrap()
        .unwrap();
    assert_eq!(
        (event.kind.as_str(), event.rejected),
        ("register_patient", None)
    );
}

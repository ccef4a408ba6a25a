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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_signers_concurrent_transactions_commit_at_their_first_nonce() {
    // Goal: 128 transactions signed at once for one signer (as the node signs access
    // entries for many requests) reach the orderer in nonce order: each commits at the
    // nonce it was first signed with, none is overtaken by a later one and refused as
    // stale, so none is signed twice and the ledger's nonce for the signer is exactly the
    // number of its transactions.
    use medledger_core::contracts::TxOutcome;
    use medledger_core::model::Category;
    use medledger_node::ledger::NonceCounter;
    use medledger_node::records::RecordError;

    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(open(dir.path(), OrderingConfig::default()));
    let patient = Arc::new(Identity::new_patient().unwrap());
    let nonces = Arc::new(NonceCounter::default());
    let registered = ledger
        .submit_signed::<RecordError>(&patient.id, &patient.key, &nonces, 60_000, |_| {
            TxBody::RegisterPatient {
                public_key: patient.key.public_key(),
            }
        })
        .await
        .unwrap();
    assert!(registered.outcome.is_committed());
    const GRANTS: u64 = 128;
    let tasks: Vec<_> = (0..GRANTS)
        .map(|_| {
            let (ledger, patient, nonces) = (ledger.clone(), patient.clone(), nonces.clone());
            tokio::spawn(async move {
                let mut signed = 0;
                let committed = ledger
                    .submit_signed::<RecordError>(
                        &patient.id,
                        &patient.key,
                        &nonces,
                        60_000,
                        |_| {
                            signed += 1;
                            common::read_grant("hospital-a", Category::Diagnostics)
                        },
                    )
                    .await
                    .unwrap();
                (committed, signed)
            })
        })
        .collect();
    for task in tasks {
        let (committed, signed) = task.await.unwrap();
        assert!(
            matches!(committed.outcome, TxOutcome::Committed { .. }),
            "{:?}",
            committed.outcome
        );
        assert_eq!(signed, 1, "signed once, at its first nonce");
    }
    let on_ledger: u64 = ledger
        .store()
        .snapshot()
        .unwrap()
        .value(&keys::nonce(&patient.id))
        .unwrap()
        .unwrap();
    assert_eq!(on_ledger, 1 + GRANTS);
}

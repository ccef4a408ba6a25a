//! Transactions signed by independent implementations of docs/transactions.md commit on a
//! node: the Python reference (docs/reference/sign_tx.py: the standard library and the
//! `cryptography` package) and the WebCrypto reference (docs/reference/sign_tx.mjs: only
//! `crypto.subtle`, the API browsers give a patient's web page).

use std::process::Command;
use std::sync::Arc;

use medledger_core::tx::SignedTx;
use medledger_node::ledger::OrderingConfig;

mod common;

/// Runs a reference signer: `program script args…`, which prints one JSON object.
fn reference(program: &str, script: &str, args: &[&str]) -> serde_json::Value {
    let script = format!(
        "{}/../../docs/reference/{script}",
        env!("CARGO_MANIFEST_DIR")
    );
    let output = Command::new(program)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs (scripts/check installs it): {e}"));
    assert!(
        output.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the reference prints JSON")
}

/// The two independent signers, as (program, script).
const REFERENCES: [(&str, &str); 2] = [("python3", "sign_tx.py"), ("node", "sign_tx.mjs")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_signed_by_the_independent_references_commit() {
    // Goal: the bytes each reference signs are the bytes the ledger verifies, its tx id is
    // the ledger's, and the pseudonym it derives is the ledger's; and each reproduces the
    // documented vector (the WebCrypto one verifies the signature the Python one made).
    let dir = tempfile::tempdir().unwrap();
    let (_, ledger) = common::solo_ledger(dir.path(), "interop-test", OrderingConfig::default());
    let ledger = Arc::new(ledger);

    for (program, script) in REFERENCES {
        let signed = reference(program, script, &["register-patient", "interop-test"]);
        let tx: SignedTx = serde_json::from_value(signed["tx"].clone()).unwrap();
        assert_eq!(
            tx.id().unwrap().to_hex(),
            signed["tx_id"].as_str().unwrap(),
            "{script}"
        );
        let committed = ledger.submit(tx).await.expect("admitted and ordered");
        assert!(
            committed.outcome.is_committed(),
            "{script}: {:?}",
            committed.outcome
        );

        // The fixed vector each prints is the one the core's unit test pins.
        let vector = reference(program, script, &["vector"]);
        assert_eq!(
            vector["tx_id"].as_str().unwrap(),
            "35792b3e4e49f68aa56286dda5ba0b713d817489f013d8789f1e889f8fa3502b",
            "{script}"
        );
    }
}

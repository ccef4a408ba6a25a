//! A transaction signed by an independent implementation of docs/transactions.md (the
//! Python reference in docs/reference/sign_tx.py, using only the standard library and the
//! `cryptography` package) commits on a node: the encoding is reproducible by a third party.

use std::process::Command;
use std::sync::Arc;

use medledger_core::crypto::base64url;
use medledger_core::identity::OrgKind;
use medledger_core::tx::SignedTx;
use medledger_node::consortium::Consortium;
use medledger_node::ledger::{initialise, now_ms, Ledger, NodeIdentity, OrderingConfig};
use medledger_node::pki::{KeyPair, Validity};

fn reference(args: &[&str]) -> serde_json::Value {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/reference/sign_tx.py"
    );
    let output = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs (the test script installs it and the cryptography package)");
    assert!(
        output.status.success(),
        "the reference signer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the reference prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_signed_by_the_python_reference_commits() {
    // Goal: the bytes the reference signs are the bytes the ledger verifies, its tx id is
    // the ledger's, and the pseudonym it derives is the ledger's.
    let now = now_ms() / 1000 * 1000;
    let validity = Validity {
        not_before_ms: now - 86_400_000,
        not_after_ms: now + 86_400_000,
    };
    let consortium = Consortium::create(
        "interop-test",
        &[("hospital-a", OrgKind::Hospital)],
        now,
        validity,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    initialise(dir.path(), &consortium.genesis).unwrap();
    let node = &consortium.orgs[0].node;
    let identity = NodeIdentity {
        id: node.id.clone(),
        key: KeyPair::from_pkcs8_der(node.key.pkcs8_der()).unwrap(),
        certificate_chain: vec![
            base64url(&node.certificate.as_ref().unwrap().der),
            base64url(&consortium.orgs[0].authority.ca_certificate.der),
        ],
    };
    let ledger =
        Arc::new(Ledger::open_solo(dir.path(), identity, OrderingConfig::default()).unwrap());

    let signed = reference(&["register-patient", "interop-test"]);
    let tx: SignedTx = serde_json::from_value(signed["tx"].clone()).unwrap();
    assert_eq!(tx.id().unwrap().to_hex(), signed["tx_id"].as_str().unwrap());
    let committed = ledger.submit(tx).await.expect("admitted and ordered");
    assert!(committed.outcome.is_committed(), "{:?}", committed.outcome);

    // The fixed vector the reference prints is the one the core's unit test pins.
    let vector = reference(&["vector"]);
    assert_eq!(
        vector["tx_id"].as_str().unwrap(),
        "35792b3e4e49f68aa56286dda5ba0b713d817489f013d8789f1e889f8fa3502b"
    );
}

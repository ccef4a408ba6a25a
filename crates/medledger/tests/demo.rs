//! The demo end to end, as a newcomer runs it: the scenario plays, the stored ledger
//! verifies, and no synthetic patient's name or birth date is anywhere in the ledger bytes.

use std::path::Path;
use std::process::Command;

fn medledger(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_medledger"))
        .args(args)
        .output()
        .expect("the medledger binary runs")
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("a readable directory") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn the_demo_plays_every_flow_and_leaves_a_ledger_that_verifies_without_phi() {
    // Goal: `demo --once` exits 0 after showing consent, denial, a read across nodes, a
    // history from two custodians, revoke and break-glass on a three-node consortium; every
    // node's store passes `verify` with the same head and `store check` finds every record
    // intact; the synthetic names and birth dates (in every spelling we can think of)
    // appear in no byte any node keeps: ledger, Raft log or record store.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let output = medledger(&["demo", "--once", "--data-dir", data.to_str().unwrap()]);
    let shown = text(&output);
    assert!(output.status.success(), "demo failed:\n{shown}");
    for expected in [
        "DENIED by the ledger (no_consent)",
        "GRANTED; its node checked the CID, the author's signature and the commitment",
        "2 versions from 2 custodians",
        "revokes",
        "GRANTED (break_glass)",
        "[FLAGGED FOR REVIEW]",
        "bad_signature",
        "is already on the ledger",
        "head from genesis",
        "All 3 nodes hold the same chain",
        "/$everything: 200",
        "FHIR base http://127.0.0.1:",
    ] {
        assert!(
            shown.contains(expected),
            "the demo did not show {expected:?}:\n{shown}"
        );
    }

    // The ledger's contribution counters: custodians hold the records written there and
    // served the granted reads; every block after genesis was led by some member's node.
    let counters = |org: &str| -> Vec<u64> {
        let table = shown
            .split("contributed, as the ledger counts it")
            .nth(1)
            .unwrap_or_else(|| panic!("no contributions shown:\n{shown}"));
        let line = table
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{org} ")))
            .unwrap_or_else(|| panic!("no contribution line for {org}:\n{shown}"));
        line.split_whitespace()
            .skip(1)
            .map(|n| n.parse().unwrap())
            .collect()
    };
    // Each custodian also served its part of dr-alice's `$everything` through FHIR.
    assert_eq!(counters("hospital-a")[1..], [2, 4]);
    assert_eq!(counters("lab-x")[1..], [1, 2]);
    assert_eq!(counters("regulator")[1..], [0, 0]);
    let led: u64 = ["hospital-a", "hospital-b", "lab-x", "regulator"]
        .iter()
        .map(|org| counters(org)[0])
        .sum();
    assert!(led > 20, "blocks led: {led}");

    let node_dir = data.join("nodes").join("hospital-a");
    let mut heads = Vec::new();
    for org in ["hospital-a", "hospital-b", "lab-x"] {
        let dir = data.join("nodes").join(org);
        let verified = medledger(&["verify", "--data-dir", dir.to_str().unwrap()]);
        let said = text(&verified);
        assert!(verified.status.success(), "verify of {org} failed:\n{said}");
        let head = said.split("; head ").nth(1).unwrap_or_default().to_string();
        heads.push(head);
    }
    assert!(
        heads.windows(2).all(|pair| pair[0] == pair[1]) && !heads[0].is_empty(),
        "the nodes' heads differ: {heads:?}"
    );

    let ledger = std::fs::read(node_dir.join("ledger.redb")).unwrap();
    let mut needles: Vec<String> = Vec::new();
    for (name, born) in [
        ("Maria Synthetic", "1961-04-12"),
        ("Jonas Example", "1984-11-30"),
    ] {
        needles.push(name.to_string());
        needles.extend(name.split(' ').map(str::to_string));
        needles.push(name.to_lowercase());
        needles.push(born.to_string());
        needles.push(born.replace('-', ""));
        needles.push(born.replace('-', "/"));
    }
    for org in ["hospital-a", "lab-x"] {
        let dir = data.join("nodes").join(org);
        let checked = medledger(&["store", "check", "--data-dir", dir.to_str().unwrap()]);
        let said = text(&checked);
        assert!(
            checked.status.success(),
            "store check of {org} failed:\n{said}"
        );
        assert!(said.contains("intact"), "{said}");
    }

    let mut searched = 0;
    let kept = files(&data.join("nodes"));
    assert!(
        kept.iter().any(|path| path.ends_with("records.redb")),
        "the record stores are searched too"
    );
    for path in kept {
        let bytes = if path == node_dir.join("ledger.redb") {
            ledger.clone()
        } else {
            std::fs::read(&path).unwrap()
        };
        for needle in &needles {
            searched += 1;
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle:?} found in {}",
                path.display()
            );
        }
    }
    assert!(searched > needles.len());
}

#[test]
fn verify_refuses_a_missing_store_and_a_truncated_one() {
    // Goal: verify exits non-zero with a message, never panics, on stores that are absent or cut.
    let dir = tempfile::tempdir().unwrap();
    let missing = medledger(&["verify", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("does not exist"),
        "{}",
        text(&missing)
    );

    let data = dir.path().join("demo");
    assert!(
        medledger(&["demo", "--once", "--data-dir", data.to_str().unwrap()])
            .status
            .success()
    );
    let file = data.join("nodes").join("hospital-a").join("ledger.redb");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let cut = medledger(&[
        "verify",
        "--data-dir",
        data.join("nodes").join("hospital-a").to_str().unwrap(),
    ]);
    assert!(!cut.status.success(), "a truncated store verified");
    assert!(!text(&cut).contains("panicked"), "{}", text(&cut));
}

#[test]
fn verify_against_a_tree_head_held_elsewhere_catches_rollback_and_rewrite() {
    // Goal: with a signed tree head kept outside the node, `verify --tree-head` passes on
    // the ledger that head describes, and fails when the ledger holds less than the head
    // (a rollback) or other entries under the same size (a rewrite), or the head is forged.
    use medledger_core::audit::SignedTreeHead;
    use medledger_node::consortium::Identity;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    assert!(
        medledger(&["demo", "--once", "--data-dir", data.to_str().unwrap()])
            .status
            .success()
    );
    let node_dir = data.join("nodes").join("hospital-a");
    let root = data.join("keys").join("root.cert.pem");
    let verify_with = |head: &SignedTreeHead| {
        let file = dir.path().join("head.json");
        std::fs::write(&file, serde_json::to_string(head).unwrap()).unwrap();
        medledger(&[
            "verify",
            "--data-dir",
            node_dir.to_str().unwrap(),
            "--tree-head",
            file.to_str().unwrap(),
            "--root-cert",
            root.to_str().unwrap(),
        ])
    };
    let kept: SignedTreeHead =
        serde_json::from_str(&std::fs::read_to_string(data.join("tree-head.json")).unwrap())
            .unwrap();
    let matched = verify_with(&kept);
    assert!(matched.status.success(), "{}", text(&matched));
    assert!(text(&matched).contains("ledger matches the tree head"));

    // The node's own key signs heads the stored ledger does not match, as a node whose
    // store was rolled back or rewritten after signing would have.
    let node = Identity::load(&node_dir.join("node.identity.json")).unwrap();
    let signed = |change: &dyn Fn(&mut SignedTreeHead)| {
        let mut head = kept.clone();
        change(&mut head);
        head.signature = node.key.sign(&head.tree_head.signing_bytes());
        head
    };
    let longer = signed(&|head| head.tree_head.log_size += 1);
    let rolled_back = verify_with(&longer);
    assert!(!rolled_back.status.success());
    assert!(
        text(&rolled_back).contains("rolled back"),
        "{}",
        text(&rolled_back)
    );

    let other_root = signed(&|head| head.tree_head.log_root.0[0] ^= 1);
    let rewritten = verify_with(&other_root);
    assert!(!rewritten.status.success());
    assert!(
        text(&rewritten).contains("history was rewritten"),
        "{}",
        text(&rewritten)
    );

    let mut forged = kept.clone();
    forged.tree_head.log_size -= 1;
    let refused = verify_with(&forged);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("the tree head"),
        "{}",
        text(&refused)
    );
}

//! A node killed with SIGKILL while clients are writing loses nothing it acknowledged, and
//! its store still verifies from genesis after the crash and after the restart.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn medledger(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medledger"))
        .args(args)
        .output()
        .expect("the medledger binary runs")
}

fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

fn start_node(data_dir: &Path, address: &str) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_medledger"))
        .args([
            "node",
            "run",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--listen",
            address,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the node starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let url = format!("http://{address}");
    while !medledger(&["query", "--node", &url, "/v1/status"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the node did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// Registers a new patient; Some(tx id) when the node acknowledged the commit.
fn register(dir: &Path, url: &str, n: usize) -> Option<String> {
    let identity = dir.join(format!("patient-{n}.json"));
    let made = medledger(&[
        "identity",
        "new-patient",
        "--out",
        identity.to_str().unwrap(),
    ]);
    assert!(made.status.success());
    let sent = medledger(&[
        "tx",
        "--node",
        url,
        "--as",
        identity.to_str().unwrap(),
        "register-patient",
    ]);
    if !sent.status.success() {
        return None;
    }
    let answer: serde_json::Value = serde_json::from_slice(&sent.stdout).expect("tx prints JSON");
    assert_eq!(answer["outcome"]["outcome"], "committed", "{answer}");
    Some(answer["tx_id"].as_str().unwrap().to_string())
}

#[test]
fn a_killed_node_keeps_every_acknowledged_transaction() {
    // Goal: after SIGKILL in the middle of a stream of writes, every transaction the node
    // acknowledged is committed after restart, and `verify` passes on the crashed store.
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let node_dir = dir.path().join("node");
    assert!(medledger(&[
        "consortium",
        "create",
        "--dir",
        keys.to_str().unwrap(),
        "--org",
        "hospital-a:hospital"
    ])
    .status
    .success());
    let init = medledger(&[
        "node",
        "init",
        "--data-dir",
        node_dir.to_str().unwrap(),
        "--genesis",
        keys.join("genesis.json").to_str().unwrap(),
        "--identity",
        keys.join("orgs/hospital-a/node.identity.json")
            .to_str()
            .unwrap(),
    ]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    let address = free_address();
    let url = format!("http://{address}");
    let mut acknowledged = Vec::new();
    for round in 0..3 {
        let mut node = start_node(&node_dir, &address);
        // Writers keep going while the node is killed under them.
        let writers: Vec<_> = (0..4)
            .map(|writer| {
                let (dir, url) = (dir.path().to_path_buf(), url.clone());
                std::thread::spawn(move || {
                    let mut ids = Vec::new();
                    for n in 0..1000 {
                        match register(&dir, &url, round * 100_000 + writer * 1000 + n) {
                            Some(id) => ids.push(id),
                            None => break,
                        }
                    }
                    ids
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1500));
        node.kill().expect("SIGKILL");
        node.wait().unwrap();
        for writer in writers {
            acknowledged.extend(writer.join().unwrap());
        }
        let verified = medledger(&["verify", "--data-dir", node_dir.to_str().unwrap()]);
        assert!(
            verified.status.success(),
            "the crashed store does not verify: {}",
            String::from_utf8_lossy(&verified.stderr)
        );
    }
    assert!(
        acknowledged.len() >= 12,
        "too few writes got through: {}",
        acknowledged.len()
    );

    let mut node = start_node(&node_dir, &address);
    for id in &acknowledged {
        let found = medledger(&["query", "--node", &url, &format!("/v1/transactions/{id}")]);
        assert!(
            found.status.success(),
            "acknowledged tx {id} is missing after the crash"
        );
    }
    node.kill().unwrap();
    node.wait().unwrap();
    println!(
        "{} acknowledged transactions survived 3 SIGKILLs",
        acknowledged.len()
    );
}

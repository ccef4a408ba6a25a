//! Three member nodes in one process, each with its own store, talking mutual TLS on
//! loopback: transactions submitted at any node commit on all of them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use medledger_core::identity::OrgKind;
use medledger_core::tx::TxBody;
use medledger_node::cluster::{ClusterNode, ClusterSettings};
use medledger_node::consensus::{raft_id, NodeInfo};
use medledger_node::consortium::{Consortium, Identity};
use medledger_node::ledger::{initialise, now_ms, NodeIdentity};
use medledger_node::pki::Validity;
use medledger_node::store::Store;

const CHAIN: &str = "cluster-test";
const DAY_MS: u64 = 86_400_000;

struct Cluster {
    consortium: Consortium,
    nodes: Vec<ClusterNode>,
    _dirs: Vec<tempfile::TempDir>,
}

async fn start_cluster(orgs: &[&str]) -> Cluster {
    let now = now_ms();
    let validity = Validity {
        not_before_ms: now - DAY_MS,
        not_after_ms: now + 365 * DAY_MS,
    };
    let kinds: Vec<(&str, OrgKind)> = orgs.iter().map(|org| (*org, OrgKind::Hospital)).collect();
    let consortium = Consortium::create(CHAIN, &kinds, now - 1000, validity).unwrap();
    let mut listeners = Vec::new();
    let mut infos = BTreeMap::new();
    for org in orgs {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let info = NodeInfo {
            node: format!("node@{org}"),
            peer_addr: listener.local_addr().unwrap().to_string(),
            api_url: String::new(),
        };
        infos.insert(raft_id(org), info.clone());
        listeners.push((org.to_string(), listener, info));
    }
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for (org, listener, info) in listeners {
        let dir = tempfile::tempdir().unwrap();
        initialise(dir.path(), &consortium.genesis).unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let identity = NodeIdentity::from_member(&consortium.org(&org).unwrap().node).unwrap();
        let settings = ClusterSettings {
            heartbeat_ms: 50,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            ..ClusterSettings::default()
        };
        let node = ClusterNode::start(store, identity, info, listener, settings)
            .await
            .unwrap();
        nodes.push(node);
        dirs.push(dir);
    }
    for node in &nodes {
        node.bootstrap(infos.clone()).await.unwrap();
    }
    Cluster {
        consortium,
        nodes,
        _dirs: dirs,
    }
}

async fn wait_for_leader(cluster: &Cluster) -> u64 {
    for _ in 0..200 {
        if let Some(leader) = cluster.nodes[0].raft.current_leader().await {
            return leader;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no leader elected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_submitted_at_a_follower_commits_on_every_node() {
    // Proves forwarding, replication and apply: a patient registration sent to a follower
    // is acknowledged there, and every node ends with the same chain head.
    let cluster = start_cluster(&["hospital-a", "hospital-b", "lab-x"]).await;
    let leader = wait_for_leader(&cluster).await;
    let follower = cluster.nodes.iter().find(|node| node.id != leader).unwrap();
    let patient = Identity::new_patient().unwrap();
    let tx = patient.sign(
        CHAIN,
        1,
        now_ms() + 60_000,
        TxBody::RegisterPatient {
            public_key: patient.key.public_key(),
        },
    );
    let committed = follower.ledger.submit(tx).await.expect("committed");
    assert!(committed.outcome.is_committed(), "{:?}", committed.outcome);
    let height = committed.height;
    for _ in 0..200 {
        let heads: Vec<_> = cluster
            .nodes
            .iter()
            .map(|node| node.ledger.store().head().unwrap().unwrap())
            .collect();
        if heads.iter().all(|head| head.height >= height) {
            assert!(heads.windows(2).all(|pair| pair[0] == pair[1]), "{heads:?}");
            for node in &cluster.nodes {
                node.shutdown().await;
            }
            let _ = &cluster.consortium;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not every node applied block {height}");
}

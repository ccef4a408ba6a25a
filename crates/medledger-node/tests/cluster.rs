//! Three member nodes in one process, each with its own store, talking mutual TLS on
//! loopback: transactions submitted at any node commit on all of them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use medledger_core::identity::OrgKind;
use medledger_core::tx::TxBody;
use medledger_node::cluster::{ClusterNode, ClusterSettings};
use medledger_node::consensus::NodeInfo;
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

impl Cluster {
    /// Signs `body` as `who` with the next nonce and commits it through node `at`.
    async fn commit(&self, at: usize, who: &Identity, nonce: u64, body: TxBody) {
        let tx = who.sign(CHAIN, nonce, now_ms() + 60_000, body);
        let committed = self.nodes[at].ledger.submit(tx).await.expect("committed");
        assert!(
            committed.outcome.is_committed(),
            "{}: {:?}",
            who.id,
            committed.outcome
        );
        // Every node applies it before the next step, which may go through any of them.
        for _ in 0..500 {
            if self
                .nodes
                .iter()
                .all(|node| node.ledger.store().head().unwrap().unwrap().height >= committed.height)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not every node applied block {}", committed.height);
    }
}

fn settings() -> ClusterSettings {
    ClusterSettings {
        heartbeat_ms: 50,
        election_timeout_min_ms: 300,
        election_timeout_max_ms: 600,
        // Small, so that tests see snapshots taken and logs purged.
        snapshot_every_entries: 10,
        ..ClusterSettings::default()
    }
}

fn validity() -> Validity {
    let now = now_ms();
    Validity {
        not_before_ms: now - DAY_MS,
        not_after_ms: now + 365 * DAY_MS,
    }
}

/// Starts `member`'s node on a fresh store holding the consortium's genesis.
async fn start_node(
    consortium: &Consortium,
    member: &Identity,
    listener: tokio::net::TcpListener,
    dirs: &mut Vec<tempfile::TempDir>,
) -> ClusterNode {
    let dir = tempfile::tempdir().unwrap();
    initialise(dir.path(), &consortium.genesis).unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let identity = NodeIdentity::from_member(member).unwrap();
    let info = NodeInfo {
        node: member.id.clone(),
        peer_addr: listener.local_addr().unwrap().to_string(),
        api_url: String::new(),
    };
    dirs.push(dir);
    ClusterNode::start(store, identity, info, listener, settings())
        .await
        .unwrap()
}

async fn start_cluster(orgs: &[&str]) -> Cluster {
    let kinds: Vec<(&str, OrgKind)> = orgs.iter().map(|org| (*org, OrgKind::Hospital)).collect();
    let consortium = Consortium::create(CHAIN, &kinds, now_ms() - 1000, validity()).unwrap();
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for org in orgs {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let member = &consortium.org(org).unwrap().node;
        nodes.push(start_node(&consortium, member, listener, &mut dirs).await);
    }
    let founders: BTreeMap<u64, NodeInfo> = nodes
        .iter()
        .map(|node| (node.id, node.info.clone()))
        .collect();
    for node in &nodes {
        node.bootstrap(founders.clone()).await.unwrap();
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

// ---- the node-to-node transport -------------------------------------------------------

use medledger_core::contracts::{Rejection, TxOutcome};
use medledger_node::ledger::SubmitError;
use medledger_node::rpc::{Request, Response};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client that trusts any server, so that only the server's judgement of the client is
/// under test.
#[derive(Debug)]
struct TrustAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for TrustAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Calls `Status` on a node's peer port presenting `member`'s certificate chain; returns the
/// answer, or why there was none.
async fn call_as(member: &Identity, peer_addr: &str) -> Result<Response, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![
        CertificateDer::from(member.certificate.as_ref().unwrap().der.clone()),
        CertificateDer::from(member.ca_certificate.as_ref().unwrap().der.clone()),
    ];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(member.key.pkcs8_der().to_vec()));
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(peer_addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("hospital-a".to_string()).unwrap();
    let exchange = async {
        let mut stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let request = serde_json::to_vec(&Request::Status).unwrap();
        stream
            .write_all(&(request.len() as u32).to_be_bytes())
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(&request)
            .await
            .map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        let mut len = [0u8; 4];
        stream
            .read_exact(&mut len)
            .await
            .map_err(|e| e.to_string())?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        stream
            .read_exact(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice::<Response>(&body).map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5 s".to_string())?
}

/// Sends raw bytes to a peer port and returns whatever comes back before it closes.
async fn raw_exchange(peer_addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = tokio::net::TcpStream::connect(peer_addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_a_members_node_certificate_plaintext_and_old_tls_are_refused() {
    // Proves that the peer port answers only a TLS 1.2+ client presenting the enrolled node
    // certificate of an active member: a node certificate from a CA the ledger does not
    // know, a member's non-node certificate, a plaintext request and a TLS 1.1 hello all
    // get no answer, while the genuine node certificate does.
    let cluster = start_cluster(&["hospital-a", "hospital-b", "lab-x"]).await;
    wait_for_leader(&cluster).await;
    let target = cluster.nodes[0].info.peer_addr.clone();

    let genuine = &cluster.consortium.org("hospital-b").unwrap().node;
    let answer = call_as(genuine, &target).await;
    assert!(
        matches!(&answer, Ok(Response::Done(Ok(status))) if status["role"].is_string()),
        "the genuine node certificate must be served: {answer:?}"
    );

    // The same organisation names under another root: an unknown CA.
    let now = now_ms();
    let validity = Validity {
        not_before_ms: now - DAY_MS,
        not_after_ms: now + DAY_MS,
    };
    let impostors =
        Consortium::create(CHAIN, &[("hospital-b", OrgKind::Hospital)], now, validity).unwrap();
    let impostor = &impostors.org("hospital-b").unwrap().node;
    let answer = call_as(impostor, &target).await;
    assert!(
        answer.is_err(),
        "a foreign CA's node was served: {answer:?}"
    );

    let admin = &cluster.consortium.org("hospital-b").unwrap().admin;
    let answer = call_as(admin, &target).await;
    assert!(
        answer.is_err(),
        "a non-node certificate was served: {answer:?}"
    );

    let request = serde_json::to_vec(&Request::Status).unwrap();
    let mut frame = (request.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&request);
    let answer = raw_exchange(&target, &frame).await;
    assert!(
        serde_json::from_slice::<Response>(answer.get(4..).unwrap_or_default()).is_err(),
        "a plaintext request got an answer"
    );

    // A TLS 1.1 ClientHello (record and hello version 3.2, one TLS 1.1 cipher suite).
    let mut hello = vec![0x03, 0x02];
    hello.extend_from_slice(&[0x11; 32]); // random
    hello.push(0); // no session id
    hello.extend_from_slice(&[0x00, 0x02, 0x00, 0x2f]); // TLS_RSA_WITH_AES_128_CBC_SHA
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0x00, 0x00, hello.len() as u8];
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x02, 0x00, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    let answer = raw_exchange(&target, &record).await;
    assert!(
        answer.first() != Some(&0x16),
        "a TLS 1.1 hello got a handshake answer: {answer:02x?}"
    );
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "expected an alert or a closed connection, got {answer:02x?}"
    );

    for node in &cluster.nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_replayed_at_another_node_is_refused_and_a_forgery_never_orders() {
    // Proves that replay protection holds across nodes (the same signed bytes sent to a
    // second node are refused by the ledger as a duplicate, changing nothing but a leaf)
    // and that a forged signature is refused at admission, before any ordering.
    let cluster = start_cluster(&["hospital-a", "hospital-b", "lab-x"]).await;
    wait_for_leader(&cluster).await;
    let patient = Identity::new_patient().unwrap();
    let tx = patient.sign(
        CHAIN,
        1,
        now_ms() + 60_000,
        TxBody::RegisterPatient {
            public_key: patient.key.public_key(),
        },
    );
    let first = cluster.nodes[0].ledger.submit(tx.clone()).await.unwrap();
    assert!(first.outcome.is_committed());
    wait_until("node 1 applied the registration", || {
        cluster.nodes[1]
            .ledger
            .store()
            .head()
            .unwrap()
            .unwrap()
            .height
            >= first.height
    })
    .await;
    let again = cluster.nodes[1].ledger.submit(tx.clone()).await.unwrap();
    assert!(
        matches!(
            &again.outcome,
            TxOutcome::Rejected { rejection: Rejection::Duplicate { tx_id } } if *tx_id == first.tx_id
        ),
        "{:?}",
        again.outcome
    );

    let mut forged = tx.clone();
    forged.payload.nonce = 2;
    // At the node that has applied the registration, so the signer is known there.
    let refused = cluster.nodes[1].ledger.submit(forged).await;
    assert_eq!(refused.unwrap_err(), SubmitError::BadSignature);

    for node in &cluster.nodes {
        node.shutdown().await;
    }
}

// ---- membership follows governance ----------------------------------------------------

use medledger_core::model::GovernanceAction;
use medledger_node::consortium::OrgAuthority;

fn copy(identity: &Identity) -> Identity {
    Identity {
        id: identity.id.clone(),
        key: medledger_node::pki::KeyPair::from_pkcs8_der(identity.key.pkcs8_der()).unwrap(),
        certificate: identity.certificate.clone(),
        ca_certificate: identity.ca_certificate.clone(),
        encryption_keys: identity.encryption_keys.clone(),
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_members_node_joins_by_snapshot_and_a_suspended_one_is_dropped() {
    // Proves that membership follows the ledger's governance: the node of an organisation
    // admitted by vote joins as a learner, catches up by snapshot (the leader's log was
    // already purged) plus log, becomes a voter with the same chain; once the organisation
    // is suspended by vote, its node is removed from the voters and refused by its peers.
    let mut cluster = start_cluster(&["hospital-a", "hospital-b", "lab-x"]).await;
    wait_for_leader(&cluster).await;
    // Enough blocks that snapshots are taken and the log before them purged.
    for _ in 0..30 {
        let patient = Identity::new_patient().unwrap();
        let body = TxBody::RegisterPatient {
            public_key: patient.key.public_key(),
        };
        cluster.commit(0, &patient, 1, body).await;
    }
    let leader = wait_for_leader(&cluster).await;
    let leader_node = cluster.nodes.iter().find(|n| n.id == leader).unwrap();
    wait_until("the leader purged its log", || {
        leader_node.raft.metrics().borrow().purged.is_some()
    })
    .await;

    let clinic = OrgAuthority::create(
        &cluster.consortium.root,
        "clinic-c",
        OrgKind::Clinic,
        validity(),
    )
    .unwrap();
    let clinic_admin = clinic
        .issue(
            "admin",
            medledger_core::identity::Role::OrgAdmin,
            validity(),
        )
        .unwrap();
    let clinic_node = clinic
        .issue("node", medledger_core::identity::Role::Node, validity())
        .unwrap();
    let admin_a = copy(&cluster.consortium.org("hospital-a").unwrap().admin);
    let admin_b = copy(&cluster.consortium.org("hospital-b").unwrap().admin);
    let admit = GovernanceAction::AdmitOrg {
        org: "clinic-c".into(),
        org_kind: OrgKind::Clinic,
        ca_certificate: medledger_core::crypto::base64url(&clinic.ca_certificate.der),
        admin_certificate: clinic_admin.certificate_text().unwrap(),
    };
    cluster
        .commit(0, &admin_a, 1, TxBody::ProposeGovernance { action: admit })
        .await;
    cluster
        .commit(
            1,
            &admin_b,
            1,
            TxBody::VoteGovernance {
                proposal_id: 1,
                approve: true,
            },
        )
        .await;
    let enroll = TxBody::EnrollUser {
        certificate: clinic_node.certificate_text().unwrap(),
    };
    cluster.commit(2, &clinic_admin, 1, enroll).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut dirs = Vec::new();
    let newcomer = start_node(&cluster.consortium, &clinic_node, listener, &mut dirs).await;
    let seeds: Vec<NodeInfo> = cluster.nodes.iter().map(|n| n.info.clone()).collect();
    newcomer
        .join(&seeds, Duration::from_secs(20))
        .await
        .unwrap();
    let newcomer_id = newcomer.id;
    wait_until("the newcomer is a voter", || {
        leader_node
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == newcomer_id)
    })
    .await;
    let head = cluster.nodes[0].ledger.store().head().unwrap().unwrap();
    wait_until("the newcomer holds the chain", || {
        newcomer.ledger.store().head().unwrap().unwrap().height >= head.height
    })
    .await;
    let block = |node: &ClusterNode| node.ledger.store().block(head.height).unwrap().unwrap();
    assert_eq!(block(&newcomer), block(&cluster.nodes[0]));
    // The newcomer orders too: a transaction sent to it commits everywhere.
    cluster.nodes.push(newcomer);
    let patient = Identity::new_patient().unwrap();
    let body = TxBody::RegisterPatient {
        public_key: patient.key.public_key(),
    };
    cluster.commit(3, &patient, 1, body).await;

    let suspend = GovernanceAction::SuspendOrg {
        org: "clinic-c".into(),
    };
    cluster
        .commit(
            0,
            &admin_a,
            2,
            TxBody::ProposeGovernance { action: suspend },
        )
        .await;
    cluster
        .commit(
            1,
            &admin_b,
            2,
            TxBody::VoteGovernance {
                proposal_id: 2,
                approve: true,
            },
        )
        .await;
    let leader = wait_for_leader(&cluster).await;
    let leader_node = cluster.nodes.iter().find(|n| n.id == leader).unwrap();
    wait_until("the suspended member's node is no voter", || {
        let metrics = leader_node.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        !membership.voter_ids().any(|id| id == newcomer_id)
            && membership.get_node(&newcomer_id).is_none()
    })
    .await;
    let answer = call_as(&clinic_node, &cluster.nodes[0].info.peer_addr).await;
    assert!(
        answer.is_err()
            || matches!(&answer, Ok(Response::Done(Err(reason))) if reason.starts_with("peer refused")),
        "a suspended member's node was served: {answer:?}"
    );
    for node in &cluster.nodes {
        node.shutdown().await;
    }
}

// ---- divergence ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_chain_differs_from_the_leaders_stops_instead_of_serving() {
    // Proves the divergence stop: a committed proposal whose checkpoint names a block this
    // node does not hold makes the state machine fail with a "state diverged" fatal error,
    // store nothing, and refuse every later entry.
    use medledger_node::consensus::state_machine::Shared;
    use medledger_node::consensus::{Checkpoint, Proposal, StateMachine};
    use medledger_node::ledger::LedgerStats;
    use openraft::storage::RaftStateMachine;
    use std::sync::RwLock;

    let consortium = Consortium::create(
        CHAIN,
        &[("hospital-a", OrgKind::Hospital)],
        now_ms(),
        validity(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let head = initialise(dir.path(), &consortium.genesis).unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let identity =
        Arc::new(NodeIdentity::from_member(&consortium.org("hospital-a").unwrap().node).unwrap());
    let placeholder = Arc::new(medledger_core::audit::SignedTreeHead {
        tree_head: medledger_core::audit::TreeHead {
            chain_id: head.chain_id.clone(),
            height: head.height,
            log_size: head.log_size,
            log_root: head.log_root,
            time_ms: head.time_ms,
        },
        signature: identity.key.sign(b"placeholder"),
        signer: identity.id.clone(),
        certificate_chain: identity.certificate_chain.clone(),
    });
    let shared = Arc::new(Shared::new(
        store.clone(),
        identity.clone(),
        Arc::new(RwLock::new(placeholder)),
        Arc::new(LedgerStats::default()),
        tokio::sync::watch::channel(head.clone()).0,
    ));
    let mut machine = StateMachine::new(shared.clone(), true);
    let patient = Identity::new_patient().unwrap();
    let tx = patient.sign(
        CHAIN,
        1,
        now_ms() + 60_000,
        TxBody::RegisterPatient {
            public_key: patient.key.public_key(),
        },
    );
    let entry = |index: u64, hash: medledger_core::Hash| openraft::Entry {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 0), index),
        payload: openraft::EntryPayload::Normal(Proposal {
            proposer: "node@hospital-b".into(),
            time_ms: now_ms(),
            checkpoint: Some(Checkpoint {
                height: 0,
                block_hash: hash,
            }),
            txs: vec![tx.clone()],
        }),
    };
    let wrong = medledger_core::Hash::digest_parts(&[b"another chain"]);
    let error = machine.apply(vec![entry(1, wrong)]).await.unwrap_err();
    assert!(error.to_string().contains("state diverged"), "{error}");
    let reason = shared.fatal().expect("the node is stopped");
    assert!(reason.contains("state diverged: block 0"), "{reason}");
    assert_eq!(store.head().unwrap().unwrap(), head, "nothing was stored");
    // Even a proposal that would fit is refused now.
    assert!(machine
        .apply(vec![entry(2, head.block_hash)])
        .await
        .is_err());
    assert_eq!(store.head().unwrap().unwrap(), head);
}

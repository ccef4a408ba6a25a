//! A member node in a Raft consortium: consensus, node-to-node RPC, forwarding to the
//! leader, block proposals, membership that follows the ledger's governance, and status.
//!
//! Client transactions enter at any node (`Ledger::submit`): the node checks the signature,
//! registers the waiting client, and hands the transaction to its dispatcher. The dispatcher
//! of the leader batches what waits into a proposal and appends it to the Raft log (a few
//! proposals in flight, so the next batch gathers while one is replicated); a follower's
//! dispatcher forwards its batches to the leader. Every node answers its own clients when
//! it has applied the block that holds their transaction: committed by a quorum, applied
//! here. A client whose wait ends first hears "outcome unknown" with its tx id.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use medledger_core::cert::{check_valid_at, parse_certificate, verify_issued_by};
use medledger_core::contracts::ChainConfig;
use medledger_core::crypto::{base64url, from_base64url};
use medledger_core::identity::{user_id, Role};
use medledger_core::model::{Org, OrgStatus, User, UserStatus};
use medledger_core::state::keys;
use medledger_core::tx::SignedTx;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, ServerState, SnapshotPolicy};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::consensus::network::Peers;
use crate::consensus::state_machine::{self, Shared};
use crate::consensus::{raft_id, Checkpoint, LogStore, NodeInfo, Proposal, Raft, StateMachine};
use crate::ledger::{
    now_ms, sign_tree_head, Ledger, LedgerStats, NodeIdentity, Orderer, OrderingConfig, Pending,
    SubmitError,
};
use crate::records::service::{CustodianLink, FetchAnswer, FetchRequest, WireError};
use crate::records::{RecordError, RecordService};
use crate::rpc::{self, Handler, Request, Response};
use crate::store::{Store, StoreError};
use crate::tls::{self, PeerCheck, PeerIdentity, TlsConfigs};

/// Consensus settings of a node (all nodes of a consortium should agree on the timing).
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub ordering: OrderingConfig,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Proposals appended but not yet applied; the next batch gathers meanwhile.
    pub proposals_in_flight_max: usize,
    /// Deadline of a forwarded batch or a control call to a peer.
    pub rpc_timeout_ms: u64,
    /// Raft entries between snapshots (after which the log before them is purged).
    pub snapshot_every_entries: u64,
    /// Blocking IO on tokio's blocking pool (true for real nodes).
    pub offload_io: bool,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            ordering: OrderingConfig::default(),
            heartbeat_ms: 100,
            election_timeout_min_ms: 600,
            election_timeout_max_ms: 1200,
            proposals_in_flight_max: 4,
            rpc_timeout_ms: 2000,
            snapshot_every_entries: 2000,
            offload_io: true,
        }
    }
}

/// The consensus view of a node, for `/v1/status` and operators.
#[derive(Debug, Clone, Serialize)]
pub struct ConsensusStatus {
    pub raft_id: u64,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: &'static str,
    pub term: u64,
    pub leader: Option<String>,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    /// On the leader: each peer's replicated log index and how far behind it is.
    pub peers: Vec<PeerStatus>,
    pub fatal: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub node: String,
    pub matched_index: Option<u64>,
    pub lag: Option<u64>,
}

/// A running member node.
pub struct ClusterNode {
    pub id: u64,
    pub info: NodeInfo,
    pub raft: Raft,
    pub ledger: Arc<Ledger>,
    shared: Arc<Shared>,
    peers: Peers,
    control: Arc<Control>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stop: watch::Sender<bool>,
}

/// State the node's tasks share.
struct Control {
    id: u64,
    settings: ClusterSettings,
    /// Set while the leader hands over: it proposes nothing meanwhile.
    paused: AtomicBool,
    outbox: mpsc::Sender<(SignedTx, bool)>,
    shared: Arc<Shared>,
    /// The record service peers fetch from (held weakly: the service holds the ledger).
    records: RwLock<Option<Weak<RecordService>>>,
}

/// Ordering through Raft, seen by the ledger.
struct RaftOrderer {
    shared: Arc<Shared>,
    raft: Raft,
    peers: Peers,
    control: Arc<Control>,
}

impl Orderer for RaftOrderer {
    fn enqueue(&self, pending: Pending) -> Result<(), SubmitError> {
        let tx = pending.tx.tx().clone();
        let tx_id = pending.tx.id();
        self.shared.waiters.register(tx_id, pending.reply);
        self.shared
            .admitted
            .lock()
            .expect("admitted lock")
            .insert(pending.tx);
        self.control
            .outbox
            .try_send((tx, pending.urgent))
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => SubmitError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => {
                    SubmitError::Stopped("the node is shutting down".into())
                }
            })
    }

    fn fatal(&self) -> Option<String> {
        self.shared.fatal()
    }

    fn consensus(&self) -> Option<serde_json::Value> {
        serde_json::to_value(consensus_status(&self.raft, &self.shared)).ok()
    }

    fn transfer_leader(&self, to: &str) -> crate::ledger::TransferFuture {
        let raft = self.raft.clone();
        let peers = self.peers.clone();
        let control = self.control.clone();
        let to = to.to_string();
        Box::pin(async move {
            let org = medledger_core::identity::split_user_id(&to)
                .map(|(org, _)| org.to_string())
                .ok_or_else(|| format!("{to:?} is not a node id (name@org)"))?;
            transfer_leader(&raft, &peers, &control, raft_id(&org)).await
        })
    }
}

fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

fn consensus_status(raft: &Raft, shared: &Shared) -> ConsensusStatus {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let name = |id: &u64| {
        membership
            .get_node(id)
            .map(|node| node.node.clone())
            .unwrap_or_else(|| id.to_string())
    };
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let learners: Vec<String> = membership.learner_ids().map(|id| name(&id)).collect();
    let last = metrics.last_log_index;
    let peers = match &metrics.replication {
        None => Vec::new(),
        Some(replication) => replication
            .iter()
            .filter(|(id, _)| **id != metrics.id)
            .map(|(id, matched)| {
                let matched_index = matched.map(|log_id| log_id.index);
                PeerStatus {
                    node: name(id),
                    matched_index,
                    lag: last.map(|last| last.saturating_sub(matched_index.unwrap_or(0))),
                }
            })
            .collect(),
    };
    ConsensusStatus {
        raft_id: metrics.id,
        role: role_name(metrics.state),
        term: metrics.current_term,
        leader: metrics.current_leader.as_ref().map(name),
        last_log_index: last,
        last_applied_index: metrics.last_applied.map(|log_id| log_id.index),
        voters: voters.iter().map(name).collect(),
        learners,
        peers,
        fatal: shared.fatal(),
    }
}

/// Who may connect: node certificates the ledger enrolled for active members.
pub struct LedgerPeerCheck {
    store: Arc<Store>,
    /// While this node is not yet a voter it may not know every member: it then also
    /// accepts a node certificate that chains to the consortium root.
    catching_up: AtomicBool,
}

impl LedgerPeerCheck {
    pub fn new(store: Arc<Store>) -> LedgerPeerCheck {
        LedgerPeerCheck {
            store,
            catching_up: AtomicBool::new(true),
        }
    }

    fn check_inner(
        &self,
        end_entity: &[u8],
        intermediates: &[&[u8]],
    ) -> Result<PeerIdentity, String> {
        let info = parse_certificate(end_entity).map_err(|e| e.to_string())?;
        if info.role != Some(Role::Node) {
            return Err("not a node certificate".into());
        }
        check_valid_at(&info, now_ms()).map_err(|e| e.to_string())?;
        let org = info.organization.clone();
        let node = user_id(&org, &info.common_name);
        let snapshot = self.store.snapshot().map_err(|e| e.to_string())?;
        let known: Option<Org> = snapshot
            .value(&keys::org(&org))
            .map_err(|e| e.to_string())?;
        match known {
            Some(record) => {
                if record.status != OrgStatus::Active {
                    return Err(format!("{org} is not an active member"));
                }
                let user: Option<User> = snapshot
                    .value(&keys::user(&node))
                    .map_err(|e| e.to_string())?;
                match user {
                    Some(user)
                        if user.role == Role::Node
                            && user.status == UserStatus::Active
                            && user.certificate == base64url(end_entity) =>
                    {
                        Ok(PeerIdentity { node, org })
                    }
                    Some(_) => Err(format!(
                        "{node} is revoked or presents a certificate other than its enrolled one"
                    )),
                    None => Err(format!("{node} is not enrolled")),
                }
            }
            None if self.catching_up.load(Ordering::Relaxed) => {
                let ca = intermediates
                    .first()
                    .ok_or("no organisation CA presented")?;
                verify_issued_by(end_entity, ca).map_err(|e| e.to_string())?;
                let ca_info = parse_certificate(ca).map_err(|e| e.to_string())?;
                if !ca_info.is_ca || ca_info.organization != org {
                    return Err("the presented CA is not the organisation's".into());
                }
                check_valid_at(&ca_info, now_ms()).map_err(|e| e.to_string())?;
                let chain: Option<ChainConfig> =
                    snapshot.value(keys::CHAIN).map_err(|e| e.to_string())?;
                let root = chain.ok_or("no chain configuration")?.root_certificate;
                let root = from_base64url(&root).map_err(|e| e.to_string())?;
                verify_issued_by(ca, &root).map_err(|e| e.to_string())?;
                Ok(PeerIdentity { node, org })
            }
            None => Err(format!("{org} is not a member")),
        }
    }
}

impl PeerCheck for LedgerPeerCheck {
    fn check(&self, end_entity: &[u8], intermediates: &[&[u8]]) -> Result<PeerIdentity, String> {
        self.check_inner(end_entity, intermediates)
    }
}

impl ClusterNode {
    /// Starts a node on an initialised store, serving peers on `peer_listener`. The node
    /// joins nothing by itself: call `bootstrap` (founders) or `join` (new members).
    pub async fn start(
        store: Arc<Store>,
        identity: NodeIdentity,
        info: NodeInfo,
        peer_listener: TcpListener,
        settings: ClusterSettings,
    ) -> Result<ClusterNode, String> {
        let head = store
            .head()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| StoreError::Empty.to_string())?;
        let id = raft_id(
            medledger_core::identity::split_user_id(&identity.id)
                .map(|(org, _)| org)
                .ok_or("the node id is not name@org")?,
        );
        let identity = Arc::new(identity);
        let latest = Arc::new(RwLock::new(Arc::new(sign_tree_head(&identity, &head))));
        let stats = Arc::new(LedgerStats::default());
        let (head_tx, _) = watch::channel(head.clone());
        let shared = Arc::new(Shared::new(
            store.clone(),
            identity.clone(),
            latest.clone(),
            stats.clone(),
            head_tx,
        ));
        let check = Arc::new(LedgerPeerCheck::new(store.clone()));
        let tls = tls::configs(&identity, check.clone()).map_err(|e| e.to_string())?;
        let peers = Peers::new(tls.clone());
        let config = Config {
            cluster_name: head.chain_id.clone(),
            heartbeat_interval: settings.heartbeat_ms,
            election_timeout_min: settings.election_timeout_min_ms,
            election_timeout_max: settings.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(settings.snapshot_every_entries),
            max_in_snapshot_log_to_keep: settings.snapshot_every_entries / 2,
            max_payload_entries: 64,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| e.to_string())?;
        let raft = Raft::new(
            id,
            Arc::new(config),
            peers.clone(),
            LogStore::with_stats(store.clone(), settings.offload_io, stats.clone()),
            StateMachine::new(shared.clone(), settings.offload_io),
        )
        .await
        .map_err(|e| e.to_string())?;
        let (outbox, inbox) = mpsc::channel(settings.ordering.queue_txs_max);
        let ordering = settings.ordering.clone();
        let control = Arc::new(Control {
            id,
            settings,
            paused: AtomicBool::new(false),
            outbox,
            shared: shared.clone(),
            records: RwLock::new(None),
        });
        let orderer = RaftOrderer {
            shared: shared.clone(),
            raft: raft.clone(),
            peers: peers.clone(),
            control: control.clone(),
        };
        let ledger = Arc::new(
            Ledger::with_orderer(store, identity, latest, stats, ordering, Box::new(orderer))
                .map_err(|e| e.to_string())?,
        );
        let (stop, stopped) = watch::channel(false);
        let node = ClusterNode {
            id,
            info,
            raft,
            ledger,
            shared,
            peers,
            control,
            tasks: Mutex::new(Vec::new()),
            stop,
        };
        let mut tasks = vec![
            tokio::spawn(dispatch(
                node.raft.clone(),
                node.shared.clone(),
                node.peers.clone(),
                node.control.clone(),
                inbox,
            )),
            tokio::spawn(keep_membership(
                node.raft.clone(),
                node.shared.clone(),
                check.clone(),
                node.control.clone(),
                stopped.clone(),
            )),
        ];
        let handler = node.handler();
        let mut serve_stop = stopped;
        tasks.push(tokio::spawn(rpc::serve(
            peer_listener,
            tls,
            check,
            handler,
            async move {
                let _ = serve_stop.wait_for(|stop| *stop).await;
            },
        )));
        *node.tasks.lock().expect("tasks lock") = tasks;
        Ok(node)
    }

    /// Founders: starts the Raft group with the founding nodes as voters. Every founder may
    /// call it with the same members; a node that already has a log ignores it.
    pub async fn bootstrap(&self, founders: BTreeMap<u64, NodeInfo>) -> Result<(), String> {
        match self.raft.initialize(founders).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(error) => Err(error.to_string()),
        }
    }

    /// A new member's node: asks the given peers (then whichever leader they name) to be
    /// added, as a learner that catches up and then as a voter. Returns once a peer
    /// accepted; catching up continues in the background.
    pub async fn join(&self, seeds: &[NodeInfo], deadline: Duration) -> Result<(), String> {
        let started = Instant::now();
        let mut candidates: Vec<NodeInfo> = seeds.to_vec();
        let mut last_error = String::from("no peers to ask");
        while started.elapsed() < deadline {
            let Some(peer) = candidates.first().cloned() else {
                candidates = seeds.to_vec();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            candidates.remove(0);
            let peer_id = node_raft_id(&peer);
            let client = self.peers.client(peer_id, &peer);
            let timeout = Duration::from_millis(self.control.settings.rpc_timeout_ms);
            match client
                .call(
                    &Request::Join {
                        node: self.info.clone(),
                    },
                    timeout,
                )
                .await
            {
                Ok(Response::Done(Ok(_))) => return Ok(()),
                Ok(Response::Done(Err(reason))) => {
                    if let Some(leader) = reason
                        .strip_prefix("not the leader; ask ")
                        .and_then(|json| serde_json::from_str::<NodeInfo>(json).ok())
                    {
                        candidates.insert(0, leader);
                    }
                    last_error = reason;
                }
                Ok(other) => last_error = format!("unexpected answer {other:?}"),
                Err(error) => last_error = error.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("no peer accepted this node: {last_error}"))
    }

    pub fn status(&self) -> ConsensusStatus {
        consensus_status(&self.raft, &self.shared)
    }

    /// Serves peers' record fetches from `service` from now on.
    pub fn attach_records(&self, service: &Arc<RecordService>) {
        *self.control.records.write().expect("records lock") = Some(Arc::downgrade(service));
    }

    /// Calls to other custodians' nodes, for this node's record service.
    pub fn custodian_link(&self) -> Arc<dyn CustodianLink> {
        Arc::new(PeerLink {
            raft: self.raft.clone(),
            peers: self.peers.clone(),
        })
    }

    /// Hands leadership to `to` (a voter): the leader stops proposing, waits until `to` has
    /// its whole log, tells every other voter to hold elections for a while and `to` to hold
    /// one now. Call it on any node: a follower passes the request to the leader.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), String> {
        transfer_leader(&self.raft, &self.peers, &self.control, to).await
    }

    /// Stops serving, ordering and Raft; the store stays as committed.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let _ = self.raft.shutdown().await;
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks lock"));
        for task in tasks {
            task.abort();
        }
    }

    fn handler(&self) -> Handler {
        let raft = self.raft.clone();
        let peers = self.peers.clone();
        let control = self.control.clone();
        Arc::new(move |peer, request| {
            let raft = raft.clone();
            let peers = peers.clone();
            let control = control.clone();
            Box::pin(async move { handle(raft, peers, control, peer, request).await })
        })
    }
}

fn node_raft_id(node: &NodeInfo) -> u64 {
    raft_id(
        medledger_core::identity::split_user_id(&node.node)
            .map(|(org, _)| org)
            .unwrap_or(&node.node),
    )
}

fn done(result: Result<serde_json::Value, String>) -> Response {
    Response::Done(result)
}

/// Serves one call from an authenticated peer.
async fn handle(
    raft: Raft,
    peers: Peers,
    control: Arc<Control>,
    peer: PeerIdentity,
    request: Request,
) -> Response {
    match request {
        Request::AppendEntries(rpc) => {
            state_machine::verify_ahead(&control.shared, state_machine::entry_txs(&rpc.entries));
            Response::AppendEntries(raft.append_entries(rpc).await)
        }
        Request::Vote(rpc) => Response::Vote(raft.vote(rpc).await),
        Request::InstallSnapshot(rpc) => {
            Response::InstallSnapshot(raft.install_snapshot(rpc).await)
        }
        Request::Forward { txs, urgent } => {
            state_machine::verify_ahead(&control.shared, &txs);
            for tx in txs {
                if control.outbox.try_send((tx, urgent)).is_err() {
                    return done(Err("overloaded: the ordering queue is full".into()));
                }
            }
            done(Ok(serde_json::Value::Null))
        }
        Request::Join { node } => {
            if node.node != peer.node {
                return done(Err(format!(
                    "{} may not ask to join as {}",
                    peer.node, node.node
                )));
            }
            if let Err(leader) = leader_or_hint(&raft) {
                return done(Err(leader));
            }
            let id = node_raft_id(&node);
            let membership = raft.metrics().borrow().membership_config.clone();
            if membership.membership().voter_ids().any(|voter| voter == id) {
                return done(Ok(serde_json::json!("already a voter")));
            }
            tokio::spawn(async move {
                // As a learner first: `blocking` waits until it has caught up.
                if let Err(error) = raft.add_learner(id, node.clone(), true).await {
                    eprintln!("medledger: adding {} as a learner: {error}", node.node);
                    return;
                }
                let voters = ChangeMembers::AddVoterIds([id].into_iter().collect());
                if let Err(error) = raft.change_membership(voters, false).await {
                    eprintln!("medledger: making {} a voter: {error}", node.node);
                }
            });
            done(Ok(serde_json::json!("accepted")))
        }
        Request::TransferLeader { to } => {
            match transfer_leader(&raft, &peers, &control, to).await {
                Ok(()) => done(Ok(serde_json::Value::Null)),
                Err(error) => done(Err(error)),
            }
        }
        Request::Handover { elect, window_ms } => {
            let window = Duration::from_millis(window_ms.min(30_000));
            if elect {
                tokio::spawn(async move {
                    let until = Instant::now() + window;
                    while Instant::now() < until {
                        let metrics = raft.metrics().borrow().clone();
                        if metrics.state == ServerState::Leader {
                            return;
                        }
                        let _ = raft.trigger().elect().await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
            } else {
                raft.runtime_config().elect(false);
                tokio::spawn(async move {
                    tokio::time::sleep(window).await;
                    raft.runtime_config().elect(true);
                });
            }
            done(Ok(serde_json::Value::Null))
        }
        Request::Fetch(fetch) => {
            let service = control
                .records
                .read()
                .expect("records lock")
                .as_ref()
                .and_then(Weak::upgrade);
            let answer = match service {
                None => Err(WireError {
                    code: "custodian_unavailable".into(),
                    message: "this node serves no records".into(),
                    access_tx: None,
                }),
                Some(service) => service
                    .serve(&peer.org, fetch)
                    .await
                    .map_err(|e| WireError::from(&e)),
            };
            Response::Fetched(answer)
        }
        Request::Status => {
            let metrics = raft.metrics().borrow().clone();
            done(Ok(serde_json::json!({
                "raft_id": metrics.id,
                "role": role_name(metrics.state),
                "term": metrics.current_term,
                "leader": metrics.current_leader,
                "last_applied_index": metrics.last_applied.map(|log_id| log_id.index),
            })))
        }
    }
}

/// Record fetches to other custodians, over the same mutual TLS as Raft.
struct PeerLink {
    raft: Raft,
    peers: Peers,
}

/// How long a fetch may take: the custodian's access entry must commit first.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

impl CustodianLink for PeerLink {
    fn fetch<'a>(
        &'a self,
        custodian: &'a str,
        request: &'a FetchRequest,
    ) -> Pin<Box<dyn Future<Output = Result<FetchAnswer, RecordError>> + Send + 'a>> {
        Box::pin(async move {
            let unavailable = |detail: String| RecordError::Unavailable {
                custodian: custodian.to_string(),
                detail,
            };
            let id = raft_id(custodian);
            let node = self
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_node(&id)
                .cloned()
                .ok_or_else(|| unavailable("no node of this organisation is a member".into()))?;
            let client = self.peers.client(id, &node);
            match client
                .call(&Request::Fetch(request.clone()), FETCH_TIMEOUT)
                .await
            {
                Ok(Response::Fetched(Ok(answer))) => Ok(answer),
                Ok(Response::Fetched(Err(error))) => Err(error.into_error(custodian)),
                Ok(Response::Done(Err(reason))) => Err(unavailable(reason)),
                Ok(other) => Err(unavailable(format!("unexpected answer {other:?}"))),
                Err(error) => Err(unavailable(error.to_string())),
            }
        })
    }
}

/// Ok on the leader; otherwise the text that names the leader to ask.
fn leader_or_hint(raft: &Raft) -> Result<(), String> {
    let metrics = raft.metrics().borrow().clone();
    if metrics.state == ServerState::Leader {
        return Ok(());
    }
    let membership = metrics.membership_config.membership();
    match metrics
        .current_leader
        .and_then(|leader| membership.get_node(&leader).cloned())
    {
        Some(leader) => Err(format!(
            "not the leader; ask {}",
            serde_json::to_string(&leader).expect("node info encodes")
        )),
        None => Err("no leader is known; retry shortly".into()),
    }
}

async fn transfer_leader(
    raft: &Raft,
    peers: &Peers,
    control: &Control,
    to: u64,
) -> Result<(), String> {
    let timeout = Duration::from_millis(control.settings.rpc_timeout_ms);
    let window_ms = control.settings.election_timeout_max_ms * 4;
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    if !membership.voter_ids().any(|voter| voter == to) {
        return Err(format!("{to} is not a voter"));
    }
    if metrics.state != ServerState::Leader {
        let leader = metrics
            .current_leader
            .and_then(|leader| membership.get_node(&leader).cloned().map(|n| (leader, n)))
            .ok_or("no leader is known; retry shortly")?;
        let client = peers.client(leader.0, &leader.1);
        let deadline = timeout + Duration::from_millis(window_ms);
        return match client.call(&Request::TransferLeader { to }, deadline).await {
            Ok(Response::Done(Ok(_))) => Ok(()),
            Ok(Response::Done(Err(reason))) => Err(reason),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(error) => Err(error.to_string()),
        };
    }
    if to == control.id {
        return Ok(());
    }
    control.paused.store(true, Ordering::SeqCst);
    let result = async {
        // Wait until the target holds the whole log.
        let started = Instant::now();
        loop {
            let metrics = raft.metrics().borrow().clone();
            let last = metrics.last_log_index;
            let matched = metrics
                .replication
                .as_ref()
                .and_then(|replication| replication.get(&to).cloned().flatten())
                .map(|log_id| log_id.index);
            if matched.is_some() && matched == last {
                break;
            }
            if started.elapsed() > timeout {
                return Err(format!("{to} did not catch up within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        raft.runtime_config().heartbeat(false);
        raft.runtime_config().elect(false);
        for voter in membership.voter_ids().filter(|voter| *voter != control.id) {
            let Some(node) = membership.get_node(&voter) else {
                continue;
            };
            let call = Request::Handover {
                elect: voter == to,
                window_ms,
            };
            let _ = peers.client(voter, node).call(&call, timeout).await;
        }
        let mut metrics = raft.metrics();
        let waited = tokio::time::timeout(
            Duration::from_millis(window_ms),
            metrics.wait_for(|m| m.current_leader == Some(to)),
        )
        .await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => Err(format!("{to} did not become leader within {window_ms} ms")),
        }
    }
    .await;
    raft.runtime_config().heartbeat(true);
    raft.runtime_config().elect(true);
    control.paused.store(false, Ordering::SeqCst);
    result
}

/// Waits for a transaction, then gathers what else waits (up to the block limit, the batch
/// delay, or at once when one is urgent).
async fn next_batch(
    inbox: &mut mpsc::Receiver<(SignedTx, bool)>,
    config: &OrderingConfig,
) -> Option<(Vec<SignedTx>, bool)> {
    let (first, mut urgent) = inbox.recv().await?;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + Duration::from_millis(config.batch_delay_ms);
    while batch.len() < config.batch_txs_max {
        match inbox.try_recv() {
            Ok((tx, is_urgent)) => {
                urgent |= is_urgent;
                batch.push(tx);
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                if urgent || tokio::time::Instant::now() >= deadline {
                    break;
                }
                match tokio::time::timeout_at(deadline, inbox.recv()).await {
                    Ok(Some((tx, is_urgent))) => {
                        urgent |= is_urgent;
                        batch.push(tx);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
    Some((batch, urgent))
}

/// The leader proposes batches; a follower forwards them to the leader.
async fn dispatch(
    raft: Raft,
    shared: Arc<Shared>,
    peers: Peers,
    control: Arc<Control>,
    mut inbox: mpsc::Receiver<(SignedTx, bool)>,
) {
    let in_flight = Arc::new(Semaphore::new(
        control.settings.proposals_in_flight_max.max(1),
    ));
    let give_up = Duration::from_millis(control.settings.ordering.commit_timeout_ms);
    let rpc_timeout = Duration::from_millis(control.settings.rpc_timeout_ms);
    loop {
        // Wait for room before gathering, so the batch grows while proposals are in flight.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let Some((txs, urgent)) = next_batch(&mut inbox, &control.settings.ordering).await else {
            return;
        };
        if shared.fatal().is_some() {
            return;
        }
        let started = Instant::now();
        loop {
            let metrics = raft.metrics().borrow().clone();
            let leader = metrics.current_leader;
            if control.paused.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            } else if leader == Some(control.id) && metrics.state == ServerState::Leader {
                let head = shared.head.borrow().clone();
                let proposal = Proposal {
                    proposer: shared.identity.id.clone(),
                    time_ms: now_ms(),
                    checkpoint: Some(Checkpoint {
                        height: head.height,
                        block_hash: head.block_hash,
                    }),
                    txs: txs.clone(),
                };
                match raft.client_write_ff(proposal).await {
                    Ok(answer) => {
                        let outbox = control.outbox.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            // Leadership lost before commit: hand the batch back, to go to
                            // the new leader (a duplicate is refused by its nonce, never
                            // applied twice).
                            if let Ok(Err(ClientWriteError::ForwardToLeader(_))) = answer.await {
                                for tx in txs {
                                    let _ = outbox.try_send((tx, urgent));
                                }
                            }
                        });
                    }
                    Err(error) => eprintln!("medledger: proposing a block: {error}"),
                }
                break;
            } else if let Some(leader) = leader {
                let membership = metrics.membership_config.membership().clone();
                if let Some(node) = membership.get_node(&leader) {
                    let client = peers.client(leader, node);
                    let request = Request::Forward {
                        txs: txs.clone(),
                        urgent,
                    };
                    if let Ok(Response::Done(Ok(_))) = client.call(&request, rpc_timeout).await {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            } else {
                let mut watch = raft.metrics();
                let _ = tokio::time::timeout(
                    Duration::from_millis(50),
                    watch.wait_for(|m| m.current_leader.is_some()),
                )
                .await;
            }
            if started.elapsed() > give_up {
                // The clients have heard "outcome unknown" by now; nothing was ordered.
                break;
            }
        }
    }
}

/// On the leader: voters and learners follow the ledger's membership. A node whose
/// organisation is no longer an active member, or which was revoked, is removed. On every
/// node: while not a voter, peers are checked by the consortium root as well.
async fn keep_membership(
    raft: Raft,
    shared: Arc<Shared>,
    check: Arc<LedgerPeerCheck>,
    control: Arc<Control>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        if tokio::time::timeout(Duration::from_millis(500), stopped.wait_for(|s| *s))
            .await
            .is_ok()
        {
            return;
        }
        let metrics = raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voter = membership.voter_ids().any(|id| id == control.id);
        check.catching_up.store(!voter, Ordering::Relaxed);
        if metrics.state != ServerState::Leader {
            continue;
        }
        let Ok(snapshot) = shared.store.snapshot() else {
            continue;
        };
        let mut gone = BTreeSet::new();
        for (id, node) in membership.nodes() {
            let user: Option<User> = snapshot.value(&keys::user(&node.node)).ok().flatten();
            let org: Option<Org> = user
                .as_ref()
                .and_then(|user| snapshot.value(&keys::org(&user.org)).ok().flatten());
            let active = matches!((&user, &org), (Some(user), Some(org))
                if user.status == UserStatus::Active && org.status == OrgStatus::Active);
            if !active {
                gone.insert(*id);
            }
        }
        if gone.is_empty() {
            continue;
        }
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let leaving_voters: BTreeSet<u64> = voters.intersection(&gone).cloned().collect();
        if !leaving_voters.is_empty() && leaving_voters.len() < voters.len() {
            if let Err(error) = raft
                .change_membership(ChangeMembers::RemoveVoters(leaving_voters), false)
                .await
            {
                eprintln!("medledger: removing voters that left the consortium: {error}");
                continue;
            }
        }
        let _ = raft
            .change_membership(ChangeMembers::RemoveNodes(gone), false)
            .await;
    }
}

/// TLS configurations for a node, checked against its store (tests and tools).
pub fn tls_for(store: Arc<Store>, identity: &NodeIdentity) -> Result<TlsConfigs, String> {
    tls::configs(identity, Arc::new(LedgerPeerCheck::new(store))).map_err(|e| e.to_string())
}

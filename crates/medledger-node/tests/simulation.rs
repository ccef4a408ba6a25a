//! A deterministic simulation of a Raft consortium in one process: the real stores, log
//! stores and state machines, a simulated network that drops, delays, reorders and
//! partitions messages, and nodes that crash and restart on their stores, all drawn from one
//! seed and run in simulated time, so that a failing seed replays exactly.
//!
//! `MEDLEDGER_SIM_SEEDS=n` runs seeds 0..n (default 200 with 3 nodes, a quarter of them with
//! 5 nodes); `MEDLEDGER_SIM_SEED=n` replays only seed n and prints what happened step by step:
//!
//! ```text
//! MEDLEDGER_SIM_SEED=n cargo test -p medledger-node --test simulation -- --nocapture
//! ```
//!
//! Checked after every step and at the end: no two nodes hold different blocks at a height,
//! no node's chain shrinks or loses a block across crashes, no node stops itself (diverged
//! state, storage error, panicked task), every AppendEntries on the wire carries entries that
//! follow its `prev_log_id` and were written by the sender or earlier leaders, and every
//! acknowledged proposal is the block its leader named. Then the faults stop, and a proposal
//! must commit and every node reach the same head, each within a bound of simulated time.
//!
//! Simulated time is tokio's paused clock (its `test-util` feature, which the crate's
//! dev-dependencies enable).
//!
//! `MEDLEDGER_SIM_STALE_ACROSS_RESTARTS=1` also delivers messages sent to a node's previous
//! incarnation to its restarted one (no connection-based transport does that);
//! `MEDLEDGER_SIM_WIRE_CHECKS=0` lets malformed AppendEntries through, to see what they do.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::future::Future;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use medledger_core::audit::{SignedTreeHead, TreeHead};
use medledger_core::block::{genesis, ChainHead, ExecutedBlock};
use medledger_core::identity::OrgKind;
use medledger_core::tx::{SignedTx, TxBody, TxId};
use medledger_core::Hash;
use medledger_node::consensus::state_machine::Shared;
use medledger_node::consensus::{
    raft_id, Applied, Checkpoint, Entry, LogId, LogStore, NodeInfo, Proposal, Raft, SnapshotMeta,
    StateMachine, StorageError, StoredMembership, TypeConfig, Vote,
};
use medledger_node::consortium::{Consortium, Identity};
use medledger_node::ledger::{LedgerStats, NodeIdentity};
use medledger_node::pki::Validity;
use medledger_node::store::Store;
use openraft::error::{
    InstallSnapshotError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{
    Config, RPCTypes, RaftLogReader, RaftSnapshotBuilder, ServerState, Snapshot, SnapshotPolicy,
};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

const CHAIN: &str = "medledger-sim";
const ORGS: [&str; 5] = ["hospital-a", "hospital-b", "lab-c", "clinic-d", "insurer-e"];
/// Block time of genesis; simulated time is added to it.
const BASE_MS: u64 = 1_700_000_000_000;
const DAY_MS: u64 = 86_400_000;
/// Pre-signed registrations per fixture; a seed that uses more repeats them (the repeats are
/// refused as replays, in a block like any other transaction).
const TX_POOL: usize = 256;
const HEARTBEAT_MS: u64 = 50;
/// After the faults stop: the bound for a new proposal to commit, then for every node to
/// reach the same head.
const LIVENESS_BOUND: Duration = Duration::from_secs(60);
/// The whole history of every node is compared every this many steps (and at every restart
/// and at the end); the steps in between compare what is new.
const FULL_CHECK_EVERY: usize = 8;

// ---------------------------------------------------------------------------------------------
// Simulated time.

/// A current-thread runtime whose clock is paused: it jumps to the next timer whenever
/// every task waits (tokio's `test-util`, enabled by the crate's dev-dependencies).
fn simulated_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime")
}

// ---------------------------------------------------------------------------------------------
// Panics in tasks (openraft's core, the state machine) end only that task: they are
// recorded for the seed running on this thread.

thread_local! {
    static PANICS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn record_panics() {
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let message = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let _ = PANICS
                .try_with(|panics| panics.borrow_mut().push(format!("{message} at {location}")));
            previous(info);
        }));
    });
}

// ---------------------------------------------------------------------------------------------
// The seeded random numbers.

/// splitmix64: every fault, delay and choice of a run comes from one of these.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut rng = Rng(seed ^ 0x6d65_646c_6564_6765);
        rng.next();
        rng
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }

    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low)
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn fork(&mut self) -> Rng {
        Rng::new(self.next())
    }
}

/// FNV-1a over the events of a run: the same seed gives the same fingerprint.
fn fold(fingerprint: &mut u64, values: &[u64]) {
    for value in values {
        for byte in value.to_le_bytes() {
            *fingerprint ^= byte as u64;
            *fingerprint = fingerprint.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The consortium, its genesis and signed transactions: made once per process and size.

struct Fixture {
    orgs: Vec<&'static str>,
    consortium: Consortium,
    genesis: ExecutedBlock,
    txs: Vec<SignedTx>,
}

impl Fixture {
    fn new(n: usize) -> Fixture {
        let validity = Validity {
            not_before_ms: BASE_MS - DAY_MS,
            not_after_ms: BASE_MS + 365 * DAY_MS,
        };
        let orgs: Vec<&'static str> = ORGS[..n].to_vec();
        let kinds: Vec<(&str, OrgKind)> =
            orgs.iter().map(|org| (*org, OrgKind::Hospital)).collect();
        // Keys are random, and the DER signatures in the certificates vary in length, so the
        // genesis block does too; snapshot chunks follow the chain's bytes, so a run's schedule
        // would differ between processes. A consortium whose genesis block has the usual size
        // makes every process run a seed alike.
        let target = if n == 3 { 6760 } else { 10516 };
        let mut attempts = 0;
        let (consortium, genesis) = loop {
            attempts += 1;
            let consortium = Consortium::create(CHAIN, &kinds, BASE_MS, validity).unwrap();
            let executed =
                genesis(&BTreeMap::<String, Vec<u8>>::new(), &consortium.genesis).unwrap();
            let size = serde_json::to_vec(&executed.block).unwrap().len();
            if size == target {
                break (consortium, executed);
            }
            if attempts == 500 {
                eprintln!(
                    "simulation: no genesis block of {target} bytes in {attempts} tries (this \
                     one has {size}): seeds replay exactly only within this process"
                );
                break (consortium, executed);
            }
        };
        let txs = (0..TX_POOL)
            .map(|_| {
                let patient = Identity::new_patient().unwrap();
                patient.sign(
                    CHAIN,
                    1,
                    BASE_MS + DAY_MS - 3_600_000,
                    TxBody::RegisterPatient {
                        public_key: patient.key.public_key(),
                    },
                )
            })
            .collect();
        Fixture {
            orgs,
            consortium,
            genesis,
            txs,
        }
    }
}

fn fixture(n: usize) -> &'static Fixture {
    static THREE: OnceLock<Fixture> = OnceLock::new();
    static FIVE: OnceLock<Fixture> = OnceLock::new();
    match n {
        3 => THREE.get_or_init(|| Fixture::new(3)),
        5 => FIVE.get_or_init(|| Fixture::new(5)),
        _ => panic!("fixtures exist for 3 and 5 nodes"),
    }
}

// ---------------------------------------------------------------------------------------------
// Crashes: storage that a dead incarnation can no longer touch.

/// Open while the node incarnation lives; once closed, every storage call of that
/// incarnation waits forever, as if its process were gone.
#[derive(Clone)]
struct Gate(Arc<AtomicBool>);

impl Gate {
    fn open() -> Gate {
        Gate(Arc::new(AtomicBool::new(true)))
    }

    fn is_open(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn close(&self) {
        self.0.store(false, Ordering::SeqCst);
    }

    async fn pass(&self) {
        if !self.is_open() {
            std::future::pending::<()>().await;
        }
    }
}

/// The node's real `LogStore`, behind its incarnation's gate.
#[derive(Clone)]
struct GatedLog {
    inner: LogStore,
    gate: Gate,
}

impl RaftLogReader<TypeConfig> for GatedLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.gate.pass().await;
        self.inner.try_get_log_entries(range).await
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        self.gate.pass().await;
        self.inner.limited_get_log_entries(start, end).await
    }
}

/// A reader from the node's real `LogStore::get_log_reader`, behind the same gate.
struct GatedReader<R> {
    inner: R,
    gate: Gate,
}

impl<R: RaftLogReader<TypeConfig>> RaftLogReader<TypeConfig> for GatedReader<R> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.gate.pass().await;
        self.inner.try_get_log_entries(range).await
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        self.gate.pass().await;
        self.inner.limited_get_log_entries(start, end).await
    }
}

impl RaftLogStorage<TypeConfig> for GatedLog {
    type LogReader = GatedReader<<LogStore as RaftLogStorage<TypeConfig>>::LogReader>;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.gate.pass().await;
        self.inner.get_log_state().await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        GatedReader {
            inner: self.inner.get_log_reader().await,
            gate: self.gate.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.gate.pass().await;
        self.inner.save_vote(vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.gate.pass().await;
        self.inner.read_vote().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.gate.pass().await;
        self.inner.save_committed(committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.gate.pass().await;
        self.inner.read_committed().await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        self.gate.pass().await;
        self.inner.append(entries, callback).await
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.gate.pass().await;
        self.inner.truncate(log_id).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.gate.pass().await;
        self.inner.purge(log_id).await
    }
}

/// The node's real `StateMachine`, behind its incarnation's gate, counting snapshots.
#[derive(Clone)]
struct GatedMachine {
    inner: StateMachine,
    gate: Gate,
    counters: Arc<Counters>,
}

impl RaftSnapshotBuilder<TypeConfig> for GatedMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        self.gate.pass().await;
        self.counters
            .snapshots_built
            .fetch_add(1, Ordering::Relaxed);
        self.inner.build_snapshot().await
    }
}

impl RaftStateMachine<TypeConfig> for GatedMachine {
    type SnapshotBuilder = GatedMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.gate.pass().await;
        self.inner.applied_state().await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        self.gate.pass().await;
        self.inner.apply(entries).await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        self.gate.pass().await;
        self.inner.begin_receiving_snapshot().await
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        self.gate.pass().await;
        self.counters
            .snapshots_installed
            .fetch_add(1, Ordering::Relaxed);
        self.inner.install_snapshot(meta, snapshot).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        self.gate.pass().await;
        self.inner.get_current_snapshot().await
    }
}

// ---------------------------------------------------------------------------------------------
// The simulated network.

/// What the network does to messages now.
#[derive(Debug, Clone, Copy)]
struct Weather {
    /// Each message (request or response) is lost with this probability.
    drop_per_mille: u64,
    /// This share of messages is slow: delayed uniformly in `0..slow_ms` instead of `0..3` ms.
    slow_per_mille: u64,
    slow_ms: u64,
    /// A request is delivered a second time, later, with this probability.
    duplicate_per_mille: u64,
}

const CALM: Weather = Weather {
    drop_per_mille: 0,
    slow_per_mille: 0,
    slow_ms: 1,
    duplicate_per_mille: 0,
};

struct NetState {
    rng: Rng,
    /// The live incarnation of each node that is up, and its number.
    up: BTreeMap<u64, (u64, Raft)>,
    /// Incarnations started so far.
    incarnations: u64,
    /// Partition side of each node: nodes talk only within their side.
    side: BTreeMap<u64, u8>,
    weather: Weather,
    fingerprint: u64,
}

struct Net {
    state: Mutex<NetState>,
    started: Instant,
    counters: Arc<Counters>,
    /// Print every snapshot chunk as it is sent and delivered (replays of one seed).
    verbose: bool,
    /// Malformed messages seen on the wire.
    violations: Mutex<Vec<String>>,
    /// Whether they fail the run (`MEDLEDGER_SIM_WIRE_CHECKS=0` lets them through, to see
    /// what they do to the receivers).
    wire_checks: bool,
    /// Organisation of each Raft id, for messages.
    names: BTreeMap<u64, &'static str>,
    /// Deliver messages sent to a node's previous incarnation to its next one, which no
    /// connection-based transport does (`MEDLEDGER_SIM_STALE_ACROSS_RESTARTS=1`).
    across_restarts: bool,
}

/// What befalls one request and its response.
struct Fate {
    /// The target's incarnation when the request was sent: only it can receive it.
    incarnation: u64,
    request_delay: u64,
    response_delay: u64,
    request_lost: bool,
    response_lost: bool,
    /// Delivered again this long after the first copy (its answer goes nowhere).
    duplicate_after: Option<u64>,
}

impl Net {
    fn connected(state: &NetState, a: u64, b: u64) -> bool {
        state.side.get(&a) == state.side.get(&b)
    }

    /// At send time: the target must be up and on the sender's side.
    fn send(&self, source: u64, target: u64, kind: u64) -> Result<Fate, &'static str> {
        let mut state = self.state.lock().unwrap();
        let now = self.started.elapsed().as_millis() as u64;
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        let incarnation = state.up.get(&target).map(|(incarnation, _)| *incarnation);
        let reachable = if incarnation.is_none() {
            Err("the target is down")
        } else if !Net::connected(&state, source, target) {
            Err("the target is on the other side of a partition")
        } else {
            Ok(())
        };
        if let Err(why) = reachable {
            self.counters.unreachable.fetch_add(1, Ordering::Relaxed);
            fold(&mut state.fingerprint, &[now, source, target, kind, 0]);
            return Err(why);
        }
        let weather = state.weather;
        let rng = &mut state.rng;
        let delay = |rng: &mut Rng| {
            if rng.chance(weather.slow_per_mille) {
                rng.below(weather.slow_ms)
            } else {
                rng.below(3)
            }
        };
        let fate = Fate {
            incarnation: incarnation.unwrap_or_default(),
            request_delay: delay(rng),
            response_delay: delay(rng),
            request_lost: rng.chance(weather.drop_per_mille),
            response_lost: rng.chance(weather.drop_per_mille),
            duplicate_after: if rng.chance(weather.duplicate_per_mille) {
                Some(delay(rng) + rng.below(100))
            } else {
                None
            },
        };
        let dropped = fate.request_lost as u64 + fate.response_lost as u64;
        self.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
        if fate.duplicate_after.is_some() {
            self.counters.duplicated.fetch_add(1, Ordering::Relaxed);
        }
        fold(
            &mut state.fingerprint,
            &[
                now,
                source,
                target,
                kind,
                1 + dropped,
                fate.request_delay,
                fate.response_delay,
                fate.duplicate_after.map_or(0, |after| after + 1),
            ],
        );
        Ok(fate)
    }

    /// At arrival: the target, if it is up, still on the sender's side and the incarnation
    /// the request was sent to (a restarted node's connections are new ones).
    fn arrive(&self, source: u64, target: u64, incarnation: u64) -> Option<Raft> {
        let state = self.state.lock().unwrap();
        if !Net::connected(&state, source, target) {
            return None;
        }
        match state.up.get(&target) {
            Some((now, raft)) if *now == incarnation || self.across_restarts => Some(raft.clone()),
            _ => None,
        }
    }

    fn still_connected(&self, source: u64, target: u64) -> bool {
        Net::connected(&self.state.lock().unwrap(), source, target)
    }
}

/// The network as one node incarnation sees it.
#[derive(Clone)]
struct SimNetwork {
    source: u64,
    net: Arc<Net>,
    gate: Gate,
}

struct SimLink {
    source: u64,
    target: u64,
    net: Arc<Net>,
    gate: Gate,
}

impl RaftNetworkFactory<TypeConfig> for SimNetwork {
    type Network = SimLink;

    async fn new_client(&mut self, target: u64, _node: &NodeInfo) -> SimLink {
        SimLink {
            source: self.source,
            target,
            net: self.net.clone(),
            gate: self.gate.clone(),
        }
    }
}

#[derive(Debug)]
struct SimError(&'static str);

impl std::fmt::Display for SimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for SimError {}

impl SimLink {
    /// Sends one request through the network: it travels (and may be lost or overtaken) on
    /// its own, even when the sender stops waiting; the answer comes back the same way.
    async fn call<T, E, F, Fut>(
        &self,
        action: RPCTypes,
        kind: u64,
        option: RPCOption,
        deliver: F,
    ) -> Result<T, RPCError<u64, NodeInfo, RaftError<u64, E>>>
    where
        T: Send + 'static,
        E: std::error::Error + Send + 'static,
        F: Fn(Raft) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, RaftError<u64, E>>> + Send + 'static,
    {
        if !self.gate.is_open() {
            // A crashed node sends nothing.
            std::future::pending::<()>().await;
        }
        let fate = match self.net.send(self.source, self.target, kind) {
            Ok(fate) => fate,
            Err(why) => return Err(RPCError::Unreachable(Unreachable::new(&SimError(why)))),
        };
        let (reply, answer) = oneshot::channel();
        let (source, target, net) = (self.source, self.target, self.net.clone());
        let deliver = Arc::new(deliver);
        if let Some(after) = fate.duplicate_after {
            let (net, deliver) = (net.clone(), deliver.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(fate.request_delay + after)).await;
                if let Some(raft) = net.arrive(source, target, fate.incarnation) {
                    let _ = deliver(raft).await;
                }
            });
        }
        tokio::spawn(async move {
            if fate.request_delay > 0 {
                tokio::time::sleep(Duration::from_millis(fate.request_delay)).await;
            }
            if fate.request_lost {
                return;
            }
            let Some(raft) = net.arrive(source, target, fate.incarnation) else {
                net.counters.lost.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let result = deliver(raft).await;
            if let Err(RaftError::Fatal(_)) = result {
                // The target stopped while handling it: no answer.
                net.counters.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if fate.response_delay > 0 {
                tokio::time::sleep(Duration::from_millis(fate.response_delay)).await;
            }
            if fate.response_lost {
                return;
            }
            if !net.still_connected(source, target) {
                net.counters.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let _ = reply.send(result);
        });
        match answer.await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(RPCError::RemoteError(RemoteError::new(self.target, error))),
            Err(_) => {
                // No answer: the sender hears nothing until its deadline.
                tokio::time::sleep(option.hard_ttl()).await;
                Err(RPCError::Timeout(Timeout {
                    action,
                    id: self.source,
                    target: self.target,
                    timeout: option.hard_ttl(),
                }))
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for SimLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
        let kind = 1 + 16 * rpc.entries.len() as u64;
        // Raft's log matching rests on this: a leader sends entries of its own log, which
        // follow `prev_log_id` without a gap and were written by it or by earlier leaders.
        let first = rpc.prev_log_id.map_or(0, |prev| prev.index + 1);
        let sender = rpc.vote.leader_id();
        let sender = (sender.term, sender.voted_for().unwrap_or_default());
        for (expected, entry) in (first..).zip(&rpc.entries) {
            let writer = (entry.log_id.leader_id.term, entry.log_id.leader_id.node_id);
            if entry.log_id.index != expected || writer > sender {
                let name = |id: &u64| self.net.names.get(id).copied().unwrap_or("?");
                let show = |log_id: &LogId| {
                    format!(
                        "{}-{}-{}",
                        log_id.leader_id.term,
                        name(&log_id.leader_id.node_id),
                        log_id.index
                    )
                };
                let entries: Vec<String> = rpc.entries.iter().map(|e| show(&e.log_id)).collect();
                self.net.violations.lock().unwrap().push(format!(
                    "{} sent {} AppendEntries (vote term {} of {}, leader_commit {:?}) with \
                     entries {entries:?} (term-leader-index) after prev_log_id {:?}: not \
                     consecutive, or written by a later leader than the sender",
                    name(&self.source),
                    name(&self.target),
                    rpc.vote.leader_id().term,
                    name(&rpc.vote.leader_id().voted_for().unwrap_or_default()),
                    rpc.leader_commit.as_ref().map(show),
                    rpc.prev_log_id.as_ref().map(show),
                ));
                break;
            }
        }
        self.call(RPCTypes::AppendEntries, kind, option, move |raft| {
            let rpc = rpc.clone();
            async move { raft.append_entries(rpc).await }
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, NodeInfo, RaftError<u64, InstallSnapshotError>>,
    > {
        let kind = 2 + 16 * rpc.offset;
        let name = |id: &u64| self.net.names.get(id).copied().unwrap_or("?");
        let chunk = format!(
            "snapshot chunk {} -> {}: id {} offset {} len {} done {}",
            name(&self.source),
            name(&self.target),
            rpc.meta.snapshot_id,
            rpc.offset,
            rpc.data.len(),
            rpc.done
        );
        let (verbose, started) = (self.net.verbose, self.net.started);
        if verbose {
            println!("[{:>7} ms] {chunk} sent", started.elapsed().as_millis());
        }
        self.call(RPCTypes::InstallSnapshot, kind, option, move |raft| {
            let rpc = rpc.clone();
            if verbose {
                println!(
                    "[{:>7} ms] {chunk} delivered",
                    started.elapsed().as_millis()
                );
            }
            async move { raft.install_snapshot(rpc).await }
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
        let kind = 3 + 16 * rpc.vote.leader_id().term;
        self.call(RPCTypes::Vote, kind, option, move |raft| {
            let rpc = rpc.clone();
            async move { raft.vote(rpc).await }
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// What a run observes.

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    unreachable: AtomicU64,
    lost: AtomicU64,
    snapshots_built: AtomicU64,
    snapshots_installed: AtomicU64,
}

/// A proposal whose `client_write` returned: where its block is, on the leader that said so.
#[derive(Debug, Clone)]
struct Ack {
    leader: String,
    log_index: u64,
    height: Option<u64>,
    proposer: String,
    tx_ids: Vec<TxId>,
}

#[derive(Default)]
struct Observed {
    /// (term, node) of every leader seen.
    leaders: Mutex<BTreeSet<(u64, u64)>>,
    acks: Mutex<Vec<Ack>>,
    writes_failed: AtomicU64,
}

/// Totals over seeds.
#[derive(Debug, Default, Clone)]
struct Figures {
    seeds: u64,
    steps: u64,
    simulated_ms: u64,
    blocks: u64,
    proposals: u64,
    acked: u64,
    writes_failed: u64,
    elections: u64,
    crashes: u64,
    partitions: u64,
    messages: u64,
    dropped: u64,
    duplicated: u64,
    unreachable: u64,
    lost: u64,
    snapshots_built: u64,
    snapshots_installed: u64,
}

impl Figures {
    fn add(&mut self, other: &Figures) {
        self.seeds += other.seeds;
        self.steps += other.steps;
        self.simulated_ms += other.simulated_ms;
        self.blocks += other.blocks;
        self.proposals += other.proposals;
        self.acked += other.acked;
        self.writes_failed += other.writes_failed;
        self.elections += other.elections;
        self.crashes += other.crashes;
        self.partitions += other.partitions;
        self.messages += other.messages;
        self.dropped += other.dropped;
        self.duplicated += other.duplicated;
        self.unreachable += other.unreachable;
        self.lost += other.lost;
        self.snapshots_built += other.snapshots_built;
        self.snapshots_installed += other.snapshots_installed;
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes and the cluster.

struct Live {
    raft: Raft,
    shared: Arc<Shared>,
    gate: Gate,
    watcher: tokio::task::JoinHandle<()>,
}

struct Node {
    org: &'static str,
    id: u64,
    identity: Arc<NodeIdentity>,
    /// Survives crashes: the node's durable state.
    store: Arc<Store>,
    config: Arc<Config>,
    live: Option<Live>,
    /// Heights 0..=checked of this node's chain were compared with the canonical chain.
    checked: Option<u64>,
    /// The highest head this node ever had: its chain only grows.
    highest: u64,
}

struct Sim {
    n: usize,
    fixture: &'static Fixture,
    rng: Rng,
    net: Arc<Net>,
    counters: Arc<Counters>,
    observed: Arc<Observed>,
    nodes: Vec<Node>,
    members: BTreeMap<u64, NodeInfo>,
    /// The first block seen at each height: its hash, who had it, its stored bytes.
    canonical: Vec<(Hash, &'static str, Vec<u8>)>,
    next_tx: usize,
    figures: Figures,
    log: Vec<String>,
    verbose: bool,
    fingerprint: u64,
}

fn node_info(org: &str) -> NodeInfo {
    NodeInfo {
        node: format!("node@{org}"),
        peer_addr: format!("sim:{org}"),
        api_url: String::new(),
    }
}

impl Sim {
    async fn new(seed: u64, n: usize, verbose: bool) -> Sim {
        let fixture = fixture(n);
        let mut rng = Rng::new(seed ^ ((n as u64) << 56));
        let counters = Arc::new(Counters::default());
        let net = Arc::new(Net {
            state: Mutex::new(NetState {
                rng: rng.fork(),
                up: BTreeMap::new(),
                incarnations: 0,
                side: BTreeMap::new(),
                weather: CALM,
                fingerprint: 0xcbf2_9ce4_8422_2325,
            }),
            started: Instant::now(),
            counters: counters.clone(),
            verbose,
            violations: Mutex::new(Vec::new()),
            wire_checks: std::env::var("MEDLEDGER_SIM_WIRE_CHECKS").map_or(true, |v| v != "0"),
            names: fixture
                .orgs
                .iter()
                .map(|org| (raft_id(org), *org))
                .collect(),
            across_restarts: std::env::var("MEDLEDGER_SIM_STALE_ACROSS_RESTARTS")
                .is_ok_and(|value| value == "1"),
        });
        // Distinct election timeouts, one per node, from the seed; each is fixed (min, min+1),
        // so that openraft's own random draw cannot change the run.
        let mut slots: Vec<u64> = (0..n as u64).collect();
        for i in (1..slots.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            slots.swap(i, j);
        }
        let snapshot_every = rng.range(1, 24);
        let keep = rng.range(0, 6);
        let max_payload = rng.pick(&[1, 3, 16, 64]);
        let chunk = rng.pick(&[512, 4096, 3 * 1024 * 1024]);
        let mut nodes = Vec::new();
        let mut members = BTreeMap::new();
        for (i, org) in fixture.orgs.iter().enumerate() {
            let timeout = 150 + slots[i] * 40 + rng.below(30);
            let config = Config {
                cluster_name: CHAIN.into(),
                heartbeat_interval: HEARTBEAT_MS,
                election_timeout_min: timeout,
                election_timeout_max: timeout + 1,
                snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_every),
                max_in_snapshot_log_to_keep: keep,
                max_payload_entries: max_payload,
                snapshot_max_chunk_size: chunk,
                install_snapshot_timeout: 10_000,
                ..Default::default()
            }
            .validate()
            .unwrap();
            let store = Arc::new(Store::open_memory().unwrap());
            store.commit_block(&fixture.genesis).unwrap();
            let member = &fixture.consortium.org(org).unwrap().node;
            let identity = Arc::new(NodeIdentity::from_member(member).unwrap());
            let id = raft_id(org);
            members.insert(id, node_info(org));
            nodes.push(Node {
                org,
                id,
                identity,
                store,
                config: Arc::new(config),
                live: None,
                checked: None,
                highest: 0,
            });
        }
        let mut sim = Sim {
            n,
            fixture,
            rng,
            net,
            counters,
            observed: Arc::new(Observed::default()),
            nodes,
            members,
            canonical: Vec::new(),
            next_tx: 0,
            figures: Figures::default(),
            log: Vec::new(),
            verbose,
            fingerprint: 0xcbf2_9ce4_8422_2325,
        };
        sim.note(format!(
            "{n} nodes, election timeouts {:?} ms, snapshot every {snapshot_every} entries \
             keeping {keep}, {max_payload} entries per append, snapshot chunks of {chunk} bytes",
            sim.nodes
                .iter()
                .map(|node| (node.org, node.config.election_timeout_min))
                .collect::<Vec<_>>()
        ));
        sim
    }

    fn now_ms(&self) -> u64 {
        self.net.started.elapsed().as_millis() as u64
    }

    fn note(&mut self, text: String) {
        let line = format!("[{:>7} ms] {text}", self.now_ms());
        if self.verbose {
            println!("{line}");
        }
        self.log.push(line);
    }

    /// Starts (or restarts) node `i` on its store, with fresh memory.
    async fn start(&mut self, i: usize) -> Result<(), String> {
        let node = &self.nodes[i];
        let head = node
            .store
            .head()
            .map_err(|e| e.to_string())?
            .ok_or("no genesis")?;
        let tree_head = TreeHead {
            chain_id: head.chain_id.clone(),
            height: head.height,
            log_size: head.log_size,
            log_root: head.log_root,
            time_ms: head.time_ms,
        };
        let latest = SignedTreeHead {
            signature: node.identity.key.sign(&tree_head.signing_bytes()),
            tree_head,
            signer: node.identity.id.clone(),
            certificate_chain: node.identity.certificate_chain.clone(),
        };
        let shared = Arc::new(Shared::new(
            node.store.clone(),
            node.identity.clone(),
            Arc::new(RwLock::new(Arc::new(latest))),
            Arc::new(LedgerStats::default()),
            watch::channel(head).0,
        ));
        let gate = Gate::open();
        let network = SimNetwork {
            source: node.id,
            net: self.net.clone(),
            gate: gate.clone(),
        };
        let log = GatedLog {
            inner: LogStore::new(node.store.clone(), false),
            gate: gate.clone(),
        };
        let machine = GatedMachine {
            inner: StateMachine::new(shared.clone(), false),
            gate: gate.clone(),
            counters: self.counters.clone(),
        };
        let raft = Raft::new(node.id, node.config.clone(), network, log, machine)
            .await
            .map_err(|e| format!("{} does not start: {e}", node.org))?;
        let watcher = tokio::spawn(watch_node(raft.metrics(), self.observed.clone()));
        {
            let mut state = self.net.state.lock().unwrap();
            state.incarnations += 1;
            let incarnation = state.incarnations;
            state.up.insert(node.id, (incarnation, raft.clone()));
        }
        self.nodes[i].live = Some(Live {
            raft,
            shared,
            gate,
            watcher,
        });
        Ok(())
    }

    /// Kills node `i`: from now on its incarnation neither sends nor stores anything.
    async fn crash(&mut self, i: usize) {
        let Some(live) = self.nodes[i].live.take() else {
            return;
        };
        self.figures.crashes += 1;
        live.watcher.abort();
        live.gate.close();
        self.net.state.lock().unwrap().up.remove(&self.nodes[i].id);
        // Nothing it still has in hand can reach its store: shutting down only frees it.
        let _ = tokio::time::timeout(Duration::from_secs(10), live.raft.shutdown()).await;
    }

    fn live_indices(&self) -> Vec<usize> {
        (0..self.n)
            .filter(|i| self.nodes[*i].live.is_some())
            .collect()
    }

    /// The live node that believes it leads the highest term.
    fn leader(&self) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for i in self.live_indices() {
            let metrics = self.nodes[i].live.as_ref().unwrap().raft.metrics();
            let metrics = metrics.borrow();
            if metrics.state == ServerState::Leader
                && best.is_none_or(|(term, _)| metrics.current_term > term)
            {
                best = Some((metrics.current_term, i));
            }
        }
        best.map(|(_, i)| i)
    }

    fn take_txs(&mut self, count: usize) -> Vec<SignedTx> {
        let mut txs = Vec::with_capacity(count);
        for _ in 0..count {
            if self.next_tx > 0 && self.rng.chance(50) {
                // Now and then a transaction already proposed: refused as a replay.
                let old = self.rng.below(self.next_tx as u64) as usize;
                txs.push(self.fixture.txs[old % TX_POOL].clone());
            } else {
                txs.push(self.fixture.txs[self.next_tx % TX_POOL].clone());
                self.next_tx += 1;
            }
        }
        txs
    }

    /// A proposal as node `i`'s leader would make it.
    fn proposal(&mut self, i: usize, txs: Vec<SignedTx>) -> Result<Proposal, String> {
        let node = &self.nodes[i];
        let checkpoint = if self.rng.chance(850) {
            let head = node.store.head().map_err(|e| e.to_string())?.unwrap();
            Some(Checkpoint {
                height: head.height,
                block_hash: head.block_hash,
            })
        } else {
            None
        };
        // Block time follows simulated time; sometimes a clock behind the last block's.
        let skew = if self.rng.chance(100) {
            self.rng.below(5_000)
        } else {
            0
        };
        Ok(Proposal {
            proposer: node.identity.id.clone(),
            time_ms: BASE_MS + 1_000 + self.now_ms() - skew,
            checkpoint,
            txs,
        })
    }

    /// Proposes at node `i` without waiting: the answer is recorded when it comes.
    fn propose(&mut self, i: usize, txs: Vec<SignedTx>) -> Result<(), String> {
        let proposal = self.proposal(i, txs)?;
        let node = &self.nodes[i];
        let raft = node.live.as_ref().unwrap().raft.clone();
        let observed = self.observed.clone();
        let leader = node.org.to_string();
        self.figures.proposals += 1;
        tokio::spawn(async move {
            let proposer = proposal.proposer.clone();
            let tx_ids = proposal.txs.iter().map(|tx| tx.id().unwrap()).collect();
            match raft.client_write(proposal).await {
                Ok(response) => observed.acks.lock().unwrap().push(Ack {
                    leader,
                    log_index: response.log_id.index,
                    height: response.data.height,
                    proposer,
                    tx_ids,
                }),
                Err(_) => {
                    observed.writes_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(())
    }

    /// Safety: every node's chain is a prefix of one canonical chain and never shrinks; no
    /// node found itself diverged; no node's Raft stopped by itself.
    fn check(&mut self, full: bool) -> Result<(), String> {
        if self.net.wire_checks {
            if let Some(violation) = self.net.violations.lock().unwrap().first() {
                return Err(format!("RAFT PROTOCOL: {violation}"));
            }
        }
        if let Some(panic) = PANICS.with(|panics| panics.borrow().first().cloned()) {
            return Err(format!("a task panicked: {panic}"));
        }
        for i in 0..self.n {
            let node = &mut self.nodes[i];
            let org = node.org;
            let head = node
                .store
                .head()
                .map_err(|e| format!("{org}: reading the head: {e}"))?
                .ok_or_else(|| format!("{org} has no head"))?;
            if head.height < node.highest {
                return Err(format!(
                    "SAFETY: {org}'s chain shrank from height {} to {}",
                    node.highest, head.height
                ));
            }
            let from = match (full, node.checked) {
                (false, Some(checked)) => checked + 1,
                _ => 0,
            };
            for height in from..=head.height {
                let bytes = node
                    .store
                    .block_bytes(height)
                    .map_err(|e| format!("{org}: reading block {height}: {e}"))?
                    .ok_or_else(|| {
                        format!("{org} has head {} but no block {height}", head.height)
                    })?;
                if let Some((_, _, known)) = self.canonical.get(height as usize) {
                    if *known == bytes {
                        continue;
                    }
                }
                let block = node
                    .store
                    .block(height)
                    .map_err(|e| format!("{org}: reading block {height}: {e}"))?
                    .ok_or_else(|| format!("{org}: block {height} vanished"))?;
                if block.header.height != height {
                    return Err(format!(
                        "{org} stores block {} at height {height}",
                        block.header.height
                    ));
                }
                let hash = block.header.hash();
                if height > 0 && block.header.prev_hash != self.canonical[height as usize - 1].0 {
                    return Err(format!(
                        "SAFETY: {org}'s block {height} does not link to block {} of the chain",
                        height - 1
                    ));
                }
                match self.canonical.get(height as usize) {
                    Some((first, holder, _)) if *first != hash => {
                        return Err(format!(
                            "SAFETY: {org} holds block {height} = {hash} (proposer {}), \
                             {holder} held {first}",
                            block.header.proposer
                        ));
                    }
                    Some(_) => {}
                    None => {
                        fold(&mut self.fingerprint, &[height, i as u64]);
                        self.canonical.push((hash, org, bytes));
                    }
                }
            }
            if head.block_hash != self.canonical[head.height as usize].0 {
                return Err(format!(
                    "SAFETY: {org}'s head names block {} at height {}, not the stored one",
                    head.block_hash, head.height
                ));
            }
            node.checked = Some(head.height);
            node.highest = head.height;
            if let Some(live) = &node.live {
                if let Some(reason) = live.shared.fatal() {
                    return Err(format!("SAFETY: {org} stopped: {reason}"));
                }
                let metrics = live.raft.metrics();
                let metrics = metrics.borrow();
                if let Err(fatal) = &metrics.running_state {
                    return Err(format!("{org}'s Raft stopped by itself: {fatal}"));
                }
            }
        }
        Ok(())
    }

    /// Every acknowledged proposal is in the canonical chain where its leader said.
    fn check_acks(&self) -> Result<(), String> {
        let acks = self.observed.acks.lock().unwrap().clone();
        let mut heights = BTreeMap::new();
        for ack in &acks {
            let Some(height) = ack.height else {
                if !ack.tx_ids.is_empty() {
                    return Err(format!(
                        "{} acknowledged log entry {} of {} transactions without a block",
                        ack.leader,
                        ack.log_index,
                        ack.tx_ids.len()
                    ));
                }
                continue;
            };
            if let Some(other) = heights.insert(height, ack.log_index) {
                return Err(format!(
                    "SAFETY: log entries {other} and {} were both acknowledged as block {height}",
                    ack.log_index
                ));
            }
            let Some((hash, _, _)) = self.canonical.get(height as usize) else {
                return Err(format!(
                    "DURABILITY: {} acknowledged block {height} (log entry {}), which no node has",
                    ack.leader, ack.log_index
                ));
            };
            let node = &self.nodes[0];
            let block = node.store.block(height).unwrap().unwrap();
            let ids: Vec<TxId> = block.txs.iter().map(|tx| tx.id().unwrap()).collect();
            if block.header.hash() != *hash
                || block.header.proposer != ack.proposer
                || ids != ack.tx_ids
            {
                return Err(format!(
                    "DURABILITY: {} acknowledged log entry {} as block {height}, but block \
                     {height} holds another proposal (proposer {})",
                    ack.leader, ack.log_index, block.header.proposer
                ));
            }
        }
        Ok(())
    }

    /// One step of the faulty phase: maybe change the faults, maybe propose, let time pass.
    async fn step(&mut self, step: usize) -> Result<(), String> {
        let n = self.n as u64;
        // Partitions.
        if self.rng.chance(80) {
            let sides: Vec<u8> = (0..n).map(|_| self.rng.below(2) as u8).collect();
            let mut state = self.net.state.lock().unwrap();
            for (node, side) in self.nodes.iter().zip(&sides) {
                state.side.insert(node.id, *side);
            }
            drop(state);
            self.figures.partitions += 1;
            let groups: Vec<_> = self.nodes.iter().zip(&sides).collect();
            let left: Vec<_> = groups
                .iter()
                .filter(|(_, s)| **s == 0)
                .map(|(n, _)| n.org)
                .collect();
            let right: Vec<_> = groups
                .iter()
                .filter(|(_, s)| **s == 1)
                .map(|(n, _)| n.org)
                .collect();
            self.note(format!("partition {left:?} | {right:?}"));
        } else if self.rng.chance(80) {
            self.net.state.lock().unwrap().side.clear();
            self.note("partitions healed".into());
        }
        // Weather.
        if self.rng.chance(60) {
            let weather = Weather {
                drop_per_mille: self.rng.pick(&[0, 0, 20, 100, 300]),
                slow_per_mille: self.rng.pick(&[0, 50, 200, 500]),
                slow_ms: self.rng.pick(&[10, 40, 120, 400]),
                duplicate_per_mille: self.rng.pick(&[0, 0, 20, 100]),
            };
            self.net.state.lock().unwrap().weather = weather;
            self.note(format!("network {weather:?}"));
        }
        // Crashes and restarts.
        if self.rng.chance(10) {
            self.note("power loss: every node crashes".into());
            for i in 0..self.n {
                self.crash(i).await;
            }
        } else if self.rng.chance(70) {
            let victim = self.rng.below(n) as usize;
            if self.nodes[victim].live.is_some() {
                self.note(format!("crash {}", self.nodes[victim].org));
                self.crash(victim).await;
            }
        }
        for i in 0..self.n {
            if self.nodes[i].live.is_none() && self.rng.chance(150) {
                self.note(format!("restart {}", self.nodes[i].org));
                self.start(i).await?;
                self.check(true)?;
            }
        }
        // Workload.
        let proposals = self.rng.pick(&[0, 1, 1, 2]);
        for _ in 0..proposals {
            let Some(leader) = self.leader() else { break };
            let count = if self.rng.chance(80) {
                0
            } else {
                self.rng.range(1, 5) as usize
            };
            let txs = self.take_txs(count);
            self.propose(leader, txs)?;
        }
        let pause = self.rng.range(5, 150);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        self.check(step % FULL_CHECK_EVERY == 0)?;
        let summary = self.summary();
        fold(&mut self.fingerprint, &summary);
        if self.verbose {
            self.note(format!("step {step}: {}", self.describe()));
        }
        Ok(())
    }

    /// Heights, terms and roles, as numbers for the fingerprint.
    fn summary(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for node in &self.nodes {
            out.push(node.highest);
            if let Some(live) = &node.live {
                let metrics = live.raft.metrics();
                let metrics = metrics.borrow();
                out.push(metrics.current_term);
                out.push(metrics.state as u64);
                out.push(metrics.last_log_index.unwrap_or(u64::MAX));
            }
        }
        out
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for node in &self.nodes {
            match &node.live {
                None => parts.push(format!("{} down h{}", node.org, node.highest)),
                Some(live) => {
                    let metrics = live.raft.metrics();
                    let metrics = metrics.borrow();
                    parts.push(format!(
                        "{} {:?} t{} log{:?} applied{:?} h{}",
                        node.org,
                        metrics.state,
                        metrics.current_term,
                        metrics.last_log_index,
                        metrics.last_applied.map(|id| id.index),
                        node.highest
                    ));
                }
            }
        }
        parts.join(", ")
    }

    /// Liveness: with the faults gone, a proposal commits and every node reaches one head,
    /// each within a bound of simulated time.
    async fn heal(&mut self) -> Result<(), String> {
        {
            let mut state = self.net.state.lock().unwrap();
            state.side.clear();
            state.weather = CALM;
        }
        for i in 0..self.n {
            if self.nodes[i].live.is_none() {
                self.start(i).await?;
            }
        }
        self.check(true)?;
        self.note(format!("faults stopped: {}", self.describe()));
        let healed = Instant::now();
        let height = loop {
            if healed.elapsed() > LIVENESS_BOUND {
                return Err(format!(
                    "LIVENESS: no proposal committed within {LIVENESS_BOUND:?} after the faults \
                     stopped: {}",
                    self.describe()
                ));
            }
            if let Some(leader) = self.leader() {
                let txs = self.take_txs(1);
                let proposal = self.proposal(leader, txs)?;
                let raft = self.nodes[leader].live.as_ref().unwrap().raft.clone();
                let written =
                    tokio::time::timeout(Duration::from_secs(2), raft.client_write(proposal)).await;
                if let Ok(Ok(response)) = written {
                    if let Some(height) = response.data.height {
                        self.note(format!(
                            "committed block {height} through {} after the faults",
                            self.nodes[leader].org
                        ));
                        break height;
                    }
                }
            }
            self.check(false)?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let committed = Instant::now();
        loop {
            self.check(false)?;
            let heads: Vec<ChainHead> = self
                .nodes
                .iter()
                .map(|node| node.store.head().unwrap().unwrap())
                .collect();
            if heads
                .iter()
                .all(|head| head == &heads[0] && head.height >= height)
            {
                break;
            }
            if committed.elapsed() > LIVENESS_BOUND {
                return Err(format!(
                    "LIVENESS: the nodes did not reach one head within {LIVENESS_BOUND:?} of \
                     block {height} committing: {}",
                    self.describe()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.check(true)?;
        self.check_acks()?;
        self.note(format!("converged: {}", self.describe()));
        Ok(())
    }

    async fn run(mut self, steps: usize) -> Result<(Figures, u64), (String, Vec<String>)> {
        let result = self.run_inner(steps).await;
        match result {
            Ok(()) => {
                let mut figures = self.figures.clone();
                figures.seeds = 1;
                figures.steps = steps as u64;
                figures.simulated_ms = self.now_ms();
                figures.blocks = self.canonical.len() as u64 - 1;
                figures.acked = self.observed.acks.lock().unwrap().len() as u64;
                figures.writes_failed = self.observed.writes_failed.load(Ordering::Relaxed);
                figures.elections = self.observed.leaders.lock().unwrap().len() as u64;
                let counters = &self.counters;
                figures.messages = counters.sent.load(Ordering::Relaxed);
                figures.dropped = counters.dropped.load(Ordering::Relaxed);
                figures.duplicated = counters.duplicated.load(Ordering::Relaxed);
                figures.unreachable = counters.unreachable.load(Ordering::Relaxed);
                figures.lost = counters.lost.load(Ordering::Relaxed);
                figures.snapshots_built = counters.snapshots_built.load(Ordering::Relaxed);
                figures.snapshots_installed = counters.snapshots_installed.load(Ordering::Relaxed);
                let mut fingerprint = self.fingerprint;
                fold(
                    &mut fingerprint,
                    &[self.net.state.lock().unwrap().fingerprint, figures.blocks],
                );
                Ok((figures, fingerprint))
            }
            Err(error) => {
                let describe = self.describe();
                self.note(format!("FAILED: {error}"));
                self.note(format!("nodes: {describe}"));
                Err((error, std::mem::take(&mut self.log)))
            }
        }
    }

    async fn run_inner(&mut self, steps: usize) -> Result<(), String> {
        for i in 0..self.n {
            self.start(i).await?;
        }
        for i in 0..self.n {
            let raft = self.nodes[i].live.as_ref().unwrap().raft.clone();
            match raft.initialize(self.members.clone()).await {
                Ok(()) => {}
                Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {}
                Err(error) => return Err(format!("initialize: {error}")),
            }
        }
        for step in 0..steps {
            self.step(step).await?;
        }
        self.heal().await
    }
}

/// Records which leaders each incarnation reports. (openraft's default leader ids are
/// (term, node), so two nodes may both lead a term, one after the other: there is no
/// one-leader-per-term property to check, only what the logs and chains show.)
async fn watch_node(
    mut metrics: watch::Receiver<openraft::RaftMetrics<u64, NodeInfo>>,
    observed: Arc<Observed>,
) {
    loop {
        {
            let now = metrics.borrow_and_update();
            if now.state == ServerState::Leader {
                observed
                    .leaders
                    .lock()
                    .unwrap()
                    .insert((now.current_term, now.id));
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running seeds.

fn run_seed(
    seed: u64,
    n: usize,
    steps: usize,
    verbose: bool,
) -> Result<(Figures, u64), (String, Vec<String>)> {
    record_panics();
    PANICS.with(|panics| panics.borrow_mut().clear());
    let runtime = simulated_runtime();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async {
            let sim = Sim::new(seed, n, verbose).await;
            sim.run(steps).await
        })
    }));
    drop(runtime);
    match outcome {
        Ok(result) => result,
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            Err((format!("panicked: {text}"), Vec::new()))
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

fn simulate(n: usize, default_seeds: u64, steps: usize) {
    let started = std::time::Instant::now();
    let (seeds, verbose): (Vec<u64>, bool) = match env_u64("MEDLEDGER_SIM_SEED") {
        Some(seed) => (vec![seed], true),
        None => {
            let count = env_u64("MEDLEDGER_SIM_SEEDS")
                .map(|count| if n == 3 { count } else { count.div_ceil(4) })
                .unwrap_or(default_seeds);
            ((0..count).collect(), false)
        }
    };
    // Seeds are independent: spread them over the cores, each in its own runtime.
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(seeds.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                let Some(&seed) = seeds.get(index) else {
                    return;
                };
                let result = run_seed(seed, n, steps, verbose);
                results.lock().unwrap().push((seed, result));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(seed, _)| *seed);
    let mut total = Figures::default();
    let mut failures = Vec::new();
    for (seed, result) in results {
        match result {
            Ok((figures, fingerprint)) => {
                if verbose || std::env::var("MEDLEDGER_SIM_FINGERPRINTS").is_ok() {
                    println!("seed {seed} with {n} nodes: fingerprint {fingerprint:016x}");
                }
                total.add(&figures);
            }
            Err((error, log)) => failures.push((seed, error, log)),
        }
    }
    println!(
        "simulation, {n} nodes: {} seeds passed in {:.1?}: {} steps, {:.0} s simulated, \
         {} blocks committed, {} proposals ({} acknowledged, {} refused or cut off), {} elections, {} crashes, \
         {} partitions, {} messages ({} dropped, {} duplicated, {} unreachable, {} lost to a crash or \
         partition in flight), {} snapshots built, {} installed",
        total.seeds,
        started.elapsed(),
        total.steps,
        total.simulated_ms as f64 / 1000.0,
        total.blocks,
        total.proposals,
        total.acked,
        total.writes_failed,
        total.elections,
        total.crashes,
        total.partitions,
        total.messages,
        total.dropped,
        total.duplicated,
        total.unreachable,
        total.lost,
        total.snapshots_built,
        total.snapshots_installed,
    );
    if failures.is_empty() {
        return;
    }
    for (seed, error, log) in &failures {
        eprintln!("\nseed {seed} with {n} nodes FAILED: {error}");
        for line in log.iter().rev().take(60).rev() {
            eprintln!("  {line}");
        }
        eprintln!(
            "replay: MEDLEDGER_SIM_SEED={seed} cargo test -p medledger-node --test simulation \
             -- --nocapture"
        );
    }
    panic!(
        "{} of {} seeds failed with {n} nodes: {:?}",
        failures.len(),
        failures.len() as u64 + total.seeds,
        failures
            .iter()
            .map(|(seed, _, _)| *seed)
            .collect::<Vec<_>>()
    );
}

#[test]
fn three_nodes_stay_consistent_and_recover_under_crashes_partitions_and_message_loss() {
    // Proves that under seeded drops, delays, reordering, partitions and crash-restarts no
    // two of three nodes ever hold different blocks at a height and no node's chain shrinks,
    // and that once the faults stop a proposal commits and all nodes reach the same head.
    simulate(3, 200, 40);
}

#[test]
fn five_nodes_stay_consistent_and_recover_under_crashes_partitions_and_message_loss() {
    // Proves the same safety and liveness with five nodes, where two can be down or cut off
    // while the other three still form a quorum.
    simulate(5, 50, 40);
}

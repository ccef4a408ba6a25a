//! The node's ledger service: admission of client transactions, ordering into blocks, and
//! the durable commit that precedes every acknowledgement.
//!
//! Ordering sits behind the `Orderer` trait. `SoloOrderer` orders on this node alone: one
//! thread takes whatever transactions are waiting (group commit: while one block is being
//! fsynced the next batch gathers), executes them through the pure core, commits the block
//! in one fsync and only then answers each waiting client. A consensus engine replaces it
//! without changing admission or the API.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use medledger_core::audit::{SignedTreeHead, TreeHead};
use medledger_core::block::{execute_block, genesis, ChainHead, GenesisConfig};
use medledger_core::contracts::{Candidate, TxOutcome};
use medledger_core::crypto::base64url;
use medledger_core::crypto::PublicKey;
use medledger_core::identity::{is_patient_pseudonym, patient_pseudonym};
use medledger_core::model::{Patient, User};
use medledger_core::state::{keys, StateRead};
use medledger_core::tx::{SignatureCheck, SignedTx, TxBody, TxId, VerifiedTx};
use tokio::sync::oneshot;

use crate::consortium::{Identity, IdentityError};
use crate::pki::KeyPair;
use crate::store::{Store, StoreError};
use crate::work::{Work, WorkTimes};

/// The node's own identity: the key it signs tree heads with and its certificate chain.
pub struct NodeIdentity {
    /// `name@org` of the node, as enrolled.
    pub id: String,
    pub key: KeyPair,
    /// DER, base64url: the node certificate, then its organisation's CA.
    pub certificate_chain: Vec<String>,
}

impl NodeIdentity {
    /// The node identity of a member whose identity holds its key, its certificate and its
    /// organisation's CA (as `consortium::Identity` files of nodes do).
    pub fn from_member(member: &Identity) -> Result<NodeIdentity, IdentityError> {
        let (Some(certificate), Some(ca)) = (&member.certificate, &member.ca_certificate) else {
            return Err(IdentityError::NotANode(member.id.clone()));
        };
        Ok(NodeIdentity {
            id: member.id.clone(),
            key: KeyPair::from_pkcs8_der(member.key.pkcs8_der())?,
            certificate_chain: vec![base64url(&certificate.der), base64url(&ca.der)],
        })
    }
}

/// Limits and batching of the ordering service.
#[derive(Debug, Clone)]
pub struct OrderingConfig {
    /// Most transactions in one block.
    pub batch_txs_max: usize,
    /// How long a batch waits for more transactions after the first arrives; 0 commits as
    /// soon as the previous block is durable. Urgent transactions never wait.
    pub batch_delay_ms: u64,
    /// Transactions waiting to be ordered; more are refused as overload.
    pub queue_txs_max: usize,
    /// How long a client waits for its commit before hearing "outcome unknown".
    pub commit_timeout_ms: u64,
}

impl Default for OrderingConfig {
    fn default() -> Self {
        OrderingConfig {
            batch_txs_max: 4096,
            batch_delay_ms: 0,
            // With transactions of up to 16 KiB, at most 256 MiB waiting.
            queue_txs_max: 16_384,
            commit_timeout_ms: 10_000,
        }
    }
}

/// How many times `Ledger::submit_signed` re-signs after losing a nonce race.
pub const SIGNED_NONCE_RETRIES: usize = 3;

/// The nonces one signer's transactions take: each above the last one taken here and
/// above the one the ledger holds. Its lock is held from taking a nonce until the signed
/// transaction is queued for ordering (`Ledger::submit_signed`), so one signer's
/// transactions reach the orderer in nonce order and none is refused as stale for having
/// been overtaken by a later one.
#[derive(Debug, Default)]
pub struct NonceCounter {
    last: std::sync::Mutex<u64>,
}

/// A transaction's fate, once its block is durable.
#[derive(Debug, Clone)]
pub struct Committed {
    pub tx_id: TxId,
    pub height: u64,
    pub leaf_index: u64,
    /// Position of the transaction in its block.
    pub position: u64,
    pub outcome: TxOutcome,
    /// The tree head after the block, signed by this node.
    pub tree_head: Arc<SignedTreeHead>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("invalid transaction: {0}")]
    Invalid(String),
    #[error("transaction is for chain {0:?}, not this one")]
    WrongChain(String),
    #[error("signer {0:?} is not enrolled on this ledger")]
    UnknownSigner(String),
    #[error("signature does not verify under the signer's key")]
    BadSignature,
    #[error("the ordering queue is full; retry later")]
    Overloaded,
    #[error("no commit within the deadline; look the transaction up by its id {0}")]
    OutcomeUnknown(TxId),
    #[error("the ledger has stopped: {0}")]
    Stopped(String),
}

/// A transaction admitted for ordering and the client waiting for it.
pub struct Pending {
    /// Admission checked its signature against the signer's key.
    pub tx: VerifiedTx,
    pub urgent: bool,
    pub reply: oneshot::Sender<Result<Committed, SubmitError>>,
}

/// Where a queued transaction's fate arrives.
type Answer = oneshot::Receiver<Result<Committed, SubmitError>>;

/// Orders admitted transactions into committed blocks.
pub trait Orderer: Send + Sync {
    /// Queues a transaction without blocking; its reply arrives once its block is durable.
    fn enqueue(&self, pending: Pending) -> Result<(), SubmitError>;

    /// Why this node stopped for good (a diverged state, a failed store), if it did.
    fn fatal(&self) -> Option<String> {
        None
    }

    /// The consensus engine's view (role, term, leader, peers), where there is one.
    fn consensus(&self) -> Option<serde_json::Value> {
        None
    }

    /// Hands leadership to the node of `to` (`name@org`), where there is a leader to hand.
    fn transfer_leader(&self, to: &str) -> TransferFuture {
        let _ = to;
        Box::pin(async { Err("this node orders alone; there is no leader to transfer".into()) })
    }
}

/// The answer to a leader transfer, once it is done.
pub type TransferFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// Clients waiting for their transactions' blocks, by transaction id.
#[derive(Default)]
pub struct Waiters {
    waiting: std::sync::Mutex<HashMap<TxId, Vec<Reply>>>,
}

type Reply = oneshot::Sender<Result<Committed, SubmitError>>;

impl Waiters {
    /// Waiting entries beyond which those whose client gave up are dropped.
    const PRUNE_AT: usize = 65_536;

    pub fn register(&self, tx_id: TxId, reply: Reply) {
        let mut waiting = self.waiting.lock().expect("waiters lock");
        if waiting.len() >= Self::PRUNE_AT {
            waiting.retain(|_, replies| {
                replies.retain(|reply| !reply.is_closed());
                !replies.is_empty()
            });
        }
        waiting.entry(tx_id).or_default().push(reply);
    }

    /// Answers whoever waits for `tx_id`.
    pub fn resolve(&self, tx_id: &TxId, committed: impl FnOnce() -> Committed) {
        let replies = self.waiting.lock().expect("waiters lock").remove(tx_id);
        if let Some(replies) = replies {
            let committed = committed();
            for reply in replies {
                let _ = reply.send(Ok(committed.clone()));
            }
        }
    }
}

/// The key a transaction must verify under, as `state` knows its signer: a registering
/// patient's own key, an enrolled patient's or user's key.
pub fn signer_key<S: StateRead + ?Sized>(
    state: &S,
    tx: &SignedTx,
) -> Result<PublicKey, SubmitError> {
    let signer = &tx.payload.signer;
    if let TxBody::RegisterPatient { public_key } = &tx.payload.body {
        if &patient_pseudonym(public_key) != signer {
            return Err(SubmitError::Invalid(
                "a registering patient signs as the pseudonym of the registered key".into(),
            ));
        }
        return Ok(public_key.clone());
    }
    if is_patient_pseudonym(signer) {
        let bytes = state
            .get(&keys::patient(signer))
            .ok_or_else(|| SubmitError::UnknownSigner(signer.clone()))?;
        let patient: Patient = serde_json::from_slice(&bytes)
            .map_err(|e| SubmitError::Stopped(format!("stored patient does not decode: {e}")))?;
        Ok(patient.public_key)
    } else {
        let bytes = state
            .get(&keys::user(signer))
            .ok_or_else(|| SubmitError::UnknownSigner(signer.clone()))?;
        let user: User = serde_json::from_slice(&bytes)
            .map_err(|e| SubmitError::Stopped(format!("stored user does not decode: {e}")))?;
        Ok(user.public_key)
    }
}

/// Checks signatures of transactions someone else admitted, in parallel, under the keys
/// `state` knows. Those that verify become verified candidates; the others stay unverified,
/// for the core to refuse (or accept, if a key the block itself enrolls signed them) exactly
/// as every other node does. Positions travel with the transactions. The CPU time it takes
/// is added to `work`.
pub fn preverify<S: StateRead + ?Sized>(
    state: &S,
    work: &WorkTimes,
    txs: Vec<(usize, SignedTx)>,
) -> Vec<(usize, Candidate)> {
    let keyed: Vec<(usize, SignedTx, Option<PublicKey>)> = txs
        .into_iter()
        .map(|(position, tx)| {
            let key = signer_key(state, &tx).ok();
            (position, tx, key)
        })
        .collect();
    let verify = |(position, tx, key): (usize, SignedTx, Option<PublicKey>)| match key {
        Some(key) => match tx.clone().verify_with(&key) {
            Ok(verified) => (position, Candidate::Verified(verified)),
            Err(_) => (position, Candidate::Unverified(tx)),
        },
        None => (position, Candidate::Unverified(tx)),
    };
    let verify_all = |chunk: Vec<_>| {
        work.measure(Work::Verify, || {
            chunk.into_iter().map(verify).collect::<Vec<_>>()
        })
    };
    let threads = cores();
    if keyed.len() < 32 || threads < 2 {
        return verify_all(keyed);
    }
    let chunk = keyed.len().div_ceil(threads);
    let mut chunks: Vec<Vec<_>> = Vec::new();
    let mut keyed = keyed.into_iter().peekable();
    while keyed.peek().is_some() {
        chunks.push(keyed.by_ref().take(chunk).collect());
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| scope.spawn(|| verify_all(chunk)))
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().expect("verification threads do not panic"))
            .collect()
    })
}

/// The cores this process may use, looked up once: `available_parallelism` reads the
/// cgroup's files on every call, and `preverify` runs for every entry on every node.
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Counters of what the ledger has committed since start, and whether it still orders.
#[derive(Debug, Default)]
pub struct LedgerStats {
    pub blocks: AtomicU64,
    pub txs: AtomicU64,
    pub fsyncs: AtomicU64,
    /// Set when the ordering service has ended: the node still answers reads, but accepts
    /// no transaction.
    pub ordering_stopped: std::sync::atomic::AtomicBool,
}

/// Marks the ordering service stopped when its thread ends, by return or by panic.
struct StoppedOnExit(Arc<LedgerStats>);

impl Drop for StoppedOnExit {
    fn drop(&mut self) {
        self.0.ordering_stopped.store(true, Ordering::Relaxed);
    }
}

pub struct Ledger {
    store: Arc<Store>,
    chain_id: String,
    identity: Arc<NodeIdentity>,
    orderer: Box<dyn Orderer>,
    latest: Arc<RwLock<Arc<SignedTreeHead>>>,
    stats: Arc<LedgerStats>,
    config: OrderingConfig,
}

tokio::task_local! {
    /// The access entries signed while one API request is served (`collect_access_entries`).
    static ACCESS_ENTRIES: std::cell::RefCell<Vec<TxId>>;
}

/// Runs `work` and returns, with its output, the access entries (`log_access`,
/// `create_record` and `create_records` transactions, committed or refused by their
/// contract) that
/// `Ledger::submit_signed` committed for it in its own task: an API names them in its
/// answer, so a caller can prove what its request left on the ledger.
pub async fn collect_access_entries<F: std::future::Future>(work: F) -> (F::Output, Vec<TxId>) {
    ACCESS_ENTRIES
        .scope(std::cell::RefCell::new(Vec::new()), async {
            let output = work.await;
            let entries = ACCESS_ENTRIES.with(|entries| entries.take());
            (output, entries)
        })
        .await
}

/// Unix time in milliseconds: the shell's clock, passed into the core as block time.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes block 0 into an empty store.
pub fn initialise(data_dir: &Path, config: &GenesisConfig) -> Result<ChainHead, InitError> {
    let store = Store::open(data_dir)?;
    if store.head()?.is_some() {
        return Err(InitError::Store(StoreError::NotEmpty));
    }
    let empty = std::collections::BTreeMap::<String, Vec<u8>>::new();
    let executed = genesis(&empty, config).map_err(|e| InitError::Genesis(e.to_string()))?;
    store.commit_block(&executed)?;
    Ok(executed.head)
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Genesis(String),
}

pub(crate) fn sign_tree_head(identity: &NodeIdentity, head: &ChainHead) -> SignedTreeHead {
    let tree_head = TreeHead {
        chain_id: head.chain_id.clone(),
        height: head.height,
        log_size: head.log_size,
        log_root: head.log_root,
        time_ms: head.time_ms,
    };
    SignedTreeHead {
        signature: identity.key.sign(&tree_head.signing_bytes()),
        tree_head,
        signer: identity.id.clone(),
        certificate_chain: identity.certificate_chain.clone(),
    }
}

impl Ledger {
    /// Opens an initialised store and starts ordering on this node alone.
    pub fn open_solo(
        data_dir: &Path,
        identity: NodeIdentity,
        config: OrderingConfig,
    ) -> Result<Ledger, StoreError> {
        let store = Arc::new(Store::open(data_dir)?);
        let head = store.head()?.ok_or(StoreError::Empty)?;
        let identity = Arc::new(identity);
        let latest = Arc::new(RwLock::new(Arc::new(sign_tree_head(&identity, &head))));
        let stats = Arc::new(LedgerStats::default());
        let orderer = SoloOrderer::start(
            store.clone(),
            identity.clone(),
            head.clone(),
            config.clone(),
            latest.clone(),
            stats.clone(),
        );
        Ok(Ledger {
            store,
            chain_id: head.chain_id,
            identity,
            orderer: Box::new(orderer),
            latest,
            stats,
            config,
        })
    }

    /// A ledger over an initialised store whose ordering is `orderer` (a consensus engine).
    pub fn with_orderer(
        store: Arc<Store>,
        identity: Arc<NodeIdentity>,
        latest: Arc<RwLock<Arc<SignedTreeHead>>>,
        stats: Arc<LedgerStats>,
        config: OrderingConfig,
        orderer: Box<dyn Orderer>,
    ) -> Result<Ledger, StoreError> {
        let head = store.head()?.ok_or(StoreError::Empty)?;
        Ok(Ledger {
            store,
            chain_id: head.chain_id,
            identity,
            orderer,
            latest,
            stats,
            config,
        })
    }

    /// Why this node stopped for good, if it did; it then accepts and serves nothing.
    pub fn fatal(&self) -> Option<String> {
        self.orderer.fatal()
    }

    pub fn consensus(&self) -> Option<serde_json::Value> {
        self.orderer.consensus()
    }

    pub fn transfer_leader(&self, to: &str) -> TransferFuture {
        self.orderer.transfer_leader(to)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn store_handle(&self) -> Arc<Store> {
        self.store.clone()
    }

    pub fn identity(&self) -> Arc<NodeIdentity> {
        self.identity.clone()
    }

    pub fn chain_id(&self) -> &str {
        &self.chain_id
    }

    pub fn node_id(&self) -> &str {
        &self.identity.id
    }

    pub fn stats(&self) -> &LedgerStats {
        &self.stats
    }

    /// The latest signed tree head.
    pub fn tree_head(&self) -> Arc<SignedTreeHead> {
        self.latest.read().expect("tree head lock").clone()
    }

    /// Checks what can be checked before ordering: encoding, size, chain, signer and
    /// signature. A transaction that fails here never reaches a block, so a forgery cannot
    /// even consume a nonce.
    pub fn admit(&self, tx: SignedTx) -> Result<VerifiedTx, SubmitError> {
        if tx.payload.chain_id != self.chain_id {
            return Err(SubmitError::WrongChain(tx.payload.chain_id.clone()));
        }
        // The contract checks a published key's form; a point off the curve could never
        // be wrapped for, so it is refused before it reaches a block.
        if let TxBody::SetEncryptionKey { public_key } = &tx.payload.body {
            crate::keywrap::EncryptionPublicKey::from_base64url(public_key)
                .map_err(|e| SubmitError::Invalid(format!("public_key: {e}")))?;
        }
        let snapshot = self
            .store
            .snapshot()
            .map_err(|e| SubmitError::Stopped(e.to_string()))?;
        let key = signer_key(&snapshot, &tx)?;
        let checked = self
            .store
            .work()
            .measure(Work::Verify, || tx.verify_with(&key));
        match checked {
            Ok(verified) => Ok(verified),
            Err(SignatureCheck::Invalid) => Err(SubmitError::BadSignature),
            Err(SignatureCheck::Format(error)) => Err(SubmitError::Invalid(error.to_string())),
        }
    }

    /// Signs `body(nonce)` as `signer` with `key` and submits it, taking the next nonce from
    /// `nonces`. Taking the nonce, signing, admission and queueing happen under the
    /// counter's lock, so the signer's transactions are ordered in nonce order; one that
    /// still lost a race (a batch handed back to a new leader, say) is replaced and resent,
    /// up to `SIGNED_NONCE_RETRIES` times. The transaction may be ordered for `lifetime_ms`.
    pub async fn submit_signed<E: From<StoreError> + From<SubmitError>>(
        &self,
        signer: &str,
        key: &KeyPair,
        nonces: &NonceCounter,
        lifetime_ms: u64,
        mut body: impl FnMut(u64) -> TxBody,
    ) -> Result<Committed, E> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (tx_id, is_access, answer) = {
                let mut last = nonces.last.lock().expect("nonce lock");
                // The ledger's nonce is read at the first use and after a lost race;
                // otherwise the counter is ahead of it.
                let on_ledger = if *last > 0 && attempt == 1 {
                    0
                } else {
                    self.store()
                        .snapshot()?
                        .value::<u64>(&keys::nonce(signer))?
                        .unwrap_or(0)
                };
                let nonce = (*last).max(on_ledger) + 1;
                *last = nonce;
                let payload = medledger_core::tx::TxPayload {
                    chain_id: self.chain_id().to_string(),
                    signer: signer.to_string(),
                    nonce,
                    expires_at_ms: now_ms() + lifetime_ms,
                    body: body(nonce),
                };
                let is_access = matches!(
                    payload.body,
                    TxBody::LogAccess { .. }
                        | TxBody::CreateRecord { .. }
                        | TxBody::CreateRecords { .. }
                );
                let (tx_id, answer) = self.queue(crate::consortium::sign(payload, key))?;
                (tx_id, is_access, answer)
            };
            let committed = self.answer(tx_id, answer).await?;
            let stale = matches!(
                &committed.outcome,
                TxOutcome::Rejected { rejection }
                    if matches!(rejection, medledger_core::contracts::Rejection::StaleNonce { .. })
            );
            if !stale || attempt > SIGNED_NONCE_RETRIES {
                if is_access {
                    // A stale nonce's leaf has no event; only the entry that counts is noted.
                    let _ = ACCESS_ENTRIES.try_with(|entries| {
                        entries.borrow_mut().push(committed.tx_id);
                    });
                }
                return Ok(committed);
            }
        }
    }

    /// Admits, orders and commits a transaction; answers once its block is durable.
    pub async fn submit(&self, tx: SignedTx) -> Result<Committed, SubmitError> {
        let (tx_id, answer) = self.queue(tx)?;
        self.answer(tx_id, answer).await
    }

    /// Admits a transaction and queues it for ordering; its fate arrives on the receiver.
    fn queue(&self, tx: SignedTx) -> Result<(TxId, Answer), SubmitError> {
        if let Some(reason) = self.fatal() {
            return Err(SubmitError::Stopped(reason));
        }
        let urgent = tx.payload.body.is_urgent();
        let tx = self.admit(tx)?;
        let tx_id = tx.id();
        let (reply, answer) = oneshot::channel();
        self.orderer.enqueue(Pending { tx, urgent, reply })?;
        Ok((tx_id, answer))
    }

    /// Waits for a queued transaction's fate, at most the commit timeout: after that its
    /// outcome is unknown (never a false success).
    async fn answer(&self, tx_id: TxId, answer: Answer) -> Result<Committed, SubmitError> {
        let deadline = Duration::from_millis(self.config.commit_timeout_ms);
        match tokio::time::timeout(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(SubmitError::Stopped("the ordering service ended".into())),
            Err(_) => Err(SubmitError::OutcomeUnknown(tx_id)),
        }
    }
}

/// Orders transactions on this node alone.
pub struct SoloOrderer {
    queue: Option<mpsc::SyncSender<Pending>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SoloOrderer {
    /// Closes the queue and waits for the ordering thread, so that the store is closed
    /// cleanly once the ledger is dropped.
    fn drop(&mut self) {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl SoloOrderer {
    fn start(
        store: Arc<Store>,
        identity: Arc<NodeIdentity>,
        head: ChainHead,
        config: OrderingConfig,
        latest: Arc<RwLock<Arc<SignedTreeHead>>>,
        stats: Arc<LedgerStats>,
    ) -> SoloOrderer {
        let (queue, incoming) = mpsc::sync_channel(config.queue_txs_max);
        let thread = std::thread::Builder::new()
            .name("medledger-orderer".into())
            .spawn(move || {
                let _stopped_on_exit = StoppedOnExit(stats.clone());
                let mut head = head;
                while let Some(batch) = next_batch(&incoming, &config) {
                    match commit_batch(&store, &identity, &head, batch, &latest, &stats) {
                        Ok(next) => head = next,
                        Err(error) => {
                            // A failed durable write leaves the store as it was before the
                            // block (redb's commit is atomic), but this node cannot promise
                            // anything further: stop ordering; clients see the ledger stopped.
                            eprintln!("medledger: stopping the ordering service: {error}");
                            return;
                        }
                    }
                }
            })
            .expect("spawn the ordering thread");
        SoloOrderer {
            queue: Some(queue),
            thread: Some(thread),
        }
    }
}

impl Orderer for SoloOrderer {
    fn enqueue(&self, pending: Pending) -> Result<(), SubmitError> {
        let queue = self
            .queue
            .as_ref()
            .expect("the queue lives as long as the orderer");
        queue.try_send(pending).map_err(|error| match error {
            mpsc::TrySendError::Full(_) => SubmitError::Overloaded,
            mpsc::TrySendError::Disconnected(_) => {
                SubmitError::Stopped("the ordering service ended".into())
            }
        })
    }
}

/// Waits for a transaction, then gathers what else is waiting, up to the block limit.
fn next_batch(incoming: &mpsc::Receiver<Pending>, config: &OrderingConfig) -> Option<Vec<Pending>> {
    let first = incoming.recv().ok()?;
    let deadline = Instant::now() + Duration::from_millis(config.batch_delay_ms);
    let mut urgent = first.urgent;
    let mut batch = vec![first];
    while batch.len() < config.batch_txs_max {
        match incoming.try_recv() {
            Ok(pending) => {
                urgent |= pending.urgent;
                batch.push(pending);
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                let now = Instant::now();
                if urgent || now >= deadline {
                    break;
                }
                match incoming.recv_timeout(deadline - now) {
                    Ok(pending) => {
                        urgent |= pending.urgent;
                        batch.push(pending);
                    }
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
    }
    Some(batch)
}

fn commit_batch(
    store: &Store,
    identity: &NodeIdentity,
    head: &ChainHead,
    batch: Vec<Pending>,
    latest: &RwLock<Arc<SignedTreeHead>>,
    stats: &LedgerStats,
) -> Result<ChainHead, String> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut candidates = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for pending in batch {
        ids.push(pending.tx.id());
        candidates.push(Candidate::Verified(pending.tx));
        replies.push(pending.reply);
    }
    let snapshot = store.snapshot().map_err(|e| e.to_string())?;
    let time_ms = now_ms().max(head.time_ms);
    let executed = store.work().measure(Work::Execute, || {
        execute_block(&snapshot, head, &identity.id, time_ms, candidates)
    });
    let executed = match executed {
        Ok(executed) => executed,
        Err(error) => {
            // Only a bug in batching can get here (too many transactions, time going back).
            for reply in replies {
                let _ = reply.send(Err(SubmitError::Stopped(error.to_string())));
            }
            return Err(error.to_string());
        }
    };
    drop(snapshot);
    if let Err(error) = store.commit_block(&executed) {
        for reply in replies {
            let _ = reply.send(Err(SubmitError::Stopped(error.to_string())));
        }
        return Err(error.to_string());
    }
    stats.blocks.fetch_add(1, Ordering::Relaxed);
    stats.fsyncs.fetch_add(1, Ordering::Relaxed);
    stats
        .txs
        .fetch_add(executed.block.txs.len() as u64, Ordering::Relaxed);
    let tree_head = Arc::new(sign_tree_head(identity, &executed.head));
    *latest.write().expect("tree head lock") = tree_head.clone();
    let first_leaf = head.log_size;
    for (position, ((reply, outcome), tx_id)) in replies
        .into_iter()
        .zip(executed.block.outcomes)
        .zip(ids)
        .enumerate()
    {
        let _ = reply.send(Ok(Committed {
            tx_id,
            height: executed.head.height,
            leaf_index: first_leaf + position as u64,
            position: position as u64,
            outcome,
            tree_head: tree_head.clone(),
        }));
    }
    Ok(executed.head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_right_after_a_block_is_staged_sees_it_and_still_refuses_forgeries() {
        // Proves that answering clients before their block reaches the ledger file does not
        // break what they may do next: a patient told their registration committed (the
        // block staged, not written) is admitted at once, and a transaction forged in their
        // name is refused all the same.
        use crate::consortium::{Consortium, Identity};
        use crate::pki::Validity;
        use medledger_core::block::execute_block;
        use medledger_core::contracts::Candidate;
        use medledger_core::identity::OrgKind;

        let dir = tempfile::tempdir().expect("a directory");
        let now = now_ms() / 1000 * 1000;
        let day = 24 * 60 * 60 * 1000;
        let validity = Validity {
            not_before_ms: now - day,
            not_after_ms: now + day,
        };
        let consortium = Consortium::create(
            "admission-test",
            &[("hospital-a", OrgKind::Hospital)],
            now,
            validity,
        )
        .expect("a consortium");
        initialise(dir.path(), &consortium.genesis).expect("genesis is stored");
        let node = &consortium.orgs[0].node;
        let identity = NodeIdentity::from_member(node).expect("a node identity");
        let ledger = Ledger::open_solo(dir.path(), identity, OrderingConfig::default())
            .expect("the ledger opens");
        let patient = Identity::new_patient().expect("a patient");
        let register = patient.sign(
            "admission-test",
            1,
            now + day,
            TxBody::RegisterPatient {
                public_key: patient.key.public_key(),
            },
        );
        let publish = patient.sign(
            "admission-test",
            2,
            now + day,
            TxBody::SetEncryptionKey {
                public_key: crate::keywrap::EncryptionKeyPair::generate()
                    .public_key()
                    .to_base64url(),
            },
        );
        let impostor = Identity::new_patient().expect("another key");
        let forged = crate::consortium::sign(publish.payload.clone(), &impostor.key);

        let store = ledger.store_handle();
        let head = store.head().expect("the head").expect("genesis");
        let snapshot = store.snapshot().expect("a snapshot");
        let executed = execute_block(
            &snapshot,
            &head,
            &node.id,
            now,
            vec![Candidate::Unverified(register)],
        )
        .expect("the block executes");
        drop(snapshot);

        // What a consortium node does before it answers the block's clients.
        store
            .stage(Some(&executed), b"{}")
            .expect("the block stages");
        let (admitted, refused) = (ledger.admit(publish), ledger.admit(forged));
        assert!(admitted.is_ok(), "{:?}", admitted.err());
        assert!(
            matches!(refused, Err(SubmitError::BadSignature)),
            "{refused:?}"
        );
    }

    #[test]
    fn only_a_member_with_certificate_and_ca_makes_a_node_identity() {
        // Proves that a patient's identity (a key, no certificates) is refused as a node,
        // rather than a node starting that cannot prove its tree heads.
        let patient = Identity::new_patient().unwrap();
        assert!(matches!(
            NodeIdentity::from_member(&patient),
            Err(IdentityError::NotANode(id)) if id == patient.id
        ));
    }
}

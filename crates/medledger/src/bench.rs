//! `medledger bench ledger`, `medledger bench solo` and `medledger bench records`: what this
//! machine can do, measured in one run.
//!
//! First the ceiling: ECDSA P-256 verifications per second, on one core and on all. Then
//! the ledger: `ledger` starts a three-node consortium in this process (separate stores,
//! Raft over mutual TLS on loopback; clients spread over the nodes, followers forward to
//! the leader, every node verifies and executes every transaction); `solo` runs one node
//! that orders alone. Each prints committed transactions per second under many concurrent
//! clients, commit latency at a single client and at half of that peak rate, and how many
//! transactions share a block and an fsync. The last line is one JSON object with the
//! figures.
//!
//! `records` measures the record exchange instead: its ceiling is the AES-256-GCM and
//! SHA-256 throughput of one core (and ECDSA P-256 verifications on one core); then three
//! member nodes with record services (embedded stores) run in this process, hospital-a's
//! clinicians create FHIR Observations (seal, store, author-signed `create_record`), and
//! clinicians read each record once at the custodian's own node and once through
//! hospital-b's node (the durable access entry, then the content id, author signature,
//! commitment and decryption checks). It prints records created and read per second with
//! p50/p99 latency; the last line is one JSON object with the figures.
//!
//! `fhir` (in `bench_fhir`) measures the FHIR REST API over HTTP with real tokens.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use medledger_core::contracts::CONSENTS_PER_PATIENT_MAX;
use medledger_core::identity::OrgKind;
use medledger_core::model::{Action, Category, Grantee, Purpose, Scope};
use medledger_core::tx::{SignedTx, TxBody};
use medledger_node::consortium::{Consortium, Identity};
use medledger_node::ledger::{now_ms, Ledger, NodeIdentity, OrderingConfig};
use medledger_node::pki::KeyPair;
use medledger_node::work::{process_cpu_ns, WorkSpent};

use crate::commands::{init_node, validity_days};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchTarget {
    /// A three-node Raft consortium over mutual TLS on loopback.
    Ledger,
    /// One node ordering alone.
    Solo,
    /// FHIR records created, then read at the custodian's node and through another node.
    Records,
    /// The FHIR REST API over HTTP with real tokens: creates, reads, reads across nodes and
    /// `$everything`, next to the ceilings of the HTTP stack, the token check and the ledger.
    Fhir,
}

#[derive(Args)]
pub struct BenchArgs {
    #[arg(value_enum, default_value = "ledger")]
    target: BenchTarget,
    /// Seconds of the open-loop run at half the peak rate.
    #[arg(long, default_value_t = 5)]
    half_load_seconds: u64,
    /// Transactions in the throughput run.
    #[arg(long, default_value_t = 20_000)]
    txs: usize,
    /// Concurrent clients in the throughput run (each a patient signing its own grants).
    #[arg(long, default_value_t = 256)]
    clients: usize,
    /// Sequential transactions in the single-client latency run.
    #[arg(long, default_value_t = 1_000)]
    latency_txs: usize,
    /// Records created (then each read once locally and once remotely) by `bench records`.
    #[arg(long, default_value_t = 2_000)]
    records: usize,
    /// Concurrent authors, then concurrent readers, in `bench records`.
    #[arg(long, default_value_t = 32)]
    record_clients: usize,
    #[command(flatten)]
    fhir: crate::bench_fhir::FhirArgs,
}

pub(crate) const CHAIN_ID: &str = "medledger-bench";

/// Grants one bench patient makes at most (each lasts a day): as many as the slots the
/// ledger keeps for a patient's consents in force. Past them it refuses every grant, after
/// looking for an expired one in each slot, and a run would measure those refusals.
const GRANTS_PER_PATIENT: usize = CONSENTS_PER_PATIENT_MAX;

pub(crate) fn grant(patient: &Identity, nonce: u64) -> SignedTx {
    patient.sign(CHAIN_ID, nonce, now_ms() + 10 * 60 * 1000, grant_body())
}

/// A patient lets hospital-a read their diagnostics for treatment, for a day.
pub(crate) fn grant_body() -> TxBody {
    TxBody::Grant {
        grantee: Grantee::Org {
            org: "hospital-a".into(),
        },
        scope: Scope {
            resource_types: vec![],
            categories: vec![Category::Diagnostics],
        },
        actions: vec![Action::Read],
        purposes: vec![Purpose::Treatment],
        expires_at_ms: Some(now_ms() + 24 * 60 * 60 * 1000),
    }
}

/// Verifications per second of `threads` threads verifying `count` signatures each.
pub(crate) fn verify_rate(threads: usize, count: usize) -> f64 {
    let key = KeyPair::generate().expect("a key");
    let public = key.public_key();
    let messages: Vec<Vec<u8>> = (0..256)
        .map(|i| format!("message {i}").into_bytes())
        .collect();
    let signatures: Vec<_> = messages.iter().map(|m| key.sign(m)).collect();
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                for i in 0..count {
                    let n = i % messages.len();
                    assert!(public.verify(&messages[n], &signatures[n]));
                }
            });
        }
    });
    (threads * count) as f64 / start.elapsed().as_secs_f64()
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

/// Peak resident memory of this process, from /proc (Linux).
pub(crate) fn peak_memory_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

pub(crate) struct Phase {
    pub(crate) committed: usize,
    pub(crate) seconds: f64,
    pub(crate) latencies: Vec<Duration>,
}

/// Submits each client's transactions in order, all clients at once.
pub(crate) fn drive(
    runtime: &tokio::runtime::Runtime,
    ledgers: &[Arc<Ledger>],
    per_client: Vec<Vec<SignedTx>>,
) -> Phase {
    let start = Instant::now();
    let results: Vec<(usize, Vec<Duration>)> = runtime.block_on(async {
        let tasks: Vec<_> = per_client
            .into_iter()
            .enumerate()
            .map(|(client, txs)| {
                let ledger = ledgers[client % ledgers.len()].clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(txs.len());
                    let mut committed = 0;
                    for tx in txs {
                        let sent = Instant::now();
                        if let Ok(result) = ledger.submit(tx).await {
                            committed += usize::from(result.outcome.is_committed());
                        }
                        latencies.push(sent.elapsed());
                    }
                    (committed, latencies)
                })
            })
            .collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.expect("a client task"));
        }
        out
    });
    let seconds = start.elapsed().as_secs_f64();
    let mut latencies: Vec<Duration> = results
        .iter()
        .flat_map(|(_, l)| l.iter().copied())
        .collect();
    latencies.sort();
    Phase {
        committed: results.iter().map(|(c, _)| c).sum(),
        seconds,
        latencies,
    }
}

/// The throughput goal, as a share of the verify ceiling.
const GOAL_SHARE_PERCENT: f64 = 65.0;

/// Where the CPU went during a run: the whole process's CPU time, and the nodes' own
/// measures of their transaction work, for the transactions that committed.
struct CpuAccount {
    process_ns: u64,
    work: WorkSpent,
    txs: usize,
}

/// CPU time per transaction at the throughput goal: in all, and what verifying takes.
struct GoalBudget {
    total_us: f64,
    verify_us: f64,
}

impl CpuAccount {
    /// Microseconds of CPU per committed transaction.
    fn us(&self, ns: u64) -> f64 {
        ns as f64 / 1000.0 / self.txs.max(1) as f64
    }

    /// The CPU time of the run: the process's, or the nodes' own measures should those add
    /// up to more (they are read a moment apart).
    fn total_ns(&self) -> u64 {
        self.process_ns.max(self.work.total_ns())
    }

    fn summary(&self) -> String {
        let w = &self.work;
        let total = self.total_ns();
        let part = |name: &str, ns: u64| {
            format!(
                "{name} {:.0} ({:.0} %)",
                self.us(ns),
                100.0 * ns as f64 / total.max(1) as f64
            )
        };
        format!(
            "CPU per committed tx at peak (all nodes and clients in this process): {:.0} µs = {}, {}, {}, {}, {} (consensus, transport, scheduling, clients)",
            self.us(total),
            part("verify", w.verify_ns),
            part("execute", w.execute_ns),
            part("stage", w.stage_ns),
            part("ledger-file flush", w.flush_ns),
            part("the rest", total - w.total_ns()),
        )
    }
}

impl GoalBudget {
    /// At the goal's rate (`GOAL_SHARE_PERCENT` of `verify_ceiling` tx/s on `cores`), the
    /// CPU one transaction may take, and the part its signature checks take at the
    /// ceiling's own rate.
    fn of(cores: usize, verify_ceiling: f64) -> GoalBudget {
        let goal_rate = verify_ceiling * GOAL_SHARE_PERCENT / 100.0;
        GoalBudget {
            total_us: cores as f64 * 1e6 / goal_rate.max(1.0),
            verify_us: cores as f64 * 1e6 / verify_ceiling.max(1.0),
        }
    }
}

/// The nodes under test: their ledgers (clients are spread over them), the one that leads
/// (whose counters are read), and what must be dropped to stop them.
struct Nodes {
    ledgers: Vec<Arc<Ledger>>,
    leader: usize,
    _members: Vec<crate::node_runner::RunningMember>,
    dir: std::path::PathBuf,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.ledgers.clear();
        self._members.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn solo_node(dir: &std::path::Path) -> Result<Nodes, String> {
    let consortium = Consortium::create(
        CHAIN_ID,
        &[("hospital-a", OrgKind::Hospital)],
        now_ms(),
        validity_days(2),
    )
    .map_err(|e| e.to_string())?;
    let node = &consortium.orgs[0].node;
    init_node(dir, &consortium.genesis, node)?;
    let identity = NodeIdentity::from_member(node).map_err(|e| e.to_string())?;
    let ledger = Arc::new(
        Ledger::open_solo(dir, identity, OrderingConfig::default()).map_err(|e| e.to_string())?,
    );
    Ok(Nodes {
        ledgers: vec![ledger],
        leader: 0,
        _members: Vec::new(),
        dir: dir.to_path_buf(),
    })
}

fn consortium_nodes(dir: &std::path::Path) -> Result<Nodes, String> {
    let base_port = crate::local::free_base_port(3)?;
    let local = crate::local::create_local(
        dir,
        CHAIN_ID,
        &crate::local::LOCAL_ORGS[..3],
        3,
        base_port,
        |_| {},
    )?;
    let members = crate::local::start_all(&local.configs)?;
    let leader = members
        .iter()
        .position(|member| member.node.status().role == "leader")
        .ok_or("no node leads")?;
    Ok(Nodes {
        ledgers: members.iter().map(|member| member.ledger.clone()).collect(),
        leader,
        _members: members,
        dir: dir.to_path_buf(),
    })
}

/// Open loop at `rate` transactions per second for `seconds`: each tick takes an idle
/// patient (one transaction in flight per signer keeps its nonces in order) and submits
/// its next grant; a tick with no idle patient is counted as missed.
fn open_loop(
    runtime: &tokio::runtime::Runtime,
    ledgers: &[Arc<Ledger>],
    pool: Vec<Identity>,
    rate: f64,
    seconds: u64,
) -> (Phase, usize) {
    let start = Instant::now();
    let (latencies, committed, missed) = runtime.block_on(async {
        let (idle, mut waiting) = tokio::sync::mpsc::unbounded_channel::<(Identity, u64)>();
        for patient in pool {
            let _ = idle.send((patient, 2));
        }
        let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
        let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let mut next = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        let mut missed = 0usize;
        let mut sent = 0usize;
        while next < end {
            tokio::time::sleep_until(next).await;
            next += interval;
            let Ok((patient, nonce)) = waiting.try_recv() else {
                missed += 1;
                continue;
            };
            let ledger = ledgers[sent % ledgers.len()].clone();
            sent += 1;
            let idle = idle.clone();
            tasks.push(tokio::spawn(async move {
                let tx = grant(&patient, nonce);
                let begun = Instant::now();
                let ok = matches!(ledger.submit(tx).await, Ok(c) if c.outcome.is_committed());
                let took = begun.elapsed();
                // Retired before its consent slots are full (a tick then may find no one).
                if nonce - 1 < GRANTS_PER_PATIENT as u64 {
                    let _ = idle.send((patient, nonce + 1));
                }
                (ok, took)
            }));
        }
        let mut latencies = Vec::with_capacity(tasks.len());
        let mut committed = 0;
        for task in tasks {
            let (ok, took) = task.await.expect("a client task");
            committed += usize::from(ok);
            latencies.push(took);
        }
        (latencies, committed, missed)
    });
    let mut latencies = latencies;
    latencies.sort();
    (
        Phase {
            committed,
            seconds: start.elapsed().as_secs_f64(),
            latencies,
        },
        missed,
    )
}

/// Whether `wanted` leads with every node following it, and whom each node takes for the
/// leader: what a bench waits for before it measures a node in a given role.
pub(crate) fn lead_of<'a>(
    nodes: impl IntoIterator<Item = &'a medledger_node::cluster::ClusterNode>,
    wanted: &str,
) -> (bool, Vec<Option<String>>) {
    let mut leads = false;
    let mut leaders = Vec::new();
    for node in nodes {
        let status = node.status();
        leads |= node.info.node == wanted && status.role == "leader";
        leaders.push(status.leader);
    }
    let led = leads && leaders.iter().all(|l| l.as_deref() == Some(wanted));
    (led, leaders)
}

pub(crate) fn max_ms(latencies: &[Duration]) -> f64 {
    latencies
        .last()
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

pub fn run(args: BenchArgs) -> Result<(), String> {
    if args.target == BenchTarget::Records {
        return records::run(args.records, args.record_clients);
    }
    if args.target == BenchTarget::Fhir {
        return crate::bench_fhir::run(&args.fhir);
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("medledger bench on {cores} core(s)");
    let verify_one = verify_rate(1, 8_000);
    let verify_all = verify_rate(cores, 8_000);
    println!("ceiling: ECDSA P-256 verify {verify_one:.0}/s on one core, {verify_all:.0}/s on {cores} cores");

    let dir = std::env::temp_dir().join(format!("medledger-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let nodes = match args.target {
        BenchTarget::Solo => solo_node(&dir)?,
        BenchTarget::Ledger => consortium_nodes(&dir)?,
        BenchTarget::Records | BenchTarget::Fhir => {
            unreachable!("bench records and bench fhir return above")
        }
    };
    // Every node checks every signature once (at admission or before executing the block).
    let verifying_nodes = nodes.ledgers.len();
    let verify_ceiling = verify_all / verifying_nodes as f64;
    println!(
        "ledger: {} node(s) on this machine, each verifying every transaction: ceiling {verify_ceiling:.0} tx/s",
        verifying_nodes
    );
    let ledgers = nodes.ledgers.clone();
    let leader = nodes.ledgers[nodes.leader].clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;

    let clients = args.clients.max(1);
    let per_client = args.txs.div_ceil(clients);
    if per_client > GRANTS_PER_PATIENT {
        return Err(format!(
            "{per_client} grants per client would fill a patient's {CONSENTS_PER_PATIENT_MAX} consent slots (the ledger then refuses every further grant); use at least {} clients for {} transactions",
            args.txs.div_ceil(GRANTS_PER_PATIENT),
            args.txs
        ));
    }
    let single_patients = args.latency_txs.div_ceil(GRANTS_PER_PATIENT).max(1);
    let pool_size = clients;
    let patients: Vec<Identity> = (0..clients + single_patients + pool_size)
        .map(|_| Identity::new_patient())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let registrations = patients
        .iter()
        .map(|p| {
            vec![p.sign(
                CHAIN_ID,
                1,
                now_ms() + 600_000,
                TxBody::RegisterPatient {
                    public_key: p.key.public_key(),
                },
            )]
        })
        .collect();
    let setup = drive(&runtime, &ledgers, registrations);
    if setup.committed != patients.len() {
        return Err(format!(
            "only {} of {} patients registered",
            setup.committed,
            patients.len()
        ));
    }
    let mut patients = patients;
    let pool: Vec<Identity> = patients.split_off(clients + single_patients);

    let load: Vec<Vec<SignedTx>> = patients[..clients]
        .iter()
        .map(|p| (0..per_client as u64).map(|n| grant(p, n + 2)).collect())
        .collect();
    // The write-ahead log counts its own syncs (appends queued together share one).
    let fsyncs_now = || {
        leader
            .store()
            .raft_log_syncs()
            .unwrap_or_else(|| leader.stats().fsyncs.load(Ordering::Relaxed))
    };
    let fsyncs_before = fsyncs_now();
    let blocks_before = leader.stats().blocks.load(Ordering::Relaxed);
    let work_now = || {
        ledgers.iter().fold(WorkSpent::default(), |sum, ledger| {
            sum.plus(&ledger.store().work().spent())
        })
    };
    let (cpu_before, work_before) = (process_cpu_ns(), work_now());
    let throughput = drive(&runtime, &ledgers, load);
    let cpu = CpuAccount {
        process_ns: process_cpu_ns() - cpu_before,
        work: work_now().since(&work_before),
        txs: throughput.committed,
    };
    let fsyncs = fsyncs_now() - fsyncs_before;
    let blocks = leader.stats().blocks.load(Ordering::Relaxed) - blocks_before;
    let tx_per_s = throughput.committed as f64 / throughput.seconds;
    let tx_per_block = throughput.committed as f64 / blocks.max(1) as f64;
    let tx_per_fsync = throughput.committed as f64 / fsyncs.max(1) as f64;
    println!(
        "peak: {} txs from {clients} clients committed in {:.2} s = {tx_per_s:.0} tx/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {tx_per_block:.1} tx/block, {tx_per_fsync:.1} tx/fsync (at the leader)",
        throughput.committed,
        throughput.seconds,
        percentile(&throughput.latencies, 0.50),
        percentile(&throughput.latencies, 0.99),
        max_ms(&throughput.latencies),
    );
    println!("{}", cpu.summary());
    let per_tx_at_goal = GoalBudget::of(cores, verify_ceiling);
    println!(
        "for {GOAL_SHARE_PERCENT} % of the ceiling a transaction may take {:.0} µs of CPU in all; its verifications take {:.0} of them at the ceiling's rate, leaving {:.0} µs for the rest, against {:.0} µs measured above for executing, staging and flushing alone",
        per_tx_at_goal.total_us,
        per_tx_at_goal.verify_us,
        per_tx_at_goal.total_us - per_tx_at_goal.verify_us,
        cpu.us(cpu.work.execute_ns + cpu.work.stage_ns + cpu.work.flush_ns),
    );

    // One client, sequentially; a new patient before one's consent slots are full.
    let single = &patients[clients..];
    let sequential = vec![(0..args.latency_txs)
        .map(|n| {
            let nonce = (n % GRANTS_PER_PATIENT) as u64 + 2;
            grant(&single[n / GRANTS_PER_PATIENT], nonce)
        })
        .collect()];
    let latency = drive(&runtime, std::slice::from_ref(&leader), sequential);
    let (p50, p99, max) = (
        percentile(&latency.latencies, 0.50),
        percentile(&latency.latencies, 0.99),
        max_ms(&latency.latencies),
    );
    println!(
        "single client (at the leader): {} sequential txs, commit latency p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
        latency.committed
    );

    let half_rate = tx_per_s / 2.0;
    let (half, missed) = open_loop(&runtime, &ledgers, pool, half_rate, args.half_load_seconds);
    let (half_p50, half_p99, half_max) = (
        percentile(&half.latencies, 0.50),
        percentile(&half.latencies, 0.99),
        max_ms(&half.latencies),
    );
    println!(
        "half of peak ({half_rate:.0} tx/s offered for {} s): {} committed, latency p50 {half_p50:.2} ms, p99 {half_p99:.2} ms, max {half_max:.2} ms; {missed} ticks found no idle client",
        args.half_load_seconds, half.committed
    );
    let peak = peak_memory_mib();
    let share = 100.0 * tx_per_s / verify_ceiling;
    println!(
        "ledger rate is {share:.0} % of the verify ceiling ({verify_ceiling:.0} tx/s); peak memory {peak:.0} MiB (all nodes, this process)"
    );
    drop(leader);
    drop(ledgers);
    drop(nodes);
    println!(
        "{}",
        serde_json::json!({
            "target": match args.target {
                BenchTarget::Ledger => "ledger",
                BenchTarget::Solo => "solo",
                BenchTarget::Records => "records",
                BenchTarget::Fhir => "fhir",
            },
            "nodes": verifying_nodes,
            "verify_per_s_one_core": verify_one.round(),
            "verify_per_s_all_cores": verify_all.round(),
            "verify_ceiling_tx_per_s": verify_ceiling.round(),
            "tx_per_s": tx_per_s.round(),
            "share_of_ceiling": (share * 10.0).round() / 10.0,
            "peak_latency_ms_p50": percentile(&throughput.latencies, 0.50),
            "peak_latency_ms_p99": percentile(&throughput.latencies, 0.99),
            "latency_ms_p50": p50,
            "latency_ms_p99": p99,
            "latency_ms_max": max,
            "half_load_tx_per_s": half_rate.round(),
            "half_load_latency_ms_p50": half_p50,
            "half_load_latency_ms_p99": half_p99,
            "half_load_latency_ms_max": half_max,
            "tx_per_block": tx_per_block,
            "tx_per_fsync": tx_per_fsync,
            "peak_memory_mib": peak.round(),
            "cores": cores,
            "peak_cpu_us_per_tx": cpu.us(cpu.total_ns()),
            "peak_verify_us_per_tx": cpu.us(cpu.work.verify_ns),
            "peak_execute_us_per_tx": cpu.us(cpu.work.execute_ns),
            "peak_stage_us_per_tx": cpu.us(cpu.work.stage_ns),
            "peak_flush_us_per_tx": cpu.us(cpu.work.flush_ns),
            "cpu_us_per_tx_at_goal": per_tx_at_goal.total_us,
        })
    );
    Ok(())
}

/// `medledger bench records`: records created and read through the record services of a
/// three-node consortium in this process.
pub(crate) mod records {
    use std::collections::BTreeMap;
    use std::future::Future;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use medledger_core::identity::Role;
    use medledger_core::model::{Action, Category, Grantee, Purpose, Scope};
    use medledger_core::tx::TxBody;
    use medledger_node::cluster::{ClusterNode, ClusterSettings};
    use medledger_node::consensus::NodeInfo;
    use medledger_node::consortium::{Consortium, Identity};
    use medledger_node::ledger::{initialise, now_ms, Committed, Ledger, NodeIdentity};
    use medledger_node::records::service::{PrepareRequest, ReadRequest};
    use medledger_node::records::{EmbeddedStore, RecordService, RecordStore};
    use medledger_node::store::Store;
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    use serde_json::{json, Value};

    use super::{max_ms, peak_memory_mib, percentile, verify_rate, CHAIN_ID};
    use crate::commands::validity_days;

    /// The custodian: its clinicians author every record and read them at its own node.
    const CUSTODIAN: usize = 0;
    /// The other hospital: its clinicians read the custodian's records through its node.
    const REMOTE: usize = 1;
    /// The node that leads, so that both reading nodes are followers alike.
    const LEADER: usize = 2;
    /// Bytes hashed or encrypted per call when measuring the ceiling.
    const BUFFER_BYTES: usize = 4 << 20;
    /// How long each ceiling is measured.
    const CEILING_TIME: Duration = Duration::from_secs(1);

    /// Removes a scratch directory when dropped.
    struct ScratchDir(PathBuf);

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Megabytes (10^6 bytes) per second one core encrypts with AES-256-GCM.
    fn aes_gcm_mb_per_s() -> f64 {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[0x42; 32]).expect("a key"));
        let mut buffer = vec![0x5a_u8; BUFFER_BYTES];
        let (mut bytes, mut counter) = (0usize, 0u64);
        let start = Instant::now();
        while start.elapsed() < CEILING_TIME {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_be_bytes());
            counter += 1;
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    &mut buffer,
                )
                .expect("sealed");
            std::hint::black_box(tag.as_ref());
            bytes += buffer.len();
        }
        bytes as f64 / start.elapsed().as_secs_f64() / 1e6
    }

    /// Megabytes (10^6 bytes) per second one core hashes with SHA-256.
    fn sha256_mb_per_s() -> f64 {
        let buffer = vec![0x5a_u8; BUFFER_BYTES];
        let mut bytes = 0usize;
        let start = Instant::now();
        while start.elapsed() < CEILING_TIME {
            let digest = ring::digest::digest(&ring::digest::SHA256, std::hint::black_box(&buffer));
            std::hint::black_box(digest.as_ref());
            bytes += buffer.len();
        }
        bytes as f64 / start.elapsed().as_secs_f64() / 1e6
    }

    /// A blood pressure Observation of about 1 KiB, synthetic, a little different per `n`.
    pub(crate) fn observation(patient: &str, n: usize) -> Value {
        let systolic = 105 + (n * 7) % 60;
        let diastolic = 62 + (n * 3) % 30;
        let component = |code: &str, display: &str, value: usize| {
            json!({
                "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
                "valueQuantity": {
                    "value": value,
                    "unit": "mmHg",
                    "system": "http://unitsofmeasure.org",
                    "code": "mm[Hg]"
                }
            })
        };
        json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs",
                "display": "Vital Signs"
            }]}],
            "code": {
                "coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel"}],
                "text": "Blood pressure"
            },
            "subject": {"reference": format!("Patient/{patient}"), "display": "Synthetic Patient"},
            "effectiveDateTime": "2025-03-02T09:30:00+01:00",
            "issued": "2025-03-02T09:41:12.000+01:00",
            "performer": [{"display": "Synthetic Clinician, Hospital A"}],
            "note": [{"text": "Synthetic benchmark data. Seated, after five minutes of rest."}],
            "component": [
                component("8480-6", "Systolic blood pressure", systolic),
                component("8462-4", "Diastolic blood pressure", diastolic)
            ]
        })
    }

    fn consent(org: &str, actions: Vec<Action>) -> TxBody {
        TxBody::Grant {
            grantee: Grantee::Org { org: org.into() },
            scope: Scope {
                resource_types: vec![],
                categories: vec![Category::Diagnostics],
            },
            actions,
            purposes: vec![Purpose::Treatment],
            expires_at_ms: Some(now_ms() + 24 * 60 * 60 * 1000),
        }
    }

    /// Signs `body` as `who` and commits it through `ledger`, which has applied it on return.
    pub(crate) async fn commit(
        ledger: &Ledger,
        who: &Identity,
        nonce: u64,
        body: TxBody,
    ) -> Result<Committed, String> {
        let tx = who.sign(CHAIN_ID, nonce, now_ms() + 10 * 60 * 1000, body);
        let committed = ledger
            .submit(tx)
            .await
            .map_err(|e| format!("{}: {e}", who.id))?;
        if committed.outcome.is_committed() {
            Ok(committed)
        } else {
            Err(format!("{}: {:?}", who.id, committed.outcome))
        }
    }

    /// Issues `count` users `{prefix}-{n}` with `role` by `founding`'s authority and enrolls
    /// them on `ledger`, signed by its admin with nonces 1 to `count` (its first entries).
    pub(crate) async fn enroll_users(
        ledger: &Ledger,
        founding: &medledger_node::consortium::FoundingOrg,
        prefix: &str,
        role: Role,
        count: usize,
    ) -> Result<Vec<Identity>, String> {
        let mut users = Vec::with_capacity(count);
        for n in 0..count {
            let user = founding
                .authority
                .issue(&format!("{prefix}-{n}"), role, validity_days(2))
                .map_err(|e| e.to_string())?;
            let certificate = user.certificate_text().ok_or("an issued certificate")?;
            commit(
                ledger,
                &founding.admin,
                n as u64 + 1,
                TxBody::EnrollUser { certificate },
            )
            .await?;
            users.push(user);
        }
        Ok(users)
    }

    /// Three member nodes (hospital-a, hospital-b, lab-x), each with its ledger store and an
    /// embedded record store in its own directory and a record service.
    struct Net {
        consortium: Consortium,
        nodes: Vec<ClusterNode>,
        services: Vec<Arc<RecordService>>,
    }

    impl Net {
        async fn start(dir: &Path) -> Result<Net, String> {
            let orgs = &crate::local::LOCAL_ORGS[..3];
            let consortium = Consortium::create(CHAIN_ID, orgs, now_ms(), validity_days(2))
                .map_err(|e| e.to_string())?;
            let mut nodes = Vec::new();
            let mut stores: Vec<Arc<dyn RecordStore>> = Vec::new();
            for (org, _) in orgs {
                let member = &consortium.org(org).ok_or("a founding member")?.node;
                let node_dir = dir.join(org);
                std::fs::create_dir_all(&node_dir)
                    .map_err(|e| format!("{}: {e}", node_dir.display()))?;
                initialise(&node_dir, &consortium.genesis).map_err(|e| e.to_string())?;
                let store = Arc::new(Store::open(&node_dir).map_err(|e| e.to_string())?);
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?;
                let info = NodeInfo {
                    node: member.id.clone(),
                    peer_addr: listener
                        .local_addr()
                        .map_err(|e| e.to_string())?
                        .to_string(),
                    api_url: String::new(),
                };
                let identity = NodeIdentity::from_member(member).map_err(|e| e.to_string())?;
                let node =
                    ClusterNode::start(store, identity, info, listener, ClusterSettings::default())
                        .await?;
                nodes.push(node);
                stores.push(Arc::new(
                    EmbeddedStore::open(&node_dir).map_err(|e| e.to_string())?,
                ));
            }
            let founders: BTreeMap<u64, NodeInfo> = nodes
                .iter()
                .map(|node| (node.id, node.info.clone()))
                .collect();
            for node in &nodes {
                node.bootstrap(founders.clone()).await?;
            }
            lead_at(&nodes, LEADER).await?;
            let mut services = Vec::new();
            for ((node, store), (org, _)) in nodes.iter().zip(stores).zip(orgs) {
                let member = &consortium.org(org).ok_or("a founding member")?.node;
                let service = Arc::new(
                    RecordService::new(
                        node.ledger.clone(),
                        store,
                        member.encryption_keys.clone(),
                        Some(node.custodian_link()),
                    )
                    .map_err(|e| e.to_string())?,
                );
                node.attach_records(&service);
                services.push(service);
            }
            for service in &services {
                let mut attempts = 0;
                while let Err(error) = service.publish_key().await {
                    attempts += 1;
                    if attempts == 50 {
                        return Err(format!("{} published no key: {error}", service.org()));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Ok(Net {
                consortium,
                nodes,
                services,
            })
        }

        /// Enrolls `count` clinicians of the `index`th organisation, signed by its admin.
        async fn clinicians(
            &self,
            index: usize,
            count: usize,
        ) -> Result<Vec<Arc<Identity>>, String> {
            let founding = &self.consortium.orgs[index];
            let ledger = &self.nodes[index].ledger;
            let users = enroll_users(ledger, founding, "dr", Role::Clinician, count).await?;
            Ok(users.into_iter().map(Arc::new).collect())
        }

        /// `count` registered patients with published encryption keys who let the custodian
        /// write and read their diagnostics and the other hospital read them.
        async fn patients(&self, count: usize) -> Result<Vec<String>, String> {
            let custodian = self.services[CUSTODIAN].org().to_string();
            let remote = self.services[REMOTE].org().to_string();
            let tasks: Vec<_> = (0..count)
                .map(|n| {
                    let ledger = self.nodes[n % self.nodes.len()].ledger.clone();
                    let (custodian, remote) = (custodian.clone(), remote.clone());
                    tokio::spawn(async move {
                        let patient = Identity::new_patient().map_err(|e| e.to_string())?;
                        let public_key = patient.key.public_key();
                        let key = patient
                            .encryption_key()
                            .ok_or("a patient's encryption key")?
                            .public_key()
                            .to_base64url();
                        let bodies = [
                            TxBody::RegisterPatient { public_key },
                            TxBody::SetEncryptionKey { public_key: key },
                            consent(&custodian, vec![Action::Read, Action::Write]),
                            consent(&remote, vec![Action::Read]),
                        ];
                        for (nonce, body) in (1..).zip(bodies) {
                            commit(&ledger, &patient, nonce, body).await?;
                        }
                        Ok::<_, String>(patient.id)
                    })
                })
                .collect();
            let mut patients = Vec::with_capacity(count);
            for task in tasks {
                patients.push(task.await.map_err(|e| e.to_string())??);
            }
            Ok(patients)
        }

        /// Waits until every node has applied what the custodian's node has.
        async fn settle(&self) -> Result<(), String> {
            let height = |node: &ClusterNode| -> Result<u64, String> {
                Ok(node
                    .ledger
                    .store()
                    .head()
                    .map_err(|e| e.to_string())?
                    .map(|head| head.height)
                    .unwrap_or(0))
            };
            let target = height(&self.nodes[CUSTODIAN])?;
            let started = Instant::now();
            loop {
                let mut behind = false;
                for node in &self.nodes {
                    behind |= height(node)? < target;
                }
                if !behind {
                    return Ok(());
                }
                if started.elapsed() > Duration::from_secs(30) {
                    return Err(format!("not every node applied block {target} in 30 s"));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        async fn shutdown(self) {
            for node in &self.nodes {
                node.shutdown().await;
            }
        }
    }

    /// Waits for a leader and hands the lead to node `at`.
    async fn lead_at(nodes: &[ClusterNode], at: usize) -> Result<(), String> {
        let wanted = nodes[at].info.node.clone();
        let started = Instant::now();
        loop {
            let (led, leaders) = super::lead_of(nodes, &wanted);
            if led {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("{wanted} did not take the lead: {leaders:?}"));
            }
            if leaders.iter().all(Option::is_some) {
                // A refused or unfinished hand-over is simply tried again.
                let _ = nodes[at].transfer_leader(nodes[at].id).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One phase: successful operations, wall time, their latencies (sorted), failures.
    pub(crate) struct Phase<T> {
        pub(crate) ok: Vec<(usize, T)>,
        pub(crate) seconds: f64,
        pub(crate) latencies: Vec<Duration>,
        pub(crate) failures: usize,
        pub(crate) first_error: Option<String>,
    }

    impl<T> Phase<T> {
        /// Sorts `(item, latency, result)` triples into a phase of `seconds` of wall time.
        pub(crate) fn from_results(
            seconds: f64,
            results: Vec<(usize, Duration, Result<T, String>)>,
        ) -> Phase<T> {
            let mut phase = Phase {
                ok: Vec::with_capacity(results.len()),
                seconds,
                latencies: Vec::with_capacity(results.len()),
                failures: 0,
                first_error: None,
            };
            for (item, took, result) in results {
                match result {
                    Ok(value) => {
                        phase.ok.push((item, value));
                        phase.latencies.push(took);
                    }
                    Err(error) => {
                        phase.failures += 1;
                        phase.first_error.get_or_insert(error);
                    }
                }
            }
            phase.ok.sort_by_key(|(item, _)| *item);
            phase.latencies.sort();
            phase
        }

        fn rate(&self) -> f64 {
            self.ok.len() as f64 / self.seconds
        }

        fn summary(&self) -> String {
            let failed = match (&self.first_error, self.failures) {
                (Some(error), n) => format!("; {n} failed, first: {error}"),
                (None, _) => String::new(),
            };
            format!(
                "latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms{failed}",
                percentile(&self.latencies, 0.50),
                percentile(&self.latencies, 0.99),
                max_ms(&self.latencies),
            )
        }
    }

    /// `clients` tasks at once; client `c` does items `c`, `c + clients`, ... below `total`
    /// in order, one at a time, each timed from start to finish.
    async fn run_clients<T, F, Fut>(clients: usize, total: usize, op: F) -> Phase<T>
    where
        T: Send + 'static,
        F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, String>> + Send + 'static,
    {
        let op = Arc::new(op);
        let start = Instant::now();
        let tasks: Vec<_> = (0..clients.min(total))
            .map(|client| {
                let op = op.clone();
                tokio::spawn(async move {
                    let mut done = Vec::new();
                    for item in (client..total).step_by(clients) {
                        let begun = Instant::now();
                        let result = op(client, item).await;
                        done.push((item, begun.elapsed(), result));
                    }
                    done
                })
            })
            .collect();
        let mut all = Vec::with_capacity(total);
        for task in tasks {
            match task.await {
                Ok(done) => all.extend(done),
                Err(error) => all.push((usize::MAX, Duration::ZERO, Err(error.to_string()))),
            }
        }
        Phase::from_results(start.elapsed().as_secs_f64(), all)
    }

    /// Every record read once by `readers` at `service`'s node, concurrently.
    async fn read_all(
        service: &Arc<RecordService>,
        custodian: &str,
        readers: &[Arc<Identity>],
        record_ids: &Arc<Vec<String>>,
    ) -> Phase<()> {
        let service = service.clone();
        let custodian = custodian.to_string();
        let readers = readers.to_vec();
        let record_ids = record_ids.clone();
        run_clients(readers.len(), record_ids.len(), move |client, item| {
            let service = service.clone();
            let request = ReadRequest {
                actor: readers[client].id.clone(),
                custodian: custodian.clone(),
                record_id: record_ids[item].clone(),
                version: None,
                purpose: Purpose::Treatment,
                attachments: false,
            };
            async move {
                let wanted = request.record_id.clone();
                let opened = service.read(request).await.map_err(|e| e.to_string())?;
                if opened.record_id == wanted && opened.resource["resourceType"] == "Observation" {
                    Ok(())
                } else {
                    Err(format!("read {wanted}, opened {}", opened.record_id))
                }
            }
        })
        .await
    }

    struct Figures {
        leader: String,
        resource_bytes: usize,
        setup_seconds: f64,
        /// Per created record: how long its `prepare` took.
        creates: Phase<Duration>,
        local: Phase<()>,
        remote: Phase<()>,
    }

    async fn measure(dir: &Path, records: usize, clients: usize) -> Result<Figures, String> {
        let net = Net::start(dir).await?;
        let figures = exercise(&net, records, clients).await;
        net.shutdown().await;
        figures
    }

    async fn exercise(net: &Net, records: usize, clients: usize) -> Result<Figures, String> {
        let began = Instant::now();
        let (authors, remote_readers) = tokio::join!(
            net.clinicians(CUSTODIAN, clients),
            net.clinicians(REMOTE, clients)
        );
        let (authors, remote_readers) = (authors?, remote_readers?);
        let patients = Arc::new(net.patients(clients).await?);
        net.settle().await?;
        let setup_seconds = began.elapsed().as_secs_f64();
        let resource_bytes = serde_json::to_vec(&observation(&patients[0], 0))
            .map_err(|e| e.to_string())?
            .len();

        // Creates: each author signs its own creates in order (nonce 1, 2, ...).
        let creates = {
            let service = net.services[CUSTODIAN].clone();
            let ledger = net.nodes[CUSTODIAN].ledger.clone();
            let authors = authors.clone();
            let patients = patients.clone();
            run_clients(clients, records, move |client, item| {
                let (service, ledger) = (service.clone(), ledger.clone());
                let author = authors[client].clone();
                let resource = observation(&patients[item % patients.len()], item);
                let nonce = (item / clients) as u64 + 1;
                async move {
                    let begun = Instant::now();
                    let prepared = service
                        .prepare(PrepareRequest {
                            resource,
                            record_id: None,
                            attachments: Vec::new(),
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                    let prepare_took = begun.elapsed();
                    commit(&ledger, &author, nonce, prepared.body).await?;
                    Ok((prepared.record_id, prepare_took))
                }
            })
            .await
        };
        let record_ids: Arc<Vec<String>> =
            Arc::new(creates.ok.iter().map(|(_, (id, _))| id.clone()).collect());
        let creates = Phase {
            ok: creates
                .ok
                .into_iter()
                .map(|(item, (_, took))| (item, took))
                .collect(),
            seconds: creates.seconds,
            latencies: creates.latencies,
            failures: creates.failures,
            first_error: creates.first_error,
        };
        net.settle().await?;

        let custodian = net.services[CUSTODIAN].org().to_string();
        let local = read_all(&net.services[CUSTODIAN], &custodian, &authors, &record_ids).await;
        net.settle().await?;
        let remote = read_all(
            &net.services[REMOTE],
            &custodian,
            &remote_readers,
            &record_ids,
        )
        .await;
        Ok(Figures {
            leader: net.services[LEADER].org().to_string(),
            resource_bytes,
            setup_seconds,
            creates,
            local,
            remote,
        })
    }

    pub fn run(records: usize, clients: usize) -> Result<(), String> {
        let (records, clients) = (records.max(1), clients.max(1));
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        println!("medledger bench records on {cores} core(s)");
        let aes = aes_gcm_mb_per_s();
        let sha = sha256_mb_per_s();
        let verify_one = verify_rate(1, 4_000);
        println!(
            "ceiling (one core, {} MiB buffers): AES-256-GCM {aes:.0} MB/s, SHA-256 {sha:.0} MB/s; ECDSA P-256 verify {verify_one:.0}/s",
            BUFFER_BYTES >> 20
        );

        let dir =
            std::env::temp_dir().join(format!("medledger-bench-records-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let scratch = ScratchDir(dir.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let figures = runtime.block_on(measure(&dir, records, clients));
        drop(runtime);
        drop(scratch);
        let figures = figures?;

        println!(
            "consortium: hospital-a, hospital-b and lab-x in this process, Raft over mutual TLS on loopback, embedded record stores; {} leads, so every create and access entry is forwarded to it",
            figures.leader
        );
        println!(
            "setup: {clients} clinicians at hospital-a, {clients} at hospital-b, {clients} patients with keys and consents in {:.1} s; each record an Observation of {} bytes of JSON (synthetic)",
            figures.setup_seconds, figures.resource_bytes
        );
        let mut prepare: Vec<Duration> = figures.creates.ok.iter().map(|(_, d)| *d).collect();
        prepare.sort();
        let creates = &figures.creates;
        println!(
            "create (seal + store at hospital-a, author-signed create_record committed): {} records from {clients} authors in {:.2} s = {:.0}/s; {} (of it prepare p50 {:.2} ms, p99 {:.2} ms)",
            creates.ok.len(),
            creates.seconds,
            creates.rate(),
            creates.summary(),
            percentile(&prepare, 0.50),
            percentile(&prepare, 0.99),
        );
        let local = &figures.local;
        println!(
            "local read (hospital-a's clinicians at hospital-a: access entry committed, then verified and decrypted): {} reads by {clients} readers in {:.2} s = {:.0}/s; {}",
            local.ok.len(),
            local.seconds,
            local.rate(),
            local.summary()
        );
        let remote = &figures.remote;
        println!(
            "remote read (hospital-b's clinicians through hospital-b's node, served by hospital-a): {} reads by {clients} readers in {:.2} s = {:.0}/s; {}",
            remote.ok.len(),
            remote.seconds,
            remote.rate(),
            remote.summary()
        );
        let peak = peak_memory_mib();
        println!("peak memory {peak:.0} MiB (all nodes, this process)");
        let ms = |phase_latencies: &[Duration], p: f64| {
            (percentile(phase_latencies, p) * 1000.0).round() / 1000.0
        };
        println!(
            "{}",
            serde_json::json!({
                "target": "records",
                "nodes": 3,
                "leader": figures.leader,
                "records": records,
                "clients": clients,
                "resource_bytes": figures.resource_bytes,
                "creates_per_s": creates.rate().round(),
                "create_ms_p50": ms(&creates.latencies, 0.50),
                "create_ms_p99": ms(&creates.latencies, 0.99),
                "prepare_ms_p50": ms(&prepare, 0.50),
                "local_reads_per_s": local.rate().round(),
                "local_read_ms_p50": ms(&local.latencies, 0.50),
                "local_read_ms_p99": ms(&local.latencies, 0.99),
                "remote_reads_per_s": remote.rate().round(),
                "remote_read_ms_p50": ms(&remote.latencies, 0.50),
                "remote_read_ms_p99": ms(&remote.latencies, 0.99),
                "failures": creates.failures + local.failures + remote.failures,
                "aes_gcm_mb_per_s": aes.round(),
                "sha256_mb_per_s": sha.round(),
                "verify_per_s_one_core": verify_one.round(),
                "peak_memory_mib": peak.round(),
                "cores": cores,
            })
        );
        Ok(())
    }
}

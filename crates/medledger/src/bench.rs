//! `medledger bench ledger` and `medledger bench solo`: what this machine can do, measured
//! in one run.
//!
//! First the ceiling: ECDSA P-256 verifications per second, on one core and on all. Then
//! the ledger: `ledger` starts a three-node consortium in this process (separate stores,
//! Raft over mutual TLS on loopback; clients spread over the nodes, followers forward to
//! the leader, every node verifies and executes every transaction); `solo` runs one node
//! that orders alone. Each prints committed transactions per second under many concurrent
//! clients, commit latency at a single client and at half of that peak rate, and how many
//! transactions share a block and an fsync. The last line is one JSON object with the
//! figures.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use medledger_core::identity::OrgKind;
use medledger_core::model::{Action, Category, Grantee, Purpose, Scope};
use medledger_core::tx::{SignedTx, TxBody};
use medledger_node::consortium::{Consortium, Identity};
use medledger_node::ledger::{now_ms, Ledger, NodeIdentity, OrderingConfig};
use medledger_node::pki::KeyPair;

use crate::commands::{init_node, validity_days};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchTarget {
    /// A three-node Raft consortium over mutual TLS on loopback.
    Ledger,
    /// One node ordering alone.
    Solo,
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
}

const CHAIN_ID: &str = "medledger-bench";

fn grant(patient: &Identity, nonce: u64) -> SignedTx {
    patient.sign(
        CHAIN_ID,
        nonce,
        now_ms() + 10 * 60 * 1000,
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
        },
    )
}

/// Verifications per second of `threads` threads verifying `count` signatures each.
fn verify_rate(threads: usize, count: usize) -> f64 {
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

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

/// Peak resident memory of this process, from /proc (Linux).
fn peak_memory_mib() -> f64 {
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

struct Phase {
    committed: usize,
    seconds: f64,
    latencies: Vec<Duration>,
}

/// Submits each client's transactions in order, all clients at once.
fn drive(
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
                let _ = idle.send((patient, nonce + 1));
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

fn max_ms(latencies: &[Duration]) -> f64 {
    latencies
        .last()
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

pub fn run(args: BenchArgs) -> Result<(), String> {
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
    let pool_size = clients;
    let patients: Vec<Identity> = (0..clients + 1 + pool_size)
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
    let pool: Vec<Identity> = patients.split_off(clients + 1);

    let load: Vec<Vec<SignedTx>> = patients[..clients]
        .iter()
        .map(|p| (0..per_client as u64).map(|n| grant(p, n + 2)).collect())
        .collect();
    let fsyncs_before = leader.stats().fsyncs.load(Ordering::Relaxed);
    let blocks_before = leader.stats().blocks.load(Ordering::Relaxed);
    let throughput = drive(&runtime, &ledgers, load);
    let fsyncs = leader.stats().fsyncs.load(Ordering::Relaxed) - fsyncs_before;
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

    let single = &patients[clients];
    let sequential = vec![(0..args.latency_txs as u64)
        .map(|n| grant(single, n + 2))
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
            "target": match args.target { BenchTarget::Ledger => "ledger", BenchTarget::Solo => "solo" },
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
        })
    );
    Ok(())
}

//! `medledger bench`: what this machine can do, measured in one run.
//!
//! First the ceiling: ECDSA P-256 verifications per second, on one core and on all. Then
//! the ledger on one node, in process (admission with signature check, ordering, execution
//! through the core, fsynced commit): committed transactions per second under many
//! concurrent clients, commit latency at a single client, and how many transactions share
//! a block and an fsync. The last line is one JSON object with the figures.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use medledger_core::identity::OrgKind;
use medledger_core::model::{Action, Category, Grantee, Purpose, Scope};
use medledger_core::tx::{SignedTx, TxBody};
use medledger_node::consortium::{Consortium, Identity};
use medledger_node::ledger::{now_ms, Ledger, LedgerStats, NodeIdentity, OrderingConfig};
use medledger_node::pki::KeyPair;

use crate::commands::{init_node, validity_days};

#[derive(Args)]
pub struct BenchArgs {
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
    blocks: u64,
}

/// Submits each client's transactions in order, all clients at once.
fn drive(
    runtime: &tokio::runtime::Runtime,
    ledger: &Arc<Ledger>,
    per_client: Vec<Vec<SignedTx>>,
) -> Phase {
    let stats: &LedgerStats = ledger.stats();
    let blocks_before = stats.blocks.load(Ordering::Relaxed);
    let start = Instant::now();
    let results: Vec<(usize, Vec<Duration>)> = runtime.block_on(async {
        let tasks: Vec<_> = per_client
            .into_iter()
            .map(|txs| {
                let ledger = ledger.clone();
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
        blocks: stats.blocks.load(Ordering::Relaxed) - blocks_before,
    }
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
    let consortium = Consortium::create(
        CHAIN_ID,
        &[("hospital-a", OrgKind::Hospital)],
        now_ms(),
        validity_days(2),
    )
    .map_err(|e| e.to_string())?;
    let node = &consortium.orgs[0].node;
    init_node(&dir, &consortium.genesis, node)?;
    let identity = NodeIdentity::from_member(node).map_err(|e| e.to_string())?;
    let ledger = Arc::new(
        Ledger::open_solo(&dir, identity, OrderingConfig::default()).map_err(|e| e.to_string())?,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;

    let clients = args.clients.max(1);
    let per_client = args.txs.div_ceil(clients);
    let patients: Vec<Identity> = (0..clients + 1)
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
    let setup = drive(&runtime, &ledger, registrations);
    if setup.committed != patients.len() {
        return Err(format!(
            "only {} of {} patients registered",
            setup.committed,
            patients.len()
        ));
    }

    let load: Vec<Vec<SignedTx>> = patients[..clients]
        .iter()
        .map(|p| (0..per_client as u64).map(|n| grant(p, n + 2)).collect())
        .collect();
    let fsyncs_before = ledger.stats().fsyncs.load(Ordering::Relaxed);
    let throughput = drive(&runtime, &ledger, load);
    let fsyncs = ledger.stats().fsyncs.load(Ordering::Relaxed) - fsyncs_before;
    let tx_per_s = throughput.committed as f64 / throughput.seconds;
    println!(
        "throughput: {} txs from {clients} clients committed in {:.2} s = {tx_per_s:.0} tx/s; p50 {:.2} ms, p99 {:.2} ms; {:.1} tx/block, {:.1} tx/fsync",
        throughput.committed,
        throughput.seconds,
        percentile(&throughput.latencies, 0.50),
        percentile(&throughput.latencies, 0.99),
        throughput.committed as f64 / throughput.blocks.max(1) as f64,
        throughput.committed as f64 / fsyncs.max(1) as f64,
    );

    let single = &patients[clients];
    let sequential = vec![(0..args.latency_txs as u64)
        .map(|n| grant(single, n + 2))
        .collect()];
    let latency = drive(&runtime, &ledger, sequential);
    let (p50, p99) = (
        percentile(&latency.latencies, 0.50),
        percentile(&latency.latencies, 0.99),
    );
    let max = latency
        .latencies
        .last()
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0);
    println!(
        "single client: {} sequential txs, commit latency p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
        latency.committed
    );
    let peak = peak_memory_mib();
    println!(
        "ledger rate is {:.0} % of the all-core verify ceiling; peak memory {peak:.0} MiB",
        100.0 * tx_per_s / verify_all
    );
    drop(ledger);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        serde_json::json!({
            "verify_per_s_one_core": verify_one.round(),
            "verify_per_s_all_cores": verify_all.round(),
            "verify_ceiling_tx_per_s": verify_all.round(),
            "tx_per_s": tx_per_s.round(),
            "throughput_latency_ms_p50": percentile(&throughput.latencies, 0.50),
            "throughput_latency_ms_p99": percentile(&throughput.latencies, 0.99),
            "latency_ms_p50": p50,
            "latency_ms_p99": p99,
            "latency_ms_max": max,
            "tx_per_block": throughput.committed as f64 / throughput.blocks.max(1) as f64,
            "tx_per_fsync": throughput.committed as f64 / fsyncs.max(1) as f64,
            "peak_memory_mib": peak.round(),
            "cores": cores,
        })
    );
    Ok(())
}

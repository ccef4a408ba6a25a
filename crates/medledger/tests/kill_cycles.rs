//! A three-node consortium whose nodes (the leader included) are SIGKILLed and restarted one
//! at a time, over and over, under a steady write load, loses no acknowledged transaction:
//! afterwards every node holds every acknowledged transaction, all nodes hold the same block
//! at every height, and every store re-executes cleanly from genesis.
//!
//! The default run is `MEDLEDGER_KILL_CYCLES` = 20 cycles (CI runs it in a debug build). A long
//! run, on demand:
//!
//! ```text
//! MEDLEDGER_KILL_CYCLES=1000 cargo test --release -p medledger --test kill_cycles -- --nocapture
//! ```
//!
//! `MEDLEDGER_KILL_SEED` repeats a run's choices of victims and pauses (the timing of the
//! processes is not repeatable, so neither is the run itself). On failure the test keeps its
//! directory (node stores and logs) and prints its path and the tail of every node's log;
//! `MEDLEDGER_KILL_KEEP=1` keeps it after a success too. `MEDLEDGER_KILL_SNAPSHOT_EVERY=N`
//! makes the nodes snapshot (and purge their Raft logs) every N entries (default 20, far
//! below a node's default of 2000, so that restarted nodes also catch up by installing
//! snapshots and some kills land in the middle of an install).

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use medledger_core::tx::TxBody;
use medledger_node::consortium::Identity;
use medledger_node::ledger::now_ms;
use serde_json::Value;

const ORGS: [&str; 3] = ["hospital-a", "hospital-b", "lab-x"];
const CHAIN_ID: &str = "kill-cycles";
const WRITERS: usize = 3;
/// Raft entries between snapshots in the test's nodes.
const SNAPSHOT_EVERY: u64 = 20;
/// How long a restarted node may take to serve and see a leader, and the nodes to agree.
const RECOVERY: Duration = Duration::from_secs(60);

fn medledger(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medledger"))
        .args(args)
        .output()
        .expect("the medledger binary runs")
}

/// xorshift64*: enough randomness for choosing victims, pauses and nodes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A base port P such that P+i (API) and P+100+i (peers) are free for the three nodes.
fn free_base_port() -> u16 {
    let mut rng = Rng::new(std::process::id() as u64 * 0x9e37_79b9 + now_ms());
    for _ in 0..500 {
        let base = 20_000 + rng.below(40_000) as u16;
        let free = (0..ORGS.len() as u16).all(|i| {
            std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", base + 100 + i)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free ports on loopback");
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into()
}

/// GET `url`: the status and the JSON body (Null when the body is not JSON), or the transport
/// error.
fn get(agent: &ureq::Agent, url: &str) -> Result<(u16, Value), String> {
    let response = agent.get(url).call().map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

/// One member node: its files and, while it runs, its process.
struct Node {
    org: &'static str,
    dir: PathBuf,
    config: PathBuf,
    url: String,
    log: PathBuf,
    child: Option<Child>,
    starts: usize,
}

impl Node {
    fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.org);
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("the node log opens");
        writeln!(log, "==== start {} at {} ms ====", self.starts, now_ms()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_medledger"))
            .args(["node", "run", "--config", self.config.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the node starts");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
            if let Ok(mut log) = OpenOptions::new().append(true).open(&self.log) {
                let _ = writeln!(log, "==== SIGKILL at {} ms ====", now_ms());
            }
        }
    }

    /// SIGINT, then SIGKILL if the node has not exited within `within`. Whether it exited by
    /// itself, and how.
    fn interrupt(&mut self, within: Duration) -> Result<String, String> {
        let Some(mut child) = self.child.take() else {
            return Err("not running".into());
        };
        let sent = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Ok(status.to_string());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "did not exit within {within:?} of SIGINT ({sent:?}); SIGKILLed"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the node said that matters (panics, fatal stops, its own complaints), then the last
    /// `lines` lines of its log (a panic's backtrace would otherwise hide its message).
    fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let notable: Vec<&str> = all
            .iter()
            .copied()
            .filter(|line| {
                line.contains("panicked")
                    || line.contains("FATAL")
                    || line.contains("invalid state")
                    || line.starts_with("medledger:")
            })
            .collect();
        format!(
            "notable lines:\n{}\nlast lines:\n{}",
            notable[notable.len().saturating_sub(20)..].join("\n"),
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }

    /// Panics if the node's process has ended (it should run until the test stops it).
    fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} (start {}) exited by itself: {status}",
                    self.org, self.starts
                );
            }
        }
    }
}

/// The consortium's directory and nodes. Dropping it kills every node; after a panic it also
/// prints the tail of every node's log and keeps the directory for inspection.
struct Cluster {
    dir: Option<tempfile::TempDir>,
    nodes: Vec<Node>,
}

impl Cluster {
    fn create() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut last_error = String::new();
        for _ in 0..5 {
            let base = free_base_port();
            let made = medledger(&[
                "consortium",
                "local",
                "--dir",
                dir.path().to_str().unwrap(),
                "--nodes",
                "3",
                "--base-port",
                &base.to_string(),
                "--chain-id",
                CHAIN_ID,
            ]);
            if made.status.success() {
                {
                    // Snapshots (and log purges) every few entries: a node that was down a
                    // while catches up by installing one, and kills land mid-install too.
                    let every: u64 = std::env::var("MEDLEDGER_KILL_SNAPSHOT_EVERY")
                        .map(|every| every.parse().expect("MEDLEDGER_KILL_SNAPSHOT_EVERY"))
                        .unwrap_or(SNAPSHOT_EVERY);
                    for org in ORGS {
                        let path = dir.path().join("nodes").join(org).join("node.toml");
                        let toml = std::fs::read_to_string(&path).unwrap();
                        let tuned: Vec<String> = toml
                            .lines()
                            .map(|line| {
                                if line.starts_with("snapshot_every_entries") {
                                    format!("snapshot_every_entries = {every}")
                                } else {
                                    line.to_string()
                                }
                            })
                            .collect();
                        std::fs::write(&path, tuned.join("\n") + "\n").unwrap();
                    }
                }
                let nodes = ORGS
                    .iter()
                    .enumerate()
                    .map(|(i, org)| {
                        let node_dir = dir.path().join("nodes").join(org);
                        Node {
                            org,
                            config: node_dir.join("node.toml"),
                            dir: node_dir,
                            url: format!("http://127.0.0.1:{}", base as usize + i),
                            log: dir.path().join(format!("{org}.log")),
                            child: None,
                            starts: 0,
                        }
                    })
                    .collect();
                return Cluster {
                    dir: Some(dir),
                    nodes,
                };
            }
            last_error = String::from_utf8_lossy(&made.stderr).into_owned();
            // Start over in a clean directory.
            let _ = std::fs::remove_dir_all(dir.path().join("keys"));
            let _ = std::fs::remove_dir_all(dir.path().join("nodes"));
        }
        panic!("`medledger consortium local` failed: {last_error}");
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().expect("the directory").path()
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("---- {} ({}) ----\n{}\n", node.org, node.url, node.tail(15)))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!("{}", self.logs());
        }
        if panicking || std::env::var_os("MEDLEDGER_KILL_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!(
                    "the consortium's files are kept in {}",
                    dir.keep().display()
                );
            }
        }
    }
}

/// The consensus leader's node index as `url` sees it.
fn leader_seen_by(agent: &ureq::Agent, url: &str) -> Option<usize> {
    let (status, body) = get(agent, &format!("{url}/v1/status")).ok()?;
    if status != 200 {
        return None;
    }
    let leader = body["consensus"]["leader"].as_str()?;
    ORGS.iter().position(|org| leader == format!("node@{org}"))
}

/// The height the node at `url` has applied.
fn height_of(agent: &ureq::Agent, url: &str) -> Option<u64> {
    match get(agent, &format!("{url}/v1/status")) {
        Ok((200, status)) => status["height"].as_u64(),
        _ => None,
    }
}

/// Waits until the node serves (`/v1/health` 200), knows a leader and has applied at least
/// `height` (what the others had applied when it restarted: it has rejoined, not merely come
/// up with the leader its store remembers); how long that took.
fn wait_recovered(cluster: &mut Cluster, index: usize, height: u64) -> Duration {
    let agent = agent(Duration::from_secs(2));
    let url = cluster.nodes[index].url.clone();
    let url = &url;
    let started = Instant::now();
    loop {
        let healthy = matches!(get(&agent, &format!("{url}/v1/health")), Ok((200, _)));
        if healthy
            && leader_seen_by(&agent, url).is_some()
            && height_of(&agent, url).is_some_and(|h| h >= height)
        {
            return started.elapsed();
        }
        cluster.nodes[index].assert_running();
        assert!(
            started.elapsed() < RECOVERY,
            "{} did not recover (up to height {height}) within {RECOVERY:?} of its start \
             (health {:?}, status {:?})",
            cluster.nodes[index].org,
            get(&agent, &format!("{url}/v1/health")),
            get(&agent, &format!("{url}/v1/status")),
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// What one writer saw.
#[derive(Default)]
struct Tally {
    /// Answered 200 with a committed outcome.
    acknowledged: Vec<String>,
    /// Answered `outcome_unknown`: maybe committed, maybe not.
    unknown: Vec<String>,
    /// Answered 200 with a rejection (a fresh patient's registration should never be).
    rejected: Vec<(String, Value)>,
    /// Answered with another error (overloaded, stopped, a timeout of the request, ...).
    refused: u64,
    /// The connection failed (a node down or killed during the request).
    connection_errors: u64,
}

fn writer(
    urls: Vec<String>,
    alive: Arc<Vec<AtomicBool>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> Tally {
    let mut rng = Rng::new(seed);
    let agent = agent(Duration::from_secs(40));
    let mut tally = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        let live: Vec<usize> = (0..urls.len())
            .filter(|&i| alive[i].load(Ordering::Relaxed))
            .collect();
        if live.is_empty() {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let url = &urls[live[rng.below(live.len() as u64) as usize]];
        let patient = Identity::new_patient().unwrap();
        let tx = patient.sign(
            CHAIN_ID,
            1,
            now_ms() + 300_000,
            TxBody::RegisterPatient {
                public_key: patient.key.public_key(),
            },
        );
        let tx_id = tx.id().unwrap().to_hex();
        let response = match agent.post(&format!("{url}/v1/transactions")).send_json(&tx) {
            Ok(response) => response,
            Err(_) => {
                tally.connection_errors += 1;
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let status = response.status().as_u16();
        let body: Value = match response.into_body().read_to_string() {
            Ok(text) => serde_json::from_str(&text).unwrap_or(Value::Null),
            Err(_) => {
                // The node died while answering: as good as no answer.
                tally.connection_errors += 1;
                continue;
            }
        };
        if status == 200 {
            assert_eq!(body["tx_id"], tx_id.as_str(), "{body}");
            if body["outcome"]["outcome"] == "committed" {
                tally.acknowledged.push(tx_id);
            } else {
                tally.rejected.push((tx_id, body["outcome"].clone()));
            }
        } else if body["error"]["code"] == "outcome_unknown" {
            tally.unknown.push(tx_id);
        } else {
            tally.refused += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    tally
}

/// Waits until the three nodes report the same height and block hash; returns the height.
fn wait_for_agreement(cluster: &mut Cluster) -> u64 {
    let agent = agent(Duration::from_secs(5));
    let started = Instant::now();
    loop {
        let heads: Vec<Option<(u64, String)>> = cluster
            .nodes
            .iter()
            .map(
                |node| match get(&agent, &format!("{}/v1/status", node.url)) {
                    Ok((200, status)) => Some((
                        status["height"].as_u64()?,
                        status["block_hash"].as_str()?.to_string(),
                    )),
                    _ => None,
                },
            )
            .collect();
        if heads.iter().all(|head| head.is_some()) && heads.windows(2).all(|p| p[0] == p[1]) {
            return heads[0].as_ref().unwrap().0;
        }
        for node in &mut cluster.nodes {
            node.assert_running();
        }
        assert!(
            started.elapsed() < RECOVERY,
            "the nodes do not agree after {RECOVERY:?}: {heads:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The ids (of `ids`) that the node at `url` does not hold, and the ids it holds, each checked
/// with `GET /v1/transactions/{id}`.
fn look_up(url: &str, ids: &[String]) -> (Vec<String>, Vec<String>) {
    let agent = agent(Duration::from_secs(10));
    let (mut missing, mut found) = (Vec::new(), Vec::new());
    for id in ids {
        match get(&agent, &format!("{url}/v1/transactions/{id}")) {
            Ok((200, tx)) => {
                assert_eq!(tx["tx_id"], id.as_str(), "{tx}");
                found.push(id.clone());
            }
            Ok((404, _)) => missing.push(id.clone()),
            other => panic!("looking up {id} on {url}: {other:?}"),
        }
    }
    (missing, found)
}

fn cycles() -> usize {
    match std::env::var("MEDLEDGER_KILL_CYCLES") {
        Ok(text) => text
            .parse()
            .expect("MEDLEDGER_KILL_CYCLES is a number of cycles"),
        Err(_) => 20,
    }
}

#[test]
fn killing_nodes_in_turn_under_load_loses_no_acknowledged_transaction() {
    // Proves that SIGKILLing any node of three (every third cycle the leader), again and
    // again while clients write, loses no acknowledged transaction, never makes two nodes
    // hold different blocks, always lets the killed node rejoin, and leaves stores that verify.
    let cycles = cycles();
    let seed = match std::env::var("MEDLEDGER_KILL_SEED") {
        Ok(text) => text.parse().expect("MEDLEDGER_KILL_SEED is a number"),
        Err(_) => now_ms() ^ ((std::process::id() as u64) << 32),
    };
    println!("kill cycles: {cycles}, seed {seed} (MEDLEDGER_KILL_SEED)");
    let mut rng = Rng::new(seed);

    let mut cluster = Cluster::create();
    println!("consortium in {}", cluster.path().display());
    for node in &mut cluster.nodes {
        node.start();
    }
    for index in 0..cluster.nodes.len() {
        wait_recovered(&mut cluster, index, 0);
    }

    // The load.
    let urls: Vec<String> = cluster.nodes.iter().map(|node| node.url.clone()).collect();
    let alive: Arc<Vec<AtomicBool>> =
        Arc::new(urls.iter().map(|_| AtomicBool::new(true)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let writers: Vec<JoinHandle<Tally>> = (0..WRITERS)
        .map(|w| {
            let (urls, alive, stop) = (urls.clone(), alive.clone(), stop.clone());
            let seed = rng.next() ^ w as u64;
            std::thread::spawn(move || writer(urls, alive, stop, seed))
        })
        .collect();

    // The faults.
    let status_agent = agent(Duration::from_secs(2));
    let mut leader_kills = 0;
    let mut elections = 0;
    let mut longest_recovery = Duration::ZERO;
    for cycle in 0..cycles {
        for node in &mut cluster.nodes {
            node.assert_running();
        }
        // Who leads now, as the nodes see it (a moment without a leader is possible).
        let mut leader = None;
        let asked = Instant::now();
        while leader.is_none() {
            leader = urls
                .iter()
                .find_map(|url| leader_seen_by(&status_agent, url));
            assert!(
                leader.is_some() || asked.elapsed() < RECOVERY,
                "no node has known a leader for {RECOVERY:?}"
            );
            if leader.is_none() {
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        let victim = match leader {
            Some(leader) if cycle % 3 == 0 => leader,
            _ => rng.below(ORGS.len() as u64) as usize,
        };
        if leader == Some(victim) {
            leader_kills += 1;
        }
        alive[victim].store(false, Ordering::Relaxed);
        cluster.nodes[victim].kill();
        // A leader back within the election timeout simply leads on (openraft restarts a
        // node whose committed vote is its own as the leader): every other deliberate leader
        // kill waits until the survivors have elected another leader, so that the old one
        // rejoins a newer term and loses whatever it had appended and not replicated.
        let mut elected = None;
        if leader == Some(victim) && cycle % 6 == 3 {
            let asked = Instant::now();
            while elected.is_none() {
                elected = (0..ORGS.len())
                    .filter(|&i| i != victim)
                    .find_map(|i| leader_seen_by(&status_agent, &urls[i]))
                    .filter(|&new| new != victim);
                assert!(
                    elected.is_some() || asked.elapsed() < RECOVERY,
                    "the two surviving nodes elected no leader within {RECOVERY:?}"
                );
                std::thread::sleep(Duration::from_millis(25));
            }
            elections += 1;
        }
        std::thread::sleep(Duration::from_millis(100 + rng.below(501)));
        let reached = (0..ORGS.len())
            .filter(|&i| i != victim)
            .filter_map(|i| height_of(&status_agent, &urls[i]))
            .max()
            .unwrap_or(0);
        cluster.nodes[victim].start();
        let took = wait_recovered(&mut cluster, victim, reached);
        longest_recovery = longest_recovery.max(took);
        alive[victim].store(true, Ordering::Relaxed);
        if cycles <= 100 || (cycle + 1) % 50 == 0 {
            println!(
                "cycle {}/{cycles}: killed {}{}{}, back in {took:?}",
                cycle + 1,
                ORGS[victim],
                if leader == Some(victim) {
                    " (the leader)"
                } else {
                    ""
                },
                match elected {
                    Some(new) => format!(", {} elected meanwhile", ORGS[new]),
                    None => String::new(),
                },
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::default();
    for writer in writers {
        let one = writer.join().expect("a writer panicked");
        tally.acknowledged.extend(one.acknowledged);
        tally.unknown.extend(one.unknown);
        tally.rejected.extend(one.rejected);
        tally.refused += one.refused;
        tally.connection_errors += one.connection_errors;
    }
    let under_faults = started.elapsed();

    // Every node ends with the same chain...
    let height = wait_for_agreement(&mut cluster);
    // ... that holds every acknowledged transaction, on every node.
    let acknowledged = Arc::new(tally.acknowledged.clone());
    let lookups: Vec<_> = urls
        .iter()
        .map(|url| {
            let (url, ids) = (url.clone(), acknowledged.clone());
            std::thread::spawn(move || look_up(&url, &ids))
        })
        .collect();
    for (node, lookup) in cluster.nodes.iter().zip(lookups) {
        let (missing, _) = lookup.join().expect("a lookup panicked");
        assert!(
            missing.is_empty(),
            "{} of {} acknowledged transactions are missing on {}: {:?}",
            missing.len(),
            acknowledged.len(),
            node.org,
            &missing[..missing.len().min(10)]
        );
    }
    // The transactions whose outcome was unknown: committed on all nodes or on none.
    let unknown_found: Vec<BTreeSet<String>> = urls
        .iter()
        .map(|url| look_up(url, &tally.unknown).1.into_iter().collect())
        .collect();
    assert!(
        unknown_found.windows(2).all(|p| p[0] == p[1]),
        "the nodes disagree on which unknown-outcome transactions committed"
    );
    // Identical blocks at every height.
    let agent = agent(Duration::from_secs(10));
    for h in 0..=height {
        let blocks: Vec<(u16, Value)> = urls
            .iter()
            .map(|url| get(&agent, &format!("{url}/v1/blocks/{h}")).expect("a block"))
            .collect();
        assert_eq!(
            blocks[0].0, 200,
            "block {h} on {}: {:?}",
            ORGS[0], blocks[0]
        );
        for (i, block) in blocks.iter().enumerate().skip(1) {
            assert_eq!(
                block, &blocks[0],
                "block {h} differs between {} and {}",
                ORGS[0], ORGS[i]
            );
        }
    }

    // Stopped, every store re-executes from genesis.
    let mut exits = Vec::new();
    for node in &mut cluster.nodes {
        exits.push((node.org, node.interrupt(Duration::from_secs(15))));
    }
    for node in &cluster.nodes {
        let verified = medledger(&["verify", "--data-dir", node.dir.to_str().unwrap()]);
        assert!(
            verified.status.success(),
            "{}'s store does not verify: {}{}",
            node.org,
            String::from_utf8_lossy(&verified.stdout),
            String::from_utf8_lossy(&verified.stderr)
        );
    }

    let seconds = under_faults.as_secs_f64();
    let figure = |label: &str, value: String| println!("{label:<32} {value}");
    figure("cycles:", cycles.to_string());
    figure(
        "leader kills:",
        format!("{leader_kills} ({elections} waited for a new election)"),
    );
    figure("acknowledged txs:", tally.acknowledged.len().to_string());
    figure(
        "outcome_unknown:",
        format!(
            "{} ({} of them committed after all)",
            tally.unknown.len(),
            unknown_found[0].len()
        ),
    );
    figure(
        "rejected (200, not committed):",
        tally.rejected.len().to_string(),
    );
    figure("refused (other API errors):", tally.refused.to_string());
    figure("connection errors:", tally.connection_errors.to_string());
    figure("final height:", height.to_string());
    figure("longest recovery:", format!("{longest_recovery:?}"));
    figure("elapsed under faults:", format!("{seconds:.1} s"));
    figure(
        "txs/s under faults:",
        format!("{:.1}", tally.acknowledged.len() as f64 / seconds),
    );
    figure(
        "total elapsed:",
        format!("{:.1} s", started.elapsed().as_secs_f64()),
    );
    for (org, exit) in &exits {
        figure(&format!("{org} after SIGINT:"), format!("{exit:?}"));
    }
    assert!(
        tally.rejected.is_empty(),
        "fresh patients' registrations were rejected: {:?}",
        &tally.rejected[..tally.rejected.len().min(5)]
    );
    assert!(
        !tally.acknowledged.is_empty(),
        "no transaction was acknowledged at all"
    );
}

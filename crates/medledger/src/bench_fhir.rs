//! `medledger bench fhir`: the FHIR REST API measured as its clients see it.
//!
//! Three member nodes (hospital-a, hospital-b, lab-x) run in this process as `medledger
//! demo` runs them: Raft over mutual TLS on loopback, embedded record stores, each serving
//! its whole API (the FHIR API at `/fhir`, tokens at `/auth/token`) over HTTP on loopback.
//! The lead is handed to lab-x, so the two hospitals measured are followers alike.
//!
//! Setup goes through library calls where that is quicker (enrolling staff, patients and
//! their consents straight on the ledger, accounts straight into the nodes' account
//! files); the `$everything` patient's records are created through the API, untimed.
//! Every token comes from a node's token endpoint (password and one-time code, ES256
//! signed) and every timed request is HTTP to a real node, one blocking client (its own
//! keep-alive connection) per thread:
//!
//! 1. creates: hospital-a's clinicians POST Observations of consenting patients;
//! 2. reads: they GET those Observations back at hospital-a (each read commits an access
//!    entry to the ledger before anything is served);
//! 3. reads across nodes: hospital-b's clinicians, with the patients' consent, GET the same
//!    Observations at hospital-b, whose node fetches them from hospital-a over mutual TLS;
//! 4. `$everything`: a patient with `--everything-resources` records spread evenly over
//!    the three custodians, read whole by a hospital-a clinician, one call at a time.
//!
//! Phases 1 to 3 run once per `--fhir-clients` count. For comparison the same run measures
//! the ceilings: `GET /fhir/metadata` (the capability statement: no token, no ledger, same
//! HTTP stack and clients), a read of an unknown Observation (the token checked, a 404
//! from the ledger's state without committing anything), the ledger's own commit rate
//! (signed grants submitted in process), and ECDSA P-256 verifications on one core. Goals are printed next to the figures, met or not;
//! nothing fails on them. The last line is one JSON object with the figures; each phase's
//! top-level figures are those of its fastest client count, every count is under `levels`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use medledger_core::identity::Role;
use medledger_core::model::{Action, Category, EncryptionKey, Grantee, Purpose, Scope};
use medledger_core::state::keys;
use medledger_core::tx::{SignedTx, TxBody};
use medledger_node::auth::{base32_encode, AccountKind, AccountStore};
use medledger_node::consortium::Identity;
use medledger_node::fhir_api::ACCOUNTS_FILE;
use medledger_node::ledger::{now_ms, Ledger};
use serde_json::{json, Value};

use crate::bench::records::{commit, observation};
use crate::bench::{
    drive, grant, lead_of, max_ms, peak_memory_mib, percentile, verify_rate, CHAIN_ID,
};
use crate::node_runner::RunningMember;

#[derive(clap::Args)]
pub struct FhirArgs {
    /// Requests in each timed phase of `bench fhir` (creates, reads, reads across nodes),
    /// at each client count.
    #[arg(long, default_value_t = 2_000)]
    requests: usize,
    /// Concurrent HTTP clients in `bench fhir`, each its own clinician and connection; every
    /// phase runs once per count (comma-separated, e.g. 16,64).
    #[arg(long, value_delimiter = ',', default_values_t = [16, 64])]
    fhir_clients: Vec<usize>,
    /// Records of the patient whose `$everything` `bench fhir` times, spread over the three
    /// custodians.
    #[arg(long, default_value_t = 1_000)]
    everything_resources: usize,
    /// Times `bench fhir` asks for that patient's `$everything`, one call at a time.
    #[arg(long, default_value_t = 20)]
    everything_runs: usize,
}

/// The custodian: its clinicians create and read the records.
const CUSTODIAN: usize = 0;
/// The other hospital: its clinicians read the custodian's records through their own node.
const REMOTE: usize = 1;
/// The node that leads, so that both hospitals' nodes are followers alike.
const LEADER: usize = 2;
/// Synthetic people's password at every node.
const PASSWORD: &str = "bench-only-password-1";
/// What a clinician's account may be granted, and what their login asks for.
const ACCOUNT_SCOPES: &str = "user/*.cruds openid fhirUser";
const TOKEN_SCOPE: &str = "user/*.cruds";
/// Authors per custodian writing the `$everything` patient's records.
const WRITERS_MAX: usize = 8;
/// Logins sent at once (each costs the node an argon2 verification).
const LOGINS_AT_ONCE: usize = 8;
/// Deadline of one HTTP request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest answer read: a whole `$everything` bundle.
const BODY_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// `GET /fhir/metadata` requests per client count, as a multiple of `--requests`.
const METADATA_FACTOR: usize = 4;

/// The goals printed next to the figures.
const READ_GOAL_PER_S: f64 = 5_000.0;
const READ_GOAL_P99_MS: f64 = 20.0;
const CREATE_GOAL_PER_S: f64 = 2_000.0;
const CREATE_GOAL_P99_MS: f64 = 30.0;
const EVERYTHING_GOAL_P50_MS: f64 = 150.0;

/// Removes a scratch directory when dropped.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A blocking HTTP client with its own connection pool: one per simulated client.
///
/// Each phase of a request has its own deadline, and name resolution none: under a global
/// deadline ureq resolves on a new thread for every request (even of an IP address), which
/// here would be clients' work competing with the nodes for the same cores.
fn agent() -> ureq::Agent {
    let deadline = Some(REQUEST_TIMEOUT);
    ureq::Agent::config_builder()
        .timeout_connect(deadline)
        .timeout_send_request(deadline)
        .timeout_send_body(deadline)
        .timeout_recv_response(deadline)
        .timeout_recv_body(deadline)
        .http_status_as_error(false)
        .build()
        .into()
}

/// One FHIR request with a bearer token (a POST when `body` is given); the status and
/// the answer's bytes.
fn exchange(
    agent: &ureq::Agent,
    url: &str,
    bearer: &str,
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), String> {
    let sent = match body {
        None => agent
            .get(url)
            .header("Authorization", bearer)
            .header("Accept", "application/fhir+json")
            .call(),
        Some(body) => agent
            .post(url)
            .header("Authorization", bearer)
            .header("Accept", "application/fhir+json")
            .content_type("application/fhir+json")
            .send(body),
    };
    let response = sent.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .with_config()
        .limit(BODY_BYTES_MAX)
        .read_to_vec()
        .map_err(|e| format!("{url}: {e}"))?;
    Ok((status, bytes))
}

/// The answer as JSON when its status is `wanted`; otherwise what the server said.
fn expect(status: u16, bytes: &[u8], wanted: u16) -> Result<Value, String> {
    let body: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    if status == wanted {
        return Ok(body);
    }
    let said = body
        .pointer("/issue/0/diagnostics")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into());
    Err(format!("{status}: {said}"))
}

/// One timed run: what succeeded (by item), its latencies (sorted), the failures.
type Timed<T> = crate::bench::records::Phase<T>;

/// `clients` threads at once, each with its own connection, opened (by a GET of `warm`)
/// before the clock starts; client `c` sends items `c`, `c + clients`, ... below `total`,
/// one at a time, each timed from sending to having read the whole answer.
fn run_http<T: Send>(
    clients: usize,
    total: usize,
    warm: &str,
    op: impl Fn(&ureq::Agent, usize, usize) -> Result<T, String> + Sync,
) -> Timed<T> {
    let clients = clients.clamp(1, total.max(1));
    let start_line = Barrier::new(clients + 1);
    let (results, seconds) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|client| {
                let (start_line, op) = (&start_line, &op);
                scope.spawn(move || {
                    let agent = agent();
                    let _ = agent.get(warm).call().map(|r| r.into_body().read_to_vec());
                    start_line.wait();
                    let mut done = Vec::new();
                    for item in (client..total).step_by(clients) {
                        let sent = Instant::now();
                        let result = op(&agent, client, item);
                        done.push((item, sent.elapsed(), result));
                    }
                    done
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        let mut results = Vec::with_capacity(total);
        for handle in handles {
            match handle.join() {
                Ok(done) => results.extend(done),
                Err(_) => results.push((
                    usize::MAX,
                    Duration::ZERO,
                    Err("a client thread panicked".to_string()),
                )),
            }
        }
        (results, start.elapsed().as_secs_f64())
    });
    Timed::from_results(seconds, results)
}

/// Runs `work` on every item with `threads` threads; the results in the items' order.
fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    work: impl Fn(&T) -> Result<R, String> + Sync,
) -> Result<Vec<R>, String> {
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, R)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.clamp(1, items.len().max(1)))
            .map(|_| {
                scope.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(index) else {
                            return Ok::<_, String>(out);
                        };
                        out.push((index, work(item)?));
                    }
                })
            })
            .collect();
        let mut done = Vec::with_capacity(items.len());
        for handle in handles {
            done.extend(
                handle
                    .join()
                    .map_err(|_| "a worker thread panicked".to_string())??,
            );
        }
        Ok::<_, String>(done)
    })?;
    done.sort_by_key(|(index, _)| *index);
    Ok(done.into_iter().map(|(_, result)| result).collect())
}

/// A patient's consent to `org`: `actions` on their diagnostics and conditions, for
/// treatment, for a day.
fn consent(org: &str, actions: &[Action]) -> TxBody {
    TxBody::Grant {
        grantee: Grantee::Org { org: org.into() },
        scope: Scope {
            resource_types: vec![],
            categories: vec![Category::Diagnostics, Category::Conditions],
        },
        actions: actions.to_vec(),
        purposes: vec![Purpose::Treatment],
        expires_at_ms: Some(now_ms() + 24 * 60 * 60 * 1000),
    }
}

const FULL: [Action; 3] = [Action::Read, Action::Write, Action::Search];
const READ_ONLY: [Action; 2] = [Action::Read, Action::Search];

/// A hypertension Condition, synthetic, a little different per `n`.
fn condition(patient: &str, n: usize) -> Value {
    json!({
        "resourceType": "Condition",
        "clinicalStatus": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
            "code": "active"
        }]},
        "code": {
            "coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertensive disorder"}],
            "text": "Hypertension"
        },
        "subject": {"reference": format!("Patient/{patient}")},
        "onsetDateTime": format!("20{:02}-0{}-1{}", 10 + n % 15, 1 + n % 9, n % 10),
        "note": [{"text": "Synthetic benchmark data."}]
    })
}

/// The nodes under test, the consortium's keys, and the scratch directory.
struct Net {
    local: crate::local::LocalConsortium,
    members: Vec<RunningMember>,
    orgs: Vec<String>,
    /// Base URLs of the nodes' APIs (`…/fhir` is the FHIR base).
    urls: Vec<String>,
    dir: PathBuf,
}

impl Net {
    fn start(dir: &Path) -> Result<Net, String> {
        let orgs = &crate::local::LOCAL_ORGS[..3];
        let base_port = crate::local::free_base_port(orgs.len())?;
        let local = crate::local::create_local(dir, CHAIN_ID, orgs, orgs.len(), base_port, |_| {})?;
        let members = crate::local::start_all(&local.configs)?;
        Ok(Net {
            urls: members.iter().map(|m| m.api_url.clone()).collect(),
            orgs: orgs.iter().map(|(org, _)| org.to_string()).collect(),
            local,
            members,
            dir: dir.to_path_buf(),
        })
    }

    fn data_dir(&self, index: usize) -> PathBuf {
        self.dir.join("nodes").join(&self.orgs[index])
    }

    fn ledgers(&self) -> Vec<Arc<Ledger>> {
        self.members.iter().map(|m| m.ledger.clone()).collect()
    }

    /// Hands the lead to node `at` through its API, as its organisation's admin, and waits
    /// until every node follows it.
    fn lead_at(&self, at: usize) -> Result<(), String> {
        let wanted = self.members[at].ledger.node_id().to_string();
        let admin = &self
            .local
            .consortium
            .org(&self.orgs[at])
            .ok_or("a founding member")?
            .admin;
        let login = logins(self, at, std::slice::from_ref(admin))?;
        let token = login[0].bearer.trim_start_matches("Bearer ");
        let client = crate::client::Client::with_token(&self.urls[at], token);
        let started = Instant::now();
        loop {
            let (led, leaders) = lead_of(self.members.iter().map(|m| &*m.node), &wanted);
            if led {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("{wanted} did not take the lead: {leaders:?}"));
            }
            if leaders.iter().all(Option::is_some) {
                // A refused or unfinished hand-over is simply tried again.
                let _: Result<Value, _> = client.post(
                    "/v1/consensus/transfer-leader",
                    &json!({ "to": wanted.as_str() }),
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every node's organisation has its encryption key on the ledger (each
    /// node publishes it in the background once it has joined).
    fn wait_for_keys(&self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let snapshot = self.members[CUSTODIAN]
                .ledger
                .store()
                .snapshot()
                .map_err(|e| e.to_string())?;
            let mut missing = Vec::new();
            for org in &self.orgs {
                let key: Option<EncryptionKey> = snapshot
                    .value(&keys::encryption_key(org))
                    .map_err(|e| e.to_string())?;
                if key.is_none() {
                    missing.push(org.as_str());
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("no encryption key published by {missing:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every node has applied the same head.
    fn settle(&self) -> Result<(), String> {
        crate::local::wait_for_agreement(&self.members, Duration::from_secs(60)).map(|_| ())
    }

    /// Committed transactions so far, as node `index` counts them.
    fn txs(&self, index: usize) -> (u64, u64) {
        let stats = self.members[index].ledger.stats();
        (
            stats.txs.load(Ordering::Relaxed),
            stats.blocks.load(Ordering::Relaxed),
        )
    }
}

/// Staff of one member: issued by its authority, enrolled on the ledger by its admin in
/// nonce order, each with a key file in the node's data directory.
async fn enroll(
    net: &Net,
    index: usize,
    prefix: &str,
    role: Role,
    count: usize,
) -> Result<Vec<Identity>, String> {
    let founding = net
        .local
        .consortium
        .org(&net.orgs[index])
        .ok_or("a founding member")?;
    let ledger = &net.members[index].ledger;
    crate::bench::records::enroll_users(ledger, founding, prefix, role, count).await
}

/// A login at a node: the `Authorization` header value of its token.
struct Login {
    bearer: String,
}

/// Gives each of `staff` (users of the `index`th member) an account at its node, then
/// logs each in at the node's token endpoint with password and one-time code.
fn logins(net: &Net, index: usize, staff: &[Identity]) -> Result<Vec<Login>, String> {
    let data_dir = net.data_dir(index);
    let people = data_dir.join("people");
    std::fs::create_dir_all(&people).map_err(|e| format!("{}: {e}", people.display()))?;
    // One store for all, so that accounts added from several threads are all written.
    let store = AccountStore::open(&data_dir.join(ACCOUNTS_FILE)).map_err(|e| e.to_string())?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let secrets = in_parallel(staff, cores, |person| {
        let key_file = people.join(format!("{}.identity.json", person.id));
        person.save(&key_file).map_err(|e| e.to_string())?;
        store
            .add_account(
                &person.id,
                AccountKind::Practitioner,
                PASSWORD,
                ACCOUNT_SCOPES,
                &key_file.display().to_string(),
            )
            .map(|secret| (person.id.clone(), base32_encode(&secret)))
            .map_err(|e| format!("{}: {e}", person.id))
    })?;
    let url = &net.urls[index];
    in_parallel(&secrets, LOGINS_AT_ONCE, |(username, secret)| {
        let answer = crate::fhir_cli::login(url, username, PASSWORD, secret, TOKEN_SCOPE)?;
        let token = answer["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("{username}: the token endpoint gave no token"))?;
        Ok(Login {
            bearer: format!("Bearer {token}"),
        })
    })
}

/// A registered patient with a published encryption key and `consents` (organisation,
/// actions), committed through `ledger` in nonce order.
async fn patient(
    ledger: Arc<Ledger>,
    consents: Vec<(String, &'static [Action])>,
) -> Result<(Identity, u64), String> {
    let patient = Identity::new_patient().map_err(|e| e.to_string())?;
    let encryption_key = patient
        .encryption_key()
        .ok_or("a patient's encryption key")?
        .public_key()
        .to_base64url();
    let mut bodies = vec![
        TxBody::RegisterPatient {
            public_key: patient.key.public_key(),
        },
        TxBody::SetEncryptionKey {
            public_key: encryption_key,
        },
    ];
    bodies.extend(consents.iter().map(|(org, actions)| consent(org, actions)));
    let mut nonce = 0;
    for body in bodies {
        nonce += 1;
        commit(&ledger, &patient, nonce, body).await?;
    }
    Ok((patient, nonce))
}

/// CPU time this process (nodes and clients) has used, from /proc (Linux, whose clock
/// ticks are 1/100 s); zero elsewhere.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // The fields after the command name (in parentheses, which may hold spaces).
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks = |n: usize| fields.get(n)?.parse::<f64>().ok();
            Some((ticks(11)? + ticks(12)?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// One client count's run of a phase, with what the custodian's ledger committed and the
/// CPU this process used meanwhile.
struct Level {
    phase: &'static str,
    clients: usize,
    done: usize,
    failures: usize,
    first_error: Option<String>,
    seconds: f64,
    latencies: Vec<Duration>,
    ledger_txs: u64,
    ledger_blocks: u64,
    cpu_seconds: f64,
}

impl Level {
    fn new<T>(
        phase: &'static str,
        clients: usize,
        timed: &Timed<T>,
        ledger: (u64, u64),
        cpu_seconds: f64,
    ) -> Level {
        Level {
            phase,
            clients,
            done: timed.ok.len(),
            failures: timed.failures,
            first_error: timed.first_error.clone(),
            seconds: timed.seconds,
            latencies: timed.latencies.clone(),
            ledger_txs: ledger.0,
            ledger_blocks: ledger.1,
            cpu_seconds,
        }
    }

    fn rate(&self) -> f64 {
        self.done as f64 / self.seconds.max(1e-9)
    }

    fn ms(&self, p: f64) -> f64 {
        round3(percentile(&self.latencies, p))
    }

    fn max(&self) -> f64 {
        round3(max_ms(&self.latencies))
    }

    /// The share of every core this process kept busy.
    fn cpu_share(&self) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        100.0 * self.cpu_seconds / self.seconds.max(1e-9) / cores as f64
    }

    fn line(&self) -> String {
        let failed = match &self.first_error {
            Some(error) => format!("; {} failed, first: {error}", self.failures),
            None => String::new(),
        };
        format!(
            "  {:>3} clients: {} in {:.2} s = {:.0}/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; ledger {:.0} tx/s, {:.1} tx/block; CPU {:.0} %{failed}",
            self.clients,
            self.done,
            self.seconds,
            self.rate(),
            self.ms(0.50),
            self.ms(0.99),
            self.max(),
            self.ledger_txs as f64 / self.seconds.max(1e-9),
            self.ledger_txs as f64 / self.ledger_blocks.max(1) as f64,
            self.cpu_share(),
        )
    }

    fn json(&self) -> Value {
        json!({
            "phase": self.phase,
            "clients": self.clients,
            "requests": self.done,
            "failures": self.failures,
            "per_s": self.rate().round(),
            "ms_p50": self.ms(0.50),
            "ms_p99": self.ms(0.99),
            "ms_max": self.max(),
            "ledger_tx_per_s": (self.ledger_txs as f64 / self.seconds.max(1e-9)).round(),
            "cpu_percent": self.cpu_share().round(),
        })
    }

    fn meets(&self, per_s: f64, p99_ms: f64) -> bool {
        self.failures == 0 && self.rate() >= per_s && self.ms(0.99) <= p99_ms
    }
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// The fastest of a phase's runs.
fn fastest(levels: &[Level]) -> &Level {
    levels
        .iter()
        .max_by(|a, b| a.rate().total_cmp(&b.rate()))
        .expect("every phase runs at least one client count")
}

/// Whether some client count met a rate and p99 goal; the verdict as printed.
fn verdict(levels: &[Level], per_s: f64, p99_ms: f64) -> (bool, String) {
    match levels.iter().find(|l| l.meets(per_s, p99_ms)) {
        Some(level) => (true, format!("met at {} clients", level.clients)),
        None => {
            let best = fastest(levels);
            (
                false,
                format!(
                    "unmet (best {:.0}/s with p99 {:.2} ms, at {} clients)",
                    best.rate(),
                    best.ms(0.99),
                    best.clients
                ),
            )
        }
    }
}

/// Times `phase` at every client count; `op(agent, client, item)` is one request.
fn levels<T: Send>(
    net: &Net,
    phase: &'static str,
    counts: &[usize],
    requests: usize,
    warm: &str,
    op: impl Fn(&ureq::Agent, usize, usize) -> Result<T, String> + Sync,
) -> Result<(Vec<Level>, Vec<Timed<T>>), String> {
    let mut levels = Vec::new();
    let mut runs = Vec::new();
    for &clients in counts {
        let (before, cpu) = (net.txs(CUSTODIAN), cpu_seconds());
        let timed = run_http(clients, requests, warm, &op);
        let (after, cpu) = (net.txs(CUSTODIAN), cpu_seconds() - cpu);
        net.settle()?;
        let level = Level::new(
            phase,
            clients.min(requests),
            &timed,
            (after.0 - before.0, after.1 - before.1),
            cpu,
        );
        println!("{}", level.line());
        levels.push(level);
        runs.push(timed);
    }
    Ok((levels, runs))
}

/// One read: client `c` (logged in as `logins[c]`) GETs Observation `ids[item]` from the
/// FHIR base `base` and checks that it got that one.
fn reader<'a>(
    base: &'a str,
    ids: &'a [String],
    logins: &'a [Login],
) -> impl Fn(&ureq::Agent, usize, usize) -> Result<(), String> + Sync + 'a {
    move |agent, client, item| {
        let id = &ids[item % ids.len()];
        let url = format!("{base}/Observation/{id}");
        let (status, bytes) = exchange(agent, &url, &logins[client].bearer, None)?;
        let body = expect(status, &bytes, 200)?;
        if body["id"].as_str() == Some(id.as_str()) {
            Ok(())
        } else {
            Err(format!("asked for {id}, got {}", body["id"]))
        }
    }
}

/// Every entry of a searchset, following `next` links; the number of resources.
fn everything_once(agent: &ureq::Agent, url: &str, bearer: &str) -> Result<usize, String> {
    let mut next = Some(url.to_string());
    let (mut resources, mut pages) = (0, 0);
    while let Some(url) = next.take() {
        pages += 1;
        if pages > 10_000 {
            return Err("more than 10,000 pages".into());
        }
        let (status, bytes) = exchange(agent, &url, bearer, None)?;
        let bundle = expect(status, &bytes, 200)?;
        if bundle["resourceType"] != "Bundle" {
            return Err(format!("not a Bundle: {}", bundle["resourceType"]));
        }
        resources += bundle["entry"].as_array().map_or(0, Vec::len);
        next = bundle["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|link| link["relation"] == "next")
            .and_then(|link| link["url"].as_str())
            .map(str::to_string);
    }
    Ok(resources)
}

pub fn run(args: &FhirArgs) -> Result<(), String> {
    let requests = args.requests.max(1);
    let mut counts: Vec<usize> = args.fhir_clients.iter().map(|&c| c.max(1)).collect();
    counts.dedup();
    if counts.is_empty() {
        counts.push(16);
    }
    let clients_max = counts.iter().copied().max().unwrap_or(1).min(requests);
    let everything_resources = args.everything_resources.max(1);
    let everything_runs = args.everything_runs.max(1);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("medledger bench fhir on {cores} core(s)");
    let verify_one = verify_rate(1, 4_000);
    println!("ceiling: ECDSA P-256 verify {verify_one:.0}/s on one core");

    let dir = std::env::temp_dir().join(format!("medledger-bench-fhir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let scratch = ScratchDir(dir.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let net = Net::start(&dir)?;
    let result = measure(
        &net,
        &runtime,
        &Sizes {
            requests,
            counts,
            clients_max,
            everything_resources,
            everything_runs,
        },
        verify_one,
        cores,
    );
    drop(net);
    drop(runtime);
    drop(scratch);
    let figures = result?;
    println!("{figures}");
    Ok(())
}

struct Sizes {
    requests: usize,
    counts: Vec<usize>,
    clients_max: usize,
    everything_resources: usize,
    everything_runs: usize,
}

/// Sets up, runs every phase and prints its lines; returns the JSON figures.
fn measure(
    net: &Net,
    runtime: &tokio::runtime::Runtime,
    sizes: &Sizes,
    verify_one: f64,
    cores: usize,
) -> Result<Value, String> {
    let began = Instant::now();
    net.lead_at(LEADER)?;
    net.wait_for_keys()?;
    let [custodian, remote, lab] = [0, 1, 2].map(|i| net.orgs[i].clone());
    println!(
        "consortium: {custodian}, {remote} and {lab} in this process, Raft over mutual TLS on loopback, embedded record stores, each node's FHIR API over HTTP on loopback; {} leads",
        net.orgs[LEADER]
    );

    // Staff on the ledger, then their accounts and tokens from the token endpoints.
    let writers = sizes.clients_max.min(WRITERS_MAX);
    let (authors, readers, technicians) = runtime.block_on(async {
        tokio::join!(
            enroll(net, CUSTODIAN, "dr-a", Role::Clinician, sizes.clients_max),
            enroll(net, REMOTE, "dr-b", Role::Clinician, sizes.clients_max),
            enroll(net, LEADER, "tech-x", Role::LabTechnician, writers),
        )
    });
    let (authors, readers, technicians) = (authors?, readers?, technicians?);
    let patients = sizes.clients_max;
    let ledgers = net.ledgers();
    let people = runtime.block_on(async {
        let mut tasks = Vec::new();
        for n in 0..=2 * patients {
            let ledger = ledgers[n % ledgers.len()].clone();
            // The first patients let the custodian keep their records and the other
            // hospital read them; the next one has records everywhere; the rest only sign
            // the ledger's ceiling load, so that its grants do not lengthen the consents
            // every access decision about the first ones goes through.
            let consents: Vec<(String, &'static [Action])> = match n.cmp(&patients) {
                std::cmp::Ordering::Less => vec![
                    (custodian.clone(), &FULL[..]),
                    (remote.clone(), &READ_ONLY[..]),
                ],
                std::cmp::Ordering::Equal => net
                    .orgs
                    .iter()
                    .map(|org| (org.clone(), &FULL[..]))
                    .collect(),
                std::cmp::Ordering::Greater => Vec::new(),
            };
            tasks.push(tokio::spawn(patient(ledger, consents)));
        }
        let mut people = Vec::new();
        for task in tasks {
            people.push(task.await.map_err(|e| e.to_string())??);
        }
        Ok::<_, String>(people)
    })?;
    net.settle()?;
    let enrolled = began.elapsed().as_secs_f64();
    let logged_in = Instant::now();
    let author_logins = logins(net, CUSTODIAN, &authors)?;
    let reader_logins = logins(net, REMOTE, &readers)?;
    let technician_logins = logins(net, LEADER, &technicians)?;
    println!(
        "setup: {} clinicians at {custodian}, {} at {remote} and {writers} lab technicians at {lab} enrolled, and {} patients registered (with consents, but for the ceiling load's signers), in {enrolled:.1} s; their accounts and ES256 tokens from /auth/token (password + one-time code) in {:.1} s",
        authors.len(),
        readers.len(),
        2 * patients + 1,
        logged_in.elapsed().as_secs_f64()
    );
    let mut people = people;
    let signers = people.split_off(patients + 1);
    let (everyone, _) = people.pop().ok_or("the $everything patient")?;
    let patient_ids: Vec<String> = people.iter().map(|(p, _)| p.id.clone()).collect();

    // The ledger's own commit rate: grants signed by patients of their own, in process.
    let per_patient = sizes.requests.div_ceil(signers.len());
    let load: Vec<Vec<SignedTx>> = signers
        .iter()
        .map(|(p, last)| {
            (1..=per_patient as u64)
                .map(|n| grant(p, last + n))
                .collect()
        })
        .collect();
    let ceiling = drive(runtime, &ledgers, load);
    let ledger_per_s = ceiling.committed as f64 / ceiling.seconds;
    println!(
        "ceiling, ledger: {} grants from {} signers committed in process in {:.2} s = {ledger_per_s:.0} tx/s; latency p50 {:.2} ms, p99 {:.2} ms",
        ceiling.committed,
        signers.len(),
        ceiling.seconds,
        percentile(&ceiling.latencies, 0.50),
        percentile(&ceiling.latencies, 0.99),
    );
    net.settle()?;

    let base = |index: usize| format!("{}/fhir", net.urls[index]);
    let (base_a, base_b) = (base(CUSTODIAN), base(REMOTE));
    let warm_a = format!("{base_a}/metadata");
    let warm_b = format!("{base_b}/metadata");

    println!(
        "ceiling, HTTP: GET /fhir/metadata at {custodian} (no ledger, no records), {} requests per client count:",
        sizes.requests * METADATA_FACTOR
    );
    let (metadata, _) = levels(
        net,
        "metadata",
        &sizes.counts,
        sizes.requests * METADATA_FACTOR,
        &warm_a,
        |agent, client, _| {
            let bearer = &author_logins[client % author_logins.len()].bearer;
            let (status, bytes) = exchange(agent, &warm_a, bearer, None)?;
            if status == 200 {
                Ok(())
            } else {
                expect(status, &bytes, 200).map(|_| ())
            }
        },
    )?;

    println!(
        "ceiling, token check: GET /fhir/Observation/{{unknown id}} at {custodian} (token verified, 404 from the ledger's state, nothing committed), {} requests per client count:",
        sizes.requests * METADATA_FACTOR
    );
    let unknown_url = format!("{base_a}/Observation/{custodian}.{}", "0".repeat(24));
    let (noop, _) = levels(
        net,
        "token_check",
        &sizes.counts,
        sizes.requests * METADATA_FACTOR,
        &warm_a,
        |agent, client, _| {
            let bearer = &author_logins[client % author_logins.len()].bearer;
            let (status, bytes) = exchange(agent, &unknown_url, bearer, None)?;
            expect(status, &bytes, 404).map(|_| ())
        },
    )?;

    println!(
        "create: POST /fhir/Observation at {custodian} by its clinicians (check, seal, store, then the clinician's create_record committed), {} per client count:",
        sizes.requests
    );
    let resource_bytes = serde_json::to_vec(&observation(&patient_ids[0], 0))
        .map_err(|e| e.to_string())?
        .len();
    let create_url = format!("{base_a}/Observation");
    let (creates, created) = levels(
        net,
        "create",
        &sizes.counts,
        sizes.requests,
        &warm_a,
        |agent, client, item| {
            let body =
                serde_json::to_vec(&observation(&patient_ids[item % patient_ids.len()], item))
                    .map_err(|e| e.to_string())?;
            let bearer = &author_logins[client].bearer;
            let (status, bytes) = exchange(agent, &create_url, bearer, Some(&body))?;
            let created = expect(status, &bytes, 201)?;
            created["id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| "a created resource without an id".to_string())
        },
    )?;
    let ids: Vec<String> = created
        .into_iter()
        .flat_map(|timed| timed.ok.into_iter().map(|(_, id)| id))
        .collect();
    if ids.is_empty() {
        return Err("no Observation was created, so none can be read".into());
    }

    println!(
        "read: GET /fhir/Observation/{{id}} at {custodian} by its clinicians (access entry committed, then decrypted), {} per client count:",
        sizes.requests
    );
    let (reads, _) = levels(
        net,
        "read",
        &sizes.counts,
        sizes.requests,
        &warm_a,
        reader(&base_a, &ids, &author_logins),
    )?;
    println!(
        "read across nodes: GET /fhir/Observation/{{id}} at {remote} by its clinicians under the patients' consent ({remote} commits the access entry, then fetches from {custodian} over mutual TLS, which serves under it; {remote} checks and decrypts), {} per client count:",
        sizes.requests
    );
    let (remote_reads, _) = levels(
        net,
        "read_remote",
        &sizes.counts,
        sizes.requests,
        &warm_b,
        reader(&base_b, &ids, &reader_logins),
    )?;

    // The $everything patient's records, a third at each custodian, through the API.
    let writer_logins: [&[Login]; 3] = [
        &author_logins[..writers],
        &reader_logins[..writers],
        &technician_logins[..],
    ];
    let started = Instant::now();
    let bases: Vec<String> = (0..3).map(base).collect();
    let everyone_id = everyone.id.clone();
    let setup = run_http(
        3 * writers,
        sizes.everything_resources,
        &warm_a,
        |agent, client, item| {
            let custodian = client % 3;
            let resource = if custodian != LEADER && (item / 3) % 3 == 2 {
                condition(&everyone_id, item)
            } else {
                observation(&everyone_id, item)
            };
            let resource_type = resource["resourceType"].as_str().unwrap_or("").to_string();
            let body = serde_json::to_vec(&resource).map_err(|e| e.to_string())?;
            let url = format!("{}/{resource_type}", bases[custodian]);
            let bearer = &writer_logins[custodian][client / 3].bearer;
            let (status, bytes) = exchange(agent, &url, bearer, Some(&body))?;
            expect(status, &bytes, 201).map(|_| ())
        },
    );
    if let Some(error) = &setup.first_error {
        return Err(format!(
            "{} of the $everything patient's records were not created, first: {error}",
            setup.failures
        ));
    }
    net.settle()?;
    println!(
        "setup: {} records (Observations and Conditions) of one patient created over HTTP by {} authors at {custodian}, {remote} and {lab} in {:.1} s",
        setup.ok.len(),
        3 * writers,
        started.elapsed().as_secs_f64()
    );

    let everything_url = format!("{base_a}/Patient/{everyone_id}/$everything");
    let (before, cpu) = (net.txs(CUSTODIAN), cpu_seconds());
    let everything = run_http(1, sizes.everything_runs, &warm_a, |agent, _, _| {
        everything_once(agent, &everything_url, &author_logins[0].bearer)
    });
    let (after, cpu) = (net.txs(CUSTODIAN), cpu_seconds() - cpu);
    let everything_level = Level::new(
        "everything",
        1,
        &everything,
        (after.0 - before.0, after.1 - before.1),
        cpu,
    );
    let everything_count = everything.ok.first().map(|(_, n)| *n).unwrap_or(0);
    let counts_agree = everything.ok.iter().all(|(_, n)| *n == everything_count);
    let entries_per_call = everything_level.ledger_txs as f64 / sizes.everything_runs as f64;
    println!(
        "$everything: GET /fhir/Patient/{{id}}/$everything at {custodian} by one of its clinicians, {} calls one at a time, of a patient with {} records ({} at each custodian):",
        sizes.everything_runs,
        setup.ok.len(),
        sizes.everything_resources / 3
    );
    println!(
        "  {} resources in each answer{}; {} calls in {:.2} s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; access entries committed per call: {entries_per_call:.0}; CPU {:.0} %{}",
        everything_count,
        if counts_agree { "" } else { " (not in every answer)" },
        everything_level.done,
        everything_level.seconds,
        everything_level.ms(0.50),
        everything_level.ms(0.99),
        everything_level.max(),
        everything_level.cpu_share(),
        match &everything.first_error {
            Some(error) => format!("; {} failed, first: {error}", everything.failures),
            None => String::new(),
        }
    );

    let peak = peak_memory_mib();
    let (best_read, best_remote, best_create, best_metadata, best_noop) = (
        fastest(&reads),
        fastest(&remote_reads),
        fastest(&creates),
        fastest(&metadata),
        fastest(&noop),
    );
    println!(
        "where the time goes: each read commits one access entry; during the fastest local reads ({:.0}/s) the ledger committed {:.0} tx/s ({:.1} tx/block) with the CPU {:.0} % busy, against ceilings of {ledger_per_s:.0} tx/s for the ledger alone, {:.0}/s for the token check and {:.0}/s for the capability statement",
        best_read.rate(),
        best_read.ledger_txs as f64 / best_read.seconds.max(1e-9),
        best_read.ledger_txs as f64 / best_read.ledger_blocks.max(1) as f64,
        best_read.cpu_share(),
        best_noop.rate(),
        best_metadata.rate(),
    );
    let (reads_met, reads_verdict) = verdict(&reads, READ_GOAL_PER_S, READ_GOAL_P99_MS);
    let (_, remote_verdict) = verdict(&remote_reads, READ_GOAL_PER_S, READ_GOAL_P99_MS);
    let (creates_met, creates_verdict) = verdict(&creates, CREATE_GOAL_PER_S, CREATE_GOAL_P99_MS);
    let everything_met = everything.failures == 0
        && everything_level.done > 0
        && everything_level.ms(0.50) <= EVERYTHING_GOAL_P50_MS;
    println!("goals:");
    println!(
        "  reads ≥ {READ_GOAL_PER_S:.0}/s with p99 ≤ {READ_GOAL_P99_MS:.0} ms: {reads_verdict}; across nodes: {remote_verdict}"
    );
    println!(
        "  creates ≥ {CREATE_GOAL_PER_S:.0}/s with p99 ≤ {CREATE_GOAL_P99_MS:.0} ms: {creates_verdict}"
    );
    println!(
        "  $everything p50 ≤ {EVERYTHING_GOAL_P50_MS:.0} ms: {} (p50 {:.2} ms)",
        if everything_met { "met" } else { "unmet" },
        everything_level.ms(0.50)
    );
    println!(
        "peak memory {peak:.0} MiB (three nodes and every client, this process); each created Observation {resource_bytes} bytes of JSON (synthetic)"
    );

    let failures: usize = [&metadata, &noop, &creates, &reads, &remote_reads]
        .iter()
        .flat_map(|levels| levels.iter().map(|l| l.failures))
        .sum::<usize>()
        + everything.failures;
    let all_levels: Vec<Value> = [&metadata, &noop, &creates, &reads, &remote_reads]
        .iter()
        .flat_map(|levels| levels.iter().map(Level::json))
        .collect();
    // Built a pair at a time: one `json!` this large exceeds the macro recursion limit.
    let figures: serde_json::Map<String, Value> = [
        ("bench", json!("fhir")),
        ("cores", json!(cores)),
        ("nodes", json!(net.members.len())),
        ("leader", json!(net.orgs[LEADER])),
        ("requests", json!(sizes.requests)),
        ("clients", json!(sizes.counts)),
        ("read_per_s", json!(best_read.rate().round())),
        ("read_ms_p50", json!(best_read.ms(0.50))),
        ("read_ms_p99", json!(best_read.ms(0.99))),
        ("read_ms_max", json!(best_read.max())),
        ("read_clients", json!(best_read.clients)),
        ("read_remote_per_s", json!(best_remote.rate().round())),
        ("read_remote_ms_p50", json!(best_remote.ms(0.50))),
        ("read_remote_ms_p99", json!(best_remote.ms(0.99))),
        ("read_remote_ms_max", json!(best_remote.max())),
        ("read_remote_clients", json!(best_remote.clients)),
        ("create_per_s", json!(best_create.rate().round())),
        ("create_ms_p50", json!(best_create.ms(0.50))),
        ("create_ms_p99", json!(best_create.ms(0.99))),
        ("create_ms_max", json!(best_create.max())),
        ("create_clients", json!(best_create.clients)),
        ("everything_ms_p50", json!(everything_level.ms(0.50))),
        ("everything_ms_p99", json!(everything_level.ms(0.99))),
        ("everything_ms_max", json!(everything_level.max())),
        ("everything_resources", json!(everything_count)),
        ("everything_resources_created", json!(setup.ok.len())),
        ("everything_calls", json!(everything_level.done)),
        (
            "everything_access_entries_per_call",
            json!(entries_per_call.round()),
        ),
        (
            "everything_cpu_percent",
            json!(everything_level.cpu_share().round()),
        ),
        ("metadata_per_s", json!(best_metadata.rate().round())),
        ("metadata_ms_p99", json!(best_metadata.ms(0.99))),
        ("token_check_per_s", json!(best_noop.rate().round())),
        ("token_check_ms_p99", json!(best_noop.ms(0.99))),
        ("ledger_commit_per_s", json!(ledger_per_s.round())),
        (
            "ledger_tx_per_s_during_reads",
            json!((best_read.ledger_txs as f64 / best_read.seconds.max(1e-9)).round()),
        ),
        ("read_cpu_percent", json!(best_read.cpu_share().round())),
        ("verify_per_s_one_core", json!(verify_one.round())),
        ("peak_memory_mib", json!(peak.round())),
        ("failures", json!(failures)),
        (
            "goals",
            json!({
                "reads": reads_met,
                "creates": creates_met,
                "everything": everything_met,
            }),
        ),
        ("levels", json!(all_levels)),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value))
    .collect();
    Ok(Value::Object(figures))
}

//! `medledger`: run a node, drive it as a client, and check a ledger offline.

mod bench;
mod bench_fhir;
mod client;
mod commands;
mod demo;
mod fhir_cli;
mod local;
mod node_runner;
mod records_cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "medledger",
    version,
    about = "A permissioned ledger for sharing health records under the patient's consent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local consortium with synthetic patients and play a consent scenario.
    Demo {
        /// Play the scenario and exit instead of keeping the node running.
        #[arg(long)]
        once: bool,
        /// Where each node's data and the consortium's keys go (must be empty or absent).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Address of the first node's API; the others take the next ports (port 0: any free).
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: String,
    },
    /// Re-check a stored ledger from genesis; exits non-zero naming the first bad block.
    Verify {
        #[arg(long)]
        data_dir: PathBuf,
        /// A signed tree head obtained earlier (e.g. `proof verify --save-head`): the ledger
        /// must contain exactly that log, so a consistent rewrite or a rollback is caught.
        #[arg(long, requires = "root_cert")]
        tree_head: Option<PathBuf>,
        /// The consortium root certificate (PEM) that signs the tree head's chain.
        #[arg(long, requires = "tree_head")]
        root_cert: Option<PathBuf>,
    },
    /// Measure signature verification and ledger throughput and latency on this machine.
    Bench(bench::BenchArgs),
    /// Offline: create a consortium's keys, certificates and genesis.
    #[command(subcommand)]
    Consortium(commands::ConsortiumCommand),
    /// Offline: issue users and patients.
    #[command(subcommand)]
    Identity(commands::IdentityCommand),
    /// Initialise or run a node.
    #[command(subcommand)]
    Node(commands::NodeCommand),
    /// Sign and submit a transaction; prints the committed outcome and its proof.
    Tx(commands::TxArgs),
    /// Add, read and list health records through a node.
    #[command(subcommand)]
    Record(records_cli::RecordCommand),
    /// Check a stopped node's record store against its ledger.
    #[command(subcommand)]
    Store(records_cli::StoreCommand),
    /// Ask the node whether an actor may access a record now.
    Access(commands::AccessArgs),
    /// List the audit trail of a patient, an actor or a record.
    Audit(commands::AuditArgs),
    /// Fetch and verify proofs without trusting the node.
    #[command(subcommand)]
    Proof(commands::ProofCommand),
    /// What each organisation contributed: blocks led, records held, accesses served.
    Contributions {
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        node: String,
    },
    /// Logins for the FHIR API: people (password and one-time code) and systems.
    #[command(subcommand)]
    Account(fhir_cli::AccountCommand),
    /// Log in at a node's FHIR API and print an access token.
    Token {
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        node: String,
        #[arg(long)]
        username: String,
        /// The one-time code secret (base32) `account add` printed; the command computes
        /// the current code, as an authenticator app would.
        #[arg(long)]
        totp_secret: String,
        /// A file holding the password (first line); otherwise MEDLEDGER_PASSWORD.
        #[arg(long)]
        password_file: Option<PathBuf>,
        #[arg(long, default_value = "user/*.cruds")]
        scope: String,
    },
    /// GET any API path and print the JSON.
    Query {
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        node: String,
        path: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo {
            once,
            data_dir,
            listen,
        } => demo::run(once, data_dir, &listen),
        Command::Verify {
            data_dir,
            tree_head,
            root_cert,
        } => commands::verify(&data_dir, tree_head.as_deref(), root_cert.as_deref()),
        Command::Bench(args) => bench::run(args),
        Command::Consortium(command) => commands::consortium(command),
        Command::Identity(command) => commands::identity(command),
        Command::Node(command) => commands::node(command),
        Command::Tx(args) => commands::tx(args),
        Command::Record(command) => records_cli::record(command),
        Command::Store(command) => records_cli::store(command),
        Command::Access(args) => commands::access(args),
        Command::Audit(args) => commands::audit(args),
        Command::Proof(command) => commands::proof(command),
        Command::Query { node, path } => commands::query(&node, &path),
        Command::Account(command) => fhir_cli::account(command),
        Command::Token {
            node,
            username,
            totp_secret,
            password_file,
            scope,
        } => fhir_cli::read_password(password_file.as_deref())
            .and_then(|password| fhir_cli::login(&node, &username, &password, &totp_secret, &scope))
            .map(|body| println!("{}", body["access_token"].as_str().unwrap_or(""))),
        Command::Contributions { node } => commands::contributions(&node),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("medledger: {message}");
            ExitCode::FAILURE
        }
    }
}

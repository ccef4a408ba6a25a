//! The CLI's subcommands: offline key material, node setup, transactions, queries, proofs
//! and verification.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use medledger_core::audit::{
    verify_inclusion, verify_tree_head, ConsistencyProof, InclusionProof, SignedTreeHead,
};
use medledger_core::block::GenesisConfig;
use medledger_core::crypto::base64url;
use medledger_core::hash::Hash;
use medledger_core::identity::{OrgKind, Role};
use medledger_core::model::{
    Action, AuditEvent, BreakGlassVerdict, Category, Contribution, DenialReason, EmergencyReason,
    GovernanceAction, Grantee, Purpose, RevocationReason, Scope,
};
use medledger_core::tx::{SignedTx, TxBody};
use medledger_node::api::SubmitResponse;
use medledger_node::config::NodeConfig;
use medledger_node::consortium::{Consortium, Identity, OrgAuthority, RootAuthority};
use medledger_node::ledger::{initialise, now_ms, OrderingConfig};
use medledger_node::pki::{IssuedCert, Validity};
use medledger_node::store::{Store, LEDGER_FILE};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::client::Client;
use crate::node_runner::{self, NODE_IDENTITY_FILE};

type CliResult = Result<(), String>;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Parses a snake_case word into one of the ledger's enums.
pub fn parse_word<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_json::from_value(Value::String(text.to_string())).map_err(|e| format!("{text:?}: {e}"))
}

fn parse_list<T: DeserializeOwned>(text: &Option<String>) -> Result<Vec<T>, String> {
    match text {
        None => Ok(Vec::new()),
        Some(text) => text
            .split(',')
            .filter(|s| !s.is_empty())
            .map(parse_word)
            .collect(),
    }
}

fn words(text: &Option<String>) -> Vec<String> {
    text.as_deref()
        .map(|t| {
            t.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn load(path: &Path) -> Result<Identity, String> {
    Identity::load(path).map_err(|e| e.to_string())
}

/// Prints a line; a reader that went away (`| head`) ends the output, not the program.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

fn print_json(value: &impl serde::Serialize) {
    say(&serde_json::to_string_pretty(value).expect("values encode"));
}

/// Validity of the certificates made by the offline tools: from a day ago, for `days`.
pub fn validity_days(days: u64) -> Validity {
    let now = now_ms() / 1000 * 1000;
    Validity {
        not_before_ms: now - DAY_MS,
        not_after_ms: now + days * DAY_MS,
    }
}

// ---- offline: consortium and identities ---------------------------------------------

#[derive(Subcommand)]
pub enum ConsortiumCommand {
    /// Create the root, the founding organisations (CA, admin, node) and genesis.json.
    Create {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "medledger-local")]
        chain_id: String,
        /// `id:kind`, kind one of hospital, clinic, lab, insurer, regulator; repeat per member.
        #[arg(long = "org", required = true)]
        orgs: Vec<String>,
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
    },
    /// Create a ready-to-run consortium on loopback: keys, genesis and a configured node
    /// directory per member (start each with `medledger node run --config`).
    Local {
        #[arg(long)]
        dir: PathBuf,
        /// 3 or 5 member nodes.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=5))]
        nodes: u8,
        #[arg(long, default_value = "medledger-local")]
        chain_id: String,
        /// Node i serves its API on base_port + i and its peers on base_port + 100 + i.
        #[arg(long, default_value_t = 7400)]
        base_port: u16,
    },
    /// Create a new organisation's CA, admin and node under the root, for admission.
    AddOrg {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        org: String,
        #[arg(long)]
        kind: String,
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
    },
}

/// Files of a consortium directory.
pub struct ConsortiumLayout(pub PathBuf);

impl ConsortiumLayout {
    pub fn genesis(&self) -> PathBuf {
        self.0.join("genesis.json")
    }
    pub fn root_certificate(&self) -> PathBuf {
        self.0.join("root.cert.pem")
    }
    fn root_identity(&self) -> PathBuf {
        self.0.join("authority").join("root.identity.json")
    }
    pub fn org_file(&self, org: &str, file: &str) -> PathBuf {
        self.0
            .join("orgs")
            .join(org)
            .join(format!("{file}.identity.json"))
    }
}

/// Writes a consortium's material: genesis, root certificate, and per organisation its CA,
/// admin and node identities.
pub fn write_consortium(layout: &ConsortiumLayout, consortium: &Consortium) -> CliResult {
    let error = |e: std::io::Error| e.to_string();
    std::fs::create_dir_all(&layout.0).map_err(error)?;
    let genesis = serde_json::to_string_pretty(&consortium.genesis).map_err(|e| e.to_string())?;
    std::fs::write(layout.genesis(), genesis).map_err(error)?;
    std::fs::write(
        layout.root_certificate(),
        consortium.root.certificate.to_pem(),
    )
    .map_err(error)?;
    let root = Identity {
        id: format!("root@{}", consortium.root.chain_id),
        key: medledger_node::pki::KeyPair::from_pkcs8_der(consortium.root.key.pkcs8_der())
            .map_err(|e| e.to_string())?,
        certificate: Some(consortium.root.certificate.clone()),
        ca_certificate: None,
        encryption_keys: Vec::new(),
    };
    root.save(&layout.root_identity())
        .map_err(|e| e.to_string())?;
    for org in &consortium.orgs {
        let id = &org.authority.id;
        org.authority
            .as_identity()
            .save(&layout.org_file(id, "ca"))
            .map_err(|e| e.to_string())?;
        org.admin
            .save(&layout.org_file(id, "admin"))
            .map_err(|e| e.to_string())?;
        org.node
            .save(&layout.org_file(id, "node"))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

pub fn consortium(command: ConsortiumCommand) -> CliResult {
    match command {
        ConsortiumCommand::Create {
            dir,
            chain_id,
            orgs,
            valid_days,
        } => {
            let mut specs = Vec::new();
            for spec in &orgs {
                let (id, kind) = spec
                    .split_once(':')
                    .ok_or_else(|| format!("--org {spec:?}: expected id:kind"))?;
                specs.push((id, parse_word::<OrgKind>(kind)?));
            }
            let validity = validity_days(valid_days);
            let consortium = Consortium::create(&chain_id, &specs, now_ms(), validity)
                .map_err(|e| e.to_string())?;
            write_consortium(&ConsortiumLayout(dir.clone()), &consortium)?;
            println!("consortium {chain_id} written to {}", dir.display());
            Ok(())
        }
        ConsortiumCommand::Local {
            dir,
            nodes,
            chain_id,
            base_port,
        } => {
            let local = crate::local::create_local(
                &dir,
                &chain_id,
                &crate::local::LOCAL_ORGS,
                nodes as usize,
                base_port,
                |_| {},
            )?;
            println!(
                "consortium {chain_id} with {nodes} nodes written to {}; start each node with:",
                dir.display()
            );
            for config in &local.configs {
                println!("   medledger node run --config {}", config.display());
            }
            Ok(())
        }
        ConsortiumCommand::AddOrg {
            dir,
            org,
            kind,
            valid_days,
        } => {
            let layout = ConsortiumLayout(dir);
            let root = load(&layout.root_identity())?;
            let chain_id = root.id.trim_start_matches("root@").to_string();
            let root = RootAuthority {
                chain_id,
                key: root.key,
                certificate: root
                    .certificate
                    .ok_or("the root identity lacks its certificate")?,
            };
            let validity = validity_days(valid_days);
            let authority = OrgAuthority::create(&root, &org, parse_word(&kind)?, validity)
                .map_err(|e| e.to_string())?;
            let admin = authority
                .issue("admin", Role::OrgAdmin, validity)
                .map_err(|e| e.to_string())?;
            let node = authority
                .issue("node", Role::Node, validity)
                .map_err(|e| e.to_string())?;
            authority
                .as_identity()
                .save(&layout.org_file(&org, "ca"))
                .map_err(|e| e.to_string())?;
            admin
                .save(&layout.org_file(&org, "admin"))
                .map_err(|e| e.to_string())?;
            node.save(&layout.org_file(&org, "node"))
                .map_err(|e| e.to_string())?;
            println!("organisation {org} created; propose its admission with `medledger tx propose-admit`");
            Ok(())
        }
    }
}

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Issue a user or node certificate from an organisation's CA, with a fresh key.
    IssueUser {
        /// The organisation's CA identity file.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        name: String,
        /// clinician, nurse, radiologist, lab_technician, org_admin, auditor or node.
        #[arg(long)]
        role: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
    },
    /// Create a patient's key; prints the pseudonym.
    NewPatient {
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn identity(command: IdentityCommand) -> CliResult {
    match command {
        IdentityCommand::IssueUser {
            ca,
            name,
            role,
            out,
            valid_days,
        } => {
            let authority = OrgAuthority::from_identity(load(&ca)?, OrgKind::Hospital)
                .map_err(|e| e.to_string())?;
            let user = authority
                .issue(&name, parse_word(&role)?, validity_days(valid_days))
                .map_err(|e| e.to_string())?;
            user.save(&out).map_err(|e| e.to_string())?;
            println!("{}", user.id);
            Ok(())
        }
        IdentityCommand::NewPatient { out } => {
            let patient = Identity::new_patient().map_err(|e| e.to_string())?;
            patient.save(&out).map_err(|e| e.to_string())?;
            println!("{}", patient.id);
            Ok(())
        }
    }
}

// ---- node ---------------------------------------------------------------------------

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Write genesis into a new data directory and install the node's identity there.
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        genesis: PathBuf,
        /// The node's identity file (role node).
        #[arg(long)]
        identity: PathBuf,
    },
    /// Run a consortium member's node (`--config node.toml`), or a node that orders alone
    /// (`--data-dir`), until interrupted.
    Run {
        /// The member node's configuration (Raft over mutual TLS with its peers).
        #[arg(long, conflicts_with_all = ["data_dir", "listen", "batch_delay_ms"])]
        config: Option<PathBuf>,
        /// A node without peers: its data directory.
        #[arg(long, required_unless_present = "config")]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        listen: Option<String>,
        /// Wait this long for more transactions before closing a block.
        #[arg(long)]
        batch_delay_ms: Option<u64>,
    },
    /// Show a node's consensus status: role, term, leader, positions, peers and their lag.
    Status {
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        node: String,
    },
    /// Hand leadership to another voter (ask any node, as an org admin of its organisation).
    TransferLeader {
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        node: String,
        /// The node to lead, name@org.
        #[arg(long)]
        to: String,
        /// An access token from the node for one of its organisation's admins (`medledger
        /// token`), or `MEDLEDGER_TOKEN`.
        #[arg(long)]
        token: Option<String>,
    },
}

/// Creates a node's data directory from a genesis and the node's identity.
pub fn init_node(data_dir: &Path, genesis: &GenesisConfig, identity: &Identity) -> CliResult {
    if data_dir.join(LEDGER_FILE).exists() {
        return Err(format!("{} already holds a ledger", data_dir.display()));
    }
    identity
        .save(&data_dir.join(NODE_IDENTITY_FILE))
        .map_err(|e| e.to_string())?;
    let head = initialise(data_dir, genesis).map_err(|e| e.to_string())?;
    println!(
        "node {} initialised in {} (genesis block {})",
        identity.id,
        data_dir.display(),
        head.block_hash
    );
    Ok(())
}

pub fn node(command: NodeCommand) -> CliResult {
    match command {
        NodeCommand::Init {
            data_dir,
            genesis,
            identity,
        } => {
            let text = std::fs::read_to_string(&genesis)
                .map_err(|e| format!("{}: {e}", genesis.display()))?;
            let config: GenesisConfig =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", genesis.display()))?;
            init_node(&data_dir, &config, &load(&identity)?)
        }
        NodeCommand::Run {
            config: Some(config),
            ..
        } => {
            let config = NodeConfig::load(&config).map_err(|e| e.to_string())?;
            let node = node_runner::start_member(&config)?;
            println!(
                "node {} serving its API on {} and its peers on {}",
                node.ledger.node_id(),
                node.api_url,
                node.peer_addr
            );
            let fatal = wait_for_interrupt_or(|| node.ledger.fatal());
            drop(node);
            match fatal {
                Some(reason) => Err(format!("the node stopped: {reason}")),
                None => Ok(()),
            }
        }
        NodeCommand::Run {
            data_dir,
            listen,
            batch_delay_ms,
            ..
        } => {
            let data_dir = data_dir.ok_or("--data-dir or --config is required")?;
            let config = OrderingConfig {
                batch_delay_ms: batch_delay_ms.unwrap_or(0),
                ..OrderingConfig::default()
            };
            let listen = listen.unwrap_or_else(|| "127.0.0.1:7400".into());
            let node = node_runner::start(&data_dir, &listen, config)?;
            println!("node {} serving on {}", node.ledger.node_id(), node.url);
            wait_for_interrupt();
            drop(node);
            Ok(())
        }
        NodeCommand::Status { node } => {
            let status: Value = Client::new(&node)
                .get("/v1/status")
                .map_err(|e| e.to_string())?;
            print_json(&status);
            Ok(())
        }
        NodeCommand::TransferLeader { node, to, token } => {
            let answer: Value = Client::with_token(&node, &crate::records_cli::token_of(token)?)
                .post(
                    "/v1/consensus/transfer-leader",
                    &serde_json::json!({ "to": to }),
                )
                .map_err(|e| e.to_string())?;
            print_json(&answer);
            Ok(())
        }
    }
}

/// Blocks until Ctrl-C or until `stopped` names a reason; returns that reason.
pub fn wait_for_interrupt_or(stopped: impl Fn() -> Option<String>) -> Option<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a signal runtime");
    runtime.block_on(async {
        let interrupted = tokio::signal::ctrl_c();
        tokio::pin!(interrupted);
        loop {
            tokio::select! {
                _ = &mut interrupted => return None,
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                    if let Some(reason) = stopped() {
                        return Some(reason);
                    }
                }
            }
        }
    })
}

/// Blocks until Ctrl-C.
pub fn wait_for_interrupt() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a signal runtime");
    let _ = runtime.block_on(tokio::signal::ctrl_c());
}

// ---- transactions -------------------------------------------------------------------

#[derive(Args)]
pub struct TxArgs {
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    node: String,
    /// The signer's identity file.
    #[arg(long = "as")]
    signer: PathBuf,
    #[command(subcommand)]
    command: TxCommand,
}

#[derive(Args)]
pub struct ScopeArgs {
    /// Comma-separated FHIR resource types.
    #[arg(long)]
    types: Option<String>,
    /// Comma-separated categories: conditions, diagnostics, medications, documents, encounters, financial.
    #[arg(long)]
    categories: Option<String>,
    /// Comma-separated: read, write, search.
    #[arg(long, default_value = "read")]
    actions: String,
}

impl ScopeArgs {
    fn scope(&self) -> Result<(Scope, Vec<Action>), String> {
        let scope = Scope {
            resource_types: words(&self.types),
            categories: parse_list::<Category>(&self.categories)?,
        };
        Ok((scope, parse_list(&Some(self.actions.clone()))?))
    }
}

#[derive(Subcommand)]
pub enum TxCommand {
    /// Propose admitting an organisation created with `consortium add-org`.
    ProposeAdmit {
        #[arg(long)]
        org_kind: String,
        /// The new organisation's CA identity file.
        #[arg(long)]
        ca: PathBuf,
        /// The new organisation's admin identity file.
        #[arg(long)]
        admin: PathBuf,
    },
    /// Propose suspending, reinstating or removing a member.
    Propose {
        /// suspend_org, reinstate_org or remove_org.
        #[arg(long)]
        action: String,
        #[arg(long)]
        org: String,
    },
    Vote {
        #[arg(long)]
        proposal: u64,
        #[arg(long)]
        reject: bool,
    },
    /// Enroll a user or node of the signer's organisation.
    Enroll {
        #[arg(long)]
        user: PathBuf,
    },
    RevokeUser {
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "left_organisation")]
        reason: String,
    },
    RegisterPatient,
    /// Publish the signer's encryption key (a patient's own, or an admin's or node's for the
    /// organisation); with --rotate, first add a fresh key pair to the identity file.
    /// Older pairs stay in the file: versions wrapped for them still open.
    SetEncryptionKey {
        #[arg(long)]
        rotate: bool,
    },
    /// Grant a consent: grantee `user:NAME@ORG`, `role:ORG:ROLE` or `org:ORG`.
    Grant {
        #[arg(long)]
        grantee: String,
        #[command(flatten)]
        scope: ScopeArgs,
        #[arg(long, default_value = "treatment")]
        purposes: String,
        #[arg(long)]
        expires_in_hours: Option<u64>,
    },
    Revoke {
        #[arg(long)]
        consent: String,
    },
    Request {
        #[arg(long)]
        patient: String,
        #[command(flatten)]
        scope: ScopeArgs,
        #[arg(long, default_value = "treatment")]
        purpose: String,
    },
    Approve {
        #[arg(long)]
        request: String,
        #[arg(long)]
        expires_in_hours: Option<u64>,
    },
    Deny {
        #[arg(long)]
        request: String,
    },
    BreakGlass {
        #[arg(long)]
        patient: String,
        /// unconscious_patient, life_threatening, patient_unable_to_consent or other.
        #[arg(long)]
        reason: String,
        /// Free text kept off the ledger; only its salted hash is recorded.
        #[arg(long)]
        justification: String,
        #[arg(long, default_value_t = 60)]
        minutes: u64,
    },
    ReviewBreakGlass {
        #[arg(long)]
        id: String,
        /// justified or unjustified.
        #[arg(long)]
        verdict: String,
    },
    /// As a member's node, record an access attempt by one of its users; the ledger decides it.
    LogAccess {
        #[arg(long)]
        actor: String,
        #[arg(long)]
        patient: String,
        #[arg(long, default_value = "read")]
        action: String,
        #[arg(long)]
        records: Option<String>,
        #[arg(long)]
        types: Option<String>,
        /// For a search: the custodians to be asked (comma-separated).
        #[arg(long)]
        custodians: Option<String>,
        #[arg(long, default_value = "treatment")]
        purpose: String,
        /// unauthenticated, not_found or invalid_request.
        #[arg(long)]
        custodian_denial: Option<String>,
        /// The request as received; only its salted hash is recorded.
        #[arg(long, default_value = "")]
        query: String,
    },
}

/// A salted commitment to text that stays off the ledger.
pub fn commit_text(text: &str) -> Hash {
    let mut salt = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .expect("system randomness");
    Hash::digest_parts(&[&salt, text.as_bytes()])
}

fn parse_grantee(text: &str) -> Result<Grantee, String> {
    let parts: Vec<&str> = text.split(':').collect();
    match parts.as_slice() {
        ["user", user] => Ok(Grantee::User {
            user: user.to_string(),
        }),
        ["role", org, role] => Ok(Grantee::Role {
            org: org.to_string(),
            role: parse_word(role)?,
        }),
        ["org", org] => Ok(Grantee::Org {
            org: org.to_string(),
        }),
        _ => Err(format!(
            "grantee {text:?}: expected user:NAME@ORG, role:ORG:ROLE or org:ORG"
        )),
    }
}

fn hours_from_now(hours: Option<u64>) -> Option<u64> {
    hours.map(|h| now_ms() + h * 60 * 60 * 1000)
}

fn parse_id(text: &str) -> Result<Hash, String> {
    Hash::from_hex(text).map_err(|e| format!("{text:?}: {e}"))
}

/// Builds the body of a transaction from its command.
fn tx_body(command: TxCommand, signer: &Identity) -> Result<TxBody, String> {
    Ok(match command {
        TxCommand::ProposeAdmit {
            org_kind,
            ca,
            admin,
        } => {
            let ca = load(&ca)?;
            let certificate = ca
                .certificate
                .as_ref()
                .ok_or("the CA identity lacks its certificate")?;
            let org = certificate.info().map_err(|e| e.to_string())?.organization;
            TxBody::ProposeGovernance {
                action: GovernanceAction::AdmitOrg {
                    org,
                    org_kind: parse_word(&org_kind)?,
                    ca_certificate: base64url(&certificate.der),
                    admin_certificate: load(&admin)?
                        .certificate_text()
                        .ok_or("the admin lacks a certificate")?,
                },
            }
        }
        TxCommand::Propose { action, org } => TxBody::ProposeGovernance {
            action: match action.as_str() {
                "suspend_org" => GovernanceAction::SuspendOrg { org },
                "reinstate_org" => GovernanceAction::ReinstateOrg { org },
                "remove_org" => GovernanceAction::RemoveOrg { org },
                other => return Err(format!("unknown governance action {other:?}")),
            },
        },
        TxCommand::Vote { proposal, reject } => TxBody::VoteGovernance {
            proposal_id: proposal,
            approve: !reject,
        },
        TxCommand::Enroll { user } => TxBody::EnrollUser {
            certificate: load(&user)?
                .certificate_text()
                .ok_or("the user lacks a certificate")?,
        },
        TxCommand::RevokeUser { user, reason } => TxBody::RevokeUser {
            user,
            reason: parse_word::<RevocationReason>(&reason)?,
        },
        TxCommand::RegisterPatient => TxBody::RegisterPatient {
            public_key: signer.key.public_key(),
        },
        TxCommand::SetEncryptionKey { .. } => TxBody::SetEncryptionKey {
            public_key: signer
                .encryption_key()
                .ok_or("the identity file holds no encryption key: use --rotate to add one")?
                .public_key()
                .to_base64url(),
        },
        TxCommand::Grant {
            grantee,
            scope,
            purposes,
            expires_in_hours,
        } => {
            let (scope, actions) = scope.scope()?;
            TxBody::Grant {
                grantee: parse_grantee(&grantee)?,
                scope,
                actions,
                purposes: parse_list(&Some(purposes))?,
                expires_at_ms: hours_from_now(expires_in_hours),
            }
        }
        TxCommand::Revoke { consent } => TxBody::Revoke {
            grant_id: parse_id(&consent)?,
        },
        TxCommand::Request {
            patient,
            scope,
            purpose,
        } => {
            let (scope, actions) = scope.scope()?;
            TxBody::RequestAccess {
                patient,
                scope,
                actions,
                purpose: parse_word(&purpose)?,
            }
        }
        TxCommand::Approve {
            request,
            expires_in_hours,
        } => TxBody::ApproveRequest {
            request_id: parse_id(&request)?,
            expires_at_ms: hours_from_now(expires_in_hours),
        },
        TxCommand::Deny { request } => TxBody::DenyRequest {
            request_id: parse_id(&request)?,
        },
        TxCommand::BreakGlass {
            patient,
            reason,
            justification,
            minutes,
        } => TxBody::BreakGlass {
            patient,
            reason: parse_word::<EmergencyReason>(&reason)?,
            justification_commitment: commit_text(&justification),
            duration_ms: minutes * 60 * 1000,
        },
        TxCommand::ReviewBreakGlass { id, verdict } => TxBody::ReviewBreakGlass {
            break_glass_id: parse_id(&id)?,
            verdict: parse_word::<BreakGlassVerdict>(&verdict)?,
        },
        TxCommand::LogAccess {
            actor,
            patient,
            action,
            records,
            types,
            custodians,
            purpose,
            custodian_denial,
            query,
        } => TxBody::LogAccess {
            actor,
            patient,
            action: parse_word(&action)?,
            records: words(&records),
            resource_types: words(&types),
            custodians: words(&custodians),
            purpose: parse_word::<Purpose>(&purpose)?,
            custodian_denial: custodian_denial
                .as_deref()
                .map(parse_word::<DenialReason>)
                .transpose()?,
            query_commitment: commit_text(&query),
            answer_commitment: commit_text(""),
        },
    })
}

pub fn tx(args: TxArgs) -> CliResult {
    let mut signer = load(&args.signer)?;
    if let TxCommand::SetEncryptionKey { rotate: true } = &args.command {
        signer.rotate_encryption_key();
        signer.save(&args.signer).map_err(|e| e.to_string())?;
    }
    let body = tx_body(args.command, &signer)?;
    let client = Client::new(&args.node);
    let response = client.send(&signer, body).map_err(|e| e.to_string())?;
    print_submit(&response);
    Ok(())
}

fn print_submit(response: &SubmitResponse) {
    print_json(&serde_json::json!({
        "tx_id": response.tx_id,
        "height": response.height,
        "leaf_index": response.leaf_index,
        "outcome": response.outcome,
        "tree_head": response.tree_head.tree_head,
    }));
}

// ---- queries ------------------------------------------------------------------------

#[derive(Args)]
pub struct AccessArgs {
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    node: String,
    #[arg(long)]
    actor: String,
    #[arg(long, default_value = "read")]
    action: String,
    #[arg(long, default_value = "treatment")]
    purpose: String,
    /// `custodian/record_id`.
    #[arg(long)]
    record: Option<String>,
    #[arg(long)]
    patient: Option<String>,
    #[arg(long)]
    resource_type: Option<String>,
}

pub fn access(args: AccessArgs) -> CliResult {
    let mut path = format!(
        "/v1/access-decision?actor={}&action={}&purpose={}",
        args.actor, args.action, args.purpose
    );
    for (name, value) in [
        ("record", &args.record),
        ("patient", &args.patient),
        ("resource_type", &args.resource_type),
    ] {
        if let Some(value) = value {
            path.push_str(&format!("&{name}={value}"));
        }
    }
    query(&args.node, &path)
}

#[derive(Args)]
pub struct AuditArgs {
    #[arg(long, default_value = "http://127.0.0.1:7400")]
    node: String,
    /// patient, actor or record.
    kind: String,
    /// A pseudonym, `name@org`, or `custodian/record_id`.
    id: String,
    #[arg(long)]
    after: Option<u64>,
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

pub fn audit(args: AuditArgs) -> CliResult {
    let base = match args.kind.as_str() {
        "patient" => "patients",
        "actor" => "actors",
        "record" => "records",
        other => {
            return Err(format!(
                "audit kind {other:?}: expected patient, actor or record"
            ))
        }
    };
    let mut path = format!("/v1/audit/{base}/{}?limit={}", args.id, args.limit);
    if let Some(after) = args.after {
        path.push_str(&format!("&after={after}"));
    }
    let events: Vec<AuditEvent> = Client::new(&args.node)
        .get(&path)
        .map_err(|e| e.to_string())?;
    for event in &events {
        say(&describe_event(event));
    }
    Ok(())
}

/// One line per audit event: when, what, who, and the decision.
pub fn describe_event(event: &AuditEvent) -> String {
    let mut line = format!(
        "#{:<5} h{:<4} {:<18} by {}",
        event.leaf_index, event.height, event.kind, event.signer
    );
    if let Some(actor) = event.actor.as_ref().filter(|a| **a != event.signer) {
        line.push_str(&format!(" (actor {actor})"));
    }
    if !event.records.is_empty() {
        line.push_str(&format!(" records {}", event.records.join(",")));
    }
    if let Some(decision) = &event.decision {
        let text = serde_json::to_value(decision).unwrap_or_default();
        line.push_str(&format!(
            " → {}",
            text["decision"].as_str().unwrap_or("?").to_uppercase()
        ));
        if let Some(basis) = text["basis"].as_str().or(text["reason"].as_str()) {
            line.push_str(&format!(" ({basis})"));
        }
    }
    if event.flagged {
        line.push_str(" [FLAGGED FOR REVIEW]");
    }
    if let Some(code) = &event.rejected {
        line.push_str(&format!(" → REJECTED ({code})"));
    }
    line
}

pub fn contributions(node: &str) -> CliResult {
    let all: Vec<Contribution> = Client::new(node)
        .get("/v1/contributions")
        .map_err(|e| e.to_string())?;
    for line in contribution_lines(&all) {
        println!("{line}");
    }
    Ok(())
}

/// A table of contributions, one organisation per line.
pub fn contribution_lines(all: &[Contribution]) -> Vec<String> {
    let mut lines = vec![format!(
        "{:<14} {:>10} {:>12} {:>15}",
        "organisation", "blocks_led", "records_held", "accesses_served"
    )];
    for c in all {
        lines.push(format!(
            "{:<14} {:>10} {:>12} {:>15}",
            c.org, c.blocks_led, c.records_held, c.accesses_served
        ));
    }
    lines
}

pub fn query(node: &str, path: &str) -> CliResult {
    let value: Value = Client::new(node).get(path).map_err(|e| e.to_string())?;
    print_json(&value);
    Ok(())
}

// ---- proofs and verification --------------------------------------------------------

#[derive(Subcommand)]
pub enum ProofCommand {
    /// Verify that a transaction is in the log the node's signed tree head commits to, and
    /// optionally that the log only grew since a tree head saved earlier.
    Verify {
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        node: String,
        #[arg(long)]
        tx: String,
        /// The consortium root certificate (PEM) you trust.
        #[arg(long)]
        root_cert: PathBuf,
        /// A signed tree head saved earlier: the log must extend it.
        #[arg(long)]
        since: Option<PathBuf>,
        /// Save the tree head used, for a later --since.
        #[arg(long)]
        save_head: Option<PathBuf>,
    },
}

/// What `proof verify` established.
pub struct ProofReport {
    pub leaf_index: u64,
    pub tree_head: SignedTreeHead,
}

/// Fetches a tree head and the transaction's inclusion proof, and checks both against the
/// trusted root; with `since`, also checks the log extends that earlier head.
pub fn verify_transaction_proof(
    client: &Client,
    tx_id: &Hash,
    root: &IssuedCert,
    since: Option<&SignedTreeHead>,
) -> Result<ProofReport, String> {
    let chain_id = root.info().map_err(|e| e.to_string())?.organization;
    let found: Value = client
        .get(&format!("/v1/transactions/{tx_id}"))
        .map_err(|e| e.to_string())?;
    let leaf_index = found["leaf_index"]
        .as_u64()
        .ok_or("the node gave no leaf index")?;
    let head: SignedTreeHead = client.get("/v1/tree-head").map_err(|e| e.to_string())?;
    verify_tree_head(&head, &root.der, &chain_id).map_err(|e| format!("tree head: {e}"))?;
    let size = head.tree_head.log_size;
    let proof: InclusionProof = client
        .get(&format!(
            "/v1/proofs/inclusion?leaf_index={leaf_index}&log_size={size}"
        ))
        .map_err(|e| e.to_string())?;
    if proof.log_size != size || proof.leaf_index != leaf_index {
        return Err("the proof is for another position or size than asked".into());
    }
    let tx: SignedTx =
        serde_json::from_value(proof.leaf["tx"].clone()).map_err(|e| format!("leaf: {e}"))?;
    if tx.id().map_err(|e| e.to_string())? != *tx_id {
        return Err("the proven leaf holds another transaction".into());
    }
    verify_inclusion(&proof, &head.tree_head.log_root).map_err(|e| format!("inclusion: {e}"))?;
    if let Some(old) = since {
        verify_tree_head(old, &root.der, &chain_id)
            .map_err(|e| format!("earlier tree head: {e}"))?;
        let old_size = old.tree_head.log_size;
        let consistency: ConsistencyProof = client
            .get(&format!(
                "/v1/proofs/consistency?old_size={old_size}&new_size={size}"
            ))
            .map_err(|e| e.to_string())?;
        medledger_core::merkle::verify_consistency(
            old_size,
            &old.tree_head.log_root,
            size,
            &head.tree_head.log_root,
            &consistency.path,
        )
        .map_err(|e| format!("consistency: {e}"))?;
    }
    Ok(ProofReport {
        leaf_index,
        tree_head: head,
    })
}

pub fn proof(command: ProofCommand) -> CliResult {
    match command {
        ProofCommand::Verify {
            node,
            tx,
            root_cert,
            since,
            save_head,
        } => {
            let root = read_root(&root_cert)?;
            let since: Option<SignedTreeHead> = since.as_deref().map(read_json).transpose()?;
            let report = verify_transaction_proof(
                &Client::new(&node),
                &parse_id(&tx)?,
                &root,
                since.as_ref(),
            )?;
            let head = &report.tree_head.tree_head;
            println!(
                "verified: tx {tx} is leaf {} of the log of size {} with root {}, signed by {}",
                report.leaf_index, head.log_size, head.log_root, report.tree_head.signer
            );
            if since.is_some() {
                println!("verified: the log extends the earlier tree head");
            }
            if let Some(path) = save_head {
                std::fs::write(
                    &path,
                    serde_json::to_string_pretty(&report.tree_head).expect("heads encode"),
                )
                .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            Ok(())
        }
    }
}

pub fn verify(data_dir: &Path, tree_head: Option<&Path>, root_cert: Option<&Path>) -> CliResult {
    let path = data_dir.join(LEDGER_FILE);
    if !path.exists() {
        return Err(format!("{} does not exist", path.display()));
    }
    let store = Store::open_copy(&path).map_err(|e| format!("cannot open the store: {e}"))?;
    let report =
        medledger_node::verify::verify_store(&store).map_err(|failure| match failure.height() {
            Some(height) => format!("verification FAILED: first bad block is {height}: {failure}"),
            None => format!("verification FAILED: {failure}"),
        })?;
    println!(
        "ledger verified: {} blocks, {} transactions ({} committed, {} rejected), {} state entries; head {} at height {}, log size {}, root {}",
        report.blocks,
        report.txs,
        report.committed,
        report.rejected,
        report.state_entries,
        report.head.block_hash,
        report.head.height,
        report.head.log_size,
        report.head.log_root
    );
    if let (Some(tree_head), Some(root_cert)) = (tree_head, root_cert) {
        let head: SignedTreeHead = read_json(tree_head)?;
        let root = read_root(root_cert)?;
        let chain_id = root.info().map_err(|e| e.to_string())?.organization;
        verify_tree_head(&head, &root.der, &chain_id)
            .map_err(|e| format!("verification FAILED: the tree head: {e}"))?;
        let size = head.tree_head.log_size;
        if size > report.head.log_size {
            return Err(format!(
                "verification FAILED: {} signed a log of {size} entries, the ledger holds {}: it was rolled back",
                head.signer, report.head.log_size
            ));
        }
        // The stored Merkle nodes equal the re-executed ones (checked above), so the root at
        // the signed size is the root of the ledger's own first `size` entries.
        let snapshot = store.snapshot().map_err(|e| e.to_string())?;
        let root_at_size =
            medledger_core::merkle::root(&snapshot, size).map_err(|e| e.to_string())?;
        if root_at_size != head.tree_head.log_root {
            return Err(format!(
                "verification FAILED: the ledger's first {size} entries are not the log {} signed: history was rewritten",
                head.signer
            ));
        }
        println!(
            "ledger matches the tree head signed by {} at log size {size}",
            head.signer
        );
    }
    Ok(())
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_root(path: &Path) -> Result<IssuedCert, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    IssuedCert::from_pem(&text).map_err(|e| format!("{}: {e}", path.display()))
}

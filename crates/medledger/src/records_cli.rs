//! `medledger record …` and `medledger store check`: records through a node, and the
//! offline check of a custodian's record store against its ledger.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use medledger_core::model::Purpose;
use medledger_node::api::SubmitResponse;
use medledger_node::consortium::Identity;
use medledger_node::records::check::{check_store, CheckReport};
use medledger_node::records::service::{
    AttachmentUpload, History, OpenedVersion, PrepareRequest, Prepared,
};
use medledger_node::store::Store;
use serde_json::{json, Value};

use crate::client::Client;
use crate::commands::parse_word;

type CliResult = Result<(), String>;

#[derive(Subcommand)]
pub enum RecordCommand {
    /// Add a version of a record from a FHIR R4 JSON file: the node checks, seals and
    /// stores it; the author signs the index entry; the answer comes after its commit.
    Add {
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        node: String,
        /// The author's identity file (a clinician, nurse, radiologist or lab technician
        /// of the node's organisation).
        #[arg(long)]
        author: PathBuf,
        #[arg(long)]
        resource: PathBuf,
        /// The record to add a version to (default: the resource's id, or a new id).
        #[arg(long)]
        record_id: Option<String>,
        /// An attachment as FILE:MEDIA-TYPE (e.g. report.pdf:application/pdf); repeatable.
        #[arg(long = "attach")]
        attachments: Vec<String>,
        /// An access token from the node for the acting user (`medledger token`), or
        /// `MEDLEDGER_TOKEN`.
        #[arg(long)]
        token: Option<String>,
    },
    /// Read a record version from its custodian (any member's node), checked against the
    /// ledger and decrypted; prints the resource.
    Read {
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        node: String,
        /// An access token from the node for the reading user (of the node's organisation) (`medledger token`), or
        /// `MEDLEDGER_TOKEN`.
        #[arg(long)]
        token: Option<String>,
        #[arg(long)]
        custodian: String,
        #[arg(long)]
        record_id: String,
        #[arg(long)]
        version: Option<u64>,
        #[arg(long, default_value = "treatment")]
        purpose: String,
        /// Fetch the attachments too and write them into this directory.
        #[arg(long)]
        attachments_dir: Option<PathBuf>,
    },
    /// A patient's records at every custodian, as far as the actor may see them.
    History {
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        node: String,
        /// An access token from the node for the acting user (`medledger token`), or
        /// `MEDLEDGER_TOKEN`.
        #[arg(long)]
        token: Option<String>,
        #[arg(long)]
        patient: String,
        #[arg(long, default_value = "treatment")]
        purpose: String,
        /// Print the resources as JSON instead of one line per version.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Check every blob of a stopped node's record store against its content id and the
    /// ledger: each indexed version present, intact, opening under the organisation's key
    /// and matching its commitment; blobs no entry names are reported.
    Check(StoreCheckArgs),
}

#[derive(Args)]
pub struct StoreCheckArgs {
    /// The node's data directory (its ledger, and its embedded record store).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The node's identity file (for its organisation's encryption keys).
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// The PostgreSQL connection string, when the node keeps its records there.
    #[arg(long)]
    pub record_store: Option<String>,
}

pub fn record(command: RecordCommand) -> CliResult {
    match command {
        RecordCommand::Add {
            node,
            author,
            resource,
            record_id,
            attachments,
            token,
        } => add(
            &Client::with_token(&node, &token_of(token)?),
            &author,
            &resource,
            record_id,
            &attachments,
        ),
        RecordCommand::Read {
            node,
            token,
            custodian,
            record_id,
            version,
            purpose,
            attachments_dir,
        } => {
            let client = Client::with_token(&node, &token_of(token)?);
            let opened: OpenedVersion = client
                .post(
                    &format!("/v1/records/{custodian}/{record_id}/read"),
                    &json!({
                        "version": version,
                        "purpose": parse_word::<Purpose>(&purpose)?,
                        "attachments": attachments_dir.is_some(),
                    }),
                )
                .map_err(|e| e.to_string())?;
            if let Some(dir) = attachments_dir {
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                for attachment in &opened.attachments {
                    let bytes = medledger_core::crypto::from_base64url(&attachment.data)
                        .map_err(|e| e.to_string())?;
                    let path = dir.join(&attachment.cid);
                    std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
                    eprintln!("attachment written to {}", path.display());
                }
            }
            eprintln!(
                "{}/{} version {} ({}), author {}, served under access entry {}",
                opened.custodian,
                opened.record_id,
                opened.version,
                opened.resource_type,
                opened.author,
                opened.access_tx
            );
            println!(
                "{}",
                serde_json::to_string_pretty(&opened.resource).expect("values encode")
            );
            Ok(())
        }
        RecordCommand::History {
            node,
            token,
            patient,
            purpose,
            json,
        } => {
            let client = Client::with_token(&node, &token_of(token)?);
            let history: History = client
                .post(
                    &format!("/v1/patients/{patient}/history"),
                    &json!({"purpose": parse_word::<Purpose>(&purpose)?}),
                )
                .map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&history).expect("values encode")
                );
                return Ok(());
            }
            for version in &history.versions {
                println!(
                    "{}/{} v{} {} by {}",
                    version.custodian,
                    version.record_id,
                    version.version,
                    version.resource_type,
                    version.author
                );
            }
            println!(
                "{} versions; access entry {} ({}); {} failures",
                history.versions.len(),
                history.access.tx_id,
                if history.access.decision.is_granted() {
                    "granted"
                } else {
                    "denied"
                },
                history.failures.len()
            );
            for failure in &history.failures {
                println!("  failure: {} ({})", failure.message, failure.code);
            }
            Ok(())
        }
    }
}

/// The access token given, or `MEDLEDGER_TOKEN`.
pub fn token_of(given: Option<String>) -> Result<String, String> {
    given
        .or_else(|| std::env::var("MEDLEDGER_TOKEN").ok())
        .filter(|token| !token.trim().is_empty())
        .ok_or_else(|| {
            "an access token is needed (--token or MEDLEDGER_TOKEN): get one with `medledger token`"
                .to_string()
        })
}

fn add(
    client: &Client,
    author: &Path,
    resource: &Path,
    record_id: Option<String>,
    attachments: &[String],
) -> CliResult {
    let author = Identity::load(author).map_err(|e| e.to_string())?;
    let text = std::fs::read(resource).map_err(|e| format!("{}: {e}", resource.display()))?;
    let resource: Value =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", resource.display()))?;
    let attachments = attachments
        .iter()
        .map(|spec| {
            let (file, content_type) = spec
                .rsplit_once(':')
                .ok_or_else(|| format!("{spec:?}: expected FILE:MEDIA-TYPE"))?;
            let data = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
            Ok(AttachmentUpload {
                content_type: content_type.to_string(),
                title: Path::new(file)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned()),
                data: medledger_core::crypto::base64url(&data),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let prepared: Prepared = client
        .post(
            "/v1/records",
            &PrepareRequest {
                resource,
                record_id,
                attachments,
            },
        )
        .map_err(|e| e.to_string())?;
    let committed: SubmitResponse = client
        .send(&author, prepared.body.clone())
        .map_err(|e| e.to_string())?;
    if !committed.outcome.is_committed() {
        return Err(format!(
            "the ledger refused the version: {}",
            serde_json::to_string(&committed.outcome).expect("values encode")
        ));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "record_id": prepared.record_id,
            "version": prepared.version,
            "cid": prepared.cid,
            "attachments": prepared.attachments,
            "tx_id": committed.tx_id,
            "height": committed.height,
            "leaf_index": committed.leaf_index,
        }))
        .expect("values encode")
    );
    Ok(())
}

pub fn store(command: StoreCommand) -> CliResult {
    let StoreCommand::Check(args) = command;
    let report = run_check(&args)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("values encode")
    );
    if report.problems.is_empty() {
        println!(
            "store check: {} versions and {} blobs intact",
            report.versions_checked, report.blobs_seen
        );
        Ok(())
    } else {
        Err(format!(
            "store check: {} problems (listed above)",
            report.problems.len()
        ))
    }
}

pub fn run_check(args: &StoreCheckArgs) -> Result<CheckReport, String> {
    let identity_path = args
        .identity
        .clone()
        .unwrap_or_else(|| args.data_dir.join(crate::node_runner::NODE_IDENTITY_FILE));
    let identity = Identity::load(&identity_path).map_err(|e| e.to_string())?;
    let org = medledger_core::identity::split_user_id(&identity.id)
        .map(|(org, _)| org.to_string())
        .ok_or("the identity is not a member's")?;
    let ledger = Store::open(&args.data_dir).map_err(|e| {
        format!(
            "{}: {e} (stop the node first: its store is open)",
            args.data_dir.display()
        )
    })?;
    let records =
        crate::node_runner::open_record_store(&args.data_dir, args.record_store.as_deref())?;
    check_store(&ledger, records.as_ref(), &org, &identity.encryption_keys)
        .map_err(|e| e.to_string())
}

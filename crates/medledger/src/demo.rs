//! `medledger demo`: a local consortium, synthetic patients, and a scenario that shows
//! consent, a denied access, a granted access, a revoke and a break-glass, all on the ledger.
//!
//! The demo plays every role through the node's HTTP API, as separate clients would: the
//! organisations' admins, clinicians, a lab technician, an auditor, the custodians' software
//! and the patients. The synthetic names and birth dates exist only in this program and in
//! the encrypted records; the ledger sees pseudonyms, content ids and commitments.

use std::path::PathBuf;

use medledger_core::audit::SignedTreeHead;
use medledger_core::contracts::TxOutcome;
use medledger_core::identity::{OrgKind, Role};
use medledger_core::model::{
    Action, AuditEvent, BreakGlassVerdict, Category, EmergencyReason, Grantee, Purpose, Scope,
};
use medledger_core::tx::TxBody;
use medledger_node::api::SubmitResponse;
use medledger_node::consortium::Identity;
use medledger_node::ledger::now_ms;
use medledger_node::pki::IssuedCert;
use medledger_node::records::service::{History, OpenedVersion, PrepareRequest, Prepared};
use serde_json::json;

use crate::client::{Client, ClientError, TX_LIFETIME_MS};
use crate::commands::{commit_text, describe_event, validity_days, verify_transaction_proof};
use crate::local::{create_local, free_base_port, start_all, wait_for_agreement};

pub const CHAIN_ID: &str = "medledger-demo";
/// Member nodes the demo runs (the regulator is a member without a node).
const NODES: usize = 3;

/// The demo's synthetic patients: (name, birth date). Never on the ledger.
pub const SYNTHETIC_PATIENTS: [(&str, &str); 2] = [
    ("Maria Synthetic", "1961-04-12"),
    ("Jonas Example", "1984-11-30"),
];

struct Story {
    client: Client,
    /// Staff who read and write records, each with their node and an access token from it
    /// (the record endpoints act only for the user a token names).
    staff: Vec<(String, Client)>,
    step: usize,
}

impl Story {
    fn chapter(&mut self, title: &str) {
        self.step += 1;
        println!("\n{}. {title}", self.step);
    }

    fn send(&self, who: &Identity, body: TxBody) -> Result<SubmitResponse, String> {
        self.client.send(who, body).map_err(|e| e.to_string())
    }

    /// Sends a transaction that must commit.
    fn commit(&self, who: &Identity, body: TxBody, what: &str) -> Result<SubmitResponse, String> {
        let response = self.send(who, body)?;
        match &response.outcome {
            TxOutcome::Committed { .. } => {
                println!(
                    "   ✓ {what}  [tx {} · block {}]",
                    short(&response.tx_id.to_hex()),
                    response.height
                );
                Ok(response)
            }
            TxOutcome::Rejected { rejection } => {
                Err(format!("{what}: the ledger refused it: {rejection}"))
            }
        }
    }

    /// `who`'s own node, acting for them with their token.
    fn as_staff(&self, who: &Identity) -> Result<&Client, String> {
        self.staff
            .iter()
            .find(|(id, _)| *id == who.id)
            .map(|(_, client)| client)
            .ok_or_else(|| format!("{} has no login", who.id))
    }

    /// A user asks their own organisation's node for a record held by `custodian`. That
    /// node commits the access entry; the custodian serves only under it, once granted; the
    /// reader's node checks what arrives against its own copy of the ledger and decrypts it.
    /// Returns the access entry's id and whether it was granted.
    fn read(
        &self,
        actor: &Identity,
        custodian: &str,
        record_id: &str,
        purpose: Purpose,
    ) -> Result<(medledger_core::Hash, bool), String> {
        let purpose_text = serde_json::to_value(purpose).unwrap_or_default();
        let answer: Result<OpenedVersion, ClientError> = self.as_staff(actor)?.post(
            &format!("/v1/records/{custodian}/{record_id}/read"),
            &json!({"purpose": purpose}),
        );
        match answer {
            Ok(opened) => {
                println!(
                    "   ✓ {} reads {custodian}/{record_id} for {}: GRANTED; its node checked the CID, the author's signature and the commitment, then decrypted {} v{} ({} bytes)  [access entry {}]",
                    actor.id,
                    purpose_text.as_str().unwrap_or_default(),
                    opened.resource_type,
                    opened.version,
                    serde_json::to_vec(&opened.resource).map(|b| b.len()).unwrap_or(0),
                    short(&opened.access_tx.to_hex())
                );
                Ok((opened.access_tx, true))
            }
            Err(ClientError::Api {
                code,
                message,
                tx_id: Some(tx_id),
                ..
            }) if code == "access_denied" => {
                println!(
                    "   ✗ {} reads {custodian}/{record_id} for {}: DENIED by the ledger ({}); nothing left {custodian}  [access entry {}]",
                    actor.id,
                    purpose_text.as_str().unwrap_or_default(),
                    message
                        .split_once('(')
                        .and_then(|(_, rest)| rest.split_once(')'))
                        .map(|(reason, _)| reason)
                        .unwrap_or("denied"),
                    short(&tx_id)
                );
                let id = medledger_core::Hash::from_hex(&tx_id).map_err(|e| format!("{e:?}"))?;
                Ok((id, false))
            }
            Err(error) => Err(error.to_string()),
        }
    }

    /// An author's node checks, seals and stores a FHIR resource; the author signs the
    /// version's index entry, acknowledged once committed.
    fn write_record(
        &self,
        author: &Identity,
        record_id: &str,
        resource: serde_json::Value,
    ) -> Result<SubmitResponse, String> {
        let (_, custodian) = author.id.split_once('@').ok_or("a member's id")?;
        let node = self.as_staff(author)?;
        let request = PrepareRequest {
            resource,
            record_id: Some(record_id.to_string()),
            attachments: Vec::new(),
        };
        // A node publishes its organisation's encryption key once it has joined; until
        // that is committed it cannot seal for its own organisation.
        let mut attempts = 0;
        let prepared: Prepared = loop {
            attempts += 1;
            match node.post("/v1/records", &request) {
                Err(ClientError::Api { code, .. })
                    if code == "no_encryption_key" && attempts < 100 =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(100))
                }
                answer => break answer.map_err(|e| e.to_string())?,
            }
        };
        let TxBody::CreateRecord { resource_type, .. } = &prepared.body else {
            return Err("the node prepared something else than a record version".into());
        };
        let what = format!(
            "{} adds {resource_type} {custodian}/{record_id} v{}: encrypted at {custodian}, key wrapped for {custodian} and the patient (ciphertext {})",
            author.id,
            prepared.version,
            short(&prepared.cid)
        );
        self.commit(author, prepared.body.clone(), &what)
    }
}

/// The organisation a running node belongs to.
fn org_of(running: &crate::node_runner::RunningMember) -> String {
    running
        .ledger
        .node_id()
        .split_once('@')
        .map(|(_, org)| org.to_string())
        .unwrap_or_default()
}

fn short(text: &str) -> String {
    text.chars().take(12).collect::<String>() + "…"
}

fn all_categories() -> Vec<Category> {
    vec![
        Category::Conditions,
        Category::Diagnostics,
        Category::Medications,
        Category::Documents,
        Category::Encounters,
    ]
}

pub fn run(once: bool, data_dir: Option<PathBuf>, listen: &str) -> Result<(), String> {
    let dir = data_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("medledger-demo-{}", std::process::id()))
    });
    if dir
        .read_dir()
        .is_ok_and(|mut entries| entries.next().is_some())
    {
        return Err(format!(
            "{} is not empty; give an empty or new --data-dir",
            dir.display()
        ));
    }
    println!(
        "medledger demo: a local consortium with synthetic patients (data in {})",
        dir.display()
    );
    let validity = validity_days(365);
    let orgs = [
        ("hospital-a", OrgKind::Hospital),
        ("hospital-b", OrgKind::Hospital),
        ("lab-x", OrgKind::Lab),
        ("regulator", OrgKind::Regulator),
    ];
    let port = listen
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .ok_or_else(|| format!("--listen {listen:?}: expected host:port"))?;
    // Port 0 (and --once) picks free ports, as tests and parallel runs need.
    let base_port = if once || port == 0 {
        free_base_port(NODES)?
    } else {
        port
    };
    let local = create_local(&dir, CHAIN_ID, &orgs, NODES, base_port, |_| {})?;
    let consortium = &local.consortium;
    let keys = &local.keys;
    let org = |id: &str| consortium.org(id).expect("a founding member");
    let nodes = start_all(&local.configs)?;
    for running in &nodes {
        println!(
            "node {} serving its API on {} and its peers on {} (mutual TLS)",
            running.ledger.node_id(),
            running.api_url,
            running.peer_addr
        );
    }
    let leader = nodes[0].node.status().leader.unwrap_or_default();
    println!("Raft elected {leader} to lead; every node executes every block itself");
    let node = &nodes[0];
    let node_dir = dir.join("nodes").join("hospital-a");
    let mut story = Story {
        client: Client::new(&node.api_url),
        staff: Vec::new(),
        step: 0,
    };
    let first_head: SignedTreeHead = story
        .client
        .get("/v1/tree-head")
        .map_err(|e| e.to_string())?;

    story.chapter("The consortium: four members, each with its own CA under the consortium root");
    for (id, kind) in orgs {
        println!("   {id} ({})", kind.as_str());
    }

    story.chapter("Each organisation's admin enrolls its staff (certificates with roles)");
    let issue = |org_id: &str, name: &str, role: Role| {
        org(org_id)
            .authority
            .issue(name, role, validity)
            .map_err(|e| e.to_string())
    };
    let alice = issue("hospital-a", "dr-alice", Role::Clinician)?;
    let bob = issue("hospital-b", "dr-bob", Role::Clinician)?;
    let carol = issue("lab-x", "tech-carol", Role::LabTechnician)?;
    let dan = issue("regulator", "auditor-dan", Role::Auditor)?;
    for (staff, org_id) in [
        (&alice, "hospital-a"),
        (&bob, "hospital-b"),
        (&carol, "lab-x"),
        (&dan, "regulator"),
    ] {
        let role = staff
            .certificate
            .as_ref()
            .and_then(|c| c.info().ok())
            .and_then(|i| i.role);
        story.commit(
            &org(org_id).admin,
            TxBody::EnrollUser {
                certificate: staff.certificate_text().expect("issued with a certificate"),
            },
            &format!(
                "{} enrolls {} as {}",
                org(org_id).admin.id,
                staff.id,
                role.map(|r| r.as_str()).unwrap_or("?")
            ),
        )?;
    }

    story.chapter("Patients register with their own keys; the ledger knows only pseudonyms");
    let maria = Identity::new_patient().map_err(|e| e.to_string())?;
    let jonas = Identity::new_patient().map_err(|e| e.to_string())?;
    // Kept so that, after the story, anyone can go on as these people with the CLI.
    let people = dir.join("keys").join("people");
    for (name, identity) in [
        ("dr-alice", &alice),
        ("dr-bob", &bob),
        ("tech-carol", &carol),
        ("auditor-dan", &dan),
        ("maria", &maria),
        ("jonas", &jonas),
    ] {
        identity
            .save(&people.join(format!("{name}.identity.json")))
            .map_err(|e| e.to_string())?;
    }
    // Logins at the nodes (password and one-time code), for the FHIR API and for the
    // record endpoints, which act only for the user an access token names.
    let node_dirs: Vec<(String, String, PathBuf)> = nodes
        .iter()
        .map(|running| {
            let org = org_of(running);
            let data_dir = dir.join("nodes").join(&org);
            (org, running.api_url.clone(), data_dir)
        })
        .collect();
    let login = |who: &Identity, file: &str, org: &str| {
        (
            who.id.clone(),
            people.join(format!("{file}.identity.json")),
            org.to_string(),
        )
    };
    let logins = crate::fhir_cli::demo_logins(
        &dir,
        &node_dirs,
        &[
            login(&alice, "dr-alice", "hospital-a"),
            login(&bob, "dr-bob", "hospital-b"),
            login(&carol, "tech-carol", "lab-x"),
            login(&maria, "maria", "hospital-a"),
            // The operator: moving the lead takes an org admin's token.
            (
                "admin@hospital-a".to_string(),
                keys.org_file("hospital-a", "admin"),
                "hospital-a".to_string(),
            ),
        ],
        &maria.id,
    )?;
    let mut tokens: Vec<(String, String)> = Vec::new();
    for (staff, account) in [&alice, &bob, &carol]
        .into_iter()
        .zip(logins["accounts"].as_array().into_iter().flatten())
    {
        let node = account["node"].as_str().unwrap_or_default();
        let token = crate::fhir_cli::login(
            node,
            &staff.id,
            crate::fhir_cli::DEMO_PASSWORD,
            account["totp_secret"].as_str().unwrap_or_default(),
            "user/*.cruds",
        )?;
        let token = token["access_token"].as_str().unwrap_or_default();
        story
            .staff
            .push((staff.id.clone(), Client::with_token(node, token)));
        tokens.push((staff.id.clone(), token.to_string()));
    }
    let mut registrations = Vec::new();
    for (patient, (name, born)) in [
        (&maria, SYNTHETIC_PATIENTS[0]),
        (&jonas, SYNTHETIC_PATIENTS[1]),
    ] {
        registrations.push(story.commit(
            patient,
            TxBody::RegisterPatient {
                public_key: patient.key.public_key(),
            },
            &format!(
                "{name} (synthetic, born {born}) registers as {}",
                patient.id
            ),
        )?);
    }
    for (patient, name) in [(&maria, "Maria"), (&jonas, "Jonas")] {
        story.commit(
            patient,
            TxBody::SetEncryptionKey {
                public_key: patient
                    .encryption_key()
                    .ok_or("a new patient has an encryption key")?
                    .public_key()
                    .to_base64url(),
            },
            &format!("{name} publishes the key her/his records' keys are wrapped for"),
        )?;
    }
    let maria_name = SYNTHETIC_PATIENTS[0].0;
    let jonas_name = SYNTHETIC_PATIENTS[1].0;

    story.chapter("Consent: Maria lets her hospital and her lab's technicians keep her records");
    let grant = |grantee: Grantee, categories: Vec<Category>, actions: Vec<Action>| TxBody::Grant {
        grantee,
        scope: Scope {
            resource_types: vec![],
            categories,
        },
        actions,
        purposes: vec![Purpose::Treatment],
        expires_at_ms: None,
    };
    let hospital_a = || Grantee::Org {
        org: "hospital-a".into(),
    };
    let read_write = || vec![Action::Read, Action::Write];
    story.commit(
        &maria,
        grant(hospital_a(), all_categories(), read_write()),
        "Maria grants hospital-a read+write on all her clinical categories, for treatment",
    )?;
    story.commit(
        &maria,
        grant(
            Grantee::Role {
                org: "lab-x".into(),
                role: Role::LabTechnician,
            },
            vec![Category::Diagnostics],
            vec![Action::Write],
        ),
        "Maria grants lab-x's lab technicians write on diagnostics",
    )?;
    story.commit(
        &jonas,
        grant(hospital_a(), all_categories(), read_write()),
        "Jonas grants hospital-a read+write on all his clinical categories",
    )?;

    story.chapter(
        "Records are written at their custodian, encrypted; the ledger indexes each version",
    );
    story.write_record(
        &alice,
        "obs-bp-1",
        json!({"resourceType": "Observation", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel"}]},
               "subject": {"reference": format!("Patient/{}", maria.id), "display": maria_name},
               "component": [{"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                              "valueQuantity": {"value": 142, "unit": "mm[Hg]"}}]}),
    )?;
    story.write_record(
        &carol,
        "dr-lipids-1",
        json!({"resourceType": "DiagnosticReport", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "57698-3", "display": "Lipid panel"}]},
               "subject": {"reference": format!("Patient/{}", maria.id), "display": maria_name}}),
    )?;
    story.write_record(
        &alice,
        "cond-allergy-1",
        json!({"resourceType": "Condition",
               "code": {"text": "Penicillin allergy"},
               "subject": {"reference": format!("Patient/{}", jonas.id), "display": jonas_name}}),
    )?;

    story.chapter(
        "A clinician at another hospital asks his node for Maria's blood pressure: no consent, denied",
    );
    let (denied, _) = story.read(&bob, "hospital-a", "obs-bp-1", Purpose::Treatment)?;

    story.chapter("He requests access; Maria approves; the same read is now granted");
    let request = story.commit(
        &bob,
        TxBody::RequestAccess {
            patient: maria.id.clone(),
            scope: Scope {
                resource_types: vec![],
                categories: vec![Category::Diagnostics],
            },
            actions: vec![Action::Read],
            purpose: Purpose::Treatment,
        },
        "dr-bob@hospital-b requests read access to Maria's diagnostics for treatment",
    )?;
    let approval = story.commit(
        &maria,
        TxBody::ApproveRequest {
            request_id: request.tx_id,
            expires_at_ms: Some(now_ms() + 30 * 24 * 60 * 60 * 1000),
        },
        "Maria approves the request for 30 days",
    )?;
    story.read(&bob, "hospital-a", "obs-bp-1", Purpose::Treatment)?;

    story.chapter("Maria's history across custodians, as dr-bob may see it, in one call");
    let history: History = story
        .as_staff(&bob)?
        .post(
            &format!("/v1/patients/{}/history", maria.id),
            &json!({"purpose": Purpose::Treatment}),
        )
        .map_err(|e| e.to_string())?;
    for version in &history.versions {
        println!(
            "   ✓ {}/{} v{} {} by {}",
            version.custodian,
            version.record_id,
            version.version,
            version.resource_type,
            version.author
        );
    }
    println!(
        "   {} versions from {} custodians under one access entry on the ledger  [{}]",
        history.versions.len(),
        history
            .versions
            .iter()
            .map(|v| v.custodian.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        short(&history.access.tx_id.to_hex())
    );

    story.chapter("Maria revokes that consent; from its commit on, the same read is denied");
    story.commit(
        &maria,
        TxBody::Revoke {
            grant_id: approval.tx_id,
        },
        "Maria revokes dr-bob's consent",
    )?;
    story.read(&bob, "lab-x", "dr-lipids-1", Purpose::Treatment)?;

    story.chapter("Emergency: Jonas arrives unconscious at hospital-b; break-glass");
    story.read(&bob, "hospital-a", "cond-allergy-1", Purpose::Treatment)?;
    let glass = story.commit(
        &bob,
        TxBody::BreakGlass {
            patient: jonas.id.clone(),
            reason: EmergencyReason::UnconsciousPatient,
            justification_commitment: commit_text("Unresponsive on arrival; allergy history needed before antibiotics"),
            duration_ms: 30 * 60 * 1000,
        },
        "dr-bob@hospital-b breaks the glass for Jonas: unconscious patient, 30 minutes (flagged for review)",
    )?;
    story.read(&bob, "hospital-a", "cond-allergy-1", Purpose::Emergency)?;
    story.commit(
        &dan,
        TxBody::ReviewBreakGlass {
            break_glass_id: glass.tx_id,
            verdict: BreakGlassVerdict::Justified,
        },
        "auditor-dan@regulator reviews the break-glass: justified",
    )?;

    story.chapter("Bad input changes nothing: a forgery and a replay");
    let chain_id = story.client.chain_id().map_err(|e| e.to_string())?;
    let mut forged = bob.sign(
        &chain_id,
        1,
        now_ms() + TX_LIFETIME_MS,
        TxBody::Revoke {
            grant_id: glass.tx_id,
        },
    );
    forged.payload.signer = maria.id.clone();
    match story.client.submit(&forged) {
        Err(error) => println!("   ✗ a transaction signed by dr-bob in Maria's name: {error}"),
        Ok(response) => return Err(format!("a forgery was accepted: {:?}", response.outcome)),
    }
    let replayed_tx: medledger_core::tx::SignedTx =
        serde_json::from_value(registrations[0].inclusion_proof.leaf["tx"].clone())
            .map_err(|e| e.to_string())?;
    let replay = story
        .client
        .submit(&replayed_tx)
        .map_err(|e| e.to_string())?;
    match replay.outcome {
        TxOutcome::Rejected { rejection } => println!(
            "   ✗ Maria's signed registration, captured and sent again: rejected ({rejection})"
        ),
        TxOutcome::Committed { .. } => return Err("a replayed registration committed".into()),
    }

    story.chapter("What the patients see: everything about them, including who was refused");
    let events: Vec<AuditEvent> = story
        .client
        .get(&format!("/v1/audit/patients/{}", maria.id))
        .map_err(|e| e.to_string())?;
    for event in &events {
        println!("   {}", describe_event(event));
    }
    println!("   … and Jonas: the emergency access, flagged, and its review");
    let events: Vec<AuditEvent> = story
        .client
        .get(&format!("/v1/audit/patients/{}", jonas.id))
        .map_err(|e| e.to_string())?;
    for event in events
        .iter()
        .filter(|e| e.flagged || e.kind == "review_break_glass")
    {
        println!("   {}", describe_event(event));
    }
    let glass_list: serde_json::Value = story
        .client
        .get(&format!("/v1/patients/{}/break-glass", jonas.id))
        .map_err(|e| e.to_string())?;
    println!(
        "   Jonas sees {} break-glass opening(s) on his records",
        glass_list.as_array().map(|a| a.len()).unwrap_or(0)
    );

    story.chapter(
        "The FHIR R4 API: any FHIR client, with a token from the node (password and one-time code)",
    );
    // dr-alice's token from her login above (a one-time code is good for one login).
    let token = tokens
        .iter()
        .find(|(id, _)| *id == alice.id)
        .map(|(_, token)| token.clone())
        .unwrap_or_default();
    let (status, bundle) = crate::fhir_cli::fhir_get(
        &format!("{}/fhir/Patient/{}/$everything", node.api_url, maria.id),
        &token,
    )?;
    println!(
        "   dr-alice, with her token (password + one-time code), GET /fhir/Patient/{}/$everything: {status}, {} resources from every custodian she may read",
        short(&maria.id),
        bundle["total"]
    );
    for (org, url, _) in &node_dirs {
        println!("   {org}: FHIR base {url}/fhir (token endpoint {url}/auth/token)");
    }
    println!(
        "   logins (password in {}, one-time code secrets in {}):",
        logins["password_file"].as_str().unwrap_or(""),
        crate::fhir_cli::demo_description_file(&dir).display()
    );
    for account in logins["accounts"].as_array().into_iter().flatten() {
        println!(
            "     medledger token --node {} --username {} --totp-secret {} --password-file {}",
            account["node"].as_str().unwrap_or(""),
            account["username"].as_str().unwrap_or(""),
            account["totp_secret"].as_str().unwrap_or(""),
            logins["password_file"].as_str().unwrap_or(""),
        );
    }

    story.chapter("Anyone with the root certificate verifies the audit trail, trusting no node");
    let root_text = std::fs::read_to_string(keys.root_certificate()).map_err(|e| e.to_string())?;
    let root = IssuedCert::from_pem(&root_text).map_err(|e| e.to_string())?;
    let report = verify_transaction_proof(&story.client, &denied, &root, Some(&first_head))?;
    println!(
        "   ✓ the denied access is leaf {} of the signed log (size {}, root {}), and the log extends its size-{} head from genesis",
        report.leaf_index,
        report.tree_head.tree_head.log_size,
        short(&report.tree_head.tree_head.log_root.to_hex()),
        first_head.tree_head.log_size
    );

    let agreed = wait_for_agreement(&nodes, std::time::Duration::from_secs(20))?;
    println!(
        "\nAll {NODES} nodes hold the same chain: block {} {} (state {})",
        agreed.height,
        short(&agreed.block_hash.to_hex()),
        short(&agreed.state_hash.to_hex())
    );
    let contributions: Vec<medledger_core::model::Contribution> = story
        .client
        .get("/v1/contributions")
        .map_err(|e| e.to_string())?;
    println!("What each member contributed, as the ledger counts it:");
    for line in crate::commands::contribution_lines(&contributions) {
        println!("   {line}");
    }
    let status: serde_json::Value = story.client.get("/v1/status").map_err(|e| e.to_string())?;
    // A tree head held outside the node lets anyone later catch a rewrite or a rollback.
    let last_head: SignedTreeHead = story
        .client
        .get("/v1/tree-head")
        .map_err(|e| e.to_string())?;
    let head_file = dir.join("tree-head.json");
    std::fs::write(
        &head_file,
        serde_json::to_string_pretty(&last_head).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    println!(
        "\nDone: {} blocks, log of {} entries. Re-check the stored ledger, against the tree head kept outside it, with:\n   medledger verify --data-dir {} --tree-head {} --root-cert {}",
        status["height"].as_u64().unwrap_or(0) + 1,
        status["log_size"],
        node_dir.display(),
        head_file.display(),
        keys.root_certificate().display()
    );
    for other in ["hospital-b", "lab-x"] {
        println!(
            "   medledger verify --data-dir {}",
            dir.join("nodes").join(other).display()
        );
    }
    // Only now: a client that starts when the file appears acts alone (see its writer).
    crate::fhir_cli::write_demo_description(&dir, &logins)?;
    if once {
        drop(nodes);
        return Ok(());
    }
    println!("\nThe node keeps running for exploration (Ctrl-C to stop). Try:");
    println!(
        "   curl {}/v1/status      (role, term, leader, peers' lag)",
        node.api_url
    );
    let admin = logins["accounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|account| account["username"] == "admin@hospital-a");
    if let Some(admin) = admin {
        println!(
            "   export MEDLEDGER_TOKEN=$(medledger token --node {} --username admin@hospital-a --totp-secret {} --password-file {})",
            node.api_url,
            admin["totp_secret"].as_str().unwrap_or(""),
            logins["password_file"].as_str().unwrap_or(""),
        );
        println!(
            "   medledger node transfer-leader --node {} --to node@hospital-b      (an org admin's call)",
            node.api_url
        );
    }
    println!("   curl {}/v1/audit/patients/{}", node.api_url, maria.id);
    println!("   curl {}/v1/patients/{}/records", node.api_url, maria.id);
    println!(
        "   medledger audit patient {} --node {}",
        jonas.id, node.api_url
    );
    println!(
        "   medledger tx --node {} --as {} grant --grantee org:hospital-b --categories diagnostics",
        node.api_url,
        people.join("maria.identity.json").display()
    );
    println!("   (everyone's keys are in {})", people.display());
    crate::commands::wait_for_interrupt();
    Ok(())
}
